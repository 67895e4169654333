"""PROXY listeners, access rules and the connection rate, against a real tsechod over raw sockets.

Covers: malformed headers (each closed without a reply and logged once; the
daemon serves on), a header on a plain listener echoed as data, a header
dripped under the deadline and one that misses it, untrusted peers refused or
served direct, v2 TLVs and health checks in the log, rules and rate from
several loopback source addresses and ::1, per-address limits per client
behind one proxy, a reload that changes verdicts for new connections only,
socket activation by FileDescriptorName=, workers, and ``check-access``.
HAProxy and nginx in front are in tests/test_proxy_peers.py.
"""

from __future__ import annotations

import ipaddress
import json
import re
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

from conftest import Daemon, daemon_env
from helpers import CTIME_REPLY, connect_from, read_to_end, recv_lines

from tsecho.proxyproto import V2_SIGNATURE

HEADER_V1 = b"PROXY TCP4 192.0.2.7 127.0.0.1 5555 8009\r\n"


def v2_header(source: str = "203.0.113.7", port: int = 51544, command: int = 1, tlvs: bytes = b"") -> bytes:
    body = b""
    if command == 1:
        body = (ipaddress.IPv4Address(source).packed + ipaddress.IPv4Address("127.0.0.1").packed
                + struct.pack("!HH", port, 8009))
    body += tlvs
    family = 0x11 if command == 1 else 0x00
    return V2_SIGNATURE + bytes([0x20 | command, family]) + struct.pack("!H", len(body)) + body


def tlv(kind: int, value: bytes) -> bytes:
    return struct.pack("!BH", kind, len(value)) + value


def config(*, listener: str = "", extra: str = "") -> str:
    """A plain listener, then a PROXY listener trusting 127.0.0.1 (both on port 0)."""
    return (f"{extra}\n"
            '[[listener]]\naddress = "127.0.0.1:0"\n\n'
            '[[listener]]\naddress = "127.0.0.2:0"\nproxy_protocol = "any"\nproxy_trusted = ["127.0.0.1"]\n'
            f"{listener}\n")


def start(tsechod, text: str, count: int = 2, args: tuple[str, ...] = ()) -> Daemon:
    d: Daemon = tsechod(text, *args, listen=(), wait=False)
    d.addresses = [m.group(1) for m in d.wait_for_log(r"listening on (\S+)", count=count)]
    return d


def address(d: Daemon, index: int) -> tuple[str, int]:
    host, _, port = d.addresses[index].rpartition(":")
    return host.strip("[]"), int(port)


def ask(d: Daemon, index: int, payload: bytes, source: str = "127.0.0.1") -> tuple[bytes, int]:
    """Send *payload* from *source*, half-close, read everything; return the bytes and our port."""
    with connect_from(address(d, index), source) as sock:
        port = sock.getsockname()[1]
        try:
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)
        except OSError:  # refused at once: the server closed with our bytes unread, so it reset
            pass
        data, _ = read_to_end(sock)
        return data, port


def refused(d: Daemon, index: int, source: str) -> bytes:
    """Connect from *source* and read without sending (a refusal at accept can't race our bytes)."""
    with connect_from(address(d, index), source) as sock:
        data, how = read_to_end(sock)
        assert how == "fin", (data, how)
        return data


def port_of(sock: socket.socket | int) -> int:
    return sock if isinstance(sock, int) else sock.getsockname()[1]


MALFORMED = {
    "http": b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
    "bad-v1-address": b"PROXY TCP4 192.0.2 127.0.0.1 1 2\r\nhello\n",
    "bad-v1-port": b"PROXY TCP4 192.0.2.1 127.0.0.1 99999 2\r\nhello\n",
    "v1-bare-lf": b"PROXY TCP4 192.0.2.1 127.0.0.1 1 2\nhello\n",
    "v1-no-crlf": b"PROXY " + b"x" * 120,
    "v1-cut-short": b"PROXY TCP4 192.0.2.1",
    "v2-wrong-signature": V2_SIGNATURE[:8] + b"XXXX" + b"\x21\x11\x00\x0c",
    "v2-wrong-version": V2_SIGNATURE + b"\x31\x11\x00\x0c" + b"\0" * 12,
    "v2-over-cap": V2_SIGNATURE + b"\x21\x11\x10\x01",
    "v2-cut-short": V2_SIGNATURE + b"\x21\x11\x00\x0c" + b"\0" * 5,
}


