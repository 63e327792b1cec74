//! The decoder: verifies every frame before it outputs a byte, mirrors the encoder's store
//! operations, and when a REFERENCE cannot be resolved reports a NACK and holds all later
//! output until the encoder's REPAIR arrives, so output is always a prefix of the original.
//!
//! Two cursors run over the buffered stream. The scan cursor verifies frames as soon as they
//! are complete, and handles at once what does not depend on order: REPAIR bodies are kept,
//! NACKs for the opposite direction become events, and references the store cannot hold by the
//! time they apply are NACKed early (one round trip for all of them, not one each). The apply
//! cursor follows in stream order and is the only one that outputs bytes or touches the store.

use std::collections::{HashMap, HashSet, VecDeque};
use std::ops::Range;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::{
    get_varint, parse_frame, DecodeError, Nack, NackKind, StreamHeader, TokenType, COMPRESSED, FLAG_SHARED, FLAG_ZSTD,
    HEADER_LEN, MAX_CARRY,
};
use crate::chunk::{ChunkId, MAX_CHUNK};
use crate::shared::{Dict, SharedStore, StoreRef};
use crate::store::{chunk_check, Store};

/// Limits of a [`Decoder`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct DecoderConfig {
    /// Most encoded bytes buffered while output waits for a REPAIR.
    pub max_pending: usize,
    /// Highest framing version accepted, [`super::MIN_VERSION`]..=[`super::VERSION`]
    /// (default `VERSION`): what this side announces in the chain HELLO, so that the peer's
    /// encoder writes no newer stream. A stream above it fails with `UnsupportedVersion` before
    /// a byte is output, as in a build that only speaks that version.
    pub max_version: u8,
}

impl Default for DecoderConfig {
    fn default() -> Self {
        Self { max_pending: 16 << 20, max_version: super::VERSION }
    }
}

/// Something the caller must act on, from [`Decoder::poll_event`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// Send this NACK to the peer's encoder (e.g. with `Encoder::send_nack` on the reverse
    /// direction): our dictionary disagrees with it.
    SendNack(Nack),
    /// The peer's decoder sent this NACK about our stream: give it to `Encoder::handle_nack`.
    NackReceived(Nack),
}

/// Counters of one decoder.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct DecoderStats {
    /// Encoded bytes received.
    pub input_bytes: u64,
    /// Bytes output.
    pub output_bytes: u64,
    /// Output bytes from LITERAL.
    pub literal_bytes: u64,
    /// Bytes of chunks defined (DEFINE, DEFINE_CARRIED: the whole chunk, carried part included).
    pub defined_bytes: u64,
    /// Bytes of chunks referenced and resolved in the store (whole chunks, as for defines).
    pub referenced_bytes: u64,
    /// Bytes of referenced chunks resolved by a REPAIR (whole chunks).
    pub repaired_bytes: u64,
    /// Shared dictionary: references that found their chunk only after waiting for another
    /// connection of the pair to define it.
    pub waited: u64,
    /// Shared dictionary: references NACKed after the wait ([`Decoder::fetch`]).
    pub fetched: u64,
    /// Output bytes sent ahead of their chunk (CARRY, CARRY_REF).
    pub carried_bytes: u64,
    /// NACKs this decoder asked to send.
    pub nacks_sent: u64,
    /// NACKs received for the opposite direction.
    pub nacks_received: u64,
    /// RESET tokens applied.
    pub resets: u64,
}

/// A verified frame waiting for the apply cursor.
#[derive(Debug, Clone)]
struct Pending {
    /// Stream offset of the frame.
    offset: u64,
    ty: u8,
    /// Body range, relative to the frame start.
    body: Range<usize>,
}

