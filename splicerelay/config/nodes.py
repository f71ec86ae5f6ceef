"""A generic reader of composed YAML: typed values that keep their line numbers.

The YAML is composed into nodes rather than loaded into plain objects, so every value keeps
the line it was written on, and every problem is reported as `FILE:LINE: KEYPATH: message`.
A NodeReader collects all the problems it finds instead of stopping at the first. It knows
YAML (tags, merge keys, duplicate keys) and nothing of what the configuration means: the
schema is built on top of it.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Collection, Sequence
from dataclasses import dataclass

import yaml

from splicerelay.config.model import ConfigError

_TAG = "tag:yaml.org,2002:"
STR, INT, FLOAT, BOOL, NULL = (_TAG + name for name in ("str", "int", "float", "bool", "null"))
MAP, SEQ, _MERGE = (_TAG + name for name in ("map", "seq", "merge"))
_KINDS = {
    STR: "a string",
    INT: "an integer",
    FLOAT: "a number",
    BOOL: "a boolean",
    NULL: "null",
    MAP: "a mapping",
    SEQ: "a list",
}
_TRUE = ("true", "yes", "on")
_FALSE = ("false", "no", "off")
_SIMPLE_KEY = re.compile(r"[A-Za-z0-9_-]+", re.ASCII)
# Merge keys (<<) may pull in mappings that merge others in turn; this bounds the chain.
MAX_MERGE_DEPTH = 32


def describe(node: yaml.Node) -> str:
    """What a node is, for "expected X, got Y" messages."""
    tag = "!!" + node.tag[len(_TAG) :] if node.tag.startswith(_TAG) else node.tag
    kind = _KINDS.get(node.tag, f"a value tagged {tag}")
    if isinstance(node, yaml.ScalarNode) and node.tag != NULL:
        return f"{kind} ({quote(node.value)})"
    return kind


def quote(text: str, limit: int = 60) -> str:
    """`text` in quotes for a message, shortened to about `limit` characters."""
    return repr(text) if len(text) <= limit else repr(text[: limit - 3]) + "..."


def child_path(path: str, key: str) -> str:
    """The key path of `key` inside the mapping at `path`."""
    if not _SIMPLE_KEY.fullmatch(key):
        return f"{path}[{quote(key)}]"
    return f"{path}.{key}" if path else key


def is_scalar(node: yaml.Node, *tags: str) -> bool:
    return isinstance(node, yaml.ScalarNode) and node.tag in tags


def is_sequence(node: yaml.Node) -> bool:
    return isinstance(node, yaml.SequenceNode) and node.tag == SEQ


def boolean_value(node: yaml.Node) -> bool | None:
    """True or False for a YAML boolean scalar (true/yes/on, false/no/off), else None."""
    if is_scalar(node, BOOL):
        text = node.value.lower()
        if text in _TRUE or text in _FALSE:
            return text in _TRUE
    return None


def position(node: yaml.Node) -> tuple[int, int]:
    return (node.start_mark.line, node.start_mark.column)


def line_of(node: yaml.Node) -> int:
    """The line `node` starts on, counted from 1."""
    return node.start_mark.line + 1


def _yaml_int(text: str) -> int:
    """An integer as YAML 1.1 writes it (as PyYAML resolves it): 1_000, 0x1f, 017, 1:30."""
    value = text.replace("_", "")
    sign = 1
    if value.startswith(("-", "+")):
        sign = -1 if value[0] == "-" else 1
        value = value[1:]
    if value.startswith("0b"):
        return sign * int(value[2:], 2)
    if value.startswith("0x"):
        return sign * int(value[2:], 16)
    if value.startswith("0") and len(value) > 1:
        return sign * int(value, 8)
    if ":" in value:
        total = 0
        for part in value.split(":"):
            total = total * 60 + int(part)
        return sign * total
    return sign * int(value)


def _did_you_mean(word: str, options: Sequence[str]) -> str:
    close = difflib.get_close_matches(word, options, n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def _unknown_key_message(key: str, allowed: Sequence[str]) -> str:
    return f"unknown key{_did_you_mean(key, allowed)} (allowed keys: {', '.join(allowed)})"


@dataclass(frozen=True)
class CheckedMapping:
    """A checked YAML mapping: the node itself and the value node of each allowed key."""

    node: yaml.Node
    path: str
    fields: dict[str, yaml.Node]


class NodeReader:
    """Reads typed values out of composed YAML, collecting a problem for each bad one.

    Every reading method returns None after reporting a problem, so that a caller can go
    on and find the next one."""

    def __init__(self, filename: str) -> None:
        self.filename = filename
        self.problems: list[tuple[int, str]] = []
        self._merged_keys: dict[int, dict[str, tuple[yaml.Node, yaml.Node]]] = {}

    # -- reporting

    def report(self, node: yaml.Node, path: str, message: str) -> None:
        text = f"{path}: {message}" if path else message
        self.problems.append((line_of(node), text))

    def errors(self) -> list[str]:
        """One line per problem, in line order; a node reached twice is reported once."""
        lines = (
            " ".join(f"{self.filename}:{line}: {text}".splitlines())
            for line, text in sorted(self.problems, key=lambda problem: problem[0])
        )
        return list(dict.fromkeys(lines))

    # -- structure

    def mapping(
        self,
        node: yaml.Node,
        path: str,
        allowed: Sequence[str],
        *,
        elsewhere: Collection[str] = (),
        misplaced: str = "",
    ) -> CheckedMapping | None:
        """A mapping with only `allowed` keys. A key of `elsewhere` (allowed somewhere
        else) is reported with `misplaced`, which says where it belongs, if given."""
        if not isinstance(node, yaml.MappingNode) or node.tag != MAP:
            self.report(node, path, f"expected a mapping, got {describe(node)}")
            return None
        fields: dict[str, yaml.Node] = {}
        for name, (key, value) in self._keys(node, path, 0, set()).items():
            if name in allowed:
                fields[name] = value
            elif misplaced and name in elsewhere:
                keys = ", ".join(allowed)
                self.report(key, child_path(path, name), f"{misplaced} (allowed keys here: {keys})")
            else:
                self.report(key, child_path(path, name), _unknown_key_message(name, allowed))
        return CheckedMapping(node, path, fields)

    def _keys(
        self, node: yaml.MappingNode, path: str, depth: int, active: set[int]
    ) -> dict[str, tuple[yaml.Node, yaml.Node]]:
        """String keys of a mapping, merge keys expanded: its own keys win, then earlier
        merged mappings over later ones."""
        cached = self._merged_keys.get(id(node))
        if cached is not None:
            return cached
        keys: dict[str, tuple[yaml.Node, yaml.Node]] = {}
        merges: list[yaml.Node] = []
        for key, value in node.value:
            if is_scalar(key, _MERGE):
                merges.append(value)
                continue
            name = self._key_name(key, path)
            if name is None:
                continue
            if name in keys:
                first = line_of(keys[name][0])
                self.report(key, child_path(path, name), f"duplicate key (first on line {first})")
                continue
            keys[name] = (key, value)
        active.add(id(node))
        for source in self._merge_sources(merges, path, depth, active):
            for name, pair in self._keys(source, path, depth + 1, active).items():
                keys.setdefault(name, pair)
        active.discard(id(node))
        self._merged_keys[id(node)] = keys
        return keys

    def _merge_sources(
        self, merges: list[yaml.Node], path: str, depth: int, active: set[int]
    ) -> list[yaml.MappingNode]:
        sources: list[yaml.MappingNode] = []
        for merge in merges:
            candidates = merge.value if is_sequence(merge) else [merge]
            for source in candidates:
                if not isinstance(source, yaml.MappingNode) or source.tag != MAP:
                    self.report(source, path, f"'<<' merges mappings, not {describe(source)}")
                elif id(source) in active or depth >= MAX_MERGE_DEPTH:
                    self.report(source, path, "'<<' merges are nested too deeply or loop")
                else:
                    sources.append(source)
        return sources

    def _key_name(self, key: yaml.Node, path: str) -> str | None:
        if is_scalar(key, STR):
            value: str = key.value
            return value
        self.report(key, path, f"keys must be strings, not {describe(key)}")
        return None

    def sequence(self, node: yaml.Node, path: str) -> list[yaml.Node] | None:
        if is_sequence(node):
            items: list[yaml.Node] = node.value
            return items
        self.report(node, path, f"expected a list, got {describe(node)}")
        return None

    def required(self, mapping: CheckedMapping, key: str) -> yaml.Node | None:
        node = mapping.fields.get(key)
        if node is None:
            self.report(mapping.node, mapping.path, f"missing required key {key!r}")
        return node

    # -- scalars

    def string(self, node: yaml.Node, path: str, expected: str = "a string") -> str | None:
        if is_scalar(node, STR):
            value: str = node.value
            return value
        quotable = expected == "a string" and is_scalar(node, INT, FLOAT, BOOL)
        hint = " (quote it to make it a string)" if quotable else ""
        self.report(node, path, f"expected {expected}, got {describe(node)}{hint}")
        return None

    def integer(
        self, node: yaml.Node, path: str, low: int, high: int, *, or_null: bool = False
    ) -> int | None:
        """The integer at `node`, or None: reported, unless it is null and `or_null`."""
        if or_null and is_scalar(node, NULL):
            return None
        if not is_scalar(node, INT):
            expected = "an integer or null" if or_null else "an integer"
            self.report(node, path, f"expected {expected}, got {describe(node)}")
            return None
        try:
            value = _yaml_int(node.value)
        except ValueError:
            self.report(node, path, f"{quote(node.value)} is not a valid integer")
            return None
        if not low <= value <= high:
            self.report(node, path, f"{value} is out of range ({low} to {high})")
            return None
        return value

    def boolean(self, node: yaml.Node, path: str) -> bool | None:
        value = boolean_value(node)
        if value is None:
            self.report(node, path, f"expected true or false, got {describe(node)}")
        return value

    def choice(self, node: yaml.Node, path: str, options: Sequence[str]) -> str | None:
        if not is_scalar(node, STR):
            expected = ", ".join(options)
            self.report(node, path, f"expected one of {expected}, got {describe(node)}")
            return None
        value: str = node.value
        if value in options:
            return value
        self.report(
            node,
            path,
            f"unknown value {quote(value)}{_did_you_mean(value, options)}"
            f" (expected one of: {', '.join(options)})",
        )
        return None


# --- composing -------------------------------------------------------------------------


def compose(text: str, filename: str) -> yaml.Node | None:
    """The YAML document as a node tree, or ConfigError if it is not YAML."""
    try:
        node: yaml.Node | None = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        line = 1 if mark is None else mark.line + 1
        problem = error.problem or error.context or "syntax error"
        if error.problem and error.context:
            problem = f"{error.problem} ({error.context})"
        hint = _yaml_hint(text, line)
        raise ConfigError([f"{filename}:{line}: not valid YAML: {problem}{hint}"]) from None
    except yaml.reader.ReaderError as error:
        line = text.count("\n", 0, max(error.position, 0)) + 1
        character = error.character
        what = f"character #x{character:04x}" if isinstance(character, int) else "a character"
        raise ConfigError(
            [f"{filename}:{line}: not valid YAML: {what} is not allowed here ({error.reason})"]
        ) from None
    except RecursionError:
        raise ConfigError([f"{filename}:1: not valid YAML: nested too deeply"]) from None
    except yaml.YAMLError as error:
        message = " ".join(str(error).splitlines())
        raise ConfigError([f"{filename}:1: not valid YAML: {message}"]) from None
    return node


# `[::1]:80` unquoted starts a YAML flow sequence, a mistake the parser cannot explain.
_UNQUOTED_IPV6 = re.compile(r"(^|[\s:,-])\[[0-9A-Fa-f:.%]*\]:", re.ASCII)
# `*.example.com` unquoted starts a YAML alias, whose name cannot hold a dot.
_UNQUOTED_WILDCARD = re.compile(r"(^|[\s:,\[{-])\*\.", re.ASCII)


def _yaml_hint(text: str, line: int) -> str:
    lines = text.splitlines()
    if 1 <= line <= len(lines) and _UNQUOTED_IPV6.search(lines[line - 1]):
        return "; an address in brackets must be quoted, e.g. '[::1]:80'"
    if 1 <= line <= len(lines) and _UNQUOTED_WILDCARD.search(lines[line - 1]):
        return "; a wildcard name must be quoted, e.g. '*.example.com'"
    return ""
