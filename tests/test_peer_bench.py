"""The peer benchmark (benchmarks/peer.py) at its test size, and eardrum's fast generation path.

The benchmark run is tiny and one round only: no timing is asserted, only the report's shape and
that every correctness check passes. The 7b path is checked on the meta device (no memory).
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import build_tokenizer
from eardrum.common.decoding import generate_kwargs
from eardrum.common.generation import GenerationSettings, GenerationSettingsError

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # benchmarks/ is a folder of scripts, not an installed package
peer = importlib.import_module("benchmarks.peer")
peer_checks = importlib.import_module("benchmarks.peer_checks")
peer_report = importlib.import_module("benchmarks.peer_report")
peer_models = importlib.import_module("benchmarks.peer_models")


# ---------------------------------------------------------------- the benchmark
@pytest.fixture(scope="module")
def report(tmp_path_factory):
    settings = dataclasses.replace(
        peer.default_settings("cpu", "tiny", quick=True),
        encoder_batch=2,
        train_batch=2,
        answer_tokens=10,
        gen_batches=(1, 2),
        new_tokens=3,
        length_examples=6,
    )
    saved = []
    result = peer.run(settings, save=saved.append)
    path = tmp_path_factory.mktemp("peer") / "peer.json"
    path.write_text(json.dumps(result))  # the report is plain JSON
    return {"result": json.loads(path.read_text()), "saves": len(saved)}


def test_report_names_device_versions_and_settings(report):
    r = report["result"]
    assert r["device"]["type"] == "cpu" and r["dtype"] == "torch.float32" and r["threads"] == 1
    assert {"torch", "transformers", "peft", "eardrum"} <= set(r["versions"])
    assert r["settings"]["size"] == "tiny" and r["size"]["enc_layers"] == 2
    assert r["parameters"]["frozen_weights_shared"] is True
    assert report["saves"] == 4  # after each section and at the end


def test_report_has_every_measurement_for_both_models(report):
    r = report["result"]
    assert [row["clip_seconds"] for row in r["encoder"]["rows"]] == [5.0, 10.0, 30.0]
    assert all(row["ratio"] > 0 and row["peer"]["audio_seconds_per_s"] > 0 for row in r["encoder"]["rows"])
    assert [row["batch"] for row in r["generation"]["rows"]] == [1, 2]
    for row in r["generation"]["rows"]:
        assert {"peer", "eardrum", "eardrum_fast"} <= set(row) and row["new_tokens"] == 3
    t = r["training"]
    assert t["loss_tokens_per_example"] == 10 and t["audio_tokens_per_example"] == 250
    for name in ("peer", "eardrum", "eardrum_cached"):
        assert t[name]["examples_per_s"] > 0 and t[name]["peak_memory_gib"] is None and t[name]["mfu"] is None
    assert set(t["ratios"]) == {"examples_per_s_eardrum_over_peer", "examples_per_s_eardrum_cached_over_peer"}
    lengths = t["realistic_lengths"]
    assert lengths["examples"] == 6 and lengths["distribution"]["clip_seconds"]["max"] == 30.0
    assert lengths["useful_token_fraction"]["eardrum_packed"] > lengths["useful_token_fraction"]["peer"]
    assert lengths["batches"]["peer"] == 3 and lengths["eardrum_packed"]["examples_per_s"] > 0
    assert lengths["eardrum_packed_block_mask"]["examples_per_s"] > 0
    assert lengths["ratios"]["examples_per_s_per_example_attention_over_block_mask"] > 0


def test_realistic_lengths_are_drawn_as_stated():
    drawn = importlib.import_module("benchmarks.peer_lengths").draw(2000, 0)
    seconds = np.array([s for s, _ in drawn])
    tokens = np.array([t for _, t in drawn])
    assert seconds.min() >= 1.0 and seconds.max() <= 30.0 and 6.5 < np.median(seconds) < 7.5
    assert 0.6 < np.mean((seconds >= 3) & (seconds <= 15)) and np.allclose(seconds / 0.04, np.round(seconds / 0.04))
    assert tokens.min() >= 5 and tokens.max() <= 250 and 36 <= np.median(tokens) <= 44


def test_every_correctness_check_passes(report):
    r = report["result"]
    assert r["targets"]["correctness"]["met"] is True
    assert r["targets"]["correctness"]["value"] == "7/7"  # encoder 2, generation 2, training 3
    assert r["encoder"]["check"]["same_mel"]["max_abs_diff"] < 1e-4
    assert r["training"]["check"]["eardrum_cached_vs_uncached"]["loss"]["max_abs_diff"] == 0.0
    assert r["generation"]["check"]["eardrum_fast_vs_default"]["tokens_equal"] is True


def test_token_counts_differ_only_for_odd_frame_counts(report):
    rows = {row["clip_seconds"]: row for row in report["result"]["encoder"]["audio_tokens_other_lengths"]}
    assert (rows[1.0]["eardrum"], rows[1.0]["peer"]) == (25, 25)
    assert (rows[7.33]["eardrum"], rows[7.33]["peer"]) == (184, 183)  # 733 mel -> 367 frames, odd


def test_gpu_only_targets_are_not_judged_on_cpu(report):
    targets = report["result"]["targets"]
    assert targets["train_mfu"]["met"] is None and targets["fast_decode_batch_1"]["met"] is None
    assert isinstance(targets["encoder_10s"]["met"], bool)


def test_7b_builds_on_meta_in_bf16_and_matches_the_flop_formulas():
    settings = peer.default_settings("cuda" if torch.cuda.is_available() else "cpu", "7b")
    dry = peer_report.dry_run(peer_models.SIZES["7b"], settings)
    assert dry["parameter_dtypes"] == ["torch.bfloat16"]
    counts = dry["parameters"]
    assert counts["peer_total"] == 8_285_619_200  # Whisper-large-v3 encoder + Qwen2-7B (vocab 156032) + projector
    for key in ("llm_matmul_params", "lora_params"):
        assert counts[key]["formula"] == counts[key]["counted"]
    for kind in ("eardrum_stack2", "peer_linear"):
        assert counts["projector_matmul_params"][kind]["formula"] == counts["projector_matmul_params"][kind]["counted"]
    step = dry["training_step"]
    assert (step["audio_tokens"], step["encoder_frames_per_clip"]) == (8 * 250, 500)


def test_settings_report_every_problem():
    bad = dataclasses.replace(peer.default_settings("cpu", "tiny"), repeats=0, new_tokens=1, gen_batches=())
    problems = bad.problems()
    assert any("repeats" in p for p in problems) and any("new_tokens" in p for p in problems)
    assert any("gen_batches" in p for p in problems)


def test_agreement_rule_follows_the_dtype():
    a = torch.tensor([1.0, 2.0, float("-inf")])
    assert peer_checks.agreement(a + 1e-6, a, torch.float32)["passed"] is True
    assert peer_checks.agreement(a + 1e-2, a, torch.float32)["passed"] is False
    assert peer_checks.agreement(a + 1e-2, a, torch.bfloat16)["passed"] is True
    assert peer_checks.agreement(torch.tensor([1.0, 2.0, 3.0]), a, torch.float32)["passed"] is False


def test_checks_only_mode_runs_every_check():
    settings = peer.default_settings("cpu", "tiny", quick=True)
    checks = peer.run_checks_only("tiny", torch.device("cpu"), torch.float32, settings)
    verdicts = peer_report.checks_passed(checks)
    assert len(verdicts) == 7 and all(verdicts)


# ---------------------------------------------------------------- eardrum's fast generation path
# (its loop: tests/adapters/test_fast_decode.py)
def test_generation_settings_pass_fast_on_only_when_set():
    tok = build_tokenizer("chatml")
    assert generate_kwargs(GenerationSettings(fast=True), tok)["fast"] is True
    assert "fast" not in generate_kwargs(GenerationSettings(), tok)
    with pytest.raises(GenerationSettingsError, match="fast"):
        GenerationSettings(fast="yes").validate()


def test_the_lm_head_is_counted_on_the_rows_it_runs_on():
    flops = importlib.import_module("benchmarks.peer_flops")
    size = peer_models.SIZES["7b"]
    full = flops.llm_train_flops(size, 8, 380, 16)
    assert flops.llm_train_flops(size, 8, 380, 16, head_rows=8 * 380) == full
    assert full - flops.llm_train_flops(size, 8, 380, 16, head_rows=8 * 101) == 4 * 8 * (380 - 101) * (
        size.vocab * size.llm_hidden)


def test_the_compile_switch_times_eardrums_step_with_compiled_layers_beside_the_plain_one(monkeypatch):
    from eardrum.training import compiling

    peer_train = importlib.import_module("benchmarks.peer_train")
    assert peer.parse_args(["--compile"])[0].compile is True and peer.parse_args([])[0].compile is False
    monkeypatch.setattr(compiling, "BACKEND", "eager")  # tracing only: inductor's code generation takes a minute
    torch._dynamo.reset()
    models = peer_models.build_models(peer_models.SIZES["tiny"], torch.device("cpu"), torch.float32, 0)
    trainers = peer_train.prepare(models, 4)
    settings = dict(batch=2, seconds=2.0, answer_tokens=6, r=4, warmup=1, repeats=1, seed=0, compile=True)
    t = peer_train.measure(models, trainers, settings, None)
    assert {"peer", "eardrum", "eardrum_cached", "eardrum_compiled"} <= set(t)
    assert t["eardrum_compiled"]["model_flops_per_step"] == t["eardrum"]["model_flops_per_step"]
    assert "examples_per_s_eardrum_compiled_over_peer" in t["ratios"]
    layers = compiling.decoder_layers(models.model.llm)
    assert all(layer._compiled_call_impl is not None for layer in layers)  # compiled, and left so after the plain
