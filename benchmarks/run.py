"""Run the tsecho benchmark: tsechod against the baselines, one command.

    .venv/bin/python benchmarks/run.py            # full run (about 10 minutes on 2 cores)
    .venv/bin/python benchmarks/run.py --quick    # tiny durations (the smoke test)
    .venv/bin/python benchmarks/run.py --only pingpong64 --servers tsechod,uvloop

It builds the C parts (loadgen, epoll_server, threads_server) with the system gcc into
benchmarks/build/, starts each server fresh for every cell, pins servers to
CPU 0 and the generator to CPU 1, interleaves servers (A B C A B C), repeats
each cell, prints medians, spreads (min-max) and ratios to uvloop and to the C
server, and writes benchmarks/RESULTS.md. Then the same servers as users run
them: unpinned, the generator unpinned too (tsechod with its shipped
cpu_affinity, with it off, and with workers = number of CPUs), and tsechod
sharing its CPU with a busy loop. See docs/performance.md.

A benchmark, not a test: nothing here fails on speed. It exits non-zero only
if it could not run (no compiler, a baseline that doesn't start, the generator
crashing) or, with --check, if any reply was wrong.
"""

from __future__ import annotations

import argparse
import contextlib
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
THREADS_SERVER: Final = BUILD_DIR / "threads_server"
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

# c-threads: tsechod's shape (a thread per connection, blocking calls) in C, pinned rows only:
# what the shape costs, apart from what Python costs.
ALL_SERVERS: Final = ("tsechod", "tutorial", "asyncio", "uvloop", "c-epoll", "c-threads")
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
PYTHON_SERVERS: Final = ("tsechod", "tutorial", "asyncio", "uvloop")
DEFAULT_REPEATS: Final = 5
# Where the busy loop of the shared-CPU rows runs: the CPU cpu_affinity = "auto" pins a
# single tsechod to (the first allowed one).
BUSY_CPU: Final = 0
# How long tsechod with cpu_affinity = "auto" gets to move away from the busy CPU: its
# first status tick (5 s) looks at how busy each CPU was.
AUTO_MOVE_S: Final = 6.0


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


# Workloads also run as users run the servers: nothing pinned (server or generator).
UNPINNED_WORKLOADS: Final = ("pingpong64", "pingpong256", "pipeline", "connrate")
UNPINNED_WORKLOADS_QUICK: Final = ("pingpong64",)
# Workloads run with a busy loop on the CPU a single tsechod pins itself to.
SHARED_WORKLOADS: Final = ("pingpong64", "pingpong256")


@dataclass(frozen=True)
class Variant:
    """How one row runs its server: which server, how many workers, pinned or not, what else runs."""

    server: str
    label: str
    workers: int = 1
    pinned: bool = True  # server on CPU 0 and generator on CPU 1 (taskset), as the first rows
    affinity: str | None = None  # tsechod's cpu_affinity, when not its default
    busy: bool = False  # a CPU-bound loop runs on BUSY_CPU during the run
    settle_s: float = 0.0  # wait this long after the server starts, before the generator does


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
    """Compile loadgen and the C servers with the system gcc into benchmarks/build/."""
    gcc = shutil.which("gcc") or shutil.which("cc")
    if gcc is None:
        raise BenchError("no C compiler: install gcc (apt-get install gcc)")
    BUILD_DIR.mkdir(exist_ok=True)
    for name in ("loadgen", "epoll_server", "threads_server"):
        src, out = BENCH_DIR / f"{name}.c", BUILD_DIR / name
        sources = [src, BENCH_DIR / "bench_server.h"]  # the servers include it; loadgen doesn't mind
        if out.exists() and all(out.stat().st_mtime >= path.stat().st_mtime for path in sources):
            continue
        cmd = [gcc, "-O2", "-Wall", *(["-pthread"] if name == "threads_server" else []), "-o", str(out), str(src)]
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

    def __init__(self, name: str, tmp: Path, pinned: bool, workers: int = 1, baseline_src: Path | None = None,
                 affinity: str | None = None) -> None:
        self.name, self.tmp, self.pinned, self.workers, self.affinity = name, tmp, pinned, workers, affinity
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
            extra = f'[server]\ncpu_affinity = "{self.affinity}"\n' if self.affinity else ""
            config.write_text(extra + TSECHOD_CONFIG)
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
        elif self.name == "c-threads":
            cmd = [str(THREADS_SERVER)]
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

