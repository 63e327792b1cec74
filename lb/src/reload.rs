//! SIGHUP: what a new configuration file changes, and whether the running member can take it.
//!
//! Pure: [`plan`] compares the running configuration with the new one key by key (both
//! normalized through serde, so a key written out at its default is no change) and returns
//! either the changes to apply live or the keys that cannot change without a restart. A reload
//! is all or nothing: one key that cannot change live refuses the whole file, and the running
//! configuration stays as it was. The daemon carries out a [`Plan`] (`daemon.rs`).
//!
//! What changes live (docs/configuration.md, "Reload"):
//! - `dataplane.owners`: the members allowed to own new flows;
//! - `dataplane.bypass`: the bypass list, for new flows;
//! - `dataplane.policy` among `local`, `rendezvous` and `pair-rendezvous` (to or from
//!   `affinity` needs a restart: the engine and its advertisements start with the member);
//! - `cluster.max_entries_per_member` and `cluster.max_install_rate` (the flood guard);
//! - `affinity.load_bound`, `affinity.new_pair_bound`, `affinity.load_slack`;
//! - `log.level` (unless `--log-level` or `RUST_LOG` set the level).
//!
//! Flows already placed keep their owners: a new policy or owner list applies to new flows.

use std::net::IpAddr;

use crate::config::{Config, Policy};

/// A change the running member can apply.
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    /// New `dataplane.owners` (empty: every member).
    Owners(Vec<IpAddr>),
    /// New `dataplane.bypass`.
    Bypass(Vec<crate::config::BypassEntry>),
    /// New `dataplane.policy` (never to or from affinity).
    Policy(Policy),
    /// New flood-guard limits: `cluster.max_entries_per_member`, `cluster.max_install_rate`.
    FloodGuard {
        /// Entries one peer may own here.
        max_entries_per_member: usize,
        /// INSTALLs per second from one peer after the burst.
        max_install_rate: u32,
    },
    /// New affinity load bounds: `load_bound`, `new_pair_bound`, `load_slack`.
    AffinityBounds(f64, f64, f64),
    /// New `log.level` (`None`: back to "info").
    LogLevel(Option<String>),
}

/// What a reload does.
#[derive(Debug, Clone, PartialEq)]
pub enum Plan {
    /// The file's settings are those running.
    Unchanged,
    /// Apply these, in order; `keys` names what changed.
    Apply {
        /// The changes.
        changes: Vec<Change>,
        /// The keys that differ, dotted.
        keys: Vec<String>,
    },
    /// Nothing is applied: these keys differ and cannot change while the member runs.
    Refuse {
        /// The keys, dotted, each with why when it is not simply "needs a restart".
        keys: Vec<String>,
    },
}

/// Keys whose change [`plan`] can turn into a [`Change`].
const LIVE: &[&str] = &[
    "dataplane.owners",
    "dataplane.bypass",
    "dataplane.policy",
    "cluster.max_entries_per_member",
    "cluster.max_install_rate",
    "affinity.load_bound",
    "affinity.new_pair_bound",
    "affinity.load_slack",
    "log.level",
];

