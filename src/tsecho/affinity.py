"""Which CPU each serving process runs on: the ``cpu_affinity`` setting.

A tsechod process is threads that take turns holding one GIL. Left to the
scheduler, those threads run on every CPU, and each hand-over of the GIL
becomes a wake-up on another CPU: on 2 CPUs an unpinned tsechod burned 1.4
CPUs to do less than half of what the same process does pinned to one CPU
(docs/performance.md, "What to expect"). So by default each serving process is
pinned to one CPU, as nginx's ``worker_cpu_affinity auto`` and HAProxy's
``cpu-map`` do: worker *i* runs on the *i*-th CPU this process may use.

"The CPUs this process may use" is ``os.sched_getaffinity(0)`` at start: a
systemd ``CPUAffinity=``, a cgroup cpuset or a ``taskset`` around tsechod has
already narrowed it, and tsechod never pins outside it. This module parses the
setting and picks the CPU (pure, tested without processes); ``pin_process``
applies it to every thread of the calling process, before the acceptors and
connection threads start (threads inherit their creator's affinity).

A pinned process can't get away from a neighbour that keeps its CPU busy (a
CPU-bound process there halves what tsechod does). So with "auto" the process
also *follows* the quiet CPUs: every status tick, ``Pin.rebalance`` reads how
busy each allowed CPU was (/proc/stat, tsechod's own time not counted) and moves
every thread to a clearly quieter CPU when its own is crowded. An explicit list
stays where the operator put it.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable, Mapping
from typing import Final

logger = logging.getLogger(__name__)

AUTO: Final = "auto"
OFF: Final = "off"
# Linux's CONFIG_NR_CPUS is at most 8192; a bigger number is a typo.
MAX_CPU: Final = 8191
# A CPU that other processes kept at least this busy over the last tick (a fraction of
# the tick) is crowded; "auto" moves to an allowed CPU at least MOVE_MARGIN quieter.
# The margin is wide so that tsechod's own kernel work (not counted as its time) can't
# make it hop back and forth: a neighbour that really competes uses most of a CPU.
CROWDED: Final = 0.4
MOVE_MARGIN: Final = 0.3


def parse_cpu_list(text: str) -> tuple[int, ...]:
    """``"3,0-1"`` -> ``(0, 1, 3)``: a set of CPUs in taskset -c's syntax, lowest first.

    Raises ValueError with the reason for anything else.
    """
    cpus: list[int] = []
    for part in text.split(","):
        part = part.strip()
        first, sep, last = part.partition("-")
        if not first.strip().isdigit() or (sep and not last.strip().isdigit()):
            raise ValueError(f"{part!r} is not a CPU number or range (like 0,2-3)")
        lo = int(first)
        hi = int(last) if sep else lo
        if hi < lo:
            raise ValueError(f"range {part!r} goes backwards")
        if hi > MAX_CPU:
            raise ValueError(f"CPU {hi} is beyond {MAX_CPU}")
        cpus.extend(range(lo, hi + 1))
    return tuple(sorted(set(cpus)))


def check_setting(value: str) -> str:
    """Normalise a ``cpu_affinity`` value: "auto", "off" or a CPU list like "0,2-3"; ValueError if bad."""
    word = value.strip().lower()
    if word in (AUTO, OFF):
        return word
    return format_cpus(parse_cpu_list(word))


def format_cpus(cpus: Iterable[int]) -> str:
    """``(0, 1, 2, 5)`` -> ``"0-2,5"`` (sorted; how the docs and logs write a CPU set)."""
    ordered = sorted(set(cpus))
    parts: list[str] = []
    i = 0
    while i < len(ordered):
        j = i
        while j + 1 < len(ordered) and ordered[j + 1] == ordered[j] + 1:
            j += 1
        parts.append(str(ordered[i]) if i == j else f"{ordered[i]}-{ordered[j]}")
        i = j + 1
    return ",".join(parts)


def choose_cpu(setting: str, index: int, allowed: Iterable[int]) -> int | None:
    """The CPU that serving process *index* (0 for a single process) is pinned to, or None for no pin.

    "off": None. "auto": the *index*-th of the *allowed* CPUs (lowest first), wrapping
    around when there are more workers than CPUs; None if only one CPU is allowed
    (nothing to choose). A list: the same over the listed CPUs that are allowed;
    None if none is.
    """
    allowed_set = set(allowed)
    if setting == OFF or not allowed_set:
        return None
    if setting == AUTO:
        if len(allowed_set) == 1:
            return None
        candidates = sorted(allowed_set)
    else:
        candidates = [cpu for cpu in parse_cpu_list(setting) if cpu in allowed_set]
        if not candidates:
            return None
    return candidates[index % len(candidates)]


def pick_quieter(current: int, busy_by_others: Mapping[int, float]) -> int | None:
    """Where to move from *current*, given each allowed CPU's busy fraction without us; None: stay."""
    here = busy_by_others.get(current, 0.0)
    if here < CROWDED or len(busy_by_others) < 2:
        return None
    quietest = min(busy_by_others, key=lambda cpu: (busy_by_others[cpu], cpu))
    return quietest if busy_by_others[quietest] <= here - MOVE_MARGIN else None


