"""How a benchmark hands back its report: printed as JSON, and written to `--out` when given."""

from __future__ import annotations

import json
import os
from pathlib import Path

from eardrum.demo.run import cpu_name


def machine() -> dict:
    """What the numbers were measured on: the processor (or architecture) and the CPU count."""
    return {"machine": cpu_name(), "cpus": os.cpu_count()}


def emit(report: dict, out: Path | None) -> None:
    """Print `report` as indented JSON and write the same text to `out` (its folder made) when given."""
    text = json.dumps(report, indent=2)
    print(text)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")
