"""Loading a configuration: from YAML text, from a file, or from command-line arguments.

Parsing is pure. Every problem is reported as `FILE:LINE: KEYPATH: message`; all problems
in a file are collected before ConfigError is raised, and nothing else is ever raised,
whatever the input.
"""

from __future__ import annotations

import os

from splicerelay.config.addresses import Address, AddressError, TcpAddress, parse_address
from splicerelay.config.model import (
    BALANCE_STRATEGIES,
    DEFAULT_METRICS_LISTEN,
    DEFAULT_SHUTDOWN_TIMEOUT,
    Config,
    ConfigError,
    LogConfig,
    MetricsConfig,
    Tunables,
    Upstream,
    route_with,
)
from splicerelay.config.nodes import NULL, compose, is_scalar
from splicerelay.config.schema import ConfigReader

COMMAND_LINE = "<command line>"
DEFAULT_ROUTE_NAME = "default"


def parse_config(text: str, filename: str) -> Config:
    """Validate the YAML `text` of the file `filename`; raise ConfigError listing every
    problem."""
    root = compose(text, filename)
    if root is None or is_scalar(root, NULL):
        raise ConfigError(
            [f"{filename}:1: the config is empty (it needs at least a 'routes' list)"]
        )
    reader = ConfigReader(filename)
    config = reader.config(root)
    if config is None or reader.problems:
        raise ConfigError(reader.errors() or [f"{filename}:1: invalid config"])
    return config


def read_config(path: str) -> tuple[Config, str]:
    """The validated config at `path`, and the text it was read from."""
    try:
        with open(path, encoding="utf-8") as file:
            text = file.read()
    except OSError as error:
        raise ConfigError([f"{path}: cannot read: {error.strerror or error}"]) from None
    except UnicodeDecodeError as error:
        raise ConfigError([f"{path}: cannot read: not UTF-8 text (byte {error.start})"]) from None
    return parse_config(text, path), text


def load_config(path: str) -> Config:
    """Read and validate the config file at `path`."""
    return read_config(path)[0]


def file_identity(path: str) -> tuple[int, int, int, int] | None:
    """What changes when a file is rewritten or replaced (stat follows symlinks)."""
    try:
        info = os.stat(path)
    except OSError:
        return None
    return (info.st_dev, info.st_ino, info.st_mtime_ns, info.st_size)


def config_from_args(listen: str, upstreams: list[str]) -> Config:
    """A one-route config, named "default", from `--listen A --upstream B [--upstream C]`."""
    errors: list[str] = []
    listen_address = _argument_address("--listen", listen, errors)
    upstream_addresses = [_argument_address("--upstream", text, errors) for text in upstreams]
    if not upstreams:
        errors.append(f"{COMMAND_LINE}: --upstream: at least one upstream is needed")
    if errors or listen_address is None:
        raise ConfigError(errors or [f"{COMMAND_LINE}: --listen: missing"])
    route = route_with(
        Tunables(),
        name=DEFAULT_ROUTE_NAME,
        listen=listen_address,
        upstreams=tuple(Upstream(address) for address in upstream_addresses if address),
        balance=BALANCE_STRATEGIES[0],
        allow=(),
        deny=(),
    )
    return Config(
        workers=1,
        shutdown_timeout=DEFAULT_SHUTDOWN_TIMEOUT,
        metrics=MetricsConfig(parse_address(DEFAULT_METRICS_LISTEN)),
        log=LogConfig(),
        routes=(route,),
        source=COMMAND_LINE,
    )


def _argument_address(option: str, text: str, errors: list[str]) -> Address | None:
    try:
        address = parse_address(text)
    except AddressError as error:
        errors.append(f"{COMMAND_LINE}: {option}: {error}")
        return None
    if isinstance(address, TcpAddress) and address.port == 0:
        errors.append(f"{COMMAND_LINE}: {option}: port 0 is not allowed in {str(address)!r}")
        return None
    return address
