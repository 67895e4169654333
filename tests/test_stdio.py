"""``tsechod --stdio``: one connection on fd 0/fd 1, run by pipes and by real superservers.

Pipes (subprocess), socat's EXEC:, tcpserver (ucspi-tcp) and xinetd (with the shipped
etc/xinetd.d/tsechod, only its paths and port rewritten) start the real tsechod; the
clients are plain loopback sockets. Hostile clients through tcpserver must end as they do
against the daemon (ERR and close, idle, stalled), bounded in time and memory.
"""

from __future__ import annotations

import os
import re
import selectors
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from conftest import daemon_env
from helpers import (ACCESS, CTIME_REPLY, REPO, PeakSampler, access_events, read_to_end, recv_lines, require_tool,
                     wait_until)

TSECHOD = [sys.executable, "-m", "tsecho.cli", "--stdio"]
MIB = 1024 * 1024


def stdio(config: Path, *args: str, **kwargs: object) -> subprocess.Popen[bytes]:
    return subprocess.Popen([*TSECHOD, "--config", str(config), *args], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=daemon_env(), **kwargs)  # type: ignore[call-overload]


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "tsechod.toml"
    path.write_text("")
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def connectable(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True


# -- pipes --------------------------------------------------------------------------------


def test_pipes_get_the_daemons_replies_and_exit_0_with_one_access_event(config: Path) -> None:
    proc = stdio(config)
    out, err = proc.communicate(b"hello\r\nworld\nno newline", timeout=10)
    assert proc.returncode == 0, err
    lines = out.split(b"\n")
    assert lines.pop() == b""  # the unfinished last line is answered, and ended, at the end of input
    assert [CTIME_REPLY.sub(b"", line) for line in lines] == [b"hello\r", b"world", b"no newline"]
    assert all(CTIME_REPLY.match(line) for line in lines)
    assert access_events(err.decode()) == [("stdio", "eof", 3, 23, len(out))]
    assert err.decode().count("\n") == 1  # nothing but the access event: no listener, no pid file


def test_a_line_too_long_gets_the_err_line_over_pipes(config: Path) -> None:
    config.write_text("[echo]\nmax_line_bytes = 10\n")
    proc = stdio(config)
    out, err = proc.communicate(b"short\n" + b"x" * 100 + b"\n", timeout=10)
    assert proc.returncode == 0
    assert out.split(b"\n")[1] == b"ERR line too long (max 10 bytes)"
    assert [e[1] for e in access_events(err.decode())] == ["too-long"]


def test_sigterm_answers_what_arrived_then_closes_and_exits_0(config: Path) -> None:
    with stdio(config) as proc:
        assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
        proc.stdin.write(b"before the stop\n")
        proc.stdin.flush()
        assert CTIME_REPLY.match(proc.stdout.readline())
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.stdout.read() == b""  # end of file: tsechod closed its side at once
        assert time.monotonic() - started < 2
        proc.stdin.close()  # and we ours, as a client does when it reads the end of file
        assert proc.wait(timeout=5) == 0
        assert [e[1] for e in access_events(proc.stderr.read().decode())] == ["shutdown"]


def test_closed_stdin_is_a_failure_in_one_line(config: Path) -> None:
    proc = subprocess.run([*TSECHOD, "--config", str(config)], stdin=subprocess.DEVNULL, capture_output=True,
                          env=daemon_env(), timeout=10, pass_fds=(), preexec_fn=lambda: os.close(0))
    assert proc.returncode == 1
    assert proc.stderr.decode().startswith("tsechod: --stdio: fd 0 and fd 1 must be open")


def test_the_fds_are_left_blocking_as_they_were_for_the_shell_that_shares_them(config: Path) -> None:
    """O_NONBLOCK belongs to the open file: a terminal's would stay non-blocking for the shell."""
    read_in, write_in = os.pipe()
    read_out, write_out = os.pipe()
    try:
        os.write(write_in, b"hi\n")
        os.close(write_in)
        proc = subprocess.run([*TSECHOD, "--config", str(config)], stdin=read_in, stdout=write_out,
                              stderr=subprocess.DEVNULL, env=daemon_env(), timeout=10)
        assert proc.returncode == 0
        assert os.get_blocking(read_in) and os.get_blocking(write_out)  # the same open files as the child's
        assert CTIME_REPLY.match(os.read(read_out, 4096))
    finally:
        for fd in (read_in, read_out, write_out):
            os.close(fd)


def test_stdio_and_daemon_together_are_a_usage_error(config: Path) -> None:
    proc = subprocess.run([*TSECHOD, "--daemon", "--config", str(config)], stdin=subprocess.DEVNULL,
                          capture_output=True, env=daemon_env(), timeout=10)
    assert (proc.returncode, proc.stdout) == (2, b"")
    assert proc.stderr.decode().startswith("tsechod: --stdio and --daemon exclude each other")


def test_no_log_line_reaches_the_peer_when_stderr_is_the_connection(config: Path) -> None:
    """As under inetd and xinetd: fd 2 is the connection too. The peer must see replies only."""
    socat = require_tool("socat")
    config.write_text('[log]\nlog_level = "debug"\n')  # a log line for every read, were it to leak
    command = " ".join([*TSECHOD, "--config", str(config)])
    proc = subprocess.run([socat, "-", f"EXEC:{command},stderr"], input=b"one\ntwo\n", capture_output=True,
                          env=daemon_env(), cwd=REPO, timeout=20)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.split(b"\n")
    assert lines.pop() == b""
    assert [CTIME_REPLY.sub(b"", line) for line in lines] == [b"one", b"two"], proc.stdout
    assert proc.stderr == b""


def test_a_stuck_log_sink_holds_neither_the_replies_nor_the_exit(config: Path) -> None:
    """stderr a full pipe nobody reads (a stuck journal): lines still answered, FIN, exit."""
    config.write_text('[log]\nlog_level = "debug"\n')  # a log line for every read
    read_end, write_end = os.pipe()
    os.set_blocking(write_end, False)
    try:
        while True:
            os.write(write_end, b"x" * 65536)
    except BlockingIOError:
        pass  # full
    os.set_blocking(write_end, True)
    ours, theirs = socket.socketpair()
    with theirs:
        proc = subprocess.Popen([*TSECHOD, "--config", str(config)], stdin=theirs, stdout=theirs,
                                stderr=write_end, env=daemon_env())
    os.close(write_end)
    try:
        ours.settimeout(5)
        for n in range(20):
            ours.sendall(b"line %d\n" % n)
            assert CTIME_REPLY.sub(b"", recv_lines(ours, 1)[0]) == b"line %d" % n
        ours.shutdown(socket.SHUT_WR)
        assert read_to_end(ours) == (b"", "fin")
        started = time.monotonic()
        assert proc.wait(timeout=10) == 0
        assert time.monotonic() - started < 3  # the exit waits 0.5 s at most for the stuck log
    finally:
        ours.close()
        os.close(read_end)
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# -- superservers -------------------------------------------------------------------------


@pytest.fixture
def tcpserver(tmp_path: Path) -> Iterator[tuple[int, Path, Path]]:
    """tcpserver on a free loopback port running tsechod --stdio: (port, tsechod's config, tsechod's log)."""
    binary = require_tool("tcpserver")
    config, log = tmp_path / "tsechod.toml", tmp_path / "tsechod.log"
    config.write_text(f'[log]\nlog_target = "file"\nlog_file = "{log}"\n'
                      "[server]\nidle_timeout_s = 1.5\n[limits]\nsend_timeout_s = 1.5\n")
    with open(tmp_path / "tcpserver.out", "wb") as out:
        proc = subprocess.Popen([binary, "-1", "-v", "-c", "8", "127.0.0.1", "0", *TSECHOD, "--config", str(config)],
                                stdout=subprocess.PIPE, stderr=out, env=daemon_env(), cwd=REPO)
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline())  # -1: the bound port, on stdout
        yield port, config, log
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        if proc.stdout is not None:
            proc.stdout.close()


