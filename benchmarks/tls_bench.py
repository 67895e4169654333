"""TLS rows of the benchmark: pingpong 64 and connection rate, TLS next to plaintext, one command.

    .venv/bin/python benchmarks/tls_bench.py                 # 3 runs per cell, 2 s each
    .venv/bin/python benchmarks/tls_bench.py --repeats 1 --duration 0.5

The C load generator (benchmarks/loadgen.c) speaks no TLS, so these rows use a
Python generator (this file, ``--generate``: asyncio on uvloop, one process,
pinned to CPU 1): every server, plaintext ones included, is driven by that same
generator, so the rows compare with each other, not with benchmarks/RESULTS.md's.
Where the generator's CPU is near 100 % it, not the server, is the limit: the
table shows both. Servers (run.py's ``Server``, pinned to CPU 0, started fresh
for each run, interleaved): tsechod, asyncio, uvloop, and each with TLS
(a self-signed P-256 certificate; TLS 1.3, the client's default).

It also holds 1,000 idle TLS connections (and 1,000 plaintext ones) open to
tsechod and reports the RSS each costs. A benchmark, not a test: nothing fails
on speed. See docs/performance.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import PYTHON, Server, cpu_seconds, make_tls_files, memory_and_threads, raise_nofile  # noqa: E402

SERVERS = ("tsechod", "tsechod-tls", "asyncio", "asyncio-tls", "uvloop", "uvloop-tls")
PAYLOAD = b"x" * 63 + b"\n"  # 64 bytes
HOLD = 1000


# ---------- the generator (a subprocess, pinned to CPU 1) ----------


async def _open(port: int, context: ssl.SSLContext | None) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", port, ssl=context,
                                         server_hostname="localhost" if context else None)


async def _pingpong(port: int, context: ssl.SSLContext | None, conns: int, warmup: float, duration: float) -> dict[str, Any]:
    streams = [await _open(port, context) for _ in range(conns)]
    latencies: list[float] = []
    counts = {"replies": 0, "bad": 0}
    start = time.perf_counter() + warmup
    end = start + duration

    async def loop(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while (now := time.perf_counter()) < end:
            writer.write(PAYLOAD)
            line = await reader.readline()
            done = time.perf_counter()
            if not line.endswith(b"] " + PAYLOAD):
                counts["bad"] += 1
            if now >= start:
                counts["replies"] += 1
                latencies.append(done - now)

    await asyncio.gather(*(loop(r, w) for r, w in streams))
    for _, writer in streams:
        writer.close()
    return {"replies_per_s": round(counts["replies"] / duration), "bad_replies": counts["bad"], **_lat(latencies)}


async def _connrate(port: int, context: ssl.SSLContext | None, conns: int, warmup: float, duration: float) -> dict[str, Any]:
    latencies: list[float] = []
    counts = {"done": 0, "bad": 0, "errors": 0}
    start = time.perf_counter() + warmup
    end = start + duration

    async def loop() -> None:
        while (now := time.perf_counter()) < end:
            try:
                reader, writer = await _open(port, context)
                writer.write(PAYLOAD)
                line = await reader.readline()
                writer.close()
                await writer.wait_closed()
            except (OSError, ssl.SSLError):
                counts["errors"] += 1
                continue
            if not line.endswith(b"] " + PAYLOAD):
                counts["bad"] += 1
            if now >= start:
                counts["done"] += 1
                latencies.append(time.perf_counter() - now)

    await asyncio.gather(*(loop() for _ in range(conns)))
    return {"connections_per_s": round(counts["done"] / duration), "bad_replies": counts["bad"],
            "errors": counts["errors"], **_lat(latencies)}


def _lat(latencies: list[float]) -> dict[str, float]:
    if not latencies:
        return {}
    latencies.sort()
    return {"p50_us": round(1e6 * latencies[len(latencies) // 2]),
            "p99_us": round(1e6 * latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))])}


def generate(args: argparse.Namespace) -> None:
    import uvloop

    context = None
    if args.tls:
        context = ssl.create_default_context(cafile=args.tls)
    work = _pingpong if args.workload == "pingpong64" else _connrate
    conns = 64 if args.workload == "pingpong64" else 8
    result = uvloop.run(work(args.port, context, conns, args.warmup, args.duration))
    print(json.dumps(result))


# ---------- the driver ----------


def run_one(server: Server, workload: str, duration: float, tmp: Path) -> dict[str, Any]:
    cmd = ["taskset", "-c", "1", PYTHON, __file__, "--generate", "--port", str(server.port), "--workload", workload,
           "--duration", str(duration), "--warmup", "0.3"]
    if server.name.endswith("-tls"):
        cmd += ["--tls", str(tmp / "tls.crt")]
    assert server.proc is not None
    cpu0 = cpu_seconds(server.proc.pid)
    t0 = time.monotonic()
    out = subprocess.run(cmd, capture_output=True, timeout=60 + duration, check=True)
    wall = time.monotonic() - t0
    result: dict[str, Any] = json.loads(out.stdout.decode().strip().splitlines()[-1])
    result["server_cpu_pct"] = round(100 * (cpu_seconds(server.proc.pid) - cpu0) / wall)
    return result


async def _hold(port: int, context: ssl.SSLContext | None, count: int) -> list[asyncio.StreamWriter]:
    writers = []
    for _ in range(count):
        reader, writer = await _open(port, context)
        writer.write(PAYLOAD)
        await reader.readline()
        writers.append(writer)
    return writers


def hold_memory(tmp: Path) -> dict[str, float]:
    """KiB of server RSS per held connection (1,000 idle connections, each answered once)."""
    import uvloop

    kib = {}
    for name in ("tsechod", "tsechod-tls"):
        with Server(name, tmp, pinned=False) as server:
            assert server.proc is not None
            context = ssl.create_default_context(cafile=str(tmp / "tls.crt")) if name.endswith("-tls") else None

            async def run() -> tuple[dict[str, int], dict[str, int]]:
                writers = await _hold(server.port, context, 1)
                await asyncio.sleep(2.5)  # parked threads from the warm-up leave (server.PARK_S)
                before = memory_and_threads(server.proc.pid)  # type: ignore[union-attr]
                writers += await _hold(server.port, context, HOLD)
                await asyncio.sleep(0.5)
                during = memory_and_threads(server.proc.pid)  # type: ignore[union-attr]
                for writer in writers:
                    writer.close()
                return before, during

            before, during = uvloop.run(run())
            kib[name] = round((during["rss_kib"] - before["rss_kib"]) / HOLD, 1)
            kib[name + " threads"] = during["threads"] - before["threads"]
    return kib


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--generate", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--tls", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--warmup", type=float, default=0.3, help=argparse.SUPPRESS)
    parser.add_argument("--workload", choices=("pingpong64", "connrate"), default="pingpong64", help=argparse.SUPPRESS)
    parser.add_argument("--duration", type=float, default=2.0, help="measured seconds per run (default 2)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per cell (default 3)")
    parser.add_argument("--servers", default=",".join(SERVERS), help=f"comma-separated subset of {','.join(SERVERS)}")
    args = parser.parse_args()
    if args.generate:
        generate(args)
        return 0
    raise_nofile()
    servers = [s for s in args.servers.split(",") if s]
    rows: dict[tuple[str, str], list[dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory(prefix="tsecho-tls-bench-") as tmpdir:
        tmp = Path(tmpdir)
        make_tls_files(tmp)
        for workload in ("pingpong64", "connrate"):
            for _ in range(args.repeats):
                for name in servers:  # interleaved: A B C A B C
                    with Server(name, tmp, pinned=True) as server:
                        result = run_one(server, workload, args.duration, tmp)
                    rows.setdefault((workload, name), []).append(result)
                    print(f"  {workload:10} {name:12} {json.dumps(result)}", flush=True)
        memory = hold_memory(tmp) if "tsechod-tls" in servers else {}
    print()
    print("| workload | server | median | spread (min-max) | p50 µs | p99 µs | server CPU % |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for (workload, name), results in rows.items():
        key = "replies_per_s" if workload == "pingpong64" else "connections_per_s"
        values = [r[key] for r in results]
        print(f"| {workload} | {name} | {statistics.median(values):,.0f} | {min(values):,}-{max(values):,} | "
              f"{statistics.median(r.get('p50_us', 0) for r in results):,.0f} | "
              f"{statistics.median(r.get('p99_us', 0) for r in results):,.0f} | "
              f"{statistics.median(r['server_cpu_pct'] for r in results):.0f} |")
    if memory:
        print()
        print(f"held idle connections ({HOLD}): " + ", ".join(f"{k}: {v}" for k, v in memory.items())
              + " (KiB of RSS per connection; threads added)")
    bad = sum(r.get("bad_replies", 0) for results in rows.values() for r in results)
    print(f"bad replies: {bad}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
