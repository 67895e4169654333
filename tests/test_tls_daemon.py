"""TLS listeners of a real tsechod, with real TLS peers.

Covers: ``openssl s_client``, ``socat OPENSSL:`` and ``ncat --ssl`` talking to
tsechod; what is refused (TLS 1.1, plaintext, a client that does not trust us)
and how it is logged (one access event, ``reason=tls-error detail=...``, no
traceback, counted); mutual TLS with and without a client certificate; a
thousand connects that never send a ClientHello; certificate rotation by SIGHUP
under a connecting client loop (and a broken pair at reload); a stop with a TLS
client connected (answered, then close_notify); check-config's certificate
checks; HAProxy with an ``ssl`` backend and ``send-proxy-v2`` (PROXY and TLS on
one listener). Certificates come from tests/tlscerts.py (the ``tls_certs`` fixture).
"""

from __future__ import annotations

import os
import re
import resource
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import Daemon, daemon_env
from helpers import CTIME_REPLY, figures, require_tool, wait_until

TLS_EVENT = r"closed reason=eof duration_s=\S+ lines=(\d+) bytes_in=\d+ bytes_out=\d+ tls=(TLSv1\.[23]) cipher=(\S+)"


def listener(certs, *, extra: str = "", address: str = "127.0.0.1:0", leaf=None) -> str:
    leaf = leaf or certs.good
    return (f'[[listener]]\naddress = "{address}"\ntls_cert = "{leaf.cert}"\ntls_key = "{leaf.key}"\n{extra}\n')


def start(tsechod, text: str, count: int = 1) -> Daemon:
    d: Daemon = tsechod(text, listen=(), wait=False)
    d.addresses = [m.group(1) for m in d.wait_for_log(r"listening on (\S+)", count=count)]
    return d


def client_context(certs, client=None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(certs.ca))
    if client is not None:
        context.load_cert_chain(str(client.cert), str(client.key))
    return context


def tls_connect(address: tuple[str, int], context: ssl.SSLContext, timeout: float = 5.0) -> ssl.SSLSocket:
    raw = socket.create_connection(address, timeout=timeout)
    return context.wrap_socket(raw, server_hostname="localhost", suppress_ragged_eofs=False)


def tls_lines(sock: ssl.SSLSocket, count: int) -> list[bytes]:
    data = b""
    while data.count(b"\n") < count:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data.splitlines(keepends=True)


