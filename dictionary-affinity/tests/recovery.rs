//! Dictionaries that disagree (restart, stale snapshot, lost stream) are repaired through NACKs:
//! the output is exact, and afterwards the stores are in lockstep again.

mod common;

use common::{html_records, pair, run_link, run_link_soft, split_at, LinkError, Rng, SMALL_CHUNKS};
use dictionary_affinity::codec::RepairError;
use dictionary_affinity::{DecodeError, Decoder, DecoderConfig, Encoder, EncoderConfig, Event, NackKind, Store};
use proptest::prelude::*;

const BUDGET: u64 = 1 << 24;

fn warm_encoder(data: &[u8], cfg: EncoderConfig) -> Encoder {
    let mut warm = Encoder::new(Store::new(BUDGET), cfg).unwrap();
    warm.encode(data, &mut Vec::new());
    warm.flush(&mut Vec::new());
    Encoder::new(warm.into_store(), cfg).unwrap()
}

#[test]
fn a_restarted_decoder_is_repaired_then_back_in_lockstep() {
    let data = html_records(400_000, 5);
    for wire_split in [1 << 20, 1500] {
        let mut enc = warm_encoder(&data, EncoderConfig::default());
        let mut dec = Decoder::new(Store::new(BUDGET), DecoderConfig::default());
        // One piece: every token is on the wire before the first NACK is answered.
        let r = run_link(&mut enc, &mut dec, &[&data], &[], wire_split).unwrap();
        assert_eq!(r.output, data);
        assert_eq!(r.nacks[0].kind, NackKind::Desync, "the header told the decoder first");
        assert!(r.nacks.iter().filter(|n| n.kind == NackKind::Missing).count() > 10);
        assert_eq!(enc.stats().resets, 1, "one reset, however many NACKs");
        assert!(enc.store() == dec.store());
        // After the reset the pair builds a shared dictionary again: no more NACKs.
        let more = html_records(300_000, 6);
        let r = run_link(&mut enc, &mut dec, &[&more, &more], &[0], 4096).unwrap();
        assert_eq!(r.output, [&more[..], &more[..]].concat());
        assert!(r.nacks.is_empty());
        assert!(enc.stats().references > 0);
        assert!(enc.store() == dec.store());
    }
}

#[test]
fn nacks_answered_piece_by_piece_also_recover() {
    let data = html_records(300_000, 9);
    let mut enc = warm_encoder(&data, EncoderConfig { zstd: true, ..EncoderConfig::default() });
    let mut dec = Decoder::new(Store::new(BUDGET), DecoderConfig::default());
    let pieces: Vec<&[u8]> = data.chunks(10_000).collect();
    let r = run_link(&mut enc, &mut dec, &pieces, &[3, 7], 333).unwrap();
    assert_eq!(r.output, data);
    assert!(enc.store() == dec.store());
}

#[test]
fn an_unrepairable_chunk_aborts_the_stream() {
    let data = html_records(200_000, 3);
    let cfg = EncoderConfig { repair_window: 0, ..EncoderConfig::default() };
    let mut enc = warm_encoder(&data, cfg);
    let mut dec = Decoder::new(Store::new(BUDGET), DecoderConfig::default());
    match run_link(&mut enc, &mut dec, &[&data], &[], 1 << 20) {
        // The Desync NACK reset the store; with no repair window the chunks are gone.
        Err((r, LinkError::Repair(RepairError::Unavailable(_)))) => {
            assert!(data.starts_with(&r.output));
        }
        other => panic!("expected an unrepairable chunk, got {other:?}"),
    }
    // handle_nack wrote ABORT: the decoder reports it instead of waiting forever.
    let mut wire = Vec::new();
    let mut enc = warm_encoder(&data, cfg);
    enc.encode(&data, &mut wire);
    enc.flush(&mut wire);
    let mut dec = Decoder::new(Store::new(BUDGET), DecoderConfig::default());
    let mut out = Vec::new();
    dec.decode(&wire, &mut out).unwrap();
    let mut failed = false;
    while let Some(Event::SendNack(n)) = dec.poll_event() {
        let mut back = Vec::new();
        failed |= enc.handle_nack(&n, &mut back).is_err();
        let r = dec.decode(&back, &mut out);
        if failed {
            assert_eq!(r, Err(DecodeError::Aborted { reason: 1 }));
            break;
        }
    }
    assert!(failed);
    assert!(data.starts_with(&out));
}

