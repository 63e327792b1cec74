//! NFQUEUE interception: the kernel hands candidate packets to the daemon, which returns a
//! verdict for each (DESIGN.md, "One packet's way through a member", step 1).
//!
//! Built on the `nfq` crate (pure Rust netlink, no libnetfilter_queue). Two kernel mechanisms
//! keep traffic flowing when the daemon cannot keep up or is gone:
//!
//! - fail-open (`NFQA_CFG_F_FAIL_OPEN`, set by [`NfQueue::open`]): when the kernel-side queue
//!   is full (see [`NfQueue::set_max_len`], 1024 packets by default), or the socket's receive
//!   buffer is (see [`NfQueue::set_socket_buffer`]), new packets are accepted unseen instead of
//!   dropped; the second case is counted ([`NfQueue::overflowed`]), the first is not;
//! - `--queue-bypass` on the iptables rule: while no socket is bound to the queue number,
//!   packets pass as if the rule were not there.
//!
//! Packets still waiting for a verdict when the `NfQueue` is dropped are dropped by the kernel.

use std::collections::HashSet;
use std::fs;
use std::io;
use std::os::fd::RawFd;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::raw::poll_readable;

/// The netfilter hook a queued packet was taken from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Hook {
    /// NF_INET_PRE_ROUTING (0): arriving from the network, before the routing decision.
    Prerouting,
    /// NF_INET_LOCAL_OUT (3): sent by a local process, e.g. the on-box proxy.
    Output,
    /// Any other hook, by its number.
    Other(u8),
}

impl Hook {
    /// Maps the kernel's hook number.
    pub fn from_raw(hook: u8) -> Hook {
        match hook {
            0 => Hook::Prerouting,
            3 => Hook::Output,
            other => Hook::Other(other),
        }
    }
}

/// What the kernel does with a queued packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NfVerdict {
    /// Let the packet continue unchanged.
    Accept,
    /// Let the packet continue with these bytes instead (a complete IP packet whose checksums
    /// the caller has fixed up).
    AcceptModified(Vec<u8>),
    /// Discard the packet.
    Drop,
}

/// A packet waiting in the kernel for its verdict; hand it back through [`NfQueue::verdict`].
#[derive(Debug)]
pub struct Queued {
    msg: nfq::Message,
}

impl Queued {
    /// The packet, starting at its IP header.
    pub fn payload(&self) -> &[u8] {
        self.msg.get_payload()
    }

    /// The hook the packet was queued from.
    pub fn hook(&self) -> Hook {
        Hook::from_raw(self.msg.get_hook())
    }

    /// The index of the interface the packet arrived on (none for locally sent packets).
    pub fn indev(&self) -> Option<u32> {
        Some(self.msg.get_indev()).filter(|&i| i != 0)
    }

    /// The index of the interface the packet leaves by (none before routing, e.g. PREROUTING).
    pub fn outdev(&self) -> Option<u32> {
        Some(self.msg.get_outdev()).filter(|&i| i != 0)
    }

    /// The kernel's id for this packet within its queue.
    pub fn id(&self) -> u32 {
        self.msg.get_packet_id()
    }

    /// The queue number the packet came from.
    pub fn queue_num(&self) -> u16 {
        self.msg.get_queue_num()
    }

    /// The packet's mark (skb->mark) as it was queued.
    pub fn mark(&self) -> u32 {
        self.msg.get_nfmark()
    }

    /// The packet's length on the wire; larger than `payload().len()` only if it was truncated.
    pub fn original_len(&self) -> usize {
        self.msg.get_original_len()
    }
}

/// A bound NFQUEUE: receives the packets iptables/nftables rules send to its number.
///
/// Bound in the network namespace of the thread that calls [`NfQueue::open`].
pub struct NfQueue {
    queue: nfq::Queue,
    queue_num: u16,
    /// The netlink socket inside `queue`, found by [`find_new_socket`]; owned by `queue`.
    fd: RawFd,
    verdict_errors: u64,
}

