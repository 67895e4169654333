"""A real tsechod process: what users see with nc, telnet, signals and config files."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pexpect
import pytest
from helpers import CTIME_REPLY, REPO, fan_out, recv_all, recv_lines, require_tool, wait_until
from conftest import daemon_env

ISO_REPLY = re.compile(rb"^\[\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}[+-]\d\d:\d\d\] ")
ACCESS = r"(\S+) closed reason=(\S+) duration_s=\S+ lines=(\d+) bytes_in=(\d+) bytes_out=(\d+)"


def run_tsechod(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None,
                timeout: float = 20) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tsecho.cli", *args], capture_output=True, text=True,
                          env=daemon_env(env), cwd=cwd, timeout=timeout, stdin=subprocess.DEVNULL)


# -- the wire, through real clients ---------------------------------------------------------


def test_nc_round_trip_with_current_local_ctime(tsechod) -> None:
    nc = require_tool("nc")
    d = tsechod()
    before = time.time()
    out = subprocess.run([nc, "-N", d.host, str(d.port)], input=b"hello python\n", capture_output=True,
                         timeout=10).stdout
    assert CTIME_REPLY.match(out), out
    assert out.endswith(b"] hello python\n")
    stamp = out[1:25].decode()
    assert stamp in {time.ctime(before), time.ctime(before + 1), time.ctime(time.time())}
    d.wait_for_log(ACCESS)


def test_nc_half_close_partial_line_is_answered(tsechod) -> None:
    nc = require_tool("nc")
    d = tsechod()
    out = subprocess.run([nc, "-N", d.host, str(d.port)], input=b"abc", capture_output=True, timeout=10).stdout
    assert CTIME_REPLY.match(out) and out.endswith(b"] abc\n"), out


def test_socat_crlf_round_trip(tsechod) -> None:
    socat = require_tool("socat")
    d = tsechod()
    out = subprocess.run([socat, "-", f"TCP:{d.host}:{d.port}"], input=b"one\r\ntwo\r\n", capture_output=True,
                         timeout=10).stdout
    lines = out.split(b"\r\n")
    assert len(lines) == 3 and lines[2] == b"", out
    assert lines[0].endswith(b"] one") and lines[1].endswith(b"] two")


def test_telnet_session_with_negotiation_and_quit(tsechod) -> None:
    telnet = require_tool("telnet")
    d = tsechod()
    child = pexpect.spawn(telnet, [d.host, str(d.port)], timeout=10, env=daemon_env({"TERM": "dumb"}))
    try:
        child.expect_exact("Escape character is '^]'.")
        child.sendline("hello python")
        child.expect(r"\[\w{3} \w{3} [ \d]\d \d\d:\d\d:\d\d \d{4}\] hello python\r\n")
        # Character mode makes telnet negotiate options (IAC DO/WILL ...) and send CR NUL for Enter.
        child.sendcontrol("]")
        child.expect_exact("telnet>")
        child.sendline("mode character")
        child.send("abc\r")
        child.expect(r"\] abc\r\n")
        child.sendcontrol("]")
        child.expect_exact("telnet>")
        child.sendline("quit")
        child.expect_exact("Connection closed.")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0
    [match] = d.wait_for_log(ACCESS)
    assert match.group(2) == "eof" and match.group(3) == "2"
    # The access log counted 2 lines, and the reply bytes held no IAC (0xFF) bytes: see the byte count.
    assert "\\xff" not in d.log_text()


def test_telnet_negotiation_bytes_never_reach_a_reply(tsechod) -> None:
    d = tsechod()
    with d.connect() as sock:
        sock.sendall(b"\xff\xfd\x03\xff\xfb\x18\xff\xfa\x18\x00xterm\xff\xf0hi\xff\xff!\r\n")
        [reply] = recv_lines(sock, 1)
    assert reply.endswith(b"] hi\xff!") and CTIME_REPLY.match(reply)


def test_telnet_interrupt_closes_politely(tsechod) -> None:
    d = tsechod()
    with d.connect() as sock:
        sock.sendall(b"last\r\n\xff\xf4")
        data = recv_all(sock)
    assert data.endswith(b"] last\r\n")
    assert d.wait_for_log(ACCESS)[0].group(2) == "interrupt"


def test_ipv6_loopback(tsechod) -> None:
    d = tsechod(listen=("127.0.0.1:0", "[::1]:0"))
    assert d.addresses[0].startswith("127.0.0.1:") and d.addresses[1].startswith("[::1]:")
    with d.connect(index=1) as sock:
        sock.sendall(b"over v6\n")
        [reply] = recv_lines(sock, 1)
    assert reply.endswith(b"] over v6")
    assert re.search(r"\[::1\]:\d+ closed reason=eof", d.wait_for_log(ACCESS)[0].group(0))


def test_200_concurrent_clients_get_every_reply_right_and_in_order(tsechod) -> None:
    d = tsechod()
    errors: list[str] = []

    def client(n: int) -> None:
        try:
            with d.connect(timeout=20) as sock:
                lines = [b"client %03d line %02d" % (n, i) for i in range(20)]
                sock.sendall(b"".join(line + b"\n" for line in lines))
                replies = recv_lines(sock, 20, timeout=20)
            for line, reply in zip(lines, replies, strict=True):
                if not (CTIME_REPLY.match(reply) and reply.endswith(b"] " + line)):
                    errors.append(f"{n}: {reply!r}")
        except (OSError, ValueError) as err:
            errors.append(f"{n}: {err}")

    fan_out(200, client, timeout=60)
    assert errors == []
    d.wait_for_log(r"closed reason=eof", count=200, timeout=20)


def test_too_long_line_gets_err_and_a_warning(tsechod) -> None:
    d = tsechod("[echo]\nmax_line_bytes = 16\n")
    with d.connect() as sock:
        sock.sendall(b"x" * 40 + b"\n")
        assert recv_all(sock) == b"ERR line too long (max 16 bytes)\n"
    d.wait_for_log(r"WARNING tsecho.handler: 127\.0\.0\.1:\d+ closed: line too long \(max 16 bytes\)")
    assert d.wait_for_log(ACCESS)[0].group(2) == "too-long"


def test_idle_client_is_closed_and_logged(tsechod) -> None:
    d = tsechod("[server]\nidle_timeout_s = 0.5\n")
    with d.connect() as sock:
        assert recv_all(sock) == b""
    assert d.wait_for_log(ACCESS)[0].group(2) == "idle"


def test_client_bytes_are_escaped_in_debug_log(tsechod) -> None:
    d = tsechod("[log]\nlog_level = \"debug\"\n")
    with d.connect() as sock:
        sock.sendall(b"evil\n2026-01-01 INFO forged line\x1b[31m\n")
        recv_lines(sock, 2)
    d.wait_for_log(ACCESS)
    log = d.log_text()
    assert "evil\\n2026-01-01 INFO forged line\\x1b[31m\\n" in log
    assert not any(line.startswith("2026-01-01 INFO forged") for line in log.splitlines())


def test_payloads_are_not_logged_at_info(tsechod) -> None:
    d = tsechod()
    with d.connect() as sock:
        sock.sendall(b"secret-payload\n")
        recv_lines(sock, 1)
    d.wait_for_log(ACCESS)
    assert "secret-payload" not in d.log_text()


# -- signals ----------------------------------------------------------------------------------


def test_sigterm_with_idle_clients_exits_0_within_shutdown_timeout(tsechod) -> None:
    d = tsechod("[server]\nshutdown_timeout_s = 3\nidle_timeout_s = 300\n")
    clients = [d.connect() for _ in range(5)]
    try:
        for sock in clients:
            sock.sendall(b"hi\n")
            recv_lines(sock, 1)
        started = time.monotonic()
        assert d.stop(signal.SIGTERM, timeout=10) == 0
        assert time.monotonic() - started < 3 + 1.5
        for sock in clients:
            assert recv_all(sock) == b""  # FIN
    finally:
        for sock in clients:
            sock.close()
    log = d.log_text()
    assert "received SIGTERM: stopping" in log
    assert len(re.findall(r"closed reason=shutdown", log)) == 5
    assert "Traceback" not in log


def test_sigint_stops_cleanly_too(tsechod) -> None:
    d = tsechod()
    assert d.stop(signal.SIGINT) == 0
    assert "received SIGINT: stopping" in d.log_text()


def test_sighup_switches_timestamp_for_a_connected_client(tsechod) -> None:
    d = tsechod("[echo]\ntimestamp = \"ctime\"\n")
    with d.connect() as sock:
        sock.sendall(b"before\n")
        [reply] = recv_lines(sock, 1)
        assert CTIME_REPLY.match(reply)
        d.rewrite_config("[echo]\ntimestamp = \"iso\"\n")
        d.send(signal.SIGHUP)
        d.wait_for_log(r"reloaded config: timestamp=iso")
        sock.sendall(b"after\n")
        [reply] = recv_lines(sock, 1)
        assert ISO_REPLY.match(reply) and reply.endswith(b"] after"), reply


def test_sighup_with_a_broken_file_keeps_the_running_config(tsechod) -> None:
    d = tsechod("[echo]\ntimestamp = \"epoch\"\n")
    d.rewrite_config("[echo]\ntimestamp = \"epoch\"\nbogus = 1\n")
    d.send(signal.SIGHUP)
    d.wait_for_log(r"ERROR tsecho.service: reload failed, keeping the running config: config error: .*unknown key")
    with d.connect() as sock:
        sock.sendall(b"x\n")
        [reply] = recv_lines(sock, 1)
    assert re.match(rb"^\[\d+\.\d{6}\] x$", reply)


def test_sighup_with_changed_listen_says_restart_needed(tsechod) -> None:
    d = tsechod("[server]\nlisten = [\"127.0.0.1:0\"]\n", listen=())
    d.rewrite_config("[server]\nlisten = [\"127.0.0.1:1\"]\n")
    d.send(signal.SIGHUP)
    d.wait_for_log(r"reload: listen changed; it applies only after a restart")
    with d.connect() as sock:
        sock.sendall(b"still\n")
        assert recv_lines(sock, 1)[0].endswith(b"] still")


def test_sigusr1_after_renaming_the_log_file_makes_a_new_one(tsechod, tmp_path: Path) -> None:
    log = tmp_path / "tsechod.log"
    d = tsechod("[log]\nlog_target = \"file\"\nlog_file = \"tsechod.log\"\n", wait=False)
    match = wait_until(lambda: log.exists() and re.search(r"listening on (\S+)", log.read_text()))
    d.addresses = [match.group(1)]  # type: ignore[union-attr]
    assert oct(log.stat().st_mode & 0o777) == "0o640"
    log.rename(tmp_path / "tsechod.log.1")
    d.send(signal.SIGUSR1)
    wait_until(lambda: log.exists())
    with d.connect() as sock:
        sock.sendall(b"after rotate\n")
        recv_lines(sock, 1)
    wait_until(lambda: "closed reason=eof" in log.read_text())
    assert "closed reason=eof" not in (tmp_path / "tsechod.log.1").read_text()
    assert d.stop() == 0


def test_json_log_format_carries_the_access_fields(tsechod) -> None:
    d = tsechod("[log]\nlog_format = \"json\"\n", wait=False)
    match = wait_until(lambda: re.search(r'"message": "listening on (\S+)"', d.log_text()))
    d.addresses = [match.group(1)]  # type: ignore[union-attr]
    with d.connect() as sock:
        sock.sendall(b"a\nb\n")
        recv_lines(sock, 2)
    wait_until(lambda: '"event": "access"' in d.log_text())
    events = [json.loads(line) for line in d.log_text().splitlines()]
    [access] = [e for e in events if e.get("event") == "access"]
    assert access["reason"] == "eof" and access["lines"] == 2 and access["bytes_in"] == 4
    assert access["level"] == "info" and access["logger"] == "tsecho.handler"
    assert re.match(r"127\.0\.0\.1:\d+$", access["peer"])


def test_journal_stderr_gets_syslog_priorities_and_no_timestamp(tsechod, tmp_path: Path) -> None:
    # JOURNAL_STREAM names stderr's device:inode; the fixture's stderr is this file.
    stderr = tmp_path / "tsechod0.stderr"
    stderr.touch()
    st = os.stat(stderr)
    d = tsechod("[echo]\nmax_line_bytes = 4\n", env={"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"})
    with d.connect() as sock:
        sock.sendall(b"toolong\n")
        recv_all(sock)
    d.wait_for_log(ACCESS)
    lines = d.log_text().splitlines()
    assert any(re.match(r"^<6>INFO tsecho\.cli: listening on ", line) for line in lines), lines
    assert any(re.match(r"^<4>WARNING tsecho\.handler: .* line too long", line) for line in lines), lines


# -- config errors and check-config ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("toml", "env", "args", "message"),
    [
        ("[server]\nbacklog = 0\n", {}, [], r"tsechod: config error: .*\.toml: \[server\] backlog = 0: must be"),
        ("[server]\nidle_timeout = 5\n", {}, [], r"unknown key 'idle_timeout' in \[server\] \(did you mean 'idle_timeout_s'\?\)"),
        ("[server\n", {}, [], r"tsechod: config error: .*\.toml: .*line 1"),
        ("", {"TSECHOD_IDLE_TIMEOUT_S": "soon"}, [], r"TSECHOD_IDLE_TIMEOUT_S"),
        ("", {}, ["--timestamp", "rfc822"], r"--timestamp"),
        ("[log]\nlog_target = \"file\"\n", {}, [], r"log_file"),
    ],
)
def test_config_errors_exit_78_with_a_precise_message(tmp_path: Path, toml: str, env: dict[str, str],
                                                      args: list[str], message: str) -> None:
    config = tmp_path / "bad.toml"
    config.write_text(toml)
    result = run_tsechod("--config", str(config), "--listen", "127.0.0.1:0", *args, env=env)
    assert result.returncode == 78, result.stderr
    [line] = result.stderr.splitlines()
    assert re.search(message, line), line


def test_missing_config_file_is_a_config_error(tmp_path: Path) -> None:
    result = run_tsechod("--config", str(tmp_path / "nope.toml"))
    assert result.returncode == 78
    assert "nope.toml" in result.stderr and "Traceback" not in result.stderr


def test_address_in_use_exits_1_with_advice(tsechod) -> None:
    d = tsechod()
    result = run_tsechod("--config", "/dev/null", "--listen", d.addresses[0])
    assert result.returncode == 1
    assert f"tsechod: cannot listen on {d.addresses[0]}: address already in use (another tsechod? try: ss -ltnp" \
        in result.stderr


def test_check_config_prints_values_and_sources(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text("[echo]\ntimestamp = \"iso\"\n")
    result = run_tsechod("check-config", "--config", str(config), "--log-level", "debug",
                         env={"TSECHOD_IDLE_TIMEOUT_S": "7"})
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert re.search(r'timestamp = "iso".*file ' + re.escape(str(config)), out)
    assert re.search(r"idle_timeout_s = 7(\.0)?.*env TSECHOD_IDLE_TIMEOUT_S", out)
    assert re.search(r'log_level = "debug".*flag --log-level', out)
    assert re.search(r"backlog = 1024.*default", out)


def test_check_config_on_a_bad_file_exits_78(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text("[echo]\ntelnet = \"maybe\"\n")
    result = run_tsechod("check-config", "--config", str(config))
    assert result.returncode == 78 and "telnet" in result.stderr


def test_shipped_config_serves_with_defaults(tsechod) -> None:
    shipped = (REPO / "etc" / "tsechod.toml").read_text()
    d = tsechod(shipped, listen=("127.0.0.1:0", "[::1]:0"))
    for index in (0, 1):
        with d.connect(index=index) as sock:
            sock.sendall(b"hello python\n")
            [reply] = recv_lines(sock, 1)
        assert CTIME_REPLY.match(reply) and reply.endswith(b"] hello python")


# -- classic daemon mode (--daemon) ---------------------------------------------------------------


def daemon_config(tmp_path: Path, extra: str = "") -> Path:
    config = tmp_path / "d.toml"
    config.write_text(f"[server]\nlisten = [\"127.0.0.1:0\"]\n[log]\nlog_target = \"file\"\n"
                      f"log_file = \"d.log\"\n[daemon]\npid_file = \"d.pid\"\n{extra}")
    return config


def test_daemon_mode_detaches_writes_pidfile_and_removes_it_on_sigterm(tmp_path: Path) -> None:
    config = daemon_config(tmp_path)
    result = run_tsechod("--config", str(config), "--daemon")
    assert result.returncode == 0, result.stderr
    pid = int((tmp_path / "d.pid").read_text())
    try:
        assert Path(f"/proc/{pid}").exists()
        # The parent returned only once the daemon was listening: connect right away.
        port = int(re.search(r"listening on 127\.0\.0\.1:(\d+)", (tmp_path / "d.log").read_text()).group(1))
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(b"daemonized\n")
            assert recv_lines(sock, 1)[0].endswith(b"] daemonized")
        assert Path(f"/proc/{pid}/cwd").resolve() == Path("/")
        status = Path(f"/proc/{pid}/status").read_text()
        assert re.search(r"^Umask:\s+0027$", status, re.M)
    finally:
        os.kill(pid, signal.SIGTERM)
    wait_until(lambda: not (tmp_path / "d.pid").exists())
    wait_until(lambda: not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2])
    assert "stopped" in (tmp_path / "d.log").read_text()


def test_daemon_mode_refuses_a_live_pidfile_and_replaces_a_stale_one(tmp_path: Path) -> None:
    config = daemon_config(tmp_path)
    (tmp_path / "d.pid").write_text("999999\n")  # stale: no process holds its lock
    assert run_tsechod("--config", str(config), "--daemon").returncode == 0
    pid = int((tmp_path / "d.pid").read_text())
    try:
        second = run_tsechod("--config", str(config), "--daemon")
        assert second.returncode == 1
        assert second.stderr.strip() == (f"tsechod: already running as PID {pid} (pid file {tmp_path / 'd.pid'}); "
                                         "stop it first, or use --pid-file")
    finally:
        os.kill(pid, signal.SIGTERM)
    wait_until(lambda: not (tmp_path / "d.pid").exists())


def test_daemon_mode_startup_failure_is_reported_by_the_parent(tmp_path: Path) -> None:
    config = daemon_config(tmp_path, "user = \"no-such-user-tsecho\"\n")
    result = run_tsechod("--config", str(config), "--daemon")
    assert result.returncode == 1
    assert "unknown user 'no-such-user-tsecho'" in result.stderr
    assert not (tmp_path / "d.pid").exists()


def test_daemon_mode_is_refused_under_systemd(tmp_path: Path) -> None:
    result = run_tsechod("--config", str(daemon_config(tmp_path)), "--daemon", env={"INVOCATION_ID": "abc"})
    assert result.returncode == 2
    assert "--daemon" in result.stderr and "systemd" in result.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="dropping privileges needs root")
def test_root_drops_to_user_and_group_after_binding(tmp_path: Path) -> None:
    config = daemon_config(tmp_path, "user = \"nobody\"\ngroup = \"nogroup\"\n")
    os.chmod(tmp_path, 0o755)
    result = run_tsechod("--config", str(config), "--daemon")
    assert result.returncode == 0, result.stderr
    pid = int((tmp_path / "d.pid").read_text())
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        uid = re.search(r"^Uid:\s+(.*)$", status, re.M).group(1).split()
        assert set(uid) == {"65534"}
    finally:
        os.kill(pid, signal.SIGTERM)
    wait_until(lambda: not Path(f"/proc/{pid}").exists())


def test_fatal_errors_carry_err_priority_when_stderr_is_the_journal(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text("[server]\nbacklog = 0\n")
    stderr_path = tmp_path / "stderr"
    with open(stderr_path, "wb") as stderr:
        st = os.fstat(stderr.fileno())
        proc = subprocess.run([sys.executable, "-m", "tsecho.cli", "--config", str(config)], stderr=stderr,
                              env=daemon_env({"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}), timeout=20)
    assert proc.returncode == 78
    assert stderr_path.read_text().startswith("<3>tsechod: config error: ")
