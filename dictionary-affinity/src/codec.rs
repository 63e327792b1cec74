//! The redundancy-elimination token stream between a downstream proxy (encoder) and an upstream
//! proxy (decoder), paper section 1.2: previously seen data is replaced with small tokens that
//! name a chunk of the shared dictionary. The wire format is drawn in `docs/codec.md`.
//!
//! ```text
//!  stream header (32 bytes, once)
//!   0       4   5   6       8              12                      20                      28      32
//!  +-------+---+---+-------+--------------+-----------------------+-----------------------+-------+
//!  | "LBRE"|ver|flg| 0 0   | epoch u32    | budget u64            | store digest u64      | check |
//!  +-------+---+---+-------+--------------+-----------------------+-----------------------+-------+
//!
//!  frame (every token)
//!  +------+--------------------+---------------------+-----------------+
//!  | type | body length varint | body                | check u32       |
//!  | 1 B  | 1-3 B (LEB128)     | 0..=MAX_BODY bytes  | xxh3 of the rest|
//!  +------+--------------------+---------------------+-----------------+
//! ```
//!
//! Integers are big-endian; `check` is the low 32 bits of xxh3-64 (seeded) over every byte of
//! the header or frame before it.

mod decoder;
mod encoder;

use std::ops::Range;

use crate::chunk::{ChunkId, MAX_CHUNK};

pub use decoder::{Decoder, DecoderConfig, DecoderStats, Event};
pub use encoder::{Encoder, EncoderConfig, EncoderStats, RepairError, ABORT_REPAIR_UNAVAILABLE};

/// First four bytes of every stream.
pub const MAGIC: [u8; 4] = *b"LBRE";
/// The framing version this build writes. Version 2 added the carried tokens (CARRY,
/// CARRY_REF, DEFINE_CARRIED, REFERENCE_CARRIED, LITERAL_CARRIED) for [`Encoder::flush_soft`];
/// a version-1 decoder refuses a version-2 header before it outputs a byte.
pub const VERSION: u8 = 2;
/// The oldest framing version this build still decodes (version 1 is version 2 without the
/// carried tokens).
pub const MIN_VERSION: u8 = 1;
/// Length of the stream header.
pub const HEADER_LEN: usize = 32;
/// Header flag: the encoder may send zstd-compressed bodies (type bit [`COMPRESSED`]).
pub const FLAG_ZSTD: u8 = 0x01;
/// Header flag: the encoder works on its pair's shared dictionary (docs/codec.md section
/// 3.2): references are resolved by content, not in lockstep, and the decoder must share its
/// pair's dictionary too.
pub const FLAG_SHARED: u8 = 0x02;
/// Type-byte bit marking a LITERAL, DEFINE or REPAIR body whose bytes are zstd-compressed.
pub const COMPRESSED: u8 = 0x80;
/// Largest frame body accepted: a maximal chunk plus its id and length fields.
pub const MAX_BODY: usize = MAX_CHUNK + 32;
/// Most bytes a decoder keeps as the carry (the sent-ahead start of an unfinished chunk).
pub const MAX_CARRY: usize = MAX_CHUNK;

pub(crate) const FRAME_SEED: u64 = 0x6c62_2d66_7261_6d65;

/// Byte ranges of the stream header.
pub mod field {
    use super::Range;
    /// "LBRE".
    pub const MAGIC: Range<usize> = 0..4;
    /// Framing version, [`super::VERSION`].
    pub const VERSION: usize = 4;
    /// Flags, [`super::FLAG_ZSTD`] and [`super::FLAG_SHARED`]; other bits must be zero.
    pub const FLAGS: usize = 5;
    /// Zero.
    pub const RESERVED: Range<usize> = 6..8;
    /// The encoder's store epoch when the stream began.
    pub const EPOCH: Range<usize> = 8..12;
    /// The encoder's store budget: the decoder's must be the same.
    pub const BUDGET: Range<usize> = 12..20;
    /// The encoder's store digest when the stream began.
    pub const DIGEST: Range<usize> = 20..28;
    /// Low 32 bits of seeded xxh3-64 over bytes 0..28.
    pub const CHECK: Range<usize> = 28..32;
}

