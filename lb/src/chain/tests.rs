//! The chain on loopback TCP: client -> downstream -> upstream -> toy server, no root needed.

use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dictionary_affinity::sample::Rng;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::*;

const OBJECTS: usize = 8;
const OBJECT: usize = 128 * 1024;
const WAIT: Duration = Duration::from_secs(20);

fn objects() -> Arc<Vec<Vec<u8>>> {
    let mut rng = Rng(0x5eed);
    Arc::new((0..OBJECTS).map(|_| rng.bytes(OBJECT)).collect())
}

fn config(role: Role, id: &str, dir: Option<PathBuf>, sink: Option<Arc<dyn SavingsSink>>) -> ChainConfig {
    ChainConfig {
        role,
        chain_ports: vec![],
        detect: Duration::from_millis(300),
        hello_timeout: Duration::from_secs(5),
        budget: 16 << 20,
        dictionary_dir: dir,
        id: id.into(),
        zstd: false,
        shared: true,
        max_pairs: 64,
        savings: sink,
        codec_version: dictionary_affinity::codec::VERSION,
    }
}

/// The object server: reads a one-byte index (and the client's EOF), sends that object,
/// closes. With `gate`, waits for `gate` connections to be open before answering any.
async fn object_server(objects: Arc<Vec<Vec<u8>>>, gate: Option<Arc<tokio::sync::Barrier>>) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let (objects, gate) = (objects.clone(), gate.clone());
            tokio::spawn(async move {
                let mut req = Vec::new();
                if s.read_to_end(&mut req).await.is_err() || req.is_empty() {
                    return;
                }
                if let Some(g) = gate {
                    g.wait().await;
                }
                let i = usize::from(req[0]) % objects.len();
                let _ = s.write_all(&objects[i]).await;
                let _ = s.shutdown().await;
            });
        }
    });
    addr
}

/// A proxy role on loopback: `upstream` connections go to `next`; errors reset both sockets.
async fn role(chain: Arc<Chain>, next: SocketAddr) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut c, peer)) = l.accept().await {
            let chain = chain.clone();
            tokio::spawn(async move {
                let Ok(mut s) = TcpStream::connect(next).await else { return };
                let r = match chain.config().role {
                    Role::Downstream => chain.downstream(&mut c, &mut s, WAIT).await,
                    Role::Upstream => chain.upstream(&mut c, &mut s, peer, next, WAIT).await,
                };
                if r.is_err() {
                    reset_on_close(&c);
                    reset_on_close(&s);
                }
            });
        }
    });
    addr
}

/// Sends the index, half-closes, reads to EOF (an error ends the read: what came is returned).
async fn fetch(proxy: SocketAddr, i: usize) -> Vec<u8> {
    let mut c = TcpStream::connect(proxy).await.unwrap();
    c.write_all(&[i as u8]).await.unwrap();
    c.shutdown().await.unwrap();
    let mut got = Vec::new();
    let _ = tokio::time::timeout(WAIT, c.read_to_end(&mut got)).await.expect("download ends");
    got
}

struct Rig {
    down: Arc<Chain>,
    up: Arc<Chain>,
    entry: SocketAddr,
}

async fn rig(objects: Arc<Vec<Vec<u8>>>, down: ChainConfig, up: ChainConfig) -> Rig {
    let server = object_server(objects, None).await;
    let (down, up) = (Chain::new(down), Chain::new(up));
    let u = role(up.clone(), server).await;
    let entry = role(down.clone(), u).await;
    Rig { down, up, entry }
}

