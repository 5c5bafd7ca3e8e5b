"""The benchmark scripts run and write the JSON they promise (tiny settings; no timing is asserted)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.mark.parametrize("script,args,key", [
    ("projector_rates.py", ["--repeats", "1", "--threads", "1"], "projectors"),
    ("whisper_trim.py", ["--seconds", "1", "--repeats", "1", "--threads", "1"], "speedup"),
])
def test_benchmark_writes_json(tmp_path, script, args, key):
    out = tmp_path / "out.json"
    subprocess.run([sys.executable, str(BENCH / script), *args, "--out", str(out)], check=True, capture_output=True,
                   timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert key in json.loads(out.read_text())
