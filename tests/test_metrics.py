"""The metrics endpoint (metrics_listen): its page checked by promtool, scraped by a real Prometheus.

Every test starts a real tsechod with ``metrics_listen = "127.0.0.1:0"`` and reads the
endpoint's address from its ``metrics on http://...`` log line. What the clients did
(lines, closes by reason, refusals) must be what the page says; with workers = 2, what
Prometheus stores must equal the supervisor's STATUS= and what the clients saw.
"""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import psutil
import pytest
from conftest import daemon_env
from helpers import recv_all, recv_lines, require_tool, wait_until

from tsecho.state import CLOSE_REASONS, REFUSAL_REASONS

METRICS = '[server]\nmetrics_listen = "127.0.0.1:0"\n'
SAMPLE = re.compile(r"^(\w+)(\{[^}]*\})? (\S+)$", re.M)


def metrics_url(d) -> str:
    return d.wait_for_log(r"metrics on (http://\S+)")[0].group(1)


def scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as response:
        assert response.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
        return response.read().decode()


def samples(page: str) -> dict[str, float]:
    """'name{labels}' -> value for every sample on the page."""
    return {name + (labels or ""): float(value) for name, labels, value in SAMPLE.findall(page)}


def say_lines(address: tuple[str, int], count: int) -> None:
    with socket.create_connection(address, timeout=5) as sock:
        sock.sendall(b"".join(b"line %d\n" % i for i in range(count)))
        assert len(recv_lines(sock, count)) == count


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_metrics_are_off_by_default(tsechod) -> None:
    d = tsechod("")
    say_lines(d.address, 1)
    d.wait_for_log(r"closed reason=eof")
    assert "metrics on" not in d.log_text()


def test_the_page_passes_promtool_and_counts_what_clients_did(tsechod, tmp_path: Path) -> None:
    promtool = require_tool("promtool")
    d = tsechod(METRICS + "[echo]\nmax_line_bytes = 100\n[limits]\nmax_connections_per_ip = 2\n")
    url = metrics_url(d)
    say_lines(d.address, 7)
    say_lines(d.address, 5)
    with d.connect() as sock:  # a line over max_line_bytes: ERR, closed as too-long
        sock.sendall(b"x" * 200 + b"\n")
        assert recv_all(sock).startswith(b"ERR")
    d.wait_for_log(r"closed reason=", count=3)  # their slots are free again
    held = [d.connect(), d.connect()]
    with d.connect() as refused:  # the third from 127.0.0.1: refused per-address
        assert recv_all(refused).startswith(b"ERR")
    page = scrape(url)
    check = subprocess.run([promtool, "check", "metrics"], input=page, capture_output=True, text=True, timeout=30)
    assert (check.returncode, check.stdout, check.stderr) == (0, "", ""), page
    got = samples(page)
    # Every reason state.py knows, the ones later features add included, has its series.
    assert [k for k in got if k.startswith("tsechod_connections_closed_total")] == [
        f'tsechod_connections_closed_total{{reason="{r}"}}' for r in CLOSE_REASONS]
    assert [k for k in got if k.startswith("tsechod_connections_refused_total")] == [
        f'tsechod_connections_refused_total{{reason="{r}"}}' for r in REFUSAL_REASONS]
    assert got["tsechod_lines_total"] == 12
    assert got["tsechod_connections"] == 2
    assert got["tsechod_connections_accepted_total"] == 5
    assert got['tsechod_connections_closed_total{reason="eof"}'] == 2
    assert got['tsechod_connections_closed_total{reason="too-long"}'] == 1
    assert got['tsechod_connections_refused_total{reason="per-address"}'] == 1
    assert got["tsechod_received_bytes_total"] == sum(len(b"line %d\n" % i) for i in (*range(7), *range(5))) + 201
    assert got["tsechod_workers"] == 1
    assert got["process_threads"] >= 3 and got["process_open_fds"] >= 5
    assert got["process_resident_memory_bytes"] > 1 << 20
    assert abs(got["process_start_time_seconds"] - time.time()) < 120
    for sock in held:
        sock.close()


