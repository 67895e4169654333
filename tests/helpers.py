"""Helpers that several test files use: tools, waiting, sockets, clients, process figures, logs.

Plain functions and classes only; the fixtures that start a real tsechod are in
conftest.py. Nothing here fakes the daemon.
"""

from __future__ import annotations

import collections
import os
import re
import selectors
import shutil
import socket
import struct
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
STAMP = b"[Thu Sep 15 22:29:12 2016]"  # the in-process server's fixed clock (conftest.FIXED_NOW), UTC
CTIME_REPLY = re.compile(rb"^\[(Mon|Tue|Wed|Thu|Fri|Sat|Sun) [A-Z][a-z]{2} [ \d]\d \d\d:\d\d:\d\d \d{4}\] ")
ACCESS = re.compile(r"(\S+) closed reason=(\S+) duration_s=\S+ lines=(\d+) bytes_in=(\d+) bytes_out=(\d+)")
STAMPED = re.compile(rb"\[([^\]]*)\] (.*)", re.S)
STYLES = {
    "ctime": re.compile(rb"[A-Z][a-z]{2} [A-Z][a-z]{2} [ \d]\d \d\d:\d\d:\d\d \d{4}"),
    "iso": re.compile(rb"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}(?:[+-]\d\d:\d\d|Z)"),
}


def require_tool(name: str) -> str:
    """Path of a tool the test needs. Missing: a failure in CI (CI set), a skip elsewhere."""
    path = shutil.which(name)
    if path is None:
        message = f"{name} is not installed (apt-get install the package that has it; .ci/run does)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


def wait_until(predicate: Callable[[], object], timeout: float = 10.0, interval: float = 0.02) -> object:
    """Poll *predicate* until it returns something truthy; fail after *timeout* seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s: {predicate}")
        time.sleep(interval)


def recv_until(sock: socket.socket, count: int, timeout: float = 5.0, sep: bytes = b"\n") -> bytes:
    """Read until *count* separators arrived (or EOF); fail on timeout."""
    sock.settimeout(timeout)
    data = b""
    while data.count(sep) < count:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def recv_lines(sock: socket.socket, count: int, timeout: float = 5.0) -> list[bytes]:
    """Read *count* reply lines, without their line endings."""
    data = recv_until(sock, count, timeout)
    return [line.rstrip(b"\r") for line in data.split(b"\n")[:count]]


def recv_all(sock: socket.socket, timeout: float = 5.0) -> bytes:
    """Read until the peer closes."""
    sock.settimeout(timeout)
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)



def fan_out(count: int, client: Callable[[int], None], timeout: float = 60.0) -> None:
    """Run ``client(n)`` for n in range(count), each in its own thread; wait at most *timeout* for all."""
    threads = [threading.Thread(target=client, args=(n,), name=f"test-client-{n}") for n in range(count)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + timeout
    for thread in threads:
        thread.join(timeout=max(0.0, deadline - time.monotonic()))
    assert not any(thread.is_alive() for thread in threads), f"clients still running after {timeout} s"


# -- measuring the daemon ----------------------------------------------------------------


def figures(pid: int) -> tuple[float, int]:
    """(RSS in MiB, thread count) of process *pid*, from /proc/PID/status."""
    rss_kib = threads = 0
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                rss_kib = int(line.split()[1])
            elif line.startswith("Threads:"):
                threads = int(line.split()[1])
    return rss_kib / 1024, threads


def show(scenario: str, phase: str, pid: int, note: str = "") -> tuple[float, int]:
    """Measure, print one FIGURES line, return (rss_mib, threads)."""
    rss, threads = figures(pid)
    print(f"\nFIGURES {scenario:<9} {phase:<12} rss={rss:7.1f} MiB threads={threads:5d} {note}".rstrip())
    return rss, threads


class PeakSampler:
    """Samples the daemon's RSS and threads every 20 ms in a thread; keeps the peaks."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak_rss = 0.0
        self.peak_threads = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="peak-sampler", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                rss, threads = figures(self.pid)
            except (FileNotFoundError, ProcessLookupError):
                return
            self.peak_rss = max(self.peak_rss, rss)
            self.peak_threads = max(self.peak_threads, threads)
            self._stop.wait(0.02)

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def baseline(d, scenario: str) -> tuple[float, int]:
    """Warm the daemon up with one ping, wait until only its own threads are left, measure.

    Its own threads: the main thread, the log writer and one acceptor per
    listener; every other thread is a connection's.
    """
    ping(d.address, b"warm-up")
    threads = 2 + len(d.addresses)
    wait_until(lambda: figures(d.pid)[1] == threads, timeout=5)
    return show(scenario, "baseline", d.pid)


