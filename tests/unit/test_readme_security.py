"""The README's word on spoofed PROXY headers and the header bound, against the code.

An operator reads the Security section to learn who may claim a client address and how
large a header a stranger can make the relay read: it must name the trusted-proxy
setting and the bound, and every default the README states for the bound must be the
one the config applies.
"""

from __future__ import annotations

import re
from pathlib import Path

from splicerelay.config import DEFAULT_PROXY_PROTOCOL_MAX_HEADER, parse_config
from splicerelay.config.model import MAX_PROXY_PROTOCOL_MAX_HEADER, MIN_PROXY_PROTOCOL_MAX_HEADER
from splicerelay.config.units import format_size

README = Path(__file__).resolve().parents[2] / "README.md"
# "`proxy_protocol_max_header` (4 KiB by default)", wherever the prose states it.
PROSE_DEFAULT = re.compile(r"`proxy_protocol_max_header` \((\d+) KiB by default\)")
# The config reference's row: "| `routes[].proxy_protocol_max_header` | `4KiB` | ...(256 B
# to 65,551 B)..."
TABLE_ROW = re.compile(
    r"^\| `routes\[\]\.proxy_protocol_max_header` \| `([^`]+)` \|.*?"
    r"\(([\d,]+) B to ([\d,]+) B\)",
    re.MULTILINE,
)
ONE_ROUTE = "routes: [{name: web, listen: 127.0.0.1:8080, upstreams: [{address: 127.0.0.1:8000}]}]"


def section(text: str, title: str) -> str:
    """The body of the `## title` section: up to the next heading of the same level."""
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert match, f"README has no '## {title}' section"
    return match.group(1)


def test_the_security_section_names_the_trusted_proxies_and_the_header_bound() -> None:
    security = section(README.read_text(), "Security")
    for setting in ("proxy_protocol_trusted", "allow_applies_to", "proxy_protocol_max_header"):
        assert f"`{setting}`" in security, setting
    assert PROSE_DEFAULT.search(security), "the bound's default, in the Security section"


def test_every_stated_default_of_the_header_bound_is_the_one_applied() -> None:
    text = README.read_text()
    stated = [int(kib) << 10 for kib in PROSE_DEFAULT.findall(text)]
    assert len(stated) >= 2, "the Security and PROXY protocol sections state it"
    route = parse_config(ONE_ROUTE, "relay.yaml").routes[0]
    assert set(stated) == {route.proxy_protocol_max_header} == {DEFAULT_PROXY_PROTOCOL_MAX_HEADER}
    (row,) = TABLE_ROW.findall(text)
    default, low, high = row
    assert default == format_size(DEFAULT_PROXY_PROTOCOL_MAX_HEADER)
    assert int(low.replace(",", "")) == MIN_PROXY_PROTOCOL_MAX_HEADER
    assert int(high.replace(",", "")) == MAX_PROXY_PROTOCOL_MAX_HEADER
