"""tsecho.daemonize with real forks, files and signals: no mocks.

Most tests run a small driver program (DRIVER, written to tmp_path) that uses the
module the way tsechod does: acquire the pid file -> bind 127.0.0.1:0 -> detach ->
write the pid -> serve -> report ready, and SIGTERM stops it. The driver's original
process prints the port, then waits for the daemon's word and exits 0 or prints
``tsechod: ...`` and exits 1, as cli.main will. The daemon is not our child (it is
reparented to init), so we follow it with a pidfd: waiting on it has a deadline,
and signals sent through it can't hit a recycled PID.
"""

from __future__ import annotations

import fcntl
import grp
import io
import os
import pwd
import select
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tsecho import daemonize
from tsecho.pidfile import AlreadyRunningError, PidFile, PidFileError

TIMEOUT_S = 15.0

DRIVER = textwrap.dedent(
    '''
    import os, queue, signal, socket, sys, threading
    from tsecho import daemonize
    from tsecho.pidfile import PidFile, StartupError
    from tsecho.privileges import drop_privileges

    def serve(listener, served):
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:  # closed while stopping
                return
            with conn:
                conn.settimeout(10)
                data = b""
                while not data.endswith(b"\\n"):
                    chunk = conn.recv(1024)
                    if not chunk:
                        break
                    data += chunk
                conn.sendall(b"[daemon] " + data)
            served.set()

    class StartupFailed(Exception):
        pass

    def main():
        mode, pid_path, log_path = sys.argv[1:4]
        if mode == "drop":
            os.setgroups([0, 1, 2])  # extra groups root had; the drop must shed them
        report = None
        try:
            with PidFile(pid_path) as pidfile, \\
                    socket.create_server(("127.0.0.1", 0)) as listener, \\
                    open(log_path, "a", buffering=1) as log:
                print(listener.getsockname()[1], flush=True)
                result = daemonize.detach(
                    [listener.fileno(), log.fileno()], log, pidfile=pidfile,
                    startup_timeout_s=float(os.environ.get("DRIVER_STARTUP_TIMEOUT_S", "20")),
                )
                if isinstance(result, daemonize.ParentOutcome):
                    if result.started:
                        print(f"started {result.daemon_pid}", flush=True)
                        return 0
                    print(f"tsechod: {result.message}", file=sys.stderr)
                    return 1
                report = result  # the daemon from here on; stdout/stderr go to the log
                print("daemon: SIGTERM is SIG_DFL after detach:", signal.getsignal(signal.SIGTERM) == signal.SIG_DFL)
                if mode == "die":
                    os.kill(os.getpid(), signal.SIGKILL)
                if mode == "fail":
                    raise StartupFailed("cannot open /var/lib/tsechod: permission denied")
                if mode == "hang":
                    signal.sigtimedwait([signal.SIGTERM], 30)  # never says a word
                    return 1
                stop = queue.SimpleQueue()
                signal.signal(signal.SIGTERM, lambda signum, _frame: stop.put(signum))
                pidfile.write()
                if mode == "drop":
                    drop_privileges("nobody", "nogroup")
                served = threading.Event()
                threading.Thread(target=serve, args=(listener, served), daemon=True).start()
                if mode == "ready-after-first" and not served.wait(timeout=20):
                    raise StartupFailed("nobody connected within 20 s")
                report.ready()
                try:
                    signum = stop.get(timeout=60)
                except queue.Empty:
                    print("daemon: no SIGTERM within 60 s", flush=True)
                    return 1
                print(f"daemon: received {signal.Signals(signum).name}: stopping", flush=True)
                return 0
        except (StartupError, StartupFailed) as err:
            # As cli.main will: the with-blocks have unwound (pid file removed,
            # listener closed) before the original process hears about it.
            if report is not None:
                report.failed(str(err))
            else:
                print(f"tsechod: {err}", file=sys.stderr)
            return 1

    raise SystemExit(main())
    '''
)


# --- following processes that are not our children ---------------------------------


def wait_fd(fd: int, timeout: float = TIMEOUT_S) -> bool:
    readable, _, _ = select.select([fd], [], [], timeout)
    return bool(readable)


