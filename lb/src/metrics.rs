//! Prometheus metrics of one member. The subsystems count in their own atomics; collectors
//! read them at scrape time ([`Collector::collect`]). Only what the subsystems do not count
//! (rejects, channels lost and refused, flood-guard refusals, ownership conflicts, table
//! syncs) is counted here from the mesh's events. Every series whose label values are known
//! (each configured peer, each reason, each outcome) is exported from the start, at 0, so that
//! `increase()` sees the first event.

use std::sync::{Arc, Mutex, OnceLock};

use cluster_proto::mesh::{Mesh, MeshEvent, MeshObserver, PeerState};
use cluster_proto::wire::ErrorCode;
use cluster_proto::Action;
use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{Encoder, Histogram, HistogramOpts, IntCounterVec, IntGaugeVec, Opts, Registry, TextEncoder};

/// The commit `lb` was built from (build.rs), or "unknown".
pub const BUILD_COMMIT: &str = env!("LB_BUILD_COMMIT");

/// Reasons a joined channel is lost (`lb_peer_down_total`): the names of
/// [`cluster_proto::session::CloseReason`] that can end a joined channel.
pub const PEER_DOWN_REASONS: [&str; 14] = [
    "peer_left",
    "peer_restarting",
    "peer_left_bad_message",
    "peer_left_duplicate_channel",
    "peer_left_stalled",
    "peer_left_other",
    "transport_closed",
    "dead",
    "bad_message",
    "rejected_by_peer",
    "left",
    "left_duplicate_channel",
    "left_stalled",
    "left_other",
];

/// PEER_REJECT codes (`lb_rejects_total`).
pub const REJECT_CODES: [ErrorCode; 6] = [
    ErrorCode::NOT_A_MEMBER,
    ErrorCode::VERSION_MISMATCH,
    ErrorCode::BAD_MESSAGE,
    ErrorCode::DUPLICATE_CHANNEL,
    ErrorCode::STALLED,
    ErrorCode::JOIN_TIMEOUT,
];

/// Why a channel is refused before the join (`lb_channels_refused_total`).
pub const REFUSED_REASONS: [&str; 8] = [
    "not_join",
    "join_timeout",
    "too_many_pending_joins",
    "too_many_pending_joins_from_source",
    "too_many_pending_joins_from_member",
    "tls_handshake",
    "tls_identity",
    "tls_timeout",
];

/// Flood-guard refusals (`lb_installs_refused_total`).
pub const INSTALL_REFUSED_REASONS: [&str; 2] = ["entry_limit", "rate_limit"];

/// Ownership conflicts (`lb_ownership_conflicts_total`).
pub const CONFLICT_KINDS: [&str; 4] = ["install_replaced", "install_contested", "claim_withdrawn", "remove_not_owner"];

/// (type, action) label pairs of `lb_control_messages_total`.
const MESSAGE_KINDS: [(&str, &str); 10] = [
    ("install_connection", "forward"),
    ("install_connection", "bypass"),
    ("remove_connection", "forward"),
    ("remove_connection", "bypass"),
    ("cluster_peer_sync", "peer_join"),
    ("cluster_peer_sync", "peer_keepalive"),
    ("cluster_peer_sync", "peer_leave"),
    ("cluster_peer_sync", "peer_reject"),
    ("dict_stats", "advertise"),
    ("load", "advertise"),
];

/// Owner-decision reasons of each policy (`lb_owner_decisions_total`).
fn owner_reasons(policy: &str) -> &'static [&'static str] {
    use crate::steering::NO_OWNER_LIVE;
    match policy {
        "affinity" => &[
            "affinity",
            "affinity_next_best_load_bound",
            "affinity_load_bound_fallback",
            "rendezvous_no_dictionary",
            "local_no_live_members",
            NO_OWNER_LIVE,
        ],
        "rendezvous" | "pair_rendezvous" => &["rendezvous", NO_OWNER_LIVE],
        _ => &["local", NO_OWNER_LIVE],
    }
}

/// A metric family's name, help and label names.
#[derive(Clone, Copy)]
struct Def {
    name: &'static str,
    help: &'static str,
    labels: &'static [&'static str],
}

impl Def {
    fn desc(&self) -> Desc {
        must(Desc::new(
            self.name.into(),
            self.help.into(),
            self.labels.iter().map(|l| l.to_string()).collect(),
            Default::default(),
        ))
    }

