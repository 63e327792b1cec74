//! Version 2: negotiation in PEER_JOIN, fallback to version 1, and the advertisement
//! messages DICT_STATS and LOAD.

use super::*;

fn cfg_v(version: u8) -> SessionConfig {
    SessionConfig { version, ..cfg() }
}

/// A LOAD message from `member` (load 1.0).
fn load(member: u8) -> Vec<u8> {
    vec![5, 1, member, 0, 0x3f, 0x80, 0, 0]
}

/// An IPv4 DICT_STATS message from `member` with `n` records.
fn dict_stats(member: u8, n: u16) -> Vec<u8> {
    let mut v = vec![4, 1, member, 1, 0, 0, 0, 7, 24, 32];
    v.extend_from_slice(&n.to_be_bytes());
    for i in 0..n {
        v.extend_from_slice(&[192, 0, 2, 0, 198, 51, 100, i as u8, 0x40, 0, 0, 0]);
    }
    v
}

/// Joins an initiator speaking up to `vi` (member 0) with an acceptor speaking up to `va`
/// (member 1); returns both and what the acceptor sent back.
fn pair(now: Instant, vi: u8, va: u8) -> (Session, Session) {
    let mut a = Session::new(Role::Initiator, Admission::Member, cfg_v(vi), now).with_peer_member(MemberId(1));
    let mut b = Session::new(Role::Acceptor, Admission::Member, cfg_v(va), now).with_peer_member(MemberId(0));
    deliver(now, &mut a, &mut b, usize::MAX);
    if events(&mut b) == vec![Event::JoinRequested] {
        b.accept(now);
    }
    deliver(now, &mut b, &mut a, usize::MAX);
    (a, b)
}

#[test]
fn v2_pair_negotiates_2_and_advertises_both_ways() {
    let now = Instant::now();
    let mut a = Session::new(Role::Initiator, Admission::Member, cfg_v(2), now).with_peer_member(MemberId(1));
    assert_eq!(a.poll_transmit(), Some(&[3u8, 1, 2, 0][..]), "initiator offers PEER_JOIN(2)");
    let mut b = Session::new(Role::Acceptor, Admission::Member, cfg_v(2), now).with_peer_member(MemberId(0));
    deliver(now, &mut a, &mut b, usize::MAX);
    assert_eq!(events(&mut b), vec![Event::JoinRequested]);
    assert_eq!(b.version(), 2);
    b.accept(now);
    assert_eq!(b.poll_transmit(), Some(&[3u8, 1, 2, 0][..]), "acceptor answers PEER_JOIN(2)");
    deliver(now, &mut b, &mut a, usize::MAX);
    assert_eq!(events(&mut a), vec![Event::Joined]);
    assert_eq!((a.version(), b.version()), (2, 2));
    // In SYNCHRONIZE already, and in pieces of one byte.
    let mut batch = dict_stats(0, 3);
    batch.extend_from_slice(&load(0));
    assert!(a.advertise(now, &batch));
    deliver(now, &mut a, &mut b, 1);
    assert_eq!(
        events(&mut b),
        vec![Event::Joined, Event::Advertisement(dict_stats(0, 3)), Event::Advertisement(load(0))]
    );
    assert!(b.advertise(now, &load(1)));
    deliver(now, &mut b, &mut a, usize::MAX);
    assert_eq!(events(&mut a), vec![Event::Advertisement(load(1))]);
    assert_eq!(a.counters().tx[3][1], 1, "one DICT_STATS sent");
    assert_eq!(a.counters().tx[4][1], 1, "one LOAD sent");
    assert_eq!(b.counters().rx[3][1] + b.counters().rx[4][1], 2);
    assert!(!a.is_closed() && !b.is_closed());
}

#[test]
fn v1_initiator_and_v2_acceptor_run_at_1_byte_exact() {
    let now = Instant::now();
    let mut a = Session::new(Role::Initiator, Admission::Member, cfg_v(1), now);
    let mut b = Session::new(Role::Acceptor, Admission::Member, cfg_v(2), now);
    assert_eq!(a.poll_transmit(), Some(&[3u8, 1, 1, 0][..]));
    deliver(now, &mut a, &mut b, usize::MAX);
    assert_eq!(events(&mut b), vec![Event::JoinRequested]);
    b.accept(now);
    assert_eq!(b.poll_transmit(), Some(&[3u8, 1, 1, 0][..]), "the v2 acceptor answers PEER_JOIN(1)");
    deliver(now, &mut b, &mut a, usize::MAX);
    assert_eq!(events(&mut a), vec![Event::Joined]);
    assert_eq!((a.version(), b.version()), (1, 1));
    assert!(!b.advertise(now, &load(1)), "no advertisements on a version-1 channel");
    assert_eq!(b.poll_transmit(), None);
}

