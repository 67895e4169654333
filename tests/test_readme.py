"""The README's two commands stay true: command 1 really serves on 8009, CI runs command 2."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess

import psutil
import pytest
from helpers import CTIME_REPLY, REPO, require_tool, wait_until
from conftest import daemon_env


def readme_commands() -> list[str]:
    """The commands of the README's "Two commands" block, without their comments."""
    text = (REPO / "README.md").read_text()
    section = text.split("## Two commands", 1)[1]
    block = re.search(r"```\n(.*?)```", section, re.S).group(1)
    return [line.split("#", 1)[0].strip() for line in block.splitlines() if line.strip()]


def test_readme_has_two_commands_and_ci_runs_the_second() -> None:
    run_cmd, test_cmd = readme_commands()
    assert run_cmd == "make run" and test_cmd == "make test"
    ci_lines = [line.strip() for line in (REPO / ".ci" / "run").read_text().splitlines()]
    assert ci_lines[-1] == test_cmd


def port_is_free(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        return probe.connect_ex((host, port)) != 0


def test_readme_command_1_serves_the_shipped_config_on_8009() -> None:
    require_tool("make")
    nc = require_tool("nc")
    if not (port_is_free("127.0.0.1", 8009) and port_is_free("::1", 8009)):
        message = "something already listens on port 8009 (a tsechod of your own?)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    run_cmd = readme_commands()[0]
    proc = subprocess.Popen(run_cmd.split(), cwd=REPO, env=daemon_env(), stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    output = b""
    try:
        assert proc.stdout is not None
        os.set_blocking(proc.stdout.fileno(), False)

        def both_listening() -> bool:
            nonlocal output
            output += proc.stdout.read() or b""  # type: ignore[union-attr]
            return b"listening on 127.0.0.1:8009" in output and b"listening on [::1]:8009" in output

        wait_until(both_listening, timeout=120)
        for host in ("127.0.0.1", "::1"):
            out = subprocess.run([nc, "-N", host, "8009"], input=b"hello python\n", capture_output=True,
                                 timeout=10).stdout
            assert CTIME_REPLY.match(out) and out.endswith(b"] hello python\n"), out
        [daemon] = [p for p in psutil.Process(proc.pid).children(recursive=True) if "tsechod" in " ".join(p.cmdline())]
        daemon.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            for child in psutil.Process(proc.pid).children(recursive=True):
                child.kill()
            proc.kill()
            proc.wait(timeout=10)
        if proc.stdout is not None:
            proc.stdout.close()
