"""What a worker process receives from its supervisor, and how it behaves as one.

The supervisor (supervisor.py) starts each worker as `splicerelay run -c
/proc/self/fd/N` with one environment variable, SPLICERELAY_WORKER, holding JSON: the
worker's slot, where to serve its private /metrics and its private control socket, the
supervisor's pid, the listening
sockets it inherits, and N, the inherited memfd that holds its config (config_copy.py).
Nothing of this needs a writable file system.

Why not LISTEN_FDS, the socket activation variables the relay already reads: they name
descriptors that must start at 3 and run on without gaps, and LISTEN_PID must be the
worker's own pid. subprocess keeps inherited descriptors at their numbers (pass_fds),
and moving them to 3, 4, ... or learning the pid before exec would need code between
fork and exec (preexec_fn), which is unsafe in a process that runs threads, as the
supervisor does (its metrics server). So the variable lists the numbers as they are; the
worker turns them into the same PassedSocket objects socket activation gives, and from
there ListenerSet matches them to routes by name or address exactly as it does for
systemd's, across reloads too.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import socket
from dataclasses import dataclass

from splicerelay.ops.systemd import PassedSocket

WORKER_ENV = "SPLICERELAY_WORKER"
# Supervisor → worker: close every connection now (the operator's second stop signal).
# Why not a second SIGTERM: under systemd's default KillMode=control-group, `systemctl
# stop` sends SIGTERM to every process of the service, workers included; the supervisor
# forwards its own SIGTERM too, and a worker must not take that pair for "stop now".
CUT_SIGNAL = signal.SIGUSR2
# A worker's sd_notify field with the outcome of a reload ("success" or "failure").
# Why the X_ prefix: sd_notify(3) reserves unprefixed names for systemd's own.
RELOAD_RESULT_FIELD = "X_SPLICERELAY_RELOAD"
_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


@dataclass(frozen=True)
class InheritedSocket:
    fd: int
    name: str  # a route's name, or the name the service manager gave it
    kept: bool  # see PassedSocket.kept


@dataclass(frozen=True)
class WorkerSetup:
    slot: int  # 0 .. workers-1; a restarted worker takes the slot of the one it replaces
    supervisor_pid: int
    metrics_path: str  # unix socket for this worker's /metrics, /readyz (may be abstract)
    # Unix socket for this worker's control socket, which only its supervisor uses (may
    # be abstract). The worker never serves the configured control.socket: that one is
    # the supervisor's, which answers for all workers (workers/control.py).
    control_path: str
    sockets: tuple[InheritedSocket, ...]
    config_fd: int  # the memfd holding the config, read as /proc/self/fd/N
    # The upstreams' admin states the other workers hold (relay/admin.admin_snapshot's
    # rows), to take before serving: a restarted worker must not send a connection to
    # an upstream an operator drained (admin_memory.py).
    admin: tuple[dict[str, object], ...] = ()


def encode(setup: WorkerSetup) -> str:
    return json.dumps(
        {
            "slot": setup.slot,
            "supervisor_pid": setup.supervisor_pid,
            "metrics_path": setup.metrics_path,
            "control_path": setup.control_path,
            "sockets": [[item.fd, item.name, item.kept] for item in setup.sockets],
            "config_fd": setup.config_fd,
            "admin": list(setup.admin),
        }
    )


def decode(text: str) -> WorkerSetup:
    """The setup in `text`; ValueError when it is not one."""
    try:
        data = json.loads(text)
        return WorkerSetup(
            slot=int(data["slot"]),
            supervisor_pid=int(data["supervisor_pid"]),
            metrics_path=str(data["metrics_path"]),
            control_path=str(data["control_path"]),
            sockets=tuple(
                InheritedSocket(int(fd), str(name), bool(kept))
                for fd, name, kept in data["sockets"]
            ),
            config_fd=int(data["config_fd"]),
            admin=tuple(_admin_rows(data.get("admin", []))),
        )
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(f"{WORKER_ENV}: not a worker setup: {error}") from None


def _admin_rows(rows: object) -> list[dict[str, object]]:
    if not isinstance(rows, list) or not all(isinstance(row, dict) for row in rows):
        raise ValueError("admin: not a list of settings")
    return rows


def take_worker_setup() -> WorkerSetup | None:
    """This process's setup when a supervisor started it, else None.

    The variable is removed, so that nothing this process starts takes itself for a
    worker too.
    """
    text = os.environ.pop(WORKER_ENV, None)
    if text is None:
        return None
    setup = decode(text)
    # Why: pass_fds made the config's memfd inheritable for the exec; nothing this
    # process starts needs it. Reading it through /proc/self/fd is unaffected.
    with contextlib.suppress(OSError):
        os.set_inheritable(setup.config_fd, False)
    return setup


def inherited_sockets(setup: WorkerSetup) -> list[PassedSocket]:
    sockets = []
    for item in setup.sockets:
        # Why: pass_fds made these inheritable for the exec; nothing started from here
        # on may keep a listener open behind the relay's back.
        os.set_inheritable(item.fd, False)
        sockets.append(PassedSocket(socket.socket(fileno=item.fd), item.name, kept=item.kept))
    return sockets


def die_with_parent(supervisor_pid: int) -> None:
    """Have the kernel send SIGTERM (a drain) when the supervisor dies, even by SIGKILL.

    Why: an orphaned worker would go on serving the shared ports with nobody to stop,
    restart or reload it. PR_SET_PDEATHSIG fires when the thread that forked us ends,
    which is the supervisor's main thread (it starts workers from there only). If the
    supervisor died before the request took effect, our parent is already someone else.
    """
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
    if os.getppid() != supervisor_pid:
        os.kill(os.getpid(), signal.SIGTERM)
