"""The PROXY header parser, fed bytes directly: every split, every malformed header we
could think of, and round trips against an independent builder (PyPI's proxy-protocol,
with the crc32c package computing its checksums)."""

from __future__ import annotations

import ipaddress
import re
import socket
import struct
import subprocess
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from unittest import mock

import crc32c as crc32c_oracle
import proxyprotocol.tlv
import pytest
from helpers import recv_all, require_tool, wait_until
from hypothesis import given, settings
from hypothesis import strategies as st
from proxyprotocol.result import (
    ProxyResult,
    ProxyResultIPv4,
    ProxyResultIPv6,
    ProxyResultLocal,
    ProxyResultUnix,
    ProxyResultUnknown,
)
from proxyprotocol.tlv import ProxyProtocolTLV
from proxyprotocol.v1 import ProxyProtocolV1
from proxyprotocol.v2 import ProxyProtocolV2

from tsecho.proxyproto import (
    V1_MAX_BYTES,
    V2_HEADER_BYTES,
    V2_MAX_LENGTH_BYTES,
    V2_SIGNATURE,
    Command,
    Family,
    ProxyHeader,
    ProxyHeaderError,
    ProxyHeaderParser,
    crc32c,
)

Outcome = tuple[ProxyHeader, bytes] | str  # (header, everything after it) or the error reason


def v2(command: int = 1, family: int = 0x11, body: bytes = b"", length: int | None = None, version: int = 2) -> bytes:
    """A v2 header built by hand, for the malformed cases the builder will not make."""
    size = len(body) if length is None else length
    return V2_SIGNATURE + bytes([version << 4 | command, family]) + struct.pack("!H", size) + body


def tlv(kind: int, value: bytes) -> bytes:
    return struct.pack("!BH", kind, len(value)) + value


IPV4_BLOCK = ipaddress.IPv4Address("203.0.113.7").packed + ipaddress.IPv4Address("10.0.0.5").packed + struct.pack("!HH", 51544, 8009)


def with_crc(header: bytes) -> bytes:
    """*header* (ending in a zeroed CRC32C TLV) with the checksum the oracle library computes."""
    return header[:-4] + struct.pack("!I", crc32c_oracle.crc32c(header))


def run(chunks: list[bytes], mode: str = "any") -> Outcome:
    """Feed *chunks* one by one as reads; the outcome with every byte after the header."""
    parser = ProxyHeaderParser(mode)
    for index, chunk in enumerate(chunks):
        try:
            found = parser.feed(chunk)
        except ProxyHeaderError as err:
            return err.reason
        if found is not None:
            header, rest = found
            return header, rest + b"".join(chunks[index + 1 :])
    try:
        parser.finish()
    except ProxyHeaderError as err:
        return err.reason
    return "incomplete"


def splits(data: bytes) -> Iterator[list[bytes]]:
    """The input whole, one byte at a time, and cut in two at every offset."""
    yield [data]
    yield [data[i : i + 1] for i in range(len(data))]
    for i in range(len(data) + 1):
        yield [data[:i], data[i:]]


def outcome_of_every_split(data: bytes, mode: str = "any") -> Outcome:
    """The outcome of *data* read whole, asserting every split gives the same.

    A refusal quotes what had arrived ("starts b'GET / HT'"), which depends on the
    split; the reason before the quote must not.
    """
    whole = run([data], mode)
    for chunks in splits(data):
        outcome = run(chunks, mode)
        if isinstance(whole, str) and isinstance(outcome, str):
            assert outcome.split(" (starts ")[0] == whole.split(" (starts ")[0], chunks
        else:
            assert outcome == whole, chunks
    return whole


def header_and_rest(data: bytes, mode: str = "any") -> tuple[ProxyHeader, bytes]:
    """The header every split of *data* gives, and the bytes after it (a refusal fails the test)."""
    outcome = outcome_of_every_split(data, mode)
    assert not isinstance(outcome, str), outcome
    return outcome


def parsed(data: bytes, mode: str = "any") -> ProxyHeader:
    header, rest = header_and_rest(data + b"first line\r\n", mode)
    assert rest == b"first line\r\n"  # the client's first data, whatever the split: nothing lost
    assert header.header_bytes == len(data)
    return header


# -- valid headers ---------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["v1", "any"])
def test_v1_tcp4_gives_the_client_address_and_keeps_the_data_after_it(mode: str) -> None:
    header = parsed(b"PROXY TCP4 203.0.113.7 10.0.0.5 51544 8009\r\n", mode)
    assert (header.version, header.command, header.family) == (1, Command.PROXY, Family.TCP4)
    assert header.client == (ipaddress.IPv4Address("203.0.113.7"), 51544)
    assert (header.destination, header.destination_port) == (ipaddress.IPv4Address("10.0.0.5"), 8009)


