"""Where the supervisor and its workers find each other: the notify socket the workers
report to, and the sockets each worker serves its metrics and its control socket on.

In a private directory when one can be made: under systemd's $RUNTIME_DIRECTORY when
the unit has one, else in the temp directory. Why 0700 (mkdtemp's mode): whoever can
reach the notify socket could flood it, and whoever can reach a worker's socket could
read its metrics. (A worker's control socket checks its peers with SO_PEERCRED as well.)

Else (a read-only root: no writable temp directory, no runtime directory) the sockets
take names in the abstract namespace, which need no file system at all. Those are
reachable from the whole network namespace (a container's own, in Kubernetes), so:
- the notify socket still only counts messages whose sender the kernel names
  (SO_PASSCRED) as one of the workers; others are dropped;
- every name carries a random part, and each worker's metrics and control names one of
  their own that appears nowhere before the worker binds them, so no other process can
  take a name first and pose as that worker;
- a worker's control socket admits only our uid and root (SO_PEERCRED), as the
  configured one does.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass

log = logging.getLogger("splicerelay")

# Why a NUL byte: the socket API spells a name in the abstract namespace with a leading
# NUL; the name then vanishes with the last socket bound to it, leaving nothing to clean.
ABSTRACT = "\0"


def is_abstract(address: str) -> bool:
    return address.startswith(ABSTRACT)


def for_environment(address: str) -> str:
    """`address` as NOTIFY_SOCKET spells it: "@" for the NUL, which no environment
    variable can hold (sd_notify(3)'s convention; ops/systemd.Notifier reads it)."""
    return "@" + address[1:] if is_abstract(address) else address


@dataclass(frozen=True)
class Rendezvous:
    """The names of the sockets between one supervisor and its workers."""

    directory: str | None  # the private directory, or None: abstract names
    prefix: str  # every socket's name starts with it

    @property
    def notify_address(self) -> str:
        return f"{self.prefix}/notify.sock" if self.directory else f"{self.prefix}/notify"

    def metrics_address(self, worker_id: int) -> str:
        """Where worker `worker_id` serves its /metrics and /readyz."""
        if self.directory:
            return f"{self.prefix}/worker-{worker_id}.sock"
        return f"{self.prefix}/worker-{worker_id}-{secrets.token_hex(8)}"

    def control_address(self, worker_id: int) -> str:
        """Where worker `worker_id` serves its control socket, for the supervisor only."""
        if self.directory:
            return f"{self.prefix}/control-{worker_id}.sock"
        return f"{self.prefix}/control-{worker_id}-{secrets.token_hex(8)}"

    def remove(self, address: str) -> None:
        """Remove a socket's file; an abstract name has none."""
        if not is_abstract(address):
            with contextlib.suppress(OSError):
                os.unlink(address)

    def close(self) -> None:
        if self.directory:
            shutil.rmtree(self.directory, ignore_errors=True)


def open_rendezvous(environ: Mapping[str, str]) -> Rendezvous:
    """A private directory if one can be made, else abstract names (see above)."""
    base = environ.get("RUNTIME_DIRECTORY", "").split(":")[0] or None
    try:
        directory = tempfile.mkdtemp(prefix="splicerelay-", dir=base)
    except OSError as error:
        # Why OSError: tempfile raises FileNotFoundError when no candidate temp
        # directory is writable, and mkdir in a read-only $RUNTIME_DIRECTORY gives EROFS.
        log.info(
            "no writable directory for the workers' sockets: using abstract socket names",
            extra={"fields": {"reason": error.strerror or str(error)}},
        )
        return Rendezvous(None, f"{ABSTRACT}splicerelay-{os.getpid()}-{secrets.token_hex(8)}")
    return Rendezvous(directory, directory)
