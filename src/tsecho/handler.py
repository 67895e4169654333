"""One connection's life: its phases, the line loop, and how it ends.

``EchoHandler`` serves one admitted connection in its own thread: first the
*preamble* (phases before any line is read: a PROXY header, a TLS handshake;
each one a method with its own deadline), then the line loop, then close.
A wait for a quiet peer is a ``poll()`` on two things: the peer's socket and
the server's stop pipe. That lets a stop reach a thread blocked waiting for an
idle peer at once, without a polling interval and without closing the socket
under it. A plain TCP connection that was just answered first waits for the
next line in ``recv()`` itself, at most ``HOT_WAIT_S`` (the kernel's
``SO_RCVTIMEO``): one system call per request instead of two, as in the
tutorial server; a stop reaches such a thread when its ``recv()`` returns.
Protocol rules live in protocol.py; what the thread shares with others
(config, clock, stop, counters) in state.py.

Error mapping is in one place, ``handle``: a peer's fault becomes the access
event's reason; anything else is a bug, logged once with its traceback by the
server, and only this connection ends.

The connection is a socket, or (``tsechod --stdio``, stdio.py) ``Pipes``: two
file descriptors behind the few socket calls the handler makes. The socket
path is the same code as before Pipes existed: ``recv`` and ``send`` are the
socket's own bound methods.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import socket
import socketserver
import ssl
import struct
import time
from typing import Any, Callable, Final

from .protocol import (ERR_BUSY, ERR_TOO_MANY_FROM_IP, LineDecoder, LineTooLong, Prefixer, Stamper, TelnetFilter,
                       count_lines, err_line_too_long, format_replies, prefix_lines, reply_prefix)
from .access import normalize_address
from .config import Config
from .proxyproto import (V1_MAX_BYTES, V2_HEADER_BYTES, V2_MAX_LENGTH_BYTES, IPAddress, ProxyHeader,
                         ProxyHeaderError, ProxyHeaderParser)
from .state import Connection, ServerState, Stream
from .tlsconfig import HandshakeFailed, HandshakeStopped, handshake, handshake_error_detail, session_info

logger = logging.getLogger(__name__)

RECV_BYTES: Final = 65536
# recv(n) allocates n bytes before it reads. 64 KiB a read went through malloc's arenas and
# cost pingpong 256 about 7% of its replies/s; a request this small stays in malloc's
# per-thread cache. The line loop asks for this much while reads stay this small.
SMALL_RECV_BYTES: Final = 512
# A stop answers what is already queued, but a peer that keeps sending can't
# hold the drain open: read at most this much once the stop has begun.
DRAIN_BYTES: Final = 1 << 20
# After an ERR line, how long a peer that is still sending may take to leave before it
# gets a reset (what it sends meanwhile is read and dropped).
LINGER_S: Final = 2.0
# How long a plain TCP connection waits for its peer's next line in a blocking recv() before
# it parks in poll(): the longest a stop takes to reach a connection that was just busy. At
# 20 ms the timer itself cost pingpong 1 about 2 us a request on the benchmark VM; at 50 ms
# and longer, nothing measurable (docs/performance.md).
HOT_WAIT_S: Final = 0.05
_HOT_WAIT_TIMEVAL: Final = struct.pack("@ll", 0, int(HOT_WAIT_S * 1_000_000))

_POLLIN: Final = select.POLLIN | select.POLLPRI
_POLLOUT: Final = select.POLLOUT
_POLLERR: Final = select.POLLERR | select.POLLHUP | select.POLLNVAL
_PEER_GONE: Final = frozenset((errno.ECONNRESET, errno.EPIPE, errno.ETIMEDOUT, errno.ECONNABORTED, errno.ENOTCONN))
# How much of a PROXY header to peek at: the longest header each mode allows.
_PEEK_BYTES: Final = {"v1": V1_MAX_BYTES, "v2": V2_HEADER_BYTES + V2_MAX_LENGTH_BYTES,
                      "any": V2_HEADER_BYTES + V2_MAX_LENGTH_BYTES}
# What a refused peer reads before we close, by refusal reason (state.REFUSAL_REASONS).
# A denied peer is told nothing: a scanner learns no more than from a closed port.
REFUSAL_LINES: Final = {"busy": ERR_BUSY, "per-address": ERR_TOO_MANY_FROM_IP, "rate": ERR_TOO_MANY_FROM_IP,
                        "denied": b""}


class _Closed(Exception):
    """End of the connection, with the access log's reason."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class TLSSocket(ssl.SSLSocket):
    """A server-side TLS connection that behaves like the plain non-blocking socket the handler knows.

    Chosen once per connection (the context's ``sslsocket_class``), so the
    plaintext path pays nothing: "would block" in either direction is
    ``BlockingIOError``; the peer's close_notify reads as ``b""`` (EOF, like a
    FIN); ``shutdown(SHUT_WR)`` sends close_notify instead of a bare FIN
    (which a TLS client reads as a truncation attack), and keeps the session
    readable so the peer's last bytes and its own close_notify can be read.
    """

    def recv(self, buflen: int = 1024, flags: int = 0) -> bytes:
        try:
            return super().recv(buflen, flags)
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            raise BlockingIOError(errno.EAGAIN, "TLS record incomplete") from None
        except ssl.SSLZeroReturnError:  # close_notify after ours: the session ended cleanly
            return b""

    def send(self, data: Any, flags: int = 0) -> int:
        try:
            return super().send(data, flags)
        except (ssl.SSLWantWriteError, ssl.SSLWantReadError):
            # OpenSSL wants the same bytes again: _send_rest's memoryview offers at least those.
            raise BlockingIOError(errno.EAGAIN, "TLS send would block") from None

    def shutdown(self, how: int) -> None:
        if how != socket.SHUT_WR:
            super().shutdown(how)
            return
        try:
            self.unwrap()  # writes close_notify; non-blocking, so it doesn't wait for the peer's
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            pass  # sent (WantRead: the peer's is still to come), or the send buffer is full: close() says the rest
        except (ssl.SSLError, ValueError):
            socket.socket.shutdown(self, how)  # the session is broken or gone: a FIN is all we can say


