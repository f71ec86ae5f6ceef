"""The ClientHello reader: real and hand-built hellos whole, byte by byte, split into
records and with trailing data; each refusal on its own; then properties."""

from __future__ import annotations

import ssl

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from splicerelay.protocol.tls_hello import (
    DEFAULT_MAX_HELLO,
    MAX_RECORD_LENGTH,
    ClientHello,
    HelloResult,
    Malformed,
    NeedMore,
    NotTls,
    TooLarge,
    parse_client_hello,
)
from tests.support.tls_hello_builder import (
    SUPPORTED_VERSIONS,
    TLS12,
    TLS13,
    X25519,
    X25519MLKEM768,
    alpn,
    client_hello,
    ech,
    extension,
    handshake,
    hello_body,
    key_share,
    python_client_hello,
    record,
    records,
    server_name,
    supported_versions,
    unwrap,
    vector,
)

PROPERTY = settings(max_examples=200, database=None, derandomize=True, deadline=None)
RESULTS = (NeedMore, NotTls, Malformed, TooLarge, ClientHello)
# A browser's ALPN list, then enough more to push the hello past one TCP segment.
LONG_ALPN = ["h2", "http/1.1", *(f"x-protocol-{n:03}" for n in range(120))]

TLS13_HELLO = python_client_hello("App.Example.COM", LONG_ALPN, ciphers="ALL")
TLS12_HELLO = python_client_hello(
    "legacy.example", ["http/1.1"], maximum_version=ssl.TLSVersion.TLSv1_2
)
TLS13_ONLY_HELLO = python_client_hello("only13.example", minimum_version=ssl.TLSVersion.TLSv1_3)
NO_SNI_HELLO = python_client_hello(None)
# Like a current browser's: a post-quantum key share and an ECH extension (real or GREASE).
BIG_KEY_SHARE_HELLO = client_hello(
    server_name("pq.example"),
    alpn("h2", "http/1.1"),
    supported_versions(0x3A3A, TLS13, TLS12),
    key_share((0x3A3A, 1), (X25519MLKEM768, 1216), (X25519, 32)),
    ech(),
)
REAL_HELLOS = [TLS13_HELLO, TLS12_HELLO, TLS13_ONLY_HELLO, NO_SNI_HELLO]
# A server_name list whose host_name follows an entry of an undefined type.
SNI_AFTER_ANOTHER_TYPE = extension(
    0, vector(2, b"\x09" + vector(2, b"x") + b"\x00" + vector(2, b"b.example"))
)


def parsed(stream: bytes) -> ClientHello:
    result = parse_client_hello(stream)
    assert isinstance(result, ClientHello), result
    return result


def assert_prefixes_wait(stream: bytes, max_size: int = DEFAULT_MAX_HELLO, step: int = 1) -> None:
    """Every proper prefix (every `step`th, and the last 64) asks for more, for no byte
    beyond the hello, never less than before: a caller may set SO_RCVLOWAT to `needed`."""
    previous = 0
    for k in sorted({*range(0, len(stream), step), *range(max(0, len(stream) - 64), len(stream))}):
        result = parse_client_hello(stream[:k], max_size)
        assert isinstance(result, NeedMore), (k, result)
        assert k < result.needed <= len(stream), (k, result)
        assert result.needed >= previous, (k, result, previous)
        previous = result.needed


# --- real hellos ----------------------------------------------------------------------


def test_python_tls13_hello_over_one_segment() -> None:
    assert len(TLS13_HELLO) > 1500  # more than one Ethernet segment
    assert parsed(TLS13_HELLO) == ClientHello(
        server_name="app.example.com",
        alpn=tuple(LONG_ALPN),
        version=TLS13,
        has_ech=False,
        size=len(TLS13_HELLO),
    )


def test_python_tls12_only_hello_has_the_legacy_version() -> None:
    hello = parsed(TLS12_HELLO)
    assert (hello.server_name, hello.alpn, hello.version) == (
        "legacy.example",
        ("http/1.1",),
        TLS12,
    )


def test_python_tls13_only_hello() -> None:
    hello = parsed(TLS13_ONLY_HELLO)
    assert (hello.server_name, hello.version) == ("only13.example", TLS13)
    assert b"\x00\x2b\x00\x03\x02\x03\x04" in TLS13_ONLY_HELLO  # offers 1.3 alone


def test_python_hello_without_server_hostname_has_no_sni() -> None:
    assert parsed(NO_SNI_HELLO).server_name is None
    assert parsed(NO_SNI_HELLO).alpn == ()


