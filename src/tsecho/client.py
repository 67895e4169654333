"""The ``tsecho`` client: connect to tsechod, send lines, print the replies.

Owns the ``tsecho`` command line (:func:`main`) and its three ways to run:

* ``-m TEXT`` (repeatable): send those lines, print the replies, exit.
* stdin not a terminal: send every stdin line, pipelined (send in chunks while
  reading replies, bounded memory), half-close, read the rest until EOF.
* stdin a terminal: an interactive ``>>> `` prompt with readline editing and
  history in ``~/.tsecho_history``.

``tsecho ping`` and ``tsecho check`` (a first argument of exactly ``ping`` or
``check``) are handed to ``probe.py``, imported only then.

``--tls`` wraps the connection in TLS for all three (:func:`client_context`,
:func:`start_tls`). TLS has no half-close, so the pipelined mode then ends when
every line it sent is answered, with a close_notify instead of a FIN.

The pure parts, :func:`parse_address` and :class:`ReplyStream`, hold the
rules and are tested without sockets; the I/O around them stays thin. Replies
are bytes and go to ``stdout.buffer`` unchanged: nothing is decoded.
Nothing here imports the server side of the package.
"""

from __future__ import annotations

import argparse
import math
import os
import select
import socket
import ssl
import sys
import time
from typing import BinaryIO, Final, NamedTuple

from .remote import (DEFAULT_HOST, DEFAULT_PORT, Address, AddressError, ClientError, connect, describe,
                     parse_address, seconds_text)
from .tlsconfig import MIN_VERSION, handshake_error_detail

DEFAULT_TIMEOUT_S: Final = 5.0
PROMPT: Final = ">>> "
HISTORY_FILE: Final = "~/.tsecho_history"
HISTORY_LENGTH: Final = 1000
CHUNK_BYTES: Final = 64 * 1024
# Stop reading stdin while this much is still unsent: memory stays bounded
# however big the input is, and the kernel's socket buffers do the queueing.
SEND_HIGH_WATER_BYTES: Final = 256 * 1024
EXIT_OK: Final = 0
EXIT_FAILURE: Final = 1
EXIT_INTERRUPTED: Final = 130  # 128 + SIGINT, what a shell reports for Ctrl-C
# A first argument spelled like one of these is a command, not a host: reach a
# host called "ping" as ping:8009.
SUBCOMMANDS: Final = ("ping", "check")
# After the last reply, how long to wait for the server's close_notify to ours: a clean
# close for the server's log, but a server that never sends one must not delay our exit.
TLS_CLOSE_WAIT_S: Final = 1.0


class OutputClosed(Exception):
    """stdout went away (``tsecho < big | head -1``): stop quietly."""


class Batch(NamedTuple):
    """What one :meth:`ReplyStream.feed` produced."""

    replies: bytes  # complete reply lines, line endings kept, ready to print
    lines: int  # how many lines that is
    error: bytes | None  # an ``ERR ...`` line (without its ending); stop there


class ReplyStream:
    """Split the server's byte stream into reply lines and spot ``ERR`` lines.

    A reply starts with ``[``; a line starting with ``ERR `` is the server
    refusing something, after which it closes. Bytes are never decoded.
    """

    def __init__(self) -> None:
        self._pending = bytearray()

    @property
    def pending(self) -> bytes:
        """Bytes after the last line end: a reply cut short, if the stream ends now."""
        return bytes(self._pending)

    def feed(self, data: bytes) -> Batch:
        """Add *data*; return the complete lines it finished.

        After an ``ERR`` line is returned the stream is done: later bytes are
        not looked at.
        """
        self._pending += data
        end = self._pending.rfind(b"\n")
        if end == -1:
            return Batch(b"", 0, None)
        complete = bytes(self._pending[: end + 1])
        del self._pending[: end + 1]
        if complete.startswith(b"ERR ") or b"\nERR " in complete:
            lines = complete.split(b"\n")
            for index, line in enumerate(lines):
                if line.startswith(b"ERR "):
                    replies = b"".join(reply + b"\n" for reply in lines[:index])
                    return Batch(replies, index, line.rstrip(b"\r"))
        return Batch(complete, complete.count(b"\n"), None)


def _printable(data: bytes) -> str:
    """Server text on its way to a terminal: escape control and non-UTF-8 bytes."""
    text = data.decode("utf-8", "backslashreplace")
    return "".join(char if char.isprintable() else repr(char)[1:-1] for char in text)


def _server_said(address: Address, line: bytes) -> ClientError:
    return ClientError(f"{address}: {_printable(line)}")