/// Token types (the low 7 bits of a frame's type byte).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum TokenType {
    /// Bytes to output as they are.
    Literal = 1,
    /// A new chunk: output it, and both sides add it to the store.
    Define = 2,
    /// Output the stored chunk with this id, length and check; both sides count a use.
    Reference = 3,
    /// A chunk's bytes sent in answer to a NACK; no store change.
    Repair = 4,
    /// Both sides empty their store and start a new epoch.
    Reset = 5,
    /// The encoder's store digest: the decoder compares its own.
    Checkpoint = 6,
    /// A NACK about the opposite direction's stream, carried in this one.
    Nack = 7,
    /// The encoder gave up on this stream.
    Abort = 8,
    /// Bytes of the current, unfinished chunk sent ahead by a soft flush: output them, and
    /// both sides keep them as the beginning of that chunk (the *carry*). Version 2.
    Carry = 9,
    /// Like CARRY, but the bytes are those of a stored chunk at the same offsets: output bytes
    /// `carry..carry + count` of the chunk with this id, length and check; no store change.
    /// Version 2.
    CarryRef = 10,
    /// A new chunk whose first `carried` bytes are the carry: output the rest, both sides add
    /// the whole chunk to the store. Version 2.
    DefineCarried = 11,
    /// A stored chunk whose first `carried` bytes are the carry (verified): output the rest,
    /// both sides count a use. Version 2.
    ReferenceCarried = 12,
    /// The first `carried` bytes of the carry end up as literal bytes (their chunk is not
    /// stored): drop them from the carry, output the new bytes. Version 2.
    LiteralCarried = 13,
}

impl TokenType {
    /// The type for a type byte (compression bit ignored).
    pub fn from_byte(b: u8) -> Option<Self> {
        Some(match b & !COMPRESSED {
            1 => Self::Literal,
            2 => Self::Define,
            3 => Self::Reference,
            4 => Self::Repair,
            5 => Self::Reset,
            6 => Self::Checkpoint,
            7 => Self::Nack,
            8 => Self::Abort,
            9 => Self::Carry,
            10 => Self::CarryRef,
            11 => Self::DefineCarried,
            12 => Self::ReferenceCarried,
            13 => Self::LiteralCarried,
            _ => return None,
        })
    }

    fn may_compress(self) -> bool {
        matches!(
            self,
            Self::Literal | Self::Define | Self::Repair | Self::Carry | Self::DefineCarried | Self::LiteralCarried
        )
    }

    /// The token exists only from framing version 2 on.
    pub fn is_carried(self) -> bool {
        (self as u8) >= Self::Carry as u8
    }
}

/// The stream header's content.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamHeader {
    /// Framing version: [`VERSION`] when written by this build, [`MIN_VERSION`]..=[`VERSION`]
    /// when parsed.
    pub version: u8,
    /// [`FLAG_ZSTD`], [`FLAG_SHARED`], or 0.
    pub flags: u8,
    /// The encoder's store epoch.
    pub epoch: u32,
    /// The encoder's store budget.
    pub budget: u64,
    /// The encoder's store digest.
    pub digest: u64,
}

impl StreamHeader {
    /// Appends the 32-byte header to `out`; returns its check, which seeds the first frame's.
    pub fn emit(&self, out: &mut Vec<u8>) -> u32 {
        let start = out.len();
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&[self.version, self.flags, 0, 0]);
        out.extend_from_slice(&self.epoch.to_be_bytes());
        out.extend_from_slice(&self.budget.to_be_bytes());
        out.extend_from_slice(&self.digest.to_be_bytes());
        let check = check32(&out[start..], 0);
        out.extend_from_slice(&check.to_be_bytes());
        check
    }

    /// Parses and verifies a header.
    pub fn parse(b: &[u8; HEADER_LEN]) -> Result<Self, DecodeError> {
        if b[field::MAGIC] != MAGIC {
            return Err(DecodeError::BadMagic);
        }
        let version = b[field::VERSION];
        if !(MIN_VERSION..=VERSION).contains(&version) {
            return Err(DecodeError::UnsupportedVersion(version));
        }
        if check32(&b[..field::CHECK.start], 0).to_be_bytes() != b[field::CHECK] {
            return Err(DecodeError::HeaderChecksum);
        }
        let flags = b[field::FLAGS];
        if flags & !(FLAG_ZSTD | FLAG_SHARED) != 0 || b[field::RESERVED] != [0, 0] {
            return Err(DecodeError::UnsupportedFlags(flags));
        }
        Ok(Self {
            version,
            flags,
            epoch: u32::from_be_bytes(b[field::EPOCH].try_into().expect("4 bytes")),
            budget: u64::from_be_bytes(b[field::BUDGET].try_into().expect("8 bytes")),
            digest: u64::from_be_bytes(b[field::DIGEST].try_into().expect("8 bytes")),
        })
    }
}

