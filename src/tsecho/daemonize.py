"""Classic daemon mode: pid file, detaching with python-daemon, privilege drop.

This module owns the pieces of ``tsechod --daemon`` that are about the
*process*, not about serving: it has no sockets, no config parsing and no
``print()``. ``cli.py`` picks exit codes and prints; ``service.py`` serves.

API
---
``PidFile(path)``
    ``acquire()`` (or ``with PidFile(path) as pidfile:``) opens/creates the
    file and takes an ``fcntl.flock`` lock held for the daemon's life. A file
    whose lock nobody holds is stale and is taken over, whatever PID it names
    (PIDs get reused; the lock is the truth). A held lock raises
    ``AlreadyRunningError``. ``write()`` records the PID; ``release()`` (and
    leaving the ``with``) removes the file and drops the lock, but only in the
    process that owns it (see ``detach``), and only if the file is still ours.

``detach(preserve_fds, stdout_stderr_to, pidfile=..., startup_timeout_s=...)``
    Forks. The daemon gets a ``StartupReport`` back and must call
    ``ready()`` once it serves, or ``failed(message)``. The original process
    (the one the user started) waits for that word on a status pipe and gets a
    ``ParentOutcome`` back: it must then unwind and leave ``main()`` without
    doing anything else; ``cli.main`` turns ``outcome.started`` into the exit
    code (0, else print ``tsechod: {outcome.message}`` and 1). So every exit
    code is still chosen in ``cli.main``, and no ``sys.exit`` happens here.

``drop_privileges(user, group)``
    setgroups -> setgid -> setuid when root; ``PrivilegeError`` otherwise.

``refuse_under_systemd(environ)``
    The one-line reason ``--daemon`` is refused under systemd, or ``None``.

Errors all derive from ``DaemonizeError``; ``str(err)`` is one line without
the ``tsechod:`` prefix, so ``cli.main`` prints ``f"tsechod: {err}"`` and
returns 1.

How cli/service use it (the startup order of STYLE.md section 3)::

    if args.daemon and (reason := refuse_under_systemd(os.environ)):
        print(f"tsechod: {reason}", file=sys.stderr); return 2
    config = load_config(...); configure_logging(config)
    startup = None
    try:
        with contextlib.ExitStack() as stack:
            pidfile = None
            if config.pid_file:                      # may raise AlreadyRunningError
                pidfile = stack.enter_context(PidFile(config.pid_file))
            servers = bind_all(...)                  # may raise OSError
            if args.daemon:
                result = detach([*listener_fds, *log_file_fds],
                                log_file_stream_or_None, pidfile=pidfile)
                if isinstance(result, ParentOutcome):  # the original process
                    if not result.started:
                        print(f"tsechod: {result.message}", file=sys.stderr)
                    return 0 if result.started else 1
                startup = result                     # the daemon from here on
            if pidfile:
                pidfile.write()                      # this PID
            drop_privileges(config.user, config.group)
            ... signal handlers, serve_forever thread ...
            if startup:
                startup.ready()                      # next to notify("READY=1")
            ...run until stopped...
    except (DaemonizeError, OSError, ...) as err:
        # Outside the `with`: the pid file is already removed and the
        # listeners closed when the original process hears about it.
        if startup:
            startup.failed(str(err))                 # printed by the original
        else:
            print(f"tsechod: {err}", file=sys.stderr)
        return 1

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

import errno
import fcntl
import grp
import logging
import os
import pwd
import select
import sys
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Final, Protocol

import daemon  # type: ignore[import-untyped]

logger = logging.getLogger(__name__)

DAEMON_UMASK: Final = 0o027
DAEMON_WORKING_DIRECTORY: Final = "/"
PID_FILE_MODE: Final = 0o644
DEFAULT_STARTUP_TIMEOUT_S: Final = 60.0
# Below PIPE_BUF (4096 on Linux), so one write() on the status pipe is atomic.
_MAX_REPORT_BYTES: Final = 2048
_READY: Final = b"READY"
_FAILED: Final = b"FAILED"
SYSTEMD_REFUSAL: Final = (
    "--daemon is not used under systemd: the service runs in the foreground "
    "(Type=notify); drop --daemon from ExecStart"
)


class DaemonizeError(Exception):
    """Base class; ``str()`` is a one-line message for the operator."""


class AlreadyRunningError(DaemonizeError):
    """Another process holds the lock on the pid file."""

    def __init__(self, pid: int | None, path: Path) -> None:
        self.pid = pid
        self.path = path
        if pid is None:
            text = (
                f"already running (pid file {path} is locked by a process that has "
                "not written its PID yet); stop it first, or use --pid-file"
            )
        else:
            text = (
                f"already running as PID {pid} (pid file {path}); "
                "stop it first, or use --pid-file"
            )
        super().__init__(text)


class PidFileError(DaemonizeError):
    """The pid file cannot be opened, locked or written."""


class PrivilegeError(DaemonizeError):
    """--user/--group cannot be applied."""


class DetachError(DaemonizeError):
    """Forking or setting up the status pipe failed (reported before detaching)."""


class _HasFileno(Protocol):
    def fileno(self) -> int: ...


def _read_pid(fd: int) -> int | None:
    """The PID on the first line of the file behind *fd*, or None."""
    try:
        data = os.pread(fd, 64, 0)
    except OSError:
        return None
    first = data.split(b"\n", 1)[0].strip()
    return int(first) if first.isdigit() else None


class PidFile:
    """A pid file protected by an ``flock`` held as long as the fd is open.

    The lock, not the PID written inside, says whether an instance runs: a
    file nobody has locked is left over and is taken over. The fd is
    ``O_CLOEXEC`` (programs we exec don't inherit the lock) but survives
    ``fork``, so the daemon keeps it when ``detach`` gets it via ``pidfile=``
    (or its ``fileno()`` in ``preserve_fds``).
    """

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self._fd: int | None = None
        # The process that removes the file on release(): the acquirer, then
        # the daemon once detach() hands it over. Other processes (the
        # original process after detach, anything forked later) only close
        # their copy of the fd.
        self._owner_pid: int | None = None

    def fileno(self) -> int:
        """The locked fd, for ``files_preserve``. Raises ValueError when not held."""
        if self._fd is None:
            raise ValueError(f"pid file {self.path} is not acquired")
        return self._fd

    def acquire(self) -> None:
        """Create or open the file and lock it; clear a stale PID.

        Raises ``AlreadyRunningError`` if another process holds the lock and
        ``PidFileError`` if the file can't be opened or locked (missing
        directory, permissions, a symlink at *path*).
        """
        if self._fd is not None:
            return
        # Bounded: each retry means another instance removed the file between
        # our open() and flock(); three in a row is not a race any more.
        for _attempt in range(3):
            try:
                # O_NOFOLLOW: a pid file in a shared directory must not be
                # redirected elsewhere by a symlink.
                fd = os.open(
                    self.path,
                    os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW,
                    PID_FILE_MODE,
                )
            except OSError as err:
                if err.errno == errno.EACCES:
                    self._raise_if_locked()  # e.g. root's instance runs
                raise PidFileError(
                    f"cannot open pid file {self.path}: {err.strerror}"
                    + _pidfile_hint(err)
                ) from err
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                pid = _read_pid(fd)
                os.close(fd)
                raise AlreadyRunningError(pid, self.path) from None
            except OSError as err:
                os.close(fd)
                raise PidFileError(
                    f"cannot lock pid file {self.path}: {err.strerror}"
                ) from err
            # The instance that held the lock unlinks the file *before* it
            # lets go of the lock; if that happened between our open() and
            # flock(), we locked an orphaned inode. Only a lock on the inode
            # that *path* names counts.
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        else:
            raise PidFileError(
                f"cannot lock pid file {self.path}: it keeps being replaced "
                "(another tsechod starting and stopping?)"
            )
        stale = _read_pid(fd)
        if stale is not None:
            logger.info(
                "taking over stale pid file %s (PID %d left it, holding no lock)",
                self.path,
                stale,
            )
        # Empty until write(): a stale PID must never be read as ours (and
        # `kill $(cat pidfile)` must not hit whatever process reused it).
        try:
            os.ftruncate(fd, 0)
        except OSError as err:
            os.close(fd)
            raise PidFileError(f"cannot write pid file {self.path}: {err.strerror}") from err
        self._fd = fd
        self._owner_pid = os.getpid()

    def _raise_if_locked(self) -> None:
        """Raise AlreadyRunningError if someone holds the lock; we may only read."""
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except OSError:
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            raise AlreadyRunningError(_read_pid(fd), self.path) from None
        except OSError:
            pass
        finally:
            os.close(fd)

    def write(self, pid: int | None = None) -> None:
        """Record *pid* (default: this process) and make this process the owner.

        Written in place through the locked fd, never via temp file + rename:
        ``flock`` locks the inode, and rename() would put a new, unlocked inode
        at *path*, so a second instance could lock that one and run beside
        us. In place, a reader sees the empty file left by ``acquire()`` or the
        whole line: one small ``pwrite`` at offset 0 (no torn read of a few
        bytes on Linux), then ``ftruncate`` to its length (in case anything
        longer was there), then ``fsync`` so it survives a crash.
        """
        fd = self.fileno()
        data = f"{os.getpid() if pid is None else pid}\n".encode()
        try:
            os.pwrite(fd, data, 0)
            os.ftruncate(fd, len(data))
            os.fsync(fd)
        except OSError as err:
            raise PidFileError(
                f"cannot write pid file {self.path}: {err.strerror}"
            ) from err
        self._owner_pid = os.getpid()

    def release(self) -> None:
        """Remove the file and unlock, if this process owns it; else just close.

        The owner is the process that acquired or wrote the file (the daemon,
        once ``detach(pidfile=...)`` handed it over). The lock belongs to the
        open file description, shared by every forked copy of the fd, so a
        non-owner (the original process after ``detach``, a forked worker)
        must not ``LOCK_UN``, which would unlock the daemon; it only closes
        its fd. The owner unlinks the file only if *path* is still our inode
        and holds our PID (or nothing), and unlinks *before* unlocking, so
        nobody locks the file just before it disappears (``acquire`` checks
        the inode for that race). Safe to call twice.
        """
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            if self._owner_pid == os.getpid():
                self._remove_if_ours(fd)
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def _remove_if_ours(self, fd: int) -> None:
        pid = _read_pid(fd)
        if pid is not None and pid != os.getpid():
            logger.warning("pid file %s names PID %d, not us; leaving it", self.path, pid)
            return
        try:
            if os.stat(self.path).st_ino != os.fstat(fd).st_ino:
                return  # replaced by someone else: not ours to remove
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        except OSError as err:
            # E.g. after --user the daemon may not write (or even search) the
            # directory when root owns it. Emptying the file through our fd
            # keeps a dead PID out of it; the next start takes it over, since
            # nobody holds the lock.
            logger.warning(
                "cannot remove pid file %s: %s; emptied it instead", self.path, err.strerror
            )
            os.ftruncate(fd, 0)

    def _hand_over(self, to_this_process: bool) -> None:
        """Called by ``detach`` right after forking, in both processes."""
        self._owner_pid = os.getpid() if to_this_process else None

    def __enter__(self) -> PidFile:
        self.acquire()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()


def _pidfile_hint(err: OSError) -> str:
    if err.errno == errno.ENOENT:
        return " (create the directory, or use --pid-file)"
    if err.errno in (errno.EACCES, errno.EPERM):
        return " (start as root, or use --pid-file with a writable path)"
    if err.errno == errno.ELOOP:
        return " (it is a symlink; refusing to follow it)"
    return ""


class StartupReport:
    """The daemon's end of the status pipe: say ``ready()`` or ``failed()`` once.

    Whichever is called first writes one line and closes the pipe; later calls
    do nothing. If the daemon exits without either, the original process sees
    the pipe close and reports that the daemon died during startup.
    """

    def __init__(self, fd: int) -> None:
        self._fd: int | None = fd

    @property
    def reported(self) -> bool:
        return self._fd is None

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


def _lookup_user(user: str) -> pwd.struct_passwd:
    try:
        return pwd.getpwuid(int(user)) if user.isdigit() else pwd.getpwnam(user)
    except KeyError:
        raise PrivilegeError(
            f"unknown user {user!r} (--user); check: getent passwd {user}"
        ) from None


def _lookup_group(group: str) -> int:
    try:
        entry = grp.getgrgid(int(group)) if group.isdigit() else grp.getgrnam(group)
    except KeyError:
        raise PrivilegeError(
            f"unknown group {group!r} (--group); check: getent group {group}"
        ) from None
    return entry.gr_gid


def drop_privileges(user: str | None, group: str | None) -> None:
    """Switch to *user* and *group* for good (real, effective and saved ids).

    Nothing to do when both are None. As root: the supplementary groups
    become the user's (``os.getgrouplist``; just *group* without a user),
    then the gid (``group``, else the user's primary group), then the uid;
    in that order because after setuid() we may no longer change groups.
    Afterwards it checks that root can't be regained. Without a user only
    the groups change. Call after binding (so ports below 1024 work) and after
    opening the pid and log files.

    Raises ``PrivilegeError`` for an unknown user or group, when not root
    (``--user needs root``), or when a set*id call fails.
    """
    if user is None and group is None:
        return
    if os.geteuid() != 0:
        flag = "--user" if user is not None else "--group"
        raise PrivilegeError(f"{flag} needs root (running as uid {os.geteuid()})")
    entry = _lookup_user(user) if user is not None else None
    if group is not None:
        gid = _lookup_group(group)
    else:
        assert entry is not None
        gid = entry.pw_gid
    groups = os.getgrouplist(entry.pw_name, gid) if entry is not None else [gid]
    target = f"user {user} " if user is not None else ""
    try:
        os.setgroups(groups)
        os.setresgid(gid, gid, gid)
        if entry is not None:
            os.setresuid(entry.pw_uid, entry.pw_uid, entry.pw_uid)
    except OSError as err:
        raise PrivilegeError(
            f"cannot switch to {target}group {gid}: {err.strerror}"
        ) from err
    if entry is not None and entry.pw_uid != 0:
        try:
            os.setuid(0)
        except PermissionError:
            pass
        else:
            raise PrivilegeError(f"dropped to {target.strip()} but could regain root")
    logger.debug("now uid=%s gid=%d groups=%s", os.getuid(), gid, groups)


def refuse_under_systemd(environ: Mapping[str, str]) -> str | None:
    """The reason ``--daemon`` is refused when systemd started us, else None.

    systemd sets INVOCATION_ID for every unit it starts and NOTIFY_SOCKET for
    Type=notify; a forking daemon would leave systemd tracking the wrong PID.
    """
    if environ.get("INVOCATION_ID") or environ.get("NOTIFY_SOCKET"):
        return SYSTEMD_REFUSAL
    return None


__all__ = [
    "AlreadyRunningError",
    "DaemonizeError",
    "DetachError",
    "ParentOutcome",
    "PidFile",
    "PidFileError",
    "PrivilegeError",
    "StartupReport",
    "SYSTEMD_REFUSAL",
    "detach",
    "drop_privileges",
    "refuse_under_systemd",
]
