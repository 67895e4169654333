"""Logging off the serving path: a bounded queue in front of the real log handler.

A thread that logs (a connection ending, the accept loop refusing, the signal
loop) only formats its line and puts it on a bounded ``LineQueue``; one writer
thread, ``tsecho-log-writer``, writes the lines to the *sink* (the handler for
stderr, the log file or syslog). A sink that stops reading (a stuck journald,
a FIFO whose reader paused, a full syslog socket) then blocks the writer and
nothing else. The class everything revolves around is ``BoundedQueueHandler``:
the stdlib's QueueHandler and QueueListener, plus what they leave open:

- the bound (``QUEUE_MAX_LINES`` lines, ``QUEUE_MAX_CHARS`` characters of text,
  about 8 MiB at most): a line that finds the queue full is dropped and counted;
- a line the sink refuses (a full disk, no /dev/log, EPIPE) is dropped and
  counted. The stdlib's ``Handler.handleError`` would print ``--- Logging
  error ---`` and a traceback to ``sys.stderr`` for each one (``logging.
  raiseExceptions`` is True by default), from the thread that is writing the
  log, so the sinks here override it (``SinkErrors``); ``logging.lastResort``
  is never involved, the ``tsecho`` logger always has this handler;
- one line says how many were dropped and why, at most every
  ``REPORT_EVERY_S``: through the sink once it works again, and on stderr while
  it doesn't (when the sink is not stderr itself);
- a stop that never waits on a stuck sink: ``close()`` (which
  ``logging.shutdown()`` calls at exit, holding only this handler's lock) lets
  the writer drain for at most ``DRAIN_S`` and gives up sooner when the writer
  makes no progress for ``STALL_S``. The writer calls the sink's ``emit()``
  without the sink's lock (it is the sink's only writer), so
  ``logging.shutdown()`` taking that lock never waits on a blocked write.
  Streams are ``FdStream``: no buffer and no lock of their own, so neither the
  final flush nor a close waits on a write stuck in the kernel;
- ``fork()``: the writer thread does not survive it. A child (a worker) gets a
  fresh queue and its own writer; the parent's queued lines stay the parent's.

Until ``start()`` (cli.py calls ``logsetup.start_log_writer()`` once the
process has detached, because ``daemonize.detach()`` refuses to fork with a
thread running) lines are written at once by the thread that logs them: that
is startup, before any connection.
"""

from __future__ import annotations

import errno
import logging
import logging.handlers
import os
import queue
import sys
import time
import weakref
from typing import Final

QUEUE_MAX_LINES: Final = 10_000
# A debug line can hold a whole 64 KiB read, escaped (up to 4 characters a byte).
QUEUE_MAX_CHARS: Final = 4 * 1024 * 1024
REPORT_EVERY_S: Final = 10.0  # as often as refused connections are summarized
DRAIN_S: Final = 0.5  # at most this long, at exit, for the lines still queued
STALL_S: Final = 0.1  # ... and less when the sink takes none of them for this long
WRITER_THREAD: Final = "tsecho-log-writer"
_STDERR_FD: Final = 2


class FdStream:
    """A text stream that is one ``write(2)`` per line: no buffer, no lock of its own.

    A buffered stream holds its lock across a blocked write, so the
    interpreter's final flush (or a close) would wait for a stuck pipe; and a
    full disk would keep failed lines in the buffer, to fail again on every
    later flush and on close. Here a line is written or refused, whole.
    """

    def __init__(self, fd: int, owned: bool) -> None:
        self.fd = fd
        self.owned = owned
        self.closed = False

    def write(self, text: str) -> int:
        if self.closed:  # don't write to a descriptor number that may have been reused
            raise ValueError("write to a closed log stream")
        view = memoryview(text.encode("utf-8", "backslashreplace"))
        while view:
            written = os.write(self.fd, view)
            if not written:  # never for a pipe or a file; don't spin if some device does it
                raise OSError(errno.EIO, "write(2) wrote nothing")
            view = view[written:]
        return len(text)

    def flush(self) -> None:
        """Nothing is buffered."""

    def fileno(self) -> int:
        return self.fd

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self.owned:
                os.close(self.fd)


class SinkErrors(logging.Handler):
    """Mixin for a sink: a line it can't write is kept for the writer to count, never printed."""

    error: BaseException | None = None

    def handleError(self, record: logging.LogRecord) -> None:
        self.error = sys.exc_info()[1]


class StreamSink(SinkErrors, logging.StreamHandler[FdStream]):
    """Lines to a descriptor this process doesn't own (stderr)."""

    def __init__(self, fd: int = _STDERR_FD) -> None:
        super().__init__(FdStream(fd, owned=False))


