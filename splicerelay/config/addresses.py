"""Addresses as users write them: `host:port`, `[v6]:port` and `unix:/path`, and, for a
route's `listen` only, `systemd:NAME`.

Parsing is pure: hostnames are checked for shape here and resolved by the server, off the
event loop. IP literals are normalised (an IPv6 address is kept in its compressed form,
without brackets) and hostnames are lower-cased, so two spellings of one address compare
equal.

`systemd:NAME` is not an address of its own: it stands for whatever socket the service
manager passes under FileDescriptorName=NAME (socket activation), bound wherever the
socket unit says. Like `unix:`, the prefix always has this meaning, so a host really
named "systemd" is written with its trailing dot, `systemd.:80`.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

__all__ = [
    "Address",
    "AddressError",
    "ListenAddress",
    "SystemdSocketAddress",
    "TcpAddress",
    "UnixAddress",
    "is_ip_literal",
    "parse_address",
    "parse_listen_address",
]

EXPECTED_FORMS = "expected host:port, [v6]:port or unix:/path"
UNIX_PREFIX = "unix:"
SYSTEMD_PREFIX = "systemd:"
# systemd's own limit on a FileDescriptorName= (FDNAME_MAX).
MAX_SYSTEMD_NAME_LENGTH = 255
# sun_path is 108 bytes on Linux, one of which is the terminating NUL.
MAX_UNIX_PATH_BYTES = 107
MAX_HOSTNAME_LENGTH = 253

_PORT = re.compile(r"[0-9]{1,5}", re.ASCII)
# Letters, digits, hyphens and (common in internal names) underscores; no leading or
# trailing hyphen in a label.
_LABEL = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?", re.ASCII)
_DOTTED_NUMBERS = re.compile(r"[0-9.]+", re.ASCII)


class AddressError(ValueError):
    """An address that cannot be parsed; the message says what is wrong with it."""


@dataclass(frozen=True)
class TcpAddress:
    """A TCP endpoint: an IP literal (IPv6 without brackets) or a hostname, and a port."""

    host: str
    port: int

    def __str__(self) -> str:
        if ":" in self.host:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"


@dataclass(frozen=True)
class UnixAddress:
    """A Unix stream socket at an absolute filesystem path."""

    path: str

    def __str__(self) -> str:
        return f"{UNIX_PREFIX}{self.path}"


@dataclass(frozen=True)
class SystemdSocketAddress:
    """The socket the service manager passes under a name (FileDescriptorName=NAME in a
    socket unit, LISTEN_FDNAMES in the environment): a route's listen, never an upstream."""

    name: str

    def __str__(self) -> str:
        return f"{SYSTEMD_PREFIX}{self.name}"


Address = TcpAddress | UnixAddress
ListenAddress = TcpAddress | UnixAddress | SystemdSocketAddress


def is_ip_literal(host: str) -> bool:
    """True if `host` is an IPv4 or IPv6 address (IPv6 without brackets), not a name."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def parse_address(text: str) -> Address:
    """Parse `host:port`, `[v6]:port` or `unix:/abs/path`; raise AddressError if invalid."""
    try:
        if text.startswith(SYSTEMD_PREFIX):
            raise _Problem(
                f"{SYSTEMD_PREFIX}NAME (a socket passed by systemd) can only be a route's listen"
            )
        if text.startswith(UNIX_PREFIX):
            return UnixAddress(_parse_unix_path(text[len(UNIX_PREFIX) :]))
        host, port = _split_host_port(text)
        return TcpAddress(host, _parse_port(port))
    except _Problem as problem:
        raise AddressError(f"bad address {text!r}: {problem}") from None


def parse_listen_address(text: str) -> ListenAddress:
    """Parse what a route's `listen` may say: an address, or `systemd:NAME`."""
    if not text.startswith(SYSTEMD_PREFIX):
        return parse_address(text)
    try:
        return SystemdSocketAddress(_parse_systemd_name(text[len(SYSTEMD_PREFIX) :]))
    except _Problem as problem:
        raise AddressError(f"bad listen {text!r}: {problem}") from None


