//! Deterministic tests of the session state machine: a two-endpoint pair and an N-member
//! in-memory cluster, driven with simulated time and no sockets.

use super::*;
use crate::database::{ConnectionDatabase, ConnectionTable, MemberId, RemoveOutcome};
use crate::flow::Protocol;
use crate::wire::VERSION_1;

fn cfg() -> SessionConfig {
    SessionConfig { version: VERSION_1, keepalive: Duration::from_millis(100), dead_after: 3, restart_time: 0 }
}

fn conn(i: u32) -> Connection {
    let src =
        std::net::SocketAddr::new(std::net::Ipv4Addr::from(0xC000_0200 | (i & 0xff)).into(), 1024 + (i >> 8) as u16);
    Connection::new(Protocol::Tcp, src, "198.51.100.80:80".parse().unwrap()).unwrap()
}

/// Moves every queued byte from `a` to `b`, `chunk` bytes at a time.
fn deliver(now: Instant, a: &mut Session, b: &mut Session, chunk: usize) -> bool {
    let mut moved = false;
    while let Some(bytes) = a.poll_transmit() {
        let n = bytes.len().min(chunk);
        let copy = bytes[..n].to_vec();
        a.advance_transmit(n);
        b.handle_bytes(now, &copy);
        moved = true;
    }
    moved
}

fn events(s: &mut Session) -> Vec<Event> {
    std::iter::from_fn(|| s.poll_event()).collect()
}

/// Runs the join between an initiator and an acceptor that admits members.
fn joined_pair(now: Instant) -> (Session, Session) {
    let mut a = Session::new(Role::Initiator, Admission::Member, cfg(), now);
    let mut b = Session::new(Role::Acceptor, Admission::Member, cfg(), now);
    deliver(now, &mut a, &mut b, usize::MAX);
    assert_eq!(events(&mut b), vec![Event::JoinRequested]);
    b.accept(now);
    deliver(now, &mut b, &mut a, usize::MAX);
    assert_eq!(events(&mut a), vec![Event::Joined]);
    assert_eq!(events(&mut b), vec![Event::Joined]);
    (a, b)
}

#[test]
fn join_is_the_first_exchange_on_both_ends() {
    let now = Instant::now();
    let mut a = Session::new(Role::Initiator, Admission::Member, cfg(), now);
    assert_eq!(a.poll_transmit(), Some(&[3u8, 1, 1, 0][..]), "initiator opens with PEER_JOIN(1)");
    let mut b = Session::new(Role::Acceptor, Admission::Member, cfg(), now);
    assert_eq!(b.poll_transmit(), None, "acceptor waits for the initiator");
    deliver(now, &mut a, &mut b, 1);
    assert_eq!(events(&mut b), vec![Event::JoinRequested]);
    b.accept(now);
    assert_eq!(b.poll_transmit(), Some(&[3u8, 1, 1, 0][..]), "acceptor answers with PEER_JOIN");
    assert_eq!(b.state(), State::Synchronize);
}

#[test]
fn tables_are_exchanged_then_established() {
    let now = Instant::now();
    let (mut a, mut b) = joined_pair(now);
    let table: Vec<_> = (0..5).map(|i| (conn(i), Action::Forward)).collect();
    a.send_table(now, &table);
    assert_eq!(a.state(), State::Synchronize, "not established until the table is handed over");
    b.send_table(now, &[]);
    assert_eq!(b.state(), State::Established, "an empty table is established at once (paper Fig. 6)");
    deliver(now, &mut a, &mut b, 7);
    assert_eq!(a.state(), State::Established);
    assert_eq!(events(&mut a), vec![Event::Established]);
    let got: Vec<_> = events(&mut b)
        .into_iter()
        .filter_map(|e| match e {
            Event::Install { action, connection } => Some((connection, action)),
            _ => None,
        })
        .collect();
    assert_eq!(got, table);
}

#[test]
fn non_member_gets_reject_not_a_member() {
    let now = Instant::now();
    let mut a = Session::new(Role::Initiator, Admission::Member, cfg(), now);
    let mut b = Session::new(Role::Acceptor, Admission::NotMember, cfg(), now);
    deliver(now, &mut a, &mut b, usize::MAX);
    assert_eq!(b.poll_transmit(), Some(&[3u8, 4, 1, 0][..]));
    assert_eq!(events(&mut b), vec![Event::Closed(CloseReason::Rejected(ErrorCode::NOT_A_MEMBER))]);
    deliver(now, &mut b, &mut a, usize::MAX);
    assert_eq!(events(&mut a), vec![Event::Closed(CloseReason::RejectedByPeer(ErrorCode::NOT_A_MEMBER))]);
}

