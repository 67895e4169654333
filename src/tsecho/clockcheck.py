"""Latency and clock offset from timestamped echoes, sans I/O: times in, estimates out.

Owns the maths behind ``tsecho ping`` and ``tsecho check``: reading a reply's
stamp in every style the server can be configured with (:func:`parse_stamp`),
turning one probe's send time, receive time and stamp into an interval that
must hold the server's clock offset (:func:`probe_interval`), combining probes
into one estimate with an honest bound (:func:`estimate_offset`), planning the
probes that pin a whole-second clock to a few milliseconds
(:func:`plan_boundary_round`), reading zone-less stamps as a zone plus a skew
(:func:`split_zone`), and the RTT summary (:func:`summarize_rtts`). The plugin
verdict for ``check`` (thresholds, status line, perfdata) is here too.

No sockets and no clock reads: the I/O in ``probe.py`` passes every time in,
so all of this is tested by feeding it numbers.

The offset model is NTP's: a reply stamped ``S`` by a clock of resolution
``r`` (stamps are truncated, so the server's time was in ``[S, S + r)``) was
made between the client's send time ``t0`` and receive time ``t1``; hence the
offset (server minus client) lies in ``[S - t1, S + r - t0]``: its centre is
``S + r/2 - (t0 + t1)/2`` and its half-width ``RTT/2 + r/2``. With microsecond
stamps the lowest-RTT probe gives the tightest interval. With whole-second
stamps every interval is about a second wide, but two probes a few
milliseconds apart that see the stamp's second flip intersect to a few
milliseconds: that is the *second-boundary* method.
"""

from __future__ import annotations

import datetime
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

MICROSECOND_S: Final = 1e-6
DAY_S: Final = 86400.0
QUARTER_HOUR_S: Final = 900.0
# An offset this close to a whole number of quarter hours is read as a zone
# difference plus skew. A clock more than 5 minutes off *and* near a quarter
# hour is indistinguishable from a zone; --server-utc/--server-tz settle it.
ZONE_SNAP_S: Final = 300.0
# Real zones run from UTC-12:00 to UTC+14:00.
ZONE_MIN_S: Final = -12 * 3600.0
ZONE_MAX_S: Final = 14 * 3600.0
# Stamps coarser than this are pinned by the second-boundary method.
FINE_RESOLUTION_S: Final = 1e-3

_MONTHS: Final = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
_CTIME: Final = re.compile(
    r"(?:Mon|Tue|Wed|Thu|Fri|Sat|Sun) (?P<mon>[A-Z][a-z]{2}) (?P<day>[ \d]\d) "
    r"(?P<h>\d\d):(?P<m>\d\d):(?P<s>\d\d) (?P<y>\d{4})"
)
_EPOCH: Final = re.compile(r"(?P<sec>\d{1,12})(?:\.(?P<frac>\d{1,9}))?")
_ISO: Final = re.compile(
    r"\d{4}-\d\d-\d\d[T ]\d\d:\d\d:\d\d(?:\.(?P<frac>\d{1,6}))?(?P<zone>Z|[+-]\d\d:?\d\d)?"
)
_TIME_ONLY: Final = re.compile(r"(?P<h>\d\d):(?P<m>\d\d):(?P<s>\d\d)(?:\.(?P<frac>\d{1,6}))?")
_STAMP_IN_PREFIX: Final = re.compile(rb"\[([^\]\r\n]*)\]")
# strftime directives that pin the date; a pattern without any is a time of day.
_DATE_DIRECTIVES: Final = frozenset("YyjUWGVuaAbBhdmcsxDFg")


class StampError(ValueError):
    """A stamp the client cannot read; ``str()`` says what it was and what to try."""


@dataclass(frozen=True)
class Stamp:
    """A server stamp, read.

    ``seconds`` is POSIX time when ``absolute`` (epoch, or a stamp carrying its
    zone); for a zone-less stamp it is the wall clock read *as if* UTC, so the
    zone difference shows up in the offset. ``resolution_s`` is 1e-6 for
    microsecond stamps, 1.0 for whole seconds. ``day_known`` is False for a
    time of day alone: offsets are then taken modulo a day.
    """

    text: str
    style: str  # "epoch", "iso", "ctime" or "pattern"
    seconds: float
    resolution_s: float
    absolute: bool
    day_known: bool = True


