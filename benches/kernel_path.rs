//! Packets through the real kernel path, as a ratio to plain kernel forwarding in the same
//! namespaces, measured in the same run.
//!
//! Target (DESIGN.md): the data plane (NFQUEUE + engine) forwards >= 50% of the packets per
//! second that plain kernel forwarding does. Needs root (network namespaces) and ethtool
//! (offloads are turned off so both paths see MTU-sized packets, not 64 KB GSO bursts).
//!
//! Topology: sender -- member -- receiver, veth links, 198.18.10.0/24 and 198.18.11.0/24.
//! One TCP stream of 32 MiB crosses the member: plain forwarding, then through the rules `lb
//! run` installs (lb's own generator, `lb::rules`) and the real driver and engine, with the
//! fast path off (every packet is queued, parsed, classified and given its verdict by user
//! space) and on (packets of the member's own flows skip user space after their first,
//! except SYN/FIN/RST and one packet per `fast_path_sample_ms`).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cluster_proto::{Action, Connection, ConnectionDatabase, ConnectionTable, MemberId};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use handoff::classify::Classifier;
use handoff::driver::{ControlPlane, Devices, Driver};
use handoff::engine::{Engine, EngineConfig};
use handoff::io::{nfqueue::NfQueue, raw::RawTunnel, tun::Tun};
use handoff::netns::{veth, Netns};
use handoff::policy::LocalOnly;
use handoff::track::TrackConfig;

const BYTES: usize = 32 << 20;

/// A member alone: no peers, everything it sees is local.
struct Alone {
    local: ConnectionTable,
    db: ConnectionDatabase,
}

impl ControlPlane for Alone {
    fn me(&self) -> MemberId {
        MemberId(0)
    }
    fn local(&self) -> &ConnectionTable {
        &self.local
    }
    fn database(&self) -> &ConnectionDatabase {
        &self.db
    }
    fn membership_generation(&self) -> u64 {
        0
    }
    fn live_members(&self) -> Vec<MemberId> {
        vec![MemberId(0)]
    }
    fn install(&self, c: Connection, a: Action) {
        self.local.insert(&c, a);
    }
    fn remove(&self, c: &Connection) {
        self.local.remove(c);
    }
}

/// The `[dataplane]` section the member would run with.
fn dataplane(fast_path: bool) -> lb::config::Dataplane {
    toml::from_str(&format!("queue = 11\nintercept_tcp_ports = [5001]\nfast_path = {fast_path}\n")).expect("dataplane")
}

/// Installs what `lb run` would (lb::rules), replacing the previous run's rules.
fn install_rules(mid: &Netns, fast_path: bool) {
    let d = dataplane(fast_path);
    let dir = std::env::temp_dir();
    let (ipt, nft) = (dir.join("kernel_path.ipt"), dir.join("kernel_path.nft"));
    std::fs::write(&ipt, lb::rules::ruleset(&d, false)).expect("write");
    std::fs::write(&nft, lb::rules::fast_path_table(&d)).expect("write");
    mid.sh(&format!(
        "iptables -t raw -F; iptables -t raw -X LB-PRE 2>/dev/null; iptables -t raw -X LB-OUT 2>/dev/null; \
         nft delete table inet lb 2>/dev/null; iptables-restore --noflush < {}; [ ! -s {nft} ] || nft -f {nft}",
        ipt.display(),
        nft = nft.display()
    ))
    .expect("rules");
}

/// Starts the real driver in the member's namespace; set the flag to stop it.
fn start_driver(mid: &Netns, fast_path: bool) -> (Arc<AtomicBool>, std::thread::JoinHandle<()>) {
    let d = dataplane(fast_path);
    let mark = if d.fast_path { d.fast_path_mark } else { 0 };
    let stop = Arc::new(AtomicBool::new(false));
    let (started_tx, started_rx) = std::sync::mpsc::channel();
    let worker = {
        let stop = stop.clone();
        let name = mid.name().to_string();
        std::thread::spawn(move || {
            let f = std::fs::File::open(format!("/run/netns/{name}")).expect("ns file");
            use std::os::fd::AsRawFd;
            // SAFETY: setns on a valid namespace fd, this thread only.
            assert_eq!(unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) }, 0);
            let tun = Tun::open("lbtun0").expect("tun");
            tun.configure().expect("tun up");
            let dev = Devices {
                queue: NfQueue::open(11).expect("queue"),
                tunnel: RawTunnel::open("198.18.10.1".parse().expect("addr")).expect("raw"),
                tun,
            };
            let config = EngineConfig {
                address: "198.18.10.1".parse().expect("addr"),
                members: vec!["198.18.10.1".parse().expect("addr")],
                hold_time: Duration::from_millis(200),
                hold_packets: 1 << 16,
                hold_bytes: 64 << 20,
                mtu: Some(1500),
                track: TrackConfig::default(),
            };
            let engine = Engine::new(config, Classifier::new(Box::new(LocalOnly), vec![], Duration::from_millis(200)));
            let driver = Driver::new(engine, dev).expect("driver").with_fast_path_mark(mark);
            let cp = Alone { local: ConnectionTable::new(MemberId(0)), db: ConnectionDatabase::new() };
            started_tx.send(()).expect("started");
            driver.run(&cp, &stop).expect("driver runs");
        })
    };
    started_rx.recv_timeout(Duration::from_secs(5)).expect("driver up");
    (stop, worker)
}

