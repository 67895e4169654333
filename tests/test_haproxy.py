"""haproxy in front of tsechod: TLS termination, round robin over two instances with the PROXY
protocol (v2 and v1: the real client's address in the access log, per-client limits), health checks.

The haproxy configurations are the ``haproxy`` blocks of docs/tls-and-load-balancing.md; a
test changes only addresses (and, where it says so, one timeout), so the guide can't drift
from what runs. haproxy gets its listening socket from the test as an inherited fd
(``bind fd@N``): the port is bound before haproxy starts, so nothing can take it meanwhile,
and connections made before haproxy is ready wait in the socket's backlog.
"""

from __future__ import annotations

import csv
import os
import re
import select
import selectors
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers import CTIME_REPLY, REPO, connect_from, recv_all, recv_lines, require_tool, wait_until

GUIDE = REPO / "docs" / "tls-and-load-balancing.md"
PAYLOAD_BYTES = 14  # b"round trip 00\n": the access log line of a client, not of a health check
CLIENT_CLOSED_EOF = rf"(127\.0\.0\.1:\d+) closed reason=eof duration_s=\S+ lines=1 bytes_in={PAYLOAD_BYTES} "
VIA = r"bytes_out=\d+ via=(\S+)\n"  # what follows CLIENT_CLOSED_EOF behind a PROXY listener
HEALTH_CHECK = r"closed reason=\w+ duration_s=\S+ lines=1 bytes_in=1 "


def guide_block(marker: str) -> str:
    """The one ```haproxy block of the guide that contains *marker*."""
    blocks = re.findall(r"```haproxy\n(.*?)```", GUIDE.read_text(), re.S)
    [block] = [b for b in blocks if marker in b]
    return block


def substitute(text: str, replacements: dict[str, str]) -> str:
    """Replace each key by its value; each key must occur exactly once (no silent non-change)."""
    for old, new in replacements.items():
        assert text.count(old) == 1, f"{old!r} should occur once in:\n{text}"
        text = text.replace(old, new)
    return text


def address(daemon) -> str:
    host, port = daemon.address
    return f"{host}:{port}"


@dataclass
class HAProxy:
    """A haproxy in the foreground (-db); its stderr (log and warnings) goes to a file."""

    proc: subprocess.Popen[bytes]
    log_path: Path
    stats_path: Path
    port: int

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for_log(self, pattern: str, timeout: float = 15.0) -> re.Match[str]:
        regex = re.compile(pattern)

        def found() -> re.Match[str] | None:
            if match := regex.search(self.log_text()):
                return match
            if self.proc.poll() is not None:
                raise AssertionError(f"haproxy exited ({self.proc.returncode}) before logging {pattern!r}:\n"
                                     + self.log_text())
            return None

        return wait_until(found, timeout)  # type: ignore[return-value]

    def ask(self, payload: bytes, timeout: float = 10.0) -> bytes:
        """One client: connect, send one line, read the reply, close."""
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=timeout) as sock:
                sock.sendall(payload + b"\n")
                return recv_lines(sock, 1, timeout)[0]
        except OSError as err:
            raise AssertionError(f"no reply through haproxy ({err}); its log:\n{self.log_text()}") from err

    def server_stats(self, backend: str) -> dict[str, dict[str, str]]:
        """`show stat` from the stats socket: the backend's servers by name."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(5)
            sock.connect(str(self.stats_path))
            sock.sendall(b"show stat\n")
            text = recv_all(sock).decode()
        rows = csv.DictReader(text.removeprefix("# ").splitlines())
        return {row["svname"]: row for row in rows if row["pxname"] == backend and row["svname"] != "BACKEND"}

    def stop(self, timeout: float = 10.0) -> int:
        """Soft stop (SIGUSR1): haproxy closes its listener and exits once its connections are gone."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGUSR1)
        return self.proc.wait(timeout=timeout)


