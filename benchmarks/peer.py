"""Performance against the peer: eardrum and transformers' Qwen2-Audio side by side, in one process.

    python -m benchmarks.peer --device cpu --size small     # every code path, a few minutes on 2 cores
    python -m benchmarks.peer --device cuda --size 7b       # one H100/H200, well inside ten minutes
    python -m benchmarks.peer --size 7b --dry-run           # shapes, parameter and FLOP counts (meta device)

The peer is `Qwen2AudioForConditionalGeneration` (Whisper-shaped encoder always run on 30 s,
pooling by 2, one Linear, Qwen2 LLM); eardrum gets an encoder of the same geometry, the same
LLM (the frozen weights are shared tensors) and its `stack` projector with k = 2 (25 tokens/s,
as the peer). Random weights, float32 on CPU, bfloat16 + SDPA on CUDA; both built directly on
the device (benchmarks/peer_models.py). Sections, each with a correctness check beside it:
    encoder     real-audio seconds per second, 5/10/30 s clips, batch 16   (peer_encoder.py)
    generation  TTFT and decode tokens/s, batch 1 and 16, default and fast  (peer_generate.py)
    training    LoRA step: examples/s, audio-hours per device-hour, peak memory, MFU (peer_train.py);
                one pass over examples of realistic, drawn lengths, eardrum packed (peer_lengths.py)
The contenders alternate within each measurement, after warm-ups; medians are reported. The
JSON (default benchmarks/results/peer-<device>-<size>.json) holds the device, versions,
settings, every measurement, ratios eardrum/peer, the checks, the FLOP formulas and the targets.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers

from . import peer_encoder, peer_generate, peer_lengths, peer_train
from .peer_flops import FORMULA
from .peer_models import SIZES, Models, build_models
from .peer_report import dry_run, parameter_counts, print_table, targets
from .peer_timing import device_facts

RESULTS = Path(__file__).resolve().parent / "results"
NOTES = [
    "Frozen encoder and LLM weights are one set of tensors viewed by both models; projectors, LoRA adapters "
    "and optimizer states are each model's own.",
    "Peak memory (CUDA only) is torch.cuda.max_memory_allocated over a model's training step, less the bytes "
    "only the other model holds (its trainable weights and optimizer state): the peak it would reach alone. "
    "On CPU memory is not measured (null).",
    "Timed calls start from inputs already on the device: log-mel is computed outside the timing for both "
    "models (each with its own pipeline: eardrum at the clip's length, the peer padded to 30 s). eardrum's "
    "cached training step includes reading the frames from the on-disk cache and copying them to the device.",
    "Audio token counts agree for clips with an even number of encoder frames (all clips here); for an odd "
    "number eardrum's stack keeps the last frame (ceil(T/2)) where the peer's pooling drops it (floor(T/2)).",
    "In bfloat16 the peer computes its loss with nn.CrossEntropyLoss on bfloat16 logits, eardrum's Qwen2ForCausalLM "
    "upcasts the logits to float32 first: with identical logits the two losses still differ by bfloat16 rounding.",
    "eardrum's timed training steps run as its trainer runs them (labelled_logits_only): the LM head and the "
    "float32 loss only at the positions that predict a labelled token; the peer computes every position's logits. "
    "Runs before this note timed eardrum with logits at every position, upcast to float32 for the loss.",
    "Runs before this note let transformers build a KV cache in eardrum's training forward (a copy of every "
    "layer's keys and values); eardrum's forward now passes use_cache=False. The peer's forward builds one.",
    "A training step is forward, backward and AdamW (lr 1e-5, no gradient clipping), the same for both models. "
    "The LLM's share of a step is identical for both, so the examples/s ratios are bounded by the ratio of "
    "executed FLOPs (training.flops_bound_ratios) unless one model runs its FLOPs faster.",
    "eardrum_fast is AudioLLM.generate(fast=True): eardrum's own loop (eardrum.adapters.fast_decode) with a static "
    "KV cache, the host reading tokens back every 8 steps; on CUDA its step is compiled (torch.compile, CUDA "
    "graphs), so its first call per batch size compiles (first_call_s) and warm-ups absorb it; on CPU it runs "
    "uncompiled. Runs before this note decoded fast=True in transformers' generate.",
    "eardrum_compiled (with --compile) is eardrum's training step with its LLM's decoder layers compiled "
    "(train.compile: torch.compile per layer, inductor), on the same model; its first steps compile.",
    "On CPU the benchmark runs one torch thread unless --threads says otherwise (see `threads`).",
    "The encoder check compares the last encoder layer plus the final LayerNorm on valid frames: the peer "
    "pools by 2 before that norm and eardrum's projector stacks after it, so later outputs differ by design.",
]


@dataclass(frozen=True)
class BenchSettings:
    """What to run; defaults come from `default_settings` for the device."""

    device: str  # cpu | cuda
    size: str  # a key of SIZES
    threads: int  # torch CPU threads
    warmup: int  # untimed rounds before each measurement
    repeats: int  # timed rounds (encoder, training); the median is reported
    gen_repeats: int  # timed rounds for generation
    encoder_seconds: tuple[float, ...] = (5.0, 10.0, 30.0)
    encoder_batch: int = 16
    train_batch: int = 8
    train_seconds: float = 10.0
    answer_tokens: int = 100  # loss tokens per example
    length_examples: int = 64  # examples of drawn lengths per pass (peer_lengths)
    lora_r: int = 16
    gen_seconds: float = 10.0
    gen_batches: tuple[int, ...] = (1, 16)
    new_tokens: int = 64  # decoded per row, exactly
    fast: bool = True  # also time eardrum's generate(fast=True)
    compile: bool = False  # also time eardrum's training step with its decoder layers compiled (train.compile)
    fp32_checks: bool = True  # on CUDA: also run every check at the small size in float32
    seed: int = 0

    def problems(self) -> list[str]:
        out = []
        if self.device not in ("cpu", "cuda"):
            out.append(f"device: expected cpu or cuda, got {self.device!r}")
        elif self.device == "cuda" and not torch.cuda.is_available():
            out.append("device: cuda was asked for but no CUDA device is visible")
        if self.size not in SIZES:
            out.append(f"size: expected one of {', '.join(SIZES)}, got {self.size!r}")
        for name in ("threads", "repeats", "gen_repeats", "encoder_batch", "train_batch", "answer_tokens", "lora_r"):
            if getattr(self, name) < 1:
                out.append(f"{name}: expected >= 1, got {getattr(self, name)}")
        if self.warmup < 0:
            out.append(f"warmup: expected >= 0, got {self.warmup}")
        if self.new_tokens < 2:
            out.append(f"new_tokens: expected >= 2 (decode speed needs tokens after the first), got {self.new_tokens}")
        if not self.gen_batches or min(self.gen_batches) < 1:
            out.append(f"gen_batches: expected positive batch sizes, got {self.gen_batches}")
        if any(not 0 < s <= 30 for s in (*self.encoder_seconds, self.train_seconds, self.gen_seconds)):
            out.append("clip lengths: expected seconds in (0, 30], the peer's window")
        return out


def default_settings(device: str, size: str, quick: bool = False) -> BenchSettings:
    cuda = device == "cuda"
    return BenchSettings(
        device=device,
        size=size,
        # CPU: one thread. On a shared machine a multi-threaded op waits for its slowest thread, and a
        # descheduled thread made decode speeds of one model vary 20-fold between runs; one thread is steady.
        threads=torch.get_num_threads() if cuda else 1,
        warmup=2 if cuda else (0 if quick else 1),
        repeats=1 if quick else (5 if cuda else 3),
        gen_repeats=1 if quick else 3,
        new_tokens=64 if cuda else 16,
        length_examples=256 if cuda else (8 if quick else 24),
    )


def versions() -> dict:
    import peft

    from eardrum.adapters import __version__

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "eardrum": __version__,
    }


def run_checks_only(size: str, device: torch.device, dtype: torch.dtype, settings: BenchSettings) -> dict:
    """Every correctness check, no timing: on CUDA, the small size in float32 beside the bfloat16 main run."""
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # true float32 convs, matmuls
    try:
        models = build_models(SIZES[size], device, dtype, settings.seed)
        out = {"size": size, "dtype": str(dtype), "tf32": False}
        out["encoder"] = peer_encoder.check(models, list(settings.encoder_seconds), settings.seed)
        out["generation"] = peer_generate.check(models, settings.gen_seconds, 8, settings.fast, settings.seed)
        out["training"] = peer_train.check(models, peer_train.prepare(models, settings.lora_r), settings.seed)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    return out


def _header(settings: BenchSettings, models: Models, facts: dict, build_seconds: float) -> dict:
    return {
        "benchmark": "peer",
        "device": {"type": models.device.type, **facts},
        "versions": versions(),
        "threads": torch.get_num_threads(),
        "size": {"name": settings.size, **SIZES[settings.size].to_dict()},
        "dtype": str(models.dtype),
        "attention": models.peer.config._attn_implementation,
        "settings": dataclasses.asdict(settings),
        "build_seconds": build_seconds,
        "parameters": parameter_counts(models),
    }


def _generation(models: Models, settings: BenchSettings, timing: dict, bandwidth: float | None) -> dict:
    s = settings
    check = peer_generate.check(models, s.gen_seconds, s.new_tokens, s.fast, s.seed)
    fast = s.fast and "error" not in check.get("eardrum_fast_vs_default", {})
    rows = peer_generate.measure(
        models, list(s.gen_batches), s.gen_seconds, s.new_tokens, fast, dict(timing, repeats=s.gen_repeats), bandwidth
    )
    return {"check": check, "rows": rows}


def _training(models: Models, settings: BenchSettings, timing: dict, peak_flops: float | None) -> dict:
    trainers = peer_train.prepare(models, settings.lora_r)
    train_settings = dict(timing, batch=settings.train_batch, seconds=settings.train_seconds)
    train_settings.update(answer_tokens=settings.answer_tokens, r=settings.lora_r, compile=settings.compile)
    return {
        "trainable_parameters": peer_train.trainable_counts(models),
        "check": peer_train.check(models, trainers, settings.seed),
        **peer_train.measure(models, trainers, train_settings, peak_flops),
        "realistic_lengths": peer_lengths.measure(models, trainers, examples=settings.length_examples,
                                                  batch=settings.train_batch, warmup=settings.warmup,
                                                  repeats=settings.repeats, seed=settings.seed),
    }


def run(settings: BenchSettings, save: Callable[[dict], None] = lambda report: None) -> dict:
    """Build both models, run the three sections with their checks; `save` gets the report after each section."""
    problems = settings.problems()
    if problems:
        raise ValueError("invalid benchmark settings:\n  - " + "\n  - ".join(problems))
    torch.set_num_threads(settings.threads)
    device = torch.device(settings.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    facts = device_facts(device)
    started = time.perf_counter()
    models = build_models(SIZES[settings.size], device, dtype, settings.seed)
    report = _header(settings, models, facts, time.perf_counter() - started)
    report.update(flop_formulas=FORMULA, notes=NOTES)
    timing = {"warmup": settings.warmup, "repeats": settings.repeats, "seed": settings.seed}
    report["encoder"] = {
        "check": peer_encoder.check(models, list(settings.encoder_seconds), settings.seed),
        "audio_tokens_other_lengths": peer_encoder.token_counts(models, [1.0, 2.5, 4.99, 7.33, 15.5]),
        "rows": peer_encoder.measure(models, list(settings.encoder_seconds), settings.encoder_batch, **timing),
    }
    _progress(report, "encoder", started, save)
    report["generation"] = _generation(models, settings, timing, facts["bandwidth_bytes_s"])
    _progress(report, "generation", started, save)
    report["training"] = _training(models, settings, timing, facts["peak_flops"])
    _progress(report, "training", started, save)
    del models
    if device.type == "cuda" and settings.fp32_checks:
        report["fp32_checks"] = run_checks_only("small", device, torch.float32, settings)
    report["targets"] = targets(report)
    report["seconds_total"] = time.perf_counter() - started
    save(report)
    return report


def _progress(report: dict, section: str, started: float, save: Callable[[dict], None]) -> None:
    report["seconds_total"] = time.perf_counter() - started
    save(report)  # a run stopped later (out of memory, out of time) still leaves what it measured
    print(f"[peer] {section} done at {report['seconds_total']:.1f} s", file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None = None) -> tuple[BenchSettings, argparse.Namespace]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--size", choices=tuple(SIZES), default="small")
    parser.add_argument("--out", help="JSON path (default: benchmarks/results/peer-<device>-<size>.json)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: 1 on CPU, torch's on CUDA)")
    parser.add_argument("--quick", action="store_true", help="one timed round, fewer warm-ups: for smoke tests")
    parser.add_argument("--no-fast", action="store_true", help="skip eardrum's generate(fast=True)")
    parser.add_argument("--compile", action="store_true",
                        help="also time eardrum's training step with its decoder layers compiled (train.compile)")
    parser.add_argument("--new-tokens", type=int, help="tokens decoded per row (default 64 on CUDA, 16 on CPU)")
    parser.add_argument("--dry-run", action="store_true", help="shapes, parameter and FLOP counts on the meta device")
    args = parser.parse_args(argv)
    settings = default_settings(args.device, args.size, args.quick)
    changes = {"fast": not args.no_fast, "compile": args.compile}
    if args.threads:
        changes["threads"] = args.threads
    if args.new_tokens:
        changes["new_tokens"] = args.new_tokens
    return dataclasses.replace(settings, **changes), args


def main(argv: list[str] | None = None) -> None:
    settings, args = parse_args(argv)
    transformers.logging.set_verbosity_error()
    if args.dry_run:
        print(json.dumps(dry_run(SIZES[settings.size], settings), indent=2))
        return
    out = Path(args.out) if args.out else RESULTS / f"peer-{settings.device}-{settings.size}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    report = run(settings, save=lambda report: out.write_text(json.dumps(report, indent=2) + "\n"))
    print_table(report)
    print(f"written to {out}")


if __name__ == "__main__":
    main()