def test_tcpserver_runs_one_tsechod_per_connection_with_the_peer_in_the_access_event(tcpserver) -> None:
    port, _, log = tcpserver
    peers = []
    for n in range(3):
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            peers.append("127.0.0.1:%d" % sock.getsockname()[1])
            sock.sendall(b"hi %d\n" % n)
            [reply] = recv_lines(sock, 1)
            assert CTIME_REPLY.match(reply) and reply.endswith(b"hi %d" % n)
    wait_until(lambda: log.exists() and len(access_events(log.read_text())) == 3)
    assert [(e[0], e[1], e[2]) for e in access_events(log.read_text())] == [(p, "eof", 1) for p in peers]


def test_socat_exec_serves_one_connection(config: Path, tmp_path: Path) -> None:
    socat = require_tool("socat")
    port = free_port()
    log = tmp_path / "tsechod.log"
    config.write_text(f'[log]\nlog_target = "file"\nlog_file = "{log}"\n')
    command = " ".join([*TSECHOD, "--config", str(config)])
    proc = subprocess.Popen([socat, f"TCP-LISTEN:{port},bind=127.0.0.1,reuseaddr", f"EXEC:{command}"],
                            env=daemon_env(), cwd=REPO)
    try:
        wait_until(lambda: proc.poll() is not None or connectable_once(port, proc))
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            me = "127.0.0.1:%d" % sock.getsockname()[1]
            sock.sendall(b"via socat\n")
            sock.shutdown(socket.SHUT_WR)
            data, how = read_to_end(sock)
        assert CTIME_REPLY.match(data) and data.endswith(b"] via socat\n") and how == "fin"
        assert proc.wait(timeout=10) == 0  # socat (without fork) ends with its one connection
        # socat passes a socket pair, not the TCP socket: the peer comes from SOCAT_PEERADDR/PORT.
        # socat is gone once the connection is; tsechod's log writer may still be at it.
        wait_until(lambda: log.exists() and access_events(log.read_text()))
        assert [(e[0], e[1]) for e in access_events(log.read_text())] == [(me, "eof")]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)


