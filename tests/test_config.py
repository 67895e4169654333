"""Tests for tsecho.config: parsing, validation, precedence, messages, shipped files."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tsecho.cli import format_config
from tsecho.config import (
    DEFAULT_CONFIG_PATH,
    KEYS,
    KEYS_BY_NAME,
    LISTENER_KEYS,
    Key,
    SECTIONS,
    Config,
    ConfigError,
    ListenAddress,
    find_config_path,
    load_config,
    load_config_with_sources,
    parse_listen,
)

REPO = Path(__file__).resolve().parent.parent
SHIPPED = REPO / "etc" / "tsechod.toml"
DOCS = REPO / "docs" / "configuration.md"


def write(tmp_path: Path, text: str, name: str = "tsechod.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def file_error(path: Path, text: str) -> str:
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_config(path, {})
    return str(info.value)


# --------------------------------------------------------------------------
# Defaults and the shipped file


def test_defaults_match_the_contract() -> None:
    config = Config()
    assert config.listen == (ListenAddress("127.0.0.1", 8009), ListenAddress("::1", 8009))
    assert [str(a) for a in config.listen] == ["127.0.0.1:8009", "[::1]:8009"]
    assert (config.backlog, config.idle_timeout_s, config.shutdown_timeout_s) == (1024, 300.0, 10.0)
    assert config.workers == 1
    assert (config.timestamp, config.utc, config.telnet, config.max_line_bytes) == (
        "ctime", False, True, 65536,
    )
    assert (config.log_target, config.log_file, config.log_format, config.log_level) == (
        "stderr", None, "text", "info",
    )
    assert (config.max_connections, config.max_connections_per_ip) == (1024, 64)
    assert (config.line_timeout_s, config.send_timeout_s) == (120.0, 30.0)
    assert (config.pid_file, config.user, config.group) == (None, None, None)


def test_no_file_and_empty_environment_give_defaults() -> None:
    config, sources = load_config_with_sources(None, {})
    assert config == Config()
    assert sources == {key.name: "default" for key in KEYS}


def test_keys_registry_covers_every_config_field_once() -> None:
    assert [key.name for key in KEYS] == [name for name in Config.__dataclass_fields__
                                              if name not in ("listeners", "config_file")]
    assert {key.section for key in KEYS} == set(SECTIONS)
    for key in KEYS:
        assert key.default == getattr(Config(), key.name)
        assert key.env == "TSECHOD_" + key.name.upper()
        assert key.help and "\n" not in key.help


def test_shipped_config_file_loads_to_the_defaults() -> None:
    assert load_config(SHIPPED, {}) == Config()


def test_shipped_config_file_mentions_every_key_in_its_section() -> None:
    text = SHIPPED.read_text(encoding="utf-8")
    section = None
    seen: dict[str, str] = {}
    listener_keys: list[str] = []
    for line in text.splitlines():
        if m := re.fullmatch(r"\[(\w+)\]", line):
            section = m.group(1)
        elif re.fullmatch(r"#? ?\[\[listener\]\]", line):
            section = "[[listener]]"
        elif m := re.match(r"#? ?(\w+) = ", line):
            assert section is not None
            if section == "[[listener]]":
                listener_keys.append(m.group(1))
            else:
                seen[m.group(1)] = section
    assert seen == {key.name: key.section for key in KEYS}
    assert listener_keys == [key.name for key in LISTENER_KEYS]


def test_shipped_config_file_has_a_comment_before_every_key() -> None:
    lines = SHIPPED.read_text(encoding="utf-8").splitlines()
    for key in KEYS:
        index = next(i for i, l in enumerate(lines) if re.match(rf"#? ?{key.name} = ", l))
        previous = lines[index - 1]
        if previous.startswith(f"# {key.name} ="):  # never happens, but keep the check honest
            previous = lines[index - 2]
        assert previous.startswith("# ") and len(previous) > 10, key.name


def _docs_rows() -> dict[str, list[str]]:
    rows: dict[str, list[str]] = {}
    section = None
    for line in DOCS.read_text(encoding="utf-8").splitlines():
        if m := re.fullmatch(r"### \[(\w+)\]", line):
            section = m.group(1)
        elif line == "### [[listener]]":
            section = None  # _listener_docs_rows
        elif line.startswith("| `") and section is not None:
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows[cells[0].strip("`")] = [section, *cells[1:]]
    return rows


@pytest.mark.parametrize("key", KEYS, ids=lambda k: k.name)
def test_docs_document_every_key_with_section_default_env_and_flag(key: Key) -> None:
    rows = _docs_rows()
    assert key.name in rows, f"{key.name} missing from docs/configuration.md"
    section, type_, default, allowed, env, flag = rows[key.name]
    assert section == key.section
    assert type_ and allowed
    if key.default is None:
        assert default == "not set"
    elif key.name == "listen":
        assert default == '`["127.0.0.1:8009", "[::1]:8009"]`'
    else:
        expected = list(key.default) if isinstance(key.default, tuple) else key.default
        assert tomllib.loads(f"v = {default.strip('`')}")["v"] == expected
    assert env.startswith(f"`{key.env}`")
    if key.flag_name:
        assert flag.startswith(f"`{key.flag_name}`")
    else:
        assert flag == "—"


def test_docs_list_exactly_the_keys() -> None:
    assert set(_docs_rows()) == set(KEYS_BY_NAME)


def _listener_docs_rows() -> dict[str, list[str]]:
    text = DOCS.read_text(encoding="utf-8").split("### [[listener]]", 1)[1].split("\n#", 1)[0]
    return {cells[0].strip("`"): cells[1:] for line in text.splitlines() if line.startswith("| `")
            for cells in [[c.strip() for c in line.strip("|").split("|")]]}


def test_docs_document_every_listener_key_with_default_and_reload() -> None:
    rows = _listener_docs_rows()
    assert list(rows) == [key.name for key in LISTENER_KEYS]
    for key in LISTENER_KEYS:
        type_, default, allowed, reload = rows[key.name]
        assert type_ and allowed
        if key.required:
            assert default == "required"
        elif key.default is None:
            assert default == "not set"
        else:
            expected = list(key.default) if isinstance(key.default, tuple) else key.default
            assert tomllib.loads(f"v = {default.strip('`')}")["v"] == expected, key.name
        assert reload == ("reloads" if key.reloadable else "restart"), key.name


def test_flags_are_the_documented_set() -> None:
    assert {key.flag_name for key in KEYS if key.flag_name} == {
        "--listen", "--log-level", "--log-target", "--log-file", "--log-format", "--timestamp",
        "--idle-timeout-s", "--workers", "--metrics-listen", "--pid-file", "--user", "--group",
    }


# --------------------------------------------------------------------------
# Errors in the file: every kind, with its exact message

FILE_ERRORS = [
    # (toml text, message after "config error: PATH: ")
    ("[server]\nbacklog = 0\n", "[server] backlog = 0: must be an integer 1-65535"),
    ("[server]\nbacklog = 65536\n", "[server] backlog = 65536: must be an integer 1-65535"),
    ('[server]\nbacklog = "1024"\n',
     '[server] backlog = "1024": must be an integer 1-65535, not a string'),
    ("[server]\nbacklog = 10.0\n", "[server] backlog = 10.0: must be an integer 1-65535, not a float"),
    ("[server]\nbacklog = true\n", "[server] backlog = true: must be an integer 1-65535, not a boolean"),
    ("[server]\nbacklog = [1]\n", "[server] backlog = [1]: must be an integer 1-65535, not an array"),
    ("[server]\nbacklog = {a = 1}\n",
     '[server] backlog = {"a" = 1}: must be an integer 1-65535, not a table'),
    ("[server]\nbacklog = 1979-05-27\n",
     "[server] backlog = 1979-05-27: must be an integer 1-65535, not a date/time"),
    ("[server]\nbacklog = 0x" + "f" * 100 + "\n",
     "[server] backlog = <a 400-bit integer>: must be an integer 1-65535"),
    ("[server]\nidle_timeout_s = 0\n",
     "[server] idle_timeout_s = 0: must be a number of seconds > 0 (at most 31536000)"),
    ("[server]\nidle_timeout_s = -1.5\n",
     "[server] idle_timeout_s = -1.5: must be a number of seconds > 0 (at most 31536000)"),
    ("[server]\nidle_timeout_s = inf\n",
     "[server] idle_timeout_s = inf: must be a number of seconds > 0 (at most 31536000)"),
    ("[server]\nidle_timeout_s = nan\n",
     "[server] idle_timeout_s = nan: must be a number of seconds > 0 (at most 31536000)"),
    ("[server]\nidle_timeout_s = 31536001\n",
     "[server] idle_timeout_s = 31536001: must be a number of seconds > 0 (at most 31536000)"),
    ('[server]\nidle_timeout_s = "5"\n',
     '[server] idle_timeout_s = "5": must be a number of seconds > 0 (at most 31536000), not a string'),
    ("[server]\nshutdown_timeout_s = -0.1\n",
     "[server] shutdown_timeout_s = -0.1: must be a number of seconds >= 0 (at most 31536000)"),
    ("[server]\nworkers = 0\n", '[server] workers = 0: must be an integer 1-256 or "auto"'),
    ('[server]\ncpu_affinity = "2-0"\n', '[server] cpu_affinity = "2-0": must be "auto", "off" or a list of CPU '
     "numbers like \"0,2-3\" (range '2-0' goes backwards)"),
    ("[server]\ncpu_affinity = 1\n", '[server] cpu_affinity = 1: must be "auto", "off" or a list of CPU '
     'numbers like "0,2-3", not an integer'),
    ("[server]\nworkers = 257\n", '[server] workers = 257: must be an integer 1-256 or "auto"'),
    ('[server]\nworkers = "many"\n', '[server] workers = "many": must be an integer 1-256 or "auto", not a string'),
    ("[server]\nworkers = 2.0\n", '[server] workers = 2.0: must be an integer 1-256 or "auto", not a float'),
    ("[server]\nlisten = []\n",
     "[server] listen = []: must list at least one address, e.g. 127.0.0.1:8009"),
    ("[server]\nlisten = 8009\n",
     '[server] listen = 8009: must be a list of "host:port" strings, e.g. ["127.0.0.1:8009", "[::1]:8009"], not an integer'),
    ('[server]\nlisten = ["127.0.0.1:1", 2]\n',
     '[server] listen = ["127.0.0.1:1", 2]: must be a list of "host:port" strings, e.g. ["127.0.0.1:8009", "[::1]:8009"]'),
    ('[server]\nlisten = ["127.0.0.1:8009", "localhost"]\n',
     '[server] listen = ["127.0.0.1:8009", "localhost"]: invalid listen address \'localhost\': '
     "missing port (expected host:port, e.g. 127.0.0.1:8009 or [::1]:8009)"),
    ('[server]\nlisten = ["[::1]:8009", "[0:0::1]:8009"]\n',
     '[server] listen = ["[::1]:8009", "[0:0::1]:8009"]: address [::1]:8009 is listed twice'),
    ('[server]\nlisten = ["127.0.0.1:99999"]\n',
     '[server] listen = ["127.0.0.1:99999"]: invalid listen address \'127.0.0.1:99999\': '
     "port '99999' is not a number 0-65535"),
    ('[echo]\ntimestamp = "rfc2822"\n',
     "[echo] timestamp = \"rfc2822\": must be ctime, iso, epoch or a strftime pattern containing '%'"),
    ('[echo]\ntimestamp = "%H:%M%"\n',
     "[echo] timestamp = \"%H:%M%\": strftime pattern ends with a lone '%' (write '%%' for a percent sign)"),
    ('[echo]\ntimestamp = "%H\\n"\n',
     '[echo] timestamp = "%H\\n": strftime pattern must not contain control characters'),
    ('[echo]\ntimestamp = "%H%n%M"\n',
     '[echo] timestamp = "%H%n%M": strftime pattern must not produce control characters (such as %n or %t)'),
    ("[echo]\ntimestamp = 1\n",
     "[echo] timestamp = 1: must be ctime, iso, epoch or a strftime pattern containing '%', not an integer"),
    ("[echo]\nutc = 1\n", "[echo] utc = 1: must be true or false, not an integer"),
    ('[echo]\ntelnet = "yes"\n', '[echo] telnet = "yes": must be true or false, not a string'),
    ("[echo]\nmax_line_bytes = 0\n", "[echo] max_line_bytes = 0: must be an integer 1-16777216 (16 MiB)"),
    ("[echo]\nmax_line_bytes = 16777217\n",
     "[echo] max_line_bytes = 16777217: must be an integer 1-16777216 (16 MiB)"),
    ('[log]\nlog_target = "journal"\n',
     '[log] log_target = "journal": must be one of stderr, file, syslog'),
    ('[log]\nlog_target = "file"\n',
     '[log] log_target = "file": requires log_file (set [log] log_file, TSECHOD_LOG_FILE or --log-file)'),
    ('[log]\nlog_file = ""\n', '[log] log_file = "": must be a file path (a non-empty string)'),
    ('[log]\nlog_file = "logs/"\n',
     "[log] log_file = \"logs/\": must name a file, not a directory (it ends with '/')"),
    ('[log]\nlog_file = "a\\u0000b"\n', '[log] log_file = "a\\u0000b": must not contain a NUL character'),
    ("[log]\nlog_file = 1\n", "[log] log_file = 1: must be a file path (a non-empty string), not an integer"),
    ('[log]\nlog_format = "xml"\n', '[log] log_format = "xml": must be one of text, json'),
    ('[log]\nlog_level = "verbose"\n',
     '[log] log_level = "verbose": must be one of debug, info, warning, error'),
    ("[limits]\nmax_connections = 0\n", "[limits] max_connections = 0: must be an integer >= 1"),
    ("[limits]\nmax_connections_per_ip = -1\n", "[limits] max_connections_per_ip = -1: must be an integer >= 1"),
    ("[limits]\nline_timeout_s = 0\n",
     "[limits] line_timeout_s = 0: must be a number of seconds > 0 (at most 31536000)"),
    ("[limits]\nsend_timeout_s = false\n",
     "[limits] send_timeout_s = false: must be a number of seconds > 0 (at most 31536000), not a boolean"),
    ('[daemon]\npid_file = ""\n', '[daemon] pid_file = "": must be a file path (a non-empty string)'),
    ('[daemon]\nuser = ""\n',
     '[daemon] user = "": must be a user name or number (a non-empty string without spaces)'),
    ('[daemon]\ngroup = "wheel staff"\n',
     '[daemon] group = "wheel staff": must be a group name or number (a non-empty string without spaces)'),
    ("[daemon]\nuser = 0\n",
     "[daemon] user = 0: must be a user name or number (a non-empty string without spaces), not an integer"),
    # structure
    ("[server]\nidle_timeout = 5\n", "unknown key 'idle_timeout' in [server] (did you mean 'idle_timeout_s'?)"),
    ("[echo]\nidle_timeout = 5\n",
     "unknown key 'idle_timeout' in [echo] (did you mean 'idle_timeout_s' in [server]?)"),
    ("[server]\nzzz = 5\n",
     "unknown key 'zzz' in [server] (keys in [server]: listen, backlog, idle_timeout_s, shutdown_timeout_s, workers, "
     "proxy_header_timeout_s, metrics_listen, cpu_affinity)"),
    ("[echo]\nbacklog = 5\n", "key 'backlog' belongs in [server], not in [echo]"),
    ("[daemon]\nlog_level = \"info\"\n", "key 'log_level' belongs in [log], not in [daemon]"),
    ("backlog = 5\n", "key 'backlog' must be in a section: put it under [server]"),
    ("backlogg = 5\n", "unknown key 'backlogg' outside any section (did you mean 'backlog' in [server]?)"),
    ("zzz = 5\n",
     "unknown key 'zzz' outside any section (keys go in a section: [server], [echo], [log], [limits], [access], [daemon])"),
    ("[sever]\nbacklog = 5\n", "unknown section [sever] (did you mean [server]?)"),
    ("[tls]\n", "unknown section [tls] (sections: [server], [echo], [log], [limits], [access], [daemon])"),
    ("[backlog]\n", "unknown section [backlog] ('backlog' is a key in [server])"),
    ("server = 1\n", "'server' must be a section ([server]), not an integer"),
    ("[[server]]\nbacklog = 5\n", "'server' must be a section ([server]), not an array"),
    ("[server.tls]\ncert = 1\n",
     "unknown key 'tls' in [server] (keys in [server]: listen, backlog, idle_timeout_s, shutdown_timeout_s, workers, "
     "proxy_header_timeout_s, metrics_listen, cpu_affinity)"),
    # syntax
    ("[server]\nbacklog = \n", "invalid TOML: Invalid value (at line 2, column 11)"),
    ("[server\n", "invalid TOML: Expected ']' at the end of a table declaration (at line 1, column 8)"),
    ("[server]\nbacklog = 1\nbacklog = 2\n", "invalid TOML: Cannot overwrite a value (at line 3, column 12)"),
    ("a = " + "[" * 2000 + "]" * 2000 + "\n", "invalid TOML: values nested too deeply"),
    ("[server]\nbacklog = " + "1" * 5000 + "\n", "invalid TOML: an integer has too many digits"),
]


@pytest.mark.parametrize(("text", "message"), FILE_ERRORS, ids=[m[:60] for _, m in FILE_ERRORS])
def test_file_error_names_file_key_value_and_what_is_allowed(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "tsechod.toml"
    assert file_error(path, text) == f"config error: {path}: {message}"


def test_first_error_in_file_order_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "t.toml"
    message = file_error(path, "[echo]\nutc = 2\n[server]\nbacklog = 0\n")
    assert message == f"config error: {path}: [echo] utc = 2: must be true or false, not an integer"


def test_non_utf8_file_is_an_error_with_its_line(tmp_path: Path) -> None:
    path = tmp_path / "t.toml"
    path.write_bytes(b"[echo]\n# caf\xe9\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, {})
    assert str(info.value) == f"config error: {path}: not valid UTF-8 (byte 0xe9 at line 2)"


def test_a_byte_order_mark_is_accepted(tmp_path: Path) -> None:
    path = tmp_path / "t.toml"
    path.write_bytes(b"\xef\xbb\xbf[server]\nbacklog = 7\n")
    assert load_config(path, {}).backlog == 7


def test_unreadable_file_gives_the_os_reason(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path, {})  # a directory: read fails with EISDIR
    assert str(info.value) == f"config error: {tmp_path}: cannot read: Is a directory"
    missing = tmp_path / "gone.toml"
    with pytest.raises(ConfigError) as info:
        load_config(missing, {})
    assert str(info.value) == f"config error: {missing}: cannot read: No such file or directory"


def test_permission_denied_is_reported(tmp_path: Path) -> None:
    path = write(tmp_path, "")
    path.chmod(0)
    if os.geteuid() != 0:
        with pytest.raises(ConfigError) as info:
            load_config(path, {})
        assert str(info.value) == f"config error: {path}: cannot read: Permission denied"
        return
    # Root reads any file (and CI runs as root): load it as nobody, in a child process.
    tmp_path.chmod(0o755)
    code = (
        "import os, sys; from pathlib import Path; from tsecho.config import load_config, ConfigError\n"
        "os.setgroups([]); os.setgid(65534); os.setuid(65534)\n"
        "try:\n    load_config(Path(sys.argv[1]), {})\nexcept ConfigError as err:\n    print(err)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=30)
    assert proc.stdout == f"config error: {path}: cannot read: Permission denied\n", proc.stderr


def test_long_and_control_character_values_stay_on_one_short_line(tmp_path: Path) -> None:
    path = tmp_path / "t.toml"
    message = file_error(path, f'[log]\nlog_level = "{"x" * 500}\\n\\u2028"\n')
    assert "\n" not in message and len(message.splitlines()) == 1
    assert message == f'config error: {path}: [log] log_level = "{"x" * 119}...: must be one of debug, info, warning, error'
    message = file_error(path, '[daemon]\nuser = "a\\u0085b"\n')
    assert len(message.splitlines()) == 1
    assert '[daemon] user = "a\\x85b": must be a user name' in message


# --------------------------------------------------------------------------
# Errors in the environment and in flags

ENV_ERRORS = [
    ({"TSECHOD_BACKLOG": "0"}, "environment TSECHOD_BACKLOG=0: must be an integer 1-65535"),
    ({"TSECHOD_BACKLOG": "1e3"}, "environment TSECHOD_BACKLOG=1e3: must be an integer 1-65535"),
    ({"TSECHOD_BACKLOG": ""}, "environment TSECHOD_BACKLOG='': must be an integer 1-65535"),
    ({"TSECHOD_BACKLOG": "1 024"}, "environment TSECHOD_BACKLOG='1 024': must be an integer 1-65535"),
    ({"TSECHOD_IDLE_TIMEOUT_S": "soon"},
     "environment TSECHOD_IDLE_TIMEOUT_S=soon: must be a number of seconds > 0 (at most 31536000)"),
    ({"TSECHOD_IDLE_TIMEOUT_S": "nan"},
     "environment TSECHOD_IDLE_TIMEOUT_S=nan: must be a number of seconds > 0 (at most 31536000)"),
    ({"TSECHOD_IDLE_TIMEOUT_S": "1e999"},
     "environment TSECHOD_IDLE_TIMEOUT_S=1e999: must be a number of seconds > 0 (at most 31536000)"),
    ({"TSECHOD_WORKERS": "lots"}, 'environment TSECHOD_WORKERS=lots: must be an integer 1-256 or "auto"'),
    ({"TSECHOD_UTC": "maybe"}, "environment TSECHOD_UTC=maybe: must be true or false (or yes/no, on/off, 1/0)"),
    ({"TSECHOD_TELNET": "2"}, "environment TSECHOD_TELNET=2: must be true or false (or yes/no, on/off, 1/0)"),
    ({"TSECHOD_LOG_LEVEL": "trace"},
     "environment TSECHOD_LOG_LEVEL=trace: must be one of debug, info, warning, error"),
    ({"TSECHOD_LOG_TARGET": "file"},
     "environment TSECHOD_LOG_TARGET=file: requires log_file (set [log] log_file, TSECHOD_LOG_FILE or --log-file)"),
    ({"TSECHOD_LISTEN": ""}, "environment TSECHOD_LISTEN='': must list at least one address, e.g. 127.0.0.1:8009"),
    ({"TSECHOD_LISTEN": "127.0.0.1:0,127.0.0.1:0"},
     "environment TSECHOD_LISTEN=127.0.0.1:0,127.0.0.1:0: address 127.0.0.1:0 is listed twice"),
    ({"TSECHOD_LISTEN": "::1:8009"},
     "environment TSECHOD_LISTEN=::1:8009: invalid listen address '::1:8009': an IPv6 address must be in brackets, e.g. [::1]:8009"),
    ({"TSECHOD_TIMESTAMP": "%H\t%M"},
     "environment TSECHOD_TIMESTAMP='%H\\t%M': strftime pattern must not contain control characters"),
    ({"TSECHOD_USER": ""},
     "environment TSECHOD_USER='': must be a user name or number (a non-empty string without spaces)"),
    ({"TSECHOD_PID_FILE": ""}, "environment TSECHOD_PID_FILE='': must be a file path (a non-empty string)"),
    ({"TSECHOD_IDLE_TIMEOUT": "5"},
     "environment TSECHOD_IDLE_TIMEOUT=5: unknown variable (did you mean TSECHOD_IDLE_TIMEOUT_S?)"),
    ({"TSECHOD_CONFG": "/x"}, "environment TSECHOD_CONFG=/x: unknown variable (did you mean TSECHOD_CONFIG?)"),
    ({"TSECHOD_FOO": "1"},
     "environment TSECHOD_FOO=1: unknown variable (TSECHOD_* variables must name a config key; see docs/configuration.md)"),
    ({"TSECHOD_": "1"},
     "environment TSECHOD_=1: unknown variable (TSECHOD_* variables must name a config key; see docs/configuration.md)"),
]


@pytest.mark.parametrize(("environ", "message"), ENV_ERRORS, ids=[m[:60] for _, m in ENV_ERRORS])
def test_environment_error_names_the_variable_value_and_what_is_allowed(environ: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, environ)
    assert str(info.value) == f"config error: {message}"


def test_reserved_and_unrelated_variables_are_ignored() -> None:
    environ = {"TSECHOD_CONFIG": "/nope", "TSECHOD_DEBUG": "1", "PATH": "/bin", "tsechod_backlog": "0",
               "XTSECHOD_BACKLOG": "0"}
    assert load_config(None, environ) == Config()


FLAG_ERRORS = [
    ({"idle_timeout_s": "soon"}, "--idle-timeout-s=soon: must be a number of seconds > 0 (at most 31536000)"),
    ({"workers": "0"}, '--workers=0: must be an integer 1-256 or "auto"'),
    ({"log_level": "loud"}, "--log-level=loud: must be one of debug, info, warning, error"),
    ({"log_target": "file"},
     "--log-target=file: requires log_file (set [log] log_file, TSECHOD_LOG_FILE or --log-file)"),
    ({"timestamp": "unix"},
     "--timestamp=unix: must be ctime, iso, epoch or a strftime pattern containing '%'"),
    ({"listen": ["127.0.0.1:80", "[::1]"]},
     "--listen=127.0.0.1:80 --listen='[::1]': invalid listen address '[::1]': missing ':port' after ']' "
     "(expected host:port, e.g. 127.0.0.1:8009 or [::1]:8009)"),
    ({"listen": ["127.0.0.1:80", "127.0.0.1:80"]},
     "--listen=127.0.0.1:80 --listen=127.0.0.1:80: address 127.0.0.1:80 is listed twice"),
    ({"user": "a b"}, "--user='a b': must be a user name or number (a non-empty string without spaces)"),
    ({"log_level": ["info", "debug"]}, "--log-level=info --log-level=debug: given more than once"),
    ({"colour": "yes"}, "--colour=yes: unknown option"),
]


@pytest.mark.parametrize(("overrides", "message"), FLAG_ERRORS, ids=[m[:60] for _, m in FLAG_ERRORS])
def test_flag_error_names_the_flag_value_and_what_is_allowed(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, {}, overrides)
    assert str(info.value) == f"config error: {message}"


def test_log_target_file_error_names_where_log_target_came_from(tmp_path: Path) -> None:
    path = write(tmp_path, '[log]\nlog_target = "file"\n')
    with pytest.raises(ConfigError, match=r"^config error: --log-target=file: requires log_file"):
        load_config(path, {}, {"log_target": "file"})
    # log_file from any source satisfies it
    config = load_config(path, {"TSECHOD_LOG_FILE": "/var/log/t.log"})
    assert (config.log_target, config.log_file) == ("file", Path("/var/log/t.log"))


def test_config_error_always_starts_with_its_prefix() -> None:
    assert str(ConfigError("x: y")) == "config error: x: y"
    assert str(ConfigError("config error: x: y")) == "config error: x: y"
    assert str(ConfigError("a\nb")) == "config error: a\\nb"



# --------------------------------------------------------------------------
# Accepted values

FILE_VALUES = [
    ("[server]\nidle_timeout_s = 5\n", "idle_timeout_s", 5.0),
    ("[server]\nshutdown_timeout_s = 0\n", "shutdown_timeout_s", 0.0),
    ("[server]\nidle_timeout_s = 0.25\n", "idle_timeout_s", 0.25),
    ("[server]\nbacklog = 1_000\n", "backlog", 1000),
    ("[server]\nbacklog = 65535\n", "backlog", 65535),
    ('[server]\nworkers = "auto"\n', "workers", min(os.cpu_count() or 1, 256)),
    ('[server]\nworkers = "AUTO"\n', "workers", min(os.cpu_count() or 1, 256)),
    ("[server]\nworkers = 256\n", "workers", 256),
    ('[server]\ncpu_affinity = "AUTO"\n', "cpu_affinity", "auto"),
    ('[server]\ncpu_affinity = " 3, 0-1,1 "\n', "cpu_affinity", "0-1,3"),
    ('[server]\nlisten = "127.0.0.1:0"\n', "listen", (ListenAddress("127.0.0.1", 0),)),
    ('[server]\nlisten = ["0.0.0.0:8009", "[::]:8009"]\n', "listen",
     (ListenAddress("0.0.0.0", 8009), ListenAddress("::", 8009))),
    ('[server]\nlisten = ["Localhost:7", "[0:0::1]:65535"]\n', "listen",
     (ListenAddress("localhost", 7), ListenAddress("::1", 65535))),
    ('[echo]\ntimestamp = "ISO"\n', "timestamp", "iso"),
    ('[echo]\ntimestamp = "epoch"\n', "timestamp", "epoch"),
    ('[echo]\ntimestamp = "%Y-%m-%d %H:%M:%S.%f"\n', "timestamp", "%Y-%m-%d %H:%M:%S.%f"),
    ('[echo]\ntimestamp = "100%%"\n', "timestamp", "100%%"),
    ('[echo]\ntimestamp = "%H時%M分"\n', "timestamp", "%H時%M分"),
    ("[echo]\nutc = true\n", "utc", True),
    ("[echo]\ntelnet = false\n", "telnet", False),
    ("[echo]\nmax_line_bytes = 16777216\n", "max_line_bytes", 16777216),
    ("[echo]\nmax_line_bytes = 1\n", "max_line_bytes", 1),
    ('[log]\nlog_level = "WARNING"\n', "log_level", "warning"),
    ('[log]\nlog_format = "JSON"\n', "log_format", "json"),
    ('[log]\nlog_target = "syslog"\n', "log_target", "syslog"),
    ('[log]\nlog_file = "/var/log/tsechod/t.log"\n', "log_file", Path("/var/log/tsechod/t.log")),
    ("[limits]\nmax_connections = 1\n", "max_connections", 1),
    ("[limits]\nmax_connections_per_ip = 100000\n", "max_connections_per_ip", 100000),
    ("[limits]\nline_timeout_s = 31536000\n", "line_timeout_s", 31536000.0),
    ('[daemon]\nuser = "tsechod"\n', "user", "tsechod"),
    ('[daemon]\ngroup = "65534"\n', "group", "65534"),
    ('[daemon]\npid_file = "/run/t.pid"\n', "pid_file", Path("/run/t.pid")),
    ("", "backlog", 1024),
    ("# only a comment\n[server]\n[echo]\n", "backlog", 1024),
    ("server.backlog = 9\n", "backlog", 9),
]


@pytest.mark.parametrize(("text", "name", "expected"), FILE_VALUES, ids=[t for t, _, _ in FILE_VALUES])
def test_file_values_are_converted_and_normalised(tmp_path: Path, text: str, name: str, expected: object) -> None:
    config = load_config(write(tmp_path, text), {})
    value = getattr(config, name)
    assert value == expected and type(value) is type(expected)


TEXT_VALUES = [
    ("backlog", " 12 ", 12),
    ("backlog", "+12", 12),
    ("idle_timeout_s", "5", 5.0),
    ("idle_timeout_s", "0.5", 0.5),
    ("idle_timeout_s", ".5", 0.5),
    ("idle_timeout_s", "1e3", 1000.0),
    ("shutdown_timeout_s", "0", 0.0),
    ("workers", "auto", min(os.cpu_count() or 1, 256)),
    ("workers", "3", 3),
    ("listen", "127.0.0.1:0, [::1]:0", (ListenAddress("127.0.0.1", 0), ListenAddress("::1", 0))),
    ("listen", "127.0.0.1:0,", (ListenAddress("127.0.0.1", 0),)),
    ("timestamp", "%s.%f", "%s.%f"),
    ("log_level", "DEBUG", "debug"),
    ("log_file", "/tmp/x.log", Path("/tmp/x.log")),
    ("user", "nobody", "nobody"),
] + [("utc", word, True) for word in ("true", "TRUE", "yes", "Yes", "1", "on", " on ")] + [
    ("telnet", word, False) for word in ("false", "False", "no", "NO", "0", "off")
]


@pytest.mark.parametrize(("name", "text", "expected"), TEXT_VALUES)
def test_environment_and_flag_text_is_converted(name: str, text: str, expected: object) -> None:
    env_value = getattr(load_config(None, {KEYS_BY_NAME[name].env: text}), name)
    flag_value = getattr(load_config(None, {}, {name: text}), name)
    assert env_value == flag_value == expected
    assert type(env_value) is type(expected)


def test_listen_flag_is_repeatable_and_takes_comma_lists() -> None:
    config = load_config(None, {}, {"listen": ["127.0.0.1:1", "[::1]:2,127.0.0.2:3"]})
    assert [str(a) for a in config.listen] == ["127.0.0.1:1", "[::1]:2", "127.0.0.2:3"]


def test_flags_that_were_not_given_change_nothing() -> None:
    overrides: dict[str, Any] = {"listen": None, "log_level": None, "workers": None, "user": None}
    assert load_config(None, {}, overrides) == Config()
    assert load_config(None, {}, {"listen": []}) == Config()
    assert load_config(None, {}, None) == Config()


# --------------------------------------------------------------------------
# Precedence and sources: default < file < env < flag, for every key

# name -> (TOML literal, env/flag text, value from the TOML, value from the text)
SAMPLES: dict[str, tuple[str, str, object, object]] = {
    "listen": ('["127.0.0.1:1"]', "[::1]:2", (ListenAddress("127.0.0.1", 1),), (ListenAddress("::1", 2),)),
    "backlog": ("10", "20", 10, 20),
    "idle_timeout_s": ("1.5", "2.5", 1.5, 2.5),
    "shutdown_timeout_s": ("0", "3", 0.0, 3.0),
    "workers": ("2", "3", 2, 3),
    "metrics_listen": ('"127.0.0.1:9809"', "[::1]:9810", ListenAddress("127.0.0.1", 9809), ListenAddress("::1", 9810)),
    "cpu_affinity": ('"off"', "1,0", "off", "0-1"),
    "timestamp": ('"iso"', "epoch", "iso", "epoch"),
    "utc": ("true", "no", True, False),
    "telnet": ("false", "yes", False, True),
    "max_line_bytes": ("100", "200", 100, 200),
    "prefix": ('"{stamp} "', "<{stamp}> ", "{stamp} ", "<{stamp}> "),
    "log_target": ('"syslog"', "stderr", "syslog", "stderr"),
    "log_file": ('"/f/a.log"', "/e/b.log", Path("/f/a.log"), Path("/e/b.log")),
    "log_format": ('"json"', "text", "json", "text"),
    "log_level": ('"debug"', "error", "debug", "error"),
    "max_connections": ("5", "6", 5, 6),
    "max_connections_per_ip": ("7", "8", 7, 8),
    "line_timeout_s": ("9", "10.5", 9.0, 10.5),
    "send_timeout_s": ("11", "12", 11.0, 12.0),
    "proxy_header_timeout_s": ("1", "2.5", 1.0, 2.5),
    "connection_rate_per_ip": ("0.5", "20", 0.5, 20.0),
    "connection_burst_per_ip": ("3", "4", 3, 4),
    "rules": ('["deny 10.0.0.0/8"]', "allow ::1, deny all", ("deny 10.0.0.0/8",), ("allow ::1", "deny all")),
    "pid_file": ('"/f/t.pid"', "/e/t.pid", Path("/f/t.pid"), Path("/e/t.pid")),
    "user": ('"alice"', "bob", "alice", "bob"),
    "group": ('"staff"', "wheel", "staff", "wheel"),
}


def test_samples_cover_every_key() -> None:
    assert set(SAMPLES) == set(KEYS_BY_NAME)


@pytest.mark.parametrize("key", KEYS, ids=lambda k: k.name)
def test_precedence_is_default_then_file_then_env_then_flag(tmp_path: Path, key: Key) -> None:
    literal, text, from_file, from_text = SAMPLES[key.name]
    path = write(tmp_path, f"[{key.section}]\n{key.name} = {literal}\n")
    other_text = "127.0.0.1:3" if key.name == "listen" else text

    config, sources = load_config_with_sources(None, {})
    assert (getattr(config, key.name), sources[key.name]) == (key.default, "default")

    config, sources = load_config_with_sources(path, {})
    assert (getattr(config, key.name), sources[key.name]) == (from_file, f"file {path}")
    assert all(src == "default" for name, src in sources.items() if name != key.name)

    config, sources = load_config_with_sources(path, {key.env: text})
    assert (getattr(config, key.name), sources[key.name]) == (from_text, f"env {key.env}")

    flag = "--" + key.name.replace("_", "-")
    config, sources = load_config_with_sources(path, {key.env: other_text}, {key.name: text})
    assert (getattr(config, key.name), sources[key.name]) == (from_text, f"flag {flag}")
    if key.flag_name:
        assert key.flag_name == flag


def test_sources_name_each_layer_in_one_load(tmp_path: Path) -> None:
    path = write(tmp_path, "[server]\nbacklog = 5\nidle_timeout_s = 6\nworkers = 2\n")
    environ = {"TSECHOD_IDLE_TIMEOUT_S": "7", "TSECHOD_WORKERS": "3"}
    config, sources = load_config_with_sources(path, environ, {"workers": "4"})
    assert (config.backlog, config.idle_timeout_s, config.workers, config.shutdown_timeout_s) == (5, 7.0, 4, 10.0)
    assert sources["backlog"] == f"file {path}"
    assert sources["idle_timeout_s"] == "env TSECHOD_IDLE_TIMEOUT_S"
    assert sources["workers"] == "flag --workers"
    assert sources["shutdown_timeout_s"] == "default"


def test_a_bad_file_value_is_an_error_even_when_env_overrides_it(tmp_path: Path) -> None:
    path = write(tmp_path, "[server]\nbacklog = 0\n")
    with pytest.raises(ConfigError, match=r"\[server\] backlog = 0: must be"):
        load_config(path, {"TSECHOD_BACKLOG": "5"})


# --------------------------------------------------------------------------
# Relative paths

def test_relative_paths_in_the_file_resolve_against_its_directory(tmp_path: Path) -> None:
    conf_dir = tmp_path / "conf"
    conf_dir.mkdir()
    path = write(conf_dir, '[log]\nlog_file = "logs/t.log"\n[daemon]\npid_file = "../run/t.pid"\n')
    config = load_config(path, {})
    assert config.log_file == conf_dir / "logs" / "t.log"
    assert config.pid_file == conf_dir / ".." / "run" / "t.pid"


def test_relative_config_path_still_gives_absolute_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "etc").mkdir()
    write(tmp_path / "etc", '[log]\nlog_file = "t.log"\n')
    monkeypatch.chdir(tmp_path)
    config = load_config(Path("etc/tsechod.toml"), {})
    assert config.log_file == tmp_path / "etc" / "t.log"


def test_absolute_paths_in_the_file_are_kept(tmp_path: Path) -> None:
    path = write(tmp_path, '[log]\nlog_file = "/var/log/t.log"\n')
    assert load_config(path, {}).log_file == Path("/var/log/t.log")


def test_relative_paths_from_env_and_flags_resolve_against_the_current_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    config = load_config(None, {"TSECHOD_LOG_FILE": "a.log"}, {"pid_file": "run/t.pid"})
    assert config.log_file == tmp_path / "a.log"
    assert config.pid_file == tmp_path / "run" / "t.pid"


# --------------------------------------------------------------------------
# Finding the file

def test_explicit_path_wins_over_environment_and_default(tmp_path: Path) -> None:
    a, b, c = write(tmp_path, "", "a.toml"), write(tmp_path, "", "b.toml"), write(tmp_path, "", "c.toml")
    assert find_config_path(str(a), {"TSECHOD_CONFIG": str(b)}, default=c) == a
    assert find_config_path(None, {"TSECHOD_CONFIG": str(b)}, default=c) == b
    assert find_config_path(None, {}, default=c) == c
    assert find_config_path(None, {"TSECHOD_CONFIG": ""}, default=c) == c


def test_no_file_anywhere_means_defaults(tmp_path: Path) -> None:
    assert find_config_path(None, {}, default=tmp_path / "missing.toml") is None
    assert find_config_path(None, {}, default=tmp_path / "not-a-dir.toml" / "x.toml") is None


def test_the_default_path_is_the_documented_one() -> None:
    assert DEFAULT_CONFIG_PATH == Path("/etc/tsechod/tsechod.toml")
    expected = DEFAULT_CONFIG_PATH if DEFAULT_CONFIG_PATH.exists() else None
    assert find_config_path(None, {}) == expected


@pytest.mark.parametrize(
    ("explicit", "environ", "message"),
    [
        ("{d}/missing.toml", {}, "--config={d}/missing.toml: no such file"),
        (None, {"TSECHOD_CONFIG": "{d}/missing.toml"}, "environment TSECHOD_CONFIG={d}/missing.toml: no such file"),
        ("", {}, "--config='': needs a file path"),
        ("{d}/x.toml/y.toml", {}, "--config={d}/x.toml/y.toml: Not a directory"),
    ],
)
def test_a_named_config_file_that_does_not_exist_is_an_error(tmp_path: Path, explicit: str | None, environ: dict[str, str], message: str) -> None:
    write(tmp_path, "", "x.toml")
    explicit = None if explicit is None else explicit.format(d=tmp_path)
    environ = {k: v.format(d=tmp_path) for k, v in environ.items()}
    with pytest.raises(ConfigError) as info:
        find_config_path(explicit, environ, default=tmp_path / "x.toml")
    assert str(info.value) == "config error: " + message.format(d=tmp_path)


# --------------------------------------------------------------------------
# check-config output

def test_check_config_output_is_toml_with_a_source_comment_on_every_key(tmp_path: Path) -> None:
    path = write(tmp_path, "[server]\nbacklog = 5\n")
    config, sources = load_config_with_sources(path, {"TSECHOD_UTC": "yes"}, {"log_level": "debug"})
    text = format_config(config, sources)
    assert tomllib.loads(text) == {
        "server": {"listen": ["127.0.0.1:8009", "[::1]:8009"], "backlog": 5, "idle_timeout_s": 300.0,
                   "shutdown_timeout_s": 10.0, "workers": 1, "proxy_header_timeout_s": 5.0,
                   "cpu_affinity": "auto"},
        "echo": {"timestamp": "ctime", "utc": True, "telnet": True, "max_line_bytes": 65536,
                 "prefix": "[{stamp}] "},
        "log": {"log_target": "stderr", "log_format": "text", "log_level": "debug"},
        "limits": {"max_connections": 1024, "max_connections_per_ip": 64, "line_timeout_s": 120.0,
                   "send_timeout_s": 30.0, "connection_rate_per_ip": 0.0, "connection_burst_per_ip": 10},
        "access": {"rules": []},
        "daemon": {},
    }
    lines = text.splitlines()
    assert f"backlog = 5  # file {path}" in lines
    assert "utc = true  # env TSECHOD_UTC" in lines
    assert 'log_level = "debug"  # flag --log-level' in lines
    assert "idle_timeout_s = 300.0  # default" in lines
    assert "# log_file is not set  # default" in lines
    for key in KEYS:
        assert sum(1 for line in lines if re.match(rf"#? ?{key.name}( =| is not set)", line)) == 1
    # sections appear in order, each key under its own
    headers = [line for line in lines if line.startswith("[")]
    assert headers == [f"[{s}]" for s in SECTIONS]


def test_check_config_output_loads_back_to_the_same_config(tmp_path: Path) -> None:
    path = write(tmp_path, "\n".join([
        "[server]", 'listen = ["127.0.0.1:0", "[::1]:0", "localhost:9"]', "idle_timeout_s = 0.125",
        "[echo]", 'timestamp = "%H:%M \\"%f\\" \\\\ é"', "utc = true",
        "[log]", 'log_target = "file"', 'log_file = "a dir/t\\"q.log"', 'log_level = "ERROR"',
        "[daemon]", 'pid_file = "/run/x.pid"', 'user = "u"', 'group = "g"', "",
    ]))
    config, sources = load_config_with_sources(path, {})
    again = write(tmp_path, format_config(config, sources), "again.toml")
    assert load_config(again, {}) == config



# --------------------------------------------------------------------------
# Listen addresses

@pytest.mark.parametrize(
    ("text", "host", "port", "shown"),
    [
        ("127.0.0.1:8009", "127.0.0.1", 8009, "127.0.0.1:8009"),
        ("[::1]:8009", "::1", 8009, "[::1]:8009"),
        ("[::]:0", "::", 0, "[::]:0"),
        ("0.0.0.0:65535", "0.0.0.0", 65535, "0.0.0.0:65535"),
        ("[2001:DB8::0001]:80", "2001:db8::1", 80, "[2001:db8::1]:80"),
        ("[fe80::1%eth0]:80", "fe80::1%eth0", 80, "[fe80::1%eth0]:80"),
        ("[::ffff:127.0.0.1]:1", "::ffff:7f00:1", 1, "[::ffff:7f00:1]:1"),
        ("localhost:8009", "localhost", 8009, "localhost:8009"),
        ("Echo-1.Example.com.:7", "echo-1.example.com.", 7, "echo-1.example.com.:7"),
        ("127.0.0.1:00080", "127.0.0.1", 80, "127.0.0.1:80"),
    ],
)
def test_listen_addresses_parse_and_print(text: str, host: str, port: int, shown: str) -> None:
    addr = parse_listen(text)
    assert addr == ListenAddress(host, port)
    assert str(addr) == shown
    assert parse_listen(str(addr)) == addr


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty listen address (expected host:port, e.g. 127.0.0.1:8009 or [::1]:8009)"),
        ("8009", "invalid listen address '8009': missing port (expected host:port, e.g. 127.0.0.1:8009 or [::1]:8009)"),
        ("localhost", "invalid listen address 'localhost': missing port (expected host:port, e.g. 127.0.0.1:8009 or [::1]:8009)"),
        (":8009", "invalid listen address ':8009': missing host (use 0.0.0.0 or [::] for every address)"),
        ("*:8009", "invalid listen address '*:8009': '*' is not an IP address or a valid host name"),
        ("my host:1", "invalid listen address 'my host:1': 'my host' is not an IP address or a valid host name"),
        ("-bad.example:1", "invalid listen address '-bad.example:1': '-bad.example' is not an IP address or a valid host name"),
        ("a..b:1", "invalid listen address 'a..b:1': 'a..b' is not an IP address or a valid host name"),
        ("127.0.0.256:1", "invalid listen address '127.0.0.256:1': '127.0.0.256' is not a valid IPv4 address"),
        ("1.2.3:1", "invalid listen address '1.2.3:1': '1.2.3' is not a valid IPv4 address"),
        ("::1:8009", "invalid listen address '::1:8009': an IPv6 address must be in brackets, e.g. [::1]:8009"),
        ("[::1]", "invalid listen address '[::1]': missing ':port' after ']' (expected host:port, e.g. 127.0.0.1:8009 or [::1]:8009)"),
        ("[::1:8009", "invalid listen address '[::1:8009': missing ']' after the IPv6 address (expected host:port, e.g. 127.0.0.1:8009 or [::1]:8009)"),
        ("[::1]8009", "invalid listen address '[::1]8009': missing ':port' after ']' (expected host:port, e.g. 127.0.0.1:8009 or [::1]:8009)"),
        ("[]:1", "invalid listen address '[]:1': '' in brackets is not an IPv6 address"),
        ("[localhost]:1", "invalid listen address '[localhost]:1': 'localhost' in brackets is not an IPv6 address"),
        ("[127.0.0.1]:1", "invalid listen address '[127.0.0.1]:1': brackets are only for IPv6 addresses; write 127.0.0.1:1"),
        ("127.0.0.1:", "invalid listen address '127.0.0.1:': port '' is not a number 0-65535"),
        ("127.0.0.1:65536", "invalid listen address '127.0.0.1:65536': port '65536' is not a number 0-65535"),
        ("127.0.0.1:-1", "invalid listen address '127.0.0.1:-1': port '-1' is not a number 0-65535"),
        ("127.0.0.1: 80", "invalid listen address '127.0.0.1: 80': port ' 80' is not a number 0-65535"),
        ("127.0.0.1:http", "invalid listen address '127.0.0.1:http': port 'http' is not a number 0-65535"),
        ("127.0.0.1:٨٠", "invalid listen address '127.0.0.1:٨٠': port '٨٠' is not a number 0-65535"),
    ],
)
def test_bad_listen_addresses_say_what_is_wrong(text: str, message: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_listen(text)
    assert str(info.value) == message


# --------------------------------------------------------------------------
# Property tests: nothing but ConfigError, ever


def toml_literal(value: object) -> str:
    """A tiny TOML writer for the generated documents (tomllib only reads)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return "nan" if value != value else "inf" if value == float("inf") else "-inf" if value == float("-inf") else repr(value)
    if isinstance(value, str):
        return json_string(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_literal(v) for v in value) + "]"
    assert isinstance(value, dict)
    return "{" + ", ".join(f"{json_string(k)} = {toml_literal(v)}" for k, v in value.items()) + "}"


