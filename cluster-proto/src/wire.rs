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
    /// Byte 3 of INSTALL/REMOVE is not IPv4 (1) or IPv6 (2).
    #[error("unknown address family {0}")]
    UnknownAddressFamily(u8),
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
            Message::PeerJoin { version } => out.extend_from_slice(&[3, peer_sync::PEER_JOIN, version, 0]),
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
                    peer_sync::PEER_JOIN => Message::PeerJoin { version: b2 },
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
            (Message::PeerJoin { version: 1 }, vec![3, 1, 1, 0]),
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
            any::<u8>().prop_map(|version| Message::PeerJoin { version }),
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
