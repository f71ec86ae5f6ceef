"""A real systemd in a container, to test the shipped unit under the init it is written for.

The container is a Debian rootfs booted with systemd-nspawn. It shares the host's network,
so a relay it runs on 127.0.0.1 is reachable from the test, and its journal is the one
the unit's logs really go to. Commands run inside through nsenter.

The root file system is three overlayfs layers, each built on the ones below:

1. the base: `debootstrap --variant=minbase` bookworm with systemd, dbus and python3.
   Built once (about a minute) and cached: in $SPLICERELAY_TEST_ROOTFS when that is set
   (built there if the directory does not exist yet), else in the temp dir under a name
   keyed by the suite and the package list. The build goes to a side directory that is
   renamed into place only when complete, so an interrupted build is never reused.
   Tests never write to it: it is only ever a lower layer.
2. the relay: installed from wheels built from this checkout, the way deploy/README.md
   says (a virtual environment in /opt/splicerelay, a link at the unit's ExecStart path).
   Once per test session.
3. each booted container's own writable layer, thrown away when it stops, so that the
   units and configs one test module installs never reach the next.

Everything needs root, debootstrap (Debian package debootstrap), systemd-nspawn
(systemd-container) and overlayfs; without them the tests skip and say which is missing.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.harness import is_running, poll_until

ROOTFS_ENV = "SPLICERELAY_TEST_ROOTFS"
SUITE = "bookworm"
PACKAGES = ("systemd", "systemd-sysv", "dbus", "python3", "python3-venv", "iproute2")
REPO = Path(__file__).resolve().parents[2]

# Bounds. The base build downloads about 100 MB of packages and takes about a minute on
# an idle machine; the bound leaves room for a busy one. The rest is local and quick.
BUILD_TIMEOUT = 240.0
INSTALL_TIMEOUT = 120.0
BOOT_TIMEOUT = 60.0
STOP_TIMEOUT = 30.0
COMMAND_TIMEOUT = 30.0

# Inside the container: where the relay is installed, and the unit's ExecStart path.
VENV = "/opt/splicerelay"
LINK = "/usr/local/bin/splicerelay"

# Commands run inside get this environment, not the test's: no pager, no colours.
INSIDE_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG": "C.UTF-8",
    "SYSTEMD_PAGER": "",
    "SYSTEMD_COLORS": "0",
}

# What the wheel build copies of the checkout: not the virtual environment, not git, and
# not the caches. (Why copy at all: pip builds in the source tree and would leave build/
# and *.egg-info in the checkout.)
SOURCE_IGNORE = shutil.ignore_patterns(
    ".git",
    ".venv",
    "build",
    "dist",
    "tests",
    "__pycache__",
    "*.egg-info",
    ".*_cache",
    ".hypothesis",
)


def require_container_tools() -> None:
    """Skip the test, saying why, unless a container can be built and booted here."""
    if os.geteuid() != 0:
        pytest.skip("booting a systemd container needs root")
    needed = [
        ("systemd-nspawn", "systemd-container"),
        ("nsenter", "util-linux"),
        ("mount", "mount"),
    ]
    if not _is_rootfs(base_rootfs_path()):
        needed.append(("debootstrap", "debootstrap"))
    for program, package in needed:
        if shutil.which(program) is None:
            pytest.skip(f"{program} is not installed (Debian package {package})")
    if "overlay" not in Path("/proc/filesystems").read_text():
        pytest.skip("the kernel has no overlayfs")


def run_bounded(
    command: list[str], timeout: float, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run `command` in a process group of its own; past `timeout`, kill the whole group.

    Why the group: debootstrap, pip and nsenter start children of their own, and
    subprocess.run's timeout kills only the one it started.
    """
    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
    )
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except BaseException:
        # A timeout, or the test run interrupted: nothing of it may outlive the test.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        raise
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def _run(command: list[str], timeout: float, what: str) -> str:
    """Run a host command to completion within `timeout`; fail the test with its output."""
    try:
        result = run_bounded(command, timeout)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"{what} took more than {timeout}s") from None
    if result.returncode != 0:
        output = (result.stdout + result.stderr)[-3000:]
        raise AssertionError(f"{what} failed ({result.returncode}):\n{output}")
    return result.stdout


# -- layer 1: the base rootfs -------------------------------------------------------------


def base_rootfs_path() -> Path:
    configured = os.environ.get(ROOTFS_ENV)
    if configured:
        return Path(configured)
    key = hashlib.sha256(f"{SUITE} minbase {' '.join(PACKAGES)}".encode()).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / f"splicerelay-test-rootfs-{key}"


def _is_rootfs(path: Path) -> bool:
    return (path / "etc/os-release").exists() and (path / "usr/bin/python3").exists()


def mounts_under(directory: Path) -> list[str]:
    """Mount points at or below `directory`, deepest first (from /proc/self/mountinfo)."""
    prefix = str(directory.resolve())
    points = []
    with open("/proc/self/mountinfo") as mountinfo:
        for line in mountinfo:
            # The 5th field is the mount point, with spaces and such written as octal.
            point = line.split()[4].encode().decode("unicode_escape")
            if point == prefix or point.startswith(prefix + "/"):
                points.append(point)
    return sorted(points, key=len, reverse=True)


