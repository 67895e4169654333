"""TLS for a listener: its server context, built from config in one place, and what TLS reports back.

Owns everything tsechod knows about TLS that is not socket I/O:

* :func:`load_server_tls` turns a listener's ``tls_cert``, ``tls_key`` and
  ``tls_client_ca`` (:class:`TLSSettings`) into a ready ``ssl.SSLContext`` plus
  the warnings to log (:class:`ServerTLS`). The context is built whole and
  never changed afterwards, so a reload swaps it like the stamper: new
  connections get the new one, live ones keep theirs. Every failure is a
  :class:`TLSConfigError` whose text is one line naming the key, the value,
  the file and the reason; a reload that gets one keeps the old context.
* :func:`resolve_path`: a value is a path, or a systemd credential name
  (``LoadCredential=``) -- the rule is in its docstring.
* The checks: :func:`read_certificates` (PEM and DER), :func:`check_private_key`
  (PEM, not encrypted), :func:`check_key_matches`, :func:`expiry_warning`
  (expired, not yet valid, or expiring within 14 days).
* After a handshake: :func:`session_info` (version, cipher, client certificate
  subject) for the access event; on a failed one, :func:`handshake_error_detail`
  maps the exception to a short stable ``detail``. :func:`handshake` runs a
  server handshake on a non-blocking socket with a deadline and a stop pipe.

Policy, in :func:`server_context`: the stdlib's ``PROTOCOL_TLS_SERVER`` defaults
(its cipher list, forward secrecy), TLS 1.2 at least, no compression (CRIME),
no renegotiation (a client-driven CPU cost, and TLS 1.3 has none), and with
``tls_client_ca`` a client certificate required and verified against that CA
file only (not the system store: any public CA's customer would get in).

Only the stdlib: the certificate dates are read by the small DER reader below,
which knows just the path to ``validity`` (RFC 5280, 4.1), rather than pulling
in a parsing library or ``ssl``'s private ``_test_decode_cert``.
Nothing here imports the server side, so the client may use it too.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import errno
import json
import os
import re
import select
import ssl
import stat
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final, NamedTuple

CREDENTIALS_ENV: Final = "CREDENTIALS_DIRECTORY"
MIN_VERSION: Final = ssl.TLSVersion.TLSv1_2
# Let's Encrypt renews at 30 days left and mails at 20; 14 still leaves two weeks to notice.
EXPIRY_WARNING_S: Final = 14 * 86400.0
# A certificate chain or key is a few KiB; a file this big is the wrong file, and reading it whole costs memory.
MAX_PEM_BYTES: Final = 1 << 20
DEFAULT_HANDSHAKE_TIMEOUT_S: Final = 10.0

_PEM_BEGIN: Final = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----")
_KEY_LABELS: Final = (b"PRIVATE KEY", b"RSA PRIVATE KEY", b"EC PRIVATE KEY", b"DSA PRIVATE KEY",
                      b"ENCRYPTED PRIVATE KEY")
_DER_SEQUENCE: Final = 0x30
_DER_INTEGER: Final = 0x02
_DER_UTC_TIME: Final = 0x17
_DER_GENERALIZED_TIME: Final = 0x18
_DER_EXPLICIT_0: Final = 0xA0


class TLSConfigError(Exception):
    """A TLS setting that cannot be used; ``str()`` is the one-line message (key, value, file, reason)."""


class HandshakeFailed(Exception):
    """A server handshake failed; ``detail`` is :func:`handshake_error_detail`'s short stable text."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class HandshakeStopped(Exception):
    """The stop pipe became readable during a handshake: the server is stopping."""


@dataclass(frozen=True)
class TLSSettings:
    """One listener's TLS settings as written in the config, before :func:`resolve_path`.

    ``key`` None means the private key is in the ``cert`` file (one PEM with both).
    ``client_ca`` set turns on mutual TLS.
    """

    cert: str
    key: str | None = None
    client_ca: str | None = None


