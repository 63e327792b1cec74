//! Prometheus metrics of one member: counters fed by the mesh's events, and gauges read from
//! the mesh at scrape time.

use std::sync::Arc;

use cluster_proto::mesh::{Mesh, MeshEvent, MeshObserver, PeerState};
use cluster_proto::Action;
use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

/// The member's metrics; also the mesh's observer.
pub struct Metrics {
    registry: Registry,
    peers: IntGaugeVec,
    peer_up: IntGaugeVec,
    entries: IntGaugeVec,
    messages: IntCounterVec,
    /// Message counts already added to `messages`, to add only what is new at each scrape.
    messages_seen: std::sync::Mutex<std::collections::HashMap<(&'static str, &'static str, &'static str), u64>>,
    rejects: IntCounterVec,
    keepalive_timeouts: IntCounterVec,
    peer_down: IntCounterVec,
    conflicts: IntCounterVec,
    refused: IntCounterVec,
    installs_refused: IntCounterVec,
    advertisements: IntCounterVec,
    version_fallbacks: IntCounter,
    table_sync: Histogram,
    database_bytes: IntGauge,
    dataplane: std::sync::Mutex<Option<Arc<std::sync::Mutex<handoff::driver::DriverStats>>>>,
    dp_counters: IntCounterVec,
    dp_decisions: IntCounterVec,
    dp_held: IntGauge,
    dp_up: IntGauge,
    proxy: std::sync::Mutex<Option<Arc<crate::proxy::ProxyStats>>>,
    proxy_conns: IntCounterVec,
    proxy_bytes: IntCounterVec,
    proxy_active: IntGauge,
    steering: std::sync::Mutex<Option<Arc<crate::steering::Steering>>>,
    owner_decisions: IntCounterVec,
    chain: std::sync::Mutex<Option<Arc<crate::chain::ChainStats>>>,
    chain_conns: IntCounterVec,
    chain_bytes: IntCounterVec,
    chain_events: IntCounterVec,
    chain_dictionary: IntGauge,
    /// Data-plane counter values already added, to add only what is new at each scrape.
    dp_seen: std::sync::Mutex<std::collections::HashMap<String, u64>>,
}

fn must<T>(r: prometheus::Result<T>) -> T {
    r.expect("metric definitions are static and valid")
}

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> Arc<Self> {
        let registry = Registry::new();
        let gv = |name: &str, help: &str, labels: &[&str]| {
            let g = must(IntGaugeVec::new(Opts::new(name, help), labels));
            must(registry.register(Box::new(g.clone())));
            g
        };
        let cv = |name: &str, help: &str, labels: &[&str]| {
            let c = must(IntCounterVec::new(Opts::new(name, help), labels));
            must(registry.register(Box::new(c.clone())));
            c
        };
        let peers = gv("lb_peers", "Peers by control-channel state.", &["state"]);
        let peer_up = gv("lb_peer_up", "1 when the peer's control channel is established.", &["peer"]);
        let entries = gv("lb_entries", "Connection entries by owning member and action.", &["owner", "action"]);
        // Counted by the mesh in atomics on the hot path; added to the counter at scrape time.
        let messages = cv(
            "lb_control_messages_total",
            "Control messages by direction, message type and action.",
            &["direction", "type", "action"],
        );
        let rejects = cv("lb_rejects_total", "PEER_REJECTs sent or received, by reason.", &["direction", "reason"]);
        let keepalive_timeouts =
            cv("lb_keepalive_timeouts_total", "Peers declared dead after missing keepalives.", &["peer"]);
        let peer_down = cv("lb_peer_down_total", "Peer channels lost, by reason.", &["peer", "reason"]);
        let conflicts = cv(
            "lb_ownership_conflicts_total",
            "INSTALLs that replaced another member's entry, REMOVEs by a non-owner (ignored).",
            &["kind"],
        );
        let refused = cv("lb_channels_refused_total", "Channels closed before a join, by reason.", &["reason"]);
        let installs_refused = cv(
            "lb_installs_refused_total",
            "INSTALLs refused by the flood guard (entry_limit, rate_limit), by peer.",
            &["peer", "reason"],
        );
        let advertisements = cv(
            "lb_advertisements_total",
            "Advertisement messages (DICT_STATS, LOAD; protocol version 2): sent, received, dropped (send queue too full), skipped_v1 (peer at version 1).",
            &["direction"],
        );
        let version_fallbacks = must(IntCounter::new(
            "lb_version_fallbacks_total",
            "Peers that refused our PEER_JOIN(2) and are dialed with PEER_JOIN(1).",
        ));
        must(registry.register(Box::new(version_fallbacks.clone())));
        let table_sync = must(Histogram::with_opts(
            HistogramOpts::new("lb_table_sync_seconds", "Time to hand this member's table to a joining peer.")
                .buckets(vec![0.0001, 0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]),
        ));
        must(registry.register(Box::new(table_sync.clone())));
        let database_bytes = must(IntGauge::new("lb_database_bytes", "Memory held by the connection tables."));
        must(registry.register(Box::new(database_bytes.clone())));
        let dp_counters = cv(
            "lb_dataplane_packets_total",
            "Data-plane packet outcomes: encapsulated, decapsulated, tunnel_not_member, malformed, mss_clamped, encap_failed, io_errors, and the hold queue's held, released, expired, overflowed.",
            &["outcome"],
        );
        let dp_decisions = cv("lb_dataplane_decisions_total", "Classification decisions by reason.", &["reason"]);
        let dp_held = must(IntGauge::new("lb_hold_queue_packets", "Packets in the hold queue."));
        must(registry.register(Box::new(dp_held.clone())));
        let dp_up =
            must(IntGauge::new("lb_dataplane_up", "1 while the data-plane thread runs (0: traffic bypasses it)."));
        // The proxy's metrics are registered by set_proxy, for members with [proxy].
        let proxy_conns = must(IntCounterVec::new(
            Opts::new(
                "lb_proxy_connections_total",
                "Transparent proxy connections by outcome: accepted, refused, spoofed_ok, spoofed_failed, plain_ok, plain_failed, idle_timeout.",
            ),
            &["outcome"],
        ));
        let proxy_bytes = must(IntCounterVec::new(
            Opts::new("lb_proxy_bytes_total", "Bytes relayed by the transparent proxy, by direction."),
            &["direction"],
        ));
        let proxy_active = must(IntGauge::new("lb_proxy_active_connections", "Connections the proxy relays now."));
        let owner_decisions = must(IntCounterVec::new(
            Opts::new(
                "lb_owner_decisions_total",
                "Owners chosen for new flows by this member's owner policy, by policy and reason (affinity, affinity_next_best_load_bound, affinity_load_bound_fallback, rendezvous_no_dictionary, rendezvous, local, local_no_owner_live, ...).",
            ),
            &["policy", "reason"],
        ));
        // Registered by set_chain, for a proxy with a chain role.
        let chain_conns = must(IntCounterVec::new(
            Opts::new(
                "lb_chain_connections_total",
                "Connections of the chained-proxy role by mode: chained, plain, failed, ephemeral (chained on throwaway dictionaries; also counted as chained).",
            ),
            &["role", "mode"],
        ));
        let chain_bytes = must(IntCounterVec::new(
            Opts::new(
                "lb_chain_bytes_total",
                "Bytes of chained connections by direction (to_upstream, to_downstream) and layer (plain: before encoding / after decoding; wire: on the chain link).",
            ),
            &["direction", "layer"],
        ));
        let chain_events = must(IntCounterVec::new(
            Opts::new(
                "lb_chain_events_total",
                "Chain codec events: reset (epoch resets started here), nack_sent, nack_received, decode_error, dictionary_saved.",
            ),
            &["event"],
        ));
        let chain_dictionary =
            must(IntGauge::new("lb_chain_dictionary_bytes", "Bytes held by all pair dictionaries (both directions)."));
        // Registered by set_dataplane: a member without [dataplane] exports no lb_dataplane_up
        // (a 0 there would look like a dead data plane to an alert).
        Arc::new(Metrics {
            registry,
            peers,
            peer_up,
            entries,
            messages,
            messages_seen: Default::default(),
            rejects,
            keepalive_timeouts,
            peer_down,
            conflicts,
            refused,
            installs_refused,
            advertisements,
            version_fallbacks,
            table_sync,
            database_bytes,
            dataplane: Default::default(),
            dp_counters,
            dp_decisions,
            dp_held,
            dp_up,
            proxy: Default::default(),
            proxy_conns,
            proxy_bytes,
            proxy_active,
            steering: Default::default(),
            owner_decisions,
            chain: Default::default(),
            chain_conns,
            chain_bytes,
            chain_events,
            chain_dictionary,
            dp_seen: Default::default(),
        })
    }

