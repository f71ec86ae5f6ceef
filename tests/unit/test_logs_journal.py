"""Syslog priority prefixes, written only to a stream that JOURNAL_STREAM names.

The streams are real pipes, and the JOURNAL_STREAM values are made from their fstat(),
as systemd makes it from the socket it connects: only the variable is staged.
"""

from __future__ import annotations

import io
import logging
import os
import sys
from collections.abc import Iterator
from typing import IO

import pytest

from splicerelay.ops import logs
from splicerelay.ops.access_log import ACCESS_LOG
from splicerelay.ops.journal import (
    JournalPriority,
    is_journal_stream,
    journal_stream_identity,
    syslog_priority,
)


class Pipe:
    """A real pipe; `writer` is a text stream over its write end, as sys.stderr is."""

    def __init__(self) -> None:
        read_fd, write_fd = os.pipe()
        self.reader = os.fdopen(read_fd, "rb")
        self.writer: IO[str] = os.fdopen(write_fd, "w")

    @property
    def journal_stream(self) -> str:
        """JOURNAL_STREAM as systemd would set it for this stream."""
        status = os.fstat(self.writer.fileno())
        return f"{status.st_dev}:{status.st_ino}"

    def read_lines(self) -> list[str]:
        self.writer.close()
        return self.reader.read().decode().splitlines()

    def close(self) -> None:
        for stream in (self.writer, self.reader):
            if not stream.closed:
                stream.close()


@pytest.fixture
def pipes() -> Iterator[list[Pipe]]:
    made: list[Pipe] = []
    yield made
    for pipe in made:
        pipe.close()


def new_pipe(pipes: list[Pipe]) -> Pipe:
    pipes.append(Pipe())
    return pipes[-1]


@pytest.fixture
def restore_loggers() -> Iterator[None]:
    """configure() replaces the relay's loggers' handlers: put the test runner's back."""
    saved = []
    for name in ("splicerelay", "splicerelay.access"):
        logger = logging.getLogger(name)
        saved.append((logger, list(logger.handlers), logger.level, logger.propagate))
    yield
    ACCESS_LOG.close()
    ACCESS_LOG.enabled = False
    for logger, handlers, level, propagate in saved:
        logger.handlers[:] = handlers
        logger.setLevel(level)
        logger.propagate = propagate


# ----- priorities -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("level", "priority"),
    [
        (logging.CRITICAL, 2),
        (logging.ERROR, 3),
        (logging.WARNING, 4),
        (logging.INFO, 6),
        (logging.DEBUG, 7),
        (logging.WARNING + 5, 4),  # between two levels: the lower one's
        (logging.NOTSET, 7),
    ],
)
def test_logging_levels_map_to_syslog_priorities(level: int, priority: int) -> None:
    assert syslog_priority(level) == priority


def test_every_line_of_a_record_gets_the_prefix() -> None:
    class TwoLines(logging.Formatter):
        def format(self, record: logging.LogRecord) -> str:
            return "first\nsecond"

    entry = logging.LogRecord("splicerelay", logging.ERROR, __file__, 1, "x", None, None)
    assert JournalPriority(TwoLines()).format(entry) == "<3>first\n<3>second"


# ----- is it the journal? ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "identity"),
    [
        ("8:1234", (8, 1234)),
        ("0:0", (0, 0)),
        ("", None),
        ("8", None),
        ("8:", None),
        (":1234", None),
        ("a:b", None),
        ("-8:1234", None),
        ("8:12 34", None),
        ("²:1", None),  # a digit to str.isdigit(), not to int()
    ],
)
def test_journal_stream_is_read_as_device_colon_inode(
    value: str, identity: tuple[int, int] | None
) -> None:
    assert journal_stream_identity({"JOURNAL_STREAM": value}) == identity


def test_no_journal_stream_variable_means_no_journal() -> None:
    assert journal_stream_identity({}) is None


def test_a_stream_is_the_journal_only_if_its_device_and_inode_match(pipes: list[Pipe]) -> None:
    journal, other = new_pipe(pipes), new_pipe(pipes)
    environ = {"JOURNAL_STREAM": journal.journal_stream}
    assert is_journal_stream(journal.writer, environ)
    assert not is_journal_stream(other.writer, environ)
    assert not is_journal_stream(journal.writer, {})
    device, inode = journal.journal_stream.split(":")
    assert not is_journal_stream(journal.writer, {"JOURNAL_STREAM": f"{device}:{int(inode) + 1}"})
    assert not is_journal_stream(journal.writer, {"JOURNAL_STREAM": f"{int(device) + 1}:{inode}"})