def busy_ticks(path: str = "/proc/stat") -> dict[int, int]:
    """user + nice + system clock ticks of each CPU since boot (interrupts and steal not counted)."""
    out = {}
    with open(path) as stat:
        for line in stat:
            if line.startswith("cpu") and line[3:4].isdigit():
                name, user, nice, system, *_ = line.split()
                out[int(name[3:])] = int(user) + int(nice) + int(system)
    return out


class Pin:
    """Where one serving process is pinned; with *follow*, it moves away from a crowded CPU."""

    def __init__(self, cpu: int, allowed: Iterable[int], follow: bool, what: str) -> None:
        self.cpu = cpu
        self.allowed = frozenset(allowed)
        self.follow = follow
        self.what = what
        self._hz = os.sysconf("SC_CLK_TCK")
        self._last: tuple[float, float, dict[int, int]] = (0.0, 0.0, {})
        if follow:
            try:
                self._last = self._sample()
            except (OSError, ValueError) as err:  # ProcSubset=pid in a unit hides /proc/stat, say
                logger.info("%s stays on CPU %d: cannot read how busy the CPUs are (%s)", what, cpu, err)
                self.follow = False

    def _sample(self) -> tuple[float, float, dict[int, int]]:
        times = os.times()
        return time.monotonic(), times.user + times.system, busy_ticks()

    def rebalance(self) -> int | None:
        """Called every status tick: move to a quieter CPU if ours is crowded; return the new CPU, or None."""
        if not self.follow:
            return None
        try:
            now, ours, ticks = self._sample()
        except (OSError, ValueError):
            return None
        then, ours_then, ticks_then = self._last
        self._last = (now, ours, ticks)
        span = (now - then) * self._hz
        if span <= 0:
            return None
        busy = {cpu: (ticks[cpu] - ticks_then.get(cpu, ticks[cpu])) / span
                for cpu in self.allowed if cpu in ticks}
        if self.cpu in busy:  # all our time was spent on our CPU
            busy[self.cpu] = max(0.0, busy[self.cpu] - (ours - ours_then) / (now - then))
        target = pick_quieter(self.cpu, busy)
        if target is None:
            return None
        if not _move_threads(target):
            return None
        logger.info("%s moves from CPU %d to CPU %d: other processes kept CPU %d %.0f%% busy, CPU %d %.0f%% "
                    "(cpu_affinity = auto)", self.what, self.cpu, target, self.cpu, 100 * busy[self.cpu],
                    target, 100 * busy[target])
        self.cpu = target
        return target


def _pin_threads(cpu: int) -> None:
    """Pin every thread of this process to *cpu*; threads started later inherit it from their creator.

    Raises OSError (EPERM under a seccomp filter without sched_setaffinity, say).
    """
    for _ in range(2):  # a second pass catches a thread started during the first
        for tid in os.listdir("/proc/self/task"):
            try:
                os.sched_setaffinity(int(tid), {cpu})
            except ProcessLookupError:
                pass  # it ended meanwhile


def _move_threads(cpu: int) -> bool:
    """Move every thread of this process to *cpu*; False (and a warning) if that fails."""
    try:
        _pin_threads(cpu)
    except OSError as err:
        logger.warning("cpu_affinity = auto: cannot move to CPU %d: %s", cpu, err)
        return False
    return True


def pin_process(setting: str, index: int = 0, what: str = "tsechod") -> Pin | None:
    """Pin the calling process's threads per *setting*; return the Pin, or None.

    Never raises: a pin that can't be applied is a warning, and the process runs
    where the scheduler puts it.
    """
    try:
        allowed = os.sched_getaffinity(0)
    except OSError as err:
        logger.warning("cpu_affinity = %s: cannot read the allowed CPUs (%s); not pinning", setting, err)
        return None
    cpu = choose_cpu(setting, index, allowed)
    if setting not in (AUTO, OFF) and cpu is not None and not set(parse_cpu_list(setting)) <= allowed:
        logger.warning("cpu_affinity = %s: CPUs %s are not allowed for this process (allowed: %s); using the others",
                       setting, format_cpus(set(parse_cpu_list(setting)) - allowed), format_cpus(allowed))
    if cpu is None:
        if setting not in (AUTO, OFF):
            logger.warning("cpu_affinity = %s: none of these CPUs is allowed for this process (allowed: %s); "
                           "not pinning (check systemd's CPUAffinity= or the cgroup's cpuset)",
                           setting, format_cpus(allowed))
        return None
    try:
        _pin_threads(cpu)  # the main thread, and any started already (the log writer)
    except OSError as err:
        logger.warning("cpu_affinity = %s: cannot pin %s to CPU %d: %s; not pinning (a systemd unit's "
                       "SystemCallFilter= must allow sched_setaffinity; or set cpu_affinity = \"off\")",
                       setting, what, cpu, err.strerror or err)
        return None
    logger.info("%s runs on CPU %d (cpu_affinity = %s; allowed: %s)", what, cpu, setting, format_cpus(allowed))
    return Pin(cpu, allowed, follow=setting == AUTO, what=what)
