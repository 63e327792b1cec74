//! The mesh driver on tokio: a listener on the cluster port, a dialer per member, and one
//! task per control channel that runs a sans-IO [`Session`] over a `TcpStream`.
//!
//! Ownership rules kept here (paper 2.2 to 2.4):
//! - the member list is static; a member is identified by the source address of its
//!   control channel, so members dial from their cluster address;
//! - at most one channel per peer is *current*; only its messages change the database, and
//!   when it closes the peer's entries are purged;
//! - when two channels with the same peer complete the join (both members dialed at once, or
//!   a restart), the one dialed by the lower address is kept; between two of equal standing
//!   the newer wins (the peer restarted). The loser gets PEER_REJECT or PEER_LEAVE with
//!   error code 4 (duplicate control channel);
//! - a channel runs at the version agreed in its PEER_JOIN exchange (see [`crate::session`]);
//!   a peer that refuses our PEER_JOIN(2) with PEER_REJECT(version mismatch) is a version-1
//!   member: it is dialed with PEER_JOIN(1) from then on (until it dials us offering 2);
//! - advertisements (version 2) go only to peers whose channel runs at version 2, and never
//!   take the last room in a send queue: when a queue is half full they are dropped (they are
//!   periodic and idempotent), so they never get a peer declared stalled;
//! - the table sync to a newly joined peer is streamed from the live local table, a part
//!   (one shard) at a time, each part read under the lock that serializes local changes and
//!   their broadcast. A change registered before a part is read is in that part; its update,
//!   queued behind the sync's start, may arrive after the part and says the same; a change
//!   after the read arrives after the part. Each update states the entry as it is after the
//!   change, so the peer ends with the table as it is, whatever the interleaving: at worst it
//!   gets an entry twice, or a REMOVE of an entry it never got. The sender copies nothing:
//!   it encodes a part only while less than [`SYNC_LOW_WATER`] bytes wait for the transport.

mod admission;
mod channel;
mod net;
pub use admission::MEMBER_PENDING;
pub mod stats;
pub mod tls;

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch, Notify};

use crate::database::{ConnectionDatabase, ConnectionTable, MemberId, MAX_MEMBERS};
use crate::flow::{Action, Connection};
use crate::session::{Role, SessionConfig};
use crate::wire::{self, DecodeError, ErrorCode};
pub use stats::{
    AdvertisementOutcome, AdvertisementStats, MeshEvent, MeshObserver, MessageCounters, NoObserver, PeerInfo, PeerState,
};

/// A table sync encodes its next part only while fewer bytes than this wait to be written.
pub const SYNC_LOW_WATER: usize = 256 * 1024;

/// How many times a dialer tries a peer before giving up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Retries {
    /// Keep trying for ever (paper 2.3: for a peer down a long time that will come back).
    Infinite,
    /// Give up after this many failed attempts in a row.
    Count(u32),
}

/// One member of the static membership list.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemberConfig {
    /// The member's cluster address (control channel source and destination).
    pub address: IpAddr,
    /// The member's control port.
    pub port: u16,
    /// Keepalive interval, dead-after count and version used with this member.
    pub session: SessionConfig,
    /// Connect attempts towards this member.
    pub connect_retries: Retries,
}

/// Everything the mesh needs to run.
#[derive(Clone, Debug)]
pub struct MeshConfig {
    /// This member's cluster address; must be one of `members`.
    pub address: IpAddr,
    /// The membership list, this member included.
    pub members: Vec<MemberConfig>,
    /// Messages queued towards one peer before it is declared stalled and resynchronized.
    pub send_queue: usize,
    /// First reconnect delay; doubles per failure up to `backoff_max`.
    pub backoff_min: Duration,
    /// Longest reconnect delay.
    pub backoff_max: Duration,
    /// Channels accepted from non-members but not yet joined (TLS handshake included), at
    /// most; members' addresses have places of their own ([`admission::MEMBER_PENDING`]).
    pub max_pending_joins: usize,
    /// Of those, at most this many from one source address.
    pub max_pending_per_source: usize,
    /// Entries one peer may own in this member's database; further INSTALLs are refused
    /// (a flood guard, like Katran's cap on new flows).
    pub max_entries_per_member: usize,
    /// INSTALLs per second accepted from one peer after a burst of `max_entries_per_member`
    /// (so a full table sync always passes); further ones are refused.
    pub max_install_rate: u32,
    /// Bytes queued to one peer's socket before its queue is no longer drained (so a peer
    /// that does not read is declared stalled once its queue fills).
    pub max_pending_bytes: usize,
    /// Mutual TLS for every control channel; `None` speaks the paper's plaintext format.
    pub tls: Option<Arc<tls::TlsSettings>>,
    /// Delay added to every update sent to peers: a test aid that emulates a long-distance
    /// cluster (INSTALLs late at the peers). Zero in production.
    pub send_delay: Duration,
}

