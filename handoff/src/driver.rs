//! The Linux data-plane loop: one thread that polls NFQUEUE, the raw IP-in-IP sockets and a
//! wake-up pipe, runs the [`Engine`], and carries out its outputs in order.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixDatagram;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cluster_proto::{Action, Connection, ConnectionDatabase, ConnectionTable, MemberId};

use crate::classify::{Hook, View};
use crate::engine::{Engine, EngineStats, Output};
use crate::io::nfqueue::{self, NfQueue, NfVerdict, Queued};
use crate::io::raw::RawTunnel;
use crate::io::tun::Tun;

/// What the data plane needs from the control plane (the mesh).
pub trait ControlPlane: Send + Sync {
    /// This member.
    fn me(&self) -> MemberId;
    /// This member's connections.
    fn local(&self) -> &ConnectionTable;
    /// The other members' connections.
    fn database(&self) -> &ConnectionDatabase;
    /// Changes whenever the live members may have changed.
    fn membership_generation(&self) -> u64;
    /// This member and every peer with a joined channel.
    fn live_members(&self) -> Vec<MemberId>;
    /// Inserts a local connection and sends INSTALL to every peer.
    fn install(&self, connection: Connection, action: Action);
    /// Removes a local connection and sends REMOVE to every peer.
    fn remove(&self, connection: &Connection);
}

/// An intercepted packet: the kernel's handle and a copy of its bytes the engine may rewrite.
pub struct Pkt {
    queued: Queued,
    buf: Vec<u8>,
}

impl AsRef<[u8]> for Pkt {
    fn as_ref(&self) -> &[u8] {
        &self.buf
    }
}

impl AsMut<[u8]> for Pkt {
    fn as_mut(&mut self) -> &mut [u8] {
        &mut self.buf
    }
}

/// Wakes the data-plane thread when an INSTALL arrives for a flow with held packets.
#[derive(Clone)]
pub struct Waker {
    pending: Arc<Mutex<Vec<Connection>>>,
    holding: Arc<AtomicUsize>,
    tx: Arc<UnixDatagram>,
}

impl Waker {
    /// Called for every INSTALL a peer sends: one atomic load unless packets are held.
    pub fn on_install(&self, c: &Connection) {
        if self.holding.load(Ordering::Acquire) == 0 {
            return;
        }
        let mut p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        p.push(*c);
        if p.len() == 1 {
            let _ = self.tx.send(&[1]);
        }
    }
}

/// The data plane's devices.
pub struct Devices {
    /// Interception.
    pub queue: NfQueue,
    /// IP-in-IP to and from members.
    pub tunnel: RawTunnel,
    /// Injection of decapsulated packets.
    pub tun: Tun,
}

/// Counters the driver publishes for metrics.
#[derive(Clone, Debug, Default)]
pub struct DriverStats {
    /// The engine's counters.
    pub engine: EngineStats,
    /// Packets in the hold queue now.
    pub held: usize,
    /// Errors sending to the tunnel or the TUN device, giving verdicts, or receiving.
    pub io_errors: u64,
    /// Packets the kernel let through unseen because the queue's socket buffer was full
    /// (fail-open; [`NfQueue::overflowed`]).
    pub queue_overflowed: u64,
    /// True while the driver thread runs.
    pub running: bool,
}

/// The data-plane thread's state.
pub struct Driver {
    engine: Engine<Pkt>,
    dev: Devices,
    waker: Waker,
    rx: UnixDatagram,
    stats: Arc<Mutex<DriverStats>>,
    io_errors: u64,
    fast_path_mark: u32,
    /// The overflow count when it was last logged, and when.
    overflow_reported: u64,
    overflow_logged: Option<Instant>,
    /// Buffers for queued packets' bytes, given back after their verdict.
    bufs: Vec<Vec<u8>>,
}

/// poll(2) on a fixed set of descriptors; on the stack, no allocation per loop.
fn poll<const N: usize>(fds: &[RawFd; N], timeout: Duration) -> io::Result<[bool; N]> {
    let mut p = fds.map(|fd| libc::pollfd { fd, events: libc::POLLIN, revents: 0 });
    let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
    // SAFETY: `p` is a valid array of pollfd for the duration of the call.
    let n = unsafe { libc::poll(p.as_mut_ptr(), N as libc::nfds_t, ms) };
    if n < 0 {
        let e = io::Error::last_os_error();
        if e.kind() == io::ErrorKind::Interrupted {
            return Ok([false; N]);
        }
        return Err(e);
    }
    Ok(p.map(|x| x.revents & (libc::POLLIN | libc::POLLERR | libc::POLLHUP) != 0))
}

