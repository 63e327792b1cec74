//! The pair dictionaries of one proxy: one [`Store`] per peer and direction, optionally saved
//! to and loaded from a directory. A pair's dictionaries are either *shared* by all of its
//! concurrent connections ([`Dictionaries::shared`], peers that offer it in their HELLO), or
//! checked out by one connection at a time (older peers).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};

use dictionary_affinity::{SharedStore, Store};
use tracing::{info, warn};

/// Both directions' dictionaries of one downstream/upstream pair.
#[derive(Debug, Clone)]
pub struct PairStores {
    /// Request direction: the downstream encodes, the upstream decodes.
    pub to_upstream: Store,
    /// Response direction: the upstream encodes, the downstream decodes.
    pub to_downstream: Store,
}

impl PairStores {
    /// Empty dictionaries at epoch 0.
    pub fn fresh(budget: u64) -> Self {
        Self { to_upstream: Store::new(budget), to_downstream: Store::new(budget) }
    }

    fn used(&self) -> u64 {
        self.to_upstream.used() + self.to_downstream.used()
    }
}

/// A pair's dictionaries checked out for one connection. Dropped before [`Checkout::take`]
/// (the handshake failed, the peer went away, the connection runs on throwaway dictionaries),
/// it gives them back unchanged, so no exit path can lose a pair's dictionaries.
#[derive(Debug)]
pub struct Checkout<'a> {
    dicts: &'a Dictionaries,
    peer: String,
    stores: Option<PairStores>,
}

impl Checkout<'_> {
    /// The dictionaries, for a codec session that checks them in itself when it ends.
    pub fn take(mut self) -> PairStores {
        self.stores.take().expect("taken only once")
    }
}

impl Drop for Checkout<'_> {
    fn drop(&mut self) {
        if let Some(stores) = self.stores.take() {
            self.dicts.checkin(&self.peer, stores, false);
        }
    }
}

/// Both directions' dictionaries of one pair, shared by all of its connections (cheap to
/// clone), and the signal its decoders wait on for chunks still in flight.
#[derive(Debug, Clone)]
pub struct SharedPair {
    /// Request direction.
    pub to_upstream: SharedStore,
    /// Response direction.
    pub to_downstream: SharedStore,
    /// Woken after a decoder of the pair added chunks: a decoder waiting for a chunk defined
    /// on another connection retries.
    pub defined: Arc<tokio::sync::Notify>,
}

impl SharedPair {
    fn new(stores: PairStores) -> Self {
        Self {
            to_upstream: SharedStore::new(stores.to_upstream),
            to_downstream: SharedStore::new(stores.to_downstream),
            defined: Arc::new(tokio::sync::Notify::new()),
        }
    }

    fn used(&self) -> u64 {
        self.to_upstream.lock().used() + self.to_downstream.lock().used()
    }

    fn snapshot(&self) -> PairStores {
        PairStores { to_upstream: self.to_upstream.snapshot(), to_downstream: self.to_downstream.snapshot() }
    }
}

#[derive(Debug)]
struct Slot {
    /// `None` while a connection has it checked out, or once shared.
    stores: Option<PairStores>,
    /// The pair's dictionaries once a connection ran them shared: from then on they stay so.
    shared: Option<SharedPair>,
    /// Changed since the last save.
    dirty: bool,
    /// Bytes held at the last check-in (for the gauge while checked out).
    used: u64,
    /// When a connection last took the pair (a logical clock): the least recent idle pair
    /// makes room for a new one.
    last_used: u64,
}

impl Slot {
    /// No connection holds the pair's dictionaries.
    fn idle(&self) -> bool {
        match &self.shared {
            Some(p) => Arc::strong_count(&p.defined) == 1,
            None => self.stores.is_some(),
        }
    }
}

/// Every pair's dictionaries on this proxy, keyed by the peer's HELLO identity.
#[derive(Debug)]
pub struct Dictionaries {
    budget: u64,
    dir: Option<PathBuf>,
    /// Most pairs held at once: memory stays under `max_pairs` x 2 x `budget`.
    max_pairs: usize,
    pairs: Mutex<HashMap<String, Slot>>,
    clock: AtomicU64,
    /// Pairs dropped to make room for a new one.
    evicted: Arc<AtomicU64>,
    /// Woken at every check-in, for connections waiting for a busy pair.
    freed: tokio::sync::Notify,
}

