"""`workers` above 1 on a read-only root, as under Kubernetes' readOnlyRootFilesystem
with no emptyDir: nothing the supervisor and its workers share may need a file.

The relay runs inside a private mount namespace (unshare(1), as root) in which `/`,
`/tmp`, `/var/tmp`, `/run` and `/dev/shm` are remounted read-only, with its working
directory at `/`: Python's tempfile, which tries those and then the working directory,
finds nowhere to write. The config file and the venv stay readable. The network
namespace is the host's, so the test's upstreams and clients on loopback reach it.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import trio

from tests.support.harness import (
    Relay,
    RelayFactory,
    child_pids,
    fd_count,
    free_port,
    is_running,
    poll_until,
    relay_config,
)
from tests.support.peers import connect, start_server

READ_ONLY = ("/", "/tmp", "/var/tmp", "/run", "/dev/shm")
# Each directory becomes a read-only mount in the new namespace: a mount point is
# remounted; a plain directory is first bound onto itself, so that it is one. (The
# changes stay in the namespace: its mounts are private copies.) Exit 97 if any of them
# is still writable after that.
NAMESPACE_SCRIPT = f"""
for dir in {" ".join(READ_ONLY)}; do
  [ -d "$dir" ] || continue
  mountpoint -q "$dir" || mount --bind "$dir" "$dir" || exit 97
  mount -o remount,bind,ro "$dir" || exit 97
done
cd / || exit 97
for dir in {" ".join(READ_ONLY)}; do
  if [ -d "$dir" ] && [ -w "$dir" ]; then echo "still writable: $dir" >&2; exit 97; fi
done
exec "$@"
"""
IN_READ_ONLY_ROOT = ["unshare", "--mount", "--propagation", "private"]
IN_READ_ONLY_ROOT += ["sh", "-c", NAMESPACE_SCRIPT, "sh"]
# Nothing in the environment may point tempfile or the supervisor at a writable place.
NO_WRITABLE_DIRECTORY = {"TMPDIR": "", "TEMP": "", "TMP": "", "RUNTIME_DIRECTORY": ""}


def read_only_root_or_skip() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root, to make a mount namespace")
    if shutil.which("unshare") is None or shutil.which("mountpoint") is None:
        pytest.skip("needs unshare(1) and mountpoint(1) (util-linux)")
    probe = subprocess.run(
        [*IN_READ_ONLY_ROOT, "true"], capture_output=True, text=True, timeout=30, check=False
    )
    if probe.returncode != 0:
        pytest.skip(f"cannot make a read-only mount namespace here: {probe.stderr.strip()}")


async def start_tagged_echo(nursery: trio.Nursery, tag: bytes) -> int:
    """An upstream that says `tag`, then echoes until the client closes."""

    async def handler(stream: trio.SocketStream) -> None:
        try:
            await stream.send_all(tag)
            while data := await stream.receive_some(65536):
                await stream.send_all(data)
        except trio.BrokenResourceError:
            pass
        finally:
            await stream.aclose()

    return await start_server(nursery, handler)


async def relayed_exchange(port: int, tag: bytes, message: bytes) -> trio.SocketStream:
    """Connect through the relay, check the upstream's tag and an echo; left open."""
    stream = await connect(port)
    assert await receive_exactly(stream, len(tag)) == tag
    await stream.send_all(message)
    assert await receive_exactly(stream, len(message)) == message
    return stream


async def receive_exactly(stream: trio.SocketStream, size: int) -> bytes:
    received = b""
    while len(received) < size:
        chunk = await stream.receive_some(size - len(received))
        assert chunk, "connection closed early"
        received += chunk
    return received


async def served_by_every_worker(
    relay: Relay, port: int, tag: bytes, workers: list[int]
) -> list[trio.SocketStream]:
    """Connections held open through the relay, each checked to reach the upstream that
    says `tag`, until every worker has taken some.

    Held open, each relayed connection costs its worker two sockets: counting fds per
    worker shows which of them took connections.
    """
    baseline = {pid: fd_count(pid) for pid in workers}
    streams: list[trio.SocketStream] = []
    took: dict[int, int] = {}
    for _batch in range(20):
        for _ in range(10):
            streams.append(await relayed_exchange(port, tag, b"ping %d" % len(streams)))
        took = {pid: fd_count(pid) - baseline[pid] for pid in workers}
        if all(extra >= 2 for extra in took.values()):
            break
    assert all(extra >= 2 for extra in took.values()), f"fds per worker: {took}"

    def all_counted() -> bool:
        return relay.metrics().get("splicerelay_connections_active") == len(streams)

    # The supervisor's /metrics sums what it fetches from each worker's socket.
    await trio.to_thread.run_sync(poll_until, all_counted, 10, "connections in /metrics")
    return streams


