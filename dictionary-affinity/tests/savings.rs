//! Savings on repeated content (DESIGN.md target: >= 99% of the bytes saved): the same 10 MiB
//! of HTML-like records sent twice, the second pass must cost <= 1% of its input.

mod common;

use common::{html_records, pair};
use dictionary_affinity::EncoderConfig;

const SIZE: usize = 10 << 20;

fn second_pass_cost(zstd: bool) {
    let data = html_records(SIZE, 2024);
    let (mut enc, mut dec) = pair(64 << 20, EncoderConfig { zstd, ..EncoderConfig::default() });
    let mut out = Vec::with_capacity(2 * SIZE);
    let mut wire_per_pass = Vec::new();
    for _pass in 0..2 {
        let mut wire = Vec::new();
        // The stream arrives in 64 KiB reads, as from a socket.
        for piece in data.chunks(64 * 1024) {
            enc.encode(piece, &mut wire);
        }
        enc.flush(&mut wire);
        for piece in wire.chunks(16 * 1024) {
            dec.decode(piece, &mut out).unwrap();
        }
        wire_per_pass.push(wire.len());
    }
    dec.finish().unwrap();
    assert!(dec.poll_event().is_none());
    assert!(out[..SIZE] == data[..] && out[SIZE..] == data[..], "round trip");
    let (first, second) = (wire_per_pass[0], wire_per_pass[1]);
    let saved = 1.0 - second as f64 / SIZE as f64;
    println!(
        "zstd={zstd}: first pass {first} B ({:.1}% of input), second pass {second} B: {:.3}% saved",
        100.0 * first as f64 / SIZE as f64,
        100.0 * saved
    );
    assert!(second * 100 <= SIZE, "second pass cost {second} B for {SIZE} B");
    assert!(enc.store() == dec.store());
}

#[test]
fn repeated_10_mib_costs_at_most_1_percent() {
    second_pass_cost(false);
}

#[test]
fn repeated_10_mib_with_zstd_literals() {
    second_pass_cost(true);
}

/// Both passes paused at random points, as a proxy's 2 ms quiet-input flush does (about 160
/// pauses per pass here, so mid-chunk more often than not): with `flush_soft` the second pass
/// still costs <= 1% of its input; the hard `flush` at the same points is printed for
/// comparison (it moves chunk boundaries, so the pauses of the second pass miss).
#[test]
fn repeated_10_mib_with_pauses_at_random_points() {
    let data = html_records(SIZE, 2024);
    let mut results = Vec::new();
    for soft in [false, true] {
        let (mut enc, mut dec) = pair(64 << 20, EncoderConfig::default());
        let mut out = Vec::with_capacity(2 * SIZE);
        let mut wire_per_pass = Vec::new();
        let mut rng = common::Rng(7);
        for _pass in 0..2 {
            let mut wire = Vec::new();
            let mut at = 0;
            while at < SIZE {
                let n = (1 + rng.below(128 * 1024) as usize).min(SIZE - at);
                enc.encode(&data[at..at + n], &mut wire);
                at += n;
                if soft {
                    enc.flush_soft(&mut wire);
                } else {
                    enc.flush(&mut wire);
                }
            }
            enc.flush(&mut wire);
            dec.decode(&wire, &mut out).unwrap();
            wire_per_pass.push(wire.len());
        }
        dec.finish().unwrap();
        assert!(dec.poll_event().is_none());
        assert!(out[..SIZE] == data[..] && out[SIZE..] == data[..], "round trip");
        assert!(enc.store() == dec.store());
        let second = wire_per_pass[1];
        println!(
            "{} flushes at random points: first pass {} B, second pass {second} B ({:.3}% of input)",
            if soft { "soft" } else { "hard" },
            wire_per_pass[0],
            100.0 * second as f64 / SIZE as f64
        );
        results.push(second);
    }
    assert!(results[1] * 100 <= SIZE, "second pass with soft flushes cost {} B for {SIZE} B", results[1]);
}
