//! The dictionary store: the chunks one downstream/upstream pair has exchanged, kept in
//! lockstep on both proxies (paper section 1.2: "two proxies maintain parallel dictionaries").
//!
//! Why the two copies stay identical: the store changes only through [`Store::define`],
//! [`Store::touch`] and [`Store::reset`], and the codec calls them only at token boundaries, in
//! stream order: the encoder when it writes a DEFINE / REFERENCE / RESET token, the decoder when
//! it applies that same token. Eviction is least-recently-used over a logical clock that
//! advances once per define or touch, with a byte budget charged `len + ENTRY_OVERHEAD` per
//! chunk; it reads no wall clock, no randomness and no hash-map iteration order. Two stores
//! with the same budget that apply the same sequence of operations therefore evict the same
//! chunks at the same moments. A digest folded over every operation lets the peers check this
//! (stream header and CHECKPOINT token) instead of trusting it.

use std::collections::{HashMap, VecDeque};
use std::fs;
use std::hash::{BuildHasherDefault, Hasher};
use std::io::{self, BufWriter, Write};
use std::path::Path;
use std::sync::Arc;

use serde::Serialize;
use xxhash_rust::xxh3::{xxh3_64_with_seed, Xxh3};

use crate::chunk::{ChunkId, MAX_CHUNK};
use crate::hints::Hints;

/// Budget bytes charged per chunk on top of its length (map slot, order slot, allocation).
pub const ENTRY_OVERHEAD: u64 = 64;

/// Default byte budget of one pair's dictionary.
pub const DEFAULT_BUDGET: u64 = 64 * 1024 * 1024;

const CHECK_SEED: u64 = 0x6c62_2d63_6865_636b;
const DIGEST_SEED: u64 = 0x6c62_2d64_6967_6573;
const FILE_MAGIC: [u8; 4] = *b"LBDS";
const FILE_VERSION: u16 = 1;
const FILE_HEADER_LEN: usize = 36;

const OP_DEFINE: u8 = 1;
const OP_TOUCH: u8 = 2;

/// The 32-bit content check a REFERENCE carries, independent of the chunk's xxh3-128 identity.
#[inline]
pub fn chunk_check(bytes: &[u8]) -> u32 {
    xxh3_64_with_seed(bytes, CHECK_SEED) as u32
}

/// A chunk held by a [`Store`].
#[derive(Debug, Clone)]
pub struct StoredChunk {
    bytes: Arc<[u8]>,
    check: u32,
}

impl StoredChunk {
    /// The chunk's bytes.
    pub fn bytes(&self) -> &Arc<[u8]> {
        &self.bytes
    }

    /// Its [`chunk_check`].
    pub fn check(&self) -> u32 {
        self.check
    }
}

#[derive(Debug, Clone)]
struct Entry {
    chunk: StoredChunk,
    last_use: u64,
}

/// Chunk ids are already uniform hashes: use their low bits as the map hash.
#[derive(Default, Clone, Copy)]
pub(crate) struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }

    fn write_u128(&mut self, v: u128) {
        self.0 = v as u64 ^ (v >> 64) as u64;
    }
}

/// Counters for the dictionary statistics of one store.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct StoreStats {
    /// Chunks added by DEFINE.
    pub defines: u64,
    /// References that found their chunk (LRU touches).
    pub hits: u64,
    /// Chunks evicted to stay within the budget.
    pub evictions: u64,
    /// Bytes of chunk data evicted.
    pub evicted_bytes: u64,
    /// Epoch resets.
    pub resets: u64,
}

/// A byte-budgeted, LRU-evicted dictionary of chunks, one per downstream/upstream pair.
#[derive(Debug, Clone)]
pub struct Store {
    epoch: u32,
    budget: u64,
    used: u64,
    digest: u64,
    clock: u64,
    entries: HashMap<ChunkId, Entry, BuildHasherDefault<IdHasher>>,
    /// (logical time of use, id), oldest first; an item whose time is not the entry's
    /// `last_use` is stale and skipped (a touch pushes a new item instead of moving one).
    order: VecDeque<(u64, ChunkId)>,
    stats: StoreStats,
    /// Ids evicted lately (off unless [`Store::log_evictions`]): not part of the dictionary's
    /// content, never saved or compared.
    evicted: Option<Box<EvictionLog>>,
    /// Send-ahead candidates for encoders ([`Store::hints_mut`]; off until an encoder asks):
    /// not part of the dictionary's content, never saved or compared.
    hints: Option<Box<Hints>>,
}