impl std::fmt::Debug for NfQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NfQueue").field("queue_num", &self.queue_num).field("fd", &self.fd).finish()
    }
}

/// Serializes [`NfQueue::open`] so that a new netlink socket is ours and not a sibling's.
static OPEN_LOCK: Mutex<()> = Mutex::new(());

impl NfQueue {
    /// Binds queue `queue_num` in copy-packet mode (whole packets up to 65535 bytes) with
    /// fail-open set. Needs CAP_NET_ADMIN.
    ///
    /// Fails with `AddrInUse` if another socket already holds that queue number, and with
    /// `PermissionDenied` without CAP_NET_ADMIN.
    pub fn open(queue_num: u16) -> io::Result<Self> {
        let (mut queue, fd) = {
            let _serial = OPEN_LOCK.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            let before = netfilter_sockets()?.into_iter().map(|(_, inode)| inode).collect::<HashSet<_>>();
            let queue = nfq::Queue::open().map_err(|e| context(e, "open a NETLINK_NETFILTER socket"))?;
            let fd = find_new_socket(&before)?;
            (queue, fd)
        };
        // nfq opens its socket without close-on-exec; don't leak it into `ip`/`iptables` children.
        // SAFETY: fd is the open netlink socket owned by `queue`.
        unsafe {
            let flags = libc::fcntl(fd, libc::F_GETFD);
            if flags < 0 || libc::fcntl(fd, libc::F_SETFD, flags | libc::FD_CLOEXEC) < 0 {
                return Err(io::Error::last_os_error());
            }
        }
        queue.bind(queue_num).map_err(|e| match (e.raw_os_error(), bound_by(queue_num)) {
            // The kernel answers EPERM both to a caller without CAP_NET_ADMIN and to a bind of a
            // queue number that another socket holds; its queue list tells the two apart.
            (Some(libc::EPERM), Some(portid)) => io::Error::new(
                io::ErrorKind::AddrInUse,
                format!("NFQUEUE {queue_num} is already bound by netlink port {portid} (another daemon running?)"),
            ),
            (Some(libc::EPERM), None) => io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!("binding NFQUEUE {queue_num} needs CAP_NET_ADMIN in this network namespace"),
            ),
            _ => context(e, &format!("bind NFQUEUE {queue_num}")),
        })?;
        queue
            .set_fail_open(queue_num, true)
            .map_err(|e| context(e, &format!("set fail-open on NFQUEUE {queue_num}")))?;
        queue.set_nonblocking(true);
        Ok(NfQueue { queue, queue_num, fd, verdict_errors: 0 })
    }

    /// The queue number this socket is bound to.
    pub fn queue_num(&self) -> u16 {
        self.queue_num
    }

    /// The netlink socket's descriptor, for an outside poll loop; then call `recv_timeout`
    /// with a zero timeout until it returns `None`.
    pub fn raw_fd(&self) -> RawFd {
        self.fd
    }

    /// How many verdicts the kernel refused so far (it no longer held a packet with that id).
    pub fn verdict_errors(&self) -> u64 {
        self.verdict_errors
    }

    /// Sets how many packets the kernel holds for this queue before fail-open lets new ones
    /// pass unseen.
    pub fn set_max_len(&mut self, packets: u32) -> io::Result<()> {
        self.queue
            .set_queue_max_len(self.queue_num, packets)
            .map_err(|e| context(e, &format!("set max length of NFQUEUE {}", self.queue_num)))
    }

    /// Sizes the socket's receive buffer, where the kernel puts queued packets until the
    /// daemon reads them; returns the size the kernel granted (it counts bookkeeping too, so
    /// about twice the request). Past the netlink default (about 208 KiB) this takes
    /// `SO_RCVBUFFORCE`, which CAP_NET_ADMIN allows beyond `net.core.rmem_max`.
    ///
    /// The buffer, not the queue length, is what a burst fills first: each queued packet
    /// occupies its whole size (a segmented GRO train arrives as many), and when the buffer is
    /// full fail-open lets packets pass unseen, see [`NfQueue::overflowed`].
    pub fn set_socket_buffer(&mut self, bytes: usize) -> io::Result<usize> {
        let want = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
        let set = |opt| {
            // SAFETY: fd is the open netlink socket owned by `self.queue`; the value outlives the call.
            let rc = unsafe {
                libc::setsockopt(
                    self.fd,
                    libc::SOL_SOCKET,
                    opt,
                    (&want as *const libc::c_int).cast(),
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                )
            };
            if rc == 0 {
                Ok(())
            } else {
                Err(io::Error::last_os_error())
            }
        };
        set(libc::SO_RCVBUFFORCE)
            .or_else(|_| set(libc::SO_RCVBUF))
            .map_err(|e| context(e, &format!("size the socket buffer of NFQUEUE {}", self.queue_num)))?;
        // SAFETY: getsockopt only reads the socket's state.
        Ok(unsafe { sockopt_int(self.fd, libc::SO_RCVBUF) }.map_or(0, |v| v.max(0) as usize))
    }

    /// Packets the kernel could not deliver to this socket because its receive buffer was full,
    /// since it was opened. With fail-open they were accepted unseen: a packet of a flow owned
    /// by another member then goes where the routing table sends it instead of to its owner.
    ///
    /// The kernel counts them on the socket (`sk_drops`, read with `SO_MEMINFO`); the netlink
    /// error that would otherwise announce them is off (`NETLINK_NO_ENOBUFS`, set by nfq).
    pub fn overflowed(&self) -> u64 {
        /// Index of the drop counter in the `SO_MEMINFO` array (`SK_MEMINFO_DROPS`, linux/sock_diag.h).
        const SK_MEMINFO_DROPS: usize = 8;
        let mut info = [0u32; 9];
        let mut len = std::mem::size_of_val(&info) as libc::socklen_t;
        // SAFETY: the kernel writes at most `len` bytes into `info`.
        let rc = unsafe {
            libc::getsockopt(self.fd, libc::SOL_SOCKET, libc::SO_MEMINFO, info.as_mut_ptr().cast(), &mut len)
        };
        if rc != 0 || (len as usize) < (SK_MEMINFO_DROPS + 1) * 4 {
            return 0;
        }
        u64::from(info[SK_MEMINFO_DROPS])
    }

    /// Waits up to `timeout` for the next queued packet; `None` when the time ran out.
    pub fn recv_timeout(&mut self, timeout: Duration) -> io::Result<Option<Queued>> {
        let deadline = Instant::now().checked_add(timeout);
        loop {
            // Try first: nfq may hold messages from an earlier read that poll(2) cannot see.
            match self.queue.recv() {
                Ok(msg) => return Ok(Some(Queued { msg })),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock || e.kind() == io::ErrorKind::Interrupted => {}
                // Verdicts go out without an ACK request; the kernel still reports a refused one
                // (ENOENT: no packet with that id) on the socket. Nothing to undo: count it.
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                    self.verdict_errors += 1;
                    tracing::warn!(queue = self.queue_num, "kernel refused a verdict: no packet with that id");
                    continue;
                }
                Err(e) => return Err(context(e, &format!("receive from NFQUEUE {}", self.queue_num))),
            }
            let remaining = match deadline {
                Some(deadline) => match deadline.checked_duration_since(Instant::now()) {
                    Some(remaining) if !remaining.is_zero() => Some(remaining),
                    _ => return Ok(None),
                },
                None => None,
            };
            poll_readable([self.fd], remaining)?;
        }
    }

    /// Returns `q` to the kernel with verdict `v`.
    pub fn verdict(&mut self, q: Queued, v: NfVerdict) -> io::Result<()> {
        self.verdict_with_mark(q, v, None)
    }

    /// Returns `q` to the kernel with verdict `v`, and with its whole packet mark set to
    /// `mark` if given (the kernel replaces skb->mark; keep the bits of [`Queued::mark`]).
    pub fn verdict_with_mark(&mut self, q: Queued, v: NfVerdict, mark: Option<u32>) -> io::Result<()> {
        if q.queue_num() != self.queue_num {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("packet from NFQUEUE {} given to NFQUEUE {}", q.queue_num(), self.queue_num),
            ));
        }
        let mut msg = q.msg;
        if let Some(mark) = mark {
            msg.set_nfmark(mark);
        }
        match v {
            NfVerdict::Accept => msg.set_verdict(nfq::Verdict::Accept),
            NfVerdict::AcceptModified(packet) => {
                if packet.len() > usize::from(u16::MAX) {
                    return Err(io::Error::new(io::ErrorKind::InvalidInput, "modified packet over 65535 bytes"));
                }
                msg.set_payload(packet);
                msg.set_verdict(nfq::Verdict::Accept);
            }
            NfVerdict::Drop => msg.set_verdict(nfq::Verdict::Drop),
        }
        self.queue.verdict(msg).map_err(|e| context(e, &format!("send verdict to NFQUEUE {}", self.queue_num)))
    }
}

