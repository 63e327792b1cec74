//! The affinity engine against its contract: the same choice on every member for the same
//! inputs, the load bound, the rendezvous fallback, decay, and the advertisement codec.

use dictionary_affinity::sample::Rng;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::{Duration, Instant};

use cluster_proto::{Connection, MemberId, Protocol};
use dictionary_affinity::affinity::{
    decode_advertisement, encode_advertisement, quantize, AffinityConfig, AffinityEngine, DictStats, LoadReport, Pair,
    Reason, SavingsLedger,
};
use owner_policy::{rendezvous, OwnerPolicy};
use proptest::prelude::*;

fn live(n: u8) -> Vec<MemberId> {
    (0..n).map(MemberId).collect()
}

fn pair(i: u32) -> Pair {
    let client = IpAddr::V4(Ipv4Addr::from(0xC000_0200u32.wrapping_add(i << 8)));
    let server = IpAddr::V4(Ipv4Addr::from(0xC633_6400u32 | (i & 0xff)));
    Pair::new(client, 24, server, 32).unwrap()
}

fn conn(p: &Pair, host: u8, port: u16) -> Connection {
    let IpAddr::V4(net) = p.client() else { unreachable!() };
    let src = IpAddr::V4(Ipv4Addr::from(u32::from(net) | u32::from(host)));
    Connection::new(Protocol::Tcp, (src, port).into(), (p.server(), 443).into()).unwrap()
}

fn stats(p: Pair, member: u8, saved: f64, epoch: u32) -> DictStats {
    DictStats { pair: p, member: MemberId(member), saved_decayed: saved, epoch }
}

fn loads(values: &[f64]) -> Vec<LoadReport> {
    values.iter().enumerate().map(|(i, &load)| LoadReport { member: MemberId(i as u8), load }).collect()
}

#[test]
fn the_best_dictionary_wins_whatever_the_client_host_or_port() {
    let e = AffinityEngine::new(AffinityConfig::default());
    let t = Instant::now();
    let p = pair(1);
    e.observe(t, &[stats(p, 0, 100.0, 1), stats(p, 2, 5000.0, 1), stats(p, 3, 4000.0, 1)]);
    e.observe_loads(t, &loads(&[10.0, 10.0, 10.0, 10.0]));
    for (host, port) in [(1, 1000), (77, 2000), (254, 65000)] {
        let c = e.choose(&conn(&p, host, port), &live(4), MemberId(1));
        assert_eq!((c.owner, c.reason), (MemberId(2), "affinity"));
    }
    // Member 2 is not live: the next best.
    assert_eq!(e.decide(&p, &[MemberId(0), MemberId(1), MemberId(3)], MemberId(1)).owner, MemberId(3));
    assert_eq!(e.decisions()[0], (Reason::Affinity, 3));
}

#[test]
fn two_engines_fed_in_different_orders_decide_alike() {
    let t0 = Instant::now();
    let mut rng = Rng(7);
    // Advertisements: (arrival time, batch); several epochs and re-advertisements per member.
    let mut batches: Vec<(Instant, Vec<DictStats>, Vec<LoadReport>)> = Vec::new();
    for round in 0..20u64 {
        let at = t0 + Duration::from_millis(round * 100 + rng.next() % 50);
        let mut s = Vec::new();
        for _ in 0..200 {
            let member = (rng.next() % 5) as u8;
            let epoch = 1 + (rng.next() % 3) as u32;
            let saved = if rng.next() % 10 == 0 { 0.0 } else { (rng.next() % 100_000) as f64 * 1.37 };
            s.push(stats(pair((rng.next() % 300) as u32), member, saved, epoch));
        }
        let l: Vec<LoadReport> =
            (0..5).map(|m| LoadReport { member: MemberId(m), load: (rng.next() % 100) as f64 }).collect();
        batches.push((at, s, l));
    }
    let a = AffinityEngine::new(AffinityConfig::default());
    let b = AffinityEngine::new(AffinityConfig::default());
    for (at, s, l) in &batches {
        a.observe(*at, s);
        a.observe_loads(*at, l);
    }
    // The other engine: batches in reverse, each batch's records reversed and split.
    for (at, s, l) in batches.iter().rev() {
        let mut s = s.clone();
        s.reverse();
        for chunk in s.chunks(7) {
            b.observe(*at, chunk);
        }
        let mut l = l.clone();
        l.reverse();
        b.observe_loads(*at, &l);
    }
    let mut members = live(5);
    let mut reasons = std::collections::BTreeSet::new();
    for i in 0..300 {
        let p = pair(i);
        let da = a.decide(&p, &members, MemberId(0));
        members.reverse();
        let db = b.decide(&p, &members, MemberId(3));
        assert_eq!((da.owner, da.reason), (db.owner, db.reason), "pair {p}");
        assert_eq!(da.score.to_bits(), db.score.to_bits());
        reasons.insert(da.reason);
    }
    assert!(reasons.len() >= 3, "the test should reach several kinds of decision: {reasons:?}");
}