def json_string(text: str) -> str:
    return json.dumps(text).replace("\\u007f", "\\u007F")


interesting_strings = st.sampled_from([
    "auto", "AUTO", "ctime", "iso", "epoch", "%H:%M:%S.%f", "%", "%%", "%n", "stderr", "file", "syslog",
    "text", "json", "debug", "INFO", "127.0.0.1:0", "[::1]:0", "localhost:1", "[::1]", "", " ", "true",
    "yes", "0", "1e3", "nan", "-1", "a/", "x.log", "../x", "\x00", "65536",
])
scalar_values = st.one_of(
    st.integers(), st.integers(min_value=-2, max_value=70000), st.floats(), st.booleans(),
    st.text(), interesting_strings,
    st.datetimes().map(lambda d: d.isoformat()),  # emitted as a string here
)
toml_values = st.recursive(
    scalar_values,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)
key_names = st.sampled_from([k.name for k in KEYS]) | st.text(max_size=12)
section_names = st.sampled_from(list(SECTIONS)) | st.text(max_size=8)


@st.composite
def toml_documents(draw: st.DrawFn) -> str:
    lines = []
    for _ in range(draw(st.integers(0, 6))):
        section = draw(section_names)
        lines.append(f"[{json_string(section)}]")
        for _ in range(draw(st.integers(0, 4))):
            name = draw(key_names)
            lines.append(f"{json_string(name)} = {toml_literal(draw(toml_values))}")
    return "\n".join(lines) + "\n"