class _TLSReadPoll:
    """The handler's read poll on a TLS connection: TLS's own buffer first, then the real poll().

    A read takes one TLS record; more decrypted bytes may wait inside OpenSSL
    while the socket itself has nothing, and poll() would sleep on them.
    """

    __slots__ = ("poll", "register", "unregister")

    def __init__(self, real: select.poll, tls: TLSSocket) -> None:
        fd = tls.fileno()
        pending = tls.pending
        real_poll = real.poll

        def poll(timeout: float | None = None) -> list[tuple[int, int]]:
            if pending():
                return [(fd, select.POLLIN)]
            return real_poll(timeout)

        self.poll = poll
        self.register = real.register
        self.unregister = real.unregister


def _escape(data: bytes) -> str:
    """Client bytes made safe for a log line: no control characters, no forged lines."""
    return repr(data)[2:-1]


class Pipes:
    """A connection on two file descriptors (pipes, a tty, a socket pair), shaped like a socket.

    What inetd-style superservers may hand ``tsechod --stdio`` as fd 0 and fd 1:
    ``recv`` is os.read of one, ``send`` os.write of the other, and
    ``shutdown(SHUT_WR)`` closes the writing one, which is how a pipe says
    end-of-file. Both fds are owned (closed by ``close``).
    """

    def __init__(self, read_fd: int, write_fd: int) -> None:
        self.read_fd = read_fd
        self.write_fd = write_fd
        self._write_open = True
        # O_NONBLOCK belongs to the open file, which a terminal shares with the shell that
        # started us: it is put back as it was before each fd is closed.
        self._blocking = (os.get_blocking(read_fd), os.get_blocking(write_fd))

    def fileno(self) -> int:
        return self.read_fd  # what poll() waits on to read; write_fileno() to write

    def write_fileno(self) -> int:
        return self.write_fd

    def setblocking(self, flag: bool, /) -> None:
        os.set_blocking(self.read_fd, flag)
        os.set_blocking(self.write_fd, flag)

    def recv(self, bufsize: int, flags: int = 0, /) -> bytes:
        if flags:  # MSG_PEEK, for a PROXY header: --stdio has no PROXY listener
            raise ValueError(f"Pipes.recv: flags {flags} not supported")
        return os.read(self.read_fd, bufsize)

    def send(self, data: bytes | memoryview, /) -> int:
        return os.write(self.write_fd, data)

    def shutdown(self, how: int, /) -> None:
        if how in (socket.SHUT_WR, socket.SHUT_RDWR) and self._write_open:
            self._write_open = False
            os.set_blocking(self.write_fd, self._blocking[1])
            os.close(self.write_fd)

    def close(self) -> None:
        self.shutdown(socket.SHUT_WR)
        if self.read_fd >= 0:
            os.set_blocking(self.read_fd, self._blocking[0])
            os.close(self.read_fd)
            self.read_fd = -1


