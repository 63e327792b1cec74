//! Graceful restart (issue 11, protocol.md "Graceful restart"): real mesh members on loopback.
//! A version-2 member that announced a restart time and leaves with PEER_LEAVE(restarting),
//! or whose transport closes, keeps its entries at its peers, stale, for that time; what it
//! sends again after its restart stays, the rest goes at the end of the grace period. A
//! version-1 channel keeps the paper's purge at once.

mod common;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cluster_proto::mesh::{Mesh, MeshConfig, MeshEvent, MeshObserver, Retries};
use cluster_proto::session::SessionConfig;
use cluster_proto::{Action, Connection, Protocol};
use common::*;

const GRACE_SECS: u8 = 2;

#[derive(Default)]
struct Events {
    stale_purged: AtomicUsize,
    peer_restarting: AtomicUsize,
    peer_left: AtomicUsize,
}

impl MeshObserver for Events {
    fn on_event(&self, e: &MeshEvent) {
        match e {
            MeshEvent::StalePurged { purged, .. } => {
                self.stale_purged.fetch_add(*purged, Ordering::Relaxed);
            }
            MeshEvent::PeerDown { reason: "peer_restarting", purged: 0, .. } => {
                self.peer_restarting.fetch_add(1, Ordering::Relaxed);
            }
            MeshEvent::PeerDown { reason: "peer_left", .. } => {
                self.peer_left.fetch_add(1, Ordering::Relaxed);
            }
            _ => {}
        }
    }
}

async fn member(me: IpAddr, port: u16, members: &[IpAddr], version: u8, observer: Arc<Events>) -> Mesh {
    let session =
        SessionConfig { version, keepalive: Duration::from_millis(100), dead_after: 3, restart_time: GRACE_SECS };
    let mut cfg = MeshConfig::uniform(me, port, members, session, Retries::Infinite);
    cfg.backoff_min = Duration::from_millis(10);
    Mesh::start(cfg, observer).await.expect("mesh starts")
}

fn conn(i: u32) -> Connection {
    Connection::new(
        Protocol::Tcp,
        SocketAddr::new(IpAddr::V4(Ipv4Addr::new(198, 18, (i >> 8) as u8, i as u8)), 1000 + (i % 50_000) as u16),
        "203.0.113.80:443".parse().unwrap(),
    )
    .unwrap()
}

fn held(a: &Mesh, b: &Mesh) -> usize {
    a.database().count_of(b.me(), Action::Forward) + a.database().count_of(b.me(), Action::Bypass)
}

/// Members a (lo(`first`)) and b (the next address) at `version`; b registers `n`
/// connections with `action`, and a holds them. a's events are counted.
async fn pair(first: u8, version: u8, n: u32, action: Action) -> (Mesh, Mesh, Arc<Events>, [IpAddr; 2], u16) {
    let port = free_port();
    let addrs = [lo(first), lo(first + 1)];
    let events = Arc::new(Events::default());
    let a = member(addrs[0], port, &addrs, version, events.clone()).await;
    let b = member(addrs[1], port, &addrs, version, Arc::new(Events::default())).await;
    for i in 0..n {
        b.install(conn(i), action);
    }
    wait_until_async("a holds b's connections", Duration::from_secs(10), || held(&a, &b) == n as usize).await;
    (a, b, events, addrs, port)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gracefully_restarted_member_keeps_its_entries_and_what_it_does_not_send_again_goes() {
    let (a, b, events, addrs, port) = pair(121, 2, 1000, Action::Forward).await;

    // SIGTERM's path: PEER_LEAVE(restarting). The peer keeps everything, and says so.
    let left = Instant::now();
    b.shutdown(Duration::from_secs(1)).await;
    wait_until_async("a saw b restarting", Duration::from_secs(5), || {
        events.peer_restarting.load(Ordering::Relaxed) == 1
    })
    .await;
    assert_eq!(held(&a, &b), 1000, "kept during the restart");
    let info = a.peers().into_iter().find(|p| p.address == addrs[1]).unwrap();
    assert!(info.restart_grace_left_ms.is_some_and(|ms| ms <= GRACE_SECS as u64 * 1000), "{info:?}");

    // The restarted member registers 600 of its old connections again, and 100 new ones.
    let b2 = member(addrs[1], port, &addrs, 2, Arc::new(Events::default())).await;
    for i in (0..600).chain(5000..5100) {
        b2.install(conn(i), Action::Forward);
    }
    wait_until_async("b's new channel re-sent its table", Duration::from_secs(10), || {
        a.database().lookup(&conn(5099)).is_some() && held(&a, &b2) == 1100
    })
    .await;
    assert!(left.elapsed() < Duration::from_secs(GRACE_SECS as u64), "checked within the grace period");
    // The grace period ends: the 400 not sent again go, the rest stays.
    wait_until_async("stale entries purged", Duration::from_secs(GRACE_SECS as u64 + 5), || {
        events.stale_purged.load(Ordering::Relaxed) == 400
    })
    .await;
    assert_eq!(held(&a, &b2), 700);
    assert!(a.database().lookup(&conn(599)).is_some() && a.database().lookup(&conn(600)).is_none());
    assert!(a.peers()[0].restart_grace_left_ms.is_none());
    a.shutdown(Duration::from_secs(1)).await;
    b2.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_member_that_does_not_come_back_is_purged_at_the_end_of_its_grace() {
    let (a, b, events, _, _) = pair(123, 2, 500, Action::Bypass).await;
    let killed = Instant::now();
    b.kill(); // the transport closes without PEER_LEAVE (kill -9)
    wait_until_async("a saw the channel close", Duration::from_secs(5), || {
        a.peers()[0].restart_grace_left_ms.is_some()
    })
    .await;
    assert_eq!(held(&a, &b), 500, "kept: the member announced a restart time");
    wait_until_async("purged at the end of the grace", Duration::from_secs(GRACE_SECS as u64 + 5), || {
        held(&a, &b) == 0
    })
    .await;
    assert!(killed.elapsed() >= Duration::from_secs(GRACE_SECS as u64), "not before the grace period ended");
    assert_eq!(events.stale_purged.load(Ordering::Relaxed), 500);
    a.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn version_1_channels_keep_the_papers_purge_at_once() {
    let (a, b, events, _, _) = pair(125, 1, 300, Action::Forward).await;
    b.shutdown(Duration::from_secs(1)).await;
    wait_until_async("purged at once", Duration::from_secs(1), || held(&a, &b) == 0).await;
    assert_eq!(events.peer_left.load(Ordering::Relaxed), 1, "PEER_LEAVE(0) at version 1");
    assert_eq!(events.peer_restarting.load(Ordering::Relaxed), 0);
    assert!(a.peers()[0].restart_grace_left_ms.is_none());
    a.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_taken_out_for_good_is_purged_at_once() {
    let (a, b, events, _, _) = pair(127, 2, 300, Action::Forward).await;
    b.leave_for_good(Duration::from_secs(1)).await; // SIGUSR2's path: PEER_LEAVE(0)
    wait_until_async("purged at once", Duration::from_secs(1), || held(&a, &b) == 0).await;
    assert_eq!(events.peer_left.load(Ordering::Relaxed), 1);
    assert!(a.peers()[0].restart_grace_left_ms.is_none());
    a.shutdown(Duration::from_secs(1)).await;
}
