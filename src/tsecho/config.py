"""Configuration: the Config dataclass, the registry of keys, and loading it.

Owns every setting's name, default, validation and help text (``KEYS``), and
the precedence rule: built-in defaults < TOML file < ``TSECHOD_*`` environment
< command-line flags; and which keys a reload can change (``Key.reloadable``).
``load_config()`` returns a ``Config`` or raises
``ConfigError``; it never logs, never exits and never reads ``os.environ``
itself (the caller passes the environment in).  No sockets here; binding is
server.py's job.
"""

from __future__ import annotations

import difflib
import math
import os
import re
import select
import shlex
import stat
import string
import time
import tomllib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Final, cast

from . import affinity
from .access import AccessRuleError, AccessRules, parse_rule
from .address import ListenAddress, one_line, parse_listen, shown
from .protocol import PREFIX_PLACEHOLDERS, TIMESTAMP_STYLES, make_stamper
from .tlsconfig import DEFAULT_HANDSHAKE_TIMEOUT_S, TLSSettings
from .tomlwriter import toml_value

__all__ = [
    "DEFAULT_CONFIG_PATH",
    "ENV_PREFIX",
    "KEYS",
    "KEYS_BY_NAME",
    "RESERVED_ENV",
    "SECTIONS",
    "Config",
    "ConfigError",
    "Key",
    "LISTENER_KEYS",
    "ListenAddress",
    "Listener",
    "ListenerKey",
    "find_config_path",
    "load_config",
    "load_config_with_sources",
    "parse_listen",
]

DEFAULT_CONFIG_PATH: Final = Path("/etc/tsechod/tsechod.toml")
ENV_PREFIX: Final = "TSECHOD_"
# TSECHOD_* variables that are not config keys: read by cli.py, skipped here.
RESERVED_ENV: Final = frozenset({"TSECHOD_CONFIG", "TSECHOD_DEBUG"})
SECTIONS: Final = ("server", "echo", "log", "limits", "access", "daemon")
# The array of tables that declares listeners one by one (LISTENER_KEYS).
LISTENER_TABLE: Final = "listener"

MAX_RATE_PER_S: Final = 1_000_000.0
# A [[listener]] name becomes systemd's FileDescriptorName=: at most 255 of these characters.
_LISTENER_NAME_RE: Final = re.compile(r"[A-Za-z0-9._-]{1,255}\Z", re.ASCII)
PROXY_MODES: Final = ("off", "v1", "v2", "any")
PROXY_UNTRUSTED: Final = ("refuse", "direct")
MAX_LINE_BYTES_LIMIT: Final = 16 * 1024 * 1024
MAX_WORKERS: Final = 256
# Larger timeouts overflow threading/socket timeouts; a year is "forever" here.
MAX_TIMEOUT_S: Final = 31_536_000.0
# A config file is a few KiB; anything bigger is the wrong file (or /dev/zero).
MAX_CONFIG_BYTES: Final = 1024 * 1024
# A config read from a pipe or a FIFO at startup (--config <(...)) must arrive within this.
CONFIG_PIPE_WAIT_S: Final = 5.0
_SHOWN_VALUE_CHARS: Final = 120  # longer values are cut in error messages


class ConfigError(Exception):
    """A configuration problem the operator must fix; str() is one line.

    The message starts with ``config error: `` (added if missing) and names
    where the bad value came from, the value and what is allowed.  Control
    characters are escaped so the message stays on one line.
    """

    def __init__(self, message: str) -> None:
        if not message.startswith("config error: "):
            message = "config error: " + message
        super().__init__(one_line(message))


@dataclass(frozen=True, slots=True)
class Listener:
    """One listening address and how its connections start (a ``[[listener]]`` table).

    Field names are the table's key names (see LISTENER_KEYS). An address from
    ``[server] listen`` is a Listener with every other field at its default: a
    plain listener. ``proxy_trusted`` holds networks as normalised text
    (``10.0.0.0/8``); state.py turns them into matchers.
    """

    address: ListenAddress
    name: str | None = None
    proxy_protocol: str = "off"
    proxy_trusted: tuple[str, ...] = ()
    proxy_untrusted: str = "refuse"
    # As written (a bare name may be a systemd credential): tlsconfig.resolve_path reads them.
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_client_ca: str | None = None
    tls_handshake_timeout_s: float = DEFAULT_HANDSHAKE_TIMEOUT_S

    @property
    def proxied(self) -> bool:
        return self.proxy_protocol != "off"

    @property
    def tls(self) -> TLSSettings | None:
        """The listener's TLS settings, or None for a plaintext listener."""
        if self.tls_cert is None:
            return None
        return TLSSettings(self.tls_cert, self.tls_key, self.tls_client_ca)

    def describe(self) -> str:
        """For the ``listening on`` line: '' for a plain listener, else ' (PROXY v2 from 10.0.0.0/8)'."""
        parts = []
        if self.proxied:
            others = "; others served direct" if self.proxy_untrusted == "direct" else ""
            parts.append(f"PROXY {self.proxy_protocol} from {', '.join(self.proxy_trusted)}{others}")
        if self.tls_cert is not None:
            parts.append("TLS, client certificate required" if self.tls_client_ca is not None else "TLS")
        return f" ({'; '.join(parts)})" if parts else ""


