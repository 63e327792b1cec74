#!/usr/bin/env python3
"""Full-table sync to a restarted peer: HAProxy stick-table peers vs. our cluster sync.

What is measured (the HAProxy half)
-----------------------------------
Two HAProxy processes, A and B, run on loopback. They name each other in one
``peers`` section and share one stick table, ``type binary len 13`` (a 13-byte
key stands for an IPv4 5-tuple: protocol, source address, destination address,
source port, destination port; the same connections ``benches::connection(i)``
builds). A is filled with N entries once. A trial then:

  1. starts the clock right before spawning a *fresh* B (new process, empty
     table, no old process to resync from, so no "local" resync);
  2. polls B's stats socket (``show table`` header, ``used:``) every few ms
     until B reports N entries; the time is start -> B holds the whole table,
     so it includes B's process start and config parsing;
  3. kills B (SIGKILL, like a crash) and waits until A's ``show peers`` says its
     session to B is gone, so the next trial starts from the same state.

How A is filled
---------------
HAProxy 2.6's ``set table`` CLI command refuses binary keys ("Inserting keys
into tables of type other than ip, ipv6, string and integer is not
supported"), so the CLI cannot fill this table. A therefore also has a small
HTTP frontend on loopback that creates one entry per request
(``http-request track-sc0 req.hdr(k),b64dec`` + ``sc-inc-gpc0``) and answers
itself (``http-request return``); the script pipelines requests carrying the
base64 keys over one keep-alive connection, then checks ``show table`` on A.
B has no frontend at all (a backend holding a stick table is a valid config on
its own).

Startup behaviour of HAProxy peers (2.6)
----------------------------------------
A starting process first tries to learn the table from the *local* peer (the
old process of a reload) and only then from remote peers, giving up on the
local one after a fixed "resync timeout" of 5 s. That wait only happens when
there are old pids (``-sf``/``-st``, i.e. a reload); a fresh start like ours
skips it at once, so no peers-section setting is needed or used (2.6 has no
knob for this timeout anyway). The figures are plain defaults.

What is measured (the lb half)
------------------------------
The same shape with two ``lb run`` processes on loopback (A on 127.0.0.62, B
on 127.0.0.61, plaintext control channel, default settings but a flood-guard
cap above N). A is filled once through ``POST /connections`` (JSON arrays of
20,000 connections, the same 5-tuples as the HAProxy keys). A trial starts the
clock right before spawning a fresh B, polls B's ``GET /peers`` every 2 ms
until B holds N entries of A (``entries``), SIGKILLs B and waits until A no
longer has B established. It also samples A's RSS during the trial: the growth
of the sender while it streams its table.

The two systems' trials are interleaved (HAProxy, lb, HAProxy, ...) on pairs
set up once per size; the script prints the medians and lb's median over
HAProxy's.

Usage
-----
    benches/sync-vs-haproxy.py --entries 800000,2000000 --trials 10

``--only haproxy`` or ``--only lb`` runs one system; ``--lb PATH`` skips the
cargo build. Standard library only (Python 3.11). Needs root only if HAProxy
must be installed (``apt-get install -y haproxy``). Do not run it next to a
heavy build if the figures are to be trusted.
"""

from __future__ import annotations

import argparse
import atexit
import base64
import ctypes
import http.client
import json
import os
import re
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

PEERS = "pp"  # peers section name
TABLE = "bk"  # backend holding the stick table (the table is named after it)
LOOPBACK = "127.0.0.1"

POLL_S = 0.002  # B's stats socket poll period
START_TIMEOUT_S = 10.0  # B's stats socket must answer within this
SYNC_TIMEOUT_S = 120.0  # B must hold all entries within this
NOTICE_TIMEOUT_S = 30.0  # A must see its session to B gone within this
FILL_TIMEOUT_S = 600.0  # filling A, overall
CLI_TIMEOUT_S = 10.0  # one stats-socket command

# --------------------------------------------------------------------------
# Child processes: always killed, even when this script fails or is killed.
# --------------------------------------------------------------------------

