"""HAProxy's PROXY protocol, versions 1 and 2, as pure functions over bytes.

A PROXY header is the block a proxy puts in front of a relayed TCP stream to tell the
next hop who the original client was. Version 1 is one line of text::

    PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\\r\\n

and version 2 is binary: a 12-byte signature, a version/command byte, a family/transport
byte, a 16-bit length, then the address block and optional TLVs.

Detection follows section 2.2 of the specification: a header is version 2 when it starts
with the 12-byte signature (and its version nibble must then be 2), version 1 when it
starts with ``"PROXY "``, and anything else is not covered by the protocol and must be
dropped. The specification's byte counts (16 bytes before deciding on version 2, 8 on
version 1) are for a receiver that looks only once; `decode` instead answers "need more
bytes" while the input is still a prefix of a possible header and fails as soon as it
cannot be one, so a slow sender is read correctly and a wrong one is refused early.

Nothing here touches a socket, a clock or the event loop: `decode` looks at the bytes it
is given, `encode_v1`/`encode_v2` return the bytes to send. The server owns the reading,
the timeout (`HEADER_TIMEOUT_DEFAULT`) and what to do with the result, and each function
can be tested on whole input, byte by byte and with trailing stream data.
"""

from __future__ import annotations

import enum
import ipaddress
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from splicerelay.protocol.crc32c import crc32c

__all__ = [
    "HEADER_TIMEOUT_DEFAULT",
    "MAX_V1_LENGTH",
    "MAX_V2_LENGTH",
    "V2_HEADER_LENGTH",
    "V2_SIGNATURE",
    "ProxyHeader",
    "ProxyHeaderError",
    "TLVType",
    "decode",
    "encode_v1",
    "encode_v2",
    "v2_length",
]

# The specification asks receivers to wait "at least 3 seconds to cover a TCP retransmit".
HEADER_TIMEOUT_DEFAULT: Final = 3.0

V1_PREFIX: Final = b"PROXY "
# Longest version 1 line, CRLF included: "PROXY UNKNOWN" followed by two full IPv6
# addresses and two 5-digit ports.
MAX_V1_LENGTH: Final = 107

V2_SIGNATURE: Final = b"\r\n\r\n\x00\r\nQUIT\n"
# Signature, version/command, family/transport, 16-bit length of what follows.
V2_HEADER_LENGTH: Final = 16
# The longest version 2 header the length field can describe.
MAX_V2_LENGTH: Final = V2_HEADER_LENGTH + 0xFFFF
_V2_FIXED = struct.Struct("!12sBBH")
_V2_VERSION: Final = 0x2
_CMD_LOCAL: Final = 0x0
_CMD_PROXY: Final = 0x1

_TLV_HEAD = struct.Struct("!BH")
_MAX_UINT16: Final = 0xFFFF


class ProxyHeaderError(ValueError):
    """The bytes are not, and cannot become, a valid PROXY protocol header."""


class TLVType(enum.IntEnum):
    """The TLV types registered by the specification (section 2.2)."""

    ALPN = 0x01
    AUTHORITY = 0x02
    CRC32C = 0x03
    NOOP = 0x04
    UNIQUE_ID = 0x05
    SSL = 0x20
    NETNS = 0x30


@dataclass(frozen=True)
class ProxyHeader:
    """A decoded header.

    `source` and `destination` are set exactly when `local` is false. `local` means "use
    the real connection endpoints": a version 2 LOCAL command, a version 1 UNKNOWN line,
    or a version 2 PROXY command whose addresses are not IP (AF_UNSPEC, AF_UNIX).
    """

    version: int
    local: bool
    family: str
    source: tuple[str, int] | None
    destination: tuple[str, int] | None
    tlvs: tuple[tuple[int, bytes], ...] = ()


_Address = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True)
class _Family:
    """One valid version 2 family/transport byte."""

    name: str
    address_length: int
    stream: bool


