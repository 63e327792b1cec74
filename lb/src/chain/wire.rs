//! The chain protocol's own bytes (docs/codec.md section 11): the HELLO each proxy sends first,
//! the downstream's MODE byte, and the records that carry the two codec streams and their ends.

use super::ChainError;

/// First bytes of a HELLO: how an upstream tells a chained connection from plain traffic.
pub const HELLO_MAGIC: [u8; 4] = *b"LBCH";
/// The chain protocol version this build speaks.
pub const HELLO_VERSION: u8 = 1;
/// HELLO flag (upstream only): the upstream checked out the pair's dictionaries for this
/// connection; without it the connection runs on fresh throwaway dictionaries.
pub const FLAG_AVAILABLE: u8 = 0x01;
/// HELLO flag (either side): the sender runs its pair dictionaries shared by all of the pair's
/// connections at once (docs/codec.md section 3.2). When both HELLOs carry it, the downstream
/// answers [`Mode::Shared`] and no connection waits for another's dictionaries.
pub const FLAG_SHARED: u8 = 0x02;
/// The HELLO flags byte's high nibble: the highest codec framing version the sender decodes
/// (`dictionary_affinity::codec::VERSION` for this build). 0, from builds before it was
/// announced, is read as version 1, which every build decodes.
pub const CODEC_VERSION_SHIFT: u32 = 4;
/// Bytes of a HELLO before the identity.
pub const HELLO_FIXED: usize = 15;
/// Longest identity a HELLO carries.
pub const MAX_ID: usize = 255;
/// Longest DATA record accepted; a longer length is a damaged stream.
pub const MAX_RECORD: usize = 1 << 20;

/// Byte ranges of the HELLO (big-endian).
mod field {
    use std::ops::Range;
    pub const VERSION: usize = 4;
    pub const FLAGS: usize = 5;
    pub const ID_LEN: usize = 6;
    pub const BUDGET: Range<usize> = 7..15;
}

/// A proxy's introduction: sent by the downstream right after connecting, answered by the
/// upstream that intercepted the connection.
///
/// ```text
///  0               4       5       6       7                               15
/// +---+---+---+---+-------+-------+-------+-------------------------------+----------------+
/// | 'L' 'B' 'C' 'H'|version| flags |id len |   dictionary budget (u64)     | id (id len B)  |
/// +---+---+---+---+-------+-------+-------+-------------------------------+----------------+
///                          flags: bits 0-3 feature flags, bits 4-7 codec version decoded
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    /// [`FLAG_AVAILABLE`], [`FLAG_SHARED`], or 0.
    pub flags: u8,
    /// The highest codec framing version the sender decodes, 1-15 (0 on the wire reads as 1).
    /// The receiver's encoder writes the lower of it and its own.
    pub codec: u8,
    /// The sender's per-direction dictionary budget in bytes (must equal the peer's to chain).
    pub budget: u64,
    /// The sender's identity: the key of the pair's dictionaries on the other side.
    pub id: String,
}

impl Hello {
    /// Appends the wire form.
    pub fn emit(&self, out: &mut Vec<u8>) {
        let id = &self.id.as_bytes()[..self.id.len().min(MAX_ID)];
        out.extend_from_slice(&HELLO_MAGIC);
        out.push(HELLO_VERSION);
        out.push(self.flags & 0x0f | self.codec.min(15) << CODEC_VERSION_SHIFT);
        out.push(id.len() as u8);
        out.extend_from_slice(&self.budget.to_be_bytes());
        out.extend_from_slice(id);
    }

    /// Parses a HELLO at the start of `b`: `Ok(None)` while incomplete, else the HELLO and its
    /// length.
    pub fn parse(b: &[u8]) -> Result<Option<(Hello, usize)>, ChainError> {
        let n = b.len().min(4);
        if b[..n] != HELLO_MAGIC[..n] {
            return Err(ChainError::BadHello("no chain HELLO magic"));
        }
        if b.len() < HELLO_FIXED {
            return Ok(None);
        }
        if b[field::VERSION] != HELLO_VERSION {
            return Err(ChainError::BadHello("unsupported chain protocol version"));
        }
        // Unknown flags are a later build's offers: ignored, so that builds negotiate
        // features instead of refusing each other. (Builds before FLAG_SHARED refused any
        // unknown flag: see docs/codec.md section 11 for the upgrade.)
        let flags = b[field::FLAGS] & (FLAG_AVAILABLE | FLAG_SHARED);
        let codec = (b[field::FLAGS] >> CODEC_VERSION_SHIFT).max(1);
        let len = usize::from(b[field::ID_LEN]);
        if len == 0 {
            return Err(ChainError::BadHello("empty identity"));
        }
        if b.len() < HELLO_FIXED + len {
            return Ok(None);
        }
        let id = std::str::from_utf8(&b[HELLO_FIXED..HELLO_FIXED + len])
            .map_err(|_| ChainError::BadHello("identity is not UTF-8"))?
            .to_string();
        let budget = u64::from_be_bytes(b[field::BUDGET].try_into().expect("8 bytes"));
        Ok(Some((Hello { flags, codec, budget, id }, HELLO_FIXED + len)))
    }
}