class Daemon:
    """A daemon started by a driver: its PID and a pidfd that pins that process."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.pidfd = os.pidfd_open(pid)

    def alive(self) -> bool:
        return not wait_fd(self.pidfd, 0)

    def wait_gone(self, timeout: float = TIMEOUT_S) -> None:
        assert wait_fd(self.pidfd, timeout), f"daemon {self.pid} still running after {timeout} s"

    def signal(self, signum: int) -> None:
        signal.pidfd_send_signal(self.pidfd, signum)

    def status(self) -> dict[str, str]:
        text = Path(f"/proc/{self.pid}/status").read_text()
        return dict(line.split(":\t", 1) for line in text.splitlines() if ":\t" in line)

    def stat_fields(self) -> list[str]:
        text = Path(f"/proc/{self.pid}/stat").read_text()
        return text[text.rindex(")") + 2 :].split()  # state ppid pgrp session tty_nr ...

    def stop(self) -> None:
        if self.alive():
            self.signal(signal.SIGTERM)
            if not wait_fd(self.pidfd, 5):
                self.signal(signal.SIGKILL)
                wait_fd(self.pidfd, 5)
        os.close(self.pidfd)


@dataclass
class Run:
    pid: int
    returncode: int
    stdout: str
    stderr: str
    port: int


@pytest.fixture
def driver(tmp_path: Path) -> Path:
    path = tmp_path / "driver.py"
    path.write_text(DRIVER)
    return path


@pytest.fixture
def daemons() -> Iterator[list[Daemon]]:
    """Daemons a test started; any still running at the end get SIGTERM, then SIGKILL."""
    started: list[Daemon] = []
    yield started
    for d in started:
        d.stop()


def run_driver(driver: Path, mode: str, pid_path: Path, log_path: Path, **env: str) -> Run:
    with subprocess.Popen(
        [sys.executable, str(driver), mode, str(pid_path), str(log_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **env},
        cwd=driver.parent,
    ) as proc:
        try:
            # EOF on stdout/stderr also proves the daemon kept no copy of them.
            stdout, stderr = proc.communicate(timeout=TIMEOUT_S * 2)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    port = int(stdout.split("\n", 1)[0]) if stdout[:1].isdigit() else 0
    return Run(proc.pid, proc.returncode, stdout, stderr, port)


def start_daemon(driver: Path, daemons: list[Daemon], pid_path: Path, mode: str = "serve") -> tuple[Run, Daemon]:
    run = run_driver(driver, mode, pid_path, pid_path.with_suffix(".log"))
    assert run.returncode == 0, run.stderr
    daemon = Daemon(int(run.stdout.split("started ", 1)[1].split()[0]))
    daemons.append(daemon)
    return run, daemon


def echo(port: int, line: bytes = b"hello\n") -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT_S) as sock:
        sock.sendall(line)
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(1024)
            if not chunk:
                break
            data += chunk
        return data


def lock_is_held(path: Path) -> bool:
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def dead_pid() -> int:
    with subprocess.Popen(["true"]) as proc:
        assert proc.wait(timeout=TIMEOUT_S) == 0
    return proc.pid


# --- the daemon's life ---------------------------------------------------------------


def test_parent_exits_zero_once_the_daemon_serves_and_its_pid_is_in_the_pid_file(
    driver: Path, tmp_path: Path, daemons: list[Daemon]
) -> None:
    pid_path = tmp_path / "tsechod.pid"
    run, daemon = start_daemon(driver, daemons, pid_path)

    assert echo(run.port) == b"[daemon] hello\n"  # right after the parent exited
    assert pid_path.read_text() == f"{daemon.pid}\n"
    assert daemon.pid != run.pid
    assert daemon.alive()
    assert lock_is_held(pid_path), "the daemon must hold the pid file lock"


def test_parent_waits_for_ready_and_not_just_for_the_fork(driver: Path, tmp_path: Path, daemons: list[Daemon]) -> None:
    pid_path = tmp_path / "tsechod.pid"
    with subprocess.Popen(
        [sys.executable, str(driver), "ready-after-first", str(pid_path), str(tmp_path / "d.log")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as proc:
        try:
            assert proc.stdout is not None
            assert wait_fd(proc.stdout.fileno()), "no port line from the driver"
            port = int(proc.stdout.readline())
            # The daemon reports ready only after it answered a connection: until
            # then the parent must still be waiting on the status pipe.
            with pytest.raises(subprocess.TimeoutExpired):
                proc.wait(timeout=0.5)
            assert echo(port) == b"[daemon] hello\n"
            out, err = proc.communicate(timeout=TIMEOUT_S)
            assert proc.returncode == 0, err
        finally:
            if proc.poll() is None:
                proc.kill()
    daemon = Daemon(int(out.split("started ", 1)[1].split()[0]))
    daemons.append(daemon)
    assert daemon.pid != proc.pid
    assert pid_path.read_text() == f"{daemon.pid}\n"


def test_daemon_is_detached_with_cwd_root_umask_027_and_untouched_signals(
    driver: Path, tmp_path: Path, daemons: list[Daemon]
) -> None:
    pid_path = tmp_path / "tsechod.pid"
    log_path = pid_path.with_suffix(".log")
    run, daemon = start_daemon(driver, daemons, pid_path)

    state, ppid, pgrp, session, tty_nr = daemon.stat_fields()[:5]
    assert int(session) != os.getsid(0), "the daemon must be in its own session"
    assert int(session) != daemon.pid, "not a session leader: it can never get a terminal"
    assert int(tty_nr) == 0, "no controlling terminal"
    assert os.readlink(f"/proc/{daemon.pid}/cwd") == "/"
    status = daemon.status()
    assert status["Umask"] == "0027"

    # signal_map={}: python-daemon's default would have set SIGTERM to its
    # 'terminate' handler and ignored SIGTSTP/SIGTTIN/SIGTTOU.
    assert "daemon: SIGTERM is SIG_DFL after detach: True" in log_path.read_text()
    ignored = int(status["SigIgn"], 16)
    for signum in (signal.SIGTSTP, signal.SIGTTIN, signal.SIGTTOU, signal.SIGTERM):
        assert not ignored & (1 << (signum - 1)), signum.name
    assert int(status["SigCgt"], 16) & (1 << (signal.SIGTERM - 1)), "the driver's own handler"

    # fds: stdin /dev/null, stdout/stderr the log, the pid file and listener kept;
    # the status pipe is closed after ready() and pytest's capture pipes are gone.
    fds = {int(fd): os.readlink(f"/proc/{daemon.pid}/fd/{fd}") for fd in os.listdir(f"/proc/{daemon.pid}/fd")}
    assert fds[0] == os.devnull
    assert fds[1] == fds[2] == str(log_path)
    assert str(pid_path) in fds.values()
    assert any(target.startswith("socket:") for target in fds.values())
    assert not [t for t in fds.values() if t.startswith("pipe:")], fds


def test_sigterm_stops_the_daemon_and_removes_its_pid_file(driver: Path, tmp_path: Path, daemons: list[Daemon]) -> None:
    pid_path = tmp_path / "tsechod.pid"
    run, daemon = start_daemon(driver, daemons, pid_path)
    assert pid_path.exists()

    daemon.signal(signal.SIGTERM)
    daemon.wait_gone()

    assert not pid_path.exists()
    assert "daemon: received SIGTERM: stopping" in pid_path.with_suffix(".log").read_text()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", run.port), timeout=TIMEOUT_S)


@pytest.mark.parametrize("leftover", ["{pid}\n", "{pid}", "", "garbage\n"])
def test_pid_file_left_by_a_dead_process_is_taken_over(
    driver: Path, tmp_path: Path, daemons: list[Daemon], leftover: str
) -> None:
    pid_path = tmp_path / "tsechod.pid"
    stale = dead_pid()
    pid_path.write_text(leftover.format(pid=stale))

    run, daemon = start_daemon(driver, daemons, pid_path)

    assert pid_path.read_text() == f"{daemon.pid}\n"
    assert echo(run.port) == b"[daemon] hello\n"


def test_live_pid_file_refuses_a_second_instance_with_the_exact_message(
    driver: Path, tmp_path: Path, daemons: list[Daemon]
) -> None:
    pid_path = tmp_path / "tsechod.pid"
    first, daemon = start_daemon(driver, daemons, pid_path)

    second = run_driver(driver, "serve", pid_path, tmp_path / "second.log")

    assert second.returncode == 1
    assert second.stderr == (
        f"tsechod: already running as PID {daemon.pid} (pid file {pid_path}); "
        "stop it first, or use --pid-file\n"
    )
    assert second.stdout == ""  # refused before binding
    assert pid_path.read_text() == f"{daemon.pid}\n"
    assert daemon.alive()
    assert echo(first.port) == b"[daemon] hello\n"


def test_failure_after_detaching_is_printed_by_the_parent_with_exit_1(driver: Path, tmp_path: Path) -> None:
    pid_path = tmp_path / "tsechod.pid"

    run = run_driver(driver, "fail", pid_path, tmp_path / "d.log")

    assert run.returncode == 1
    assert run.stderr == "tsechod: cannot open /var/lib/tsechod: permission denied\n"
    # The daemon unwound (pid file removed) before it reported.
    assert not pid_path.exists()
    second = run_driver(driver, "fail", pid_path, tmp_path / "d.log")
    assert second.stderr == run.stderr


def test_daemon_dying_silently_is_reported_by_the_parent(driver: Path, tmp_path: Path) -> None:
    run = run_driver(driver, "die", tmp_path / "tsechod.pid", tmp_path / "d.log")

    assert run.returncode == 1
    assert run.stderr.startswith("tsechod: the daemon died during startup")
    assert run.stderr.count("\n") == 1


def test_daemon_that_never_reports_makes_the_parent_give_up_at_the_deadline(
    driver: Path, tmp_path: Path, daemons: list[Daemon]
) -> None:
    pid_path = tmp_path / "tsechod.pid"
    started = time.monotonic()
    run = run_driver(driver, "hang", pid_path, tmp_path / "d.log", DRIVER_STARTUP_TIMEOUT_S="1")
    elapsed = time.monotonic() - started

    assert run.returncode == 1
    assert run.stderr.startswith("tsechod: the daemon did not report ready within 1 s")
    assert elapsed < TIMEOUT_S
    # The parent must not have removed the pid file or unlocked it under the
    # still-running daemon: a second start is still refused.
    assert lock_is_held(pid_path)
    holder = [int(p) for p in os.listdir("/proc") if p.isdigit() and _holds(int(p), pid_path)]
    assert len(holder) == 1
    daemons.append(Daemon(holder[0]))


def _holds(pid: int, path: Path) -> bool:
    try:
        return any(os.readlink(f"/proc/{pid}/fd/{fd}") == str(path) for fd in os.listdir(f"/proc/{pid}/fd"))
    except (FileNotFoundError, PermissionError, ProcessLookupError):
        return False


def test_detach_refuses_before_forking_when_it_cannot_work(tmp_path: Path) -> None:
    with pytest.raises(daemonize.DetachError, match="has no file descriptor"):
        daemonize.detach([], io.StringIO())
    stop = threading.Event()
    worker = threading.Thread(target=stop.wait, args=(TIMEOUT_S,), name="tsecho-test-worker")
    worker.start()
    try:
        with pytest.raises(daemonize.DetachError, match=r"^cannot detach with other threads running \(.*tsecho-test-worker"):
            daemonize.detach([], None)
    finally:
        stop.set()
        worker.join(TIMEOUT_S)


# --- privileges ----------------------------------------------------------------------

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="privilege drop needs root")


def _ids(line: str) -> list[int]:
    return [int(x) for x in line.split()]


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory nobody can reach (tmp_path's parents are root-only 0700)."""
    with tempfile.TemporaryDirectory(prefix="tsecho-test-", dir="/tmp") as name:
        path = Path(name)
        path.chmod(0o755)
        yield path


