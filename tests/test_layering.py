"""Imports flow one way (README, Layout): common ← protocol ← model ← safety_policy ←
{client, server} ← simulations; client and server never import each other."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYER = {"common": 0, "protocol": 1, "model": 2, "safety_policy": 3, "client": 4, "server": 4, "simulations": 5}


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return found


@pytest.mark.parametrize("package", sorted(LAYER))
def test_imports_flow_one_way(package: str) -> None:
    wrong = sorted(
        f"{path.relative_to(ROOT)}: {module}"
        for path in (ROOT / package).rglob("*.py")
        for module in _imports(path)
        if module.startswith("fedpref.")
        and (target := module.split(".")[1]) != package
        and LAYER.get(target, 99) >= LAYER[package]
    )
    assert not wrong, f"{package} imports a package at or above its layer:\n" + "\n".join(wrong)
