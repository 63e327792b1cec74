//! The redundancy-elimination codec between chained proxies (`dictionary-affinity`).
//!
//! Targets (DESIGN.md): chunking + fingerprint >= 1.5 GB/s per core (anchor: FastCDC);
//! repeated content >= 99% of the bytes saved. Encode and decode are measured on repeated
//! content (warm dictionary) and on fresh content (empty dictionary), next to zstd level 1 on
//! the same input. The input is 16 MiB of generated HTML-like records (fixed markup, random
//! words, ids, prices and dates); the savings are printed to stderr.
//!
//! The `shared dictionary` group runs 16 concurrent streams of one pair on its shared
//! dictionaries (docs/codec.md section 3.2), interleaved read by read, against the same bytes
//! as one stream on the pair's own dictionaries, in the same run.
//!
//! `cargo bench -p benches --bench codec_dict`

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use dictionary_affinity::chunk::{ChunkId, Chunker};
use dictionary_affinity::sample::{html_records, Rng};
use dictionary_affinity::{Decoder, DecoderConfig, Encoder, EncoderConfig, SharedStore, Store};

const SIZE: usize = 16 << 20;
const BUDGET: u64 = 64 << 20;
/// The encoder is fed as from a socket, in 64 KiB reads.
const READ: usize = 64 * 1024;

fn encode_all(enc: &mut Encoder, data: &[u8], out: &mut Vec<u8>) {
    for piece in data.chunks(READ) {
        enc.encode(piece, out);
    }
    enc.flush(out);
}

fn chunking(c: &mut Criterion) {
    let html = html_records(SIZE, 1);
    let mut rng = Rng(2);
    let random: Vec<u8> = (0..SIZE).map(|_| rng.next() as u8).collect();
    let chunker = Chunker::default();
    let mut g = c.benchmark_group("chunking");
    g.throughput(Throughput::Bytes(SIZE as u64));
    g.sample_size(20);
    g.bench_function("xxh3-128 of 8 KiB pieces alone, html (target: n/a)", |b| {
        b.iter(|| black_box(&html).chunks(8192).fold(0u128, |acc, ch| acc ^ ChunkId::of(ch).0))
    });
    for (name, data) in [("html", &html), ("random", &random)] {
        g.bench_function(format!("FastCDC 2/8/32 KiB cut points, {name} (target: n/a)"), |b| {
            b.iter(|| chunker.chunks(black_box(data)).count())
        });
        g.bench_function(format!("FastCDC 2/8/32 KiB + xxh3-128 ids, {name} (target >= 1.5 GB/s per core)"), |b| {
            b.iter(|| chunker.chunks(black_box(data)).fold(0u128, |acc, ch| acc ^ ChunkId::of(ch).0))
        });
    }
    g.finish();
}

fn codec(c: &mut Criterion) {
    let data = html_records(SIZE, 3);
    let plain = EncoderConfig::default();
    let with_zstd = EncoderConfig { zstd: true, ..plain };

    // Pass 1 through a fresh pair, then pass 2 of the same content: what the wire carries.
    let mut enc = Encoder::new(Store::new(BUDGET), plain).unwrap();
    let mut dec = Decoder::new(Store::new(BUDGET), DecoderConfig::default());
    let mut fresh_stream = Vec::new();
    encode_all(&mut enc, &data, &mut fresh_stream);
    dec.decode(&fresh_stream, &mut Vec::new()).unwrap();
    let (enc_warm, dec_warm) = (enc.store().clone(), dec.store().clone());
    let mut repeated_stream = Vec::new();
    encode_all(&mut Encoder::new(enc_warm.clone(), plain).unwrap(), &data, &mut repeated_stream);
    let mut zstd_fresh_stream = Vec::new();
    encode_all(&mut Encoder::new(Store::new(BUDGET), with_zstd).unwrap(), &data, &mut zstd_fresh_stream);
    let zstd1 = zstd::bulk::compress(&data, 1).unwrap();
    let pct = |n: usize| 100.0 * n as f64 / SIZE as f64;
    eprintln!(
        "codec_dict: {} MiB of HTML-like records; fresh pass {} B ({:.2}%), fresh pass with zstd-1 literals {} B ({:.2}%), zstd-1 alone {} B ({:.2}%)",
        SIZE >> 20,
        fresh_stream.len(),
        pct(fresh_stream.len()),
        zstd_fresh_stream.len(),
        pct(zstd_fresh_stream.len()),
        zstd1.len(),
        pct(zstd1.len()),
    );
    eprintln!(
        "codec_dict: repeated pass {} B on the wire for {} B: {:.3}% saved (target >= 99%)",
        repeated_stream.len(),
        SIZE,
        100.0 - pct(repeated_stream.len())
    );

    let mut g = c.benchmark_group("encode");
    g.throughput(Throughput::Bytes(SIZE as u64));
    g.sample_size(10);
    let mut out = Vec::with_capacity(SIZE + SIZE / 8);
    g.bench_function("repeated content, warm dictionary (target: >= 99% saved)", |b| {
        let mut enc = Encoder::new(enc_warm.clone(), plain).unwrap();
        b.iter(|| {
            out.clear();
            encode_all(&mut enc, black_box(&data), &mut out);
            out.len()
        })
    });
    for (name, cfg) in [("", plain), (" + zstd-1 bodies", with_zstd)] {
        g.bench_function(format!("fresh content, empty dictionary{name} (target: n/a, compare zstd-1)"), |b| {
            b.iter_batched_ref(
                || (Encoder::new(Store::new(BUDGET), cfg).unwrap(), Vec::with_capacity(SIZE + SIZE / 8)),
                |(enc, out)| {
                    encode_all(enc, black_box(&data), out);
                    out.len()
                },
                BatchSize::PerIteration,
            )
        });
    }
    g.bench_function("zstd level 1, one shot (reference)", |b| {
        let mut z = zstd::bulk::Compressor::new(1).unwrap();
        b.iter(|| z.compress(black_box(&data)).unwrap().len())
    });
    g.finish();

    let mut g = c.benchmark_group("decode");
    g.throughput(Throughput::Bytes(SIZE as u64));
    g.sample_size(10);
    let streams = [
        ("repeated content, warm dictionary (target: n/a)", &repeated_stream, dec_warm.clone()),
        ("fresh content, empty dictionary (target: n/a, compare zstd-1)", &fresh_stream, Store::new(BUDGET)),
        ("fresh content, empty dictionary + zstd-1 bodies (target: n/a)", &zstd_fresh_stream, Store::new(BUDGET)),
    ];
    for (name, stream, store) in streams {
        g.bench_function(name, |b| {
            b.iter_batched_ref(
                || (Decoder::new(store.clone(), DecoderConfig::default()), Vec::with_capacity(SIZE)),
                |(dec, out)| {
                    for piece in stream.chunks(READ) {
                        dec.decode(black_box(piece), out).unwrap();
                    }
                    assert_eq!(out.len(), SIZE);
                    out.len()
                },
                BatchSize::PerIteration,
            )
        });
    }
    g.bench_function("zstd level 1, one shot (reference)", |b| {
        let mut z = zstd::bulk::Decompressor::new().unwrap();
        b.iter(|| z.decompress(black_box(&zstd1), SIZE).unwrap().len())
    });
    g.finish();
}

