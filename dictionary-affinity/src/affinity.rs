//! The affinity engine: which member should own a new flow, by whose compression dictionary
//! is best for the flow's client/server pair, bounded by load (paper sections 1.2 and 3:
//! the WAN-optimization module picks the member with the better dictionary and the connection
//! is installed off-box, "connection handoff").
//!
//! # Pairs
//!
//! Dictionaries are built per client/server *pair*, and a pair is `(client prefix, server
//! address)`: by default the client's /24 (IPv4) or /64 (IPv6) and the server's /32 or /128
//! ([`PairGranularity`]). A downstream proxy that spoofs its clients (paper 1.2, Fig. 2) opens
//! connections from many client addresses, yet all of them run over the one downstream/upstream
//! proxy chain whose dictionaries we want to reuse; a /24 groups one site's clients so they keep
//! one upstream, where a per-address key would scatter the site over every upstream. The server
//! stays exact because content (what the dictionary holds) is per server.
//!
//! # Inputs
//!
//! Every member advertises, per pair, its decayed bytes saved ([`DictStats`]: exponential decay
//! with a cluster-wide half-life, see [`DecayedBytes`] and [`SavingsLedger`]) tagged with its
//! dictionary epoch, and its load ([`LoadReport`]). [`AffinityEngine::observe`] and
//! [`AffinityEngine::observe_loads`] take them with the time they arrived; nothing here reads a
//! clock (sans-IO). An entry's saving keeps decaying from its arrival, so a member that stops
//! advertising a pair fades out. A member's newer epoch (its dictionary was reset, e.g. on
//! restart) voids all its entries of older epochs.
//!
//! Loads must be fresh: a load figure older than a fraction of a connection's lifetime makes
//! every member send the same pairs to the same under-loaded member until the next report (in
//! the simulation, LOAD every 500 ms with 1 s connections fell to 69-92% of the savings at
//! 1.8 x the average load). Active connections per owner, as the connection database counts
//! them on every member after each INSTALL/REMOVE, are such a figure at no message cost.
//!
//! # Decision
//!
//! Among the live members whose load is at most `load_bound x` the average load of the live
//! members (members without a fresh load report count as within the bound), pick the one with
//! the highest decayed saving for the pair; exact ties go to the highest rendezvous weight
//! ([`handoff::policy::rendezvous`] over [`Pair::key`]). When only members over the bound have
//! a dictionary for the pair, fall back to rendezvous over the members within the bound. When no
//! live member has one, fall back to rendezvous over the members at most `new_pair_bound x` the
//! average (default 1.1): a stable choice, so a new pair's second connection finds the
//! dictionary its first one started, that keeps the headroom up to `load_bound` for the pairs
//! the dictionaries attract (without it, in the simulation of `benches/affinity.rs`, members
//! with rich dictionaries sat at the bound and spilled their own pairs). Each outcome is
//! counted by [`Reason`].
//!
//! Every member decides alike for the same inputs: the result depends on no iteration order
//! (members are visited in id order, scores are merged commutatively) and on no randomness.
//! Two limits: advertisements reach members at slightly different times (a skew that is tiny
//! next to the half-life, but can flip an exact near-tie), and the bounded tables may evict
//! different cold pairs on different members (such a pair falls back to rendezvous there).
//!
//! # Wire format (version-2 messages DICT_STATS and LOAD)
//!
//! Network byte order; the 4-byte header has the layout of version 1 and the length of every
//! message follows from its first 12 (DICT_STATS) or 4 (LOAD) bytes. [`encode_advertisement`]
//! writes a batch as a sequence of these messages; [`decode_advertisement`] reads one back.
//!
//! ```text
//! DICT_STATS: one member's decayed savings for up to 4096 pairs of one address family.
//!  0                   1                   2                   3
//!  0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1
//! +---------------+---------------+---------------+---------------+
//! | Msg Type = 4  | Action = 1    |    Member     | Address Family|   0..4   (1 IPv4, 2 IPv6)
//! +---------------+---------------+---------------+---------------+
//! |                       Dictionary Epoch                        |   4..8
//! +---------------+---------------+-------------------------------+
//! | Client Prefix | Server Prefix |         Record Count          |   8..12  (prefix lengths in bits)
//! +---------------+---------------+-------------------------------+
//! then Record Count records, 12 bytes (IPv4) or 36 bytes (IPv6) each:
//! +---------------------------------------------------------------+
//! |        Client Prefix (4 or 16 bytes, host bits zero)          |
//! +---------------------------------------------------------------+
//! |        Server Address (4 or 16 bytes, host bits zero)         |
//! +---------------------------------------------------------------+
//! |      Decayed Bytes Saved (IEEE 754 binary32, finite, >= 0)    |
//! +---------------------------------------------------------------+
//!
//! LOAD: one member's load (8 bytes).
//! +---------------+---------------+---------------+---------------+
//! | Msg Type = 5  | Action = 1    |    Member     |       0       |   0..4
//! +---------------+---------------+---------------+---------------+
//! |             Load (IEEE 754 binary32, finite, >= 0)            |   4..8
//! +---------------------------------------------------------------+
//! ```
//!
//! A saving of 0 withdraws the pair (the member's dictionary no longer holds it). binary32
//! keeps 24 bits of precision, plenty for a score; engines quantize local inputs the same way
//! so that a member's view of itself equals its peers' view of it.

use std::collections::HashSet;
use std::fmt::{self, Write as _};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use cluster_proto::{Connection, MemberId};
use handoff::policy::{rendezvous, Choice, OwnerPolicy};
use moka::sync::Cache;

