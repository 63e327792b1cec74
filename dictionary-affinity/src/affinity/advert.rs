//! The advertisement codec: version-2 messages DICT_STATS and LOAD.
//!
//! Network byte order; the 4-byte header has the layout of version 1 and the length of every
//! message follows from its first 12 (DICT_STATS) or 4 (LOAD) bytes. [`encode_advertisement`]
//! writes a batch as a sequence of these messages; [`decode_advertisement`] reads one back.
//!
//! ```text
//! DICT_STATS: one member's decayed savings for up to 4096 pairs of one address family.
//!  0                   1                   2                   3
//!  0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1
//! +---------------+---------------+---------------+---------------+
//! | Msg Type = 4  | Action = 1    |    Member     | Address Family|   0..4   (1 IPv4, 2 IPv6)
//! +---------------+---------------+---------------+---------------+
//! |                       Dictionary Epoch                        |   4..8
//! +---------------+---------------+-------------------------------+
//! | Client Prefix | Server Prefix |         Record Count          |   8..12  (prefix lengths in bits)
//! +---------------+---------------+-------------------------------+
//! then Record Count records, 12 bytes (IPv4) or 36 bytes (IPv6) each:
//! +---------------------------------------------------------------+
//! |        Client Prefix (4 or 16 bytes, host bits zero)          |
//! +---------------------------------------------------------------+
//! |        Server Address (4 or 16 bytes, host bits zero)         |
//! +---------------------------------------------------------------+
//! |      Decayed Bytes Saved (IEEE 754 binary32, finite, >= 0)    |
//! +---------------------------------------------------------------+
//!
//! LOAD: one member's load (8 bytes).
//! +---------------+---------------+---------------+---------------+
//! | Msg Type = 5  | Action = 1    |    Member     |       0       |   0..4
//! +---------------+---------------+---------------+---------------+
//! |             Load (IEEE 754 binary32, finite, >= 0)            |   4..8
//! +---------------------------------------------------------------+
//! ```
//!
//! A saving of 0 withdraws the pair (the member's dictionary no longer holds it). binary32
//! keeps 24 bits of precision, plenty for a score; engines quantize local inputs the same way
//! so that a member's view of itself equals its peers' view of it.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use cluster_proto::MemberId;

use super::Pair;

/// One member's dictionary statistics for one pair, as advertised (DICT_STATS record).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DictStats {
    /// The pair.
    pub pair: Pair,
    /// The advertising member.
    pub member: MemberId,
    /// Its decayed bytes saved for the pair when it advertised (0 withdraws the pair).
    pub saved_decayed: f64,
    /// Its dictionary epoch: a new epoch voids the member's statistics of older epochs.
    pub epoch: u32,
}

/// One member's load as advertised (LOAD message): active connections or bytes/s, cluster-wide alike.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LoadReport {
    /// The advertising member.
    pub member: MemberId,
    /// Its load.
    pub load: f64,
}

/// A decoded batch of DICT_STATS and LOAD messages.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Advertisement {
    /// Dictionary statistics, in message order.
    pub stats: Vec<DictStats>,
    /// Load reports, in message order.
    pub loads: Vec<LoadReport>,
}

/// Wire codes of the version-2 advertisement messages: those of the cluster protocol
/// (`cluster_proto::wire::advertisement`), where their framing rule lives.
pub mod wire {
    pub use cluster_proto::wire::advertisement::{
        ADVERTISE, DICT_STATS, DICT_STATS_HEADER_LEN, LOAD, LOAD_LEN, MAX_RECORDS, RECORD_V4_LEN, RECORD_V6_LEN,
    };
}

/// Why advertisement bytes could not be decoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AdvertisementError {
    /// The bytes end inside a message.
    Truncated,
    /// Byte 0 is neither DICT_STATS nor LOAD.
    UnknownMessageType(u8),
    /// Byte 1 is not ADVERTISE.
    UnknownAction(u8),
    /// Byte 3 of DICT_STATS is not IPv4 (1) or IPv6 (2).
    UnknownAddressFamily(u8),
    /// A prefix length is longer than the address.
    BadPrefixLength,
    /// A prefix has host bits set.
    HostBitsSet,
    /// A value is negative, infinite or NaN.
    BadValue,
    /// More than [`wire::MAX_RECORDS`] records.
    TooManyRecords(u16),
}