impl Driver {
    /// A driver over open devices.
    pub fn new(engine: Engine<Pkt>, dev: Devices) -> io::Result<Driver> {
        let (tx, rx) = UnixDatagram::pair()?;
        rx.set_nonblocking(true)?;
        tx.set_nonblocking(true)?;
        let waker = Waker {
            pending: Arc::new(Mutex::new(Vec::new())),
            holding: Arc::new(AtomicUsize::new(0)),
            tx: Arc::new(tx),
        };
        Ok(Driver {
            engine,
            dev,
            waker,
            rx,
            stats: Arc::new(Mutex::new(DriverStats::default())),
            io_errors: 0,
            fast_path_mark: 0,
            overflow_reported: 0,
            overflow_logged: None,
            bufs: Vec::new(),
        })
    }

    /// Marks accepted packets of local flows with these mark bits (0, the default: never),
    /// for the kernel fast path: a later netfilter chain adds the packet's flow to a timed
    /// set and clears the bits, and later packets of flows in the set skip the queue until
    /// the entry times out (lb's `rules.rs`).
    pub fn with_fast_path_mark(mut self, bits: u32) -> Driver {
        self.fast_path_mark = bits;
        self
    }

    /// The handle to give the mesh's install listener.
    pub fn waker(&self) -> Waker {
        self.waker.clone()
    }

    /// Where the driver publishes its counters.
    pub fn stats(&self) -> Arc<Mutex<DriverStats>> {
        self.stats.clone()
    }

    /// Runs until `stop` is set (checked at least every 100 ms).
    pub fn run(mut self, cp: &dyn ControlPlane, stop: &AtomicBool) -> io::Result<()> {
        let mut live = cp.live_members();
        let mut generation = cp.membership_generation();
        let mut out: Vec<Output<Pkt>> = Vec::with_capacity(64);
        let mut batch: Vec<(Pkt, Hook)> = Vec::with_capacity(32);
        let mut buf = vec![0u8; 65_536];
        let [t4, t41] = self.dev.tunnel.raw_fds();
        let fds = [self.dev.queue.raw_fd(), t4, t41, self.rx.as_raw_fd()];
        let mut last_publish = Instant::now();
        self.stats.lock().unwrap_or_else(|e| e.into_inner()).running = true;
        // Cleared however the loop ends, a panic included: `running` feeds lb_dataplane_up.
        let _running = Running(self.stats.clone());
        let result = self.run_loop(
            cp,
            stop,
            &mut live,
            &mut generation,
            &mut out,
            &mut batch,
            &mut buf,
            &fds,
            &mut last_publish,
        );
        self.publish();
        result
    }

    #[allow(clippy::too_many_arguments)]
    fn run_loop(
        &mut self,
        cp: &dyn ControlPlane,
        stop: &AtomicBool,
        live: &mut Vec<MemberId>,
        generation: &mut u64,
        out: &mut Vec<Output<Pkt>>,
        batch: &mut Vec<(Pkt, Hook)>,
        buf: &mut [u8],
        fds: &[RawFd; 4],
        last_publish: &mut Instant,
    ) -> io::Result<()> {
        while !stop.load(Ordering::Relaxed) {
            let now = Instant::now();
            let timeout = self.engine.next_timeout(now).saturating_duration_since(now).min(Duration::from_millis(100));
            let ready = poll(fds, timeout)?;
            let g = cp.membership_generation();
            if g != *generation {
                *generation = g;
                *live = cp.live_members();
            }
            let view = View { me: cp.me(), local: cp.local(), db: cp.database(), live };
            if ready[0] {
                // Drain bounded batches, so the tunnel and wake-ups get their turn; a batch is
                // classified with its database entries prefetched together.
                for _ in 0..8 {
                    while batch.len() < 32 {
                        // A receive error (e.g. ENOBUFS when the kernel dropped queued
                        // packets) is counted and survived: --queue-bypass keeps traffic
                        // flowing meanwhile.
                        let q = match self.dev.queue.recv_timeout(Duration::ZERO) {
                            Ok(Some(q)) => q,
                            Ok(None) => break,
                            Err(e) => {
                                self.receive_error("NFQUEUE", &e);
                                break;
                            }
                        };
                        let hook = match q.hook() {
                            nfqueue::Hook::Prerouting => Hook::Prerouting,
                            nfqueue::Hook::Output => Hook::Output,
                            nfqueue::Hook::Other(_) => {
                                self.verdict(q, NfVerdict::Accept);
                                continue;
                            }
                        };
                        let mut buf = self.bufs.pop().unwrap_or_default();
                        buf.extend_from_slice(q.payload());
                        batch.push((Pkt { queued: q, buf }, hook));
                    }
                    if batch.is_empty() {
                        break;
                    }
                    self.engine.handle_batch(Instant::now(), &view, batch, out);
                    self.after_holds(&view, out);
                    self.carry_out(cp, out);
                }
            }
            if ready[1] || ready[2] {
                for _ in 0..256 {
                    let r = match self.dev.tunnel.recv_timeout(buf, Duration::ZERO) {
                        Ok(Some(r)) => r,
                        Ok(None) => break,
                        Err(e) => {
                            self.receive_error("tunnel", &e);
                            break;
                        }
                    };
                    self.engine.handle_tunnel(Instant::now(), &view, r.outer_src, &buf[r.inner.clone()], out);
                    self.carry_out(cp, out);
                }
            }
            if ready[3] {
                let mut b = [0u8; 64];
                while self.rx.recv(&mut b).is_ok() {}
                let pending = std::mem::take(&mut *self.waker.pending.lock().unwrap_or_else(|e| e.into_inner()));
                for c in pending {
                    if self.engine.is_holding(&c) {
                        self.engine.on_install(Instant::now(), &view, &c, out);
                    }
                }
                self.carry_out(cp, out);
            }
            self.engine.poll(Instant::now(), &view, out);
            self.carry_out(cp, out);
            self.waker.holding.store(self.engine.held(), Ordering::Release);
            if last_publish.elapsed() >= Duration::from_millis(100) {
                self.publish();
                *last_publish = Instant::now();
            }
        }
        Ok(())
    }

