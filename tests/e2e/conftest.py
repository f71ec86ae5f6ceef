"""Fixtures for the end-to-end tests that need a systemd container (tests.support.container)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.container import (
    Container,
    base_rootfs,
    booted,
    relay_layer,
    require_container_tools,
)


@pytest.fixture(scope="session")
def relay_rootfs(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """The layers of a rootfs with the relay installed from this checkout (topmost first).

    Built once per session; the base under it is cached across sessions.
    """
    require_container_tools()
    base = base_rootfs()
    return [relay_layer(base, tmp_path_factory.mktemp("relay-rootfs")), base]


@pytest.fixture(scope="module")
def systemd_container(
    relay_rootfs: list[Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Container]:
    """A booted systemd container, one per test module, on a writable layer of its own."""
    with booted(relay_rootfs, tmp_path_factory.mktemp("container")) as container:
        yield container
