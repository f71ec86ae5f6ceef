"""The access log of a real relay: no line lost on exit, on reload or in workers, a stalled
stdout costing neither relaying nor memory, and each line's fields.

The relay buffers lines and writes them without blocking after each reactor round
(splicerelay/ops/access_output.py). A regular file takes every write at once, so most
tests run twice: with stdout on a file, and on a small pipe that the test reads only
once the relay is stopping, so that lines are still waiting in the relay's buffer when
the signal comes and must be written on the way out. Connections are matched to their
lines by the client's port (a multiset: a port may come round again).
"""

from __future__ import annotations

import datetime
import json
import re
import signal
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import trio

from splicerelay.ops.access_output import BUFFER_LIMIT
from tests.support.access_log import (
    FIELDS,
    StdoutPipe,
    access_config,
    crowd,
    exit_code,
    json_entries,
    port_of,
    ports_logged,
    start_relay,
    stderr_entries,
    wait_for,
    whole_lines,
)
from tests.support.harness import Relay, RelayFactory, free_port, parse_metrics
from tests.support.logfmt import parse_logfmt
from tests.support.peers import echo, expected_transfer, receive_all, send_payload, start_server
from tests.support.scripted import bound_port, refusing_port

PAGE = 4096  # the smallest pipe: a few lines fill it and the rest wait in the relay
STDOUTS = ["file", "pipe", "socket"]
# Workers share one stdout. A pipe write of up to PIPE_BUF bytes is never split, and
# neither is a unix stream socket's send of whole lines that fits one of its buffers
# (journald's kind; see ops/access_output.atomic_send_size): their lines never mix.
WORKER_STDOUTS = ["file", "pipe", "socket"]


@pytest.fixture
def pipes() -> Iterator[list[StdoutPipe]]:
    """Pipes a test gives relays as stdout; closed after it."""
    made: list[StdoutPipe] = []
    yield made
    for pipe in made:
        pipe.close()


class Stdout:
    """A relay's stdout: a file, or a pipe or unix stream socket read only from
    `release` on."""

    def __init__(self, kind: str, pipes: list[StdoutPipe]) -> None:
        self.pipe = None if kind == "file" else StdoutPipe(PAGE, stream_socket=kind == "socket")
        if self.pipe is not None:
            pipes.append(self.pipe)
        self.relay: Relay | None = None

    async def start(self, factory: RelayFactory, config_text: str) -> Relay:
        if self.pipe is None:
            self.relay = await factory.astart(config_text)
        else:
            pipe = self.pipe
            self.relay = await trio.to_thread.run_sync(
                lambda: start_relay(factory, config_text, pipe)
            )
        return self.relay

    def release(self, slowly: bool = False) -> None:
        """From now on the pipe is read (see StdoutPipe.start_reading)."""
        if self.pipe is not None:
            self.pipe.start_reading(slowly)

    def check_waited(self, lines: list[str]) -> None:
        """With a pipe or socket, most lines were still in the relay when it was told to
        stop (the pipe holds a page or two): the test's premise."""
        if self.pipe is not None:
            assert sum(len(line) + 1 for line in lines) > 10 * PAGE

    def everything(self) -> list[str]:
        """Every line the relay wrote, once it has exited."""
        assert self.relay is not None
        if self.pipe is None:
            return whole_lines(self.relay.stdout_path.read_bytes())
        return whole_lines(self.pipe.wait_eof())


def one_line_each(logged: Counter[int], ports: list[int], kind: str = "access") -> None:
    """Every connection (by its client port) has exactly one line, and no other has."""
    expected = Counter(ports)
    missing, extra = expected - logged, logged - expected
    assert not missing and not extra, (
        f"{sum(missing.values())} of {len(ports)} connections without their {kind} line,"
        f" {sum(extra.values())} lines of others or twice"
    )


def said(relay: Relay, message: str) -> list[dict[str, Any]]:
    return [entry for entry in stderr_entries(relay) if entry.get("message") == message]


