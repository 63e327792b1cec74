//! Real-kernel test of the transparent proxy role: TPROXY interception plus client spoofing.
//!
//! Needs root. Three namespaces of its own (unique names, deleted on drop even when the test
//! fails) joined by veth: client 192.0.2.10 -- 192.0.2.1 proxy 198.51.100.1 -- 198.51.100.10
//! server. Only documentation addresses; nothing is added to the namespace the test runs in.
//! Every wait is bounded and every thread ends on its own, also when another one fails.

use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use handoff::netns::{veth, Netns};
use lb::proxy::{bind, tproxy_rules, ProxyConfig, ProxyStats};

/// The longest any single step waits.
const WAIT: Duration = Duration::from_secs(10);
/// Bytes sent each way.
const PAYLOAD: usize = 1 << 20;
const CLIENT: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);
const SERVER: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(198, 51, 100, 10)), 80);

/// A byte pattern that does not repeat at any power-of-two period, so reordering shows.
fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i as u32).wrapping_mul(2_654_435_761).rotate_right(13) as u8).collect()
}

/// Accepts one connection within [`WAIT`], echoes it to EOF, and returns the peer address.
fn echo_server(listener: TcpListener) -> io::Result<(SocketAddr, usize)> {
    listener.set_nonblocking(true)?;
    let t0 = Instant::now();
    let (mut conn, peer) = loop {
        match listener.accept() {
            Ok(c) => break c,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock && t0.elapsed() < WAIT => {
                std::thread::sleep(Duration::from_millis(10))
            }
            Err(e) => return Err(e),
        }
    };
    conn.set_nonblocking(false)?;
    conn.set_read_timeout(Some(WAIT))?;
    conn.set_write_timeout(Some(WAIT))?;
    let (mut buf, mut echoed) = (vec![0; 64 * 1024], 0);
    loop {
        let n = conn.read(&mut buf)?;
        if n == 0 {
            conn.shutdown(Shutdown::Write)?;
            return Ok((peer, echoed));
        }
        conn.write_all(&buf[..n])?;
        echoed += n;
    }
}

/// Connects to the server, sends the pattern from a second thread while reading the echo.
fn client(data: &[u8]) -> io::Result<Vec<u8>> {
    let mut conn = TcpStream::connect_timeout(&SERVER, WAIT)?;
    conn.set_read_timeout(Some(WAIT))?;
    conn.set_write_timeout(Some(WAIT))?;
    let mut writer = conn.try_clone()?;
    std::thread::scope(|s| {
        let sent = s.spawn(move || writer.write_all(data).and_then(|()| writer.shutdown(Shutdown::Write)));
        let mut echo = Vec::with_capacity(data.len());
        let read = (&mut conn).take(data.len() as u64 + 1).read_to_end(&mut echo);
        sent.join().expect("client writer panicked")?;
        read.map(|_| echo)
    })
}

#[test]
fn tproxy_spoofed_connection_reaches_the_server_from_the_client_address() {
    let client_ns = Netns::new("lbpx-c").expect("client netns");
    let proxy_ns = Netns::new("lbpx-p").expect("proxy netns");
    let server_ns = Netns::new("lbpx-s").expect("server netns");
    veth(&client_ns, "c0", &proxy_ns, "p0").expect("client-proxy veth");
    veth(&proxy_ns, "p1", &server_ns, "s0").expect("proxy-server veth");
    client_ns.sh("ip addr add 192.0.2.10/24 dev c0 && ip route add default via 192.0.2.1").expect("client addresses");
    server_ns
        .sh("ip addr add 198.51.100.10/24 dev s0 && ip route add 192.0.2.0/24 via 198.51.100.1")
        .expect("server addresses");
    // rp_filter off: the host's setting is inherited and strict mode is not what is tested here.
    proxy_ns
        .sh("ip addr add 192.0.2.1/24 dev p0 && ip addr add 198.51.100.1/24 dev p1 \
             && sysctl -qw net.ipv4.ip_forward=1 \
             && for f in /proc/sys/net/ipv4/conf/*/rp_filter; do echo 0 > $f; done")
        .expect("proxy addresses");
    for argv in tproxy_rules(8080, &[80], 1, 100, false) {
        let args: Vec<&str> = argv.iter().map(String::as_str).collect();
        let out = proxy_ns.exec(&args).expect("run rule command");
        assert!(out.status.success(), "{argv:?}: {}", String::from_utf8_lossy(&out.stderr));
    }

    let config = ProxyConfig {
        listen: "0.0.0.0:8080".parse().unwrap(),
        spoof: true,
        connect_timeout: WAIT,
        idle_timeout: WAIT,
        max_connections: 16,
        chain: None,
    };
    let data = pattern(PAYLOAD);
    let (proxy_ns, server_ns) = (&proxy_ns, &server_ns);
    std::thread::scope(|s| {
        // Dropped (also by a panic below) before the scope joins, which stops the proxy.
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let (ready, proxy_ready) = mpsc::channel::<io::Result<Arc<ProxyStats>>>();
        let proxy = s.spawn(|| {
            let _in = proxy_ns.enter().expect("enter proxy netns");
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
            rt.block_on(async move {
                let proxy = match bind(config).await {
                    Ok(p) => p,
                    Err(e) => {
                        let _ = ready.send(Err(e));
                        return;
                    }
                };
                let _ = ready.send(Ok(proxy.stats()));
                let serve = proxy.serve(async move {
                    let _ = stopped.await;
                });
                // Bounded even if the test thread never says stop.
                let _ = tokio::time::timeout(6 * WAIT, serve).await;
            });
        });
        let stats = proxy_ready.recv_timeout(WAIT).expect("proxy thread answers").expect("bind the TPROXY socket");

        let (listening, server_ready) = mpsc::channel::<Result<(), io::ErrorKind>>();
        let server = s.spawn(move || {
            let _in = server_ns.enter().expect("enter server netns");
            let listener = TcpListener::bind(SERVER);
            let _ = listening.send(listener.as_ref().map(drop).map_err(io::Error::kind));
            echo_server(listener?)
        });
        server_ready.recv_timeout(WAIT).expect("server thread answers").expect("bind the server");

        let echo = s
            .spawn(|| {
                let _in = client_ns.enter().expect("enter client netns");
                client(&data)
            })
            .join()
            .expect("client thread panicked")
            .expect("client exchange");
        let (peer, echoed) = server.join().expect("server thread panicked").expect("server exchange");
        drop(stop);
        proxy.join().expect("proxy thread panicked");

        assert_eq!(echoed, PAYLOAD, "server echoed everything");
        assert!(echo == data, "the echo differs from what was sent ({} of {PAYLOAD} bytes)", echo.len());
        assert_eq!(peer.ip(), IpAddr::V4(CLIENT), "the server sees the client's address");
        assert_eq!(stats.accepted.load(Relaxed), 1, "the proxy took the connection");
        assert_eq!(stats.spoofed_ok.load(Relaxed), 1, "the proxy connected as the client");
        assert_eq!(stats.spoofed_failed.load(Relaxed) + stats.refused.load(Relaxed), 0);
        assert_eq!(stats.bytes_to_server.load(Relaxed), PAYLOAD as u64);
        assert_eq!(stats.bytes_to_client.load(Relaxed), PAYLOAD as u64);
        assert_eq!(stats.active.load(Relaxed), 0);
    });
}
