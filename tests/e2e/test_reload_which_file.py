"""`splicerelay reload` must check the file that the relay will load, not another one.

The relay re-reads the file it was started with (`show info` names it as `config_path`);
`reload -c FILE` checks FILE. When the two differ, the check says nothing about what the
relay then loads, yet `reload` prints "the new config is live". And `reload -s SOCKET`
without `-c` checks /etc/splicerelay/relay.yaml, whatever file the relay runs.

So `reload` asks the relay for its `config_path` first: with `-c`, a different file is
refused before the relay is asked to reload; without it, the relay's own file is checked.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import trio

from splicerelay.ops.control_path import DEFAULT_CONFIG_PATH
from tests.support.ctl import reload_count, splicerelay
from tests.support.harness import RelayFactory, free_port, relay_config
from tests.support.peers import echo, round_trip, start_server

SECOND_ROUTE = (
    "  - name: second\n"
    "    listen: 127.0.0.1:{listen}\n"
    "    upstreams:\n"
    "      - address: 127.0.0.1:{upstream}\n"
)


async def test_reload_of_a_file_the_relay_does_not_run_is_refused_before_asking_it(
    relay_factory: RelayFactory, tmp_path: Path
) -> None:
    async with trio.open_nursery() as nursery:
        upstream = await start_server(nursery, echo)
        relay = await relay_factory.astart(relay_config(free_port(), upstream))
        other = tmp_path / "other.yaml"
        other.write_text(
            relay.config_path.read_text()
            + SECOND_ROUTE.format(listen=free_port(), upstream=upstream)
        )

        result = await trio.to_thread.run_sync(lambda: splicerelay("reload", "-c", str(other)))
        nursery.cancel_scope.cancel()
    assert reload_count(relay) == 0, "the relay reloaded a file that was never checked"
    assert result.returncode == 1, result.stdout + result.stderr
    assert str(relay.config_path) in result.stderr and str(other) in result.stderr
    assert "live" not in result.stdout


@pytest.mark.skipif(
    os.path.exists(DEFAULT_CONFIG_PATH), reason=f"{DEFAULT_CONFIG_PATH} exists on this machine"
)
async def test_reload_without_a_file_checks_the_one_the_relay_runs(
    relay_factory: RelayFactory, runtime_directory: Path
) -> None:
    async with trio.open_nursery() as nursery:
        upstream = await start_server(nursery, echo)
        relay = await relay_factory.astart(relay_config(free_port(), upstream))
        second = free_port()
        relay.config_path.write_text(
            relay.config_path.read_text() + SECOND_ROUTE.format(listen=second, upstream=upstream)
        )
        socket_path = str(runtime_directory / "control.sock")

        result = await trio.to_thread.run_sync(lambda: splicerelay("reload", "-s", socket_path))
        assert result.returncode == 0, result.stdout + result.stderr
        assert await round_trip(second, b"via the new route") == b"via the new route"
        # (The new route's listener is above the fd baseline: stopped here, not checked.)
        assert relay.stop() == 0
        nursery.cancel_scope.cancel()
