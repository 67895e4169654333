"""Run the tsecho benchmark: tsechod against the baselines, one command.

    .venv/bin/python benchmarks/run.py            # full run (about 10 minutes on 2 cores)
    .venv/bin/python benchmarks/run.py --quick    # tiny durations (the smoke test)
    .venv/bin/python benchmarks/run.py --only pingpong64 --servers tsechod,uvloop

It builds the C parts (loadgen, epoll_server) with the system gcc into
benchmarks/build/, starts each server fresh for every cell, pins servers to
CPU 0 and the generator to CPU 1, interleaves servers (A B C A B C), repeats
each cell, prints medians, spreads (min-max) and ratios to uvloop and to the C
server, and writes benchmarks/RESULTS.md. See docs/performance.md.

A benchmark, not a test: nothing here fails on speed. It exits non-zero only
if it could not run (no compiler, a baseline that doesn't start, the generator
crashing) or, with --check, if any reply was wrong.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import socket
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

BENCH_DIR: Final = Path(__file__).resolve().parent
ROOT: Final = BENCH_DIR.parent
BUILD_DIR: Final = BENCH_DIR / "build"
LOADGEN: Final = BUILD_DIR / "loadgen"
EPOLL_SERVER: Final = BUILD_DIR / "epoll_server"
RESULTS_MD: Final = BENCH_DIR / "RESULTS.md"
PYTHON: Final = sys.executable
TSECHOD: Final = ROOT / ".venv" / "bin" / "tsechod"
LISTENING_RE: Final = re.compile(rb"listening on (\S+):(\d+)")
HOLD_CONNS: Final = 10_000
SERVER_START_TIMEOUT_S: Final = 15.0
SERVER_STOP_TIMEOUT_S: Final = 15.0

# The config tsechod runs with: its connection limits are for the internet, not
# for a benchmark that opens 10,000 connections from 127.0.0.1.
TSECHOD_CONFIG: Final = """\
# written by benchmarks/run.py
[limits]
max_connections = 20000
max_connections_per_ip = 20000
"""

ALL_SERVERS: Final = ("tsechod", "tutorial", "asyncio", "uvloop", "c-epoll")
# Only when asked for (--servers): tsechod with its listener behind the PROXY protocol, the
# generator sending a v1 or v2 header first on every connection (what the header costs).
PROXY_SERVERS: Final = {"tsechod-proxy-v1": 1, "tsechod-proxy-v2": 2}
# tsechod-access: 20 rules that don't match 127.0.0.1, then "allow all"; a rate it never reaches.
ACCESS_CHECKS: Final = (
    "connection_rate_per_ip = 1000000\nconnection_burst_per_ip = 1000000\n[access]\nrules = ["
    + ", ".join(f'"deny 10.{i}.0.0/16"' for i in range(20)) + ', "allow all"]\n'
)
# Only when asked for (--servers), and driven by benchmarks/tls_bench.py's Python generator (the C
# one speaks no TLS): each server with TLS on, the certificate made by make_tls_files.
TLS_SERVERS: Final = ("tsechod-tls", "asyncio-tls", "uvloop-tls")
TLS_LISTENER: Final = """
[[listener]]
address = "127.0.0.1:0"
tls_cert = "tls.crt"
tls_key = "tls.key"
"""
PROXY_LISTENER: Final = """
[[listener]]
address = "127.0.0.1:0"
proxy_protocol = "v{version}"
proxy_trusted = ["127.0.0.0/8"]
"""
# Variants of tsechod for a same-run comparison, only when named in --servers:
# tsechod-metrics: metrics_listen on, scraped every SCRAPE_EVERY_S during the run (docs/performance.md);
# tsechod-baseline: tsechod from another source tree (--baseline-src, e.g. `git archive main`), to
# show that a change leaves the per-line path as fast as it was; tsechod-candidate: this tree,
# started exactly as tsechod-baseline is (python -m, PYTHONPATH), its fair counterpart: the
# console script and `python -m` measured apart by more than the noise (docs/performance.md).
VARIANTS: Final = ("tsechod-metrics", "tsechod-baseline", "tsechod-candidate")
SCRAPE_EVERY_S: Final = 1.0


@dataclass(frozen=True)
class Workload:
    name: str
    kind: str  # loadgen --workload
    conns: int
    metric: str  # the JSON field that is the headline number
    unit: str
    extra: tuple[str, ...] = ()


# Steady workloads first set up their connections, 4 at a time, each answering
# one line, so the measured phase starts with every connection accepted (the
# tutorial server's backlog is socketserver's 5). hold measures the set-up itself,
# as a burst: 64 connections being set up at any moment.
STEADY: Final = ("--concurrency", "4", "--setup-timeout", "10")


def workloads(quick: bool) -> list[Workload]:
    """The workloads of issue 5; --quick shrinks them (and skips two pingpong sizes) for the smoke test."""
    if quick:
        return [
            Workload("pingpong1", "pingpong", 1, "replies_per_s", "replies/s", STEADY),
            Workload("pingpong64", "pingpong", 8, "replies_per_s", "replies/s", STEADY),
            Workload("pipeline", "pipeline", 4, "replies_per_s", "replies/s", ("--lines", "100", *STEADY)),
            Workload("connrate", "connrate", 8, "connections_per_s", "connections/s"),
            Workload("hold", "hold", 50, "setup_s", "s to set up",
                     ("--idle", "0.2", "--concurrency", "4", "--setup-timeout", "10")),
        ]
    return [
        Workload("pingpong1", "pingpong", 1, "replies_per_s", "replies/s", STEADY),
        Workload("pingpong16", "pingpong", 16, "replies_per_s", "replies/s", STEADY),
        Workload("pingpong64", "pingpong", 64, "replies_per_s", "replies/s", STEADY),
        Workload("pingpong256", "pingpong", 256, "replies_per_s", "replies/s", STEADY),
        Workload("pipeline", "pipeline", 16, "replies_per_s", "replies/s", ("--lines", "1000", *STEADY)),
        Workload("connrate", "connrate", 8, "connections_per_s", "connections/s"),
        Workload("hold", "hold", HOLD_CONNS, "setup_s", "s to set up",
                 ("--idle", "3", "--concurrency", "64", "--setup-timeout", "30")),
    ]


# Workloads of the workers=1 vs workers=2 comparison (tsechod unpinned).
WORKERS_WORKLOADS: Final = ("pingpong64", "pingpong256", "pipeline", "connrate")
WORKERS_WORKLOADS_QUICK: Final = ("pingpong64",)


@dataclass
class Cell:
    """One run of one workload against one server."""

    workload: str
    server: str
    result: dict[str, Any] | None = None
    error: str | None = None
    server_cpu_pct: float | None = None  # CPU time / wall time while the generator ran
    gen_cpu_pct: float | None = None
    server_cpu_s: float = 0.0
    gen_cpu_s: float = 0.0

    def cpu_us_per_reply(self) -> tuple[float, float]:
        """(server, generator) CPU microseconds per checked reply over the whole run."""
        n = int(self.result.get("replies_checked", 0)) if self.result else 0
        if not n:
            return float("nan"), float("nan")
        return 1e6 * self.server_cpu_s / n, 1e6 * self.gen_cpu_s / n
    before: dict[str, int] = field(default_factory=dict)  # server RSS/threads before the load
    during: dict[str, int] = field(default_factory=dict)  # ... while holding


class BenchError(Exception):
    """The benchmark could not run (not: a server was slow)."""


# ---------- building ----------

def build() -> None:
    """Compile loadgen and epoll_server with the system gcc into benchmarks/build/."""
    gcc = shutil.which("gcc") or shutil.which("cc")
    if gcc is None:
        raise BenchError("no C compiler: install gcc (apt-get install gcc)")
    BUILD_DIR.mkdir(exist_ok=True)
    for name in ("loadgen", "epoll_server"):
        src, out = BENCH_DIR / f"{name}.c", BUILD_DIR / name
        if out.exists() and out.stat().st_mtime >= src.stat().st_mtime:
            continue
        cmd = [gcc, "-O2", "-Wall", "-o", str(out), str(src)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if proc.returncode != 0:
            raise BenchError(f"building {name} failed:\n{proc.stderr}")


# ---------- /proc ----------

def process_tree(pid: int) -> list[int]:
    """pid and all its descendants (tsechod --workers N forks)."""
    pids, todo = [], [pid]
    while todo:
        p = todo.pop()
        pids.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo.extend(int(c) for c in f.read().split())
        except OSError:
            pass
    return pids


def memory_and_threads(pid: int) -> dict[str, int]:
    """Summed VmRSS (KiB) and thread count over the server's process tree."""
    rss = threads = 0
    for p in process_tree(pid):
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        rss += int(line.split()[1])
                    elif line.startswith("Threads:"):
                        threads += int(line.split()[1])
        except OSError:
            pass
    return {"rss_kib": rss, "threads": threads}


