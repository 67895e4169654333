"""``tsechod --stdio``: serve exactly one connection on fd 0 and fd 1, for a superserver.

inetd, xinetd, tcpserver (ucspi-tcp), socat's ``EXEC:`` and systemd's
``Accept=yes`` sockets start one process per connection with the connection
on fd 0 (read) and fd 1 (write): one socket on both, or two pipes. This module
takes those fds over and runs the daemon's own ``EchoHandler`` on them in the
main thread, with a ``ServerState`` of its own, so the protocol, telnet
handling, limits, timeouts and ERR lines are the daemon's. There is no
listener, no pid file and no other thread.

The process's fds 0 and 1 (and 2, when a superserver made stderr the
connection too, as inetd and xinetd do) are pointed at /dev/null once taken:
nothing but the handler ever writes to the peer.

Exit status (cli.py picks it from ``serve_stdio``'s answer): 0 when the
connection ended, whatever the access event's reason; 1 when tsechod failed
(reason=error, or fds it cannot use).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import socket
import stat
from collections.abc import Mapping
from typing import Final

from .address import peer_name
from .config import Config
from .handler import EchoHandler, Pipes, log_access
from .state import Connection, ServerState, Stream

logger = logging.getLogger(__name__)

STDIO_SIGNALS: Final = (signal.SIGTERM, signal.SIGINT)
# Shown as the peer when neither the socket nor the superserver says who it is.
UNKNOWN_PEER: Final = "stdio"
SYSLOG_SOCKET: Final = "/dev/log"


class StdioError(OSError):
    """fd 0 or fd 1 can't carry a connection; str() is the one-line message (exit 1)."""


@dataclasses.dataclass
class Stdio:
    """The connection taken from fds 0 and 1, and who is on the other end."""

    stream: Stream
    peer: str
    address: tuple[str, int]
    stderr_was_connection: bool


def take_stdio(environ: Mapping[str, str]) -> Stdio:
    """Take fds 0 and 1 over as the connection; point them (and a connected fd 2) at /dev/null.

    The peer: the socket's own peer address when fd 0 is a TCP socket; else what
    the superserver says in the environment (TCPREMOTEIP/TCPREMOTEPORT from
    tcpserver, SOCAT_PEERADDR/SOCAT_PEERPORT from socat, REMOTE_HOST from
    xinetd); else "stdio". Raises StdioError when fd 0 or 1 is closed or unusable.
    """
    try:
        st_in, st_out = os.fstat(0), os.fstat(1)
    except OSError as err:
        raise StdioError(f"--stdio: fd 0 and fd 1 must be open (the connection): {err.strerror}") from None
    try:
        st_err: os.stat_result | None = os.fstat(2)
    except OSError:
        st_err = None
    same = (st_in.st_dev, st_in.st_ino) == (st_out.st_dev, st_out.st_ino)
    address: tuple[str, int] | None = None
    stream: Stream
    if stat.S_ISSOCK(st_in.st_mode) and same:
        sock = socket.socket(fileno=os.dup(0))
        if sock.type != socket.SOCK_STREAM:
            sock.close()
            raise StdioError("--stdio: fd 0 is a datagram socket; tsechod serves a stream (TCP) connection")
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            try:
                address = sock.getpeername()[:2]
            except OSError:
                pass  # the peer already left: the handler will read the end of file
        stream = sock
    else:
        stream = Pipes(os.dup(0), os.dup(1))
    devnull = os.open(os.devnull, os.O_RDWR)
    stderr_was_connection = st_err is not None and any(
        (st_err.st_dev, st_err.st_ino) == (s.st_dev, s.st_ino) for s in (st_in, st_out))
    os.dup2(devnull, 0)
    os.dup2(devnull, 1)
    if stderr_was_connection:
        os.dup2(devnull, 2)
    os.close(devnull)
    peer, address = _peer(address, environ)
    return Stdio(stream, peer, address, stderr_was_connection)


def _peer(address: tuple[str, int] | None, environ: Mapping[str, str]) -> tuple[str, tuple[str, int]]:
    """The peer as shown in the access event, and as an address tuple."""
    if address is None:
        for host_var, port_var in (("TCPREMOTEIP", "TCPREMOTEPORT"), ("SOCAT_PEERADDR", "SOCAT_PEERPORT")):
            host, port_text = environ.get(host_var, ""), environ.get(port_var, "")
            if host and host.isprintable() and " " not in host and port_text.isdigit():
                address = (host, int(port_text))
                break
    if address is not None:
        return peer_name(address), address
    remote = environ.get("REMOTE_HOST", "")  # xinetd: the address only
    if remote and remote.isprintable() and " " not in remote:
        return remote, (remote, 0)
    return UNKNOWN_PEER, (UNKNOWN_PEER, 0)


def stdio_log_config(config: Config, stdio: Stdio) -> Config:
    """*config*, with logs sent to syslog when they would go to stderr and stderr was the connection.

    Under inetd and xinetd fd 2 is the connection too; it is /dev/null by now, so
    without syslog (no /dev/log) the logs of such a process are lost: set
    log_target = "file" or "syslog" there (docs/operations.md).
    """
    if config.log_target == "stderr" and stdio.stderr_was_connection:
        try:
            if stat.S_ISSOCK(os.stat(SYSLOG_SOCKET).st_mode):
                return dataclasses.replace(config, log_target="syslog")
        except OSError:
            pass
    return config


def serve_stdio(config: Config, stdio: Stdio) -> int:
    """Serve the one connection until it ends; return the exit status (0, or 1 on a failure).

    SIGTERM or SIGINT stops it as they stop the daemon: what has arrived is
    answered, then the connection is closed within shutdown_timeout_s.
    SIGHUP and SIGUSR1 (a daemon's reload and reopen) are ignored: a
    connection is short, and the next one reads the config afresh.
    """
    state = ServerState(config)
    served = False  # the connection is over: a stop signal now has nothing to stop

    def stop(signum: int, _frame: object) -> None:
        # socat and others send SIGTERM once our end closed, while we write the access
        # event and exit: by then the stop pipe may be closed under this handler.
        if not served and not state.stopping:
            state.begin_stop(config.shutdown_timeout_s)

    for signum in STDIO_SIGNALS:
        signal.signal(signum, stop)
    for signum in (signal.SIGHUP, signal.SIGUSR1):
        signal.signal(signum, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, (*STDIO_SIGNALS, signal.SIGHUP, signal.SIGUSR1))
    conn = Connection(stdio.stream, stdio.address)
    conn.peer = stdio.peer
    conn.ip = stdio.address[0]
    try:
        EchoHandler(stdio.stream, stdio.address, None, state, conn)
    except Exception:
        logger.exception("%s internal error; connection closed", conn.peer)
    finally:
        served = True
        stdio.stream.close()  # the peer has its end of file before the access event is written
        log_access(conn)
        state.close()
    return 1 if conn.reason == "error" else 0
