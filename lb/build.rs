//! Records the commit `lb` was built from for `lb_build_info` (docs/operations.md): the
//! `LB_BUILD_COMMIT` environment variable if set (packaging from a tarball), else
//! `git rev-parse --short HEAD`, else "unknown" (no git, or not a checkout).

use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    if !out.status.success() {
        return None;
    }
    let s = String::from_utf8(out.stdout).ok()?.trim().to_string();
    (!s.is_empty()).then_some(s)
}

fn main() {
    println!("cargo:rerun-if-env-changed=LB_BUILD_COMMIT");
    // Rebuild when HEAD moves: HEAD itself (a branch switch), the branch's ref, packed refs.
    // A path that does not exist would make cargo rerun this script at every build.
    let mut watched: Vec<String> =
        ["HEAD", "packed-refs"].iter().filter_map(|p| git(&["rev-parse", "--git-path", p])).collect();
    watched.extend(git(&["symbolic-ref", "-q", "HEAD"]).and_then(|r| git(&["rev-parse", "--git-path", &r])));
    for path in watched.iter().filter(|p| std::path::Path::new(p).exists()) {
        println!("cargo:rerun-if-changed={path}");
    }
    let commit = std::env::var("LB_BUILD_COMMIT")
        .ok()
        .filter(|c| !c.is_empty())
        .or_else(|| git(&["rev-parse", "--short", "HEAD"]))
        .unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=LB_BUILD_COMMIT={commit}");
}
