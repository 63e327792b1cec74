//! Packet fixtures in the style of Katran's: (input packet, tables in a known state) ->
//! (expected verdict, expected output bytes). Packets are built with etherparse, an
//! implementation independent of the parser under test.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::{Duration, Instant};

use cluster_proto::{Action, Connection, ConnectionDatabase, ConnectionTable, MemberId, Protocol};
use etherparse::{icmpv4::DestUnreachableHeader, Icmpv4Type, Icmpv6Type, PacketBuilder, TcpOptionElement};

use crate::classify::{BypassRule, Classifier, Decision, Hook, Reason, Verdict, View};
use crate::encap::{checksum, decapsulate, encapsulate};
use crate::hold::HoldQueue;
use crate::packet::{parse, Parsed};
use crate::policy::{LocalOnly, OwnerPolicy, Rendezvous, RendezvousKey};

const ME: MemberId = MemberId(0);
const B: MemberId = MemberId(1);
const C: MemberId = MemberId(2);
const LIVE: &[MemberId] = &[ME, B, C];

const CLIENT4: [u8; 4] = [192, 0, 2, 10];
const SERVER4: [u8; 4] = [198, 51, 100, 80];
const CLIENT6: [u8; 16] = [0x20, 0x01, 0x0d, 0xb8, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x10];
const SERVER6: [u8; 16] = [0x20, 0x01, 0x0d, 0xb8, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x80];

#[derive(Clone, Copy)]
enum Fam {
    V4,
    V6,
}

fn builder(f: Fam, from_client: bool) -> etherparse::PacketBuilderStep<etherparse::IpHeaders> {
    match (f, from_client) {
        (Fam::V4, true) => PacketBuilder::ipv4(CLIENT4, SERVER4, 64),
        (Fam::V4, false) => PacketBuilder::ipv4(SERVER4, CLIENT4, 64),
        (Fam::V6, true) => PacketBuilder::ipv6(CLIENT6, SERVER6, 64),
        (Fam::V6, false) => PacketBuilder::ipv6(SERVER6, CLIENT6, 64),
    }
}

/// A TCP segment of the client (port 40000) / server (port 80) connection.
fn tcp(f: Fam, from_client: bool, flags: &str) -> Vec<u8> {
    let (s, d) = if from_client { (40000, 80) } else { (80, 40000) };
    let mut b = builder(f, from_client).tcp(s, d, 1000, 64240);
    if flags.contains('S') {
        b = b.syn().options(&[TcpOptionElement::MaximumSegmentSize(1460)]).unwrap();
    }
    if flags.contains('A') {
        b = b.ack(2000);
    }
    if flags.contains('F') {
        b = b.fin();
    }
    if flags.contains('R') {
        b = b.rst();
    }
    let mut v = Vec::new();
    b.write(&mut v, b"payload").unwrap();
    v
}

fn udp(f: Fam) -> Vec<u8> {
    let mut v = Vec::new();
    builder(f, true).udp(5353, 53).write(&mut v, b"query").unwrap();
    v
}

fn conn(f: Fam, p: Protocol) -> Connection {
    let (c, s): (IpAddr, IpAddr) = match f {
        Fam::V4 => (Ipv4Addr::from(CLIENT4).into(), Ipv4Addr::from(SERVER4).into()),
        Fam::V6 => (Ipv6Addr::from(CLIENT6).into(), Ipv6Addr::from(SERVER6).into()),
    };
    let (cp, sp) = if p == Protocol::Tcp { (40000, 80) } else { (5353, 53) };
    Connection::new(p, (c, cp).into(), (s, sp).into()).unwrap()
}

struct Tables {
    local: ConnectionTable,
    db: ConnectionDatabase,
}

impl Tables {
    fn new() -> Self {
        Tables { local: ConnectionTable::new(ME), db: ConnectionDatabase::new() }
    }
    fn view(&self) -> View<'_> {
        View { me: ME, local: &self.local, db: &self.db, live: LIVE }
    }
}

fn classifier(policy: Box<dyn OwnerPolicy>) -> Classifier {
    let bypass = vec![BypassRule { net: "203.0.113.0/24".parse().unwrap(), port: None }];
    Classifier::new(policy, bypass, Duration::from_secs(1))
}

fn run(cl: &mut Classifier, t: &Tables, packet: &[u8], hook: Hook) -> Decision {
    cl.classify(&t.view(), Instant::now(), &parse(packet).unwrap(), hook)
}