impl fmt::Display for AdvertisementError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Truncated => f.write_str("advertisement truncated"),
            Self::UnknownMessageType(t) => write!(f, "unknown advertisement message type {t}"),
            Self::UnknownAction(a) => write!(f, "unknown advertisement action {a}"),
            Self::UnknownAddressFamily(a) => write!(f, "unknown address family {a}"),
            Self::BadPrefixLength => f.write_str("prefix length longer than the address"),
            Self::HostBitsSet => f.write_str("prefix with host bits set"),
            Self::BadValue => f.write_str("value negative, infinite or NaN"),
            Self::TooManyRecords(n) => write!(f, "{n} records in one DICT_STATS (at most {})", wire::MAX_RECORDS),
        }
    }
}

impl std::error::Error for AdvertisementError {}

/// The binary32 a value travels as: NaN and negatives become 0, huge values `f32::MAX`.
pub fn quantize(v: f64) -> f64 {
    f64::from(to_wire(v))
}

fn to_wire(v: f64) -> f32 {
    if v.is_nan() || v <= 0.0 {
        0.0
    } else if v >= f64::from(f32::MAX) {
        f32::MAX
    } else {
        v as f32
    }
}

fn from_wire(b: &[u8]) -> Result<f64, AdvertisementError> {
    let v = f32::from_be_bytes([b[0], b[1], b[2], b[3]]);
    if !v.is_finite() || v < 0.0 {
        return Err(AdvertisementError::BadValue);
    }
    Ok(if v == 0.0 { 0.0 } else { f64::from(v) })
}

fn put_ip(out: &mut Vec<u8>, ip: IpAddr) {
    match ip {
        IpAddr::V4(a) => out.extend_from_slice(&a.octets()),
        IpAddr::V6(a) => out.extend_from_slice(&a.octets()),
    }
}

/// Encodes dictionary statistics and load reports as DICT_STATS and LOAD messages.
pub fn encode_advertisement(stats: &[DictStats], loads: &[LoadReport]) -> Vec<u8> {
    let group = |s: &DictStats| (s.member, s.epoch, s.pair.is_ipv4(), s.pair.client_prefix(), s.pair.server_prefix());
    let record_len = |v4: bool| if v4 { wire::RECORD_V4_LEN } else { wire::RECORD_V6_LEN };
    let mut out = Vec::with_capacity(
        stats.iter().map(|s| record_len(s.pair.is_ipv4())).sum::<usize>() + 64 + loads.len() * wire::LOAD_LEN,
    );
    let mut i = 0;
    while i < stats.len() {
        let g = group(&stats[i]);
        let mut j = i + 1;
        while j < stats.len() && j - i < wire::MAX_RECORDS && group(&stats[j]) == g {
            j += 1;
        }
        let (member, epoch, v4, cl, sl) = g;
        out.extend_from_slice(&[wire::DICT_STATS, wire::ADVERTISE, member.0, if v4 { 1 } else { 2 }]);
        out.extend_from_slice(&epoch.to_be_bytes());
        out.extend_from_slice(&[cl, sl]);
        out.extend_from_slice(&((j - i) as u16).to_be_bytes());
        for s in &stats[i..j] {
            put_ip(&mut out, s.pair.client());
            put_ip(&mut out, s.pair.server());
            out.extend_from_slice(&to_wire(s.saved_decayed).to_be_bytes());
        }
        i = j;
    }
    for l in loads {
        out.extend_from_slice(&[wire::LOAD, wire::ADVERTISE, l.member.0, 0]);
        out.extend_from_slice(&to_wire(l.load).to_be_bytes());
    }
    out
}

/// The length of the advertisement message at the start of `bytes`, or `None` when more bytes
/// are needed to tell (for framing on a stream). The rule is the cluster protocol's
/// ([`cluster_proto::wire::advertisement_len`]); only the error type is this crate's.
pub fn advertisement_len(bytes: &[u8]) -> Result<Option<usize>, AdvertisementError> {
    use cluster_proto::wire::DecodeError as E;
    cluster_proto::wire::advertisement_len(bytes).map_err(|e| match e {
        E::UnknownMessageType(t) => AdvertisementError::UnknownMessageType(t),
        E::UnknownAction { action, .. } => AdvertisementError::UnknownAction(action),
        E::UnknownAddressFamily(af) => AdvertisementError::UnknownAddressFamily(af),
        E::TooManyRecords(n) => AdvertisementError::TooManyRecords(n),
        // advertisement_len reports nothing else.
        E::UnknownProtocol(_) | E::Truncated | E::WrongMember { .. } => AdvertisementError::Truncated,
    })
}

fn read_ip(b: &[u8], v4: bool) -> IpAddr {
    if v4 {
        IpAddr::V4(Ipv4Addr::new(b[0], b[1], b[2], b[3]))
    } else {
        let mut o = [0u8; 16];
        o.copy_from_slice(&b[..16]);
        IpAddr::V6(Ipv6Addr::from(o))
    }
}

