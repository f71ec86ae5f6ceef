"""PROXY protocol v1/v2: each header whole, byte by byte and with trailing data; then properties."""

from __future__ import annotations

import ipaddress
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from splicerelay.protocol.crc32c import crc32c
from splicerelay.protocol.proxy_protocol import (
    HEADER_TIMEOUT_DEFAULT,
    MAX_V1_LENGTH,
    V2_SIGNATURE,
    ProxyHeader,
    ProxyHeaderError,
    TLVType,
    decode,
    encode_v1,
    encode_v2,
)

PROPERTY = settings(max_examples=300, database=None, derandomize=True, deadline=None)

SIG = V2_SIGNATURE
IPV6_MAX = ":".join(["ffff"] * 8)
IPV6_MAX_UPPER = IPV6_MAX.upper()


def v1(*fields: str) -> bytes:
    return " ".join(("PROXY", *fields)).encode("ascii") + b"\r\n"


def v2(ver_cmd: int, family: int, block: bytes, length: int | None = None) -> bytes:
    """A version 2 header built by hand, independently of `encode_v2`."""
    size = len(block) if length is None else length
    return SIG + bytes([ver_cmd, family]) + struct.pack("!H", size) + block


def tlv(kind: int, value: bytes) -> bytes:
    return bytes([kind]) + struct.pack("!H", len(value)) + value


def tcp(
    version: int,
    source: tuple[str, int],
    destination: tuple[str, int],
    tlvs: tuple[tuple[int, bytes], ...] = (),
) -> ProxyHeader:
    family = f"tcp{ipaddress.ip_address(source[0]).version}"
    return ProxyHeader(version, False, family, source, destination, tlvs)


def local(
    version: int, family: str = "unspec", tlvs: tuple[tuple[int, bytes], ...] = ()
) -> ProxyHeader:
    return ProxyHeader(version, True, family, None, None, tlvs)


V4_BLOCK = bytes([172, 19, 0, 1, 172, 19, 0, 3]) + struct.pack("!HH", 42578, 80)
V6_SRC = ipaddress.IPv6Address("2001:db8::1")
V6_DST = ipaddress.IPv6Address("2001:db8:0:1::ff")
V6_BLOCK = V6_SRC.packed + V6_DST.packed + struct.pack("!HH", 1234, 443)
V4_ENDPOINTS = (("172.19.0.1", 42578), ("172.19.0.3", 80))
V6_ENDPOINTS = (("2001:db8::1", 1234), ("2001:db8:0:1::ff", 443))
# How this Python writes an IPv4-mapped address (3.13 changed it to dotted form).
MAPPED = str(ipaddress.IPv6Address("::ffff:10.0.0.1"))
UNIX_BLOCK = b"/run/client.sock".ljust(108, b"\x00") + b"/run/server.sock".ljust(108, b"\x00")
TLVS = tlv(0x01, b"h2") + tlv(0x02, b"example.com") + tlv(0x04, b"") + tlv(0xE0, b"\x00\x01")
TLVS_DECODED = ((0x01, b"h2"), (0x02, b"example.com"), (0x04, b""), (0xE0, b"\x00\x01"))


def with_crc32c(header: bytes) -> bytes:
    """`header` + a CRC32C TLV holding the checksum of the result (section 2.2.3)."""
    length = struct.unpack_from("!H", header, 14)[0] + 7
    zeroed = header[:14] + struct.pack("!H", length) + header[16:] + tlv(0x03, bytes(4))
    return zeroed[:-4] + struct.pack("!I", crc32c(zeroed))