def remove_tree(directory: Path) -> None:
    """Remove a rootfs that a build left behind, and nothing outside it.

    Why unmount first: debootstrap mounts /proc (and may bind /dev and /sys) inside its
    target, and an interrupted build leaves them there. Deleting through such a mount
    would delete the host's files, so every mount under it goes first, and rm stays on
    the one file system anyway.
    """
    if not directory.exists():
        return
    for point in mounts_under(directory):
        run_bounded(["umount", "--lazy", point], 10)
    if mounts_under(directory):
        raise AssertionError(f"{directory} still has mounts under it; not removing it")
    _run(["rm", "-rf", "--one-file-system", str(directory)], 120, f"removing {directory}")


def base_rootfs() -> Path:
    """The cached base rootfs, built first if there is none yet (bounded)."""
    path = base_rootfs_path()
    if _is_rootfs(path):
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    # Why a lock: two test runs at once must not both debootstrap into the same place.
    with open(f"{path}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _is_rootfs(path):
            return path
        if path.exists() and any(path.iterdir()):
            raise AssertionError(f"{path} is not empty and holds no rootfs: remove it")
        partial = Path(f"{path}.partial")
        remove_tree(partial)
        try:
            _run(
                [
                    "debootstrap",
                    "--variant=minbase",
                    f"--include={','.join(PACKAGES)}",
                    SUITE,
                    str(partial),
                ],
                BUILD_TIMEOUT,
                f"debootstrap {SUITE} into {partial}",
            )
            if path.exists():
                path.rmdir()
            partial.rename(path)
        finally:
            remove_tree(partial)
    return path


# -- overlay layers -----------------------------------------------------------------------


@contextlib.contextmanager
def overlay(lowers: list[Path], upper: Path, work: Path, merged: Path) -> Iterator[Path]:
    """Mount `lowers` (topmost first) with `upper` on top at `merged`, until the block ends."""
    for directory in (upper, work, merged):
        directory.mkdir(parents=True, exist_ok=True)
    lowerdir = ":".join(str(lower) for lower in lowers)
    options = f"lowerdir={lowerdir},upperdir={upper},workdir={work}"
    _run(["mount", "-t", "overlay", "overlay", "-o", options, str(merged)], 10, "mount overlay")
    try:
        yield merged
    finally:
        if run_bounded(["umount", str(merged)], 10).returncode != 0:
            # Still busy (a process of a container that did not stop): detach it now, and
            # the kernel lets go of it when the last user does.
            _run(["umount", "--lazy", str(merged)], 10, f"umount --lazy {merged}")


# -- layer 2: the relay -------------------------------------------------------------------


def build_wheels(directory: Path) -> Path:
    """Wheels of this checkout and of its dependencies, built on the host into `directory`.

    The container has no package index; pip inside installs from these alone.
    """
    source = directory / "source"
    shutil.copytree(REPO, source, ignore=SOURCE_IGNORE, symlinks=True)
    wheels = directory / "wheels"
    _run(
        [sys.executable, "-m", "pip", "wheel", "-q", "-w", str(wheels), str(source)],
        INSTALL_TIMEOUT,
        "pip wheel",
    )
    return wheels


INSTALL_SCRIPT = f"""\
set -e
python3 -m venv {VENV}
{VENV}/bin/pip install -q --no-index --find-links /run/wheels splicerelay
ln -s {VENV}/bin/splicerelay {LINK}
{LINK} --version
"""


def relay_layer(base: Path, directory: Path) -> Path:
    """A layer over `base` holding the relay installed from this checkout; returns it."""
    wheels = build_wheels(directory)
    layer = directory / "relay-layer"
    with overlay([base], layer, directory / "relay-work", directory / "relay-root") as root:
        # A one-command container (not booted): it gets a proper /proc and /dev, which
        # chroot would not.
        _run(
            [
                "systemd-nspawn",
                "--quiet",
                "--register=no",
                "--keep-unit",
                "-D",
                str(root),
                f"--bind-ro={wheels}:/run/wheels",
                "/bin/sh",
                "-c",
                INSTALL_SCRIPT,
            ],
            INSTALL_TIMEOUT,
            "installing the relay into the container",
        )
    return layer


# -- layer 3: a booted container ----------------------------------------------------------


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as file:
            return [int(child) for child in file.read().split()]
    except FileNotFoundError:
        return []


def _comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as file:
            return file.read().strip()
    except FileNotFoundError:
        return ""


class Container:
    """A booted container: run commands inside, write files into its root from the host."""

    def __init__(self, root: Path, nspawn: subprocess.Popen[bytes], console: Path) -> None:
        self.root = root
        self.nspawn = nspawn
        self.console = console
        self.init_pid = 0

    def console_tail(self) -> str:
        return self.console.read_text(errors="replace")[-3000:]

    def find_init(self) -> None:
        """The container's init: the nspawn process's child, once it has become systemd."""

        def found() -> bool:
            if self.nspawn.poll() is not None:
                raise AssertionError(f"systemd-nspawn exited:\n{self.console_tail()}")
            for child in _children(self.nspawn.pid):
                if _comm(child) == "systemd":
                    self.init_pid = child
                    return True
            return False

        poll_until(found, BOOT_TIMEOUT, "the container's init to start")

    def run(
        self, *command: str, check: bool = True, timeout: float = COMMAND_TIMEOUT
    ) -> subprocess.CompletedProcess[str]:
        """Run `command` inside the container, in all of its init's namespaces."""
        full = ["nsenter", "-t", str(self.init_pid), "-m", "-u", "-i", "-n", "-p", "--", *command]
        result = run_bounded(full, timeout, env=INSIDE_ENV)
        if check and result.returncode != 0:
            raise AssertionError(
                f"{' '.join(command)} exited {result.returncode} in the container:\n"
                f"{result.stdout[-2000:]}{result.stderr[-2000:]}"
            )
        return result

    def wait_running(self, timeout: float = BOOT_TIMEOUT) -> str:
        """Wait until the boot is over; return the state (`running` or `degraded`)."""
        state = ""

        def booted() -> bool:
            nonlocal state
            if self.nspawn.poll() is not None:
                raise AssertionError(f"systemd-nspawn exited:\n{self.console_tail()}")
            state = self.run("systemctl", "is-system-running", check=False).stdout.strip()
            return state in ("running", "degraded")

        try:
            poll_until(booted, timeout, "systemctl is-system-running", interval=0.2)
        except AssertionError as error:
            raise AssertionError(f"{error} (last: {state!r}):\n{self.console_tail()}") from None
        return state

    def path(self, inside: str) -> Path:
        """Where a path of the container is, seen from the host."""
        return self.root / inside.lstrip("/")

    def write(self, inside: str, text: str) -> None:
        target = self.path(inside)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
        target.chmod(0o644)

    def stop(self) -> None:
        """SIGTERM to nspawn shuts the container down in order; SIGKILL past the bound."""
        if self.nspawn.poll() is None:
            self.nspawn.send_signal(signal.SIGTERM)
            try:
                self.nspawn.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.nspawn.kill()
                self.nspawn.wait()
        # If nspawn went without taking its container along, SIGKILL to the container's
        # init ends every process in its PID namespace. (Checked by name, in case the pid
        # has been reused since.) It is gone once reaped, not when it is a zombie.
        if self.init_pid and _comm(self.init_pid) == "systemd":
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.init_pid, signal.SIGKILL)
            poll_until(lambda: not is_running(self.init_pid), 10, "the container's init to go")


