"""What the listeners and connections of one process share: config, clock, stop, counters.

``ServerState`` is the contract between server.py, which admits and releases
connections, and handler.py, which serves one; both import this module and
neither imports the other for it. Each admitted connection gets a
``Connection``: its own figures, written only by the thread that serves it.
The counters live here, once: systemd's STATUS=, the logs, the supervisor's
sums and the metrics endpoint all read them through ``ServerState.figures()``,
so they always agree. ``Reloads`` counts how SIGHUPs went, for the metrics.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import socket
import threading
import time
from collections.abc import Callable, Iterable
from typing import Final, Protocol

from .address import peer_name
from .config import Config
from .protocol import Stamper, make_stamper

# Refusals are logged as one summary line at most this often.
REFUSAL_SUMMARY_EVERY_S: Final = 10.0
# Why a connection ended, as its access event says (docs/operations.md lists them).
CLOSE_REASONS: Final = ("eof", "idle", "slow", "stalled", "reset", "too-long", "interrupt", "shutdown", "error")
# Why a connection was refused before a thread started.
REFUSAL_REASONS: Final = ("busy", "per-address")
# Figures as a flat vector of ints (the supervisor's shared memory holds one per worker).
FIGURES_SIZE: Final = 5 + len(REFUSAL_REASONS) + len(CLOSE_REASONS)


class Stream(Protocol):
    """What a connection's I/O needs: a socket, or handler.Pipes (tsechod --stdio on two fds).

    The calls behave as a non-blocking socket's do: BlockingIOError when nothing
    can be read or written now, b"" at the end of input, and shutdown(SHUT_WR)
    sends the end of output.
    """

    def fileno(self) -> int: ...
    def setblocking(self, flag: bool, /) -> None: ...
    def recv(self, bufsize: int, /) -> bytes: ...
    def send(self, data: bytes | memoryview, /) -> int: ...
    def shutdown(self, how: int, /) -> None: ...
    def close(self) -> None: ...


class Connection:
    """One admitted connection: who it is and what it did.

    Written by the one thread that serves it, read by others for figures (an
    int attribute is read whole). ``reason`` is "error" until the handler says
    otherwise, so a connection ended by a bug is counted as one.
    """

    __slots__ = ("sock", "peer", "ip", "started", "lines", "bytes_in", "bytes_out", "reason")

    def __init__(self, sock: Stream, address: tuple[str, int]) -> None:
        self.sock = sock
        self.peer = peer_name(address)
        self.ip = address[0]
        self.started = time.monotonic()
        self.lines = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self.reason = "error"


@dataclasses.dataclass(frozen=True, slots=True)
class Figures:
    """A snapshot of one process's counters (or the sum over workers)."""

    connections: int = 0
    accepted: int = 0
    lines: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    refused: tuple[int, ...] = (0,) * len(REFUSAL_REASONS)  # by REFUSAL_REASONS
    closed: tuple[int, ...] = (0,) * len(CLOSE_REASONS)  # by CLOSE_REASONS

    @property
    def refused_total(self) -> int:
        return sum(self.refused)

    def status(self) -> str:
        """Live figures for systemd's STATUS=: '12 connections, 3401 lines, 0 refused'."""
        return f"{self.connections} connections, {self.lines} lines, {self.refused_total} refused"

    def as_vector(self) -> tuple[int, ...]:
        return (self.connections, self.accepted, self.lines, self.bytes_in, self.bytes_out,
                *self.refused, *self.closed)

    @classmethod
    def from_vector(cls, vector: Iterable[int]) -> Figures:
        v = tuple(vector)
        r = 5 + len(REFUSAL_REASONS)
        return cls(v[0], v[1], v[2], v[3], v[4], refused=v[5:r], closed=v[r:])

    @classmethod
    def total(cls, many: Iterable[Figures]) -> Figures:
        sums = [0] * FIGURES_SIZE
        for figures in many:
            for i, value in enumerate(figures.as_vector()):
                sums[i] += value
        return cls.from_vector(sums)


class Reloads:
    """How this process's reloads (SIGHUP) went: what the metrics endpoint reports.

    Written only by the process-control loop's thread (``handle_hup``), read by
    the metrics thread; each attribute is read whole.
    """

    __slots__ = ("ok", "failed", "last_at", "last_ok")

    def __init__(self) -> None:
        self.ok = 0
        self.failed = 0
        self.last_at = 0.0  # time.time() of the last reload; 0 before the first
        self.last_ok = True

    def record(self, ok: bool, now: float) -> None:
        if ok:
            self.ok += 1
        else:
            self.failed += 1
        self.last_ok = ok
        self.last_at = now