    fn opts(&self) -> Opts {
        Opts::new(self.name, self.help)
    }

    /// A registered counter vector (for event counts).
    fn counter_vec(&self, registry: &Registry) -> IntCounterVec {
        let c = must(IntCounterVec::new(self.opts(), self.labels));
        must(registry.register(Box::new(c.clone())));
        c
    }

    /// One scrape's counter family from (label values, value) samples.
    fn counters<'a>(&self, samples: impl IntoIterator<Item = (Vec<&'a str>, u64)>) -> Vec<MetricFamily> {
        let v = must(IntCounterVec::new(self.opts(), self.labels));
        for (labels, n) in samples {
            v.with_label_values(&labels).inc_by(n);
        }
        v.collect()
    }

    /// One scrape's gauge family from (label values, value) samples.
    fn gauges<'a>(&self, samples: impl IntoIterator<Item = (Vec<&'a str>, i64)>) -> Vec<MetricFamily> {
        let v = must(IntGaugeVec::new(self.opts(), self.labels));
        for (labels, n) in samples {
            v.with_label_values(&labels).set(n);
        }
        v.collect()
    }
}

fn must<T>(r: prometheus::Result<T>) -> T {
    r.expect("metric definitions are static and valid")
}

// ---- Families read at scrape time --------------------------------------------------------

const PEERS: Def = Def { name: "lb_peers", help: "Peers by control-channel state.", labels: &["state"] };
const PEER_UP: Def =
    Def { name: "lb_peer_up", help: "1 when the peer's control channel is established.", labels: &["peer"] };
const ENTRIES: Def =
    Def { name: "lb_entries", help: "Connection entries by owning member and action.", labels: &["owner", "action"] };
const MESSAGES: Def = Def {
    name: "lb_control_messages_total",
    help: "Control messages by direction, message type and action.",
    labels: &["direction", "type", "action"],
};
const KEEPALIVE_TIMEOUTS: Def = Def {
    name: "lb_keepalive_timeouts_total",
    help: "Peers declared dead after missing keepalives.",
    labels: &["peer"],
};
const ADVERTISEMENTS: Def = Def {
    name: "lb_advertisements_total",
    help: "Advertisement messages (DICT_STATS, LOAD; protocol version 2): sent, received, dropped (send queue too full), skipped_v1 (peer at version 1).",
    labels: &["direction"],
};
const VERSION_FALLBACKS: Def = Def {
    name: "lb_version_fallbacks_total",
    help: "Peers that refused our PEER_JOIN(2) and are dialed with PEER_JOIN(1).",
    labels: &[],
};
const DATABASE_BYTES: Def =
    Def { name: "lb_database_bytes", help: "Memory held by the connection tables.", labels: &[] };
const VIEW_DIGEST: Def = Def {
    name: "lb_view_digest",
    help: "The top 53 bits of this member's view digest (its table and its database): equal on members that see the same cluster.",
    labels: &[],
};
const DP_PACKETS: Def = Def {
    name: "lb_dataplane_packets_total",
    help: "Data-plane packet outcomes: encapsulated, decapsulated, tunnel_not_member, malformed, mss_clamped, encap_failed, io_errors, queue_overflowed (passed unseen: the NFQUEUE socket buffer was full), and the hold queue's held, released, expired, overflowed.",
    labels: &["outcome"],
};
const DP_DECISIONS: Def =
    Def { name: "lb_dataplane_decisions_total", help: "Classification decisions by reason.", labels: &["reason"] };
const DP_HELD: Def = Def { name: "lb_hold_queue_packets", help: "Packets in the hold queue.", labels: &[] };
const DP_UP: Def =
    Def { name: "lb_dataplane_up", help: "1 while the data-plane thread runs (0: traffic bypasses it).", labels: &[] };
const PROXY_CONNS: Def = Def {
    name: "lb_proxy_connections_total",
    help: "Transparent proxy connections by outcome: accepted, refused, spoofed_ok, spoofed_failed, plain_ok, plain_failed, idle_timeout.",
    labels: &["outcome"],
};
const PROXY_BYTES: Def = Def {
    name: "lb_proxy_bytes_total",
    help: "Bytes relayed by the transparent proxy, by direction.",
    labels: &["direction"],
};
const PROXY_ACTIVE: Def =
    Def { name: "lb_proxy_active_connections", help: "Connections the proxy relays now.", labels: &[] };