@st.composite
def toml_ish_text(draw: st.DrawFn) -> str:
    """Text that is often almost TOML: fragments of real syntax glued with noise."""
    fragments = st.one_of(
        st.sampled_from(["[server]", "[echo]", "[log]", "[limits]", "[daemon]", "[[server]]", "[server.x]",
                         "=", " = ", "\n", '"', "'", "'''", '"""', "[", "]", "{", "}", ",", "#", "\\",
                         "\\u", "0x", "1_000", "1979-05-27T07:32:00Z", "inf", "nan", "true", "\r\n", "\ufeff"]),
        key_names, st.text(max_size=10),
    )
    return "".join(draw(st.lists(fragments, max_size=40)))


def assert_only_config_error(load: Callable[[], Config]) -> Config | None:
    try:
        config = load()
    except ConfigError as err:
        message = str(err)
        assert message.startswith("config error: ")
        assert len(message.splitlines()) == 1 and message.isprintable()
        assert len(message) < 1200
        return None
    assert isinstance(config, Config)
    return config


def assert_round_trips(tmp_path: Path, config: Config) -> None:
    sources = {key.name: "default" for key in KEYS}
    again = write(tmp_path, format_config(config, sources), "again.toml")
    assert load_config(again, {}) == config


PROPERTY_SETTINGS = settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture],
)


