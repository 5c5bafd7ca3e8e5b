"""Library search on perfect transcripts: how often it finds the planted window, and says nothing-found.

    python -m benchmarks.library_oracle [--recordings 30] [--seeds 0 1 2] [--out results.json]

The library test set (`benchmarks.library_set`) is built with the real generator, but every sentence is
"spoken" as a constant-valued stretch of samples that names it (sample value = its id / 32768, exact in
16-bit PCM) and every sound likewise; the index is made with the real `AudioLibrary.index`, its describer
reading the ids back and writing the sentences a window holds (a sentence cut by a window's edge counts
whole). So the index holds what a perfect transcriber would write, and what is measured is retrieval
alone: recall@1 and @5 of the window that answers each question, and the share of questions about
things the library never mentions that still find a window (each of which a model would answer by
inventing). Run at several `min_coverage` values (`inference.library.MIN_COVERAGE`). Needs no model and
no speech synthesis: the default 7-hour set builds and indexes in about 20 s a seed on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np

from .library_bench import right_window
from .report_io import emit, machine

WORD_SECONDS = 0.3  # how long a sentence "lasts": 0.3 s per word, about the pace of the demo's voices
SOUND_SECONDS = 2.0
COVERAGES = (0.0, 0.4, 0.5, 0.6, 0.7, 0.8)


class IdSpeech:
    """`speak(texts, voice) -> waves` whose samples name the text (value = id / 32768), and the reverse."""

    def __init__(self) -> None:
        self.texts: list[str] = []

    def wave(self, text: str, seconds: float) -> np.ndarray:
        self.texts.append(text)
        if len(self.texts) >= 32767:
            raise ValueError("more than 32,766 distinct sentences cannot be named in 16-bit samples")
        return np.full(int(seconds * 16000), len(self.texts) / 32768, dtype=np.float32)

    def __call__(self, texts, voice) -> list[np.ndarray]:
        return [self.wave(t, WORD_SECONDS * len(t.split())) for t in texts]

    def describe(self, waves: list[np.ndarray]) -> list[str]:
        out = []
        for wave in waves:
            ids = [int(i) for i in np.unique(np.rint(wave * 32768)) if i > 0]
            out.append(" ".join(self.texts[i - 1] for i in ids))
        return out


def measure(recordings: int, seed: int, work: Path) -> dict:
    """Build a set and its perfect-transcript library in `work`; recall and nothing-found per min_coverage."""
    from eardrum.demo.text import varied_sentences
    from eardrum.inference.library import AudioLibrary

    from .library_set import build_library_set, names_project

    speech = IdSpeech()
    labels = ["dog", "cat", "cow", "rooster", "sheep", "frog", "crow", "horse"]
    sounds = {label: speech.wave(f"the sound of a {label}", SOUND_SECONDS) for label in labels}
    alarm = speech.wave("an alarm beeping", SOUND_SECONDS)
    filler = [s.text for s in varied_sentences(seed) if not names_project(s.text)]
    card = build_library_set(work / "set", speech, ["voice-a", "voice-b"], filler, sounds, alarm,
                             recordings=recordings, seed=seed)
    rows = [json.loads(line) for line in (work / "set" / "questions.jsonl").read_text().splitlines()]
    with AudioLibrary(work / "library.sqlite") as library:
        library.index([work / "set" / "recordings"], speech.describe, describer="perfect transcripts")
        stats = library.stats()
        out = {"hours": card["hours"], "windows": stats["windows"], "by_min_coverage": {}}
        for coverage in COVERAGES:
            groups: dict[str, list] = {"speech": [], "sounds": []}
            found_for_unanswerable = []
            for row in rows:
                hits = library.search(row["question"], k=5, min_coverage=coverage)
                if not row["file"]:
                    found_for_unanswerable.append(bool(hits))
                    continue
                rank = next((k for k, h in enumerate(hits) if right_window(row, h.path, h.start, h.end)), None)
                groups["speech" if row["answers"] else "sounds"].append(rank)
            out["by_min_coverage"][str(coverage)] = {
                **{f"{name}_recall@{k}": round(sum(r is not None and r < k for r in ranks) / len(ranks), 3)
                   for name, ranks in groups.items() if ranks for k in (1, 5)},
                "unanswerable_finding_a_window": round(sum(found_for_unanswerable) / len(found_for_unanswerable), 3),
                "questions": {name: len(ranks) for name, ranks in groups.items()} | {
                    "unanswerable": len(found_for_unanswerable)},
            }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recordings", type=int, default=30)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args()
    runs = {}
    for seed in args.seeds:
        with tempfile.TemporaryDirectory() as work:
            runs[str(seed)] = measure(args.recordings, seed, Path(work))
    report = {"benchmark": "library_oracle", "machine": machine(), "recordings": args.recordings, "seeds": runs}
    emit(report, args.out)


if __name__ == "__main__":
    main()