def connectable_once(port: int, proc: subprocess.Popen[bytes]) -> bool:
    """Whether socat listens yet, without using up its one connection: look at its sockets."""
    return any(c.status == psutil.CONN_LISTEN and c.laddr.port == port for c in psutil.Process(proc.pid).net_connections())


def test_xinetd_with_the_shipped_example(tmp_path: Path) -> None:
    xinetd = require_tool("xinetd")
    port = free_port()
    log, xlog = tmp_path / "tsechod.log", tmp_path / "xinetd.log"
    shipped = (REPO / "etc" / "xinetd.d" / "tsechod").read_text()
    conf = (shipped.replace("port            = 8009", f"port            = {port}")
            .replace("user            = nobody", "user            = root")
            .replace("group           = nogroup", "group           = root")
            # The venv's own script: its #! line names the venv's python (xinetd's argv[0] has no path).
            .replace("server          = /usr/local/bin/tsechod", f"server          = {Path(sys.executable).parent / 'tsechod'}")
            .replace("server_args     = --stdio --config /etc/tsechod/tsechod.toml --log-target syslog",
                     f"server_args     = --stdio --config {tmp_path / 'none.toml'} --log-target file --log-file {log}")
            .replace("log_type        = SYSLOG daemon info", f"log_type        = FILE {xlog}"))
    (tmp_path / "none.toml").write_text("")
    assert conf.count(str(port)) == 1 and str(log) in conf and str(xlog) in conf
    (tmp_path / "xinetd.conf").write_text(conf)
    with open(tmp_path / "xinetd.out", "wb") as out:
        proc = subprocess.Popen([xinetd, "-dontfork", "-f", str(tmp_path / "xinetd.conf")], stdout=out, stderr=out)
    try:
        wait_until(lambda: connectable(port) or proc.poll() is not None)
        wait_until(lambda: log.exists() or proc.poll() is not None)  # the probe's own connection
        assert proc.poll() is None, (tmp_path / "xinetd.out").read_text()
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            me = "127.0.0.1:%d" % sock.getsockname()[1]
            sock.sendall(b"hello xinetd\n\xff\xf4")  # a line, then telnet's interrupt (IAC IP)
            data, how = read_to_end(sock)
        assert CTIME_REPLY.match(data) and data.endswith(b"] hello xinetd\n") and how == "fin"
        wait_until(lambda: me in log.read_text())
        event = [e for e in access_events(log.read_text()) if e[0] == me]
        assert [(e[1], e[2]) for e in event] == [("interrupt", 1)]
        wait_until(lambda: xlog.read_text().count("EXIT: tsechod status=0") == 2)
    finally:
        proc.kill()  # by PID; xinetd has no children left once both connections ended
        proc.wait(timeout=10)