/// The decoding half of a proxy chain: owns the pair's [`Store`] while the stream lasts, or
/// shares it with the pair's other connections ([`Decoder::shared`]).
pub struct Decoder {
    dict: Dict,
    config: DecoderConfig,
    header: Option<StreamHeader>,
    /// Bytes output by CARRY / CARRY_REF whose chunk has not completed yet: the beginning of
    /// the current chunk (at most MAX_CARRY bytes).
    carry: Vec<u8>,
    /// Encoded bytes from stream offset `base` on.
    buf: Vec<u8>,
    base: u64,
    /// Everything before this stream offset is verified.
    scanned: u64,
    /// The check of the last verified frame (or the header): the next one is chained on it.
    chain: u32,
    frames: VecDeque<Pending>,
    scan_epoch: u32,
    apply_epoch: u32,
    /// DEFINEs scanned but not applied yet, by id.
    scan_defined: HashMap<ChunkId, u32>,
    repairs: HashMap<ChunkId, Arc<[u8]>>,
    nacked: HashSet<ChunkId>,
    blocked: Option<ChunkId>,
    /// Shared dictionary: output waits for this chunk to be defined by another connection
    /// (not NACKed yet).
    waiting: Option<ChunkId>,
    desync_reported: bool,
    events: VecDeque<Event>,
    error: Option<DecodeError>,
    zstd: Option<zstd::bulk::Decompressor<'static>>,
    zbuf: Vec<u8>,
    stats: DecoderStats,
}

impl std::fmt::Debug for Decoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Decoder")
            .field("header", &self.header)
            .field("shared", &self.dict.is_shared())
            .field("buffered", &self.buf.len())
            .field("blocked", &self.blocked)
            .field("error", &self.error)
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

impl Decoder {
    /// A decoder for a new stream over `store` (the pair's dictionary, same budget as the
    /// encoder's).
    pub fn new(store: Store, config: DecoderConfig) -> Self {
        Self::with_dict(Dict::Own(store), config)
    }

    /// A decoder for a new stream over a pair's dictionary shared with the pair's other
    /// connections (docs/codec.md section 3.2). A reference to a chunk it does not hold, and
    /// has not evicted lately, may be defined on another connection still in flight: output
    /// then waits ([`Decoder::waiting_for`]) until the chunk arrives (call
    /// [`Decoder::decode`] with no input when the store's generation changes) or the caller's
    /// bound runs out ([`Decoder::fetch`]).
    pub fn shared(store: SharedStore, config: DecoderConfig) -> Self {
        Self::with_dict(Dict::Shared(store), config)
    }

    fn with_dict(dict: Dict, config: DecoderConfig) -> Self {
        Self {
            dict,
            config,
            header: None,
            carry: Vec::new(),
            buf: Vec::new(),
            base: 0,
            scanned: 0,
            chain: 0,
            frames: VecDeque::new(),
            scan_epoch: 0,
            apply_epoch: 0,
            scan_defined: HashMap::new(),
            repairs: HashMap::new(),
            nacked: HashSet::new(),
            blocked: None,
            waiting: None,
            desync_reported: false,
            events: VecDeque::new(),
            error: None,
            zstd: None,
            zbuf: Vec::new(),
            stats: DecoderStats::default(),
        }
    }

