"""The generic YAML node reader: typed values, key checks, merge keys and positions.

These tests use keys that mean nothing to the relay: the reader knows no schema.
"""

from __future__ import annotations

import pytest
import yaml

from splicerelay.config import ConfigError
from splicerelay.config.nodes import MAX_MERGE_DEPTH, CheckedMapping, NodeReader, compose

FILE = "f.yaml"


def root_of(text: str) -> yaml.Node:
    node = compose(text, FILE)
    assert node is not None
    return node


def read_mapping(
    text: str, allowed: tuple[str, ...], elsewhere: tuple[str, ...] = (), misplaced: str = ""
) -> tuple[CheckedMapping | None, list[str]]:
    reader = NodeReader(FILE)
    section = reader.mapping(root_of(text), "", allowed, elsewhere=elsewhere, misplaced=misplaced)
    return section, reader.errors()


def test_unknown_key_suggests_the_closest_allowed_key() -> None:
    section, errors = read_mapping("colour: red\nsize: 1\n", ("color", "size"))
    assert errors == [
        "f.yaml:1: colour: unknown key; did you mean 'color'? (allowed keys: color, size)"
    ]
    assert section is not None and list(section.fields) == ["size"]


def test_unknown_key_far_from_every_allowed_key_gets_no_suggestion() -> None:
    _, errors = read_mapping("a: 1\nzzzzzz: 2\n", ("a", "b"))
    assert errors == ["f.yaml:2: zzzzzz: unknown key (allowed keys: a, b)"]


def test_a_key_allowed_elsewhere_gets_the_misplaced_message() -> None:
    _, errors = read_mapping(
        "a: 1\nother: 2\n", ("a",), elsewhere=("other",), misplaced="belongs in the other section"
    )
    assert errors == ["f.yaml:2: other: belongs in the other section (allowed keys here: a)"]


def test_a_wrong_type_names_its_line_and_key_path() -> None:
    reader = NodeReader(FILE)
    outer = reader.mapping(root_of("top:\n  first: 1\n  count: many\n"), "", ("top",))
    assert outer is not None
    inner = reader.mapping(outer.fields["top"], "top", ("first", "count"))
    assert inner is not None
    assert reader.integer(inner.fields["count"], "top.count", 0, 10) is None
    assert reader.errors() == ["f.yaml:3: top.count: expected an integer, got a string ('many')"]


def test_a_number_where_a_string_is_expected_says_to_quote_it() -> None:
    reader = NodeReader(FILE)
    assert reader.string(root_of("1.5\n"), "version") is None
    assert reader.errors() == [
        "f.yaml:1: version: expected a string, got a number ('1.5') (quote it to make it a string)"
    ]


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("42", 42),
        ("-7", -7),
        ("1_000", 1000),
        ("0x1f", 31),
        ("017", 15),
        ("0b101", 5),
        ("1:30", 90),
    ],
)
def test_integers_are_read_as_yaml_1_1_writes_them(text: str, value: int) -> None:
    reader = NodeReader(FILE)
    assert reader.integer(root_of(text), "n", -100, 10_000) == value
    assert reader.problems == []


def test_an_integer_out_of_range_is_reported_with_the_range() -> None:
    reader = NodeReader(FILE)
    assert reader.integer(root_of("11"), "n", 1, 10) is None
    assert reader.errors() == ["f.yaml:1: n: 11 is out of range (1 to 10)"]


def test_a_duplicate_key_names_the_first_line() -> None:
    _, errors = read_mapping("a: 1\nb: 2\na: 3\n", ("a", "b"))
    assert errors == ["f.yaml:3: a: duplicate key (first on line 1)"]


def test_merge_keys_own_keys_win_then_earlier_merges() -> None:
    text = "x: &x {a: 1, b: 1, c: 1}\ny: &y {b: 2, c: 2}\nz:\n  <<: [*y, *x]\n  c: 3\n"
    reader = NodeReader(FILE)
    top = reader.mapping(root_of(text), "", ("x", "y", "z"))
    assert top is not None
    merged = reader.mapping(top.fields["z"], "z", ("a", "b", "c"))
    assert merged is not None
    values = {key: reader.integer(node, key, 0, 9) for key, node in merged.fields.items()}
    assert values == {"a": 1, "b": 2, "c": 3}
    assert reader.problems == []


def merge_chain(merges: int) -> str:
    """A document whose `top` mapping reaches its only key through `merges` merges."""
    lines = ["m0: &m0 {key: 1}"]
    lines += [f"m{index}: &m{index} {{<<: *m{index - 1}}}" for index in range(1, merges)]
    lines.append(f"top: {{<<: *m{merges - 1}}}")
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize(
    ("merges", "found"), [(MAX_MERGE_DEPTH, True), (MAX_MERGE_DEPTH + 1, False)]
)
def test_merge_chains_are_bounded(merges: int, found: bool) -> None:
    reader = NodeReader(FILE)
    root = root_of(merge_chain(merges))
    top = reader.mapping(root, "", [f"m{index}" for index in range(merges)] + ["top"])
    assert top is not None
    section = reader.mapping(top.fields["top"], "top", ("key",))
    assert section is not None
    assert ("key" in section.fields) is found
    too_deep = [text for _, text in reader.problems if "nested too deeply" in text]
    assert bool(too_deep) is not found


def test_a_merge_loop_is_reported_not_followed() -> None:
    reader = NodeReader(FILE)
    section = reader.mapping(root_of("&a {key: 1, <<: *a}\n"), "", ("key",))
    assert section is not None and list(section.fields) == ["key"]
    assert reader.errors() == ["f.yaml:1: '<<' merges are nested too deeply or loop"]


def test_errors_come_in_line_order_and_once_each() -> None:
    reader = NodeReader(FILE)
    root = root_of("a: 1\nb: 2\nc: 3\n")
    section = reader.mapping(root, "", ("a", "b", "c"))
    assert section is not None
    for key in ("c", "a", "c"):
        reader.string(section.fields[key], key, "a word")
    assert reader.errors() == [
        "f.yaml:1: a: expected a word, got an integer ('1')",
        "f.yaml:3: c: expected a word, got an integer ('3')",
    ]


def test_a_choice_suggests_the_closest_option() -> None:
    reader = NodeReader(FILE)
    assert reader.choice(root_of("rnadom"), "pick", ("random", "fixed")) is None
    assert reader.errors() == [
        "f.yaml:1: pick: unknown value 'rnadom'; did you mean 'random'? (expected one of:"
        " random, fixed)"
    ]


def test_broken_yaml_is_a_config_error_with_its_line() -> None:
    with pytest.raises(ConfigError) as caught:
        compose("a: 1\nb: [1, 2\n", FILE)
    assert caught.value.errors[0].startswith("f.yaml:3: not valid YAML: ")


def test_an_unquoted_address_in_brackets_gets_a_hint() -> None:
    with pytest.raises(ConfigError) as caught:
        compose("listen: [::1]:80\n", FILE)
    assert caught.value.errors[0].endswith("an address in brackets must be quoted, e.g. '[::1]:80'")
