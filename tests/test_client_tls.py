"""tsecho --tls: every mode over TLS, the certificate errors and their exit codes.

The client runs as a real subprocess (``python -W error -m tsecho.client``)
against a small TLS echo server made here from tlsconfig's server context
(socketserver + ssl, answering ``[stamp] line``), which records how each
connection ended: a clean close_notify, or a handshake error's detail. It is the
client's environment, not the thing under test (tsechod's own TLS listener
comes with the handler's preamble phase).
"""

from __future__ import annotations

import io
import os
import socket
import socketserver
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pexpect
import pytest

from conftest import Daemon
from helpers import STAMP, require_tool, wait_until
from tlscerts import Certs, Leaf
from tsecho import client
from tsecho.tlsconfig import TLSSettings, handshake_error_detail, load_server_tls, session_info

CLIENT = [sys.executable, "-W", "error", "-m", "tsecho.client"]


def run_client(*args: str, stdin: bytes = b"", timeout: float = 60) -> subprocess.CompletedProcess[bytes]:
    env = {k: v for k, v in os.environ.items() if k != "TSECHO_DEBUG"}
    return subprocess.run([*CLIENT, *args], input=stdin, capture_output=True, timeout=timeout, env=env)


class TLSEcho(socketserver.ThreadingTCPServer):
    """Answers each line with ``[stamp] line`` over TLS; ``ends`` says how each connection ended.

    An end is ``"close_notify"`` (the client closed the session cleanly),
    ``"ragged eof"`` (TCP closed without close_notify), or the handshake error's
    detail; ``subjects`` holds the client certificate subjects seen.
    """

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, context: ssl.SSLContext, answer_close_notify: bool = True, stall_s: float = 0.0) -> None:
        self.context = context
        self.answer_close_notify = answer_close_notify
        self.stall_s = stall_s  # after the first read, read nothing for this long: the client's sends back up
        self.ends: list[str] = []
        self.subjects: list[str | None] = []
        super().__init__(("127.0.0.1", 0), _EchoHandler)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.server_address[1]}"


class _EchoHandler(socketserver.BaseRequestHandler):
    server: TLSEcho

    def handle(self) -> None:
        self.request.settimeout(10)
        if self.server.stall_s:  # a small window, so the client's writes back up soon
            self.request.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        try:
            tls = self.server.context.wrap_socket(self.request, server_side=True, suppress_ragged_eofs=False)
        except OSError as err:
            self.server.ends.append(handshake_error_detail(err))
            return
        with tls:
            self.server.subjects.append(session_info(tls).client_subject)
            pending = b""
            while True:
                try:
                    data = tls.recv(65536)
                except ssl.SSLEOFError:
                    self.server.ends.append("ragged eof")
                    return
                except OSError as err:  # the client refused the session after the handshake
                    self.server.ends.append(handshake_error_detail(err))
                    return
                if not data:
                    break
                if self.server.stall_s:
                    time.sleep(self.server.stall_s)  # the stall is the point: a pace, not a wait for an event
                    self.server.stall_s = 0.0
                pending += data
                *lines, pending = pending.split(b"\n")
                if lines:
                    tls.sendall(b"".join(b"[" + STAMP.strip(b"[]") + b"] " + line + b"\n" for line in lines))
            self.server.ends.append("close_notify")
            if not self.server.answer_close_notify:
                time.sleep(5)  # a server that never answers close_notify: the client must not wait for it
                return
            try:
                tls.unwrap()
            except OSError:
                pass


def context_for(leaf: Leaf, client_ca: Path | None = None) -> ssl.SSLContext:
    settings = TLSSettings(str(leaf.cert), str(leaf.key), str(client_ca) if client_ca else None)
    return load_server_tls(settings, Path("/"), {}).context


