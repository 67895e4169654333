"""tsecho, the client: the pure parts table-driven, then the real command.

The command runs as a real subprocess (``python -W error -m tsecho.client``)
against a real ``tsechod`` (the ``tsechod`` fixture in conftest.py), through
pipes or, for the interactive prompt, a real pty driven by pexpect.
Servers that misbehave on purpose (never answer, close early, reset) are small
socket servers in this file: they are the client's environment, not the thing
under test.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pexpect
import pytest

from helpers import CTIME_REPLY
from conftest import Daemon
from tsecho.client import Address, AddressError, ReplyStream, parse_address

CLIENT = [sys.executable, "-W", "error", "-m", "tsecho.client"]
REPLY = rb"\[[^\]\r\n]+\] "  # any timestamp style


def client_env(home: Path | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "TSECHO_DEBUG"}
    if home is not None:
        env["HOME"] = str(home)
    return env


def run_client(*args: str, stdin: bytes | Path = b"", timeout: float = 60) -> subprocess.CompletedProcess[bytes]:
    """Run tsecho with *args*; stdin is a pipe holding *stdin*, or the file *stdin*."""
    if isinstance(stdin, Path):
        with stdin.open("rb") as source:
            return subprocess.run([*CLIENT, *args], stdin=source, capture_output=True, timeout=timeout,
                                  env=client_env())
    return subprocess.run([*CLIENT, *args], input=stdin, capture_output=True, timeout=timeout, env=client_env())


def target(daemon: Daemon) -> str:
    return str(Address(daemon.host, daemon.port))


def spawn_interactive(address: str, home: Path) -> pexpect.spawn:
    child = pexpect.spawn(CLIENT[0], [*CLIENT[1:], address], env=client_env(home), timeout=10)
    child.expect_exact(">>> ")
    return child


def finish(child: pexpect.spawn) -> int:
    child.expect(pexpect.EOF)
    child.close()
    assert child.signalstatus is None
    return int(child.exitstatus)


# -- HOST[:PORT] parsing, no sockets -------------------------------------------------------------

@pytest.mark.parametrize(("text", "expected"), [
    ("", ("127.0.0.1", 8009)),
    ("localhost", ("localhost", 8009)),
    ("example.org:1234", ("example.org", 1234)),
    ("127.0.0.1:8009", ("127.0.0.1", 8009)),
    ("10.0.0.1", ("10.0.0.1", 8009)),
    (":9000", ("127.0.0.1", 9000)),
    ("host:1", ("host", 1)),
    ("host:65535", ("host", 65535)),
    ("host:08009", ("host", 8009)),
    ("[::1]:8009", ("::1", 8009)),
    ("[::1]:1234", ("::1", 1234)),
    ("[::1]", ("::1", 8009)),
    ("::1", ("::1", 8009)),
    ("::", ("::", 8009)),
    ("2001:db8::17", ("2001:db8::17", 8009)),
    ("fe80::1%eth0", ("fe80::1%eth0", 8009)),
    ("[fe80::1%eth0]:7", ("fe80::1%eth0", 7)),
    ("[127.0.0.1]:80", ("127.0.0.1", 80)),
])
def test_address_is_parsed(text: str, expected: tuple[str, int]) -> None:
    assert parse_address(text) == Address(*expected)


@pytest.mark.parametrize(("text", "says"), [
    ("host:", "missing port"),
    (":", "missing port"),
    ("host:0", "1-65535"),
    ("host:65536", "1-65535"),
    ("host:abc", "bad port 'abc'"),
    ("host:+80", "bad port"),
    ("host:-1", "bad port"),
    ("host: 80", "bad port"),
    ("host:\u0663", "bad port"),  # a non-ASCII digit
    ("[::1", "missing ']'"),
    ("[::1]x", "unexpected 'x'"),
    ("[::1]:", "missing port"),
    ("[::1]:abc", "bad port"),
    ("[]:8009", "empty address"),
    ("host:80:", "neither HOST:PORT nor an IPv6 address"),
    ("::1:8009:x", "neither HOST:PORT nor an IPv6 address"),
    ("ho st", "bad host"),
    ("host\n:80", "bad host"),
])
def test_bad_address_is_refused_with_reason(text: str, says: str) -> None:
    with pytest.raises(AddressError, match=re.escape(says)):
        parse_address(text)


@pytest.mark.parametrize(("address", "shown"), [
    (Address("127.0.0.1", 8009), "127.0.0.1:8009"),
    (Address("::1", 8009), "[::1]:8009"),
    (Address("example.org", 1), "example.org:1"),
])
def test_address_is_shown_as_typed(address: Address, shown: str) -> None:
    assert str(address) == shown
    assert parse_address(shown) == address


# -- splitting the reply stream, no sockets ------------------------------------------------------

REPLIES = b"[t] a\n[t] b\r\n[t] \n[t] \xff\x00\n"


@pytest.mark.parametrize("split", range(len(REPLIES) + 1))
def test_reply_stream_gives_whole_lines_however_the_bytes_arrive(split: int) -> None:
    stream = ReplyStream()
    first, second = stream.feed(REPLIES[:split]), stream.feed(REPLIES[split:])
    assert first.replies + second.replies == REPLIES
    assert first.lines + second.lines == 4
    assert first.error is None and second.error is None
    assert stream.pending == b""


def test_reply_stream_keeps_a_cut_reply_pending() -> None:
    stream = ReplyStream()
    assert stream.feed(b"[t] a\n[t] b") == (b"[t] a\n", 1, None)
    assert stream.pending == b"[t] b"


@pytest.mark.parametrize(("data", "replies", "error"), [
    (b"ERR line too long (max 65536 bytes)\n", b"", b"ERR line too long (max 65536 bytes)"),
    (b"[t] a\nERR server busy\r\n[t] later\n", b"[t] a\n", b"ERR server busy"),
    (b"[t] ERR is just a payload\n", b"[t] ERR is just a payload\n", None),
    (b"[t] a\nERRATA\n", b"[t] a\nERRATA\n", None),
])
def test_reply_stream_stops_at_an_err_line(data: bytes, replies: bytes, error: bytes | None) -> None:
    batch = ReplyStream().feed(data)
    assert (batch.replies, batch.error) == (replies, error)
    assert batch.lines == replies.count(b"\n")


# -- -m and piped stdin against the real daemon --------------------------------------------------

def test_message_sends_one_line_and_prints_its_reply(tsechod: Callable[..., Daemon]) -> None:
    daemon = tsechod()
    result = run_client("-m", "hello python", target(daemon))
    assert result.returncode == 0, result.stderr
    assert result.stderr == b""
    assert CTIME_REPLY.match(result.stdout)
    assert result.stdout.endswith(b"] hello python\n") and result.stdout.count(b"\n") == 1


def test_repeated_message_is_answered_in_order(tsechod: Callable[..., Daemon]) -> None:
    daemon = tsechod()
    result = run_client(target(daemon), "-m", "one", "-m", "", "-m", "three", "--timeout", "2")
    assert result.returncode == 0, result.stderr
    assert re.fullmatch(REPLY + b"one\n" + REPLY + b"\n" + REPLY + b"three\n", result.stdout)


def test_piped_stdin_gets_every_reply_in_order(tsechod: Callable[..., Daemon], tmp_path: Path) -> None:
    daemon = tsechod()
    odd = [b"", b"\x00nul", b"caf\xc3\xa9", b"\x80\xfe not utf-8", b"tab\there", b"  spaces  "]
    lines = [odd[i % len(odd)] if i % 97 == 0 else b"line %d" % i for i in range(10_000)]
    endings = [b"\r\n" if i % 10 == 3 else b"\n" for i in range(len(lines))]
    source = tmp_path / "input"
    source.write_bytes(b"".join(line + end for line, end in zip(lines, endings)))

    result = run_client(target(daemon), stdin=source)

    assert result.returncode == 0, result.stderr
    assert result.stderr == b""
    replies = result.stdout.split(b"\n")
    assert replies.pop() == b""
    assert len(replies) == len(lines)
    stamp = re.compile(REPLY)
    for line, end, reply in zip(lines, endings, replies):
        assert stamp.match(reply), reply
        assert reply[stamp.match(reply).end():] + b"\n" == line + end  # type: ignore[union-attr]


def test_last_line_without_newline_is_answered(tsechod: Callable[..., Daemon]) -> None:
    daemon = tsechod()
    result = run_client(target(daemon), stdin=b"first\nno newline at the end")
    assert result.returncode == 0, result.stderr
    assert re.fullmatch(REPLY + b"first\n" + REPLY + b"no newline at the end\n", result.stdout)


def test_empty_stdin_sends_nothing_and_exits_0(tsechod: Callable[..., Daemon]) -> None:
    daemon = tsechod()
    result = run_client(target(daemon), stdin=b"")
    assert (result.returncode, result.stdout, result.stderr) == (0, b"", b"")


def test_empty_piped_lines_are_sent(tsechod: Callable[..., Daemon]) -> None:
    daemon = tsechod()
    result = run_client(target(daemon), stdin=b"\n\n")
    assert result.returncode == 0, result.stderr
    assert re.fullmatch(REPLY + b"\n" + REPLY + b"\n", result.stdout)


def test_too_long_line_prints_the_servers_err_and_exits_1(tsechod: Callable[..., Daemon]) -> None:
    daemon = tsechod()
    result = run_client(target(daemon), stdin=b"x" * 70_000 + b"\n")
    assert result.returncode == 1
    assert result.stderr == f"tsecho: {target(daemon)}: ERR line too long (max 65536 bytes)\n".encode()


def test_ipv6_address_in_brackets(tsechod: Callable[..., Daemon]) -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6 in this Python")
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError as err:
        pytest.skip(f"no IPv6 loopback: {err}")
    daemon = tsechod(listen=("[::1]:0",))
    assert daemon.host == "::1"
    result = run_client("-m", "over v6", f"[::1]:{daemon.port}")
    assert result.returncode == 0, result.stderr
    assert re.fullmatch(REPLY + b"over v6\n", result.stdout)


def test_input_bigger_than_memory_bound_streams_through(tsechod: Callable[..., Daemon], tmp_path: Path) -> None:
    """40 MB in, more out: the client's peak memory stays far below that."""
    if not Path("/proc/self/status").exists():
        pytest.skip("needs /proc/self/status (Linux) to read the peak RSS")
    daemon = tsechod()
    line = b"%-63d\n"
    source = tmp_path / "big"
    with source.open("wb") as f:
        for block in range(640):
            f.write(b"".join(line % (block * 1000 + i) for i in range(1000)))
    # VmHWM, not ru_maxrss: ru_maxrss survives execve, so it would report pytest's own peak.
    measure = ("import pathlib, re, sys; from tsecho.client import main; rc = main(sys.argv[1:]); "
               "status = pathlib.Path('/proc/self/status').read_text(); "
               "print(re.search(r'VmHWM:\\s+(\\d+) kB', status).group(1), file=sys.stderr); sys.exit(rc)")
    sink = tmp_path / "out"
    with source.open("rb") as stdin, sink.open("wb") as stdout:
        result = subprocess.run([sys.executable, "-W", "error", "-c", measure, target(daemon)], stdin=stdin,
                                stdout=stdout, stderr=subprocess.PIPE, timeout=120, env=client_env())
    assert result.returncode == 0, result.stderr
    peak_kib = int(result.stderr)
    assert sink.stat().st_size > source.stat().st_size
    with sink.open("rb") as replies:
        assert sum(1 for _ in replies) == 640_000
    assert peak_kib < 32 * 1024, f"client peak RSS {peak_kib} KiB for 40 MB of input"


