"""Evaluation: metrics from answers we control equal hand-computed values; parity; the command line."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from eardrum.adapters.checkpoint import build_audio_llm
from eardrum.adapters.config import AudioLLMConfig
from eardrum.adapters.projectors import ProjectorConfig
from eardrum.adapters.tiny import save_tiny_bases, write_tiny_dataset
from eardrum.cli.main import main
from eardrum.common.metrics import cider
from eardrum.inference import generate
from eardrum.inference.evaluation import evaluate_manifest, format_table

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A tiny random checkpoint on disk, and the loaded pair (whose answers the tests replace)."""
    root = tmp_path_factory.mktemp("evaluation")
    bases = save_tiny_bases(root / "bases")
    torch.manual_seed(0)
    config = AudioLLMConfig(encoder=bases["whisper"], llm=bases["llama"], projector=ProjectorConfig(name="stack"))
    model, processor = build_audio_llm(config)
    write_tiny_dataset(root / "data", variants=1)
    return model.save_pretrained(root / "checkpoint", processor), (model, processor), root / "data"


@pytest.fixture
def answers(monkeypatch):
    """Replace the model's answers: keyed by the clip's file name, or by the text where the audio was."""
    table: dict[str, str] = {}

    def fake(model, processor, conversations, settings):
        keys = []
        for conversation in conversations:
            first = conversation[0]["content"][0]
            keys.append(os.path.basename(first["audio"]) if first["type"] == "audio" else first["text"])
        return [table[k] for k in keys]

    monkeypatch.setattr(generate, "answer_conversations", fake)
    return table


def write_manifest(path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def per_example(out_dir) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "per_example.jsonl").read_text().splitlines()]


def test_asr_wer_and_cer_equal_hand_counts(built, answers, tmp_path):
    _, pair, data = built
    manifest = write_manifest(
        data / "asr.jsonl",
        [
            {"audio": "clips/sound0_v0.wav", "text": "the cat sat"},
            {"audio": "clips/missing.wav", "text": "never heard"},
            {"audio": "clips/sound1_v0.wav", "text": "Hello world"},
        ],
    )
    answers.update({"sound0_v0.wav": "the cat sat down", "sound1_v0.wav": "hello, WORLD!"})
    summary = evaluate_manifest(pair, manifest, "asr", out_dir=tmp_path, progress=False)
    # 1 inserted word over 3 + 2 reference words; " down" is 5 inserted characters over 11 + 11
    assert summary["metrics"] == {"wer": 1 / 5, "wer_whisper_norm": 1 / 5, "cer": 5 / 22}
    assert "Whisper's English normaliser" in summary["metric_notes"]["wer_whisper_norm"]
    assert (summary["lines"], summary["scored"], summary["errors"]) == (3, 2, 1)
    rows = per_example(tmp_path)
    assert [r["line"] for r in rows] == [1, 2, 3]
    assert rows[0]["scores"] == {"wer": 1 / 3, "wer_whisper_norm": 1 / 3, "cer": 5 / 11}
    assert rows[0]["hypothesis"] == "the cat sat down"
    assert rows[0]["reference"] == "the cat sat" and "missing.wav" in rows[1]["error"]
    assert rows[2]["scores"] == {"wer": 0.0, "wer_whisper_norm": 0.0, "cer": 0.0}
    assert json.loads((tmp_path / "summary.json").read_text())["metrics"] == summary["metrics"]


def test_qa_exact_and_contains_accuracy(built, answers):
    _, pair, data = built
    rows = [
        {"audio": f"clips/sound{k}_v0.wav", "question": "q?", "answer": a}
        for k, a in enumerate(["one", "two", "three", "4"])
    ]
    answers.update(
        {"sound0_v0.wav": "One.", "sound1_v0.wav": "it is two", "sound2_v0.wav": "four", "sound3_v0.wav": "4"}
    )
    summary = evaluate_manifest(pair, write_manifest(data / "qa_eval.jsonl", rows), "qa", progress=False)
    assert summary["metrics"] == {"exact_match": 2 / 4, "contains_answer": 3 / 4}


