"""The configuration's own value types, read from YAML nodes: durations, sizes, addresses,
networks and payloads. Knows the units and the address syntax, nothing of the schema."""

from __future__ import annotations

import ipaddress

import yaml

from splicerelay.config.addresses import Address, AddressError, parse_address
from splicerelay.config.model import Network
from splicerelay.config.nodes import FLOAT, INT, NULL, STR, NodeReader, describe, is_scalar, quote
from splicerelay.config.units import (
    DURATION_HINT,
    SIZE_HINT,
    format_size,
    parse_duration,
    parse_size,
)


class ValueReader(NodeReader):
    """A NodeReader that also reads the config's value types; each reports its own
    problems, in the units' and addresses' own words."""

    def duration(self, node: yaml.Node, path: str, *, or_null: bool = False) -> float | None:
        """The duration at `node`, or None: reported, unless it is null and `or_null`."""
        if or_null and is_scalar(node, NULL):
            return None
        if not is_scalar(node, STR, INT, FLOAT):
            expected = f"a duration ({DURATION_HINT}){' or null' if or_null else ''}"
            self.report(node, path, f"expected {expected}, got {describe(node)}")
            return None
        try:
            return parse_duration(node.value)
        except ValueError as error:
            self.report(node, path, str(error))
            return None

    def size(self, node: yaml.Node, path: str, low: int, high: int) -> int | None:
        if not is_scalar(node, STR, INT, FLOAT):
            self.report(node, path, f"expected a size ({SIZE_HINT}), got {describe(node)}")
            return None
        try:
            value = parse_size(node.value)
        except ValueError as error:
            self.report(node, path, str(error))
            return None
        if not low <= value <= high:
            self.report(
                node,
                path,
                f"{format_size(value)} is out of range ({format_size(low)} to {format_size(high)})",
            )
            return None
        return value

    def address(self, node: yaml.Node, path: str) -> Address | None:
        text = self.string(node, path, "an address (host:port, [v6]:port or unix:/path)")
        if text is None:
            return None
        try:
            return parse_address(text)
        except AddressError as error:
            self.report(node, path, str(error))
            return None

    def networks(self, node: yaml.Node, path: str) -> tuple[Network, ...]:
        items = self.sequence(node, path)
        networks: list[Network] = []
        for index, item in enumerate(items or []):
            item_path = f"{path}[{index}]"
            text = self.string(item, item_path, "a network such as 10.0.0.0/8 or ::1/128")
            if text is not None:
                network = self.network(item, item_path, text)
                if network is not None:
                    networks.append(network)
        return tuple(networks)

    def network(self, node: yaml.Node, path: str, text: str) -> Network | None:
        try:
            return ipaddress.ip_network(text, strict=True)
        except ValueError:
            pass
        try:
            hint = f"host bits are set; did you mean {ipaddress.ip_network(text, strict=False)}?"
        except ValueError:
            hint = "expected an IPv4 or IPv6 address or network, e.g. 10.0.0.0/8 or fd00::/8"
        self.report(node, path, f"bad network {quote(text)}: {hint}")
        return None

    def payload(self, node: yaml.Node, path: str, omitted: str) -> bytes | None:
        """Bytes written as a YAML string and encoded as UTF-8 (in double quotes, YAML's
        escapes such as \\r\\n apply), or None for null. An empty string is a problem:
        leaving the key out says that more plainly."""
        if is_scalar(node, NULL):
            return None
        text = self.string(node, path)
        if text is None:
            return None
        if not text:
            self.report(node, path, f"must not be empty (leave it out {omitted})")
            return None
        return text.encode("utf-8")
