"""Settings that are valid but probably not what the user meant (pure).

`check` prints these, and the relay logs them at warning level whenever it loads a
config, at start and on every reload."""

from __future__ import annotations

from splicerelay.config.addresses import UnixAddress
from splicerelay.config.model import Config, Route


def config_warnings(config: Config) -> list[str]:
    """One line per risky setting in `config`, in route order."""
    warnings: list[str] = []
    for route in config.routes:
        warnings.extend(_route_warnings(route))
    return warnings


def _route_warnings(route: Route) -> list[str]:
    where = f"route {route.name!r}"
    if route.accept_proxy_protocol and not route.proxy_protocol_trusted:
        return [
            f"{where}: accept_proxy_protocol is on and proxy_protocol_trusted is empty:"
            f" any client that reaches {route.listen} can claim any address and get past"
            " allow/deny; list the proxies in front in proxy_protocol_trusted"
        ]
    if route.proxy_protocol_trusted and not route.accept_proxy_protocol:
        return [f"{where}: proxy_protocol_trusted has no effect without accept_proxy_protocol"]
    if route.proxy_protocol_trusted and isinstance(route.listen, UnixAddress):
        # A unix socket peer has no address for the list to name, so none is trusted.
        return [
            f"{where}: proxy_protocol_trusted on a unix listener refuses every client"
            " (a unix socket peer has no address); leave it empty and let the socket"
            " file's permissions decide who may connect"
        ]
    if route.allow_applies_to != "both" and not route.accept_proxy_protocol:
        return [
            f"{where}: allow_applies_to has no effect without accept_proxy_protocol"
            " (the peer is the client)"
        ]
    return []