class SyslogSink(SinkErrors, logging.handlers.SysLogHandler):
    """Lines to syslog; a datagram socket that stops reading blocks only the writer."""


class QueuedLine(logging.LogRecord):
    """A record reduced to its formatted text and level: what a sink needs, at a third of the memory.

    The stdlib's ``QueueHandler.prepare()`` queues a copy of the whole record
    (about 900 bytes for an access event, measured); time, thread and the
    event's fields are in the text already.
    """

    def __init__(self, record: logging.LogRecord, text: str) -> None:  # noqa: no LogRecord.__init__: nothing to collect
        self.name = record.name
        self.levelno = record.levelno
        self.levelname = record.levelname
        self.msg = text
        self.args = None
        self.exc_info = None
        self.exc_text = None
        self.stack_info = None


class LineQueue(queue.Queue[logging.LogRecord]):
    """A queue.Queue bounded by lines and by characters of formatted text.

    ``put()`` refuses when ``_qsize() >= maxsize``, so past the character bound
    ``_qsize`` answers "full". All three hooks run under the queue's mutex.
    """

    def __init__(self, max_lines: int = QUEUE_MAX_LINES, max_chars: int = QUEUE_MAX_CHARS) -> None:
        self.max_chars = max_chars
        self.chars = 0
        super().__init__(max_lines)

    def _put(self, item: logging.LogRecord) -> None:
        self.queue.append(item)
        self.chars += len(item.msg)

    def _get(self) -> logging.LogRecord:
        item: logging.LogRecord = self.queue.popleft()
        self.chars -= len(item.msg)
        return item

    def _qsize(self) -> int:
        size: int = len(self.queue)
        return max(size, self.maxsize) if size and self.chars >= self.max_chars else size

    def put_past_bound(self, item: logging.LogRecord) -> None:
        """Queue *item* even when full (the writer's stop mark must always get in)."""
        with self.mutex:
            self._put(item)
            self.unfinished_tasks += 1
            self.not_empty.notify()


class _Drops:
    """Lines lost before the writer saw them, counted by the threads that log (under the handler's lock)."""

    def __init__(self) -> None:
        self.queue_full = 0
        self.unformattable = 0
        self.format_error = ""
        self.first_at = 0.0  # monotonic time of the first drop not reported yet


def describe_error(err: BaseException | None) -> str:
    """'No space left on device (ENOSPC)' for an OSError; the exception's own words otherwise."""
    if isinstance(err, OSError) and err.errno is not None:
        name = errno.errorcode.get(err.errno, str(err.errno))
        return f"{err.strerror or os.strerror(err.errno)} ({name})"
    return f"{type(err).__name__}: {err}" if err is not None else "unknown error"