def _lost(address: Address, err: OSError) -> ClientError:
    if isinstance(err, ssl.SSLError) and not isinstance(err, (ssl.SSLEOFError, ssl.SSLZeroReturnError)):
        # TLS 1.3 finishes the client's handshake before the server checks our
        # certificate: its refusal arrives here, on the first read.
        return ClientError(f"TLS connection to {address} failed: {_tls_reason(err, address.host)}")
    if isinstance(err, ConnectionResetError):
        return ClientError(f"connection reset by {address}")
    if isinstance(err, (BrokenPipeError, ConnectionAbortedError)):
        return ClientError(f"connection closed by {address}")
    return ClientError(f"connection to {address} failed: {describe(err)}")


def _no_reply(address: Address, timeout_s: float) -> ClientError:
    return ClientError(f"no reply from {address} within {seconds_text(timeout_s)} s")


class TLSOptions(NamedTuple):
    """The ``--tls`` options: files as given, checks as asked."""

    ca: str | None  # trust only this CA file; None: the system's CAs
    cert: str | None  # client certificate (mutual TLS); the key may be in the same file
    key: str | None
    servername: str | None  # SNI and the name the certificate must have; None: the host we connect to
    insecure: bool  # no certificate or name checks at all


def client_context(options: TLSOptions) -> ssl.SSLContext:
    """A client context: the stdlib's defaults (system CAs, name check), TLS 1.2 at least.

    Raises :class:`ClientError` naming the option and file that cannot be used.
    """
    if options.ca is not None:
        try:  # given CA data, the default context trusts only that, not the system's CAs too
            context = ssl.create_default_context(cadata=_ca_text(options.ca))
        except ssl.SSLError as err:
            raise ClientError(f"--ca {options.ca}: cannot use as CA: {_ssl_text(err)}") from err
    else:
        context = ssl.create_default_context()
    context.minimum_version = MIN_VERSION
    if options.insecure:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if options.cert is not None:
        try:
            context.load_cert_chain(options.cert, options.key, password=_no_password)
        except OSError as err:
            files = f"--cert {options.cert}" + (f" --key {options.key}" if options.key else "")
            reason = describe(err) if not isinstance(err, ssl.SSLError) else _ssl_text(err)
            if isinstance(err, ssl.SSLError) and getattr(err, "reason", None) == "KEY_VALUES_MISMATCH":
                reason = "the key does not match the certificate"
            elif isinstance(err, ssl.SSLError) and getattr(err, "reason", None) is None:
                reason = "not a PEM certificate and private key"
            raise ClientError(f"cannot use {files}: {reason}") from err
        except _EncryptedKey:
            raise ClientError(f"cannot use --key {options.key or options.cert}: the key is encrypted "
                              "(decrypt it: openssl pkey -in KEY -out KEY.plain)") from None
    return context


def _ca_text(path: str) -> str:
    """The --ca file's text; ClientError when it can't be read or holds no certificate."""
    try:
        with open(path, "rb") as file:
            data = file.read(1 << 20)
    except OSError as err:
        raise ClientError(f"cannot read --ca {path}: {describe(err)}") from err
    text = data.decode("ascii", "replace")
    if "-----BEGIN CERTIFICATE-----" not in text:
        raise ClientError(f"--ca {path}: not a PEM certificate (expected -----BEGIN CERTIFICATE-----)")
    return text


class _EncryptedKey(Exception):
    pass


def _no_password() -> str:
    raise _EncryptedKey  # only asked for an encrypted key; there is no prompt to give one


def start_tls(
    sock: socket.socket, context: ssl.SSLContext, address: Address, servername: str | None, timeout_s: float
) -> ssl.SSLSocket:
    """Run the TLS handshake on a connected *sock*, within *timeout_s*; return the TLS socket.

    The server's certificate must be valid for *servername* (default: the host
    we connected to). Raises :class:`ClientError` naming why the handshake
    failed: expired, unknown CA, wrong name, not a TLS port, and so on.
    """
    name = servername or address.host
    sock.settimeout(timeout_s)
    try:
        return context.wrap_socket(sock, server_hostname=name)
    except TimeoutError as err:
        raise ClientError(f"TLS handshake with {address} failed: no answer within {seconds_text(timeout_s)} s "
                          "(is it a TLS port? try without --tls)") from err
    except ssl.SSLError as err:
        raise ClientError(f"TLS handshake with {address} failed: {_tls_reason(err, name)}") from err
    except OSError as err:
        raise _lost(address, err) from err


