//! Paper Fig. 1 in real network namespaces: a client connects through member A, whose
//! transparent proxy spoofs the client's address toward the server; the server's return
//! path goes through member B. With A and B clustered, B hands the server's packets to A in
//! IP-in-IP and a 1 MiB request/response exchange succeeds; with B outside the cluster the
//! server's reply reaches the client directly and the exchange fails.
//!
//! ```text
//!                    192.0.2.0/24            198.51.100.0/24
//!   client C  c0 ------------------- a0  A  a1 ------------------ s0  server S
//!     |  c1                               | a2 198.18.0.1               s1 |
//!     |  203.0.113.0/24        cluster    |  198.18.0.0/24                 | 198.18.1.0/24
//!     +------------------------ b1  B  b2 + 198.18.0.2        b0 ---------+
//!  S routes the client's network via B; B routes it straight to C.
//! ```
//!
//! Every namespace, veth and process is this test's own, removed on success and failure.

mod common;
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::lbproc::{metric, LbProcess as Member};
use common::wait_until;
use handoff::netns::{veth, Netns};

const PAYLOAD: usize = 1 << 20;

struct Fam {
    v6: bool,
    client: &'static str,
    a_client_side: &'static str,
    a_server_side: &'static str,
    server: &'static str,
    server_b_side: &'static str,
    b_server_side: &'static str,
    b_client_side: &'static str,
    client_b_side: &'static str,
    a_cluster: &'static str,
    b_cluster: &'static str,
    prefix: u8,
}

const V4: Fam = Fam {
    v6: false,
    client: "192.0.2.10",
    a_client_side: "192.0.2.1",
    a_server_side: "198.51.100.1",
    server: "198.51.100.80",
    server_b_side: "198.18.1.80",
    b_server_side: "198.18.1.1",
    b_client_side: "203.0.113.1",
    client_b_side: "203.0.113.10",
    a_cluster: "198.18.0.1",
    b_cluster: "198.18.0.2",
    prefix: 24,
};

const V6: Fam = Fam {
    v6: true,
    client: "2001:db8:c::10",
    a_client_side: "2001:db8:c::1",
    a_server_side: "2001:db8:5::1",
    server: "2001:db8:5::80",
    server_b_side: "2001:db8:51::80",
    b_server_side: "2001:db8:51::1",
    b_client_side: "2001:db8:cb::1",
    client_b_side: "2001:db8:cb::10",
    a_cluster: "2001:db8:ff::1",
    b_cluster: "2001:db8:ff::2",
    prefix: 64,
};

struct Topology {
    f: &'static Fam,
    c: Netns,
    a: Netns,
    s: Netns,
    b: Netns,
    dir: PathBuf,
}