/// How much of each address makes a pair (prefix lengths in bits).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PairGranularity {
    /// IPv4 client prefix length (default 24: one site behind a spoofing downstream proxy).
    pub v4_client: u8,
    /// IPv4 server prefix length (default 32).
    pub v4_server: u8,
    /// IPv6 client prefix length (default 64).
    pub v6_client: u8,
    /// IPv6 server prefix length (default 128).
    pub v6_server: u8,
}

impl Default for PairGranularity {
    fn default() -> Self {
        PairGranularity { v4_client: 24, v4_server: 32, v6_client: 64, v6_server: 128 }
    }
}

/// A pair's fields do not fit: mixed address families or a prefix longer than the address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InvalidPair;

impl fmt::Display for InvalidPair {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a pair needs one address family and prefixes no longer than the address")
    }
}

impl std::error::Error for InvalidPair {}

/// The unit of affinity: a client prefix and a server prefix, host bits zeroed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Pair {
    client: IpAddr,
    server: IpAddr,
    client_prefix: u8,
    server_prefix: u8,
}

/// Longest rendezvous key of a pair (IPv6): family, two lengths, two addresses.
pub const PAIR_KEY_MAX: usize = 3 + 16 + 16;

fn mask(ip: IpAddr, len: u8) -> IpAddr {
    match ip {
        IpAddr::V4(a) => {
            let m = if len == 0 { 0 } else { u32::MAX << (32 - u32::from(len.min(32))) };
            IpAddr::V4(Ipv4Addr::from(u32::from(a) & m))
        }
        IpAddr::V6(a) => {
            let m = if len == 0 { 0 } else { u128::MAX << (128 - u32::from(len.min(128))) };
            IpAddr::V6(Ipv6Addr::from(u128::from(a) & m))
        }
    }
}

fn max_len(ip: IpAddr) -> u8 {
    if ip.is_ipv4() {
        32
    } else {
        128
    }
}

impl Pair {
    /// A pair of `client/client_prefix` and `server/server_prefix`; host bits are zeroed.
    pub fn new(client: IpAddr, client_prefix: u8, server: IpAddr, server_prefix: u8) -> Result<Self, InvalidPair> {
        if client.is_ipv4() != server.is_ipv4() || client_prefix > max_len(client) || server_prefix > max_len(server) {
            return Err(InvalidPair);
        }
        Ok(Pair {
            client: mask(client, client_prefix),
            server: mask(server, server_prefix),
            client_prefix,
            server_prefix,
        })
    }

    /// The pair of a new flow: its source (the originator of the SYN) is the client.
    pub fn of(connection: &Connection, g: &PairGranularity) -> Self {
        let (c, s) = (connection.src().ip(), connection.dst().ip());
        let (cl, sl) =
            if c.is_ipv4() { (g.v4_client.min(32), g.v4_server.min(32)) } else { (g.v6_client, g.v6_server) };
        let (cl, sl) = (cl.min(max_len(c)), sl.min(max_len(c)));
        Pair { client: mask(c, cl), server: mask(s, sl), client_prefix: cl, server_prefix: sl }
    }

    /// The client prefix's address (host bits zero).
    pub fn client(&self) -> IpAddr {
        self.client
    }

    /// The client prefix length in bits.
    pub fn client_prefix(&self) -> u8 {
        self.client_prefix
    }

    /// The server prefix's address (host bits zero).
    pub fn server(&self) -> IpAddr {
        self.server
    }

    /// The server prefix length in bits.
    pub fn server_prefix(&self) -> u8 {
        self.server_prefix
    }

    /// True for an IPv4 pair.
    pub fn is_ipv4(&self) -> bool {
        self.client.is_ipv4()
    }

    /// The bytes rendezvous hashing hashes for this pair, written into `buf`.
    pub fn key_into<'a>(&self, buf: &'a mut [u8; PAIR_KEY_MAX]) -> &'a [u8] {
        buf[0] = if self.is_ipv4() { 1 } else { 2 };
        buf[1] = self.client_prefix;
        buf[2] = self.server_prefix;
        let mut n = 3;
        for ip in [self.client, self.server] {
            match ip {
                IpAddr::V4(a) => {
                    buf[n..n + 4].copy_from_slice(&a.octets());
                    n += 4;
                }
                IpAddr::V6(a) => {
                    buf[n..n + 16].copy_from_slice(&a.octets());
                    n += 16;
                }
            }
        }
        &buf[..n]
    }

    /// The bytes rendezvous hashing hashes for this pair.
    pub fn key(&self) -> Vec<u8> {
        let mut buf = [0; PAIR_KEY_MAX];
        self.key_into(&mut buf).to_vec()
    }
}

impl fmt::Display for Pair {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{} -> {}/{}", self.client, self.client_prefix, self.server, self.server_prefix)
    }
}

/// Exponential decay with a half-life: the weight of something `elapsed` ago.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decay {
    half_life: Duration,
}

impl Decay {
    /// Decay that halves a value every `half_life` (zero: only the present counts).
    pub fn new(half_life: Duration) -> Self {
        Decay { half_life }
    }

    /// The half-life.
    pub fn half_life(&self) -> Duration {
        self.half_life
    }

    /// `2^(-elapsed / half_life)`.
    pub fn factor(&self, elapsed: Duration) -> f64 {
        if elapsed.is_zero() {
            1.0
        } else if self.half_life.is_zero() {
            0.0
        } else {
            (-(elapsed.as_secs_f64() / self.half_life.as_secs_f64())).exp2()
        }
    }
}

/// A byte count whose past contributions decay: `sum(bytes_i * 2^(-(now - t_i) / half_life))`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DecayedBytes {
    value: f64,
    at: Instant,
}

