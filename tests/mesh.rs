//! System tests of the real mesh driver on loopback: several members in one process, real
//! TCP control channels on 127.0.0.x.

mod common;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use cluster_proto::mesh::{Mesh, MeshConfig, NoObserver, PeerState, Retries};
use cluster_proto::session::{Role, SessionConfig};
use cluster_proto::{Action, Connection, Protocol};
use common::*;

fn session(keepalive_ms: u64) -> SessionConfig {
    SessionConfig { version: 1, keepalive: Duration::from_millis(keepalive_ms), dead_after: 3, restart_time: 0 }
}

async fn start(me: IpAddr, port: u16, members: &[IpAddr]) -> Mesh {
    start_with(me, port, members, 100).await
}

async fn start_with(me: IpAddr, port: u16, members: &[IpAddr], keepalive_ms: u64) -> Mesh {
    Mesh::start(MeshConfig::uniform(me, port, members, session(keepalive_ms), Retries::Infinite), Arc::new(NoObserver))
        .await
        .expect("mesh starts")
}

fn conn(owner: usize, i: usize) -> Connection {
    let src = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(192, 0, 2, owner as u8)), 1024 + (i % 60_000) as u16);
    let dst = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(198, 51, 100, (i / 60_000) as u8)), 80);
    Connection::new(Protocol::Tcp, src, dst).unwrap()
}

fn converged(ms: &[Mesh], per_member: usize) -> bool {
    let n = ms.len();
    ms.iter().all(|m| m.database().len() == (n - 1) * per_member)
        && ms.iter().all(|m| m.view_digest() == ms[0].view_digest())
}

