"""The ClientHello peek of a real relay, fed hand-built hellos on raw sockets.

Behind the relay's TLS-routing listener are plain TCP upstreams that say who they are
(a tag) and echo what they get: the relay never terminates TLS, so a hello built by
hand (tests/support/tls_hello_builder.py) routes like a real one, and the echo shows
that it reached the upstream byte for byte. Every bad hello must close the connection,
count its `tls_inspect_failed` reason under the listen address, leave no traceback,
and leave the relay serving the next client. Then the zero-copy promise: a gigabyte of
real TLS through an SNI route with `path="copy"` at 0.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from tests.support.harness import Relay, RelayFactory, free_port, poll_until
from tests.support.tls_hello_builder import (
    TLS12,
    TLS13,
    X25519,
    X25519MLKEM768,
    alpn,
    client_hello,
    handshake,
    hello_body,
    key_share,
    record,
    records,
    server_name,
    supported_versions,
)
from tests.support.tls_peers import make_cert, python_tls_sink, require_openssl, send_to_sink

WAIT = 10.0  # bound on every wait for the relay to show a state
GiB = 1 << 30


@dataclass
class TaggedEcho:
    """A TCP upstream that sends `tag` first, then echoes until the client's EOF."""

    tag: bytes
    port: int = 0
    accepted: int = 0
    listener: socket.socket = field(default_factory=socket.socket)


@contextlib.contextmanager
def tagged_echo(tag: bytes) -> Iterator[TaggedEcho]:
    server = TaggedEcho(tag)
    server.listener.bind(("127.0.0.1", 0))
    server.listener.listen(64)
    server.listener.settimeout(0.2)
    server.port = server.listener.getsockname()[1]
    stop = threading.Event()

    def serve(conn: socket.socket) -> None:
        with conn:
            conn.settimeout(WAIT)
            try:
                conn.sendall(tag)
                while data := conn.recv(65536):
                    conn.sendall(data)
                conn.shutdown(socket.SHUT_WR)
            except OSError:
                pass  # a reset from the relay ends this connection, not the test

    def accept_loop() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.listener.accept()
            except TimeoutError:
                continue
            server.accepted += 1
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    thread = threading.Thread(target=accept_loop, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        stop.set()
        thread.join(timeout=5)
        server.listener.close()


@dataclass
class Setup:
    relay: Relay
    port: int  # the TLS-routing listener
    a: TaggedEcho  # a.test
    b: TaggedEcho  # b.test

    @property
    def listener(self) -> str:
        """The route label of connections that no route took."""
        return f"127.0.0.1:{self.port}"

    def failures(self, reason: str) -> float:
        return self.relay.metrics().get(
            "splicerelay_connections_total",
            default=0.0,
            route=self.listener,
            outcome="tls_inspect_failed",
            reason=reason,
        )

    def wait_failure(self, reason: str, count: int = 1) -> None:
        poll_until(
            lambda: self.failures(reason) == count, WAIT, f"{count} tls_inspect_failed {reason}"
        )

    def failed_lines(self) -> list[dict[str, object]]:
        """The access lines of connections whose inspection failed."""
        entries = [json.loads(line) for line in self.relay.stdout().splitlines() if line]
        return [entry for entry in entries if entry.get("outcome") == "tls_inspect_failed"]


@pytest.fixture
def upstreams() -> Iterator[tuple[TaggedEcho, TaggedEcho]]:
    with tagged_echo(b"A:") as a, tagged_echo(b"B:") as b:
        yield a, b


def start(
    relay_factory: RelayFactory, upstreams: tuple[TaggedEcho, TaggedEcho], defaults: str = ""
) -> Setup:
    """A relay whose listener sends a.test and b.test to their tagged echoes, with
    `defaults` (e.g. the inspect limits) under `defaults:`; no fallback."""
    a, b = upstreams
    port = free_port()
    config = (
        "metrics:\n"
        "  listen: 127.0.0.1:{metrics_port}\n"
        "log: {level: info, format: json, access_log: true}\n"
        "shutdown_timeout: 5s\n"
        f"defaults:\n  connect_timeout: 5s\n{defaults}"
        "routes:\n"
        "  - name: a\n"
        f"    listen: 127.0.0.1:{port}\n"
        "    match: {sni: [a.test]}\n"
        f"    upstreams: [{{address: 127.0.0.1:{a.port}}}]\n"
        "  - name: b\n"
        f"    listen: 127.0.0.1:{port}\n"
        "    match: {sni: [b.test]}\n"
        f"    upstreams: [{{address: 127.0.0.1:{b.port}}}]\n"
    )
    return Setup(relay_factory.start(config), port, a, b)


def connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=WAIT)
    # Each send its own segment: the relay must see the pieces as they come.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def read_to_eof(sock: socket.socket) -> bytes:
    """Everything until the relay closes; a reset counts as closed."""
    data = b""
    with contextlib.suppress(ConnectionResetError):
        while chunk := sock.recv(65536):
            data += chunk
    return data