@pytest.fixture
def tls_echo() -> Iterator[Callable[..., TLSEcho]]:
    """Factory: ``tls_echo(context)`` starts a TLSEcho in a thread; all are shut down after the test."""
    started: list[TLSEcho] = []

    def start(context: ssl.SSLContext, answer_close_notify: bool = True, stall_s: float = 0.0) -> TLSEcho:
        server = TLSEcho(context, answer_close_notify, stall_s)
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.shutdown()
        server.server_close()


def reply(line: bytes) -> bytes:
    return STAMP + b" " + line + b"\n"


def one_error_line(result: subprocess.CompletedProcess[bytes]) -> str:
    assert result.returncode == 1, result
    text = result.stderr.decode()
    assert text.count("\n") == 1 and text.startswith("tsecho: "), text
    return text


# -- the three modes ---------------------------------------------------------------------------


def test_messages_over_tls_end_with_close_notify(tls_certs: Certs, tls_echo: Callable[..., TLSEcho]) -> None:
    server = tls_echo(context_for(tls_certs.good))
    result = run_client("--tls", "--ca", str(tls_certs.ca), server.target, "-m", "hello", "-m", "world")
    assert (result.returncode, result.stderr) == (0, b"")
    assert result.stdout == reply(b"hello") + reply(b"world")
    wait_until(lambda: server.ends == ["close_notify"], timeout=5)


def test_pipe_over_tls_answers_every_line_in_order(tls_certs: Certs, tls_echo: Callable[..., TLSEcho]) -> None:
    server = tls_echo(context_for(tls_certs.good))
    lines = [b"line %d " % n + b"x" * (n % 97) for n in range(40_000)]  # about 2.3 MB: many TLS records each way
    started = time.monotonic()
    result = run_client("--tls", "--ca", str(tls_certs.ca), server.target, stdin=b"\n".join(lines))
    elapsed = time.monotonic() - started
    assert (result.returncode, result.stderr) == (0, b"")
    assert result.stdout == b"".join(reply(line) for line in lines)  # the last line got its line end
    assert elapsed < 20
    wait_until(lambda: server.ends == ["close_notify"], timeout=5)


def test_pipe_over_tls_survives_a_server_that_stops_reading(tls_certs: Certs, tls_echo: Callable[..., TLSEcho]) -> None:
    """More input than both socket buffers hold: the client waits for room, reading replies meanwhile."""
    server = tls_echo(context_for(tls_certs.good), stall_s=0.5)
    lines = [b"%07d " % n + b"y" * 120 for n in range(50_000)]  # 6.4 MB > 4 MiB send buffer + 64 KiB window
    result = run_client("--tls", "--ca", str(tls_certs.ca), server.target, stdin=b"\n".join(lines) + b"\n")
    assert (result.returncode, result.stderr) == (0, b"")
    assert result.stdout == b"".join(reply(line) for line in lines)


@pytest.mark.parametrize(("chunk_bytes", "sndbuf_bytes", "stall_s"), [
    (1000, None, 0.0),  # reads smaller than a TLS record: decrypted bytes wait in the SSL object
    (64 * 1024, 8192, 0.3),  # a small send buffer and a stalled server: writes get SSLWantWrite
])
def test_pipeline_handles_what_poll_cannot_see(tls_certs: Certs, tls_echo: Callable[..., TLSEcho],
                                               monkeypatch: pytest.MonkeyPatch, chunk_bytes: int,
                                               sndbuf_bytes: int | None, stall_s: float) -> None:
    """The in-process tests: what the command line cannot set (read size, send buffer) is set here.

    A read smaller than a record (16 KiB) leaves the rest decrypted inside the
    SSL object, invisible to poll(): without the pending() check the last
    replies wait there until the timeout. A write that finds no room raises
    SSLWantWrite and must be retried with the same bytes.
    """
    monkeypatch.setattr(client, "CHUNK_BYTES", chunk_bytes)
    server = tls_echo(context_for(tls_certs.good), stall_s=stall_s)
    lines = [b"%05d " % n + b"z" * 200 for n in range(4000)]
    context = client.client_context(client.TLSOptions(str(tls_certs.ca), None, None, None, False))
    address = client.Address("127.0.0.1", server.server_address[1])
    out = io.BytesIO()
    started = time.monotonic()
    with client.open_connection(address, 5.0, context) as sock:
        if sndbuf_bytes:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf_bytes)
        client.pipeline(sock, address, None, b"\n".join(lines) + b"\n", out, 3.0)
    assert out.getvalue() == b"".join(reply(line) for line in lines)
    assert time.monotonic() - started < 2.5


