//! Running `lb` as a systemd service: the unit file passes `systemd-analyze verify`, the
//! packaged example configuration passes `check-config`, and the sd_notify handshake (READY=1
//! at the `/ready` moment, watchdog pings, SIGHUP that checks the file without ending the
//! member, STOPPING=1 at SIGTERM) runs against a notify socket this test provides.

mod common;

use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::daemon::{config, TempDir, LB};
use common::{free_port, lo, wait_until};

const UNIT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../contrib/systemd/lb.service");
const EXAMPLE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../contrib/lb.toml");

fn lb(args: &[&str]) -> std::process::Output {
    Command::new(LB).args(args).output().unwrap()
}

#[test]
fn unit_file_passes_systemd_analyze_verify() {
    let dir = TempDir::new("unit");
    // The unit's Documentation= names man:lb(1): verify looks it up, so give it our pages.
    let man = dir.0.join("man");
    let out = lb(&["generate", "man", "--out", man.join("man1").to_str().unwrap()]);
    assert!(out.status.success(), "lb generate man: {}", String::from_utf8_lossy(&out.stderr));
    assert!(man.join("man1/lb.1").exists() && man.join("man1/lb-run.1").exists());
    // verify checks that ExecStart's binary exists: point it at the one under test.
    let unit = std::fs::read_to_string(UNIT).unwrap().replace("/usr/bin/lb", LB);
    let path = dir.0.join("lb.service");
    std::fs::write(&path, unit).unwrap();
    let out = Command::new("systemd-analyze").arg("verify").arg(&path).env("MANPATH", &man).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "systemd-analyze verify failed: {stderr}");
    assert!(!stderr.contains("lb.service"), "warnings about the unit: {stderr}");
    let text = std::fs::read_to_string(UNIT).unwrap();
    for line in ["Type=notify", "ExecReload=/bin/kill -HUP $MAINPID", "WatchdogSec=", "ProtectSystem=strict"] {
        assert!(text.contains(line), "the unit has {line}");
    }
}

#[test]
fn the_example_configuration_is_valid_and_the_default_path_is_etc_lb() {
    let out = lb(&["check-config", "--config", EXAMPLE]);
    assert!(out.status.success(), "check-config of the example: {}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("ok, member 127.0.0.1 of 1"));
    if !Path::new("/etc/lb/lb.toml").exists() {
        let out = lb(&["check-config"]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains("/etc/lb/lb.toml"), "the default path is named: {err}");
    }
    let out = lb(&["generate", "completions", "bash"]);
    let script = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && script.contains("_lb()") && script.contains("check-config"), "{script}");
}

/// Receives notify datagrams until one contains `what`, returning everything received.
fn expect(sock: &UnixDatagram, what: &str, within: Duration, seen: &mut Vec<String>) {
    let t0 = Instant::now();
    let mut buf = [0u8; 4096];
    while t0.elapsed() < within {
        match sock.recv(&mut buf) {
            Ok(n) => {
                let msg = String::from_utf8_lossy(&buf[..n]).to_string();
                let hit = msg.lines().any(|l| l == what);
                seen.push(msg);
                if hit {
                    return;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock || e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(e) => panic!("notify socket: {e}"),
        }
    }
    panic!("no {what} within {within:?}; received {seen:?}");
}

#[test]
fn notify_ready_watchdog_sighup_and_stopping() {
    let dir = TempDir::new("notify");
    let sock_path = dir.0.join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
    let me = lo(1);
    let admin = std::net::SocketAddr::new(me, free_port());
    let cfg = dir.0.join("lb.toml");
    let text = config(me, free_port(), &[me], admin, 1000);
    std::fs::write(&cfg, &text).unwrap();
    let log = dir.0.join("lb.log");
    // systemd sets WATCHDOG_PID to the main process: the shell's pid, which exec hands to lb.
    let mut child = Command::new("sh")
        .args(["-c", "WATCHDOG_PID=$$ exec \"$0\" run --config \"$1\""])
        .arg(LB)
        .arg(&cfg)
        .env("RUST_LOG", "info")
        .env("NOTIFY_SOCKET", &sock_path)
        .env("WATCHDOG_USEC", "200000")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let log = || std::fs::read_to_string(&log).unwrap_or_default();
    let mut seen = Vec::new();
    expect(&sock, "READY=1", Duration::from_secs(10), &mut seen);
    // READY=1 comes no earlier than /ready's 200.
    let (status, _) = lb::client::request(admin, "GET", "/ready", None).unwrap();
    assert_eq!(status, 200, "ready when READY=1 was sent");
    assert!(seen.last().unwrap().contains("STATUS=member 127.0.0.1 of 1, ready"), "{seen:?}");
    // WATCHDOG_USEC=200 ms: pings every 100 ms.
    let t0 = Instant::now();
    for _ in 0..3 {
        expect(&sock, "WATCHDOG=1", Duration::from_secs(2), &mut seen);
    }
    assert!(t0.elapsed() < Duration::from_secs(2), "three pings in {:?}", t0.elapsed());

    // SIGHUP reloads the file: unchanged, then changed in a key that needs a restart (refused,
    // named), then broken; the member lives on. (tests/daemon.rs covers keys applied live.)
    let pid = child.id() as i32;
    let hup = |want: &str| {
        assert_eq!(unsafe { libc::kill(pid, libc::SIGHUP) }, 0);
        wait_until(want, Duration::from_secs(5), || log().contains(want));
    };
    hup("SIGHUP: configuration unchanged");
    std::fs::write(&cfg, text.replace("keepalive_ms = 1000", "keepalive_ms = 500")).unwrap();
    hup("SIGHUP: not applied: these keys cannot change while the member runs");
    assert!(log().contains("keys=cluster.keepalive_ms"), "{}", log());
    std::fs::write(&cfg, "[node]\naddress = 1\n").unwrap();
    hup("SIGHUP: the configuration file is invalid");
    assert!(child.try_wait().unwrap().is_none(), "SIGHUP does not end the member: {}", log());
    assert_eq!(lb::client::request(admin, "GET", "/ready", None).unwrap().0, 200);
    expect(&sock, "WATCHDOG=1", Duration::from_secs(2), &mut seen);

    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    expect(&sock, "STOPPING=1", Duration::from_secs(5), &mut seen);
    let status = child.wait().unwrap();
    assert!(status.success(), "exit after SIGTERM: {status:?}\n{}", log());
}

#[test]
fn without_notify_socket_nothing_is_sent_and_the_member_runs() {
    // The common case outside systemd: no NOTIFY_SOCKET, no WATCHDOG_USEC; nothing logged
    // about notification either.
    let d = common::daemon::Daemon::start(lo(2), free_port(), &[lo(2)], 1000);
    wait_until("ready", Duration::from_secs(10), || {
        lb::client::request(d.admin, "GET", "/ready", None).is_ok_and(|(s, _)| s == 200)
    });
    let log = d.log();
    assert!(!log.contains("watchdog") && !log.contains("cannot notify"), "{log}");
}