def exchange(port: int, pieces: list[bytes], pause: float = 0.0) -> bytes:
    """Send `pieces` (with `pause` between them), then EOF; return all that came back."""
    with connect(port) as sock:
        for index, piece in enumerate(pieces):
            if index and pause:
                time.sleep(pause)  # the pacing under test, not a wait for a state
            sock.sendall(piece)
        sock.shutdown(socket.SHUT_WR)
        return read_to_eof(sock)


def good_hello(name: str = "a.test") -> bytes:
    return client_hello(
        server_name(name),
        alpn("h2", "http/1.1"),
        supported_versions(TLS13, TLS12),
        key_share((X25519, 32)),
    )


def assert_still_serving(setup: Setup) -> None:
    """A good client right after: routed, its hello and payload echoed intact."""
    hello = good_hello("b.test")
    assert exchange(setup.port, [hello + b"after"]) == b"B:" + hello + b"after"


def assert_clean(setup: Setup) -> None:
    assert "Traceback" not in setup.relay.stderr()
    assert setup.relay.metrics().get("splicerelay_bytes_total", path="copy") == 0


# --- hellos that must route ---------------------------------------------------------


def test_a_hello_fragmented_across_records_routes_and_arrives_intact(
    relay_factory: RelayFactory, upstreams: tuple[TaggedEcho, TaggedEcho]
) -> None:
    setup = start(relay_factory, upstreams)
    message = handshake(
        hello_body(server_name("a.test"), alpn("h2"), key_share((X25519MLKEM768, 1216)))
    )
    for sizes in (40, [1, 2, 3, 4], [4, 2000], 1):
        stream = records(message, sizes)
        assert stream.count(bytes([22, 3, 1])) > 1  # more than one record
        # All at once, and one record per segment.
        assert exchange(setup.port, [stream + b"data"]) == b"A:" + stream + b"data"
    stream = records(message, 100)
    pieces = [stream[offset : offset + 105] for offset in range(0, len(stream), 105)]
    assert exchange(setup.port, [*pieces, b"data"], pause=0.005) == b"A:" + stream + b"data"
    assert setup.relay.metrics().get(
        "splicerelay_connections_total", route="a", outcome="completed"
    ) == pytest.approx(5)
    assert_clean(setup)


def test_a_hello_trickled_one_byte_at_a_time_routes(
    relay_factory: RelayFactory, upstreams: tuple[TaggedEcho, TaggedEcho]
) -> None:
    setup = start(relay_factory, upstreams)
    hello = good_hello("b.test")
    pieces = [hello[index : index + 1] for index in range(len(hello))]
    assert exchange(setup.port, [*pieces, b"tail"], pause=0.002) == b"B:" + hello + b"tail"
    assert_clean(setup)


