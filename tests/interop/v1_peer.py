"""Independent peer for the version-1 cluster control protocol, and an interop runner for `lb`.

Written only from the version-1 message table and the daemon's documented interface
(TOML config, admin HTTP API). No daemon source code was consulted.

    python3 v1_peer.py /path/to/lb     run the interop checks against a freshly started daemon
    python3 v1_peer.py --self-test     round-trip the codec against hand-derived golden bytes

Both modes print `PASS name` / `FAIL name: why` lines and end with `N passed, M failed`
(exit status 0 only if nothing failed). Standard library only, Python 3.11.
"""
import ipaddress
import json
import random
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

# ----------------------------------------------------------------------------- codec
INSTALL_CONNECTION, REMOVE_CONNECTION, CLUSTER_PEER_SYNC = 1, 2, 3
FORWARD, BYPASS = 1, 2
PEER_JOIN, PEER_KEEPALIVE, PEER_LEAVE, PEER_REJECT = 1, 2, 3, 4
TCP, UDP = 6, 17
AF_V4, AF_V6 = 1, 2
ERR_NONE, ERR_NOT_MEMBER, ERR_VERSION, ERR_BAD_MESSAGE, ERR_DUPLICATE = range(5)

HEADER_LEN = 4                               # also the whole size of a CLUSTER_PEER_SYNC message
CONN_LEN = {AF_V4: 16, AF_V6: 40}            # header + 2 ports + 2 addresses
PROTO_NAMES = {TCP: "tcp", UDP: "udp"}
ACTION_NAMES = {FORWARD: "forward", BYPASS: "bypass"}
SYNC_NAMES = {PEER_JOIN: "PEER_JOIN", PEER_KEEPALIVE: "PEER_KEEPALIVE",
              PEER_LEAVE: "PEER_LEAVE", PEER_REJECT: "PEER_REJECT"}


class ProtocolError(Exception):
    """The bytes are not a valid version-1 message."""


def parse_endpoint(text):
    """'192.0.2.1:80' or '[2001:db8::1]:80' -> (ip_address, port)."""
    host, sep, port = text[1:].partition("]:") if text.startswith("[") else text.rpartition(":")
    if not sep:
        raise ValueError(f"not an ip:port endpoint: {text!r}")
    return ipaddress.ip_address(host), int(port)


def format_endpoint(ip, port):
    return f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"


@dataclass(frozen=True)
class Conn:
    protocol: int                            # TCP or UDP
    src: object                              # ipaddress.IPv4Address / IPv6Address
    sport: int
    dst: object
    dport: int

    @classmethod
    def make(cls, protocol, src, dst):
        (sip, sport), (dip, dport) = parse_endpoint(src), parse_endpoint(dst)
        if sip.version != dip.version:
            raise ValueError("src and dst must be the same address family")
        return cls(protocol, sip, sport, dip, dport)

    @property
    def family(self):
        return AF_V4 if self.src.version == 4 else AF_V6

    def key(self):
        """Canonical text form, also used to match admin-API flows: 'tcp 192.0.2.1:1->198.51.100.1:80'."""
        return (f"{PROTO_NAMES[self.protocol]} "
                f"{format_endpoint(self.src, self.sport)}->{format_endpoint(self.dst, self.dport)}")


@dataclass(frozen=True, repr=False)
class ConnMsg:                               # INSTALL_CONNECTION / REMOVE_CONNECTION
    mtype: int
    action: int
    conn: Conn

    def __repr__(self):
        kind = "INSTALL" if self.mtype == INSTALL_CONNECTION else "REMOVE"
        return f"{kind}({ACTION_NAMES[self.action]} {self.conn.key()})"


@dataclass(frozen=True, repr=False)
class SyncMsg:                               # CLUSTER_PEER_SYNC
    action: int
    arg: int = 0                             # version for PEER_JOIN, error code for LEAVE/REJECT

    def __repr__(self):
        return f"{SYNC_NAMES[self.action]}({self.arg})"


def install(action, conn): return ConnMsg(INSTALL_CONNECTION, action, conn)
def remove(action, conn): return ConnMsg(REMOVE_CONNECTION, action, conn)
def peer_join(version=1): return SyncMsg(PEER_JOIN, version)
def peer_keepalive(): return SyncMsg(PEER_KEEPALIVE)
def peer_leave(code=ERR_NONE): return SyncMsg(PEER_LEAVE, code)
def peer_reject(code): return SyncMsg(PEER_REJECT, code)


