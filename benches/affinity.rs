//! The affinity engine: decisions per second, and a simulation of dictionary savings.
//!
//! Target (DESIGN.md): affinity keeps >= 95% of single-upstream savings with 4 upstreams at
//! load <= 1.25 x average (anchor: a 5-tuple hash keeps ~ 1/N).
//!
//! The simulation: 20k client/server pairs (a client /24 "site" behind a spoofing downstream
//! proxy, and a server) with Zipf popularity; each connection fetches one of its pair's objects
//! (Zipf within the pair) from a random client host of the site and a random port. Each of the 4
//! upstreams has a dictionary: an LRU of the objects it served, with a capacity. A connection
//! saves 99% of its bytes when the upstream that serves it has the object in its dictionary.
//! The reference is one upstream with an infinite dictionary (100%). Members advertise their
//! decayed savings per pair (DICT_STATS) and their active connections (LOAD) every tick,
//! through the wire codec, and the affinity engine decides with what it has been told.
//!
//! Figures are printed to stderr (`cargo bench -p benches --bench affinity`).

use dictionary_affinity::sample::Rng;
use std::collections::{HashMap, HashSet, VecDeque};
use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use cluster_proto::{Connection, MemberId, Protocol};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use dictionary_affinity::affinity::{
    decode_advertisement, encode_advertisement, AffinityConfig, AffinityEngine, DictStats, LoadReport, Pair,
    SavingsLedger,
};
use handoff::policy::{rendezvous, OwnerPolicy, Rendezvous, RendezvousKey};

const PAIRS: usize = 20_000;
const UPSTREAMS: u8 = 4;
const CONNECTIONS: u64 = 400_000;
/// One new connection per millisecond of simulated time; each lasts `HOLD_MS`.
const HOLD_MS: u64 = 1_000;
/// Paper section 3: a typical object is about 10 kB.
const OBJECT_BYTES: u64 = 10_000;
/// Loads are sampled for the figures every this many milliseconds.
const SAMPLE_MS: u64 = 20;
const SAVED_ON_HIT: u64 = OBJECT_BYTES * 99 / 100;

/// What varies between simulated workloads.
#[derive(Clone, Copy, Debug)]
struct Scenario {
    name: &'static str,
    /// Objects per pair, requested with Zipf popularity of this exponent (0: uniform).
    objects_per_pair: usize,
    object_zipf: f64,
    /// Objects one upstream's dictionary holds.
    dictionary_objects: usize,
    /// DICT_STATS advertisements every this many milliseconds.
    stats_ms: u64,
    /// Load reports every this many milliseconds (1: loads read from the connection database's
    /// per-owner counts, which every INSTALL/REMOVE updates on every member).
    load_ms: u64,
}

/// The main workload: popular objects repeat often, so even a 5-tuple hash keeps much.
const REPEATED: Scenario = Scenario {
    name: "repeated",
    objects_per_pair: 100,
    object_zipf: 1.0,
    dictionary_objects: 50_000,
    stats_ms: 20,
    load_ms: 20,
};
/// Rarely repeated content (each object ~2 times): where a 5-tuple hash keeps ~1/N.
const RARE: Scenario = Scenario {
    name: "rare repeats",
    objects_per_pair: 10_000,
    object_zipf: 0.0,
    dictionary_objects: 250_000,
    stats_ms: 20,
    load_ms: 20,
};

fn zipf_cdf(n: usize, s: f64) -> Vec<f64> {
    let mut acc = 0.0;
    let mut v: Vec<f64> = (1..=n)
        .map(|k| {
            acc += 1.0 / (k as f64).powf(s);
            acc
        })
        .collect();
    v.iter_mut().for_each(|x| *x /= acc);
    v
}

fn sample(cdf: &[f64], u: f64) -> usize {
    cdf.partition_point(|&c| c < u).min(cdf.len() - 1)
}

/// One simulated connection.
struct Request {
    pair: u32,
    object: u32,
    connection: Connection,
}

