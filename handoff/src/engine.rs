//! The data-plane engine: classification, hold queue, connection tracking and IP-in-IP put
//! together, still without I/O. The driver feeds it intercepted packets, tunnel packets,
//! INSTALL notifications and the time, and carries out the [`Output`]s in order. The order
//! matters: an [`Output::Install`] always comes before the release of the packet that
//! caused it, so peers are told before the packet leaves (paper 2.4).

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use cluster_proto::{Action, Connection, MemberId};

use crate::classify::{Classifier, Decision, Hook, Reason, Verdict, View};
use crate::encap::encapsulate;
use crate::hold::{HoldQueue, HoldStats};
use crate::mss;
use crate::packet::{parse, Parsed};
use crate::track::{TrackConfig, Tracker};

/// What the driver must do, in this order.
#[derive(Debug, PartialEq, Eq)]
pub enum Output<T> {
    /// Insert the connection in the local table and send INSTALL to every peer.
    Install {
        /// The connection.
        connection: Connection,
        /// FORWARD or BYPASS.
        action: Action,
    },
    /// Remove a local connection that has ended and send REMOVE to every peer.
    Remove {
        /// The connection, as installed.
        connection: Connection,
    },
    /// Let the intercepted packet continue; `modified` when its bytes were changed (MSS).
    Accept {
        /// The packet.
        packet: T,
        /// True when the bytes were rewritten and must be handed back.
        modified: bool,
        /// True when the packet belongs to one of this member's own flows and was classified
        /// on arrival (not released from the hold queue): the flow's later packets may skip
        /// user space (the NFQUEUE backend marks the packet for the kernel fast path).
        local: bool,
    },
    /// Drop the intercepted packet (it was encapsulated, or is unknown after its hold time).
    Drop {
        /// The packet.
        packet: T,
    },
    /// Send this IP-in-IP packet (a complete outer packet) to a member.
    Send {
        /// The member's address (outer destination).
        to: IpAddr,
        /// The outer packet.
        outer: Vec<u8>,
    },
    /// Inject this decapsulated packet into the local stack (TUN).
    Inject {
        /// The inner packet.
        packet: Vec<u8>,
    },
}

/// Settings of the engine.
#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// This member's cluster address (outer source of IP-in-IP).
    pub address: IpAddr,
    /// Every member's cluster address, by member id.
    pub members: Vec<IpAddr>,
    /// How long partial flows are held (the cluster's diameter).
    pub hold_time: Duration,
    /// Hold queue bound in packets.
    pub hold_packets: usize,
    /// Hold queue bound in bytes.
    pub hold_bytes: usize,
    /// Link MTU used to clamp the MSS of SYN and SYN-ACK; `None` disables clamping.
    pub mtu: Option<u16>,
    /// Connection tracking timers (REMOVE after close or idle).
    pub track: TrackConfig,
}

/// Counters of everything the engine did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EngineStats {
    /// Decisions by reason.
    pub decisions: HashMap<&'static str, u64>,
    /// Packets sent to owners in IP-in-IP.
    pub encapsulated: u64,
    /// Tunnel packets decapsulated and injected.
    pub decapsulated: u64,
    /// Tunnel packets from an address that is not a live member, dropped.
    pub tunnel_not_member: u64,
    /// Packets that could not be parsed (accepted untouched when intercepted, dropped when
    /// from the tunnel).
    pub malformed: u64,
    /// SYN / SYN-ACK whose MSS was lowered.
    pub mss_clamped: u64,
    /// Packets that could not be encapsulated (too big, family mismatch): dropped.
    pub encap_failed: u64,
    /// Hold queue outcomes.
    pub hold: HoldStats,
}

/// Buffers kept for reuse at most (a burst's worth; more are freed).
const POOL_MAX: usize = 512;

