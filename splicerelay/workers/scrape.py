"""The supervisor's /metrics and /readyz: every worker's, fetched over its unix socket.

Each worker serves its own /metrics and /readyz on a private unix socket in the
supervisor's runtime directory. When Prometheus scrapes the supervisor, it fetches every
worker's exposition and serves their sum (merged_metrics.py), plus the few families the
supervisor counts itself. /readyz is ready when every worker is running and ready.
"""

from __future__ import annotations

import http.client
import socket
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from splicerelay.workers.merged_metrics import (
    Exposition,
    cumulative_part,
    merge,
    parse_exposition,
    to_metrics,
    without,
)

FETCH_TIMEOUT = 3.0  # seconds for one worker to answer; a stuck one must not stall scrapes
# Families that the supervisor counts for the whole relay: the workers' own are dropped.
# (Each worker counts every reload it applies, so their sum would count each reload once
# per worker; and whether the relay's last reload succeeded is the supervisor's verdict
# over all workers, which no sum or max of theirs gives.)
SUPERVISOR_FAMILIES = frozenset(
    {
        "splicerelay_config_reloads",
        "splicerelay_config_last_reload_successful",
        "splicerelay_config_last_reload_timestamp_seconds",
    }
)


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self._path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


def fetch(path: str, url_path: str, timeout: float = FETCH_TIMEOUT) -> tuple[int, str]:
    """GET `url_path` from the HTTP server on unix socket `path`: (status, body)."""
    connection = _UnixHTTPConnection(path, timeout)
    try:
        connection.request("GET", url_path)
        response = connection.getresponse()
        return response.status, response.read().decode("utf-8", errors="replace")
    finally:
        connection.close()


@dataclass(frozen=True)
class WorkerView:
    """What a scrape needs to know of a running worker."""

    id: int  # unique to one process: a restarted worker gets a new id (and socket)
    metrics_path: str


class WorkerScraper:
    """Merges the workers' metrics; remembers the counters of workers that died.

    Called from the metrics server's threads. `workers` returns the workers running now;
    the supervisor calls `worker_gone` from its own thread when one has exited.
    """

    def __init__(
        self,
        workers: Callable[[], Iterable[WorkerView]],
        expected_workers: Callable[[], int],
        own_families: Callable[[], Exposition],
    ) -> None:
        self._workers = workers
        self._expected_workers = expected_workers
        self._own_families = own_families
        self._scrape_lock = threading.Lock()  # one merge at a time, in order
        self._gone_lock = threading.Lock()
        self._gone: set[int] = set()
        self._folded: set[int] = set()
        self._last: dict[int, Exposition] = {}
        self._retired: Exposition = {}

    def worker_gone(self, worker_id: int) -> None:
        with self._gone_lock:
            self._gone.add(worker_id)

    def exposition(self) -> Exposition:
        with self._scrape_lock:
            views = list(self._workers())
            for view in views:
                if view.id in self._folded:
                    continue
                try:
                    status, text = fetch(view.metrics_path, "/metrics")
                    if status == 200:
                        self._last[view.id] = parse_exposition(text)
                except (OSError, http.client.HTTPException, ValueError):
                    # Exited or stuck: its last scrape stands in, so sums never dip.
                    pass
            with self._gone_lock:
                gone, self._gone = self._gone, set()
            for worker_id in gone:
                last = self._last.pop(worker_id, None)
                if last is not None:
                    self._retired = merge([self._retired, cumulative_part(last)])
                self._folded.add(worker_id)
            live = [
                self._last[view.id]
                for view in views
                if view.id in self._last and view.id not in self._folded
            ]
            merged = without(merge([*live, self._retired]), SUPERVISOR_FAMILIES)
            # process_* (fds, RSS, CPU) stay one series per process, each with a
            # `worker` label (the slot, or "supervisor"), rather than a sum: the fd limit
            # is per process, so only process_open_fds / process_max_fds of the same
            # process says how near that process is to EMFILE. A sum of fds over one
            # process's limit would cry wolf N times too early, and a sum over the sum
            # of limits would hide one worker at its limit. Labels keep the merge from
            # adding them up, and the same expression alerts with or without workers.
            # (A slot's CPU counter goes on from its dead predecessor's, like any
            # counter of a worker that died: see merged_metrics.py.)
            return merge([merged, self._own_families()])

    def all_ready(self) -> bool:
        """Every expected worker runs, and each says ready on its /readyz."""
        views = list(self._workers())
        if len(views) < self._expected_workers():
            return False
        for view in views:
            try:
                status, _ = fetch(view.metrics_path, "/readyz")
            except (OSError, http.client.HTTPException):
                return False
            if status != 200:
                return False
        return True


class MergedCollector(Collector):
    def __init__(self, scraper: WorkerScraper) -> None:
        self._scraper = scraper

    def collect(self) -> Iterable[Metric]:
        return to_metrics(self._scraper.exposition())


def make_merged_registry(scraper: WorkerScraper) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(MergedCollector(scraper))
    return registry
