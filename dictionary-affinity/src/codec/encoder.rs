//! The encoder: chunks the byte stream, replaces chunks both dictionaries hold with REFERENCE
//! tokens and adds new ones with DEFINE, and answers the decoder's NACKs.

use std::collections::VecDeque;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::{
    varint3, write_frame, Nack, NackKind, StreamHeader, TokenType, COMPRESSED, FLAG_SHARED, FLAG_ZSTD, MIN_VERSION,
    VERSION,
};
use crate::chunk::{ChunkId, Chunker, ChunkerConfig, ChunkerConfigError, MAX_CHUNK};
use crate::shared::{Dict, SharedStore, StoreRef};
use crate::store::Store;

/// ABORT reason: a NACKed chunk was no longer held by the encoder.
pub const ABORT_REPAIR_UNAVAILABLE: u8 = 1;

/// Bytes at the start of a chunk that key the encoder's prefix index (which stored chunk a
/// soft-flushed carry may be the beginning of).
/// A CARRY_REF costs about 30 bytes: shorter runs go as CARRY bytes.
const MIN_CARRY_REF: usize = 32;

/// How an [`Encoder`] chunks and what it sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct EncoderConfig {
    /// Content-defined chunk sizes.
    pub chunker: ChunkerConfig,
    /// Compress LITERAL / DEFINE / REPAIR bodies with zstd level 1 when that makes them smaller.
    pub zstd: bool,
    /// Bytes of recently referenced chunks kept (shared with the store while held there) so a
    /// NACK can still be answered with REPAIR after an eviction or reset.
    pub repair_window: usize,
    /// Chunks shorter than this (only the tail of a `flush`) go as LITERAL, not into the store.
    pub min_define: usize,
    /// Framing version written (default [`VERSION`]; clamped to [`MIN_VERSION`]..=`VERSION`):
    /// the highest the peer's decoder accepts, as its chain HELLO said. Version 1 has no
    /// carried tokens, so there [`Encoder::flush_soft`] is a [`Encoder::flush`].
    pub version: u8,
}

impl Default for EncoderConfig {
    fn default() -> Self {
        Self {
            chunker: ChunkerConfig::default(),
            zstd: false,
            repair_window: 32 << 20,
            min_define: 64,
            version: VERSION,
        }
    }
}

/// Counters of one encoder.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct EncoderStats {
    /// Bytes given to `encode`.
    pub input_bytes: u64,
    /// Bytes written to the token stream (header and every token included).
    pub output_bytes: u64,
    /// Input bytes sent as LITERAL.
    pub literal_bytes: u64,
    /// Input bytes sent as DEFINE.
    pub defined_bytes: u64,
    /// Input bytes replaced by REFERENCE.
    pub referenced_bytes: u64,
    /// DEFINE tokens.
    pub defines: u64,
    /// REFERENCE tokens.
    pub references: u64,
    /// Chunks whose id was held with different bytes (hash collisions; sent as LITERAL).
    pub collisions: u64,
    /// NACKs handled.
    pub nacks: u64,
    /// REPAIR tokens sent.
    pub repairs: u64,
    /// Epoch resets started by this encoder.
    pub resets: u64,
    /// Input bytes sent ahead of their chunk by [`Encoder::flush_soft`] (CARRY and CARRY_REF;
    /// counted again in `defined_bytes` / `referenced_bytes` when their chunk completes).
    pub carried_bytes: u64,
    /// Of `carried_bytes`, those sent as raw CARRY bytes (the rest named a stored chunk).
    pub carried_raw_bytes: u64,
    /// Soft flushes that sent something.
    pub soft_flushes: u64,
}

impl EncoderStats {
    /// Fraction of the input bytes that did not cross the wire (negative when framing cost more).
    pub fn saved_fraction(&self) -> f64 {
        if self.input_bytes == 0 {
            return 0.0;
        }
        1.0 - self.output_bytes as f64 / self.input_bytes as f64
    }
}

