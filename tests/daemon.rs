//! System tests of the real `lb` binary on loopback: processes started with `lb run`,
//! killed with SIGKILL, stopped with SIGSTOP, asked to leave with SIGTERM, and an
//! independent version-1 implementation (tests/interop/v1_peer.py) run against it.

mod common;

use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use common::daemon::*;
use common::*;
use lb::admin::FlowsView;

fn lb_cli(args: &[&str]) -> std::process::Output {
    Command::new(LB).args(args).output().expect("lb runs")
}

/// The value of the sample line `series` (name and labels exactly), if present.
fn sample(metrics: &str, series: &str) -> Option<f64> {
    metrics.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

#[test]
fn fresh_member_exports_per_peer_counters_at_zero_and_a_metrics_only_listener() {
    let port = free_port();
    // The peers never run: every per-peer series must still be there, at 0.
    let addrs = [lo(51), lo(52), lo(53)];
    let metrics_listen = SocketAddr::new(addrs[0], free_port());
    let a = Daemon::start_with(
        addrs[0],
        port,
        &addrs,
        200,
        &format!("metrics_listen = \"{metrics_listen}\"\n"),
        &["--log-format", "json"],
    );
    let m = a.metrics();
    for peer in &addrs[1..] {
        for series in [
            format!("lb_installs_refused_total{{peer=\"{peer}\",reason=\"entry_limit\"}}"),
            format!("lb_installs_refused_total{{peer=\"{peer}\",reason=\"rate_limit\"}}"),
            format!("lb_keepalive_timeouts_total{{peer=\"{peer}\"}}"),
            format!("lb_peer_down_total{{peer=\"{peer}\",reason=\"dead\"}}"),
            format!("lb_peer_up{{peer=\"{peer}\"}}"),
        ] {
            assert_eq!(sample(&m, &series), Some(0.0), "{series} at 0 from the start:\n{m}");
        }
    }
    assert_eq!(sample(&m, "lb_rejects_total{direction=\"sent\",reason=\"not_a_member\"}"), Some(0.0));
    assert_eq!(sample(&m, "lb_channels_refused_total{reason=\"tls_handshake\"}"), Some(0.0));
    assert_eq!(
        sample(&m, "lb_control_messages_total{action=\"forward\",direction=\"in\",type=\"install_connection\"}"),
        Some(0.0)
    );
    assert_eq!(sample(&m, "lb_version_fallbacks_total"), Some(0.0));
    let build = m.lines().find(|l| l.starts_with("lb_build_info{")).expect("lb_build_info");
    assert!(build.contains(&format!("version=\"{}\"", env!("CARGO_PKG_VERSION"))) && build.ends_with(" 1"), "{build}");
    assert!(sample(&m, "process_open_fds").is_some_and(|n| n > 0.0), "{m}");
    assert!(sample(&m, "process_resident_memory_bytes").is_some_and(|n| n > 0.0), "{m}");
    assert!(sample(&m, "process_start_time_seconds").is_some_and(|n| n > 1.0e9), "{m}");

    // The metrics-only listener: the same families, and nothing else.
    let (status, only) = lb::client::request(metrics_listen, "GET", "/metrics", None).unwrap();
    assert_eq!(status, 200);
    assert_eq!(sample(&only, &format!("lb_keepalive_timeouts_total{{peer=\"{}\"}}", addrs[1])), Some(0.0));
    let body = r#"{"protocol":"tcp","src":"192.0.2.1:1","dst":"192.0.2.2:2"}"#;
    assert_eq!(lb::client::request(metrics_listen, "POST", "/connections", Some(body)).unwrap().0, 404);
    assert_eq!(lb::client::request(metrics_listen, "GET", "/peers", None).unwrap().0, 404);
    assert_eq!(lb::client::request(metrics_listen, "POST", "/metrics", Some("")).unwrap().0, 405);
    assert_eq!(a.flows("").total, 0, "the listener installed nothing");
    // The admin API's refusals carry a JSON error too (they had empty bodies).
    for (method, path, want) in [("GET", "/nothing", 404), ("PUT", "/connections", 405), ("POST", "/peers", 405)] {
        let (status, body) = lb::client::request(a.admin, method, path, Some("")).unwrap();
        assert_eq!(status, want, "{method} {path}");
        let v: serde_json::Value =
            serde_json::from_str(&body).unwrap_or_else(|e| panic!("{method} {path}: {e}: {body:?}"));
        assert!(v["error"].as_str().is_some_and(|e| !e.is_empty()), "{method} {path}: {body}");
    }

    // --log-format json: one JSON object per line, no colour escapes in a file.
    wait_until("the listener's log line", Duration::from_secs(5), || a.log().contains("metrics listener up"));
    let log = a.log();
    assert!(!log.contains('\u{1b}'), "no ANSI escapes when stderr is a file:\n{log}");
    let lines: Vec<serde_json::Value> =
        log.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}"))).collect();
    assert!(lines.iter().any(|v| v["fields"]["message"] == "metrics listener up"), "{log}");
}

