"""cpu_affinity: the setting's rules (pure), and where real tsechod processes' threads may run.

The process-level tests read what the kernel says (``Cpus_allowed_list`` of
every thread in /proc), for a single process, for workers, with the setting
off, and started inside a narrower CPU set (as systemd's CPUAffinity= or
taskset would start it). They need at least two CPUs to mean anything.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from helpers import require_tool, wait_until
from tsecho.affinity import check_setting, choose_cpu, format_cpus, parse_cpu_list, pick_quieter

ALLOWED = sorted(os.sched_getaffinity(0))
needs_two_cpus = pytest.mark.skipif(len(ALLOWED) < 2, reason="needs at least two CPUs this process may use")


# ---------- the rules ----------

@pytest.mark.parametrize(("text", "cpus"), [
    ("0", (0,)), ("3,1", (1, 3)), ("0-3", (0, 1, 2, 3)), (" 2-3 , 0 ", (0, 2, 3)), ("1,1-2", (1, 2)),
])
def test_cpu_lists_parse_like_taskset(text: str, cpus: tuple[int, ...]) -> None:
    assert parse_cpu_list(text) == cpus


@pytest.mark.parametrize(("text", "reason"), [
    ("", "is not a CPU number"), ("a", "is not a CPU number"), ("1,,2", "is not a CPU number"),
    ("-1", "is not a CPU number"), ("3-1", "goes backwards"), ("0-", "is not a CPU number"),
    ("9000", "beyond 8191"),
])
def test_bad_cpu_lists_say_why(text: str, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        parse_cpu_list(text)


def test_setting_is_normalised() -> None:
    assert check_setting(" AUTO ") == "auto"
    assert check_setting("Off") == "off"
    assert check_setting("3, 0-1") == "0-1,3"
    assert format_cpus([5, 0, 1, 2]) == "0-2,5"


@pytest.mark.parametrize(("setting", "index", "allowed", "cpu"), [
    ("auto", 0, {0, 1}, 0),
    ("auto", 1, {0, 1}, 1),
    ("auto", 2, {0, 1}, 0),  # more workers than CPUs: wrap around
    ("auto", 0, {2, 5}, 2),  # a cpuset that doesn't start at 0
    ("auto", 1, {2, 5}, 5),
    ("auto", 0, {3}, None),  # one allowed CPU: nothing to choose
    ("off", 0, {0, 1}, None),
    ("1", 0, {0, 1}, 1),
    ("2-3", 1, {0, 1, 2, 3}, 3),
    ("0,3", 1, {0, 1, 2}, 0),  # 3 is not allowed: skipped
    ("3", 0, {0, 1}, None),  # nothing listed is allowed: no pin
])
def test_worker_i_gets_the_ith_allowed_cpu(setting: str, index: int, allowed: set[int], cpu: int | None) -> None:
    assert choose_cpu(setting, index, allowed) == cpu


@pytest.mark.parametrize(("current", "busy", "target"), [
    (0, {0: 0.95, 1: 0.10}, 1),  # a neighbour spins on our CPU: move
    (0, {0: 0.95, 1: 0.80}, None),  # every CPU is as crowded: stay
    (0, {0: 0.30, 1: 0.00}, None),  # a little company is no reason to move
    (1, {0: 0.20, 1: 0.90, 2: 0.05}, 2),  # to the quietest
    (0, {0: 0.95}, None),  # nowhere to go
])
def test_auto_moves_only_away_from_a_crowded_cpu_to_a_clearly_quieter_one(
        current: int, busy: dict[int, float], target: int | None) -> None:
    assert pick_quieter(current, busy) == target


# ---------- real processes ----------

def allowed_cpus(pid: int) -> dict[str, str]:
    """Cpus_allowed_list of every thread of *pid*, by thread id."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/task/{tid}/status").read_text().splitlines():
                if line.startswith("Cpus_allowed_list:"):
                    out[tid] = line.split(":", 1)[1].strip()
    return out


def children(pid: int) -> list[int]:
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


@contextlib.contextmanager
def started_within(cpus: set[int]) -> Iterator[None]:
    """Start processes inside a narrower CPU set, as taskset or systemd's CPUAffinity= would."""
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cpus)
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def open_connections(d, count: int) -> list:  # type: ignore[no-untyped-def]
    socks = [d.connect() for _ in range(count)]
    for sock in socks:
        sock.sendall(b"x\n")
        assert sock.recv(100).endswith(b"] x\n")
    return socks