@needs_root
@pytest.mark.parametrize("run_dir_owner", ["nobody", "root"])
def test_daemon_drops_to_nobody_nogroup_with_only_their_groups(
    driver: Path, shared_dir: Path, daemons: list[Daemon], run_dir_owner: str
) -> None:
    run_dir = shared_dir / "run"
    run_dir.mkdir()
    nobody, nogroup = pwd.getpwnam("nobody"), grp.getgrnam("nogroup")
    if run_dir_owner == "nobody":  # like /run/tsechod owned by the service user
        os.chown(run_dir, nobody.pw_uid, nogroup.gr_gid)
    pid_path = run_dir / "tsechod.pid"

    run, daemon = start_daemon(driver, daemons, pid_path, mode="drop")

    status = daemon.status()
    assert _ids(status["Uid"]) == [nobody.pw_uid] * 4
    assert _ids(status["Gid"]) == [nogroup.gr_gid] * 4
    assert sorted(_ids(status["Groups"])) == sorted(set(os.getgrouplist("nobody", nogroup.gr_gid)))
    assert echo(run.port) == b"[daemon] hello\n"

    daemon.signal(signal.SIGTERM)
    daemon.wait_gone()
    if run_dir_owner == "nobody":
        assert not pid_path.exists()
    else:
        # It can't unlink in root's directory: it empties the file instead, so
        # no dead PID stays in it, and the lock is gone with the process.
        assert pid_path.read_text() == ""
        assert not lock_is_held(pid_path)
        assert "cannot remove pid file" in pid_path.with_suffix(".log").read_text()