async def echo_held_open(port: int) -> tuple[trio.SocketStream, int]:
    """A connection through the relay that has relayed a first exchange and stays open."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    await stream.send_all(b"before")
    received = b""
    while len(received) < len(b"before") and (chunk := await stream.receive_some(64)):
        received += chunk
    assert received == b"before"
    return stream, int(stream.socket.getsockname()[1])


async def finish_held(stream: trio.SocketStream) -> None:
    await stream.send_all(b"after")
    await stream.send_eof()
    received = b""
    while chunk := await stream.receive_some(64):
        received += chunk
    assert received == b"after"
    await stream.aclose()


@pytest.mark.parametrize("stdout_kind", STDOUTS)
async def test_no_access_line_is_lost_on_sigterm(
    relay_factory: RelayFactory, pipes: list[StdoutPipe], stdout_kind: str
) -> None:
    """300 connections, SIGTERM as soon as the last has closed, and one connection that
    is still open then and ends during the drain: one line each, and exit 0."""
    stdout = Stdout(stdout_kind, pipes)
    async with trio.open_nursery() as nursery:
        upstream = await start_server(nursery, echo)
        listen = free_port()
        relay = await stdout.start(relay_factory, access_config(listen, upstream))
        held, held_port = await echo_held_open(listen)
        with trio.fail_after(60):
            ports = await crowd(listen, 300)
        relay.process.send_signal(signal.SIGTERM)
        await wait_for(lambda: bool(said(relay, "stopping")), "the relay to begin its drain")
        assert relay.process.poll() is None, "the relay did not wait for the open connection"
        await finish_held(held)
        stdout.release()
        assert await exit_code(relay) == 0, relay.stderr()
        nursery.cancel_scope.cancel()

    lines = stdout.everything()
    entries = json_entries(lines)
    one_line_each(ports_logged(entries), [*ports, held_port])
    stdout.check_waited(lines)
    (held_entry,) = [e for e in entries if port_of(e["client"]) == held_port]
    expected = len(b"before") + len(b"after")
    assert (held_entry["bytes_in"], held_entry["bytes_out"]) == (expected, expected)
    assert {entry["outcome"] for entry in entries} == {"completed"}
    assert not said(relay, "access log: the output did not take the last lines before exit")


def text_entry(line: str) -> dict[str, str]:
    """A text access line `TIME info connection k=v ...` as its fields, in order."""
    timestamp, level, message, rest = line.split(" ", 3)
    return {"time": timestamp, "level": level, "message": message, **parse_logfmt(rest)}


@pytest.mark.parametrize("stdout_kind", STDOUTS)
async def test_no_access_line_is_lost_when_a_reload_switches_json_to_text(
    relay_factory: RelayFactory, pipes: list[StdoutPipe], stdout_kind: str
) -> None:
    """Lines of connections that ended before the reload are JSON, even those still in
    the relay's buffer when the format changed (stdout on a pipe nobody reads yet);
    lines of connections that end after it are text, one that was open across it too."""
    stdout = Stdout(stdout_kind, pipes)
    async with trio.open_nursery() as nursery:
        upstream = await start_server(nursery, echo)
        listen = free_port()
        relay = await stdout.start(relay_factory, access_config(listen, upstream))
        spanning, spanning_port = await echo_held_open(listen)
        with trio.fail_after(60):
            before = await crowd(listen, 150)
        config = relay.config_path.read_text()
        assert "format: json" in config
        relay.config_path.write_text(config.replace("format: json", "format: text"))
        relay.process.send_signal(signal.SIGHUP)

        def reloaded() -> bool:
            return relay.metrics().get("splicerelay_config_reloads_total", result="success") == 1

        # Counted in the same step of the relay's loop that switches the format, before
        # any connection can end after it.
        await wait_for(reloaded, "the reload to be applied")
        with trio.fail_after(60):
            after = await crowd(listen, 150)
        await finish_held(spanning)
        stdout.release()
        relay.process.send_signal(signal.SIGTERM)
        assert await exit_code(relay) == 0, relay.stderr()
        nursery.cancel_scope.cancel()

    lines = stdout.everything()
    json_lines = [line for line in lines if line.startswith("{")]
    text_lines = [line for line in lines if not line.startswith("{")]
    one_line_each(ports_logged(json_entries(json_lines)), before, "JSON")
    text = [text_entry(line) for line in text_lines]
    assert all(entry["message"] == "connection" for entry in text), text_lines[:3]
    logged = Counter(port_of(entry["client"]) for entry in text)
    one_line_each(logged, [*after, spanning_port], "text")
    assert lines == json_lines + text_lines, "a JSON line came after a text line"
    stdout.check_waited(lines)


@pytest.mark.parametrize("stdout_kind", WORKER_STDOUTS)
async def test_workers_that_exit_cleanly_lose_no_access_line(
    relay_factory: RelayFactory, pipes: list[StdoutPipe], stdout_kind: str
) -> None:
    """`workers: 2` share one stdout: after SIGTERM to the supervisor, every connection
    has one whole line, tagged with the worker that relayed it."""
    stdout = Stdout(stdout_kind, pipes)
    async with trio.open_nursery() as nursery:
        upstream = await start_server(nursery, echo)
        listen = free_port()
        relay = await stdout.start(relay_factory, access_config(listen, upstream, workers=2))
        with trio.fail_after(60):
            ports = await crowd(listen, 800)
        relay.process.send_signal(signal.SIGTERM)
        stdout.release(slowly=True)  # both workers keep finding it full
        assert await exit_code(relay) == 0, relay.stderr()
        nursery.cancel_scope.cancel()

    lines = stdout.everything()
    entries = json_entries(lines)
    one_line_each(ports_logged(entries), ports)
    stdout.check_waited(lines)
    for entry in entries:
        assert tuple(entry) == (*FIELDS, "worker"), entry
        assert entry["worker"] in (0, 1), entry


# ----- a stalled stdout ---------------------------------------------------------------

# A long route name makes each line ~1.2 KB: a few hundred connections fill the pipe and
# the relay's buffer, and 3000 more would add several MiB if the buffer had no bound.
STALLED_ROUTE = "stalled_" + "x" * 1000
MORE = 3000
RSS_GROWTH_LIMIT = 2 << 20
TRANSFER = 300 << 10


@contextmanager
def relaying_within(seconds: float, what: str) -> Iterator[None]:
    """The body's relaying must be done within `seconds`, though stdout takes nothing."""
    with trio.move_on_after(seconds) as scope:
        yield
    assert not scope.cancelled_caught, (
        f"{what} through the relay took over {seconds}s while its stdout took nothing"
    )


