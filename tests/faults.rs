//! Fault tests: after each fault every member's database converges to the same content
//! (compared by digest), and no entry owned by a live member is lost.
//!
//! - a late joiner during heavy churn (in-process members on loopback);
//! - a flapping member, killed and restarted again and again while the others churn;
//! - a network partition and its heal: three `lb run` processes in network namespaces on a
//!   bridge, one member's link taken down and brought back.

mod common;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cluster_proto::mesh::{Mesh, MeshConfig, Retries};
use cluster_proto::session::SessionConfig;
use cluster_proto::{Action, Connection, Protocol};
use common::*;
use handoff::netns::{veth, Netns};

fn cfg(me: IpAddr, port: u16, members: &[IpAddr]) -> MeshConfig {
    let s = SessionConfig { version: 1, keepalive: Duration::from_millis(200), dead_after: 3, restart_time: 0 };
    let mut c = MeshConfig::uniform(me, port, members, s, Retries::Infinite);
    c.backoff_min = Duration::from_millis(20);
    c.backoff_max = Duration::from_millis(200);
    c
}

async fn start(me: IpAddr, port: u16, members: &[IpAddr]) -> Mesh {
    start_mesh(cfg(me, port, members)).await
}

fn conn(owner: u8, i: u32) -> Connection {
    let src = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(192, 0, 2, owner)), 1024 + (i % 60_000) as u16);
    let dst = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(198, 51, 100, (i / 60_000) as u8)), 443);
    Connection::new(Protocol::Tcp, src, dst).unwrap()
}

/// Every live member sees the same cluster: its own table plus every peer's.
fn converged(ms: &[&Mesh]) -> bool {
    let total: usize = ms.iter().map(|m| m.local().len()).sum();
    ms.iter().all(|m| m.local().len() + m.database().len() == total)
        && ms.iter().all(|m| m.view_digest() == ms[0].view_digest())
}

