"""One training step in float32 against bfloat16 autocast, and with full logits against labelled ones only.

Loads a saved model (for the demo's numbers: a stage-1 checkpoint of `eardrum demo`, real SmolLM2-135M),
optionally adds LoRA, freezes what the trainer freezes, collates one batch from a manifest and times
forward + backward in turn for each variant, in one process (warm-up dropped, median of the rest).
The loss of each variant is reported too: labelled-only logits give the float32 loss exactly; bf16
rounds it.

    python benchmarks/precision_step.py runs/demo/stage1/final DEMO_DATA/asr_train.jsonl --lora --out precision.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from eardrum.adapters.checkpoint import load_pretrained
from eardrum.common.records import DEFAULT_PROMPTS, DataSource, load_records
from eardrum.demo.run import cpu_name
from eardrum.training.collate import Collator
from eardrum.training.lora import apply_llm_lora, freeze_for_training
from eardrum.training.recipe import LoraSettings
from eardrum.training.setup import resolve_precision

VARIANTS = {  # name -> (bf16 autocast, labelled_logits_only)
    "fp32_full_logits": (False, False),
    "fp32_labelled_logits": (False, True),
    "bf16_labelled_logits": (True, True),
}


def step_model(model_dir: str, manifest: str, lora: bool) -> tuple:
    """(model, processor, records) for timing training steps: the saved model, with LoRA r=8 on its LLM when
    `lora` (as the demo's stage 2), frozen as the trainer freezes it, and the records of `manifest`."""
    model, processor = load_pretrained(model_dir)
    if lora:
        apply_llm_lora(model, LoraSettings(enabled=True, r=8, alpha=16, dropout=0.0), quantized=False,
                       gradient_checkpointing=False)
    freeze_for_training(model)  # as the trainer: the projector trains, the LLM only through LoRA
    records, problems = load_records([DataSource(path=manifest)])
    if problems:
        raise SystemExit(f"{manifest}: {problems[:3]}")
    return model, processor, records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="a saved eardrum model directory")
    parser.add_argument("manifest", help="a JSONL manifest; its first --batch records form the batch")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lora", action="store_true", help="LoRA r=8 on the LLM, as in the demo's stage 2")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="precision_step.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, processor, records = step_model(args.model, args.manifest, args.lora)
    batch = Collator(processor, records, DEFAULT_PROMPTS, 0)(list(range(min(args.batch, len(records)))))
    batch = {k: v for k, v in batch.items() if isinstance(v, torch.Tensor)}
    times, losses = {name: [] for name in VARIANTS}, {}
    for _ in range(args.repeats + 1):
        for name, (bf16, labelled) in VARIANTS.items():
            start = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = model(**batch, labelled_logits_only=labelled).loss
            loss.backward()
            model.zero_grad(set_to_none=True)
            times[name].append(time.perf_counter() - start)
            losses[name] = loss.item()
    median = {name: statistics.median(t[1:]) for name, t in times.items()}
    result = {
        "machine": {"cpu": cpu_name(), "threads": args.threads,
                    "auto_precision": resolve_precision("auto"), "torch": torch.__version__},
        "model": args.model, "manifest": args.manifest, "batch_shape": list(batch["input_ids"].shape),
        "lora": args.lora, "seconds_per_step_median": median, "loss": losses,
        "speedup_vs_fp32_full_logits": {name: median["fp32_full_logits"] / m for name, m in median.items()},
    }
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result["seconds_per_step_median"]), json.dumps(result["speedup_vs_fp32_full_logits"]))


if __name__ == "__main__":
    main()
