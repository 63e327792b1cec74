//! What the mesh tells the outside world: counters, events for an observer, peer views.

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::session::{Counters, COUNTED_TYPES};
use crate::wire::ErrorCode;

/// Counters of control messages by type and action, in and out, shared by all channels.
#[derive(Default)]
pub struct MessageCounters {
    rx: [[AtomicU64; 5]; COUNTED_TYPES],
    tx: [[AtomicU64; 5]; COUNTED_TYPES],
}

impl MessageCounters {
    /// Adds what a session counted since `last`, then remembers `now` as `last`.
    pub(crate) fn add_delta(&self, now: &Counters, last: &mut Counters) {
        for t in 0..COUNTED_TYPES {
            for a in 0..5 {
                let (drx, dtx) = (now.rx[t][a] - last.rx[t][a], now.tx[t][a] - last.tx[t][a]);
                if drx > 0 {
                    self.rx[t][a].fetch_add(drx, Ordering::Relaxed);
                }
                if dtx > 0 {
                    self.tx[t][a].fetch_add(dtx, Ordering::Relaxed);
                }
            }
        }
        *last = *now;
    }

    /// Every (direction, message type, action, count) with a nonzero count, with the paper's
    /// names.
    pub fn snapshot(&self) -> Vec<(&'static str, &'static str, &'static str, u64)> {
        let mut v = Vec::new();
        for (dir, table) in [("in", &self.rx), ("out", &self.tx)] {
            for (t, row) in table.iter().enumerate() {
                for (a, c) in row.iter().enumerate() {
                    let n = c.load(Ordering::Relaxed);
                    if n > 0 {
                        let (tn, an) = names(t, a);
                        v.push((dir, tn, an, n));
                    }
                }
            }
        }
        v
    }
}

fn names(t: usize, a: usize) -> (&'static str, &'static str) {
    match t {
        0 | 1 => {
            let tn = if t == 0 { "INSTALL_CONNECTION" } else { "REMOVE_CONNECTION" };
            (tn, if a == 1 { "FORWARD" } else { "BYPASS" })
        }
        3 => ("DICT_STATS", "ADVERTISE"),
        4 => ("LOAD", "ADVERTISE"),
        _ => (
            "CLUSTER_PEER_SYNC",
            match a {
                1 => "PEER_JOIN",
                2 => "PEER_KEEPALIVE",
                3 => "PEER_LEAVE",
                _ => "PEER_REJECT",
            },
        ),
    }
}

/// Something that happened to a control channel; given to the [`MeshObserver`].
#[derive(Clone, Debug, PartialEq)]
pub enum MeshEvent {
    /// A channel with the peer became the current one (joined).
    PeerUp {
        /// Peer address.
        peer: IpAddr,
    },
    /// The current channel with the peer closed and its entries were purged (or, for a
    /// graceful restart, kept stale: `purged` is 0 and [`MeshEvent::StalePurged`] follows).
    PeerDown {
        /// Peer address.
        peer: IpAddr,
        /// Why (a [`crate::session::CloseReason`] name).
        reason: &'static str,
        /// Entries purged.
        purged: usize,
    },
    /// A graceful restart's grace period ended: the peer's entries it did not send again
    /// were purged.
    StalePurged {
        /// Peer address.
        peer: IpAddr,
        /// Entries purged.
        purged: usize,
    },
    /// This member's table was handed to the transport for a peer.
    TableSent {
        /// Peer address.
        peer: IpAddr,
        /// Entries sent.
        entries: usize,
        /// From the join to the last byte handed to the transport.
        duration: Duration,
    },
    /// A PEER_REJECT was sent or received.
    Reject {
        /// The remote address.
        peer: IpAddr,
        /// The error code.
        code: ErrorCode,
        /// True when this member sent it.
        sent: bool,
    },
    /// A peer was declared dead for silence.
    KeepaliveTimeout {
        /// Peer address.
        peer: IpAddr,
    },
    /// A REMOVE named an entry owned by another member; or an INSTALL claimed a connection
    /// another member claims too: "install_replaced" (its claim owns it now, the other
    /// waits), "install_contested" (it waits behind a lower member's claim).
    OwnershipConflict {
        /// The sender.
        peer: IpAddr,
        /// "remove_not_owner", "install_replaced" or "install_contested".
        kind: &'static str,
    },
    /// This member's own claim on a connection lost to a member with a lower id that claimed
    /// it at the same time; it was withdrawn (REMOVE sent).
    ClaimLost {
        /// The connection.
        connection: crate::flow::Connection,
        /// The owning member.
        owner: IpAddr,
    },
    /// An INSTALL was refused by the flood guard.
    InstallRefused {
        /// The sender.
        peer: IpAddr,
        /// "entry_limit" or "rate_limit".
        reason: &'static str,
    },
    /// Advertisement messages (DICT_STATS, LOAD) sent to, received from, or not sent to a peer.
    Advertisements {
        /// The peer.
        peer: IpAddr,
        /// What happened to them.
        outcome: AdvertisementOutcome,
        /// How many messages.
        messages: u64,
    },
    /// A peer refused our PEER_JOIN(`from`) with PEER_REJECT(version mismatch); it is dialed
    /// with PEER_JOIN(`to`) from now on.
    VersionFallback {
        /// The peer.
        peer: IpAddr,
        /// The version refused.
        from: u8,
        /// The version offered instead.
        to: u8,
    },
    /// A channel was refused before or at the join for a reason other than a reject
    /// (garbage, wrong first message, timeout, too many pending joins).
    ChannelRefused {
        /// The remote address.
        peer: IpAddr,
        /// Why.
        reason: &'static str,
    },
}