def _fraction(frac: str | None) -> tuple[float, float]:
    """The seconds a fraction adds and the resolution its digit count gives."""
    if not frac:
        return 0.0, 1.0
    return int(frac) / 10 ** len(frac), 10.0 ** -len(frac)


def _utc_seconds(moment: datetime.datetime) -> float:
    """POSIX seconds of an aware datetime; a naive one is read as UTC."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.timezone.utc)
    return moment.timestamp()


def parse_stamp(text: str, pattern: str | None = None) -> Stamp:
    """Read a stamp as the server wrote it.

    Recognised without help: ``epoch`` (``1473978552.123456``), ``iso``
    (RFC 3339, with or without fraction and zone, ``T`` or space), ``ctime``
    (``Thu Sep 15 22:29:12 2016``) and a bare time of day (``22:29:12``,
    optionally ``.ffffff``). Any other strftime pattern needs *pattern* (the
    server's ``timestamp`` setting; ``%f`` is microseconds). Raises
    :class:`StampError` with what to try.
    """
    if pattern is not None:
        return _parse_with_pattern(text, pattern)
    if match := _EPOCH.fullmatch(text):
        extra, resolution = _fraction(match["frac"])
        return Stamp(text, "epoch", int(match["sec"]) + extra, resolution, absolute=True)
    if match := _ISO.fullmatch(text):
        head = text[:19].replace(" ", "T")
        moment = datetime.datetime.fromisoformat(head)
        extra, resolution = _fraction(match["frac"])
        zone = match["zone"]
        if zone:
            zone = "+00:00" if zone == "Z" else zone
            sign = -1 if zone[0] == "-" else 1
            digits = zone[1:].replace(":", "")
            delta = datetime.timedelta(hours=int(digits[:2]), minutes=int(digits[2:]))
            moment = moment.replace(tzinfo=datetime.timezone(sign * delta))
        return Stamp(text, "iso", _utc_seconds(moment) + extra, resolution, absolute=bool(zone))
    if match := _CTIME.fullmatch(text):
        if match["mon"] not in _MONTHS:
            raise _unreadable(text)
        try:
            moment = datetime.datetime(int(match["y"]), _MONTHS.index(match["mon"]) + 1, int(match["day"]),
                                       int(match["h"]), int(match["m"]), int(match["s"]))
        except ValueError:
            raise _unreadable(text) from None
        return Stamp(text, "ctime", _utc_seconds(moment), 1.0, absolute=False)
    if match := _TIME_ONLY.fullmatch(text):
        extra, resolution = _fraction(match["frac"])
        seconds = int(match["h"]) * 3600 + int(match["m"]) * 60 + int(match["s"]) + extra
        return Stamp(text, "pattern", seconds, resolution, absolute=False, day_known=False)
    raise _unreadable(text)


def _unreadable(text: str) -> StampError:
    return StampError(
        f"cannot read the server's stamp {text!r}: it is not ctime, iso or epoch "
        f"(give the server's timestamp pattern, e.g. --stamp-format '%d.%m.%Y %H:%M:%S')"
    )


def _parse_with_pattern(text: str, pattern: str) -> Stamp:
    # strptime has no "fraction with any number of digits"; the server's %f is always 6.
    try:
        moment = datetime.datetime.strptime(text, pattern)
    except ValueError as err:
        raise StampError(
            f"stamp {text!r} does not match --stamp-format {pattern!r} ({err}); "
            f"use the server's [echo] timestamp setting"
        ) from None
    directives = set(re.findall(r"%(.)", pattern.replace("%%", "")))
    resolution = MICROSECOND_S if "f" in directives else 1.0
    day_known = bool(directives & _DATE_DIRECTIVES)
    if not day_known:
        moment = moment.replace(year=1970, month=1, day=1)
    return Stamp(text, "pattern", _utc_seconds(moment), resolution,
                 absolute=moment.tzinfo is not None, day_known=day_known)


def stamp_in_prefix(prefix: bytes) -> tuple[str, str]:
    """Split a reply's prefix into the stamp and what else it says.

    The stamp is inside the first ``[...]`` (the default prefix is
    ``[{stamp}] ``); the rest, trimmed, names the instance when the server's
    prefix template carries one. Raises :class:`StampError` if there is none.
    """
    match = _STAMP_IN_PREFIX.search(prefix)
    if match is None:
        raise StampError(f"no [stamp] in the reply's prefix {prefix.decode('utf-8', 'replace')!r}")
    rest = (prefix[: match.start()] + b" " + prefix[match.end() :]).strip(b" :-\t")
    return match[1].decode("utf-8", "replace"), rest.decode("utf-8", "replace")


@dataclass(frozen=True)
class Interval:
    """Where the offset (server minus client, seconds) must lie: ``[low_s, high_s]``."""

    low_s: float
    high_s: float

    @property
    def centre_s(self) -> float:
        return (self.low_s + self.high_s) / 2

    @property
    def bound_s(self) -> float:
        """Half the width: the ``±`` of the estimate."""
        return (self.high_s - self.low_s) / 2

    def intersect(self, other: Interval) -> Interval | None:
        low, high = max(self.low_s, other.low_s), min(self.high_s, other.high_s)
        return Interval(low, high) if low <= high else None


@dataclass(frozen=True)
class Probe:
    """One answered probe: client send and receive times (seconds, one timeline) and the stamp."""

    sent_s: float
    received_s: float
    stamp: Stamp

    @property
    def rtt_s(self) -> float:
        return self.received_s - self.sent_s


def server_seconds(stamp: Stamp, zone: datetime.tzinfo | None) -> float:
    """The stamp's seconds; a zone-less stamp is read in *zone* when one is given."""
    if stamp.absolute or zone is None:
        return stamp.seconds
    wall = datetime.datetime.fromtimestamp(stamp.seconds, datetime.timezone.utc).replace(tzinfo=None)
    if not stamp.day_known:
        return stamp.seconds - _zone_offset_s(wall, zone)
    return wall.replace(tzinfo=zone).timestamp()


def _zone_offset_s(wall: datetime.datetime, zone: datetime.tzinfo) -> float:
    offset = wall.replace(tzinfo=zone).utcoffset()
    return offset.total_seconds() if offset is not None else 0.0


def probe_interval(probe: Probe, zone: datetime.tzinfo | None = None) -> Interval:
    """The offset interval one probe proves: ``[S - t1, S + r - t0]``.

    For a time-of-day stamp the day is the one that puts the offset within
    ±12 h, so the interval is shifted by whole days.
    """
    seconds = server_seconds(probe.stamp, zone)
    low = seconds - probe.received_s
    high = seconds + probe.stamp.resolution_s - probe.sent_s
    if not probe.stamp.day_known:
        days = math.floor(((low + high) / 2 + DAY_S / 2) / DAY_S)
        low, high = low - days * DAY_S, high - days * DAY_S
    return Interval(low, high)


@dataclass(frozen=True)
class ZoneSplit:
    """A zone-less offset read as a zone difference plus the clock's own skew."""

    zone_s: float | None  # None: not near a quarter hour, so no zone was guessed
    skew_s: float


def split_zone(offset_s: float) -> ZoneSplit:
    """Read the offset of zone-less stamps as zone + skew when it is near a quarter hour.

    Near means within ``ZONE_SNAP_S`` of a whole number of quarter hours, and
    that number inside the range real zones use.
    """
    quarters = round(offset_s / QUARTER_HOUR_S) * QUARTER_HOUR_S
    if abs(offset_s - quarters) <= ZONE_SNAP_S and ZONE_MIN_S <= quarters <= ZONE_MAX_S:
        return ZoneSplit(quarters, offset_s - quarters)
    return ZoneSplit(None, offset_s)


def format_zone(zone_s: float) -> str:
    """``32400`` -> ``UTC+09:00``; ``-12600`` -> ``UTC-03:30``."""
    sign = "-" if zone_s < 0 else "+"
    minutes = round(abs(zone_s) / 60)
    return f"UTC{sign}{minutes // 60:02d}:{minutes % 60:02d}"


@dataclass(frozen=True)
class OffsetEstimate:
    """The clock offset (server minus client) with its bound and how it was found.

    ``offset_s`` is the clock's skew: for zone-less stamps, with the zone
    difference (``zone_s``) taken out. ``zone_source`` is ``"stamp"`` (the
    stamps carry their zone), ``"given"`` (--server-utc / --server-tz),
    ``"guessed"`` (near a quarter hour) or ``"unknown"`` (zone-less, not near
    one: ``offset_s`` is the whole wall-clock difference).
    """

    offset_s: float
    bound_s: float
    method: str  # "lowest-rtt", "second-boundary" or "whole-second"
    style: str
    resolution_s: float
    probes: int
    zone_s: float | None
    zone_source: str
    consistent: bool = True  # False: the probes' intervals did not overlap (a clock stepped)


def estimate_offset(probes: Sequence[Probe], zone: datetime.tzinfo | None = None,
                    zone_given: bool = False) -> OffsetEstimate | None:
    """Combine answered probes into one offset estimate; None without probes.

    Microsecond stamps: the lowest-RTT probe's interval (NTP's choice).
    Coarser stamps: the intersection of all intervals, which is tight when
    probes straddle a flip of the stamp's second ("second-boundary"); if they
    do not overlap (a clock was stepped mid-run), the lowest-RTT probe's alone.
    *zone_given* says the user named the zone of zone-less stamps (*zone*;
    None with *zone_given* means UTC).
    """
    if not probes:
        return None
    first = probes[0].stamp
    resolution = max(p.stamp.resolution_s for p in probes)
    best = min(probes, key=lambda p: p.rtt_s)
    consistent = True
    if resolution <= FINE_RESOLUTION_S:
        combined = probe_interval(best, zone)
        method = "lowest-rtt"
    else:
        common = intersect_all(probes, zone)
        if common is None:
            combined, consistent, method = probe_interval(best, zone), False, "whole-second"
        else:
            combined = common
            method = "second-boundary" if combined.high_s - combined.low_s < resolution else "whole-second"
    offset = combined.centre_s
    zone_s: float | None
    if first.absolute:
        zone_s, source = None, "stamp"
    elif zone_given:
        zone_s, source = None, "given"
    else:
        split = split_zone(offset)
        zone_s, offset = split.zone_s, split.skew_s
        source = "guessed" if zone_s is not None else "unknown"
    return OffsetEstimate(offset, combined.bound_s, method, first.style, resolution, len(probes),
                          zone_s, source, consistent)


def intersect_all(probes: Sequence[Probe], zone: datetime.tzinfo | None = None) -> Interval | None:
    """The offset interval every probe agrees on; None if two of them contradict each other."""
    common: Interval | None = None
    for probe in probes:
        interval = probe_interval(probe, zone)
        common = interval if common is None else common.intersect(interval)
        if common is None:
            return None
    return common


def plan_boundary_round(offset: Interval, now_s: float, count: int, rtt_s: float,
                        resolution_s: float = 1.0, min_spacing_s: float = 1e-3) -> list[float]:
    """Send times (client seconds) for *count* probes straddling the next flip of the stamp.

    The stamp's unit flips when the server clock crosses a multiple of
    *resolution_s*; with the offset in *offset*, the next flip at or after
    *now_s* happens in client time ``[n - high, n - low]``. The probes'
    midpoints (send + rtt/2) spread evenly over that window, one at each end,
    so the flip falls between two of them; spacing is at least
    *min_spacing_s*. The times are sorted and all >= *now_s*.
    """
    n = math.ceil((now_s + rtt_s / 2 + offset.high_s) / resolution_s) * resolution_s
    start, end = n - offset.high_s - rtt_s / 2, n - offset.low_s - rtt_s / 2
    count = max(2, min(count, int((end - start) / min_spacing_s) + 2))
    step = (end - start) / (count - 1)
    return [max(now_s, start + i * step) for i in range(count)]


@dataclass(frozen=True)
class RttSummary:
    """ping's figures, in seconds. ``mdev`` is the standard deviation, as ping(8) prints it."""

    count: int
    min_s: float
    avg_s: float
    max_s: float
    mdev_s: float
    p50_s: float
    p90_s: float
    p99_s: float


def percentile(sorted_values: Sequence[float], percent: float) -> float:
    """Nearest-rank percentile: the smallest value with at least *percent* % at or below it."""
    if not sorted_values:
        raise ValueError("percentile of no values")
    rank = max(1, math.ceil(percent / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


def summarize_rtts(rtts_s: Sequence[float]) -> RttSummary | None:
    """min/avg/max/mdev and p50/p90/p99 of round trips; None when there are none."""
    if not rtts_s:
        return None
    values = sorted(rtts_s)
    count = len(values)
    avg = math.fsum(values) / count
    mdev = math.sqrt(max(0.0, math.fsum((v - avg) ** 2 for v in values) / count))
    return RttSummary(count, values[0], avg, values[-1], mdev,
                      percentile(values, 50), percentile(values, 90), percentile(values, 99))


# -- tsecho check: thresholds and the plugin's output ----------------------------------------

OK: Final = 0
WARNING: Final = 1
CRITICAL: Final = 2
UNKNOWN: Final = 3
STATUS_NAMES: Final = ("OK", "WARNING", "CRITICAL", "UNKNOWN")
_DURATION: Final = re.compile(r"(?P<number>\d+(?:\.\d*)?|\.\d+)\s*(?P<unit>us|µs|ms|s|m|min)?")
_UNIT_S: Final = {"us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "min": 60.0, None: 1.0}


def parse_duration(text: str) -> float:
    """``50ms`` -> 0.05; ``2s`` and ``2`` -> 2.0; units us, ms, s, m. Raises ValueError."""
    match = _DURATION.fullmatch(text.strip())
    if match is None:
        raise ValueError(f"{text!r} is not a duration (a number with us, ms, s or m; bare = seconds)")
    return float(match["number"]) * _UNIT_S[match["unit"]]


@dataclass(frozen=True)
class Thresholds:
    """Levels for check, in seconds: RTT and the size of the offset (either sign)."""

    warning_rtt_s: float
    critical_rtt_s: float
    warning_offset_s: float
    critical_offset_s: float


def _level(value: float, warning: float, critical: float) -> int:
    if value > critical:
        return CRITICAL
    if value > warning:
        return WARNING
    return OK


def check_status(rtt_s: float, offset_s: float | None, limits: Thresholds) -> tuple[int, list[str]]:
    """The plugin status and the reasons for it (empty when OK).

    A value *over* its threshold alerts (``check_ntp_time`` does the same
    for the offset's size). No offset (stamps unreadable) is not an alert here.
    """
    reasons: list[str] = []
    status = OK
    rtt_level = _level(rtt_s, limits.warning_rtt_s, limits.critical_rtt_s)
    if rtt_level:
        limit = limits.critical_rtt_s if rtt_level == CRITICAL else limits.warning_rtt_s
        reasons.append(f"rtt over {limit * 1000:g} ms")
        status = max(status, rtt_level)
    if offset_s is not None:
        offset_level = _level(abs(offset_s), limits.warning_offset_s, limits.critical_offset_s)
        if offset_level:
            limit = limits.critical_offset_s if offset_level == CRITICAL else limits.warning_offset_s
            reasons.append(f"offset beyond ±{limit:g} s")
            status = max(status, offset_level)
    return status, reasons


def format_ms(seconds: float) -> str:
    """An RTT in the status line: ``0.000213`` -> ``0.21`` (milliseconds, two decimals)."""
    return f"{seconds * 1000:.2f}"


def perfdata(rtt_s: float, offset_s: float | None, limits: Thresholds) -> str:
    """``rtt=0.000210s;0.05;0.2;0 offset=0.003s;0.5;2`` (label=value[UOM];warn;crit;min)."""
    text = f"rtt={rtt_s:.6f}s;{limits.warning_rtt_s:g};{limits.critical_rtt_s:g};0"
    if offset_s is not None:
        text += f" offset={offset_s:.3f}s;{limits.warning_offset_s:g};{limits.critical_offset_s:g}"
    return text


def status_line(status: int, detail: str, perf: str | None = None) -> str:
    """``TSECHO OK - detail | perf``: the plugin's one line."""
    line = f"TSECHO {STATUS_NAMES[status]} - {detail}"
    return f"{line} | {perf}" if perf else line


_FIXED_ZONE: Final = re.compile(r"(?:UTC|GMT)?(?P<sign>[+-])(?P<h>\d{1,2})(?::?(?P<m>\d\d))?")


def parse_zone(text: str) -> datetime.tzinfo:
    """``Asia/Tokyo``, ``UTC``, ``+09:00``, ``UTC-3:30`` -> a tzinfo. Raises ValueError saying why."""
    import zoneinfo

    if text.upper() in ("UTC", "GMT", "Z"):
        return datetime.timezone.utc
    if match := _FIXED_ZONE.fullmatch(text):
        hours, minutes = int(match["h"]), int(match["m"] or 0)
        if hours > 14 or minutes > 59:
            raise ValueError(f"zone {text!r} is out of range (UTC-12:00 to UTC+14:00)")
        delta = datetime.timedelta(hours=hours, minutes=minutes)
        return datetime.timezone(-delta if match["sign"] == "-" else delta)
    try:
        return zoneinfo.ZoneInfo(text)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"unknown time zone {text!r} (an IANA name such as Europe/Berlin, or +09:00)") from None