/// The last `cap` ids a store evicted, for a shared decoder to tell "evicted here" (NACK now)
/// from "defined on another connection and still on its way" (wait for it).
#[derive(Debug, Clone, Default)]
struct EvictionLog {
    cap: usize,
    order: VecDeque<ChunkId>,
    ids: std::collections::HashSet<ChunkId, BuildHasherDefault<IdHasher>>,
}

impl EvictionLog {
    fn push(&mut self, id: ChunkId) {
        if self.cap == 0 {
            return;
        }
        if self.order.len() == self.cap {
            if let Some(old) = self.order.pop_front() {
                self.ids.remove(&old);
            }
        }
        if self.ids.insert(id) {
            self.order.push_back(id);
        }
    }
}

impl Store {
    /// An empty store at epoch 0 with this byte budget.
    pub fn new(budget: u64) -> Self {
        Self::with_epoch(budget, 0)
    }

    /// An empty store at `epoch` with this byte budget.
    pub fn with_epoch(budget: u64, epoch: u32) -> Self {
        Self {
            epoch,
            budget,
            used: 0,
            digest: initial_digest(epoch),
            clock: 0,
            entries: HashMap::default(),
            order: VecDeque::new(),
            stats: StoreStats::default(),
            evicted: None,
            hints: None,
        }
    }

    /// Remembers the last `cap` evicted ids (16 bytes each, plus set overhead), for
    /// [`Store::recently_evicted`]. Zero turns the log off.
    pub fn log_evictions(&mut self, cap: usize) {
        self.evicted = (cap > 0).then(|| Box::new(EvictionLog { cap, ..EvictionLog::default() }));
    }

    /// Whether `id` is among the last evicted ids (and not held again since); always false
    /// unless [`Store::log_evictions`] is on.
    pub fn recently_evicted(&self, id: ChunkId) -> bool {
        !self.entries.contains_key(&id) && self.evicted.as_ref().is_some_and(|l| l.ids.contains(&id))
    }

    /// The epoch: both peers agree on it, and a reset moves to a new one.
    pub fn epoch(&self) -> u32 {
        self.epoch
    }

    /// The byte budget (chunk bytes plus [`ENTRY_OVERHEAD`] each).
    pub fn budget(&self) -> u64 {
        self.budget
    }

    /// Budget bytes in use.
    pub fn used(&self) -> u64 {
        self.used
    }

    /// Number of chunks held.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when no chunk is held.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// A digest of every operation since the epoch began; equal digests mean equal histories.
    pub fn digest(&self) -> u64 {
        self.digest
    }

    /// The counters.
    pub fn stats(&self) -> StoreStats {
        self.stats
    }

    /// Whether a chunk of `len` bytes can be held at all under this budget.
    pub fn fits(&self, len: usize) -> bool {
        len <= MAX_CHUNK && len as u64 + ENTRY_OVERHEAD <= self.budget
    }

    /// Whether `id` is held.
    pub fn contains(&self, id: ChunkId) -> bool {
        self.entries.contains_key(&id)
    }

    /// The chunk held under `id`, without counting a use.
    pub fn get(&self, id: ChunkId) -> Option<&StoredChunk> {
        self.entries.get(&id).map(|e| &e.chunk)
    }

    /// Adds a chunk (a DEFINE), evicting least-recently-used chunks to make room; returns its
    /// check, or `None` (and changes nothing) when it can never fit. Defining a held id only
    /// counts as a use. `id` must be `ChunkId::of(&bytes)`.
    pub fn define(&mut self, id: ChunkId, bytes: Arc<[u8]>) -> Option<u32> {
        if !self.fits(bytes.len()) {
            return None;
        }
        self.fold(OP_DEFINE, id);
        self.stats.defines += 1;
        self.clock += 1;
        if let Some(e) = self.entries.get_mut(&id) {
            e.last_use = self.clock;
            self.order.push_back((self.clock, id));
            return Some(e.chunk.check);
        }
        let cost = bytes.len() as u64 + ENTRY_OVERHEAD;
        while self.used + cost > self.budget {
            self.evict_one();
        }
        let check = chunk_check(&bytes);
        self.used += cost;
        self.entries.insert(id, Entry { chunk: StoredChunk { bytes, check }, last_use: self.clock });
        self.order.push_back((self.clock, id));
        self.compact_order();
        Some(check)
    }

