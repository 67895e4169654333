"""The Prometheus endpoint: the counters of state.py rendered at scrape time, served over HTTP.

A view, never a second set of counters: ``render`` takes a ``Figures`` (one
process's, or the supervisor's sum over its workers, the very numbers STATUS=
shows), a ``Reloads`` and the PIDs to describe, and writes the Prometheus text
format (version 0.0.4). Nothing on a connection's path knows metrics exist, so
turning them on costs the per-line path nothing (docs/performance.md).

``MetricsServer`` is a deliberately small HTTP/1.1 server (GET or HEAD of
``/metrics``; anything else 404): its own acceptor thread plus at most
``MAX_SCRAPERS`` request threads, a request of at most ``MAX_REQUEST_BYTES``
read within ``REQUEST_TIMEOUT_S``, one request per connection. It never takes
a connection slot of the echo service.

Written by hand rather than with prometheus-client: the whole exposition is
the ~100 lines below, its multiprocess mode (a directory of mmap files) would
duplicate what SharedFigures already does, and tsechod keeps its run-time
dependencies to the stdlib plus python-daemon (docs/operations.md, Metrics).
"""

from __future__ import annotations

import logging
import os
import platform
import resource
import socket
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Final

from . import __version__
from .address import ListenAddress, peer_name
from .state import CLOSE_REASONS, REFUSAL_REASONS, Figures, Reloads

logger = logging.getLogger(__name__)

METRICS_PATH: Final = "/metrics"
CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"
# A scrape request is one line and a few headers (Prometheus sends about 300 bytes).
MAX_REQUEST_BYTES: Final = 8192
REQUEST_TIMEOUT_S: Final = 5.0
# Scrapes served at once; more get "503" at once, without a thread.
MAX_SCRAPERS: Final = 4
ACCEPT_POLL_S: Final = 0.5
# After answering, what a scraper still sends is read and dropped for at most this long / this much.
LINGER_S: Final = 1.0
MAX_DRAIN_BYTES: Final = 1 << 20

_CLK_TCK: Final = os.sysconf("SC_CLK_TCK")
_PAGE_BYTES: Final = os.sysconf("SC_PAGE_SIZE")

Collect = Callable[[], bytes]


# -- the exposition -------------------------------------------------------------------


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


