"""Batch generation over a manifest: exact greedy outputs, one line per input line, resume, bad lines."""

from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile as sf
import torch

from eardrum.adapters.checkpoint import build_audio_llm, load_pretrained
from eardrum.adapters.config import AudioLLMConfig
from eardrum.adapters.projectors import ProjectorConfig
from eardrum.adapters.tiny import save_tiny_bases, write_tiny_dataset
from eardrum.inference import generate
from eardrum.inference.chat import GenerationSettings
from eardrum.inference.generate import generate_manifest, read_manifest

SETTINGS = GenerationSettings(max_new_tokens=5)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("generate")
    bases = save_tiny_bases(root / "bases")
    torch.manual_seed(0)
    config = AudioLLMConfig(encoder=bases["whisper"], llm=bases["llama"], projector=ProjectorConfig(name="stack"))
    model, processor = build_audio_llm(config)
    return model.save_pretrained(root / "checkpoint", processor)


@pytest.fixture(scope="module")
def pair(checkpoint):
    return load_pretrained(checkpoint)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data")
    write_tiny_dataset(folder, variants=2)
    return folder


def write_manifest(path, rows: list) -> None:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))


def mixed_rows() -> list:
    """Lines of every shape, with and without answers, and a blank line that is not an input line."""
    user = {
        "role": "user",
        "content": [{"type": "audio", "audio": "clips/sound2_v1.wav"}, {"type": "text", "text": "hi"}],
    }
    return [
        {"id": "a", "audio": "clips/sound0_v0.wav", "question": "how many beeps?", "answer": "one"},
        {"id": "b", "audio": "clips/sound1_v1.wav", "question": "what is this?"},
        {"audio": "clips/sound2_v0.wav", "text": "two beeps", "task": "caption"},
        {"audio": "clips/sound3_v2.wav"},
        "",
        {"messages": [user, {"role": "assistant", "content": "two beeps"}]},
        {"id": 7, "messages": [user]},
        {"audio": "clips/sound0_v2.wav", "question": "say it", "answer": "x"},
    ]


def expected_conversations(data) -> dict[int, list[dict]]:
    """Each line's prompt, written by hand: the conversation up to the reply, default prompts for asr/caption."""

    def ask(clip: str, text: str) -> list[dict]:
        part = [{"type": "audio", "audio": str(data / "clips" / clip)}, {"type": "text", "text": text}]
        return [{"role": "user", "content": part}]

    return {
        1: ask("sound0_v0.wav", "how many beeps?"),
        2: ask("sound1_v1.wav", "what is this?"),
        3: ask("sound2_v0.wav", "Describe the sound."),
        4: ask("sound3_v2.wav", "Transcribe the audio."),
        6: ask("sound2_v1.wav", "hi"),
        7: ask("sound2_v1.wav", "hi"),
        8: ask("sound0_v2.wav", "say it"),
    }


def direct_greedy(model, processor, conversation: list[dict]) -> str:
    batch = processor([conversation], add_generation_prompt=True)
    ids = model.generate(**batch, max_new_tokens=5, do_sample=False, pad_token_id=processor.tokenizer.pad_token_id)
    return processor.batch_decode(ids)[0].strip()


