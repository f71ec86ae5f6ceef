"""Where the control socket is: the default rule, and the directory the relay makes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from splicerelay.ops.control_path import (
    ROOT_DIRECTORY,
    ControlPathError,
    ControlPlace,
    control_place,
    control_socket_path,
    make_directory,
    no_default_reason,
)

USER = 1000


@pytest.mark.parametrize(
    ("env", "euid", "expected"),
    [
        # systemd's RuntimeDirectory= wins, for root and others alike.
        ({"RUNTIME_DIRECTORY": "/run/splicerelay"}, 0, "/run/splicerelay/control.sock"),
        ({"RUNTIME_DIRECTORY": "/run/relay-a"}, USER, "/run/relay-a/control.sock"),
        # Several directories: the first.
        ({"RUNTIME_DIRECTORY": "/run/one:/run/two"}, USER, "/run/one/control.sock"),
        # Over XDG_RUNTIME_DIR too.
        (
            {"RUNTIME_DIRECTORY": "/run/r", "XDG_RUNTIME_DIR": "/run/user/1000"},
            USER,
            "/run/r/control.sock",
        ),
        # Empty or relative: as if unset.
        ({"RUNTIME_DIRECTORY": ""}, 0, "/run/splicerelay/control.sock"),
        ({"RUNTIME_DIRECTORY": "run/x"}, 0, "/run/splicerelay/control.sock"),
        ({}, 0, "/run/splicerelay/control.sock"),
        # Root ignores XDG_RUNTIME_DIR (sudo may carry the invoking user's over).
        ({"XDG_RUNTIME_DIR": "/run/user/1000"}, 0, "/run/splicerelay/control.sock"),
        ({"XDG_RUNTIME_DIR": "/run/user/1000"}, USER, "/run/user/1000/splicerelay/control.sock"),
        ({"XDG_RUNTIME_DIR": "relative"}, USER, None),
        ({}, USER, None),
    ],
)
def test_the_default_place(env: dict[str, str], euid: int, expected: str | None) -> None:
    assert control_socket_path("auto", env, euid) == expected


def test_a_configured_path_is_taken_as_it_is_and_marked_configured() -> None:
    place = control_place("/srv/relay/ctl.sock", {"RUNTIME_DIRECTORY": "/run/x"}, 0)
    assert place == ControlPlace("/srv/relay/ctl.sock", True, None, "control.socket")


def test_null_is_no_control_socket() -> None:
    assert control_place(None, {"RUNTIME_DIRECTORY": "/run/x"}, 0) is None
    assert "null" in no_default_reason(None)


def test_which_default_places_the_relay_makes_itself() -> None:
    systemd = control_place("auto", {"RUNTIME_DIRECTORY": "/run/x"}, USER)
    root = control_place("auto", {}, 0)
    user = control_place("auto", {"XDG_RUNTIME_DIR": "/run/user/7"}, USER)
    assert systemd is not None and root is not None and user is not None
    assert systemd.directory is None  # systemd's to make
    assert root.directory == ROOT_DIRECTORY
    assert user.directory == "/run/user/7/splicerelay"
    assert not (systemd.configured or root.configured or user.configured)


def test_no_default_place_says_what_was_looked_at() -> None:
    reason = no_default_reason("auto")
    assert "$RUNTIME_DIRECTORY" in reason and "$XDG_RUNTIME_DIR" in reason


def place_in(directory: Path) -> ControlPlace:
    return ControlPlace(str(directory / "control.sock"), False, str(directory), "test")


def test_make_directory_creates_it_private(tmp_path: Path) -> None:
    target = tmp_path / "splicerelay"
    old = os.umask(0)
    try:
        make_directory(place_in(target))
    finally:
        os.umask(old)
    assert target.is_dir()
    assert target.stat().st_mode & 0o777 == 0o700
    make_directory(place_in(target))  # already there and private: fine


def test_make_directory_refuses_a_directory_others_may_write(tmp_path: Path) -> None:
    target = tmp_path / "open"
    target.mkdir()
    target.chmod(0o777)
    with pytest.raises(ControlPathError, match="writable by no one else"):
        make_directory(place_in(target))


def test_make_directory_refuses_one_of_another_user(tmp_path: Path) -> None:
    target = tmp_path / "theirs"
    target.mkdir(mode=0o700)
    with pytest.raises(ControlPathError, match=f"must belong to uid {os.geteuid() + 1}"):
        make_directory(place_in(target), euid=os.geteuid() + 1)


def test_make_directory_refuses_a_symlink(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir(mode=0o700)
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with pytest.raises(ControlPathError, match="not a directory"):
        make_directory(place_in(tmp_path / "link"))


def test_make_directory_says_why_it_cannot(tmp_path: Path) -> None:
    with pytest.raises(ControlPathError, match=r"cannot create .*missing/splicerelay"):
        make_directory(place_in(tmp_path / "missing" / "splicerelay"))


def test_nothing_to_make_for_a_configured_path(tmp_path: Path) -> None:
    make_directory(ControlPlace(str(tmp_path / "nowhere" / "c.sock"), True, None, "x"))


_SEEN_RUNTIME_DIRECTORIES: set[str] = set()


@pytest.mark.parametrize("run", [1, 2])
def test_each_test_has_a_runtime_directory_of_its_own(run: int) -> None:
    """(tests/conftest.py) so that relays of different tests never share a default
    control socket path, nor /run/splicerelay with a relay running on this machine."""
    directory = os.environ.get("RUNTIME_DIRECTORY", "")
    assert directory.startswith("/tmp/") and os.path.isdir(directory)
    assert not os.listdir(directory)
    assert directory not in _SEEN_RUNTIME_DIRECTORIES
    _SEEN_RUNTIME_DIRECTORIES.add(directory)
