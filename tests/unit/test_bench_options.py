"""`splicerelay bench`'s target list: what runs when no --target is given, and --quick."""

from __future__ import annotations

import argparse

from splicerelay import bench
from splicerelay.bench.options import add_arguments, resolve_defaults
from splicerelay.bench.targets import PROXIES, TARGETS


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(argv)
    resolve_defaults(args)
    return args


def test_the_default_run_has_the_relay_with_and_without_its_access_log_and_haproxy() -> None:
    targets = parse().targets
    assert targets == list(TARGETS)
    for target in ("relay", "relay-nolog", "haproxy", "relay-auto", "haproxy-auto"):
        assert target in targets
    # Interleaved in this order: the relay and its log-off variant next to each other.
    assert targets.index("relay-nolog") == targets.index("relay") + 1


def test_new_targets_can_be_chosen_and_are_proxies() -> None:
    args = parse("--target", "haproxy-auto", "--target", "relay-nolog")
    assert args.targets == ["relay-nolog", "haproxy-auto"]
    assert {"relay-nolog", "haproxy-auto"} <= set(PROXIES)


def test_quick_is_still_direct_and_the_relay() -> None:
    args = parse("--quick")
    assert args.targets == ["direct", "relay"]
    assert args.rounds == 1


def test_haproxy_auto_needs_haproxy_once() -> None:
    programs = bench.programs_in_use(["conn"], ["relay", "haproxy", "haproxy-auto", "socat"])
    assert programs == ["redis-server", "redis-benchmark", "haproxy", "socat"]
    assert bench.programs_in_use(["idle"], ["haproxy-auto"]) == ["haproxy"]
