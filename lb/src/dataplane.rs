//! Starts the packet data plane of `lb run` (the `[dataplane]` section): the devices, the
//! netfilter rules, and the driver thread, wired to the mesh.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use cluster_proto::mesh::Mesh;
use cluster_proto::{Action, Connection, ConnectionDatabase, ConnectionTable, MemberId};
use handoff::classify::{BypassList, BypassRule, Classifier};
use handoff::driver::{ControlPlane, Devices, Driver, DriverStats};
use handoff::engine::{Engine, EngineConfig};
use handoff::io::{nfqueue::NfQueue, raw::RawTunnel, tun::Tun};
use handoff::track::TrackConfig;

use dictionary_affinity::affinity::AffinityEngine;

use crate::config::{parse_net, AffinitySection, Dataplane, Policy};
use crate::rules;
use crate::steering::{PolicyKind, Steering, SteeringPolicy};

/// The mesh as the data plane sees it.
pub struct MeshControl(pub Mesh);

impl ControlPlane for MeshControl {
    fn me(&self) -> MemberId {
        self.0.me()
    }
    fn local(&self) -> &ConnectionTable {
        self.0.local()
    }
    fn database(&self) -> &ConnectionDatabase {
        self.0.database()
    }
    fn membership_generation(&self) -> u64 {
        self.0.membership_generation()
    }
    fn live_members(&self) -> Vec<MemberId> {
        self.0.live_members()
    }
    fn install(&self, connection: Connection, action: Action) {
        self.0.install(connection, action);
    }
    fn remove(&self, connection: &Connection) {
        self.0.remove(connection);
    }
}

/// A running data plane; [`RunningDataplane::stop`] removes what it installed.
pub struct RunningDataplane {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<std::io::Result<()>>>,
    /// Counters for metrics.
    pub stats: Arc<Mutex<DriverStats>>,
    managed_rules: bool,
    /// The classifier's bypass rules (a reload replaces them).
    pub bypass: BypassList,
}

/// The owner steering `[dataplane] policy` and `owners` describe (`[affinity]` for the
/// affinity engine's settings).
pub fn steering(d: &Dataplane, affinity: &AffinitySection, mesh: &Mesh) -> Arc<Steering> {
    let members = mesh.members();
    let kind = policy_kind(d.policy)
        .unwrap_or_else(|| PolicyKind::Affinity(Arc::new(AffinityEngine::new(affinity.engine_config()))));
    // Decisions are remembered about as long as a flow's packets may still be asked about.
    let steering = Arc::new(Steering::new(kind, owner_ids(&d.owners, &members), Duration::from_secs(600), 1 << 18));
    let mesh = mesh.clone();
    let every: Vec<MemberId> = (0..members.len()).map(|i| MemberId(i as u8)).collect();
    steering.set_load_source(Box::new(move |owners| {
        crate::affinity::database_loads(mesh.me(), mesh.local(), mesh.database(), owners.unwrap_or(&every))
    }));
    steering
}

/// `[dataplane] bypass` as the classifier's rules (each was checked by the configuration).
pub fn bypass_rules(d: &Dataplane) -> anyhow::Result<Vec<BypassRule>> {
    d.bypass
        .iter()
        .map(|b| Ok(BypassRule { net: parse_net(&b.net).map_err(anyhow::Error::msg)?, port: b.port }))
        .collect()
}

/// The steering kind of a policy other than affinity (whose engine is built at start).
pub fn policy_kind(policy: Policy) -> Option<PolicyKind> {
    match policy {
        Policy::Local => Some(PolicyKind::Local),
        Policy::Rendezvous => Some(PolicyKind::Rendezvous),
        Policy::PairRendezvous => Some(PolicyKind::PairRendezvous),
        Policy::Affinity => None,
    }
}

/// `[dataplane] owners` as member ids (`None`: every member). Each is in `members`, which
/// the configuration checked.
pub fn owner_ids(owners: &[std::net::IpAddr], members: &[std::net::IpAddr]) -> Option<Vec<MemberId>> {
    (!owners.is_empty())
        .then(|| owners.iter().filter_map(|a| members.iter().position(|m| m == a).map(|i| MemberId(i as u8))).collect())
}