#[test]
fn waiting_for_a_repair_is_bounded() {
    let data = html_records(2_000_000, 4);
    let mut enc = warm_encoder(&data, EncoderConfig::default());
    let mut wire = Vec::new();
    enc.encode(&data, &mut wire);
    enc.flush(&mut wire);
    let mut dec = Decoder::new(Store::new(BUDGET), DecoderConfig { max_pending: 4096, ..DecoderConfig::default() });
    let mut out = Vec::new();
    // Nobody answers the NACKs: the decoder holds at most max_pending bytes, then fails.
    let r = wire.chunks(1000).try_for_each(|piece| dec.decode(piece, &mut out));
    assert_eq!(r, Err(DecodeError::PendingOverflow { limit: 4096 }));
    assert!(out.is_empty());
}

#[test]
fn nacks_travel_in_the_reverse_stream() {
    // A (downstream) and B (upstream), each with an encoder for its direction and a decoder
    // for the other. B's decoder starts empty while A's encoder remembers an earlier life.
    let down = html_records(250_000, 11);
    let up = html_records(120_000, 12);
    let mut a_enc = warm_encoder(&down, EncoderConfig::default());
    let mut a_dec = Decoder::new(Store::new(BUDGET), DecoderConfig::default());
    let mut b_enc = Encoder::new(Store::new(BUDGET), EncoderConfig::default()).unwrap();
    let mut b_dec = Decoder::new(Store::new(BUDGET), DecoderConfig::default());
    let (mut fwd, mut rev) = (Vec::new(), Vec::new());
    let (mut b_out, mut a_out) = (Vec::new(), Vec::new());
    a_enc.encode(&down, &mut fwd);
    a_enc.flush(&mut fwd);
    b_enc.encode(&up, &mut rev);
    b_enc.flush(&mut rev);
    let (mut fwd_sent, mut rev_sent) = (0, 0);
    for _round in 0..10 {
        b_dec.decode(&fwd[fwd_sent..], &mut b_out).unwrap();
        fwd_sent = fwd.len();
        while let Some(ev) = b_dec.poll_event() {
            match ev {
                Event::SendNack(n) => b_enc.send_nack(&n, &mut rev),
                Event::NackReceived(_) => unreachable!("A sends no NACKs here"),
            }
        }
        a_dec.decode(&rev[rev_sent..], &mut a_out).unwrap();
        rev_sent = rev.len();
        while let Some(ev) = a_dec.poll_event() {
            match ev {
                Event::NackReceived(n) => a_enc.handle_nack(&n, &mut fwd).unwrap(),
                Event::SendNack(n) => panic!("A's decoder disagreed: {n:?}"),
            }
        }
        if fwd_sent == fwd.len() && rev_sent == rev.len() {
            break;
        }
    }
    assert_eq!(b_out, down);
    assert_eq!(a_out, up);
    b_dec.finish().unwrap();
    a_dec.finish().unwrap();
    assert!(a_enc.store() == b_dec.store());
    assert!(b_enc.store() == a_dec.store());
    assert!(a_dec.stats().nacks_received > 0);
}

