//! `[node]` and `[cluster]`: this member, the membership list and the channel settings, and
//! the mesh driver's configuration built from them.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::Duration;

use cluster_proto::mesh::{MemberConfig, MeshConfig, Retries};
use cluster_proto::session::SessionConfig;
use cluster_proto::wire::{VERSION_1, VERSION_2};
use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize};

use super::{invalid, Config, ConfigError, DEFAULT_PORT};

/// `[node]`: this member.
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Node {
    /// Cluster address: the control channel listens and dials from it.
    pub address: IpAddr,
}

/// `[cluster]`: the membership list and channel settings.
#[derive(Debug, Deserialize, Serialize)]
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
    /// Graceful restart (version 2): the restart time this member announces, in seconds
    /// (1-255): how long its peers keep its entries, stale, when it restarts. 0 turns it off.
    #[serde(default = "default_restart_time")]
    pub restart_time_secs: u8,
    /// This member's own connections are saved here while it runs and when it stops, and
    /// registered again when it starts (`state.rs`). None: nothing is saved.
    #[serde(default)]
    pub state_file: Option<std::path::PathBuf>,
    /// How often the state file is rewritten when the connections changed, in ms.
    #[serde(default = "default_state_save")]
    pub state_save_ms: u64,
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
#[derive(Debug, Default, Deserialize, Serialize)]
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

/// "infinite" or a number of attempts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetriesSetting(pub Retries);

impl Default for RetriesSetting {
    fn default() -> Self {
        RetriesSetting(Retries::Infinite)
    }
}

impl Serialize for RetriesSetting {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self.0 {
            Retries::Infinite => s.serialize_str("infinite"),
            Retries::Count(n) => s.serialize_u32(n),
        }
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

fn default_restart_time() -> u8 {
    60
}

fn default_state_save() -> u64 {
    1000
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

impl Config {
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
        if !(100..=3_600_000).contains(&c.state_save_ms) {
            return Err(invalid(
                "cluster.state_save_ms",
                format!("must be between 100 and 3600000 milliseconds, got {}", c.state_save_ms),
            ));
        }
        if c.state_file.as_ref().is_some_and(|p| p.as_os_str().is_empty() || p.is_dir()) {
            return Err(invalid("cluster.state_file", "must name a file (not empty, not a directory)"));
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
                session: SessionConfig {
                    version: c.version,
                    keepalive: ka,
                    dead_after: dead,
                    restart_time: c.restart_time_secs,
                },
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
