"""Hostile clients and overload against a real tsechod: floods, slow and silent clients, huge lines, garbage.

Every test starts ``python -m tsecho.cli`` for real and talks to it over
loopback only. What is asserted is what a user would see: bytes on the wire
(ERR lines, whole reply lines, FIN or reset), the log, the exit code, and the
daemon's RSS and thread count read from /proc/PID/status. The figures are
printed as ``FIGURES ...`` lines (``pytest -s`` shows them).

Extra loopback sources (127.0.0.2, 127.0.0.3, ...) stand for other hosts: on
Linux the whole of 127.0.0.0/8 reaches a listener on 127.0.0.1.
"""

from __future__ import annotations

import collections
import os
import random
import re
import resource
import selectors
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest
from helpers import (
    ACCESS,
    CTIME_REPLY,
    STAMPED,
    Pipeliner,
    PeakSampler,
    access_events,
    assert_no_errors,
    baseline,
    connect_from,
    figures,
    peer_of,
    ping,
    read_to_end,
    recv_lines,
    require_tool,
    reset,
    settle,
    show,
    wait_until,
)

from tsecho.server import PARKED_THREADS

MIB = 1024 * 1024
ERR_BUSY = b"ERR server busy\n"
ERR_TOO_MANY = b"ERR too many connections from your address\n"
REFUSAL_SUMMARY = re.compile(r"refused (\d+) connections in the last")


# -- 1. flood ----------------------------------------------------------------------------

FLOOD = 2000
FLOOD_PER_IP = 1000
FLOOD_MAX = 1010