# X509_V_ERR_* codes (x509_vfy.h) of the server's certificate -> what to say and what to try.
_UNKNOWN_CA: Final = "unknown CA: no trusted CA signed the server's certificate (give the CA with --ca FILE)"
_VERIFY_REASONS: Final = {
    2: _UNKNOWN_CA,
    9: "certificate not yet valid (check this host's clock)",
    10: "certificate expired (the server must renew it; --insecure skips all checks)",
    18: "self-signed certificate (trust it with --ca FILE)",
    19: _UNKNOWN_CA,
    20: _UNKNOWN_CA,
    21: _UNKNOWN_CA,
    23: "certificate revoked",
}
_WRONG_NAME_CODES: Final = (62, 64)  # hostname mismatch, IP address mismatch


def _tls_reason(err: ssl.SSLError, name: str) -> str:
    """Why a TLS connection failed, from the client's side, with what to try."""
    if isinstance(err, ssl.SSLCertVerificationError):
        if err.verify_code in _WRONG_NAME_CODES:
            return (f"wrong name: the certificate is not valid for {name!r} "
                    "(connect by a name it has, or set --servername NAME)")
        return _VERIFY_REASONS.get(err.verify_code, f"certificate rejected: {err.verify_message}")
    reason = getattr(err, "reason", None) or ""
    if reason == "TLSV13_ALERT_CERTIFICATE_REQUIRED":
        return "the server requires a client certificate (give --cert FILE --key FILE)"
    detail = handshake_error_detail(err)
    if detail == "eof":
        return "the server closed the connection (is it a TLS port? does it accept this client?)"
    if detail == "not tls":
        return "the server did not answer in TLS (is it a TLS port? try without --tls)"
    if detail in ("old protocol version", "alert protocol version"):
        return "no common protocol version (tsecho needs TLS 1.2 or later)"
    if detail.startswith("alert ") and ("certificate" in detail or "unknown ca" in detail):
        return f"the server rejected the client certificate ({detail})"
    return detail


def _ssl_text(err: ssl.SSLError) -> str:
    return (getattr(err, "reason", None) or "ssl error").lower().replace("_", " ")


def open_connection(
    address: Address, timeout_s: float, tls: ssl.SSLContext | None = None, servername: str | None = None
) -> socket.socket:
    """:func:`connect`, then :func:`start_tls` when *tls* is a context. Raises :class:`ClientError`."""
    sock = connect(address, timeout_s)
    if tls is None:
        return sock
    try:
        return start_tls(sock, tls, address, servername, timeout_s)
    except BaseException:
        sock.close()
        raise


def close_tls(sock: ssl.SSLSocket, wait_s: float = TLS_CLOSE_WAIT_S) -> None:
    """Send close_notify and wait up to *wait_s* for the server's: TLS's end of a session.

    A server that is gone or never answers costs at most *wait_s*; nothing raises.
    """
    sock.setblocking(False)
    deadline = time.monotonic() + wait_s
    poller = select.poll()
    while True:
        try:
            sock.unwrap()
            return
        except ssl.SSLWantReadError:
            events = select.POLLIN
        except ssl.SSLWantWriteError:
            events = select.POLLOUT
        except (OSError, ValueError):
            return  # reset, closed, or data where close_notify should be: nothing left to close cleanly
        left = deadline - time.monotonic()
        if left <= 0:
            return
        poller.register(sock, events)
        if not poller.poll(math.ceil(left * 1000)):
            return


def _print_batch(batch: Batch, address: Address, out: BinaryIO) -> int:
    """Write a batch's replies; raise ClientError if the server sent an ERR line. Returns its line count."""
    if batch.replies:
        _write(out, batch.replies)
    if batch.error is not None:
        raise _server_said(address, batch.error)
    return batch.lines


def _write(out: BinaryIO, data: bytes) -> None:
    try:
        out.write(data)
        out.flush()
    except (BrokenPipeError, ValueError) as err:  # ValueError: stdout already closed
        raise OutputClosed from err


