//! Chained proxies (paper section 1.2, Fig. 2): a *downstream* proxy and an *upstream* proxy of
//! the farm keep parallel dictionaries of the traffic between them and replace repeated bytes
//! with small tokens (the `dictionary-affinity` codec). The chain protocol is in docs/codec.md,
//! section 11.
//!
//! - The downstream chains connections to `chain_ports`: it connects to the original
//!   destination (a load balancer on the way picks the upstream), says HELLO, and needs a HELLO
//!   back; without one it fails the connection, it never guesses.
//! - The upstream waits up to `detect` for the first client bytes: a HELLO makes the connection
//!   chained; anything else (or silence, for server-first protocols) is relayed untouched.
//! - Requests are encoded by the downstream and decoded by the upstream, responses the other
//!   way; NACKs travel in the opposite direction's codec stream.
//!
//! The protocol state lives in [`wire`] (HELLO, records) and [`dicts`] (pair dictionaries); the
//! functions here only move bytes between sockets, generic over tokio's `AsyncRead + AsyncWrite`.

pub mod dicts;
pub mod wire;

use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use dictionary_affinity::codec::RepairError;
use dictionary_affinity::{DecodeError, Decoder, DecoderConfig, Encoder, EncoderConfig, Event, Nack};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::relay::{self, Activity, Ended, Meter};
use dicts::{Checkout, Dictionaries, PairStores, SharedPair};
use wire::{Hello, Mode, Record, Records, FLAG_AVAILABLE, FLAG_SHARED, HELLO_MAGIC, REC_DONE, REC_END};

/// Input bytes read per call (the encoder cuts chunks across reads).
const READ_BUF: usize = 64 * 1024;
/// The encoder delivers its pending bytes (`Encoder::flush_soft`: chunk boundaries do not move)
/// when its input has been quiet this long; the hard `flush` is kept for the input's end.
pub const FLUSH_AFTER: Duration = Duration::from_millis(2);
/// How long a connection waits for its pair's dictionaries while another connection holds
/// them, before it runs on throwaway ones: long enough for the previous connection of a
/// sequence to finish closing, short enough not to delay truly concurrent ones much.
pub const CHECKOUT_WAIT: Duration = Duration::from_millis(50);
/// How long a decoder on a pair's shared dictionaries waits for a chunk that another
/// connection of the pair defines (its DEFINE still on the way) before it asks for the chunk
/// itself (NACK, answered by REPAIR). It stalls only this connection's output.
pub const SHARED_WAIT: Duration = Duration::from_millis(250);
/// Recently referenced chunks an encoder on shared dictionaries keeps for REPAIR (per
/// connection; chunks still in the store cost nothing extra).
const SHARED_REPAIR_WINDOW: usize = 4 << 20;
/// How often an upstream reports savings of a long connection to the [`SavingsSink`].
pub const SAVINGS_EVERY: Duration = Duration::from_secs(1);
/// Server-first bytes buffered by an upstream while it waits for the client's first bytes.
const MAX_SERVER_FIRST: usize = 1 << 20;

/// Where the upstream role reports what the chain saved, per chained connection (the affinity
/// engine's `SavingsLedger` is meant to sit behind it).
pub trait SavingsSink: Send + Sync {
    /// `bytes_saved` more bytes (plain minus wire, both directions) did not cross the link for
    /// the connection `client` -> `server` as the upstream sees it (the spoofed client address
    /// and the original destination).
    fn record(&self, client: SocketAddr, server: SocketAddr, bytes_saved: u64);
}

/// Which end of the chain this proxy is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Encodes requests to `chain_ports`, decodes responses.
    Downstream,
    /// Detects chained connections, decodes requests, encodes responses.
    Upstream,
}

/// The chain settings of a proxy (`[proxy]` keys `role`, `chain_ports`, `detect_ms`, ...).
#[derive(Clone)]
pub struct ChainConfig {
    /// Downstream or upstream.
    pub role: Role,
    /// Downstream: intercepted destination ports whose connections are chained.
    pub chain_ports: Vec<u16>,
    /// Upstream: how long to wait for a client's first bytes before relaying plain.
    pub detect: Duration,
    /// How long the HELLO / MODE exchange may take once started.
    pub hello_timeout: Duration,
    /// Per pair and direction dictionary budget in bytes (must be equal on both ends).
    pub budget: u64,
    /// Save the pair dictionaries here (at shutdown and every [`SAVE_EVERY`]), load at start.
    pub dictionary_dir: Option<PathBuf>,
    /// This proxy's identity in HELLO (the peer keys its dictionaries by it).
    pub id: String,
    /// zstd for LITERAL / DEFINE / REPAIR bodies.
    pub zstd: bool,
    /// Offer (HELLO flag) and accept pair dictionaries shared by all of a pair's concurrent
    /// connections; off, every connection checks the pair's dictionaries out alone.
    pub shared: bool,
    /// Most pair dictionaries held at once (the least recently used idle pair makes room).
    pub max_pairs: usize,
    /// Upstream: where savings are reported.
    pub savings: Option<Arc<dyn SavingsSink>>,
    /// Highest codec framing version this proxy decodes, announced in its HELLO
    /// (`dictionary_affinity::codec::VERSION`; lower only to pin a version, e.g. in tests that
    /// stand in for an older build). Each side encodes the lower of its own and the peer's.
    pub codec_version: u8,
}