@pytest.fixture
def haproxy(tmp_path: Path) -> Iterator[Callable[[str], HAProxy]]:
    """Factory: ``haproxy(config_text)`` runs haproxy with the test's global section prepended.

    *config_text* must contain ``fd@LISTENER`` once; it becomes the fd of a socket this fixture
    bound on 127.0.0.1:0 and handed to haproxy. Every haproxy still running at the end is killed
    by its PID.
    """
    executable = require_tool("haproxy")
    started: list[HAProxy] = []

    def start(config_text: str) -> HAProxy:
        n = len(started)
        config_path, log_path = tmp_path / f"haproxy{n}.cfg", tmp_path / f"haproxy{n}.log"
        stats_path = tmp_path / f"haproxy{n}.sock"
        with socket.create_server(("127.0.0.1", 0)) as listener, open(log_path, "wb") as log:
            port = listener.getsockname()[1]
            config_path.write_text(
                "global\n"
                "    log stderr format raw local0 info\n"
                f"    stats socket {stats_path} mode 600 level admin\n\n"
                + substitute(config_text, {"fd@LISTENER": f"fd@{listener.fileno()}"}))
            proc = subprocess.Popen([executable, "-db", "-f", str(config_path)], pass_fds=(listener.fileno(),),
                                    stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)
        # Our copy of the listener is closed: only haproxy holds it now.
        proxy = HAProxy(proc, log_path, stats_path, port)
        started.append(proxy)
        return proxy

    yield start
    for proxy in started:
        if proxy.proc.poll() is None:
            proxy.proc.kill()
            proxy.proc.wait(timeout=10)


def start_pool(tsechod, haproxy, server_settings: str = "", defaults: dict[str, str] | None = None,
               tsechod_changes: dict[str, str] | None = None, haproxy_changes: dict[str, str] | None = None):
    """Two tsechod instances with the guide's config file (its listener on 127.0.0.1:0 instead),
    plus *server_settings* in a [server] table, and the guide's load-balancing haproxy in front."""
    [config_text] = [t for t in re.findall(r"```toml\n(.*?)```", GUIDE.read_text(), re.S) if "127.0.0.1:8010" in t]
    config_text = "[server]\n" + server_settings + substitute(
        config_text, {'address = "127.0.0.1:8010"': 'address = "127.0.0.1:0"', **(tsechod_changes or {})})
    first, second = tsechod(config_text, listen=()), tsechod(config_text, listen=())
    config = (substitute(guide_block("defaults\n"), defaults or {})
              + substitute(guide_block("frontend tsecho\n"), {"bind :8009\n": "bind fd@LISTENER\n",
                                                               "127.0.0.1:8010": address(first),
                                                               "127.0.0.1:8011": address(second),
                                                               **(haproxy_changes or {})}))
    return first, second, haproxy(config)


def assert_answered(reply: bytes, payload: bytes) -> None:
    assert CTIME_REPLY.match(reply), reply
    assert reply.endswith(b"] " + payload), reply