/// Compares `running` with `new` (both already validated).
pub fn plan(running: &Config, new: &Config) -> Plan {
    let keys = changed_keys(running, new);
    if keys.is_empty() {
        return Plan::Unchanged;
    }
    let mut refused: Vec<String> = keys.iter().filter(|k| !LIVE.contains(&k.as_str())).cloned().collect();
    let policy = |c: &Config| c.dataplane.as_ref().map(|d| d.policy);
    let affinity_involved = [policy(running), policy(new)].contains(&Some(Policy::Affinity));
    if keys.iter().any(|k| k == "dataplane.policy") && affinity_involved {
        refused.push("dataplane.policy (to or from affinity)".into());
    }
    // A [dataplane] section added or removed shows up as the section's own key, refused.
    if !refused.is_empty() {
        return Plan::Refuse { keys: refused };
    }
    let mut changes = Vec::new();
    for key in &keys {
        let d = new.dataplane.as_ref();
        match key.as_str() {
            "dataplane.owners" => changes.push(Change::Owners(d.map(|d| d.owners.clone()).unwrap_or_default())),
            "dataplane.bypass" => changes.push(Change::Bypass(d.map(|d| d.bypass.clone()).unwrap_or_default())),
            "dataplane.policy" => changes.push(Change::Policy(d.map(|d| d.policy).unwrap_or_default())),
            "cluster.max_entries_per_member" | "cluster.max_install_rate" => {
                let flood = Change::FloodGuard {
                    max_entries_per_member: new.cluster.max_entries_per_member,
                    max_install_rate: new.cluster.max_install_rate,
                };
                if !changes.contains(&flood) {
                    changes.push(flood);
                }
            }
            "affinity.load_bound" | "affinity.new_pair_bound" | "affinity.load_slack" => {
                let a = &new.affinity;
                let bounds = Change::AffinityBounds(a.load_bound, a.new_pair_bound, a.load_slack);
                if !changes.contains(&bounds) {
                    changes.push(bounds);
                }
            }
            "log.level" => changes.push(Change::LogLevel(new.log.level.clone())),
            _ => unreachable!("{key} is in LIVE"),
        }
    }
    Plan::Apply { changes, keys }
}

/// The dotted keys whose values differ, in file order of sections (`cluster.members`,
/// `cluster.member."192.0.2.3".port`, `dataplane`, ...). A whole section added or removed
/// is its name; arrays compare as one value.
pub fn changed_keys(a: &Config, b: &Config) -> Vec<String> {
    let value = |c: &Config| toml::Value::try_from(c).unwrap_or(toml::Value::Table(Default::default()));
    let mut out = Vec::new();
    diff("", Some(&value(a)), Some(&value(b)), &mut out);
    out
}