/// How often changed dictionaries are saved when `dictionary_dir` is set.
pub const SAVE_EVERY: Duration = Duration::from_secs(30);

impl std::fmt::Debug for ChainConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChainConfig")
            .field("role", &self.role)
            .field("chain_ports", &self.chain_ports)
            .field("detect", &self.detect)
            .field("budget", &self.budget)
            .field("dictionary_dir", &self.dictionary_dir)
            .field("id", &self.id)
            .field("zstd", &self.zstd)
            .field("shared", &self.shared)
            .field("max_pairs", &self.max_pairs)
            .field("savings", &self.savings.is_some())
            .field("codec_version", &self.codec_version)
            .finish()
    }
}

/// Counters of the chain role, shared with the metrics.
#[derive(Debug)]
pub struct ChainStats {
    /// The role these counters belong to.
    pub role: Role,
    /// Connections that ran the codec and ended cleanly.
    pub chained: AtomicU64,
    /// Connections relayed plain (not to a chain port, no HELLO, or budgets differ).
    pub plain: AtomicU64,
    /// Connections that failed: no HELLO from the far end, a decode error, a protocol error.
    pub failed: AtomicU64,
    /// Chained connections that ran on throwaway dictionaries because the pair's were busy.
    pub ephemeral: AtomicU64,
    /// Request direction, plain bytes (client side of the downstream, server side of the upstream).
    pub to_upstream_plain: AtomicU64,
    /// Request direction, bytes on the chain link.
    pub to_upstream_wire: AtomicU64,
    /// Response direction, plain bytes.
    pub to_downstream_plain: AtomicU64,
    /// Response direction, bytes on the chain link.
    pub to_downstream_wire: AtomicU64,
    /// Epoch resets started by this side's encoders.
    pub resets: AtomicU64,
    /// NACKs this side's decoders sent.
    pub nacks_sent: AtomicU64,
    /// NACKs this side's encoders received.
    pub nacks_received: AtomicU64,
    /// Codec streams that failed to decode (corruption, abort, budget mismatch).
    pub decode_errors: AtomicU64,
    /// Bytes held by all pair dictionaries (a gauge, as of the last check-in).
    pub dictionary_bytes: AtomicU64,
    /// Pair dictionaries written to `dictionary_dir`.
    pub saves: AtomicU64,
    /// Chained connections on shared pair dictionaries (also counted in `chained`).
    pub shared: AtomicU64,
    /// Shared dictionaries: references whose chunk arrived on another connection while the
    /// decoder waited for it.
    pub waits_arrived: AtomicU64,
    /// Shared dictionaries: waits that ran out ([`SHARED_WAIT`]); the chunk was fetched by NACK.
    pub waits_fetched: AtomicU64,
    /// Pair dictionaries dropped to make room for a new pair (`max_pairs`).
    pub pairs_evicted: Arc<AtomicU64>,
    /// Chained connections whose encoder wrote an older codec version than this build's
    /// newest, because the peer's HELLO (or `codec_version`) said no more (a chain mid-upgrade).
    pub older_codec: AtomicU64,
}

impl ChainStats {
    /// All zero.
    pub fn new(role: Role) -> Self {
        let z = || AtomicU64::new(0);
        Self {
            role,
            chained: z(),
            plain: z(),
            failed: z(),
            ephemeral: z(),
            to_upstream_plain: z(),
            to_upstream_wire: z(),
            to_downstream_plain: z(),
            to_downstream_wire: z(),
            resets: z(),
            nacks_sent: z(),
            nacks_received: z(),
            decode_errors: z(),
            dictionary_bytes: z(),
            saves: z(),
            shared: z(),
            waits_arrived: z(),
            waits_fetched: z(),
            pairs_evicted: Arc::default(),
            older_codec: z(),
        }
    }
}

impl Role {
    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Downstream => "downstream",
            Role::Upstream => "upstream",
        }
    }
}

