//! The peer session: one control channel's state machine (paper 2.3 and Fig. 6), sans-IO.
//!
//! The session never touches a socket or a clock. Its driver feeds it received bytes and the
//! current time, writes what [`Session::poll_transmit`] returns, arms a timer for
//! [`Session::poll_timeout`], and reacts to [`Session::poll_event`]:
//!
//! ```text
//!            initiator: send PEER_JOIN          acceptor: wait for PEER_JOIN
//!                        \                         /
//!                         +------ CONNECT --------+
//!                         |  PEER_JOIN exchanged  |  wrong first message, garbage,
//!                         v                       |  PEER_REJECT, join timeout -> CLOSED
//!                    SYNCHRONIZE   (each side sends its whole connection table)
//!                         |  own table handed to the transport
//!                         v
//!                    ESTABLISHED   (INSTALL/REMOVE, keepalives)
//!                         |  PEER_LEAVE, bad message, silence, local leave
//!                         v
//!                       CLOSED
//! ```
//!
//! Version negotiation: [`SessionConfig::version`] is the highest version this member speaks.
//! The initiator offers it in PEER_JOIN; an acceptor answers a PEER_JOIN(v) with
//! 1 <= v <= its own highest with PEER_JOIN(v) and the channel runs at v, and refuses any
//! other v with PEER_REJECT(version mismatch). A version-1 acceptor thus speaks exactly the
//! paper's rule (only v = 1 is accepted). The initiator accepts an answer from 1 up to what it
//! offered and leaves with PEER_LEAVE(version mismatch) otherwise. Falling back to version 1
//! after a PEER_REJECT(version mismatch) is the driver's job (it dials again offering 1).
//!
//! From version 2 on, a joined channel also carries the advertisement messages DICT_STATS and
//! LOAD; they surface as [`Event::Advertisement`] with the message's bytes. Their member byte
//! must be the peer's own id (set with [`Session::with_peer_member`]); anything else is a
//! bad message. At version 1 they are unknown message types, as in the paper.
//!
//! Keepalives: each side sends PEER_KEEPALIVE when it has sent nothing for one interval, so
//! INSTALL/REMOVE traffic resets the timer; a peer from which nothing was received for
//! `dead_after` intervals is dead.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::database::MemberId;
use crate::flow::{Action, Connection};
use crate::wire::{self, DecodeError, ErrorCode, Frame, Message};

/// Per-channel settings (per peer in the configuration).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SessionConfig {
    /// Highest protocol version this member speaks (1 or 2): offered in PEER_JOIN by an
    /// initiator, the upper bound of what an acceptor agrees to.
    pub version: u8,
    /// PEER_KEEPALIVE interval.
    pub keepalive: Duration,
    /// Number of silent intervals after which the peer is dead (the paper's 3 by default).
    pub dead_after: u32,
    /// Version 2, graceful restart: the restart time announced in PEER_JOIN, in seconds (how
    /// long peers keep this member's entries, stale, when it restarts); 0 for none. Never
    /// sent at version 1.
    pub restart_time: u8,
}

impl Default for SessionConfig {
    fn default() -> Self {
        SessionConfig {
            version: crate::wire::VERSION_1,
            keepalive: Duration::from_secs(1),
            dead_after: 3,
            restart_time: 0,
        }
    }
}

impl SessionConfig {
    /// How long the peer may stay silent before it is dead.
    pub fn dead_interval(&self) -> Duration {
        self.keepalive * self.dead_after.max(1)
    }
}

/// Which end of the TCP connection this session is (`"initiator"` or `"acceptor"` in
/// `GET /peers`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Dialed the peer; sends PEER_JOIN first.
    Initiator,
    /// Accepted the connection on the cluster port; waits for PEER_JOIN.
    Acceptor,
}

/// Whether the acceptor's peer is in the membership list (decided from its address).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admission {
    /// A configured member.
    Member,
    /// Not in the membership list: its PEER_JOIN gets PEER_REJECT(not a member).
    NotMember,
}

