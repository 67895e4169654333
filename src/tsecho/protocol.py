"""The wire protocol, sans I/O: bytes in, complete lines out, reply bytes back.

No sockets, no logging and no clock reads here (the handler passes the time in),
so everything in this module is tested by feeding it bytes. See docs/protocol.md.

Lines travel as *blocks*: a block is zero or more complete lines, each still
ending in its LF (and in the CR before it, if the client sent CRLF). Keeping the
ending lets one ``bytes.replace`` build the replies for a whole read at C speed,
and mirrors the client's line ending for free: ``abc\\r\\n`` is answered with
``[stamp] abc\\r\\n``.
"""

from __future__ import annotations

import datetime
import time
from collections.abc import Callable
from typing import Final

ERR_BUSY: Final = b"ERR server busy\n"
ERR_TOO_MANY_FROM_IP: Final = b"ERR too many connections from your address\n"

# Telnet (RFC 854/855) command bytes that matter to the filter.
IAC: Final = 255
SB: Final = 250
SE: Final = 240
IP: Final = 244  # "interrupt process": what telnet sends for Ctrl-C
_WILL_WONT_DO_DONT: Final = frozenset((251, 252, 253, 254))


def err_line_too_long(max_line_bytes: int) -> bytes:
    """The reply sent, before closing, to a peer whose line exceeds the limit."""
    return b"ERR line too long (max %d bytes)\n" % max_line_bytes


class LineTooLong(ValueError):
    """The peer sent a line longer than max_line_bytes.

    ``lines_before`` holds the complete lines that arrived ahead of the long one,
    so they can still be answered before the error.
    """

    def __init__(self, max_line_bytes: int, lines_before: bytes = b"") -> None:
        super().__init__(f"line too long (max {max_line_bytes} bytes)")
        self.max_line_bytes = max_line_bytes
        self.lines_before = lines_before


class LineDecoder:
    """Split a byte stream into blocks of complete lines. Owns the max-line rule.

    The length of a line is counted without its ending (LF or CRLF). Memory is
    bounded: an unfinished line longer than the limit raises at once, so at most
    about ``max_line_bytes`` plus one read is held. Time is O(n) in the bytes
    fed, however small the pieces: an unfinished line is kept as a list of
    pieces and joined once, when its LF arrives (a 16 MiB line in 1,460-byte
    segments would otherwise be copied over and over, holding the GIL).
    """

    def __init__(self, max_line_bytes: int = 65536) -> None:
        self.max_line_bytes = max_line_bytes  # may change on reload; applies from the next feed
        self._pieces: list[bytes] = []
        self._pending = 0  # bytes held in _pieces

    @property
    def pending(self) -> int:
        """How many bytes of an unfinished line are held."""
        return self._pending

    def feed(self, data: bytes) -> bytes:
        """Add *data*; return the block of lines it completed (b"" if none).

        Raises LineTooLong as soon as a line, finished or not, is over the limit.
        """
        last_lf = data.rfind(b"\n")
        if last_lf < 0:
            if data:
                self._pieces.append(data)
                self._pending += len(data)
                if self._pending > self.max_line_bytes and self._unfinished_too_long(data):
                    self._clear()
                    raise LineTooLong(self.max_line_bytes)
            return b""
        if self._pieces:
            self._pieces.append(data[: last_lf + 1])
            block = b"".join(self._pieces)
            self._clear()
        else:
            block = data[: last_lf + 1]
        rest = data[last_lf + 1 :]
        # Every line in the block is at most len(block) long, so short blocks need no scan.
        if len(block) > self.max_line_bytes + 1:
            self._check_block(block)
        if len(rest) > self.max_line_bytes and self._unfinished_too_long(rest):
            raise LineTooLong(self.max_line_bytes, lines_before=block)
        if rest:
            self._pieces.append(rest)
            self._pending = len(rest)
        return block

    def finish(self) -> bytes:
        """The peer closed its side: return the unfinished last line as a block."""
        rest = b"".join(self._pieces)
        self._clear()
        return rest + b"\n" if rest else b""

    def _clear(self) -> None:
        self._pieces = []
        self._pending = 0

    def _unfinished_too_long(self, last_piece: bytes) -> bool:
        """Whether the held line (``_pending`` bytes, ending in *last_piece*) breaks the limit.

        An unfinished line may end in the CR of a CRLF still on its way.
        """
        size = self._pending if self._pieces else len(last_piece)
        return not (size == self.max_line_bytes + 1 and last_piece.endswith(b"\r"))

    def _check_block(self, block: bytes) -> None:
        start = 0
        end = len(block)
        while start < end:
            lf = block.index(b"\n", start)
            size = lf - start
            if size > self.max_line_bytes and not (size == self.max_line_bytes + 1 and block[lf - 1] == 13):
                raise LineTooLong(self.max_line_bytes, lines_before=block[:start])
            start = lf + 1


