//! A damaged stream, or references the decoder cannot resolve, never produce wrong bytes: the
//! decoder errors or NACKs, and what it did output is always a prefix of the original.

mod common;

use common::{frames, html_records, split_at, Rng, SMALL_CHUNKS};
use dictionary_affinity::{DecodeError, Decoder, DecoderConfig, Encoder, EncoderConfig, Event, NackKind, Store};
use proptest::prelude::*;

const BUDGET: u64 = 1 << 22;

/// Data with internal repetition, encoded in one stream that holds every token type the
/// encoder produces on its own (DEFINE, REFERENCE, LITERAL, CHECKPOINT, and from soft flushes
/// CARRY, CARRY_REF, DEFINE_CARRIED, REFERENCE_CARRIED, LITERAL_CARRIED).
fn encoded(seed: u64, zstd: bool) -> (Vec<u8>, Vec<u8>) {
    let mut rng = Rng(seed);
    let block = html_records(6_000 + rng.below(6_000) as usize, seed);
    let mut data = Vec::new();
    for _ in 0..3 {
        data.extend_from_slice(&block);
        let n = rng.below(40) as usize;
        data.extend_from_slice(&rng.bytes(n));
    }
    let cfg = EncoderConfig { chunker: SMALL_CHUNKS, zstd, ..EncoderConfig::default() };
    let mut enc = Encoder::new(Store::new(BUDGET), cfg).unwrap();
    let mut wire = Vec::new();
    let cuts: Vec<usize> = (0..6).map(|_| rng.next() as usize).collect();
    for (i, piece) in split_at(&data, &cuts).into_iter().enumerate() {
        enc.encode(piece, &mut wire);
        // Soft flushes mid-chunk put the carried tokens in the stream; hard ones the rest.
        if i % 3 == 2 {
            enc.flush(&mut wire);
        } else {
            enc.flush_soft(&mut wire);
        }
    }
    enc.flush(&mut wire);
    assert!(enc.stats().references > 0 && enc.stats().defines > 0);
    (data, wire)
}

