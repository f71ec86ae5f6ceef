"""Running `splicerelay ctl` and `splicerelay reload` as users do, for the e2e tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

from tests.support.harness import Relay

COMMAND_TIMEOUT = 90.0  # above `reload`'s own 60 s wait


def splicerelay(
    *args: str, env: dict[str, str] | None = None, prefix: list[str] | None = None
) -> subprocess.CompletedProcess[str]:
    """`splicerelay ARGS`, with stdin closed and no terminal (as systemd runs ExecReload=)."""
    return subprocess.run(
        [*(prefix or []), sys.executable, "-m", "splicerelay", *args],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=COMMAND_TIMEOUT,
        env={**os.environ, **(env or {})},
        check=False,
    )


def ctl_json(*words: str, env: dict[str, str] | None = None) -> Any:
    """`splicerelay ctl --json WORDS`: the reply's data; the command must succeed."""
    result = splicerelay("ctl", "--json", *words, env=env)
    assert result.returncode == 0, f"ctl {' '.join(words)}: {result.stdout}{result.stderr}"
    reply = json.loads(result.stdout)
    assert reply["ok"] is True, reply
    return reply["data"]


def ready_fields(relay: Relay) -> dict[str, Any]:
    """The fields of the relay's "ready" log line (log format json)."""
    for line in relay.stderr().splitlines():
        if line.startswith("{"):
            record = json.loads(line)
            if record.get("message") == "ready":
                return dict(record)
    raise AssertionError(f"no ready line in: {relay.stderr()}")


def reload_count(relay: Relay) -> float:
    """Reloads counted by the relay, whatever their result."""
    return relay.metrics().get("splicerelay_config_reloads_total", default=0.0)
