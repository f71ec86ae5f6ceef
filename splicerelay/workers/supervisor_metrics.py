"""The supervisor's own metric families, served beside the workers' merged ones."""

from __future__ import annotations

import functools

from splicerelay.datapath.stats import ReloadRecord
from splicerelay.ops.metrics import ProcessMetrics, reload_state_families
from splicerelay.workers.merged_metrics import (
    Exposition,
    counter_family,
    from_metrics,
    gauge_family,
)

# The `worker` label of the supervisor's own process_* series (a worker's is its slot).
SUPERVISOR_PROCESS = "supervisor"


def supervisor_families(restarts: int, reloads: ReloadRecord, running: int) -> Exposition:
    """splicerelay_worker_restarts, splicerelay_config_reloads{result}, how the last
    reload went and when, splicerelay_workers, and process_* of the supervisor itself,
    from the supervisor's counts.

    The reload families are the supervisor's: it alone knows whether a reload was taken
    by every worker, refused before any worker saw it, or restored after all refused it.
    """
    restarts_family = counter_family(
        "splicerelay_worker_restarts",
        "Worker processes that died and were started again.",
        [((), float(restarts))],
    )
    counts = dict(reloads.counts)
    reloads_family = counter_family(
        "splicerelay_config_reloads",
        "Config reloads (SIGHUP or --watch), by result; a failure keeps the running config.",
        [
            ((("result", result),), float(counts.get(result, 0)))
            for result in ("success", "failure")
        ],
    )
    running_family = gauge_family(
        "splicerelay_workers", "Worker processes running now.", [((), float(running))]
    )
    families = {family.name: family for family in (restarts_family, reloads_family, running_family)}
    families.update(from_metrics(reload_state_families(reloads.last_successful, reloads.last_time)))
    families.update(from_metrics(_own_process().collect()))
    return families


@functools.cache
def _own_process() -> ProcessMetrics:
    # One collector for the process's life: it reads the boot time once, when made.
    return ProcessMetrics(SUPERVISOR_PROCESS)