class EchoHandler(socketserver.BaseRequestHandler):
    """Answer each line of one connection with the timestamped line.

    Methods run in the connection's own thread, in this order: ``setup``,
    ``handle`` (``preamble``, then ``_serve``: the line loop), ``finish``.
    """

    request: Stream

    def __init__(self, request: Any, client_address: Any, server: socketserver.BaseServer | None,
                 state: ServerState, conn: Connection) -> None:
        self.state = state
        self.conn = conn
        self._early = b""  # what came with the PROXY header: the client's first data
        super().__init__(request, client_address, server)  # type: ignore[arg-type] # None: --stdio

    def setup(self) -> None:
        # Non-blocking: we poll ourselves, so the stop pipe can wake us (see module doc).
        self.request.setblocking(False)
        self._read_poll = select.poll()
        self._read_poll.register(self.request, _POLLIN)
        self._read_poll.register(self.state.stop_fd, select.POLLIN)
        self._write_poll: select.poll | None = None  # made when a reply first has to wait

    def handle(self) -> None:
        try:
            self.preamble()
            self._serve()
        except _Closed as closed:
            self.conn.reason = closed.reason
        except (ConnectionResetError, BrokenPipeError):
            self.conn.reason = "reset"
        except ssl.SSLError as err:  # a broken record after the handshake: the peer's fault, not ours
            self.conn.detail = handshake_error_detail(err)
            self.conn.reason = "tls-error"
        except OSError as err:
            if err.errno not in _PEER_GONE:
                raise  # a bug or a resource problem: EchoServer.handle_error logs it
            self.conn.reason = "reset"

    def finish(self) -> None:
        # Close before the access event is logged: the peer gets its FIN whatever the log sink does.
        self.request.close()

    def preamble(self) -> None:
        """The phases before the line loop, each bounded by its own deadline.

        A PROXY header (on a PROXY listener, from a trusted proxy), then on a
        TLS listener the handshake (the header comes before it, on the wire
        too). Each is a method that raises ``_Closed`` with the access event's
        reason.
        """
        if self.conn.expect_proxy is not None:
            self._read_proxy_header(self.conn.expect_proxy)
        if self.conn.tls_context is not None:
            self._tls_handshake(self.conn.tls_context)

    def _tls_handshake(self, context: ssl.SSLContext) -> None:
        """Complete the TLS handshake within tls_handshake_timeout_s; then the line loop reads through TLS.

        A failure (plaintext, an old version, a bad client certificate, a
        silent or dripping client at the deadline) ends the connection as
        ``tls-error`` with the detail in the access event: one line, no
        traceback. The wrap keeps the descriptor, so the polls registered in
        ``setup`` stay valid; ``conn.sock`` stays the accepted socket object
        (the registry's key) and ``conn.wire`` becomes the TLS one.
        """
        conn = self.conn
        if self._early:  # can't happen: the PROXY phase leaves what follows its header in the socket
            conn.detail = "data with the proxy header"
            raise _Closed("tls-error")
        # OpenSSL writes the handshake's last flight and each session ticket as separate sends; with
        # Nagle, the reply to the first line then waits for a delayed ACK (40 ms on Linux).
        sock = self.request
        assert isinstance(sock, socket.socket)  # TLS is a listener's: never --stdio's pipes
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if context.sslsocket_class is not TLSSocket:
            context.sslsocket_class = TLSSocket  # the same value from every thread: a benign race
        tls = context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        assert isinstance(tls, TLSSocket)
        self.request = conn.wire = tls
        try:
            handshake(tls, time.monotonic() + conn.tls_timeout_s, self.state.stop_fd)
        except HandshakeStopped:
            raise _Closed("shutdown") from None
        except HandshakeFailed as err:
            conn.detail = err.detail
            raise _Closed("tls-error") from None
        conn.tls_session = session_info(tls)
        self._read_poll = _TLSReadPoll(self._read_poll, tls)  # type: ignore[assignment]

    def _read_proxy_header(self, mode: str) -> None:
        """Read the PROXY header within proxy_header_timeout_s; then the client it names is the peer.

        Reads only as much as the parser says belongs to the header
        (``safe_read_bytes``), so whatever follows (a TLS handshake, say) stays
        in the socket; bytes that do come with the header are kept for the line
        loop. A bad or late header closes the connection without a word (the
        access event says why). A health check (LOCAL, UNKNOWN, a v1 header
        naming the proxy itself, or a connect-and-close) stays the proxy's own
        connection, holds no per-address slot, and is logged at debug.
        """
        conn = self.conn
        deadline = time.monotonic() + self.state.config.proxy_header_timeout_s
        parser = ProxyHeaderParser(mode)
        recv = self.request.recv
        found: tuple[ProxyHeader, bytes] | None = None
        try:
            found = self._peek_proxy_header(mode, deadline)
            while found is None:
                self._wait_readable(deadline, "proxy-timeout")
                try:
                    data = recv(parser.safe_read_bytes())
                except BlockingIOError:
                    continue
                if not data:
                    if not parser.received_bytes:  # connected and closed: a health check
                        conn.quiet = True
                        raise _Closed("eof")
                    parser.finish()
                conn.bytes_in += len(data)
                found = parser.feed(data)
        except ProxyHeaderError as err:
            conn.detail = err.reason
            raise _Closed("proxy-invalid") from None
        header, self._early = found
        conn.bytes_in = len(self._early)  # the header is the proxy's; bytes_in counts the client's
        for field in ("authority", "aws_vpce_id"):
            if (value := getattr(header, field)) is not None:
                conn.tlvs[field] = value
        if header.alpn is not None:
            conn.tlvs["alpn"] = header.alpn.decode("ascii", "backslashreplace")
        client = header.client
        if client is None or self._names_the_proxy(client):
            # LOCAL, UNKNOWN, UNIX, unknown families, and haproxy's v1 check (it names itself).
            conn.quiet = True
            return
        refusal = self.state.readmit(conn, (str(client[0]), client[1]))
        if refusal is not None:
            # Before the handshake, a TLS client would read an ERR line as a broken record: just close.
            line = REFUSAL_LINES[refusal] if conn.tls_context is None else b""
            if line:
                self._send(line)
                self._linger(time.monotonic() + LINGER_S)
            raise _Closed("eof")

    def _peek_proxy_header(self, mode: str, deadline: float) -> tuple[ProxyHeader, bytes] | None:
        """The usual case in two system calls: the whole header in the first segment.

        Peeks at what has arrived; if it holds a complete header, takes exactly
        the header's bytes off the socket (what follows stays there for the line
        loop, or a TLS handshake). None: not complete yet, nothing taken; the
        caller reads it piece by piece. A peer that closed at once, or bytes that
        cannot start a header, end the connection here.
        """
        size = _PEEK_BYTES[mode]
        try:  # the header is usually there by the time a thread runs: skip the poll() then
            data = self.request.recv(size, socket.MSG_PEEK)
        except BlockingIOError:
            self._wait_readable(deadline, "proxy-timeout")
            try:
                data = self.request.recv(size, socket.MSG_PEEK)
            except BlockingIOError:
                return None
        if not data:  # connected and closed: a health check
            self.conn.quiet = True
            raise _Closed("eof")
        try:
            found = ProxyHeaderParser(mode).feed(data)
        except ProxyHeaderError:
            return None  # the caller reads the same bytes for real and meets the same error
        if found is None:
            return None
        header, _ = found
        taken = 0
        while taken < header.header_bytes:  # peeked bytes are there: this takes them at once
            taken += len(self.request.recv(header.header_bytes - taken))
        self.conn.bytes_in += taken
        return header, b""

    def _names_the_proxy(self, client: tuple[IPAddress, int]) -> bool:
        """Whether the header's client is the connection's own peer (a dual-stack socket's
        ``::ffff:10.0.0.5`` is ``10.0.0.5``)."""
        host, port = self.client_address[:2]
        if client[1] != port:
            return False
        try:
            return normalize_address(str(host).partition("%")[0]) == normalize_address(client[0])
        except ValueError:
            return False

    def _wait_readable(self, deadline: float, reason: str) -> None:
        """Wait until the peer sent something; ``_Closed(reason)`` at *deadline*, "shutdown" on a stop."""
        while (left := deadline - time.monotonic()) > 0:
            for fd, _ in self._read_poll.poll(left * 1000 + 1):
                if fd == self.state.stop_fd:
                    raise _Closed("shutdown")
                return
        raise _Closed(reason)

    def _serve(self) -> None:
        state = self.state
        conn = self.conn
        sock = self.request
        decoder = LineDecoder(state.config.max_line_bytes)
        telnet = TelnetFilter() if state.config.telnet else None
        # Bound once: this loop runs for every request, and attribute lookups add up.
        recv = sock.recv
        send = sock.send
        poll = self._read_poll.poll
        monotonic = time.monotonic
        last_read = monotonic()
        line_started = 0.0  # when the first byte of the unfinished line arrived
        early, self._early = self._early, b""  # what came with a PROXY header: answered first
        seen = state.config  # the config the values below were taken from
        idle_s, line_s, max_line_bytes, debug, stamper, prefixer, clock = self._settings(seen, decoder)
        stamp = prefix = b""  # the last stamp, and the reply prefix made from it
        recv_bytes = SMALL_RECV_BYTES  # follows the last read: small while lines come one by one
        plain = True  # no unfinished line, and the telnet filter (if any) between commands
        # Plain TCP only: a TLS read may need several socket reads (ssl retries a blocking one
        # forever), and --stdio's pipes have no SO_RCVTIMEO.
        hot = isinstance(sock, socket.socket) and not isinstance(sock, ssl.SSLSocket)
        if hot:  # sends are bounded the same way; _send_rest does the waiting past that
            assert isinstance(sock, socket.socket)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _HOT_WAIT_TIMEVAL)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, _HOT_WAIT_TIMEVAL)
            sock.setblocking(True)
        while True:
            now = monotonic()
            wait = last_read + idle_s - now
            why = "idle"
            if not plain and decoder.pending:
                slow_left = line_started + line_s - now
                if slow_left <= wait:
                    wait, why = slow_left, "slow"
            if wait <= 0:
                raise _Closed(why)
            if early:
                data, early = early, b""  # already counted in bytes_in
            else:
                read = False
                if hot and wait > HOT_WAIT_S:
                    # A busy peer's next line comes within a round trip: wait for it in recv()
                    # itself, the socket blocking with SO_RCVTIMEO (no poll() first).
                    try:
                        data = recv(recv_bytes)
                        read = True
                    except BlockingIOError:
                        # Quiet for HOT_WAIT_S: wait in poll(), where a stop reaches us at once,
                        # for what is left until the deadline (not the whole wait again).
                        wait -= monotonic() - now
                    if state.stopping:
                        self._finish_for_stop(decoder, telnet, data if read else None)
                if not read:
                    if not poll(max(wait, 0.0) * 1000 + 1):  # (a negative timeout would wait forever)
                        continue  # loop to re-check the deadlines
                    if state.stopping:
                        self._finish_for_stop(decoder, telnet)
                    try:
                        data = recv(recv_bytes)
                    except BlockingIOError:
                        continue
                if not data:
                    if telnet is None or not telnet.interrupted:
                        self._answer(decoder.finish())
                    raise _Closed("eof")
                conn.bytes_in += len(data)
                recv_bytes = SMALL_RECV_BYTES if len(data) < SMALL_RECV_BYTES else RECV_BYTES
            last_read = monotonic()
            if state.config is not seen:  # a reload applies from the first read after it
                seen = state.config
                idle_s, line_s, max_line_bytes, debug, stamper, prefixer, clock = self._settings(seen, decoder)
                stamp = b""
            if debug:
                logger.debug("%s sent %d bytes: %s", conn.peer, len(data), _escape(data))
            if (plain and data[-1] == 10 and len(data) <= max_line_bytes + 1
                    and (telnet is None or (b"\xff" not in data and b"\r\x00" not in data))):
                # The common case, answered without the decoder and the filter: whole lines,
                # none over the limit (the read is not), no telnet command and no CR NUL in
                # them; the filter stays as it was (between commands, no CR pending).
                if (new_stamp := stamper(clock())) is not stamp:
                    # A second-resolution stamper hands back the same bytes all second long.
                    stamp = new_stamp
                    prefix = reply_prefix(stamp, prefixer)
                lines = count_lines(data)
                reply = prefix + data if lines == 1 else prefix_lines(data, prefix)
                conn.lines += lines
                try:
                    sent = send(reply)
                except BlockingIOError:
                    sent = 0
                conn.bytes_out += sent
                if sent < len(reply):  # the peer's window is full: wait for it (rare, so out of line)
                    self._send_rest(memoryview(reply)[sent:])
                continue
            had_pending = decoder.pending
            if telnet is not None:
                data = telnet.feed(data)
            self._feed(decoder, data)
            if telnet is not None and telnet.interrupted:
                raise _Closed("interrupt")
            if decoder.pending and (not had_pending or data.rfind(b"\n") >= 0):
                line_started = last_read
            plain = not decoder.pending and (telnet is None or telnet.at_rest)

    def _settings(self, config: Config, decoder: LineDecoder) -> tuple[float, float, int, bool, Stamper,
                                                                     Prefixer | None, Callable[[], float]]:
        """What the line loop takes from *config*, once per reload: its loop then reads locals only.

        idle and line timeouts, the line limit (the decoder's too), whether debug logging
        is on (a reload reconfigures logging before it swaps the config), and the stamper,
        prefixer and clock (``ServerState.apply`` replaces them before ``config``).
        """
        state = self.state
        decoder.max_line_bytes = config.max_line_bytes
        return (config.idle_timeout_s, config.line_timeout_s, config.max_line_bytes,
                logger.isEnabledFor(logging.DEBUG), state.stamper, state.prefixer, state.clock)

    def _feed(self, decoder: LineDecoder, data: bytes) -> None:
        """Answer every line *data* completes, in one send."""
        try:
            block = decoder.feed(data)
        except LineTooLong as err:
            self._answer(err.lines_before, tail=err_line_too_long(err.max_line_bytes))
            logger.warning("%s closed: line too long (max %d bytes)", self.conn.peer, err.max_line_bytes)
            self._linger(time.monotonic() + LINGER_S)
            raise _Closed("too-long") from None
        self._answer(block)

    def _answer(self, block: bytes, tail: bytes = b"") -> None:
        if block:
            state = self.state
            self.conn.lines += count_lines(block)
            self._send(format_replies(block, state.stamper(state.clock()), state.prefixer) + tail)
        elif tail:
            self._send(tail)

    def _send(self, data: bytes) -> None:
        """Write all of *data*, waiting at most send_timeout_s for a peer that doesn't read."""
        try:
            sent = self.request.send(data)
        except BlockingIOError:
            sent = 0
        self.conn.bytes_out += sent
        if sent < len(data):  # the peer's window is full: wait for it (rare, so out of line)
            self._send_rest(memoryview(data)[sent:])

    def _send_rest(self, view: memoryview) -> None:
        sock = self.request
        state = self.state
        if self._write_poll is None:
            self._write_poll = select.poll()
            self._write_poll.register(sock.write_fileno() if isinstance(sock, Pipes) else sock, _POLLOUT)
            self._write_poll.register(state.stop_fd, select.POLLIN)
        deadline = time.monotonic() + state.config.send_timeout_s
        if state.stopping:
            deadline = min(deadline, state.stop_deadline)
        while True:
            now = time.monotonic()
            if now >= deadline:
                # Checked before sending again: poll() reports POLLOUT only once a third
                # of the buffer is free, but send() may still squeeze the rest in, and
                # that must not restart the clock for a peer that hasn't read for this long.
                raise _Closed("stalled")
            for fd, event in self._write_poll.poll((deadline - now) * 1000 + 1):
                if fd == state.stop_fd:
                    # Still finish this reply, but within the stop's deadline.
                    self._write_poll.unregister(fd)
                    deadline = min(deadline, state.stop_deadline)
                elif event & _POLLERR and not event & _POLLOUT:
                    raise _Closed("reset")
            if time.monotonic() >= deadline:
                raise _Closed("stalled")
            try:
                sent = sock.send(view)
            except BlockingIOError:
                sent = 0
            self.conn.bytes_out += sent
            view = view[sent:]
            if not view:
                return

    def _nonblocking(self) -> None:
        """Leave the line loop's blocking reads: what follows waits in poll() only."""
        sock = self.request
        if isinstance(sock, socket.socket) and sock.getblocking():  # no system call: Python knows
            sock.setblocking(False)

    def _linger(self, deadline: float) -> None:
        """Send our FIN, then read and drop what the peer still sends, until it closes or *deadline*.

        Closing with unread input sends a reset, which can destroy the ERR line
        still on its way, and makes ``nc`` quit without printing it.
        """
        state = self.state
        sock = self.request
        try:
            self._nonblocking()
            sock.shutdown(socket.SHUT_WR)
            if state.stopping:
                deadline = min(deadline, state.stop_deadline)
            while (left := deadline - time.monotonic()) > 0:
                for fd, _ in self._read_poll.poll(left * 1000 + 1):
                    if fd == state.stop_fd:  # a stop began: its deadline bounds this wait too
                        self._read_poll.unregister(fd)
                        deadline = min(deadline, state.stop_deadline)
                try:
                    if not sock.recv(RECV_BYTES):
                        return
                except BlockingIOError:
                    continue
        except OSError:
            return  # the peer is gone: nothing left to protect

    def _finish_for_stop(self, decoder: LineDecoder, telnet: TelnetFilter | None,
                         data: bytes | None = None) -> None:
        """A stop began: answer the lines already here (*data*: what was just read), send FIN, let the peer leave.

        The peer is waited for (discarding what it still sends) so that close()
        finds nothing unread; closing with unread input would send a reset.
        """
        sock = self.request
        self._nonblocking()
        drained = 0
        while drained < DRAIN_BYTES:
            if data is None:
                try:
                    data = sock.recv(RECV_BYTES)
                except BlockingIOError:
                    break
            if not data:
                break
            drained += len(data)
            self.conn.bytes_in += len(data)
            if telnet is not None:
                data = telnet.feed(data)
            self._feed(decoder, data)
            if telnet is not None and telnet.interrupted:
                break
            data = None
        sock.shutdown(socket.SHUT_WR)
        self._read_poll.unregister(self.state.stop_fd)
        deadline = self.state.stop_deadline
        while (left := deadline - time.monotonic()) > 0:
            if not self._read_poll.poll(left * 1000 + 1):
                continue
            try:
                if not sock.recv(RECV_BYTES):
                    break
            except BlockingIOError:
                continue
        raise _Closed("shutdown")


