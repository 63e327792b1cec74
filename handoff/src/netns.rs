//! Named network namespaces for real-kernel tests and the demo (needs root and `ip`).
//!
//! A [`Netns`] is created with a name unique to this process and run (`PREFIX-PID-N`), so tests
//! can run in parallel and side by side with other test runs, and is deleted when dropped,
//! also when a test fails. [`veth`] joins two namespaces without anything ever appearing in the
//! namespace the caller runs in. [`Netns::enter`] moves only the calling thread, so sockets,
//! NFQUEUE bindings and TUN devices opened while entered live in the namespace while the rest
//! of the process stays where it is.

use std::fs::File;
use std::io;
use std::marker::PhantomData;
use std::os::fd::AsRawFd;
use std::process::{Child, Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};

/// Counter that makes namespace names unique within this process.
static NEXT_ID: AtomicU32 = AtomicU32::new(0);

/// A named network namespace (`/run/netns/NAME`), deleted with `ip netns del` on drop.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates `PREFIX-PID-N` with `ip netns add` and brings its `lo` up.
    pub fn new(prefix: &str) -> io::Result<Netns> {
        let valid = |c: char| c.is_ascii_alphanumeric() || c == '-' || c == '_';
        if prefix.is_empty() || !prefix.chars().all(valid) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("netns prefix {prefix:?} must be non-empty ASCII letters, digits, '-' or '_'"),
            ));
        }
        let n = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        let name = format!("{prefix}-{}-{n}", std::process::id());
        run(Command::new("ip").args(["netns", "add", &name]))?;
        // From here on the guard exists, so a failure below still deletes the namespace.
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// The namespace's name, as `ip netns` knows it.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs `ip netns exec NAME ARGS...` and returns its output whatever its exit status.
    pub fn exec(&self, args: &[&str]) -> io::Result<Output> {
        if args.is_empty() {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "Netns::exec needs a program to run"));
        }
        Command::new("ip").args(["netns", "exec", &self.name]).args(args).output()
    }

    /// Runs `sh -c SCRIPT` in the namespace; returns its stdout, or an error carrying the exit
    /// status, stdout and stderr when it fails.
    pub fn sh(&self, script: &str) -> io::Result<String> {
        let out = self.exec(&["sh", "-c", script])?;
        checked(out, &format!("in netns {}: sh -c {script:?}", self.name))
    }

    /// Runs `ip -n NAME ARGS...` (faster than `exec`, no mount namespace) and checks its status.
    pub fn ip(&self, args: &[&str]) -> io::Result<String> {
        run(Command::new("ip").args(["-n", &self.name]).args(args))
    }

    /// Runs `f` on a scoped thread that has entered the namespace, and returns its result
    /// (the calling thread stays where it is). Panics in `f` propagate.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        std::thread::scope(|s| {
            s.spawn(|| {
                let _guard = self.enter().unwrap_or_else(|e| panic!("cannot enter namespace {}: {e}", self.name));
                f()
            })
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p))
        })
    }

    /// Moves the calling thread into the namespace until the returned guard is dropped.
    ///
    /// Only this thread moves (setns(2) on `/run/netns/NAME`); sockets it opens meanwhile stay
    /// in the namespace for their whole life, whichever thread uses them later.
    pub fn enter(&self) -> io::Result<NetnsGuard> {
        let original = File::open("/proc/thread-self/ns/net")?;
        let target = File::open(format!("/run/netns/{}", self.name))?;
        setns(&target)?;
        Ok(NetnsGuard { original, _not_send: PhantomData })
    }

    /// Spawns `cmd` inside the namespace (the child inherits the namespace of the spawning thread).
    ///
    /// Unlike `ip netns exec`, the child keeps the caller's mount namespace, so its `/sys` still
    /// shows the caller's interfaces; use [`Netns::exec`] for tools that read `/sys/class/net`.
    pub fn spawn(&self, cmd: &mut Command) -> io::Result<Child> {
        let _entered = self.enter()?;
        cmd.spawn()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Kills nothing: processes or sockets still inside keep the namespace alive until they
        // end, but its name and the mount under /run/netns disappear now.
        match Command::new("ip").args(["netns", "del", &self.name]).output() {
            Ok(out) if out.status.success() => {}
            Ok(out) => {
                eprintln!("ip netns del {}: {}", self.name, String::from_utf8_lossy(&out.stderr).trim())
            }
            Err(e) => eprintln!("ip netns del {}: {e}", self.name),
        }
    }
}

/// Keeps the calling thread inside a [`Netns`]; moves it back to its original namespace on drop.
///
/// Not `Send`: the namespace belongs to the thread that entered it.
#[derive(Debug)]
pub struct NetnsGuard {
    original: File,
    _not_send: PhantomData<*const ()>,
}

impl Drop for NetnsGuard {
    fn drop(&mut self) {
        if let Err(e) = setns(&self.original) {
            // A thread left in the wrong namespace would open later sockets there; never go on.
            eprintln!("cannot return the thread to its original network namespace: {e}");
            std::process::abort();
        }
    }
}

/// Creates a veth pair with `a_if` in `a` and `b_if` in `b`, and sets both up.
///
/// The pair is created inside `a` with its peer placed straight into `b`, so neither end ever
/// exists in the caller's namespace.
pub fn veth(a: &Netns, a_if: &str, b: &Netns, b_if: &str) -> io::Result<()> {
    a.ip(&["link", "add", a_if, "type", "veth", "peer", "name", b_if, "netns", b.name()])?;
    a.ip(&["link", "set", a_if, "up"])?;
    b.ip(&["link", "set", b_if, "up"])?;
    Ok(())
}

fn setns(ns: &File) -> io::Result<()> {
    // SAFETY: setns(2) takes a file descriptor we own for the duration of the call.
    if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn run(cmd: &mut Command) -> io::Result<String> {
    let what = format!("{cmd:?}");
    checked(cmd.output()?, &what)
}

fn checked(out: Output, what: &str) -> io::Result<String> {
    if out.status.success() {
        return Ok(String::from_utf8_lossy(&out.stdout).into_owned());
    }
    Err(io::Error::other(format!(
        "{what} failed ({}): stdout: {:?} stderr: {:?}",
        out.status,
        String::from_utf8_lossy(&out.stdout).trim(),
        String::from_utf8_lossy(&out.stderr).trim()
    )))
}
