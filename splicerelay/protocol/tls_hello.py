"""The TLS ClientHello at the start of a stream, read as a pure function over bytes.

To route TLS by name without terminating it, a relay reads the client's first message,
the ClientHello (RFC 8446 4.1.2): it carries the server_name (RFC 6066 3), the ALPN list
(RFC 7301) and the versions offered in clear text. It is one handshake message in one or
more records of content type 22, each behind a 5-byte header (type, version, length).

`parse_client_hello` answers `NeedMore(needed)` while the bytes are a prefix of a possible
hello: `needed` is a lower bound on the stream bytes the hello takes, more than given and
never shrinking, so a caller may wait for that many (SO_RCVLOWAT) and never waits for
bytes a valid client does not send. Otherwise it answers `NotTls` (decided from the first
byte or two), `Malformed`, `TooLarge` (decided from the first header that shows it) or the
`ClientHello`; bytes after the hello are not looked at. As with the PROXY codec, such an
answer for ``data[:k]`` stays of the same kind for every longer prefix. No input raises.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from splicerelay.protocol.tls_extensions import (
    ALPN,
    ECH,
    SERVER_NAME,
    SUPPORTED_VERSIONS,
    BrokenHello,
    Reader,
    alpn,
    by_type,
    highest_version,
    server_name,
)

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
    except BrokenHello as broken:
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
    pos, message, total = 0, bytearray(), None
    while True:
        header = stream[pos : pos + _HEADER]
        if pos:
            _check_later_header(header)
        # Handshake bytes still due: to the message's end, or its header's while unknown.
        due = (total or _HANDSHAKE_HEADER) - len(message)
        if len(header) < _HEADER:
            return _wait(pos + _HEADER + due if pos else _HEADER, max_size)
        length = _record_length(header)
        # The header alone may show the hello too large, before the fragment is read.
        if _lower_bound(pos, length, due) > max_size:
            return TooLarge(_lower_bound(pos, length, due))
        fragment = stream[pos + _HEADER : pos + _HEADER + length]
        total = _message_total(bytes(message[:_HANDSHAKE_HEADER]) + fragment[:_HANDSHAKE_HEADER])
        if total is not None:
            due = total - len(message)
            # RFC 8446 5.1: a ClientHello ends at a record boundary, as keys may change
            # after it. That also makes `size` exact: the hello is whole records.
            if length > due:
                raise BrokenHello("the ClientHello does not end at a record boundary")
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
        raise BrokenHello(f"a {kind} record inside the ClientHello")
    if header[1:2] and header[1] != 3:
        raise BrokenHello(f"record version major byte is {header[1]}, not 3")


def _record_length(header: bytes) -> int:
    length = int.from_bytes(header[3:5], "big")
    if not 0 < length <= MAX_RECORD_LENGTH:
        raise BrokenHello(f"record length {length} is not in 1..{MAX_RECORD_LENGTH}")
    return length


def _message_total(head: bytes) -> int | None:
    """The handshake message's whole length once `head`, its first bytes, holds its
    header; checks its type as soon as that byte is there."""
    if head[:1] and head[0] != _CLIENT_HELLO:
        raise BrokenHello(f"handshake message type {head[0]}, not ClientHello (1)")
    if len(head) < _HANDSHAKE_HEADER:
        return None
    return _HANDSHAKE_HEADER + int.from_bytes(head[1:4], "big")


def _lower_bound(pos: int, length: int, missing: int) -> int:
    """The fewest stream bytes a hello can take whose record at `pos` holds `length`
    bytes, `missing` handshake bytes being due from the start of that record's payload."""
    if length >= missing:
        return pos + _HEADER + length
    return pos + _HEADER + length + _HEADER + (missing - length)


def _wait(needed: int, max_size: int) -> NeedMore | TooLarge:
    return TooLarge(needed) if needed > max_size else NeedMore(needed)


def _parse_hello(body: bytes, size: int) -> ClientHello:
    """The fields of the ClientHello body, in order (RFC 8446 4.1.2, RFC 5246 7.4.1.2)."""
    reader = Reader(body)
    legacy_version = reader.number(2, "legacy_version")
    reader.take(32, "random")
    if len(reader.vector(1, "legacy_session_id")) > 32:
        raise BrokenHello("legacy_session_id longer than 32 bytes")
    suites = reader.vector(2, "cipher_suites")
    if not suites or len(suites) % 2:
        raise BrokenHello(f"cipher_suites of {len(suites)} bytes (must be even, not 0)")
    if not reader.vector(1, "legacy_compression_methods"):
        raise BrokenHello("no legacy_compression_methods")
    # Before TLS 1.3 the extensions block may be absent altogether (RFC 5246 7.4.1.2).
    extensions = by_type(reader.vector(2, "extensions")) if reader.left() else {}
    reader.end("the extensions")
    return ClientHello(
        server_name=server_name(extensions.get(SERVER_NAME)),
        alpn=alpn(extensions.get(ALPN)),
        version=highest_version(extensions.get(SUPPORTED_VERSIONS), legacy_version),
        has_ech=ECH in extensions,
        size=size,
    )