@needs_two_cpus
def test_auto_pins_every_thread_of_a_single_process_to_the_first_allowed_cpu(tsechod) -> None:
    d = tsechod()
    d.wait_for_log(rf"tsechod runs on CPU {ALLOWED[0]} \(cpu_affinity = auto; allowed: {format_cpus(ALLOWED)}\)")
    socks = open_connections(d, 3)  # connection threads too, not just the ones at startup
    threads = allowed_cpus(d.pid)
    assert len(threads) >= 5 and set(threads.values()) == {str(ALLOWED[0])}, threads
    for sock in socks:
        sock.close()


@needs_two_cpus
def test_off_leaves_the_threads_on_every_allowed_cpu(tsechod) -> None:
    d = tsechod('[server]\ncpu_affinity = "off"\n')
    socks = open_connections(d, 2)
    assert set(allowed_cpus(d.pid).values()) == {format_cpus(ALLOWED)}
    assert "runs on CPU" not in d.log_text()
    for sock in socks:
        sock.close()


@needs_two_cpus
def test_workers_each_get_their_own_cpu_and_the_supervisor_stays_free(tsechod) -> None:
    d = tsechod("[server]\nworkers = 2\n", wait=False)
    d.wait_for_log(r"2 workers ready")
    workers = children(d.pid)
    assert len(workers) == 2
    pinned = sorted(set(allowed_cpus(pid).values()).pop() for pid in workers)
    assert all(len(set(allowed_cpus(pid).values())) == 1 for pid in workers)
    assert pinned == sorted(str(cpu) for cpu in ALLOWED[:2])
    assert set(allowed_cpus(d.pid).values()) == {format_cpus(ALLOWED)}
    d.wait_for_log(r"worker 0 runs on CPU")
    d.wait_for_log(r"worker 1 runs on CPU")


@needs_two_cpus
def test_never_pins_outside_the_cpus_it_was_started_with(tsechod) -> None:
    last = ALLOWED[-1]
    with started_within({last}):
        alone = tsechod()  # auto, one allowed CPU: nothing to pin, nothing logged
        listed = tsechod(f'[server]\ncpu_affinity = "{ALLOWED[0]}"\n')  # a CPU it may not use
    for d in (alone, listed):
        for sock in open_connections(d, 1):
            sock.close()
        assert set(allowed_cpus(d.pid).values()) == {str(last)}
    assert "runs on CPU" not in alone.log_text()
    listed.wait_for_log(rf"cpu_affinity = {ALLOWED[0]}: none of these CPUs is allowed for this process "
                        rf"\(allowed: {last}\); not pinning")
    assert alone.stop() == 0 and listed.stop() == 0


@needs_two_cpus
def test_auto_moves_away_from_a_cpu_a_busy_process_shares(tsechod) -> None:
    first = ALLOWED[0]
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        os.sched_setaffinity(spinner.pid, {first})
        d = tsechod()
        d.wait_for_log(rf"tsechod runs on CPU {first} ")
        # The first status tick (5 s) sees the spinner and moves every thread, the new ones too.
        d.wait_for_log(rf"tsechod moves from CPU {first} to CPU \d+: other processes kept CPU {first} \d+% busy",
                       timeout=20)
        moved_to = int(re.findall(r"moves from CPU \d+ to CPU (\d+)", d.log_text())[0])
        assert moved_to != first
        socks = open_connections(d, 2)
        assert set(allowed_cpus(d.pid).values()) == {str(moved_to)}
        for sock in socks:
            sock.close()
        assert d.stop() == 0
    finally:
        spinner.kill()  # ours, by PID
        spinner.wait(timeout=10)


@needs_two_cpus
def test_a_proc_without_stat_pins_without_following(tmp_path: Path) -> None:
    # As under a unit with ProcSubset=pid: /proc shows only processes, so the CPUs' load can't be read.
    require_tool("unshare")
    if os.geteuid() != 0:
        pytest.skip("needs root for a mount namespace with its own /proc")
    config = tmp_path / "tsechod.toml"
    config.write_text("")
    stderr = tmp_path / "stderr"
    inner = (f"mount -o remount,subset=pid /proc && exec {sys.executable} -m tsecho.cli --config {config} "
             "--listen 127.0.0.1:0")
    with open(stderr, "wb") as err:
        proc = subprocess.Popen(["unshare", "--mount", "--pid", "--fork", "--mount-proc", "sh", "-c", inner],
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err)
    try:
        wait_until(lambda: "stays on CPU" in stderr.read_text(), timeout=15)
        text = stderr.read_text()
        assert f"tsechod runs on CPU {ALLOWED[0]} " in text
        assert "cannot read how busy the CPUs are" in text and "Traceback" not in text
    finally:
        for child in children(proc.pid):  # unshare forwards no signal: stop its child, tsechod, by PID
            os.kill(child, signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