/// Channel states of Fig. 6 (INIT belongs to the node, before any channel exists).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    /// TCP is up; PEER_JOINs are being exchanged.
    Connect,
    /// Joined; the connection tables are being exchanged.
    Synchronize,
    /// This side's table has been sent; normal operation.
    Established,
    /// Closed; only queued bytes (a PEER_LEAVE or PEER_REJECT) may remain to be sent.
    Closed,
}

/// Why a session closed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CloseReason {
    /// The peer sent PEER_LEAVE.
    PeerLeft(ErrorCode),
    /// The peer refused our PEER_JOIN with PEER_REJECT.
    RejectedByPeer(ErrorCode),
    /// We refused the peer's PEER_JOIN.
    Rejected(ErrorCode),
    /// We left (shutdown, duplicate channel, stalled peer...).
    Left(ErrorCode),
    /// The first message was not PEER_JOIN.
    NotJoin,
    /// Bytes that do not decode, or a message out of place after the join.
    BadMessage(BadMessage),
    /// Nothing received for `dead_after` keepalive intervals after the join.
    Dead,
    /// No PEER_JOIN within `dead_after` keepalive intervals of the TCP connection.
    JoinTimeout,
    /// The transport closed (EOF or error); reported by the driver.
    TransportClosed,
}

impl CloseReason {
    /// A short stable name for logs and metric labels.
    pub fn name(&self) -> &'static str {
        match self {
            CloseReason::PeerLeft(ErrorCode::NONE) => "peer_left",
            CloseReason::PeerLeft(ErrorCode::BAD_MESSAGE) => "peer_left_bad_message",
            CloseReason::PeerLeft(ErrorCode::DUPLICATE_CHANNEL) => "peer_left_duplicate_channel",
            CloseReason::PeerLeft(ErrorCode::STALLED) => "peer_left_stalled",
            CloseReason::PeerLeft(ErrorCode::RESTARTING) => "peer_restarting",
            CloseReason::PeerLeft(_) => "peer_left_other",
            CloseReason::RejectedByPeer(_) => "rejected_by_peer",
            CloseReason::Rejected(_) => "rejected",
            CloseReason::Left(ErrorCode::NONE) => "left",
            CloseReason::Left(ErrorCode::DUPLICATE_CHANNEL) => "left_duplicate_channel",
            CloseReason::Left(ErrorCode::STALLED) => "left_stalled",
            CloseReason::Left(_) => "left_other",
            CloseReason::NotJoin => "not_join",
            CloseReason::BadMessage(_) => "bad_message",
            CloseReason::Dead => "dead",
            CloseReason::JoinTimeout => "join_timeout",
            CloseReason::TransportClosed => "transport_closed",
        }
    }
}

/// What made a message bad.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BadMessage {
    /// The bytes do not decode.
    Decode(DecodeError),
    /// A PEER_JOIN after the join.
    UnexpectedJoin,
    /// An advertisement whose member byte is not the sending peer's id.
    WrongMember {
        /// Byte 2 of the advertisement.
        claimed: u8,
    },
}

/// What the driver must react to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// Acceptor only: a member's PEER_JOIN with a version we speak arrived. Call
    /// [`Session::accept`] or [`Session::reject`].
    JoinRequested,
    /// Both PEER_JOINs are exchanged: SYNCHRONIZE. Call [`Session::send_table`].
    Joined,
    /// Our whole table has been handed to the transport: ESTABLISHED.
    Established,
    /// The peer installs a connection it owns.
    Install {
        /// FORWARD or BYPASS.
        action: Action,
        /// The connection.
        connection: Connection,
    },
    /// The peer removes a connection it owns.
    Remove {
        /// FORWARD or BYPASS.
        action: Action,
        /// The connection.
        connection: Connection,
    },
    /// Version 2: the peer advertises; one whole DICT_STATS or LOAD message, its member byte
    /// checked to be the peer's.
    Advertisement(Vec<u8>),
    /// The session is closed; flush [`Session::poll_transmit`], then close the transport.
    Closed(CloseReason),
}

