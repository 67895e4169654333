"""Process control: the signal loop, reload, reopen, reports to systemd, the bounded stop.

Every tsechod process runs one ``ProcessControl`` loop (gunicorn's arbiter is
the model): a signal handler only queues the signal; the loop takes one at a
time and calls ``handle_<name>``; ``tick()`` runs every ``tick_s`` even during
a storm of signals. ``Service`` is the loop of a process that serves (the only
process, or one worker); ``Supervisor`` (supervisor.py) is the loop of a
process that runs workers. Both reload through ``reload_config``.

What a process tells the outside world goes through a ``Reporter``:
``SystemdReporter`` speaks sd_notify (READY, RELOADING, STATUS, WATCHDOG,
STOPPING); a worker's reporter writes to its supervisor instead.

Signals are blocked from the very start of the process (``block_signals``,
cli.py) until the handlers are installed, so a SIGHUP sent the moment the port
accepts is queued, not fatal. Each ``serve_forever()`` runs in its own acceptor
thread, because ``shutdown()`` deadlocks when called from the serving thread.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import queue
import signal
import socket
import threading
import time
from collections.abc import Callable, Sequence
from typing import Final, Protocol

from . import systemd
from .affinity import Pin
from .config import KEYS, Config, ConfigError
from .logsetup import configure_logging, reopen_logs
from .metrics import MetricsServer, render
from .server import EchoServer, log_refusals
from .state import Figures, ServerState

logger = logging.getLogger(__name__)

ACCEPT_POLL_S: Final = 0.2  # how soon an acceptor sees shutdown(); also the accept loops' liveness tick
STATUS_EVERY_S: Final = 5.0
# An accept loop that has not turned for this long (it turns every ACCEPT_POLL_S) is stuck.
ACCEPT_LOOP_STUCK_S: Final = 2.0
STOP_SIGNALS: Final = (signal.SIGTERM, signal.SIGINT)
HANDLED_SIGNALS: Final = (*STOP_SIGNALS, signal.SIGHUP, signal.SIGUSR1)
# A reload that sends this many settings back to their defaults at once is logged as a warning.
RELOAD_RESETS_WARNING: Final = 3
# A stop waits this much past shutdown_timeout_s for handlers to log their close.
STOP_GRACE_S: Final = 1.0

Notify = Callable[[str], object]


def block_signals(signals: Sequence[int] = HANDLED_SIGNALS) -> None:
    """Hold *signals* pending until ``ProcessControl.install_signal_handlers`` unblocks them.

    Call before any thread starts: threads inherit the mask, so only the main
    thread (which unblocks) ever takes these signals.
    """
    signal.pthread_sigmask(signal.SIG_BLOCK, signals)


def ignore_signals_while_exiting() -> None:
    """The stop is done: a late signal must not turn the exit status 0 into a kill.

    Python restores the default handlers while the interpreter shuts down, and
    the default action of SIGTERM, SIGINT, SIGHUP and SIGUSR1 is to terminate.
    """
    for signum in HANDLED_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


def reload_config(load_config: Callable[[], Config], running: Config) -> Config:
    """Read the config again and return the one to run now: the one reload of every process.

    Keys that need a restart (``Key.reloadable`` is False) keep their running
    values, each with a warning. Logging is reconfigured; if the new log
    settings can't be opened, the old ones stay, with an error. Raises
    ConfigError when the new config is bad: the caller keeps *running*.
    """
    new = load_config()
    reverted = [key.name for key in KEYS
                if getattr(new, key.name) == key.default != getattr(running, key.name)]
    if len(reverted) >= RELOAD_RESETS_WARNING:
        # Applied all the same (a reload is how an operator goes back to a default), but this
        # many at once is more often an empty or truncated file than a wish.
        logger.warning("reload: %d settings went back to their defaults (%s): is the config file complete?",
                       len(reverted), ", ".join(reverted))
    kept = {}
    for key in KEYS:
        if not key.reloadable and getattr(new, key.name) != getattr(running, key.name):
            logger.warning("reload: %s changed; it applies only after a restart (systemctl restart tsechod)",
                           key.name)
            kept[key.name] = getattr(running, key.name)
    # A listener's address and name are its socket, and whether it speaks TLS is what its clients
    # expect: they need a restart. Its PROXY and TLS settings reload, matched by position, which is
    # safe only while the list of sockets is the same.
    if _sockets_of(new) != _sockets_of(running):
        if "listen" not in kept:
            logger.warning("reload: the [[listener]] addresses, names or TLS on/off changed; they apply only "
                           "after a restart (systemctl restart tsechod); the running listeners keep their "
                           "settings")
        kept["listeners"] = running.listeners
    new = dataclasses.replace(new, **kept)
    try:
        configure_logging(new)
    except OSError as err:
        logger.error("reload: cannot open log file %s: %s; keeping the old log settings", new.log_file, err)
        new = dataclasses.replace(
            new, log_target=running.log_target, log_file=running.log_file,
            log_format=running.log_format, log_level=running.log_level,
        )
    return new


def _sockets_of(config: Config) -> list[tuple[object, ...]]:
    return [(listener.address, listener.name, listener.tls_cert is not None) for listener in config.listeners]


class Reporter(Protocol):
    """Where a serving process reports its state: systemd, or a worker's supervisor."""

    tick_s: float  # how often status() is called

    def ready(self, figures: Figures) -> None: ...
    def reloading(self) -> None: ...
    def reloaded(self) -> None: ...
    def status(self, figures: Figures, accept_loops_alive_at: float) -> None: ...
    def stopping(self) -> None: ...


