//! `[affinity]`: the affinity engine's settings (the same on every member).

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{invalid, ConfigError};

/// `[affinity]`: settings of the affinity engine; they must be the same on every member so
/// that every load-balancing member makes the same choice.
#[derive(Debug, Clone, Deserialize, Serialize)]
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