class LogWriter(logging.handlers.QueueListener):
    """The writer thread: takes lines off the queue, writes them, counts and reports what is lost.

    Runs in ``tsecho-log-writer``; before ``start()``, ``handle()`` runs in the
    thread that logs, under the handler's lock. Either way one thread at a time
    touches the sink and the counts below.
    """

    def __init__(self, handler: BoundedQueueHandler) -> None:
        super().__init__(handler.queue, handler.sink)
        self.owner = handler
        self.lines = handler.queue
        self.sink = handler.sink
        # QueueListener's loop ends at its sentinel; ours is a record, so the queue stays typed.
        self._sentinel = self.stop_mark = logging.makeLogRecord({"msg": ""})
        self.handled = 0  # lines written (or refused) by the sink: the progress a stop watches
        self.failed = 0  # lines the sink refused since the last report
        self.failure = ""  # why, the last time
        self.failing = False
        self.reported_at = time.monotonic() - REPORT_EVERY_S  # the first report may go out at once
        self.noticed_at = self.reported_at  # when stderr last heard "cannot write"
        self._seen_queue_full = 0
        self._seen_unformattable = 0

    def start(self) -> None:
        super().start()
        assert self._thread is not None
        self._thread.name = WRITER_THREAD

    def dequeue(self, block: bool) -> logging.LogRecord:
        while True:
            try:
                record = self.lines.get(block, timeout=self._report_wait_s())
            except queue.Empty:
                self._report_safely()
                continue
            if record is self.stop_mark:
                self.finish()  # then QueueListener's loop ends
            return record

    def handle(self, record: logging.LogRecord) -> None:
        sink = self.sink
        try:
            sink.emit(record)  # not sink.handle(): no sink lock for logging.shutdown() to wait on
        except Exception as exc:  # noqa: BLE001 - emit() catches its own; this thread must not die
            sink.error = exc
        self.handled += 1  # after the write: what wait_written and a stop's progress count
        error, sink.error = sink.error, None
        if error is None:
            self.failing = False  # (again): a count still unreported goes out now, or when due
            self._report_safely()
            return
        self.failed += 1
        self.failure = describe_error(error)
        if not self.owner.drops.first_at:
            self.owner.drops.first_at = time.monotonic()
        if not self.failing:
            self.failing = True
            now = time.monotonic()
            if now - self.noticed_at >= REPORT_EVERY_S:
                self.noticed_at = now
                self._notice_on_stderr(logging.ERROR, (
                    f"cannot write log lines to {self.owner.sink_name}: {self.failure}; dropping and counting "
                    f"them until it works again (tsechod keeps serving)"))

    def report_drops(self, force: bool = False) -> None:
        """One line with the lines dropped since the last report: at most every REPORT_EVERY_S."""
        drops = self.owner.drops
        queue_full = drops.queue_full - self._seen_queue_full
        unformattable = drops.unformattable - self._seen_unformattable
        total = self.failed + queue_full + unformattable
        now = time.monotonic()
        if not total or (not force and now < self._report_due_at()):
            return
        reasons = []
        if self.failed:
            reasons.append(f"{self.failed} could not be written to {self.owner.sink_name}: {self.failure}")
        if queue_full:
            reasons.append(f"{queue_full} found the queue full ({QUEUE_MAX_LINES} lines or "
                           f"{QUEUE_MAX_CHARS >> 20} MiB) because {self.owner.sink_name} did not keep up")
        if unformattable:
            reasons.append(f"{unformattable} could not be formatted ({drops.format_error}): a bug, please report it")
        window_s = now - (drops.first_at or self.reported_at)
        message = f"dropped {total} log lines in the last {window_s:.1f} s: {'; '.join(reasons)}"
        self._seen_queue_full += queue_full
        self._seen_unformattable += unformattable
        self.failed = 0
        drops.first_at = 0.0
        self.reported_at = now
        record = logging.LogRecord(__name__, logging.WARNING, __file__, 0, message, None, None)
        if not self.failing:
            self.sink.emit(self.owner.prepare(record))
            if self.sink.error is None:
                return
            self.sink.error = None
        self._notice_on_stderr(logging.WARNING, message)

    def _report_safely(self) -> None:
        try:
            self.report_drops()
        except Exception:  # noqa: BLE001 - a report that fails must not end the writer thread
            pass

    def _report_due_at(self) -> float:
        """A count goes out at most every REPORT_EVERY_S, and while the sink fails, not right behind
        the notice that said so; once it works again, at once (if the last count is that old)."""
        if self.failing:
            return max(self.reported_at, self.noticed_at) + REPORT_EVERY_S
        return self.reported_at + REPORT_EVERY_S

    def _report_wait_s(self) -> float:
        """How long the loop may wait for a line before a due report must go out."""
        drops = self.owner.drops
        if not (self.failed or drops.queue_full != self._seen_queue_full
                or drops.unformattable != self._seen_unformattable):
            return REPORT_EVERY_S
        return max(0.0, self._report_due_at() - time.monotonic())

    def _notice_on_stderr(self, level: int, message: str) -> None:
        """Say it on stderr too, when the sink is something else (best effort: stderr may be gone as well)."""
        formatter = self.owner.stderr_formatter
        if formatter is None:
            return
        record = logging.LogRecord(__name__, level, __file__, 0, message, None, None)
        try:
            os.write(_STDERR_FD, (formatter.format(record) + "\n").encode("utf-8", "backslashreplace"))
        except OSError:
            pass

    def enqueue_sentinel(self) -> None:
        self.lines.put_past_bound(self.stop_mark)

    def stop(self) -> None:
        self.stop_within(DRAIN_S, STALL_S)

    def stop_within(self, drain_s: float, stall_s: float) -> bool:
        """Write what is queued, report the drops, close the sink: within *drain_s*, whatever the sink does.

        Gives up sooner when no line was taken for *stall_s*. Returns whether
        the writer finished; if not, it stays blocked (a daemon thread: it ends
        with the process) and the lines still queued are lost.
        """
        thread = self._thread
        if thread is None:
            return True
        self.enqueue_sentinel()
        start = progress_at = time.monotonic()
        handled = self.handled
        while thread.is_alive():
            now = time.monotonic()
            if self.handled != handled:
                handled, progress_at = self.handled, now
            if now - start >= drain_s or now - progress_at >= stall_s:
                return False
            thread.join(min(0.01, stall_s))
        self._thread = None
        return True

    def finish(self) -> None:
        """The writer's last act, on its own thread (or the caller's, if it never started)."""
        try:
            self.report_drops(force=True)
        finally:
            self.sink.close()


