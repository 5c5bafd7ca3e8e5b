"""Self-distillation: the LLM's own text answers become the audio targets; resumable; errors named."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from eardrum.adapters.checkpoint import build_audio_llm
from eardrum.adapters.config import AudioLLMConfig
from eardrum.common.decoding import answer_conversations
from eardrum.common.generation import GenerationSettings
from eardrum.common.records import DataSource, load_records
from eardrum.training.distill import DistillError, distill_manifest, text_prompt

DATA = Path(__file__).resolve().parents[2] / "tests" / "assets" / "tiny_data"


@pytest.fixture(scope="module")
def built():
    torch.manual_seed(0)
    return build_audio_llm(AudioLLMConfig(encoder="tiny:whisper", llm="tiny:llama"))


def write_manifest(path: Path, n: int) -> Path:
    lines = [
        {"audio": str(DATA / "clips" / f"sound{k % 4}_v0.wav"), "transcript": f"how many beeps {k}?"} for k in range(n)
    ]
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


def test_targets_are_the_llms_own_text_answers(built, tmp_path):
    model, processor = built
    manifest = write_manifest(tmp_path / "q.jsonl", 5)
    stats = distill_manifest(model, processor, manifest, tmp_path / "out.jsonl", batch_size=2, max_new_tokens=5)
    rows = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert stats["items"] == 5 and stats["written"] + stats["empty"] == 5 and len(rows) == stats["written"]
    for row in rows:
        item = {"transcript": row["transcript"], "audio": row["messages"][0]["content"][0]["audio"]}
        settings = GenerationSettings(max_new_tokens=5)
        answer = answer_conversations(model, processor, [text_prompt(item)], settings)[0]
        assert row["messages"][-1]["content"] == answer
        assert row["messages"][0]["content"][0]["type"] == "audio"
    records, problems = load_records([DataSource(path=str(tmp_path / "out.jsonl"))])
    assert not problems and len(records) == len(rows) and {r.task for r in records} == {"chat"}


def test_rerun_keeps_what_is_done(built, tmp_path):
    model, processor = built
    manifest = write_manifest(tmp_path / "q.jsonl", 4)
    out = tmp_path / "out.jsonl"
    distill_manifest(model, processor, manifest, out, max_new_tokens=3)
    again = distill_manifest(model, processor, manifest, out, max_new_tokens=3)
    assert again["written"] == 0 and again["kept"] == len(out.read_text().splitlines())


def test_bad_lines_are_all_named(built, tmp_path):
    model, processor = built
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"audio": "a.wav"}\nnot json\n')
    with pytest.raises(DistillError, match=r"bad.jsonl line 1: expected .*\n.*bad.jsonl line 2: not JSON"):
        distill_manifest(model, processor, bad, tmp_path / "out.jsonl")
