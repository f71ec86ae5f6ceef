"""Routing TLS by name through a real relay, with real TLS on both ends.

Four `openssl s_server` upstreams, each with a certificate of its own (subject CN = its
name) and a body naming it, sit behind one relay listener that routes by ClientHello;
curl, `openssl s_client` and Python's ssl connect through it, and each test checks which
backend answered by the certificate the client saw and by the body. A second listener
has no fallback route. Nothing on the happy path is a hand-made handshake.
"""

from __future__ import annotations

import ipaddress
import json
import socket
import ssl
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.support.access_log import json_entries
from tests.support.ctl import splicerelay
from tests.support.harness import Relay, RelayFactory, free_port, poll_until
from tests.support.logfmt import text_line_fields
from tests.support.tls_hello_builder import python_client_hello, unwrap
from tests.support.tls_peers import (
    Answer,
    TlsBackend,
    client_context,
    curl_get,
    openssl_backend,
    python_get,
    require_curl,
    s_client_answer,
    s_client_get,
)

pytestmark = pytest.mark.peer
WAIT = 10.0


@dataclass(frozen=True)
class Backends:
    a: TlsBackend  # a.test and *.w.test
    b: TlsBackend  # b.test and x.w.test (exact beats the wildcard)
    api: TlsBackend  # api.test, only with alpn h2
    fallback: TlsBackend  # anything else on the shared listener


@pytest.fixture(scope="module")
def backends(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Backends]:
    directory = tmp_path_factory.mktemp("tls-backends")
    with (
        openssl_backend(directory, "backend-a", ["a.test", "*.w.test"]) as a,
        openssl_backend(directory, "backend-b", ["b.test", "x.w.test"]) as b,
        openssl_backend(directory, "backend-api", ["api.test"]) as api,
        openssl_backend(directory, "backend-fallback", ["fallback.test"]) as fallback,
    ):
        yield Backends(a, b, api, fallback)


@dataclass(frozen=True)
class Listeners:
    shared: int  # app-a, app-b, api and the fallback
    strict: int  # only a.test, no fallback

    @property
    def strict_route(self) -> str:
        """The route label of connections that no route on `strict` took."""
        return f"127.0.0.1:{self.strict}"


def routes_config(
    backends: Backends, listeners: Listeners, *, log_format: str = "json", extra: str = ""
) -> str:
    """The relay's config; `extra` goes on every route of the shared listener."""
    shared = f"    listen: 127.0.0.1:{listeners.shared}\n{extra}"

    def upstream(backend: TlsBackend) -> str:
        return f"    upstreams: [{{address: 127.0.0.1:{backend.port}}}]\n"

    return (
        "metrics:\n"
        "  listen: 127.0.0.1:{metrics_port}\n"
        f"log: {{level: info, format: {log_format}, access_log: true}}\n"
        "shutdown_timeout: 5s\n"
        "routes:\n"
        "  - name: app-a\n"
        f"{shared}"
        '    match: {sni: [a.test, "*.w.test"]}\n'
        f"{upstream(backends.a)}"
        "  - name: app-b\n"
        f"{shared}"
        "    match: {sni: [b.test, x.w.test]}\n"
        f"{upstream(backends.b)}"
        "  - name: api\n"
        f"{shared}"
        "    match: {sni: [api.test], alpn: [h2]}\n"
        f"{upstream(backends.api)}"
        "  - name: fallback\n"
        f"{shared}"
        f"{upstream(backends.fallback)}"
        "  - name: strict\n"
        f"    listen: 127.0.0.1:{listeners.strict}\n"
        "    match: {sni: [a.test]}\n"
        f"{upstream(backends.a)}"
    )


def start(
    relay_factory: RelayFactory, backends: Backends, **options: str
) -> tuple[Relay, Listeners]:
    listeners = Listeners(free_port(), free_port())
    return relay_factory.start(routes_config(backends, listeners, **options)), listeners