def cpu_seconds(pid: int) -> float:
    """utime + stime of process `pid` (all its threads), from /proc/PID/stat."""
    with open(f"/proc/{pid}/stat") as file:
        fields = file.read().rsplit(")", 1)[1].split()
    # Fields 14 and 15 of stat(5); the split starts at field 3 (state).
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def sleeps(pid: int) -> int:
    """How often the threads of process `pid` went to sleep (voluntary context
    switches): each time the relay waits and is woken counts one."""
    total = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        status = f"/proc/{pid}/task/{task}/status"
        with contextlib.suppress(FileNotFoundError), open(status) as file:
            for line in file:
                if line.startswith("voluntary_ctxt_switches:"):
                    total += int(line.split()[1])
    return total


TRICKLE_PAUSE = 0.1
TRICKLED = 30  # bytes, one per TRICKLE_PAUSE: 3 s


def test_a_hello_trickled_for_seconds_costs_the_relay_almost_no_cpu(
    relay_factory: RelayFactory, upstreams: tuple[TaggedEcho, TaggedEcho]
) -> None:
    """One byte per 100 ms for 3 s.

    The peek consumes nothing, so the socket stays readable (level-triggered) from the
    first byte on: a relay that simply waited for "readable" again would wake at once,
    every time, for the same bytes, and spin a core for the whole 3 s, about 3 s of CPU
    (measured so, on purpose, at 2.8 s): the CPU bound catches that. With SO_RCVLOWAT set
    to the bytes still needed, the kernel wakes it once the record header is in and once
    the hello is whole, and it sleeps in between: a few milliseconds of CPU, and about as
    many wake-ups as an idle relay has of its own in that time. A relay that left
    SO_RCVLOWAT alone but paused between looks (no busy loop, yet no SO_RCVLOWAT) would
    wake tens of times a second: the bound on sleeps catches that (measured: about 45
    in 3 s with SO_RCVLOWAT, 185 without).
    """
    setup = start(relay_factory, upstreams, "  tls_inspect_timeout: 20s\n")
    pid = setup.relay.pid
    hello = good_hello("a.test")
    # The relay's own wake-ups when no client is there, for as long as the trickle.
    idle_before = sleeps(pid)
    time.sleep(TRICKLED * TRICKLE_PAUSE)  # a measured interval, not a wait for a state
    idle = sleeps(pid) - idle_before
    with connect(setup.port) as sock:
        sock.sendall(hello[:1])
        cpu_before, sleeps_before = cpu_seconds(pid), sleeps(pid)
        started = time.monotonic()
        for index in range(1, TRICKLED):
            time.sleep(TRICKLE_PAUSE)  # the pacing under test
            sock.sendall(hello[index : index + 1])
        spent = cpu_seconds(pid) - cpu_before
        woken = sleeps(pid) - sleeps_before
        elapsed = time.monotonic() - started
        sock.sendall(hello[TRICKLED:] + b"end")
        sock.shutdown(socket.SHUT_WR)
        assert read_to_eof(sock) == b"A:" + hello + b"end"
    assert elapsed >= (TRICKLED - 1) * TRICKLE_PAUSE
    assert spent < 0.3, f"the relay used {spent:.2f}s of CPU while a hello trickled in"
    # One wake-up per byte would already be TRICKLED more; a timer of 20 ms, 150 more.
    assert woken < idle + TRICKLED, f"{woken} wake-ups while trickling, {idle} idle"
    assert_clean(setup)


# --- hellos that must fail ---------------------------------------------------------


def sslv2_hello() -> bytes:
    """An SSLv2-compatible CLIENT-HELLO (RFC 5246 E.2): a 2-byte header with the high
    bit set, then msg_type 1 and version 3.1."""
    body = bytes([1, 3, 1]) + (3).to_bytes(2, "big") + (0).to_bytes(2, "big")
    body += (16).to_bytes(2, "big") + b"\x00\x00\x2f" + bytes(range(16))
    return bytes([0x80 | (len(body) >> 8), len(body) & 0xFF]) + body


