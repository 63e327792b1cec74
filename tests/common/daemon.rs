//! A real `lb run` process on loopback for the system tests.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use lb::admin::{FlowsView, PeersView};

use super::{free_port, wait_until};

/// The binary under test.
pub const LB: &str = env!("CARGO_BIN_EXE_lb");

/// A running `lb run`; killed when dropped, so a failing test leaves no process behind.
pub struct Daemon {
    pub child: Child,
    pub admin: SocketAddr,
    pub log: PathBuf,
    pub _dir: TempDir,
}

/// A temporary directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        let p = std::env::temp_dir().join(format!("lb-test-{tag}-{}-{}", std::process::id(), free_port()));
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn config(me: IpAddr, port: u16, members: &[IpAddr], admin: SocketAddr, keepalive_ms: u64) -> String {
    let list: Vec<String> = members.iter().map(|m| format!("\"{m}\"")).collect();
    format!(
        "[node]\naddress = \"{me}\"\n\n[cluster]\nport = {port}\nversion = 1\nkeepalive_ms = {keepalive_ms}\ndead_after = 3\n\
         connect_retries = \"infinite\"\nplaintext = true\nmembers = [{}]\n\n[admin]\nlisten = \"{admin}\"\n",
        list.join(", ")
    )
}

impl Daemon {
    pub fn start(me: IpAddr, port: u16, members: &[IpAddr], keepalive_ms: u64) -> Daemon {
        Daemon::start_with(me, port, members, keepalive_ms, "", &[])
    }

    /// [`Daemon::start`] with `extra` appended to the configuration file (which ends in its
    /// `[admin]` section) and `args` added to `lb run`.
    pub fn start_with(
        me: IpAddr,
        port: u16,
        members: &[IpAddr],
        keepalive_ms: u64,
        extra: &str,
        args: &[&str],
    ) -> Daemon {
        let dir = TempDir::new("daemon");
        let admin = SocketAddr::new(me, free_port());
        let cfg = dir.0.join("lb.toml");
        std::fs::write(&cfg, config(me, port, members, admin, keepalive_ms) + extra).unwrap();
        let log = dir.0.join("lb.log");
        Daemon::run(&cfg, admin, log, args, Some("info"), dir)
    }

    /// `lb run --config cfg args`, its stderr in `log`, `RUST_LOG` set to `rust_log` (or
    /// removed: the file's `[log] level` then holds); returns once its admin API at `admin`
    /// answers. `dir` is removed with the daemon.
    pub fn run(
        cfg: &Path,
        admin: SocketAddr,
        log: PathBuf,
        args: &[&str],
        rust_log: Option<&str>,
        dir: TempDir,
    ) -> Daemon {
        let mut cmd = Command::new(LB);
        cmd.args(["run", "--config"]).arg(cfg).args(args);
        match rust_log {
            Some(level) => cmd.env("RUST_LOG", level),
            None => cmd.env_remove("RUST_LOG"),
        };
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("lb starts");
        let d = Daemon { child, admin, log, _dir: dir };
        wait_until("admin API up", Duration::from_secs(10), || {
            lb::client::request(d.admin, "GET", "/peers", None).is_ok()
        });
        d
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn signal(&self, sig: i32) {
        assert_eq!(unsafe { libc::kill(self.pid(), sig) }, 0, "kill({}, {sig})", self.pid());
    }

    pub fn flows(&self, query: &str) -> FlowsView {
        lb::client::get_json(self.admin, &format!("/flows?{query}")).unwrap()
    }

    pub fn peers(&self) -> PeersView {
        lb::client::get_json(self.admin, "/peers").unwrap()
    }

    pub fn peer_state(&self, addr: IpAddr) -> String {
        let v = self.peers();
        let p = v.peers.iter().find(|p| p.address == addr).expect("peer listed");
        p.state.as_str().to_string()
    }

    pub fn metrics(&self) -> String {
        lb::client::request(self.admin, "GET", "/metrics", None).unwrap().1
    }

    pub fn install(&self, proto: &str, src: &str, dst: &str, action: &str) {
        let body = format!(r#"{{"protocol":"{proto}","src":"{src}","dst":"{dst}","action":"{action}"}}"#);
        let (status, text) = lb::client::request(self.admin, "POST", "/connections", Some(&body)).unwrap();
        assert!(status == 201 || status == 200, "install answered {status}: {text}");
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}
