//! Version-1 control-channel wire format, byte-exact with the paper (section 2.3, Fig. 4 and
//! Fig. 5). All integers are in network byte order.
//!
//! Every message starts with the 4-byte header of Fig. 4:
//!
//! ```text
//!  0       7 8      15 16     23 24     31
//! +---------+---------+---------+---------+
//! | Message | Action  | byte 2  | byte 3  |
//! |  Type   |  Type   |         |         |
//! +---------+---------+---------+---------+
//!
//! INSTALL_CONNECTION (1) | FORWARD (1) / BYPASS (2) | Protocol (6, 17) | Address Family (1, 2)
//! REMOVE_CONNECTION  (2) | FORWARD (1) / BYPASS (2) | Protocol (6, 17) | Address Family (1, 2)
//! CLUSTER_PEER_SYNC  (3) | PEER_JOIN (1)            | Version          | 0
//! CLUSTER_PEER_SYNC  (3) | PEER_KEEPALIVE (2)       | 0                | 0
//! CLUSTER_PEER_SYNC  (3) | PEER_LEAVE (3)           | Error Code       | 0
//! CLUSTER_PEER_SYNC  (3) | PEER_REJECT (4)          | Error Code       | 0
//! ```
//!
//! INSTALL_CONNECTION and REMOVE_CONNECTION carry one connection each (Fig. 5, IPv4 shown;
//! IPv6 has 16-byte addresses, 40 bytes in all):
//!
//! ```text
//!  0                   1                   2                   3
//!  0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1
//! +---------------+---------------+---------------+---------------+
//! | Message Type  |  Action Type  |   Protocol    | Address Family|  0..4
//! +---------------+---------------+---------------+---------------+
//! |          Source Port          |       Destination Port        |  4..8
//! +-------------------------------+-------------------------------+
//! |                        Source Address                         |  8..12
//! +---------------------------------------------------------------+
//! |                      Destination Address                      | 12..16
//! +---------------------------------------------------------------+
//! ```
//!
//! The length of every message follows from its header, so the stream needs no framing.
//! Reserved bytes (the "0" above) are sent as zero and ignored on receipt.
//!
//! Version 2 (negotiated in PEER_JOIN, see [`crate::session`]) adds two message types,
//! DICT_STATS (4) and LOAD (5), framed by [`advertisement_len`] and read by [`decode_frame`];
//! a version-1 channel treats them as unknown message types, as the paper says.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use crate::flow::{Action, Connection, Protocol};

/// Byte ranges of the fixed header and the connection body.
pub mod field {
    use std::ops::Range;
    /// Message type.
    pub const MESSAGE_TYPE: usize = 0;
    /// Action type.
    pub const ACTION_TYPE: usize = 1;
    /// Protocol (INSTALL/REMOVE), version (PEER_JOIN) or error code (PEER_LEAVE/REJECT).
    pub const BYTE2: usize = 2;
    /// Address family (INSTALL/REMOVE); zero otherwise.
    pub const BYTE3: usize = 3;
    /// Source port of the connection.
    pub const SRC_PORT: Range<usize> = 4..6;
    /// Destination port of the connection.
    pub const DST_PORT: Range<usize> = 6..8;
    /// Source address: 4 bytes (IPv4) or 16 bytes (IPv6) from here.
    pub const ADDRS: usize = 8;
}

/// Size of the header every message starts with.
pub const HEADER_LEN: usize = 4;
/// Size of an IPv4 INSTALL_CONNECTION or REMOVE_CONNECTION.
pub const CONNECTION_V4_LEN: usize = 16;
/// Size of an IPv6 INSTALL_CONNECTION or REMOVE_CONNECTION.
pub const CONNECTION_V6_LEN: usize = 40;
/// Size of every CLUSTER_PEER_SYNC message.
pub const PEER_SYNC_LEN: usize = HEADER_LEN;
/// The longest message of version 1.
pub const MAX_MESSAGE_LEN: usize = CONNECTION_V6_LEN;

/// Message type codes (byte 0).
pub mod message_type {
    /// INSTALL_CONNECTION.
    pub const INSTALL_CONNECTION: u8 = 1;
    /// REMOVE_CONNECTION.
    pub const REMOVE_CONNECTION: u8 = 2;
    /// CLUSTER_PEER_SYNC.
    pub const CLUSTER_PEER_SYNC: u8 = 3;
}

