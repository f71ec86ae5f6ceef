"""A control socket at a name in the abstract namespace: a worker's private one when
its supervisor has no directory for sockets (workers/rendezvous.py)."""

from __future__ import annotations

import os
import secrets

import pytest
import trio

from splicerelay.protocol.control import Command, ShowInfo, ok_reply
from splicerelay.relay.control_client import ControlNotRunning, send_command_async
from splicerelay.relay.control_socket import ControlSocketError, serve_control_socket

WAIT = 10.0


async def handler(command: Command) -> object:
    return {"ran": type(command).__name__}


async def test_an_abstract_name_serves_and_vanishes_with_the_socket() -> None:
    name = f"\0splicerelay-test-{os.getpid()}-{secrets.token_hex(8)}/control-1"
    with trio.fail_after(WAIT):
        async with trio.open_nursery() as nursery:
            await nursery.start(serve_control_socket, name, handler)
            assert await send_command_async(name, ShowInfo(), WAIT) == ok_reply({"ran": "ShowInfo"})
            # A second server cannot take a name that a live one holds.
            with pytest.raises(ControlSocketError, match="Address already in use"):
                await nursery.start(serve_control_socket, name, handler)
            nursery.cancel_scope.cancel()
        with pytest.raises(ControlNotRunning):
            await send_command_async(name, ShowInfo(), WAIT)