# The seven combinations section 2.2 lists; every other byte is invalid.
_V2_FAMILIES: Final = {
    0x00: _Family("unspec", 0, stream=True),
    0x11: _Family("tcp4", 12, stream=True),
    0x12: _Family("udp4", 12, stream=False),
    0x21: _Family("tcp6", 36, stream=True),
    0x22: _Family("udp6", 36, stream=False),
    0x31: _Family("unix", 216, stream=True),
    0x32: _Family("unix_dgram", 216, stream=False),
}
_V2_FAMILY_BYTES: Final = {"tcp4": 0x11, "tcp6": 0x21}


# --- encoding -------------------------------------------------------------------------


def encode_v1(source: tuple[str, int] | None, destination: tuple[str, int] | None) -> bytes:
    """The version 1 line for a connection from `source` to `destination`.

    Both None gives ``PROXY UNKNOWN``. IPv4-mapped IPv6 addresses are sent as TCP4 when
    the other side is IPv4 or IPv4-mapped too. Raises ValueError for one missing side,
    mixed IPv4/IPv6 addresses or an invalid address or port.
    """
    if source is None and destination is None:
        return b"PROXY UNKNOWN\r\n"
    version, (src, src_port), (dst, dst_port) = _endpoints(source, destination)
    return f"PROXY TCP{version} {src} {dst} {src_port} {dst_port}\r\n".encode("ascii")


def encode_v2(
    source: tuple[str, int] | None,
    destination: tuple[str, int] | None,
    *,
    local: bool = False,
    tlvs: Sequence[tuple[int, bytes]] = (),
) -> bytes:
    """The version 2 header for a TCP connection from `source` to `destination`.

    A PROXY command with AF_INET or AF_INET6 and STREAM; with `local` true or both
    addresses None, a LOCAL command with AF_UNSPEC and no address block (any given
    addresses are then not sent). `tlvs` are appended as given, in order. Raises
    ValueError as `encode_v1` does, and for a TLV type outside 0..255 or a header longer
    than the 16-bit length field allows.
    """
    if local or (source is None and destination is None):
        command, family, addresses = _CMD_LOCAL, 0x00, b""
    else:
        version, (src, src_port), (dst, dst_port) = _endpoints(source, destination)
        command, family = _CMD_PROXY, _V2_FAMILY_BYTES[f"tcp{version}"]
        addresses = src.packed + dst.packed + struct.pack("!HH", src_port, dst_port)
    body = addresses + b"".join(_encode_tlv(kind, value) for kind, value in tlvs)
    if len(body) > _MAX_UINT16:
        raise ValueError(f"PROXY v2 header too long: {len(body)} bytes after the fixed part")
    ver_cmd = (_V2_VERSION << 4) | command
    return _V2_FIXED.pack(V2_SIGNATURE, ver_cmd, family, len(body)) + body


def _endpoints(
    source: tuple[str, int] | None, destination: tuple[str, int] | None
) -> tuple[int, tuple[_Address, int], tuple[_Address, int]]:
    """(4 or 6, source, destination), both addresses in that family, ports checked."""
    if source is None or destination is None:
        raise ValueError("source and destination must both be given, or both be None")
    src, dst = _ip(source[0]), _ip(destination[0])
    src_port, dst_port = _port(source[1]), _port(destination[1])
    src4, dst4 = _unmapped(src), _unmapped(dst)
    if isinstance(src4, ipaddress.IPv4Address) and isinstance(dst4, ipaddress.IPv4Address):
        return 4, (src4, src_port), (dst4, dst_port)
    if isinstance(src, ipaddress.IPv6Address) and isinstance(dst, ipaddress.IPv6Address):
        return 6, (src, src_port), (dst, dst_port)
    raise ValueError(f"source {src} and destination {dst} are not in the same family")


def _ip(text: str) -> _Address:
    """An IP address; an IPv6 zone (``%eth0``) is dropped, it means nothing to a peer."""
    address = ipaddress.ip_address(text)
    if isinstance(address, ipaddress.IPv6Address) and address.scope_id is not None:
        return ipaddress.IPv6Address(address.packed)
    return address


