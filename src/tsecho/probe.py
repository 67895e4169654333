"""``tsecho ping`` and ``tsecho check``: probe tsechod, report latency and clock offset.

Owns the two commands' command lines and their I/O: :class:`Prober` sends a
probe line and times its echo, one connection for all probes (reconnecting
when it drops) or a fresh one per probe; :meth:`Prober.burst` pipelines the
probes that straddle a second flip. Everything that is arithmetic (stamps,
intervals, estimates, statistics, thresholds, the plugin's line) lives in
``clockcheck.py`` and is tested without sockets; this module only reads
clocks, moves bytes and prints.

Reached through ``tsecho ping ...`` / ``tsecho check ...`` (client.main
dispatches on the first argument). Times are read on one timeline: the wall
clock once at start, then the monotonic clock, so a wall-clock step in the
client during a run cannot fake an offset.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import secrets
import select
import socket
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final, NoReturn, TextIO

from . import clockcheck
from .clockcheck import OffsetEstimate, Probe, StampError, Thresholds
from .remote import DEFAULT_HOST, DEFAULT_PORT, Address, AddressError, ClientError, connect, parse_address

PROBE_PREFIX: Final = b"tsecho-probe"
MIN_INTERVAL_S: Final = 0.01  # ping(8) bounds -i below too; faster is a flood, not a ping
DEFAULT_INTERVAL_S: Final = 1.0
DEFAULT_WAIT_S: Final = 5.0
CHECK_TIMEOUT_S: Final = 10.0  # the monitoring-plugins default for -t
CHECK_PROBES: Final = 3
BOUNDARY_PROBES: Final = 24  # per round: each round narrows the flip window about twentyfold
BOUNDARY_ROUNDS: Final = 4
# A round is not worth it once the bound is this small or within the RTT's reach.
BOUNDARY_TARGET_S: Final = 2e-3
MAX_LINE_BYTES: Final = 4096  # a reply longer than this is not an echo of our probe
EXIT_ALL_ANSWERED: Final = 0
EXIT_SOME_LOST: Final = 1
EXIT_NONE_ANSWERED: Final = 2
DEFAULT_LIMITS: Final = Thresholds(0.05, 0.2, 0.5, 2.0)


class ProbeLost(Exception):
    """No usable reply to a probe; ``str()`` is the one-line reason."""


class ProbeTimeout(ProbeLost):
    """Nothing came back in time."""


class NotEcho(ProbeLost):
    """The server answered, but not with a stamped echo of the probe."""


@dataclass(frozen=True)
class Reply:
    """An echo of one probe line, timed on the run's timeline."""

    sent_s: float
    received_s: float
    prefix: bytes  # what the server put before our line: "[stamp] " by default

    @property
    def rtt_s(self) -> float:
        return self.received_s - self.sent_s


class Timeline:
    """Client time for a run: the wall clock read once, carried forward by the monotonic clock."""

    def __init__(self) -> None:
        self._wall0 = time.time()
        self._mono0 = time.monotonic()

    def now(self) -> float:
        return self._wall0 + (time.monotonic() - self._mono0)

    def wall(self, mono: float) -> float:
        return self._wall0 + (mono - self._mono0)