impl DecayedBytes {
    /// Zero, as of `now`.
    pub fn new(now: Instant) -> Self {
        DecayedBytes { value: 0.0, at: now }
    }

    /// Adds `bytes` at `now`; an earlier `now` than the last update adds the bytes already decayed,
    /// so the sum does not depend on the order of the additions.
    pub fn add(&mut self, decay: &Decay, now: Instant, bytes: f64) {
        if now >= self.at {
            self.value = self.value * decay.factor(now - self.at) + bytes;
            self.at = now;
        } else {
            self.value += bytes * decay.factor(self.at - now);
        }
    }

    /// The value at `now` (a time before the last update reads as the last update).
    pub fn value_at(&self, decay: &Decay, now: Instant) -> f64 {
        self.value * decay.factor(now.saturating_duration_since(self.at))
    }
}

/// One member's dictionary statistics for one pair, as advertised (DICT_STATS record).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DictStats {
    /// The pair.
    pub pair: Pair,
    /// The advertising member.
    pub member: MemberId,
    /// Its decayed bytes saved for the pair when it advertised (0 withdraws the pair).
    pub saved_decayed: f64,
    /// Its dictionary epoch: a new epoch voids the member's statistics of older epochs.
    pub epoch: u32,
}

/// One member's load as advertised (LOAD message): active connections or bytes/s, cluster-wide alike.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LoadReport {
    /// The advertising member.
    pub member: MemberId,
    /// Its load.
    pub load: f64,
}

/// A decoded batch of DICT_STATS and LOAD messages.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Advertisement {
    /// Dictionary statistics, in message order.
    pub stats: Vec<DictStats>,
    /// Load reports, in message order.
    pub loads: Vec<LoadReport>,
}

/// Wire codes of the version-2 advertisement messages: those of the cluster protocol
/// (`cluster_proto::wire::advertisement`), where their framing rule lives.
pub mod wire {
    pub use cluster_proto::wire::advertisement::{
        ADVERTISE, DICT_STATS, DICT_STATS_HEADER_LEN, LOAD, LOAD_LEN, MAX_RECORDS, RECORD_V4_LEN, RECORD_V6_LEN,
    };
}

/// Why advertisement bytes could not be decoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AdvertisementError {
    /// The bytes end inside a message.
    Truncated,
    /// Byte 0 is neither DICT_STATS nor LOAD.
    UnknownMessageType(u8),
    /// Byte 1 is not ADVERTISE.
    UnknownAction(u8),
    /// Byte 3 of DICT_STATS is not IPv4 (1) or IPv6 (2).
    UnknownAddressFamily(u8),
    /// A prefix length is longer than the address.
    BadPrefixLength,
    /// A prefix has host bits set.
    HostBitsSet,
    /// A value is negative, infinite or NaN.
    BadValue,
    /// More than [`wire::MAX_RECORDS`] records.
    TooManyRecords(u16),
}

impl fmt::Display for AdvertisementError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Truncated => f.write_str("advertisement truncated"),
            Self::UnknownMessageType(t) => write!(f, "unknown advertisement message type {t}"),
            Self::UnknownAction(a) => write!(f, "unknown advertisement action {a}"),
            Self::UnknownAddressFamily(a) => write!(f, "unknown address family {a}"),
            Self::BadPrefixLength => f.write_str("prefix length longer than the address"),
            Self::HostBitsSet => f.write_str("prefix with host bits set"),
            Self::BadValue => f.write_str("value negative, infinite or NaN"),
            Self::TooManyRecords(n) => write!(f, "{n} records in one DICT_STATS (at most {})", wire::MAX_RECORDS),
        }
    }
}

impl std::error::Error for AdvertisementError {}

/// The binary32 a value travels as: NaN and negatives become 0, huge values `f32::MAX`.
pub fn quantize(v: f64) -> f64 {
    f64::from(to_wire(v))
}

fn to_wire(v: f64) -> f32 {
    if v.is_nan() || v <= 0.0 {
        0.0
    } else if v >= f64::from(f32::MAX) {
        f32::MAX
    } else {
        v as f32
    }
}

fn from_wire(b: &[u8]) -> Result<f64, AdvertisementError> {
    let v = f32::from_be_bytes([b[0], b[1], b[2], b[3]]);
    if !v.is_finite() || v < 0.0 {
        return Err(AdvertisementError::BadValue);
    }
    Ok(if v == 0.0 { 0.0 } else { f64::from(v) })
}

fn put_ip(out: &mut Vec<u8>, ip: IpAddr) {
    match ip {
        IpAddr::V4(a) => out.extend_from_slice(&a.octets()),
        IpAddr::V6(a) => out.extend_from_slice(&a.octets()),
    }
}

/// Encodes dictionary statistics and load reports as DICT_STATS and LOAD messages.
pub fn encode_advertisement(stats: &[DictStats], loads: &[LoadReport]) -> Vec<u8> {
    let group = |s: &DictStats| (s.member, s.epoch, s.pair.is_ipv4(), s.pair.client_prefix, s.pair.server_prefix);
    let record_len = |v4: bool| if v4 { wire::RECORD_V4_LEN } else { wire::RECORD_V6_LEN };
    let mut out = Vec::with_capacity(
        stats.iter().map(|s| record_len(s.pair.is_ipv4())).sum::<usize>() + 64 + loads.len() * wire::LOAD_LEN,
    );
    let mut i = 0;
    while i < stats.len() {
        let g = group(&stats[i]);
        let mut j = i + 1;
        while j < stats.len() && j - i < wire::MAX_RECORDS && group(&stats[j]) == g {
            j += 1;
        }
        let (member, epoch, v4, cl, sl) = g;
        out.extend_from_slice(&[wire::DICT_STATS, wire::ADVERTISE, member.0, if v4 { 1 } else { 2 }]);
        out.extend_from_slice(&epoch.to_be_bytes());
        out.extend_from_slice(&[cl, sl]);
        out.extend_from_slice(&((j - i) as u16).to_be_bytes());
        for s in &stats[i..j] {
            put_ip(&mut out, s.pair.client);
            put_ip(&mut out, s.pair.server);
            out.extend_from_slice(&to_wire(s.saved_decayed).to_be_bytes());
        }
        i = j;
    }
    for l in loads {
        out.extend_from_slice(&[wire::LOAD, wire::ADVERTISE, l.member.0, 0]);
        out.extend_from_slice(&to_wire(l.load).to_be_bytes());
    }
    out
}