# Each valid header, and what it decodes to.
VALID: list[tuple[str, bytes, ProxyHeader]] = [
    # Section 2.1: the example, and the longest lines a receiver must support.
    (
        "v1 spec example",
        b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n",
        tcp(1, ("192.168.0.1", 56324), ("192.168.0.11", 443)),
    ),
    (
        "v1 tcp4 longest",
        v1("TCP4", "255.255.255.255", "255.255.255.255", "65535", "65535"),
        tcp(1, ("255.255.255.255", 65535), ("255.255.255.255", 65535)),
    ),
    (
        "v1 tcp4 zeros",
        v1("TCP4", "0.0.0.0", "0.0.0.0", "0", "0"),
        tcp(1, ("0.0.0.0", 0), ("0.0.0.0", 0)),
    ),
    (
        "v1 tcp6",
        v1("TCP6", "2001:db8::1", "2001:db8:0:1::ff", "1234", "443"),
        tcp(1, *V6_ENDPOINTS),
    ),
    (
        "v1 tcp6 longest, upper case",
        v1("TCP6", IPV6_MAX_UPPER, IPV6_MAX_UPPER, "65535", "65535"),
        tcp(1, (IPV6_MAX, 65535), (IPV6_MAX, 65535)),
    ),
    (
        "v1 tcp6 uncompressed",
        v1("TCP6", "2001:0db8:0000:0000:0000:0000:0000:0001", "::1", "1", "2"),
        tcp(1, ("2001:db8::1", 1), ("::1", 2)),
    ),
    (
        "v1 tcp6 v4-mapped",
        v1("TCP6", "::ffff:10.0.0.1", "::", "1", "2"),
        tcp(1, (MAPPED, 1), ("::", 2)),
    ),
    ("v1 unknown", b"PROXY UNKNOWN\r\n", local(1)),
    ("v1 unknown with addresses", v1("UNKNOWN", "10.0.0.1", "10.0.0.2", "1", "2"), local(1)),
    ("v1 unknown worst case", v1("UNKNOWN", IPV6_MAX, IPV6_MAX, "65535", "65535"), local(1)),
    ("v1 unknown, rest ignored", b"PROXY UNKNOWN whatever \x00\xff  it says\r\n", local(1)),
    # Section 2.2. The TCP4 header is what HAProxy sends for 172.19.0.1:42578 -> :80.
    ("v2 tcp4", v2(0x21, 0x11, V4_BLOCK), tcp(2, *V4_ENDPOINTS)),
    ("v2 tcp6", v2(0x21, 0x21, V6_BLOCK), tcp(2, *V6_ENDPOINTS)),
    (
        "v2 tcp4 with tlvs",
        v2(0x21, 0x11, V4_BLOCK + TLVS),
        tcp(2, *V4_ENDPOINTS, TLVS_DECODED),
    ),
    (
        "v2 tcp6 with tlvs",
        v2(0x21, 0x21, V6_BLOCK + TLVS),
        tcp(2, *V6_ENDPOINTS, TLVS_DECODED),
    ),
    (
        "v2 tcp4 with crc32c",
        with_crc32c(v2(0x21, 0x11, V4_BLOCK + tlv(0x05, b"id-1"))),
        tcp(2, *V4_ENDPOINTS, ((0x05, b"id-1"), (0x03, bytes.fromhex("0b062045")))),
    ),
    ("v2 local", v2(0x20, 0x00, b""), local(2)),
    ("v2 local with tlvs", v2(0x20, 0x00, TLVS), local(2, tlvs=TLVS_DECODED)),
    ("v2 local ignores tcp4 addresses", v2(0x20, 0x11, V4_BLOCK), local(2, "tcp4")),
    ("v2 local ignores a short block", v2(0x20, 0x21, V4_BLOCK), local(2, "tcp6")),
    ("v2 local ignores udp", v2(0x20, 0x12, V4_BLOCK + TLVS), local(2, "unspec", TLVS_DECODED)),
    ("v2 unspec", v2(0x21, 0x00, b""), local(2)),
    ("v2 unspec with tlvs", v2(0x21, 0x00, TLVS), local(2, tlvs=TLVS_DECODED)),
    ("v2 unix", v2(0x21, 0x31, UNIX_BLOCK), local(2, "unix")),
    ("v2 unix with tlvs", v2(0x21, 0x31, UNIX_BLOCK + TLVS), local(2, "unix", TLVS_DECODED)),
]

