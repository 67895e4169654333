"""Listening, accepting, admission limits, and the bounded stop.

``EchoServer`` is one ``socketserver.ThreadingTCPServer`` per listening socket;
every one of them shares a ``ServerState``: the running config, the clock, the
live connections, the counters and the stop signal. Process control (signals,
reload, notify) is in service.py; one connection's life is in handler.py.
"""

from __future__ import annotations

import collections
import errno
import logging
import os
import socket
import socketserver
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, Final

from .config import Config, ListenAddress
from .handler import EchoHandler, peer_name
from .protocol import ERR_BUSY, ERR_TOO_MANY_FROM_IP, make_stamper

logger = logging.getLogger(__name__)

REFUSAL_SUMMARY_EVERY_S: Final = 10.0
ACCEPT_BACKOFF_S: Final = 0.1
# Threads that finished a connection wait this long, at most this many, for the next one.
PARKED_THREADS: Final = 32
PARK_S: Final = 2.0
# Stack for every thread tsechod starts (cli.run sets it). They never recurse deeply (a socket loop and a few frames of
# logging), and only touched pages cost memory, but the default 8 MiB each is 80 GiB of
# address space and about 4 KiB of page tables per connection at 10,000 connections.
THREAD_STACK_BYTES: Final = 512 * 1024
_OUT_OF_FDS: Final = frozenset((errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM))


class ListenError(Exception):
    """A listening socket could not be opened; str() is the one-line message."""


