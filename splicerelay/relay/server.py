"""The running relay's public names, from the modules that hold them.

- lifecycle.py: `Relay` (serve, reload, drain and stop)
- routes.py: `RouteRuntime`, `prepare_routes`, `StartupError`, `is_allowed`, endpoints
- admission.py: the accept loops, their limits, fd headroom and accept() back-off
- connection_setup.py: from an accepted client to a relayed session (PROXY header, rules, connect)
- sessions.py: the table of open connections, their accounting, `session_record`
- timers.py: connect timeouts, idle timeouts and max duration
"""

from __future__ import annotations

from splicerelay.relay.admission import (
    ACCEPT_BACKOFF_SECONDS,
    ACCEPT_BATCH,
    ACCEPT_CONNECTION_ERRORS,
    ACCEPT_RESOURCE_ERRORS,
    FD_RESERVE,
    count_open_fds,
    open_file_limit,
)
from splicerelay.relay.lifecycle import Relay
from splicerelay.relay.routes import (
    IPNetwork,
    RouteRuntime,
    StartupError,
    endpoint_of,
    format_endpoint,
    is_allowed,
    prepare_routes,
)
from splicerelay.relay.sessions import AccessLogger, session_record

__all__ = [
    "ACCEPT_BACKOFF_SECONDS",
    "ACCEPT_BATCH",
    "ACCEPT_CONNECTION_ERRORS",
    "ACCEPT_RESOURCE_ERRORS",
    "FD_RESERVE",
    "AccessLogger",
    "IPNetwork",
    "Relay",
    "RouteRuntime",
    "StartupError",
    "count_open_fds",
    "endpoint_of",
    "format_endpoint",
    "is_allowed",
    "open_file_limit",
    "prepare_routes",
    "session_record",
]