@PROPERTY_SETTINGS
@given(text=st.text() | toml_ish_text())
def test_arbitrary_text_files_raise_only_config_error(tmp_path: Path, text: str) -> None:
    path = tmp_path / "t.toml"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    config = assert_only_config_error(lambda: load_config(path, {}))
    if config is not None:
        assert_round_trips(tmp_path, config)


@PROPERTY_SETTINGS
@given(data=st.binary())
def test_arbitrary_bytes_files_raise_only_config_error(tmp_path: Path, data: bytes) -> None:
    path = tmp_path / "t.toml"
    path.write_bytes(data)
    assert_only_config_error(lambda: load_config(path, {}))


@PROPERTY_SETTINGS
@given(text=toml_documents())
def test_arbitrary_values_for_every_key_raise_only_config_error(tmp_path: Path, text: str) -> None:
    path = write(tmp_path, text, "t.toml")
    config = assert_only_config_error(lambda: load_config(path, {}))
    if config is not None:
        assert_round_trips(tmp_path, config)


@PROPERTY_SETTINGS
@given(
    environ=st.dictionaries(
        st.sampled_from([k.env for k in KEYS] + ["TSECHOD_CONFIG", "TSECHOD_DEBUG", "PATH"])
        | st.text(max_size=12).map(lambda s: "TSECHOD_" + s),
        st.text() | interesting_strings, max_size=5,
    ),
    overrides=st.dictionaries(
        st.sampled_from([k.name for k in KEYS]),
        st.none() | st.text() | interesting_strings | st.lists(st.text() | interesting_strings, max_size=3),
        max_size=4,
    ),
)
def test_arbitrary_environment_and_flags_raise_only_config_error(tmp_path: Path, environ: dict[str, str], overrides: dict[str, Any]) -> None:
    config = assert_only_config_error(lambda: load_config(None, environ, overrides))
    if config is not None:
        assert_round_trips(tmp_path, config)


