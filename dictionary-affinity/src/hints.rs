//! Where a soft flush looks for the stored chunk its carried bytes begin (docs/codec.md,
//! section 4.1): an index kept *with the store*, not with one encoder.
//!
//! A CARRY_REF names the stored chunk whose first bytes equal the carry. The encoder finds
//! candidates two ways: the chunk that followed the previous chunk last time (`successor`),
//! and the last stored chunk that began with the same [`PREFIX_KEY`] bytes (`by_prefix`). When
//! this index lived in the encoder, every new connection started with it empty: on a pair's
//! shared dictionaries (or its own, handed from one connection to the next), a repeat on a
//! new connection found no candidate and sent each soft flush's carry as raw CARRY bytes.
//! Kept in the [`crate::Store`], it serves every connection of the pair, follows evictions and
//! resets, and is rebuilt (prefixes only) from a store loaded from disk.
//!
//! Entries are hints: a stale one is checked against the store before use and costs nothing
//! but a missed CARRY_REF. Not part of the dictionary's content: never saved or compared.

use std::collections::HashMap;
use std::hash::BuildHasherDefault;

use crate::chunk::ChunkId;
use crate::store::IdHasher;

/// Bytes of a chunk's beginning that key the prefix index (shorter carries use successors).
pub const PREFIX_KEY: usize = 32;

/// The prefix index's key of `bytes` (at least [`PREFIX_KEY`] long).
pub fn prefix_key(bytes: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(&bytes[..PREFIX_KEY])
}

/// Send-ahead candidates for an encoder's soft flushes (see the module doc).
#[derive(Debug, Clone, Default)]
pub struct Hints {
    /// Hash of a stored chunk's first [`PREFIX_KEY`] bytes -> its id.
    prefixes: HashMap<u64, ChunkId>,
    /// The chunk that followed each stored chunk last time it was sent.
    successors: HashMap<ChunkId, ChunkId, BuildHasherDefault<IdHasher>>,
}

impl Hints {
    /// Records that `id` (with these bytes) was sent, right after `prev` if given.
    pub fn record(&mut self, prev: Option<ChunkId>, id: ChunkId, bytes: &[u8]) {
        if let Some(prev) = prev {
            self.successors.insert(prev, id);
        }
        if bytes.len() >= PREFIX_KEY {
            self.prefixes.insert(prefix_key(bytes), id);
        }
    }

    /// The chunk that followed `prev` last time.
    pub fn successor(&self, prev: ChunkId) -> Option<ChunkId> {
        self.successors.get(&prev).copied()
    }

    /// The last chunk recorded that began with `carry`'s first [`PREFIX_KEY`] bytes.
    pub fn by_prefix(&self, carry: &[u8]) -> Option<ChunkId> {
        (carry.len() >= PREFIX_KEY).then(|| self.prefixes.get(&prefix_key(carry)).copied()).flatten()
    }

    /// `id` (with these bytes) left the store.
    pub(crate) fn forget(&mut self, id: ChunkId, bytes: &[u8]) {
        self.successors.remove(&id);
        if bytes.len() >= PREFIX_KEY {
            let key = prefix_key(bytes);
            if self.prefixes.get(&key) == Some(&id) {
                self.prefixes.remove(&key);
            }
        }
    }

    /// Entries held (both maps).
    pub fn len(&self) -> usize {
        self.prefixes.len() + self.successors.len()
    }

    /// Whether nothing is recorded.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Drops the successor entries that name a chunk no longer held (`held` says which are).
    pub(crate) fn prune(&mut self, held: impl Fn(ChunkId) -> bool) {
        self.prefixes.retain(|_, id| held(*id));
        self.successors.retain(|_, id| held(*id));
    }
}