const OWNER_DECISIONS: Def = Def {
    name: "lb_owner_decisions_total",
    help: "Owners chosen for new flows by this member's owner policy, by policy and reason (affinity, affinity_next_best_load_bound, affinity_load_bound_fallback, rendezvous_no_dictionary, rendezvous, local, local_no_owner_live, ...).",
    labels: &["policy", "reason"],
};
const CHAIN_CONNS: Def = Def {
    name: "lb_chain_connections_total",
    help: "Connections of the chained-proxy role by mode: chained, plain, failed, shared (chained on the pair's dictionaries shared with its other connections; also counted as chained), ephemeral (chained on throwaway dictionaries; also counted as chained).",
    labels: &["role", "mode"],
};
const CHAIN_BYTES: Def = Def {
    name: "lb_chain_bytes_total",
    help: "Bytes of chained connections by direction (to_upstream, to_downstream) and layer (plain: before encoding / after decoding; wire: on the chain link).",
    labels: &["direction", "layer"],
};
const CHAIN_EVENTS: Def = Def {
    name: "lb_chain_events_total",
    help: "Chain codec events: reset (epoch resets started here), nack_sent, nack_received, decode_error, dictionary_saved, shared_wait_arrived (a reference waited for a chunk another connection defined, and got it), shared_wait_fetched (the wait ran out; the chunk was fetched by NACK), dictionary_pair_evicted (a pair's dictionaries dropped for a new pair: max_dictionary_pairs), older_codec (a chained connection written in an older codec version because the peer decodes no newer: a chain mid-upgrade).",
    labels: &["event"],
};
const CHAIN_DICTIONARY: Def = Def {
    name: "lb_chain_dictionary_bytes",
    help: "Bytes held by all pair dictionaries (both directions).",
    labels: &[],
};

// ---- Families counted from events ----------------------------------------------------------

const REJECTS: Def = Def {
    name: "lb_rejects_total",
    help: "PEER_REJECTs sent or received, by reason.",
    labels: &["direction", "reason"],
};
const PEER_DOWN: Def =
    Def { name: "lb_peer_down_total", help: "Peer channels lost, by reason.", labels: &["peer", "reason"] };
const STALE_PURGED: Def = Def {
    name: "lb_stale_entries_purged_total",
    help: "Entries of a gracefully restarting peer purged at the end of its grace period (not sent again).",
    labels: &["peer"],
};
const CONFLICTS: Def = Def {
    name: "lb_ownership_conflicts_total",
    help: "INSTALLs that replaced another member's entry, REMOVEs by a non-owner (ignored).",
    labels: &["kind"],
};
const REFUSED: Def =
    Def { name: "lb_channels_refused_total", help: "Channels closed before a join, by reason.", labels: &["reason"] };
const INSTALLS_REFUSED: Def = Def {
    name: "lb_installs_refused_total",
    help: "INSTALLs refused by the flood guard (entry_limit, rate_limit), by peer.",
    labels: &["peer", "reason"],
};
const BUILD_INFO: Def = Def {
    name: "lb_build_info",
    help: "Always 1; the version and the commit this lb was built from.",
    labels: &["version", "commit"],
};

/// Every `lb_*` family this module can export (those of the data plane, the proxy, the owner
/// policy and the chain only on members configured with them), plus `lb_table_sync_seconds`.
pub fn family_names() -> Vec<&'static str> {
    let mut v: Vec<&str> = [
        PEERS,
        PEER_UP,
        ENTRIES,
        MESSAGES,
        KEEPALIVE_TIMEOUTS,
        ADVERTISEMENTS,
        VERSION_FALLBACKS,
        DATABASE_BYTES,
        VIEW_DIGEST,
        DP_PACKETS,
        DP_DECISIONS,
        DP_HELD,
        DP_UP,
        PROXY_CONNS,
        PROXY_BYTES,
        PROXY_ACTIVE,
        OWNER_DECISIONS,
        CHAIN_CONNS,
        CHAIN_BYTES,
        CHAIN_EVENTS,
        CHAIN_DICTIONARY,
        REJECTS,
        PEER_DOWN,
        CONFLICTS,
        REFUSED,
        INSTALLS_REFUSED,
        BUILD_INFO,
    ]
    .iter()
    .map(|d| d.name)
    .collect();
    v.push("lb_table_sync_seconds");
    v
}

