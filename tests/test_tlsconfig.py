"""tlsconfig: the server context, credential names, the checks and their messages, and real handshakes.

Handshakes are real: a context from tlsconfig on a loopback socket, driven by
tlsconfig.handshake, against `openssl s_client` or raw bytes from a socket
(plaintext, an HTTP request, a dripped ClientHello). Certificates come from the
``tls_certs`` fixture (tests/tlscerts.py); cryptography, which trustme brings,
is the independent oracle for the DER reader's dates.
"""

from __future__ import annotations

import datetime as dt
import os
import re
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography import x509

from helpers import require_tool
from tlscerts import Certs, Leaf
from tsecho import tlsconfig
from tsecho.tlsconfig import (
    HandshakeFailed,
    HandshakeStopped,
    SessionInfo,
    TLSConfigError,
    TLSSettings,
    format_subject,
    handshake,
    handshake_error_detail,
    load_server_tls,
    resolve_path,
)

CREDS = "/run/credentials/tsechod.service"
NO_ENV: dict[str, str] = {}


def settings(leaf: Leaf, client_ca: Path | None = None) -> TLSSettings:
    return TLSSettings(str(leaf.cert), str(leaf.key), str(client_ca) if client_ca else None)


def context_for(leaf: Leaf, client_ca: Path | None = None) -> ssl.SSLContext:
    return load_server_tls(settings(leaf, client_ca), Path("/"), NO_ENV).context


# -- the context ---------------------------------------------------------------------------


def test_server_context_has_the_policy(tls_certs: Certs) -> None:
    context = context_for(tls_certs.good)
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2
    assert context.options & ssl.OP_NO_COMPRESSION
    assert context.options & ssl.OP_NO_RENEGOTIATION
    assert context.verify_mode == ssl.CERT_NONE
    assert context_for(tls_certs.good, tls_certs.client_ca).verify_mode == ssl.CERT_REQUIRED


def test_key_may_be_in_the_certificate_file(tls_certs: Certs) -> None:
    loaded = load_server_tls(TLSSettings(str(tls_certs.good.both)), Path("/"), NO_ENV)
    assert loaded.warnings == ()
    assert loaded.not_after.year == 3000  # trustme's default: far away


@pytest.mark.parametrize(("value", "environ", "expected"), [
    ("/etc/tls/server.pem", {"CREDENTIALS_DIRECTORY": CREDS}, "/etc/tls/server.pem"),  # a '/': a path
    ("tls/server.pem", {"CREDENTIALS_DIRECTORY": CREDS}, "/etc/tsechod/tls/server.pem"),
    ("./server.pem", {"CREDENTIALS_DIRECTORY": CREDS}, "/etc/tsechod/server.pem"),  # ./ forces a path
    ("server.pem", {"CREDENTIALS_DIRECTORY": CREDS}, f"{CREDS}/server.pem"),  # a credential name
    ("server.pem", {"CREDENTIALS_DIRECTORY": ""}, "/etc/tsechod/server.pem"),  # empty counts as unset
    ("server.pem", {}, "/etc/tsechod/server.pem"),
])
def test_resolve_path_tells_credential_names_from_paths(value: str, environ: dict[str, str], expected: str) -> None:
    assert resolve_path("tls_cert", value, Path("/etc/tsechod"), environ) == Path(expected)


@pytest.mark.parametrize("value", ["", ".", ".."])
def test_resolve_path_rejects_what_is_no_file_name(value: str) -> None:
    with pytest.raises(TLSConfigError, match="^tls_key = "):
        resolve_path("tls_key", value, Path("/etc/tsechod"), {"CREDENTIALS_DIRECTORY": CREDS})


