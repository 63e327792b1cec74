//! The connection database at 1,000,000 entries.
//!
//! Targets (DESIGN.md): <= 32 bytes per IPv4 entry at 1 M entries (the paper's figure);
//! lookups are the packet path's first step (classify + encapsulate <= 100 ns per packet).

use std::hint::black_box;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use benches::connection;
use cluster_proto::{Action, ConnectionDatabase, MemberId};
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};

const ENTRIES: u32 = 1_000_000;

fn filled() -> ConnectionDatabase {
    let db = ConnectionDatabase::new();
    for i in 0..ENTRIES {
        db.install(&connection(i), MemberId((i % 20) as u8), Action::Forward);
    }
    db
}

fn database(c: &mut Criterion) {
    let db = filled();
    let bytes = db.memory_bytes();
    eprintln!(
        "database memory at {} IPv4 entries: {} bytes, {:.1} bytes per entry (target <= 32)",
        db.len(),
        bytes,
        bytes as f64 / db.len() as f64
    );
    let mut g = c.benchmark_group("database@1M");
    g.throughput(Throughput::Elements(1));
    let mut i = 0u32;
    g.bench_function("lookup hit, reply direction (target: part of <= 100 ns classify)", |b| {
        b.iter(|| {
            i = i.wrapping_add(7919) % ENTRIES;
            black_box(db.owner_of(&connection(i).reversed()))
        })
    });
    g.bench_function("lookup miss", |b| {
        b.iter(|| {
            i = i.wrapping_add(7919) % ENTRIES;
            black_box(db.owner_of(&connection(ENTRIES + i)))
        })
    });
    g.bench_function("install+remove of a new entry (target: >= 5 M msgs/s with decode)", |b| {
        b.iter(|| {
            i = i.wrapping_add(1);
            let c = connection(ENTRIES + (i % 1_000_000));
            db.install(&c, MemberId(3), Action::Forward);
            db.remove(&c, MemberId(3))
        })
    });
    // Readers never block on writers: lookups while another thread churns the same table.
    let db = Arc::new(db);
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (db, stop) = (db.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut k = 0u32;
            while !stop.load(Ordering::Relaxed) {
                let c = connection(2 * ENTRIES + (k % 100_000));
                db.install(&c, MemberId(4), Action::Forward);
                db.remove(&c, MemberId(4));
                k = k.wrapping_add(1);
            }
        })
    };
    g.bench_function("lookup hit with a concurrent writer", |b| {
        b.iter(|| {
            i = i.wrapping_add(7919) % ENTRIES;
            black_box(db.owner_of(&connection(i)))
        })
    });
    stop.store(true, Ordering::Relaxed);
    writer.join().expect("writer");
    g.finish();

    let mut g = c.benchmark_group("database fill");
    g.sample_size(10);
    g.throughput(Throughput::Elements(ENTRIES as u64));
    g.bench_function("insert 1 M entries from empty", |b| b.iter_batched(|| (), |_| filled(), BatchSize::PerIteration));
    g.bench_function("purge one owner's 50 k of 1 M", |b| {
        b.iter_batched(filled, |db| db.purge_owner(MemberId(5)), BatchSize::PerIteration)
    });
    g.finish();
}

criterion_group!(benches, database);
criterion_main!(benches);
