//! The dictionary decoder on arbitrary bytes, split at arbitrary points: never panics, and
//! whatever it outputs for a stream made by a real encoder is a prefix of that encoder's
//! input (corrupted or not).
#![no_main]

use dictionary_affinity::{Decoder, DecoderConfig, Encoder, EncoderConfig, Store};
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
        let mut e = Encoder::new(Store::new(1 << 20), EncoderConfig::default()).expect("default config is valid");
        let mut wire = Vec::new();
        e.encode(rest, &mut wire);
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
