"""What the listeners and connections of one process share: config, clock, stop, counters.

``ServerState`` is the contract between server.py, which admits and releases
connections, and handler.py, which serves one; both import this module and
neither imports the other for it. Each admitted connection gets a
``Connection``: its own figures, written only by the thread that serves it.
The counters live here, once: systemd's STATUS=, the logs, the supervisor's
sums and the metrics endpoint all read them through ``ServerState.figures()``,
so they always agree. ``Reloads`` counts how SIGHUPs went, for the metrics.
Admission lives here too: the limits, the access rules and the rate buckets
(access.py) and each listener's proxy_trusted, checked by ``admit`` on a
direct client at accept and by ``readmit`` on the client a PROXY header names.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Final, Protocol

from .access import AccessRules, ConnectionRateLimiter, normalize_address
from .address import peer_name
from .config import Config, ConfigError, Listener
from .protocol import DEFAULT_PREFIX, Prefixer, Stamper, make_prefixer, make_stamper
from .systemd import unit_instance
from .tlsconfig import ServerTLS, SessionInfo, TLSConfigError, load_server_tls

logger = logging.getLogger(__name__)

# Refusals are logged as one summary line at most this often.
REFUSAL_SUMMARY_EVERY_S: Final = 10.0
# Why a connection ended, as its access event says (docs/operations.md lists them).
CLOSE_REASONS: Final = ("eof", "idle", "slow", "stalled", "reset", "too-long", "interrupt", "shutdown", "error",
                        "proxy-timeout", "proxy-invalid", "proxy-untrusted", "tls-error")
# Why a connection was refused before it was served: at accept, before a thread started, or on a
# PROXY listener right after the header (the client's address is known only then).
REFUSAL_REASONS: Final = ("busy", "per-address", "rate", "denied")
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
    def recv(self, bufsize: int, flags: int = 0, /) -> bytes: ...
    def send(self, data: bytes | memoryview, /) -> int: ...
    def shutdown(self, how: int, /) -> None: ...
    def close(self) -> None: ...


class Connection:
    """One admitted connection: who it is and what it did.

    Written by the one thread that serves it, read by others for figures (an
    int attribute is read whole). ``reason`` is "error" until the handler says
    otherwise, so a connection ended by a bug is counted as one.
    """

    __slots__ = ("sock", "wire", "peer", "ip", "started", "lines", "bytes_in", "bytes_out", "reason", "counted_ip",
                 "expect_proxy", "via", "quiet", "refused", "detail", "tlvs", "tls_context", "tls_timeout_s",
                 "tls_session")

    def __init__(self, sock: Stream, address: tuple[str, int], counted: bool = True) -> None:
        self.sock = sock  # the accepted socket: the registry's key, even after a TLS wrap detached it
        self.wire: Stream = sock  # what carries the bytes: sock, or the TLS socket wrapping it
        self.peer = peer_name(address)  # the client: after a PROXY header, the one it names
        self.ip = address[0]
        self.started = time.monotonic()
        self.lines = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self.reason = "error"
        # The address this connection holds a per-address slot of (None: none, e.g. a
        # trusted proxy's connection before its header, or a health check).
        self.counted_ip: str | None = self.ip if counted else None
        self.expect_proxy: str | None = None  # the PROXY mode to read a header in, if any
        self.via: str | None = None  # the proxy's address, once a header named the client
        self.quiet = False  # a proxy's health check: its access event is logged at debug
        self.refused: str | None = None  # refused after the header: no access event, a refusal
        self.detail: str | None = None  # why a PROXY header or a TLS handshake failed, for the access event
        self.tlvs: dict[str, str] = {}  # PROXY v2 TLVs worth logging (authority, alpn, aws_vpce_id)
        self.tls_context: ssl.SSLContext | None = None  # set on a TLS listener: the handshake to run
        self.tls_timeout_s = 0.0
        self.tls_session: SessionInfo | None = None  # after a completed handshake


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

    @property
    def tls_errors(self) -> int:
        return self.closed[CLOSE_REASONS.index("tls-error")]

    def status(self) -> str:
        """Live figures for systemd's STATUS=: '12 connections, 3401 lines, 0 refused' (', 2 TLS errors')."""
        tls = f", {self.tls_errors} TLS errors" if self.tls_errors else ""
        return f"{self.connections} connections, {self.lines} lines, {self.refused_total} refused{tls}"

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
    afresh for every read, so a reload applies from the next line. ``tls`` (one
    ServerTLS per listener, None for plaintext) is replaced whole too, and read
    once per connection at accept: new connections get a new certificate, live
    ones keep the session they have. Building it raises ConfigError (a bad
    certificate or key at start); on reload, a listener whose new pair is bad
    keeps its old one.
    """

    def __init__(self, config: Config, clock: Callable[[], float] = time.time, worker: int = 0,
                 tls: tuple[ServerTLS | None, ...] | None = None) -> None:
        # A worker gets its supervisor's: read before privileges were dropped, and read once.
        self.tls: tuple[ServerTLS | None, ...] = load_listener_tls(config) if tls is None else tls
        self.config = config
        self.stamper: Stamper = make_stamper(config.timestamp, config.utc)
        self.worker = worker  # this process's index among the workers; 0 when workers = 1
        self.prefixer = self._make_prefixer(config)
        self.rules = AccessRules.parse(config.rules)
        self.rate = ConnectionRateLimiter(config.connection_rate_per_ip, config.connection_burst_per_ip)
        self.trusted = _trusted(config.listeners)
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
        self.prefixer = self._make_prefixer(config)
        self.rules = AccessRules.parse(config.rules)
        self.rate.reconfigure(config.connection_rate_per_ip, config.connection_burst_per_ip)
        self.trusted = _trusted(config.listeners)
        self.tls = reload_listener_tls(config, self.tls)
        self.config = config

    def _make_prefixer(self, config: Config) -> Prefixer | None:
        if config.prefix == DEFAULT_PREFIX:
            return None  # today's format: nothing to look up, nothing to call per read
        return make_prefixer(config.prefix, socket.gethostname(), unit_instance(), self.worker)

    # -- admission -------------------------------------------------------------------

    def admit(self, sock: socket.socket, address: tuple[str, int], proxy: str | None = None) -> Connection | str:
        """Register a new connection, or return the reason it is refused (one of REFUSAL_REASONS).

        *proxy* is the PROXY mode when the peer is a trusted proxy whose header is still to
        come: then only max_connections applies now, and ``readmit`` checks the client
        the header names. Otherwise the peer is the client: rules, rate and the
        per-address limit apply to it.
        """
        config = self.config
        ip = address[0]
        refusal = None if proxy is not None else self._check_access(ip)
        with self._lock:
            if refusal is not None:
                pass
            elif len(self._live) >= config.max_connections:
                refusal = "busy"
            elif proxy is None and self._per_ip[ip] >= config.max_connections_per_ip:
                refusal = "per-address"
            else:
                conn = Connection(sock, address, counted=proxy is None)
                conn.expect_proxy = proxy
                self._live[sock] = conn
                if proxy is None:
                    self._per_ip[ip] += 1
                self._accepted += 1
                return conn
            self._count_refusal(refusal)
        return refusal

    def readmit(self, conn: Connection, client: tuple[str, int]) -> str | None:
        """A PROXY header named *client*: admit it as that client, or return why it is refused.

        Rules, rate and the per-address limit now apply to the client, and the
        connection holds the client's per-address slot (the proxy's address holds
        none). A refused connection leaves the registry and counts as a refusal,
        not as an accepted connection; the caller closes it, without an access event.
        """
        config = self.config
        ip = client[0]
        refusal = self._check_access(ip)
        with self._lock:
            if refusal is None and self._per_ip[ip] >= config.max_connections_per_ip:
                refusal = "per-address"
            if refusal is None:
                self._per_ip[ip] += 1
                conn.counted_ip = ip
            elif self._live.pop(conn.sock, None) is not None:
                self._accepted -= 1
                self._count_refusal(refusal)
                if not self._live:
                    self._all_closed.notify_all()
        conn.via = conn.peer
        conn.peer = peer_name(client)
        conn.ip = ip
        conn.refused = refusal
        return refusal

    def _check_access(self, ip: str) -> str | None:
        """Rules, then rate, for a client address: "denied", "rate" or None (allowed).

        Costs nothing while both are off (the defaults); else one address parse,
        a walk over the rules, and one bucket update under the limiter's lock.
        """
        rules, rate = self.rules, self.rate
        if not rules and not rate.enabled:
            return None
        try:
            address = normalize_address(ip.partition("%")[0])
        except ValueError:  # not an IP socket (can't happen on a TCP listener): nothing to check
            return None
        if rules and not rules.check(address).allowed:
            return "denied"
        if not rate.admit(address, time.monotonic()):
            return "rate"
        return None

    def _count_refusal(self, refusal: str) -> None:
        # Under self._lock.
        self._refused[REFUSAL_REASONS.index(refusal)] += 1
        self._refused_unlogged += 1

    def record_untrusted(self) -> None:
        """A peer sent to a PROXY listener from outside proxy_trusted was closed at accept."""
        with self._lock:
            self._accepted += 1
            self._closed[CLOSE_REASONS.index("proxy-untrusted")] += 1

    def is_trusted(self, listener_index: int, ip: str) -> bool:
        """Whether *ip* is in the proxy_trusted of listener *listener_index* (as of the running config)."""
        matcher = self.trusted[listener_index]
        try:
            return matcher.check(ip.partition("%")[0]).rule is not None
        except ValueError:
            return False

    def release(self, conn: Connection) -> None:
        """The connection has ended (its socket is closed): count it, free its slot."""
        with self._lock:
            if self._live.pop(conn.sock, None) is None:
                return
            ip = conn.counted_ip
            if ip is not None:
                self._per_ip[ip] -= 1
                if not self._per_ip[ip]:
                    del self._per_ip[ip]
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
            wires = [conn.wire for conn in self._live.values()]
        for wire in wires:
            try:
                if isinstance(wire, ssl.SSLSocket):
                    # The plain socket's shutdown: SSLSocket.shutdown would drop its TLS state
                    # under the thread that is still using it.
                    socket.socket.shutdown(wire, socket.SHUT_RDWR)
                else:
                    wire.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self) -> None:
        os.close(self._stop_r)
        os.close(self._stop_w)


def load_listener(config: Config, index: int) -> ServerTLS:
    """Listener *index*'s certificate and key, loaded and checked; ConfigError naming the listener."""
    listener = config.listeners[index]
    settings = listener.tls
    assert settings is not None
    try:
        base_dir = config.config_file.parent if config.config_file is not None else Path.cwd()
        return load_server_tls(settings, base_dir)
    except TLSConfigError as err:
        raise ConfigError(f"{config.config_file or 'config'}: [[listener]] #{index - len(config.listen) + 1} "
                          f"({listener.address}): {err}") from None


