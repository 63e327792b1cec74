//! `[log]`: format, level and throttle of the daemon's log.

use serde::{Deserialize, Serialize};

use super::{invalid, ConfigError};

/// `[log]`: how the daemon logs (the `--log-format` and `--log-level` flags win).
#[derive(Debug, Clone, Deserialize, Serialize)]
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