    /// The dictionary (locked while the answer lives, when shared).
    pub fn store(&self) -> StoreRef<'_> {
        self.dict.view()
    }

    /// Ends the stream and hands back the dictionary (a copy when shared).
    pub fn into_store(self) -> Store {
        self.dict.into_store()
    }

    /// The counters.
    pub fn stats(&self) -> DecoderStats {
        self.stats
    }

    /// The stream header, once received.
    pub fn header(&self) -> Option<StreamHeader> {
        self.header
    }

    /// Bytes held as the beginning of an unfinished chunk (sent ahead by a soft flush).
    pub fn carried(&self) -> usize {
        self.carry.len()
    }

    /// The chunk whose REPAIR output is waiting for, if any.
    pub fn blocked_on(&self) -> Option<ChunkId> {
        self.blocked
    }

    /// Shared dictionary: the chunk output waits for another connection to define, not yet
    /// NACKed. The caller retries ([`Decoder::decode`] with no input) when the shared store's
    /// generation changes, and calls [`Decoder::fetch`] once its wait bound has passed.
    pub fn waiting_for(&self) -> Option<ChunkId> {
        self.waiting
    }

    /// Stops waiting for the chunk of [`Decoder::waiting_for`]: NACKs it, so the encoder
    /// sends it as REPAIR (polled as an event). Nothing happens if output no longer waits.
    pub fn fetch(&mut self) {
        if let Some(id) = self.waiting.take() {
            if self.nacked.insert(id) {
                self.stats.fetched += 1;
                self.send_nack(Nack { kind: NackKind::Missing, epoch: self.apply_epoch, id });
            }
        }
    }

    /// The next thing the caller must do (send or hand over a NACK).
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// Takes any split of the encoded stream and appends the bytes it decodes to `out`. Only
    /// verified frames produce output, so whatever was appended is a prefix of the encoder's
    /// input, even when this returns an error; after an error every call returns it again.
    pub fn decode(&mut self, input: &[u8], out: &mut Vec<u8>) -> Result<(), DecodeError> {
        if let Some(e) = self.error {
            return Err(e);
        }
        self.stats.input_bytes += input.len() as u64;
        self.buf.extend_from_slice(input);
        let start = out.len();
        let scanned = self.scan();
        let applied = self.apply(out);
        self.stats.output_bytes += (out.len() - start) as u64;
        let result = applied.and(scanned).and_then(|()| self.check_pending());
        self.compact();
        if let Err(e) = result {
            self.error = Some(e);
        }
        result
    }

    /// Declares the end of the stream: an error if it stopped inside a frame or while output
    /// waited for a REPAIR.
    pub fn finish(&mut self) -> Result<(), DecodeError> {
        if let Some(e) = self.error {
            return Err(e);
        }
        if let Some(id) = self.blocked {
            return Err(DecodeError::Blocked(id));
        }
        if self.scanned < self.base + self.buf.len() as u64 {
            return Err(DecodeError::Truncated);
        }
        Ok(())
    }

    fn check_pending(&self) -> Result<(), DecodeError> {
        let applied = self.frames.front().map_or(self.scanned, |p| p.offset);
        let held = self.base + self.buf.len() as u64 - applied;
        if self.blocked.is_some() && held > self.config.max_pending as u64 {
            return Err(DecodeError::PendingOverflow { limit: self.config.max_pending });
        }
        Ok(())
    }

    fn compact(&mut self) {
        let applied = self.frames.front().map_or(self.scanned, |p| p.offset);
        let drop = (applied - self.base) as usize;
        if drop == self.buf.len() {
            self.buf.clear();
        } else if drop >= 64 * 1024 && drop > self.buf.len() / 2 {
            self.buf.drain(..drop);
        } else {
            return;
        }
        self.base = applied;
    }

    /// Verifies every complete frame and queues it for `apply`.
    fn scan(&mut self) -> Result<(), DecodeError> {
        loop {
            let rel = (self.scanned - self.base) as usize;
            let Some(header) = self.header else {
                let Some(b) = self.buf.get(rel..rel + HEADER_LEN) else { return Ok(()) };
                let h = StreamHeader::parse(b.try_into().expect("header length"))?;
                if h.version > self.config.max_version {
                    return Err(DecodeError::UnsupportedVersion(h.version));
                }
                self.chain = u32::from_be_bytes(b[super::field::CHECK].try_into().expect("4 bytes"));
                self.on_header(h)?;
                self.scanned += HEADER_LEN as u64;
                continue;
            };
            let offset = self.scanned;
            let frame = match parse_frame(&self.buf[rel..], self.chain) {
                Ok(Some(f)) => f,
                Ok(None) => return Ok(()),
                Err((_, true)) => return Err(DecodeError::FrameChecksum { offset }),
                Err((what, false)) => return Err(DecodeError::Malformed { offset, what }),
            };
            let malformed = |what| DecodeError::Malformed { offset, what };
            if frame.ty & COMPRESSED != 0 && header.flags & FLAG_ZSTD == 0 {
                return Err(malformed("compressed body in a stream without the zstd flag"));
            }
            let ty = TokenType::from_byte(frame.ty).expect("parse_frame checked the type");
            if ty.is_carried() && header.version < 2 {
                return Err(malformed("carried token in a version-1 stream"));
            }
            let body = &self.buf[rel + frame.body.start..rel + frame.body.end];
            let mut queue = true;
            match ty {
                TokenType::Literal | TokenType::Carry => {}
                TokenType::LiteralCarried => {
                    get_varint(body).ok().flatten().ok_or_else(|| malformed("bad LITERAL_CARRIED body"))?;
                }
                TokenType::DefineCarried => {
                    let (id, _, _) = read_define_carried(body).ok_or_else(|| malformed("bad DEFINE_CARRIED body"))?;
                    *self.scan_defined.entry(id).or_default() += 1;
                }
                TokenType::CarryRef | TokenType::ReferenceCarried => {
                    let (id, len, check, n) =
                        read_reference_carried(body).ok_or_else(|| malformed("bad carried reference body"))?;
                    if n > len || (n == 0 && ty == TokenType::CarryRef) {
                        return Err(malformed("carried count outside its chunk"));
                    }
                    self.nack_early(id, len, check);
                }
                TokenType::Define => {
                    let id = read_id(body).ok_or_else(|| malformed("DEFINE shorter than an id"))?;
                    *self.scan_defined.entry(id).or_default() += 1;
                }
                TokenType::Reference => {
                    let (id, len, check) = read_reference(body).ok_or_else(|| malformed("bad REFERENCE body"))?;
                    self.nack_early(id, len, check);
                }
                TokenType::Repair => {
                    let id = read_id(body).ok_or_else(|| malformed("REPAIR shorter than an id"))?;
                    let bytes = chunk_body(&mut self.zstd, &mut self.zbuf, frame.ty, &body[16..], offset)?;
                    if ChunkId::of(bytes) != id {
                        return Err(DecodeError::ChunkIdMismatch { offset });
                    }
                    self.repairs.insert(id, Arc::from(bytes));
                    self.nacked.remove(&id);
                }
                TokenType::Reset => {
                    self.scan_epoch = u32::from_be_bytes(body.try_into().map_err(|_| malformed("bad RESET body"))?);
                }
                TokenType::Checkpoint if body.len() != 8 => return Err(malformed("bad CHECKPOINT body")),
                TokenType::Checkpoint => {}
                // At scan time: output may be waiting for a REPAIR that will never come.
                TokenType::Abort if body.len() != 1 => return Err(malformed("bad ABORT body")),
                TokenType::Abort => return Err(DecodeError::Aborted { reason: body[0] }),
                TokenType::Nack => {
                    let nack = Nack::from_bytes(body).ok_or_else(|| malformed("bad NACK body"))?;
                    self.events.push_back(Event::NackReceived(nack));
                    self.stats.nacks_received += 1;
                    queue = false;
                }
            }
            if queue {
                self.frames.push_back(Pending { offset, ty: frame.ty, body: frame.body });
            }
            self.scanned += frame.len as u64;
            self.chain = frame.check;
        }
    }

    fn on_header(&mut self, h: StreamHeader) -> Result<(), DecodeError> {
        let shared = h.flags & FLAG_SHARED != 0;
        if shared != self.dict.is_shared() {
            return Err(DecodeError::SharedMismatch(shared));
        }
        let store = self.dict.view();
        let (budget, epoch, digest) = (store.budget(), store.epoch(), store.digest());
        drop(store);
        if h.budget != budget {
            return Err(DecodeError::BudgetMismatch { encoder: h.budget, decoder: budget });
        }
        if h.flags & FLAG_ZSTD != 0 {
            self.zstd = Some(zstd::bulk::Decompressor::new().expect("zstd context"));
        }
        self.header = Some(h);
        self.scan_epoch = h.epoch;
        self.apply_epoch = h.epoch;
        // A shared dictionary has no lockstep: its digest says nothing about the peer's.
        if !shared && (h.epoch != epoch || h.digest != digest) {
            self.desync_reported = true;
            self.send_nack(Nack { kind: NackKind::Desync, epoch: h.epoch, id: ChunkId(0) });
        }
        Ok(())
    }

    /// NACKs a reference now if nothing between here and its turn can supply the chunk.
    fn nack_early(&mut self, id: ChunkId, len: usize, check: u32) {
        let shared = self.dict.is_shared();
        let store = self.dict.view();
        let kind = match store.get(id) {
            Some(c) if c.bytes().len() == len && c.check() == check => return,
            Some(_) => NackKind::Mismatch,
            // Shared: another connection may define it before its turn here; only a chunk we
            // evicted lately is surely gone.
            None if shared && !store.recently_evicted(id) => return,
            None => NackKind::Missing,
        };
        drop(store);
        if self.repairs.contains_key(&id) || self.scan_defined.contains_key(&id) || self.nacked.contains(&id) {
            return;
        }
        self.nacked.insert(id);
        self.send_nack(Nack { kind, epoch: self.scan_epoch, id });
    }

    fn send_nack(&mut self, nack: Nack) {
        self.stats.nacks_sent += 1;
        self.events.push_back(Event::SendNack(nack));
    }

    /// Applies queued frames in stream order until one cannot be resolved yet.
    fn apply(&mut self, out: &mut Vec<u8>) -> Result<(), DecodeError> {
        self.blocked = None;
        let was_waiting = self.waiting.take();
        while let Some(p) = self.frames.front() {
            let offset = p.offset;
            let ty = p.ty;
            let rel = (offset - self.base) as usize;
            let body = &self.buf[rel + p.body.start..rel + p.body.end];
            match TokenType::from_byte(ty).expect("scan checked the type") {
                TokenType::Literal => {
                    let bytes = chunk_body(&mut self.zstd, &mut self.zbuf, ty, body, offset)?;
                    out.extend_from_slice(bytes);
                    self.stats.literal_bytes += bytes.len() as u64;
                }
                TokenType::Define => {
                    let id = read_id(body).expect("scan checked");
                    let bytes = chunk_body(&mut self.zstd, &mut self.zbuf, ty, &body[16..], offset)?;
                    if ChunkId::of(bytes) != id {
                        return Err(DecodeError::ChunkIdMismatch { offset });
                    }
                    if self.dict.lock().define(id, Arc::from(bytes)).is_none() {
                        return Err(DecodeError::Malformed { offset, what: "DEFINE larger than the budget" });
                    }
                    self.dict.bump();
                    out.extend_from_slice(bytes);
                    self.stats.defined_bytes += bytes.len() as u64;
                    self.applied_define(id);
                }
                TokenType::Reference => {
                    let (id, len, check) = read_reference(body).expect("scan checked");
                    let Some((chunk, stored)) = self.resolve(id, len, check) else {
                        self.block(id);
                        return Ok(());
                    };
                    out.extend_from_slice(&chunk);
                    self.used(id, len, stored);
                }
                TokenType::Carry => {
                    let bytes = chunk_body(&mut self.zstd, &mut self.zbuf, ty, body, offset)?;
                    if self.carry.len() + bytes.len() > MAX_CARRY {
                        return Err(DecodeError::Malformed { offset, what: "carry longer than MAX_CARRY" });
                    }
                    out.extend_from_slice(bytes);
                    self.carry.extend_from_slice(bytes);
                    self.stats.carried_bytes += bytes.len() as u64;
                }
                TokenType::CarryRef => {
                    let (id, len, check, count) = read_reference_carried(body).expect("scan checked");
                    let from = self.carry.len();
                    if from + count > len || from + count > MAX_CARRY {
                        return Err(DecodeError::Malformed { offset, what: "CARRY_REF beyond its chunk" });
                    }
                    let Some((chunk, _)) = self.resolve(id, len, check) else {
                        self.block(id);
                        return Ok(());
                    };
                    let bytes = &chunk[from..from + count];
                    out.extend_from_slice(bytes);
                    self.carry.extend_from_slice(bytes);
                    self.stats.carried_bytes += count as u64;
                }
                TokenType::ReferenceCarried => {
                    let (id, len, check, carried) = read_reference_carried(body).expect("scan checked");
                    self.check_carried(carried, carried < len, offset)?;
                    let Some((chunk, stored)) = self.resolve(id, len, check) else {
                        self.block(id);
                        return Ok(());
                    };
                    if chunk[..carried] != self.carry[..carried] {
                        return Err(DecodeError::Malformed { offset, what: "carried bytes differ from the chunk" });
                    }
                    out.extend_from_slice(&chunk[carried..]);
                    self.carry.drain(..carried);
                    self.used(id, len, stored);
                }
                TokenType::DefineCarried => {
                    let (id, carried, n) = read_define_carried(body).expect("scan checked");
                    let bytes = chunk_body(&mut self.zstd, &mut self.zbuf, ty, &body[16 + n..], offset)?;
                    let malformed = |what| DecodeError::Malformed { offset, what };
                    if carried > self.carry.len() || (!bytes.is_empty() && carried != self.carry.len()) {
                        return Err(malformed("carried count does not match the carry"));
                    }
                    if carried + bytes.len() > MAX_CHUNK {
                        return Err(malformed("DEFINE_CARRIED longer than MAX_CHUNK"));
                    }
                    let mut chunk = Vec::with_capacity(carried + bytes.len());
                    chunk.extend_from_slice(&self.carry[..carried]);
                    chunk.extend_from_slice(bytes);
                    if ChunkId::of(&chunk) != id {
                        return Err(DecodeError::ChunkIdMismatch { offset });
                    }
                    if self.dict.lock().define(id, Arc::from(chunk)).is_none() {
                        return Err(malformed("DEFINE larger than the budget"));
                    }
                    self.dict.bump();
                    out.extend_from_slice(bytes);
                    self.carry.drain(..carried);
                    self.stats.defined_bytes += (carried + bytes.len()) as u64;
                    self.applied_define(id);
                }
                TokenType::LiteralCarried => {
                    let (carried, n) = get_varint(body).ok().flatten().expect("scan checked");
                    let bytes = chunk_body(&mut self.zstd, &mut self.zbuf, ty, &body[n..], offset)?;
                    if carried > self.carry.len() || (!bytes.is_empty() && carried != self.carry.len()) {
                        return Err(DecodeError::Malformed { offset, what: "carried count does not match the carry" });
                    }
                    out.extend_from_slice(bytes);
                    self.carry.drain(..carried);
                    self.stats.literal_bytes += bytes.len() as u64;
                }
                TokenType::Repair => {
                    let id = read_id(body).expect("scan checked");
                    self.repairs.remove(&id);
                }
                TokenType::Reset => {
                    let epoch = u32::from_be_bytes(body.try_into().expect("scan checked"));
                    self.dict.lock().reset(epoch);
                    self.apply_epoch = epoch;
                    self.desync_reported = false;
                    self.stats.resets += 1;
                }
                TokenType::Checkpoint => {
                    let digest = u64::from_be_bytes(body.try_into().expect("scan checked"));
                    if !self.dict.is_shared() && digest != self.dict.view().digest() && !self.desync_reported {
                        self.desync_reported = true;
                        self.send_nack(Nack { kind: NackKind::Desync, epoch: self.apply_epoch, id: ChunkId(0) });
                    }
                }
                TokenType::Abort | TokenType::Nack => unreachable!("handled by scan, never queued"),
            }
            self.frames.pop_front();
        }
        if was_waiting.is_some() && self.waiting != was_waiting {
            self.stats.waited += 1;
        }
        Ok(())
    }
}

