"""The peer benchmark's bookkeeping: parameter counts, the dry run, the targets and the printed table."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from eardrum.adapters.model import labelled_positions

from .peer_flops import (
    FORMULA,
    decode_bytes_per_step,
    encoder_forward_flops,
    llm_matmul_params,
    lora_params,
    projector_matmul_params,
    train_step_flops,
)
from .peer_models import PEER_MEL_FRAMES, Models, PeerSize, answer_text, build_models, conversation, make_waves
from .peer_timing import DEVICE_PEAKS

if TYPE_CHECKING:
    from .peer import BenchSettings


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _linear_weights(module: nn.Module) -> int:
    return sum(m.weight.numel() for m in module.modules() if isinstance(m, nn.Linear))


def parameter_counts(models: Models) -> dict:
    """Totals per part, the analytic matmul counts beside the real ones, and whether the frozen weights are shared."""
    peer, ours = models.peer, models.model
    llm_actual = _linear_weights(ours.llm)
    out = {
        "peer_total": _count(peer),
        "peer_projector": _count(peer.model.multi_modal_projector),
        "eardrum_encoder": _count(ours.encoder),
        "eardrum_llm": _count(ours.llm),
        "eardrum_projector": _count(ours.projector),
        "llm_matmul_params": {"formula": llm_matmul_params(models.size), "counted": llm_actual},
        "projector_matmul_params": {
            "eardrum_stack2": {"formula": projector_matmul_params(models.size, "stack2"), "counted": None},
            "peer_linear": {"formula": projector_matmul_params(models.size, "linear"), "counted": None},
        },
    }
    out["projector_matmul_params"]["eardrum_stack2"]["counted"] = _linear_weights(ours.projector)
    out["projector_matmul_params"]["peer_linear"]["counted"] = _linear_weights(peer.model.multi_modal_projector)
    if models.device.type != "meta":  # meta tensors have no storage to compare
        peer_ptrs = {p.data_ptr() for p in peer.parameters()}
        frozen = [p for p in (*ours.encoder.parameters(), *ours.llm.parameters()) if not p.requires_grad]
        out["frozen_weights_shared"] = all(p.data_ptr() in peer_ptrs for p in frozen)
    return out


def dry_run(size: PeerSize, settings: BenchSettings) -> dict:
    """Build both models on the meta device in bfloat16 (no memory, no compute) and report what a run would do."""
    from . import peer_train

    models = build_models(size, torch.device("meta"), torch.bfloat16, settings.seed)
    params = [*models.peer.parameters(), *models.model.parameters()]
    counts = parameter_counts(models)
    peer_train.prepare(models, settings.lora_r)
    lora_counted = sum(p.numel() for n, p in models.model.llm.named_parameters() if "lora_" in n)
    counts["lora_params"] = {"formula": lora_params(size, settings.lora_r), "counted": lora_counted}
    counts["trainable"] = peer_train.trainable_counts(models)
    answer = answer_text(models.processor, settings.answer_tokens)
    waves = make_waves(settings.train_batch, settings.train_seconds, 0)
    batch = models.processor([conversation(w, answer) for w in waves], featurize=False)
    seq = int(batch["input_ids"].shape[1])
    audio = int((batch["input_ids"] == models.model.placeholder_id).sum())
    frames = models.model.encoder.num_frames(int(settings.train_seconds * 16000))
    head_rows = settings.train_batch * int(labelled_positions(batch["labels"]).numel())
    common = dict(batch=settings.train_batch, seq=seq, audio_tokens=audio, r=settings.lora_r, head_rows=head_rows)
    flops = {
        "peer_executed": train_step_flops(size, projector="linear", encoder_frames=PEER_MEL_FRAMES // 2,
                                          **dict(common, head_rows=None)),
        "eardrum": train_step_flops(size, projector="stack2", encoder_frames=frames, **common),
        "eardrum_cached": train_step_flops(size, projector="stack2", encoder_frames=None, **common),
    }
    decode = {  # bfloat16 weights and cache, 300 tokens of context
        name: {f"batch_{b}": b * bandwidth / decode_bytes_per_step(size, b, 300, 2) for b in (1, 16)}
        for name, _, bandwidth in DEVICE_PEAKS
    }
    return {
        "size": size.to_dict(),
        "built_on": "meta",
        "parameter_dtypes": sorted({str(p.dtype) for p in params}),
        "parameters": counts,
        "training_step": {
            "sequence_tokens": seq,
            "audio_tokens": audio,
            "encoder_frames_per_clip": frames,
            "flops": flops,
            # the examples/s ratios if both models ran at the same FLOP/s
            "flops_bound_ratios": {
                f"{k}_over_peer": flops["peer_executed"] / flops[k] for k in ("eardrum", "eardrum_cached")
            },
            "encoder_forward_flops_per_clip": {
                "30s": encoder_forward_flops(size, 1500),
                "clip": encoder_forward_flops(size, frames),
            },
        },
        "decode_bandwidth_limit_tokens_per_s": decode,
        "flop_formulas": FORMULA,
    }


def _target(value: float | None, op: str, threshold: float, applies: bool, what: str) -> dict:
    met = None
    if applies and value is not None:
        met = value >= threshold if op == ">=" else value <= threshold
    return {"what": what, "value": value, "target": f"{op} {threshold:g}", "met": met, "applies_here": applies}


def checks_passed(node) -> list[bool]:
    """Every `passed` verdict (True/False, not None) in a nested report."""
    if isinstance(node, dict):
        found = [node["passed"]] if isinstance(node.get("passed"), bool) else []
        return found + [v for k, child in node.items() if k != "passed" for v in checks_passed(child)]
    if isinstance(node, list):
        return [v for child in node for v in checks_passed(child)]
    return []


def targets(report: dict) -> dict:
    """The issue's targets, each with its value from this run and whether it is met (None: not measurable here)."""
    gpu = report["device"]["type"] == "cuda"
    enc10 = next((r["ratio"] for r in report["encoder"]["rows"] if r["clip_seconds"] == 10.0), None)
    train = report["training"]["ratios"]
    rows = {r["batch"]: r for r in report["generation"]["rows"]}
    out = {
        "encoder_10s": _target(
            enc10, ">=", 3.0 if gpu else 1.5, True, "audio s/s ratio, 10 s clips (CPU: 'a clear gain' = 1.5)"
        ),
        "train_no_cache": _target(train.get("examples_per_s_eardrum_over_peer"), ">=", 1.5, True, "examples/s ratio"),
        "train_cache": _target(
            train.get("examples_per_s_eardrum_cached_over_peer"), ">=", 3.0, True, "examples/s ratio"
        ),
        "train_memory_no_cache": _target(
            train.get("peak_memory_gib_eardrum_over_peer"), "<=", 1.0, gpu, "peak memory ratio"
        ),
        "train_memory_cache": _target(
            train.get("peak_memory_gib_eardrum_cached_over_peer"), "<=", 1.0, gpu, "peak memory ratio"
        ),
        "train_mfu": _target(report["training"]["eardrum"]["mfu"], ">=", 0.40, gpu, "eardrum MFU (no cache)"),
    }
    lengths = report["training"].get("realistic_lengths")
    if lengths:
        out["train_realistic_lengths"] = _target(lengths["ratios"]["examples_per_s_eardrum_over_peer"], ">=",
                                                 2.5 if gpu else 3.0, True, "examples/s ratio, drawn lengths, packed")
        out["train_realistic_useful_tokens"] = _target(lengths["useful_token_fraction"]["eardrum_packed"], ">=", 0.9,
                                                       True, "useful-token fraction, packed")
        out["train_realistic_memory"] = _target(lengths["ratios"].get("peak_memory_eardrum_over_peer"), "<=", 1.0,
                                                gpu, "peak memory ratio, drawn lengths")
    for batch, row in rows.items():
        out[f"ttft_batch_{batch}"] = _target(
            row["ratios"]["ttft_s_eardrum_over_peer"], "<=", 1.0, True, "TTFT ratio (time)"
        )
        fast = row["ratios"].get("decode_tokens_per_s_eardrum_fast_over_peer")
        if batch == 1 and fast is not None:
            out["fast_decode_batch_1"] = _target(fast, ">=", 3.0, gpu, "fast path decode tokens/s ratio")
    checks = checks_passed({k: report[k] for k in ("encoder", "generation", "training", "fp32_checks") if k in report})
    out["correctness"] = {"what": "every check passed", "value": f"{sum(checks)}/{len(checks)}", "met": all(checks)}
    return out


