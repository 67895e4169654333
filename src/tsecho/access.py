"""Who may connect: address rules (allow/deny) and a connection rate per address.

Pure: an address in, a verdict out. No sockets, no logging and no clock reads
(the caller passes ``now``, a monotonic time), so the server's acceptor threads
and ``tsechod check-access ADDRESS`` ask the same code. ``AccessRules`` is
immutable (a reload builds a new one and swaps it whole); ``ConnectionRateLimiter``
is the one piece of state, behind one lock, O(1) per check.

Rules (``[access] rules``), nginx's allow/deny: ``"allow 10.0.0.0/8"``,
``"deny 192.0.2.7"`` (a host), ``"deny ::/0"``, ``"deny all"`` (both families).
Evaluated in order, the first match wins, no match means allowed. Addresses are
compared as IPv4 or IPv6; an IPv4-mapped IPv6 address (``::ffff:192.0.2.7``, how
a dual-stack socket shows an IPv4 client) is its IPv4 address, so IPv4 rules
match it and ``deny ::/0`` does not. A rule written in the mapped form
(``::ffff:10.0.0.0/104``) is the IPv4 rule it spells (``10.0.0.0/8``).

Rate (``connection_rate_per_ip`` per second, ``connection_burst_per_ip``): a
token bucket per address, kept as one number, the time at which the bucket is
full again (GCRA, the "virtual scheduling" form of a token bucket). A refused
try takes no token (nginx's limit_req behaves the same), so a client over the
rate gets in again as soon as the rate allows.

Bounded under a flood from a million distinct addresses:
- Expiry: entries are kept in least-recently-seen order; each check drops up to
  two entries from the old end whose bucket is full again (dropping a full
  bucket changes nothing: a new one starts full). Every entry is at most
  ``burst / rate`` seconds from full after its last sight, so the table holds
  the addresses seen in the last ``burst / rate`` seconds, and no more than
- the hard cap, ``MAX_TRACKED_ADDRESSES``. When a new address arrives at the
  cap, the least recently *seen* address is evicted; a refused try counts as a
  sighting. An address that keeps knocking therefore stays at the recent end
  and keeps its (empty) bucket. To reset its own bucket an attacker must fall
  silent and then show the cap's worth of other addresses before that bucket
  would have refilled by itself anyway; each of those addresses gets a full
  burst of its own, so eviction never gives more than fresh addresses would.
  ``evictions`` counts them: a non-zero count means a flood (or a cap too low).
  Refusing new addresses at the cap instead would let a flood lock everyone
  out; admitting them untracked would let one address go unlimited.
- Per address means per /128 for IPv6: a host holding a /64 has that many
  buckets. The global ``max_connections`` still bounds it; a per-prefix key
  would be a small change in ``_bucket_key`` if operators ask for it.

Memory, measured with tracemalloc (CPython 3.11, x86-64; tests/test_access.py
checks it stays under 250): 161 bytes per tracked IPv4 address and 177 per IPv6
address (the ordered dict's slot and link, an int key, a float), so 16.1 MB and
17.7 MB at the cap of 100,000. A million distinct addresses through one limiter
take about 1.2 s (1.2 µs a check) and leave it at the cap.
"""

from __future__ import annotations

import collections
import ipaddress
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, NamedTuple, TypeAlias

IPAddress: TypeAlias = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork: TypeAlias = ipaddress.IPv4Network | ipaddress.IPv6Network

ACTIONS: Final = ("allow", "deny")
MAX_TRACKED_ADDRESSES: Final = 100_000
EXPIRE_PER_CHECK: Final = 2  # > 1 new entry per check, so expiry keeps up with arrivals
_SLACK_S: Final = 1e-9  # float rounding in sums of 1/rate must not refuse the last token of a burst

_RULE_FORM: Final = (
    'a rule is "allow" or "deny", one space, then an address (192.0.2.7), '
    'a network (10.0.0.0/8, 2001:db8::/32) or "all"'
)


class AccessRuleError(ValueError):
    """A rule that does not parse; str() names the rule's index and text and what is allowed."""


