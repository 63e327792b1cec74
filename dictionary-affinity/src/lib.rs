//! Dictionary affinity: the redundancy-elimination codec between chained proxies and the
//! affinity engine that keeps a downstream proxy on the upstream that shares its dictionary
//! (paper section 1.2).
//!
//! The codec half:
//! - [`chunk`]: content-defined chunking (FastCDC 2020, 2/8/32 KiB) and xxh3-128 chunk ids;
//! - [`store`]: the per-pair dictionary, byte-budgeted and LRU-evicted in lockstep on both
//!   proxies, with an epoch, an operation digest and optional persistence;
//! - [`hints`]: where a soft flush finds the stored chunk its carried bytes begin, kept with
//!   the store so that every connection of the pair uses it;
//! - [`codec`]: the versioned token stream (LITERAL, DEFINE, REFERENCE, REPAIR, RESET,
//!   CHECKPOINT, NACK, ABORT), a streaming [`Encoder`] and [`Decoder`], and NACK-driven
//!   recovery. The wire format is in `docs/codec.md`.
//!
//! The affinity half is [`affinity`].
//!
//! A pair's dictionary is one [`Store`] on each side and direction. Either one encoder and one
//! decoder own it at a time, and the two copies stay identical in lockstep; or it is a
//! [`SharedStore`] used by all of the pair's concurrent connections at once, and references
//! are resolved by content, with a bounded wait for chunks still in flight on another
//! connection and a REPAIR for those that are gone ([`shared`]; docs/codec.md section 3.2).

pub mod affinity;
pub mod chunk;
pub mod codec;
pub mod hints;
pub mod sample;
pub mod shared;
pub mod store;

pub use chunk::{ChunkId, Chunker, ChunkerConfig};
pub use codec::{DecodeError, Decoder, DecoderConfig, Encoder, EncoderConfig, Event, Nack, NackKind};
pub use shared::SharedStore;
pub use store::Store;