def test_only_get_or_head_of_metrics_is_served_and_requests_are_bounded(tsechod) -> None:
    d = tsechod(METRICS)
    url = metrics_url(d)
    with pytest.raises(urllib.error.HTTPError) as missing:
        urllib.request.urlopen(url.replace("/metrics", "/"), timeout=5)
    assert missing.value.code == 404
    missing.value.close()
    with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=5) as head:
        assert head.status == 200 and head.read() == b"" and int(head.headers["Content-Length"]) > 1000
    host, port = urllib.parse.urlsplit(url).hostname, urllib.parse.urlsplit(url).port
    threads = psutil.Process(d.pid).num_threads()
    with socket.create_connection((host, port), timeout=5) as sock:  # 64 KiB of request: cut at 8 KiB
        sock.sendall(b"GET /metrics HTTP/1.1\r\nX: " + b"a" * 65536)
        assert recv_all(sock).startswith(b"HTTP/1.1 400 ")
    # Its scrape thread frees its slot just after our close: wait for it, or a silent one below gets the 503.
    wait_until(lambda: psutil.Process(d.pid).num_threads() <= threads)
    started = time.monotonic()
    silent = [socket.create_connection((host, port), timeout=10) for _ in range(4)]  # say nothing
    try:
        with socket.create_connection((host, port), timeout=5) as fifth:  # every slot taken: 503 at once
            assert recv_all(fifth).startswith(b"HTTP/1.1 503 ")
        assert time.monotonic() - started < 3
        for sock in silent:  # each cut after 5 s without an answer
            assert recv_all(sock, timeout=10) == b""
        assert 4 < time.monotonic() - started < 9
    finally:
        for sock in silent:
            sock.close()
    assert scrape(url).startswith("# HELP")  # and serving again


def test_reloads_are_counted_and_a_failed_one_shows(tsechod) -> None:
    d = tsechod(METRICS)
    url = metrics_url(d)
    d.send(signal.SIGHUP)
    d.wait_for_log(r"reloaded config")
    d.rewrite_config(METRICS + "[server]\nbacklog = 0\n")  # a duplicate table: invalid TOML
    before = time.time()
    d.send(signal.SIGHUP)
    d.wait_for_log(r"reload failed")
    got = samples(scrape(url))
    assert got['tsechod_reloads_total{result="ok"}'] == 1
    assert got['tsechod_reloads_total{result="failed"}'] == 1
    assert got["tsechod_last_reload_successful"] == 0
    assert before - 1 <= got["tsechod_last_reload_timestamp_seconds"] <= time.time() + 1


def test_a_metrics_address_in_use_fails_the_start_in_one_line(tsechod) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        d = tsechod(f'[server]\nmetrics_listen = "127.0.0.1:{port}"\n', wait=False)
        assert d.proc.wait(timeout=10) == 1
    assert d.log_text() == (f"tsechod: cannot listen on 127.0.0.1:{port}: address already in use "
                            f"(another tsechod? try: ss -ltnp 'sport = :{port}')\n")


