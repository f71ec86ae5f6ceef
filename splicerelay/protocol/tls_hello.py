"""The TLS ClientHello at the start of a stream, read as a pure function over bytes.

A relay that routes TLS by name looks at the client's first flight without terminating
TLS: the ClientHello (RFC 8446 4.1.2, RFC 5246 7.4.1.2) carries the server_name
(RFC 6066 3), the ALPN list (RFC 7301) and the versions offered, all in clear text. The
hello is one handshake message, carried in one or more TLS records of content type 22
(handshake), each behind a 5-byte header: type, legacy record version, 16-bit length.

`parse_client_hello` looks at the bytes it is given and answers one of:

- `NeedMore(needed)`: the bytes are a prefix of a possible hello; `needed` is a lower
  bound on the stream bytes the whole hello takes, so a caller may wait for that many
  (SO_RCVLOWAT) without waiting for bytes a valid client never sends. It never shrinks
  as the prefix grows, and it is always more than the bytes given.
- `NotTls`: the first record is no TLS handshake record (plain HTTP, an SSLv2-style hello,
  an alert, ...), decided from the first byte or two, without waiting for a whole header.
- `Malformed`: TLS, but a broken hello; decided as soon as the bytes show it.
- `TooLarge`: the hello would need more than `max_size` bytes, decided from the first
  header that shows it, before the bytes are there.
- `ClientHello`: a whole, valid hello. Bytes after it (the next record) are not looked at.

As with the PROXY codec, a result other than NeedMore for ``data[:k]`` stays the same kind
for every longer prefix, so the caller may call again after every peek. Nothing here
raises for any input: failures are results.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

__all__ = [
    "DEFAULT_MAX_HELLO",
    "MAX_RECORD_LENGTH",
    "ClientHello",
    "HelloResult",
    "Malformed",
    "NeedMore",
    "NotTls",
    "TooLarge",
    "parse_client_hello",
]

# A 16 KiB handshake message in one record with its header. Real hellos are far smaller
# (under 2 KiB with a post-quantum key share), and HAProxy's buffer and nginx's
# preread_buffer_size default to 16 KiB too, so a client needing more is refused.
DEFAULT_MAX_HELLO: Final = 16384 + 5
# Why 2^14 + 256 and not 2^14: a plaintext record may carry 2^14 bytes, but servers
# commonly accept the ciphertext bound (RFC 8446 5.2), so only beyond it is it broken.
MAX_RECORD_LENGTH: Final = 2**14 + 256

_HEADER: Final = 5  # record header: type, version (2), length (2)
_HANDSHAKE_HEADER: Final = 4  # handshake header: msg_type, length (3)
_HANDSHAKE: Final = 22
_CLIENT_HELLO: Final = 1
_OTHER_RECORDS: Final = {20: "change_cipher_spec", 21: "alert", 23: "application_data"}
_SERVER_NAME: Final = 0
_ALPN: Final = 16
_SUPPORTED_VERSIONS: Final = 43
_ECH: Final = 0xFE0D


@dataclass(frozen=True, slots=True)
class NeedMore:
    """Not complete yet: call again once at least `needed` bytes of the stream are there."""

    needed: int


@dataclass(frozen=True, slots=True)
class NotTls:
    """The first bytes are no TLS handshake record."""

    reason: str


@dataclass(frozen=True, slots=True)
class Malformed:
    """TLS, but not a valid ClientHello."""

    reason: str


@dataclass(frozen=True, slots=True)
class TooLarge:
    """The hello, record headers included, would need at least `needed` > max_size bytes."""

    needed: int


@dataclass(frozen=True, slots=True)
class ClientHello:
    """What a router needs from a whole, valid hello.

    `server_name` is the host_name, lower-cased, its trailing dot removed (None without
    one). With `has_ech`, it is the outer, public name: the real one is encrypted.
    `alpn` holds the protocol ids in the client's order, each byte one Latin-1 character
    so nothing is lost. `version` is the highest offered (supported_versions without
    GREASE values, else legacy_version). `size` is the stream bytes of all its records.
    """

    server_name: str | None
    alpn: tuple[str, ...]
    version: int
    has_ech: bool
    size: int


HelloResult = NeedMore | NotTls | Malformed | TooLarge | ClientHello


class _Broken(Exception):
    """Internal: the hello is malformed; never leaves this module."""


def parse_client_hello(
    data: bytes | bytearray | memoryview, max_size: int = DEFAULT_MAX_HELLO
) -> HelloResult:
    """What the bytes at the start of a stream say about its ClientHello (see module doc)."""
    # Copy out at most max_size bytes: a valid hello never needs more, and no view on a
    # caller's bytearray outlives the call.
    with memoryview(data) as view, view.cast("B") as octets:
        stream = octets[:max_size].tobytes()
    if not stream:
        return NeedMore(1)
    if stream[0] != _HANDSHAKE or (len(stream) > 1 and stream[1] != 3):
        return NotTls(_not_handshake(stream))
    try:
        return _collect(stream, max_size)
    except _Broken as broken:
        return Malformed(str(broken))


def _not_handshake(head: bytes) -> str:
    if head[0] & 0x80:
        return "SSLv2-style record header (high bit set)"
    if head[0] in _OTHER_RECORDS:
        return f"a TLS {_OTHER_RECORDS[head[0]]} record, not a handshake"
    if head[0] == _HANDSHAKE:
        return f"record version major byte is {head[1]}, not 3"
    return f"not a TLS record: first byte {head[:1]!r}"


def _collect(stream: bytes, max_size: int) -> HelloResult:
    """Gather the handshake message from its records, then parse it.

    Each check runs as soon as the bytes it needs are there, in stream order, so a
    prefix meets the same checks as the whole stream, only fewer of them; that keeps a
    result final once it is not NeedMore.
    """
    pos, message = 0, bytearray()
    while True:
        header = stream[pos : pos + _HEADER]
        if pos:
            _check_later_header(header)
        due = _due(message)
        if len(header) < _HEADER:
            return _wait(pos + _HEADER + due if pos else _HEADER, max_size)
        length = _record_length(header)
        if _lower_bound(pos, length, due) > max_size:
            return TooLarge(_lower_bound(pos, length, due))
        fragment = stream[pos + _HEADER : pos + _HEADER + length]
        total = _message_total(bytes(message[:_HANDSHAKE_HEADER]) + fragment[:_HANDSHAKE_HEADER])
        if total is not None:
            due = total - len(message)
            if length > due:
                raise _Broken("the ClientHello does not end at a record boundary (RFC 8446 5.1)")
        needed = _lower_bound(pos, length, due)
        if len(fragment) < length or needed > max_size:
            return _wait(needed, max_size)
        message += fragment
        pos += _HEADER + length
        if len(message) == total:
            return _parse_hello(bytes(message[_HANDSHAKE_HEADER:]), pos)


def _check_later_header(header: bytes) -> None:
    if header[:1] and header[0] != _HANDSHAKE:
        kind = _OTHER_RECORDS.get(header[0], f"type {header[0]}")
        raise _Broken(f"a {kind} record inside the ClientHello")
    if header[1:2] and header[1] != 3:
        raise _Broken(f"record version major byte is {header[1]}, not 3")


def _record_length(header: bytes) -> int:
    length = int.from_bytes(header[3:5], "big")
    if not 0 < length <= MAX_RECORD_LENGTH:
        raise _Broken(f"record length {length} is not in 1..{MAX_RECORD_LENGTH}")
    return length


def _message_total(head: bytes) -> int | None:
    """The handshake message's whole length once `head`, its first bytes, holds its
    header; checks its type as soon as that byte is there."""
    if head[:1] and head[0] != _CLIENT_HELLO:
        raise _Broken(f"handshake message type {head[0]}, not ClientHello (1)")
    if len(head) < _HANDSHAKE_HEADER:
        return None
    return _HANDSHAKE_HEADER + int.from_bytes(head[1:4], "big")


def _due(message: bytearray) -> int:
    """Handshake bytes still to come after `message`: to its end, or to its header's."""
    total = _message_total(bytes(message[:_HANDSHAKE_HEADER]))
    return (_HANDSHAKE_HEADER if total is None else total) - len(message)