def cpu_seconds(pid: int) -> float:
    """utime+stime of the server's process tree (children that already exited not included)."""
    ticks = 0
    for p in process_tree(pid):
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            ticks += int(fields[11]) + int(fields[12])
        except (OSError, IndexError, ValueError):
            pass
    return ticks / os.sysconf("SC_CLK_TCK")


def listening_port(pid: int, exclude: int = 0) -> int | None:
    """The TCP port the process tree of pid listens on (but *exclude*), from /proc/net/tcp, or None.

    For a server that doesn't print its `listening on` line (tsechod logs it at
    INFO, and the benchmark runs it with --log-level warning).
    """
    inodes = set()
    for p in process_tree(pid):
        try:
            for fd in os.listdir(f"/proc/{p}/fd"):
                target = os.readlink(f"/proc/{p}/fd/{fd}")
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
        except OSError:
            pass
    try:
        rows = Path("/proc/net/tcp").read_text().splitlines()[1:]
    except OSError:
        return None
    for row in rows:
        cols = row.split()
        if len(cols) > 9 and cols[3] == "0A" and cols[9] in inodes:  # 0A = LISTEN
            port = int(cols[1].split(":")[1], 16)
            if port != exclude:  # the metrics endpoint's
                return port
    return None


# ---------- servers ----------