/// What the downstream decided for the connection, one byte after the HELLOs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Mode {
    /// Fresh dictionaries for this connection only (the pair's are busy on both sides or one).
    Ephemeral = 0,
    /// The pair's persistent dictionaries, checked out on both sides.
    Persistent = 1,
    /// No codec: the budgets differ, so the bytes are relayed as they are.
    Raw = 2,
    /// The pair's dictionaries, shared with the pair's other connections (both HELLOs carried
    /// [`FLAG_SHARED`]).
    Shared = 3,
}

impl Mode {
    /// From the wire byte.
    pub fn from_byte(b: u8) -> Result<Mode, ChainError> {
        match b {
            0 => Ok(Mode::Ephemeral),
            1 => Ok(Mode::Persistent),
            2 => Ok(Mode::Raw),
            3 => Ok(Mode::Shared),
            _ => Err(ChainError::Protocol("unknown MODE byte")),
        }
    }
}

/// Record type: codec stream bytes, `len u32 ‖ bytes`.
pub const REC_DATA: u8 = 1;
/// Record type: the sender's plain input ended (its encoder flushed everything before this).
pub const REC_END: u8 = 2;
/// Record type: the sender has decoded all of the receiver's stream up to its END, so it will
/// never NACK it again.
pub const REC_DONE: u8 = 3;

/// One record of a direction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    /// Codec stream bytes.
    Data(Vec<u8>),
    /// End of the sender's plain data.
    End,
    /// The sender finished decoding our stream.
    Done,
}

/// Appends a DATA record (nothing for empty `data`).
pub fn put_data(out: &mut Vec<u8>, data: &[u8]) {
    if data.is_empty() {
        return;
    }
    out.push(REC_DATA);
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
}

/// Splits a received byte stream into records, whatever the read boundaries.
#[derive(Debug, Default)]
pub struct Records {
    buf: Vec<u8>,
    at: usize,
}

impl Records {
    /// Adds received bytes.
    pub fn push(&mut self, b: &[u8]) {
        if self.at > 0 && self.at == self.buf.len() {
            self.buf.clear();
            self.at = 0;
        }
        self.buf.extend_from_slice(b);
    }