/// Why a mesh could not start.
#[derive(Debug, thiserror::Error)]
pub enum MeshError {
    /// The configuration is inconsistent.
    #[error("mesh configuration: {0}")]
    Config(String),
    /// The control port could not be bound.
    #[error("cannot listen on {addr}")]
    Listen {
        /// Address tried.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
}

enum Outgoing {
    /// Start streaming the local table (a part at a time, from the live table: see the
    /// channel's sync cursor), before any update queued after this.
    TableStart,
    Install(Action, Connection),
    Remove(Action, Connection),
    /// Whole advertisement messages, shared by every peer's queue, and how many.
    Advertise(Arc<[u8]>, u64),
}

/// What [`Mesh::claim`] did with a claim on a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Claim {
    /// Registered and sent to the peers.
    Installed,
    /// This member already claimed it with this action.
    Unchanged,
    /// A member with a lower id claims it: it owns the connection, this claim was dropped.
    Lost {
        /// The owning member's address.
        owner: IpAddr,
    },
}

/// Asks a channel task to close with a PEER_LEAVE code.
struct CloseSignal {
    notify: Notify,
    code: AtomicU8,
}

impl CloseSignal {
    fn new() -> Arc<Self> {
        Arc::new(CloseSignal { notify: Notify::new(), code: AtomicU8::new(0) })
    }
    fn fire(&self, code: ErrorCode) {
        self.code.store(code.0, Ordering::Relaxed);
        self.notify.notify_one();
    }
}

struct Link {
    channel: u64,
    version: u8,
    tx: mpsc::Sender<Outgoing>,
    close: Arc<CloseSignal>,
}

struct Current {
    channel: u64,
    version: u8,
    /// The restart time the peer announced in its PEER_JOIN (version 2), in seconds.
    restart_time: u8,
    lower_initiated: bool,
    role: Role,
    close: Arc<CloseSignal>,
}

struct PeerSlot {
    current: Option<Current>,
    state: PeerState,
    since: Instant,
    connect_failures: u32,
    last_close: Option<String>,
    channels_lost: u64,
    /// Graceful restart: the peer's entries are kept, stale, until then.
    grace: Option<Grace>,
}

/// A peer's graceful restart in progress (protocol.md, "Graceful restart").
#[derive(Clone, Copy)]
struct Grace {
    /// Which grace period (a newer one replaces it, and its end does nothing).
    id: u64,
    until: Instant,
}

impl PeerSlot {
    fn set_state(&mut self, s: PeerState) {
        if self.state != s {
            self.state = s;
            self.since = Instant::now();
        }
    }
}

struct Inner {
    config: MeshConfig,
    me: MemberId,
    port: u16,
    local: ConnectionTable,
    db: ConnectionDatabase,
    /// Links to current channels by member; the lock also serializes local changes.
    outbound: Mutex<Vec<Option<Link>>>,
    peers: Vec<Mutex<PeerSlot>>,
    /// Woken when a peer loses its current channel (its dialer may dial again).
    peer_changed: Vec<Notify>,
    keepalive_timeouts: Vec<AtomicU64>,
    /// This member's claims withdrawn because a lower member claimed the same connection.
    claims_lost: AtomicU64,
    /// Per peer: the longest gap between bytes received on its current channel, in ms.
    max_silence_ms: Vec<AtomicU64>,
    next_channel: AtomicU64,
    messages: MessageCounters,
    observer: Arc<dyn MeshObserver>,
    /// Told of every INSTALL applied from a peer (the data plane releases held packets).
    install_listener: arc_swap::ArcSwapOption<InstallListener>,
    /// Told of every advertisement message received from a peer.
    advertisement_listener: arc_swap::ArcSwapOption<AdvertisementListener>,
    advertisements: stats::AdvertisementCounters,
    /// Per peer: the version to offer when dialing it, lowered after a version-mismatch
    /// reject (0: the configured one).
    dial_version: Vec<AtomicU8>,
    /// Bumped whenever a peer's current channel appears or goes.
    membership: AtomicU64,
    shutdown: watch::Sender<bool>,
    active_channels: AtomicUsize,
    idle: Notify,
    killed: std::sync::atomic::AtomicBool,
    /// Set by [`Mesh::leave_for_good`]: the shutdown's PEER_LEAVE is 0 (purge at once) even
    /// where a restart time was announced.
    for_good: std::sync::atomic::AtomicBool,
    /// The flood guard's limits, from `config` at start and changed by
    /// [`Mesh::set_flood_guard`] (a reload).
    flood_max_entries: AtomicUsize,
    flood_rate: std::sync::atomic::AtomicU32,
}

