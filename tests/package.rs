//! The Debian package: built from lb/Cargo.toml's `[package.metadata.deb]` with cargo-deb
//! around the binary under test, its content list checked, then installed with `dpkg -i` on
//! this machine: the installed `lb check-config` accepts the installed example file and the
//! installed unit passes `systemd-analyze verify`; purged again at the end (also on failure).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::daemon::{TempDir, LB};

const ROOT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/..");

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Builds the .deb of the binary under test into `out`; its path.
fn build_deb(out: &Path) -> PathBuf {
    // The binary is <target>/release/lb: cargo-deb finds it there with --no-build.
    let target = Path::new(LB).parent().and_then(Path::parent).expect("<target>/release/lb");
    run(Command::new(format!("{ROOT}/packaging/stage")).arg(LB).arg(target.join("release/lb-package")));
    run(Command::new("cargo")
        .args(["deb", "-p", "lb", "--no-build", "--quiet", "--output"])
        .arg(out)
        .current_dir(ROOT)
        .env("CARGO_TARGET_DIR", target));
    let deb = std::fs::read_dir(out)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|x| x == "deb"))
        .expect("a .deb");
    deb
}

/// Purges the package when dropped, so a failing test leaves nothing installed.
struct Installed;

impl Drop for Installed {
    fn drop(&mut self) {
        let _ = Command::new("dpkg").args(["--purge", "lb"]).output();
    }
}

#[test]
fn the_deb_has_binary_unit_config_man_pages_and_installs() {
    let dir = TempDir::new("deb");
    let deb = build_deb(&dir.0);
    let list = run(Command::new("dpkg-deb").arg("-c").arg(&deb));
    for path in [
        "./usr/bin/lb",
        "./usr/lib/systemd/system/lb.service",
        "./etc/lb/lb.toml",
        "./usr/share/man/man1/lb.1",
        "./usr/share/man/man1/lb-run.1",
        "./usr/share/bash-completion/completions/lb",
        "./usr/share/zsh/vendor-completions/_lb",
        "./usr/share/fish/vendor_completions.d/lb.fish",
        "./usr/share/doc/lb/operations.md",
        "./usr/share/doc/lb/monitoring/alerts.yml",
        "./usr/share/doc/lb/wireshark/lb.lua",
    ] {
        assert!(list.lines().any(|l| l.ends_with(path)), "{path} in the package:\n{list}");
    }
    let conffiles = run(Command::new("dpkg-deb").args(["-I"]).arg(&deb).arg("conffiles"));
    assert_eq!(conffiles.trim(), "/etc/lb/lb.toml", "the example is a conffile (kept on upgrade)");
    let depends = run(Command::new("dpkg-deb").args(["-f"]).arg(&deb).arg("Depends"));
    for d in ["iproute2", "nftables", "iptables"] {
        assert!(depends.contains(d), "depends on {d}: {depends}");
    }

    // Install it for real; refuse to overwrite an lb that is not ours.
    let owner = Command::new("dpkg").args(["-S", "/usr/bin/lb"]).output().unwrap();
    assert!(
        !Path::new("/usr/bin/lb").exists() || String::from_utf8_lossy(&owner.stdout).starts_with("lb:"),
        "/usr/bin/lb exists and is not from the lb package: not touching it"
    );
    let _installed = Installed;
    run(Command::new("dpkg").arg("-i").arg(&deb));
    let out = run(Command::new("/usr/bin/lb").arg("check-config"));
    assert!(out.contains("/etc/lb/lb.toml: ok"), "the installed example is valid: {out}");
    let status = run(Command::new("dpkg-query").args(["-W", "-f", "${Status}", "lb"]));
    assert_eq!(status, "install ok installed");
    let verify =
        Command::new("systemd-analyze").args(["verify", "/usr/lib/systemd/system/lb.service"]).output().unwrap();
    let stderr = String::from_utf8_lossy(&verify.stderr);
    assert!(verify.status.success() && !stderr.contains("lb.service"), "installed unit: {stderr}");
    assert!(run(Command::new("man").args(["-w", "lb"])).contains("/usr/share/man/man1/lb.1"));
}