/// CLUSTER_PEER_SYNC action codes (byte 1).
pub mod peer_sync {
    /// PEER_JOIN.
    pub const PEER_JOIN: u8 = 1;
    /// PEER_KEEPALIVE.
    pub const PEER_KEEPALIVE: u8 = 2;
    /// PEER_LEAVE.
    pub const PEER_LEAVE: u8 = 3;
    /// PEER_REJECT.
    pub const PEER_REJECT: u8 = 4;
}

/// Address family codes (byte 3 of INSTALL/REMOVE), IANA address family numbers.
pub mod address_family {
    /// IPv4.
    pub const IPV4: u8 = 1;
    /// IPv6.
    pub const IPV6: u8 = 2;
}

/// The protocol version of the paper's format, carried in PEER_JOIN.
pub const VERSION_1: u8 = 1;
/// Version 1 plus the advertisement messages DICT_STATS and LOAD (see [`advertisement`]).
pub const VERSION_2: u8 = 2;
/// The highest version this implementation speaks.
pub const MAX_VERSION: u8 = VERSION_2;

/// Framing of the version-2 advertisement messages DICT_STATS (type 4) and LOAD (type 5).
///
/// Their content (pairs, savings, load) is decoded by the `dictionary-affinity` crate; the
/// cluster protocol only needs each message's length and its member byte. Both start with
/// the 4-byte header of version 1:
///
/// ```text
/// DICT_STATS (4) | ADVERTISE (1) | Member | Address Family (1, 2)   then epoch (4 bytes),
///                  client prefix length, server prefix length, record count (u16) and
///                  count records of 12 (IPv4) or 36 (IPv6) bytes, count <= 4096
/// LOAD       (5) | ADVERTISE (1) | Member | 0                        then load (4 bytes)
/// ```
pub mod advertisement {
    use std::ops::Range;
    /// Message type of DICT_STATS.
    pub const DICT_STATS: u8 = 4;
    /// Message type of LOAD.
    pub const LOAD: u8 = 5;
    /// The only action of both: advertise (replace the receiver's value).
    pub const ADVERTISE: u8 = 1;
    /// Byte holding the advertising member's id.
    pub const MEMBER: usize = 2;
    /// Bytes of the DICT_STATS record count.
    pub const RECORD_COUNT: Range<usize> = 10..12;
    /// Size of a DICT_STATS header.
    pub const DICT_STATS_HEADER_LEN: usize = 12;
    /// Size of an IPv4 DICT_STATS record.
    pub const RECORD_V4_LEN: usize = 12;
    /// Size of an IPv6 DICT_STATS record.
    pub const RECORD_V6_LEN: usize = 36;
    /// Size of a LOAD message.
    pub const LOAD_LEN: usize = 8;
    /// Most records in one DICT_STATS message.
    pub const MAX_RECORDS: usize = 4096;
    /// The longest advertisement message (an IPv6 DICT_STATS with the most records).
    pub const MAX_LEN: usize = DICT_STATS_HEADER_LEN + MAX_RECORDS * RECORD_V6_LEN;
}

/// True for the message types of version 2 (DICT_STATS and LOAD).
pub fn is_advertisement_type(t: u8) -> bool {
    t == advertisement::DICT_STATS || t == advertisement::LOAD
}

