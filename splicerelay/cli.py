"""The command line: `splicerelay run | check | bench | --version`, argparse and dispatch."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from collections.abc import Sequence

from splicerelay import __version__
from splicerelay.config import (
    Config,
    ConfigError,
    config_from_args,
    config_warnings,
    read_config,
    render_config,
    worker_count,
)
from splicerelay.config.addresses import Address, AddressError, UnixAddress, parse_address
from splicerelay.ops import logs
from splicerelay.ops.service import RunOptions
from splicerelay.ops.systemd import passed_sockets
from splicerelay.relay.listeners import ListenerSet, Role
from splicerelay.relay.name_check import check_names
from splicerelay.relay.service import AsWorker, configure_service_logs, run_relay
from splicerelay.workers.contract import (
    CUT_SIGNAL,
    RELOAD_RESULT_FIELD,
    die_with_parent,
    inherited_sockets,
    take_worker_setup,
)

log = logging.getLogger("splicerelay")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="splicerelay",
        description="A zero-copy TCP relay for Linux (splice(2) through kernel pipes).",
    )
    parser.add_argument("--version", action="version", version=f"splicerelay {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    run = commands.add_parser("run", help="run the relay")
    source = run.add_mutually_exclusive_group()
    source.add_argument("-c", "--config", metavar="FILE", help="YAML configuration file")
    source.add_argument(
        "--listen",
        metavar="ADDRESS",
        help="one-off relay: listen here (host:port, [v6]:port, unix:/path)",
    )
    run.add_argument(
        "--upstream",
        metavar="ADDRESS",
        action="append",
        default=[],
        help="one-off relay: forward to this address (repeat for round-robin with failover)",
    )
    run.add_argument(
        "--metrics-listen",
        metavar="ADDRESS",
        help="serve /metrics here (default: metrics.listen from the file; off for one-off relays)",
    )
    run.add_argument(
        "--watch",
        action="store_true",
        help="reload when the config file changes (e.g. a Kubernetes ConfigMap update)",
    )
    run.add_argument("--log-level", choices=sorted(logs.LEVELS), help="override log.level")
    run.add_argument("--log-format", choices=["json", "text"], help="override log.format")

    check = commands.add_parser(
        "check", help="validate a config file and print the effective config"
    )
    check.add_argument(
        "-c", "--config", metavar="FILE", required=True, help="YAML configuration file"
    )
    check.add_argument(
        "--resolve",
        action="store_true",
        help="also resolve upstream host names (like nginx -t) and say what they resolve to",
    )

    bench = commands.add_parser("bench", help="benchmark against a direct connection and HAProxy")
    from splicerelay import bench as bench_module

    bench_module.add_arguments(bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "run":
        return command_run(parser, args)
    if args.command == "check":
        return command_check(args)
    if args.command == "bench":
        from splicerelay import bench as bench_module

        return bench_module.run(args)
    parser.print_help(sys.stderr)
    return 2


def command_check(args: argparse.Namespace) -> int:
    try:
        config, text = read_config(args.config)
        # Only on request: plain check stays offline, --resolve asks the resolver.
        notes = check_names(config, text) if args.resolve else []
    except ConfigError as error:
        print(error, file=sys.stderr)
        return 1
    for note in notes:
        print(note, file=sys.stderr)
    for warning in config_warnings(config):
        print(f"warning: {warning}", file=sys.stderr)
    sys.stdout.write(render_config(config))
    return 0


def load_run_config(
    parser: argparse.ArgumentParser, args: argparse.Namespace
) -> tuple[Config, str | None]:
    """The config to run, and its text when it came from a file (None for flags)."""
    if args.config:
        if args.upstream:
            parser.error("--upstream goes with --listen, not with -c")
        return read_config(args.config)
    if not args.listen or not args.upstream:
        parser.error("run needs -c FILE, or --listen ADDRESS with at least one --upstream ADDRESS")
    return config_from_args(args.listen, args.upstream), None


def metrics_address_of(args: argparse.Namespace, config: Config) -> Address | None:
    """Where to serve /metrics: --metrics-listen, else the file's metrics.listen.

    A one-off relay from flags serves none unless asked. Raises AddressError.
    """
    if args.metrics_listen:
        return None if args.metrics_listen == "none" else parse_address(args.metrics_listen)
    return config.metrics.listen if args.config else None


def command_run(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    try:
        setup = take_worker_setup()  # set when a supervisor started this process
    except ValueError as error:
        print(error, file=sys.stderr)
        return 1
    try:
        config, text = load_run_config(parser, args)
    except ConfigError as error:
        print(error, file=sys.stderr)
        return 1
    if args.watch and not args.config:
        parser.error("--watch needs -c FILE")
    worker = None
    if setup is not None:
        worker = AsWorker(setup.slot, CUT_SIGNAL, RELOAD_RESULT_FIELD)
    options = RunOptions(
        config_path=args.config,
        watch=args.watch,
        log_level=args.log_level,
        log_format=args.log_format,
    )
    configure_service_logs(options, config, worker)
    try:
        metrics_address = metrics_address_of(args, config)
    except AddressError as error:
        print(f"--metrics-listen: {error}", file=sys.stderr)
        return 1
    options = dataclasses.replace(options, metrics_address=metrics_address)
    if isinstance(metrics_address, UnixAddress):
        # (Only a worker serves metrics on a unix socket, for its supervisor.)
        log.error(f"cannot serve metrics on {metrics_address}: it must be a TCP address")
        return 1
    if setup is None and text is not None and worker_count(config.workers) > 1:
        from splicerelay.workers.supervisor import run_supervisor

        return run_supervisor(options, config, text)
    if setup is None:
        return run_relay(options, config, ListenerSet(passed_sockets()))
    die_with_parent(setup.supervisor_pid)
    listeners = ListenerSet(inherited_sockets(setup), role=Role.WORKER)
    return run_relay(
        options, config, listeners, worker, metrics_address=UnixAddress(setup.metrics_path)
    )