/// A collector whose families are built from a subsystem's counters at each scrape.
struct ScrapeCollector {
    descs: Vec<Desc>,
    read: Box<dyn Fn() -> Vec<MetricFamily> + Send + Sync>,
}

impl ScrapeCollector {
    fn new(defs: &[Def], read: impl Fn() -> Vec<MetricFamily> + Send + Sync + 'static) -> Self {
        ScrapeCollector { descs: defs.iter().map(Def::desc).collect(), read: Box::new(read) }
    }
}

impl Collector for ScrapeCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        (self.read)()
    }
}

/// The member's metrics; also the mesh's observer.
pub struct Metrics {
    registry: Registry,
    mesh: OnceLock<()>,
    rejects: IntCounterVec,
    peer_down: IntCounterVec,
    stale_purged: IntCounterVec,
    conflicts: IntCounterVec,
    refused: IntCounterVec,
    installs_refused: IntCounterVec,
    table_sync: Histogram,
    /// Subsystems already exported (each is registered once).
    attached: Mutex<Vec<&'static str>>,
}

impl Metrics {
    /// Creates the registry with the event counters, `lb_build_info` and (on Linux) the
    /// `process_*` metrics; the subsystems' families come with [`Metrics::set_mesh`] and the
    /// other `set_*`.
    pub fn new() -> Arc<Self> {
        let registry = Registry::new();
        let table_sync = must(Histogram::with_opts(
            HistogramOpts::new("lb_table_sync_seconds", "Time to hand this member's table to a joining peer.")
                .buckets(vec![0.0001, 0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]),
        ));
        must(registry.register(Box::new(table_sync.clone())));
        let build = must(IntGaugeVec::new(BUILD_INFO.opts(), BUILD_INFO.labels));
        build.with_label_values(&[env!("CARGO_PKG_VERSION"), BUILD_COMMIT]).set(1);
        must(registry.register(Box::new(build)));
        #[cfg(target_os = "linux")]
        must(registry.register(Box::new(prometheus::process_collector::ProcessCollector::for_self())));
        let rejects = REJECTS.counter_vec(&registry);
        for dir in ["sent", "received"] {
            for code in REJECT_CODES {
                rejects.with_label_values(&[dir, code.name()]).inc_by(0);
            }
        }
        let conflicts = CONFLICTS.counter_vec(&registry);
        for k in CONFLICT_KINDS {
            conflicts.with_label_values(&[k]).inc_by(0);
        }
        let refused = REFUSED.counter_vec(&registry);
        for r in REFUSED_REASONS {
            refused.with_label_values(&[r]).inc_by(0);
        }
        Arc::new(Metrics {
            peer_down: PEER_DOWN.counter_vec(&registry),
            stale_purged: STALE_PURGED.counter_vec(&registry),
            installs_refused: INSTALLS_REFUSED.counter_vec(&registry),
            registry,
            mesh: OnceLock::new(),
            rejects,
            conflicts,
            refused,
            table_sync,
            attached: Mutex::default(),
        })
    }

    /// Registers `collector` unless `what` already is.
    fn attach(&self, what: &'static str, collector: impl FnOnce() -> ScrapeCollector) {
        let mut a = self.attached.lock().unwrap_or_else(|e| e.into_inner());
        if !a.contains(&what) {
            must(self.registry.register(Box::new(collector())));
            a.push(what);
        }
    }

    /// Exports the mesh: peer states, entries, message counters, and every peer's per-peer
    /// counters at 0. Once; [`Metrics::render`] does it too if nobody did.
    pub fn set_mesh(&self, mesh: &Mesh) {
        self.mesh.get_or_init(|| {
            for p in mesh.members().into_iter().filter(|&a| a != mesh.address()) {
                let peer = p.to_string();
                for r in PEER_DOWN_REASONS {
                    self.peer_down.with_label_values(&[&peer, r]).inc_by(0);
                }
                self.stale_purged.with_label_values(&[&peer]).inc_by(0);
                for r in INSTALL_REFUSED_REASONS {
                    self.installs_refused.with_label_values(&[&peer, r]).inc_by(0);
                }
            }
            let mesh = mesh.clone();
            self.attach("mesh", || {
                ScrapeCollector::new(
                    &[
                        PEERS,
                        PEER_UP,
                        ENTRIES,
                        MESSAGES,
                        KEEPALIVE_TIMEOUTS,
                        ADVERTISEMENTS,
                        VERSION_FALLBACKS,
                        DATABASE_BYTES,
                        VIEW_DIGEST,
                    ],
                    move || mesh_families(&mesh),
                )
            });
        });
    }

