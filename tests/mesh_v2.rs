//! System tests of protocol version 2 on loopback: negotiation, fallback to version 1, and the
//! DICT_STATS/LOAD advertisements between real mesh members.

mod common;

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cluster_proto::mesh::{Mesh, MeshConfig, NoObserver, PeerState, Retries};
use cluster_proto::session::SessionConfig;
use cluster_proto::wire::DecodeError;
use cluster_proto::{Action, Connection, MemberId, Protocol};
use common::*;

type Received = Arc<Mutex<Vec<(MemberId, Vec<u8>)>>>;

async fn start_v(me: IpAddr, port: u16, members: &[IpAddr], version: u8) -> Mesh {
    let session = SessionConfig { version, keepalive: Duration::from_millis(100), dead_after: 3, restart_time: 0 };
    Mesh::start(MeshConfig::uniform(me, port, members, session, Retries::Infinite), Arc::new(NoObserver))
        .await
        .expect("mesh starts")
}

fn listen(m: &Mesh) -> Received {
    let got: Received = Default::default();
    let g = got.clone();
    m.set_advertisement_listener(Box::new(move |from, bytes| g.lock().unwrap().push((from, bytes.to_vec()))));
    got
}

/// A LOAD message from `member` (load 1.0).
fn load(member: MemberId) -> Vec<u8> {
    vec![5, 1, member.0, 0, 0x3f, 0x80, 0, 0]
}

/// An IPv4 DICT_STATS message from `member` with one record.
fn dict_stats(member: MemberId) -> Vec<u8> {
    let mut v = vec![4, 1, member.0, 1, 0, 0, 0, 1, 24, 32, 0, 1];
    v.extend_from_slice(&[192, 0, 2, 0, 198, 51, 100, 7, 0x3f, 0x80, 0, 0]);
    v
}

fn conn(owner: u8, i: u16) -> Connection {
    let src = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(192, 0, 2, owner)), 1024 + i);
    Connection::new(Protocol::Tcp, src, "198.51.100.1:80".parse().unwrap()).unwrap()
}

