"""Listening, accepting, admitting or refusing, and handing a connection to a thread.

``EchoServer`` is one ``socketserver.ThreadingTCPServer`` per listening socket;
all of a process's servers share one ``ServerState`` (state.py: config, clock,
live connections, counters, stop) and one ``ReadyThreads`` (the threads that
serve connections). Process control (signals, reload, notify) is service.py's;
one connection's life is handler.py's.

accept -> on a PROXY listener, is the peer in proxy_trusted? (no: closed, or
served as a direct client) -> ``ServerState.admit`` (rules, rate, limits; a
refusal gets its ERR line, or nothing if denied, without a thread) -> a parked
or new thread -> ``EchoHandler`` (its preamble reads the PROXY header and
re-admits the client it names, then on a TLS listener runs the handshake with
the listener's context as of the accept) -> close -> access event -> release.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import socketserver
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, Final, cast

from .address import ListenAddress, parse_listen, peer_name
from .config import Config
from .handler import REFUSAL_LINES, EchoHandler, log_access
from .protocol import ERR_BUSY
from .state import REFUSAL_SUMMARY_EVERY_S, Connection, ServerState

logger = logging.getLogger(__name__)

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
    """One listening socket; each admitted connection runs an EchoHandler in a thread.

    ``process_request`` is overridden, so ThreadingMixIn's own thread handling
    (``daemon_threads``, ``block_on_close``, its list of threads scanned on every
    accept) is not used: ReadyThreads runs the handlers, ServerState keeps the
    registry, and a stop is bounded by its deadline (service.py), not by joins.
    """

    allow_reuse_address = True
    # What serves a connection (an extension point); built by _serve_connection with its Connection.
    handler_class: type[EchoHandler] = EchoHandler

    def __init__(self, listen: ListenAddress | socket.socket, state: ServerState,
                 threads: ReadyThreads | None = None, listener_index: int | None = None) -> None:
        self.state = state
        # Which of state.config.listeners this socket serves (None: a plain socket from
        # systemd with no [[listener]] tables). Read at every accept, so a reload applies.
        self.listener_index = listener_index
        self.threads = threads or ReadyThreads()
        self.alive_at = time.monotonic()
        self._fd_warning_at = 0.0
        if isinstance(listen, socket.socket):  # inherited: socket activation or a worker
            self.address_family = listen.family
            super().__init__(listen.getsockname()[:2], cast(Any, self.handler_class), bind_and_activate=False)
            self.socket.close()
            self.socket = listen
            self.server_address = listen.getsockname()
        else:
            self.address_family = socket.AF_INET6 if ":" in listen.host else socket.AF_INET
            self.request_queue_size = state.config.backlog
            super().__init__(_socket_address(listen), cast(Any, self.handler_class))
        # Workers share this socket: all of them wake for one connection, one wins
        # the accept(), and a blocking accept() would hang the others.
        self.socket.setblocking(False)

    def service_actions(self) -> None:
        # serve_forever calls this after every poll(): proof that the accept loop turns,
        # which is what the watchdog pings vouch for.
        self.alive_at = time.monotonic()

    @property
    def address(self) -> str:
        """The address actually bound, as 'host:port' ('[::1]:8009', '[fe80::1%eth0]:8009' for IPv6)."""
        address = cast(tuple[Any, ...], self.server_address)
        if len(address) == 4 and address[3] and "%" not in address[0]:
            address = (f"{address[0]}%{socket.if_indextoname(address[3])}", address[1])
        return peer_name(address)

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
                self._warn_out_of_fds(err)
                time.sleep(ACCEPT_BACKOFF_S)  # in the acceptor thread only: don't spin on EMFILE
            raise  # socketserver ignores it and polls again

    def _warn_out_of_fds(self, err: OSError) -> None:
        """accept() failed for want of file descriptors: warn (rate-limited)."""
        now = time.monotonic()
        if now - self._fd_warning_at >= REFUSAL_SUMMARY_EVERY_S:
            self._fd_warning_at = now
            logger.warning("cannot accept: %s; backing off (raise LimitNOFILE, or lower max_connections)",
                           os.strerror(err.errno or 0).lower())

    def process_request(self, request: Any, client_address: Any) -> None:
        state = self.state
        proxy = None
        index = self.listener_index
        tls = state.tls[index] if index is not None else None  # read once: a reload swaps the tuple
        if index is not None and (listener := state.config.listeners[index]).proxied:
            if state.is_trusted(index, client_address[0]):
                proxy = listener.proxy_protocol
            elif listener.proxy_untrusted == "refuse":
                _close_untrusted(request, client_address, state)
                return
            # else "direct": an untrusted peer is served as the client it is
        admitted = state.admit(request, client_address, proxy)
        if isinstance(admitted, str):
            # A TLS client would read a plaintext ERR line as a broken record: it just gets the close.
            _refuse(request, REFUSAL_LINES[admitted] if tls is None else b"")
            log_refusals(state)
            return
        if tls is not None:
            assert index is not None
            admitted.tls_context = tls.context
            admitted.tls_timeout_s = state.config.listeners[index].tls_handshake_timeout_s
        try:
            self.threads.run(self._serve_connection, request, client_address, admitted)
        except RuntimeError:  # can't start new thread: out of memory or pids
            self.state.release(admitted)
            _refuse(request, ERR_BUSY if tls is None else b"")

    def _serve_connection(self, request: Any, client_address: Any, conn: Connection) -> None:
        thread = threading.current_thread()
        thread.name = f"tsecho-conn-{conn.peer}"
        try:
            self.handler_class(request, client_address, self, self.state, conn)
        except Exception:
            self.handle_error(request, client_address)
        finally:
            request.close()  # the peer has its FIN before the access event is written
            try:
                if conn.refused is None:
                    log_access(conn)
                else:  # refused once its PROXY header named the client: a refusal, not an access
                    log_refusals(self.state)
            finally:
                self.state.release(conn)  # last: a stop waits for every release, so no event is lost
                thread.name = "tsecho-conn-parked"

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A bug in a handler: log it once with its traceback; only that connection ends."""
        logger.exception("%s internal error; connection closed", peer_name(client_address))