def run_python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=TIMEOUT_S
    )


def acquire_as_nobody(pid_path: Path) -> subprocess.CompletedProcess[str]:
    """Try to take *pid_path* as user nobody; the child prints the error it gets."""
    return run_python(
        f"""
        import os
        from tsecho.pidfile import PidFile, StartupError as DaemonizeError
        os.setgroups([]); os.setgid(65534); os.setuid(65534)
        try:
            PidFile({str(pid_path)!r}).acquire()
        except DaemonizeError as err:
            print(type(err).__name__, err)
        """
    )


@needs_root
def test_dropped_process_cannot_regain_root() -> None:
    proc = run_python(
        """
        import os
        from tsecho.privileges import drop_privileges
        os.setgroups([0, 4])
        drop_privileges("nobody", None)
        print(os.getresuid(), os.getresgid(), sorted(os.getgroups()))
        for call in (lambda: os.setuid(0), lambda: os.seteuid(0), lambda: os.setgroups([0])):
            try:
                call()
                print("regained")
            except PermissionError:
                print("refused")
        """
    )
    nobody = pwd.getpwnam("nobody")
    gid = nobody.pw_gid
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == f"{(nobody.pw_uid,) * 3} {(gid,) * 3} {sorted(set(os.getgrouplist('nobody', gid)))}"
    assert lines[1:] == ["refused"] * 3


