//! Soak test, run by hand (not in CI): N members in one process on 127.0.0.x with continuous
//! churn (installs and removes at every member, a member restarted now and then), for a
//! bounded time. Every 10 s it pauses the churn, waits for convergence (identical digests),
//! and prints the time that took, the entries and the process's resident memory.
//!
//!     cargo run --release -p lb --example soak -- [minutes=10] [members=5]

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cluster_proto::mesh::{Mesh, MeshConfig, NoObserver, Retries};
use cluster_proto::session::SessionConfig;
use cluster_proto::{Action, Connection, Protocol};

/// Connections each member keeps.
const WINDOW: u64 = 50_000;

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

fn conn(owner: usize, i: u64) -> Connection {
    let src = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(192, 0, 2, owner as u8)), 1024 + (i % 60_000) as u16);
    let dst = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(198, 51, 100, ((i / 60_000) % 250) as u8)), 443);
    Connection::new(Protocol::Tcp, src, dst).expect("one family")
}

async fn start(addr: IpAddr, port: u16, addrs: &[IpAddr]) -> Mesh {
    let s = SessionConfig { version: 1, keepalive: Duration::from_millis(500), dead_after: 3, restart_time: 0 };
    loop {
        match Mesh::start(MeshConfig::uniform(addr, port, addrs, s, Retries::Infinite), Arc::new(NoObserver)).await {
            Ok(m) => return m,
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args: Vec<u64> = std::env::args().skip(1).filter_map(|a| a.parse().ok()).collect();
    let minutes = args.first().copied().unwrap_or(10).clamp(1, 120);
    let n = args.get(1).copied().unwrap_or(5).clamp(2, 20) as usize;
    let port = std::net::TcpListener::bind("127.0.0.1:0").expect("port").local_addr().expect("addr").port();
    let addrs: Vec<IpAddr> = (1..=n as u8).map(|i| IpAddr::V4(Ipv4Addr::new(127, 0, 0, 200 + i))).collect();
    let mut ms = Vec::new();
    for &a in &addrs {
        ms.push(start(a, port, &addrs).await);
    }
    println!("soak: {n} members, {minutes} min, churn at every member, a restart every minute");
    let end = Instant::now() + Duration::from_secs(minutes * 60);
    let mut next = vec![0u64; n];
    let mut round = 0u64;
    while Instant::now() < end {
        // 10 s of churn: about 2 k installs and 2 k removes per second at each member.
        let until = Instant::now() + Duration::from_secs(10);
        while Instant::now() < until {
            for (k, m) in ms.iter().enumerate() {
                // A rolling window: each member keeps its newest WINDOW connections.
                for _ in 0..20 {
                    m.install(conn(k + 1, next[k]), Action::Forward);
                    if next[k] >= WINDOW {
                        m.remove(&conn(k + 1, next[k] - WINDOW));
                    }
                    next[k] += 1;
                }
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        round += 1;
        if round % 6 == 0 {
            let k = (round / 6) as usize % n;
            ms[k].kill();
            ms[k] = start(addrs[k], port, &addrs).await;
            next[k] = 0;
            println!("  restarted {} (its connections are gone, as after a crash)", addrs[k]);
        }
        let t0 = Instant::now();
        let total = |ms: &[Mesh]| ms.iter().map(|m| m.local().len()).sum::<usize>();
        while !(ms.iter().all(|m| m.local().len() + m.database().len() == total(&ms))
            && ms.iter().all(|m| m.view_digest() == ms[0].view_digest()))
        {
            if t0.elapsed() > Duration::from_secs(30) {
                println!("  NOT converged after 30 s");
                std::process::exit(1);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        println!(
            "  t={:>4}s converged in {:>6.1} ms, {:>8} entries per member, RSS {:>7} KiB",
            (end - Instant::now()).as_secs().abs_diff(minutes * 60),
            t0.elapsed().as_secs_f64() * 1e3,
            total(&ms),
            rss_kib()
        );
    }
    for m in &ms {
        m.shutdown(Duration::from_secs(1)).await;
    }
    println!("soak: done, every round converged");
}
