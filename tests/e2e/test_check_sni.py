"""`splicerelay check` on routes that share a listener by TLS ClientHello: it prints each
such listener's routing table after the effective config, as YAML comments, so that
what it prints is still a config it reads back; conflicts are FILE:LINE errors."""

from __future__ import annotations

import re
from pathlib import Path

from tests.support.ctl import splicerelay

SHARED = """\
routes:
  - name: app
    listen: 127.0.0.1:18443
    match: {sni: [app.example.com, "*.app.example.com"]}
    upstreams: [{address: 127.0.0.1:18002}]
  - name: api
    listen: 127.0.0.1:18443
    match: {sni: [Api.Example.Com], alpn: [h2, http/1.1]}
    upstreams: [{address: 127.0.0.1:18003}]
  - name: fallback
    listen: 127.0.0.1:18443
    upstreams: [{address: 127.0.0.1:18004}]
  - name: plain
    listen: 127.0.0.1:18080
    upstreams: [{address: 127.0.0.1:18000}]
  - name: acme
    listen: 127.0.0.1:18444
    match: {alpn: [acme-tls/1]}
    tls_inspect_timeout: 250ms
    upstreams: [{address: 127.0.0.1:18005}]
"""

TABLES = """\
# listener 127.0.0.1:18443 routes by TLS ClientHello (inspect timeout 5s, hello up to 16389B):
#   app.example.com                  -> app
#   api.example.com alpn h2,http/1.1 -> api
#   *.app.example.com                -> app
#   anything else                    -> fallback
# listener 127.0.0.1:18444 routes by TLS ClientHello (inspect timeout 250ms, hello up to 16389B):
#   any name or none, alpn acme-tls/1 -> acme
#   anything else                     -> closed (no_route)
"""


def test_check_prints_each_routing_table_after_the_config(tmp_path: Path) -> None:
    path = tmp_path / "relay.yaml"
    path.write_text(SHARED)
    result = splicerelay("check", "-c", str(path))
    assert result.returncode == 0, result.stderr
    assert result.stdout.endswith("  allow_applies_to: both\n" + TABLES)
    assert "  match:\n    sni:\n    - api.example.com\n" in result.stdout
    # What check prints is a config that check reads back to the same output.
    again = tmp_path / "effective.yaml"
    again.write_text(result.stdout)
    assert splicerelay("check", "-c", str(again)).stdout == result.stdout


def test_check_without_shared_listeners_prints_no_table(tmp_path: Path) -> None:
    path = tmp_path / "relay.yaml"
    path.write_text(
        "routes:\n  - name: plain\n    listen: 127.0.0.1:18080\n"
        "    upstreams: [{address: 127.0.0.1:18000}]\n"
    )
    result = splicerelay("check", "-c", str(path))
    assert result.returncode == 0, result.stderr
    assert "routes by TLS ClientHello" not in result.stdout


def test_check_refuses_two_fallbacks_with_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "relay.yaml"
    path.write_text(
        SHARED + "  - name: second\n    listen: 127.0.0.1:18443\n"
        "    upstreams: [{address: 127.0.0.1:18006}]\n"
    )
    result = splicerelay("check", "-c", str(path))
    assert result.returncode == 1
    assert result.stdout == ""
    (line,) = result.stderr.strip().splitlines()
    assert re.fullmatch(
        rf"{re.escape(str(path))}:22: routes\[5\]\.listen: 127\.0\.0\.1:18443 already has a"
        r" route without match, route 'fallback' \(line 11\): .*",
        line,
    ), line
