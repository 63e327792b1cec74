//! The two dictionaries stay identical through long random operation sequences with small
//! budgets (constant eviction): same chunks, same eviction order, same digest, never a NACK.

mod common;

use common::{Rng, SMALL_CHUNKS};
use dictionary_affinity::{ChunkerConfig, Decoder, DecoderConfig, Encoder, EncoderConfig, Event, Store};
use proptest::prelude::*;

#[derive(Debug, Clone)]
enum Op {
    /// Send a segment of the pool, possibly with one byte changed.
    Send {
        segment: usize,
        edit: Option<usize>,
        split: usize,
    },
    Flush,
    /// A pause: the pending bytes go out, the chunk stays open.
    SoftFlush,
    /// The encoder starts a new epoch on its own.
    Reset,
    /// The stream ends; the pair's next stream reuses both stores.
    NewStream,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        8 => (0usize..10, proptest::option::weighted(0.3, any::<usize>()), 1usize..5000)
            .prop_map(|(segment, edit, split)| Op::Send { segment, edit, split }),
        3 => Just(Op::Flush),
        4 => Just(Op::SoftFlush),
        1 => Just(Op::Reset),
        1 => Just(Op::NewStream),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: common::cases(64), ..ProptestConfig::default() })]

    #[test]
    fn stores_stay_identical(
        seed in any::<u64>(),
        budget in 2_000u64..60_000,
        small in any::<bool>(),
        zstd in any::<bool>(),
        ops in proptest::collection::vec(op(), 50..300),
    ) {
        let mut rng = Rng(seed);
        // Segments share pieces with each other, so chunks recur across segments.
        let base = rng.bytes(31_000);
        let pool: Vec<Vec<u8>> = (0..10)
            .map(|_| {
                let a = rng.below(25_000) as usize;
                let n = 100 + rng.below(5_000) as usize;
                let mut v = base[a..a + n].to_vec();
                let extra = rng.below(500) as usize;
                v.extend(rng.bytes(extra));
                v
            })
            .collect();
        let chunker = if small { SMALL_CHUNKS } else { ChunkerConfig::default() };
        let cfg = EncoderConfig { chunker, zstd, ..EncoderConfig::default() };
        let mut enc = Encoder::new(Store::new(budget), cfg).unwrap();
        let mut dec = Decoder::new(Store::new(budget), DecoderConfig::default());
        let mut expected = Vec::new();
        let mut out = Vec::new();
        let mut wire = Vec::new();
        for op in &ops {
            wire.clear();
            match op {
                Op::Send { segment, edit, split } => {
                    let mut seg = pool[*segment].clone();
                    if let Some(at) = edit {
                        let i = at % seg.len();
                        seg[i] = seg[i].wrapping_add(1);
                    }
                    for piece in seg.chunks(*split) {
                        enc.encode(piece, &mut wire);
                    }
                    expected.extend_from_slice(&seg);
                }
                Op::Flush => enc.flush(&mut wire),
                Op::SoftFlush => enc.flush_soft(&mut wire),
                Op::Reset => enc.reset(&mut wire),
                Op::NewStream => {
                    enc.flush(&mut wire);
                    dec.decode(&wire, &mut out).unwrap();
                    dec.finish().unwrap();
                    prop_assert!(enc.store() == dec.store());
                    wire.clear();
                    enc = Encoder::new(enc.into_store(), cfg).unwrap();
                    dec = Decoder::new(dec.into_store(), DecoderConfig::default());
                }
            }
            dec.decode(&wire, &mut out).unwrap();
            prop_assert!(dec.poll_event().is_none(), "a NACK between stores in lockstep");
            prop_assert!(enc.store().used() <= budget);
            if matches!(op, Op::Flush | Op::SoftFlush) {
                // After a flush every token is out: the stores must match exactly (a soft
                // flush also delivers every byte; both sides hold the same carry).
                prop_assert_eq!(dec.carried(), enc.pending());
                prop_assert!(enc.store() == dec.store());
                prop_assert_eq!(&out, &expected);
            }
        }
        wire.clear();
        enc.flush(&mut wire);
        dec.decode(&wire, &mut out).unwrap();
        dec.finish().unwrap();
        prop_assert!(dec.poll_event().is_none());
        prop_assert!(enc.store() == dec.store());
        prop_assert_eq!(enc.store().digest(), dec.store().digest());
        prop_assert!(out == expected);
    }
}

#[test]
fn eviction_keeps_working_over_a_long_run() {
    // 2,000 segments through a 64 KiB dictionary: tens of thousands of evictions, in step.
    let mut rng = Rng(77);
    let pool: Vec<Vec<u8>> = (0..40).map(|_| rng.bytes(3000)).collect();
    let cfg = EncoderConfig { chunker: SMALL_CHUNKS, ..EncoderConfig::default() };
    let mut enc = Encoder::new(Store::new(64 * 1024), cfg).unwrap();
    let mut dec = Decoder::new(Store::new(64 * 1024), DecoderConfig::default());
    let mut wire = Vec::new();
    let mut out = Vec::new();
    for i in 0..2000 {
        wire.clear();
        enc.encode(&pool[rng.below(40) as usize], &mut wire);
        if i % 7 == 0 {
            enc.flush(&mut wire);
        }
        dec.decode(&wire, &mut out).unwrap();
        if let Some(Event::SendNack(n)) = dec.poll_event() {
            panic!("NACK {n:?} at segment {i}");
        }
    }
    wire.clear();
    enc.flush(&mut wire);
    dec.decode(&wire, &mut out).unwrap();
    dec.finish().unwrap();
    assert!(enc.store() == dec.store());
    assert!(enc.store().stats().evictions > 1000, "{:?}", enc.store().stats());
    assert!(enc.stats().references > 1000);
}
