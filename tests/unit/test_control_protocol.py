"""The control socket's protocol: commands and replies, table-driven, then properties."""

from __future__ import annotations

import contextlib
import json
import typing

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from splicerelay.config import model
from splicerelay.protocol.control import (
    COMMAND_NAMES,
    HELP,
    MAX_CONNECTION_ID,
    MAX_LINE_LENGTH,
    MAX_LIST_LIMIT,
    MAX_WEIGHT,
    MIN_WEIGHT,
    AdminState,
    Command,
    CommandError,
    Help,
    KillConnection,
    Reload,
    Reply,
    ReplyError,
    SetUpstreamState,
    SetUpstreamWeight,
    ShowConnections,
    ShowInfo,
    ShowRoutes,
    ShowUpstreams,
    decode_reply,
    encode_reply,
    error_reply,
    format_command,
    ok_reply,
    parse_command,
    usage_of,
)

PROPERTY = settings(max_examples=400, database=None, derandomize=True, deadline=None)

DRAIN, MAINT, READY = AdminState.DRAIN, AdminState.MAINT, AdminState.READY

VALID: list[tuple[str, Command]] = [
    ("help", Help()),
    ("show info", ShowInfo()),
    ("show routes", ShowRoutes()),
    ("show upstreams", ShowUpstreams()),
    ("show upstreams web", ShowUpstreams("web")),
    ("show connections", ShowConnections()),
    ("show connections web", ShowConnections("web")),
    ("show connections --limit 5", ShowConnections(None, 5)),
    ("show connections --limit=5", ShowConnections(None, 5)),
    ("show connections web --limit 5", ShowConnections("web", 5)),
    ("show connections --limit 5 web", ShowConnections("web", 5)),
    (f"show connections --limit {MAX_LIST_LIMIT}", ShowConnections(None, MAX_LIST_LIMIT)),
    ("set upstream web 10.0.0.2:8000 state ready", SetUpstreamState("web", "10.0.0.2:8000", READY)),
    ("set upstream web 10.0.0.2:8000 state drain", SetUpstreamState("web", "10.0.0.2:8000", DRAIN)),
    ("set upstream web [::1]:80 state maint", SetUpstreamState("web", "[::1]:80", MAINT)),
    (
        "set upstream web b.internal:80 state maint --kill-connections",
        SetUpstreamState("web", "b.internal:80", MAINT, kill_connections=True),
    ),
    (
        "set upstream web --kill-connections b:80 state maint",
        SetUpstreamState("web", "b:80", MAINT, kill_connections=True),
    ),
    ("set upstream -x unix:/run/b.sock weight 1", SetUpstreamWeight("-x", "unix:/run/b.sock", 1)),
    (f"set upstream web a:1 weight {MAX_WEIGHT}", SetUpstreamWeight("web", "a:1", MAX_WEIGHT)),
    ("set upstream web a:1 weight 007", SetUpstreamWeight("web", "a:1", 7)),
    ("kill connection 0", KillConnection(0)),
    (f"kill connection {MAX_CONNECTION_ID}", KillConnection(MAX_CONNECTION_ID)),
    ("reload", Reload()),
    ("show upstreams wéb", ShowUpstreams("wéb")),
]


@pytest.mark.parametrize(("line", "command"), VALID, ids=[line for line, _ in VALID])
@pytest.mark.parametrize("ending", ["", "\n", "\r\n"])
def test_valid_lines(line: str, command: Command, ending: str) -> None:
    assert parse_command((line + ending).encode()) == command


@pytest.mark.parametrize(("line", "command"), VALID, ids=[line for line, _ in VALID])
def test_words_may_be_separated_by_any_run_of_spaces_and_tabs(line: str, command: Command) -> None:
    spaced = " \t " + "  \t".join(line.split(" ")) + "\t \n"
    assert parse_command(spaced.encode()) == command