class ServerTLS(NamedTuple):
    """What :func:`load_server_tls` built: the context to serve with, and what to log about it."""

    context: ssl.SSLContext
    warnings: tuple[str, ...]  # one line each; log them at start, reload and check-config
    not_after: dt.datetime  # the earliest expiry in the tls_cert chain (UTC)


class SessionInfo(NamedTuple):
    """What the access event of a TLS connection names."""

    version: str  # "TLSv1.3"
    cipher: str  # "TLS_AES_256_GCM_SHA384"
    client_subject: str | None  # RFC 4514, "CN=alice,O=Example"; None without mutual TLS

    def log_fields(self) -> dict[str, str]:
        """The access event's extra fields (only those that apply)."""
        fields = {"tls_version": self.version, "tls_cipher": self.cipher}
        if self.client_subject is not None:
            fields["tls_client_subject"] = self.client_subject
        return fields


# -- where a file is -------------------------------------------------------------------


def resolve_path(key: str, value: str, base_dir: Path, environ: Mapping[str, str] = os.environ) -> Path:
    """Where the file of setting *key* = *value* is.

    The rule, in this order:

    1. A value with a ``/`` in it is a path: absolute as is, relative to
       *base_dir* (the config file's directory, like ``log_file``).
    2. A value without ``/``, while ``$CREDENTIALS_DIRECTORY`` is set and not
       empty (systemd sets it for a unit with ``LoadCredential=``), is a
       credential name: ``$CREDENTIALS_DIRECTORY/value``. Write ``./server.pem``
       to mean a file next to the config instead.
    3. Otherwise a bare file name, relative to *base_dir*.

    Only the text is looked at here; whether the file exists is the loader's
    question (:func:`load_server_tls`). Raises :class:`TLSConfigError` for an
    empty value and for ``.``/``..`` as a credential name.
    """
    if not value:
        raise TLSConfigError(f"{key} = \"\": needs a file path or a credential name")
    if "/" not in value:
        credentials = environ.get(CREDENTIALS_ENV, "")
        if credentials:
            if value in (".", ".."):
                raise TLSConfigError(f"{_setting(key, value)}: not a credential name (write a path such as ./{value})")
            return Path(credentials) / value
    path = Path(value)
    return path if path.is_absolute() else base_dir / path


def _setting(key: str, value: str) -> str:
    return f"{key} = {json.dumps(value)}"


def _where(key: str, value: str, path: Path) -> str:
    """``tls_cert = "server.pem" (/run/credentials/tsechod.service/server.pem)``: the setting and the file."""
    return _setting(key, value) if str(path) == value else f"{_setting(key, value)} ({path})"


def _read(key: str, value: str, path: Path, environ: Mapping[str, str]) -> bytes:
    """The bytes of a PEM file, bounded; TLSConfigError naming what went wrong."""
    where = _where(key, value, path)
    try:
        # O_NONBLOCK: a FIFO put where a PEM file belongs must not hang start or reload.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        with open(fd, "rb") as file:
            mode = os.fstat(fd).st_mode
            if stat.S_ISDIR(mode):
                raise IsADirectoryError(errno.EISDIR, "is a directory")
            if not stat.S_ISREG(mode):
                raise TLSConfigError(f"{where}: not a regular file (give the PEM file itself)")
            data = file.read(MAX_PEM_BYTES + 1)
    except FileNotFoundError:
        credentials = environ.get(CREDENTIALS_ENV, "")
        if "/" not in value and credentials:
            raise TLSConfigError(
                f"{where}: no credential {value!r} in ${CREDENTIALS_ENV} "
                f"(add LoadCredential={value}:/path/to/file to the unit, or write a path such as ./{value})"
            ) from None
        raise TLSConfigError(f"{where}: no such file (check the path)") from None
    except OSError as err:
        hint = " (tsechod must be able to read it: check owner and mode)" if err.errno == errno.EACCES else ""
        raise TLSConfigError(f"{where}: {_os_reason(err)}{hint}") from None
    if len(data) > MAX_PEM_BYTES:
        raise TLSConfigError(f"{where}: larger than {MAX_PEM_BYTES >> 20} MiB: not a PEM file (is it the right file?)")
    return data