class _Problem(Exception):
    """What is wrong with an address, before the address itself is added to the message."""


def _parse_unix_path(path: str) -> str:
    if not path:
        raise _Problem("empty unix socket path (expected unix:/absolute/path)")
    if not path.startswith("/"):
        raise _Problem("unix socket path must be absolute (expected unix:/absolute/path)")
    if not path.isprintable():
        raise _Problem("unix socket path contains control or invalid characters")
    if path.endswith("/"):
        raise _Problem("unix socket path names a directory")
    try:
        size = len(path.encode())
    except UnicodeEncodeError:
        raise _Problem("unix socket path is not valid UTF-8") from None
    if size > MAX_UNIX_PATH_BYTES:
        raise _Problem(f"unix socket path is {size} bytes long (at most {MAX_UNIX_PATH_BYTES})")
    return path


def _parse_systemd_name(name: str) -> str:
    """A FileDescriptorName= as systemd accepts one (fdname_is_valid): printable ASCII
    without ':', which separates the names in LISTEN_FDNAMES; at most 255 characters."""
    if not name:
        raise _Problem(
            "empty name (expected systemd:NAME, NAME being the socket's FileDescriptorName=)"
        )
    if len(name) > MAX_SYSTEMD_NAME_LENGTH:
        raise _Problem(f"the name is longer than {MAX_SYSTEMD_NAME_LENGTH} characters")
    if not all(" " <= char <= "~" for char in name):
        raise _Problem("the name may hold printable ASCII characters only")
    if ":" in name:
        raise _Problem("the name may not contain ':' (it separates the names in LISTEN_FDNAMES)")
    return name


def _split_host_port(text: str) -> tuple[str, str]:
    """Split into a normalised host and the port text."""
    if text.startswith("["):
        return _split_bracketed(text)
    host, colon, port = text.rpartition(":")
    if not colon:
        raise _Problem(f"missing port ({EXPECTED_FORMS})")
    if ":" in host:
        raise _Problem("an IPv6 address needs brackets and a port, e.g. [::1]:80")
    if not host:
        raise _Problem(f"empty host ({EXPECTED_FORMS})")
    return _check_host(host), port


def _split_bracketed(text: str) -> tuple[str, str]:
    end = text.find("]")
    if end < 0:
        raise _Problem("missing ']' after the IPv6 address")
    inside, rest = text[1:end], text[end + 1 :]
    if not inside:
        raise _Problem(f"empty host ({EXPECTED_FORMS})")
    try:
        address = ipaddress.IPv6Address(inside)
    except ValueError:
        raise _Problem(f"{inside!r} in brackets is not an IPv6 address") from None
    if not rest:
        raise _Problem(f"missing port ({EXPECTED_FORMS})")
    if not rest.startswith(":"):
        raise _Problem("expected ':' and a port after ']'")
    return str(address), rest[1:]


def _check_host(host: str) -> str:
    """Return the normalised IPv4 literal or hostname, or raise _Problem."""
    if _DOTTED_NUMBERS.fullmatch(host):
        try:
            return str(ipaddress.IPv4Address(host))
        except ValueError:
            raise _Problem(f"{host!r} is not a valid IPv4 address") from None
    if len(host) > MAX_HOSTNAME_LENGTH:
        raise _Problem(f"hostname is longer than {MAX_HOSTNAME_LENGTH} characters")
    labels = host[:-1].split(".") if host.endswith(".") else host.split(".")
    if not all(_LABEL.fullmatch(label) for label in labels):
        raise _Problem(
            f"invalid hostname {host!r} (letters, digits, '-' and '_' in dot-separated labels)"
        )
    return host.lower()


def _parse_port(port: str) -> int:
    if not port:
        raise _Problem(f"missing port ({EXPECTED_FORMS})")
    if not _PORT.fullmatch(port):
        raise _Problem(f"port {port!r} is not a number from 0 to 65535")
    number = int(port)
    if number > 65535:
        raise _Problem(f"port {number} is out of range (0 to 65535)")
    return number