@pytest.mark.parametrize(
    ("text", "source"),
    [
        (b"2001:db8::7", "2001:db8::7"),
        (b"::ffff:192.0.2.1", "::ffff:192.0.2.1"),  # how nginx writes an IPv4-mapped client
        (b"FFFF:ffff:0000:0:1:2:3:4", "ffff:ffff::1:2:3:4"),  # upper case, 4-digit groups
    ],
)
def test_v1_tcp6_accepts_the_forms_senders_use(text: bytes, source: str) -> None:
    header = parsed(b"PROXY TCP6 " + text + b" ::1 0 65535\r\n")
    assert header.client == (ipaddress.IPv6Address(source), 0)
    assert header.destination_port == 65535


def test_v1_longest_tcp6_line_fits() -> None:
    full = b":".join([b"ffff"] * 8)
    line = b"PROXY TCP6 " + full + b" " + full + b" 65535 65535\r\n"
    assert len(line) == 104  # the spec's figure
    assert parsed(line).source == ipaddress.IPv6Address("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff")


@pytest.mark.parametrize(
    "line",
    [
        b"PROXY UNKNOWN\r\n",
        b"PROXY UNKNOWN ffff:: ffff:: 65535 65535\r\n",
        b"PROXY UNKNOWN whatever \xff\x00 the sender puts here\r\n",  # "must ignore anything" before CRLF
        b"PROXY UNKNOWN " + b"x" * (V1_MAX_BYTES - 16) + b"\r\n",  # exactly 107 bytes
    ],
)
def test_v1_unknown_is_a_local_connection_without_address(line: bytes) -> None:
    header = parsed(line)
    assert (header.command, header.family, header.client) == (Command.LOCAL, Family.UNKNOWN, None)


@pytest.mark.parametrize("mode", ["v2", "any"])
def test_v2_tcp4_gives_the_client_address(mode: str) -> None:
    header = parsed(v2(body=IPV4_BLOCK), mode)
    assert (header.version, header.command, header.family) == (2, Command.PROXY, Family.TCP4)
    assert header.client == (ipaddress.IPv4Address("203.0.113.7"), 51544)
    assert (header.destination, header.destination_port) == (ipaddress.IPv4Address("10.0.0.5"), 8009)
    assert header.header_bytes == 28


def test_v2_tcp6_gives_the_client_address() -> None:
    block = ipaddress.IPv6Address("2001:db8::7").packed + ipaddress.IPv6Address("::1").packed + struct.pack("!HH", 1, 2)
    header = parsed(v2(family=0x21, body=block))
    assert header.family is Family.TCP6
    assert header.client == (ipaddress.IPv6Address("2001:db8::7"), 1)


@pytest.mark.parametrize(
    ("family", "body"),
    [
        (0x00, b""),  # what haproxy's check-send-proxy sends
        (0x11, b""),  # LOCAL with a family but no addresses
        (0x11, IPV4_BLOCK),  # LOCAL with addresses: "discard the protocol block"
        (0x41, b"\x01\x02\x03"),  # LOCAL with a family outside the spec: ignored too
        (0x21, b"short"),  # LOCAL: the length need not fit the family
    ],
)
def test_v2_local_is_the_proxys_own_connection(family: int, body: bytes) -> None:
    header = parsed(v2(command=0, family=family, body=body))
    assert header.command is Command.LOCAL
    assert header.client is None


@pytest.mark.parametrize(
    ("family", "expected"),
    [
        (0x00, Family.UNSPEC),
        (0x10, Family.UNSPEC),  # INET with an unspecified transport: addresses ignored
        (0x01, Family.UNSPEC),
        (0x41, Family.UNKNOWN),  # family nibble outside the spec
        (0x13, Family.UNKNOWN),  # transport nibble outside the spec
        (0xFF, Family.UNKNOWN),
    ],
)
def test_v2_proxy_over_unspecified_or_unknown_family_has_no_address(family: int, expected: Family) -> None:
    header = parsed(v2(family=family, body=IPV4_BLOCK + tlv(0x02, b"ignored")))
    assert (header.command, header.family, header.client, header.tlv_types) == (Command.PROXY, expected, None, ())


def test_v2_unix_has_no_ip_address_but_its_tlvs_are_read() -> None:
    paths = b"/run/haproxy.sock".ljust(108, b"\0") + b"/run/tsechod.sock".ljust(108, b"\0")
    header = parsed(v2(family=0x31, body=paths + tlv(0x02, b"echo.example")))
    assert (header.family, header.client, header.authority) == (Family.UNIX, None, "echo.example")