fn all_established(ms: &[Mesh]) -> bool {
    ms.iter().all(|m| m.peers().iter().all(|p| p.state == PeerState::Established))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_v2_members_exchange_advertisements() {
    let port = free_port();
    let addrs = [lo(1), lo(2), lo(3)];
    let mut ms = Vec::new();
    let mut got = Vec::new();
    for &a in &addrs {
        let m = start_v(a, port, &addrs, 2).await;
        got.push(listen(&m));
        ms.push(m);
    }
    wait_until_async("all channels established", Duration::from_secs(10), || all_established(&ms)).await;
    for m in &ms {
        assert!(m.peers().iter().all(|p| p.version == Some(2)), "{:?}", m.peers());
        let json = serde_json::to_value(&m.peers()[0]).unwrap();
        assert_eq!(json["version"], 2, "GET /peers shows the version");
    }
    for m in &ms {
        let mut batch = dict_stats(m.me());
        batch.extend_from_slice(&load(m.me()));
        assert_eq!(m.advertise(&batch), Ok(2), "queued to both peers");
    }
    wait_until_async("advertisements", Duration::from_secs(5), || got.iter().all(|g| g.lock().unwrap().len() == 4))
        .await;
    for (i, m) in ms.iter().enumerate() {
        for (from, bytes) in got[i].lock().unwrap().iter() {
            assert_ne!(*from, m.me());
            assert!(*bytes == load(*from) || *bytes == dict_stats(*from), "{from:?} {bytes:?}");
        }
        let s = m.advertisement_stats();
        assert_eq!((s.sent, s.received, s.dropped, s.skipped_v1, s.version_fallbacks), (4, 4, 0, 0, 0), "{s:?}");
    }
    // A member speaks only for itself, and only in whole messages.
    let other = MemberId((ms[0].me().0 + 1) % 3);
    assert_eq!(ms[0].advertise(&load(other)), Err(DecodeError::WrongMember { claimed: other.0, sender: ms[0].me().0 }));
    assert_eq!(ms[0].advertise(&load(ms[0].me())[..5]), Err(DecodeError::Truncated));
    assert!(ms[0].advertise(&[3, 2, 0, 0]).is_err());
    // Installs still flow on version-2 channels.
    ms[0].install(conn(1, 1), Action::Forward);
    wait_until_async("install", Duration::from_secs(5), || ms[2].database().len() == 1).await;
    // A peer going away changes the membership generation (the consumer re-sends its snapshot).
    let g = ms[0].membership_generation();
    ms[2].shutdown(Duration::from_secs(1)).await;
    wait_until_async("generation bump", Duration::from_secs(5), || ms[0].membership_generation() != g).await;
    for m in &ms[..2] {
        m.shutdown(Duration::from_secs(1)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v1_and_v2_members_interoperate_at_version_1() {
    let port = free_port();
    let addrs = [lo(1), lo(2)];
    let v2 = start_v(addrs[0], port, &addrs, 2).await;
    let v1 = start_v(addrs[1], port, &addrs, 1).await;
    let got = listen(&v1);
    let ms = [v2, v1];
    wait_until_async("established", Duration::from_secs(10), || all_established(&ms)).await;
    assert_eq!(ms[0].peers()[0].version, Some(1));
    assert_eq!(ms[1].peers()[0].version, Some(1));
    ms[0].install(conn(1, 1), Action::Forward);
    ms[1].install(conn(2, 1), Action::Bypass);
    wait_until_async("installs both ways", Duration::from_secs(5), || {
        ms[0].database().len() == 1 && ms[1].database().len() == 1
    })
    .await;
    assert_eq!(ms[0].advertise(&load(ms[0].me())), Ok(0), "no version-2 peer");
    assert_eq!(ms[0].advertisement_stats().skipped_v1, 1);
    assert!(got.lock().unwrap().is_empty());
    for m in &ms {
        m.shutdown(Duration::from_secs(1)).await;
    }
}

/// A version-1 peer written out by hand: refuses PEER_JOIN(2) as the paper says, then accepts
/// the PEER_JOIN(1) the mesh falls back to.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v2_member_falls_back_to_1_after_a_v1_reject() {
    let port = free_port();
    let addrs = [lo(1), lo(2)];
    // The raw peer listens at 127.0.0.2 and never dials, so the mesh at 127.0.0.1 dials it.
    let listener = std::net::TcpListener::bind(SocketAddr::new(addrs[1], port)).unwrap();
    let m = start_v(addrs[0], port, &addrs, 2).await;
    let peer = tokio::task::spawn_blocking(move || {
        let (mut s, _) = listener.accept().unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut join = [0u8; 4];
        s.read_exact(&mut join).unwrap();
        assert_eq!(join, [3, 1, 2, 0], "first offer is version 2");
        s.write_all(&[3, 4, 2, 0]).unwrap();
        drop(s);
        let (mut s, _) = listener.accept().unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.read_exact(&mut join).unwrap();
        assert_eq!(join, [3, 1, 1, 0], "fallback offer is version 1");
        s.write_all(&[3, 1, 1, 0]).unwrap();
        // An INSTALL from the version-1 peer.
        s.write_all(&[1, 1, 6, 1, 0x9c, 0x40, 0, 80, 192, 0, 2, 9, 198, 51, 100, 7]).unwrap();
        s
    });
    let mut s = peer.await.unwrap();
    let c =
        Connection::new(Protocol::Tcp, "192.0.2.9:40000".parse().unwrap(), "198.51.100.7:80".parse().unwrap()).unwrap();
    wait_until_async("install from the v1 peer", Duration::from_secs(5), || m.database().lookup(&c).is_some()).await;
    assert_eq!(m.peers()[0].version, Some(1));
    assert_eq!(m.advertisement_stats().version_fallbacks, 1);
    // On this version-1 channel a LOAD is an unknown message type: PEER_LEAVE(3).
    s.write_all(&[5, 1, 1, 0, 0, 0, 0, 0]).unwrap();
    let mut raw = RawPeer { stream: s };
    assert_eq!(raw.read_sync_message(), [3, 3, 3, 0]);
    wait_until_async("purge", Duration::from_secs(5), || m.database().is_empty()).await;
    m.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v2_advertisement_for_another_member_gets_leave_bad_message() {
    let port = free_port();
    let addrs = [lo(1), lo(2), lo(3)];
    let m = start_v(addrs[0], port, &addrs, 2).await;
    let got = listen(&m);
    let mut p = RawPeer::connect(addrs[1], SocketAddr::new(addrs[0], port));
    p.send(&[3, 1, 2, 0]);
    assert_eq!(p.read(4), [3, 1, 2, 0], "PEER_JOIN(2) back");
    let me = m.member_id(addrs[1]).unwrap();
    p.send(&load(me));
    wait_until_async("advertisement", Duration::from_secs(5), || got.lock().unwrap().len() == 1).await;
    assert_eq!(got.lock().unwrap()[0], (me, load(me)));
    p.send(&load(m.member_id(addrs[2]).unwrap()));
    assert_eq!(p.read_sync_message(), [3, 3, 3, 0]);
    assert!(p.closed());
    m.shutdown(Duration::from_secs(1)).await;
}
