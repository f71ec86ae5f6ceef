"""The schema of a route's `match`: the TLS ClientHello a route takes, by SNI and ALPN.

```yaml
match: {sni: [app.example.com, "*.app.example.com"], alpn: [h2, http/1.1]}
```

SNI names are DNS names, compared without regard to case, so they are kept in lower
case. A name is exact, or `*.` and a name: the `*` is the whole leftmost label and
stands for exactly one label (`*.example.com` takes `a.example.com`, not
`example.com` nor `a.b.example.com`), which is the rule of Envoy's server_names and
Traefik's HostSNI. Anything else with a `*` is refused rather than given a meaning of
its own. ALPN protocols are compared as written (RFC 7301 protocol ids are bytes).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable
from dataclasses import dataclass

import yaml

from splicerelay.config.addresses import ListenAddress, UnixAddress
from splicerelay.config.model import RouteMatch
from splicerelay.config.nodes import CheckedMapping, describe, is_sequence, line_of, quote
from splicerelay.config.values import ValueReader

MATCH_KEYS = ("sni", "alpn")
WILDCARD_PREFIX = "*."
# RFC 1035: a name is at most 253 characters written out (255 octets on the wire), and
# a label at most 63.
MAX_NAME_LENGTH = 253
MAX_LABEL_LENGTH = 63
# RFC 7301: a protocol id is 1 to 255 bytes.
MAX_ALPN_LENGTH = 255

# Letters, digits and hyphens, no hyphen at either end (RFC 952/1123); underscores too,
# as addresses.py allows them, since internal names use them.
_LABEL = re.compile(r"[a-z0-9_](?:[a-z0-9_-]*[a-z0-9_])?", re.ASCII)
# Printable ASCII without the space: every registered ALPN id is of this kind, and a
# space or control character in the config is a typo far more often than a protocol.
_ALPN = re.compile(r"[\x21-\x7e]+", re.ASCII)


class MatchValueError(ValueError):
    """An SNI name or ALPN protocol that is not valid; the message says why."""


def sni_name(text: str) -> str:
    """`text` as a match compares it: lower case, without a trailing dot.

    Raises MatchValueError for anything that is not a DNS name or `*.` and one."""
    if not text.isascii():
        raise MatchValueError(f"{quote(text)} is not ASCII: {_idna_hint(text)}")
    name = text.lower()
    # A fully qualified name may end in a dot; clients send the name without it.
    name = name.removesuffix(".")
    rest = name.removeprefix(WILDCARD_PREFIX)
    if rest in ("", "*"):
        raise MatchValueError(
            f"{quote(text)}: not a name; to take every name, leave it to the listener's"
            " route without match (its fallback)"
        )
    if "*" in rest:
        raise MatchValueError(
            f"{quote(text)}: a wildcard is only '*.' and a name, the '*' standing for"
            " exactly one whole leftmost label (e.g. '*.example.com')"
        )
    if _is_ip_address(rest):
        raise MatchValueError(
            f"{quote(text)} is an IP address, which a client never sends as SNI"
            " (RFC 6066); a client that connects by address sends no name and takes"
            " the listener's fallback route"
        )
    if len(name) > MAX_NAME_LENGTH:
        raise MatchValueError(f"{quote(text)} is longer than {MAX_NAME_LENGTH} characters")
    for label in rest.split("."):
        if len(label) > MAX_LABEL_LENGTH:
            raise MatchValueError(
                f"{quote(text)}: label {quote(label, 20)} is longer than"
                f" {MAX_LABEL_LENGTH} characters"
            )
        if not _LABEL.fullmatch(label):
            raise MatchValueError(
                f"{quote(text)} is not a DNS name (labels of letters, digits, '-' and '_',"
                " separated by single dots, no '-' at either end of a label)"
            )
    return name


def _is_ip_address(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _idna_hint(text: str) -> str:
    """How to write a name with non-ASCII letters: as clients send it, in IDNA form."""
    try:
        encoded = text.encode("idna").decode("ascii")
    except UnicodeError:
        return "write the name in its IDNA (xn--) form, as clients send it"
    return f"write the name in its IDNA (xn--) form, as clients send it: {encoded!r}"


def alpn_protocol(text: str) -> str:
    """`text` as an ALPN protocol id, or MatchValueError."""
    if not text:
        raise MatchValueError("an ALPN protocol id is not empty")
    if not _ALPN.fullmatch(text):
        raise MatchValueError(
            f"{quote(text)}: an ALPN protocol id here is printable ASCII without spaces"
            " (e.g. h2, http/1.1, acme-tls/1)"
        )
    if len(text) > MAX_ALPN_LENGTH:
        raise MatchValueError(f"{quote(text)} is longer than {MAX_ALPN_LENGTH} bytes")
    return text


@dataclass(frozen=True)
class Written:
    """Where a value was written: its node (for the line) and its key path."""

    node: yaml.Node
    path: str


@dataclass(frozen=True)
class MatchSource:
    """A route's match and where each of its values was written, so that checks across
    routes can say where a name or protocol was given first."""

    match: RouteMatch
    names: dict[str, Written]
    protocols: dict[str, Written]


def match_fits(reader: ValueReader, section: CheckedMapping, listen: ListenAddress) -> bool:
    """Whether the route's listener can route by ClientHello; reports why not.

    A unix socket is refused: routing by TLS ClientHello is for TCP listeners, those
    the relay binds and those systemd passes (`systemd:NAME`)."""
    if not isinstance(listen, UnixAddress):
        return True
    reader.report(
        section.fields["match"],
        f"{section.path}.match",
        f"{listen} is a unix socket, and routing by TLS ClientHello is for TCP"
        " listeners (host:port or systemd:NAME); give each route a socket of its own",
    )
    return False


def read_match(reader: ValueReader, node: yaml.Node, path: str) -> MatchSource | None:
    """The match at `node`, or None after reporting a problem."""
    section = reader.mapping(node, path, MATCH_KEYS)
    if section is None:
        return None
    if not section.fields:
        message = "must have sni, alpn or both (a route without match is the fallback)"
        reader.report(node, path, message)
        return None
    problems = len(reader.problems)
    names = _read_list(reader, section, "sni", "names", sni_name)
    protocols = _read_list(reader, section, "alpn", "protocols", alpn_protocol)
    if len(reader.problems) > problems:
        return None
    return MatchSource(RouteMatch(tuple(names), tuple(protocols)), names, protocols)


def _read_list(
    reader: ValueReader,
    section: CheckedMapping,
    key: str,
    what: str,
    parse: Callable[[str], str],
) -> dict[str, Written]:
    """The values of list `key`, each as `parse` reads it, and where it was written."""
    values: dict[str, Written] = {}
    node = section.fields.get(key)
    if node is None:
        return values
    path = f"{section.path}.{key}"
    if not is_sequence(node):
        example = "[app.example.com]" if key == "sni" else "[h2, http/1.1]"
        got = describe(node)
        reader.report(node, path, f"expected a list of {what}, e.g. {example}, got {got}")
        return values
    if not node.value:
        reader.report(node, path, f"must list at least one of the {what} (or leave {key} out)")
        return values
    for index, item in enumerate(node.value):
        item_path = f"{path}[{index}]"
        text = reader.string(item, item_path)
        if text is None:
            continue
        try:
            value = parse(text)
        except MatchValueError as error:
            reader.report(item, item_path, str(error))
            continue
        if value in values:
            first = line_of(values[value].node)
            reader.report(item, item_path, f"{value!r} is listed twice (first on line {first})")
            continue
        values[value] = Written(item, item_path)
    return values
