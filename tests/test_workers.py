"""workers = N: a supervisor and N worker processes on the same listening sockets."""

from __future__ import annotations

import os
import re
import signal
import socket
import time
from pathlib import Path

import psutil
from helpers import CTIME_REPLY, recv_all, recv_lines, wait_until

ISO = re.compile(rb"^\[\d{4}-\d\d-\d\dT")


def workers_of(pid: int) -> list[int]:
    return sorted(child.pid for child in psutil.Process(pid).children())


def ask(d, line: bytes = b"ping") -> bytes:
    with d.connect() as sock:
        sock.sendall(line + b"\n")
        return recv_lines(sock, 1)[0]


def test_two_workers_serve_the_same_port(tsechod) -> None:
    d = tsechod("[server]\nworkers = 2\n")
    d.wait_for_log(r"2 workers ready: PID (\d+), PID (\d+)")
    assert len(workers_of(d.pid)) == 2
    for _ in range(20):
        assert CTIME_REPLY.match(ask(d))
    d.wait_for_log(r"closed reason=eof", count=20)
    assert d.stop() == 0
    log = d.log_text()
    assert log.count("tsecho.service: stopped") == 2 and "tsecho.supervisor: stopped" in log


def test_a_dead_worker_is_replaced_and_logged(tsechod) -> None:
    d = tsechod("[server]\nworkers = 2\n")
    d.wait_for_log(r"2 workers ready")
    victim = workers_of(d.pid)[0]
    os.kill(victim, signal.SIGKILL)
    d.wait_for_log(rf"ERROR tsecho.supervisor: worker \d \(PID {victim}\) was killed by SIGKILL after [\d.]+ s; "
                   r"starting a new one")
    wait_until(lambda: len(workers_of(d.pid)) == 2 and victim not in workers_of(d.pid))
    assert CTIME_REPLY.match(ask(d))


def test_sighup_reloads_every_worker(tsechod) -> None:
    d = tsechod("[server]\nworkers = 2\n[echo]\ntimestamp = \"ctime\"\n")
    d.wait_for_log(r"2 workers ready")
    d.rewrite_config("[server]\nworkers = 2\n[echo]\ntimestamp = \"iso\"\n")
    d.send(signal.SIGHUP)
    d.wait_for_log(r"reloaded config: timestamp=iso", count=2)
    for _ in range(10):  # whichever worker the kernel picks
        assert ISO.match(ask(d))


def test_sigterm_drains_every_worker_and_exits_0(tsechod) -> None:
    d = tsechod("[server]\nworkers = 2\nshutdown_timeout_s = 2\n")
    d.wait_for_log(r"2 workers ready")
    clients = [d.connect() for _ in range(6)]
    try:
        for sock in clients:
            sock.sendall(b"hi\n")
            recv_lines(sock, 1)
        assert d.stop(timeout=10) == 0
        for sock in clients:
            assert recv_all(sock) == b""
    finally:
        for sock in clients:
            sock.close()
    assert len(re.findall(r"closed reason=shutdown", d.log_text())) == 6


def test_ready_is_sent_once_every_worker_is_up(tsechod, tmp_path: Path) -> None:
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        listener.bind(str(path))
        listener.settimeout(10)
        d = tsechod("[server]\nworkers = 2\n", env={"NOTIFY_SOCKET": str(path)})
        messages = []
        while "READY=1" not in messages:
            messages.append(listener.recv(4096).decode())
        assert len(workers_of(d.pid)) == 2
        d.wait_for_log(r"2 workers ready")  # logged before READY=1, written by the log writer thread
        status = listener.recv(4096).decode()
        assert re.match(r"STATUS=2 workers, \d+ connections, \d+ lines, \d+ refused", status), status


def test_workers_stop_when_the_supervisor_is_killed(tsechod) -> None:
    d = tsechod("[server]\nworkers = 2\n")
    d.wait_for_log(r"2 workers ready")
    workers = [psutil.Process(pid) for pid in workers_of(d.pid)]
    d.proc.kill()  # SIGKILL: the supervisor can't forward anything
    d.proc.wait(timeout=10)
    gone, alive = psutil.wait_procs(workers, timeout=15)
    assert alive == []
    with socket.socket() as probe:
        assert probe.connect_ex(d.address) != 0  # nobody serves the port any more


EPOCH = re.compile(rb"^\[\d{10}\.\d{6}\] ")


def test_a_worker_started_after_a_reload_serves_the_reloaded_config(tsechod) -> None:
    d = tsechod("[server]\nworkers = 2\nshutdown_timeout_s = 0.5\n[echo]\ntimestamp = \"ctime\"\n")
    d.wait_for_log(r"2 workers ready")
    d.rewrite_config("[server]\nworkers = 2\nshutdown_timeout_s = 3.5\n[echo]\ntimestamp = \"epoch\"\n")
    d.send(signal.SIGHUP)
    d.wait_for_log(r"reloaded config: timestamp=epoch", count=2)
    victim = workers_of(d.pid)[0]
    os.kill(victim, signal.SIGKILL)
    wait_until(lambda: len(workers_of(d.pid)) == 2 and victim not in workers_of(d.pid))
    # The replacement serves once its acceptor thread runs (main thread + one acceptor).
    wait_until(lambda: all(psutil.Process(pid).num_threads() >= 2 for pid in workers_of(d.pid)))
    replies = [ask(d) for _ in range(40)]  # the kernel spreads them over both workers
    assert [r for r in replies if not EPOCH.match(r)] == []
    # The stop waits the reloaded shutdown_timeout_s (3.5 s) for a client that stays,
    # instead of killing the workers after the startup value (0.5 s) plus grace.
    with d.connect() as held:
        held.sendall(b"stay\n")
        assert EPOCH.match(recv_lines(held, 1)[0])
        assert d.stop(timeout=15) == 0
        assert recv_all(held, timeout=10) == b""  # our FIN at the deadline, not a kill's reset
    assert "killing" not in d.log_text()


def test_a_signal_sent_while_a_worker_starts_is_acted_on(tsechod) -> None:
    """A worker caught in its first milliseconds (SIGSTOP) is sent SIGHUP: it must still reload."""
    d = tsechod("[server]\nworkers = 2\n")
    d.wait_for_log(r"2 workers ready")
    for round_ in range(1, 6):
        before = set(workers_of(d.pid))
        os.kill(min(before), signal.SIGKILL)
        deadline = time.monotonic() + 10
        new: set[int] = set()
        while not new and time.monotonic() < deadline:  # look as often as we can: the window is short
            new = set(workers_of(d.pid)) - before
        assert new, "no replacement worker within 10 s"
        [pid] = new
        os.kill(pid, signal.SIGSTOP)
        os.kill(pid, signal.SIGHUP)
        os.kill(pid, signal.SIGCONT)
        d.wait_for_log(r"tsecho.service: received SIGHUP: reloading config", count=round_, timeout=5)
        # Past QUICK_DEATH_S, so the next replacement starts at once.
        wait_until(lambda: time.time() - psutil.Process(pid).create_time() > 1.2)
    assert d.stop() == 0
