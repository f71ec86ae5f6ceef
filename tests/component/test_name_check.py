"""`check --resolve`: what each upstream name resolves to, or where a name that does not is."""

from __future__ import annotations

import pytest

from splicerelay.config import ConfigError, parse_config
from splicerelay.relay.name_check import address_lines, check_names
from tests.support.names import FakeResolver

CONFIG = """\
routes:
  - name: web
    listen: 127.0.0.1:8080
    upstreams:
      - address: multi.test:8000
      - address: 10.0.0.9:8000
      - address: first.test:8000
        resolve: first
      - &backend
        address: pool.test:8000
        weight: 2
  - name: api
    listen: 127.0.0.1:8081
    upstreams:
      - address: unix:/run/api.sock
      - <<: *backend
        weight: 3
      - {address: '[2001:db8::1]:9000'}
      - address: six.test:9000
"""

NAMES: dict[str, list[str] | None] = {
    "multi.test": ["10.0.0.2", "10.0.0.3", "10.0.0.2"],
    "first.test": ["10.0.1.1", "10.0.1.2"],
    "pool.test": ["10.0.2.1"],
    "six.test": ["2001:db8::6", "10.0.3.1"],
}


def test_names_are_reported_with_their_members():
    resolver = FakeResolver(dict(NAMES))
    config = parse_config(CONFIG, "relay.yaml")
    assert check_names(config, CONFIG, resolver) == [
        "# route web: multi.test:8000 -> 10.0.0.2:8000, 10.0.0.3:8000",
        "# route web: first.test:8000 -> 10.0.1.1:8000 (resolve: first; not used: 10.0.1.2:8000)",
        "# route web: pool.test:8000 -> 10.0.2.1:8000",
        "# route api: pool.test:8000 -> 10.0.2.1:8000",
        "# route api: six.test:9000 -> [2001:db8::6]:9000, 10.0.3.1:9000",
    ]
    # IP literals and unix paths are not looked up.
    assert resolver.asked == ["multi.test", "first.test", "pool.test", "pool.test", "six.test"]


@pytest.mark.parametrize(
    ("name", "where"),
    [
        ("multi.test", ["5: routes[0].upstreams[0]"]),
        ("first.test", ["7: routes[0].upstreams[2]"]),
        # Merged in: the line where the merged address is written.
        ("pool.test", ["10: routes[0].upstreams[3]", "10: routes[1].upstreams[1]"]),
        ("six.test", ["19: routes[1].upstreams[3]"]),
    ],
)
def test_a_name_that_does_not_resolve_is_an_error_at_its_line(name: str, where: list[str]):
    table = dict(NAMES)
    del table[name]
    config = parse_config(CONFIG, "relay.yaml")
    with pytest.raises(ConfigError) as raised:
        check_names(config, CONFIG, FakeResolver(table))
    port = 9000 if name == "six.test" else 8000
    assert raised.value.errors == [
        f"relay.yaml:{line_and_path}.address: cannot resolve {name}:{port}:"
        " [Errno -2] Name or service not known"
        for line_and_path in where
    ]


def test_every_name_that_does_not_resolve_is_reported():
    config = parse_config(CONFIG, "relay.yaml")
    with pytest.raises(ConfigError) as raised:
        check_names(config, CONFIG, FakeResolver({"first.test": None}))
    assert [error.split(": ")[0] for error in raised.value.errors] == [
        "relay.yaml:5",
        "relay.yaml:7",
        "relay.yaml:10",
        "relay.yaml:10",
        "relay.yaml:19",
    ]
    assert "Temporary failure in name resolution" in raised.value.errors[1]


def test_address_lines_in_flow_style_and_without_names():
    text = "routes: [{name: a, listen: '127.0.0.1:1', upstreams: [{address: 'x.test:1'}]}]\n"
    assert address_lines(text, "relay.yaml") == {(0, 0): 1}
    literal = text.replace("x.test", "10.0.0.1")
    config = parse_config(literal, "relay.yaml")
    assert check_names(config, literal, FakeResolver({})) == []