# (line, words that the error message must hold)
INVALID: list[tuple[bytes, list[str]]] = [
    (b"", ["empty command", "help"]),
    (b"\n", ["empty command"]),
    (b" \t \r\n", ["empty command"]),
    (b"bogus", ["unknown command 'bogus'", *COMMAND_NAMES]),
    (b"SHOW INFO", ["unknown command 'SHOW'"]),
    (b"show bogus", ["unknown command 'show bogus'", "show connections"]),
    (b"kill it 5", ["unknown command 'kill it'", "kill connection"]),
    (b"show", ["incomplete command 'show'", "show info", "show connections [ROUTE] [--limit N]"]),
    (b"set", ["incomplete command 'set'", "set upstream ROUTE ADDRESS weight N"]),
    (b"kill", ["incomplete command 'kill'", "kill connection ID"]),
    (b"show info now", ["unexpected 'now'", "usage: show info"]),
    (b"help me", ["unexpected 'me'", "usage: help"]),
    (b"reload --now", ["unknown option '--now'", "usage: reload"]),
    (b"show upstreams a b", ["unexpected 'b'", "usage: show upstreams [ROUTE]"]),
    (b"show connections a b", ["unexpected 'b'", "show connections [ROUTE] [--limit N]"]),
    (b"show connections --limit", ["--limit needs a value"]),
    (b"show connections --limit=", ["--limit needs a value"]),
    (b"show connections --limit --limit", ["--limit needs a value"]),
    (b"show connections --limit 0", ["N must be a whole number from 1 to"]),
    (b"show connections --limit -1", ["N must be a whole number", "'-1'"]),
    (b"show connections --limit 1e3", ["N must be a whole number", "'1e3'"]),
    (b"show connections --limit 99999999999", ["N must be a whole number"]),
    (b"show connections --limit 1 --limit 2", ["--limit given twice"]),
    (b"show connections --top 5", ["unknown option '--top'"]),
    (b"set upstream web", ["missing arguments", "state ready|drain|maint", "weight N"]),
    (b"set upstream web a:1 state", ["missing arguments"]),
    (b"set upstream web a:1 state drain now", ["unexpected 'now'"]),
    (b"set upstream web a:1 state up", ["unknown state 'up'", "ready|drain|maint"]),
    (b"set upstream web a:1 state DRAIN", ["unknown state 'DRAIN'"]),
    (b"set upstream web a:1 colour red", ["expected 'state' or 'weight'", "'colour'"]),
    (
        b"set upstream web a:1 state drain --kill-connections",
        ["--kill-connections goes with state maint only"],
    ),
    (b"set upstream web a:1 weight 5 --kill-connections", ["--kill-connections goes with"]),
    (b"set upstream web a:1 state maint --kill-connections=yes", ["takes no value"]),
    (b"set upstream web a:1 weight 0", ["the weight must be a whole number from 1 to 1000"]),
    (b"set upstream web a:1 weight 1001", ["from 1 to 1000, not '1001'"]),
    (b"set upstream web a:1 weight +5", ["not '+5'"]),
    (b"set upstream web a:1 weight 1_0", ["not '1_0'"]),
    ("set upstream web a:1 weight \u0661".encode(), ["the weight must be a whole number"]),
    (b"set upstream --web a:1 weight 1", ["unknown option '--web'"]),
    (b"kill connection", ["missing arguments", "usage: kill connection ID"]),
    (b"kill connection x", ["ID must be a whole number", "'x'"]),
    (b"kill connection 9223372036854775808", ["ID must be a whole number"]),
    (b"kill connection 1 2", ["unexpected '2'"]),
    (b"show\x00 info", ["'\\x00' at column 5", "one command per line"]),
    (b"show info\nreload\n", ["'\\n' at column 10"]),
    (b"show\rinfo", ["'\\r' at column 5"]),
    (b"show info\r\r\n", ["'\\r' at column 10"]),
    (b"show \x1b[31minfo", ["'\\x1b'"]),
    ("show upstreams a\u00a0b".encode(), ["'\\xa0'"]),
    ("show upstreams \u202eweb".encode(), ["'\\u202e'"]),
    (b"show \xff info", ["not UTF-8"]),
    (b"show upstreams \xed\xa0\x80", ["not UTF-8"]),  # an encoded surrogate
    (b"x" * (MAX_LINE_LENGTH + 1), ["line too long", str(MAX_LINE_LENGTH)]),
]


@pytest.mark.parametrize(("line", "words"), INVALID, ids=[repr(line)[:50] for line, _ in INVALID])
def test_invalid_lines_say_why(line: bytes, words: list[str]) -> None:
    with pytest.raises(CommandError) as raised:
        parse_command(line)
    for word in words:
        assert word in str(raised.value)


def test_a_long_word_is_shortened_in_the_message() -> None:
    with pytest.raises(CommandError) as raised:
        parse_command(b"w" * 1000)
    assert len(str(raised.value)) < 400


def test_the_longest_line_is_exactly_max_line_length_with_its_newline() -> None:
    head = b"show upstreams "
    longest = head + b"r" * (MAX_LINE_LENGTH - len(head) - 1) + b"\n"
    assert len(longest) == MAX_LINE_LENGTH
    command = parse_command(longest)
    assert isinstance(command, ShowUpstreams)
    assert command.route is not None
    with pytest.raises(CommandError, match="too long"):
        parse_command(head + b"r" + longest[len(head) :])
    # Without its newline, one byte more fits: the bound is on the bytes given.
    assert parse_command(longest[:-1] + b"r") == ShowUpstreams("r" * (len(command.route) + 1))


