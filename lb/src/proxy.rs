//! The plain transparent TCP proxy role: the on-box application proxy of the paper (1.1), for
//! tests and small deployments.
//!
//! Netfilter's TPROXY target hands intercepted connections to one listening socket without
//! rewriting them, so an accepted socket's *local* address is the destination the client
//! asked for. The proxy connects there and relays bytes both ways. With `spoof` it connects
//! with the client's address as its source (client spoofing, paper 1.2), so a server that
//! authenticates by address sees the client; the server's replies to that address must then
//! come back through this box, which [`tproxy_rules`] arranges for, and which is exactly what
//! breaks under asymmetric routing and what the cluster's connection handoff repairs.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use socket2::SockRef;
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tracing::{debug, info};

use crate::chain::{reset_on_close, Chain, ChainConfig, ChainStats, Outcome, Role};
use crate::relay::{self, Activity, Meter};

/// Listen backlog of the TPROXY socket.
const BACKLOG: u32 = 1024;

/// What the transparent proxy listens on and how it treats each connection.
#[derive(Debug, Clone)]
pub struct ProxyConfig {
    /// The TPROXY port's socket, e.g. `0.0.0.0:8080`, or `[::]:8080` for both families.
    pub listen: SocketAddr,
    /// Connect to the original destination with the client's address as source (IP_TRANSPARENT).
    pub spoof: bool,
    /// How long a connect to the original destination may take.
    pub connect_timeout: Duration,
    /// A connection with no bytes moving either way for this long is closed; zero disables it.
    pub idle_timeout: Duration,
    /// Connections relayed at once; further ones are closed as soon as they are accepted.
    pub max_connections: usize,
    /// Chained-proxy role (downstream encoder or upstream decoder); `None` is a plain proxy.
    /// Its `savings` is the upstream's [`crate::chain::SavingsSink`].
    pub chain: Option<ChainConfig>,
}

/// Counters of the proxy, shared with whoever exports them (Prometheus).
#[derive(Debug, Default)]
pub struct ProxyStats {
    /// Connections taken in for relaying.
    pub accepted: AtomicU64,
    /// Connections closed at once: over `max_connections`, or addressed to the proxy port itself.
    pub refused: AtomicU64,
    /// Outbound connects with the client's address as source that succeeded.
    pub spoofed_ok: AtomicU64,
    /// Outbound connects with the client's address as source that failed or timed out.
    pub spoofed_failed: AtomicU64,
    /// Outbound connects from the proxy's own address (`spoof` off) that succeeded.
    pub plain_ok: AtomicU64,
    /// Outbound connects from the proxy's own address that failed or timed out.
    pub plain_failed: AtomicU64,
    /// Relays closed by the idle timeout.
    pub idle_timeouts: AtomicU64,
    /// Connections being served now (a gauge).
    pub active: AtomicU64,
    /// Bytes relayed from clients to servers.
    pub bytes_to_server: AtomicU64,
    /// Bytes relayed from servers to clients.
    pub bytes_to_client: AtomicU64,
}

/// A bound transparent proxy, not yet accepting; see [`bind`] and [`Proxy::serve`].
#[derive(Debug)]
pub struct Proxy {
    listener: TcpListener,
    config: ProxyConfig,
    stats: Arc<ProxyStats>,
    permits: Arc<Semaphore>,
    chain: Option<Arc<Chain>>,
}