    /// Exports the data plane's counters too.
    pub fn set_dataplane(&self, stats: Arc<std::sync::Mutex<handoff::driver::DriverStats>>) {
        let mut dp = self.dataplane.lock().unwrap_or_else(|e| e.into_inner());
        if dp.is_none() {
            must(self.registry.register(Box::new(self.dp_up.clone())));
        }
        *dp = Some(stats);
    }

    /// Exports the owner policy's decisions.
    pub fn set_steering(&self, steering: Arc<crate::steering::Steering>) {
        let mut st = self.steering.lock().unwrap_or_else(|e| e.into_inner());
        if st.is_none() {
            must(self.registry.register(Box::new(self.owner_decisions.clone())));
        }
        *st = Some(steering);
    }

    fn render_steering(&self) {
        let Some(st) = self.steering.lock().unwrap_or_else(|e| e.into_inner()).clone() else { return };
        let mut seen = self.dp_seen.lock().unwrap_or_else(|e| e.into_inner());
        for (reason, n) in st.decisions() {
            let before = seen.insert(format!("owner/{reason}"), n).unwrap_or(0);
            self.owner_decisions.with_label_values(&[st.name(), reason]).inc_by(n.saturating_sub(before));
        }
    }

    /// Exports the transparent proxy's counters.
    pub fn set_proxy(&self, stats: Arc<crate::proxy::ProxyStats>) {
        let mut p = self.proxy.lock().unwrap_or_else(|e| e.into_inner());
        if p.is_none() {
            must(self.registry.register(Box::new(self.proxy_conns.clone())));
            must(self.registry.register(Box::new(self.proxy_bytes.clone())));
            must(self.registry.register(Box::new(self.proxy_active.clone())));
        }
        *p = Some(stats);
    }

