//! The engine: inputs, the decision and its reasons.
//!
//! # Inputs
//!
//! Every member advertises, per pair, its decayed bytes saved ([`DictStats`]: exponential decay
//! with a cluster-wide half-life, see [`DecayedBytes`](super::DecayedBytes) and [`SavingsLedger`](super::SavingsLedger)) tagged with its
//! dictionary epoch, and its load ([`LoadReport`]). [`AffinityEngine::observe`] and
//! [`AffinityEngine::observe_loads`] take them with the time they arrived; nothing here reads a
//! clock (sans-IO). An entry's saving keeps decaying from its arrival, so a member that stops
//! advertising a pair fades out. A member's newer epoch (its dictionary was reset, e.g. on
//! restart) voids all its entries of older epochs.
//!
//! Loads must be fresh: a load figure older than a fraction of a connection's lifetime makes
//! every member send the same pairs to the same under-loaded member until the next report (in
//! the simulation, LOAD every 500 ms with 1 s connections fell to 69-92% of the savings at
//! 1.8 x the average load). Active connections per owner, as the connection database counts
//! them on every member after each INSTALL/REMOVE, are such a figure at no message cost.
//!
//! # Decision
//!
//! Among the live members whose load is at most `load_bound x` the average load of the live
//! members (members without a fresh load report count as within the bound), pick the one with
//! the highest decayed saving for the pair; exact ties go to the highest rendezvous weight
//! ([`owner_policy::rendezvous`] over [`Pair::key`]). When only members over the bound have
//! a dictionary for the pair, fall back to rendezvous over the members within the bound. When no
//! live member has one, fall back to rendezvous over the members at most `new_pair_bound x` the
//! average (default 1.1): a stable choice, so a new pair's second connection finds the
//! dictionary its first one started, that keeps the headroom up to `load_bound` for the pairs
//! the dictionaries attract (without it, in the simulation of `benches/affinity.rs`, members
//! with rich dictionaries sat at the bound and spilled their own pairs). Each outcome is
//! counted by [`Reason`].
//!
//! Every member decides alike for the same inputs: the result depends on no iteration order
//! (members are visited in id order, scores are merged commutatively) and on no randomness.
//! Two limits: advertisements reach members at slightly different times (a skew that is tiny
//! next to the half-life, but can flip an exact near-tie), and the bounded tables may evict
//! different cold pairs on different members (such a pair falls back to rendezvous there).

use std::fmt::{self, Write as _};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use cluster_proto::{Connection, MemberId};
use moka::sync::Cache;
use owner_policy::{rendezvous, Choice, OwnerPolicy};

use super::{quantize, Advertisement, Decay, DictStats, LoadReport, Pair, PairGranularity, PAIR_KEY_MAX};

/// Settings of the affinity engine; the same on every member.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AffinityConfig {
    /// What makes a pair.
    pub granularity: PairGranularity,
    /// Half-life of the decayed savings (cluster-wide; default 300 s).
    pub half_life: Duration,
    /// A member qualifies when its load is at most this times the average (default 1.25, at least 1).
    pub load_bound: f64,
    /// A pair no member has a dictionary for goes only to members at most this times the average
    /// load (default 1.1, between 1 and `load_bound`): it keeps headroom on the members whose
    /// dictionaries attract traffic, so their own pairs do not spill.
    pub new_pair_bound: f64,
    /// Headroom in load units (connections) that every bound grants above the average at least
    /// (default 0): with few connections, `1.25 x` a small average is less than one connection,
    /// and a pair's own next connection would already count as over the bound.
    pub load_slack: f64,
    /// Statistics not re-advertised for this long are ignored (default 1 h).
    pub max_age: Duration,
    /// Load reports older than this count as unknown (default 10 s).
    pub max_load_age: Duration,
    /// A member has a dictionary for a pair when its decayed saving exceeds this (default 0).
    pub min_score: f64,
    /// Most pairs tracked (default 262144); the coldest are evicted beyond.
    pub max_pairs: u64,
    /// Pairs untouched for this long (wall clock) are dropped to free memory (default 1 h).
    pub idle_expiry: Duration,
}