class BoundedQueueHandler(logging.handlers.QueueHandler):
    """The handler on the ``tsecho`` logger: format in the caller, queue, let the writer write.

    *formatter* formats the lines (in the thread that logs, as the stdlib's
    ``prepare()`` does); the sink writes them as they are. *sink_name* names
    the sink in reports ("stderr", "log file /var/log/tsechod/tsechod.log").
    *stderr_formatter*, when the sink is not stderr, is how reports are also
    written to stderr while the sink refuses lines.
    """

    queue: LineQueue

    def __init__(self, sink: SinkErrors, sink_name: str, formatter: logging.Formatter,
                 stderr_formatter: logging.Formatter | None = None) -> None:
        super().__init__(LineQueue())
        self.sink = sink
        self.sink_name = sink_name
        self.stderr_formatter = stderr_formatter
        self.setFormatter(formatter)
        sink.setFormatter(logging.Formatter("%(message)s"))  # the text comes formatted
        self.drops = _Drops()
        self.enqueued = 0  # lines given to the writer, queued or written at once (under this handler's lock)
        self.writer = LogWriter(self)
        self.started = False
        self.closed = False
        _handlers.add(self)

    def start(self) -> None:
        """Write from the writer thread from now on."""
        self.acquire()
        try:
            if not self.started and not self.closed:
                self.started = True
                self.writer.start()
        finally:
            self.release()

    def emit(self, record: logging.LogRecord) -> None:
        # Runs under self.lock (Handler.handle), which nothing holds for long once started.
        if self.started and not self.closed:
            super().emit(record)  # prepare() + enqueue(); an exception goes to handleError
        elif self.closed:
            self._count_drop()
        else:
            try:
                self.enqueued += 1  # written at once, but counted as the writer counts it
                self.writer.handle(self.prepare(record))
            except Exception:  # noqa: BLE001 - a record that can't be formatted
                self.handleError(record)

    def prepare(self, record: logging.LogRecord) -> QueuedLine:
        return QueuedLine(record, self.format(record))

    def enqueue(self, record: logging.LogRecord) -> None:
        try:
            self.queue.put_nowait(record)
        except queue.Full:
            self._count_drop()
        else:
            self.enqueued += 1

    def wait_written(self, timeout_s: float) -> bool:
        """Wait until the writer has taken every line queued so far, at most *timeout_s*.

        A reopen waits for this, so lines logged before it (``received SIGUSR1``)
        go to the old file; a stuck sink costs the wait, never more.
        """
        target = self.enqueued
        deadline = time.monotonic() + timeout_s
        while self.started and self.writer.handled < target:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.001)
        return True

    def _count_drop(self) -> None:
        self.drops.queue_full += 1
        if not self.drops.first_at:
            self.drops.first_at = time.monotonic()

    def handleError(self, record: logging.LogRecord) -> None:
        # A record that can't be formatted (wrong arguments for its message): a bug, counted, not printed.
        self.drops.unformattable += 1
        self.drops.format_error = describe_error(sys.exc_info()[1])
        if not self.drops.first_at:
            self.drops.first_at = time.monotonic()

    def retire(self) -> None:
        """Replaced (a reload changed the log settings): the writer finishes on its own; no waiting here."""
        self.acquire()
        try:
            if self.closed:
                return
            self.closed = True
            if self.started:
                self.writer.enqueue_sentinel()
            else:
                self.writer.finish()
        finally:
            self.release()
        super().close()

    def close(self) -> None:
        """At exit (``logging.shutdown()``): drain within DRAIN_S, report, close the sink."""
        self.acquire()
        try:
            if not self.closed:
                self.closed = True
                if self.started:
                    self.writer.stop()  # a stuck sink: what is still queued is lost with the process
                else:
                    self.writer.finish()
        finally:
            self.release()
        super().close()

    def after_fork_in_child(self) -> None:
        """The writer thread stayed in the parent: a fresh queue and writer of our own."""
        if not self.started or self.closed:
            return
        self.queue = LineQueue()
        self.drops = _Drops()
        self.enqueued = 0
        self.sink.error = None
        self.writer = LogWriter(self)
        self.writer.start()


_handlers: weakref.WeakSet[BoundedQueueHandler] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for handler in list(_handlers):
        handler.after_fork_in_child()


os.register_at_fork(after_in_child=_after_fork_in_child)
