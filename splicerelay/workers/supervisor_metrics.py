"""The supervisor's own metric families, served beside the workers' merged ones."""

from __future__ import annotations

from collections.abc import Mapping

from splicerelay.workers.merged_metrics import Exposition, counter_family, gauge_family


def supervisor_families(restarts: int, reloads: Mapping[str, int], running: int) -> Exposition:
    """splicerelay_worker_restarts, splicerelay_config_reloads{result} and
    splicerelay_workers, from the supervisor's counts."""
    restarts_family = counter_family(
        "splicerelay_worker_restarts",
        "Worker processes that died and were started again.",
        [((), float(restarts))],
    )
    reloads_family = counter_family(
        "splicerelay_config_reloads",
        "Config reloads (SIGHUP or --watch), by result; a failure keeps the running config.",
        [
            ((("result", result),), float(reloads.get(result, 0)))
            for result in ("success", "failure")
        ],
    )
    running_family = gauge_family(
        "splicerelay_workers", "Worker processes running now.", [((), float(running))]
    )
    return {family.name: family for family in (restarts_family, reloads_family, running_family)}