#[test]
fn every_verdict_for_ipv4_and_ipv6() {
    for f in [Fam::V4, Fam::V6] {
        let tcp_c = conn(f, Protocol::Tcp);
        let mut cl = classifier(Box::new(LocalOnly));

        // Local flow: accepted, both directions.
        let t = Tables::new();
        t.local.insert(&tcp_c, Action::Forward);
        for from_client in [true, false] {
            assert_eq!(
                run(&mut cl, &t, &tcp(f, from_client, "A"), Hook::Prerouting),
                Decision { verdict: Verdict::Accept, reason: Reason::LocalFlow }
            );
        }

        // Another member's flow: the server's reply goes to the owner.
        let t = Tables::new();
        t.db.install(&tcp_c, B, Action::Forward);
        assert_eq!(
            run(&mut cl, &t, &tcp(f, false, "SA"), Hook::Prerouting),
            Decision { verdict: Verdict::Encapsulate { owner: B }, reason: Reason::RemoteFlow }
        );

        // Bypassed by its owner: passes untouched.
        let t = Tables::new();
        t.db.install(&tcp_c, C, Action::Bypass);
        assert_eq!(run(&mut cl, &t, &tcp(f, false, "A"), Hook::Prerouting).reason, Reason::Bypassed);

        // New SYN, local-only policy: install and announce before release.
        let t = Tables::new();
        assert_eq!(
            run(&mut cl, &t, &tcp(f, true, "S"), Hook::Prerouting),
            Decision {
                verdict: Verdict::AcceptLocal { connection: tcp_c, action: Action::Forward },
                reason: Reason::NewLocal
            }
        );
        // First UDP datagram is a new flow too.
        assert_eq!(run(&mut cl, &t, &udp(f), Hook::Prerouting).reason, Reason::NewLocal);

        // Partial flows are held.
        for flags in ["SA", "A", "FA", "RA"] {
            assert_eq!(run(&mut cl, &t, &tcp(f, false, flags), Hook::Prerouting).verdict, Verdict::Hold, "{flags}");
        }

        // OUTPUT: the proxy's own SYN (spoofed server side) is ours; other output passes.
        assert_eq!(
            run(&mut cl, &t, &tcp(f, true, "S"), Hook::Output).verdict,
            Verdict::AcceptLocal { connection: tcp_c, action: Action::Forward }
        );
        assert_eq!(run(&mut cl, &t, &tcp(f, true, "A"), Hook::Output).reason, Reason::LocalOutput);
    }
}

#[test]
fn bypass_rules_and_handoffs() {
    let t = Tables::new();
    let mut cl = classifier(Box::new(LocalOnly));
    let mut v = Vec::new();
    PacketBuilder::ipv4(CLIENT4, [203, 0, 113, 9], 64).tcp(1234, 443, 1, 1000).syn().write(&mut v, &[]).unwrap();
    let d = run(&mut cl, &t, &v, Hook::Prerouting);
    assert_eq!(d.reason, Reason::NewBypass);
    assert!(matches!(d.verdict, Verdict::AcceptLocal { action: Action::Bypass, .. }));

    // Rendezvous gives some SYNs to other members: they are handed off, and the rest of the
    // flow follows until the owner's INSTALL arrives.
    let mut cl = classifier(Box::new(Rendezvous { key: RendezvousKey::Connection }));
    let mut handed = 0;
    for port in 1000..1100u16 {
        let mut syn = Vec::new();
        PacketBuilder::ipv4(CLIENT4, SERVER4, 64).tcp(port, 80, 1, 1000).syn().write(&mut syn, &[]).unwrap();
        let d = run(&mut cl, &t, &syn, Hook::Prerouting);
        if let Verdict::Encapsulate { owner } = d.verdict {
            assert_eq!(d.reason, Reason::NewHandoff);
            assert_ne!(owner, ME);
            handed += 1;
            let mut ack = Vec::new();
            PacketBuilder::ipv4(CLIENT4, SERVER4, 64).tcp(port, 80, 2, 1000).ack(5).write(&mut ack, &[]).unwrap();
            assert_eq!(
                run(&mut cl, &t, &ack, Hook::Prerouting),
                Decision { verdict: Verdict::Encapsulate { owner }, reason: Reason::HandoffPending }
            );
        } else {
            assert_eq!(d.reason, Reason::NewLocal);
        }
    }
    assert!((40..95).contains(&handed), "about 2/3 of 100 flows go to the two others, got {handed}");
}

