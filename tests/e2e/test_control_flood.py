"""100 control clients at once against a real relay: bounded, and the traffic goes on.

The control socket shares the relay's event loop with the data path (with workers, the
supervisor's control thread asks the workers, whose loops carry the data path). Here a
hundred clients connect at once while connections are relayed: the first 16 are served
and keep the relay answering `show connections` as fast as they can read, the other 84
are told "busy" at once and closed. Meanwhile echoed round trips through the relay must
all come back intact and without a stall, and once the clients are gone the relay holds
no more fds than before (the relay factory checks that after every test) and answers a
control client again.
"""

from __future__ import annotations

import contextlib
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trio

from splicerelay.protocol.control import Reply
from tests.support.control import read_reply
from tests.support.harness import RelayFactory, free_port, poll_until, relay_config
from tests.support.peers import echo, round_trip, start_server

pytestmark = pytest.mark.timeout(120)

CLIENTS = 100
SERVED = 16  # ControlLimits.max_clients, as the README states it
ROUND_TRIP_BYTES = 256 << 10
# Round trips that must complete while every admitted client keeps the relay busy.
ROUND_TRIPS_DURING = 40
# One round trip of 256 KiB through the relay takes about 5 ms here, also during the
# flood; a relay whose loop the control clients held would stall far longer. Generous
# for a shared machine with two cores.
MAX_ROUND_TRIP = 1.0
STEP_TIMEOUT = 30.0


@dataclass
class Flood:
    """The control clients: who was served, who was told busy, and when to stop."""

    path: str
    served: int = 0
    answers: int = 0
    busy: list[Reply] = field(default_factory=list)
    other: list[str] = field(default_factory=list)
    stop: trio.Event = field(default_factory=trio.Event)

    async def client(self) -> None:
        stream = await trio.open_unix_socket(self.path)
        async with stream:
            # A client refused as busy is answered and closed before anything is read,
            # so its send may meet a closed socket: the reply is still there to read.
            with contextlib.suppress(trio.BrokenResourceError):
                await stream.send_all(b"show connections\n")
            try:
                reply = await read_reply(stream, within=STEP_TIMEOUT)
            except (trio.BrokenResourceError, AssertionError) as error:
                self.other.append(repr(error))
                return
            if not reply.ok:
                if (reply.error or "").startswith(f"busy: {SERVED} control clients"):
                    self.busy.append(reply)
                else:
                    self.other.append(reply.error or "")
                return
            self.served += 1
            # Served: keep asking, as fast as the replies come, until told to stop.
            while not self.stop.is_set():
                await stream.send_all(b"show connections\n")
                reply = await read_reply(stream, within=STEP_TIMEOUT)
                assert reply.ok, reply
                self.answers += 1

    def settled(self) -> bool:
        return self.served + len(self.busy) + len(self.other) == CLIENTS


@dataclass
class Traffic:
    """Echoed round trips through the relay, one after another, until stopped."""

    port: int
    took: list[tuple[float, float]] = field(default_factory=list)  # (started, seconds)
    stop: trio.Event = field(default_factory=trio.Event)

    async def run(self) -> None:
        rng = random.Random(13)
        while not self.stop.is_set():
            payload = rng.randbytes(ROUND_TRIP_BYTES)
            started = time.monotonic()
            with trio.fail_after(STEP_TIMEOUT):
                reply = await round_trip(self.port, payload)
            assert reply == payload, "a round trip came back changed"
            self.took.append((started, time.monotonic() - started))

    def since(self, moment: float) -> list[float]:
        return [seconds for started, seconds in self.took if started >= moment]

    async def wait_since(self, moment: float, count: int) -> None:
        with trio.fail_after(STEP_TIMEOUT):
            while len(self.since(moment)) < count:
                await trio.sleep(0.01)


@pytest.mark.parametrize("workers", ["1", "2"])
async def test_100_control_clients_are_bounded_and_the_traffic_goes_on(
    relay_factory: RelayFactory, runtime_directory: Path, workers: str
) -> None:
    async with trio.open_nursery() as nursery:
        upstream = await start_server(nursery, echo)
        listen = free_port()
        relay = await relay_factory.astart(f"workers: {workers}\n" + relay_config(listen, upstream))
        path = str(runtime_directory / "control.sock")  # the default place

        traffic = Traffic(listen)
        nursery.start_soon(traffic.run)
        await traffic.wait_since(0.0, 5)  # with workers: both are up and relaying

        flood = Flood(path)
        async with trio.open_nursery() as clients:
            for _ in range(CLIENTS):
                clients.start_soon(flood.client)
            with trio.fail_after(STEP_TIMEOUT):
                while not flood.settled():
                    await trio.sleep(0.01)
            # Every admitted client is now asking as fast as it can: the data path must
            # not notice.
            during = time.monotonic()
            answered = flood.answers
            await traffic.wait_since(during, ROUND_TRIPS_DURING)
            assert flood.answers > answered, "the admitted clients kept being answered"
            flood.stop.set()
        traffic.stop.set()

        assert flood.other == []
        assert (flood.served, len(flood.busy)) == (SERVED, CLIENTS - SERVED)
        slowest = max(traffic.since(during))
        assert slowest < MAX_ROUND_TRIP, f"a round trip took {slowest:.2f}s during the flood"

        # The relay answers a new control client again, and every connection it counted
        # completed (none failed).
        with trio.fail_after(STEP_TIMEOUT):
            while True:
                stream = await trio.open_unix_socket(path)
                async with stream:
                    with contextlib.suppress(trio.BrokenResourceError):
                        await stream.send_all(b"show info\n")
                    reply = await read_reply(stream)
                if reply.ok:
                    break
                # The served clients' connections may still be closing on its side.
                assert (reply.error or "").startswith("busy: "), reply
                await trio.sleep(0.05)
        nursery.cancel_scope.cancel()

    def all_counted() -> bool:
        return relay.metrics().get("splicerelay_connections_total", 0.0) >= len(traffic.took)

    await trio.to_thread.run_sync(poll_until, all_counted, STEP_TIMEOUT, "every connection")
    metrics = relay.metrics()
    completed = metrics.get("splicerelay_connections_total", outcome="completed")
    assert completed == metrics.get("splicerelay_connections_total")