#[test]
fn exact_ties_go_to_the_highest_rendezvous_weight() {
    let t = Instant::now();
    for i in 0..50 {
        let p = pair(i);
        let (x, y) = ((i % 5) as u8, ((i + 2) % 5) as u8);
        let e = AffinityEngine::new(AffinityConfig::default());
        e.observe(t, &[stats(p, y, 777.0, 3), stats(p, x, 777.0, 3), stats(p, 0, 1.0, 3)]);
        let d = e.decide(&p, &live(5), MemberId(0));
        assert_eq!(d.reason, Reason::Affinity);
        assert_eq!(d.owner, rendezvous(&p.key(), &[MemberId(x), MemberId(y)]).unwrap());
    }
}

#[test]
fn load_bound_is_respected() {
    let e = AffinityEngine::new(AffinityConfig::default());
    let t = Instant::now();
    let p = pair(2);
    e.observe(t, &[stats(p, 0, 9000.0, 1), stats(p, 1, 50.0, 1)]);
    // Average 100, bound 125: member 0 at 130 is over.
    e.observe_loads(t, &loads(&[130.0, 90.0, 90.0, 90.0]));
    let d = e.decide(&p, &live(4), MemberId(0));
    assert_eq!((d.owner, d.reason), (MemberId(1), Reason::AffinityNextBest));
    // At exactly the bound it qualifies again.
    e.observe_loads(t + Duration::from_millis(1), &loads(&[125.0, 91.0, 92.0, 92.0]));
    assert_eq!(e.decide(&p, &live(4), MemberId(0)).reason, Reason::Affinity);
    // The only dictionary is on an overloaded member: rendezvous over the others.
    let q = pair(3);
    e.observe(t, &[stats(q, 0, 1e6, 1)]);
    e.observe_loads(t + Duration::from_millis(2), &loads(&[200.0, 60.0, 70.0, 70.0]));
    let d = e.decide(&q, &live(4), MemberId(0));
    assert_eq!(d.reason, Reason::AffinityLoadBoundFallback);
    assert_eq!(d.owner, rendezvous(&q.key(), &[MemberId(1), MemberId(2), MemberId(3)]).unwrap());
    // A stale load report does not count.
    e.advance(t + Duration::from_secs(11));
    assert_eq!(e.decide(&q, &live(4), MemberId(0)).reason, Reason::Affinity);
}

/// A reload changes the bounds of the next decisions; bad values are sanitized as at start.
#[test]
fn load_bounds_change_while_the_engine_runs() {
    let e = AffinityEngine::new(AffinityConfig::default());
    let t = Instant::now();
    let p = pair(2);
    e.observe(t, &[stats(p, 0, 9000.0, 1), stats(p, 1, 50.0, 1)]);
    // Average 100, bound 1.25 x: member 0 at 130 is over.
    e.observe_loads(t, &loads(&[130.0, 90.0, 90.0, 90.0]));
    assert_eq!(e.decide(&p, &live(4), MemberId(0)).reason, Reason::AffinityNextBest);
    e.set_load_bounds(1.5, 1.1, 4.0);
    assert_eq!(e.decide(&p, &live(4), MemberId(0)).reason, Reason::Affinity, "130 is within 1.5 x 100");
    let c = e.config();
    assert_eq!((c.load_bound, c.new_pair_bound, c.load_slack), (1.5, 1.1, 4.0));
    e.set_load_bounds(0.5, 9.0, f64::NAN);
    let c = e.config();
    assert_eq!((c.load_bound, c.new_pair_bound, c.load_slack), (1.0, 1.0, 0.0));
}