@dataclass(frozen=True, slots=True)
class Config:
    """Every setting of tsechod. Field names are the TOML key names (see KEYS)."""

    # [server]
    listen: tuple[ListenAddress, ...] = (
        ListenAddress("127.0.0.1", 8009),
        ListenAddress("::1", 8009),
    )
    backlog: int = 1024
    idle_timeout_s: float = 300.0
    shutdown_timeout_s: float = 10.0
    workers: int = 1  # "auto" in the file is resolved to os.cpu_count()
    proxy_header_timeout_s: float = 5.0
    metrics_listen: ListenAddress | None = None  # off unless set (docs/operations.md, Metrics)
    cpu_affinity: str = "auto"  # "auto", "off", or a CPU list ("0,2-3"), normalised by affinity.check_setting
    # [echo]
    timestamp: str = "ctime"
    utc: bool = False
    telnet: bool = True
    max_line_bytes: int = 65536
    prefix: str = "[{stamp}] "
    # [log]
    log_target: str = "stderr"
    log_file: Path | None = None
    log_format: str = "text"
    log_level: str = "info"
    # [limits]
    max_connections: int = 1024
    max_connections_per_ip: int = 64
    line_timeout_s: float = 120.0
    send_timeout_s: float = 30.0
    connection_rate_per_ip: float = 0.0  # 0: off
    connection_burst_per_ip: int = 10
    # [access]
    rules: tuple[str, ...] = ()
    # [daemon]
    pid_file: Path | None = None
    user: str | None = None
    group: str | None = None
    # Not a key: every listener, those of `listen` (plain) first, then the [[listener]] tables.
    # load_config fills it; left empty, it is the plain listeners of `listen`.
    listeners: tuple[Listener, ...] = ()
    # Not a key: the config file, absolute; relative tls_* paths start in its directory (None: no file).
    config_file: Path | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if not self.listeners:
            object.__setattr__(self, "listeners", tuple(Listener(address) for address in self.listen))


# --------------------------------------------------------------------------
# The key registry

Checker = Callable[[object], object]
TextParser = Callable[[str], object]


@dataclass(frozen=True, slots=True)
class Key:
    """One configuration key: the single source of truth for its name and rules.

    ``from_toml`` takes a value as tomllib returns it; ``from_text`` takes the
    string from an environment variable or flag.  Both return the value to
    store in Config or raise ValueError with the reason (``must be ...``).
    Path values are returned as given; the loader resolves relative ones.
    """

    name: str
    section: str
    type: str  # for docs: "integer", "number", "boolean", "string", ...
    allowed: str  # for docs: what values are accepted
    help: str  # one line, e.g. for the flag's --help text
    from_toml: Checker
    from_text: TextParser
    flag: bool = False  # has a command-line flag
    # False: a reload keeps the running value and warns; the new one applies after a restart.
    reloadable: bool = True

    @property
    def default(self) -> object:
        return _FIELD_DEFAULTS[self.name]

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper()

    @property
    def flag_name(self) -> str | None:
        return "--" + self.name.replace("_", "-") if self.flag else None


def _type_name(value: object) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a float"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "a table"
    return "a date/time"


def _wrong_type(reason: str, value: object) -> ValueError:
    return ValueError(f"{reason}, not {_type_name(value)}")


_INT_RE: Final = re.compile(r"[+-]?[0-9]{1,30}\Z", re.ASCII)
_FLOAT_RE: Final = re.compile(
    r"[+-]?(?:[0-9]{1,30}(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]{1,4})?\Z", re.ASCII
)
_TRUE: Final = frozenset({"true", "yes", "1", "on"})
_FALSE: Final = frozenset({"false", "no", "0", "off"})


def _int_key(lo: int, hi: int | None, note: str = "") -> tuple[Checker, TextParser, str]:
    reason = f"must be an integer {lo}-{hi}{note}" if hi is not None else f"must be an integer >= {lo}"

    def check(value: object) -> object:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _wrong_type(reason, value)
        if value < lo or (hi is not None and value > hi):
            raise ValueError(reason)
        return value

    def parse(text: str) -> object:
        text = text.strip()
        if not _INT_RE.match(text):
            raise ValueError(reason)
        return check(int(text))

    return check, parse, reason


def _number_key(lo: float, hi: float, inclusive: bool, reason: str) -> tuple[Checker, TextParser, str]:
    """A finite number from *lo* (excluded unless *inclusive*) to *hi*, from TOML or text."""

    def check(value: object) -> object:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise _wrong_type(reason, value)
        number = float(value)
        if not math.isfinite(number) or number > hi:
            raise ValueError(reason)
        if number < lo or (number == lo and not inclusive):
            raise ValueError(reason)
        return number

    def parse(text: str) -> object:
        text = text.strip()
        if not _FLOAT_RE.match(text):
            raise ValueError(reason)
        return check(float(text))

    return check, parse, reason


def _seconds_key(lo: float, inclusive: bool) -> tuple[Checker, TextParser, str]:
    op = ">=" if inclusive else ">"
    return _number_key(lo, MAX_TIMEOUT_S, inclusive,
                       f"must be a number of seconds {op} {lo:g} (at most {MAX_TIMEOUT_S:.0f})")


def _bool_key() -> tuple[Checker, TextParser, str]:
    reason = "must be true or false"

    def check(value: object) -> object:
        if not isinstance(value, bool):
            raise _wrong_type(reason, value)
        return value

    def parse(text: str) -> object:
        word = text.strip().lower()
        if word in _TRUE:
            return True
        if word in _FALSE:
            return False
        raise ValueError("must be true or false (or yes/no, on/off, 1/0)")

    return check, parse, reason


def _choice_key(choices: Sequence[str]) -> tuple[Checker, TextParser, str]:
    reason = "must be one of " + ", ".join(choices)

    def check(value: object) -> object:
        if not isinstance(value, str):
            raise _wrong_type(reason, value)
        word = value.strip().lower()
        if word not in choices:
            raise ValueError(reason)
        return word

    return check, check, reason


