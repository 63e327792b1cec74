//! Paper Fig. 2 in real network namespaces: a client behind a spoofing downstream proxy D
//! downloads objects through two load-balancing members L1 and L2, which hand each new
//! connection to one of three upstream proxy members U1-U3; D and the upstreams keep parallel
//! dictionaries (the chained WAN-optimization codec). The server's replies to the spoofed
//! client addresses come back through L2, which is never the owner, and reach the owning
//! upstream in IP-in-IP.
//!
//! ```text
//!   client C ---- D (downstream, spoofs C) ----+------ core LAN 198.18.0.0/24 (bridge) ------+
//!   192.0.2.10      .2                         |        |        |       |       |           |
//!   198.51.100.10                             L1 .11   L2 .12   U1 .21  U2 .22  U3 .23   S .80
//!                                                                                 (203.0.113.80, .81)
//!   D -> 203.0.113.80 via L1, -> 203.0.113.81 via L2 (route MTU 1480 for the IP-in-IP hop)
//!   U* -> servers direct; U* -> client networks via D (the chained connection's replies)
//!   S  -> client networks via L2 (asymmetric return; L2 forwards to the owning upstream)
//! ```
//!
//! With the affinity policy, repeat downloads cost at most 5% of the object bytes between D and
//! the upstreams; with a 5-tuple hash (the comparison policy) they cost far more, because each
//! connection lands on an upstream whose dictionary may not hold the object. Removing an
//! upstream mid-run moves its pairs, and the downloads go on.
//!
//! Every namespace, veth and process is this test's own, removed on success and failure.

mod common;
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::lbproc::{admin_get as get, metric, LbProcess as Member, ADMIN};
use common::wait_until;
use handoff::netns::{veth, Netns};

const OBJECT: usize = 128 * 1024;
const OBJECTS: u32 = 4;