#[test]
fn new_pairs_keep_off_members_above_the_new_pair_bound() {
    let e = AffinityEngine::new(AffinityConfig::default());
    let t = Instant::now();
    // Average 100: member 0 at 115 is within the bound (125) but over the new-pair bound (110).
    e.observe_loads(t, &loads(&[115.0, 95.0, 95.0, 95.0]));
    let mut homed = 0;
    for i in 0..200 {
        let p = pair(i);
        let d = e.decide(&p, &live(4), MemberId(0));
        assert_eq!(d.reason, Reason::RendezvousNoDictionary);
        assert_ne!(d.owner, MemberId(0));
        // Its dictionary still draws a pair there.
        e.observe(t, &[stats(p, 0, 10.0, 1)]);
        if e.decide(&p, &live(4), MemberId(0)).owner == MemberId(0) {
            homed += 1;
        }
    }
    assert_eq!(homed, 200);
    // Clamped between 1 and the load bound.
    let e = AffinityEngine::new(AffinityConfig { new_pair_bound: 3.0, ..AffinityConfig::default() });
    assert_eq!(e.config().new_pair_bound, 1.25);
}

#[test]
fn any_load_mix_keeps_the_owner_within_the_bound() {
    let e = AffinityEngine::new(AffinityConfig::default());
    let t = Instant::now();
    let mut rng = Rng(11);
    for i in 0..200 {
        let p = pair(i);
        e.observe(t, &[stats(p, (i % 4) as u8, 1000.0 + f64::from(i), 1)]);
    }
    for round in 0..200u64 {
        let l: Vec<f64> = (0..4).map(|_| (rng.next() % 1000) as f64).collect();
        e.observe_loads(t + Duration::from_millis(round), &loads(&l));
        let avg = l.iter().sum::<f64>() / 4.0;
        for i in 0..200 {
            let owner = e.decide(&pair(i), &live(4), MemberId(0)).owner;
            assert!(quantize(l[owner.0 as usize]) <= 1.25 * avg, "{l:?} -> {owner:?}");
        }
    }
}

#[test]
fn no_dictionary_falls_back_to_rendezvous_on_the_pair() {
    let e = AffinityEngine::new(AffinityConfig::default());
    for i in 0..100 {
        let p = pair(i);
        let c = e.choose(&conn(&p, (i % 250) as u8 + 1, 40000), &live(4), MemberId(0));
        assert_eq!(c.reason, "rendezvous_no_dictionary");
        assert_eq!(c.owner, rendezvous(&p.key(), &live(4)).unwrap());
    }
    assert!(e.decisions().contains(&(Reason::RendezvousNoDictionary, 100)));
    // A withdrawn (zero) saving is no dictionary; neither is a member of an old epoch.
    let t = Instant::now();
    let p = pair(5);
    e.observe(t, &[stats(p, 1, 0.0, 1), stats(p, 2, 500.0, 1)]);
    e.observe(t, &[stats(pair(6), 2, 1.0, 2)]);
    assert_eq!(e.decide(&p, &live(4), MemberId(0)).reason, Reason::RendezvousNoDictionary);
    // No live member at all: keep it.
    assert_eq!(e.choose(&conn(&p, 1, 1), &[], MemberId(3)).owner, MemberId(3));
}