def _path_key() -> tuple[Checker, TextParser, str]:
    reason = "must be a file path (a non-empty string)"

    def check(value: object) -> object:
        if not isinstance(value, str):
            raise _wrong_type(reason, value)
        if not value:
            raise ValueError(reason)
        if "\0" in value:
            raise ValueError("must not contain a NUL character")
        if value.endswith("/"):
            raise ValueError("must name a file, not a directory (it ends with '/')")
        return Path(value)

    return check, check, reason


def _name_key(what: str) -> tuple[Checker, TextParser, str]:
    reason = f"must be a {what} name or number (a non-empty string without spaces)"

    def check(value: object) -> object:
        if not isinstance(value, str):
            raise _wrong_type(reason, value)
        if not value or not value.isprintable() or any(c.isspace() for c in value):
            raise ValueError(reason)
        return value

    return check, check, reason


def _workers_key() -> tuple[Checker, TextParser, str]:
    reason = f'must be an integer 1-{MAX_WORKERS} or "auto"'

    def check(value: object) -> object:
        if isinstance(value, str) and value.strip().lower() == "auto":
            return min(os.cpu_count() or 1, MAX_WORKERS)
        if isinstance(value, bool) or not isinstance(value, int):
            raise _wrong_type(reason, value)
        if not 1 <= value <= MAX_WORKERS:
            raise ValueError(reason)
        return value

    def parse(text: str) -> object:
        text = text.strip()
        if text.lower() == "auto":
            return check(text)
        if not _INT_RE.match(text):
            raise ValueError(reason)
        return check(int(text))

    return check, parse, reason


def _cpu_affinity_key() -> tuple[Checker, TextParser, str]:
    reason = 'must be "auto", "off" or a list of CPU numbers like "0,2-3"'

    def check(value: object) -> object:
        if not isinstance(value, str):
            raise _wrong_type(reason, value)
        try:
            return affinity.check_setting(value)
        except ValueError as err:
            raise ValueError(f"{reason} ({err})") from None

    return check, check, reason


_STRFTIME_TOKEN_RE: Final = re.compile(r"%.", re.DOTALL)


def _check_timestamp(value: object) -> object:
    """A style protocol.make_stamper takes, checked by rendering a stamp with it."""
    reason = "must be " + ", ".join(TIMESTAMP_STYLES) + " or a strftime pattern containing '%'"
    if not isinstance(value, str):
        raise _wrong_type(reason, value)
    if value.strip().lower() in TIMESTAMP_STYLES:
        return value.strip().lower()
    if "%" not in value:
        raise ValueError(reason)
    if not value.isprintable():
        raise ValueError("strftime pattern must not contain control characters")
    if _STRFTIME_TOKEN_RE.sub("", value).endswith("%"):
        raise ValueError("strftime pattern ends with a lone '%' (write '%%' for a percent sign)")
    try:
        out = make_stamper(value, utc=True)(0.0).decode("utf-8", "replace")
    except (ValueError, UnicodeError, OverflowError) as err:
        raise ValueError(f"strftime rejects the pattern: {err}") from None
    if not out.isprintable():
        raise ValueError("strftime pattern must not produce control characters (such as %n or %t)")
    return value


PREFIX_MAX_CHARS: Final = 256
_PREFIX_ALLOWED: Final = "a template with {stamp} once; also {host}, {instance}, {worker}; {{ and }} for braces"


def _check_prefix(value: object) -> object:
    """An ``[echo] prefix`` template: known placeholders only, {stamp} exactly once, one printable line."""
    if not isinstance(value, str):
        raise _wrong_type(f"must be {_PREFIX_ALLOWED}", value)
    if not value.isprintable():
        raise ValueError("must not contain control characters (a reply is one line)")
    if len(value) > PREFIX_MAX_CHARS:
        raise ValueError(f"must be at most {PREFIX_MAX_CHARS} characters, not {len(value)}")
    allowed = ", ".join("{%s}" % name for name in PREFIX_PLACEHOLDERS)
    try:
        fields_ = [(name, conv, spec) for _, name, spec, conv in string.Formatter().parse(value) if name is not None]
    except ValueError as err:
        raise ValueError(f"{err} (write {{{{ or }}}} for a literal brace)") from None
    for name, conv, spec in fields_:
        if name not in PREFIX_PLACEHOLDERS:
            raise ValueError(f"unknown placeholder {{{name}}}: allowed are {allowed}")
        if conv or spec:
            raise ValueError(f"placeholder {{{name}}} takes no conversion or format spec")
    if [name for name, _, _ in fields_].count("stamp") != 1:
        raise ValueError("must contain {stamp} exactly once (the timestamp is the reply's point)")
    return value


def _check_listen(value: object) -> object:
    reason = 'must be a list of "host:port" strings, e.g. ["127.0.0.1:8009", "[::1]:8009"]'
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list):
        raise _wrong_type(reason, value)
    if not all(isinstance(item, str) for item in value):
        raise ValueError(reason)
    return _listen_tuple(cast(list[str], value))


def _parse_listen_text(text: str) -> object:
    return _listen_tuple(item.strip() for item in text.split(",") if item.strip())


def _listen_tuple(items: Iterable[str]) -> tuple[ListenAddress, ...]:
    seen: list[ListenAddress] = []
    for item in items:
        addr = parse_listen(item)
        if addr in seen:
            raise ValueError(f"address {addr} is listed twice")
        seen.append(addr)
    if not seen:
        raise ValueError("must list at least one address, e.g. 127.0.0.1:8009")
    return tuple(seen)