def test_empty_pipe_over_tls_closes_at_once(tls_certs: Certs, tls_echo: Callable[..., TLSEcho]) -> None:
    server = tls_echo(context_for(tls_certs.good))
    result = run_client("--tls", "--ca", str(tls_certs.ca), server.target, stdin=b"")
    assert (result.returncode, result.stdout, result.stderr) == (0, b"", b"")
    wait_until(lambda: server.ends == ["close_notify"], timeout=5)


def test_server_that_ignores_close_notify_does_not_hold_the_client(tls_certs: Certs,
                                                                   tls_echo: Callable[..., TLSEcho]) -> None:
    server = tls_echo(context_for(tls_certs.good), answer_close_notify=False)
    started = time.monotonic()
    result = run_client("--tls", "--ca", str(tls_certs.ca), server.target, "-m", "hi", "--timeout", "5")
    assert (result.returncode, result.stdout) == (0, reply(b"hi"))
    assert time.monotonic() - started < 4  # the close_notify wait is 1 s, not --timeout
    wait_until(lambda: server.ends == ["close_notify"], timeout=5)


def test_interactive_over_tls(tls_certs: Certs, tls_echo: Callable[..., TLSEcho], tmp_path: Path) -> None:
    server = tls_echo(context_for(tls_certs.good))
    env = {k: v for k, v in os.environ.items() if k != "TSECHO_DEBUG"}
    env["HOME"] = str(tmp_path)
    child = pexpect.spawn(CLIENT[0], [*CLIENT[1:], "--tls", "--ca", str(tls_certs.ca), server.target],
                          env=env, timeout=10)
    child.expect_exact(">>> ")
    child.sendline("hello tls")
    child.expect_exact(reply(b"hello tls").rstrip(b"\n"))
    child.expect_exact(">>> ")
    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    wait_until(lambda: server.ends == ["close_notify"], timeout=5)


# -- certificate errors: one line, the reason, exit 1 --------------------------------------------


@pytest.mark.parametrize(("leaf", "args", "reason"), [
    ("expired", ("--ca", "CA"), "certificate expired (the server must renew it"),
    ("good", (), "unknown CA: no trusted CA signed the server's certificate (give the CA with --ca FILE)"),
    ("untrusted", ("--ca", "CA"), "unknown CA"),
    ("wrong_name", ("--ca", "CA"), "wrong name: the certificate is not valid for '127.0.0.1' "
                                   "(connect by a name it has, or set --servername NAME)"),
    ("good", ("--ca", "CA", "--servername", "wrong.example"), "wrong name: the certificate is not valid for "
                                                             "'wrong.example'"),
])
def test_certificate_errors_name_the_reason(tls_certs: Certs, tls_echo: Callable[..., TLSEcho], leaf: str,
                                            args: tuple[str, ...], reason: str) -> None:
    server = tls_echo(context_for(getattr(tls_certs, leaf)))
    args = tuple(str(tls_certs.ca) if arg == "CA" else arg for arg in args)
    text = one_error_line(run_client("--tls", *args, server.target, "-m", "hi"))
    assert text.startswith(f"tsecho: TLS handshake with {server.target} failed: {reason}"), text
    wait_until(lambda: len(server.ends) == 1, timeout=5)
    assert server.ends[0].startswith("alert ")  # the client told the server why, in an alert


