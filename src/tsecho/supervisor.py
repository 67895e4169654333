"""``workers > 1``: one supervising process and N worker processes on the same sockets.

The main process binds the listeners (so errors reach the terminal and ports
below 1024 work before privileges drop), then forks the workers. Each worker is
an ordinary serving process (a ``Service`` over its own ``ServerState``)
accepting on the inherited sockets; the kernel spreads connections among them.
The supervisor only does process control, in the same loop as every process
(service.ProcessControl): it reloads (and keeps the new config, so a worker
forked later serves it), forwards SIGTERM, SIGHUP and SIGUSR1, replaces a
worker that dies, and speaks for all of them to systemd (READY once every
worker is up, STATUS with the sums, WATCHDOG while every worker's accept loops
turn). Workers report to it through ``WorkerReporter``: their figures and
liveness in a shared mapping, and one byte on a pipe when ready.
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import os
import select
import signal
import socket
import struct
import time
from collections.abc import Callable, Sequence
from typing import Final

from . import affinity
from .config import Config, ConfigError
from .metrics import MetricsServer, render
from .server import EchoServer, ReadyThreads
from .service import (HANDLED_SIGNALS, STOP_GRACE_S, ProcessControl, Service, SystemdReporter,
                      ignore_signals_while_exiting, reload_config)
from .state import FIGURES_SIZE, Figures, Reloads, ServerState, reload_listener_tls
from .tlsconfig import ServerTLS

logger = logging.getLogger(__name__)

TICK_S: Final = 0.5
WORKER_STARTUP_TIMEOUT_S: Final = 30.0
# A worker that dies this soon after starting is restarted only after a pause,
# so a crash at startup doesn't turn into a fork loop.
QUICK_DEATH_S: Final = 1.0
RESTART_PAUSE_S: Final = 1.0
# Workers write their figures and accept-loop liveness this often.
WORKER_TICK_S: Final = 1.0
# A worker whose accept loops have not turned for this long is stuck: no WATCHDOG=1 for it.
WORKER_STUCK_S: Final = 3 * WORKER_TICK_S
PR_SET_PDEATHSIG: Final = 1  # from <linux/prctl.h>
# A slot: the Figures vector, then the monotonic time the worker's accept loops last turned.
_SLOT: Final = struct.Struct(f"{FIGURES_SIZE}qd")


class SharedFigures:
    """Each worker's figures in one shared anonymous mapping, a slot per worker.

    A slot has one writer (its worker) and one reader (the supervisor); a torn
    read only skews a STATUS line for a few seconds.
    """

    def __init__(self, workers: int) -> None:
        self._mem = mmap.mmap(-1, _SLOT.size * workers)  # MAP_SHARED: survives fork() shared

    def write(self, index: int, figures: Figures, alive_at: float) -> None:
        _SLOT.pack_into(self._mem, index * _SLOT.size, *figures.as_vector(), alive_at)

    def read(self, index: int) -> tuple[Figures, float]:
        *vector, alive_at = _SLOT.unpack_from(self._mem, index * _SLOT.size)
        return Figures.from_vector(vector), alive_at

    def clear(self, index: int) -> None:
        self.write(index, Figures(), time.monotonic())


class WorkerReporter:
    """A worker's reporter: figures into its slot of SharedFigures, one byte on the ready pipe."""

    tick_s = WORKER_TICK_S

    def __init__(self, index: int, figures: SharedFigures, ready_fd: int) -> None:
        self.index = index
        self.figures = figures
        self.ready_fd = ready_fd

    def ready(self, figures: Figures) -> None:
        self.figures.write(self.index, figures, time.monotonic())
        os.write(self.ready_fd, bytes([self.index]))
        os.close(self.ready_fd)

    def status(self, figures: Figures, accept_loops_alive_at: float) -> None:
        self.figures.write(self.index, figures, accept_loops_alive_at)

    def reloading(self) -> None:
        pass  # the supervisor speaks for every worker

    def reloaded(self) -> None:
        pass

    def stopping(self) -> None:
        pass


