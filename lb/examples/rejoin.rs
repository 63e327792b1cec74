//! Rejoin under big tables, run by hand (not in CI; docs/performance.md): two members own N
//! entries each, a third joins with the default timers (keepalive 1 s, dead after 3) and must hold
//! both tables with nobody declared dead. Prints how long that took and the longest silence
//! each member heard from each peer.
//!
//!     cargo run --release -p lb --example rejoin -- [entries_per_peer=4000000]

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cluster_proto::mesh::{Mesh, MeshConfig, NoObserver, Retries};
use cluster_proto::session::SessionConfig;
use cluster_proto::{Action, Connection, Protocol};

fn conn(owner: u8, i: usize) -> Connection {
    let src = SocketAddr::new(
        IpAddr::V4(Ipv4Addr::new(198, 18, owner, (i / 60_000 % 256) as u8)),
        1024 + (i % 60_000) as u16,
    );
    let dst = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(203, 0, 113, (i / 60_000 / 256) as u8)), 443);
    Connection::new(Protocol::Tcp, src, dst).unwrap()
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let n: usize = std::env::args().nth(1).map_or(4_000_000, |a| a.parse().expect("entries per peer"));
    let port = 27_400;
    let addrs: Vec<IpAddr> = (1..=3).map(|i| IpAddr::V4(Ipv4Addr::new(127, 0, 3, i))).collect();
    let cfg = |me| {
        let mut c = MeshConfig::uniform(me, port, &addrs, SessionConfig::default(), Retries::Infinite);
        c.send_queue = 1 << 23;
        c
    };
    let a = Mesh::start(cfg(addrs[0]), Arc::new(NoObserver)).await.unwrap();
    let c = Mesh::start(cfg(addrs[2]), Arc::new(NoObserver)).await.unwrap();
    let t0 = Instant::now();
    let (a2, c2) = (a.clone(), c.clone());
    tokio::task::spawn_blocking(move || {
        for i in 0..n {
            a2.install(conn(1, i), Action::Forward);
            c2.install(conn(3, i), Action::Forward);
        }
    })
    .await
    .unwrap();
    while a.database().len() < n || c.database().len() < n {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!("setup: two members with {n} entries each in {:.1} s", t0.elapsed().as_secs_f64());
    let base: Vec<u64> = [&a, &c].iter().flat_map(|m| m.peers().into_iter().map(|p| p.keepalive_timeouts)).collect();
    let t1 = Instant::now();
    let b = Mesh::start(cfg(addrs[1]), Arc::new(NoObserver)).await.unwrap();
    while b.database().len() < 2 * n {
        tokio::time::sleep(Duration::from_millis(20)).await;
        if t1.elapsed() > Duration::from_secs(120) {
            println!("gave up after 120 s: b holds {}", b.database().len());
            break;
        }
    }
    println!(
        "b holds both tables ({} entries) {:.2} s after it started",
        b.database().len(),
        t1.elapsed().as_secs_f64()
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    let now: Vec<u64> = [&a, &c].iter().flat_map(|m| m.peers().into_iter().map(|p| p.keepalive_timeouts)).collect();
    let deaths: u64 = now.iter().zip(&base).map(|(x, y)| x - y).sum::<u64>()
        + b.peers().iter().map(|p| p.keepalive_timeouts).sum::<u64>();
    for (name, m) in [("a", &a), ("b", &b), ("c", &c)] {
        for p in m.peers() {
            println!(
                "  {name} heard {} with at most {} ms of silence (channels lost: {})",
                p.address, p.max_silence_ms, p.channels_lost
            );
        }
    }
    println!("declared dead during the rejoin: {deaths}");
    for m in [a, b, c] {
        m.shutdown(Duration::from_secs(1)).await;
    }
}
