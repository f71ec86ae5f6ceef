"""The relay with a call counter in it: `python -m splicerelay.bench.calls_bootstrap PREFIX ARGS`.

Runs `splicerelay ARGS` (as `python -m splicerelay ARGS` would) in this process with a
profile hook (sys.setprofile, and threading.setprofile for threads started later) that
counts every Python function entered and every C function called. The relay's own code is
untouched: the hook is the only difference, and only this process has it.

SIGUSR1 takes a snapshot: the counts since the previous one are written to
PREFIX.K.json (K = 1, 2, ...; written under another name, then renamed, so that a reader
never sees half a file), and counting starts again from zero. A driver thus measures a
window of its choosing: snapshot after a warm-up, run the load, wait until the relay is
idle, snapshot again; the second file holds the calls of the load alone, without the
start-up, the imports or the drain at exit. SIGUSR1 and not SIGUSR2: SIGUSR2 is what a
supervisor sends its workers to cut their connections.

What counts as a call, as CPython's profile hook reports it:
- "call": a Python frame starts running. A generator or coroutine that resumes after a
  suspension starts its frame again, so every resumption of a task counts as one call;
- "c_call": a function written in C is called from Python (len, socket.fileno, splice).
The hook itself is never reported (CPython turns profiling off while its hook runs), and
the snapshot's own work is discarded.
"""

from __future__ import annotations

import json
import os
import runpy
import signal
import sys
import threading
import types
from collections import Counter
from pathlib import Path
from typing import Any

SNAPSHOT_SIGNAL = signal.SIGUSR1

# A key of the counter: a code object for a Python function; for a C function, the
# function itself when it belongs to a module (one object for the life of the process),
# else (the class it is a method of, its name). A bound C method is a new object at every
# call (`sock.fileno`), so it cannot be the key: the counter would grow with every call
# and keep every socket it was bound to alive.
Key = Any


class CallCounter:
    """The profile hook's counts, and the snapshots that empty them."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.counts: Counter[Key] = Counter()
        self.snapshots = 0

    def hook(self, frame: types.FrameType, event: str, arg: object) -> None:
        if event == "call":
            self.counts[frame.f_code] += 1
        elif event == "c_call":
            owner = getattr(arg, "__self__", None)
            if owner is None or isinstance(owner, types.ModuleType):
                self.counts[arg] += 1
            else:
                kind = owner if isinstance(owner, type) else type(owner)
                self.counts[(kind, getattr(arg, "__name__", "?"))] += 1

    def install(self) -> None:
        threading.setprofile(self.hook)
        sys.setprofile(self.hook)

    def uninstall(self) -> None:
        sys.setprofile(None)
        threading.setprofile(None)

    def snapshot(self, signum: int, frame: types.FrameType | None) -> None:
        """The signal handler: write the counts so far, then count from zero again.

        Its own call, and the c_call of the sys.setprofile that pauses the hook, were
        counted before the pause: they are taken out of the counts written. Whatever runs
        in between is not counted, and the clear at the end starts the next window empty.
        """
        sys.setprofile(None)
        try:
            self.snapshots += 1
            self.counts.subtract((CallCounter.snapshot.__code__, sys.setprofile))
            self.counts = +self.counts  # drops the keys left at zero
            write_atomically(
                Path(f"{self.prefix}.{self.snapshots}.json"), json.dumps(named(self.counts))
            )
        finally:
            self.counts.clear()
            sys.setprofile(self.hook)


def write_atomically(path: Path, text: str) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text)
    os.rename(partial, path)


def named(counts: Counter[Key]) -> list[dict[str, object]]:
    """The counts as rows {name, kind, calls}, rows of the same name added together.

    Python functions are named `module:qualname`, the module found from the code's file;
    C functions `module.qualname` as the interpreter names them (`posix.splice`,
    `socket.socket.fileno`).
    """
    modules = module_names()
    rows: dict[tuple[str, str], int] = {}
    for key, calls in counts.items():
        name, kind = describe(key, modules)
        rows[(name, kind)] = rows.get((name, kind), 0) + calls
    return [{"name": name, "kind": kind, "calls": calls} for (name, kind), calls in rows.items()]


def module_names() -> dict[str, str]:
    """Source file -> module name, over every module loaded."""
    names: dict[str, str] = {}
    for name, module in list(sys.modules.items()):
        path = getattr(module, "__file__", None)
        if isinstance(path, str):
            names.setdefault(path, name)
    return names


def describe(key: Key, modules: dict[str, str]) -> tuple[str, str]:
    if isinstance(key, types.CodeType):
        module = modules.get(key.co_filename, key.co_filename)
        return f"{module}:{key.co_qualname}", "python"
    if isinstance(key, tuple):
        kind, name = key
        return f"{kind.__module__}.{kind.__qualname__}.{name}", "c"
    module = getattr(key, "__module__", None) or "builtins"
    return f"{module}.{getattr(key, '__qualname__', repr(key))}", "c"


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(
            "usage: python -m splicerelay.bench.calls_bootstrap PREFIX SPLICERELAY_ARGS...",
            file=sys.stderr,
        )
        return 2
    counter = CallCounter(argv[0])
    signal.signal(SNAPSHOT_SIGNAL, counter.snapshot)
    sys.argv = ["splicerelay", *argv[1:]]
    counter.install()
    try:
        # Run as a program, as `python -m splicerelay` does: the bench drives the relay
        # through its command line, never through its modules.
        # Its SystemExit carries the relay's exit code through.
        runpy.run_module("splicerelay", run_name="__main__", alter_sys=True)
    finally:
        counter.uninstall()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