const DIRECTIONS: [&str; 2] = ["to_upstream", "to_downstream"];

impl Dictionaries {
    /// Empty, or loaded from `dir` (files that do not load are logged and skipped: that pair
    /// starts afresh, and the stream header's digest makes the peer reset too); at most
    /// `max_pairs` pairs (at least 1), `evicted` counting those dropped to make room.
    pub fn new(budget: u64, dir: Option<PathBuf>, max_pairs: usize, evicted: Arc<AtomicU64>) -> Self {
        let max_pairs = max_pairs.max(1);
        let mut pairs = HashMap::new();
        if let Some(dir) = &dir {
            if let Err(e) = std::fs::create_dir_all(dir) {
                warn!(dir = %dir.display(), error = %e, "cannot create the dictionary directory");
            }
            let mut loaded: Vec<_> = load_dir(dir, budget).into_iter().collect();
            loaded.sort_by(|a, b| a.0.cmp(&b.0));
            if loaded.len() > max_pairs {
                warn!(
                    files = loaded.len(),
                    max_pairs, "more saved pairs than max_dictionary_pairs; the rest are not loaded"
                );
                loaded.truncate(max_pairs);
            }
            for (peer, stores) in loaded {
                let used = stores.used();
                pairs.insert(peer, Slot { stores: Some(stores), shared: None, dirty: false, used, last_used: 0 });
            }
        }
        Self {
            budget,
            dir,
            max_pairs,
            pairs: Mutex::new(pairs),
            clock: AtomicU64::new(1),
            evicted,
            freed: tokio::sync::Notify::new(),
        }
    }

