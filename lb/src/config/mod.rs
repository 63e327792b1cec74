//! `lb.toml`: every key, its default and its limits. Unknown keys and bad values are refused
//! with a message naming the key. docs/configuration.md documents the same.
//!
//! One module per section, each with its keys, defaults and checks: [`cluster`] (`[node]` and
//! `[cluster]`), [`admin`], [`dataplane`], [`proxy`], [`tls`], [`affinity`], [`log`]. This
//! module holds the file as a whole and the checks that span sections.

use std::path::Path;

use serde::{Deserialize, Serialize};

pub mod admin;
pub mod affinity;
pub mod cluster;
pub mod dataplane;
pub mod log;
pub mod proxy;
pub mod tls;

pub use admin::Admin;
pub use affinity::AffinitySection;
pub use cluster::{Cluster, MemberOverride, Node, RetriesSetting};
pub use dataplane::{parse_net, BypassEntry, Dataplane, Policy};
pub use log::LogSection;
pub use proxy::{ProxyRole, ProxySection};
pub use tls::TlsSection;

/// Default control-channel port.
pub const DEFAULT_PORT: u16 = 7400;

/// Default admin HTTP listener.
pub const DEFAULT_ADMIN: &str = "127.0.0.1:9741";

/// Where `lb run`, `lb check-config` and `lb rules` read the configuration without `--config`
/// (the packaged unit and example use it).
pub const DEFAULT_PATH: &str = "/etc/lb/lb.toml";

/// The whole file.
#[derive(Debug, Deserialize, Serialize)]
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

pub(crate) fn invalid(key: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid { key: key.into(), message: message.into() }
}

pub(crate) fn default_true() -> bool {
    true
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
            if d.policy == Policy::Local && !d.owners.is_empty() && !d.owners.contains(&c.node.address) {
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
            p.validate()?;
        }
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cluster_proto::mesh::Retries;
    use std::net::IpAddr;
    use std::time::Duration;

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
        assert_eq!(d.policy, Policy::Affinity);
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
        // serde names the line and every policy.
        assert!(
            e.contains("policy = \"best\"")
                && e.contains("expected one of `local`, `rendezvous`, `pair-rendezvous`, `affinity`"),
            "{e}"
        );
    }
}
