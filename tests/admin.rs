//! The admin API under hostile and heavy use, against the real `lb` binary: idle and
//! excess connections, the descriptor limit, and full reads of a table of millions of flows
//! while the member's control channels must stay alive.

mod common;

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use cluster_proto::mesh::{Mesh, MeshConfig, NoObserver, Retries};
use cluster_proto::session::SessionConfig;
use cluster_proto::{Action, Connection, Protocol};
use common::daemon::*;
use common::*;
use lb::admin::FlowsView;

/// Issue 10, defect 4: idle admin connections are closed, connections beyond the cap are
/// refused at once, the API still answers afterwards, and the soft descriptor limit was
/// raised to the hard one.
#[test]
fn idle_and_excess_admin_connections_are_closed() {
    let port = free_port();
    let me = lo(141);
    let d = Daemon::start_with(me, port, &[me], 1000, "max_connections = 8\nidle_timeout_ms = 500\n", &[]);
    let mut conns: Vec<TcpStream> = (0..20)
        .map(|_| {
            let s = TcpStream::connect(d.admin).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            s
        })
        .collect();
    // Each read returns at EOF (or reset): the server closed the connection. None of them
    // sent a byte; the first 8 wait for the idle timeout, the rest are closed at accept.
    for (i, c) in conns.iter_mut().enumerate() {
        let mut b = [0u8; 64];
        match c.read(&mut b) {
            Ok(0) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
            other => panic!("connection {i} not closed by the server: {other:?}"),
        }
    }
    // A connection that sent half a request is closed too.
    let mut half = TcpStream::connect(d.admin).unwrap();
    half.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    half.write_all(b"GET /peers HTTP/1.1\r\nHost: x\r\n").unwrap();
    let mut rest = Vec::new();
    let _ = half.read_to_end(&mut rest);
    assert!(!String::from_utf8_lossy(&rest).contains("\"node\""), "a request without its end got an answer");
    // The places came back.
    let peers = d.peers();
    assert_eq!(peers.node, me);
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", d.pid())).unwrap();
    let line = limits.lines().find(|l| l.starts_with("Max open files")).unwrap();
    let v: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(v[3], v[4], "soft open-file limit raised to the hard one: {line}");
}

fn conn(i: usize) -> Connection {
    let src =
        SocketAddr::new(IpAddr::V4(Ipv4Addr::new(198, 18, (i >> 16) as u8, (i >> 8) as u8)), 1024 + (i & 0xff) as u16);
    Connection::new(Protocol::Tcp, src, "203.0.113.9:443".parse().unwrap()).unwrap()
}

/// Reads a whole HTTP/1.1 answer of `GET path` as it streams, counting the flows in it
/// without holding it: returns the status line, the flows counted and the answer's last bytes.
fn stream_count(admin: SocketAddr, path: &str) -> (String, usize, String) {
    let mut s = TcpStream::connect(admin).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: lb\r\nConnection: close\r\n\r\n").unwrap();
    let needle = b"\"src\":";
    let mut buf = vec![0u8; 1 << 16];
    let mut window: Vec<u8> = Vec::new();
    let mut count = 0;
    let mut head = String::new();
    let mut tail: Vec<u8> = Vec::new();
    loop {
        let n = s.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        window.extend_from_slice(&buf[..n]);
        tail.extend_from_slice(&buf[..n]);
        tail.drain(..tail.len().saturating_sub(256));
        if head.is_empty() {
            head = String::from_utf8_lossy(&window[..window.len().min(15)]).into_owned();
        }
        count += window.windows(needle.len()).filter(|w| w == needle).count();
        // Keep a tail shorter than the needle (a match is never counted twice), and no more.
        let keep = window.len().min(needle.len() - 1);
        window.drain(..window.len() - keep);
    }
    (head, count, String::from_utf8_lossy(&tail).into_owned())
}

/// Issue 10, defect 3: four full reads of a 2,000,000-entry table at once. Before, each built
/// its whole answer in memory on the async runtime (271 MB each, RSS 2.06 GB for four) and
/// silenced the member's channels for 3.75 s, so its peers purged it. Now the answers stream
/// page by page from one scan thread: the member's peer never loses it, and its memory stays
/// bounded.
#[test]
fn four_full_reads_of_a_big_table_stream_without_silencing_the_member() {
    const N: usize = 2_000_000;
    let port = free_port();
    let (me, peer) = (lo(151), lo(152));
    // 500 ms keepalives, dead after 3 (a third of the default): a 1.5 s silence would purge
    // the member (before, the reads silenced it for 3.75 s).
    let d = Daemon::start_with(me, port, &[me, peer], 500, "", &[]);
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let session = SessionConfig { version: 1, keepalive: Duration::from_millis(500), dead_after: 3, restart_time: 0 };
    let mut cfg = MeshConfig::uniform(peer, port, &[me, peer], session, Retries::Infinite);
    cfg.send_queue = 1 << 22;
    let mesh = rt.block_on(async { Mesh::start(cfg, Arc::new(NoObserver)).await.unwrap() });
    for i in 0..N {
        mesh.install(conn(i), Action::Forward);
    }
    wait_until("the member holds the table", Duration::from_secs(120), || {
        d.peers().peers.iter().any(|p| p.entries == N)
    });
    let lost_before = mesh.peers()[0].channels_lost;
    let readers: Vec<_> = (0..4)
        .map(|_| {
            let admin = d.admin;
            std::thread::spawn(move || stream_count(admin, "/flows?limit=0"))
        })
        .collect();
    for r in readers {
        let (head, count, tail) = r.join().unwrap();
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        assert_eq!(count, N, "every flow streamed once");
        assert!(tail.contains(&format!("],\"total\":{N}}}")), "the answer ends with its total: {tail}");
    }
    let p = &mesh.peers()[0];
    println!("peer's view of the member: max silence {} ms, lost {}", p.max_silence_ms, p.channels_lost);
    assert_eq!(p.channels_lost, lost_before, "the member's channel survived the reads");
    assert_eq!(p.keepalive_timeouts, 0, "the member was never declared dead");
    let status = std::fs::read_to_string(format!("/proc/{}/status", d.pid())).unwrap();
    let hwm_kb: u64 =
        status.lines().find(|l| l.starts_with("VmHWM")).unwrap().split_whitespace().nth(1).unwrap().parse().unwrap();
    println!("member's peak RSS: {} MiB", hwm_kb / 1024);
    assert!(hwm_kb < 600 * 1024, "peak RSS {} MiB", hwm_kb / 1024);
    // Paged reads: every flow once, in order, with small pages near the end.
    let mut after: Option<String> = None;
    let mut seen = 0;
    let mut last: Option<(SocketAddr, SocketAddr)> = None;
    loop {
        let q = match &after {
            None => "/flows?limit=100000&addr=198.18.0.1".to_string(),
            Some(c) => format!("/flows?limit=100000&addr=198.18.0.1&after={c}"),
        };
        let v: FlowsView = lb::client::get_json(d.admin, &q).unwrap();
        for f in &v.flows {
            assert!(last.is_none_or(|l| l < (f.src, f.dst)), "pages are sorted");
            last = Some((f.src, f.dst));
        }
        seen += v.flows.len();
        match v.next {
            Some(c) => after = Some(c),
            None => break,
        }
    }
    assert_eq!(seen, 256, "198.18.0.1 is the source of 256 flows");
    let v: FlowsView = lb::client::get_json(d.admin, "/flows?limit=3").unwrap();
    assert_eq!((v.total, v.flows.len()), (N, 3));
    assert!(v.next.is_some());
    rt.block_on(mesh.shutdown(Duration::from_secs(1)));
}
