"""The protocol core, fed bytes directly: no sockets, no clock."""

from __future__ import annotations

import datetime
import os
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tsecho.protocol import (
    LineDecoder,
    LineTooLong,
    TelnetFilter,
    count_lines,
    err_line_too_long,
    format_replies,
    make_stamper,
)

STAMP = b"T"


def replies_for(chunks: list[bytes], max_line: int = 64, telnet: bool = False) -> bytes:
    """What the server would send for *chunks*, read one by one, then the peer's half-close."""
    decoder = LineDecoder(max_line)
    filt = TelnetFilter() if telnet else None
    out = b""
    for chunk in chunks:
        if filt is not None:
            chunk = filt.feed(chunk)
        out += format_replies(decoder.feed(chunk), STAMP)
    return out + format_replies(decoder.finish(), STAMP)


def splits(data: bytes) -> list[list[bytes]]:
    """The same input whole, one byte at a time, and split at every offset."""
    ways = [[data], [data[i : i + 1] for i in range(len(data))]]
    ways += [[data[:i], data[i:]] for i in range(len(data) + 1)]
    return ways


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"hello python\n", b"[T] hello python\n"),
        (b"a\r\nb\n", b"[T] a\r\n[T] b\n"),  # the reply ends the way the line did
        (b"\n", b"[T] \n"),  # an empty line: a timestamp alone
        (b"\r\n", b"[T] \r\n"),
        (b"abc", b"[T] abc\n"),  # no LF before the half-close: still answered
        (b"a\nlast", b"[T] a\n[T] last\n"),
        (b"\xff\xfe\x00bin\x80\n", b"[T] \xff\xfe\x00bin\x80\n"),  # bytes come back unchanged
        (b"caf\xc3\xa9\n", b"[T] caf\xc3\xa9\n"),
        (b"a\rb\n", b"[T] a\rb\n"),  # a lone CR is payload
        (b"", b""),
    ],
)
def test_each_line_is_answered_the_same_however_it_is_split(data: bytes, expected: bytes) -> None:
    for chunks in splits(data):
        assert replies_for(chunks) == expected, chunks


@pytest.mark.parametrize("ending", [b"\n", b"\r\n"])
def test_a_line_of_exactly_max_bytes_is_accepted(ending: bytes) -> None:
    line = b"x" * 64
    for chunks in splits(line + ending):
        assert replies_for(chunks) == b"[T] " + line + ending


@pytest.mark.parametrize("ending", [b"\n", b"\r\n", b""])
def test_a_line_one_byte_over_max_raises(ending: bytes) -> None:
    for chunks in splits(b"x" * 65 + ending):
        with pytest.raises(LineTooLong, match=r"line too long \(max 64 bytes\)"):
            replies_for(chunks)


def test_lines_before_a_long_line_are_kept_for_answering() -> None:
    decoder = LineDecoder(4)
    with pytest.raises(LineTooLong) as info:
        decoder.feed(b"ok\nfine\n" + b"y" * 10 + b"\nnever\n")
    assert info.value.lines_before == b"ok\nfine\n"


def test_unfinished_long_line_raises_before_it_is_held_in_memory() -> None:
    decoder = LineDecoder(1000)
    decoder.feed(b"z" * 1000)
    assert decoder.pending == 1000
    with pytest.raises(LineTooLong):
        decoder.feed(b"z")


def test_limit_change_applies_from_the_next_feed() -> None:
    decoder = LineDecoder(4)
    decoder.max_line_bytes = 8
    assert decoder.feed(b"12345678\n") == b"12345678\n"


def test_error_line_names_the_limit() -> None:
    assert err_line_too_long(65536) == b"ERR line too long (max 65536 bytes)\n"


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=300), cuts=st.lists(st.integers(min_value=0, max_value=300), max_size=8))
def test_any_split_gives_the_same_replies_as_one_piece(data: bytes, cuts: list[int]) -> None:
    points = sorted({c for c in cuts if c <= len(data)})
    chunks = [data[a:b] for a, b in zip([0, *points], [*points, len(data)])]
    for telnet in (False, True):
        try:
            whole = replies_for([data], max_line=32, telnet=telnet)
        except LineTooLong:
            with pytest.raises(LineTooLong):
                replies_for(chunks, max_line=32, telnet=telnet)
            continue
        assert replies_for(chunks, max_line=32, telnet=telnet) == whole


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=500))
def test_arbitrary_bytes_raise_only_line_too_long(data: bytes) -> None:
    decoder = LineDecoder(16)
    filt = TelnetFilter()
    try:
        block = decoder.feed(filt.feed(data))
    except LineTooLong:
        return
    assert count_lines(format_replies(block, STAMP)) == count_lines(block)
    assert decoder.pending <= 17


