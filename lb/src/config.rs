//! `lb.toml`: every key, its default and its limits. Unknown keys and bad values are refused
//! with a message naming the key. docs/configuration.md documents the same.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use cluster_proto::mesh::{MemberConfig, MeshConfig, Retries};
use cluster_proto::session::SessionConfig;
use cluster_proto::wire::{VERSION_1, VERSION_2};
use serde::de::{self, Deserializer, Visitor};
use serde::Deserialize;

/// Default control-channel port.
pub const DEFAULT_PORT: u16 = 7400;
/// Default admin HTTP listener.
pub const DEFAULT_ADMIN: &str = "127.0.0.1:9741";

/// Where `lb run`, `lb check-config` and `lb rules` read the configuration without `--config`
/// (the packaged unit and example use it).
pub const DEFAULT_PATH: &str = "/etc/lb/lb.toml";

/// The whole file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// `[node]`
    pub node: Node,
    /// `[cluster]`
    pub cluster: Cluster,
    /// `[admin]`
    #[serde(default)]
    pub admin: Admin,
    /// `[dataplane]`: packet interception and handoff; absent means control plane only.
    pub dataplane: Option<Dataplane>,
    /// `[proxy]`: the built-in transparent TCP proxy; absent means none.
    pub proxy: Option<ProxySection>,
    /// `[tls]`: mutual TLS on the control channel.
    pub tls: Option<TlsSection>,
    /// `[affinity]`: the dictionary-affinity owner policy (`dataplane.policy = "affinity"`)
    /// and the dictionary statistics this member advertises.
    #[serde(default)]
    pub affinity: AffinitySection,
    /// `[log]`: log format, level and throttle.
    #[serde(default)]
    pub log: LogSection,
}

/// `[log]`: how the daemon logs (the `--log-format` and `--log-level` flags win).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogSection {
    /// "text" or "json".
    #[serde(default)]
    pub format: crate::logging::LogFormat,
    /// A level or filter directives ("info", "info,cluster_proto=debug"); `RUST_LOG` wins.
    #[serde(default)]
    pub level: Option<String>,
    /// Identical messages written per window; the rest are counted. 0: no throttle.
    #[serde(default = "default_throttle_burst")]
    pub throttle_burst: u32,
    /// The throttle's window, in seconds.
    #[serde(default = "default_throttle_window_s")]
    pub throttle_window_s: u64,
}

impl Default for LogSection {
    fn default() -> Self {
        toml::from_str("").expect("every [log] key has a default")
    }
}

fn default_throttle_burst() -> u32 {
    10
}
fn default_throttle_window_s() -> u64 {
    60
}

impl LogSection {
    /// Checks values that serde cannot.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if let Some(l) = &self.level {
            crate::logging::check_filter(l).map_err(|e| invalid("log.level", e))?;
        }
        if !(1..=3600).contains(&self.throttle_window_s) {
            return Err(invalid(
                "log.throttle_window_s",
                format!("must be between 1 and 3600, got {}", self.throttle_window_s),
            ));
        }
        Ok(())
    }
}

/// `[affinity]`: settings of the affinity engine; they must be the same on every member so
/// that every load-balancing member makes the same choice.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AffinitySection {
    /// IPv4 client prefix length that makes a pair (one site behind a spoofing downstream).
    #[serde(default = "default_v4_client")]
    pub client_prefix_v4: u8,
    /// IPv4 server prefix length.
    #[serde(default = "default_v4_server")]
    pub server_prefix_v4: u8,
    /// IPv6 client prefix length.
    #[serde(default = "default_v6_client")]
    pub client_prefix_v6: u8,
    /// IPv6 server prefix length.
    #[serde(default = "default_v6_server")]
    pub server_prefix_v6: u8,
    /// Half-life of the decayed bytes saved, in seconds.
    #[serde(default = "default_half_life_s")]
    pub half_life_s: u64,
    /// A member qualifies when its load is at most this times the average (>= 1).
    #[serde(default = "default_load_bound")]
    pub load_bound: f64,
    /// New pairs (no dictionary anywhere) go to members at most this times the average.
    #[serde(default = "default_new_pair_bound")]
    pub new_pair_bound: f64,
    /// Connections of headroom every bound grants above the average at least.
    #[serde(default = "default_load_slack")]
    pub load_slack: f64,
    /// How often dictionary statistics (DICT_STATS) are advertised, in milliseconds.
    #[serde(default = "default_advertise_ms")]
    pub advertise_ms: u64,
    /// Most pairs tracked by the engine and by this member's ledger.
    #[serde(default = "default_max_pairs")]
    pub max_pairs: u64,
}

impl Default for AffinitySection {
    fn default() -> Self {
        toml::from_str("").expect("every [affinity] key has a default")
    }
}

fn default_v4_client() -> u8 {
    24
}
fn default_v4_server() -> u8 {
    32
}
fn default_v6_client() -> u8 {
    64
}
fn default_v6_server() -> u8 {
    128
}
fn default_half_life_s() -> u64 {
    300
}
fn default_load_bound() -> f64 {
    1.25
}
fn default_new_pair_bound() -> f64 {
    1.1
}
fn default_load_slack() -> f64 {
    4.0
}
fn default_advertise_ms() -> u64 {
    1000
}
fn default_max_pairs() -> u64 {
    262_144
}

impl AffinitySection {
    /// Checks values that serde cannot.
    pub fn validate(&self) -> Result<(), ConfigError> {
        for (key, v, max) in [
            ("client_prefix_v4", self.client_prefix_v4, 32),
            ("server_prefix_v4", self.server_prefix_v4, 32),
            ("client_prefix_v6", self.client_prefix_v6, 128),
            ("server_prefix_v6", self.server_prefix_v6, 128),
        ] {
            if v > max {
                return Err(invalid(format!("affinity.{key}"), format!("must be at most {max}, got {v}")));
            }
        }
        if !(self.load_bound.is_finite() && self.load_bound >= 1.0) {
            return Err(invalid("affinity.load_bound", format!("must be at least 1, got {}", self.load_bound)));
        }
        if !(self.new_pair_bound >= 1.0 && self.new_pair_bound <= self.load_bound) {
            return Err(invalid(
                "affinity.new_pair_bound",
                format!("must be between 1 and load_bound ({}), got {}", self.load_bound, self.new_pair_bound),
            ));
        }
        if !(self.load_slack.is_finite() && self.load_slack >= 0.0) {
            return Err(invalid("affinity.load_slack", format!("must be 0 or more, got {}", self.load_slack)));
        }
        if self.half_life_s == 0 {
            return Err(invalid("affinity.half_life_s", "must be at least 1"));
        }
        if !(50..=60_000).contains(&self.advertise_ms) {
            return Err(invalid(
                "affinity.advertise_ms",
                format!("must be between 50 and 60000, got {}", self.advertise_ms),
            ));
        }
        if self.max_pairs < 16 {
            return Err(invalid("affinity.max_pairs", format!("must be at least 16, got {}", self.max_pairs)));
        }
        Ok(())
    }

    /// The engine's settings.
    pub fn engine_config(&self) -> dictionary_affinity::affinity::AffinityConfig {
        use dictionary_affinity::affinity::{AffinityConfig, PairGranularity};
        AffinityConfig {
            granularity: PairGranularity {
                v4_client: self.client_prefix_v4,
                v4_server: self.server_prefix_v4,
                v6_client: self.client_prefix_v6,
                v6_server: self.server_prefix_v6,
            },
            half_life: Duration::from_secs(self.half_life_s),
            load_bound: self.load_bound,
            new_pair_bound: self.new_pair_bound,
            load_slack: self.load_slack,
            max_pairs: self.max_pairs,
            ..AffinityConfig::default()
        }
    }
}