def test_malformed_headers_are_closed_without_reply_logged_once_and_the_daemon_serves_on(tsechod) -> None:
    d = start(tsechod, config())
    ports = {}
    for name, payload in MALFORMED.items():
        data, sock = ask(d, 1, payload)
        assert data == b"", name
        ports[name] = port_of(sock)
    d.wait_for_log(r"closed reason=proxy-invalid", count=len(MALFORMED))
    log = d.log_text()
    for name, port in ports.items():
        lines = [line for line in log.splitlines() if f"127.0.0.1:{port} closed" in line]
        assert len(lines) == 1, (name, lines)
        assert "reason=proxy-invalid" in lines[0] and " detail=" in lines[0], (name, lines)
    # the daemon is unaffected: a good header is served, and a header on the plain listener is data
    data, _ = ask(d, 1, HEADER_V1 + b"after\n")
    assert data.endswith(b"] after\n") and CTIME_REPLY.match(data)
    data, _ = ask(d, 0, HEADER_V1)
    assert data.endswith(b"] " + HEADER_V1.rstrip(b"\n")  + b"\n") or data.endswith(b"] " + HEADER_V1)
    assert b"PROXY TCP4 192.0.2.7" in data
    assert "Traceback" not in d.log_text()


def test_header_dripped_under_the_deadline_is_served_and_a_late_one_times_out(tsechod) -> None:
    d = start(tsechod, config(extra="[server]\nproxy_header_timeout_s = 1.5\n"))
    with connect_from(address(d, 1)) as sock:
        for byte in HEADER_V1:  # 42 segments, 10 ms apart: 0.4 s, under the 1.5 s deadline
            sock.sendall(bytes([byte]))
            time.sleep(0.01)
        sock.sendall(b"dripped\n")
        [reply] = recv_lines(sock, 1)
        assert reply.endswith(b"] dripped")
        proxy_port = port_of(sock)
    d.wait_for_log(rf"192\.0\.2\.7:5555 closed reason=eof \S+ lines=1 bytes_in=8 \S+ via=127\.0\.0\.1:{proxy_port}\n")

    with connect_from(address(d, 1)) as sock:
        sock.sendall(b"PROXY TCP4 ")
        started = time.monotonic()
        data, how = read_to_end(sock, timeout=5)
        waited = time.monotonic() - started
        late_port = port_of(sock)
    assert (data, how) == (b"", "fin")
    assert 1.3 < waited < 3.0, waited
    d.wait_for_log(rf"127\.0\.0\.1:{late_port} closed reason=proxy-timeout duration_s=1\.\d+ lines=0 bytes_in=11 ")


def test_untrusted_peer_is_refused_or_served_direct_as_the_config_says(tsechod) -> None:
    d = start(tsechod, config())
    data, sock = ask(d, 1, HEADER_V1 + b"hello\n", source="127.0.0.3")
    assert data == b""
    d.wait_for_log(rf"127\.0\.0\.3:{port_of(sock)} closed reason=proxy-untrusted ")

    d.rewrite_config(config(listener='proxy_untrusted = "direct"'))
    d.send(signal.SIGHUP)
    d.wait_for_log(r"reloaded config")
    data, sock = ask(d, 1, HEADER_V1 + b"hello\n", source="127.0.0.3")
    assert b"] PROXY TCP4 192.0.2.7" in data and data.endswith(b"] hello\n")  # its header is only data
    line = d.wait_for_log(rf"127\.0\.0\.3:{port_of(sock)} closed reason=eof .*")[0].group(0)
    assert "via=" not in line
    data, _ = ask(d, 1, HEADER_V1 + b"trusted\n")  # the trusted proxy still sends a header
    assert data.endswith(b"] trusted\n") and b"PROXY" not in data


def test_json_log_has_peer_via_and_tlvs_and_health_checks_stay_at_debug(tsechod) -> None:
    d = start(tsechod, config(extra='[log]\nlog_format = "json"\n'))
    tlvs = tlv(0x02, b"echo.example") + tlv(0x01, b"h2") + tlv(0xEA, b"\x01vpce-08d2bf15fac5001c9")
    data, v2_port = ask(d, 1, v2_header(tlvs=tlvs) + b"v2\n")
    assert data.endswith(b"] v2\n")
    ask(d, 1, v2_header(command=0) + b"local\n")  # a v2 LOCAL health check: served
    ask(d, 1, b"")  # connect and close: a health check too
    with connect_from(address(d, 1)) as sock:  # haproxy's v1 check: a header naming the proxy itself
        sock.sendall(b"PROXY TCP4 127.0.0.1 127.0.0.2 %d 8009\r\n" % port_of(sock))
        sock.shutdown(socket.SHUT_WR)
        assert read_to_end(sock)[0] == b""
    d.wait_for_log(r'"peer": "203\.0\.113\.7:51544"')
    d.stop()
    events = [json.loads(line) for line in d.log_text().splitlines() if '"event": "access"' in line]
    assert events == [e for e in events if e["peer"] == "203.0.113.7:51544"], events  # health checks: not at info
    [event] = events
    assert event["via"] == f"127.0.0.1:{v2_port}"
    assert (event["authority"], event["alpn"], event["aws_vpce_id"]) == ("echo.example", "h2", "vpce-08d2bf15fac5001c9")