/// Encode + decode of repeated content (warm dictionaries): one stream of 16 MiB on the pair's
/// own stores, against 16 streams of 1 MiB each on the pair's shared stores, interleaved one
/// 64 KiB read at a time (one thread: what sharing costs per byte, locks included).
fn shared(c: &mut Criterion) {
    const STREAMS: usize = 16;
    let data = html_records(SIZE, 5);
    let config = EncoderConfig::default();
    let slice = SIZE / STREAMS;
    // Warm both kinds of dictionaries with one pass.
    let (mut enc, mut dec) =
        (Encoder::new(Store::new(BUDGET), config).unwrap(), Decoder::new(Store::new(BUDGET), DecoderConfig::default()));
    let mut wire = Vec::new();
    encode_all(&mut enc, &data, &mut wire);
    dec.decode(&wire, &mut Vec::new()).unwrap();
    let (own_enc, own_dec) = (enc.into_store(), dec.into_store());
    let (shared_enc, shared_dec) = (SharedStore::new(own_enc.clone()), SharedStore::new(own_dec.clone()));

    let mut g = c.benchmark_group("shared dictionary");
    g.throughput(Throughput::Bytes(SIZE as u64));
    g.sample_size(10);
    g.bench_function("1 stream, own dictionaries, encode+decode, repeated content (baseline)", |b| {
        b.iter_batched_ref(
            || {
                (
                    Encoder::new(own_enc.clone(), config).unwrap(),
                    Decoder::new(own_dec.clone(), DecoderConfig::default()),
                    Vec::with_capacity(SIZE),
                )
            },
            |(enc, dec, out)| {
                let mut wire = Vec::new();
                for piece in black_box(&data).chunks(READ) {
                    enc.encode(piece, &mut wire);
                    dec.decode(&wire, out).unwrap();
                    wire.clear();
                }
                enc.flush(&mut wire);
                dec.decode(&wire, out).unwrap();
                assert_eq!(out.len(), SIZE);
            },
            BatchSize::PerIteration,
        )
    });
    g.bench_function("16 streams at once, shared dictionaries, encode+decode, repeated content", |b| {
        b.iter_batched_ref(
            || {
                (0..STREAMS)
                    .map(|_| {
                        (
                            Encoder::shared(shared_enc.clone(), config).unwrap(),
                            Decoder::shared(shared_dec.clone(), DecoderConfig::default()),
                            Vec::with_capacity(slice),
                        )
                    })
                    .collect::<Vec<_>>()
            },
            |streams| {
                let mut wire = Vec::new();
                for round in 0..slice.div_ceil(READ) {
                    for (i, (enc, dec, out)) in streams.iter_mut().enumerate() {
                        let start = i * slice + round * READ;
                        let end = (start + READ).min((i + 1) * slice);
                        enc.encode(black_box(&data[start..end]), &mut wire);
                        dec.decode(&wire, out).unwrap();
                        wire.clear();
                    }
                }
                for (enc, dec, out) in streams.iter_mut() {
                    enc.flush(&mut wire);
                    dec.decode(&wire, out).unwrap();
                    wire.clear();
                    assert_eq!(dec.waiting_for(), None);
                    assert_eq!(out.len(), slice);
                }
            },
            BatchSize::PerIteration,
        )
    });
    g.finish();
}

criterion_group!(benches, chunking, codec, shared);
criterion_main!(benches);
