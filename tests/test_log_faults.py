"""Log faults: a log sink that stops reading, a full disk, no /dev/log, a log file that can't be reopened.

The rule under test: logging never stops the service. Each test runs a real
tsechod (stderr into a FIFO we stop reading; syslog on a datagram socket we
stop reading, bound over /dev/log in a mount namespace; a log file on
/dev/full or on a tmpfs of a few KiB) and asserts what an operator sees:
replies and FINs keep coming, ``ERR server busy`` when full, SIGTERM exits 0
within its deadline, one clear line instead of a traceback per lost line, and
the count of dropped lines. The other host faults are in test_host_faults.py.
"""

from __future__ import annotations

import errno
import functools
import os
import re
import resource
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import daemon_env
from helpers import ACCESS, recv_all, recv_lines, require_tool, wait_until

TSECHOD = [sys.executable, "-m", "tsecho.cli"]
DROPPED = re.compile(r"dropped (\d+) log lines in the last [\d.]+ s: (.*)")
LISTENING = re.compile(r"listening on 127\.0\.0\.1:(\d+)")
SHUTDOWN_TIMEOUT_S = 2.0
STOP_BOUND_S = SHUTDOWN_TIMEOUT_S + 1.5  # the stop's deadline plus its grace, as test_daemon allows


# -- running tsechod with the stderr, namespace and config each fault needs --------------------


@dataclass
class Proc:
    proc: subprocess.Popen[bytes]
    stderr_path: Path | None
    port: int = 0

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stderr(self) -> str:
        assert self.stderr_path is not None
        return self.stderr_path.read_text(errors="replace")

    def stop(self, timeout: float = 15.0) -> tuple[int, float]:
        """SIGTERM; (exit status, seconds it took)."""
        started = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        status = self.proc.wait(timeout=timeout)
        return status, time.monotonic() - started


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Callable[..., Proc]]:
    """Factory: ``spawn(config_text, *args, stderr=fd or None, prefix=[...])`` starts tsechod.

    *stderr* None means a file (``Proc.stderr()``); *prefix* runs it inside
    another command (``unshare -m sh -c ... exec``). Killed by PID at the end.
    """
    started: list[subprocess.Popen[bytes]] = []

    def start(config_text: str, *args: str, stderr: int | None = None, prefix: list[str] | None = None) -> Proc:
        config = tmp_path / f"tsechod{len(started)}.toml"
        config.write_text(config_text)
        argv = [*(prefix or []), *TSECHOD, "--config", str(config), *args]
        stderr_path = None
        if stderr is None:
            stderr_path = tmp_path / f"tsechod{len(started)}.stderr"
            with open(stderr_path, "wb") as out:
                proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=out,
                                        env=daemon_env(), cwd=tmp_path)
        else:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr,
                                    env=daemon_env(), cwd=tmp_path)
        started.append(proc)
        return Proc(proc, stderr_path)

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)


@functools.cache
def _cannot_mount() -> str:
    """Why this machine can't give a process a mount namespace with a tmpfs of its own ('' if it can)."""
    probe = subprocess.run(["unshare", "--mount", "sh", "-euc", "mount -t tmpfs -o size=4k tsechod-probe /tmp"],
                           capture_output=True, text=True, timeout=20)
    return "" if probe.returncode == 0 else f"unshare --mount and mount -t tmpfs failed: {probe.stderr.strip()}"


def in_mount_namespace(script: str) -> list[str]:
    """A prefix that runs the daemon in a mount namespace of its own, after *script* (sh) set it up.

    Needs root (or CAP_SYS_ADMIN), which CI has: skips with the reason elsewhere, fails under CI.
    """
    require_tool("unshare")
    if reason := _cannot_mount():
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    return ["unshare", "--mount", "sh", "-euc", f'{script}\nexec "$@"', "sh"]


