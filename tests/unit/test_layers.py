"""The package's layers: imports run one way, as DESIGN.md's layout table says.

config and protocol at the bottom, then datapath, ops, relay and workers; cli on top
imports everything; bench stands apart and imports nothing of the relay's internals (it
drives the relay as a program). Every import statement counts, also one inside a function.
"""

from __future__ import annotations

import ast
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "splicerelay"

# layer -> the layers it may import (itself always included)
ALLOWED: dict[str, frozenset[str]] = {
    "config": frozenset(),
    "protocol": frozenset(),
    "datapath": frozenset({"protocol"}),
    "ops": frozenset({"config", "protocol", "datapath"}),
    "relay": frozenset({"config", "protocol", "datapath", "ops"}),
    "workers": frozenset({"config", "protocol", "datapath", "ops", "relay"}),
    "bench": frozenset(),
    "cli": frozenset({"config", "protocol", "datapath", "ops", "relay", "workers", "bench"}),
    "__main__": frozenset({"cli"}),
}
# layer -> third-party packages it may import (beyond the standard library)
THIRD_PARTY: dict[str, frozenset[str]] = {
    "config": frozenset({"yaml"}),
    # optional (the crc extra): the C CRC32c, imported lazily with a pure fallback
    "protocol": frozenset({"google_crc32c"}),
    "datapath": frozenset({"trio"}),
    "ops": frozenset({"trio", "prometheus_client"}),
    "relay": frozenset({"trio"}),
    "workers": frozenset({"trio", "prometheus_client"}),
    "bench": frozenset({"trio", "rich", "matplotlib", "pproxy"}),
    "cli": frozenset({"trio"}),
    "__main__": frozenset(),
}
KNOWN_THIRD_PARTY = frozenset().union(*THIRD_PARTY.values()) | {"pytest", "hypothesis"}


def layer_of(module: Path, root: Path) -> str:
    parts = module.relative_to(root).with_suffix("").parts
    return parts[0]


def imported_modules(path: Path, root: Path) -> Iterator[tuple[int, str]]:
    """Every module an import statement in `path` names, as an absolute dotted name."""
    tree = ast.parse(path.read_text(), str(path))
    package = ["splicerelay", *path.relative_to(root).parent.parts]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            if module == "splicerelay":
                # `from splicerelay import x`: x may be a subpackage
                for alias in node.names:
                    if (root / alias.name).is_dir() or (root / f"{alias.name}.py").exists():
                        yield node.lineno, f"splicerelay.{alias.name}"
                    else:
                        yield node.lineno, "splicerelay"
            else:
                yield node.lineno, module


def violations(root: Path) -> list[str]:
    found = []
    for path in sorted(root.rglob("*.py")):
        if path.parent == root and path.stem == "__init__":
            continue  # the package root holds only the version
        layer = layer_of(path, root)
        assert layer in ALLOWED, f"{path}: a module outside every layer"
        for line, module in imported_modules(path, root):
            top, _, rest = module.partition(".")
            where = f"{path.relative_to(root.parent)}:{line}"
            if top == "splicerelay":
                if not rest:
                    continue  # __version__
                target = rest.split(".")[0]
                if target != layer and target not in ALLOWED[layer]:
                    found.append(f"{where}: {layer} imports {module}")
            elif top in KNOWN_THIRD_PARTY and top not in THIRD_PARTY[layer]:
                found.append(f"{where}: {layer} imports {module}")
    return found


def test_every_module_belongs_to_a_layer():
    top_level = {p.stem for p in PACKAGE.glob("*.py")} - {"__init__"}
    packages = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists()}
    assert top_level | packages == set(ALLOWED)


def test_imports_run_one_way():
    assert violations(PACKAGE) == []


@pytest.mark.parametrize(
    ("module", "statement", "expected"),
    [
        ("datapath/flow.py", "from splicerelay.relay import lifecycle", "datapath imports"),
        ("protocol/balancer.py", "import yaml", "protocol imports yaml"),
        ("config/addresses.py", "from splicerelay.protocol import outcome", "config imports"),
        ("relay/lifecycle.py", "from ..workers import supervisor", "relay imports"),
        ("ops/metrics.py", "    from splicerelay.relay.lifecycle import Relay", "ops imports"),
        ("bench/load.py", "from splicerelay.config import load_config", "bench imports"),
        ("datapath/session.py", "import prometheus_client", "datapath imports"),
    ],
)
def test_a_wrong_way_import_is_caught(tmp_path, module, statement, expected):
    copy = tmp_path / "splicerelay"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    target = copy / module
    if statement.startswith(" "):  # inside a function
        statement = f"def _late() -> None:\n{statement}\n"
    target.write_text(target.read_text() + "\n" + statement + "\n")
    found = violations(copy)
    assert len(found) == 1 and expected in found[0], found