class Prober:
    """Send probe lines to one server and time their echoes.

    With *new_connection* every probe opens its own connection and its RTT
    includes the connect; otherwise one connection serves every probe and is
    reopened (untimed) when it drops or a reply is late. A late reply never
    counts for a later probe: after a timeout the connection is closed.
    """

    def __init__(self, address: Address, timeline: Timeline, new_connection: bool = False) -> None:
        self.address = address
        self._timeline = timeline
        self._new_connection = new_connection
        self._sock: socket.socket | None = None
        self._buffer = bytearray()
        self._nonce = secrets.token_hex(4).encode()

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        self._buffer.clear()

    def _connect(self, timeout_s: float) -> socket.socket:
        try:
            sock = connect(self.address, timeout_s)
        except ClientError as err:
            raise ProbeLost(str(err)) from err
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # a probe must leave now, not after an ACK
        self._sock = sock
        return sock

    def line(self, tag: str) -> bytes:
        return b"%s %s %s" % (PROBE_PREFIX, self._nonce, tag.encode())

    def probe(self, tag: str, timeout_s: float) -> Reply:
        """Send one probe and wait up to *timeout_s* for its echo. Raises :class:`ProbeLost`."""
        try:
            if self._new_connection:
                self.close()
                sent = self._timeline.now()
                sock = self._connect(timeout_s)
            else:
                sock = self._sock or self._connect(timeout_s)
                sent = self._timeline.now()
            expected = self.line(tag)
            self._send(sock, expected + b"\n")
            deadline = time.monotonic() + timeout_s
            prefix, received = self._read_echo(sock, expected, deadline, timeout_s)
            reply = Reply(sent, received, prefix)
        except ProbeLost:
            self.close()
            raise
        if self._new_connection:
            self.close()
        return reply

    def burst(self, send_times_s: Sequence[float], timeout_s: float) -> list[Reply]:
        """Send probes at the given client times without waiting for echoes; return every echo.

        Pipelining is what lets probes a millisecond apart straddle a flip
        whatever the RTT. Raises :class:`ProbeLost` if any echo is missing.
        """
        try:
            sock = self._sock or self._connect(timeout_s)
            tags = [f"b{i}" for i in range(len(send_times_s))]
            sent: list[float] = []
            replies: list[Reply] = []
            for tag, at in zip(tags, send_times_s):
                self._wait_until(sock, at, tags, sent, replies)
                sent.append(self._timeline.now())
                self._send(sock, self.line(tag) + b"\n")
            deadline = time.monotonic() + timeout_s
            while len(replies) < len(sent):
                expected = self.line(tags[len(replies)])
                prefix, received = self._read_echo(sock, expected, deadline, timeout_s)
                replies.append(Reply(sent[len(replies)], received, prefix))
        except ProbeLost:
            self.close()
            raise
        if self._new_connection:
            self.close()
        return replies

    def _wait_until(self, sock: socket.socket, at_s: float, tags: list[str], sent: list[float],
                    replies: list[Reply]) -> None:
        """Until client time *at_s*, collect echoes of burst probes already sent."""
        while (left_s := at_s - self._timeline.now()) > 0:
            if len(replies) < len(sent) and self._has_line_or_data(sock, left_s):
                expected = self.line(tags[len(replies)])
                prefix, received = self._read_echo(sock, expected, time.monotonic() + left_s + 5.0, 5.0)
                replies.append(Reply(sent[len(replies)], received, prefix))
            elif len(replies) >= len(sent):
                time.sleep(left_s)

    def _has_line_or_data(self, sock: socket.socket, wait_s: float) -> bool:
        if b"\n" in self._buffer:
            return True
        poller = select.poll()
        poller.register(sock, select.POLLIN)
        return bool(poller.poll(max(0, math.ceil(wait_s * 1000))))

    def _send(self, sock: socket.socket, data: bytes) -> None:
        try:
            sock.sendall(data)
        except OSError as err:
            raise ProbeLost(f"connection to {self.address} lost: {_describe(err)}") from err

    def _read_echo(self, sock: socket.socket, expected: bytes, deadline: float, timeout_s: float) -> tuple[bytes, float]:
        """Read one reply line; return (prefix, client time it arrived). It must end with *expected*."""
        received = self._timeline.now()
        while (end := self._buffer.find(b"\n")) == -1:
            if len(self._buffer) > MAX_LINE_BYTES:
                raise NotEcho(f"reply from {self.address} is not an echo of the probe: "
                              f"{_shown(bytes(self._buffer[:60]))}...")
            left_s = deadline - time.monotonic()
            if left_s <= 0:
                raise ProbeTimeout(f"no reply from {self.address} within {timeout_s:g} s")
            sock.settimeout(left_s)
            try:
                data = sock.recv(65536)
            except TimeoutError:
                raise ProbeTimeout(f"no reply from {self.address} within {timeout_s:g} s") from None
            except OSError as err:
                raise ProbeLost(f"connection to {self.address} lost: {_describe(err)}") from err
            received = self._timeline.now()
            if not data:
                if self._buffer:
                    raise NotEcho(f"connection closed by {self.address} after {_shown(bytes(self._buffer))}")
                raise ProbeLost(f"connection closed by {self.address}")
            self._buffer += data
        line = bytes(self._buffer[:end]).rstrip(b"\r")
        del self._buffer[: end + 1]
        if line.startswith(b"ERR "):
            raise NotEcho(f"{self.address} said {_shown(line)}")
        if not line.endswith(expected):
            raise NotEcho(f"reply from {self.address} is not a stamped echo of the probe: {_shown(line)}")
        return line[: -len(expected)], received