/// The length of the DICT_STATS or LOAD message at the start of `buf`, or `Ok(None)` when
/// more bytes are needed to tell. The one framing rule of the advertisement messages; never
/// panics.
pub fn advertisement_len(buf: &[u8]) -> Result<Option<usize>, DecodeError> {
    use advertisement as adv;
    let Some(&t) = buf.first() else { return Ok(None) };
    if !is_advertisement_type(t) {
        return Err(DecodeError::UnknownMessageType(t));
    }
    let Some(&a) = buf.get(field::ACTION_TYPE) else { return Ok(None) };
    if a != adv::ADVERTISE {
        return Err(DecodeError::UnknownAction { message_type: t, action: a });
    }
    if t == adv::LOAD {
        return Ok(Some(adv::LOAD_LEN));
    }
    let record = match buf.get(field::BYTE3) {
        None => return Ok(None),
        Some(&address_family::IPV4) => adv::RECORD_V4_LEN,
        Some(&address_family::IPV6) => adv::RECORD_V6_LEN,
        Some(&af) => return Err(DecodeError::UnknownAddressFamily(af)),
    };
    if buf.len() < adv::DICT_STATS_HEADER_LEN {
        return Ok(None);
    }
    let count = u16::from_be_bytes([buf[adv::RECORD_COUNT.start], buf[adv::RECORD_COUNT.start + 1]]);
    if usize::from(count) > adv::MAX_RECORDS {
        return Err(DecodeError::TooManyRecords(count));
    }
    Ok(Some(adv::DICT_STATS_HEADER_LEN + usize::from(count) * record))
}

/// Splits `bytes` into whole DICT_STATS and LOAD messages; an error if anything else is there
/// or the last message is cut short.
pub fn split_advertisements(bytes: &[u8]) -> Result<Vec<&[u8]>, DecodeError> {
    let mut out = Vec::new();
    let mut rest = bytes;
    while !rest.is_empty() {
        match advertisement_len(rest)? {
            Some(n) if n <= rest.len() => {
                let (m, tail) = rest.split_at(n);
                out.push(m);
                rest = tail;
            }
            _ => return Err(DecodeError::Truncated),
        }
    }
    Ok(out)
}

/// One unit of a control stream: a message of version 1, or (version 2) one whole
/// advertisement message, left encoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Frame<'a> {
    /// A message of the paper's table.
    Message(Message),
    /// One whole DICT_STATS or LOAD message.
    Advertisement(&'a [u8]),
}

/// Decodes one frame from the front of `buf` for a channel running at `version`.
///
/// At version 1 this is exactly [`Message::decode`] (types 4 and 5 are unknown); from
/// version 2 on, DICT_STATS and LOAD are framed by [`advertisement_len`]. Never panics.
pub fn decode_frame(buf: &[u8], version: u8) -> Result<Option<(Frame<'_>, usize)>, DecodeError> {
    match buf.first() {
        Some(&t) if version >= VERSION_2 && is_advertisement_type(t) => Ok(match advertisement_len(buf)? {
            Some(n) if n <= buf.len() => Some((Frame::Advertisement(&buf[..n]), n)),
            _ => None,
        }),
        _ => Ok(Message::decode(buf)?.map(|(m, n)| (Frame::Message(m), n))),
    }
}

/// Reason carried in PEER_LEAVE and PEER_REJECT (byte 2).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct ErrorCode(pub u8);

impl ErrorCode {
    /// No error: a voluntary leave such as a shutdown.
    pub const NONE: ErrorCode = ErrorCode(0);
    /// The sender of PEER_JOIN is not in the membership list.
    pub const NOT_A_MEMBER: ErrorCode = ErrorCode(1);
    /// The PEER_JOIN version is not the one this member speaks.
    pub const VERSION_MISMATCH: ErrorCode = ErrorCode(2);
    /// An unrecognized or out-of-place message was received; the stream cannot be parsed on.
    pub const BAD_MESSAGE: ErrorCode = ErrorCode(3);
    /// Another control channel between the same two members is kept instead of this one.
    pub const DUPLICATE_CHANNEL: ErrorCode = ErrorCode(4);
    /// The sender's queue towards the receiver overflowed; it reconnects and resynchronizes.
    pub const STALLED: ErrorCode = ErrorCode(5);
    /// No PEER_JOIN arrived in time.
    pub const JOIN_TIMEOUT: ErrorCode = ErrorCode(6);
    /// Version 2: the sender stops to restart; keep its entries, stale, for the restart time
    /// it announced in its PEER_JOIN.
    pub const RESTARTING: ErrorCode = ErrorCode(7);

    /// A short stable name for logs and metric labels.
    pub fn name(self) -> &'static str {
        match self.0 {
            0 => "none",
            1 => "not_a_member",
            2 => "version_mismatch",
            3 => "bad_message",
            4 => "duplicate_channel",
            5 => "stalled",
            6 => "join_timeout",
            7 => "restarting",
            _ => "unknown",
        }
    }
}

