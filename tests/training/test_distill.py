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


def _clips(tmp_path: Path, seconds: list[float]) -> list[str]:
    import numpy as np
    import soundfile as sf

    names = []
    for k, s in enumerate(seconds):
        sf.write(tmp_path / f"c{k}.wav", np.full(int(16000 * s), 0.01 * (k + 1), np.float32), 16000)
        names.append(f"c{k}.wav")
    return names


def test_filter_by_hint_keeps_lines_the_hint_agrees_with_and_every_clip_without_speech(tmp_path):
    from eardrum.training.distill import filter_by_hint

    names = _clips(tmp_path, [1.0, 1.2, 1.4, 1.6, 65.0])
    lines = [
        {"audio": names[0], "text": "the cat sat on two mats"},  # hint: 1 word of 6 wrong -> kept at 0.25
        {"audio": names[1], "text": "a dog ran"},  # hint: 2 words of 3 wrong -> dropped
        {"audio": names[2], "text": "There is no speech in this recording.", "transcript": ""},  # never checked
        {"audio": names[3], "text": "five apples"},  # "5 apples" once digits are spelt out -> kept
        {"audio": names[4], "text": "one two three"},  # 65 s: three windows, their texts joined
    ]
    manifest = tmp_path / "asr.jsonl"
    manifest.write_text("".join(json.dumps(x) + "\n" for x in lines))
    hints = {16000: "the cat sat on two hats", 19200: "a frog swam", 25600: "5 apples"}
    calls, long_clip = [], iter(["one", "two", "three"])

    def transcriber(windows):
        calls.append([len(w) for w in windows])
        return [hints.get(len(w)) or next(long_clip) for w in windows]

    summary = filter_by_hint(transcriber, manifest, tmp_path / "kept.jsonl", max_wer=0.25,
                             normalise=lambda t: t.replace("5", "five"))
    assert calls == [[16000, 19200, 25600, 480000, 480000, 80000]]  # the silent clip is never transcribed
    kept = [json.loads(x) for x in (tmp_path / "kept.jsonl").read_text().splitlines()]
    assert [Path(r["audio"]).name for r in kept] == [names[0], names[2], names[3], names[4]]
    assert all(Path(r["audio"]).is_absolute() for r in kept) and kept[1]["transcript"] == ""
    assert summary == {"lines": 5, "kept": 4, "dropped": 1, "unchecked": 1}


def test_filter_by_hint_with_hint_targets_trains_the_model_to_copy_what_it_reads(tmp_path):
    from eardrum.training.distill import filter_by_hint

    names = _clips(tmp_path, [1.0, 1.2, 1.4, 1.6])
    lines = [
        {"audio": names[0], "text": "the cat sat on two mats", "voice": "a"},  # kept, target = the hint
        {"audio": names[1], "text": "a dog ran"},  # too far from the hint: dropped
        {"audio": names[2], "text": "There is no speech in this recording.", "transcript": ""},  # kept as it is
        {"audio": names[3], "text": "hello there"},  # Whisper heard nothing: nothing to copy, dropped
    ]
    manifest = tmp_path / "asr.jsonl"
    manifest.write_text("".join(json.dumps(x) + "\n" for x in lines))
    hints = {16000: "The cat sat on two hats.", 19200: "a frog swam", 25600: "", 22400: " "}

    transcriber = lambda windows: [hints[len(w)] for w in windows]  # noqa: E731
    summary = filter_by_hint(transcriber, manifest, tmp_path / "kept.jsonl", max_wer=0.5, hint_targets=True)
    kept = [json.loads(x) for x in (tmp_path / "kept.jsonl").read_text().splitlines()]
    assert [Path(r["audio"]).name for r in kept] == [names[0], names[2]]
    assert kept[0]["text"] == "The cat sat on two hats." and kept[0]["reference_text"] == "the cat sat on two mats"
    assert kept[0]["voice"] == "a"
    assert kept[1] == {**lines[2], "audio": str((tmp_path / names[2]).resolve())}  # no speech: its own text
    assert summary == {"lines": 4, "kept": 2, "dropped": 2, "unchecked": 1}
    # however loose the filter, a clip Whisper heard nothing in has no hint to copy
    summary = filter_by_hint(transcriber, manifest, tmp_path / "loose.jsonl", max_wer=1.0, hint_targets=True)
    kept = [json.loads(x) for x in (tmp_path / "loose.jsonl").read_text().splitlines()]
    assert [r["text"] for r in kept] == ["The cat sat on two hats.", "a frog swam", lines[2]["text"]]
    assert summary["dropped"] == 1


def test_filter_by_hint_names_every_bad_line_and_writes_nothing(tmp_path):
    from eardrum.training.distill import filter_by_hint

    names = _clips(tmp_path, [1.0])
    manifest = tmp_path / "asr.jsonl"
    manifest.write_text("\n".join([json.dumps({"audio": names[0], "text": "fine"}), "{not json",
                                   json.dumps({"audio": names[0], "text": " "}),
                                   json.dumps({"audio": "missing.wav", "text": "gone"})]) + "\n")
    with pytest.raises(DistillError) as err:
        filter_by_hint(lambda w: ["fine"] * len(w), manifest, tmp_path / "out.jsonl", max_wer=0.25)
    message = str(err.value)
    assert "3 problem(s)" in message and f"{manifest} line 2: not JSON" in message
    assert f"{manifest} line 3: expected an object with an 'audio' path and a non-empty 'text'" in message
    assert "line 4" in message and "missing.wav" in message
    assert not (tmp_path / "out.jsonl").exists()
    with pytest.raises(ValueError, match="max_wer"):
        filter_by_hint(lambda w: [], manifest, tmp_path / "out.jsonl", max_wer=float("nan"))


def test_transcribe_hints_shares_the_clips_with_speech_between_processes(tmp_path):
    from eardrum.training.distill import transcribe_hints

    names = _clips(tmp_path, [1.0, 1.2, 1.4, 1.6, 1.8])
    lines = [{"audio": name, "text": f"line {k}"} for k, name in enumerate(names)]
    lines[1]["transcript"] = ""  # no speech: in no share
    manifest = tmp_path / "asr.jsonl"
    manifest.write_text("".join(json.dumps(x) + "\n" for x in lines))
    transcriber = lambda windows: [f"heard {len(w)}" for w in windows]  # noqa: E731
    shares = [transcribe_hints(transcriber, manifest, share=k, shares=2) for k in range(2)]
    assert shares == [{1: "heard 16000", 4: "heard 25600"}, {3: "heard 22400", 5: "heard 28800"}]
    assert transcribe_hints(transcriber, manifest) == shares[0] | shares[1]
    with pytest.raises(ValueError, match="share: expected 0 <= share < shares=2, got 2"):
        transcribe_hints(transcriber, manifest, share=2, shares=2)
    (tmp_path / names[3]).write_bytes(b"not audio")  # line 4: share 0's
    with pytest.raises(DistillError, match=r"asr.jsonl line 4"):
        transcribe_hints(transcriber, manifest, share=0, shares=2)
    assert transcribe_hints(transcriber, manifest, share=1, shares=2) == shares[1]
