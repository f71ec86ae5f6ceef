"""TLS ClientHellos for tests: built by hand, piece by piece, or captured from Python's ssl.

The helpers build the wire format independently of the parser (RFC 8446 4.1.2 and 4.2,
RFC 6066 3, RFC 7301 3.1), so a test can break exactly one field; `python_client_hello`
gives the bytes a real TLS client sends.
"""

from __future__ import annotations

import contextlib
import itertools
import ssl
from collections.abc import Iterable, Sequence

HANDSHAKE = 22
CLIENT_HELLO = 1
SERVER_NAME = 0
ALPN = 16
SUPPORTED_VERSIONS = 43
KEY_SHARE = 51
ECH = 0xFE0D
TLS12 = 0x0303
TLS13 = 0x0304
X25519 = 0x001D
X25519MLKEM768 = 0x11EC
# The cipher suites of a current browser, TLS 1.3 first.
CIPHER_SUITES = (0x1301, 0x1302, 0x1303, 0xC02B, 0xC02F, 0xC02C, 0xC030, 0xCCA9, 0xCCA8)


def vector(width: int, data: bytes) -> bytes:
    """`data` behind its `width`-byte length."""
    return len(data).to_bytes(width, "big") + data


def record(payload: bytes, content_type: int = HANDSHAKE, version: int = 0x0301) -> bytes:
    """One TLS record; the length is whatever `payload` is, even over the limit."""
    return bytes([content_type]) + version.to_bytes(2, "big") + vector(2, payload)


def records(message: bytes, sizes: int | Iterable[int]) -> bytes:
    """`message` cut into handshake records holding `sizes` bytes each (an int: all the
    same size, the last one shorter); the last record takes what the sizes leave."""
    cuts = itertools.repeat(sizes) if isinstance(sizes, int) else iter(sizes)
    out, rest = [], message
    while rest:
        size = next(cuts, len(rest))
        out.append(record(rest[:size]))
        rest = rest[size:]
    return b"".join(out)


def handshake(body: bytes, msg_type: int = CLIENT_HELLO) -> bytes:
    """A handshake message: type and 24-bit length before `body`."""
    return bytes([msg_type]) + vector(3, body)


def extension(kind: int, data: bytes) -> bytes:
    return kind.to_bytes(2, "big") + vector(2, data)


def server_name(*names: bytes | str, name_type: int = 0) -> bytes:
    """The server_name extension with one entry of `name_type` per name."""
    raw = (name.encode("ascii") if isinstance(name, str) else name for name in names)
    entries = b"".join(bytes([name_type]) + vector(2, name) for name in raw)
    return extension(SERVER_NAME, vector(2, entries))


def alpn(*protocols: bytes | str) -> bytes:
    raw = (p.encode("latin-1") if isinstance(p, str) else p for p in protocols)
    return extension(ALPN, vector(2, b"".join(vector(1, p) for p in raw)))


def supported_versions(*versions: int) -> bytes:
    return extension(
        SUPPORTED_VERSIONS, vector(1, b"".join(v.to_bytes(2, "big") for v in versions))
    )


def key_share(*shares: tuple[int, int]) -> bytes:
    """A key_share with one (group, size) entry each; the key bytes are filler."""
    entries = b"".join(
        group.to_bytes(2, "big") + vector(2, b"\xab" * size) for group, size in shares
    )
    return extension(KEY_SHARE, vector(2, entries))


def ech(payload_size: int = 208) -> bytes:
    """An outer encrypted_client_hello (draft-ietf-tls-esni): type outer, HKDF-SHA256 +
    AES-128-GCM, config id, a 32-byte encapsulated key and the encrypted inner hello."""
    return extension(
        ECH,
        b"\x00\x00\x01\x00\x01\x2a" + vector(2, b"\x11" * 32) + vector(2, b"\x22" * payload_size),
    )


def hello_body(
    *extensions: bytes,
    legacy_version: int = TLS12,
    session_id: bytes = b"\x5a" * 32,
    cipher_suites: Sequence[int] = CIPHER_SUITES,
    compression: bytes = b"\x00",
    extensions_block: bytes | None = None,
) -> bytes:
    """A ClientHello body. `extensions_block` replaces the block built from
    `extensions`, length included (b"" leaves the block out, as TLS 1.2 allows)."""
    block = vector(2, b"".join(extensions)) if extensions_block is None else extensions_block
    suites = b"".join(suite.to_bytes(2, "big") for suite in cipher_suites)
    return (
        legacy_version.to_bytes(2, "big")
        + bytes(range(32))  # random
        + vector(1, session_id)
        + vector(2, suites)
        + vector(1, compression)
        + block
    )


def client_hello(*extensions: bytes, fragment: int | Iterable[int] = 2**14) -> bytes:
    """The stream a client sends: a ClientHello with `extensions`, in records of
    `fragment` handshake bytes each."""
    return records(handshake(hello_body(*extensions)), fragment)


def unwrap(stream: bytes) -> bytes:
    """The handshake bytes of a stream of records (to re-cut a real hello differently)."""
    out, pos = [], 0
    while pos < len(stream):
        length = int.from_bytes(stream[pos + 3 : pos + 5], "big")
        out.append(stream[pos + 5 : pos + 5 + length])
        pos += 5 + length
    return b"".join(out)


def python_client_hello(
    server_hostname: str | None = "example.com",
    alpn_protocols: Sequence[str] = (),
    *,
    ciphers: str | None = None,
    minimum_version: ssl.TLSVersion = ssl.TLSVersion.TLSv1_2,
    maximum_version: ssl.TLSVersion = ssl.TLSVersion.MAXIMUM_SUPPORTED,
) -> bytes:
    """The first flight Python's ssl (OpenSSL) sends, captured through a MemoryBIO."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.minimum_version = minimum_version
    context.maximum_version = maximum_version
    if ciphers is not None:
        context.set_ciphers(ciphers)
    if alpn_protocols:
        context.set_alpn_protocols(list(alpn_protocols))
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = context.wrap_bio(incoming, outgoing, server_hostname=server_hostname)
    # It then waits for the server's answer: the hello is out.
    with contextlib.suppress(ssl.SSLWantReadError):
        client.do_handshake()
    return outgoing.read()