def test_v2_udp_addresses_are_reported_as_udp() -> None:
    header = parsed(v2(family=0x12, body=IPV4_BLOCK))
    assert header.family is Family.UDP4
    assert header.client == (ipaddress.IPv4Address("203.0.113.7"), 51544)


def test_v2_tlvs_that_matter_are_parsed_and_the_rest_skipped() -> None:
    tlvs = (
        tlv(0x04, b"")  # NOOP
        + tlv(0x02, "écho.example".encode())  # AUTHORITY
        + tlv(0x01, b"h2")  # ALPN
        + tlv(0xEA, b"\x01vpce-0123abcd")  # AWS VPC endpoint id
        + tlv(0xEA, b"\x02other-aws-subtype")
        + tlv(0x20, b"\x01\x00\x00\x00\x00" + tlv(0x21, b"TLSv1.3"))  # SSL, skipped
        + tlv(0xE5, bytes(300))  # application-specific, skipped
        + tlv(0x02, b"second.example")  # a repeat: the first counts
        + tlv(0x03, bytes(4))  # CRC32C
    )
    header = parsed(with_crc(v2(body=IPV4_BLOCK + tlvs)))
    assert header.authority == "écho.example"
    assert header.alpn == b"h2"
    assert header.aws_vpce_id == "vpce-0123abcd"
    assert header.crc32c_verified
    assert header.tlv_types == (0x04, 0x02, 0x01, 0xEA, 0xEA, 0x20, 0xE5, 0x02, 0x03)


def test_v2_without_crc32c_is_not_verified_but_accepted() -> None:
    assert not parsed(v2(body=IPV4_BLOCK + tlv(0x02, b"a"))).crc32c_verified


def test_v2_largest_allowed_length_is_read_whole() -> None:
    padding = tlv(0x04, bytes(V2_MAX_LENGTH_BYTES - len(IPV4_BLOCK) - 3))
    header = parsed(v2(body=IPV4_BLOCK + padding))
    assert header.header_bytes == V2_HEADER_BYTES + V2_MAX_LENGTH_BYTES


# -- malformed headers ----------------------------------------------------------------------

V1_OK = b"PROXY TCP4 203.0.113.7 10.0.0.5 51544 8009\r\n"

