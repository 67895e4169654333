"""An in-process EchoServer on 127.0.0.1:0, real client sockets, the clock fixed."""

from __future__ import annotations

import socket
import struct
import threading
import time

import pytest

from helpers import STAMP, fan_out, recv_all, recv_lines, recv_until, wait_until

from tsecho.handler import HOT_WAIT_S, SMALL_RECV_BYTES
from tsecho.server import EchoServer


def test_echoes_each_line_with_timestamp(server: EchoServer) -> None:
    with socket.create_connection(server.server_address, timeout=2) as sock:
        sock.sendall(b"a\r\nb\n")
        assert recv_until(sock, 2) == STAMP + b" a\r\n" + STAMP + b" b\n"


def test_replies_to_one_read_leave_in_order(server: EchoServer) -> None:
    lines = [b"line %d" % i for i in range(500)]
    with socket.create_connection(server.server_address, timeout=5) as sock:
        sock.sendall(b"\n".join(lines) + b"\n")
        assert recv_lines(sock, 500) == [STAMP + b" " + line for line in lines]


def test_many_concurrent_clients_each_get_their_own_replies(server: EchoServer) -> None:
    failures: list[str] = []

    def client(n: int) -> None:
        try:
            with socket.create_connection(server.server_address, timeout=10) as sock:
                for i in range(10):
                    sock.sendall(b"client %d line %d\n" % (n, i))
                    [reply] = recv_lines(sock, 1)
                    if reply != STAMP + b" client %d line %d" % (n, i):
                        failures.append(repr(reply))
        except OSError as err:
            failures.append(f"client {n}: {err}")

    fan_out(50, client, timeout=30)
    assert failures == []


def test_plain_reads_and_telnet_commands_split_across_reads_answer_alike(server: EchoServer) -> None:
    # Plain reads of whole lines take the line loop's fast path; the others go through the
    # telnet filter and the decoder. A command or a CR NUL cut by a read boundary must still
    # be removed, and the fast path must not resume before the filter is between commands.
    pieces = [
        (b"plain one\n", [b"plain one\n"]),
        (b"two \xff", []),  # IAC: the rest of the command comes with the next read
        (b"\xfb\x01rest\n", [b"two rest\n"]),
        (b"abc\r", []),  # telnet's Enter is CR NUL; the NUL comes next
        (b"\x00def\n", [b"abc\r\n", b"def\n"]),
        (b"plain again\n", [b"plain again\n"]),
    ]
    with socket.create_connection(server.server_address, timeout=5) as sock:
        for piece, replies in pieces:
            sock.sendall(piece)
            if replies:  # wait for them, so the next piece is another read
                expected = b"".join(STAMP + b" " + line for line in replies)
                assert recv_until(sock, len(replies)) == expected


def test_half_close_gets_the_partial_last_line_answered(server: EchoServer) -> None:
    with socket.create_connection(server.server_address, timeout=2) as sock:
        sock.sendall(b"one\npartial")
        sock.shutdown(socket.SHUT_WR)
        assert recv_all(sock) == STAMP + b" one\n" + STAMP + b" partial\n"


def test_idle_client_is_disconnected_after_timeout(server_factory) -> None:
    server = server_factory(idle_timeout_s=0.3)
    with socket.create_connection(server.server_address, timeout=5) as sock:
        started = time.monotonic()
        assert recv_all(sock) == b""
        assert 0.25 < time.monotonic() - started < 3


def test_too_long_line_gets_err_and_close(server_factory) -> None:
    server = server_factory(max_line_bytes=10)
    with socket.create_connection(server.server_address, timeout=2) as sock:
        sock.sendall(b"short\n" + b"x" * 11 + b"\n")
        assert recv_all(sock) == STAMP + b" short\n" + b"ERR line too long (max 10 bytes)\n"


def test_shutdown_with_a_client_connected_finishes_within_the_timeout(server_factory) -> None:
    server = server_factory(shutdown_timeout_s=2.0)
    with socket.create_connection(server.server_address, timeout=5) as sock:
        sock.sendall(b"before\n")
        assert recv_lines(sock, 1) == [STAMP + b" before"]
        wait_until(lambda: server.state.connections == 1)
        started = time.monotonic()
        server.state.begin_stop(2.0)
        assert recv_all(sock) == b""  # our FIN, not a reset
        sock.close()
        assert server.state.wait_closed(3.0) == 0
        assert time.monotonic() - started < 2.5


def test_stop_answers_lines_already_received(server_factory) -> None:
    server = server_factory(shutdown_timeout_s=2.0)
    with socket.create_connection(server.server_address, timeout=5) as sock:
        sock.sendall(b"first\n")
        recv_lines(sock, 1)
        # Park the handler in poll(), then queue lines and stop at once.
        sock.sendall(b"queued 1\nqueued 2\n")
        server.state.begin_stop(2.0)
        data = recv_all(sock)
    assert data == STAMP + b" queued 1\n" + STAMP + b" queued 2\n"