/// Pair `i`: site `i / 100` (a /24 in 198.18.0.0/16) and server `i % 100` (in 198.19.0.0/16).
fn pair_addresses(i: u32) -> (Ipv4Addr, Ipv4Addr) {
    (Ipv4Addr::new(198, 18, (i / 100) as u8, 0), Ipv4Addr::new(198, 19, 0, (i % 100) as u8 + 1))
}

fn workload(sc: &Scenario) -> Vec<Request> {
    let mut rng = Rng(0x6166_6669_6e69_7479);
    let pairs = zipf_cdf(PAIRS, 1.0);
    let objects = zipf_cdf(sc.objects_per_pair, sc.object_zipf);
    // Popularity rank -> pair, shuffled so that popularity says nothing about the addresses.
    let mut rank: Vec<u32> = (0..PAIRS as u32).collect();
    for i in (1..rank.len()).rev() {
        rank.swap(i, (rng.next() % (i as u64 + 1)) as usize);
    }
    (0..CONNECTIONS)
        .map(|_| {
            let pair = rank[sample(&pairs, rng.unit())];
            let object = sample(&objects, rng.unit()) as u32;
            let (site, server) = pair_addresses(pair);
            let host = Ipv4Addr::from(u32::from(site) | (1 + rng.next() % 64) as u32);
            let port = 1024 + (rng.next() % 64_000) as u16;
            let connection = Connection::new(
                Protocol::Tcp,
                SocketAddr::new(IpAddr::V4(host), port),
                SocketAddr::new(IpAddr::V4(server), 443),
            )
            .expect("one family");
            Request { pair, object, connection }
        })
        .collect()
}

/// An LRU set of object ids.
struct Lru {
    capacity: usize,
    stamp: u64,
    at: HashMap<u64, u64>,
    order: VecDeque<(u64, u64)>,
}

impl Lru {
    fn new(capacity: usize) -> Self {
        Lru { capacity, stamp: 0, at: HashMap::new(), order: VecDeque::new() }
    }