VALID_IDS = [name for name, _, _ in VALID]

# Stream data that may follow a header; some of it looks like a header on purpose.
TRAILERS = [b"x", b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", b"\r\n", b"\n", SIG + b"\x21", b"PROXY "]

# Bytes that are not, and cannot become, a valid header.
INVALID: list[tuple[str, bytes]] = [
    ("http", b"GET / HTTP/1.1\r\n"),
    ("zeros", b"\x00" * 16),
    ("tls client hello", bytes.fromhex("16030100f8010000f40303")),
    ("ssh", b"SSH-2.0-OpenSSH_9.6\r\n"),
    ("lower case proxy", b"proxy TCP4 1.2.3.4 5.6.7.8 1 2\r\n"),
    ("PROXY without space", b"PROXYTCP4 1.2.3.4 5.6.7.8 1 2\r\n"),
    ("almost the v2 signature", b"\r\n\r\n\x00\r\nQUIT\r"),
    ("v1 108 bytes, no crlf", b"PROXY UNKNOWN " + b"x" * 94),
    ("v1 107 bytes, no crlf", b"PROXY UNKNOWN " + b"x" * 93),
    ("v1 108 bytes with crlf", b"PROXY UNKNOWN " + b"x" * 92 + b"\r\n"),
    ("v1 missing field", b"PROXY TCP4 1.2.3.4 5.6.7.8 80\r\n"),
    ("v1 extra field", b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n"),
    ("v1 trailing space", b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 \r\n"),
    ("v1 double space", b"PROXY TCP4 1.2.3.4  5.6.7.8 1 2\r\n"),
    ("v1 two spaces after PROXY", b"PROXY  TCP4 1.2.3.4 5.6.7.8 1 2\r\n"),
    ("v1 tab", b"PROXY TCP4 1.2.3.4\t5.6.7.8 1 2\r\n"),
    ("v1 no fields", b"PROXY \r\n"),
    ("v1 tcp4 only", b"PROXY TCP4\r\n"),
    ("v1 tcp4 with ipv6", b"PROXY TCP4 ::1 ::1 1 2\r\n"),
    ("v1 tcp6 with ipv4", b"PROXY TCP6 1.2.3.4 5.6.7.8 1 2\r\n"),
    ("v1 tcp6 with zone", b"PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n"),
    ("v1 tcp6 bad", b"PROXY TCP6 1:2:3:4:5:6:7:8:9 ::1 1 2\r\n"),
    ("v1 tcp6 empty", b"PROXY TCP6  ::1 1 2\r\n"),
    ("v1 tcp6 non-ascii", "PROXY TCP6 ::\u0661 ::1 1 2\r\n".encode()),
    ("v1 leading zero address", b"PROXY TCP4 01.2.3.4 5.6.7.8 1 2\r\n"),
    ("v1 octet too big", b"PROXY TCP4 256.2.3.4 5.6.7.8 1 2\r\n"),
    ("v1 three octets", b"PROXY TCP4 1.2.3 5.6.7.8 1 2\r\n"),
    ("v1 five octets", b"PROXY TCP4 1.2.3.4.5 5.6.7.8 1 2\r\n"),
    ("v1 hostname", b"PROXY TCP4 localhost 5.6.7.8 1 2\r\n"),
    ("v1 port too big", b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 1\r\n"),
    ("v1 port far too big", b"PROXY TCP4 1.2.3.4 5.6.7.8 1 9999999999\r\n"),
    ("v1 port leading zero", b"PROXY TCP4 1.2.3.4 5.6.7.8 080 1\r\n"),
    ("v1 port zero zero", b"PROXY TCP4 1.2.3.4 5.6.7.8 00 1\r\n"),
    ("v1 port plus", b"PROXY TCP4 1.2.3.4 5.6.7.8 +1 2\r\n"),
    ("v1 port minus", b"PROXY TCP4 1.2.3.4 5.6.7.8 -1 2\r\n"),
    ("v1 port hex", b"PROXY TCP4 1.2.3.4 5.6.7.8 0x50 2\r\n"),
    ("v1 port unicode digit", "PROXY TCP4 1.2.3.4 5.6.7.8 \u0661 2\r\n".encode()),
    ("v1 lf only", b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n"),
    ("v1 cr only", b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\rX"),
    ("v1 lf inside", b"PROXY UNKNOWN a\nb\r\n"),
    ("v1 unknown protocol", b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n"),
    ("v1 udp4", b"PROXY UDP4 1.2.3.4 5.6.7.8 1 2\r\n"),
    ("v1 lower case protocol", b"PROXY tcp4 1.2.3.4 5.6.7.8 1 2\r\n"),
    ("v1 UNKNOWN glued", b"PROXY UNKNOWNX\r\n"),
    ("v2 version 1", v2(0x11, 0x11, V4_BLOCK)),
    ("v2 version 3", v2(0x31, 0x11, V4_BLOCK)),
    ("v2 version 0", v2(0x01, 0x11, V4_BLOCK)),
    ("v2 command 2", v2(0x22, 0x11, V4_BLOCK)),
    ("v2 command 15", v2(0x2F, 0x11, V4_BLOCK)),
    ("v2 tcp4 too short", v2(0x21, 0x11, V4_BLOCK[:4])),
    ("v2 tcp4 length 11", v2(0x21, 0x11, V4_BLOCK[:11])),
    ("v2 tcp6 length 35", v2(0x21, 0x21, V6_BLOCK[:35])),
    ("v2 unix too short", v2(0x21, 0x31, UNIX_BLOCK[:215])),
    ("v2 udp4", v2(0x21, 0x12, V4_BLOCK)),
    ("v2 udp6", v2(0x21, 0x22, V6_BLOCK)),
    ("v2 unix datagram", v2(0x21, 0x32, UNIX_BLOCK)),
    ("v2 family 4", v2(0x21, 0x41, V4_BLOCK)),
    ("v2 transport 3", v2(0x21, 0x13, V4_BLOCK)),
    ("v2 inet, unspec transport", v2(0x21, 0x10, V4_BLOCK)),
    ("v2 unspec family, stream", v2(0x21, 0x01, b"")),
    ("v2 local, family 4", v2(0x20, 0x40, b"")),
    ("v2 tlv overruns", v2(0x21, 0x11, V4_BLOCK + tlv(0x01, b"h2")[:-1])),
    ("v2 tlv length past header", v2(0x21, 0x11, V4_BLOCK + b"\x01\xff\xff")),
    ("v2 truncated tlv head", v2(0x21, 0x11, V4_BLOCK + b"\x01\x00")),
    ("v2 local, tlv overruns", v2(0x20, 0x00, b"\x04\x00\x05abc")),
    ("v2 crc32c mismatch", v2(0x21, 0x11, V4_BLOCK + tlv(0x03, b"\x00\x00\x00\x00"))),
    ("v2 crc32c wrong length", v2(0x21, 0x11, V4_BLOCK + tlv(0x03, b"\x00\x00\x00"))),
]

INVALID_IDS = [name for name, _ in INVALID]


# --- decoding valid headers -----------------------------------------------------------


@pytest.mark.parametrize(("data", "expected"), [case[1:] for case in VALID], ids=VALID_IDS)
def test_decode_whole(data: bytes, expected: ProxyHeader) -> None:
    assert decode(data) == (expected, len(data))


@pytest.mark.parametrize(("data", "expected"), [case[1:] for case in VALID], ids=VALID_IDS)
def test_decode_bytearray_and_memoryview(data: bytes, expected: ProxyHeader) -> None:
    assert decode(bytearray(data)) == (expected, len(data))
    assert decode(memoryview(data)) == (expected, len(data))
    assert decode(memoryview(b"junk" + data)[4:]) == (expected, len(data))


@pytest.mark.parametrize(("data", "expected"), [case[1:] for case in VALID], ids=VALID_IDS)
def test_decode_byte_by_byte(data: bytes, expected: ProxyHeader) -> None:
    for k in range(len(data)):
        assert decode(data[:k]) is None, f"prefix of {k} bytes"
    assert decode(data) == (expected, len(data))


@pytest.mark.parametrize("trailer", TRAILERS)
@pytest.mark.parametrize(("data", "expected"), [case[1:] for case in VALID], ids=VALID_IDS)
def test_decode_with_trailing_data(data: bytes, expected: ProxyHeader, trailer: bytes) -> None:
    assert decode(data + trailer) == (expected, len(data))
    assert decode(data + trailer * 2000) == (expected, len(data))


@pytest.mark.parametrize("data", [data for _, data, _ in VALID], ids=VALID_IDS)
def test_decode_grows_consistently(data: bytes) -> None:
    """Feeding data[:k] for growing k: None until the header is complete, then one answer."""
    stream = data + b"GET / HTTP/1.1\r\n\r\n"
    results = [decode(stream[:k]) for k in range(len(stream) + 1)]
    assert results[: len(data)] == [None] * len(data)
    assert all(result == results[-1] for result in results[len(data) :])
    assert results[-1] is not None and results[-1][1] == len(data)


def test_v1_longest_lines_are_accepted() -> None:
    # Section 2.1 sizes: 56, 104 and 107 bytes, the last being MAX_V1_LENGTH.
    lengths = {name: len(data) for name, data, _ in VALID}
    assert lengths["v1 tcp4 longest"] == 56
    assert lengths["v1 tcp6 longest, upper case"] == 104
    assert lengths["v1 unknown worst case"] == MAX_V1_LENGTH == 107


@pytest.mark.parametrize("data", [b"", b"P", b"PROXY", b"PROXY ", b"\r", SIG[:11], SIG])
def test_prefixes_of_either_signature_need_more(data: bytes) -> None:
    assert decode(data) is None


# --- decoding invalid input -----------------------------------------------------------


@pytest.mark.parametrize("data", [data for _, data in INVALID], ids=INVALID_IDS)
def test_decode_rejects(data: bytes) -> None:
    with pytest.raises(ProxyHeaderError):
        decode(data)


@pytest.mark.parametrize("data", [data for _, data in INVALID], ids=INVALID_IDS)
def test_decode_rejects_byte_by_byte(data: bytes) -> None:
    """Once a prefix is refused, every longer one is too; no prefix is accepted."""
    refused = False
    for k in range(len(data) + 1):
        try:
            result = decode(data[:k])
        except ProxyHeaderError:
            refused = True
        else:
            assert result is None and not refused, f"prefix of {k} bytes gave {result}"
    assert refused


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"GET / HTTP/1.1\r\n", "not a PROXY protocol header"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 80\r\n", "6 space-separated fields"),
        (b"PROXY TCP4 ::1 ::1 1 2\r\n", "invalid TCP4 address"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 1\r\n", "invalid port"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n", "LF without CR"),
        (b"PROXY UNKNOWN " + b"x" * 94, "no CRLF in the first 107 bytes"),
        (b"PROXY HTTP/1.1\r\n", "unknown protocol b'HTTP/1.1'"),
        (v2(0x11, 0x11, V4_BLOCK), "unsupported version 1"),
        (v2(0x22, 0x11, V4_BLOCK), "unknown command 0x2"),
        (v2(0x21, 0x41, V4_BLOCK), "unknown family/transport 0x41"),
        (v2(0x21, 0x12, V4_BLOCK), "not a stream transport"),
        (v2(0x21, 0x11, V4_BLOCK[:4]), "tcp4 needs a 12-byte address block, length is 4"),
        (v2(0x21, 0x11, V4_BLOCK + b"\x01\x00\x09h2"), "overruns the header"),
        (v2(0x21, 0x11, V4_BLOCK + tlv(0x03, bytes(4))), "CRC32C mismatch"),
    ],
)
def test_error_messages(data: bytes, message: str) -> None:
    with pytest.raises(ProxyHeaderError, match=message.replace("(", r"\(")):
        decode(data)


@pytest.mark.parametrize(
    ("data", "needed"),
    [
        # Refused as soon as the bad byte arrives, not when the header would be complete.
        (SIG + b"\x11", 13),
        (SIG + b"\x21\x12", 14),
        (SIG + b"\x21\x11\x00\x04", 16),
        (b"PROXY X", 7),
        (b"PROXY TCP4\r", 11),
        (b"PROXY TCP4 1.2.3.4\n", 19),
    ],
)
def test_decode_fails_early(data: bytes, needed: int) -> None:
    assert decode(data[: needed - 1]) is None
    with pytest.raises(ProxyHeaderError):
        decode(data[:needed])


def test_v2_waits_for_the_whole_block_before_checking_tlvs() -> None:
    data = v2(0x21, 0x11, V4_BLOCK + b"\x01\x00\x09h2", length=12 + 3 + 9)
    assert decode(data) is None
    assert decode(data + b"1234567") == (
        tcp(2, *V4_ENDPOINTS, ((0x01, b"h21234567"),)),
        len(data) + 7,
    )


def test_failed_decode_leaves_a_bytearray_resizable() -> None:
    buffer = bytearray(b"GET / HTTP/1.1\r\n")
    with pytest.raises(ProxyHeaderError) as error:
        decode(buffer)
    del buffer[:4]  # would raise BufferError if a view were still held
    assert buffer == b"/ HTTP/1.1\r\n"
    assert error.value is not None


def test_error_type() -> None:
    assert issubclass(ProxyHeaderError, ValueError)
    assert HEADER_TIMEOUT_DEFAULT == 3.0


# --- encoding -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("source", "destination", "expected"),
    [
        (
            ("192.168.0.1", 56324),
            ("192.168.0.11", 443),
            b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n",
        ),
        (("2001:DB8:0::1", 1), ("::1", 65535), b"PROXY TCP6 2001:db8::1 ::1 1 65535\r\n"),
        (("::ffff:10.0.0.1", 0), ("10.0.0.2", 80), b"PROXY TCP4 10.0.0.1 10.0.0.2 0 80\r\n"),
        (("::ffff:10.0.0.1", 1), ("::ffff:10.0.0.2", 2), b"PROXY TCP4 10.0.0.1 10.0.0.2 1 2\r\n"),
        (("::ffff:10.0.0.1", 1), ("::1", 2), f"PROXY TCP6 {MAPPED} ::1 1 2\r\n".encode()),
        (("fe80::1%eth0", 1), ("fe80::2", 2), b"PROXY TCP6 fe80::1 fe80::2 1 2\r\n"),
        (None, None, b"PROXY UNKNOWN\r\n"),
    ],
)
def test_encode_v1(
    source: tuple[str, int] | None, destination: tuple[str, int] | None, expected: bytes
) -> None:
    assert encode_v1(source, destination) == expected


@pytest.mark.parametrize(
    ("source", "destination", "kwargs", "expected"),
    [
        (*V4_ENDPOINTS, {}, v2(0x21, 0x11, V4_BLOCK)),
        (*V6_ENDPOINTS, {}, v2(0x21, 0x21, V6_BLOCK)),
        (("::ffff:172.19.0.1", 42578), ("172.19.0.3", 80), {}, v2(0x21, 0x11, V4_BLOCK)),
        (
            *V4_ENDPOINTS,
            {"tlvs": [(1, b"h2"), (2, b"example.com"), (4, b""), (0xE0, b"\x00\x01")]},
            v2(0x21, 0x11, V4_BLOCK + TLVS),
        ),
        (None, None, {}, SIG + b"\x20\x00\x00\x00"),
        (*V4_ENDPOINTS, {"local": True}, SIG + b"\x20\x00\x00\x00"),
        (
            None,
            None,
            {"local": True, "tlvs": [(TLVType.NOOP, b"abc")]},
            SIG + b"\x20\x00\x00\x06\x04\x00\x03abc",
        ),
    ],
)
def test_encode_v2(
    source: tuple[str, int] | None,
    destination: tuple[str, int] | None,
    kwargs: dict[str, object],
    expected: bytes,
) -> None:
    assert encode_v2(source, destination, **kwargs) == expected  # type: ignore[arg-type]


@pytest.mark.parametrize("encode", [encode_v1, encode_v2])
@pytest.mark.parametrize(
    ("source", "destination"),
    [
        (("1.2.3.4", 1), None),
        (None, ("1.2.3.4", 1)),
        (("1.2.3.4", 1), ("::1", 2)),
        (("::1", 1), ("1.2.3.4", 2)),
        (("1.2.3.4", 65536), ("1.2.3.4", 2)),
        (("1.2.3.4", 1), ("1.2.3.4", -1)),
        (("localhost", 1), ("1.2.3.4", 2)),
        (("1.2.3.4", "80"), ("1.2.3.4", 2)),
    ],
)
def test_encode_rejects(encode: object, source: object, destination: object) -> None:
    with pytest.raises(ValueError):
        encode(source, destination)  # type: ignore[operator]


@pytest.mark.parametrize(
    "tlvs",
    [[(256, b"")], [(-1, b"")], [(1, bytes(65536))], [(1, bytes(40000)), (2, bytes(40000))]],
)
def test_encode_v2_rejects_tlvs(tlvs: list[tuple[int, bytes]]) -> None:
    with pytest.raises(ValueError):
        encode_v2(("1.2.3.4", 1), ("5.6.7.8", 2), tlvs=tlvs)


def test_encode_v2_longest_header() -> None:
    tlvs = [(0xE0, bytes(65535 - 12 - 3))]
    data = encode_v2(("1.2.3.4", 1), ("5.6.7.8", 2), tlvs=tlvs)
    assert len(data) == 16 + 65535
    assert decode(data + b"x") == (
        ProxyHeader(2, False, "tcp4", ("1.2.3.4", 1), ("5.6.7.8", 2), ((0xE0, tlvs[0][1]),)),
        len(data),
    )


# --- properties -----------------------------------------------------------------------

ports = st.integers(min_value=0, max_value=65535)
ip_pairs = st.one_of(
    st.tuples(st.ip_addresses(v=4), st.ip_addresses(v=4)),
    st.tuples(st.ip_addresses(v=6), st.ip_addresses(v=6)),
    st.tuples(
        st.ip_addresses(v=4).map(lambda a: ipaddress.IPv6Address(f"::ffff:{a}")),
        st.ip_addresses(v=4),
    ),
)
tlv_lists = st.lists(
    st.tuples(
        st.integers(0, 255).filter(lambda kind: kind != TLVType.CRC32C), st.binary(max_size=40)
    ),
    max_size=5,
)
VALID_DATA = [data for _, data, _ in VALID]


def expected_endpoints(
    pair: tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, ...], src_port: int, dst_port: int
) -> tuple[str, tuple[str, int], tuple[str, int]]:
    """The family and endpoints a decoder reports: v4-mapped pairs travel as IPv4."""
    unmapped = [getattr(a, "ipv4_mapped", None) or a for a in pair]
    if all(a.version == 4 for a in unmapped):
        pair = tuple(unmapped)
    family = f"tcp{pair[0].version}"
    return family, (str(pair[0]), src_port), (str(pair[1]), dst_port)


def mutated(data: bytes, index: int, value: int) -> bytes:
    index %= len(data)
    return data[:index] + bytes([value]) + data[index + 1 :]


any_input = st.one_of(
    st.binary(max_size=300),
    st.tuples(
        st.sampled_from([SIG, b"PROXY ", b"PROXY TCP4 ", b"PROXY TCP6 ", b"PROXY UNKNOWN"]),
        st.binary(max_size=120),
    ).map(b"".join),
    st.builds(mutated, st.sampled_from(VALID_DATA), st.integers(0, 400), st.integers(0, 255)),
    st.tuples(st.sampled_from(VALID_DATA), st.integers(0, 400)).map(lambda t: t[0][: t[1]]),
    st.builds(lambda data, tail: data + tail, st.sampled_from(VALID_DATA), st.binary(max_size=20)),
)


@settings(PROPERTY, max_examples=3000)
@given(any_input)
def test_decode_never_fails_otherwise(data: bytes) -> None:
    try:
        result = decode(data)
    except ProxyHeaderError:
        return
    if result is not None:
        header, length = result
        assert 0 < length <= len(data)
        assert header.version in (1, 2)
        assert header.family in ("tcp4", "tcp6", "unix", "unspec")
        assert (header.source is None) == (header.destination is None) == header.local


@settings(PROPERTY, max_examples=300)
@given(any_input)
def test_decode_is_consistent_as_data_grows(data: bytes) -> None:
    """None for a while, then either an error for good or one header for good."""
    outcomes: list[object] = []
    for k in range(len(data) + 1):
        try:
            outcomes.append(decode(data[:k]))
        except ProxyHeaderError:
            outcomes.append(ProxyHeaderError)
    settled = [outcome for outcome in outcomes if outcome is not None]
    assert outcomes == [None] * (len(outcomes) - len(settled)) + settled
    assert len(set(map(repr, settled))) <= 1


@PROPERTY
@given(ip_pairs, ports, ports, st.binary(max_size=30))
def test_v1_round_trip(
    pair: tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, ...],
    src_port: int,
    dst_port: int,
    trailer: bytes,
) -> None:
    data = encode_v1((str(pair[0]), src_port), (str(pair[1]), dst_port))
    family, source, destination = expected_endpoints(pair, src_port, dst_port)
    assert decode(data + trailer) == (ProxyHeader(1, False, family, source, destination), len(data))


@PROPERTY
@given(ip_pairs, ports, ports, tlv_lists, st.binary(max_size=30))
def test_v2_round_trip(
    pair: tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, ...],
    src_port: int,
    dst_port: int,
    tlvs: list[tuple[int, bytes]],
    trailer: bytes,
) -> None:
    data = encode_v2((str(pair[0]), src_port), (str(pair[1]), dst_port), tlvs=tlvs)
    family, source, destination = expected_endpoints(pair, src_port, dst_port)
    expected = ProxyHeader(2, False, family, source, destination, tuple(tlvs))
    assert decode(data + trailer) == (expected, len(data))


@PROPERTY
@given(tlv_lists, st.binary(max_size=30))
def test_v2_local_round_trip(tlvs: list[tuple[int, bytes]], trailer: bytes) -> None:
    data = encode_v2(None, None, tlvs=tlvs)
    assert decode(data + trailer) == (local(2, tlvs=tuple(tlvs)), len(data))


@PROPERTY
@given(ip_pairs, ports, ports, tlv_lists, st.booleans(), st.data())
def test_every_strict_prefix_needs_more(
    pair: tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, ...],
    src_port: int,
    dst_port: int,
    tlvs: list[tuple[int, bytes]],
    version_1: bool,
    data: st.DataObject,
) -> None:
    source, destination = (str(pair[0]), src_port), (str(pair[1]), dst_port)
    encoded = (
        encode_v1(source, destination) if version_1 else encode_v2(source, destination, tlvs=tlvs)
    )
    k = data.draw(st.integers(0, len(encoded) - 1))
    assert decode(encoded[:k]) is None