/// Why a chained connection failed.
#[derive(Debug, thiserror::Error)]
pub enum ChainError {
    /// A socket failed.
    #[error("i/o: {0}")]
    Io(#[from] io::Error),
    /// The downstream got no HELLO back: no upstream on the path.
    #[error("no chain HELLO from the far end: {0}")]
    NoUpstream(&'static str),
    /// A HELLO that does not parse.
    #[error("bad HELLO: {0}")]
    BadHello(&'static str),
    /// The chain records or handshake are wrong.
    #[error("chain protocol: {0}")]
    Protocol(&'static str),
    /// The incoming codec stream does not decode.
    #[error("decode: {0}")]
    Decode(#[from] DecodeError),
    /// A NACK could not be repaired (ABORT sent).
    #[error("repair: {0}")]
    Repair(#[from] RepairError),
    /// A step of the handshake took too long.
    #[error("timed out: {0}")]
    Timeout(&'static str),
}

/// How a connection handled by the chain ended well.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Ran the codec both ways.
    Chained,
    /// Relayed untouched: bytes relayed towards the server and towards the client.
    Plain {
        /// Client to server.
        to_server: u64,
        /// Server to client.
        to_client: u64,
    },
    /// Closed by the idle timeout.
    Idle,
}

/// The chain role of one proxy: settings, pair dictionaries and counters.
#[derive(Debug)]
pub struct Chain {
    config: ChainConfig,
    dicts: Dictionaries,
    stats: Arc<ChainStats>,
}

/// Per-connection byte counts.
#[derive(Debug, Default)]
struct ConnBytes {
    up_plain: AtomicU64,
    up_wire: AtomicU64,
    down_plain: AtomicU64,
    down_wire: AtomicU64,
    /// The connection runs on the pair's own dictionaries (MODE persistent or shared): only
    /// then are its savings the dictionary's, worth advertising.
    persistent: std::sync::atomic::AtomicBool,
    /// When a byte last moved either way, on either side (the idle timeout).
    activity: Activity,
}

impl ConnBytes {
    /// A counter of this connection with its role-wide twin.
    fn meter<'a>(&'a self, mine: &'a AtomicU64, total: &'a AtomicU64) -> Meter<'a> {
        Meter { mine, total: Some(total), activity: &self.activity }
    }

    /// A counter of this connection alone (a plain relay's bytes go to the proxy's totals
    /// when it ends).
    fn own<'a>(&'a self, mine: &'a AtomicU64) -> Meter<'a> {
        Meter { mine, total: None, activity: &self.activity }
    }

    /// The connection's counters of each direction (towards the upstream, towards the
    /// downstream), each with its global twin in `stats`.
    fn pipes<'a>(&'a self, stats: &'a ChainStats) -> (Pipe<'a>, Pipe<'a>) {
        (
            Pipe {
                plain: self.meter(&self.up_plain, &stats.to_upstream_plain),
                wire: self.meter(&self.up_wire, &stats.to_upstream_wire),
            },
            Pipe {
                plain: self.meter(&self.down_plain, &stats.to_downstream_plain),
                wire: self.meter(&self.down_wire, &stats.to_downstream_wire),
            },
        )
    }

    /// How a plain relay ended: its bytes each way (client to server is "up").
    fn plain_outcome(&self) -> Outcome {
        Outcome::Plain { to_server: self.up_plain.load(Relaxed), to_client: self.down_plain.load(Relaxed) }
    }

    /// Plain minus wire bytes, both directions (negative while the dictionary fills).
    fn saved(&self) -> i64 {
        let plain = self.up_plain.load(Relaxed) + self.down_plain.load(Relaxed);
        let wire = self.up_wire.load(Relaxed) + self.down_wire.load(Relaxed);
        plain as i64 - wire as i64
    }
}

/// Control messages waiting for the encoding side, at most (see `decode_pump`).
const MAX_PENDING_CONTROL: usize = 1024;

/// What a decoder asks its side's encoder to do.
#[derive(Debug)]
enum Ctrl {
    /// Carry our decoder's NACK to the peer.
    SendNack(Nack),
    /// The peer NACKed our stream: repair.
    HandleNack(Nack),
    /// Our decoder finished the peer's stream: send DONE.
    Done,
    /// The peer finished our stream: no NACK about it can come any more.
    PeerDone,
}

impl Chain {
    /// The chain role, with the pair dictionaries loaded from `dictionary_dir` if set.
    pub fn new(config: ChainConfig) -> Arc<Chain> {
        let stats = Arc::new(ChainStats::new(config.role));
        let dicts = Dictionaries::new(
            config.budget,
            config.dictionary_dir.clone(),
            config.max_pairs,
            Arc::clone(&stats.pairs_evicted),
        );
        stats.dictionary_bytes.store(dicts.used(), Relaxed);
        Arc::new(Chain { config, dicts, stats })
    }

    /// The settings.
    pub fn config(&self) -> &ChainConfig {
        &self.config
    }

    /// The counters.
    pub fn stats(&self) -> Arc<ChainStats> {
        Arc::clone(&self.stats)
    }

    /// Whether a downstream chains connections to this destination port.
    pub fn chains_port(&self, port: u16) -> bool {
        self.config.role == Role::Downstream && self.config.chain_ports.contains(&port)
    }

    /// Saves the changed pair dictionaries not in use (blocking); the number saved.
    pub fn save(&self) -> usize {
        self.dicts.save_changed(&self.stats.saves)
    }

    /// Downstream: runs one connection from `client` over `upstream` (a connection already
    /// made to the original destination). Every outcome is counted; on an error the caller
    /// should close both sockets with a reset, as output may have stopped mid-stream.
    pub async fn downstream<C, U>(
        &self,
        client: &mut C,
        upstream: &mut U,
        idle: Duration,
    ) -> Result<Outcome, ChainError>
    where
        C: AsyncRead + AsyncWrite + Unpin,
        U: AsyncRead + AsyncWrite + Unpin,
    {
        let conn = ConnBytes::default();
        let r = with_idle(self.downstream_inner(client, upstream, &conn), &conn, idle).await;
        self.count(&r);
        r
    }

    /// Upstream: runs one intercepted connection `client` (from `client_addr`) whose original
    /// destination `server_addr` is already connected as `server`; chained if it starts with a
    /// HELLO, else relayed untouched. With a savings sink, a connection on the pair's own
    /// dictionaries reports what they saved (plain minus wire bytes), every second and at the end.
    pub async fn upstream<C, S>(
        &self,
        client: &mut C,
        server: &mut S,
        client_addr: SocketAddr,
        server_addr: SocketAddr,
        idle: Duration,
    ) -> Result<Outcome, ChainError>
    where
        C: AsyncRead + AsyncWrite + Unpin,
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let conn = ConnBytes::default();
        let run = with_idle(self.upstream_inner(client, server, &conn), &conn, idle);
        let r = match &self.config.savings {
            None => run.await,
            Some(sink) => {
                let mut reported = 0u64;
                let mut report = || {
                    if !conn.persistent.load(Relaxed) {
                        return;
                    }
                    let saved = conn.saved();
                    if saved > reported as i64 {
                        sink.record(client_addr, server_addr, saved as u64 - reported);
                        reported = saved as u64;
                    }
                };
                tokio::pin!(run);
                let mut tick = tokio::time::interval_at(Instant::now() + SAVINGS_EVERY, SAVINGS_EVERY);
                let r = loop {
                    tokio::select! {
                        r = &mut run => break r,
                        _ = tick.tick() => report(),
                    }
                };
                report();
                r
            }
        };
        self.count(&r);
        r
    }

    fn count(&self, r: &Result<Outcome, ChainError>) {
        let s = &self.stats;
        match r {
            Ok(Outcome::Chained) => s.chained.fetch_add(1, Relaxed),
            Ok(Outcome::Plain { .. }) => s.plain.fetch_add(1, Relaxed),
            Ok(Outcome::Idle) => 0,
            Err(e) => {
                if matches!(e, ChainError::Decode(_) | ChainError::Repair(_) | ChainError::Protocol(_)) {
                    s.decode_errors.fetch_add(1, Relaxed);
                }
                s.failed.fetch_add(1, Relaxed)
            }
        };
    }

    fn hello(&self, flags: u8) -> Vec<u8> {
        let mut b = Vec::new();
        Hello { flags, codec: self.config.codec_version, budget: self.config.budget, id: self.config.id.clone() }
            .emit(&mut b);
        b
    }

    async fn downstream_inner<C, U>(&self, client: &mut C, up: &mut U, conn: &ConnBytes) -> Result<Outcome, ChainError>
    where
        C: AsyncRead + AsyncWrite + Unpin,
        U: AsyncRead + AsyncWrite + Unpin,
    {
        let s = &self.stats;
        let hello = self.hello(if self.config.shared { FLAG_SHARED } else { 0 });
        up.write_all(&hello).await?;
        conn.meter(&conn.up_wire, &s.to_upstream_wire).add(hello.len());
        let (peer, rest) = tokio::time::timeout(self.config.hello_timeout, read_hello(up))
            .await
            .map_err(|_| ChainError::NoUpstream("nothing came back in time"))??;
        conn.meter(&conn.down_wire, &s.to_downstream_wire).add(rest.len());
        // The upstream offers FLAG_SHARED only once it holds the pair's shared dictionaries.
        let dicts = if peer.budget != self.config.budget {
            None
        } else if self.config.shared && peer.flags & FLAG_SHARED != 0 {
            Some(self.dicts.shared(&peer.id, CHECKOUT_WAIT).await.map_or(PairDicts::Fresh, PairDicts::Shared))
        } else if peer.flags & FLAG_AVAILABLE != 0 {
            Some(
                self.dicts
                    .checkout_wait(&peer.id, CHECKOUT_WAIT)
                    .await
                    .map_or(PairDicts::Fresh, |c| PairDicts::Own(Box::new(c))),
            )
        } else {
            Some(PairDicts::Fresh)
        };
        let mode = match &dicts {
            None => Mode::Raw,
            Some(PairDicts::Shared(_)) => Mode::Shared,
            Some(PairDicts::Own(_)) => Mode::Persistent,
            Some(PairDicts::Fresh) => Mode::Ephemeral,
        };
        up.write_all(&[mode as u8]).await?;
        conn.meter(&conn.up_wire, &s.to_upstream_wire).add(1);
        tracing::debug!(peer = %peer.id, ?mode, "chained to an upstream");
        let Some(dicts) = dicts else {
            client.write_all(&rest).await?;
            relay::copy_both(client, up, conn.own(&conn.up_plain), conn.own(&conn.down_plain)).await?;
            return Ok(conn.plain_outcome());
        };
        conn.persistent.store(!matches!(dicts, PairDicts::Fresh), Relaxed);
        let mut session = self.session(&peer, dicts, Role::Downstream)?;
        let defined = session.defined();
        let (enc, dec) = session.parts();
        let (to_up, to_down) = conn.pipes(s);
        run_codec(client, up, Vec::new(), rest, enc, dec, defined, to_up, to_down).await?;
        Ok(Outcome::Chained)
    }

    async fn upstream_inner<C, S>(
        &self,
        client: &mut C,
        server: &mut S,
        conn: &ConnBytes,
    ) -> Result<Outcome, ChainError>
    where
        C: AsyncRead + AsyncWrite + Unpin,
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let s = &self.stats;
        let (hello, mut rest, server_first) =
            match detect(client, server, self.config.detect, self.config.hello_timeout).await? {
                Detection::Plain { client_bytes, server_bytes } => {
                    server.write_all(&client_bytes).await?;
                    client.write_all(&server_bytes).await?;
                    conn.up_plain.fetch_add(client_bytes.len() as u64, Relaxed);
                    conn.down_plain.fetch_add(server_bytes.len() as u64, Relaxed);
                    relay::copy_both(server, client, conn.own(&conn.down_plain), conn.own(&conn.up_plain)).await?;
                    return Ok(conn.plain_outcome());
                }
                Detection::Chained { hello, rest, server_first } => (hello, rest, server_first),
            };
        conn.meter(&conn.up_wire, &s.to_upstream_wire).add(wire::HELLO_FIXED + hello.id.len() + rest.len());
        let (mut checkout, mut shared) = (None, None);
        if hello.budget == self.config.budget {
            if self.config.shared && hello.flags & FLAG_SHARED != 0 {
                shared = self.dicts.shared(&hello.id, CHECKOUT_WAIT).await;
            } else {
                checkout = self.dicts.checkout_wait(&hello.id, CHECKOUT_WAIT).await;
            }
        }
        // FLAG_SHARED goes back only when this connection can run shared.
        let ours = self.hello(
            if checkout.is_some() { FLAG_AVAILABLE } else { 0 } | if shared.is_some() { FLAG_SHARED } else { 0 },
        );
        client.write_all(&ours).await?;
        conn.meter(&conn.down_wire, &s.to_downstream_wire).add(ours.len());
        if rest.is_empty() {
            let mut b = [0u8; 1];
            let n = tokio::time::timeout(self.config.hello_timeout, client.read(&mut b))
                .await
                .map_err(|_| ChainError::Timeout("waiting for the MODE byte"))??;
            if n == 0 {
                return Err(ChainError::Protocol("closed before the MODE byte"));
            }
            conn.meter(&conn.up_wire, &s.to_upstream_wire).add(1);
            rest.push(b[0]);
        }
        let mode = Mode::from_byte(rest.remove(0))?;
        let dicts = match (mode, checkout, shared) {
            (Mode::Raw, ..) => {
                server.write_all(&rest).await?;
                client.write_all(&server_first).await?;
                relay::copy_both(server, client, conn.own(&conn.down_plain), conn.own(&conn.up_plain)).await?;
                return Ok(conn.plain_outcome());
            }
            (Mode::Persistent, Some(stores), _) => PairDicts::Own(Box::new(stores)),
            (Mode::Persistent, None, _) => {
                return Err(ChainError::Protocol("persistent MODE without the pair's dictionaries"))
            }
            (Mode::Shared, _, Some(pair)) => PairDicts::Shared(pair),
            (Mode::Shared, _, None) => return Err(ChainError::Protocol("shared MODE without FLAG_SHARED offered")),
            // Dropping the checkout gives the pair's dictionaries back unused.
            (Mode::Ephemeral, ..) => PairDicts::Fresh,
        };
        conn.persistent.store(!matches!(dicts, PairDicts::Fresh), Relaxed);
        let mut session = self.session(&hello, dicts, Role::Upstream)?;
        let defined = session.defined();
        let (enc, dec) = session.parts();
        let (to_up, to_down) = conn.pipes(s);
        run_codec(server, client, server_first, rest, enc, dec, defined, to_down, to_up).await?;
        Ok(Outcome::Chained)
    }

    /// The codec pair of one connection: on the pair's shared dictionaries, its own checked
    /// out, or fresh ones.
    /// The codec pair for a chained connection with the peer that sent `hello`: the encoder
    /// writes the highest framing version both sides decode.
    fn session(&self, hello: &Hello, dicts: PairDicts<'_>, role: Role) -> Result<Session<'_>, ChainError> {
        let peer = hello.id.as_str();
        let version = self.config.codec_version.min(hello.codec);
        if version < dictionary_affinity::codec::VERSION {
            self.stats.older_codec.fetch_add(1, Relaxed);
        }
        let config = EncoderConfig { zstd: self.config.zstd, version, ..EncoderConfig::default() };
        let dec_config = DecoderConfig { max_version: self.config.codec_version, ..DecoderConfig::default() };
        let bad = |_| ChainError::Protocol("encoder configuration");
        let (enc, dec, persistent, shared) = match dicts {
            PairDicts::Shared(pair) => {
                self.stats.shared.fetch_add(1, Relaxed);
                let (e, d) = if role == Role::Downstream {
                    (&pair.to_upstream, &pair.to_downstream)
                } else {
                    (&pair.to_downstream, &pair.to_upstream)
                };
                let config = EncoderConfig { repair_window: SHARED_REPAIR_WINDOW, ..config };
                let enc = Encoder::shared(e.clone(), config).map_err(bad)?;
                let dec = Decoder::shared(d.clone(), dec_config);
                (enc, dec, false, Some(pair))
            }
            own => {
                let stores = match own {
                    PairDicts::Own(checkout) => Some(checkout.take()),
                    _ => None,
                };
                let persistent = stores.is_some();
                if !persistent {
                    self.stats.ephemeral.fetch_add(1, Relaxed);
                }
                let PairStores { to_upstream, to_downstream } =
                    stores.unwrap_or_else(|| PairStores::fresh(self.config.budget));
                let (e, d) =
                    if role == Role::Downstream { (to_upstream, to_downstream) } else { (to_downstream, to_upstream) };
                (Encoder::new(e, config).map_err(bad)?, Decoder::new(d, dec_config), persistent, None)
            }
        };
        Ok(Session { chain: self, peer: peer.to_string(), persistent, shared, role, enc: Some(enc), dec: Some(dec) })
    }
}

/// Which dictionaries a chained connection runs on.
enum PairDicts<'a> {
    /// The pair's, shared with its other connections (MODE shared).
    Shared(SharedPair),
    /// The pair's, checked out for this connection alone (MODE persistent).
    Own(Box<Checkout<'a>>),
    /// Throwaway ones (MODE ephemeral).
    Fresh,
}

/// One connection's encoder and decoder; gives the pair's dictionaries back when dropped,
/// also when the connection's task is aborted (a stream cut short leaves the two sides'
/// dictionaries apart; the next stream header's digest tells, and the codec resets them).
struct Session<'a> {
    chain: &'a Chain,
    peer: String,
    /// On the pair's checked-out dictionaries (given back at the end).
    persistent: bool,
    /// On the pair's shared dictionaries.
    shared: Option<SharedPair>,
    role: Role,
    enc: Option<Encoder>,
    dec: Option<Decoder>,
}

impl Session<'_> {
    fn parts(&mut self) -> (&mut Encoder, &mut Decoder) {
        (self.enc.as_mut().expect("until drop"), self.dec.as_mut().expect("until drop"))
    }

