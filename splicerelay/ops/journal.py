"""Telling journald each line's priority, when our output really goes to journald.

systemd connects a service's stdout and stderr to journald through a stream socket and
says so in JOURNAL_STREAM, as "DEVICE:INODE" of that socket (systemd.exec(5)). A line
that starts with `<N>` then gets syslog priority N, so `journalctl -p warning` finds our
warnings (sd-daemon(3)); without the prefix every line would be info. The variable is
inherited by whatever the service starts, also when its output is redirected elsewhere,
so it is only trusted for a stream whose fstat() names that very socket: that is how
sd-daemon(3) says to check it, and a prefix written to a file or a terminal would only
be noise.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import IO

JOURNAL_STREAM_ENV = "JOURNAL_STREAM"

# syslog priorities (sd-daemon(3): SD_CRIT, SD_ERR, SD_WARNING, SD_INFO, SD_DEBUG).
CRITICAL = 2
ERROR = 3
WARNING = 4
INFO = 6
DEBUG = 7


def syslog_priority(levelno: int) -> int:
    """The syslog priority of a logging level; a level between two takes the lower one's."""
    if levelno >= logging.CRITICAL:
        return CRITICAL
    if levelno >= logging.ERROR:
        return ERROR
    if levelno >= logging.WARNING:
        return WARNING
    if levelno >= logging.INFO:
        return INFO
    return DEBUG


def journal_stream_identity(environ: Mapping[str, str]) -> tuple[int, int] | None:
    """(device, inode) from JOURNAL_STREAM, or None when it is unset or malformed."""
    device, colon, inode = environ.get(JOURNAL_STREAM_ENV, "").partition(":")
    # (isascii: isdigit() alone also takes digits that int() refuses, such as "²")
    if not colon or not (device + inode).isascii() or not device.isdigit() or not inode.isdigit():
        return None
    return int(device), int(inode)


def is_journal_stream(stream: IO[str], environ: Mapping[str, str]) -> bool:
    """Is `stream` the journald connection that JOURNAL_STREAM names?"""
    identity = journal_stream_identity(environ)
    if identity is None:
        return False
    try:
        status = os.fstat(stream.fileno())
    except (AttributeError, OSError, ValueError):
        # No descriptor behind it (a test's capture, a closed stream): not the journal.
        return False
    return (status.st_dev, status.st_ino) == identity


class JournalPriority(logging.Formatter):
    """Writes what `inner` formats, every line prefixed with the record's `<priority>`.

    Every line, not only the first: journald makes each line of a stream its own entry,
    so the lines of a traceback would otherwise be logged at the default priority.
    """

    def __init__(self, inner: logging.Formatter) -> None:
        super().__init__()
        self.inner = inner

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{syslog_priority(record.levelno)}>"
        return prefix + self.inner.format(record).replace("\n", "\n" + prefix)