/// Called with each connection a peer installs, on the channel's task: must be quick.
pub type InstallListener = Box<dyn Fn(&Connection) + Send + Sync>;

/// Called with the sending member and one whole DICT_STATS or LOAD message (its member byte
/// is the sender's), on the channel's task: must be quick.
pub type AdvertisementListener = Box<dyn Fn(MemberId, &[u8]) + Send + Sync>;

/// A running cluster member's control plane. Cloning gives another handle to the same mesh.
#[derive(Clone)]
pub struct Mesh {
    inner: Arc<Inner>,
}

impl MeshConfig {
    /// A configuration with one session setting for every member, and defaults elsewhere.
    pub fn uniform(address: IpAddr, port: u16, members: &[IpAddr], session: SessionConfig, retries: Retries) -> Self {
        MeshConfig {
            address,
            members: members
                .iter()
                .map(|&a| MemberConfig { address: a, port, session, connect_retries: retries })
                .collect(),
            send_queue: 1 << 16,
            backoff_min: Duration::from_millis(50),
            backoff_max: Duration::from_secs(2),
            max_pending_joins: 64,
            max_pending_per_source: 4,
            max_entries_per_member: 4_000_000,
            max_install_rate: 1_000_000,
            max_pending_bytes: 8 << 20,
            tls: None,
            send_delay: Duration::ZERO,
        }
    }

    fn validate(mut self) -> Result<(MeshConfig, MemberId), MeshError> {
        self.members.sort_by_key(|m| m.address);
        if self.members.len() > MAX_MEMBERS {
            return Err(MeshError::Config(format!("at most {MAX_MEMBERS} members, got {}", self.members.len())));
        }
        if let Some(w) = self.members.windows(2).find(|w| w[0].address == w[1].address) {
            return Err(MeshError::Config(format!("member {} is listed twice", w[0].address)));
        }
        let me = self.members.iter().position(|m| m.address == self.address).ok_or_else(|| {
            MeshError::Config(format!("this member's address {} is not in the member list", self.address))
        })?;
        if self.send_queue == 0 || self.max_pending_joins == 0 || self.max_pending_per_source == 0 {
            return Err(MeshError::Config(
                "send_queue, max_pending_joins and max_pending_per_source must be at least 1".into(),
            ));
        }
        Ok((self, MemberId(me as u8)))
    }
}