def wait_lines(relay: Relay, count: int) -> None:
    """Wait until the relay has written `count` access lines.

    A line is written once its connection has ended on the relay, which may be a moment
    after the client is gone: a test that waits for each connection's line before the
    next client starts knows the order of the lines.
    """
    poll_until(lambda: len(relay.stdout().splitlines()) >= count, WAIT, f"{count} access lines")


def access_entries(relay: Relay, count: int) -> list[dict[str, Any]]:
    """The relay's access lines (JSON), once it has written `count`; no more came."""
    wait_lines(relay, count)
    entries = json_entries(relay.stdout().splitlines())
    assert len(entries) == count, entries
    return entries


def completed(relay: Relay, route: str) -> float:
    return relay.metrics().get(
        "splicerelay_connections_total", default=0.0, route=route, outcome="completed"
    )


def assert_hello_fields_follow_outcome(entry: dict[str, Any]) -> None:
    keys = list(entry)
    assert keys[keys.index("outcome") + 1 : keys.index("outcome") + 3] == ["sni", "alpn"], keys


# (name sent as SNI, the backend that must answer): exact names, the one-label wildcard,
# an exact name beating the wildcard, and names the wildcard must not take.
CURL_CASES = [
    ("a.test", "a"),
    ("b.test", "b"),
    ("y.w.test", "a"),  # *.w.test
    ("x.w.test", "b"),  # exact beats *.w.test
    ("deep.y.w.test", "fallback"),  # *.w.test matches one label only
    ("w.test", "fallback"),  # ... and not the bare domain
    ("unknown.test", "fallback"),
]


def test_curl_reaches_the_backend_of_each_name(
    relay_factory: RelayFactory, backends: Backends
) -> None:
    require_curl()
    relay, listeners = start(relay_factory, backends)
    for index, (name, which) in enumerate(CURL_CASES):
        backend: TlsBackend = getattr(backends, which)
        answer = curl_get(listeners.shared, name)
        assert (answer.subject, answer.body) == (backend.cert.name, backend.body), name
        wait_lines(relay, index + 1)
    metrics = relay.metrics()
    assert completed(relay, "app-a") == 2  # a.test, y.w.test
    assert completed(relay, "app-b") == 2  # b.test, x.w.test
    assert completed(relay, "fallback") == 3
    # The hello was peeked, not read: every byte, the hello's included, was spliced.
    assert metrics.get("splicerelay_bytes_total", path="copy") == 0
    assert metrics.get("splicerelay_bytes_total", path="splice", route="app-a") > 0
    entries = access_entries(relay, len(CURL_CASES))
    assert [(entry["sni"], entry["route"]) for entry in entries] == [
        (name, {"a": "app-a", "b": "app-b"}.get(which, which)) for name, which in CURL_CASES
    ]
    for entry in entries:
        assert entry["outcome"] == "completed"
        assert entry["alpn"] == ["h2", "http/1.1"]  # what curl offers by default
        assert_hello_fields_follow_outcome(entry)
    # Clients choose names: never a label.
    assert "unknown.test" not in relay.scrape_text()


# (SNI as s_client sends it, or None for -noservername; the backend that must answer)
S_CLIENT_CASES = [
    ("a.test", "a"),
    ("A.Test", "a"),  # names match without regard to case
    ("X.W.TEST", "b"),
    ("Y.w.Test", "a"),
    ("b.test", "b"),
    (None, "fallback"),  # no SNI at all
]


def test_s_client_reaches_the_backend_of_each_name(
    relay_factory: RelayFactory, backends: Backends
) -> None:
    relay, listeners = start(relay_factory, backends)
    for index, (servername, which) in enumerate(S_CLIENT_CASES):
        backend: TlsBackend = getattr(backends, which)
        answer = s_client_answer(listeners.shared, servername)
        assert (answer.subject, answer.body) == (backend.cert.name, backend.body), servername
        wait_lines(relay, index + 1)
    entries = access_entries(relay, len(S_CLIENT_CASES))
    # Logged as matched: in lower case (DNS names know no case), null without SNI.
    assert [entry["sni"] for entry in entries] == [
        None if name is None else name.lower() for name, _ in S_CLIENT_CASES
    ]
    assert entries[-1]["sni"] is None and entries[-1]["route"] == "fallback"
    assert all(entry["alpn"] == [] for entry in entries)  # s_client offers none by default
    assert relay.metrics().get("splicerelay_bytes_total", path="copy") == 0