def test_big_key_share_hello() -> None:
    assert len(BIG_KEY_SHARE_HELLO) > 1500
    assert parsed(BIG_KEY_SHARE_HELLO) == ClientHello(
        "pq.example", ("h2", "http/1.1"), TLS13, has_ech=True, size=len(BIG_KEY_SHARE_HELLO)
    )


@pytest.mark.parametrize("stream", [*REAL_HELLOS, BIG_KEY_SHARE_HELLO])
def test_every_prefix_waits_then_the_whole_parses(stream: bytes) -> None:
    assert_prefixes_wait(stream)
    assert parsed(stream).size == len(stream)


@pytest.mark.parametrize("stream", [*REAL_HELLOS, BIG_KEY_SHARE_HELLO])
def test_trailing_bytes_belong_to_the_next_record(stream: bytes) -> None:
    trailing = record(b"\x01", content_type=20, version=TLS12) + b"\x17\x03\x03\xff\xff junk"
    assert parsed(stream + trailing) == parsed(stream)


@pytest.mark.parametrize("stream", [TLS13_HELLO, BIG_KEY_SHARE_HELLO])
def test_split_into_one_byte_records(stream: bytes) -> None:
    message = unwrap(stream)
    split = records(message, 1)
    assert len(split) == 6 * len(message)
    hello = parse_client_hello(split, max_size=len(split))
    assert isinstance(hello, ClientHello)
    assert _fields(hello) == {**_fields(parsed(stream)), "size": len(split)}
    # Each call reads all records again, so every prefix would take minutes here.
    assert_prefixes_wait(split, max_size=len(split), step=97)


@pytest.mark.parametrize("sizes", [[1, 2, 3], [3, 1], [4], [5, 100], [MAX_RECORD_LENGTH - 256]])
def test_split_across_records_at_any_point(sizes: list[int]) -> None:
    split = records(unwrap(TLS13_HELLO), sizes)
    assert _fields(parsed(split)) == {**_fields(parsed(TLS13_HELLO)), "size": len(split)}
    assert_prefixes_wait(split)


def _fields(hello: ClientHello) -> dict[str, object]:
    return {name: getattr(hello, name) for name in ClientHello.__slots__}


@pytest.mark.parametrize("kind", [bytes, bytearray, memoryview])
def test_any_buffer_and_the_callers_bytearray_stays_resizable(kind: type) -> None:
    data = kind(TLS12_HELLO)
    assert parsed(bytes(data)) == parse_client_hello(data)
    if isinstance(data, bytearray):
        data.extend(b"more")  # BufferError if a view on it were still held


# --- hand-built hellos: what is read ---------------------------------------------------


@pytest.mark.parametrize(
    ("extensions", "expected"),
    [
        ((), (None, (), TLS12, False)),
        ((server_name("Example.ORG."),), ("example.org", (), TLS12, False)),
        ((server_name("a.example", name_type=7),), (None, (), TLS12, False)),
        ((SNI_AFTER_ANOTHER_TYPE,), ("b.example", (), TLS12, False)),
        ((alpn("h2", b"\xff\x00"),), (None, ("h2", "\xff\x00"), TLS12, False)),
        ((supported_versions(0x0A0A, TLS12, TLS13, 0xFAFA),), (None, (), TLS13, False)),
        ((supported_versions(0x1A1A),), (None, (), TLS12, False)),
        ((supported_versions(0x0A1A, TLS13),), (None, (), 0x0A1A, False)),
        ((server_name("public.example"), ech()), ("public.example", (), TLS12, True)),
    ],
    ids=[
        "nothing",
        "sni-case-and-dot",
        "other-name-type",
        "other-type-first",
        "alpn-latin1",
        "grease",
        "only-grease",
        "not-grease",
        "ech",
    ],
)
def test_built_hellos(extensions: tuple[bytes, ...], expected: tuple[object, ...]) -> None:
    stream = client_hello(*extensions)
    hello = parsed(stream)
    assert (hello.server_name, hello.alpn, hello.version, hello.has_ech) == expected
    assert hello.size == len(stream)


def test_tls12_hello_without_an_extensions_block() -> None:
    stream = records(handshake(hello_body(extensions_block=b"")), 2**14)
    assert parsed(stream) == ClientHello(None, (), TLS12, has_ech=False, size=len(stream))


def test_ech_hello_routes_on_the_outer_name() -> None:
    stream = client_hello(server_name("cover.example"), supported_versions(TLS13), ech(600))
    assert parsed(stream) == ClientHello("cover.example", (), TLS13, True, len(stream))