/// Downloads every object once; the response bytes on the chain link during the round.
async fn round(rig: &Rig, objects: &[Vec<u8>]) -> u64 {
    let before = rig.down.stats.to_downstream_wire.load(Relaxed);
    for (i, want) in objects.iter().enumerate() {
        let got = fetch(rig.entry, i).await;
        assert!(got == *want, "object {i}: {} bytes, differs from the {} sent", got.len(), want.len());
    }
    rig.down.stats.to_downstream_wire.load(Relaxed) - before
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_downloads_cross_the_chain_as_references() {
    let objects = objects();
    let sink = Arc::new(Totals::default());
    let rig = rig(
        objects.clone(),
        config(Role::Downstream, "down-1", None, None),
        config(Role::Upstream, "up-1", None, Some(sink.clone())),
    )
    .await;
    let total = (OBJECTS * OBJECT) as u64;
    let first = round(&rig, &objects).await;
    let second = round(&rig, &objects).await;
    let third = round(&rig, &objects).await;
    eprintln!("wire per round: {first} / {second} / {third} of {total} object bytes");
    assert!(first as f64 > 0.95 * total as f64, "first pass is mostly new bytes: {first}");
    assert!(second as f64 <= 0.05 * total as f64, "repeat costs {second} of {total}");
    assert!(third as f64 <= 0.05 * total as f64, "repeat costs {third} of {total}");
    let (d, u) = (&rig.down.stats, &rig.up.stats);
    tokio::time::timeout(WAIT, async {
        while u.chained.load(Relaxed) < 3 * OBJECTS as u64 || d.chained.load(Relaxed) < 3 * OBJECTS as u64 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("both sides count every connection as chained");
    assert_eq!(d.failed.load(Relaxed) + u.failed.load(Relaxed), 0);
    assert_eq!(d.ephemeral.load(Relaxed) + u.ephemeral.load(Relaxed), 0, "sequential connections share the pair");
    assert_eq!(d.to_downstream_plain.load(Relaxed), 3 * total);
    assert_eq!(u.to_downstream_plain.load(Relaxed), 3 * total);
    assert!(d.dictionary_bytes.load(Relaxed) >= total, "the dictionary holds the objects");
    let saved = sink.total();
    assert!(saved >= 2 * total * 9 / 10, "upstream reported {saved} bytes saved");
    assert!(sink.pairs.lock().unwrap().iter().all(|(c, s)| c.ip().is_loopback() && s.port() != 0));
}

#[derive(Default)]
struct Totals {
    pairs: Mutex<Vec<(SocketAddr, SocketAddr)>>,
    saved: AtomicU64,
}

impl Totals {
    fn total(&self) -> u64 {
        self.saved.load(Relaxed)
    }
}

impl SavingsSink for Totals {
    fn record(&self, client: SocketAddr, server: SocketAddr, bytes_saved: u64) {
        self.pairs.lock().unwrap().push((client, server));
        self.saved.fetch_add(bytes_saved, Relaxed);
    }
}

/// Issue 9: two connections of one pair at once share the pair's dictionaries (both HELLOs
/// offer FLAG_SHARED). Before, the second ran on throwaway dictionaries and a repeat of both
/// cost a whole object.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_connections_of_one_pair_share_its_dictionaries() {
    let objects = objects();
    let gate = Arc::new(tokio::sync::Barrier::new(2));
    let server = object_server(objects.clone(), Some(gate)).await;
    let down = Chain::new(config(Role::Downstream, "down-c", None, None));
    let up = Chain::new(config(Role::Upstream, "up-c", None, None));
    let u = role(up.clone(), server).await;
    let entry = role(down.clone(), u).await;
    let (a, b) = tokio::join!(fetch(entry, 1), fetch(entry, 1));
    assert!(a == objects[1] && b == objects[1], "both concurrent downloads exact");
    let before = down.stats.to_downstream_wire.load(Relaxed);
    for _ in 0..3 {
        let (a, b) = tokio::join!(fetch(entry, 1), fetch(entry, 1));
        assert!(a == objects[1] && b == objects[1], "both concurrent downloads exact");
    }
    let spent = down.stats.to_downstream_wire.load(Relaxed) - before;
    assert_eq!(
        down.stats.ephemeral.load(Relaxed) + up.stats.ephemeral.load(Relaxed),
        0,
        "none on throwaway dictionaries"
    );
    assert_eq!((down.stats.shared.load(Relaxed), up.stats.shared.load(Relaxed)), (8, 8));
    assert!(spent < (6 * OBJECT as u64) / 20, "six warm downloads cost under 5% of their bytes: {spent}");
    assert_eq!(down.stats.failed.load(Relaxed) + up.stats.failed.load(Relaxed), 0);
    assert_eq!(down.stats.decode_errors.load(Relaxed) + up.stats.decode_errors.load(Relaxed), 0);
}

/// Issue 9: the HELLO negotiates the codec version. One end stands in for a build that decodes
/// only framing version 1 (`codec_version = 1`): the other writes version 1 to it, in both
/// directions, and the chain works and saves as before. Without the negotiation the newer end
/// wrote version 2 and every chained connection failed at the stream header
/// (`UnsupportedVersion(2)`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chain_half_upgraded_speaks_the_older_codec_version() {
    let objects = objects();
    let total = (OBJECTS * OBJECT) as u64;
    for old in [Role::Downstream, Role::Upstream] {
        let pin = |c: ChainConfig| if c.role == old { ChainConfig { codec_version: 1, ..c } } else { c };
        let rig = rig(
            objects.clone(),
            pin(config(Role::Downstream, "down-v", None, None)),
            pin(config(Role::Upstream, "up-v", None, None)),
        )
        .await;
        let first = round(&rig, &objects).await;
        let second = round(&rig, &objects).await;
        eprintln!("{old:?} on codec version 1: wire per round {first} / {second} of {total}");
        let (d, u) = (&rig.down.stats, &rig.up.stats);
        assert_eq!(d.failed.load(Relaxed) + u.failed.load(Relaxed), 0, "{old:?} old: no connection failed");
        assert_eq!(d.decode_errors.load(Relaxed) + u.decode_errors.load(Relaxed), 0);
        assert!(second as f64 <= 0.05 * total as f64, "{old:?} old: the repeat costs {second} of {total}");
        // Both ends wrote version 1 for every connection: the pinned one by its own limit, the
        // other because the HELLO said so.
        tokio::time::timeout(WAIT, async {
            while u.chained.load(Relaxed) < 2 * OBJECTS as u64 || d.chained.load(Relaxed) < 2 * OBJECTS as u64 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .expect("every connection chained");
        assert_eq!(d.older_codec.load(Relaxed), 2 * OBJECTS as u64);
        assert_eq!(u.older_codec.load(Relaxed), 2 * OBJECTS as u64);
    }
    // Two current ends write the current version.
    let rig = rig(
        objects.clone(),
        config(Role::Downstream, "down-n", None, None),
        config(Role::Upstream, "up-n", None, None),
    )
    .await;
    round(&rig, &objects).await;
    assert_eq!(rig.down.stats.older_codec.load(Relaxed) + rig.up.stats.older_codec.load(Relaxed), 0);
}

/// A peer that does not offer shared dictionaries (an older build, or `shared_dictionaries =
/// false`) gets the one-connection-at-a-time checkout: the second concurrent connection runs
/// on throwaway dictionaries, and both stay exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_connections_without_shared_dictionaries_are_both_exact() {
    let objects = objects();
    let gate = Arc::new(tokio::sync::Barrier::new(2));
    let server = object_server(objects.clone(), Some(gate)).await;
    let down = Chain::new(config(Role::Downstream, "down-o", None, None));
    let up = Chain::new(ChainConfig { shared: false, ..config(Role::Upstream, "up-o", None, None) });
    let u = role(up.clone(), server).await;
    let entry = role(down.clone(), u).await;
    for _ in 0..3 {
        let (a, b) = tokio::join!(fetch(entry, 1), fetch(entry, 1));
        assert!(a == objects[1] && b == objects[1], "both concurrent downloads exact");
    }
    // One of each concurrent pair of connections ran on throwaway dictionaries.
    assert!(down.stats.ephemeral.load(Relaxed) >= 3);
    assert_eq!(down.stats.shared.load(Relaxed), 0);
    assert_eq!(down.stats.failed.load(Relaxed), 0);
    // The pair's dictionaries still agree: a sequential repeat is nearly free.
    let before = down.stats.to_downstream_wire.load(Relaxed);
    // The server's gate needs two connections again.
    let (a, b) = tokio::join!(fetch(entry, 1), fetch(entry, 1));
    assert!(a == objects[1] && b == objects[1]);
    let spent = down.stats.to_downstream_wire.load(Relaxed) - before;
    assert!(spent < (OBJECT as u64) * 11 / 10, "one of the two rides the warm dictionary: {spent}");
    assert_eq!(down.stats.decode_errors.load(Relaxed) + up.stats.decode_errors.load(Relaxed), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_connections_pass_the_upstream_untouched_also_server_first() {
    let up = Chain::new(config(Role::Upstream, "up-p", None, None));
    // A server that speaks first, then echoes.
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let server = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                s.write_all(b"220 banner\r\n").await.unwrap();
                let mut buf = vec![0; 4096];
                loop {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => s.write_all(&buf[..n]).await.unwrap(),
                    }
                }
                let _ = s.shutdown().await;
            });
        }
    });
    let entry = role(up.clone(), server).await;
    // Server first: the client waits for the banner before saying anything.
    let mut c = TcpStream::connect(entry).await.unwrap();
    let mut banner = [0u8; 12];
    tokio::time::timeout(WAIT, c.read_exact(&mut banner)).await.unwrap().unwrap();
    assert_eq!(&banner, b"220 banner\r\n");
    c.write_all(b"LBC not a hello, just bytes").await.unwrap();
    c.shutdown().await.unwrap();
    let mut echo = Vec::new();
    tokio::time::timeout(WAIT, c.read_to_end(&mut echo)).await.unwrap().unwrap();
    assert_eq!(echo, b"LBC not a hello, just bytes");
    // Client first, with bytes that start like nothing chained.
    let mut c = TcpStream::connect(entry).await.unwrap();
    c.write_all(b"GET / HTTP/1.0\r\n\r\n").await.unwrap();
    c.shutdown().await.unwrap();
    let mut got = Vec::new();
    tokio::time::timeout(WAIT, c.read_to_end(&mut got)).await.unwrap().unwrap();
    assert_eq!(got, b"220 banner\r\nGET / HTTP/1.0\r\n\r\n");
    tokio::time::timeout(WAIT, async {
        while up.stats.plain.load(Relaxed) < 2 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("both counted as plain");
    assert_eq!(up.stats.chained.load(Relaxed) + up.stats.failed.load(Relaxed), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_downstream_without_an_upstream_fails_the_connection() {
    let objects = objects();
    let server = object_server(objects, None).await;
    let down = Chain::new(config(Role::Downstream, "down-n", None, None));
    let entry = role(down.clone(), server).await;
    let got = fetch(entry, 0).await;
    assert!(got.is_empty(), "nothing reaches the client: {} bytes", got.len());
    assert_eq!(down.stats.failed.load(Relaxed), 1);
}

/// Forwards both ways, flipping one byte of the upstream's answer at `offset`.
async fn corrupter(next: SocketAddr, offset: usize) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((c, _)) = l.accept().await {
            tokio::spawn(async move {
                let Ok(s) = TcpStream::connect(next).await else { return };
                let (mut cr, mut cw) = c.into_split();
                let (mut sr, mut sw) = s.into_split();
                let up = async move {
                    let _ = tokio::io::copy(&mut cr, &mut sw).await;
                    let _ = sw.shutdown().await;
                };
                let down = async move {
                    let (mut buf, mut at) = (vec![0u8; 4096], 0usize);
                    loop {
                        let n = match sr.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        if (at..at + n).contains(&offset) {
                            buf[offset - at] ^= 0x40;
                        }
                        at += n;
                        if cw.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                    let _ = cw.shutdown().await;
                };
                tokio::join!(up, down);
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupted_stream_closes_the_connection_without_wrong_bytes() {
    let objects = objects();
    let server = object_server(objects.clone(), None).await;
    let down = Chain::new(config(Role::Downstream, "down-x", None, None));
    let up = Chain::new(config(Role::Upstream, "up-x", None, None));
    let u = role(up.clone(), server).await;
    for (k, offset) in [100usize, 5_000, 70_000, 131_000].into_iter().enumerate() {
        let bad = corrupter(u, offset).await;
        let entry = role(down.clone(), bad).await;
        let got = fetch(entry, k).await;
        let want = &objects[k];
        assert!(got.len() < want.len(), "offset {offset}: the damaged download is cut short");
        assert!(want.starts_with(&got), "offset {offset}: what arrived is an exact prefix ({} bytes)", got.len());
    }
    assert_eq!(down.stats.failed.load(Relaxed), 4);
    assert!(down.stats.decode_errors.load(Relaxed) >= 3, "{}", down.stats.decode_errors.load(Relaxed));
    // The pair recovers: a clean download after the damage is exact.
    let entry = role(down.clone(), u).await;
    assert!(fetch(entry, 5).await == objects[5]);
    assert!(fetch(entry, 0).await == objects[0]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn saved_dictionaries_give_savings_after_a_restart() {
    let objects = objects();
    let base = std::env::temp_dir().join(format!("lb-chain-persist-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&base);
    let (dd, ud) = (Some(base.join("down")), Some(base.join("up")));
    let total = (OBJECTS * OBJECT) as u64;
    {
        let rig = rig(
            objects.clone(),
            config(Role::Downstream, "down-s", dd.clone(), None),
            config(Role::Upstream, "up-s", ud.clone(), None),
        )
        .await;
        let first = round(&rig, &objects).await;
        assert!(first as f64 > 0.95 * total as f64);
        // Each side checks its dictionaries in when its side of the last connection ends.
        tokio::time::timeout(WAIT, async {
            while rig.up.stats.chained.load(Relaxed) < OBJECTS as u64
                || rig.down.stats.chained.load(Relaxed) < OBJECTS as u64
            {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .unwrap();
        assert_eq!((rig.down.save(), rig.up.save()), (1, 1));
    }
    let rig = rig(
        objects.clone(),
        config(Role::Downstream, "down-s", dd.clone(), None),
        config(Role::Upstream, "up-s", ud.clone(), None),
    )
    .await;
    assert!(rig.down.stats.dictionary_bytes.load(Relaxed) >= total, "loaded at start");
    let after = round(&rig, &objects).await;
    eprintln!("after restart: {after} of {total}");
    assert!(after as f64 <= 0.05 * total as f64, "after the restart the repeat costs {after} of {total}");
    assert_eq!(rig.down.stats.resets.load(Relaxed) + rig.up.stats.resets.load(Relaxed), 0);
    let _ = std::fs::remove_dir_all(&base);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handshake_cut_short_gives_the_pair_dictionaries_back() {
    let objects = objects();
    let server = object_server(objects.clone(), None).await;
    let up = Chain::new(config(Role::Upstream, "up-h", None, None));
    let u = role(up.clone(), server).await;
    // A HELLO claiming to be downstream "down-h", then gone before the MODE byte: the
    // upstream had checked the pair out for it.
    let mut hello = Vec::new();
    wire::Hello { flags: 0, codec: 2, budget: 16 << 20, id: "down-h".into() }.emit(&mut hello);
    for _ in 0..3 {
        let mut c = TcpStream::connect(u).await.unwrap();
        c.write_all(&hello).await.unwrap();
        let mut answer = vec![0u8; wire::HELLO_FIXED];
        c.read_exact(&mut answer).await.unwrap();
        drop(c);
    }
    // The real downstream of that name still gets the pair's own dictionaries.
    let down = Chain::new(config(Role::Downstream, "down-h", None, None));
    let entry = role(down.clone(), u).await;
    tokio::time::timeout(WAIT, async {
        while up.stats.failed.load(Relaxed) < 3 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the three cut handshakes end");
    for i in 0..2 {
        assert!(fetch(entry, i).await == objects[i]);
    }
    assert_eq!(up.stats.ephemeral.load(Relaxed), 0, "no connection fell back to throwaway dictionaries");
    assert_eq!(down.stats.ephemeral.load(Relaxed), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_pair_dictionaries_savings_are_reported() {
    let objects = objects();
    let sink = Arc::new(Totals::default());
    let server = object_server(objects.clone(), None).await;
    let up = Chain::new(config(Role::Upstream, "up-s", None, Some(sink.clone())));
    let u = role(up.clone(), server).await;
    // Plain (not chained) downloads through the upstream: nothing was saved by a dictionary.
    for i in 0..3 {
        assert!(fetch(u, i).await == objects[i]);
    }
    tokio::time::timeout(WAIT, async {
        while up.stats.plain.load(Relaxed) < 3 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("three plain relays");
    assert_eq!(sink.total(), 0, "plain relays report no savings");
    // Chained repeats do.
    let down = Chain::new(config(Role::Downstream, "down-s", None, None));
    let entry = role(down.clone(), u).await;
    for _ in 0..2 {
        assert!(fetch(entry, 0).await == objects[0]);
    }
    tokio::time::timeout(WAIT, async {
        while sink.total() < OBJECT as u64 / 2 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the repeat's savings are reported");
}

/// A chained connection on which nothing moves ends on the idle timeout (the relay helper's
/// activity clock: every byte counted on either side resets it). `short` is the end whose
/// timeout is shorter; returns both ends' results, that end's first.
async fn silent_connection(short: Role) -> (Result<Outcome, ChainError>, Result<Outcome, ChainError>) {
    let server = object_server(objects(), None).await;
    let down = Chain::new(config(Role::Downstream, "down-i", None, None));
    let up = Chain::new(config(Role::Upstream, "up-i", None, None));
    let (quick, slow) = (Duration::from_millis(300), Duration::from_secs(5));
    let (down_idle, up_idle) = if short == Role::Downstream { (quick, slow) } else { (slow, quick) };
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let u = l.local_addr().unwrap();
    let upstream = tokio::spawn(async move {
        let (mut c, peer) = l.accept().await.unwrap();
        let mut s = TcpStream::connect(server).await.unwrap();
        up.upstream(&mut c, &mut s, peer, server, up_idle).await
    });
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mut client = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
    let (mut proxy_side, _) = l.accept().await.unwrap();
    // One byte, then silence: the server waits for the client's EOF, which never comes.
    client.write_all(&[1]).await.unwrap();
    let downstream = tokio::spawn(async move {
        let mut to_up = TcpStream::connect(u).await.unwrap();
        down.downstream(&mut proxy_side, &mut to_up, down_idle).await
    });
    let started = tokio::time::Instant::now();
    let (first, second) = if short == Role::Downstream { (downstream, upstream) } else { (upstream, downstream) };
    let first = tokio::time::timeout(WAIT, first).await.unwrap().unwrap();
    assert!(started.elapsed() >= quick, "not before the idle timeout");
    assert!(started.elapsed() < slow, "the short timeout ended it");
    let second = tokio::time::timeout(WAIT, second).await.unwrap().unwrap();
    (first, second)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_chained_connection_ends_idle_at_the_downstream() {
    let (down, _) = silent_connection(Role::Downstream).await;
    assert_eq!(down.unwrap(), Outcome::Idle);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_chained_connection_ends_idle_at_the_upstream() {
    let (up, _) = silent_connection(Role::Upstream).await;
    assert_eq!(up.unwrap(), Outcome::Idle);
}