/// Decodes a whole buffer of DICT_STATS and LOAD messages; never panics.
pub fn decode_advertisement(bytes: &[u8]) -> Result<Advertisement, AdvertisementError> {
    let mut adv = Advertisement::default();
    let mut rest = bytes;
    while !rest.is_empty() {
        let len = advertisement_len(rest)?.ok_or(AdvertisementError::Truncated)?;
        if rest.len() < len {
            return Err(AdvertisementError::Truncated);
        }
        let (m, tail) = rest.split_at(len);
        rest = tail;
        let member = MemberId(m[2]);
        if m[0] == wire::LOAD {
            adv.loads.push(LoadReport { member, load: from_wire(&m[4..8])? });
            continue;
        }
        let v4 = m[3] == 1;
        let (alen, limit) = if v4 { (4, 32) } else { (16, 128) };
        let epoch = u32::from_be_bytes([m[4], m[5], m[6], m[7]]);
        let (cl, sl) = (m[8], m[9]);
        if cl > limit || sl > limit {
            return Err(AdvertisementError::BadPrefixLength);
        }
        for r in m[wire::DICT_STATS_HEADER_LEN..].chunks_exact(2 * alen + 4) {
            let (client, server) = (read_ip(r, v4), read_ip(&r[alen..], v4));
            let pair = Pair::new(client, cl, server, sl).map_err(|_| AdvertisementError::BadPrefixLength)?;
            if pair.client() != client || pair.server() != server {
                return Err(AdvertisementError::HostBitsSet);
            }
            adv.stats.push(DictStats { pair, member, saved_decayed: from_wire(&r[2 * alen..])?, epoch });
        }
    }
    Ok(adv)
}

#[cfg(test)]
mod tests {
    use super::*;
    fn v4(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn quantize_matches_the_wire() {
        assert_eq!(quantize(f64::NAN), 0.0);
        assert_eq!(quantize(-3.0), 0.0);
        assert_eq!(quantize(1e300), f64::from(f32::MAX));
        assert_eq!(quantize(0.1), f64::from(0.1f32));
    }

    #[test]
    fn length_needs_only_the_header() {
        assert_eq!(advertisement_len(&[]), Ok(None));
        assert_eq!(advertisement_len(&[5]), Ok(None));
        assert_eq!(advertisement_len(&[5, 1]), Ok(Some(8)));
        assert_eq!(advertisement_len(&[4, 1, 0, 1, 0, 0, 0, 0, 24, 32]), Ok(None));
        assert_eq!(advertisement_len(&[4, 1, 0, 1, 0, 0, 0, 0, 24, 32, 0, 2]), Ok(Some(36)));
        assert_eq!(advertisement_len(&[4, 1, 0, 2, 0, 0, 0, 0, 64, 128, 0, 1]), Ok(Some(48)));
        assert_eq!(advertisement_len(&[1]), Err(AdvertisementError::UnknownMessageType(1)));
        assert_eq!(advertisement_len(&[4, 2]), Err(AdvertisementError::UnknownAction(2)));
        assert_eq!(
            advertisement_len(&[4, 1, 0, 3, 0, 0, 0, 0, 0, 0, 0, 0]),
            Err(AdvertisementError::UnknownAddressFamily(3))
        );
        assert_eq!(
            advertisement_len(&[4, 1, 0, 1, 0, 0, 0, 0, 0, 0, 0x10, 1]),
            Err(AdvertisementError::TooManyRecords(4097))
        );
    }

    #[test]
    fn decode_rejects_host_bits_and_bad_values() {
        let pair = Pair::new(v4("192.0.2.0"), 24, v4("198.51.100.1"), 32).unwrap();
        let ok = encode_advertisement(&[DictStats { pair, member: MemberId(3), saved_decayed: 5.0, epoch: 7 }], &[]);
        assert_eq!(ok.len(), 24);
        assert!(decode_advertisement(&ok).is_ok());
        let mut bad = ok.clone();
        bad[15] = 1; // 192.0.2.1/24
        assert_eq!(decode_advertisement(&bad), Err(AdvertisementError::HostBitsSet));
        let mut bad = ok.clone();
        bad[20..24].copy_from_slice(&f32::NAN.to_be_bytes());
        assert_eq!(decode_advertisement(&bad), Err(AdvertisementError::BadValue));
        let mut bad = ok.clone();
        bad[8] = 33;
        assert_eq!(decode_advertisement(&bad), Err(AdvertisementError::BadPrefixLength));
        assert_eq!(decode_advertisement(&ok[..23]), Err(AdvertisementError::Truncated));
    }
}