def dropped(relay: Relay) -> float:
    return relay.metrics().get("splicerelay_access_log_dropped_total")


async def transfer_through(port: int, seed: int) -> None:
    """TRANSFER bytes to the echo upstream and back, checked by sha256."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream, trio.open_nursery() as nursery:

        async def send() -> None:
            await send_payload(stream, seed, TRANSFER)
            await stream.send_eof()

        nursery.start_soon(send)
        received = await receive_all(stream)
    assert received == expected_transfer(seed, TRANSFER)


async def test_a_stalled_stdout_stalls_neither_relaying_nor_memory_and_drops_are_counted(
    relay_factory: RelayFactory, pipes: list[StdoutPipe]
) -> None:
    pipe = StdoutPipe()
    pipes.append(pipe)
    not_taking = (
        "access log: the output is not taking lines; dropping them until it does"
        " (splicerelay_access_log_dropped_total counts them)"
    )
    taking_again = "access log: the output takes lines again"
    made = 0
    async with trio.open_nursery() as nursery:
        upstream = await start_server(nursery, echo)
        listen = free_port()
        config = access_config(listen, upstream, route=STALLED_ROUTE)
        relay = await trio.to_thread.run_sync(lambda: start_relay(relay_factory, config, pipe))

        # Fill the pipe and the relay's buffer, until lines are dropped.
        with trio.fail_after(60):
            while dropped(relay) == 0:
                with relaying_within(20, "100 connections"):
                    made += len(await crowd(listen, 100))
                assert made * 1000 < 4 * BUFFER_LIMIT, "no line dropped: is stdout unbounded?"
        # (A pipe holds 16 page-sized slots and a write of whole lines rarely fills its
        # slot, so a pipe that refuses writes holds less than its 64 KiB.)
        assert pipe.unread() >= 32 << 10, f"the relay's stdout is not full: {pipe.unread()}"
        assert len(said(relay, not_taking)) == 1

        # (a) Relaying goes on at full speed while stdout takes nothing.
        with relaying_within(5, f"a transfer of {TRANSFER >> 10} KiB each way"):
            await transfer_through(listen, seed=14)
        made += 1

        # (b) and (c): memory stays put while lines are dropped and counted.
        dropped_before = dropped(relay)
        rss_before = relay.rss()
        with relaying_within(60, f"{MORE} connections"):
            made += len(await crowd(listen, MORE))
        growth = relay.rss() - rss_before
        assert growth <= RSS_GROWTH_LIMIT, f"RSS grew {growth >> 10} KiB over {MORE} connections"
        assert dropped(relay) >= dropped_before + 0.9 * MORE
        # (d) One warning for the whole burst.
        assert len(said(relay, not_taking)) == 1

        # (e) Once stdout is read, the relay writes again and says how many it dropped.
        pipe.start_reading()
        await wait_for(lambda: bool(said(relay, taking_again)), "the burst of drops to end")
        (ended,) = said(relay, taking_again)
        total_dropped = dropped(relay)
        assert ended["dropped"] == total_dropped
        with trio.fail_after(10):
            later = await crowd(listen, 5)
        made += len(later)

        def written() -> Counter[int]:
            data = pipe.data
            return ports_logged(json_entries(whole_lines(data[: data.rfind(b"\n") + 1])))

        await wait_for(lambda: Counter(later) <= written(), "the lines of connections made since")
        assert dropped(relay) == total_dropped
        relay.process.send_signal(signal.SIGTERM)
        assert await exit_code(relay) == 0, relay.stderr()
        nursery.cancel_scope.cancel()

    # Every connection has its line, or was counted as dropped.
    lines = whole_lines(pipe.wait_eof())
    assert len(lines) + total_dropped == made
    assert len(said(relay, not_taking)) == 1


# ----- the line, field by field -------------------------------------------------------

SENT = 1234  # client -> upstream: bytes_in
REPLY = 7777  # upstream -> client: bytes_out
TIME = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")


async def read_then_reply(stream: trio.SocketStream) -> None:
    """An upstream that reads to EOF, then answers REPLY bytes and closes."""
    received = 0
    while chunk := await stream.receive_some(65536):
        received += len(chunk)
    assert received == SENT
    await stream.send_all(b"r" * REPLY)
    await stream.aclose()


def fields_config(ok: int, refused: int, denied: int, upstream: int, dead: int, fmt: str) -> str:
    route = "  - name: {name}\n    listen: 127.0.0.1:{listen}\n    upstreams:\n"
    route += "      - address: 127.0.0.1:{upstream}\n"
    return (
        "metrics:\n"
        "  listen: 127.0.0.1:{metrics_port}\n"
        f"log: {{level: info, format: {fmt}, access_log: true}}\n"
        "routes:\n"
        + route.format(name="web.main-1", listen=ok, upstream=upstream)
        + route.format(name="refused", listen=refused, upstream=dead)
        + route.format(name="denied", listen=denied, upstream=upstream)
        + "    allow: [10.0.0.0/8]\n"
    )


def parse_line(line: str, fmt: str) -> dict[str, Any]:
    """A line as its fields in order, values as JSON types (text: parsed as logfmt)."""
    if fmt == "json":
        entry: dict[str, Any] = json.loads(line)
        return entry
    fields: dict[str, Any] = text_entry(line)
    for key in ("bytes_in", "bytes_out"):
        assert re.fullmatch(r"\d+", fields[key]), line
        fields[key] = int(fields[key])
    fields["duration_seconds"] = float(fields["duration_seconds"])
    fields["upstream"] = fields["upstream"] or None
    return fields


def parse_time(text: str) -> float:
    assert TIME.fullmatch(text), text
    moment = datetime.datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ")
    return moment.replace(tzinfo=datetime.UTC).timestamp()


async def closed_without_reply(port: int) -> str:
    """Connect, be closed by the relay with nothing relayed; the client's address."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        host, own = stream.socket.getsockname()[:2]
        with trio.fail_after(10):
            assert await stream.receive_some(1) == b""
    return f"{host}:{own}"