class Server:
    """A server under test, started fresh for one cell and stopped after it."""

    def __init__(self, name: str, tmp: Path, pinned: bool, workers: int = 1, baseline_src: Path | None = None) -> None:
        self.name, self.tmp, self.pinned, self.workers = name, tmp, pinned, workers
        self.baseline_src = baseline_src
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = tmp / f"{name}-w{workers}.log"
        self.port = 0
        self.metrics_port = 0
        self.scrapes = 0
        self._scraping = threading.Event()
        self._scraper: threading.Thread | None = None

    def command(self) -> list[str]:
        if self.name in PROXY_SERVERS:
            config = self.tmp / f"{self.name}.toml"
            config.write_text(TSECHOD_CONFIG + PROXY_LISTENER.format(version=PROXY_SERVERS[self.name]))
            cmd = [str(TSECHOD), "--config", str(config), "--log-level", "warning"]
        elif self.name == "tsechod-access":  # rules and rate on, never refusing
            config = self.tmp / "tsechod-access.toml"
            config.write_text(TSECHOD_CONFIG + ACCESS_CHECKS)
            cmd = [str(TSECHOD), "--config", str(config), "--listen", "127.0.0.1:0", "--log-level", "warning"]
        elif self.name in ("tsechod", *VARIANTS):
            config = self.tmp / "tsechod.toml"
            config.write_text(TSECHOD_CONFIG)
            by_module = self.name in ("tsechod-baseline", "tsechod-candidate")
            program = [PYTHON, "-m", "tsecho.cli"] if by_module else [str(TSECHOD)]
            cmd = [*program, "--config", str(config), "--listen", "127.0.0.1:0", "--log-level", "warning"]
            if self.workers != 1:
                cmd += ["--workers", str(self.workers)]
            if self.name == "tsechod-metrics":
                with socket.socket() as probe:
                    probe.bind(("127.0.0.1", 0))
                    self.metrics_port = probe.getsockname()[1]
                cmd += ["--metrics-listen", f"127.0.0.1:{self.metrics_port}"]
        elif self.name == "tsechod-tls":
            make_tls_files(self.tmp)
            config = self.tmp / "tsechod-tls.toml"
            config.write_text(TSECHOD_CONFIG + TLS_LISTENER)
            cmd = [str(TSECHOD), "--config", str(config), "--log-level", "warning"]
        elif self.name in ("asyncio-tls", "uvloop-tls"):
            cert, key = make_tls_files(self.tmp)
            cmd = [PYTHON, str(BENCH_DIR / "asyncio_server.py"), "--tls-cert", str(cert), "--tls-key", str(key)]
            if self.name == "uvloop-tls":
                cmd.append("--uvloop")
        elif self.name == "tutorial":
            cmd = [PYTHON, str(BENCH_DIR / "tutorial_server.py")]
        elif self.name == "asyncio":
            cmd = [PYTHON, str(BENCH_DIR / "asyncio_server.py")]
        elif self.name == "uvloop":
            cmd = [PYTHON, str(BENCH_DIR / "asyncio_server.py"), "--uvloop"]
        elif self.name == "c-epoll":
            cmd = [str(EPOLL_SERVER)]
        else:
            raise BenchError(f"unknown server {self.name!r}")
        return (["taskset", "-c", "0"] + cmd) if self.pinned else cmd

    def __enter__(self) -> "Server":
        with open(self.log, "wb") as log:
            # stdout and stderr to a file, not a pipe: a server that logs a lot
            # must never block on a pipe nobody reads.
            env = None
            if self.name == "tsechod-baseline":
                if self.baseline_src is None:
                    raise BenchError("tsechod-baseline needs --baseline-src DIR (a tree with src/tsecho)")
                env = {**os.environ, "PYTHONPATH": str(self.baseline_src / "src")}
            elif self.name == "tsechod-candidate":
                env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
            self.proc = subprocess.Popen(
                self.command(), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                cwd=self.tmp, start_new_session=True, env=env,
            )
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        while time.monotonic() < deadline:
            match = LISTENING_RE.search(self.log.read_bytes())
            port = int(match.group(2)) if match else listening_port(self.proc.pid, exclude=self.metrics_port)
            if port:
                self.port = port
                if self.metrics_port:
                    self._scraper = threading.Thread(target=self._scrape, name="scraper", daemon=True)
                    self._scraper.start()
                return self
            if self.proc.poll() is not None:
                break
            time.sleep(0.02)  # polling for the listening line, bounded by the deadline
        tail = self.log.read_bytes()[-600:].decode(errors="replace").strip()
        self.stop()
        raise BenchError(f"{self.name} did not start (not listening): {tail or 'no output'}")

    def _scrape(self) -> None:
        """GET /metrics every SCRAPE_EVERY_S, as Prometheus would (15 s is its usual interval)."""
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        while not self._scraping.wait(SCRAPE_EVERY_S):
            try:
                with urllib.request.urlopen(url, timeout=5) as response:
                    if response.status == 200 and b"tsechod_lines_total" in response.read():
                        self.scrapes += 1
            except OSError:
                pass  # counted by its absence

    def stop(self) -> None:
        self._scraping.set()
        if self._scraper is not None:
            self._scraper.join(timeout=10)
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=SERVER_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)  # its own session: only the server's processes
            self.proc.wait(timeout=SERVER_STOP_TIMEOUT_S)

    def __exit__(self, *exc: object) -> None:
        self.stop()