def dev_with_log_socket(tmp_path: Path, socket_path: Path | None) -> str:
    """sh lines: a tmpfs over /dev holding only null and, if given, *socket_path* as /dev/log."""
    old = tmp_path / "host-dev"
    old.mkdir()
    lines = [f"mount --bind /dev {old}", "mount -t tmpfs -o size=64k,mode=755 tsechod-test-dev /dev",
             f"touch /dev/null && mount --bind {old}/null /dev/null"]
    if socket_path is not None:
        lines.append(f"touch /dev/log && mount --bind {socket_path} /dev/log")
    return "\n".join(lines)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def config_text(port: int = 0, workers: int = 1, **log: str) -> str:
    """A config on 127.0.0.1:*port* with a short stop and a small connection limit."""
    lines = ["[server]", f'listen = ["127.0.0.1:{port}"]', f"shutdown_timeout_s = {SHUTDOWN_TIMEOUT_S}",
             f"workers = {workers}",
             "[limits]", "max_connections = 20", "[log]"]
    lines += [f'{key} = "{value}"' for key, value in log.items()]
    return "\n".join(lines) + "\n"


def round_trip(port: int, payload: bytes = b"x" * 40) -> float:
    """One line, its reply, our FIN, the daemon's FIN: return how long the daemon's FIN took."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(payload + b"\n")
        [reply] = recv_lines(sock, 1)
        assert reply.endswith(b"] " + payload), reply
        sock.shutdown(socket.SHUT_WR)
        started = time.monotonic()
        assert recv_all(sock) == b""  # the daemon's FIN
        return time.monotonic() - started


def ask(port: int, line: bytes = b"ping") -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(line + b"\n")
        return recv_lines(sock, 1)[0]


_held: list[socket.socket] = []  # clients a test keeps open; closed after it, failed or not


@pytest.fixture(autouse=True)
def _close_held_clients() -> Iterator[None]:
    yield
    for sock in _held:
        sock.close()
    _held.clear()


def fill_and_refuse(port: int) -> list[socket.socket]:
    """Take all 20 slots with idle clients (each answered once); the 21st must get ERR server busy."""
    held = []
    for _ in range(20):
        sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        _held.append(sock)
        held.append(sock)
        sock.sendall(b"hold\n")
        assert recv_lines(sock, 1)[0].endswith(b"] hold")
    with socket.create_connection(("127.0.0.1", port), timeout=5) as extra:
        assert recv_all(extra, timeout=3) == b"ERR server busy\n"
    return held


def expect_fins(held: list[socket.socket]) -> threading.Thread:
    """A thread that reads every held client to its FIN and closes it (so the stop need not wait)."""
    fins: list[bool] = []

    def read() -> None:
        for sock in held:
            fins.append(recv_all(sock, timeout=STOP_BOUND_S) == b"")
            sock.close()

    thread = threading.Thread(target=read, name="test-fin-reader")
    thread.fins = fins  # type: ignore[attr-defined]
    thread.start()
    return thread


# -- a FIFO for stderr, whose reader we pause -----------------------------------------------------


class PausableFifo:
    """A FIFO the daemon writes its stderr into; a thread reads it, until paused."""

    def __init__(self, path: Path) -> None:
        os.mkfifo(path)
        self.read_fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        self.write_fd = os.open(path, os.O_WRONLY)  # for the daemon; closed here once it has it
        self.data = bytearray()
        self.reading = threading.Event()
        self.reading.set()
        self.idle = threading.Event()  # set by the reader while it is paused
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._read, name="test-fifo-reader", daemon=True)
        self.thread.start()

    def _read(self) -> None:
        while not self.done.is_set():
            if not self.reading.is_set():
                self.idle.set()
                self.reading.wait(0.05)
                continue
            self.idle.clear()
            if select.select([self.read_fd], [], [], 0.05)[0]:
                try:
                    chunk = os.read(self.read_fd, 65536)
                except BlockingIOError:
                    continue
                if not chunk:
                    return
                self.data += chunk

    def handed_over(self) -> None:
        os.close(self.write_fd)

    def text(self) -> str:
        return bytes(self.data).decode(errors="replace")

    def pause(self) -> None:
        self.idle.clear()
        self.reading.clear()
        assert self.idle.wait(5), "the FIFO reader did not pause"

    def resume(self) -> None:
        self.reading.set()

    def close(self) -> None:
        self.done.set()
        self.thread.join(timeout=5)
        os.close(self.read_fd)


@pytest.fixture
def fifo(tmp_path: Path) -> Iterator[PausableFifo]:
    pipe = PausableFifo(tmp_path / "stderr.fifo")
    yield pipe
    pipe.close()


# -- 1. a sink that stops reading ---------------------------------------------------------------


def test_stderr_fifo_that_stops_reading_blocks_no_reply_fin_refusal_or_stop(spawn, fifo) -> None:
    d = spawn(config_text(), stderr=fifo.write_fd)
    fifo.handed_over()
    d.port = int(wait_until(lambda: LISTENING.search(fifo.text())).group(1))  # type: ignore[union-attr]
    fifo.pause()
    # More lines than the queue holds (10,000): the pipe takes ~64 KiB, the queue 10,000, the rest drop.
    clients = 12_000
    fin_s = max(round_trip(d.port, b"%d" % n) for n in range(clients))
    assert fin_s < 0.5, f"a FIN took {fin_s:.3f} s while the log was stuck"
    fifo.resume()
    # Once the sink drains: one line says how many were dropped, and nothing is counted twice
    # or missing: every access line either arrived or is in the count.
    match = wait_until(lambda: DROPPED.search(fifo.text()), timeout=10)
    dropped = int(match.group(1))  # type: ignore[union-attr]
    assert "found the queue full (10000 lines or 4 MiB) because stderr did not keep up" in match.group(2)  # type: ignore[union-attr]
    wait_until(lambda: len(ACCESS.findall(fifo.text())) + dropped >= clients, timeout=10)
    assert len(ACCESS.findall(fifo.text())) + dropped == clients
    print(f"\nFIGURES stuck-stderr {clients} clients: max FIN {fin_s * 1000:.1f} ms, "
          f"{len(ACCESS.findall(fifo.text()))} access lines written, {dropped} dropped")
    assert len(DROPPED.findall(fifo.text())) == 1
    assert "Traceback" not in fifo.text() and "Logging error" not in fifo.text()
    # Stuck again, then full, then stopped: ERR server busy, FINs to every held client, exit 0 in time.
    fifo.pause()
    for n in range(1_000):  # ~100 KiB of access lines: the pipe is full again
        round_trip(d.port, b"again %d" % n)
    held = fill_and_refuse(d.port)
    reader = expect_fins(held)
    status, took_s = d.stop()
    reader.join(timeout=STOP_BOUND_S + 5)
    assert status == 0
    assert took_s < STOP_BOUND_S, f"the stop took {took_s:.2f} s with the log stuck"
    assert reader.fins == [True] * 20  # type: ignore[attr-defined]
    print(f"FIGURES stuck-stderr stop with 20 clients held: exit {status} in {took_s:.2f} s")


@pytest.fixture
def syslog(tmp_path: Path) -> Iterator[socket.socket]:
    """Our syslog: a datagram socket at tmp_path/syslog.sock that reads only when a test says so."""
    log = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    log.bind(str(tmp_path / "syslog.sock"))
    yield log
    log.close()


def test_syslog_socket_that_stops_reading_blocks_nothing(spawn, tmp_path: Path, syslog: socket.socket) -> None:
    log = syslog
    log.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    prefix = in_mount_namespace(dev_with_log_socket(tmp_path, tmp_path / "syslog.sock"))
    # At debug level each read is logged whole: 200 reads of 32 KiB pass the queue's 4 MiB bound.
    d = spawn(config_text(log_target="syslog", log_level="debug"), prefix=prefix)
    received: list[str] = []

    def read_some(timeout: float) -> str:
        while select.select([log], [], [], timeout)[0]:
            received.append(log.recv(1 << 20).decode(errors="replace"))
            timeout = 0.05
        return "\n".join(received)

    d.port = int(wait_until(lambda: LISTENING.search(read_some(0.1))).group(1))  # type: ignore[union-attr]
    assert received[0].startswith("<30>tsechod: INFO tsecho.cli: "), received[0]  # daemon.info, no timestamp
    payload = b"y" * 32768
    fin_s = max(round_trip(d.port, payload) for _ in range(200))  # we read none of the syslog meanwhile
    assert fin_s < 0.5, f"a FIN took {fin_s:.3f} s while syslog was stuck"
    held = fill_and_refuse(d.port)
    for sock in held:
        sock.close()
    match = wait_until(lambda: DROPPED.search(read_some(0.1)), timeout=10)
    assert "found the queue full" in match.group(2) and "syslog (/dev/log) did not keep up" in match.group(2)  # type: ignore[union-attr]
    assert int(match.group(1)) > 0  # type: ignore[union-attr]
    for _ in range(200):  # stuck again: we stop reading, fill the slots, and stop the daemon
        round_trip(d.port, payload)
    held = fill_and_refuse(d.port)
    reader = expect_fins(held)
    status, took_s = d.stop()
    reader.join(timeout=STOP_BOUND_S + 5)
    assert (status, reader.fins) == (0, [True] * 20)  # type: ignore[attr-defined]
    assert took_s < STOP_BOUND_S


# -- 2. SIGUSR1 when the log file can't be reopened --------------------------------------------


def _file_config(log_file: Path, workers: int = 1) -> str:
    return config_text(workers=workers, log_target="file", log_file=str(log_file))


def _held_client(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    _held.append(sock)
    sock.sendall(b"before\n")
    assert recv_lines(sock, 1)[0].endswith(b"] before")
    return sock


def _port_from(path: Path) -> int:
    match = wait_until(lambda: path.exists() and LISTENING.search(path.read_text(errors="replace")))
    return int(match.group(1))  # type: ignore[union-attr]


@pytest.mark.parametrize("workers", [1, 2])
def test_sigusr1_with_the_log_directory_removed_keeps_the_old_file_and_serves(spawn, tmp_path: Path,
                                                                              workers: int) -> None:
    logs = tmp_path / "logs"
    logs.mkdir()
    d = spawn(_file_config(logs / "tsechod.log", workers))
    d.port = _port_from(logs / "tsechod.log")
    if workers > 1:
        wait_until(lambda: "2 workers ready" in (logs / "tsechod.log").read_text())
    held = _held_client(d.port)
    rotated = tmp_path / "tsechod.log.1"
    (logs / "tsechod.log").rename(rotated)  # logrotate moved it, then the directory went away
    logs.rmdir()
    d.proc.send_signal(signal.SIGUSR1)
    errors = wait_until(lambda: re.findall(r"ERROR tsecho\.logsetup: cannot reopen log file (\S+): (.*)",
                                           rotated.read_text()) or None)
    assert len(errors) == workers + (workers > 1)  # every process that has the file says it once
    for path, reason in errors:
        assert path == str(logs / "tsechod.log")
        assert reason == ("No such file or directory (ENOENT); still writing to the file open before "
                          "(fix it, then send SIGUSR1 again)")
    held.sendall(b"after\n")
    assert recv_lines(held, 1)[0].endswith(b"] after")
    held.close()
    assert ask(d.port).endswith(b"] ping")
    wait_until(lambda: len(ACCESS.findall(rotated.read_text())) == 2)  # the old file is still written
    assert d.proc.poll() is None
    status, took_s = d.stop()
    assert status == 0 and took_s < STOP_BOUND_S
    assert "Traceback" not in rotated.read_text() + d.stderr()


def test_sigusr1_without_free_descriptors_keeps_the_old_file_and_serves(spawn, tmp_path: Path) -> None:
    log = tmp_path / "tsechod.log"
    d = spawn(_file_config(log))
    d.port = _port_from(log)
    held = _held_client(d.port)
    log.rename(tmp_path / "tsechod.log.1")
    open_fds = len(os.listdir(f"/proc/{d.pid}/fd"))
    limits = resource.prlimit(d.pid, resource.RLIMIT_NOFILE)
    resource.prlimit(d.pid, resource.RLIMIT_NOFILE, (open_fds, limits[1]))  # not one more descriptor
    try:
        d.proc.send_signal(signal.SIGUSR1)
        rotated = tmp_path / "tsechod.log.1"
        wait_until(lambda: "cannot reopen log file" in rotated.read_text())
        held.sendall(b"after\n")
        assert recv_lines(held, 1)[0].endswith(b"] after")
    finally:
        resource.prlimit(d.pid, resource.RLIMIT_NOFILE, limits)
    assert f"cannot reopen log file {log}: Too many open files (EMFILE); still writing" in rotated.read_text()
    held.close()
    d.proc.send_signal(signal.SIGUSR1)  # with descriptors again, the same signal works
    wait_until(lambda: log.exists() and f"reopened log file {log}" in log.read_text())
    assert ask(d.port).endswith(b"] ping")
    assert d.stop()[0] == 0


@pytest.mark.parametrize("fault", ["read-only", "no free inodes"])
def test_sigusr1_on_a_read_only_or_full_filesystem_keeps_serving(spawn, tmp_path: Path, fault: str) -> None:
    logs = tmp_path / "logs"
    logs.mkdir()
    # A tmpfs of its own, seen only by the daemon; we reach it through /proc/PID/root.
    prefix = in_mount_namespace(f"mount -t tmpfs -o size=64k,nr_inodes=4 tsechod-test-logs {logs}")
    d = spawn(_file_config(logs / "tsechod.log"), prefix=prefix)
    inside = Path(f"/proc/{d.pid}/root") / str(logs).lstrip("/")
    d.port = _port_from(inside / "tsechod.log")
    held = _held_client(d.port)
    (inside / "tsechod.log").rename(inside / "tsechod.log.1")
    if fault == "read-only":
        require_tool("nsenter")
        # Read-only from now on: a read-only bind mount over the directory (the open file stays writable).
        subprocess.run(["nsenter", "-t", str(d.pid), "-m", "sh", "-euc",
                        f"mount --bind {logs} {logs} && mount -o remount,bind,ro {logs}"], check=True)
        reason = "Read-only file system (EROFS)"
    else:
        for n in range(8):  # the root directory and the log file take two of the four inodes
            try:
                (inside / f"filler{n}").touch()
            except OSError as err:
                assert err.errno == errno.ENOSPC
                break
        reason = "No space left on device (ENOSPC)"
    d.proc.send_signal(signal.SIGUSR1)
    rotated = inside / "tsechod.log.1"
    wait_until(lambda: f"cannot reopen log file {logs / 'tsechod.log'}: {reason}" in rotated.read_text())
    held.sendall(b"after\n")
    assert recv_lines(held, 1)[0].endswith(b"] after")
    held.close()
    assert ask(d.port).endswith(b"] ping")
    status, took_s = d.stop()
    assert status == 0 and took_s < STOP_BOUND_S
    assert "Traceback" not in d.stderr()


# -- 3. a full disk, no /dev/log -------------------------------------------------------------------


def test_log_file_on_dev_full_drops_and_counts_lines_without_a_traceback_each(spawn) -> None:
    port = free_port()
    d = spawn(config_text(port, log_target="file", log_file="/dev/full"))
    wait_until(lambda: "cannot write log lines" in d.stderr())
    for n in range(50):
        round_trip(port, b"%d" % n)
    status, took_s = d.stop()
    assert status == 0 and took_s < STOP_BOUND_S
    lines = d.stderr().splitlines()
    assert "Logging error" not in d.stderr() and "Traceback" not in d.stderr()
    # What the operator sees: one line when it starts, one with the count at the stop.
    [notice] = [line for line in lines if "cannot write" in line]
    assert notice.endswith("ERROR tsecho.logqueue: cannot write log lines to log file /dev/full: No space left "
                           "on device (ENOSPC); dropping and counting them until it works again "
                           "(tsechod keeps serving)"), notice
    [count] = [DROPPED.search(line) for line in lines if DROPPED.search(line)]
    assert count is not None
    # listening, 50 access lines, "received SIGTERM", "stopped", and maybe a line from startup
    assert 50 + 3 <= int(count.group(1)) <= 50 + 6, count.group(0)
    assert count.group(2) == (f"{count.group(1)} could not be written to log file /dev/full: "
                              "No space left on device (ENOSPC)")
    assert len(lines) == 2, lines


def test_full_tmpfs_drops_lines_and_says_how_many_once_space_is_free(spawn, tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    logs.mkdir()
    prefix = in_mount_namespace(f"mount -t tmpfs -o size=8k tsechod-test-logs {logs}")
    d = spawn(_file_config(logs / "tsechod.log"), prefix=prefix)
    log = Path(f"/proc/{d.pid}/root") / str(logs).lstrip("/") / "tsechod.log"
    d.port = _port_from(log)
    clients = 200  # ~20 KiB of access lines into 8 KiB
    for n in range(clients):
        round_trip(d.port, b"%d" % n)
    wait_until(lambda: "cannot write log lines to log file" in d.stderr())
    before = log.read_text()
    written = len(ACCESS.findall(before[:before.rfind("\n") + 1]))  # a line cut off by the full disk is dropped
    assert 0 < written < clients
    os.truncate(log, 0)  # the operator frees space: logging works again
    round_trip(d.port, b"space again")
    match = wait_until(lambda: DROPPED.search(log.read_text()))
    dropped = int(match.group(1))  # type: ignore[union-attr]
    assert f"{dropped} could not be written to log file {logs / 'tsechod.log'}: No space left on device (ENOSPC)" \
        in match.group(2)  # type: ignore[union-attr]
    # Every access line was written, before the disk filled or after it was freed, or is in the count.
    wait_until(lambda: written + len(ACCESS.findall(log.read_text())) + dropped >= clients + 1)
    after = log.read_text()
    assert written + len(ACCESS.findall(after)) + dropped == clients + 1
    assert d.stop()[0] == 0
    assert "Traceback" not in d.stderr() + after + before


def test_syslog_without_dev_log_is_a_config_error_at_start(tmp_path: Path) -> None:
    prefix = in_mount_namespace(dev_with_log_socket(tmp_path, None))
    config = tmp_path / "syslog.toml"
    config.write_text(config_text(log_target="syslog"))
    result = subprocess.run([*prefix, *TSECHOD, "--config", str(config)], capture_output=True, text=True,
                            env=daemon_env(), timeout=20, stdin=subprocess.DEVNULL)
    assert result.returncode == 78
    assert result.stderr == ('tsechod: config error: log_target = "syslog": cannot connect to /dev/log: '
                             "No such file or directory (ENOENT) (is journald or a syslog daemon running? "
                             'else set log_target = "stderr" or "file")\n')


def test_reload_to_syslog_without_dev_log_keeps_the_running_config(spawn, tmp_path: Path) -> None:
    prefix = in_mount_namespace(dev_with_log_socket(tmp_path, None))
    d = spawn(config_text(), prefix=prefix)
    d.port = int(wait_until(lambda: LISTENING.search(d.stderr())).group(1))  # type: ignore[union-attr]
    (tmp_path / "tsechod0.toml").write_text(config_text(log_target="syslog"))
    d.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: "reload failed" in d.stderr())
    assert ('ERROR tsecho.service: reload failed, keeping the running config: config error: log_target = '
            '"syslog": cannot connect to /dev/log: No such file or directory (ENOENT)') in d.stderr()
    assert ask(d.port).endswith(b"] ping")
    wait_until(lambda: ACCESS.search(d.stderr()))  # still logging to stderr
    assert d.stop()[0] == 0


def test_syslog_that_goes_away_drops_and_counts_without_a_traceback_each(spawn, tmp_path: Path,
                                                                          syslog: socket.socket) -> None:
    log = syslog
    d = spawn(config_text(log_target="syslog"),
              prefix=in_mount_namespace(dev_with_log_socket(tmp_path, tmp_path / "syslog.sock")))
    log.settimeout(10)
    d.port = int(LISTENING.search(log.recv(65536).decode()).group(1))  # type: ignore[union-attr]
    log.close()  # syslog is gone: every send is refused now
    for n in range(30):
        round_trip(d.port, b"%d" % n)
    wait_until(lambda: "cannot write log lines" in d.stderr())
    status, took_s = d.stop()
    assert status == 0 and took_s < STOP_BOUND_S
    text = d.stderr()
    assert "Traceback" not in text and "Logging error" not in text
    assert ("cannot write log lines to syslog (/dev/log): Connection refused (ECONNREFUSED); dropping and "
            "counting them") in text
    [count] = DROPPED.findall(text)
    assert int(count[0]) >= 30 + 2
    assert len(text.splitlines()) == 2, text
