"""Every command-line option that mirrors a settings field takes its default from that field."""

from __future__ import annotations

import argparse
import subprocess
import sys
from dataclasses import MISSING, fields

import pytest

from eardrum.adapters.placement import Placement
from eardrum.cli.main import build_parser
from eardrum.common.generation import BATCH_SIZE, GenerationSettings
from eardrum.inference.server_settings import ServerSettings

# the settings each command's options mirror, and how many of its options must be found in them
MIRRORS = {
    "chat": ((GenerationSettings, Placement), 8),
    "ask": ((GenerationSettings, Placement), 8),
    "generate": ((GenerationSettings, Placement), 8),
    "eval": ((GenerationSettings, Placement), 8),
    "serve": ((ServerSettings, Placement), 8),
}


def subcommand(name: str) -> argparse.ArgumentParser:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[name]


@pytest.mark.parametrize("command", sorted(MIRRORS))
def test_cli_defaults_are_the_settings_defaults(command):
    classes, at_least = MIRRORS[command]
    # fields without a default (the served model's name) have none to mirror
    declared = {f.name: (cls.__name__, f.default) for cls in classes for f in fields(cls) if f.default is not MISSING}
    matched = 0
    for action in subcommand(command)._actions:
        if action.dest in declared:
            owner, default = declared[action.dest]
            where = f"eardrum {command} {action.option_strings[0]}"
            assert action.default == default, f"{where}: {action.default!r} is not {owner}'s {default!r}"
            matched += 1
    assert matched >= at_least, f"eardrum {command}: only {matched} options mirror {[c.__name__ for c in classes]}"


@pytest.mark.parametrize("command", ["generate", "eval"])
def test_batch_size_default_is_declared_once(command):
    action = next(a for a in subcommand(command)._actions if a.dest == "batch_size")
    assert action.default == BATCH_SIZE


def test_building_the_parser_loads_neither_torch_nor_transformers():
    code = ("import sys; from eardrum.cli.main import build_parser; build_parser(); "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'transformers'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
