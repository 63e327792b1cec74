//! The asymmetric-return scenario of paper Fig. 1 through two engines and the in-memory
//! "network" of this test: member A's proxy opens the spoofed server-side connection, the
//! server's reply reaches member B, B hands it to A in IP-in-IP, A decapsulates and injects.
//! Also replayed from a pcap file.

use std::time::{Duration, Instant};

use cluster_proto::{Action, Connection, ConnectionDatabase, ConnectionTable, MemberId, Protocol};
use etherparse::{PacketBuilder, TcpOptionElement};
use handoff::classify::{Classifier, Hook, View};
use handoff::encap::decapsulate;
use handoff::engine::{Engine, EngineConfig, Output};
use handoff::io::pcap::{PcapReader, PcapWriter};
use handoff::policy::LocalOnly;
use handoff::track::TrackConfig;

const A: MemberId = MemberId(0);
const B: MemberId = MemberId(1);
const LIVE: &[MemberId] = &[A, B];

struct Member {
    id: MemberId,
    local: ConnectionTable,
    db: ConnectionDatabase,
    engine: Engine<Vec<u8>>,
}

impl Member {
    fn new(id: MemberId) -> Self {
        let config = EngineConfig {
            address: ["198.18.0.1", "198.18.0.2"][id.0 as usize].parse().unwrap(),
            members: vec!["198.18.0.1".parse().unwrap(), "198.18.0.2".parse().unwrap()],
            hold_time: Duration::from_millis(100),
            hold_packets: 1024,
            hold_bytes: 1 << 20,
            mtu: Some(1500),
            track: TrackConfig::default(),
        };
        let classifier = Classifier::new(Box::new(LocalOnly), vec![], Duration::from_millis(100));
        Member {
            id,
            local: ConnectionTable::new(id),
            db: ConnectionDatabase::new(),
            engine: Engine::new(config, classifier),
        }
    }

    fn step(&mut self, now: Instant, packet: Vec<u8>, hook: Hook) -> Vec<Output<Vec<u8>>> {
        let view = View { me: self.id, local: &self.local, db: &self.db, live: LIVE };
        let mut out = Vec::new();
        self.engine.handle(now, &view, packet, hook, &mut out);
        out
    }
}

fn spoofed_syn() -> Vec<u8> {
    let mut v = Vec::new();
    PacketBuilder::ipv4([192, 0, 2, 10], [198, 51, 100, 80], 64)
        .tcp(40000, 80, 1, 64240)
        .syn()
        .options(&[TcpOptionElement::MaximumSegmentSize(1460)])
        .unwrap()
        .write(&mut v, &[])
        .unwrap();
    v
}

fn server_syn_ack() -> Vec<u8> {
    let mut v = Vec::new();
    PacketBuilder::ipv4([198, 51, 100, 80], [192, 0, 2, 10], 64)
        .tcp(80, 40000, 9, 65160)
        .syn()
        .ack(2)
        .options(&[TcpOptionElement::MaximumSegmentSize(1460)])
        .unwrap()
        .write(&mut v, &[])
        .unwrap();
    v
}

fn conn() -> Connection {
    Connection::new(Protocol::Tcp, "192.0.2.10:40000".parse().unwrap(), "198.51.100.80:80".parse().unwrap()).unwrap()
}

/// A's OUTPUT SYN: install first, then release (clamped).
fn a_opens(a: &mut Member, now: Instant) -> Connection {
    let out = a.step(now, spoofed_syn(), Hook::Output);
    let Output::Install { connection, action } = out[0] else { panic!("install first: {out:?}") };
    assert_eq!((connection, action), (conn(), Action::Forward));
    assert!(matches!(out[1], Output::Accept { modified: true, local: true, .. }), "MSS clamped, local: {out:?}");
    a.local.insert(&connection, action);
    connection
}

/// B sends to A; A decapsulates and injects exactly the server's bytes.
fn deliver_to_a(a: &mut Member, now: Instant, out: &[Output<Vec<u8>>]) -> Vec<u8> {
    let Some(Output::Send { to, outer }) = out.iter().find(|o| matches!(o, Output::Send { .. })) else {
        panic!("no IP-in-IP in {out:?}")
    };
    assert_eq!(*to, "198.18.0.1".parse::<std::net::IpAddr>().unwrap());
    let d = decapsulate(outer).unwrap();
    assert_eq!(d.src, "198.18.0.2".parse::<std::net::IpAddr>().unwrap());
    let view = View { me: a.id, local: &a.local, db: &a.db, live: LIVE };
    let mut res = Vec::new();
    a.engine.handle_tunnel(now, &view, d.src, d.inner, &mut res);
    match res.as_slice() {
        [Output::Inject { packet }] => packet.clone(),
        other => panic!("expected one injection, got {other:?}"),
    }
}