    /// Exports the data plane's counters.
    pub fn set_dataplane(&self, stats: Arc<Mutex<handoff::driver::DriverStats>>) {
        self.attach("dataplane", || {
            ScrapeCollector::new(&[DP_PACKETS, DP_DECISIONS, DP_HELD, DP_UP], move || {
                let s = stats.lock().unwrap_or_else(|e| e.into_inner()).clone();
                dataplane_families(&s)
            })
        });
    }

    /// Exports the owner policy's decisions, every reason of the policy from 0.
    pub fn set_steering(&self, steering: Arc<crate::steering::Steering>) {
        self.attach("steering", || {
            ScrapeCollector::new(&[OWNER_DECISIONS], move || {
                let policy = steering.name();
                let decided = steering.decisions();
                let mut samples: Vec<(Vec<&str>, u64)> =
                    owner_reasons(policy).iter().map(|r| (vec![policy, *r], 0)).collect();
                samples.extend(decided.iter().map(|(r, n)| (vec![policy, *r], *n)));
                OWNER_DECISIONS.counters(samples)
            })
        });
    }

    /// Exports the transparent proxy's counters.
    pub fn set_proxy(&self, stats: Arc<crate::proxy::ProxyStats>) {
        self.attach("proxy", || {
            ScrapeCollector::new(&[PROXY_CONNS, PROXY_BYTES, PROXY_ACTIVE], move || proxy_families(&stats))
        });
    }

    /// Exports the chained-proxy role's counters.
    pub fn set_chain(&self, stats: Arc<crate::chain::ChainStats>) {
        self.attach("chain", || {
            ScrapeCollector::new(&[CHAIN_CONNS, CHAIN_BYTES, CHAIN_EVENTS, CHAIN_DICTIONARY], move || {
                chain_families(&stats)
            })
        });
    }

    /// The text format of every metric, read now.
    pub fn render(&self, mesh: &Mesh) -> String {
        self.set_mesh(mesh);
        let mut out = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8(out).unwrap_or_default()
    }
}

fn mesh_families(mesh: &Mesh) -> Vec<MetricFamily> {
    let peers = mesh.peers();
    let mut out = PEERS.gauges(
        [PeerState::Down, PeerState::Connect, PeerState::Synchronize, PeerState::Established, PeerState::GaveUp]
            .map(|s| (vec![s.as_str()], peers.iter().filter(|p| p.state == s).count() as i64)),
    );
    let addrs: Vec<String> = peers.iter().map(|p| p.address.to_string()).collect();
    out.extend(
        PEER_UP.gauges(
            peers.iter().zip(&addrs).map(|(p, a)| (vec![a.as_str()], (p.state == PeerState::Established) as i64)),
        ),
    );
    out.extend(
        KEEPALIVE_TIMEOUTS.counters(peers.iter().zip(&addrs).map(|(p, a)| (vec![a.as_str()], p.keepalive_timeouts))),
    );
    let db = mesh.database();
    let members: Vec<String> = mesh.members().iter().map(|a| a.to_string()).collect();
    let mut entries = Vec::new();
    for (i, addr) in members.iter().enumerate() {
        let id = cluster_proto::MemberId(i as u8);
        for action in [Action::Forward, Action::Bypass] {
            let n = if id == mesh.me() { mesh.local().count_of(action) } else { db.count_of(id, action) };
            entries.push((vec![addr.as_str(), action.as_str()], n as i64));
        }
    }
    out.extend(ENTRIES.gauges(entries));
    let counted = mesh.messages().snapshot();
    let mut messages = Vec::new();
    for dir in ["in", "out"] {
        for (t, a) in MESSAGE_KINDS {
            messages.push((vec![dir, t, a], 0));
        }
    }
    for (dir, t, a, n) in counted {
        // The mesh names them as the paper does (INSTALL_CONNECTION, FORWARD); labels are
        // lower case like every other label value.
        let (t, a) = (t.to_ascii_lowercase(), a.to_ascii_lowercase());
        if let Some(&(t, a)) = MESSAGE_KINDS.iter().find(|(kt, ka)| *kt == t && *ka == a) {
            messages.push((vec![dir, t, a], n));
        }
    }
    out.extend(MESSAGES.counters(messages));
    let adv = mesh.advertisement_stats();
    out.extend(ADVERTISEMENTS.counters([
        (vec!["sent"], adv.sent),
        (vec!["received"], adv.received),
        (vec!["dropped"], adv.dropped),
        (vec!["skipped_v1"], adv.skipped_v1),
    ]));
    out.extend(VERSION_FALLBACKS.counters([(vec![], adv.version_fallbacks)]));
    out.extend(DATABASE_BYTES.gauges([(vec![], (db.memory_bytes() + mesh.local().memory_bytes()) as i64)]));
    out.extend(VIEW_DIGEST.gauges([(vec![], (mesh.view_digest() >> 11) as i64)]));
    out
}