class ServerState:
    """What all listeners and connections of one process share.

    ``config`` and ``stamper`` are replaced whole on reload; handlers read them
    afresh for every line, so a reload applies from the next line.
    """

    def __init__(self, config: Config, clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.stamper = make_stamper(config.timestamp, config.utc)
        self.clock = clock
        self.stopping = False
        self.stop_deadline = 0.0
        # Written once when a stop begins, never read: it stays readable, so
        # every handler's poll() wakes, whatever it was waiting for.
        self._stop_r, self._stop_w = os.pipe()
        self._lock = threading.Lock()
        self._all_closed = threading.Condition(self._lock)
        self._live: dict[socket.socket, EchoHandler | None] = {}
        self._per_ip: collections.Counter[str] = collections.Counter()
        self.accepted = 0
        self.refused = 0
        self._lines_closed = 0  # lines of connections that have ended
        self._refused_unlogged = 0
        self._refusal_window_start = time.monotonic()
        self._fd_warning_at = 0.0
        self.threads = ReadyThreads()

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

    def admit(self, sock: socket.socket, ip: str) -> bytes | None:
        """Register a new connection, or return the ERR line that refuses it."""
        config = self.config
        with self._lock:
            if len(self._live) >= config.max_connections:
                refusal = ERR_BUSY
            elif self._per_ip[ip] >= config.max_connections_per_ip:
                refusal = ERR_TOO_MANY_FROM_IP
            else:
                self._live[sock] = None
                self._per_ip[ip] += 1
                self.accepted += 1
                return None
            self.refused += 1
            self._refused_unlogged += 1
        self.log_refusals()
        return refusal

    def attach(self, sock: socket.socket, handler: EchoHandler) -> None:
        with self._lock:
            if sock in self._live:
                self._live[sock] = handler

    def release(self, sock: socket.socket, ip: str) -> None:
        with self._lock:
            handler = self._live.pop(sock, None)
            lines = handler.lines if handler is not None else 0
            self._per_ip[ip] -= 1
            if not self._per_ip[ip]:
                del self._per_ip[ip]
            self._lines_closed += lines
            if not self._live:
                self._all_closed.notify_all()

    def log_refusals(self, force: bool = False) -> None:
        """Log refused connections as one summary, at most every 10 s (or now, if *force*)."""
        now = time.monotonic()
        with self._lock:
            window = now - self._refusal_window_start
            if not self._refused_unlogged or (window < REFUSAL_SUMMARY_EVERY_S and not force):
                return
            count, self._refused_unlogged = self._refused_unlogged, 0
            self._refusal_window_start = now
            config = self.config
        logger.warning(
            "refused %d connections in the last %.0f s (limits: max_connections=%d, max_connections_per_ip=%d)",
            count,
            window,
            config.max_connections,
            config.max_connections_per_ip,
        )

    def out_of_fds(self, err: OSError) -> None:
        """accept() failed for want of file descriptors: warn (rate-limited)."""
        now = time.monotonic()
        if now - self._fd_warning_at >= REFUSAL_SUMMARY_EVERY_S:
            self._fd_warning_at = now
            logger.warning("cannot accept: %s; backing off (raise LimitNOFILE, or lower max_connections)",
                           os.strerror(err.errno or 0).lower())

    # -- figures ---------------------------------------------------------------------

    @property
    def connections(self) -> int:
        return len(self._live)

    @property
    def lines(self) -> int:
        with self._lock:
            live = sum(h.lines for h in self._live.values() if h is not None)
            return self._lines_closed + live

    def status(self) -> str:
        """Live figures for systemd's STATUS=: '12 connections, 3401 lines, 0 refused'."""
        return f"{self.connections} connections, {self.lines} lines, {self.refused} refused"

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


class ReadyThreads:
    """Threads for connections, each serving one connection at a time.

    A thread that has finished its connection parks for a moment instead of
    exiting, and the next accept hands it the new connection: that saves
    creating a thread and waiting for it to start on every accept. At most
    ``max_parked`` threads wait, each for at most ``park_s``, so an idle
    server is back to its baseline thread count soon after a burst.
    """

    def __init__(self, max_parked: int = PARKED_THREADS, park_s: float = PARK_S) -> None:
        self.max_parked = max_parked
        self.park_s = park_s
        self._lock = threading.Lock()
        self._parked: list[_ParkedSlot] = []

    def run(self, target: Callable[..., object], *args: object) -> None:
        """Run ``target(*args)`` in a parked thread, or a new one. Raises RuntimeError if none can start."""
        with self._lock:
            slot = self._parked.pop() if self._parked else None
        if slot is not None:
            slot.job = (target, args)
            slot.wake.release()
            return
        thread = threading.Thread(target=self._serve, args=((target, args),), name="tsecho-conn", daemon=True)
        thread.start()

    def _serve(self, job: tuple[Callable[..., object], tuple[object, ...]]) -> None:
        slot = _ParkedSlot()
        while True:
            target, args = job
            target(*args)
            with self._lock:
                if len(self._parked) >= self.max_parked:
                    return
                self._parked.append(slot)
            if not slot.wake.acquire(timeout=self.park_s):
                with self._lock:
                    if slot in self._parked:
                        self._parked.remove(slot)
                        return
                slot.wake.acquire()  # run() took us just as we timed out: its job is coming
            assert slot.job is not None
            job, slot.job = slot.job, None


class _ParkedSlot:
    """Where run() puts a job for one parked thread, and the lock that wakes it."""

    __slots__ = ("job", "wake")

    def __init__(self) -> None:
        self.job: tuple[Callable[..., object], tuple[object, ...]] | None = None
        self.wake = threading.Lock()
        self.wake.acquire()  # held: acquire() again parks the thread until run() releases it


class EchoServer(socketserver.ThreadingTCPServer):
    """One listening socket; a thread per connection runs an EchoHandler."""

    allow_reuse_address = True
    # We track connections ourselves (ServerState) and bound the stop with a
    # deadline. Non-daemon threads would make ThreadingMixIn scan its thread
    # list on every accept, and block_on_close would let one peer hold a stop.
    daemon_threads = True
    block_on_close = False

    def __init__(self, listen: ListenAddress | socket.socket, state: ServerState) -> None:
        self.state = state
        self.alive_at = time.monotonic()
        if isinstance(listen, socket.socket):  # inherited: socket activation or a worker
            self.address_family = listen.family
            super().__init__(listen.getsockname()[:2], EchoHandler, bind_and_activate=False)
            self.socket.close()
            self.socket = listen
            self.server_address = listen.getsockname()
        else:
            self.address_family = socket.AF_INET6 if ":" in listen.host else socket.AF_INET
            self.request_queue_size = state.config.backlog
            super().__init__((listen.host, listen.port), EchoHandler)
        # Workers share this socket: all of them wake for one connection, one wins
        # the accept(), and a blocking accept() would hang the others.
        self.socket.setblocking(False)

    def service_actions(self) -> None:
        # serve_forever calls this after every poll(): proof that the accept loop turns,
        # which is what the watchdog pings vouch for.
        self.alive_at = time.monotonic()

    @property
    def address(self) -> str:
        """The address actually bound, as 'host:port' ('[::1]:8009' for IPv6)."""
        return peer_name(self.server_address)

    def server_bind(self) -> None:
        if self.address_family == socket.AF_INET6:
            # [::]:8009 must not also claim 0.0.0.0:8009: that is its own listen entry.
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        super().server_bind()

    def get_request(self) -> tuple[Any, Any]:
        try:
            return super().get_request()
        except OSError as err:
            if err.errno in _OUT_OF_FDS:
                self.state.out_of_fds(err)
                time.sleep(ACCEPT_BACKOFF_S)  # in the acceptor thread only: don't spin on EMFILE
            raise  # socketserver ignores it and polls again

    def process_request(self, request: Any, client_address: Any) -> None:
        ip = client_address[0]
        refusal = self.state.admit(request, ip)
        if refusal is not None:
            _refuse(request, refusal)
            return
        try:
            self.state.threads.run(self.process_request_thread, request, client_address)
        except RuntimeError:  # can't start new thread: out of memory or pids
            self.state.release(request, ip)
            _refuse(request, ERR_BUSY)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        threading.current_thread().name = f"tsecho-conn-{peer_name(client_address)}"
        try:
            self.finish_request(request, client_address)
        except Exception:
            self.handle_error(request, client_address)
        finally:
            request.close()
            self.state.release(request, client_address[0])
            threading.current_thread().name = "tsecho-conn-parked"

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A bug in a handler: log it once with its traceback; only that connection ends."""
        logger.exception("%s internal error; connection closed", peer_name(client_address))


def _refuse(sock: socket.socket, line: bytes) -> None:
    """Answer a refused connection with its ERR line and close it, without a thread."""
    try:
        sock.setblocking(False)
        sock.send(line)
        sock.shutdown(socket.SHUT_WR)
    except OSError:
        pass  # the peer is gone or its buffer is full: the close says the rest
    finally:
        sock.close()


def open_servers(
    config: Config, state: ServerState, inherited: Sequence[socket.socket] = ()
) -> list[EchoServer]:
    """Open one EchoServer per listen address (or per inherited socket).

    Raises ListenError with an actionable message; none stays open if one fails.
    """
    servers: list[EchoServer] = []
    try:
        if inherited:
            servers.extend(EchoServer(sock, state) for sock in inherited)
        else:
            for address in config.listen:
                servers.append(_listen(address, state))
    except BaseException:
        for server in servers:
            server.server_close()
        raise
    return servers


def _listen(address: ListenAddress, state: ServerState) -> EchoServer:
    try:
        return EchoServer(address, state)
    except OSError as err:
        reason = os.strerror(err.errno).lower() if err.errno else str(err)
        hint = ""
        if err.errno == errno.EADDRINUSE:
            hint = f" (another tsechod? try: ss -ltnp 'sport = :{address.port}')"
        elif err.errno == errno.EACCES and address.port < 1024:
            hint = " (ports below 1024 need root, CAP_NET_BIND_SERVICE, or the socket unit)"
        elif err.errno == errno.EADDRNOTAVAIL:
            hint = " (no such address on this host: check `ip addr` and the listen setting)"
        raise ListenError(f"cannot listen on {address}: {reason}{hint}") from err