impl Mesh {
    /// Binds the control port and starts the listener and one dialer per peer.
    pub async fn start(config: MeshConfig, observer: Arc<dyn MeshObserver>) -> Result<Mesh, MeshError> {
        let (config, me) = config.validate()?;
        let port = config.members[me.0 as usize].port;
        let listen = SocketAddr::new(config.address, port);
        let listener = net::bind(listen).map_err(|source| MeshError::Listen { addr: listen, source })?;
        let n = config.members.len();
        let now = Instant::now();
        let inner = Arc::new(Inner {
            me,
            port: listener.local_addr().map(|a| a.port()).unwrap_or(port),
            local: ConnectionTable::new(me),
            db: ConnectionDatabase::for_member(me),
            outbound: Mutex::new((0..n).map(|_| None).collect()),
            peers: (0..n)
                .map(|_| {
                    Mutex::new(PeerSlot {
                        current: None,
                        state: PeerState::Down,
                        since: now,
                        connect_failures: 0,
                        last_close: None,
                        channels_lost: 0,
                        grace: None,
                    })
                })
                .collect(),
            peer_changed: (0..n).map(|_| Notify::new()).collect(),
            keepalive_timeouts: (0..n).map(|_| AtomicU64::new(0)).collect(),
            max_silence_ms: (0..n).map(|_| AtomicU64::new(0)).collect(),
            claims_lost: AtomicU64::new(0),
            next_channel: AtomicU64::new(1),
            messages: MessageCounters::default(),
            observer,
            shutdown: watch::channel(false).0,
            active_channels: AtomicUsize::new(0),
            idle: Notify::new(),
            killed: false.into(),
            for_good: false.into(),
            flood_max_entries: AtomicUsize::new(config.max_entries_per_member),
            flood_rate: config.max_install_rate.into(),
            install_listener: arc_swap::ArcSwapOption::empty(),
            advertisement_listener: arc_swap::ArcSwapOption::empty(),
            advertisements: Default::default(),
            dial_version: (0..n).map(|_| AtomicU8::new(0)).collect(),
            membership: AtomicU64::new(0),
            config,
        });
        tokio::spawn(net::listen(inner.clone(), listener));
        for peer in 0..n {
            if peer != me.0 as usize {
                tokio::spawn(net::dial(inner.clone(), MemberId(peer as u8)));
            }
        }
        Ok(Mesh { inner })
    }

    /// This member's id (its index in the sorted member list).
    pub fn me(&self) -> MemberId {
        self.inner.me
    }

    /// The flood guard's limits in force: entries per peer, INSTALLs per second.
    pub fn flood_guard(&self) -> (usize, u32) {
        (self.inner.flood_max_entries.load(Ordering::Relaxed), self.inner.flood_rate.load(Ordering::Relaxed))
    }

    /// Changes the flood guard's limits (a reload of `cluster.max_entries_per_member` and
    /// `cluster.max_install_rate`): every channel applies them from its next INSTALL on.
    /// Entries already held above a lowered cap stay; further INSTALLs are refused.
    pub fn set_flood_guard(&self, max_entries_per_member: usize, max_install_rate: u32) {
        self.inner.flood_max_entries.store(max_entries_per_member.max(1), Ordering::Relaxed);
        self.inner.flood_rate.store(max_install_rate.max(1), Ordering::Relaxed);
    }

    /// This member's cluster address.
    pub fn address(&self) -> IpAddr {
        self.inner.config.address
    }

    /// The control port actually bound (useful when configured as 0).
    pub fn port(&self) -> u16 {
        self.inner.port
    }

    /// The address of a member.
    pub fn member_address(&self, id: MemberId) -> Option<IpAddr> {
        self.inner.config.members.get(id.0 as usize).map(|m| m.address)
    }

    /// The id of the member with this address.
    pub fn member_id(&self, address: IpAddr) -> Option<MemberId> {
        self.inner.member_id(address)
    }

    /// Every member's address, by id.
    pub fn members(&self) -> Vec<IpAddr> {
        self.inner.config.members.iter().map(|m| m.address).collect()
    }

    /// This member's own connections.
    pub fn local(&self) -> &ConnectionTable {
        &self.inner.local
    }

    /// Connections owned by peers.
    pub fn database(&self) -> &ConnectionDatabase {
        &self.inner.db
    }

    /// An order-independent digest of everything this member knows (its own table plus its
    /// database): equal on two members exactly when they see the same cluster.
    pub fn view_digest(&self) -> u64 {
        self.inner.local.digest().wrapping_add(self.inner.db.digest())
    }

    /// This member's claims withdrawn because a member with a lower id claimed the same
    /// connection at the same time.
    pub fn claims_lost(&self) -> u64 {
        self.inner.claims_lost.load(Ordering::Relaxed)
    }

    /// Control messages counted by type and action.
    pub fn messages(&self) -> &MessageCounters {
        &self.inner.messages
    }

    /// Registers a local connection and sends INSTALL_CONNECTION to every joined peer.
    /// Returns false if it was already installed with this action, or if a peer with a lower
    /// id already claims it (nothing is sent; see [`Mesh::claim`]).
    pub fn install(&self, connection: Connection, action: Action) -> bool {
        self.claim(connection, action) == Claim::Installed
    }