def test_a_client_connecting_by_address_sends_no_sni_and_takes_the_fallback(
    relay_factory: RelayFactory, backends: Backends
) -> None:
    relay, listeners = start(relay_factory, backends)
    # A client that connects by IP address sends no SNI (RFC 6066 3).
    answer = python_get(listeners.shared, None, client_context())
    assert answer.der == backends.fallback.cert.der()
    assert answer.body == backends.fallback.body
    (entry,) = access_entries(relay, 1)
    assert (entry["route"], entry["sni"], entry["outcome"]) == ("fallback", None, "completed")


def test_alpn_decides_between_a_route_and_the_fallback(
    relay_factory: RelayFactory, backends: Backends
) -> None:
    require_curl()
    relay, listeners = start(relay_factory, backends)
    # api takes api.test only with h2 offered. The backend agrees on no protocol, so a
    # client offering h2 speaks HTTP/1.1 to it after all.
    cases: list[tuple[Callable[[], Answer], str, list[str]]] = [
        # curl --http2 offers h2,http/1.1
        (lambda: curl_get(listeners.shared, "api.test", "--http2"), "api", ["h2", "http/1.1"]),
        (lambda: curl_get(listeners.shared, "api.test", "--http1.1"), "fallback", ["http/1.1"]),
        (lambda: s_client_answer(listeners.shared, "api.test", ["h2"]), "api", ["h2"]),
        (
            lambda: s_client_answer(listeners.shared, "api.test", ["http/1.1"]),
            "fallback",
            ["http/1.1"],
        ),
        # The name without any ALPN at all is no match for api either.
        (lambda: s_client_answer(listeners.shared, "api.test"), "fallback", []),
    ]
    for index, (client, route, _) in enumerate(cases):
        backend: TlsBackend = getattr(backends, route)
        answer = client()
        assert (answer.subject, answer.body) == (backend.cert.name, backend.body), index
        wait_lines(relay, index + 1)
    entries = access_entries(relay, len(cases))
    assert [(entry["route"], entry["sni"], entry["alpn"]) for entry in entries] == [
        (route, "api.test", alpn) for _, route, alpn in cases
    ]
    assert completed(relay, "api") == 2
    assert completed(relay, "fallback") == 3


def test_an_unknown_name_without_fallback_is_closed_counted_and_logged(
    relay_factory: RelayFactory, backends: Backends
) -> None:
    relay, listeners = start(relay_factory, backends)
    result = s_client_get(listeners.strict, "nobody.test")
    # The relay closed the connection before any server answered: no certificate.
    assert result.returncode != 0
    assert "subject=" not in result.stdout
    wait_lines(relay, 1)
    with pytest.raises((ssl.SSLError, ConnectionError)):
        python_get(listeners.strict, "other.test", client_context(alpn=["h2"]))
    wait_lines(relay, 2)
    # The name the route knows goes through on the same listener.
    answer = s_client_answer(listeners.strict, "a.test")
    assert (answer.subject, answer.body) == (backends.a.cert.name, backends.a.body)
    entries = access_entries(relay, 3)

    metrics = relay.metrics()
    route = listeners.strict_route
    assert metrics.get("splicerelay_connections_total", route=route, outcome="no_route") == 2
    # The reason label is there, and empty, for every outcome but tls_inspect_failed.
    assert (
        metrics.get("splicerelay_connections_total", route=route, outcome="no_route", reason="")
        == 2
    )
    assert completed(relay, "strict") == 1
    text = relay.scrape_text()
    assert "nobody.test" not in text and "other.test" not in text
    assert [(e["route"], e["outcome"], e["sni"], e["alpn"]) for e in entries] == [
        (route, "no_route", "nobody.test", []),
        (route, "no_route", "other.test", ["h2"]),
        ("strict", "completed", "a.test", []),
    ]
    assert [entry["upstream"] for entry in entries[:2]] == [None, None]
    assert "Traceback" not in relay.stderr()


