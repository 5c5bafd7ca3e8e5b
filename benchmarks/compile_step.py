"""A training step with the LLM's decoder layers compiled (`train.compile`) and with the batch's shared prefix run
once (`train.share_prefix`), each against the plain step.

Loads a saved model (for the demo's numbers: a stage-1 checkpoint of `eardrum demo`, real SmolLM2-135M),
optionally adds LoRA, freezes what the trainer freezes, collates several batches of a manifest (their lengths
differ, as a run's do) and times forward + backward with labelled-only logits in four variants on the same
model, in one process: plain, shared prefix, compiled, compiled with the shared prefix. Every batch runs once in
each variant before the timing (the compiled layers compile there: the time is reported), then rounds alternate
the variants; medians per step. The losses of the variants are compared with the plain one's.

    python -m benchmarks.compile_step runs/demo/stage1/final DEMO_DATA/asr_train.jsonl --lora --out compile.json
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

import torch

from eardrum.adapters.model import shared_prefix_length
from eardrum.common.records import DEFAULT_PROMPTS
from eardrum.training.collate import Collator
from eardrum.training.compiling import compile_decoder_layers, uncompiled

from .precision_step import step_model
from .report_io import emit, machine

VARIANTS = {"plain": (False, False), "shared_prefix": (False, True), "compiled": (True, False),
            "compiled_shared_prefix": (True, True)}  # name -> (compiled, share_prefix)


def step(model, batch: dict, share_prefix: bool = False) -> tuple[float, float]:
    """One forward + backward; (seconds, loss)."""
    start = time.perf_counter()
    loss = model(**batch, labelled_logits_only=True, share_prefix=share_prefix).loss
    loss.backward()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - start, loss.item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="a saved eardrum model directory")
    parser.add_argument("manifest", help="a JSONL manifest; its records form the batches")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--batches", type=int, default=3, help="distinct batches (their lengths differ)")
    parser.add_argument("--lora", action="store_true", help="LoRA r=8 on the LLM, as in the demo's stage 2")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds over every batch")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, help="write the report here as JSON")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, processor, records = step_model(args.model, args.manifest, args.lora)
    model.train()
    collate = Collator(processor, records, DEFAULT_PROMPTS, 0)
    batches = []
    for b in range(args.batches):
        indices = list(range(b * args.batch, min((b + 1) * args.batch, len(records))))
        batches.append({k: v for k, v in collate(indices).items() if isinstance(v, torch.Tensor)})
    compile_decoder_layers(model.llm)

    def run(name: str, batch: dict) -> tuple[float, float]:
        compiled, shared = VARIANTS[name]
        with contextlib.nullcontext() if compiled else uncompiled(model.llm):
            return step(model, batch, shared)

    first = {name: [] for name in VARIANTS}
    losses = {name: [] for name in VARIANTS}
    for batch in batches:  # warm-up: the compiled layers compile here
        for name in VARIANTS:
            seconds, loss = run(name, batch)
            first[name].append(seconds)
            losses[name].append(loss)
    times = {name: [] for name in VARIANTS}
    for _ in range(args.repeats):
        for batch in batches:
            for name in VARIANTS:
                times[name].append(run(name, batch)[0])
    median = {name: statistics.median(t) for name, t in times.items()}
    report = {
        "machine": machine(), "threads": args.threads, "model": args.model, "manifest": args.manifest,
        "lora": args.lora, "batch_shapes": [list(b["input_ids"].shape) for b in batches],
        "shared_prefix_tokens": [shared_prefix_length(b["input_ids"], b.get("attention_mask"), b["labels"],
                                                      model.placeholder_id) for b in batches],
        "seconds_per_step_median": median,
        "speedup_over_plain": {name: median["plain"] / median[name] for name in VARIANTS if name != "plain"},
        "speedup_compiled_over_plain": median["plain"] / median["compiled"],
        "first_pass_seconds": first, "all_seconds": times, "loss": losses,
        "max_loss_difference": max(abs(a - b) for name in VARIANTS for a, b in zip(losses["plain"], losses[name])),
        "command": "python -m benchmarks.compile_step " + " ".join(sys.argv[1:]),
    }
    emit(report, args.out)


if __name__ == "__main__":
    main()