impl Decoder {
    /// The chunk a reference names, from the store or a REPAIR (`true`: from the store).
    fn resolve(&self, id: ChunkId, len: usize, check: u32) -> Option<(Arc<[u8]>, bool)> {
        if let Some(c) = self.dict.view().get(id).filter(|c| c.bytes().len() == len && c.check() == check) {
            return Some((c.bytes().clone(), true));
        }
        let b = self.repairs.get(&id).filter(|b| b.len() == len && chunk_check(b) == check)?;
        Some((b.clone(), false))
    }

    /// Output waits for the REPAIR of `id` (NACKed once).
    fn block(&mut self, id: ChunkId) {
        self.blocked = Some(id);
        if self.nacked.contains(&id) {
            return;
        }
        let store = self.dict.view();
        let (held, evicted) = (store.contains(id), store.recently_evicted(id));
        drop(store);
        if self.dict.is_shared() && !held && !evicted {
            // Perhaps on its way on another connection of the pair: wait (Decoder::fetch).
            self.waiting = Some(id);
            return;
        }
        self.nacked.insert(id);
        let kind = if held { NackKind::Mismatch } else { NackKind::Missing };
        self.send_nack(Nack { kind, epoch: self.apply_epoch, id });
    }

    /// A reference applied: a use in the store, or a chunk supplied by REPAIR.
    fn used(&mut self, id: ChunkId, len: usize, stored: bool) {
        if stored {
            self.dict.lock().touch(id);
            self.stats.referenced_bytes += len as u64;
        } else {
            self.stats.repaired_bytes += len as u64;
            // Shared: the pair's dictionary lacked it (evicted here only, or never arrived):
            // keep it again, so the next reference from any connection hits.
            if let (true, Some(bytes)) = (self.dict.is_shared(), self.repairs.get(&id).cloned()) {
                self.dict.lock().define(id, bytes);
                self.dict.bump();
            }
        }
    }