def test_servername_and_insecure_get_past_the_checks(tls_certs: Certs, tls_echo: Callable[..., TLSEcho]) -> None:
    wrong = tls_echo(context_for(tls_certs.wrong_name))
    result = run_client("--tls", "--ca", str(tls_certs.ca), "--servername", "wrong.example", wrong.target, "-m", "a")
    assert (result.returncode, result.stdout) == (0, reply(b"a"))
    expired = tls_echo(context_for(tls_certs.expired))
    result = run_client("--tls", "--insecure", expired.target, "-m", "b")
    assert (result.returncode, result.stdout) == (0, reply(b"b"))


# -- mutual TLS ------------------------------------------------------------------------------------


def test_mutual_tls(tls_certs: Certs, tls_echo: Callable[..., TLSEcho]) -> None:
    server = tls_echo(context_for(tls_certs.good, tls_certs.client_ca))
    base = ("--tls", "--ca", str(tls_certs.ca), server.target, "-m", "hi")
    result = run_client(*base, "--cert", str(tls_certs.client.cert), "--key", str(tls_certs.client.key))
    assert (result.returncode, result.stdout) == (0, reply(b"hi"))
    result = run_client(*base, "--cert", str(tls_certs.client.both))  # the key in the same file
    assert (result.returncode, result.stdout) == (0, reply(b"hi"))
    assert [subject.split(",")[0] for subject in server.subjects if subject] == ["CN=alice", "CN=alice"]

    text = one_error_line(run_client(*base))
    assert text == (f"tsecho: TLS connection to {server.target} failed: the server requires a client certificate "
                    "(give --cert FILE --key FILE)\n")
    text = one_error_line(run_client(*base, "--cert", str(tls_certs.client_stranger.both)))
    assert text == (f"tsecho: TLS connection to {server.target} failed: the server rejected the client "
                    "certificate (alert unknown ca)\n")


# -- not a TLS server, bad files, bad usage -----------------------------------------------------


def test_plaintext_server_is_named_as_such(tls_certs: Certs) -> None:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]

        def greet() -> None:
            conn, _ = listener.accept()
            with conn:
                conn.sendall(b"220 hello, this is plaintext\r\n")
                conn.settimeout(5)
                try:
                    conn.recv(4096)
                except OSError:
                    pass
        thread = threading.Thread(target=greet, daemon=True)
        thread.start()
        text = one_error_line(run_client("--tls", f"127.0.0.1:{port}", "-m", "x"))
        thread.join(timeout=10)
    assert text == (f"tsecho: TLS handshake with 127.0.0.1:{port} failed: the server did not answer in TLS "
                    "(is it a TLS port? try without --tls)\n")


def test_silent_server_times_out_the_handshake(tls_certs: Certs) -> None:
    with socket.create_server(("127.0.0.1", 0)) as listener:  # the kernel accepts; nobody ever answers
        port = listener.getsockname()[1]
        started = time.monotonic()
        text = one_error_line(run_client("--tls", "--timeout", "0.5", f"127.0.0.1:{port}", "-m", "x"))
    assert time.monotonic() - started < 5
    assert text == (f"tsecho: TLS handshake with 127.0.0.1:{port} failed: no answer within 0.5 s "
                    "(is it a TLS port? try without --tls)\n")


def test_plaintext_tsechod_with_tls_fails_in_one_line(tsechod: Callable[..., Daemon]) -> None:
    daemon = tsechod()
    text = one_error_line(run_client("--tls", "--timeout", "1", f"127.0.0.1:{daemon.port}", "-m", "x"))
    assert text.startswith(f"tsecho: TLS handshake with 127.0.0.1:{daemon.port} failed: "), text
    assert "try without --tls" in text


