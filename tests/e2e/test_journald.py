"""The relay's diagnostics in the journal, at their own priority, under a real systemd.

journald gives every line of a service's stderr the unit's SyslogLevel (info), unless the
line starts with a `<N>` syslog priority prefix. The relay writes that prefix when it runs
under systemd (JOURNAL_STREAM is set), so `journalctl -p warning` shows its warnings and
hides its info lines. Only a real journald can check that.

Run it as root:

    .venv/bin/python -m pytest -q tests/e2e/test_journald.py

The first run builds a Debian rootfs with debootstrap (about a minute, at most four)
and caches it in the temp dir; set SPLICERELAY_TEST_ROOTFS=/some/dir to keep it
elsewhere. Later runs take seconds. Without root, debootstrap or systemd-nspawn (Debian
packages debootstrap, systemd-container) the test skips. See tests/support/container.py.
"""

from __future__ import annotations

import json
import socket
from typing import Any

import pytest

from tests.support.container import Container, service_journal, start_service
from tests.support.harness import free_port, poll_until, refused_port

ROUTE = "journal-probe"

# A real peer: systemd and journald, in a container. The first test of a session may first build
# the rootfs (bounded at 4 minutes): more than the default per-test timeout.
pytestmark = [pytest.mark.peer, pytest.mark.timeout(600)]


def config_text(listen_port: int, upstream_port: int) -> str:
    return (
        "metrics:\n"
        f"  listen: 127.0.0.1:{free_port()}\n"
        "log: {level: info, format: json, access_log: true}\n"
        "shutdown_timeout: 5s\n"
        "routes:\n"
        f"  - name: {ROUTE}\n"
        f"    listen: 127.0.0.1:{listen_port}\n"
        "    upstreams:\n"
        f"      - address: 127.0.0.1:{upstream_port}\n"
    )


def message(entry: dict[str, Any]) -> str:
    text = entry.get("MESSAGE", "")
    # journalctl -o json writes a message that is not valid UTF-8 as a list of bytes.
    return bytes(text).decode(errors="replace") if isinstance(text, list) else str(text)


def entries(container: Container, invocation: str, *options: str) -> list[dict[str, Any]]:
    """The journal entries that the relay's run `invocation` wrote itself (not systemd's)."""
    text = service_journal(container, "-o", "json", *options)
    found = [json.loads(line) for line in text.splitlines() if line.strip()]
    return [entry for entry in found if entry.get("_SYSTEMD_INVOCATION_ID") == invocation]


def connect_and_get_closed(port: int) -> None:
    """Connect through the relay; the relay closes (or resets) once its upstream refuses."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
        client.sendall(b"hello")
        try:
            while client.recv(4096):
                pass
        except ConnectionResetError:
            pass


def test_connect_failure_is_a_warning_and_info_lines_are_not(
    systemd_container: Container,
) -> None:
    upstream = refused_port()
    listen = free_port()
    invocation = start_service(systemd_container, config_text(listen, upstream))

    connect_and_get_closed(listen)

    def is_the_warning(entry: dict[str, Any]) -> bool:
        text = message(entry)
        return ROUTE in text and f"127.0.0.1:{upstream}" in text and "refused" in text

    warnings: list[dict[str, Any]] = []

    def warned() -> bool:
        nonlocal warnings
        warnings = entries(systemd_container, invocation, "-p", "warning")
        return any(is_the_warning(entry) for entry in warnings)

    try:
        poll_until(warned, 10, "the connect failure in journalctl -p warning", interval=0.1)
    except AssertionError as error:
        journal = service_journal(systemd_container, "-o", "verbose")[-6000:]
        raise AssertionError(f"{error}; the unit's journal ends with:\n{journal}") from None

    assert all(int(entry["PRIORITY"]) <= 4 for entry in warnings)
    # The prefix is parsed, not passed on: messages start with the relay's own text.
    assert not any(message(entry).startswith("<") for entry in warnings)

    # The relay's info lines (it says when it is ready, and the access log has a line for
    # the refused connection) are in the journal at info, and -p warning leaves them out.
    # (The access line comes through stdout, another stream than the warning's stderr,
    # and is written in a batch: it may reach the journal a moment later.)
    info: list[str] = []

    def access_line_in_journal() -> bool:
        nonlocal info
        everything = entries(systemd_container, invocation)
        info = [message(entry) for entry in everything if entry.get("PRIORITY") == "6"]
        return any('"connect_failed"' in line for line in info)

    poll_until(access_line_in_journal, 10, "the access line at info priority", interval=0.1)
    assert any('"ready"' in line for line in info), info
    shown = {message(entry) for entry in warnings}
    assert not shown & set(info)