    fn applied_define(&mut self, id: ChunkId) {
        if let Some(n) = self.scan_defined.get_mut(&id) {
            *n -= 1;
            if *n == 0 {
                self.scan_defined.remove(&id);
            }
        }
    }

    /// A token that completes a chunk from the first `carried` bytes of the carry: there must
    /// be that many, and all of them when the chunk has bytes after them.
    fn check_carried(&self, carried: usize, more: bool, offset: u64) -> Result<(), DecodeError> {
        if carried > self.carry.len() || (more && carried != self.carry.len()) {
            return Err(DecodeError::Malformed { offset, what: "carried count does not match the carry" });
        }
        Ok(())
    }
}

/// DEFINE_CARRIED body: id 16 B, carried varint, then the data: (id, carried, varint length).
fn read_define_carried(body: &[u8]) -> Option<(ChunkId, usize, usize)> {
    let id = read_id(body)?;
    let (carried, n) = get_varint(&body[16..]).ok()??;
    (carried <= MAX_CARRY).then_some((id, carried, n))
}

/// REFERENCE_CARRIED / CARRY_REF body: id 16 B, length varint, check u32, count varint.
fn read_reference_carried(body: &[u8]) -> Option<(ChunkId, usize, u32, usize)> {
    let id = read_id(body)?;
    let (len, n) = get_varint(&body[16..]).ok()??;
    let check = u32::from_be_bytes(body.get(16 + n..20 + n)?.try_into().ok()?);
    let (count, m) = get_varint(&body[20 + n..]).ok()??;
    (len > 0 && len <= MAX_CHUNK && 20 + n + m == body.len()).then_some((id, len, check, count))
}

