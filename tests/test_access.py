"""Access rules and per-address rate buckets, fed addresses and times directly.

The clock is the sans-IO seam: ``admit`` takes ``now`` from its caller, so these
tests pass plain numbers, no mock. Covers rule parsing and its messages, first
match wins, IPv4-mapped addresses, bucket arithmetic, expiry, the bound under a
million distinct addresses (timed, and the memory measured), and threads.
"""

from __future__ import annotations

import gc
import ipaddress
import re
import threading
import time
import tracemalloc

import pytest

from tsecho.access import (
    MAX_TRACKED_ADDRESSES,
    AccessRuleError,
    AccessRules,
    ConnectionRateLimiter,
    Decision,
    normalize_address,
)

ip = ipaddress.ip_address

LAN_ONLY = ["allow 10.0.0.0/8", "deny 0.0.0.0/0", "deny ::/0"]


@pytest.mark.parametrize(
    ("rules", "address", "allowed", "index"),
    [
        (LAN_ONLY, "10.1.2.3", True, 0),
        (LAN_ONLY, "192.0.2.7", False, 1),
        (LAN_ONLY, "2001:db8::1", False, 2),
        (LAN_ONLY, "::ffff:10.1.2.3", True, 0),  # IPv4-mapped: the IPv4 rules match it
        (LAN_ONLY, "::ffff:192.0.2.7", False, 1),  # ... and "deny ::/0" is not what denies it
        (["deny ::/0"], "::ffff:192.0.2.7", True, None),
        (["allow 192.0.2.7", "deny all"], "192.0.2.7", True, 0),  # a host rule
        (["allow 192.0.2.7", "deny all"], "192.0.2.8", False, 1),
        (["allow 192.0.2.7", "deny all"], "::1", False, 1),  # all = both families
        (["allow 2001:db8::7", "deny all"], "2001:db8::7", True, 0),
        (["allow 2001:db8::/32", "deny all"], "2001:db8:ffff::1", True, 0),
        (["deny 10.0.0.0/8", "allow 10.1.0.0/16"], "10.1.2.3", False, 0),  # first match wins
        (["deny ::ffff:192.0.2.0/120"], "192.0.2.9", False, 0),  # a rule in mapped form is IPv4
        (["deny ::ffff:192.0.2.0/120"], "::ffff:192.0.2.9", False, 0),
        (["deny fe80::/10"], "fe80::1%lo", False, 0),  # a peer's scope plays no part
        (["allow 127.0.0.1"], "127.0.0.2", True, None),  # no match: allowed
        ([], "203.0.113.7", True, None),
        (["deny 0.0.0.0/0"], "0.0.0.0", False, 0),
        (["deny ::/0"], "::", False, 0),
    ],
)
def test_first_matching_rule_decides_and_no_match_allows(
    rules: list[str], address: str, allowed: bool, index: int | None
) -> None:
    decision = AccessRules.parse(rules).check(address)
    assert decision.allowed is allowed
    assert (decision.rule.index if decision.rule else None) == index
    assert AccessRules.parse(rules).check(ip(address.split("%")[0])) == decision  # objects or strings alike


def test_decision_reads_as_check_access_prints_it() -> None:
    rules = AccessRules.parse(LAN_ONLY)
    assert str(rules.check("192.0.2.7")) == 'denied by rules[1] "deny 0.0.0.0/0"'
    assert str(rules.check("10.0.0.1")) == 'allowed by rules[0] "allow 10.0.0.0/8"'
    assert str(AccessRules.parse([]).check("10.0.0.1")) == "allowed: no rule matched"
    allowed, rule = rules.check("::1")  # a (verdict, rule) pair
    assert (allowed, rule.text if rule else None) == (False, "deny ::/0")
    assert isinstance(rules.check("::1"), Decision)


FORM = re.escape('a rule is "allow" or "deny", one space, then an address (192.0.2.7), a network')


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ("alow 10.0.0.0/8", r'^rules\[1\] = "alow 10.0.0.0/8": unknown action "alow"; ' + FORM),
        ("Allow 10.0.0.0/8", r'unknown action "Allow"'),
        ("allow 10.0.0.1/8", r'^rules\[1\] = "allow 10.0.0.1/8": 10.0.0.1/8 has host bits set; did you mean 10.0.0.0/8\?$'),
        ("deny 2001:db8::1/32", r"did you mean 2001:db8::/32\?$"),
        ("allow localhost", r"localhost is not an address or network \(names are not looked up\); " + FORM),
        ("allow 10.0.0.0/33", r"10.0.0.0/33 is not an address or network"),
        ("allow 010.0.0.1", r"010.0.0.1 is not an address or network"),
        ("allow 10/8", r"10/8 is not an address or network"),
        ("allow fe80::1%eth0", r"fe80::1%eth0 has an IPv6 scope"),
        ("allow  10.0.0.0/8", r'^rules\[1\] = "allow  10.0.0.0/8": ' + FORM),
        ("allow 10.0.0.0/8 ", FORM),
        (" allow 10.0.0.0/8", FORM),
        ("allow", FORM),
        ("allow 10.0.0.0/8 deny", FORM),
        ("", r'^rules\[1\] = "": ' + FORM),
        ("deny ALL", r"ALL is not an address"),
    ],
)
def test_bad_rule_names_its_index_its_text_and_the_form(bad: str, message: str) -> None:
    with pytest.raises(AccessRuleError, match=message):
        AccessRules.parse(["deny all", bad, "allow all"])