/// `[tls]`: the member's credentials for the mutual-TLS control channel.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSection {
    /// PEM file with the cluster CA certificate(s).
    pub ca: std::path::PathBuf,
    /// PEM file with this member's certificate (its SAN is the member's cluster address).
    pub cert: std::path::PathBuf,
    /// PEM file with this member's private key.
    pub key: std::path::PathBuf,
}

/// `[proxy]`: the on-box transparent proxy (TPROXY listener, optional client spoofing).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProxySection {
    /// Where TPROXY delivers intercepted connections, e.g. "0.0.0.0:8080" ("[::]:8080" takes
    /// both families).
    pub listen: SocketAddr,
    /// Connect to the server from the client's address (client spoofing).
    #[serde(default = "default_true")]
    pub spoof: bool,
    /// TCP destination ports to intercept.
    pub intercept_tcp_ports: Vec<u16>,
    /// Packet mark (and mask) used for TPROXY and its policy route.
    #[serde(default = "default_mark")]
    pub tproxy_mark: u32,
    /// Routing table for the local route of marked packets.
    #[serde(default = "default_table")]
    pub route_table: u32,
    /// Connect timeout towards servers, in milliseconds.
    #[serde(default = "default_connect_ms")]
    pub connect_timeout_ms: u64,
    /// Idle timeout of a proxied connection, in milliseconds.
    #[serde(default = "default_idle_ms")]
    pub idle_timeout_ms: u64,
    /// Connections proxied at once, at most.
    #[serde(default = "default_max_conns")]
    pub max_connections: usize,
    /// Install and remove the TPROXY rules, policy rule and local route.
    #[serde(default = "default_true")]
    pub manage_rules: bool,
    /// Chained proxies (paper 1.2, docs/codec.md section 11): "plain", "downstream" or "upstream".
    #[serde(default)]
    pub role: ProxyRole,
    /// Downstream: intercepted ports whose connections are chained (the rest is relayed plain).
    #[serde(default)]
    pub chain_ports: Vec<u16>,
    /// Upstream: how long to wait for a client's first bytes before relaying plain, in ms.
    #[serde(default = "default_detect_ms")]
    pub detect_ms: u64,
    /// Dictionary budget per peer and direction, in MiB; must be equal on both ends of a chain.
    #[serde(default = "default_dictionary_budget_mb")]
    pub dictionary_budget_mb: u64,
    /// Save the pair dictionaries here (at shutdown and every 30 s) and load them at start.
    #[serde(default)]
    pub dictionary_dir: Option<std::path::PathBuf>,
    /// This proxy's identity in the chain HELLO (default: node.address).
    #[serde(default)]
    pub chain_id: Option<String>,
    /// Compress literal and new-chunk bodies with zstd level 1.
    #[serde(default)]
    pub zstd: bool,
    /// Run each pair's dictionaries shared by all of its concurrent connections when the
    /// peer offers it too (chain HELLO flag); off, one connection at a time has them.
    #[serde(default = "default_true")]
    pub shared_dictionaries: bool,
    /// Most pair dictionaries held at once (peer identities); memory stays under this x 2 x
    /// `dictionary_budget_mb`.
    #[serde(default = "default_max_dictionary_pairs")]
    pub max_dictionary_pairs: usize,
}

fn default_max_dictionary_pairs() -> usize {
    64
}

/// `[proxy] role`: which end of a proxy chain this proxy is, if any.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProxyRole {
    /// A transparent proxy, no chain.
    #[default]
    Plain,
    /// Encodes connections to `chain_ports` towards an upstream proxy.
    Downstream,
    /// Decodes chained connections from downstream proxies; relays the rest plain.
    Upstream,
}

fn default_detect_ms() -> u64 {
    300
}

fn default_dictionary_budget_mb() -> u64 {
    64
}

impl ProxySection {
    /// Checks the chain keys.
    fn validate_chain(&self) -> Result<(), ConfigError> {
        let role = self.role;
        if role == ProxyRole::Downstream {
            if self.chain_ports.is_empty() {
                return Err(invalid("proxy.chain_ports", "a downstream needs the ports to chain"));
            }
            if let Some(p) = self.chain_ports.iter().find(|p| !self.intercept_tcp_ports.contains(p)) {
                return Err(invalid("proxy.chain_ports", format!("port {p} is not in intercept_tcp_ports")));
            }
        } else if !self.chain_ports.is_empty() {
            return Err(invalid("proxy.chain_ports", "only a role = \"downstream\" proxy chains ports"));
        }
        if !(1..=10_000).contains(&self.detect_ms) {
            return Err(invalid("proxy.detect_ms", "must be between 1 and 10000"));
        }
        if !(1..=65_536).contains(&self.max_dictionary_pairs) {
            return Err(invalid("proxy.max_dictionary_pairs", "must be between 1 and 65536"));
        }
        if !(1..=65_536).contains(&self.dictionary_budget_mb) {
            return Err(invalid("proxy.dictionary_budget_mb", "must be between 1 and 65536"));
        }
        if let Some(id) = &self.chain_id {
            if id.is_empty() || id.len() > 255 {
                return Err(invalid("proxy.chain_id", "must be 1 to 255 bytes"));
            }
        }
        Ok(())
    }
}

/// `[dataplane]`: what is intercepted and how flows are handed over.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Dataplane {
    /// NFQUEUE number the rules send packets to.
    #[serde(default = "default_queue")]
    pub queue: u16,
    /// TCP ports whose connections are intercepted (matched as source or destination).
    #[serde(default)]
    pub intercept_tcp_ports: Vec<u16>,
    /// UDP ports whose flows are intercepted.
    #[serde(default)]
    pub intercept_udp_ports: Vec<u16>,
    /// TUN device decapsulated packets are injected into.
    #[serde(default = "default_tun")]
    pub tun: String,
    /// Link MTU for MSS clamping of SYN and SYN-ACK; 0 disables clamping.
    #[serde(default = "default_mtu")]
    pub mtu: u16,
    /// How long partial flows are held, in milliseconds (the cluster's diameter).
    #[serde(default = "default_hold_ms")]
    pub hold_ms: u64,
    /// Hold queue bound in packets.
    #[serde(default = "default_hold_packets")]
    pub hold_packets: usize,
    /// Hold queue bound in bytes.
    #[serde(default = "default_hold_bytes")]
    pub hold_bytes: usize,
    /// Owner policy for new flows: "local", "rendezvous" (5-tuple hash), "pair-rendezvous"
    /// (client/server address hash) or "affinity" (best dictionary within the load bound).
    #[serde(default = "default_policy")]
    pub policy: String,
    /// Cluster addresses of the members that may own new flows (default: every member), e.g.
    /// the upstream proxies behind load-balancing members.
    #[serde(default)]
    pub owners: Vec<IpAddr>,
    /// New connections with an endpoint in one of these networks are installed as BYPASS.
    #[serde(default)]
    pub bypass: Vec<BypassEntry>,
    /// Time a closed TCP connection is kept before REMOVE, in milliseconds.
    #[serde(default = "default_linger_ms")]
    pub linger_ms: u64,
    /// Idle time after which a UDP flow is removed, in milliseconds.
    #[serde(default = "default_udp_idle_ms")]
    pub udp_idle_ms: u64,
    /// Idle time after which an established TCP connection is removed, in milliseconds.
    #[serde(default = "default_tcp_idle_ms")]
    pub tcp_idle_ms: u64,
    /// Time after which a TCP connection whose destination never answered is removed.
    #[serde(default = "default_embryonic_ms")]
    pub embryonic_ms: u64,
    /// Idle time after which a connection closed in one direction only is removed.
    #[serde(default = "default_half_closed_ms")]
    pub half_closed_ms: u64,
    /// NFQUEUE length in packets; beyond it packets bypass the data plane (fail-open).
    #[serde(default = "default_queue_len")]
    pub queue_len: u32,
    /// Receive buffer of the NFQUEUE socket in bytes: where queued packets wait for the
    /// daemon. When it is full, packets pass unseen (fail-open), so a burst of forwarded
    /// traffic must fit.
    #[serde(default = "default_queue_buffer_bytes")]
    pub queue_buffer_bytes: u64,
    /// Install and remove the netfilter rules (false: print them with `lb rules` and manage
    /// them yourself).
    #[serde(default = "default_true")]
    pub manage_rules: bool,
    /// Later packets of this member's own flows skip user space (an nftables set of flows,
    /// timed), except TCP SYN/FIN/RST and about one packet per flow direction every
    /// `fast_path_sample_ms`.
    #[serde(default = "default_true")]
    pub fast_path: bool,
    /// The packet mark bit the daemon's verdict sets for the fast path (one bit, at most
    /// 0x40000000); the fast path also uses the next higher bit. Both are reserved for lb.
    #[serde(default = "default_fast_path_mark")]
    pub fast_path_mark: u32,
    /// A fast-path flow still sends one packet to user space this often (idle timers).
    #[serde(default = "default_fast_path_sample_ms")]
    pub fast_path_sample_ms: u64,
}

