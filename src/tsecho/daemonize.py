"""Classic daemon mode: detaching from the terminal with python-daemon (``tsechod --daemon``).

This module owns the one step of ``--daemon`` that is about the *process*:
becoming a daemon and telling the original process whether it started. It has
no sockets, no config parsing and no ``print()``. The pid file (pidfile.py)
and the privilege drop (privileges.py) run without ``--daemon`` too; cli.py
orders the steps and picks exit codes; service.py serves.

API
---
``detach(preserve_fds, stdout_stderr_to, pidfile=..., startup_timeout_s=...)``
    Forks. The daemon gets a ``StartupReport`` back and must call
    ``ready()`` once it serves, or ``failed(message)``. The original process
    (the one the user started) waits for that word on a status pipe and gets a
    ``ParentOutcome`` back: it must then unwind and leave ``main()`` without
    doing anything else; ``cli.main`` turns ``outcome.started`` into the exit
    code (0, else print ``tsechod: {outcome.message}`` and 1). So every exit
    code is still chosen in ``cli.main``, and no ``sys.exit`` happens here.

``refuse_under_systemd(environ)``
    The one-line reason ``--daemon`` is refused under systemd, or ``None``.

Errors derive from ``pidfile.StartupError``; ``str(err)`` is one line without
the ``tsechod:`` prefix, so ``cli.main`` prints ``f"tsechod: {err}"`` and
returns 1.

With ``--daemon`` and ``log_target = "stderr"`` pass ``None`` (stderr is
the terminal, which the daemon leaves), so logs go to ``/dev/null``:
refusing that combination, or warning before detaching, is cli's call.
Every fd a live Python object still owns must be preserved or closed before
``detach``: python-daemon closes the raw fd, and when the object is later
collected it closes whatever new file got that fd number in the meantime.

Process tree: ``detach`` forks once itself, then ``DaemonContext.open()``
double-forks (fork, setsid, fork) in that child, because python-daemon's
first fork ``os._exit(0)``-s the process that opens the context and the
original process must instead stay and wait. The daemon is the third
generation: not a session leader, no controlling terminal, reparented to
init (or the nearest subreaper).

python-daemon 3.x behaviour this relies on (read from daemon/daemon.py):

* the default ``signal_map`` sets SIGTERM to ``DaemonContext.terminate``
  (raises ``SystemExit`` from wherever the main thread is) and ignores
  SIGTSTP/SIGTTIN/SIGTTOU; we pass ``signal_map={}`` so dispositions are left
  alone and ``service.py`` installs its own handlers after detaching;
* ``detach_process=None`` means "auto": no fork when the parent is PID 1 or
  stdin is a socket (containers!), so we pass ``True``;
* ``open()`` closes every fd up to RLIMIT_NOFILE except ``files_preserve`` and
  the fds of ``stdin``/``stdout``/``stderr``; it *extends the list you pass*,
  so we pass a fresh one;
* ``stdout``/``stderr`` ``None`` means ``/dev/null`` (an extra /dev/null fd is
  opened for each and never closed); a stream is ``dup2``-ed onto fd 1/2;
* it always calls setgid(getgid())/setuid(getuid()) and, with
  ``initgroups=False``, leaves supplementary groups alone: the real drop is
  ``drop_privileges``;
* ``prevent_core=True`` sets RLIMIT_CORE to (0, 0) for good.
"""

from __future__ import annotations

import logging
import os
import select
import sys
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Final, Protocol

import daemon  # type: ignore[import-untyped]

from .pidfile import PidFile, StartupError

logger = logging.getLogger(__name__)

DAEMON_UMASK: Final = 0o027
DAEMON_WORKING_DIRECTORY: Final = "/"
DEFAULT_STARTUP_TIMEOUT_S: Final = 60.0
# Below PIPE_BUF (4096 on Linux), so one write() on the status pipe is atomic.
_MAX_REPORT_BYTES: Final = 2048
_READY: Final = b"READY"
_FAILED: Final = b"FAILED"
SYSTEMD_REFUSAL: Final = (
    "--daemon is not used under systemd: the service runs in the foreground "
    "(Type=notify); drop --daemon from ExecStart"
)