def _unmapped(address: _Address) -> _Address:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _port(port: int) -> int:
    if not isinstance(port, int) or not 0 <= port <= _MAX_UINT16:
        raise ValueError(f"port must be an integer in 0..65535, not {port!r}")
    return port


def _encode_tlv(kind: int, value: bytes) -> bytes:
    if not 0 <= kind <= 0xFF:
        raise ValueError(f"TLV type must be in 0..255, not {kind}")
    if len(value) > _MAX_UINT16:
        raise ValueError(f"TLV value too long: {len(value)} bytes")
    return _TLV_HEAD.pack(kind, len(value)) + bytes(value)


# --- decoding -------------------------------------------------------------------------


def decode(
    data: bytes | bytearray | memoryview, *, max_length: int = MAX_V2_LENGTH
) -> tuple[ProxyHeader, int] | None:
    """Decode the PROXY header at the start of `data`.

    Returns None while `data` is a prefix of a valid header (more bytes are needed), or
    ``(header, length)`` once a complete header is there, `length` being the bytes it
    used; what follows is stream data and is not looked at. Raises ProxyHeaderError when
    `data` cannot be the start of a valid header. The result for ``data[:k]`` never
    changes from an error or a header back to None as `k` grows, so the caller may call
    again after every read.

    A version 2 header longer than `max_length` bytes is refused as soon as its fixed
    16 bytes say so, before the rest is there; a version 1 line is at most
    MAX_V1_LENGTH bytes whatever `max_length` says.
    """
    # Copy out what is needed: no view on the caller's buffer outlives this call, not
    # even in the traceback of an error, so a bytearray stays resizable.
    head = _copy(data, MAX_V1_LENGTH)
    if head.startswith(V2_SIGNATURE):
        return _decode_v2(data, head, max_length)
    if head.startswith(V1_PREFIX):
        return _decode_v1(head)
    if V2_SIGNATURE.startswith(head) or V1_PREFIX.startswith(head):
        return None
    raise ProxyHeaderError(f"not a PROXY protocol header: starts with {head[:16]!r}")


def v2_length(data: bytes | bytearray | memoryview) -> int | None:
    """The whole length of the version 2 header `data` starts with, once its fixed 16
    bytes are there; None for anything else (fewer bytes, or not version 2).

    It tells a reader how far it may look without reaching past the header; whether
    the header is valid is `decode`'s to say.
    """
    head = _copy(data, V2_HEADER_LENGTH)
    if len(head) < V2_HEADER_LENGTH or not head.startswith(V2_SIGNATURE):
        return None
    return V2_HEADER_LENGTH + int.from_bytes(head[14:16], "big")


def _copy(data: bytes | bytearray | memoryview, limit: int) -> bytes:
    """The first `limit` bytes of `data`, as bytes."""
    with memoryview(data) as view, view.cast("B") as octets:
        return octets[:limit].tobytes()


def _size(data: bytes | bytearray | memoryview) -> int:
    with memoryview(data) as view:
        return view.nbytes


# --- version 1 ------------------------------------------------------------------------

# What may follow "PROXY ": the protocol token and the byte after it.
_V1_TOKEN_STARTS: Final = (b"TCP4 ", b"TCP6 ", b"UNKNOWN ", b"UNKNOWN\r")


def _decode_v1(head: bytes) -> tuple[ProxyHeader, int] | None:
    rest = head[len(V1_PREFIX) :]
    if not any(rest[: len(start)] == start[: len(rest)] for start in _V1_TOKEN_STARTS):
        token = rest.split(b" ", 1)[0].split(b"\r", 1)[0]
        raise ProxyHeaderError(f"PROXY v1: unknown protocol {token!r}")
    end = _v1_line_end(head)
    if end is None:
        return None
    return _parse_v1_line(head[:end]), end + 2