# -- telnet -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"\xff\xfd\x18\xff\xfb\x1fhi\r\n", b"hi\r\n"),  # DO TTYPE, WILL NAWS: negotiation removed
        (b"\xff\xfa\x18\x00xterm\xff\xf0ok\n", b"ok\n"),  # a subnegotiation removed whole
        (b"\xff\xfa\x18a\xff\xffb\xff\xf0x\n", b"x\n"),  # IAC IAC inside SB stays inside it
        (b"a\xff\xffb\n", b"a\xffb\n"),  # IAC IAC is a literal 0xFF
        (b"\xff\xf1\xff\xf9x\n", b"x\n"),  # NOP, GA dropped
        (b"a\r\x00b\r\x00", b"a\r\nb\r\n"),  # CR NUL (character mode Enter) ends a line
        (b"nul\x00inside\n", b"nul\x00inside\n"),  # a NUL not after CR is payload
    ],
)
def test_telnet_commands_never_reach_the_reply(data: bytes, expected: bytes) -> None:
    for chunks in splits(data):
        filt = TelnetFilter()
        assert b"".join(filt.feed(c) for c in chunks) == expected, chunks
        assert not filt.interrupted


def test_telnet_interrupt_stops_after_what_came_before() -> None:
    filt = TelnetFilter()
    assert filt.feed(b"last\r\n\xff\xf4more\n") == b"last\r\n"
    assert filt.interrupted


# -- timestamps ---------------------------------------------------------------------------

MOMENT = 1473978552.123456  # Thu Sep 15 22:29:12 2016 UTC


@pytest.mark.parametrize(
    ("style", "expected"),
    [
        ("ctime", b"Thu Sep 15 22:29:12 2016"),
        ("iso", b"2016-09-15T22:29:12.123456+00:00"),
        ("epoch", b"1473978552.123456"),
        ("%Y-%m-%d %H:%M:%S", b"2016-09-15 22:29:12"),
        ("%H:%M:%S.%f", b"22:29:12.123456"),
        ("%%f=%f", b"%f=123456"),
    ],
)
def test_timestamp_styles_in_utc(style: str, expected: bytes) -> None:
    assert make_stamper(style, utc=True)(MOMENT) == expected


def test_ctime_style_is_time_ctime_in_local_time() -> None:
    now = time.time()
    assert make_stamper("ctime")(now) == time.ctime(now).encode()


def test_iso_style_carries_the_local_offset() -> None:
    old = os.environ.get("TZ")
    os.environ["TZ"] = "Asia/Tokyo"
    time.tzset()
    try:
        assert make_stamper("iso")(MOMENT) == b"2016-09-16T07:29:12.123456+09:00"
        assert make_stamper("ctime")(MOMENT) == b"Fri Sep 16 07:29:12 2016"
    finally:
        if old is None:
            del os.environ["TZ"]
        else:
            os.environ["TZ"] = old
        time.tzset()


def test_iso_style_parses_as_rfc3339() -> None:
    stamp = make_stamper("iso")(time.time()).decode()
    assert datetime.datetime.fromisoformat(stamp).tzinfo is not None


def test_cached_stamps_follow_the_clock_across_seconds() -> None:
    stamp = make_stamper("ctime", utc=True)
    assert stamp(MOMENT) == b"Thu Sep 15 22:29:12 2016"
    assert stamp(MOMENT + 1) == b"Thu Sep 15 22:29:13 2016"
    assert stamp(MOMENT + 0.5) == b"Thu Sep 15 22:29:12 2016"


def test_unknown_style_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown timestamp style"):
        make_stamper("rfc822")


def test_a_long_line_in_small_pieces_costs_about_what_it_costs_in_large_ones() -> None:
    """LineDecoder is O(n): an 8 MiB line in TCP-segment-sized pieces is not copied over and over."""
    line = b"x" * (8 * 1024 * 1024)

    def cpu_s(piece: int) -> float:
        decoder = LineDecoder(max_line_bytes=16 * 1024 * 1024)
        started = time.process_time()
        for offset in range(0, len(line), piece):
            assert decoder.feed(line[offset : offset + piece]) == b""
        assert decoder.feed(b"\n") == line + b"\n"
        return time.process_time() - started

    # Best of three: CPU time is this process's own, but a loaded host still adds cache misses.
    small, large = min(cpu_s(1460) for _ in range(3)), min(cpu_s(65536) for _ in range(3))
    print(f"\nFIGURES 8 MiB line: 1460-byte pieces {small * 1000:.1f} ms CPU, 64 KiB pieces {large * 1000:.1f} ms")
    # Quadratic copying made this 17.7 s against 0.07 s (250x); linear is a few times at most.
    assert small < 10 * max(large, 0.005)