/// Decodes `wire` in slices of `split` bytes; returns output, first error, and the NACKs.
fn decode_all(wire: &[u8], split: usize) -> (Vec<u8>, Result<(), DecodeError>, usize) {
    let mut dec = Decoder::new(Store::new(BUDGET), DecoderConfig::default());
    let mut out = Vec::new();
    let mut result = Ok(());
    for piece in wire.chunks(split.max(1)) {
        if let Err(e) = dec.decode(piece, &mut out) {
            result = Err(e);
            break;
        }
    }
    if result.is_ok() {
        result = dec.finish();
    }
    let mut nacks = 0;
    while let Some(ev) = dec.poll_event() {
        nacks += matches!(ev, Event::SendNack(_)) as usize;
    }
    (out, result, nacks)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: common::cases(128), ..ProptestConfig::default() })]

    #[test]
    fn flipped_bytes_are_detected(
        seed in any::<u64>(),
        zstd in any::<bool>(),
        flips in proptest::collection::vec((any::<usize>(), 1u8..=255), 1..4),
        split in prop_oneof![Just(1usize), 1usize..5000],
    ) {
        let (data, mut wire) = encoded(seed, zstd);
        for (at, mask) in flips {
            let i = at % wire.len();
            wire[i] ^= mask;
        }
        let (out, result, _) = decode_all(&wire, split);
        prop_assert!(data.starts_with(&out), "output is not a prefix of the input");
        prop_assert!(result.is_err(), "a damaged stream decoded cleanly");
    }

    #[test]
    fn truncated_inserted_or_deleted_bytes_never_give_wrong_output(
        seed in any::<u64>(),
        at in any::<usize>(),
        what in 0u8..3,
        junk in proptest::collection::vec(any::<u8>(), 1..64),
    ) {
        let (data, mut wire) = encoded(seed, false);
        let i = at % wire.len();
        let end = (i + junk.len()).min(wire.len());
        // A deletion that reaches the end is a truncation.
        let truncated = what == 0 || (what == 2 && end == wire.len());
        match what {
            0 => wire.truncate(i),
            1 => { wire.splice(i..i, junk); }
            _ => { wire.drain(i..end); }
        }
        let (out, result, _) = decode_all(&wire, 777);
        // Cut at a frame boundary, a stream is only shorter (the transport's end of stream
        // tells); anywhere else, and for any insertion or deletion, the decoder must object.
        prop_assert!(data.starts_with(&out));
        if !truncated {
            prop_assert!(result.is_err());
        }
    }

    /// Whole frames lost, repeated or swapped (a broken transport, or a splice of two streams):
    /// each frame's check is chained on the previous one, so the next frame fails to verify.
    #[test]
    fn lost_repeated_or_reordered_frames_are_detected(
        seed in any::<u64>(),
        zstd in any::<bool>(),
        pick in any::<usize>(),
        what in 0u8..3,
    ) {
        let (data, wire) = encoded(seed, zstd);
        let all = frames(&wire);
        // Any frame but the last (losing the last frame is a truncation at a frame boundary,
        // which only the transport's end of stream can tell).
        let i = pick % (all.len() - 1);
        let (start, _, len) = all[i];
        let frame = wire[start..start + len].to_vec();
        let mut bad = wire.clone();
        match what {
            0 => { bad.drain(start..start + len); }
            1 => { bad.splice(start..start, frame); }
            _ => {
                let (next, _, next_len) = all[i + 1];
                let second = wire[next..next + next_len].to_vec();
                bad.splice(start..next + next_len, second.into_iter().chain(frame));
            }
        }
        let (out, result, _) = decode_all(&bad, 1000);
        prop_assert!(data.starts_with(&out));
        prop_assert!(matches!(result, Err(DecodeError::FrameChecksum { .. })), "{result:?}");
    }

    /// References to chunks the decoder's store lacks (the dictionaries disagree: here the
    /// encoder's was filled by a stream this decoder never saw): the decoder NACKs them and holds
    /// all later output until a REPAIR; with no reverse path, it never outputs a guess.
    #[test]
    fn unresolvable_references_block_with_a_nack(seed in any::<u64>(), split in 1usize..3000) {
        let (data, _) = encoded(seed, false);
        let cfg = EncoderConfig { chunker: SMALL_CHUNKS, ..EncoderConfig::default() };
        let mut warm = Encoder::new(Store::new(BUDGET), cfg).unwrap();
        warm.encode(&data, &mut Vec::new());
        warm.flush(&mut Vec::new());
        let mut enc = Encoder::new(warm.into_store(), cfg).unwrap();
        let mut wire = Vec::new();
        enc.encode(&data, &mut wire);
        enc.flush(&mut wire);
        prop_assume!(enc.stats().references > 0);
        let mut dec = Decoder::new(Store::new(BUDGET), DecoderConfig::default());
        let mut out = Vec::new();
        for piece in wire.chunks(split) {
            prop_assert_eq!(dec.decode(piece, &mut out), Ok(()));
        }
        prop_assert!(data.starts_with(&out));
        prop_assert!(out.len() < data.len());
        let blocked = dec.blocked_on().expect("blocked on a missing chunk");
        prop_assert_eq!(dec.finish(), Err(DecodeError::Blocked(blocked)));
        let mut nacks = Vec::new();
        while let Some(Event::SendNack(n)) = dec.poll_event() {
            nacks.push(n);
        }
        prop_assert_eq!(nacks[0].kind, NackKind::Desync, "the header digest already disagreed");
        prop_assert!(nacks.iter().any(|n| n.id == blocked && n.kind == NackKind::Missing), "{nacks:?}");
        // Every distinct missing reference was NACKed in this one pass, not one per round trip.
        let missing = nacks.iter().filter(|n| n.kind == NackKind::Missing).count();
        prop_assert!(missing as u64 >= enc.stats().references.min(1));
    }
}

#[test]
fn a_stream_for_another_budget_or_version_is_refused() {
    let (_, wire) = encoded(1, false);
    let mut bad = wire.clone();
    bad[4] = 3;
    assert_eq!(decode_all(&bad, 100).1, Err(DecodeError::UnsupportedVersion(3)));
    bad[4] = 0;
    assert_eq!(decode_all(&bad, 100).1, Err(DecodeError::UnsupportedVersion(0)));
    let mut bad = wire.clone();
    bad[0] = b'X';
    assert_eq!(decode_all(&bad, 100).1, Err(DecodeError::BadMagic));
    let mut dec = Decoder::new(Store::new(BUDGET / 2), DecoderConfig::default());
    assert!(matches!(dec.decode(&wire, &mut Vec::new()), Err(DecodeError::BudgetMismatch { .. })));
}

#[test]
fn errors_are_sticky() {
    let (_, mut wire) = encoded(2, false);
    let n = wire.len();
    wire[n / 2] ^= 1;
    let mut dec = Decoder::new(Store::new(BUDGET), DecoderConfig::default());
    let mut out = Vec::new();
    let e = dec.decode(&wire, &mut out).unwrap_err();
    let len = out.len();
    assert_eq!(dec.decode(b"more", &mut out), Err(e));
    assert_eq!(dec.finish(), Err(e));
    assert_eq!(out.len(), len);
}
