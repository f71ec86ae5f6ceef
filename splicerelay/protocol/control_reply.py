"""The control socket's replies: one line of compact JSON each (see protocol/control.py).

`{"ok":true,"data":...}` when a command did what it says, `{"ok":false,"error":"..."}`
when it did not; a failure may carry `data` too. Pure functions over bytes, like the
commands' parser.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Final

__all__ = [
    "MAX_REPLY_LENGTH",
    "Reply",
    "ReplyError",
    "decode_reply",
    "encode_reply",
    "error_reply",
    "ok_reply",
]

# What a client reads at most for one reply: `show connections` of a busy relay is big,
# but a reply larger than this is a broken server, not an answer.
MAX_REPLY_LENGTH: Final = 64 << 20


class ReplyError(ValueError):
    """A line that is not a reply of this protocol."""


@dataclass(frozen=True)
class Reply:
    """One reply: `ok` with its `data`, or not ok with an `error` (and maybe `data`)."""

    ok: bool
    data: Any = None
    error: str | None = None

    def __post_init__(self) -> None:
        if self.ok and self.error is not None:
            raise ValueError("a successful reply has no error")
        if not self.ok and not (isinstance(self.error, str) and self.error):
            raise ValueError("a failed reply needs an error message")


def ok_reply(data: object = None) -> Reply:
    return Reply(True, data)


def error_reply(message: str, data: object = None) -> Reply:
    return Reply(False, data, message)


def encode_reply(reply: Reply) -> bytes:
    """One line of compact JSON with its `\\n`.

    `data` must be JSON data (dicts with string keys, lists, tuples, strings, numbers,
    booleans, None); anything else raises TypeError or ValueError (NaN, say)."""
    body: dict[str, object] = {"ok": reply.ok}
    if reply.ok:
        body["data"] = reply.data
    else:
        body["error"] = reply.error
        if reply.data is not None:
            body["data"] = reply.data
    # ensure_ascii: the line is then plain ASCII whatever the data holds (a lone
    # surrogate in a str, say, could not be written as UTF-8), and never holds a raw
    # newline, which would end the reply early.
    text = json.dumps(body, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    return text.encode("ascii") + b"\n"


def decode_reply(line: bytes) -> Reply:
    """The reply on one line (its `\\n` may be there or not). Raises ReplyError only."""
    try:
        body = json.loads(line.decode("utf-8"), parse_constant=_no_constant)
    except (ValueError, RecursionError) as problem:
        # ValueError: not UTF-8, not JSON, or an integer too long for int();
        # RecursionError: arrays nested deeper than the parser's stack.
        raise ReplyError(f"not a JSON reply: {problem}") from None
    if not isinstance(body, dict) or not isinstance(body.get("ok"), bool):
        raise ReplyError("not a reply: expected a JSON object with a boolean 'ok'")
    if body["ok"]:
        return Reply(True, body.get("data"))
    error = body.get("error")
    if not isinstance(error, str) or not error:
        raise ReplyError("a failed reply without an error message")
    return Reply(False, body.get("data"), error)


def _no_constant(name: str) -> object:
    raise ValueError(f"{name} is not JSON")