def test_weight_bounds_agree_with_the_config() -> None:
    assert model.MAX_WEIGHT == MAX_WEIGHT
    assert MIN_WEIGHT == 1  # the config's lower bound, and the balancer's


# -- the command classes --------------------------------------------------------------


def test_state_given_as_text_becomes_an_admin_state() -> None:
    command = SetUpstreamState("web", "a:1", "drain")  # type: ignore[arg-type]
    assert command.state is AdminState.DRAIN
    assert command == SetUpstreamState("web", "a:1", AdminState.DRAIN)


@pytest.mark.parametrize(
    ("make", "words"),
    [
        (lambda: ShowUpstreams(""), "ROUTE must be a non-empty word"),
        (lambda: ShowUpstreams("a b"), "holds a space"),
        (lambda: ShowUpstreams("--x"), "starts with '--'"),
        (lambda: ShowConnections(limit=0), "N must be"),
        (lambda: SetUpstreamState("web", "a\n", READY), "ADDRESS"),
        (lambda: SetUpstreamState("web", "a:1", "up"), "unknown state 'up'"),  # type: ignore[arg-type]
        (lambda: SetUpstreamState("web", "a:1", DRAIN, True), "maint only"),
        (lambda: SetUpstreamState("web", "a:1", MAINT, 1), "true or false"),  # type: ignore[arg-type]
        (lambda: SetUpstreamWeight("web", "a:1", True), "the weight must be"),
        (lambda: SetUpstreamWeight("web", "a:1", 1.0), "the weight must be"),  # type: ignore[arg-type]
        (lambda: KillConnection(-1), "ID must be"),
    ],
)
def test_commands_refuse_what_no_line_could_say(
    make: typing.Callable[[], object], words: str
) -> None:
    with pytest.raises(CommandError, match=words):
        make()


@pytest.mark.parametrize(("line", "command"), VALID, ids=[line for line, _ in VALID])
def test_format_then_parse_gives_the_command_back(line: str, command: Command) -> None:
    formatted = format_command(command)
    assert "\n" not in formatted
    assert parse_command(formatted.encode()) == command


def test_format_writes_the_canonical_line() -> None:
    assert format_command(ShowConnections("web", 5)) == "show connections web --limit 5"
    assert format_command(SetUpstreamState("w", "a:1", MAINT, True)) == (
        "set upstream w a:1 state maint --kill-connections"
    )
    assert format_command(SetUpstreamWeight("w", "a:1", 3)) == "set upstream w a:1 weight 3"


def test_help_has_every_command_and_each_usage_parses_as_its_own() -> None:
    kinds = typing.get_args(Command)
    assert [entry["command"] for entry in HELP] == [usage_of(kind) for kind in kinds]
    assert all(entry["does"] for entry in HELP)
    for name in COMMAND_NAMES:
        assert any(entry["command"].startswith(name) for entry in HELP)
    samples = {type(command): command for _, command in VALID}
    assert set(samples) == set(kinds)


# -- properties -----------------------------------------------------------------------

# Words as the parser reads them: printable, no whitespace, not starting with "--".
_word_chars = st.characters(
    blacklist_categories=("Cc", "Cf", "Cs", "Co", "Cn", "Zs", "Zl", "Zp"),
)
words = st.text(_word_chars, min_size=1, max_size=40).filter(
    lambda w: not w.startswith("--") and w.isprintable() and not any(c.isspace() for c in w)
)
optional_words = st.none() | words
commands: st.SearchStrategy[Command] = st.one_of(
    st.just(Help()),
    st.just(ShowInfo()),
    st.just(ShowRoutes()),
    st.just(Reload()),
    st.builds(ShowUpstreams, optional_words),
    st.builds(ShowConnections, optional_words, st.none() | st.integers(1, MAX_LIST_LIMIT)),
    st.builds(SetUpstreamState, words, words, st.sampled_from([READY, DRAIN])),
    st.builds(SetUpstreamState, words, words, st.just(MAINT), st.booleans()),
    st.builds(SetUpstreamWeight, words, words, st.integers(MIN_WEIGHT, MAX_WEIGHT)),
    st.builds(KillConnection, st.integers(0, MAX_CONNECTION_ID)),
)


@PROPERTY
@given(command=commands, separators=st.lists(st.sampled_from([" ", "\t", "  ", " \t"]), min_size=8))
def test_parse_reads_back_what_format_wrote(command: Command, separators: list[str]) -> None:
    line = format_command(command)
    assert parse_command(line.encode()) == command
    assert parse_command(line.encode() + b"\r\n") == command
    respaced = "".join(
        word + separators[i % len(separators)] for i, word in enumerate(line.split(" "))
    )
    assert parse_command(respaced.encode() + b"\n") == command


