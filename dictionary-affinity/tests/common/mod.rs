//! Shared helpers for the codec tests: deterministic data and a two-proxy link harness.
#![allow(dead_code)]

use dictionary_affinity::codec::{DecodeError, RepairError};
use dictionary_affinity::{ChunkerConfig, Decoder, DecoderConfig, Encoder, EncoderConfig, Event, Nack, Store};

/// Small chunks, so that small inputs exercise many chunks and evictions.
pub const SMALL_CHUNKS: ChunkerConfig = ChunkerConfig { min: 64, avg: 256, max: 1024 };

/// Property-test cases: `default`, or `PROPTEST_CASES` from the environment for a longer soak.
pub fn cases(default: u32) -> u32 {
    std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

#[allow(unused_imports)] // each test file uses its own subset
pub use dictionary_affinity::sample::{html_records, Rng};

/// A fresh encoder/decoder pair with the same budget.
pub fn pair(budget: u64, config: EncoderConfig) -> (Encoder, Decoder) {
    (Encoder::new(Store::new(budget), config).unwrap(), Decoder::new(Store::new(budget), DecoderConfig::default()))
}

/// What went over a link: decoded output and the NACKs the decoder raised.
#[derive(Debug, Default)]
pub struct LinkResult {
    pub output: Vec<u8>,
    pub nacks: Vec<Nack>,
    pub wire_bytes: usize,
}

/// Why a link run stopped.
#[derive(Debug, PartialEq)]
pub enum LinkError {
    Decode(DecodeError),
    Repair(RepairError),
}

/// Sends `pieces` through `enc` (flushing after each piece whose index is in `flush_after`, and
/// at the end), feeds the stream to `dec` in slices of `wire_split` bytes, and hands every NACK
/// straight back to the encoder (zero-delay reverse path) until nothing is left to send.
pub fn run_link(
    enc: &mut Encoder,
    dec: &mut Decoder,
    pieces: &[&[u8]],
    flush_after: &[usize],
    wire_split: usize,
) -> Result<LinkResult, (LinkResult, LinkError)> {
    run_link_soft(enc, dec, pieces, flush_after, &[], wire_split)
}

/// [`run_link`], also soft-flushing (`Encoder::flush_soft`) after each piece whose index is in
/// `soft_after` (after the hard flush if both name it; twice if it is named twice).
pub fn run_link_soft(
    enc: &mut Encoder,
    dec: &mut Decoder,
    pieces: &[&[u8]],
    flush_after: &[usize],
    soft_after: &[usize],
    wire_split: usize,
) -> Result<LinkResult, (LinkResult, LinkError)> {
    let mut r = LinkResult::default();
    let mut wire = Vec::new();
    let mut sent = 0;
    let mut pump = |enc: &mut Encoder, wire: &mut Vec<u8>, r: &mut LinkResult| -> Result<(), LinkError> {
        while sent < wire.len() {
            let end = wire.len();
            for slice in wire[sent..end].chunks(wire_split.max(1)) {
                dec.decode(slice, &mut r.output).map_err(LinkError::Decode)?;
            }
            sent = end;
            while let Some(ev) = dec.poll_event() {
                if let Event::SendNack(n) = ev {
                    r.nacks.push(n);
                    enc.handle_nack(&n, wire).map_err(LinkError::Repair)?;
                }
            }
        }
        Ok(())
    };
    let mut step = |enc: &mut Encoder, wire: &mut Vec<u8>, r: &mut LinkResult, i: Option<usize>| match i {
        Some(i) => {
            enc.encode(pieces[i], wire);
            if flush_after.contains(&i) {
                enc.flush(wire);
            }
            for _ in soft_after.iter().filter(|&&s| s == i) {
                enc.flush_soft(wire);
            }
            pump(enc, wire, r)
        }
        None => {
            enc.flush(wire);
            pump(enc, wire, r)
        }
    };
    for i in 0..pieces.len() {
        if let Err(e) = step(enc, &mut wire, &mut r, Some(i)) {
            r.wire_bytes = wire.len();
            return Err((r, e));
        }
    }
    if let Err(e) = step(enc, &mut wire, &mut r, None) {
        r.wire_bytes = wire.len();
        return Err((r, e));
    }
    r.wire_bytes = wire.len();
    if let Err(e) = dec.finish() {
        return Err((r, LinkError::Decode(e)));
    }
    Ok(r)
}

/// Splits `data` at the given (unsorted, possibly out of range) cut points.
pub fn split_at<'a>(data: &'a [u8], cuts: &[usize]) -> Vec<&'a [u8]> {
    let mut cuts: Vec<usize> = cuts.iter().map(|&c| if data.is_empty() { 0 } else { c % (data.len() + 1) }).collect();
    cuts.sort_unstable();
    let mut pieces = Vec::new();
    let mut at = 0;
    for c in cuts {
        pieces.push(&data[at..c]);
        at = c;
    }
    pieces.push(&data[at..]);
    pieces
}

/// Walks the frames of an encoded stream (after the 32-byte header) as docs/codec.md draws them:
/// (offset, type byte, total length).
pub fn frames(stream: &[u8]) -> Vec<(usize, u8, usize)> {
    let mut v = Vec::new();
    let mut at = 32;
    while at < stream.len() {
        let ty = stream[at];
        let (mut len, mut n, mut shift) = (0usize, 0usize, 0);
        loop {
            let b = stream[at + 1 + n];
            len |= usize::from(b & 0x7f) << shift;
            n += 1;
            shift += 7;
            if b & 0x80 == 0 {
                break;
            }
        }
        let total = 1 + n + len + 4;
        v.push((at, ty, total));
        at += total;
    }
    v
}
