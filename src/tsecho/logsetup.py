"""Logging: where log lines go (stderr, a file, syslog), their format, reopening.

``configure_logging(config)`` may be called again (on reload); it replaces the
handler it installed before when the log settings changed. Under systemd,
stderr is the journal: lines then start with a syslog priority (``<6>``) and
carry no timestamp, since journald adds one, and ``journalctl -p warning`` can
filter them. How lines reach the sink without ever blocking the thread that
logs (a bounded queue, a writer thread, drops counted) is logqueue.py's job.
"""

from __future__ import annotations

import errno
import json
import logging
import logging.handlers
import os
import socket
import sys
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any, Final

from .config import Config, ConfigError
from .logqueue import BoundedQueueHandler, FdStream, SinkErrors, StreamSink, SyslogSink, describe_error

logger = logging.getLogger(__name__)

ROOT_LOGGER: Final = "tsecho"
LOG_FILE_MODE: Final = 0o640
# A reopen waits at most this long for the lines queued before it to reach the old file.
REOPEN_WAIT_S: Final = 0.5
_TEXT_FORMAT: Final = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_JOURNAL_FORMAT: Final = "%(levelname)s %(name)s: %(message)s"
_EVENT_FIELDS: Final = ("event", "peer", "via", "reason", "duration_s", "lines", "bytes_in", "bytes_out", "detail",
                         "health_check", "authority", "alpn", "aws_vpce_id")
_SYSLOG_PRIORITY: Final = {"DEBUG": 7, "INFO": 6, "WARNING": 4, "ERROR": 3, "CRITICAL": 2}
# Control characters (but tab) in a message could forge or garble log lines.
_CONTROL: Final = {c: f"\\x{c:02x}" for c in range(32) if c != 9} | {127: "\\x7f"}

_lock = threading.Lock()


def _safe(text: str) -> str:
    return text.translate(_CONTROL)


class TextFormatter(logging.Formatter):
    """Plain lines; control characters in the message are escaped, tracebacks are kept."""

    def __init__(self, journal: bool = False, stamped: bool = True) -> None:
        # journald and syslog stamp each line themselves
        super().__init__(_TEXT_FORMAT if stamped and not journal else _JOURNAL_FORMAT)
        self.journal = journal

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = _safe(record.message)
        line = super().formatMessage(record)
        if self.journal:
            return f"<{_SYSLOG_PRIORITY.get(record.levelname, 6)}>{line}"
        return line

    def formatException(self, ei: Any) -> str:
        text = super().formatException(ei)
        if self.journal:  # keep the priority on every line of the traceback
            return "\n".join(f"<3>{line}" for line in text.splitlines())
        return text


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message and the event's fields."""

    def __init__(self, journal: bool = False) -> None:
        super().__init__()
        self.journal = journal

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for field in _EVENT_FIELDS:
            if hasattr(record, field):
                entry[field] = getattr(record, field)
        if record.exc_info:
            entry["traceback"] = self.formatException(record.exc_info)
        line = json.dumps(entry, ensure_ascii=True)  # json escapes every control character
        return f"<{_SYSLOG_PRIORITY.get(record.levelname, 6)}>{line}" if self.journal else line