MALFORMED = [
    # (mode, bytes, reason pattern)
    ("any", b"GET / HTTP/1.1\r\n", r"^no PROXY header \(starts b'GET / HTTP/1.1\\r\\n'\.\.\.\)$"),
    ("any", b"\x16\x03\x01\x02\x00", r"^no PROXY header"),  # a TLS ClientHello
    ("v1", b"GET / HTTP/1.1\r\n", r"^not a PROXY v1 header"),
    ("v1", b"PROXYTCP4 1.2.3.4 1.2.3.4 1 2\r\n", r"^not a PROXY v1 header"),
    ("v1", b"proxy TCP4 1.2.3.4 1.2.3.4 1 2\r\n", r"^not a PROXY v1 header"),
    ("v1", v2(body=IPV4_BLOCK), r"^not a PROXY v1 header"),
    ("v2", V1_OK, r"^not a PROXY v2 header"),
    ("v2", b"\r\n\r\n\x00\r\nQUIT\r", r"^not a PROXY v2 header"),
    ("any", b"\r\n\r\n\x00\r\nQUIT!" + bytes(20), r"^not a PROXY v2 header"),
    # v1: the line
    ("any", V1_OK[:-2] + b"\n", r"^v1 header line ends in a bare LF, not CRLF$"),
    ("any", V1_OK[:-2] + b"\r\r\n", r"^v1 header has a CR not followed by LF$"),
    ("any", b"PROXY TCP4\r1.2.3.4", r"^v1 header has a CR not followed by LF$"),
    ("any", b"PROXY UNKNOWN \n\r\n", r"bare LF"),
    ("any", b"PROXY UNKNOWN " + b"x" * 93, r"^v1 header has no CRLF in its first 107 bytes$"),
    ("any", b"PROXY UNKNOWN " + b"x" * 92 + b"\r\n", r"^v1 header has no CRLF in its first 107 bytes$"),  # 108
    ("any", b"PROXY UNKNOWNX\r\n", r"^v1 protocol b'UNKNOWNX' is not TCP4, TCP6 or UNKNOWN$"),
    ("any", b"PROXY TCP5 1.2.3.4 1.2.3.4 1 2\r\n", r"^v1 protocol b'TCP5'"),
    ("any", b"PROXY tcp4 1.2.3.4 1.2.3.4 1 2\r\n", r"^v1 protocol b'tcp4'"),
    ("any", b"PROXY  TCP4 1.2.3.4 1.2.3.4 1 2\r\n", r"^v1 protocol b''"),
    ("any", b"PROXY TCP4 1.2.3.4  1.2.3.4 1 2\r\n", r"not 6: PROXY TCP4\|TCP6 SRC DST SRCPORT DSTPORT$"),
    ("any", b"PROXY TCP4 1.2.3.4 1.2.3.4 1 2 \r\n", r"fields \(single spaces\), not 6"),
    ("any", b"PROXY TCP4 1.2.3.4 1.2.3.4 1\r\n", r"has 5 space-separated fields"),
    ("any", b"PROXY TCP4\r\n", r"has 2 space-separated fields"),
    ("any", b"PROXY TCP4 1.2.3.4 1.2.3.4 1 2 3\r\n", r"has 7 space-separated fields"),
    # v1: addresses
    ("any", b"PROXY TCP4 01.2.3.4 1.2.3.4 1 2\r\n", r"^bad v1 source address b'01.2.3.4' for TCP4$"),
    ("any", b"PROXY TCP4 1.2.3.256 1.2.3.4 1 2\r\n", r"^bad v1 source address b'1.2.3.256'"),
    ("any", b"PROXY TCP4 1.2.3 1.2.3.4 1 2\r\n", r"^bad v1 source address b'1.2.3'"),
    ("any", b"PROXY TCP4 1.2.3.4.5 1.2.3.4 1 2\r\n", r"^bad v1 source address"),
    ("any", b"PROXY TCP4 ::1 1.2.3.4 1 2\r\n", r"^bad v1 source address b'::1' for TCP4$"),
    ("any", b"PROXY TCP4 1.2.3.4 ::1 1 2\r\n", r"^bad v1 destination address b'::1' for TCP4$"),
    ("any", b"PROXY TCP6 1.2.3.4 ::1 1 2\r\n", r"^bad v1 source address b'1.2.3.4' for TCP6$"),
    ("any", b"PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n", r"^bad v1 source address b'fe80::1%eth0'"),
    ("any", b"PROXY TCP6 1::2::3 ::1 1 2\r\n", r"^bad v1 source address"),
    ("any", b"PROXY TCP6 12345::1 ::1 1 2\r\n", r"^bad v1 source address"),
    ("any", b"PROXY TCP6 ::ffff:01.2.3.4 ::1 1 2\r\n", r"^bad v1 source address"),
    ("any", b"PROXY TCP4 \xd9\xa1.2.3.4 1.2.3.4 1 2\r\n", r"^bad v1 source address"),  # Arabic-Indic digit
    # v1: ports
    ("any", b"PROXY TCP4 1.2.3.4 1.2.3.4 +80 2\r\n", r"^bad v1 source port b'\+80' \(0-65535, no leading zeros\)$"),
    ("any", b"PROXY TCP4 1.2.3.4 1.2.3.4 080 2\r\n", r"^bad v1 source port b'080'"),
    ("any", b"PROXY TCP4 1.2.3.4 1.2.3.4 65536 2\r\n", r"^bad v1 source port b'65536'"),
    ("any", b"PROXY TCP4 1.2.3.4 1.2.3.4 -1 2\r\n", r"^bad v1 source port b'-1'"),
    ("any", b"PROXY TCP4 1.2.3.4 1.2.3.4 8_0 2\r\n", r"^bad v1 source port b'8_0'"),
    ("any", b"PROXY TCP4 1.2.3.4 1.2.3.4 0x50 2\r\n", r"^bad v1 source port"),
    ("any", b"PROXY TCP4 1.2.3.4 1.2.3.4 \xd9\xa1 2\r\n", r"^bad v1 source port"),
    ("any", b"PROXY TCP4 1.2.3.4 1.2.3.4 1 999999\r\n", r"^bad v1 destination port b'999999'"),
    # v2: fixed part
    ("any", v2(version=1, body=IPV4_BLOCK), r"^v2 header has version 1, not 2$"),
    ("any", v2(version=3, body=IPV4_BLOCK), r"^v2 header has version 3, not 2$"),
    ("any", v2(command=2, body=IPV4_BLOCK), r"^v2 header has command 2, not 0 \(LOCAL\) or 1 \(PROXY\)$"),
    ("any", v2(command=0xF, body=IPV4_BLOCK), r"^v2 header has command 15"),
    ("any", v2(length=9000), r"^v2 length 9000 over the 4096 cap$"),
    ("any", v2(length=0xFFFF), r"^v2 length 65535 over the 4096 cap$"),
    ("any", v2(length=V2_MAX_LENGTH_BYTES + 1), r"^v2 length 4097 over the 4096 cap$"),
    # v2: the address block must fit the family
    ("any", v2(family=0x11, body=IPV4_BLOCK[:8]), r"^v2 TCP4 needs 12 address bytes, length is 8$"),
    ("any", v2(family=0x12, body=b""), r"^v2 UDP4 needs 12 address bytes, length is 0$"),
    ("any", v2(family=0x21, body=IPV4_BLOCK), r"^v2 TCP6 needs 36 address bytes, length is 12$"),
    ("any", v2(family=0x31, body=bytes(100)), r"^v2 UNIX needs 216 address bytes, length is 100$"),
    # v2: TLVs
    ("any", v2(body=IPV4_BLOCK + b"\x02\x00"), r"^v2 TLV at byte 28 cut short: 2 bytes left, a TLV needs 3$"),
    ("any", v2(body=IPV4_BLOCK + b"\x02\x00\x09abc"), r"^v2 TLV 0x02 at byte 28 runs 6 bytes past the header$"),
    ("any", v2(body=IPV4_BLOCK + tlv(0x02, b"a") + b"\xe0"), r"^v2 TLV at byte 32 cut short"),
    ("any", v2(body=IPV4_BLOCK + tlv(0x03, bytes(3))), r"^v2 CRC32C TLV has 3 bytes, not 4$"),
    ("any", v2(body=IPV4_BLOCK + tlv(0x03, b"\x12\x34\x56\x78")), r"^v2 CRC32C mismatch: header says 0x12345678, bytes give 0x"),
    ("any", v2(body=IPV4_BLOCK + tlv(0x03, bytes(4)) + tlv(0x03, bytes(4))), r"^v2 header has two CRC32C TLVs$"),
    ("any", v2(body=IPV4_BLOCK + tlv(0x02, b"\xff\xfe")), r"^v2 AUTHORITY TLV b'\\xff\\xfe' is not UTF-8$"),
    ("any", v2(body=IPV4_BLOCK + tlv(0x02, b"a\r\nfake log line")), r"^v2 AUTHORITY TLV .* has a control character$"),
    ("any", v2(body=IPV4_BLOCK + tlv(0xEA, b"\x01vpce 1")), r"^v2 AWS VPC endpoint id b'vpce 1' is not \[A-Za-z0-9-\]$"),
]