#[test]
fn v2_initiator_gets_reject_from_v1_acceptor() {
    let now = Instant::now();
    let mut a = Session::new(Role::Initiator, Admission::Member, cfg_v(2), now);
    let mut b = Session::new(Role::Acceptor, Admission::Member, cfg_v(1), now);
    deliver(now, &mut a, &mut b, usize::MAX);
    assert_eq!(b.poll_transmit(), Some(&[3u8, 4, 2, 0][..]), "paper rule: PEER_REJECT(version mismatch)");
    deliver(now, &mut b, &mut a, usize::MAX);
    assert_eq!(events(&mut a), vec![Event::Closed(CloseReason::RejectedByPeer(ErrorCode::VERSION_MISMATCH))]);
}

#[test]
fn acceptor_refuses_versions_it_does_not_speak() {
    let now = Instant::now();
    for v in [0u8, 3, 255] {
        let mut b = Session::new(Role::Acceptor, Admission::Member, cfg_v(2), now);
        b.handle_bytes(now, &[3, 1, v, 0]);
        assert_eq!(b.poll_transmit(), Some(&[3u8, 4, 2, 0][..]), "PEER_JOIN({v})");
        assert_eq!(events(&mut b), vec![Event::Closed(CloseReason::Rejected(ErrorCode::VERSION_MISMATCH))]);
    }
}

#[test]
fn initiator_accepts_a_lower_answer_and_leaves_on_a_higher_one() {
    let now = Instant::now();
    let mut a = Session::new(Role::Initiator, Admission::Member, cfg_v(2), now);
    a.handle_bytes(now, &[3, 1, 1, 0]);
    assert_eq!(events(&mut a), vec![Event::Joined]);
    assert_eq!(a.version(), 1);
    for v in [0u8, 3] {
        let mut a = Session::new(Role::Initiator, Admission::Member, cfg_v(2), now);
        a.advance_transmit(4);
        a.handle_bytes(now, &[3, 1, v, 0]);
        assert_eq!(a.poll_transmit(), Some(&[3u8, 3, 2, 0][..]), "PEER_LEAVE(version mismatch) for {v}");
        assert_eq!(events(&mut a), vec![Event::Closed(CloseReason::Left(ErrorCode::VERSION_MISMATCH))]);
    }
}

#[test]
fn advertisement_on_a_v1_channel_is_a_bad_message() {
    let now = Instant::now();
    let (mut a, mut b) = pair(now, 1, 1);
    events(&mut a);
    events(&mut b);
    b.handle_bytes(now, &load(0));
    assert_eq!(b.poll_transmit(), Some(&[3u8, 3, 3, 0][..]), "PEER_LEAVE(bad message)");
    assert!(matches!(events(&mut b)[..], [Event::Closed(CloseReason::BadMessage(BadMessage::Decode(_)))]));
    deliver(now, &mut b, &mut a, usize::MAX);
    assert_eq!(events(&mut a), vec![Event::Closed(CloseReason::PeerLeft(ErrorCode::BAD_MESSAGE))]);
}

#[test]
fn advertisement_for_another_member_is_a_bad_message() {
    let now = Instant::now();
    let (mut a, mut b) = pair(now, 2, 2);
    events(&mut a);
    events(&mut b);
    b.handle_bytes(now, &dict_stats(2, 1));
    assert_eq!(b.poll_transmit(), Some(&[3u8, 3, 3, 0][..]));
    assert_eq!(events(&mut b), vec![Event::Closed(CloseReason::BadMessage(BadMessage::WrongMember { claimed: 2 }))]);
}

#[test]
fn advertisement_before_the_join_is_a_wrong_first_message() {
    let now = Instant::now();
    let mut b = Session::new(Role::Acceptor, Admission::Member, cfg_v(2), now);
    b.handle_bytes(now, &load(0));
    assert_eq!(events(&mut b), vec![Event::Closed(CloseReason::NotJoin)]);
    assert_eq!(b.poll_transmit(), None);
    let mut a = Session::new(Role::Initiator, Admission::Member, cfg_v(2), now);
    a.handle_bytes(now, &load(1));
    assert_eq!(events(&mut a), vec![Event::Closed(CloseReason::NotJoin)]);
}

#[test]
fn malformed_advertisements_are_bad_messages_and_partial_ones_wait() {
    let now = Instant::now();
    let too_many = {
        let mut m = dict_stats(0, 0);
        m[10..12].copy_from_slice(&4097u16.to_be_bytes());
        m
    };
    for bad in [vec![5u8, 2, 0, 0, 0, 0, 0, 0], vec![4, 1, 0, 3, 0, 0, 0, 0, 0, 0, 0, 0], too_many] {
        let (_a, mut b) = pair(now, 2, 2);
        events(&mut b);
        b.handle_bytes(now, &bad);
        assert_eq!(b.poll_transmit(), Some(&[3u8, 3, 3, 0][..]), "{bad:?}");
        assert!(matches!(events(&mut b)[..], [Event::Closed(CloseReason::BadMessage(_))]), "{bad:?}");
    }
    let (_a, mut b) = pair(now, 2, 2);
    events(&mut b);
    let whole = dict_stats(0, 2);
    b.handle_bytes(now, &whole[..whole.len() - 1]);
    assert_eq!(events(&mut b), vec![], "a cut DICT_STATS waits for its end");
    b.handle_bytes(now, &whole[whole.len() - 1..]);
    assert_eq!(events(&mut b), vec![Event::Advertisement(whole)]);
}

