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


def test_a_damaged_checkpoint_or_bad_device_is_one_line_and_exit_code_2(smoke, tmp_path):
    import shutil

    _, out = smoke
    copy = tmp_path / "ckpt"
    shutil.copytree(out / "checkpoint", copy)
    (copy / "projector.safetensors").write_bytes(b"")
    wav = tmp_path / "a.wav"
    import numpy as np
    import soundfile as sf

    sf.write(wav, np.zeros(8000, dtype=np.float32), 16000)
    for args in (("info", str(copy)), ("ask", "--model", str(copy), "--audio", str(wav), "what?"),
                 ("ask", "--model", str(out / "checkpoint"), "--audio", str(wav), "what?", "--device", "bogus")):
        result = run(*args)
        assert result.returncode == 2, (args, result.stderr[-2000:])
        assert result.stderr.strip().count("\n") == 0 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert "projector.safetensors: not a readable safetensors file" in run("info", str(copy)).stderr
    assert "device='bogus'" in result.stderr


def test_nothing_scored_or_merged_is_an_error_and_a_seed_out_of_range_names_the_option(smoke, tmp_path):
    _, out = smoke
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    result = run("eval", "--model", str(out / "checkpoint"), "--manifest", str(empty), "--task", "asr",
                 "--out", str(tmp_path / "ev"), "--no-progress")
    assert result.returncode == 2 and "was scored" in result.stderr, result.stderr[-2000:]
    result = run("generate", "--model", str(out / "checkpoint"), "--manifest", str(empty), "--out",
                 str(tmp_path / "gen.jsonl"), "--no-progress")
    assert result.returncode == 2 and "no line of" in result.stderr, result.stderr[-2000:]
    (tmp_path / "x.wav").write_bytes(b"RIFF")
    result = run("merge-lora", str(out / "checkpoint"), str(tmp_path / "x.wav"))
    assert result.returncode == 2 and "exists and is not a folder" in result.stderr
    result = run("generate", "--model", str(out / "checkpoint"), "--manifest", str(empty), "--out",
                 str(tmp_path / "g2.jsonl"), "--seed", str(2**70))
    assert result.returncode == 2 and "argument --seed: expected an integer from 0 to 2**64 - 1" in result.stderr