#[test]
fn saved_dictionaries_resume_without_a_nack() {
    let dir = std::env::temp_dir().join(format!("lb-codec-recovery-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let data = html_records(500_000, 21);
    let (mut enc, mut dec) = pair(BUDGET, EncoderConfig::default());
    run_link(&mut enc, &mut dec, &[&data], &[], 8192).unwrap();
    enc.store().save(dir.join("down.dict")).unwrap();
    dec.store().save(dir.join("up.dict")).unwrap();
    let stale_up = dec.store().clone();

    // Both restart from their files: the pair goes on where it was.
    let mut enc = Encoder::new(Store::load(dir.join("down.dict")).unwrap(), EncoderConfig::default()).unwrap();
    let mut dec = Decoder::new(Store::load(dir.join("up.dict")).unwrap(), DecoderConfig::default());
    let r = run_link(&mut enc, &mut dec, &[&data], &[], 8192).unwrap();
    assert_eq!(r.output, data);
    assert!(r.nacks.is_empty());
    assert!(r.wire_bytes < data.len() / 100, "{} bytes on the wire", r.wire_bytes);

    // The upstream comes back with an older dictionary: detected by the digest, repaired.
    let newer = html_records(200_000, 22);
    run_link(&mut enc, &mut dec, &[&newer], &[], 8192).unwrap();
    let mut dec = Decoder::new(stale_up, DecoderConfig::default());
    let mut enc = Encoder::new(enc.into_store(), EncoderConfig::default()).unwrap();
    let r = run_link(&mut enc, &mut dec, &[&newer, &data], &[], 8192).unwrap();
    assert_eq!(r.output, [&newer[..], &data[..]].concat());
    assert!(!r.nacks.is_empty());
    assert!(enc.store() == dec.store());
    std::fs::remove_dir_all(&dir).unwrap();
}

proptest! {
    #![proptest_config(ProptestConfig { cases: common::cases(48), ..ProptestConfig::default() })]

    /// A pair runs several streams over shared dictionaries; before one of them the upstream
    /// loses state (restart from an old snapshot or from nothing). With small budgets, chunks
    /// are evicted on both sides in between. Output stays exact and lockstep comes back.
    #[test]
    fn random_desync_is_always_repaired(
        seed in any::<u64>(),
        budget in 4_000u64..40_000,
        streams in 2usize..6,
        lose_before in 1usize..6,
        from_nothing in any::<bool>(),
        zstd in any::<bool>(),
    ) {
        let mut rng = Rng(seed);
        let pool: Vec<Vec<u8>> = (0..6).map(|_| { let n = 200 + rng.below(5000) as usize; rng.bytes(n) }).collect();
        let cfg = EncoderConfig { chunker: SMALL_CHUNKS, zstd, ..EncoderConfig::default() };
        let (mut enc, mut dec) = pair(budget, cfg);
        let mut snapshot = dec.store().clone();
        for s in 0..streams {
            let parts: Vec<&[u8]> = (0..1 + rng.below(8)).map(|_| &pool[rng.below(6) as usize][..]).collect();
            let expected = parts.concat();
            let mut enc_store = enc.into_store();
            let mut dec_store = dec.into_store();
            if s == lose_before {
                dec_store = if from_nothing { Store::new(budget) } else { snapshot.clone() };
            }
            snapshot = dec_store.clone();
            enc = Encoder::new(std::mem::replace(&mut enc_store, Store::new(1)), cfg).unwrap();
            dec = Decoder::new(dec_store, DecoderConfig::default());
            let split = 1 + rng.below(3000) as usize;
            // Soft flushes at random points (mid-chunk: carried references to chunks the
            // decoder may have lost), hard ones after pieces 0 and 2.
            let cuts: Vec<usize> = (0..rng.below(10)).map(|_| rng.next() as usize).collect();
            let pieces = split_at(&expected, &cuts);
            let soft: Vec<usize> = (0..pieces.len()).filter(|_| rng.below(3) != 0).collect();
            let r = run_link_soft(&mut enc, &mut dec, &pieces, &[0, 2], &soft, split)
                .map_err(|(_, e)| format!("{e:?}"));
            let r = r.map_err(TestCaseError::fail)?;
            prop_assert!(r.output == expected, "stream {} differs", s);
            prop_assert!(enc.store() == dec.store(), "stream {} ends out of lockstep", s);
        }
    }
}