@pytest.mark.parametrize(
    ("user", "group", "message"),
    [
        ("no-such-user-tsecho", None, "unknown user 'no-such-user-tsecho' (--user); check: getent passwd no-such-user-tsecho"),
        ("nobody", "no-such-group-tsecho", "unknown group 'no-such-group-tsecho' (--group); check: getent group no-such-group-tsecho"),
    ],
)
@needs_root
def test_unknown_user_or_group_is_a_one_line_error(user: str, group: str | None, message: str) -> None:
    proc = run_python(
        f"""
        import os
        from tsecho.privileges import PrivilegeError, drop_privileges
        try:
            drop_privileges({user!r}, {group!r})
        except PrivilegeError as err:
            print(err)
        print(os.getresuid())
        """
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [message, "(0, 0, 0)"]


@needs_root
def test_user_without_root_is_refused() -> None:
    proc = run_python(
        """
        import os
        from tsecho.privileges import PrivilegeError, drop_privileges
        os.setgroups([]); os.setgid(65534); os.setuid(65534)
        for user, group in (("nobody", None), (None, "nogroup")):
            try:
                drop_privileges(user, group)
            except PrivilegeError as err:
                print(err)
        drop_privileges(None, None)
        print("no-op ok")
        """
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [
        "--user needs root (running as uid 65534)",
        "--group needs root (running as uid 65534)",
        "no-op ok",
    ]


# --- PidFile in-process --------------------------------------------------------------


def test_second_lock_on_the_same_file_names_the_holder(tmp_path: Path) -> None:
    pid_path = tmp_path / "a.pid"
    with PidFile(pid_path) as first:
        # An flock belongs to an open file description, so a second open in
        # this process conflicts just like another process would.
        with pytest.raises(AlreadyRunningError) as info:
            PidFile(pid_path).acquire()
        assert "not written its PID yet" in str(info.value)
        first.write()
        with pytest.raises(AlreadyRunningError) as info:
            PidFile(pid_path).acquire()
        assert str(info.value) == (
            f"already running as PID {os.getpid()} (pid file {pid_path}); stop it first, or use --pid-file"
        )
    assert not pid_path.exists()


def test_pid_file_is_written_in_place_so_the_locked_inode_stays(tmp_path: Path) -> None:
    pid_path = tmp_path / "a.pid"
    pid_path.write_text("123456789\n")  # longer than what we write
    with PidFile(pid_path) as pidfile:
        inode = pid_path.stat().st_ino
        assert pid_path.read_text() == ""  # the stale PID is gone at once
        pidfile.write(42)
        assert pid_path.read_text() == "42\n"
        assert pid_path.stat().st_ino == inode
        assert oct(pid_path.stat().st_mode & 0o777) == "0o644"
        assert lock_is_held(pid_path)
    # It names PID 42, not us: release() leaves it (and says so), as the docs promise.
    assert pid_path.read_text() == "42\n"


def test_release_leaves_a_file_that_names_another_process(tmp_path: Path) -> None:
    pid_path = tmp_path / "a.pid"
    pidfile = PidFile(pid_path)
    pidfile.acquire()
    pidfile.write()
    pid_path.write_text("1\n")  # someone rewrote it: not ours to delete any more
    pidfile.release()
    pidfile.release()  # twice is fine
    assert pid_path.read_text() == "1\n"
    assert not lock_is_held(pid_path)


def test_release_in_a_forked_child_neither_removes_nor_unlocks(tmp_path: Path) -> None:
    pid_path = tmp_path / "a.pid"
    with PidFile(pid_path) as pidfile:
        pidfile.write()
        child = os.fork()
        if child == 0:  # pragma: no cover - runs in the child
            try:
                pidfile.release()
            finally:
                os._exit(0)
        _, status = os.waitpid(child, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert pid_path.read_text() == f"{os.getpid()}\n"
        assert lock_is_held(pid_path)
    assert not pid_path.exists()


@pytest.mark.parametrize(
    ("make_path", "message"),
    [
        (lambda d: d / "missing" / "x.pid", "cannot open pid file {path}: No such file or directory (create the directory, or use --pid-file)"),
        (lambda d: d / "link.pid", "cannot open pid file {path}: Too many levels of symbolic links (it is a symlink; refusing to follow it)"),
    ],
)
def test_pid_file_that_cannot_be_opened_is_a_one_line_error(
    tmp_path: Path, make_path: Callable[[Path], Path], message: str
) -> None:
    (tmp_path / "link.pid").symlink_to(tmp_path / "target")
    path = make_path(tmp_path)
    with pytest.raises(PidFileError) as info:
        PidFile(path).acquire()
    assert str(info.value) == message.format(path=path)


@needs_root
def test_running_instance_is_reported_even_to_a_user_who_cannot_write_its_pid_file(shared_dir: Path) -> None:
    pid_path = shared_dir / "tsechod.pid"
    with PidFile(pid_path) as pidfile:  # root's instance, file mode 0644
        pidfile.write()
        proc = acquire_as_nobody(pid_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == (
        f"AlreadyRunningError already running as PID {os.getpid()} (pid file {pid_path}); "
        "stop it first, or use --pid-file\n"
    )
    # Not running: then it is a plain permission problem.
    pid_path.write_text("")
    proc = acquire_as_nobody(pid_path)
    assert proc.stdout == (
        f"PidFileError cannot open pid file {pid_path}: Permission denied "
        "(start as root, or use --pid-file with a writable path)\n"
    )


# --- systemd -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("environ", "refused"),
    [
        ({}, False),
        ({"PATH": "/usr/bin"}, False),
        ({"INVOCATION_ID": "0123abcd"}, True),
        ({"NOTIFY_SOCKET": "/run/systemd/notify"}, True),
        ({"INVOCATION_ID": ""}, False),
    ],
)
def test_daemon_mode_is_refused_under_systemd(environ: dict[str, str], refused: bool) -> None:
    reason = daemonize.refuse_under_systemd(environ)
    if refused:
        assert reason == (
            "--daemon is not used under systemd: the service runs in the foreground "
            "(Type=notify); drop --daemon from ExecStart"
        )
    else:
        assert reason is None


def test_a_hard_linked_pid_file_is_refused_and_its_twin_untouched(tmp_path: Path) -> None:
    precious = tmp_path / "shadow"
    precious.write_text("root:secret\n")
    pid_path = tmp_path / "a.pid"
    os.link(precious, pid_path)  # planted by someone who can write the pid file's directory
    with pytest.raises(PidFileError) as info:
        PidFile(pid_path).acquire()
    assert str(info.value) == (f"refusing pid file {pid_path}: it has 2 hard links, so another file may be "
                               "linked to it (remove it, or use --pid-file)")
    assert precious.read_text() == "root:secret\n"