/// Installs and removes connections of `m` for a while: about half of them stay.
async fn churn(m: Mesh, owner: u8, rounds: u32) {
    for r in 0..rounds {
        for i in 0..200 {
            let c = conn(owner, r * 200 + i);
            m.install(c, Action::Forward);
            if i % 2 == 0 {
                m.remove(&c);
            }
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn late_joiner_during_heavy_churn_converges() {
    let port = free_port();
    let addrs = [lo(101), lo(102), lo(103)];
    let a = start(addrs[0], port, &addrs).await;
    let b = start(addrs[1], port, &addrs).await;
    let ca = tokio::spawn(churn(a.clone(), 101, 200));
    let cb = tokio::spawn(churn(b.clone(), 102, 200));
    tokio::time::sleep(Duration::from_millis(150)).await;
    let c = start(addrs[2], port, &addrs).await; // joins in the middle of it
    for i in 0..1000 {
        c.install(conn(103, i), Action::Bypass);
    }
    ca.await.unwrap();
    cb.await.unwrap();
    wait_until_async("convergence after churn", Duration::from_secs(20), || converged(&[&a, &b, &c])).await;
    assert_eq!(a.local().len(), 200 * 200 / 2, "half of a's connections stayed");
    for m in [a, b, c] {
        m.shutdown(Duration::from_secs(1)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flapping_member_converges_and_live_entries_survive() {
    let port = free_port();
    let addrs = [lo(111), lo(112), lo(113)];
    let a = start(addrs[0], port, &addrs).await;
    let b = start(addrs[1], port, &addrs).await;
    for i in 0..500 {
        a.install(conn(111, 100_000 + i), Action::Forward);
        b.install(conn(112, 100_000 + i), Action::Forward);
    }
    let ca = tokio::spawn(churn(a.clone(), 111, 150));
    let cb = tokio::spawn(churn(b.clone(), 112, 150));
    for round in 0..5 {
        let c = start(addrs[2], port, &addrs).await;
        c.install(conn(113, round), Action::Forward);
        tokio::time::sleep(Duration::from_millis(60 + 20 * round as u64)).await;
        // The live members' long-lived entries are never lost at the flapping member's peers.
        assert!(b.database().lookup(&conn(111, 100_000)).is_some());
        assert!(a.database().lookup(&conn(112, 100_499)).is_some());
        if round % 2 == 0 {
            c.kill();
        } else {
            c.shutdown(Duration::from_millis(200)).await;
        }
    }
    let c = start(addrs[2], port, &addrs).await;
    c.install(conn(113, 999), Action::Forward);
    ca.await.unwrap();
    cb.await.unwrap();
    let t0 = Instant::now();
    while !converged(&[&a, &b, &c]) {
        if t0.elapsed() > Duration::from_secs(20) {
            let describe = |m: &Mesh| {
                format!(
                    "{}: local {} db {} by owner {:?} peers {:?}",
                    m.address(),
                    m.local().len(),
                    m.database().len(),
                    (0..3u8)
                        .map(|o| m.database().count_of(cluster_proto::MemberId(o), Action::Forward))
                        .collect::<Vec<_>>(),
                    m.peers().iter().map(|p| (p.address, p.state, p.role, p.channels_lost)).collect::<Vec<_>>()
                )
            };
            panic!("no convergence after flapping:\n{}\n{}\n{}", describe(&a), describe(&b), describe(&c));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(a.database().count_of(c.me(), Action::Forward), 1, "only the last incarnation's entry");
    for m in [a, b, c] {
        m.shutdown(Duration::from_secs(1)).await;
    }
}

/// `lb run` in a namespace; killed on drop.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn flows(ns: &Netns) -> lb::admin::FlowsView {
    ns.run(|| lb::client::get_json("127.0.0.1:9741".parse().unwrap(), "/flows?limit=0").unwrap())
}

fn install(ns: &Netns, src: &str) {
    let body = format!(r#"{{"protocol":"tcp","src":"{src}","dst":"198.51.100.1:443"}}"#);
    let (status, text) =
        ns.run(|| lb::client::request("127.0.0.1:9741".parse().unwrap(), "POST", "/connections", Some(&body)).unwrap());
    assert!(status == 201 || status == 200, "{text}");
}

/// The set of (connection, owner) a member knows, to compare members.
fn set(ns: &Netns) -> Vec<String> {
    let mut v: Vec<String> = flows(ns).flows.iter().map(|f| format!("{} {} {}", f.src, f.dst, f.owner)).collect();
    v.sort();
    v
}

#[test]
fn partition_and_heal_in_namespaces() {
    const LB: &str = env!("CARGO_BIN_EXE_lb");
    let sw = Netns::new("pts").unwrap();
    sw.sh("ip link add br0 type bridge && ip link set br0 up").unwrap();
    let addrs = ["198.18.20.1", "198.18.20.2", "198.18.20.3"];
    let mut nss = Vec::new();
    for (i, a) in addrs.iter().enumerate() {
        let ns = Netns::new("ptm").unwrap();
        veth(&ns, "e0", &sw, &format!("p{i}")).unwrap();
        sw.sh(&format!("ip link set p{i} master br0")).unwrap();
        ns.sh(&format!("ip addr add {a}/24 dev e0")).unwrap();
        nss.push(ns);
    }
    let dir = std::env::temp_dir().join(format!("lb-faults-{}", sw.name()));
    std::fs::create_dir_all(&dir).unwrap();
    let _cleanup = scopeguard(dir.clone());
    let mut procs = Vec::new();
    for (i, ns) in nss.iter().enumerate() {
        let cfg = format!(
            "[node]\naddress = \"{}\"\n[cluster]\nkeepalive_ms = 200\nplaintext = true\nmembers = [\"{}\", \"{}\", \"{}\"]\n\
             [admin]\nlisten = \"127.0.0.1:9741\"\n",
            addrs[i], addrs[0], addrs[1], addrs[2]
        );
        let path = dir.join(format!("m{i}.toml"));
        std::fs::write(&path, cfg).unwrap();
        let log = std::fs::File::create(dir.join(format!("m{i}.log"))).unwrap();
        let child = ns
            .spawn(
                Command::new(LB)
                    .args(["run", "--config"])
                    .arg(&path)
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(log),
            )
            .unwrap();
        procs.push(Proc(child));
    }
    for ns in &nss {
        wait_until("lb ready", Duration::from_secs(10), || {
            ns.run(|| {
                lb::client::request("127.0.0.1:9741".parse().unwrap(), "GET", "/ready", None).is_ok_and(|r| r.0 == 200)
            })
        });
    }
    for (i, ns) in nss.iter().enumerate() {
        for k in 0..50 {
            install(ns, &format!("192.0.2.{}:{}", 10 + i, 2000 + k));
        }
    }
    wait_until("full view everywhere", Duration::from_secs(10), || nss.iter().all(|ns| flows(ns).total == 150));

    // Partition member 3 from the others.
    sw.sh("ip link set p2 down").unwrap();
    wait_until("the two sides purge each other", Duration::from_secs(10), || {
        flows(&nss[0]).total == 100 && flows(&nss[1]).total == 100 && flows(&nss[2]).total == 50
    });
    // Live members' entries survive at each other, and changes keep flowing between them.
    install(&nss[0], "192.0.2.10:9999");
    wait_until("updates still flow on the majority side", Duration::from_secs(5), || flows(&nss[1]).total == 101);
    install(&nss[2], "192.0.2.12:9999"); // made while cut off

    // Heal: everyone converges to the same content, changes made during the partition included.
    let t0 = Instant::now();
    sw.sh("ip link set p2 up").unwrap();
    wait_until("convergence after heal", Duration::from_secs(15), || {
        let s0 = set(&nss[0]);
        s0.len() == 152 && set(&nss[1]) == s0 && set(&nss[2]) == s0
    });
    eprintln!("healed and converged in {:?}", t0.elapsed());
    drop(procs);
}

/// Removes a directory when dropped.
fn scopeguard(dir: std::path::PathBuf) -> impl Drop {
    struct G(std::path::PathBuf);
    impl Drop for G {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    G(dir)
}
