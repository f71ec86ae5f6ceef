"""The access log: one line on stdout per finished connection, cheap enough to keep on.

`ACCESS_LOG` is the process's one access log, as `logging` has one logger tree: the
service configures it from `log:` (ops/logs.configure) and the relay hands it each
finished connection. A line is built directly (ops/access_line.py) into a bounded
buffer that is written in batches without blocking (ops/access_output.py): after a
reactor round once a full write's worth is waiting (`flush_round`), otherwise within
FLUSH_INTERVAL of the first line waiting (`keep_flushing`), before the format changes
on a reload, and at exit (`close`).
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import IO

import trio

from splicerelay.ops.access_line import AccessLineFormat, MillisecondClock
from splicerelay.ops.access_output import FLUSH_INTERVAL, PIPE_BUF, AccessOutput, Output
from splicerelay.ops.journal import is_journal_stream

# Bytes of lines that make a reactor round write them out (see AccessLog.flush_round).
ROUND_FLUSH_BYTES = PIPE_BUF


class TextStreamOutput(Output):
    """A stream without an fd (a test's capture): written through, as logging did."""

    def __init__(self, stream: IO[str]) -> None:
        self.fd = -1
        self.chunk = 1 << 16
        self._stream = stream

    def write(self, data: memoryview) -> int:
        self._stream.write(bytes(data).decode("utf-8", "backslashreplace"))
        self._stream.flush()
        return len(data)

    def close(self) -> None:
        """The stream is not ours to close."""


def open_output(stream: IO[str]) -> Output:
    try:
        fd = stream.fileno()
    except (AttributeError, OSError, ValueError):
        return TextStreamOutput(stream)
    return Output(fd)


class AccessLog:
    """Turned on and formatted by `configure`; `write` is a no-op while it is off."""

    def __init__(self) -> None:
        self.enabled = False
        self._format = AccessLineFormat("json")
        self._clock = MillisecondClock()
        self._buffer: AccessOutput | None = None
        self._dropped_before = 0  # lines dropped by outputs closed since
        self._lines_waiting = trio.Event()

    @property
    def dropped(self) -> int:
        """Lines lost for good since the process started (see AccessOutput)."""
        current = 0 if self._buffer is None else self._buffer.dropped
        return self._dropped_before + current

    def configure(
        self,
        enabled: bool,
        format: str,
        environ: Mapping[str, str],
        worker: int | None = None,
        stream: IO[str] | None = None,
    ) -> None:
        """On or off, in `format`, to `stream` (default: stdout); what is buffered in
        the old format is written first."""
        self.flush()
        stream = sys.stdout if stream is None else stream
        self._format = AccessLineFormat(format, is_journal_stream(stream, environ), worker)
        self.enabled = enabled
        if enabled and self._buffer is None:
            self._buffer = AccessOutput(open_output(stream))

    def write(
        self,
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
    ) -> None:
        """One finished connection's line (see AccessLineFormat.line)."""
        buffer = self._buffer
        if not self.enabled or buffer is None:
            return
        if not buffer.pending:
            # The first line since the last write: it goes out within FLUSH_INTERVAL,
            # or sooner if a round gathers a full write's worth.
            self._lines_waiting.set()
        buffer.add(
            self._format.line(
                self._clock.now(),
                route,
                client,
                upstream,
                bytes_in,
                bytes_out,
                duration_seconds,
                outcome,
                sni,
                alpn,
                tls_error,
            )
        )

    def flush(self) -> None:
        """Write what the output takes now."""
        if self._buffer is not None:
            self._buffer.flush()

    def flush_round(self) -> None:
        """After a reactor round: write once a full write's worth is waiting.

        Why not every round: under a storm of short connections a round ends only a few
        of them, and a write per round cost more than building the lines. Fewer lines
        than that wait for `keep_flushing`, at most FLUSH_INTERVAL.
        """
        buffer = self._buffer
        if buffer is not None and buffer.pending >= ROUND_FLUSH_BYTES:
            buffer.flush()

    async def keep_flushing(self) -> None:
        """Write every line within FLUSH_INTERVAL of the first one waiting."""
        while True:
            await self._lines_waiting.wait()
            self._lines_waiting = trio.Event()
            await trio.sleep(FLUSH_INTERVAL)
            self.flush()
            if self._buffer is not None and self._buffer.pending:
                self._lines_waiting.set()  # the output is blocked: try again later

    def close(self) -> None:
        """Write the rest (waiting a bounded time for the output) and let go of it."""
        buffer, self._buffer = self._buffer, None
        if buffer is not None:
            buffer.close()
            self._dropped_before += buffer.dropped


ACCESS_LOG = AccessLog()