def _v1_line_end(head: bytes) -> int | None:
    """Index of the CR of the line's CRLF, or None if it may still come."""
    cr, lf = head.find(b"\r"), head.find(b"\n")
    if lf != -1 and (cr == -1 or lf < cr):
        raise ProxyHeaderError("PROXY v1: line ends with LF without CR")
    if cr == -1 or cr + 1 == len(head):
        if len(head) >= MAX_V1_LENGTH:
            raise ProxyHeaderError(f"PROXY v1: no CRLF in the first {MAX_V1_LENGTH} bytes")
        return None
    if head[cr + 1] != ord("\n"):
        raise ProxyHeaderError("PROXY v1: CR not followed by LF")
    return cr


def _parse_v1_line(line: bytes) -> ProxyHeader:
    fields = line.split(b" ")
    protocol = fields[1]
    if protocol == b"UNKNOWN":
        # "the receiver must ignore anything presented before the CRLF is found"
        return ProxyHeader(1, local=True, family="unspec", source=None, destination=None)
    if len(fields) != 6:
        raise ProxyHeaderError(
            f"PROXY v1: {protocol.decode('ascii')} needs 6 space-separated fields, "
            f"got {len(fields)}"
        )
    version = 4 if protocol == b"TCP4" else 6
    src, dst = (_parse_v1_address(field, version) for field in fields[2:4])
    src_port, dst_port = (_parse_v1_port(field) for field in fields[4:6])
    return ProxyHeader(
        1, local=False, family=f"tcp{version}", source=(src, src_port), destination=(dst, dst_port)
    )


_IPV6_CHARACTERS: Final = frozenset(b"0123456789abcdefABCDEF:.")


def _parse_v1_address(field: bytes, version: int) -> str:
    """The address in its normal text form; IPv4 must already be canonical."""
    try:
        if version == 4:
            address = str(ipaddress.IPv4Address(field.decode("ascii")))
            # Python already refuses leading zeros; the spec requires canonical form.
            if address.encode("ascii") != field:
                raise ValueError("not canonical")
            return address
        if not field or not _IPV6_CHARACTERS.issuperset(field):
            raise ValueError("unexpected characters")
        return str(ipaddress.IPv6Address(field.decode("ascii")))
    except ValueError:
        raise ProxyHeaderError(f"PROXY v1: invalid TCP{version} address {field!r}") from None


def _parse_v1_port(field: bytes) -> int:
    """A decimal port in 0..65535 without sign or leading zeros."""
    if (
        not field.isdigit()  # ASCII digits only, for bytes
        or len(field) > 5
        or (field.startswith(b"0") and field != b"0")
        or int(field) > _MAX_UINT16
    ):
        raise ProxyHeaderError(f"PROXY v1: invalid port {field!r}")
    return int(field)


# --- version 2 ------------------------------------------------------------------------


def _decode_v2(
    data: bytes | bytearray | memoryview, head: bytes, max_length: int
) -> tuple[ProxyHeader, int] | None:
    # Check each fixed byte as soon as it arrives, so a bad header fails early.
    if len(head) > 12:
        _check_version_command(head[12])
    if len(head) > 13:
        _check_family(head[12] & 0x0F, head[13])
    if len(head) < V2_HEADER_LENGTH:
        return None
    _, ver_cmd, family_byte, length = _V2_FIXED.unpack_from(head)
    command, family = ver_cmd & 0x0F, _V2_FAMILIES[family_byte]
    if command == _CMD_PROXY and length < family.address_length:
        raise ProxyHeaderError(
            f"PROXY v2: {family.name} needs a {family.address_length}-byte address block, "
            f"length is {length}"
        )
    total = V2_HEADER_LENGTH + length
    if total > max_length:
        raise ProxyHeaderError(
            f"PROXY v2: header of {total} bytes is longer than the {max_length} allowed"
        )
    if _size(data) < total:
        return None
    header = head[:total] if total <= len(head) else _copy(data, total)
    if command == _CMD_LOCAL:
        return _parse_v2_local(family, header), total
    return _parse_v2_proxy(family, header), total


def _check_version_command(ver_cmd: int) -> None:
    if ver_cmd >> 4 != _V2_VERSION:
        raise ProxyHeaderError(f"PROXY v2: unsupported version {ver_cmd >> 4} (must be 2)")
    if ver_cmd & 0x0F not in (_CMD_LOCAL, _CMD_PROXY):
        raise ProxyHeaderError(f"PROXY v2: unknown command {ver_cmd & 0x0F:#x}")