def test_text_access_lines_carry_sni_and_alpn(
    relay_factory: RelayFactory, backends: Backends
) -> None:
    require_curl()
    relay, listeners = start(relay_factory, backends, log_format="text")
    curl_get(listeners.shared, "a.test", "--http2")
    wait_lines(relay, 1)
    s_client_get(listeners.strict, "nobody.test")
    poll_until(lambda: len(relay.stdout().splitlines()) >= 2, WAIT, "two access lines")
    lines = relay.stdout().splitlines()
    fields = [text_line_fields(line, "connection") for line in lines]
    # As the README says: after outcome, the name, and the list as compact JSON.
    assert [(f["route"], f["outcome"], f["sni"]) for f in fields] == [
        ("app-a", "completed", "a.test"),
        (listeners.strict_route, "no_route", "nobody.test"),
    ]
    assert [json.loads(f["alpn"]) for f in fields] == [["h2", "http/1.1"], []]
    for line in lines:
        assert line.index(" outcome=") < line.index(" sni=") < line.index(" alpn=")


# Enough protocols and suites to take the hello past one Ethernet frame's worth.
MANY_PROTOCOLS = ["h2", "http/1.1", *(f"proto-{index:03d}" for index in range(130))]
MANY_CIPHERS = "ALL:@SECLEVEL=0"


def test_a_large_python_hello_in_one_segment_routes_by_its_name(
    relay_factory: RelayFactory, backends: Backends
) -> None:
    hello = python_client_hello("b.test", MANY_PROTOCOLS, ciphers=MANY_CIPHERS)
    # One record, over 1500 bytes: the client writes it at once, and on loopback (MTU
    # 64 KiB) it arrives as one segment that the relay sees whole at its first look.
    assert len(hello) > 1500
    assert len(unwrap(hello)) == len(hello) - 5
    relay, listeners = start(relay_factory, backends)
    context = client_context(alpn=MANY_PROTOCOLS, ciphers=MANY_CIPHERS)
    answer = python_get(listeners.shared, "b.test", context)
    assert (answer.der, answer.body) == (backends.b.cert.der(), backends.b.body)
    wait_lines(relay, 1)
    # TLS 1.2 only: the same, with the cipher suites of every kind.
    tls12 = python_get(
        listeners.shared, "y.w.test", client_context(MANY_PROTOCOLS, MANY_CIPHERS, tls12=True)
    )
    assert (tls12.der, tls12.body) == (backends.a.cert.der(), backends.a.body)
    entries = access_entries(relay, 2)
    assert [(entry["route"], entry["sni"]) for entry in entries] == [
        ("app-b", "b.test"),
        ("app-a", "y.w.test"),
    ]
    assert all(entry["alpn"] == MANY_PROTOCOLS for entry in entries)
    assert relay.metrics().get("splicerelay_bytes_total", path="copy") == 0


def proxy_v2_header(source: tuple[str, int], destination: tuple[str, int]) -> bytes:
    """A PROXY protocol v2 header (PROXY command, TCP over IPv4), built by hand."""
    addresses = (
        ipaddress.IPv4Address(source[0]).packed
        + ipaddress.IPv4Address(destination[0]).packed
        + struct.pack("!HH", source[1], destination[1])
    )
    signature = b"\r\n\r\n\x00\r\nQUIT\n"
    return signature + bytes([0x21, 0x11]) + struct.pack("!H", len(addresses)) + addresses


