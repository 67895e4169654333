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