class BusyLoop:
    """A CPU-bound process on one CPU for the length of a cell: another tenant of tsechod's CPU."""

    def __init__(self, cpu: int) -> None:
        self.cpu = cpu
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> "BusyLoop":
        self.proc = subprocess.Popen(["taskset", "-c", str(self.cpu), PYTHON, "-c", "while True: pass"],
                                     stdin=subprocess.DEVNULL)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            self.proc.kill()  # our own child, by PID
            self.proc.wait(timeout=SERVER_STOP_TIMEOUT_S)


def run_cell(wl: Workload, server: Server, args: argparse.Namespace, label: str, gen_pinned: bool = True) -> Cell:
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
    if gen_pinned:
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

def make_plan(wls: list[Workload], servers: list[str], args: argparse.Namespace, repeats: int,
              run_pinned: bool, run_unpinned: bool) -> list[tuple[Workload, Variant]]:
    """Every run, in order: per workload, each repeat runs every row once (interleaved: A B C A B C)."""
    pinned = [Variant(s, s) for s in servers] if run_pinned else []
    unpinned: list[Variant] = []
    shared: list[Variant] = []
    if run_unpinned:
        unpinned = [Variant(s, f"{s}-unpinned", pinned=False) for s in PYTHON_SERVERS if s in servers]
        if "tsechod" in servers:
            unpinned.append(Variant("tsechod", "tsechod-off-unpinned", pinned=False, affinity="off"))
            if args.workers > 1:
                unpinned.append(Variant("tsechod", f"tsechod-w{args.workers}-unpinned", workers=args.workers,
                                        pinned=False))
            if (os.cpu_count() or 1) > 1 and shutil.which("taskset"):
                # pin0: stays on the busy CPU (what sharing costs); auto: moves away within a tick.
                shared = [Variant("tsechod", f"tsechod-pin{BUSY_CPU}-unpinned-busy", pinned=False,
                                  affinity=str(BUSY_CPU), busy=True),
                          Variant("tsechod", "tsechod-unpinned-busy", pinned=False, busy=True,
                                  settle_s=0.5 if args.quick else AUTO_MOVE_S),
                          Variant("tsechod", "tsechod-off-unpinned-busy", pinned=False, affinity="off", busy=True)]
                shared += [Variant("uvloop", "uvloop-unpinned-busy", pinned=False, busy=True)] if "uvloop" in servers else []
    unpinned_wls = UNPINNED_WORKLOADS_QUICK if args.quick else UNPINNED_WORKLOADS
    shared_wls = UNPINNED_WORKLOADS_QUICK if args.quick else SHARED_WORKLOADS
    plan: list[tuple[Workload, Variant]] = []
    for wl in wls:
        rows = pinned + (unpinned if wl.name in unpinned_wls else []) + (shared if wl.name in shared_wls else [])
        for _ in range(repeats):
            plan += [(wl, variant) for variant in rows]
    return plan

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
                # An unpinned row is compared with uvloop run the same way (same suffix); C runs pinned only.
                how = s[s.index("-unpinned"):] if "-unpinned" in s else ""
                r_uv = med[s] / med["uvloop" + how] if med.get("uvloop" + how) else float("nan")
                r_c = med[s] / med["c-epoll"] if med.get("c-epoll") and not how else float("nan")
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
        py = {s: v for s, v in meds.items() if s in PYTHON_SERVERS and v == v}  # the pinned rows
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


