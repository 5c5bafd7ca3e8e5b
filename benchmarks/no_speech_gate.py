"""The no-speech gate on transcript hints, measured on a trained hinted model (e.g. the demo's): the same
checkpoint evaluated with every window's hint decoded, and with windows whose Whisper no-speech probability is
above a threshold hinted "nothing" (`model.transcript_no_speech`).

    python -m benchmarks.no_speech_gate --model runs/demo/stage2/final --data ~/.cache/eardrum/demo-data/demo-KEY \\
        --threshold 0.6 --out benchmarks/results/no-speech-gate-cpu-demo.json

Reported for each setting: invented transcripts on the demo's clips without speech (overall and per kind), WER
on its held-out speech and on held-out spoken questions asked to be transcribed, and WER on the real-speech set
(`eardrum.demo.real_speech`, where it can be had); Whisper's no-speech probability on each set's clips.

What the gate saves in time: `--timing-clips N` (with `--timing-only`, nothing else) decodes the hints of the
first N training sounds and the first N training sentences afresh (no cache), every window decoded and gated
in turn, and reports the median seconds of `--repeats` rounds for each.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from .report_io import emit, machine


def gated_like(transcriber, gate: float | None):
    """A new WhisperTranscriber with `transcriber`'s Whisper and settings, gated at `gate` (None: every window
    decoded); its transcripts, and any cache file it is given, are its own."""
    from eardrum.adapters.transcribe import WhisperTranscriber

    return WhisperTranscriber(transcriber.whisper, transcriber.feature_extractor, transcriber.tokenizer,
                              max_new_tokens=transcriber.max_new_tokens, batch_size=transcriber.batch_size,
                              language=transcriber.decode_options.get("language"), no_speech_threshold=gate)


def load_hinted(model_dir: Path) -> tuple:
    """`load_placed(model_dir)` for a hinted checkpoint whose Whisper has a no-speech token; SystemExit naming
    `model_dir` otherwise."""
    from eardrum.adapters.placement import load_placed

    loaded = load_placed(model_dir)
    transcriber = getattr(loaded[0], "transcriber", None)
    if transcriber is None:
        raise SystemExit(f"{model_dir}: no transcript hints here (model.transcript_hint); nothing to gate")
    if not transcriber.no_speech_ids:
        raise SystemExit(f"{model_dir}: its Whisper has no no-speech token")
    return loaded


def measure(loaded: tuple, model_dir: Path, data: Path, threshold: float, work: Path, batch_size: int = 32) -> dict:
    """Evaluate `loaded` (`load_hinted(model_dir)`) on the demo data in `data` without the gate and with it at
    `threshold`. The model's transcriber is replaced by each setting's in turn."""
    import numpy as np

    from eardrum.adapters.audio import load_audio
    from eardrum.adapters.sources import default_cache_dir
    from eardrum.demo.real_speech import evaluate_real_speech
    from eardrum.demo.run import _eardrum_wer, no_speech_scores
    from eardrum.inference.evaluation import evaluate_manifest
    from eardrum.training.setup import prepare_transcriber

    model = loaded[0]
    transcriber = model.transcriber
    report: dict = {"model": str(model_dir), "data": str(data), "threshold": threshold, "settings": {}}
    sets = {"nospeech": "nospeech_test.jsonl", "asr": "asr_test.jsonl", "questions_asr": "questions_asr_test.jsonl"}
    # Whisper's no-speech probability per clip of each set (what the gate reads)
    probabilities = {}
    for name, file in sets.items():
        lines = [json.loads(x) for x in (data / file).read_text().splitlines() if x.strip()]
        values = []
        for first in range(0, len(lines), 8):
            values += transcriber.no_speech_probabilities([load_audio(data / line["audio"])
                                                           for line in lines[first : first + 8]])
        probabilities[name] = {"clips": len(values), "median": round(statistics.median(values), 3),
                               "max": round(max(values), 3), "min": round(min(values), 3),
                               "above_threshold": int(np.sum(np.array(values) > threshold))}
    report["no_speech_probability"] = probabilities
    for label, gate in (("every window decoded", None), (f"no-speech gate {threshold}", threshold)):
        # a transcriber of its own for each setting (its transcripts and cache file are its own)
        heard = gated_like(transcriber, gate)
        model.transcriber = loaded[1].transcriber = heard
        prepare_transcriber(heard, default_cache_dir() / "features", "auto")
        started = time.perf_counter()
        out = work / (label.replace(" ", "-"))
        row = {}
        for name, file in sets.items():
            evaluate_manifest(loaded, data / file, "asr", batch_size=batch_size, out_dir=out / name, progress=False)
        row["no_speech"] = no_speech_scores(out / "nospeech", data / "nospeech_test.jsonl")
        row["asr_wer"] = round(_eardrum_wer(out / "asr"), 4)
        row["questions_asr_wer"] = round(_eardrum_wer(out / "questions_asr"), 4)
        try:
            real = evaluate_real_speech(loaded, heard, out / "real_speech")
            real.pop("examples", None)
            row["real_speech"] = real
        except (OSError, RuntimeError) as error:
            row["real_speech"] = f"not measured: {error}"
        row["seconds"] = round(time.perf_counter() - started, 1)
        report["settings"][label] = row
    return report


def decode_seconds(base, data: Path, threshold: float, clips: int, repeats: int) -> dict:
    """Seconds to decode the hints of the first `clips` training sounds and training sentences of `data` with
    the Whisper of `base` (a WhisperTranscriber), every window decoded and gated at `threshold`, in turn,
    `repeats` rounds; a fresh transcriber each time (nothing cached), at the precision the demo decodes in.
    Returns {set: {"clips", "seconds": {setting: median}, "ratio": every-window seconds / gated seconds}}."""
    from eardrum.adapters.audio import load_audio
    from eardrum.training.setup import prepare_transcriber

    report: dict = {"clips": clips, "repeats": repeats}
    for name, file in (("training sounds", "caption_train.jsonl"), ("training sentences", "asr_train.jsonl")):
        lines = [json.loads(x) for x in (data / file).read_text().splitlines() if x.strip()]
        speaking = [line for line in lines if line.get("transcript") != ""]  # the lines the demo decodes
        waves = [load_audio(data / line["audio"]) for line in speaking[:clips]]
        times: dict[str, list[float]] = {"every window decoded": [], f"no-speech gate {threshold}": []}
        for _ in range(repeats):
            for label, gate in zip(times, (None, threshold)):
                fresh = gated_like(base, gate)
                prepare_transcriber(fresh, None, "auto")  # memory only; bf16 autocast where the demo's hints use it
                started = time.perf_counter()
                fresh(waves)
                times[label].append(time.perf_counter() - started)
        medians = {label: statistics.median(values) for label, values in times.items()}
        plain, gated = medians.values()
        report[name] = {"clips": len(waves), "seconds": {k: round(v, 2) for k, v in medians.items()},
                        "ratio": round(plain / max(gated, 1e-9), 2)}
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="a hinted checkpoint folder")
    parser.add_argument("--data", type=Path, required=True, help="a demo data build (demo-data/demo-KEY)")
    parser.add_argument("--threshold", type=float, default=0.6)
    parser.add_argument("--out", type=Path, help="write the report here as JSON")
    parser.add_argument("--timing-clips", type=int, default=0, help="also time decoding this many training clips")
    parser.add_argument("--timing-only", action="store_true", help="only the timing (needs --timing-clips)")
    parser.add_argument("--repeats", type=int, default=3, help="timing rounds (the median is reported)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if not 0 < args.threshold < 1:
        parser.error(f"--threshold: expected a probability between 0 and 1, got {args.threshold}")
    if not (args.data / "nospeech_test.jsonl").is_file():
        parser.error(f"--data {args.data}: no nospeech_test.jsonl there; expected a demo data build")
    if args.timing_clips < 0 or (args.timing_only and args.timing_clips < 1):
        parser.error(f"--timing-clips: expected a count >= {int(args.timing_only)}, got {args.timing_clips}")
    if args.repeats < 1:
        parser.error(f"--repeats: expected at least 1, got {args.repeats}")
    import torch

    torch.set_num_threads(args.threads)
    loaded = load_hinted(args.model)
    base = loaded[0].transcriber  # the checkpoint's own, before `measure` swaps in its settings'
    report: dict = {"model": str(args.model), "data": str(args.data), "threshold": args.threshold}
    if not args.timing_only:
        with tempfile.TemporaryDirectory() as tmp:
            report = measure(loaded, args.model, args.data, args.threshold, Path(tmp))
    if args.timing_clips:
        report["decode_seconds"] = decode_seconds(base, args.data, args.threshold, args.timing_clips, args.repeats)
    report.update(**machine(), threads=args.threads, command=" ".join(sys.argv))
    emit(report, args.out)


if __name__ == "__main__":
    main()
