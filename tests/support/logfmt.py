"""A tiny logfmt reader, to check what the relay's text log lines say field by field.

It is the tests' own, kept apart from the relay's writer (splicerelay/ops/logfmt.py), so
that the writer is checked against a reader rather than against itself.
"""

from __future__ import annotations

_ESCAPES = {'"': '"', "\\": "\\", "n": "\n", "r": "\r", "t": "\t"}


def parse_logfmt(text: str) -> dict[str, str]:
    """`key=value` pairs separated by single spaces; values bare or double-quoted with
    backslash escapes (\\" \\\\ \\n \\r \\t \\uXXXX \\UXXXXXXXX)."""
    fields: dict[str, str] = {}
    i = 0
    while i < len(text):
        equals = text.index("=", i)
        key = text[i:equals]
        assert key and " " not in key, f"bad key at {i}: {text!r}"
        i = equals + 1
        if text.startswith('"', i):
            value: list[str] = []
            i += 1
            while text[i] != '"':
                if text[i] == "\\":
                    code = text[i + 1]
                    if code in _ESCAPES:
                        value.append(_ESCAPES[code])
                        i += 2
                    else:
                        digits = {"u": 4, "U": 8}[code]
                        value.append(chr(int(text[i + 2 : i + 2 + digits], 16)))
                        i += 2 + digits
                else:
                    value.append(text[i])
                    i += 1
            i += 1  # the closing quote
            fields[key] = "".join(value)
        else:
            end = text.find(" ", i)
            end = len(text) if end == -1 else end
            fields[key] = text[i:end]
            assert fields[key], f"empty bare value at {i}: {text!r}"
            i = end
        if i < len(text):
            assert text[i] == " ", f"no space after a value at {i}: {text!r}"
            i += 1
            assert i < len(text), f"trailing space: {text!r}"
    return fields


def text_line_fields(line: str, message: str) -> dict[str, str]:
    """The fields of a text log line `TIME LEVEL MESSAGE k=v ...` with that message."""
    head = f" {message} "
    assert head in line, f"{message!r} not in {line!r}"
    return parse_logfmt(line.split(head, 1)[1])