def _os_reason(err: OSError) -> str:
    text = os.strerror(err.errno) if err.errno else str(err)
    return text[:1].lower() + text[1:]


# -- the checks ------------------------------------------------------------------------


def read_certificates(key: str, value: str, path: Path, environ: Mapping[str, str] = os.environ) -> list[bytes]:
    """The DER certificates of a PEM file, in file order (leaf first for a chain).

    Raises :class:`TLSConfigError` when the file is missing or unreadable,
    holds no ``CERTIFICATE`` block, or a block is not a certificate.
    """
    where = _where(key, value, path)
    data = _read(key, value, path, environ)
    blocks = _pem_blocks(data)
    certs: list[bytes] = []
    for index, (label, body) in enumerate(blocks, 1):
        if label != b"CERTIFICATE":
            continue
        try:
            der = base64.b64decode(b"".join(body.split()), validate=True)
            _validity(der)
        except (binascii.Error, ValueError):
            raise TLSConfigError(f"{where}: PEM block {index} is not a valid certificate (damaged file?)") from None
        certs.append(der)
    if not certs:
        if any(label in _KEY_LABELS for label, _ in blocks):
            hint = "are tls_cert and tls_key swapped?" if key == "tls_cert" else "is this the right file?"
            raise TLSConfigError(f"{where}: holds a private key, not a certificate ({hint})")
        raise TLSConfigError(f"{where}: not a PEM certificate (expected a -----BEGIN CERTIFICATE----- block)")
    return certs


def _pem_blocks(data: bytes) -> list[tuple[bytes, bytes]]:
    """``(label, body)`` of each complete PEM block, in one pass over the lines.

    One pass, so a file of a million BEGIN lines without an END costs
    linear time (a lazy regex from each BEGIN to its END would be quadratic).
    The body keeps its header lines (``Proc-Type: ...``).
    """
    blocks = []
    label: bytes | None = None
    body: list[bytes] = []
    for line in data.splitlines():
        line = line.strip()
        if label is None:
            begin = _PEM_BEGIN.fullmatch(line)
            if begin:
                label, body = begin.group(1), []
        elif line == b"-----END " + label + b"-----":
            blocks.append((label, b"\n".join(body)))
            label = None
        else:
            body.append(line)
    return blocks


def check_private_key(key: str, value: str, path: Path, environ: Mapping[str, str] = os.environ) -> None:
    """Check that a file holds an unencrypted PEM private key.

    tsechod starts unattended, so it has no one to ask for a password: an
    encrypted key is an error with the command that decrypts it.
    """
    where = _where(key, value, path)
    data = _read(key, value, path, environ)
    blocks = _pem_blocks(data)
    keys = [(label, body) for label, body in blocks if label in _KEY_LABELS]
    if not keys:
        if any(label == b"CERTIFICATE" for label, _ in blocks):
            raise TLSConfigError(f"{where}: holds no private key, only certificates (is this the right file?)")
        raise TLSConfigError(f"{where}: not a PEM private key (expected a -----BEGIN PRIVATE KEY----- block)")
    label, body = keys[0]
    # PKCS#8 says so in its label, the traditional format in a Proc-Type header.
    if label == b"ENCRYPTED PRIVATE KEY" or re.search(rb"^Proc-Type: *4, *ENCRYPTED", body, re.M):
        raise TLSConfigError(
            f"{where}: the private key is encrypted and tsechod cannot ask for a password "
            f"(decrypt it: openssl pkey -in {path} -out {path}.plain; protect it with file modes or LoadCredential=)"
        )