def test_haproxy_spreads_clients_over_two_instances_and_skips_a_stopped_one(tsechod, haproxy) -> None:
    nc = require_tool("nc")
    first, second, proxy = start_pool(tsechod, haproxy)

    def nc_ask(payload: bytes) -> bytes:
        out = subprocess.run([nc, "-N", "127.0.0.1", str(proxy.port)], input=payload + b"\n",
                             capture_output=True, timeout=10)
        assert out.returncode == 0, out
        return out.stdout.rstrip(b"\n")

    for i in range(20):
        payload = b"round trip %02d" % i
        assert_answered((proxy.ask if i % 2 else nc_ask)(payload), payload)
    # roundrobin, both up: strictly alternating
    assert len(first.wait_for_log(CLIENT_CLOSED_EOF, count=10)) == 10
    assert len(second.wait_for_log(CLIENT_CLOSED_EOF, count=10)) == 10
    # The guide's health check passes at layer 7: the ping line was answered with "[".
    wait_until(lambda: all(s["check_status"] == "L7OK" for s in proxy.server_stats("tsechod_pool").values()),
               timeout=15)
    # ... through the PROXY listener (check-send-proxy: a LOCAL header), and not at info in the log.
    assert not re.search(HEALTH_CHECK, first.log_text() + second.log_text())

    # Two clients stay connected, one on each instance (roundrobin); then the first instance stops.
    held = [socket.create_connection(("127.0.0.1", proxy.port), timeout=10) for _ in range(2)]
    try:
        for sock in held:
            sock.sendall(b"round trip 99\n")
            assert_answered(recv_lines(sock, 1)[0], b"round trip 99")
        first.send(signal.SIGTERM)
        # Its client gets a clean close through haproxy, leaves, and the instance exits; the other
        # client is still served.
        readable, _, _ = select.select(held, [], [], 10)
        assert len(readable) == 1 and recv_all(readable[0]) == b""
        readable[0].close()
        assert first.proc.wait(timeout=15) == 0  # not stop(): a second SIGTERM could land mid-exit
        first.wait_for_log(r"closed reason=shutdown duration_s=\S+ lines=1 bytes_in=14 ")
        [other] = [sock for sock in held if sock not in readable]
        other.sendall(b"round trip 98\n")
        assert_answered(recv_lines(other, 1)[0], b"round trip 98")
    finally:
        for sock in held:
            sock.close()
    noticed_early = "tsechod1 is DOWN" in proxy.log_text()
    for i in range(20, 30):  # the check needs 2 failures 2 s apart; meanwhile refused connects are retried
        payload = b"round trip %02d" % i
        assert_answered(proxy.ask(payload), payload)
    if not noticed_early:  # %rc = "+1": haproxy redispatched the connection to tsechod2
        assert re.search(r"tsechod_pool/tsechod2 \S+ \d+ -- \d+/\d+/\d+/\d+/\+1 ", proxy.log_text())
    proxy.wait_for_log(r"Server tsechod_pool/tsechod1 is DOWN, reason: Layer4 connection problem")
    assert proxy.server_stats("tsechod_pool")["tsechod1"]["status"] == "DOWN"
    for i in range(30, 40):
        payload = b"round trip %02d" % i
        assert_answered(proxy.ask(payload), payload)
    assert len(second.wait_for_log(CLIENT_CLOSED_EOF, count=30)) == 30
    assert "tsechod2 is DOWN" not in proxy.log_text()
    assert proxy.stop() == 0


def make_certificate(openssl: str, directory: Path) -> tuple[Path, Path]:
    """A self-signed certificate for CN=localhost: (cert.pem, haproxy's cert+key pem)."""
    cert, key, combined = directory / "cert.pem", directory / "key.pem", directory / "tsechod.pem"
    subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost",
                    "-days", "1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True, timeout=60)
    combined.write_bytes(cert.read_bytes() + key.read_bytes())
    return cert, combined


def read_line(fd: int, timeout: float) -> bytes:
    """Read from a pipe until a newline (or EOF); fail after *timeout* seconds."""
    data = b""
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as selector:
        selector.register(fd, selectors.EVENT_READ)
        while b"\n" not in data:
            if not selector.select(max(0.0, deadline - time.monotonic())):
                raise AssertionError(f"no line within {timeout} s; got {data!r}")
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            data += chunk
    return data


def test_haproxy_terminates_tls_for_openssl_s_client(tsechod, haproxy, tmp_path: Path) -> None:
    openssl = require_tool("openssl")
    daemon = tsechod()
    cert, combined = make_certificate(openssl, tmp_path)
    proxy = haproxy(guide_block("defaults\n")
                    + substitute(guide_block("frontend tsecho_tls\n"),
                                 {"bind :8443 ": "bind fd@LISTENER ",
                                  "/etc/haproxy/certs/tsechod.pem": str(combined),
                                  "127.0.0.1:8009": address(daemon)}))
    # -no_ign_eof: close when our stdin ends (-quiet alone would wait for the server to close).
    # -CAfile/-verify_return_error: the handshake fails unless haproxy presents our certificate.
    argv = [openssl, "s_client", "-quiet", "-no_ign_eof", "-connect", f"127.0.0.1:{proxy.port}",
            "-servername", "localhost", "-CAfile", str(cert), "-verify_return_error"]
    stderr_path = tmp_path / "s_client.stderr"
    with open(stderr_path, "wb") as stderr:
        client = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr, bufsize=0)
    try:
        assert client.stdin is not None and client.stdout is not None
        client.stdin.write(b"hello over tls\n")
        reply = read_line(client.stdout.fileno(), timeout=15)
        client.stdin.close()
        assert client.wait(timeout=10) == 0, stderr_path.read_text()
    finally:
        if client.poll() is None:
            client.kill()
            client.wait(timeout=10)
        for pipe in (client.stdin, client.stdout):
            if pipe is not None:
                pipe.close()
    assert CTIME_REPLY.match(reply), (reply, stderr_path.read_text(), proxy.log_text())
    assert reply.endswith(b"] hello over tls\n")
    assert "verify return:1" in stderr_path.read_text()

    # tsechod's peer is haproxy's side of the backend connection, and the client left normally.
    [match] = daemon.wait_for_log(r"(127\.0\.0\.1:\d+) closed reason=eof duration_s=\S+ lines=1 bytes_in=15 ")
    peer = match.group(1)
    line = proxy.wait_for_log(r"(\S+) \[[^]]+\] tsecho_tls~ tsechod_local/tsechod .* via=(\S+)\n")
    client_address, via = line.groups()
    assert via == peer and client_address != peer
    assert proxy.stop() == 0