def _describe(err: OSError) -> str:
    text = err.strerror or str(err) or type(err).__name__
    return text[:1].lower() + text[1:]


def _shown(data: bytes) -> str:
    return repr(data.decode("utf-8", "backslashreplace"))


@dataclass(frozen=True)
class Reading:
    """A reply made sense of: the probe for the maths, and who answered (from the prefix)."""

    probe: Probe
    label: str


def read_reply(reply: Reply, pattern: str | None) -> Reading:
    """Parse the stamp in a reply's prefix. Raises :class:`StampError`."""
    stamp_text, label = clockcheck.stamp_in_prefix(reply.prefix)
    stamp = clockcheck.parse_stamp(stamp_text, pattern)
    return Reading(Probe(reply.sent_s, reply.received_s, stamp), label)


def pin_whole_seconds(prober: Prober, probes: list[Probe], timeline: Timeline, zone: datetime.tzinfo | None,
                      pattern: str | None, deadline_s: float, wait_s: float) -> int:
    """Run second-boundary rounds until the offset is pinned, time runs out or rounds do; add their probes.

    Returns how many rounds ran. Stops early (quietly) when the next round
    would end after *deadline_s* (client time). Raises :class:`ProbeLost`.
    """
    rounds = 0
    while rounds < BOUNDARY_ROUNDS and probes:
        common = clockcheck.intersect_all(probes, zone)
        if common is None:
            return rounds  # a clock stepped under us: the estimate says so
        best_rtt = min(p.rtt_s for p in probes)
        if common.bound_s <= max(BOUNDARY_TARGET_S, best_rtt):
            break
        resolution = max(p.stamp.resolution_s for p in probes)
        times = clockcheck.plan_boundary_round(common, timeline.now(), BOUNDARY_PROBES, best_rtt, resolution)
        if times[-1] + best_rtt + 0.05 > deadline_s:
            break
        for reply in prober.burst(times, wait_s):
            probes.append(read_reply(reply, pattern).probe)
        rounds += 1
    return rounds


# -- output ------------------------------------------------------------------------------------

def format_offset(value_s: float, bound_s: float) -> str:
    """``+2.500118 s ± 0.000051 s``: microseconds when the bound is under 10 ms, else milliseconds."""
    digits = 6 if bound_s < 1e-2 else 3
    return f"{value_s:+.{digits}f} s ± {bound_s:.{digits}f} s"


def _resolution(seconds: float) -> str:
    if seconds >= 1:
        return f"{seconds:g} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:g} ms"
    return f"{seconds * 1e6:g} µs"


def describe_estimate(estimate: OffsetEstimate, zone_name: str | None) -> str:
    """The summary's offset line, saying which method, resolution and zone reading were used."""
    method = {
        "lowest-rtt": "from the lowest-RTT probe",
        "second-boundary": f"second-boundary method, {estimate.probes} probes",
        "whole-second": f"whole-second stamps, no second flip caught in {estimate.probes} probes",
    }[estimate.method]
    how = f"({method}; {estimate.style} stamps, resolution {_resolution(estimate.resolution_s)})"
    offset = format_offset(estimate.offset_s, estimate.bound_s)
    if not estimate.consistent:
        how += " (probes disagree: a clock was stepped during the run)"
    if estimate.zone_source == "guessed" and estimate.zone_s is not None:
        return f"server stamps are {clockcheck.format_zone(estimate.zone_s)}; clock offset {offset} {how}"
    if estimate.zone_source == "given":
        return f"server stamps read as {zone_name}; clock offset {offset} {how}"
    if estimate.zone_source == "unknown":
        return (f"wall-clock offset {offset} {how}; the stamps carry no zone and this is not near a whole "
                f"zone: say it with --server-tz or --server-utc")
    return f"clock offset {offset} {how}"