_children: list[subprocess.Popen] = []


def _kill_children() -> None:
    for p in _children:
        if p.poll() is None:
            p.kill()
    for p in _children:
        try:
            p.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
    _children.clear()


atexit.register(_kill_children)


def _exit_on_signal(signum, _frame):
    raise SystemExit(128 + signum)  # runs finally blocks and atexit


for _sig in (signal.SIGTERM, signal.SIGHUP):
    signal.signal(_sig, _exit_on_signal)

_PR_SET_PDEATHSIG = 1
try:
    _libc = ctypes.CDLL(None, use_errno=True)
except OSError:
    _libc = None


def _die_with_parent() -> None:
    # Child side of the fork: if this script dies by SIGKILL, the kernel kills
    # haproxy too (atexit cannot run then).
    if _libc is not None:
        _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def _spawn(argv: list[str], log_path: str) -> subprocess.Popen:
    log = open(log_path, "wb")
    try:
        p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                             preexec_fn=_die_with_parent)
    finally:
        log.close()
    _children.append(p)
    return p


def _stop(p: subprocess.Popen | None, sig: int = signal.SIGKILL) -> None:
    if p is None:
        return
    if p.poll() is None:
        p.send_signal(sig)
    try:
        p.wait(timeout=10)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait(timeout=10)
    if p in _children:
        _children.remove(p)


def _log_tail(path: str, lines: int = 15) -> str:
    try:
        with open(path, "r", errors="replace") as f:
            tail = f.read().splitlines()[-lines:]
    except OSError:
        return "(no log)"
    return "\n".join("    " + line for line in tail) or "    (empty log)"


# --------------------------------------------------------------------------
# HAProxy installation
# --------------------------------------------------------------------------


def ensure_haproxy() -> str:
    """Install haproxy with apt-get if it is not on PATH; print and return its version."""
    if shutil.which("haproxy") is None:
        if os.geteuid() != 0:
            raise SystemExit("haproxy is not on PATH and installing it needs root (apt-get install -y haproxy)")
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        install = ["apt-get", "install", "-y", "haproxy"]
        print("haproxy not found; running: " + " ".join(install), flush=True)
        if subprocess.run(install, env=env, timeout=900).returncode != 0:
            print("install failed; running apt-get update and retrying", flush=True)
            subprocess.run(["apt-get", "update"], env=env, timeout=900, check=True)
            subprocess.run(install, env=env, timeout=900, check=True)
        if shutil.which("haproxy") is None:
            raise SystemExit("apt-get reported success but haproxy is still not on PATH")
    out = subprocess.run(["haproxy", "-v"], capture_output=True, text=True, timeout=30).stdout
    first = out.splitlines()[0] if out else "unknown"
    m = re.search(r"version (\S+)", first)
    version = m.group(1) if m else first
    print(f"haproxy: {first}", flush=True)
    return version


# --------------------------------------------------------------------------
# Stats socket (CLI)
# --------------------------------------------------------------------------