class SystemdReporter:
    """sd_notify: READY, RELOADING/READY, STATUS every few seconds, WATCHDOG while the accept loops turn."""

    def __init__(self, notify: Notify = systemd.notify, watchdog_s: float | None = None,
                 on_ready: Callable[[], object] | None = None) -> None:
        self.notify = notify
        self.watchdog_s = watchdog_s
        self.on_ready = on_ready
        self.tick_s = min(STATUS_EVERY_S, watchdog_s / 3) if watchdog_s else STATUS_EVERY_S

    def ready(self, figures: Figures, prefix: str = "") -> None:
        self.notify("READY=1")
        if self.on_ready is not None:
            self.on_ready()
        self.notify(f"STATUS={prefix}{figures.status()}")

    def reloading(self) -> None:
        self.notify(systemd.reloading_message())

    def reloaded(self) -> None:
        self.notify("READY=1")

    def status(self, figures: Figures, accept_loops_alive_at: float, prefix: str = "") -> None:
        self.notify(f"STATUS={prefix}{figures.status()}")
        if self.watchdog_s and self.accept_loops_alive(accept_loops_alive_at):
            self.notify("WATCHDOG=1")

    def accept_loops_alive(self, alive_at: float) -> bool:
        """Whether the accept loops turned recently enough to vouch for with a WATCHDOG=1."""
        return time.monotonic() - alive_at < max(ACCEPT_LOOP_STUCK_S, (self.watchdog_s or 0) / 2)

    def stopping(self) -> None:
        self.notify("STOPPING=1")


class ProcessControl:
    """The signal loop of one process; subclasses say what each signal and each tick does."""

    signals: tuple[int, ...] = HANDLED_SIGNALS
    tick_s: float = STATUS_EVERY_S

    def __init__(self) -> None:
        self._received: queue.SimpleQueue[int] = queue.SimpleQueue()  # put() is safe in a signal handler

    def install_signal_handlers(self) -> None:
        """Queue our signals from now on, and take the ones that waited while blocked."""
        for signum in self.signals:
            signal.signal(signum, lambda s, _frame: self._received.put_nowait(s))
        signal.pthread_sigmask(signal.SIG_UNBLOCK, self.signals)

    def loop(self) -> int:
        """Dispatch signals and ticks until SIGTERM or SIGINT; return that signal."""
        next_tick = time.monotonic() + self.tick_s
        while True:
            try:
                signum = self._received.get(timeout=max(0.0, next_tick - time.monotonic()))
            except queue.Empty:
                signum = 0
            if time.monotonic() >= next_tick:  # even during a storm of signals
                self.tick()
                next_tick = time.monotonic() + self.tick_s
            if signum in STOP_SIGNALS:
                return signum
            if signum == signal.SIGHUP:
                self.handle_hup()
            elif signum == signal.SIGUSR1:
                logger.info("received SIGUSR1: reopening log files")
                self.handle_usr1()
            elif signum == signal.SIGCHLD:
                self.handle_chld()

    def tick(self) -> None:
        """Called every tick_s."""

    def handle_hup(self) -> None:
        """SIGHUP: reload."""

    def handle_usr1(self) -> None:
        reopen_logs()

    def handle_chld(self) -> None:
        """SIGCHLD: a child changed state."""