@dataclass(frozen=True, slots=True)
class Rule:
    """One parsed rule. ``index`` counts from 0, like the TOML array it came from."""

    index: int
    text: str
    allow: bool
    networks: tuple[IPNetwork, ...]

    def __str__(self) -> str:
        return f'rules[{self.index}] "{self.text}"'


class Decision(NamedTuple):
    """The verdict for one address, and the rule that decided it (None: no rule matched)."""

    allowed: bool
    rule: Rule | None

    def __str__(self) -> str:
        verdict = "allowed" if self.allowed else "denied"
        if self.rule is None:
            return f"{verdict}: no rule matched"
        return f"{verdict} by {self.rule}"


def normalize_address(address: IPAddress | str) -> IPAddress:
    """*address* as rules and buckets see it: IPv4-mapped IPv6 becomes IPv4.

    A string is parsed as an address (never looked up as a name); an IPv6 scope
    (``fe80::1%eth0``) is kept but plays no part in matching. Raises ValueError
    with a one-line message for anything else.
    """
    if isinstance(address, str):
        try:
            address = ipaddress.ip_address(address)
        except ValueError:
            raise ValueError(f"{address!r} is not an IPv4 or IPv6 address (names are not looked up)") from None
    if address.version == 6:
        assert isinstance(address, ipaddress.IPv6Address)
        mapped = address.ipv4_mapped
        if mapped is not None:
            return mapped
    return address


class AccessRules:
    """An ordered list of allow/deny rules; first match wins, no match allows.

    Immutable and so safe to share between threads; matching walks the rules
    once with integer masks (no objects made per check).
    """

    def __init__(self, rules: Sequence[Rule] = ()) -> None:
        self.rules: tuple[Rule, ...] = tuple(rules)
        # (version, mask, network bits, rule), flattened: "all" is two entries.
        self._matchers: tuple[tuple[int, int, int, Rule], ...] = tuple(
            (net.version, int(net.netmask), int(net.network_address), rule)
            for rule in self.rules
            for net in rule.networks
        )

    @classmethod
    def parse(cls, texts: Sequence[str]) -> AccessRules:
        """Rules from their config strings. Raises AccessRuleError on the first bad one."""
        if isinstance(texts, str):
            raise AccessRuleError(
                f'rules = {texts!r}: must be a list of strings, like ["allow 10.0.0.0/8", "deny all"]'
            )
        return cls([parse_rule(index, text) for index, text in enumerate(texts)])

    def check(self, address: IPAddress | str) -> Decision:
        """The verdict for *address* and the rule that decided it."""
        address = normalize_address(address)
        version = address.version
        bits = int(address)
        for rule_version, mask, network, rule in self._matchers:
            if rule_version == version and bits & mask == network:
                return Decision(rule.allow, rule)
        return Decision(True, None)

    def __bool__(self) -> bool:
        return bool(self.rules)


def parse_rule(index: int, text: object) -> Rule:
    """One rule from its string; *index* is its place in the list, for messages."""
    where = f"rules[{index}] = {text!r}" if not isinstance(text, str) else f'rules[{index}] = "{text}"'
    if not isinstance(text, str):
        raise AccessRuleError(f"{where}: not a string; {_RULE_FORM}")
    words = text.split(" ")
    if len(words) != 2 or not all(words):
        raise AccessRuleError(f"{where}: {_RULE_FORM}")
    action, target = words
    if action not in ACTIONS:
        raise AccessRuleError(f'{where}: unknown action "{action}"; {_RULE_FORM}')
    networks: tuple[IPNetwork, ...]
    if target == "all":
        networks = (ipaddress.IPv4Network("0.0.0.0/0"), ipaddress.IPv6Network("::/0"))
    else:
        networks = (_parse_network(target, where),)
    return Rule(index=index, text=text, allow=action == "allow", networks=networks)