def assert_closed_unrouted(setup: Setup, sock: socket.socket) -> None:
    """The relay closed `sock` without a byte from any upstream, and none was asked."""
    assert read_to_eof(sock) == b""
    assert (setup.a.accepted, setup.b.accepted) == (0, 0)


@pytest.mark.parametrize(
    ("first_bytes", "reason"),
    [
        pytest.param(b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n", "not_tls", id="http"),
        pytest.param(sslv2_hello(), "not_tls", id="sslv2"),
        pytest.param(record(b"\x02\x28", content_type=21), "not_tls", id="alert-record"),
        pytest.param(
            client_hello(server_name("a.test"), server_name("b.test")),
            "malformed",
            id="duplicate-extension",
        ),
    ],
)
def test_bytes_that_are_no_valid_hello_are_closed_and_counted(
    relay_factory: RelayFactory,
    upstreams: tuple[TaggedEcho, TaggedEcho],
    first_bytes: bytes,
    reason: str,
) -> None:
    setup = start(relay_factory, upstreams)
    with connect(setup.port) as sock:
        # No EOF from the client: the relay closes on what it saw.
        sock.sendall(first_bytes)
        assert_closed_unrouted(setup, sock)
    setup.wait_failure(reason)
    # Its access line says why, under the listener (written within 50 ms).
    poll_until(lambda: setup.failed_lines(), WAIT, "the access line of the failed inspection")
    [entry] = setup.failed_lines()
    assert (entry["route"], entry["tls_error"], entry["sni"]) == (setup.listener, reason, None)
    assert_still_serving(setup)
    assert_clean(setup)


def test_a_hello_over_tls_max_client_hello_is_too_large(
    relay_factory: RelayFactory, upstreams: tuple[TaggedEcho, TaggedEcho]
) -> None:
    setup = start(relay_factory, upstreams, "  tls_max_client_hello: 512B\n")
    # A post-quantum key share takes the hello past 1.2 KB.
    big = client_hello(server_name("a.test"), key_share((X25519MLKEM768, 1216)))
    assert len(big) > 1200
    with connect(setup.port) as sock:
        sock.sendall(big)
        assert_closed_unrouted(setup, sock)
    setup.wait_failure("too_large")
    # Only the record header says it: the first 5 bytes are enough to refuse it.
    with connect(setup.port) as sock:
        sock.sendall(big[:5])
        assert_closed_unrouted(setup, sock)
    setup.wait_failure("too_large", 2)
    assert len(good_hello("b.test")) < 512
    assert_still_serving(setup)
    assert_clean(setup)


@pytest.mark.parametrize(
    "cut", [1, 5, -10, -1], ids=["one-byte", "record-header", "all-but-10", "all-but-1"]
)
def test_a_hello_cut_short_then_closed_is_truncated(
    relay_factory: RelayFactory, upstreams: tuple[TaggedEcho, TaggedEcho], cut: int
) -> None:
    setup = start(relay_factory, upstreams)
    hello = good_hello("a.test")
    with connect(setup.port) as sock:
        sock.sendall(hello[:cut])
        sock.shutdown(socket.SHUT_WR)
        assert_closed_unrouted(setup, sock)
    setup.wait_failure("truncated")
    assert setup.failures("timeout") == 0
    assert_still_serving(setup)
    assert_clean(setup)


@pytest.mark.parametrize("sent", [b"", b"\x16\x03\x01"], ids=["silent", "partial"])
def test_a_client_that_stalls_is_closed_at_tls_inspect_timeout(
    relay_factory: RelayFactory, upstreams: tuple[TaggedEcho, TaggedEcho], sent: bytes
) -> None:
    setup = start(relay_factory, upstreams, "  tls_inspect_timeout: 400ms\n")
    with connect(setup.port) as sock:
        started = time.monotonic()
        sock.sendall(sent)
        assert_closed_unrouted(setup, sock)
        waited = time.monotonic() - started
    assert 0.35 <= waited < 5, waited
    setup.wait_failure("timeout")
    assert_still_serving(setup)
    assert_clean(setup)


def test_500_clients_stalled_halfway_through_their_hello_do_not_delay_a_valid_one(
    relay_factory: RelayFactory, upstreams: tuple[TaggedEcho, TaggedEcho]
) -> None:
    """Each stalled client waits in a peek of its own: none holds up the accept loop or
    another client's hello."""
    setup = start(relay_factory, upstreams)
    hello = good_hello("a.test")
    stalled: list[socket.socket] = []
    try:
        for _ in range(500):
            sock = connect(setup.port)
            stalled.append(sock)
            sock.sendall(hello[: len(hello) // 2])
        poll_until(
            lambda: setup.relay.metrics().get("splicerelay_connections_active") >= 500,
            WAIT,
            "the relay to hold the 500 stalled clients",
        )
        started = time.monotonic()
        assert_still_serving(setup)
        took = time.monotonic() - started
        # A valid client's hello is read at once: well under any inspect wait.
        assert took < 1.0, f"a valid client took {took:.2f}s behind 500 stalled ones"
    finally:
        for sock in stalled:
            sock.close()
    setup.wait_failure("truncated", 500)
    assert (setup.a.accepted, setup.b.accepted) == (0, 1)
    assert_clean(setup)


def test_every_reason_is_exported_from_zero(
    relay_factory: RelayFactory, upstreams: tuple[TaggedEcho, TaggedEcho]
) -> None:
    setup = start(relay_factory, upstreams)
    metrics = setup.relay.metrics()
    for reason in ("timeout", "not_tls", "too_large", "malformed", "truncated"):
        assert (
            metrics.get(
                "splicerelay_connections_total",
                route=setup.listener,
                outcome="tls_inspect_failed",
                reason=reason,
            )
            == 0
        )
    assert (
        metrics.get(
            "splicerelay_connections_total", route=setup.listener, outcome="no_route", reason=""
        )
        == 0
    )


# --- zero copy ---------------------------------------------------------------------


def test_a_gigabyte_of_real_tls_through_an_sni_route_is_all_spliced(
    relay_factory: RelayFactory, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Python's ssl on both ends: the relay peeks at the real hello, routes by it, and
    splices every byte, the hello included (`path="copy"` stays 0), sha256 end to end."""
    require_openssl()
    cert = make_cert(tmp_path_factory.mktemp("bulk"), "bulk", ["bulk.test"])
    with python_tls_sink(cert) as (sink_port, results):
        port = free_port()
        relay = relay_factory.start(
            "metrics:\n"
            "  listen: 127.0.0.1:{metrics_port}\n"
            "log: {level: info, format: json, access_log: true}\n"
            "shutdown_timeout: 5s\n"
            "routes:\n"
            "  - name: bulk\n"
            f"    listen: 127.0.0.1:{port}\n"
            "    match: {sni: [bulk.test]}\n"
            f"    upstreams: [{{address: 127.0.0.1:{sink_port}}}]\n"
        )
        der, sent, answer = send_to_sink(port, "bulk.test", GiB)
        assert der == cert.der()
        assert sent.count == GiB
        assert answer == sent.digest
        assert [(result.count, result.digest) for result in results] == [(GiB, sent.digest)]
        relay.wait_settled()
    metrics = relay.metrics()
    assert metrics.get("splicerelay_bytes_total", path="copy") == 0
    spliced = metrics.get(
        "splicerelay_bytes_total", route="bulk", direction="client_to_upstream", path="splice"
    )
    assert spliced > GiB  # the hello and TLS framing on top of the payload
    assert metrics.get("splicerelay_connections_total", route="bulk", outcome="completed") == 1