    /// What a decoder on shared dictionaries waits on for chunks of other connections.
    fn defined(&self) -> Option<Arc<tokio::sync::Notify>> {
        self.shared.as_ref().map(|p| Arc::clone(&p.defined))
    }
}

impl Drop for Session<'_> {
    fn drop(&mut self) {
        let (Some(enc), Some(dec)) = (self.enc.take(), self.dec.take()) else { return };
        let s = &self.chain.stats;
        let (es, ds) = (enc.stats(), dec.stats());
        s.resets.fetch_add(es.resets, Relaxed);
        s.nacks_received.fetch_add(es.nacks, Relaxed);
        s.nacks_sent.fetch_add(ds.nacks_sent, Relaxed);
        s.waits_arrived.fetch_add(ds.waited, Relaxed);
        s.waits_fetched.fetch_add(ds.fetched, Relaxed);
        let changed = es.defines + es.references + es.resets + ds.defined_bytes + ds.referenced_bytes + ds.resets > 0;
        if self.shared.is_some() {
            s.dictionary_bytes.store(self.chain.dicts.shared_done(&self.peer, changed), Relaxed);
            return;
        }
        if !self.persistent {
            return;
        }
        let (e, d) = (enc.into_store(), dec.into_store());
        let stores = match self.role {
            Role::Downstream => PairStores { to_upstream: e, to_downstream: d },
            Role::Upstream => PairStores { to_upstream: d, to_downstream: e },
        };
        let used = self.chain.dicts.checkin(&self.peer, stores, changed);
        s.dictionary_bytes.store(used, Relaxed);
    }
}