/// The netlink port bound to `queue_num` in the calling thread's network namespace, if any.
fn bound_by(queue_num: u16) -> Option<u32> {
    // One line per bound queue: queue number, peer port id, then counters.
    let table = fs::read_to_string("/proc/thread-self/net/netfilter/nfnetlink_queue").ok()?;
    table.lines().find_map(|line| {
        let mut fields = line.split_whitespace().map(str::parse::<u32>);
        match (fields.next(), fields.next()) {
            (Some(Ok(num)), Some(Ok(portid))) if num == u32::from(queue_num) => Some(portid),
            _ => None,
        }
    })
}

/// Every open NETLINK_NETFILTER socket of this process, as (descriptor, socket inode).
fn netfilter_sockets() -> io::Result<Vec<(RawFd, u64)>> {
    let mut found = Vec::new();
    for entry in fs::read_dir("/proc/self/fd")? {
        let Ok(fd) = entry?.file_name().to_string_lossy().parse::<RawFd>() else { continue };
        // SAFETY: fstat/getsockopt only read; a descriptor closed meanwhile just fails.
        unsafe {
            let mut st: libc::stat = std::mem::zeroed();
            if libc::fstat(fd, &mut st) != 0 || st.st_mode & libc::S_IFMT != libc::S_IFSOCK {
                continue;
            }
            if sockopt_int(fd, libc::SO_DOMAIN) == Some(libc::AF_NETLINK)
                && sockopt_int(fd, libc::SO_PROTOCOL) == Some(libc::NETLINK_NETFILTER)
            {
                found.push((fd, st.st_ino));
            }
        }
    }
    Ok(found)
}

