"""clockcheck, the maths of tsecho ping/check, without sockets: stamps, intervals, estimates, statistics, verdicts.

Table-driven for the rules; hypothesis against the one oracle there is here, the
true offset of a simulated server (and statistics.pstdev for mdev).
"""

from __future__ import annotations

import datetime
import math
import re
import statistics

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tsecho import clockcheck
from tsecho.clockcheck import (
    Interval,
    Probe,
    Stamp,
    StampError,
    Thresholds,
    estimate_offset,
    intersect_all,
    parse_stamp,
    plan_boundary_round,
    probe_interval,
)
from tsecho.protocol import make_stamper

T = 1473978552.123456  # Thu Sep 15 22:29:12 2016 UTC


# -- reading stamps ----------------------------------------------------------------------------

@pytest.mark.parametrize(("text", "style", "seconds", "resolution", "absolute"), [
    ("1473978552.123456", "epoch", T, 1e-6, True),
    ("1473978552", "epoch", 1473978552, 1.0, True),
    ("2016-09-15T22:29:12.123456+00:00", "iso", T, 1e-6, True),
    ("2016-09-16T07:29:12.123456+09:00", "iso", T, 1e-6, True),
    ("2016-09-15T18:59:12.123456-03:30", "iso", T, 1e-6, True),
    ("2016-09-15T22:29:12Z", "iso", 1473978552, 1.0, True),
    ("2016-09-15 22:29:12", "iso", 1473978552, 1.0, False),
    ("Thu Sep 15 22:29:12 2016", "ctime", 1473978552, 1.0, False),
    ("Sat Oct  1 02:03:04 2016", "ctime", 1475287384, 1.0, False),
])
def test_every_server_style_is_read(text: str, style: str, seconds: float, resolution: float,
                                    absolute: bool) -> None:
    stamp = parse_stamp(text)
    assert (stamp.style, stamp.resolution_s, stamp.absolute) == (style, resolution, absolute)
    assert stamp.seconds == pytest.approx(seconds, abs=1e-6)


