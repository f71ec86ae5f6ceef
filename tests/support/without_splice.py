"""Run a command on a kernel that says splice(2) does not exist.

`python -m tests.support.without_splice CMD...` installs a seccomp filter that makes every
splice(2) fail with ENOSYS, then execs CMD. The relay under it sees exactly what it would
see on a kernel or file type without splice support, so the copy fallback is tested
against a real kernel refusal rather than a mock.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import struct
import sys

PR_SET_NO_NEW_PRIVS = 38
PR_SET_SECCOMP = 22
SECCOMP_MODE_FILTER = 2
SECCOMP_RET_ALLOW = 0x7FFF0000
SECCOMP_RET_ERRNO = 0x00050000

BPF_LD_W_ABS = 0x20  # BPF_LD | BPF_W | BPF_ABS
BPF_JEQ_K = 0x15  # BPF_JMP | BPF_JEQ | BPF_K
BPF_RET_K = 0x06  # BPF_RET | BPF_K

# (audit arch, splice syscall number) per machine.
ARCHES = {
    "x86_64": (0xC000003E, 275),
    "aarch64": (0xC00000B7, 76),
}


def supported() -> bool:
    return platform.machine() in ARCHES


def filter_program() -> bytes:
    audit_arch, splice_nr = ARCHES[platform.machine()]

    def op(code: int, jt: int, jf: int, k: int) -> bytes:
        return struct.pack("HBBI", code, jt, jf, k)

    return b"".join(
        [
            op(BPF_LD_W_ABS, 0, 0, 4),  # seccomp_data.arch
            op(BPF_JEQ_K, 1, 0, audit_arch),
            op(BPF_RET_K, 0, 0, SECCOMP_RET_ALLOW),  # another ABI: leave it alone
            op(BPF_LD_W_ABS, 0, 0, 0),  # seccomp_data.nr
            op(BPF_JEQ_K, 0, 1, splice_nr),
            op(BPF_RET_K, 0, 0, SECCOMP_RET_ERRNO | errno.ENOSYS),
            op(BPF_RET_K, 0, 0, SECCOMP_RET_ALLOW),
        ]
    )


def install() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    program = filter_program()
    buffer = ctypes.create_string_buffer(program)

    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    fprog = SockFprog(len(program) // 8, ctypes.cast(buffer, ctypes.c_void_p))
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")
    if libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(fprog), 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_SECCOMP)")


if __name__ == "__main__":
    install()
    os.execvp(sys.argv[1], sys.argv[1:])