def _lower_bound(pos: int, length: int, missing: int) -> int:
    """The fewest stream bytes a hello can take whose record at `pos` holds `length`
    bytes, `missing` handshake bytes being due from the start of that record's payload."""
    if length >= missing:
        return pos + _HEADER + length
    return pos + _HEADER + length + _HEADER + (missing - length)


def _wait(needed: int, max_size: int) -> NeedMore | TooLarge:
    return TooLarge(needed) if needed > max_size else NeedMore(needed)


# --- the ClientHello body -------------------------------------------------------------


class _Reader:
    """A cursor over bytes whose reads raise _Broken instead of running past the end."""

    __slots__ = ("_data", "_pos")

    def __init__(self, data: bytes) -> None:
        self._data, self._pos = data, 0

    def left(self) -> int:
        return len(self._data) - self._pos

    def take(self, count: int, what: str) -> bytes:
        if count > self.left():
            raise _Broken(f"{what} overruns its block ({count} bytes, {self.left()} left)")
        self._pos += count
        return self._data[self._pos - count : self._pos]

    def number(self, width: int, what: str) -> int:
        return int.from_bytes(self.take(width, what), "big")

    def vector(self, width: int, what: str) -> bytes:
        """A block behind a `width`-byte length."""
        return self.take(self.number(width, what), what)

    def end(self, what: str) -> None:
        if self.left():
            raise _Broken(f"{self.left()} stray bytes after {what}")