def test_haproxy_terminates_tls_for_tsecho_tls(tsechod, haproxy, tmp_path: Path) -> None:
    """The guide's `tsecho --tls` command through its TLS frontend, -m and piped."""
    daemon = tsechod()
    cert, combined = make_certificate(require_tool("openssl"), tmp_path)
    proxy = haproxy(guide_block("defaults\n")
                    + substitute(guide_block("frontend tsecho_tls\n"),
                                 {"bind :8443 ": "bind fd@LISTENER ",
                                  "/etc/haproxy/certs/tsechod.pem": str(combined),
                                  "127.0.0.1:8009": address(daemon)}))
    client = [sys.executable, "-W", "error", "-m", "tsecho.client", "--tls", "--ca", str(cert),
              "--servername", "localhost", f"127.0.0.1:{proxy.port}"]
    result = subprocess.run([*client, "-m", "hello over tls"], capture_output=True, timeout=30)
    assert (result.returncode, result.stderr) == (0, b""), result
    assert_answered(result.stdout.rstrip(b"\n"), b"hello over tls")
    lines = [b"line %03d" % n for n in range(200)]
    result = subprocess.run(client, input=b"\n".join(lines) + b"\n", capture_output=True, timeout=30)
    assert (result.returncode, result.stderr) == (0, b""), result
    replies = result.stdout.split(b"\n")
    assert replies.pop() == b"" and len(replies) == len(lines)
    for reply, line in zip(replies, lines):
        assert_answered(reply, line)
    # The client's close_notify made haproxy close its backend connection: both ended with eof.
    daemon.wait_for_log(r"closed reason=eof duration_s=\S+ lines=1 bytes_in=15 ")
    daemon.wait_for_log(r"closed reason=eof duration_s=\S+ lines=200 bytes_in=1800 ")
    assert proxy.stop() == 0


def wait_for_either(daemons, pattern: str) -> re.Match[str]:
    """The first match of *pattern* in any of the daemons' logs (whichever one haproxy picked)."""
    def found() -> re.Match[str] | None:
        return next((m for d in daemons if (m := re.search(pattern, d.log_text()))), None)

    return wait_until(found)  # type: ignore[return-value]


def test_idle_timeout_below_haproxys_closes_idle_clients_with_reason_idle(tsechod, haproxy) -> None:
    """The guide's order: tsechod's idle_timeout_s fires first, a clean FIN reaches the client."""
    *daemons, proxy = start_pool(tsechod, haproxy, "idle_timeout_s = 1\n")
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
        sock.sendall(b"round trip 00\n")
        assert_answered(recv_lines(sock, 1)[0], b"round trip 00")
        assert recv_all(sock, timeout=10) == b""  # FIN, not a reset
    client, via = wait_for_either(daemons, CLIENT_CLOSED_EOF.replace("reason=eof", "reason=idle") + VIA).groups()
    proxy.wait_for_log(rf"{re.escape(client)} \S+ tsecho tsechod_pool/tsechod[12] \S+ \d+ -- .* via={re.escape(via)}\n")


