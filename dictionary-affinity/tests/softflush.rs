//! Soft flushes (`Encoder::flush_soft`): the pending bytes are delivered at once, but chunk
//! boundaries stay where the content puts them, so a repeat of the same data costs the same
//! wherever the pauses fell in either pass.

mod common;

use common::{html_records, pair, run_link, run_link_soft, split_at, Rng, SMALL_CHUNKS};
use dictionary_affinity::{ChunkerConfig, EncoderConfig};
use proptest::prelude::*;

fn input() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..60_000),
        proptest::collection::vec(any::<u8>(), 0..100),
        (0usize..150_000).prop_map(|n| vec![0u8; n]),
        (any::<u64>(), 1usize..20_000, 2usize..6).prop_map(|(seed, len, times)| {
            let seg = Rng(seed).bytes(len);
            seg.repeat(times)
        }),
        (any::<u64>(), 0usize..80_000).prop_map(|(seed, n)| html_records(n, seed)),
    ]
}

fn chunker() -> impl Strategy<Value = ChunkerConfig> {
    prop_oneof![Just(ChunkerConfig::default()), Just(SMALL_CHUNKS)]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: common::cases(128), ..ProptestConfig::default() })]

    /// Many soft flushes (in the middle of chunks, several in a row with no input between,
    /// mixed with hard ones), any wire split: exact output, stores identical, no carry left
    /// after the final (hard) flush.
    #[test]
    fn round_trip_with_soft_flushes(
        data in input(),
        chunker in chunker(),
        zstd in any::<bool>(),
        cuts in proptest::collection::vec(any::<usize>(), 0..40),
        soft in proptest::collection::vec(0usize..41, 0..60),
        hard in proptest::collection::vec(0usize..41, 0..3),
        wire_split in prop_oneof![Just(1usize), 2usize..64, 64usize..70_000],
    ) {
        let (mut enc, mut dec) = pair(1 << 24, EncoderConfig { chunker, zstd, ..EncoderConfig::default() });
        let pieces = split_at(&data, &cuts);
        let r = run_link_soft(&mut enc, &mut dec, &pieces, &hard, &soft, wire_split).expect("clean link");
        prop_assert!(r.output == data, "output differs ({} vs {} bytes)", r.output.len(), data.len());
        prop_assert!(r.nacks.is_empty());
        prop_assert!(enc.store() == dec.store());
        prop_assert_eq!(dec.carried(), 0);
        prop_assert_eq!(enc.pending(), 0);
    }

    /// The same data twice, soft flushes at random points in both passes: the second pass
    /// defines nothing and costs what a pass without any flush costs, plus a few dozen bytes
    /// per flush.
    #[test]
    fn repeat_costs_the_same_wherever_soft_flushes_fall(
        seed in any::<u64>(),
        html in any::<bool>(),
        small in any::<bool>(),
        cuts_a in proptest::collection::vec(any::<usize>(), 0..60),
        cuts_b in proptest::collection::vec(any::<usize>(), 0..60),
    ) {
        let data = if html { html_records(300_000, seed) } else { Rng(seed).bytes(300_000) };
        let chunker = if small { SMALL_CHUNKS } else { ChunkerConfig::default() };
        let cfg = EncoderConfig { chunker, ..EncoderConfig::default() };
        // Reference: the same two passes without flushes.
        let (mut enc0, mut dec0) = pair(1 << 26, cfg);
        run_link(&mut enc0, &mut dec0, &[&data], &[], 1 << 16).unwrap();
        let quiet = run_link(&mut enc0, &mut dec0, &[&data], &[], 1 << 16).unwrap().wire_bytes;

        let (mut enc, mut dec) = pair(1 << 26, cfg);
        let (a, b) = (split_at(&data, &cuts_a), split_at(&data, &cuts_b));
        let soft_a: Vec<usize> = (0..a.len()).collect();
        let soft_b: Vec<usize> = (0..b.len()).collect();
        let r = run_link_soft(&mut enc, &mut dec, &a, &[], &soft_a, 1 << 16).unwrap();
        prop_assert!(r.output == data);
        let before = enc.stats();
        let r = run_link_soft(&mut enc, &mut dec, &b, &[], &soft_b, 1 << 16).unwrap();
        prop_assert!(r.output == data);
        let after = enc.stats();
        prop_assert_eq!(after.defines, before.defines, "no new chunk on the second pass");
        prop_assert!(after.literal_bytes - before.literal_bytes < 64);
        prop_assert!(enc.store() == dec.store());
        let flushes = b.len();
        prop_assert!(
            r.wire_bytes <= quiet + 80 * flushes,
            "second pass {} B with {} soft flushes, {} B without", r.wire_bytes, flushes, quiet
        );
    }
}

