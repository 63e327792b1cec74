//! Many concurrent streams of one pair on one shared dictionary per side (docs/codec.md
//! section 3.2): arbitrary interleavings of encoding, delivery, soft flushes, streams cut off
//! mid-way and wait bounds running out. Whatever every decoder outputs is a prefix of its
//! encoder's input, every stream that runs to its end comes out whole, and the misses (NACKs)
//! stay within what evictions, cut-off streams and expired waits explain.

mod common;

use common::{cases, Rng};
use dictionary_affinity::{ChunkerConfig, Decoder, DecoderConfig, Encoder, EncoderConfig, Event, SharedStore, Store};
use proptest::prelude::*;

/// Small chunks, so that a few hundred kilobytes make many chunks and evictions.
const CHUNKS: ChunkerConfig = ChunkerConfig { min: 256, avg: 1024, max: 4096 };

struct Stream {
    enc: Encoder,
    dec: Decoder,
    input: Vec<u8>,
    /// Input bytes given to the encoder so far.
    fed: usize,
    /// Encoded bytes not yet delivered to the decoder.
    wire: Vec<u8>,
    output: Vec<u8>,
    flushed: bool,
    /// Cut off: nothing more is encoded or delivered (a connection reset).
    cut: bool,
}

#[derive(Debug, Default)]
struct Totals {
    nacks: u64,
    expired_waits: u64,
    waited: u64,
    cut_defines: u64,
    decoder_evictions: u64,
    referenced: u64,
    wire: u64,
    input: u64,
}

