//! `[admin]`: the HTTP admin API and the optional metrics-only listener.

use std::net::SocketAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{invalid, ConfigError, DEFAULT_ADMIN};

/// `[admin]`: the HTTP admin API.
#[derive(Debug, Deserialize, Serialize)]
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

fn default_admin() -> SocketAddr {
    DEFAULT_ADMIN.parse().expect("valid default")
}