impl Drop for Topology {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn addr(ns: &Netns, dev: &str, a: &str, prefix: u8) {
    let nodad = if a.contains(':') { " nodad" } else { "" };
    ns.sh(&format!("ip addr add {a}/{prefix} dev {dev}{nodad}")).unwrap();
}

fn topology(f: &'static Fam) -> Topology {
    let (c, a, s, b) = (
        Netns::new("f1c").unwrap(),
        Netns::new("f1a").unwrap(),
        Netns::new("f1s").unwrap(),
        Netns::new("f1b").unwrap(),
    );
    veth(&c, "c0", &a, "a0").unwrap();
    veth(&c, "c1", &b, "b1").unwrap();
    veth(&a, "a1", &s, "s0").unwrap();
    veth(&b, "b0", &s, "s1").unwrap();
    veth(&a, "a2", &b, "b2").unwrap();
    let p = f.prefix;
    addr(&c, "c0", f.client, p);
    addr(&c, "c1", f.client_b_side, p);
    addr(&a, "a0", f.a_client_side, p);
    addr(&a, "a1", f.a_server_side, p);
    addr(&a, "a2", f.a_cluster, p);
    addr(&s, "s0", f.server, p);
    addr(&s, "s1", f.server_b_side, p);
    addr(&b, "b0", f.b_server_side, p);
    addr(&b, "b1", f.b_client_side, p);
    addr(&b, "b2", f.b_cluster, p);
    let ip = if f.v6 { "ip -6" } else { "ip" };
    let client_net = if f.v6 { "2001:db8:c::/64" } else { "192.0.2.0/24" };
    // The client goes through A; the server answers the client's network through B; B
    // delivers it straight to the client.
    c.sh(&format!("{ip} route add default via {}", f.a_client_side)).unwrap();
    s.sh(&format!("{ip} route add {client_net} via {}", f.b_server_side)).unwrap();
    b.sh(&format!("{ip} route add {client_net} via {}", f.client_b_side)).unwrap();
    for ns in [&a, &b] {
        ns.sh("sysctl -qw net.ipv4.ip_forward=1 net.ipv6.conf.all.forwarding=1").unwrap();
    }
    // The client accepts the server's reply on its second link (asymmetric path).
    c.sh("sysctl -qw net.ipv4.conf.all.rp_filter=0 net.ipv4.conf.c1.rp_filter=0 net.ipv4.conf.c0.rp_filter=0").unwrap();
    let dir = std::env::temp_dir().join(format!("lb-fig1-{}-{}", c.name(), if f.v6 { 6 } else { 4 }));
    std::fs::create_dir_all(&dir).unwrap();
    Topology { f, c, a, s, b, dir }
}

impl Topology {
    fn config(&self, me: &str, proxy: bool, delay_ms: u64) -> String {
        let f = self.f;
        let any = if f.v6 { "[::]" } else { "0.0.0.0" };
        let proxy = if proxy {
            format!("\n[proxy]\nlisten = \"{any}:8080\"\nspoof = true\nintercept_tcp_ports = [80]\n")
        } else {
            String::new()
        };
        format!(
            "[node]\naddress = \"{me}\"\n\n[cluster]\nport = 7400\nkeepalive_ms = 200\ntest_send_delay_ms = {delay_ms}\nplaintext = true\n\
             members = [\"{}\", \"{}\"]\n\n[admin]\nlisten = \"127.0.0.1:9741\"\n\n\
             [dataplane]\nqueue = 3\nintercept_tcp_ports = [80]\nhold_ms = 1500\nmtu = 1500\nlinger_ms = 500\nembryonic_ms = 3000\nhalf_closed_ms = 3000\n{proxy}",
            f.a_cluster, f.b_cluster
        )
    }