def settle(pid: int, threads: int, timeout: float = 5.0) -> float:
    """Wait until the daemon is back to *threads* threads; return how long it took."""
    started = time.monotonic()
    wait_until(lambda: figures(pid)[1] <= threads, timeout=timeout)
    return time.monotonic() - started


# -- reading the log ---------------------------------------------------------------------


def access_events(text: str) -> list[tuple[str, str, int, int, int]]:
    """(peer, reason, lines, bytes_in, bytes_out) of every access event in a text log."""
    return [(m[1], m[2], int(m[3]), int(m[4]), int(m[5])) for m in ACCESS.finditer(text)]


def assert_no_errors(text: str) -> None:
    assert "Traceback" not in text, text[-4000:]
    bad = [line for line in text.splitlines() if re.search(r" (ERROR|CRITICAL) ", line)]
    assert bad == [], bad[:10]


def peer_of(sock_name: tuple[str, int]) -> str:
    return f"{sock_name[0]}:{sock_name[1]}"


# -- clients -----------------------------------------------------------------------------


def connect_from(address: tuple[str, int], source: str = "127.0.0.1", timeout: float = 5.0) -> socket.socket:
    """A blocking client socket from loopback address *source*."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.bind((source, 0))
        sock.connect(address)
    except BaseException:
        sock.close()
        raise
    return sock


def ping(address: tuple[str, int], payload: bytes = b"ping", source: str = "127.0.0.1") -> float:
    """Connect, send one line, check its reply, leave; return the seconds it all took."""
    started = time.monotonic()
    with connect_from(address, source) as sock:
        sock.sendall(payload + b"\n")
        [reply] = recv_lines(sock, 1, timeout=5)
    assert CTIME_REPLY.match(reply) and reply.endswith(b"] " + payload), reply
    return time.monotonic() - started


def reset(sock: socket.socket) -> None:
    """Close with SO_LINGER 0: the peer gets an RST instead of a FIN."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def read_to_end(sock: socket.socket, timeout: float = 5.0) -> tuple[bytes, str]:
    """Read until the peer closes: (bytes, 'fin' or 'reset')."""
    sock.settimeout(timeout)
    chunks = []
    try:
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    except ConnectionResetError:
        return b"".join(chunks), "reset"
    return b"".join(chunks), "fin"


def stamp_style(stamp: bytes) -> str | None:
    for name, pattern in STYLES.items():
        if pattern.fullmatch(stamp):
            return name
    return None


class PipeClient:
    """One pipelining connection: numbered lines out, every reply checked in order."""

    def __init__(self, n: int, sock: socket.socket) -> None:
        self.n = n
        self.sock = sock
        self.peer = peer_of(sock.getsockname())
        self.queued = 0  # lines generated
        self.sent = 0  # lines whose last byte send() accepted
        self.out = b""
        self.inbuf = b""
        self.replies = 0
        self.bad: list[bytes] = []
        self.end: str | None = None  # 'fin' or 'reset'
        self.tail = b""  # bytes of an unfinished reply line when the connection ended
        self.last_style: str | None = None
        self.style_changes = 0
        self.sent_at_mark = -1
        self.next_send_at = 0.0


