"""The `eardrum` command line, run as a real process."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def run(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "eardrum.cli", *args], capture_output=True, text=True,
                          env=ENV, timeout=timeout)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("smoke")
    return run("smoke", "--out", str(out), "--steps", "120"), out


def test_smoke_trains_saves_reloads_and_answers(smoke):
    result, out = smoke
    assert result.returncode == 0, result.stderr
    assert "reload gives bit-identical logits: True" in result.stdout
    assert "4/4 sounds captioned right" in result.stdout
    assert (out / "checkpoint" / "eardrum_config.json").is_file()


def test_info_prints_what_the_checkpoint_holds(smoke):
    _, out = smoke
    result = run("info", str(out / "checkpoint"))
    assert result.returncode == 0, result.stderr
    assert "projector   stack: 20,928 trained parameters" in result.stdout
    assert "audio rate  12.5 tokens per second of audio" in result.stdout
    assert "llm_adapter/adapter_model.safetensors" in result.stdout
    data = json.loads(run("info", "--json", str(out / "checkpoint")).stdout)
    assert data["projector"]["name"] == "stack" and data["lora"]["r"] == 16
    assert data["encoder"]["kind"] == "local" and data["encoder"]["type"] == "whisper"


def test_user_error_is_one_line_and_exit_code_2(tmp_path):
    result = run("info", str(tmp_path))
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "eardrum_config.json is missing" in result.stderr
    assert "Traceback" not in result.stderr