@pytest.mark.parametrize("partial", [b"", b"half a line"], ids=["idle", "slow"])
def test_timeouts_after_a_line_are_not_late_by_the_hot_wait(server_factory, partial: bytes) -> None:
    # After a reply the handler waits HOT_WAIT_S in a blocking recv() before poll(): that
    # poll must wait only what is left until the deadline, not the whole timeout again.
    server = server_factory(idle_timeout_s=0.3, line_timeout_s=0.3)
    socks = [socket.create_connection(server.server_address, timeout=5) for _ in range(3)]
    late = []
    try:
        for sock in socks:  # three at once: the quickest shows the code's delay, not the load's
            sock.sendall(b"line\n" + partial)
        for sock in socks:
            assert recv_lines(sock, 1) == [STAMP + b" line"]
        answered = time.monotonic()
        for sock in socks:
            assert recv_all(sock) == b""
            late.append(time.monotonic() - answered - 0.3)
    finally:
        for sock in socks:
            sock.close()
    assert min(late) < HOT_WAIT_S * 0.8, late


def test_stop_reaches_connections_it_just_answered_within_the_hot_wait(server_factory) -> None:
    # Each handler is inside its blocking recv() (SO_RCVTIMEO), not poll(): the stop pipe can't
    # wake it, so it must notice the stop when that recv() times out, HOT_WAIT_S later.
    server = server_factory(shutdown_timeout_s=5.0)
    socks = [socket.create_connection(server.server_address, timeout=5) for _ in range(20)]
    try:
        for i, sock in enumerate(socks):
            sock.sendall(b"busy %d\n" % i)
        for i, sock in enumerate(socks):
            assert recv_lines(sock, 1) == [STAMP + b" busy %d" % i]
        started = time.monotonic()
        server.state.begin_stop(5.0)
        took = []
        for sock in socks:
            assert recv_all(sock) == b""  # our FIN, not a reset
            took.append(time.monotonic() - started)
    finally:
        for sock in socks:
            sock.close()
    # Well under the 5 s the stop allows: the hot wait, plus scheduling on a busy machine.
    assert max(took) < HOT_WAIT_S + 1.0, took
    assert server.state.wait_closed(3.0) == 0


def test_lines_around_the_small_read_size_are_answered_whole(server: EchoServer) -> None:
    # The line loop reads SMALL_RECV_BYTES while reads are small, 64 KiB after a read that
    # filled that: lines straddling the switch, one by one and in a burst, come back whole.
    sizes = [1, SMALL_RECV_BYTES - 2, SMALL_RECV_BYTES - 1, SMALL_RECV_BYTES, SMALL_RECV_BYTES + 1, 3000, 5, 60000, 2]
    lines = [(b"%d:" % size + b"x" * size)[:size] for size in sizes]
    with socket.create_connection(server.server_address, timeout=5) as sock:
        for line in lines:  # one at a time: each read is one line
            sock.sendall(line + b"\n")
            assert recv_lines(sock, 1) == [STAMP + b" " + line]
        sock.sendall(b"".join(line + b"\n" for line in lines))  # all at once: reads cut lines anywhere
        assert recv_lines(sock, len(lines)) == [STAMP + b" " + line for line in lines]


def test_peer_reset_mid_line_leaves_the_server_serving(server: EchoServer) -> None:
    sock = socket.create_connection(server.server_address, timeout=2)
    sock.sendall(b"half a li")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()  # SO_LINGER 0: RST
    with socket.create_connection(server.server_address, timeout=2) as other:
        other.sendall(b"still here\n")
        assert recv_lines(other, 1) == [STAMP + b" still here"]
    wait_until(lambda: server.state.connections == 0)


def test_status_counts_connections_and_lines(server: EchoServer) -> None:
    with socket.create_connection(server.server_address, timeout=2) as sock:
        sock.sendall(b"a\nb\nc\n")
        recv_lines(sock, 3)
        assert server.state.status() == "1 connections, 3 lines, 0 refused"
    wait_until(lambda: server.state.connections == 0)
    assert server.state.status() == "0 connections, 3 lines, 0 refused"


def test_over_max_connections_gets_busy_without_a_thread(server_factory) -> None:
    server = server_factory(max_connections=2)
    held = [socket.create_connection(server.server_address, timeout=2) for _ in range(2)]
    try:
        wait_until(lambda: server.state.connections == 2)
        threads = threading.active_count()
        with socket.create_connection(server.server_address, timeout=2) as extra:
            assert recv_all(extra) == b"ERR server busy\n"
        assert threading.active_count() == threads
        assert server.state.figures().refused == (1, 0, 0, 0)  # busy, per-address, rate, denied
    finally:
        for sock in held:
            sock.close()
