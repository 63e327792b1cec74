//! Round trips over random and adversarial inputs, any split of the input and of the wire.

mod common;

use common::{html_records, pair, run_link, split_at, Rng, SMALL_CHUNKS};
use dictionary_affinity::{ChunkerConfig, Decoder, DecoderConfig, Encoder, EncoderConfig, Store};
use proptest::prelude::*;

/// Inputs that stress the chunker and the dictionary differently.
fn input() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        // Random bytes: nothing repeats, everything is DEFINE.
        proptest::collection::vec(any::<u8>(), 0..60_000),
        // Tiny inputs: below every chunk minimum.
        proptest::collection::vec(any::<u8>(), 0..100),
        // All zero: every cut is forced at max.
        (0usize..150_000).prop_map(|n| vec![0u8; n]),
        // One segment repeated with small edits: mostly REFERENCE.
        (any::<u64>(), 1usize..20_000, 2usize..8, 0usize..5).prop_map(|(seed, len, times, edits)| {
            let mut rng = Rng(seed);
            let seg = rng.bytes(len);
            let mut v = Vec::new();
            for _ in 0..times {
                v.extend_from_slice(&seg);
            }
            for _ in 0..edits {
                let at = rng.below(v.len() as u64) as usize;
                v[at] ^= 0x5a;
            }
            v
        }),
        // Text records.
        (any::<u64>(), 0usize..80_000).prop_map(|(seed, n)| html_records(n, seed)),
    ]
}

fn chunker() -> impl Strategy<Value = ChunkerConfig> {
    prop_oneof![Just(ChunkerConfig::default()), Just(SMALL_CHUNKS)]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: common::cases(96), ..ProptestConfig::default() })]

    #[test]
    fn round_trip_any_split(
        data in input(),
        chunker in chunker(),
        zstd in any::<bool>(),
        cuts in proptest::collection::vec(any::<usize>(), 0..12),
        flushes in proptest::collection::vec(0usize..12, 0..4),
        wire_split in prop_oneof![Just(1usize), 2usize..64, 64usize..70_000],
    ) {
        let (mut enc, mut dec) = pair(1 << 24, EncoderConfig { chunker, zstd, ..EncoderConfig::default() });
        let pieces = split_at(&data, &cuts);
        let r = run_link(&mut enc, &mut dec, &pieces, &flushes, wire_split).expect("clean link");
        prop_assert!(r.output == data, "output differs ({} vs {} bytes)", r.output.len(), data.len());
        prop_assert!(r.nacks.is_empty());
        prop_assert!(enc.store() == dec.store());
        prop_assert_eq!(enc.stats().input_bytes, data.len() as u64);
        prop_assert_eq!(dec.stats().output_bytes, data.len() as u64);
    }

    /// The same content gives the same chunks however it was split into `encode` calls: a second
    /// copy of the data is nothing but references, whatever the two splits were.
    #[test]
    fn chunking_ignores_read_boundaries(
        seed in any::<u64>(),
        len in 40_000usize..120_000,
        cuts_a in proptest::collection::vec(any::<usize>(), 0..20),
        cuts_b in proptest::collection::vec(any::<usize>(), 0..20),
    ) {
        let data = Rng(seed).bytes(len);
        let (mut enc, mut dec) = pair(1 << 24, EncoderConfig::default());
        run_link(&mut enc, &mut dec, &split_at(&data, &cuts_a), &[], 4096).expect("first pass");
        let before = enc.stats();
        let r = run_link(&mut enc, &mut dec, &split_at(&data, &cuts_b), &[], 4096).expect("second pass");
        prop_assert!(r.output == data);
        let after = enc.stats();
        prop_assert_eq!(after.defines, before.defines, "no new chunk on the second pass");
        // Only a flushed tail shorter than `min_define` (64 B) goes as a literal again.
        prop_assert!(after.literal_bytes - before.literal_bytes < 64);
    }

    /// Arbitrary bytes, with or without a valid header in front, never panic the decoder and
    /// never make it output anything it could not have verified.
    #[test]
    fn arbitrary_bytes_never_panic(
        junk in proptest::collection::vec(any::<u8>(), 0..4096),
        with_header in any::<bool>(),
        split in 1usize..512,
    ) {
        let mut stream = Vec::new();
        if with_header {
            let mut enc = Encoder::new(Store::new(1 << 20), EncoderConfig::default()).unwrap();
            enc.encode(b"", &mut stream);
        }
        stream.extend_from_slice(&junk);
        let mut dec = Decoder::new(Store::new(1 << 20), DecoderConfig::default());
        let mut out = Vec::new();
        for piece in stream.chunks(split) {
            if dec.decode(piece, &mut out).is_err() {
                break;
            }
        }
        let _ = dec.finish();
        prop_assert!(out.is_empty(), "random frames cannot pass a 32-bit check in practice");
    }
}

#[test]
fn empty_stream_and_empty_calls() {
    let (mut enc, mut dec) = pair(1 << 20, EncoderConfig::default());
    let mut wire = Vec::new();
    enc.encode(b"", &mut wire);
    enc.flush(&mut wire);
    enc.flush(&mut wire);
    assert_eq!(wire.len(), 32, "only the header");
    let mut out = Vec::new();
    dec.decode(&wire, &mut out).unwrap();
    dec.decode(b"", &mut out).unwrap();
    dec.finish().unwrap();
    assert!(out.is_empty());
    assert!(Decoder::new(Store::new(1), DecoderConfig::default()).finish().is_ok());
}

#[test]
fn budget_mismatch_is_refused() {
    let mut enc = Encoder::new(Store::new(1 << 20), EncoderConfig::default()).unwrap();
    let mut wire = Vec::new();
    enc.encode(b"x", &mut wire);
    let mut dec = Decoder::new(Store::new(1 << 21), DecoderConfig::default());
    let err = dec.decode(&wire, &mut Vec::new()).unwrap_err();
    assert!(matches!(err, dictionary_affinity::DecodeError::BudgetMismatch { .. }), "{err:?}");
}

#[test]
fn chunks_larger_than_the_budget_go_as_literals() {
    // 8 KiB budget, 32 KiB chunks: nothing fits, everything is LITERAL, still exact.
    let data = html_records(200_000, 1);
    let (mut enc, mut dec) = pair(8 * 1024, EncoderConfig::default());
    let r = run_link(&mut enc, &mut dec, &[&data, &data], &[], 10_000).unwrap();
    assert_eq!(r.output, [&data[..], &data[..]].concat());
    assert!(enc.stats().literal_bytes > 0);
    assert!(enc.store() == dec.store());
}