def log_refusals(state: ServerState, force: bool = False) -> None:
    """Log refused connections as one summary, at most every 10 s (or now, if *force*)."""
    taken = state.take_refusals_to_log(force)
    if taken is None:
        return
    count, window = taken
    config = state.config
    more = ""
    if config.rules:
        more += f", {len(config.rules)} access rules"
    if config.connection_rate_per_ip:
        more += f", connection_rate_per_ip={config.connection_rate_per_ip:g}"
    logger.warning(
        "refused %d connections in the last %.0f s (limits: max_connections=%d, max_connections_per_ip=%d%s)",
        count, window, config.max_connections, config.max_connections_per_ip, more,
    )


def _close_untrusted(sock: socket.socket, client_address: Any, state: ServerState) -> None:
    """A peer outside proxy_trusted on a PROXY listener (proxy_untrusted = "refuse"): close, log once."""
    sock.close()  # without a word: its header is not believed, and it is told nothing
    state.record_untrusted()
    conn = Connection(sock, client_address, counted=False)
    conn.reason = "proxy-untrusted"
    log_access(conn)


def _refuse(sock: socket.socket, line: bytes) -> None:
    """Answer a refused connection with its ERR line (none if denied) and close it, without a thread."""
    try:
        sock.setblocking(False)
        if line:
            sock.send(line)
        sock.shutdown(socket.SHUT_WR)
    except OSError:
        pass  # the peer is gone or its buffer is full: the close says the rest
    finally:
        sock.close()