Prefixer = Callable[[bytes], bytes]

DEFAULT_PREFIX: Final = "[{stamp}] "
PREFIX_PLACEHOLDERS: Final = ("stamp", "host", "instance", "worker")


def make_prefixer(template: str, host: str, instance: str, worker: int) -> Prefixer | None:
    """Turn an ``[echo] prefix`` template into stamp -> prefix bytes; None for the default.

    Everything but ``{stamp}`` is fixed for the process, so it is filled in here,
    once: what is returned only joins three byte strings, and format_replies
    calls it once per block, never per line. The default returns None, so the
    default path costs exactly what it did. The template was validated by
    config.py (known placeholders, ``{stamp}`` once, printable).
    """
    if template == DEFAULT_PREFIX:
        return None
    rendered = template.format(stamp="\0", host=host, instance=instance, worker=worker)
    head, _, tail = rendered.partition("\0")
    head_bytes, tail_bytes = head.encode("utf-8", "backslashreplace"), tail.encode("utf-8", "backslashreplace")
    return lambda stamp: head_bytes + stamp + tail_bytes


def format_replies(block: bytes, stamp: bytes, prefixer: Prefixer | None = None) -> bytes:
    """The replies to a block of complete lines: each line behind ``[stamp] `` (or *prefixer*'s prefix).

    The line's bytes, its CR included, come back unchanged.
    """
    if not block:
        return b""
    return prefix_lines(block, reply_prefix(stamp, prefixer))


def reply_prefix(stamp: bytes, prefixer: Prefixer | None = None) -> bytes:
    """What goes before each reply line: ``[stamp] ``, or *prefixer*'s prefix."""
    return b"[" + stamp + b"] " if prefixer is None else prefixer(stamp)


def prefix_lines(block: bytes, prefix: bytes) -> bytes:
    """Each line of *block* (complete lines, not empty) behind *prefix*.

    For one line that is ``prefix + block``: the handler's fast path does that itself.
    """
    return prefix + block[:-1].replace(b"\n", b"\n" + prefix) + b"\n"


def count_lines(block: bytes) -> int:
    """How many lines a block holds."""
    return block.count(b"\n")


class TelnetFilter:
    """Remove telnet commands (RFC 854/855) from a byte stream.

    IAC commands and option negotiations (IAC WILL/WONT/DO/DONT opt) and
    subnegotiations (IAC SB ... IAC SE) are dropped; IAC IAC is a literal 0xFF.
    CR NUL, which telnet sends for Enter in character mode, becomes CR LF so it
    ends a line. IAC IP (Ctrl-C in telnet) sets ``interrupted``: the caller
    answers what came before it and closes. State carries across reads, so a
    command split between two reads is still removed.
    """

    _DATA, _IAC, _OPTION, _SUB, _SUB_IAC = range(5)

    def __init__(self) -> None:
        self._state = self._DATA
        self._after_cr = False
        self.interrupted = False

    @property
    def at_rest(self) -> bool:
        """Between commands and not after a CR: ``feed`` returns data without IAC or CR NUL unchanged."""
        return self._state == self._DATA and not self._after_cr

    def feed(self, data: bytes) -> bytes:
        """Return *data* without telnet commands. Stops at IAC IP."""
        if (
            self._state == self._DATA
            and b"\xff" not in data
            and b"\r\x00" not in data
            and not (self._after_cr and data.startswith(b"\x00"))
        ):
            if data:
                self._after_cr = data.endswith(b"\r")
            return data  # the common case: plain text, nothing to do
        out = bytearray()
        for byte in data:
            state = self._state
            if state == self._DATA:
                if byte == IAC:
                    self._state = self._IAC
                elif byte == 0 and self._after_cr:
                    out.append(10)
                    self._after_cr = False
                else:
                    out.append(byte)
                    self._after_cr = byte == 13
            elif state == self._IAC:
                self._state = self._DATA
                if byte == IAC:
                    out.append(IAC)
                    self._after_cr = False
                elif byte in _WILL_WONT_DO_DONT:
                    self._state = self._OPTION
                elif byte == SB:
                    self._state = self._SUB
                elif byte == IP:
                    self.interrupted = True
                    return bytes(out)
                # any other command (NOP, GA, AYT, DM, ...) is dropped
            elif state == self._OPTION:
                self._state = self._DATA  # the option byte itself
            elif state == self._SUB:
                if byte == IAC:
                    self._state = self._SUB_IAC
            else:  # _SUB_IAC
                self._state = self._DATA if byte == SE else self._SUB
        return bytes(out)