    /// Counts a use of `id` (a REFERENCE), making it the most recently used; false if absent.
    pub fn touch(&mut self, id: ChunkId) -> bool {
        let Some(e) = self.entries.get_mut(&id) else { return false };
        self.clock += 1;
        e.last_use = self.clock;
        self.order.push_back((self.clock, id));
        self.stats.hits += 1;
        self.fold(OP_TOUCH, id);
        self.compact_order();
        true
    }

    /// Empties the store and starts `epoch` (a RESET).
    pub fn reset(&mut self, epoch: u32) {
        let stats = StoreStats { resets: self.stats.resets + 1, ..self.stats };
        let evicted = self.evicted.take().map(|l| Box::new(EvictionLog { cap: l.cap, ..EvictionLog::default() }));
        let hints = self.hints.take().map(|_| Box::default());
        *self = Self { stats, evicted, hints, ..Self::with_epoch(self.budget, epoch) };
    }

    /// Ids from least to most recently used: the eviction order.
    pub fn lru_ids(&self) -> impl Iterator<Item = ChunkId> + '_ {
        self.order.iter().filter(|(t, id)| self.entries.get(id).is_some_and(|e| e.last_use == *t)).map(|&(_, id)| id)
    }

    fn evict_one(&mut self) {
        while let Some((t, id)) = self.order.pop_front() {
            if self.entries.get(&id).is_some_and(|e| e.last_use == t) {
                let e = self.entries.remove(&id).expect("checked");
                let len = e.chunk.bytes.len() as u64;
                self.used -= len + ENTRY_OVERHEAD;
                self.stats.evictions += 1;
                self.stats.evicted_bytes += len;
                if let Some(log) = self.evicted.as_mut() {
                    log.push(id);
                }
                if let Some(h) = self.hints.as_mut() {
                    h.forget(id, &e.chunk.bytes);
                }
                return;
            }
        }
        unreachable!("used > 0 implies a live entry in the order queue");
    }

    fn compact_order(&mut self) {
        if self.order.len() > 2 * self.entries.len() + 64 {
            let entries = &self.entries;
            self.order.retain(|(t, id)| entries.get(id).is_some_and(|e| e.last_use == *t));
        }
    }

    /// The send-ahead index of the encoders working on this store ([`Hints`]), turned on at
    /// the first call: then built from the chunks held (their prefixes; which chunk follows
    /// which is learnt as they are sent again).
    pub fn hints_mut(&mut self) -> &mut Hints {
        let limit = 4 * self.entries.len() + 2048;
        let entries = &self.entries;
        let hints = self.hints.get_or_insert_with(|| {
            let mut h = Hints::default();
            for (&id, e) in entries {
                h.record(None, id, &e.chunk.bytes);
            }
            Box::new(h)
        });
        // Evictions drop their own entries; successors naming an evicted chunk linger.
        if hints.len() > limit {
            hints.prune(|id| entries.contains_key(&id));
        }
        hints
    }

    /// The send-ahead index, if an encoder turned it on.
    pub fn hints(&self) -> Option<&Hints> {
        self.hints.as_deref()
    }

    fn fold(&mut self, op: u8, id: ChunkId) {
        let mut b = [0u8; 17];
        b[0] = op;
        b[1..].copy_from_slice(&id.to_bytes());
        self.digest = xxh3_64_with_seed(&b, self.digest);
    }

    /// Writes the store to `path` (atomically: a temporary file, then rename).
    ///
    /// Format v1, big-endian: "LBDS", version u16, reserved u16, epoch u32, budget u64,
    /// digest u64, count u64, then `count` x (id 16 B, len u32, bytes) from least to most
    /// recently used, then xxh3-64 of everything before it.
    pub fn save(&self, path: impl AsRef<Path>) -> io::Result<()> {
        let path = path.as_ref();
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(".tmp");
        let file = fs::File::create(&tmp)?;
        let mut w = HashingWriter { inner: BufWriter::with_capacity(1 << 20, file), hash: Xxh3::new() };
        let mut head = Vec::with_capacity(FILE_HEADER_LEN);
        head.extend_from_slice(&FILE_MAGIC);
        head.extend_from_slice(&FILE_VERSION.to_be_bytes());
        head.extend_from_slice(&0u16.to_be_bytes());
        head.extend_from_slice(&self.epoch.to_be_bytes());
        head.extend_from_slice(&self.budget.to_be_bytes());
        head.extend_from_slice(&self.digest.to_be_bytes());
        head.extend_from_slice(&(self.entries.len() as u64).to_be_bytes());
        w.write_all(&head)?;
        for id in self.lru_ids() {
            let bytes = &self.entries[&id].chunk.bytes;
            w.write_all(&id.to_bytes())?;
            w.write_all(&(bytes.len() as u32).to_be_bytes())?;
            w.write_all(bytes)?;
        }
        let sum = w.hash.digest();
        let mut inner = w.inner;
        inner.write_all(&sum.to_be_bytes())?;
        let file = inner.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        drop(file);
        fs::rename(&tmp, path)
    }

    /// Reads a store written by [`Store::save`], verifying its version, checksum and every
    /// chunk's identity; the LRU order, epoch and digest come back as they were.
    pub fn load(path: impl AsRef<Path>) -> Result<Self, StoreFileError> {
        let data = fs::read(path)?;
        if data.len() < FILE_HEADER_LEN + 8 || data[0..4] != FILE_MAGIC {
            return Err(StoreFileError::BadMagic);
        }
        let version = u16::from_be_bytes([data[4], data[5]]);
        if version != FILE_VERSION {
            return Err(StoreFileError::UnsupportedVersion(version));
        }
        let (body, sum) = data.split_at(data.len() - 8);
        if xxhash_rust::xxh3::xxh3_64(body) != u64::from_be_bytes(sum.try_into().expect("8 bytes")) {
            return Err(StoreFileError::Checksum);
        }
        let be32 = |at: usize| u32::from_be_bytes(body[at..at + 4].try_into().expect("4 bytes"));
        let be64 = |at: usize| u64::from_be_bytes(body[at..at + 8].try_into().expect("8 bytes"));
        let epoch = be32(8);
        let budget = be64(12);
        let digest = be64(20);
        let count = be64(28);
        let mut store = Self::with_epoch(budget, epoch);
        let mut at = FILE_HEADER_LEN;
        for _ in 0..count {
            if body.len() < at + 20 {
                return Err(StoreFileError::Corrupt("truncated entry"));
            }
            let id = ChunkId::from_bytes(body[at..at + 16].try_into().expect("16 bytes"));
            let len = be32(at + 16) as usize;
            at += 20;
            if body.len() < at + len {
                return Err(StoreFileError::Corrupt("truncated chunk"));
            }
            let bytes = &body[at..at + len];
            at += len;
            if ChunkId::of(bytes) != id || store.contains(id) || !store.fits(len) {
                return Err(StoreFileError::Corrupt("chunk does not match its id"));
            }
            let cost = len as u64 + ENTRY_OVERHEAD;
            if store.used + cost > budget {
                return Err(StoreFileError::Corrupt("chunks exceed the budget"));
            }
            store.clock += 1;
            store.used += cost;
            let chunk = StoredChunk { bytes: Arc::from(bytes), check: chunk_check(bytes) };
            store.entries.insert(id, Entry { chunk, last_use: store.clock });
            store.order.push_back((store.clock, id));
        }
        if at != body.len() {
            return Err(StoreFileError::Corrupt("trailing bytes"));
        }
        store.digest = digest;
        Ok(store)
    }
}