class ReopenableFileHandler(SinkErrors, logging.StreamHandler[FdStream]):
    """Append to a file created with mode 0640; ``reopen()`` after logrotate moved it.

    Each line is one write(2) on an O_APPEND descriptor (``FdStream``): a full
    disk loses exactly the lines it refuses, and nothing buffered is left to
    fail at a close (that is what made SIGUSR1 on a full disk fatal).
    ``reopen()`` opens the new file at once, so its errors reach the caller,
    and hands it to the writer thread, which switches before its next line:
    no line is lost or written twice across a rotation.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._next: FdStream | None = None
        self._swap = threading.Lock()  # guards _next only; never held while writing
        super().__init__(self._open())

    def _open(self) -> FdStream:
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, LOG_FILE_MODE)
        return FdStream(fd, owned=True)

    def reopen(self) -> None:
        """Open the file again (raises OSError); lines go there from the next one on."""
        new = self._open()
        with self._swap:
            replaced, self._next = self._next, new
        if replaced is not None:  # two reopens before a line: the newer wins
            replaced.close()
        # A line now makes the writer switch at once (and close the old file, whose
        # space a deleted rotation would otherwise keep); it says where logs go, too.
        logger.info("reopened log file %s", self.path)

    def emit(self, record: logging.LogRecord) -> None:
        if self._next is not None:
            with self._swap:
                new, self._next = self._next, None
            if new is not None:
                old, self.stream = self.stream, new
                old.close()
        super().emit(record)

    def close(self) -> None:
        with self._swap:
            pending, self._next = self._next, None
        for stream in (self.stream, pending):
            if stream is not None:
                stream.close()
        super().close()


def stderr_is_journal(environ: Mapping[str, str], stream: IO[str] | None = None) -> bool:
    """Whether stderr is connected to journald (JOURNAL_STREAM names its device:inode)."""
    value = environ.get("JOURNAL_STREAM", "")
    stream = stream or sys.stderr
    try:
        dev, ino = (int(part) for part in value.split(":"))
        st = os.fstat(stream.fileno())
    except (ValueError, OSError):
        return False
    return (st.st_dev, st.st_ino) == (dev, ino)


SYSLOG_ADDRESS: Final = "/dev/log"

_installed: list[BoundedQueueHandler] = []
_settings: tuple[object, ...] | None = None  # what the installed handler was built from
_writing_in_background = False


def check_log_target(config: Config) -> Config:
    """Return *config* if its log target can work here; raise ConfigError if not.

    Only syslog is checked: a log file is opened (and its errors reported) by
    configure_logging. Part of loading the config (cli.py), so a start exits
    78 and a reload keeps the running config, with this one line.
    """
    if config.log_target == "syslog":
        try:
            _connect_syslog().close()
        except OSError as err:
            raise ConfigError(
                f'log_target = "syslog": cannot connect to {SYSLOG_ADDRESS}: {describe_error(err)} '
                '(is journald or a syslog daemon running? else set log_target = "stderr" or "file")'
            ) from None
    return config


def _connect_syslog() -> socket.socket:
    """A socket connected to /dev/log, datagram first, as SysLogHandler tries it."""
    for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):
        sock = socket.socket(socket.AF_UNIX, kind)
        try:
            sock.connect(SYSLOG_ADDRESS)
            return sock
        except OSError as err:
            sock.close()
            if kind == socket.SOCK_STREAM or err.errno != errno.EPROTOTYPE:
                raise
    raise AssertionError("unreachable")


def configure_logging(config: Config, environ: Mapping[str, str] | None = None) -> list[int]:
    """Send the package's log records where *config* says; return the fds it writes to.

    The fds are what a daemonizing step must keep open. Raises OSError if the
    log file can't be opened (the caller reports it; nothing is changed then).
    Unchanged log settings (a reload of other keys) keep the running handler,
    its queue and its file: only the level is set again.
    """
    global _settings
    environ = os.environ if environ is None else environ
    journal = config.log_target == "stderr" and stderr_is_journal(environ)
    settings = (config.log_target, config.log_file, config.log_format, journal)
    root = logging.getLogger(ROOT_LOGGER)
    with _lock:
        if settings == _settings and _installed:
            root.setLevel(config.log_level.upper())
            return log_fds()
    sink: SinkErrors
    if config.log_target == "file":
        assert config.log_file is not None  # config.py guarantees it
        sink = ReopenableFileHandler(config.log_file)
        sink_name = f"log file {config.log_file}"
    elif config.log_target == "syslog":
        sink = SyslogSink(address=SYSLOG_ADDRESS, facility=logging.handlers.SysLogHandler.LOG_DAEMON)
        sink.ident = "tsechod: "
        sink_name = f"syslog ({SYSLOG_ADDRESS})"
    else:
        sink = StreamSink()
        sink_name = "stderr"
    formatter: logging.Formatter
    if config.log_format == "json":
        formatter = JsonFormatter(journal)
    else:
        formatter = TextFormatter(journal, stamped=config.log_target != "syslog")
    # While the sink refuses lines, the count also goes to stderr (the terminal, or the journal).
    on_stderr = None if config.log_target == "stderr" else TextFormatter(stderr_is_journal(environ))
    handler = BoundedQueueHandler(sink, sink_name, formatter, on_stderr)
    with _lock:
        for old in _installed:
            root.removeHandler(old)
            old.retire()
        _installed[:] = [handler]
        _settings = settings
        root.addHandler(handler)
        root.setLevel(config.log_level.upper())
        root.propagate = False
        if _writing_in_background:
            handler.start()
    return log_fds()


def start_log_writer() -> None:
    """From now on, lines are written by a writer thread, never by the thread that logs.

    Call once the process has detached (a fork keeps no thread) and before it
    serves. A fork after this (a worker) starts the child's own writer.
    """
    global _writing_in_background
    with _lock:
        _writing_in_background = True
        for handler in _installed:
            handler.start()


def log_fds() -> list[int]:
    """The file descriptors the installed log handlers write to."""
    fds = []
    for handler in _installed:
        sink = handler.sink
        stream = getattr(sink, "stream", None) or getattr(sink, "socket", None)
        if stream is not None:
            try:
                fds.append(stream.fileno())
            except (OSError, ValueError):
                pass
    return fds


def log_file_stream() -> FdStream | None:
    """The log file's stream when logging to a file (a daemon's stdout and stderr go there)."""
    for handler in _installed:
        if isinstance(handler.sink, ReopenableFileHandler):
            return handler.sink.stream
    return None


def reopen_logs() -> bool:
    """Reopen log files (SIGUSR1, after logrotate moved them away); never raises.

    A file that can't be opened again (its directory gone or read-only, a full
    disk, no free descriptors) leaves the old one in use, with one error line.
    Returns whether every file was reopened.
    """
    ok = True
    for handler in list(_installed):
        sink = handler.sink
        if isinstance(sink, ReopenableFileHandler):
            handler.wait_written(REOPEN_WAIT_S)
            try:
                sink.reopen()
            except Exception as err:  # noqa: BLE001 - a signal must never take the process down
                ok = False
                logger.error(
                    "cannot reopen log file %s: %s; still writing to the file open before "
                    "(fix it, then send SIGUSR1 again)", sink.path, describe_error(err))
    return ok