#[test]
fn asymmetric_return_is_forwarded_to_the_owner() {
    let now = Instant::now();
    let (mut a, mut b) = (Member::new(A), Member::new(B));
    let c = a_opens(&mut a, now);
    b.db.install(&c, A, Action::Forward); // the INSTALL reached B first
    let out = b.step(now, server_syn_ack(), Hook::Prerouting);
    assert!(matches!(out.last(), Some(Output::Drop { .. })), "original dropped at B: {out:?}");
    let injected = deliver_to_a(&mut a, now, &out);
    let mut expected = server_syn_ack();
    // B clamped the SYN-ACK's MSS before encapsulating it (1500 - 20 outer - 40 = 1440).
    assert_eq!(&injected[..20], &expected[..20]);
    assert_eq!(injected[40 + 2..40 + 4], 1440u16.to_be_bytes());
    expected[40 + 2..40 + 4].copy_from_slice(&1440u16.to_be_bytes());
    assert_eq!(injected.len(), expected.len());
    assert_eq!(b.engine.stats().encapsulated, 1);
    assert_eq!(a.engine.stats().decapsulated, 1);
}

#[test]
fn syn_ack_before_install_is_held_then_released() {
    let now = Instant::now();
    let (mut a, mut b) = (Member::new(A), Member::new(B));
    let c = a_opens(&mut a, now);
    // The server's SYN-ACK beats the INSTALL to B: held.
    let out = b.step(now, server_syn_ack(), Hook::Prerouting);
    assert!(out.is_empty(), "held, nothing yet: {out:?}");
    assert_eq!(b.engine.held(), 1);
    // INSTALL arrives 5 ms later: released at once, to A.
    b.db.install(&c, A, Action::Forward);
    let view = View { me: B, local: &b.local, db: &b.db, live: LIVE };
    let mut out = Vec::new();
    b.engine.on_install(now + Duration::from_millis(5), &view, &c, &mut out);
    deliver_to_a(&mut a, now, &out);
    assert_eq!(b.engine.stats().hold.released, 1);
    assert_eq!(b.engine.held(), 0);
}

#[test]
fn unknown_partial_flow_is_dropped_after_the_hold_time_and_strangers_cannot_tunnel() {
    let now = Instant::now();
    let (mut a, mut b) = (Member::new(A), Member::new(B));
    assert!(b.step(now, server_syn_ack(), Hook::Prerouting).is_empty());
    let view = View { me: B, local: &b.local, db: &b.db, live: LIVE };
    let mut out = Vec::new();
    b.engine.poll(now + Duration::from_millis(50), &view, &mut out);
    assert!(out.is_empty(), "still within the hold time");
    b.engine.poll(now + Duration::from_millis(101), &view, &mut out);
    assert!(matches!(out.as_slice(), [Output::Drop { .. }]), "{out:?}");
    assert_eq!(b.engine.stats().decisions["partial_expired"], 1);

    let view = View { me: A, local: &a.local, db: &a.db, live: LIVE };
    let mut out = Vec::new();
    a.engine.handle_tunnel(now, &view, "203.0.113.66".parse().unwrap(), &server_syn_ack(), &mut out);
    assert!(out.is_empty());
    assert_eq!(a.engine.stats().tunnel_not_member, 1);
}