impl Default for AffinityConfig {
    fn default() -> Self {
        AffinityConfig {
            granularity: PairGranularity::default(),
            half_life: Duration::from_secs(300),
            load_bound: 1.25,
            new_pair_bound: 1.1,
            load_slack: 0.0,
            max_age: Duration::from_secs(3600),
            max_load_age: Duration::from_secs(10),
            min_score: 0.0,
            max_pairs: 262_144,
            idle_expiry: Duration::from_secs(3600),
        }
    }
}

/// Why a flow got its owner; counted per reason.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Reason {
    /// The member with the best dictionary for the pair, within the load bound.
    Affinity,
    /// The best dictionary is on a member over the load bound; the best one within it.
    AffinityNextBest,
    /// Only members over the load bound have a dictionary: rendezvous over those within it.
    AffinityLoadBoundFallback,
    /// No live member has a dictionary for the pair: rendezvous over those within the new-pair bound.
    RendezvousNoDictionary,
    /// No live member was given: the deciding member keeps the flow.
    LocalNoLiveMembers,
}

impl Reason {
    /// Every reason, in counter order.
    pub const ALL: [Reason; 5] = [
        Reason::Affinity,
        Reason::AffinityNextBest,
        Reason::AffinityLoadBoundFallback,
        Reason::RendezvousNoDictionary,
        Reason::LocalNoLiveMembers,
    ];

    /// Short stable name for metrics and `/flows`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Reason::Affinity => "affinity",
            Reason::AffinityNextBest => "affinity_next_best_load_bound",
            Reason::AffinityLoadBoundFallback => "affinity_load_bound_fallback",
            Reason::RendezvousNoDictionary => "rendezvous_no_dictionary",
            Reason::LocalNoLiveMembers => "local_no_live_members",
        }
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The engine's decision for a pair.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Decision {
    /// The chosen owner.
    pub owner: MemberId,
    /// Why.
    pub reason: Reason,
    /// The owner's decayed saving for the pair (0 for a rendezvous choice).
    pub score: f64,
}

/// Members as a 256-bit set, visited in id order whatever order they were given in.
#[derive(Clone, Copy, Default, PartialEq, Eq)]
struct MemberSet([u64; 4]);

impl MemberSet {
    fn of(members: &[MemberId]) -> Self {
        let mut s = MemberSet::default();
        members.iter().for_each(|&m| s.insert(m));
        s
    }
    fn insert(&mut self, m: MemberId) {
        self.0[usize::from(m.0 >> 6)] |= 1 << (m.0 & 63);
    }
    fn contains(&self, m: MemberId) -> bool {
        self.0[usize::from(m.0 >> 6)] & (1 << (m.0 & 63)) != 0
    }
    fn is_empty(&self) -> bool {
        self.0 == [0; 4]
    }
    fn iter(self) -> impl Iterator<Item = MemberId> {
        self.0.into_iter().enumerate().flat_map(|(w, mut bits)| {
            std::iter::from_fn(move || {
                let b = bits.trailing_zeros();
                (bits != 0).then(|| {
                    bits &= bits - 1;
                    MemberId((w as u32 * 64 + b) as u8)
                })
            })
        })
    }
    /// The members into `buf`, for handing a slice to [`rendezvous`].
    fn fill<'a>(&self, buf: &'a mut [MemberId; 256]) -> &'a [MemberId] {
        let mut n = 0;
        for m in self.iter() {
            buf[n] = m;
            n += 1;
        }
        &buf[..n]
    }
}

/// One member's advertised saving for one pair.
#[derive(Clone, Copy, Debug)]
struct Slot {
    member: MemberId,
    epoch: u32,
    at: Instant,
    saved: f64,
}