def test_health_checks_are_logged_at_debug_and_take_no_per_address_slot(tsechod) -> None:
    d = start(tsechod, config(extra="[log]\nlog_level = \"debug\"\n[limits]\nmax_connections_per_ip = 1\n"))
    held = [connect_from(address(d, 1)) for _ in range(2)]  # two open health checks from the same proxy
    try:
        for sock in held:
            sock.sendall(v2_header(command=0) + b"check\n")
            assert recv_lines(sock, 1)[0].endswith(b"] check")
        data, _ = ask(d, 1, HEADER_V1 + b"client\n")
        assert data.endswith(b"] client\n")
    finally:
        for sock in held:
            sock.close()
    d.wait_for_log(r"127\.0\.0\.1:\d+ closed reason=eof \S+ lines=1 \S+ \S+ health-check", count=2)


def test_per_address_limit_bites_per_client_behind_one_proxy(tsechod) -> None:
    d = start(tsechod, config(extra="[limits]\nmax_connections_per_ip = 1\n"))
    first = [connect_from(address(d, 1)) for _ in range(2)]
    try:
        for sock, client in zip(first, (b"192.0.2.10", b"192.0.2.11")):
            sock.sendall(HEADER_V1.replace(b"192.0.2.7", client) + b"in\n")
            assert recv_lines(sock, 1)[0].endswith(b"] in")
        data, _ = ask(d, 1, HEADER_V1.replace(b"192.0.2.7", b"192.0.2.10") + b"again\n")
        assert data == b"ERR too many connections from your address\n"
    finally:
        for sock in first:
            sock.close()


def test_rules_and_rate_apply_per_source_address_and_reload_changes_new_connections_only(tsechod) -> None:
    text = ('[access]\nrules = ["deny 127.0.0.3", "deny ::1", "deny 192.0.2.66", "allow all"]\n'
            "[limits]\nconnection_rate_per_ip = 0.5\nconnection_burst_per_ip = 2\n")
    d = start(tsechod, config(extra=text), args=("--listen", "[::1]:0"), count=3)
    plain = address(d, 1)  # the --listen address comes first
    assert ask(d, 1, b"hi\n", source="127.0.0.2")[0].endswith(b"] hi\n")
    assert refused(d, 1, "127.0.0.3") == b""  # denied: not a word
    with socket.create_connection(address(d, 0), timeout=5) as six:  # [::1]
        assert read_to_end(six) == (b"", "fin")
    # rate: a burst of 2, then 0.5 a second; 127.0.0.4's third try is over, 127.0.0.5 is not affected
    replies = [ask(d, 1, b"r\n", source="127.0.0.4")[0] for _ in range(2)]
    assert all(r.endswith(b"] r\n") for r in replies)
    assert refused(d, 1, "127.0.0.4") == b"ERR too many connections from your address\n"
    assert ask(d, 1, b"r\n", source="127.0.0.5")[0].endswith(b"] r\n")
    # behind the PROXY listener the client's address decides, not the proxy's
    assert ask(d, 2, HEADER_V1.replace(b"192.0.2.7", b"192.0.2.66") + b"x\n")[0] == b""
    assert ask(d, 2, HEADER_V1 + b"x\n")[0].endswith(b"] x\n")

    live = connect_from(plain, "127.0.0.2")
    try:
        live.sendall(b"before\n")
        assert recv_lines(live, 1)[0].endswith(b"] before")
        d.rewrite_config(config(extra='[access]\nrules = ["deny 127.0.0.2"]\n'))
        d.send(signal.SIGHUP)
        d.wait_for_log(r"reloaded config: .* rules=1 connection_rate_per_ip=0")
        live.sendall(b"after\n")  # the live connection is not re-checked
        assert recv_lines(live, 1)[0].endswith(b"] after")
        assert refused(d, 1, "127.0.0.2") == b""
        assert ask(d, 1, b"new\n", source="127.0.0.3")[0].endswith(b"] new\n")
        assert all(ask(d, 1, b"r\n", source="127.0.0.4")[0].endswith(b"] r\n") for _ in range(3))  # rate off
    finally:
        live.close()
    assert d.stop() == 0
    summaries = re.findall(r"refused (\d+) connections in the last", d.log_text())
    assert sum(map(int, summaries)) == 5  # 127.0.0.3, ::1, the rate, 192.0.2.66, then 127.0.0.2