#[test]
fn version_mismatch_gets_reject_version_mismatch() {
    let now = Instant::now();
    let mut a = Session::new(Role::Initiator, Admission::Member, SessionConfig { version: 2, ..cfg() }, now);
    let mut b = Session::new(Role::Acceptor, Admission::Member, cfg(), now);
    deliver(now, &mut a, &mut b, usize::MAX);
    assert_eq!(b.poll_transmit(), Some(&[3u8, 4, 2, 0][..]));
    deliver(now, &mut b, &mut a, usize::MAX);
    assert_eq!(events(&mut a), vec![Event::Closed(CloseReason::RejectedByPeer(ErrorCode::VERSION_MISMATCH))]);
}

#[test]
fn wrong_first_message_or_garbage_closes_silently() {
    let now = Instant::now();
    for first in [&[3u8, 2, 0, 0][..], b"GET / HTTP/1.0\r\n", &[1, 1, 6, 1, 0, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8]] {
        let mut b = Session::new(Role::Acceptor, Admission::Member, cfg(), now);
        b.handle_bytes(now, first);
        assert_eq!(events(&mut b), vec![Event::Closed(CloseReason::NotJoin)], "first bytes {first:?}");
        assert_eq!(b.poll_transmit(), None, "nothing is sent to a stranger");
    }
}

#[test]
fn unrecognized_message_after_join_gets_leave_bad_message() {
    let now = Instant::now();
    let (mut a, mut b) = joined_pair(now);
    b.handle_bytes(now, &[9, 9, 9, 9]);
    assert_eq!(b.poll_transmit(), Some(&[3u8, 3, 3, 0][..]));
    assert!(matches!(events(&mut b)[..], [Event::Closed(CloseReason::BadMessage(_))]));
    deliver(now, &mut b, &mut a, usize::MAX);
    assert_eq!(events(&mut a), vec![Event::Closed(CloseReason::PeerLeft(ErrorCode::BAD_MESSAGE))]);
}

#[test]
fn join_after_join_is_a_bad_message() {
    let now = Instant::now();
    let (_a, mut b) = joined_pair(now);
    b.handle_bytes(now, &[3, 1, 1, 0]);
    assert_eq!(events(&mut b), vec![Event::Closed(CloseReason::BadMessage(BadMessage::UnexpectedJoin))]);
}

#[test]
fn bytes_behind_the_join_wait_for_the_decision() {
    let now = Instant::now();
    let mut b = Session::new(Role::Acceptor, Admission::Member, cfg(), now);
    let mut bytes = vec![3, 1, 1, 0];
    Message::InstallConnection { action: Action::Bypass, connection: conn(1) }.encode(&mut bytes);
    b.handle_bytes(now, &bytes);
    assert_eq!(events(&mut b), vec![Event::JoinRequested]);
    b.accept(now);
    assert_eq!(events(&mut b), vec![Event::Joined, Event::Install { action: Action::Bypass, connection: conn(1) }]);
}

#[test]
fn keepalives_on_own_timer_reset_by_updates() {
    let t0 = Instant::now();
    let (mut a, mut b) = joined_pair(t0);
    a.send_table(t0, &[]);
    b.send_table(t0, &[]);
    deliver(t0, &mut a, &mut b, usize::MAX);
    assert_eq!(a.poll_timeout(), Some(t0 + Duration::from_millis(100)));
    // An INSTALL at 60 ms resets the keepalive timer.
    let t1 = t0 + Duration::from_millis(60);
    a.install(t1, Action::Forward, conn(2));
    assert_eq!(a.poll_timeout(), Some(t1 + Duration::from_millis(100)));
    deliver(t1, &mut a, &mut b, usize::MAX);
    a.handle_timeout(t0 + Duration::from_millis(100));
    assert_eq!(a.poll_transmit(), None, "no keepalive: an INSTALL went out 40 ms ago");
    let t2 = t1 + Duration::from_millis(100);
    a.handle_timeout(t2);
    assert_eq!(a.poll_transmit(), Some(&[3u8, 2, 0, 0][..]));
}

#[test]
fn silent_peer_is_dead_after_n_intervals() {
    let t0 = Instant::now();
    let (mut a, _b) = joined_pair(t0);
    let mut t = t0;
    // Keepalives go out but nothing comes back.
    while !a.is_closed() {
        t = a.poll_timeout().unwrap();
        a.handle_timeout(t);
        a.advance_transmit(a.pending_bytes());
    }
    assert_eq!(t - t0, Duration::from_millis(300), "3 x 100 ms");
    assert_eq!(events(&mut a).last(), Some(&Event::Closed(CloseReason::Dead)));
}