@pytest.mark.parametrize("style", ["ctime", "iso", "epoch", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%d %H:%M:%S.%f"])
def test_what_the_server_stamps_reads_back_as_the_same_moment(style: str) -> None:
    # The oracle is the server's own stamper (UTC, so zone-less styles read back exactly).
    stamp = parse_stamp(make_stamper(style, utc=True)(T).decode())
    assert stamp.seconds <= T < stamp.seconds + stamp.resolution_s


def test_a_time_of_day_stamp_is_read_modulo_a_day() -> None:
    stamp = parse_stamp("22:29:12.5")
    assert (stamp.day_known, stamp.resolution_s) == (False, 0.1)
    # Client just after midnight UTC, server 90 minutes behind: -90 min, not +22.5 h.
    probe = Probe(1473984000.0 + 1800, 1473984000.0 + 1800, parse_stamp("23:00:00"))
    assert probe_interval(probe).centre_s == pytest.approx(-5400, abs=1)


def test_a_pattern_the_client_cannot_guess_gives_a_clear_message() -> None:
    with pytest.raises(StampError, match=re.escape(
            "cannot read the server's stamp '15.09.2016 22:29:12': it is not ctime, iso or epoch "
            "(give the server's timestamp pattern, e.g. --stamp-format")):
        parse_stamp("15.09.2016 22:29:12")


def test_a_given_pattern_reads_the_stamp_and_a_mismatch_says_so() -> None:
    stamp = parse_stamp("15.09.2016 22:29:12.123456", "%d.%m.%Y %H:%M:%S.%f")
    assert stamp.seconds == pytest.approx(T) and stamp.resolution_s == 1e-6 and not stamp.absolute
    with pytest.raises(StampError, match=r"does not match --stamp-format '%Y'"):
        parse_stamp("15.09.2016", "%Y")


@pytest.mark.parametrize(("prefix", "stamp", "label"), [
    (b"[Thu Sep 15 22:29:12 2016] ", "Thu Sep 15 22:29:12 2016", ""),
    (b"[1473978552.123456] web-2 w0: ", "1473978552.123456", "web-2 w0"),
    (b"db1 [x] ", "x", "db1"),
])
def test_the_stamp_is_the_first_bracketed_part_of_the_prefix(prefix: bytes, stamp: str, label: str) -> None:
    assert clockcheck.stamp_in_prefix(prefix) == (stamp, label)


def test_a_prefix_without_brackets_has_no_stamp() -> None:
    with pytest.raises(StampError, match="no \\[stamp\\]"):
        clockcheck.stamp_in_prefix(b"hello ")


# -- one probe: the NTP interval -------------------------------------------------------------

def _stamp(seconds: float, resolution: float) -> Stamp:
    truncated = math.floor(seconds / resolution) * resolution
    return Stamp("", "epoch" if resolution < 1 else "ctime", truncated, resolution, absolute=True)


@pytest.mark.parametrize(("sent", "received", "stamp_s", "resolution", "centre", "bound"), [
    (100.0, 100.002, 102.501, 1e-6, 2.5000005, 0.0010005),  # offset = stamp - midpoint, ± RTT/2 (+ r/2)
    (100.0, 100.0, 100.0, 1.0, 0.5, 0.5),  # a whole-second stamp: anywhere in the second
])
def test_a_probe_bounds_the_offset_like_ntp(sent: float, received: float, stamp_s: float, resolution: float,
                                            centre: float, bound: float) -> None:
    interval = probe_interval(Probe(sent, received, Stamp("", "x", stamp_s, resolution, True)))
    assert interval.centre_s == pytest.approx(centre) and interval.bound_s == pytest.approx(bound)


@settings(max_examples=300, deadline=None)
@given(offset=st.floats(-4000, 4000), sent=st.floats(1.6e9, 1.9e9), rtt=st.floats(0, 0.5),
       when=st.floats(0, 1), resolution=st.sampled_from([1e-6, 1.0]))
def test_the_interval_always_holds_the_true_offset(offset: float, sent: float, rtt: float, when: float,
                                                  resolution: float) -> None:
    server_time = sent + rtt * when + offset
    interval = probe_interval(Probe(sent, sent + rtt, _stamp(server_time, resolution)))
    assert interval.low_s - 1e-6 <= offset <= interval.high_s + 1e-6


# -- many probes: lowest RTT, and the second boundary ---------------------------------------------

def test_microsecond_stamps_use_the_lowest_rtt_probe() -> None:
    probes = [Probe(0.0, 0.010, _stamp(2.507, 1e-6)), Probe(1.0, 1.0002, _stamp(3.5001, 1e-6)),
              Probe(2.0, 2.030, _stamp(4.52, 1e-6))]
    estimate = estimate_offset(probes)
    assert estimate is not None and estimate.method == "lowest-rtt"
    assert estimate.offset_s == pytest.approx(2.5, abs=1e-5) and estimate.bound_s == pytest.approx(1e-4, abs=2e-6)


def _simulate(offset: float, rtt: float, start: float, rounds: int) -> list[Probe]:
    """A whole-second server with a true *offset*, probed as ping does; server answers mid-flight."""
    def probe_at(sent: float) -> Probe:
        return Probe(sent, sent + rtt, _stamp(sent + rtt / 2 + offset, 1.0))

    probes = [probe_at(start)]
    now = start + rtt
    for _ in range(rounds):
        common = intersect_all(probes)
        assert common is not None
        if common.bound_s <= max(2e-3, rtt):
            break
        times = plan_boundary_round(common, now, 24, rtt)
        assert times == sorted(times) and times[0] >= now
        probes += [probe_at(t) for t in times]
        now = times[-1] + rtt
    return probes


@settings(max_examples=200, deadline=None)
@given(offset=st.floats(-4000, 4000), rtt=st.floats(1e-5, 0.05), start=st.floats(1.6e9, 1.9e9))
def test_second_boundary_rounds_pin_a_whole_second_clock(offset: float, rtt: float, start: float) -> None:
    estimate = estimate_offset(_simulate(offset, rtt, start, rounds=4), zone_given=True)
    assert estimate is not None and estimate.consistent
    assert abs(estimate.offset_s - offset) <= estimate.bound_s + 1e-6
    assert estimate.bound_s <= max(2e-3, rtt) + 1e-6
    assert estimate.method == "second-boundary"


def test_without_a_flip_a_whole_second_estimate_says_so() -> None:
    estimate = estimate_offset([Probe(10.2, 10.2001, _stamp(12.7, 1.0))], zone_given=True)
    assert estimate is not None and estimate.method == "whole-second" and estimate.bound_s > 0.5


def test_probes_that_contradict_each_other_are_flagged() -> None:
    stepped = [Probe(10.0, 10.001, _stamp(12.5, 1.0)), Probe(11.0, 11.001, _stamp(20.5, 1.0))]
    estimate = estimate_offset(stepped, zone_given=True)
    assert estimate is not None and not estimate.consistent


# -- zones ------------------------------------------------------------------------------------

@pytest.mark.parametrize(("offset", "zone", "skew"), [
    (32400.004, 32400, 0.004),
    (-90.0, 0, -90.0),
    (3600.004, 3600, 0.004),
    (20700 - 90, 20700, -90),  # Nepal, UTC+05:45, with a clock 90 s slow
    (-12600.5, -12600, -0.5),
    (1300.0, None, 1300.0),  # not within 5 min of a quarter hour: no zone guessed
    (20 * 3600.0, None, 20 * 3600.0),  # no such zone
])
def test_zone_less_offsets_are_split_into_zone_and_skew(offset: float, zone: float | None, skew: float) -> None:
    split = clockcheck.split_zone(offset)
    assert split.zone_s == zone and split.skew_s == pytest.approx(skew)


@pytest.mark.parametrize(("zone", "text"), [(32400, "UTC+09:00"), (-12600, "UTC-03:30"), (0, "UTC+00:00")])
def test_zones_are_shown_as_utc_offsets(zone: float, text: str) -> None:
    assert clockcheck.format_zone(zone) == text


def test_a_given_zone_reads_ctime_stamps_in_that_zone() -> None:
    tokyo = clockcheck.parse_zone("Asia/Tokyo")
    stamp = parse_stamp("Fri Sep 16 07:29:12 2016")
    probe = Probe(1473978552.0, 1473978552.0, stamp)
    assert probe_interval(probe, tokyo).centre_s == pytest.approx(0.5)
    estimate = estimate_offset([probe], tokyo, zone_given=True)
    assert estimate is not None and estimate.zone_source == "given"


@pytest.mark.parametrize(("text", "offset"), [("UTC", 0), ("+09:00", 32400), ("-0330", -12600), ("UTC+5", 18000)])
def test_fixed_zones_are_parsed(text: str, offset: int) -> None:
    zone = clockcheck.parse_zone(text)
    assert zone.utcoffset(datetime.datetime(2016, 9, 15)) == datetime.timedelta(seconds=offset)


def test_an_unknown_zone_is_refused_with_an_example() -> None:
    with pytest.raises(ValueError, match="unknown time zone 'Mars/Olympus'"):
        clockcheck.parse_zone("Mars/Olympus")


# -- statistics -------------------------------------------------------------------------------

def test_rtt_summary_figures() -> None:
    summary = clockcheck.summarize_rtts([0.004, 0.001, 0.003, 0.002])
    assert summary is not None
    assert (summary.min_s, summary.max_s, summary.p50_s, summary.p90_s, summary.p99_s) == (
        0.001, 0.004, 0.002, 0.004, 0.004)
    assert summary.avg_s == pytest.approx(0.0025) and summary.mdev_s == pytest.approx(0.00111803, rel=1e-5)
    assert clockcheck.summarize_rtts([]) is None


@given(st.lists(st.floats(0, 10), min_size=1, max_size=200), st.floats(1, 100))
def test_percentiles_and_mdev_agree_with_their_definitions(values: list[float], percent: float) -> None:
    summary = clockcheck.summarize_rtts(values)
    assert summary is not None
    assert summary.mdev_s == pytest.approx(statistics.pstdev(values), abs=1e-9)
    value = clockcheck.percentile(sorted(values), percent)
    assert sum(v <= value for v in values) >= percent / 100 * len(values)
    assert sum(v < value for v in values) < percent / 100 * len(values)


# -- check's verdict --------------------------------------------------------------------------

@pytest.mark.parametrize(("text", "seconds"), [
    ("50ms", 0.05), ("0.5s", 0.5), ("2", 2.0), ("250us", 0.00025), ("1m", 60.0), (".5", 0.5), ("1.5 ms", 0.0015),
])
def test_durations_take_units(text: str, seconds: float) -> None:
    assert clockcheck.parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "fast", "-1s", "5 parsecs", "1e3"])