/// Sends BYTES from the sender to the receiver through the member; returns the time taken.
fn transfer(snd: &Netns, rcv: &Netns) -> Duration {
    let to: SocketAddr = "198.18.11.2:5001".parse().expect("addr");
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    std::thread::scope(|s| {
        let server = s.spawn(|| {
            let _g = rcv.enter().expect("enter");
            let l = TcpListener::bind(to).expect("bind");
            ready_tx.send(()).expect("ready");
            let (mut c, _) = l.accept().expect("accept");
            c.set_read_timeout(Some(Duration::from_secs(60))).expect("timeout");
            let mut buf = vec![0u8; 1 << 16];
            let mut n = 0;
            while n < BYTES {
                let k = c.read(&mut buf).expect("read");
                assert!(k > 0, "sender closed early");
                n += k;
            }
            c.write_all(b"k").expect("ack");
        });
        ready_rx.recv_timeout(Duration::from_secs(5)).expect("server up");
        let t = snd.run(|| {
            let data = vec![0x42u8; 1 << 16];
            let t0 = Instant::now();
            let mut c = TcpStream::connect_timeout(&to, Duration::from_secs(5)).expect("connect");
            for _ in 0..BYTES / data.len() {
                c.write_all(&data).expect("write");
            }
            let mut k = [0u8; 1];
            c.read_exact(&mut k).expect("ack");
            t0.elapsed()
        });
        server.join().expect("server");
        t
    })
}

fn kernel_path(c: &mut Criterion) {
    let (snd, mid, rcv) =
        (Netns::new("kps").expect("ns"), Netns::new("kpm").expect("ns"), Netns::new("kpr").expect("ns"));
    veth(&snd, "s0", &mid, "m0").expect("veth");
    veth(&mid, "m1", &rcv, "r0").expect("veth");
    snd.sh("ip addr add 198.18.10.2/24 dev s0 && ip route add default via 198.18.10.1").expect("snd");
    rcv.sh("ip addr add 198.18.11.2/24 dev r0 && ip route add default via 198.18.11.1").expect("rcv");
    mid.sh(
        "ip addr add 198.18.10.1/24 dev m0 && ip addr add 198.18.11.1/24 dev m1 && sysctl -qw net.ipv4.ip_forward=1",
    )
    .expect("mid");
    for (ns, dev) in [(&snd, "s0"), (&mid, "m0"), (&mid, "m1"), (&rcv, "r0")] {
        ns.sh(&format!("ethtool -K {dev} tso off gso off gro off >/dev/null 2>&1 || true")).expect("ethtool");
    }

    let mut g = c.benchmark_group("kernel path (32 MiB TCP through a member)");
    g.sample_size(10);
    g.throughput(Throughput::Bytes(BYTES as u64));
    g.bench_function("plain kernel forwarding", |b| {
        b.iter_custom(|iters| (0..iters).map(|_| transfer(&snd, &rcv)).sum())
    });

    for fast_path in [false, true] {
        install_rules(&mid, fast_path);
        let (stop, worker) = start_driver(&mid, fast_path);
        let name = if fast_path {
            "lb rules + engine, fast path on (target >= 50% of plain)"
        } else {
            "lb rules + engine, fast path off (every packet through NFQUEUE)"
        };
        g.bench_function(name, |b| b.iter_custom(|iters| (0..iters).map(|_| transfer(&snd, &rcv)).sum()));
        stop.store(true, Ordering::Relaxed);
        worker.join().expect("driver thread");
        let counters = mid.sh("iptables -t raw -nvxL LB-PRE; nft list table inet lb 2>/dev/null | grep -c . || true");
        eprintln!("fast_path = {fast_path}: {}", counters.unwrap_or_default());
    }
    g.finish();
}

criterion_group!(benches, kernel_path);
criterion_main!(benches);