def _check_metrics_listen(value: object) -> object:
    reason = 'must be one "host:port" string, e.g. "127.0.0.1:9809"'
    if not isinstance(value, str):
        raise _wrong_type(reason, value)
    return parse_listen(value.strip())


def _rate_key() -> tuple[Checker, TextParser, str]:
    return _number_key(0, MAX_RATE_PER_S, True, "must be a number of connections per second >= 0 "
                       f"(0 = off; at most {MAX_RATE_PER_S:.0f})")


def _rules_key() -> tuple[Checker, TextParser, str]:
    reason = 'must be a list of "allow|deny ADDRESS/NETWORK|all" strings, e.g. ["allow 10.0.0.0/8", "deny all"]'

    def check(value: object) -> object:
        if not isinstance(value, list):
            raise _wrong_type(reason, value)
        try:
            return tuple(rule.text for rule in AccessRules.parse(value).rules)
        except AccessRuleError as err:
            raise ValueError(one_line(str(err))) from None

    def parse(text: str) -> object:
        # TSECHOD_RULES="allow 10.0.0.0/8, deny all": a rule never holds a comma.
        return check([item.strip() for item in text.split(",") if item.strip()])

    return check, parse, reason


def _make_key(
    name: str,
    section: str,
    type_: str,
    spec: tuple[Checker, TextParser, str],
    help_: str,
    *,
    allowed: str | None = None,
    flag: bool = False,
    reloadable: bool = True,
) -> Key:
    check, parse, reason = spec
    shown_allowed = allowed if allowed is not None else reason.removeprefix("must be ")
    return Key(name, section, type_, shown_allowed, help_, check, parse, flag, reloadable)


KEYS: Final[tuple[Key, ...]] = (
    # [server]
    Key(
        "listen", "server", "list of addresses",
        '"host:port" or "[ipv6]:port", port 0-65535 (0 = any free port); no duplicates',
        "addresses to listen on; port 0 picks a free port (logged at start)",
        _check_listen, _parse_listen_text, flag=True, reloadable=False,
    ),
    _make_key("backlog", "server", "integer", _int_key(1, 65535),
              "listen queue length passed to listen()", reloadable=False),
    _make_key("idle_timeout_s", "server", "number", _seconds_key(0, False),
              "close a connection that sends nothing for this many seconds", flag=True),
    _make_key("shutdown_timeout_s", "server", "number", _seconds_key(0, True),
              "on SIGTERM, wait at most this long for connections to finish"),
    _make_key("workers", "server", "integer or \"auto\"", _workers_key(),
              'worker processes; "auto" = number of CPUs', flag=True, reloadable=False),
    _make_key("proxy_header_timeout_s", "server", "number", _seconds_key(0, False),
              "on a [[listener]] with proxy_protocol, the PROXY header must arrive within this"),
    Key(
        "metrics_listen", "server", "address", '"host:port" or "[ipv6]:port"; not set = no metrics endpoint',
        "serve Prometheus metrics (GET /metrics) on this address; off unless set",
        _check_metrics_listen, _check_metrics_listen, flag=True, reloadable=False,
    ),
    _make_key("cpu_affinity", "server", "string", _cpu_affinity_key(),
              'pin each serving process to one CPU: "auto" = worker i on the i-th allowed CPU, "off", '
              'or the CPUs to use in turn ("0,2-3")', reloadable=False),
    # [echo]
    Key(
        "timestamp", "echo", "string",
        "ctime, iso, epoch, or a strftime pattern containing '%' (%f = microseconds)",
        "reply timestamp style: ctime, iso, epoch or a strftime pattern",
        _check_timestamp, _check_timestamp, True,
    ),
    _make_key("utc", "echo", "boolean", _bool_key(), "timestamps in UTC instead of local time",
              allowed="true or false"),
    _make_key("telnet", "echo", "boolean", _bool_key(),
              "strip telnet IAC negotiation from input; IAC IP closes the connection",
              allowed="true or false"),
    _make_key("max_line_bytes", "echo", "integer", _int_key(1, MAX_LINE_BYTES_LIMIT, " (16 MiB)"),
              "longest line accepted; a longer one gets ERR and the connection is closed"),
    Key("prefix", "echo", "string", _PREFIX_ALLOWED,
        "what goes before each echoed line; the default is today's '[<stamp>] '", _check_prefix, _check_prefix),
    # [log]
    _make_key("log_target", "log", "string", _choice_key(("stderr", "file", "syslog")),
              "where logs go: stderr, file (needs log_file) or syslog (/dev/log)", flag=True),
    _make_key("log_file", "log", "path", _path_key(),
              "log file for log_target = \"file\"; relative to this file's directory", flag=True),
    _make_key("log_format", "log", "string", _choice_key(("text", "json")),
              "text, or json (one object per line)", flag=True),
    _make_key("log_level", "log", "string", _choice_key(("debug", "info", "warning", "error")),
              "debug, info, warning or error (case-insensitive)", flag=True),
    # [limits]
    _make_key("max_connections", "limits", "integer", _int_key(1, None),
              "connections over this get 'ERR server busy' and are closed"),
    _make_key("max_connections_per_ip", "limits", "integer", _int_key(1, None),
              "connections from one address over this are refused"),
    _make_key("line_timeout_s", "limits", "number", _seconds_key(0, False),
              "a line must be complete this long after its first byte (slow clients)"),
    _make_key("send_timeout_s", "limits", "number", _seconds_key(0, False),
              "close a client that does not read its replies for this long"),
    _make_key("connection_rate_per_ip", "limits", "number", _rate_key(),
              "new connections per second from one address (token bucket; 0 = off); over it: ERR and close"),
    _make_key("connection_burst_per_ip", "limits", "integer", _int_key(1, 1_000_000),
              "how many connections one address may open at once before connection_rate_per_ip applies"),
    # [access]
    _make_key("rules", "access", "list of rules", _rules_key(),
              'allow/deny rules on the client address, first match wins, none matching = allowed',
              allowed='"allow X" or "deny X", X an address, a network (10.0.0.0/8) or all; '
                      "first match wins; no match allows"),
    # [daemon]
    _make_key("pid_file", "daemon", "path", _path_key(),
              "pid file (locked while tsechod runs); relative to this file's directory", flag=True, reloadable=False),
    _make_key("user", "daemon", "string", _name_key("user"),
              "when started as root, switch to this user after binding", flag=True, reloadable=False),
    _make_key("group", "daemon", "string", _name_key("group"),
              "when started as root, switch to this group after binding", flag=True, reloadable=False),
)
KEYS_BY_NAME: Final[Mapping[str, Key]] = {key.name: key for key in KEYS}
_FIELD_DEFAULTS: Final[Mapping[str, object]] = {f.name: f.default for f in fields(Config)
                                               if f.name not in ("listeners", "config_file")}

