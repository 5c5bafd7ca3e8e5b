"""Training throughput with and without the frozen-encoder feature cache.

Runs `eardrum.training.trainer.train` itself on synthetic clips, for two sizes:
- tiny: the `tiny:` random bases used by the tests;
- demo: random weights with the shapes of the demo models (Whisper-base encoder, d 512 x 6 layers;
  SmolLM2-135M: Llama hidden 576, 30 layers, 9 heads, 3 KV heads, vocab 49152).
For each size: no cache, cache cold (first run: encodes and stores), cache warm (a later epoch or run).
Examples/s and audio-seconds/s count the training loop only; the cold run's encoding time is reported.

    python benchmarks/train_throughput.py --sizes tiny,demo --steps 8 --out train_throughput.json
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
from shapes import write_demo_bases  # benchmarks/shapes.py: the demo models' shapes, defined once

from eardrum.training.recipe import recipe_from_dict
from eardrum.training.trainer import train


def synthetic_manifest(root: Path, count: int, seconds: float) -> Path:
    rng = np.random.default_rng(0)
    (root / "clips").mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(count):
        t = np.arange(int(seconds * 16000)) / 16000
        wave = 0.3 * np.sin(2 * np.pi * (200 + 40 * i) * t) + 0.02 * rng.standard_normal(t.size)
        sf.write(root / "clips" / f"{i}.wav", wave.astype(np.float32), 16000, subtype="PCM_16")
        lines.append(json.dumps({"audio": f"clips/{i}.wav", "text": f"clip number {i} with a tone"}))
    path = root / "train.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def run(bases: dict, manifest: Path, out: Path, cache: str | None, steps: int, batch: int, seconds: float) -> dict:
    recipe = recipe_from_dict(
        {
            "model": {"encoder": bases["whisper"], "llm": bases["llama"], "projector": {"name": "stack"}},
            "output_dir": str(out),
            "data": {"train": [{"path": str(manifest)}], "batch_size": batch},
            "lora": {"enabled": True, "r": 16, "alpha": 32},
            "optim": {"lr": 1e-4},
            "cache": {"enabled": cache is not None, "dir": cache},
            "train": {"max_steps": steps, "epochs": 1000, "log_every": 1, "overwrite": True},
        }
    )
    start = time.perf_counter()
    result = train(recipe)
    total = time.perf_counter() - start
    examples = result["examples"]
    return {
        "examples_per_s": examples / result["seconds"],
        "audio_seconds_per_s": examples * seconds / result["seconds"],
        "loop_seconds": result["seconds"],
        "total_seconds": total,
        "steps": result["steps"],
        "examples": examples,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="tiny,demo")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=5.0, help="length of each synthetic clip")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="train_throughput.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="eardrum-bench-"))
    manifest = synthetic_manifest(tmp / "data", args.steps * args.batch, args.seconds)
    results = {}
    for size in args.sizes.split(","):
        bases = (
            {"whisper": "tiny:whisper", "llama": "tiny:llama"} if size == "tiny" else write_demo_bases(tmp / "bases")
        )
        cache = str(tmp / f"cache-{size}")
        results[size] = {
            "no_cache": run(bases, manifest, tmp / f"{size}-nocache", None, args.steps, args.batch, args.seconds),
            "cache_cold": run(bases, manifest, tmp / f"{size}-cold", cache, args.steps, args.batch, args.seconds),
            "cache_warm": run(bases, manifest, tmp / f"{size}-warm", cache, args.steps, args.batch, args.seconds),
        }
        r = results[size]
        r["cache_speedup"] = r["cache_warm"]["examples_per_s"] / r["no_cache"]["examples_per_s"]
    report = {
        "benchmark": "train_throughput",
        "clip_seconds": args.seconds,
        "batch": args.batch,
        "steps": args.steps,
        "threads": args.threads,
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
        "machine": platform.machine(),
        "results": results,
    }
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"{'size':6} {'mode':11} {'examples/s':>11} {'audio s/s':>10} {'loop s':>8} {'total s':>8}")
    for size, r in results.items():
        for mode in ("no_cache", "cache_cold", "cache_warm"):
            m = r[mode]
            print(
                f"{size:6} {mode:11} {m['examples_per_s']:11.2f} {m['audio_seconds_per_s']:10.2f} "
                f"{m['loop_seconds']:8.2f} {m['total_seconds']:8.2f}"
            )
        print(f"{size:6} cache speed-up (warm vs none): {r['cache_speedup']:.2f}x")


if __name__ == "__main__":
    main()