#[test]
fn advertise_takes_only_whole_advertisement_messages() {
    let now = Instant::now();
    let (mut a, _b) = pair(now, 2, 2);
    let before = a.pending_bytes();
    assert!(!a.advertise(now, &load(0)[..7]), "cut short");
    assert!(!a.advertise(now, &[3, 2, 0, 0]), "not an advertisement");
    assert_eq!(a.pending_bytes(), before);
    let fresh = Session::new(Role::Initiator, Admission::Member, cfg_v(2), now);
    let mut fresh = fresh;
    assert!(!fresh.advertise(now, &load(0)), "not before the join");
}

#[test]
fn cluster_of_v2_members_exchanges_advertisements() {
    let mut c = Cluster::with_versions(&[2, 2, 2]);
    c.install(0, conn(1), Action::Forward);
    c.connect_all();
    assert!(c.links.iter().all(|l| l.lo_side.version() == 2 && l.hi_side.version() == 2));
    for m in 0..3u8 {
        assert_eq!(c.advertise(m as usize, &load(m)), 2);
    }
    c.settle();
    for m in 0..3usize {
        let mut got: Vec<_> = c.members[m].adverts.borrow().iter().map(|(from, _)| from.0).collect();
        got.sort();
        let want: Vec<u8> = (0..3u8).filter(|&p| p as usize != m).collect();
        assert_eq!(got, want, "member {m}");
        for (from, bytes) in c.members[m].adverts.borrow().iter() {
            assert_eq!(bytes, &load(from.0));
        }
    }
    c.assert_converged();
}

#[test]
fn v2_member_falls_back_to_1_with_a_v1_member_and_installs_flow() {
    // Member 0 speaks 2 and dials member 1, which speaks only 1; member 2 speaks 2.
    let mut c = Cluster::with_versions(&[2, 1, 2]);
    c.install(0, conn(1), Action::Forward);
    c.install(1, conn(2), Action::Bypass);
    c.connect_all();
    assert!(c.rejects.contains(&(0, 1, ErrorCode::VERSION_MISMATCH)), "{:?}", c.rejects);
    assert_eq!(c.dial_version.get(&(0, 1)), Some(&1));
    c.connect_all();
    c.assert_converged();
    for l in &c.links {
        let want = if l.lo == 0 && l.hi == 2 { 2 } else { 1 };
        assert_eq!((l.lo_side.version(), l.hi_side.version()), (want, want), "link {}-{}", l.lo, l.hi);
    }
    c.install(0, conn(3), Action::Forward);
    assert_eq!(c.advertise(0, &load(0)), 1, "only the v2 peer takes advertisements");
    c.settle();
    c.assert_converged();
    assert_eq!(c.members[1].db.count_of(MemberId(0), Action::Forward), 2);
    assert!(c.members[1].adverts.borrow().is_empty());
    assert_eq!(c.members[2].adverts.borrow().len(), 1);
}

/// Graceful restart: the restart time rides in byte 3 of PEER_JOIN from version 2 on, both
/// ways; at version 1 byte 3 stays 0 (the paper's bytes) and nothing is learned from it.
#[test]
fn restart_time_is_announced_in_peer_join_at_version_2_only() {
    let now = Instant::now();
    let with = |version: u8, restart_time: u8| SessionConfig { version, restart_time, ..cfg() };
    let mut a = Session::new(Role::Initiator, Admission::Member, with(2, 60), now);
    assert_eq!(a.poll_transmit().map(|b| b.to_vec()), Some(vec![3, 1, 2, 60]));
    let mut b = Session::new(Role::Acceptor, Admission::Member, with(2, 30), now);
    deliver(now, &mut a, &mut b, 1);
    assert_eq!(events(&mut b), vec![Event::JoinRequested]);
    b.accept(now);
    assert_eq!(b.poll_transmit().map(|x| x.to_vec()), Some(vec![3, 1, 2, 30]));
    deliver(now, &mut b, &mut a, 1);
    assert_eq!((a.peer_restart_time(), b.peer_restart_time()), (30, 60));

    // A version-1 initiator sends 0 whatever its setting; a version-2 acceptor answering a
    // PEER_JOIN(1) sends 0 too, and ignores a byte 3 a version-1 peer might set.
    let a = Session::new(Role::Initiator, Admission::Member, with(1, 60), now);
    assert_eq!(a.poll_transmit().map(|x| x.to_vec()), Some(vec![3, 1, 1, 0]));
    let mut b = Session::new(Role::Acceptor, Admission::Member, with(2, 30), now);
    b.handle_bytes(now, &[3, 1, 1, 9]);
    assert_eq!(events(&mut b), vec![Event::JoinRequested]);
    b.accept(now);
    assert_eq!(b.poll_transmit().map(|x| x.to_vec()), Some(vec![3, 1, 1, 0]));
    assert_eq!((b.version(), b.peer_restart_time()), (1, 0));
}