if [key.name for key in KEYS] != list(_FIELD_DEFAULTS):  # pragma: no cover - import-time guard
    raise AssertionError("KEYS and Config fields differ")


# --------------------------------------------------------------------------
# The keys of a [[listener]] table


@dataclass(frozen=True, slots=True)
class ListenerKey:
    """One key of a ``[[listener]]`` table: the same role as Key, for tables.

    Tables have no environment or flag form (a list of tables does not fit in
    one variable); check-config shows them with their sources. A key with
    ``reloadable=False`` makes a reload keep every running listener as it is.
    """

    name: str
    type: str
    allowed: str
    help: str
    from_toml: Checker
    required: bool = False
    reloadable: bool = True

    @property
    def default(self) -> object:
        return _LISTENER_DEFAULTS[self.name]


def _listener_address(value: object) -> object:
    if not isinstance(value, str):
        raise _wrong_type('must be a "host:port" string, e.g. "0.0.0.0:8009"', value)
    return parse_listen(value)


def _listener_name(value: object) -> object:
    reason = "must be 1-255 characters A-Z a-z 0-9 . _ - (it matches systemd's FileDescriptorName=)"
    if not isinstance(value, str):
        raise _wrong_type(reason, value)
    if not _LISTENER_NAME_RE.match(value):
        raise ValueError(reason)
    return value


def _proxy_trusted(value: object) -> object:
    reason = 'must be a list of addresses or networks, e.g. ["10.0.0.0/8", "::1"]'
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list):
        raise _wrong_type(reason, value)
    networks: list[str] = []
    for index, item in enumerate(value):
        if not isinstance(item, str) or item == "all" or not item:
            raise ValueError(f"item {index} {toml_value(item)}: {reason}")
        try:
            rule = parse_rule(index, f"allow {item}")
        except AccessRuleError as err:
            reason_text = str(err).split(": ", 1)[-1]
            raise ValueError(one_line(f"item {index} {toml_value(item)}: {reason_text}")) from None
        networks.extend(str(network) for network in rule.networks if str(network) not in networks)
    return tuple(networks)


def _tls_file(value: object) -> object:
    reason = "must be a PEM file path, or a systemd credential name (a non-empty string)"
    if not isinstance(value, str):
        raise _wrong_type(reason, value)
    if not value or "\0" in value or value.endswith("/"):
        raise ValueError(reason)
    return value  # kept as written: where it is depends on $CREDENTIALS_DIRECTORY (tlsconfig.resolve_path)


LISTENER_KEYS: Final[tuple[ListenerKey, ...]] = (
    ListenerKey("address", "address", '"host:port" or "[ipv6]:port", port 0-65535; not also in another listener',
                "the address to listen on (required)", _listener_address, required=True, reloadable=False),
    ListenerKey("name", "string", "1-255 characters A-Z a-z 0-9 . _ -, unique",
                "names the listener: socket activation maps a socket whose FileDescriptorName= is this name",
                _listener_name, reloadable=False),
    ListenerKey("proxy_protocol", "string", ", ".join(PROXY_MODES),
                'expect a PROXY header first: "v1", "v2", "any" (either; a header is still required)',
                _choice_key(PROXY_MODES)[0]),
    ListenerKey("proxy_trusted", "list of networks", 'addresses or networks, e.g. ["10.0.0.0/8", "::1"]',
                "who may send a PROXY header (the load balancers); required when proxy_protocol is not off",
                _proxy_trusted),
    ListenerKey("proxy_untrusted", "string", ", ".join(PROXY_UNTRUSTED),
                '"refuse" others (closed without a word), or serve them "direct" as plain clients',
                _choice_key(PROXY_UNTRUSTED)[0]),
    ListenerKey("tls_cert", "path", "PEM file (certificate chain, may hold the key too), or a credential name",
                "serve TLS on this listener with this certificate (relative: to the config file's directory)",
                _tls_file),
    ListenerKey("tls_key", "path", "PEM file, or a credential name",
                "the certificate's private key (not encrypted); unset: it is in tls_cert", _tls_file),
    ListenerKey("tls_client_ca", "path", "PEM file, or a credential name",
                "mutual TLS: require a client certificate signed by a CA in this file", _tls_file),
    ListenerKey("tls_handshake_timeout_s", "number", f"seconds > 0 (at most {MAX_TIMEOUT_S:.0f})",
                "close a TLS client that has not completed its handshake within this", _seconds_key(0, False)[0]),
)
LISTENER_KEYS_BY_NAME: Final[Mapping[str, ListenerKey]] = {key.name: key for key in LISTENER_KEYS}
_LISTENER_DEFAULTS: Final[Mapping[str, object]] = {f.name: f.default for f in fields(Listener)}