#[test]
fn repeated_soft_flushes_without_input_send_nothing() {
    let data = html_records(50_000, 9);
    let (mut enc, mut dec) = pair(1 << 24, EncoderConfig::default());
    let mut wire = Vec::new();
    let mut out = Vec::new();
    enc.encode(&data[..20_000], &mut wire);
    enc.flush_soft(&mut wire);
    assert_eq!(enc.undelivered(), 0);
    let len = wire.len();
    enc.flush_soft(&mut wire);
    enc.flush_soft(&mut wire);
    assert_eq!(wire.len(), len, "nothing new to send");
    dec.decode(&wire, &mut out).unwrap();
    assert_eq!(out, data[..20_000], "everything delivered at once");
    assert_eq!(dec.carried(), enc.pending(), "both sides hold the unfinished chunk's start");
    assert!(enc.pending() > 0 && enc.pending() < 32 * 1024);
    wire.clear();
    enc.encode(&data[20_000..], &mut wire);
    enc.flush(&mut wire);
    dec.decode(&wire, &mut out).unwrap();
    dec.finish().unwrap();
    assert_eq!(out, data);
    assert!(enc.store() == dec.store());
    assert_eq!(dec.carried(), 0);
}

#[test]
fn a_soft_flush_at_a_chunk_boundary_leaves_no_carry() {
    let data = Rng(5).bytes(200_000);
    let cuts: Vec<usize> = dictionary_affinity::Chunker::default().chunks(&data).map(<[u8]>::len).collect();
    let first_two = cuts[0] + cuts[1];
    let (mut enc, mut dec) = pair(1 << 24, EncoderConfig::default());
    let mut wire = Vec::new();
    let mut out = Vec::new();
    // The boundary is only known once a little of the next chunk is held (two bytes: FastCDC
    // tests cut points in pairs).
    enc.encode(&data[..first_two + 2], &mut wire);
    enc.flush_soft(&mut wire);
    dec.decode(&wire, &mut out).unwrap();
    assert_eq!(enc.stats().defines, 2);
    assert_eq!((enc.pending(), dec.carried()), (2, 2));
    wire.clear();
    enc.encode(&data[first_two + 2..], &mut wire);
    enc.flush(&mut wire);
    dec.decode(&wire, &mut out).unwrap();
    assert_eq!(out, data);
    assert_eq!(enc.stats().defines as usize, cuts.len());
}

/// The decoder lost its dictionary: the carried tokens of a warm encoder (CARRY_REF and
/// REFERENCE_CARRIED to chunks the decoder lacks) are NACKed, REPAIRed with whole chunks, and
/// the output stays exact; the stores are back in step after the RESET.
#[test]
fn carried_references_to_lost_chunks_are_repaired() {
    let data = html_records(400_000, 3);
    let cfg = EncoderConfig { chunker: SMALL_CHUNKS, ..EncoderConfig::default() };
    let (mut enc, mut dec) = pair(1 << 24, cfg);
    run_link(&mut enc, &mut dec, &[&data], &[], 1 << 16).unwrap();
    // The next stream: the encoder keeps its dictionary, the decoder starts from nothing.
    let mut enc = dictionary_affinity::Encoder::new(enc.into_store(), cfg).unwrap();
    let mut dec = dictionary_affinity::Decoder::new(
        dictionary_affinity::Store::new(1 << 24),
        dictionary_affinity::DecoderConfig::default(),
    );
    let cuts: Vec<usize> = (1..40).map(|i| i * 9_973 + 17).collect();
    let pieces = split_at(&data, &cuts);
    let soft: Vec<usize> = (0..pieces.len()).collect();
    let r = run_link_soft(&mut enc, &mut dec, &pieces, &[], &soft, 777).unwrap();
    assert!(r.output == data);
    assert!(!r.nacks.is_empty());
    let s = enc.stats();
    assert!(s.repairs > 0 && s.resets > 0, "{s:?}");
    assert!(s.carried_bytes > s.carried_raw_bytes, "some CARRY_REF: {s:?}");
    assert!(enc.store() == dec.store());
}