def estimate_json(estimate: OffsetEstimate | None) -> dict[str, object] | None:
    if estimate is None:
        return None
    return {
        "offset_s": estimate.offset_s, "bound_s": estimate.bound_s, "method": estimate.method,
        "style": estimate.style, "resolution_s": estimate.resolution_s, "probes": estimate.probes,
        "zone_s": estimate.zone_s, "zone_source": estimate.zone_source, "consistent": estimate.consistent,
    }


# -- command lines -----------------------------------------------------------------------------

def _positive(minimum: float, what: str) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not (math.isfinite(value) and value >= minimum and value > 0):
            raise argparse.ArgumentTypeError(f"{what} must be a number of seconds >= {minimum:g}, not {text!r}")
        return value
    return parse


def _count(text: str) -> int:
    if not (text.isascii() and text.isdigit()) or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, not {text!r}")
    return int(text)


def _address(text: str) -> Address:
    try:
        return parse_address(text)
    except AddressError as err:
        raise argparse.ArgumentTypeError(str(err)) from err


def _zone(text: str) -> datetime.tzinfo:
    try:
        return clockcheck.parse_zone(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from err


def _add_stamp_options(parser: argparse.ArgumentParser) -> None:
    zone = parser.add_mutually_exclusive_group()
    zone.add_argument("--server-utc", action="store_true",
                      help="zone-less stamps (ctime, most strftime patterns) are UTC")
    zone.add_argument("--server-tz", metavar="ZONE", type=_zone,
                      help="zone-less stamps are in ZONE (Europe/Berlin, +09:00)")
    parser.add_argument("--stamp-format", metavar="PATTERN",
                        help="the server's strftime pattern, when it is not ctime, iso or epoch")


def build_ping_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tsecho ping",
        description="Probe tsechod like ping(8): round-trip time and the server's clock offset, "
                    "estimated from its timestamps the way NTP does.",
        epilog="exit status: 0 every probe answered, 1 some lost, 2 none answered (or bad usage). See tsecho(1).",
    )
    parser.add_argument("address", metavar="HOST[:PORT]", nargs="?", type=_address,
                        default=Address(DEFAULT_HOST, DEFAULT_PORT),
                        help=f"server (default {DEFAULT_HOST}:{DEFAULT_PORT})")
    parser.add_argument("-c", dest="count", metavar="COUNT", type=_count,
                        help="stop after COUNT probes (default: until Ctrl-C)")
    parser.add_argument("-i", dest="interval", metavar="INTERVAL", default=DEFAULT_INTERVAL_S,
                        type=_positive(MIN_INTERVAL_S, "-i"),
                        help=f"seconds between probes (default {DEFAULT_INTERVAL_S:g}, at least {MIN_INTERVAL_S:g})")
    parser.add_argument("-W", dest="wait", metavar="TIMEOUT", default=DEFAULT_WAIT_S,
                        type=_positive(0.001, "-W"), help=f"seconds to wait for each reply (default {DEFAULT_WAIT_S:g})")
    parser.add_argument("-q", dest="quiet", action="store_true", help="print the summary only")
    parser.add_argument("--new-connection", action="store_true",
                        help="a new TCP connection per probe; the RTT then includes the connect")
    parser.add_argument("--json", action="store_true", help="one JSON object per probe and one for the summary")
    _add_stamp_options(parser)
    return parser


