"""The command line: `splicerelay run | check | reload | ctl | bench | --version`, argparse
and dispatch."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from collections.abc import Sequence
from typing import Final

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
from splicerelay.ops.control_path import DEFAULT_CONFIG_PATH, control_place, no_default_reason
from splicerelay.ops.control_view import render, render_reload
from splicerelay.ops.service import RunOptions
from splicerelay.ops.systemd import passed_sockets
from splicerelay.protocol.control import (
    Command,
    CommandError,
    Reload,
    Reply,
    ShowInfo,
    encode_reply,
    parse_command,
)
from splicerelay.relay.control_client import DEFAULT_TIMEOUT, ControlClientError, send_command
from splicerelay.relay.listeners import ListenerSet, Role
from splicerelay.relay.name_check import check_names
from splicerelay.relay.service import AsWorker, configure_service_logs, run_relay
from splicerelay.relay.sni_table import describe_listeners
from splicerelay.workers.contract import (
    CUT_SIGNAL,
    RELOAD_RESULT_FIELD,
    die_with_parent,
    inherited_sockets,
    take_worker_setup,
)
from splicerelay.workers.reload_rounds import RELOAD_RESULT_TIMEOUT

log = logging.getLogger("splicerelay")

# `reload` waits this long for the relay's answer: a reload resolves names and binds
# listeners, and with workers waits for every one of them, up to the supervisor's own
# round timeout. Longer than that, so that a round that times out is still reported.
RELOAD_TIMEOUT: Final = RELOAD_RESULT_TIMEOUT + 15.0
# Exit codes of `ctl` and `reload`: the relay said no, or could not be asked.
EXIT_REFUSED: Final = 1
EXIT_UNREACHABLE: Final = 2


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

    reload = commands.add_parser(
        "reload",
        help="check a config file, then have the running relay load it and say how it went",
        description="Validate FILE as `splicerelay check` does; if valid, ask the running"
        " relay over its control socket to reload its config, wait for the outcome and"
        " print it. Exit 0: the new config is live (in every worker); 1: invalid, or"
        " refused by the relay, with the reason; 2: the relay could not be asked.",
    )
    add_control_arguments(reload)

    ctl = commands.add_parser(
        "ctl",
        help="send a command to the running relay's control socket",
        description="Send one command to the running relay's control socket and print"
        " the answer: tables for people, or the JSON reply with --json. Commands: show"
        " info | routes | upstreams [ROUTE] | connections [ROUTE] [--limit N]; set upstream"
        " ROUTE ADDRESS state ready|drain|maint [--kill-connections]; set upstream ROUTE"
        " ADDRESS weight N; kill connection ID; reload; help. Exit 0: done; 1: the relay"
        " answered with an error; 2: the relay could not be asked.",
    )
    add_control_arguments(ctl)
    ctl.add_argument("--json", action="store_true", help="print the reply as JSON")
    ctl.add_argument("words", nargs=argparse.REMAINDER, metavar="COMMAND ...")

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
    if args.command == "ctl":
        return command_ctl(parser, args)
    if args.command == "reload":
        return command_reload(args)
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
    # As YAML comments, so that what check prints stays a config check reads back.
    for line in describe_listeners(config.routes):
        print(f"# {line}")
    return 0


def add_control_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-s",
        "--socket",
        metavar="PATH",
        help="the control socket (default: control.socket of the config file, or its default"
        " place: $RUNTIME_DIRECTORY/control.sock, /run/splicerelay/control.sock for root,"
        " else $XDG_RUNTIME_DIR/splicerelay/control.sock)",
    )
    parser.add_argument(
        "-c",
        "--config",
        metavar="FILE",
        help=f"the relay's config file (default: {DEFAULT_CONFIG_PATH})",
    )


def find_control_socket(args: argparse.Namespace) -> str:
    """The control socket to ask: -s, else control.socket of the config file (-c, or the
    default file when it exists), else the default place. Raises ControlClientError
    saying why there is none."""
    if args.socket:
        return str(args.socket)
    setting: str | None = "auto"
    config_path = args.config or DEFAULT_CONFIG_PATH
    if args.config or os.path.exists(DEFAULT_CONFIG_PATH):
        try:
            setting = read_config(config_path)[0].control.socket
        except ConfigError as error:
            # The relay may well run on the last good version of a file being edited:
            # try the default place, and say so.
            first = error.errors[0] if error.errors else str(error)
            print(
                f"note: {first} ({len(error.errors)} problem(s)); looking for the control"
                " socket in its default place (name it with -s PATH)",
                file=sys.stderr,
            )
    return control_socket_of(args, setting)


def control_socket_of(args: argparse.Namespace, setting: str | None) -> str:
    """The control socket to ask: -s, else where `control.socket: setting` puts it."""
    if args.socket:
        return str(args.socket)
    config_path = args.config or DEFAULT_CONFIG_PATH
    place = control_place(setting, os.environ, os.geteuid())
    if place is None:
        raise ControlClientError(
            f"no control socket to ask: {no_default_reason(setting)} (in {config_path});"
            " name it with -s PATH"
        )
    return place.path


def print_unreachable(program: str, error: ControlClientError) -> int:
    print(f"splicerelay {program}: {error}", file=sys.stderr)
    return EXIT_UNREACHABLE


def command_ctl(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    # Why pick --json out of the words: argparse hands everything after the first word
    # of the command to it, so `ctl show info --json` has --json among them.
    as_json = args.json or "--json" in args.words
    words = [word for word in args.words if word != "--json"]
    if not words:
        parser.error("ctl needs a command, e.g. `splicerelay ctl show info` (or `ctl help`)")
    line = " ".join(words)
    command: Command | None
    try:
        command = parse_command(line.encode("utf-8", "surrogateescape"))
    except CommandError:
        command = None  # the relay says what is wrong with it
    try:
        path = find_control_socket(args)
        timeout = RELOAD_TIMEOUT if isinstance(command, Reload) else DEFAULT_TIMEOUT
        reply = send_command(path, line, timeout)
    except ValueError as error:
        print(f"splicerelay ctl: {error}", file=sys.stderr)
        return EXIT_UNREACHABLE
    except ControlClientError as error:
        return print_unreachable("ctl", error)
    if as_json:
        sys.stdout.write(json.dumps(json.loads(encode_reply(reply)), indent=2) + "\n")
    elif reply.ok:
        sys.stdout.write(render(command, reply.data))
    if reply.ok:
        return 0
    print_error_reply(command, reply)
    return EXIT_REFUSED


def print_error_reply(command: Command | None, reply: Reply) -> None:
    if isinstance(command, Reload):
        sys.stderr.write(render_reload(reply.data, False, reply.error)[1])
        return
    print(f"error: {reply.error}", file=sys.stderr)


def command_reload(args: argparse.Namespace) -> int:
    """Check the file the relay re-reads as `check` does; if valid, reload the relay and
    say how it went.

    Why ask the relay first: it re-reads the file it was started with, whatever file
    this command is given, so checking another one would vouch for a config that is not
    the one loaded. `-c FILE` must be that file (it is refused otherwise, before the
    relay is asked to reload); without it, the relay's own file is checked. Quiet on
    success but for one line: it runs as systemd's ExecReload=, whose output goes to the
    journal."""
    if args.config:
        config = checked_config(args.config)
        if config is None:
            return EXIT_REFUSED
        setting = config.control.socket
    try:
        path = find_control_socket(args) if not args.config else control_socket_of(args, setting)
        running = running_config_path(path)
        if running is None:
            print(
                "reload not attempted: the relay runs without a config file (--listen);"
                " restart it to change its routes",
                file=sys.stderr,
            )
            return EXIT_REFUSED
        if args.config and os.path.realpath(args.config) != os.path.realpath(running):
            print(
                f"reload not attempted: the relay re-reads {running}, not {args.config};"
                f" check and reload that file (-c {running})",
                file=sys.stderr,
            )
            return EXIT_REFUSED
        if not args.config and checked_config(running) is None:
            return EXIT_REFUSED
        reply = send_command(path, Reload(), RELOAD_TIMEOUT)
    except ControlClientError as error:
        return print_unreachable("reload", error)
    out, err = render_reload(reply.data, reply.ok, reply.error)
    sys.stdout.write(out)
    sys.stderr.write(err)
    return 0 if reply.ok else EXIT_REFUSED


def checked_config(config_path: str) -> Config | None:
    """The config in `config_path` with its warnings printed, or None (its errors
    printed) when it is invalid and no reload may be attempted."""
    try:
        config, _ = read_config(config_path)
    except ConfigError as error:
        print(error, file=sys.stderr)
        print(
            "reload not attempted: the config is invalid; the running config stays",
            file=sys.stderr,
        )
        return None
    for warning in config_warnings(config):
        print(f"warning: {warning}", file=sys.stderr)
    return config


def running_config_path(socket_path: str) -> str | None:
    """The file the relay behind `socket_path` re-reads on reload (`show info`), or None
    when it runs from flags. Raises ControlClientError when it cannot be asked."""
    reply = send_command(socket_path, ShowInfo(), DEFAULT_TIMEOUT)
    info = reply.data if reply.ok and isinstance(reply.data, dict) else None
    if info is None:
        raise ControlClientError(f"the relay did not say which file it runs: {reply.error}")
    path = info.get("config_path")
    return path if isinstance(path, str) else None


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
        worker = AsWorker(
            setup.slot,
            CUT_SIGNAL,
            RELOAD_RESULT_FIELD,
            control_socket=setup.control_path,
            admin_snapshot=setup.admin,
        )
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
        return run_relay(options, config, ListenerSet(passed_sockets()), config_text=text)
    die_with_parent(setup.supervisor_pid)
    listeners = ListenerSet(inherited_sockets(setup), role=Role.WORKER)
    return run_relay(
        options,
        config,
        listeners,
        worker,
        metrics_address=UnixAddress(setup.metrics_path),
        config_text=text,
    )
