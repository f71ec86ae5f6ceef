"""Where the control socket is: `control.socket` as a path, "auto" made one.

The relay serving it and `splicerelay ctl` / `reload` looking for it take the same rule,
so that both find the same file without being told (HAProxy's and nginx's runtime files
sit in /run the same way):

1. `$RUNTIME_DIRECTORY/control.sock` when systemd sets RUNTIME_DIRECTORY (the unit's
   `RuntimeDirectory=`; systemd makes it, owned by the service's user, also under
   `DynamicUser=`). It may list several directories separated by ':': the first is
   taken.
2. Else, for root, `/run/splicerelay/control.sock` (the relay makes the directory, 0700).
3. Else `$XDG_RUNTIME_DIR/splicerelay/control.sock` when the user has a runtime
   directory (the relay makes `splicerelay` in it, 0700).
4. Else no control socket: there is no place that is the user's own, and a socket in
   a world-writable directory such as /tmp could be taken or swapped by anyone.

`control_place` says which, with no side effects; `make_directory` creates the
directory the relay owns (cases 2 and 3) and checks that it is private.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

from splicerelay.config.model import CONTROL_SOCKET_AUTO

__all__ = [
    "DEFAULT_CONFIG_PATH",
    "ROOT_DIRECTORY",
    "SOCKET_NAME",
    "ControlPathError",
    "ControlPlace",
    "control_place",
    "control_socket_path",
    "make_directory",
    "no_default_reason",
]

SOCKET_NAME: Final = "control.sock"
ROOT_DIRECTORY: Final = "/run/splicerelay"
USER_SUBDIRECTORY: Final = "splicerelay"
# Where the shipped unit reads its config: `ctl` and `reload` look there without -c.
DEFAULT_CONFIG_PATH: Final = "/etc/splicerelay/relay.yaml"
DIRECTORY_MODE: Final = 0o700


class ControlPathError(Exception):
    """The control socket's directory cannot be had; the message says why."""


@dataclass(frozen=True)
class ControlPlace:
    """Where the control socket goes, and how that was decided.

    `configured`: control.socket names the path, so failing to serve there is a
    startup error (a default place that fails only costs the control socket).
    `directory`: one the relay makes itself, mode 0700, when missing (None: the
    configured path's, or systemd's runtime directory, is someone else's to make).
    `source`: how the path was chosen, for messages."""

    path: str
    configured: bool
    directory: str | None
    source: str


def _first_absolute(value: str | None) -> str | None:
    """The first entry of a ':'-separated list of directories, if it is absolute."""
    first = (value or "").split(":")[0]
    return first if first.startswith("/") else None


def control_place(setting: str | None, env: Mapping[str, str], euid: int) -> ControlPlace | None:
    """Where the control socket of `control.socket: setting` is, under `env` and `euid`.

    None when there is none: `setting` is None (turned off), or "auto" and no default
    place fits (see no_default_reason)."""
    if setting is None:
        return None
    if setting != CONTROL_SOCKET_AUTO:
        return ControlPlace(setting, True, None, "control.socket")
    runtime = _first_absolute(env.get("RUNTIME_DIRECTORY"))
    if runtime is not None:
        return ControlPlace(os.path.join(runtime, SOCKET_NAME), False, None, "$RUNTIME_DIRECTORY")
    if euid == 0:
        path = os.path.join(ROOT_DIRECTORY, SOCKET_NAME)
        return ControlPlace(path, False, ROOT_DIRECTORY, "the default for root")
    user = _first_absolute(env.get("XDG_RUNTIME_DIR"))
    if user is not None:
        directory = os.path.join(user, USER_SUBDIRECTORY)
        return ControlPlace(
            os.path.join(directory, SOCKET_NAME), False, directory, "$XDG_RUNTIME_DIR"
        )
    return None


def control_socket_path(setting: str | None, env: Mapping[str, str], euid: int) -> str | None:
    """The path of `control_place`, or None."""
    place = control_place(setting, env, euid)
    return None if place is None else place.path


def no_default_reason(setting: str | None) -> str:
    """Why `control_place` found no place for `setting` (for a message)."""
    if setting is None:
        return "control.socket is null"
    return (
        "control.socket is auto, and there is no default place for it: no"
        " $RUNTIME_DIRECTORY (systemd's RuntimeDirectory=), not root, and no"
        " $XDG_RUNTIME_DIR; set control.socket to a path"
    )


def make_directory(place: ControlPlace, euid: int | None = None) -> None:
    """Create `place.directory` (mode 0700) if missing; raise ControlPathError if it
    cannot be made, or if it is there but not private to `euid` (ours by default).

    Why the check of one found there: the socket file is mode 0600, but whoever may write
    to its directory could replace it with one of their own, to which `ctl` and `reload`
    would then talk."""
    directory = place.directory
    if directory is None:
        return
    owner = os.geteuid() if euid is None else euid
    try:
        os.mkdir(directory, DIRECTORY_MODE)
    except FileExistsError:
        pass
    except OSError as error:
        raise ControlPathError(
            f"cannot create {directory} for the control socket: {error.strerror or error}"
        ) from None
    try:
        found = os.lstat(directory)
    except OSError as error:
        raise ControlPathError(f"cannot use {directory}: {error.strerror or error}") from None
    if not stat.S_ISDIR(found.st_mode):
        raise ControlPathError(
            f"cannot use {directory} for the control socket: it is not a directory"
        )
    if found.st_uid != owner or stat.S_IMODE(found.st_mode) & 0o022:
        raise ControlPathError(
            f"cannot use {directory} for the control socket: it must belong to uid"
            f" {owner} and be writable by no one else (it is uid {found.st_uid},"
            f" mode {stat.S_IMODE(found.st_mode):04o})"
        )