@pytest.fixture
def many_fds():
    """Raise this test process's soft RLIMIT_NOFILE (up to the hard limit) for the flood."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = FLOOD + 500
    if hard != resource.RLIM_INFINITY and hard < want:
        pytest.fail(f"the hard open-files limit is {hard}; this test needs {want} (ulimit -Hn)")
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def open_flood(address: tuple[str, int], count: int, source: str, timeout: float = 15.0) -> list[socket.socket]:
    """Start *count* non-blocking connects at once; return them once all are connected."""
    socks = []
    waiting = selectors.DefaultSelector()
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            socks.append(sock)
            sock.setblocking(False)
            sock.bind((source, 0))
            sock.connect_ex(address)
            waiting.register(sock, selectors.EVENT_WRITE)
        deadline = time.monotonic() + timeout
        while waiting.get_map() and time.monotonic() < deadline:
            for key, _ in waiting.select(0.5):
                waiting.unregister(key.fileobj)
                assert key.fileobj.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0  # type: ignore[union-attr]
        assert not waiting.get_map(), f"{len(waiting.get_map())} connects still pending after {timeout} s"
    except BaseException:
        for sock in socks:
            sock.close()
        raise
    finally:
        waiting.close()
    return socks


def sort_flood(socks: list[socket.socket], refusals: int, timeout: float = 10.0) -> tuple[list, list, list]:
    """Split flood sockets into (refused, what each refused one read, admitted).

    A refused socket becomes readable at once (its ERR line and FIN); an admitted
    one stays silent. After *refusals* of them, stragglers get 0.5 s more.
    """
    selector = selectors.DefaultSelector()
    for sock in socks:
        selector.register(sock, selectors.EVENT_READ)
    refused: list[socket.socket] = []
    answers: list[tuple[bytes, str]] = []

    def take(events: list) -> None:
        for key, _ in events:
            selector.unregister(key.fileobj)
            key.fileobj.setblocking(True)
            refused.append(key.fileobj)
            answers.append(read_to_end(key.fileobj, timeout=2))

    deadline = time.monotonic() + timeout
    while len(refused) < refusals and time.monotonic() < deadline:
        take(selector.select(0.2))
    while events := selector.select(0.5):
        take(events)
    admitted = [key.fileobj for key in selector.get_map().values()]
    selector.close()
    return refused, answers, admitted


def echo_all(socks: list[socket.socket], timeout: float = 20.0) -> int:
    """Send one line on every socket and collect every reply; return how many were right."""
    selector = selectors.DefaultSelector()
    for i, sock in enumerate(socks):
        sock.setblocking(True)
        sock.sendall(b"flood %d\n" % i)
        sock.setblocking(False)
        selector.register(sock, selectors.EVENT_READ, [i, b""])
    right = 0
    deadline = time.monotonic() + timeout
    while selector.get_map() and time.monotonic() < deadline:
        for key, _ in selector.select(0.5):
            state = key.data
            data = key.fileobj.recv(4096)  # type: ignore[union-attr]
            state[1] += data
            if not data or state[1].endswith(b"\n"):
                selector.unregister(key.fileobj)
                if CTIME_REPLY.match(state[1]) and state[1].endswith(b"] flood %d\n" % state[0]):
                    right += 1
    selector.close()
    return right


def test_flood_of_2000_connections_is_bounded_and_a_good_client_still_gets_in(tsechod, many_fds) -> None:
    # backlog 4096: the whole burst fits in the listen queue. With the default 1024 the
    # kernel drops the SYNs over it, and every client caught there, the good one too,
    # waits for its SYN retransmit (1 s): see docs/security.md.
    d = tsechod(
        "[server]\nidle_timeout_s = 60\nshutdown_timeout_s = 3\nbacklog = 4096\n"
        f"[limits]\nmax_connections = {FLOOD_MAX}\nmax_connections_per_ip = {FLOOD_PER_IP}\n"
    )
    rss0, threads0 = baseline(d, "flood")

    # 2,000 connections at once from one source, while a good client on another keeps pinging.
    flood: list[socket.socket] = []
    failure: list[BaseException] = []

    def open_it() -> None:
        try:
            flood.extend(open_flood(d.address, FLOOD, "127.0.0.2"))
        except BaseException as err:  # noqa: BLE001 - reported by the main thread
            failure.append(err)

    latencies = []
    opener = threading.Thread(target=open_it, name="flood-opener")
    with PeakSampler(d.pid) as peak:
        opener.start()
        while opener.is_alive() and len(latencies) < 500:
            latencies.append(ping(d.address, b"during the flood"))
        opener.join(timeout=30)
        assert not failure, failure
        try:
            refused, answers, admitted = sort_flood(flood, FLOOD - FLOOD_PER_IP)
            _, threads_during = show("flood", "during", d.pid, f"held={len(admitted)}")
            for _ in range(5):
                latencies.append(ping(d.address, b"while held"))
            print(f"FIGURES flood     good-client  pings={len(latencies)} max_latency_s={max(latencies):.3f}")
            assert max(latencies) < 1.0, latencies
            assert (len(refused), len(admitted)) == (FLOOD - FLOOD_PER_IP, FLOOD_PER_IP)
            assert collections.Counter(answers) == {(ERR_TOO_MANY, "fin"): FLOOD - FLOOD_PER_IP}
            # A thread for each admitted one (and a few parked, idle ones), none for the refused.
            assert FLOOD_PER_IP <= threads_during - threads0 <= FLOOD_PER_IP + PARKED_THREADS
            assert echo_all(admitted) == FLOOD_PER_IP

            # Now the total limit: 10 places are left for a third address.
            wait_until(lambda: len(access_events(d.log_text())) == len(latencies) + 1)  # the pings have left
            extra = [connect_from(d.address, "127.0.0.3") for _ in range(20)]
            flood += extra
            _, extra_answers, extra_admitted = sort_flood(extra, 20 - (FLOOD_MAX - FLOOD_PER_IP))
            assert len(extra_admitted) == FLOOD_MAX - FLOOD_PER_IP
            assert extra_answers == [(ERR_BUSY, "fin")] * (20 - (FLOOD_MAX - FLOOD_PER_IP))
            show("flood", "peak", d.pid, f"peak_rss={peak.peak_rss:.1f} MiB peak_threads={peak.peak_threads}")
        finally:
            for sock in flood:
                sock.close()

    took = settle(d.pid, threads0)
    rss1, threads1 = show("flood", "after", d.pid, f"threads back in {took:.2f} s")
    assert rss1 - rss0 < 16, (rss0, rss1)
    ping(d.address, b"after the flood")

    assert d.stop() == 0
    log = d.log_text()
    assert_no_errors(log)
    summaries = [int(n) for n in REFUSAL_SUMMARY.findall(log)]
    assert sum(summaries) == FLOOD - FLOOD_PER_IP + 10
    assert len(summaries) <= 3, summaries  # a summary at most every 10 s, never a line per refusal
    assert len(access_events(log)) == FLOOD_PER_IP + 10 + len(latencies) + 2


def test_out_of_file_descriptors_backs_off_and_recovers(tsechod) -> None:
    require_tool("prlimit")
    d = tsechod("[server]\nidle_timeout_s = 30\n")
    ping(d.address)
    # Leave the daemon about 30 spare descriptors, then hold more connections than that.
    open_fds = len(os.listdir(f"/proc/{d.pid}/fd"))
    limit = open_fds + 30
    subprocess.run(["prlimit", f"--pid={d.pid}", f"--nofile={limit}:{limit}"], check=True, timeout=10)
    held = [connect_from(d.address) for _ in range(60)]
    try:
        d.wait_for_log(r"WARNING tsecho.server: cannot accept: too many open files; backing off")
        rss, threads = show("emfile", "out-of-fds", d.pid, f"nofile={limit} held={len(held)}")
        for sock in held[:40]:
            sock.close()
        # The ones left waiting in the listen queue are accepted once descriptors are free.
        for i, sock in enumerate(held[40:]):
            sock.sendall(b"queued %d\n" % i)
            assert recv_lines(sock, 1, timeout=5)[0].endswith(b"] queued %d" % i)
        ping(d.address, b"after")
    finally:
        for sock in held:
            sock.close()
    assert d.stop() == 0
    log = d.log_text()
    assert_no_errors(log)
    assert len(re.findall("cannot accept", log)) <= 2  # rate-limited: at most one per 10 s


# -- 2. slow clients ---------------------------------------------------------------------

IDLE_S = 3.0
LINE_S = 5.0
DRIBBLE_EVERY_S = 2.0


def test_idle_and_dribbling_clients_are_closed_while_others_are_served(tsechod) -> None:
    d = tsechod(f"[server]\nidle_timeout_s = {IDLE_S}\n[limits]\nline_timeout_s = {LINE_S}\n")
    rss0, threads0 = baseline(d, "slow")
    results: dict[str, list[tuple[float, str, int]]] = {"idle": [], "dribble": []}
    latencies: list[float] = []
    done = threading.Event()

    def idle() -> None:
        with connect_from(d.address) as sock:
            started = time.monotonic()
            data, how = read_to_end(sock, timeout=IDLE_S + 5)
            results["idle"].append((time.monotonic() - started, how, len(data)))

    def dribble() -> None:
        with connect_from(d.address) as sock:
            started = time.monotonic()
            sent = 0
            how = "open"
            while time.monotonic() - started < LINE_S + 5:
                sock.sendall(b"x")
                sent += 1
                # Pace by waiting for the close itself: poll() returns at once on FIN or RST.
                sock.settimeout(DRIBBLE_EVERY_S)
                try:
                    data = sock.recv(100)
                except TimeoutError:
                    continue
                except ConnectionResetError:
                    how = "reset"
                    break
                how = "fin" if data == b"" else f"data {data!r}"
                break
            results["dribble"].append((time.monotonic() - started, how, sent))

    def normal() -> None:
        while not done.wait(0.25):
            latencies.append(ping(d.address, b"normal"))

    clients = [threading.Thread(target=idle) for _ in range(20)] + [threading.Thread(target=dribble) for _ in range(20)]
    pinger = threading.Thread(target=normal)
    for t in clients:
        t.start()
    pinger.start()
    wait_until(lambda: figures(d.pid)[1] >= threads0 + 40, timeout=5)
    show("slow", "during", d.pid, "20 idle + 20 dribbling + 1 pinging")
    for t in clients:
        t.join(timeout=LINE_S + 15)
    done.set()
    pinger.join(timeout=10)

    for took, how, _ in results["idle"]:
        assert how == "fin" and IDLE_S - 0.1 < took < IDLE_S + 1.5, results["idle"]
    for took, how, sent in results["dribble"]:
        assert how == "fin" and LINE_S - 0.1 < took < LINE_S + 1.5, results["dribble"]
        assert sent == 3  # at 0, 2 and 4 s: never idle for 3 s, yet closed
    assert len(results["idle"]) == len(results["dribble"]) == 20
    assert len(latencies) >= 10 and max(latencies) < 1.0, latencies
    took = settle(d.pid, threads0)
    show("slow", "after", d.pid, f"threads back in {took:.2f} s; pings={len(latencies)} "
         f"max_latency_s={max(latencies):.3f}")

    assert d.stop() == 0
    log = d.log_text()
    assert_no_errors(log)
    reasons = collections.Counter(reason for _, reason, *_ in access_events(log))
    assert reasons == {"idle": 20, "slow": 20, "eof": len(latencies) + 1}


# -- 3. a client that never reads --------------------------------------------------------

SEND_S = 2.0


def test_client_that_never_reads_is_cut_after_send_timeout_and_memory_stays_flat(tsechod) -> None:
    d = tsechod(f"[server]\nidle_timeout_s = 10\n[limits]\nsend_timeout_s = {SEND_S}\n")
    rss0, threads0 = baseline(d, "noread")
    chunk = (b"y" * 1023 + b"\n") * 1024  # 1 MiB of 1 KiB lines
    outcome: dict[str, object] = {}

    def flood_without_reading() -> None:
        sock = connect_from(d.address)
        sock.setblocking(False)
        writable = selectors.DefaultSelector()
        writable.register(sock, selectors.EVENT_WRITE)
        sent = 0
        last_progress = time.monotonic()
        try:
            while sent < 50 * MIB and time.monotonic() - last_progress < SEND_S + 10:
                if not writable.select(0.5):
                    continue
                try:
                    sent += sock.send(memoryview(chunk)[sent % MIB:])
                    last_progress = time.monotonic()
                except BlockingIOError:
                    continue
                except (ConnectionResetError, BrokenPipeError) as err:
                    outcome["end"] = type(err).__name__
                    break
        finally:
            outcome["sent"] = sent
            outcome["stuck_s"] = time.monotonic() - last_progress
            writable.close()
            sock.close()

    writer = threading.Thread(target=flood_without_reading)
    latencies = []
    with PeakSampler(d.pid) as peak:
        writer.start()
        while writer.is_alive() and len(latencies) < 200:
            latencies.append(ping(d.address, b"meanwhile"))
            writer.join(timeout=0.2)
        writer.join(timeout=SEND_S + 20)
    rss_during = peak.peak_rss
    print(f"FIGURES noread    client       sent={outcome['sent'] / MIB:.1f} MiB of 50, "  # type: ignore[operator]
          f"cut {outcome['stuck_s']:.2f} s after its last progress by {outcome.get('end')}")
    show("noread", "during-peak", d.pid, f"peak_rss={rss_during:.1f} MiB peak_threads={peak.peak_threads}")
    assert outcome.get("end") in ("ConnectionResetError", "BrokenPipeError"), outcome
    assert outcome["sent"] < 50 * MIB  # type: ignore[operator]
    assert SEND_S - 0.5 < outcome["stuck_s"] < SEND_S + 1.5, outcome  # type: ignore[operator]
    assert rss_during - rss0 < 32, (rss0, rss_during)
    assert latencies and max(latencies) < 1.0, latencies
    took = settle(d.pid, threads0)
    show("noread", "after", d.pid, f"threads back in {took:.2f} s; pings={len(latencies)} "
         f"max_latency_s={max(latencies):.3f}")

    assert d.stop() == 0
    log = d.log_text()
    assert_no_errors(log)
    stalled = [e for e in access_events(log) if e[1] == "stalled"]
    assert len(stalled) == 1 and stalled[0][3] < 50 * MIB, stalled
    print(f"FIGURES noread    log          bytes_in={stalled[0][3] / MIB:.1f} MiB "
          f"bytes_out={stalled[0][4] / MIB:.1f} MiB")


# -- 4. one huge line --------------------------------------------------------------------


def test_8_mib_without_newline_gets_err_close_and_no_memory_growth(tsechod) -> None:
    d = tsechod("[limits]\nsend_timeout_s = 2\n")
    rss0, threads0 = baseline(d, "oversize")
    with PeakSampler(d.pid) as peak:
        with connect_from(d.address) as sock:
            # All 8 MiB go out: after its ERR line tsechod reads and drops the rest of a
            # sender's bytes for a moment, so that closing doesn't reset the connection.
            sock.settimeout(10)
            sock.sendall(b"z" * (8 * MIB))
            sock.shutdown(socket.SHUT_WR)
            received, how = read_to_end(sock)
        assert (received, how) == (b"ERR line too long (max 65536 bytes)\n", "fin")

        # The same with nc, the tool people use: it prints the ERR line every time.
        nc = require_tool("nc")
        command = f"head -c {8 * MIB} /dev/zero | tr '\\0' z | {nc} -N {d.host} {d.port}"
        for _ in range(5):
            result = subprocess.run(command, shell=True, capture_output=True, timeout=30)
            assert result.stdout == b"ERR line too long (max 65536 bytes)\n", result
    show("oversize", "during-peak", d.pid, f"peak_rss={peak.peak_rss:.1f} MiB peak_threads={peak.peak_threads}")
    assert peak.peak_rss - rss0 < 16, (rss0, peak.peak_rss)
    settle(d.pid, threads0)
    show("oversize", "after", d.pid)
    assert d.stop() == 0
    log = d.log_text()
    assert_no_errors(log)
    assert [e[1] for e in access_events(log)] == ["eof"] + ["too-long"] * 6


# -- 5. garbage --------------------------------------------------------------------------


def echoed(data: bytes, reply: bytes) -> None:
    """Assert *reply* is every line of *data* (the last one perhaps unfinished) echoed behind a stamp."""
    lines = data.split(b"\n")
    if lines[-1] == b"":
        lines.pop()
    got = reply.split(b"\n")
    assert got.pop() == b""  # every reply line complete
    assert len(got) == len(lines)
    for sent, answer in zip(lines, got):
        assert CTIME_REPLY.match(answer) and answer.split(b"] ", 1)[1] == sent, (sent[:80], answer[:80])


def exchange(address: tuple[str, int], data: bytes) -> tuple[bytes, str]:
    """Send *data*, half-close, read everything back: (reply bytes, 'fin' or 'reset')."""
    with connect_from(address, timeout=10) as sock:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        return read_to_end(sock, timeout=10)


def test_garbage_never_hurts_the_daemon(tsechod) -> None:
    d = tsechod("[server]\nidle_timeout_s = 5\n")
    rss0, threads0 = baseline(d, "garbage")
    rng = random.Random(5)
    connections = 1

    # Random bytes but 0xFF (telnet's IAC), and no CR NUL (telnet's Enter): echoed exactly.
    plain = bytes(b for b in rng.randbytes(1 * MIB) if b != 0xFF).replace(b"\r\x00", b"\r.")
    reply, how = exchange(d.address, plain)
    echoed(plain, reply)
    assert how == "fin"
    # NULs, invalid UTF-8 (overlong, surrogates, lone continuation bytes), control characters.
    nasty = (b"\x00" * 100 + b"\n") * 100 + (
        b"\xc3\x28 \xa0\xa1 \xe2\x28\xa1 \xf0\x28\x8c\xbc \xed\xa0\x80 \xc0\xaf \xf8\x88\x80\x80\x80\n"
        b"\x1b[2J\x1b]0;pwned\x07 fake\n2026-01-01 ERROR tsecho: forged\r\n\x7f\x08\x08\n"
    ) * 50
    reply, how = exchange(d.address, nasty)
    echoed(nasty, reply)
    assert how == "fin"
    connections += 2

    # Fully random bytes, IAC included: telnet commands are eaten, an IAC IP ends the connection.
    for seed in range(3):
        reply, how = exchange(d.address, random.Random(seed).randbytes(256 * 1024))
        assert how in ("fin", "reset")
        assert all(STAMPED.fullmatch(line) for line in reply.split(b"\n")[:-1])
        ping(d.address, b"after random")
        connections += 2

    # A telnet negotiation storm: 1 MiB of options, subnegotiations and NOPs, then one real line.
    storm = bytes([255, 251, 1, 255, 253, 3, 255, 241, 255, 250, 24, 0] + list(b"xterm") + [255, 240]) * 50000
    started = time.monotonic()
    reply, how = exchange(d.address, storm + b"after the storm\n")
    print(f"FIGURES garbage   iac-storm    {len(storm) / MIB:.1f} MiB of telnet commands "
          f"filtered in {time.monotonic() - started:.2f} s")
    assert how == "fin" and CTIME_REPLY.match(reply) and reply.endswith(b"] after the storm\n") \
        and reply.count(b"\n") == 1, reply[:200]
    connections += 1

    # Port-scanner manners: connect and leave at once, connect and reset, reset mid-line.
    connect_from(d.address).close()
    reset(connect_from(d.address))
    half = connect_from(d.address)
    half.sendall(b"whole\n")
    recv_lines(half, 1)  # its handler is running, waiting for the next line
    half.sendall(b"half a li")
    reset(half)
    connections += 3
    for _ in range(3):
        ping(d.address, b"still serving")
        connections += 1
    wait_until(lambda: len(access_events(d.log_text())) == connections)
    settle(d.pid, threads0)
    show("garbage", "after", d.pid)

    log = d.log_text()
    reasons = collections.Counter(reason for _, reason, *_ in access_events(log))
    assert reasons["reset"] >= 1 and reasons["error"] == 0, reasons
    # Nothing but the access events (and the startup line, and where cpu_affinity put us) in the log.
    others = [line for line in log.splitlines()
              if not ACCESS.search(line) and "listening on" not in line and "tsecho.affinity" not in line]
    assert others == []
    assert d.stop() == 0


# -- 6. graceful stop under load ---------------------------------------------------------

SHUTDOWN_S = 3.0


def test_sigterm_under_load_answers_what_arrived_and_closes_every_connection_with_fin(tsechod) -> None:
    d = tsechod(f"[server]\nshutdown_timeout_s = {SHUTDOWN_S}\nidle_timeout_s = 10\n")
    rss0, threads0 = baseline(d, "stop")
    load = Pipeliner(d.address, 50, window=16).start()
    try:
        wait_until(lambda: all(c.replies >= 100 for c in load.clients), timeout=30)
        show("stop", "during", d.pid, f"replies so far={load.replies}")
        stop_sent = []
        load.mark(lambda: (os.kill(d.pid, signal.SIGTERM), stop_sent.append(time.monotonic())))
        assert d.proc.wait(timeout=SHUTDOWN_S + 5) == 0
        stop_took = time.monotonic() - stop_sent[0]
        load.wait_ended(timeout=5)
    finally:
        load.stop()
    print(f"FIGURES stop      exit         code=0 after {stop_took:.2f} s (shutdown_timeout_s={SHUTDOWN_S}); "
          f"replies={load.replies}")
    assert stop_took < SHUTDOWN_S
    for client in load.clients:
        assert client.end == "fin", (client.n, client.end)  # never a reset
        assert client.tail == b"", (client.n, client.tail)  # never half a line
        assert client.bad == [], (client.n, client.bad[:3])
        assert client.replies >= client.sent_at_mark, (client.n, client.replies, client.sent_at_mark)

    log = d.log_text()
    assert_no_errors(log)
    events = {peer: (reason, lines) for peer, reason, lines, *_ in access_events(log)}
    assert len(access_events(log)) == 51  # the ping and the 50
    for client in load.clients:
        reason, lines = events[client.peer]
        assert lines == client.replies and reason in ("shutdown", "eof"), (client.peer, reason, lines)


# -- 7. reload under load ----------------------------------------------------------------


def test_ten_reloads_under_load_drop_nothing_and_switch_the_style(tsechod) -> None:
    d = tsechod('[server]\nshutdown_timeout_s = 3\n[echo]\ntimestamp = "ctime"\n')
    rss0, threads0 = baseline(d, "reload")
    load = Pipeliner(d.address, 50, window=4).start()
    try:
        wait_until(lambda: all(c.replies >= 20 for c in load.clients), timeout=30)
        show("reload", "during", d.pid)
        for k in range(1, 11):
            style = "iso" if k % 2 else "ctime"
            d.rewrite_config(f'[server]\nshutdown_timeout_s = 3\n[echo]\ntimestamp = "{style}"\n')
            d.proc.send_signal(signal.SIGHUP)
            d.wait_for_log(r"reloaded config: timestamp=", count=k)
            # Every connection switches: its replies arrive in the new style.
            wait_until(lambda: all(c.last_style == style for c in load.clients), timeout=10)
        ended = [c.n for c in load.clients if c.end is not None]
        assert ended == []  # zero dropped connections
        show("reload", "after-10", d.pid, f"replies={load.replies} {dict(load.styles)}")
        assert d.stop() == 0
        load.wait_ended(timeout=5)
    finally:
        load.stop()
    for client in load.clients:
        assert client.bad == [], (client.n, client.bad[:3])
        assert client.style_changes >= 10, (client.n, client.style_changes)
        assert client.end == "fin" and client.tail == b""
    log = d.log_text()
    assert_no_errors(log)
    assert len(re.findall("reloaded config", log)) == 10
    assert len(access_events(log)) == 51


# -- 8. log reopen under load ------------------------------------------------------------


def test_log_reopen_under_churn_loses_and_doubles_no_access_event(tsechod, tmp_path: Path) -> None:
    log = tmp_path / "tsechod.log"
    d = tsechod('[log]\nlog_target = "file"\nlog_file = "tsechod.log"\n[server]\nshutdown_timeout_s = 3\n',
                wait=False)
    match = wait_until(lambda: log.exists() and re.search(r"listening on (\S+)", log.read_text()))
    d.addresses = [match[1]]  # type: ignore[index]
    rss0, threads0 = show("reopen", "baseline", d.pid)
    made: list[str] = []
    failures: list[str] = []
    stop = threading.Event()

    def churn(n: int) -> None:
        source = f"127.0.0.{10 + n}"  # each its own address, as 50 different hosts would be
        for i in range(100000):
            # At most ~20 connections a second each: load, not a CPU-saturating storm, in
            # which tsechod rightly starts answering "ERR server busy" (see docs/security.md).
            if stop.wait(0.05):
                return
            try:
                with connect_from(d.address, source) as sock:
                    made.append(peer_of(sock.getsockname()))
                    sock.sendall(b"churn %d %d\n" % (n, i))
                    [reply] = recv_lines(sock, 1)
                    if not reply.endswith(b"] churn %d %d" % (n, i)):
                        failures.append(repr(reply))
            except OSError as err:
                failures.append(f"{n}/{i}: {err!r}")

    churners = [threading.Thread(target=churn, args=(n,)) for n in range(50)]
    for t in churners:
        t.start()
    try:
        for k in range(1, 6):
            wait_until(lambda: len(made) >= 300 * k, timeout=30)
            log.rename(tmp_path / f"tsechod.log.{k}")
            d.proc.send_signal(signal.SIGUSR1)
            wait_until(log.exists)
        wait_until(lambda: len(made) >= 300 * 6, timeout=30)
        show("reopen", "during", d.pid, f"connections so far={len(made)}")
    finally:
        stop.set()
        for t in churners:
            t.join(timeout=20)
    assert failures == []
    assert d.stop() == 0
    texts = [log.read_text()] + [(tmp_path / f"tsechod.log.{k}").read_text() for k in range(1, 6)]
    logged = collections.Counter(peer for text in texts for peer, *_ in access_events(text))
    print(f"FIGURES reopen    result       connections={len(made)} access_events={sum(logged.values())} "
          f"files={len(texts)}")
    assert logged == collections.Counter(made)  # none lost, none doubled
    assert all(access_events(text) for text in texts), [len(access_events(text)) for text in texts]
    for text in texts:
        assert_no_errors(text)
