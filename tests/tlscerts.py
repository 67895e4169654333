"""Certificates for the TLS tests, made fresh for each test session with trustme.

:func:`make_certs` writes PEM files into a directory and returns their paths as
:class:`Certs`: a server chain (root CA -> intermediate -> leaf for localhost,
127.0.0.1 and ::1), an expired leaf, one expiring in 3 days, one for the wrong
name, one signed by a CA nobody trusts, a mismatched key, encrypted keys, and
a client CA with a good, an expired and a stranger's client certificate.
The ``tls_certs`` fixture in conftest.py makes them once per session.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

import trustme
from cryptography.hazmat.primitives import serialization

SERVER_NAMES = ("localhost", "127.0.0.1", "::1")


@dataclass(frozen=True)
class Leaf:
    cert: Path  # the leaf, then its intermediates
    key: Path
    both: Path  # certificate chain and key in one file


@dataclass(frozen=True)
class Certs:
    ca: Path  # the root every server certificate but `untrusted` chains to
    good: Leaf
    expired: Leaf
    expiring: Leaf  # 3 days left
    wrong_name: Leaf  # for wrong.example only
    untrusted: Leaf  # signed by a CA not in `ca`
    other_key: Path  # a key that belongs to no certificate above
    encrypted_key: Path  # good's key, PKCS#8 encrypted (password "pw")
    encrypted_key_traditional: Path  # good's key, old OpenSSL format with Proc-Type: 4,ENCRYPTED
    client_ca: Path
    client: Leaf  # CN=alice, O=Example Users, signed by client_ca
    client_expired: Leaf
    client_stranger: Leaf  # CN=mallory, signed by another CA


def _write(directory: Path, name: str, leaf: trustme.LeafCert) -> Leaf:
    cert, key, both = directory / f"{name}.crt", directory / f"{name}.key", directory / f"{name}.pem"
    cert.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    key.write_bytes(leaf.private_key_pem.bytes())
    both.write_bytes(cert.read_bytes() + key.read_bytes())
    return Leaf(cert, key, both)


def make_certs(directory: Path) -> Certs:
    now = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
    root = trustme.CA()
    intermediate = root.create_child_ca()
    stranger_ca = trustme.CA()
    client_ca = trustme.CA(organization_name="Example Client CA")
    (directory / "ca.pem").write_bytes(root.cert_pem.bytes())
    (directory / "client-ca.pem").write_bytes(client_ca.cert_pem.bytes())

    good = _write(directory, "good", intermediate.issue_cert(*SERVER_NAMES))
    expired = _write(directory, "expired", intermediate.issue_cert(
        *SERVER_NAMES, not_before=dt.datetime(2020, 1, 1, tzinfo=dt.timezone.utc),
        not_after=dt.datetime(2021, 1, 1, tzinfo=dt.timezone.utc)))
    expiring = _write(directory, "expiring", intermediate.issue_cert(
        *SERVER_NAMES, not_before=now - dt.timedelta(days=80), not_after=now + dt.timedelta(days=3)))
    wrong_name = _write(directory, "wrong-name", intermediate.issue_cert("wrong.example"))
    untrusted = _write(directory, "untrusted", stranger_ca.issue_cert(*SERVER_NAMES))
    other = trustme.CA().issue_cert("localhost")
    (directory / "other.key").write_bytes(other.private_key_pem.bytes())

    key = serialization.load_pem_private_key(good.key.read_bytes(), password=None)
    encrypted = directory / "encrypted.key"
    encrypted.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                            serialization.BestAvailableEncryption(b"pw")))
    traditional = directory / "encrypted-traditional.key"
    traditional.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                              serialization.PrivateFormat.TraditionalOpenSSL,
                                              serialization.BestAvailableEncryption(b"pw")))

    client = _write(directory, "client", client_ca.issue_cert(
        "alice@example.org", common_name="alice", organization_name="Example Users"))
    client_expired = _write(directory, "client-expired", client_ca.issue_cert(
        "bob@example.org", common_name="bob", not_before=dt.datetime(2020, 1, 1, tzinfo=dt.timezone.utc),
        not_after=dt.datetime(2021, 1, 1, tzinfo=dt.timezone.utc)))
    client_stranger = _write(directory, "client-stranger", stranger_ca.issue_cert(
        "mallory@example.org", common_name="mallory"))
    return Certs(directory / "ca.pem", good, expired, expiring, wrong_name, untrusted, directory / "other.key",
                 encrypted, traditional, directory / "client-ca.pem", client, client_expired, client_stranger)
