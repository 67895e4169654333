"""Tests for tsecho.config: parsing, validation, precedence, messages, shipped files."""

from __future__ import annotations

import os
import re
import tomllib
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tsecho.config import (
    DEFAULT_CONFIG_PATH,
    KEYS,
    KEYS_BY_NAME,
    SECTIONS,
    Config,
    ConfigError,
    ListenAddress,
    find_config_path,
    format_config,
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
    assert [key.name for key in KEYS] == list(Config.__dataclass_fields__)
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
    for line in text.splitlines():
        if m := re.fullmatch(r"\[(\w+)\]", line):
            section = m.group(1)
        elif m := re.match(r"#? ?(\w+) = ", line):
            assert section is not None
            seen[m.group(1)] = section
    assert seen == {key.name: key.section for key in KEYS}


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
        elif line.startswith("| `") and section is not None:
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows[cells[0].strip("`")] = [section, *cells[1:]]
    return rows


@pytest.mark.parametrize("key", KEYS, ids=lambda k: k.name)
def test_docs_document_every_key_with_section_default_env_and_flag(key) -> None:
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
        assert tomllib.loads(f"v = {default.strip('`')}")["v"] == key.default
    assert env.startswith(f"`{key.env}`")
    if key.flag_name:
        assert flag.startswith(f"`{key.flag_name}`")
    else:
        assert flag == "—"


def test_docs_list_exactly_the_keys() -> None:
    assert set(_docs_rows()) == set(KEYS_BY_NAME)


def test_flags_are_the_documented_set() -> None:
    assert {key.flag_name for key in KEYS if key.flag_name} == {
        "--listen", "--log-level", "--log-target", "--log-file", "--log-format", "--timestamp",
        "--idle-timeout-s", "--workers", "--pid-file", "--user", "--group",
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
     "unknown key 'zzz' in [server] (keys in [server]: listen, backlog, idle_timeout_s, shutdown_timeout_s, workers)"),
    ("[echo]\nbacklog = 5\n", "key 'backlog' belongs in [server], not in [echo]"),
    ("[daemon]\nlog_level = \"info\"\n", "key 'log_level' belongs in [log], not in [daemon]"),
    ("backlog = 5\n", "key 'backlog' must be in a section: put it under [server]"),
    ("backlogg = 5\n", "unknown key 'backlogg' outside any section (did you mean 'backlog' in [server]?)"),
    ("zzz = 5\n",
     "unknown key 'zzz' outside any section (keys go in a section: [server], [echo], [log], [limits], [daemon])"),
    ("[sever]\nbacklog = 5\n", "unknown section [sever] (did you mean [server]?)"),
    ("[tls]\n", "unknown section [tls] (sections: [server], [echo], [log], [limits], [daemon])"),
    ("[backlog]\n", "unknown section [backlog] ('backlog' is a key in [server])"),
    ("server = 1\n", "'server' must be a section ([server]), not an integer"),
    ("[[server]]\nbacklog = 5\n", "'server' must be a section ([server]), not an array"),
    ("[server.tls]\ncert = 1\n",
     "unknown key 'tls' in [server] (keys in [server]: listen, backlog, idle_timeout_s, shutdown_timeout_s, workers)"),
    # syntax
    ("[server]\nbacklog = \n", "invalid TOML: Invalid value (at line 2, column 11)"),
    ("[server\n", "invalid TOML: Expected ']' at the end of a table declaration (at line 1, column 8)"),
    ("[server]\nbacklog = 1\nbacklog = 2\n", "invalid TOML: Cannot overwrite a value (at line 3, column 12)"),
    ("a = " + "[" * 2000 + "]" * 2000 + "\n", "invalid TOML: values nested too deeply"),
    ("[server]\nbacklog = " + "1" * 5000 + "\n", "invalid TOML: an integer has too many digits"),
]


@pytest.mark.parametrize(("text", "message"), FILE_ERRORS, ids=[m[:60] for _, m in FILE_ERRORS])
def test_file_error_names_file_key_value_and_what_is_allowed(tmp_path, text, message) -> None:
    path = tmp_path / "tsechod.toml"
    assert file_error(path, text) == f"config error: {path}: {message}"


def test_first_error_in_file_order_is_reported(tmp_path) -> None:
    path = tmp_path / "t.toml"
    message = file_error(path, "[echo]\nutc = 2\n[server]\nbacklog = 0\n")
    assert message == f"config error: {path}: [echo] utc = 2: must be true or false, not an integer"


def test_non_utf8_file_is_an_error_with_its_line(tmp_path) -> None:
    path = tmp_path / "t.toml"
    path.write_bytes(b"[echo]\n# caf\xe9\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, {})
    assert str(info.value) == f"config error: {path}: not valid UTF-8 (byte 0xe9 at line 2)"


def test_a_byte_order_mark_is_accepted(tmp_path) -> None:
    path = tmp_path / "t.toml"
    path.write_bytes(b"\xef\xbb\xbf[server]\nbacklog = 7\n")
    assert load_config(path, {}).backlog == 7


def test_unreadable_file_gives_the_os_reason(tmp_path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path, {})  # a directory: read fails with EISDIR
    assert str(info.value) == f"config error: {tmp_path}: cannot read: Is a directory"
    missing = tmp_path / "gone.toml"
    with pytest.raises(ConfigError) as info:
        load_config(missing, {})
    assert str(info.value) == f"config error: {missing}: cannot read: No such file or directory"


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_permission_denied_is_reported(tmp_path) -> None:
    path = write(tmp_path, "")
    path.chmod(0)
    with pytest.raises(ConfigError) as info:
        load_config(path, {})
    assert str(info.value) == f"config error: {path}: cannot read: Permission denied"


def test_long_and_control_character_values_stay_on_one_short_line(tmp_path) -> None:
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
def test_environment_error_names_the_variable_value_and_what_is_allowed(environ, message) -> None:
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
def test_flag_error_names_the_flag_value_and_what_is_allowed(overrides, message) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, {}, overrides)
    assert str(info.value) == f"config error: {message}"


def test_log_target_file_error_names_where_log_target_came_from(tmp_path) -> None:
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

