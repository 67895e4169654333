"""The fixtures: a real tsechod subprocess (``tsechod``) and an in-process server (``server``).

Nothing here fakes the daemon: ``tsechod`` starts ``python -m tsecho.cli`` for
real on port 0 and reads the port from its ``listening on`` log line. The one
substitute is the clock of the in-process server (``FIXED_NOW``). Plain helpers
(sockets, waiting, process figures, log parsing) are in helpers.py.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from helpers import wait_until

from tsecho.config import Config, parse_listen
from tsecho.server import EchoServer, open_servers
from tsecho.state import ServerState

FIXED_NOW = 1473978552.123456  # Thu Sep 15 22:29:12 2016 UTC: helpers.STAMP

# A shell without job control starts a background command (`make test &`) with SIGINT ignored,
# and every process the suite starts would inherit that: the Ctrl-C tests' clients would never
# see their Ctrl-C. A handled signal is reset to the default across exec, so this gives the
# children theirs back.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@dataclass
class Daemon:
    """A running tsechod subprocess; its stderr goes to a file we can read while it runs."""

    proc: subprocess.Popen[bytes]
    stderr_path: Path
    config_path: Path
    addresses: list[str] = field(default_factory=list)

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def address(self) -> tuple[str, int]:
        """The first listener as (host, port), ready for socket.create_connection."""
        host, port = parse_listen(self.addresses[0])
        return host, port

    @property
    def host(self) -> str:
        return self.address[0]

    @property
    def port(self) -> int:
        return self.address[1]

    def log_text(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def wait_for_log(self, pattern: str, timeout: float = 10.0, count: int = 1) -> list[re.Match[str]]:
        """Wait until *pattern* matches at least *count* times in the log; return the matches."""
        regex = re.compile(pattern)

        def found() -> list[re.Match[str]] | None:
            matches = list(regex.finditer(self.log_text()))
            if len(matches) >= count:
                return matches
            if self.proc.poll() is not None:
                raise AssertionError(f"tsechod exited ({self.proc.returncode}) before logging {pattern!r}:\n"
                                     + self.log_text())
            return None

        return wait_until(found, timeout)  # type: ignore[return-value]

    def connect(self, timeout: float = 5.0, index: int = 0) -> socket.socket:
        host, port = parse_listen(self.addresses[index])
        return socket.create_connection((host, port), timeout=timeout)

    def send(self, signum: int) -> None:
        self.proc.send_signal(signum)

    def stop(self, signum: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signum)
        return self.proc.wait(timeout=timeout)

    def rewrite_config(self, text: str) -> None:
        self.config_path.write_text(text)


def daemon_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for a tsechod child: ours, minus TSECHOD_* and systemd's variables."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("TSECHOD_") and k not in ("NOTIFY_SOCKET", "INVOCATION_ID", "JOURNAL_STREAM",
                                                          "LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


@pytest.fixture
def tsechod(tmp_path: Path) -> Iterator[Callable[..., Daemon]]:
    """Factory: ``tsechod(config_text, *args, env=None, listen=("127.0.0.1:0",))`` starts a real daemon.

    It waits for one ``listening on`` line per listen address. Every daemon still
    running at the end of the test is killed by its PID.
    """
    started: list[Daemon] = []

    def start(config_text: str = "", *args: str, env: dict[str, str] | None = None,
              listen: tuple[str, ...] = ("127.0.0.1:0",), wait: bool = True) -> Daemon:
        n = len(started)
        config_path = tmp_path / f"tsechod{n}.toml"
        config_path.write_text(config_text)
        stderr_path = tmp_path / f"tsechod{n}.stderr"
        argv = [sys.executable, "-m", "tsecho.cli", "--config", str(config_path)]
        for address in listen:
            argv += ["--listen", address]
        argv += list(args)
        with open(stderr_path, "wb") as stderr:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr,
                                    env=daemon_env(env), cwd=tmp_path)
        daemon = Daemon(proc, stderr_path, config_path)
        started.append(daemon)
        if wait:
            matches = daemon.wait_for_log(r"listening on (\S+)", count=max(1, len(listen)))
            daemon.addresses = [m.group(1) for m in matches]
        return daemon

    yield start
    for daemon in started:
        if daemon.proc.poll() is None:
            daemon.proc.terminate()  # a supervisor stops its workers on SIGTERM
            try:
                daemon.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                daemon.proc.kill()
                daemon.proc.wait(timeout=10)


@pytest.fixture
def server_factory() -> Iterator[Callable[..., EchoServer]]:
    """Factory for in-process servers on 127.0.0.1:0 with a fixed clock (FIXED_NOW, UTC)."""
    running: list[tuple[EchoServer, threading.Thread]] = []

    def start(**settings: object) -> EchoServer:
        settings.setdefault("utc", True)
        config = Config(listen=(parse_listen("127.0.0.1:0"),), **settings)  # type: ignore[arg-type]
        state = ServerState(config, clock=lambda: FIXED_NOW)
        [server] = open_servers(config, state)
        thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        thread.start()
        running.append((server, thread))
        return server

    yield start
    for server, thread in running:
        server.shutdown()
        thread.join(timeout=5)
        server.server_close()
        server.state.begin_stop(1.0)
        server.state.wait_closed(3.0)
        server.state.close()


@pytest.fixture
def server(server_factory: Callable[..., EchoServer]) -> EchoServer:
    return server_factory()


@pytest.fixture(scope="session")
def tls_certs(tmp_path_factory: pytest.TempPathFactory) -> object:
    """Certificates for the TLS tests (tlscerts.Certs), made once per session."""
    from tlscerts import make_certs  # here, not at the top: only TLS tests need trustme

    return make_certs(tmp_path_factory.mktemp("tls"))