def open_servers(
    config: Config, state: ServerState, inherited: Sequence[tuple[socket.socket, int | None]] = ()
) -> list[EchoServer]:
    """Open one EchoServer per listener (or per inherited socket, with its listener's index).

    Raises ListenError with an actionable message; none stays open if one fails.
    """
    servers: list[EchoServer] = []
    threads = ReadyThreads()
    try:
        if inherited:
            servers.extend(EchoServer(sock, state, threads, index) for sock, index in inherited)
        else:
            for index, listener in enumerate(config.listeners):
                servers.append(_listen(listener.address, state, threads, index))
    except BaseException:
        for server in servers:
            server.server_close()
        raise
    return servers


def match_inherited(config: Config, named: Sequence[tuple[str, socket.socket]]) -> list[tuple[socket.socket, int | None]]:
    """Give each socket systemd passed in its listener: by FileDescriptorName=, else by bound address.

    A socket whose name is a listener's ``name`` serves that listener; otherwise
    one bound to a listener's exact address does. Without [[listener]] tables
    every socket is plain, as before listeners had settings. With tables, a
    socket that matches none is a ListenError: serving it plain could expose a
    PROXY port's clients as the proxy, or take headers from anyone.
    """
    if not named:
        return []
    if len(config.listeners) == len(config.listen):  # no tables: all plain
        return [(sock, None) for _, sock in named]
    by_name = {listener.name: i for i, listener in enumerate(config.listeners) if listener.name is not None}
    by_address = {_normal(listener.address): i for i, listener in enumerate(config.listeners)}
    matched: list[tuple[socket.socket, int | None]] = []
    for name, sock in named:
        bound = peer_name(sock.getsockname())
        index = by_name.get(name)
        if index is None:
            index = by_address.get(_normal(parse_listen(bound)))
        if index is None:
            names = ", ".join(sorted(n for n in by_name if n)) or "none set"
            raise ListenError(
                f"socket activation: the socket named {name!r} on {bound} matches no [[listener]] "
                f"(by name: {names}; or by address): set FileDescriptorName= in the .socket unit to a "
                f"listener's name, or add a [[listener]] with address = \"{bound}\""
            )
        matched.append((sock, index))
    served = {index for _, index in matched}
    for index, listener in enumerate(config.listeners):
        if index not in served and index >= len(config.listen):
            logger.warning("[[listener]] %s (%s) got no socket from systemd: not listening there",
                           listener.name or f"#{index - len(config.listen) + 1}", listener.address)
    return matched


def _normal(address: ListenAddress) -> tuple[str, int]:
    return address.host, address.port


def _socket_address(listen: ListenAddress) -> tuple[Any, ...]:
    """What bind() takes: an IPv6 literal with a zone (fe80::1%eth0) needs the 4-tuple with its scope id."""
    if "%" in listen.host:
        return socket.getaddrinfo(listen.host, listen.port, socket.AF_INET6, socket.SOCK_STREAM)[0][4]
    return (listen.host, listen.port)


def _listen(address: ListenAddress, state: ServerState, threads: ReadyThreads, index: int | None = None) -> EchoServer:
    try:
        return EchoServer(address, state, threads, index)
    except OSError as err:
        raise listen_error(address, err) from err


def listen_error(address: ListenAddress, err: OSError, what: str = "listen") -> ListenError:
    """The one-line message for a socket that could not be bound on *address* (for any listener)."""
    if isinstance(err, socket.gaierror):
        return ListenError(f"cannot listen on {address}: cannot resolve host {address.host!r}: "
                           f"{err.strerror} (check the name, or give an IP address)")
    reason = os.strerror(err.errno).lower() if err.errno else str(err)
    hint = ""
    if err.errno == errno.EADDRINUSE:
        hint = f" (another tsechod? try: ss -ltnp 'sport = :{address.port}')"
    elif err.errno == errno.EACCES and address.port < 1024:
        hint = " (ports below 1024 need root, CAP_NET_BIND_SERVICE, or the socket unit)"
    elif err.errno == errno.EADDRNOTAVAIL:
        hint = f" (no such address on this host: check `ip addr` and the {what} setting)"
    return ListenError(f"cannot listen on {address}: {reason}{hint}")
