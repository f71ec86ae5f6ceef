"""Shared fixtures: a relay subprocess per test, and peers on loopback."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.harness import RelayFactory


@pytest.fixture(autouse=True)
def runtime_directory(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A RUNTIME_DIRECTORY of the test's own, for every relay it starts.

    Why: a relay's default control socket is `$RUNTIME_DIRECTORY/control.sock`, else
    /run/splicerelay/control.sock for root; relays of tests running side by side (or one
    an operator runs on the same machine) must not meet there. Subprocesses inherit the
    variable. The path is short: a unix socket path must fit in 108 bytes, which
    pytest's tmp_path with a long test name does not always."""
    path = Path(tempfile.mkdtemp(prefix="rt-", dir="/tmp"))
    monkeypatch.setenv("RUNTIME_DIRECTORY", str(path))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def relay_factory(tmp_path):  # type: ignore[no-untyped-def]
    """Start relays with `relay_factory.start(config_text)`; all are stopped after the test.

    After the test, each relay that is still running must be back to its fd baseline and
    must exit 0 on SIGTERM.
    """
    factory = RelayFactory(tmp_path)
    try:
        yield factory
        factory.check_and_stop_all()
    finally:
        factory.kill_all()
