"""Smoke test of the benchmark (benchmarks/run.py --quick), so it can't rot.

It runs the real thing with tiny durations: builds the C generator and the C
reference server with gcc, starts tsechod and every baseline, drives each with
every workload, and checks that the generator counted no bad reply anywhere.
It asserts nothing about speed: that is what the full run and RESULTS.md are for.
The zero means something only if the generator's check catches wrong replies,
so it is also run against small deliberately wrong servers.
"""

from __future__ import annotations

import importlib.util
import json
import socketserver
import subprocess
import sys
import threading
import time

import pytest

from helpers import REPO, require_tool

BASE_SERVERS = ("tsechod", "tutorial", "asyncio", "uvloop", "c-epoll", "c-threads")


@pytest.mark.slow
def test_quick_benchmark_runs_every_server_with_zero_bad_replies(tmp_path) -> None:
    require_tool("gcc")
    require_tool("taskset")
    results = tmp_path / "RESULTS.md"
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "run.py"), "--quick", "--output", str(results)],
        cwd=REPO, capture_output=True, text=True, timeout=240,
    )
    report = f"exit {proc.returncode}\nstdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-2000:]}"
    assert proc.returncode == 0, report

    # a table per workload, on stdout and in the Markdown file
    for workload in ("pingpong1", "pingpong64", "pipeline", "connrate", "hold"):
        assert f"### {workload} " in proc.stdout, report
    assert "| server |" in proc.stdout, report
    text = results.read_text()
    assert "## Machine" in text and "### pingpong64 " in text and "| c-epoll |" in text and "| c-threads |" in text

    summary_lines = [line for line in proc.stdout.splitlines() if line.startswith("SUMMARY ")]
    assert summary_lines, report
    summary = json.loads(summary_lines[-1].removeprefix("SUMMARY "))
    for server in BASE_SERVERS:
        assert summary["failed"].get(server) == [], f"{server} failed: {summary['failed'].get(server)}\n{report}"
        assert summary["runs_ok"].get(server) == 5, f"{server}: {summary['runs_ok'].get(server)} runs ok\n{report}"
    # tsechod --workers rows too, when present: no server may send one wrong byte
    assert all(count == 0 for count in summary["bad_replies"].values()), summary["bad_replies"]


# ---------- the generator's reply check catches wrong replies ----------

def _good(line: bytes) -> bytes:
    return b"[" + time.ctime().encode() + b"] " + line


BAD_SERVERS = {
    "payload byte changed": lambda line: _good(line[:30] + (b"X" if line[30:31] != b"X" else b"Y") + line[31:]),
    "iso timestamp": lambda line: b"[" + time.strftime("%Y-%m-%dT%H:%M:%S").encode() + b"] " + line,
    "no space after bracket": lambda line: _good(line).replace(b"] ", b"]", 1),
    "line echoed twice": lambda line: _good(line) + _good(line),
    "ERR reply": lambda line: b"ERR server busy\n",
}


@pytest.fixture(scope="module")
def loadgen() -> str:
    require_tool("gcc")
    spec = importlib.util.spec_from_file_location("bench_run", REPO / "benchmarks" / "run.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    module.build()
    return str(module.LOADGEN)


@pytest.mark.parametrize("kind", sorted(BAD_SERVERS))
def test_generator_counts_wrong_replies_as_bad(kind: str, loadgen: str) -> None:
    mutate = BAD_SERVERS[kind]

    class Handler(socketserver.StreamRequestHandler):
        def handle(self) -> None:
            for n, line in enumerate(self.rfile):
                # every third reply is wrong, so good ones are interleaved with bad ones
                self.wfile.write(mutate(line) if n % 3 == 2 else _good(line))
                self.wfile.flush()

    class Server(socketserver.ThreadingTCPServer):
        daemon_threads = True
        allow_reuse_address = True

    with Server(("127.0.0.1", 0), Handler) as server:
        thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
        thread.start()
        try:
            proc = subprocess.run(
                [loadgen, "--port", str(server.server_address[1]), "--workload", "pingpong", "--conns", "2",
                 "--duration", "0.2", "--warmup", "0", "--grace", "1"],
                capture_output=True, text=True, timeout=30,
            )
        finally:
            server.shutdown()
            thread.join(timeout=5)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["bad_replies"] >= 1, result
    assert result["errors"] >= result["bad_replies"], result
    assert result["first_bad"], result