    /// `peer`'s slot, created if there is room: at `max_pairs`, the least recently used idle
    /// pair is dropped (one that has not changed since its last save first); `None` when
    /// every pair is in use.
    fn slot<'m>(&self, pairs: &'m mut HashMap<String, Slot>, peer: &str) -> Option<&'m mut Slot> {
        let now = self.clock.fetch_add(1, Relaxed);
        if !pairs.contains_key(peer) {
            if pairs.len() >= self.max_pairs {
                let victim = pairs
                    .iter()
                    .filter(|(_, s)| s.idle())
                    .min_by_key(|(_, s)| (s.dirty && self.dir.is_some(), s.last_used))
                    .map(|(k, s)| (k.clone(), s.dirty && self.dir.is_some()))?;
                if victim.1 {
                    warn!(peer = %victim.0, "pair dictionaries dropped before their next save: max_dictionary_pairs reached");
                } else {
                    info!(peer = %victim.0, "pair dictionaries dropped: max_dictionary_pairs reached");
                }
                pairs.remove(&victim.0);
                self.evicted.fetch_add(1, Relaxed);
            }
            pairs.insert(peer.to_string(), self.fresh_slot());
        }
        let slot = pairs.get_mut(peer).expect("present");
        slot.last_used = now;
        Some(slot)
    }

    /// The per-direction byte budget.
    pub fn budget(&self) -> u64 {
        self.budget
    }

    /// Takes `peer`'s dictionaries for one connection (created empty on first contact);
    /// `None` while another connection holds them.
    pub fn checkout(&self, peer: &str) -> Option<PairStores> {
        let mut pairs = self.pairs.lock().unwrap_or_else(|e| e.into_inner());
        self.slot(&mut pairs, peer)?.stores.take()
    }

    fn fresh_slot(&self) -> Slot {
        Slot { stores: Some(PairStores::fresh(self.budget)), shared: None, dirty: false, used: 0, last_used: 0 }
    }

    /// `peer`'s dictionaries shared by all of its connections (created empty on first
    /// contact, or made shared from the pair's own, waiting up to `wait` for a connection of
    /// an older peer that has them checked out); `None` if that connection keeps them longer.
    pub async fn shared(&self, peer: &str, wait: std::time::Duration) -> Option<SharedPair> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let freed = self.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            {
                let mut pairs = self.pairs.lock().unwrap_or_else(|e| e.into_inner());
                if let Some(slot) = self.slot(&mut pairs, peer) {
                    if let Some(p) = &slot.shared {
                        return Some(p.clone());
                    }
                    if let Some(stores) = slot.stores.take() {
                        let p = SharedPair::new(stores);
                        slot.shared = Some(p.clone());
                        return Some(p);
                    }
                }
            }
            if tokio::time::timeout_at(deadline, freed).await.is_err() {
                return None;
            }
        }
    }

    /// A connection on `peer`'s shared dictionaries ended (`changed`: it added or used
    /// chunks); returns the bytes now held by all pairs.
    pub fn shared_done(&self, peer: &str, changed: bool) -> u64 {
        let mut pairs = self.pairs.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(slot) = pairs.get_mut(peer) {
            slot.dirty |= changed;
            if let Some(p) = &slot.shared {
                slot.used = p.used();
            }
        }
        pairs.values().map(|s| s.used).sum()
    }

    /// [`Dictionaries::checkout`], waiting up to `wait` for a busy pair: the previous
    /// connection of a pair often still closes on one side when the next one starts.
    pub async fn checkout_wait(&self, peer: &str, wait: std::time::Duration) -> Option<Checkout<'_>> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let freed = self.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            if let Some(s) = self.checkout(peer) {
                return Some(Checkout { dicts: self, peer: peer.to_string(), stores: Some(s) });
            }
            if tokio::time::timeout_at(deadline, freed).await.is_err() {
                return None;
            }
        }
    }

    /// Gives back what [`Dictionaries::checkout`] took; returns the bytes now held by all pairs.
    pub fn checkin(&self, peer: &str, stores: PairStores, changed: bool) -> u64 {
        let mut pairs = self.pairs.lock().unwrap_or_else(|e| e.into_inner());
        let slot = pairs.entry(peer.to_string()).or_insert(Slot {
            stores: None,
            shared: None,
            dirty: false,
            used: 0,
            last_used: 0,
        });
        slot.used = stores.used();
        slot.dirty |= changed;
        slot.stores = Some(stores);
        let used = pairs.values().map(|s| s.used).sum();
        drop(pairs);
        self.freed.notify_waiters();
        used
    }

    /// Bytes held by all pairs (as of their last check-in).
    pub fn used(&self) -> u64 {
        self.pairs.lock().unwrap_or_else(|e| e.into_inner()).values().map(|s| s.used).sum()
    }

    /// Saves every pair that changed since its last save and is not checked out right now (a
    /// shared pair is saved as it is at that moment; blocking file I/O: call it from a
    /// blocking thread). Returns the pairs written.
    pub fn save_changed(&self, counter: &AtomicU64) -> usize {
        let Some(dir) = &self.dir else { return 0 };
        let snapshot: Vec<(String, PairStores)> = {
            let mut pairs = self.pairs.lock().unwrap_or_else(|e| e.into_inner());
            pairs
                .iter_mut()
                .filter(|(_, s)| s.dirty && (s.stores.is_some() || s.shared.is_some()))
                .map(|(peer, s)| {
                    s.dirty = false;
                    let stores = match &s.shared {
                        Some(p) => p.snapshot(),
                        None => s.stores.clone().expect("filtered"),
                    };
                    (peer.clone(), stores)
                })
                .collect()
        };
        let mut saved = 0;
        for (peer, stores) in snapshot {
            let name = hex(&peer);
            let result = stores
                .to_upstream
                .save(dir.join(format!("{name}.{}.lbds", DIRECTIONS[0])))
                .and_then(|()| stores.to_downstream.save(dir.join(format!("{name}.{}.lbds", DIRECTIONS[1]))));
            match result {
                Ok(()) => {
                    saved += 1;
                    counter.fetch_add(1, Relaxed);
                }
                Err(e) => warn!(%peer, dir = %dir.display(), error = %e, "cannot save a pair dictionary"),
            }
        }
        saved
    }
}

/// Hex of the identity's bytes: any identity becomes a safe file name.
fn hex(s: &str) -> String {
    s.bytes().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<String> {
    if s.len() % 2 != 0 {
        return None;
    }
    let bytes: Option<Vec<u8>> = (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).ok()).collect();
    String::from_utf8(bytes?).ok()
}