class DetachError(StartupError):
    """Forking or setting up the status pipe failed (reported before detaching)."""


class _HasFileno(Protocol):
    def fileno(self) -> int: ...


class StartupReport:
    """The daemon's end of the status pipe: say ``ready()`` or ``failed()`` once.

    Whichever is called first writes one line and closes the pipe; later calls
    do nothing. If the daemon exits without either, the original process sees
    the pipe close and reports that the daemon died during startup.
    """

    def __init__(self, fd: int) -> None:
        self._fd: int | None = fd

    def ready(self) -> None:
        """Everything is bound, the pid file written, serving has started."""
        self._send(_READY + b" " + str(os.getpid()).encode())

    def failed(self, message: str) -> None:
        """Startup failed; *message* (one line) is printed by the original process."""
        line = " ".join(message.split()).encode("utf-8", "replace")
        self._send(_FAILED + b" " + line[:_MAX_REPORT_BYTES])

    def _send(self, line: bytes) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            os.write(fd, line + b"\n")
        except OSError:
            # The original process is gone (EPIPE: SIGPIPE is ignored by
            # Python); nobody is waiting for the word.
            pass
        finally:
            os.close(fd)


@dataclass(frozen=True, slots=True)
class ParentOutcome:
    """What the original process learnt from the daemon.

    ``started``: the daemon said ready (exit 0). Otherwise ``message`` is the
    one-line reason to print as ``tsechod: {message}`` (exit 1).
    ``daemon_pid`` is the daemon's PID when it said ready.
    """

    started: bool
    message: str | None = None
    daemon_pid: int | None = None


def detach(
    preserve_fds: Iterable[int],
    stdout_stderr_to: _HasFileno | None,
    *,
    pidfile: PidFile | None = None,
    startup_timeout_s: float = DEFAULT_STARTUP_TIMEOUT_S,
) -> StartupReport | ParentOutcome:
    """Become a daemon; return in *both* the daemon and the original process.

    Call after binding and before starting any thread. *preserve_fds* are the
    fds the daemon keeps (listening sockets, log file streams); every other fd
    is closed. *stdout_stderr_to* (a stream with ``fileno()``, e.g. the log
    file) becomes fd 1 and 2 of the daemon; ``None`` means ``/dev/null``
    (stdin is always ``/dev/null``). *pidfile*'s fd is preserved as well and
    its ownership moves to the daemon, so the original process's
    ``release()`` leaves the file and the lock alone.

    In the daemon (umask 027, cwd ``/``, its own session, no controlling
    terminal, signal dispositions untouched) this returns a
    ``StartupReport``. In the original process it waits up to
    *startup_timeout_s* for the daemon's report and returns a
    ``ParentOutcome``; the caller must then just unwind and return from
    ``main()``. The intermediate processes never return (``os._exit``).

    Raises ``DetachError`` (in the original process, nothing forked yet) if
    other threads run, the status pipe or the first fork fails, or
    *stdout_stderr_to* has no fd.
    A failure inside ``DaemonContext.open()`` is reported through the pipe.
    """
    keep = list(preserve_fds)
    if pidfile is not None:
        keep.append(pidfile.fileno())
    if stdout_stderr_to is not None:
        try:
            stdout_stderr_to.fileno()
        except (AttributeError, ValueError, OSError) as err:
            raise DetachError(
                f"cannot send the daemon's stdout/stderr to {stdout_stderr_to!r}: "
                "it has no file descriptor"
            ) from err
    if threading.active_count() > 1:
        # fork() copies only this thread: the others would silently be gone in
        # the daemon (and Python 3.12+ warns, an error under -W error).
        names = ", ".join(t.name for t in threading.enumerate() if t is not threading.current_thread())
        raise DetachError(f"cannot detach with other threads running ({names}); detach first")
    # Buffered output would otherwise be written twice, once by each process.
    for stream in (sys.stdout, sys.stderr):
        if stream is not None:
            stream.flush()
    try:
        read_fd, write_fd = os.pipe()
        child = os.fork()
    except OSError as err:
        raise DetachError(f"cannot start the daemon: {err.strerror}") from err

    if child != 0:
        os.close(write_fd)
        if pidfile is not None:
            pidfile._hand_over(to_this_process=False)
        try:
            return _wait_for_report(read_fd, startup_timeout_s)
        finally:
            os.close(read_fd)
            _reap(child)

    # --- intermediate child, then (after DaemonContext's forks) the daemon.
    # Never return from here except as the daemon: any exception must end
    # this process, or a second copy of the caller would run on.
    try:
        os.close(read_fd)
        context = daemon.DaemonContext(
            working_directory=DAEMON_WORKING_DIRECTORY,
            umask=DAEMON_UMASK,
            detach_process=True,  # None would skip forking when ppid == 1
            # A fresh list: open() appends the std streams to it. The status
            # pipe is in it, else open() would close it with everything else.
            files_preserve=[*keep, write_fd],
            stdin=None,
            stdout=stdout_stderr_to,
            stderr=stdout_stderr_to,
            # The default maps SIGTERM to DaemonContext.terminate (SystemExit
            # raised wherever the main thread is); service.py installs its
            # own handlers after this returns.
            signal_map={},
            prevent_core=True,
        )
        context.open()
        report = StartupReport(write_fd)
        if pidfile is not None:
            pidfile._hand_over(to_this_process=True)
        return report
    except BaseException as exc:  # noqa: BLE001 - this process must not return
        try:
            StartupReport(write_fd).failed(f"cannot detach: {exc}")
        finally:
            os._exit(1)


