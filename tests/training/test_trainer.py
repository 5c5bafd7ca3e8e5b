"""The training recipe end to end on the tiny recipe: loss falls, outputs written, bad data named."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from eardrum.adapters.checkpoint import load_pretrained
from eardrum.common.records import DataError
from eardrum.training.recipe import load_recipe
from eardrum.training.trainer import TrainingError, train

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "tiny.yaml"
DATA = ROOT / "tests" / "assets" / "tiny_data"


def tiny(tmp_path: Path, *overrides: str):
    return load_recipe(TINY, [f"output_dir={tmp_path / 'run'}", f"cache.dir={tmp_path / 'cache'}",
                              f"data.train.0.path={DATA / 'caption.jsonl'}", f"data.train.1.path={DATA / 'qa.jsonl'}",
                              f"data.eval.0.path={DATA / 'eval.jsonl'}", *overrides])


def losses(run: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tiny")
    return train(tiny(tmp)), tmp / "run"


def test_tiny_recipe_loss_falls_by_a_wide_margin(tiny_run):
    result, run = tiny_run
    values = losses(run)
    assert result["steps"] == len(values) == 120  # 24 examples / batch 4 x 20 epochs
    first, last = values[0], sum(values[-10:]) / 10
    assert first > 5.5  # log(400) at random init
    assert last < 0.25 * first, (first, last)


def test_tiny_run_writes_its_outputs(tiny_run):
    result, run = tiny_run
    for name in ("recipe.yaml", "metrics.jsonl", "loss.png", "summary.json", "final/eardrum_config.json",
                 "final/projector.safetensors", "final/llm_adapter/adapter_model.safetensors"):
        assert (run / name).is_file(), name
    assert (run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-00000100", "step-00000120"]
    assert set(result["eval"]) == {"loss", "caption_exact", "caption_bleu"}
    evals = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if "eval_loss" in x]
    assert evals and evals[-1]["step"] == 120


def test_overfit_one_clip_gives_the_exact_transcript(tmp_path):
    manifest = tmp_path / "one.jsonl"
    manifest.write_text(json.dumps({"audio": str(DATA / "clips" / "sound2_v0.wav"), "text": "two beeps"}) + "\n")
    recipe = tiny(tmp_path, f"data.train=[{{path: {manifest}}}]", "data.eval=[]", "data.batch_size=1",
                  "train.epochs=40", "train.save_every=null", "data.prompts={asr: [Transcribe.]}")
    train(recipe)
    model, processor = load_pretrained(tmp_path / "run" / "final")
    conv = [{"role": "user", "content": [{"type": "audio", "audio": str(DATA / "clips" / "sound2_v0.wav")},
                                         {"type": "text", "text": "Transcribe."}]}]
    ids = model.generate(**processor([conv], add_generation_prompt=True), max_new_tokens=6, do_sample=False,
                         pad_token_id=processor.tokenizer.pad_token_id)
    assert processor.batch_decode(ids) == ["two beeps"]


def test_bad_manifest_lines_are_all_listed_before_any_model_loads(tmp_path, monkeypatch):
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join([
        json.dumps({"audio": str(DATA / "clips" / "sound0_v0.wav"), "text": "ok"}),
        "{not json",
        json.dumps({"audio": str(tmp_path / "missing.wav"), "text": "x"}),
        json.dumps({"audio": str(DATA / "clips" / "sound0_v0.wav"), "text": "  "}),
    ]) + "\n")
    import eardrum.training.trainer as trainer

    monkeypatch.setattr(trainer, "build_audio_llm", lambda *a, **k: pytest.fail("model loaded before data check"))
    with pytest.raises(DataError) as err:
        train(tiny(tmp_path, f"data.train=[{{path: {bad}}}]"))
    text = str(err.value)
    assert "bad.jsonl line 2" in text and "bad.jsonl line 3" in text and "bad.jsonl line 4" in text
    assert "line 1" not in text.replace("line 1 ", "")


def test_skip_bad_skips_counts_and_writes_the_list(tmp_path):
    bad = tmp_path / "bad.jsonl"
    lines = [json.dumps({"audio": str(DATA / "clips" / f"sound{k}_v0.wav"), "text": "tone"}) for k in range(4)]
    bad.write_text("\n".join(lines + ["{not json"]) + "\n")
    result = train(tiny(tmp_path, f"data.train=[{{path: {bad}}}]", "data.skip_bad=true", "train.max_steps=2",
                        "data.eval=[]"))
    assert result["steps"] == 2
    listed = [json.loads(x) for x in (tmp_path / "run" / "bad_examples_train.jsonl").read_text().splitlines()]
    assert [x["where"].endswith("bad.jsonl line 5") for x in listed] == [True]


def test_non_finite_loss_stops_naming_step_and_batch(tmp_path, monkeypatch):
    import eardrum.adapters.model as model_module

    real_forward = model_module.AudioLLM.forward
    calls = {"n": 0}

    def poisoned(self, *args, **kwargs):
        out = real_forward(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 4:
            out.loss = out.loss * torch.tensor(float("nan"))
        return out

    monkeypatch.setattr(model_module.AudioLLM, "forward", poisoned)
    with pytest.raises(TrainingError, match=r"non-finite loss \(nan\) at step 4, epoch 0, batch of \['"):
        train(tiny(tmp_path, "train.save_every=2", "data.eval=[]"))
    assert (tmp_path / "run" / "checkpoints" / "step-00000002").is_dir()


@pytest.mark.parametrize("amx,avx512_bf16,want", [(True, False, "bf16"), (False, True, "bf16"), (False, False, "no")])
def test_auto_precision_is_bf16_only_on_cpus_with_fast_bfloat16(monkeypatch, amx, avx512_bf16, want):
    from eardrum.training.setup import resolve_precision

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)
    assert resolve_precision("auto") == want
    assert resolve_precision("no") == "no" and resolve_precision("fp16") == "fp16"


def test_bf16_mixed_precision_trains_on_cpu_and_saves_float32_weights(tmp_path):
    from safetensors.torch import load_file

    last_losses = []
    for precision in ("'no'", "bf16"):
        run = tmp_path / precision.strip("'")
        result = train(tiny(run, "train.max_steps=3", "train.save_every=null", f"train.mixed_precision={precision}"))
        assert result["steps"] == 3 and math.isfinite(result["eval"]["loss"])
        last_losses.append(losses(run / "run")[-1])
    full, mixed = last_losses
    # The same three steps, rounded to bfloat16: close, not equal. (The first step alone can agree to every
    # printed digit: from LoRA's zero init the logits are near uniform, and some CPUs round them alike.)
    assert 0 < abs(full - mixed) < 0.05 * full
    weights = load_file(tmp_path / "bf16" / "run" / "final" / "projector.safetensors")
    assert weights and all(w.dtype == torch.float32 for w in weights.values())


@pytest.mark.parametrize("overrides", [["train.quantization=4bit"], ["train.quantization=8bit"],
                                       ["train.gradient_checkpointing=true"]], ids=["qlora4", "qlora8", "ckpt"])
def test_qlora_and_gradient_checkpointing_recipes_run(tmp_path, overrides):
    pytest.importorskip("bitsandbytes")
    result = train(tiny(tmp_path, "train.max_steps=3", "train.save_every=null", *overrides))
    assert result["steps"] == 3 and result["eval"]["loss"] < 7
    assert (tmp_path / "run" / "final" / "llm_adapter" / "adapter_model.safetensors").is_file()


CLIP_SAMPLES = (8_001, 9_613, 11_237, 12_859)  # not whole 10 ms mel frames, so no frame count can stand in


@pytest.mark.parametrize("encoder,cache", [("tiny:whisper", False), ("tiny:wav2vec2", False),
                                           ("tiny:whisper", True), ("tiny:wav2vec2", True)],
                         ids=["whisper", "wav2vec2", "whisper-cached", "wav2vec2-cached"])
def test_audio_seconds_are_the_clip_durations_of_the_step_examples(tmp_path, encoder, cache):
    import soundfile as sf

    manifest = tmp_path / "clips.jsonl"
    lines = []
    for k, n in enumerate(CLIP_SAMPLES):
        wave = np.random.default_rng(k).uniform(-0.5, 0.5, n).astype(np.float32)
        sf.write(tmp_path / f"clip{k}.wav", wave, 16_000, subtype="FLOAT")
        lines.append(json.dumps({"audio": str(tmp_path / f"clip{k}.wav"), "text": "a tone", "task": "caption"}))
    manifest.write_text("\n".join(lines) + "\n")
    train(tiny(tmp_path, f"model.encoder={encoder}", f"cache.enabled={str(cache).lower()}",
               f"data.train=[{{path: {manifest}}}]", "data.eval=[]", "data.batch_size=2", "train.max_steps=2",
               "train.log_every=1", "train.save_every=null", "train.log_examples=true"))
    run = tmp_path / "run"
    seen = [json.loads(x) for x in (run / "examples-rank0.jsonl").read_text().splitlines()]
    expected = [sum(CLIP_SAMPLES[int(w.rsplit(" line ", 1)[1]) - 1] for w in s["examples"]) / 16_000 for s in seen]
    logged = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if "audio_seconds" in x]
    assert [s["step"] for s in seen] == [r["step"] for r in logged] == [1, 2]
    assert sorted(w for s in seen for w in s["examples"]) == [f"{manifest} line {n}" for n in (1, 2, 3, 4)]
    assert [r["audio_seconds"] for r in logged] == pytest.approx(expected, rel=1e-12, abs=0)


def _dead_pid() -> int:
    """The pid of a process that has ended."""
    import subprocess
    import sys

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_a_killed_save_leaves_no_half_final_and_its_temporaries_are_cleared_next_start(tmp_path, monkeypatch):
    from eardrum.adapters.model import AudioLLM

    dead = _dead_pid()
    run = tmp_path / "run"
    stale = [run / "checkpoints" / f".tmp-step-00000006-{dead}", run / f".tmp-final-{dead}"]
    alive = run / "checkpoints" / ".tmp-step-00000004-1"  # pid 1 runs: another process's save in progress
    for folder in (*stale, alive):
        folder.mkdir(parents=True)
        (folder / "half.bin").write_bytes(b"x")
    real = AudioLLM.save_pretrained

    def killed_midway(self, directory, processor):
        Path(directory).mkdir(parents=True, exist_ok=True)
        (Path(directory) / "eardrum_config.json").write_text("{}")
        raise KeyboardInterrupt  # as a kill would stop it

    monkeypatch.setattr(AudioLLM, "save_pretrained", killed_midway)
    with pytest.raises(KeyboardInterrupt):
        train(tiny(tmp_path, "train.max_steps=2", "train.save_every=null", "data.eval=[]"))
    assert not any(p.exists() for p in stale) and alive.exists()
    assert not (run / "final").exists()  # no final/ holding only its config
    monkeypatch.setattr(AudioLLM, "save_pretrained", real)
    train(tiny(tmp_path, "train.max_steps=2", "train.save_every=null", "data.eval=[]", "train.overwrite=true"))
    assert (run / "final" / "projector.safetensors").is_file()
    assert [p.name for p in run.iterdir() if p.name.startswith(".")] == []  # the killed save's folder is gone


def test_a_final_lost_between_renames_is_restored_from_the_old_one(tmp_path):
    from eardrum.training.state import clear_stale_temporaries

    old = tmp_path / f".old-final-{_dead_pid()}"
    old.mkdir()
    (old / "projector.safetensors").write_bytes(b"weights")
    clear_stale_temporaries(tmp_path)
    assert (tmp_path / "final" / "projector.safetensors").read_bytes() == b"weights" and not old.exists()


def test_a_fresh_run_into_an_earlier_runs_folder_is_refused_unless_overwrite(tmp_path):
    from eardrum.training.state import OutputDirError, list_checkpoints

    run = tmp_path / "run"
    train(tiny(tmp_path, "train.max_steps=3", "train.save_every=1", "train.keep_checkpoints=5", "data.eval=[]"))
    before = (run / "metrics.jsonl").read_text()
    with pytest.raises(OutputDirError, match=r"holds an earlier run \(final, summary.json, checkpoints, "
                                             r"metrics.jsonl\).*train.resume_from=latest.*train.overwrite=true"):
        train(tiny(tmp_path, "train.max_steps=1", "data.eval=[]"))
    assert (run / "metrics.jsonl").read_text() == before  # nothing of the earlier run was touched
    train(tiny(tmp_path, "train.max_steps=1", "train.save_every=1", "data.eval=[]", "train.overwrite=true"))
    assert [p.name for p in list_checkpoints(run)] == ["step-00000001"]  # the old run's step-2, step-3 are gone
    assert not (run / ".eardrum-train.lock").exists()


def test_a_second_run_into_a_locked_folder_fails_naming_the_first_and_a_dead_runs_lock_is_taken_over(tmp_path):
    import socket

    from eardrum.training.state import LOCK_NAME, OutputDirError

    run = tmp_path / "run"
    run.mkdir()
    host = socket.gethostname()
    (run / LOCK_NAME).write_text(json.dumps({"pid": 1, "host": host}))  # pid 1 runs: a live run holds it
    with pytest.raises(OutputDirError, match=f"another run \\(pid 1 on {host}\\) is training into this folder"):
        train(tiny(tmp_path, "train.max_steps=1", "data.eval=[]"))
    (run / LOCK_NAME).write_text(json.dumps({"pid": _dead_pid(), "host": host}))  # a killed run's lock
    train(tiny(tmp_path, "train.max_steps=1", "data.eval=[]"))
    assert (run / "final").is_dir() and not (run / LOCK_NAME).exists()


def test_a_hinted_run_decodes_each_training_window_once_into_the_cache_folder(tmp_path, monkeypatch):
    from eardrum.adapters.transcribe import WhisperTranscriber

    decoded: list[int] = []
    real = WhisperTranscriber._decode
    def counted(self, waves):
        decoded.append(len(waves))
        return real(self, waves)

    monkeypatch.setattr(WhisperTranscriber, "_decode", counted)
    recipe = tiny(tmp_path, "model.transcript_hint=true", "train.max_steps=2", "train.save_every=null", "data.eval=[]")
    train(recipe)
    files = list((tmp_path / "cache" / "transcripts").glob("*.jsonl"))
    assert len(files) == 1
    keys = [json.loads(line)["key"] for line in files[0].read_text().splitlines()]
    assert len(keys) == len(set(keys)) == sum(decoded) > 0  # every window decoded once, all of them kept
    config = json.loads((tmp_path / "run" / "final" / "eardrum_config.json").read_text())["config"]
    assert config["transcript_hint"] is True
    decoded.clear()
    train(tiny(tmp_path, "model.transcript_hint=true", "train.max_steps=2", "train.save_every=null", "data.eval=[]",
               "train.overwrite=true"))
    assert decoded == []  # a second run reads them from the file


def _with_a_nan_clip(tmp_path: Path) -> Path:
    """A manifest of 4 good clips and, on line 3, a float wav whose header is fine and samples are all NaN."""
    import soundfile as sf

    sf.write(tmp_path / "nan.wav", np.full(16000, np.nan, np.float32), 16000, subtype="FLOAT")
    lines = [json.dumps({"audio": str(DATA / "clips" / f"sound{k}_v0.wav"), "text": "tone"}) for k in range(4)]
    lines.insert(2, json.dumps({"audio": str(tmp_path / "nan.wav"), "text": "tone"}))
    manifest = tmp_path / "nan.jsonl"
    manifest.write_text("\n".join(lines) + "\n")
    return manifest


@pytest.mark.parametrize("cache", ["true", "false"])
def test_a_clip_bad_only_in_full_is_named_by_line_and_skip_bad_lists_it(tmp_path, cache, caplog):
    manifest = _with_a_nan_clip(tmp_path)
    common = [f"data.train=[{{path: {manifest}}}]", "data.eval=[]", f"cache.enabled={cache}", "data.batch_size=5",
              "train.max_steps=2"]
    with pytest.raises(DataError) as err:
        train(tiny(tmp_path, *common))
    assert "nan.jsonl line 3" in str(err.value) and "NaN" in str(err.value)
    assert "line 1" not in str(err.value) and "line 4" not in str(err.value)
    with caplog.at_level("WARNING"):
        result = train(tiny(tmp_path, *common, "data.skip_bad=true", "train.overwrite=true"))
    assert result["steps"] == 2
    listed = [json.loads(x) for x in (tmp_path / "run" / "bad_examples_train.jsonl").read_text().splitlines()]
    assert [x["where"].endswith("nan.jsonl line 3") for x in listed] == [True] and "NaN" in listed[0]["message"]
    assert sum("skipped bad example" in r.getMessage() and "nan.jsonl line 3" in r.getMessage()
               for r in caplog.records) == 1  # once, however many steps meet it


def test_init_from_a_checkpoint_written_before_a_config_key_existed(tmp_path):
    first = train(tiny(tmp_path, "train.max_steps=1", "data.eval=[]", "lora.enabled=false"))
    meta_file = Path(first["final"]) / "eardrum_config.json"
    meta = json.loads(meta_file.read_text())
    del meta["config"]["transcript_language"]  # as an older eardrum wrote it
    meta_file.write_text(json.dumps(meta))
    later = tiny(tmp_path, "train.max_steps=1", "data.eval=[]", f"train.init_from={first['final']}",
                 f"output_dir={tmp_path / 'second'}")
    assert train(later)["steps"] == 1  # the missing key is its default, not a different model
    changed = tiny(tmp_path, "train.max_steps=1", "data.eval=[]", f"train.init_from={first['final']}",
                   f"output_dir={tmp_path / 'third'}", "model.pad_to_30s=true")
    with pytest.raises(ValueError, match="the model section differs"):
        train(changed)
