//! Content-defined chunking (FastCDC 2020) and chunk identities (xxh3-128).
//!
//! Cut points depend only on the bytes from the start of the chunk, never on how the stream was
//! split into reads: the encoder only cuts once it holds `max` bytes past the previous cut (or
//! when told to flush), so the same content always yields the same chunks and therefore the
//! same dictionary identities on both proxies of a chain (paper section 1.2).

use std::fmt;

use fastcdc::v2020::{self, MASKS};
use serde::{Deserialize, Serialize};
use xxhash_rust::xxh3::xxh3_128;

/// The largest chunk (and literal piece) the codec carries; bounds every frame on the wire.
pub const MAX_CHUNK: usize = 256 * 1024;

/// Chunk size limits for content-defined chunking, in bytes.
///
/// The default is min 2 KiB, average 8 KiB, max 32 KiB: 8 KiB chunks keep a reference
/// (28 bytes on the wire) under 0.4% of the bytes it stands for, while still finding repeats
/// inside typical web objects; the 2 KiB floor skips a quarter of the rolling-hash work and the
/// 32 KiB ceiling bounds the encoder's carry buffer and what waits for a cut before `flush`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkerConfig {
    /// No cut before this many bytes (at least 64).
    pub min: u32,
    /// Target average chunk size; a power of two between 256 B and 64 KiB.
    pub avg: u32,
    /// A cut is forced here (at most [`MAX_CHUNK`]).
    pub max: u32,
}

impl Default for ChunkerConfig {
    fn default() -> Self {
        Self { min: 2 * 1024, avg: 8 * 1024, max: 32 * 1024 }
    }
}

/// Why a [`ChunkerConfig`] was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("chunker sizes must satisfy 64 <= min < avg < max <= {MAX_CHUNK}, 1024 <= max, avg a power of two in 256..=65536 (got {min}/{avg}/{max})")]
pub struct ChunkerConfigError {
    /// The refused minimum.
    pub min: u32,
    /// The refused average.
    pub avg: u32,
    /// The refused maximum.
    pub max: u32,
}

/// A FastCDC 2020 chunker (normalization level 1, the crate's standard gear table).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Chunker {
    config: ChunkerConfig,
    mask_s: u64,
    mask_l: u64,
}

impl Chunker {
    /// A chunker for these sizes, or why they are unusable.
    pub fn new(config: ChunkerConfig) -> Result<Self, ChunkerConfigError> {
        let ChunkerConfig { min, avg, max } = config;
        let ok = (64..avg).contains(&min)
            && avg.is_power_of_two()
            && (256..=65_536).contains(&avg)
            && avg < max
            && (1024..=MAX_CHUNK as u32).contains(&max);
        if !ok {
            return Err(ChunkerConfigError { min, avg, max });
        }
        let bits = avg.trailing_zeros() as usize;
        // Normalization level 1: a harder mask before the average, an easier one after it.
        Ok(Self { config, mask_s: MASKS[bits + 1], mask_l: MASKS[bits - 1] })
    }

    /// The sizes this chunker cuts with.
    pub fn config(&self) -> ChunkerConfig {
        self.config
    }

    /// The largest chunk this chunker produces.
    pub fn max(&self) -> usize {
        self.config.max as usize
    }

    /// Length of the first chunk of `data`; final only if `data` holds at least `max` bytes or
    /// `data` ends where the stream ends.
    #[inline]
    pub fn cut(&self, data: &[u8]) -> usize {
        let data = &data[..data.len().min(self.max())];
        let (_, n) = v2020::cut(
            data,
            self.config.min as usize,
            self.config.avg as usize,
            self.config.max as usize,
            self.mask_s,
            self.mask_l,
            self.mask_s << 1,
            self.mask_l << 1,
        );
        n
    }

    /// The chunks of `data`, taken as a whole stream.
    pub fn chunks<'a>(&self, data: &'a [u8]) -> Chunks<'a> {
        Chunks { chunker: *self, rest: data }
    }
}

