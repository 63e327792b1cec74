//! The monitoring files in monitoring/: the alert rules pass `promtool check rules` and their
//! unit tests (`promtool test rules`), every alert has a test that fires, and every metric
//! that the rules and the Grafana dashboard use is one that lb exports. promtool comes from
//! the Debian package `prometheus` (.ci/run installs it); without it these tests fail. The
//! data-plane member runs in a network namespace and needs root, like tests/fig1.rs.

mod common;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::lbproc::{admin_get, LbProcess};
use common::{free_port, lo, wait_until};
use handoff::netns::Netns;

const LB: &str = env!("CARGO_BIN_EXE_lb");

fn monitoring() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../monitoring")
}

/// Runs promtool in monitoring/ with `args` (and `stdin`); panics if promtool is missing.
fn promtool(args: &[&str], stdin: Option<&str>) -> std::process::Output {
    use std::io::Write;
    let mut child = Command::new("promtool")
        .args(args)
        .current_dir(monitoring())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!("promtool is required for this test (Debian package `prometheus`; .ci/run installs it): {e}")
        });
    let mut input = child.stdin.take().unwrap();
    input.write_all(stdin.unwrap_or("").as_bytes()).unwrap();
    drop(input);
    child.wait_with_output().unwrap()
}

fn assert_ok(what: &str, out: &std::process::Output) {
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn alert_rules_check_and_their_unit_tests_pass() {
    let out = promtool(&["check", "rules", "alerts.yml"], None);
    assert_ok("promtool check rules", &out);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("SUCCESS"), "{text}");
    assert_ok("promtool test rules", &promtool(&["test", "rules", "alerts_test.yml"], None));
}

/// `- alert: NAME` lines of alerts.yml.
fn alert_names(rules: &str) -> Vec<String> {
    rules.lines().filter_map(|l| l.trim().strip_prefix("- alert:")).map(|n| n.trim().to_string()).collect()
}

#[test]
fn every_alert_has_a_unit_test_that_fires_and_the_issue_list_is_covered() {
    let rules = std::fs::read_to_string(monitoring().join("alerts.yml")).unwrap();
    let tests = std::fs::read_to_string(monitoring().join("alerts_test.yml")).unwrap();
    let names = alert_names(&rules);
    for wanted in [
        "LbMembersDisagree",
        "LbPeerDown",
        "LbPeerDead",
        "LbFloodGuardRefusing",
        "LbHoldQueueOverflow",
        "LbDataPlaneDown",
        "LbDictionaryResets",
    ] {
        assert!(names.iter().any(|n| n == wanted), "alerts.yml lacks {wanted}");
    }
    // For each alert: a test evaluation that expects it firing (exp_alerts followed by a
    // list item), besides the ones that expect nothing.
    for name in &names {
        let lines: Vec<&str> = tests.lines().collect();
        let fires = lines.windows(3).any(|w| {
            w[0].trim() == format!("alertname: {name}")
                && w[1].trim() == "exp_alerts:"
                && w[2].trim() == "- exp_labels:"
        });
        assert!(fires, "alerts_test.yml has no firing case for {name}");
    }
}

/// The metric names (`lb_*`, `process_*`) in a PromQL expression.
fn metric_names(expr: &str, into: &mut BTreeSet<String>) {
    for word in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':')) {
        if word.starts_with("lb_") || word.starts_with("process_") {
            into.insert(word.to_string());
        }
    }
}

/// The `expr:` values of alerts.yml (one line, or a `|` block).
fn rule_exprs(rules: &str) -> Vec<String> {
    let mut out = Vec::new();
    let lines: Vec<&str> = rules.lines().collect();
    for (i, l) in lines.iter().enumerate() {
        let Some(rest) = l.trim_start().strip_prefix("expr:") else { continue };
        let indent = l.len() - l.trim_start().len();
        if rest.trim() == "|" {
            let block: Vec<&str> = lines[i + 1..]
                .iter()
                .take_while(|b| b.trim().is_empty() || b.len() - b.trim_start().len() > indent)
                .copied()
                .collect();
            out.push(block.join("\n"));
        } else {
            out.push(rest.trim().to_string());
        }
    }
    out
}

/// Every `expr` and templating `query` string of the dashboard.
fn dashboard_exprs(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, x) in m {
                match (k.as_str(), x) {
                    ("expr" | "query" | "definition", serde_json::Value::String(s)) => out.push(s.clone()),
                    _ => dashboard_exprs(x, out),
                }
            }
        }
        serde_json::Value::Array(a) => a.iter().for_each(|x| dashboard_exprs(x, out)),
        _ => {}
    }
}