/// The length of the advertisement message at the start of `bytes`, or `None` when more bytes
/// are needed to tell (for framing on a stream). The rule is the cluster protocol's
/// ([`cluster_proto::wire::advertisement_len`]); only the error type is this crate's.
pub fn advertisement_len(bytes: &[u8]) -> Result<Option<usize>, AdvertisementError> {
    use cluster_proto::wire::DecodeError as E;
    cluster_proto::wire::advertisement_len(bytes).map_err(|e| match e {
        E::UnknownMessageType(t) => AdvertisementError::UnknownMessageType(t),
        E::UnknownAction { action, .. } => AdvertisementError::UnknownAction(action),
        E::UnknownAddressFamily(af) => AdvertisementError::UnknownAddressFamily(af),
        E::TooManyRecords(n) => AdvertisementError::TooManyRecords(n),
        // advertisement_len reports nothing else.
        E::UnknownProtocol(_) | E::Truncated | E::WrongMember { .. } => AdvertisementError::Truncated,
    })
}

fn read_ip(b: &[u8], v4: bool) -> IpAddr {
    if v4 {
        IpAddr::V4(Ipv4Addr::new(b[0], b[1], b[2], b[3]))
    } else {
        let mut o = [0u8; 16];
        o.copy_from_slice(&b[..16]);
        IpAddr::V6(Ipv6Addr::from(o))
    }
}

/// Decodes a whole buffer of DICT_STATS and LOAD messages; never panics.
pub fn decode_advertisement(bytes: &[u8]) -> Result<Advertisement, AdvertisementError> {
    let mut adv = Advertisement::default();
    let mut rest = bytes;
    while !rest.is_empty() {
        let len = advertisement_len(rest)?.ok_or(AdvertisementError::Truncated)?;
        if rest.len() < len {
            return Err(AdvertisementError::Truncated);
        }
        let (m, tail) = rest.split_at(len);
        rest = tail;
        let member = MemberId(m[2]);
        if m[0] == wire::LOAD {
            adv.loads.push(LoadReport { member, load: from_wire(&m[4..8])? });
            continue;
        }
        let v4 = m[3] == 1;
        let (alen, limit) = if v4 { (4, 32) } else { (16, 128) };
        let epoch = u32::from_be_bytes([m[4], m[5], m[6], m[7]]);
        let (cl, sl) = (m[8], m[9]);
        if cl > limit || sl > limit {
            return Err(AdvertisementError::BadPrefixLength);
        }
        for r in m[wire::DICT_STATS_HEADER_LEN..].chunks_exact(2 * alen + 4) {
            let (client, server) = (read_ip(r, v4), read_ip(&r[alen..], v4));
            let pair = Pair::new(client, cl, server, sl).map_err(|_| AdvertisementError::BadPrefixLength)?;
            if pair.client != client || pair.server != server {
                return Err(AdvertisementError::HostBitsSet);
            }
            adv.stats.push(DictStats { pair, member, saved_decayed: from_wire(&r[2 * alen..])?, epoch });
        }
    }
    Ok(adv)
}

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

/// Settings of the affinity engine; the same on every member.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AffinityConfig {
    /// What makes a pair.
    pub granularity: PairGranularity,
    /// Half-life of the decayed savings (cluster-wide; default 300 s).
    pub half_life: Duration,
    /// A member qualifies when its load is at most this times the average (default 1.25, at least 1).
    pub load_bound: f64,
    /// A pair no member has a dictionary for goes only to members at most this times the average
    /// load (default 1.1, between 1 and `load_bound`): it keeps headroom on the members whose
    /// dictionaries attract traffic, so their own pairs do not spill.
    pub new_pair_bound: f64,
    /// Headroom in load units (connections) that every bound grants above the average at least
    /// (default 0): with few connections, `1.25 x` a small average is less than one connection,
    /// and a pair's own next connection would already count as over the bound.
    pub load_slack: f64,
    /// Statistics not re-advertised for this long are ignored (default 1 h).
    pub max_age: Duration,
    /// Load reports older than this count as unknown (default 10 s).
    pub max_load_age: Duration,
    /// A member has a dictionary for a pair when its decayed saving exceeds this (default 0).
    pub min_score: f64,
    /// Most pairs tracked (default 262144); the coldest are evicted beyond.
    pub max_pairs: u64,
    /// Pairs untouched for this long (wall clock) are dropped to free memory (default 1 h).
    pub idle_expiry: Duration,
}

impl Default for AffinityConfig {
    fn default() -> Self {
        AffinityConfig {
            granularity: PairGranularity::default(),
            half_life: Duration::from_secs(300),
            load_bound: 1.25,
            new_pair_bound: 1.1,
            load_slack: 0.0,
            max_age: Duration::from_secs(3600),
            max_load_age: Duration::from_secs(10),
            min_score: 0.0,
            max_pairs: 262_144,
            idle_expiry: Duration::from_secs(3600),
        }
    }
}

