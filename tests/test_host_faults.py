"""What the host does to a running tsechod (not what clients do): early signals, odd paths and files.

Each test starts a real tsechod and asserts what an operator sees: the exit
code, replies, the one log line that says what happened. The logging faults
(stuck or full log sinks) are in test_log_faults.py.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from conftest import daemon_env
from helpers import CTIME_REPLY, recv_lines, require_tool, wait_until

TSECHOD = [sys.executable, "-m", "tsecho.cli"]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def ask(address: tuple[str, int], line: bytes = b"ping") -> bytes:
    with socket.create_connection(address, timeout=5) as sock:
        sock.sendall(line + b"\n")
        return recv_lines(sock, 1)[0]


@pytest.mark.parametrize("signum", [signal.SIGHUP, signal.SIGUSR1])
def test_a_signal_sent_the_moment_the_port_accepts_does_not_kill_the_daemon(tmp_path: Path, signum: int) -> None:
    for attempt in range(10):
        port = free_port()
        log = tmp_path / f"{attempt}.log"
        with open(log, "wb") as stderr:
            proc = subprocess.Popen([*TSECHOD, "--listen", f"127.0.0.1:{port}"], stdin=subprocess.DEVNULL,
                                    stderr=stderr, env=daemon_env(), cwd=tmp_path)
        try:
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:  # as soon as the port accepts: no earlier is possible
                with socket.socket() as probe:
                    if probe.connect_ex(("127.0.0.1", port)) == 0:
                        break
            proc.send_signal(signum)
            reply = ask(("127.0.0.1", port))
            assert CTIME_REPLY.match(reply), reply
            wait_until(lambda: signal.Signals(signum).name in log.read_text())
            assert proc.poll() is None, f"attempt {attempt}: died with {proc.returncode}:\n{log.read_text()}"
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0, log.read_text()


def test_a_daemon_started_with_relative_paths_reloads_from_them(tmp_path: Path) -> None:
    (tmp_path / "rel.toml").write_text('[echo]\ntimestamp = "ctime"\n[daemon]\npid_file = "t.pid"\n')
    started = subprocess.run([*TSECHOD, "--daemon", "--config", "rel.toml", "--listen", "127.0.0.1:0",
                              "--log-target", "file", "--log-file", "rel.log"],
                             env=daemon_env(), cwd=tmp_path, capture_output=True, timeout=30)
    assert started.returncode == 0, started.stderr
    log = tmp_path / "rel.log"
    pid = int((tmp_path / "t.pid").read_text())
    try:
        (tmp_path / "rel.toml").write_text('[echo]\ntimestamp = "epoch"\n[daemon]\npid_file = "t.pid"\n')
        os.kill(pid, signal.SIGHUP)
        wait_until(lambda: "reloaded config: timestamp=epoch" in log.read_text())
        assert not Path("/rel.log").exists()
        assert "cannot read" not in log.read_text()
    finally:
        os.kill(pid, signal.SIGTERM)
    wait_until(lambda: not Path(f"/proc/{pid}").exists(), timeout=15)
    assert "tsecho.service: stopped" in log.read_text()


def test_many_listeners_stop_together_within_a_second(tsechod) -> None:
    d = tsechod("", listen=tuple(f"127.0.0.{n}:0" for n in range(1, 65)))
    assert len(set(d.addresses)) == 64
    started = time.monotonic()
    assert d.stop() == 0
    took = time.monotonic() - started
    print(f"\nFIGURES stop with 64 listeners: {took:.2f} s")
    assert took < 1.5  # one after another, each waited out a poll interval: 64 x 0.1-0.2 s


def test_an_unresolvable_listen_host_says_so(tmp_path: Path) -> None:
    proc = subprocess.run([*TSECHOD, "--listen", "no-such-host.invalid:8009"], env=daemon_env(),
                          cwd=tmp_path, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 1
    assert proc.stderr.strip().startswith("tsechod: cannot listen on no-such-host.invalid:8009: "
                                          "cannot resolve host 'no-such-host.invalid'"), proc.stderr
    assert "unknown error" not in proc.stderr.lower()


@pytest.fixture
def link_local_netns() -> str:
    """A network namespace of our own with a veth pair; d0 holds fe80::1 (no DAD)."""
    require_tool("ip")
    if os.geteuid() != 0:
        message = "network namespaces need root"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    name = f"tsecho-ll-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True, timeout=10)
    try:
        for command in ("ip link set lo up", "ip link add d0 type veth peer name d1", "ip link set d0 up",
                        "ip link set d1 up", "ip -6 addr add fe80::1/64 dev d0 nodad"):
            subprocess.run(["ip", "netns", "exec", name, *command.split()], check=True, timeout=10)
        yield name
    finally:
        subprocess.run(["ip", "netns", "delete", name], timeout=10, check=False)


def test_a_link_local_ipv6_address_with_a_zone_is_served(link_local_netns: str, tmp_path: Path) -> None:
    log = tmp_path / "ll.log"
    with open(log, "wb") as stderr:
        proc = subprocess.Popen(["ip", "netns", "exec", link_local_netns, *TSECHOD, "--listen", "[fe80::1%d0]:8009"],
                                stdin=subprocess.DEVNULL, stderr=stderr, env=daemon_env(), cwd=tmp_path)
    try:
        wait_until(lambda: "listening on" in log.read_text() or proc.poll() is not None)
        assert proc.poll() is None, log.read_text()
        assert "listening on [fe80::1%d0]:8009" in log.read_text()
        client = ("import socket, sys\n"
                  "sock = socket.create_connection(('fe80::1%d0', 8009), timeout=5)\n"
                  "sock.sendall(b'zone\\n'); sys.stdout.buffer.write(sock.recv(100))\n")
        reply = subprocess.run(["ip", "netns", "exec", link_local_netns, sys.executable, "-c", client],
                               capture_output=True, timeout=15)
        assert CTIME_REPLY.match(reply.stdout) and reply.stdout.endswith(b"] zone\n"), reply
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0


def test_a_reload_that_resets_many_keys_to_defaults_warns(tsechod) -> None:
    d = tsechod('[server]\nidle_timeout_s = 7\n[echo]\ntimestamp = "iso"\n[limits]\nmax_connections = 50\n'
                'line_timeout_s = 9\n')
    d.rewrite_config("")  # an editor that truncated the file, say
    d.send(signal.SIGHUP)
    [warning] = d.wait_for_log(r"WARNING tsecho.service: reload: (\d+) settings went back to their defaults "
                               r"\(([^)]*)\)")
    assert warning.group(1) == "4"
    assert warning.group(2) == "idle_timeout_s, timestamp, max_connections, line_timeout_s"
    d.wait_for_log(r"reloaded config: timestamp=ctime")


def test_a_fifo_config_with_no_writer_fails_at_start_and_is_refused_on_reload(tsechod, tmp_path: Path) -> None:
    fifo = tmp_path / "fifo.toml"
    os.mkfifo(fifo)
    started = time.monotonic()
    proc = subprocess.run([*TSECHOD, "check-config", "--config", str(fifo)], env=daemon_env(),
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 78
    assert proc.stderr.strip() == (f"tsechod: config error: {fifo}: cannot read: nothing more arrived within "
                                   "5 s (a FIFO with no writer?)")
    assert time.monotonic() - started < 10
    # On reload: refused at once; the main loop goes on, the running config stays.
    d = tsechod("")
    os.unlink(d.config_path)
    os.mkfifo(d.config_path)
    d.send(signal.SIGHUP)
    d.wait_for_log(r"reload failed, keeping the running config: config error: .*cannot read it again on reload: "
                   r"not a regular file \(a pipe or FIFO\)")
    d.send(signal.SIGHUP)
    d.wait_for_log(r"reload failed", count=2)
    assert CTIME_REPLY.match(ask(d.address))
