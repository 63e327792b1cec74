//! Chained proxies against a plain relay, in the same run (issue 9, Deliver 5).
//!
//! Two hops on loopback TCP, in one process with a 2-worker tokio runtime: client ->
//! downstream -> upstream -> server. Baseline: both hops are plain relays
//! (`tokio::io::copy_bidirectional`). Chained: the hops are `lb`'s chain roles
//! (`lb::chain::Chain::downstream` / `upstream`: HELLO, records, the codec both ways, shared
//! pair dictionaries). Target: chained throughput >= 0.8 x the plain relay's.
//!
//! - *repeated content*: one 16 MiB object of HTML-like records, downloaded again and again
//!   (warm dictionary: the link carries references);
//! - *fresh content*: 6 random 16 MiB objects in turn through a 64 MiB dictionary, so every
//!   download misses (LRU has evicted it): the link carries DEFINEs, the codec's worst case.
//!
//! No TPROXY or spoofing here (the hops connect to fixed addresses), so the figure is the
//! chain's user-space cost, not the kernel's.
//!
//! `cargo bench -p benches --bench chain_relay`

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use dictionary_affinity::sample::{html_records, Rng};
use lb::chain::{Chain, ChainConfig, Role};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const SIZE: usize = 16 << 20;
const FRESH: usize = 6;
const IDLE: Duration = Duration::from_secs(30);

/// Reads the one-byte index and the client's EOF, sends that object, closes.
async fn object_server(objects: Arc<Vec<Vec<u8>>>) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut c, _)) = l.accept().await {
            let objects = objects.clone();
            tokio::spawn(async move {
                let mut req = Vec::new();
                if c.read_to_end(&mut req).await.is_ok() && !req.is_empty() {
                    let _ = c.write_all(&objects[usize::from(req[0]) % objects.len()]).await;
                }
            });
        }
    });
    addr
}

/// A hop: accepts, connects to `next`, then relays plain (`chain` None) or runs its role.
async fn hop(chain: Option<Arc<Chain>>, next: SocketAddr) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut c, peer)) = l.accept().await {
            let chain = chain.clone();
            tokio::spawn(async move {
                let Ok(mut s) = TcpStream::connect(next).await else { return };
                let _ = c.set_nodelay(true);
                let _ = s.set_nodelay(true);
                match chain {
                    None => {
                        let _ = tokio::io::copy_bidirectional(&mut c, &mut s).await;
                    }
                    Some(ch) => {
                        let r = match ch.config().role {
                            Role::Downstream => ch.downstream(&mut c, &mut s, IDLE).await,
                            Role::Upstream => ch.upstream(&mut c, &mut s, peer, next, IDLE).await,
                        };
                        r.expect("chained connection");
                    }
                }
            });
        }
    });
    addr
}

async fn download(entry: SocketAddr, i: usize) -> usize {
    let mut c = TcpStream::connect(entry).await.unwrap();
    c.write_all(&[i as u8]).await.unwrap();
    c.shutdown().await.unwrap();
    let mut got = Vec::with_capacity(SIZE);
    c.read_to_end(&mut got).await.unwrap();
    assert_eq!(got.len(), SIZE);
    got.len()
}

fn config(role: Role, id: &str) -> ChainConfig {
    ChainConfig {
        role,
        chain_ports: vec![],
        detect: Duration::from_millis(300),
        hello_timeout: Duration::from_secs(5),
        budget: 64 << 20,
        dictionary_dir: None,
        id: id.into(),
        zstd: false,
        shared: true,
        max_pairs: 64,
        savings: None,
        codec_version: dictionary_affinity::codec::VERSION,
    }
}

fn relay(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let mut rng = Rng(9);
    let mut objects = vec![html_records(SIZE, 7)];
    objects.extend((0..FRESH).map(|_| rng.bytes(SIZE)));
    let objects = Arc::new(objects);
    let (plain, chained) = rt.block_on(async {
        let server = object_server(objects.clone()).await;
        let plain = hop(None, hop(None, server).await).await;
        let up = Chain::new(config(Role::Upstream, "bench-up"));
        let down = Chain::new(config(Role::Downstream, "bench-down"));
        let chained = hop(Some(down), hop(Some(up), server).await).await;
        // Warm the dictionaries with the repeated object.
        download(chained, 0).await;
        (plain, chained)
    });
    let mut g = c.benchmark_group("chain relay");
    g.throughput(Throughput::Bytes(SIZE as u64));
    g.sample_size(10);
    g.bench_function("plain relay, two hops (baseline)", |b| b.iter(|| rt.block_on(download(plain, 0))));
    g.bench_function("chained, two hops, repeated content (warm dictionary)", |b| {
        b.iter(|| rt.block_on(download(chained, 0)))
    });
    let mut next = 0;
    g.bench_function("chained, two hops, fresh content (every chunk a DEFINE)", |b| {
        b.iter(|| {
            next += 1;
            rt.block_on(download(chained, 1 + next % FRESH))
        })
    });
    g.finish();
}

criterion_group!(benches, relay);
criterion_main!(benches);
