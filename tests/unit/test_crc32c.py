"""CRC32c: the table version against a bitwise reference, and google-crc32c against both."""

from __future__ import annotations

import builtins
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from splicerelay.protocol import crc32c as crc32c_module
from splicerelay.protocol.crc32c import crc32c, crc32c_table

PROPERTY = settings(max_examples=500, database=None, derandomize=True, deadline=None)

# RFC 3720 appendix B.4, and the usual check value of "123456789".
VECTORS = [
    (bytes(32), 0x8A9136AA),
    (b"\xff" * 32, 0x62A8AB43),
    (bytes(range(32)), 0x46DD794E),
    (bytes(range(31, -1, -1)), 0x113FDB5C),
    (b"123456789", 0xE3069283),
    (b"", 0x00000000),
]


def crc32c_bitwise(data: bytes) -> int:
    """The definition, one bit at a time: the reference the faster versions must match."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
    return crc ^ 0xFFFFFFFF


def google_value():  # type: ignore[no-untyped-def]
    google_crc32c = pytest.importorskip("google_crc32c", reason="the crc extra is not installed")
    if google_crc32c.implementation != "c":
        pytest.skip("google-crc32c is installed without its C extension")
    return google_crc32c.value


@pytest.mark.parametrize(("data", "expected"), VECTORS)
def test_rfc_3720_vectors_table_and_bitwise(data: bytes, expected: int) -> None:
    assert crc32c_bitwise(data) == expected
    assert crc32c_table(data) == expected
    assert crc32c_table(bytearray(data)) == expected
    assert crc32c_table(memoryview(data)) == expected
    assert crc32c(data) == expected


@pytest.mark.parametrize(("data", "expected"), VECTORS)
def test_rfc_3720_vectors_google_crc32c(data: bytes, expected: int) -> None:
    assert google_value()(data) == expected


@given(st.binary(max_size=300))
@PROPERTY
def test_table_equals_bitwise(data: bytes) -> None:
    assert crc32c_table(data) == crc32c_bitwise(data)


@given(st.binary(max_size=5000))
@PROPERTY
def test_table_equals_google_crc32c(data: bytes) -> None:
    value = google_value()
    assert crc32c_table(data) == value(data) == crc32c(data)


def test_every_length_around_the_eight_byte_step() -> None:
    data = bytes((index * 37 + 11) & 0xFF for index in range(40))
    for size in range(len(data) + 1):
        assert crc32c_table(data[:size]) == crc32c_bitwise(data[:size]), size


def test_uses_google_crc32c_when_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    value = google_value()
    monkeypatch.setattr(crc32c_module, "_chosen", None)
    assert crc32c(b"123456789") == 0xE3069283
    assert crc32c_module._chosen is value
    assert crc32c_module.implementation() == "c"


def test_falls_back_to_the_table_without_google_crc32c(monkeypatch: pytest.MonkeyPatch) -> None:
    real_import = builtins.__import__

    def no_google(name: str, *args: object, **kwargs: object) -> object:
        if name == "google_crc32c":
            raise ImportError("not installed")
        return real_import(name, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.delitem(sys.modules, "google_crc32c", raising=False)
    monkeypatch.setattr(builtins, "__import__", no_google)
    monkeypatch.setattr(crc32c_module, "_chosen", None)
    assert crc32c(bytes(32)) == 0x8A9136AA
    assert crc32c_module._chosen is crc32c_table
    assert crc32c_module.implementation() == "python"