/// The second pass on a *new* connection: the encoder and decoder of the pair's next
/// connection, on the stores the first one left (its own, handed on; the pair's shared ones,
/// used by both at once; or the encoder's store saved and loaded again, as after a restart).
/// The send-ahead index lives with the store, so a soft flush on the new connection still
/// names the stored chunk its carry begins (CARRY_REF) instead of sending the carry raw.
#[test]
fn a_new_connection_on_the_pair_store_sends_its_carries_as_references() {
    use dictionary_affinity::{Decoder, DecoderConfig, Encoder, SharedStore, Store};
    let data = Rng(17).bytes(400_000);
    let cuts: Vec<usize> = (1..200).map(|i| i * 1_999).collect();
    let pieces = split_at(&data, &cuts);
    let soft: Vec<usize> = (0..pieces.len()).collect();
    let cfg = EncoderConfig::default();
    let second_pass = |enc: &mut Encoder, dec: &mut Decoder| {
        let r = run_link_soft(enc, dec, &pieces, &[], &soft, 1 << 16).unwrap();
        assert!(r.output == data);
        let s = enc.stats();
        (s, r.wire_bytes)
    };

    // Own stores, handed from the first connection to the next.
    let (mut enc, mut dec) = pair(1 << 26, cfg);
    run_link_soft(&mut enc, &mut dec, &pieces, &[], &soft, 1 << 16).unwrap();
    let (es, ds) = (enc.into_store(), dec.into_store());
    let dir = tempfile::tempdir().unwrap();
    es.save(dir.path().join("enc")).unwrap();
    ds.save(dir.path().join("dec")).unwrap();
    let (mut enc, mut dec) = (Encoder::new(es, cfg).unwrap(), Decoder::new(ds, DecoderConfig::default()));
    let (s, wire) = second_pass(&mut enc, &mut dec);
    assert_eq!(s.defines, 0);
    assert!(s.soft_flushes > 150, "{s:?}");
    assert!(s.carried_raw_bytes < 32 * s.soft_flushes, "own stores, next connection: {s:?}");
    assert!(wire < 80 * pieces.len() + 20_000, "own stores: {wire} B on the wire");

    // Loaded from disk (a restart): prefixes rebuilt from the chunks held.
    let es = Store::load(dir.path().join("enc")).unwrap();
    let ds = Store::load(dir.path().join("dec")).unwrap();
    let (mut enc, mut dec) = (Encoder::new(es, cfg).unwrap(), Decoder::new(ds, DecoderConfig::default()));
    let (s, _) = second_pass(&mut enc, &mut dec);
    assert!(s.carried_raw_bytes < 32 * s.soft_flushes, "loaded stores: {s:?}");

    // Shared stores: the first connection's encoder is still open when the second one runs.
    let (es, ds) = (SharedStore::new(Store::new(1 << 26)), SharedStore::new(Store::new(1 << 26)));
    let mut enc1 = Encoder::shared(es.clone(), cfg).unwrap();
    let mut dec1 = Decoder::shared(ds.clone(), DecoderConfig::default());
    run_link_soft(&mut enc1, &mut dec1, &pieces, &[], &soft, 1 << 16).unwrap();
    let mut enc2 = Encoder::shared(es, cfg).unwrap();
    let mut dec2 = Decoder::shared(ds, DecoderConfig::default());
    let (s, _) = second_pass(&mut enc2, &mut dec2);
    assert_eq!(s.defines, 0);
    assert!(s.carried_raw_bytes < 32 * s.soft_flushes, "shared stores, second connection: {s:?}");
}

/// What a decoder that speaks only framing version 1 (an older build) gets from an encoder
/// told so by the chain HELLO: a version-1 header, no carried token however many soft
/// flushes, and the exact bytes; and what it does with a version-2 stream (refuses it before
/// a byte is output).
#[test]
fn a_version_1_peer_gets_a_version_1_stream() {
    use dictionary_affinity::codec::DecodeError;
    use dictionary_affinity::{Decoder, DecoderConfig, Encoder, Store};
    let data = html_records(200_000, 7);
    let pieces = split_at(&data, &(1..40).map(|i| i * 4_999).collect::<Vec<_>>());
    let soft: Vec<usize> = (0..pieces.len()).collect();
    let v1_decoder = || Decoder::new(Store::new(1 << 24), DecoderConfig { max_version: 1, ..DecoderConfig::default() });

    let cfg = EncoderConfig { chunker: SMALL_CHUNKS, version: 1, ..EncoderConfig::default() };
    let mut header = Vec::new();
    Encoder::new(Store::new(1 << 24), cfg).unwrap().flush_soft(&mut header);
    assert_eq!(&header[..5], b"LBRE\x01", "version-1 header");
    let mut enc = Encoder::new(Store::new(1 << 24), cfg).unwrap();
    let mut dec = v1_decoder();
    let first = run_link_soft(&mut enc, &mut dec, &pieces, &[], &soft, 1).expect("a version-1 stream decodes");
    assert!(first.output == data);
    let again = run_link_soft(&mut enc, &mut dec, &pieces, &[], &soft, 1 << 16).expect("and its repeat");
    assert!(again.output == data);
    let s = enc.stats();
    assert_eq!((s.carried_bytes, s.soft_flushes), (0, 0), "nothing sent ahead in version 1");
    assert!(s.referenced_bytes as usize > data.len() / 2, "the repeat still goes as references: {s:?}");
    assert!(enc.store() == dec.store());

    // The default encoder writes version 2, which the version-1 decoder refuses up front.
    let mut enc = Encoder::new(Store::new(1 << 24), EncoderConfig::default()).unwrap();
    let mut dec = v1_decoder();
    let (r, e) = run_link_soft(&mut enc, &mut dec, &pieces, &[], &soft, 1).unwrap_err();
    assert_eq!(e, common::LinkError::Decode(DecodeError::UnsupportedVersion(2)));
    assert!(r.output.is_empty(), "no byte before the refusal");
}