def cli(sock_path: str, command: str, timeout: float = CLI_TIMEOUT_S) -> str:
    """One non-interactive CLI command: HAProxy answers and closes the connection."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(sock_path)
        s.sendall(command.encode() + b"\n")
        chunks = []
        while True:
            d = s.recv(1 << 16)
            if not d:
                break
            chunks.append(d)
    return b"".join(chunks).decode(errors="replace")


_USED = re.compile(r"# table: (\S+?), type: \S+?, size:(\d+), used:(\d+)")


def table_used(show_table_output: str, table: str = TABLE) -> int | None:
    for name, _size, used in _USED.findall(show_table_output):
        if name == table:
            return int(used)
    return None


class CliSession:
    """Interactive ("prompt" mode) connection, so polling does not reconnect every time."""

    def __init__(self, sock_path: str, timeout: float = CLI_TIMEOUT_S):
        self.s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.s.settimeout(timeout)
        try:
            self.s.connect(sock_path)  # FileNotFoundError / ConnectionRefusedError until haproxy is up
            self.buf = b""
            self._ask(b"prompt")
        except BaseException:
            self.s.close()
            raise

    def _ask(self, cmd: bytes) -> str:
        self.s.sendall(cmd + b"\n")
        while not self.buf.endswith(b"\n> ") and self.buf != b"> ":
            d = self.s.recv(1 << 16)
            if not d:
                raise ConnectionError("stats socket closed")
            self.buf += d
        out, self.buf = self.buf, b""
        return out[:-2].decode(errors="replace")

    def used(self, table: str = TABLE) -> int:
        out = self._ask(b"show table")
        n = table_used(out, table)
        if n is None:
            raise RuntimeError(f"no table {table!r} in 'show table' output: {out!r}")
        return n

    def close(self) -> None:
        self.s.close()


def _peer_connected(show_peers_output: str, peer: str) -> bool:
    """Whether the 'show peers' block of <peer> (as seen by another process) has a live session."""
    for block in re.split(r"\n\s*0x[0-9a-f]+: id=", "\n" + show_peers_output):
        m = re.match(re.escape(peer) + r"\((\w+),(\w+)\)", block)
        if m:
            return m.group(2) == "active" or "state=EST" in block
    raise RuntimeError(f"peer {peer!r} not found in 'show peers' output:\n{show_peers_output}")


# --------------------------------------------------------------------------
# Keys
# --------------------------------------------------------------------------

_KEY = struct.Struct(">BIIHH")  # protocol, src addr, dst addr, src port, dst port = 13 bytes
assert _KEY.size == 13


def key(i: int) -> bytes:
    """13-byte key of connection i, the 5-tuple of benches::connection(i)."""
    src = 0xC612_0000 | (i >> 12)  # 198.18.x.y
    dst = (203 << 24) | (113 << 8) | (i % 251)  # 203.0.113.z
    return _KEY.pack(6, src, dst, 1024 + (i & 0xFFF), 443)


def _free_ports(n: int) -> list[int]:
    socks, ports = [], []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((LOOPBACK, 0))
            socks.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in socks:
            s.close()
    return ports


# --------------------------------------------------------------------------
# The pair
# --------------------------------------------------------------------------


@dataclass
class HaproxyPair:
    """A (filled once) and B (restarted every trial) sharing one stick table over peers."""

    entries: int
    workdir: str | None = None
    threads: int | None = None  # nbthread of each process; None = HAProxy's default (all CPUs)
    keep_workdir: bool = False
    verbose: bool = True
    fill_seconds: float | None = None
    last: dict = field(default_factory=dict)  # breakdown of the last trial
    _a: subprocess.Popen | None = None
    _b: subprocess.Popen | None = None
    _own_workdir: bool = False
    _trials: int = 0

    # ---- config ----

    def _config(self, name: str) -> str:
        size = self.entries + self.entries // 8 + 1024  # never full: a full table would purge entries
        lines = [
            "global",
            f"    localpeer {name}",
            f"    stats socket {self._sock(name)} level admin",
        ]
        if self.threads:
            lines.append(f"    nbthread {self.threads}")
        lines += [
            "",
            "defaults",
            "    timeout connect 1s",
            "    timeout client 60s",
            "    timeout server 60s",
            "",
            f"peers {PEERS}",
            f"    peer a {LOOPBACK}:{self.port_a}",
            f"    peer b {LOOPBACK}:{self.port_b}",
            "",
        ]
        if name == "a":
            # Only used to fill A: `set table` cannot insert binary keys in 2.6.
            lines += [
                "frontend fill",
                "    mode http",
                f"    bind {LOOPBACK}:{self.port_fill}",
                f"    http-request track-sc0 req.hdr(k),b64dec table {TABLE}",
                "    http-request sc-inc-gpc0(0)",
                "    http-request return status 200",
                "",
            ]
        lines += [
            f"backend {TABLE}",
            f"    stick-table type binary len 13 size {size} expire 1h peers {PEERS} store gpc0",
            "",
        ]
        return "\n".join(lines)

    def _sock(self, name: str) -> str:
        return os.path.join(self.workdir, f"{name}.sock")

    def _cfg(self, name: str) -> str:
        return os.path.join(self.workdir, f"{name}.cfg")

    def _log(self, name: str) -> str:
        return os.path.join(self.workdir, f"{name}.log")

    def _say(self, msg: str) -> None:
        if self.verbose:
            print(msg, flush=True)

    # ---- lifecycle ----

    def __enter__(self) -> "HaproxyPair":
        self.setup()
        return self

    def __exit__(self, *exc) -> None:
        self.teardown()

    def setup(self) -> "HaproxyPair":
        if self.workdir is None:
            self.workdir = tempfile.mkdtemp(prefix="haproxy-sync-")
            self._own_workdir = True
        else:
            os.makedirs(self.workdir, exist_ok=True)
        if len(self._sock("a")) > 100:
            raise SystemExit(f"workdir path too long for a unix socket: {self.workdir}")
        self.port_a, self.port_b, self.port_fill = _free_ports(3)
        for name in ("a", "b"):
            with open(self._cfg(name), "w") as f:
                f.write(self._config(name))
            chk = subprocess.run(["haproxy", "-c", "-q", "-f", self._cfg(name)], capture_output=True, text=True,
                                 timeout=30)
            if chk.returncode != 0:
                raise SystemExit(f"haproxy rejects {self._cfg(name)}:\n{chk.stdout}{chk.stderr}")
        try:
            self._start_a()
            self._fill()
        except BaseException:
            self.teardown()
            raise
        return self

    def _start_a(self) -> None:
        self._a = _spawn(["haproxy", "-db", "-f", self._cfg("a")], self._log("a"))
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if self._a.poll() is not None:
                raise SystemExit(f"haproxy A exited with {self._a.returncode}:\n{_log_tail(self._log('a'))}")
            try:
                if table_used(cli(self._sock("a"), "show table")) is not None:
                    return
            except (FileNotFoundError, ConnectionRefusedError):
                pass
            if time.monotonic() > deadline:
                raise SystemExit(f"haproxy A's stats socket did not answer within {START_TIMEOUT_S} s:\n"
                                 f"{_log_tail(self._log('a'))}")
            time.sleep(0.01)

    def _fill(self, window: int = 20000) -> None:
        """Insert entries 0..N-1 into A through the fill frontend, <window> pipelined requests at a time."""
        n = self.entries
        t0 = time.monotonic()
        deadline = t0 + FILL_TIMEOUT_S
        head = b"GET / HTTP/1.1\r\nhost: fill\r\nk: "
        tail = b"\r\n\r\n"
        b64 = base64.b64encode
        sent = done = 0
        rest = b""
        with socket.create_connection((LOOPBACK, self.port_fill), timeout=30) as s:
            while done < n:
                if time.monotonic() > deadline:
                    raise SystemExit(f"filling A: only {done} of {n} entries after {FILL_TIMEOUT_S} s")
                if sent < n and sent - done < window:
                    upto = min(n, sent + window)
                    s.sendall(b"".join([head + b64(key(i)) + tail for i in range(sent, upto)]))
                    sent = upto
                try:
                    d = s.recv(1 << 20)
                except socket.timeout:
                    raise SystemExit(f"filling A: no answer for 30 s after {done} of {n} entries") from None
                if not d:
                    raise SystemExit(f"filling A: connection closed after {done} of {n} entries:\n"
                                     f"{_log_tail(self._log('a'))}")
                rest += d
                # Every answer is a bodiless "HTTP/1.1 200 OK ... content-length: 0" header block.
                k = rest.count(b"\r\n\r\n")
                if k:
                    if b" 200 " not in rest:
                        raise SystemExit(f"filling A: unexpected answer {rest[:200]!r}")
                    done += k
                    rest = rest[rest.rfind(b"\r\n\r\n") + 4:]
        self.fill_seconds = time.monotonic() - t0
        used = table_used(cli(self._sock("a"), "show table"))
        if used != n:
            raise SystemExit(f"A holds {used} entries after the fill, expected {n}")
        self._say(f"  filled A with {n} entries in {self.fill_seconds:.2f} s "
                  f"({n / self.fill_seconds:,.0f} entries/s); A's show table: used:{used}")

    def _wait_a_disconnected(self) -> None:
        deadline = time.monotonic() + NOTICE_TIMEOUT_S
        while True:
            out = cli(self._sock("a"), f"show peers {PEERS}")
            if not _peer_connected(out, "b"):
                return
            if time.monotonic() > deadline:
                raise SystemExit(f"A still shows a session to B {NOTICE_TIMEOUT_S} s after B was killed:\n{out}")
            time.sleep(0.005)

    def trial(self) -> float:
        """Start a fresh B; seconds from just before its spawn until B's table holds all entries."""
        if self._a is None or self._a.poll() is not None:
            raise SystemExit("haproxy A is not running (setup() not called, or A died)")
        if self._b is not None:
            raise SystemExit("a B process is still running")
        self._wait_a_disconnected()
        sock_b = self._sock("b")
        try:
            os.unlink(sock_b)  # the old B was killed: its socket file is left behind
        except FileNotFoundError:
            pass
        self._trials += 1
        log_b = self._log(f"b{self._trials}")
        n = self.entries
        sess = None
        t_cli = t_first = None
        used = 0
        t0 = time.monotonic()
        self._b = _spawn(["haproxy", "-db", "-f", self._cfg("b")], log_b)
        try:
            while True:
                now = time.monotonic()
                if sess is None:
                    try:
                        sess = CliSession(sock_b)
                        t_cli = time.monotonic() - t0
                    except (FileNotFoundError, ConnectionRefusedError):
                        if self._b.poll() is not None:
                            raise SystemExit(f"haproxy B exited with {self._b.returncode}:\n{_log_tail(log_b)}")
                        if now - t0 > START_TIMEOUT_S:
                            raise SystemExit(f"B's stats socket did not answer within {START_TIMEOUT_S} s:\n"
                                             f"{_log_tail(log_b)}")
                if sess is not None:
                    used = sess.used()
                    now = time.monotonic()
                    if used and t_first is None:
                        t_first = now - t0
                    if used >= n:
                        took = now - t0
                        break
                    if now - t0 > SYNC_TIMEOUT_S:
                        raise SystemExit(f"B holds only {used} of {n} entries after {SYNC_TIMEOUT_S} s; "
                                         f"B's show peers:\n{cli(sock_b, f'show peers {PEERS}')}")
                time.sleep(POLL_S)
            if used != n:
                raise SystemExit(f"B holds {used} entries, more than the {n} A holds")
        finally:
            if sess is not None:
                sess.close()
            _stop(self._b, signal.SIGKILL)
            self._b = None
        self._wait_a_disconnected()
        self.last = {"seconds": took, "cli_up": t_cli, "first_entry": t_first}
        self._say(f"    haproxy trial {self._trials}: {took * 1e3:8.1f} ms  (B's CLI up at {t_cli * 1e3:.1f} ms, "
                  f"first entry seen at {t_first * 1e3:.1f} ms)")
        return took

    def teardown(self) -> None:
        _stop(self._b)
        self._b = None
        _stop(self._a)
        self._a = None
        if self._own_workdir and not self.keep_workdir and self.workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)
        elif self.workdir:
            self._say(f"  configs and logs kept in {self.workdir}")