/// Number of message types counted: INSTALL, REMOVE, PEER_SYNC, DICT_STATS, LOAD.
pub const COUNTED_TYPES: usize = 5;

/// Messages counted by type (index = message type - 1: 0 INSTALL, 1 REMOVE, 2 PEER_SYNC,
/// 3 DICT_STATS, 4 LOAD) and action code (1..=4), for metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// Messages received.
    pub rx: [[u64; 5]; COUNTED_TYPES],
    /// Messages sent.
    pub tx: [[u64; 5]; COUNTED_TYPES],
}

impl Counters {
    fn bump(table: &mut [[u64; 5]; COUNTED_TYPES], m: &Message) {
        let (t, a) = m.type_and_action();
        table[(t as usize - 1).min(2)][(a as usize).min(4)] += 1;
    }

    fn bump_advertisement(table: &mut [[u64; 5]; COUNTED_TYPES], t: u8) {
        let row = if t == wire::advertisement::DICT_STATS { 3 } else { 4 };
        table[row][wire::advertisement::ADVERTISE as usize] += 1;
    }
}

/// One control channel's protocol state.
pub struct Session {
    role: Role,
    admission: Admission,
    config: SessionConfig,
    /// The version offered or agreed: what the channel runs at once joined.
    version: u8,
    /// The peer's member id, if known: advertisements must carry it.
    peer_member: Option<MemberId>,
    /// The restart time the peer announced in its PEER_JOIN (version 2 channels only).
    peer_restart_time: u8,
    state: State,
    join_pending: bool,
    inbuf: Vec<u8>,
    out: Vec<u8>,
    out_pos: usize,
    sent_total: u64,
    queued_total: u64,
    sync_end: Option<u64>,
    last_rx: Instant,
    last_tx: Instant,
    events: VecDeque<Event>,
    counters: Counters,
}

impl Session {
    /// A new session on a freshly connected transport; an initiator queues its PEER_JOIN.
    pub fn new(role: Role, admission: Admission, config: SessionConfig, now: Instant) -> Self {
        let mut s = Session {
            role,
            admission,
            config,
            version: config.version,
            peer_member: None,
            peer_restart_time: 0,
            state: State::Connect,
            join_pending: false,
            inbuf: Vec::new(),
            out: Vec::with_capacity(4096),
            out_pos: 0,
            sent_total: 0,
            queued_total: 0,
            sync_end: None,
            last_rx: now,
            last_tx: now,
            events: VecDeque::new(),
            counters: Counters::default(),
        };
        if role == Role::Initiator {
            s.queue(now, s.join_message(config.version));
        }
        s
    }

    /// Our PEER_JOIN at `version`: the restart time goes in byte 3 from version 2 on.
    fn join_message(&self, version: u8) -> Message {
        let restart_time = if version >= wire::VERSION_2 { self.config.restart_time } else { 0 };
        Message::PeerJoin { version, restart_time }
    }

    /// The restart time the peer announced (graceful restart), in seconds; 0 on a version-1
    /// channel, before the join, or when the peer announced none.
    pub fn peer_restart_time(&self) -> u8 {
        self.peer_restart_time
    }

    /// Names the peer's member id: its advertisements must carry it in their member byte.
    pub fn with_peer_member(mut self, member: MemberId) -> Self {
        self.peer_member = Some(member);
        self
    }

    /// The protocol version the channel runs at once joined (agreed in the PEER_JOIN
    /// exchange; from [`Event::JoinRequested`] on for an acceptor). Before that: the version an
    /// initiator offers, or the acceptor's highest.
    pub fn version(&self) -> u8 {
        self.version
    }

    /// Current state.
    pub fn state(&self) -> State {
        self.state
    }