async def close_all(relay: Relay, streams: list[trio.SocketStream]) -> None:
    for stream in streams:
        await stream.aclose()

    def none_active() -> bool:
        return relay.metrics().get("splicerelay_connections_active") == 0

    await trio.to_thread.run_sync(poll_until, none_active, 10, "connections to end")


def ready(relay: Relay) -> bool:
    """The supervisor's /readyz: every worker runs and is ready."""
    url = f"http://127.0.0.1:{relay.metrics_port}/readyz"
    try:
        with urllib.request.urlopen(url, timeout=5) as reply:
            return bool(reply.status == 200)
    except urllib.error.HTTPError:
        return False


def two_workers(relay: Relay, without: int = 0) -> list[int]:
    found: list[int] = []

    def has_two() -> bool:
        found[:] = child_pids(relay.pid)
        return len(found) == 2 and without not in found

    poll_until(has_two, 15, "two worker processes")
    return found


async def test_workers_start_serve_reload_and_stop_on_a_read_only_root(
    relay_factory: RelayFactory,
) -> None:
    read_only_root_or_skip()
    seen: set[int] = set()
    try:
        async with trio.open_nursery() as nursery:
            old_port = await start_tagged_echo(nursery, b"old")
            new_port = await start_tagged_echo(nursery, b"new")
            listen_port = free_port()
            text = "workers: 2\n" + relay_config(listen_port, old_port)
            relay = await relay_factory.astart(
                text, prefix=IN_READ_ONLY_ROOT, env=NO_WRITABLE_DIRECTORY
            )
            assert "using abstract socket names" in relay.stderr()
            workers = await trio.to_thread.run_sync(two_workers, relay)
            seen.update(workers)
            for pid in workers:
                with open(f"/proc/{pid}/cmdline", "rb") as file:
                    # The worker reads its config from an inherited memfd, not a file.
                    assert b"/proc/self/fd/" in file.read()

            streams = await served_by_every_worker(relay, listen_port, b"old", workers)
            await close_all(relay, streams)

            # SIGHUP: the new config reaches every worker.
            config_path = Path(relay.config_path)
            config_path.write_text(
                config_path.read_text().replace(f":{old_port}\n", f":{new_port}\n")
            )
            relay.process.send_signal(signal.SIGHUP)

            def reloaded() -> bool:
                reloads = relay.metrics().get("splicerelay_config_reloads_total", result="success")
                return reloads == 1

            await trio.to_thread.run_sync(poll_until, reloaded, 15, "the reload")
            streams = await served_by_every_worker(relay, listen_port, b"new", workers)
            await close_all(relay, streams)

            # A worker restarted after the reload runs the new config too.
            os.kill(workers[0], signal.SIGKILL)
            workers = await trio.to_thread.run_sync(two_workers, relay, workers[0])
            seen.update(workers)

            def restarted_and_ready() -> bool:
                restarts = relay.metrics().get("splicerelay_worker_restarts_total")
                return restarts == 1 and ready(relay)

            await trio.to_thread.run_sync(poll_until, restarted_and_ready, 15, "the restart")
            streams = await served_by_every_worker(relay, listen_port, b"new", workers)
            await close_all(relay, streams)
            nursery.cancel_scope.cancel()

        code = await trio.to_thread.run_sync(relay.stop)
        log = relay.stderr()
        assert code == 0, log
        assert "Traceback" not in log
        assert '"message": "stopped"' in log
        poll_until(lambda: not any(is_running(pid) for pid in seen), 15, "workers to exit")
    finally:
        # On a failure: the relay, then the workers this test saw (only those).
        relay_factory.kill_all()
        for pid in seen:
            if is_running(pid):
                os.kill(pid, signal.SIGKILL)