    /// [`Mesh::install`], saying what happened to the claim.
    pub fn claim(&self, connection: Connection, action: Action) -> Claim {
        let mut out = self.inner.outbound.lock().unwrap_or_else(|e| e.into_inner());
        if !self.inner.local.insert(&connection, action) {
            return Claim::Unchanged;
        }
        // Concurrent claims (database module docs): the lowest member id owns the
        // connection. A peer's claim that beats ours makes ours void at once.
        let owner = self.inner.db.local_claimed(&connection);
        if owner != self.inner.me {
            self.inner.local.remove(&connection);
            self.inner.db.local_ended(&connection);
            return Claim::Lost { owner: self.inner.addr(owner) };
        }
        self.inner.broadcast(&mut out, || Outgoing::Install(action, connection));
        Claim::Installed
    }

    /// Unregisters a local connection and sends REMOVE_CONNECTION to every joined peer.
    /// Returns its action, or `None` if it was not installed.
    pub fn remove(&self, connection: &Connection) -> Option<Action> {
        let mut out = self.inner.outbound.lock().unwrap_or_else(|e| e.into_inner());
        let action = self.inner.local.remove(connection)?;
        let c = *connection;
        self.inner.broadcast(&mut out, || Outgoing::Remove(action, c));
        // A peer's claim waiting behind ours takes over.
        self.inner.db.local_ended(connection);
        Some(action)
    }

    /// Registers the function told of every INSTALL applied from a peer.
    pub fn set_install_listener(&self, listener: InstallListener) {
        self.inner.install_listener.store(Some(Arc::new(listener)));
    }

    /// Sends advertisement messages (version 2) to every peer whose channel runs at version 2.
    ///
    /// `bytes` must be whole DICT_STATS/LOAD messages, each with this member's id in its
    /// member byte; otherwise nothing is sent and the error says why. Peers at version 1 are
    /// skipped; a peer whose send queue is half full is skipped too (counted as dropped),
    /// never blocked on nor disconnected. Returns the number of peers it was queued to.
    pub fn advertise(&self, bytes: &[u8]) -> Result<usize, DecodeError> {
        let msgs = wire::split_advertisements(bytes)?;
        if let Some(m) = msgs.iter().find(|m| m[wire::advertisement::MEMBER] != self.inner.me.0) {
            return Err(DecodeError::WrongMember { claimed: m[wire::advertisement::MEMBER], sender: self.inner.me.0 });
        }
        let n = msgs.len() as u64;
        if n == 0 {
            return Ok(0);
        }
        let inner = &self.inner;
        let shared: Arc<[u8]> = bytes.into();
        let out = inner.outbound.lock().unwrap_or_else(|e| e.into_inner());
        let mut queued = 0;
        for (i, link) in out.iter().enumerate() {
            let Some(l) = link else { continue };
            let peer = inner.addr(MemberId(i as u8));
            let outcome = if l.version < wire::VERSION_2 {
                AdvertisementOutcome::SkippedV1
            } else if l.tx.capacity() * 2 < inner.config.send_queue
                || l.tx.try_send(Outgoing::Advertise(shared.clone(), n)).is_err()
            {
                AdvertisementOutcome::Dropped
            } else {
                queued += 1;
                continue;
            };
            inner.advertisements.add(outcome, n);
            inner.observer.on_event(&MeshEvent::Advertisements { peer, outcome, messages: n });
        }
        Ok(queued)
    }

    /// Registers the function told of every advertisement message received from a peer.
    pub fn set_advertisement_listener(&self, listener: AdvertisementListener) {
        self.inner.advertisement_listener.store(Some(Arc::new(listener)));
    }

    /// Advertisement and version-fallback counters.
    pub fn advertisement_stats(&self) -> AdvertisementStats {
        self.inner.advertisements.snapshot()
    }

    /// A number that changes whenever the set of live members may have changed.
    pub fn membership_generation(&self) -> u64 {
        self.inner.membership.load(Ordering::Acquire)
    }

    /// This member and every peer with a joined channel, by id.
    pub fn live_members(&self) -> Vec<MemberId> {
        let inner = &self.inner;
        (0..inner.config.members.len())
            .map(|i| MemberId(i as u8))
            .filter(|&m| m == inner.me || inner.slot(m).current.is_some())
            .collect()
    }

