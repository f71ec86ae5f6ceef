"""The `control` section: where the control socket is, or that there is none."""

from __future__ import annotations

import pytest

from splicerelay.config import ConfigError, ControlConfig, parse_config, render_config

FILE = "relay.yaml"
ROUTES = """\
routes:
  - name: web
    listen: 127.0.0.1:8080
    upstreams:
      - address: 127.0.0.1:8000
"""


def control_of(text: str) -> ControlConfig:
    return parse_config(text + ROUTES, FILE).control


@pytest.mark.parametrize(
    ("text", "socket"),
    [
        ("", "auto"),
        ("control: {}\n", "auto"),
        ("control: {socket: auto}\n", "auto"),
        ("control: {socket: null}\n", None),
        ("control: false\n", None),
        ("control: {socket: /run/relay/control.sock}\n", "/run/relay/control.sock"),
    ],
)
def test_control_socket_settings(text: str, socket: str | None) -> None:
    assert control_of(text) == ControlConfig(socket)


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("control: {socket: relative.sock}\n", "relay.yaml:1: control.socket: 'relative.sock'"),
        ("control: {socket: 5}\n", "relay.yaml:1: control.socket: expected 'auto', null"),
        ("control: {socket: ''}\n", "relay.yaml:1: control.socket: expected 'auto', null"),
        ("control: {path: /x}\n", "relay.yaml:1: control.path: unknown key"),
        ("control: true\n", "relay.yaml:1: control: expected a mapping or false"),
        (
            "control: {socket: /" + "d" * 120 + "}\n",
            "relay.yaml:1: control.socket: '/ddd",
        ),
    ],
)
def test_bad_control_settings_name_file_line_and_key(text: str, error: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(text + ROUTES, FILE)
    (line,) = caught.value.errors
    assert line.startswith(error), line


@pytest.mark.parametrize("socket", ["auto", None, "/run/relay/control.sock"])
def test_rendered_control_settings_read_back_the_same(socket: str | None) -> None:
    value = "null" if socket is None else socket
    config = parse_config(f"control: {{socket: {value}}}\n" + ROUTES, FILE)
    assert parse_config(render_config(config), FILE).control == ControlConfig(socket)
