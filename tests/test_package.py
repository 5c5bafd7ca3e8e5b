"""Packaging and layering: one `eardrum` namespace, a wheel that holds it, adapters import nothing above."""

from __future__ import annotations

import ast
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
        elif isinstance(node, ast.ImportFrom) and node.level > 1:
            names.add("." * node.level + (node.module or ""))
    return names


@pytest.mark.parametrize("path", sorted((ROOT / "adapters").glob("*.py")), ids=lambda p: p.name)
def test_adapters_import_neither_training_nor_inference(path):
    bad = {m for m in imported_modules(path)
           if m.startswith(("eardrum.training", "eardrum.inference", "training", "inference", ".."))}
    assert not bad, f"{path.name} imports {sorted(bad)}"


def test_wheel_holds_the_eardrum_namespace(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path), str(ROOT)], check=True, capture_output=True, timeout=300)
    wheel = next(tmp_path.glob("eardrum-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "eardrum/adapters/model.py" in names and "eardrum/inference/cli.py" in names
    assert "eardrum/training/smoke.py" in names
    assert "eardrum/configs/tiny.yaml" in names and "eardrum/configs/accelerate/ddp.yaml" in names
    assert not [n for n in names if n.startswith(("adapters/", "training/", "inference/", "tests/"))]
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    assert "eardrum = eardrum.cli.main:main" in zipfile.ZipFile(wheel).read(entry).decode()