/// What happened to advertisement messages, for [`MeshEvent::Advertisements`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AdvertisementOutcome {
    /// Handed to a version-2 peer's session.
    Sent,
    /// Received from a peer and given to the listener.
    Received,
    /// Not sent: the peer's send queue was too full (advertisements are periodic, the next
    /// one replaces it) or its channel closed meanwhile.
    Dropped,
    /// Not sent: the peer's channel runs at version 1.
    SkippedV1,
}

impl AdvertisementOutcome {
    /// A short stable name for metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            AdvertisementOutcome::Sent => "sent",
            AdvertisementOutcome::Received => "received",
            AdvertisementOutcome::Dropped => "dropped",
            AdvertisementOutcome::SkippedV1 => "skipped_v1",
        }
    }
}

/// Advertisement and version counters of a mesh, summed over all peers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AdvertisementStats {
    /// Advertisement messages handed to version-2 peers' sessions.
    pub sent: u64,
    /// Advertisement messages received from peers.
    pub received: u64,
    /// Advertisement messages dropped for a full send queue or a closed channel.
    pub dropped: u64,
    /// Advertisement messages not sent because the peer's channel runs at version 1.
    pub skipped_v1: u64,
    /// Times a peer refused our PEER_JOIN(2) and was dialed again with PEER_JOIN(1).
    pub version_fallbacks: u64,
}

#[derive(Default)]
pub(crate) struct AdvertisementCounters {
    pub(crate) sent: AtomicU64,
    pub(crate) received: AtomicU64,
    pub(crate) dropped: AtomicU64,
    pub(crate) skipped_v1: AtomicU64,
    pub(crate) version_fallbacks: AtomicU64,
}

impl AdvertisementCounters {
    pub(crate) fn add(&self, outcome: AdvertisementOutcome, n: u64) {
        let c = match outcome {
            AdvertisementOutcome::Sent => &self.sent,
            AdvertisementOutcome::Received => &self.received,
            AdvertisementOutcome::Dropped => &self.dropped,
            AdvertisementOutcome::SkippedV1 => &self.skipped_v1,
        };
        c.fetch_add(n, Ordering::Relaxed);
    }

    pub(crate) fn snapshot(&self) -> AdvertisementStats {
        let l = |c: &AtomicU64| c.load(Ordering::Relaxed);
        AdvertisementStats {
            sent: l(&self.sent),
            received: l(&self.received),
            dropped: l(&self.dropped),
            skipped_v1: l(&self.skipped_v1),
            version_fallbacks: l(&self.version_fallbacks),
        }
    }
}

/// Receives [`MeshEvent`]s synchronously from the mesh tasks; must not block.
pub trait MeshObserver: Send + Sync + 'static {
    /// Called once per event.
    fn on_event(&self, event: &MeshEvent);
}

/// An observer that ignores everything.
pub struct NoObserver;

impl MeshObserver for NoObserver {
    fn on_event(&self, _: &MeshEvent) {}
}

/// Peer state as shown by `GET /peers`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PeerState {
    /// No channel; the dialer is waiting to retry.
    Down,
    /// Dialing or exchanging PEER_JOIN.
    Connect,
    /// Joined; tables being exchanged.
    Synchronize,
    /// Joined and this member's table sent.
    Established,
    /// The dialer used up its connect attempts; the peer may still dial in.
    GaveUp,
}

impl PeerState {
    /// The snake_case name.
    pub fn as_str(self) -> &'static str {
        match self {
            PeerState::Down => "down",
            PeerState::Connect => "connect",
            PeerState::Synchronize => "synchronize",
            PeerState::Established => "established",
            PeerState::GaveUp => "gave_up",
        }
    }
}

/// One peer as shown by `GET /peers` (and read back by `lb peers`).
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct PeerInfo {
    /// Peer's cluster address.
    pub address: IpAddr,
    /// Control port dialed.
    pub port: u16,
    /// Channel state.
    pub state: PeerState,
    /// Protocol version of the current channel (`None` without one).
    pub version: Option<u8>,
    /// Which end dialed the current channel.
    pub role: Option<crate::session::Role>,
    /// Seconds in the current state.
    pub since_secs: u64,
    /// Entries this member holds for the peer.
    pub entries: usize,
    /// Keepalive interval used with this peer, in ms.
    pub keepalive_ms: u64,
    /// Silent intervals before the peer is dead.
    pub dead_after: u32,
    /// Failed connect attempts in a row.
    pub connect_failures: u32,
    /// Why the last channel closed.
    pub last_close: Option<String>,
    /// Times the peer was declared dead for silence.
    pub keepalive_timeouts: u64,
    /// Times a joined channel with the peer closed (its entries were purged each time).
    pub channels_lost: u64,
    /// The longest gap, in ms, between bytes received from the peer on its current channel:
    /// the peer is declared dead when it reaches `keepalive_ms * dead_after`.
    pub max_silence_ms: u64,
    /// Graceful restart in progress: ms left of the grace period during which the peer's
    /// entries are kept, stale (`None` otherwise).
    pub restart_grace_left_ms: Option<u64>,
}
