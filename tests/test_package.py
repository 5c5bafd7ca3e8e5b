"""Packaging and layering: one `eardrum` namespace, a wheel that holds it, imports that go down, never up or across."""

from __future__ import annotations

import ast
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# The eardrum packages each one may import (itself included). adapters is the model; common the shared layer
# (records, batching, metrics, decoding); training and inference are siblings on top of both; cli and demo sit
# on top of everything, and demo does not reach for the command line. eardrum.configs holds only YAML files.
ALLOWED = {
    "adapters": {"adapters"},
    "common": {"adapters", "common"},
    "training": {"adapters", "common", "training"},
    "inference": {"adapters", "common", "inference"},
    "cli": {"adapters", "common", "training", "inference", "demo", "cli"},
    "demo": {"adapters", "common", "training", "inference", "demo"},
}
PACKAGES = tuple(ALLOWED)
SOURCES = sorted(p for package in PACKAGES for p in (ROOT / package).rglob("*.py"))


def source_id(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def package_dir(path: Path) -> str:
    return path.relative_to(ROOT).parts[0]


def package_of(module: str) -> str | None:
    """`eardrum.training.trainer` -> "training"; None for a module outside the six packages."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "eardrum" and parts[1] in PACKAGES else None


def is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def layering_problems(source: str, own: str) -> list[str]:
    """Each import in `source`, a file of package `own`, that `own` may not make, as 'line N: what'."""
    problems = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            modules = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level > 1:
            problems.append(f"line {node.lineno}: relative import {'.' * node.level}{node.module or ''} leaves {own}")
            continue
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            modules = [node.module]
        else:
            continue
        for module in modules:
            if module.split(".")[0] in PACKAGES:
                problems.append(f"line {node.lineno}: {module} bypasses the eardrum namespace")
            elif (target := package_of(module)) and target not in ALLOWED[own]:
                problems.append(f"line {node.lineno}: {module} ({own} may import {', '.join(sorted(ALLOWED[own]))})")
    return problems


def dotted(node: ast.expr) -> list[str] | None:
    """`a.b.c` -> ["a", "b", "c"]; None for anything but names and attributes."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    return [node.id, *reversed(parts)] if isinstance(node, ast.Name) else None


def private_name_problems(source: str, own: str) -> list[str]:
    """Each use in `source`, a file of package `own`, of another eardrum package's private name, as 'line N: what'."""
    tree = ast.parse(source)
    bound: dict[str, str] = {}  # local name -> the eardrum module it stands for
    problems = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                bound[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            for a in node.names:
                if package_of(node.module) not in (None, own) and is_private(a.name):
                    problems.append(f"line {node.lineno}: from {node.module} import {a.name}")
                bound[a.asname or a.name] = f"{node.module}.{a.name}"
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Attribute) and is_private(node.attr)):
            continue
        parts = dotted(node.value)
        if parts and parts[0] in bound:
            module = ".".join([bound[parts[0]], *parts[1:]])
            if package_of(module) not in (None, own):
                problems.append(f"line {node.lineno}: {'.'.join(parts)}.{node.attr} ({module}.{node.attr})")
    return problems


def test_every_package_has_sources():
    assert {package_dir(p) for p in SOURCES} == set(PACKAGES)


@pytest.mark.parametrize("path", SOURCES, ids=source_id)
def test_imports_follow_the_layering(path):
    problems = layering_problems(path.read_text(), package_dir(path))
    assert not problems, f"{source_id(path)}: " + "; ".join(problems)


@pytest.mark.parametrize("path", SOURCES, ids=source_id)
def test_no_private_names_of_another_package(path):
    problems = private_name_problems(path.read_text(), package_dir(path))
    assert not problems, f"{source_id(path)}: " + "; ".join(problems)


def test_the_checks_catch_what_they_are_for():
    bad = (
        "import eardrum.training.trainer as trainer\n"
        "from eardrum.adapters import audio\n"
        "from eardrum.adapters.audio import _private, __version__\n"
        "from ..training import setup\n"
        "import inference.chat\n"
        "from . import _own\n"
        "x = trainer._step, audio._FORMATS, audio.__name__, _own._fine\n"
    )
    assert layering_problems(bad, "common") == [
        "line 1: eardrum.training.trainer (common may import adapters, common)",
        "line 4: relative import ..training leaves common",
        "line 5: inference.chat bypasses the eardrum namespace",
    ]
    assert sorted(private_name_problems(bad, "common")) == [
        "line 3: from eardrum.adapters.audio import _private",
        "line 7: audio._FORMATS (eardrum.adapters.audio._FORMATS)",
        "line 7: trainer._step (eardrum.training.trainer._step)",
    ]


def test_wheel_holds_the_eardrum_namespace(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path), str(ROOT)], check=True, capture_output=True, timeout=300)
    wheel = next(tmp_path.glob("eardrum-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    for name in ("eardrum/adapters/model.py", "eardrum/training/trainer.py", "eardrum/inference/chat.py",
                 "eardrum/cli/main.py", "eardrum/cli/__main__.py", "eardrum/common/records.py",
                 "eardrum/demo/smoke.py", "eardrum/demo/run.py", "eardrum/configs/tiny.yaml",
                 "eardrum/configs/accelerate/ddp.yaml", "eardrum/inference/web/index.html",
                 "eardrum/demo/sentences.txt"):
        assert name in names, name
    top = ("adapters/", "common/", "training/", "inference/", "cli/", "demo/", "configs/", "tests/")
    assert not [n for n in names if n.startswith(top)]
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    assert "eardrum = eardrum.cli.main:main" in zipfile.ZipFile(wheel).read(entry).decode()