/// Why a flow got its owner; counted per reason.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Reason {
    /// The member with the best dictionary for the pair, within the load bound.
    Affinity,
    /// The best dictionary is on a member over the load bound; the best one within it.
    AffinityNextBest,
    /// Only members over the load bound have a dictionary: rendezvous over those within it.
    AffinityLoadBoundFallback,
    /// No live member has a dictionary for the pair: rendezvous over those within the new-pair bound.
    RendezvousNoDictionary,
    /// No live member was given: the deciding member keeps the flow.
    LocalNoLiveMembers,
}

impl Reason {
    /// Every reason, in counter order.
    pub const ALL: [Reason; 5] = [
        Reason::Affinity,
        Reason::AffinityNextBest,
        Reason::AffinityLoadBoundFallback,
        Reason::RendezvousNoDictionary,
        Reason::LocalNoLiveMembers,
    ];

    /// Short stable name for metrics and `/flows`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Reason::Affinity => "affinity",
            Reason::AffinityNextBest => "affinity_next_best_load_bound",
            Reason::AffinityLoadBoundFallback => "affinity_load_bound_fallback",
            Reason::RendezvousNoDictionary => "rendezvous_no_dictionary",
            Reason::LocalNoLiveMembers => "local_no_live_members",
        }
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The engine's decision for a pair.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Decision {
    /// The chosen owner.
    pub owner: MemberId,
    /// Why.
    pub reason: Reason,
    /// The owner's decayed saving for the pair (0 for a rendezvous choice).
    pub score: f64,
}

/// Members as a 256-bit set, visited in id order whatever order they were given in.
#[derive(Clone, Copy, Default, PartialEq, Eq)]
struct MemberSet([u64; 4]);

impl MemberSet {
    fn of(members: &[MemberId]) -> Self {
        let mut s = MemberSet::default();
        members.iter().for_each(|&m| s.insert(m));
        s
    }
    fn insert(&mut self, m: MemberId) {
        self.0[usize::from(m.0 >> 6)] |= 1 << (m.0 & 63);
    }
    fn contains(&self, m: MemberId) -> bool {
        self.0[usize::from(m.0 >> 6)] & (1 << (m.0 & 63)) != 0
    }
    fn is_empty(&self) -> bool {
        self.0 == [0; 4]
    }
    fn iter(self) -> impl Iterator<Item = MemberId> {
        self.0.into_iter().enumerate().flat_map(|(w, mut bits)| {
            std::iter::from_fn(move || {
                let b = bits.trailing_zeros();
                (bits != 0).then(|| {
                    bits &= bits - 1;
                    MemberId((w as u32 * 64 + b) as u8)
                })
            })
        })
    }
    /// The members into `buf`, for handing a slice to [`rendezvous`].
    fn fill<'a>(&self, buf: &'a mut [MemberId; 256]) -> &'a [MemberId] {
        let mut n = 0;
        for m in self.iter() {
            buf[n] = m;
            n += 1;
        }
        &buf[..n]
    }
}

/// One member's advertised saving for one pair.
#[derive(Clone, Copy, Debug)]
struct Slot {
    member: MemberId,
    epoch: u32,
    at: Instant,
    saved: f64,
}

impl Slot {
    /// The newer of two advertisements: higher epoch, then later arrival, then larger saving
    /// (a total order, so merging is commutative and the result independent of arrival order).
    fn newer(self, other: Slot) -> Slot {
        let ka = (self.epoch, self.at);
        let kb = (other.epoch, other.at);
        if ka > kb || (ka == kb && self.saved.total_cmp(&other.saved).is_ge()) {
            self
        } else {
            other
        }
    }
}

#[derive(Clone, Copy, Default)]
struct MemberView {
    epoch: Option<u32>,
    load: Option<(Instant, f64)>,
}

struct View {
    clock: Option<Instant>,
    members: Vec<MemberView>,
}

impl View {
    fn advance(&mut self, now: Instant) {
        self.clock = Some(self.clock.map_or(now, |c| c.max(now)));
    }
}

/// Which live members are within the load bound, and the figures behind it.
struct Bound {
    within: MemberSet,
    /// Within the bound for new pairs (`new_pair_bound`).
    cool: MemberSet,
    average: Option<f64>,
    limit: Option<f64>,
}

/// The dictionary-affinity owner policy; shared by reference (`&self`) with the data plane.
pub struct AffinityEngine {
    config: AffinityConfig,
    decay: Decay,
    pairs: Cache<Pair, Arc<[Slot]>>,
    view: RwLock<View>,
    counters: [AtomicU64; Reason::ALL.len()],
}

impl AffinityEngine {
    /// An engine with no statistics yet (it decides by rendezvous until advertisements come).
    pub fn new(config: AffinityConfig) -> Self {
        let mut config = config;
        if config.load_bound.is_nan() || config.load_bound < 1.0 {
            config.load_bound = 1.0;
        }
        config.new_pair_bound =
            if config.new_pair_bound.is_nan() { 1.0 } else { config.new_pair_bound.clamp(1.0, config.load_bound) };
        if config.min_score.is_nan() || config.min_score < 0.0 {
            config.min_score = 0.0;
        }
        if !config.load_slack.is_finite() || config.load_slack < 0.0 {
            config.load_slack = 0.0;
        }
        let pairs = Cache::builder()
            .max_capacity(config.max_pairs)
            .time_to_idle(config.idle_expiry.max(Duration::from_secs(1)));
        AffinityEngine {
            decay: Decay::new(config.half_life),
            pairs: pairs.build(),
            view: RwLock::new(View { clock: None, members: vec![MemberView::default(); 256] }),
            counters: Default::default(),
            config,
        }
    }