/// Binds the TPROXY listening socket (needs CAP_NET_ADMIN for IP_TRANSPARENT).
pub async fn bind(config: ProxyConfig) -> io::Result<Proxy> {
    if config.max_connections == 0 || config.max_connections > Semaphore::MAX_PERMITS {
        let msg = format!("max_connections must be 1..={}", Semaphore::MAX_PERMITS);
        return Err(io::Error::new(io::ErrorKind::InvalidInput, msg));
    }
    let v4 = config.listen.is_ipv4();
    let sock = if v4 { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
    sock.set_reuseaddr(true)?;
    // TPROXY only delivers to sockets marked transparent, and the mark must be set before bind.
    set_transparent(&sock, v4)?;
    if !v4 {
        // `[::]` then takes intercepted IPv4 connections too (as v4-mapped addresses).
        SockRef::from(&sock).set_only_v6(false)?;
    }
    sock.bind(config.listen)?;
    let listener = sock.listen(BACKLOG)?;
    let permits = Arc::new(Semaphore::new(config.max_connections));
    // Loads the pair dictionaries from `dictionary_dir` (blocking, once at start).
    let chain = config.chain.clone().map(Chain::new);
    Ok(Proxy { listener, config, stats: Arc::default(), permits, chain })
}

/// Binds the proxy and serves it until `shutdown` completes.
pub async fn run(config: ProxyConfig, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let proxy =
        bind(config.clone()).await.with_context(|| format!("binding the transparent proxy on {}", config.listen))?;
    info!(listen = %proxy.local_addr()?, spoof = config.spoof, "transparent proxy listening");
    proxy.serve(shutdown).await;
    Ok(())
}

impl Proxy {
    /// The address the listening socket is bound to (the real port when `listen` had port 0).
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// The proxy's counters; they stay valid after [`Proxy::serve`] returns.
    pub fn stats(&self) -> Arc<ProxyStats> {
        Arc::clone(&self.stats)
    }

    /// The chain role's counters, when the proxy has one.
    pub fn chain_stats(&self) -> Option<Arc<ChainStats>> {
        self.chain.as_ref().map(|c| c.stats())
    }

    /// Accepts and relays connections until `shutdown` completes, then closes every open relay.
    pub async fn serve(self, shutdown: impl Future<Output = ()>) {
        let Proxy { listener, config, stats, permits, chain } = self;
        let config = Arc::new(config);
        let listen_port = listener.local_addr().map_or(config.listen.port(), |a| a.port());
        let mut tasks = JoinSet::new();
        let saving = chain.as_ref().filter(|c| c.config().dictionary_dir.is_some()).cloned();
        let mut save_tick =
            tokio::time::interval_at(Instant::now() + crate::chain::SAVE_EVERY, crate::chain::SAVE_EVERY);
        let mut periodic_save: Option<tokio::task::JoinHandle<usize>> = None;
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                () = &mut shutdown => break,
                _ = save_tick.tick(), if saving.is_some() => {
                    // One save at a time: two would write the same temporary files.
                    if periodic_save.as_ref().is_none_or(|h| h.is_finished()) {
                        let c = saving.clone().expect("guarded");
                        periodic_save = Some(tokio::task::spawn_blocking(move || c.save()));
                    }
                }
                Some(done) = tasks.join_next(), if !tasks.is_empty() => {
                    if let Err(e) = done {
                        info!(error = %e, "proxy connection task failed");
                    }
                }
                accepted = listener.accept() => {
                    let (client, peer) = match accepted {
                        Ok(c) => c,
                        Err(e) => {
                            // Out of descriptors or memory: back off instead of spinning.
                            info!(error = %e, "transparent proxy accept failed");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            continue;
                        }
                    };
                    // No local address: the connection is gone already.
                    let Ok(dst) = client.local_addr() else { continue };
                    // Addressed to the proxy port itself, not intercepted: relaying would loop.
                    if dst.port() == listen_port {
                        stats.refused.fetch_add(1, Relaxed);
                        debug!(%peer, %dst, "refused a connection to the proxy port itself");
                        continue;
                    }
                    let Ok(permit) = Arc::clone(&permits).try_acquire_owned() else {
                        stats.refused.fetch_add(1, Relaxed);
                        debug!(%peer, %dst, max = config.max_connections, "refused a connection over the limit");
                        continue;
                    };
                    stats.accepted.fetch_add(1, Relaxed);
                    let (stats, config, chain) = (Arc::clone(&stats), Arc::clone(&config), chain.clone());
                    tasks.spawn(async move {
                        serve_connection(client, peer, dst, &config, &stats, chain.as_deref()).await;
                        drop(permit);
                    });
                }
            }
        }
        // Aborted connections give their dictionaries back as they drop, then they are saved.
        tasks.shutdown().await;
        if let Some(h) = periodic_save {
            let _ = h.await;
        }
        if let Some(c) = saving {
            let saved = tokio::task::spawn_blocking(move || c.save()).await.unwrap_or(0);
            info!(pairs = saved, "pair dictionaries saved");
        }
    }
}

