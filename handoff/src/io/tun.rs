//! TUN device: where the owner injects decapsulated packets into its own stack.
//!
//! A packet written to the device is received by the kernel as if it had arrived on that
//! interface, so PREROUTING, TPROXY and routing take the inner packet of an IP-in-IP handoff
//! just like a packet straight from the client. The inner source is a client (or a spoofed)
//! address that is not reachable through the TUN device, so [`Tun::configure`] turns reverse
//! path filtering off for it.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::time::{Duration, Instant};

use super::raw::poll_readable;

/// A TUN interface (layer 3, no packet-information prefix) owned by this process.
///
/// The interface exists while this value lives (it is not made persistent).
#[derive(Debug)]
pub struct Tun {
    file: File,
    name: String,
    /// What [`Tun::configure`] changed outside the device, undone when the device goes.
    rp_filter: std::sync::Mutex<Option<RpFilterChange>>,
}

/// The namespace-wide reverse-path settings [`Tun::configure`] moved, to put back.
#[derive(Debug)]
struct RpFilterChange {
    /// The network namespace they belong to (inode of `/proc/thread-self/ns/net`).
    netns: u64,
    /// `conf/all/rp_filter` before.
    all: u32,
    /// Interfaces (and `default`) whose own value was raised to `all`, with their old value.
    raised: Vec<(std::path::PathBuf, u32)>,
}

fn current_netns() -> io::Result<u64> {
    use std::os::unix::fs::MetadataExt;
    Ok(fs::metadata("/proc/thread-self/ns/net")?.ino())
}

impl Drop for Tun {
    fn drop(&mut self) {
        let Some(change) = self.rp_filter.lock().unwrap_or_else(|e| e.into_inner()).take() else { return };
        // /proc/sys/net shows the calling thread's namespace: never write another one's.
        if current_netns().ok() != Some(change.netns) {
            tracing::warn!(tun = %self.name, "not in the TUN device's network namespace: conf/all/rp_filter left at 0");
            return;
        }
        let conf = "/proc/sys/net/ipv4/conf";
        // Strict again first, then each interface back to its own value.
        if let Err(e) = write_sysctl(&format!("{conf}/all/rp_filter"), change.all) {
            tracing::warn!(error = %e, "cannot restore conf/all/rp_filter");
            return;
        }
        for (path, old) in change.raised {
            // An interface that went away meanwhile has nothing to restore.
            let _ = write_sysctl(&path.to_string_lossy(), old);
        }
        tracing::info!(tun = %self.name, all = change.all, "conf/all/rp_filter restored");
    }
}