    /// The settings in force (a load bound below 1 is raised to 1, a negative `min_score` to 0).
    pub fn config(&self) -> &AffinityConfig {
        &self.config
    }

    /// The pair a new flow belongs to, at this engine's granularity.
    pub fn pair(&self, connection: &Connection) -> Pair {
        Pair::of(connection, &self.config.granularity)
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, View> {
        self.view.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, View> {
        self.view.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Moves the engine's clock (used for decay and ages) forward to `now`.
    pub fn advance(&self, now: Instant) {
        self.write().advance(now);
    }

    /// Takes dictionary statistics that arrived at `now`.
    pub fn observe(&self, now: Instant, stats: &[DictStats]) {
        {
            let mut v = self.write();
            v.advance(now);
            for s in stats {
                let e = &mut v.members[usize::from(s.member.0)].epoch;
                *e = Some(e.map_or(s.epoch, |c| c.max(s.epoch)));
            }
        }
        for s in stats {
            let slot = Slot { member: s.member, epoch: s.epoch, at: now, saved: quantize(s.saved_decayed) };
            self.pairs.entry(s.pair).and_upsert_with(|old| {
                let mut slots: Vec<Slot> = old.map_or_else(Vec::new, |e| e.into_value().to_vec());
                match slots.binary_search_by_key(&slot.member, |x| x.member) {
                    Ok(i) => slots[i] = slots[i].newer(slot),
                    Err(i) => slots.insert(i, slot),
                }
                slots.into()
            });
        }
    }

    /// Takes load reports that arrived at `now` (the latest report of a member counts).
    pub fn observe_loads(&self, now: Instant, loads: &[LoadReport]) {
        let mut v = self.write();
        v.advance(now);
        for l in loads {
            let new = (now, quantize(l.load));
            let cur = &mut v.members[usize::from(l.member.0)].load;
            // Later arrival wins; at the same time the larger load, so the order of arrival does not matter.
            *cur = Some(match *cur {
                Some(old) if old.0 > new.0 || (old.0 == new.0 && old.1 >= new.1) => old,
                _ => new,
            });
        }
    }

    /// Takes a decoded advertisement that arrived at `now`.
    pub fn apply(&self, now: Instant, adv: &Advertisement) {
        self.observe(now, &adv.stats);
        self.observe_loads(now, &adv.loads);
    }

    /// Pairs currently tracked (approximate: evictions are applied lazily).
    pub fn pairs_tracked(&self) -> u64 {
        self.pairs.entry_count()
    }

    fn load_of(&self, v: &View, m: MemberId) -> Option<f64> {
        let clock = v.clock?;
        let (at, load) = v.members[usize::from(m.0)].load?;
        (clock.saturating_duration_since(at) <= self.config.max_load_age).then_some(load)
    }

    fn bound(&self, v: &View, live: MemberSet) -> Bound {
        let (mut sum, mut n) = (0.0, 0u32);
        for m in live.iter() {
            if let Some(l) = self.load_of(v, m) {
                sum += l;
                n += 1;
            }
        }
        if n == 0 {
            return Bound { within: live, cool: live, average: None, limit: None };
        }
        let average = sum / f64::from(n);
        let slack = self.config.load_slack;
        let limit = (self.config.load_bound * average).max(average + slack);
        let cool_limit = (self.config.new_pair_bound * average).max(average + slack);
        let (mut within, mut cool) = (MemberSet::default(), MemberSet::default());
        for m in live.iter() {
            let load = self.load_of(v, m);
            if load.is_none_or(|l| l <= limit) {
                within.insert(m);
            }
            if load.is_none_or(|l| l <= cool_limit) {
                cool.insert(m);
            }
        }
        // Rounding could leave no member at or below the average.
        if within.is_empty() {
            within = live;
        }
        if cool.is_empty() {
            cool = within;
        }
        Bound { within, cool, average: Some(average), limit: Some(limit) }
    }

    /// The member's current decayed saving for the pair, if it counts as a dictionary.
    fn score(&self, v: &View, s: &Slot) -> Option<f64> {
        let clock = v.clock?;
        let age = clock.saturating_duration_since(s.at);
        if v.members[usize::from(s.member.0)].epoch != Some(s.epoch) || age > self.config.max_age {
            return None;
        }
        let score = s.saved * self.decay.factor(age);
        (score > self.config.min_score).then_some(score)
    }

    /// The decision for `pair` among `live`, without counting it.
    pub fn decide(&self, pair: &Pair, live: &[MemberId], me: MemberId) -> Decision {
        let live = MemberSet::of(live);
        if live.is_empty() {
            return Decision { owner: me, reason: Reason::LocalNoLiveMembers, score: 0.0 };
        }
        let slots = self.pairs.get(pair);
        let v = self.read();
        let bound = self.bound(&v, live);
        // Best score over all live members and over those within the bound, with their ties.
        let (mut best_any, mut best_in, mut tied_in) = (0.0f64, 0.0f64, MemberSet::default());
        for s in slots.iter().flat_map(|s| s.iter()).filter(|s| live.contains(s.member)) {
            let Some(score) = self.score(&v, s) else { continue };
            best_any = best_any.max(score);
            if bound.within.contains(s.member) {
                if score > best_in {
                    (best_in, tied_in) = (score, MemberSet::default());
                }
                if score == best_in {
                    tied_in.insert(s.member);
                }
            }
        }
        drop(v);
        let mut buf_key = [0; PAIR_KEY_MAX];
        let key = pair.key_into(&mut buf_key);
        let mut buf = [MemberId(0); 256];
        let (set, reason, score) = if tied_in.is_empty() {
            if best_any > 0.0 {
                (bound.within, Reason::AffinityLoadBoundFallback, 0.0)
            } else {
                (bound.cool, Reason::RendezvousNoDictionary, 0.0)
            }
        } else if best_in >= best_any {
            (tied_in, Reason::Affinity, best_in)
        } else {
            (tied_in, Reason::AffinityNextBest, best_in)
        };
        let owner = rendezvous(key, set.fill(&mut buf)).unwrap_or(me);
        Decision { owner, reason, score }
    }

    /// The decision for `pair`, counted by reason.
    pub fn decide_counted(&self, pair: &Pair, live: &[MemberId], me: MemberId) -> Decision {
        let d = self.decide(pair, live, me);
        let i = Reason::ALL.iter().position(|&r| r == d.reason).unwrap_or(0);
        self.counters[i].fetch_add(1, Ordering::Relaxed);
        d
    }

    /// Decisions made through [`OwnerPolicy::choose`] and [`Self::decide_counted`], by reason.
    pub fn decisions(&self) -> Vec<(Reason, u64)> {
        Reason::ALL.iter().zip(&self.counters).map(|(&r, c)| (r, c.load(Ordering::Relaxed))).collect()
    }

    /// Why `pair` goes where it goes among `live` (for `GET /flows`): loads, bound, scores.
    pub fn explain(&self, pair: &Pair, live: &[MemberId]) -> String {
        let me = live.first().copied().unwrap_or(MemberId(0));
        let d = self.decide(pair, live, me);
        let set = MemberSet::of(live);
        let slots = self.pairs.get(pair);
        let v = self.read();
        let bound = self.bound(&v, set);
        let mut out = format!("pair {pair}: owner {} ({}", d.owner.0, d.reason);
        if d.score > 0.0 {
            let _ = write!(out, ", {:.0} bytes saved, decayed", d.score);
        }
        out.push(')');
        match (bound.average, bound.limit) {
            (Some(avg), Some(limit)) => {
                let _ = write!(
                    out,
                    "; load bound {} x average {avg:.1} (slack {}) = {limit:.1} (new pairs {:.1})",
                    self.config.load_bound,
                    self.config.load_slack,
                    (self.config.new_pair_bound * avg).max(avg + self.config.load_slack)
                );
            }
            _ => out.push_str("; no load reports, every member within the bound"),
        }
        let mut key = [0; PAIR_KEY_MAX];
        let key = pair.key_into(&mut key);
        let mut rest: Vec<MemberId> = set.iter().collect();
        let mut order = Vec::new();
        while let Some(m) = rendezvous(key, &rest) {
            order.push(m.0.to_string());
            rest.retain(|&x| x != m);
        }
        let _ = write!(out, "; rendezvous order {}", order.join(","));
        for m in set.iter() {
            let _ = write!(out, "\n  member {}: ", m.0);
            match self.load_of(&v, m) {
                Some(l) => {
                    let _ = write!(out, "load {l:.1}");
                }
                None => out.push_str("load unknown"),
            }
            out.push_str(if bound.within.contains(m) { " (within bound), " } else { " (over bound), " });
            let slot = slots.iter().flat_map(|s| s.iter()).find(|s| s.member == m);
            match (slot, slot.and_then(|s| self.score(&v, s))) {
                (Some(s), Some(score)) => {
                    let age = v.clock.map_or(Duration::ZERO, |c| c.saturating_duration_since(s.at));
                    let _ = write!(
                        out,
                        "{score:.0} bytes saved (decayed; epoch {}, advertised {:.1} s ago)",
                        s.epoch,
                        age.as_secs_f64()
                    );
                }
                (Some(s), None) => {
                    let _ =
                        write!(out, "no usable dictionary (epoch {}, saved {:.0} when advertised)", s.epoch, s.saved);
                }
                (None, _) => out.push_str("no dictionary advertised"),
            }
        }
        out
    }
}

impl OwnerPolicy for AffinityEngine {
    fn name(&self) -> &'static str {
        "affinity"
    }

    fn choose(&self, connection: &Connection, live: &[MemberId], me: MemberId) -> Choice {
        let d = self.decide_counted(&self.pair(connection), live, me);
        Choice { owner: d.owner, reason: d.reason.as_str() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v4(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn pair_masks_the_client_to_its_site() {
        let g = PairGranularity::default();
        let c = |src: &str| {
            Connection::new(cluster_proto::Protocol::Tcp, src.parse().unwrap(), "198.51.100.7:443".parse().unwrap())
                .unwrap()
        };
        let a = Pair::of(&c("192.0.2.10:1000"), &g);
        assert_eq!(a, Pair::of(&c("192.0.2.200:2000"), &g));
        assert_ne!(a, Pair::of(&c("192.0.3.10:1000"), &g));
        assert_eq!(a.to_string(), "192.0.2.0/24 -> 198.51.100.7/32");
        let v6 = Connection::new(
            cluster_proto::Protocol::Udp,
            "[2001:db8:1:2:3::9]:53".parse().unwrap(),
            "[2001:db8::1]:53".parse().unwrap(),
        )
        .unwrap();
        assert_eq!(Pair::of(&v6, &g).to_string(), "2001:db8:1:2::/64 -> 2001:db8::1/128");
        assert_eq!(Pair::new(v4("192.0.2.1"), 33, v4("192.0.2.2"), 32), Err(InvalidPair));
        assert_eq!(Pair::new(v4("192.0.2.1"), 0, v4("192.0.2.2"), 0).unwrap().client(), v4("0.0.0.0"));
    }

    #[test]
    fn decay_halves_per_half_life_and_sums_in_any_order() {
        let d = Decay::new(Duration::from_secs(10));
        assert_eq!(d.factor(Duration::ZERO), 1.0);
        assert!((d.factor(Duration::from_secs(10)) - 0.5).abs() < 1e-12);
        assert!((d.factor(Duration::from_secs(30)) - 0.125).abs() < 1e-12);
        assert_eq!(Decay::new(Duration::ZERO).factor(Duration::from_nanos(1)), 0.0);
        let t0 = Instant::now();
        let t = |s| t0 + Duration::from_secs(s);
        let mut a = DecayedBytes::new(t0);
        a.add(&d, t(0), 1000.0);
        a.add(&d, t(10), 1000.0);
        assert!((a.value_at(&d, t(10)) - 1500.0).abs() < 1e-9);
        assert!((a.value_at(&d, t(20)) - 750.0).abs() < 1e-9);
        let mut b = DecayedBytes::new(t0);
        b.add(&d, t(10), 1000.0);
        b.add(&d, t(0), 1000.0);
        assert!((a.value_at(&d, t(20)) - b.value_at(&d, t(20))).abs() < 1e-9);
    }

    #[test]
    fn member_set_visits_in_id_order() {
        let ids = [255, 0, 64, 63, 7, 64].map(MemberId);
        let set = MemberSet::of(&ids);
        let got: Vec<u8> = set.iter().map(|m| m.0).collect();
        assert_eq!(got, [0, 7, 63, 64, 255]);
        let mut buf = [MemberId(0); 256];
        assert_eq!(set.fill(&mut buf).len(), 5);
        assert!(MemberSet::of(&[]).is_empty() && MemberSet::of(&[]).iter().next().is_none());
    }

    #[test]
    fn slot_merge_is_commutative() {
        let t0 = Instant::now();
        let s = |epoch, secs, saved| Slot { member: MemberId(1), epoch, at: t0 + Duration::from_secs(secs), saved };
        let all = [s(1, 5, 10.0), s(2, 1, 3.0), s(2, 1, 4.0), s(1, 9, 50.0)];
        let fold = |order: &[usize]| order.iter().map(|&i| all[i]).reduce(Slot::newer).unwrap();
        let want = fold(&[0, 1, 2, 3]);
        assert_eq!((want.epoch, want.saved), (2, 4.0));
        for order in [[3, 2, 1, 0], [1, 3, 0, 2], [2, 0, 3, 1]] {
            let got = fold(&order);
            assert_eq!((got.epoch, got.at, got.saved), (want.epoch, want.at, want.saved));
        }
    }

    #[test]
    fn quantize_matches_the_wire() {
        assert_eq!(quantize(f64::NAN), 0.0);
        assert_eq!(quantize(-3.0), 0.0);
        assert_eq!(quantize(1e300), f64::from(f32::MAX));
        assert_eq!(quantize(0.1), f64::from(0.1f32));
    }

    #[test]
    fn length_needs_only_the_header() {
        assert_eq!(advertisement_len(&[]), Ok(None));
        assert_eq!(advertisement_len(&[5]), Ok(None));
        assert_eq!(advertisement_len(&[5, 1]), Ok(Some(8)));
        assert_eq!(advertisement_len(&[4, 1, 0, 1, 0, 0, 0, 0, 24, 32]), Ok(None));
        assert_eq!(advertisement_len(&[4, 1, 0, 1, 0, 0, 0, 0, 24, 32, 0, 2]), Ok(Some(36)));
        assert_eq!(advertisement_len(&[4, 1, 0, 2, 0, 0, 0, 0, 64, 128, 0, 1]), Ok(Some(48)));
        assert_eq!(advertisement_len(&[1]), Err(AdvertisementError::UnknownMessageType(1)));
        assert_eq!(advertisement_len(&[4, 2]), Err(AdvertisementError::UnknownAction(2)));
        assert_eq!(
            advertisement_len(&[4, 1, 0, 3, 0, 0, 0, 0, 0, 0, 0, 0]),
            Err(AdvertisementError::UnknownAddressFamily(3))
        );
        assert_eq!(
            advertisement_len(&[4, 1, 0, 1, 0, 0, 0, 0, 0, 0, 0x10, 1]),
            Err(AdvertisementError::TooManyRecords(4097))
        );
    }

    #[test]
    fn decode_rejects_host_bits_and_bad_values() {
        let pair = Pair::new(v4("192.0.2.0"), 24, v4("198.51.100.1"), 32).unwrap();
        let ok = encode_advertisement(&[DictStats { pair, member: MemberId(3), saved_decayed: 5.0, epoch: 7 }], &[]);
        assert_eq!(ok.len(), 24);
        assert!(decode_advertisement(&ok).is_ok());
        let mut bad = ok.clone();
        bad[15] = 1; // 192.0.2.1/24
        assert_eq!(decode_advertisement(&bad), Err(AdvertisementError::HostBitsSet));
        let mut bad = ok.clone();
        bad[20..24].copy_from_slice(&f32::NAN.to_be_bytes());
        assert_eq!(decode_advertisement(&bad), Err(AdvertisementError::BadValue));
        let mut bad = ok.clone();
        bad[8] = 33;
        assert_eq!(decode_advertisement(&bad), Err(AdvertisementError::BadPrefixLength));
        assert_eq!(decode_advertisement(&ok[..23]), Err(AdvertisementError::Truncated));
    }
}
