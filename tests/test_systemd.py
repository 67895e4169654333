"""tsecho.systemd against real sockets: sd_notify datagrams and inherited listening fds.

No mocks: the notify tests bind real AF_UNIX datagram sockets (a path under tmp_path and an
abstract one), and the activation tests start a real child process whose fds 3.. are real
listening sockets, with LISTEN_PID set to its own PID by a wrapper that then execs.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tsecho import systemd

TIMEOUT_S = 10


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[tuple[str, socket.socket]]:
    """A bound datagram socket like systemd's, with sender credentials switched on."""
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        sock.settimeout(TIMEOUT_S)
        yield str(path), sock


def recv_with_pid(sock: socket.socket) -> tuple[str, int]:
    """One datagram and the PID of the process that sent it (SCM_CREDENTIALS)."""
    data, ancdata, _flags, _addr = sock.recvmsg(4096, socket.CMSG_SPACE(struct.calcsize("3i")))
    pids = [
        struct.unpack("3i", cdata)[0]
        for level, kind, cdata in ancdata
        if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS
    ]
    assert len(pids) == 1
    return data.decode(), pids[0]


def test_notify_sends_the_message_to_a_path_socket(notify_socket) -> None:
    path, sock = notify_socket
    assert systemd.notify("READY=1", environ={"NOTIFY_SOCKET": path}) is True
    assert recv_with_pid(sock) == ("READY=1", os.getpid())


def test_notify_sends_multi_line_messages_in_one_datagram(notify_socket) -> None:
    path, sock = notify_socket
    message = systemd.reloading_message()
    assert systemd.notify(message, environ={"NOTIFY_SOCKET": path})
    text, _pid = recv_with_pid(sock)
    assert text == message
    reloading, usec = text.split("\n")
    assert reloading == "RELOADING=1"
    assert usec.startswith("MONOTONIC_USEC=") and int(usec.removeprefix("MONOTONIC_USEC=")) > 0


def test_notify_reaches_an_abstract_socket() -> None:
    name = f"tsecho-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(b"\0" + name.encode())
        sock.settimeout(TIMEOUT_S)
        assert systemd.notify("STATUS=2 connections, 5 lines, 0 refused", {"NOTIFY_SOCKET": "@" + name})
        assert sock.recv(4096) == b"STATUS=2 connections, 5 lines, 0 refused"


def test_child_process_readiness_arrives_from_the_child_pid(notify_socket) -> None:
    path, sock = notify_socket
    code = "import sys\nfrom tsecho import systemd\nsys.exit(0 if systemd.notify('READY=1') else 3)"
    env = {**os.environ, "NOTIFY_SOCKET": path}
    with subprocess.Popen([sys.executable, "-c", code], env=env) as child:
        assert recv_with_pid(sock) == ("READY=1", child.pid)
        assert child.wait(timeout=TIMEOUT_S) == 0


@pytest.mark.parametrize("environ", [{}, {"NOTIFY_SOCKET": ""}, {"NOTIFY_SOCKET": "vsock:2:1234"}])
def test_notify_is_a_no_op_without_a_usable_notify_socket(environ) -> None:
    assert systemd.notify("READY=1", environ=environ) is False


def test_notify_returns_false_when_nobody_listens(tmp_path: Path) -> None:
    assert systemd.notify("READY=1", environ={"NOTIFY_SOCKET": str(tmp_path / "gone")}) is False


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({}, None),
        ({"WATCHDOG_USEC": "30000000"}, 30.0),
        ({"WATCHDOG_USEC": "500000", "WATCHDOG_PID": str(os.getpid())}, 0.5),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "me"}, None),
    ],
)
def test_watchdog_interval_follows_watchdog_usec_and_pid(environ, expected) -> None:
    assert systemd.watchdog_interval_s(environ) == expected


def test_monotonic_usec_is_clock_monotonic_in_microseconds() -> None:
    before = time.monotonic_ns() // 1000
    now = systemd.monotonic_usec()
    after = time.monotonic_ns() // 1000
    assert before <= now <= after


def test_listen_fds_without_activation_returns_nothing() -> None:
    environ = {"PATH": "/usr/bin"}
    assert systemd.listen_fds(environ) == []
    assert environ == {"PATH": "/usr/bin"}


def test_listen_fds_for_another_pid_returns_nothing_and_unsets_the_variables() -> None:
    environ = {"LISTEN_PID": str(os.getpid() + 1), "LISTEN_FDS": "2", "LISTEN_FDNAMES": "a:b", "X": "1"}
    assert systemd.listen_fds(environ) == []
    assert environ == {"X": "1"}


