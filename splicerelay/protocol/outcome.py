"""How a connection ended: the `outcome` label of `splicerelay_connections_total`."""

from __future__ import annotations

from enum import StrEnum


class Outcome(StrEnum):
    """How a connection ended; the `outcome` label of connections_total."""

    COMPLETED = "completed"  # both directions reached EOF
    CLIENT_RESET = "client_reset"  # the client reset or failed
    UPSTREAM_RESET = "upstream_reset"  # the upstream reset or failed
    CONNECT_FAILED = "connect_failed"  # no upstream accepted the connection
    IDLE_TIMEOUT = "idle_timeout"  # no byte either way for idle_timeout
    SHUTDOWN = "shutdown"  # still running when the shutdown timeout ran out
    DENIED = "denied"  # the client address is not allowed on this route
    NO_UPSTREAM = "no_upstream"  # every upstream is down
    BAD_PROXY_HEADER = "bad_proxy_header"  # accept_proxy_protocol, and no valid header came
    # accept_proxy_protocol, and the peer is not in proxy_protocol_trusted: closed
    # before a byte was read, since whatever header it sends is a claim it may not make.
    PROXY_UNTRUSTED = "proxy_untrusted"
    MAX_DURATION = "max_duration"  # open for longer than max_duration
    SOURCE_LIMIT = "source_limit"  # the client address already holds its maximum
    # Closed by an operator over the control socket: `kill connection ID`, or
    # `set upstream ... state maint --kill-connections` for the upstream's connections.
    KILLED = "killed"
    # The relay's own bug (an exception it did not expect while setting a connection up
    # or relaying it), logged with its traceback; never a peer's doing. Both sides get a
    # reset, since bytes may have been lost. Any count here is a bug worth reporting.
    INTERNAL_ERROR = "internal_error"
    # On a listener that routes by TLS ClientHello: a whole, valid hello came that no
    # route's match takes, and the listener has no fallback route.
    NO_ROUTE = "no_route"
    # On a listener that routes by TLS ClientHello: no valid hello came (see
    # InspectFailure for why); the `reason` label of connections_total says which.
    TLS_INSPECT_FAILED = "tls_inspect_failed"
    # On such a listener: the hello chose a route at its max_connections, and no slot
    # freed before tls_inspect_timeout (from accept) ran out. Bounded, so that clients
    # of one full route cannot hold the listener's other routes back for long.
    ROUTE_LIMIT = "route_limit"


class InspectFailure(StrEnum):
    """Why a connection on a TLS-routing listener got no valid ClientHello: the `reason`
    label of connections_total for outcome tls_inspect_failed. A small fixed set, since
    a label's values must be bounded (the SNI itself is never a label)."""

    TIMEOUT = "timeout"  # no complete hello within tls_inspect_timeout
    NOT_TLS = "not_tls"  # the first bytes are no TLS handshake (plain HTTP, SSLv2, ...)
    TOO_LARGE = "too_large"  # the hello would exceed tls_max_client_hello
    MALFORMED = "malformed"  # TLS, but a broken hello (lengths that overrun, ...)
    TRUNCATED = "truncated"  # the client closed its side before the hello was complete