/// Opens the devices, installs the rules and starts the driver thread.
/// `restored`: local connections registered again from the state file; the engine tracks them
/// (they end on FIN/RST or when idle, and are removed then).
pub fn start(
    d: &Dataplane,
    steering: Arc<Steering>,
    mesh: &Mesh,
    restored: &[Connection],
) -> anyhow::Result<RunningDataplane> {
    let tun = Tun::open(&d.tun).with_context(|| format!("cannot open TUN device {} (root needed)", d.tun))?;
    tun.configure().with_context(|| format!("cannot configure {}", d.tun))?;
    let tunnel = RawTunnel::open(mesh.address()).context("cannot open the raw IP-in-IP sockets (root needed)")?;
    let mut queue = NfQueue::open(d.queue).with_context(|| format!("cannot bind NFQUEUE {}", d.queue))?;
    queue.set_max_len(d.queue_len).with_context(|| format!("cannot set the length of NFQUEUE {}", d.queue))?;
    let granted = queue
        .set_socket_buffer(d.queue_buffer_bytes as usize)
        .with_context(|| format!("cannot size the socket buffer of NFQUEUE {}", d.queue))?;
    if (granted as u64) < d.queue_buffer_bytes {
        tracing::warn!(
            asked = d.queue_buffer_bytes,
            granted,
            "the kernel granted a smaller NFQUEUE socket buffer than dataplane.queue_buffer_bytes (no CAP_NET_ADMIN?)"
        );
    }
    let bypass = bypass_rules(d)?;
    let hold_time = Duration::from_millis(d.hold_ms);
    let classifier = Classifier::new(Box::new(SteeringPolicy(steering)), bypass, hold_time);
    let bypass = classifier.bypass_list();
    let mut engine = Engine::new(
        EngineConfig {
            address: mesh.address(),
            members: mesh.members(),
            hold_time,
            hold_packets: d.hold_packets,
            hold_bytes: d.hold_bytes,
            mtu: (d.mtu != 0).then_some(d.mtu),
            track: TrackConfig {
                linger: Duration::from_millis(d.linger_ms),
                udp_idle: Duration::from_millis(d.udp_idle_ms),
                tcp_idle: Duration::from_millis(d.tcp_idle_ms),
                embryonic: Duration::from_millis(d.embryonic_ms),
                half_closed_idle: Duration::from_millis(d.half_closed_ms),
            },
        },
        classifier,
    );
    let now = std::time::Instant::now();
    for c in restored {
        engine.restore(now, *c);
    }
    let driver = Driver::new(engine, Devices { queue, tunnel, tun })?;
    let waker = driver.waker();
    mesh.set_install_listener(Box::new(move |c| waker.on_install(c)));
    let stats = driver.stats();
    // Without lb's own rules the operator's rules decide; lb marks as configured.
    let mut fast_path = d.fast_path;
    if d.manage_rules {
        fast_path = rules::install(d)?;
        tracing::info!(queue = d.queue, fast_path, "netfilter rules installed (nftables table inet {})", rules::TABLE);
    }
    let driver = driver.with_fast_path_mark(if fast_path { d.fast_path_mark } else { 0 });
    let stop = Arc::new(AtomicBool::new(false));
    let control = MeshControl(mesh.clone());
    let s = stop.clone();
    let thread = std::thread::Builder::new().name("lb-dataplane".into()).spawn(move || {
        let r = driver.run(&control, &s);
        if let Err(e) = &r {
            tracing::error!(error = %e, "data plane stopped; traffic now bypasses it (fail-open)");
        }
        r
    })?;
    Ok(RunningDataplane { stop, thread: Some(thread), stats, managed_rules: d.manage_rules, bypass })
}

impl RunningDataplane {
    /// Stops the driver and removes the rules it installed.
    pub fn stop(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        if self.managed_rules {
            rules::remove();
        }
    }
}

impl Drop for RunningDataplane {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
            if self.managed_rules {
                rules::remove();
            }
        }
    }
}