def test_rules_must_be_a_list_of_strings() -> None:
    with pytest.raises(AccessRuleError, match=r"must be a list of strings"):
        AccessRules.parse("deny all")
    with pytest.raises(AccessRuleError, match=r"^rules\[0\] = 7: not a string"):
        AccessRules.parse([7])  # type: ignore[list-item]


@pytest.mark.parametrize("text", ["example.com", "1.2.3", "", "10.0.0.0/8"])
def test_address_that_is_not_one_is_refused_in_one_line(text: str) -> None:
    with pytest.raises(ValueError, match=re.escape(f"{text!r} is not an IPv4 or IPv6 address (names are not looked up)")):
        normalize_address(text)


def test_mapped_address_normalizes_to_ipv4() -> None:
    assert normalize_address("::ffff:192.0.2.7") == ip("192.0.2.7")
    assert normalize_address(ip("2001:db8::1")) == ip("2001:db8::1")


# -- rate buckets -----------------------------------------------------------------------------

A = ip("192.0.2.7")
B = ip("2001:db8::7")


def admitted(limiter: ConnectionRateLimiter, address: ipaddress.IPv4Address | ipaddress.IPv6Address, times: list[float]) -> list[bool]:
    return [limiter.admit(address, now) for now in times]


def test_rate_limit_is_off_by_default_and_tracks_nothing() -> None:
    limiter = ConnectionRateLimiter()
    assert not limiter.enabled
    assert all(admitted(limiter, A, [0.0] * 1000))
    assert limiter.tracked == 0


def test_burst_is_admitted_at_once_then_the_rate_refills() -> None:
    limiter = ConnectionRateLimiter(rate_per_s=2.0, burst=3)
    assert admitted(limiter, A, [100.0] * 4) == [True, True, True, False]
    assert admitted(limiter, A, [100.4, 100.5, 100.5]) == [False, True, False]  # one token per 0.5 s
    assert admitted(limiter, A, [101.0, 101.0]) == [True, False]
    assert admitted(limiter, A, [102.5] * 4) == [True, True, True, False]  # 1.5 s idle: full again
    assert limiter.refusals == 5


def test_refused_tries_take_no_token() -> None:
    limiter = ConnectionRateLimiter(rate_per_s=1.0, burst=1)
    assert admitted(limiter, A, [0.0, 0.1, 0.2, 0.3, 0.9]) == [True, False, False, False, False]
    assert limiter.admit(A, 1.0)  # hammering did not push the next token further away


@pytest.mark.parametrize(("rate", "burst"), [(0.5, 1), (3.0, 7), (10.0, 10), (1 / 3, 2), (50.0, 1)])  # offered: 100 tries a second
def test_over_a_long_run_the_admitted_count_follows_rate_and_burst(rate: float, burst: int) -> None:
    limiter = ConnectionRateLimiter(rate_per_s=rate, burst=burst)
    step_s = 0.01
    duration_s = 60.0
    count = sum(limiter.admit(A, i * step_s) for i in range(int(duration_s / step_s)))
    expected = burst + rate * duration_s
    assert abs(count - expected) <= 1 + rate * step_s, (count, expected)


def test_each_address_has_its_own_bucket_and_mapped_shares_ipv4s() -> None:
    limiter = ConnectionRateLimiter(rate_per_s=1.0, burst=2)
    assert admitted(limiter, A, [0.0, 0.0, 0.0]) == [True, True, False]
    assert admitted(limiter, B, [0.0, 0.0, 0.0]) == [True, True, False]
    assert not limiter.admit(ip("::ffff:192.0.2.7"), 0.0)  # the same client as A
    assert limiter.admit(ip("::192.0.2.7"), 0.0)  # IPv4-compatible IPv6 is another address
    assert limiter.tracked == 3


def test_full_buckets_expire_as_checks_arrive() -> None:
    limiter = ConnectionRateLimiter(rate_per_s=10.0, burst=5)  # a bucket is full 0.5 s after its last use
    for i in range(1000):
        limiter.admit(ipaddress.IPv4Address(i), 0.0)
    assert limiter.tracked == 1000
    for i in range(600):  # later arrivals sweep two old entries each
        limiter.admit(ipaddress.IPv6Address(i), 1.0)
    assert limiter.tracked == 600
    assert limiter.evictions == 0


