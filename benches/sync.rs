//! Full-table sync to a joining member over loopback.
//!
//! Target (DESIGN.md): 800,000 entries (the paper's 20 members x 20,000 connections x 2) in
//! <= 1 s. Measured from the joiner's start to the moment its database holds every entry.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use benches::connection;
use cluster_proto::mesh::{Mesh, MeshConfig, NoObserver, PeerState, Retries};
use cluster_proto::session::SessionConfig;
use cluster_proto::Action;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};

const ENTRIES: u32 = 800_000;

fn sync(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    let port = std::net::TcpListener::bind("127.0.0.1:0").expect("port").local_addr().expect("addr").port();
    let addrs = [IpAddr::V4(Ipv4Addr::new(127, 0, 0, 61)), IpAddr::V4(Ipv4Addr::new(127, 0, 0, 62))];
    let session = SessionConfig { version: 1, keepalive: Duration::from_secs(1), dead_after: 3, restart_time: 0 };
    let cfg = |me| {
        let mut m = MeshConfig::uniform(me, port, &addrs, session, Retries::Infinite);
        m.backoff_min = Duration::from_millis(5);
        m
    };
    let a = rt.block_on(async {
        let a = Mesh::start(cfg(addrs[0]), Arc::new(NoObserver)).await.expect("a");
        for i in 0..ENTRIES {
            a.install(connection(i), Action::Forward);
        }
        a
    });
    let mut g = c.benchmark_group("table sync");
    g.sample_size(10);
    g.throughput(Throughput::Elements(ENTRIES as u64));
    g.bench_function("800k entries to a joining member over loopback (target <= 1 s)", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                total += rt.block_on(async {
                    let t0 = Instant::now();
                    let b = Mesh::start(cfg(addrs[1]), Arc::new(NoObserver)).await.expect("b");
                    while b.database().len() < ENTRIES as usize {
                        tokio::time::sleep(Duration::from_micros(200)).await;
                    }
                    let took = t0.elapsed();
                    b.kill();
                    while a.peers()[0].state == PeerState::Established {
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                    // kill() only signals the tasks: wait (untimed) until the killed b's
                    // listener is gone, so the next b can bind its address.
                    while std::net::TcpListener::bind((addrs[1], port)).is_err() {
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                    took
                });
            }
            total
        })
    });
    g.finish();
}

criterion_group!(benches, sync);
criterion_main!(benches);