impl fmt::Debug for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}({})", self.name(), self.0)
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.name(), self.0)
    }
}

/// One control-channel message of version 1 (paper Table 1).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Message {
    /// INSTALL_CONNECTION: the sender handles this connection; forward or bypass its packets.
    InstallConnection {
        /// FORWARD or BYPASS.
        action: Action,
        /// The connection.
        connection: Connection,
    },
    /// REMOVE_CONNECTION: the connection is finished or no longer bypassed.
    RemoveConnection {
        /// FORWARD or BYPASS.
        action: Action,
        /// The connection.
        connection: Connection,
    },
    /// PEER_JOIN: first message on both ends of a control channel.
    PeerJoin {
        /// Protocol version the sender speaks.
        version: u8,
        /// Byte 3. Version 2: the sender's restart time in seconds (graceful restart: how
        /// long its peers keep its entries when it restarts), 0 for none. Version 1: reserved,
        /// sent as 0 and ignored.
        restart_time: u8,
    },
    /// PEER_KEEPALIVE: the sender is alive.
    PeerKeepalive,
    /// PEER_LEAVE: the sender leaves; drop its entries at once.
    PeerLeave {
        /// Why it leaves.
        code: ErrorCode,
    },
    /// PEER_REJECT: the receiver's PEER_JOIN was refused.
    PeerReject {
        /// Why it was refused.
        code: ErrorCode,
    },
}

/// Why bytes could not be decoded. After any of these the rest of the stream cannot be
/// parsed, so the channel is closed (paper 2.3).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// Byte 0 is not a known message type.
    #[error("unknown message type {0}")]
    UnknownMessageType(u8),
    /// Byte 1 is not a known action for the message type.
    #[error("unknown action {action} for message type {message_type}")]
    UnknownAction {
        /// Byte 0.
        message_type: u8,
        /// Byte 1.
        action: u8,
    },
    /// Byte 2 of INSTALL/REMOVE is not TCP (6) or UDP (17).
    #[error("unknown protocol {0}")]
    UnknownProtocol(u8),
    /// Byte 3 of INSTALL/REMOVE/DICT_STATS is not IPv4 (1) or IPv6 (2).
    #[error("unknown address family {0}")]
    UnknownAddressFamily(u8),
    /// A DICT_STATS announces more than [`advertisement::MAX_RECORDS`] records.
    #[error("{0} records in one DICT_STATS (at most 4096)")]
    TooManyRecords(u16),
    /// The bytes end inside a message (only where whole messages are required).
    #[error("message truncated")]
    Truncated,
    /// An advertisement's member byte is not the sending peer's member id.
    #[error("advertisement for member {claimed} from member {sender}")]
    WrongMember {
        /// Byte 2 of the advertisement.
        claimed: u8,
        /// The member that sent it.
        sender: u8,
    },
}

impl Message {
    /// Encoded size in bytes.
    pub fn encoded_len(&self) -> usize {
        match self {
            Message::InstallConnection { connection, .. } | Message::RemoveConnection { connection, .. } => {
                if connection.is_ipv4() {
                    CONNECTION_V4_LEN
                } else {
                    CONNECTION_V6_LEN
                }
            }
            _ => PEER_SYNC_LEN,
        }
    }

    /// Header bytes 0 and 1, for counting messages by type and action.
    pub fn type_and_action(&self) -> (u8, u8) {
        match self {
            Message::InstallConnection { action, .. } => (message_type::INSTALL_CONNECTION, action.code()),
            Message::RemoveConnection { action, .. } => (message_type::REMOVE_CONNECTION, action.code()),
            Message::PeerJoin { .. } => (message_type::CLUSTER_PEER_SYNC, peer_sync::PEER_JOIN),
            Message::PeerKeepalive => (message_type::CLUSTER_PEER_SYNC, peer_sync::PEER_KEEPALIVE),
            Message::PeerLeave { .. } => (message_type::CLUSTER_PEER_SYNC, peer_sync::PEER_LEAVE),
            Message::PeerReject { .. } => (message_type::CLUSTER_PEER_SYNC, peer_sync::PEER_REJECT),
        }
    }