def log_access(conn: Connection) -> None:
    """The access event of a connection that has ended: one line, and fields for the JSON log.

    The line starts with the client (``203.0.113.7:51544 closed reason=...``); a
    connection a PROXY header relayed ends with `` via=<the proxy>``, so parsers of
    the line's start keep working. A proxy's health check is logged at debug.
    """
    level = logging.DEBUG if conn.quiet else logging.INFO
    if not logger.isEnabledFor(level):
        return
    duration = time.monotonic() - conn.started
    extra: dict[str, object] = {
        "event": "access",
        "peer": conn.peer,
        "reason": conn.reason,
        "duration_s": round(duration, 6),
        "lines": conn.lines,
        "bytes_in": conn.bytes_in,
        "bytes_out": conn.bytes_out,
    }
    tail = ""
    if conn.via is not None:
        extra["via"] = conn.via
        tail += f" via={conn.via}"
    if conn.quiet:
        extra["health_check"] = True
        tail += " health-check"
    if conn.tls_session is not None:
        session = conn.tls_session
        extra.update(session.log_fields())
        tail += f" tls={session.version} cipher={session.cipher}"
        if session.client_subject is not None:
            # Quoted: a subject may hold spaces; format_subject escaped its quotes and backslashes.
            tail += f' client="{session.client_subject}"'
    if conn.detail is not None:
        extra["detail"] = conn.detail
        tail += f" detail={conn.detail}"  # last: it has spaces (the formatter escapes control characters)
    extra.update(conn.tlvs)
    logger.log(
        level,
        "%s closed reason=%s duration_s=%.3f lines=%d bytes_in=%d bytes_out=%d%s",
        conn.peer,
        conn.reason,
        duration,
        conn.lines,
        conn.bytes_in,
        conn.bytes_out,
        tail,
        extra=extra,
    )