/// Two stores are equal when a peer could not tell them apart: same epoch, budget, digest and
/// the same chunks in the same eviction order (logical clocks and counters are not compared).
impl PartialEq for Store {
    fn eq(&self, other: &Self) -> bool {
        self.epoch == other.epoch
            && self.budget == other.budget
            && self.used == other.used
            && self.digest == other.digest
            && self.entries.len() == other.entries.len()
            && self
                .lru_ids()
                .zip(other.lru_ids())
                .all(|(a, b)| a == b && self.entries[&a].chunk.bytes[..] == other.entries[&b].chunk.bytes[..])
    }
}

impl Eq for Store {}

fn initial_digest(epoch: u32) -> u64 {
    xxh3_64_with_seed(&epoch.to_be_bytes(), DIGEST_SEED)
}

struct HashingWriter<W: Write> {
    inner: W,
    hash: Xxh3,
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hash.update(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Why [`Store::load`] refused a file.
#[derive(Debug, thiserror::Error)]
pub enum StoreFileError {
    /// The file could not be read.
    #[error("reading the dictionary file: {0}")]
    Io(#[from] io::Error),
    /// Not a dictionary file.
    #[error("not a dictionary file (bad magic or too short)")]
    BadMagic,
    /// Written by a format version this build does not read.
    #[error("unsupported dictionary file version {0}")]
    UnsupportedVersion(u16),
    /// The trailing checksum does not match.
    #[error("dictionary file checksum mismatch")]
    Checksum,
    /// The checksum matched but the content is inconsistent.
    #[error("dictionary file is corrupt: {0}")]
    Corrupt(&'static str),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(tag: u32, len: usize) -> (ChunkId, Arc<[u8]>) {
        let bytes: Vec<u8> = (0..len).map(|i| (i as u32).wrapping_mul(2654435761).wrapping_add(tag) as u8).collect();
        (ChunkId::of(&bytes), Arc::from(bytes))
    }

    #[test]
    fn evicts_least_recently_used_within_budget() {
        let mut s = Store::new(3 * (1000 + ENTRY_OVERHEAD));
        let (a, b, c, d) = (chunk(1, 1000), chunk(2, 1000), chunk(3, 1000), chunk(4, 1000));
        s.define(a.0, a.1.clone()).unwrap();
        s.define(b.0, b.1).unwrap();
        s.define(c.0, c.1).unwrap();
        assert!(s.touch(a.0));
        s.define(d.0, d.1).unwrap();
        assert!(!s.contains(b.0), "b was least recently used");
        assert_eq!(s.lru_ids().collect::<Vec<_>>(), vec![c.0, a.0, d.0]);
        assert!(s.used() <= s.budget());
        assert_eq!(s.stats().evictions, 1);
        assert_eq!(s.get(a.0).unwrap().bytes()[..], a.1[..]);
    }

    #[test]
    fn a_chunk_larger_than_the_budget_is_refused_without_change() {
        let mut s = Store::new(1000);
        let digest = s.digest();
        let a = chunk(1, 2000);
        assert_eq!(s.define(a.0, a.1), None);
        assert_eq!(s.digest(), digest);
        assert!(s.is_empty());
    }

    #[test]
    fn same_operations_same_store_and_digest() {
        let mut x = Store::new(20_000);
        let mut y = Store::new(20_000);
        let chunks: Vec<_> = (0..40).map(|i| chunk(i, 500 + (i as usize * 37) % 3000)).collect();
        for i in 0..2000usize {
            let (id, bytes) = &chunks[(i * 7919) % chunks.len()];
            for s in [&mut x, &mut y] {
                if !s.touch(*id) {
                    s.define(*id, bytes.clone());
                }
            }
            assert!(x.used() <= x.budget());
        }
        assert_eq!(x, y);
        assert!(x.order.len() <= 2 * x.len() + 65, "order queue stays compact");
        let mut z = y.clone();
        let oldest = z.lru_ids().next().unwrap();
        z.touch(oldest);
        assert_ne!(x, z);
        x.reset(9);
        assert_eq!(x, Store::with_epoch(20_000, 9));
    }

    #[test]
    fn save_and_load_round_trip() {
        let dir = std::env::temp_dir().join(format!("lb-store-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("pair.dict");
        let mut s = Store::with_epoch(50_000, 3);
        for i in 0..30 {
            let (id, bytes) = chunk(i, 100 + i as usize * 50);
            s.define(id, bytes);
            if i % 3 == 0 {
                let first = s.lru_ids().next().unwrap();
                s.touch(first);
            }
        }
        s.save(&path).unwrap();
        let mut loaded = Store::load(&path).unwrap();
        assert_eq!(loaded, s);
        // The loaded copy keeps evicting exactly like the original.
        let (id, bytes) = chunk(99, 4000);
        s.define(id, bytes.clone());
        loaded.define(id, bytes);
        assert_eq!(loaded, s);

        let mut raw = fs::read(&path).unwrap();
        let mid = raw.len() / 2;
        raw[mid] ^= 1;
        fs::write(&path, &raw).unwrap();
        assert!(matches!(Store::load(&path), Err(StoreFileError::Checksum)));
        raw[4] = 9;
        fs::write(&path, &raw).unwrap();
        assert!(matches!(Store::load(&path), Err(StoreFileError::UnsupportedVersion(_))));
        fs::write(&path, b"nope").unwrap();
        assert!(matches!(Store::load(&path), Err(StoreFileError::BadMagic)));
        fs::remove_dir_all(&dir).unwrap();
    }
}