def test_reload_keeps_buckets_and_turning_off_forgets_them() -> None:
    limiter = ConnectionRateLimiter(rate_per_s=1.0, burst=1)
    assert admitted(limiter, A, [0.0, 0.0]) == [True, False]
    limiter.reconfigure(rate_per_s=1.0, burst=3)
    assert admitted(limiter, A, [0.0, 0.0, 0.0]) == [True, True, False]
    limiter.reconfigure(rate_per_s=0.0, burst=3)
    assert limiter.tracked == 0 and limiter.admit(A, 0.0)


@pytest.mark.parametrize(("rate", "burst"), [(-1.0, 1), (float("nan"), 1), (1.0, 0)])
def test_bad_limits_are_refused(rate: float, burst: int) -> None:
    with pytest.raises(ValueError, match="must be >="):
        ConnectionRateLimiter(rate_per_s=rate, burst=burst)


def test_a_million_distinct_addresses_stay_under_the_cap_quickly() -> None:
    limiter = ConnectionRateLimiter(rate_per_s=1.0, burst=5)  # buckets live 5 s: nothing expires here
    attacker = ip("198.51.100.66")
    assert admitted(limiter, attacker, [0.0] * 6) == [True] * 5 + [False]
    started = time.monotonic()
    knocks = []
    for i in range(1_000_000):
        now = i * 1e-6  # the whole flood within one second
        limiter.admit(ipaddress.IPv4Address(0x0A000000 + i), now)
        if i % 10_000 == 0:
            knocks.append(limiter.admit(attacker, now))  # an attacker that keeps knocking
    elapsed_s = time.monotonic() - started
    assert limiter.tracked == MAX_TRACKED_ADDRESSES
    assert limiter.evictions == 1_000_000 + 1 - MAX_TRACKED_ADDRESSES
    assert not any(knocks), "the flood reset the bucket of an address that kept knocking"
    assert elapsed_s < 5.0, f"1e6 checks took {elapsed_s:.1f} s"


def test_resetting_a_silent_bucket_costs_the_whole_cap_in_new_addresses() -> None:
    limiter = ConnectionRateLimiter(rate_per_s=1.0, burst=1, max_addresses=1000)
    attacker = ip("198.51.100.66")
    assert admitted(limiter, attacker, [0.0, 0.0]) == [True, False]
    for i in range(999):
        limiter.admit(ipaddress.IPv4Address(0x0A000000 + i), 0.0)
    assert not limiter.admit(attacker, 0.0)  # the table is full, its bucket is still there
    for i in range(1000):
        limiter.admit(ipaddress.IPv4Address(0x0B000000 + i), 0.0)
    assert limiter.admit(attacker, 0.0)  # evicted only after 1000 other addresses, each with its own token


@pytest.mark.parametrize("version", [4, 6])
def test_memory_per_tracked_address_is_what_the_docstring_says(version: int) -> None:
    count = 50_000
    limiter = ConnectionRateLimiter(rate_per_s=1.0, burst=5, max_addresses=count)
    gc.collect()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        for i in range(count):
            if version == 4:
                address: ipaddress.IPv4Address | ipaddress.IPv6Address = ipaddress.IPv4Address(0x0A000000 + i)
            else:
                address = ipaddress.IPv6Address((0x20010DB8 << 96) + (i << 64) + 12345)
            limiter.admit(address, 0.0)
        per_entry = (tracemalloc.get_traced_memory()[0] - base) / count
    finally:
        tracemalloc.stop()
    assert limiter.tracked == count
    assert 100 < per_entry < 250, per_entry  # docstring: 161 (IPv4) and 177 (IPv6) bytes


def test_threads_sharing_one_limiter_never_admit_more_than_the_burst() -> None:
    limiter = ConnectionRateLimiter(rate_per_s=1.0, burst=50)
    threads_n = 8
    per_thread = 2000
    start = threading.Barrier(threads_n)
    counts = [0] * threads_n

    def knock(slot: int) -> None:
        start.wait(timeout=10)
        for i in range(per_thread):
            counts[slot] += limiter.admit(A, 0.0)  # one address, one instant: only the burst
            limiter.admit(ipaddress.IPv4Address(0x0A000000 + slot * per_thread + i), 0.0)

    workers = [threading.Thread(target=knock, args=(slot,), name=f"acceptor-{slot}") for slot in range(threads_n)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=30)
        assert not worker.is_alive()
    assert sum(counts) == 50
    assert limiter.tracked == 1 + threads_n * per_thread
    assert limiter.refusals == threads_n * per_thread - 50