fn dataplane_families(s: &handoff::driver::DriverStats) -> Vec<MetricFamily> {
    let e = &s.engine;
    let mut out = DP_PACKETS.counters(
        [
            ("encapsulated", e.encapsulated),
            ("decapsulated", e.decapsulated),
            ("tunnel_not_member", e.tunnel_not_member),
            ("malformed", e.malformed),
            ("mss_clamped", e.mss_clamped),
            ("encap_failed", e.encap_failed),
            ("io_errors", s.io_errors),
            ("queue_overflowed", s.queue_overflowed),
            ("held", e.hold.held),
            ("released", e.hold.released),
            ("expired", e.hold.expired),
            ("overflowed", e.hold.overflowed),
        ]
        .map(|(l, n)| (vec![l], n)),
    );
    let mut decisions: Vec<(Vec<&str>, u64)> =
        handoff::classify::Reason::ALL.iter().map(|r| (vec![r.name()], 0)).collect();
    decisions.extend(e.decisions.iter().map(|(r, n)| (vec![*r], *n)));
    out.extend(DP_DECISIONS.counters(decisions));
    out.extend(DP_HELD.gauges([(vec![], s.held as i64)]));
    out.extend(DP_UP.gauges([(vec![], s.running as i64)]));
    out
}

fn proxy_families(s: &crate::proxy::ProxyStats) -> Vec<MetricFamily> {
    use std::sync::atomic::Ordering::Relaxed;
    let mut out = PROXY_CONNS.counters(
        [
            ("accepted", &s.accepted),
            ("refused", &s.refused),
            ("spoofed_ok", &s.spoofed_ok),
            ("spoofed_failed", &s.spoofed_failed),
            ("plain_ok", &s.plain_ok),
            ("plain_failed", &s.plain_failed),
            ("idle_timeout", &s.idle_timeouts),
        ]
        .map(|(l, v)| (vec![l], v.load(Relaxed))),
    );
    out.extend(PROXY_BYTES.counters([
        (vec!["to_server"], s.bytes_to_server.load(Relaxed)),
        (vec!["to_client"], s.bytes_to_client.load(Relaxed)),
    ]));
    out.extend(PROXY_ACTIVE.gauges([(vec![], s.active.load(Relaxed) as i64)]));
    out
}

fn chain_families(s: &crate::chain::ChainStats) -> Vec<MetricFamily> {
    use std::sync::atomic::Ordering::Relaxed;
    let role = s.role.as_str();
    let mut out = CHAIN_CONNS.counters(
        [
            ("chained", &s.chained),
            ("plain", &s.plain),
            ("failed", &s.failed),
            ("shared", &s.shared),
            ("ephemeral", &s.ephemeral),
        ]
        .map(|(mode, v)| (vec![role, mode], v.load(Relaxed))),
    );
    out.extend(
        CHAIN_BYTES.counters(
            [
                ("to_upstream", "plain", &s.to_upstream_plain),
                ("to_upstream", "wire", &s.to_upstream_wire),
                ("to_downstream", "plain", &s.to_downstream_plain),
                ("to_downstream", "wire", &s.to_downstream_wire),
            ]
            .map(|(d, l, v)| (vec![d, l], v.load(Relaxed))),
        ),
    );
    out.extend(
        CHAIN_EVENTS.counters(
            [
                ("reset", &s.resets),
                ("nack_sent", &s.nacks_sent),
                ("nack_received", &s.nacks_received),
                ("decode_error", &s.decode_errors),
                ("dictionary_saved", &s.saves),
                ("shared_wait_arrived", &s.waits_arrived),
                ("shared_wait_fetched", &s.waits_fetched),
                ("dictionary_pair_evicted", &*s.pairs_evicted),
                ("older_codec", &s.older_codec),
            ]
            .map(|(e, v)| (vec![e], v.load(Relaxed))),
        ),
    );
    out.extend(CHAIN_DICTIONARY.gauges([(vec![], s.dictionary_bytes.load(Relaxed) as i64)]));
    out
}