    /// Exports the chained-proxy role's counters.
    pub fn set_chain(&self, stats: Arc<crate::chain::ChainStats>) {
        let mut c = self.chain.lock().unwrap_or_else(|e| e.into_inner());
        if c.is_none() {
            must(self.registry.register(Box::new(self.chain_conns.clone())));
            must(self.registry.register(Box::new(self.chain_bytes.clone())));
            must(self.registry.register(Box::new(self.chain_events.clone())));
            must(self.registry.register(Box::new(self.chain_dictionary.clone())));
        }
        *c = Some(stats);
    }

    fn render_chain(&self) {
        use std::sync::atomic::Ordering::Relaxed;
        let Some(s) = self.chain.lock().unwrap_or_else(|e| e.into_inner()).clone() else { return };
        let mut seen = self.dp_seen.lock().unwrap_or_else(|e| e.into_inner());
        let mut add = |vec: &IntCounterVec, labels: &[&str], value: u64| {
            let before = seen.insert(format!("chain/{}", labels.join("/")), value).unwrap_or(0);
            vec.with_label_values(labels).inc_by(value.saturating_sub(before));
        };
        for (mode, v) in
            [("chained", &s.chained), ("plain", &s.plain), ("failed", &s.failed), ("ephemeral", &s.ephemeral)]
        {
            add(&self.chain_conns, &[s.role.as_str(), mode], v.load(Relaxed));
        }
        for (dir, layer, v) in [
            ("to_upstream", "plain", &s.to_upstream_plain),
            ("to_upstream", "wire", &s.to_upstream_wire),
            ("to_downstream", "plain", &s.to_downstream_plain),
            ("to_downstream", "wire", &s.to_downstream_wire),
        ] {
            add(&self.chain_bytes, &[dir, layer], v.load(Relaxed));
        }
        for (event, v) in [
            ("reset", &s.resets),
            ("nack_sent", &s.nacks_sent),
            ("nack_received", &s.nacks_received),
            ("decode_error", &s.decode_errors),
            ("dictionary_saved", &s.saves),
        ] {
            add(&self.chain_events, &[event], v.load(Relaxed));
        }
        self.chain_dictionary.set(s.dictionary_bytes.load(Relaxed) as i64);
    }

    fn render_proxy(&self) {
        use std::sync::atomic::Ordering::Relaxed;
        let Some(s) = self.proxy.lock().unwrap_or_else(|e| e.into_inner()).clone() else { return };
        let mut seen = self.dp_seen.lock().unwrap_or_else(|e| e.into_inner());
        let mut add = |vec: &IntCounterVec, kind: &str, label: &str, value: u64| {
            let before = seen.insert(format!("proxy-{kind}/{label}"), value).unwrap_or(0);
            vec.with_label_values(&[label]).inc_by(value.saturating_sub(before));
        };
        for (label, v) in [
            ("accepted", &s.accepted),
            ("refused", &s.refused),
            ("spoofed_ok", &s.spoofed_ok),
            ("spoofed_failed", &s.spoofed_failed),
            ("plain_ok", &s.plain_ok),
            ("plain_failed", &s.plain_failed),
            ("idle_timeout", &s.idle_timeouts),
        ] {
            add(&self.proxy_conns, "conns", label, v.load(Relaxed));
        }
        add(&self.proxy_bytes, "bytes", "to_server", s.bytes_to_server.load(Relaxed));
        add(&self.proxy_bytes, "bytes", "to_client", s.bytes_to_client.load(Relaxed));
        self.proxy_active.set(s.active.load(Relaxed) as i64);
    }