/// The counters of one direction.
#[derive(Clone, Copy)]
struct Pipe<'a> {
    plain: Meter<'a>,
    wire: Meter<'a>,
}

/// Runs the two codec directions: `plain`'s input is encoded onto `wire`, `wire`'s records
/// are decoded onto `plain`. The prefixes are bytes already read from each side. `defined`:
/// the pair's signal, when the codec runs on shared dictionaries.
#[allow(clippy::too_many_arguments)]
async fn run_codec<P, W>(
    plain: &mut P,
    wire: &mut W,
    plain_prefix: Vec<u8>,
    wire_prefix: Vec<u8>,
    enc: &mut Encoder,
    dec: &mut Decoder,
    defined: Option<Arc<tokio::sync::Notify>>,
    out_dir: Pipe<'_>,
    in_dir: Pipe<'_>,
) -> Result<(), ChainError>
where
    P: AsyncRead + AsyncWrite + Unpin,
    W: AsyncRead + AsyncWrite + Unpin,
{
    let (pr, pw) = tokio::io::split(plain);
    let (wr, ww) = tokio::io::split(wire);
    let (tx, rx) = mpsc::channel(MAX_PENDING_CONTROL);
    let encode = encode_pump(pr, ww, plain_prefix, enc, rx, out_dir);
    let decode = decode_pump(wr, pw, wire_prefix, dec, defined, tx, in_dir);
    // try_join: a failure either way ends the other at once.
    tokio::try_join!(encode, decode).map(|_| ())
}