def _parse_network(target: str, where: str) -> IPNetwork:
    if "%" in target:
        raise AccessRuleError(f"{where}: {target} has an IPv6 scope (%...); rules match addresses without one")
    try:
        network = ipaddress.ip_network(target, strict=True)
    except ValueError as err:
        if "has host bits set" in str(err):
            loose = ipaddress.ip_network(target, strict=False)
            raise AccessRuleError(f"{where}: {target} has host bits set; did you mean {loose}?") from None
        raise AccessRuleError(
            f"{where}: {target} is not an address or network (names are not looked up); {_RULE_FORM}"
        ) from None
    if isinstance(network, ipaddress.IPv6Network) and network.prefixlen >= 96:
        mapped = network.network_address.ipv4_mapped
        if mapped is not None:  # ::ffff:a.b.c.d/n spells the IPv4 network a.b.c.d/(n-96)
            return ipaddress.IPv4Network(f"{mapped}/{network.prefixlen - 96}")
    return network


class ConnectionRateLimiter:
    """Connections per second per address, a token bucket each; off while rate is 0.

    ``admit(address, now)`` takes a token from *address*'s bucket and answers
    whether there was one. *now* is a monotonic time in seconds from the caller
    (``time.monotonic()`` in the server, any numbers in tests). Thread-safe:
    acceptor threads of several listeners share one limiter.
    """

    def __init__(self, rate_per_s: float = 0.0, burst: int = 1, max_addresses: int = MAX_TRACKED_ADDRESSES) -> None:
        if max_addresses < 1:
            raise ValueError(f"max_addresses must be >= 1, not {max_addresses}")
        self.max_addresses = max_addresses
        self.evictions = 0  # live buckets dropped at the cap: a flood, or a cap too low
        self.refusals = 0
        self.rate_per_s = 0.0
        self.burst = 1
        self._interval_s = 0.0  # 1 / rate: one token's worth of time; 0 when off
        self._tolerance_s = 0.0  # burst / rate: how far ahead of now a bucket may be full
        # address key -> the time its bucket is full again; least recently seen first
        self._full_at: collections.OrderedDict[int, float] = collections.OrderedDict()
        self._lock = threading.Lock()
        self.reconfigure(rate_per_s, burst)

    @property
    def enabled(self) -> bool:
        return self._interval_s > 0

    @property
    def tracked(self) -> int:
        """How many addresses have a bucket now."""
        return len(self._full_at)

    def reconfigure(self, rate_per_s: float, burst: int) -> None:
        """New limits (a reload). Buckets are kept: a client over the old rate stays
        so until its bucket refills under the new one. Rate 0 turns the limit off
        and forgets every bucket."""
        if rate_per_s < 0 or rate_per_s != rate_per_s:
            raise ValueError(f"connection rate must be >= 0 per second, not {rate_per_s}")
        if burst < 1:
            raise ValueError(f"connection burst must be >= 1, not {burst}")
        with self._lock:
            self.rate_per_s = rate_per_s
            self.burst = burst
            self._interval_s = 1.0 / rate_per_s if rate_per_s else 0.0
            self._tolerance_s = burst * self._interval_s
            if not rate_per_s:
                self._full_at.clear()

    def admit(self, address: IPAddress, now: float) -> bool:
        """Take a token for a new connection from *address* at *now*; False: over the rate."""
        if not self._interval_s:
            return True
        key = _bucket_key(address)
        table = self._full_at
        with self._lock:
            interval = self._interval_s
            if not interval:  # turned off by a reload since the check above
                return True
            for _ in range(EXPIRE_PER_CHECK):
                if not table:
                    break
                oldest = next(iter(table))
                if table[oldest] > now:
                    break
                del table[oldest]
            full_at = table.get(key)
            start = now if full_at is None or full_at < now else full_at
            if start + interval - now > self._tolerance_s + _SLACK_S:
                table.move_to_end(key)  # a refused try is a sighting: it keeps the bucket
                self.refusals += 1
                return False
            if full_at is None:
                if len(table) >= self.max_addresses:
                    table.popitem(last=False)
                    self.evictions += 1
                table[key] = start + interval
            else:
                table[key] = start + interval
                table.move_to_end(key)
            return True


def _bucket_key(address: IPAddress) -> int:
    """An int per address: IPv6 as its 128 bits, IPv4 (or mapped) as a negative number."""
    if address.version == 4:
        return -1 - int(address)
    assert isinstance(address, ipaddress.IPv6Address)
    mapped = address.ipv4_mapped
    if mapped is not None:
        return -1 - int(mapped)
    return int(address)