def test_bad_durations_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="not a duration"):
        clockcheck.parse_duration(text)


LIMITS = Thresholds(0.05, 0.2, 0.5, 2.0)


@pytest.mark.parametrize(("rtt", "offset", "status", "reasons"), [
    (0.0002, 0.003, clockcheck.OK, []),
    (0.05, 0.5, clockcheck.OK, []),  # at the threshold is still fine: over it alerts
    (0.06, 0.0, clockcheck.WARNING, ["rtt over 50 ms"]),
    (0.3, 0.0, clockcheck.CRITICAL, ["rtt over 200 ms"]),
    (0.001, -0.6, clockcheck.WARNING, ["offset beyond ±0.5 s"]),
    (0.001, 2.5, clockcheck.CRITICAL, ["offset beyond ±2 s"]),
    (0.06, -3.0, clockcheck.CRITICAL, ["rtt over 50 ms", "offset beyond ±2 s"]),
    (0.001, None, clockcheck.OK, []),
])
def test_check_status_follows_the_thresholds(rtt: float, offset: float | None, status: int,
                                             reasons: list[str]) -> None:
    assert clockcheck.check_status(rtt, offset, LIMITS) == (status, reasons)


def test_the_plugin_line_has_the_documented_form() -> None:
    line = clockcheck.status_line(clockcheck.OK, "127.0.0.1:8009 rtt 0.21 ms, offset +0.003 s",
                                  clockcheck.perfdata(0.000210, 0.003, LIMITS))
    assert line == ("TSECHO OK - 127.0.0.1:8009 rtt 0.21 ms, offset +0.003 s "
                    "| rtt=0.000210s;0.05;0.2;0 offset=0.003s;0.5;2")
    assert clockcheck.status_line(clockcheck.CRITICAL, "x") == "TSECHO CRITICAL - x"


def test_interval_intersection() -> None:
    assert Interval(0, 2).intersect(Interval(1, 3)) == Interval(1, 2)
    assert Interval(0, 1).intersect(Interval(2, 3)) is None
