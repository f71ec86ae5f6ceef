"""`defer_accept`: a route's listener waits for the client's first bytes before accept.

Read, inherited from `defaults`, written back by `check`, and refused with FILE:LINE
where a listener cannot have it: a unix socket, or a socket systemd passes."""

from __future__ import annotations

import pytest

from splicerelay.config import ConfigError, parse_config, render_config

FILE = "relay.yaml"
UPSTREAMS = "    upstreams: [{address: 127.0.0.1:8000}]\n"


def route(name: str, listen: str, extra: str = "") -> str:
    return f"  - name: {name}\n    listen: {listen}\n{UPSTREAMS}{extra}"


def config(*routes: str, defaults: str = "") -> str:
    return (f"defaults:\n{defaults}" if defaults else "") + "routes:\n" + "".join(routes)


def errors_of(text: str) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse_config(text, FILE)
    return caught.value.errors


def defer_accept_of(text: str) -> list[bool]:
    return [route.defer_accept for route in parse_config(text, FILE).routes]


def test_off_unless_asked_for() -> None:
    assert defer_accept_of(config(route("web", "127.0.0.1:8080"))) == [False]


@pytest.mark.parametrize(
    ("spelling", "value"),
    [("true", True), ("yes", True), ("on", True), ("false", False), ("off", False)],
)
def test_a_route_turns_it_on_or_off(spelling: str, value: bool) -> None:
    text = config(route("web", "127.0.0.1:8080", f"    defer_accept: {spelling}\n"))
    assert defer_accept_of(text) == [value]


def test_defaults_turn_it_on_for_every_route_and_a_route_can_turn_it_off() -> None:
    text = config(
        route("web", "127.0.0.1:8080"),
        route("ssh", "'[::1]:2222'", "    defer_accept: false\n"),
        route("api", "127.0.0.1:8081", "    defer_accept: true\n"),
        defaults="  defer_accept: true\n",
    )
    assert defer_accept_of(text) == [True, False, True]


def test_a_route_turns_it_on_where_defaults_leave_it_off() -> None:
    text = config(
        route("web", "127.0.0.1:8080", "    defer_accept: true\n"),
        route("smtp", "127.0.0.1:2525"),
        defaults="  defer_accept: false\n",
    )
    assert defer_accept_of(text) == [True, False]


@pytest.mark.parametrize(
    ("value", "got"),
    [
        ("1", "an integer ('1')"),
        ("1s", "a string ('1s')"),
        ("'true'", "a string ('true')"),
        ("~", "null"),
        ("[]", "a list"),
    ],
)
def test_anything_but_a_boolean_is_an_error_naming_the_line(value: str, got: str) -> None:
    text = config(route("web", "127.0.0.1:8080", f"    defer_accept: {value}\n"))
    expected = f"{FILE}:5: routes[0].defer_accept: expected true or false, got {got}"
    assert errors_of(text) == [expected]


def test_a_bad_value_in_defaults_names_its_line() -> None:
    text = config(route("web", "127.0.0.1:8080"), defaults="  defer_accept: 0\n")
    assert errors_of(text) == [
        f"{FILE}:2: defaults.defer_accept: expected true or false, got an integer ('0')"
    ]


def test_on_a_unix_listener_is_an_error_naming_the_line() -> None:
    text = config(route("web", "unix:/run/web.sock", "    defer_accept: true\n"))
    assert errors_of(text) == [
        f"{FILE}:5: routes[0].defer_accept: unix:/run/web.sock is a unix socket, and"
        " TCP_DEFER_ACCEPT is for TCP listeners only"
    ]


def test_off_on_a_unix_listener_is_fine() -> None:
    text = config(route("web", "unix:/run/web.sock", "    defer_accept: false\n"))
    assert defer_accept_of(text) == [False]


def test_on_from_defaults_for_a_unix_listener_is_reported_at_its_listen() -> None:
    text = config(
        route("web", "127.0.0.1:8080"),
        route("local", "unix:/run/web.sock"),
        defaults="  defer_accept: true\n",
    )
    assert errors_of(text) == [
        f"{FILE}:8: routes[1].listen: defaults.defer_accept (line 2) is true, but"
        " unix:/run/web.sock is a unix socket, and TCP_DEFER_ACCEPT is for TCP listeners"
        " only; set defer_accept: false on this route"
    ]


def test_on_for_a_socket_systemd_passes_is_an_error_pointing_at_its_unit() -> None:
    text = config(route("web", "systemd:web", "    defer_accept: true\n"))
    assert errors_of(text) == [
        f"{FILE}:5: routes[0].defer_accept: systemd:web is a socket systemd passes, and its"
        " socket unit decides: set DeferAcceptSec= there (e.g. DeferAcceptSec=1)"
    ]


def test_on_from_defaults_for_a_socket_systemd_passes_is_reported_at_its_listen() -> None:
    text = config(route("web", "systemd:web"), defaults="  defer_accept: yes\n")
    [error] = errors_of(text)
    assert error.startswith(
        f"{FILE}:5: routes[0].listen: defaults.defer_accept (line 2) is true, but systemd:web"
    )
    assert error.endswith("; set defer_accept: false on this route")


def test_off_for_a_socket_systemd_passes_is_fine() -> None:
    text = config(route("web", "systemd:web", "    defer_accept: false\n"))
    assert defer_accept_of(text) == [False]


def test_check_writes_it_out_and_reads_it_back() -> None:
    text = config(
        route("web", "127.0.0.1:8080", "    defer_accept: true\n"),
        route("ssh", "127.0.0.1:2222"),
    )
    parsed = parse_config(text, FILE)
    rendered = render_config(parsed)
    assert "  defer_accept: true\n" in rendered
    assert "  defer_accept: false\n" in rendered
    assert parse_config(rendered, FILE) == parsed
