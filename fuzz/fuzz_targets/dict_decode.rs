//! The dictionary decoder on arbitrary bytes, split at arbitrary points: never panics, and
//! whatever it outputs for a stream made by a real encoder is a prefix of that encoder's
//! input (corrupted or not).
#![no_main]

use dictionary_affinity::{ChunkerConfig, Decoder, DecoderConfig, Encoder, EncoderConfig, Store};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    if mode & 1 == 0 {
        // Raw bytes as a stream.
        let mut d = Decoder::new(Store::new(1 << 20), DecoderConfig::default());
        let mut out = Vec::new();
        for piece in rest.chunks(1 + mode as usize % 64) {
            if d.decode(piece, &mut out).is_err() {
                break;
            }
            while d.poll_event().is_some() {}
        }
    } else {
        // A real stream of `rest`, with one byte flipped somewhere: the output must be a
        // prefix of the input, never different bytes.
        // Bit 1: small chunks and soft flushes every few hundred bytes, so the stream holds the
        // carried tokens (CARRY, CARRY_REF, DEFINE_CARRIED, REFERENCE_CARRIED, LITERAL_CARRIED).
        let soft = mode & 2 != 0;
        let config = if soft {
            EncoderConfig { chunker: ChunkerConfig { min: 64, avg: 256, max: 1024 }, ..EncoderConfig::default() }
        } else {
            EncoderConfig::default()
        };
        let mut e = Encoder::new(Store::new(1 << 20), config).expect("valid config");
        let mut wire = Vec::new();
        if soft {
            for piece in rest.chunks(37 + (mode as usize >> 2) * 13) {
                e.encode(piece, &mut wire);
                e.flush_soft(&mut wire);
            }
        } else {
            e.encode(rest, &mut wire);
        }
        e.flush(&mut wire);
        if !wire.is_empty() {
            let at = (mode as usize * 7919) % wire.len();
            wire[at] ^= 1 + (mode >> 1);
        }
        let mut d = Decoder::new(Store::new(1 << 20), DecoderConfig::default());
        let mut out = Vec::new();
        let _ = d.decode(&wire, &mut out);
        assert!(rest.starts_with(&out), "decoder produced bytes that were never sent");
    }
});