def test_a_stream_without_a_descriptor_is_not_the_journal(pipes: list[Pipe]) -> None:
    environ = {"JOURNAL_STREAM": new_pipe(pipes).journal_stream}
    assert not is_journal_stream(io.StringIO(), environ)
    closed = new_pipe(pipes)
    closed.writer.close()
    assert not is_journal_stream(closed.writer, environ)


# ----- configure() ----------------------------------------------------------------------


def log_one_of_each() -> None:
    log = logging.getLogger("splicerelay")
    log.debug("checking", extra={"fields": {"n": 1}})
    log.info("ready")
    log.warning("upstream down", extra={"fields": {"upstream": "127.0.0.1:1"}})
    log.error("reload failed")
    ACCESS_LOG.write("web", "127.0.0.1:50000", None, 0, 0, 0.0, "ok")
    # Written and let go of: the access log holds a descriptor of its own on stdout.
    ACCESS_LOG.close()


def configure_on(
    monkeypatch: pytest.MonkeyPatch,
    stderr: Pipe,
    stdout: Pipe,
    format: str,
    environ: dict[str, str],
) -> None:
    monkeypatch.setattr(sys, "stderr", stderr.writer)
    monkeypatch.setattr(sys, "stdout", stdout.writer)
    logs.configure("debug", format, True, environ=environ)
    log_one_of_each()


def priorities(lines: list[str]) -> list[str]:
    return [line[: line.index(">") + 1] if line.startswith("<") else "" for line in lines]


@pytest.mark.parametrize("format", ["json", "text"])
def test_diagnostics_on_the_journal_carry_priorities_and_a_separate_stdout_does_not(
    monkeypatch: pytest.MonkeyPatch, restore_loggers: None, pipes: list[Pipe], format: str
) -> None:
    # StandardError=journal, StandardOutput=file:...: JOURNAL_STREAM names stderr only.
    stderr, stdout = new_pipe(pipes), new_pipe(pipes)
    configure_on(monkeypatch, stderr, stdout, format, {"JOURNAL_STREAM": stderr.journal_stream})
    diagnostics = stderr.read_lines()
    assert priorities(diagnostics) == ["<7>", "<6>", "<4>", "<3>"]
    assert "upstream down" in diagnostics[2]
    [access] = stdout.read_lines()
    # Unprefixed: a JSON object, or a text line that starts with its timestamp.
    assert access.startswith("{") if format == "json" else access[:4].isdigit()


def test_the_access_log_gets_info_priority_when_stdout_is_the_journal_too(
    monkeypatch: pytest.MonkeyPatch, restore_loggers: None, pipes: list[Pipe]
) -> None:
    # StandardOutput=journal and StandardError=journal: one stream, one JOURNAL_STREAM.
    shared = new_pipe(pipes)
    configure_on(monkeypatch, shared, shared, "json", {"JOURNAL_STREAM": shared.journal_stream})
    lines = shared.read_lines()
    assert priorities(lines) == ["<7>", "<6>", "<4>", "<3>", "<6>"]
    assert '"message": "connection"' in lines[-1]


@pytest.mark.parametrize("journal_stream", [None, "0:0", "garbage"])
def test_without_a_matching_journal_stream_nothing_is_prefixed(
    monkeypatch: pytest.MonkeyPatch,
    restore_loggers: None,
    pipes: list[Pipe],
    journal_stream: str | None,
) -> None:
    stderr, stdout = new_pipe(pipes), new_pipe(pipes)
    environ = {} if journal_stream is None else {"JOURNAL_STREAM": journal_stream}
    configure_on(monkeypatch, stderr, stdout, "json", environ)
    lines = stderr.read_lines() + stdout.read_lines()
    assert len(lines) == 5
    assert all(line.startswith("{") for line in lines), lines


def test_a_traceback_in_text_format_is_prefixed_on_every_line(
    monkeypatch: pytest.MonkeyPatch, restore_loggers: None, pipes: list[Pipe]
) -> None:
    stderr = new_pipe(pipes)
    monkeypatch.setattr(sys, "stderr", stderr.writer)
    logs.configure("info", "text", False, environ={"JOURNAL_STREAM": stderr.journal_stream})
    try:
        raise ValueError("boom")
    except ValueError:
        logging.getLogger("splicerelay").exception("session failed unexpectedly")
    lines = stderr.read_lines()
    assert len(lines) > 3  # the message, "Traceback ...", frames, the exception
    assert all(line.startswith("<3>") for line in lines), lines
    assert lines[-1] == "<3>ValueError: boom"