# -- the interactive prompt through a real pty ---------------------------------------------------

def test_interactive_session_prompts_echoes_skips_empty_and_exits_on_ctrl_d(
        tsechod: Callable[..., Daemon], tmp_path: Path) -> None:
    daemon = tsechod()
    child = spawn_interactive(target(daemon), tmp_path)
    child.sendline("hello python")
    child.expect(REPLY + rb"hello python\r\n")
    child.expect_exact(">>> ")
    child.sendline("")  # skipped: nothing sent, straight back to the prompt
    child.expect_exact(">>> ")
    assert child.before == b"\r\n"
    child.sendline("second")
    child.expect(REPLY + rb"second\r\n")
    child.expect_exact(">>> ")
    child.sendeof()
    assert finish(child) == 0
    # The daemon counted two lines: the empty input never went out.
    daemon.wait_for_log(r"closed reason=eof .*lines=2 ")
    assert (tmp_path / ".tsecho_history").read_text().splitlines()[-2:] == ["hello python", "second"]


def test_interactive_history_is_recalled_from_the_history_file(
        tsechod: Callable[..., Daemon], tmp_path: Path) -> None:
    daemon = tsechod()
    (tmp_path / ".tsecho_history").write_text("from last time\n")
    child = spawn_interactive(target(daemon), tmp_path)
    child.send("\x10\r")  # Ctrl-P: previous history line, then Enter
    child.expect(REPLY + rb"from last time\r\n")
    child.expect_exact(">>> ")
    child.sendeof()
    assert finish(child) == 0