fn all_established(ms: &[Mesh]) -> bool {
    ms.iter().all(|m| m.peers().iter().all(|p| p.state == PeerState::Established))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_members_join_and_sync_tables() {
    let port = free_port();
    let addrs = [lo(1), lo(2), lo(3)];
    let mut ms = Vec::new();
    for &a in &addrs {
        let m = start(a, port, &addrs).await;
        // Installed before the peers are joined: must arrive by the table sync.
        for i in 0..100 {
            m.install(conn(ms.len() + 1, i), if i % 4 == 0 { Action::Bypass } else { Action::Forward });
        }
        ms.push(m);
    }
    wait_until_async("3-member convergence", Duration::from_secs(10), || converged(&ms, 100)).await;
    wait_until_async("all channels established", Duration::from_secs(5), || all_established(&ms)).await;
    // One channel per pair: both ends agree on who dialed it.
    for m in &ms {
        for p in m.peers() {
            let other = ms.iter().find(|o| o.address() == p.address).unwrap();
            let back = other.peers().into_iter().find(|q| q.address == m.address()).unwrap();
            let pair = (p.role, back.role);
            assert!(
                pair == (Some(Role::Initiator), Some(Role::Acceptor))
                    || pair == (Some(Role::Acceptor), Some(Role::Initiator)),
                "{} and {} disagree on their channel: {pair:?}",
                m.address(),
                p.address
            );
        }
    }
    // Live updates after the sync.
    ms[1].remove(&conn(2, 0));
    ms[2].install(conn(3, 500), Action::Forward);
    wait_until_async("updates", Duration::from_secs(5), || {
        ms[0].database().lookup(&conn(2, 0)).is_none() && ms[0].database().lookup(&conn(3, 500).reversed()).is_some()
    })
    .await;
    for m in &ms {
        m.shutdown(Duration::from_secs(1)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn late_joiner_gets_the_full_table_and_leave_purges_at_once() {
    let port = free_port();
    let addrs = [lo(1), lo(2), lo(3)];
    let a = start(addrs[0], port, &addrs).await;
    let b = start(addrs[1], port, &addrs).await;
    for i in 0..1000 {
        a.install(conn(1, i), Action::Forward);
        b.install(conn(2, i), Action::Bypass);
    }
    wait_until_async("a and b synced", Duration::from_secs(5), || {
        a.database().len() == 1000 && b.database().len() == 1000
    })
    .await;
    let c = start(addrs[2], port, &addrs).await;
    wait_until_async("late joiner has everything", Duration::from_secs(10), || c.database().len() == 2000).await;
    assert_eq!(c.database().count_of(a.me(), Action::Forward), 1000);
    assert_eq!(c.database().count_of(b.me(), Action::Bypass), 1000);

    b.shutdown(Duration::from_secs(1)).await; // PEER_LEAVE(0)
    wait_until_async("b purged", Duration::from_secs(2), || a.database().is_empty() && c.database().len() == 1000)
        .await;
    let pa = a.peers().into_iter().find(|p| p.address == addrs[1]).unwrap();
    assert_eq!(pa.last_close.as_deref(), Some("peer_left"));
    a.shutdown(Duration::from_secs(1)).await;
    c.shutdown(Duration::from_secs(1)).await;
}

/// Issue 10 (table sync without copying): the sync is streamed from the live table, a part at
/// a time, while the sender keeps registering, changing and removing connections. Whatever
/// the interleaving of parts and live updates, the joiner ends with the table as it is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_streamed_while_it_changes_arrives_as_it_ends() {
    const N: usize = 300_000;
    let port = free_port();
    let addrs = [lo(1), lo(2)];
    let a = start_with(addrs[0], port, &addrs, 1000).await;
    for i in 0..N {
        a.install(conn(1, i), Action::Forward);
    }
    let b = start_with(addrs[1], port, &addrs, 1000).await;
    wait_until_async("the sync begins", Duration::from_secs(10), || !b.database().is_empty()).await;
    let mid_sync = b.database().len();
    // Churn on another thread while the parts go out: a third removed, a third changed to
    // bypass, as many new (the table keeps N entries).
    let churn = {
        let a = a.clone();
        tokio::task::spawn_blocking(move || {
            for i in 0..N / 3 {
                assert!(a.remove(&conn(1, i * 3)).is_some());
                a.install(conn(1, i * 3 + 1), Action::Bypass);
                a.install(conn(1, N + i), Action::Forward);
            }
        })
    };
    churn.await.expect("churn");
    assert!(mid_sync < N, "the churn must overlap the sync (the joiner held {mid_sync} of {N} at its start)");
    wait_until_async("the joiner holds the table as it ends", Duration::from_secs(30), || {
        b.database().len() == N && a.view_digest() == b.view_digest()
    })
    .await;
    assert_eq!(b.database().count_of(a.me(), Action::Bypass), N / 3);
    assert!(b.database().lookup(&conn(1, 0)).is_none() && b.database().lookup(&conn(1, N + 7)).is_some());
    for m in [a, b] {
        m.shutdown(Duration::from_secs(1)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crashed_member_is_purged_and_its_restart_resyncs() {
    let port = free_port();
    let addrs = [lo(1), lo(2)];
    let a = start(addrs[0], port, &addrs).await;
    let b = start(addrs[1], port, &addrs).await;
    for i in 0..500 {
        b.install(conn(2, i), Action::Forward);
    }
    wait_until_async("sync", Duration::from_secs(5), || a.database().len() == 500).await;
    b.kill();
    wait_until_async("purge after crash", Duration::from_secs(5), || a.database().is_empty()).await;
    // Restart with a different table: the old one must not come back.
    let b = start_mesh(MeshConfig::uniform(addrs[1], port, &addrs, session(100), Retries::Infinite)).await;
    for i in 1000..1300 {
        b.install(conn(2, i), Action::Forward);
    }
    wait_until_async("resync after restart", Duration::from_secs(10), || {
        a.database().len() == 300 && a.database().lookup(&conn(2, 1000)).is_some()
    })
    .await;
    a.shutdown(Duration::from_secs(1)).await;
    b.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strangers_version_mismatch_and_garbage_are_refused_member_unharmed() {
    let port = free_port();
    let addrs = [lo(1), lo(2)];
    let a = start(addrs[0], port, &addrs).await;
    let to = SocketAddr::new(addrs[0], port);
    a.install(conn(1, 1), Action::Forward);

    // Not a member: PEER_REJECT(1), then the listener closes.
    let mut p = RawPeer::connect(lo(9), to);
    p.send(&[3, 1, 1, 0]);
    assert_eq!(p.read(4), [3, 4, 1, 0]);
    assert!(p.closed());

    // A member speaking another version: PEER_REJECT(2).
    let mut p = RawPeer::connect(addrs[1], to);
    p.send(&[3, 1, 2, 0]);
    assert_eq!(p.read(4), [3, 4, 2, 0]);
    assert!(p.closed());

    // Garbage, or a first message that is not PEER_JOIN: closed without a word.
    for first in [&b"GET / HTTP/1.1\r\n\r\n"[..], &[3, 2, 0, 0], &[1, 1, 6, 1, 0, 1, 0, 2, 192, 0, 2, 1, 192, 0, 2, 2]]
    {
        let mut p = RawPeer::connect(addrs[1], to);
        p.send(first);
        assert!(p.closed(), "first bytes {first:?}");
    }

    // The member is unharmed: a proper join from member 127.0.0.2 works and gets the table.
    let mut p = RawPeer::connect(addrs[1], to);
    p.send(&[3, 1, 1, 0]);
    assert_eq!(p.read(4), [3, 1, 1, 0], "PEER_JOIN back");
    let install = p.read(16);
    assert_eq!(&install[..4], &[1, 1, 6, 1], "INSTALL FORWARD TCP IPv4");
    assert_eq!(&install[8..12], &[192, 0, 2, 1]);
    // An INSTALL from the peer lands in the database with the peer as owner.
    p.send(&[1, 2, 17, 1, 0, 53, 0, 53, 203, 0, 113, 5, 198, 51, 100, 5]);
    let c =
        Connection::new(Protocol::Udp, "203.0.113.5:53".parse().unwrap(), "198.51.100.5:53".parse().unwrap()).unwrap();
    wait_until_async("raw install", Duration::from_secs(5), || a.database().lookup(&c).is_some()).await;
    assert_eq!(a.database().owner_of(&c), Some((a.member_id(addrs[1]).unwrap(), Action::Bypass)));
    // A bad message: PEER_LEAVE(3) and the peer's entries are gone.
    p.send(&[7, 7, 7, 7]);
    assert_eq!(p.read_sync_message(), [3, 3, 3, 0]);
    assert!(p.closed());
    wait_until_async("purge after bad message", Duration::from_secs(5), || a.database().is_empty()).await;
    a.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_members_with_20k_connections_each_converge() {
    const N: usize = 20;
    const PER: usize = 20_000;
    let port = free_port();
    let addrs: Vec<IpAddr> = (1..=N as u8).map(lo).collect();
    let mut ms = Vec::new();
    // Twenty members share two cores here (with whatever else runs), so give them a 2 s
    // keepalive: dead only after 6 s of silence.
    for &a in &addrs {
        ms.push(start_with(a, port, &addrs, 2000).await);
    }
    wait_until_async("20-member full mesh", Duration::from_secs(30), || all_established(&ms)).await;
    // Simultaneous dials at start-up may replace a channel once (the duplicate-channel
    // tie-break); from here on, no channel may drop.
    let lost_at_start: Vec<Vec<u64>> = ms.iter().map(|m| m.peers().iter().map(|p| p.channels_lost).collect()).collect();
    for (k, m) in ms.iter().enumerate() {
        for i in 0..PER {
            m.install(conn(k + 1, i), if i % 10 == 0 { Action::Bypass } else { Action::Forward });
            if i % 1000 == 0 {
                tokio::task::yield_now().await;
            }
        }
    }
    // Nothing flapped: every channel stayed up through the load.
    assert!(all_established(&ms), "a channel went down under load");
    let t0 = std::time::Instant::now();
    while !converged(&ms, PER) {
        if t0.elapsed() > Duration::from_secs(120) {
            let lines: Vec<String> = ms
                .iter()
                .map(|m| {
                    let short: Vec<usize> = (0..N as u8)
                        .map(|o| {
                            m.database().count_of(cluster_proto::MemberId(o), Action::Forward)
                                + m.database().count_of(cluster_proto::MemberId(o), Action::Bypass)
                        })
                        .collect();
                    let lost: Vec<(IpAddr, u64, Option<String>)> = m
                        .peers()
                        .into_iter()
                        .filter(|p| p.channels_lost > 0 || p.state != PeerState::Established)
                        .map(|p| (p.address, p.channels_lost, p.last_close))
                        .collect();
                    format!("{} local {} by owner {short:?} troubled peers {lost:?}", m.address(), m.local().len())
                })
                .collect();
            panic!("no 20 x 20k convergence after 120 s:\n{}", lines.join("\n"));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for (m, before) in ms.iter().zip(&lost_at_start) {
        for (p, b) in m.peers().iter().zip(before) {
            assert_eq!(
                p.channels_lost,
                *b,
                "{} lost its channel to {} during the run: {:?}",
                m.address(),
                p.address,
                p.last_close
            );
        }
    }
    let digest = ms[0].view_digest();
    for m in &ms {
        assert_eq!(m.database().len() + m.local().len(), N * PER);
        assert_eq!(m.view_digest(), digest, "{} has a different view", m.address());
    }
    for m in &ms {
        m.shutdown(Duration::from_secs(2)).await;
    }
}

/// Counts flood-guard refusals for one reason (`entry_limit`, `rate_limit`).
struct Refusals(&'static str, std::sync::atomic::AtomicUsize);

impl Refusals {
    fn of(reason: &'static str) -> Arc<Self> {
        Arc::new(Refusals(reason, Default::default()))
    }

    fn count(&self) -> usize {
        self.1.load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl cluster_proto::mesh::MeshObserver for Refusals {
    fn on_event(&self, e: &cluster_proto::mesh::MeshEvent) {
        if matches!(e, cluster_proto::mesh::MeshEvent::InstallRefused { reason, .. } if *reason == self.0) {
            self.1.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flood_guard_caps_the_entries_of_one_member() {
    let port = free_port();
    let addrs = [lo(71), lo(72)];
    let refusals = Refusals::of("entry_limit");
    let mut cfg = MeshConfig::uniform(addrs[0], port, &addrs, session(100), Retries::Infinite);
    cfg.max_entries_per_member = 100;
    let a = Mesh::start(cfg, refusals.clone()).await.unwrap();
    let b = start(addrs[1], port, &addrs).await;
    // Joined first: installs made while b's channel joins reach a both in b's table and as
    // live INSTALLs, and each refused copy counts.
    wait_until_async("mesh up", Duration::from_secs(10), || a.live_members().len() == 2 && b.live_members().len() == 2)
        .await;
    for i in 0..150 {
        b.install(conn(72, i), Action::Forward);
    }
    wait_until_async("refusals counted", Duration::from_secs(5), || refusals.count() == 50).await;
    assert_eq!(a.database().len(), 100, "the cap holds");
    // Removes free room again.
    for i in 0..10 {
        b.remove(&conn(72, i));
    }
    b.install(conn(72, 1000), Action::Forward);
    wait_until_async("room after removes", Duration::from_secs(5), || a.database().lookup(&conn(72, 1000)).is_some())
        .await;
    a.shutdown(Duration::from_secs(1)).await;
    b.shutdown(Duration::from_secs(1)).await;
}

/// The token bucket: a burst of max_entries_per_member passes, then max_install_rate per
/// second, even while the peer's entries stay far below the cap (INSTALLs applied in batches).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flood_guard_limits_the_install_rate_below_the_cap() {
    let port = free_port();
    let addrs = [lo(73), lo(74)];
    let refusals = Refusals::of("rate_limit");
    let mut cfg = MeshConfig::uniform(addrs[0], port, &addrs, session(100), Retries::Infinite);
    cfg.max_entries_per_member = 1000;
    cfg.max_install_rate = 1;
    let a = Mesh::start(cfg, refusals.clone()).await.unwrap();
    let b = start(addrs[1], port, &addrs).await;
    wait_until_async("mesh up", Duration::from_secs(10), || a.live_members().len() == 2 && b.live_members().len() == 2)
        .await;
    for i in 0..1000 {
        b.install(conn(74, i), Action::Forward);
    }
    wait_until_async("the burst passes", Duration::from_secs(5), || a.database().len() == 1000).await;
    for i in 0..1000 {
        b.remove(&conn(74, i));
    }
    wait_until_async("removed", Duration::from_secs(5), || a.database().is_empty()).await;
    for i in 1000..1500 {
        b.install(conn(74, i), Action::Forward);
    }
    wait_until_async("the rest refused at 1 per second", Duration::from_secs(5), || {
        refusals.count() + a.database().len() == 500
    })
    .await;
    assert!(a.database().len() <= 10, "at most a few tokens came back: {} passed", a.database().len());
    a.shutdown(Duration::from_secs(1)).await;
    b.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_peer_is_cut_off_without_holding_back_the_others() {
    let port = free_port();
    let addrs = [lo(81), lo(82), lo(83)];
    let mut cfg = MeshConfig::uniform(addrs[0], port, &addrs, session(1000), Retries::Infinite);
    cfg.send_queue = 256;
    cfg.max_pending_bytes = 64 << 10;
    let a = Mesh::start(cfg, Arc::new(NoObserver)).await.unwrap();
    let c = start(addrs[2], port, &addrs).await;
    // Member 82 joins by hand and then never reads.
    let mut stalled = RawPeer::connect(addrs[1], SocketAddr::new(addrs[0], port));
    stalled.send(&[3, 1, 1, 0]);
    assert_eq!(stalled.read(4), [3, 1, 1, 0]);
    wait_until_async("c joined", Duration::from_secs(5), || {
        a.peers().iter().filter(|p| p.state == PeerState::Established).count() == 2
    })
    .await;
    let mut n = 0;
    while a.peers().iter().find(|p| p.address == addrs[1]).unwrap().channels_lost == 0 {
        assert!(n < 2_000_000, "the stalled peer was never cut off");
        for _ in 0..1000 {
            a.install(conn(81, n), Action::Forward);
            n += 1;
        }
        tokio::task::yield_now().await;
    }
    let pb = a.peers().into_iter().find(|p| p.address == addrs[1]).unwrap();
    assert_eq!(pb.last_close.as_deref(), Some("left_stalled"));
    // The other member got every update.
    wait_until_async("c has everything", Duration::from_secs(30), || c.database().len() == n).await;
    a.shutdown(Duration::from_secs(1)).await;
    c.shutdown(Duration::from_secs(1)).await;
}

fn tls_for(certs: &lb::certs::ClusterCerts, addr: IpAddr) -> Arc<cluster_proto::mesh::tls::TlsSettings> {
    let (_, cert, key) = certs.members.iter().find(|m| m.0 == addr).expect("member cert");
    Arc::new(
        cluster_proto::mesh::tls::TlsSettings::from_pem(certs.ca_cert.as_bytes(), cert.as_bytes(), key.as_bytes())
            .unwrap(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_members_join_and_strangers_without_credentials_install_nothing() {
    let port = free_port();
    let addrs = [lo(91), lo(92), lo(93)];
    // 93 is a member, but its certificate names 94: it must not pass as 93.
    let certs = lb::certs::generate("test", &[addrs[0], addrs[1], lo(94)]).unwrap();
    let start_tls = |me: IpAddr, tls| {
        let mut cfg = MeshConfig::uniform(me, port, &addrs, session(100), Retries::Infinite);
        cfg.tls = Some(tls);
        Mesh::start(cfg, Arc::new(NoObserver))
    };
    let a = start_tls(addrs[0], tls_for(&certs, addrs[0])).await.unwrap();
    let b = start_tls(addrs[1], tls_for(&certs, addrs[1])).await.unwrap();
    b.install(conn(92, 1), Action::Forward);
    wait_until_async("TLS members synced", Duration::from_secs(10), || a.database().len() == 1).await;

    // Byte-exact version-1 frames in plaintext: the TLS handshake fails, nothing is installed.
    let mut p = RawPeer::connect(addrs[2], SocketAddr::new(addrs[0], port));
    p.send(&[3, 1, 1, 0]);
    p.send(&[1, 1, 6, 1, 0, 1, 0, 2, 203, 0, 113, 1, 203, 0, 113, 2]);
    assert!(p.closed(), "plaintext speaker is cut off");
    // A CA-signed certificate for another address, presented from 93: refused too.
    let c = start_tls(addrs[2], tls_for(&certs, lo(94))).await.unwrap();
    c.install(conn(93, 1), Action::Forward);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(a.database().len(), 1, "only b's entry: {:?}", a.peers());
    let p93 = a.peers().into_iter().find(|p| p.address == addrs[2]).unwrap();
    assert_ne!(p93.state, PeerState::Established);
    for m in [a, b, c] {
        m.shutdown(Duration::from_secs(1)).await;
    }
}