/// A real `lb run` (control plane only, unprivileged) and its /metrics text.
fn scrape_a_fresh_member() -> String {
    let port = free_port();
    let admin = SocketAddr::new(lo(61), free_port());
    let dir = std::env::temp_dir().join(format!("lb-monitoring-{}-{port}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("lb.toml");
    std::fs::write(
        &cfg,
        format!(
            "[node]\naddress = \"127.0.0.61\"\n[cluster]\nport = {port}\nplaintext = true\nversion = 2\n\
             members = [\"127.0.0.61\", \"127.0.0.62\", \"127.0.0.63\"]\n[admin]\nlisten = \"{admin}\"\n"
        ),
    )
    .unwrap();
    let mut child = Command::new(LB)
        .args(["run", "--config"])
        .arg(&cfg)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("lb starts");
    let mut text = String::new();
    wait_until("lb's /metrics", Duration::from_secs(10), || {
        match lb::client::request(admin, "GET", "/metrics", None) {
            Ok((200, t)) => {
                text = t;
                true
            }
            _ => false,
        }
    });
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&dir);
    text
}

/// A member with a data plane (policy affinity) and an upstream chain proxy, in a network
/// namespace (NFQUEUE, TUN and IP_TRANSPARENT need root, as in tests/fig1.rs), and its
/// /metrics text.
fn scrape_a_data_plane_and_chain_member() -> String {
    let ns = Netns::new("mon").unwrap();
    ns.sh("ip addr add 198.18.9.1/32 dev lo").unwrap();
    let dir = std::env::temp_dir().join(format!("lb-monitoring-{}", ns.name()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = "[node]\naddress = \"198.18.9.1\"\n[cluster]\nplaintext = true\nversion = 2\n\
                  members = [\"198.18.9.1\", \"198.18.9.2\"]\n[admin]\nlisten = \"127.0.0.1:9741\"\n\
                  [dataplane]\nqueue = 5\nintercept_tcp_ports = [80]\npolicy = \"affinity\"\n\
                  [proxy]\nlisten = \"0.0.0.0:8080\"\nintercept_tcp_ports = [80]\nrole = \"upstream\"\n";
    let mut m = LbProcess::start(&ns, &dir, "roles", config);
    let text = admin_get(&ns, "/metrics");
    m.terminate();
    let _ = std::fs::remove_dir_all(&dir);
    text
}

/// The sample names (family names, and `_bucket`/`_sum`/`_count` of histograms) in /metrics.
fn sample_names(text: &str) -> BTreeSet<String> {
    text.lines().filter(|l| !l.starts_with('#')).filter_map(|l| l.split(['{', ' ']).next()).map(String::from).collect()
}

#[test]
fn dashboard_and_alerts_use_only_metrics_that_lb_exports() {
    let dash: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(monitoring().join("grafana-dashboard.json")).unwrap())
            .expect("the dashboard is JSON");
    assert!(dash["title"].is_string() && dash["uid"].is_string());
    let panels = dash["panels"].as_array().expect("panels");
    let ids: BTreeSet<u64> = panels.iter().filter_map(|p| p["id"].as_u64()).collect();
    assert_eq!(ids.len(), panels.len(), "every panel has its own id");
    for p in panels.iter().filter(|p| p["type"] != "row") {
        let targets = p["targets"].as_array().unwrap_or_else(|| panic!("{} has no targets", p["title"]));
        assert!(!targets.is_empty() && targets.iter().all(|t| t["expr"].is_string()), "{}", p["title"]);
        assert!(p["gridPos"]["w"].as_u64().is_some_and(|w| (1..=24).contains(&w)), "{}", p["title"]);
    }
    let mut exprs = Vec::new();
    dashboard_exprs(&dash, &mut exprs);
    let rules = std::fs::read_to_string(monitoring().join("alerts.yml")).unwrap();
    let rule_exprs = rule_exprs(&rules);
    assert_eq!(rule_exprs.len(), alert_names(&rules).len(), "one expr per alert");
    exprs.extend(rule_exprs);
    let mut used = BTreeSet::new();
    for e in &exprs {
        metric_names(e, &mut used);
    }
    for wanted in
        ["lb_peers", "lb_entries", "lb_dataplane_packets_total", "lb_hold_queue_packets", "lb_chain_bytes_total"]
    {
        assert!(used.contains(wanted), "the dashboard or the rules should use {wanted}: {used:?}");
    }

    // Two real members, just started, no traffic: a control-plane one (unprivileged, on
    // loopback), and one with the data plane and a chain proxy (in a namespace, as root).
    // Born at zero, every family is in their /metrics before any event.
    let plain = scrape_a_fresh_member();
    let roles = scrape_a_data_plane_and_chain_member();
    for text in [&plain, &roles] {
        // The exported text passes promtool's own lint too.
        assert_ok("promtool check metrics", &promtool(&["check", "metrics"], Some(text)));
    }
    let (plain_names, role_names) = (sample_names(&plain), sample_names(&roles));
    for name in &used {
        assert!(
            plain_names.contains(name) || role_names.contains(name),
            "{name} is used but a fresh lb run does not export it:\n{plain}\n{roles}"
        );
    }
    // Every family the metrics module defines is exported by one of them.
    for family in lb::metrics::family_names() {
        let found = |names: &BTreeSet<String>| names.iter().any(|n| n == family || *n == format!("{family}_count"));
        assert!(found(&plain_names) || found(&role_names), "{family} not exported");
    }
    // Without [dataplane] there is no lb_dataplane_up (a 0 would page as a dead data plane).
    assert!(!plain_names.contains("lb_dataplane_up") && role_names.contains("lb_dataplane_up"));
    for series in [
        "lb_dataplane_packets_total{outcome=\"overflowed\"} 0",
        "lb_dataplane_decisions_total{reason=\"partial_expired\"} 0",
        "lb_owner_decisions_total{policy=\"affinity\",reason=\"affinity\"} 0",
        "lb_chain_events_total{event=\"reset\"} 0",
        "lb_chain_connections_total{mode=\"chained\",role=\"upstream\"} 0",
        "lb_proxy_connections_total{outcome=\"accepted\"} 0",
        "lb_hold_queue_packets 0",
        "lb_dataplane_up 1",
    ] {
        assert!(roles.lines().any(|l| l == series), "{series} missing:\n{roles}");
    }
}

#[test]
fn operations_md_lists_every_metric_family() {
    let doc = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/operations.md")).unwrap();
    for name in lb::metrics::family_names() {
        assert!(doc.contains(&format!("| `{name}` |")), "docs/operations.md's metrics table lacks {name}");
    }
}
