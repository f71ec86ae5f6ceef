"""Log output: JSON lines (the default, for journald and collectors) or plain text.

Diagnostics go to stderr. The access log, one line per finished connection, goes to
stdout so that it can be routed separately; it is written by ops/access_log.py in the
same formats, without going through `logging`. A text line is `TIME LEVEL MESSAGE` and then
the fields as logfmt (ops/logfmt.py). A stream connected to journald gets each line's
syslog priority as a `<N>` prefix (ops/journal.py).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Mapping
from typing import IO, Any

from splicerelay.ops.access_log import ACCESS_LOG
from splicerelay.ops.journal import JournalPriority, is_journal_stream
from splicerelay.ops.logfmt import format_fields

LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


def _timestamp(record: logging.LogRecord) -> str:
    seconds = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
    return f"{seconds}.{int(record.msecs):03d}Z"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": _timestamp(record),
            "level": record.levelname.lower(),
            "message": record.getMessage(),
        }
        entry.update(getattr(record, "fields", {}))
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        fields = getattr(record, "fields", {})
        extra = f" {format_fields(fields)}" if fields else ""
        line = f"{_timestamp(record)} {record.levelname.lower()} {record.getMessage()}{extra}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def stream_handler(
    stream: IO[str], formatter: logging.Formatter, environ: Mapping[str, str]
) -> logging.StreamHandler[IO[str]]:
    """A handler writing to `stream`, with priority prefixes if it is the journal's."""
    handler = logging.StreamHandler(stream)
    journal = is_journal_stream(stream, environ)
    handler.setFormatter(JournalPriority(formatter) if journal else formatter)
    return handler


def configure(
    level: str,
    format: str,
    access_log: bool,
    environ: Mapping[str, str] | None = None,
    worker: int | None = None,
) -> None:
    """Diagnostics to stderr and, if on, the access log to stdout; `environ` (default
    os.environ) says whether either stream is journald's. `worker` is the slot a worker
    process tags its access lines with."""
    environ = os.environ if environ is None else environ
    formatter: logging.Formatter = JsonFormatter() if format == "json" else TextFormatter()
    root = logging.getLogger("splicerelay")
    root.handlers.clear()
    root.addHandler(stream_handler(sys.stderr, formatter, environ))
    root.setLevel(LEVELS[level])
    root.propagate = False
    # The access log does not go through logging (see ops/access_log.py).
    ACCESS_LOG.configure(access_log, format, environ, worker)
