"""PROXY v2 bounds: the header length limit, `v2_length`, and one CRC32C TLV at most."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from splicerelay.protocol.crc32c import crc32c
from splicerelay.protocol.proxy_protocol import (
    MAX_V1_LENGTH,
    MAX_V2_LENGTH,
    V2_HEADER_LENGTH,
    V2_SIGNATURE,
    ProxyHeaderError,
    decode,
    encode_v1,
    encode_v2,
    v2_length,
)

PROPERTY = settings(max_examples=200, database=None, derandomize=True, deadline=None)
V4 = (("192.0.2.1", 40000), ("198.51.100.2", 443))


def padded_v2(total: int) -> bytes:
    """A valid tcp4 v2 header of exactly `total` bytes (a NOOP TLV fills it up)."""
    bare = encode_v2(*V4)
    return encode_v2(*V4, tlvs=[(0x04, bytes(total - len(bare) - 3))])


def with_crc_tlvs(header: bytes, count: int) -> bytes:
    """`header` with `count` CRC32C TLVs appended, the first one holding the checksum."""
    body = header[V2_HEADER_LENGTH:] + (b"\x03\x00\x04" + bytes(4)) * count
    zeroed = header[:14] + struct.pack("!H", len(body)) + body
    start = len(header) + 3
    return zeroed[:start] + struct.pack("!I", crc32c(zeroed)) + zeroed[start + 4 :]


@pytest.mark.parametrize("limit", [256, 4096, MAX_V2_LENGTH])
def test_a_header_of_exactly_the_limit_is_accepted(limit: int) -> None:
    header = padded_v2(limit)
    assert len(header) == limit
    result = decode(header + b"payload", max_length=limit)
    assert result is not None and result[1] == limit


@pytest.mark.parametrize("limit", [256, 4096])
def test_one_byte_more_is_refused_from_the_fixed_part_alone(limit: int) -> None:
    header = padded_v2(limit + 1)
    assert decode(header[: V2_HEADER_LENGTH - 1], max_length=limit) is None
    with pytest.raises(ProxyHeaderError, match=f"{limit + 1} bytes is longer than the {limit}"):
        decode(header[:V2_HEADER_LENGTH], max_length=limit)


def test_the_default_limit_is_the_largest_header_there_is() -> None:
    header = padded_v2(MAX_V2_LENGTH)
    assert decode(header) == decode(header, max_length=MAX_V2_LENGTH)


def test_v1_keeps_its_own_bound_whatever_the_limit() -> None:
    line = encode_v1(*V4)
    assert decode(line, max_length=256) == decode(line)
    with pytest.raises(ProxyHeaderError, match="no CRLF in the first 107 bytes"):
        decode(b"PROXY UNKNOWN " + b"x" * (MAX_V1_LENGTH - 14), max_length=MAX_V2_LENGTH)


@given(total=st.integers(V2_HEADER_LENGTH + 12 + 3, 3000), cut=st.integers(0, 3000))
@PROPERTY
def test_v2_length_is_the_decoded_length_once_the_fixed_part_is_there(total: int, cut: int) -> None:
    header = padded_v2(total)
    prefix = header[:cut]
    expected = total if cut >= V2_HEADER_LENGTH else None
    assert v2_length(prefix) == expected
    assert v2_length(bytearray(prefix)) == expected
    assert v2_length(memoryview(prefix + b"trailing")) == (
        total if len(prefix + b"trailing") >= V2_HEADER_LENGTH else None
    )


@pytest.mark.parametrize(
    "data", [b"", encode_v1(*V4), b"PROXY UNKNOWN\r\n\r\n\r\n", b"\x00" * 32, V2_SIGNATURE]
)
def test_v2_length_is_none_for_anything_else(data: bytes) -> None:
    assert v2_length(data) is None


def test_one_crc32c_tlv_is_checked_and_a_second_refused() -> None:
    header = encode_v2(*V4)
    one = with_crc_tlvs(header, 1)
    assert decode(one) is not None
    two = with_crc_tlvs(header, 2)
    with pytest.raises(ProxyHeaderError, match="more than one CRC32C TLV"):
        decode(two)