    /// The next complete record, if any.
    pub fn next_record(&mut self) -> Result<Option<Record>, ChainError> {
        let b = &self.buf[self.at..];
        let Some(&ty) = b.first() else { return Ok(None) };
        let (rec, len) = match ty {
            REC_END => (Record::End, 1),
            REC_DONE => (Record::Done, 1),
            REC_DATA => {
                if b.len() < 5 {
                    return Ok(None);
                }
                let n = u32::from_be_bytes(b[1..5].try_into().expect("4 bytes")) as usize;
                if n == 0 || n > MAX_RECORD {
                    return Err(ChainError::Protocol("DATA record length out of range"));
                }
                if b.len() < 5 + n {
                    return Ok(None);
                }
                (Record::Data(b[5..5 + n].to_vec()), 5 + n)
            }
            _ => return Err(ChainError::Protocol("unknown record type")),
        };
        self.at += len;
        if self.at > 1 << 20 {
            self.buf.drain(..self.at);
            self.at = 0;
        }
        Ok(Some(rec))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hello_round_trips_in_any_split_and_refuses_damage() {
        let h = Hello { flags: FLAG_AVAILABLE, codec: 2, budget: 64 << 20, id: "198.51.100.1".into() };
        let mut b = Vec::new();
        h.emit(&mut b);
        b.extend_from_slice(b"rest");
        assert_eq!(Hello::parse(&b).unwrap(), Some((h.clone(), b.len() - 4)));
        for cut in 0..b.len() - 4 {
            assert_eq!(Hello::parse(&b[..cut]).unwrap(), None, "cut at {cut}");
        }
        assert!(Hello::parse(b"GET / HTTP/1.1\r\n").is_err());
        assert!(Hello::parse(b"LBX").is_err());
        let mut bad = b.clone();
        bad[field::VERSION] = 9;
        assert!(Hello::parse(&bad).is_err());
        // A later build's unknown flags are ignored, not refused: builds negotiate.
        bad = b.clone();
        bad[field::FLAGS] = 0x08 | FLAG_SHARED;
        let (got, _) = Hello::parse(&bad).unwrap().unwrap();
        assert_eq!(got.flags, FLAG_SHARED);
    }

    #[test]
    fn hello_carries_the_codec_version_and_an_older_hello_reads_as_version_1() {
        let mut b = Vec::new();
        Hello { flags: FLAG_SHARED, codec: 2, budget: 1 << 20, id: "u".into() }.emit(&mut b);
        assert_eq!(b[field::FLAGS], 0x20 | FLAG_SHARED, "version in the high nibble");
        // A build before the announcement sends 0 there: it is read as version 1.
        b[field::FLAGS] = FLAG_SHARED;
        let (got, _) = Hello::parse(&b).unwrap().unwrap();
        assert_eq!((got.flags, got.codec), (FLAG_SHARED, 1));
        // A later build's higher version is taken as said (the receiver writes the lower).
        b[field::FLAGS] = 0xf0;
        assert_eq!(Hello::parse(&b).unwrap().unwrap().0.codec, 15);
    }

    #[test]
    fn records_survive_any_split_and_refuse_bad_lengths() {
        let mut wire = Vec::new();
        put_data(&mut wire, b"abc");
        wire.push(REC_END);
        put_data(&mut wire, &[7; 300]);
        wire.push(REC_DONE);
        let want = vec![Record::Data(b"abc".to_vec()), Record::End, Record::Data(vec![7; 300]), Record::Done];
        for step in [1, 2, 3, 7, wire.len()] {
            let mut r = Records::default();
            let mut got = Vec::new();
            for piece in wire.chunks(step) {
                r.push(piece);
                while let Some(rec) = r.next_record().unwrap() {
                    got.push(rec);
                }
            }
            assert_eq!(got, want, "step {step}");
        }
        let mut r = Records::default();
        r.push(&[REC_DATA, 0xff, 0, 0, 0]);
        assert!(r.next_record().is_err());
        let mut r = Records::default();
        r.push(&[9]);
        assert!(r.next_record().is_err());
    }

    mod prop {
        use super::super::*;
        use proptest::prelude::*;

        fn record() -> impl Strategy<Value = Record> {
            prop_oneof![
                proptest::collection::vec(any::<u8>(), 1..600).prop_map(Record::Data),
                Just(Record::End),
                Just(Record::Done),
            ]
        }

        proptest! {
            #[test]
            fn hello_round_trips(flags in 0u8..4, codec in 1u8..16, budget in any::<u64>(), id in "[ -~]{1,255}", cut in any::<prop::sample::Index>()) {
                let h = Hello { flags, codec, budget, id };
                let mut b = Vec::new();
                h.emit(&mut b);
                let len = b.len();
                prop_assert_eq!(Hello::parse(&b).unwrap(), Some((h, len)));
                // Any prefix is incomplete, never an error.
                prop_assert_eq!(Hello::parse(&b[..cut.index(len)]).unwrap(), None);
            }

            #[test]
            fn records_round_trip_whatever_the_reads(recs in proptest::collection::vec(record(), 0..20), step in 1usize..700) {
                let mut wire = Vec::new();
                for r in &recs {
                    match r {
                        Record::Data(d) => put_data(&mut wire, d),
                        Record::End => wire.push(REC_END),
                        Record::Done => wire.push(REC_DONE),
                    }
                }
                let mut rx = Records::default();
                let mut got = Vec::new();
                for piece in wire.chunks(step) {
                    rx.push(piece);
                    while let Some(r) = rx.next_record().unwrap() {
                        got.push(r);
                    }
                }
                prop_assert_eq!(got, recs);
            }

            #[test]
            fn arbitrary_bytes_never_panic(b in proptest::collection::vec(any::<u8>(), 0..64), step in 1usize..16) {
                let _ = Hello::parse(&b);
                if let Some(&m) = b.first() {
                    let _ = Mode::from_byte(m);
                }
                let mut rx = Records::default();
                'feed: for piece in b.chunks(step) {
                    rx.push(piece);
                    loop {
                        match rx.next_record() {
                            Ok(Some(_)) => {}
                            Ok(None) => break,
                            Err(_) => break 'feed,
                        }
                    }
                }
            }
        }
    }
}