impl Tun {
    /// Creates (or attaches to) TUN interface `name` in the calling thread's network namespace.
    ///
    /// A name containing `%d` lets the kernel pick a free number; [`Tun::name`] tells which.
    pub fn open(name: &str) -> io::Result<Self> {
        if name.is_empty()
            || name.len() >= libc::IFNAMSIZ
            || name.contains(['\0', '/'])
            || name.contains(char::is_whitespace)
        {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("bad interface name {name:?} (1 to {} bytes, no '/', NUL or space)", libc::IFNAMSIZ - 1),
            ));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open("/dev/net/tun")
            .map_err(|e| io::Error::new(e.kind(), format!("open /dev/net/tun: {e}")))?;
        // SAFETY: ifreq is plain old data; all-zero is a valid value.
        let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
        for (dst, src) in ifr.ifr_name.iter_mut().zip(name.bytes()) {
            *dst = src as libc::c_char;
        }
        ifr.ifr_ifru.ifru_flags = (libc::IFF_TUN | libc::IFF_NO_PI) as libc::c_short;
        // SAFETY: TUNSETIFF reads and writes one ifreq, which lives across the call.
        if unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut ifr) } < 0 {
            let e = io::Error::last_os_error();
            return Err(io::Error::new(e.kind(), format!("TUNSETIFF {name}: {e}")));
        }
        let name = ifr.ifr_name.iter().take_while(|&&c| c != 0).map(|&c| c as u8 as char).collect();
        Ok(Tun { file, name, rp_filter: std::sync::Mutex::new(None) })
    }

    /// The interface's name as the kernel gave it.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Brings the interface up, sets `rp_filter=0` and `accept_local=1` on it (IPv4).
    ///
    /// Runs in the calling thread's network namespace, which must be the one the device was
    /// opened in. The kernel filters with the larger of `conf/all/rp_filter` and the
    /// interface's own value, so when `all` is stricter than 0 this lowers `all` to 0 after
    /// raising every other interface's own value (and `default`) to the old `all`: the other
    /// interfaces keep filtering exactly as before and only this one stops. Dropping the
    /// device puts `all` and the raised values back (when dropped in the same namespace).
    pub fn configure(&self) -> io::Result<()> {
        set_up(&self.name)?;
        let conf = "/proc/sys/net/ipv4/conf";
        write_sysctl(&format!("{conf}/{}/rp_filter", self.name), 0)?;
        write_sysctl(&format!("{conf}/{}/accept_local", self.name), 1)?;
        let all = read_sysctl(&format!("{conf}/all/rp_filter"))?;
        if all == 0 {
            return Ok(());
        }
        let mut change = RpFilterChange { netns: current_netns()?, all, raised: Vec::new() };
        for entry in fs::read_dir(conf)? {
            let entry = entry?;
            let ifname = entry.file_name();
            if ifname == "all" || ifname == self.name.as_str() {
                continue;
            }
            let path = entry.path().join("rp_filter");
            match read_sysctl(&path.to_string_lossy()) {
                Ok(own) if own < all => {
                    write_sysctl(&path.to_string_lossy(), all)?;
                    change.raised.push((path, own));
                }
                Ok(_) => {}
                // The interface disappeared while we walked the directory.
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        // From here on, dropping the device puts everything back.
        *self.rp_filter.lock().unwrap_or_else(|e| e.into_inner()) = Some(change);
        write_sysctl(&format!("{conf}/all/rp_filter"), 0)?;
        tracing::info!(tun = %self.name, old_all = all, "moved conf/all/rp_filter onto each interface so the TUN device can be exempt");
        Ok(())
    }

    /// Injects one IP packet into the stack as if it had been received on this interface.
    ///
    /// The interface must be up (the kernel answers `EIO` otherwise).
    pub fn write(&mut self, packet: &[u8]) -> io::Result<()> {
        if packet.is_empty() {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "empty packet"));
        }
        let written = self.file.write(packet)?;
        if written != packet.len() {
            return Err(io::Error::other(format!("TUN took {written} of {} bytes", packet.len())));
        }
        Ok(())
    }

    /// Waits up to `timeout` for a packet the stack routed out of this interface and copies it
    /// into `buf`; `None` when the time ran out. A packet longer than `buf` is truncated, so
    /// size `buf` for the interface's MTU.
    pub fn read_timeout(&mut self, buf: &mut [u8], timeout: Duration) -> io::Result<Option<usize>> {
        let deadline = Instant::now().checked_add(timeout);
        loop {
            match self.file.read(buf) {
                Ok(n) => return Ok(Some(n)),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock || e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
            let remaining = match deadline {
                Some(deadline) => match deadline.checked_duration_since(Instant::now()) {
                    Some(remaining) if !remaining.is_zero() => Some(remaining),
                    _ => return Ok(None),
                },
                None => None,
            };
            poll_readable([self.file.as_raw_fd()], remaining)?;
        }
    }
}

impl AsFd for Tun {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}

impl AsRawFd for Tun {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

/// Sets IFF_UP on an interface of the calling thread's namespace.
fn set_up(name: &str) -> io::Result<()> {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None)?;
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in ifr.ifr_name.iter_mut().zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS/SIOCSIFFLAGS read and write one ifreq, which lives across the calls.
    unsafe {
        if libc::ioctl(socket.as_raw_fd(), libc::SIOCGIFFLAGS, &mut ifr) < 0 {
            return Err(io::Error::last_os_error());
        }
        ifr.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
        if libc::ioctl(socket.as_raw_fd(), libc::SIOCSIFFLAGS, &mut ifr) < 0 {
            let e = io::Error::last_os_error();
            return Err(io::Error::new(e.kind(), format!("set {name} up: {e}")));
        }
    }
    Ok(())
}

fn read_sysctl(path: &str) -> io::Result<u32> {
    let text = fs::read_to_string(path)?;
    text.trim().parse().map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("{path}: {text:?}: {e}")))
}

fn write_sysctl(path: &str, value: u32) -> io::Result<()> {
    fs::write(path, format!("{value}\n")).map_err(|e| io::Error::new(e.kind(), format!("write {path}: {e}")))
}
