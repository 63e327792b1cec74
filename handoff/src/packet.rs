//! Zero-copy parsing of IPv4 and IPv6 packets carrying TCP, UDP or ICMP errors into the
//! flow they belong to.
//!
//! Fragments: only the first fragment of a datagram carries the ports, so only it can be
//! classified. The interception rules use the kernel's defragmentation (nf_defrag, pulled in
//! by the `socket` match and by conntrack) so that whole datagrams reach the queue; a
//! non-first fragment that still arrives is reported as [`Parsed::Fragment`] and accepted
//! untouched by the classifier (it cannot be steered), and counted.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use cluster_proto::{Connection, Protocol};

/// TCP flag bits (RFC 9293, 3.1).
pub mod tcp_flags {
    /// FIN.
    pub const FIN: u8 = 0x01;
    /// SYN.
    pub const SYN: u8 = 0x02;
    /// RST.
    pub const RST: u8 = 0x04;
    /// ACK.
    pub const ACK: u8 = 0x10;
}

/// What a packet is, for classification.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Parsed {
    /// A TCP segment or UDP datagram (or its first fragment).
    Flow(FlowPacket),
    /// An ICMP or ICMPv6 error about a TCP/UDP packet: steered by the embedded headers.
    IcmpError {
        /// The connection of the embedded (offending) packet, in its direction.
        connection: Connection,
    },
    /// A non-first fragment: no ports, cannot be classified.
    Fragment,
    /// Anything else (other protocols, ICMP that is not an error about TCP/UDP).
    Other,
}

/// A TCP/UDP packet's flow and where its transport header is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlowPacket {
    /// The connection in this packet's direction.
    pub connection: Connection,
    /// TCP flags (0 for UDP).
    pub tcp_flags: u8,
    /// Offset of the TCP/UDP header in the packet.
    pub l4_offset: usize,
}

impl FlowPacket {
    /// A SYN without ACK: the first packet of a TCP connection.
    pub fn is_syn(&self) -> bool {
        self.connection.protocol() == Protocol::Tcp
            && self.tcp_flags & (tcp_flags::SYN | tcp_flags::ACK) == tcp_flags::SYN
    }

    /// A SYN or SYN-ACK (carries the MSS option).
    pub fn has_syn(&self) -> bool {
        self.connection.protocol() == Protocol::Tcp && self.tcp_flags & tcp_flags::SYN != 0
    }
}

/// Why a packet could not be parsed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// Shorter than its headers say.
    #[error("truncated packet")]
    Truncated,
    /// Not IPv4 or IPv6.
    #[error("unknown IP version {0}")]
    BadVersion(u8),
    /// A header field is impossible (IHL below 5, data offset below 5...).
    #[error("malformed header")]
    Malformed,
}

const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
const IPPROTO_ICMP: u8 = 1;
const IPPROTO_ICMPV6: u8 = 58;

/// The IP header's facts needed here.
pub(crate) struct IpInfo {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub protocol: u8,
    pub l4_offset: usize,
    /// End of the IP datagram within the buffer (total length, clipped for ICMP quotes).
    pub end: usize,
    /// 0 not fragmented, 1 first fragment, 2 non-first fragment.
    pub fragment: u8,
}

/// Parses the IP header (and IPv6 extension headers). `quoted` accepts a datagram cut short
/// (as quoted inside an ICMP error).
pub(crate) fn ip_info(b: &[u8], quoted: bool) -> Result<IpInfo, ParseError> {
    let first = *b.first().ok_or(ParseError::Truncated)?;
    match first >> 4 {
        4 => {
            if b.len() < 20 {
                return Err(ParseError::Truncated);
            }
            let ihl = (first & 0x0f) as usize * 4;
            if ihl < 20 {
                return Err(ParseError::Malformed);
            }
            let total = u16::from_be_bytes([b[2], b[3]]) as usize;
            if total < ihl {
                return Err(ParseError::Malformed);
            }
            if b.len() < ihl || (!quoted && b.len() < total) {
                return Err(ParseError::Truncated);
            }
            let frag = u16::from_be_bytes([b[6], b[7]]);
            let (more, offset) = (frag & 0x2000 != 0, frag & 0x1fff);
            let fragment = if offset != 0 {
                2
            } else if more {
                1
            } else {
                0
            };
            Ok(IpInfo {
                src: IpAddr::V4(Ipv4Addr::new(b[12], b[13], b[14], b[15])),
                dst: IpAddr::V4(Ipv4Addr::new(b[16], b[17], b[18], b[19])),
                protocol: b[9],
                l4_offset: ihl,
                end: total.min(b.len()),
                fragment,
            })
        }
        6 => {
            if b.len() < 40 {
                return Err(ParseError::Truncated);
            }
            let payload = u16::from_be_bytes([b[4], b[5]]) as usize;
            let end = 40 + payload;
            if !quoted && b.len() < end {
                return Err(ParseError::Truncated);
            }
            let end = end.min(b.len());
            let src: [u8; 16] = b[8..24].try_into().expect("length checked");
            let dst: [u8; 16] = b[24..40].try_into().expect("length checked");
            let mut next = b[6];
            let mut at = 40;
            let mut fragment = 0;
            // Extension headers (RFC 8200, 4): hop-by-hop, routing, fragment, destination
            // options; bounded so a crafted chain cannot loop.
            for _ in 0..8 {
                match next {
                    0 | 43 | 60 => {
                        if end < at + 8 {
                            return Err(ParseError::Truncated);
                        }
                        next = b[at];
                        at += (b[at + 1] as usize + 1) * 8;
                    }
                    44 => {
                        if end < at + 8 {
                            return Err(ParseError::Truncated);
                        }
                        let off = u16::from_be_bytes([b[at + 2], b[at + 3]]);
                        fragment = if off >> 3 != 0 {
                            2
                        } else if off & 1 != 0 {
                            1
                        } else {
                            0
                        };
                        next = b[at];
                        at += 8;
                    }
                    _ => break,
                }
            }
            if at > end {
                return Err(ParseError::Truncated);
            }
            Ok(IpInfo {
                src: IpAddr::V6(Ipv6Addr::from(src)),
                dst: IpAddr::V6(Ipv6Addr::from(dst)),
                protocol: next,
                l4_offset: at,
                end,
                fragment,
            })
        }
        v => Err(ParseError::BadVersion(v)),
    }
}

