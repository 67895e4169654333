"""The two systemd protocols tsechod speaks, in plain stdlib: sd_notify and socket activation.

- ``notify("READY=1")`` sends one datagram to ``$NOTIFY_SOCKET`` (a path, or an abstract
  socket written ``@name``). Without ``NOTIFY_SOCKET`` it does nothing, so the daemon can call
  it unconditionally; outside systemd every call is a cheap no-op.
- ``listen_fds(os.environ)`` takes over the listening sockets systemd passed in
  (``LISTEN_PID``/``LISTEN_FDS``/``LISTEN_FDNAMES``, fds from 3 on), like ``sd_listen_fds(1)``.
- ``watchdog_interval_s()``, ``monotonic_usec()``/``reloading_message()``
  are the small helpers around them.

No dependency on libsystemd or python-systemd: each protocol is a few lines (see sd_notify(3),
sd_listen_fds(3)). No policy here either: when to send READY=1 or STATUS= is service.py's call.
``environ`` is always a parameter, so tests pass plain dicts.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Mapping, MutableMapping
from typing import Final

logger = logging.getLogger(__name__)

#: sd_listen_fds(3): passed file descriptors start here.
LISTEN_FDS_START: Final = 3
#: A notification is one small datagram; a full receive queue must not hang the daemon.
NOTIFY_TIMEOUT_S: Final = 2.0
_ACTIVATION_VARS: Final = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")


class SocketActivationError(OSError):
    """systemd's socket-activation variables are malformed or name something that isn't a socket.

    An OSError, like a failed bind: the daemon can't get its listeners (exit status 1).
    str() is the one-line message.
    """


def notify(message: str, environ: Mapping[str, str] = os.environ) -> bool:
    """Send *message* (e.g. ``"READY=1"`` or ``"STATUS=3 connections"``) to the service manager.

    The address comes from ``environ["NOTIFY_SOCKET"]``: a filesystem path, or ``@name`` for an
    abstract socket. Returns True when the datagram was sent; False when ``NOTIFY_SOCKET`` is
    unset or empty (not under systemd, or the unit has no notify access), when the address is of
    a kind this module doesn't speak (e.g. ``vsock:``), or when sending failed (the manager went
    away). It never raises for those: a lost notification must not take the daemon down. The
    send waits at most NOTIFY_TIMEOUT_S.
    """
    address = environ.get("NOTIFY_SOCKET", "")
    if not address:
        return False
    if address.startswith("@"):
        target: str | bytes = b"\0" + address[1:].encode()
    elif address.startswith("/"):
        target = address
    else:
        logger.debug("NOTIFY_SOCKET=%r: unsupported address, not notifying", address)
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.settimeout(NOTIFY_TIMEOUT_S)
            sock.connect(target)
            sock.sendall(message.encode())
    except OSError as err:
        logger.debug("sd_notify to %s failed: %s", address, err)
        return False
    return True


def listen_fds_with_names(environ: MutableMapping[str, str]) -> list[tuple[str, socket.socket]]:
    """Like :func:`listen_fds`, but each socket comes with its ``FileDescriptorName=``.

    A name systemd didn't give (no ``LISTEN_FDNAMES``) is ``"unknown"``, as in
    sd_listen_fds_with_names(3).
    """
    try:
        pid_text = environ.get("LISTEN_PID")
        count_text = environ.get("LISTEN_FDS")
        names_text = environ.get("LISTEN_FDNAMES")
    finally:
        # sd_listen_fds(1) unsets them whatever happens next, so that children we start
        # (none today) don't take our sockets for theirs.
        for name in _ACTIVATION_VARS:
            environ.pop(name, None)
    if pid_text is None or count_text is None:
        return []
    try:
        pid = int(pid_text)
        count = int(count_text)
    except ValueError:
        raise SocketActivationError(
            f"socket activation: LISTEN_PID={pid_text!r} LISTEN_FDS={count_text!r}: "
            "not numbers (check the .socket unit)"
        ) from None
    if pid != os.getpid():
        return []  # meant for another process (we were forked or exec'd on); not ours
    if count < 0:
        raise SocketActivationError(f"socket activation: LISTEN_FDS={count}: negative")
    names = names_text.split(":") if names_text else []
    if names and len(names) != count:
        raise SocketActivationError(
            f"socket activation: LISTEN_FDNAMES={names_text!r} has {len(names)} names "
            f"for LISTEN_FDS={count}"
        )
    names = names or ["unknown"] * count
    result: list[tuple[str, socket.socket]] = []
    for fd in range(LISTEN_FDS_START, LISTEN_FDS_START + count):
        # Ours alone: a process we might exec must not inherit the listening sockets.
        os.set_inheritable(fd, False)
        try:
            sock = socket.socket(fileno=fd)
        except OSError as err:
            for _, taken in result:
                taken.close()
            raise SocketActivationError(
                f"socket activation: fd {fd} is not a socket ({err.strerror}); "
                "tsechod takes only ListenStream= sockets"
            ) from None
        result.append((names[fd - LISTEN_FDS_START], sock))
    return result


def listen_fds(environ: MutableMapping[str, str]) -> list[socket.socket]:
    """Return the sockets systemd passed to this process (socket activation), else ``[]``.

    Reads ``LISTEN_PID`` (must equal ``os.getpid()``, otherwise the fds are someone else's and
    ``[]`` is returned), ``LISTEN_FDS`` (how many, starting at fd 3) and ``LISTEN_FDNAMES``.
    The fds are marked close-on-exec and the three variables are removed from *environ* in
    every case, as ``sd_listen_fds(1)`` does; pass ``os.environ`` to really unset them.
    Raises SocketActivationError when the variables are malformed or an fd is not a socket.
    """
    return [sock for _, sock in listen_fds_with_names(environ)]


def watchdog_interval_s(environ: Mapping[str, str] = os.environ) -> float | None:
    """The unit's watchdog timeout in seconds (``WatchdogSec=``), or None when there is none.

    Set when ``WATCHDOG_USEC`` is a positive integer and ``WATCHDOG_PID``, if present, is this
    process. The daemon must send ``WATCHDOG=1`` more often than this; systemd recommends every
    half of it (sd_watchdog_enabled(3)). Malformed values count as no watchdog.
    """
    try:
        usec = int(environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    if usec <= 0:
        return None
    pid_text = environ.get("WATCHDOG_PID")
    if pid_text is not None:
        try:
            if int(pid_text) != os.getpid():
                return None
        except ValueError:
            return None
    return usec / 1_000_000


def unit_instance(environ: Mapping[str, str] = os.environ, cgroup_path: str = "/proc/self/cgroup") -> str:
    """The name of this service for ``{instance}`` in the reply prefix.

    Under systemd (INVOCATION_ID set) the unit is the ``*.service`` component of
    our cgroup (``0::/system.slice/system-tsechod.slice/tsechod@b.service``): a
    template unit gives its instance (``b``), any other unit its name without
    ``.service`` (``tsechod-b``). Elsewhere, or if the cgroup says nothing, the
    process id: distinct per process, which is what the prefix is for.
    """
    if environ.get("INVOCATION_ID"):
        try:
            with open(cgroup_path, encoding="utf-8", errors="replace") as file:
                text = file.read(65536)
        except OSError:
            text = ""
        for line in text.splitlines():
            for part in reversed(line.rpartition(":")[2].split("/")):
                if part.endswith(".service"):
                    unit = part.removesuffix(".service")
                    return unit.partition("@")[2] or unit
    return str(os.getpid())


def monotonic_usec() -> int:
    """CLOCK_MONOTONIC in microseconds, the clock systemd expects in ``MONOTONIC_USEC=``."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


def reloading_message() -> str:
    """The notification that starts a reload: ``RELOADING=1`` with ``MONOTONIC_USEC=`` now.

    Send ``READY=1`` once the reload is done, whether or not the new config was taken.
    """
    return f"RELOADING=1\nMONOTONIC_USEC={monotonic_usec()}"