def encode(msg):
    if isinstance(msg, SyncMsg):
        return bytes([CLUSTER_PEER_SYNC, msg.action, msg.arg, 0])
    c = msg.conn
    head = struct.pack("!BBBBHH", msg.mtype, msg.action, c.protocol, c.family, c.sport, c.dport)
    return head + c.src.packed + c.dst.packed


def message_length(header):
    """Length of the whole message, derived from its 4-byte header (raises ProtocolError)."""
    mtype, action, b2, b3 = header
    if mtype in (INSTALL_CONNECTION, REMOVE_CONNECTION):
        if action in ACTION_NAMES and b2 in PROTO_NAMES and b3 in CONN_LEN:
            return CONN_LEN[b3]
    elif mtype == CLUSTER_PEER_SYNC and action in SYNC_NAMES:
        if b3 == 0 and (action != PEER_KEEPALIVE or b2 == 0):
            return HEADER_LEN
    raise ProtocolError(f"unrecognized header {bytes(header).hex(' ')}")


def decode(buf):
    """Decode one message from the start of buf: (msg, length), or (None, 0) if incomplete."""
    if len(buf) < HEADER_LEN:
        return None, 0
    n = message_length(buf[:HEADER_LEN])
    if len(buf) < n:
        return None, 0
    mtype, action, b2, b3 = buf[:HEADER_LEN]
    if mtype == CLUSTER_PEER_SYNC:
        return SyncMsg(action, b2), n
    alen = 4 if b3 == AF_V4 else 16
    sport, dport = struct.unpack("!HH", bytes(buf[4:8]))
    src = ipaddress.ip_address(bytes(buf[8:8 + alen]))
    dst = ipaddress.ip_address(bytes(buf[8 + alen:8 + 2 * alen]))
    return ConnMsg(mtype, action, Conn(b2, src, sport, dst, dport)), n


class Reader:
    """Streaming reader: feed arbitrary chunks, take out whole messages."""

    def __init__(self):
        self.buf = bytearray()

    def feed(self, data):
        self.buf += data

    def next(self):
        msg, n = decode(self.buf)
        if msg is not None:
            del self.buf[:n]
        return msg


# ----------------------------------------------------------------------------- peer
DAEMON_IP, MEMBER_IP, STRANGER_IP = "127.0.0.1", "127.0.0.2", "127.0.0.9"


class Peer:
    """One control channel to the daemon, dialed from a chosen local address."""

    def __init__(self, sock):
        self.sock, self.reader = sock, Reader()
        self.eof = self.reset = False        # orderly close seen / connection reset seen
        self._lock, self._ka_stop = threading.Lock(), None

    @classmethod
    def connect(cls, bind_ip, port, host=DAEMON_IP, timeout=3.0):
        """Dial host:port from bind_ip, retrying 'connection refused' until the timeout."""
        deadline = time.monotonic() + timeout
        while True:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.settimeout(timeout)
            try:
                s.bind((bind_ip, 0))
                s.connect((host, port))
                return cls(s)
            except ConnectionRefusedError:
                s.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def send(self, msg):
        data = msg if isinstance(msg, (bytes, bytearray)) else encode(msg)
        with self._lock:
            self.sock.sendall(data)

    def join(self, version=1, timeout=3.0):
        """Send PEER_JOIN and return the first message received (None if closed)."""
        self.send(peer_join(version))
        return self.recv_message(timeout)

    def recv_message(self, timeout=3.0):
        """Next whole message; None on orderly close; raises TimeoutError / ConnectionResetError."""
        deadline = time.monotonic() + timeout
        while (msg := self.reader.next()) is None:
            if self.eof:
                if self.reader.buf:
                    raise ProtocolError(f"closed mid-message: {bytes(self.reader.buf).hex(' ')}")
                return None
            remaining = deadline - time.monotonic()
            try:
                if remaining <= 0:
                    raise TimeoutError
                self.sock.settimeout(remaining)
                data = self.sock.recv(65536)
            except TimeoutError:
                raise TimeoutError(f"no message from the daemon within {timeout}s") from None
            self.eof = not data
            self.reader.feed(data)
        return msg

    def collect(self, seconds):
        """Every message received within `seconds`; the list ends with None if the channel closed."""
        out, deadline = [], time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            try:
                msg = self.recv_message(left)
            except TimeoutError:
                break
            except ConnectionResetError:
                self.reset, msg = True, None
            out.append(msg)
            if msg is None:
                break
        return out

    def start_keepalive(self, interval=0.1):
        self._ka_stop = stop = threading.Event()

        def run():
            while not stop.wait(interval):
                try:
                    self.send(peer_keepalive())
                except OSError:
                    return
        threading.Thread(target=run, daemon=True).start()

    def stop_keepalive(self):
        if self._ka_stop:
            self._ka_stop.set()
            self._ka_stop = None
            time.sleep(0.02)                 # let an in-flight keepalive finish

    def close(self, leave=True):
        self.stop_keepalive()
        if leave and not (self.eof or self.reset):
            try:
                self.send(peer_leave(ERR_NONE))
            except OSError:
                pass
        self.sock.close()