def test_unusable_files_are_named(tls_certs: Certs, tmp_path: Path) -> None:
    target = "127.0.0.1:9"  # never reached: the files are checked first
    text = one_error_line(run_client("--tls", "--ca", str(tmp_path / "nope.pem"), target, "-m", "x"))
    assert text == f"tsecho: cannot read --ca {tmp_path}/nope.pem: no such file or directory\n"
    text = one_error_line(run_client("--tls", "--ca", str(tls_certs.good.key), target, "-m", "x"))
    assert text == f"tsecho: --ca {tls_certs.good.key}: not a PEM certificate (expected -----BEGIN CERTIFICATE-----)\n"
    text = one_error_line(run_client("--tls", "--cert", str(tls_certs.client.cert), "--key", str(tls_certs.other_key),
                                     target, "-m", "x"))
    assert text == (f"tsecho: cannot use --cert {tls_certs.client.cert} --key {tls_certs.other_key}: "
                    "the key does not match the certificate\n")
    text = one_error_line(run_client("--tls", "--cert", str(tls_certs.good.cert), "--key",
                                     str(tls_certs.encrypted_key), target, "-m", "x"))
    assert text.startswith(f"tsecho: cannot use --key {tls_certs.encrypted_key}: the key is encrypted"), text


@pytest.mark.parametrize(("args", "message"), [
    (("--ca", "x.pem"), "--ca need --tls"),
    (("--insecure", "--servername", "a"), "--servername, --insecure need --tls"),
    (("--tls", "--key", "k.pem"), "--key needs --cert"),
    (("--tls", "--insecure", "--ca", "x.pem"), "--insecure and --ca contradict each other"),
])
def test_tls_option_misuse_is_a_usage_error(args: tuple[str, ...], message: str) -> None:
    result = run_client(*args, "-m", "x")
    assert result.returncode == 2
    assert message in result.stderr.decode()


# -- a third-party server: openssl s_server ----------------------------------------------------


@pytest.fixture
def s_server(tls_certs: Certs) -> Iterator[Callable[..., str]]:
    """Factory: ``s_server(*args)`` runs ``openssl s_server -rev`` (it answers each line reversed); returns HOST:PORT."""
    procs: list[subprocess.Popen[bytes]] = []

    def start(*args: str) -> str:
        openssl = require_tool("openssl")
        proc = subprocess.Popen([openssl, "s_server", "-accept", "127.0.0.1:0", "-rev", "-cert", str(tls_certs.good.cert),
                                 "-cert_chain", str(tls_certs.good.cert), "-key", str(tls_certs.good.key), *args],
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        procs.append(proc)
        assert proc.stdout is not None
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # each readline returns at a line s_server prints, or at its exit
            line = proc.stdout.readline().decode(errors="replace")
            if line.startswith("ACCEPT "):
                return line.split()[1]
            if not line:
                break
        raise AssertionError(f"openssl s_server did not start: {line!r}")

    yield start
    for proc in procs:
        proc.kill()
        proc.wait(timeout=10)
        if proc.stdout is not None:
            proc.stdout.close()


def test_openssl_s_server_in_every_mode(tls_certs: Certs, s_server: Callable[..., str], tmp_path: Path) -> None:
    target = s_server()
    ca = ("--tls", "--ca", str(tls_certs.ca))
    result = run_client(*ca, target, "-m", "hello", "-m", "")
    assert (result.returncode, result.stdout, result.stderr) == (0, b"olleh\n\n", b"")
    lines = [b"%d abc" % n for n in range(3000)]
    result = run_client(*ca, target, stdin=b"\n".join(lines))
    assert (result.returncode, result.stderr) == (0, b"")
    assert result.stdout == b"".join(line[::-1] + b"\n" for line in lines)


def test_tls_1_1_only_server_is_refused(s_server: Callable[..., str]) -> None:
    target = s_server("-tls1_1", "-cipher", "DEFAULT@SECLEVEL=0")
    text = one_error_line(run_client("--tls", "--insecure", target, "-m", "x"))
    assert text == (f"tsecho: TLS handshake with {target} failed: no common protocol version "
                    "(tsecho needs TLS 1.2 or later)\n")
