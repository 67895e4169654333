"""``workers > 1``: one supervising process and N worker processes on the same sockets.

The main process binds the listeners (so errors reach the terminal and ports
below 1024 work before privileges drop), then forks the workers. Each worker is
an ordinary single-process tsechod (a ``Service`` over its own ``ServerState``)
accepting on the inherited sockets; the kernel spreads connections among them.
The supervisor only does process control: it forwards SIGTERM, SIGHUP and
SIGUSR1, replaces a worker that dies, and speaks for all of them to systemd
(READY once every worker is up, STATUS with the sums, WATCHDOG while every
worker's accept loop turns). No sockets are served here; see service.py.
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import os
import queue
import select
import signal
import socket
import struct
import time
from collections.abc import Callable, Sequence
from typing import Final

from . import systemd
from .config import Config, ConfigError
from .logsetup import configure_logging, reopen_logs
from .server import EchoServer, ServerState
from .service import STOP_GRACE_S, STOP_SIGNALS, Notify, Service, ignore_signals_while_exiting

logger = logging.getLogger(__name__)

TICK_S: Final = 0.5
STATUS_EVERY_S: Final = 5.0
WORKER_STARTUP_TIMEOUT_S: Final = 30.0
# A worker that dies this soon after starting is restarted only after a pause,
# so a crash at startup doesn't turn into a fork loop.
QUICK_DEATH_S: Final = 1.0
RESTART_PAUSE_S: Final = 1.0
# Workers tick this often (STATUS figures, accept-loop liveness) into shared memory.
WORKER_TICK_S: Final = 1.0
PR_SET_PDEATHSIG: Final = 1  # from <linux/prctl.h>
_SLOT: Final = struct.Struct("qqqd")  # connections, lines, refused, monotonic time the accept loops last turned


class SharedFigures:
    """Each worker's live figures in one shared anonymous mapping, a slot per worker.

    A slot has one writer (its worker) and one reader (the supervisor); a torn
    read only skews a STATUS line for a few seconds.
    """

    def __init__(self, workers: int) -> None:
        self._mem = mmap.mmap(-1, _SLOT.size * workers)  # MAP_SHARED: survives fork() shared

    def write(self, index: int, state: ServerState, alive_at: float | None = None) -> None:
        old = self.read(index)
        figures = (state.connections, state.lines, state.refused, old[3] if alive_at is None else alive_at)
        _SLOT.pack_into(self._mem, index * _SLOT.size, *figures)

    def read(self, index: int) -> tuple[int, int, int, float]:
        return _SLOT.unpack_from(self._mem, index * _SLOT.size)

    def clear(self, index: int) -> None:
        _SLOT.pack_into(self._mem, index * _SLOT.size, 0, 0, 0, time.monotonic())


class Supervisor:
    """Start, watch and stop the worker processes."""

    def __init__(
        self,
        config: Config,
        sockets: Sequence[socket.socket],
        load_config: Callable[[], Config],
        notify: Notify = systemd.notify,
        watchdog_s: float | None = None,
        on_ready: Callable[[], object] | None = None,
    ) -> None:
        self.config = config
        self.sockets = list(sockets)
        self.load_config = load_config
        self.notify = notify
        self.watchdog_s = watchdog_s
        self.on_ready = on_ready
        self.workers: dict[int, int] = {}  # index -> pid
        self._started_at: dict[int, float] = {}
        self._restart_at: dict[int, float] = {}
        self._figures = SharedFigures(config.workers)
        self._ready_r, self._ready_w = os.pipe()
        self._stopping = False
        self._supervisor_pid = os.getpid()

    # -- the supervisor ------------------------------------------------------------------

    def run(self) -> int:
        """Run the workers until SIGTERM or SIGINT; return the exit status."""
        received: queue.SimpleQueue[int] = queue.SimpleQueue()
        for handled in (*STOP_SIGNALS, signal.SIGHUP, signal.SIGUSR1, signal.SIGCHLD):
            signal.signal(handled, lambda s, _frame: received.put_nowait(s))
        for index in range(self.config.workers):
            self._spawn(index)
        if not self._wait_until_all_ready():
            logger.error("not every worker started within %.0f s; stopping", WORKER_STARTUP_TIMEOUT_S)
            self._stop()
            return 1
        logger.info("%d workers ready: %s", len(self.workers),
                    ", ".join(f"PID {pid}" for pid in self.workers.values()))
        self.notify("READY=1")
        if self.on_ready is not None:
            self.on_ready()
        next_status = 0.0
        while True:
            try:
                signum = received.get(timeout=TICK_S)
            except queue.Empty:
                signum = 0
            if signum in STOP_SIGNALS:
                logger.info("received %s: stopping %d workers", signal.Signals(signum).name, len(self.workers))
                break
            if signum == signal.SIGHUP:
                self._reload()
            elif signum == signal.SIGUSR1:
                logger.info("received SIGUSR1: reopening log files")
                reopen_logs()
                self._forward(signal.SIGUSR1)
            self._reap()
            self._restart_due()
            self._drain_ready_pipe()
            if time.monotonic() >= next_status:
                next_status = time.monotonic() + min(STATUS_EVERY_S, (self.watchdog_s or 15.0) / 3)
                self._report()
        self._stop()
        logger.info("stopped")
        ignore_signals_while_exiting()
        return 0

    def _reload(self) -> None:
        """Check the new config once here, then let every worker reload it."""
        logger.info("received SIGHUP: reloading config in %d workers", len(self.workers))
        self.notify(systemd.reloading_message())
        try:
            new = self.load_config()
        except ConfigError as err:
            logger.error("reload failed, keeping the running config: %s", err)
        else:
            if new.workers != self.config.workers:
                logger.warning("reload: workers changed; it applies only after a restart (systemctl restart tsechod)")
            try:
                configure_logging(new)
            except OSError as err:
                logger.error("reload: cannot open log file %s: %s; keeping the old log settings", new.log_file, err)
            self._forward(signal.SIGHUP)
        self.notify("READY=1")

    def _report(self) -> None:
        now = time.monotonic()
        figures = [self._figures.read(i) for i in self.workers]
        conns, lines, refused = (sum(f[k] for f in figures) for k in range(3))
        self.notify(f"STATUS={len(self.workers)} workers, {conns} connections, {lines} lines, {refused} refused")
        limit = max(3 * WORKER_TICK_S, (self.watchdog_s or 0) / 2)
        all_alive = len(self.workers) == self.config.workers and all(now - f[3] < limit for f in figures)
        if self.watchdog_s and all_alive:
            self.notify("WATCHDOG=1")

    def _forward(self, signum: int) -> None:
        for pid in self.workers.values():
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass  # it died; _reap() will see it

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            index = next((i for i, p in self.workers.items() if p == pid), None)
            if index is None:
                continue
            del self.workers[index]
            self._figures.clear(index)
            if self._stopping:
                continue
            how = _describe_status(status)
            lived = time.monotonic() - self._started_at[index]
            pause = RESTART_PAUSE_S if lived < QUICK_DEATH_S else 0.0
            logger.error("worker %d (PID %d) %s after %.1f s; starting a new one%s", index, pid, how, lived,
                         f" in {pause:.0f} s" if pause else "")
            self._restart_at[index] = time.monotonic() + pause

    def _restart_due(self) -> None:
        now = time.monotonic()
        for index, when in list(self._restart_at.items()):
            if when <= now:
                del self._restart_at[index]
                self._spawn(index)

    def _wait_until_all_ready(self) -> bool:
        deadline = time.monotonic() + WORKER_STARTUP_TIMEOUT_S
        ready: set[int] = set()
        while len(ready) < self.config.workers:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._ready_r], [], [], left)[0]:
                return False
            ready.update(os.read(self._ready_r, 256))
            self._reap()
            if len(self.workers) < self.config.workers:
                return False  # a worker died while starting
        return True

    def _drain_ready_pipe(self) -> None:
        while select.select([self._ready_r], [], [], 0)[0]:
            os.read(self._ready_r, 256)  # replacements say ready too; nobody waits for them

    def _stop(self) -> None:
        """SIGTERM every worker; each drains within shutdown_timeout_s; kill what is left."""
        self._stopping = True
        self.notify("STOPPING=1")
        self._forward(signal.SIGTERM)
        deadline = time.monotonic() + self.config.shutdown_timeout_s + 2 * STOP_GRACE_S
        while self.workers and time.monotonic() < deadline:
            self._reap()
            if self.workers:
                select.select([], [], [], 0.05)  # the workers are draining; look again shortly
        if self.workers:
            logger.warning("workers still running after the stop's deadline: killing %s",
                           ", ".join(f"PID {pid}" for pid in self.workers.values()))
            self._forward(signal.SIGKILL)
            for pid in list(self.workers.values()):
                os.waitpid(pid, 0)
            self.workers.clear()

    # -- a worker ------------------------------------------------------------------------

    def _spawn(self, index: int) -> None:
        pid = os.fork()
        if pid:
            self.workers[index] = pid
            self._started_at[index] = time.monotonic()
            return
        status = 1
        try:
            status = self._worker_main(index)
        except BaseException:  # noqa: BLE001 - a worker must never return into the supervisor's code
            logger.exception("worker %d failed", index)
        finally:
            logging.shutdown()
            os._exit(status)

    def _worker_main(self, index: int) -> int:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        _stop_with_parent(self._supervisor_pid)
        os.close(self._ready_r)
        state = ServerState(self.config)
        servers = [EchoServer(sock, state) for sock in self.sockets]
        figures = self._figures
        ready_w = self._ready_w

        def notify(message: str) -> None:
            nonlocal ready_w
            if message == "READY=1" and ready_w >= 0:
                figures.write(index, state, alive_at=time.monotonic())
                os.write(ready_w, bytes([index]))
                os.close(ready_w)
                ready_w = -1
            elif message.startswith("STATUS="):
                figures.write(index, state)
            elif message == "WATCHDOG=1":
                figures.write(index, state, alive_at=time.monotonic())

        service = Service(servers, state, self.load_config, notify=notify, watchdog_s=3 * WORKER_TICK_S)
        return service.run_until_stopped()


def _stop_with_parent(supervisor_pid: int) -> None:
    """Have the kernel send us SIGTERM when the supervisor dies, even by SIGKILL.

    Otherwise a killed supervisor would leave its workers serving, orphaned,
    with nobody to stop them or to tell systemd about them.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        logger.warning("cannot ask to be stopped with the supervisor: %s", os.strerror(ctypes.get_errno()))
    if os.getppid() != supervisor_pid:  # it died before the prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


def _describe_status(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"was killed by {signal.Signals(os.WTERMSIG(status)).name}"
    return f"exited with status {os.waitstatus_to_exitcode(status)}"