# ----------------------------------------------------------------------------- daemon + admin API
class CheckFailed(Exception):
    pass


def expect(cond, why):
    if not cond:
        raise CheckFailed(why)


def free_port(used=()):
    while True:
        port = random.randint(20000, 60000)
        with socket.socket() as s:
            try:
                s.bind((DAEMON_IP, port))
            except OSError:
                continue
        if port not in used:
            return port


CONFIG = """[node]
address = "{daemon}"

[cluster]
port = {port}
version = 1
keepalive_ms = 200
dead_after = 3
connect_retries = "infinite"
plaintext = true
members = ["{daemon}", "{member}"]

[admin]
listen = "{daemon}:{admin_port}"
"""


class Harness:
    """A daemon started from a fresh config file, plus the channels opened against it."""

    def __init__(self, binary):
        self.binary, self.proc, self.peers = binary, None, []
        self.tmp = tempfile.TemporaryDirectory(prefix="lb-v1-interop-")
        self.port = free_port()
        self.admin_port = free_port({self.port})
        self.config, self.log = Path(self.tmp.name) / "lb.toml", Path(self.tmp.name) / "lb.log"
        self.config.write_text(CONFIG.format(daemon=DAEMON_IP, member=MEMBER_IP,
                                             port=self.port, admin_port=self.admin_port))
        self.http = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # ignore *_proxy env

    def start(self, timeout=10.0):
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen([self.binary, "run", "--config", str(self.config)],
                                         stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited with status {self.proc.returncode}")
            try:
                return self.get("/peers")
            except OSError as e:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"admin API not up after {timeout}s: {e}")
                time.sleep(0.1)

    def stop(self):
        self.close_peers(settle=False)
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(3)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(3)

    def _call(self, method, path, body=None, timeout=3.0):
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(f"http://{DAEMON_IP}:{self.admin_port}{path}", data=data, method=method,
                                     headers={"Content-Type": "application/json"} if data else {})
        with self.http.open(req, timeout=timeout) as resp:
            raw = resp.read()
            return resp.status, (json.loads(raw) if raw.strip() else None)

    def get(self, path, **query):
        return self._call("GET", path + ("?" + urllib.parse.urlencode(query) if query else ""))[1]

    def post_connection(self, action, conn):
        body = {"protocol": PROTO_NAMES[conn.protocol], "src": format_endpoint(conn.src, conn.sport),
                "dst": format_endpoint(conn.dst, conn.dport), "action": ACTION_NAMES[action]}
        status, _ = self._call("POST", "/connections", body)
        expect(status in (200, 201), f"POST /connections returned {status}")

    def owned_flows(self, owner=MEMBER_IP):
        """{Conn.key() form: flow} for the /flows entries whose owner is `owner`."""
        flows = self.get("/flows", member=owner)["flows"]
        return {f"{f['protocol'].lower()} {format_endpoint(*parse_endpoint(f['src']))}"
                f"->{format_endpoint(*parse_endpoint(f['dst']))}": f for f in flows if f.get("owner") == owner}

    def connect(self, bind_ip=MEMBER_IP):
        p = Peer.connect(bind_ip, self.port)
        self.peers.append(p)
        return p

    def join_member(self, version=1, attempts=6):
        """Dial from the member address and join (retrying on PEER_REJECT(4)); keepalives start
        on success. Returns (peer, first message received)."""
        for _ in range(attempts):
            p = self.connect(MEMBER_IP)
            reply = p.join(version)
            if reply != peer_reject(ERR_DUPLICATE):
                if reply == peer_join(version):
                    p.start_keepalive()
                return p, reply
            p.close(leave=False)
            self.peers.remove(p)
            time.sleep(0.3)
        raise CheckFailed(f"PEER_REJECT(4) duplicate channel on all {attempts} join attempts")

    def close_peers(self, settle=True):
        """PEER_LEAVE(0) and close every channel, then give the daemon time to drop them."""
        for p in self.peers:
            p.close(leave=True)
        if self.peers and settle:
            time.sleep(0.3)
        self.peers = []