def test_prometheus_scrapes_two_workers_and_agrees_with_status_and_the_clients(tsechod, tmp_path: Path) -> None:
    """A real Prometheus, scraping every second; its stored totals = STATUS= = what clients saw."""
    prometheus = require_tool("prometheus")
    notify_path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind(str(notify_path))
        notify.settimeout(10)
        # WATCHDOG_USEC of 3 s makes the supervisor send STATUS= every second.
        d = tsechod("[server]\nworkers = 2\nmetrics_listen = \"127.0.0.1:0\"\n",
                    env={"NOTIFY_SOCKET": str(notify_path), "WATCHDOG_USEC": "3000000"})
        url = metrics_url(d)
        target = urllib.parse.urlsplit(url).netloc
        port = free_port()
        config = tmp_path / "prometheus.yml"
        config.write_text(f"global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
                          f"scrape_configs:\n  - job_name: tsechod\n    static_configs:\n"
                          f"      - targets: ['{target}']\n")
        log = open(tmp_path / "prometheus.log", "wb")
        prom = subprocess.Popen([prometheus, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                                 f"--web.listen-address=127.0.0.1:{port}"], stdout=log, stderr=log)
        try:
            sent = 0
            for n in range(12):  # spread over both workers by the kernel
                say_lines(d.address, n + 1)
                sent += n + 1

            def status_lines() -> int | None:
                message = notify.recv(4096).decode()
                match = re.search(r"STATUS=2 workers, (\d+) connections, (\d+) lines, (\d+) refused", message)
                return int(match.group(2)) if match and int(match.group(2)) == sent else None

            assert wait_until(status_lines, timeout=15) == sent
            assert samples(scrape(url))["tsechod_lines_total"] == sent

            def query(expr: str) -> float | None:
                api = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
                try:
                    with urllib.request.urlopen(api, timeout=5) as response:
                        result = json.load(response)["data"]["result"]
                except (urllib.error.URLError, ConnectionError):
                    return None  # Prometheus still starting
                return float(result[0]["value"][1]) if result else None

            assert wait_until(lambda: query("tsechod_lines_total") == sent, timeout=30)
            assert query('sum(tsechod_connections_closed_total{reason="eof"})') == 12
            assert query("tsechod_workers") == 2
            assert query('up{job="tsechod"}') == 1
            d.send(signal.SIGHUP)  # the supervisor reloads first: its count is the one shown
            d.wait_for_log(r"reloaded config", count=2)
            assert samples(scrape(url))['tsechod_reloads_total{result="ok"}'] == 1
        finally:
            prom.terminate()
            prom.wait(timeout=15)
            log.close()


def test_the_documented_alert_rules_pass_promtool(tmp_path: Path) -> None:
    promtool = require_tool("promtool")
    text = (Path(__file__).resolve().parents[1] / "docs" / "operations.md").read_text()
    match = re.search(r"<!-- alert-rules -->\n```yaml\n(.*?)```", text, re.S)
    assert match, "no alert-rules block in docs/operations.md"
    rules = tmp_path / "tsechod.rules.yml"
    rules.write_text(match.group(1))
    check = subprocess.run([promtool, "check", "rules", str(rules)], capture_output=True, text=True, timeout=30)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "SUCCESS: 3 rules found" in check.stdout


def test_a_socket_named_metrics_by_systemd_serves_the_metrics(tmp_path: Path) -> None:
    """Socket activation: FileDescriptorName=metrics is the endpoint's socket, the other one echoes."""
    from test_systemd import WRAPPER  # the LISTEN_FDS/LISTEN_FDNAMES wrapper those tests use

    config = tmp_path / "tsechod.toml"
    config.write_text('[server]\nlisten = ["127.0.0.1:0"]\n')
    with socket.create_server(("127.0.0.1", 0)) as echo, socket.create_server(("127.0.0.1", 0)) as metrics:
        fds = f"{echo.fileno()},{metrics.fileno()}"
        env = {k: v for k, v in daemon_env().items() if not k.startswith(("LISTEN_", "NOTIFY_"))}
        with subprocess.Popen([sys.executable, "-c", WRAPPER, "tsechod:metrics", fds, sys.executable, "-m",
                               "tsecho.cli", "--config", str(config)],
                              pass_fds=[echo.fileno(), metrics.fileno()], env=env, stderr=subprocess.PIPE,
                              text=True) as proc:
            try:
                assert proc.stderr is not None
                lines = [proc.stderr.readline()]
                while "metrics on" not in lines[-1] and len(lines) < 4:  # cpu_affinity may say where it runs first
                    lines.append(proc.stderr.readline())
                port = metrics.getsockname()[1]
                assert f"metrics on http://127.0.0.1:{port}/metrics" in "".join(lines), lines
                say_lines(echo.getsockname()[:2], 3)
                assert samples(scrape(f"http://127.0.0.1:{port}/metrics"))["tsechod_lines_total"] == 3
                proc.terminate()
                rest = proc.communicate(timeout=15)[1]
                assert proc.returncode == 0 and "listening on" not in rest
            finally:
                proc.kill()
