"""Shared fixtures: a relay subprocess per test, and peers on loopback."""

from __future__ import annotations

import pytest

from tests.support.harness import RelayFactory


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