fn diff(key: &str, a: Option<&toml::Value>, b: Option<&toml::Value>, out: &mut Vec<String>) {
    match (a, b) {
        (Some(toml::Value::Table(x)), Some(toml::Value::Table(y))) => {
            let mut names: Vec<&String> = x.keys().chain(y.keys()).collect();
            names.sort();
            names.dedup();
            for n in names {
                let part = if n.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') {
                    n.clone()
                } else {
                    format!("{n:?}")
                };
                let k = if key.is_empty() { part } else { format!("{key}.{part}") };
                diff(&k, x.get(n), y.get(n), out);
            }
        }
        (x, y) if x == y => {}
        _ => out.push(key.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = r#"
[node]
address = "198.18.0.1"
[cluster]
plaintext = true
members = ["198.18.0.1", "198.18.0.2", "198.18.0.3"]
[cluster.member."198.18.0.3"]
keepalive_ms = 500
[dataplane]
intercept_tcp_ports = [80]
policy = "rendezvous"
"#;

    fn cfg(text: &str) -> Config {
        Config::parse(text).unwrap_or_else(|e| panic!("{e}\n{text}"))
    }

    fn with(extra: &[(&str, &str)]) -> Config {
        let mut t = BASE.to_string();
        for (from, to) in extra {
            assert!(t.contains(from), "{from}");
            t = t.replace(from, to);
        }
        cfg(&t)
    }

    #[test]
    fn the_same_settings_written_differently_are_no_change() {
        let spelled_out = with(&[("policy = \"rendezvous\"", "policy = \"rendezvous\"\nhold_ms = 200\nmtu = 1500")]);
        assert_eq!(plan(&cfg(BASE), &spelled_out), Plan::Unchanged);
        let reordered = cfg(&format!("[log]\nlevel = \"info\"\n{BASE}"));
        assert_eq!(changed_keys(&cfg(BASE), &reordered), vec!["log.level"]);
    }

    #[test]
    fn live_keys_become_changes() {
        let new = with(&[
            ("policy = \"rendezvous\"", "policy = \"pair-rendezvous\"\nowners = [\"198.18.0.2\", \"198.18.0.3\"]"),
            ("plaintext = true", "plaintext = true\nmax_entries_per_member = 1000\nmax_install_rate = 50"),
        ]);
        let Plan::Apply { changes, keys } = plan(&cfg(BASE), &new) else { panic!("{:?}", plan(&cfg(BASE), &new)) };
        assert_eq!(
            keys,
            ["cluster.max_entries_per_member", "cluster.max_install_rate", "dataplane.owners", "dataplane.policy"]
        );
        assert_eq!(
            changes,
            vec![
                Change::FloodGuard { max_entries_per_member: 1000, max_install_rate: 50 },
                Change::Owners(vec!["198.18.0.2".parse().unwrap(), "198.18.0.3".parse().unwrap()]),
                Change::Policy(Policy::PairRendezvous),
            ]
        );
        let new = cfg(&format!("{BASE}[log]\nlevel = \"debug\"\n"));
        assert_eq!(
            plan(&cfg(BASE), &new),
            Plan::Apply { changes: vec![Change::LogLevel(Some("debug".into()))], keys: vec!["log.level".into()] }
        );
    }

    #[test]
    fn affinity_bounds_are_live_and_other_affinity_keys_are_not() {
        let new = cfg(&format!("{BASE}[affinity]\nload_bound = 1.5\nload_slack = 2\n"));
        let Plan::Apply { changes, keys } = plan(&cfg(BASE), &new) else { panic!() };
        assert_eq!(keys, ["affinity.load_bound", "affinity.load_slack"]);
        assert_eq!(changes, vec![Change::AffinityBounds(1.5, 1.1, 2.0)]);
        let new = cfg(&format!("{BASE}[affinity]\nclient_prefix_v4 = 16\n"));
        assert_eq!(plan(&cfg(BASE), &new), Plan::Refuse { keys: vec!["affinity.client_prefix_v4".into()] });
    }

    #[test]
    fn a_new_bypass_list_is_live() {
        let new = with(&[(
            "policy = \"rendezvous\"",
            "policy = \"rendezvous\"\nbypass = [{ net = \"203.0.113.0/24\", port = 443 }]",
        )]);
        let Plan::Apply { changes, keys } = plan(&cfg(BASE), &new) else { panic!() };
        assert_eq!(keys, ["dataplane.bypass"]);
        assert_eq!(
            changes,
            vec![Change::Bypass(vec![crate::config::BypassEntry { net: "203.0.113.0/24".into(), port: Some(443) }])]
        );
    }

    #[test]
    fn other_keys_refuse_the_whole_file_and_are_named() {
        let new = with(&[
            ("keepalive_ms = 500", "keepalive_ms = 700"),
            (
                "members = [\"198.18.0.1\", \"198.18.0.2\", \"198.18.0.3\"]",
                "members = [\"198.18.0.1\", \"198.18.0.2\", \"198.18.0.3\", \"198.18.0.4\"]",
            ),
            ("policy = \"rendezvous\"", "policy = \"local\""),
        ]);
        assert_eq!(
            plan(&cfg(BASE), &new),
            Plan::Refuse { keys: vec!["cluster.member.\"198.18.0.3\".keepalive_ms".into(), "cluster.members".into()] }
        );
        // To or from affinity, the policy itself is refused.
        let new = with(&[("policy = \"rendezvous\"", "policy = \"affinity\"")]);
        assert_eq!(
            plan(&cfg(BASE), &new),
            Plan::Refuse { keys: vec!["dataplane.policy (to or from affinity)".into()] }
        );
        // A section added or removed.
        let none = cfg(&BASE[..BASE.find("[dataplane]").unwrap()]);
        assert_eq!(plan(&cfg(BASE), &none), Plan::Refuse { keys: vec!["dataplane".into()] });
        let new = cfg(&format!("{BASE}[proxy]\nlisten = \"0.0.0.0:3129\"\nintercept_tcp_ports = [80]\n"));
        assert_eq!(plan(&cfg(BASE), &new), Plan::Refuse { keys: vec!["proxy".into()] });
    }
}