    /// Appends the encoded message to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        match *self {
            Message::InstallConnection { action, connection } => {
                encode_connection(message_type::INSTALL_CONNECTION, action, &connection, out)
            }
            Message::RemoveConnection { action, connection } => {
                encode_connection(message_type::REMOVE_CONNECTION, action, &connection, out)
            }
            Message::PeerJoin { version, restart_time } => {
                out.extend_from_slice(&[3, peer_sync::PEER_JOIN, version, restart_time])
            }
            Message::PeerKeepalive => out.extend_from_slice(&[3, peer_sync::PEER_KEEPALIVE, 0, 0]),
            Message::PeerLeave { code } => out.extend_from_slice(&[3, peer_sync::PEER_LEAVE, code.0, 0]),
            Message::PeerReject { code } => out.extend_from_slice(&[3, peer_sync::PEER_REJECT, code.0, 0]),
        }
    }

    /// The encoded message as a new vector.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(self.encoded_len());
        self.encode(&mut v);
        v
    }

    /// Decodes one message from the front of `buf`.
    ///
    /// Returns `Ok(None)` when `buf` holds only part of a message, and the message with its
    /// length otherwise. Never panics, whatever the bytes.
    pub fn decode(buf: &[u8]) -> Result<Option<(Message, usize)>, DecodeError> {
        if buf.len() < HEADER_LEN {
            // Reject a bad first byte early, so garbage is refused as soon as it arrives.
            if let Some(&t) = buf.first() {
                if !(1..=3).contains(&t) {
                    return Err(DecodeError::UnknownMessageType(t));
                }
            }
            return Ok(None);
        }
        let (t, a, b2, b3) = (buf[field::MESSAGE_TYPE], buf[field::ACTION_TYPE], buf[field::BYTE2], buf[field::BYTE3]);
        match t {
            message_type::INSTALL_CONNECTION | message_type::REMOVE_CONNECTION => {
                let action = Action::from_code(a).ok_or(DecodeError::UnknownAction { message_type: t, action: a })?;
                let protocol = Protocol::from_number(b2).ok_or(DecodeError::UnknownProtocol(b2))?;
                let len = match b3 {
                    address_family::IPV4 => CONNECTION_V4_LEN,
                    address_family::IPV6 => CONNECTION_V6_LEN,
                    other => return Err(DecodeError::UnknownAddressFamily(other)),
                };
                if buf.len() < len {
                    return Ok(None);
                }
                let sport = u16::from_be_bytes([buf[4], buf[5]]);
                let dport = u16::from_be_bytes([buf[6], buf[7]]);
                let (src, dst): (IpAddr, IpAddr) = if len == CONNECTION_V4_LEN {
                    let s: [u8; 4] = buf[8..12].try_into().expect("length checked");
                    let d: [u8; 4] = buf[12..16].try_into().expect("length checked");
                    (Ipv4Addr::from(s).into(), Ipv4Addr::from(d).into())
                } else {
                    let s: [u8; 16] = buf[8..24].try_into().expect("length checked");
                    let d: [u8; 16] = buf[24..40].try_into().expect("length checked");
                    (Ipv6Addr::from(s).into(), Ipv6Addr::from(d).into())
                };
                let connection = Connection::new(protocol, SocketAddr::new(src, sport), SocketAddr::new(dst, dport))
                    .expect("both addresses decoded with one family");
                let msg = if t == message_type::INSTALL_CONNECTION {
                    Message::InstallConnection { action, connection }
                } else {
                    Message::RemoveConnection { action, connection }
                };
                Ok(Some((msg, len)))
            }
            message_type::CLUSTER_PEER_SYNC => {
                let msg = match a {
                    peer_sync::PEER_JOIN => Message::PeerJoin { version: b2, restart_time: b3 },
                    peer_sync::PEER_KEEPALIVE => Message::PeerKeepalive,
                    peer_sync::PEER_LEAVE => Message::PeerLeave { code: ErrorCode(b2) },
                    peer_sync::PEER_REJECT => Message::PeerReject { code: ErrorCode(b2) },
                    _ => return Err(DecodeError::UnknownAction { message_type: t, action: a }),
                };
                Ok(Some((msg, PEER_SYNC_LEN)))
            }
            other => Err(DecodeError::UnknownMessageType(other)),
        }
    }
}