impl Dataplane {
    /// The fast path's two mark bits: the verdict bit (`fast_path_mark`, set by the daemon on
    /// packets of local flows) and the next higher one (set by the table on packets that skip
    /// the queue).
    pub fn fast_path_bits(&self) -> (u32, u32) {
        (self.fast_path_mark, self.fast_path_mark << 1)
    }
}

/// One bypass rule: `{ net = "203.0.113.0/24", port = 443 }` (port optional).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BypassEntry {
    /// Network in CIDR notation.
    pub net: String,
    /// Only this port, if set.
    pub port: Option<u16>,
}

/// `[node]`: this member.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Node {
    /// Cluster address: the control channel listens and dials from it.
    pub address: IpAddr,
}

/// `[cluster]`: the membership list and channel settings.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Cluster {
    /// Control-channel port, the same on every member unless overridden per member.
    #[serde(default = "default_port")]
    pub port: u16,
    /// Highest protocol version spoken: 1 is the paper's format, 2 adds the affinity
    /// advertisements (negotiated per channel, falling back to 1 with version-1 peers).
    #[serde(default = "default_version")]
    pub version: u8,
    /// PEER_KEEPALIVE interval in milliseconds.
    #[serde(default = "default_keepalive")]
    pub keepalive_ms: u64,
    /// Silent intervals after which a peer is dead.
    #[serde(default = "default_dead_after")]
    pub dead_after: u32,
    /// Connect attempts per peer: "infinite" or a count.
    #[serde(default)]
    pub connect_retries: RetriesSetting,
    /// Messages queued to one peer before it is declared stalled and resynchronized.
    #[serde(default = "default_send_queue")]
    pub send_queue: usize,
    /// Accepted channels from non-members that have not completed their join yet (TLS
    /// handshake included), at most; members' addresses have places of their own.
    #[serde(default = "default_pending_joins")]
    pub max_pending_joins: usize,
    /// Of those, at most this many from one source address.
    #[serde(default = "default_pending_per_source")]
    pub max_pending_per_source: usize,
    /// Entries one peer may own here; further INSTALLs from it are refused and counted.
    #[serde(default = "default_max_entries")]
    pub max_entries_per_member: usize,
    /// INSTALLs per second accepted from one peer once a burst of max_entries_per_member is
    /// used up.
    #[serde(default = "default_install_rate")]
    pub max_install_rate: u32,
    /// Test aid: delay every update this member sends by this many milliseconds, to
    /// emulate a long-distance cluster. Leave at 0 in production.
    #[serde(default)]
    pub test_send_delay_ms: u64,
    /// Speak the paper's unauthenticated plaintext format (needed when there is no [tls]
    /// section; anyone who can reach the port can then install state: logged as a warning).
    #[serde(default)]
    pub plaintext: bool,
    /// Every member's cluster address, this one included.
    pub members: Vec<IpAddr>,
    /// Per-member overrides, keyed by address: `[cluster.member."192.0.2.2"]`.
    #[serde(default)]
    pub member: BTreeMap<String, MemberOverride>,
}

/// `[cluster.member."ADDRESS"]`: settings for one member.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemberOverride {
    /// Its control port.
    pub port: Option<u16>,
    /// Keepalive interval with it.
    pub keepalive_ms: Option<u64>,
    /// Silent intervals before it is dead.
    pub dead_after: Option<u32>,
    /// Connect attempts towards it.
    pub connect_retries: Option<RetriesSetting>,
}

/// `[admin]`: the HTTP admin API.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Admin {
    /// Listen address of the admin API (metrics, peers, flows, connections).
    #[serde(default = "default_admin")]
    pub listen: SocketAddr,
    /// Connections served at once; more are closed as soon as they are accepted.
    #[serde(default = "default_admin_connections")]
    pub max_connections: usize,
    /// A connection on which no byte moves for this long (headers not sent, idle keep-alive)
    /// is closed.
    #[serde(default = "default_admin_idle")]
    pub idle_timeout_ms: u64,
    /// A second listener that serves only `GET /metrics` (for a scraper that must not reach
    /// `POST`/`DELETE /connections`); none by default.
    #[serde(default)]
    pub metrics_listen: Option<SocketAddr>,
}

impl Default for Admin {
    fn default() -> Self {
        Admin {
            listen: default_admin(),
            max_connections: default_admin_connections(),
            idle_timeout_ms: default_admin_idle(),
            metrics_listen: None,
        }
    }
}

impl Admin {
    /// Checks values that serde cannot.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.max_connections == 0 {
            return Err(invalid("admin.max_connections", "must be at least 1"));
        }
        if !(100..=3_600_000).contains(&self.idle_timeout_ms) {
            return Err(invalid("admin.idle_timeout_ms", format!("must be 100-3600000, got {}", self.idle_timeout_ms)));
        }
        Ok(())
    }

    /// The HTTP server's limits.
    pub fn limits(&self) -> crate::admin::ServerLimits {
        crate::admin::ServerLimits {
            max_connections: self.max_connections,
            idle_timeout: Duration::from_millis(self.idle_timeout_ms),
        }
    }
}

fn default_admin_connections() -> usize {
    256
}
fn default_admin_idle() -> u64 {
    30_000
}

/// "infinite" or a number of attempts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetriesSetting(pub Retries);

impl Default for RetriesSetting {
    fn default() -> Self {
        RetriesSetting(Retries::Infinite)
    }
}