def pipeline(
    sock: socket.socket,
    address: Address,
    source_fd: int | None,
    preload: bytes,
    out: BinaryIO,
    timeout_s: float,
) -> None:
    """Send *preload*, then everything read from *source_fd*, and print every reply.

    Sending and receiving run interleaved in one ``poll()`` loop, so a big
    input never waits for a round trip per line and never piles up in memory.
    A last line without a line end gets one (so it is answered). When all is
    sent the write side is shut down and replies are read until the server
    closes. Returns when every line got its reply and the server closed (or
    kept still for *timeout_s* after the last reply).
    Over TLS (*sock* an ``ssl.SSLSocket``), which has no half-close: when all
    is sent and every line is answered, close_notify ends the session.
    Raises :class:`ClientError` (timeout, closed or reset connection, an
    ``ERR`` line) and :class:`OutputClosed`.
    """
    sock.setblocking(False)
    tls = isinstance(sock, ssl.SSLSocket)
    # TLS: a read may need to write first (and a write to read); OpenSSL says which
    # by SSLWant*Error, and the operation waits for that event instead.
    send_on = select.POLLOUT
    recv_also_on = 0
    outbox = bytearray(preload)
    ends_with_newline = not preload or preload.endswith(b"\n")
    stream = ReplyStream()
    lines_sent = lines_answered = 0
    write_shut = False
    deadline: float | None = None  # the server must make progress by then

    def waiting_on_server() -> bool:
        return bool(outbox) or lines_sent > lines_answered or write_shut

    poller = select.poll()
    source_polled = False
    while True:
        if source_fd is None and not outbox and not write_shut:
            if not tls:
                try:
                    sock.shutdown(socket.SHUT_WR)  # "that was all": the server answers and closes
                except OSError:
                    pass  # already reset or closed (ENOTCONN): the recv below says which
            write_shut = True  # over TLS: all is sent, and the reply count tells when we are done
            if deadline is None:
                deadline = time.monotonic() + timeout_s
        if write_shut and lines_answered == lines_sent and isinstance(sock, ssl.SSLSocket):
            close_tls(sock)
            return
        poller.register(sock, select.POLLIN | (send_on if outbox else 0) | recv_also_on)
        # Read stdin only while the outbox has room; unregister rather than mask
        # it, since poll() reports a closed pipe's POLLHUP whatever the mask.
        if source_fd is not None and source_polled != (len(outbox) < SEND_HIGH_WATER_BYTES):
            source_polled = not source_polled
            if source_polled:
                poller.register(source_fd, select.POLLIN)
            else:
                poller.unregister(source_fd)
        wait_ms = None if deadline is None else max(0, math.ceil((deadline - time.monotonic()) * 1000))
        # Bytes the SSL object already decrypted are not in the kernel's buffer, so poll() can't see them.
        buffered = isinstance(sock, ssl.SSLSocket) and sock.pending() > 0
        ready = dict(poller.poll(0 if buffered else wait_ms))
        now = time.monotonic()
        events = ready.get(sock.fileno(), 0) | (select.POLLIN if buffered else 0)
        if deadline is not None and now >= deadline and not events & select.POLLIN:
            if write_shut and lines_answered == lines_sent and not stream.pending:
                return  # every line answered; a server that doesn't close after our half-close costs no error
            raise _no_reply(address, timeout_s)

        can_send = events & send_on
        if events & (select.POLLIN | select.POLLHUP | select.POLLERR | recv_also_on):
            recv_also_on = 0
            try:
                data = sock.recv(CHUNK_BYTES)
                send_on = select.POLLOUT
            except (BlockingIOError, ssl.SSLWantReadError):
                data = None
            except ssl.SSLWantWriteError:
                data, recv_also_on = None, select.POLLOUT
            except OSError as err:
                raise _lost(address, err) from err
            if data == b"":
                if stream.pending:
                    _write(out, stream.pending)
                if write_shut and lines_answered == lines_sent:
                    return
                raise ClientError(f"connection closed by {address}")
            if data:
                lines_answered += _print_batch(stream.feed(data), address, out)
                deadline = now + timeout_s if waiting_on_server() else None
        if outbox and can_send:
            # A TLS write that raised SSLWant* must be retried with at least the same bytes:
            # it is, as nothing leaves the outbox unsent and it only grows at its end.
            try:
                sent = sock.send(outbox[:CHUNK_BYTES])
            except (BlockingIOError, ssl.SSLWantWriteError):
                sent = 0
            except ssl.SSLWantReadError:
                sent, send_on = 0, select.POLLIN
            except OSError as err:
                _report_last_words(sock, address, stream, out)
                raise _lost(address, err) from err
            lines_sent += outbox.count(b"\n", 0, sent)
            del outbox[:sent]
            if deadline is None and waiting_on_server():
                deadline = now + timeout_s

        if source_fd is not None and source_polled and ready.get(source_fd, 0):
            try:
                data = os.read(source_fd, CHUNK_BYTES)
            except OSError as err:
                raise ClientError(f"cannot read stdin: {describe(err)}") from err
            if data:
                outbox += data
                ends_with_newline = data.endswith(b"\n")
            else:
                if not ends_with_newline:
                    outbox += b"\n"  # the last line has no line end: still send it
                poller.unregister(source_fd)
                source_polled = False
                source_fd = None