Stamper = Callable[[float], bytes]

TIMESTAMP_STYLES: Final = ("ctime", "iso", "epoch")


def make_stamper(style: str, utc: bool = False) -> Stamper:
    """Return a function turning a POSIX time into the timestamp bytes of *style*.

    *style* is ``ctime`` (``Thu Sep 15 22:29:12 2016``), ``iso`` (RFC 3339 with
    microseconds and offset), ``epoch`` (``1473978552.123456``), or a strftime
    pattern in which ``%f`` means microseconds. Local time unless *utc*.
    Raises ValueError for anything else. Second-resolution styles are cached
    per second, since the clock is read for every line.
    """
    if style == "ctime":
        to_struct = time.gmtime if utc else time.localtime
        return _per_second(lambda sec: time.asctime(to_struct(sec)))
    if style == "epoch":
        return lambda t: b"%.6f" % t
    if style == "iso":
        return _iso_stamper(utc)
    if "%" in style:
        return _strftime_stamper(style, utc)
    raise ValueError(f"unknown timestamp style {style!r}: use ctime, iso, epoch or a strftime pattern")


def _per_second(render: Callable[[int], str]) -> Stamper:
    cached = (-1, b"")  # (second, stamp), replaced whole so racing threads see one pair

    def stamp(t: float) -> bytes:
        nonlocal cached
        sec = int(t // 1)
        if cached[0] != sec:
            cached = (sec, render(sec).encode())
        return cached[1]

    return stamp


def _iso_stamper(utc: bool) -> Stamper:
    def render(sec: int) -> str:
        tz = datetime.timezone.utc if utc else None
        moment = datetime.datetime.fromtimestamp(sec, tz).astimezone(tz)
        return moment.isoformat(timespec="seconds")

    whole = _per_second(render)

    def stamp(t: float) -> bytes:
        head = whole(t)  # 2016-09-15T22:29:12+09:00
        micros = int((t % 1) * 1_000_000)
        return head[:19] + b".%06d" % micros + head[19:]

    return stamp


def _strftime_stamper(pattern: str, utc: bool) -> Stamper:
    to_struct = time.gmtime if utc else time.localtime
    # Split on %f but not on a literal %%f: strftime sees the pieces separately.
    pieces = _split_percent_f(pattern)
    if len(pieces) == 1:
        return _per_second(lambda sec: time.strftime(pattern, to_struct(sec)))
    render = _per_second(lambda sec: "\0".join(time.strftime(p, to_struct(sec)) if p else "" for p in pieces))

    def stamp(t: float) -> bytes:
        return render(t).replace(b"\0", b"%06d" % int((t % 1) * 1_000_000))

    return stamp


def _split_percent_f(pattern: str) -> list[str]:
    pieces: list[str] = []
    current: list[str] = []
    i = 0
    while i < len(pattern):
        if pattern[i] == "%" and i + 1 < len(pattern):
            if pattern[i + 1] == "f":
                pieces.append("".join(current))
                current = []
            else:
                current.append(pattern[i : i + 2])
            i += 2
        else:
            current.append(pattern[i])
            i += 1
    pieces.append("".join(current))
    return pieces