# --- what is needed, and when it is too much -------------------------------------------


@pytest.mark.parametrize(
    ("data", "needed"),
    [
        (b"", 1),
        (b"\x16", 5),
        (b"\x16\x03\x01\x02", 5),
        (b"\x16\x03\x01\x02\x00", 517),
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc", 517),
        # 1-byte records: the handshake header's 4 bytes need 4 records at least
        (b"\x16\x03\x01\x00\x01", 14),
        (b"\x16\x03\x01\x00\x01\x01", 14),
        (b"\x16\x03\x01\x00\x01\x01\x16", 14),
        (records(b"\x01\x00\x00\x30", 1), 24 + 5 + 0x30),
        (records(b"\x01\x00\x00\x30", 1) + b"\x16\x03\x01\x00\x10", 24 + 5 + 0x30 + 5),
        # the message is due in full: a short record means one more header
        (b"\x16\x03\x01\x00\x05\x01\x00\x00\x30", 10 + 0x30 + 4),
    ],
)
def test_need_more_counts(data: bytes, needed: int) -> None:
    assert parse_client_hello(data) == NeedMore(needed)


def test_too_large_from_the_first_record_header() -> None:
    assert parse_client_hello(b"\x16\x03\x01\x40\x00", max_size=1000) == TooLarge(16389)


def test_too_large_from_the_handshake_length() -> None:
    # A 100-byte record, but the message it starts is 64 KiB: the rest cannot fit.
    head = b"\x16\x03\x01\x00\x64" + b"\x01\x01\x00\x00"
    assert parse_client_hello(head, max_size=1000) == TooLarge(10 + 0x10004)
    assert parse_client_hello(head, max_size=0x10004 + 10) == NeedMore(10 + 0x10004)


def test_too_large_once_a_whole_record_shows_it() -> None:
    # The first record is whole and names the message length; whatever comes next (an
    # alert here) is not looked at, since the rest could not fit anyway.
    message = handshake(hello_body())
    first = record(message[:50])
    needed = len(first) + 5 + len(message) - 50
    assert parse_client_hello(first, max_size=needed - 1) == TooLarge(needed)
    alert = record(b"\x02\x28", content_type=21)
    assert parse_client_hello(first + alert, max_size=needed - 1) == TooLarge(needed)


def test_too_large_at_a_later_record_header() -> None:
    split = records(unwrap(TLS12_HELLO), [100])
    assert parse_client_hello(split[:110], max_size=len(split) - 1) == TooLarge(len(split))


def test_too_large_stays_too_large_once_said() -> None:
    # The header's record (100 bytes) is over max_size before the handshake length shows
    # the record running past the hello: too large it is, for every longer prefix too.
    stream = record(handshake(hello_body())[:4] + bytes(96))
    for k in range(5, len(stream) + 1):
        assert parse_client_hello(stream[:k], max_size=50) == TooLarge(105), k


def test_max_size_is_inclusive() -> None:
    assert parsed(TLS12_HELLO) == parse_client_hello(TLS12_HELLO, max_size=len(TLS12_HELLO))
    assert parse_client_hello(TLS12_HELLO, max_size=len(TLS12_HELLO) - 1) == TooLarge(
        len(TLS12_HELLO)
    )


def test_default_max_takes_a_full_record_and_no_more() -> None:
    def padded(record_length: int) -> bytes:
        filler = record_length - len(handshake(hello_body(extension(21, b""))))
        return client_hello(extension(21, bytes(filler)))

    assert isinstance(parse_client_hello(padded(2**14)), ClientHello)
    # one byte more takes a second record, header included
    assert parse_client_hello(padded(2**14 + 1)) == TooLarge(2**14 + 1 + 10)
    # or a longer record, which the header alone shows
    assert parse_client_hello(b"\x16\x03\x01\x40\x01") == TooLarge(2**14 + 1 + 5)


def test_the_longest_record_is_allowed() -> None:
    header = b"\x16\x03\x01" + MAX_RECORD_LENGTH.to_bytes(2, "big")
    assert parse_client_hello(header, max_size=2**15) == NeedMore(5 + MAX_RECORD_LENGTH)