/// What a NACK reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum NackKind {
    /// A REFERENCE named a chunk the decoder does not hold.
    Missing = 1,
    /// A REFERENCE named a held chunk whose length or check differs.
    Mismatch = 2,
    /// The decoder's store digest or epoch differs from the encoder's (header or CHECKPOINT).
    Desync = 3,
}

/// A negative acknowledgement: the decoder's report, sent back on the reverse direction, that
/// its dictionary disagrees with the encoder's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Nack {
    /// What went wrong.
    pub kind: NackKind,
    /// The stream epoch in force at the offending token.
    pub epoch: u32,
    /// The chunk concerned (zero for [`NackKind::Desync`]).
    pub id: ChunkId,
}

impl Nack {
    /// Length of the wire form (also the NACK token's body).
    pub const LEN: usize = 21;

    /// Wire form: kind u8, epoch u32, id 16 bytes.
    pub fn to_bytes(&self) -> [u8; Self::LEN] {
        let mut b = [0u8; Self::LEN];
        b[0] = self.kind as u8;
        b[1..5].copy_from_slice(&self.epoch.to_be_bytes());
        b[5..].copy_from_slice(&self.id.to_bytes());
        b
    }

    /// From the wire form; `None` if malformed.
    pub fn from_bytes(b: &[u8]) -> Option<Self> {
        if b.len() != Self::LEN {
            return None;
        }
        let kind = match b[0] {
            1 => NackKind::Missing,
            2 => NackKind::Mismatch,
            3 => NackKind::Desync,
            _ => return None,
        };
        Some(Self {
            kind,
            epoch: u32::from_be_bytes(b[1..5].try_into().ok()?),
            id: ChunkId::from_bytes(b[5..].try_into().ok()?),
        })
    }
}

/// Why a stream could not be decoded; after one, the decoder returns it on every call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The stream does not start with "LBRE".
    #[error("not a dictionary token stream (bad magic)")]
    BadMagic,
    /// A framing version this build does not speak.
    #[error("unsupported token stream version {0}")]
    UnsupportedVersion(u8),
    /// Unknown header flags or non-zero reserved bytes.
    #[error("unsupported stream header flags {0:#04x}")]
    UnsupportedFlags(u8),
    /// The stream says shared dictionary and the decoder has its own, or the other way round.
    /// (The value: whether the stream's is shared.)
    #[error("dictionary mode mismatch: stream shared = {0}, decoder shared = the opposite")]
    SharedMismatch(bool),
    /// The stream header's check does not match.
    #[error("stream header checksum mismatch")]
    HeaderChecksum,
    /// The peers' store budgets differ, so their evictions could never agree.
    #[error("dictionary budget mismatch: encoder {encoder} B, decoder {decoder} B")]
    BudgetMismatch {
        /// The encoder's budget (from the header).
        encoder: u64,
        /// Ours.
        decoder: u64,
    },
    /// A frame's check does not match: the stream is corrupt.
    #[error("frame checksum mismatch at stream offset {offset}")]
    FrameChecksum {
        /// Offset of the frame from the start of the stream.
        offset: u64,
    },
    /// A frame that passed its check but makes no sense.
    #[error("malformed frame at stream offset {offset}: {what}")]
    Malformed {
        /// Offset of the frame from the start of the stream.
        offset: u64,
        /// What is wrong with it.
        what: &'static str,
    },
    /// A DEFINE or REPAIR whose bytes do not hash to its id.
    #[error("chunk bytes do not match their id at stream offset {offset}")]
    ChunkIdMismatch {
        /// Offset of the frame from the start of the stream.
        offset: u64,
    },
    /// A compressed body that zstd refused or that decompressed to the wrong length.
    #[error("bad compressed body at stream offset {offset}")]
    Decompress {
        /// Offset of the frame from the start of the stream.
        offset: u64,
    },
    /// The encoder sent ABORT (it could not repair a chunk this decoder NACKed).
    #[error("the encoder aborted the stream (reason {reason})")]
    Aborted {
        /// The ABORT token's reason code.
        reason: u8,
    },
    /// Too many bytes arrived while output waited for a REPAIR.
    #[error("more than {limit} bytes buffered while waiting for a repair")]
    PendingOverflow {
        /// The configured limit.
        limit: usize,
    },
    /// `finish` found a partial frame or header.
    #[error("the stream ended inside a frame")]
    Truncated,
    /// `finish` found output still waiting for the REPAIR of this chunk.
    #[error("the stream ended while waiting for the repair of chunk {0}")]
    Blocked(ChunkId),
}