def _sole_vector(value: bytes, width: int, what: str) -> bytes:
    """The one non-empty length-prefixed block an extension's value must be, exactly."""
    reader = _Reader(value)
    block = reader.vector(width, what)
    reader.end(what)
    if not block:
        raise _Broken(f"empty {what}")
    return block


def _parse_hello(body: bytes, size: int) -> ClientHello:
    reader = _Reader(body)
    legacy_version = reader.number(2, "legacy_version")
    reader.take(32, "random")
    if len(reader.vector(1, "legacy_session_id")) > 32:
        raise _Broken("legacy_session_id longer than 32 bytes")
    suites = reader.vector(2, "cipher_suites")
    if not suites or len(suites) % 2:
        raise _Broken(f"cipher_suites of {len(suites)} bytes (must be even, not 0)")
    if not reader.vector(1, "legacy_compression_methods"):
        raise _Broken("no legacy_compression_methods")
    # Before TLS 1.3 the extensions block may be absent altogether (RFC 5246 7.4.1.2).
    extensions = _extensions(reader.vector(2, "extensions")) if reader.left() else {}
    reader.end("the extensions")
    return ClientHello(
        server_name=_server_name(extensions.get(_SERVER_NAME)),
        alpn=_alpn(extensions.get(_ALPN)),
        version=_version(extensions.get(_SUPPORTED_VERSIONS), legacy_version),
        has_ech=_ECH in extensions,
        size=size,
    )


def _extensions(block: bytes) -> dict[int, bytes]:
    """Each extension's value by type; RFC 8446 4.2 forbids two of one type."""
    reader, found = _Reader(block), {}
    while reader.left():
        kind = reader.number(2, "extension type")
        if kind in found:
            raise _Broken(f"extension {kind:#06x} appears twice")
        found[kind] = reader.vector(2, f"extension {kind:#06x}")
    return found


def _server_name(value: bytes | None) -> str | None:
    """The host_name of a ServerNameList. Entries of other types (none is defined) are
    skipped, as Go's crypto/tls does; RFC 6066 3 allows one name per type."""
    if value is None:
        return None
    reader, name = _Reader(_sole_vector(value, 2, "server_name list")), None
    while reader.left():
        kind = reader.number(1, "server_name type")
        entry = reader.vector(2, "server_name entry")
        if kind != 0:
            continue
        if name is not None:
            raise _Broken("two host_names in server_name")
        name = _host_name(entry)
    return name


def _host_name(raw: bytes) -> str:
    """Printable ASCII without spaces (a DNS name, RFC 6066 3), lower-cased, its one
    trailing dot dropped: "Example.COM." and "example.com" name the same host."""
    if any(not 0x21 <= octet <= 0x7E for octet in raw):
        raise _Broken(f"host_name {raw[:64]!r} is not printable ASCII")
    name = raw.decode("ascii").lower().removesuffix(".")
    if not name:
        raise _Broken("empty host_name")
    return name


def _alpn(value: bytes | None) -> tuple[str, ...]:
    if value is None:
        return ()
    reader, protocols = _Reader(_sole_vector(value, 2, "ALPN list")), []
    while reader.left():
        protocol = reader.vector(1, "ALPN protocol")
        if not protocol:
            raise _Broken("empty ALPN protocol name (RFC 7301 3.1)")
        protocols.append(protocol.decode("latin-1"))
    return tuple(protocols)


def _version(value: bytes | None, legacy_version: int) -> int:
    """The highest version in supported_versions, GREASE values (RFC 8701: 0x0A0A,
    0x1A1A, ... 0xFAFA) left out; legacy_version without the extension."""
    if value is None:
        return legacy_version
    versions = _sole_vector(value, 1, "supported_versions")
    if len(versions) % 2:
        raise _Broken(f"supported_versions of odd length {len(versions)}")
    offered = (int.from_bytes(versions[i : i + 2], "big") for i in range(0, len(versions), 2))
    real = [version for version in offered if not _is_grease(version)]
    return max(real, default=legacy_version)


def _is_grease(value: int) -> bool:
    return value & 0x0F0F == 0x0A0A and value >> 8 == value & 0xFF
