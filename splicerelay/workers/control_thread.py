"""The supervisor's control socket runs on trio, in a thread of its own.

Why a thread: the supervisor's loop is a plain selector loop (it runs no connections),
while the control socket's server and the clients that ask the workers are trio code.
The thread owns everything of the control socket; the two sides meet only here:

- the supervisor's loop publishes what the handler reads (the workers, its info) as
  whole immutable values, so a reader never sees half an update;
- the loop hands work to the thread with `call_soon` (trio's run_sync_soon, which is
  thread-safe and never blocks);
- the thread hands reload requests to the loop through a queue and one byte on a
  socketpair that the loop's selector watches (`wakeup`); the loop answers each request
  through `call_soon` once its reload round is over.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import trio

from splicerelay.relay.control_socket import ControlSocketError, serve_control_socket
from splicerelay.workers.control import SupervisorControl, WorkerEntry

log = logging.getLogger("splicerelay")

START_TIMEOUT = 10.0  # seconds for the thread to bind the socket and say so
STOP_TIMEOUT = 5.0


@dataclass(eq=False)
class ReloadRequest:
    """A `reload` from the control socket, waiting in the thread for the loop's answer."""

    done: trio.Event = field(default_factory=trio.Event)
    data: dict[str, Any] = field(default_factory=dict)


class ControlThread:
    """Serves the control socket at `path` with a SupervisorControl, in a thread."""

    def __init__(self, path: str, control: Callable[[ControlThread], SupervisorControl]) -> None:
        """`control` makes the handler; it is given this thread (for `request_reload`)."""
        self.path = path
        self.handler = control(self)
        self.reloads: queue.SimpleQueue[ReloadRequest] = queue.SimpleQueue()
        # The loop's end is `wakeup`: readable when a reload request waits in `reloads`.
        self.wakeup, self._wake = socket.socketpair()
        self.wakeup.setblocking(False)
        self._wake.setblocking(False)
        self._token: trio.lowlevel.TrioToken | None = None
        self._nursery: trio.Nursery | None = None
        self._started = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="control-socket", daemon=True)

    # ----- the supervisor's side -----------------------------------------------------

    def start(self) -> None:
        """Bind the socket and serve it; raises ControlSocketError when it cannot."""
        self._thread.start()
        if not self._started.wait(START_TIMEOUT):
            raise ControlSocketError(f"the control socket {self.path} did not start in time")
        if self._error is not None:
            if isinstance(self._error, ControlSocketError):
                raise self._error
            raise ControlSocketError(f"the control socket {self.path}: {self._error}")

    def call_soon(self, function: Callable[[], object]) -> None:
        """Run `function` in the thread, soon; dropped once the thread has ended."""
        if self._token is None:
            return
        with contextlib.suppress(trio.RunFinishedError):
            self._token.run_sync_soon(function)

    def replay_to(self, worker: WorkerEntry) -> None:
        """A worker came up: give it the admin commands to date (admin_memory.py)."""

        def start() -> None:
            if self._nursery is not None:
                self.handler.worker_up(worker)
                self._nursery.start_soon(self.handler.replay, worker)

        self.call_soon(start)

    def take_reload_requests(self) -> list[ReloadRequest]:
        """The reload requests waiting (call when `wakeup` is readable)."""
        with contextlib.suppress(BlockingIOError):
            while self.wakeup.recv(4096):
                pass
        requests = []
        while True:
            try:
                requests.append(self.reloads.get_nowait())
            except queue.Empty:
                return requests

    def answer(self, request: ReloadRequest, data: dict[str, Any]) -> None:
        def finish() -> None:
            request.data = data
            request.done.set()

        self.call_soon(finish)

    def stop(self) -> None:
        """Stop serving, remove the socket file, and end the thread."""

        def cancel() -> None:
            if self._nursery is not None:
                self._nursery.cancel_scope.cancel()

        self.call_soon(cancel)
        self._thread.join(STOP_TIMEOUT)
        self.wakeup.close()
        self._wake.close()

    # ----- the thread's side ---------------------------------------------------------

    async def request_reload(self) -> dict[str, Any]:
        """Ask the supervisor's loop for a reload round; its result's data."""
        request = ReloadRequest()
        self.reloads.put(request)
        with contextlib.suppress(BlockingIOError):  # full: a wakeup is pending anyway
            self._wake.send(b"\0")
        await request.done.wait()
        return request.data

    def _run(self) -> None:
        try:
            trio.run(self._main)
        except BaseException as error:  # reported to start(), or logged
            if not self._started.is_set():
                self._error = _sole(error)
                self._started.set()
            else:
                log.exception("the control socket stopped")

    async def _main(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            await nursery.start(serve_control_socket, self.path, self.handler)
            self._started.set()


def _sole(error: BaseException) -> BaseException:
    """The one exception inside nested exception groups (a nursery wraps what its
    body raised), else `error` itself."""
    while isinstance(error, BaseExceptionGroup) and len(error.exceptions) == 1:
        error = error.exceptions[0]
    return error
