"""CRC32c (Castagnoli), the checksum of the PROXY v2 CRC32C TLV, as a pure function.

`crc32c(data)` uses the `google-crc32c` package (the `crc` extra: C, with SSE4.2 or
ARMv8 CRC instructions where the CPU has them) when it is installed, and otherwise
`crc32c_table`, a slicing-by-8 table lookup in pure Python. Both give the same values;
the tests hold them to each other and to RFC 3720's test vectors.

Why it matters: a client may send a header of up to `proxy_protocol_max_header` bytes
with a CRC32C TLV, and the relay checksums all of it on the event loop. Byte by byte in
Python a 4 KiB header costs most of a millisecond; eight bytes per step with eight
tables costs about a third of that, and the C version a microsecond or less.
"""

from __future__ import annotations

import struct
import warnings
from collections.abc import Callable
from typing import Final

__all__ = ["crc32c", "crc32c_table", "implementation"]

# The polynomial 0x1EDC6F41, bit-reversed: CRC32c processes bits least significant first.
_POLYNOMIAL: Final = 0x82F63B78


def _tables() -> tuple[tuple[int, ...], ...]:
    """Eight 256-entry tables for slicing-by-8.

    Table 0 is the classic one: the CRC of one byte. Table k is the CRC of that byte
    followed by k zero bytes, so the CRC of eight bytes is the XOR of one lookup per
    byte, each in the table for how many bytes follow it.
    """
    first = []
    for index in range(256):
        crc = index
        for _ in range(8):
            crc = (crc >> 1) ^ _POLYNOMIAL if crc & 1 else crc >> 1
        first.append(crc)
    tables = [first]
    for _ in range(7):
        previous = tables[-1]
        tables.append([(crc >> 8) ^ first[crc & 0xFF] for crc in previous])
    return tuple(tuple(table) for table in tables)


_T0, _T1, _T2, _T3, _T4, _T5, _T6, _T7 = _tables()
# One step: the first four bytes as a little-endian word (XORed with the CRC so far),
# then the other four one by one.
_STEP: Final = struct.Struct("<IBBBB")


def crc32c_table(data: bytes | bytearray | memoryview) -> int:
    """CRC32c of `data` in pure Python, eight bytes per step (RFC 3720, appendix B.4)."""
    crc = 0xFFFFFFFF
    size = len(data)
    whole = size - size % 8
    t0, t1, t2, t3, t4, t5, t6, t7 = _T0, _T1, _T2, _T3, _T4, _T5, _T6, _T7
    for word, b4, b5, b6, b7 in _STEP.iter_unpack(data if whole == size else data[:whole]):
        word ^= crc
        crc = (
            t7[word & 0xFF]
            ^ t6[(word >> 8) & 0xFF]
            ^ t5[(word >> 16) & 0xFF]
            ^ t4[word >> 24]
            ^ t3[b4]
            ^ t2[b5]
            ^ t1[b6]
            ^ t0[b7]
        )
    for byte in data[whole:]:
        crc = t0[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def _accelerated() -> Callable[[bytes], int] | None:
    """google-crc32c's C function, or None when it is missing or only pure Python."""
    try:
        # Why catch warnings: without its C extension the package warns on import and
        # falls back to Python, slower than the table above; that is no accelerator.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import google_crc32c  # type: ignore[import-not-found, unused-ignore]
    except Exception:
        return None
    if getattr(google_crc32c, "implementation", None) != "c":
        return None
    value: Callable[[bytes], int] = google_crc32c.value
    return value


_chosen: Callable[[bytes], int] | None = None


def crc32c(data: bytes) -> int:
    """CRC32c of `data`: the C version when installed, else the table."""
    global _chosen
    if _chosen is None:
        # Chosen on first use, not at import: most relays never see a CRC32C TLV.
        _chosen = _accelerated() or crc32c_table
    return _chosen(data)


def implementation() -> str:
    """ "c" when google-crc32c's C extension computes `crc32c`, else "python"."""
    return "c" if _accelerated() is not None else "python"
