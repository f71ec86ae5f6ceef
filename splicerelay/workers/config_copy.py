"""A worker's copy of the config, in memory: a memfd the worker reads as its config file.

Why not a file: the supervisor must run where nothing is writable (a read-only root,
as in Kubernetes' readOnlyRootFilesystem with no emptyDir), and the workers must load the
text the supervisor validated, never the file as the operator has it half edited. A
memfd is a file that lives in memory only. The worker inherits the descriptor at the same
number (subprocess's pass_fds) and is started as `splicerelay run -c /proc/self/fd/N`:
opening that path opens the memfd anew, at offset 0, so the relay reads it at start and
again at each reload exactly as it reads any config file.

Why one copy per worker, rewritten in place: a running worker can only be told "reload"
(SIGHUP), not handed a new descriptor, so its copy must hold the new text by then. A
rewrite in place (truncate, then write) is not atomic for a reader, which could see an
empty or half-written file. So the supervisor rewrites a worker's copy only while that
worker is not reading it: before the worker is ready, it is reading its start config;
after a SIGHUP, it may be reading until it reports the reload's outcome. worker_table.py
holds reloads back in both cases.
"""

from __future__ import annotations

import os

MEMFD_NAME = "splicerelay-config"  # shown in /proc/PID/fd links; only a label


class ConfigCopy:
    """One worker's copy of the config text, in a memfd."""

    def __init__(self, text: str) -> None:
        # Why MFD_CLOEXEC: only the worker it is for may inherit it (pass_fds makes it
        # inheritable in that child alone); others would keep the memory alive.
        self._fd = os.memfd_create(MEMFD_NAME, os.MFD_CLOEXEC)
        try:
            self.write(text)
        except BaseException:
            os.close(self._fd)
            raise

    def fileno(self) -> int:
        return self._fd

    @property
    def path(self) -> str:
        """The path the worker, holding this descriptor at the same number, reads."""
        return f"/proc/self/fd/{self._fd}"

    def write(self, text: str) -> None:
        """Replace the text; only while the worker is not reading it (see above)."""
        data = text.encode("utf-8")
        os.ftruncate(self._fd, 0)
        written = 0
        while written < len(data):
            written += os.pwrite(self._fd, data[written:], written)

    def read(self) -> str:
        """The text the worker would read now."""
        chunks = []
        offset = 0
        while chunk := os.pread(self._fd, 1 << 16, offset):
            chunks.append(chunk)
            offset += len(chunk)
        return b"".join(chunks).decode("utf-8")

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