#[test]
fn savings_decay_and_old_advertisements_fade() {
    let cfg = AffinityConfig { half_life: Duration::from_secs(60), ..AffinityConfig::default() };
    let e = AffinityEngine::new(cfg);
    let t = Instant::now();
    let p = pair(9);
    // Member 0 advertised 1000 two half-lives ago and not since (250 now); member 1 300 now.
    e.observe(t, &[stats(p, 0, 1000.0, 1)]);
    e.observe(t + Duration::from_secs(120), &[stats(p, 1, 300.0, 1)]);
    let d = e.decide(&p, &live(2), MemberId(0));
    assert_eq!((d.owner, d.reason), (MemberId(1), Reason::Affinity));
    assert_eq!(d.score, 300.0);
    // Member 0 re-advertises: its ledger decays the same way, so 1000 -> 250, plus new savings.
    let ledger = SavingsLedger::new(Duration::from_secs(60), 1000);
    ledger.record(t, p, 1000);
    ledger.record(t + Duration::from_secs(120), p, 100);
    let adv = ledger.advertise(t + Duration::from_secs(120), MemberId(0), 1);
    assert_eq!(adv.len(), 1);
    assert!((adv[0].saved_decayed - 350.0).abs() < 1e-9);
    e.observe(t + Duration::from_secs(120), &adv);
    assert_eq!(e.decide(&p, &live(2), MemberId(0)).owner, MemberId(0));
    assert!(ledger.advertise(t + Duration::from_secs(121), MemberId(0), 1).is_empty(), "nothing changed");
    ledger.forget(&p);
    let withdrawn = ledger.advertise(t + Duration::from_secs(121), MemberId(0), 1);
    assert_eq!(withdrawn[0].saved_decayed, 0.0);
    // Statistics older than max_age are ignored.
    let e = AffinityEngine::new(AffinityConfig { max_age: Duration::from_secs(10), ..cfg });
    e.observe(t, &[stats(p, 0, 1e9, 1)]);
    e.advance(t + Duration::from_secs(11));
    assert_eq!(e.decide(&p, &live(2), MemberId(0)).reason, Reason::RendezvousNoDictionary);
}

#[test]
fn a_new_epoch_voids_the_old_dictionary() {
    let e = AffinityEngine::new(AffinityConfig::default());
    let t = Instant::now();
    let (p, q) = (pair(20), pair(21));
    e.observe(t, &[stats(p, 0, 9000.0, 4), stats(p, 1, 10.0, 1), stats(q, 0, 9000.0, 4)]);
    assert_eq!(e.decide(&p, &live(2), MemberId(1)).owner, MemberId(0));
    // Member 0 restarted: epoch 5 for another pair voids its epoch-4 entries; a late epoch-4
    // re-advertisement changes nothing.
    e.observe(t, &[stats(pair(22), 0, 1.0, 5)]);
    e.observe(t, &[stats(p, 0, 9000.0, 4)]);
    assert_eq!(e.decide(&p, &live(2), MemberId(0)).owner, MemberId(1));
    assert_eq!(e.decide(&q, &live(2), MemberId(0)).reason, Reason::RendezvousNoDictionary);
}

#[test]
fn explain_says_why() {
    let e = AffinityEngine::new(AffinityConfig::default());
    let t = Instant::now();
    let p = pair(30);
    e.observe(t, &[stats(p, 1, 4096.0, 2)]);
    e.observe_loads(t, &loads(&[10.0, 12.0, 10.0]));
    let text = e.explain(&p, &live(3));
    assert!(text.starts_with("pair 192.0.32.0/24 -> 198.51.100.30/32: owner 1 (affinity, 4096 bytes saved"), "{text}");
    assert!(text.contains("load bound 1.25 x average 10.7 (slack 0) = 13.3 (new pairs 11.7)"), "{text}");
    assert!(text.contains("member 1: load 12.0 (within bound), 4096 bytes saved (decayed; epoch 2"), "{text}");
    assert!(text.contains("member 2: load 10.0 (within bound), no dictionary advertised"), "{text}");
    e.observe_loads(t, &loads(&[10.0, 20.0, 10.0]));
    let text = e.explain(&p, &live(3));
    assert!(
        text.contains("(affinity_load_bound_fallback)") && text.contains("member 1: load 20.0 (over bound)"),
        "{text}"
    );
    assert_eq!(text.lines().count(), 4);
}

fn arb_pair() -> impl Strategy<Value = Pair> {
    prop_oneof![
        (any::<u32>(), 0u8..=32, any::<u32>(), 0u8..=32).prop_map(|(c, cl, s, sl)| Pair::new(
            IpAddr::V4(Ipv4Addr::from(c)),
            cl,
            IpAddr::V4(Ipv4Addr::from(s)),
            sl
        )
        .unwrap()),
        (any::<u128>(), 0u8..=128, any::<u128>(), 0u8..=128).prop_map(|(c, cl, s, sl)| Pair::new(
            IpAddr::V6(Ipv6Addr::from(c)),
            cl,
            IpAddr::V6(Ipv6Addr::from(s)),
            sl
        )
        .unwrap()),
    ]
}