@pytest.mark.parametrize(("mode", "data", "reason"), MALFORMED)
def test_malformed_header_is_refused_with_its_reason_however_it_is_split(mode: str, data: bytes, reason: str) -> None:
    outcome = outcome_of_every_split(data + b"client data\r\n" * 10, mode)
    assert isinstance(outcome, str), outcome
    assert re.search(reason, outcome), outcome


def test_v2_length_over_the_cap_is_refused_on_the_sixteenth_byte() -> None:
    parser = ProxyHeaderParser("v2")
    header = v2(length=9000)
    assert parser.feed(header[:15]) is None
    with pytest.raises(ProxyHeaderError, match="v2 length 9000 over the 4096 cap"):
        parser.feed(header[15:16])


@pytest.mark.parametrize(
    ("data", "fails_at"),
    [
        (b"GET / HTTP/1.1\r\n", 1),  # the first byte already says it is no header
        (b"PROXX TCP4", 5),
        (b"\r\n\r\n\x00\r\nQUIX", 11),
        (v2(version=1), 13),
        (v2(family=0x21, length=12), 16),  # known unfit before the address block is read
    ],
)
def test_a_wrong_byte_is_refused_as_soon_as_it_arrives(data: bytes, fails_at: int) -> None:
    parser = ProxyHeaderParser("any")
    for i in range(fails_at - 1):
        assert parser.feed(data[i : i + 1]) is None
    with pytest.raises(ProxyHeaderError):
        parser.feed(data[fails_at - 1 : fails_at])


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"PROXY TCP4 1.2.3.4", "v1 header cut short: the peer closed after 18 bytes"),
        (b"P", "v1 header cut short: the peer closed after 1 bytes"),
        (v2(body=IPV4_BLOCK)[:20], "v2 header cut short: the peer closed after 20 bytes"),
    ],
)
def test_peer_closing_mid_header_is_an_error(data: bytes, reason: str) -> None:
    for chunks in splits(data):
        assert run(chunks) == reason


def test_peer_closing_before_any_byte_is_no_error() -> None:
    parser = ProxyHeaderParser("any")
    parser.finish()  # a health check that only connects
    assert parser.received_bytes == 0


def test_feeding_a_finished_parser_is_a_bug() -> None:
    parser = ProxyHeaderParser("v1")
    assert parser.feed(V1_OK) is not None
    with pytest.raises(RuntimeError):
        parser.feed(b"more")