@contextlib.contextmanager
def booted(lowers: list[Path], directory: Path) -> Iterator[Container]:
    """Boot a container on `lowers` with a fresh writable layer; stop it when the block ends."""
    with overlay(lowers, directory / "upper", directory / "work", directory / "root") as root:
        console = directory / "console.log"
        with console.open("wb") as output:
            nspawn = subprocess.Popen(
                [
                    "systemd-nspawn",
                    "--quiet",
                    "-D",
                    str(root),
                    "--boot",
                    # Why: there is no systemd on the host to register the machine with.
                    "--register=no",
                    # Why: and so no scope unit to move into; stay in the test's cgroup.
                    "--keep-unit",
                    "--console=read-only",
                ],
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
            )
        container = Container(root, nspawn, console)
        try:
            container.find_init()
            container.wait_running()
            yield container
        finally:
            container.stop()


# -- the shipped unit in a booted container -----------------------------------------------

UNIT = REPO / "deploy/systemd/splicerelay.service"
UNIT_NAME = "splicerelay.service"
CONFIG = "/etc/splicerelay/relay.yaml"


def start_service(container: Container, config_text: str) -> str:
    """Install the shipped unit, unchanged, with `config_text` at the path it reads; (re)start.

    `systemctl restart` of a Type=notify unit returns once the relay has sent READY=1, or
    fails when it exits first. Returns the run's invocation id, which every journal
    entry of this run carries.
    """
    container.write(f"/etc/systemd/system/{UNIT_NAME}", UNIT.read_text())
    container.write(CONFIG, config_text)
    container.run("systemctl", "daemon-reload")
    container.run("systemctl", "reset-failed", UNIT_NAME, check=False)
    started = container.run("systemctl", "restart", UNIT_NAME, check=False)
    if started.returncode != 0:
        raise AssertionError(
            f"systemctl restart {UNIT_NAME} failed: {started.stderr}\n{service_journal(container)}"
        )
    return unit_property(container, "InvocationID")


def unit_property(container: Container, name: str) -> str:
    return container.run("systemctl", "show", "-P", name, UNIT_NAME).stdout.strip()


def service_journal(container: Container, *options: str) -> str:
    """`journalctl -u splicerelay OPTIONS` inside the container, as text."""
    return container.run("journalctl", "--no-pager", "-u", UNIT_NAME, *options).stdout