@pytest.mark.parametrize(
    ("fds", "names", "message"),
    [
        ("two", None, "not numbers"),
        ("-1", None, "negative"),
        ("2", "only-one", "has 1 names for LISTEN_FDS=2"),
    ],
)
def test_malformed_activation_variables_are_an_error(fds, names, message) -> None:
    environ = {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": fds}
    if names is not None:
        environ["LISTEN_FDNAMES"] = names
    with pytest.raises(systemd.SocketActivationError, match=message):
        systemd.listen_fds(environ)
    assert environ == {}


# The child: takes the sockets, reports what it got, then serves one connection on each so the
# parent can prove they are the very listening sockets it passed.
CHILD = r"""
import json, os, socket, sys
from tsecho import systemd
named = systemd.listen_fds_with_names(os.environ)
report = {
    "names": [name for name, _ in named],
    "fds": [sock.fileno() for _, sock in named],
    "families": [int(sock.family) for _, sock in named],
    "addresses": [list(sock.getsockname())[:2] for _, sock in named],
    "inheritable": [os.get_inheritable(sock.fileno()) for _, sock in named],
    "env_left": sorted(k for k in os.environ if k.startswith("LISTEN_")),
}
print(json.dumps(report), flush=True)
for _, sock in named:
    sock.settimeout(10)
    conn, _ = sock.accept()
    with conn:
        conn.sendall(b"hello from " + str(sock.fileno()).encode())
"""

# The wrapper plays systemd's part: moves the inherited sockets to fds 3.., sets LISTEN_PID to
# its own PID and execs the child, which keeps that PID.
WRAPPER = r"""
import fcntl, os, sys
names, sources = sys.argv[1], [int(fd) for fd in sys.argv[2].split(",")]
high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 100) for fd in sources]
for i, fd in enumerate(high):
    os.dup2(fd, 3 + i, inheritable=True)
    os.close(fd)
os.environ["LISTEN_PID"] = str(os.getpid())
os.environ["LISTEN_FDS"] = str(len(high))
if names:
    os.environ["LISTEN_FDNAMES"] = names
os.execv(sys.argv[3], sys.argv[3:])
"""


def listening(family: socket.AddressFamily, host: str) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.bind((host, 0))
    sock.listen(8)
    return sock


def has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.parametrize("names", ["tsechod:tsechod", ""])
def test_listen_fds_takes_over_inherited_listening_sockets(names) -> None:
    family6 = socket.AF_INET6 if has_ipv6_loopback() else socket.AF_INET
    host6 = "::1" if family6 == socket.AF_INET6 else "127.0.0.1"
    with listening(socket.AF_INET, "127.0.0.1") as four, listening(family6, host6) as six:
        passed = [four, six]
        fds = ",".join(str(s.fileno()) for s in passed)
        env = {k: v for k, v in os.environ.items() if not k.startswith("LISTEN_")}
        with subprocess.Popen(
            [sys.executable, "-c", WRAPPER, names, fds, sys.executable, "-c", CHILD],
            pass_fds=[s.fileno() for s in passed],
            stdout=subprocess.PIPE,
            env=env,
        ) as child:
            assert child.stdout is not None
            report = json.loads(child.stdout.readline())
            assert report == {
                "names": ["tsechod", "tsechod"] if names else ["unknown", "unknown"],
                "fds": [3, 4],
                "families": [int(socket.AF_INET), int(family6)],
                "addresses": [list(s.getsockname())[:2] for s in passed],
                "inheritable": [False, False],
                "env_left": [],
            }
            for fd, sock in zip((3, 4), passed):
                with socket.create_connection(sock.getsockname()[:2], timeout=TIMEOUT_S) as client:
                    assert client.recv(100) == f"hello from {fd}".encode()
            assert child.wait(timeout=TIMEOUT_S) == 0


def test_listen_fds_refuses_an_fd_that_is_not_a_socket() -> None:
    code = (
        "import os, sys\nfrom tsecho import systemd\n"
        "try:\n    systemd.listen_fds(os.environ)\n"
        "except systemd.SocketActivationError as err:\n    print(err); sys.exit(0)\n"
        "sys.exit(5)\n"
    )
    read_end, write_end = os.pipe()
    try:
        proc = subprocess.run(
            [sys.executable, "-c", WRAPPER, "", str(read_end), sys.executable, "-c", code],
            pass_fds=[read_end],
            capture_output=True,
            text=True,
            timeout=TIMEOUT_S,
        )
    finally:
        os.close(read_end)
        os.close(write_end)
    assert proc.returncode == 0, proc.stderr
    assert "fd 3 is not a socket" in proc.stdout


# --- the daemon speaks both protocols (what tsechod.service relies on) ---------------------------


def recv_messages(sock: socket.socket, until: str, timeout: float = TIMEOUT_S) -> list[tuple[str, int]]:
    """Datagrams (with sender PID) up to and including the first that starts with *until*."""
    got: list[tuple[str, int]] = []
    deadline = time.monotonic() + timeout
    while not got or not got[-1][0].startswith(until):
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            got.append(recv_with_pid(sock))
        except TimeoutError:
            raise AssertionError(f"no {until!r} within {timeout} s; got {got}") from None
    return got


def daemon_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("LISTEN_", "NOTIFY_", "WATCHDOG_", "TSECHOD_", "JOURNAL_")) and k != "INVOCATION_ID"}
    return {**env, **extra}


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    path = tmp_path / "tsechod.toml"
    path.write_text('[server]\nlisten = ["127.0.0.1:0"]\n')
    return path