    /// Initiator or acceptor.
    pub fn role(&self) -> Role {
        self.role
    }

    /// The channel's settings.
    pub fn config(&self) -> &SessionConfig {
        &self.config
    }

    /// True once closed.
    pub fn is_closed(&self) -> bool {
        self.state == State::Closed
    }

    /// True after the PEER_JOIN exchange and before closing.
    pub fn is_joined(&self) -> bool {
        matches!(self.state, State::Synchronize | State::Established)
    }

    /// Messages counted so far.
    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    fn queue(&mut self, now: Instant, m: Message) {
        let before = self.out.len();
        m.encode(&mut self.out);
        self.queued_total += (self.out.len() - before) as u64;
        Counters::bump(&mut self.counters.tx, &m);
        self.last_tx = now;
    }

    fn close(&mut self, reason: CloseReason) {
        if self.state != State::Closed {
            self.state = State::Closed;
            self.events.push_back(Event::Closed(reason));
        }
    }

    /// Feeds bytes received from the peer.
    pub fn handle_bytes(&mut self, now: Instant, data: &[u8]) {
        if self.state == State::Closed || data.is_empty() {
            return;
        }
        if self.inbuf.is_empty() {
            let used = self.decode_from(now, data);
            if self.state != State::Closed {
                self.inbuf.extend_from_slice(&data[used..]);
            }
        } else {
            let mut buf = std::mem::take(&mut self.inbuf);
            buf.extend_from_slice(data);
            let used = self.decode_from(now, &buf);
            buf.drain(..used);
            if self.state != State::Closed {
                self.inbuf = buf;
            }
        }
    }

    /// Decodes whole messages from `buf`; returns the bytes consumed.
    fn decode_from(&mut self, now: Instant, buf: &[u8]) -> usize {
        let mut at = 0;
        while self.state != State::Closed && !self.join_pending {
            // Before the join only the paper's messages are known, whatever the versions.
            let version = if self.is_joined() { self.version } else { wire::VERSION_1 };
            match wire::decode_frame(&buf[at..], version) {
                Ok(Some((Frame::Message(m), n))) => {
                    at += n;
                    self.last_rx = now;
                    Counters::bump(&mut self.counters.rx, &m);
                    self.on_message(now, m);
                }
                Ok(Some((Frame::Advertisement(bytes), n))) => {
                    at += n;
                    self.last_rx = now;
                    Counters::bump_advertisement(&mut self.counters.rx, bytes[0]);
                    self.on_advertisement(now, bytes);
                }
                Ok(None) => break,
                Err(e) => {
                    if self.is_joined() {
                        // Paper 2.3: the rest of the stream cannot be parsed; say why and close.
                        self.queue(now, Message::PeerLeave { code: ErrorCode::BAD_MESSAGE });
                        self.close(CloseReason::BadMessage(BadMessage::Decode(e)));
                    } else {
                        self.close(CloseReason::NotJoin);
                    }
                    break;
                }
            }
        }
        at
    }