/// Parses a packet that starts with its IP header.
pub fn parse(b: &[u8]) -> Result<Parsed, ParseError> {
    let ip = ip_info(b, false)?;
    if ip.fragment == 2 {
        return Ok(Parsed::Fragment);
    }
    match ip.protocol {
        IPPROTO_TCP | IPPROTO_UDP => flow(b, &ip, false).map(Parsed::Flow),
        IPPROTO_ICMP | IPPROTO_ICMPV6 => icmp_error(b, &ip),
        _ => Ok(Parsed::Other),
    }
}

fn flow(b: &[u8], ip: &IpInfo, quoted: bool) -> Result<FlowPacket, ParseError> {
    let l4 = ip.l4_offset;
    // An ICMP error quotes at least the first 8 bytes of the transport header: the ports.
    let need = if ip.protocol == IPPROTO_TCP && !quoted { 20 } else { 8 };
    if ip.end < l4 + need {
        return Err(ParseError::Truncated);
    }
    let sport = u16::from_be_bytes([b[l4], b[l4 + 1]]);
    let dport = u16::from_be_bytes([b[l4 + 2], b[l4 + 3]]);
    let (protocol, flags) = if ip.protocol == IPPROTO_TCP {
        // A quoted TCP header may stop after 8 bytes; the flags are then unknown (0).
        let flags = if ip.end >= l4 + 14 { b[l4 + 13] } else { 0 };
        if ip.end >= l4 + 20 && (b[l4 + 12] >> 4) < 5 {
            return Err(ParseError::Malformed);
        }
        (Protocol::Tcp, flags)
    } else {
        (Protocol::Udp, 0)
    };
    let connection = Connection::new(protocol, SocketAddr::new(ip.src, sport), SocketAddr::new(ip.dst, dport))
        .expect("one IP header, one family");
    Ok(FlowPacket { connection, tcp_flags: flags, l4_offset: l4 })
}

/// ICMP types whose body quotes the offending datagram (RFC 792, RFC 4443).
fn is_icmp_error(v6: bool, t: u8) -> bool {
    if v6 {
        matches!(t, 1..=4)
    } else {
        matches!(t, 3 | 11 | 12)
    }
}

fn icmp_error(b: &[u8], ip: &IpInfo) -> Result<Parsed, ParseError> {
    let at = ip.l4_offset;
    if ip.end < at + 8 {
        return Err(ParseError::Truncated);
    }
    let v6 = ip.protocol == IPPROTO_ICMPV6;
    if !is_icmp_error(v6, b[at]) {
        return Ok(Parsed::Other);
    }
    let quoted = &b[at + 8..ip.end];
    let Ok(inner) = ip_info(quoted, true) else { return Ok(Parsed::Other) };
    if (inner.protocol != IPPROTO_TCP && inner.protocol != IPPROTO_UDP) || inner.fragment == 2 {
        return Ok(Parsed::Other);
    }
    match flow(quoted, &inner, true) {
        Ok(f) => Ok(Parsed::IcmpError { connection: f.connection }),
        Err(_) => Ok(Parsed::Other),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = parse(&bytes);
            let _ = crate::encap::decapsulate(&bytes);
            let mut b = bytes.clone();
            let _ = crate::mss::clamp(&mut b, 20, 1000);
        }

        #[test]
        fn ip_like_bytes_never_panic(v6 in any::<bool>(), proto in prop_oneof![Just(6u8), Just(17), Just(1), Just(58), Just(44), Just(0)], rest in proptest::collection::vec(any::<u8>(), 0..120)) {
            let mut b = if v6 { vec![0x60, 0, 0, 0, 0, rest.len() as u8, proto, 64] } else { vec![0x45, 0, 0, (20 + rest.len()) as u8, 0, 0, 0, 0, 64, proto, 0, 0] };
            b.resize(if v6 { 40 } else { 20 }, 7);
            b.extend_from_slice(&rest);
            let _ = parse(&b);
        }
    }
}
