//! `lb run` processes inside a test's network namespaces, and their admin API.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use handoff::netns::Netns;

/// The `lb` binary under test.
pub const LB: &str = env!("CARGO_BIN_EXE_lb");
/// Where every namespaced member's admin API listens (each namespace has its own loopback).
pub const ADMIN: &str = "127.0.0.1:9741";
/// How long a member may take to become ready or to exit.
const WAIT: Duration = Duration::from_secs(10);

/// `lb run` inside a namespace; killed (as a crash) on drop.
pub struct LbProcess {
    child: Child,
    log: PathBuf,
}

impl Drop for LbProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl LbProcess {
    /// Writes `config` to `dir/NAME.toml`, starts `lb run` in `ns` (log in `dir/NAME.log`) and
    /// waits for its `/ready`.
    pub fn start(ns: &Netns, dir: &Path, name: &str, config: &str) -> LbProcess {
        Self::start_with_env(ns, dir, name, config, &[])
    }

    /// [`LbProcess::start`] with extra environment variables.
    pub fn start_with_env(ns: &Netns, dir: &Path, name: &str, config: &str, env: &[(&str, &str)]) -> LbProcess {
        let cfg = dir.join(format!("{name}.toml"));
        std::fs::write(&cfg, config).unwrap();
        let log = dir.join(format!("{name}.log"));
        let child = ns
            .spawn(
                Command::new(LB)
                    .args(["run", "--config"])
                    .arg(&cfg)
                    .env("RUST_LOG", std::env::var("LB_TEST_LOG").unwrap_or_else(|_| "info".into()))
                    .envs(env.iter().copied())
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(std::fs::File::create(&log).unwrap()),
            )
            .unwrap();
        let lb = LbProcess { child, log };
        let admin: SocketAddr = ADMIN.parse().unwrap();
        let t0 = Instant::now();
        while !ns.run(|| lb::client::request(admin, "GET", "/ready", None).is_ok_and(|r| r.0 == 200)) {
            assert!(t0.elapsed() < WAIT, "{name} not ready:\n{}", lb.log());
            std::thread::sleep(Duration::from_millis(20));
        }
        lb
    }

    /// Its log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Where its log is written.
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// Sends `sig` (SIGHUP for a reload).
    #[allow(dead_code)]
    pub fn signal(&self, sig: i32) {
        // SAFETY: signalling our own child.
        assert_eq!(unsafe { libc::kill(self.child.id() as i32, sig) }, 0);
    }

    /// SIGTERM (stop to restart: version-2 peers keep its entries for its restart time), and
    /// a bounded wait for a clean exit (status 0).
    #[allow(dead_code)]
    pub fn terminate(&mut self) {
        self.stop_with(libc::SIGTERM);
    }

    /// SIGUSR2 (leave for good: the peers purge its entries at once), and a bounded wait for
    /// a clean exit (status 0).
    #[allow(dead_code)]
    pub fn leave_for_good(&mut self) {
        self.stop_with(libc::SIGUSR2);
    }

    fn stop_with(&mut self, sig: i32) {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, sig) };
        let t0 = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                assert!(status.success(), "lb exits 0 on signal {sig}: {status:?}\n{}", self.log());
                return;
            }
            assert!(t0.elapsed() < WAIT, "lb did not exit on signal {sig}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// `GET path` on the admin API of the member in `ns` (empty when it does not answer).
pub fn admin_get(ns: &Netns, path: &str) -> String {
    let admin: SocketAddr = ADMIN.parse().unwrap();
    ns.run(|| lb::client::request(admin, "GET", path, None).map(|r| r.1).unwrap_or_default())
}

/// The value of the metric line that starts with `name_and_labels` exactly (0 if none).
pub fn metric(ns: &Netns, name_and_labels: &str) -> u64 {
    admin_get(ns, "/metrics")
        .lines()
        .find_map(|l| l.strip_prefix(name_and_labels).and_then(|v| v.trim().parse::<f64>().ok()))
        .unwrap_or(0.0) as u64
}

/// The value of the first line of metric `name` that contains every label (0 if none).
pub fn metric_with(ns: &Netns, name: &str, labels: &[&str]) -> u64 {
    admin_get(ns, "/metrics")
        .lines()
        .filter(|l| {
            l.strip_prefix(name).is_some_and(|r| r.starts_with(['{', ' '])) && labels.iter().all(|x| l.contains(x))
        })
        .find_map(|l| l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()))
        .unwrap_or(0.0) as u64
}
