"""Log output: JSON lines (the default, for journald and collectors) or plain text.

Diagnostics go to stderr. The access log, one line per finished connection, goes to
stdout so that it can be routed separately.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

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
        extra = "".join(f" {key}={value}" for key, value in fields.items())
        line = f"{_timestamp(record)} {record.levelname.lower()} {record.getMessage()}{extra}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def configure(level: str, format: str, access_log: bool) -> None:
    formatter: logging.Formatter = JsonFormatter() if format == "json" else TextFormatter()
    root = logging.getLogger("splicerelay")
    root.handlers.clear()
    diagnostics = logging.StreamHandler(sys.stderr)
    diagnostics.setFormatter(formatter)
    root.addHandler(diagnostics)
    root.setLevel(LEVELS[level])
    root.propagate = False

    access = logging.getLogger("splicerelay.access")
    access.handlers.clear()
    access.propagate = False
    if access_log:
        lines = logging.StreamHandler(sys.stdout)
        lines.setFormatter(formatter)
        access.addHandler(lines)
        access.setLevel(logging.INFO)
    else:
        access.setLevel(logging.CRITICAL + 1)