class _Writer:
    """Metric families in the text format: HELP and TYPE once, then the samples."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def family(self, name: str, kind: str, help_: str,
               samples: Iterable[tuple[dict[str, str], float]]) -> None:
        self.lines.append(f"# HELP {name} {help_}")
        self.lines.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            shown = ",".join(f'{k}="{_escape_label(v)}"' for k, v in labels.items())
            number = repr(float(value)) if isinstance(value, float) and not value.is_integer() else str(int(value))
            self.lines.append(f"{name}{{{shown}}} {number}" if shown else f"{name} {number}")

    def one(self, name: str, kind: str, help_: str, value: float) -> None:
        self.family(name, kind, help_, [({}, value)])

    def text(self) -> bytes:
        return ("\n".join(self.lines) + "\n").encode()


def render(figures: Figures, reloads: Reloads, pids: Sequence[int], workers: int = 1) -> bytes:
    """The metrics page: *figures* and *reloads* as they are now, process figures summed over *pids*.

    Reasons are taken from state.CLOSE_REASONS and state.REFUSAL_REASONS, so a
    reason added there is exported with no change here.
    """
    w = _Writer()
    w.family("tsechod_build_info", "gauge", "Version of tsechod and of the Python running it (always 1).",
             [({"version": __version__, "python": platform.python_version()}, 1)])
    w.one("tsechod_workers", "gauge", "Processes serving connections (1 without workers).", workers)
    w.one("tsechod_connections", "gauge", "Connections open now.", figures.connections)
    w.one("tsechod_connections_accepted_total", "counter", "Connections admitted (not refused).",
          figures.accepted)
    w.family("tsechod_connections_closed_total", "counter",
             "Connections ended, by the reason their access event gives.",
             [({"reason": reason}, count) for reason, count in zip(CLOSE_REASONS, figures.closed, strict=True)])
    w.family("tsechod_connections_refused_total", "counter",
             "Connections refused before being served, by reason.",
             [({"reason": reason}, count) for reason, count in zip(REFUSAL_REASONS, figures.refused, strict=True)])
    w.one("tsechod_lines_total", "counter", "Lines answered.", figures.lines)
    w.one("tsechod_received_bytes_total", "counter", "Bytes read from clients.", figures.bytes_in)
    w.one("tsechod_sent_bytes_total", "counter", "Bytes written to clients.", figures.bytes_out)
    w.family("tsechod_reloads_total", "counter", "Config reloads (SIGHUP), by result.",
             [({"result": "ok"}, reloads.ok), ({"result": "failed"}, reloads.failed)])
    w.one("tsechod_last_reload_successful", "gauge",
          "Whether the last reload took the new config (1 before any reload).", int(reloads.last_ok))
    w.one("tsechod_last_reload_timestamp_seconds", "gauge",
          "Unix time of the last reload, successful or not (0 before any reload).", reloads.last_at)
    processes = [p for p in (_read_process(pid) for pid in pids) if p is not None]
    suffix = " (summed over the supervisor and its workers)" if len(pids) > 1 else ""
    w.one("process_cpu_seconds_total", "counter", "User and system CPU time spent" + suffix + ".",
          sum(p[0] for p in processes))
    w.one("process_resident_memory_bytes", "gauge", "Resident memory" + suffix + ".",
          sum(p[1] for p in processes))
    w.one("process_open_fds", "gauge", "Open file descriptors" + suffix + ".", sum(p[2] for p in processes))
    w.one("process_max_fds", "gauge", "Limit on open file descriptors (per process).",
          resource.getrlimit(resource.RLIMIT_NOFILE)[0])
    w.one("process_threads", "gauge", "Threads" + suffix + ".", sum(p[3] for p in processes))
    w.one("process_start_time_seconds", "gauge", "Unix time the (first) process started.",
          processes[0][4] if processes else 0.0)
    return w.text()


def _boot_time_s() -> float:
    """Unix time of the boot, which /proc/PID/stat's start times count from.

    From the clocks, not /proc/stat's btime: the unit's ProcSubset=pid hides /proc/stat.
    """
    return time.time() - time.clock_gettime(time.CLOCK_BOOTTIME)


def _read_process(pid: int) -> tuple[float, int, int, int, float] | None:
    """(CPU seconds, RSS bytes, open fds, threads, start time) of *pid* from /proc; None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            # The command name is in parentheses and may contain anything: split after the last ')'.
            fields = stat.read().rpartition(b")")[2].split()
        fds = len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None
    # proc(5) numbers the fields from 1, and fields[0] is field 3 (state).
    cpu_s = (int(fields[11]) + int(fields[12])) / _CLK_TCK
    threads = int(fields[17])
    started = _boot_time_s() + int(fields[19]) / _CLK_TCK
    rss = int(fields[21]) * _PAGE_BYTES
    return cpu_s, rss, fds, threads, started


# -- the HTTP side --------------------------------------------------------------------


