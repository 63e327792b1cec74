//! The Wireshark dissector `contrib/wireshark/lb.lua`, read by tshark.
//!
//! The test writes a pcap by hand (Ethernet, IPv4 or IPv6, TCP with real checksums and
//! sequence numbers) whose payloads are the byte-exact fixtures of docs/protocol.md and
//! docs/codec.md section 11 (the golden vectors of `cluster-proto/src/wire.rs` and
//! `lb/src/chain/wire.rs`), runs tshark with the script, and compares the decoded fields with
//! what the fixtures say. Std only: no crate is needed to build or read a pcap this small.
//!
//! Channels in the capture (the control port is 7400, `cluster.port`'s default):
//! - a version-1 channel: PEER_JOINs, several messages in one segment, an IPv6 INSTALL split
//!   across two segments, PEER_LEAVE;
//! - a non-member refused with PEER_REJECT(not_a_member), a version-2 offer refused with
//!   PEER_REJECT(version_mismatch);
//! - a version-2 channel over IPv6 with DICT_STATS (IPv4 and IPv6, one split inside its
//!   12-byte header) and LOAD;
//! - a DICT_STATS whose content lb drops (host bits, a negative saving);
//! - a `[tls]` channel, handed to the TLS dissector;
//! - malformed streams: an HTTP request on the control port, an unknown action, and a LOAD on
//!   a version-1 channel;
//! - chained proxy connections on port 8000 (found by the "LBCH" heuristic): HELLOs, MODE,
//!   records (one DATA record split across two segments), and a refused HELLO; one on port
//!   80, which needs Decode As or heuristics first;
//! - a channel on port 17400, decoded only once the port preference or Decode As names it;
//! - and, with TCP reassembly off, the split INSTALL flagged as incomplete.
//!
//! tshark runs with two passes (-2), as the GUI dissects: what the first pass learns (channel
//! versions, chain phases) must give the same answers when the frames are dissected again.
//! tshark is required (`.ci/run` installs it): without it the test fails. LB_WIRESHARK_KEEP=1
//! keeps the capture for a look in Wireshark.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;

// ---------------------------------------------------------------------------------------
// Fixtures (docs/protocol.md "Golden examples"; docs/codec.md section 11)
// ---------------------------------------------------------------------------------------

const V4_BODY: [u8; 12] = [0x9c, 0x40, 0x00, 0x50, 192, 0, 2, 1, 198, 51, 100, 7];

fn with(header: [u8; 4], body: &[u8]) -> Vec<u8> {
    let mut v = header.to_vec();
    v.extend_from_slice(body);
    v
}