def test_interactive_works_when_history_cannot_be_saved(tsechod: Callable[..., Daemon], tmp_path: Path) -> None:
    daemon = tsechod()
    child = spawn_interactive(target(daemon), tmp_path / "no" / "such" / "home")
    child.sendline("still fine")
    child.expect(REPLY + rb"still fine\r\n")
    child.expect_exact(">>> ")
    child.sendeof()
    assert finish(child) == 0
    assert b"Traceback" not in child.before


def test_interactive_ctrl_c_exits_130_without_traceback(tsechod: Callable[..., Daemon], tmp_path: Path) -> None:
    daemon = tsechod()
    child = spawn_interactive(target(daemon), tmp_path)
    child.sendintr()
    assert finish(child) == 130
    assert b"Traceback" not in child.before


def test_interactive_reports_a_daemon_that_stopped_mid_session(
        tsechod: Callable[..., Daemon], tmp_path: Path) -> None:
    daemon = tsechod("[server]\nshutdown_timeout_s = 1.0\n")  # it waits that long for our idle session
    child = spawn_interactive(target(daemon), tmp_path)
    child.sendline("before")
    child.expect(REPLY + rb"before\r\n")
    child.expect_exact(">>> ")
    assert daemon.stop() == 0  # SIGTERM: the daemon closes every connection and exits
    child.sendline("after")
    child.expect_exact(f"tsecho: connection closed by {target(daemon)}\r\n")
    assert finish(child) == 1