def load_listener_tls(config: Config) -> tuple[ServerTLS | None, ...]:
    """One ServerTLS per listener (None: plaintext). Raises ConfigError for the first that fails."""
    return tuple(load_listener(config, index) if listener.tls is not None else None
                 for index, listener in enumerate(config.listeners))


def reload_listener_tls(config: Config, running: tuple[ServerTLS | None, ...],
                        log: bool = True) -> tuple[ServerTLS | None, ...]:
    """Each TLS listener's certificate and key read again (SIGHUP: rotation).

    A listener whose new pair fails to load keeps its running one, with an
    error logged (no outage); expiry warnings are logged again. Whether a
    listener speaks TLS at all does not change on reload (service.reload_config).
    """
    tls = list(running)
    for index, listener in enumerate(config.listeners):
        if listener.tls is None or index >= len(tls) or tls[index] is None:
            continue
        try:
            loaded = load_listener(config, index)
        except ConfigError as err:
            if log:
                logger.error("reload: %s; keeping the old certificate", str(err).removeprefix("config error: "))
            continue
        tls[index] = loaded
        for warning in loaded.warnings if log else ():
            logger.warning("%s", warning)
    return tuple(tls)


def _trusted(listeners: Iterable[Listener]) -> list[AccessRules]:
    """Per listener, its proxy_trusted networks as rules: a match (any rule) means trusted."""
    return [AccessRules.parse([f"allow {network}" for network in listener.proxy_trusted]) for listener in listeners]