impl MeshObserver for Metrics {
    fn on_event(&self, e: &MeshEvent) {
        match e {
            MeshEvent::PeerDown { peer, reason, .. } => {
                self.peer_down.with_label_values(&[peer.to_string().as_str(), reason]).inc()
            }
            MeshEvent::StalePurged { peer, purged } => {
                self.stale_purged.with_label_values(&[peer.to_string().as_str()]).inc_by(*purged as u64)
            }
            MeshEvent::TableSent { duration, .. } => self.table_sync.observe(duration.as_secs_f64()),
            MeshEvent::Reject { code, sent, .. } => {
                self.rejects.with_label_values(&[if *sent { "sent" } else { "received" }, code.name()]).inc()
            }
            MeshEvent::OwnershipConflict { kind, .. } => self.conflicts.with_label_values(&[kind]).inc(),
            MeshEvent::ClaimLost { .. } => self.conflicts.with_label_values(&["claim_withdrawn"]).inc(),
            MeshEvent::ChannelRefused { reason, .. } => self.refused.with_label_values(&[reason]).inc(),
            MeshEvent::InstallRefused { peer, reason } => {
                self.installs_refused.with_label_values(&[peer.to_string().as_str(), reason]).inc()
            }
            // Read from the mesh's own counters at scrape time.
            MeshEvent::PeerUp { .. }
            | MeshEvent::KeepaliveTimeout { .. }
            | MeshEvent::Advertisements { .. }
            | MeshEvent::VersionFallback { .. } => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scrape_families_read_current_values_and_start_at_zero() {
        let stats = Arc::new(crate::proxy::ProxyStats::default());
        let fams = proxy_families(&stats);
        let conns = fams.iter().find(|f| f.name() == "lb_proxy_connections_total").unwrap();
        assert_eq!(conns.get_metric().len(), 7);
        assert!(conns.get_metric().iter().all(|m| m.get_counter().get_value() == 0.0));
        stats.accepted.fetch_add(3, std::sync::atomic::Ordering::Relaxed);
        let fams = proxy_families(&stats);
        let conns = fams.iter().find(|f| f.name() == "lb_proxy_connections_total").unwrap();
        assert_eq!(conns.get_metric().iter().map(|m| m.get_counter().get_value()).sum::<f64>(), 3.0);
    }

    #[test]
    fn dataplane_reasons_all_exported_and_added() {
        let mut s = handoff::driver::DriverStats::default();
        s.engine.decisions.insert("remote_flow", 5);
        let fams = dataplane_families(&s);
        let d = fams.iter().find(|f| f.name() == "lb_dataplane_decisions_total").unwrap();
        assert_eq!(d.get_metric().len(), handoff::classify::Reason::ALL.len());
        let remote = d
            .get_metric()
            .iter()
            .find(|m| m.get_label().iter().any(|l| l.value() == "remote_flow"))
            .map(|m| m.get_counter().get_value());
        assert_eq!(remote, Some(5.0));
    }

    #[test]
    fn build_info_and_event_counters_from_the_start() {
        let m = Metrics::new();
        let mut out = Vec::new();
        TextEncoder::new().encode(&m.registry.gather(), &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(text.contains(&format!(
            "lb_build_info{{commit=\"{BUILD_COMMIT}\",version=\"{}\"}} 1",
            env!("CARGO_PKG_VERSION")
        )));
        assert!(text.contains("lb_rejects_total{direction=\"received\",reason=\"version_mismatch\"} 0"));
        assert!(text.contains("lb_channels_refused_total{reason=\"tls_identity\"} 0"));
        #[cfg(target_os = "linux")]
        for p in ["process_resident_memory_bytes", "process_open_fds", "process_start_time_seconds"] {
            assert!(text.contains(&format!("\n{p} ")), "{p} missing:\n{text}");
        }
    }
}