@PROPERTY_SETTINGS
@given(value=toml_values, text=st.text())
def test_every_key_checker_raises_only_value_error(value: object, text: str) -> None:
    def check(call: Callable[[], object]) -> None:
        try:
            call()
        except ValueError as err:
            assert str(err)
            assert len(str(err).splitlines()) == 1 and str(err).isprintable()

    for key in KEYS:
        check(lambda: key.from_toml(value))
        check(lambda: key.from_text(text))


# --------------------------------------------------------------------------
# The example messages in docs/configuration.md are real

DOC_EXAMPLES = [
    ("file", "[server]\nbacklog = 0\n"),
    ("file", '[server]\nbacklog = "1024"\n'),
    ("file", "[echo]\nutc = 1\n"),
    ("file", "[server]\nidle_timeout = 5\n"),
    ("file", "[echo]\nbacklog = 5\n"),
    ("file", "backlog = 5\n"),
    ("file", "[sever]\nbacklog = 5\n"),
    ("file", "[server]\nbacklog = \n"),
    ("file", '[log]\nlog_target = "file"\n'),
    ("file", '[server]\nlisten = ["127.0.0.1:8009", "localhost"]\n'),
    ("env", {"TSECHOD_IDLE_TIMEOUT": "5"}),
    ("env", {"TSECHOD_UTC": "maybe"}),
    ("flag", {"idle_timeout_s": "soon"}),
]


