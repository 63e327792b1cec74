//! The packet path in memory.
//!
//! Targets (DESIGN.md): classify + encapsulate, 1 M flows, <= 100 ns per packet per core;
//! hold-queue release after an INSTALL arrives <= 100 us.

use std::hint::black_box;
use std::net::IpAddr;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

use benches::connection;
use cluster_proto::{Action, ConnectionDatabase, ConnectionTable, MemberId};
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use handoff::classify::{Classifier, Hook, View};
use handoff::encap::encapsulate;
use handoff::engine::{Engine, EngineConfig, Output};
use handoff::packet::parse;
use handoff::policy::LocalOnly;
use handoff::track::TrackConfig;

const FLOWS: u32 = 1_000_000;
const ME: MemberId = MemberId(0);
const LIVE: &[MemberId] = &[MemberId(0), MemberId(1), MemberId(2)];

/// A server's reply (ACK with 64 bytes of data) for flow `i`: the reply direction.
fn reply(i: u32) -> Vec<u8> {
    let c = connection(i);
    let (IpAddr::V4(s), IpAddr::V4(d)) = (c.dst().ip(), c.src().ip()) else { unreachable!() };
    let mut v = Vec::new();
    etherparse::PacketBuilder::ipv4(s.octets(), d.octets(), 64)
        .tcp(c.dst().port(), c.src().port(), 1000, 65000)
        .ack(1)
        .write(&mut v, &[0x5a; 64])
        .expect("builds");
    v
}

fn engine_config() -> EngineConfig {
    EngineConfig {
        address: "198.18.0.1".parse().expect("addr"),
        members: ["198.18.0.1", "198.18.0.2", "198.18.0.3"].iter().map(|a| a.parse().expect("addr")).collect(),
        hold_time: Duration::from_millis(200),
        hold_packets: 1 << 16,
        hold_bytes: 64 << 20,
        mtu: Some(1500),
        track: TrackConfig::default(),
    }
}

fn classify_encapsulate(c: &mut Criterion) {
    let local = ConnectionTable::new(ME);
    let db = ConnectionDatabase::new();
    for i in 0..FLOWS {
        db.install(&connection(i), MemberId(1 + (i % 2) as u8), Action::Forward);
    }
    // 64 k distinct packets spread over the million flows: the table is far bigger than the
    // caches, so most lookups miss them, as with real traffic over many flows.
    let packets: Vec<Vec<u8>> = (0..65_536u32).map(|k| reply(k.wrapping_mul(2_654_435_761) % FLOWS)).collect();
    let view = View { me: ME, local: &local, db: &db, live: LIVE };
    let mut classifier = Classifier::new(Box::new(LocalOnly), vec![], Duration::from_millis(200));
    let members: Vec<IpAddr> = engine_config().members;
    let src: IpAddr = members[0];
    let mut g = c.benchmark_group("packet path @1M flows");
    g.throughput(Throughput::Elements(1));
    let mut k = 0usize;
    let mut out = Vec::with_capacity(2048);
    let now = Instant::now();
    g.bench_function("parse + classify + encapsulate (target <= 100 ns)", |b| {
        b.iter(|| {
            k = (k + 1) & 0xffff;
            let p = &packets[k];
            let parsed = parse(p).expect("valid");
            let d = classifier.classify(&view, now, &parsed, Hook::Prerouting);
            if let handoff::classify::Verdict::Encapsulate { owner } = d.verdict {
                out.clear();
                encapsulate(p, src, members[owner.0 as usize], k as u16, &mut out).expect("fits");
            }
            black_box(out.len())
        })
    });
    // The same work in batches of 16: parse all, prefetch every entry, then classify and
    // encapsulate. This is how the driver works through what one poll(2) drained.
    g.throughput(Throughput::Elements(16));
    g.bench_function("batch of 16 with prefetch: parse + classify + encapsulate (target <= 100 ns/packet)", |b| {
        b.iter(|| {
            k = (k + 16) & 0xffff;
            let batch = &packets[k..(k + 16).min(packets.len())];
            let parsed: [_; 16] = std::array::from_fn(|j| batch.get(j).map(|p| parse(p).expect("valid")));
            if std::env::var_os("NO_PREFETCH").is_none() {
                for p in parsed.iter().flatten() {
                    if let handoff::packet::Parsed::Flow(f) = p {
                        db.prefetch(&f.connection);
                    }
                }
            }
            let mut bytes = 0;
            for (p, parsed) in batch.iter().zip(parsed.iter().flatten()) {
                let d = classifier.classify(&view, now, parsed, Hook::Prerouting);
                if let handoff::classify::Verdict::Encapsulate { owner } = d.verdict {
                    out.clear();
                    encapsulate(p, src, members[owner.0 as usize], k as u16, &mut out).expect("fits");
                    bytes += out.len();
                }
            }
            black_box(bytes)
        })
    });
    g.throughput(Throughput::Elements(1));
    g.bench_function("parse only", |b| {
        b.iter(|| {
            k = (k + 1) & 0xffff;
            black_box(parse(&packets[k]).expect("valid"))
        })
    });
    let mut engine: Engine<Vec<u8>> =
        Engine::new(engine_config(), Classifier::new(Box::new(LocalOnly), vec![], Duration::from_millis(200)));
    let mut outs = Vec::with_capacity(8);
    // As the driver does: the outer packet's buffer goes back to the engine once sent, so a
    // warm engine allocates nothing per packet (the input's clone is the bench's, outside).
    g.bench_function("Engine::handle (outer buffers recycled)", |b| {
        b.iter_batched(
            || {
                k = (k + 1) & 0xffff;
                packets[k].clone()
            },
            |p| {
                engine.handle(now, &view, p, Hook::Prerouting, &mut outs);
                let n = outs.len();
                for o in outs.drain(..) {
                    if let handoff::engine::Output::Send { outer, .. } = o {
                        engine.recycle(black_box(outer));
                    }
                }
                black_box(n)
            },
            BatchSize::SmallInput,
        )
    });
    g.finish();
}