DAEMON = [sys.executable, "-m", "tsecho.cli"]


def test_daemon_notifies_ready_status_reloading_and_stopping(notify_socket, config_file: Path) -> None:
    path, sock = notify_socket
    with subprocess.Popen([*DAEMON, "--config", str(config_file)], env=daemon_env(NOTIFY_SOCKET=path),
                          stderr=subprocess.DEVNULL) as proc:
        try:
            got = recv_messages(sock, "READY=1")
            assert {pid for _, pid in got} == {proc.pid}  # NotifyAccess=main: only the main process
            got = recv_messages(sock, "STATUS=")
            assert re.fullmatch(r"STATUS=\d+ connections, \d+ lines, \d+ refused", got[-1][0])

            proc.send_signal(signal.SIGHUP)
            got = recv_messages(sock, "RELOADING=1")
            reloading = got[-1][0].split("\n")
            assert reloading[0] == "RELOADING=1"
            usec = int(reloading[1].removeprefix("MONOTONIC_USEC="))
            assert 0 < usec <= systemd.monotonic_usec()
            assert recv_messages(sock, "READY=1")[-1][1] == proc.pid

            proc.send_signal(signal.SIGTERM)
            assert recv_messages(sock, "STOPPING=1")[-1][1] == proc.pid
            assert proc.wait(timeout=TIMEOUT_S) == 0
        finally:
            proc.kill()


def test_daemon_pings_the_watchdog(notify_socket, config_file: Path) -> None:
    path, sock = notify_socket
    env = daemon_env(NOTIFY_SOCKET=path, WATCHDOG_USEC="900000")
    with subprocess.Popen([*DAEMON, "--config", str(config_file)], env=env, stderr=subprocess.DEVNULL) as proc:
        try:
            recv_messages(sock, "READY=1")
            started = time.monotonic()
            for _ in range(3):  # three pings, each within the 0.9 s the watchdog allows
                recv_messages(sock, "WATCHDOG=1", timeout=0.9)
            assert time.monotonic() - started < 3 * 0.9
        finally:
            proc.terminate()
            proc.wait(timeout=TIMEOUT_S)


def test_daemon_serves_on_the_sockets_systemd_passes(config_file: Path) -> None:
    with listening(socket.AF_INET, "127.0.0.1") as passed:
        address = "%s:%d" % passed.getsockname()[:2]
        with subprocess.Popen(
            [sys.executable, "-c", WRAPPER, "tsechod", str(passed.fileno()), *DAEMON, "--config", str(config_file)],
            pass_fds=[passed.fileno()], env=daemon_env(), stderr=subprocess.PIPE, text=True,
        ) as proc:
            try:
                assert proc.stderr is not None
                line = ""
                while "listening on" not in line:
                    line = proc.stderr.readline()
                    assert line, "tsechod exited before listening"
                assert f"listening on {address} (socket activation)" in line
                with socket.create_connection(passed.getsockname()[:2], timeout=TIMEOUT_S) as client:
                    client.sendall(b"activated\n")
                    reply = b""
                    while not reply.endswith(b"\n"):
                        chunk = client.recv(4096)
                        assert chunk, reply
                        reply += chunk
                    assert reply.endswith(b"] activated\n")
                proc.terminate()
                rest = proc.communicate(timeout=TIMEOUT_S)[1]
                assert "listening on" not in rest  # the config's own listen (port 0) was not bound too
                assert proc.returncode == 0
            finally:
                proc.kill()


def test_daemon_reports_broken_activation_in_one_line(config_file: Path) -> None:
    code = "import os, sys\nos.environ['LISTEN_PID'] = str(os.getpid())\nos.execv(sys.argv[1], sys.argv[1:])"
    proc = subprocess.run(
        [sys.executable, "-c", code, *DAEMON, "--config", str(config_file)],
        env=daemon_env(LISTEN_FDS="two"), capture_output=True, text=True, timeout=TIMEOUT_S,
    )
    assert proc.returncode == 1
    assert proc.stderr.splitlines()[-1].startswith("tsechod: socket activation: ")
    assert "Traceback" not in proc.stderr
