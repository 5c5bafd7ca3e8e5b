"""Training at realistic lengths: the same examples for both models, clips and answers of many lengths.

Real training data is not fixed-shape. Each example here draws its clip length and its answer length from
a stated distribution (`DISTRIBUTION`, written into the JSON): clips log-normal around 7 s, clipped to
1-30 s (most of the mass at 3-15 s, as in public speech corpora), answers log-normal around 40 tokens,
clipped to 5-250 (as in instruction data). One pass over the examples is one timed round:
- the peer: batches of `batch` examples in the drawn order, each clip padded to 30 s for its encoder and each
  batch's text padded to its longest row;
- eardrum: its trimmed encoder (each clip at its own length), batches planned by a token budget
  (`plan_batches(..., packed=True)`, the budget holding `batch` examples of mean length) and each batch packed
  into one row (`training.collate.pack_batch`): no padding at all; its attention runs each example of a row on
  its own span (`adapters.attention.PACKED_SDPA`), and the same pass with transformers' SDPA over the whole
  row under a block-diagonal mask is timed beside it (`eardrum_packed_block_mask`).
Reported per contender: examples/s, audio hours per device hour, the useful-token fraction (LLM positions that
carry a label or audio over the positions computed) and, on CUDA, peak memory.

    python -m benchmarks.peer_lengths --examples 24      # the small size on CPU, JSON out
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from eardrum.common.batching import plan_batches
from eardrum.training.collate import pack_batch

from .peer_models import RATE, Models, answer_text, conversation, peer_features
from .peer_timing import PeakMemory, alternate, median
from .peer_train import Trainers, private_bytes

DISTRIBUTION = {
    "clip_seconds": {"law": "lognormal", "median": 7.0, "sigma": 0.6, "min": 1.0, "max": 30.0},
    "answer_tokens": {"law": "lognormal", "median": 40, "sigma": 0.9, "min": 5, "max": 250},
}


def draw(count: int, seed: int) -> list[tuple[float, int]]:
    """(clip seconds, answer tokens) for `count` examples from `DISTRIBUTION`, the same for a seed; clips are
    whole multiples of 40 ms (see the peer benchmark's note on audio token counts)."""
    rng = np.random.default_rng([seed, 17])
    c, a = DISTRIBUTION["clip_seconds"], DISTRIBUTION["answer_tokens"]
    seconds = np.clip(c["median"] * np.exp(c["sigma"] * rng.standard_normal(count)), c["min"], c["max"])
    tokens = np.clip(np.round(a["median"] * np.exp(a["sigma"] * rng.standard_normal(count))), a["min"], a["max"])
    # whole multiples of 40 ms: an even number of encoder frames, where both models count the same audio tokens
    return [(round(float(s) / 0.04) * 0.04, int(t)) for s, t in zip(seconds, tokens)]


def _examples(models: Models, drawn: list[tuple[float, int]], seed: int) -> list[list[dict]]:
    rng = np.random.default_rng([seed, 18])
    answer = functools.lru_cache(maxsize=None)(functools.partial(answer_text, models.processor))
    return [conversation((0.1 * rng.standard_normal(round(s * RATE))).astype(np.float32), answer(t))
            for s, t in drawn]


def measure(models: Models, trainers: Trainers, *, examples: int, batch: int, warmup: int, repeats: int,
            seed: int) -> dict:
    """Timed passes of both models over the same drawn examples (see the module docstring)."""
    dev, model, processor = models.device, models.model, models.processor
    drawn = draw(examples, seed)
    convs = _examples(models, drawn, seed)
    singles = [processor([c], featurize=False) for c in convs]
    lengths = [int(s["input_ids"].shape[1]) for s in singles]
    useful = [int(((s["labels"] != -100) | (s["input_ids"] == model.placeholder_id)).sum()) for s in singles]

    peer_batches, peer_tokens = [], 0
    for i in range(0, examples, batch):
        part = convs[i : i + batch]
        text = processor(part, featurize=False)
        feats, mask = peer_features(models, [c[0]["content"][0]["audio"][0] for c in part])
        peer_tokens += text["input_ids"].numel()
        peer_batches.append({k: v.to(dev) for k, v in dict(input_ids=text["input_ids"], labels=text["labels"],
                             attention_mask=text["attention_mask"], input_features=feats,
                             feature_attention_mask=mask).items()})
    budget = batch * round(sum(lengths) / len(lengths))
    plan = plan_batches(lengths, range(examples), max_tokens=budget, packed=True, seed=seed)
    ours_batches = []
    for indices in plan:
        packed = pack_batch(processor([convs[i] for i in indices]))
        ours_batches.append({k: v.to(dev) if torch.is_tensor(v) else v for k, v in packed.items()})
    ours_tokens = sum(lengths)

    def one_pass(module, optimizer, batches, others) -> dict:
        memory = PeakMemory(dev, others)
        with memory:
            for b in batches:
                module(**b).loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        return {"peak_bytes": memory.peak}

    not_peer = functools.partial(private_bytes, model, trainers.optimizer)
    not_ours = functools.partial(private_bytes, trainers.peer, trainers.peer_optimizer)
    def block_masked_pass() -> dict:
        """eardrum's packed pass with transformers' own SDPA: the whole row under a block-diagonal mask."""
        config = model.llm.config
        kept, config._attn_implementation = config._attn_implementation, "sdpa"
        try:
            return one_pass(model, trainers.optimizer, ours_batches, not_ours)
        finally:
            config._attn_implementation = kept

    contenders = {
        "peer": lambda: one_pass(trainers.peer, trainers.peer_optimizer, peer_batches, not_peer),
        "eardrum_packed": lambda: one_pass(model, trainers.optimizer, ours_batches, not_ours),
        "eardrum_packed_block_mask": block_masked_pass,
    }
    model.train()
    trainers.peer.train()
    try:
        runs = alternate(contenders, warmup, repeats, dev)
    finally:
        model.eval()
        trainers.peer.eval()
    audio_s = sum(s for s, _ in drawn)
    out = {
        "distribution": DISTRIBUTION,
        "examples": examples,
        "clip_seconds": {"mean": round(audio_s / examples, 2), "min": min(s for s, _ in drawn),
                         "max": max(s for s, _ in drawn)},
        "answer_tokens": {"mean": round(sum(t for _, t in drawn) / examples, 1), "min": min(t for _, t in drawn),
                          "max": max(t for _, t in drawn)},
        "peer_batch": batch,
        "eardrum_token_budget": budget,
        "batches": {"peer": len(peer_batches), "eardrum_packed": len(ours_batches)},
        "useful_token_fraction": {"peer": round(sum(useful) / peer_tokens, 3),
                                  "eardrum_packed": round(sum(useful) / ours_tokens, 3)},
    }
    for name, record in runs.items():
        seconds = median(record["seconds"])
        peaks = [p for p in record["peak_bytes"] if p is not None]
        out[name] = {"median_pass_s": seconds, "examples_per_s": examples / seconds,
                     "audio_hours_per_device_hour": audio_s / seconds,
                     "peak_memory_gib": max(peaks) / 2**30 if peaks else None, "all_pass_s": record["seconds"]}
    out["ratios"] = {"examples_per_s_eardrum_over_peer": out["eardrum_packed"]["examples_per_s"]
                     / out["peer"]["examples_per_s"],
                     "examples_per_s_per_example_attention_over_block_mask": out["eardrum_packed"]["examples_per_s"]
                     / out["eardrum_packed_block_mask"]["examples_per_s"]}
    if out["peer"]["peak_memory_gib"]:
        out["ratios"]["peak_memory_eardrum_over_peer"] = (out["eardrum_packed"]["peak_memory_gib"]
                                                          / out["peer"]["peak_memory_gib"])
    return out


def main(argv: list[str] | None = None) -> None:
    from . import peer_train
    from .peer import versions
    from .peer_models import SIZES, build_models
    from .peer_timing import device_facts

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--size", choices=tuple(SIZES), default="small")
    parser.add_argument("--examples", type=int, default=24)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="JSON path (default: results/peer-lengths-<device>-<size>.json)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    started = time.perf_counter()
    models = build_models(SIZES[args.size], device, dtype, args.seed)
    trainers = peer_train.prepare(models, 16)
    report = {"benchmark": "peer_lengths", "device": {"type": device.type, **device_facts(device)},
              "versions": versions(), "threads": torch.get_num_threads(), "size": args.size, "dtype": str(dtype),
              **measure(models, trainers, examples=args.examples, batch=args.batch, warmup=args.warmup,
                        repeats=args.repeats, seed=args.seed),
              "command": " ".join(["python -m benchmarks.peer_lengths", *(argv if argv is not None else sys.argv[1:])])}
    report["seconds_total"] = time.perf_counter() - started
    out = args.out or Path(__file__).resolve().parent / "results" / f"peer-lengths-{args.device}-{args.size}.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: report[k] for k in ("useful_token_fraction", "ratios", "batches")}, indent=2))
    print(f"written to {out}")


if __name__ == "__main__":
    main()