def test_unknown_mode_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown PROXY protocol mode 'v3': use v1, v2 or any"):
        ProxyHeaderParser("v3")


@pytest.mark.parametrize(
    "data",
    [
        V1_OK,
        b"PROXY UNKNOWN\r\n",
        b"PROXY TCP6 ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff ::1 65535 65535\r\n",
        v2(body=IPV4_BLOCK + tlv(0x02, b"x" * 100)),
        v2(command=0, family=0),
    ],
)
@pytest.mark.parametrize("mode", ["any", "v1", "v2"])
def test_reading_safe_read_bytes_never_reads_past_the_header(data: bytes, mode: str) -> None:
    if (mode == "v1" and data[0] != ord("P")) or (mode == "v2" and data[0] == ord("P")):
        return
    stream = data + b"\x16\x03\x01 a TLS ClientHello that must stay in the socket"
    parser = ProxyHeaderParser(mode)
    position = 0
    for _ in range(len(data)):  # bounded: every read takes at least one byte
        want = parser.safe_read_bytes()
        assert want >= 1
        chunk = stream[position : position + want]
        position += len(chunk)
        assert position <= len(data), "read past the header"
        found = parser.feed(chunk)
        if found is not None:
            assert found[1] == b""
            assert position == len(data)
            return
    raise AssertionError("header never completed")


def test_crc32c_matches_the_rfc_check_value() -> None:
    assert crc32c(b"123456789") == 0xE3069283


@given(st.binary(max_size=600))
def test_crc32c_matches_the_c_library(data: bytes) -> None:
    assert crc32c(data) == crc32c_oracle.crc32c(data)


@given(st.sampled_from(["v1", "v2", "any"]), st.binary(max_size=300))
def test_arbitrary_bytes_raise_only_proxy_header_errors_and_stay_bounded(mode: str, data: bytes) -> None:
    parser = ProxyHeaderParser(mode)
    try:
        for i in range(len(data)):
            if parser.feed(data[i : i + 1]) is not None:
                return
            assert parser.received_bytes <= max(V1_MAX_BYTES, V2_HEADER_BYTES + V2_MAX_LENGTH_BYTES)
        parser.finish()
    except ProxyHeaderError:
        pass


# -- round trips against the oracle builder --------------------------------------------------

V1_BUILDER = ProxyProtocolV1()
V2_BUILDER = ProxyProtocolV2()

ports = st.integers(0, 65535)
ipv4 = st.ip_addresses(v=4)
ipv6 = st.ip_addresses(v=6)
v1_results = st.one_of(
    st.builds(lambda s, d, sp, dp: ProxyResultIPv4((s, sp), (d, dp)), ipv4, ipv4, ports, ports),
    st.builds(lambda s, d, sp, dp: ProxyResultIPv6((s, sp), (d, dp)), ipv6, ipv6, ports, ports),
    st.just(ProxyResultUnknown()),
)
transports = st.sampled_from([socket.SOCK_STREAM, socket.SOCK_DGRAM, None])
tlvs = st.builds(
    lambda authority, alpn, vpce, custom: ProxyProtocolTLV(
        authority=authority,
        alpn=alpn,
        init={**({0xEA: b"\x01" + vpce.encode()} if vpce is not None else {}), **custom},
    ),
    st.none() | st.text(st.characters(blacklist_categories=("Cc", "Cs")), max_size=40),
    st.none() | st.binary(max_size=20),
    st.none() | st.from_regex(r"[A-Za-z0-9-]{0,30}", fullmatch=True),
    st.dictionaries(st.integers(0xE0, 0xEF).filter(lambda t: t != 0xEA) | st.just(0x04), st.binary(max_size=50), max_size=3),
)
unix_paths = st.from_regex(r"/[a-z0-9/._-]{0,100}", fullmatch=True)
v2_results = st.one_of(
    st.builds(lambda s, d, sp, dp, t, x: ProxyResultIPv4((s, sp), (d, dp), protocol=t, tlv=x), ipv4, ipv4, ports, ports, transports, tlvs),
    st.builds(lambda s, d, sp, dp, t, x: ProxyResultIPv6((s, sp), (d, dp), protocol=t, tlv=x), ipv6, ipv6, ports, ports, transports, tlvs),
    st.builds(lambda s, d, t, x: ProxyResultUnix(s, d, protocol=t, tlv=x), unix_paths, unix_paths, transports, tlvs),
    st.builds(lambda x: ProxyResultLocal(tlv=x), tlvs),
    st.just(ProxyResultUnknown()),
)