impl<'de> Deserialize<'de> for RetriesSetting {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = RetriesSetting;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("\"infinite\" or a count of at least 1")
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
                match u32::try_from(v) {
                    Ok(n) if n >= 1 => Ok(RetriesSetting(Retries::Count(n))),
                    _ => Err(E::custom(format!("{v} is not a valid count: use \"infinite\" or a count of at least 1"))),
                }
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                if v == "infinite" {
                    Ok(RetriesSetting(Retries::Infinite))
                } else {
                    Err(E::custom(format!("{v:?} is not valid: use \"infinite\" or a count of at least 1")))
                }
            }
        }
        d.deserialize_any(V)
    }
}

fn default_max_entries() -> usize {
    4_000_000
}
fn default_install_rate() -> u32 {
    1_000_000
}
fn default_mark() -> u32 {
    1
}
fn default_table() -> u32 {
    100
}
fn default_connect_ms() -> u64 {
    5000
}
fn default_idle_ms() -> u64 {
    300_000
}
fn default_max_conns() -> usize {
    10_000
}
fn default_queue() -> u16 {
    7
}
fn default_tun() -> String {
    "lbtun0".into()
}
fn default_mtu() -> u16 {
    1500
}
fn default_hold_ms() -> u64 {
    200
}
fn default_hold_packets() -> usize {
    65_536
}
fn default_hold_bytes() -> usize {
    64 << 20
}
fn default_policy() -> String {
    "local".into()
}
fn default_linger_ms() -> u64 {
    2000
}
fn default_udp_idle_ms() -> u64 {
    30_000
}
fn default_tcp_idle_ms() -> u64 {
    2 * 3600 * 1000
}
fn default_embryonic_ms() -> u64 {
    30_000
}
fn default_half_closed_ms() -> u64 {
    30_000
}
fn default_queue_len() -> u32 {
    8192
}
/// 16 MiB: the kernel charges each queued packet's whole buffer (about 2.3 KiB for a
/// 1500-byte packet), so this holds some 7,000 packets, near the default queue length.
fn default_queue_buffer_bytes() -> u64 {
    16 << 20
}
fn default_true() -> bool {
    true
}
fn default_fast_path_mark() -> u32 {
    0x4000_0000
}
fn default_fast_path_sample_ms() -> u64 {
    1000
}
fn default_port() -> u16 {
    DEFAULT_PORT
}
fn default_version() -> u8 {
    VERSION_1
}
fn default_keepalive() -> u64 {
    1000
}
fn default_dead_after() -> u32 {
    3
}
fn default_send_queue() -> usize {
    1 << 16
}
fn default_pending_joins() -> usize {
    64
}
fn default_pending_per_source() -> usize {
    4
}
fn default_admin() -> SocketAddr {
    DEFAULT_ADMIN.parse().expect("valid default")
}

/// A configuration that cannot be used, with the key at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}")]
    Read {
        /// File.
        path: String,
        /// OS error.
        source: std::io::Error,
    },
    /// TOML syntax, an unknown key or a value of the wrong type.
    #[error("{0}")]
    Parse(String),
    /// A value out of range or inconsistent with another.
    #[error("{key}: {message}")]
    Invalid {
        /// The key, dotted (`cluster.keepalive_ms`).
        key: String,
        /// What is wrong.
        message: String,
    },
}

fn invalid(key: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid { key: key.into(), message: message.into() }
}

fn check_keepalive(key: &str, ms: u64) -> Result<Duration, ConfigError> {
    if !(100..=3_600_000).contains(&ms) {
        return Err(invalid(key, format!("must be between 100 and 3600000 milliseconds, got {ms}")));
    }
    Ok(Duration::from_millis(ms))
}

fn check_dead_after(key: &str, n: u32) -> Result<u32, ConfigError> {
    // One interval would race every keepalive against the dead timer.
    if !(2..=100).contains(&n) {
        return Err(invalid(key, format!("must be between 2 and 100 intervals, got {n}")));
    }
    Ok(n)
}

/// What each `[tls]` file must hold, said in the operator's terms before rustls's terser errors:
/// a key given as `cert` (or the reverse), a CA file that carries the CA's own key, and a
/// private key that every user of the host can read.
fn check_pem_files(t: &TlsSection, ca: &[u8], cert: &[u8], key: &[u8]) -> Result<(), ConfigError> {
    use cluster_proto::mesh::tls::{is_private_key, pem_sections, SectionKind};
    let holds = |bytes: &[u8]| {
        let kinds = pem_sections(bytes);
        (kinds.contains(&SectionKind::Certificate), kinds.iter().any(|&k| is_private_key(k)))
    };
    for (name, path, bytes) in [("ca", &t.ca, ca), ("cert", &t.cert, cert)] {
        let why = match holds(bytes) {
            (true, true) if name == "ca" => {
                "holds a private key besides the CA certificate: the CA's key (ca.key) must stay off the members"
            }
            (true, _) => continue,
            (false, true) => "holds a private key, not a certificate: are cert and key (or ca and ca.key) swapped?",
            (false, false) => "holds no PEM certificate (a -----BEGIN CERTIFICATE----- block)",
        };
        return Err(invalid(format!("tls.{name}"), format!("{} {why}", path.display())));
    }
    match holds(key) {
        (_, true) => {}
        (true, false) => {
            return Err(invalid(
                "tls.key",
                format!("{} holds a certificate, not a private key: are cert and key swapped?", t.key.display()),
            ))
        }
        (false, false) => {
            return Err(invalid(
                "tls.key",
                format!("{} holds no PEM private key (a -----BEGIN PRIVATE KEY----- block)", t.key.display()),
            ))
        }
    }
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&t.key)
        .map_err(|e| invalid("tls.key", format!("cannot read {}: {e}", t.key.display())))?
        .permissions()
        .mode();
    if mode & 0o006 != 0 {
        return Err(invalid(
            "tls.key",
            format!(
                "{} is open to every user of this host (mode {:04o}): chmod 600 it (or 640 with a group lb runs in)",
                t.key.display(),
                mode & 0o7777
            ),
        ));
    }
    Ok(())
}