#[test]
fn icmp_errors_are_steered_by_their_inner_headers() {
    let t = Tables::new();
    let mut cl = classifier(Box::new(LocalOnly));
    for f in [Fam::V4, Fam::V6] {
        t.db.install(&conn(f, Protocol::Tcp), C, Action::Forward);
        // A router on the server's path complains about a packet the owner sent.
        let quoted = tcp(f, true, "A");
        let mut icmp = Vec::new();
        match f {
            Fam::V4 => PacketBuilder::ipv4([198, 18, 0, 1], CLIENT4, 64)
                .icmpv4(Icmpv4Type::DestinationUnreachable(DestUnreachableHeader::FragmentationNeeded {
                    next_hop_mtu: 1400,
                }))
                .write(&mut icmp, &quoted[..28])
                .unwrap(),
            Fam::V6 => {
                let router = [0x20, 0x01, 0x0d, 0xb8, 0, 9, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
                PacketBuilder::ipv6(router, CLIENT6, 64)
                    .icmpv6(Icmpv6Type::PacketTooBig { mtu: 1280 })
                    .write(&mut icmp, &quoted)
                    .unwrap()
            }
        }
        assert_eq!(
            run(&mut cl, &t, &icmp, Hook::Prerouting),
            Decision { verdict: Verdict::Encapsulate { owner: C }, reason: Reason::IcmpSteered }
        );
    }
    // An ICMP error about nothing known, and an echo request, pass.
    let mut echo = Vec::new();
    PacketBuilder::ipv4(CLIENT4, SERVER4, 64).icmpv4_echo_request(1, 1).write(&mut echo, b"ping").unwrap();
    assert_eq!(run(&mut cl, &t, &echo, Hook::Prerouting).reason, Reason::Other);
}

#[test]
fn non_first_fragments_pass() {
    let mut p = udp(Fam::V4);
    p[6] = 0x00;
    p[7] = 0x10; // fragment offset 16 x 8 bytes
    let t = Tables::new();
    let mut cl = classifier(Box::new(LocalOnly));
    assert_eq!(run(&mut cl, &t, &p, Hook::Prerouting), Decision { verdict: Verdict::Accept, reason: Reason::Fragment });
}

#[test]
fn hold_release_on_install_and_drop_on_expiry() {
    let t = Tables::new();
    let mut cl = classifier(Box::new(LocalOnly));
    let now = Instant::now();
    let mut q = HoldQueue::new(Duration::from_millis(50), 100, 1 << 20);
    let syn_ack = tcp(Fam::V4, false, "SA");
    let d = run(&mut cl, &t, &syn_ack, Hook::Prerouting);
    assert_eq!(d.verdict, Verdict::Hold);
    let Parsed::Flow(f) = parse(&syn_ack).unwrap() else { panic!() };
    q.push(now, &f.connection, syn_ack.len(), syn_ack.clone());
    // The owner's INSTALL (for the spoofed client->server connection) arrives.
    t.db.install(&conn(Fam::V4, Protocol::Tcp), B, Action::Forward);
    let released = q.release(&conn(Fam::V4, Protocol::Tcp));
    assert_eq!(released, vec![syn_ack.clone()]);
    let d = cl.reclassify_expired(&t.view(), now, &parse(&released[0]).unwrap());
    assert_eq!(d.verdict, Verdict::Encapsulate { owner: B });

    // A stray ACK nobody installs: dropped when its time is over.
    let stray = tcp(Fam::V6, false, "A");
    let Parsed::Flow(f) = parse(&stray).unwrap() else { panic!() };
    q.push(now, &f.connection, stray.len(), stray.clone());
    let expired = q.expired(now + Duration::from_millis(60));
    assert_eq!(expired, vec![stray]);
    let d = cl.reclassify_expired(&t.view(), now, &parse(&expired[0]).unwrap());
    assert_eq!(d, Decision { verdict: Verdict::Drop, reason: Reason::PartialExpired });
}

#[test]
fn decapsulated_packets() {
    let t = Tables::new();
    let mut cl = classifier(Box::new(LocalOnly));
    // A SYN handed to this member becomes local.
    let syn = tcp(Fam::V4, true, "S");
    let d = cl.classify_decapsulated(&t.view(), Instant::now(), &parse(&syn).unwrap());
    assert_eq!(d.reason, Reason::DecapNew);
    t.local.insert(&conn(Fam::V4, Protocol::Tcp), Action::Forward);
    let d = cl.classify_decapsulated(&t.view(), Instant::now(), &parse(&tcp(Fam::V4, false, "SA")).unwrap());
    assert_eq!(d, Decision { verdict: Verdict::Accept, reason: Reason::DecapLocal });
}

#[test]
fn encapsulation_bytes_v4_in_v4_and_v6_in_v6() {
    let inner = tcp(Fam::V4, false, "SA");
    let mut out = Vec::new();
    encapsulate(&inner, "198.18.0.2".parse().unwrap(), "198.18.0.1".parse().unwrap(), 7, &mut out).unwrap();
    let total = (inner.len() + 20) as u16;
    let mut hdr =
        vec![0x45, 0, (total >> 8) as u8, total as u8, 0, 7, 0x40, 0, 64, 4, 0, 0, 198, 18, 0, 2, 198, 18, 0, 1];
    let c = checksum(&hdr);
    hdr[10..12].copy_from_slice(&c.to_be_bytes());
    assert_eq!(&out[..20], &hdr[..], "RFC 2003 outer header: DF copied, TTL 64, protocol 4");
    assert_eq!(&out[20..], &inner[..]);
    assert_eq!(checksum(&out[..20]), 0, "valid header checksum");
    let d = decapsulate(&out).unwrap();
    assert_eq!((d.src, d.inner), ("198.18.0.2".parse().unwrap(), &inner[..]));

    let inner6 = tcp(Fam::V6, false, "A");
    let mut out = Vec::new();
    encapsulate(&inner6, "2001:db8:ff::2".parse().unwrap(), "2001:db8:ff::1".parse().unwrap(), 0, &mut out).unwrap();
    let len = inner6.len() as u16;
    assert_eq!(&out[..8], &[0x60, 0, 0, 0, (len >> 8) as u8, len as u8, 41, 64], "RFC 2473: next header 41");
    assert_eq!(decapsulate(&out).unwrap().inner, &inner6[..]);

    // IPv4 inside IPv6 (members on IPv6, clients on IPv4).
    let mut out = Vec::new();
    encapsulate(&inner, "2001:db8:ff::2".parse().unwrap(), "2001:db8:ff::1".parse().unwrap(), 0, &mut out).unwrap();
    assert_eq!(out[6], 4);
    assert!(encapsulate(&inner, "198.18.0.2".parse().unwrap(), "2001:db8:ff::1".parse().unwrap(), 0, &mut out).is_err());
    assert!(decapsulate(&inner).is_err(), "a plain TCP packet is not a tunnel packet");
}

/// TCP checksum over the pseudo-header, 0 when the segment is intact.
fn tcp_check(p: &[u8]) -> u16 {
    let v4 = p[0] >> 4 == 4;
    let (l4, src, dst) = if v4 { (20, &p[12..16], &p[16..20]) } else { (40, &p[8..24], &p[24..40]) };
    let len = (p.len() - l4) as u16;
    let mut pseudo = Vec::new();
    pseudo.extend_from_slice(src);
    pseudo.extend_from_slice(dst);
    if v4 {
        pseudo.extend_from_slice(&[0, 6]);
        pseudo.extend_from_slice(&len.to_be_bytes());
    } else {
        pseudo.extend_from_slice(&(len as u32).to_be_bytes());
        pseudo.extend_from_slice(&[0, 0, 0, 6]);
    }
    pseudo.extend_from_slice(&p[l4..]);
    checksum(&pseudo)
}

#[test]
fn mss_is_clamped_with_a_valid_checksum() {
    for f in [Fam::V4, Fam::V6] {
        let mut syn = tcp(f, true, "S");
        assert_eq!(tcp_check(&syn), 0);
        let Parsed::Flow(fp) = parse(&syn).unwrap() else { panic!() };
        let before = syn.clone();
        assert!(crate::mss::clamp(&mut syn, fp.l4_offset, 1400));
        let at = fp.l4_offset + 20;
        assert_eq!(&syn[at..at + 4], &[2, 4, 0x05, 0x78], "MSS option now 1400");
        assert_eq!(tcp_check(&syn), 0, "checksum still valid");
        let diff: Vec<usize> = (0..syn.len()).filter(|&i| syn[i] != before[i]).collect();
        assert!(diff
            .iter()
            .all(|&i| (at + 2..at + 4).contains(&i) || (fp.l4_offset + 16..fp.l4_offset + 18).contains(&i)));
        assert!(!crate::mss::clamp(&mut syn, fp.l4_offset, 1440), "never raised");
        let mut ack = tcp(f, true, "A");
        assert!(!crate::mss::clamp(&mut ack, fp.l4_offset, 1000), "only SYNs");
    }
    assert_eq!(crate::mss::mss_limit(1500, false, false), 1440);
    assert_eq!(crate::mss::mss_limit(1500, true, true), 1400);
}
