"""Real human speech the demo never trained on: eardrum's WER next to Whisper's own decoder, and whether
the model asked to transcribe gives a transcript at all, for one or more models side by side.

The set (29 clips of 7 speakers from PyPI source distributions, never trained on) and its scoring are
`eardrum.demo.real_speech`'s; `eardrum demo` reports the same for the model it trains. Every model is
asked the demo's own instruction, "Transcribe the audio.".

    python benchmarks/real_speech.py runs/demo/stage2/final [MORE_MODELS ...] --out real-speech.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

from eardrum.adapters.sources import default_cache_dir
from eardrum.demo.real_speech import SDISTS, SET_VERSION, build_manifest, model_replies, score
from eardrum.demo.run import cpu_name, whisper_reference_wer


def main() -> None:
    import soundfile as sf

    from eardrum.demo.assets import whisper_folder
    from eardrum.inference.chat import TRANSCRIBE_PROMPT

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+", help="checkpoint folders (e.g. runs/demo/stage2/final)")
    parser.add_argument("--whisper", default="tiny.en", help="the Whisper model whose own decoder is the reference")
    parser.add_argument("--out", default="real-speech.json")
    parser.add_argument("--work", default="runs/real-speech", help="where each model's replies are written")
    args = parser.parse_args()

    cache = default_cache_dir() / "real-speech"
    manifest = build_manifest(cache)
    lines = [json.loads(x) for x in manifest.read_text().splitlines() if x.strip()]
    references = [line["text"] for line in lines]
    seconds_audio = sum(sf.info(str(manifest.parent / x["audio"])).duration for x in lines)
    print(f"{len(lines)} clips, {seconds_audio:.0f} s, {len({x['speaker'] for x in lines})} speakers")

    start = time.perf_counter()
    whisper = whisper_reference_wer(str(whisper_folder(args.whisper, progress=None)), manifest)
    reference = score(references, [e["hypothesis"] for e in whisper["examples"]], lines)
    results = {
        "set": {"version": SET_VERSION, "clips": len(lines), "seconds": round(seconds_audio, 1),
                "speakers": sorted({x["speaker"] for x in lines}),
                "sdists": [s.filename for s in SDISTS]},
        "prompt": TRANSCRIBE_PROMPT,
        "whisper": {"model": args.whisper, **reference},
        "models": {},
    }
    print(f"Whisper {args.whisper}'s own decoder: WER {100 * reference['wer']:.1f} %")
    for k, model in enumerate(args.models):
        ours = score(references, model_replies(model, manifest, Path(args.work) / f"model-{k}"), lines)
        ours["wer_over_whisper"] = ours["wer"] / reference["wer"] if reference["wer"] else None
        results["models"][model] = ours
        print(f"{model}: WER {100 * ours['wer']:.1f} % ({ours['wer_over_whisper']:.2f}x Whisper), "
              f"no transcript on {100 * ours['no_transcript_share']:.0f} % of clips")
    results["seconds"] = round(time.perf_counter() - start, 1)
    results["machine"] = {"platform": platform.platform(), "processor": cpu_name()}
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