def check_key_matches(
    cert: tuple[str, str, Path], key: tuple[str, str, Path], context: ssl.SSLContext | None = None
) -> ssl.SSLContext:
    """Check that the private key belongs to the certificate (each given as ``(key, value, path)``).

    Loads the pair into *context* (a scratch server context if None) and
    returns it: the check is the load the server does, so what passes serves.
    """
    cert_key, cert_value, cert_path = cert
    key_key, key_value, key_path = key
    if context is None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(cert_path, key_path, password=_no_password)
    except _EncryptedKey:
        raise TLSConfigError(f"{_where(key_key, key_value, key_path)}: the private key is encrypted "
                             "and tsechod cannot ask for a password") from None
    except ssl.SSLError as err:
        pair = f"{_where(key_key, key_value, key_path)} and {_where(cert_key, cert_value, cert_path)}"
        if getattr(err, "reason", None) == "KEY_VALUES_MISMATCH":
            raise TLSConfigError(f"{pair}: the key does not match the certificate "
                                 "(was one of them replaced without the other?)") from None
        raise TLSConfigError(f"{pair}: cannot load the pair: {_ssl_reason(err)}") from None
    except OSError as err:  # replaced or removed between our read and this one
        raise TLSConfigError(f"{_where(cert_key, cert_value, cert_path)}: {_os_reason(err)}") from None
    return context


class _EncryptedKey(Exception):
    pass


def _no_password() -> str:
    # OpenSSL asks for a password only when the key is encrypted; raising here
    # (ssl passes it through) says so, instead of a generic "PEM lib".
    raise _EncryptedKey


def _ssl_reason(err: ssl.SSLError) -> str:
    return (getattr(err, "reason", None) or type(err).__name__).lower().replace("_", " ")


def expiry_warning(
    key: str, value: str, certs: list[bytes], now: float | None = None, within_s: float = EXPIRY_WARNING_S
) -> str | None:
    """A one-line warning when a certificate of *certs* has expired, expires within *within_s*, or is not yet valid.

    The earliest expiry of the chain counts (an intermediate can expire
    first). None when all is well.
    """
    current = dt.datetime.fromtimestamp(time.time() if now is None else now, dt.timezone.utc)
    validities = [_validity(der) for der in certs]
    index, (not_before, not_after) = min(enumerate(validities, 1), key=lambda item: item[1][1])
    which = "certificate" if len(certs) == 1 or index == 1 else f"certificate {index} of the chain"
    left_s = (not_after - current).total_seconds()
    if left_s <= 0:
        return (f"{_setting(key, value)}: {which} expired on {_utc(not_after)} ({-left_s / 86400:.1f} days ago); "
                "clients will refuse it: renew it, then reload (systemctl reload tsechod)")
    if left_s <= within_s:
        return (f"{_setting(key, value)}: {which} expires on {_utc(not_after)}, in {left_s / 86400:.1f} days: "
                "renew it, then reload (systemctl reload tsechod)")
    for number, (begins, _) in enumerate(validities, 1):
        if begins > current:
            return (f"{_setting(key, value)}: certificate {number} is not valid before {_utc(begins)} "
                    "(is this host's clock right?)")
    return None


def _utc(moment: dt.datetime) -> str:
    return moment.strftime("%Y-%m-%d %H:%M:%S UTC")


# -- the context -----------------------------------------------------------------------


def server_context(settings: TLSSettings, base_dir: Path, environ: Mapping[str, str] = os.environ) -> ssl.SSLContext:
    """A server context for *settings*: every check but the expiry one. Raises :class:`TLSConfigError`."""
    return load_server_tls(settings, base_dir, environ).context