#[test]
fn pcap_replay_gives_the_same_verdicts() {
    let now = Instant::now();
    // Record the scenario's packets as they cross member B.
    let mut w = PcapWriter::new(Vec::new()).unwrap();
    let mut fin = Vec::new();
    PacketBuilder::ipv4([198, 51, 100, 80], [192, 0, 2, 10], 64)
        .tcp(80, 40000, 10, 100)
        .ack(5)
        .fin()
        .write(&mut fin, &[])
        .unwrap();
    let mut stray = Vec::new();
    PacketBuilder::ipv4([198, 51, 100, 81], [192, 0, 2, 11], 64)
        .tcp(80, 1234, 10, 100)
        .ack(5)
        .write(&mut stray, &[])
        .unwrap();
    for (i, p) in [server_syn_ack(), fin, stray].iter().enumerate() {
        w.write(Duration::from_millis(i as u64), p).unwrap();
    }
    let file = w.into_inner();
    assert_eq!(&file[..4], &[0xd4, 0xc3, 0xb2, 0xa1]);

    let mut b = Member::new(B);
    b.db.install(&conn(), A, Action::Forward);
    let mut r = PcapReader::new(&file[..]).unwrap();
    let mut verdicts = Vec::new();
    while let Some((_, p)) = r.next_packet().unwrap() {
        let out = b.step(now, p, Hook::Prerouting);
        verdicts.push(match out.last() {
            Some(Output::Drop { .. }) if out.iter().any(|o| matches!(o, Output::Send { .. })) => "encapsulate",
            None => "hold",
            Some(Output::Accept { .. }) => "accept",
            other => panic!("{other:?}"),
        });
    }
    assert_eq!(verdicts, ["encapsulate", "encapsulate", "hold"]);
}

// The stable-toolchain twin of fuzz/fuzz_targets/packet_classify.rs.
proptest::proptest! {
    #[test]
    fn arbitrary_packets_never_panic_the_engine(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..200), v6 in proptest::prelude::any::<bool>()) {
        let now = Instant::now();
        let mut a = Member::new(A);
        let c = conn();
        a.db.install(&c, B, Action::Forward);
        let mut data = bytes;
        // Give half the cases a plausible IP header so the deeper paths are reached.
        if !data.is_empty() {
            data[0] = if v6 { 0x60 } else { 0x45 };
        }
        for hook in [Hook::Prerouting, Hook::Output] {
            a.step(now, data.clone(), hook);
        }
        let view = View { me: A, local: &a.local, db: &a.db, live: LIVE };
        let mut out = Vec::new();
        a.engine.handle_tunnel(now, &view, "198.18.0.2".parse().unwrap(), &data, &mut out);
        a.engine.on_install(now, &view, &c, &mut out);
        a.engine.poll(now + Duration::from_secs(1), &view, &mut out);
    }
}

#[test]
fn a_released_packet_keeps_its_mss_clamp() {
    // A held SYN-ACK that is accepted after release must be handed back rewritten: its MSS
    // was clamped when it was held.
    let now = Instant::now();
    let mut b = Member::new(B);
    assert!(b.step(now, server_syn_ack(), Hook::Prerouting).is_empty(), "held");
    b.local.insert(&conn(), Action::Forward); // B's own connection after all: accepted
    let view = View { me: B, local: &b.local, db: &b.db, live: LIVE };
    let mut out = Vec::new();
    b.engine.on_install(now, &view, &conn(), &mut out);
    match out.as_slice() {
        // Released from the hold queue: never marked for the fast path.
        [Output::Accept { packet, modified: true, local: false }] => {
            assert_eq!(packet[42..44], 1440u16.to_be_bytes())
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn only_packets_of_local_flows_classified_on_arrival_are_local() {
    // The fast-path mark: A's own flow is local both ways; at B the same flow is another
    // member's (encapsulated, never accepted); a malformed packet or a stray ACK is not local.
    let now = Instant::now();
    let mut a = Member::new(A);
    let c = a_opens(&mut a, now);
    let out = a.step(now, server_syn_ack(), Hook::Prerouting);
    assert!(matches!(out.as_slice(), [Output::Accept { local: true, .. }]), "{out:?}");
    let out = a.step(now, vec![0x45, 0, 0], Hook::Prerouting);
    assert!(matches!(out.as_slice(), [Output::Accept { local: false, .. }]), "{out:?}");
    let mut b = Member::new(B);
    b.db.install(&c, A, Action::Forward);
    let out = b.step(now, server_syn_ack(), Hook::Prerouting);
    assert!(!out.iter().any(|o| matches!(o, Output::Accept { .. })), "{out:?}");
    let mut ack = Vec::new();
    PacketBuilder::ipv4([192, 0, 2, 10], [198, 51, 100, 80], 64)
        .tcp(40001, 80, 2, 100)
        .ack(10)
        .write(&mut ack, &[])
        .unwrap();
    let out = b.step(now, ack, Hook::Output);
    assert!(matches!(out.as_slice(), [Output::Accept { local: false, .. }]), "local output, not in the table: {out:?}");
}