def test_credentials_are_loaded_from_credentials_directory(tls_certs: Certs, tmp_path: Path) -> None:
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "tsechod.crt").write_bytes(tls_certs.good.cert.read_bytes())
    (creds / "tsechod.key").write_bytes(tls_certs.good.key.read_bytes())
    environ = {"CREDENTIALS_DIRECTORY": str(creds)}
    loaded = load_server_tls(TLSSettings("tsechod.crt", "tsechod.key"), tmp_path / "nowhere", environ)
    assert isinstance(loaded.context, ssl.SSLContext)

    with pytest.raises(TLSConfigError) as caught:
        load_server_tls(TLSSettings("tsechod.crt", "missing.key"), tmp_path, environ)
    assert str(caught.value) == (
        f'tls_key = "missing.key" ({creds}/missing.key): no credential \'missing.key\' in $CREDENTIALS_DIRECTORY '
        "(add LoadCredential=missing.key:/path/to/file to the unit, or write a path such as ./missing.key)")


# -- what a broken setting says: one line, the key, the file, the reason ----------------------


def broken_cases(certs: Certs, tmp: Path) -> list[tuple[TLSSettings, str, str]]:
    """(settings, the key and file the message names, the reason it gives)."""
    junk = tmp / "junk.pem"
    junk.write_text("this is not PEM\n")
    big = tmp / "big.pem"
    big.write_bytes(b"x" * (tlsconfig.MAX_PEM_BYTES + 1))
    damaged = tmp / "damaged.crt"
    damaged.write_text("-----BEGIN CERTIFICATE-----\nMIIBkTCB+wIJAK\n-----END CERTIFICATE-----\n")
    unreadable = tmp / "dir.pem"
    unreadable.mkdir(exist_ok=True)
    unended = tmp / "unended.pem"
    unended.write_bytes(b"-----BEGIN CERTIFICATE-----\n" * (tlsconfig.MAX_PEM_BYTES // 28))  # ~1 MiB, no END
    fifo = tmp / "fifo.pem"
    if not fifo.exists():
        os.mkfifo(fifo)  # opening it blocking would wait for a writer forever
    good_cert, good_key = str(certs.good.cert), str(certs.good.key)
    return [
        (TLSSettings(str(tmp / "nope.crt"), good_key), f'tls_cert = "{tmp}/nope.crt"', "no such file"),
        (TLSSettings(good_cert, str(tmp / "nope.key")), f'tls_key = "{tmp}/nope.key"', "no such file"),
        (TLSSettings(str(unreadable), good_key), f'tls_cert = "{unreadable}"', "is a directory"),
        (TLSSettings(good_cert, str(fifo)), f'tls_key = "{fifo}"', "not a regular file"),
        (TLSSettings(str(junk), good_key), f'tls_cert = "{junk}"', "not a PEM certificate"),
        (TLSSettings(str(unended), good_key), f'tls_cert = "{unended}"', "not a PEM certificate"),
        (TLSSettings(str(big), good_key), f'tls_cert = "{big}"', "larger than 1 MiB"),
        (TLSSettings(str(damaged), good_key), f'tls_cert = "{damaged}"', "PEM block 1 is not a valid certificate"),
        (TLSSettings(good_key, good_cert), f'tls_cert = "{good_key}"', "holds a private key, not a certificate"),
        (TLSSettings(good_cert, str(junk)), f'tls_key = "{junk}"', "not a PEM private key"),
        (TLSSettings(good_cert, good_cert), f'tls_key = "{good_cert}"', "holds no private key"),
        (TLSSettings(good_cert, str(certs.other_key)), f'tls_key = "{certs.other_key}" and tls_cert = "{good_cert}"',
         "the key does not match the certificate"),
        (TLSSettings(good_cert, str(certs.encrypted_key)), f'tls_key = "{certs.encrypted_key}"',
         "the private key is encrypted"),
        (TLSSettings(good_cert, str(certs.encrypted_key_traditional)),
         f'tls_key = "{certs.encrypted_key_traditional}"', "the private key is encrypted"),
        (TLSSettings(good_cert, good_key, str(junk)), f'tls_client_ca = "{junk}"', "not a PEM certificate"),
        (TLSSettings(good_cert, good_key, str(tmp / "nope-ca.pem")), f'tls_client_ca = "{tmp}/nope-ca.pem"',
         "no such file"),
    ]


def test_every_broken_setting_is_one_line_naming_key_file_and_reason(tls_certs: Certs, tmp_path: Path) -> None:
    started = time.monotonic()
    for bad, where, reason in broken_cases(tls_certs, tmp_path):
        with pytest.raises(TLSConfigError) as caught:
            load_server_tls(bad, Path("/"), NO_ENV)
        message = str(caught.value)
        assert "\n" not in message, message
        assert message.startswith(where + ": "), message
        assert reason in message, message
    assert time.monotonic() - started < 2  # the 1 MiB files included: reading PEM is linear


def test_permission_denied_names_the_file(tls_certs: Certs) -> None:
    # Root reads any file (and CI runs as root): load as nobody, in a child process, from a
    # directory nobody can reach (pytest's tmp_path is under a 0700 directory).
    with tempfile.TemporaryDirectory(prefix="tsecho-tls-") as name:
        where = Path(name)
        where.chmod(0o755)
        cert, key = where / "server.crt", where / "private.key"
        cert.write_bytes(tls_certs.good.cert.read_bytes())
        key.write_bytes(tls_certs.good.key.read_bytes())
        key.chmod(0)
        argv = [require_tool("setpriv"), "--reuid=nobody", "--regid=nogroup", "--clear-groups"] \
            if os.geteuid() == 0 else []
        probe = ("import sys; from pathlib import Path; from tsecho.tlsconfig import *\n"
                 "try: load_server_tls(TLSSettings(sys.argv[1], sys.argv[2]), Path('/'), {})\n"
                 "except TLSConfigError as e: print(e)\n")
        env = {"PATH": os.environ["PATH"], "PYTHONPATH": str(Path(tlsconfig.__file__).parents[1])}
        result = subprocess.run([*argv, sys.executable, "-c", probe, str(cert), str(key)],
                                capture_output=True, text=True, timeout=30, env=env)
    assert result.stdout == (f'tls_key = "{key}": permission denied '
                             "(tsechod must be able to read it: check owner and mode)\n"), result.stderr


# -- expiry ------------------------------------------------------------------------------------


def test_expired_certificate_is_a_warning_not_an_error(tls_certs: Certs) -> None:
    loaded = load_server_tls(settings(tls_certs.expired), Path("/"), NO_ENV)
    [warning] = loaded.warnings
    assert warning.startswith(f'tls_cert = "{tls_certs.expired.cert}": certificate expired on 2021-01-01 00:00:00 UTC (')
    assert "renew it, then reload" in warning


def test_certificate_expiring_within_14_days_warns(tls_certs: Certs) -> None:
    [warning] = load_server_tls(settings(tls_certs.expiring), Path("/"), NO_ENV).warnings
    assert f'tls_cert = "{tls_certs.expiring.cert}": certificate expires on ' in warning
    assert ", in 3.0 days: renew it" in warning
    # 2.5 days on: half a day left; 4 days on: expired; 20 days back: 23 days left, no warning.
    certs = tlsconfig.read_certificates("tls_cert", "x", tls_certs.expiring.cert, NO_ENV)
    assert "in 0.5 days" in str(tlsconfig.expiry_warning("tls_cert", "x", certs, now=time.time() + 2.5 * 86400))
    assert "expired on" in str(tlsconfig.expiry_warning("tls_cert", "x", certs, now=time.time() + 4 * 86400))
    assert tlsconfig.expiry_warning("tls_cert", "x", certs, now=time.time() - 20 * 86400) is None


def test_an_intermediate_expiring_first_is_named(tls_certs: Certs, tmp_path: Path) -> None:
    # A chain file: the good leaf, then the expiring leaf standing in for an intermediate.
    chain = tmp_path / "chain.crt"
    chain.write_bytes(tls_certs.good.cert.read_bytes() + tls_certs.expiring.cert.read_bytes())
    certs = tlsconfig.read_certificates("tls_cert", str(chain), chain, NO_ENV)
    assert "certificate 3 of the chain expires on" in str(tlsconfig.expiry_warning("tls_cert", str(chain), certs))


def test_not_yet_valid_certificate_warns(tls_certs: Certs) -> None:
    certs = tlsconfig.read_certificates("tls_cert", "x", tls_certs.expiring.cert, NO_ENV)
    back_then = time.time() - 100 * 86400
    assert "is not valid before" in str(tlsconfig.expiry_warning("tls_cert", "x", certs, now=back_then))


def test_der_reader_agrees_with_cryptography(tls_certs: Certs) -> None:
    files = [tls_certs.good.cert, tls_certs.expired.cert, tls_certs.expiring.cert, tls_certs.client.cert,
             tls_certs.ca, tls_certs.client_ca]
    seen_utc_time = seen_generalized = False
    for path in files:
        for der in ders_of(path):
            oracle = x509.load_der_x509_certificate(der)
            assert tlsconfig._validity(der) == (oracle.not_valid_before_utc, oracle.not_valid_after_utc)
            seen_utc_time |= oracle.not_valid_after_utc.year < 2050
            seen_generalized |= oracle.not_valid_after_utc.year >= 2050
    assert seen_utc_time and seen_generalized  # both time encodings were exercised


def ders_of(path: Path) -> list[bytes]:
    return tlsconfig.read_certificates("tls_cert", str(path), path, NO_ENV)


def test_der_reader_rejects_every_truncation(tls_certs: Certs) -> None:
    [der, *_] = ders_of(tls_certs.good.cert)
    for end in range(len(der)):
        with pytest.raises(ValueError):
            tlsconfig._validity(der[:end])


@pytest.mark.parametrize(("tag", "text", "year"), [
    (0x17, b"491231235959Z", 2049), (0x17, b"500101000000Z", 1950), (0x18, b"99991231235959Z", 9999)])
def test_utc_time_years_follow_rfc_5280(tag: int, text: bytes, year: int) -> None:
    assert tlsconfig._der_time(tag, text).year == year


@pytest.mark.parametrize(("tag", "text"), [(0x17, b"4912312359Z"), (0x17, b"491231235959+0100"), (0x18, b"2049123123595Z"),
                                           (0x04, b"491231235959Z")])
def test_der_time_refuses_forms_rfc_5280_forbids(tag: int, text: bytes) -> None:
    with pytest.raises(ValueError):
        tlsconfig._der_time(tag, text)


# -- the subject in the access log -------------------------------------------------------------


def test_subject_is_rfc_4514_and_cannot_forge_log_lines() -> None:
    subject = ((("countryName", "DE"),), (("organizationName", "Example, Inc."),),
               (("commonName", "alice\nreason=forged"),))
    assert format_subject(subject) == "CN=alice\\0Areason\\=forged,O=Example\\, Inc.,C=DE"
    assert format_subject(((("commonName", " #lead"),),)) == "CN=\\ #lead"
    assert len(format_subject(((("commonName", "x" * 1000),),))) == tlsconfig.MAX_SUBJECT_CHARS


# -- real handshakes ---------------------------------------------------------------------------

Outcome = SessionInfo | str  # the session, or the failed handshake's detail


class Peer:
    """A client started against a port; ``finish()`` waits for it and returns what it printed."""

    def __init__(self, finish: Callable[[], str]) -> None:
        self.finish = finish


def s_client(*args: str) -> Callable[[int], Peer]:
    def start(port: int) -> Peer:
        proc = subprocess.Popen([require_tool("openssl"), "s_client", "-connect", f"127.0.0.1:{port}", "-ign_eof",
                                 "-servername", "localhost", *args],
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

        def finish() -> str:
            out, _ = proc.communicate(timeout=10)
            return out.decode(errors="replace")
        return Peer(finish)
    return start


def raw_client(*chunks: bytes, gap_s: float = 0.0, linger_s: float = 3.0) -> Callable[[int], Peer]:
    """Send *chunks* (with *gap_s* between them), then wait up to *linger_s* for the server to close."""
    def start(port: int) -> Peer:
        output: list[bytes] = []

        def run() -> None:
            with socket.create_connection(("127.0.0.1", port), timeout=linger_s) as sock:
                try:
                    for chunk in chunks:
                        sock.sendall(chunk)
                        time.sleep(gap_s)  # the dripping is the point: a pace, not a wait for an event
                    while data := sock.recv(4096):
                        output.append(data)
                except OSError:
                    pass  # the server gave up on us: that is what these tests look for
        thread = threading.Thread(target=run, daemon=True)
        thread.start()

        def finish() -> str:
            thread.join(timeout=10)
            assert not thread.is_alive()
            return repr(b"".join(output))
        return Peer(finish)
    return start


def serve_one(context: ssl.SSLContext, client: Callable[[int], Peer], timeout_s: float = 5.0,
              stop_fd: int | None = None) -> tuple[Outcome, str]:
    """Accept one connection, run tlsconfig.handshake on it, greet and close with close_notify.

    Returns the outcome and what the client printed.
    """
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(10)
        peer = client(listener.getsockname()[1])
        conn, _ = listener.accept()
        conn.setblocking(False)
        tls = context.wrap_socket(conn, server_side=True, do_handshake_on_connect=False)
        outcome: Outcome
        try:
            handshake(tls, time.monotonic() + timeout_s, stop_fd)
        except HandshakeFailed as failed:
            outcome = failed.detail
        else:
            outcome = tlsconfig.session_info(tls)
            tls.settimeout(5)
            tls.sendall(b"[stamp] hello from tlsconfig\n")
            try:
                tls.unwrap()
            except OSError:
                pass
        finally:
            tls.close()
            printed = peer.finish()
        return outcome, printed


def test_s_client_verifies_the_chain_and_gets_tls_1_3(tls_certs: Certs) -> None:
    outcome, printed = serve_one(context_for(tls_certs.good),
                                 s_client("-CAfile", str(tls_certs.ca), "-verify_return_error"))
    assert outcome == SessionInfo("TLSv1.3", "TLS_AES_256_GCM_SHA384", None)
    assert "Verify return code: 0 (ok)" in printed
    assert "[stamp] hello from tlsconfig" in printed


def test_tls_1_2_is_the_minimum(tls_certs: Certs) -> None:
    outcome, _ = serve_one(context_for(tls_certs.good), s_client("-CAfile", str(tls_certs.ca), "-tls1_2"))
    assert isinstance(outcome, SessionInfo) and outcome.version == "TLSv1.2"
    for old in ("-tls1_1", "-tls1"):
        outcome, printed = serve_one(context_for(tls_certs.good), s_client(old))
        assert outcome == "old protocol version", printed


def test_mutual_tls_names_the_client_subject(tls_certs: Certs) -> None:
    outcome, printed = serve_one(context_for(tls_certs.good, tls_certs.client_ca),
                                 s_client("-cert", str(tls_certs.client.cert), "-key", str(tls_certs.client.key)))
    assert isinstance(outcome, SessionInfo), printed
    # trustme adds an OU of its own between the two we asked for.
    assert re.fullmatch(r"CN=alice,OU=Testing cert #[-\w]+,O=Example Users", str(outcome.client_subject))
    assert outcome.log_fields() == {"tls_version": "TLSv1.3", "tls_cipher": "TLS_AES_256_GCM_SHA384",
                                    "tls_client_subject": outcome.client_subject}


@pytest.mark.parametrize(("client_args", "detail"), [
    ((), "no client certificate"),
    (("-tls1_2",), "no client certificate"),
    (("-cert", "client_stranger"), "client certificate from unknown ca"),
    (("-cert", "client_expired"), "client certificate expired"),
])
def test_mutual_tls_refusals_have_a_detail(tls_certs: Certs, client_args: tuple[str, ...], detail: str) -> None:
    if len(client_args) == 2:
        leaf = getattr(tls_certs, client_args[1])
        client_args = ("-cert", str(leaf.cert), "-key", str(leaf.key))
    outcome, printed = serve_one(context_for(tls_certs.good, tls_certs.client_ca), s_client(*client_args))
    assert outcome == detail, printed


def test_client_that_distrusts_our_certificate_is_an_alert(tls_certs: Certs) -> None:
    outcome, _ = serve_one(context_for(tls_certs.untrusted), s_client("-CAfile", str(tls_certs.ca),
                                                                      "-verify_return_error"))
    assert outcome == "alert unknown ca"


@pytest.mark.parametrize(("chunks", "detail"), [
    ((b"hello\n",), "not tls"),
    ((b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",), "http request"),
    ((b"\x16\x03\x01\x00\x05\x01\x00\x00\x01\x00",), "not tls"),  # a handshake record too short for a ClientHello
    ((b"",), "eof"),
])
def test_plaintext_and_garbage_get_a_stable_detail(tls_certs: Certs, chunks: tuple[bytes, ...], detail: str) -> None:
    def close_after(port: int) -> Peer:
        return raw_client(*chunks, linger_s=0.5)(port)
    outcome, printed = serve_one(context_for(tls_certs.good), close_after if chunks != (b"",) else _close_at_once)
    assert outcome == detail
    # No plaintext answer: nothing, or a TLS alert record (content type 21).
    assert printed == "b''" or printed.startswith("b'\\x15\\x03"), printed


def _close_at_once(port: int) -> Peer:
    socket.create_connection(("127.0.0.1", port)).close()
    return Peer(lambda: "b''")


def test_silent_and_dripping_clients_end_at_the_deadline(tls_certs: Certs) -> None:
    context = context_for(tls_certs.good)
    started = time.monotonic()
    outcome, _ = serve_one(context, raw_client(linger_s=3.0), timeout_s=0.5)
    assert outcome == "timeout"
    assert 0.5 <= time.monotonic() - started < 2.5
    hello = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(20)  # a ClientHello's start, a byte at a time
    started = time.monotonic()
    outcome, _ = serve_one(context, raw_client(*(hello[i:i + 1] for i in range(len(hello))), gap_s=0.05,
                                               linger_s=3.0), timeout_s=0.5)
    assert outcome == "timeout"
    assert 0.5 <= time.monotonic() - started < 2.5


def test_a_stop_ends_a_pending_handshake_at_once(tls_certs: Certs) -> None:
    stop_r, stop_w = os.pipe()
    try:
        timer = threading.Timer(0.2, os.write, (stop_w, b"x"))
        timer.start()
        started = time.monotonic()
        with pytest.raises(HandshakeStopped):
            serve_one(context_for(tls_certs.good), raw_client(linger_s=2.0), timeout_s=10, stop_fd=stop_r)
        assert time.monotonic() - started < 3.0
        timer.join()
    finally:
        os.close(stop_r)
        os.close(stop_w)


def test_reset_timeout_and_os_errors_have_details() -> None:
    assert handshake_error_detail(ConnectionResetError()) == "reset"
    assert handshake_error_detail(BrokenPipeError()) == "reset"
    assert handshake_error_detail(TimeoutError()) == "timeout"
    assert handshake_error_detail(OSError(113, "No route to host")) == "no route to host"
    assert handshake_error_detail(ssl.SSLError()) == "ssl error"


def test_reload_swaps_the_whole_context(tls_certs: Certs, tmp_path: Path) -> None:
    """What a reload does: build a new context from the rewritten files; the old one is untouched."""
    cert, key = tmp_path / "server.crt", tmp_path / "server.key"
    cert.write_bytes(tls_certs.expiring.cert.read_bytes())
    key.write_bytes(tls_certs.expiring.key.read_bytes())
    old = load_server_tls(TLSSettings("server.crt", "server.key"), tmp_path, NO_ENV)
    cert.write_bytes(tls_certs.good.cert.read_bytes())
    with pytest.raises(TLSConfigError, match="does not match"):  # half-rotated: keep the old one
        load_server_tls(TLSSettings("server.crt", "server.key"), tmp_path, NO_ENV)
    key.write_bytes(tls_certs.good.key.read_bytes())
    new = load_server_tls(TLSSettings("server.crt", "server.key"), tmp_path, NO_ENV)
    assert old.warnings and not new.warnings
    assert new.not_after > old.not_after + dt.timedelta(days=365)
    # Both still serve: the old context's live connections are unaffected by the new one.
    for loaded in (old, new):
        outcome, printed = serve_one(loaded.context, s_client("-CAfile", str(tls_certs.ca), "-verify_return_error"))
        assert isinstance(outcome, SessionInfo), printed
