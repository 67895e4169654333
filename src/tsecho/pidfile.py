"""The pid file: an ``flock``-ed file naming the running tsechod, with or without --daemon.

``PidFile(path)``: ``acquire()`` (or ``with PidFile(path) as pidfile:``) opens
or creates the file and takes an ``fcntl.flock`` lock held for the daemon's
life. A file whose lock nobody holds is stale and is taken over, whatever PID
it names (PIDs get reused; the lock is the truth). A held lock raises
``AlreadyRunningError``. ``write()`` records the PID; ``release()`` (and
leaving the ``with``) removes the file and drops the lock, but only in the
process that owns it (daemonize.detach hands it over), and only if the file
is still ours. Errors derive from ``StartupError``; ``str(err)`` is one line.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
from pathlib import Path
from types import TracebackType
from typing import Final

logger = logging.getLogger(__name__)

PID_FILE_MODE: Final = 0o644


class StartupError(Exception):
    """A process-level step of startup failed (pid file, privileges, detaching); str() is one line."""


class AlreadyRunningError(StartupError):
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


class PidFileError(StartupError):
    """The pid file cannot be opened, locked or written."""



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
            links = os.fstat(fd).st_nlink
            if links > 1:
                # O_NOFOLLOW stops symlinks, not hard links: a root daemon writing through a
                # planted link would clobber whatever file it points at.
                os.close(fd)
                raise PidFileError(
                    f"refusing pid file {self.path}: it has {links} hard links, so another file "
                    "may be linked to it (remove it, or use --pid-file)"
                )
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