async fn write_records(
    w: &mut (impl AsyncWrite + Unpin),
    codec: &mut Vec<u8>,
    tail: &[u8],
    pipe: Pipe<'_>,
) -> io::Result<()> {
    if codec.is_empty() && tail.is_empty() {
        return Ok(());
    }
    let mut rec = Vec::with_capacity(codec.len() + 5 + tail.len());
    wire::put_data(&mut rec, codec);
    rec.extend_from_slice(tail);
    w.write_all(&rec).await?;
    pipe.wire.add(rec.len());
    codec.clear();
    Ok(())
}

/// Reads plain input, encodes it; carries NACKs; sends END at input EOF and DONE when our
/// decoder finished; half-closes the wire once no NACK can need an answer any more.
async fn encode_pump(
    mut input: impl AsyncRead + Unpin,
    mut output: impl AsyncWrite + Unpin,
    prefix: Vec<u8>,
    enc: &mut Encoder,
    mut ctrl: mpsc::Receiver<Ctrl>,
    pipe: Pipe<'_>,
) -> Result<(), ChainError> {
    let mut buf = vec![0u8; READ_BUF];
    let mut out = Vec::new();
    let (mut eof, mut done_sent, mut peer_done, mut ctrl_open, mut need_flush) = (false, false, false, true, false);
    if !prefix.is_empty() {
        enc.encode(&prefix, &mut out);
        pipe.plain.add(prefix.len());
        need_flush = true;
    }
    loop {
        write_records(&mut output, &mut out, &[], pipe).await?;
        if eof && done_sent && peer_done {
            output.shutdown().await?;
            return Ok(());
        }
        if !ctrl_open {
            return Err(ChainError::Protocol("the chained connection ended before both streams did"));
        }
        tokio::select! {
            c = ctrl.recv() => match c {
                Some(Ctrl::SendNack(n)) => enc.send_nack(&n, &mut out),
                Some(Ctrl::HandleNack(n)) => {
                    if let Err(e) = enc.handle_nack(&n, &mut out) {
                        // The ABORT is in `out`: let the peer know why before closing.
                        let _ = write_records(&mut output, &mut out, &[], pipe).await;
                        return Err(e.into());
                    }
                }
                Some(Ctrl::Done) => {
                    write_records(&mut output, &mut out, &[REC_DONE], pipe).await?;
                    done_sent = true;
                }
                Some(Ctrl::PeerDone) => peer_done = true,
                None => ctrl_open = false,
            },
            r = input.read(&mut buf), if !eof => {
                let n = r?;
                if n == 0 {
                    enc.flush(&mut out);
                    write_records(&mut output, &mut out, &[REC_END], pipe).await?;
                    eof = true;
                    need_flush = false;
                } else {
                    enc.encode(&buf[..n], &mut out);
                    pipe.plain.add(n);
                    need_flush = true;
                }
            }
            () = tokio::time::sleep(FLUSH_AFTER), if need_flush && !eof => {
                enc.flush_soft(&mut out);
                need_flush = false;
            }
        }
    }
}

