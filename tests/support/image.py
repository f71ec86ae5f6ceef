"""The relay's image, built with podman from deploy/container, and containers run from it.

Base images cannot be pulled from a registry here, so the image is built on a local base:
the Debian bookworm rootfs that tests.support.container makes with debootstrap (it has
python3 and python3-venv, as the Containerfile needs), imported into podman once and
kept under a name keyed by that rootfs. The relay's image itself is built by
deploy/container/build.sh, as an operator would, and removed when the tests end.

Containers run the way deployment.yaml runs the pod: read-only root file system without
the tmpfs mounts podman would add (Kubernetes adds none), no capabilities, no privilege
escalation, the image's own user, the config directory mounted read-only, and a writable
directory where the pod mounts an emptyDir (`ScratchMount`, with the kubelet's owner and
mode). They
share the host's network, so the relay listens on 127.0.0.1 ports picked by the test.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.container import base_rootfs, base_rootfs_path, run_bounded
from tests.support.harness import poll_until

REPO = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = REPO / "deploy/container/build.sh"

# Bounds: the build installs wheels offline and takes under a minute; importing the
# base (about 300 MB) takes seconds; everything else is quick.
BUILD_TIMEOUT = 300.0
IMPORT_TIMEOUT = 180.0
COMMAND_TIMEOUT = 60.0
READY_TIMEOUT = 30.0

# Why set limits at all: podman asks the runtime for RLIMIT_NOFILE 1048576 and
# RLIMIT_NPROC 4194304 by default, and where those are above the host's hard limits and
# root lacks CAP_SYS_RESOURCE the runtime cannot raise them: the container does not
# start ("error setting rlimits for ready process"). These are below any host's and
# ample for the relay under test.
LIMITS = ["--ulimit", "nofile=4096:4096", "--ulimit", "nproc=1024:1024"]

# deployment.yaml's securityContext, in podman's words.
LOCKED_DOWN = [
    "--read-only",
    # podman would mount tmpfs on /tmp, /var/tmp and /run of a read-only container;
    # Kubernetes does not, and the relay must do without.
    "--read-only-tmpfs=false",
    "--cap-drop=ALL",
    "--security-opt=no-new-privileges",
]


@dataclass(frozen=True)
class ScratchMount:
    """An empty, writable directory in a container, as a pod's emptyDir volume is: a
    directory made on the host, root-owned with the kubelet's mode, bind-mounted.

    Why not a podman tmpfs mount: runc gives a tmpfs mounted over a directory that the
    image has the mode of that directory (0700 for the image's runtime directory), not
    its owner (root's), so the image's user could not write there; a kubelet's emptyDir
    is a bind mount of its own directory, mode 0777 (1777 for `medium: Memory`, a
    tmpfs), whatever the image has at the mount point."""

    path: str  # in the container
    source: Path  # on the host

    @classmethod
    def make(cls, path: str, mode: int, under: Path) -> ScratchMount:
        """A new directory for `path` in `under`, root-owned with `mode`."""
        source = under / path.strip("/").replace("/", "-")
        source.mkdir(parents=True)
        source.chmod(mode)  # mkdir's mode passes through the umask; chmod's does not
        return cls(path, source)

    def option(self) -> str:
        return f"--volume={self.source}:{self.path}"


@dataclass(frozen=True)
class Podman:
    """podman, with the OCI runtime that was found to start containers here."""

    program: str
    runtime: tuple[str, ...]  # () for podman's default, or ("--runtime", NAME)

    def run(
        self, *arguments: str, timeout: float = COMMAND_TIMEOUT, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        command = [self.program, *self.runtime, *arguments]
        try:
            result = run_bounded(command, timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{' '.join(command)} took more than {timeout}s") from None
        if check and result.returncode != 0:
            raise AssertionError(
                f"{' '.join(command)} exited {result.returncode}:\n"
                f"{result.stdout[-2000:]}{result.stderr[-3000:]}"
            )
        return result

    def image_exists(self, name: str) -> bool:
        return self.run("image", "exists", name, check=False).returncode == 0


def require_podman() -> str:
    """Skip, saying why, unless podman and what the base image needs are here."""
    if os.geteuid() != 0:
        pytest.skip("building and running the image needs root")
    program = shutil.which("podman")
    if program is None:
        pytest.skip("podman is not installed (Debian packages podman and runc)")
    if not (base_rootfs_path() / "usr/bin/python3").exists() and not shutil.which("debootstrap"):
        pytest.skip("debootstrap is not installed (Debian package debootstrap)")
    return program


def base_image(program: str) -> str:
    """The local base image: the cached debootstrap rootfs, imported into podman once."""
    rootfs = base_rootfs()
    stamp = (rootfs / "etc/os-release").stat().st_mtime_ns
    key = hashlib.sha256(f"{rootfs} {stamp}".encode()).hexdigest()[:12]
    name = f"localhost/splicerelay-test-base:{key}"
    podman = Podman(program, ())
    if not podman.image_exists(name):
        # tar into `podman import`, bounded as one shell pipeline in its own group.
        script = 'tar --one-file-system -C "$1" -c . | "$2" import - "$3" >/dev/null'
        result = run_bounded(["sh", "-c", script, "sh", str(rootfs), program, name], IMPORT_TIMEOUT)
        if result.returncode != 0:
            raise AssertionError(f"importing {rootfs} as {name} failed:\n{result.stderr}")
    return name


def working_podman(program: str, image: str) -> Podman:
    """podman with the first runtime that starts a container here; skip if none does.

    The default runtime first, then runc: crun has been seen to refuse a host with
    cgroups v1 and v2 mounted side by side ("cgroups in hybrid mode not supported").
    """
    failures = []
    candidates: list[tuple[str, ...]] = [()]
    if shutil.which("runc"):
        candidates.append(("--runtime", "runc"))
    for runtime in candidates:
        podman = Podman(program, runtime)
        result = run_once(podman, image, "true")
        if result.returncode == 0:
            return podman
        name = runtime[1] if runtime else "the default runtime"
        failures.append(f"{name}: {result.stderr.strip()[-500:]}")
    pytest.skip("podman cannot start a container here: " + " | ".join(failures))


def build_image(podman: Podman, base: str, tag: str) -> None:
    """deploy/container/build.sh, with `base` as BASE and podman's working runtime."""
    environment = {**os.environ, "ENGINE": podman.program, "IMAGE": tag}
    command = [
        str(BUILD_SCRIPT),
        f"--build-arg=BASE={base}",
        # No layer cache: each run's wheels differ, and cached layers would pile up.
        "--layers=false",
        *podman.runtime,
    ]
    try:
        result = run_bounded(command, BUILD_TIMEOUT, env=environment)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"build.sh took more than {BUILD_TIMEOUT}s") from None
    if result.returncode != 0:
        output = result.stdout[-3000:] + result.stderr[-3000:]
        raise AssertionError(f"build.sh exited {result.returncode}:\n{output}")


def is_ready(metrics_port: int) -> bool:
    """Does /readyz on 127.0.0.1:`metrics_port` answer 200?"""
    try:
        url = f"http://127.0.0.1:{metrics_port}/readyz"
        with urllib.request.urlopen(url, timeout=2) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, ConnectionError):
        return False


