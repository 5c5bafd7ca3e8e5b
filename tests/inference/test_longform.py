"""Long recordings (design contract 4): 30 s windows in order, `[mm:ss]` markers, bounded memory.

A synthetic recording of 3 min 35 s holds one tone burst per 30 s window, each at its own pitch and
its own second inside the window, so every window's audio is distinct and its place is known.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from eardrum.adapters.checkpoint import build_audio_llm
from eardrum.adapters.config import AudioLLMConfig
from eardrum.adapters.projectors import ProjectorConfig

SR = 16_000
WINDOW = 30 * SR
SECONDS = 215  # seven full windows and a 5 s tail
BEEP_AT = [2, 5, 8, 11, 14, 17, 20, 3]  # second of window i's burst, counted from the window's start
BEEP_SECONDS = 0.5
MARKERS = ["[00:00]", "[00:30]", "[01:00]", "[01:30]", "[02:00]", "[02:30]", "[03:00]", "[03:30]"]
TOKENS = [375] * 7 + [63]  # stack k=4: 30 s -> 1500 Whisper frames -> 375 tokens; 5 s -> 250 frames -> 63


def recording() -> np.ndarray:
    """(SECONDS * SR,) float32: silence with window i's burst of (300 + 150 i) Hz at BEEP_AT[i]."""
    wave = np.zeros(SECONDS * SR, dtype=np.float32)
    t = np.arange(int(BEEP_SECONDS * SR)) / SR
    for i, at in enumerate(BEEP_AT):
        start = i * WINDOW + at * SR
        wave[start : start + len(t)] = 0.5 * np.sin(2 * np.pi * (300 + 150 * i) * t)
    return wave


@pytest.fixture(scope="module")
def long_model(model_dirs, tmp_path_factory):
    config = AudioLLMConfig(
        encoder=model_dirs["whisper"],
        llm=model_dirs["llama"],
        projector=ProjectorConfig(name="stack", stack_factor=4),
        window_seconds=30,
        time_markers=True,
    )
    model, processor = build_audio_llm(config)
    directory = model.save_pretrained(tmp_path_factory.mktemp("longform") / "checkpoint", processor)
    return processor, directory


@pytest.fixture(scope="module")
def batch(long_model):
    processor, _ = long_model
    parts = [{"type": "audio", "audio": (recording(), SR)}, {"type": "text", "text": "What happens near 1:30?"}]
    return processor([{"role": "user", "content": parts}], add_generation_prompt=True)


def test_windows_follow_their_time_markers_in_order(long_model, batch):
    processor, _ = long_model
    assert [processor.num_audio_tokens(n) for n in (WINDOW, 5 * SR)] == [375, 63]
    text = processor.tokenizer.decode(batch["input_ids"][0])
    runs = re.findall(r"(\[\d\d:\d\d\])((?:<\|audio\|>)+)", text)
    assert [(marker, len(run) // len("<|audio|>")) for marker, run in runs] == list(zip(MARKERS, TOKENS))
    assert text.count("<|audio|>") == sum(TOKENS)  # no audio token outside a marked window
    assert re.findall(r"\[\d\d:\d\d\]", text) == MARKERS
    assert text.index("[03:30]") < text.index("What happens near 1:30?")


def test_each_window_holds_exactly_its_own_thirty_seconds(long_model, batch):
    processor, _ = long_model
    wave = recording()
    features, lengths = batch["audio_features"], batch["audio_lengths"]
    assert features.shape[0] == len(MARKERS)
    for i in range(len(MARKERS)):
        expected, expected_lengths = processor.featurizer([wave[i * WINDOW : (i + 1) * WINDOW]])
        n = int(expected_lengths[0])
        assert int(lengths[i]) == n
        assert np.array_equal(features[i, :, :n].numpy(), expected[0, :, :n].numpy())
        assert not features[i, :, n:].any()  # padding of the short last window stays zero


def test_each_burst_sits_in_its_window_at_its_second(batch):
    features = batch["audio_features"]  # (N_win, 80, T_mel), 100 mel frames per second
    for i, at in enumerate(BEEP_AT):
        level = features[i, :, : int(batch["audio_lengths"][i])].amax(dim=0)  # (T_mel,)
        loud = (level > level.min()).nonzero().flatten()  # silence sits exactly at the log-mel floor
        # the burst's 50 frames, give or take the frames an STFT window reaches past each edge
        assert at * 100 - 2 <= int(loud[0]) and int(loud[-1]) <= (at + BEEP_SECONDS) * 100 + 2, (i, loud)
        assert len(loud) >= 50


PEAK_RSS = """
import json, resource, sys, time
import numpy as np, torch
torch.set_num_threads(1)
from eardrum.inference.chat import AudioChat, GenerationSettings

directory, minutes = sys.argv[1], float(sys.argv[2])
chat = AudioChat.from_pretrained(directory, device="cpu", settings=GenerationSettings(max_new_tokens=2))
loaded_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
windows, generate = [], chat.model.generate
def spy(**kwargs):
    windows.append(int(kwargs["audio_features"].shape[0]))
    return generate(**kwargs)
chat.model.generate = spy
start = time.perf_counter()
wave = 0.1 * np.random.default_rng(0).standard_normal(int(minutes * 60 * 16000), dtype=np.float32)
chat.add_recording((wave, 16000), "long")
del wave
answer = chat.ask("What is said near minute 1:30?")
print(json.dumps({"minutes": minutes, "windows": windows, "answer_is_text": isinstance(answer, str),
                  "rss_after_load_mb": round(loaded_mb), "peak_rss_mb": round(resource.getrusage(
                  resource.RUSAGE_SELF).ru_maxrss / 1024), "seconds": round(time.perf_counter() - start, 1)}))
"""


def measure(directory, minutes: int) -> dict:
    # CPU only, even beside a GPU: a CUDA context alone adds hundreds of MB of RSS that no recording costs
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TRANSFORMERS_VERBOSITY": "error",
           "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(
        [sys.executable, "-c", PEAK_RSS, str(directory), str(minutes)], capture_output=True, text=True, env=env
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    print(f"\n{minutes}-minute recording: {report}")
    return report


def test_ask_on_a_ten_minute_recording_in_bounded_memory(long_model):
    report = measure(long_model[1], 10)
    assert report["windows"] == [20] and report["answer_is_text"]
    assert report["peak_rss_mb"] < 1500
    assert report["peak_rss_mb"] - report["rss_after_load_mb"] < 500  # what the recording costs (38 MB of wave)


@pytest.mark.slow
def test_ask_on_an_hour_long_recording_in_bounded_memory(long_model):
    report = measure(long_model[1], 60)
    assert report["windows"] == [120] and report["answer_is_text"]
    assert report["peak_rss_mb"] < 3000
    assert report["peak_rss_mb"] - report["rss_after_load_mb"] < 1500  # 230 MB of wave