/// The descriptor of the one NETLINK_NETFILTER socket that is not in `before`.
///
/// nfq 0.2.5 does not expose its socket (its unreleased successor converts to and from
/// `OwnedFd`), yet a poll loop needs it. `open` holds [`OPEN_LOCK`] around creating the socket
/// and this search, so only a netfilter socket opened concurrently by other code in the
/// process could make it ambiguous, and that is reported instead of guessed.
fn find_new_socket(before: &HashSet<u64>) -> io::Result<RawFd> {
    let new: Vec<RawFd> =
        netfilter_sockets()?.into_iter().filter(|(_, inode)| !before.contains(inode)).map(|(fd, _)| fd).collect();
    match new[..] {
        [fd] => Ok(fd),
        _ => Err(io::Error::other(format!("cannot tell the NFQUEUE socket among {} new netlink sockets", new.len()))),
    }
}

/// getsockopt(SOL_SOCKET, opt) as an int.
unsafe fn sockopt_int(fd: RawFd, opt: libc::c_int) -> Option<libc::c_int> {
    let mut value: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    let rc = libc::getsockopt(fd, libc::SOL_SOCKET, opt, (&mut value as *mut libc::c_int).cast(), &mut len);
    (rc == 0).then_some(value)
}

fn context(e: io::Error, what: &str) -> io::Error {
    io::Error::new(e.kind(), format!("{what}: {e}"))
}
