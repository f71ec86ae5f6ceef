"""The supervisor's event loop: when things happen; supervisor.py says what to do then.

One thread and one select(): signals arrive as bytes on a socket (wakeup.py), the
workers' sd_notify messages on the notify socket, and `reload` requests from the control
socket's thread on its wakeup socket. After each wakeup, and at least every TICK, the
loop looks at the timers: restarts that are due, reload rounds that timed out, the
drain's deadline, hung workers, the watchdog ping, the STATUS= line and, with --watch,
the config file.
"""

from __future__ import annotations

import logging
import selectors
import signal
import socket
import time
from typing import TYPE_CHECKING

from splicerelay.ops.service import STATUS_INTERVAL, WATCH_INTERVAL, FileWatch
from splicerelay.ops.systemd import watchdog_interval
from splicerelay.workers.wakeup import received, signal_wakeup

if TYPE_CHECKING:
    from splicerelay.workers.supervisor import Supervisor

log = logging.getLogger("splicerelay")

TICK = 0.5  # seconds between looks at timers when nothing else happens


def supervise(supervisor: Supervisor) -> int:
    """Start the workers and supervise them until they have all stopped; returns the
    exit code."""
    handled = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD)
    with signal_wakeup(handled) as wakeup, selectors.DefaultSelector() as selector:
        selector.register(wakeup, selectors.EVENT_READ, "signal")
        selector.register(supervisor.receiver.fileno(), selectors.EVENT_READ, "notify")
        if supervisor.link is not None:
            selector.register(supervisor.link.thread.wakeup, selectors.EVENT_READ, "control")
        try:
            try:
                supervisor.start_workers()
            except OSError as error:
                log.error(f"cannot start a worker: {error.strerror or error}")
                return 1
            _loop(supervisor, selector, wakeup)
        finally:
            if supervisor.table:  # only on an unexpected error: do not leave them behind
                supervisor.pool.kill_all_and_wait()
    return supervisor.exit_code


def _loop(supervisor: Supervisor, selector: selectors.BaseSelector, wakeup: socket.socket) -> None:
    watchdog = watchdog_interval()
    # Pings must not wait a whole TICK when the watchdog wants them more often.
    tick = min(TICK, watchdog / 2) if watchdog else TICK
    next_watchdog = time.monotonic()
    next_status = time.monotonic() + STATUS_INTERVAL
    last_status = ""
    watch = FileWatch(supervisor.path) if supervisor.options.watch else None
    next_watch = time.monotonic() + WATCH_INTERVAL
    while not (supervisor.stopping and not supervisor.table):
        timeout = supervisor.table.next_timeout(time.monotonic(), tick)
        for key, _events in selector.select(timeout):
            if key.data == "signal":
                for signum in received(wakeup):
                    supervisor.handle_signal(signum)
            elif key.data == "control":
                assert supervisor.link is not None
                for request in supervisor.link.thread.take_reload_requests():
                    supervisor.reload("control socket", request)
            else:
                supervisor.read_notifications()
        supervisor.reap()
        now = time.monotonic()
        if not supervisor.stopping:
            supervisor.restart_due(now)
        supervisor.finish_reloads(now)
        supervisor.check_stop_deadline(now)
        if not supervisor.stopping:
            supervisor.pool.kill_hung(now)
        if watchdog and now >= next_watchdog:
            supervisor.notifier.watchdog()
            next_watchdog = now + watchdog
        if supervisor.notifier.enabled and supervisor.announced and now >= next_status:
            next_status = now + STATUS_INTERVAL
            status = supervisor.status()
            if status != last_status and not supervisor.stopping:
                supervisor.notifier.status(status)
                last_status = status
        if watch is not None and now >= next_watch:
            next_watch = now + WATCH_INTERVAL
            if watch.changed():
                supervisor.reload("file changed")
        supervisor.publish()
