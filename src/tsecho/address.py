"""Addresses as tsecho writes and reads them: ``127.0.0.1:8009`` and ``[::1]:8009``.

Owns ``ListenAddress`` (a host and a port, parsed strictly from ``host:port``),
and ``peer_name`` (a socket address tuple shown the same way, without any name
lookup). Config, the server's logs and the client all print addresses through
this module, so they print them alike. No sockets are opened here.
"""

from __future__ import annotations

import re
from ipaddress import IPv4Address, IPv6Address, ip_address
from typing import Any, Final, NamedTuple

_LISTEN_EXAMPLE: Final = "expected host:port, e.g. 127.0.0.1:8009 or [::1]:8009"
_HOSTNAME_RE: Final = re.compile(
    r"(?=.{1,253}\.?\Z)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?\Z",
    re.ASCII,
)
_PORT_RE: Final = re.compile(r"[0-9]{1,5}\Z", re.ASCII)
_NUMERIC_HOST_RE: Final = re.compile(r"[0-9.]+\Z", re.ASCII)
_SHOWN_CHARS: Final = 120  # longer texts are cut in error messages


class ListenAddress(NamedTuple):
    """One address to listen on. ``str()`` gives ``127.0.0.1:8009`` or ``[::1]:8009``."""

    host: str
    port: int

    def __str__(self) -> str:
        if ":" in self.host:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"


def peer_name(address: tuple[Any, ...]) -> str:
    """A socket address as '127.0.0.1:51544' or '[::1]:51544', without any name lookup."""
    host, port = address[0], address[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def shown(text: str) -> str:
    """*text* quoted for a one-line message, cut if long, control characters escaped."""
    if len(text) > _SHOWN_CHARS:
        text = text[:_SHOWN_CHARS] + "..."
    return "'" + one_line(text) + "'"


def one_line(text: str) -> str:
    """*text* with control characters escaped, so a message stays on one line."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def parse_listen(text: str) -> ListenAddress:
    """Parse ``host:port`` or ``[v6]:port`` into a ListenAddress.

    The host is an IPv4 literal, a bracketed IPv6 literal (a ``%zone`` is
    allowed) or a host name; IP literals are normalised (``[0::1]`` -> ``::1``).
    The port is 0-65535 (0 picks a free port).  Raises ValueError whose message
    names the text and says what is wrong.
    """

    def bad(reason: str) -> ValueError:
        return ValueError(one_line(f"invalid listen address {shown(text)}: {reason}"))

    if not text:
        raise ValueError(f"empty listen address ({_LISTEN_EXAMPLE})")
    if text.startswith("["):
        close = text.find("]")
        if close < 0:
            raise bad(f"missing ']' after the IPv6 address ({_LISTEN_EXAMPLE})")
        host, rest = text[1:close], text[close + 1 :]
        if not rest.startswith(":"):
            raise bad(f"missing ':port' after ']' ({_LISTEN_EXAMPLE})")
        port_text = rest[1:]
        try:
            addr = ip_address(host)
        except ValueError:
            raise bad(f"{shown(host)} in brackets is not an IPv6 address") from None
        if not isinstance(addr, IPv6Address):
            raise bad(f"brackets are only for IPv6 addresses; write {host}:{port_text}")
        host = str(addr)
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep:
            raise bad(f"missing port ({_LISTEN_EXAMPLE})")
        if ":" in host:
            raise bad("an IPv6 address must be in brackets, e.g. [::1]:8009")
        if not host:
            raise bad("missing host (use 0.0.0.0 or [::] for every address)")
        try:
            addr = ip_address(host)
        except ValueError:
            if _NUMERIC_HOST_RE.match(host):
                raise bad(f"{shown(host)} is not a valid IPv4 address") from None
            if not _HOSTNAME_RE.match(host):
                raise bad(f"{shown(host)} is not an IP address or a valid host name") from None
            host = host.lower()
        else:
            assert isinstance(addr, IPv4Address)
            host = str(addr)
    if not _PORT_RE.match(port_text) or int(port_text) > 65535:
        raise bad(f"port {shown(port_text)} is not a number 0-65535")
    return ListenAddress(host, int(port_text))