def wait_until(probe, cond, timeout, what):
    deadline = time.monotonic() + timeout
    while not cond(last := probe()):
        if time.monotonic() > deadline:
            shown = sorted(last) if isinstance(last, dict) else last
            raise CheckFailed(f"timed out after {timeout}s waiting for {what}; last seen: {shown}")
        time.sleep(0.1)
    return last


# ----------------------------------------------------------------------------- checks
V4_TCP = Conn.make(TCP, "192.0.2.1:40000", "198.51.100.7:80")
V6_UDP = Conn.make(UDP, "[2001:db8::1]:5353", "[2001:db8:1::2]:53")
TABLE = [(FORWARD, Conn.make(TCP, "[2001:db8::10]:1234", "[2001:db8::20]:80")),   # IPv6
         (FORWARD, Conn.make(UDP, "192.0.2.10:5000", "198.51.100.20:53")),        # UDP
         (BYPASS, Conn.make(TCP, "192.0.2.11:1234", "203.0.113.30:443"))]         # BYPASS
KEEPALIVE = peer_keepalive()


def joined(h):
    """Join from the member address and insist on PEER_JOIN(1) as the first reply (check `join`)."""
    p, reply = h.join_member()
    expect(reply == peer_join(1), f"first message after PEER_JOIN(1) was {reply}, expected PEER_JOIN(1)")
    return p


def check_receive_table(h):
    for action, conn in TABLE:
        h.post_connection(action, conn)
    got = [m for m in joined(h).collect(2.0) if m != KEEPALIVE]
    want = [install(a, c) for a, c in TABLE]
    expect(None not in got, f"channel closed after {got[:-1]}")
    expect(len(got) == len(want) and set(got) == set(want), f"expected exactly {want}, got {got}")


def check_install_visible(h):
    p = joined(h)
    p.send(install(FORWARD, V4_TCP))
    p.send(install(BYPASS, V6_UDP))
    keys = {V4_TCP.key(): "forward", V6_UDP.key(): "bypass"}
    flows = wait_until(h.owned_flows, lambda f: all(k in f for k in keys), 5.0, "both flows in /flows")
    for key, action in keys.items():
        expect(flows[key].get("action") == action, f"{key}: action {flows[key].get('action')!r}, not {action!r}")
        expect(flows[key].get("local") is not True, f"{key}: reported as local")
    p.send(remove(FORWARD, V4_TCP))
    wait_until(h.owned_flows, lambda f: V4_TCP.key() not in f, 5.0, "the removed flow to disappear")
    expect(V6_UDP.key() in h.owned_flows(), "REMOVE of one flow also dropped the other")


def check_keepalive(h):
    got = joined(h).collect(1.5)             # our own keepalives go out every 100 ms meanwhile
    expect(None not in got, f"daemon closed the channel; received {got[:-1]}")
    bad = [m for m in got if isinstance(m, SyncMsg) and m.action in (PEER_LEAVE, PEER_REJECT)]
    expect(not bad, f"daemon sent {bad}")
    expect(KEEPALIVE in got, f"no PEER_KEEPALIVE from the daemon within 1.5 s; received {got}")


def _expect_reject_and_close(p, reply, code):
    expect(reply == peer_reject(code), f"got {reply}, expected PEER_REJECT({code})")
    rest = p.collect(3.0)
    expect(rest == [None], f"expected only a close after PEER_REJECT, got {rest or 'nothing in 3 s'}")
    expect(not p.reset, "connection reset instead of an orderly close (recv should return b'')")


