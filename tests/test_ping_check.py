"""tsecho ping and tsecho check against real tsechod processes, real clocks and real tools.

Clock offsets are real: tsechod runs under libfaketime (what faketime(1) does:
LD_PRELOAD plus FAKETIME), shifted by a known amount, with its own TZ, with
and without a faked CLOCK_MONOTONIC; ping must report every shift inside the
bound it states, and the bound must be under 20 ms on loopback for every
style. Latency is real: tc netem on the loopback of a network namespace this
file creates (when the kernel has netem), and a relay that holds every chunk
for a known time. check is run as a monitoring system would run it, and the
real check_tcp from monitoring-plugins is run against tsechod too.
"""

from __future__ import annotations

import glob
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from conftest import Daemon
from helpers import REPO, require_tool, wait_until

TSECHO = [sys.executable, "-W", "error", "-m", "tsecho.client"]
CHECK_TCP = "/usr/lib/nagios/plugins/check_tcp"
LOOPBACK_BOUND_S = 0.020


def run(*args: str, timeout: float = 30, env: dict[str, str] | None = None,
        prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if k != "TSECHO_DEBUG"}
    environ.update(env or {})
    return subprocess.run([*prefix, *TSECHO, *args], capture_output=True, text=True, timeout=timeout, env=environ)


def target(daemon: Daemon) -> str:
    return f"{daemon.host}:{daemon.port}"


def faketime_env(shift: str, tz: str, fake_monotonic: bool) -> dict[str, str]:
    """The environment faketime(1) gives a program, shifted by *shift* (e.g. ``+2.5s``)."""
    require_tool("faketime")
    libraries = sorted(glob.glob("/usr/lib/*/faketime/libfaketime.so.1"))
    assert libraries, "faketime is installed but libfaketime.so.1 is not where Debian puts it"
    env = {"LD_PRELOAD": libraries[0], "FAKETIME": shift, "TZ": tz}
    if not fake_monotonic:
        env["FAKETIME_DONT_FAKE_MONOTONIC"] = "1"
    return env