class _Ping:
    """One ``tsecho ping`` run: probes, per-probe lines, the summary."""

    def __init__(self, args: argparse.Namespace, out: TextIO, err: TextIO) -> None:
        self.args = args
        self.address: Address = args.address
        self.out, self.err = out, err
        self.timeline = Timeline()
        self.prober = Prober(self.address, self.timeline, args.new_connection)
        self.zone: datetime.tzinfo | None = datetime.timezone.utc if args.server_utc else args.server_tz
        self.zone_name = "UTC" if args.server_utc else (str(args.server_tz) if args.server_tz else None)
        self.sent = 0
        self.rtts: list[float] = []
        self.probes: list[Probe] = []
        self.stamp_problem: str | None = None
        self.boundary_tried = False
        self.started = time.monotonic()

    def emit(self, text: str, data: dict[str, object], always: bool = False) -> None:
        if self.args.quiet and not always:
            return
        print(json.dumps(data) if self.args.json else text, file=self.out, flush=True)

    def run(self) -> int:
        args = self.args
        how = "a new connection per probe" if args.new_connection else "one connection"
        if not args.json and not args.quiet:
            print(f"TSECHO PING {self.address}: {how}, every {args.interval:g} s", file=self.out, flush=True)
        try:
            seq = 0
            next_at = self.started
            while args.count is None or seq < args.count:
                seq += 1
                self.wait_for(next_at)
                next_at += args.interval
                if self.probe_once(seq):
                    next_at = time.monotonic() + args.interval  # the boundary rounds took their time
        except KeyboardInterrupt:
            pass  # ping(8): Ctrl-C ends the run; the summary's verdict is the exit status
        finally:
            self.prober.close()
        return self.summary()

    def wait_for(self, at_mono: float) -> None:
        left = at_mono - time.monotonic()
        if left > 0:
            time.sleep(left)

    def probe_once(self, seq: int) -> bool:
        """Send probe *seq* and print its line; True if second-boundary rounds ran after it."""
        self.sent += 1
        try:
            reply = self.prober.probe(str(seq), self.args.wait)
        except ProbeLost as lost:
            self.emit(f"seq={seq}: {lost}", {"type": "probe", "seq": seq, "lost": True, "reason": str(lost)})
            return False
        self.rtts.append(reply.rtt_s)
        try:
            reading = read_reply(reply, self.args.stamp_format)
        except StampError as problem:
            if self.stamp_problem is None:
                self.stamp_problem = str(problem)
                print(f"tsecho: {problem}", file=self.err, flush=True)
            self.emit(f"reply from {self.address}: seq={seq} rtt={reply.rtt_s * 1e3:.3f} ms",
                      {"type": "probe", "seq": seq, "rtt_s": reply.rtt_s})
            return False
        self.probes.append(reading.probe)
        interval = clockcheck.probe_interval(reading.probe, self.zone)
        source = f"{self.address} ({reading.label})" if reading.label else str(self.address)
        self.emit(
            f"reply from {source}: seq={seq} rtt={reply.rtt_s * 1e3:.3f} ms stamp=[{reading.probe.stamp.text}] "
            f"offset={format_offset(interval.centre_s, interval.bound_s)}",
            {"type": "probe", "seq": seq, "rtt_s": reply.rtt_s, "stamp": reading.probe.stamp.text,
             "offset_s": interval.centre_s, "bound_s": interval.bound_s, "instance": reading.label or None},
        )
        if not self.boundary_tried and reading.probe.stamp.resolution_s > clockcheck.FINE_RESOLUTION_S:
            self.boundary_tried = True
            self.pin()
            return True
        return False

    def pin(self) -> None:
        before = len(self.probes)
        try:
            rounds = pin_whole_seconds(self.prober, self.probes, self.timeline, self.zone, self.args.stamp_format,
                                       self.timeline.now() + 3 * BOUNDARY_ROUNDS, self.args.wait)
        except (ProbeLost, StampError) as problem:
            self.emit(f"second boundary: gave up: {problem}", {"type": "boundary", "error": str(problem)})
            return
        common = clockcheck.intersect_all(self.probes, self.zone)
        if common is not None:
            self.emit(
                f"second boundary: {len(self.probes) - before} probes in {rounds} rounds pin the offset to "
                f"{format_offset(common.centre_s, common.bound_s)}",
                {"type": "boundary", "rounds": rounds, "probes": len(self.probes) - before,
                 "offset_s": common.centre_s, "bound_s": common.bound_s},
            )

    def summary(self) -> int:
        received = len(self.rtts)
        lost = self.sent - received
        loss_percent = 100 * lost / self.sent if self.sent else 0.0
        elapsed_ms = (time.monotonic() - self.started) * 1e3
        stats = clockcheck.summarize_rtts(self.rtts)
        estimate = clockcheck.estimate_offset(self.probes, self.zone, zone_given=self.zone is not None)
        if self.args.json:
            self.emit("", {
                "type": "summary", "address": str(self.address), "sent": self.sent, "received": received,
                "lost": lost, "rtt_s": None if stats is None else {
                    "min": stats.min_s, "avg": stats.avg_s, "max": stats.max_s, "mdev": stats.mdev_s,
                    "p50": stats.p50_s, "p90": stats.p90_s, "p99": stats.p99_s},
                "offset": estimate_json(estimate), "stamp_error": self.stamp_problem,
            }, always=True)
        else:
            lines = [
                f"--- {self.address} tsecho ping statistics ---",
                f"{self.sent} probes sent, {received} received, {loss_percent:.0f}% lost, time {elapsed_ms:.0f} ms",
            ]
            if stats is not None:
                ms = [f"{v * 1e3:.3f}" for v in (stats.min_s, stats.avg_s, stats.max_s, stats.mdev_s,
                                                  stats.p50_s, stats.p90_s, stats.p99_s)]
                lines.append(f"rtt min/avg/max/mdev = {'/'.join(ms[:4])} ms, p50/p90/p99 = {'/'.join(ms[4:])} ms")
            if estimate is not None:
                lines.append(describe_estimate(estimate, self.zone_name))
            elif self.stamp_problem is not None:
                lines.append(f"clock offset unknown: {self.stamp_problem}")
            print("\n".join(lines), file=self.out, flush=True)
        if received == 0:
            return EXIT_NONE_ANSWERED
        return EXIT_SOME_LOST if lost else EXIT_ALL_ANSWERED


