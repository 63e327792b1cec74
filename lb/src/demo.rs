//! `lb demo`: a three-member cluster in one process on 127.0.0.1-3, through the real mesh
//! driver, control channels and admin API. Needs no root and no configuration.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use cluster_proto::mesh::{Mesh, MeshConfig, PeerState, Retries};
use cluster_proto::session::SessionConfig;
use cluster_proto::{Action, Connection, Protocol};

use crate::admin::{self, AdminState};
use crate::metrics::Metrics;

/// Options of `lb demo`.
#[derive(Clone, Debug)]
pub struct DemoOptions {
    /// Connections each member installs.
    pub connections: usize,
    /// Keep the survivors and their admin APIs running after the demo, until Ctrl-C.
    pub keep_running: bool,
}

struct Member {
    mesh: Mesh,
    admin: SocketAddr,
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0").context("cannot bind on loopback")?.local_addr()?.port())
}

/// The `i`-th synthetic connection of member `m`: mostly IPv4 TCP, some UDP bypass, some IPv6.
fn synthetic(m: usize, i: usize) -> (Connection, Action) {
    let port = 20_000 + (i % 40_000) as u16;
    match i % 10 {
        0 => {
            let src = SocketAddr::new(
                IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, m as u16, 0, 0, 0, 0, 1 + (i / 40_000) as u16)),
                port,
            );
            let dst = SocketAddr::new(IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0xffff, 0, 0, 0, 0, 80)), 443);
            (Connection::new(Protocol::Tcp, src, dst).expect("one family"), Action::Forward)
        }
        1 => {
            let src = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(203, 0, 113, m as u8)), port);
            let dst = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(198, 51, 100, 53)), 53);
            (Connection::new(Protocol::Udp, src, dst).expect("one family"), Action::Bypass)
        }
        _ => {
            let src = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(192, 0, 2, (10 * m + i / 40_000) as u8)), port);
            let dst = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(198, 51, 100, (i % 200) as u8)), 80);
            (Connection::new(Protocol::Tcp, src, dst).expect("one family"), Action::Forward)
        }
    }
}

async fn wait_for(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) -> anyhow::Result<Duration> {
    let t0 = Instant::now();
    while !done() {
        if t0.elapsed() > timeout {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(t0.elapsed())
}

/// Everything one member knows: its own table plus its database.
fn view_digest(m: &Mesh) -> u64 {
    m.local().digest().wrapping_add(m.database().digest())
}

/// Runs the demo and prints what happened.
pub async fn run(opts: DemoOptions) -> anyhow::Result<()> {
    if opts.connections == 0 || opts.connections > 200_000 {
        bail!("--connections must be between 1 and 200000");
    }
    let addrs: Vec<IpAddr> = (1..=3).map(|i| IpAddr::V4(Ipv4Addr::new(127, 0, 0, i))).collect();
    let port = free_port()?;
    let admin_port = free_port()?;
    let session = SessionConfig { version: 1, keepalive: Duration::from_millis(200), dead_after: 3 };
    println!("lb demo: a 3-member cluster on 127.0.0.1-3, control port {port}, keepalive 200 ms x 3");
    let mut members = Vec::new();
    for &a in &addrs {
        let metrics = Metrics::new();
        let mesh = Mesh::start(MeshConfig::uniform(a, port, &addrs, session, Retries::Infinite), metrics.clone())
            .await
            .with_context(|| format!("starting member {a}"))?;
        let listen = SocketAddr::new(a, admin_port);
        admin::serve(listen, AdminState { mesh: mesh.clone(), metrics }, std::future::pending())
            .await
            .with_context(|| format!("admin API on {listen}"))?;
        members.push(Member { mesh, admin: listen });
    }
    let t = wait_for("the full mesh", Duration::from_secs(10), || {
        members.iter().all(|m| m.mesh.peers().iter().all(|p| p.state == PeerState::Established))
    })
    .await?;
    println!("  full mesh established in {:.1} ms (3 control channels, PEER_JOIN both ways)", t.as_secs_f64() * 1e3);

    let n = opts.connections;
    let t0 = Instant::now();
    for (mi, m) in members.iter().enumerate() {
        for i in 0..n {
            let (c, a) = synthetic(mi + 1, i);
            m.mesh.install(c, a);
        }
    }
    let meshes: Vec<Mesh> = members.iter().map(|m| m.mesh.clone()).collect();
    wait_for("convergence", Duration::from_secs(30), || {
        meshes.iter().all(|m| m.database().len() == 2 * n)
            && meshes.iter().all(|m| view_digest(m) == view_digest(&meshes[0]))
    })
    .await?;
    let t = t0.elapsed();
    println!(
        "  installed {n} connections at each member; all databases converged in {:.1} ms ({:.0} installs/s cluster-wide)",
        t.as_secs_f64() * 1e3,
        (3 * n) as f64 / t.as_secs_f64()
    );
    println!("\n  member       local   from peers  forward  bypass  view digest");
    for m in &members {
        let db = m.mesh.database();
        let (mut fwd, mut byp) = (m.mesh.local().count_of(Action::Forward), m.mesh.local().count_of(Action::Bypass));
        for id in 0..3u8 {
            fwd += db.count_of(cluster_proto::MemberId(id), Action::Forward);
            byp += db.count_of(cluster_proto::MemberId(id), Action::Bypass);
        }
        println!(
            "  {:<12} {:>6} {:>11} {:>8} {:>7}  {:016x}",
            m.mesh.address().to_string(),
            m.mesh.local().len(),
            db.len(),
            fwd,
            byp,
            view_digest(&m.mesh)
        );
    }

    // The paper's Fig. 1 question: a server's reply for member 2's connection arrives at
    // member 1. Member 1 finds the owner from the reply's direction.
    let (c, _) = synthetic(2, 7);
    let reply = c.reversed();
    if let Some((owner, action)) = members[0].mesh.database().owner_of(&reply) {
        println!(
            "\n  asymmetric return: {reply} arrives at 127.0.0.1 -> owner {} ({action}): IP-in-IP to the owner",
            members[0].mesh.member_address(owner).map(|a| a.to_string()).unwrap_or_default()
        );
    }

    println!("\n  killing member 127.0.0.3 (no PEER_LEAVE, as a crash)...");
    let victim = members.pop().expect("three members");
    victim.mesh.kill();
    let t = wait_for("the purge", Duration::from_secs(10), || {
        members
            .iter()
            .all(|m| m.mesh.database().len() == n && m.mesh.peers().iter().any(|p| p.state != PeerState::Established))
    })
    .await?;
    println!("  127.0.0.3's {n} entries purged from both survivors in {:.1} ms", t.as_secs_f64() * 1e3);
    for m in &members {
        println!("  {:<12} now holds {} peer entries", m.mesh.address().to_string(), m.mesh.database().len());
    }

    let mut total_in = 0;
    for (_, t, a, c) in members[0].mesh.messages().snapshot().into_iter().filter(|x| x.0 == "in") {
        println!("  127.0.0.1 received {c:>7} {t} {a}");
        total_in += c;
    }
    println!("\n  summary: 3 members, {} connections, {total_in} control messages received by 127.0.0.1, 1 member lost and purged", 3 * n);

    if opts.keep_running {
        for m in &members {
            println!("  serving http://{}/metrics  /peers  /flows", m.admin);
        }
        println!("  press Ctrl-C to stop");
        let _ = tokio::signal::ctrl_c().await;
    } else {
        println!("  (run with --keep-running to keep the members and their admin APIs up)");
    }
    for m in &members {
        m.mesh.shutdown(Duration::from_secs(1)).await;
    }
    Ok(())
}