def comparison(summary: dict[str, Any], wls: list[Workload]) -> list[str]:
    """tsechod's ratio to the tutorial server and to uvloop, in each workload, pinned and as it comes."""
    def ratio(wl: str, a: str, b: str) -> str:
        meds = summary.get(wl, {})
        x, y = float(meds.get(a, float("nan"))), float(meds.get(b, float("nan")))
        return fmt(x / y, 2) + "x" if x == x and y == y and y else "-"

    workers = sorted({s for wl in summary.values() if isinstance(wl, dict) for s in wl
                      if isinstance(s, str) and s.startswith("tsechod-w") and s.endswith("-unpinned")})
    out = []
    for wl in wls:
        if wl.name == "hold" or wl.name not in summary:
            continue
        row = [wl.name, ratio(wl.name, "tsechod", "tutorial"), ratio(wl.name, "tsechod", "uvloop"),
               ratio(wl.name, "tsechod-unpinned", "tutorial-unpinned"), ratio(wl.name, "tsechod-unpinned", "uvloop-unpinned"),
               ratio(wl.name, "tsechod-unpinned", "tsechod"), ratio(wl.name, "tsechod-off-unpinned", "tsechod")]
        row += [ratio(wl.name, w, "tutorial-unpinned") + " / " + ratio(wl.name, w, "uvloop-unpinned") for w in workers]
        out.append("| " + " | ".join(row) + " |")
    if not out:
        return []
    head = ("| workload | pinned: x tutorial | pinned: x uvloop | unpinned: x tutorial | unpinned: x uvloop | "
            "unpinned / pinned | cpu_affinity off, unpinned / pinned |"
            + "".join(f" {w}: x tutorial / x uvloop (unpinned) |" for w in workers))
    return [head, "|" + "---|" * (7 + len(workers)), *out, ""]


