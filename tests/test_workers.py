"""workers = N: a supervisor and N worker processes on the same listening sockets."""

from __future__ import annotations

import os
import re
import signal
import socket
from pathlib import Path

import psutil
from conftest import CTIME_REPLY, recv_all, recv_lines, wait_until

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
        assert "2 workers ready" in d.log_text()
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