    /// Uses `key`: true when it was held; returns an evicted key through `evicted`.
    fn touch(&mut self, key: u64, evicted: &mut Vec<u64>) -> bool {
        self.stamp += 1;
        let hit = self.at.insert(key, self.stamp).is_some();
        self.order.push_back((key, self.stamp));
        while self.at.len() > self.capacity {
            let (k, s) = self.order.pop_front().expect("non-empty");
            if self.at.get(&k) == Some(&s) {
                self.at.remove(&k);
                evicted.push(k);
            }
        }
        if self.order.len() > 4 * self.capacity.max(1024) {
            let at = &self.at;
            self.order.retain(|(k, s)| at.get(k) == Some(s));
        }
        hit
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Policy {
    FiveTupleHash,
    AddressPairRendezvous,
    PairRendezvous,
    Affinity,
}

impl Policy {
    fn name(self) -> &'static str {
        match self {
            Policy::FiveTupleHash => "5-tuple hash (rendezvous, Connection key)",
            Policy::AddressPairRendezvous => "rendezvous on address pair (AddressPair key)",
            Policy::PairRendezvous => "rendezvous on /24 pair (no load bound)",
            Policy::Affinity => "affinity (bounds 1.25, new pairs 1.1)",
        }
    }
}

struct Upstream {
    dictionary: Lru,
    objects_of_pair: HashMap<u32, u32>,
    ledger: SavingsLedger,
    active: VecDeque<u64>,
    served: u64,
}

/// What one policy achieved.
#[derive(Debug, Default)]
struct Outcome {
    saved: u64,
    saved_second_half: u64,
    served_max_over_avg: f64,
    active_mean_max_over_avg: f64,
    active_p99_max_over_avg: f64,
    decisions: Vec<(&'static str, u64)>,
}

/// The engine's settings in the simulation: defaults, with a half-life short enough for 400 s.
fn sim_config() -> AffinityConfig {
    AffinityConfig { half_life: Duration::from_secs(60), ..AffinityConfig::default() }
}

fn simulate(sc: &Scenario, config: AffinityConfig, policy: Policy, requests: &[Request]) -> Outcome {
    let engine = AffinityEngine::new(config);
    let live: Vec<MemberId> = (0..UPSTREAMS).map(MemberId).collect();
    let mut ups: Vec<Upstream> = (0..UPSTREAMS)
        .map(|_| Upstream {
            dictionary: Lru::new(sc.dictionary_objects),
            objects_of_pair: HashMap::new(),
            ledger: SavingsLedger::new(config.half_life, PAIRS as u64 * 2),
            active: VecDeque::new(),
            served: 0,
        })
        .collect();
    let pairs: Vec<Pair> = (0..PAIRS as u32)
        .map(|i| {
            let (site, server) = pair_addresses(i);
            Pair::new(IpAddr::V4(site), 24, IpAddr::V4(server), 32).expect("valid")
        })
        .collect();
    let five = Rendezvous { key: RendezvousKey::Connection };
    let addr = Rendezvous { key: RendezvousKey::AddressPair };
    let t0 = Instant::now();
    let mut out = Outcome::default();
    let mut ratios = Vec::new();
    let mut evicted = Vec::new();
    for (i, r) in requests.iter().enumerate() {
        let ms = i as u64;
        let now = t0 + Duration::from_millis(ms);
        for u in &mut ups {
            while u.active.front().is_some_and(|&end| end <= ms) {
                u.active.pop_front();
            }
        }
        if ms % SAMPLE_MS == 0 {
            let active: Vec<f64> = ups.iter().map(|u| u.active.len() as f64).collect();
            let avg = active.iter().sum::<f64>() / active.len() as f64;
            if ms >= HOLD_MS && avg > 0.0 {
                ratios.push(active.iter().cloned().fold(0.0, f64::max) / avg);
            }
        }
        if policy == Policy::Affinity && (ms % sc.stats_ms == 0 || ms % sc.load_ms == 0) {
            let mut stats: Vec<DictStats> = Vec::new();
            let mut loads = Vec::new();
            for (m, u) in ups.iter().enumerate() {
                if ms % sc.stats_ms == 0 {
                    stats.extend(u.ledger.advertise(now, MemberId(m as u8), 1));
                }
                if ms % sc.load_ms == 0 {
                    loads.push(LoadReport { member: MemberId(m as u8), load: u.active.len() as f64 });
                }
            }
            let adv = decode_advertisement(&encode_advertisement(&stats, &loads)).expect("round trip");
            engine.apply(now, &adv);
        }
        let owner = match policy {
            Policy::FiveTupleHash => five.choose(&r.connection, &live, MemberId(0)).owner,
            Policy::AddressPairRendezvous => addr.choose(&r.connection, &live, MemberId(0)).owner,
            Policy::PairRendezvous => rendezvous(&pairs[r.pair as usize].key(), &live).expect("live"),
            Policy::Affinity => engine.choose(&r.connection, &live, MemberId(0)).owner,
        };
        let u = &mut ups[owner.0 as usize];
        u.served += 1;
        u.active.push_back(ms + HOLD_MS);
        let key = (u64::from(r.pair) << 32) | u64::from(r.object);
        evicted.clear();
        if u.dictionary.touch(key, &mut evicted) {
            out.saved += SAVED_ON_HIT;
            if i as u64 >= CONNECTIONS / 2 {
                out.saved_second_half += SAVED_ON_HIT;
            }
            if policy == Policy::Affinity {
                u.ledger.record(now, pairs[r.pair as usize], SAVED_ON_HIT);
            }
        } else {
            *u.objects_of_pair.entry(r.pair).or_default() += 1;
        }
        for &k in &evicted {
            let p = (k >> 32) as u32;
            let n = u.objects_of_pair.get_mut(&p).expect("counted");
            *n -= 1;
            if *n == 0 {
                u.objects_of_pair.remove(&p);
                if policy == Policy::Affinity {
                    u.ledger.forget(&pairs[p as usize]);
                }
            }
        }
    }
    let served: Vec<f64> = ups.iter().map(|u| u.served as f64).collect();
    out.served_max_over_avg = served.iter().cloned().fold(0.0, f64::max) / (served.iter().sum::<f64>() / 4.0);
    out.active_mean_max_over_avg = ratios.iter().sum::<f64>() / ratios.len() as f64;
    ratios.sort_by(f64::total_cmp);
    out.active_p99_max_over_avg = ratios[ratios.len() * 99 / 100];
    out.decisions = engine.decisions().into_iter().map(|(r, n)| (r.as_str(), n)).collect();
    out
}

/// Savings of one upstream with an infinite dictionary: every repeat of an object is a hit.
fn single_upstream(requests: &[Request]) -> (u64, u64) {
    let mut seen = HashSet::new();
    let (mut all, mut second) = (0, 0);
    for (i, r) in requests.iter().enumerate() {
        if !seen.insert((r.pair, r.object)) {
            all += SAVED_ON_HIT;
            if i as u64 >= CONNECTIONS / 2 {
                second += SAVED_ON_HIT;
            }
        }
    }
    (all, second)
}

fn report(sc: &Scenario) -> Vec<Request> {
    let requests = workload(sc);
    let (single, single_second) = single_upstream(&requests);
    eprintln!(
        "\naffinity simulation, {} content: {PAIRS} pairs (Zipf 1.0), {} objects per pair (Zipf {}), \
         {CONNECTIONS} connections of {OBJECT_BYTES} B, {UPSTREAMS} upstreams with {}-object LRU dictionaries, \
         {HOLD_MS} ms per connection, 1 new per ms, DICT_STATS and LOAD every {} ms",
        sc.name, sc.objects_per_pair, sc.object_zipf, sc.dictionary_objects, sc.stats_ms
    );
    eprintln!(
        "single upstream, infinite dictionary: {:.1}% of bytes saved (the 100% reference)",
        100.0 * single as f64 / (CONNECTIONS * OBJECT_BYTES) as f64
    );
    eprintln!(
        "{:<46} {:>8} {:>14} {:>14} {:>15} {:>11}",
        "policy", "kept", "kept 2nd half", "served max/avg", "active max/avg", "active p99"
    );
    for policy in [Policy::FiveTupleHash, Policy::AddressPairRendezvous, Policy::PairRendezvous, Policy::Affinity] {
        let o = simulate(sc, sim_config(), policy, &requests);
        eprintln!(
            "{:<46} {:>7.1}% {:>13.1}% {:>14.3} {:>15.3} {:>11.3}",
            policy.name(),
            100.0 * o.saved as f64 / single as f64,
            100.0 * o.saved_second_half as f64 / single_second as f64,
            o.served_max_over_avg,
            o.active_mean_max_over_avg,
            o.active_p99_max_over_avg,
        );
        if policy == Policy::Affinity {
            eprintln!("  affinity decisions: {:?}", o.decisions);
        }
    }
    eprintln!("targets: affinity >= 95% kept with load <= 1.25 x average; 5-tuple hash ~ 1/N");
    let mut line = String::from("affinity kept / served max/avg by new_pair_bound:");
    for b in [1.0, 1.05, 1.1, 1.15, 1.2, 1.25] {
        let o = simulate(sc, AffinityConfig { new_pair_bound: b, ..sim_config() }, Policy::Affinity, &requests);
        line += &format!("  {b}: {:.1}% / {:.3}", 100.0 * o.saved as f64 / single as f64, o.served_max_over_avg);
    }
    eprintln!("{line}");
    let mut line = String::from("affinity kept / active p99 max/avg by DICT_STATS + LOAD interval:");
    for (stats_ms, load_ms) in [(100, 100), (500, 500), (500, 1), (2000, 1)] {
        let o = simulate(&Scenario { stats_ms, load_ms, ..*sc }, sim_config(), Policy::Affinity, &requests);
        let kept = 100.0 * o.saved as f64 / single as f64;
        line += &format!("  {stats_ms}+{load_ms} ms: {kept:.1}% / {:.3}", o.active_p99_max_over_avg);
    }
    eprintln!("{line}");
    requests
}

fn simulation(c: &mut Criterion) {
    let requests = report(&REPEATED);
    report(&RARE);
    eprintln!();
    let mut g = c.benchmark_group("affinity simulation");
    g.sample_size(10);
    g.throughput(Throughput::Elements(CONNECTIONS));
    g.bench_function("affinity, 20k pairs x 4 upstreams (target >= 95% kept, load <= 1.25 x avg)", |b| {
        b.iter(|| simulate(&REPEATED, sim_config(), Policy::Affinity, &requests).saved)
    });
    g.finish();
}

fn decisions(c: &mut Criterion) {
    let engine = AffinityEngine::new(AffinityConfig::default());
    let live: Vec<MemberId> = (0..UPSTREAMS).map(MemberId).collect();
    let t = Instant::now();
    let pairs: Vec<Pair> = (0..PAIRS as u32)
        .map(|i| {
            let (site, server) = pair_addresses(i);
            Pair::new(IpAddr::V4(site), 24, IpAddr::V4(server), 32).expect("valid")
        })
        .collect();
    // Three of four pairs have dictionaries on one or two members.
    let stats: Vec<DictStats> = pairs
        .iter()
        .enumerate()
        .filter(|(i, _)| i % 4 != 0)
        .flat_map(|(i, &pair)| {
            [(i % 4) as u8, (i % 3) as u8].map(|m| DictStats {
                pair,
                member: MemberId(m),
                saved_decayed: (i * 100 + usize::from(m)) as f64,
                epoch: 1,
            })
        })
        .collect();
    engine.observe(t, &stats);
    engine
        .observe_loads(t, &(0..UPSTREAMS).map(|m| LoadReport { member: MemberId(m), load: 100.0 }).collect::<Vec<_>>());
    let connections: Vec<Connection> = (0..PAIRS as u32)
        .map(|i| {
            let (site, server) = pair_addresses(i);
            Connection::new(
                Protocol::Tcp,
                SocketAddr::new(IpAddr::V4(Ipv4Addr::from(u32::from(site) | 7)), 40_000 + (i % 1000) as u16),
                SocketAddr::new(IpAddr::V4(server), 443),
            )
            .expect("one family")
        })
        .collect();
    let mut g = c.benchmark_group("affinity");
    g.throughput(Throughput::Elements(PAIRS as u64));
    g.bench_function("choose, 20k pairs x 4 members (SYN path; no DESIGN target)", |b| {
        b.iter(|| {
            let mut n = 0u32;
            for conn in &connections {
                n += u32::from(engine.choose(black_box(conn), &live, MemberId(0)).owner.0);
            }
            n
        })
    });
    g.bench_function("5-tuple rendezvous baseline, 4 members", |b| {
        let five = Rendezvous { key: RendezvousKey::Connection };
        b.iter(|| {
            let mut n = 0u32;
            for conn in &connections {
                n += u32::from(five.choose(black_box(conn), &live, MemberId(0)).owner.0);
            }
            n
        })
    });
    let bytes = encode_advertisement(&stats, &[]);
    g.throughput(Throughput::Elements(stats.len() as u64));
    g.bench_function("decode + observe DICT_STATS (no DESIGN target)", |b| {
        b.iter(|| {
            let adv = decode_advertisement(black_box(&bytes)).expect("valid");
            engine.apply(t, &adv);
        })
    });
    g.finish();
}

criterion_group!(benches, decisions, simulation);
criterion_main!(benches);