if [key.name for key in LISTENER_KEYS] != list(_LISTENER_DEFAULTS):  # pragma: no cover - import-time guard
    raise AssertionError("LISTENER_KEYS and Listener fields differ")


# --------------------------------------------------------------------------
# Finding and loading


def find_config_path(
    explicit: str | None,
    environ: Mapping[str, str],
    *,
    default: Path = DEFAULT_CONFIG_PATH,
) -> Path | None:
    """Pick the config file: ``--config`` > ``$TSECHOD_CONFIG`` > *default* if it exists > None.

    A path given with ``--config`` or ``TSECHOD_CONFIG`` must exist, else
    ConfigError.  An empty ``TSECHOD_CONFIG`` counts as unset.  None means
    "no file: built-in defaults".  Reading the file is load_config's job.
    """
    if explicit is not None:
        return _existing(explicit, f"--config={_shell(explicit)}")
    env_path = environ.get("TSECHOD_CONFIG", "")
    if env_path:
        return _existing(env_path, f"environment TSECHOD_CONFIG={_shell(env_path)}")
    try:
        os.stat(default)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError:
        pass  # exists but unreadable: let load_config report the reason
    return default


def _existing(path: str, where: str) -> Path:
    if not path:  # Path("") would be ".", a directory
        raise ConfigError(f"{where}: needs a file path")
    try:
        os.stat(path)
    except FileNotFoundError:
        raise ConfigError(f"{where}: no such file") from None
    except (OSError, ValueError) as err:
        raise ConfigError(f"{where}: {_os_reason(err)}") from None
    # Absolute now: --daemon later changes directory to /, and a reload must find the same file.
    try:
        return Path(path).absolute()
    except OSError as err:
        raise ConfigError(f"{where}: relative path, but the current directory is unusable: "
                          f"{_os_reason(err)}") from None


def load_config(
    path: Path | None,
    environ: Mapping[str, str],
    overrides: Mapping[str, str | Sequence[str]] | None = None,
    *,
    reloading: bool = False,
) -> Config:
    """Build the effective Config: defaults < TOML file *path* < *environ* < *overrides*.

    *path* None means no file.  *environ* is searched for ``TSECHOD_<KEY>``
    variables (an unknown ``TSECHOD_*`` name is an error).  *overrides* maps
    field names to the raw strings given as flags (``listen``: a list); a
    None or empty value means "flag not given".  A pipe or device is read
    with a deadline at startup, and a pipe is refused when *reloading* (it
    can't be read twice, and must not stop the main loop).  Raises ConfigError
    with a one-line message for any problem.
    """
    return load_config_with_sources(path, environ, overrides, reloading=reloading)[0]


def load_config_with_sources(
    path: Path | None,
    environ: Mapping[str, str],
    overrides: Mapping[str, str | Sequence[str]] | None = None,
    *,
    reloading: bool = False,
) -> tuple[Config, dict[str, str]]:
    """Like load_config, and also say where each value came from.

    The dict maps every field name to ``"default"``, ``"file <path>"``,
    ``"env TSECHOD_<KEY>"`` or ``"flag --<key-name>"``.
    """
    values: dict[str, object] = dict(_FIELD_DEFAULTS)
    sources: dict[str, str] = {key.name: "default" for key in KEYS}
    wheres: dict[str, str] = {}

    tables: list[Listener] = []
    if path is not None:
        found, tables, table_sources = _read_file(path, reloading)
        sources.update(table_sources)
        for key, raw, where in found:
            value = _convert(key.from_toml, raw, where)
            if isinstance(value, Path) and not value.is_absolute():
                value = path.parent.absolute() / value
            values[key.name], sources[key.name], wheres[key.name] = value, f"file {path}", where

    for var in sorted(environ):
        if not var.startswith(ENV_PREFIX) or var in RESERVED_ENV:
            continue
        text = environ[var]
        where = f"environment {var}={_shell(text)}"
        env_key = _ENV_KEYS.get(var)
        if env_key is None:
            raise ConfigError(f"{where}: unknown variable{_env_hint(var)}")
        values[env_key.name] = _from_text(env_key, text, where)
        sources[env_key.name], wheres[env_key.name] = f"env {var}", where

    for name, given in (overrides or {}).items():
        if given is None or (isinstance(given, list | tuple) and not given):
            continue  # argparse default: the flag was not given
        flag = "--" + name.replace("_", "-")
        flag_key = KEYS_BY_NAME.get(name)
        if isinstance(given, str | Path | int | float):
            items = [str(given)]
        else:
            items = [str(item) for item in given]
        where = " ".join(f"{flag}={_shell(str(item))}" for item in items)
        if flag_key is None:
            raise ConfigError(f"{where}: unknown option")
        if len(items) > 1 and flag_key.name != "listen":
            raise ConfigError(f"{where}: given more than once")
        values[name] = _from_text(flag_key, ",".join(items), where)
        sources[name], wheres[name] = f"flag {flag}", where

    if values["log_target"] == "file" and values["log_file"] is None:
        raise ConfigError(
            f"{wheres['log_target']}: requires log_file "
            "(set [log] log_file, TSECHOD_LOG_FILE or --log-file)"
        )
    # With [[listener]] tables, the default listen is dropped: an operator who wrote tables
    # meant those addresses, not those plus 127.0.0.1:8009. A listen given explicitly stays.
    plain = () if tables and sources["listen"] == "default" else cast(tuple[ListenAddress, ...], values["listen"])
    for number, listener in enumerate(tables, 1):
        if listener.address in plain:
            raise ConfigError(f"{path}: [[listener]] #{number} address = {toml_value(str(listener.address))}: "
                              f"already in listen ({sources['listen']}); list each address once")
    values["listen"] = plain
    values["listeners"] = (*(Listener(address) for address in plain), *tables)
    values["config_file"] = path.absolute() if path is not None else None
    return cast(Any, Config)(**values), sources