def test_caption_bleu4_exact_match_and_cider(built, answers, tmp_path):
    _, pair, data = built
    refs = ["a low tone here", "two short beeps now"]
    rows = [{"audio": f"clips/sound{k}_v0.wav", "text": t, "task": "caption"} for k, t in enumerate(refs)]
    hyps = ["A low tone here", "two short beeps then"]
    answers.update({"sound0_v0.wav": hyps[0], "sound1_v0.wav": hyps[1]})
    summary = evaluate_manifest(
        pair, write_manifest(data / "cap.jsonl", rows), "caption", out_dir=tmp_path, progress=False
    )
    # clipped n-gram matches over candidate n-grams, n = 1..4: 7/8, 5/6, 3/4, 1/2; lengths equal, so no brevity penalty
    assert summary["metrics"]["bleu4"] == pytest.approx((7 / 8 * 5 / 6 * 3 / 4 * 1 / 2) ** 0.25, abs=1e-12)
    assert summary["metrics"]["exact_match"] == 0.5
    assert summary["metrics"]["cider_d"] == cider(hyps, refs) and summary["metrics"]["cider_d"] > 0
    # sacrebleu keeps case ("A" misses "a"): 6/8, 4/6, 2/4 and no 4-gram, which its exp smoothing counts as 1/4
    assert summary["metrics"]["bleu4_sacrebleu"] == pytest.approx((6 / 8 * 4 / 6 * 2 / 4 * 1 / 4) ** 0.25, abs=1e-9)
    note = summary["metric_notes"]["bleu4_sacrebleu"]
    assert "tok:13a" in note and "smooth:exp" in note and "nrefs" not in note
    assert per_example(tmp_path)[0]["scores"] == {"bleu4": 1.0, "exact_match": 1.0}


def test_parity_reports_both_accuracies_and_the_gap(built, answers, tmp_path):
    _, pair, data = built
    words = ["one", "two", "three", "four"]
    rows = [
        {"audio": f"clips/sound{k}_v0.wav", "question": "which number?", "answer": w, "transcript": f"say {w}"}
        for k, w in enumerate(words)
    ]
    answers.update({f"sound{k}_v0.wav": a for k, a in enumerate(["one", "no idea", "3", "it was four"])})
    answers.update({f"say {w}": a for w, a in zip(words, ["one", "two", "three", "five"])})
    summary = evaluate_manifest(
        pair, write_manifest(data / "par.jsonl", rows), "qa", out_dir=tmp_path, parity=True, progress=False
    )
    parity = summary["parity"]
    assert parity["audio"] == {"exact_match": 1 / 4, "contains_answer": 2 / 4} == summary["metrics"]
    assert parity["text"] == {"exact_match": 3 / 4, "contains_answer": 3 / 4}
    assert parity["gap"] == {"exact_match": 2 / 4, "contains_answer": 1 / 4}
    first = per_example(tmp_path)[0]
    assert (first["hypothesis"], first["hypothesis_text"], first["transcript"]) == ("one", "one", "say one")
    assert first["scores_text"] == {"exact_match": 1.0, "contains_answer": 1.0}
    table = format_table(summary).splitlines()
    assert table[2].split() == ["exact_match", "0.2500", "0.7500", "+0.5000"]


def test_text_only_scores_the_transcripts_alone(built, answers, tmp_path):
    _, pair, data = built
    rows = [
        {"audio": f"clips/sound{k}_v0.wav", "question": "which number?", "answer": w, "transcript": f"say {w}"}
        for k, w in enumerate(["one", "two"])
    ]
    answers.update({"sound0_v0.wav": "one", "sound1_v0.wav": "two"})  # the audio would score 2/2
    answers.update({"say one": "one", "say two": "no idea"})
    summary = evaluate_manifest(
        pair, write_manifest(data / "text.jsonl", rows), "qa", out_dir=tmp_path, text_only=True, progress=False
    )
    assert summary["mode"] == "text" and "parity" not in summary
    assert summary["metrics"] == {"exact_match": 1 / 2, "contains_answer": 1 / 2}
    first = per_example(tmp_path)[0]
    assert first["hypothesis_text"] == "one" and "hypothesis" not in first
    assert format_table(summary).splitlines()[1].split() == ["metric", "score", "(text)"]
    with pytest.raises(ValueError, match="parity and text_only: expected at most one"):
        evaluate_manifest(pair, data / "text.jsonl", "qa", parity=True, text_only=True, progress=False)