def _wait_for_report(read_fd: int, timeout_s: float) -> ParentOutcome:
    deadline = time.monotonic() + timeout_s
    poller = select.poll()
    poller.register(read_fd, select.POLLIN)
    data = b""
    while b"\n" not in data:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return ParentOutcome(
                False,
                f"the daemon did not report ready within {timeout_s:g} s; it may "
                "still be starting (see its log, and the pid file)",
            )
        # poll, not select: select() can't watch an fd above 1023.
        if not poller.poll(remaining * 1000):
            continue
        chunk = os.read(read_fd, 4096)
        if not chunk:
            break
        data += chunk
    line, newline, _rest = data.partition(b"\n")
    word, _, detail = line.partition(b" ")
    if newline and word == _READY and detail.isdigit():
        return ParentOutcome(True, None, int(detail))
    if newline and word == _FAILED:
        return ParentOutcome(False, detail.decode("utf-8", "replace"))
    return ParentOutcome(
        False,
        "the daemon died during startup without saying why (see its log, "
        "or run without --daemon to see the error)",
    )


def _reap(pid: int) -> None:
    """Collect the intermediate child; it exits right after its own fork."""
    try:
        os.waitpid(pid, 0)
    except ChildProcessError:
        pass


def refuse_under_systemd(environ: Mapping[str, str]) -> str | None:
    """The reason ``--daemon`` is refused when systemd started us, else None.

    systemd sets INVOCATION_ID for every unit it starts and NOTIFY_SOCKET for
    Type=notify; a forking daemon would leave systemd tracking the wrong PID.
    """
    if environ.get("INVOCATION_ID") or environ.get("NOTIFY_SOCKET"):
        return SYSTEMD_REFUSAL
    return None


__all__ = [
    "DetachError",
    "ParentOutcome",
    "SYSTEMD_REFUSAL",
    "StartupReport",
    "detach",
    "refuse_under_systemd",
]