#[test]
fn identical_log_lines_are_throttled_and_counted() {
    let port = free_port();
    let addrs = [lo(56), lo(57)];
    let a = Daemon::start_with(addrs[0], port, &addrs, 200, "[log]\nthrottle_burst = 3\nthrottle_window_s = 2\n", &[]);
    let to = SocketAddr::new(addrs[0], port);
    // 20 strangers: each is refused with PEER_REJECT(not_a_member) and one INFO line.
    for _ in 0..20 {
        let mut p = RawPeer::connect(lo(59), to);
        p.send(&[3, 1, 1, 0]);
        assert_eq!(p.read(4), [3, 4, 1, 0]);
    }
    let written = |log: &str| log.lines().filter(|l| l.contains("peering refused remote=")).count();
    let suppressed = |log: &str| -> usize {
        log.lines()
            .filter(|l| l.contains("identical messages in 2 s: peering refused"))
            .filter_map(|l| l.split("suppressed ").nth(1)?.split(' ').next()?.parse::<usize>().ok())
            .sum()
    };
    wait_until("the throttle's summary", Duration::from_secs(10), || {
        let log = a.log();
        written(&log) + suppressed(&log) == 20
    });
    let log = a.log();
    assert!(written(&log) < 20 && suppressed(&log) > 0, "{log}");
    assert!(log.contains("WARN lb::log: suppressed"), "{log}");
    // The metrics count every refusal.
    let m = a.metrics();
    assert_eq!(sample(&m, "lb_rejects_total{direction=\"sent\",reason=\"not_a_member\"}"), Some(20.0), "{m}");
}

#[test]
fn kill_9_stop_and_sigterm_purge_entries_and_restart_resyncs() {
    let port = free_port();
    let addrs = [lo(41), lo(42), lo(43)];
    let a = Daemon::start(addrs[0], port, &addrs, 200);
    let mut b = Daemon::start(addrs[1], port, &addrs, 200);
    let c = Daemon::start(addrs[2], port, &addrs, 200);
    b.install("tcp", "192.0.2.1:1000", "198.51.100.1:80", "forward");
    b.install("udp", "[2001:db8::1]:53", "[2001:db8::2]:53", "bypass");
    c.install("tcp", "192.0.2.3:3000", "198.51.100.3:80", "forward");
    let b_query = format!("member={}", addrs[1]);
    wait_until("b's entries at a", Duration::from_secs(10), || a.flows(&b_query).total == 2);
    wait_until("c's entries at a", Duration::from_secs(10), || a.flows(&format!("member={}", addrs[2])).total == 1);

    // kill -9: the kernel closes b's sockets; a and c purge b's entries.
    b.signal(libc::SIGKILL);
    let _ = b.child.wait();
    wait_until("purge of b after kill -9", Duration::from_secs(5), || {
        a.flows(&b_query).total == 0 && c.flows(&b_query).total == 0
    });
    assert_eq!(a.flows("").total, 1, "c's entry stays");

    // Restart b: it rejoins and resyncs its (new) table.
    b = Daemon::start(addrs[1], port, &addrs, 200);
    b.install("tcp", "192.0.2.9:9000", "198.51.100.9:80", "forward");
    wait_until("b rejoined and resynced", Duration::from_secs(10), || {
        a.flows(&b_query).total == 1 && c.flows(&b_query).total == 1
    });
    let f = a.flows(&format!("{b_query}&addr=198.51.100.9"));
    assert_eq!(f.flows[0].src, "192.0.2.9:9000".parse().unwrap());
    assert!(!f.flows[0].local);
    assert!(b.flows(&b_query).flows[0].local, "b shows its own connection as local");

    // SIGSTOP: the channel stays open but b goes silent; a declares it dead after 3 x 200 ms.
    b.signal(libc::SIGSTOP);
    wait_until("keepalive timeout of b", Duration::from_secs(5), || a.flows(&b_query).total == 0);
    assert!(a.metrics().contains(&format!("lb_keepalive_timeouts_total{{peer=\"{}\"}} 1", addrs[1])));
    b.signal(libc::SIGCONT);
    wait_until("b back after SIGCONT", Duration::from_secs(10), || a.flows(&b_query).total == 1);

    // SIGTERM: PEER_LEAVE, purged at once, and the process exits 0.
    b.signal(libc::SIGTERM);
    let status = b.child.wait().unwrap();
    assert!(status.success(), "lb exits 0 on SIGTERM: {status:?}\n{}", b.log());
    wait_until("purge after PEER_LEAVE", Duration::from_secs(2), || a.flows(&b_query).total == 0);
    let peers = a.peers();
    let pb = peers.peers.iter().find(|p| p.address == addrs[1]).unwrap();
    assert_eq!(pb.last_close.as_deref(), Some("peer_left"));
    assert!(b.log().contains("SIGTERM"), "logs say why it left");
    drop(c);
    wait_until("c gone", Duration::from_secs(5), || a.peer_state(addrs[2]) != "established");
}