/// One connection: connect to its original destination, relay, log how it ended.
async fn serve_connection(
    client: TcpStream,
    peer: SocketAddr,
    dst: SocketAddr,
    config: &ProxyConfig,
    stats: &ProxyStats,
    chain: Option<&Chain>,
) {
    let _active = Gauge::up(&stats.active);
    // A `[::]` listener reports IPv4 connections as v4-mapped; the outbound socket is plain IPv4.
    let (peer, dst) = (canonical(peer), canonical(dst));
    let (ok, failed) =
        if config.spoof { (&stats.spoofed_ok, &stats.spoofed_failed) } else { (&stats.plain_ok, &stats.plain_failed) };
    let server = match connect(peer, dst, config).await {
        Ok(server) => server,
        Err(e) => {
            failed.fetch_add(1, Relaxed);
            info!(%peer, %dst, spoof = config.spoof, error = %e, "proxy connect failed");
            return;
        }
    };
    ok.fetch_add(1, Relaxed);
    let _ = client.set_nodelay(true);
    if let Some(chain) = chain.filter(|c| c.config().role == Role::Upstream || c.chains_port(dst.port())) {
        let (mut client, mut server) = (client, server);
        let ended = match chain.config().role {
            Role::Downstream => chain.downstream(&mut client, &mut server, config.idle_timeout).await,
            Role::Upstream => chain.upstream(&mut client, &mut server, peer, dst, config.idle_timeout).await,
        };
        match ended {
            Ok(Outcome::Idle) => {
                stats.idle_timeouts.fetch_add(1, Relaxed);
                debug!(%peer, %dst, "chained connection idle, closed");
            }
            Ok(Outcome::Plain { to_server, to_client }) => {
                // Not chained: relayed untouched, counted as the plain proxy counts.
                stats.bytes_to_server.fetch_add(to_server, Relaxed);
                stats.bytes_to_client.fetch_add(to_client, Relaxed);
                debug!(%peer, %dst, "connection relayed plain by the chain role");
            }
            Ok(outcome) => debug!(%peer, %dst, ?outcome, "chain connection closed"),
            Err(e) => {
                // A reset, not a FIN: the client must not take a cut-short stream as complete.
                reset_on_close(&client);
                reset_on_close(&server);
                info!(%peer, %dst, role = ?chain.config().role, error = %e, "chain connection failed, closed both sides");
            }
        }
        return;
    }
    let flow = Flow::default();
    let ended = relay(client, server, config.idle_timeout, stats, &flow).await;
    let (up, down) = (flow.to_server.load(Relaxed), flow.to_client.load(Relaxed));
    match ended {
        Ok(Ended::Closed) => debug!(%peer, %dst, up, down, "proxy connection closed"),
        Ok(Ended::Idle) => {
            stats.idle_timeouts.fetch_add(1, Relaxed);
            debug!(%peer, %dst, up, down, "proxy connection idle, closed");
        }
        Err(e) => info!(%peer, %dst, up, down, error = %e, "proxy relay failed"),
    }
}

