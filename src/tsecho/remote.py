"""Where a tsechod is and how to reach it: the part every ``tsecho`` mode shares.

Owns ``HOST[:PORT]`` parsing (:func:`parse_address`), the client's error type
(:class:`ClientError`, one line a user can act on) and :func:`connect`. The
modes build on it: client.py (lines and replies), probe.py (``tsecho ping`` and
``tsecho check``). Nothing here imports the server side of the package.
"""

from __future__ import annotations

import ipaddress
import socket
from typing import Final

from .address import ListenAddress

DEFAULT_HOST: Final = "127.0.0.1"
DEFAULT_PORT: Final = 8009


# Where the server is: the daemon's own address type, so both print addresses alike.
Address = ListenAddress


class AddressError(ValueError):
    """A ``HOST[:PORT]`` argument that cannot be parsed; the text says why."""


class ClientError(Exception):
    """A failure the user can act on; ``str()`` is the one-line message."""


def parse_address(text: str, default_port: int = DEFAULT_PORT) -> Address:
    """Parse the ``HOST[:PORT]`` argument into an :class:`Address`.

    Accepted: ``""`` (default host and port), ``host``, ``host:port``,
    ``:port`` (default host), ``[v6]``, ``[v6]:port``, and a bare IPv6
    literal such as ``::1`` or ``fe80::1%eth0`` (two or more colons, no
    brackets), which takes the default port: a port needs the brackets.
    Ports must be decimal 1-65535. Raises :class:`AddressError` otherwise.
    The host is not resolved here.
    """
    if text.startswith("["):
        close = text.find("]")
        if close == -1:
            raise AddressError(f"missing ']' in {text!r} (write IPv6 as [::1]:8009)")
        host, rest = text[1:close], text[close + 1 :]
        if not host:
            raise AddressError(f"empty address in brackets in {text!r}")
        if not rest:
            port = default_port
        elif rest.startswith(":"):
            port = _parse_port(rest[1:], text)
        else:
            raise AddressError(f"unexpected {rest!r} after ']' in {text!r}")
    elif text.count(":") >= 2:
        # A bare IPv6 literal: its colons leave no room for a port.
        try:
            ipaddress.IPv6Address(text)
        except ValueError:
            raise AddressError(
                f"{text!r} is neither HOST:PORT nor an IPv6 address (write IPv6 with a port as [::1]:8009)"
            ) from None
        host, port = text, default_port
    elif ":" in text:
        host_text, _, port_text = text.partition(":")
        host, port = host_text or DEFAULT_HOST, _parse_port(port_text, text)
    else:
        host, port = text or DEFAULT_HOST, default_port
    if any(char.isspace() or not char.isprintable() for char in host):
        raise AddressError(f"bad host {host!r} in {text!r}")
    return Address(host, port)


def _parse_port(port_text: str, text: str) -> int:
    if not port_text:
        raise AddressError(f"missing port after ':' in {text!r}")
    if not (port_text.isascii() and port_text.isdigit()) or not 1 <= int(port_text) <= 65535:
        raise AddressError(f"bad port {port_text!r} in {text!r}: must be a number 1-65535")
    return int(port_text)


def describe(err: OSError) -> str:
    """``Connection refused`` -> ``connection refused``: to sit mid-sentence."""
    text = err.strerror or str(err) or type(err).__name__
    return text[:1].lower() + text[1:]


def seconds_text(value: float) -> str:
    """A number of seconds as a message shows it: 5, 0.25."""
    return f"{value:g}"


def connect(address: Address, timeout_s: float) -> socket.socket:
    """Open a TCP connection to *address*, trying each resolved address.

    Returns a blocking socket with *timeout_s* set. Raises
    :class:`ClientError` with an actionable message when the name doesn't
    resolve, the port is refused, or nothing answers within *timeout_s*.
    """
    try:
        return socket.create_connection(address, timeout=timeout_s)
    except socket.gaierror as err:
        raise ClientError(
            f"cannot resolve {address.host!r}: {describe(err)} "
            f"(check the host name, or give an IP address)"
        ) from err
    except ConnectionRefusedError as err:
        raise ClientError(
            f"cannot connect to {address}: connection refused "
            f"(is tsechod running? systemctl status tsechod)"
        ) from err
    except TimeoutError as err:
        raise ClientError(
            f"cannot connect to {address}: no answer within {seconds_text(timeout_s)} s "
            f"(is the host up? a firewall may be dropping packets)"
        ) from err
    except OSError as err:
        raise ClientError(f"cannot connect to {address}: {describe(err)}") from err