    fn on_message(&mut self, now: Instant, m: Message) {
        match (self.state, m) {
            (State::Connect, Message::PeerJoin { version, restart_time }) => {
                if self.role == Role::Acceptor {
                    if self.admission == Admission::NotMember {
                        self.reject(now, ErrorCode::NOT_A_MEMBER);
                    } else if version == 0 || version > self.config.version {
                        self.reject(now, ErrorCode::VERSION_MISMATCH);
                    } else {
                        self.version = version;
                        self.peer_restart_time = if version >= wire::VERSION_2 { restart_time } else { 0 };
                        self.join_pending = true;
                        self.events.push_back(Event::JoinRequested);
                    }
                } else if version == 0 || version > self.version {
                    self.leave(now, ErrorCode::VERSION_MISMATCH);
                } else {
                    self.version = version;
                    self.peer_restart_time = if version >= wire::VERSION_2 { restart_time } else { 0 };
                    self.state = State::Synchronize;
                    self.events.push_back(Event::Joined);
                }
            }
            (State::Connect, Message::PeerReject { code }) if self.role == Role::Initiator => {
                self.close(CloseReason::RejectedByPeer(code))
            }
            (State::Connect, _) => self.close(CloseReason::NotJoin),
            (_, Message::InstallConnection { action, connection }) => {
                self.events.push_back(Event::Install { action, connection })
            }
            (_, Message::RemoveConnection { action, connection }) => {
                self.events.push_back(Event::Remove { action, connection })
            }
            (_, Message::PeerKeepalive) => {}
            (_, Message::PeerLeave { code }) => self.close(CloseReason::PeerLeft(code)),
            (_, Message::PeerReject { code }) => self.close(CloseReason::RejectedByPeer(code)),
            (_, Message::PeerJoin { .. }) => {
                self.queue(now, Message::PeerLeave { code: ErrorCode::BAD_MESSAGE });
                self.close(CloseReason::BadMessage(BadMessage::UnexpectedJoin));
            }
        }
    }

    fn on_advertisement(&mut self, now: Instant, bytes: &[u8]) {
        let claimed = bytes[wire::advertisement::MEMBER];
        if self.peer_member.is_some_and(|p| p.0 != claimed) {
            // A member speaks only for itself.
            self.queue(now, Message::PeerLeave { code: ErrorCode::BAD_MESSAGE });
            self.close(CloseReason::BadMessage(BadMessage::WrongMember { claimed }));
            return;
        }
        self.events.push_back(Event::Advertisement(bytes.to_vec()));
    }

    /// Acceptor: admits the peer after [`Event::JoinRequested`]; replies with PEER_JOIN and
    /// enters SYNCHRONIZE. Bytes that arrived behind the PEER_JOIN are processed now.
    pub fn accept(&mut self, now: Instant) {
        if !self.join_pending || self.state != State::Connect {
            return;
        }
        self.join_pending = false;
        self.queue(now, self.join_message(self.version));
        self.state = State::Synchronize;
        self.events.push_back(Event::Joined);
        let pending = std::mem::take(&mut self.inbuf);
        self.handle_bytes(now, &pending);
    }

    /// Acceptor: refuses the peer's PEER_JOIN with PEER_REJECT and closes.
    pub fn reject(&mut self, now: Instant, code: ErrorCode) {
        if self.state == State::Closed {
            return;
        }
        self.join_pending = false;
        self.queue(now, Message::PeerReject { code });
        self.close(CloseReason::Rejected(code));
    }

    /// Sends PEER_LEAVE and closes (shutdown, duplicate channel, stalled peer).
    pub fn leave(&mut self, now: Instant, code: ErrorCode) {
        if self.state == State::Closed {
            return;
        }
        if self.state != State::Connect || self.role == Role::Initiator {
            self.queue(now, Message::PeerLeave { code });
        }
        self.close(CloseReason::Left(code));
    }

    /// The driver saw the transport close.
    pub fn transport_closed(&mut self) {
        self.close(CloseReason::TransportClosed);
    }