def ping_main(argv: list[str]) -> int:
    """``tsecho ping``: exit 0 every probe answered, 1 some lost, 2 none (or bad usage).

    Whoever reads the output may stop (``tsecho ping | head -3``): then exit 1, quietly.
    """
    args = build_ping_parser().parse_args(argv)
    try:
        return _Ping(args, sys.stdout, sys.stderr).run()
    except BrokenPipeError:
        # Keep the interpreter's final flush from complaining about the dead pipe.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return EXIT_SOME_LOST


# -- tsecho check ------------------------------------------------------------------------------

class _PluginParser(argparse.ArgumentParser):
    """Usage errors are UNKNOWN (exit 3) with one status line, as plugins do."""

    def error(self, message: str) -> NoReturn:
        print(clockcheck.status_line(clockcheck.UNKNOWN, f"{message} (see tsecho check --help)"))
        sys.exit(clockcheck.UNKNOWN)


def _duration(text: str) -> float:
    try:
        return clockcheck.parse_duration(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from err


def build_check_parser() -> argparse.ArgumentParser:
    limits = DEFAULT_LIMITS
    parser = _PluginParser(
        prog="tsecho check",
        description="A monitoring plugin (Nagios, Icinga, Naemon, Sensu): probe tsechod, print one status "
                    "line with perfdata, exit 0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN.",
        epilog="durations take a unit: 250us, 50ms, 0.5s, 2m (bare numbers are seconds). See tsecho(1).",
    )
    parser.add_argument("address", metavar="HOST[:PORT]", nargs="?", type=_address,
                        help=f"server (default {DEFAULT_HOST}:{DEFAULT_PORT})")
    parser.add_argument("-H", "--hostname", metavar="HOST", help="server host (instead of HOST[:PORT])")
    parser.add_argument("-p", "--port", metavar="PORT", type=int, help=f"server port (default {DEFAULT_PORT})")
    parser.add_argument("-t", "--timeout", metavar="S", type=_positive(0.001, "--timeout"), default=CHECK_TIMEOUT_S,
                        help=f"give up after S seconds in all (default {CHECK_TIMEOUT_S:g})")
    parser.add_argument("--warning-rtt", metavar="DURATION", type=_duration, default=limits.warning_rtt_s,
                        help=f"WARNING when the RTT is over this (default {limits.warning_rtt_s * 1e3:g}ms)")
    parser.add_argument("--critical-rtt", metavar="DURATION", type=_duration, default=limits.critical_rtt_s,
                        help=f"CRITICAL when the RTT is over this (default {limits.critical_rtt_s * 1e3:g}ms)")
    parser.add_argument("--warning-offset", metavar="DURATION", type=_duration, default=limits.warning_offset_s,
                        help=f"WARNING when the clock offset is beyond ± this (default {limits.warning_offset_s:g}s)")
    parser.add_argument("--critical-offset", metavar="DURATION", type=_duration, default=limits.critical_offset_s,
                        help=f"CRITICAL when the clock offset is beyond ± this (default {limits.critical_offset_s:g}s)")
    _add_stamp_options(parser)
    return parser


def _check_address(args: argparse.Namespace) -> Address:
    address: Address = args.address or Address(DEFAULT_HOST, DEFAULT_PORT)
    if args.hostname is not None:
        address = Address(args.hostname, address.port)
    if args.port is not None:
        if not 1 <= args.port <= 65535:
            raise ValueError(f"bad port {args.port}: must be a number 1-65535")
        address = Address(address.host, args.port)
    return address


def check(args: argparse.Namespace) -> tuple[int, str]:
    """Run the check; return (status, the plugin's line)."""
    try:
        address = _check_address(args)
    except ValueError as err:
        return clockcheck.UNKNOWN, clockcheck.status_line(clockcheck.UNKNOWN, str(err))
    limits = Thresholds(args.warning_rtt, args.critical_rtt, args.warning_offset, args.critical_offset)
    zone: datetime.tzinfo | None = datetime.timezone.utc if args.server_utc else args.server_tz
    timeline = Timeline()
    deadline = timeline.now() + args.timeout
    prober = Prober(address, timeline)
    replies: list[Reply] = []
    probes: list[Probe] = []
    try:
        for seq in range(1, CHECK_PROBES + 1):
            replies.append(prober.probe(str(seq), max(0.001, deadline - timeline.now())))
        probes = [read_reply(reply, args.stamp_format).probe for reply in replies]
    except ProbeTimeout:
        prober.close()  # the probes share the -t budget: name the budget, not what was left of it
        return clockcheck.CRITICAL, clockcheck.status_line(
            clockcheck.CRITICAL, f"no reply from {address} within {args.timeout:g} s")
    except ProbeLost as lost:
        prober.close()
        return clockcheck.CRITICAL, clockcheck.status_line(clockcheck.CRITICAL, str(lost))
    except StampError as problem:
        prober.close()
        rtt = min(reply.rtt_s for reply in replies)
        return clockcheck.UNKNOWN, clockcheck.status_line(
            clockcheck.UNKNOWN, f"{address} rtt {clockcheck.format_ms(rtt)} ms, {problem}",
            clockcheck.perfdata(rtt, None, limits))
    try:
        if probes[0].stamp.resolution_s > clockcheck.FINE_RESOLUTION_S:
            pin_whole_seconds(prober, probes, timeline, zone, args.stamp_format, deadline,
                              max(0.001, deadline - timeline.now()))
    except (ProbeLost, StampError):
        pass  # the server answered the check's probes; a failed refinement only leaves the bound wider
    finally:
        prober.close()
    rtt = min(reply.rtt_s for reply in replies)
    estimate = clockcheck.estimate_offset(probes, zone, zone_given=zone is not None)
    offset = estimate.offset_s if estimate is not None else None
    status, reasons = clockcheck.check_status(rtt, offset, limits)
    detail = f"{address} rtt {clockcheck.format_ms(rtt)} ms"
    if estimate is not None:
        detail += f", offset {estimate.offset_s:+.3f} s"
        if estimate.zone_source == "guessed" and estimate.zone_s:
            detail += f", stamps {clockcheck.format_zone(estimate.zone_s)}"
    if reasons:
        detail += f" ({', '.join(reasons)})"
    return status, clockcheck.status_line(status, detail, clockcheck.perfdata(rtt, offset, limits))


def check_main(argv: list[str]) -> int:
    """``tsecho check``: print the plugin's line, return 0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN."""
    args = build_check_parser().parse_args(argv)
    try:
        status, line = check(args)
    except KeyboardInterrupt:
        status, line = clockcheck.UNKNOWN, clockcheck.status_line(clockcheck.UNKNOWN, "interrupted")
    print(line, flush=True)
    return status


COMMANDS: Final = {"ping": ping_main, "check": check_main}