fn read_id(body: &[u8]) -> Option<ChunkId> {
    Some(ChunkId::from_bytes(body.get(..16)?.try_into().ok()?))
}

/// REFERENCE body: id 16 B, length varint, check u32.
fn read_reference(body: &[u8]) -> Option<(ChunkId, usize, u32)> {
    let id = read_id(body)?;
    let (len, n) = get_varint(&body[16..]).ok()??;
    let check = u32::from_be_bytes(body.get(16 + n..)?.try_into().ok()?);
    (len > 0 && len <= MAX_CHUNK).then_some((id, len, check))
}

/// The bytes of a LITERAL / DEFINE / REPAIR body after its prefix, decompressed if the type
/// byte says so (raw length varint, then one zstd frame that must decompress to exactly it).
fn chunk_body<'a>(
    zstd: &mut Option<zstd::bulk::Decompressor<'static>>,
    zbuf: &'a mut Vec<u8>,
    ty: u8,
    body: &'a [u8],
    offset: u64,
) -> Result<&'a [u8], DecodeError> {
    if ty & COMPRESSED == 0 {
        return Ok(body);
    }
    let bad = DecodeError::Decompress { offset };
    let (raw_len, n) = get_varint(body).ok().flatten().ok_or(bad)?;
    if raw_len > MAX_CHUNK {
        return Err(bad);
    }
    let z = zstd.as_mut().ok_or(bad)?;
    zbuf.clear();
    zbuf.reserve(raw_len);
    match z.decompress_to_buffer(&body[n..], zbuf) {
        Ok(len) if len == raw_len && zbuf.len() == raw_len => Ok(&zbuf[..]),
        _ => Err(bad),
    }
}