_ENV_KEYS: Final[Mapping[str, Key]] = {key.env: key for key in KEYS}


def _convert(check: Checker, raw: object, where: str) -> object:
    try:
        return check(raw)
    except ValueError as err:
        raise ConfigError(f"{where}: {err}") from None


def _from_text(key: Key, text: str, where: str) -> object:
    try:
        value = key.from_text(text)
    except ValueError as err:
        raise ConfigError(f"{where}: {err}") from None
    if isinstance(value, Path) and not value.is_absolute():
        # Relative to where the operator typed it; --daemon later chdirs to /.
        try:
            value = Path.cwd() / value
        except OSError as err:
            raise ConfigError(f"{where}: relative path, but the current directory is unusable: "
                              f"{_os_reason(err)}") from None
    return value


def _read_file(path: Path, reloading: bool = False) -> tuple[list[tuple[Key, object, str]], list[Listener], dict[str, str]]:
    """Parse the TOML file; return its (key, raw value, where) in file order, its listeners and their sources."""
    try:
        # O_NONBLOCK: opening a FIFO would otherwise wait for a writer (and a reload with it).
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        with open(fd, "rb", buffering=0) as file:
            mode = os.fstat(fd).st_mode
            if stat.S_ISREG(mode):
                os.set_blocking(fd, True)
                data = file.read(MAX_CONFIG_BYTES + 1)
            elif stat.S_ISDIR(mode):
                raise ConfigError(f"{path}: cannot read: it is a directory")
            elif reloading and (stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)):
                # A pipe was read once at startup (--config <(...)); read again it would be empty,
                # or wait for a writer with the main loop stopped.
                raise ConfigError(f"{path}: cannot read it again on reload: not a regular file (a pipe or "
                                  "FIFO); restart tsechod to read it, or use a regular file")
            else:
                data = _read_with_deadline(fd, CONFIG_PIPE_WAIT_S if not reloading else 0.5, stat.S_ISFIFO(mode))
    except (OSError, ValueError) as err:
        raise ConfigError(f"{path}: cannot read: {_os_reason(err)}") from None
    except TimeoutError as err:
        raise ConfigError(f"{path}: cannot read: {err}") from None
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path}: larger than {MAX_CONFIG_BYTES // 1024} KiB: is it the right file?")
    try:
        text = data.decode("utf-8-sig")  # a BOM from a Windows editor is harmless
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise ConfigError(
            f"{path}: not valid UTF-8 (byte 0x{data[err.start]:02x} at line {line})"
        ) from None
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: invalid TOML: {err}") from None
    except ValueError:  # int() of a literal over sys.get_int_max_str_digits()
        raise ConfigError(f"{path}: invalid TOML: an integer has too many digits") from None
    except RecursionError:
        raise ConfigError(f"{path}: invalid TOML: values nested too deeply") from None

    found: list[tuple[Key, object, str]] = []
    for top, body in doc.items():
        if top == LISTENER_TABLE:
            continue  # _read_listeners
        if top in SECTIONS:
            if not isinstance(body, dict):
                raise ConfigError(
                    f"{path}: {shown(top)} must be a section ([{top}]), not {_type_name(body)}"
                )
            for name, raw in body.items():
                key = KEYS_BY_NAME.get(name)
                if key is None:
                    raise ConfigError(
                        f"{path}: unknown key {shown(name)} in [{top}]{_key_hint(name, top)}"
                    )
                if key.section != top:
                    raise ConfigError(
                        f"{path}: key {shown(name)} belongs in [{key.section}], not in [{top}]"
                    )
                found.append((key, raw, f"{path}: [{top}] {name} = {toml_value(raw)}"))
        elif isinstance(body, dict):
            raise ConfigError(f"{path}: unknown section [{top}]{_section_hint(top)}")
        elif top in KEYS_BY_NAME:
            section = KEYS_BY_NAME[top].section
            raise ConfigError(
                f"{path}: key {shown(top)} must be in a section: put it under [{section}]"
            )
        else:
            raise ConfigError(
                f"{path}: unknown key {shown(top)} outside any section{_key_hint(top, None)}"
            )
    listeners, sources = _read_listeners(path, doc.get(LISTENER_TABLE))
    return found, listeners, sources


def _read_listeners(path: Path, body: object) -> tuple[list[Listener], dict[str, str]]:
    """The ``[[listener]]`` tables, validated key by key; errors name the file, the table's number and the key."""
    if body is None:
        return [], {}
    if isinstance(body, dict):
        raise ConfigError(f"{path}: [listener] must be written [[listener]] (one table per listener)")
    if not isinstance(body, list) or not all(isinstance(table, dict) for table in body):
        raise ConfigError(f"{path}: listener must be [[listener]] tables, not {_type_name(body)}")
    listeners: list[Listener] = []
    sources: dict[str, str] = {}
    for number, table in enumerate(cast(list[dict[str, object]], body), 1):
        at = f"{path}: [[listener]] #{number}"
        values: dict[str, object] = {}
        for name, raw in table.items():
            key = LISTENER_KEYS_BY_NAME.get(name)
            if key is None:
                match = difflib.get_close_matches(name, list(LISTENER_KEYS_BY_NAME), n=1, cutoff=0.6)
                hint = (f"did you mean {shown(match[0])}?" if match
                        else "keys: " + ", ".join(k.name for k in LISTENER_KEYS))
                raise ConfigError(f"{at}: unknown key {shown(name)} ({hint})")
            values[name] = _convert(key.from_toml, raw, f"{at} {name} = {toml_value(raw)}")
            sources[f"{LISTENER_TABLE} #{number} {name}"] = f"file {path}"
        if "address" not in values:
            raise ConfigError(f'{at}: address is missing (e.g. address = "0.0.0.0:8009")')
        listener = cast(Any, Listener)(**values)
        if listener.proxied and not listener.proxy_trusted:
            raise ConfigError(
                f"{at} proxy_protocol = {toml_value(listener.proxy_protocol)}: needs proxy_trusted, the "
                'addresses of the proxies allowed to send a header (e.g. proxy_trusted = ["10.0.0.0/8"])'
            )
        if listener.tls_cert is None:
            for name in ("tls_key", "tls_client_ca"):
                if name in values:
                    raise ConfigError(f"{at} {name} = {toml_value(table[name])}: needs tls_cert "
                                      '(the certificate to serve, e.g. tls_cert = "/etc/tsechod/server.pem")')
        for other_number, other in enumerate(listeners, 1):
            if other.address == listener.address:
                raise ConfigError(f"{at} address = {toml_value(str(listener.address))}: "
                                  f"already the address of [[listener]] #{other_number}")
            if listener.name is not None and other.name == listener.name:
                raise ConfigError(f"{at} name = {toml_value(listener.name)}: "
                                  f"already the name of [[listener]] #{other_number}")
        listeners.append(listener)
    return listeners, sources


# --------------------------------------------------------------------------
# Hints and quoting for messages


def _key_hint(name: str, section: str | None) -> str:
    match = difflib.get_close_matches(name, list(KEYS_BY_NAME), n=1, cutoff=0.6)
    if match:
        key = KEYS_BY_NAME[match[0]]
        if key.section == section:
            return f" (did you mean {shown(key.name)}?)"
        return f" (did you mean {shown(key.name)} in [{key.section}]?)"
    if section is None:
        return " (keys go in a section: " + ", ".join(f"[{s}]" for s in SECTIONS) + ")"
    names = ", ".join(key.name for key in KEYS if key.section == section)
    return f" (keys in [{section}]: {names})"


def _section_hint(name: str) -> str:
    if name in KEYS_BY_NAME:
        return f" ({shown(name)} is a key in [{KEYS_BY_NAME[name].section}])"
    match = difflib.get_close_matches(name, SECTIONS, n=1, cutoff=0.6)
    if match:
        return f" (did you mean [{match[0]}]?)"
    return " (sections: " + ", ".join(f"[{s}]" for s in SECTIONS) + ")"


def _env_hint(var: str) -> str:
    # Compare what follows the prefix: the shared "TSECHOD_" would make anything look close.
    candidates = {name.removeprefix(ENV_PREFIX): name for name in [*_ENV_KEYS, *sorted(RESERVED_ENV)]}
    match = difflib.get_close_matches(var.removeprefix(ENV_PREFIX).upper(), candidates, n=1, cutoff=0.6)
    if match:
        return f" (did you mean {candidates[match[0]]}?)"
    return " (TSECHOD_* variables must name a config key; see docs/configuration.md)"


def _cut(text: str) -> str:
    if len(text) > _SHOWN_VALUE_CHARS:
        return text[:_SHOWN_VALUE_CHARS] + "..."
    return text


def _shell(text: str) -> str:
    """An env/flag value as the operator would type it in a shell, cut if long."""
    return shlex.quote(_cut(text)) if text.isprintable() else repr(_cut(text))


def _read_with_deadline(fd: int, wait_s: float, fifo: bool) -> bytes:
    """Read a pipe or device (non-blocking *fd*) to its end; TimeoutError if it takes over *wait_s*.

    A FIFO that never had a writer reads as an immediate end of file on Linux;
    that is waited out too, until a writer has come (and maybe gone: POLLHUP).
    """
    deadline = time.monotonic() + wait_s
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    chunks: list[bytes] = []
    size = 0
    writer_seen = False
    while size <= MAX_CONFIG_BYTES:
        try:
            chunk: bytes | None = os.read(fd, 65536)
        except BlockingIOError:
            chunk = None
        if chunk:
            chunks.append(chunk)
            size += len(chunk)
            continue
        if chunk == b"" and (chunks or writer_seen or not fifo):
            break
        left = deadline - time.monotonic()
        events = poller.poll(left * 1000) if left > 0 else []
        if not events:
            raise TimeoutError(f"nothing more arrived within {wait_s:g} s (a FIFO with no writer?)")
        writer_seen = writer_seen or bool(events[0][1] & select.POLLHUP)
    return b"".join(chunks)


def _os_reason(err: BaseException) -> str:
    if isinstance(err, OSError) and err.strerror:
        return err.strerror
    return str(err)