def _line(label: str, ours: float, peer: float, scale: float = 1.0, fmt: str = "12.2f") -> None:
    print(f"{label:46} {ours * scale:{fmt}} {peer * scale:{fmt}} {ours / peer:8.2f}")


def print_table(report: dict) -> None:
    """A compact summary: one line per measurement, eardrum / peer / ratio, then the targets."""
    size, device = report["size"]["name"], report["device"]["name"]
    print(f"\npeer benchmark: {size} on {device} ({report['dtype']}, {report['threads']} threads)")
    print(f"{'measurement':46} {'eardrum':>12} {'peer':>12} {'ratio':>8}")
    for r in report["encoder"]["rows"]:
        label = f"encoder audio s/s, {r['clip_seconds']:g} s clips x{r['batch']}"
        _line(label, r["eardrum"]["audio_seconds_per_s"], r["peer"]["audio_seconds_per_s"], fmt="12.1f")
    t = report["training"]
    for name in ("eardrum", "eardrum_cached"):
        _line(f"train examples/s, {name}", t[name]["examples_per_s"], t["peer"]["examples_per_s"])
        if t[name]["peak_memory_gib"] is not None:
            _line(f"train peak GiB, {name}", t[name]["peak_memory_gib"], t["peer"]["peak_memory_gib"])
        if t[name]["mfu"] is not None:
            _line(f"train MFU %, {name}", t[name]["mfu"], t["peer"]["mfu"], scale=100.0, fmt="12.1f")
    lengths = t.get("realistic_lengths")
    if lengths:
        _line("train examples/s, drawn lengths, packed", lengths["eardrum_packed"]["examples_per_s"],
              lengths["peer"]["examples_per_s"])
    for row in report["generation"]["rows"]:
        for name in [n for n in ("eardrum", "eardrum_fast") if n in row]:
            ours, peer = row[name], row["peer"]
            _line(f"TTFT ms, batch {row['batch']}, {name}", ours["ttft_s"], peer["ttft_s"], 1000.0, "12.1f")
            label = f"decode tok/s, batch {row['batch']}, {name}"
            _line(label, ours["decode_tokens_per_s"], peer["decode_tokens_per_s"], fmt="12.1f")
    print("\ntargets:")
    for name, t in report["targets"].items():
        value = t["value"] if isinstance(t["value"], str) else "n/a" if t["value"] is None else f"{t['value']:.3g}"
        print(f"  {name:24} {value:>10} {t.get('target', ''):>8}  met: {t['met']}")
