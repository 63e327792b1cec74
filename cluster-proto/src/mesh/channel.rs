//! One control channel: a [`Session`] driven over a `TcpStream`.

use std::io::Read;
use std::net::IpAddr;
use std::os::fd::{FromRawFd, RawFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;

use super::{AdvertisementOutcome, CloseSignal, Inner, MeshEvent, Outgoing, PeerState};
use crate::database::{InstallOutcome, MemberId, RemoveOutcome, PARTS};
use crate::flow::{Action, Connection};
use crate::session::{Admission, CloseReason, Counters, Event, Role, Session};
use crate::wire::{self, ErrorCode};

/// Messages taken from the queue in one go.
const BATCH: usize = 4096;

/// How a channel ended, for the dialer's retry policy.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Outcome {
    /// It was the peer's current channel for a while.
    WasCurrent,
    /// Another channel with the same peer was kept instead.
    Duplicate,
    /// The peer refused the join for another reason.
    Rejected(ErrorCode),
    /// It closed before joining.
    Failed(&'static str),
}

/// Per-channel flood guard: an entry cap per owner and a token bucket on INSTALLs whose
/// burst is the cap, so a full table sync passes and a sustained flood does not.
struct FloodGuard {
    tokens: f64,
    last: Instant,
}

impl FloodGuard {
    fn new(inner: &Inner) -> Self {
        FloodGuard { tokens: inner.flood_max_entries.load(Ordering::Relaxed) as f64, last: Instant::now() }
    }

    /// For `n` INSTALLs received at `now`: when even `n` new entries would stay within the
    /// entry cap, how many of them (the first ones) the token bucket lets pass, exactly as
    /// [`FloodGuard::refuse`] one at a time would; `None` near the cap (call `refuse`).
    fn admit(&mut self, inner: &Inner, p: MemberId, now: Instant, n: usize) -> Option<usize> {
        let max_entries = inner.flood_max_entries.load(Ordering::Relaxed);
        if entries_of(inner, p) + n > max_entries {
            return None;
        }
        let rate = inner.flood_rate.load(Ordering::Relaxed);
        self.tokens = (self.tokens + now.duration_since(self.last).as_secs_f64() * rate as f64).min(max_entries as f64);
        self.last = now;
        let pass = (self.tokens.max(0.0).floor() as usize).min(n);
        self.tokens -= pass as f64;
        Some(pass)
    }

    fn refuse(&mut self, inner: &Inner, p: MemberId, now: Instant) -> Option<&'static str> {
        // Read at every INSTALL: a reload's new limits hold from the next one on.
        let max_entries = inner.flood_max_entries.load(Ordering::Relaxed);
        let rate = inner.flood_rate.load(Ordering::Relaxed);
        if entries_of(inner, p) >= max_entries {
            return Some("entry_limit");
        }
        let cap = max_entries as f64;
        self.tokens = (self.tokens + now.duration_since(self.last).as_secs_f64() * rate as f64).min(cap);
        self.last = now;
        if self.tokens < 1.0 {
            return Some("rate_limit");
        }
        self.tokens -= 1.0;
        None
    }
}

/// Entries `p` owns in the database.
fn entries_of(inner: &Inner, p: MemberId) -> usize {
    inner.db.count_of(p, crate::flow::Action::Forward) + inner.db.count_of(p, crate::flow::Action::Bypass)
}

/// The longest gap between bytes received on the current channel, published per peer
/// (`PeerInfo::max_silence_ms`): how close the peer came to being declared dead.
struct Silence {
    last: Option<Instant>,
}

impl Silence {
    fn heard(&mut self, inner: &Inner, peer: Option<MemberId>, current: bool, now: Instant) {
        let (Some(p), true) = (peer, current) else { return };
        if let Some(last) = self.last {
            let gap = now.duration_since(last).as_millis() as u64;
            inner.max_silence_ms[p.0 as usize].fetch_max(gap, Ordering::Relaxed);
        }
        self.last = Some(now);
    }
}

/// Where a table sync being sent stands: the next part of the local table to encode, and
/// the entries encoded so far.
struct SyncCursor {
    part: usize,
    entries: usize,
}