/// One address family's plan of the topology above.
struct Fam {
    v6: bool,
    /// The two server addresses (on the server's loopback).
    servers: [&'static str; 2],
    /// The server addresses' network (routed to S by the members).
    server_net: &'static str,
    /// The two client sites' addresses (both on the client's link) and networks.
    clients: [&'static str; 2],
    client_nets: [&'static str; 2],
    /// D's address in each client network.
    client_gw: [&'static str; 2],
    /// Core LAN addresses of D, the balancers, the upstreams and S, and its prefix length.
    d: &'static str,
    l: [&'static str; 2],
    u: [&'static str; 3],
    s: &'static str,
    core_prefix: u8,
    client_prefix: u8,
}

const V4: Fam = Fam {
    v6: false,
    servers: ["203.0.113.80", "203.0.113.81"],
    server_net: "203.0.113.0/24",
    clients: ["192.0.2.10", "198.51.100.10"],
    client_nets: ["192.0.2.0/24", "198.51.100.0/24"],
    client_gw: ["192.0.2.1", "198.51.100.1"],
    d: "198.18.0.2",
    l: ["198.18.0.11", "198.18.0.12"],
    u: ["198.18.0.21", "198.18.0.22", "198.18.0.23"],
    s: "198.18.0.80",
    core_prefix: 24,
    client_prefix: 24,
};

const V6: Fam = Fam {
    v6: true,
    servers: ["2001:db8:5::80", "2001:db8:5::81"],
    server_net: "2001:db8:5::/64",
    clients: ["2001:db8:c1::10", "2001:db8:c2::10"],
    client_nets: ["2001:db8:c1::/64", "2001:db8:c2::/64"],
    client_gw: ["2001:db8:c1::1", "2001:db8:c2::1"],
    d: "2001:db8:ff::2",
    l: ["2001:db8:ff::11", "2001:db8:ff::12"],
    u: ["2001:db8:ff::21", "2001:db8:ff::22", "2001:db8:ff::23"],
    s: "2001:db8:ff::80",
    core_prefix: 64,
    client_prefix: 64,
};

impl Fam {
    fn ip(&self) -> &'static str {
        if self.v6 {
            "ip -6"
        } else {
            "ip -4"
        }
    }
    fn iptables(&self) -> &'static str {
        if self.v6 {
            "ip6tables"
        } else {
            "iptables"
        }
    }
    fn host(&self) -> u8 {
        if self.v6 {
            128
        } else {
            32
        }
    }
    fn nodad(&self) -> &'static str {
        if self.v6 {
            " nodad"
        } else {
            ""
        }
    }
}

/// The bytes of object `id` that `server` serves to `client` (each site has its own objects,
/// e.g. its mailboxes): pseudo-random, so only a dictionary that saw them can shrink them.
fn object(server: IpAddr, client: IpAddr, id: u32) -> Vec<u8> {
    let bits = |a: IpAddr| match a {
        IpAddr::V4(a) => u64::from(u32::from(a)),
        IpAddr::V6(a) => {
            let x = u128::from(a);
            (x >> 64) as u64 ^ x as u64
        }
    };
    dictionary_affinity::sample::Rng(bits(server) << 32 ^ bits(client) << 8 ^ u64::from(id)).bytes(OBJECT)
}

struct Topology {
    f: &'static Fam,
    _sw: Netns,
    c: Netns,
    d: Netns,
    l: Vec<Netns>,
    u: Vec<Netns>,
    s: Netns,
    dir: PathBuf,
}

impl Drop for Topology {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn topology(f: &'static Fam) -> Topology {
    let sw = Netns::new("f2sw").unwrap();
    let c = Netns::new("f2c").unwrap();
    let d = Netns::new("f2d").unwrap();
    let l: Vec<Netns> = (1..=2).map(|i| Netns::new(&format!("f2l{i}")).unwrap()).collect();
    let u: Vec<Netns> = (1..=3).map(|i| Netns::new(&format!("f2u{i}")).unwrap()).collect();
    let s = Netns::new("f2s").unwrap();
    let (ip, nodad) = (f.ip(), f.nodad());
    sw.sh("ip link add br0 type bridge && ip link set br0 up").unwrap();
    let mut core = vec![(&d, "pd", f.d)];
    for (i, ns) in l.iter().enumerate() {
        core.push((ns, ["pl1", "pl2"][i], f.l[i]));
    }
    for (i, ns) in u.iter().enumerate() {
        core.push((ns, ["pu1", "pu2", "pu3"][i], f.u[i]));
    }
    core.push((&s, "ps", f.s));
    for (ns, port, a) in &core {
        veth(ns, "core", &sw, port).unwrap();
        sw.sh(&format!("ip link set {port} master br0")).unwrap();
        ns.sh(&format!("ip addr add {a}/{} dev core{nodad}", f.core_prefix)).unwrap();
    }
    veth(&c, "c0", &d, "d0").unwrap();
    for i in 0..2 {
        c.sh(&format!("ip addr add {}/{} dev c0{nodad}", f.clients[i], f.client_prefix)).unwrap();
        d.sh(&format!("ip addr add {}/{} dev d0{nodad}", f.client_gw[i], f.client_prefix)).unwrap();
    }
    c.sh(&format!("{ip} route add default via {}", f.client_gw[0])).unwrap();
    // D reaches one server through each load-balancing member; the route MTU leaves room for
    // the outer header the member adds (the upstream's SYN-ACK, which that member never
    // sees, goes straight to D).
    for i in 0..2 {
        d.sh(&format!("{ip} route add {}/{} via {} mtu 1440", f.servers[i], f.host(), f.l[i])).unwrap();
    }
    for ns in l.iter().chain(&u) {
        ns.sh(&format!("{ip} route add {} via {}", f.server_net, f.s)).unwrap();
        for net in f.client_nets {
            ns.sh(&format!("{ip} route add {net} via {}", f.d)).unwrap();
        }
    }
    for i in 0..2 {
        s.sh(&format!("ip addr add {}/{} dev lo{nodad}", f.servers[i], f.host())).unwrap();
        s.sh(&format!("{ip} route add {} via {}", f.client_nets[i], f.l[1])).unwrap();
    }
    for ns in [&d].into_iter().chain(&l).chain(&u) {
        ns.sh("sysctl -qw net.ipv4.ip_forward=1 net.ipv6.conf.all.forwarding=1").unwrap();
    }
    // What crosses between D and the upstreams, counted by the kernel (both directions).
    let ipt = f.iptables();
    d.sh(&format!(
        "{ipt} -A OUTPUT -o core -p tcp --dport 80 -m comment --comment fig2-up && \
         {ipt} -A INPUT -i core -p tcp --sport 80 -m comment --comment fig2-down"
    ))
    .unwrap();
    let dir = std::env::temp_dir().join(format!("lb-fig2-{}", c.name()));
    std::fs::create_dir_all(&dir).unwrap();
    Topology { f, _sw: sw, c, d, l, u, s, dir }
}

fn cluster_section(f: &Fam, me: &str) -> String {
    let members: Vec<String> = f.l.iter().chain(&f.u).map(|a| format!("\"{a}\"")).collect();
    format!(
        "[node]\naddress = \"{me}\"\n\n[cluster]\nport = 7400\nversion = 2\nkeepalive_ms = 200\nplaintext = true\n\
         members = [{}]\n\n[admin]\nlisten = \"{ADMIN}\"\n",
        members.join(", ")
    )
}

const DATAPLANE: &str = "[dataplane]\nqueue = 3\nintercept_tcp_ports = [80]\nhold_ms = 1500\nmtu = 1500\n\
                         linger_ms = 50\nembryonic_ms = 3000\nhalf_closed_ms = 3000\n";

impl Topology {
    fn start(&self, ns: &Netns, name: &str, config: String) -> Member {
        Member::start(ns, &self.dir, name, &config)
    }

    /// The proxies' TPROXY listener: `[::]` takes both families and installs rules for both.
    fn listen(&self) -> &'static str {
        if self.f.v6 {
            "[::]:8080"
        } else {
            "0.0.0.0:8080"
        }
    }

    fn downstream(&self) -> Member {
        let (d, listen) = (self.f.d, self.listen());
        let config = format!(
            "[node]\naddress = \"{d}\"\n\n[cluster]\nport = 7400\nplaintext = true\nmembers = [\"{d}\"]\n\n\
             [admin]\nlisten = \"{ADMIN}\"\n\n[proxy]\nlisten = \"{listen}\"\nspoof = true\n\
             intercept_tcp_ports = [80]\nrole = \"downstream\"\nchain_ports = [80]\n"
        );
        self.start(&self.d, "d", config)
    }

    fn upstream(&self, i: usize, name: &str) -> Member {
        let config = format!(
            "{}\n{DATAPLANE}\n[proxy]\nlisten = \"{}\"\nspoof = true\nintercept_tcp_ports = [80]\n\
             role = \"upstream\"\n\n[affinity]\nadvertise_ms = 200\nload_slack = 8\n",
            cluster_section(self.f, self.f.u[i]),
            self.listen()
        );
        self.start(&self.u[i], name, config)
    }

    fn balancer(&self, i: usize, policy: &str, name: &str) -> Member {
        let owners: Vec<String> = self.f.u.iter().map(|a| format!("\"{a}\"")).collect();
        let config = format!(
            "{}\n{DATAPLANE}policy = \"{policy}\"\nowners = [{}]\n\n[affinity]\nadvertise_ms = 200\nload_slack = 8\n",
            cluster_section(self.f, self.f.l[i]),
            owners.join(", ")
        );
        self.start(&self.l[i], name, config)
    }

    /// Bytes between D and the upstreams since the last call (IP packets, both directions).
    fn wire_bytes(&self) -> u64 {
        let ipt = self.f.iptables();
        let out =
            self.d.sh(&format!("{ipt} -L -v -x -n -Z | grep fig2- | awk '{{s += $2}} END {{print s + 0}}'")).unwrap();
        out.trim().parse().unwrap()
    }
}

/// The object server: `GET <id>\n` answers the object's bytes and closes. Records who asked.
struct Server {
    stop: Arc<AtomicBool>,
    peers: Arc<Mutex<Vec<SocketAddr>>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Server {
    fn start(t: &Topology) -> Server {
        let stop = Arc::new(AtomicBool::new(false));
        let peers = Arc::new(Mutex::new(Vec::new()));
        let mut threads = Vec::new();
        for server in t.f.servers {
            let listen = SocketAddr::new(server.parse().unwrap(), 80);
            let l = t.s.run(|| TcpListener::bind(listen).unwrap());
            l.set_nonblocking(true).unwrap();
            let (st, pe) = (stop.clone(), peers.clone());
            threads.push(std::thread::spawn(move || {
                while !st.load(Ordering::Relaxed) {
                    match l.accept() {
                        Ok((mut s, peer)) => {
                            pe.lock().unwrap().push(peer);
                            std::thread::spawn(move || {
                                s.set_nonblocking(false).unwrap();
                                s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                                let mut line = Vec::new();
                                let mut b = [0u8; 1];
                                while line.len() < 64 && s.read_exact(&mut b).is_ok() && b[0] != b'\n' {
                                    line.push(b[0]);
                                }
                                let line = String::from_utf8_lossy(&line).to_string();
                                if let Some(id) = line.strip_prefix("GET ").and_then(|v| v.trim().parse().ok()) {
                                    let _ = s.write_all(&object(listen.ip(), peer.ip(), id));
                                }
                            });
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(5)),
                    }
                }
            }));
        }
        Server { stop, peers, threads }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Downloads object `id` of `server` from client address `client`; checks every byte.
fn download(t: &Topology, client: &str, server: &str, id: u32) -> Result<(), String> {
    let to = SocketAddr::new(server.parse().unwrap(), 80);
    let from = SocketAddr::new(client.parse().unwrap(), 0);
    t.c.run(|| {
        let sock = socket2::Socket::new(socket2::Domain::for_address(from), socket2::Type::STREAM, None).unwrap();
        sock.bind(&from.into()).map_err(|e| format!("bind {from}: {e}"))?;
        sock.connect_timeout(&to.into(), Duration::from_secs(5)).map_err(|e| format!("connect {to}: {e}"))?;
        let mut s: TcpStream = sock.into();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(format!("GET {id}\n").as_bytes()).map_err(|e| format!("write: {e}"))?;
        let mut got = Vec::with_capacity(OBJECT);
        s.read_to_end(&mut got).map_err(|e| format!("read after {} bytes: {e}", got.len()))?;
        if got != object(to.ip(), from.ip(), id) {
            return Err(format!("{client} -> {server} object {id}: {} bytes, not the object's", got.len()));
        }
        Ok(())
    })
}

/// One round: every client site downloads every object of every server once. Returns the
/// object bytes and the bytes that crossed between D and the upstreams.
fn round(t: &Topology, logs: &dyn Fn() -> String, mut between: impl FnMut(usize)) -> (u64, u64) {
    t.wire_bytes();
    let mut n = 0;
    for id in 0..OBJECTS {
        for client in t.f.clients {
            for server in t.f.servers {
                download(t, client, server, id).unwrap_or_else(|e| panic!("download failed: {e}\n{}", logs()));
                n += 1;
                between(n);
            }
        }
    }
    (n as u64 * OBJECT as u64, t.wire_bytes())
}

/// One round with `at_once` downloads in flight at a time (each site's browser opens several
/// connections per host); the same downloads as [`round`], checked byte for byte.
fn round_at_once(t: &Topology, logs: &dyn Fn() -> String, at_once: usize) -> (u64, u64) {
    t.wire_bytes();
    let mut work = Vec::new();
    for id in 0..OBJECTS {
        for client in t.f.clients {
            for server in t.f.servers {
                work.push((client, server, id));
            }
        }
    }
    let n = work.len() as u64;
    let work = Mutex::new(work);
    let failures = Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for _ in 0..at_once {
            s.spawn(|| loop {
                let Some((client, server, id)) = work.lock().unwrap().pop() else { break };
                if let Err(e) = download(t, client, server, id) {
                    failures.lock().unwrap().push(e);
                }
            });
        }
    });
    let failures = failures.into_inner().unwrap();
    if !failures.is_empty() {
        let m = nonzero_metrics(t, &["lb_dataplane", "lb_owner", "lb_conflicts"]);
        panic!("{} of {n} downloads failed: {failures:?}\n{m}\n{}", failures.len(), logs());
    }
    (n * OBJECT as u64, t.wire_bytes())
}

/// The members' metrics of these families that are not zero, one line each, named by member.
fn nonzero_metrics(t: &Topology, families: &[&str]) -> String {
    let mut m = String::new();
    for (name, ns) in [("L1", &t.l[0]), ("L2", &t.l[1]), ("U1", &t.u[0]), ("U2", &t.u[1]), ("U3", &t.u[2])] {
        for line in get(ns, "/metrics").lines() {
            if families.iter().any(|f| line.starts_with(f)) && !line.ends_with(" 0") {
                m.push_str(&format!("{name} {line}\n"));
            }
        }
    }
    m
}

struct Farm {
    d: Member,
    l: Vec<Member>,
    u: Vec<Option<Member>>,
}

impl Farm {
    fn start(t: &Topology, policy: &str, tag: &str) -> Farm {
        let u = (0..3).map(|i| Some(t.upstream(i, &format!("u{}-{tag}", i + 1)))).collect();
        let l = (0..2).map(|i| t.balancer(i, policy, &format!("l{}-{tag}", i + 1))).collect();
        let d = t.downstream();
        wait_until("the cluster's channels", Duration::from_secs(15), || {
            t.l.iter().all(|ns| metric(ns, "lb_peers{state=\"established\"}") == 4)
        });
        Farm { d, l, u }
    }

    /// Reads every member's log (a closure that does not borrow the farm).
    fn logs(&self) -> impl Fn() -> String {
        let mut paths = vec![("D".to_string(), self.d.log_path().to_path_buf())];
        paths.extend(self.l.iter().enumerate().map(|(i, m)| (format!("L{}", i + 1), m.log_path().to_path_buf())));
        paths.extend(
            self.u
                .iter()
                .enumerate()
                .filter_map(|(i, m)| Some((format!("U{}", i + 1), m.as_ref()?.log_path().to_path_buf()))),
        );
        move || {
            paths.iter().map(|(n, p)| format!("--- {n}:\n{}", std::fs::read_to_string(p).unwrap_or_default())).collect()
        }
    }
}

fn percent(part: u64, whole: u64) -> f64 {
    100.0 * part as f64 / whole as f64
}

fn run_fig2(f: &'static Fam) {
    let t = topology(f);
    let server = Server::start(&t);

    // The comparison policy: a 5-tuple hash scatters each pair's connections over the upstreams.
    let farm = Farm::start(&t, "rendezvous", "hash");
    let logs = farm.logs();
    let (objects, first) = round(&t, &logs, |_| {});
    assert!(first > objects / 2, "a first round cannot be saved: {first} of {objects} bytes");
    let (o2, w2) = round(&t, &logs, |_| {});
    let (o3, w3) = round(&t, &logs, |_| {});
    let hash_repeat = percent(w2 + w3, o2 + o3);
    eprintln!(
        "5-tuple hash: first round {:.1}%, repeats {hash_repeat:.1}% of the object bytes",
        percent(first, objects)
    );
    drop(farm);

    // Affinity, with fresh dictionaries everywhere (new processes, nothing persisted).
    let mut farm = Farm::start(&t, "affinity", "aff");
    let logs = farm.logs();
    let (objects, first) = round(&t, &logs, |_| {});
    let (o2, w2) = round(&t, &logs, |_| {});
    let (o3, w3) = round(&t, &logs, |_| {});
    let affinity_repeat = percent(w2 + w3, o2 + o3);
    eprintln!(
        "affinity: first round {:.1}%, repeats {affinity_repeat:.1}% of the object bytes",
        percent(first, objects)
    );
    assert!(affinity_repeat <= 5.0, "affinity: repeats cost {affinity_repeat:.1}% of the object bytes\n{}", logs());
    assert!(
        hash_repeat > 4.0 * affinity_repeat && hash_repeat > 15.0,
        "the 5-tuple hash should cost much more: {hash_repeat:.1}% vs {affinity_repeat:.1}%"
    );

    // The balancers chose by dictionary (statistics advertised in DICT_STATS over version 2).
    let decided_by_dictionary =
        |ns: &Netns| metric(ns, "lb_owner_decisions_total{policy=\"affinity\",reason=\"affinity\"}");
    assert!(
        decided_by_dictionary(&t.l[0]) > 0 && decided_by_dictionary(&t.l[1]) > 0,
        "both balancers use the advertised dictionaries\n{}\n{}",
        get(&t.l[0], "/metrics"),
        get(&t.l[1], "/metrics")
    );
    let flows = get(&t.l[0], "/flows?explain=true&limit=0");
    assert!(flows.contains("bytes saved (decayed"), "GET /flows explains the choice: {flows}");
    // The server's replies came back through L2, which owns nothing, and went on to the owner.
    assert!(metric(&t.l[1], "lb_dataplane_packets_total{outcome=\"encapsulated\"}") > 0);
    let clients: Vec<IpAddr> = f.clients.iter().map(|c| c.parse().unwrap()).collect();
    assert!(server.peers.lock().unwrap().iter().all(|p| clients.contains(&p.ip())), "the server sees the clients");

    // Remove the busiest upstream in the middle of a round: its pairs move, downloads go on.
    let owned: Vec<u64> = t.u.iter().map(|ns| metric(ns, "lb_proxy_connections_total{outcome=\"accepted\"}")).collect();
    let busiest = (0..3).max_by_key(|&i| owned[i]).unwrap();
    let (o4, w4) = round(&t, &logs, |n| {
        if n == 4 {
            // Taken out of service (SIGUSR2): its peers purge its flows at once, where a
            // SIGTERM would have them kept, stale, for its restart time.
            farm.u[busiest].as_mut().unwrap().leave_for_good();
        }
    });
    farm.u[busiest] = None;
    // The next round still meets cold objects (those of the moved pairs fetched before the
    // removal); the one after is back to dictionary hits.
    let (o5, w5) = round(&t, &logs, |_| {});
    let (o6, w6) = round(&t, &logs, |_| {});
    let settled = percent(w6, o6);
    eprintln!(
        "U{} left mid-round: that round {:.1}%, the next {:.1}%, then {settled:.1}% of the object bytes",
        busiest + 1,
        percent(w4, o4),
        percent(w5, o5)
    );
    assert!(settled <= 5.0, "moved pairs warm up again on their new upstream: {settled:.1}%\n{}", logs());
    let flows = get(&t.l[0], "/flows?limit=0");
    assert!(
        !flows.contains(&format!("\"owner\":\"{}\"", f.u[busiest])),
        "no flow left on the removed upstream: {flows}"
    );
}

#[test]
fn fig2_affinity_keeps_repeat_downloads_small_and_survives_an_upstream_leaving_ipv4() {
    run_fig2(&V4);
}

#[test]
fn fig2_affinity_keeps_repeat_downloads_small_and_survives_an_upstream_leaving_ipv6() {
    run_fig2(&V6);
}

/// Fig. 2 with browsers: each client site keeps several downloads in flight at once, so a
/// pair's connections overlap on its upstream (they share the pair's dictionaries) and on the
/// balancers. Affinity still keeps the repeats small; the 5-tuple hash cannot.
fn run_fig2_concurrent(f: &'static Fam, at_once: usize) {
    let t = topology(f);
    let _server = Server::start(&t);
    let repeat = |policy: &str, tag: &str| {
        let farm = Farm::start(&t, policy, tag);
        let logs = farm.logs();
        let (objects, first) = round_at_once(&t, &logs, at_once);
        let (o2, w2) = round_at_once(&t, &logs, at_once);
        let (o3, w3) = round_at_once(&t, &logs, at_once);
        let r = percent(w2 + w3, o2 + o3);
        eprintln!(
            "{policy}, {at_once} at once: first round {:.1}%, repeats {r:.1}% ({:.1}% then {:.1}%)",
            percent(first, objects),
            percent(w2, o2),
            percent(w3, o3)
        );
        let m = nonzero_metrics(
            &t,
            &["lb_owner", "lb_chain_connections", "lb_chain_events", "lb_proxy_conn", "lb_advert", "lb_affinity"],
        );
        let explain: String = t.l.iter().map(|ns| get(ns, "/flows?explain=true&limit=0")).collect();
        (r, format!("{m}\n{explain}\n{}", logs()))
    };
    let (hash, _) = repeat("rendezvous", "hash");
    let (affinity, logs) = repeat("affinity", "aff");
    assert!(affinity <= 5.0, "affinity, {at_once} at once: repeats cost {affinity:.1}% of the object bytes\n{logs}");
    assert!(
        hash > 4.0 * affinity && hash > 15.0,
        "the 5-tuple hash should cost much more: {hash:.1}% vs {affinity:.1}%"
    );
}

#[test]
fn fig2_concurrent_clients_affinity_keeps_repeats_small_ipv4() {
    run_fig2_concurrent(&V4, 8);
}

#[test]
fn fig2_concurrent_clients_affinity_keeps_repeats_small_ipv6() {
    run_fig2_concurrent(&V6, 8);
}