def run_once(
    podman: Podman,
    image: str,
    *arguments: str,
    entrypoint: str | None = None,
    scratch: Sequence[ScratchMount] = (),
) -> subprocess.CompletedProcess[str]:
    """Run a container of `image` to its end, locked down as the pod; its result."""
    options = [f"--entrypoint={entrypoint}"] if entrypoint else []
    options += [mount.option() for mount in scratch]
    return podman.run(
        "run",
        "--rm",
        "--network=host",
        *LIMITS,
        *LOCKED_DOWN,
        *options,
        image,
        *arguments,
        check=False,
    )


@dataclass(frozen=True)
class RunningContainer:
    podman: Podman
    name: str

    def inspect(self, field: str) -> str:
        return self.podman.run("inspect", "--format", f"{{{{{field}}}}}", self.name).stdout.strip()

    def host_pid(self) -> int:
        """The pid, on the host, of the container's PID 1."""
        return int(self.inspect(".State.Pid"))

    def logs(self) -> str:
        result = self.podman.run("logs", self.name, check=False)
        return result.stdout + result.stderr

    def exec(self, *arguments: str) -> subprocess.CompletedProcess[str]:
        """`podman exec` in the running container: the image's user and environment, as
        `kubectl exec` has them in the pod."""
        return self.podman.run("exec", self.name, *arguments, check=False)

    def wait_ready(self, metrics_port: int) -> None:
        """Wait for /readyz to answer 200; fail at once, with the logs, if it exits."""

        def ready() -> bool:
            if is_ready(metrics_port):
                return True
            if self.inspect(".State.Running") != "true":
                raise AssertionError(f"the container exited:\n{self.logs()}")
            return False

        poll_until(ready, READY_TIMEOUT, "the relay in the container to be ready", interval=0.1)


@contextlib.contextmanager
def running(
    podman: Podman,
    image: str,
    name: str,
    config_dir: Path,
    scratch: Sequence[ScratchMount] = (),
) -> Iterator[RunningContainer]:
    """A container of `image` with `config_dir` at /etc/splicerelay and the `scratch`
    mounts; removed afterwards."""
    # The config must be readable by the image's user, as a ConfigMap's files are (0644).
    config_dir.chmod(0o755)
    for path in config_dir.iterdir():
        path.chmod(0o644)
    podman.run(
        "run",
        "--detach",
        f"--name={name}",
        "--network=host",
        *LIMITS,
        *LOCKED_DOWN,
        f"--volume={config_dir}:/etc/splicerelay:ro",
        *(mount.option() for mount in scratch),
        image,
    )
    try:
        yield RunningContainer(podman, name)
    finally:
        podman.run("rm", "--force", "--time=0", name, check=False)
