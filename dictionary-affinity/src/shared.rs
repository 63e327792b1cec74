//! One pair's dictionary shared by all of that pair's concurrent connections (docs/codec.md,
//! section 3.2).
//!
//! A [`SharedStore`] is a [`Store`] behind a lock, handed to any number of encoders
//! ([`crate::Encoder::shared`]) or decoders ([`crate::Decoder::shared`]) at once. The two sides
//! no longer apply the same operations in the same order (connections interleave differently
//! at each end), so the lockstep of section 3 gives way to *content addressing*: a REFERENCE
//! names a chunk by its xxh3-128 id, its length and a 32-bit check, and a decoder outputs it
//! only if it holds exactly that chunk. When it does not:
//!
//! - the chunk may be defined on another connection whose DEFINE is still on its way: the
//!   decoder waits for it, up to a bound its driver sets ([`crate::Decoder::waiting_for`],
//!   [`crate::Decoder::fetch`]);
//! - it may have been evicted here and not at the encoder: the store's eviction log says so
//!   ([`Store::recently_evicted`]), and the decoder NACKs at once;
//! - after the bound, or at once for an evicted chunk, the NACK is answered by a REPAIR, which
//!   the decoder outputs *and* stores again, so the pair's next references hit.
//!
//! Nothing resets the dictionary: a disagreement costs one chunk, never the whole store.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::store::Store;

/// Ids a shared decoder's store remembers having evicted (16 B each plus the set's slot).
pub const EVICTION_LOG: usize = 1 << 16;

#[derive(Debug)]
struct Inner {
    store: Mutex<Store>,
    /// Bumped by every chunk a decoder adds: a waiting decoder's driver retries on a change.
    generation: AtomicU64,
}

/// A pair's dictionary for one direction, shared by every connection of the pair (cheap to
/// clone: clones share the store).
#[derive(Debug, Clone)]
pub struct SharedStore {
    inner: Arc<Inner>,
}

impl SharedStore {
    /// Shares `store` (loaded from disk, or new), with its eviction log on.
    pub fn new(mut store: Store) -> Self {
        store.log_evictions(EVICTION_LOG);
        Self { inner: Arc::new(Inner { store: Mutex::new(store), generation: AtomicU64::new(0) }) }
    }

    /// The store, locked. Hold it briefly: every connection of the pair waits on it.
    pub fn lock(&self) -> MutexGuard<'_, Store> {
        self.inner.store.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A copy of the store as it is now (to save it, or to inspect it).
    pub fn snapshot(&self) -> Store {
        self.lock().clone()
    }

    /// Changes whenever a decoder adds a chunk.
    pub fn generation(&self) -> u64 {
        self.inner.generation.load(Ordering::Acquire)
    }

    pub(crate) fn bump(&self) {
        self.inner.generation.fetch_add(1, Ordering::Release);
    }

    /// Whether both handles share one store.
    pub fn same(&self, other: &SharedStore) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
    }
}

/// The dictionary a codec half works on: its own (one stream at a time, in lockstep) or a
/// pair's shared one.
#[derive(Debug)]
pub(crate) enum Dict {
    Own(Store),
    Shared(SharedStore),
}

impl Dict {
    pub(crate) fn lock(&mut self) -> DictGuard<'_> {
        match self {
            Dict::Own(s) => DictGuard::Own(s),
            Dict::Shared(s) => DictGuard::Shared(s.lock()),
        }
    }

    pub(crate) fn view(&self) -> StoreRef<'_> {
        match self {
            Dict::Own(s) => StoreRef::Own(s),
            Dict::Shared(s) => StoreRef::Shared(s.lock()),
        }
    }

    pub(crate) fn is_shared(&self) -> bool {
        matches!(self, Dict::Shared(_))
    }

    pub(crate) fn into_store(self) -> Store {
        match self {
            Dict::Own(s) => s,
            Dict::Shared(s) => s.snapshot(),
        }
    }

    pub(crate) fn bump(&self) {
        if let Dict::Shared(s) = self {
            s.bump();
        }
    }
}

/// Mutable access to a codec half's dictionary (a lock guard when shared).
pub(crate) enum DictGuard<'a> {
    Own(&'a mut Store),
    Shared(MutexGuard<'a, Store>),
}

impl std::ops::Deref for DictGuard<'_> {
    type Target = Store;
    fn deref(&self) -> &Store {
        match self {
            DictGuard::Own(s) => s,
            DictGuard::Shared(g) => g,
        }
    }
}

impl std::ops::DerefMut for DictGuard<'_> {
    fn deref_mut(&mut self) -> &mut Store {
        match self {
            DictGuard::Own(s) => s,
            DictGuard::Shared(g) => g,
        }
    }
}

/// A look at a codec half's dictionary ([`crate::Encoder::store`], [`crate::Decoder::store`]):
/// a reference, or a lock guard when the dictionary is shared (drop it soon).
pub enum StoreRef<'a> {
    /// The codec half's own store.
    Own(&'a Store),
    /// A shared store, locked.
    Shared(MutexGuard<'a, Store>),
}

impl std::ops::Deref for StoreRef<'_> {
    type Target = Store;
    fn deref(&self) -> &Store {
        match self {
            StoreRef::Own(s) => s,
            StoreRef::Shared(g) => g,
        }
    }
}

impl PartialEq for StoreRef<'_> {
    fn eq(&self, other: &Self) -> bool {
        **self == **other
    }
}

impl std::fmt::Debug for StoreRef<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        (**self).fmt(f)
    }
}