/// From the mesh's install listener to the released packet: the listener (Waker-like:
/// queue the connection, write one byte), the data-plane thread waking from poll(2),
/// taking the queue, and the engine releasing and re-classifying the held packet.
fn hold_release(c: &mut Criterion) {
    let mut g = c.benchmark_group("hold release");
    g.throughput(Throughput::Elements(1));
    let local = ConnectionTable::new(ME);
    let db = ConnectionDatabase::new();
    let view = View { me: ME, local: &local, db: &db, live: LIVE };
    let mut engine: Engine<Vec<u8>> =
        Engine::new(engine_config(), Classifier::new(Box::new(LocalOnly), vec![], Duration::from_millis(200)));
    let now = Instant::now();
    let mut n = 0u32;
    g.bench_function("engine: INSTALL -> release + encapsulate", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                n += 1;
                let mut out = Vec::new();
                engine.handle(now, &view, reply(n), Hook::Prerouting, &mut out);
                assert!(out.is_empty(), "held");
                db.install(&connection(n), MemberId(1), Action::Forward);
                let t0 = Instant::now();
                engine.on_install(now, &view, &connection(n), &mut out);
                total += t0.elapsed();
                assert!(matches!(out.last(), Some(Output::Drop { .. })));
            }
            total
        })
    });

    // The wake-up: one thread blocks in poll(2) like the driver; the other plays the install
    // listener and measures until the release is reported back.
    let (tx, rx) = UnixDatagram::pair().expect("socketpair");
    let (done_tx, done_rx) = UnixDatagram::pair().expect("socketpair");
    let worker = std::thread::spawn(move || {
        let mut local_engine: Engine<Vec<u8>> =
            Engine::new(engine_config(), Classifier::new(Box::new(LocalOnly), vec![], Duration::from_millis(200)));
        let local = ConnectionTable::new(ME);
        let db = ConnectionDatabase::new();
        let view = View { me: ME, local: &local, db: &db, live: LIVE };
        let mut buf = [0u8; 8];
        let mut i = 0u32;
        loop {
            i += 1;
            let mut out = Vec::new();
            local_engine.handle(Instant::now(), &view, reply(i), Hook::Prerouting, &mut out);
            db.install(&connection(i), MemberId(1), Action::Forward);
            let mut pfd = libc::pollfd { fd: rx.as_raw_fd(), events: libc::POLLIN, revents: 0 };
            // SAFETY: one valid pollfd.
            unsafe { libc::poll(&mut pfd, 1, 10_000) };
            if rx.recv(&mut buf).map(|n| n == 1 && buf[0] == 0).unwrap_or(true) {
                return;
            }
            local_engine.on_install(Instant::now(), &view, &connection(i), &mut out);
            let _ = done_tx.send(&[out.len() as u8]);
        }
    });
    g.bench_function("listener -> driver wake-up -> release (target <= 100 us)", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            let mut r = [0u8; 8];
            for _ in 0..iters {
                std::thread::sleep(Duration::from_micros(50)); // let the worker block in poll
                let t0 = Instant::now();
                tx.send(&[1]).expect("wake");
                done_rx.recv(&mut r).expect("released");
                total += t0.elapsed();
            }
            total
        })
    });
    let _ = tx.send(&[0]);
    let _ = worker.join();
    g.finish();
}

criterion_group!(benches, classify_encapsulate, hold_release);
criterion_main!(benches);