/// UDP [2001:db8::1]:53 -> [2001:db8::2]:5353, the body after the 4-byte header.
fn v6_body() -> Vec<u8> {
    let mut v = vec![0x00, 0x35, 0x14, 0xe9];
    v.extend_from_slice(&[0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
    v.extend_from_slice(&[0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2]);
    v
}

const PEER_JOIN_1: [u8; 4] = [3, 1, 1, 0];
/// Version 2 carries the sender's graceful-restart time in byte 3 (the client: 60 s).
const PEER_JOIN_2: [u8; 4] = [3, 1, 2, 60];
const PEER_JOIN_2_NO_RESTART: [u8; 4] = [3, 1, 2, 0];
const PEER_LEAVE_NONE: [u8; 4] = [3, 3, 0, 0];
const PEER_LEAVE_BAD_MESSAGE: [u8; 4] = [3, 3, 3, 0];
const PEER_REJECT_NOT_A_MEMBER: [u8; 4] = [3, 4, 1, 0];
const PEER_REJECT_VERSION: [u8; 4] = [3, 4, 2, 0];
/// A PEER_KEEPALIVE with its reserved bytes set: still a keepalive (decoding rules).
const PEER_KEEPALIVE_RESERVED: [u8; 4] = [3, 2, 9, 9];

/// DICT_STATS IPv4, member 2, epoch 9, /24 /32, one record 192.0.2.0 -> 198.51.100.7, 1.0.
fn dict_stats_v4() -> Vec<u8> {
    let mut v = vec![4, 1, 2, 1, 0, 0, 0, 9, 24, 32, 0, 1];
    v.extend_from_slice(&[192, 0, 2, 0, 198, 51, 100, 7, 0x3f, 0x80, 0, 0]);
    v
}

/// DICT_STATS IPv6, member 1, epoch 9, /48 /128, one record 2001:db8:: -> 2001:db8::2, 2.0.
fn dict_stats_v6() -> Vec<u8> {
    let mut v = vec![4, 1, 1, 2, 0, 0, 0, 9, 48, 128, 0, 1];
    v.extend_from_slice(&[0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    v.extend_from_slice(&[0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2]);
    v.extend_from_slice(&[0x40, 0, 0, 0]);
    v
}

/// DICT_STATS IPv4, member 1, epoch 9, no record.
const DICT_STATS_EMPTY: [u8; 12] = [4, 1, 1, 1, 0, 0, 0, 9, 24, 32, 0, 0];
/// DICT_STATS IPv4, member 1, /24 /32, one record 192.0.2.1 (host bits set) -> 198.51.100.7
/// saving -1.0: framed correctly, but content the affinity engine drops.
const DICT_STATS_BAD: [u8; 24] =
    [4, 1, 1, 1, 0, 0, 0, 9, 24, 32, 0, 1, 192, 0, 2, 1, 198, 51, 100, 7, 0xbf, 0x80, 0, 0];
/// LOAD member 2, load 1.0.
const LOAD: [u8; 8] = [5, 1, 2, 0, 0x3f, 0x80, 0, 0];

/// A TLS 1.2 record carrying a minimal ClientHello (one cipher suite, no extension), the first
/// bytes of a `[tls]` channel.
fn client_hello() -> Vec<u8> {
    let mut body = vec![3, 3];
    body.extend_from_slice(&[0x5a; 32]); // random
    body.extend_from_slice(&[0, 0, 2, 0x13, 0x01, 1, 0, 0, 0]); // session id, suites, compression, extensions
    let mut hs = vec![1, 0, 0, body.len() as u8];
    hs.extend_from_slice(&body);
    let mut record = vec![22, 3, 1, 0, hs.len() as u8];
    record.extend_from_slice(&hs);
    record
}

/// A chain HELLO: "LBCH", version, flags, id length, budget (u64), id.
fn hello(version: u8, flags: u8, budget: u64, id: &str) -> Vec<u8> {
    let mut v = b"LBCH".to_vec();
    v.extend_from_slice(&[version, flags, id.len() as u8]);
    v.extend_from_slice(&budget.to_be_bytes());
    v.extend_from_slice(id.as_bytes());
    v
}

/// A chain DATA record: type 1, u32 length, codec bytes.
fn data_record(bytes: &[u8]) -> Vec<u8> {
    let mut v = vec![1];
    v.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
    v.extend_from_slice(bytes);
    v
}

const REC_END: u8 = 2;
const REC_DONE: u8 = 3;
const MODE_PERSISTENT: u8 = 1;
const MODE_RAW: u8 = 2;
const MODE_SHARED: u8 = 3;
const FLAG_SHARED: u8 = 2;

// ---------------------------------------------------------------------------------------
// A pcap writer: Ethernet frames carrying IPv4 or IPv6 and TCP
// ---------------------------------------------------------------------------------------

struct Pcap {
    bytes: Vec<u8>,
    frames: u32,
}

impl Pcap {
    fn new() -> Pcap {
        let mut bytes = Vec::new();
        bytes.extend_from_slice(&0xa1b2_c3d4u32.to_le_bytes()); // microsecond pcap, little endian
        bytes.extend_from_slice(&2u16.to_le_bytes());
        bytes.extend_from_slice(&4u16.to_le_bytes());
        bytes.extend_from_slice(&0i32.to_le_bytes()); // GMT offset
        bytes.extend_from_slice(&0u32.to_le_bytes()); // timestamp accuracy
        bytes.extend_from_slice(&65535u32.to_le_bytes()); // snap length
        bytes.extend_from_slice(&1u32.to_le_bytes()); // LINKTYPE_ETHERNET
        Pcap { bytes, frames: 0 }
    }

    /// Appends a frame, 1 ms after the previous one; returns its frame number (from 1).
    fn push(&mut self, frame: &[u8]) -> u32 {
        self.frames += 1;
        let usec = u64::from(self.frames) * 1000;
        self.bytes.extend_from_slice(&(1_700_000_000 + (usec / 1_000_000) as u32).to_le_bytes());
        self.bytes.extend_from_slice(&((usec % 1_000_000) as u32).to_le_bytes());
        self.bytes.extend_from_slice(&(frame.len() as u32).to_le_bytes());
        self.bytes.extend_from_slice(&(frame.len() as u32).to_le_bytes());
        self.bytes.extend_from_slice(frame);
        self.frames
    }
}

fn checksum(chunks: &[&[u8]]) -> u16 {
    let mut sum: u32 = 0;
    for chunk in chunks {
        let mut pairs = chunk.chunks_exact(2);
        for p in &mut pairs {
            sum += u32::from(u16::from_be_bytes([p[0], p[1]]));
        }
        if let [last] = pairs.remainder() {
            sum += u32::from(*last) << 8;
        }
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

const SYN: u8 = 0x02;
const ACK: u8 = 0x10;
const PSH_ACK: u8 = 0x18;

/// One Ethernet frame with a TCP segment from `src` to `dst`.
fn tcp_frame(src: SocketAddr, dst: SocketAddr, seq: u32, ack: u32, flags: u8, payload: &[u8]) -> Vec<u8> {
    let mut tcp = Vec::with_capacity(20 + payload.len());
    tcp.extend_from_slice(&src.port().to_be_bytes());
    tcp.extend_from_slice(&dst.port().to_be_bytes());
    tcp.extend_from_slice(&seq.to_be_bytes());
    tcp.extend_from_slice(&ack.to_be_bytes());
    tcp.extend_from_slice(&[5 << 4, flags]);
    tcp.extend_from_slice(&65535u16.to_be_bytes());
    tcp.extend_from_slice(&[0, 0, 0, 0]); // checksum, urgent pointer
    tcp.extend_from_slice(payload);
    let tcp_len = tcp.len() as u32;

    let mut frame = vec![0x02, 0, 0, 0, 0, 0x02, 0x02, 0, 0, 0, 0, 0x01]; // dst, src MAC
    match (src.ip(), dst.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let pseudo = [&s.octets()[..], &d.octets()[..], &[0, 6], &(tcp_len as u16).to_be_bytes()].concat();
            let c = checksum(&[&pseudo, &tcp]);
            tcp[16..18].copy_from_slice(&c.to_be_bytes());
            let mut ip = vec![0x45, 0];
            ip.extend_from_slice(&((20 + tcp_len) as u16).to_be_bytes());
            ip.extend_from_slice(&[0, 0, 0x40, 0, 64, 6, 0, 0]); // id, DF, TTL, TCP, checksum
            ip.extend_from_slice(&s.octets());
            ip.extend_from_slice(&d.octets());
            let c = checksum(&[&ip]);
            ip[10..12].copy_from_slice(&c.to_be_bytes());
            frame.extend_from_slice(&[0x08, 0x00]);
            frame.extend_from_slice(&ip);
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            let pseudo = [&s.octets()[..], &d.octets()[..], &tcp_len.to_be_bytes(), &[0, 0, 0, 6]].concat();
            let c = checksum(&[&pseudo, &tcp]);
            tcp[16..18].copy_from_slice(&c.to_be_bytes());
            let mut ip = vec![0x60, 0, 0, 0];
            ip.extend_from_slice(&(tcp_len as u16).to_be_bytes());
            ip.extend_from_slice(&[6, 64]);
            ip.extend_from_slice(&s.octets());
            ip.extend_from_slice(&d.octets());
            frame.extend_from_slice(&[0x86, 0xdd]);
            frame.extend_from_slice(&ip);
        }
        _ => panic!("one address family per connection"),
    }
    frame.extend_from_slice(&tcp);
    frame
}

/// A TCP connection in the capture: the handshake, then segments either way.
struct Conn {
    client: SocketAddr,
    server: SocketAddr,
    /// Next sequence number of the client and of the server.
    next: [u32; 2],
}

impl Conn {
    fn open(pcap: &mut Pcap, client: &str, server: &str) -> Conn {
        let (client, server): (SocketAddr, SocketAddr) = (client.parse().unwrap(), server.parse().unwrap());
        let (ci, si) = (1000 + pcap.frames * 7, 50_000 + pcap.frames * 11);
        pcap.push(&tcp_frame(client, server, ci, 0, SYN, &[]));
        pcap.push(&tcp_frame(server, client, si, ci + 1, SYN | ACK, &[]));
        pcap.push(&tcp_frame(client, server, ci + 1, si + 1, ACK, &[]));
        Conn { client, server, next: [ci + 1, si + 1] }
    }

    /// The client sends `payload`; returns the frame number.
    fn c(&mut self, pcap: &mut Pcap, payload: &[u8]) -> u32 {
        self.send(pcap, 0, payload)
    }

    /// The server sends `payload`; returns the frame number.
    fn s(&mut self, pcap: &mut Pcap, payload: &[u8]) -> u32 {
        self.send(pcap, 1, payload)
    }

    fn send(&mut self, pcap: &mut Pcap, side: usize, payload: &[u8]) -> u32 {
        let (src, dst) = if side == 0 { (self.client, self.server) } else { (self.server, self.client) };
        let f = tcp_frame(src, dst, self.next[side], self.next[1 - side], PSH_ACK, payload);
        self.next[side] = self.next[side].wrapping_add(payload.len() as u32);
        pcap.push(&f)
    }
}

// ---------------------------------------------------------------------------------------
// The capture
// ---------------------------------------------------------------------------------------

/// Frame numbers of the interesting frames.
#[derive(Default)]
struct Frames {
    v1_join_a: u32,
    v1_join_b: u32,
    v1_burst: u32,
    v1_split_head: u32,
    v1_split_tail: u32,
    v1_leave: u32,
    reject_join: u32,
    reject: u32,
    v2_join_a: u32,
    v2_join_b: u32,
    v2_adverts: u32,
    v2_dict_head: u32,
    v2_dict_tail: u32,
    v2_bad_content: u32,
    fallback_reject: u32,
    http: u32,
    tls: u32,
    bad_join_b: u32,
    bad_mixed: u32,
    bad_leave: u32,
    hello_down: u32,
    hello_up: u32,
    mode: u32,
    up_records_head: u32,
    up_records: u32,
    down_done: u32,
    bad_hello: u32,
    hello_port80: u32,
    raw_mode: u32,
    raw_reply: u32,
    shared_hello_down: u32,
    shared_hello_up: u32,
    shared_mode: u32,
    other_port: u32,
}

fn capture() -> (Vec<u8>, Frames) {
    let mut p = Pcap::new();
    let mut f = Frames::default();

    // A version-1 channel between members 192.0.2.11 (dialer) and 192.0.2.12.
    let mut c = Conn::open(&mut p, "192.0.2.11:40001", "192.0.2.12:7400");
    f.v1_join_a = c.c(&mut p, &PEER_JOIN_1);
    f.v1_join_b = c.s(&mut p, &PEER_JOIN_1);
    let burst = [
        with([1, 1, 6, 1], &V4_BODY), // INSTALL FORWARD IPv4 TCP
        with([1, 2, 6, 1], &V4_BODY), // INSTALL BYPASS
        with([2, 1, 6, 1], &V4_BODY), // REMOVE FORWARD
        PEER_KEEPALIVE_RESERVED.to_vec(),
    ]
    .concat();
    f.v1_burst = c.c(&mut p, &burst);
    let install6 = with([1, 1, 17, 2], &v6_body()); // INSTALL FORWARD IPv6 UDP, 40 bytes
    let remove6 = with([2, 2, 17, 2], &v6_body()); // REMOVE BYPASS IPv6 UDP
    f.v1_split_head = c.s(&mut p, &install6[..10]);
    f.v1_split_tail = c.s(&mut p, &[&install6[10..], &remove6[..]].concat());
    f.v1_leave = c.c(&mut p, &PEER_LEAVE_NONE);

    // A non-member dials a member.
    let mut c = Conn::open(&mut p, "192.0.2.99:40002", "192.0.2.12:7400");
    f.reject_join = c.c(&mut p, &PEER_JOIN_1);
    f.reject = c.s(&mut p, &PEER_REJECT_NOT_A_MEMBER);

    // A version-2 channel over IPv6.
    let mut c = Conn::open(&mut p, "[2001:db8::11]:40003", "[2001:db8::12]:7400");
    f.v2_join_a = c.c(&mut p, &PEER_JOIN_2);
    f.v2_join_b = c.s(&mut p, &PEER_JOIN_2_NO_RESTART);
    f.v2_adverts = c.c(&mut p, &[dict_stats_v4(), LOAD.to_vec()].concat());
    let dict6 = dict_stats_v6();
    f.v2_dict_head = c.s(&mut p, &dict6[..7]);
    f.v2_dict_tail = c.s(&mut p, &[&dict6[7..], &DICT_STATS_EMPTY[..]].concat());
    f.v2_bad_content = c.s(&mut p, &DICT_STATS_BAD);

    // A version-2 member offers 2 to a version-1 member.
    let mut c = Conn::open(&mut p, "192.0.2.13:40004", "192.0.2.12:7400");
    c.c(&mut p, &PEER_JOIN_2);
    f.fallback_reject = c.s(&mut p, &PEER_REJECT_VERSION);

    // A [tls] channel: TLS from the first byte, left to the TLS dissector.
    let mut c = Conn::open(&mut p, "192.0.2.11:40008", "192.0.2.12:7400");
    f.tls = c.c(&mut p, &client_hello());

    // Not the control protocol at all.
    let mut c = Conn::open(&mut p, "192.0.2.14:40005", "192.0.2.12:7400");
    f.http = c.c(&mut p, b"GET / HTTP/1.1\r\nHost: lb\r\n\r\n");

    // A version-1 channel that gets a LOAD, then a PEER_SYNC with an unknown action.
    let mut c = Conn::open(&mut p, "192.0.2.11:40006", "192.0.2.13:7400");
    c.c(&mut p, &PEER_JOIN_1);
    f.bad_join_b = c.s(&mut p, &PEER_JOIN_1);
    f.bad_mixed = c.c(&mut p, &[&LOAD[..], &[3, 5, 0, 0]].concat());
    f.bad_leave = c.s(&mut p, &PEER_LEAVE_BAD_MESSAGE);

    // A chained connection: downstream 198.51.100.1 to the server, intercepted by an upstream.
    let mut c = Conn::open(&mut p, "198.51.100.1:45000", "203.0.113.80:8000");
    f.hello_down = c.c(&mut p, &hello(1, 0, 64 << 20, "198.51.100.1"));
    // The upstream says it decodes codec version 2 (flags bits 4-7); the downstream's HELLO
    // is a build's from before that field (0).
    f.hello_up = c.s(&mut p, &hello(1, 0x20 | 1, 64 << 20, "upstream-1"));
    f.mode = c.c(&mut p, &[&[MODE_PERSISTENT][..], &data_record(b"abc"), &[REC_END]].concat());
    let records = [&data_record(&[7; 300])[..], &[REC_END, REC_DONE]].concat();
    f.up_records_head = c.s(&mut p, &records[..100]);
    f.up_records = c.s(&mut p, &records[100..]);
    f.down_done = c.c(&mut p, &[REC_DONE]);

    // Budgets that differ: MODE RAW, then the bytes as they are, both ways.
    let mut c = Conn::open(&mut p, "198.51.100.1:45003", "203.0.113.80:8000");
    c.c(&mut p, &hello(1, 0, 1 << 20, "198.51.100.1"));
    c.s(&mut p, &hello(1, 1, 64 << 20, "upstream-1"));
    f.raw_mode = c.c(&mut p, &[&[MODE_RAW][..], b"GET / HTTP/1.1\r\n\r\n"].concat());
    f.raw_reply = c.s(&mut p, b"HTTP/1.1 204 No Content\r\n\r\n");

    // Shared pair dictionaries: both HELLOs offer SHARED (the downstream's also a later
    // build's unknown flag 0x08, ignored, and codec version 2), MODE SHARED.
    let mut c = Conn::open(&mut p, "198.51.100.1:45004", "203.0.113.80:8000");
    f.shared_hello_down = c.c(&mut p, &hello(1, 0x20 | 0x08 | FLAG_SHARED, 64 << 20, "198.51.100.1"));
    f.shared_hello_up = c.s(&mut p, &hello(1, FLAG_SHARED, 64 << 20, "upstream-1"));
    f.shared_mode = c.c(&mut p, &[&[MODE_SHARED][..], &data_record(b"abc")].concat());

    // A HELLO of an unknown chain version.
    let mut c = Conn::open(&mut p, "198.51.100.1:45001", "203.0.113.80:8000");
    f.bad_hello = c.c(&mut p, &hello(9, 0, 64 << 20, "198.51.100.1"));

    // A chained connection to port 80, which Wireshark gives to HTTP first.
    let mut c = Conn::open(&mut p, "198.51.100.1:45002", "203.0.113.80:80");
    f.hello_port80 = c.c(&mut p, &hello(1, 0, 64 << 20, "198.51.100.1"));

    // A control channel on a per-member port.
    let mut c = Conn::open(&mut p, "192.0.2.11:40007", "192.0.2.15:17400");
    f.other_port = c.c(&mut p, &PEER_JOIN_1);

    (p.bytes, f)
}

// ---------------------------------------------------------------------------------------
// Running tshark
// ---------------------------------------------------------------------------------------

/// The repository root: the parent of lb/ under cargo, else found from the current directory
/// (a standalone `rustc --test` build).
fn repo_root() -> PathBuf {
    if let Some(dir) = option_env!("CARGO_MANIFEST_DIR") {
        return Path::new(dir).parent().expect("lb/ has a parent").to_path_buf();
    }
    let mut dir = std::env::current_dir().expect("current directory");
    loop {
        if dir.join("contrib/wireshark/lb.lua").is_file() {
            return dir;
        }
        assert!(dir.pop(), "contrib/wireshark/lb.lua not found above the current directory");
    }
}

fn uid() -> Option<u32> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("Uid:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// How tshark is started. As root, Wireshark runs `-X lua_script` only if its init.lua sets
/// `run_user_scripts_when_superuser = true` (Debian's does); otherwise it ignores the script
/// without a word. Then the test runs tshark as nobody through `setpriv`.
const AS_NOBODY: &[&str] = &["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"];

struct Tshark {
    pcap: PathBuf,
    script: PathBuf,
    home: PathBuf,
    prefix: &'static [&'static str],
}

impl Tshark {
    fn command(&self, prefix: &[&str]) -> Command {
        let mut cmd = match prefix.split_first() {
            None => Command::new("tshark"),
            Some((program, args)) => {
                let mut c = Command::new(program);
                c.args(args).arg("tshark");
                c
            }
        };
        // A private configuration: no personal preferences or plugins of whoever runs the test.
        cmd.env("HOME", &self.home).env("WIRESHARK_CONFIG_DIR", &self.home).env_remove("XDG_CONFIG_HOME");
        cmd
    }

    fn output(mut cmd: Command) -> std::process::Output {
        match cmd.output() {
            Ok(out) => out,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && cmd.get_program() == "tshark" => panic!(
                "tshark is not installed: this test needs it. Debian/Ubuntu: \
                 DEBIAN_FRONTEND=noninteractive apt-get install -y tshark (.ci/run installs it)"
            ),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                panic!("{:?} is missing (util-linux): it runs tshark as nobody, see AS_NOBODY", cmd.get_program())
            }
            Err(e) => panic!("cannot run {:?}: {e}", cmd.get_program()),
        }
    }

    /// True when tshark started with `prefix` registers the script's protocols.
    fn script_loads(&self, prefix: &[&str]) -> bool {
        let mut cmd = self.command(prefix);
        cmd.arg("-G").arg("protocols").arg("-X").arg(format!("lua_script:{}", self.script.display()));
        let out = Self::output(cmd);
        let stdout = String::from_utf8_lossy(&out.stdout);
        let names: Vec<&str> = stdout.lines().filter_map(|l| l.split('\t').nth(2)).collect();
        out.status.success() && names.contains(&"lbctl") && names.contains(&"lbchain")
    }

    /// Picks how to start tshark so that it runs the script (see [`AS_NOBODY`]).
    fn choose_prefix(&mut self) {
        if self.script_loads(&[]) {
            return;
        }
        assert_eq!(
            uid(),
            Some(0),
            "tshark does not load {} (try: tshark -G protocols -X lua_script:{} | grep lbctl)",
            self.script.display(),
            self.script.display()
        );
        assert!(
            self.script_loads(AS_NOBODY),
            "tshark as root ignores -X lua_script (run_user_scripts_when_superuser is false in \
             Wireshark's init.lua), and running it as nobody through setpriv did not load {} either",
            self.script.display()
        );
        self.prefix = AS_NOBODY;
    }

    /// tshark on the capture with the dissector and the given extra arguments; its stdout.
    /// Two passes (-2), as the GUI does: the second one reads the state of the first.
    fn run(&self, extra: &[&str]) -> String {
        let mut cmd = self.command(self.prefix);
        cmd.arg("-n")
            .arg("-2")
            .arg("-r")
            .arg(&self.pcap)
            .arg("-X")
            .arg(format!("lua_script:{}", self.script.display()));
        cmd.args(extra);
        let out = Self::output(cmd);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "tshark {extra:?} failed ({}):\n{stderr}", out.status);
        assert!(!stderr.contains("Lua"), "tshark reported a Lua problem:\n{stderr}");
        String::from_utf8(out.stdout).expect("tshark prints UTF-8")
    }

    /// `-T fields` for `fields`, one row per frame number (first field: frame.number).
    fn fields(&self, prefs: &[&str], fields: &[&str]) -> BTreeMap<u32, Vec<String>> {
        let mut args: Vec<&str> = prefs.to_vec();
        args.extend(["-T", "fields", "-E", "separator=|", "-E", "occurrence=a", "-E", "aggregator=,"]);
        args.extend(["-e", "frame.number"]);
        for f in fields {
            args.extend(["-e", f]);
        }
        let out = self.run(&args);
        let mut rows = BTreeMap::new();
        for line in out.lines() {
            let mut cols = line.split('|').map(str::to_string);
            let n: u32 = cols.next().unwrap().parse().expect("frame number");
            let rest: Vec<String> = cols.collect();
            assert_eq!(rest.len(), fields.len(), "row {line:?}");
            rows.insert(n, rest);
        }
        rows
    }

    /// The Info column of each frame.
    fn info(&self, prefs: &[&str]) -> BTreeMap<u32, String> {
        let mut args: Vec<&str> = prefs.to_vec();
        args.extend(["-o", r#"gui.column.format:"No.","%m","Info","%i""#]);
        let out = self.run(&args);
        let mut rows = BTreeMap::new();
        for line in out.lines() {
            let line = line.trim_start();
            let (n, info) = line.split_once(' ').unwrap_or((line, ""));
            rows.insert(n.parse().expect("frame number"), info.trim().to_string());
        }
        rows
    }
}

/// Asserts the named columns of frame `n`; every column not named must be empty. Booleans are
/// compared as 0/1 (tshark 4.0 prints 0/1, later releases False/True).
#[track_caller]
fn expect_row(rows: &BTreeMap<u32, Vec<String>>, fields: &[&str], n: u32, want: &[(&str, &str)]) {
    let row = rows.get(&n).unwrap_or_else(|| panic!("no frame {n}"));
    for (i, field) in fields.iter().enumerate() {
        let expected = want.iter().find(|(f, _)| f == field).map_or("", |(_, v)| *v);
        let got = match row[i].as_str() {
            "True" => "1",
            "False" => "0",
            other => other,
        };
        assert_eq!(got, expected, "frame {n}, field {field}");
    }
}

const CTL_FIELDS: &[&str] = &[
    "lbctl.type",
    "lbctl.action",
    "lbctl.sync",
    "lbctl.adv_action",
    "lbctl.protocol",
    "lbctl.family",
    "lbctl.version",
    "lbctl.error",
    "lbctl.restart_time",
    "lbctl.reserved",
    "lbctl.srcport",
    "lbctl.dstport",
    "lbctl.src",
    "lbctl.dst",
    "lbctl.src6",
    "lbctl.dst6",
    "lbctl.length",
    "lbctl.channel_version",
    "lbctl.member",
    "lbctl.epoch",
    "lbctl.client_prefix_len",
    "lbctl.server_prefix_len",
    "lbctl.record_count",
    "lbctl.record.client",
    "lbctl.record.server",
    "lbctl.record.client6",
    "lbctl.record.server6",
    "lbctl.record.saved",
    "lbctl.load",
    "lbctl.undecoded",
    "tcp.reassembled_in",
    "tls.handshake.type",
    "_ws.expert.message",
];

const CHAIN_FIELDS: &[&str] = &[
    "lbchain.magic",
    "lbchain.sender",
    "lbchain.version",
    "lbchain.flags",
    "lbchain.flags.available",
    "lbchain.flags.shared",
    "lbchain.flags.unknown",
    "lbchain.flags.codec",
    "lbchain.id_len",
    "lbchain.budget",
    "lbchain.id",
    "lbchain.mode",
    "lbchain.record.type",
    "lbchain.record.len",
    "tcp.reassembled_in",
    "_ws.expert.message",
];

/// Writes the capture and a copy of the script into a fresh directory that any user can read
/// (tshark may run as nobody, and the checkout may be private).
fn setup() -> (Tshark, Frames) {
    use std::os::unix::fs::PermissionsExt;
    let source = repo_root().join("contrib/wireshark/lb.lua");
    assert!(source.is_file(), "{} is missing", source.display());
    let dir = std::env::temp_dir().join(format!("lb-wireshark-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let home = dir.join("home");
    std::fs::create_dir_all(&home).unwrap();
    let script = dir.join("lb.lua");
    std::fs::copy(&source, &script).unwrap();
    let (bytes, frames) = capture();
    let pcap = dir.join("lb.pcap");
    std::fs::write(&pcap, bytes).unwrap();
    for (path, mode) in [(&dir, 0o755), (&home, 0o777), (&script, 0o644), (&pcap, 0o644)] {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    }
    let mut tshark = Tshark { pcap, script, home, prefix: &[] };
    tshark.choose_prefix();
    (tshark, frames)
}

#[test]
fn tshark_decodes_the_control_protocol_and_the_chain_hello() {
    let (ts, f) = setup();

    // --- The control protocol, default preferences (port 7400) ---
    let rows = ts.fields(&[], CTL_FIELDS);
    let e = |n, want: &[(&str, &str)]| expect_row(&rows, CTL_FIELDS, n, want);
    let join1 = [
        ("lbctl.type", "3"),
        ("lbctl.sync", "1"),
        ("lbctl.version", "1"),
        ("lbctl.reserved", "00"),
        ("lbctl.length", "4"),
    ];
    e(f.v1_join_a, &join1);
    e(f.v1_join_b, &join1);
    // Four messages in one segment; the channel runs at version 1 from the two PEER_JOINs.
    e(
        f.v1_burst,
        &[
            ("lbctl.type", "1,1,2,3"),
            ("lbctl.action", "1,2,1"),
            ("lbctl.sync", "2"),
            ("lbctl.protocol", "6,6,6"),
            ("lbctl.family", "1,1,1"),
            ("lbctl.reserved", "0909"),
            ("lbctl.srcport", "40000,40000,40000"),
            ("lbctl.dstport", "80,80,80"),
            ("lbctl.src", "192.0.2.1,192.0.2.1,192.0.2.1"),
            ("lbctl.dst", "198.51.100.7,198.51.100.7,198.51.100.7"),
            ("lbctl.length", "16,16,16,4"),
            ("lbctl.channel_version", "1,1,1,1"),
        ],
    );
    // The IPv6 INSTALL is cut after 10 bytes: the first segment holds no whole message and
    // is reassembled into the next, which also carries a REMOVE.
    e(f.v1_split_head, &[("tcp.reassembled_in", &f.v1_split_tail.to_string())]);
    e(
        f.v1_split_tail,
        &[
            ("lbctl.type", "1,2"),
            ("lbctl.action", "1,2"),
            ("lbctl.protocol", "17,17"),
            ("lbctl.family", "2,2"),
            ("lbctl.srcport", "53,53"),
            ("lbctl.dstport", "5353,5353"),
            ("lbctl.src6", "2001:db8::1,2001:db8::1"),
            ("lbctl.dst6", "2001:db8::2,2001:db8::2"),
            ("lbctl.length", "40,40"),
            ("lbctl.channel_version", "1,1"),
        ],
    );
    e(
        f.v1_leave,
        &[
            ("lbctl.type", "3"),
            ("lbctl.sync", "3"),
            ("lbctl.error", "0"),
            ("lbctl.reserved", "00"),
            ("lbctl.length", "4"),
            ("lbctl.channel_version", "1"),
        ],
    );
    e(f.reject_join, &join1);
    e(
        f.reject,
        &[
            ("lbctl.type", "3"),
            ("lbctl.sync", "4"),
            ("lbctl.error", "1"),
            ("lbctl.reserved", "00"),
            ("lbctl.length", "4"),
            ("_ws.expert.message", "PEER_REJECT: not_a_member"),
        ],
    );
    e(
        f.fallback_reject,
        &[
            ("lbctl.type", "3"),
            ("lbctl.sync", "4"),
            ("lbctl.error", "2"),
            ("lbctl.reserved", "00"),
            ("lbctl.length", "4"),
            ("_ws.expert.message", "PEER_REJECT: version_mismatch"),
        ],
    );

    // Version 2: PEER_JOIN(2) both ways, then advertisements.
    let join2 = [
        ("lbctl.type", "3"),
        ("lbctl.sync", "1"),
        ("lbctl.version", "2"),
        ("lbctl.reserved", ""),
        ("lbctl.length", "4"),
    ];
    e(f.v2_join_a, &[&join2[..], &[("lbctl.restart_time", "60")]].concat());
    e(f.v2_join_b, &[&join2[..], &[("lbctl.channel_version", ""), ("lbctl.restart_time", "0")]].concat());
    e(
        f.v2_adverts,
        &[
            ("lbctl.type", "4,5"),
            ("lbctl.adv_action", "1,1"),
            ("lbctl.family", "1"),
            ("lbctl.reserved", "00"),
            ("lbctl.length", "24,8"),
            ("lbctl.channel_version", "2,2"),
            ("lbctl.member", "2,2"),
            ("lbctl.epoch", "9"),
            ("lbctl.client_prefix_len", "24"),
            ("lbctl.server_prefix_len", "32"),
            ("lbctl.record_count", "1"),
            ("lbctl.record.client", "192.0.2.0"),
            ("lbctl.record.server", "198.51.100.7"),
            ("lbctl.record.saved", "1"),
            ("lbctl.load", "1"),
        ],
    );
    // A DICT_STATS cut inside its 12-byte header, then an empty one in the same segment.
    e(f.v2_dict_head, &[("tcp.reassembled_in", &f.v2_dict_tail.to_string())]);
    e(
        f.v2_dict_tail,
        &[
            ("lbctl.type", "4,4"),
            ("lbctl.adv_action", "1,1"),
            ("lbctl.family", "2,1"),
            ("lbctl.length", "48,12"),
            ("lbctl.channel_version", "2,2"),
            ("lbctl.member", "1,1"),
            ("lbctl.epoch", "9,9"),
            ("lbctl.client_prefix_len", "48,24"),
            ("lbctl.server_prefix_len", "128,32"),
            ("lbctl.record_count", "1,0"),
            ("lbctl.record.client6", "2001:db8::"),
            ("lbctl.record.server6", "2001:db8::2"),
            ("lbctl.record.saved", "2"),
        ],
    );

    // Framed right, but content the affinity engine drops: flagged per value.
    e(
        f.v2_bad_content,
        &[
            ("lbctl.type", "4"),
            ("lbctl.adv_action", "1"),
            ("lbctl.family", "1"),
            ("lbctl.length", "24"),
            ("lbctl.channel_version", "2"),
            ("lbctl.member", "1"),
            ("lbctl.epoch", "9"),
            ("lbctl.client_prefix_len", "24"),
            ("lbctl.server_prefix_len", "32"),
            ("lbctl.record_count", "1"),
            ("lbctl.record.client", "192.0.2.1"),
            ("lbctl.record.server", "198.51.100.7"),
            ("lbctl.record.saved", "-1"),
            ("_ws.expert.message", "Saving must be finite and not negative,Host bits set beyond the prefix length"),
        ],
    );

    // Malformed: bytes lb refuses are flagged, never dropped silently.
    e(
        f.http,
        &[
            ("lbctl.type", "71"),
            ("lbctl.undecoded", &hex(b"GET / HTTP/1.1\r\nHost: lb\r\n\r\n")),
            ("_ws.expert.message", "Malformed: unknown message type 71"),
        ],
    );
    e(
        f.bad_mixed,
        &[
            ("lbctl.type", "5,3"),
            ("lbctl.adv_action", "1"),
            ("lbctl.sync", "5"),
            ("lbctl.member", "2"),
            ("lbctl.reserved", "00"),
            ("lbctl.load", "1"),
            ("lbctl.length", "8"),
            ("lbctl.channel_version", "1"),
            ("lbctl.undecoded", "03050000"),
            (
                "_ws.expert.message",
                "Version-2 message on a version-1 channel (lb answers PEER_LEAVE bad_message),\
                 Malformed: unknown action 5 for message type 3",
            ),
        ],
    );
    e(
        f.bad_leave,
        &[
            ("lbctl.type", "3"),
            ("lbctl.sync", "3"),
            ("lbctl.error", "3"),
            ("lbctl.reserved", "00"),
            ("lbctl.length", "4"),
            ("lbctl.channel_version", "1"),
            ("_ws.expert.message", "PEER_LEAVE: bad_message"),
        ],
    );
    // A TLS channel is TLS: no lbctl field, no complaint.
    e(f.tls, &[("tls.handshake.type", "1")]);
    // Not on a control port by default.
    e(f.other_port, &[]);
    // The chain frames are not control messages.
    for n in [f.hello_down, f.hello_up, f.mode, f.up_records, f.down_done] {
        e(n, &[]);
    }
    e(f.bad_hello, &[("_ws.expert.message", "Unsupported chain protocol version")]);

    // --- Names, as the Info column shows them ---
    let info = ts.info(&[]);
    let i = |n: u32| info.get(&n).unwrap_or_else(|| panic!("no frame {n}")).as_str();
    assert_eq!(i(f.v1_join_a), "PEER_JOIN version 1");
    assert_eq!(
        i(f.v1_burst),
        "INSTALL_CONNECTION FORWARD TCP 192.0.2.1:40000 -> 198.51.100.7:80, \
         INSTALL_CONNECTION BYPASS TCP 192.0.2.1:40000 -> 198.51.100.7:80, \
         REMOVE_CONNECTION FORWARD TCP 192.0.2.1:40000 -> 198.51.100.7:80, PEER_KEEPALIVE"
    );
    assert_eq!(
        i(f.v1_split_tail),
        "INSTALL_CONNECTION FORWARD UDP [2001:db8::1]:53 -> [2001:db8::2]:5353, \
         REMOVE_CONNECTION BYPASS UDP [2001:db8::1]:53 -> [2001:db8::2]:5353"
    );
    assert_eq!(i(f.v1_leave), "PEER_LEAVE none (0)");
    assert_eq!(i(f.reject), "PEER_REJECT not_a_member (1)");
    assert_eq!(i(f.fallback_reject), "PEER_REJECT version_mismatch (2)");
    assert_eq!(i(f.v2_adverts), "DICT_STATS member 2 IPv4 epoch 9 /24 /32, 1 record, LOAD member 2 load 1");
    assert_eq!(
        i(f.v2_dict_tail),
        "DICT_STATS member 1 IPv6 epoch 9 /48 /128, 1 record, DICT_STATS member 1 IPv4 epoch 9 /24 /32, 0 records"
    );
    assert_eq!(i(f.http), "[Malformed: unknown message type 71]");
    assert_eq!(i(f.tls), "Client Hello");
    assert_eq!(i(f.bad_mixed), "LOAD member 2 load 1, [Malformed: unknown action 5 for message type 3]");
    assert_eq!(i(f.bad_leave), "PEER_LEAVE bad_message (3)");
    assert_eq!(i(f.hello_down), "HELLO downstream id 198.51.100.1 budget 67108864");
    assert_eq!(i(f.hello_up), "HELLO upstream id upstream-1 budget 67108864 AVAILABLE codec 2");
    assert_eq!(i(f.mode), "MODE PERSISTENT, DATA 3, END");
    assert_eq!(i(f.up_records), "DATA 300, END, DONE");
    assert_eq!(i(f.down_done), "DONE");
    assert_eq!(i(f.raw_mode), "MODE RAW, relayed 18 bytes");
    assert_eq!(i(f.raw_reply), "relayed 27 bytes");
    assert_eq!(i(f.shared_hello_down), "HELLO downstream id 198.51.100.1 budget 67108864 SHARED codec 2");
    assert_eq!(i(f.shared_hello_up), "HELLO upstream id upstream-1 budget 67108864 SHARED");
    assert_eq!(i(f.shared_mode), "MODE SHARED, DATA 3");
    assert_eq!(
        i(f.bad_hello),
        "HELLO downstream id 198.51.100.1 budget 67108864 [refused: unsupported chain protocol version 9]"
    );

    // --- The tree shows the code points by name ---
    let tree = ts.run(&["-V", "-O", "lbctl,lbchain", "-Y", &format!("frame.number == {}", f.v1_burst)]);
    for line in [
        "Message Type: INSTALL_CONNECTION (1)",
        "Action Type: FORWARD (1)",
        "Action Type: BYPASS (2)",
        "Message Type: REMOVE_CONNECTION (2)",
        "Protocol: TCP (6)",
        "Address Family: IPv4 (1)",
        "Source Port: 40000",
        "Destination Address: 198.51.100.7",
        "Message Type: CLUSTER_PEER_SYNC (3)",
        "Peer Sync Action: PEER_KEEPALIVE (2)",
    ] {
        assert!(tree.contains(line), "no {line:?} in the tree:\n{tree}");
    }
    let tree = ts.run(&["-V", "-O", "lbctl", "-Y", &format!("frame.number == {}", f.reject)]);
    assert!(tree.contains("Error Code: not_a_member (1)"), "{tree}");

    // --- The chain protocol (heuristic on "LBCH") ---
    let rows = ts.fields(&[], CHAIN_FIELDS);
    let e = |n, want: &[(&str, &str)]| expect_row(&rows, CHAIN_FIELDS, n, want);
    e(
        f.hello_down,
        &[
            ("lbchain.magic", "LBCH"),
            ("lbchain.sender", "1"),
            ("lbchain.version", "1"),
            ("lbchain.flags", "0x00"),
            ("lbchain.flags.available", "0"),
            ("lbchain.flags.shared", "0"),
            ("lbchain.flags.unknown", "0x00"),
            ("lbchain.flags.codec", "0"),
            ("lbchain.id_len", "12"),
            ("lbchain.budget", "67108864"),
            ("lbchain.id", "198.51.100.1"),
        ],
    );
    e(
        f.hello_up,
        &[
            ("lbchain.magic", "LBCH"),
            ("lbchain.sender", "2"),
            ("lbchain.version", "1"),
            ("lbchain.flags", "0x21"),
            ("lbchain.flags.available", "1"),
            ("lbchain.flags.shared", "0"),
            ("lbchain.flags.unknown", "0x00"),
            ("lbchain.flags.codec", "2"),
            ("lbchain.id_len", "10"),
            ("lbchain.budget", "67108864"),
            ("lbchain.id", "upstream-1"),
        ],
    );
    e(
        f.mode,
        &[("lbchain.sender", "1"), ("lbchain.mode", "1"), ("lbchain.record.type", "1,2"), ("lbchain.record.len", "3")],
    );
    // The 300-byte DATA record is cut after 100 bytes; END and DONE follow it in the segment
    // that completes it.
    e(f.up_records_head, &[("tcp.reassembled_in", &f.up_records.to_string())]);
    e(f.up_records, &[("lbchain.record.type", "1,2,3"), ("lbchain.record.len", "300")]);
    e(f.down_done, &[("lbchain.record.type", "3")]);
    e(f.raw_mode, &[("lbchain.sender", "1"), ("lbchain.mode", "2")]);
    e(f.raw_reply, &[]);
    e(
        f.shared_hello_down,
        &[
            ("lbchain.magic", "LBCH"),
            ("lbchain.sender", "1"),
            ("lbchain.version", "1"),
            ("lbchain.flags", "0x2a"),
            ("lbchain.flags.available", "0"),
            ("lbchain.flags.shared", "1"),
            ("lbchain.flags.unknown", "0x02"),
            ("lbchain.flags.codec", "2"),
            ("lbchain.id_len", "12"),
            ("lbchain.budget", "67108864"),
            ("lbchain.id", "198.51.100.1"),
        ],
    );
    e(
        f.shared_hello_up,
        &[
            ("lbchain.magic", "LBCH"),
            ("lbchain.sender", "2"),
            ("lbchain.version", "1"),
            ("lbchain.flags", "0x02"),
            ("lbchain.flags.available", "0"),
            ("lbchain.flags.shared", "1"),
            ("lbchain.flags.unknown", "0x00"),
            ("lbchain.flags.codec", "0"),
            ("lbchain.id_len", "10"),
            ("lbchain.budget", "67108864"),
            ("lbchain.id", "upstream-1"),
        ],
    );
    e(
        f.shared_mode,
        &[("lbchain.sender", "1"), ("lbchain.mode", "3"), ("lbchain.record.type", "1"), ("lbchain.record.len", "3")],
    );
    e(
        f.bad_hello,
        &[
            ("lbchain.magic", "LBCH"),
            ("lbchain.sender", "1"),
            ("lbchain.version", "9"),
            ("lbchain.flags", "0x00"),
            ("lbchain.flags.available", "0"),
            ("lbchain.flags.shared", "0"),
            ("lbchain.flags.unknown", "0x00"),
            ("lbchain.flags.codec", "0"),
            ("lbchain.id_len", "12"),
            ("lbchain.budget", "67108864"),
            ("lbchain.id", "198.51.100.1"),
            ("_ws.expert.message", "Unsupported chain protocol version"),
        ],
    );
    for n in [f.v1_join_a, f.v1_burst, f.v2_adverts, f.other_port] {
        e(n, &[]);
    }

    // --- The port preference moves the control protocol ---
    let prefs = ["-o", "lbctl.tcp_ports:17400"];
    let rows = ts.fields(&prefs, CTL_FIELDS);
    let e = |n, want: &[(&str, &str)]| expect_row(&rows, CTL_FIELDS, n, want);
    e(f.other_port, &join1);
    e(f.v1_join_a, &[]);

    // --- Decode As, for both protocols ---
    let prefs = ["-d", "tcp.port==17400,lbctl", "-d", "tcp.port==80,lbchain"];
    let rows = ts.fields(&prefs, CTL_FIELDS);
    expect_row(&rows, CTL_FIELDS, f.other_port, &join1);
    let rows = ts.fields(&prefs, CHAIN_FIELDS);
    let hello80 = [
        ("lbchain.magic", "LBCH"),
        ("lbchain.sender", "1"),
        ("lbchain.version", "1"),
        ("lbchain.flags", "0x00"),
        ("lbchain.flags.available", "0"),
        ("lbchain.flags.shared", "0"),
        ("lbchain.flags.unknown", "0x00"),
        ("lbchain.flags.codec", "0"),
        ("lbchain.id_len", "12"),
        ("lbchain.budget", "67108864"),
        ("lbchain.id", "198.51.100.1"),
    ];
    expect_row(&rows, CHAIN_FIELDS, f.hello_port80, &hello80);
    // On port 80 the heuristic runs only when heuristics go first (by default HTTP has it).
    let rows = ts.fields(&[], CHAIN_FIELDS);
    expect_row(&rows, CHAIN_FIELDS, f.hello_port80, &[]);
    let rows = ts.fields(&["-o", "tcp.try_heuristic_first:TRUE"], CHAIN_FIELDS);
    expect_row(&rows, CHAIN_FIELDS, f.hello_port80, &hello80);

    // --- Without TCP reassembly a cut message is flagged, not misread ---
    let prefs = ["-o", "tcp.desegment_tcp_streams:FALSE"];
    let rows = ts.fields(&prefs, CTL_FIELDS);
    let e = |n, want: &[(&str, &str)]| expect_row(&rows, CTL_FIELDS, n, want);
    e(
        f.v1_split_head,
        &[
            ("lbctl.type", "1"),
            ("lbctl.action", "1"),
            ("lbctl.protocol", "17"),
            ("lbctl.family", "2"),
            ("_ws.expert.message", "Message continues beyond this frame"),
        ],
    );

    // LB_WIRESHARK_KEEP=1 keeps the capture, to open it in Wireshark with the script.
    if std::env::var_os("LB_WIRESHARK_KEEP").is_some() {
        eprintln!("capture kept: {}", ts.pcap.display());
    } else {
        let _ = std::fs::remove_dir_all(ts.pcap.parent().unwrap());
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[test]
fn the_capture_is_built_as_described() {
    // The fixtures are the golden examples of docs/protocol.md, byte for byte.
    let doc = std::fs::read_to_string(repo_root().join("docs/protocol.md")).expect("docs/protocol.md");
    let spaced = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<Vec<_>>().join(" ");
    let dict = dict_stats_v4();
    for bytes in [
        &with([1, 1, 6, 1], &V4_BODY)[..],
        &with([1, 2, 6, 1], &V4_BODY),
        &with([2, 1, 6, 1], &V4_BODY),
        &with([1, 1, 17, 2], &v6_body())[..8],
        &PEER_JOIN_1,
        &PEER_LEAVE_NONE,
        &PEER_LEAVE_BAD_MESSAGE,
        &PEER_REJECT_NOT_A_MEMBER,
        &PEER_REJECT_VERSION,
        &dict[..12],
        &dict[12..],
        &LOAD,
    ] {
        assert!(doc.contains(&spaced(bytes)), "{} is not in docs/protocol.md", spaced(bytes));
    }
    // The frames carry valid checksums.
    assert_eq!(dict_stats_v4().len(), 24);
    assert_eq!(dict_stats_v6().len(), 48);
    assert_eq!(with([1, 1, 17, 2], &v6_body()).len(), 40);
    assert_eq!(hello(1, 0, 1, "a").len(), 16);
    let frame = tcp_frame("192.0.2.1:1".parse().unwrap(), "192.0.2.2:2".parse().unwrap(), 1, 2, PSH_ACK, &PEER_JOIN_1);
    // A checksum over the whole header (or segment with its pseudo-header) is zero.
    assert_eq!(checksum(&[&frame[14..34]]), 0);
    let v4 = [Ipv4Addr::new(192, 0, 2, 1).octets(), Ipv4Addr::new(192, 0, 2, 2).octets()].concat();
    assert_eq!(checksum(&[&v4, &[0, 6, 0, 24], &frame[34..]]), 0);
    let (s6, d6): (Ipv6Addr, Ipv6Addr) = ("2001:db8::1".parse().unwrap(), "2001:db8::2".parse().unwrap());
    let frame6 = tcp_frame(SocketAddr::new(s6.into(), 1), SocketAddr::new(d6.into(), 2), 1, 2, ACK, &[]);
    assert_eq!(frame6.len(), 14 + 40 + 20);
    assert_eq!(checksum(&[&s6.octets(), &d6.octets(), &[0, 0, 0, 20, 0, 0, 0, 6], &frame6[54..]]), 0);
}