impl Config {
    /// Reads and validates a file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Read { path: path.display().to_string(), source })?;
        Self::parse(&text)
    }

    /// Parses and validates TOML text.
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        let c: Config = toml::from_str(text).map_err(|e| ConfigError::Parse(e.to_string()))?;
        let mesh = c.mesh()?;
        // The members' own control channels run on these ports: intercepting them would hand
        // the cluster's TCP connections to the data plane or the proxy they steer.
        let control_ports: Vec<u16> = mesh.members.iter().map(|m| m.port).collect();
        let intercepted = [
            ("dataplane.intercept_tcp_ports", c.dataplane.as_ref().map(|d| &d.intercept_tcp_ports)),
            ("proxy.intercept_tcp_ports", c.proxy.as_ref().map(|p| &p.intercept_tcp_ports)),
        ];
        for (key, ports) in intercepted {
            if let Some(p) = ports.into_iter().flatten().find(|p| control_ports.contains(p)) {
                return Err(invalid(
                    key,
                    format!(
                        "port {p} is the cluster's control port (cluster.port or a member's override): \
                         intercepting it would capture the members' own control channels"
                    ),
                ));
            }
        }
        c.affinity.validate()?;
        c.admin.validate()?;
        c.log.validate()?;
        if let Some(m) = c.admin.metrics_listen {
            if m == c.admin.listen {
                return Err(invalid("admin.metrics_listen", "must differ from admin.listen"));
            }
        }
        if let Some(d) = &c.dataplane {
            d.validate()?;
            for o in &d.owners {
                if !c.cluster.members.contains(o) {
                    return Err(invalid("dataplane.owners", format!("{o} is not in cluster.members")));
                }
            }
            if d.policy == "local" && !d.owners.is_empty() && !d.owners.contains(&c.node.address) {
                return Err(invalid(
                    "dataplane.owners",
                    format!(
                        "policy \"local\" keeps new flows on this member, which is not among the owners; \
                         use policy \"affinity\", \"pair-rendezvous\" or \"rendezvous\" to hand them to {:?}",
                        d.owners
                    ),
                ));
            }
        }
        match (&c.tls, c.cluster.plaintext) {
            (None, false) => {
                return Err(invalid(
                    "tls",
                    "no [tls] section: configure mutual TLS (see lb gen-certs and docs/security.md) \
                     or set cluster.plaintext = true to speak the paper's unauthenticated format",
                ))
            }
            (Some(_), true) => {
                return Err(invalid("cluster.plaintext", "cannot be true together with a [tls] section"))
            }
            _ => {}
        }
        if let (Some(d), Some(p)) = (&c.dataplane, &c.proxy) {
            let (verdict, fast) = d.fast_path_bits();
            if d.fast_path && (verdict | fast) & p.tproxy_mark != 0 {
                return Err(invalid(
                    "dataplane.fast_path_mark",
                    format!(
                        "{:#x} (and the next bit, {fast:#x}) shares bits with proxy.tproxy_mark {:#x}",
                        d.fast_path_mark, p.tproxy_mark
                    ),
                ));
            }
        }
        if let Some(p) = &c.proxy {
            if p.intercept_tcp_ports.is_empty() || p.intercept_tcp_ports.contains(&0) {
                return Err(invalid("proxy.intercept_tcp_ports", "list the TCP ports to intercept (1-65535)"));
            }
            if p.listen.port() == 0 {
                return Err(invalid("proxy.listen", "needs a port"));
            }
            if p.tproxy_mark == 0 {
                return Err(invalid("proxy.tproxy_mark", "must not be 0"));
            }
            if p.route_table == 0 || p.route_table >= 253 && p.route_table <= 255 {
                return Err(invalid("proxy.route_table", "must not be 0 or a reserved table (253-255)"));
            }
            for (key, v) in [
                ("max_connections", p.max_connections as u64),
                ("connect_timeout_ms", p.connect_timeout_ms),
                ("idle_timeout_ms", p.idle_timeout_ms),
            ] {
                if v == 0 {
                    return Err(invalid(format!("proxy.{key}"), "must be at least 1"));
                }
            }
            if p.intercept_tcp_ports.contains(&p.listen.port()) {
                return Err(invalid(
                    "proxy.intercept_tcp_ports",
                    "must not contain the proxy's own listen port (it would loop)",
                ));
            }
            p.validate_chain()?;
        }
        Ok(c)
    }

    /// Reads the [tls] files into the mesh's TLS settings (`None` for plaintext).
    pub fn tls_settings(&self) -> Result<Option<std::sync::Arc<cluster_proto::mesh::tls::TlsSettings>>, ConfigError> {
        let Some(t) = &self.tls else { return Ok(None) };
        let read = |key: &str, p: &std::path::Path| {
            std::fs::read(p).map_err(|e| invalid(format!("tls.{key}"), format!("cannot read {}: {e}", p.display())))
        };
        let (ca, cert, key) = (read("ca", &t.ca)?, read("cert", &t.cert)?, read("key", &t.key)?);
        check_pem_files(t, &ca, &cert, &key)?;
        if !cluster_proto::mesh::tls::pem_names(&cert, self.node.address) {
            return Err(invalid(
                "tls.cert",
                format!(
                    "{} does not name this member's address {} in its subject alternative names: peers would refuse it",
                    t.cert.display(),
                    self.node.address
                ),
            ));
        }
        let s = cluster_proto::mesh::tls::TlsSettings::from_pem(&ca, &cert, &key)
            .map_err(|e| invalid("tls", e.to_string()))?;
        Ok(Some(std::sync::Arc::new(s)))
    }

    /// The mesh driver's configuration.
    pub fn mesh(&self) -> Result<MeshConfig, ConfigError> {
        let c = &self.cluster;
        if !(VERSION_1..=VERSION_2).contains(&c.version) {
            return Err(invalid(
                "cluster.version",
                format!(
                    "version {} is not supported; this build speaks version 1 (the paper's format) or 2 (with affinity advertisements)",
                    c.version
                ),
            ));
        }
        if c.port == 0 {
            return Err(invalid("cluster.port", "must be between 1 and 65535"));
        }
        let keepalive = check_keepalive("cluster.keepalive_ms", c.keepalive_ms)?;
        let dead_after = check_dead_after("cluster.dead_after", c.dead_after)?;
        if c.send_queue < 1024 {
            return Err(invalid("cluster.send_queue", format!("must be at least 1024 messages, got {}", c.send_queue)));
        }
        if c.test_send_delay_ms > 10_000 {
            return Err(invalid(
                "cluster.test_send_delay_ms",
                format!("at most 10000 (a test aid), got {}", c.test_send_delay_ms),
            ));
        }
        if c.max_entries_per_member == 0 {
            return Err(invalid("cluster.max_entries_per_member", "must be at least 1"));
        }
        if c.max_install_rate == 0 {
            return Err(invalid("cluster.max_install_rate", "must be at least 1"));
        }
        if c.max_pending_joins == 0 {
            return Err(invalid("cluster.max_pending_joins", "must be at least 1"));
        }
        if c.max_pending_per_source == 0 {
            return Err(invalid("cluster.max_pending_per_source", "must be at least 1"));
        }
        if c.members.is_empty() {
            return Err(invalid("cluster.members", "must list at least this member"));
        }
        if c.members.len() > cluster_proto::database::MAX_MEMBERS {
            return Err(invalid(
                "cluster.members",
                format!("at most {} members", cluster_proto::database::MAX_MEMBERS),
            ));
        }
        let mut seen = std::collections::HashSet::new();
        for m in &c.members {
            if !seen.insert(*m) {
                return Err(invalid("cluster.members", format!("{m} is listed twice")));
            }
        }
        if let Some(m) = c.members.iter().find(|m| m.is_ipv4() != self.node.address.is_ipv4()) {
            return Err(invalid(
                "cluster.members",
                format!("{m} is not of the same address family as node.address {}", self.node.address),
            ));
        }
        if !c.members.contains(&self.node.address) {
            return Err(invalid(
                "cluster.members",
                format!("must include this member's node.address {}", self.node.address),
            ));
        }
        let mut overrides = BTreeMap::new();
        for (k, o) in &c.member {
            let key = format!("cluster.member.\"{k}\"");
            let addr: IpAddr = k.parse().map_err(|_| invalid(&key, "is not an IP address"))?;
            if !c.members.contains(&addr) {
                return Err(invalid(&key, "is not in cluster.members"));
            }
            if overrides.insert(addr, (key.clone(), o)).is_some() {
                return Err(invalid(
                    &key,
                    format!("overrides {addr} a second time (another spelling of the same address)"),
                ));
            }
        }
        let mut members = Vec::new();
        for &address in &c.members {
            let (mut port, mut ka, mut dead, mut retries) = (c.port, keepalive, dead_after, c.connect_retries.0);
            if let Some((key, o)) = overrides.get(&address) {
                if let Some(p) = o.port {
                    if p == 0 {
                        return Err(invalid(format!("{key}.port"), "must be between 1 and 65535"));
                    }
                    port = p;
                }
                if let Some(ms) = o.keepalive_ms {
                    ka = check_keepalive(&format!("{key}.keepalive_ms"), ms)?;
                }
                if let Some(n) = o.dead_after {
                    dead = check_dead_after(&format!("{key}.dead_after"), n)?;
                }
                if let Some(r) = o.connect_retries {
                    retries = r.0;
                }
            }
            members.push(MemberConfig {
                address,
                port,
                session: SessionConfig { version: c.version, keepalive: ka, dead_after: dead },
                connect_retries: retries,
            });
        }
        Ok(MeshConfig {
            address: self.node.address,
            members,
            send_queue: c.send_queue,
            backoff_min: Duration::from_millis(50),
            backoff_max: Duration::from_secs(2).max(keepalive),
            max_pending_joins: c.max_pending_joins,
            max_pending_per_source: c.max_pending_per_source,
            send_delay: Duration::from_millis(c.test_send_delay_ms.min(10_000)),
            max_entries_per_member: c.max_entries_per_member,
            max_install_rate: c.max_install_rate,
            max_pending_bytes: 8 << 20,
            tls: None,
        })
    }
}

