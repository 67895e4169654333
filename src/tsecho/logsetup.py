"""Logging: where log lines go (stderr, a file, syslog), their format, reopening.

``configure_logging(config)`` may be called again (on reload); it replaces the
handlers it installed before. Under systemd, stderr is the journal: lines then
start with a syslog priority (``<6>``) and carry no timestamp, since journald
adds one, and ``journalctl -p warning`` can filter them.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import os
import sys
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any, Final

from .config import Config

ROOT_LOGGER: Final = "tsecho"
LOG_FILE_MODE: Final = 0o640
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


class ReopenableFileHandler(logging.StreamHandler[IO[str]]):
    """Append to a file created with mode 0640; ``reopen()`` after logrotate moved it.

    Reopening happens under the handler's lock, so no record is lost or
    written twice across a rotation.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        super().__init__(self._open())

    def _open(self) -> IO[str]:
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, LOG_FILE_MODE)
        return open(fd, "a", encoding="utf-8", errors="backslashreplace")

    def reopen(self) -> None:
        new_stream = self._open()
        self.acquire()
        try:
            old, self.stream = self.stream, new_stream
            old.close()
        finally:
            self.release()

    def close(self) -> None:
        self.acquire()
        try:
            if not self.stream.closed:
                self.stream.close()
        finally:
            self.release()
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


_installed: list[logging.Handler] = []


def configure_logging(config: Config, environ: Mapping[str, str] | None = None) -> list[int]:
    """Send the package's log records where *config* says; return the fds it writes to.

    The fds are what a daemonizing step must keep open. Raises OSError if the
    log file can't be opened (the caller reports it; nothing is changed then).
    """
    environ = os.environ if environ is None else environ
    journal = config.log_target == "stderr" and stderr_is_journal(environ)
    handler: logging.Handler
    if config.log_target == "file":
        assert config.log_file is not None  # config.py guarantees it
        handler = ReopenableFileHandler(config.log_file)
    elif config.log_target == "syslog":
        handler = logging.handlers.SysLogHandler(
            address="/dev/log", facility=logging.handlers.SysLogHandler.LOG_DAEMON
        )
        handler.ident = "tsechod: "
    else:
        handler = logging.StreamHandler(sys.stderr)
    if config.log_format == "json":
        handler.setFormatter(JsonFormatter(journal))
    else:
        handler.setFormatter(TextFormatter(journal, stamped=config.log_target != "syslog"))
    logger = logging.getLogger(ROOT_LOGGER)
    with _lock:
        for old in _installed:
            logger.removeHandler(old)
            if old is not handler:
                old.close()
        _installed[:] = [handler]
        logger.addHandler(handler)
        logger.setLevel(config.log_level.upper())
        logger.propagate = False
    return log_fds()


def log_fds() -> list[int]:
    """The file descriptors the installed log handlers write to."""
    fds = []
    for handler in _installed:
        stream = getattr(handler, "stream", None) or getattr(handler, "socket", None)
        if stream is not None:
            try:
                fds.append(stream.fileno())
            except (OSError, ValueError):
                pass
    return fds


def log_file_stream() -> IO[str] | None:
    """The log file's stream when logging to a file (a daemon's stdout and stderr go there)."""
    for handler in _installed:
        if isinstance(handler, ReopenableFileHandler):
            return handler.stream
    return None


def reopen_logs() -> None:
    """Reopen log files (SIGUSR1, after logrotate moved them away)."""
    for handler in list(_installed):
        if isinstance(handler, ReopenableFileHandler):
            handler.reopen()
