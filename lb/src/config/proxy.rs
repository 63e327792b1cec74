//! `[proxy]`: the on-box transparent proxy and its chain role.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use super::{default_true, invalid, ConfigError};

/// `[proxy]`: the on-box transparent proxy (TPROXY listener, optional client spoofing).
#[derive(Debug, Clone, Deserialize, Serialize)]
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
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
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
    /// Checks values that serde cannot.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.intercept_tcp_ports.is_empty() || self.intercept_tcp_ports.contains(&0) {
            return Err(invalid("proxy.intercept_tcp_ports", "list the TCP ports to intercept (1-65535)"));
        }
        if self.listen.port() == 0 {
            return Err(invalid("proxy.listen", "needs a port"));
        }
        if self.tproxy_mark == 0 {
            return Err(invalid("proxy.tproxy_mark", "must not be 0"));
        }
        if self.route_table == 0 || self.route_table >= 253 && self.route_table <= 255 {
            return Err(invalid("proxy.route_table", "must not be 0 or a reserved table (253-255)"));
        }
        for (key, v) in [
            ("max_connections", self.max_connections as u64),
            ("connect_timeout_ms", self.connect_timeout_ms),
            ("idle_timeout_ms", self.idle_timeout_ms),
        ] {
            if v == 0 {
                return Err(invalid(format!("proxy.{key}"), "must be at least 1"));
            }
        }
        if self.intercept_tcp_ports.contains(&self.listen.port()) {
            return Err(invalid(
                "proxy.intercept_tcp_ports",
                "must not contain the proxy's own listen port (it would loop)",
            ));
        }
        self.validate_chain()
    }

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
