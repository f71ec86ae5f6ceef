"""Host names for tests, without DNS and without touching the machine's /etc/hosts.

`FakeResolver` stands in for socket.getaddrinfo in-process (component tests pass it
where the relay takes a `getaddrinfo`). `PrivateHosts` runs a real process under its
own mount namespace, where /etc/hosts and /etc/nsswitch.conf are bind-mounted from
files of the test: the process resolves the test's names through the real glibc
resolver, and nothing else on the machine sees them.
"""

from __future__ import annotations

import ipaddress
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

AddrInfo = tuple[socket.AddressFamily, socket.SocketKind, int, str, tuple[Any, ...]]


class FakeResolver:
    """getaddrinfo over `table`: name -> addresses in the order to return them.

    A name missing from the table does not exist; a name mapped to None fails as a
    DNS outage does. IP literals resolve to themselves. `on_call`, if set, runs first
    with the host asked for (it may raise, or wait, like a slow resolver).
    """

    def __init__(self, table: dict[str, list[str] | None]) -> None:
        self.table = table
        self.asked: list[str] = []
        self.on_call: Callable[[str], None] | None = None

    def __call__(
        self, host: str, port: int, family: int = 0, type: int = 0, proto: int = 0, flags: int = 0
    ) -> list[AddrInfo]:
        self.asked.append(host)
        if self.on_call is not None:
            self.on_call(host)
        try:
            ipaddress.ip_address(host)
            addresses: list[str] | None = [host]
        except ValueError:
            if host not in self.table:
                raise socket.gaierror(socket.EAI_NONAME, "Name or service not known") from None
            addresses = self.table[host]
        if addresses is None:
            raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
        return [_info(address, port) for address in addresses]


def _info(address: str, port: int) -> AddrInfo:
    if ":" in address:
        return (socket.AF_INET6, socket.SOCK_STREAM, 6, "", (address, port, 0, 0))
    return (socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, port))


# Binds the two files over the machine's, then runs the command that follows them: the
# mounts live in the new namespace only and go away with its last process.
_BIND_AND_EXEC = (
    'mount --bind "$1" /etc/hosts && mount --bind "$2" /etc/nsswitch.conf && shift 2 && exec "$@"'
)


class PrivateHosts:
    """An /etc/hosts of the test's own, for processes started with `prefix`.

    The hosts file is only ever rewritten in place, never replaced: a bind mount
    follows the inode it was made on, so a file put in its place would not be seen.
    """

    def __init__(self, directory: Path) -> None:
        self.hosts = directory / "hosts"
        self.nsswitch = directory / "nsswitch.conf"
        # Files only: a name the test did not list fails at once instead of asking DNS.
        self.nsswitch.write_text("hosts: files\n")
        self.write({})

    def write(self, table: dict[str, list[str]]) -> None:
        lines = ["127.0.0.1 localhost"]
        lines += [f"{address} {name}" for name, addresses in table.items() for address in addresses]
        with self.hosts.open("r+" if self.hosts.exists() else "w") as file:
            file.write("\n".join(lines) + "\n")
            file.truncate()

    @property
    def prefix(self) -> list[str]:
        """Put this before a command to run it with these names."""
        return [
            "unshare",
            "--mount",
            "sh",
            "-c",
            _BIND_AND_EXEC,
            "private-hosts",
            str(self.hosts),
            str(self.nsswitch),
        ]


def private_hosts_unavailable(directory: Path) -> str | None:
    """Why `PrivateHosts` cannot work here (a reason to skip), or None if it can."""
    if shutil.which("unshare") is None or shutil.which("mount") is None:
        return "needs unshare(1) and mount(1) (util-linux)"
    hosts = PrivateHosts(directory)
    hosts.write({"private-hosts.test": ["127.0.0.2"]})
    probe = "import socket; print(socket.getaddrinfo('private-hosts.test', 1)[0][4][0])"
    try:
        result = subprocess.run(
            [*hosts.prefix, sys.executable, "-c", probe],
            capture_output=True,
            text=True,
            timeout=20,
        )
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"cannot run a private mount namespace: {error}"
    if result.returncode != 0 or result.stdout.strip() != "127.0.0.2":
        reason = (result.stderr.strip().splitlines() or ["no answer"])[-1]
        return f"cannot bind-mount a private /etc/hosts (needs root): {reason}"
    return None