def check_reject_not_member(h):
    p = h.connect(STRANGER_IP)
    _expect_reject_and_close(p, p.join(1), ERR_NOT_MEMBER)


def check_reject_version(h):
    _expect_reject_and_close(*h.join_member(version=2), ERR_VERSION)


def _join_and_install(h, conns):
    p = joined(h)
    for action, conn in conns:
        p.send(install(action, conn))
    wait_until(h.owned_flows, lambda f: all(c.key() in f for _, c in conns), 5.0, "installed flows in /flows")
    p.stop_keepalive()                       # nothing may follow the message the check sends next
    return p


def check_bad_message_drops_entries(h):
    p = _join_and_install(h, [(FORWARD, V4_TCP), (BYPASS, V6_UDP)])
    p.send(b"\x09\x09\x09\x09")
    unread_table = {install(a, c) for a, c in TABLE}   # sent right after the join, maybe still unread
    got = [m for m in p.collect(3.0) if m != KEEPALIVE and m not in unread_table]
    expect(got == [peer_leave(ERR_BAD_MESSAGE), None], f"expected PEER_LEAVE(3) then close, got {got}")
    wait_until(h.owned_flows, lambda f: not f, 5.0, f"no flows owned by {MEMBER_IP}")


def check_leave_purges(h):
    p = _join_and_install(h, [(FORWARD, V4_TCP)])
    p.send(peer_leave(ERR_NONE))
    wait_until(h.owned_flows, lambda f: not f, 2.0, f"no flows owned by {MEMBER_IP}")


def check_garbage_first(h):
    p = h.connect(MEMBER_IP)
    p.send(b"GET / HTTP/1.0\r\n\r\n")
    try:
        got = p.collect(3.0)
    except ProtocolError as e:
        raise CheckFailed(f"daemon answered with bytes that are not version-1 messages: {e}")
    expect(got[-1:] == [None], f"daemon did not close the connection within 3 s; received {got}")
    expect(all(isinstance(m, SyncMsg) and m.action in (PEER_LEAVE, PEER_REJECT) for m in got[:-1]),
           f"unexpected messages before the close: {got[:-1]}")
    h.close_peers()
    joined(h)                                # the daemon must still accept a normal join


CHECKS = [("join", joined), ("receive_table", check_receive_table),
          ("install_visible", check_install_visible), ("keepalive", check_keepalive),
          ("reject_not_member", check_reject_not_member), ("reject_version", check_reject_version),
          ("bad_message_drops_entries", check_bad_message_drops_entries),
          ("leave_purges", check_leave_purges), ("garbage_first", check_garbage_first)]
CHECK_TIMEOUT = 20                           # seconds; hard per-check ceiling enforced with SIGALRM


def _alarm(signum, frame):
    raise TimeoutError(f"check exceeded its {CHECK_TIMEOUT}s ceiling")


def run_checks(binary):
    signal.signal(signal.SIGALRM, _alarm)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(2))   # SystemExit still runs the finally below
    h, results = Harness(binary), []
    try:
        try:
            h.start()
        except (OSError, RuntimeError) as e:
            for name, _ in CHECKS:
                print(f"FAIL {name}: daemon did not start: {e}", flush=True)
            return [False] * len(CHECKS)
        for name, fn in CHECKS:
            signal.alarm(CHECK_TIMEOUT)
            try:
                fn(h)
                print(f"PASS {name}", flush=True)
                results.append(True)
            except Exception as e:           # every failure is reported against its check
                why = str(e) if isinstance(e, CheckFailed) else f"{type(e).__name__}: {e}"
                print(f"FAIL {name}: {why}", flush=True)
                results.append(False)
            finally:
                signal.alarm(0)
                h.close_peers()
        return results
    finally:
        h.stop()
        if not all(results) and h.log.exists():
            tail = h.log.read_text(errors="replace").splitlines()[-30:]
            print("--- daemon log tail ---", *tail, sep="\n", file=sys.stderr)
        h.tmp.cleanup()