def target_check(summary: dict[str, Any], cells: list[Cell], server: str = "tsechod") -> list[str]:
    """Issue 10's targets (and the ones issue 5 met, to keep) for tsechod: met or missed, from this run's medians."""
    def values(wl: str, s: str, key: str) -> list[float]:
        return [float(c.result[key]) for c in cells
                if c.workload == wl and c.server == s and c.result is not None and key in c.result]

    def spread(wl: str, s: str, key: str, digits: int = 0) -> str:
        v = values(wl, s, key)
        return f"{fmt(min(v), digits)}-{fmt(max(v), digits)}" if v else "-"

    def med(wl: str, s: str, key: str = "") -> float:
        key = key or ("connections_per_s" if wl == "connrate" else "replies_per_s")
        return median(values(wl, s, key))

    def ratio(a: float, b: float) -> float:
        return a / b if b == b and a == a and b else float("nan")

    rows = []

    def row(what: str, target: str, r: float, ok: bool | None, spreads: str) -> None:
        verdict = "n/a" if ok is None or r != r else ("met" if ok else "MISSED")
        rows.append(f"| {what} | {target} | {fmt(r, 2)}x | {spreads} | {verdict} |")

    def rate(wl: str) -> str:
        return "connections_per_s" if wl == "connrate" else "replies_per_s"

    for wl in ("pingpong64", "pingpong256", "connrate"):
        r = ratio(med(wl, f"{server}-unpinned"), med(wl, server))
        row(f"{wl}, as it comes", ">= 0.9x tsechod pinned", r, r >= 0.9,
            f"unpinned {spread(wl, server + '-unpinned', rate(wl))}; pinned {spread(wl, server, rate(wl))}")
    r = ratio(med("pingpong64", f"{server}-unpinned"), med("pingpong64", "uvloop-unpinned"))
    row("pingpong64, as it comes", ">= 0.8x uvloop (unpinned)", r, r >= 0.8,
        f"tsechod {spread('pingpong64', server + '-unpinned', 'replies_per_s')}; "
        f"uvloop {spread('pingpong64', 'uvloop-unpinned', 'replies_per_s')}")
    for wl in ("pingpong1", "pingpong16", "pingpong64", "pingpong256"):
        r = ratio(med(wl, server), med(wl, "tutorial"))
        row(f"{wl}, pinned", ">= 1.0x the tutorial server", r, r >= 1.0,
            f"tsechod {spread(wl, server, 'replies_per_s')}; tutorial {spread(wl, 'tutorial', 'replies_per_s')}")
    r = ratio(med("pingpong256", server, "p999_us"), med("pingpong256", "uvloop", "p999_us"))
    row("pingpong256 p99.9, pinned", "<= 3x uvloop's", r, r <= 3,
        f"tsechod {spread('pingpong256', server, 'p999_us')} us; uvloop {spread('pingpong256', 'uvloop', 'p999_us')} us")
    # Not a target: the same ratio for the shape written in C, the floor a thread per connection allows.
    r = ratio(med("pingpong256", "c-threads", "p999_us"), med("pingpong256", "uvloop", "p999_us"))
    row("pingpong256 p99.9, pinned: c-threads (the shape in C)", "for reference", r, None,
        f"c-threads {spread('pingpong256', 'c-threads', 'p999_us')} us")
    r = ratio(med("pipeline", server), med("pipeline", "uvloop"))
    row("pipeline, pinned", ">= 30x uvloop", r, r >= 30,
        f"tsechod {spread('pipeline', server, 'replies_per_s')}; uvloop {spread('pipeline', 'uvloop', 'replies_per_s')}")
    r = ratio(med("connrate", server), med("connrate", "uvloop"))
    row("connrate, pinned", ">= 1.0x uvloop", r, r >= 1.0,
        f"tsechod {spread('connrate', server, 'connections_per_s')}; uvloop {spread('connrate', 'uvloop', 'connections_per_s')}")
    r = ratio(med("pingpong1", server, "p50_us"), med("pingpong1", "c-epoll", "p50_us"))
    row("pingpong1 p50, pinned", "<= 1.2x the C server's", r, r <= 1.2,
        f"tsechod {spread('pingpong1', server, 'p50_us', 1)} us; C {spread('pingpong1', 'c-epoll', 'p50_us', 1)} us")
    return ["| workload | target | this run (ratio of medians) | spreads (min-max) | verdict |",
            "|---|---|---|---|---|", *rows, ""]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run the tsecho benchmark and write benchmarks/RESULTS.md.")
    parser.add_argument("--quick", action="store_true", help="tiny durations, one repeat (the smoke test)")
    parser.add_argument("--only", action="append", default=[], metavar="WORKLOAD",
                        help="run only this workload (repeatable): pingpong1 pingpong16 pingpong64 pingpong256 "
                             "pipeline connrate hold; 'pinned' or 'unpinned' to run only those rows")
    parser.add_argument("--servers", default=",".join(ALL_SERVERS),
                        help=f"comma-separated subset of {','.join(ALL_SERVERS)}, or the variants {','.join(VARIANTS)}")
    parser.add_argument("--baseline-src", type=Path, default=None, metavar="DIR",
                        help="source tree (with src/tsecho) that the tsechod-baseline server runs")
    parser.add_argument("--repeats", "--reps", type=int, default=None,
                        help=f"runs per cell (default {DEFAULT_REPEATS}, --quick 1)")
    parser.add_argument("--duration", type=float, default=2.0, help="measured seconds per run (default 2)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, metavar="N",
                        help="the unpinned rows include tsechod --workers N (default: the number of CPUs; "
                             "0 or 1: no such row)")
    parser.add_argument("--no-pin", dest="pin", action="store_false",
                        help="don't use taskset: only the unpinned rows run")
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
    names = [w.name for w in wls] + ["pinned", "unpinned"]
    for only in args.only:
        if only not in names:
            parser.error(f"unknown workload {only!r}; choose from {', '.join(names)}")
    only_wls = [o for o in args.only if o not in ("pinned", "unpinned")]
    if only_wls:
        wls = [w for w in wls if w.name in only_wls]
    repeats = args.repeats or (1 if args.quick else DEFAULT_REPEATS)
    if args.pin and (shutil.which("taskset") is None or (os.cpu_count() or 1) < 2):
        print("benchmark: taskset missing or fewer than 2 CPUs: running unpinned", file=sys.stderr)
        args.pin = False
    run_pinned = args.pin and ("unpinned" not in args.only or "pinned" in args.only)
    run_unpinned = "pinned" not in args.only or "unpinned" in args.only

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
          f"{'pinned rows: servers CPU 0, generator CPU 1; ' if run_pinned else ''}"
          f"{'unpinned rows: nothing pinned' if run_unpinned else ''}", flush=True)

    cells: list[Cell] = []
    available = {s: True for s in servers}
    with tempfile.TemporaryDirectory(prefix="tsecho-bench-") as tmpdir:
        tmp = Path(tmpdir)
        plan = make_plan(wls, servers, args, repeats, run_pinned, run_unpinned)
        for wl, variant in plan:
            label, name, workers = variant.label, variant.server, variant.workers
            if not available.get(label, True):
                continue
            try:
                with contextlib.ExitStack() as stack:
                    if variant.busy:
                        stack.enter_context(BusyLoop(BUSY_CPU))
                    server = stack.enter_context(
                        Server(name, tmp, pinned=variant.pinned, workers=workers, baseline_src=args.baseline_src,
                               affinity=variant.affinity))
                    if variant.settle_s:
                        time.sleep(variant.settle_s)  # a fixed settling time, part of the row's definition
                    cell = run_cell(wl, server, args, label, gen_pinned=variant.pinned)
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

    labels_in_plan = list(dict.fromkeys(variant.label for _, variant in plan))
    table_servers = [s for s in labels_in_plan if s in servers] + [s for s in labels_in_plan if s not in servers]
    lines, summary = summarise(cells, wls, table_servers)
    gen_lines = generator_check(summary)
    compare_lines = comparison(summary, wls)
    target_lines = target_check(summary, cells) if "tsechod" in servers and not args.quick else []
    print()
    print("\n".join(lines))
    if compare_lines:
        print("tsechod against the tutorial server and uvloop, pinned and as it comes:")
        print("\n".join(compare_lines))
    if target_lines:
        print("Targets (tsechod):")
        print("\n".join(target_lines))
    if gen_lines:
        print("Generator headroom (the C server is driven by the same generator):")
        print("\n".join(gen_lines))
    bad_total = sum(int(c.result["bad_replies"]) for c in cells if c.result)
    print(f"benchmark: {len(cells)} runs in {elapsed:.0f} s; bad replies: {bad_total}", flush=True)

    output = args.output if args.output else (None if args.quick else RESULTS_MD)
    if output is not None:
        write_results(output, info, args, repeats, elapsed, lines, gen_lines, compare_lines, target_lines, cells)
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
                  lines: list[str], gen_lines: list[str], compare_lines: list[str], target_lines: list[str],
                  cells: list[Cell]) -> None:
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
        f"- rows without a suffix: server pinned to CPU 0, generator to CPU 1; `-unpinned`: nothing pinned "
        f"(tsechod with its default cpu_affinity = \"auto\", `-off-`: cpu_affinity = \"off\", `-wN-`: workers = N); "
        f"`-busy`: a CPU-bound loop runs on CPU {BUSY_CPU} meanwhile (the CPU a single tsechod pins itself to first; "
        f"`-pin{BUSY_CPU}-`: cpu_affinity = \"{BUSY_CPU}\", it stays there; the auto row starts measuring "
        f"{AUTO_MOVE_S:g} s after tsechod started, time for it to move away); "
        f"{repeats} runs per cell, servers interleaved; {args.duration if not args.quick else 0.25} s measured per run "
        "after a warm-up; 64-byte payloads; every reply checked",
        "",
        "## Results (medians of the runs; spread = min-max)",
        "",
        *lines,
    ]
    if compare_lines:
        text += ["## tsechod against the tutorial server and uvloop", "",
                 "Ratios of this run's medians: pinned rows against pinned rows, unpinned against unpinned.", "",
                 *compare_lines]
    if target_lines:
        text += ["## Targets (issue 10, and issue 5's that were met)", "",
                 "Ratios of this run's medians, with each side's spread over the runs (see the spreads before "
                 "trusting a near miss or a near pass).", "", *target_lines]
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
