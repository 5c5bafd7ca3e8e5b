"""Audio tokens per second of audio for each projector, from `num_audio_tokens` and checked on real output.

For each registered projector with its default settings, on a Whisper encoder (50 frames/s) with
Whisper-base width (512) into SmolLM2 width (576): the token count of clips of several lengths,
the module's real output length for the same clips, and the median forward time for 30 s of audio.

    python benchmarks/projector_rates.py --out projector_rates.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from eardrum.adapters.config import num_audio_tokens
from eardrum.adapters.encoders import FrameSpec, num_frames
from eardrum.adapters.projectors import PROJECTORS, ProjectorConfig, build_projector

WHISPER = FrameSpec("whisper", ((3, 1, 1), (3, 2, 1)), 480000, 512, 6)
SECONDS = (1.0, 2.5, 5.0, 12.3, 30.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="projector_rates.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for name in sorted(PROJECTORS):
        cfg = ProjectorConfig(name=name)
        torch.manual_seed(0)
        proj = build_projector(cfg, WHISPER.hidden_size, 576).eval()
        counts, produced = {}, {}
        for s in SECONDS:
            samples = int(s * 16000)
            frames = num_frames(WHISPER, samples)
            counts[s] = num_audio_tokens(samples, WHISPER, cfg)
            with torch.inference_mode():
                out, lengths = proj(torch.randn(1, frames, WHISPER.hidden_size), torch.tensor([frames]))
            produced[s] = int(lengths[0])
            if not out.shape[1] == produced[s] == counts[s]:
                raise RuntimeError(f"{name}: {s} s gave {produced[s]} tokens, num_audio_tokens says {counts[s]}")
        x, n = torch.randn(1, 1500, WHISPER.hidden_size), torch.tensor([1500])
        times = []
        with torch.inference_mode():
            proj(x, n)
            for _ in range(args.repeats):
                start = time.perf_counter()
                proj(x, n)
                times.append(time.perf_counter() - start)
        rows.append(
            {
                "projector": name,
                "tokens_per_second_of_audio": counts[30.0] / 30.0,
                "tokens": {str(s): c for s, c in counts.items()},
                "parameters": sum(p.numel() for p in proj.parameters()),
                "forward_30s_median_ms": 1000 * statistics.median(times),
            }
        )
    with open(args.out, "w") as f:
        json.dump(
            {
                "benchmark": "projector_rates",
                "encoder_frames_per_second": 50,
                "d_enc": 512,
                "d_llm": 576,
                "projectors": rows,
            },
            f,
            indent=2,
        )
    print(
        f"{'projector':10} {'tokens/s':>9} {'params':>10} {'30 s fwd ms':>12}  tokens for "
        + ", ".join(f"{s:g}s" for s in SECONDS)
    )
    for r in rows:
        print(
            f"{r['projector']:10} {r['tokens_per_second_of_audio']:9.2f} {r['parameters']:10,} "
            f"{r['forward_30s_median_ms']:12.2f}  " + ", ".join(str(c) for c in r["tokens"].values())
        )


if __name__ == "__main__":
    main()