# --- refusals ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"G", "not a TLS record: first byte b'G'"),
        (b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", "not a TLS record"),
        (b"\x80", "SSLv2"),
        # An SSLv2-compatible ClientHello as old clients sent it.
        (b"\x80\x2e\x01\x03\x01\x00\x15\x00\x00\x00\x10", "SSLv2"),
        (b"\x15\x03\x03\x00\x02\x02\x28", "alert"),
        (b"\x17", "application_data"),
        (b"\x14\x03\x03\x00\x01\x01", "change_cipher_spec"),
        (b"\x16\x02", "major byte is 2"),
        (b"\x16\x00\x01\x00\x10", "major byte is 0"),
    ],
)
def test_not_tls(data: bytes, reason: str) -> None:
    result = parse_client_hello(data)
    assert isinstance(result, NotTls), result
    assert reason in result.reason


def _one_record(body: bytes) -> bytes:
    return record(handshake(body))


def _in_two(second: bytes) -> bytes:
    """A hello whose message is cut after 10 bytes, `second` standing for the record
    that should carry the rest."""
    message = handshake(hello_body(server_name("a.example")))
    return record(message[:10]) + second + record(message[10:])


# legacy_version, random, empty session id, 3 bytes of cipher suites, null compression
ODD_SUITES_BODY = b"\x03\x03" + bytes(32) + b"\x00" + vector(2, b"\x13\x01\x13") + b"\x01\x00"

MALFORMED = {
    # records
    "record-length-0": (b"\x16\x03\x01\x00\x00", "record length 0"),
    "record-too-long": (b"\x16\x03\x01\x41\x01", "record length 16641"),
    "not-client-hello": (b"\x16\x03\x01\x00\x30\x02", "type 2, not ClientHello"),
    "alert-in-the-middle": (_in_two(record(b"\x02\x28", content_type=21)), "alert record inside"),
    "unknown-in-the-middle": (_in_two(b"\x63"), "type 99 record inside"),
    "later-record-version": (_in_two(b"\x16\x02"), "major byte is 2"),
    "longer-than-the-hello": (
        record(handshake(hello_body()) + b"\x01\x00\x00\x00"),
        "record boundary",
    ),
    "second-record-past-the-hello": (
        records(handshake(hello_body()) + b"\x00", [10]),
        "record boundary",
    ),
    # the body
    "body-truncated": (record(handshake(hello_body()[:40])), "overruns"),
    "session-id-33": (_one_record(hello_body(session_id=bytes(33))), "longer than 32"),
    "cipher-suites-odd": (record(handshake(ODD_SUITES_BODY)), "cipher_suites of 3"),
    "cipher-suites-empty": (_one_record(hello_body(cipher_suites=())), "cipher_suites of 0"),
    "no-compression": (_one_record(hello_body(compression=b"")), "no legacy_compression_methods"),
    "stray-after-extensions": (
        record(handshake(hello_body(extensions_block=vector(2, b"") + b"\x00"))),
        "stray bytes after the extensions",
    ),
    "extensions-overrun": (
        record(handshake(hello_body(extensions_block=b"\x00\x09\x00\x00\x00\x00"))),
        "extensions overruns",
    ),
    "extension-header-cut": (
        record(handshake(hello_body(extensions_block=b"\x00\x03\x00\x00\x00"))),
        "extension header overruns",
    ),
    "extension-overrun": (
        record(handshake(hello_body(extensions_block=b"\x00\x04\x00\x00\x00\x09"))),
        "extension 0x0000 overruns",
    ),
    "duplicate-extension": (
        client_hello(alpn("h2"), server_name("a.example"), alpn("h2")),
        "extension 0x0010 appears twice",
    ),
    "duplicate-unknown-extension": (
        client_hello(extension(0x4469, b""), extension(0x4469, b"x")),
        "0x4469 appears twice",
    ),
    # server_name
    "sni-empty-extension": (client_hello(extension(0, b"")), "server_name list overruns"),
    "sni-empty-list": (client_hello(extension(0, b"\x00\x00")), "empty server_name list"),
    "sni-list-overrun": (client_hello(extension(0, b"\x00\x09\x00\x00\x01a")), "overruns"),
    "sni-stray": (client_hello(extension(0, vector(2, b"\x00\x00\x01a") + b"!")), "stray"),
    "sni-entry-overrun": (
        client_hello(extension(0, vector(2, b"\x00\x00\x05a"))),
        "entry overruns",
    ),
    "two-host-names": (client_hello(server_name("a.example", "b.example")), "two host_names"),
    "host-name-empty": (client_hello(server_name(b"")), "empty host_name"),
    "host-name-dot": (client_hello(server_name(b".")), "empty host_name"),
    "host-name-nul": (client_hello(server_name(b"a\x00.example")), "not printable ASCII"),
    "host-name-utf8": (client_hello(server_name("é.example".encode())), "not printable ASCII"),
    "host-name-space": (client_hello(server_name(b"a example")), "not printable ASCII"),
    "host-name-control": (client_hello(server_name(b"a\r\nexample")), "not printable ASCII"),
    # ALPN
    "alpn-empty-list": (client_hello(extension(16, b"\x00\x00")), "empty ALPN list"),
    "alpn-empty-name": (client_hello(extension(16, b"\x00\x04\x02h2\x00")), "empty ALPN protocol"),
    "alpn-overrun": (client_hello(extension(16, b"\x00\x03\x05h2")), "ALPN protocol overruns"),
    # supported_versions
    "versions-empty": (client_hello(extension(SUPPORTED_VERSIONS, b"\x00")), "empty supported"),
    "versions-odd": (client_hello(extension(SUPPORTED_VERSIONS, b"\x03\x03\x04\x03")), "odd"),
    "versions-stray": (client_hello(extension(SUPPORTED_VERSIONS, b"\x02\x03\x04\x00")), "stray"),
}