impl Dataplane {
    /// Checks values that serde cannot.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.intercept_tcp_ports.is_empty() && self.intercept_udp_ports.is_empty() {
            return Err(invalid("dataplane.intercept_tcp_ports", "intercept at least one TCP or UDP port"));
        }
        for (key, ports) in
            [("intercept_tcp_ports", &self.intercept_tcp_ports), ("intercept_udp_ports", &self.intercept_udp_ports)]
        {
            if ports.contains(&0) {
                return Err(invalid(format!("dataplane.{key}"), "port 0 cannot be intercepted"));
            }
        }
        if self.tun.is_empty()
            || self.tun.len() > 15
            || !self.tun.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err(invalid(
                "dataplane.tun",
                format!("{:?} is not a valid interface name (1-15 of A-Z, a-z, 0-9, -, _)", self.tun),
            ));
        }
        if self.mtu != 0 && self.mtu < 576 {
            return Err(invalid("dataplane.mtu", format!("must be 0 (no clamping) or at least 576, got {}", self.mtu)));
        }
        if !(1..=60_000).contains(&self.hold_ms) {
            return Err(invalid("dataplane.hold_ms", format!("must be between 1 and 60000, got {}", self.hold_ms)));
        }
        if self.hold_packets == 0 {
            return Err(invalid("dataplane.hold_packets", "must be at least 1"));
        }
        if self.hold_bytes < 65_536 {
            return Err(invalid("dataplane.hold_bytes", format!("must be at least 65536, got {}", self.hold_bytes)));
        }
        if !matches!(self.policy.as_str(), "local" | "rendezvous" | "pair-rendezvous" | "affinity") {
            return Err(invalid(
                "dataplane.policy",
                format!("{:?} is not a policy (local, rendezvous, pair-rendezvous, affinity)", self.policy),
            ));
        }
        for (i, b) in self.bypass.iter().enumerate() {
            parse_cidr(&b.net).map_err(|e| invalid(format!("dataplane.bypass[{i}].net"), e))?;
        }
        if self.queue_buffer_bytes < 65_536 || self.queue_buffer_bytes > i32::MAX as u64 {
            return Err(invalid(
                "dataplane.queue_buffer_bytes",
                format!("must be between 65536 and 2147483647, got {}", self.queue_buffer_bytes),
            ));
        }
        for (key, v) in [
            ("linger_ms", self.linger_ms),
            ("udp_idle_ms", self.udp_idle_ms),
            ("tcp_idle_ms", self.tcp_idle_ms),
            ("embryonic_ms", self.embryonic_ms),
            ("half_closed_ms", self.half_closed_ms),
            ("queue_len", self.queue_len as u64),
            ("fast_path_mark", self.fast_path_mark as u64),
            ("fast_path_sample_ms", self.fast_path_sample_ms),
        ] {
            if v == 0 {
                return Err(invalid(format!("dataplane.{key}"), "must be at least 1"));
            }
        }
        if self.fast_path && !(self.fast_path_mark.is_power_of_two() && self.fast_path_mark <= 0x4000_0000) {
            return Err(invalid(
                "dataplane.fast_path_mark",
                format!(
                    "must be a single bit no higher than 0x40000000 (the next bit is used too), got {:#x}",
                    self.fast_path_mark
                ),
            ));
        }
        // Between samples the tracker sees nothing of a fast-path flow: the idle timers must
        // be well above the sample period, or live flows are removed as idle.
        let idle = self.udp_idle_ms.min(self.tcp_idle_ms).min(self.half_closed_ms);
        if self.fast_path && (self.fast_path_sample_ms > 60_000 || 2 * self.fast_path_sample_ms > idle) {
            return Err(invalid(
                "dataplane.fast_path_sample_ms",
                format!(
                    "must be at most 60000 and at most half the shortest idle timer (udp_idle_ms, tcp_idle_ms, \
                     half_closed_ms: {idle} ms), got {}",
                    self.fast_path_sample_ms
                ),
            ));
        }
        Ok(())
    }
}

