"""Smoke test of the benchmark (benchmarks/run.py --quick), so it can't rot.

It runs the real thing with tiny durations: builds the C generator and the C
reference server with gcc, starts tsechod and every baseline, drives each with
every workload, and checks that the generator counted no bad reply anywhere.
It asserts nothing about speed: that is what the full run and RESULTS.md are for.
"""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import REPO, require_tool

BASE_SERVERS = ("tsechod", "tutorial", "asyncio", "uvloop", "c-epoll")


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
    assert "## Machine" in text and "### pingpong64 " in text and "| c-epoll |" in text

    summary_lines = [line for line in proc.stdout.splitlines() if line.startswith("SUMMARY ")]
    assert summary_lines, report
    summary = json.loads(summary_lines[-1].removeprefix("SUMMARY "))
    for server in BASE_SERVERS:
        assert summary["failed"].get(server) == [], f"{server} failed: {summary['failed'].get(server)}\n{report}"
        assert summary["runs_ok"].get(server) == 5, f"{server}: {summary['runs_ok'].get(server)} runs ok\n{report}"
    # tsechod --workers rows too, when present: no server may send one wrong byte
    assert all(count == 0 for count in summary["bad_replies"].values()), summary["bad_replies"]