impl Default for Chunker {
    fn default() -> Self {
        Self::new(ChunkerConfig::default()).expect("the default sizes are valid")
    }
}

/// Iterator over the chunks of one buffer, from [`Chunker::chunks`].
#[derive(Debug, Clone)]
pub struct Chunks<'a> {
    chunker: Chunker,
    rest: &'a [u8],
}

impl<'a> Iterator for Chunks<'a> {
    type Item = &'a [u8];

    fn next(&mut self) -> Option<&'a [u8]> {
        if self.rest.is_empty() {
            return None;
        }
        let n = self.chunker.cut(self.rest);
        let (chunk, rest) = self.rest.split_at(n);
        self.rest = rest;
        Some(chunk)
    }
}

/// The identity of a chunk: the xxh3-128 of its bytes (the codec still compares bytes on a hit).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ChunkId(pub u128);

impl ChunkId {
    /// Bytes an identity takes on the wire and on disk.
    pub const LEN: usize = 16;

    /// The identity of `bytes`.
    #[inline]
    pub fn of(bytes: &[u8]) -> Self {
        Self(xxh3_128(bytes))
    }

    /// Big-endian wire form.
    pub fn to_bytes(self) -> [u8; 16] {
        self.0.to_be_bytes()
    }

    /// From the big-endian wire form.
    pub fn from_bytes(b: [u8; 16]) -> Self {
        Self(u128::from_be_bytes(b))
    }
}

impl fmt::Debug for ChunkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ChunkId({:032x})", self.0)
    }
}

impl fmt::Display for ChunkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn noise(n: usize, seed: u64) -> Vec<u8> {
        let mut x = seed | 1;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    #[test]
    fn sizes_stay_within_limits() {
        let c = Chunker::default();
        let data = noise(1 << 20, 7);
        let chunks: Vec<_> = c.chunks(&data).collect();
        assert_eq!(chunks.iter().map(|c| c.len()).sum::<usize>(), data.len());
        for ch in &chunks[..chunks.len() - 1] {
            assert!((2048..=32 * 1024).contains(&ch.len()), "{}", ch.len());
        }
        let avg = data.len() / chunks.len();
        assert!((6 * 1024..=14 * 1024).contains(&avg), "average {avg}");
    }

    #[test]
    fn all_zero_data_is_cut_at_max() {
        let c = Chunker::default();
        let data = vec![0u8; 100_000];
        let lens: Vec<_> = c.chunks(&data).map(<[u8]>::len).collect();
        assert_eq!(lens, vec![32768, 32768, 32768, 1696]);
    }

    #[test]
    fn cuts_resynchronise_after_an_insertion() {
        let c = Chunker::default();
        let data = noise(512 * 1024, 3);
        let mut shifted = b"a few inserted bytes".to_vec();
        shifted.extend_from_slice(&data);
        let a: std::collections::HashSet<_> = c.chunks(&data).map(ChunkId::of).collect();
        let b: Vec<_> = c.chunks(&shifted).map(ChunkId::of).collect();
        let shared = b.iter().filter(|id| a.contains(id)).count();
        assert!(shared + 2 >= b.len(), "{shared} of {}", b.len());
    }

    #[test]
    fn bad_configs_are_refused() {
        for (min, avg, max) in [(32, 8192, 32768), (4096, 3000, 32768), (2048, 8192, 8192), (2048, 8192, 1 << 20)] {
            assert!(Chunker::new(ChunkerConfig { min, avg, max }).is_err(), "{min}/{avg}/{max}");
        }
        assert!(Chunker::new(ChunkerConfig { min: 64, avg: 256, max: 1024 }).is_ok());
    }

    #[test]
    fn id_wire_form_round_trips() {
        let id = ChunkId::of(b"hello");
        assert_eq!(ChunkId::from_bytes(id.to_bytes()), id);
        assert_ne!(ChunkId::of(b"hello"), ChunkId::of(b"hellp"));
    }
}