def load_server_tls(
    settings: TLSSettings, base_dir: Path, environ: Mapping[str, str] = os.environ, now: float | None = None
) -> ServerTLS:
    """Resolve, read, check and load a listener's TLS settings; the one place a server context is made.

    Raises :class:`TLSConfigError` (one line) for a missing or unreadable file,
    a file that is not PEM, an encrypted key, a key that does not match the
    certificate, or a bad client CA file. Expiry is a warning, not an error:
    an expired certificate still serves clients that ignore it, and refusing
    to start would turn a renewal reminder into an outage.
    """
    cert_path = resolve_path("tls_cert", settings.cert, base_dir, environ)
    certs = read_certificates("tls_cert", settings.cert, cert_path, environ)
    if settings.key is None:
        key = ("tls_cert", settings.cert, cert_path)
    else:
        key = ("tls_key", settings.key, resolve_path("tls_key", settings.key, base_dir, environ))
    check_private_key(*key, environ)

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = MIN_VERSION
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    check_key_matches(("tls_cert", settings.cert, cert_path), key, context)
    if settings.client_ca is not None:
        ca_path = resolve_path("tls_client_ca", settings.client_ca, base_dir, environ)
        # Read and checked here for the message; loaded from the bytes read, so both see the same file.
        ca_der = read_certificates("tls_client_ca", settings.client_ca, ca_path, environ)
        try:
            context.load_verify_locations(cadata=b"".join(ca_der))
        except ssl.SSLError as err:
            raise TLSConfigError(f"{_where('tls_client_ca', settings.client_ca, ca_path)}: "
                                 f"cannot use as CA: {_ssl_reason(err)}") from None
        context.verify_mode = ssl.CERT_REQUIRED

    warning = expiry_warning("tls_cert", settings.cert, certs, now)
    not_after = min(_validity(der)[1] for der in certs)
    return ServerTLS(context, (warning,) if warning else (), not_after)


# -- a tiny DER reader: just enough to find a certificate's validity ---------------------


def _der_element(data: bytes, offset: int, end: int) -> tuple[int, int, int]:
    """``(tag, start, stop)`` of the DER element at *offset*: its contents are ``data[start:stop]``."""
    if offset + 2 > end:
        raise ValueError("truncated DER")
    tag, length = data[offset], data[offset + 1]
    start = offset + 2
    if tag & 0x1F == 0x1F:
        raise ValueError("multi-byte DER tag")  # none on the path to validity
    if length & 0x80:
        count = length & 0x7F
        if not 1 <= count <= 4 or start + count > end:
            raise ValueError("bad DER length")
        length = int.from_bytes(data[start : start + count], "big")
        start += count
    if start + length > end:
        raise ValueError("DER element overruns its container")
    return tag, start, start + length


def _validity(der: bytes) -> tuple[dt.datetime, dt.datetime]:
    """``(notBefore, notAfter)`` of a DER certificate, as aware UTC datetimes. ValueError if it isn't one.

    Certificate ::= SEQUENCE { tbsCertificate SEQUENCE { [0] version OPTIONAL,
    serialNumber INTEGER, signature SEQUENCE, issuer SEQUENCE,
    validity SEQUENCE { notBefore Time, notAfter Time }, ... }, ... }
    """
    tag, start, stop = _der_element(der, 0, len(der))
    if tag != _DER_SEQUENCE:
        raise ValueError("not a certificate")
    tag, offset, tbs_end = _der_element(der, start, stop)
    if tag != _DER_SEQUENCE:
        raise ValueError("not a certificate")
    tag, _, next_offset = _der_element(der, offset, tbs_end)
    if tag == _DER_EXPLICIT_0:  # version
        offset = next_offset
        tag, _, next_offset = _der_element(der, offset, tbs_end)
    if tag != _DER_INTEGER:
        raise ValueError("no serial number")
    offset = next_offset
    for _ in range(2):  # signature algorithm, issuer
        tag, _, offset = _der_element(der, offset, tbs_end)
        if tag != _DER_SEQUENCE:
            raise ValueError("not a certificate")
    tag, offset, validity_end = _der_element(der, offset, tbs_end)
    if tag != _DER_SEQUENCE:
        raise ValueError("no validity")
    times = []
    for _ in range(2):
        tag, start, offset = _der_element(der, offset, validity_end)
        times.append(_der_time(tag, der[start:offset]))
    return times[0], times[1]


def _der_time(tag: int, text: bytes) -> dt.datetime:
    """UTCTime ``YYMMDDHHMMSSZ`` or GeneralizedTime ``YYYYMMDDHHMMSSZ``, the forms RFC 5280 allows."""
    if tag == _DER_UTC_TIME and len(text) == 13:
        year = int(text[:2])
        year += 1900 if year >= 50 else 2000  # RFC 5280, 4.1.2.5.1
        rest = text[2:]
    elif tag == _DER_GENERALIZED_TIME and len(text) == 15:
        year, rest = int(text[:4]), text[4:]
    else:
        raise ValueError("bad certificate time")
    if not (rest.endswith(b"Z") and rest[:-1].isdigit()):
        raise ValueError("bad certificate time")
    month, day, hour, minute, second = (int(rest[i : i + 2]) for i in range(0, 10, 2))
    return dt.datetime(year, month, day, hour, minute, second, tzinfo=dt.timezone.utc)