/// Encodes the next parts of the local table while few bytes wait for the transport; ends
/// the table after the last part. Each part is read under the lock that serializes local
/// changes with their broadcast (module docs of the mesh).
fn refill_table(inner: &Inner, s: &mut Session, sync: &mut Option<SyncCursor>, table_entries: &mut usize) {
    let Some(cursor) = sync.as_mut() else { return };
    if s.pending_bytes() >= super::SYNC_LOW_WATER {
        return;
    }
    let now = Instant::now();
    let out = inner.outbound.lock().unwrap_or_else(|e| e.into_inner());
    while cursor.part < PARTS && s.pending_bytes() < super::SYNC_LOW_WATER {
        inner.local.for_each_in_part(cursor.part, |e| {
            s.send_table_entry(now, e.action, e.connection);
            cursor.entries += 1;
        });
        cursor.part += 1;
    }
    drop(out);
    if cursor.part == PARTS {
        *table_entries = cursor.entries;
        *sync = None;
        s.end_table();
    }
}

/// INSTALLs received in a row, applied together: the peer's slot is checked once, the clocks
/// read once.
const INGEST_BATCH: usize = 4096;

/// Applies a batch of INSTALL_CONNECTIONs from the peer (if this channel is its current one),
/// in order, then empties the batch.
fn ingest(
    inner: &Inner,
    remote: IpAddr,
    peer: Option<MemberId>,
    channel: u64,
    guard: &mut FloodGuard,
    batch: &mut Vec<(Connection, Action)>,
) {
    if batch.is_empty() {
        return;
    }
    let p = peer.expect("members only");
    // Held for the whole batch: a purge of the peer's entries waits for it, so none of them
    // outlives the channel.
    let slot = inner.slot(p);
    if slot.current.as_ref().map(|c| c.channel) != Some(channel) {
        batch.clear();
        return;
    }
    let now = Instant::now();
    let t = inner.db.now_secs();
    let listener = inner.install_listener.load();
    let installed = |connection: &Connection, outcome: InstallOutcome| {
        // Our own claim takes part too: recorded first, checked second (the other way round
        // in Mesh::claim), so one of the two always sees both.
        if inner.local.lookup(connection).is_some() {
            let owner = inner.db.local_claimed(connection);
            if owner != inner.me {
                inner.withdraw(connection, owner);
            }
        }
        if let Some(listener) = listener.as_ref() {
            listener(connection);
        }
        let kind = match outcome {
            InstallOutcome::Replaced { previous_owner, .. } if previous_owner != p => Some("install_replaced"),
            InstallOutcome::Contested { .. } => Some("install_contested"),
            _ => None,
        };
        if let Some(kind) = kind {
            inner.observer.on_event(&MeshEvent::OwnershipConflict { peer: remote, kind });
        }
    };
    match guard.admit(inner, p, now, batch.len()) {
        // Far from the entry cap: the first `n` pass the rate limit, and go in at once.
        Some(n) => {
            for _ in n..batch.len() {
                inner.observer.on_event(&MeshEvent::InstallRefused { peer: remote, reason: "rate_limit" });
            }
            let mut outcomes = Vec::with_capacity(n);
            inner.db.install_many(&batch[..n], p, t, &mut outcomes);
            for (&(connection, _), &outcome) in batch[..n].iter().zip(&outcomes) {
                installed(&connection, outcome);
            }
        }
        // Near it: one at a time, each checked against the cap.
        None => {
            for &(connection, action) in batch.iter() {
                if let Some(reason) = guard.refuse(inner, p, now) {
                    inner.observer.on_event(&MeshEvent::InstallRefused { peer: remote, reason });
                    continue;
                }
                installed(&connection, inner.db.install_at(&connection, p, action, t));
            }
        }
    }
    drop(slot);
    batch.clear();
}

/// Hands one queued update to the session.
fn apply(inner: &Inner, remote: IpAddr, s: &mut Session, now: Instant, c: Outgoing, sync: &mut Option<SyncCursor>) {
    match c {
        Outgoing::TableStart => {
            *sync = Some(SyncCursor { part: 0, entries: 0 });
        }
        Outgoing::Install(a, c) => {
            s.install(now, a, c);
        }
        Outgoing::Remove(a, c) => {
            s.remove(now, a, c);
        }
        Outgoing::Advertise(bytes, messages) => {
            let outcome =
                if s.advertise(now, &bytes) { AdvertisementOutcome::Sent } else { AdvertisementOutcome::Dropped };
            inner.advertisements.add(outcome, messages);
            inner.observer.on_event(&MeshEvent::Advertisements { peer: remote, outcome, messages });
        }
    }
}

