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
    if not route.accept_proxy_protocol:
        # Without it no trust setting does anything: one line for each one that is set.
        unused: list[str] = []
        if route.proxy_protocol_trusted:
            unused.append(
                f"{where}: proxy_protocol_trusted has no effect without accept_proxy_protocol"
            )
        if route.allow_applies_to != "both":
            unused.append(
                f"{where}: allow_applies_to has no effect without accept_proxy_protocol"
                " (the peer is the client)"
            )
        return unused
    unix = isinstance(route.listen, UnixAddress)
    if not route.proxy_protocol_trusted:
        untrusted = f"{where}: accept_proxy_protocol is on and proxy_protocol_trusted is empty:"
        if unix:
            # Why not the advice below: a unix socket peer has no address for the list to
            # name, so a list would refuse every client; the file's mode is the trust.
            return [
                f"{untrusted} any process that may connect to {route.listen} can claim any"
                " address and get past allow/deny; let only the proxies in front connect"
                " (the socket file's owner and mode), as proxy_protocol_trusted cannot name"
                " a unix socket peer"
            ]
        return [
            f"{untrusted} any client that reaches {route.listen} can claim any address and"
            " get past allow/deny; list the proxies in front in proxy_protocol_trusted"
        ]
    if unix:
        # A unix socket peer has no address for the list to name, so none is trusted.
        return [
            f"{where}: proxy_protocol_trusted on a unix listener refuses every client"
            " (a unix socket peer has no address); leave it empty and let the socket"
            " file's permissions decide who may connect"
        ]
    return []
