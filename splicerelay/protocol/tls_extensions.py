"""The wire format inside a TLS ClientHello: length-prefixed vectors and the extensions
a router reads, as pure functions over bytes.

RFC 8446 3.4: a vector is its length (1, 2 or 3 bytes, big-endian) then that many bytes,
and vectors nest, so every read is checked against the block it is in. Each function
raises BrokenHello for bytes that break the format; `tls_hello` turns it into a result.
"""

from __future__ import annotations

import struct
from typing import Final

SERVER_NAME: Final = 0
ALPN: Final = 16
SUPPORTED_VERSIONS: Final = 43
ECH: Final = 0xFE0D  # encrypted_client_hello (draft-ietf-tls-esni)
_EXTENSION_HEAD: Final = struct.Struct("!HH")


class BrokenHello(ValueError):
    """The bytes are no valid ClientHello; the reason says why."""


class Reader:
    """A cursor over bytes whose reads raise BrokenHello instead of running past the end."""

    __slots__ = ("_data", "_pos")

    def __init__(self, data: bytes) -> None:
        self._data, self._pos = data, 0

    def left(self) -> int:
        return len(self._data) - self._pos

    def take(self, count: int, what: str) -> bytes:
        start = self._pos
        if start + count > len(self._data):
            raise BrokenHello(f"{what} overruns its block ({count} bytes, {self.left()} left)")
        self._pos = start + count
        return self._data[start : start + count]

    def number(self, width: int, what: str) -> int:
        return int.from_bytes(self.take(width, what), "big")

    def vector(self, width: int, what: str) -> bytes:
        """A block behind a `width`-byte length."""
        return self.take(self.number(width, what), what)

    def end(self, what: str) -> None:
        if self.left():
            raise BrokenHello(f"{self.left()} stray bytes after {what}")


def _sole_vector(value: bytes, width: int, what: str) -> bytes:
    """The one non-empty length-prefixed block an extension's value must be, exactly."""
    reader = Reader(value)
    block = reader.vector(width, what)
    reader.end(what)
    if not block:
        raise BrokenHello(f"empty {what}")
    return block


def by_type(block: bytes) -> dict[int, bytes]:
    """Each extension's value by type; RFC 8446 4.2 forbids two of one type.

    Read with struct rather than Reader: a hello has some twenty extensions, and this
    loop is most of the time a hello takes to parse.
    """
    found, pos = {}, 0
    while pos < len(block):
        if len(block) - pos < _EXTENSION_HEAD.size:
            raise BrokenHello(f"extension header overruns its block ({len(block) - pos} left)")
        kind, length = _EXTENSION_HEAD.unpack_from(block, pos)
        pos += _EXTENSION_HEAD.size + length
        if pos > len(block):
            raise BrokenHello(f"extension {kind:#06x} overruns its block")
        if kind in found:
            raise BrokenHello(f"extension {kind:#06x} appears twice")
        found[kind] = block[pos - length : pos]
    return found


def server_name(value: bytes | None) -> str | None:
    """The host_name of a ServerNameList. Entries of other types (none is defined) are
    skipped, as Go's crypto/tls does; RFC 6066 3 allows one name per type."""
    if value is None:
        return None
    reader, name = Reader(_sole_vector(value, 2, "server_name list")), None
    while reader.left():
        kind = reader.number(1, "server_name type")
        entry = reader.vector(2, "server_name entry")
        if kind != 0:
            continue
        if name is not None:
            raise BrokenHello("two host_names in server_name")
        name = _host_name(entry)
    return name


def _host_name(raw: bytes) -> str:
    """Printable ASCII without spaces (a DNS name, RFC 6066 3), lower-cased, its one
    trailing dot dropped: "Example.COM." and "example.com" name the same host."""
    if any(not 0x21 <= octet <= 0x7E for octet in raw):
        raise BrokenHello(f"host_name {raw[:64]!r} is not printable ASCII")
    name = raw.decode("ascii").lower().removesuffix(".")
    if not name:
        raise BrokenHello("empty host_name")
    return name


def alpn(value: bytes | None) -> tuple[str, ...]:
    if value is None:
        return ()
    reader, protocols = Reader(_sole_vector(value, 2, "ALPN list")), []
    while reader.left():
        protocol = reader.vector(1, "ALPN protocol")
        if not protocol:
            raise BrokenHello("empty ALPN protocol name (RFC 7301 3.1)")
        protocols.append(protocol.decode("latin-1"))
    return tuple(protocols)


def highest_version(value: bytes | None, legacy_version: int) -> int:
    """The highest version in supported_versions, GREASE values (RFC 8701: 0x0A0A,
    0x1A1A, ... 0xFAFA) left out; legacy_version without the extension."""
    if value is None:
        return legacy_version
    versions = _sole_vector(value, 1, "supported_versions")
    if len(versions) % 2:
        raise BrokenHello(f"supported_versions of odd length {len(versions)}")
    offered = (int.from_bytes(versions[i : i + 2], "big") for i in range(0, len(versions), 2))
    real = [v for v in offered if v & 0x0F0F != 0x0A0A or v >> 8 != v & 0xFF]
    return max(real, default=legacy_version)