    fn render_dataplane(&self) {
        let Some(stats) = self.dataplane.lock().unwrap_or_else(|e| e.into_inner()).clone() else { return };
        let s = stats.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let e = &s.engine;
        let mut seen = self.dp_seen.lock().unwrap_or_else(|e| e.into_inner());
        let mut add = |vec: &IntCounterVec, label: &str, value: u64| {
            let key = format!("{}/{label}", if std::ptr::eq(vec, &self.dp_counters) { "packets" } else { "decisions" });
            let before = seen.insert(key, value).unwrap_or(0);
            vec.with_label_values(&[label]).inc_by(value.saturating_sub(before));
        };
        for (label, v) in [
            ("encapsulated", e.encapsulated),
            ("decapsulated", e.decapsulated),
            ("tunnel_not_member", e.tunnel_not_member),
            ("malformed", e.malformed),
            ("mss_clamped", e.mss_clamped),
            ("encap_failed", e.encap_failed),
            ("io_errors", s.io_errors),
            ("held", e.hold.held),
            ("released", e.hold.released),
            ("expired", e.hold.expired),
            ("overflowed", e.hold.overflowed),
        ] {
            add(&self.dp_counters, label, v);
        }
        for (reason, v) in &e.decisions {
            add(&self.dp_decisions, reason, *v);
        }
        self.dp_held.set(s.held as i64);
        self.dp_up.set(s.running as i64);
    }

    /// Reads the mesh's current state into the gauges and renders the text format.
    pub fn render(&self, mesh: &Mesh) -> String {
        let peers = mesh.peers();
        for s in
            [PeerState::Down, PeerState::Connect, PeerState::Synchronize, PeerState::Established, PeerState::GaveUp]
        {
            self.peers.with_label_values(&[s.as_str()]).set(peers.iter().filter(|p| p.state == s).count() as i64);
        }
        for p in &peers {
            self.peer_up.with_label_values(&[&p.address.to_string()]).set((p.state == PeerState::Established) as i64);
        }
        let db = mesh.database();
        for (i, addr) in mesh.members().iter().enumerate() {
            let id = cluster_proto::MemberId(i as u8);
            for action in [Action::Forward, Action::Bypass] {
                let n = if id == mesh.me() { mesh.local().count_of(action) } else { db.count_of(id, action) };
                self.entries.with_label_values(&[&addr.to_string(), action.as_str()]).set(n as i64);
            }
        }
        let mut seen = self.messages_seen.lock().unwrap_or_else(|e| e.into_inner());
        for (dir, t, a, n) in mesh.messages().snapshot() {
            let before = seen.insert((dir, t, a), n).unwrap_or(0);
            self.messages.with_label_values(&[dir, t, a]).inc_by(n.saturating_sub(before));
        }
        drop(seen);
        self.database_bytes.set((db.memory_bytes() + mesh.local().memory_bytes()) as i64);
        self.render_dataplane();
        self.render_proxy();
        self.render_steering();
        self.render_chain();
        let mut out = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8(out).unwrap_or_default()
    }
}

impl MeshObserver for Metrics {
    fn on_event(&self, e: &MeshEvent) {
        match e {
            MeshEvent::PeerUp { .. } => {}
            MeshEvent::PeerDown { peer, reason, .. } => {
                self.peer_down.with_label_values(&[peer.to_string().as_str(), reason]).inc()
            }
            MeshEvent::TableSent { duration, .. } => self.table_sync.observe(duration.as_secs_f64()),
            MeshEvent::Reject { code, sent, .. } => {
                self.rejects.with_label_values(&[if *sent { "sent" } else { "received" }, code.name()]).inc()
            }
            MeshEvent::KeepaliveTimeout { peer } => {
                self.keepalive_timeouts.with_label_values(&[&peer.to_string()]).inc()
            }
            MeshEvent::OwnershipConflict { kind, .. } => self.conflicts.with_label_values(&[kind]).inc(),
            MeshEvent::ClaimLost { .. } => self.conflicts.with_label_values(&["claim_withdrawn"]).inc(),
            MeshEvent::ChannelRefused { reason, .. } => self.refused.with_label_values(&[reason]).inc(),
            MeshEvent::InstallRefused { peer, reason } => {
                self.installs_refused.with_label_values(&[peer.to_string().as_str(), reason]).inc()
            }
            MeshEvent::Advertisements { outcome, messages, .. } => {
                self.advertisements.with_label_values(&[outcome.as_str()]).inc_by(*messages)
            }
            MeshEvent::VersionFallback { .. } => self.version_fallbacks.inc(),
        }
    }
}
