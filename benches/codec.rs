//! Control-message codec and decode+apply.
//!
//! Target (DESIGN.md): decode + apply INSTALL/REMOVE >= 5 M msgs/s per core (the paper's
//! worst case is ~150 k msgs/s per member).

use std::time::Instant;

use benches::connection;
use cluster_proto::session::{Admission, Event, Role, Session, SessionConfig};
use cluster_proto::{Action, ConnectionDatabase, MemberId, Message};
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};

const N: u32 = 100_000;

fn stream(n: u32, remove: bool) -> Vec<u8> {
    let mut v = Vec::with_capacity(n as usize * 16);
    for i in 0..n {
        let connection = connection(i);
        let m = if remove {
            Message::RemoveConnection { action: Action::Forward, connection }
        } else {
            Message::InstallConnection { action: Action::Forward, connection }
        };
        m.encode(&mut v);
    }
    v
}

fn codec(c: &mut Criterion) {
    let mut g = c.benchmark_group("codec");
    g.throughput(Throughput::Elements(N as u64));
    let msgs: Vec<Message> =
        (0..N).map(|i| Message::InstallConnection { action: Action::Forward, connection: connection(i) }).collect();
    g.bench_function("encode INSTALL v4 (target: n/a)", |b| {
        let mut out = Vec::with_capacity(N as usize * 16);
        b.iter(|| {
            out.clear();
            for m in &msgs {
                m.encode(&mut out);
            }
            out.len()
        })
    });
    let bytes = stream(N, false);
    g.bench_function("decode INSTALL v4 (target: n/a)", |b| {
        b.iter(|| {
            let mut at = 0;
            let mut n = 0;
            while let Ok(Some((_, len))) = Message::decode(&bytes[at..]) {
                at += len;
                n += 1;
            }
            n
        })
    });
    g.finish();
}

/// The receive path of a control channel: session decode, event, database install, then
/// the matching removes. Target: >= 5 M msgs/s per core.
fn decode_apply(c: &mut Criterion) {
    let mut g = c.benchmark_group("decode+apply");
    g.throughput(Throughput::Elements(2 * N as u64));
    let installs = stream(N, false);
    let removes = stream(N, true);
    let now = Instant::now();
    let joined = || {
        let mut s = Session::new(Role::Acceptor, Admission::Member, SessionConfig::default(), now);
        s.handle_bytes(now, &[3, 1, 1, 0]);
        s.poll_event();
        s.accept(now);
        s.poll_event();
        s
    };
    g.bench_function("session INSTALL+REMOVE into ConnectionDatabase (target >= 5 M msgs/s)", |b| {
        b.iter_batched(
            || (joined(), ConnectionDatabase::new()),
            |(mut s, db)| {
                for chunk in installs.chunks(64 * 1024).chain(removes.chunks(64 * 1024)) {
                    s.handle_bytes(now, chunk);
                    while let Some(e) = s.poll_event() {
                        match e {
                            Event::Install { action, connection } => {
                                db.install(&connection, MemberId(1), action);
                            }
                            Event::Remove { connection, .. } => {
                                db.remove(&connection, MemberId(1));
                            }
                            _ => {}
                        }
                    }
                }
                assert!(db.is_empty());
            },
            BatchSize::LargeInput,
        )
    });
    g.finish();
}

criterion_group!(benches, codec, decode_apply);
criterion_main!(benches);
