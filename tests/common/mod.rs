//! Helpers shared by the system tests: free ports, waiting with deadlines, raw v1 peers.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

pub mod daemon;
pub mod lbproc;

/// A port free on 127.0.0.1 right now, used as the listen port on several 127.0.0.x.
///
/// Taken below the kernel's ephemeral range (32768-60999), so that the source ports of
/// other tests' dialers, bound on the same 127.0.0.x addresses, can never take it.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU16, Ordering};
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let base = 20_000 + (std::process::id() % 1000) as u16 * 12;
    loop {
        let p = base + NEXT.fetch_add(1, Ordering::Relaxed) % 12_000;
        let p = 20_000 + (p - 20_000) % 12_000;
        if std::net::TcpListener::bind(("127.0.0.1", p)).is_ok() {
            return p;
        }
    }
}

/// 127.0.0.`i`.
pub fn lo(i: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, i))
}

/// Polls `f` every 10 ms until it is true; panics with `what` after `timeout`.
pub fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !f() {
        assert!(t0.elapsed() < timeout, "timed out after {timeout:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Async flavour of [`wait_until`].
pub async fn wait_until_async(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !f() {
        assert!(t0.elapsed() < timeout, "timed out after {timeout:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A hand-driven control channel speaking raw version-1 bytes.
pub struct RawPeer {
    pub stream: TcpStream,
}

impl RawPeer {
    /// Connects from `from` to `to`.
    pub fn connect(from: IpAddr, to: SocketAddr) -> RawPeer {
        let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        sock.bind(&SocketAddr::new(from, 0).into()).unwrap();
        sock.connect_timeout(&to.into(), Duration::from_secs(5)).unwrap();
        let stream: TcpStream = sock.into();
        stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        RawPeer { stream }
    }

    pub fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).unwrap();
    }

    /// Reads exactly `n` bytes, or returns what came before the peer closed.
    pub fn read(&mut self, n: usize) -> Vec<u8> {
        let mut buf = vec![0; n];
        let mut got = 0;
        while got < n {
            match self.stream.read(&mut buf[got..]) {
                Ok(0) => break,
                Ok(k) => got += k,
                Err(e) => panic!("read failed after {got} bytes: {e}"),
            }
        }
        buf.truncate(got);
        buf
    }

    /// Reads 4-byte headers, skipping PEER_KEEPALIVEs, and returns the first other one.
    pub fn read_sync_message(&mut self) -> Vec<u8> {
        loop {
            let m = self.read(4);
            if m != [3, 2, 0, 0] {
                return m;
            }
        }
    }

    /// True when the peer closed the connection (EOF) within the read timeout.
    pub fn closed(&mut self) -> bool {
        let mut b = [0u8; 64];
        loop {
            match self.stream.read(&mut b) {
                Ok(0) => return true,
                Ok(_) => continue,
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
                Err(_) => return false,
            }
        }
    }
}

/// Starts a mesh member. A member restarted in this process may find its killed
/// predecessor's listener still closing on its own task (a restarted process would not):
/// the bind is retried for up to 2 s.
pub async fn start_mesh(config: cluster_proto::mesh::MeshConfig) -> cluster_proto::mesh::Mesh {
    let me = config.address;
    for _ in 0..100 {
        let observer = std::sync::Arc::new(cluster_proto::mesh::NoObserver);
        if let Ok(m) = cluster_proto::mesh::Mesh::start(config.clone(), observer).await {
            return m;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("{me} could not start");
}