    /// The state of every peer.
    pub fn peers(&self) -> Vec<PeerInfo> {
        let inner = &self.inner;
        (0..inner.config.members.len())
            .filter(|&i| i != inner.me.0 as usize)
            .map(|i| {
                let m = &inner.config.members[i];
                let slot = inner.peers[i].lock().unwrap_or_else(|e| e.into_inner());
                let id = MemberId(i as u8);
                PeerInfo {
                    address: m.address,
                    port: m.port,
                    state: slot.state,
                    version: slot.current.as_ref().map(|c| c.version),
                    role: slot.current.as_ref().map(|c| c.role),
                    since_secs: slot.since.elapsed().as_secs(),
                    entries: inner.db.count_of(id, Action::Forward) + inner.db.count_of(id, Action::Bypass),
                    keepalive_ms: m.session.keepalive.as_millis() as u64,
                    dead_after: m.session.dead_after,
                    connect_failures: slot.connect_failures,
                    last_close: slot.last_close.clone(),
                    keepalive_timeouts: inner.keepalive_timeouts[i].load(Ordering::Relaxed),
                    channels_lost: slot.channels_lost,
                    max_silence_ms: inner.max_silence_ms[i].load(Ordering::Relaxed),
                    restart_grace_left_ms: slot
                        .grace
                        .map(|g| g.until.saturating_duration_since(Instant::now()).as_millis() as u64),
                }
            })
            .collect()
    }

    /// Leaves the cluster for good: as [`Mesh::shutdown`], but with PEER_LEAVE(0) on every
    /// channel, so the peers purge this member's entries at once instead of keeping them for
    /// its restart time (a member taken out of service).
    pub async fn leave_for_good(&self, grace: Duration) {
        self.inner.for_good.store(true, Ordering::Release);
        self.shutdown(grace).await
    }

    /// Leaves the cluster: PEER_LEAVE on every channel, then waits (at most `grace`) for the
    /// channels to flush and close. The code is 7 (restarting) on version-2 channels when this
    /// member announced a restart time (its peers keep its entries, stale, for that long), 0
    /// otherwise.
    pub async fn shutdown(&self, grace: Duration) {
        self.inner.shutdown.send_replace(true);
        let wait = async {
            while self.inner.active_channels.load(Ordering::Acquire) > 0 {
                let idle = self.inner.idle.notified();
                if self.inner.active_channels.load(Ordering::Acquire) == 0 {
                    break;
                }
                idle.await;
            }
        };
        let _ = tokio::time::timeout(grace, wait).await;
    }

    /// Stops at once without PEER_LEAVE, as a crash would (peers see the TCP close).
    pub fn kill(&self) {
        self.inner.killed.store(true, Ordering::Release);
        self.inner.shutdown.send_replace(true);
    }
}

impl Inner {
    /// The session settings of a channel with `peer`; an initiator offers the version the
    /// peer's fallback allows.
    fn channel_config(&self, peer: Option<MemberId>, role: Role) -> SessionConfig {
        let mut c = self.session_config(peer);
        if let (Some(p), Role::Initiator) = (peer, role) {
            let v = self.dial_version[p.0 as usize].load(Ordering::Relaxed);
            if v != 0 {
                c.version = c.version.min(v);
            }
        }
        c
    }

    /// Our PEER_JOIN(`offered`) was refused for its version: offer one less next time.
    /// Returns true if there is a lower version to try.
    fn version_refused(&self, peer: MemberId, offered: u8) -> bool {
        if offered <= wire::VERSION_1 {
            return false;
        }
        let to = offered - 1;
        self.dial_version[peer.0 as usize].store(to, Ordering::Relaxed);
        self.advertisements.version_fallbacks.fetch_add(1, Ordering::Relaxed);
        self.observer.on_event(&MeshEvent::VersionFallback { peer: self.addr(peer), from: offered, to });
        tracing::warn!(peer = %self.addr(peer), from = offered, to, "peer refused our protocol version, falling back");
        true
    }

    fn member_id(&self, address: IpAddr) -> Option<MemberId> {
        self.config.members.iter().position(|m| m.address == address).map(|i| MemberId(i as u8))
    }