    fn start(&self, ns: &Netns, name: &str, config: String) -> Member {
        Member::start(ns, &self.dir, name, &config)
    }
}

/// The server: echoes exactly PAYLOAD bytes per connection and records each peer address.
struct Server {
    stop: Arc<AtomicBool>,
    peers: Arc<std::sync::Mutex<Vec<SocketAddr>>>,
    served: Arc<AtomicUsize>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Server {
    fn start(t: &Topology) -> Server {
        let stop = Arc::new(AtomicBool::new(false));
        let peers = Arc::new(std::sync::Mutex::new(Vec::new()));
        let served = Arc::new(AtomicUsize::new(0));
        let (st, pe, se) = (stop.clone(), peers.clone(), served.clone());
        let listen = SocketAddr::new(t.f.server.parse().unwrap(), 80);
        let ns_name = t.s.name().to_string();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            let f = std::fs::File::open(format!("/run/netns/{ns_name}")).unwrap();
            nix_setns(&f);
            let l = TcpListener::bind(listen).unwrap();
            l.set_nonblocking(true).unwrap();
            ready_tx.send(()).unwrap();
            while !st.load(Ordering::Relaxed) {
                match l.accept() {
                    Ok((mut s, peer)) => {
                        pe.lock().unwrap().push(peer);
                        let se = se.clone();
                        std::thread::spawn(move || {
                            s.set_nonblocking(false).unwrap();
                            s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
                            let mut buf = vec![0u8; PAYLOAD];
                            if s.read_exact(&mut buf).is_ok() && s.write_all(&buf).is_ok() {
                                se.fetch_add(1, Ordering::Relaxed);
                            }
                        });
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        ready_rx.recv_timeout(Duration::from_secs(5)).unwrap();
        Server { stop, peers, served, thread: Some(thread) }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn nix_setns(f: &std::fs::File) {
    use std::os::fd::AsRawFd;
    // SAFETY: setns on a valid namespace fd affects only this thread.
    assert_eq!(unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) }, 0, "setns");
}

/// One 1 MiB request/response from the client through A. Ok when every byte came back.
fn exchange(t: &Topology, timeout: Duration) -> Result<SocketAddr, String> {
    let to = SocketAddr::new(t.f.server.parse().unwrap(), 80);
    t.c.run(|| {
        let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(5)).map_err(|e| format!("connect: {e}"))?;
        let local = s.local_addr().map_err(|e| format!("local address: {e}"))?;
        s.set_read_timeout(Some(timeout)).unwrap();
        s.set_write_timeout(Some(timeout)).unwrap();
        let data: Vec<u8> = (0..PAYLOAD).map(|i| (i * 7 % 251) as u8).collect();
        let writer = {
            let mut w = s.try_clone().unwrap();
            let d = data.clone();
            std::thread::spawn(move || w.write_all(&d).map_err(|e| format!("write: {e}")))
        };
        let mut back = vec![0u8; PAYLOAD];
        let r = s.read_exact(&mut back).map_err(|e| format!("read: {e}"));
        let _ = s.shutdown(std::net::Shutdown::Both);
        writer.join().unwrap()?;
        r?;
        if back != data {
            return Err("the bytes that came back differ".into());
        }
        Ok(local)
    })
}

fn run_fig1(f: &'static Fam) {
    let t = topology(f);
    let server = Server::start(&t);
    let mut a = t.start(&t.a, "a", t.config(f.a_cluster, true, 0));

    // B outside the cluster: the server's SYN-ACK goes straight to the client, which resets it.
    let r = exchange(&t, Duration::from_secs(6));
    if r.is_ok() {
        let dump =
            t.a.run(|| lb::client::request("127.0.0.1:9741".parse().unwrap(), "GET", "/metrics", None).unwrap().1);
        let b_state =
            t.b.sh("ip -s link; ip route; iptables -t raw -S; nft list table inet lb; ss -tan").unwrap_or_default();
        panic!(
            "without the cluster the request must fail (asymmetric return); server saw {:?}\nA log:\n{}\nA metrics:\n{}\nB:\n{}",
            server.peers.lock().unwrap(),
            a.log(),
            dump.lines().filter(|l| l.starts_with("lb_dataplane") || l.starts_with("lb_entries")).collect::<Vec<_>>().join("\n"),
            b_state
        );
    }

    // B joins the cluster: the same request succeeds.
    let b = t.start(&t.b, "b", t.config(f.b_cluster, false, 0));
    wait_until("A and B established", Duration::from_secs(10), || metric(&t.a, "lb_peers{state=\"established\"}") == 1);
    let client_side = exchange(&t, Duration::from_secs(20))
        .unwrap_or_else(|e| panic!("clustered exchange failed: {e}\nA:\n{}\nB:\n{}", a.log(), b.log()));
    // The data plane publishes its counters every 100 ms.
    wait_until("B's encapsulation counter", Duration::from_secs(3), || {
        metric(&t.b, "lb_dataplane_packets_total{outcome=\"encapsulated\"}") > 100
    });
    wait_until("A's decapsulation counter", Duration::from_secs(3), || {
        metric(&t.a, "lb_dataplane_packets_total{outcome=\"decapsulated\"}") > 100
    });
    assert!(
        server.peers.lock().unwrap().iter().all(|p| p.ip() == f.client.parse::<IpAddr>().unwrap()),
        "the proxy spoofed the client"
    );
    assert_eq!(server.served.load(Ordering::Relaxed), 1);
    wait_until("the proxy's counters", Duration::from_secs(5), || {
        metric(&t.a, "lb_proxy_connections_total{outcome=\"spoofed_ok\"}") >= 1
            && metric(&t.a, "lb_proxy_bytes_total{direction=\"to_client\"}") >= PAYLOAD as u64
    });
    // Both connections of that exchange (client side and spoofed server side) closed: after
    // the linger A sends REMOVE and B forgets them. (Leftovers of the failed attempt without
    // the cluster are judged by their own timers and are not what this checks.)
    let server_side = *server.peers.lock().unwrap().last().unwrap();
    let finished = [client_side.to_string(), server_side.to_string()];
    let t0 = Instant::now();
    loop {
        let flows = t
            .b
            .run(|| lb::client::request("127.0.0.1:9741".parse().unwrap(), "GET", "/flows?limit=0", None).unwrap().1);
        if !finished.iter().any(|ep| flows.contains(&format!("\"src\":\"{ep}\""))) {
            break;
        }
        if t0.elapsed() > Duration::from_secs(10) {
            let a_flows =
                t.a.run(|| lb::client::request("127.0.0.1:9741".parse().unwrap(), "GET", "/flows", None).unwrap().1);
            panic!(
                "A's finished connections {finished:?} were not removed at B:\nB /flows: {flows}\nA /flows: {a_flows}\nA log:\n{}",
                a.log()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(b);
    // SIGTERM: A removes every rule it installed (data plane chains, TPROXY, policy routing).
    let iptables = if f.v6 { "ip6tables" } else { "iptables" };
    let before =
        t.a.sh(&format!(
            "{iptables} -t raw -S; {iptables} -t mangle -S; ip {} rule; nft list tables",
            if f.v6 { "-6" } else { "-4" }
        ))
        .unwrap();
    assert!(
        before.contains("LB-PRE")
            && before.contains("TPROXY")
            && before.contains("lookup 100")
            && before.contains("table inet lb"),
        "{before}"
    );
    // The fast path let packets of A's own connections skip the queue.
    let fast = t.a.sh(&format!("{iptables} -t raw -nvxL LB-PRE")).unwrap();
    let skipped = fast.lines().find(|l| l.contains("mark match")).and_then(|l| l.split_whitespace().next());
    assert!(skipped.and_then(|n| n.parse::<u64>().ok()).is_some_and(|n| n > 0), "{fast}");
    a.terminate();
    let after =
        t.a.sh(&format!(
            "{iptables} -t raw -S; {iptables} -t mangle -S; ip {} rule; nft list tables",
            if f.v6 { "-6" } else { "-4" }
        ))
        .unwrap();
    assert!(
        !after.contains("LB-")
            && !after.contains("TPROXY")
            && !after.contains("lookup 100")
            && !after.contains("table inet lb"),
        "left behind:\n{after}"
    );
}

fn run_fig1_delayed_install_and_restart(f: &'static Fam) {
    let t = topology(f);
    let _server = Server::start(&t);
    // A's updates reach B 400 ms late: the server's SYN-ACK beats the INSTALL to B.
    let a = t.start(&t.a, "a", t.config(f.a_cluster, true, 400));
    let b = t.start(&t.b, "b", t.config(f.b_cluster, false, 0));
    wait_until("A and B established", Duration::from_secs(10), || metric(&t.a, "lb_peers{state=\"established\"}") == 1);
    exchange(&t, Duration::from_secs(20)).unwrap_or_else(|e| panic!("delayed exchange failed: {e}\nB:\n{}", b.log()));
    wait_until("the SYN-ACK held at B", Duration::from_secs(3), || {
        metric(&t.b, "lb_dataplane_packets_total{outcome=\"held\"}") >= 1
    });
    wait_until("and released by the INSTALL", Duration::from_secs(3), || {
        metric(&t.b, "lb_dataplane_packets_total{outcome=\"released\"}") >= 1
    });

    // Restart B: it rejoins, and new connections succeed.
    drop(b);
    let b = t.start(&t.b, "b2", t.config(f.b_cluster, false, 0));
    wait_until("B rejoined", Duration::from_secs(10), || metric(&t.b, "lb_peers{state=\"established\"}") == 1);
    exchange(&t, Duration::from_secs(20))
        .unwrap_or_else(|e| panic!("exchange after B's restart failed: {e}\nB:\n{}", b.log()));
    assert_eq!(metric(&t.b, "lb_dataplane_up"), 1);

    // kill -9 A: its rules stay behind; the restarted A clears them and works.
    drop(a);
    let a = t.start(&t.a, "a2", t.config(f.a_cluster, true, 0));
    wait_until("A rejoined", Duration::from_secs(10), || metric(&t.a, "lb_peers{state=\"established\"}") == 1);
    exchange(&t, Duration::from_secs(20))
        .unwrap_or_else(|e| panic!("exchange after A's restart failed: {e}\nA:\n{}", a.log()));
    let rules = t.a.sh("iptables -t mangle -S | grep -c TPROXY; ip -4 rule | grep -c 'lookup 100'").unwrap();
    assert_eq!(rules.split_whitespace().collect::<Vec<_>>(), ["1", "1"], "one copy of each rule after the restart");
    drop(a);
}

#[test]
fn fig1_asymmetric_return_ipv4() {
    run_fig1(&V4);
}

#[test]
fn fig1_asymmetric_return_ipv6() {
    run_fig1(&V6);
}

#[test]
fn fig1_delayed_install_is_held_and_restart_rejoins_ipv4() {
    run_fig1_delayed_install_and_restart(&V4);
}

/// Issue 11: a reload adds a bypass rule while traffic runs: the next new connection to the
/// server is installed as BYPASS, with no restart (before, SIGHUP applied nothing).
#[test]
fn sighup_adds_a_bypass_rule_for_the_next_new_flows() {
    let f = &V4;
    let t = topology(f);
    let _server = Server::start(&t);
    let config = t.config(f.a_cluster, false, 0);
    let a = t.start(&t.a, "a", config.clone());
    let _b = t.start(&t.b, "b", t.config(f.b_cluster, false, 0));
    wait_until("A and B established", Duration::from_secs(10), || metric(&t.a, "lb_peers{state=\"established\"}") == 1);
    let new_bypass = || metric(&t.a, "lb_dataplane_decisions_total{reason=\"new_bypass\"}");
    let new_local = || metric(&t.a, "lb_dataplane_decisions_total{reason=\"new_local\"}");
    exchange(&t, Duration::from_secs(6)).expect("the first exchange, handed over as in Fig. 1");
    // The driver publishes its counters every 100 ms.
    wait_until("the first SYN counted", Duration::from_secs(5), || new_local() == 1);
    assert_eq!(new_bypass(), 0);
    let with_bypass = config
        .replace("[dataplane]\n", &format!("[dataplane]\nbypass = [{{ net = \"{}/32\", port = 80 }}]\n", f.server));
    std::fs::write(t.dir.join("a.toml"), with_bypass).unwrap();
    a.signal(libc::SIGHUP);
    wait_until("the reload", Duration::from_secs(5), || a.log().contains("SIGHUP: configuration reloaded"));
    assert!(a.log().contains("keys=dataplane.bypass"), "{}", a.log());
    let _ = exchange(&t, Duration::from_secs(3));
    wait_until("a BYPASS decision", Duration::from_secs(5), || new_bypass() == 1);
    assert_eq!(new_local(), 1, "the second connection was not taken as local: {}", a.log());
}

/// Without a usable `nft` (missing here; a kernel before 5.4 refuses the table the same way)
/// the member still runs its data plane, warned, with every intercepted packet queued.
#[test]
fn without_nft_the_data_plane_runs_without_the_fast_path() {
    let ns = Netns::new("f1n").unwrap();
    ns.sh("ip addr add 198.18.9.1/32 dev lo").unwrap();
    let dir = std::env::temp_dir().join(format!("lb-nonft-{}", ns.name()));
    std::fs::create_dir_all(dir.join("bin")).unwrap();
    // A PATH with everything lb runs but nft.
    for tool in ["iptables", "iptables-restore", "ip6tables", "ip6tables-restore", "ip"] {
        let found = ["/usr/sbin", "/sbin", "/usr/bin", "/bin"]
            .iter()
            .map(|d| std::path::Path::new(d).join(tool))
            .find(|p| p.exists())
            .unwrap_or_else(|| panic!("{tool} not installed"));
        std::os::unix::fs::symlink(found, dir.join("bin").join(tool)).unwrap();
    }
    let config = "[node]\naddress = \"198.18.9.1\"\n[cluster]\nplaintext = true\nmembers = [\"198.18.9.1\"]\n\
                  [admin]\nlisten = \"127.0.0.1:9741\"\n[dataplane]\nqueue = 5\nintercept_tcp_ports = [80]\n";
    let path = dir.join("bin").to_string_lossy().to_string();
    let mut m = Member::start_with_env(&ns, &dir, "nonft", config, &[("PATH", &path)]);
    assert!(m.log().contains("fast path unavailable"), "{}", m.log());
    let raw = ns.sh("iptables -t raw -S LB-PRE").unwrap();
    assert!(raw.contains("NFQUEUE") && !raw.contains("mark"), "no fast-path RETURN rule:\n{raw}");
    assert_eq!(metric(&ns, "lb_dataplane_up"), 1);
    m.terminate();
    assert!(ns.sh("iptables -t raw -S").unwrap().lines().all(|l| !l.contains("LB-")), "rules removed");
    let _ = std::fs::remove_dir_all(&dir);
}
