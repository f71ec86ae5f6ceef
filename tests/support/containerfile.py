"""A Containerfile read as its instructions, for tests that check what an image does.

Only as much of the format as the shipped file uses: comment lines, lines continued with
a backslash, exec-form (JSON array) arguments, and ENV in its KEY=VALUE form.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass


@dataclass(frozen=True)
class Instruction:
    keyword: str  # upper case: FROM, RUN, ...
    arguments: str  # the rest, continuation lines joined with a space
    line: int  # where it starts, from 1

    def exec_form(self) -> list[str] | None:
        """The arguments as a JSON array of strings (exec form), or None (shell form)."""
        if not self.arguments.startswith("["):
            return None
        try:
            value = json.loads(self.arguments)
        except json.JSONDecodeError:
            return None
        if isinstance(value, list) and all(isinstance(item, str) for item in value):
            return value
        return None

    def assignments(self) -> dict[str, str]:
        """ENV's (or ARG's) KEY=VALUE pairs, quotes removed; ValueError for the older
        `ENV KEY VALUE` form, which this reader does not take."""
        pairs: dict[str, str] = {}
        for word in shlex.split(self.arguments):
            key, equals, value = word.partition("=")
            if not equals:
                raise ValueError(f"line {self.line}: {word!r} is not KEY=VALUE")
            pairs[key] = value
        return pairs


def final_stage(instructions: list[Instruction]) -> list[Instruction]:
    """The instructions from the last FROM on: the ones that make the image."""
    starts = [index for index, i in enumerate(instructions) if i.keyword == "FROM"]
    return instructions[starts[-1] :] if starts else instructions


def environment(instructions: list[Instruction]) -> dict[str, str]:
    """The variables the final image's ENV instructions set (later ones win).

    Values are taken as written: a `$PATH` in one stays `$PATH`."""
    found: dict[str, str] = {}
    for instruction in final_stage(instructions):
        if instruction.keyword == "ENV":
            found.update(instruction.assignments())
    return found


def parse(text: str) -> list[Instruction]:
    instructions: list[Instruction] = []
    parts: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        # A comment line, also one inside a continued instruction, is not part of it.
        if not line or line.startswith("#"):
            continue
        if not parts:
            start = number
        continued = line.endswith("\\")
        parts.append(line[:-1].strip() if continued else line)
        if not continued:
            keyword, _, arguments = " ".join(parts).partition(" ")
            instructions.append(Instruction(keyword.upper(), arguments.strip(), start))
            parts = []
    if parts:
        raise ValueError(f"line {start}: the last instruction ends with a backslash")
    return instructions