fn encode_connection(t: u8, action: Action, c: &Connection, out: &mut Vec<u8>) {
    let af = if c.is_ipv4() { address_family::IPV4 } else { address_family::IPV6 };
    out.extend_from_slice(&[t, action.code(), c.protocol().number(), af]);
    out.extend_from_slice(&c.src().port().to_be_bytes());
    out.extend_from_slice(&c.dst().port().to_be_bytes());
    for ip in [c.src().ip(), c.dst().ip()] {
        match ip {
            IpAddr::V4(a) => out.extend_from_slice(&a.octets()),
            IpAddr::V6(a) => out.extend_from_slice(&a.octets()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn v4(s: &str, d: &str) -> Connection {
        Connection::new(Protocol::Tcp, s.parse().unwrap(), d.parse().unwrap()).unwrap()
    }

    /// Golden vectors: one per message type and action, written out by hand from the
    /// version-1 table, not produced by the encoder.
    fn golden() -> Vec<(Message, Vec<u8>)> {
        let c4 = v4("192.0.2.1:40000", "198.51.100.7:80");
        let c6 =
            Connection::new(Protocol::Udp, "[2001:db8::1]:53".parse().unwrap(), "[2001:db8::2]:5353".parse().unwrap())
                .unwrap();
        let mut v6_body = vec![0x00, 0x35, 0x14, 0xe9];
        v6_body.extend_from_slice(&[0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
        v6_body.extend_from_slice(&[0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2]);
        let with = |hdr: [u8; 4], body: &[u8]| {
            let mut v = hdr.to_vec();
            v.extend_from_slice(body);
            v
        };
        let v4_body = [0x9c, 0x40, 0x00, 0x50, 192, 0, 2, 1, 198, 51, 100, 7];
        vec![
            (Message::InstallConnection { action: Action::Forward, connection: c4 }, with([1, 1, 6, 1], &v4_body)),
            (Message::InstallConnection { action: Action::Bypass, connection: c4 }, with([1, 2, 6, 1], &v4_body)),
            (Message::RemoveConnection { action: Action::Forward, connection: c4 }, with([2, 1, 6, 1], &v4_body)),
            (Message::RemoveConnection { action: Action::Bypass, connection: c4 }, with([2, 2, 6, 1], &v4_body)),
            (Message::InstallConnection { action: Action::Forward, connection: c6 }, with([1, 1, 17, 2], &v6_body)),
            (Message::RemoveConnection { action: Action::Bypass, connection: c6 }, with([2, 2, 17, 2], &v6_body)),
            (Message::PeerJoin { version: 1, restart_time: 0 }, vec![3, 1, 1, 0]),
            (Message::PeerJoin { version: 2, restart_time: 60 }, vec![3, 1, 2, 60]),
            (Message::PeerLeave { code: ErrorCode::RESTARTING }, vec![3, 3, 7, 0]),
            (Message::PeerKeepalive, vec![3, 2, 0, 0]),
            (Message::PeerLeave { code: ErrorCode::NONE }, vec![3, 3, 0, 0]),
            (Message::PeerLeave { code: ErrorCode::BAD_MESSAGE }, vec![3, 3, 3, 0]),
            (Message::PeerReject { code: ErrorCode::NOT_A_MEMBER }, vec![3, 4, 1, 0]),
            (Message::PeerReject { code: ErrorCode::VERSION_MISMATCH }, vec![3, 4, 2, 0]),
        ]
    }

    #[test]
    fn golden_vectors_encode_and_decode() {
        for (msg, bytes) in golden() {
            assert_eq!(msg.to_bytes(), bytes, "encoding {msg:?}");
            assert_eq!(msg.encoded_len(), bytes.len());
            assert_eq!(Message::decode(&bytes), Ok(Some((msg, bytes.len()))), "decoding {bytes:?}");
        }
    }

    #[test]
    fn sizes_follow_the_paper() {
        let g = golden();
        assert_eq!(g[0].1.len(), 16, "IPv4 INSTALL is 16 bytes");
        assert_eq!(g[4].1.len(), 40, "IPv6 INSTALL is 40 bytes");
        assert_eq!(g[6].1.len(), 4, "CLUSTER_PEER_SYNC is 4 bytes");
    }

    #[test]
    fn partial_messages_need_more() {
        for (_, bytes) in golden() {
            for cut in 0..bytes.len() {
                assert_eq!(Message::decode(&bytes[..cut]), Ok(None), "prefix {cut} of {bytes:?}");
            }
        }
    }

    #[test]
    fn bad_codes_are_errors() {
        assert_eq!(Message::decode(&[0]), Err(DecodeError::UnknownMessageType(0)));
        assert_eq!(Message::decode(b"GET / HTTP/1.1"), Err(DecodeError::UnknownMessageType(b'G')));
        assert_eq!(Message::decode(&[1, 3, 6, 1]), Err(DecodeError::UnknownAction { message_type: 1, action: 3 }));
        assert_eq!(Message::decode(&[1, 1, 1, 1]), Err(DecodeError::UnknownProtocol(1)));
        assert_eq!(Message::decode(&[2, 1, 6, 10]), Err(DecodeError::UnknownAddressFamily(10)));
        assert_eq!(Message::decode(&[3, 5, 0, 0]), Err(DecodeError::UnknownAction { message_type: 3, action: 5 }));
    }

    #[test]
    fn reserved_bytes_are_ignored_on_receipt() {
        assert_eq!(Message::decode(&[3, 2, 9, 9]), Ok(Some((Message::PeerKeepalive, 4))));
    }

    /// Golden advertisement messages, written out by hand from the version-2 diagrams.
    fn golden_advertisements() -> Vec<Vec<u8>> {
        let mut dict_v4 = vec![4, 1, 2, 1, 0, 0, 0, 9, 24, 32, 0, 1];
        dict_v4.extend_from_slice(&[192, 0, 2, 0, 198, 51, 100, 7, 0x3f, 0x80, 0, 0]);
        let mut dict_v6 = vec![4, 1, 2, 2, 0, 0, 0, 9, 48, 128, 0, 1];
        dict_v6.extend_from_slice(&[0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        dict_v6.extend_from_slice(&[0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2]);
        dict_v6.extend_from_slice(&[0x40, 0, 0, 0]);
        let empty = vec![4, 1, 2, 1, 0, 0, 0, 9, 24, 32, 0, 0];
        let load = vec![5, 1, 2, 0, 0x3f, 0x80, 0, 0];
        vec![dict_v4, dict_v6, empty, load]
    }

    #[test]
    fn advertisement_lengths_follow_the_diagrams() {
        let g = golden_advertisements();
        let lens: Vec<usize> = g.iter().map(|m| m.len()).collect();
        assert_eq!(lens, vec![24, 48, 12, 8]);
        for m in &g {
            assert_eq!(advertisement_len(m), Ok(Some(m.len())), "{m:?}");
            assert_eq!(decode_frame(m, VERSION_2), Ok(Some((Frame::Advertisement(m), m.len()))));
            // Version 1 knows nothing of them: exactly what Message::decode says.
            assert_eq!(decode_frame(m, VERSION_1), Err(DecodeError::UnknownMessageType(m[0])));
            assert_eq!(Message::decode(m), Err(DecodeError::UnknownMessageType(m[0])));
            for cut in 0..m.len() {
                assert_eq!(decode_frame(&m[..cut], VERSION_2), Ok(None), "prefix {cut} of {m:?}");
            }
        }
        let stream: Vec<u8> = g.concat();
        assert_eq!(split_advertisements(&stream).unwrap(), g.iter().map(|m| &m[..]).collect::<Vec<_>>());
        assert_eq!(split_advertisements(&stream[..stream.len() - 1]), Err(DecodeError::Truncated));
        assert_eq!(split_advertisements(&[3, 2, 0, 0]), Err(DecodeError::UnknownMessageType(3)));
    }

    #[test]
    fn advertisement_framing_errors() {
        assert_eq!(advertisement_len(&[5, 2]), Err(DecodeError::UnknownAction { message_type: 5, action: 2 }));
        assert_eq!(advertisement_len(&[4, 0, 0, 1]), Err(DecodeError::UnknownAction { message_type: 4, action: 0 }));
        assert_eq!(advertisement_len(&[4, 1, 0, 3]), Err(DecodeError::UnknownAddressFamily(3)));
        let mut max = vec![4, 1, 0, 2, 0, 0, 0, 0, 0, 0, 0x10, 0x00];
        assert_eq!(advertisement_len(&max), Ok(Some(advertisement::MAX_LEN)));
        max[11] = 1;
        assert_eq!(advertisement_len(&max), Err(DecodeError::TooManyRecords(4097)));
        assert_eq!(advertisement_len(&[4, 1, 0]), Ok(None));
        assert_eq!(advertisement_len(&[5]), Ok(None));
        // The paper's messages decode alike at both versions.
        for (m, bytes) in golden() {
            assert_eq!(decode_frame(&bytes, VERSION_2), Ok(Some((Frame::Message(m), bytes.len()))));
        }
    }

    fn arb_connection() -> impl Strategy<Value = Connection> {
        let v4 = (any::<[u8; 4]>(), any::<[u8; 4]>(), any::<u16>(), any::<u16>())
            .prop_map(|(s, d, sp, dp)| (IpAddr::from(s), IpAddr::from(d), sp, dp));
        let v6 = (any::<[u8; 16]>(), any::<[u8; 16]>(), any::<u16>(), any::<u16>())
            .prop_map(|(s, d, sp, dp)| (IpAddr::from(s), IpAddr::from(d), sp, dp));
        (prop_oneof![v4, v6], any::<bool>()).prop_map(|((s, d, sp, dp), udp)| {
            let p = if udp { Protocol::Udp } else { Protocol::Tcp };
            Connection::new(p, SocketAddr::new(s, sp), SocketAddr::new(d, dp)).unwrap()
        })
    }

    pub(crate) fn arb_message() -> impl Strategy<Value = Message> {
        let action = prop_oneof![Just(Action::Forward), Just(Action::Bypass)];
        prop_oneof![
            (action.clone(), arb_connection())
                .prop_map(|(action, connection)| Message::InstallConnection { action, connection }),
            (action, arb_connection())
                .prop_map(|(action, connection)| Message::RemoveConnection { action, connection }),
            (any::<u8>(), any::<u8>()).prop_map(|(version, restart_time)| Message::PeerJoin { version, restart_time }),
            Just(Message::PeerKeepalive),
            any::<u8>().prop_map(|c| Message::PeerLeave { code: ErrorCode(c) }),
            any::<u8>().prop_map(|c| Message::PeerReject { code: ErrorCode(c) }),
        ]
    }

    proptest! {
        #[test]
        fn round_trip(msgs in proptest::collection::vec(arb_message(), 1..20)) {
            let mut stream = Vec::new();
            for m in &msgs { m.encode(&mut stream); }
            let mut at = 0;
            let mut out = Vec::new();
            while at < stream.len() {
                let (m, n) = Message::decode(&stream[at..]).unwrap().unwrap();
                out.push(m);
                at += n;
            }
            prop_assert_eq!(out, msgs);
        }

        #[test]
        fn arbitrary_bytes_never_panic_at_version_2(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let mut at = 0;
            while at < bytes.len() {
                match decode_frame(&bytes[at..], VERSION_2) {
                    Ok(Some((Frame::Message(m), n))) => {
                        prop_assert_eq!(m.to_bytes().len(), n);
                        at += n;
                    }
                    Ok(Some((Frame::Advertisement(a), n))) => {
                        prop_assert!(a.len() == n && n <= advertisement::MAX_LEN);
                        prop_assert_eq!(advertisement_len(a), Ok(Some(n)));
                        at += n;
                    }
                    Ok(None) | Err(_) => break,
                }
            }
            let _ = split_advertisements(&bytes);
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..128)) {
            let mut at = 0;
            while at < bytes.len() {
                match Message::decode(&bytes[at..]) {
                    Ok(Some((m, n))) => {
                        prop_assert!(n > 0 && n <= MAX_MESSAGE_LEN);
                        // What decodes re-encodes to the same bytes, up to ignored reserved bytes.
                        let re = m.to_bytes();
                        prop_assert_eq!(re.len(), n);
                        at += n;
                    }
                    Ok(None) | Err(_) => break,
                }
            }
        }
    }
}