/// Parses "192.0.2.0/24" or "2001:db8::/32" (a bare address is a host route).
pub fn parse_cidr(s: &str) -> Result<(IpAddr, u8), String> {
    let (a, p) = s.split_once('/').unwrap_or((s, ""));
    let addr: IpAddr = a.parse().map_err(|_| format!("{s:?} is not an address or network"))?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    let prefix = if p.is_empty() { max } else { p.parse::<u8>().map_err(|_| format!("bad prefix in {s:?}"))? };
    if prefix > max {
        return Err(format!("prefix /{prefix} too long in {s:?}"));
    }
    Ok((addr, prefix))
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[node]
address = "192.0.2.1"

[cluster]
port = 7400
version = 1
keepalive_ms = 500
dead_after = 3
connect_retries = "infinite"
plaintext = true
members = ["192.0.2.1", "192.0.2.2", "192.0.2.3"]

[cluster.member."192.0.2.3"]
keepalive_ms = 200
dead_after = 5
connect_retries = 10

[admin]
listen = "127.0.0.1:9741"
"#;

    #[test]
    fn good_file_with_overrides() {
        let c = Config::parse(GOOD).unwrap();
        let m = c.mesh().unwrap();
        assert_eq!(m.members.len(), 3);
        let third = &m.members[2];
        assert_eq!(third.session.keepalive, Duration::from_millis(200));
        assert_eq!(third.session.dead_after, 5);
        assert_eq!(third.connect_retries, Retries::Count(10));
        assert_eq!(m.members[1].session.keepalive, Duration::from_millis(500));
        assert_eq!(m.members[1].connect_retries, Retries::Infinite);
    }

    #[test]
    fn version_2_is_accepted_for_every_member() {
        let c = Config::parse(&GOOD.replace("version = 1", "version = 2")).unwrap();
        let m = c.mesh().unwrap();
        assert!(m.members.iter().all(|p| p.session.version == 2));
        assert_eq!(Config::parse(GOOD).unwrap().mesh().unwrap().members[0].session.version, 1, "default");
    }

    fn err(text: &str) -> String {
        Config::parse(text).unwrap_err().to_string()
    }

    #[test]
    fn intercepting_a_control_port_is_refused() {
        let with = |section: &str| format!("{GOOD}{section}");
        let e = err(&with("[dataplane]\nintercept_tcp_ports = [80, 7400]\n"));
        assert!(
            e.contains("dataplane.intercept_tcp_ports") && e.contains("port 7400 is the cluster's control port"),
            "{e}"
        );
        // A member's port override counts too.
        let e = err(&with("[dataplane]\nintercept_tcp_ports = [7500]\n")
            .replace("connect_retries = 10", "connect_retries = 10\nport = 7500"));
        assert!(e.contains("port 7500 is the cluster's control port"), "{e}");
        let e = err(&with("[proxy]\nlisten = \"0.0.0.0:3129\"\nintercept_tcp_ports = [7400]\n"));
        assert!(e.contains("proxy.intercept_tcp_ports") && e.contains("control port"), "{e}");
        // UDP on the same number is another port.
        Config::parse(&with("[dataplane]\nintercept_tcp_ports = [80]\nintercept_udp_ports = [7400]\n")).unwrap();
    }

    /// A `[tls]` section over files written by `lb gen-certs`'s code, with one file changed.
    fn tls_check(change: impl FnOnce(&Path)) -> Result<(), String> {
        let dir = tempfile::tempdir().unwrap();
        let members: Vec<IpAddr> = ["192.0.2.1", "192.0.2.2"].iter().map(|a| a.parse().unwrap()).collect();
        crate::certs::write(dir.path(), &crate::certs::generate("test", &members).unwrap()).unwrap();
        change(dir.path());
        let d = dir.path().display();
        let text = format!(
            "[node]\naddress = \"192.0.2.1\"\n[cluster]\nmembers = [\"192.0.2.1\", \"192.0.2.2\"]\n\
             [tls]\nca = \"{d}/ca.pem\"\ncert = \"{d}/192.0.2.1.pem\"\nkey = \"{d}/192.0.2.1.key\"\n"
        );
        Config::parse(&text).unwrap().tls_settings().map(|_| ()).map_err(|e| e.to_string())
    }

    #[test]
    fn tls_files_are_checked_for_what_they_hold_and_who_can_read_the_key() {
        use std::os::unix::fs::PermissionsExt;
        tls_check(|_| {}).unwrap();
        let copy = |from: &'static str, to: &'static str| {
            move |d: &Path| {
                std::fs::copy(d.join(from), d.join(to)).unwrap();
                std::fs::set_permissions(d.join(to), std::fs::Permissions::from_mode(0o600)).unwrap();
            }
        };
        let e = tls_check(copy("192.0.2.1.key", "192.0.2.1.pem")).unwrap_err();
        assert!(e.starts_with("tls.cert: ") && e.contains("holds a private key, not a certificate"), "{e}");
        let e = tls_check(copy("192.0.2.1.pem", "192.0.2.1.key")).unwrap_err();
        assert!(e.starts_with("tls.key: ") && e.contains("holds a certificate, not a private key"), "{e}");
        let e = tls_check(|d: &Path| std::fs::write(d.join("ca.pem"), "not pem\n").unwrap()).unwrap_err();
        assert!(e.starts_with("tls.ca: ") && e.contains("holds no PEM certificate"), "{e}");
        let e = tls_check(|d: &Path| {
            let both = [std::fs::read(d.join("ca.pem")).unwrap(), std::fs::read(d.join("ca.key")).unwrap()].concat();
            std::fs::write(d.join("ca.pem"), both).unwrap();
        })
        .unwrap_err();
        assert!(e.starts_with("tls.ca: ") && e.contains("the CA's key (ca.key) must stay off the members"), "{e}");
        for mode in [0o644, 0o606, 0o602] {
            let e = tls_check(|d: &Path| {
                std::fs::set_permissions(d.join("192.0.2.1.key"), std::fs::Permissions::from_mode(mode)).unwrap()
            })
            .unwrap_err();
            assert!(e.starts_with("tls.key: ") && e.contains(&format!("(mode {mode:04o}): chmod 600")), "{e}");
        }
        tls_check(|d: &Path| {
            std::fs::set_permissions(d.join("192.0.2.1.key"), std::fs::Permissions::from_mode(0o640)).unwrap()
        })
        .unwrap();
    }

    #[test]
    fn minimal_file_uses_defaults() {
        let c =
            Config::parse("[node]\naddress = \"192.0.2.1\"\n[cluster]\nplaintext = true\nmembers = [\"192.0.2.1\"]\n")
                .unwrap();
        assert_eq!(c.cluster.port, DEFAULT_PORT);
        assert_eq!(c.cluster.keepalive_ms, 1000);
        assert_eq!(c.admin.listen, DEFAULT_ADMIN.parse().unwrap());
    }

    const PROXY: &str = "\n[proxy]\nlisten = \"0.0.0.0:8080\"\nintercept_tcp_ports = [80, 443]\n";

    #[test]
    fn proxy_chain_keys() {
        let c = Config::parse(GOOD).unwrap();
        assert!(c.proxy.is_none());
        let c = Config::parse(&format!("{GOOD}{PROXY}")).unwrap();
        let p = c.proxy.unwrap();
        assert_eq!((p.role, p.detect_ms, p.dictionary_budget_mb, p.zstd), (ProxyRole::Plain, 300, 64, false));
        assert!(p.chain_ports.is_empty() && p.dictionary_dir.is_none() && p.chain_id.is_none());
        let down = format!(
            "{GOOD}{PROXY}role = \"downstream\"\nchain_ports = [80]\ndictionary_budget_mb = 8\n\
             dictionary_dir = \"/var/lib/lb/dict\"\nchain_id = \"branch-7\"\nzstd = true\n"
        );
        let p = Config::parse(&down).unwrap().proxy.unwrap();
        assert_eq!((p.role, p.chain_ports, p.dictionary_budget_mb, p.zstd), (ProxyRole::Downstream, vec![80], 8, true));
        assert_eq!(p.chain_id.as_deref(), Some("branch-7"));
        let p = Config::parse(&format!("{GOOD}{PROXY}role = \"upstream\"\ndetect_ms = 50\n")).unwrap().proxy.unwrap();
        assert_eq!((p.role, p.detect_ms), (ProxyRole::Upstream, 50));
        for (extra, want) in [
            ("role = \"middle\"", "role"),
            ("role = \"downstream\"", "proxy.chain_ports"),
            ("role = \"downstream\"\nchain_ports = [25]", "not in intercept_tcp_ports"),
            ("role = \"upstream\"\nchain_ports = [80]", "proxy.chain_ports"),
            ("role = \"upstream\"\ndetect_ms = 0", "proxy.detect_ms"),
            ("dictionary_budget_mb = 0", "proxy.dictionary_budget_mb"),
            ("max_dictionary_pairs = 0", "proxy.max_dictionary_pairs"),
            ("chain_id = \"\"", "proxy.chain_id"),
            ("chain_bogus = 1", "chain_bogus"),
        ] {
            let e = err(&format!("{GOOD}{PROXY}{extra}\n"));
            assert!(e.contains(want), "error {e:?} should mention {want:?}");
        }
    }

    #[test]
    fn log_section_and_metrics_listener() {
        let c = Config::parse(GOOD).unwrap();
        assert_eq!((c.log.format, c.log.level.as_deref()), (crate::logging::LogFormat::Text, None));
        assert_eq!((c.log.throttle_burst, c.log.throttle_window_s, c.admin.metrics_listen), (10, 60, None));
        let c = Config::parse(&format!(
            "{GOOD}metrics_listen = \"0.0.0.0:9742\"\n[log]\nformat = \"json\"\nlevel = \"info,cluster_proto=debug\"\n\
             throttle_burst = 0\nthrottle_window_s = 5\n"
        ))
        .unwrap();
        assert_eq!(c.log.format, crate::logging::LogFormat::Json);
        assert_eq!(c.log.level.as_deref(), Some("info,cluster_proto=debug"));
        assert_eq!((c.log.throttle_burst, c.log.throttle_window_s), (0, 5));
        assert_eq!(c.admin.metrics_listen, Some("0.0.0.0:9742".parse().unwrap()));
        for (extra, want) in [
            ("[log]\nformat = \"xml\"", "format"),
            ("[log]\nlevel = \"info,lb=loud\"", "log.level"),
            ("[log]\nthrottle_window_s = 0", "log.throttle_window_s"),
            ("[log]\ncolour = true", "colour"),
            ("metrics_listen = \"127.0.0.1:9741\"", "admin.metrics_listen"),
        ] {
            let e = err(&format!("{GOOD}{extra}\n"));
            assert!(e.contains(want), "error {e:?} should mention {want:?}");
        }
    }

    #[test]
    fn bad_files_name_the_key() {
        let cases = [
            (GOOD.replace("dead_after = 3", "dead_after = 3\nbogus = 1"), "bogus"),
            (GOOD.replace("keepalive_ms = 500", "keepalive_ms = 5"), "cluster.keepalive_ms"),
            (GOOD.replace("version = 1", "version = 3"), "cluster.version"),
            (GOOD.replace("version = 1", "version = 0"), "cluster.version"),
            (GOOD.replace("connect_retries = \"infinite\"", "connect_retries = \"forever\""), "connect_retries"),
            (GOOD.replace("connect_retries = 10", "connect_retries = 0"), "connect_retries"),
            (GOOD.replace("dead_after = 5", "dead_after = 0"), "cluster.member.\"192.0.2.3\".dead_after"),
            (
                GOOD.replace("[cluster.member.\"192.0.2.3\"]", "[cluster.member.\"192.0.2.9\"]"),
                "is not in cluster.members",
            ),
            (GOOD.replace("address = \"192.0.2.1\"", "address = \"192.0.2.7\""), "cluster.members"),
            (GOOD.replace("address = \"192.0.2.1\"", "address = \"not-an-ip\""), "address"),
            (GOOD.replace("listen = \"127.0.0.1:9741\"", "listen = \"nowhere\""), "listen"),
            (GOOD.replace("\"192.0.2.2\", \"192.0.2.3\"", "\"192.0.2.2\", \"192.0.2.2\""), "listed twice"),
            (GOOD.replace("plaintext = true\n", ""), "no [tls] section"),
            (format!("{GOOD}\n[tls]\nca = \"a\"\ncert = \"b\"\nkey = \"c\"\n"), "cluster.plaintext"),
        ];
        for (text, want) in cases {
            let e = err(&text);
            assert!(e.contains(want), "error {e:?} should mention {want:?}");
        }
    }
}