fn load_dir(dir: &Path, budget: u64) -> HashMap<String, PairStores> {
    let mut pairs: HashMap<String, PairStores> = HashMap::new();
    let Ok(entries) = std::fs::read_dir(dir) else { return pairs };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(stem) = name.strip_suffix(".lbds") else { continue };
        let Some((peer_hex, direction)) = stem.split_once('.') else { continue };
        let (Some(peer), Some(d)) = (unhex(peer_hex), DIRECTIONS.iter().position(|d| *d == direction)) else {
            continue;
        };
        let store = match Store::load(entry.path()) {
            Ok(s) if s.budget() == budget => s,
            Ok(s) => {
                warn!(file = %entry.path().display(), saved = s.budget(), configured = budget,
                    "dictionary file has another budget; ignored, the pair starts a fresh epoch");
                continue;
            }
            Err(e) => {
                warn!(file = %entry.path().display(), error = %e,
                    "dictionary file does not load; ignored, the pair starts a fresh epoch");
                continue;
            }
        };
        let pair = pairs.entry(peer).or_insert_with(|| PairStores::fresh(budget));
        if d == 0 {
            pair.to_upstream = store;
        } else {
            pair.to_downstream = store;
        }
    }
    for (peer, p) in &pairs {
        info!(%peer, bytes = p.used(), "pair dictionaries loaded");
    }
    pairs
}

#[cfg(test)]
mod tests {
    use super::*;
    use dictionary_affinity::ChunkId;

    #[test]
    fn one_checkout_at_a_time_and_saved_pairs_load_back_while_corrupt_files_are_skipped() {
        let dir = std::env::temp_dir().join(format!("lb-dicts-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let d = Dictionaries::new(1 << 20, Some(dir.clone()), 8, Arc::default());
        let mut s = d.checkout("a b/c").expect("first checkout");
        assert!(d.checkout("a b/c").is_none(), "busy while checked out");
        let chunk: std::sync::Arc<[u8]> = vec![5u8; 4000].into();
        s.to_downstream.define(ChunkId::of(&chunk), chunk);
        let want = s.clone();
        d.checkin("a b/c", s, true);
        assert!(d.used() > 4000);
        let counter = AtomicU64::new(0);
        assert_eq!(d.save_changed(&counter), 1);
        assert_eq!(d.save_changed(&counter), 0, "nothing changed since");
        std::fs::write(dir.join(format!("{}.to_upstream.lbds", hex("broken"))), b"LBDS garbage").unwrap();
        let again = Dictionaries::new(1 << 20, Some(dir.clone()), 8, Arc::default());
        let got = again.checkout("a b/c").expect("loaded");
        assert_eq!((got.to_upstream == want.to_upstream, got.to_downstream == want.to_downstream), (true, true));
        assert_eq!(again.checkout("broken").expect("fresh").to_upstream, Store::new(1 << 20));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn at_most_max_pairs_and_the_least_recently_used_idle_one_makes_room() {
        let evicted = Arc::new(AtomicU64::new(0));
        let d = Dictionaries::new(1 << 20, None, 2, evicted.clone());
        let a = d.checkout("a").expect("room");
        d.checkin("a", a, true);
        let _b = d.checkout("b").expect("room");
        let _c = d.checkout("c").expect("a is idle: dropped for c");
        assert_eq!(evicted.load(Relaxed), 1);
        assert!(d.checkout("d").is_none(), "b and c are in use: no room, the connection runs ephemeral");
        assert_eq!(d.pairs.lock().unwrap().len(), 2);
        assert_eq!(evicted.load(Relaxed), 1);
    }

    #[tokio::test]
    async fn a_shared_pair_in_use_is_never_dropped() {
        let d = Dictionaries::new(1 << 20, None, 1, Arc::default());
        let held = d.shared("a", std::time::Duration::ZERO).await.expect("room");
        assert!(d.shared("b", std::time::Duration::ZERO).await.is_none(), "a is in use");
        drop(held);
        assert!(d.shared("b", std::time::Duration::ZERO).await.is_some(), "a is idle now: dropped for b");
    }
}
