"""Process lifecycle: serve until a signal says stop; reload, reopen logs, notify.

Signal handlers only record the signal; one loop here acts on it. Each
``serve_forever()`` runs in its own acceptor thread, because ``shutdown()``
deadlocks when called from the thread that is serving. Startup (config,
logging, pidfile, binding, detaching) is cli.py's; this module starts once the
listeners are open.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import signal
import threading
import time
from collections.abc import Callable, Sequence
from typing import Final

from . import systemd
from .config import Config, ConfigError
from .logsetup import configure_logging, reopen_logs
from .server import EchoServer, ServerState

logger = logging.getLogger(__name__)

ACCEPT_POLL_S: Final = 0.2  # how soon an acceptor sees shutdown(); also the watchdog's liveness tick
STATUS_EVERY_S: Final = 5.0
STOP_SIGNALS: Final = (signal.SIGTERM, signal.SIGINT)
# A stop waits this much past shutdown_timeout_s for handlers to log their close.
STOP_GRACE_S: Final = 1.0

Notify = Callable[[str], object]


def ignore_signals_while_exiting() -> None:
    """The stop is done: a late signal must not turn the exit status 0 into a kill.

    Python restores the default handlers while the interpreter shuts down, and
    the default action of SIGTERM, SIGINT, SIGHUP and SIGUSR1 is to terminate.
    """
    for signum in (*STOP_SIGNALS, signal.SIGHUP, signal.SIGUSR1):
        signal.signal(signum, signal.SIG_IGN)


class Service:
    """The running daemon: its listeners, the shared state, and how to reload."""

    def __init__(
        self,
        servers: Sequence[EchoServer],
        state: ServerState,
        load_config: Callable[[], Config],
        notify: Notify = systemd.notify,
        watchdog_s: float | None = None,
        on_ready: Callable[[], object] | None = None,
    ) -> None:
        self.servers = list(servers)
        self.state = state
        self.load_config = load_config
        self.notify = notify
        self.watchdog_s = watchdog_s
        self.on_ready = on_ready
        self._acceptors: list[threading.Thread] = []

    def start(self) -> None:
        """Start one acceptor thread per listener."""
        for server in self.servers:
            thread = threading.Thread(
                target=server.serve_forever,
                kwargs={"poll_interval": ACCEPT_POLL_S},
                name=f"tsecho-acceptor-{server.address}",
                daemon=True,
            )
            thread.start()
            self._acceptors.append(thread)

    def accept_loops_alive(self) -> bool:
        """Whether every accept loop has turned recently (what the watchdog vouches for)."""
        limit = max(2.0, (self.watchdog_s or 0) / 2)
        now = time.monotonic()
        return all(now - server.alive_at < limit for server in self.servers)

    def reload(self) -> None:
        """Re-read the config file; keep the running config if the new one is bad."""
        self.notify(systemd.reloading_message())
        old = self.state.config
        try:
            new = self.load_config()
        except ConfigError as err:
            logger.error("reload failed, keeping the running config: %s", err)
            self.notify("READY=1")
            return
        for key in ("listen", "backlog", "workers", "user", "group", "pid_file"):
            if getattr(new, key) != getattr(old, key):
                logger.warning("reload: %s changed; it applies only after a restart (systemctl restart tsechod)", key)
        new = dataclasses.replace(
            new, listen=old.listen, backlog=old.backlog, workers=old.workers,
            user=old.user, group=old.group, pid_file=old.pid_file,
        )
        try:
            configure_logging(new)
        except OSError as err:
            logger.error("reload: cannot open log file %s: %s; keeping the old log settings", new.log_file, err)
            new = dataclasses.replace(
                new, log_target=old.log_target, log_file=old.log_file,
                log_format=old.log_format, log_level=old.log_level,
            )
        self.state.apply(new)
        logger.info("reloaded config: timestamp=%s max_line_bytes=%d log_level=%s",
                    new.timestamp, new.max_line_bytes, new.log_level)
        self.notify("READY=1")

    def stop(self) -> int:
        """Stop accepting, let connections finish within shutdown_timeout_s, close the rest.

        Returns how many connections had to be cut.
        """
        timeout_s = self.state.config.shutdown_timeout_s
        self.notify("STOPPING=1")
        for server in self.servers:
            server.shutdown()
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
        return left

    def run_until_stopped(self) -> int:
        """Serve until SIGTERM or SIGINT; act on SIGHUP (reload) and SIGUSR1 (reopen logs).

        Returns the exit status: 0 after a clean stop.
        """
        received: queue.SimpleQueue[int] = queue.SimpleQueue()  # put() is safe in a signal handler
        for handled in (*STOP_SIGNALS, signal.SIGHUP, signal.SIGUSR1):
            signal.signal(handled, lambda s, _frame: received.put_nowait(s))
        self.start()
        self.notify("READY=1")
        if self.on_ready is not None:
            self.on_ready()
        self.notify(f"STATUS={self.state.status()}")
        tick_s = STATUS_EVERY_S
        if self.watchdog_s:
            tick_s = min(tick_s, self.watchdog_s / 3)
        next_tick = time.monotonic() + tick_s
        while True:
            try:
                signum = received.get(timeout=max(0.0, next_tick - time.monotonic()))
            except queue.Empty:
                signum = 0
            if time.monotonic() >= next_tick:  # even during a storm of signals
                self._tick()
                next_tick = time.monotonic() + tick_s
            if not signum:
                continue
            if signum in STOP_SIGNALS:
                break
            if signum == signal.SIGHUP:
                logger.info("received SIGHUP: reloading config")
                self.reload()
            else:
                logger.info("received SIGUSR1: reopening log files")
                reopen_logs()
        logger.info("received %s: stopping", signal.Signals(signum).name)
        self.stop()
        self.state.log_refusals(force=True)
        logger.info("stopped")
        ignore_signals_while_exiting()
        return 0

    def _tick(self) -> None:
        self.notify(f"STATUS={self.state.status()}")
        self.state.log_refusals()
        if self.watchdog_s and self.accept_loops_alive():
            self.notify("WATCHDOG=1")