#[cfg(test)]
mod affinity_tests {
    use super::*;

    const BASE: &str = r#"
[node]
address = "198.18.0.1"
[cluster]
plaintext = true
members = ["198.18.0.1", "198.18.0.2", "198.18.0.21", "198.18.0.22"]
[dataplane]
intercept_tcp_ports = [80]
policy = "affinity"
owners = ["198.18.0.21", "198.18.0.22"]
"#;

    #[test]
    fn affinity_policy_with_owners_and_settings() {
        let c = Config::parse(&format!("{BASE}[affinity]\nload_bound = 1.5\nload_slack = 2\nclient_prefix_v4 = 16\n"))
            .unwrap();
        let d = c.dataplane.as_ref().unwrap();
        assert_eq!(d.policy, "affinity");
        assert_eq!(d.owners.len(), 2);
        let e = c.affinity.engine_config();
        assert_eq!((e.load_bound, e.load_slack, e.granularity.v4_client), (1.5, 2.0, 16));
        assert_eq!(e.new_pair_bound, 1.1);
        // Defaults without the section.
        let c = Config::parse(BASE).unwrap();
        assert_eq!((c.affinity.load_bound, c.affinity.load_slack, c.affinity.advertise_ms), (1.25, 4.0, 1000));
        for p in ["rendezvous", "pair-rendezvous"] {
            Config::parse(&BASE.replace("\"affinity\"", &format!("{p:?}"))).unwrap();
        }
        // "local" among owners that include this member.
        Config::parse(&BASE.replace("\"affinity\"", "\"local\"").replace("owners = [", "owners = [\"198.18.0.1\", "))
            .unwrap();
    }

    #[test]
    fn bad_affinity_settings_name_the_key() {
        let err = |t: String| Config::parse(&t).unwrap_err().to_string();
        for (extra, key) in [
            ("load_bound = 0.9", "affinity.load_bound"),
            ("new_pair_bound = 2.0", "affinity.new_pair_bound"),
            ("load_slack = -1", "affinity.load_slack"),
            ("client_prefix_v4 = 33", "affinity.client_prefix_v4"),
            ("server_prefix_v6 = 129", "affinity.server_prefix_v6"),
            ("half_life_s = 0", "affinity.half_life_s"),
            ("advertise_ms = 10", "affinity.advertise_ms"),
            ("max_pairs = 1", "affinity.max_pairs"),
            ("bogus = 1", "bogus"),
        ] {
            let e = err(format!("{BASE}[affinity]\n{extra}\n"));
            assert!(e.contains(key), "{extra}: {e}");
        }
        let e = err(BASE.replace("owners = [\"198.18.0.21\", \"198.18.0.22\"]", "owners = [\"198.18.0.99\"]"));
        assert!(e.contains("dataplane.owners") && e.contains("198.18.0.99"), "{e}");
        let e = err(BASE.replace("\"affinity\"", "\"local\""));
        assert!(e.contains("dataplane.owners") && e.contains("not among the owners"), "{e}");
        let e = err(BASE.replace("\"affinity\"", "\"best\""));
        assert!(e.contains("dataplane.policy") && e.contains("pair-rendezvous"), "{e}");
    }
}

#[cfg(test)]
mod fast_path_tests {
    use super::*;

    #[test]
    fn the_sample_period_stays_well_below_the_idle_timers() {
        let dp = |extra: &str| -> Result<(), ConfigError> {
            let d: Dataplane = toml::from_str(&format!("intercept_tcp_ports = [80]\n{extra}")).unwrap();
            d.validate()
        };
        dp("").unwrap();
        dp("fast_path_sample_ms = 15000").unwrap();
        let e = dp("fast_path_sample_ms = 20000").unwrap_err().to_string();
        assert!(e.contains("dataplane.fast_path_sample_ms") && e.contains("30000 ms"), "{e}");
        let e = dp("half_closed_ms = 1500").unwrap_err().to_string();
        assert!(e.contains("fast_path_sample_ms"), "{e}");
        dp("half_closed_ms = 1500\nfast_path = false").unwrap();
        dp("half_closed_ms = 1500\nfast_path_sample_ms = 500").unwrap();
        assert!(dp("fast_path_sample_ms = 60001\nudp_idle_ms = 600000\nhalf_closed_ms = 600000").is_err());
        dp("fast_path_mark = 0x100").unwrap();
        for bad in ["0x300", "0x80000000"] {
            let e = dp(&format!("fast_path_mark = {bad}")).unwrap_err().to_string();
            assert!(e.contains("dataplane.fast_path_mark") && e.contains("single bit"), "{e}");
        }
    }
}
