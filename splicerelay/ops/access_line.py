"""Access-log lines, built directly: one f-string per finished connection.

Stdlib `logging` made a LogRecord, a dict, a `json.dumps` and a `strftime` for every
connection, which cost the relay a fifth of its new-connection rate. A line here is its
route's prefix, computed once per route, and the few values that change, formatted
inline. The text is the same as the `logging` path wrote, field by field and in the same
order (ops/logs.py's JsonFormatter and TextFormatter), so that nothing reading the log
notices the change:

    {"time": "2026-01-02T03:04:05.678Z", "level": "info", "message": "connection",
     "route": "web", "client": "10.0.0.9:50000", "upstream": "10.0.0.2:8000",
     "bytes_in": 12, "bytes_out": 34, "duration_seconds": 0.0123, "outcome": "ok"}

    2026-01-02T03:04:05.678Z info connection route=web client=10.0.0.9:50000 ...

A worker adds `worker` last, as its log filter did. A stream that is journald's gets the
`<6>` (info) priority prefix.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable

from splicerelay.ops.journal import INFO
from splicerelay.ops.logfmt import quote, value_text


class MillisecondClock:
    """The ISO 8601 UTC time of now, formatted at most once per millisecond.

    Many connections end within one millisecond under load; they share one string.
    """

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._millisecond = -1
        self._second = -1
        self._second_text = ""
        self._text = ""

    def now(self) -> str:
        millisecond = int(self._clock() * 1000)
        if millisecond != self._millisecond:
            self._millisecond = millisecond
            second, fraction = divmod(millisecond, 1000)
            if second != self._second:
                self._second = second
                self._second_text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            self._text = f"{self._second_text}.{fraction:03d}Z"
        return self._text


def json_string(text: str) -> str:
    """`text` as a JSON string, as json.dumps writes it (ASCII only, escapes included)."""
    if text.isascii() and text.isprintable() and '"' not in text and "\\" not in text:
        return f'"{text}"'  # nothing to escape: the common case, without json's machinery
    return json.dumps(text)


class AccessLineFormat:
    """Builds access-log lines in one format ("json" or "text"), each ending in "\\n".

    `journal`: the output is journald's stream, so each line starts with `<6>`.
    `worker`: the worker slot to add to each line, or None (a relay without workers).
    """

    def __init__(self, format: str, journal: bool = False, worker: int | None = None) -> None:
        self.format = format
        self._json = format == "json"
        self._priority = f"<{INFO}>" if journal else ""
        if worker is None:
            self._suffix = "}\n" if self._json else "\n"
        else:
            self._suffix = f', "worker": {worker}}}\n' if self._json else f" worker={worker}\n"
        # Per route name and per upstream label: both come from the config, so these
        # stay as small as it is. Client addresses do not, and are not cached.
        self._route_parts: dict[str, str] = {}
        self._upstream_parts: dict[str | None, str] = {}

    def line(
        self,
        timestamp: str,
        route: str,
        client: str,
        upstream: str | None,
        bytes_in: int,
        bytes_out: int,
        duration_seconds: float,
        outcome: str,
        sni: str | None = None,
        alpn: tuple[str, ...] | None = None,
        tls_error: str | None = None,
    ) -> str:
        """One finished connection's line. `upstream` is None when no upstream was tried.

        `alpn` is None except on a listener that routes by TLS ClientHello, whose lines
        end with the hello's `sni` (null when it named none), `alpn` (a list) and
        `tls_error` (why no valid hello came: outcome tls_inspect_failed's reason, else
        null) after the outcome; every other line is as it always was."""
        route_part = self._route_parts.get(route)
        if route_part is None:
            route_part = self._route_parts[route] = self._route_part(route)
        upstream_part = self._upstream_parts.get(upstream)
        if upstream_part is None:
            upstream_part = self._upstream_parts[upstream] = self._upstream_part(upstream)
        duration = round(duration_seconds, 6)
        hello = "" if alpn is None else self._hello_part(sni, alpn, tls_error)
        if self._json:
            return (
                f'{self._priority}{{"time": "{timestamp}"{route_part}'
                f'"client": {json_string(client)}{upstream_part}'
                f'"bytes_in": {bytes_in}, "bytes_out": {bytes_out}, '
                f'"duration_seconds": {duration!r}, "outcome": "{outcome}"{hello}{self._suffix}'
            )
        return (
            f"{self._priority}{timestamp}{route_part}client={quote(client)}{upstream_part}"
            f"bytes_in={bytes_in} bytes_out={bytes_out} duration_seconds={duration!r} "
            f"outcome={outcome}{hello}{self._suffix}"
        )

    def _hello_part(self, sni: str | None, alpn: tuple[str, ...], tls_error: str | None) -> str:
        """The ClientHello's fields, after the outcome, as the logging formatters wrote
        a str-or-None and a list (text: logfmt, the list as compact JSON). The client
        chose them, so they are escaped like any value."""
        if self._json:
            name = "null" if sni is None else json_string(sni)
            protocols = ", ".join(json_string(protocol) for protocol in alpn)
            error = "null" if tls_error is None else json_string(tls_error)
            return f', "sni": {name}, "alpn": [{protocols}], "tls_error": {error}'
        return (
            f" sni={quote(sni or '')} alpn={quote(value_text(list(alpn)))}"
            f" tls_error={quote(tls_error or '')}"
        )

    def _route_part(self, route: str) -> str:
        """What follows the timestamp up to the client's value, for `route`."""
        if self._json:
            return f', "level": "info", "message": "connection", "route": {json_string(route)}, '
        return f" info connection route={quote(route)} "

    def _upstream_part(self, upstream: str | None) -> str:
        """From after the client's value up to bytes_in, for `upstream`."""
        if self._json:
            value = "null" if upstream is None else json_string(upstream)
            return f', "upstream": {value}, '
        return f" upstream={quote(upstream or '')} "
