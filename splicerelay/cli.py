"""The command line: `splicerelay run | check | bench | --version`."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Sequence

import trio

from splicerelay import __version__
from splicerelay.config import (
    Config,
    ConfigError,
    config_from_args,
    file_identity,
    load_config,
    render_config,
    worker_count,
)
from splicerelay.config.addresses import Address, AddressError, UnixAddress, parse_address
from splicerelay.datapath.session import Session
from splicerelay.datapath.stats import RelayStats
from splicerelay.ops import logs
from splicerelay.ops.metrics import MetricsServer, make_registry
from splicerelay.ops.systemd import Notifier, passed_sockets, watchdog_interval
from splicerelay.protocol.outcome import Outcome
from splicerelay.relay.listeners import ListenerSet, Role
from splicerelay.relay.server import (
    Relay,
    RouteRuntime,
    StartupError,
    prepare_routes,
    session_record,
)
from splicerelay.workers.contract import (
    CUT_SIGNAL,
    RELOAD_RESULT_FIELD,
    WorkerSetup,
    die_with_parent,
    inherited_sockets,
    take_worker_setup,
)

log = logging.getLogger("splicerelay")
access_log = logging.getLogger("splicerelay.access")

# Diagnostics only: set to 1 to move every byte through user space instead of splice(2),
# e.g. to rule the zero-copy path in or out while chasing a problem.
FORCE_COPY_ENV = "SPLICERELAY_FORCE_COPY"
WATCH_INTERVAL = 1.0  # seconds between looks at the config file with --watch
STATUS_INTERVAL = 5.0  # seconds between STATUS= updates to the service manager


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
        config = load_config(args.config)
    except ConfigError as error:
        print(error, file=sys.stderr)
        return 1
    sys.stdout.write(render_config(config))
    return 0


def load_run_config(parser: argparse.ArgumentParser, args: argparse.Namespace) -> Config:
    if args.config:
        if args.upstream:
            parser.error("--upstream goes with --listen, not with -c")
        return load_config(args.config)
    if not args.listen or not args.upstream:
        parser.error("run needs -c FILE, or --listen ADDRESS with at least one --upstream ADDRESS")
    return config_from_args(args.listen, args.upstream)


def configure_logs(
    args: argparse.Namespace, config: Config, worker: WorkerSetup | None = None
) -> None:
    logs.configure(
        args.log_level or config.log.level,
        args.log_format or config.log.format,
        config.log.access_log,
    )
    if worker is not None:
        tag = WorkerTag(worker.slot)
        for handler in (*log.handlers, *access_log.handlers):
            handler.addFilter(tag)


class WorkerTag(logging.Filter):
    """Adds `worker` (the slot) to every line a worker process logs."""

    def __init__(self, slot: int) -> None:
        super().__init__()
        self.slot = slot

    def filter(self, record: logging.LogRecord) -> bool:
        record.fields = {**getattr(record, "fields", {}), "worker": self.slot}
        return True


def command_run(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    try:
        worker = take_worker_setup()  # set when a supervisor started this process
    except ValueError as error:
        print(error, file=sys.stderr)
        return 1
    try:
        config = load_run_config(parser, args)
    except ConfigError as error:
        print(error, file=sys.stderr)
        return 1
    if args.watch and not args.config:
        parser.error("--watch needs -c FILE")
    configure_logs(args, config, worker)
    metrics_address: Address | None = config.metrics.listen if args.config else None
    if args.metrics_listen:
        try:
            metrics_address = (
                None if args.metrics_listen == "none" else parse_address(args.metrics_listen)
            )
        except AddressError as error:
            print(f"--metrics-listen: {error}", file=sys.stderr)
            return 1
    if isinstance(metrics_address, UnixAddress):
        # (Only a worker serves metrics on a unix socket, for its supervisor.)
        log.error(f"cannot serve metrics on {metrics_address}: it must be a TCP address")
        return 1
    if worker is None and args.config and worker_count(config.workers) > 1:
        from splicerelay.workers.supervisor import run_supervisor

        return run_supervisor(args, config, metrics_address)

    stats = RelayStats()
    if worker is None:
        listeners = ListenerSet(passed_sockets())
    else:
        die_with_parent(worker.supervisor_pid)
        listeners = ListenerSet(inherited_sockets(worker), role=Role.WORKER)
        metrics_address = UnixAddress(worker.metrics_path)
    try:
        runtimes = prepare_routes(config, stats, listeners)
    except StartupError as error:
        log.error(str(error))
        listeners.close_all(lambda sock: sock.close())
        return 1
    use_splice = os.environ.get(FORCE_COPY_ENV, "") not in ("1", "true", "yes")
    relay = Relay(
        config, runtimes, stats, listeners, use_splice=use_splice, access=write_access_log
    )
    metrics_server = None
    if metrics_address is not None:
        try:
            metrics_server = MetricsServer(
                metrics_address, make_registry(stats, __version__), is_ready=relay.is_ready
            )
        except OSError as error:
            listeners.close_all(lambda sock: sock.close())
            log.error(f"cannot serve metrics on {metrics_address}: {error.strerror or error}")
            return 1
        metrics_server.start()
    notifier = Notifier()
    reloader = Reloader(args, relay, notifier, worker)
    try:
        trio.run(serve_until_signalled, relay, notifier, reloader)
    finally:
        notifier.close()
        if metrics_server is not None:
            metrics_server.close()
    log.info("stopped")
    return 0


def write_access_log(runtime: RouteRuntime, session: Session, outcome: Outcome) -> None:
    if access_log.isEnabledFor(logging.INFO):
        access_log.info("connection", extra={"fields": session_record(runtime, session, outcome)})


def status_line(relay: Relay) -> str:
    count = relay.active_sessions
    return f"{count} connection{'' if count == 1 else 's'}"


class Reloader:
    """Re-reads the config file and applies it; one reload at a time."""

    def __init__(
        self,
        args: argparse.Namespace,
        relay: Relay,
        notifier: Notifier,
        worker: WorkerSetup | None = None,
    ) -> None:
        self.args = args
        self.path: str | None = args.config
        self.relay = relay
        self.notifier = notifier
        self.worker = worker
        self._lock = trio.Lock()

    async def reload(self, reason: str) -> None:
        if self.path is None:
            log.warning("nothing to reload: the relay runs from command-line flags")
            return
        async with self._lock:
            self.notifier.reloading()
            reloads = self.relay.stats.config_reloads
            result = "failure"
            try:
                config = await trio.to_thread.run_sync(load_config, self.path)
                # (A worker's supervisor says this, once, for all of them.)
                if config.metrics != self.relay.config.metrics and self.worker is None:
                    log.warning("metrics.listen changed: it takes effect at the next restart")
                await self.relay.reload(config)
            except ConfigError as error:
                reloads["failure"] += 1
                log.error(
                    "reload failed: invalid config; the running config stays",
                    extra={"fields": {"reason": reason, "errors": error.errors}},
                )
            except StartupError as error:
                reloads["failure"] += 1
                log.error(
                    "reload failed; the running config stays",
                    extra={"fields": {"reason": reason, "error": str(error)}},
                )
            else:
                reloads["success"] += 1
                result = "success"
                configure_logs(self.args, config, self.worker)
            finally:
                # A worker tells its supervisor how the reload went, which counts it.
                extra = () if self.worker is None else (f"{RELOAD_RESULT_FIELD}={result}",)
                self.notifier.ready(status_line(self.relay), *extra)

    async def watch(self, interval: float = WATCH_INTERVAL) -> None:
        """Reload when the file changes; also when a ConfigMap swaps its symlink."""
        assert self.path is not None
        seen = file_identity(self.path)
        while True:
            await trio.sleep(interval)
            current = file_identity(self.path)
            if current != seen and current is not None:
                seen = current
                await self.reload("file changed")


async def keep_service_manager_informed(relay: Relay, notifier: Notifier) -> None:
    """WATCHDOG=1 at half of WATCHDOG_USEC, and STATUS= with the connection count."""
    watchdog = watchdog_interval()
    interval = min(watchdog, STATUS_INTERVAL) if watchdog else STATUS_INTERVAL
    last_status = ""
    while True:
        if watchdog:
            notifier.watchdog()
        status = status_line(relay)
        if status != last_status:
            notifier.status(status)
            last_status = status
        await trio.sleep(interval)


async def serve_until_signalled(relay: Relay, notifier: Notifier, reloader: Reloader) -> None:
    """Serve until SIGTERM or SIGINT, then drain; a second signal cuts the drain short.

    SIGHUP reloads the config file. A worker process takes its cue for cutting the drain
    short from its supervisor (CUT_SIGNAL) only; a repeated SIGTERM does nothing more.
    """
    worker = reloader.worker
    watched: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
    if worker is not None:
        watched += (CUT_SIGNAL,)
    with trio.open_signal_receiver(*watched) as signals:
        async with trio.open_nursery() as nursery:

            async def serve(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
                await relay.serve(task_status=task_status)
                nursery.cancel_scope.cancel()

            await nursery.start(serve)
            notifier.ready(status_line(relay))
            log.info(
                "ready" if worker is None else "worker ready",
                extra={
                    "fields": {
                        "version": __version__,
                        "routes": {r.route.name: str(r.route.listen) for r in relay.runtimes},
                        "data_path": "splice" if relay.use_splice else "copy",
                    }
                },
            )
            if notifier.enabled:
                nursery.start_soon(keep_service_manager_informed, relay, notifier)
            if reloader.args.watch:
                nursery.start_soon(reloader.watch)
            stopping = False
            async for signum in signals:
                if signum == signal.SIGHUP:
                    if not stopping:
                        await reloader.reload("SIGHUP")
                    continue
                if signum == CUT_SIGNAL and worker is not None:
                    log.info("told to close all connections now")
                    relay.begin_shutdown()
                    relay.stop_all_sessions()
                    stopping = True
                    continue
                if not stopping:
                    stopping = True
                    log.info("stopping", extra={"fields": {"signal": signal.Signals(signum).name}})
                    notifier.stopping(f"draining {status_line(relay)}")
                    relay.begin_shutdown()
                elif worker is None:
                    log.info("second signal: closing all connections now")
                    relay.stop_all_sessions()