# --------------------------------------------------------------------------
# The lb half: two `lb run` processes, the same connections, the same trial
# --------------------------------------------------------------------------

LB_A = "127.0.0.62"  # filled once, like HAProxy's A
LB_B = "127.0.0.61"  # restarted every trial; the lower address, so the channel it dials is the one kept
FILL_BATCH = 20000  # connections per POST /connections (the API takes up to 100,000)


def ensure_lb() -> str:
    """Build lb (release) and return the path of the binary."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    target = os.environ.get("CARGO_TARGET_DIR") or os.path.join(repo, "target")
    print("building lb: cargo build --release -p lb", flush=True)
    subprocess.run(["cargo", "build", "--release", "-p", "lb"], cwd=repo, check=True, timeout=3600)
    path = os.path.join(target, "release", "lb")
    if not os.access(path, os.X_OK):
        raise SystemExit(f"no lb binary at {path} after the build")
    return path


def _http(addr: tuple[str, int], method: str, path: str, body: bytes | None = None,
          timeout: float = 60.0) -> tuple[int, bytes]:
    c = http.client.HTTPConnection(addr[0], addr[1], timeout=timeout)
    try:
        c.request(method, path, body=body, headers={"content-type": "application/json"} if body else {})
        r = c.getresponse()
        return r.status, r.read()
    finally:
        c.close()


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def _cpu_ms(pid: int) -> float:
    """CPU time of every thread of `pid` so far (schedstat, nanoseconds)."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[0])
        except OSError:
            pass
    return total / 1e6