def test_with_accept_proxy_protocol_the_header_comes_first_then_the_hello(
    relay_factory: RelayFactory, backends: Backends
) -> None:
    relay, listeners = start(
        relay_factory,
        backends,
        extra="    accept_proxy_protocol: true\n    proxy_protocol_trusted: [127.0.0.1/32]\n",
    )
    header = proxy_v2_header(("203.0.113.7", 40123), ("198.51.100.1", 443))
    answer = python_get(listeners.shared, "b.test", client_context(), prefix=header)
    assert (answer.der, answer.body) == (backends.b.cert.der(), backends.b.body)
    wait_lines(relay, 1)
    answer = python_get(listeners.shared, None, client_context(), prefix=header)
    assert (answer.der, answer.body) == (backends.fallback.cert.der(), backends.fallback.body)
    wait_lines(relay, 2)
    # Without the header, the hello's first bytes are no PROXY header: refused.
    with pytest.raises((ssl.SSLError, ConnectionError)):
        python_get(listeners.shared, "b.test", client_context())
    entries = access_entries(relay, 3)
    assert [(e["route"], e["client"], e["sni"], e["outcome"]) for e in entries[:2]] == [
        ("app-b", "203.0.113.7:40123", "b.test", "completed"),
        ("fallback", "203.0.113.7:40123", None, "completed"),
    ]
    # Refused on the listener before any route was chosen: counted under its address.
    assert (entries[2]["route"], entries[2]["outcome"]) == (
        f"127.0.0.1:{listeners.shared}",
        "bad_proxy_header",
    )
    assert relay.metrics().get("splicerelay_bytes_total", path="copy") == 0


def test_check_prints_the_routing_table(tmp_path: Path, backends: Backends) -> None:
    listeners = Listeners(free_port(), free_port())
    path = tmp_path / "relay.yaml"
    path.write_text(routes_config(backends, listeners).replace("{metrics_port}", "9109"))
    result = splicerelay("check", "-c", str(path))
    assert result.returncode == 0, result.stderr
    shared, strict = listeners.shared, listeners.strict
    tables = (
        f"# listener 127.0.0.1:{shared} routes by TLS ClientHello"
        " (inspect timeout 5s, hello up to 16389B):\n"
        "#   a.test           -> app-a\n"
        "#   b.test           -> app-b\n"
        "#   x.w.test         -> app-b\n"
        "#   api.test alpn h2 -> api\n"
        "#   *.w.test         -> app-a\n"
        "#   anything else    -> fallback\n"
        f"# listener 127.0.0.1:{strict} routes by TLS ClientHello"
        " (inspect timeout 5s, hello up to 16389B):\n"
        "#   a.test        -> strict\n"
        "#   anything else -> closed (no_route)\n"
    )
    assert result.stdout.endswith(tables), result.stdout


def test_a_reset_mid_hello_costs_the_next_client_nothing(
    relay_factory: RelayFactory, backends: Backends
) -> None:
    """A client that resets halfway through its hello costs nothing to the next one."""
    require_curl()
    relay, listeners = start(relay_factory, backends)
    hello = python_client_hello("a.test")
    with socket.create_connection(("127.0.0.1", listeners.shared), timeout=WAIT) as raw:
        raw.sendall(hello[: len(hello) // 2])
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    # Counted under the listener, as its hello never came whole: truncated when the
    # relay saw the bytes and the end, client_reset when the reset came first.
    poll_until(
        lambda: (
            relay.metrics().get(
                "splicerelay_connections_total", route=f"127.0.0.1:{listeners.shared}"
            )
            == 1
        ),
        WAIT,
        "the reset to be counted under the listener",
    )
    (entry,) = access_entries(relay, 1)
    assert entry["outcome"] in ("tls_inspect_failed", "client_reset")
    answer = curl_get(listeners.shared, "a.test")
    assert (answer.subject, answer.body) == (backends.a.cert.name, backends.a.body)
    wait_lines(relay, 2)
    assert completed(relay, "app-a") == 1
    assert "Traceback" not in relay.stderr()