@PROPERTY
@given(line=st.binary(max_size=MAX_LINE_LENGTH + 8))
def test_arbitrary_bytes_raise_nothing_but_command_error(line: bytes) -> None:
    try:
        command = parse_command(line)
    except CommandError as error:
        assert str(error)
    else:
        assert parse_command(format_command(command).encode()) == command


# Lines of plausible words, to reach past the first word more often than random bytes do.
_vocabulary = st.sampled_from(
    [
        "help", "show", "set", "kill", "reload", "info", "routes", "upstreams",
        "connections", "upstream", "connection", "state", "weight", "ready", "drain",
        "maint", "--limit", "--limit=", "--limit=3", "--kill-connections", "--", "-",
        "0", "1", "1000", "1001", "-1", "web", "10.0.0.1:80", "\u0661", "\x00", "",
    ]
)  # fmt: skip


@PROPERTY
@given(parts=st.lists(_vocabulary | words, max_size=8))
def test_plausible_lines_raise_nothing_but_command_error(parts: list[str]) -> None:
    line = " ".join(parts).encode()
    try:
        command = parse_command(line)
    except CommandError:
        return
    assert parse_command(format_command(command).encode()) == command


# -- replies --------------------------------------------------------------------------

ENCODED: list[tuple[Reply, bytes]] = [
    (ok_reply(), b'{"ok":true,"data":null}\n'),
    (ok_reply({"a": [1, 2.5, "x"]}), b'{"ok":true,"data":{"a":[1,2.5,"x"]}}\n'),
    (ok_reply(("t",)), b'{"ok":true,"data":["t"]}\n'),
    (error_reply("no such route 'x'"), b'{"ok":false,"error":"no such route \'x\'"}\n'),
    (error_reply("refused", {"1": "ok"}), b'{"ok":false,"error":"refused","data":{"1":"ok"}}\n'),
    (ok_reply("é\n\u2028"), b'{"ok":true,"data":"\\u00e9\\n\\u2028"}\n'),
]


@pytest.mark.parametrize(("reply", "encoded"), ENCODED)
def test_encode_reply(reply: Reply, encoded: bytes) -> None:
    assert encode_reply(reply) == encoded


@pytest.mark.parametrize(
    ("line", "reply"),
    [
        (b'{"ok":true,"data":null}\n', ok_reply()),
        (b'{"ok":true}', ok_reply()),
        (b'{"ok": true, "data": [1], "future": 2}\r\n', ok_reply([1])),
        (b'{"ok":false,"error":"e","data":3}', error_reply("e", 3)),
        (b'{"ok":false,"error":"e","data":null}', error_reply("e")),
    ],
)
def test_decode_reply(line: bytes, reply: Reply) -> None:
    assert decode_reply(line) == reply


@pytest.mark.parametrize(
    "line",
    [
        b"",
        b"\n",
        b"ok",
        b"[]",
        b'{"data":1}',
        b'{"ok":1}',
        b'{"ok":"true"}',
        b'{"ok":false}',
        b'{"ok":false,"error":""}',
        b'{"ok":false,"error":5}',
        b'{"ok":true,"data":NaN}',
        b'{"ok":true,"data":Infinity}',
        b'{"ok":true} {"ok":true}',
        b'{"ok":true,"data":"\xff"}',
        b'{"ok":true,"data":' + b"9" * 5000 + b"}",
        b'{"ok":true,"data":' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    ],
    ids=lambda line: repr(line)[:40],
)
def test_decode_refuses_what_is_not_a_reply(line: bytes) -> None:
    with pytest.raises(ReplyError):
        decode_reply(line)


def test_replies_refuse_inconsistent_fields() -> None:
    with pytest.raises(ValueError):
        Reply(True, None, "error")
    with pytest.raises(ValueError):
        Reply(False, None, None)
    with pytest.raises(ValueError):
        encode_reply(ok_reply(float("nan")))
    with pytest.raises(TypeError):
        encode_reply(ok_reply({"a": object()}))


json_data = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)


@PROPERTY
@given(ok=st.booleans(), data=json_data, error=st.text(min_size=1))
def test_a_reply_is_one_ascii_line_that_decodes_to_itself(
    ok: bool, data: object, error: str
) -> None:
    reply = ok_reply(data) if ok else error_reply(error, data)
    encoded = encode_reply(reply)
    assert encoded.isascii()
    assert encoded.index(b"\n") == len(encoded) - 1
    assert decode_reply(encoded) == reply
    assert json.loads(encoded) is not None


@PROPERTY
@given(line=st.binary(max_size=200))
def test_arbitrary_bytes_decode_to_a_reply_or_reply_error(line: bytes) -> None:
    with contextlib.suppress(ReplyError):
        decode_reply(line)