@pytest.mark.parametrize("fmt", ["json", "text"])
async def test_access_line_fields(relay_factory: RelayFactory, fmt: str) -> None:
    """Each field of a real relay's line: its name, place and value, and nothing else."""
    with refusing_port() as dead_socket:
        dead = bound_port(dead_socket)
        ok, refused, denied = free_port(), free_port(), free_port()
        async with trio.open_nursery() as nursery:
            upstream = await start_server(nursery, read_then_reply)
            relay = await relay_factory.astart(
                fields_config(ok, refused, denied, upstream, dead, fmt)
            )
            began = time.time()
            stream = await trio.open_tcp_stream("127.0.0.1", ok)
            async with stream:
                host, own = stream.socket.getsockname()[:2]
                await stream.send_all(b"s" * SENT)
                await stream.send_eof()
                assert (await receive_all(stream)).count == REPLY
            client = f"{host}:{own}"
            refused_client = await closed_without_reply(refused)
            denied_client = await closed_without_reply(denied)

            def lines() -> list[str]:
                return whole_lines(relay.stdout_path.read_bytes())

            await wait_for(lambda: len(lines()) == 3, "three access lines")
            seen = time.time()
            relay.wait_settled()
            nursery.cancel_scope.cancel()

    raw = lines()
    entries = {entry["route"]: entry for entry in (parse_line(line, fmt) for line in raw)}
    assert list(entries) == ["web.main-1", "refused", "denied"]
    for entry in entries.values():
        assert list(entry) == list(FIELDS), entry
        assert began - 0.001 <= parse_time(entry["time"]) <= seen, (entry, began, seen)
        assert (entry["level"], entry["message"]) == ("info", "connection")
        assert isinstance(entry["duration_seconds"], float)
        assert 0 <= entry["duration_seconds"] <= seen - began
    assert entries["web.main-1"] | {"time": "", "duration_seconds": 0.0} == {
        "time": "",
        "level": "info",
        "message": "connection",
        "route": "web.main-1",
        "client": client,
        "upstream": f"127.0.0.1:{upstream}",
        "bytes_in": SENT,
        "bytes_out": REPLY,
        "duration_seconds": 0.0,
        "outcome": "completed",
    }
    assert entries["web.main-1"]["duration_seconds"] > 0
    refused_entry = entries["refused"]
    assert (refused_entry["client"], refused_entry["upstream"]) == (
        refused_client,
        f"127.0.0.1:{dead}",
    )
    assert (refused_entry["bytes_in"], refused_entry["bytes_out"]) == (0, 0)
    assert refused_entry["outcome"] == "connect_failed"
    denied_entry = entries["denied"]
    assert (denied_entry["client"], denied_entry["upstream"]) == (denied_client, None)
    assert (denied_entry["bytes_in"], denied_entry["bytes_out"]) == (0, 0)
    assert denied_entry["outcome"] == "denied"
    # How a missing upstream is written in each format.
    (denied_line,) = [line for line in raw if denied_client in line]
    assert ('"upstream": null,' if fmt == "json" else ' upstream="" ') in denied_line
    assert parse_metrics(relay.scrape_text()).get("splicerelay_access_log_dropped_total") == 0