/// Runs `streams` streams over one shared store per side; every choice comes from `seed`.
fn run(seed: u64, streams: usize, budget: u64, cut_chance: u64) -> Totals {
    let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    let corpus: Vec<Vec<u8>> = (0..10)
        .map(|_| {
            let n = 4_000 + rng.below(40_000) as usize;
            rng.bytes(n)
        })
        .collect();
    let enc_store = SharedStore::new(Store::new(budget));
    let dec_store = SharedStore::new(Store::new(budget));
    let config = EncoderConfig { chunker: CHUNKS, ..EncoderConfig::default() };
    let mut s: Vec<Stream> = (0..streams)
        .map(|_| {
            let mut input = Vec::new();
            for _ in 0..2 + rng.below(5) {
                input.extend_from_slice(&corpus[rng.below(corpus.len() as u64) as usize]);
                let gap = rng.below(200) as usize;
                input.extend_from_slice(&rng.bytes(gap));
            }
            Stream {
                enc: Encoder::shared(enc_store.clone(), config).unwrap(),
                dec: Decoder::shared(dec_store.clone(), DecoderConfig::default()),
                input,
                fed: 0,
                wire: Vec::new(),
                output: Vec::new(),
                flushed: false,
                cut: false,
            }
        })
        .collect();
    let mut t = Totals::default();
    let check_prefix = |st: &Stream| {
        assert!(st.input.starts_with(&st.output), "a decoder's output is not a prefix of its encoder's input");
    };
    // Delivers up to `n` wire bytes of stream `i`, hands its NACKs to its encoder.
    fn deliver(st: &mut Stream, n: usize, t: &mut Totals) {
        let n = n.min(st.wire.len());
        let bytes: Vec<u8> = st.wire.drain(..n).collect();
        st.dec.decode(&bytes, &mut st.output).expect("a shared stream decodes");
        while let Some(ev) = st.dec.poll_event() {
            match ev {
                Event::SendNack(nack) => {
                    t.nacks += 1;
                    st.enc.handle_nack(&nack, &mut st.wire).expect("the encoder still holds every NACKed chunk");
                }
                Event::NackReceived(_) => unreachable!("no reverse stream here"),
            }
        }
    }
    let mut steps = 0;
    loop {
        steps += 1;
        assert!(steps < 1_000_000, "the schedule does not end");
        let live: Vec<usize> = (0..streams)
            .filter(|&i| !s[i].cut && (s[i].fed < s[i].input.len() || !s[i].flushed || !s[i].wire.is_empty()))
            .collect();
        if live.is_empty() {
            // Everything delivered: a decoder still waiting waits for a stream that was cut.
            let waiting: Vec<usize> = (0..streams).filter(|&i| !s[i].cut && s[i].dec.waiting_for().is_some()).collect();
            if waiting.is_empty() {
                break;
            }
            for i in waiting {
                s[i].dec.fetch();
                t.expired_waits += 1;
                deliver(&mut s[i], 0, &mut t);
            }
            continue;
        }
        let i = live[rng.below(live.len() as u64) as usize];
        let st = &mut s[i];
        match rng.below(100) {
            r if r < cut_chance => {
                // The connection is reset: whatever it defined and did not deliver never arrives.
                st.cut = true;
                t.cut_defines += st.enc.stats().defines;
            }
            r if r < 45 && st.fed < st.input.len() => {
                let n = (1 + rng.below(6_000) as usize).min(st.input.len() - st.fed);
                let piece = st.input[st.fed..st.fed + n].to_vec();
                st.enc.encode(&piece, &mut st.wire);
                st.fed += n;
            }
            r if r < 55 && st.fed < st.input.len() => st.enc.flush_soft(&mut st.wire),
            r if r < 58 && st.dec.waiting_for().is_some() => {
                // The driver's wait bound ran out.
                st.dec.fetch();
                t.expired_waits += 1;
                deliver(st, 0, &mut t);
            }
            _ if st.fed == st.input.len() && !st.flushed => {
                st.enc.flush(&mut st.wire);
                st.flushed = true;
            }
            _ => {
                let n = 1 + rng.below(3_000) as usize;
                deliver(st, n, &mut t);
            }
        }
        check_prefix(&s[i]);
        // A chunk defined on one stream may unblock another: the driver retries on the
        // store's generation; here, every waiting decoder retries at once.
        for st in s.iter_mut().filter(|st| !st.cut && st.dec.waiting_for().is_some()) {
            deliver(st, 0, &mut t);
        }
    }
    for st in &mut s {
        check_prefix(st);
        if !st.cut {
            assert_eq!(st.dec.blocked_on(), None);
            st.dec.finish().expect("a whole stream finishes");
            assert!(st.output == st.input, "a stream that ran to its end comes out whole");
        }
        let (es, ds) = (st.enc.stats(), st.dec.stats());
        t.waited += ds.waited;
        t.referenced += es.referenced_bytes;
        t.wire += es.output_bytes;
        t.input += es.input_bytes;
    }
    t.decoder_evictions = dec_store.lock().stats().evictions;
    assert!(enc_store.lock().used() <= budget && dec_store.lock().used() <= budget);
    // Misses: a chunk evicted here and not there, a chunk whose DEFINE was on a stream cut
    // off, or a wait that ran out (its DEFINE may still have been on its way).
    assert!(
        t.nacks <= t.decoder_evictions + t.cut_defines + t.expired_waits,
        "misses beyond what evictions, cuts and expired waits explain: {t:?}"
    );
    t
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(cases(48)))]

    #[test]
    fn concurrent_streams_of_one_pair_never_produce_a_wrong_byte(
        seed in any::<u64>(),
        streams in 2usize..9,
        budget in prop_oneof![Just(48u64 << 10), Just(256u64 << 10), Just(64u64 << 20)],
        cut_chance in prop_oneof![Just(0u64), Just(1u64)],
    ) {
        run(seed, streams, budget, cut_chance);
    }
}

/// With room for everything and no stream cut off, concurrent streams of a pair miss
/// nothing: every reference to a chunk another stream defined is resolved by waiting for it
/// (no NACK, no REPAIR), and repeats cost a fraction of their bytes.
#[test]
fn streams_sharing_a_dictionary_wait_instead_of_missing() {
    let mut waited = 0;
    for seed in 1..=20 {
        let t = run(seed, 8, 64 << 20, 0);
        assert_eq!(t.nacks, t.expired_waits, "seed {seed}: only expired waits may cost a NACK: {t:?}");
        assert!(t.referenced > 0, "seed {seed}: streams drawing on one corpus share chunks");
        waited += t.waited;
    }
    assert!(waited > 0, "some references waited for a DEFINE still on its way");
}