@contextmanager
def builder_crc32c(enabled: bool) -> Iterator[None]:
    """The builder adds a CRC32C TLV whenever the crc32c package is there; this turns that off."""
    with mock.patch.object(proxyprotocol.tlv, "crc32c_checksum", crc32c_oracle.crc32c if enabled else None):
        yield


def cut(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)])]


def expected_addresses(result: ProxyResult) -> tuple[object, object, object, object]:
    if isinstance(result, ProxyResultIPv4 | ProxyResultIPv6):
        return result.source[0], result.source[1], result.dest[0], result.dest[1]
    return None, None, None, None


@settings(max_examples=300)
@given(v1_results, st.binary(max_size=40), st.lists(st.integers(0, 200), max_size=4), st.sampled_from(["v1", "any"]))
def test_v1_round_trip_against_the_builder(result: ProxyResult, after: bytes, cuts: list[int], mode: str) -> None:
    data = V1_BUILDER.pack(result)
    outcome = run(cut(data + after, cuts), mode)
    assert not isinstance(outcome, str), (data, outcome)
    header, rest = outcome
    assert rest == after
    assert header.version == 1 and header.header_bytes == len(data)
    if isinstance(result, ProxyResultUnknown):
        assert (header.command, header.family) == (Command.LOCAL, Family.UNKNOWN)
    else:
        assert header.command is Command.PROXY
        assert header.family is (Family.TCP4 if isinstance(result, ProxyResultIPv4) else Family.TCP6)
    assert (header.source, header.source_port, header.destination, header.destination_port) == expected_addresses(result)


@settings(max_examples=300)
@given(
    v2_results,
    st.booleans(),
    st.binary(max_size=40),
    st.lists(st.integers(0, 400), max_size=4),
    st.sampled_from(["v2", "any"]),
)
def test_v2_round_trip_against_the_builder(
    result: ProxyResult, with_crc32c: bool, after: bytes, cuts: list[int], mode: str
) -> None:
    with builder_crc32c(with_crc32c):
        data = V2_BUILDER.pack(result)
    outcome = run(cut(data + after, cuts), mode)
    assert not isinstance(outcome, str), (data, outcome)
    header, rest = outcome
    assert rest == after
    assert header.version == 2 and header.header_bytes == len(data)
    if isinstance(result, ProxyResultLocal):
        assert header.command is Command.LOCAL
        assert header.client is None
        return
    assert header.command is Command.PROXY
    protocol = getattr(result, "protocol", None)
    if isinstance(result, ProxyResultUnknown) or protocol is None:
        # Family or transport unspecified: the spec says ignore the addresses (and so the TLVs).
        assert (header.family, header.client, header.tlv_types) == (Family.UNSPEC, None, ())
        return
    stream = protocol == socket.SOCK_STREAM
    if isinstance(result, ProxyResultIPv4):
        assert header.family is (Family.TCP4 if stream else Family.UDP4)
    elif isinstance(result, ProxyResultIPv6):
        assert header.family is (Family.TCP6 if stream else Family.UDP6)
    else:
        assert header.family is Family.UNIX
    assert (header.source, header.source_port, header.destination, header.destination_port) == expected_addresses(result)
    tlv_values = result.tlv
    assert header.authority == tlv_values.authority
    assert header.alpn == tlv_values.alpn
    vpce = tlv_values.get(0xEA)
    assert header.aws_vpce_id == (vpce[1:].decode() if vpce is not None else None)
    assert header.crc32c_verified == with_crc32c
    crc_type = {0x03} if with_crc32c else set()
    assert header.tlv_types == tuple(sorted({*tlv_values, *crc_type}))  # the builder writes them in type order


@settings(max_examples=300)
@given(v2_results, st.integers(0, 10_000), st.integers(1, 255))
def test_a_corrupted_v2_header_is_refused_or_parsed_never_crashes(result: ProxyResult, where: int, flip: int) -> None:
    with builder_crc32c(True):
        data = bytearray(V2_BUILDER.pack(result))
    data[where % len(data)] ^= flip
    outcome = run([bytes(data)], "any")
    if isinstance(outcome, str):
        return
    header, _ = outcome
    # The checksum covers every byte of the header: a flip that still parses was not checked.
    assert not header.crc32c_verified


# -- headers from a real HAProxy ---------------------------------------------------------------


