"""The Accept=yes units under a real systemd: one `tsechod --stdio` per connection.

Reuses test_systemd_lab's lab (its own boot, for this module): install.sh installs
tsechod-accept.socket and tsechod-accept@.service without enabling them; here the socket is
started in place of tsechod.socket (they conflict: same port), nc talks to it, the journal has
the access event with the peer, and MaxConnectionsPerSource= (lowered by a drop-in, so that
the test needs three connections, not 65) turns the extra connection away: closed without a
reply, counted in the socket's NRefused, no third instance.

It also scrapes the metrics endpoint of the hardened tsechod.service (ProtectProc=invisible,
ProcSubset=pid: the process figures come from /proc), which only a real unit can show. At the end the
daemon's units are back as install.sh left them.
"""

from __future__ import annotations

import re
import subprocess
import time
import urllib.request

import pytest
from helpers import require_tool
from test_systemd_lab import (CTIME_REPLY, PORT, TIMEOUT_S, Lab, connect, lab, recv_line, round_trip,  # noqa: F401
                              set_key)

pytestmark = pytest.mark.systemd

DROPIN = "/etc/systemd/system/tsechod-accept.socket.d/test.conf"
METRICS_PORT = 9809


def accept_journal(lab: Lab, after: str, pattern: str, unit: str = "tsechod-accept@*") -> str:
    """The first message of *unit* after *after* matching *pattern*, waiting for it."""
    deadline = time.monotonic() + TIMEOUT_S
    while True:
        messages = [e["MESSAGE"] for e in lab.journal(after, unit=unit)]
        found = [m for m in messages if re.search(pattern, m)]
        if found:
            return found[0]
        if time.monotonic() > deadline:
            raise AssertionError(f"no {pattern!r} from {unit} in the journal within {TIMEOUT_S} s:\n" + "\n".join(messages))
        time.sleep(0.1)  # polling the journal: there is no event to block on


def test_accept_units_are_installed_not_enabled_and_verify_clean(lab: Lab) -> None:
    assert lab.run("systemctl", "is-enabled", "tsechod-accept.socket", check=False).stdout.strip() == "disabled"
    proc = lab.run("systemd-analyze", "verify", "/etc/systemd/system/tsechod-accept.socket",
                   "/etc/systemd/system/tsechod-accept@.service", check=False)
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "", "")


def test_accept_socket_serves_each_connection_with_its_own_tsechod(lab: Lab) -> None:
    nc = require_tool("nc")
    after = lab.cursor()
    lab.sh(f"mkdir -p {DROPIN.rsplit('/', 1)[0]} && printf '[Socket]\\nMaxConnectionsPerSource=2\\n' > {DROPIN}"
           " && systemctl daemon-reload")
    try:
        lab.run("systemctl", "start", "tsechod-accept.socket")
        # Conflicts=: the daemon and its socket made way.
        assert lab.run("systemctl", "is-active", "tsechod.socket", "tsechod.service",
                       check=False).stdout.split() == ["inactive", "inactive"]
        for n in range(2):
            proc = subprocess.run([nc, "-N", "127.0.0.1", str(PORT)], input=b"hello accept %d\n" % n,
                                  capture_output=True, timeout=TIMEOUT_S)
            assert CTIME_REPLY.match(proc.stdout) and proc.stdout.endswith(b"] hello accept %d\n" % n), proc
        event = accept_journal(lab, after, r"127\.0\.0\.1:\d+ closed reason=eof .*lines=1 ")
        assert event.startswith("INFO tsecho.handler: 127.0.0.1:"), event

        held = [connect(), connect()]
        try:
            for sock in held:  # both served: two tsechod processes run
                assert CTIME_REPLY.match(round_trip(sock, b"held"))
            with connect() as extra:  # the third from 127.0.0.1: systemd closes it, no tsechod starts
                extra.settimeout(TIMEOUT_S)
                try:
                    extra.sendall(b"too many\n")
                    assert extra.recv(4096) == b""
                except ConnectionResetError:
                    pass
            socket_unit = lab.show("tsechod-accept.socket")
            assert (socket_unit["NRefused"], socket_unit["NConnections"]) == ("1", "2")
            running = lab.run("systemctl", "list-units", "--no-legend", "--state=running",
                              "tsechod-accept@*.service").stdout.splitlines()
            assert len(running) == 2, running
        finally:
            for sock in held:
                sock.close()
        accept_journal(lab, after, r"closed reason=eof .*lines=1 ")
        assert lab.run("systemctl", "list-units", "--failed", "--no-legend", "tsechod-accept*",
                       check=False).stdout.strip() == ""
    finally:
        lab.sh(f"systemctl stop tsechod-accept.socket 'tsechod-accept@*.service'; rm -rf {DROPIN.rsplit('/', 1)[0]};"
               " systemctl daemon-reload")
        lab.run("systemctl", "start", "tsechod.socket", "tsechod.service")
    lab.wait_active()
    with connect() as sock:  # the daemon is back
        assert CTIME_REPLY.match(round_trip(sock, b"daemon again"))


def test_metrics_of_the_hardened_service(lab: Lab) -> None:
    promtool = require_tool("promtool")
    good = lab.read_config()
    lab.write_config(set_key(good, "metrics_listen", f'"127.0.0.1:{METRICS_PORT}"'))
    try:
        lab.run("systemctl", "restart", "tsechod.service")
        lab.wait_active()
        with connect() as sock:
            for n in range(3):
                assert CTIME_REPLY.match(round_trip(sock, b"counted %d" % n))
        with urllib.request.urlopen(f"http://127.0.0.1:{METRICS_PORT}/metrics", timeout=TIMEOUT_S) as response:
            page = response.read().decode()
        check = subprocess.run([promtool, "check", "metrics"], input=page, capture_output=True, text=True, timeout=30)
        assert (check.returncode, check.stdout, check.stderr) == (0, "", ""), page
        values = {m[0]: float(m[1]) for m in re.findall(r"(?m)^(\w+) (\S+)$", page)}
        assert values["tsechod_lines_total"] == 3  # counted from the restart on
        assert values["process_open_fds"] > 3 and values["process_threads"] >= 2
        assert values["process_resident_memory_bytes"] > 1 << 20
        assert abs(values["process_start_time_seconds"] - time.time()) < 120
    finally:
        lab.write_config(good)
        lab.run("systemctl", "restart", "tsechod.service")
    lab.wait_active()