def _peer_view(addr: tuple[str, int], peer: str) -> dict | None:
    status, body = _http(addr, "GET", "/peers")
    if status != 200:
        raise RuntimeError(f"GET /peers answered {status}: {body[:200]!r}")
    for p in json.loads(body)["peers"]:
        if p["address"] == peer:
            return p
    return None


def _connection_json(i: int) -> str:
    """Connection i as POST /connections takes it: the 5-tuple of key(i)."""
    src = 0xC612_0000 | (i >> 12)
    return ('{"protocol":"tcp","src":"198.18.%d.%d:%d","dst":"203.0.113.%d:443"}'
            % ((src >> 8) & 0xFF, src & 0xFF, 1024 + (i & 0xFFF), i % 251))


@dataclass
class LbPair:
    """lb's A (filled once) and B (restarted every trial), plaintext control channel on loopback."""

    entries: int
    binary: str
    workdir: str | None = None
    keep_workdir: bool = False
    verbose: bool = True
    fill_seconds: float | None = None
    last: dict = field(default_factory=dict)
    _a: subprocess.Popen | None = None
    _b: subprocess.Popen | None = None
    _own_workdir: bool = False
    _trials: int = 0

    def _config(self, me: str, admin_port: int) -> str:
        cap = max(4_000_000, 2 * self.entries)
        return (f'[node]\naddress = "{me}"\n[cluster]\nport = {self.port}\nplaintext = true\n'
                f'members = ["{LB_B}", "{LB_A}"]\nmax_entries_per_member = {cap}\n'
                f'[admin]\nlisten = "{me}:{admin_port}"\n')

    def _say(self, msg: str) -> None:
        if self.verbose:
            print(msg, flush=True)

    def _path(self, name: str) -> str:
        return os.path.join(self.workdir, name)

    def __enter__(self) -> "LbPair":
        return self.setup()

    def __exit__(self, *exc) -> None:
        self.teardown()

    def setup(self) -> "LbPair":
        if self.workdir is None:
            self.workdir = tempfile.mkdtemp(prefix="lb-sync-")
            self._own_workdir = True
        else:
            os.makedirs(self.workdir, exist_ok=True)
        self.port, admin_a, admin_b = _free_ports(3)
        self.admin_a, self.admin_b = (LB_A, admin_a), (LB_B, admin_b)
        for name, me, port in (("a", LB_A, admin_a), ("b", LB_B, admin_b)):
            with open(self._path(f"{name}.toml"), "w") as f:
                f.write(self._config(me, port))
        try:
            self._a = self._spawn("a", "a")
            self._wait_admin(self._a, self.admin_a, "a")
            self._fill()
        except BaseException:
            self.teardown()
            raise
        return self

    def _spawn(self, name: str, log: str) -> subprocess.Popen:
        return _spawn([self.binary, "run", "--config", self._path(f"{name}.toml")], self._path(f"{log}.log"))

    def _wait_admin(self, p: subprocess.Popen, addr: tuple[str, int], log: str) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if p.poll() is not None:
                raise SystemExit(f"lb {log} exited with {p.returncode}:\n{_log_tail(self._path(log + '.log'))}")
            try:
                _http(addr, "GET", "/peers", timeout=1)
                return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit(f"lb {log}'s admin API did not answer within {START_TIMEOUT_S} s")
            time.sleep(0.002)

    def _fill(self) -> None:
        n = self.entries
        t0 = time.monotonic()
        for lo in range(0, n, FILL_BATCH):
            hi = min(n, lo + FILL_BATCH)
            body = ("[" + ",".join(_connection_json(i) for i in range(lo, hi)) + "]").encode()
            status, answer = _http(self.admin_a, "POST", "/connections", body)
            if status != 200 or json.loads(answer)["installed"] != hi - lo:
                raise SystemExit(f"filling lb A: POST /connections answered {status}: {answer[:300]!r}")
        self.fill_seconds = time.monotonic() - t0
        self._say(f"  filled lb A with {n} entries in {self.fill_seconds:.2f} s; A's RSS "
                  f"{_rss_kib(self._a.pid) / 1024:.0f} MiB")

    def _wait_a_disconnected(self) -> None:
        deadline = time.monotonic() + NOTICE_TIMEOUT_S
        while True:
            view = _peer_view(self.admin_a, LB_B)
            if view is None or view["state"] != "established":
                return
            if time.monotonic() > deadline:
                raise SystemExit(f"lb A still has B established {NOTICE_TIMEOUT_S} s after B was killed")
            time.sleep(0.005)

    def trial(self) -> float:
        """Start a fresh B; seconds from just before its spawn until B holds all of A's entries."""
        if self._a is None or self._a.poll() is not None:
            raise SystemExit("lb A is not running (setup() not called, or A died)")
        if self._b is not None:
            raise SystemExit("an lb B process is still running")
        self._wait_a_disconnected()
        self._trials += 1
        n = self.entries
        log_b = self._path(f"b{self._trials}.log")
        rss0 = peak = _rss_kib(self._a.pid)
        t_api = t_first = None
        held = 0
        t0 = time.monotonic()
        self._b = self._spawn("b", f"b{self._trials}")
        try:
            while True:
                now = time.monotonic()
                try:
                    view = _peer_view(self.admin_b, LB_A)
                    if t_api is None:
                        t_api = time.monotonic() - t0
                except OSError:
                    view = None
                    if self._b.poll() is not None:
                        raise SystemExit(f"lb B exited with {self._b.returncode}:\n{_log_tail(log_b)}")
                    if now - t0 > START_TIMEOUT_S:
                        raise SystemExit(f"lb B's admin API did not answer within {START_TIMEOUT_S} s")
                peak = max(peak, _rss_kib(self._a.pid))
                if view is not None:
                    held = view["entries"]
                    now = time.monotonic()
                    if held and t_first is None:
                        t_first = now - t0
                    if held >= n:
                        took = now - t0
                        cpu_b = _cpu_ms(self._b.pid)
                        break
                    if now - t0 > SYNC_TIMEOUT_S:
                        raise SystemExit(f"lb B holds only {held} of {n} entries after {SYNC_TIMEOUT_S} s: {view}")
                time.sleep(POLL_S)
            if held != n:
                raise SystemExit(f"lb B holds {held} entries, more than the {n} A holds")
        finally:
            _stop(self._b, signal.SIGKILL)
            self._b = None
        self._wait_a_disconnected()
        self.last = {"seconds": took, "cli_up": t_api, "first_entry": t_first, "sender_growth_kib": peak - rss0,
                     "receiver_cpu_ms": cpu_b}
        self._say(f"    lb trial {self._trials}: {took * 1e3:8.1f} ms  (B's admin API up at {t_api * 1e3:.1f} ms, "
                  f"first entry seen at {t_first * 1e3:.1f} ms; B's CPU time {cpu_b:.0f} ms; "
                  f"A's RSS grew {(peak - rss0) / 1024:.1f} MiB)")
        return took

    def teardown(self) -> None:
        _stop(self._b)
        self._b = None
        _stop(self._a, signal.SIGTERM)
        self._a = None
        if self._own_workdir and not self.keep_workdir and self.workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)
        elif self.workdir:
            self._say(f"  configs and logs kept in {self.workdir}")