class Service(ProcessControl):
    """A serving process: its listeners, the shared state, and how it reloads and stops."""

    def __init__(
        self,
        servers: Sequence[EchoServer],
        state: ServerState,
        load_config: Callable[[], Config],
        reporter: Reporter | None = None,
        metrics_socket: socket.socket | None = None,
        pin: Pin | None = None,
    ) -> None:
        super().__init__()
        self.pin = pin  # where cpu_affinity put this process (affinity.py); it may move on a tick
        self.servers = list(servers)
        self.state = state
        self.load_config = load_config
        self.reporter: Reporter = reporter or SystemdReporter()
        self.tick_s = self.reporter.tick_s
        self._acceptors: list[threading.Thread] = []
        self.metrics = MetricsServer(metrics_socket, self.metrics_page) if metrics_socket is not None else None

    def metrics_page(self) -> bytes:
        """The metrics endpoint's page: a view of this process's figures (metrics.py)."""
        return render(self.state.figures(), self.state.reloads, [os.getpid()])

    def start(self) -> None:
        """Start one acceptor thread per listener, and the metrics endpoint's thread."""
        if self.metrics is not None:
            self.metrics.start()
            logger.info("metrics on http://%s/metrics", self.metrics.address)
        for server in self.servers:
            thread = threading.Thread(
                target=server.serve_forever,
                kwargs={"poll_interval": ACCEPT_POLL_S},
                name=f"tsecho-acceptor-{server.address}",
                daemon=True,
            )
            thread.start()
            self._acceptors.append(thread)

    def accept_loops_alive_at(self) -> float:
        """When the slowest accept loop last turned (what the watchdog vouches for)."""
        return min(server.alive_at for server in self.servers)

    def run_until_stopped(self) -> int:
        """Serve until SIGTERM or SIGINT; act on SIGHUP (reload) and SIGUSR1 (reopen logs).

        Returns the exit status: 0 after a clean stop.
        """
        self.install_signal_handlers()
        self.start()
        self.reporter.ready(self.state.figures())
        signum = self.loop()
        logger.info("received %s: stopping", signal.Signals(signum).name)
        self.stop()
        log_refusals(self.state, force=True)
        logger.info("stopped")
        ignore_signals_while_exiting()
        return 0

    def tick(self) -> None:
        self.reporter.status(self.state.figures(), self.accept_loops_alive_at())
        log_refusals(self.state)
        if self.pin is not None:
            self.pin.rebalance()

    def handle_hup(self) -> None:
        """Re-read the config file; keep the running config if the new one is bad."""
        logger.info("received SIGHUP: reloading config")
        self.reporter.reloading()
        try:
            new = reload_config(self.load_config, self.state.config)
        except ConfigError as err:
            self.state.reloads.record(False, time.time())
            logger.error("reload failed, keeping the running config: %s", err)
        else:
            self.state.reloads.record(True, time.time())
            self.state.apply(new)
            logger.info("reloaded config: timestamp=%s max_line_bytes=%d log_level=%s rules=%d "
                        "connection_rate_per_ip=%g", new.timestamp, new.max_line_bytes, new.log_level,
                        len(new.rules), new.connection_rate_per_ip)
        self.reporter.reloaded()

    def stop(self) -> int:
        """Stop accepting, let connections finish within shutdown_timeout_s, close the rest.

        Returns how many connections had to be cut.
        """
        timeout_s = self.state.config.shutdown_timeout_s
        self.reporter.stopping()
        shutdown_together(self.servers)
        for server in self.servers:
            server.server_close()  # stop accepting before draining: no new peers during the stop
        for thread in self._acceptors:
            thread.join(timeout=5)
        live = self.state.connections
        if live:
            logger.info("waiting up to %.1f s for %d connections to finish", timeout_s, live)
        self.state.begin_stop(timeout_s)
        left = self.state.wait_closed(timeout_s + STOP_GRACE_S)
        if left:
            logger.warning("%d connections still open after %.1f s: cutting them", left, timeout_s)
            self.state.abort_connections()
            self.state.wait_closed(STOP_GRACE_S)
        if self.metrics is not None:
            self.metrics.close()  # last: a scrape during the drain still sees the connections leave
        return left


def shutdown_together(servers: Sequence[EchoServer]) -> None:
    """Stop every accept loop, all at once.

    ``shutdown()`` waits for its loop to notice, up to one poll interval; one
    after another, 256 listeners took 25 s, past systemd's TimeoutStopSec.
    """
    stoppers = [threading.Thread(target=server.shutdown, name="tsecho-stop-acceptor", daemon=True)
                for server in servers]
    for stopper in stoppers:
        stopper.start()
    for stopper in stoppers:
        stopper.join(timeout=5)