    /// Closes the race between holding a packet and its INSTALL arriving: once the waker
    /// knows packets are held, flows the database already knows are released at once.
    fn after_holds(&mut self, view: &View, out: &mut Vec<Output<Pkt>>) {
        let held = self.engine.take_newly_held();
        if held.is_empty() {
            return;
        }
        self.waker.holding.store(self.engine.held().max(1), Ordering::Release);
        for c in held {
            if view.db.owner_of(&c).is_some() || view.local.lookup(&c).is_some() {
                self.engine.on_install(Instant::now(), view, &c, out);
            }
        }
    }

    fn receive_error(&mut self, what: &str, e: &io::Error) {
        self.io_errors += 1;
        // One line per hundred, so a storm of errors does not flood the log.
        if self.io_errors % 100 == 1 {
            tracing::warn!(error = %e, source = what, errors = self.io_errors, "data plane receive error (continuing)");
        }
    }

    fn verdict(&mut self, q: Queued, v: NfVerdict) {
        if self.dev.queue.verdict(q, v).is_err() {
            self.io_errors += 1;
        }
    }

    fn carry_out(&mut self, cp: &dyn ControlPlane, out: &mut Vec<Output<Pkt>>) {
        for o in out.drain(..) {
            match o {
                Output::Install { connection, action } => cp.install(connection, action),
                Output::Remove { connection } => cp.remove(&connection),
                Output::Accept { packet, modified, local } => {
                    let Pkt { queued, buf } = packet;
                    // Only set here; the chain after the raw table clears it once it has
                    // refreshed the flow's entry in the fast path's set.
                    let mark = (local && self.fast_path_mark != 0).then(|| queued.mark() | self.fast_path_mark);
                    let v = if modified {
                        NfVerdict::AcceptModified(buf)
                    } else {
                        self.recycle(buf);
                        NfVerdict::Accept
                    };
                    if self.dev.queue.verdict_with_mark(queued, v, mark).is_err() {
                        self.io_errors += 1;
                    }
                }
                Output::Drop { packet } => {
                    let Pkt { queued, buf } = packet;
                    self.recycle(buf);
                    if self.dev.queue.verdict(queued, NfVerdict::Drop).is_err() {
                        self.io_errors += 1;
                    }
                }
                Output::Send { outer, .. } => {
                    if self.dev.tunnel.send(&outer).is_err() {
                        self.io_errors += 1;
                    }
                    self.engine.recycle(outer);
                }
                Output::Inject { packet } => {
                    if self.dev.tun.write(&packet).is_err() {
                        self.io_errors += 1;
                    }
                    self.engine.recycle(packet);
                }
            }
        }
    }

    /// Keeps a packet buffer for the next queued packet (a burst's worth at most).
    fn recycle(&mut self, mut buf: Vec<u8>) {
        if self.bufs.len() < 512 {
            buf.clear();
            self.bufs.push(buf);
        }
    }

    fn publish(&mut self) {
        let overflowed = self.dev.queue.overflowed();
        if overflowed > self.overflow_reported {
            // At most one line per 10 s, with how many passed unseen since the last one.
            let now = Instant::now();
            if self.overflow_logged.is_none_or(|t| now.duration_since(t) >= Duration::from_secs(10)) {
                tracing::warn!(
                    queue = self.dev.queue.queue_num(),
                    unseen = overflowed - self.overflow_reported,
                    total = overflowed,
                    "NFQUEUE socket buffer full: packets passed unseen (fail-open); forwarded flows among them \
                     went to the wrong place. Raise [dataplane] queue_buffer_bytes"
                );
                self.overflow_reported = overflowed;
                self.overflow_logged = Some(now);
            }
        }
        let mut s = self.stats.lock().unwrap_or_else(|e| e.into_inner());
        s.engine = self.engine.stats();
        s.held = self.engine.held();
        s.io_errors = self.io_errors + self.dev.queue.verdict_errors();
        s.queue_overflowed = overflowed;
    }
}

/// Marks the driver stopped when dropped, also while a panic unwinds the driver thread.
struct Running(Arc<Mutex<DriverStats>>);

impl Drop for Running {
    fn drop(&mut self) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).running = false;
    }
}
