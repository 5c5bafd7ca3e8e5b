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


def test_precision_step_benchmark_reports_every_variant(tmp_path):
    import torch

    from eardrum.adapters.checkpoint import build_audio_llm
    from eardrum.adapters.config import AudioLLMConfig

    torch.manual_seed(0)
    model, processor = build_audio_llm(AudioLLMConfig(encoder="tiny:whisper", llm="tiny:llama"))
    model.save_pretrained(tmp_path / "model", processor)
    out = tmp_path / "out.json"
    manifest = BENCH.parent / "tests" / "assets" / "tiny_data" / "qa.jsonl"
    subprocess.run(
        [sys.executable, str(BENCH / "precision_step.py"), str(tmp_path / "model"), str(manifest), "--lora",
         "--repeats", "1", "--threads", "1", "--batch", "2", "--out", str(out)],
        check=True, capture_output=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    result = json.loads(out.read_text())
    variants = {"fp32_full_logits", "fp32_labelled_logits", "bf16_labelled_logits"}
    assert set(result["seconds_per_step_median"]) == variants
    loss = result["loss"]
    assert abs(loss["fp32_labelled_logits"] - loss["fp32_full_logits"]) < 1e-4 * loss["fp32_full_logits"]


def test_count_probe_trains_a_probe_per_stack_and_reports_held_out_accuracy(tmp_path):
    import torch

    from eardrum.adapters.checkpoint import build_audio_llm
    from eardrum.adapters.config import AudioLLMConfig

    torch.manual_seed(0)
    model, processor = build_audio_llm(AudioLLMConfig(encoder="tiny:whisper", llm="tiny:llama"))
    model.save_pretrained(tmp_path / "model", processor)
    out = tmp_path / "probe.json"
    subprocess.run(
        [sys.executable, str(BENCH / "count_probe.py"), str(tmp_path / "model"), "--clips", "24", "--held-out", "8",
         "--epochs", "2", "--stacks", "1,4", "--out", str(out)],
        check=True, capture_output=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    probes = json.loads(out.read_text())["probes"]
    assert set(probes) == {"stack_1", "stack_4"}
    for probe in probes.values():
        assert len(probe["held_out_accuracy_by_epoch"]) == 2
        # 8 held-out clips: every accuracy is a multiple of 1/8
        assert all(abs(a * 8 - round(a * 8)) < 1e-6 for a in probe["held_out_accuracy_by_epoch"])


def test_server_soak_reports_every_kind_of_client_and_the_servers_resources(tmp_path):
    out = tmp_path / "soak.json"
    subprocess.run([sys.executable, "-m", "benchmarks.server_soak", "--seconds", "2", "--warm-up", "1", "--rounds",
                    "2", "--out", str(out)], check=True, capture_output=True, timeout=600, cwd=BENCH.parent,
                   env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    report = json.loads(out.read_text())
    assert {"normal", "streaming", "longest", "oversized_body", "oversized_prompt", "disconnecting"} <= set(
        report["kinds"])
    assert report["normal_failures"] == 0 and report["normal_latency_ms"]["count"] > 0
    assert all(row["as_expected"] == row["sent"] for row in report["kinds"].values()), report["surprises"]
    assert report["server_after"]["open_fds"] <= report["server_before"]["open_fds"] + 2
    assert len(report["server_after_each_round"]) == 2 and report["server_after_each_round"][-1] == report[
        "server_after"]
    assert report["exit_code_on_sigterm"] == 0 and set(report["targets"]) >= {"log under 1 MB", "p99 < 10x p50"}


def test_serve_batching_runs_both_modes_on_the_same_requests_with_the_same_answers(tmp_path):
    out = tmp_path / "batching.json"
    subprocess.run([sys.executable, "-m", "benchmarks.serve_batching", "--requests", "6", "--clients", "3",
                    "--max-batch", "2", "--repeats", "1", "--out", str(out)], check=True, capture_output=True,
                   timeout=600, cwd=BENCH.parent, env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    report = json.loads(out.read_text())
    assert report["same_answers_in_both_modes"] and set(report["median"]) == {"continuous", "static"}
    assert report["workload"]["clients"] == 3 and report["workload"]["completion_tokens"] > 6
    assert all(len(runs) == 1 and runs[0]["completion_tokens"] == report["workload"]["completion_tokens"]
               for runs in report["runs"].values())
    assert set(report["ratio_continuous_over_static"]) == {"tokens_per_s", "latency_p50", "latency_p99"}


def test_compile_step_benchmark_times_both_variants_on_the_same_batches(tmp_path, monkeypatch):
    import importlib

    import torch

    from eardrum.adapters.checkpoint import build_audio_llm
    from eardrum.adapters.config import AudioLLMConfig
    from eardrum.training import compiling

    torch.manual_seed(0)
    model, processor = build_audio_llm(AudioLLMConfig(encoder="tiny:whisper", llm="tiny:llama"))
    model.save_pretrained(tmp_path / "model", processor)
    out = tmp_path / "out.json"
    manifest = BENCH.parent / "tests" / "assets" / "tiny_data" / "qa.jsonl"
    monkeypatch.setattr(compiling, "BACKEND", "eager")  # tracing only: inductor's code generation takes a minute
    monkeypatch.setattr(sys, "argv", ["compile_step", str(tmp_path / "model"), str(manifest), "--lora", "--batch",
                                      "2", "--batches", "2", "--repeats", "1", "--out", str(out)])
    torch._dynamo.reset()
    importlib.import_module("benchmarks.compile_step").main()
    report = json.loads(out.read_text())
    assert len(report["batch_shapes"]) == 2 and report["batch_shapes"][0] != report["batch_shapes"][1]
    assert set(report["all_seconds"]) == {"plain", "shared_prefix", "compiled", "compiled_shared_prefix"}
    assert {len(t) for t in report["all_seconds"].values()} == {2}
    assert report["max_loss_difference"] < 1e-5 and report["speedup_compiled_over_plain"] > 0
    assert len(report["shared_prefix_tokens"]) == 2 and set(report["speedup_over_plain"]) == {
        "shared_prefix", "compiled", "compiled_shared_prefix"}


def test_no_speech_gate_timing_decodes_every_window_once_and_the_gated_none_it_calls_speechless(tmp_path,
                                                                                                monkeypatch):
    import torch

    sys.path.insert(0, str(BENCH.parent))
    from benchmarks.no_speech_gate import decode_seconds
    from conftest import build_tokenizer, tiny_whisper, whisper_feature_extractor
    from eardrum.adapters.transcribe import WhisperTranscriber

    clips = Path(__file__).resolve().parent / "assets" / "tiny_data" / "clips"
    for name in ("caption_train", "asr_train"):
        rows = [{"audio": str(clips / f"sound{k}_v0.wav"), "text": "two beeps"} for k in range(3)]
        rows.append({"audio": str(clips / "sound0_v1.wav"), "text": "no speech", "transcript": ""})  # never decoded
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    whisper, tokenizer = tiny_whisper(), build_tokenizer("chatml")
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|nocaptions|>"]})
    base = WhisperTranscriber(whisper, whisper_feature_extractor(), tokenizer, max_new_tokens=2)
    monkeypatch.setattr(WhisperTranscriber, "no_speech_probability", lambda self, encoded: torch.ones(
        len(encoded.last_hidden_state)))  # every window sounds speechless to the gate
    decoded = []
    real = whisper.generate
    monkeypatch.setattr(whisper, "generate", lambda *a, **k: decoded.append(1) or real(*a, **k))
    report = decode_seconds(base, tmp_path, 0.6, clips=2, repeats=2)
    for name in ("training sounds", "training sentences"):
        assert report[name]["clips"] == 2
        assert set(report[name]["seconds"]) == {"every window decoded", "no-speech gate 0.6"}
    assert len(decoded) == 2 * 2  # two sets x two rounds, one batch each, all from the ungated transcriber


def test_hint_filter_benchmark_refuses_a_setting_without_a_process(capsys):
    sys.path.insert(0, str(BENCH.parent))
    from benchmarks.hint_filter import main

    with pytest.raises(SystemExit):
        main(["--processes", "2", "0"])
    assert "--processes: every value must be at least 1, got [2, 0]" in capsys.readouterr().err