# --------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------


SYSTEMS = ("haproxy", "lb")


def _setup(name: str, entries: int, args: argparse.Namespace, lb_binary: str | None):
    workdir = os.path.join(args.workdir, name) if args.workdir else None
    if name == "haproxy":
        return HaproxyPair(entries, workdir=workdir, threads=args.haproxy_threads, keep_workdir=args.keep).setup()
    return LbPair(entries, lb_binary, workdir=workdir, keep_workdir=args.keep).setup()


def _entries(text: str) -> list[int]:
    try:
        sizes = [int(x.replace("_", "")) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma list of integers: {text!r}") from None
    if not sizes or min(sizes) <= 0:
        raise argparse.ArgumentTypeError("entries must be positive")
    return sizes


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--entries", type=_entries, default=[800000],
                   help="table size(s), comma separated, e.g. 800000,2000000 (default 800000)")
    p.add_argument("--trials", type=int, default=10, help="trials per size and system (default 10)")
    p.add_argument("--only", choices=SYSTEMS, action="append",
                   help="run only this system (repeatable; default: both, trials interleaved)")
    p.add_argument("--lb", default=None, help="lb binary to use (default: build it with cargo)")
    p.add_argument("--haproxy-threads", type=int, default=None,
                   help="nbthread of each haproxy process (default: haproxy's own, all CPUs)")
    p.add_argument("--workdir", default=None, help="directory for configs, sockets and logs (default: temp dirs)")
    p.add_argument("--keep", action="store_true", help="keep the temp dirs (configs, logs) afterwards")
    args = p.parse_args(argv)
    if args.trials < 1:
        p.error("--trials must be >= 1")
    names = args.only or list(SYSTEMS)
    lb_binary = None
    if "haproxy" in names:
        ensure_haproxy()
    if "lb" in names:
        lb_binary = args.lb or ensure_lb()

    results: dict[tuple[str, int], list[float]] = {}
    growth: dict[int, list[int]] = {}
    try:
        for n in args.entries:
            print(f"{n} entries, {args.trials} trials of {' and '.join(names)}, interleaved", flush=True)
            pairs = {}
            try:
                for name in names:
                    pairs[name] = _setup(name, n, args, lb_binary)
                for _ in range(args.trials):
                    for name in names:
                        results.setdefault((name, n), []).append(pairs[name].trial())
                        if name == "lb":
                            growth.setdefault(n, []).append(pairs[name].last["sender_growth_kib"])
            finally:
                for pair in pairs.values():
                    pair.teardown()
    finally:
        _kill_children()

    print()
    print(f"{'system':<10} {'entries':>10} {'trials':>6} {'median ms':>10} {'min ms':>9} {'max ms':>9}"
          f" {'Mentries/s':>10}")
    for (name, n), secs in results.items():
        med = statistics.median(secs)
        print(f"{name:<10} {n:>10} {len(secs):>6} {med * 1e3:>10.1f} {min(secs) * 1e3:>9.1f} "
              f"{max(secs) * 1e3:>9.1f} {n / med / 1e6:>10.2f}")
    for n in args.entries:
        if ("haproxy", n) in results and ("lb", n) in results:
            ratio = statistics.median(results[("lb", n)]) / statistics.median(results[("haproxy", n)])
            print(f"{n} entries: lb / HAProxy median time = {ratio:.2f} (below 1: lb is faster)")
        if n in growth:
            print(f"{n} entries: lb sender (A) RSS growth during a sync, median "
                  f"{statistics.median(growth[n]) / 1024:.1f} MiB, max {max(growth[n]) / 1024:.1f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