def _report_last_words(sock: socket.socket, address: Address, stream: ReplyStream, out: BinaryIO) -> None:
    """After a failed send, read what the server sent before it left.

    A server that refuses a line (``ERR line too long``) closes at once; our
    next send then fails, but its ``ERR`` line is what the user needs to see.
    Raises the server's ``ERR`` as :class:`ClientError` if there is one.
    """
    sock.setblocking(False)
    while True:
        try:
            data = sock.recv(CHUNK_BYTES)
        except OSError:
            return
        if not data:
            return
        batch = stream.feed(data)
        if batch.replies:
            _write(out, batch.replies)
        if batch.error is not None:
            raise _server_said(address, batch.error)


def _load_history() -> str | None:
    """Turn on readline editing and load the history; None when readline is missing."""
    try:
        import readline
    except ImportError:
        return None
    path = os.path.expanduser(HISTORY_FILE)
    readline.set_history_length(HISTORY_LENGTH)
    try:
        readline.read_history_file(path)
    except OSError:
        pass  # no history yet, or unreadable: start without
    return path


def _save_history(path: str | None) -> None:
    if path is None:
        return
    import readline

    try:
        readline.write_history_file(path)
    except OSError:
        pass  # read-only home, full disk: losing history must not fail the session


def interactive(sock: socket.socket, address: Address, out: BinaryIO, timeout_s: float) -> None:
    """Prompt ``>>> ``, send each non-empty input line, print its reply.

    Returns on end of input (Ctrl-D). Empty input sends nothing. Raises
    :class:`ClientError` when the server goes away, does not answer within
    *timeout_s*, or answers ``ERR``; KeyboardInterrupt passes through.
    """
    encoding = sys.stdin.encoding
    # Keep bytes the terminal sends that aren't valid in the locale, and send them as typed.
    if hasattr(sys.stdin, "reconfigure"):
        sys.stdin.reconfigure(errors="surrogateescape")
    history = _load_history()
    stream = ReplyStream()
    try:
        while True:
            try:
                text = input(PROMPT)
            except EOFError:
                _write(out, b"\n")  # leave the shell prompt on a line of its own
                if isinstance(sock, ssl.SSLSocket):
                    close_tls(sock)
                return
            if not text:
                continue
            try:
                sock.sendall(text.encode(encoding, "surrogateescape") + b"\n")
            except TimeoutError as err:
                raise _no_reply(address, timeout_s) from err
            except OSError as err:
                _report_last_words(sock, address, stream, out)
                raise _lost(address, err) from err
            _print_replies(sock, address, stream, out, timeout_s, expected=1)
    finally:
        _save_history(history)


def _print_replies(
    sock: socket.socket, address: Address, stream: ReplyStream, out: BinaryIO, timeout_s: float, expected: int
) -> None:
    answered = 0
    while answered < expected:
        try:
            data = sock.recv(CHUNK_BYTES)
        except TimeoutError as err:
            raise _no_reply(address, timeout_s) from err
        except OSError as err:
            raise _lost(address, err) from err
        if not data:
            if stream.pending:
                _write(out, stream.pending)
            raise ClientError(f"connection closed by {address}")
        answered += _print_batch(stream.feed(data), address, out)