@pytest.mark.parametrize(("data", "reason"), list(MALFORMED.values()), ids=list(MALFORMED))
def test_malformed(data: bytes, reason: str) -> None:
    result = parse_client_hello(data)
    assert isinstance(result, Malformed), result
    assert reason in result.reason, result.reason


@pytest.mark.parametrize(("data", "reason"), list(MALFORMED.values()), ids=list(MALFORMED))
def test_malformed_is_final_for_longer_input(data: bytes, reason: str) -> None:
    assert parse_client_hello(data + b"\x16\x03\x01\x00\x01\x01") == parse_client_hello(data)


def test_malformed_as_soon_as_the_bytes_show_it() -> None:
    assert isinstance(parse_client_hello(b"\x16\x03\x01\x00\x30\x02"), Malformed)
    assert isinstance(parse_client_hello(b"\x16\x03\x01\x00\x00"), Malformed)
    assert isinstance(parse_client_hello(_in_two(b"\x17")[:16]), Malformed)


# --- properties -------------------------------------------------------------------------


def _check_prefixes(data: bytes, max_size: int = DEFAULT_MAX_HELLO) -> HelloResult:
    """Parse every prefix: NeedMore grows and asks for more than it has, and once a
    prefix gets a final answer every longer one gets the same kind."""
    last: HelloResult = NeedMore(0)
    for k in range(len(data) + 1):
        result = parse_client_hello(data[:k], max_size)
        assert isinstance(result, RESULTS)
        if isinstance(last, NeedMore):
            if isinstance(result, NeedMore):
                assert k < result.needed and result.needed >= last.needed, (k, result, last)
        elif isinstance(last, ClientHello | TooLarge):
            assert type(result) is type(last), (k, result, last)
        else:
            assert result == last, (k, result, last)
        last = result
    return last


@PROPERTY
@given(st.binary(max_size=300))
def test_any_bytes(data: bytes) -> None:
    _check_prefixes(data)


@PROPERTY
@given(st.binary(max_size=200), st.integers(0, 0x4200), st.integers(0, 12))
def test_any_bytes_behind_a_handshake_header(data: bytes, length: int, max_log: int) -> None:
    stream = b"\x16\x03\x01" + length.to_bytes(2, "big") + b"\x01" + data
    _check_prefixes(stream, max_size=5 + 2**max_log)


@PROPERTY
@given(
    st.sampled_from([*REAL_HELLOS, BIG_KEY_SHARE_HELLO]),
    st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), min_size=1, max_size=4),
)
def test_mutated_real_hellos(stream: bytes, changes: list[tuple[int, int]]) -> None:
    mutated = bytearray(stream)
    for where, value in changes:
        mutated[where % len(mutated)] = value
    result = parse_client_hello(bytes(mutated))
    assert isinstance(result, RESULTS)
    if isinstance(result, ClientHello):
        assert result.size <= len(mutated)


@PROPERTY
@given(
    st.sampled_from([*REAL_HELLOS, BIG_KEY_SHARE_HELLO]),
    st.lists(st.integers(1, 700), max_size=12),
)
def test_random_record_splits_give_the_same_hello(stream: bytes, sizes: list[int]) -> None:
    split = records(unwrap(stream), sizes)
    expected = {**_fields(parsed(stream)), "size": len(split)}
    assert _fields(parsed(split)) == expected
    # a lower bound for every prefix, so waiting for it never waits past the hello
    for k in range(0, len(split), 7):
        result = parse_client_hello(split[:k])
        assert isinstance(result, NeedMore) and k < result.needed <= len(split)
