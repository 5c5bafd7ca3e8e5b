"""Generation latency: time to first token (TTFT) and decode speed, at batch 1 and batch 16.

Two model sizes, both with random weights (speed does not depend on the values), written as local
folders and loaded the way a user's bases are:
    tiny  the test suite's tiny Whisper and Llama (`eardrum.adapters.tiny`)
    demo  the shapes of Whisper-base's encoder (d_model 512, 6 layers) and SmolLM2-135M (Llama,
          hidden 576, 30 layers, 9 heads, 3 kv heads, intermediate 1536, vocab 49152)
Both use the tiny test tokenizer: its ids are all below either vocabulary, and a tokenizer does not
change the model's work. The projector is `stack` (12.5 audio tokens per second).

Each request is one clip of `--seconds` (10 s) with a short question, decoded greedily for exactly
`--new-tokens` tokens (min_new_tokens = max_new_tokens, so every run does the same work).
TTFT runs from the processor call (audio features, with the wave already in memory) through audio
encoding and prefill to the first generated token, taken by a streamer when `generate` hands it
over; the processor's share of it is reported too. Decode speed is the tokens after the first, over
all sequences of the batch, divided by the time after the first token. Medians over `--runs` runs
after one warm-up run.

    python benchmarks/generate_latency.py --sizes tiny,demo --device cpu --out generate_latency.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import transformers
from peer_timing import FirstTokenClock  # benchmarks/peer_timing.py
from shapes import write_demo_bases  # benchmarks/shapes.py: the demo models' shapes, defined once

from eardrum.adapters.checkpoint import build_audio_llm
from eardrum.adapters.config import AudioLLMConfig
from eardrum.adapters.projectors import ProjectorConfig
from eardrum.adapters.tiny import save_tiny_bases
from eardrum.demo.run import cpu_name

QUESTION = "What is said in this recording?"
SIZES = ("tiny", "demo")


def conversation(wave: np.ndarray) -> list[dict]:
    parts = [{"type": "audio", "audio": (wave, 16000)}, {"type": "text", "text": QUESTION}]
    return [{"role": "user", "content": parts}]


def timed_request(model, processor, waves: list[np.ndarray], new_tokens: int, device: torch.device) -> dict:
    """One batched request; returns its TTFT and decode speed."""
    clock = FirstTokenClock()
    pad = processor.tokenizer.pad_token_id
    start = time.perf_counter()
    batch = processor([conversation(w) for w in waves], add_generation_prompt=True)
    featurized = time.perf_counter()
    batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
    ids = model.generate(
        **batch,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=pad,
        streamer=clock,
    )
    if device.type == "cuda":
        torch.cuda.synchronize()
    end = time.perf_counter()
    if ids.shape != (len(waves), new_tokens) or clock.first is None:
        raise RuntimeError(f"expected {new_tokens} new tokens per sequence, got shape {tuple(ids.shape)}")
    decoded = len(waves) * (new_tokens - 1)
    return {
        "ttft_s": clock.first - start,
        "features_s": featurized - start,
        "decode_tokens_per_s": decoded / (end - clock.first),
        "total_s": end - start,
        "prompt_tokens": int(batch["input_ids"].shape[1]),
    }


def measure(model, processor, size: str, batch: int, args: argparse.Namespace, device: torch.device) -> dict:
    rng = np.random.default_rng(batch)
    waves = [(rng.standard_normal(int(args.seconds * 16000)) * 0.1).astype(np.float32) for _ in range(batch)]
    with torch.inference_mode():
        timed_request(model, processor, waves, args.new_tokens, device)  # warm-up
        runs = [timed_request(model, processor, waves, args.new_tokens, device) for _ in range(args.runs)]
    ttft = statistics.median(r["ttft_s"] for r in runs)
    rate = statistics.median(r["decode_tokens_per_s"] for r in runs)
    features = statistics.median(r["features_s"] for r in runs)
    return {
        "size": size,
        "batch": batch,
        "audio_tokens_per_clip": processor.clip_num_tokens(len(waves[0])),
        "prompt_tokens": runs[0]["prompt_tokens"],
        "ttft_s": ttft,
        "ttft_features_s": features,  # the processor's share of TTFT (log-mel on the CPU)
        "decode_tokens_per_s": rate,
        "decode_tokens_per_s_per_sequence": rate / batch,
        "all_runs": runs,
    }


def load_size(size: str, workdir: Path, device: torch.device):
    bases = save_tiny_bases(workdir / "tiny") if size == "tiny" else write_demo_bases(workdir / "demo")
    config = AudioLLMConfig(encoder=bases["whisper"], llm=bases["llama"], projector=ProjectorConfig(name="stack"))
    torch.manual_seed(0)
    model, processor = build_audio_llm(config)
    return model.to(device).eval(), processor


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="tiny,demo", help=f"comma-separated, from {', '.join(SIZES)}")
    parser.add_argument("--batches", default="1,16", help="batch sizes, comma-separated")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--seconds", type=float, default=10.0, help="clip length")
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens decoded per sequence, exactly")
    parser.add_argument("--runs", type=int, default=5, help="timed runs per setting (the median is reported)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--workdir", help="where the random model folders go (default: a temp folder)")
    parser.add_argument("--out", default="generate_latency.json")
    args = parser.parse_args()
    args.sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    args.batches = [int(b) for b in args.batches.split(",")]
    bad = [s for s in args.sizes if s not in SIZES]
    if bad or args.new_tokens < 2 or args.runs < 1 or min(args.batches) < 1:
        parser.error(f"--sizes from {SIZES} (got {bad or 'ok'}), --new-tokens >= 2, --runs >= 1, --batches >= 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible")
    return args


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    device = torch.device(args.device)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="eardrum-latency-"))
    results, params = [], {}
    for size in args.sizes:
        model, processor = load_size(size, workdir, device)
        counts = model.trainable_summary()
        params[size] = {part: counts[f"{part}_total"] for part in ("encoder", "projector", "llm")}
        for batch in args.batches:
            results.append(measure(model, processor, size, batch, args, device))
            row = results[-1]
            print(
                f"{size:<5} batch {batch:>2}: TTFT {row['ttft_s'] * 1000:8.1f} ms "
                f"(features {row['ttft_features_s'] * 1000:.1f} ms)   "
                f"decode {row['decode_tokens_per_s']:8.1f} tokens/s ({row['decode_tokens_per_s_per_sequence']:.1f} "
                f"per sequence)   prompt {row['prompt_tokens']} tokens",
                flush=True,
            )
        del model
    machine = torch.cuda.get_device_name() if device.type == "cuda" else cpu_name()
    result = {
        "benchmark": "generate_latency",
        "device": args.device,
        "machine": machine,
        "threads": args.threads,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "clip_seconds": args.seconds,
        "new_tokens": args.new_tokens,
        "runs": args.runs,
        "parameters": params,
        "results": results,
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
