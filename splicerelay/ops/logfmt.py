"""logfmt: `key=value` pairs, the fields of a text log line.

A value is written bare when it can be read back bare: not empty, and free of spaces,
`=`, `"` and characters that are not printable. Otherwise it is double-quoted, with `"`
and `\\` escaped, and so are line breaks and other unprintable characters (`\\n`, `\\t`,
`\\u0085`), so that one record stays one line: journald and most collectors split on
newlines. Numbers are written as numbers, booleans as `true`/`false`, None as `""` (no
value), lists and mappings as compact JSON (then quoted like any other text).
"""

from __future__ import annotations

import json
from collections.abc import Mapping

_SHORT_ESCAPES = {'"': '\\"', "\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _needs_quotes(text: str) -> bool:
    return not text or any(ch in ' ="' or not ch.isprintable() for ch in text)


def _escape(ch: str) -> str:
    short = _SHORT_ESCAPES.get(ch)
    if short is not None:
        return short
    if ch.isprintable():
        return ch
    code = ord(ch)
    return f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}"


def quote(text: str) -> str:
    """`text` as a logfmt value: bare if it can be, else double-quoted and escaped."""
    if not _needs_quotes(text):
        return text
    return '"' + "".join(_escape(ch) for ch in text) + '"'


def value_text(value: object) -> str:
    """The text a field's value stands for, before quoting."""
    if value is None:
        return ""
    if isinstance(value, bool):  # (before int: a bool is an int)
        return "true" if value else "false"
    if isinstance(value, str):
        return value
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list | tuple | dict):
        return json.dumps(value, default=str, separators=(",", ":"), ensure_ascii=False)
    return str(value)


def format_fields(fields: Mapping[str, object]) -> str:
    """`key=value key=value` for every field, in order; "" for none."""
    return " ".join(f"{key}={quote(value_text(value))}" for key, value in fields.items())