#[test]
fn cli_flows_peers_install_remove_and_metrics() {
    let port = free_port();
    let addrs = [lo(51), lo(52)];
    let a = Daemon::start(addrs[0], port, &addrs, 200);
    let b = Daemon::start(addrs[1], port, &addrs, 200);
    let admin_a = a.admin.to_string();
    let admin_b = b.admin.to_string();
    let out = lb_cli(&["install", "--admin", &admin_a, "--src", "192.0.2.5:5555", "--dst", "203.0.113.80:443"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = lb_cli(&[
        "install",
        "--admin",
        &admin_a,
        "--protocol",
        "udp",
        "--action",
        "bypass",
        "--src",
        "192.0.2.6:53",
        "--dst",
        "203.0.113.53:53",
    ]);
    assert!(out.status.success());
    wait_until("entries at b", Duration::from_secs(10), || b.flows("").total == 2);

    let out = lb_cli(&["flows", "--admin", &admin_b]);
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.contains("192.0.2.5:5555") && table.contains("203.0.113.80:443"), "{table}");
    assert!(table.contains("2 of 2 flows known to"), "{table}");
    let out = lb_cli(&["flows", "--admin", &admin_b, "--protocol", "udp", "--json"]);
    let v: FlowsView = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v.total, 1);
    assert_eq!((v.flows[0].action.as_str(), v.flows[0].owner), ("bypass", addrs[0]));

    let out = lb_cli(&["peers", "--admin", &admin_a]);
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.contains(&addrs[1].to_string()) && table.contains("established"), "{table}");

    let m = b.metrics();
    for needle in [
        "lb_peers{state=\"established\"} 1",
        &format!("lb_entries{{action=\"forward\",owner=\"{}\"}} 1", addrs[0]),
        &format!("lb_entries{{action=\"bypass\",owner=\"{}\"}} 1", addrs[0]),
        "lb_control_messages_total{action=\"forward\",direction=\"in\",type=\"install_connection\"} 1",
        "lb_table_sync_seconds_count",
    ] {
        assert!(m.contains(needle), "metrics lack {needle}:\n{m}");
    }

    let out = lb_cli(&["remove", "--admin", &admin_a, "--src", "192.0.2.5:5555", "--dst", "203.0.113.80:443"]);
    assert!(out.status.success());
    wait_until("remove reached b", Duration::from_secs(5), || b.flows("").total == 1);
    let out = lb_cli(&["remove", "--admin", &admin_a, "--src", "192.0.2.5:5555", "--dst", "203.0.113.80:443"]);
    assert!(!out.status.success(), "removing an unknown connection is an error");
    assert!(String::from_utf8_lossy(&out.stderr).contains("404"));

    // Bad input to the admin API gets a clear 400.
    let (status, body) = lb::client::request(a.admin, "POST", "/connections", Some("{\"protocol\":\"sctp\"}")).unwrap();
    assert_eq!(status, 400, "{body}");
    let (status, body) = lb::client::request(
        a.admin,
        "POST",
        "/connections",
        Some(r#"{"protocol":"tcp","src":"192.0.2.1:1","dst":"[2001:db8::1]:2"}"#),
    )
    .unwrap();
    assert_eq!(status, 400);
    assert!(body.contains("IPv4"), "{body}");

    // Many at once: an array, all checked before any is registered.
    let before = b.flows("").total;
    let (status, body) = lb::client::request(
        a.admin,
        "POST",
        "/connections",
        Some(r#"[{"protocol":"tcp","src":"192.0.2.7:1","dst":"203.0.113.9:80"},{"protocol":"sctp","src":"192.0.2.7:2","dst":"203.0.113.9:80"}]"#),
    )
    .unwrap();
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("connection 1") && body.contains("none registered"), "{body}");
    let many: Vec<String> = (0..300)
        .map(|i| format!(r#"{{"protocol":"udp","src":"192.0.2.7:{}","dst":"203.0.113.9:53"}}"#, 1000 + i))
        .collect();
    let many = format!("[{}]", many.join(","));
    let (status, body) = lb::client::request(a.admin, "POST", "/connections", Some(&many)).unwrap();
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!((v["installed"].as_u64(), v["unchanged"].as_u64(), v["lost"].as_u64()), (Some(300), Some(0), Some(0)));
    wait_until("the array reached b", Duration::from_secs(5), || b.flows("").total == before + 300);
    let (_, body) = lb::client::request(a.admin, "POST", "/connections", Some(&many)).unwrap();
    assert!(body.contains("\"unchanged\":300"), "{body}");
    // Too many in one array, or a body over the limit: refused whole, with a JSON error.
    let item = r#"{"protocol":"udp","src":"192.0.2.8:1","dst":"203.0.113.9:53"}"#;
    let over = format!("[{}]", vec![item; lb::admin::MAX_BATCH + 1].join(","));
    let (status, body) = lb::client::request(a.admin, "POST", "/connections", Some(&over)).unwrap();
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("at most 100000"), "{body}");
    let huge = format!("[{}]", vec![item; lb::admin::MAX_BODY / item.len() + 1].join(","));
    let (status, body) = lb::client::request(a.admin, "POST", "/connections", Some(&huge)).unwrap();
    assert_eq!(status, 413, "{body}");
    assert!(body.starts_with("{\"error\"") && body.contains("length limit"), "{body}");
    assert_eq!(b.flows("").total, before + 300, "nothing of a refused array registered");
}

#[test]
fn bad_configuration_is_refused_with_the_key() {
    let dir = TempDir::new("badcfg");
    let cases = [
        (
            "[node]\naddress = \"127.0.0.1\"\n[cluster]\nplaintext = true\nmembers = [\"127.0.0.1\"]\nkeepalive = 5\n",
            "keepalive",
        ),
        (
            "[node]\naddress = \"127.0.0.1\"\n[cluster]\nplaintext = true\nmembers = [\"127.0.0.1\"]\ndead_after = 0\n",
            "cluster.dead_after",
        ),
        (
            "[node]\naddress = \"127.0.0.1\"\n[cluster]\nplaintext = true\nmembers = [\"127.0.0.2\"]\n",
            "cluster.members",
        ),
        ("[node]\naddress = \"127.0.0.1\"\n[cluster\nmembers = []\n", "line 3"),
    ];
    for (i, (text, want)) in cases.iter().enumerate() {
        let f = dir.0.join(format!("bad{i}.toml"));
        std::fs::write(&f, text).unwrap();
        let out = Command::new(LB).args(["run", "--config"]).arg(&f).output().unwrap();
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(want), "case {i}: error {err:?} should name {want:?}");
    }
    let out = lb_cli(&["run", "--config", "/nonexistent/lb.toml"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot read /nonexistent/lb.toml"));
}

#[test]
fn check_config_summarizes_the_affinity_balancer_and_refuses_bad_affinity_keys() {
    let dir = TempDir::new("affcfg");
    let good = "[node]\naddress = \"198.18.0.11\"\n[cluster]\nplaintext = true\nversion = 2\n\
                members = [\"198.18.0.11\", \"198.18.0.21\", \"198.18.0.22\"]\n\
                [dataplane]\nintercept_tcp_ports = [80]\npolicy = \"affinity\"\n\
                owners = [\"198.18.0.21\", \"198.18.0.22\"]\n[affinity]\nload_slack = 8\n";
    let f = dir.0.join("good.toml");
    std::fs::write(&f, good).unwrap();
    let out = lb_cli(&["check-config", "--config", f.to_str().unwrap()]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("protocol version 2"), "{text}");
    assert!(text.contains("policy affinity, new flows owned by 198.18.0.21, 198.18.0.22, fast path on"), "{text}");
    assert!(text.contains("load bound 1.25 x average (new pairs 1.1, slack 8)"), "{text}");
    for (bad, key) in [
        ("load_slack = 8", "load_slack = -1"),
        ("policy = \"affinity\"", "policy = \"local\""),
        ("[affinity]", "[affinity]\nload_bound = 0.5"),
    ] {
        let f = dir.0.join("bad.toml");
        std::fs::write(&f, good.replace(bad, key)).unwrap();
        let out = lb_cli(&["check-config", "--config", f.to_str().unwrap()]);
        assert!(!out.status.success(), "{key} accepted");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("affinity.") || err.contains("dataplane.owners"), "{key}: {err}");
    }
}

/// The issue's acceptance check: an implementation written only from the version-1 table
/// (in Python, by someone who did not read this code) joins `lb run`, receives its table,
/// installs and sees its connection in /flows, is rejected as a non-member and for another
/// version, and sees its entries dropped after a bad message.
#[test]
fn independent_v1_implementation_interoperates() {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/interop/v1_peer.py");
    let out = Command::new("python3").arg(script).arg(LB).output().expect("python3 runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "interop checks failed:\n{stdout}\n{stderr}");
    assert!(stdout.contains(" 0 failed"), "{stdout}");
    assert!(!stdout.contains("FAIL"), "{stdout}");
}

#[test]
fn tls_cluster_from_gen_certs() {
    let dir = TempDir::new("tls");
    let port = free_port();
    let addrs = [lo(61), lo(62)];
    let list = format!("{},{}", addrs[0], addrs[1]);
    let out = lb_cli(&["gen-certs", "--out", dir.0.to_str().unwrap(), "--members", &list]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let mut daemons = Vec::new();
    for &a in &addrs {
        let admin = SocketAddr::new(a, free_port());
        let cfg = format!(
            "[node]\naddress = \"{a}\"\n[cluster]\nport = {port}\nkeepalive_ms = 200\nmembers = [\"{}\", \"{}\"]\n\
             [admin]\nlisten = \"{admin}\"\n[tls]\nca = \"{d}/ca.pem\"\ncert = \"{d}/{a}.pem\"\nkey = \"{d}/{a}.key\"\n",
            addrs[0],
            addrs[1],
            d = dir.0.display()
        );
        let path = dir.0.join(format!("{a}.toml"));
        std::fs::write(&path, cfg).unwrap();
        let log = dir.0.join(format!("{a}.log"));
        daemons.push(Daemon::run(&path, admin, log, &[], None, TempDir::new("tls-d")));
    }
    daemons[1].install("tcp", "192.0.2.1:1", "198.51.100.1:2", "forward");
    wait_until("entry over TLS", Duration::from_secs(10), || daemons[0].flows("").total == 1);
    assert!(!daemons[0].log().contains("plaintext"), "no plaintext warning with [tls]");
    // Without [tls] and without plaintext = true, lb refuses to start.
    let bare = dir.0.join("bare.toml");
    std::fs::write(&bare, "[node]\naddress = \"127.0.0.1\"\n[cluster]\nmembers = [\"127.0.0.1\"]\n").unwrap();
    let out = Command::new(LB).args(["run", "--config"]).arg(&bare).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no [tls] section"));
}

/// Issue 11: SIGHUP applies the keys that can change while the member runs (here the flood
/// guard and the log level) and refuses a file that changes any other key, naming it, with
/// the running configuration kept. Before, SIGHUP only said that the file had changed.
#[test]
fn sighup_applies_live_keys_and_refuses_the_rest_by_name() {
    use cluster_proto::mesh::{Mesh, MeshConfig, NoObserver, Retries};
    use cluster_proto::session::SessionConfig;
    use cluster_proto::{Action, Connection, Protocol};
    use std::sync::Arc;
    let port = free_port();
    let (me, peer) = (lo(161), lo(162));
    let dir = TempDir::new("reload");
    let admin = SocketAddr::new(me, free_port());
    let cfg = dir.0.join("lb.toml");
    let text = |max: usize, rate: u32, level: &str, keepalive: u64| {
        config(me, port, &[me, peer], admin, keepalive).replace(
            "plaintext = true",
            &format!("plaintext = true\nmax_entries_per_member = {max}\nmax_install_rate = {rate}"),
        ) + &format!("[log]\nlevel = \"{level}\"\n")
    };
    std::fs::write(&cfg, text(100, 1, "info", 500)).unwrap();
    let log = dir.0.join("lb.log");
    // No RUST_LOG: the level is the file's, so a reload may change it.
    let d = Daemon::run(&cfg, admin, log, &[], None, TempDir::new("reload-d"));

    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let session = SessionConfig { version: 1, keepalive: Duration::from_millis(500), dead_after: 3, restart_time: 0 };
    let mesh = rt.block_on(async {
        Mesh::start(MeshConfig::uniform(peer, port, &[me, peer], session, Retries::Infinite), Arc::new(NoObserver))
            .await
            .unwrap()
    });
    let conn = |i: usize| {
        Connection::new(
            Protocol::Tcp,
            SocketAddr::new(format!("198.18.1.{}", i / 250).parse().unwrap(), 1000 + (i % 250) as u16),
            "203.0.113.80:80".parse().unwrap(),
        )
        .unwrap()
    };
    let held = || d.flows(&format!("member={peer}&limit=1")).total;
    wait_until("peer established", Duration::from_secs(10), || d.peer_state(peer) == "established");
    for i in 0..150 {
        mesh.install(conn(i), Action::Forward);
    }
    wait_until("the cap holds 100 of the peer's 150", Duration::from_secs(10), || held() == 100);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(held(), 100, "the flood guard refused the other 50");

    let hup = |want: &str| {
        let before = d.log().matches(want).count();
        d.signal(libc::SIGHUP);
        wait_until(want, Duration::from_secs(5), || d.log().matches(want).count() > before);
    };
    // A key that cannot change live: the whole file is refused, the key named.
    std::fs::write(&cfg, text(1000, 100_000, "debug", 700)).unwrap();
    hup("SIGHUP: not applied");
    let last = d.log().lines().rev().find(|l| l.contains("SIGHUP: not applied")).unwrap().to_string();
    assert!(last.contains("keys=cluster.keepalive_ms") && !last.contains("max_entries"), "{last}");
    for i in 150..200 {
        mesh.install(conn(i), Action::Forward);
    }
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(held(), 100, "nothing of the refused file applied: {}", d.log());
    assert!(!d.log().contains("DEBUG"), "nor its log level");

    // Only live keys: applied.
    std::fs::write(&cfg, text(1000, 100_000, "debug", 500)).unwrap();
    hup("SIGHUP: configuration reloaded");
    let last = d.log().lines().rev().find(|l| l.contains("SIGHUP: configuration reloaded")).unwrap().to_string();
    assert!(last.contains("keys=cluster.max_entries_per_member, cluster.max_install_rate, log.level"), "{last}");
    wait_until("the debug line after the reload", Duration::from_secs(5), || d.log().contains("SIGHUP: reload done"));
    for i in 200..350 {
        mesh.install(conn(i), Action::Forward);
    }
    wait_until("the raised cap takes the next 150", Duration::from_secs(10), || held() == 250);

    // The same file again: unchanged; a broken one: nothing changes, the member lives on.
    hup("SIGHUP: configuration unchanged");
    std::fs::write(&cfg, "[node]\naddress = 1\n").unwrap();
    hup("SIGHUP: the configuration file is invalid");
    assert_eq!(lb::client::request(admin, "GET", "/ready", None).unwrap().0, 200);
    assert_eq!(held(), 250);
    rt.block_on(mesh.shutdown(Duration::from_secs(1)));
}

/// Issue 11: a member restarted with SIGTERM gets its connections back from its state file,
/// and its peer never drops them meanwhile (graceful restart, version 2); after a kill -9 it
/// gets back what its last periodic save held. Two real `lb run` processes on loopback.
#[test]
fn a_restarted_member_gets_its_connections_back_and_its_peer_never_drops_them() {
    const N: usize = 2000;
    let port = free_port();
    let (a_addr, b_addr) = (lo(171), lo(172));
    let dir = TempDir::new("restart");
    let state = dir.0.join(format!("{a_addr}.state"));
    let spawn = |me, admin, name: &str| restartable(&dir, port, &[a_addr, b_addr], me, admin, name, 3);
    let (admin_a, admin_b) = (SocketAddr::new(a_addr, free_port()), SocketAddr::new(b_addr, free_port()));
    let b = spawn(b_addr, admin_b, "b");
    let mut a = spawn(a_addr, admin_a, "a");
    let items: Vec<String> = (0..N)
        .map(|i| format!(r#"{{"protocol":"tcp","src":"198.18.{}.{}:4000","dst":"203.0.113.9:443"}}"#, i / 250, i % 250))
        .collect();
    let (status, body) =
        lb::client::request(admin_a, "POST", "/connections", Some(&format!("[{}]", items.join(",")))).unwrap();
    assert_eq!(status, 200, "{body}");
    let held_by_b = || b.flows(&format!("member={a_addr}&limit=1")).total;
    wait_until("b holds a's connections", Duration::from_secs(10), || held_by_b() == N);

    // SIGTERM: PEER_LEAVE(restarting); b keeps everything while a is down and comes back.
    stop_member(&mut a, libc::SIGTERM, || assert_eq!(held_by_b(), N, "b dropped a's connections while a stopped"));
    assert!(a.log().contains("SIGTERM"), "{}", a.log());
    let saved = std::fs::metadata(&state).map(|m| m.len()).unwrap_or(0);
    assert_eq!(saved as usize, 8 + 16 * N + 12, "the state file holds the {N} connections: {}", a.log());
    for _ in 0..10 {
        assert_eq!(held_by_b(), N, "b dropped a's connections while a was down");
        std::thread::sleep(Duration::from_millis(50));
    }
    let left = std::time::Instant::now();
    let mut a = spawn(a_addr, admin_a, "a2");
    assert!(a.log().contains("registered again from the state file"), "{}", a.log());
    assert_eq!(a.flows(&format!("member={a_addr}&limit=1")).total, N, "a restored its own connections: {}", a.log());
    // Past the end of the restart time (3 s): nothing was purged, a sent them all again.
    while left.elapsed() < Duration::from_secs(4) {
        assert_eq!(held_by_b(), N, "b dropped some of a's connections after the restart");
        std::thread::sleep(Duration::from_millis(100));
    }
    let m = b.metrics();
    assert_eq!(sample(&m, &format!("lb_stale_entries_purged_total{{peer=\"{a_addr}\"}}")), Some(0.0), "{m}");
    assert_eq!(sample(&m, &format!("lb_peer_down_total{{peer=\"{a_addr}\",reason=\"peer_restarting\"}}")), Some(1.0));

    // kill -9 after removing 10: the periodic save (every 200 ms) had them; b keeps the rest.
    for item in &items[..10] {
        let (status, _) = lb::client::request(admin_a, "DELETE", "/connections", Some(item)).unwrap();
        assert_eq!(status, 200);
    }
    wait_until("b saw the removes", Duration::from_secs(5), || held_by_b() == N - 10);
    std::thread::sleep(Duration::from_millis(600));
    a.signal(libc::SIGKILL);
    let _ = a.child.wait();
    let a = spawn(a_addr, admin_a, "a3");
    assert_eq!(a.flows(&format!("member={a_addr}&limit=1")).total, N - 10, "restored from the last periodic save");
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(held_by_b(), N - 10, "nothing purged after the crash either");
    drop(a);
    drop(b);
}

/// A member of a version-2 cluster with graceful restart (`restart_secs`) and a state file
/// in `dir` (one per address, so a restart with the same address finds it), as `lb run`.
fn restartable(
    dir: &TempDir,
    port: u16,
    members: &[std::net::IpAddr],
    me: std::net::IpAddr,
    admin: SocketAddr,
    name: &str,
    restart_secs: u8,
) -> Daemon {
    let file = dir.0.join(format!("{me}.state"));
    let text = config(me, port, members, admin, 200).replace(
        "version = 1",
        &format!(
            "version = 2\nrestart_time_secs = {restart_secs}\nstate_file = \"{}\"\nstate_save_ms = 200",
            file.display()
        ),
    );
    let path = dir.0.join(format!("{name}.toml"));
    std::fs::write(&path, text).unwrap();
    Daemon::run(&path, admin, dir.0.join(format!("{name}.log")), &[], Some("info"), TempDir::new(name))
}

/// Sends `sig`, then waits (bounded) for the exit; `meanwhile` runs while the member stops.
fn stop_member(d: &mut Daemon, sig: i32, mut meanwhile: impl FnMut()) {
    d.signal(sig);
    let t0 = std::time::Instant::now();
    while d.child.try_wait().unwrap().is_none() {
        assert!(t0.elapsed() < Duration::from_secs(10), "the member did not exit");
        meanwhile();
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `n` connections of member number `owner` from `from` on, as POST /connections items.
fn connections_of(owner: usize, from: usize, n: usize) -> Vec<String> {
    (from..from + n)
        .map(|i| {
            format!(r#"{{"protocol":"tcp","src":"198.18.{}.{}:{}","dst":"203.0.113.9:443"}}"#, owner, i % 250, 1000 + i)
        })
        .collect()
}

/// Issue 11, Deliver 6 (the mesh part): a rolling restart of a 3-member cluster, SIGTERM then
/// start of each member in turn, while connections keep being registered at the members that
/// are up. At every check, every running member holds every member's connections: none lost.
#[test]
fn a_rolling_restart_of_three_members_loses_no_connection() {
    const START: usize = 500;
    let port = free_port();
    let addrs = [lo(181), lo(182), lo(183)];
    let dir = TempDir::new("rolling");
    let admins: Vec<SocketAddr> = addrs.iter().map(|&a| SocketAddr::new(a, free_port())).collect();
    let mut members: Vec<Option<Daemon>> =
        (0..3).map(|i| Some(restartable(&dir, port, &addrs, addrs[i], admins[i], &format!("m{i}"), 5))).collect();
    let mut expected = [0usize; 3];
    let register = |i: usize, from: usize, n: usize| {
        let body = format!("[{}]", connections_of(i, from, n).join(","));
        let (status, text) = lb::client::request(admins[i], "POST", "/connections", Some(&body)).unwrap();
        assert!(status == 200 && text.contains(&format!("\"installed\":{n}")), "{status} {text}");
    };
    for (i, e) in expected.iter_mut().enumerate() {
        register(i, 0, START);
        *e = START;
    }
    let holds = |viewer: usize, owner: usize| {
        lb::client::get_json::<FlowsView>(admins[viewer], &format!("/flows?member={}&limit=1", addrs[owner]))
            .map(|v| v.total)
            .unwrap_or(usize::MAX)
    };
    let all_hold = |up: &[usize], expected: &[usize; 3]| up.iter().all(|&v| (0..3).all(|o| holds(v, o) == expected[o]));
    wait_until("everyone holds everything", Duration::from_secs(15), || all_hold(&[0, 1, 2], &expected));
    for round in 0..3 {
        let others: Vec<usize> = (0..3).filter(|&o| o != round).collect();
        let mut m = members[round].take().unwrap();
        stop_member(&mut m, libc::SIGTERM, || {
            for &v in &others {
                assert_eq!(holds(v, round), expected[round], "member {v} dropped member {round}'s connections");
            }
        });
        drop(m);
        // Registered while it is down, at the members that are up.
        for &o in &others {
            register(o, expected[o], 50);
            expected[o] += 50;
        }
        wait_until("the others hold everything", Duration::from_secs(10), || all_hold(&others, &expected));
        members[round] = Some(restartable(&dir, port, &addrs, addrs[round], admins[round], &format!("m{round}r"), 5));
        wait_until("the restarted member holds everything", Duration::from_secs(15), || {
            all_hold(&[0, 1, 2], &expected)
        });
        register(round, expected[round], 50);
        expected[round] += 50;
    }
    // Past every restart time: nothing was purged anywhere.
    let t0 = std::time::Instant::now();
    while t0.elapsed() < Duration::from_secs(6) {
        assert!(all_hold(&[0, 1, 2], &expected), "a connection was lost: expected {expected:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
    for (i, m) in members.iter().enumerate() {
        let text = m.as_ref().unwrap().metrics();
        for o in (0..3).filter(|&o| o != i) {
            let series = format!("lb_stale_entries_purged_total{{peer=\"{}\"}}", addrs[o]);
            assert_eq!(sample(&text, &series), Some(0.0), "member {i}: {series}");
        }
    }
}