    fn session_config(&self, peer: Option<MemberId>) -> SessionConfig {
        match peer {
            Some(p) => self.config.members[p.0 as usize].session,
            None => self.config.members[self.me.0 as usize].session,
        }
    }

    fn addr(&self, peer: MemberId) -> IpAddr {
        self.config.members[peer.0 as usize].address
    }

    fn slot(&self, peer: MemberId) -> std::sync::MutexGuard<'_, PeerSlot> {
        self.peers[peer.0 as usize].lock().unwrap_or_else(|e| e.into_inner())
    }

    fn broadcast(&self, out: &mut [Option<Link>], msg: impl Fn() -> Outgoing) {
        for (i, link) in out.iter_mut().enumerate() {
            let Some(l) = link else { continue };
            if l.tx.try_send(msg()).is_err() {
                // A stalled peer must not hold the others back: drop it; it resynchronizes
                // the whole table when it reconnects, so nothing is lost.
                tracing::warn!(peer = %self.addr(MemberId(i as u8)), "send queue full, disconnecting stalled peer");
                l.close.fire(ErrorCode::STALLED);
                *link = None;
            }
        }
    }

    /// Decides whether a channel that just completed its join becomes the peer's current one
    /// (tie-break in the module docs). On success the channel is registered for updates and
    /// the local table snapshot is queued first.
    #[allow(clippy::too_many_arguments)]
    fn join(
        self: &Arc<Self>,
        peer: MemberId,
        channel: u64,
        role: Role,
        version: u8,
        restart_time: u8,
        tx: &mpsc::Sender<Outgoing>,
        close: &Arc<CloseSignal>,
    ) -> bool {
        let lower_initiated = match role {
            Role::Initiator => self.me < peer,
            Role::Acceptor => peer < self.me,
        };
        if role == Role::Acceptor && version >= wire::VERSION_2 {
            // The peer dialed us offering version 2: it speaks it now (it was upgraded). Known
            // before the tie-break, which may refuse this channel for one we dialed at 1.
            self.dial_version[peer.0 as usize].store(0, Ordering::Relaxed);
        }
        let mut slot = self.slot(peer);
        if let Some(cur) = &slot.current {
            if cur.lower_initiated && !lower_initiated {
                return false;
            }
            // Supersede: the peer restarted, or this channel is the preferred one.
            cur.close.fire(ErrorCode::DUPLICATE_CHANNEL);
            if cur.version >= wire::VERSION_2 && cur.restart_time > 0 {
                // A graceful restarter dialed in before its old channel closed: keep its
                // entries, stale, until the new channel's sync has sent them again.
                let secs = cur.restart_time;
                self.keep_stale(&mut slot, peer, secs, "control channel superseded by a new one");
            } else {
                let purged = self.db.purge_owner(peer);
                tracing::info!(peer = %self.addr(peer), purged, "control channel superseded by a new one");
            }
        }
        slot.current = Some(Current { channel, version, restart_time, lower_initiated, role, close: close.clone() });
        self.max_silence_ms[peer.0 as usize].store(0, Ordering::Relaxed);
        self.membership.fetch_add(1, Ordering::AcqRel);
        slot.connect_failures = 0;
        slot.set_state(PeerState::Synchronize);
        // The link is set while the slot is still held (slot, then outbound: the order every
        // path nests them in): two channels of one peer joining at once on two threads could
        // otherwise leave the link on the one superseded, and every later update of this
        // member would go to a closed channel while the peer's current one heard nothing.
        let mut out = self.outbound.lock().unwrap_or_else(|e| e.into_inner());
        drop(slot);
        // The queue is new and empty, so the marker always fits. The table is read later, a
        // part at a time, under this same lock: every change registered before is in what it
        // reads, and every change after is queued behind the marker too (a duplicate INSTALL
        // or a REMOVE of an entry never sent; both harmless, see the module docs).
        let _ = tx.try_send(Outgoing::TableStart);
        out[peer.0 as usize] = Some(Link { channel, version, tx: tx.clone(), close: close.clone() });
        drop(out);
        self.observer.on_event(&MeshEvent::PeerUp { peer: self.addr(peer) });
        tracing::info!(peer = %self.addr(peer), channel, ?role, version, "peer joined");
        true
    }

    /// A peer's claim beat this member's own claim on `connection` (database module docs):
    /// drop ours and tell the peers with REMOVE, so that they drop our waiting claim too.
    fn withdraw(&self, connection: &Connection, winner: MemberId) {
        let mut out = self.outbound.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(action) = self.local.remove(connection) {
            let c = *connection;
            self.broadcast(&mut out, || Outgoing::Remove(action, c));
            self.db.local_ended(connection);
            drop(out);
            self.claims_lost.fetch_add(1, Ordering::Relaxed);
            self.observer.on_event(&MeshEvent::ClaimLost { connection: c, owner: self.addr(winner) });
            tracing::info!(connection = %c, owner = %self.addr(winner), "concurrent claim lost to a lower member, withdrawn");
        }
    }

    /// A channel closed; if it was current, purge the peer's entries, or keep them stale
    /// when the peer restarts gracefully (it announced a restart time on a version-2 channel,
    /// and left with PEER_LEAVE(restarting) or its transport closed; a dead peer is purged).
    fn channel_closed(self: &Arc<Self>, peer: MemberId, channel: u64, reason: &'static str) {
        let mut slot = self.slot(peer);
        let Some(cur) = slot.current.take_if(|c| c.channel == channel) else {
            return;
        };
        self.membership.fetch_add(1, Ordering::AcqRel);
        slot.channels_lost += 1;
        slot.last_close = Some(reason.to_string());
        slot.set_state(PeerState::Down);
        let graceful = cur.version >= wire::VERSION_2
            && cur.restart_time > 0
            && matches!(reason, "peer_restarting" | "transport_closed");
        let purged = if graceful {
            self.keep_stale(&mut slot, peer, cur.restart_time, reason);
            0
        } else {
            slot.grace = None;
            self.db.purge_owner(peer)
        };
        drop(slot);
        let mut out = self.outbound.lock().unwrap_or_else(|e| e.into_inner());
        if out[peer.0 as usize].as_ref().map(|l| l.channel) == Some(channel) {
            out[peer.0 as usize] = None;
        }
        drop(out);
        self.peer_changed[peer.0 as usize].notify_one();
        self.observer.on_event(&MeshEvent::PeerDown { peer: self.addr(peer), reason, purged });
        if !graceful {
            tracing::info!(peer = %self.addr(peer), reason, purged, "peer down, entries purged");
        }
    }

    /// Graceful restart (slot lock held): marks the peer's entries stale and purges those
    /// still stale `secs` seconds from now.
    fn keep_stale(self: &Arc<Self>, slot: &mut PeerSlot, peer: MemberId, secs: u8, reason: &str) {
        // A grace period already running is replaced: the new mark covers its entries too.
        let (stamp, kept) = self.db.mark_stale(peer);
        let grace = Duration::from_secs(secs as u64);
        let id = self.next_channel.fetch_add(1, Ordering::Relaxed);
        slot.grace = Some(Grace { id, until: Instant::now() + grace });
        tracing::info!(peer = %self.addr(peer), reason, kept, grace_secs = secs,
            "peer restarting: its entries are kept, stale, until it sends them again or the grace period ends");
        let inner = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(grace).await;
            inner.grace_ended(peer, id, stamp).await;
        });
    }

    /// The end of a peer's grace period: the entries it did not send again go.
    async fn grace_ended(self: Arc<Self>, peer: MemberId, id: u64, stamp: u32) {
        // Some(n): it did not come back, and everything of it went (waiting claims too).
        let gone = {
            let mut slot = self.slot(peer);
            if slot.grace.map(|g| g.id) != Some(id) {
                return; // a newer restart's grace, or purged meanwhile
            }
            slot.grace = None;
            slot.current.is_none().then(|| self.db.purge_owner(peer))
        };
        let (purged, back) = match gone {
            Some(n) => (n, false),
            None => {
                // It is back: only what its new channel did not send again goes (a scan of
                // the table, off the runtime).
                let inner = self.clone();
                (tokio::task::spawn_blocking(move || inner.db.purge_stale(peer, stamp)).await.unwrap_or(0), true)
            }
        };
        self.observer.on_event(&MeshEvent::StalePurged { peer: self.addr(peer), purged });
        tracing::info!(peer = %self.addr(peer), purged, back, "graceful restart over: stale entries purged");
    }
}