def test_openssl_s_client_session(tsechod, tls_certs) -> None:
    openssl = require_tool("openssl")
    d = start(tsechod, listener(tls_certs))
    assert "(TLS)" in d.log_text()
    # Without -quiet (which ignores EOF on stdin): the session as a user sees it. Stdin stays
    # open until the replies are read: at EOF s_client quits, maybe before they arrive.
    proc = subprocess.Popen(
        [openssl, "s_client", "-connect", f"127.0.0.1:{d.port}", "-CAfile", str(tls_certs.ca),
         "-servername", "localhost", "-verify_return_error", "-no_ign_eof"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert proc.stdin is not None and proc.stdout is not None
    try:
        proc.stdin.write(b"hello\nworld\n")
        proc.stdin.flush()
        session = b""
        deadline = time.monotonic() + 15
        while session.count(b"] world\n") < 1 and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            session += line
        proc.stdin.close()
        session += proc.stdout.read()
        assert proc.wait(timeout=15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
    (d.stderr_path.parent / "s_client-session.txt").write_bytes(session)  # what the docs quote
    replies = [line for line in session.splitlines(keepends=True) if CTIME_REPLY.match(line)]
    assert len(replies) == 2, session
    assert replies[0].endswith(b"] hello\n") and replies[1].endswith(b"] world\n")
    assert b"Verify return code: 0 (ok)" in session and b"Protocol  : TLSv1.3" in session
    [event] = d.wait_for_log(TLS_EVENT)
    assert event.group(1) == "2" and event.group(2) == "TLSv1.3"


def test_socat_and_ncat(tsechod, tls_certs) -> None:
    socat, ncat = require_tool("socat"), require_tool("ncat")
    d = start(tsechod, listener(tls_certs))
    out = subprocess.run([socat, "-t", "2", "-", f"OPENSSL:localhost:{d.port},cafile={tls_certs.ca}"],
                         input=b"via socat\n", capture_output=True, timeout=20)
    assert out.stdout.endswith(b"] via socat\n"), out
    out = subprocess.run([ncat, "--ssl", "--ssl-verify", "--ssl-trustfile", str(tls_certs.ca), "localhost",
                          str(d.port)], input=b"via ncat\n", capture_output=True, timeout=20)
    assert out.stdout.endswith(b"] via ncat\n"), out
    d.wait_for_log(TLS_EVENT, count=2)


def test_refused_handshakes_are_one_log_line_each(tsechod, tls_certs) -> None:
    openssl, nc = require_tool("openssl"), require_tool("nc")
    d = start(tsechod, listener(tls_certs))
    # TLS 1.1 offered: refused (minimum TLS 1.2). @SECLEVEL=0 so the client may offer it at all.
    old = subprocess.run([openssl, "s_client", "-tls1_1", "-cipher", "DEFAULT:@SECLEVEL=0",
                          "-connect", f"127.0.0.1:{d.port}"], stdin=subprocess.DEVNULL, capture_output=True, timeout=20)
    assert old.returncode != 0
    d.wait_for_log(r"reason=tls-error duration_s=\S+ lines=0 bytes_in=0 bytes_out=0 detail=old protocol version")
    # Plaintext: closed without a reply, one line.
    plain = subprocess.run([nc, "-q", "2", "127.0.0.1", str(d.port)], input=b"hello\n", capture_output=True,
                           timeout=20)
    assert plain.stdout == b""
    d.wait_for_log(r"reason=tls-error .*detail=not tls\n")
    # A client that does not trust our certificate says so with an alert.
    with pytest.raises(ssl.SSLCertVerificationError):
        tls_connect(d.address, ssl.create_default_context())
    d.wait_for_log(r"reason=tls-error .*detail=alert (unknown ca|bad certificate)")
    text = d.log_text()
    assert text.count("reason=tls-error") == 3
    assert "Traceback" not in text and "ERROR" not in text
    # And the daemon serves on.
    with tls_connect(d.address, client_context(tls_certs)) as sock:
        sock.sendall(b"still here\n")
        assert tls_lines(sock, 1)[0].endswith(b"] still here\n")


def test_mutual_tls(tsechod, tls_certs) -> None:
    d = start(tsechod, listener(tls_certs, extra=f'tls_client_ca = "{tls_certs.client_ca}"'))
    assert "(TLS, client certificate required)" in d.log_text()
    with tls_connect(d.address, client_context(tls_certs, tls_certs.client)) as sock:
        sock.sendall(b"it is alice\n")
        assert tls_lines(sock, 1)[0].endswith(b"] it is alice\n")
    d.wait_for_log(TLS_EVENT + r' client="CN=alice,(OU=[^,"]+,)?O=Example Users"\n')
    for client, detail in ((None, "no client certificate"),
                           (tls_certs.client_stranger, "client certificate from unknown ca"),
                           (tls_certs.client_expired, "client certificate expired")):
        try:  # TLS 1.3: the client learns of the refusal only when it reads
            with tls_connect(d.address, client_context(tls_certs, client)) as sock:
                sock.sendall(b"let me in\n")
                assert sock.recv(100) == b""
        except (ssl.SSLError, ConnectionResetError):
            pass
        d.wait_for_log(rf"reason=tls-error .*detail={detail}\n")
    assert "Traceback" not in d.log_text()


def test_silent_clients_cost_one_thread_each_until_the_deadline(tsechod, tls_certs) -> None:
    """A thousand connects that never send a ClientHello: closed at the deadline, others served meanwhile."""
    count = 1000
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard < count + 200:
        pytest.skip(f"the hard open files limit ({hard}) is below {count + 200}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, count + 200), hard))
    d = start(tsechod, "[limits]\nmax_connections = 2000\nmax_connections_per_ip = 2000\n"
              + listener(tls_certs, extra="tls_handshake_timeout_s = 1.5"))
    with tls_connect(d.address, client_context(tls_certs)) as sock:  # warm up, then the baseline
        sock.sendall(b"warm\n")
        tls_lines(sock, 1)
    own = 2 + len(d.addresses)  # main, log writer, one acceptor (helpers.baseline)
    wait_until(lambda: figures(d.pid)[1] == own, timeout=10)
    silent: list[socket.socket] = []
    try:
        started = time.monotonic()
        for _ in range(count):
            silent.append(socket.create_connection(d.address, timeout=5))
        # Meanwhile a real client gets its answer at once.
        with tls_connect(d.address, client_context(tls_certs)) as sock:
            sock.sendall(b"not blocked\n")
            assert tls_lines(sock, 1)[0].endswith(b"] not blocked\n")
        assert time.monotonic() - started < 1.5 + 5
        for sock in silent:  # each one closed by the server at its deadline (EOF, not our timeout)
            sock.settimeout(max(0.1, started + 1.5 + 10 - time.monotonic()))
            assert sock.recv(1) == b""
        assert time.monotonic() - started < 1.5 + 10
    finally:
        for sock in silent:
            sock.close()
    d.wait_for_log(r"detail=timeout", count=count, timeout=15)
    wait_until(lambda: figures(d.pid)[1] == own, timeout=10)  # parked threads leave within PARK_S
    assert "Traceback" not in d.log_text()


def test_rotation_under_load(tsechod, tls_certs, tmp_path: Path) -> None:
    cert, key = tmp_path / "live.crt", tmp_path / "live.key"
    shutil.copy(tls_certs.good.cert, cert)
    shutil.copy(tls_certs.good.key, key)
    d = start(tsechod, '[[listener]]\naddress = "127.0.0.1:0"\ntls_cert = "live.crt"\ntls_key = "live.key"\n')
    context = client_context(tls_certs)
    der = {name: ssl.PEM_cert_to_DER_cert(leaf.cert.read_text().split("-----END CERTIFICATE-----")[0]
                                          + "-----END CERTIFICATE-----\n")
           for name, leaf in (("good", tls_certs.good), ("expiring", tls_certs.expiring))}
    seen: list[str] = []
    failures: list[BaseException] = []
    stop = threading.Event()

    def loop() -> None:
        deadline = time.monotonic() + 30
        while not stop.is_set() and time.monotonic() < deadline:
            try:
                with tls_connect(d.address, context) as sock:
                    presented = sock.getpeercert(binary_form=True)
                    sock.sendall(b"x\n")
                    assert tls_lines(sock, 1)[0].endswith(b"] x\n")
                seen.append("good" if presented == der["good"] else "expiring" if presented == der["expiring"]
                            else "other")
            except BaseException as err:  # noqa: BLE001 - every failure counts
                failures.append(err)

    thread = threading.Thread(target=loop)
    thread.start()
    try:
        wait_until(lambda: len(seen) >= 20)
        # Replace both files (each by rename: never half a file), then SIGHUP.
        shutil.copy(tls_certs.expiring.cert, tmp_path / "new.crt")
        shutil.copy(tls_certs.expiring.key, tmp_path / "new.key")
        os.replace(tmp_path / "new.crt", cert)
        os.replace(tmp_path / "new.key", key)
        d.proc.send_signal(signal.SIGHUP)
        d.wait_for_log(r"reloaded config")
        mark = len(seen)
        wait_until(lambda: seen[mark:].count("expiring") >= 20)
        # A mismatched pair at reload: the old certificate stays, with an error.
        shutil.copy(tls_certs.other_key, key)
        d.proc.send_signal(signal.SIGHUP)
        d.wait_for_log(r"ERROR .*reload: .*\[\[listener\]\] #1 .*tls_key = \"live.key\".*keeping the old certificate")
        mark = len(seen)
        wait_until(lambda: len(seen) >= mark + 20)
    finally:
        stop.set()
        thread.join(timeout=35)
    assert not failures, failures[:3]
    first_new = seen.index("expiring")
    assert set(seen[:first_new]) == {"good"} and set(seen[first_new:]) == {"expiring"}, seen
    assert re.search(r"WARNING .*tls_cert = \"live.crt\".*expires", d.log_text())  # at reload: 3 days left


def test_stop_answers_then_sends_close_notify(tsechod, tls_certs) -> None:
    d = start(tsechod, listener(tls_certs))
    sock = tls_connect(d.address, client_context(tls_certs))
    sock.sendall(b"one\n")
    assert tls_lines(sock, 1)[0].endswith(b"] one\n")
    sock.sendall(b"two\nthree\n")
    d.proc.send_signal(signal.SIGTERM)
    sock.settimeout(10)
    data = b""
    while chunk := sock.recv(65536):  # suppress_ragged_eofs=False: a bare FIN raises SSLEOFError
        data += chunk
    assert data.count(b"\n") == 2 and data.endswith(b"] three\n"), data
    sock.close()
    assert d.proc.wait(timeout=15) == 0
    assert re.search(r"closed reason=(shutdown|eof) .* tls=TLSv1\.3", d.log_text())


def test_check_config_checks_the_certificates(tls_certs, tmp_path: Path) -> None:
    def check(text: str) -> subprocess.CompletedProcess[str]:
        path = tmp_path / "tsechod.toml"
        path.write_text(text)
        return subprocess.run([sys.executable, "-m", "tsecho.cli", "--config", str(path), "check-config"],
                              capture_output=True, text=True, timeout=20, env=daemon_env())

    mismatched = check(f'[[listener]]\naddress = "127.0.0.1:0"\ntls_cert = "{tls_certs.good.cert}"\n'
                       f'tls_key = "{tls_certs.other_key}"\n')
    assert mismatched.returncode == 78, mismatched
    [line] = mismatched.stderr.splitlines()
    assert line.startswith(f"tsechod: config error: {tmp_path}/tsechod.toml: [[listener]] #1 (127.0.0.1:0): ")
    assert "tls_key" in line and "does not match" in line
    shutil.copy(tls_certs.expiring.both, tmp_path / "server.pem")
    expiring = check('[[listener]]\naddress = "127.0.0.1:0"\ntls_cert = "server.pem"\n')
    assert expiring.returncode == 0, expiring
    assert 'tls_cert = "server.pem"' in expiring.stdout
    assert re.search(r"warning: .*server\.pem.* expires", expiring.stderr), expiring.stderr
    stray = check('[[listener]]\naddress = "127.0.0.1:0"\ntls_key = "server.pem"\n')
    assert stray.returncode == 78 and "tls_key" in stray.stderr and "needs tls_cert" in stray.stderr


GUIDE = Path(__file__).resolve().parents[1] / "docs" / "tls-and-load-balancing.md"
HAPROXY_FRONT = """global
    log stderr format raw local0 info
defaults
    mode tcp
    log global
    timeout connect 5s
    timeout client 30s
    timeout server 30s
frontend echo
    bind 127.0.0.1:{front}
    default_backend tsechod_tls
"""


def guide_ssl_backend(port: int, ca: Path) -> str:
    """The guide's ``backend tsechod_tls`` block, pointed at *port* and trusting *ca*."""
    [block] = [b for b in re.findall(r"```haproxy\n(.*?)```", GUIDE.read_text(), re.S) if "backend tsechod_tls\n" in b]
    for old, new in (("10.0.0.5:8443", f"127.0.0.1:{port}"), ("/etc/haproxy/tsechod-ca.pem", str(ca))):
        assert block.count(old) == 1, block
        block = block.replace(old, new)
    return block


def test_haproxy_ssl_backend_with_proxy_v2(tsechod, tls_certs, tmp_path: Path) -> None:
    """PROXY and TLS on one listener (the guide's backend): the header comes first, then the handshake."""
    haproxy = require_tool("haproxy")
    d = start(tsechod, listener(tls_certs, extra='proxy_protocol = "v2"\nproxy_trusted = ["127.0.0.1"]'))
    with socket.create_server(("127.0.0.1", 0)) as probe:
        front = probe.getsockname()[1]
    config = tmp_path / "haproxy.cfg"
    config.write_text(HAPROXY_FRONT.format(front=front) + guide_ssl_backend(d.port, tls_certs.ca))
    proc = subprocess.Popen([haproxy, "-db", "-f", str(config)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        def ask() -> bytes | None:
            try:
                with socket.create_connection(("127.0.0.1", front), timeout=5) as sock:
                    sock.sendall(b"through haproxy\n")
                    return sock.recv(100)
            except OSError:
                return None

        reply = wait_until(ask, timeout=15)
        assert isinstance(reply, bytes) and reply.endswith(b"] through haproxy\n"), reply
        d.wait_for_log(r"closed reason=eof .* via=127\.0\.0\.1:\d+ tls=TLSv1\.3 cipher=\S+\n")
    finally:
        proc.terminate()
        proc.wait(timeout=10)