class MetricsServer:
    """GET /metrics on one listening socket, in its own threads; see the module docstring."""

    def __init__(self, sock: socket.socket, collect: Collect) -> None:
        self.socket = sock
        self.collect = collect
        self._slots = threading.BoundedSemaphore(MAX_SCRAPERS)
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        sock.settimeout(ACCEPT_POLL_S)

    @property
    def address(self) -> str:
        return peer_name(self.socket.getsockname())

    def start(self) -> None:
        self._thread = threading.Thread(target=self._accept_loop, name="tsecho-metrics", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop accepting (within ACCEPT_POLL_S) and close the listening socket."""
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout=ACCEPT_POLL_S * 4)
        self.socket.close()

    def _accept_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                conn, _ = self.socket.accept()
            except (TimeoutError, BlockingIOError, InterruptedError):
                continue
            except OSError as err:
                if self._stopping.is_set():
                    return
                logger.warning("metrics endpoint: cannot accept: %s", err.strerror or err)
                self._stopping.wait(ACCEPT_POLL_S)  # out of fds, say: don't spin
                continue
            if not self._slots.acquire(blocking=False):
                _respond(conn, b"503 Service Unavailable", b"too many scrapes at once\n", head=False)
                continue
            try:
                threading.Thread(target=self._serve, args=(conn,), name="tsecho-metrics-scrape",
                                 daemon=True).start()
            except RuntimeError:  # can't start a thread: out of memory or pids
                self._slots.release()
                conn.close()

    def _serve(self, conn: socket.socket) -> None:
        try:
            request = _read_request(conn)
            if request is None:
                conn.close()
                return
            method, target = request
            path = target.partition("?")[0]
            if path != METRICS_PATH:
                _respond(conn, b"404 Not Found", b"not found; metrics are at /metrics\n", method == "HEAD")
            elif method not in ("GET", "HEAD"):
                _respond(conn, b"405 Method Not Allowed", b"use GET\n", False, extra=b"Allow: GET, HEAD\r\n")
            else:
                _respond(conn, b"200 OK", self.collect(), method == "HEAD", content_type=CONTENT_TYPE)
        except Exception:  # a bug in rendering: say so once, keep serving the next scrape
            logger.exception("metrics endpoint: internal error")
            conn.close()
        finally:
            self._slots.release()


def _read_request(conn: socket.socket) -> tuple[str, str] | None:
    """(method, target) of the request on *conn*, or None (after answering 400 when it was bad)."""
    deadline = time.monotonic() + REQUEST_TIMEOUT_S
    data = b""
    while b"\r\n\r\n" not in data and b"\n\n" not in data:
        left = deadline - time.monotonic()
        if left <= 0 or len(data) > MAX_REQUEST_BYTES:
            _respond(conn, b"400 Bad Request", b"request too large or too slow\n", False)
            return None
        conn.settimeout(left)
        try:
            chunk = conn.recv(MAX_REQUEST_BYTES + 1 - len(data))
        except OSError:  # the timeout, or the scraper left
            return None
        if not chunk:
            return None
        data += chunk
    parts = data.split(b"\n", 1)[0].decode("latin-1").split()
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        _respond(conn, b"400 Bad Request", b"bad request line\n", False)
        return None
    return parts[0], parts[1]


def _respond(conn: socket.socket, status: bytes, body: bytes, head: bool,
             content_type: str = "text/plain; charset=utf-8", extra: bytes = b"") -> None:
    """Send one response and close: one request per connection keeps this server simple."""
    header = (b"HTTP/1.1 " + status + b"\r\nContent-Type: " + content_type.encode()
              + b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\nConnection: close\r\n" + extra + b"\r\n")
    try:
        conn.settimeout(REQUEST_TIMEOUT_S)
        conn.sendall(header if head else header + body)
        # Closing with unread input (an oversized request) would send a reset that can destroy
        # the answer: send FIN, then read and drop what is left, boundedly, until the peer closes.
        conn.shutdown(socket.SHUT_WR)
        conn.settimeout(LINGER_S)
        deadline = time.monotonic() + LINGER_S
        drained = 0
        while drained < MAX_DRAIN_BYTES and time.monotonic() < deadline:
            chunk = conn.recv(65536)
            if not chunk:
                break
            drained += len(chunk)
    except OSError:
        pass  # the scraper left, or lingered too long
    finally:
        conn.close()


def bind_metrics(address: ListenAddress) -> socket.socket:
    """A listening socket on *address*; OSError as from bind() (the caller words the message)."""
    family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
    infos = socket.getaddrinfo(address.host, address.port, family, socket.SOCK_STREAM)
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(infos[0][4])
        sock.listen(16)
    except BaseException:
        sock.close()
        raise
    return sock