#[test]
fn acceptor_gives_up_without_join() {
    let t0 = Instant::now();
    let mut b = Session::new(Role::Acceptor, Admission::Member, cfg(), t0);
    let t = b.poll_timeout().unwrap();
    b.handle_timeout(t);
    assert_eq!(events(&mut b), vec![Event::Closed(CloseReason::JoinTimeout)]);
}

#[test]
fn leave_is_sent_and_seen() {
    let now = Instant::now();
    let (mut a, mut b) = joined_pair(now);
    a.leave(now, ErrorCode::NONE);
    assert!(!a.install(now, Action::Forward, conn(1)), "no updates after leaving");
    deliver(now, &mut a, &mut b, usize::MAX);
    assert_eq!(events(&mut b), vec![Event::Closed(CloseReason::PeerLeft(ErrorCode::NONE))]);
}

// ---------------------------------------------------------------------------------------
// An N-member in-memory cluster: every pair of members has one channel (the lower index
// dials), each member applies its peers' events to its ConnectionDatabase, and time is
// simulated.

struct Member {
    id: MemberId,
    local: ConnectionTable,
    db: ConnectionDatabase,
    alive: bool,
    /// Highest protocol version the member speaks.
    version: u8,
    /// Advertisement messages received, with their sender.
    adverts: std::cell::RefCell<Vec<(MemberId, Vec<u8>)>>,
}

struct Link {
    lo: usize,
    hi: usize,
    lo_side: Session,
    hi_side: Session,
}

struct Cluster {
    now: Instant,
    members: Vec<Member>,
    links: Vec<Link>,
    /// Version a member offers when dialing another, lowered after a version-mismatch reject
    /// (as the mesh does).
    dial_version: std::collections::HashMap<(usize, usize), u8>,
    /// Rejects seen by dialing members.
    rejects: Vec<(usize, usize, ErrorCode)>,
}

impl Cluster {
    fn new(n: usize) -> Self {
        Self::with_versions(&vec![VERSION_1; n])
    }

    /// A cluster whose member `i` speaks up to `versions[i]`.
    fn with_versions(versions: &[u8]) -> Self {
        let members = versions
            .iter()
            .enumerate()
            .map(|(i, &version)| Member {
                id: MemberId(i as u8),
                local: ConnectionTable::new(MemberId(i as u8)),
                db: ConnectionDatabase::new(),
                alive: true,
                version,
                adverts: Default::default(),
            })
            .collect();
        Cluster {
            now: Instant::now(),
            members,
            links: Vec::new(),
            dial_version: Default::default(),
            rejects: Vec::new(),
        }
    }

    fn session_config(&self, me: usize, peer: usize, role: Role) -> SessionConfig {
        let mut version = self.members[me].version;
        if role == Role::Initiator {
            version = version.min(*self.dial_version.get(&(me, peer)).unwrap_or(&version));
        }
        SessionConfig { version, ..cfg() }
    }

    /// Member `i` dials every live member it has no channel with.
    fn connect_all(&mut self) {
        let n = self.members.len();
        for lo in 0..n {
            for hi in lo + 1..n {
                let open = self.links.iter().any(|l| l.lo == lo && l.hi == hi);
                if !open && self.members[lo].alive && self.members[hi].alive {
                    let (lo_cfg, hi_cfg) =
                        (self.session_config(lo, hi, Role::Initiator), self.session_config(hi, lo, Role::Acceptor));
                    self.links.push(Link {
                        lo,
                        hi,
                        lo_side: Session::new(Role::Initiator, Admission::Member, lo_cfg, self.now)
                            .with_peer_member(self.members[hi].id),
                        hi_side: Session::new(Role::Acceptor, Admission::Member, hi_cfg, self.now)
                            .with_peer_member(self.members[lo].id),
                    });
                }
            }
        }
        self.settle();
    }

    /// Every session member `at` holds, one per link it is on.
    fn sides_of(&mut self, at: usize) -> impl Iterator<Item = &mut Session> {
        self.links.iter_mut().filter_map(move |l| {
            if l.lo == at {
                Some(&mut l.lo_side)
            } else if l.hi == at {
                Some(&mut l.hi_side)
            } else {
                None
            }
        })
    }

    fn install(&mut self, at: usize, c: Connection, action: Action) {
        self.members[at].local.insert(&c, action);
        let now = self.now;
        for side in self.sides_of(at) {
            side.install(now, action, c);
        }
    }