def make_tls_files(tmp: Path) -> tuple[Path, Path]:
    """A self-signed P-256 certificate for localhost in *tmp* (tls.crt, tls.key), made once with openssl."""
    cert, key = tmp / "tls.crt", tmp / "tls.key"
    if not cert.exists():
        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
                        "-nodes", "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
                        "-days", "2", "-keyout", str(key), "-out", str(cert)],
                       check=True, capture_output=True, timeout=30)
    return cert, key


# ---------- one cell ----------

def run_cell(wl: Workload, server: Server, args: argparse.Namespace, label: str) -> Cell:
    cell = Cell(wl.name, label)
    duration, warmup = (("0.2", "0.05") if args.quick else (str(args.duration), "0.5"))
    cmd = [
        str(LOADGEN), "--port", str(server.port), "--workload", wl.kind, "--conns", str(wl.conns),
        "--duration", duration, "--warmup", warmup, "--grace", "5", "--label", label, *wl.extra,
    ]
    if args.spin:
        cmd.append("--spin")
    if server.name in PROXY_SERVERS:
        cmd += ["--proxy-header", str(PROXY_SERVERS[server.name])]
    if args.pin:
        cmd = ["taskset", "-c", "1"] + cmd
    assert server.proc is not None
    pid = server.proc.pid
    cell.before = memory_and_threads(pid)
    cpu0 = cpu_seconds(pid)
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.monotonic()
    gen = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert gen.stderr is not None and gen.stdout is not None
    stderr_lines = []
    # The generator bounds itself (setup timeout + idle + grace); this deadline is a backstop.
    deadline = time.monotonic() + 200
    for raw in gen.stderr:  # a few lines at most; EOF when the generator exits
        stderr_lines.append(raw.decode(errors="replace").rstrip())
        if raw.startswith(b"holding"):
            cell.during = memory_and_threads(pid)
        if time.monotonic() > deadline:
            break
    try:
        out, _ = gen.communicate(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        gen.kill()
        gen.communicate(timeout=10)
        cell.error = "load generator did not finish in time"
        return cell
    wall = time.monotonic() - t0
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cell.server_cpu_s = cpu_seconds(pid) - cpu0
    cell.gen_cpu_s = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
    cell.server_cpu_pct = 100 * cell.server_cpu_s / wall
    cell.gen_cpu_pct = 100 * cell.gen_cpu_s / wall
    if gen.returncode != 0:
        cell.error = f"load generator exited {gen.returncode}: {' '.join(stderr_lines)[-300:]}"
        return cell
    try:
        cell.result = json.loads(out.decode().strip().splitlines()[-1])
    except (ValueError, IndexError):
        cell.error = f"no result from the load generator: {out[-300:]!r}"
    if server.proc.poll() is not None:
        cell.error = f"server exited with {server.proc.returncode} during the run"
    return cell


# ---------- the whole run ----------

def machine_info() -> dict[str, str]:
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        import uvloop  # noqa: F401 (version only)

        uv = uvloop.__version__
    except ImportError:
        uv = "not installed"
    gcc = subprocess.run(["gcc", "--version"], capture_output=True, text=True, timeout=30).stdout.splitlines()
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "nproc": str(os.cpu_count()),
        "cpu": model,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "uvloop": uv,
        "gcc": gcc[0] if gcc else "unknown",
        "loadavg_start": " ".join(Path("/proc/loadavg").read_text().split()[:3]),
    }