class Supervisor(ProcessControl):
    """Start, watch and stop the worker processes."""

    signals = (*HANDLED_SIGNALS, signal.SIGCHLD)
    tick_s = TICK_S

    def __init__(
        self,
        config: Config,
        sockets: Sequence[tuple[socket.socket, int | None]],  # each with its listener's index
        load_config: Callable[[], Config],
        reporter: SystemdReporter | None = None,
        metrics_socket: socket.socket | None = None,
        tls: tuple[ServerTLS | None, ...] = (),
    ) -> None:
        super().__init__()
        self.config = config
        # Each listener's TLS context, handed to workers forked later (they may not be able to read the key).
        self.tls = tls or tuple(None for _ in config.listeners)
        self.sockets = list(sockets)
        self.reloads = Reloads()  # the supervisor's own: it is the process that reloads first
        # Served here, from the workers' SharedFigures, so a scrape sums exactly what STATUS= sums.
        self.metrics = MetricsServer(metrics_socket, self.metrics_page) if metrics_socket is not None else None
        self.load_config = load_config
        self.reporter = reporter or SystemdReporter()
        self.workers: dict[int, int] = {}  # index -> pid
        self._started_at: dict[int, float] = {}
        self._restart_at: dict[int, float] = {}
        self._figures = SharedFigures(config.workers)
        self._ready_r, self._ready_w = os.pipe()
        self._stopping = False
        self._supervisor_pid = os.getpid()
        self._next_status = 0.0

    # -- the supervisor ------------------------------------------------------------------

    def run(self) -> int:
        """Run the workers until SIGTERM or SIGINT; return the exit status."""
        self.install_signal_handlers()
        for index in range(self.config.workers):
            self._spawn(index)
        if not self._wait_until_all_ready():
            logger.error("not every worker started within %.0f s; stopping", WORKER_STARTUP_TIMEOUT_S)
            self._stop()
            return 1
        logger.info("%d workers ready: %s", len(self.workers),
                    ", ".join(f"PID {pid}" for pid in self.workers.values()))
        self.reporter.ready(self._sum_figures(), prefix=f"{len(self.workers)} workers, ")
        if self.metrics is not None:
            # XXX: from here on, fork() (a replaced worker) happens with this thread running;
            # it takes no lock but the logging module's, which logging re-creates in the child.
            self.metrics.start()
            logger.info("metrics on http://%s/metrics", self.metrics.address)
        signum = self.loop()
        logger.info("received %s: stopping %d workers", signal.Signals(signum).name, len(self.workers))
        self._stop()
        logger.info("stopped")
        ignore_signals_while_exiting()
        return 0

    def handle_hup(self) -> None:
        """Reload here, keep the result (workers forked later serve it), then let every worker reload."""
        logger.info("received SIGHUP: reloading config in %d workers", len(self.workers))
        self.reporter.reloading()
        try:
            self.config = reload_config(self.load_config, self.config)
            self.tls = reload_listener_tls(self.config, self.tls, log=False)  # the workers log
        except ConfigError as err:
            self.reloads.record(False, time.time())
            logger.error("reload failed, keeping the running config: %s", err)
        else:
            self.reloads.record(True, time.time())
            self._forward(signal.SIGHUP)
        self.reporter.reloaded()

    def handle_usr1(self) -> None:
        super().handle_usr1()
        self._forward(signal.SIGUSR1)

    def handle_chld(self) -> None:
        self._reap()

    def tick(self) -> None:
        self._reap()
        self._restart_due()
        self._drain_ready_pipe()
        if time.monotonic() >= self._next_status:
            self._next_status = time.monotonic() + self.reporter.tick_s
            self._report()

    def _sum_figures(self) -> Figures:
        indexes = tuple(self.workers)  # one C call: safe while the main thread changes the dict
        return Figures.total(self._figures.read(i)[0] for i in indexes)

    def metrics_page(self) -> bytes:
        """The metrics endpoint's page (its own thread): the sums STATUS= shows, and every process."""
        pids = [os.getpid(), *tuple(self.workers.values())]
        return render(self._sum_figures(), self.reloads, pids, workers=len(pids) - 1)

    def _report(self) -> None:
        slots = [self._figures.read(i) for i in self.workers]
        now = time.monotonic()
        all_alive = len(self.workers) == self.config.workers and all(now - alive_at < WORKER_STUCK_S
                                                                     for _, alive_at in slots)
        figures = Figures.total(f for f, _ in slots)
        # The watchdog is vouched for only while every worker is there and turning.
        self.reporter.status(figures, now if all_alive else 0.0, prefix=f"{len(self.workers)} workers, ")

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
        self.reporter.stopping()
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
        if self.metrics is not None:
            self.metrics.close()

    # -- a worker ------------------------------------------------------------------------

    def _spawn(self, index: int) -> None:
        # Blocked across fork(): until the worker has its own handlers, a signal
        # waits for them instead of falling into our queue, copied but unread there.
        signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED_SIGNALS)
        try:
            pid = os.fork()
        except OSError:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDLED_SIGNALS)
            raise
        if pid:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDLED_SIGNALS)
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
        """The forked worker: reset what it inherited first, then serve like a single process."""
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        os.close(self._ready_r)
        if self.metrics is not None:
            self.metrics.socket.close()  # the supervisor's: a worker serves no metrics
        _stop_with_parent(self._supervisor_pid)
        # Before this worker starts its threads: every one of them inherits the CPU.
        pin = affinity.pin_process(self.config.cpu_affinity, index, what=f"worker {index}")
        state = ServerState(self.config, worker=index, tls=self.tls)
        threads = ReadyThreads()
        servers = [EchoServer(sock, state, threads, index) for sock, index in self.sockets]
        reporter = WorkerReporter(index, self._figures, self._ready_w)
        # Installs the worker's own handlers and takes any signal that waited meanwhile.
        return Service(servers, state, self.load_config, reporter=reporter, pin=pin).run_until_stopped()


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
