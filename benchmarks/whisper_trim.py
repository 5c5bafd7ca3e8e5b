"""Trimmed vs padded Whisper encoding of a short clip: eardrum's encoder against the stock encoder.

The peer is transformers' own `WhisperEncoder` on the 30 s window it requires (3000 mel frames);
eardrum encodes the clip at its own length. Both run in the same process, alternating, and the
medians are reported. By default the encoder is Whisper-base-sized with random weights (compute
does not depend on the values); `--encoder` takes any eardrum encoder source instead.

    python benchmarks/whisper_trim.py --seconds 5 --repeats 7 --out whisper_trim.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import torch
from shapes import base_sized_whisper  # benchmarks/shapes.py: the demo models' shapes, defined once

from eardrum.adapters.encoders import AudioFeaturizer, build_speech_encoder, frame_spec_from_config
from eardrum.demo.run import cpu_name


def timed(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--encoder", help="an eardrum encoder source (default: Whisper-base-sized random weights)")
    parser.add_argument("--out", default="whisper_trim.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.encoder:
        from eardrum.adapters.sources import load_speech_model

        model, fe = load_speech_model(args.encoder)
    else:
        model, fe = base_sized_whisper()
    encoder = build_speech_encoder(model)
    stock = encoder.network
    wave = (np.random.default_rng(0).standard_normal(int(args.seconds * 16000)) * 0.1).astype(np.float32)
    trimmed_in = AudioFeaturizer(fe, encoder.spec)([wave])
    padded_in = AudioFeaturizer(fe, frame_spec_from_config(model.config), pad_to_30s=True)([wave])[0]
    with torch.inference_mode():
        encoder(*trimmed_in), stock(padded_in)  # warm-up
        trimmed, padded = [], []
        for _ in range(args.repeats):  # alternate so both see the same machine load
            trimmed += timed(lambda: encoder(*trimmed_in), 1)
            padded += timed(lambda: stock(padded_in), 1)
    result = {
        "benchmark": "whisper_trim",
        "clip_seconds": args.seconds,
        "repeats": args.repeats,
        "threads": args.threads,
        "encoder": args.encoder or "whisper-base-sized (random weights)",
        "frames": {"trimmed": int(encoder.num_frames(len(wave))), "padded": 1500},
        "eardrum_trimmed_median_s": statistics.median(trimmed),
        "stock_padded_30s_median_s": statistics.median(padded),
        "speedup": statistics.median(padded) / statistics.median(trimmed),
        "all_s": {"trimmed": trimmed, "padded": padded},
        "machine": {"cpu": cpu_name(), "torch": torch.__version__},
    }
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps({k: v for k, v in result.items() if k != "all_s"}, indent=2))


if __name__ == "__main__":
    main()