def raise_nofile() -> int:
    """Soft RLIMIT_NOFILE = hard, inherited by the servers and the generator (hold needs 10,000+)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def fmt(x: float, digits: int = 0) -> str:
    if x != x:  # nan
        return "-"
    if digits == 0:
        return f"{x:,.0f}"
    return f"{x:,.{digits}f}"


def metric_values(cells: list[Cell], key: str) -> list[float]:
    return [float(c.result[key]) for c in cells if c.result is not None and key in c.result]


def summarise(all_cells: list[Cell], wls: list[Workload], servers: list[str]) -> tuple[list[str], dict[str, Any]]:
    """Markdown tables (one per workload) and the numbers they are made of."""
    lines: list[str] = []
    summary: dict[str, Any] = {}
    for wl in wls:
        rows = [s for s in servers if any(c.workload == wl.name and c.server == s for c in all_cells)]
        if not rows:
            continue
        cells_of = {s: [c for c in all_cells if c.workload == wl.name and c.server == s] for s in rows}
        med = {s: median(metric_values(cells_of[s], wl.metric)) for s in rows}
        summary[wl.name] = {s: med[s] for s in rows}
        lines.append(f"### {wl.name} ({wl.conns} connections)")
        lines.append("")
        if wl.name == "hold":
            lines.append("| server | set-up s (median) | spread | x uvloop (time) | held/survived | errors | RSS before KiB | RSS holding KiB | KiB per conn | threads before | threads holding |")
            lines.append("|---|---|---|---|---|---|---|---|---|---|---|")
        else:
            lines.append(f"| server | {wl.unit} (median) | spread (min-max) | x uvloop | x C | p50 us | p99 us | p99.9 us | errors | bad replies | server CPU % | generator CPU % | server CPU us/reply | generator CPU us/reply |")
            lines.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for s in rows:
            cs = cells_of[s]
            ok = [c for c in cs if c.result is not None]
            failed = [c.error for c in cs if c.error]
            vals = metric_values(cs, wl.metric)
            spread = f"{fmt(min(vals), 2 if wl.name == 'hold' else 0)}-{fmt(max(vals), 2 if wl.name == 'hold' else 0)}" if vals else "-"
            errors = sum(int(c.result["errors"]) for c in ok)
            bad = sum(int(c.result["bad_replies"]) for c in ok)
            if not ok:
                note = failed[0] if failed else "no result"
                lines.append(f"| {s} | failed: {note[:120]} |" + " |" * (10 if wl.name == "hold" else 13))
                continue
            if wl.name == "hold":
                held = median([float(c.result["held"]) for c in ok])
                surv = median([float(c.result["survivors"]) for c in ok])
                rb = median([float(c.before.get("rss_kib", 0)) for c in ok])
                rd = median([float(c.during.get("rss_kib", 0)) for c in ok if c.during])
                tb = median([float(c.before.get("threads", 0)) for c in ok])
                td = median([float(c.during.get("threads", 0)) for c in ok if c.during])
                per = (rd - rb) / held if held else float("nan")
                ratio = med[s] / med["uvloop"] if "uvloop" in med and med["uvloop"] else float("nan")
                summary[wl.name + ":detail"] = summary.get(wl.name + ":detail", {})
                summary[wl.name + ":detail"][s] = {"held": held, "survivors": surv, "kib_per_conn": per,
                                                   "rss_before": rb, "rss_holding": rd, "threads_before": tb,
                                                   "threads_holding": td}
                lines.append(
                    f"| {s} | {fmt(med[s], 2)} | {spread} | {fmt(ratio, 2)} | {fmt(held)}/{fmt(surv)} | {errors} | "
                    f"{fmt(rb)} | {fmt(rd)} | {fmt(per, 1)} | {fmt(tb)} | {fmt(td)} |"
                )
            else:
                r_uv = med[s] / med["uvloop"] if med.get("uvloop") else float("nan")
                r_c = med[s] / med["c-epoll"] if med.get("c-epoll") else float("nan")
                lat = {k: median(metric_values(cs, k)) for k in ("p50_us", "p99_us", "p999_us")}
                scpu = median([c.server_cpu_pct for c in ok if c.server_cpu_pct is not None])
                gcpu = median([c.gen_cpu_pct for c in ok if c.gen_cpu_pct is not None])
                s_us = median([c.cpu_us_per_reply()[0] for c in ok])
                g_us = median([c.cpu_us_per_reply()[1] for c in ok])
                summary[wl.name + ":cpu"] = summary.get(wl.name + ":cpu", {})
                summary[wl.name + ":cpu"][s] = (s_us, g_us)
                summary[wl.name + ":latency"] = summary.get(wl.name + ":latency", {})
                summary[wl.name + ":latency"][s] = lat
                lines.append(
                    f"| {s} | {fmt(med[s])} | {spread} | {fmt(r_uv, 2)} | {fmt(r_c, 2)} | {fmt(lat['p50_us'], 1)} | "
                    f"{fmt(lat['p99_us'], 1)} | {fmt(lat['p999_us'], 1)} | {errors} | {bad} | {fmt(scpu)} | {fmt(gcpu)} | "
                    f"{fmt(s_us, 1)} | {fmt(g_us, 1)} |"
                )
            for err in failed:
                lines.append(f"|  | failed run: {err[:150]} |" + " |" * (10 if wl.name == "hold" else 13))
        lines.append("")
    return lines, summary


def generator_check(summary: dict[str, Any]) -> list[str]:
    """Is the generator ahead of the servers? C server rate vs the best Python server, per workload."""
    out = []
    for name, meds in summary.items():
        if ":" in name or name == "hold" or "c-epoll" not in meds:
            continue
        py = {s: v for s, v in meds.items() if s != "c-epoll" and not s.startswith("tsechod-w") and v == v}
        if not py:
            continue
        best = max(py, key=lambda s: py[s])
        ratio = meds["c-epoll"] / py[best] if py[best] else float("nan")
        s_us, g_us = summary.get(name + ":cpu", {}).get("c-epoll", (float("nan"), float("nan")))
        out.append(f"| {name} | {fmt(meds['c-epoll'])} | {best} {fmt(py[best])} | {fmt(ratio, 2)} | "
                   f"{fmt(s_us, 2)} | {fmt(g_us, 2)} |")
    if not out:
        return []
    return ["| workload | C server | best Python server | C / best Python | C server CPU us/reply | generator CPU us/reply (driving C) |",
            "|---|---|---|---|---|---|", *out, ""]


def target_check(summary: dict[str, Any], server: str = "tsechod") -> list[str]:
    """Issue 5's targets for tsechod, each met or missed, from this run's medians."""
    def get(wl: str, s: str) -> float:
        v = summary.get(wl, {}).get(s, float("nan"))
        return float(v)

    def lat(wl: str, s: str, key: str) -> float:
        return float(summary.get(wl + ":latency", {}).get(s, {}).get(key, float("nan")))

    def verdict(ok: bool | None) -> str:
        return "n/a" if ok is None else ("met" if ok else "MISSED")

    def ratio(a: float, b: float) -> float:
        return a / b if b == b and a == a and b else float("nan")

    rows = []
    r = ratio(get("pingpong64", server), get("pingpong64", "uvloop"))
    rows.append(("pingpong 64 conns", ">= 1.5x uvloop", f"{fmt(r, 2)}x", None if r != r else r >= 1.5))
    r = ratio(get("pingpong256", server), get("pingpong256", "uvloop"))
    p_us, p_uv = lat("pingpong256", server, "p999_us"), lat("pingpong256", "uvloop", "p999_us")
    ok = None if r != r or p_us != p_us or p_uv != p_uv else (r >= 1.3 and p_us <= p_uv)
    rows.append(("pingpong 256 conns", ">= 1.3x uvloop, p99.9 <= uvloop's",
                 f"{fmt(r, 2)}x; p99.9 {fmt(p_us)} us vs {fmt(p_uv)} us", ok))
    r = ratio(get("pipeline", server), get("pipeline", "uvloop"))
    rows.append(("pipeline", ">= 10x uvloop", f"{fmt(r, 1)}x", None if r != r else r >= 10))
    r = ratio(get("connrate", server), get("connrate", "uvloop"))
    rows.append(("connection rate", ">= 1.0x uvloop", f"{fmt(r, 2)}x", None if r != r else r >= 1.0))
    detail = summary.get("hold:detail", {})
    if server in detail and "uvloop" in detail:
        d = detail[server]
        r = ratio(get("hold", server), get("hold", "uvloop"))
        survived = f"{fmt(d['survivors'])} of {fmt(float(HOLD_CONNS))}"
        ok = d["survivors"] >= HOLD_CONNS and d["kib_per_conn"] <= 12 and r <= 2
        rows.append(("hold 10,000", "all survive; <= 12 KiB/conn; set-up <= 2x uvloop's",
                     f"{survived} survived; {fmt(d['kib_per_conn'], 1)} KiB/conn; set-up {fmt(r, 2)}x", ok))
    else:
        rows.append(("hold 10,000", "all survive; <= 12 KiB/conn; set-up <= 2x uvloop's", "-", None))
    r = ratio(lat("pingpong1", server, "p50_us"), lat("pingpong1", "c-epoll", "p50_us"))
    rows.append(("pingpong 1 conn", "p50 <= 1.2x the C server's", f"{fmt(r, 2)}x", None if r != r else r <= 1.2))
    out = ["| workload | target | this run | verdict |", "|---|---|---|---|"]
    out += [f"| {a} | {b} | {c} | {verdict(d)} |" for a, b, c, d in rows]
    return out + [""]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run the tsecho benchmark and write benchmarks/RESULTS.md.")
    parser.add_argument("--quick", action="store_true", help="tiny durations, one repeat (the smoke test)")
    parser.add_argument("--only", action="append", default=[], metavar="WORKLOAD",
                        help="run only this workload (repeatable): pingpong1 pingpong16 pingpong64 pingpong256 "
                             "pipeline connrate hold workers")
    parser.add_argument("--servers", default=",".join(ALL_SERVERS),
                        help=f"comma-separated subset of {','.join(ALL_SERVERS)}, or the variants {','.join(VARIANTS)}")
    parser.add_argument("--baseline-src", type=Path, default=None, metavar="DIR",
                        help="source tree (with src/tsecho) that the tsechod-baseline server runs")
    parser.add_argument("--repeats", type=int, default=None, help="runs per cell (default 3, --quick 1)")
    parser.add_argument("--duration", type=float, default=2.0, help="measured seconds per run (default 2)")
    parser.add_argument("--workers", type=int, default=2, metavar="N",
                        help="also run tsechod --workers N vs --workers 1, unpinned (0 = skip; default 2)")
    parser.add_argument("--no-pin", dest="pin", action="store_false", help="don't pin with taskset")
    parser.add_argument("--spin", action="store_true",
                        help="generator busy-polls epoll instead of sleeping (lower latency, burns CPU 1)")
    parser.add_argument("--output", type=Path, default=None, help="where to write the Markdown (default benchmarks/RESULTS.md; --quick: none)")
    args = parser.parse_args(argv)

    servers = [s.strip() for s in args.servers.split(",") if s.strip()]
    known = (*ALL_SERVERS, *PROXY_SERVERS, "tsechod-access", *VARIANTS)
    unknown = [s for s in servers if s not in known]
    if unknown:
        parser.error(f"unknown server(s) {', '.join(unknown)}; choose from {', '.join(ALL_SERVERS)} "
                     f"(and, for the cost of their checks, {', '.join(PROXY_SERVERS)}, tsechod-access; "
                     f"for same-run comparisons, {', '.join(VARIANTS)})")
    wls = workloads(args.quick)
    names = [w.name for w in wls] + ["workers"]
    for only in args.only:
        if only not in names:
            parser.error(f"unknown workload {only!r}; choose from {', '.join(names)}")
    if args.only:
        wls = [w for w in wls if w.name in args.only]
    run_workers = args.workers > 1 and "tsechod" in servers and (not args.only or "workers" in args.only)
    repeats = args.repeats or (1 if args.quick else 3)
    if args.pin and (shutil.which("taskset") is None or (os.cpu_count() or 1) < 2):
        print("benchmark: taskset missing or fewer than 2 CPUs: running unpinned", file=sys.stderr)
        args.pin = False

    try:
        build()
    except BenchError as err:
        print(f"benchmark: {err}", file=sys.stderr)
        return 1
    nofile = raise_nofile()
    info = machine_info()
    info["nofile"] = str(nofile)
    started = time.monotonic()
    print(f"benchmark: {', '.join(servers)}; {len(wls)} workloads x {repeats} repeats; "
          f"{'pinned: servers CPU 0, generator CPU 1' if args.pin else 'unpinned'}", flush=True)

    cells: list[Cell] = []
    available = {s: True for s in servers}
    with tempfile.TemporaryDirectory(prefix="tsecho-bench-") as tmpdir:
        tmp = Path(tmpdir)
        plan: list[tuple[Workload, str, int, bool, str]] = []  # workload, server, workers, pinned, label
        for wl in wls:
            for _ in range(repeats):
                plan += [(wl, s, 1, args.pin, s) for s in servers]  # interleaved: A B C A B C
        if run_workers:
            by_name = {w.name: w for w in workloads(args.quick)}
            for name in WORKERS_WORKLOADS_QUICK if args.quick else WORKERS_WORKLOADS:
                for _ in range(repeats):
                    plan += [(by_name[name], "tsechod", n, False, f"tsechod-w{n}-unpinned") for n in (1, args.workers)]
        for wl, name, workers, pinned, label in plan:
            if not available.get(label, True):
                continue
            try:
                with Server(name, tmp, pinned=pinned, workers=workers, baseline_src=args.baseline_src) as server:
                    cell = run_cell(wl, server, args, label)
                if server.metrics_port:
                    print(f"  {'':12} {label:24} scrapes={server.scrapes}", flush=True)
            except BenchError as err:
                if name.startswith("tsechod"):
                    # the daemon is still being written: say so in the table, keep going
                    available[label] = False
                    cell = Cell(wl.name, label, error=("unsupported: " if workers > 1 else "") + str(err))
                else:
                    print(f"benchmark: {err}", file=sys.stderr)
                    return 1
            cells.append(cell)
            r = cell.result or {}
            headline = r.get("replies_per_s") if wl.metric == "replies_per_s" else r.get(wl.metric)
            print(f"  {wl.name:12} {label:24} "
                  + (f"{wl.metric}={headline} p50={r.get('p50_us')}us p99.9={r.get('p999_us')}us "
                     f"errors={r.get('errors')} bad={r.get('bad_replies')}" if cell.result else f"ERROR {cell.error}"),
                  flush=True)
    info["loadavg_end"] = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    elapsed = time.monotonic() - started

    table_servers = servers + sorted({c.server for c in cells if c.server not in servers})
    all_wls = wls + [w for w in workloads(args.quick) if w.name in WORKERS_WORKLOADS and w not in wls and run_workers]
    if run_workers and args.only:  # --only workers: its workloads were not in wls
        all_wls = [w for w in workloads(args.quick) if w.name in WORKERS_WORKLOADS] + wls
    lines, summary = summarise(cells, all_wls, table_servers)
    gen_lines = generator_check(summary)
    target_lines = target_check(summary) if "tsechod" in servers and not args.quick else []
    print()
    print("\n".join(lines))
    if target_lines:
        print("Issue 5 targets (tsechod):")
        print("\n".join(target_lines))
    if gen_lines:
        print("Generator headroom (the C server is driven by the same generator):")
        print("\n".join(gen_lines))
    bad_total = sum(int(c.result["bad_replies"]) for c in cells if c.result)
    print(f"benchmark: {len(cells)} runs in {elapsed:.0f} s; bad replies: {bad_total}", flush=True)

    output = args.output if args.output else (None if args.quick else RESULTS_MD)
    if output is not None:
        write_results(output, info, args, repeats, elapsed, lines, gen_lines, target_lines, cells)
        print(f"benchmark: wrote {output}")
    summary_json = {
        "bad_replies": {s: sum(int(c.result["bad_replies"]) for c in cells if c.result and c.server == s)
                        for s in table_servers},
        "runs_ok": {s: sum(1 for c in cells if c.server == s and c.result and not c.error) for s in table_servers},
        "failed": {s: [c.error for c in cells if c.server == s and c.error] for s in table_servers},
        "medians": {k: v for k, v in summary.items() if ":" not in k},
    }
    print("SUMMARY " + json.dumps(summary_json, sort_keys=True))
    return 0


def write_results(path: Path, info: dict[str, str], args: argparse.Namespace, repeats: int, elapsed: float,
                  lines: list[str], gen_lines: list[str], target_lines: list[str], cells: list[Cell]) -> None:
    cmd = "python benchmarks/run.py " + " ".join(sys.argv[1:])
    text = [
        "# Benchmark results",
        "",
        f"Written by `{cmd.strip()}` on {info['date']} ({elapsed:.0f} s). How to read this: docs/performance.md.",
        "",
        "## Machine",
        "",
        f"- CPUs: {info['nproc']} x {info['cpu']}",
        f"- kernel {info['kernel']}, Python {info['python']}, uvloop {info['uvloop']}, {info['gcc']}",
        f"- RLIMIT_NOFILE {info['nofile']}; load average {info['loadavg_start']} at the start, "
        f"{info['loadavg_end']} at the end (the machine is shared; see the spreads)",
        f"- {'servers pinned to CPU 0, generator to CPU 1' if args.pin else 'unpinned'}; "
        f"{repeats} runs per cell, servers interleaved; {args.duration if not args.quick else 0.25} s measured per run "
        "after a warm-up; 64-byte payloads; every reply checked",
        "",
        "## Results (medians of the runs; spread = min-max)",
        "",
        *lines,
    ]
    if target_lines:
        text += ["## Issue 5 targets", "", "Ratios of this run's medians (see the spreads above before trusting a "
                 "near miss or a near pass).", "", *target_lines]
    if gen_lines:
        text += ["## Generator headroom", "",
                 "The same generator drives the single-threaded C epoll server; how far it gets above the best Python "
                 "server shows the generator is not what limits the Python numbers. Where that ratio is small, compare "
                 "the CPU each side spends per reply: a generator that needs less CPU per reply than the C server "
                 "(each on its own core) leaves the C server's core to saturate first, so the limit is the server "
                 "side (mostly the kernel's per-send cost on loopback), not the generator.", "", *gen_lines]
    text += ["## Raw runs", "", "One JSON line per run, as the generator printed it (plus CPU and memory).", "", "```"]
    for c in cells:
        row = dict(c.result or {"label": c.server, "workload": c.workload, "error": c.error})
        row.update({"server_cpu_s": round(c.server_cpu_s, 3), "gen_cpu_s": round(c.gen_cpu_s, 3),
                    "server_cpu_pct": round(c.server_cpu_pct or 0, 1), "gen_cpu_pct": round(c.gen_cpu_pct or 0, 1)})
        if c.during:
            row.update({"before": c.before, "during": c.during})
        text.append(json.dumps(row))
    text += ["```", ""]
    path.write_text("\n".join(text))


if __name__ == "__main__":
    sys.exit(main())