# ----------------------------------------------------------------------------- self-test
GOLDEN = [  # (name, message, bytes derived by hand from the version-1 table)
    ("install_v4_forward_tcp", install(FORWARD, V4_TCP),
     "01 01 06 01 9c 40 00 50 c0 00 02 01 c6 33 64 07"),
    ("remove_v4_bypass_udp", remove(BYPASS, Conn.make(UDP, "203.0.113.5:1", "198.51.100.255:65535")),
     "02 02 11 01 00 01 ff ff cb 00 71 05 c6 33 64 ff"),
    ("install_v6_bypass_udp", install(BYPASS, V6_UDP),
     "01 02 11 02 14 e9 00 35 20 01 0d b8" + " 00" * 11 + " 01 20 01 0d b8 00 01" + " 00" * 9 + " 02"),
    ("remove_v6_forward_tcp", remove(FORWARD, Conn.make(TCP, "[2001:db8::a]:443", "[2001:db8::b]:8080")),
     "02 01 06 02 01 bb 1f 90 20 01 0d b8" + " 00" * 11 + " 0a 20 01 0d b8" + " 00" * 11 + " 0b"),
    ("peer_join_v1", peer_join(1), "03 01 01 00"),
    ("peer_join_v2", peer_join(2), "03 01 02 00"),
    ("peer_keepalive", peer_keepalive(), "03 02 00 00"),
    ("peer_leave_none", peer_leave(ERR_NONE), "03 03 00 00"),
    ("peer_leave_bad_message", peer_leave(ERR_BAD_MESSAGE), "03 03 03 00"),
    ("peer_reject_not_member", peer_reject(ERR_NOT_MEMBER), "03 04 01 00"),
    ("peer_reject_version", peer_reject(ERR_VERSION), "03 04 02 00"),
    ("peer_reject_duplicate", peer_reject(ERR_DUPLICATE), "03 04 04 00"),
]
# unknown type, "GET ", bad family, bad action, bad protocol, unknown sync action, non-zero reserved bytes
BAD_HEADERS = ["09 09 09 09", "47 45 54 20", "01 01 06 03", "01 03 06 01", "02 01 01 01",
               "03 05 00 00", "03 02 01 00", "03 01 01 01", "00 00 00 00"]


def self_test():
    results = []

    def check(name, fn):
        try:
            fn()
            print(f"PASS {name}")
            results.append(True)
        except Exception as e:
            print(f"FAIL {name}: {type(e).__name__}: {e}")
            results.append(False)

    def roundtrip(msg, golden):
        data = bytes.fromhex(golden)
        assert encode(msg) == data, f"encode gave {encode(msg).hex(' ')}"
        assert len(data) == (HEADER_LEN if isinstance(msg, SyncMsg) else CONN_LEN[msg.conn.family])
        assert decode(data) == (msg, len(data)), f"decode gave {decode(data)}"
        assert decode(data[:-1]) == (None, 0), "a truncated message decoded"

    def stream():
        msgs = [m for _, m, _ in GOLDEN]
        data, r, out = b"".join(map(encode, msgs)), Reader(), []
        for i in range(len(data)):           # one byte at a time
            r.feed(data[i:i + 1])
            while (m := r.next()) is not None:
                out.append(m)
        assert out == msgs and not r.buf, f"got {out}"

    def bad(header):
        try:
            decode(bytes.fromhex(header) + bytes(36))
        except ProtocolError:
            return
        raise AssertionError("accepted")

    def endpoints():
        assert parse_endpoint("[2001:db8::1]:53") == (ipaddress.ip_address("2001:db8::1"), 53)
        assert parse_endpoint("192.0.2.1:1000") == (ipaddress.ip_address("192.0.2.1"), 1000)
        assert V6_UDP.key() == "udp [2001:db8::1]:5353->[2001:db8:1::2]:53", V6_UDP.key()

    for name, msg, golden in GOLDEN:
        check(name, lambda m=msg, g=golden: roundtrip(m, g))
    check("stream_reader_bytewise", stream)
    for header in BAD_HEADERS:
        check("reject_header_" + header.replace(" ", ""), lambda hd=header: bad(hd))
    check("endpoint_format", endpoints)
    return results


def main(argv):
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    results = self_test() if argv[1] == "--self-test" else run_checks(argv[1])
    failed = results.count(False)
    print(f"{len(results) - failed} passed, {failed} failed", flush=True)
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