# -- after the handshake ---------------------------------------------------------------

# getpeercert()'s long attribute names -> RFC 4514's short ones.
_SHORT_NAMES: Final = {
    "commonName": "CN", "organizationName": "O", "organizationalUnitName": "OU", "countryName": "C",
    "stateOrProvinceName": "ST", "localityName": "L", "streetAddress": "STREET", "domainComponent": "DC",
    "userId": "UID",
}
_RFC4514_SPECIAL: Final = frozenset(',+"\\<>;=')
MAX_SUBJECT_CHARS: Final = 256


def session_info(conn: ssl.SSLSocket | ssl.SSLObject) -> SessionInfo:
    """Protocol version, cipher and (with mutual TLS) the client's subject, after a completed handshake."""
    cipher = conn.cipher()
    subject = None
    peer = conn.getpeercert()
    if peer:  # {} or None without a verified client certificate
        subject = format_subject(peer.get("subject", ()))  # type: ignore[arg-type]
    return SessionInfo(conn.version() or "unknown", cipher[0] if cipher else "unknown", subject)


def format_subject(subject: tuple[tuple[tuple[str, str], ...], ...]) -> str:
    """``getpeercert()["subject"]`` as RFC 4514 text, most specific first: ``CN=alice,O=Example``.

    Special characters are escaped as RFC 4514 says, and anything not
    printable as ``\\XX``, so a certificate cannot forge log lines; the text is
    cut at 256 characters.
    """
    rdns = []
    for rdn in reversed(subject):
        rdns.append("+".join(f"{_SHORT_NAMES.get(name, name)}={_escape_dn_value(value)}" for name, value in rdn))
    text = ",".join(rdns)
    return text if len(text) <= MAX_SUBJECT_CHARS else text[: MAX_SUBJECT_CHARS - 3] + "..."


def _escape_dn_value(value: str) -> str:
    out = []
    for index, char in enumerate(value):
        if char in _RFC4514_SPECIAL or (char in " #" and index == 0) or (char == " " and index == len(value) - 1):
            out.append("\\" + char)
        elif not char.isprintable():
            out.append("".join(f"\\{byte:02X}" for byte in char.encode("utf-8", "surrogatepass")))
        else:
            out.append(char)
    return "".join(out)


# -- a failed handshake ----------------------------------------------------------------

# OpenSSL reason codes -> detail. Reason codes are OpenSSL's stable identifiers;
# the details are ours and documented, so log searches survive OpenSSL updates.
_REASON_DETAILS: Final = {
    "WRONG_VERSION_NUMBER": "not tls",  # plaintext: its first bytes read as a bogus record version
    "UNKNOWN_PROTOCOL": "not tls",
    "PACKET_LENGTH_TOO_LONG": "not tls",
    "RECORD_LENGTH_MISMATCH": "not tls",
    "LENGTH_TOO_SHORT": "not tls",
    "BAD_PACKET_LENGTH": "not tls",
    "HTTP_REQUEST": "http request",
    "HTTPS_PROXY_REQUEST": "http proxy request",
    "UNSUPPORTED_PROTOCOL": "old protocol version",
    "VERSION_TOO_LOW": "old protocol version",
    "NO_SHARED_CIPHER": "no shared cipher",
    "NO_CIPHERS_AVAILABLE": "no shared cipher",
    "NO_SHARED_SIGNATURE_ALGORITHMS": "no shared signature algorithm",
    "NO_SUITABLE_SIGNATURE_ALGORITHM": "no shared signature algorithm",
    "PEER_DID_NOT_RETURN_A_CERTIFICATE": "no client certificate",
    "UNEXPECTED_EOF_WHILE_READING": "eof",
}
# X509_V_ERR_* codes (x509_vfy.h) of a client certificate that failed verification -> detail.
_VERIFY_DETAILS: Final = {
    2: "client certificate from unknown ca",  # unable to get issuer certificate
    9: "client certificate not yet valid",
    10: "client certificate expired",
    18: "client certificate self-signed",
    19: "client certificate from unknown ca",  # self-signed certificate in chain
    20: "client certificate from unknown ca",  # unable to get local issuer certificate
    21: "client certificate from unknown ca",  # unable to verify the first certificate
    23: "client certificate revoked",
    24: "client certificate chain has a non-ca",
    26: "client certificate wrong purpose",
}
_ALERT: Final = re.compile(r"^(?:SSLV3|TLSV1|TLSV13)_ALERT_([A-Z0-9_]+)$")


