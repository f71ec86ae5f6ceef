"""Plain `check` asks no resolver; `check --resolve` does, like `nginx -t`.

The command runs in-process with the C resolver entry points replaced: socket.getaddrinfo
looks `_socket.getaddrinfo` up at each call, so every lookup the command makes, through
any default argument bound to socket.getaddrinfo, comes to the stand-in. The `--resolve`
run shows that the stand-in is really asked; the plain run that nothing asks it.
"""

from __future__ import annotations

import _socket
from pathlib import Path

import pytest

from splicerelay.cli import main
from tests.support.names import FakeResolver

CONFIG = """\
routes:
  - name: web
    listen: 127.0.0.1:8080
    upstreams:
      - address: backend.test:8000
      - address: 127.0.0.1:8001
"""


def no_other_lookup(*args: object) -> object:
    raise AssertionError(f"a lookup other than getaddrinfo: {args}")


@pytest.fixture
def resolver(monkeypatch: pytest.MonkeyPatch) -> FakeResolver:
    fake = FakeResolver({"backend.test": ["10.0.0.2", "10.0.0.3"]})
    monkeypatch.setattr(_socket, "getaddrinfo", fake)
    for name in ("gethostbyname", "gethostbyname_ex", "gethostbyaddr", "getnameinfo"):
        monkeypatch.setattr(_socket, name, no_other_lookup)
    return fake


@pytest.fixture
def config_path(tmp_path: Path) -> Path:
    path = tmp_path / "relay.yaml"
    path.write_text(CONFIG)
    return path


def test_check_resolve_asks_the_resolver(
    resolver: FakeResolver, config_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["check", "--resolve", "-c", str(config_path)]) == 0
    assert "backend.test" in resolver.asked
    notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("# ")]
    assert notes == ["# route web: backend.test:8000 -> 10.0.0.2:8000, 10.0.0.3:8000"]


def test_plain_check_asks_no_resolver(
    resolver: FakeResolver, config_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["check", "-c", str(config_path)]) == 0
    assert resolver.asked == []
    captured = capsys.readouterr()
    assert "address: backend.test:8000" in captured.out
    assert "#" not in captured.err