def _check_family(command: int, family_byte: int) -> None:
    family = _V2_FAMILIES.get(family_byte)
    if family is None:
        raise ProxyHeaderError(f"PROXY v2: unknown family/transport {family_byte:#04x}")
    # LOCAL ignores the family, so only a PROXY command must be relayable.
    if command == _CMD_PROXY and not family.stream:
        raise ProxyHeaderError(f"PROXY v2: {family.name} is not a stream transport")


def _parse_v2_local(family: _Family, header: bytes) -> ProxyHeader:
    """LOCAL: the receiver uses the real endpoints and ignores any address block."""
    name = family.name if family.stream else "unspec"
    tlvs: tuple[tuple[int, bytes], ...] = ()
    tlv_offset = V2_HEADER_LENGTH + family.address_length
    if len(header) >= tlv_offset:
        tlvs = _parse_tlvs(header, tlv_offset)
    return ProxyHeader(2, local=True, family=name, source=None, destination=None, tlvs=tlvs)


def _parse_v2_proxy(family: _Family, header: bytes) -> ProxyHeader:
    tlvs = _parse_tlvs(header, V2_HEADER_LENGTH + family.address_length)
    block = header[V2_HEADER_LENGTH:]
    src: _Address
    dst: _Address
    if family.name == "tcp4":
        src, dst, ports = ipaddress.IPv4Address(block[0:4]), ipaddress.IPv4Address(block[4:8]), 8
    elif family.name == "tcp6":
        src, dst = ipaddress.IPv6Address(block[0:16]), ipaddress.IPv6Address(block[16:32])
        ports = 32
    else:
        # AF_UNSPEC carries nothing usable; AF_UNIX paths mean nothing to a TCP relay.
        return ProxyHeader(
            2, local=True, family=family.name, source=None, destination=None, tlvs=tlvs
        )
    src_port, dst_port = struct.unpack_from("!HH", block, ports)
    return ProxyHeader(
        2,
        local=False,
        family=family.name,
        source=(str(src), src_port),
        destination=(str(dst), dst_port),
        tlvs=tlvs,
    )


def _parse_tlvs(header: bytes, offset: int) -> tuple[tuple[int, bytes], ...]:
    """The TLVs from `offset` to the end of `header`, checksum verified if present.

    Why at most one CRC32C TLV: each one is a checksum over the whole header, so a
    header packed with them would cost one pass over its bytes per TLV (hundreds of
    passes over a 4 KiB header). Two cannot both hold the checksum the specification
    defines anyway, since each is computed with only itself zeroed.
    """
    tlvs = []
    checked = False
    while offset < len(header):
        if len(header) - offset < _TLV_HEAD.size:
            raise ProxyHeaderError("PROXY v2: truncated TLV at the end of the header")
        kind, length = _TLV_HEAD.unpack_from(header, offset)
        start = offset + _TLV_HEAD.size
        offset = start + length
        if offset > len(header):
            raise ProxyHeaderError(
                f"PROXY v2: TLV {kind:#04x} of {length} bytes overruns the header"
            )
        if kind == TLVType.CRC32C:
            if checked:
                raise ProxyHeaderError("PROXY v2: more than one CRC32C TLV")
            _verify_crc32c(header, start, offset)
            checked = True
        tlvs.append((kind, header[start:offset]))
    return tuple(tlvs)


def _verify_crc32c(header: bytes, start: int, end: int) -> None:
    """Section 2.2.3: the CRC32c of the whole header, computed with this value zeroed."""
    if end - start != 4:
        raise ProxyHeaderError(f"PROXY v2: CRC32C TLV has {end - start} bytes, not 4")
    (expected,) = struct.unpack_from("!I", header, start)
    actual = crc32c(header[:start] + bytes(4) + header[end:])
    if actual != expected:
        raise ProxyHeaderError(
            f"PROXY v2: CRC32C mismatch (header says {expected:#010x}, computed {actual:#010x})"
        )