# -- failures: one line on stderr, exit 1 ---------------------------------------------------------

def test_refused_connection_exits_1_with_advice() -> None:
    with socket.socket() as bound:  # bound, never listening: connecting to it is refused
        bound.bind(("127.0.0.1", 0))
        port = bound.getsockname()[1]
        result = run_client("-m", "hi", f"127.0.0.1:{port}")
    assert result.returncode == 1
    assert result.stdout == b""
    assert result.stderr == (f"tsecho: cannot connect to 127.0.0.1:{port}: connection refused "
                             f"(is tsechod running? systemctl status tsechod)\n").encode()


def test_unresolvable_host_exits_1() -> None:
    result = run_client("-m", "hi", "nosuchhost.invalid:8009")
    assert result.returncode == 1
    assert result.stderr.startswith(b"tsecho: cannot resolve 'nosuchhost.invalid': ")
    assert result.stderr.endswith(b"(check the host name, or give an IP address)\n")
    assert result.stderr.count(b"\n") == 1


@pytest.fixture
def silent_listener() -> Iterator[int]:
    """A port whose listener completes handshakes (the kernel does) but never accepts or answers."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        yield listener.getsockname()[1]


def test_server_that_never_answers_times_out(silent_listener: int) -> None:
    started = time.monotonic()
    result = run_client("-m", "anyone there?", "--timeout", "0.5", f"127.0.0.1:{silent_listener}")
    elapsed = time.monotonic() - started
    assert result.returncode == 1
    assert result.stderr == f"tsecho: no reply from 127.0.0.1:{silent_listener} within 0.5 s\n".encode()
    assert 0.5 <= elapsed < 5


def test_piped_client_times_out_too(silent_listener: int) -> None:
    result = run_client("--timeout", "0.3", f"127.0.0.1:{silent_listener}", stdin=b"a\nb\n")
    assert result.returncode == 1
    assert result.stderr == f"tsecho: no reply from 127.0.0.1:{silent_listener} within 0.3 s\n".encode()


class OneShotServer:
    """Accept one connection and run *behave(conn)* on it in a thread; for misbehaving peers."""

    def __init__(self, behave: Callable[[socket.socket], None]) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.received = b""
        self._behave = behave
        self._thread = threading.Thread(target=self._serve, name="test-one-shot-server")
        self._thread.start()

    def _serve(self) -> None:
        self.listener.settimeout(10)
        conn, _ = self.listener.accept()
        with conn:
            conn.settimeout(10)
            self._behave(conn)

    def read_line(self, conn: socket.socket) -> bytes:
        while b"\n" not in self.received:
            chunk = conn.recv(65536)
            if not chunk:
                break
            self.received += chunk
        return self.received.split(b"\n", 1)[0]

    def drain(self, conn: socket.socket) -> None:
        while chunk := conn.recv(65536):
            self.received += chunk

    def close(self) -> None:
        self._thread.join(timeout=10)
        self.listener.close()


@pytest.fixture
def one_shot() -> Iterator[Callable[[Callable[[OneShotServer, socket.socket], None]], OneShotServer]]:
    servers: list[OneShotServer] = []

    def start(behave: Callable[[OneShotServer, socket.socket], None]) -> OneShotServer:
        server: OneShotServer
        server = OneShotServer(lambda conn: behave(server, conn))
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.close()


def test_server_closing_before_all_replies_exits_1(one_shot) -> None:  # type: ignore[no-untyped-def]
    def answer_one_then_close(server: OneShotServer, conn: socket.socket) -> None:
        line = server.read_line(conn)
        conn.sendall(b"[t] " + line + b"\n")
        conn.shutdown(socket.SHUT_WR)  # FIN, then keep reading so no reset muddles the test
        server.drain(conn)

    server = one_shot(answer_one_then_close)
    result = run_client("--timeout", "5", f"127.0.0.1:{server.port}", stdin=b"a\nb\nc\n")
    assert result.returncode == 1
    assert result.stdout == b"[t] a\n"
    assert result.stderr == f"tsecho: connection closed by 127.0.0.1:{server.port}\n".encode()


def test_reset_connection_exits_1(one_shot) -> None:  # type: ignore[no-untyped-def]
    def reset(server: OneShotServer, conn: socket.socket) -> None:
        server.read_line(conn)
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")

    server = one_shot(reset)
    result = run_client("-m", "hi", f"127.0.0.1:{server.port}")
    assert result.returncode == 1
    assert result.stderr == f"tsecho: connection reset by 127.0.0.1:{server.port}\n".encode()


def test_piped_lines_are_pipelined_not_one_round_trip_each(one_shot) -> None:  # type: ignore[no-untyped-def]
    """This server answers nothing until the client half-closes: a lockstep client would time out."""
    def answer_at_eof(server: OneShotServer, conn: socket.socket) -> None:
        server.drain(conn)
        conn.sendall(b"".join(b"[t] " + line + b"\n" for line in server.received.split(b"\n")[:-1]))

    server = one_shot(answer_at_eof)
    lines = b"".join(b"%d\n" % i for i in range(1000))
    result = run_client("--timeout", "5", f"127.0.0.1:{server.port}", stdin=lines)
    assert result.returncode == 0, result.stderr
    assert server.received == lines
    assert result.stdout == b"".join(b"[t] %d\n" % i for i in range(1000))


def test_err_line_before_close_is_shown(one_shot) -> None:  # type: ignore[no-untyped-def]
    def busy(server: OneShotServer, conn: socket.socket) -> None:
        conn.sendall(b"ERR server busy\r\n")
        conn.shutdown(socket.SHUT_WR)
        server.drain(conn)

    server = one_shot(busy)
    result = run_client("-m", "hi", f"127.0.0.1:{server.port}")
    assert (result.returncode, result.stdout) == (1, b"")
    assert result.stderr == f"tsecho: 127.0.0.1:{server.port}: ERR server busy\n".encode()


def test_err_text_cannot_drive_the_terminal(one_shot) -> None:  # type: ignore[no-untyped-def]
    def hostile(server: OneShotServer, conn: socket.socket) -> None:
        conn.sendall(b"ERR \x1b[2J\x07 gone \xff\n")
        conn.shutdown(socket.SHUT_WR)
        server.drain(conn)

    server = one_shot(hostile)
    result = run_client("-m", "hi", f"127.0.0.1:{server.port}")
    assert result.returncode == 1
    assert result.stderr == f"tsecho: 127.0.0.1:{server.port}: ERR \\x1b[2J\\x07 gone \\xff\n".encode()


def test_all_answered_but_server_never_closes_is_still_success(one_shot) -> None:  # type: ignore[no-untyped-def]
    def answer_but_stay_open(server: OneShotServer, conn: socket.socket) -> None:
        line = server.read_line(conn)
        conn.sendall(b"[t] " + line + b"\n")
        server.drain(conn)  # sees our half-close, yet never closes its side until we leave

    server = one_shot(answer_but_stay_open)
    result = run_client("-m", "hi", "--timeout", "0.3", f"127.0.0.1:{server.port}")
    assert (result.returncode, result.stdout, result.stderr) == (0, b"[t] hi\n", b"")


def test_closed_stdout_stops_the_client_quietly(tsechod: Callable[..., Daemon], tmp_path: Path) -> None:
    daemon = tsechod()
    source = tmp_path / "input"
    source.write_bytes(b"".join(b"line %d\n" % i for i in range(200_000)))
    with source.open("rb") as stdin:
        proc = subprocess.Popen([*CLIENT, target(daemon)], stdin=stdin, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, env=client_env())
        assert proc.stdout is not None and proc.stderr is not None
        with proc.stdout, proc.stderr:
            assert re.match(REPLY + rb"line 0\n", proc.stdout.readline())
            proc.stdout.close()  # like `| head -1`
            assert proc.wait(timeout=30) == 1
            assert proc.stderr.read() == b""


# -- usage ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("args", [
    ["host:abc"],
    ["[::1"],
    ["--timeout", "0"],
    ["--timeout", "-1"],
    ["--timeout", "soon"],
    ["--timeout", "nan"],
    ["--bogus"],
    ["a", "b"],
])
def test_bad_usage_exits_2(args: list[str]) -> None:
    result = run_client(*args)
    assert result.returncode == 2
    assert result.stderr.startswith(b"usage: tsecho ")
    assert b"Traceback" not in result.stderr


def test_console_script_is_installed() -> None:
    script = shutil.which("tsecho", path=str(Path(sys.executable).parent))
    assert script is not None, "tsecho console script missing: pip install -e ."
    result = subprocess.run([script, "--help"], capture_output=True, timeout=30)
    assert result.returncode == 0
    assert b"HOST[:PORT]" in result.stdout and b"--timeout" in result.stdout
