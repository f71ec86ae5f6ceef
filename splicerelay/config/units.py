"""Durations and sizes as the config writes them: "250ms", "5s", "1h"; "64KiB", "1MiB" (pure)."""

from __future__ import annotations

import math
import re
from decimal import Decimal

DURATION_HINT = "e.g. 250ms, 5s, 1.5s, 1m, 1h"
SIZE_HINT = "e.g. 4096B, 64KiB, 1MiB, 1GiB"

_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_DURATION = re.compile(r"(-?)([0-9]+(?:\.[0-9]+)?)([A-Za-z]*)", re.ASCII)

_SIZE_UNITS = {"B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}
_SIZE = re.compile(r"(-?)([0-9]+)([A-Za-z]*)", re.ASCII)
_MAX_SIZE_DIGITS = 15


def parse_duration(text: str) -> float:
    """Seconds in `text` such as "250ms", "5s", "1.5s", "1m" or "1h"; must be above zero."""
    match = _DURATION.fullmatch(text)
    if match is None:
        raise ValueError(f"bad duration {text!r}: expected a number and a unit ({DURATION_HINT})")
    sign, number, unit = match.groups()
    if not unit:
        raise ValueError(f"bad duration {text!r}: missing unit ({DURATION_HINT})")
    if unit not in _DURATION_UNITS:
        raise ValueError(f"bad duration {text!r}: unknown unit {unit!r} (expected ms, s, m or h)")
    # Seconds are taken as written, milliseconds divided rather than multiplied by 0.001,
    # so that format_duration can always find a spelling that parses back exactly.
    value = float(number) / 1000 if unit == "ms" else float(number) * _DURATION_UNITS[unit]
    if sign or value <= 0:
        raise ValueError(f"bad duration {text!r}: must be greater than zero")
    if not math.isfinite(value):
        raise ValueError(f"bad duration {text!r}: too large")
    return value


def format_duration(seconds: float) -> str:
    """The shortest spelling of `seconds` that parse_duration reads back exactly."""
    for unit in ("h", "m", "s", "ms"):
        scaled = seconds * 1000 if unit == "ms" else seconds / _DURATION_UNITS[unit]
        if scaled >= 1 and scaled.is_integer() and scaled < 1e15:
            text = f"{int(scaled)}{unit}"
            if _parses_to(text, seconds):
                return text
    # A decimal number of seconds, without exponent: float() reads it back exactly.
    return f"{Decimal(repr(seconds)):f}s"


def _parses_to(text: str, seconds: float) -> bool:
    try:
        return parse_duration(text) == seconds
    except ValueError:
        return False


def parse_size(text: str) -> int:
    """Bytes in `text` such as "4096B", "64KiB", "1MiB" or "1GiB"."""
    match = _SIZE.fullmatch(text)
    if match is None:
        raise ValueError(f"bad size {text!r}: expected a whole number and a unit ({SIZE_HINT})")
    sign, number, unit = match.groups()
    if not unit:
        raise ValueError(f"bad size {text!r}: missing unit ({SIZE_HINT})")
    if unit not in _SIZE_UNITS:
        raise ValueError(
            f"bad size {text!r}: unknown unit {unit!r} (expected B, KiB, MiB or GiB;"
            " 1KiB is 1024 bytes)"
        )
    if sign:
        raise ValueError(f"bad size {text!r}: must not be negative")
    if len(number) > _MAX_SIZE_DIGITS:
        raise ValueError(f"bad size {text!r}: too large")
    return int(number) * _SIZE_UNITS[unit]


def format_size(size: int) -> str:
    """`size` bytes in the largest unit that holds it exactly, e.g. "1MiB" or "4097B"."""
    for unit in ("GiB", "MiB", "KiB"):
        factor = _SIZE_UNITS[unit]
        if size >= factor and size % factor == 0:
            return f"{size // factor}{unit}"
    return f"{size}B"