impl Slot {
    /// The newer of two advertisements: higher epoch, then later arrival, then larger saving
    /// (a total order, so merging is commutative and the result independent of arrival order).
    fn newer(self, other: Slot) -> Slot {
        let ka = (self.epoch, self.at);
        let kb = (other.epoch, other.at);
        if ka > kb || (ka == kb && self.saved.total_cmp(&other.saved).is_ge()) {
            self
        } else {
            other
        }
    }
}

#[derive(Clone, Copy, Default)]
struct MemberView {
    epoch: Option<u32>,
    load: Option<(Instant, f64)>,
}

struct View {
    clock: Option<Instant>,
    members: Vec<MemberView>,
}

impl View {
    fn advance(&mut self, now: Instant) {
        self.clock = Some(self.clock.map_or(now, |c| c.max(now)));
    }
}

/// Which live members are within the load bound, and the figures behind it.
struct Bound {
    within: MemberSet,
    /// Within the bound for new pairs (`new_pair_bound`).
    cool: MemberSet,
    average: Option<f64>,
    limit: Option<f64>,
}

/// The dictionary-affinity owner policy; shared by reference (`&self`) with the data plane.
pub struct AffinityEngine {
    config: AffinityConfig,
    /// `load_bound`, `new_pair_bound` and `load_slack` as f64 bits: they can change while the
    /// engine decides ([`AffinityEngine::set_load_bounds`], a reload); `config` holds the rest.
    bounds: [AtomicU64; 3],
    decay: Decay,
    pairs: Cache<Pair, Arc<[Slot]>>,
    view: RwLock<View>,
    counters: [AtomicU64; Reason::ALL.len()],
}

impl AffinityEngine {
    /// An engine with no statistics yet (it decides by rendezvous until advertisements come).
    pub fn new(config: AffinityConfig) -> Self {
        let mut config = config;
        let (load_bound, new_pair_bound, load_slack) =
            sane_bounds(config.load_bound, config.new_pair_bound, config.load_slack);
        if config.min_score.is_nan() || config.min_score < 0.0 {
            config.min_score = 0.0;
        }
        let pairs = Cache::builder()
            .max_capacity(config.max_pairs)
            .time_to_idle(config.idle_expiry.max(Duration::from_secs(1)));
        AffinityEngine {
            decay: Decay::new(config.half_life),
            pairs: pairs.build(),
            view: RwLock::new(View { clock: None, members: vec![MemberView::default(); 256] }),
            counters: Default::default(),
            bounds: [load_bound, new_pair_bound, load_slack].map(|v| AtomicU64::new(v.to_bits())),
            config,
        }
    }

    /// The settings in force (a load bound below 1 is raised to 1, a negative `min_score` to 0).
    pub fn config(&self) -> AffinityConfig {
        let (load_bound, new_pair_bound, load_slack) = self.load_bounds();
        AffinityConfig { load_bound, new_pair_bound, load_slack, ..self.config }
    }

    /// Changes the load bound, the new-pair bound and the slack for the decisions from now on
    /// (a reload of `[affinity]`), sanitized as at start.
    pub fn set_load_bounds(&self, load_bound: f64, new_pair_bound: f64, load_slack: f64) {
        let v = sane_bounds(load_bound, new_pair_bound, load_slack);
        for (a, x) in self.bounds.iter().zip([v.0, v.1, v.2]) {
            a.store(x.to_bits(), Ordering::Relaxed);
        }
    }

    /// `(load_bound, new_pair_bound, load_slack)` in force.
    fn load_bounds(&self) -> (f64, f64, f64) {
        let [a, b, c] = &self.bounds;
        let get = |x: &AtomicU64| f64::from_bits(x.load(Ordering::Relaxed));
        (get(a), get(b), get(c))
    }