/// Reads records from the wire, decodes DATA onto the plain side, turns the decoder's events
/// into work for our encoder, and half-closes the plain side after the peer's END. On shared
/// dictionaries, output that waits for a chunk of another connection resumes when the pair's
/// decoders add chunks (`defined`), or fetches the chunk after [`SHARED_WAIT`].
async fn decode_pump(
    mut input: impl AsyncRead + Unpin,
    mut output: impl AsyncWrite + Unpin,
    prefix: Vec<u8>,
    dec: &mut Decoder,
    defined: Option<Arc<tokio::sync::Notify>>,
    ctrl: mpsc::Sender<Ctrl>,
    pipe: Pipe<'_>,
) -> Result<(), ChainError> {
    let mut records = Records::default();
    records.push(&prefix);
    let mut buf = vec![0u8; READ_BUF];
    let mut out = Vec::new();
    let (mut end, mut finished) = (false, false);
    // The chunk output waits for, and until when.
    let mut wait: Option<(dictionary_affinity::ChunkId, Instant)> = None;
    loop {
        while let Some(rec) = records.next_record()? {
            match rec {
                Record::Data(bytes) => {
                    decode_step(dec, &bytes, &mut out, &mut output, defined.as_deref(), &ctrl, pipe).await?
                }
                Record::End if end => return Err(ChainError::Protocol("a second END")),
                Record::End => end = true,
                Record::Done => control(&ctrl, Ctrl::PeerDone)?,
            }
            if end && !finished && dec.blocked_on().is_none() {
                dec.finish()?;
                output.shutdown().await?;
                finished = true;
                control(&ctrl, Ctrl::Done)?;
            }
        }
        // Output that waited may have resumed without a record (a chunk of another connection).
        if end && !finished && dec.blocked_on().is_none() {
            dec.finish()?;
            output.shutdown().await?;
            finished = true;
            control(&ctrl, Ctrl::Done)?;
        }
        wait = dec.waiting_for().map(|id| match wait {
            Some((w, until)) if w == id => (w, until),
            _ => (id, Instant::now() + SHARED_WAIT),
        });
        let n = match (wait, defined.as_deref()) {
            (Some((_, until)), Some(defined)) => {
                // Registered before the retry, so a chunk added in between still wakes us.
                let added = defined.notified();
                tokio::pin!(added);
                added.as_mut().enable();
                decode_step(dec, &[], &mut out, &mut output, Some(defined), &ctrl, pipe).await?;
                if dec.waiting_for() != wait.map(|(id, _)| id) {
                    // Resolved, or waiting for the next chunk: look again.
                    continue;
                }
                tokio::select! {
                    r = input.read(&mut buf) => r?,
                    () = &mut added => continue,
                    () = tokio::time::sleep_until(until) => {
                        dec.fetch();
                        decode_step(dec, &[], &mut out, &mut output, Some(defined), &ctrl, pipe).await?;
                        continue;
                    }
                }
            }
            _ => input.read(&mut buf).await?,
        };
        if n == 0 {
            if !finished {
                return Err(ChainError::Protocol("the chained connection closed inside a stream"));
            }
            return Ok(());
        }
        pipe.wire.add(n);
        records.push(&buf[..n]);
    }
}

/// Hands a decoder event to our encoder. Bounded: a peer that sends NACKs and never reads our
/// answers must not grow the queue. A decoder waits for the REPAIR of the chunk it NACKed
/// before it goes on, so a healthy peer has one or two pending; more than
/// MAX_PENDING_CONTROL is abuse. (A closed receiver means the encoding side has finished:
/// nothing to tell it any more.)
fn control(ctrl: &mpsc::Sender<Ctrl>, c: Ctrl) -> Result<(), ChainError> {
    match ctrl.try_send(c) {
        Err(mpsc::error::TrySendError::Full(_)) => {
            Err(ChainError::Protocol("too many NACKs pending: the peer does not read our stream"))
        }
        _ => Ok(()),
    }
}