def ping_summary(address: str, *extra: str, env: dict[str, str] | None = None) -> dict[str, object]:
    result = run("ping", "-c", "3", "-i", "0.05", "-q", "--json", *extra, address, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    [line] = result.stdout.splitlines()
    summary = json.loads(line)
    assert summary["type"] == "summary"
    return summary  # type: ignore[no-any-return]


# -- offsets for real ----------------------------------------------------------------------------

SHIFTS = [("+2.5s", 2.5), ("-90s", -90.0), ("+3600.004s", 3600.004)]
STYLES = ["iso", "epoch", "ctime"]
SERVER_ZONES = ["Asia/Tokyo", "Asia/Kathmandu", "America/St_Johns"]  # +09:00, +05:45, -03:30/-02:30
# Every style meets every zone once over the shifts, and both monotonic settings.
CASES = [(style, shift, seconds, SERVER_ZONES[(i + i // 3) % 3], bool(i % 2))
         for i, (style, (shift, seconds)) in enumerate((s, sh) for sh in SHIFTS for s in STYLES)]


@pytest.mark.parametrize(("style", "shift", "shift_s", "server_tz", "fake_monotonic"), CASES)
def test_ping_reports_a_faked_clock_offset_inside_a_tight_bound(
        tsechod: Callable[..., Daemon], style: str, shift: str, shift_s: float, server_tz: str,
        fake_monotonic: bool) -> None:
    daemon = tsechod(f'[echo]\ntimestamp = "{style}"\n', env=faketime_env(shift, server_tz, fake_monotonic))
    summary = ping_summary(target(daemon), env={"TZ": "America/New_York"})
    assert (summary["sent"], summary["received"], summary["lost"]) == (3, 3, 0)
    offset = summary["offset"]
    assert isinstance(offset, dict)
    bound = offset["bound_s"]
    assert bound < LOOPBACK_BOUND_S, offset
    if style == "ctime":
        # Zone-less: ping reads the zone difference off the quarter hours; what it reports in all
        # (zone + skew) is the server's wall clock minus ours, whatever share it gives the zone.
        zone_now = ZoneInfo(server_tz).utcoffset(datetime.now())
        assert zone_now is not None
        expected = shift_s + zone_now.total_seconds()
        assert offset["method"] == "second-boundary" and offset["zone_source"] == "guessed"
        assert abs(offset["zone_s"] + offset["offset_s"] - expected) <= bound, offset
        if abs(shift_s) < 300:
            assert offset["zone_s"] == zone_now.total_seconds()
    else:
        assert offset["method"] == "lowest-rtt" and offset["zone_source"] == "stamp"
        assert abs(offset["offset_s"] - shift_s) <= bound, offset


def test_ping_prints_each_probe_the_summary_and_the_method(tsechod: Callable[..., Daemon]) -> None:
    daemon = tsechod('[echo]\ntimestamp = "ctime"\n', env=faketime_env("+2.5s", "UTC", False))
    result = run("ping", "-c", "2", "-i", "0.05", "--server-utc", target(daemon))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    address = re.escape(target(daemon))
    assert lines[0] == f"TSECHO PING {target(daemon)}: one connection, every 0.05 s"
    assert re.fullmatch(rf"reply from {address}: seq=1 rtt=\d+\.\d{{3}} ms stamp=\[\w{{3}} \w{{3}} [ \d]\d "
                        rf"\d\d:\d\d:\d\d \d{{4}}\] offset=\+\d\.\d{{3}} s ± 0\.\d{{3}} s", lines[1]), lines[1]
    assert re.fullmatch(r"second boundary: \d+ probes in \d rounds pin the offset to \+2\.\d+ s ± 0\.\d+ s",
                        lines[2]), lines[2]
    assert lines[3].startswith(f"reply from {target(daemon)}: seq=2 ")
    assert lines[4:6] == [f"--- {target(daemon)} tsecho ping statistics ---", lines[5]]
    assert re.fullmatch(r"2 probes sent, 2 received, 0% lost, time \d+ ms", lines[5])
    assert re.fullmatch(r"rtt min/avg/max/mdev = (\d+\.\d{3}/){3}\d+\.\d{3} ms, p50/p90/p99 = "
                        r"(\d+\.\d{3}/){2}\d+\.\d{3} ms", lines[6])
    assert re.fullmatch(r"server stamps read as UTC; clock offset \+2\.\d+ s ± 0\.\d+ s \(second-boundary method, "
                        r"\d+ probes; ctime stamps, resolution 1 s\)", lines[7]), lines[7]
    assert len(lines) == 8


def test_ping_with_microsecond_stamps_names_the_lowest_rtt_method(tsechod: Callable[..., Daemon]) -> None:
    daemon = tsechod('[echo]\ntimestamp = "iso"\n')
    result = run("ping", "-c", "2", "-i", "0.02", "-q", "--new-connection", target(daemon))
    assert result.returncode == 0
    assert re.search(r"\nclock offset [+-]0\.\d{6} s ± 0\.\d{6} s \(from the lowest-RTT probe; iso stamps, "
                     r"resolution 1 µs\)\n$", result.stdout), result.stdout
    assert "seq=" not in result.stdout  # -q: the summary only


def test_a_stamp_pattern_ping_cannot_read_is_named_and_rtt_still_measured(tsechod: Callable[..., Daemon]) -> None:
    daemon = tsechod('[echo]\ntimestamp = "%d.%m.%Y %H:%M:%S"\n')
    result = run("ping", "-c", "2", "-i", "0.02", target(daemon))
    assert result.returncode == 0
    assert result.stderr.count("tsecho: cannot read the server's stamp") == 1
    assert "--stamp-format" in result.stderr and "rtt min/avg/max/mdev" in result.stdout
    fixed = run("ping", "-c", "2", "-i", "0.02", "-q", "--stamp-format", "%d.%m.%Y %H:%M:%S", target(daemon))
    assert fixed.returncode == 0 and "second-boundary method" in fixed.stdout, fixed.stdout + fixed.stderr


# -- ping's exit status and Ctrl-C --------------------------------------------------------------

def test_ping_exits_2_when_nothing_answers(tsechod: Callable[..., Daemon]) -> None:
    daemon = tsechod()
    address = target(daemon)
    daemon.stop()
    result = run("ping", "-c", "2", "-i", "0.01", address)
    assert result.returncode == 2
    assert f"seq=1: cannot connect to {address}: connection refused" in result.stdout
    assert "2 probes sent, 0 received, 100% lost" in result.stdout


def test_ping_exits_1_when_some_probes_are_lost(tsechod: Callable[..., Daemon]) -> None:
    daemon = tsechod('[echo]\ntimestamp = "epoch"\n')
    proc = subprocess.Popen([*TSECHO, "ping", "-c", "3", "-i", "0.3", "-W", "0.3", "--json", target(daemon)],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        first = json.loads(proc.stdout.readline())
        assert first["seq"] == 1 and "rtt_s" in first
        daemon.send(signal.SIGSTOP)  # hung: the next probes time out
        out, _ = proc.communicate(timeout=20)
    finally:
        daemon.send(signal.SIGCONT)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 1
    records = [json.loads(line) for line in out.splitlines()]
    assert [r.get("lost", False) for r in records[:2]] == [True, True]
    assert records[0]["reason"] == f"no reply from {target(daemon)} within 0.3 s"
    assert (records[-1]["sent"], records[-1]["received"], records[-1]["lost"]) == (3, 1, 2)


def test_ctrl_c_prints_the_summary_and_exits_by_its_verdict(tsechod: Callable[..., Daemon]) -> None:
    daemon = tsechod('[echo]\ntimestamp = "iso"\n')
    proc = subprocess.Popen([*TSECHO, "ping", "-i", "0.05", target(daemon)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        for _ in range(3):
            assert proc.stdout.readline()
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0
    assert f"--- {target(daemon)} tsecho ping statistics ---" in out and "0% lost" in out


def test_ping_stops_quietly_when_its_reader_goes_away(tsechod: Callable[..., Daemon]) -> None:
    daemon = tsechod('[echo]\ntimestamp = "iso"\n')
    with subprocess.Popen([*TSECHO, "ping", "-i", "0.02", target(daemon)], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True) as proc:
        assert proc.stdout is not None and proc.stderr is not None
        try:
            assert proc.stdout.readline().startswith("TSECHO PING ")
            proc.stdout.close()  # tsecho ping | head -1
            assert proc.wait(timeout=10) == 1
            assert proc.stderr.read() == ""
        finally:
            if proc.poll() is None:
                proc.kill()


@pytest.mark.parametrize(("args", "says"), [
    (["-i", "0.001"], "-i must be a number of seconds >= 0.01, not '0.001'"),
    (["-c", "0"], "must be a whole number >= 1, not '0'"),
    (["--server-tz", "Mars/Olympus"], "unknown time zone 'Mars/Olympus'"),
    (["--server-utc", "--server-tz", "UTC"], "not allowed with argument"),
])
def test_ping_refuses_bad_usage(args: list[str], says: str) -> None:
    result = run("ping", *args)
    assert result.returncode == 2 and says in result.stderr


# -- tsecho check: a monitoring plugin ----------------------------------------------------------

OK_LINE = (r"TSECHO OK - {address} rtt \d+\.\d\d ms, offset [+-]\d\.\d{{3}} s "
           r"\| rtt=\d\.\d{{6}}s;0\.05;0\.2;0 offset=-?\d\.\d{{3}}s;0\.5;2")


def test_check_a_live_server_is_ok(tsechod: Callable[..., Daemon]) -> None:
    daemon = tsechod('[echo]\ntimestamp = "iso"\n')
    result = run("check", target(daemon))
    assert result.returncode == 0
    assert re.fullmatch(OK_LINE.format(address=re.escape(target(daemon))) + "\n", result.stdout), result.stdout
    assert result.stderr == ""
    # -H/-p, as plugins usually take them.
    alike = run("check", "-H", daemon.host, "-p", str(daemon.port))
    assert alike.returncode == 0 and alike.stdout.startswith(f"TSECHO OK - {target(daemon)} rtt ")


def test_check_a_stopped_server_is_critical(tsechod: Callable[..., Daemon]) -> None:
    daemon = tsechod()
    address = target(daemon)
    daemon.stop()
    result = run("check", address)
    assert result.returncode == 2
    assert result.stdout == (f"TSECHO CRITICAL - cannot connect to {address}: connection refused "
                             f"(is tsechod running? systemctl status tsechod)\n")


def test_check_a_hung_server_is_critical_after_the_timeout(tsechod: Callable[..., Daemon]) -> None:
    daemon = tsechod()
    daemon.send(signal.SIGSTOP)
    try:
        started = time.monotonic()
        result = run("check", "-t", "1", target(daemon))
        took = time.monotonic() - started
    finally:
        daemon.send(signal.SIGCONT)
    assert result.returncode == 2
    assert result.stdout == f"TSECHO CRITICAL - no reply from {target(daemon)} within 1 s\n"
    assert took < 5


@pytest.mark.parametrize(("args", "status", "code", "reason"), [
    ([], "CRITICAL", 2, " (offset beyond ±2 s)"),
    (["--critical-offset", "3s"], "WARNING", 1, " (offset beyond ±0.5 s)"),
    (["--warning-offset", "3s", "--critical-offset", "5s"], "OK", 0, ""),
    (["--warning-offset", "1s", "--critical-offset", "2000ms"], "CRITICAL", 2, " (offset beyond ±2 s)"),
    (["--warning-offset", "3s", "--critical-offset", "5s", "--warning-rtt", "1us"], "WARNING", 1,
     " (rtt over 0.001 ms)"),
    (["--warning-offset", "3s", "--critical-offset", "5s", "--warning-rtt", "1us", "--critical-rtt", "2us"],
     "CRITICAL", 2, " (rtt over 0.002 ms)"),
])
def test_check_a_shifted_server_on_both_sides_of_the_thresholds(
        tsechod: Callable[..., Daemon], args: list[str], status: str, code: int, reason: str) -> None:
    daemon = tsechod('[echo]\ntimestamp = "epoch"\n', env=faketime_env("+2.5s", "UTC", True))
    result = run("check", *args, target(daemon))
    assert result.returncode == code, result.stdout
    match = re.fullmatch(rf"TSECHO {status} - {re.escape(target(daemon))} rtt (\d+\.\d\d) ms, offset \+2\.50\d s"
                         rf"{re.escape(reason)} \| rtt=(\d\.\d{{6}})s;([\d.e-]+);([\d.e-]+);0 "
                         rf"offset=2\.50\ds;([\d.]+);([\d.]+)\n", result.stdout)
    assert match, result.stdout
    limits = dict(zip(args[::2], args[1::2]))
    seconds = {"1us": "1e-06", "2us": "2e-06", "3s": "3", "5s": "5", "1s": "1", "2000ms": "2"}
    assert match[3] == seconds.get(limits.get("--warning-rtt", ""), "0.05")
    assert match[5] == seconds.get(limits.get("--warning-offset", ""), "0.5")
    assert match[6] == seconds.get(limits.get("--critical-offset", ""), "2")


def test_check_a_ctime_server_in_another_zone_reports_the_zone_and_pins_the_second(
        tsechod: Callable[..., Daemon]) -> None:
    daemon = tsechod('[echo]\ntimestamp = "ctime"\n', env=faketime_env("+0.3s", "Asia/Tokyo", False))
    result = run("check", target(daemon))
    assert result.returncode == 0, result.stdout
    assert re.fullmatch(rf"TSECHO OK - {re.escape(target(daemon))} rtt \d+\.\d\d ms, offset \+0\.\d{{3}} s, stamps "
                        r"UTC\+09:00 \| rtt=\d\.\d{6}s;0\.05;0\.2;0 offset=0\.\d{3}s;0\.5;2\n", result.stdout)
    offset = float(result.stdout.split("offset=")[1].split("s;")[0])
    assert abs(offset - 0.3) < LOOPBACK_BOUND_S


def test_check_a_server_that_is_not_tsechod_is_critical() -> None:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]

        def answer() -> None:
            conn, _ = listener.accept()
            with conn:
                conn.recv(1024)
                conn.sendall(b"HTTP/1.0 400 Bad Request\r\n\r\n")

        thread = threading.Thread(target=answer, daemon=True)
        thread.start()
        result = run("check", "-t", "2", f"127.0.0.1:{port}")
        thread.join(timeout=5)
    assert result.returncode == 2
    assert result.stdout == (f"TSECHO CRITICAL - reply from 127.0.0.1:{port} is not a stamped echo of the probe: "
                             f"'HTTP/1.0 400 Bad Request'\n")


def test_check_stamps_it_cannot_read_are_unknown(tsechod: Callable[..., Daemon]) -> None:
    daemon = tsechod('[echo]\ntimestamp = "%d.%m.%Y %H:%M:%S"\n')
    result = run("check", target(daemon))
    assert result.returncode == 3
    assert re.fullmatch(rf"TSECHO UNKNOWN - {re.escape(target(daemon))} rtt \d+\.\d\d ms, cannot read the server's "
                        r"stamp '[\d. :]+': it is not ctime, iso or epoch \(give the server's timestamp pattern, "
                        r"e\.g\. --stamp-format '%d\.%m\.%Y %H:%M:%S'\) \| rtt=\d\.\d{6}s;0\.05;0\.2;0\n", result.stdout)


@pytest.mark.parametrize(("args", "says"), [
    (["--warning-rtt", "fast"], "argument --warning-rtt: 'fast' is not a duration"),
    (["--bogus"], "unrecognized arguments: --bogus"),
])
def test_check_bad_usage_is_unknown(args: list[str], says: str) -> None:
    result = run("check", *args)
    assert result.returncode == 3
    assert result.stdout.startswith("TSECHO UNKNOWN - ") and says in result.stdout
    assert result.stdout.count("\n") == 1


def test_check_tcp_from_monitoring_plugins_sees_tsechod(tsechod: Callable[..., Daemon]) -> None:
    """The docs' alternative is true: check_tcp can send a line and expect its echo."""
    if not os.access(CHECK_TCP, os.X_OK):
        require_tool("check_tcp")  # not on PATH either: fails in CI, skips elsewhere
    daemon = tsechod()
    result = subprocess.run([CHECK_TCP, "-H", daemon.host, "-p", str(daemon.port), "-E", "-s", "tsecho-check\\n",
                             "-e", "] tsecho-check", "-w", "1", "-c", "2", "-t", "5"],
                            capture_output=True, text=True, timeout=20)
    assert result.returncode == 0, result.stdout
    assert re.match(rf"TCP OK - \d+\.\d+ second response time on {re.escape(daemon.host)} port {daemon.port}",
                    result.stdout), result.stdout
    daemon.stop()
    refused = subprocess.run([CHECK_TCP, "-H", daemon.host, "-p", str(daemon.port)], capture_output=True, text=True,
                             timeout=20)
    assert refused.returncode == 2 and "Connection refused" in refused.stdout


# -- RTT moves by the latency added ---------------------------------------------------------------

class DelayRelay:
    """A TCP relay on loopback that holds every chunk *delay_s* before passing it on, both ways."""

    def __init__(self, upstream: tuple[str, int], delay_s: float) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.upstream, self.delay_s = upstream, delay_s
        threading.Thread(target=self._accept, daemon=True, name="relay-accept").start()

    def _accept(self) -> None:
        try:
            while True:
                client, _ = self.listener.accept()
                server = socket.create_connection(self.upstream, timeout=5)
                for source, sink in ((client, server), (server, client)):
                    threading.Thread(target=self._pump, args=(source, sink), daemon=True, name="relay-pump").start()
        except OSError:
            return  # closed

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        source.settimeout(30)
        try:
            while data := source.recv(65536):
                due = time.monotonic() + self.delay_s
                while (left := due - time.monotonic()) > 0:  # holding the bytes *is* the job
                    time.sleep(left)
                sink.sendall(data)
            sink.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def close(self) -> None:
        self.listener.close()


def test_ping_rtt_moves_by_the_latency_a_relay_adds(tsechod: Callable[..., Daemon]) -> None:
    daemon = tsechod('[echo]\ntimestamp = "epoch"\n')
    relay = DelayRelay(daemon.address, 0.025)  # 25 ms each way: +50 ms round trip
    try:
        direct = ping_summary(target(daemon))
        delayed = ping_summary(f"127.0.0.1:{relay.port}")
    finally:
        relay.close()
    added = delayed["rtt_s"]["min"] - direct["rtt_s"]["min"]  # type: ignore[index]
    assert 0.050 <= added < 0.065, (direct, delayed)
    offset = delayed["offset"]
    assert isinstance(offset, dict) and abs(offset["offset_s"]) <= offset["bound_s"]
    assert 0.025 <= offset["bound_s"] < 0.035


@pytest.fixture
def netns() -> Iterator[str]:
    """A network namespace of our own with lo up; deleted afterwards."""
    require_tool("ip")
    require_tool("tc")
    if os.geteuid() != 0:
        pytest.skip("ip netns add needs root")
    name = f"tsecho-test-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True, timeout=10)
    try:
        subprocess.run(["ip", "netns", "exec", name, "ip", "link", "set", "lo", "up"], check=True, timeout=10)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], timeout=10)


def test_ping_rtt_moves_by_the_latency_netem_adds(netns: str, tmp_path: Path) -> None:
    probe = subprocess.run(["ip", "netns", "exec", netns, "tc", "qdisc", "add", "dev", "lo", "root", "netem",
                            "delay", "0ms"], capture_output=True, text=True, timeout=10)
    if probe.returncode != 0:
        # A kernel feature, not a package: .ci/run cannot install it. The relay test above covers the figures.
        pytest.skip(f"this kernel has no netem qdisc (sch_netem): {probe.stderr.strip()}")
    config = tmp_path / "tsechod.toml"
    config.write_text('[echo]\ntimestamp = "epoch"\n')
    log = tmp_path / "tsechod.stderr"
    env = {k: v for k, v in os.environ.items() if not k.startswith("TSECHOD_")}
    env["PYTHONPATH"] = str(REPO / "src")
    in_ns = ("ip", "netns", "exec", netns)
    with open(log, "wb") as stderr:
        daemon = subprocess.Popen([*in_ns, sys.executable, "-m", "tsecho.cli", "--config", str(config),
                                   "--listen", "127.0.0.1:0"], stderr=stderr, stdout=subprocess.DEVNULL, env=env)
    try:
        match = wait_until(lambda: re.search(r"listening on (\S+)", log.read_text()))
        address = match.group(1)  # type: ignore[union-attr]

        def rtt_min() -> float:
            result = run("ping", "-c", "3", "-i", "0.05", "-q", "--json", address, prefix=in_ns)
            assert result.returncode == 0, result.stdout + result.stderr
            return float(json.loads(result.stdout)["rtt_s"]["min"])

        before = rtt_min()
        subprocess.run([*in_ns, "tc", "qdisc", "change", "dev", "lo", "root", "netem", "delay", "20ms"],
                       check=True, timeout=10)
        after = rtt_min()
    finally:
        daemon.terminate()
        daemon.wait(timeout=15)
    # lo carries both directions: 20 ms each way.
    assert 0.040 <= after - before < 0.050
