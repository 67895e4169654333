"""The reply prefix template, ``[echo] prefix``: validation, the bytes it puts on the wire, who answered.

The default must keep today's wire format byte for byte (and take the old code
path); a custom prefix is checked against an independent oracle (per-line
string formatting) and on a real daemon, with one worker and with two, and
through ``tsecho ping``, which shows what the prefix says besides the stamp.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from conftest import Daemon, daemon_env
from helpers import CTIME_REPLY, recv_lines
from tsecho.config import ConfigError, load_config
from tsecho.protocol import DEFAULT_PREFIX, format_replies, make_prefixer
from tsecho.systemd import unit_instance

STAMP = b"Thu Sep 15 22:29:12 2016"


# -- validation ------------------------------------------------------------------------------

@pytest.mark.parametrize(("template", "reason"), [
    ("[{stamp}] {node} ", "unknown placeholder {node}: allowed are {stamp}, {host}, {instance}, {worker}"),
    ("[{stamp}] {worker:03d} ", "placeholder {worker} takes no conversion or format spec"),
    ("[{stamp!r}] ", "placeholder {stamp} takes no conversion or format spec"),
    ("{host} ", "must contain {stamp} exactly once (the timestamp is the reply's point)"),
    ("{stamp} {stamp} ", "must contain {stamp} exactly once (the timestamp is the reply's point)"),
    ("[{stamp}] {", "Single '{' encountered in format string (write {{ or }} for a literal brace)"),
    ("[{stamp}]\\n", "must not contain control characters (a reply is one line)"),
    ("{stamp}" + "x" * 300, "must be at most 256 characters, not 307"),
])
def test_a_bad_prefix_is_a_config_error_naming_file_key_and_what_is_allowed(
        tmp_path: Path, template: str, reason: str) -> None:
    path = tmp_path / "t.toml"
    path.write_text(f'[echo]\nprefix = "{template}"\n')
    with pytest.raises(ConfigError) as caught:
        load_config(path, {})
    message = str(caught.value)
    assert message.startswith(f"config error: {path}: [echo] prefix = ") and message.endswith(reason), message


def test_tsechod_refuses_an_unknown_placeholder_with_status_78(tmp_path: Path) -> None:
    path = tmp_path / "t.toml"
    path.write_text('[echo]\nprefix = "[{stamp}] {nodename}: "\n')
    result = subprocess.run([sys.executable, "-m", "tsecho.cli", "--config", str(path), "check-config"],
                            capture_output=True, text=True, timeout=30, env=daemon_env())
    assert result.returncode == 78
    assert result.stderr.strip() == (f'tsechod: config error: {path}: [echo] prefix = "[{{stamp}}] {{nodename}}: ": '
                                     "unknown placeholder {nodename}: allowed are {stamp}, {host}, {instance}, "
                                     "{worker}")


def test_braces_can_be_written_doubled(tmp_path: Path) -> None:
    path = tmp_path / "t.toml"
    path.write_text('[echo]\nprefix = "{{{stamp}}} "\n')
    assert load_config(path, {}).prefix == "{{{stamp}}} "
    prefixer = make_prefixer("{{{stamp}}} ", "h", "i", 0)
    assert prefixer is not None and format_replies(b"a\n", STAMP, prefixer) == b"{" + STAMP + b"} a\n"


# -- the bytes -------------------------------------------------------------------------------

def test_the_default_prefix_is_todays_format_and_takes_the_old_path() -> None:
    assert make_prefixer(DEFAULT_PREFIX, "h", "i", 3) is None
    assert format_replies(b"a\nb\r\n\n", STAMP) == b"[" + STAMP + b"] a\n[" + STAMP + b"] b\r\n[" + STAMP + b"] \n"
    assert make_prefixer("[{stamp}]  ", "h", "i", 0) is not None  # any other spelling is a custom prefix


PIECES = st.sampled_from(["[", "]", " ", ": ", "w", "{host}", "{instance}", "{worker}", "{{", "}}", "é", "x"])


@given(before=st.lists(PIECES, max_size=6), after=st.lists(PIECES, max_size=6),
       lines=st.lists(st.binary(max_size=20).map(lambda b: b.replace(b"\n", b"")), min_size=1, max_size=8),
       worker=st.integers(0, 64))
def test_a_custom_prefix_matches_formatting_each_line(before: list[str], after: list[str], lines: list[bytes],
                                                      worker: int) -> None:
    template = "".join(before) + "{stamp}" + "".join(after)
    prefixer = make_prefixer(template, "web-2", "b", worker)
    block = b"".join(line + b"\n" for line in lines)
    oracle = b"".join(
        template.replace("{stamp}", "\0").format(host="web-2", instance="b", worker=worker)
        .encode().replace(b"\0", STAMP) + line + b"\n"
        for line in lines)
    if prefixer is None:
        assert template == DEFAULT_PREFIX
        prefixer_result = format_replies(block, STAMP)
    else:
        prefixer_result = format_replies(block, STAMP, prefixer)
    assert prefixer_result == oracle


# -- {instance} ------------------------------------------------------------------------------

@pytest.mark.parametrize(("cgroup", "instance"), [
    ("0::/system.slice/system-tsechod.slice/tsechod@b.service\n", "b"),
    ("0::/system.slice/tsechod-b.service\n", "tsechod-b"),
    ("12:pids:/system.slice/tsechod.service\n0::/system.slice/tsechod.service\n", "tsechod"),
    ("0::/user.slice/user-0.slice/session-3.scope\n", str(os.getpid())),
])
def test_instance_is_the_systemd_unit(tmp_path: Path, cgroup: str, instance: str) -> None:
    path = tmp_path / "cgroup"
    path.write_text(cgroup)
    assert unit_instance({"INVOCATION_ID": "x"}, str(path)) == instance


def test_outside_systemd_the_instance_is_the_process_id(tmp_path: Path) -> None:
    path = tmp_path / "cgroup"
    path.write_text("0::/system.slice/tsechod.service\n")
    assert unit_instance({}, str(path)) == str(os.getpid())
    assert unit_instance({"INVOCATION_ID": "x"}, str(tmp_path / "missing")) == str(os.getpid())


# -- on a real daemon ------------------------------------------------------------------------

LABELLED = '[echo]\nprefix = "[{stamp}] {host}/{instance} w{worker}: "\n'


def test_a_daemon_with_a_prefix_says_who_answered(tsechod: Callable[..., Daemon]) -> None:
    daemon = tsechod(LABELLED)
    with daemon.connect() as sock:
        sock.sendall(b"a\r\nb\n")
        first, second = recv_lines(sock, 2)
    label = f"{socket.gethostname()}/{daemon.pid} w0: ".encode()
    for line, text in ((first, b"a"), (second, b"b")):
        assert CTIME_REPLY.match(line), line
        assert line.endswith(b"] " + label + text), line


def test_each_worker_fills_in_its_own_index(tsechod: Callable[..., Daemon]) -> None:
    daemon = tsechod(LABELLED + "[server]\nworkers = 2\n")
    seen: set[bytes] = set()
    deadline = time.monotonic() + 10
    while seen != {b"0", b"1"} and time.monotonic() < deadline:
        with daemon.connect() as sock:
            sock.sendall(b"x\n")
            [line] = recv_lines(sock, 1)
        match = re.search(rb"/(\d+) w(\d+): x$", line)
        assert match, line
        seen.add(match[2])
    assert seen == {b"0", b"1"}


def test_ping_shows_the_instance_the_prefix_names(tsechod: Callable[..., Daemon]) -> None:
    daemon = tsechod('[echo]\ntimestamp = "iso"\nprefix = "[{stamp}] {instance} w{worker}: "\n')
    result = subprocess.run([sys.executable, "-W", "error", "-m", "tsecho.client", "ping", "-c", "2", "-i", "0.02",
                             f"{daemon.host}:{daemon.port}"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert f"reply from {daemon.host}:{daemon.port} ({daemon.pid} w0): seq=1 rtt=" in result.stdout
    assert "from the lowest-RTT probe" in result.stdout