@pytest.mark.parametrize(("kind", "given"), DOC_EXAMPLES)
def test_error_examples_in_the_docs_are_what_tsechod_prints(tmp_path: Path, kind: str, given: Any) -> None:
    path = tmp_path / "tsechod.toml"
    with pytest.raises(ConfigError) as info:
        if kind == "file":
            path.write_text(given, encoding="utf-8")
            load_config(path, {})
        elif kind == "env":
            load_config(None, given)
        else:
            load_config(None, {}, given)
    shown = "tsechod: " + str(info.value).replace(str(path), str(DEFAULT_CONFIG_PATH))
    assert shown in DOCS.read_text(encoding="utf-8").splitlines()


def test_missing_config_example_in_the_docs_is_real() -> None:
    with pytest.raises(ConfigError) as info:
        find_config_path("/etc/tsechod/missing.toml", {})
    assert "tsechod: " + str(info.value) in DOCS.read_text(encoding="utf-8").splitlines()


def test_commented_out_examples_in_the_shipped_file_are_valid(tmp_path: Path) -> None:
    text = SHIPPED.read_text(encoding="utf-8")
    unset = [key.name for key in KEYS if key.default is None]
    for name in unset:
        text = re.sub(rf"^# ({name} = )", r"\1", text, flags=re.M)
    config = load_config(write(tmp_path, text), {})
    assert all(getattr(config, name) is not None for name in unset)