    /// SYNCHRONIZE: queues the whole local table. The channel becomes ESTABLISHED when these
    /// bytes have been handed to the transport (at once for an empty table).
    pub fn send_table<'a>(&mut self, now: Instant, table: impl IntoIterator<Item = &'a (Connection, Action)>) {
        for &(connection, action) in table {
            self.send_table_entry(now, action, connection);
        }
        self.end_table();
    }

    /// SYNCHRONIZE, a table handed over a part at a time (so the sender never copies it):
    /// queues one entry of the local table. Updates may be queued in between (with
    /// [`Session::install`] and [`Session::remove`]); the peer applies everything in order.
    pub fn send_table_entry(&mut self, now: Instant, action: Action, connection: Connection) {
        if self.state == State::Synchronize && self.sync_end.is_none() {
            self.queue(now, Message::InstallConnection { action, connection });
        }
    }

    /// The whole table has been queued ([`Session::send_table_entry`]): the channel becomes
    /// ESTABLISHED once these bytes have been handed to the transport.
    pub fn end_table(&mut self) {
        if self.state != State::Synchronize || self.sync_end.is_some() {
            return;
        }
        self.sync_end = Some(self.queued_total);
        self.check_established();
    }

    fn check_established(&mut self) {
        if let Some(end) = self.sync_end {
            if self.state == State::Synchronize && self.sent_total >= end {
                self.state = State::Established;
                self.sync_end = None;
                self.events.push_back(Event::Established);
            }
        }
    }

    /// Queues INSTALL_CONNECTION; ignored (false) before the join or after closing.
    pub fn install(&mut self, now: Instant, action: Action, connection: Connection) -> bool {
        self.send_update(now, Message::InstallConnection { action, connection })
    }

    /// Queues REMOVE_CONNECTION; ignored (false) before the join or after closing.
    pub fn remove(&mut self, now: Instant, action: Action, connection: Connection) -> bool {
        self.send_update(now, Message::RemoveConnection { action, connection })
    }

    fn send_update(&mut self, now: Instant, m: Message) -> bool {
        if !self.is_joined() {
            return false;
        }
        self.queue(now, m);
        true
    }

    /// Version 2: queues advertisement messages (whole DICT_STATS/LOAD messages, as checked
    /// by [`wire::split_advertisements`]). Ignored (false) before the join, after closing, on
    /// a version-1 channel, or if the bytes are not whole advertisement messages.
    pub fn advertise(&mut self, now: Instant, bytes: &[u8]) -> bool {
        if !self.is_joined() || self.version < wire::VERSION_2 {
            return false;
        }
        let Ok(msgs) = wire::split_advertisements(bytes) else { return false };
        for m in &msgs {
            Counters::bump_advertisement(&mut self.counters.tx, m[0]);
        }
        self.out.extend_from_slice(bytes);
        self.queued_total += bytes.len() as u64;
        self.last_tx = now;
        true
    }

    /// Bytes waiting to be written to the transport.
    pub fn poll_transmit(&self) -> Option<&[u8]> {
        (self.out_pos < self.out.len()).then(|| &self.out[self.out_pos..])
    }

    /// Bytes queued and not yet written.
    pub fn pending_bytes(&self) -> usize {
        self.out.len() - self.out_pos
    }

    /// The transport took `n` bytes of what [`Session::poll_transmit`] returned.
    pub fn advance_transmit(&mut self, n: usize) {
        let n = n.min(self.out.len() - self.out_pos);
        self.out_pos += n;
        self.sent_total += n as u64;
        if self.out_pos == self.out.len() {
            self.out.clear();
            self.out_pos = 0;
        } else if self.out_pos > 1 << 16 && self.out_pos * 2 > self.out.len() {
            self.out.drain(..self.out_pos);
            self.out_pos = 0;
        }
        self.check_established();
    }

    /// When [`Session::handle_timeout`] must be called next; `None` once closed.
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.state == State::Closed {
            return None;
        }
        let dead = self.last_rx + self.config.dead_interval();
        if self.is_joined() {
            Some(dead.min(self.last_tx + self.config.keepalive))
        } else {
            Some(dead)
        }
    }

    /// Fires timers: keepalive transmission, dead peer, join timeout.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.state == State::Closed {
            return;
        }
        if now >= self.last_rx + self.config.dead_interval() {
            if self.is_joined() {
                self.close(CloseReason::Dead);
            } else {
                self.close(CloseReason::JoinTimeout);
            }
            return;
        }
        if self.is_joined() && now >= self.last_tx + self.config.keepalive {
            self.queue(now, Message::PeerKeepalive);
        }
    }

    /// The next event, if any.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }
}

#[cfg(test)]
mod tests;