def test_parity_without_a_transcript_names_the_line(built, tmp_path):
    _, pair, data = built
    rows = [{"audio": "clips/sound0_v0.wav", "question": "q", "answer": "a", "transcript": "t"}] * 2
    rows.insert(1, {"audio": "clips/sound0_v0.wav", "question": "q", "answer": "a"})
    manifest = write_manifest(data / "no_transcript.jsonl", rows)
    with pytest.raises(ValueError, match=r"no_transcript.jsonl line 2 has none$"):
        evaluate_manifest(pair, manifest, "qa", parity=True, progress=False)


def test_unknown_task_is_refused(built):
    with pytest.raises(ValueError, match="task: expected one of asr, qa, caption, got 'chat'"):
        evaluate_manifest(built[1], "unused.jsonl", "chat")


def run_cli(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "eardrum.cli", *args]
    return subprocess.run(command, capture_output=True, text=True, env=ENV, timeout=300)


def test_cli_eval_writes_results_and_prints_the_table(built, tmp_path):
    checkpoint, _, data = built
    rows = [{"audio": "clips/sound0_v0.wav", "question": "q", "answer": "a", "transcript": "t"}] * 2
    manifest = write_manifest(data / "cli.jsonl", rows)
    result = run_cli(
        "eval",
        "--model",
        str(checkpoint),
        "--manifest",
        manifest,
        "--task",
        "qa",
        "--parity",
        "--out",
        str(tmp_path / "ev"),
        "--max-new-tokens",
        "3",
        "--no-progress",
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[1].split() == ["metric", "audio", "text", "gap", "(text", "-", "audio)"]
    summary = json.loads((tmp_path / "ev" / "summary.json").read_text())
    assert summary["scored"] == 2 and set(summary["parity"]) == {"audio", "text", "gap"}
    assert len(per_example(tmp_path / "ev")) == 2


def test_cli_user_error_is_one_line_and_exit_code_2(built):
    checkpoint, _, data = built
    manifest = write_manifest(
        data / "no_transcript.jsonl", [{"audio": "clips/sound0_v0.wav", "question": "q", "answer": "a"}]
    )
    result = run_cli("eval", "--model", str(checkpoint), "--manifest", manifest, "--task", "qa", "--parity")
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "no_transcript.jsonl line 1" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (
            ["generate", "--model", "{checkpoint}", "--out", "{tmp}/o.jsonl", "--batch-size", "0"],
            2,
            "batch_size: expected",
        ),
        (
            ["eval", "--model", "{tmp}", "--task", "qa", "--manifest", "{data}/qa.jsonl"],
            2,
            "eardrum_config.json is missing",
        ),
        (["generate", "--model", "{checkpoint}", "--out", "{tmp}/o.jsonl", "--task", "qa"], 2,
         "was answered (2 lines, 2 errors, none of task qa)"),
    ],
)
def test_cli_handlers_exit_codes_and_messages(built, tmp_path, capsys, args, code, message):
    checkpoint, _, data = built
    manifest = write_manifest(data / "bad_lines.jsonl", [{"audio": "clips/gone.wav", "question": "q"}, {"text": "?"}])
    args = [a.format(checkpoint=checkpoint, tmp=tmp_path, data=data) for a in args]
    assert main([*args, *([] if "--manifest" in args else ["--manifest", manifest]), "--no-progress"]) == code
    out, err = capsys.readouterr()
    assert message in (out if code == 0 else err)
    assert code == 0 or err.strip().count("\n") == 0