    /// The pair a new flow belongs to, at this engine's granularity.
    pub fn pair(&self, connection: &Connection) -> Pair {
        Pair::of(connection, &self.config.granularity)
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, View> {
        self.view.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, View> {
        self.view.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Moves the engine's clock (used for decay and ages) forward to `now`.
    pub fn advance(&self, now: Instant) {
        self.write().advance(now);
    }

    /// Takes dictionary statistics that arrived at `now`.
    pub fn observe(&self, now: Instant, stats: &[DictStats]) {
        {
            let mut v = self.write();
            v.advance(now);
            for s in stats {
                let e = &mut v.members[usize::from(s.member.0)].epoch;
                *e = Some(e.map_or(s.epoch, |c| c.max(s.epoch)));
            }
        }
        for s in stats {
            let slot = Slot { member: s.member, epoch: s.epoch, at: now, saved: quantize(s.saved_decayed) };
            self.pairs.entry(s.pair).and_upsert_with(|old| {
                let mut slots: Vec<Slot> = old.map_or_else(Vec::new, |e| e.into_value().to_vec());
                match slots.binary_search_by_key(&slot.member, |x| x.member) {
                    Ok(i) => slots[i] = slots[i].newer(slot),
                    Err(i) => slots.insert(i, slot),
                }
                slots.into()
            });
        }
    }

    /// Takes load reports that arrived at `now` (the latest report of a member counts).
    pub fn observe_loads(&self, now: Instant, loads: &[LoadReport]) {
        let mut v = self.write();
        v.advance(now);
        for l in loads {
            let new = (now, quantize(l.load));
            let cur = &mut v.members[usize::from(l.member.0)].load;
            // Later arrival wins; at the same time the larger load, so the order of arrival does not matter.
            *cur = Some(match *cur {
                Some(old) if old.0 > new.0 || (old.0 == new.0 && old.1 >= new.1) => old,
                _ => new,
            });
        }
    }

    /// Takes a decoded advertisement that arrived at `now`.
    pub fn apply(&self, now: Instant, adv: &Advertisement) {
        self.observe(now, &adv.stats);
        self.observe_loads(now, &adv.loads);
    }

    /// Pairs currently tracked (approximate: evictions are applied lazily).
    pub fn pairs_tracked(&self) -> u64 {
        self.pairs.entry_count()
    }

    fn load_of(&self, v: &View, m: MemberId) -> Option<f64> {
        let clock = v.clock?;
        let (at, load) = v.members[usize::from(m.0)].load?;
        (clock.saturating_duration_since(at) <= self.config.max_load_age).then_some(load)
    }

    fn bound(&self, v: &View, live: MemberSet) -> Bound {
        let (mut sum, mut n) = (0.0, 0u32);
        for m in live.iter() {
            if let Some(l) = self.load_of(v, m) {
                sum += l;
                n += 1;
            }
        }
        if n == 0 {
            return Bound { within: live, cool: live, average: None, limit: None };
        }
        let average = sum / f64::from(n);
        let (load_bound, new_pair_bound, slack) = self.load_bounds();
        let limit = (load_bound * average).max(average + slack);
        let cool_limit = (new_pair_bound * average).max(average + slack);
        let (mut within, mut cool) = (MemberSet::default(), MemberSet::default());
        for m in live.iter() {
            let load = self.load_of(v, m);
            if load.is_none_or(|l| l <= limit) {
                within.insert(m);
            }
            if load.is_none_or(|l| l <= cool_limit) {
                cool.insert(m);
            }
        }
        // Rounding could leave no member at or below the average.
        if within.is_empty() {
            within = live;
        }
        if cool.is_empty() {
            cool = within;
        }
        Bound { within, cool, average: Some(average), limit: Some(limit) }
    }

    /// The member's current decayed saving for the pair, if it counts as a dictionary.
    fn score(&self, v: &View, s: &Slot) -> Option<f64> {
        let clock = v.clock?;
        let age = clock.saturating_duration_since(s.at);
        if v.members[usize::from(s.member.0)].epoch != Some(s.epoch) || age > self.config.max_age {
            return None;
        }
        let score = s.saved * self.decay.factor(age);
        (score > self.config.min_score).then_some(score)
    }

    /// The decision for `pair` among `live`, without counting it.
    pub fn decide(&self, pair: &Pair, live: &[MemberId], me: MemberId) -> Decision {
        let live = MemberSet::of(live);
        if live.is_empty() {
            return Decision { owner: me, reason: Reason::LocalNoLiveMembers, score: 0.0 };
        }
        let slots = self.pairs.get(pair);
        let v = self.read();
        let bound = self.bound(&v, live);
        // Best score over all live members and over those within the bound, with their ties.
        let (mut best_any, mut best_in, mut tied_in) = (0.0f64, 0.0f64, MemberSet::default());
        for s in slots.iter().flat_map(|s| s.iter()).filter(|s| live.contains(s.member)) {
            let Some(score) = self.score(&v, s) else { continue };
            best_any = best_any.max(score);
            if bound.within.contains(s.member) {
                if score > best_in {
                    (best_in, tied_in) = (score, MemberSet::default());
                }
                if score == best_in {
                    tied_in.insert(s.member);
                }
            }
        }
        drop(v);
        let mut buf_key = [0; PAIR_KEY_MAX];
        let key = pair.key_into(&mut buf_key);
        let mut buf = [MemberId(0); 256];
        let (set, reason, score) = if tied_in.is_empty() {
            if best_any > 0.0 {
                (bound.within, Reason::AffinityLoadBoundFallback, 0.0)
            } else {
                (bound.cool, Reason::RendezvousNoDictionary, 0.0)
            }
        } else if best_in >= best_any {
            (tied_in, Reason::Affinity, best_in)
        } else {
            (tied_in, Reason::AffinityNextBest, best_in)
        };
        let owner = rendezvous(key, set.fill(&mut buf)).unwrap_or(me);
        Decision { owner, reason, score }
    }

    /// The decision for `pair`, counted by reason.
    pub fn decide_counted(&self, pair: &Pair, live: &[MemberId], me: MemberId) -> Decision {
        let d = self.decide(pair, live, me);
        let i = Reason::ALL.iter().position(|&r| r == d.reason).unwrap_or(0);
        self.counters[i].fetch_add(1, Ordering::Relaxed);
        d
    }

    /// Decisions made through [`OwnerPolicy::choose`] and [`Self::decide_counted`], by reason.
    pub fn decisions(&self) -> Vec<(Reason, u64)> {
        Reason::ALL.iter().zip(&self.counters).map(|(&r, c)| (r, c.load(Ordering::Relaxed))).collect()
    }

    /// Why `pair` goes where it goes among `live` (for `GET /flows`): loads, bound, scores.
    pub fn explain(&self, pair: &Pair, live: &[MemberId]) -> String {
        let me = live.first().copied().unwrap_or(MemberId(0));
        let d = self.decide(pair, live, me);
        let set = MemberSet::of(live);
        let slots = self.pairs.get(pair);
        let v = self.read();
        let bound = self.bound(&v, set);
        let mut out = format!("pair {pair}: owner {} ({}", d.owner.0, d.reason);
        if d.score > 0.0 {
            let _ = write!(out, ", {:.0} bytes saved, decayed", d.score);
        }
        out.push(')');
        match (bound.average, bound.limit) {
            (Some(avg), Some(limit)) => {
                let (load_bound, new_pair_bound, slack) = self.load_bounds();
                let _ = write!(
                    out,
                    "; load bound {load_bound} x average {avg:.1} (slack {slack}) = {limit:.1} (new pairs {:.1})",
                    (new_pair_bound * avg).max(avg + slack)
                );
            }
            _ => out.push_str("; no load reports, every member within the bound"),
        }
        let mut key = [0; PAIR_KEY_MAX];
        let key = pair.key_into(&mut key);
        let mut rest: Vec<MemberId> = set.iter().collect();
        let mut order = Vec::new();
        while let Some(m) = rendezvous(key, &rest) {
            order.push(m.0.to_string());
            rest.retain(|&x| x != m);
        }
        let _ = write!(out, "; rendezvous order {}", order.join(","));
        for m in set.iter() {
            let _ = write!(out, "\n  member {}: ", m.0);
            match self.load_of(&v, m) {
                Some(l) => {
                    let _ = write!(out, "load {l:.1}");
                }
                None => out.push_str("load unknown"),
            }
            out.push_str(if bound.within.contains(m) { " (within bound), " } else { " (over bound), " });
            let slot = slots.iter().flat_map(|s| s.iter()).find(|s| s.member == m);
            match (slot, slot.and_then(|s| self.score(&v, s))) {
                (Some(s), Some(score)) => {
                    let age = v.clock.map_or(Duration::ZERO, |c| c.saturating_duration_since(s.at));
                    let _ = write!(
                        out,
                        "{score:.0} bytes saved (decayed; epoch {}, advertised {:.1} s ago)",
                        s.epoch,
                        age.as_secs_f64()
                    );
                }
                (Some(s), None) => {
                    let _ =
                        write!(out, "no usable dictionary (epoch {}, saved {:.0} when advertised)", s.epoch, s.saved);
                }
                (None, _) => out.push_str("no dictionary advertised"),
            }
        }
        out
    }
}

impl OwnerPolicy for AffinityEngine {
    fn name(&self) -> &'static str {
        "affinity"
    }

    fn choose(&self, connection: &Connection, live: &[MemberId], me: MemberId) -> Choice {
        let d = self.decide_counted(&self.pair(connection), live, me);
        Choice { owner: d.owner, reason: d.reason.as_str() }
    }
}

/// A load bound of at least 1, a new-pair bound between 1 and it, a slack of 0 or more.
fn sane_bounds(load_bound: f64, new_pair_bound: f64, load_slack: f64) -> (f64, f64, f64) {
    let load_bound = if load_bound.is_nan() || load_bound < 1.0 { 1.0 } else { load_bound };
    let new_pair_bound = if new_pair_bound.is_nan() { 1.0 } else { new_pair_bound.clamp(1.0, load_bound) };
    let load_slack = if !load_slack.is_finite() || load_slack < 0.0 { 0.0 } else { load_slack };
    (load_bound, new_pair_bound, load_slack)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn member_set_visits_in_id_order() {
        let ids = [255, 0, 64, 63, 7, 64].map(MemberId);
        let set = MemberSet::of(&ids);
        let got: Vec<u8> = set.iter().map(|m| m.0).collect();
        assert_eq!(got, [0, 7, 63, 64, 255]);
        let mut buf = [MemberId(0); 256];
        assert_eq!(set.fill(&mut buf).len(), 5);
        assert!(MemberSet::of(&[]).is_empty() && MemberSet::of(&[]).iter().next().is_none());
    }

    #[test]
    fn slot_merge_is_commutative() {
        let t0 = Instant::now();
        let s = |epoch, secs, saved| Slot { member: MemberId(1), epoch, at: t0 + Duration::from_secs(secs), saved };
        let all = [s(1, 5, 10.0), s(2, 1, 3.0), s(2, 1, 4.0), s(1, 9, 50.0)];
        let fold = |order: &[usize]| order.iter().map(|&i| all[i]).reduce(Slot::newer).unwrap();
        let want = fold(&[0, 1, 2, 3]);
        assert_eq!((want.epoch, want.saved), (2, 4.0));
        for order in [[3, 2, 1, 0], [1, 3, 0, 2], [2, 0, 3, 1]] {
            let got = fold(&order);
            assert_eq!((got.epoch, got.at, got.saved), (want.epoch, want.at, want.saved));
        }
    }
}
