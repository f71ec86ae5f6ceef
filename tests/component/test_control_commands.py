"""The control socket's commands on a relay in process (relay/control_commands.py).

`show connections` lists a live transfer with byte counts that grow as bytes move;
`kill connection` ends it with the counted outcome `killed`, whatever phase it is in;
`reload` answers once the reload was applied or refused; `show info` and `show routes`
say what runs. The relay serves real loopback sockets; the handler is called directly
(the socket around it has tests of its own) and through a real control socket once.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from splicerelay.bench.procs import free_port
from splicerelay.ops.service import RunOptions
from splicerelay.ops.systemd import Notifier
from splicerelay.protocol.control import (
    AdminState,
    CommandFailed,
    KillConnection,
    Reload,
    SetUpstreamState,
    ShowConnections,
    ShowInfo,
    ShowRoutes,
    ShowUpstreams,
)
from splicerelay.relay import service
from splicerelay.relay.control_client import send_command_async
from splicerelay.relay.control_commands import (
    ConfigRecord,
    ControlCommands,
    ServiceRecord,
    connection_row,
    text_sha256,
)
from splicerelay.relay.control_socket import serve_control_socket
from splicerelay.relay.lifecycle import Relay
from splicerelay.relay.service import Reloader
from tests.support.control import socket_dir
from tests.support.fakes import (
    Backend,
    OutcomeLog,
    build_relay,
    ending_of,
    open_client,
    port_of,
    round_trip,
    route_config,
    route_stats,
    serving,
)

WAIT = 10.0


def web_route(upstream: int, listen: int, extra: str = "", name: str = "web") -> str:
    return (
        f"  - name: {name}\n"
        f"    listen: 127.0.0.1:{listen}\n"
        f"    upstreams: [{{address: 127.0.0.1:{upstream}}}]\n"
        f"{extra}"
    )


class Rig:
    """A relay in process with its control handler; the config also in a file, for
    reloads."""

    def __init__(self, relay: Relay, outcomes: OutcomeLog, path: Path, text: str) -> None:
        self.relay = relay
        self.outcomes = outcomes
        self.path = path
        self.record = ServiceRecord(ConfigRecord(str(path), text_sha256(text), time.time()))
        self.reloader = Reloader(
            RunOptions(config_path=str(path)), relay, Notifier(""), record=self.record
        )
        self.handler = ControlCommands(relay, self.record, self.reloader.reload)

    async def connections(self, route: str | None = None) -> list[dict[str, object]]:
        rows = await self.handler(ShowConnections(route))
        assert isinstance(rows, list)
        return rows


@pytest.fixture(autouse=True)
def logs_left_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    """A reload configures the process's loggers from the config; in process, that
    would change them for the tests that follow."""
    monkeypatch.setattr(service, "configure_service_logs", lambda *args: None)


@pytest.fixture
def config_file(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path / "relay.yaml"


def make_rig(path: Path, text: str) -> Rig:
    path.write_text(text)
    relay, outcomes = build_relay(text)
    return Rig(relay, outcomes, path, text)


async def test_show_connections_lists_a_live_transfer_with_growing_byte_counts(
    config_file: Path,
) -> None:
    async with trio.open_nursery() as nursery:
        backend = await Backend().start(nursery)
        rig = make_rig(config_file, route_config(web_route(backend.port, free_port())))
        async with serving(rig.relay):
            client = await open_client(port_of(rig.relay))
            assert await round_trip(client, b"x" * 1000) == b"x" * 1000
            [row] = await rig.connections()
            local = client.socket.getsockname()
            assert row["route"] == "web"
            assert row["client"] == f"{local[0]}:{local[1]}"
            assert row["upstream"] == f"127.0.0.1:{backend.port}"
            assert row["state"] == "relaying"
            assert (row["bytes_in"], row["bytes_out"]) == (1000, 1000)
            assert isinstance(row["id"], int) and row["id"] >= 1
            assert row["idle_seconds"] == 0.0  # bytes moved since the sweep last looked
            assert await round_trip(client, b"y" * 50_000) == b"y" * 50_000
            [later] = await rig.connections()
            assert later["id"] == row["id"]
            assert (later["bytes_in"], later["bytes_out"]) == (51_000, 51_000)
            assert isinstance(later["age_seconds"], float)
            assert later["age_seconds"] >= row["age_seconds"]  # type: ignore[operator]
        nursery.cancel_scope.cancel()


async def test_kill_connection_ends_it_with_the_counted_outcome_killed(config_file: Path) -> None:
    async with trio.open_nursery() as nursery:
        backend = await Backend().start(nursery)
        rig = make_rig(config_file, route_config(web_route(backend.port, free_port())))
        async with serving(rig.relay):
            keep = await open_client(port_of(rig.relay))
            doomed = await open_client(port_of(rig.relay))
            for client in (keep, doomed):
                assert await round_trip(client, b"ping") == b"ping"
            rows = await rig.connections()
            doomed_local = doomed.socket.getsockname()
            [target] = [r for r in rows if r["client"] == f"{doomed_local[0]}:{doomed_local[1]}"]
            answer = await rig.handler(KillConnection(int(str(target["id"]))))
            assert isinstance(answer, dict)
            assert answer["outcome"] == "killed" and answer["closed"] is True
            assert (answer["bytes_in"], answer["bytes_out"]) == (4, 4)
            # Nothing was in flight: the client gets a clean end, the count says why.
            assert await ending_of(doomed) == "eof"
            assert route_stats(rig.relay).outcomes["killed"] == 1
            assert [f.outcome for f in rig.outcomes.finished] == ["killed"]
            # The other connection goes on.
            assert await round_trip(keep, b"still") == b"still"
            assert [r["id"] for r in await rig.connections()] == [
                r["id"] for r in rows if r is not target
            ]
            with pytest.raises(CommandFailed, match=f"no connection {target['id']}: it has ended"):
                await rig.handler(KillConnection(int(str(target["id"]))))
        nursery.cancel_scope.cancel()


async def test_kill_connection_ends_one_still_waiting_for_its_proxy_header(
    config_file: Path,
) -> None:
    """A connection in a task of its own (reading a PROXY header) ends when that task
    runs next: the answer waits for it."""
    async with trio.open_nursery() as nursery:
        backend = await Backend().start(nursery)
        extra = "    accept_proxy_protocol: true\n    proxy_protocol_timeout: 1h\n"
        rig = make_rig(config_file, route_config(web_route(backend.port, free_port(), extra)))
        async with serving(rig.relay):
            client = await open_client(port_of(rig.relay))
            with trio.fail_after(WAIT):
                while not (rows := await rig.connections()):
                    await trio.sleep(0.01)
            [row] = rows
            assert row["state"] == "proxy_header" and row["upstream"] is None
            answer = await rig.handler(KillConnection(int(str(row["id"]))))
            assert isinstance(answer, dict)
            assert answer["closed"] is True and answer["outcome"] == "killed"
            assert rig.relay.active_sessions == 0
            assert route_stats(rig.relay).outcomes["killed"] == 1
            assert await ending_of(client) == "eof"
        nursery.cancel_scope.cancel()


async def test_show_connections_by_route_with_a_limit_and_an_unknown_route(
    config_file: Path,
) -> None:
    async with trio.open_nursery() as nursery:
        backend = await Backend().start(nursery)
        text = route_config(
            web_route(backend.port, free_port()), web_route(backend.port, free_port(), name="db")
        )
        rig = make_rig(config_file, text)
        async with serving(rig.relay):
            clients = [await open_client(port_of(rig.relay)) for _ in range(3)]
            clients.append(await open_client(port_of(rig.relay, "db")))
            for client in clients:
                assert await round_trip(client, b"hi") == b"hi"
            assert len(await rig.connections()) == 4
            web = await rig.connections("web")
            assert [r["route"] for r in web] == ["web"] * 3
            ids = [r["id"] for r in web]
            assert ids == sorted(ids)
            limited = await rig.handler(ShowConnections("web", 2))
            assert limited == web[:2] or [r["id"] for r in limited] == ids[:2]  # type: ignore[index,union-attr]
            assert [r["route"] for r in await rig.connections("db")] == ["db"]
            with pytest.raises(CommandFailed, match=r"no route nope \(routes: web, db\)"):
                await rig.connections("nope")
        nursery.cancel_scope.cancel()


async def test_a_plain_relay_refuses_a_slot_in_a_connection_id(config_file: Path) -> None:
    rig = make_rig(config_file, route_config(web_route(9, free_port())))
    with pytest.raises(CommandFailed, match="runs no workers"):
        await rig.handler(KillConnection(1, slot=0))
    rig.relay.listeners.close_all(lambda sock: sock.close())


async def test_idle_time_counts_from_when_the_sweep_last_saw_bytes_move(
    config_file: Path,
) -> None:
    async with trio.open_nursery() as nursery:
        backend = await Backend().start(nursery)
        rig = make_rig(config_file, route_config(web_route(backend.port, free_port())))
        async with serving(rig.relay):
            client = await open_client(port_of(rig.relay))
            assert await round_trip(client, b"abc") == b"abc"
            [(session, runtime)] = rig.relay.table.sessions.items()
            now = trio.current_time()
            # As the sweep leaves it after seeing the count move, 7 s ago.
            session.seen_activity = session.activity
            session.idle_since = now - 7.0
            assert connection_row(session, runtime, now)["idle_seconds"] == 7.0
            assert await round_trip(client, b"more") == b"more"
            assert connection_row(session, runtime, now)["idle_seconds"] == 0.0
        nursery.cancel_scope.cancel()


async def test_show_routes_says_where_each_really_listens(config_file: Path) -> None:
    listen = free_port()
    extra = "    max_connections: 7\n    max_connections_per_source: 3\n"
    rig = make_rig(config_file, route_config(web_route(9, listen, extra)))
    rows = await rig.handler(ShowRoutes())
    assert rows == [
        {
            "name": "web",
            "listen": f"127.0.0.1:{listen}",
            "balance": "round_robin",
            "upstreams": 1,
            "active_connections": 0,
            "limits": {
                "max_connections": 7,
                "max_connections_per_source": 3,
                "connect_timeout_seconds": 5.0,
                "idle_timeout_seconds": 3600.0,
                "max_duration_seconds": None,
            },
        }
    ]
    rig.relay.listeners.close_all(lambda sock: sock.close())


async def test_upstream_commands_go_to_the_admin_layer_and_name_what_exists(
    config_file: Path,
) -> None:
    rig = make_rig(config_file, route_config(web_route(9, free_port())))
    rows = await rig.handler(ShowUpstreams("web"))
    assert isinstance(rows, list) and [r["address"] for r in rows] == ["127.0.0.1:9"]
    changed = await rig.handler(SetUpstreamState("web", "127.0.0.1:9", AdminState.DRAIN))
    assert isinstance(changed, dict) and changed["state"] == "drain"
    with pytest.raises(CommandFailed, match=r"no upstream 10\.0\.0\.9:80 .*127\.0\.0\.1:9"):
        await rig.handler(SetUpstreamState("web", "10.0.0.9:80", AdminState.DRAIN))
    with pytest.raises(CommandFailed, match="no route nope"):
        await rig.handler(ShowUpstreams("nope"))
    rig.relay.listeners.close_all(lambda sock: sock.close())


async def test_reload_answers_once_applied_or_refused_and_show_info_says_so(
    config_file: Path,
) -> None:
    listen = free_port()
    text = route_config(web_route(9, listen))
    rig = make_rig(config_file, text)
    async with serving(rig.relay):
        info = await rig.handler(ShowInfo())
        assert isinstance(info, dict)
        assert info["config_sha256"] == text_sha256(text)
        assert info["last_reload"] is None and info["workers"] == 1

        new_text = route_config(web_route(9, listen), web_route(9, free_port(), name="second"))
        config_file.write_text(new_text)
        answer = await rig.handler(Reload())
        assert isinstance(answer, dict) and answer["result"] == "ok"
        # Applied by the time it answers.
        assert [r.route.name for r in rig.relay.runtimes] == ["web", "second"]
        info = await rig.handler(ShowInfo())
        assert isinstance(info, dict)
        assert info["config_sha256"] == text_sha256(new_text)
        assert info["last_reload"]["result"] == "ok"  # type: ignore[index]

        config_file.write_text(new_text.replace("name: second", "name: second\n    bogus: 1"))
        with pytest.raises(CommandFailed) as refused:
            await rig.handler(Reload())
        assert refused.value.data["result"] == "refused"  # type: ignore[index]
        assert f"{config_file}:" in refused.value.message and "bogus" in refused.value.message
        assert [r.route.name for r in rig.relay.runtimes] == ["web", "second"]
        info = await rig.handler(ShowInfo())
        assert isinstance(info, dict)
        assert info["config_sha256"] == text_sha256(new_text)  # still the one in force
        assert info["last_reload"]["result"] == "refused"  # type: ignore[index]
        assert info["reloads"] == {"success": 1, "failure": 1}


async def test_the_handler_behind_a_real_control_socket(config_file: Path) -> None:
    rig = make_rig(config_file, route_config(web_route(9, free_port())))
    with socket_dir() as directory:
        path = str(directory / "control.sock")
        async with trio.open_nursery() as nursery:
            await nursery.start(serve_control_socket, path, rig.handler)
            reply = await send_command_async(path, "show routes", WAIT)
            assert reply.ok and reply.data[0]["name"] == "web"
            reply = await send_command_async(path, "kill connection 99", WAIT)
            assert not reply.ok and reply.error is not None and "no connection 99" in reply.error
            nursery.cancel_scope.cancel()
    rig.relay.listeners.close_all(lambda sock: sock.close())


async def test_a_reload_asked_for_during_the_drain_is_refused_quietly(
    config_file: Path, tmp_path: Path
) -> None:
    """No RELOADING=1 / READY=1 to the service manager once STOPPING=1 was sent."""
    manager = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    manager.bind(str(tmp_path / "notify"))
    manager.setblocking(False)
    rig = make_rig(config_file, route_config(web_route(9, free_port())))
    rig.reloader.notifier = Notifier(str(tmp_path / "notify"))
    rig.reloader.stopping = True
    with pytest.raises(CommandFailed, match="shutting down") as refused:
        await rig.handler(Reload())
    assert refused.value.data["result"] == "refused"  # type: ignore[index]
    with pytest.raises(BlockingIOError):
        manager.recv(4096)
    rig.reloader.stopping = False
    async with serving(rig.relay):
        assert (await rig.handler(Reload()))["result"] == "ok"  # type: ignore[index]
    assert b"RELOADING=1" in manager.recv(4096)
    manager.close()
    rig.reloader.notifier.close()