# -- hostile clients through a superserver --------------------------------------------------


def tsechod_child(port: int) -> psutil.Process:
    """The tsechod --stdio that tcpserver started for the connection just made."""
    def find() -> psutil.Process | None:
        for proc in psutil.process_iter(["cmdline"]):
            if "--stdio" in (proc.info["cmdline"] or []) and proc.ppid() != os.getpid():
                return proc
        return None
    return wait_until(find, timeout=5)  # type: ignore[return-value]


def test_8_mib_line_through_tcpserver_gets_err_and_fin_with_flat_memory(tcpserver) -> None:
    port, _, log = tcpserver
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        with PeakSampler(tsechod_child(port).pid) as peak:
            sock.sendall(b"z" * (8 * MIB))
            sock.shutdown(socket.SHUT_WR)
            data, how = read_to_end(sock, timeout=10)
    assert (data, how) == (b"ERR line too long (max 65536 bytes)\n", "fin")
    assert peak.peak_rss < 64, peak.peak_rss  # MiB: the interpreter plus at most a line's buffer
    wait_until(lambda: log.exists() and access_events(log.read_text()))
    assert [e[1] for e in access_events(log.read_text())] == ["too-long"]


def test_silent_client_through_tcpserver_is_closed_at_idle_timeout(tcpserver) -> None:
    port, _, log = tcpserver
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        data, how = read_to_end(sock, timeout=10)
    assert (data, how) == (b"", "fin")
    assert 1.4 < time.monotonic() - started < 4
    wait_until(lambda: log.exists() and access_events(log.read_text()))
    assert [e[1] for e in access_events(log.read_text())] == ["idle"]


def test_client_that_never_reads_through_tcpserver_is_cut_at_send_timeout(tcpserver) -> None:
    port, _, log = tcpserver
    chunk = (b"y" * 1023 + b"\n") * 1024  # 1 MiB of lines: 1 MiB and a bit of replies each
    sent = 0
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        child = tsechod_child(port)
        sock.setblocking(False)
        writable = selectors.DefaultSelector()
        writable.register(sock, selectors.EVENT_WRITE)
        last_progress = time.monotonic()
        end = None
        with PeakSampler(child.pid) as peak:
            while sent < 50 * MIB and time.monotonic() - last_progress < 10:
                if not writable.select(0.5):
                    continue
                try:
                    sent += sock.send(memoryview(chunk)[sent % MIB:])
                    last_progress = time.monotonic()
                except BlockingIOError:
                    continue
                except (ConnectionResetError, BrokenPipeError) as err:
                    end = type(err).__name__
                    break
        writable.close()
    assert end in ("ConnectionResetError", "BrokenPipeError") and sent < 50 * MIB, (end, sent)
    assert 1.0 < time.monotonic() - last_progress < 4
    assert peak.peak_rss < 64, peak.peak_rss
    wait_until(lambda: log.exists() and access_events(log.read_text()))
    assert [e[1] for e in access_events(log.read_text())] == ["stalled"]
    assert ACCESS.search(log.read_text())
    assert not re.search(r" (ERROR|CRITICAL) ", log.read_text())