/// Low 32 bits of xxh3-64 seeded with [`FRAME_SEED`] xor `chain` (the previous check in the
/// stream), so a frame verifies only in its place: one lost, repeated or reordered fails.
#[inline]
pub(crate) fn check32(bytes: &[u8], chain: u32) -> u32 {
    xxhash_rust::xxh3::xxh3_64_with_seed(bytes, FRAME_SEED ^ u64::from(chain)) as u32
}

pub(crate) fn put_varint(out: &mut Vec<u8>, mut v: usize) {
    while v >= 0x80 {
        out.push(v as u8 | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// The LEB128 form of `v` (at most 3 bytes: `v < 2^21`) and its length.
pub(crate) fn varint3(mut v: usize) -> ([u8; 3], usize) {
    debug_assert!(v < 1 << 21);
    let mut b = [0u8; 3];
    let mut n = 0;
    while v >= 0x80 {
        b[n] = v as u8 | 0x80;
        v >>= 7;
        n += 1;
    }
    b[n] = v as u8;
    (b, n + 1)
}

/// (value, bytes used); `Ok(None)` if `b` ends inside the varint; at most 3 bytes (2^21).
pub(crate) fn get_varint(b: &[u8]) -> Result<Option<(usize, usize)>, &'static str> {
    let mut v = 0usize;
    for i in 0..3 {
        let Some(&byte) = b.get(i) else { return Ok(None) };
        v |= usize::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return Ok(Some((v, i + 1)));
        }
    }
    Err("length varint longer than 3 bytes")
}

/// Appends one frame: type, body length, the concatenation of `parts`, check chained on `chain`
/// (which becomes this frame's check).
pub(crate) fn write_frame(out: &mut Vec<u8>, chain: &mut u32, ty: u8, parts: &[&[u8]]) {
    let len: usize = parts.iter().map(|p| p.len()).sum();
    debug_assert!(len <= MAX_BODY);
    let start = out.len();
    out.reserve(len + 8);
    out.push(ty);
    put_varint(out, len);
    for p in parts {
        out.extend_from_slice(p);
    }
    let check = check32(&out[start..], *chain);
    out.extend_from_slice(&check.to_be_bytes());
    *chain = check;
}

/// A verified frame inside a buffer.
#[derive(Debug, Clone)]
pub(crate) struct RawFrame {
    pub ty: u8,
    /// Body range, relative to the buffer given to [`parse_frame`].
    pub body: Range<usize>,
    /// Total frame length.
    pub len: usize,
    /// The frame's check: the next frame's chain.
    pub check: u32,
}

/// Parses and verifies the frame at the start of `b`, chained on `chain`; `Ok(None)` if `b`
/// holds only part of it. The error is (what, is-checksum) so the caller can add the offset.
pub(crate) fn parse_frame(b: &[u8], chain: u32) -> Result<Option<RawFrame>, (&'static str, bool)> {
    let Some(&ty) = b.first() else { return Ok(None) };
    let Some((body_len, n)) = get_varint(&b[1..]).map_err(|e| (e, false))? else { return Ok(None) };
    if body_len > MAX_BODY {
        return Err(("frame body longer than MAX_BODY", false));
    }
    let body = 1 + n..1 + n + body_len;
    let len = body.end + 4;
    if b.len() < len {
        return Ok(None);
    }
    let check = check32(&b[..body.end], chain);
    if check.to_be_bytes() != b[body.end..len] {
        return Err(("checksum", true));
    }
    let Some(t) = TokenType::from_byte(ty) else { return Err(("unknown token type", false)) };
    if ty & COMPRESSED != 0 && !t.may_compress() {
        return Err(("compression bit on a token that cannot be compressed", false));
    }
    Ok(Some(RawFrame { ty, body, len, check }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips_and_rejects_damage() {
        let h = StreamHeader {
            version: VERSION,
            flags: FLAG_ZSTD,
            epoch: 7,
            budget: 1 << 26,
            digest: 0xdead_beef_0bad_f00d,
        };
        let mut b = Vec::new();
        h.emit(&mut b);
        assert_eq!(b.len(), HEADER_LEN);
        let arr: [u8; HEADER_LEN] = b.clone().try_into().unwrap();
        assert_eq!(StreamHeader::parse(&arr), Ok(h));
        for i in 0..HEADER_LEN {
            let mut bad = arr;
            bad[i] ^= 0x10;
            assert!(StreamHeader::parse(&bad).is_err(), "flip in byte {i}");
        }
    }

    #[test]
    fn frames_round_trip_and_detect_damage() {
        let mut b = Vec::new();
        let mut chain = 42;
        write_frame(&mut b, &mut chain, TokenType::Literal as u8, &[b"hello ", b"world"]);
        let f = parse_frame(&b, 42).unwrap().unwrap();
        assert_eq!((f.ty, &b[f.body.clone()], f.len, f.check), (1, &b"hello world"[..], b.len(), chain));
        assert!(parse_frame(&b, 43).is_err(), "a frame verifies only in its place in the chain");
        for cut in 0..b.len() {
            assert!(parse_frame(&b[..cut], 42).unwrap().is_none());
        }
        for i in 0..b.len() {
            let mut bad = b.clone();
            bad[i] ^= 0x01;
            assert!(!matches!(parse_frame(&bad, 42), Ok(Some(_))), "flip in byte {i}");
        }
    }

    #[test]
    fn varints() {
        for v in [0, 1, 127, 128, 300, 16_383, 16_384, MAX_BODY, (1 << 21) - 1] {
            let mut b = Vec::new();
            put_varint(&mut b, v);
            assert_eq!(get_varint(&b), Ok(Some((v, b.len()))));
            assert_eq!(get_varint(&b[..b.len() - 1]), Ok(None));
        }
        assert!(get_varint(&[0x80, 0x80, 0x80, 0x01]).is_err());
    }

    const BUDGET: u64 = 1 << 20;

    /// A hand-made stream: a header matching an empty store, then `frames` chained properly.
    fn stream(flags: u8, frames: &[(u8, Vec<u8>)]) -> Vec<u8> {
        stream_v(VERSION, flags, frames)
    }

    fn stream_v(version: u8, flags: u8, frames: &[(u8, Vec<u8>)]) -> Vec<u8> {
        let mut out = Vec::new();
        let store = crate::Store::new(BUDGET);
        let mut chain =
            StreamHeader { version, flags, epoch: 0, budget: BUDGET, digest: store.digest() }.emit(&mut out);
        for (ty, body) in frames {
            write_frame(&mut out, &mut chain, *ty, &[body]);
        }
        out
    }

    fn decode(stream: &[u8]) -> (Vec<u8>, Result<(), DecodeError>, Vec<Event>) {
        let mut dec = Decoder::new(crate::Store::new(BUDGET), DecoderConfig::default());
        let mut out = Vec::new();
        let r = dec.decode(stream, &mut out).and_then(|()| dec.finish());
        let events = std::iter::from_fn(|| dec.poll_event()).collect();
        (out, r, events)
    }

    fn define(bytes: &[u8]) -> (u8, Vec<u8>) {
        (TokenType::Define as u8, [&ChunkId::of(bytes).to_bytes()[..], bytes].concat())
    }

    fn reference(id: ChunkId, len: usize, check: u32) -> (u8, Vec<u8>) {
        let mut body = id.to_bytes().to_vec();
        put_varint(&mut body, len);
        body.extend_from_slice(&check.to_be_bytes());
        (TokenType::Reference as u8, body)
    }

    #[test]
    fn a_reference_whose_length_or_check_disagrees_is_nacked_not_output() {
        let chunk = vec![7u8; 3000];
        let id = ChunkId::of(&chunk);
        let check = crate::store::chunk_check(&chunk);
        let good = stream(0, &[define(&chunk), reference(id, 3000, check)]);
        let (out, r, events) = decode(&good);
        assert_eq!((out.len(), r, events.len()), (6000, Ok(()), 0));
        for (len, check) in [(2999, check), (3000, check ^ 1)] {
            let s = stream(0, &[define(&chunk), reference(id, len, check), (TokenType::Literal as u8, b"x".to_vec())]);
            let (out, r, events) = decode(&s);
            assert_eq!(out, chunk, "only the DEFINE was output");
            assert_eq!(r, Err(DecodeError::Blocked(id)));
            assert_eq!(events, vec![Event::SendNack(Nack { kind: NackKind::Mismatch, epoch: 0, id })]);
        }
    }

    #[test]
    fn a_define_that_does_not_hash_to_its_id_is_refused() {
        let (ty, mut body) = define(b"some chunk bytes that are long enough to be a chunk, really");
        let last = body.len() - 1;
        body[last] ^= 1;
        let (out, r, _) = decode(&stream(0, &[(ty, body)]));
        assert!(out.is_empty());
        assert!(matches!(r, Err(DecodeError::ChunkIdMismatch { .. })), "{r:?}");
    }

    #[test]
    fn bad_frames_are_malformed() {
        let literal = |ty: u8, body: &[u8]| stream(0, &[(ty, body.to_vec())]);
        for s in [
            literal(TokenType::Literal as u8 | COMPRESSED, b"not announced in the header"),
            literal(TokenType::Reference as u8, b"short"),
            literal(TokenType::Reset as u8, b"12345"),
            literal(TokenType::Checkpoint as u8, b"1234"),
            literal(TokenType::Nack as u8, b"x"),
            literal(TokenType::Abort as u8, b""),
            literal(TokenType::Reset as u8 | COMPRESSED, b"1234"),
            literal(0x7f, b""),
        ] {
            let (out, r, _) = decode(&s);
            assert!(out.is_empty());
            assert!(matches!(r, Err(DecodeError::Malformed { .. })), "{r:?}");
        }
        let junk = stream(FLAG_ZSTD, &[(TokenType::Literal as u8 | COMPRESSED, vec![5, 1, 2, 3])]);
        assert!(matches!(decode(&junk).1, Err(DecodeError::Decompress { .. })));
        let mut huge = stream(0, &[]);
        huge.extend_from_slice(&[TokenType::Literal as u8, 0xff, 0xff, 0x7f]);
        assert!(matches!(decode(&huge).1, Err(DecodeError::Malformed { .. })));
    }

    fn carry(bytes: &[u8]) -> (u8, Vec<u8>) {
        (TokenType::Carry as u8, bytes.to_vec())
    }

    fn carried_ref(ty: TokenType, id: ChunkId, len: usize, check: u32, count: usize) -> (u8, Vec<u8>) {
        let (_, mut body) = reference(id, len, check);
        put_varint(&mut body, count);
        (ty as u8, body)
    }

    fn define_carried(id: ChunkId, carried: usize, rest: &[u8]) -> (u8, Vec<u8>) {
        let mut body = id.to_bytes().to_vec();
        put_varint(&mut body, carried);
        body.extend_from_slice(rest);
        (TokenType::DefineCarried as u8, body)
    }

    fn literal_carried(carried: usize, rest: &[u8]) -> (u8, Vec<u8>) {
        let mut body = Vec::new();
        put_varint(&mut body, carried);
        body.extend_from_slice(rest);
        (TokenType::LiteralCarried as u8, body)
    }

    #[test]
    fn carried_tokens_complete_chunks() {
        let chunk: Vec<u8> = (0..3000u32).map(|i| (i * 7 % 251) as u8).collect();
        let (id, check) = (ChunkId::of(&chunk), crate::store::chunk_check(&chunk));
        let s = stream(
            0,
            &[
                carry(&chunk[..1000]),
                define_carried(id, 1000, &chunk[1000..]),
                carry(&chunk[..10]),
                carried_ref(TokenType::CarryRef, id, 3000, check, 990),
                carried_ref(TokenType::ReferenceCarried, id, 3000, check, 1000),
                carry(b"tail"),
                literal_carried(4, b"+more"),
            ],
        );
        let (out, r, events) = decode(&s);
        assert_eq!((r, events.len()), (Ok(()), 0));
        assert_eq!(out, [&chunk[..], &chunk[..], b"tail+more"].concat());
    }

    #[test]
    fn inconsistent_carried_tokens_are_refused_without_wrong_bytes() {
        let chunk: Vec<u8> = (0..3000u32).map(|i| (i * 7 % 251) as u8).collect();
        let (id, check) = (ChunkId::of(&chunk), crate::store::chunk_check(&chunk));
        let mut other = chunk.clone();
        other[5] ^= 1;
        let cases: Vec<Vec<(u8, Vec<u8>)>> = vec![
            // Carried count larger than the carry, or not all of it with bytes after it.
            vec![carry(&chunk[..999]), define_carried(id, 1000, &chunk[1000..])],
            vec![carry(&chunk[..1001]), define_carried(id, 1000, &chunk[1000..])],
            vec![carry(b"abc"), literal_carried(2, b"x")],
            vec![carry(b"abc"), literal_carried(4, b"")],
            // A stored chunk whose beginning is not the carry.
            vec![
                define(&chunk),
                carry(&other[..1000]),
                carried_ref(TokenType::ReferenceCarried, id, 3000, check, 1000),
            ],
            vec![define(&chunk), carried_ref(TokenType::ReferenceCarried, id, 3000, check, 10)],
            // CARRY_REF past the chunk's end, or of nothing.
            vec![define(&chunk), carry(&chunk[..2990]), carried_ref(TokenType::CarryRef, id, 3000, check, 11)],
            vec![define(&chunk), carried_ref(TokenType::CarryRef, id, 3000, check, 0)],
            // The carry is bounded.
            vec![carry(&vec![1; MAX_CARRY]), carry(b"1")],
        ];
        for (i, frames) in cases.into_iter().enumerate() {
            let expected: Vec<u8> = frames
                .iter()
                .filter(|(ty, _)| *ty == TokenType::Define as u8 || *ty == TokenType::Carry as u8)
                .flat_map(|(ty, b)| if *ty == TokenType::Define as u8 { b[16..].to_vec() } else { b.clone() })
                .collect();
            let (out, r, _) = decode(&stream(0, &frames));
            assert!(matches!(r, Err(DecodeError::Malformed { .. })), "case {i}: {r:?}");
            assert!(expected.starts_with(&out), "case {i}: only verified bytes");
        }
        // Version 1 streams decode, but carry no carried tokens.
        let (out, r, _) = decode(&stream_v(1, 0, &[define(&chunk)]));
        assert_eq!((out, r), (chunk.clone(), Ok(())));
        let (out, r, _) = decode(&stream_v(1, 0, &[carry(b"abc")]));
        assert!(out.is_empty() && matches!(r, Err(DecodeError::Malformed { .. })), "{r:?}");
    }

    #[test]
    fn nack_round_trips() {
        let n = Nack { kind: NackKind::Mismatch, epoch: 3, id: ChunkId(0x0123_4567_89ab_cdef_0011_2233_4455_6677) };
        assert_eq!(Nack::from_bytes(&n.to_bytes()), Some(n));
        assert_eq!(Nack::from_bytes(&[9; Nack::LEN]), None);
        assert_eq!(Nack::from_bytes(&[1; 3]), None);
    }
}