def _timeout(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a number of seconds > 0, not {text!r}")
    return value


def _address(text: str) -> Address:
    try:
        return parse_address(text)
    except AddressError as err:
        raise argparse.ArgumentTypeError(str(err)) from err


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tsecho",
        description="Talk to tsechod, the timestamp echo daemon: each line you send "
        "comes back as '[<timestamp>] line'. Interactive on a terminal; with stdin "
        "piped, sends every line and prints every reply.",
        epilog="examples: tsecho | tsecho -m hello | printf 'a\\nb\\n' | tsecho | "
        "tsecho '[::1]:8009' | tsecho example.org:8009. Latency and clock offset: "
        "tsecho ping [HOST[:PORT]] (see tsecho ping --help); as a monitoring plugin: tsecho check. "
        "A host named ping or check needs its port (ping:8009). See tsecho(1).",
    )
    parser.add_argument(
        "address",
        metavar="HOST[:PORT]",
        nargs="?",
        default=Address(DEFAULT_HOST, DEFAULT_PORT),
        type=_address,
        help=f"server to talk to (default {DEFAULT_HOST}:{DEFAULT_PORT}); IPv6 as [::1]:8009, or ::1",
    )
    parser.add_argument(
        "-m",
        "--message",
        metavar="TEXT",
        action="append",
        default=[],
        help="send TEXT as one line, print the reply, exit (repeatable; stdin is not read)",
    )
    parser.add_argument(
        "--timeout",
        metavar="S",
        type=_timeout,
        default=DEFAULT_TIMEOUT_S,
        help=f"seconds to wait for the connection and for each reply (default {seconds_text(DEFAULT_TIMEOUT_S)})",
    )
    tls = parser.add_argument_group("TLS (all but --tls need --tls)")
    tls.add_argument("--tls", action="store_true",
                     help="talk TLS; the server's certificate must be signed by a CA the system trusts "
                     "and valid for HOST")
    tls.add_argument("--ca", metavar="FILE", help="trust only the CA certificates in FILE (PEM)")
    tls.add_argument("--cert", metavar="FILE",
                     help="client certificate (PEM) for servers that require one; FILE may hold the key too")
    tls.add_argument("--key", metavar="FILE", help="the private key of --cert (PEM, not encrypted)")
    tls.add_argument("--servername", metavar="NAME",
                     help="the name to ask for (SNI) and to check the certificate against (default: HOST)")
    tls.add_argument("--insecure", action="store_true",
                     help="do not check the server's certificate at all (for tests; anyone in the middle can read)")
    return parser


def _tls_options(parser: argparse.ArgumentParser, args: argparse.Namespace) -> TLSOptions | None:
    """The --tls options, or None without --tls; usage errors (exit 2) for combinations that make no sense."""
    given = [flag for flag, value in (("--ca", args.ca), ("--cert", args.cert), ("--key", args.key),
                                      ("--servername", args.servername), ("--insecure", args.insecure)) if value]
    if not args.tls:
        if given:
            parser.error(f"{', '.join(given)} need --tls")
        return None
    if args.key is not None and args.cert is None:
        parser.error("--key needs --cert")
    if args.insecure and args.ca is not None:
        parser.error("--insecure and --ca contradict each other: --insecure checks no certificate")
    return TLSOptions(args.ca, args.cert, args.key, args.servername, args.insecure)


def main(argv: list[str] | None = None) -> int:
    """Run the ``tsecho`` command; return the exit status.

    0 all lines answered (or Ctrl-D), 1 a failure (one line on stderr),
    2 bad usage (argparse), 130 interrupted by Ctrl-C.
    ``TSECHO_DEBUG=1`` re-raises failures so the traceback shows.
    """
    arguments = sys.argv[1:] if argv is None else argv
    if arguments and arguments[0] in SUBCOMMANDS:
        # Imported here: plain tsecho never pays for it.
        from .probe import COMMANDS

        return COMMANDS[arguments[0]](arguments[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    tls_options = _tls_options(parser, args)
    address: Address = args.address
    timeout_s: float = args.timeout
    out = sys.stdout.buffer
    is_interactive = not args.message and sys.stdin is not None and sys.stdin.isatty()
    try:
        context = client_context(tls_options) if tls_options is not None else None
        servername = tls_options.servername if tls_options is not None else None
        with open_connection(address, timeout_s, context, servername) as sock:
            if args.message:
                preload = b"".join(os.fsencode(text) + b"\n" for text in args.message)
                pipeline(sock, address, None, preload, out, timeout_s)
            elif is_interactive:
                interactive(sock, address, out, timeout_s)
            else:
                source_fd = sys.stdin.fileno() if sys.stdin is not None else None
                pipeline(sock, address, source_fd, b"", out, timeout_s)
        return EXIT_OK
    except KeyboardInterrupt:
        if is_interactive:
            print(file=sys.stderr)
        return EXIT_INTERRUPTED
    except OutputClosed:
        # Whoever read our stdout stopped; say nothing, and keep the interpreter's
        # final flush from complaining about the dead pipe.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return EXIT_FAILURE
    except (ClientError, OSError) as err:
        if os.environ.get("TSECHO_DEBUG") == "1":
            raise
        try:
            out.flush()
        except OSError:
            pass
        # A bare OSError got past the mapping above: still one line, naming the server.
        message = str(err) if isinstance(err, ClientError) else f"{address}: {describe(err)}"
        print(f"tsecho: {message}", file=sys.stderr)
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