/// Decodes `bytes` (none: retry output that waited), passes the events on, writes what was
/// decoded, and wakes the pair's waiting decoders if this one added chunks.
async fn decode_step(
    dec: &mut Decoder,
    bytes: &[u8],
    out: &mut Vec<u8>,
    output: &mut (impl AsyncWrite + Unpin),
    defined: Option<&tokio::sync::Notify>,
    ctrl: &mpsc::Sender<Ctrl>,
    pipe: Pipe<'_>,
) -> Result<(), ChainError> {
    let before = dec.stats();
    let r = dec.decode(bytes, out);
    let after = dec.stats();
    if let Some(d) = defined {
        if after.defined_bytes != before.defined_bytes || after.repaired_bytes != before.repaired_bytes {
            d.notify_waiters();
        }
    }
    while let Some(ev) = dec.poll_event() {
        let c = match ev {
            Event::SendNack(n) => Ctrl::SendNack(n),
            Event::NackReceived(n) => Ctrl::HandleNack(n),
        };
        control(ctrl, c)?;
    }
    // Whatever was decoded before an error is an exact prefix: deliver it.
    if !out.is_empty() {
        output.write_all(out).await?;
        pipe.plain.add(out.len());
        out.clear();
    }
    r?;
    Ok(())
}

/// Reads the peer's HELLO; returns it and any bytes that came after it.
async fn read_hello(r: &mut (impl AsyncRead + Unpin)) -> Result<(Hello, Vec<u8>), ChainError> {
    let mut buf = Vec::new();
    let mut tmp = [0u8; 1024];
    loop {
        match Hello::parse(&buf) {
            Ok(Some((h, n))) => return Ok((h, buf.split_off(n))),
            Ok(None) => {}
            Err(_) => return Err(ChainError::NoUpstream("the far end answered, but not with a HELLO")),
        }
        let n = r.read(&mut tmp).await?;
        if n == 0 {
            return Err(ChainError::NoUpstream("the far end closed without a HELLO"));
        }
        buf.extend_from_slice(&tmp[..n]);
    }
}

/// What an upstream found at the start of an intercepted connection.
#[derive(Debug)]
enum Detection {
    /// Not chained: replay these bytes each way, then relay.
    Plain { client_bytes: Vec<u8>, server_bytes: Vec<u8> },
    /// A downstream's HELLO, the client bytes after it, and server bytes that came first.
    Chained { hello: Hello, rest: Vec<u8>, server_first: Vec<u8> },
}

/// Waits up to `detect` for the client's first bytes (and `hello_timeout` more once they
/// start with the magic), buffering whatever the server says meanwhile.
async fn detect<C, S>(
    client: &mut C,
    server: &mut S,
    detect: Duration,
    hello_timeout: Duration,
) -> io::Result<Detection>
where
    C: AsyncRead + Unpin,
    S: AsyncRead + Unpin,
{
    let start = Instant::now();
    let (mut cbuf, mut sbuf) = (Vec::new(), Vec::new());
    let (mut ctmp, mut stmp) = (vec![0u8; 4096], vec![0u8; 16 * 1024]);
    let (mut client_eof, mut server_eof) = (false, false);
    loop {
        match Hello::parse(&cbuf) {
            Ok(Some((hello, n))) => {
                return Ok(Detection::Chained { hello, rest: cbuf.split_off(n), server_first: sbuf })
            }
            Err(_) => return Ok(Detection::Plain { client_bytes: cbuf, server_bytes: sbuf }),
            Ok(None) => {}
        }
        if client_eof {
            return Ok(Detection::Plain { client_bytes: cbuf, server_bytes: sbuf });
        }
        let deadline = if cbuf.len() >= HELLO_MAGIC.len() { start + detect + hello_timeout } else { start + detect };
        tokio::select! {
            r = client.read(&mut ctmp) => {
                let n = r?;
                client_eof = n == 0;
                cbuf.extend_from_slice(&ctmp[..n]);
            }
            r = server.read(&mut stmp), if !server_eof && sbuf.len() < MAX_SERVER_FIRST => {
                let n = r?;
                server_eof = n == 0;
                sbuf.extend_from_slice(&stmp[..n]);
            }
            () = tokio::time::sleep_until(deadline) => {
                return Ok(Detection::Plain { client_bytes: cbuf, server_bytes: sbuf });
            }
        }
    }
}

/// Runs `f` unless no byte moved for `idle` (zero: never idle).
async fn with_idle<F>(f: F, conn: &ConnBytes, idle: Duration) -> Result<Outcome, ChainError>
where
    F: std::future::Future<Output = Result<Outcome, ChainError>>,
{
    match relay::with_idle(f, &conn.activity, idle).await {
        Ended::Done(r) => r,
        Ended::Idle => Ok(Outcome::Idle),
    }
}

/// Makes closing `s` send a reset instead of a FIN: after a chain failure the peer must not
/// mistake a cut-short stream for a complete one.
pub fn reset_on_close(s: &tokio::net::TcpStream) {
    let _ = socket2::SockRef::from(s).set_linger(Some(Duration::ZERO));
}

#[cfg(test)]
mod tests;