    fn remove(&mut self, at: usize, c: Connection) {
        let action = self.members[at].local.remove(&c).unwrap();
        let now = self.now;
        for side in self.sides_of(at) {
            side.remove(now, action, c);
        }
    }

    /// Member `at` advertises `bytes` on every channel; returns how many took them.
    fn advertise(&mut self, at: usize, bytes: &[u8]) -> usize {
        let now = self.now;
        self.sides_of(at).map(|side| side.advertise(now, bytes)).filter(|&sent| sent).count()
    }

    /// Delivers bytes and events until nothing moves.
    fn settle(&mut self) {
        let mut rejects = Vec::new();
        loop {
            let mut moved = false;
            for l in self.links.iter_mut() {
                let (lo_alive, hi_alive) = (self.members[l.lo].alive, self.members[l.hi].alive);
                if lo_alive && hi_alive {
                    moved |= deliver(self.now, &mut l.lo_side, &mut l.hi_side, 1500);
                    moved |= deliver(self.now, &mut l.hi_side, &mut l.lo_side, 1500);
                }
                for (me, peer, s) in [(l.lo, l.hi, &mut l.lo_side), (l.hi, l.lo, &mut l.hi_side)] {
                    if !self.members[me].alive {
                        continue;
                    }
                    while let Some(e) = s.poll_event() {
                        moved = true;
                        let m = &self.members[me];
                        let owner = self.members[peer].id;
                        match e {
                            Event::JoinRequested => s.accept(self.now),
                            Event::Joined => s.send_table(self.now, &m.local.snapshot()),
                            Event::Established => {}
                            Event::Install { action, connection } => {
                                m.db.install(&connection, owner, action);
                            }
                            Event::Remove { connection, .. } => {
                                assert_eq!(m.db.remove(&connection, owner), RemoveOutcome::Removed);
                            }
                            Event::Advertisement(bytes) => m.adverts.borrow_mut().push((owner, bytes)),
                            Event::Closed(reason) => {
                                m.db.purge_owner(owner);
                                if let CloseReason::RejectedByPeer(code) = reason {
                                    rejects.push((me, peer, code, s.version()));
                                }
                            }
                        }
                    }
                }
            }
            for (me, peer, code, offered) in rejects.drain(..) {
                self.rejects.push((me, peer, code));
                if code == ErrorCode::VERSION_MISMATCH && offered > VERSION_1 {
                    self.dial_version.insert((me, peer), offered - 1);
                }
            }
            self.links.retain(|l| !(l.lo_side.is_closed() && l.hi_side.is_closed()));
            if !moved {
                break;
            }
        }
    }

    /// Advances simulated time to `until`, firing live members' timers in order.
    fn run_until(&mut self, until: Instant) {
        loop {
            let next = self
                .links
                .iter()
                .flat_map(|l| [(l.lo, l.lo_side.poll_timeout()), (l.hi, l.hi_side.poll_timeout())])
                .filter(|(m, _)| self.members[*m].alive)
                .filter_map(|(_, t)| t)
                .min();
            match next {
                Some(t) if t <= until => {
                    self.now = t;
                    for l in self.links.iter_mut() {
                        if self.members[l.lo].alive {
                            l.lo_side.handle_timeout(t);
                        }
                        if self.members[l.hi].alive {
                            l.hi_side.handle_timeout(t);
                        }
                    }
                    self.settle();
                }
                _ => break,
            }
        }
        self.now = until;
    }

    /// Every live member's view: its own table plus its database.
    fn view(&self, i: usize) -> u64 {
        self.members[i].local.digest().wrapping_add(self.members[i].db.digest())
    }

    fn assert_converged(&self) {
        let live: Vec<_> = (0..self.members.len()).filter(|&i| self.members[i].alive).collect();
        for &i in &live[1..] {
            assert_eq!(self.view(i), self.view(live[0]), "member {i} differs from member {}", live[0]);
        }
    }
}

mod v2;

#[test]
fn cluster_joins_and_converges() {
    let mut c = Cluster::new(5);
    for m in 0..5 {
        for k in 0..50 {
            let action = if k % 5 == 0 { Action::Bypass } else { Action::Forward };
            c.install(m, conn(m as u32 * 1000 + k), action);
        }
    }
    c.connect_all();
    c.assert_converged();
    assert_eq!(c.members[0].db.len(), 200, "4 peers x 50 entries");
    c.remove(2, conn(2000));
    c.settle();
    c.assert_converged();
    assert_eq!(c.members[4].db.count_of(MemberId(2), Action::Bypass), 9);
}

