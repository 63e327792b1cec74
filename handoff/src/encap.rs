//! IP-in-IP encapsulation: outer IPv4 per RFC 2003, outer IPv6 per RFC 2473, either family
//! inside either (protocol / next header 4 for an inner IPv4 packet, 41 for inner IPv6).

use std::net::IpAddr;

/// Outer header sizes.
pub const OUTER_V4_LEN: usize = 20;
/// Outer IPv6 header size (no extension headers are added).
pub const OUTER_V6_LEN: usize = 40;
/// Hop limit / TTL of outer headers.
pub const OUTER_TTL: u8 = 64;

/// Why a packet could not be encapsulated or decapsulated.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TunnelError {
    /// The inner packet is not IPv4 or IPv6.
    #[error("inner packet is not IPv4 or IPv6")]
    BadInner,
    /// Inner plus outer header would exceed the 65535-byte IP limit.
    #[error("packet too big to encapsulate")]
    TooBig,
    /// The outer packet is not IPv4/IPv6 carrying protocol 4 or 41, or is truncated.
    #[error("not an IP-in-IP packet")]
    NotTunnel,
    /// Outer source and destination families differ.
    #[error("outer addresses of different families")]
    MixedOuter,
}

/// Internet checksum (RFC 1071) over `data`, folded and complemented (etherparse's
/// one's-complement sum, the one its own headers use).
pub fn checksum(data: &[u8]) -> u16 {
    etherparse::checksum::Sum16BitWords::new().add_slice(data).ones_complement().to_be()
}

/// Appends `inner` wrapped in an outer header from `src` to `dst` to `out`.
///
/// RFC 2003, 3.1: the outer TOS is copied from the inner header, DF is copied from an inner
/// IPv4 header, TTL is fresh. RFC 2473, 5: traffic class copied, flow label 0.
pub fn encapsulate(inner: &[u8], src: IpAddr, dst: IpAddr, ident: u16, out: &mut Vec<u8>) -> Result<(), TunnelError> {
    let first = *inner.first().ok_or(TunnelError::BadInner)?;
    let (proto, tos, df) = match first >> 4 {
        4 if inner.len() >= 20 => (4u8, inner[1], inner[6] & 0x40 != 0),
        6 if inner.len() >= 40 => (41u8, (inner[0] << 4) | (inner[1] >> 4), false),
        _ => return Err(TunnelError::BadInner),
    };
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let total = inner.len() + OUTER_V4_LEN;
            let total = u16::try_from(total).map_err(|_| TunnelError::TooBig)?;
            let start = out.len();
            let [t0, t1] = total.to_be_bytes();
            let [i0, i1] = ident.to_be_bytes();
            out.extend_from_slice(&[0x45, tos, t0, t1, i0, i1, if df { 0x40 } else { 0 }, 0, OUTER_TTL, proto, 0, 0]);
            out.extend_from_slice(&s.octets());
            out.extend_from_slice(&d.octets());
            let c = checksum(&out[start..start + OUTER_V4_LEN]).to_be_bytes();
            out[start + 10] = c[0];
            out[start + 11] = c[1];
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            let len = u16::try_from(inner.len()).map_err(|_| TunnelError::TooBig)?.to_be_bytes();
            out.extend_from_slice(&[0x60 | (tos >> 4), tos << 4, 0, 0, len[0], len[1], proto, OUTER_TTL]);
            out.extend_from_slice(&s.octets());
            out.extend_from_slice(&d.octets());
        }
        _ => return Err(TunnelError::MixedOuter),
    }
    out.extend_from_slice(inner);
    Ok(())
}

/// An IP-in-IP packet taken apart.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decapsulated<'a> {
    /// Outer source: the member that sent it.
    pub src: IpAddr,
    /// Outer destination.
    pub dst: IpAddr,
    /// The inner packet.
    pub inner: &'a [u8],
}

/// Takes the outer header off an IP-in-IP packet (IPv4 or IPv6 outer, no outer extension
/// headers).
pub fn decapsulate(outer: &[u8]) -> Result<Decapsulated<'_>, TunnelError> {
    let first = *outer.first().ok_or(TunnelError::NotTunnel)?;
    match first >> 4 {
        4 => {
            let ihl = (first & 0x0f) as usize * 4;
            if outer.len() < 20 || ihl < 20 || outer.len() < ihl || !matches!(outer[9], 4 | 41) {
                return Err(TunnelError::NotTunnel);
            }
            let total = (u16::from_be_bytes([outer[2], outer[3]]) as usize).min(outer.len());
            if total < ihl || u16::from_be_bytes([outer[6], outer[7]]) & 0x3fff != 0 {
                // Outer fragments are reassembled by the kernel before a raw socket sees them.
                return Err(TunnelError::NotTunnel);
            }
            let src: [u8; 4] = outer[12..16].try_into().expect("length checked");
            let dst: [u8; 4] = outer[16..20].try_into().expect("length checked");
            Ok(Decapsulated { src: IpAddr::from(src), dst: IpAddr::from(dst), inner: &outer[ihl..total] })
        }
        6 => {
            if outer.len() < 40 || !matches!(outer[6], 4 | 41) {
                return Err(TunnelError::NotTunnel);
            }
            let end = (40 + u16::from_be_bytes([outer[4], outer[5]]) as usize).min(outer.len());
            let src: [u8; 16] = outer[8..24].try_into().expect("length checked");
            let dst: [u8; 16] = outer[24..40].try_into().expect("length checked");
            Ok(Decapsulated { src: IpAddr::from(src), dst: IpAddr::from(dst), inner: &outer[40..end] })
        }
        _ => Err(TunnelError::NotTunnel),
    }
}