class Capture:
    """A loopback listener that keeps, per accepted connection, every byte until the peer closes."""

    def __init__(self) -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.server.getsockname()[1]
        self.connections: list[tuple[tuple[str, int], bytes]] = []  # (peer, bytes)
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._serve, name="capture-accept", daemon=True)
        self.stopped = threading.Event()
        self.thread.start()

    def _serve(self) -> None:
        self.server.settimeout(0.2)
        while not self.stopped.is_set():
            try:
                conn, peer = self.server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with conn:
                conn.settimeout(5)
                data = b""
                try:
                    while len(data) < 65536 and (chunk := conn.recv(65536)):
                        data += chunk
                except OSError:
                    pass
            with self.lock:
                self.connections.append((peer, data))

    def received(self) -> list[tuple[tuple[str, int], bytes]]:
        with self.lock:
            return list(self.connections)

    def close(self) -> None:
        self.stopped.set()
        self.server.close()
        self.thread.join(timeout=5)


def first_connections(capture: Capture, count: int) -> list[tuple[tuple[str, int], bytes]]:
    """The first *count* connections the capture saw closed, waiting for them with a deadline."""
    wait_until(lambda: len(capture.received()) >= count, timeout=15)
    return capture.received()[:count]


@pytest.fixture
def haproxy_to_capture(tmp_path: Path) -> Iterator[Callable[[str], tuple[int, Capture]]]:
    """Factory: a Debian haproxy whose one server line (``server s1 CAPTURE <options>``) points at a
    Capture; returns haproxy's listening port and the Capture. Killed by PID at the end."""
    executable = require_tool("haproxy")
    procs: list[subprocess.Popen[bytes]] = []
    captures: list[Capture] = []

    def start(server_options: str) -> tuple[int, Capture]:
        capture = Capture()
        captures.append(capture)
        with socket.create_server(("127.0.0.1", 0)) as listener:
            port = listener.getsockname()[1]
            config = tmp_path / "haproxy.cfg"
            config.write_text(
                "global\n    log stderr format raw local0 info\n"
                "defaults\n    mode tcp\n    timeout connect 2s\n    timeout client 5s\n    timeout server 5s\n"
                f"frontend f\n    bind fd@{listener.fileno()}\n"
                "    unique-id-format %{+X}o%ci:%cp_%fi:%fp_%Ts_%rt\n    default_backend b\n"
                f"backend b\n    server s1 127.0.0.1:{capture.port} {server_options}\n"
            )
            with open(tmp_path / "haproxy.log", "wb") as log:
                procs.append(subprocess.Popen([executable, "-db", "-f", str(config)], pass_fds=(listener.fileno(),),
                                              stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT))
        return port, capture

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    for capture in captures:
        capture.close()


@pytest.mark.parametrize(
    ("options", "version"),
    [
        ("send-proxy", 1),
        ("send-proxy-v2", 2),
        ("send-proxy-v2 proxy-v2-options crc32c,unique-id", 2),
    ],
)
def test_headers_from_a_real_haproxy_give_the_client_and_its_first_data(
    haproxy_to_capture: Callable[[str], tuple[int, Capture]], options: str, version: int
) -> None:
    port, capture = haproxy_to_capture(options)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
        client.sendall(b"hello\r\n")
        client.shutdown(socket.SHUT_WR)
        client_port = client.getsockname()[1]
        assert recv_all(client) == b""
    [(_, data)] = first_connections(capture, 1)
    header, rest = header_and_rest(data)
    assert rest == b"hello\r\n"
    assert (header.version, header.command, header.family) == (version, Command.PROXY, Family.TCP4)
    assert header.client == (ipaddress.IPv4Address("127.0.0.1"), client_port)
    assert (header.destination, header.destination_port) == (ipaddress.IPv4Address("127.0.0.1"), port)
    if "crc32c" in options:
        assert header.crc32c_verified
        assert 0x05 in header.tlv_types  # UNIQUE_ID, skipped


def test_real_haproxy_v2_health_check_is_local(haproxy_to_capture: Callable[[str], tuple[int, Capture]]) -> None:
    _, capture = haproxy_to_capture("send-proxy-v2 check check-send-proxy inter 200ms")
    [(_, data)] = first_connections(capture, 1)
    assert outcome_of_every_split(data, "any") == (
        ProxyHeader(version=2, command=Command.LOCAL, family=Family.UNSPEC, header_bytes=16),
        b"",
    )


def test_real_haproxy_v1_health_check_names_haproxy_itself(haproxy_to_capture: Callable[[str], tuple[int, Capture]]) -> None:
    """HAProxy 2.6 does not send UNKNOWN for a v1 check: it sends PROXY with its own endpoints,
    as the spec recommends, so the "client" is the proxy's own connection."""
    _, capture = haproxy_to_capture("send-proxy check check-send-proxy inter 200ms")
    [(peer, data)] = first_connections(capture, 1)
    header, rest = header_and_rest(data)
    assert rest == b""
    assert header.command is Command.PROXY
    assert header.client == (ipaddress.IPv4Address(peer[0]), peer[1])
    assert header.destination_port == capture.port