/// Why [`Encoder::handle_nack`] could not repair.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RepairError {
    /// The chunk has left both the store and the repair window; ABORT was written and the
    /// connection must be closed.
    #[error("chunk {0} is no longer held: stream aborted")]
    Unavailable(ChunkId),
}

/// How far [`Encoder::emit_chunks`] cuts the carry.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Cuts {
    /// While a whole chunker window is held (a cut there cannot depend on bytes to come).
    WholeWindows,
    /// Every cut that more input could not move (a soft flush).
    Final,
    /// Everything, the tail as a chunk of its own (a hard end).
    All,
}

/// The encoding half of a proxy chain: owns the pair's [`Store`] while the stream lasts, or
/// shares it with the pair's other connections ([`Encoder::shared`]).
pub struct Encoder {
    dict: Dict,
    chunker: Chunker,
    config: EncoderConfig,
    started: bool,
    /// The last check written: frames are chained on it.
    chain: u32,
    /// Input not yet cut into chunks (less than `max` bytes after each call).
    carry: Vec<u8>,
    /// The first `sent` bytes of `carry` were already sent ahead (CARRY / CARRY_REF): the
    /// decoder holds them as its carry, the beginning of the chunk that starts `carry`.
    sent: usize,
    /// Carried bytes whose chunk went as literal: the next LITERAL_CARRIED drops them.
    release: usize,
    /// The stored chunk the carry was last named after (CARRY_REF), if any.
    carry_src: Option<ChunkId>,
    /// The last chunk sent as DEFINE or REFERENCE, if the next one follows it directly.
    last_chunk: Option<ChunkId>,
    /// Bytes waiting to go out as one LITERAL.
    literal: Vec<u8>,
    /// Recently referenced chunks, oldest first, for REPAIR.
    recent: VecDeque<(ChunkId, Arc<[u8]>)>,
    recent_bytes: usize,
    /// The store changed since the last CHECKPOINT.
    dirty: bool,
    zstd: Option<zstd::bulk::Compressor<'static>>,
    zbuf: Vec<u8>,
    stats: EncoderStats,
}

impl std::fmt::Debug for Encoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Encoder")
            .field("config", &self.config)
            .field("shared", &self.dict.is_shared())
            .field("carry", &self.carry.len())
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

impl Encoder {
    /// An encoder that starts a new stream over `store` (the pair's dictionary).
    pub fn new(store: Store, config: EncoderConfig) -> Result<Self, ChunkerConfigError> {
        Self::with_dict(Dict::Own(store), config)
    }

    /// An encoder that starts a new stream over a pair's dictionary shared with the pair's
    /// other connections (section 3.2 of docs/codec.md): no lockstep, so no CHECKPOINT, and a
    /// NACK is answered by a REPAIR alone, never by a RESET of the whole dictionary.
    pub fn shared(store: SharedStore, config: EncoderConfig) -> Result<Self, ChunkerConfigError> {
        Self::with_dict(Dict::Shared(store), config)
    }

    fn with_dict(dict: Dict, config: EncoderConfig) -> Result<Self, ChunkerConfigError> {
        let chunker = Chunker::new(config.chunker)?;
        let zstd = config.zstd.then(|| zstd::bulk::Compressor::new(1).expect("zstd context"));
        Ok(Self {
            dict,
            chunker,
            config,
            started: false,
            chain: 0,
            carry: Vec::new(),
            sent: 0,
            release: 0,
            carry_src: None,
            last_chunk: None,
            literal: Vec::new(),
            recent: VecDeque::new(),
            recent_bytes: 0,
            dirty: false,
            zstd,
            zbuf: Vec::new(),
            stats: EncoderStats::default(),
        })
    }