def test_workers_serve_proxy_listeners(tsechod) -> None:
    d = start(tsechod, config(extra="[server]\nworkers = 2\n"))
    d.wait_for_log(r"2 workers ready")
    for n in range(4):
        data, _ = ask(d, 1, HEADER_V1 + b"w%d\n" % n)
        assert data.endswith(b"] w%d\n" % n)
    d.wait_for_log(r"192\.0\.2\.7:5555 closed reason=eof .* via=127\.0\.0\.1:\d+", count=4)


ACTIVATE = r"""
import os, sys
fds = [int(fd) for fd in sys.argv[2].split(",")]
for i, fd in enumerate(fds):
    os.dup2(fd, 100 + i, inheritable=True)
for i in range(len(fds)):
    os.dup2(100 + i, 3 + i, inheritable=True)
os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS=str(len(fds)), LISTEN_FDNAMES=sys.argv[1])
os.execv(sys.argv[3], sys.argv[3:])
"""


def activated(tmp_path: Path, text: str, names: str, socks: list[socket.socket]) -> subprocess.Popen[str]:
    path = tmp_path / "activated.toml"
    path.write_text(text)
    fds = [s.fileno() for s in socks]
    return subprocess.Popen(
        [sys.executable, "-c", ACTIVATE, names, ",".join(map(str, fds)), sys.executable, "-m", "tsecho.cli",
         "--config", str(path)], pass_fds=fds, env=daemon_env(), stderr=subprocess.PIPE, text=True,
    )


def bound() -> socket.socket:
    sock = socket.create_server(("127.0.0.1", 0))
    return sock


def test_socket_activation_gives_each_socket_its_listener_by_name_and_refuses_an_unmatched_one(tmp_path: Path) -> None:
    text = ('[[listener]]\naddress = "127.0.0.1:8009"\nname = "direct"\n\n'
            '[[listener]]\naddress = "127.0.0.1:8010"\nname = "lb"\nproxy_protocol = "v1"\n'
            'proxy_trusted = ["127.0.0.1"]\n')
    with bound() as direct, bound() as lb:
        proc = activated(tmp_path, text, "lb:direct", [lb, direct])
        try:
            assert proc.stderr is not None
            lines = [proc.stderr.readline() for _ in range(2)]
            assert all("(socket activation)" in line for line in lines), lines
            assert any("(PROXY v1 from 127.0.0.1/32)" in line for line in lines), lines
            with socket.create_connection(lb.getsockname(), timeout=5) as sock:
                sock.sendall(HEADER_V1 + b"via lb\n")
                assert recv_lines(sock, 1)[0].endswith(b"] via lb")
            with socket.create_connection(direct.getsockname(), timeout=5) as sock:
                sock.sendall(HEADER_V1)
                assert b"] PROXY TCP4" in recv_lines(sock, 1)[0]
        finally:
            proc.terminate()
            proc.communicate(timeout=15)
        proc = activated(tmp_path, text, "tsechod.socket", [lb])
        _, err = proc.communicate(timeout=15)
    assert proc.returncode == 1
    last = err.splitlines()[-1]
    assert last.startswith("tsechod: socket activation: the socket named 'tsechod.socket' on 127.0.0.1:"), err
    assert "matches no [[listener]]" in last and "FileDescriptorName=" in last


def check_access(tmp_path: Path, address: str, text: str = '[access]\nrules = ["allow 10.0.0.0/8", "deny all"]\n'
                 ) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "access.toml"
    path.write_text(text)
    return subprocess.run([sys.executable, "-m", "tsecho.cli", "check-access", address, "--config", str(path)],
                          capture_output=True, text=True, timeout=30, env=daemon_env())


def test_check_access_prints_the_verdict_and_rule_with_its_exit_code(tmp_path: Path) -> None:
    allowed = check_access(tmp_path, "10.1.2.3")
    assert (allowed.returncode, allowed.stdout) == (0, '10.1.2.3: allowed by rules[0] "allow 10.0.0.0/8"\n')
    mapped = check_access(tmp_path, "::ffff:10.1.2.3")
    assert (mapped.returncode, mapped.stdout) == (0, '::ffff:10.1.2.3 (as 10.1.2.3): allowed by rules[0] "allow 10.0.0.0/8"\n')
    denied = check_access(tmp_path, "2001:db8::1")
    assert (denied.returncode, denied.stdout) == (1, '2001:db8::1: denied by rules[1] "deny all"\n')
    nothing = check_access(tmp_path, "192.0.2.1", "")
    assert (nothing.returncode, nothing.stdout) == (0, "192.0.2.1: allowed: no rule matched\n")
    bad = check_access(tmp_path, "example.com")
    assert bad.returncode == 2 and "not an IPv4 or IPv6 address" in bad.stderr
    broken = check_access(tmp_path, "10.1.2.3", '[access]\nrules = ["allow 10.0.0.1/8"]\n')
    assert broken.returncode == 78
    assert broken.stderr.strip().endswith("has host bits set; did you mean 10.0.0.0/8?")