#[test]
fn late_joiner_gets_the_full_table() {
    let mut c = Cluster::new(4);
    c.members[3].alive = false;
    c.connect_all();
    for m in 0..3 {
        c.install(m, conn(m as u32 * 100 + 1), Action::Forward);
    }
    c.settle();
    c.members[3].alive = true;
    c.connect_all();
    c.assert_converged();
    assert_eq!(c.members[3].db.len(), 3);
}

#[test]
fn dead_member_is_purged_after_n_intervals_and_rejoins() {
    let mut c = Cluster::new(3);
    for m in 0..3 {
        c.install(m, conn(m as u32 * 100 + 1), Action::Forward);
    }
    c.connect_all();
    let killed_at = c.now;
    c.members[1].alive = false; // kill -9: no more bytes, no more timers
    c.run_until(killed_at + Duration::from_millis(299));
    assert_eq!(c.members[0].db.count_of(MemberId(1), Action::Forward), 1, "still there before 3 intervals");
    c.run_until(killed_at + Duration::from_millis(400));
    assert_eq!(c.members[0].db.count_of(MemberId(1), Action::Forward), 0, "purged after 3 intervals");
    assert_eq!(c.members[2].db.count_of(MemberId(1), Action::Forward), 0);
    // The member restarts with its connections and a fresh state.
    c.links.retain(|l| l.lo != 1 && l.hi != 1);
    c.members[1].db = ConnectionDatabase::new();
    c.members[1].alive = true;
    c.connect_all();
    c.assert_converged();
    assert_eq!(c.members[1].db.len(), 2);
}

#[test]
fn leave_purges_at_once() {
    let mut c = Cluster::new(3);
    c.install(2, conn(7), Action::Forward);
    c.connect_all();
    assert_eq!(c.members[0].db.len(), 1);
    let now = c.now;
    for l in c.links.iter_mut() {
        if l.hi == 2 {
            l.hi_side.leave(now, ErrorCode::NONE);
        }
    }
    c.settle();
    assert_eq!(c.members[0].db.len(), 0);
    assert_eq!(c.members[1].db.len(), 0);
}

// The stable-toolchain twin of fuzz/fuzz_targets/session_frames.rs.
proptest::proptest! {
    #[test]
    fn arbitrary_frames_never_panic_nor_speak_after_close(
        mode in 0u8..8,
        chunks in proptest::collection::vec(proptest::collection::vec(proptest::prelude::any::<u8>(), 0..24), 0..40),
        // Valid messages mixed in, so the fuzzing reaches the joined states.
        prefix_join in proptest::prelude::any::<bool>(),
    ) {
        let role = if mode & 1 == 0 { Role::Acceptor } else { Role::Initiator };
        let admission = if mode & 2 == 0 { Admission::Member } else { Admission::NotMember };
        let t0 = Instant::now();
        let mut now = t0;
        // Bit 2: the member speaks version 2 (and the peer is member 1).
        let version = if mode & 4 == 0 { VERSION_1 } else { crate::wire::VERSION_2 };
        let mut s = Session::new(role, admission, SessionConfig { version, ..cfg() }, now).with_peer_member(MemberId(1));
        let mut closed = false;
        if prefix_join {
            s.handle_bytes(now, &[3, 1, version, 0]);
            // A LOAD: an advertisement at version 2, garbage at version 1.
            s.handle_bytes(now, &[5, 1, 1, 0, 0x3f, 0x80, 0, 0]);
        }
        for chunk in chunks {
            s.handle_bytes(now, &chunk);
            while let Some(e) = s.poll_event() {
                proptest::prop_assert!(!closed, "event after close: {:?}", e);
                match e {
                    Event::JoinRequested => s.accept(now),
                    Event::Joined => s.send_table(now, &[]),
                    // Only an acceptor judges membership (an initiator dialed a member).
                    Event::Install { .. } | Event::Remove { .. } if role == Role::Acceptor => {
                        proptest::prop_assert_eq!(admission, Admission::Member)
                    }
                    Event::Install { .. } | Event::Remove { .. } => {}
                    Event::Advertisement(bytes) => {
                        proptest::prop_assert!(s.version() >= 2, "advertisements only at version 2");
                        proptest::prop_assert_eq!(bytes[2], 1, "only the peer's own advertisements pass");
                    }
                    Event::Closed(_) => closed = true,
                    Event::Established => {}
                }
            }
            if let Some(b) = s.poll_transmit() {
                let n = b.len();
                s.advance_transmit(n);
            }
            now += Duration::from_millis(37);
            if let Some(t) = s.poll_timeout() {
                if t <= now {
                    s.handle_timeout(now);
                }
            }
        }
    }
}