/// Counts a live channel; the mesh's shutdown waits for the count to reach zero.
struct ActiveGuard(Arc<Inner>);

impl ActiveGuard {
    fn new(inner: &Arc<Inner>) -> Self {
        inner.active_channels.fetch_add(1, Ordering::AcqRel);
        ActiveGuard(inner.clone())
    }
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        if self.0.active_channels.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

/// Runs the channel until it closes. `peer` is `None` for a stranger (accepted only to be
/// rejected); `pending` is released once the join completes.
pub(super) async fn run<S: AsyncRead + AsyncWrite + Unpin + Send>(
    inner: Arc<Inner>,
    stream: S,
    raw: Option<RawFd>,
    role: Role,
    peer: Option<MemberId>,
    remote: IpAddr,
    mut pending: Option<super::admission::Pending>,
) -> Outcome {
    let _active = ActiveGuard::new(&inner);
    let (mut rd, mut wr) = tokio::io::split(stream);
    // A copy of the head of the session's unsent bytes, being written; the session is told
    // only what the transport took.
    let mut wbuf: Vec<u8> = Vec::with_capacity(64 * 1024);
    let mut need_flush = false;
    let admission = if peer.is_some() { Admission::Member } else { Admission::NotMember };
    let mut s = Session::new(role, admission, inner.channel_config(peer, role), Instant::now());
    if let Some(p) = peer {
        s = s.with_peer_member(p);
    }
    let channel = inner.next_channel.fetch_add(1, Ordering::Relaxed);
    let (tx, mut rx) = mpsc::channel::<Outgoing>(inner.config.send_queue);
    let close = CloseSignal::new();
    let mut shutdown = inner.shutdown.subscribe();
    if *shutdown.borrow() {
        // A channel accepted or dialed just as the member stops would never see the change
        // (a new receiver has seen the current value): make the loop act on it at once,
        // instead of leaving a zombie channel that speaks for a stopped member.
        shutdown.mark_changed();
    }
    let mut current = false;
    let mut outcome = Outcome::Failed("closed before join");
    let mut joined_at: Option<Instant> = None;
    let mut table_entries = 0usize;
    let mut sync: Option<SyncCursor> = None;
    let mut installs: Vec<(Connection, Action)> = Vec::with_capacity(INGEST_BATCH);
    let mut counted = Counters::default();
    let mut buf = vec![0u8; 64 * 1024];
    let mut reason = CloseReason::TransportClosed;
    let mut guard = FloodGuard::new(&inner);
    let mut silence = Silence { last: None };
    // Test aid: outgoing updates wait this long, as over a long-distance link.
    let delay = inner.config.send_delay;
    let mut delayed: std::collections::VecDeque<(Instant, Outgoing)> = std::collections::VecDeque::new();

    'run: loop {
        refill_table(&inner, &mut s, &mut sync, &mut table_entries);
        while let Some(ev) = s.poll_event() {
            if let Event::Install { action, connection } = ev {
                installs.push((connection, action));
                if installs.len() >= INGEST_BATCH {
                    ingest(&inner, remote, peer, channel, &mut guard, &mut installs);
                }
                continue;
            }
            // Updates apply in the order they came: the INSTALLs before this event first.
            ingest(&inner, remote, peer, channel, &mut guard, &mut installs);
            let now = Instant::now();
            match ev {
                Event::JoinRequested => {
                    let p = peer.expect("only members get JoinRequested");
                    if inner.join(p, channel, role, s.version(), s.peer_restart_time(), &tx, &close) {
                        s.accept(now);
                        current = true;
                        outcome = Outcome::WasCurrent;
                        joined_at = Some(now);
                        pending.take();
                    } else {
                        s.reject(now, ErrorCode::DUPLICATE_CHANNEL);
                        outcome = Outcome::Duplicate;
                    }
                }
                Event::Joined => {
                    if role == Role::Initiator {
                        let p = peer.expect("initiators dial members");
                        if inner.join(p, channel, role, s.version(), s.peer_restart_time(), &tx, &close) {
                            current = true;
                            outcome = Outcome::WasCurrent;
                            joined_at = Some(now);
                        } else {
                            s.leave(now, ErrorCode::DUPLICATE_CHANNEL);
                            outcome = Outcome::Duplicate;
                        }
                    }
                }
                Event::Established => {
                    if let (Some(p), Some(t0)) = (peer, joined_at) {
                        let mut slot = inner.slot(p);
                        if slot.current.as_ref().map(|c| c.channel) == Some(channel) {
                            slot.set_state(PeerState::Established);
                        }
                        drop(slot);
                        inner.observer.on_event(&MeshEvent::TableSent {
                            peer: remote,
                            entries: table_entries,
                            duration: t0.elapsed(),
                        });
                    }
                }
                Event::Install { .. } => unreachable!("batched above"),
                Event::Remove { connection, .. } => {
                    let p = peer.expect("members only");
                    let slot = inner.slot(p);
                    if slot.current.as_ref().map(|c| c.channel) == Some(channel) {
                        if let RemoveOutcome::NotOwner(_) = inner.db.remove(&connection, p) {
                            inner
                                .observer
                                .on_event(&MeshEvent::OwnershipConflict { peer: remote, kind: "remove_not_owner" });
                        }
                    }
                }
                Event::Advertisement(bytes) => {
                    let p = peer.expect("members only");
                    let slot = inner.slot(p);
                    if slot.current.as_ref().map(|c| c.channel) == Some(channel) {
                        drop(slot);
                        inner.advertisements.add(AdvertisementOutcome::Received, 1);
                        inner.observer.on_event(&MeshEvent::Advertisements {
                            peer: remote,
                            outcome: AdvertisementOutcome::Received,
                            messages: 1,
                        });
                        if let Some(listener) = inner.advertisement_listener.load().as_ref() {
                            listener(p, &bytes);
                        }
                    }
                }
                Event::Closed(r) => {
                    reason = r;
                    match r {
                        CloseReason::Rejected(code) => {
                            inner.observer.on_event(&MeshEvent::Reject { peer: remote, code, sent: true });
                            tracing::info!(%remote, %code, "peering refused");
                        }
                        CloseReason::RejectedByPeer(code) => {
                            inner.observer.on_event(&MeshEvent::Reject { peer: remote, code, sent: false });
                            if code == ErrorCode::DUPLICATE_CHANNEL {
                                outcome = Outcome::Duplicate;
                            } else {
                                outcome = Outcome::Rejected(code);
                                tracing::warn!(%remote, %code, "peer refused our join");
                            }
                        }
                        CloseReason::Dead => {
                            if let Some(p) = peer {
                                inner.keepalive_timeouts[p.0 as usize].fetch_add(1, Ordering::Relaxed);
                            }
                            inner.observer.on_event(&MeshEvent::KeepaliveTimeout { peer: remote });
                            tracing::warn!(%remote, "peer silent for too long, declared dead");
                        }
                        CloseReason::NotJoin | CloseReason::JoinTimeout => {
                            inner.observer.on_event(&MeshEvent::ChannelRefused { peer: remote, reason: r.name() });
                            tracing::info!(%remote, reason = r.name(), "control channel closed before the join");
                        }
                        CloseReason::BadMessage(b) => {
                            tracing::warn!(%remote, ?b, "bad message, leaving the channel");
                        }
                        _ => tracing::debug!(%remote, reason = r.name(), "channel closed"),
                    }
                }
            }
        }
        ingest(&inner, remote, peer, channel, &mut guard, &mut installs);
        inner.messages.add_delta(s.counters(), &mut counted);
        if s.is_closed() {
            break 'run;
        }
        let deadline = s.poll_timeout().expect("open sessions have a timer");
        // Timers first, on every turn: a channel whose socket always has bytes to read (a
        // big table arriving) or always room to write (one being sent) must still send its
        // keepalives and notice a dead peer; a select would never reach the timer arm.
        let now = Instant::now();
        if now >= deadline {
            // A starved task may wake to its dead timer with the peer's bytes already
            // waiting in the socket: read them first, so a busy member does not declare a
            // live peer dead. The read goes straight to the (non-blocking) socket, since
            // tokio's readiness may not have caught up with it yet. (Plain TCP only: a TLS
            // stream's bytes must go through TLS.)
            if let Some(fd) = raw {
                // SAFETY: the descriptor belongs to the stream, alive for this whole
                // function; ManuallyDrop keeps this borrowed socket from closing it.
                let sock = std::mem::ManuallyDrop::new(unsafe { socket2::Socket::from_raw_fd(fd) });
                loop {
                    match (&*sock).read(&mut buf) {
                        Ok(0) => {
                            s.transport_closed();
                            break;
                        }
                        Ok(n) => {
                            silence.heard(&inner, peer, current, Instant::now());
                            s.handle_bytes(Instant::now(), &buf[..n]);
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                        Err(_) => {
                            s.transport_closed();
                            break;
                        }
                    }
                }
            }
            s.handle_timeout(Instant::now());
            continue 'run;
        }
        if wbuf.is_empty() {
            if let Some(bytes) = s.poll_transmit() {
                wbuf.extend_from_slice(&bytes[..bytes.len().min(64 * 1024)]);
            }
        }
        // Above this many queued bytes the channel stops taking updates from its queue, so a
        // peer that does not read fills the queue and is declared stalled.
        let can_take = current && s.pending_bytes() < inner.config.max_pending_bytes;
        // Not biased: whichever of reading, writing and taking updates is ready gets its turn
        // in random order, so none of them starves the others.
        tokio::select! {
            _ = close.notify.notified() => {
                s.leave(Instant::now(), ErrorCode(close.code.load(Ordering::Relaxed)));
            }
            _ = shutdown.changed() => {
                if inner.killed.load(Ordering::Acquire) {
                    reason = CloseReason::Left(ErrorCode::NONE);
                    break 'run;
                }
                // Announced a restart time on this channel: the peer keeps our entries.
                let restarting = s.version() >= wire::VERSION_2
                    && inner.session_config(None).restart_time > 0
                    && !inner.for_good.load(Ordering::Acquire);
                s.leave(Instant::now(), if restarting { ErrorCode::RESTARTING } else { ErrorCode::NONE });
            }
            // One write-side operation at a time: write the head of the unsent bytes, or
            // flush (TLS records) once they are all written. Each is cancel-safe.
            r = async {
                if wbuf.is_empty() {
                    wr.flush().await.map(|_| None)
                } else {
                    wr.write(&wbuf).await.map(Some)
                }
            }, if !wbuf.is_empty() || need_flush => match r {
                Ok(Some(0)) | Err(_) => s.transport_closed(),
                Ok(Some(n)) => {
                    s.advance_transmit(n);
                    wbuf.drain(..n);
                    need_flush = true;
                }
                Ok(None) => need_flush = false,
            },
            r = rd.read(&mut buf) => match r {
                Ok(0) | Err(_) => s.transport_closed(),
                Ok(n) => {
                    silence.heard(&inner, peer, current, Instant::now());
                    s.handle_bytes(Instant::now(), &buf[..n]);
                }
            },
            cmd = rx.recv(), if can_take => {
                let now = Instant::now();
                let mut next = cmd;
                let mut n = 0;
                while let Some(c) = next {
                    if delay.is_zero() {
                        apply(&inner, remote, &mut s, now, c, &mut sync);
                    } else {
                        delayed.push_back((now + delay, c));
                    }
                    n += 1;
                    next = if n < BATCH { rx.try_recv().ok() } else { None };
                }
            }
            _ = tokio::time::sleep_until(delayed.front().map_or(deadline, |d| d.0).into()), if !delayed.is_empty() => {
                let now = Instant::now();
                while delayed.front().is_some_and(|d| d.0 <= now) {
                    let (_, c) = delayed.pop_front().expect("checked");
                    apply(&inner, remote, &mut s, now, c, &mut sync);
                }
            }
            // Only wakes the loop: the timers are handled at the top of the next turn.
            _ = tokio::time::sleep_until(deadline.into()) => {}
        }
    }

    // Flush what is left (a PEER_LEAVE or PEER_REJECT), but never wait long for it.
    if !inner.killed.load(Ordering::Acquire) {
        let flush = async {
            while let Some(bytes) = s.poll_transmit() {
                match wr.write(bytes).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => s.advance_transmit(n),
                }
            }
            let _ = wr.flush().await;
            let _ = wr.shutdown().await;
        };
        let _ = tokio::time::timeout(std::time::Duration::from_secs(1), flush).await;
        inner.messages.add_delta(s.counters(), &mut counted);
    }
    drop((rd, wr));
    if let Some(p) = peer {
        if current {
            inner.channel_closed(p, channel, reason.name());
        }
    }
    outcome
}