fn arb_value() -> impl Strategy<Value = f64> {
    prop_oneof![Just(0.0), (0f32..f32::MAX).prop_map(f64::from), (0u32..1_000_000).prop_map(f64::from)]
}

proptest! {
    #[test]
    fn advertisement_round_trips(
        stats in prop::collection::vec((arb_pair(), 0u8..4, arb_value(), 0u32..3), 0..300),
        loads in prop::collection::vec((any::<u8>(), arb_value()), 0..8),
    ) {
        let stats: Vec<DictStats> = stats
            .into_iter()
            .map(|(pair, m, saved_decayed, epoch)| DictStats { pair, member: MemberId(m), saved_decayed, epoch })
            .collect();
        let loads: Vec<LoadReport> = loads.into_iter().map(|(m, load)| LoadReport { member: MemberId(m), load }).collect();
        let bytes = encode_advertisement(&stats, &loads);
        let adv = decode_advertisement(&bytes).unwrap();
        prop_assert_eq!(adv.stats, stats);
        prop_assert_eq!(adv.loads, loads);
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..600)) {
        let _ = decode_advertisement(&bytes);
    }

    #[test]
    fn mutated_advertisements_never_panic(
        stats in prop::collection::vec((arb_pair(), 0u8..4, arb_value()), 1..20),
        flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
        cut in any::<prop::sample::Index>(),
    ) {
        let stats: Vec<DictStats> =
            stats.into_iter().map(|(pair, m, s)| DictStats { pair, member: MemberId(m), saved_decayed: s, epoch: 1 }).collect();
        let mut bytes = encode_advertisement(&stats, &[LoadReport { member: MemberId(1), load: 3.0 }]);
        for (i, b) in flips {
            let i = i.index(bytes.len());
            bytes[i] = b;
        }
        let n = cut.index(bytes.len() + 1);
        if let Ok(adv) = decode_advertisement(&bytes[..n]) {
            // Whatever decodes re-encodes to something that decodes the same.
            prop_assert_eq!(decode_advertisement(&encode_advertisement(&adv.stats, &adv.loads)).unwrap(), adv);
        }
    }

    #[test]
    fn large_batches_split_and_round_trip(n in 4000usize..9000) {
        let stats: Vec<DictStats> =
            (0..n as u32).map(|i| DictStats { pair: pair(i), member: MemberId(2), saved_decayed: f64::from(i), epoch: 9 }).collect();
        let adv = decode_advertisement(&encode_advertisement(&stats, &[])).unwrap();
        prop_assert_eq!(adv.stats, stats);
    }
}

#[test]
fn load_slack_keeps_a_pair_home_when_loads_are_a_few_connections() {
    let t = Instant::now();
    let p = pair(3);
    // Member 1 holds the pair's dictionary and two of its connections; the others are idle.
    let decide = |slack: f64| {
        let e = AffinityEngine::new(AffinityConfig { load_slack: slack, ..AffinityConfig::default() });
        e.observe(t, &[stats(p, 1, 50_000.0, 1)]);
        e.observe_loads(t, &loads(&[0.0, 2.0, 0.0, 0.0]));
        e.decide(&p, &live(4), MemberId(0))
    };
    // Average 0.5: 1.25 x 0.5 is under one connection, so without slack the pair leaves home.
    let d = decide(0.0);
    assert_ne!(d.owner, MemberId(1));
    assert_eq!(d.reason, Reason::AffinityLoadBoundFallback);
    // Four connections of headroom keep it with its dictionary.
    let d = decide(4.0);
    assert_eq!((d.owner, d.reason), (MemberId(1), Reason::Affinity));
    // A busy member still sheds pairs once it is more than the slack above the average.
    let e = AffinityEngine::new(AffinityConfig { load_slack: 4.0, ..AffinityConfig::default() });
    e.observe(t, &[stats(p, 1, 50_000.0, 1)]);
    e.observe_loads(t, &loads(&[0.0, 12.0, 0.0, 0.0]));
    assert_ne!(e.decide(&p, &live(4), MemberId(0)).owner, MemberId(1));
    // Nonsense is ignored.
    let e = AffinityEngine::new(AffinityConfig { load_slack: f64::NAN, ..AffinityConfig::default() });
    assert_eq!(e.config().load_slack, 0.0);
}
