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

/// Runs the demo and prints what happened.
pub async fn run(opts: DemoOptions) -> anyhow::Result<()> {
    if opts.connections == 0 || opts.connections > 200_000 {
        bail!("--connections must be between 1 and 200000");
    }
    let addrs: Vec<IpAddr> = (1..=3).map(|i| IpAddr::V4(Ipv4Addr::new(127, 0, 0, i))).collect();
    let port = free_port()?;
    let admin_port = free_port()?;
    let session = SessionConfig { version: 2, keepalive: Duration::from_millis(200), dead_after: 3, restart_time: 0 };
    println!("lb demo: a 3-member cluster on 127.0.0.1-3, control port {port}, keepalive 200 ms x 3");
    // Control channels use mutual TLS with a CA made for this run (lb gen-certs does the same
    // for real clusters).
    let certs = crate::certs::generate("lb-demo", &addrs)?;
    println!("  control channels: mutual TLS, certificates from an ephemeral demo CA");
    let mut members = Vec::new();
    for &a in &addrs {
        let metrics = Metrics::new();
        let mut config = MeshConfig::uniform(a, port, &addrs, session, Retries::Infinite);
        let (_, cert, key) = certs.members.iter().find(|m| m.0 == a).expect("a certificate per member");
        config.tls = Some(std::sync::Arc::new(cluster_proto::mesh::tls::TlsSettings::from_pem(
            certs.ca_cert.as_bytes(),
            cert.as_bytes(),
            key.as_bytes(),
        )?));
        let mesh = Mesh::start(config, metrics.clone()).await.with_context(|| format!("starting member {a}"))?;
        metrics.set_mesh(&mesh);
        let listen = SocketAddr::new(a, admin_port);
        admin::serve(
            listen,
            AdminState { mesh: mesh.clone(), metrics, ready: std::sync::Arc::new(true.into()), steering: None },
            admin::ServerLimits::default(),
            std::future::pending(),
        )
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
            && meshes.iter().all(|m| m.view_digest() == meshes[0].view_digest())
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
            m.mesh.view_digest()
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

    fig1_in_memory(&members[0].mesh, &members[1].mesh, 500).await?;
    crate::demo_fig2::fig2_in_memory(&meshes).await?;

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

fn segment(src: SocketAddr, dst: SocketAddr, syn: bool, ack: bool, payload: &[u8]) -> Vec<u8> {
    let (IpAddr::V4(s), IpAddr::V4(d)) = (src.ip(), dst.ip()) else { unreachable!("IPv4 demo traffic") };
    let mut b = etherparse::PacketBuilder::ipv4(s.octets(), d.octets(), 64).tcp(src.port(), dst.port(), 1, 65535);
    if syn {
        b = b.syn();
    }
    if ack {
        b = b.ack(1);
    }
    let mut v = Vec::new();
    b.write(&mut v, payload).expect("valid segment");
    v
}

/// Paper Fig. 1 through the real engines and meshes, with in-memory wires: member 1's proxy
/// opens spoofed connections (OUTPUT SYN: installed and announced), the servers answer via
/// member 2, which finds the owner in its database (or holds the SYN-ACK until the INSTALL
/// arrives) and hands every packet to member 1 in IP-in-IP; member 1 decapsulates and
/// injects. Nothing here is simulated but the wires.
async fn fig1_in_memory(owner: &Mesh, other: &Mesh, connections: u16) -> anyhow::Result<()> {
    use handoff::classify::{Classifier, Hook, View};
    use handoff::engine::{Engine, EngineConfig, Output};
    use handoff::policy::LocalOnly;
    use handoff::track::TrackConfig;

    let engine = |mesh: &Mesh| -> Engine<Vec<u8>> {
        Engine::new(
            EngineConfig {
                address: mesh.address(),
                members: mesh.members(),
                hold_time: Duration::from_millis(500),
                hold_packets: 65_536,
                hold_bytes: 64 << 20,
                mtu: Some(1500),
                track: TrackConfig::default(),
            },
            Classifier::new(Box::new(LocalOnly), vec![], Duration::from_millis(500)),
        )
    };
    let (mut e_owner, mut e_other) = (engine(owner), engine(other));
    let (tx, rx) = std::sync::mpsc::channel::<Connection>();
    let tx = std::sync::Mutex::new(tx);
    other.set_install_listener(Box::new(move |c| {
        let _ = tx.lock().map(|t| t.send(*c));
    }));
    let live_owner = owner.live_members();
    let live_other = other.live_members();
    let (mut held_seen, mut forwarded, mut injected, mut data) = (0u64, 0u64, 0u64, 0u64);
    let t0 = Instant::now();
    let client = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 200));
    let server = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(198, 51, 100, 80)), 80);
    let deliver =
        |outs: &mut Vec<Output<Vec<u8>>>, e_owner: &mut Engine<Vec<u8>>, forwarded: &mut u64, injected: &mut u64| {
            let view = View { me: owner.me(), local: owner.local(), db: owner.database(), live: &live_owner };
            for o in outs.drain(..) {
                if let Output::Send { outer, .. } = o {
                    *forwarded += 1;
                    if let Ok(d) = handoff::encap::decapsulate(&outer) {
                        let mut res = Vec::new();
                        e_owner.handle_tunnel(Instant::now(), &view, d.src, d.inner, &mut res);
                        *injected += res.iter().filter(|r| matches!(r, Output::Inject { .. })).count() as u64;
                    }
                }
            }
        };
    for i in 0..connections {
        let spoofed = SocketAddr::new(client, 30_000 + i);
        // Member 1's proxy opens the server side as the client: OUTPUT SYN.
        let mut out = Vec::new();
        let view = View { me: owner.me(), local: owner.local(), db: owner.database(), live: &live_owner };
        e_owner.handle(Instant::now(), &view, segment(spoofed, server, true, false, &[]), Hook::Output, &mut out);
        for o in out.drain(..) {
            if let Output::Install { connection, action } = o {
                owner.install(connection, action);
            }
        }
        // The server's SYN-ACK reaches member 2 at once, often before the INSTALL.
        let view = View { me: other.me(), local: other.local(), db: other.database(), live: &live_other };
        e_other.handle(Instant::now(), &view, segment(server, spoofed, true, true, &[]), Hook::Prerouting, &mut out);
        if out.is_empty() {
            held_seen += 1;
        }
        deliver(&mut out, &mut e_owner, &mut forwarded, &mut injected);
        while let Ok(c) = rx.try_recv() {
            e_other.on_install(Instant::now(), &view, &c, &mut out);
            deliver(&mut out, &mut e_owner, &mut forwarded, &mut injected);
        }
        tokio::task::yield_now().await;
    }
    // Whatever is still held is released when its INSTALL lands.
    let deadline = Instant::now() + Duration::from_secs(5);
    while e_other.held() > 0 && Instant::now() < deadline {
        let view = View { me: other.me(), local: other.local(), db: other.database(), live: &live_other };
        let mut out = Vec::new();
        while let Ok(c) = rx.try_recv() {
            e_other.on_install(Instant::now(), &view, &c, &mut out);
        }
        e_other.poll(Instant::now(), &view, &mut out);
        deliver(&mut out, &mut e_owner, &mut forwarded, &mut injected);
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    // Then the response data, all through member 2.
    for i in 0..connections {
        let spoofed = SocketAddr::new(client, 30_000 + i);
        let view = View { me: other.me(), local: other.local(), db: other.database(), live: &live_other };
        let mut out = Vec::new();
        for _ in 0..10 {
            e_other.handle(
                Instant::now(),
                &view,
                segment(server, spoofed, false, true, &[0x5a; 1000]),
                Hook::Prerouting,
                &mut out,
            );
            data += 1;
        }
        deliver(&mut out, &mut e_owner, &mut forwarded, &mut injected);
    }
    let stats = e_other.stats();
    println!(
        "\n  asymmetric returns (paper Fig. 1, real engines, in-memory wires): {connections} spoofed connections opened by 127.0.0.1,"
    );
    println!(
        "  their servers answering through 127.0.0.2: {} SYN-ACKs arrived before the INSTALL and were held ({} released by it, {} expired),",
        held_seen, stats.hold.released, stats.hold.expired
    );
    println!(
        "  {forwarded} packets ({} SYN-ACKs + {data} data) forwarded in IP-in-IP, {injected} rescued at the owner, in {:.1} ms",
        forwarded - data,
        t0.elapsed().as_secs_f64() * 1e3
    );
    if injected != forwarded {
        anyhow::bail!("{} forwarded packets were not delivered at the owner", forwarded - injected);
    }
    for c in 0..connections {
        owner.remove(&Connection::new(cluster_proto::Protocol::Tcp, SocketAddr::new(client, 30_000 + c), server)?);
    }
    Ok(())
}