def handshake_error_detail(err: BaseException) -> str:
    """A short, stable ``detail`` for ``reason=tls-error detail="..."`` from a handshake exception.

    Values: ``not tls`` (plaintext), ``http request``, ``old protocol version``
    (TLS 1.1 or older offered), ``no shared cipher``, ``no client certificate``,
    ``client certificate expired`` / ``... from unknown ca`` / ``... self-signed``
    / ``... not yet valid`` / ``... revoked`` / ``... rejected``,
    ``alert <name>`` (the client sent a TLS alert, such as ``alert unknown ca``
    when it does not trust our certificate), ``eof`` (closed mid-handshake),
    ``reset``, ``timeout``; anything else is OpenSSL's reason in lower case
    with spaces (``ssl error`` if it has none), or the OS error's text.
    """
    if isinstance(err, ssl.SSLCertVerificationError):
        return _VERIFY_DETAILS.get(err.verify_code, "client certificate rejected")
    if isinstance(err, (ssl.SSLEOFError, ssl.SSLZeroReturnError)):
        return "eof"
    if isinstance(err, ssl.SSLError):
        reason = getattr(err, "reason", None) or ""
        if reason in _REASON_DETAILS:
            return _REASON_DETAILS[reason]
        alert = _ALERT.match(reason)
        if alert:
            return "alert " + alert.group(1).lower().replace("_", " ")
        return reason.lower().replace("_", " ") if reason else "ssl error"
    if isinstance(err, TimeoutError):
        return "timeout"
    if isinstance(err, (ConnectionResetError, BrokenPipeError, ConnectionAbortedError)):
        return "reset"
    if isinstance(err, OSError):
        return _os_reason(err) if err.errno else type(err).__name__.lower()
    return type(err).__name__.lower()


def handshake(conn: ssl.SSLSocket, deadline: float, stop_fd: int | None = None) -> None:
    """Complete a server handshake on a non-blocking *conn* by *deadline* (``time.monotonic()``).

    *conn* comes from ``context.wrap_socket(sock, server_side=True,
    do_handshake_on_connect=False)`` with *sock* non-blocking. Each wait is a
    ``poll()`` on the socket and *stop_fd*, so a silent or dripping client costs
    this thread until *deadline* at most and a stop ends the wait at once.
    Raises :class:`HandshakeFailed` (``detail`` from
    :func:`handshake_error_detail`, ``timeout`` at the deadline) or
    :class:`HandshakeStopped`.
    """
    poller = select.poll()
    if stop_fd is not None:
        poller.register(stop_fd, select.POLLIN)
    want = select.POLLIN
    poller.register(conn, want)
    while True:
        try:
            conn.do_handshake()
            return
        except ssl.SSLWantReadError:
            events = select.POLLIN
        except ssl.SSLWantWriteError:
            events = select.POLLOUT
        except (OSError, ValueError) as err:  # ValueError: the socket was closed under us
            raise HandshakeFailed(handshake_error_detail(err)) from err
        if events != want:
            poller.modify(conn, events)
            want = events
        left = deadline - time.monotonic()
        if left <= 0:
            raise HandshakeFailed("timeout")
        ready = poller.poll(left * 1000 + 1)
        if stop_fd is not None and any(fd == stop_fd for fd, _ in ready):
            raise HandshakeStopped
