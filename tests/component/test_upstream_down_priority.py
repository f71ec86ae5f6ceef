"""An upstream's health turning is logged where `journalctl -p warning` finds it.

The lines come from the real health state of a member built from a config: "upstream
down" is a warning (syslog priority 4, shown by `-p warning`), "upstream up" info
(priority 6, hidden by it). That each level gets its `<N>` prefix on the journal's
stream is tests/unit/test_logs_journal.py's part.
"""

from __future__ import annotations

import logging

import pytest

from splicerelay.config import parse_config
from splicerelay.datapath.stats import UpstreamStats
from splicerelay.ops.journal import syslog_priority
from splicerelay.relay.upstreams import make_upstreams

CONFIG = """\
routes:
  - name: web
    listen: 127.0.0.1:8080
    upstreams:
      - address: 127.0.0.1:8000
    health_check: {interval: 5s, timeout: 1s, rise: 2, fall: 3}
"""
SHOWN_BY_P_WARNING = 4  # journalctl -p warning: priorities 0 to 4


def test_upstream_down_is_a_warning_and_upstream_up_is_not(
    caplog: pytest.LogCaptureFixture,
) -> None:
    route = parse_config(CONFIG, "relay.yaml").routes[0]
    assert route.health_check is not None
    (member,) = make_upstreams(route.upstreams, route.health_check, UpstreamStats, route=route.name)
    caplog.set_level(logging.DEBUG, logger="splicerelay")
    for _ in range(route.health_check.fall):
        member.record_check(False)
    assert not member.health.up
    for _ in range(route.health_check.rise):
        member.record_check(True)
    assert member.health.up
    turns = [
        (record.getMessage(), syslog_priority(record.levelno), record.fields)  # type: ignore[attr-defined]
        for record in caplog.records
        if record.getMessage() in ("upstream down", "upstream up")
    ]
    fields = {"route": "web", "upstream": "127.0.0.1:8000"}
    assert turns == [("upstream down", 4, fields), ("upstream up", 6, fields)]
    assert turns[0][1] <= SHOWN_BY_P_WARNING < turns[1][1]