class ServerState:
    """What all listeners and connections of one process share.

    ``config`` and ``stamper`` are replaced whole on reload; handlers read them
    afresh for every read, so a reload applies from the next line.
    """

    def __init__(self, config: Config, clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.stamper: Stamper = make_stamper(config.timestamp, config.utc)
        self.clock = clock
        self.stopping = False
        self.stop_deadline = 0.0
        # Written once when a stop begins, never read: it stays readable, so
        # every handler's poll() wakes, whatever it was waiting for.
        self._stop_r, self._stop_w = os.pipe()
        self._lock = threading.Lock()
        self._all_closed = threading.Condition(self._lock)
        self._live: dict[Stream, Connection] = {}
        self._per_ip: collections.Counter[str] = collections.Counter()
        self._accepted = 0
        self._refused = [0] * len(REFUSAL_REASONS)
        self._closed = [0] * len(CLOSE_REASONS)
        self._ended = [0, 0, 0]  # lines, bytes_in, bytes_out of connections that have ended
        self._refused_unlogged = 0
        self._refusal_window_start = time.monotonic()
        self.reloads = Reloads()

    def fds(self) -> list[int]:
        """The descriptors this state holds open (a daemonizing step must keep them)."""
        return [self._stop_r, self._stop_w]

    @property
    def stop_fd(self) -> int:
        return self._stop_r

    def apply(self, config: Config) -> None:
        """Switch to *config* (after a reload); live connections use it from their next line."""
        self.stamper = make_stamper(config.timestamp, config.utc)
        self.config = config

    # -- admission -------------------------------------------------------------------

    def admit(self, sock: socket.socket, address: tuple[str, int]) -> Connection | str:
        """Register a new connection, or return the reason it is refused (one of REFUSAL_REASONS)."""
        config = self.config
        ip = address[0]
        with self._lock:
            if len(self._live) >= config.max_connections:
                refusal = "busy"
            elif self._per_ip[ip] >= config.max_connections_per_ip:
                refusal = "per-address"
            else:
                conn = Connection(sock, address)
                self._live[sock] = conn
                self._per_ip[ip] += 1
                self._accepted += 1
                return conn
            self._refused[REFUSAL_REASONS.index(refusal)] += 1
            self._refused_unlogged += 1
        return refusal

    def release(self, conn: Connection) -> None:
        """The connection has ended (its socket is closed): count it, free its slot."""
        with self._lock:
            if self._live.pop(conn.sock, None) is None:
                return
            self._per_ip[conn.ip] -= 1
            if not self._per_ip[conn.ip]:
                del self._per_ip[conn.ip]
            self._ended[0] += conn.lines
            self._ended[1] += conn.bytes_in
            self._ended[2] += conn.bytes_out
            self._closed[CLOSE_REASONS.index(conn.reason)] += 1
            if not self._live:
                self._all_closed.notify_all()

    def take_refusals_to_log(self, force: bool = False) -> tuple[int, float] | None:
        """(refusals not yet logged, seconds they span), at most once every 10 s (now, if *force*)."""
        now = time.monotonic()
        with self._lock:
            window = now - self._refusal_window_start
            if not self._refused_unlogged or (window < REFUSAL_SUMMARY_EVERY_S and not force):
                return None
            count, self._refused_unlogged = self._refused_unlogged, 0
            self._refusal_window_start = now
        return count, window

    # -- figures ---------------------------------------------------------------------

    @property
    def connections(self) -> int:
        return len(self._live)

    def figures(self) -> Figures:
        """The counters now: ended connections plus what the live ones have done so far."""
        with self._lock:
            live = list(self._live.values())
            lines, bytes_in, bytes_out = self._ended
            for conn in live:
                lines += conn.lines
                bytes_in += conn.bytes_in
                bytes_out += conn.bytes_out
            return Figures(len(live), self._accepted, lines, bytes_in, bytes_out,
                           tuple(self._refused), tuple(self._closed))

    def status(self) -> str:
        """Live figures for systemd's STATUS=: '12 connections, 3401 lines, 0 refused'."""
        return self.figures().status()

    # -- stop ------------------------------------------------------------------------

    def begin_stop(self, timeout_s: float) -> None:
        """Tell every connection to finish: answer what has arrived, then close by the deadline."""
        self.stop_deadline = time.monotonic() + timeout_s
        self.stopping = True
        os.write(self._stop_w, b"x")

    def wait_closed(self, timeout_s: float) -> int:
        """Wait until no connection is left, at most *timeout_s*; return how many are left."""
        deadline = time.monotonic() + timeout_s
        with self._lock:
            while self._live and (left := deadline - time.monotonic()) > 0:
                self._all_closed.wait(left)
            return len(self._live)

    def abort_connections(self) -> None:
        """Cut whatever is still open after the stop's deadline."""
        with self._lock:
            socks = list(self._live)
        for sock in socks:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self) -> None:
        os.close(self._stop_r)
        os.close(self._stop_w)