/// Connects to `dst`, from `client`'s address when spoofing.
async fn connect(client: SocketAddr, dst: SocketAddr, config: &ProxyConfig) -> io::Result<TcpStream> {
    let v4 = dst.is_ipv4();
    let sock = if v4 { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
    if config.spoof {
        if client.is_ipv4() != v4 {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "client and destination families differ"));
        }
        set_transparent(&sock, v4)?;
        // Port 0, not the client's port: the client's own connection already holds
        // (client, port, dst, dport) in conntrack and in any stateful device on the way, so
        // reusing its port would make the spoofed connection a clash of the same 5-tuple.
        sock.bind(SocketAddr::new(client.ip(), 0))?;
    }
    let stream = tokio::time::timeout(config.connect_timeout, sock.connect(dst))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))??;
    stream.set_nodelay(true)?;
    Ok(stream)
}

fn set_transparent(sock: &impl AsFd, v4: bool) -> io::Result<()> {
    let sock = SockRef::from(sock);
    if v4 {
        sock.set_ip_transparent_v4(true)
    } else {
        sock.set_ip_transparent_v6(true)
    }
}

fn canonical(a: SocketAddr) -> SocketAddr {
    SocketAddr::new(a.ip().to_canonical(), a.port())
}

/// Increments a gauge now and decrements it on drop, also when the task is aborted.
struct Gauge<'a>(&'a AtomicU64);

impl<'a> Gauge<'a> {
    fn up(g: &'a AtomicU64) -> Self {
        g.fetch_add(1, Relaxed);
        Gauge(g)
    }
}

impl Drop for Gauge<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Relaxed);
    }
}

/// Per-connection byte counts and the time of the last activity.
#[derive(Default)]
struct Flow {
    to_server: AtomicU64,
    to_client: AtomicU64,
    activity: Activity,
}

/// How a relay ended without error: both sides closed their sending half, or nothing moved.
#[derive(Debug, PartialEq, Eq)]
enum Ended {
    Closed,
    Idle,
}

/// Relays both ways; an EOF on one side is passed on as a half-close of the other.
async fn relay(
    mut client: TcpStream,
    mut server: TcpStream,
    idle: Duration,
    stats: &ProxyStats,
    flow: &Flow,
) -> io::Result<Ended> {
    let up = Meter { mine: &flow.to_server, total: Some(&stats.bytes_to_server), activity: &flow.activity };
    let down = Meter { mine: &flow.to_client, total: Some(&stats.bytes_to_client), activity: &flow.activity };
    match relay::with_idle(relay::copy_both(&mut client, &mut server, up, down), &flow.activity, idle).await {
        relay::Ended::Done(r) => r.map(|()| Ended::Closed),
        relay::Ended::Idle => Ok(Ended::Idle),
    }
}

/// The commands (argv vectors) that bring intercepted connections to the proxy on `listen_port`
/// and the replies to its spoofed connections back to its sockets; run them in order.
///
/// Packets of connections that already have a transparent socket here (the accepted client
/// side, and the replies to spoofed server-side connections, which are addressed to the
/// client) get `mark` and policy routing delivers them locally through `table`. New
/// connections to `intercept_ports` are taken by TPROXY. Marks and the rule match with
/// `mark` as mask, so other bits of the packet mark stay someone else's. `mark` must be
/// non-zero, and `listen_port` not intercepted (the proxy refuses connections to its own port
/// as loops); multiport takes 15 ports a rule, so longer lists give more rules.
pub fn tproxy_rules(listen_port: u16, intercept_ports: &[u16], mark: u32, table: u32, v6: bool) -> Vec<Vec<String>> {
    let (iptables, family, any) = if v6 { ("ip6tables", "-6", "::/0") } else { ("iptables", "-4", "0.0.0.0/0") };
    let mark = format!("{mark:#x}/{mark:#x}");
    let argv = |words: &[&str]| words.iter().map(|w| w.to_string()).collect::<Vec<_>>();
    let mangle = [iptables, "-t", "mangle", "-A", "PREROUTING", "-p", "tcp"];
    let mut rules =
        vec![argv(&[&mangle[..], &["-m", "socket", "--transparent", "-j", "MARK", "--set-mark", &mark]].concat())];
    let on_port = listen_port.to_string();
    for chunk in intercept_ports.chunks(15) {
        let ports = chunk.iter().map(u16::to_string).collect::<Vec<_>>().join(",");
        let tproxy = ["-m", "multiport", "--dports", &ports, "-j", "TPROXY", "--on-port", &on_port];
        rules.push(argv(&[&mangle[..], &tproxy, &["--tproxy-mark", &mark]].concat()));
    }
    let table = table.to_string();
    rules.push(argv(&["ip", family, "rule", "add", "fwmark", &mark, "lookup", &table]));
    rules.push(argv(&["ip", family, "route", "add", "local", any, "dev", "lo", "table", &table]));
    rules
}