class Pipeliner:
    """*count* connections, each keeping up to *window* lines in flight, driven by one thread.

    Every reply must be ``[stamp] c<n>-<seq>`` with seq counting up from 0 and a
    ctime or iso stamp. ``mark(action)`` runs *action* in the driving thread
    right after recording each client's ``sent`` count, so "sent before the
    action" is exact.
    """

    def __init__(self, address: tuple[str, int], count: int, window: int = 8, source: str = "127.0.0.1",
                 pause_s: float = 0.0) -> None:
        self.window = window
        self.pause_s = pause_s  # after each reply, before the next line
        self.clients = []
        for n in range(count):
            sock = connect_from(address, source)
            sock.setblocking(False)
            self.clients.append(PipeClient(n, sock))
        self.selector = selectors.DefaultSelector()
        for client in self.clients:
            self.selector.register(client.sock, selectors.EVENT_READ, client)
        self.styles: collections.Counter[str] = collections.Counter()
        self.stopping = threading.Event()
        self._mark: Callable[[], None] | None = None
        self._thread = threading.Thread(target=self._run, name="pipeliner", daemon=True)

    @property
    def replies(self) -> int:
        return sum(c.replies for c in self.clients)

    def start(self) -> Pipeliner:
        self._thread.start()
        return self

    def mark(self, action: Callable[[], None]) -> None:
        self._mark = action
        wait_until(lambda: self._mark is None, timeout=5)

    def wait_ended(self, timeout: float) -> None:
        """Wait until every connection has ended (the daemon closed it)."""
        self._thread.join(timeout=timeout)
        assert not self._thread.is_alive(), [c.n for c in self.clients if c.end is None]

    def stop(self) -> None:
        self.stopping.set()
        self._thread.join(timeout=10)
        for client in self.clients:
            client.sock.close()

    def _run(self) -> None:
        deadline = time.monotonic() + 280
        live = {c.n: c for c in self.clients}
        while live and not self.stopping.is_set() and time.monotonic() < deadline:
            if self._mark is not None:
                for client in self.clients:
                    client.sent_at_mark = client.sent
                self._mark()
                self._mark = None
            now = time.monotonic()
            for client in live.values():
                if not client.out and client.queued - client.replies < self.window and now >= client.next_send_at:
                    more = range(client.queued, client.replies + self.window)
                    client.out = b"".join(b"c%d-%d\n" % (client.n, seq) for seq in more)
                    client.queued += len(more)
                events = selectors.EVENT_READ | (selectors.EVENT_WRITE if client.out else 0)
                self.selector.modify(client.sock, events, client)
            for key, mask in self.selector.select(0.01 if self.pause_s else 0.05):
                client = key.data
                if mask & selectors.EVENT_READ:
                    self._read(client)
                if mask & selectors.EVENT_WRITE and client.end is None:
                    self._write(client)
                if client.end is not None and client.n in live:
                    del live[client.n]
                    self.selector.unregister(client.sock)
                    client.sock.close()

    def _write(self, client: PipeClient) -> None:
        try:
            done = client.sock.send(client.out)
        except BlockingIOError:
            return
        except (ConnectionResetError, BrokenPipeError):
            client.end = "reset"
            return
        client.sent += client.out.count(b"\n", 0, done)
        client.out = client.out[done:]

    def _read(self, client: PipeClient) -> None:
        try:
            data = client.sock.recv(65536)
        except BlockingIOError:
            return
        except ConnectionResetError:
            client.end = "reset"
            return
        if not data:
            client.end = "fin"
            client.tail = client.inbuf
            return
        *lines, client.inbuf = (client.inbuf + data).split(b"\n")
        for line in lines:
            match = STAMPED.fullmatch(line)
            style = stamp_style(match[1]) if match else None
            if style is None or match is None or match[2] != b"c%d-%d" % (client.n, client.replies):
                client.bad.append(line)
            else:
                if client.last_style is not None and style != client.last_style:
                    client.style_changes += 1
                client.last_style = style
                self.styles[style] += 1
            client.replies += 1
        if lines and self.pause_s:
            client.next_send_at = time.monotonic() + self.pause_s