def test_idle_timeout_above_haproxys_is_preempted_and_logged_as_eof(tsechod, haproxy) -> None:
    """The other order, as the guide warns: haproxy cuts first (cD) and tsechod logs eof, not idle."""
    *daemons, proxy = start_pool(tsechod, haproxy, defaults={"timeout client 10m": "timeout client 1s"})
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
        sock.sendall(b"round trip 00\n")
        assert_answered(recv_lines(sock, 1)[0], b"round trip 00")
        assert recv_all(sock, timeout=10) == b""
    client, via = wait_for_either(daemons, CLIENT_CLOSED_EOF + VIA).groups()
    proxy.wait_for_log(rf"{re.escape(client)} \S+ tsecho tsechod_pool/tsechod[12] \S+ \d+ cD .* via={re.escape(via)}\n")
    assert not any("reason=idle" in d.log_text() for d in daemons)


V1 = {"tsechod_changes": {'proxy_protocol = "v2"': 'proxy_protocol = "v1"'},
      "haproxy_changes": {"send-proxy-v2 check-send-proxy": "send-proxy check-send-proxy"}}


@pytest.mark.parametrize("changes", [{}, V1], ids=["send-proxy-v2", "send-proxy"])
def test_access_log_shows_the_real_client_and_health_checks_stay_out_of_it(tsechod, haproxy, changes) -> None:
    first, second, proxy = start_pool(tsechod, haproxy, **changes)
    clients = []
    for source in ("127.0.0.2", "127.0.0.3", "127.0.0.2", "127.0.0.3"):
        with connect_from(("127.0.0.1", proxy.port), source, timeout=10) as sock:
            sock.sendall(b"round trip 00\n")
            assert_answered(recv_lines(sock, 1, timeout=10)[0], b"round trip 00")
            clients.append(f"{source}:{sock.getsockname()[1]}")
    lines = {}
    for daemon in (first, second):
        for match in daemon.wait_for_log(rf"(127\.0\.0\.[23]:\d+) closed reason=eof \S+ lines=1 bytes_in=14 {VIA}",
                                         count=2):
            lines[match.group(1)] = match
    assert sorted(lines) == sorted(clients)  # round robin: two each; each client under its own address
    for client, match in lines.items():  # haproxy's log has the same client and the same backend side
        seen = proxy.wait_for_log(rf"{re.escape(client)} \[[^]]+\] tsecho tsechod_pool/tsechod[12] .* "
                                  rf"via={re.escape(match.group(2))}\n")
    wait_until(lambda: all(s["check_status"] == "L7OK" for s in proxy.server_stats("tsechod_pool").values()),
               timeout=15)
    for daemon in (first, second):
        log = daemon.log_text()
        assert not re.search(r"127\.0\.0\.1:\d+ closed", log), log  # no health check, no proxy address
        assert "Traceback" not in log
    print(f"\nhaproxy: {seen.group(0).rstrip()}\ntsechod: {match.group(0).rstrip()}")  # for the record
    assert proxy.stop() == 0


def test_per_address_limit_bites_per_client_not_per_proxy(tsechod, haproxy) -> None:
    first, second, proxy = start_pool(
        tsechod, haproxy, tsechod_changes={"max_connections_per_ip = 64": "max_connections_per_ip = 1"})
    held = []
    try:
        # roundrobin: A on 1, A on 2, B on 1, B on 2: each instance holds two clients, all from haproxy's address
        for source in ("127.0.0.2", "127.0.0.2", "127.0.0.3", "127.0.0.3"):
            sock = connect_from(("127.0.0.1", proxy.port), source, timeout=10)
            held.append(sock)
            sock.sendall(b"round trip 00\n")
            assert_answered(recv_lines(sock, 1, timeout=10)[0], b"round trip 00")
        # A's third connection lands on an instance where A already has one
        with connect_from(("127.0.0.1", proxy.port), "127.0.0.2", timeout=10) as sock:
            sock.sendall(b"round trip 01\n")
            assert recv_all(sock, timeout=10) == b"ERR too many connections from your address\n"
    finally:
        for sock in held:
            sock.close()
    assert proxy.stop() == 0
