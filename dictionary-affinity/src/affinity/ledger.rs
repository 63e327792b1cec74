//! The savings ledger: a member's own record of decayed bytes saved per pair, bounded, and
//! the source of the DICT_STATS it advertises (only what changed, or everything for a member
//! that just joined).

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cluster_proto::MemberId;
use moka::sync::Cache;

use super::{Decay, DecayedBytes, DictStats, Pair};

/// A member's own record of decayed bytes saved per pair, the source of its DICT_STATS.
pub struct SavingsLedger {
    decay: Decay,
    table: Cache<Pair, DecayedBytes>,
    changed: Arc<Mutex<HashSet<Pair>>>,
}

impl SavingsLedger {
    /// A ledger with the cluster's half-life, holding at most `max_pairs` pairs.
    pub fn new(half_life: Duration, max_pairs: u64) -> Self {
        let changed: Arc<Mutex<HashSet<Pair>>> = Arc::default();
        let listener = changed.clone();
        let table = Cache::builder()
            .max_capacity(max_pairs)
            .eviction_listener(move |pair: Arc<Pair>, _, cause: moka::notification::RemovalCause| {
                if cause.was_evicted() {
                    listener.lock().unwrap_or_else(|e| e.into_inner()).insert(*pair);
                }
            })
            .build();
        SavingsLedger { decay: Decay::new(half_life), table, changed }
    }

    /// Records `bytes` saved by the dictionary for `pair` at `now`.
    pub fn record(&self, now: Instant, pair: Pair, bytes: u64) {
        let decay = self.decay;
        self.table.entry(pair).and_upsert_with(|old| {
            let mut d = old.map_or(DecayedBytes::new(now), |e| e.into_value());
            d.add(&decay, now, bytes as f64);
            d
        });
        self.changed.lock().unwrap_or_else(|e| e.into_inner()).insert(pair);
    }

    /// The dictionary no longer holds `pair`: the next advertisement withdraws it.
    pub fn forget(&self, pair: &Pair) {
        self.table.invalidate(pair);
        self.changed.lock().unwrap_or_else(|e| e.into_inner()).insert(*pair);
    }

    /// The decayed bytes saved for `pair` at `now`.
    pub fn saved(&self, now: Instant, pair: &Pair) -> f64 {
        self.table.get(pair).map_or(0.0, |d| d.value_at(&self.decay, now))
    }

    /// The pairs changed since the last call, sorted, with their savings at `now` (0: withdrawn).
    pub fn advertise(&self, now: Instant, member: MemberId, epoch: u32) -> Vec<DictStats> {
        let changed = std::mem::take(&mut *self.changed.lock().unwrap_or_else(|e| e.into_inner()));
        let mut pairs: Vec<Pair> = changed.into_iter().collect();
        pairs.sort_unstable();
        pairs.into_iter().map(|pair| DictStats { pair, member, saved_decayed: self.saved(now, &pair), epoch }).collect()
    }

    /// Every pair held, sorted, with its savings at `now` (for a member that just joined).
    pub fn snapshot(&self, now: Instant, member: MemberId, epoch: u32) -> Vec<DictStats> {
        let mut v: Vec<DictStats> = self
            .table
            .iter()
            .map(|(pair, d)| DictStats { pair: *pair, member, saved_decayed: d.value_at(&self.decay, now), epoch })
            .collect();
        v.sort_unstable_by_key(|s| s.pair);
        v
    }
}