    /// The dictionary (locked while the answer lives, when shared).
    pub fn store(&self) -> StoreRef<'_> {
        self.dict.view()
    }

    /// Ends the stream and hands back the dictionary (for the pair's next stream, or to save;
    /// a copy when shared). Call [`Encoder::flush`] first: bytes still in the carry are dropped.
    pub fn into_store(self) -> Store {
        self.dict.into_store()
    }

    /// The counters.
    pub fn stats(&self) -> EncoderStats {
        self.stats
    }

    /// Input bytes held until a chunk boundary (or `flush`), including those a
    /// [`Encoder::flush_soft`] already delivered.
    pub fn pending(&self) -> usize {
        self.carry.len()
    }

    /// Input bytes not delivered to the decoder yet (what a flush would send).
    pub fn undelivered(&self) -> usize {
        self.carry.len() - self.sent
    }

    /// Appends the tokens for `input` to `out`. Chunk boundaries depend only on content, so
    /// up to `max` chunk bytes stay in the carry until more input or [`Encoder::flush`].
    pub fn encode(&mut self, input: &[u8], out: &mut Vec<u8>) {
        let start = out.len();
        self.start(out);
        self.stats.input_bytes += input.len() as u64;
        self.carry.extend_from_slice(input);
        self.emit_chunks(Cuts::WholeWindows, out);
        self.flush_literal(out);
        self.stats.output_bytes += (out.len() - start) as u64;
    }

    /// Delivers everything held *without* moving chunk boundaries, for a pause in the input
    /// (the stream goes on later): the chunks already complete in the carry are sent, and the
    /// rest, the beginning of an unfinished chunk, is sent ahead as CARRY_REF (the same bytes
    /// as a stored chunk's beginning) and/or CARRY bytes. Both sides keep those as the start
    /// of the chunk, which completes later where the content says (DEFINE_CARRIED,
    /// REFERENCE_CARRIED or LITERAL_CARRIED), so a repeat of the same data still meets the
    /// same chunks wherever the pauses fell. Then a CHECKPOINT if the store changed.
    pub fn flush_soft(&mut self, out: &mut Vec<u8>) {
        if self.config.version < 2 {
            // Version 1 cannot send a chunk's beginning ahead: cut where the input paused.
            return self.flush(out);
        }
        let start = out.len();
        self.start(out);
        self.emit_chunks(Cuts::Final, out);
        self.flush_literal(out);
        if self.sent < self.carry.len() {
            self.send_ahead(out);
            self.stats.soft_flushes += 1;
        }
        self.checkpoint(out);
        self.stats.output_bytes += (out.len() - start) as u64;
    }

    /// Cuts and sends everything held as complete chunks (a hard end: the input ended, or the
    /// caller wants the next bytes chunked afresh), then a CHECKPOINT of the store digest if
    /// the store changed since the last one. Content after it is chunked from here on; for a
    /// mere pause, [`Encoder::flush_soft`] keeps the chunk boundaries where they were.
    pub fn flush(&mut self, out: &mut Vec<u8>) {
        let start = out.len();
        self.start(out);
        self.emit_chunks(Cuts::All, out);
        debug_assert!(self.carry.is_empty());
        debug_assert_eq!(self.sent, 0);
        self.sent = 0;
        self.carry_src = None;
        self.flush_literal(out);
        self.checkpoint(out);
        self.stats.output_bytes += (out.len() - start) as u64;
    }

    /// Cuts chunks off the front of the carry and sends them, as far as `cuts` allows.
    fn emit_chunks(&mut self, cuts: Cuts, out: &mut Vec<u8>) {
        let carry = std::mem::take(&mut self.carry);
        let max = self.chunker.max();
        let mut at = 0;
        loop {
            let rest = carry.len() - at;
            if rest == 0 || (cuts == Cuts::WholeWindows && rest < max) {
                break;
            }
            let n = self.chunker.cut(&carry[at..]);
            // A cut found before the end of the data is final (FastCDC decides a cut from the
            // bytes before it); one at the end of the data may still move.
            if cuts == Cuts::Final && n == rest && n < max {
                break;
            }
            self.emit_chunk(&carry[at..at + n], out);
            at += n;
        }
        self.carry = carry;
        self.carry.drain(..at);
    }

    fn checkpoint(&mut self, out: &mut Vec<u8>) {
        // A shared dictionary has no lockstep to check: its digest depends on every
        // connection's interleaving.
        if self.dirty && !self.dict.is_shared() {
            let digest = self.dict.view().digest();
            write_frame(out, &mut self.chain, TokenType::Checkpoint as u8, &[&digest.to_be_bytes()]);
            self.dirty = false;
        }
    }

    /// Sends `carry[sent..]` ahead: as much as matches a stored chunk at the same offsets as
    /// CARRY_REF, the rest as CARRY.
    fn send_ahead(&mut self, out: &mut Vec<u8>) {
        let end = self.carry.len();
        if self.carry_src.is_none() {
            // Candidates: the chunk that followed the previous one last time, and the last
            // chunk stored that began with the same bytes; the longer match wins.
            let mut best = (0, None);
            // Both kept with the store, for every connection on it (crate::hints).
            let mut store = self.dict.lock();
            let hints = store.hints_mut();
            let by_prefix = hints.by_prefix(&self.carry);
            let next = self.last_chunk.and_then(|prev| hints.successor(prev));
            for id in [next, by_prefix].into_iter().flatten() {
                if let Some(c) = store.get(id) {
                    let k = common_prefix(&c.bytes()[self.sent.min(c.bytes().len())..], &self.carry[self.sent..]);
                    if k > best.0 {
                        best = (k, Some(id));
                    }
                }
            }
            drop(store);
            self.carry_src = best.1;
        }
        if let Some(id) = self.carry_src {
            let held = self.dict.lock().get(id).map(|c| (c.bytes().clone(), c.check()));
            match held {
                Some((bytes, check)) if bytes.len() > self.sent => {
                    let k = common_prefix(&bytes[self.sent..], &self.carry[self.sent..]);
                    if k >= MIN_CARRY_REF {
                        let (len, n) = varint3(bytes.len());
                        let (count, m) = varint3(k);
                        write_frame(
                            out,
                            &mut self.chain,
                            TokenType::CarryRef as u8,
                            &[&id.to_bytes(), &len[..n], &check.to_be_bytes(), &count[..m]],
                        );
                        self.remember(id, bytes);
                        self.sent += k;
                        self.stats.carried_bytes += k as u64;
                    }
                }
                Some(_) => {}
                None => self.carry_src = None,
            }
        }
        if self.sent < end {
            let carry = std::mem::take(&mut self.carry);
            self.write_chunk(TokenType::Carry, &[], &carry[self.sent..], out);
            self.stats.carried_bytes += (end - self.sent) as u64;
            self.stats.carried_raw_bytes += (end - self.sent) as u64;
            self.carry = carry;
            self.sent = end;
        }
    }

    /// Answers a NACK from the decoder: REPAIR for a missing or mismatching chunk, then a RESET
    /// to a new epoch if the NACK concerns the current one (the dictionaries disagree, so both
    /// start again empty). Fails, after writing ABORT, if the chunk is no longer held.
    pub fn handle_nack(&mut self, nack: &Nack, out: &mut Vec<u8>) -> Result<(), RepairError> {
        let start = out.len();
        self.start(out);
        self.stats.nacks += 1;
        let result =
            match nack.kind {
                NackKind::Missing | NackKind::Mismatch => {
                    let held =
                        self.dict.lock().get(nack.id).map(|c| c.bytes().clone()).or_else(|| {
                            self.recent.iter().rev().find(|(id, _)| *id == nack.id).map(|(_, b)| b.clone())
                        });
                    match held {
                        Some(bytes) => {
                            self.write_chunk(TokenType::Repair, &nack.id.to_bytes(), &bytes, out);
                            self.stats.repairs += 1;
                            Ok(())
                        }
                        None => {
                            write_frame(out, &mut self.chain, TokenType::Abort as u8, &[&[ABORT_REPAIR_UNAVAILABLE]]);
                            Err(RepairError::Unavailable(nack.id))
                        }
                    }
                }
                NackKind::Desync => Ok(()),
            };
        // Own dictionaries in lockstep disagree: both start again empty. A shared one only
        // lacked that chunk, which the REPAIR puts back at the decoder.
        if result.is_ok() && !self.dict.is_shared() && nack.epoch == self.dict.view().epoch() {
            self.new_epoch(out);
        }
        self.stats.output_bytes += (out.len() - start) as u64;
        result
    }

    /// Carries a NACK produced by this side's decoder to the peer's encoder.
    pub fn send_nack(&mut self, nack: &Nack, out: &mut Vec<u8>) {
        let start = out.len();
        self.start(out);
        write_frame(out, &mut self.chain, TokenType::Nack as u8, &[&nack.to_bytes()]);
        self.stats.output_bytes += (out.len() - start) as u64;
    }

    /// Empties both dictionaries and starts a new epoch (RESET token).
    pub fn reset(&mut self, out: &mut Vec<u8>) {
        let start = out.len();
        self.start(out);
        self.new_epoch(out);
        self.stats.output_bytes += (out.len() - start) as u64;
    }

    fn new_epoch(&mut self, out: &mut Vec<u8>) {
        let mut store = self.dict.lock();
        let epoch = store.epoch().wrapping_add(1);
        store.reset(epoch);
        drop(store);
        self.last_chunk = None;
        write_frame(out, &mut self.chain, TokenType::Reset as u8, &[&epoch.to_be_bytes()]);
        self.dirty = false;
        self.stats.resets += 1;
    }

    fn start(&mut self, out: &mut Vec<u8>) {
        if !self.started {
            self.started = true;
            let mut flags = if self.zstd.is_some() { FLAG_ZSTD } else { 0 };
            if self.dict.is_shared() {
                flags |= FLAG_SHARED;
            }
            let store = self.dict.view();
            let header = StreamHeader {
                version: self.config.version.clamp(MIN_VERSION, VERSION),
                flags,
                epoch: store.epoch(),
                budget: store.budget(),
                digest: store.digest(),
            };
            drop(store);
            self.chain = header.emit(out);
        }
    }

    /// Bytes of a chunk that go as literal: the carried ones are only released.
    fn literal_chunk(&mut self, bytes: &[u8], carried: usize) {
        self.release += carried;
        self.literal.extend_from_slice(&bytes[carried..]);
    }

    fn emit_chunk(&mut self, bytes: &[u8], out: &mut Vec<u8>) {
        // The chunk starts the carry: its first `carried` bytes were sent ahead.
        let carried = self.sent.min(bytes.len());
        self.sent -= carried;
        self.carry_src = None;
        let prev = self.last_chunk.take();
        if bytes.len() < self.config.min_define {
            self.literal_chunk(bytes, carried);
            return;
        }
        let id = ChunkId::of(bytes);
        // One lock for the lookup and the store change: another connection of a shared pair
        // may define or evict in between otherwise.
        let mut store = self.dict.lock();
        enum Found {
            Held(Arc<[u8]>, u32),
            Collision,
            Defined,
            TooBig,
        }
        let found = match store.get(id) {
            // Compare the bytes, not just the hash: a collision must never become a reference.
            Some(held) if held.bytes()[..] != *bytes => Found::Collision,
            Some(held) => {
                let (b, c) = (held.bytes().clone(), held.check());
                store.touch(id);
                Found::Held(b, c)
            }
            None if !store.fits(bytes.len()) => Found::TooBig,
            None => {
                store.define(id, Arc::from(bytes));
                Found::Defined
            }
        };
        drop(store);
        if let Found::Held(held, check) = found {
            self.flush_literal(out);
            self.index_chunk(prev, id, bytes);
            let (len, n) = varint3(bytes.len());
            if carried == 0 {
                write_frame(
                    out,
                    &mut self.chain,
                    TokenType::Reference as u8,
                    &[&id.to_bytes(), &len[..n], &check.to_be_bytes()],
                );
            } else {
                let (c, m) = varint3(carried);
                write_frame(
                    out,
                    &mut self.chain,
                    TokenType::ReferenceCarried as u8,
                    &[&id.to_bytes(), &len[..n], &check.to_be_bytes(), &c[..m]],
                );
            }
            self.remember(id, held);
            self.stats.references += 1;
            self.stats.referenced_bytes += bytes.len() as u64;
            self.dirty = true;
            return;
        }
        if let Found::Collision = found {
            self.stats.collisions += 1;
        }
        if let Found::Collision | Found::TooBig = found {
            self.literal_chunk(bytes, carried);
            return;
        }
        self.flush_literal(out);
        self.index_chunk(prev, id, bytes);
        if carried == 0 {
            self.write_chunk(TokenType::Define, &id.to_bytes(), bytes, out);
        } else {
            let (c, m) = varint3(carried);
            let mut prefix = [0u8; 19];
            prefix[..16].copy_from_slice(&id.to_bytes());
            prefix[16..16 + m].copy_from_slice(&c[..m]);
            self.write_chunk(TokenType::DefineCarried, &prefix[..16 + m], &bytes[carried..], out);
        }
        self.stats.defines += 1;
        self.stats.defined_bytes += bytes.len() as u64;
        self.dirty = true;
    }

    fn remember(&mut self, id: ChunkId, bytes: Arc<[u8]>) {
        // Soft flushes name the same chunk again and again while it completes: counting it
        // each time would push older chunks out of the repair window for nothing.
        if self.recent.back().is_some_and(|(last, _)| *last == id) {
            return;
        }
        self.recent_bytes += bytes.len();
        self.recent.push_back((id, bytes));
        while self.recent_bytes > self.config.repair_window {
            let Some((_, b)) = self.recent.pop_front() else { break };
            self.recent_bytes -= b.len();
        }
    }

    /// Remembers, for `send_ahead`, which stored chunk starts with these bytes and which one
    /// followed `prev`.
    fn index_chunk(&mut self, prev: Option<ChunkId>, id: ChunkId, bytes: &[u8]) {
        self.last_chunk = Some(id);
        self.dict.lock().hints_mut().record(prev, id, bytes);
    }

    fn flush_literal(&mut self, out: &mut Vec<u8>) {
        if self.release > 0 {
            // The carried bytes of a chunk that went as literal: the first piece releases them.
            let (c, m) = varint3(std::mem::take(&mut self.release));
            let literal = std::mem::take(&mut self.literal);
            let first = literal.len().min(MAX_CHUNK - 4);
            self.stats.literal_bytes += first as u64;
            self.write_chunk(TokenType::LiteralCarried, &c[..m], &literal[..first], out);
            self.literal = literal;
            self.literal.drain(..first);
        }
        if self.literal.is_empty() {
            return;
        }
        let literal = std::mem::take(&mut self.literal);
        self.stats.literal_bytes += literal.len() as u64;
        for piece in literal.chunks(MAX_CHUNK) {
            self.write_chunk(TokenType::Literal, &[], piece, out);
        }
        self.literal = literal;
        self.literal.clear();
    }

    /// A LITERAL, DEFINE or REPAIR: `prefix` then the bytes, zstd-compressed when enabled and
    /// smaller (then `prefix`, raw length varint, zstd frame).
    fn write_chunk(&mut self, ty: TokenType, prefix: &[u8], bytes: &[u8], out: &mut Vec<u8>) {
        if let Some(z) = self.zstd.as_mut().filter(|_| bytes.len() >= 64) {
            self.zbuf.clear();
            self.zbuf.reserve(zstd::zstd_safe::compress_bound(bytes.len()));
            if z.compress_to_buffer(bytes, &mut self.zbuf).is_ok() && self.zbuf.len() + 3 < bytes.len() {
                let (len, n) = varint3(bytes.len());
                write_frame(out, &mut self.chain, ty as u8 | COMPRESSED, &[prefix, &len[..n], &self.zbuf]);
                return;
            }
        }
        write_frame(out, &mut self.chain, ty as u8, &[prefix, bytes]);
    }
}

fn common_prefix(a: &[u8], b: &[u8]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}