#[cfg(test)]
mod tests {
    use super::*;

    fn joined(rules: &[Vec<String>]) -> Vec<String> {
        rules.iter().map(|r| r.join(" ")).collect()
    }

    #[test]
    fn ipv4_rules() {
        assert_eq!(
            joined(&tproxy_rules(8080, &[80, 443], 1, 100, false)),
            [
                "iptables -t mangle -A PREROUTING -p tcp -m socket --transparent -j MARK --set-mark 0x1/0x1",
                "iptables -t mangle -A PREROUTING -p tcp -m multiport --dports 80,443 -j TPROXY --on-port 8080 \
                 --tproxy-mark 0x1/0x1",
                "ip -4 rule add fwmark 0x1/0x1 lookup 100",
                "ip -4 route add local 0.0.0.0/0 dev lo table 100",
            ]
        );
    }

    #[test]
    fn ipv6_rules() {
        assert_eq!(
            joined(&tproxy_rules(3129, &[8080], 0x40, 4242, true)),
            [
                "ip6tables -t mangle -A PREROUTING -p tcp -m socket --transparent -j MARK --set-mark 0x40/0x40",
                "ip6tables -t mangle -A PREROUTING -p tcp -m multiport --dports 8080 -j TPROXY --on-port 3129 \
                 --tproxy-mark 0x40/0x40",
                "ip -6 rule add fwmark 0x40/0x40 lookup 4242",
                "ip -6 route add local ::/0 dev lo table 4242",
            ]
        );
    }

    #[test]
    fn long_port_lists_split_at_fifteen_and_empty_lists_intercept_nothing() {
        let ports: Vec<u16> = (1..=16).collect();
        let rules = tproxy_rules(8080, &ports, 1, 100, false);
        let dports: Vec<&str> =
            rules.iter().filter_map(|r| r.iter().position(|w| w == "--dports").map(|i| r[i + 1].as_str())).collect();
        assert_eq!(dports, ["1,2,3,4,5,6,7,8,9,10,11,12,13,14,15", "16"]);
        assert!(tproxy_rules(8080, &[], 1, 100, false).iter().all(|r| !r.contains(&"TPROXY".to_string())));
    }

    /// Two connected loopback sockets.
    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let a = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        (a, l.accept().await.unwrap().0)
    }

    #[tokio::test]
    async fn relay_ends_an_idle_connection() {
        let ((_client, proxy_client), (proxy_server, _server)) = (pair().await, pair().await);
        let (stats, flow) = (ProxyStats::default(), Flow::default());
        let relayed = relay(proxy_client, proxy_server, Duration::from_millis(20), &stats, &flow);
        let ended = tokio::time::timeout(Duration::from_secs(10), relayed).await.expect("idle timeout fires");
        assert_eq!(ended.unwrap(), Ended::Idle);
    }

    #[tokio::test]
    async fn zero_connections_is_a_configuration_error() {
        let config = ProxyConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            spoof: false,
            connect_timeout: Duration::from_secs(1),
            idle_timeout: Duration::ZERO,
            max_connections: 0,
            chain: None,
        };
        assert_eq!(bind(config).await.unwrap_err().kind(), io::ErrorKind::InvalidInput);
    }
}