def test_a_huge_file_is_refused_without_reading_it_all(tmp_path: Path) -> None:
    path = tmp_path / "big.toml"
    path.write_bytes(b"# " + b"x" * (1024 * 1024) + b"\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, {})
    assert str(info.value) == f"config error: {path}: larger than 1024 KiB: is it the right file?"


def test_a_config_can_come_from_a_pipe() -> None:
    """`tsechod check-config --config /dev/stdin < file` works: no regular-file check."""
    read_fd, write_fd = os.pipe()
    with os.fdopen(write_fd, "wb") as writer:
        writer.write(b"[server]\nbacklog = 3\n")
    try:
        assert load_config(Path(f"/dev/fd/{read_fd}"), {}).backlog == 3
    finally:
        os.close(read_fd)


# --------------------------------------------------------------------------
# [[listener]] tables: strict errors (file, table number, key), sources, check-config, reload

LB = '[[listener]]\naddress = "0.0.0.0:8009"\nproxy_protocol = "v2"\nproxy_trusted = ["10.0.0.0/8"]\n'


@pytest.mark.parametrize(("text", "message"), [
    (LB + '\n[[listener]]\naddress = "127.0.0.1:1"\nproxy_protocol = "v3"\n',
     '[[listener]] #2 proxy_protocol = "v3": must be one of off, v1, v2, any'),
    ('[[listener]]\naddress = "127.0.0.1:1"\nproxy_trustd = ["10.0.0.0/8"]\n',
     "[[listener]] #1: unknown key 'proxy_trustd' (did you mean 'proxy_trusted'?)"),
    ('[[listener]]\nproxy_protocol = "v1"\n',
     '[[listener]] #1: address is missing (e.g. address = "0.0.0.0:8009")'),
    ('[[listener]]\naddress = "127.0.0.1"\n',
     "[[listener]] #1 address = \"127.0.0.1\": invalid listen address '127.0.0.1': missing port "
     "(expected host:port, e.g. 127.0.0.1:8009 or [::1]:8009)"),
    ('[[listener]]\naddress = "127.0.0.1:1"\nproxy_protocol = "v1"\n',
     '[[listener]] #1 proxy_protocol = "v1": needs proxy_trusted, the addresses of the proxies allowed to send '
     'a header (e.g. proxy_trusted = ["10.0.0.0/8"])'),
    ('[[listener]]\naddress = "127.0.0.1:1"\nproxy_trusted = ["10.0.0.1/8"]\n',
     '[[listener]] #1 proxy_trusted = ["10.0.0.1/8"]: item 0 "10.0.0.1/8": 10.0.0.1/8 has host bits set; '
     "did you mean 10.0.0.0/8?"),
    ('[[listener]]\naddress = "127.0.0.1:1"\nproxy_untrusted = "allow"\n',
     '[[listener]] #1 proxy_untrusted = "allow": must be one of refuse, direct'),
    ('[[listener]]\naddress = "127.0.0.1:1"\nname = "my lb"\n',
     "[[listener]] #1 name = \"my lb\": must be 1-255 characters A-Z a-z 0-9 . _ - "
     "(it matches systemd's FileDescriptorName=)"),
    (LB + '[[listener]]\naddress = "0.0.0.0:8009"\n',
     '[[listener]] #2 address = "0.0.0.0:8009": already the address of [[listener]] #1'),
    ('[[listener]]\naddress = "127.0.0.1:1"\nname = "a"\n[[listener]]\naddress = "127.0.0.1:2"\nname = "a"\n',
     '[[listener]] #2 name = "a": already the name of [[listener]] #1'),
    ('[server]\nlisten = ["127.0.0.1:1"]\n' + '[[listener]]\naddress = "127.0.0.1:1"\n',
     '[[listener]] #1 address = "127.0.0.1:1": already in listen (file {path}); list each address once'),
    ('[listener]\naddress = "127.0.0.1:1"\n', "[listener] must be written [[listener]] (one table per listener)"),
    ('[access]\nrules = ["allow 10.0.0.0/8", "permit all"]\n',
     '[access] rules = ["allow 10.0.0.0/8", "permit all"]: rules[1] = "permit all": unknown action "permit"; '
     'a rule is "allow" or "deny", one space, then an address (192.0.2.7), a network (10.0.0.0/8, '
     '2001:db8::/32) or "all"'),
    ("[limits]\nconnection_rate_per_ip = -1\n",
     "[limits] connection_rate_per_ip = -1: must be a number of connections per second >= 0 (0 = off; "
     "at most 1000000)"),
])
def test_listener_and_access_errors_name_the_file_table_and_key(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path, {})
    assert str(info.value) == f"config error: {path}: " + message.format(path=path)


def test_listener_tables_replace_the_default_listen_and_keep_an_explicit_one(tmp_path: Path) -> None:
    path = write(tmp_path, LB)
    config, sources = load_config_with_sources(path, {})
    assert config.listen == ()
    [listener] = config.listeners
    assert (str(listener.address), listener.proxy_protocol, listener.proxy_trusted, listener.proxy_untrusted) == (
        "0.0.0.0:8009", "v2", ("10.0.0.0/8",), "refuse")
    assert sources["listener #1 proxy_protocol"] == f"file {path}"
    assert "listener #1 proxy_untrusted" not in sources  # default
    config = load_config(path, {}, {"listen": ["127.0.0.1:1"]})
    assert [(str(l.address), l.proxy_protocol) for l in config.listeners] == [
        ("127.0.0.1:1", "off"), ("0.0.0.0:8009", "v2")]


def test_check_config_shows_every_listener_with_sources_and_loads_back(tmp_path: Path) -> None:
    path = write(tmp_path, LB + '\n[[listener]]\naddress = "[::1]:9"\nname = "plain"\n')
    config, sources = load_config_with_sources(path, {})
    text = format_config(config, sources)
    assert "[[listener]]  # #1" in text and "[[listener]]  # #2" in text
    assert f'proxy_protocol = "v2"  # file {path}' in text
    assert 'proxy_untrusted = "refuse"  # default' in text
    assert "# listen is not used: the [[listener]] tables below say where  # default" in text
    again = write(tmp_path, text, "again.toml")
    assert load_config(again, {}) == config


def test_reload_takes_listener_proxy_settings_but_keeps_their_sockets(tmp_path: Path) -> None:
    from tsecho.service import reload_config

    running = load_config(write(tmp_path, LB), {})
    changed = write(tmp_path, LB.replace('"v2"', '"any"'), "changed.toml")
    assert reload_config(lambda: load_config(changed, {}), running).listeners[0].proxy_protocol == "any"
    moved = write(tmp_path, LB.replace("0.0.0.0:8009", "0.0.0.0:8010"), "moved.toml")
    assert reload_config(lambda: load_config(moved, {}), running).listeners == running.listeners