/// The data-plane state of one member.
pub struct Engine<T> {
    config: EngineConfig,
    classifier: Classifier,
    /// Held packets, with whether their bytes were already rewritten (MSS clamp).
    hold: HoldQueue<(T, bool)>,
    tracker: Tracker,
    ident: u16,
    stats: EngineStats,
    /// Decisions by reason, indexed like [`Reason::ALL`] (no hashing per packet).
    decisions: [u64; Reason::ALL.len()],
    newly_held: Vec<Connection>,
    /// Buffers for the packets the engine writes ([`Output::Send`], [`Output::Inject`]),
    /// given back by the driver with [`Engine::recycle`]: no allocation per packet once warm.
    pool: Vec<Vec<u8>>,
    /// The parse results of a batch, kept between batches.
    parsed: Vec<Result<Parsed, crate::packet::ParseError>>,
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Engine<T> {
    /// An engine with a classifier (owner policy and bypass rules).
    pub fn new(config: EngineConfig, classifier: Classifier) -> Self {
        Engine {
            hold: HoldQueue::new(config.hold_time, config.hold_packets, config.hold_bytes),
            tracker: Tracker::new(config.track),
            classifier,
            ident: 0,
            stats: EngineStats::default(),
            decisions: [0; Reason::ALL.len()],
            newly_held: Vec::new(),
            pool: Vec::new(),
            parsed: Vec::new(),
            config,
        }
    }

    /// Tracks a local connection registered again after a restart (the state file), so that
    /// it ends, and is removed, like one this engine installed itself.
    pub fn restore(&mut self, now: Instant, connection: Connection) {
        self.tracker.restore(now, connection);
    }

    /// Counters so far.
    pub fn stats(&self) -> EngineStats {
        let decisions =
            Reason::ALL.iter().zip(self.decisions).filter(|(_, n)| *n > 0).map(|(r, n)| (r.name(), n)).collect();
        EngineStats { hold: self.hold.stats(), decisions, ..self.stats.clone() }
    }

    /// Gives back the buffer of an [`Output::Send`] or [`Output::Inject`] once its bytes are
    /// sent, for the next packet.
    pub fn recycle(&mut self, mut buf: Vec<u8>) {
        if self.pool.len() < POOL_MAX {
            buf.clear();
            self.pool.push(buf);
        }
    }

    /// An empty buffer from the pool (or a new one while the pool is cold).
    fn buffer(&mut self, capacity: usize) -> Vec<u8> {
        let mut b = self.pool.pop().unwrap_or_default();
        b.reserve(capacity);
        b
    }

    /// Connections that had packets held since the last call (the driver re-checks them
    /// against the database once its install listener knows packets are held).
    pub fn take_newly_held(&mut self) -> Vec<Connection> {
        std::mem::take(&mut self.newly_held)
    }

    /// Packets in the hold queue.
    pub fn held(&self) -> usize {
        self.hold.len()
    }

    /// True when packets of this connection wait in the hold queue.
    pub fn is_holding(&self, c: &Connection) -> bool {
        self.hold.is_holding(c)
    }

    /// An intercepted packet.
    pub fn handle(&mut self, now: Instant, view: &View, packet: T, hook: Hook, out: &mut Vec<Output<T>>) {
        let parsed = parse(packet.as_ref());
        self.handle_parsed(now, view, packet, hook, parsed, out);
    }

    /// A batch of intercepted packets: all are parsed and their database entries prefetched
    /// before any is classified, so the memory accesses of the batch overlap. Outputs are
    /// in packet order, as if each had been handled alone.
    pub fn handle_batch(&mut self, now: Instant, view: &View, batch: &mut Vec<(T, Hook)>, out: &mut Vec<Output<T>>) {
        let mut parsed = std::mem::take(&mut self.parsed);
        parsed.extend(batch.iter().map(|(p, _)| parse(p.as_ref())));
        for p in &parsed {
            if let Ok(Parsed::Flow(f)) = p {
                view.db.prefetch(&f.connection);
            }
        }
        for ((packet, hook), parsed) in batch.drain(..).zip(parsed.drain(..)) {
            self.handle_parsed(now, view, packet, hook, parsed, out);
        }
        self.parsed = parsed;
    }

    fn handle_parsed(
        &mut self,
        now: Instant,
        view: &View,
        mut packet: T,
        hook: Hook,
        parsed: Result<Parsed, crate::packet::ParseError>,
        out: &mut Vec<Output<T>>,
    ) {
        let parsed = match parsed {
            Ok(p) => p,
            Err(_) => {
                // Not ours to judge: the stack will drop what is really broken.
                self.stats.malformed += 1;
                out.push(Output::Accept { packet, modified: false, local: false });
                return;
            }
        };
        let d = self.classifier.classify(view, now, &parsed, hook);
        self.count(d.reason);
        let modified = self.clamp(&mut packet, &parsed);
        self.carry_out(now, view, d, &parsed, packet, modified, true, out);
    }

    fn count(&mut self, r: Reason) {
        // ALL lists the reasons in declaration order (classify.rs checks it).
        self.decisions[r as usize] += 1;
    }

    fn clamp(&mut self, packet: &mut T, parsed: &Parsed) -> bool {
        let (Some(mtu), Parsed::Flow(f)) = (self.config.mtu, parsed) else { return false };
        if !f.has_syn() {
            return false;
        }
        let outer_v6 = self.config.members.iter().any(|a| a.is_ipv6());
        let limit = mss::mss_limit(mtu, !f.connection.is_ipv4(), outer_v6);
        let changed = mss::clamp(packet.as_mut(), f.l4_offset, limit);
        self.stats.mss_clamped += changed as u64;
        changed
    }

    #[allow(clippy::too_many_arguments)]
    fn carry_out(
        &mut self,
        now: Instant,
        view: &View,
        d: Decision,
        parsed: &Parsed,
        packet: T,
        modified: bool,
        fresh: bool,
        out: &mut Vec<Output<T>>,
    ) {
        match d.verdict {
            Verdict::Accept => {
                let local = if let (Parsed::Flow(f), Reason::LocalFlow) = (parsed, d.reason) {
                    self.tracker.observe(now, f);
                    fresh
                } else {
                    false
                };
                out.push(Output::Accept { packet, modified, local });
            }
            Verdict::AcceptLocal { connection, action } => {
                out.push(Output::Install { connection, action });
                self.tracker.start(now, connection);
                // NewLocal or NewBypass: either way in the local table from now on, so its later
                // packets are LocalFlow.
                out.push(Output::Accept { packet, modified, local: fresh });
            }
            Verdict::Encapsulate { owner } => {
                self.encapsulate_to(owner, packet.as_ref(), out);
                out.push(Output::Drop { packet });
            }
            Verdict::Hold => {
                let Parsed::Flow(f) = parsed else {
                    out.push(Output::Accept { packet, modified, local: false });
                    return;
                };
                let len = packet.as_ref().len();
                self.newly_held.push(f.connection);
                for (dropped, _) in self.hold.push(now, &f.connection, len, (packet, modified)) {
                    out.push(Output::Drop { packet: dropped });
                }
                let _ = view;
            }
            Verdict::Drop => out.push(Output::Drop { packet }),
        }
    }

    fn encapsulate_to(&mut self, owner: MemberId, inner: &[u8], out: &mut Vec<Output<T>>) {
        let Some(&to) = self.config.members.get(owner.0 as usize) else {
            self.stats.encap_failed += 1;
            return;
        };
        let mut outer = self.buffer(inner.len() + 40);
        self.ident = self.ident.wrapping_add(1);
        match encapsulate(inner, self.config.address, to, self.ident, &mut outer) {
            Ok(()) => {
                self.stats.encapsulated += 1;
                out.push(Output::Send { to, outer });
            }
            Err(_) => {
                self.stats.encap_failed += 1;
                self.recycle(outer);
            }
        }
    }

    /// A packet received from the tunnel: `outer_src` sent it, `inner` is the packet inside.
    /// Only live members may use the tunnel.
    pub fn handle_tunnel(
        &mut self,
        now: Instant,
        view: &View,
        outer_src: IpAddr,
        inner: &[u8],
        out: &mut Vec<Output<T>>,
    ) {
        let from = self.config.members.iter().position(|&a| a == outer_src).map(|i| MemberId(i as u8));
        if !from.is_some_and(|m| m != view.me && view.live.contains(&m)) {
            self.stats.tunnel_not_member += 1;
            return;
        }
        let Ok(parsed) = parse(inner) else {
            self.stats.malformed += 1;
            return;
        };
        let d = self.classifier.classify_decapsulated(view, now, &parsed);
        self.count(d.reason);
        if let Verdict::AcceptLocal { connection, action } = d.verdict {
            out.push(Output::Install { connection, action });
            self.tracker.start(now, connection);
        } else if let Parsed::Flow(f) = &parsed {
            if d.reason == Reason::DecapLocal {
                self.tracker.observe(now, f);
            }
        }
        self.stats.decapsulated += 1;
        let mut packet = self.buffer(inner.len());
        packet.extend_from_slice(inner);
        out.push(Output::Inject { packet });
    }

    /// An INSTALL arrived from a peer for `connection`: release its held packets now.
    pub fn on_install(&mut self, now: Instant, view: &View, connection: &Connection, out: &mut Vec<Output<T>>) {
        for (packet, modified) in self.hold.release(connection) {
            self.reclassify(now, view, packet, modified, out);
        }
    }

    fn reclassify(&mut self, now: Instant, view: &View, mut packet: T, was_modified: bool, out: &mut Vec<Output<T>>) {
        let Ok(parsed) = parse(packet.as_ref()) else {
            out.push(Output::Drop { packet });
            return;
        };
        let d = self.classifier.reclassify_expired(view, now, &parsed);
        self.count(d.reason);
        let modified = self.clamp(&mut packet, &parsed) || was_modified;
        match d.verdict {
            Verdict::Hold => out.push(Output::Drop { packet }),
            // Released packets are never marked local: the fast path starts from a packet
            // classified on arrival.
            _ => self.carry_out(now, view, d, &parsed, packet, modified, false, out),
        }
    }

    /// Timers: expired holds are re-classified (dropped if still unknown), ended local
    /// connections are removed.
    pub fn poll(&mut self, now: Instant, view: &View, out: &mut Vec<Output<T>>) {
        for (packet, modified) in self.hold.expired(now) {
            self.reclassify(now, view, packet, modified, out);
        }
        for connection in self.tracker.ended(now) {
            out.push(Output::Remove { connection });
        }
        self.classifier.expire_handoffs(now);
    }

    /// When [`Engine::poll`] should run next at the latest.
    pub fn next_timeout(&mut self, now: Instant) -> Instant {
        let tick = now + Duration::from_millis(250);
        self.hold.next_deadline().map_or(tick, |d| d.min(tick))
    }
}
