"""The options of `splicerelay bench`: their definitions, their defaults (smaller with
--quick), and the record of what a run was asked to do.

Kept apart from the runner so that the command line can be read, and tested, without
the machinery that starts processes.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable, Sequence
from typing import Any

from splicerelay.bench.targets import TARGETS

__all__ = [
    "DIRECTIONS",
    "QUICK_TARGETS",
    "QUICK_WORKLOADS",
    "SIZES",
    "WORKLOADS",
    "WORKLOAD_ALIASES",
    "add_arguments",
    "ordered",
    "positive_int",
    "resolve_defaults",
    "settings",
    "workload_name",
]

WORKLOADS = ("bulk", "bulk8", "rr", "conn", "latency", "idle")
# The name the rr and conn workloads had together before they were split.
WORKLOAD_ALIASES = {"small": ("rr", "conn")}
DIRECTIONS = ("forward", "reverse", "bidir")

# --quick: a smoke run that keeps the bench from rotting; numbers from it mean little.
QUICK_TARGETS = ("direct", "relay")
QUICK_WORKLOADS = ("bulk", "bulk8", "rr", "conn", "latency")
# option -> (default, default with --quick)
SIZES: dict[str, tuple[int, int]] = {
    "rounds": (3, 1),
    "duration": (4, 1),
    "requests": (100_000, 2_000),
    "new_connection_requests": (10_000, 500),
    "latency_requests": (20_000, 500),
    "idle_connections": (10_000, 100),
    "clients": (50, 50),
}


def positive_int(text: str) -> int:
    """argparse type: an integer of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1: {text!r}")
    return value


def workload_name(text: str) -> str:
    """argparse type: a workload, or the old name `small` (rr and conn)."""
    if text in WORKLOADS or text in WORKLOAD_ALIASES:
        return text
    raise argparse.ArgumentTypeError(
        f"unknown workload {text!r} (choose from {', '.join(WORKLOADS)})"
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `splicerelay bench`."""
    parser.description = (
        "Measure the relay (with its defaults, access log on, and without the access "
        "log), HAProxy (the splice baseline), socat, pproxy and a direct connection side by "
        "side with real load generators, rounds interleaved, and report medians and ratios "
        "to HAProxy."
    )
    parser.add_argument(
        "--workload",
        dest="workloads",
        action="append",
        type=workload_name,
        metavar="NAME",
        help=f"one of {', '.join(WORKLOADS)}; repeat for several (default: all)",
    )
    parser.add_argument(
        "--case", dest="workloads", action="append", type=workload_name, help=argparse.SUPPRESS
    )
    parser.add_argument(
        "--target",
        dest="targets",
        action="append",
        choices=TARGETS,
        metavar="NAME",
        help=f"one of {', '.join(TARGETS)}; repeat for several (default: all)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: direct and relay only, all workloads but idle, tiny sizes, 1 round",
    )
    parser.add_argument(
        "--pin",
        action="store_true",
        help="run every proxy on one core and the load generators, their servers and the "
        "bench on the others, so that proxies compare per core (needs 2 usable cores)",
    )
    parser.add_argument(
        "--direction",
        dest="directions",
        action="append",
        choices=DIRECTIONS,
        help="bulk and bulk8 direction: forward, reverse (-R) or bidir (--bidir); repeat "
        "for several (default: forward)",
    )
    parser.add_argument(
        "--rounds",
        type=positive_int,
        metavar="N",
        help="interleaved rounds per target; the report gives medians (default: 3)",
    )
    parser.add_argument("--repeat", dest="rounds", type=positive_int, help=argparse.SUPPRESS)
    parser.add_argument(
        "--duration",
        type=positive_int,
        metavar="SECONDS",
        help="bulk and bulk8: iperf3 -t (default: 4)",
    )
    parser.add_argument(
        "--requests",
        type=positive_int,
        metavar="N",
        help="rr: GETs over kept-alive connections (default: 100000)",
    )
    parser.add_argument(
        "--new-connection-requests",
        type=positive_int,
        metavar="N",
        help="conn: GETs with a new connection each (default: 10000)",
    )
    parser.add_argument(
        "--latency-requests",
        type=positive_int,
        metavar="N",
        help="latency: sequential GETs over one connection (default: 20000)",
    )
    parser.add_argument(
        "--clients",
        type=positive_int,
        metavar="C",
        help="rr and conn: redis-benchmark -c (default: 50)",
    )
    parser.add_argument(
        "--idle-connections",
        type=positive_int,
        metavar="N",
        help="idle: connections held open through each proxy (default: 10000; socat at most 1000)",
    )
    parser.add_argument("--markdown", metavar="FILE", help="also write the report here")
    parser.add_argument("--json", metavar="FILE", help="also write raw samples and medians here")
    parser.add_argument("--png", metavar="FILE", help="also draw a chart here (needs matplotlib)")


def resolve_defaults(args: argparse.Namespace) -> None:
    """Fill the options left out (smaller with --quick), in canonical order, no duplicates."""
    quick = bool(getattr(args, "quick", False))
    chosen = [
        name
        for workload in args.workloads or []
        for name in WORKLOAD_ALIASES.get(workload, (workload,))
    ]
    args.workloads = ordered(chosen or (QUICK_WORKLOADS if quick else WORKLOADS), WORKLOADS)
    args.targets = ordered(args.targets or (QUICK_TARGETS if quick else TARGETS), TARGETS)
    args.directions = ordered(args.directions or ["forward"], DIRECTIONS)
    for name, (normal, small) in SIZES.items():
        if getattr(args, name, None) is None:
            setattr(args, name, small if quick else normal)
    for name in ("markdown", "json", "png"):
        if not hasattr(args, name):
            setattr(args, name, None)
    args.pin = bool(getattr(args, "pin", False))


def ordered(chosen: Iterable[str], canonical: Sequence[str]) -> list[str]:
    wanted = set(chosen)
    return [name for name in canonical if name in wanted]


def settings(args: argparse.Namespace) -> dict[str, Any]:
    """What the run was asked to do, for the report (the cores, once --pin placed them)."""
    return {
        "quick": bool(getattr(args, "quick", False)),
        "pin": None,
        "workloads": list(args.workloads),
        "targets": list(args.targets),
        "directions": list(args.directions),
        **{name: getattr(args, name) for name in SIZES},
    }
