"""The bench's targets: what each one is, how it starts, and why one may be skipped.

- ``direct``: the load generator talks to its server with nothing in between;
- ``relay``: splicerelay as users run it: its defaults (access log on, logs at info),
  ``workers: 1``;
- ``relay-nolog``: the same relay with ``log: {access_log: false}``, so that the access
  log's cost reads off the two side by side;
- ``relay-auto``: the defaults with ``workers: auto``: one process per core the relay may
  use (with --pin, the proxies' cores: it counts its affinity mask, set before exec);
- ``relay-copy``: the defaults with splice(2) turned off, every byte through user space;
- ``haproxy``: the splice baseline (tcp mode, splice both ways, 1 MiB pipes, one thread);
- ``haproxy-auto``: the same with ``nbthread`` one per core the proxies may use, the
  counterpart of ``relay-auto``;
- ``socat``: one forked process per connection;
- ``pproxy``: an asyncio proxy in Python, in tunnel mode.

The relay runs with its access log on because that is what users run; its lines go to
the relay's log file in the bench's working directory, as they would go to a journal.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import shutil
import subprocess
import sys
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from splicerelay.bench.parse import BenchError, short_version, version_line
from splicerelay.bench.procs import LOOPBACK, ProcessGroup, free_port, run_tool

TARGETS = (
    "direct",
    "relay",
    "relay-nolog",
    "relay-auto",
    "relay-copy",
    "haproxy",
    "haproxy-auto",
    "socat",
    "pproxy",
)
PROXIES = TARGETS[1:]
RELAYS = ("relay", "relay-nolog", "relay-auto", "relay-copy")
HAPROXIES = ("haproxy", "haproxy-auto")
# Targets that fork one process per connection: their idle connections are capped (see
# bench_idle), since each costs a whole process on a small shared machine.
FORKING = ("socat",)

# The relay reads this variable (cli.FORCE_COPY_ENV): set, it moves every byte through
# user space instead of splice(2).
FORCE_COPY_ENV = "SPLICERELAY_FORCE_COPY"

HAPROXY_MAXCONN = 2000
HAPROXY_TIMEOUT = "10m"
# The relay's per-route connection cap, set high so that the cap is never what is measured.
RELAY_MAX_CONNECTIONS = 100_000

# Program name -> Debian package, for the peers found on PATH.
DEBIAN_PACKAGES = {
    "iperf3": "iperf3",
    "haproxy": "haproxy",
    "socat": "socat",
    "redis-server": "redis-server",
    "redis-benchmark": "redis-tools",
}
TARGET_PROGRAMS = {
    "haproxy": "haproxy",
    "haproxy-auto": "haproxy",
    "socat": "socat",
    "pproxy": "pproxy",
}

Tools = dict[str, list[str] | None]


def find_tools() -> Tools:
    """The command prefix of each peer program, or None where it is not installed.

    pproxy is a Python package: the copy importable by this interpreter comes first (it is
    what `pip install 'splicerelay[bench]'` installs), then a `pproxy` script on PATH.
    """
    tools: Tools = {
        name: [path] if (path := shutil.which(name)) else None for name in DEBIAN_PACKAGES
    }
    if importlib.util.find_spec("pproxy") is not None:
        tools["pproxy"] = [sys.executable, "-m", "pproxy"]
    else:
        path = shutil.which("pproxy")
        tools["pproxy"] = [path] if path else None
    return tools


def install_hint(program: str) -> str:
    if program == "pproxy":
        return "pip install pproxy, or pip install 'splicerelay[bench]'"
    return f"Debian: apt-get install {DEBIAN_PACKAGES[program]}"


def missing_reason(programs: Sequence[str], tools: Tools) -> str | None:
    """Why a target or workload cannot run: the programs it needs that are not installed."""
    missing = [program for program in programs if tools.get(program) is None]
    if not missing:
        return None
    hints = "; ".join(dict.fromkeys(install_hint(program) for program in missing))
    verb = "is" if len(missing) == 1 else "are"
    return f"{', '.join(missing)} {verb} not installed ({hints})"


def target_skip_reason(target: str, tools: Tools) -> str | None:
    """Why `target` cannot take part in this run at all, or None."""
    program = TARGET_PROGRAMS.get(target)
    return None if program is None else missing_reason([program], tools)


def tool_version(name: str, prefix: list[str]) -> str:
    """A short "name version" for the report, or "" when the program does not say."""
    if name == "pproxy" and prefix[:2] == [sys.executable, "-m"]:
        try:
            return f"pproxy {importlib.metadata.version('pproxy')}"
        except importlib.metadata.PackageNotFoundError:
            return ""
    flag = {"socat": "-V", "pproxy": "--version"}.get(name, "-v")
    try:
        result = run_tool([*prefix, flag], timeout=10)
    except BenchError:
        return ""
    line = version_line(result.stdout + "\n" + result.stderr)
    return short_version(line) if line else ""


# --- configs and commands -------------------------------------------------------------------


def relay_config(
    listen_port: int, upstream_port: int, workers: int | str, access_log: bool = True
) -> str:
    """The YAML config of a relay target: one route, and the relay's own log defaults
    (access log on), or those with only the access log turned off."""
    log = "" if access_log else "log: {access_log: false}\n"
    return (
        f"workers: {workers}\n"
        f"{log}"
        "defaults:\n"
        f"  max_connections: {RELAY_MAX_CONNECTIONS}\n"
        "routes:\n"
        "  - name: bench\n"
        f"    listen: {LOOPBACK}:{listen_port}\n"
        "    upstreams:\n"
        f"      - address: {LOOPBACK}:{upstream_port}\n"
    )


def relay_workers(target: str) -> int | str:
    return "auto" if target == "relay-auto" else 1


def relay_access_log(target: str) -> bool:
    """Whether a relay target keeps its access log on: all but relay-nolog do."""
    return target != "relay-nolog"


def usable_cores(cpus: Collection[int] | None) -> int:
    """How many cores a proxy may run on: the --pin set, or else all this process may use.

    Counted as the relay counts them for `workers: auto` (the affinity mask, not
    os.cpu_count(): a container or taskset may allow fewer), so that haproxy-auto gets as
    many threads as relay-auto gets processes.
    """
    return len(cpus) if cpus is not None else max(1, len(os.sched_getaffinity(0)))


def haproxy_threads(target: str, cpus: Collection[int] | None) -> int:
    """nbthread: 1 for the baseline, one per usable core for haproxy-auto."""
    return usable_cores(cpus) if target == "haproxy-auto" else 1


def relay_command(config_path: Path) -> list[str]:
    """The relay under test, run by this interpreter, with no metrics endpoint."""
    return [
        sys.executable,
        "-m",
        "splicerelay",
        "run",
        "-c",
        str(config_path),
        "--metrics-listen",
        "none",
    ]


def relay_environment(force_copy: bool = False) -> dict[str, str]:
    """The environment for the relay: this very package first on the import path.

    That way the relay measured is the code this bench belongs to, even when it runs from
    a source tree rather than an installed copy.
    """
    package_parent = str(Path(__file__).resolve().parent.parent.parent)
    path = os.environ.get("PYTHONPATH")
    env = {**os.environ, "PYTHONPATH": package_parent + (os.pathsep + path if path else "")}
    if force_copy:
        env[FORCE_COPY_ENV] = "1"
    else:
        env.pop(FORCE_COPY_ENV, None)
    return env


def haproxy_config(
    listen_port: int, upstream_port: int, maxconn: int = HAPROXY_MAXCONN, threads: int = 1
) -> str:
    """The HAProxy splice baseline: tcp mode, splice both ways, 1 MiB pipes, one thread
    (or `threads`, for haproxy-auto).

    maxconn stays at 2000 unless the idle workload needs more: HAProxy refuses to start
    when maxconn implies more fds than the limit allows.
    """
    return (
        "global\n"
        f"    maxconn {maxconn}\n"
        f"    nbthread {threads}\n"
        "    tune.pipesize 1048576\n"
        "\n"
        "defaults\n"
        "    mode tcp\n"
        "    option splice-request\n"
        "    option splice-response\n"
        "    timeout connect 5s\n"
        f"    timeout client {HAPROXY_TIMEOUT}\n"
        f"    timeout server {HAPROXY_TIMEOUT}\n"
        "\n"
        "listen bench\n"
        f"    bind {LOOPBACK}:{listen_port}\n"
        f"    server upstream {LOOPBACK}:{upstream_port}\n"
    )


def socat_command(socat: list[str], listen_port: int, upstream_port: int) -> list[str]:
    """socat forking a child per connection; bound to loopback only."""
    return [
        *socat,
        f"TCP-LISTEN:{listen_port},fork,reuseaddr,bind={LOOPBACK}",
        f"TCP:{LOOPBACK}:{upstream_port}",
    ]


def pproxy_command(pproxy: list[str], listen_port: int, upstream_port: int) -> list[str]:
    """pproxy in tunnel mode: every connection to the listener goes to the one remote."""
    return [
        *pproxy,
        "-l",
        f"tunnel://{LOOPBACK}:{listen_port}",
        "-r",
        f"tunnel://{LOOPBACK}:{upstream_port}",
    ]


# --- starting targets -----------------------------------------------------------------------


@dataclass
class Endpoint:
    """Where the load generator connects for one target, and the proxy in between."""

    target: str
    port: int
    proxy: subprocess.Popen[bytes] | None


@dataclass
class StartOptions:
    """What a workload asks of its proxies beyond the defaults."""

    haproxy_maxconn: int = HAPROXY_MAXCONN
    extra_env: dict[str, str] = field(default_factory=dict)
    # --pin: the cores the proxy runs on (None: wherever the scheduler puts it).
    cpus: frozenset[int] | None = None


def config_text(target: str, listen_port: int, upstream_port: int, options: StartOptions) -> str:
    """The config file a relay or HAProxy target starts with."""
    if target in RELAYS:
        workers, access_log = relay_workers(target), relay_access_log(target)
        return relay_config(listen_port, upstream_port, workers, access_log)
    if target in HAPROXIES:
        threads = haproxy_threads(target, options.cpus)
        return haproxy_config(listen_port, upstream_port, options.haproxy_maxconn, threads)
    raise BenchError(f"{target} has no config file")


def start_proxy(
    group: ProcessGroup,
    target: str,
    upstream_port: int,
    label: str,
    tools: Tools,
    options: StartOptions | None = None,
) -> Endpoint:
    """Start the proxy of `target` in front of `upstream_port`; BenchError if it fails."""
    options = options or StartOptions()
    port = free_port()
    name = f"{label}-{target}"
    env: dict[str, str] | None = None
    if target in RELAYS:
        config_path = group.workdir / f"{name}.yaml"
        config_path.write_text(config_text(target, port, upstream_port, options))
        env = relay_environment(force_copy=target == "relay-copy")
        argv = relay_command(config_path)
    elif target in HAPROXIES:
        config_path = group.workdir / f"{name}.cfg"
        config_path.write_text(config_text(target, port, upstream_port, options))
        argv = [*require(tools, "haproxy"), "-db", "-f", str(config_path)]
    elif target == "socat":
        argv = socat_command(require(tools, "socat"), port, upstream_port)
    elif target == "pproxy":
        argv = pproxy_command(require(tools, "pproxy"), port, upstream_port)
    else:
        raise BenchError(f"{target} is not a proxy")
    process = group.start(name, argv, port, env=env, cpus=options.cpus)
    return Endpoint(target, port, process)


def require(tools: Tools, program: str) -> list[str]:
    prefix = tools.get(program)
    if prefix is None:
        raise BenchError(missing_reason([program], tools) or f"{program} is not installed")
    return prefix