def read_out(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_outputs_equal_direct_greedy_calls_one_line_per_input_line(pair, data, tmp_path):
    manifest, out = data / "mixed.jsonl", tmp_path / "out.jsonl"
    write_manifest(manifest, mixed_rows())
    summary = generate_manifest(pair, manifest, out, batch_size=3, settings=SETTINGS, progress=False)
    assert (summary["lines"], summary["done"], summary["skipped"], summary["errors"]) == (7, 7, 0, 0)
    rows = {r["line"]: r for r in read_out(out)}
    assert len(read_out(out)) == 7 and sorted(rows) == [1, 2, 3, 4, 6, 7, 8]
    model, processor = pair
    for line, conversation in expected_conversations(data).items():
        assert rows[line]["output"] == direct_greedy(model, processor, conversation), line
        assert rows[line]["where"] == f"{manifest} line {line}"
    assert [rows[k].get("id") for k in (1, 2, 3, 7)] == ["a", "b", None, 7]
    assert "id" not in rows[3]


def test_prompts_drop_the_reply_and_keep_it_as_reference(data):
    manifest = data / "prompts.jsonl"
    write_manifest(manifest, mixed_rows())
    prompts, errors = read_manifest(manifest)
    assert errors == []
    assert [p.reference for p in prompts] == ["one", None, "two beeps", None, "two beeps", None, "x"]
    assert [p.conversation for p in prompts] == list(expected_conversations(data).values())
    _, errors = read_manifest(manifest, require_reference=True)
    assert [e.line for e in errors] == [2, 4, 7] and "no reference answer" in errors[0].message


def test_rerun_after_truncation_generates_only_the_missing_lines(pair, data, tmp_path, monkeypatch):
    manifest, out = data / "resume.jsonl", tmp_path / "out.jsonl"
    write_manifest(manifest, mixed_rows())
    generate_manifest(pair, manifest, out, batch_size=2, settings=SETTINGS, progress=False)
    first = {r["line"]: r for r in read_out(out)}
    kept = out.read_text().splitlines(keepends=True)[:2]
    out.write_text("".join(kept) + '{"line": 99, "outp')  # a third line cut off mid-write
    asked = []
    real = generate.answer_conversations

    def counting(model, processor, conversations, settings):
        asked.extend(c[0]["content"][0]["audio"] for c in conversations)
        return real(model, processor, conversations, settings)

    monkeypatch.setattr(generate, "answer_conversations", counting)
    summary = generate_manifest(pair, manifest, out, batch_size=2, settings=SETTINGS, progress=False)
    assert (summary["done"], summary["skipped"], summary["errors"]) == (5, 2, 0)
    assert len(asked) == 5
    rows = read_out(out)
    assert sorted(r["line"] for r in rows) == [1, 2, 3, 4, 6, 7, 8]
    assert {r["line"]: r for r in rows} == first
    assert generate_manifest(pair, manifest, out, settings=SETTINGS, progress=False)["skipped"] == 7
    assert len(asked) == 5


def test_finished_output_needs_no_model(data, tmp_path):
    manifest, out = data / "done.jsonl", tmp_path / "out.jsonl"
    write_manifest(manifest, mixed_rows()[:2])
    out.write_text('{"line": 1, "output": "x"}\n{"line": 2, "output": "y"}\n')
    summary = generate_manifest(tmp_path / "no-such-checkpoint", manifest, out, progress=False)
    assert (summary["lines"], summary["done"], summary["skipped"]) == (2, 0, 2)


def test_bad_audio_and_bad_lines_are_error_lines_and_the_rest_succeed(pair, data, tmp_path, monkeypatch):
    (data / "clips" / "corrupt.wav").write_bytes(b"RIFF\x00\x00not really a wave file at all")
    nan = np.zeros(8000, dtype=np.float32)
    nan[100] = np.nan
    sf.write(data / "clips" / "nan.wav", nan, 16000, subtype="FLOAT")  # a sound header, unusable samples
    manifest, out = data / "bad.jsonl", tmp_path / "out.jsonl"
    good = {"audio": "clips/sound0_v0.wav", "question": "how many beeps?"}
    write_manifest(
        manifest,
        [
            good,
            {"audio": "clips/missing.wav", "question": "q"},
            {"audio": "clips/corrupt.wav", "question": "q"},
            {"audio": "clips/nan.wav", "question": "q"},
            "{not json",
            {"audio": "clips/sound1_v0.wav", "text": "a high tone"},
        ],
    )
    calls = []
    real = generate.answer_conversations
    monkeypatch.setattr(generate, "answer_conversations", lambda m, p, c, s: calls.append(len(c)) or real(m, p, c, s))
    summary = generate_manifest(pair, manifest, out, batch_size=8, settings=SETTINGS, progress=False)
    assert (summary["lines"], summary["done"], summary["errors"]) == (6, 2, 4)
    assert calls == [3, 1, 1, 1]  # the batch holding nan.wav fails, then each line is tried alone
    rows = {r["line"]: r for r in read_out(out)}
    assert sorted(rows) == [1, 2, 3, 4, 5, 6]
    assert "missing.wav" in rows[2]["error"] and "no such file" in rows[2]["error"]
    assert "corrupt.wav" in rows[3]["error"] and "soundfile cannot open" in rows[3]["error"]
    assert "nan.wav" in rows[4]["error"] and "NaN" in rows[4]["error"]
    assert "not valid JSON" in rows[5]["error"]
    model, processor = pair
    conversation = expected_conversations(data)[1]
    assert rows[1]["output"] == direct_greedy(model, processor, conversation)
    assert "output" in rows[6] and "error" not in rows[6]


def test_bad_settings_are_reported_together_before_anything_runs(data, tmp_path):
    manifest = data / "settings.jsonl"
    write_manifest(manifest, mixed_rows()[:1])
    with pytest.raises(ValueError, match=r"temperature: .*-1.*batch_size: expected a positive integer, got 0"):
        generate_manifest(
            "unused", manifest, tmp_path / "o.jsonl", batch_size=0, settings=GenerationSettings(temperature=-1)
        )
    assert not (tmp_path / "o.jsonl").exists()


def test_output_that_is_not_ours_is_refused(data, tmp_path):
    manifest, out = data / "foreign.jsonl", tmp_path / "out.jsonl"
    write_manifest(manifest, mixed_rows()[:1])
    out.write_text('{"text": "something else"}\n')
    with pytest.raises(ValueError, match=r"out.jsonl line 1: expected a JSON object with an integer 'line'"):
        generate_manifest("unused", manifest, out, progress=False)
