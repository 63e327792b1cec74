//! Dictionary affinity: the redundancy-elimination codec between chained proxies and the
//! affinity engine that keeps a downstream proxy on the upstream that shares its dictionary
//! (paper section 1.2).
//!
//! The codec half:
//! - [`chunk`]: content-defined chunking (FastCDC 2020, 2/8/32 KiB) and xxh3-128 chunk ids;
//! - [`store`]: the per-pair dictionary, byte-budgeted and LRU-evicted in lockstep on both
//!   proxies, with an epoch, an operation digest and optional persistence;
//! - [`codec`]: the versioned token stream (LITERAL, DEFINE, REFERENCE, REPAIR, RESET,
//!   CHECKPOINT, NACK, ABORT), a streaming [`Encoder`] and [`Decoder`], and NACK-driven
//!   recovery. The wire format is in `docs/codec.md`.
//!
//! The affinity half is [`affinity`].
//!
//! A pair's dictionary is one [`Store`] on each side, owned by one encoder (downstream) and one
//! decoder (upstream) at a time: the stores stay identical only if both see the same token
//! stream, so connections of a pair either share one multiplexed stream or use their own store.

pub mod affinity;
pub mod chunk;
pub mod codec;
pub mod sample;
pub mod store;

pub use chunk::{ChunkId, Chunker, ChunkerConfig};
pub use codec::{DecodeError, Decoder, DecoderConfig, Encoder, EncoderConfig, Event, Nack, NackKind};
pub use store::Store;
