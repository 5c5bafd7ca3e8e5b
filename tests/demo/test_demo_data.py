"""The demo's generated data: deterministic, disjoint splits, captions that match their events, cached builds.

No network and no piper: a fake synthesiser writes tones, and a fake piper script stands in for the
real command line where the batching logic is tested.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import soundfile as sf

from eardrum.common.records import DataSource, load_records
from eardrum.demo.data import (
    QUICK_SIZES,
    DemoSizes,
    SpeechSynthesiser,
    Voice,
    build_demo_data,
    espeak_speak,
    piper_speak,
    render_events,
    score_caption_events,
)
from eardrum.demo.text import (
    QUESTION_FAMILIES,
    caption,
    number_word,
    parse_caption,
    questions,
    sentences,
    sound_scenes,
)

SMALL = DemoSizes(
    asr_train=24, asr_test=8, qa_train=20, qa_test=10, sound_train=16, sound_test=8, animal_variants=3, chat_train=8
)


class ToneSynthesiser:
    """Speech stand-in: one tone per text, its pitch and length set by the text; counts its calls."""

    key = "tones"

    def __init__(self) -> None:
        self.calls = 0

    def voices(self) -> tuple[list[Voice], list[Voice]]:
        return [Voice("tones", "a", 0.9), Voice("tones", "b", 1.15, 0.5)], [Voice("tones", "c")]

    def __call__(self, texts: list[str], voice: Voice) -> list[np.ndarray]:
        self.calls += 1
        return [self.tone(text, voice.speed) for text in texts]

    @staticmethod
    def tone(text: str, speed: float) -> np.ndarray:
        freq = 200 + sum(map(ord, text)) % 900
        return (0.2 * speed * np.sin(2 * np.pi * freq * np.arange(160 * len(text)) / 16000)).astype(np.float32)


@pytest.fixture(scope="module")
def animals(tmp_path_factory) -> SimpleNamespace:
    folder = tmp_path_factory.mktemp("animals")
    sounds = {}
    for label, freq in (("dog", 300.0), ("owl", 500.0)):
        sounds[label] = folder / f"{label}.wav"
        t = np.arange(22050) / 22050
        sf.write(sounds[label], (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32), 22050)
    return SimpleNamespace(animal_sounds=sounds)


@pytest.fixture(scope="module")
def built(tmp_path_factory, animals) -> dict[str, Path]:
    return build_demo_data(
        tmp_path_factory.mktemp("demo"), animals, sizes=SMALL, synthesiser=ToneSynthesiser(), progress=False
    )


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(folder)): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != "meta.json"
    }


def test_same_seed_gives_identical_manifests_and_audio(tmp_path, animals, built):
    again = build_demo_data(tmp_path, animals, sizes=SMALL, synthesiser=ToneSynthesiser(), progress=False)
    first, second = built["asr_train"].parent, again["asr_train"].parent
    assert first.name == second.name
    files = folder_bytes(first)
    assert files == folder_bytes(second)
    assert sum(name.endswith(".wav") for name in files) == 24 + 8 + 20 + 10 + 16 + 8 + 2 * 3


def test_another_seed_gives_other_texts_and_another_folder(tmp_path, animals, built):
    other = build_demo_data(tmp_path, animals, seed=1, sizes=SMALL, synthesiser=ToneSynthesiser(), progress=False)
    assert other["asr_train"].parent.name != built["asr_train"].parent.name
    assert {r["text"] for r in rows(other["asr_train"])} != {r["text"] for r in rows(built["asr_train"])}


def test_manifests_load_with_zero_problems(built):
    tasks = {"asr": "asr", "qa": "qa", "caption": "caption", "chat": "chat"}
    for name, path in built.items():
        records, problems = load_records([DataSource(path=str(path))])
        assert problems == []
        assert {r.task for r in records} == {tasks[name.split("_")[0]]}
        assert len(records) == len(rows(path))


def test_counts_follow_the_sizes(built):
    counts = {name: len(rows(path)) for name, path in built.items()}
    assert counts == {
        "asr_train": 24,
        "asr_test": 8,
        "qa_train": 20,
        "qa_test": 10,
        "caption_train": 16 + 2 * 2,
        "caption_test": 8 + 2,
        "chat_train": 8,
    }
    meta = json.loads((built["asr_train"].parent / "meta.json").read_text())
    assert meta["sizes"] == asdict(SMALL) and meta["counts"] == counts
    assert meta["speech"]["clips"] == 24 + 8 + 20 + 10


def test_captions_state_the_generated_events_exactly(built):
    for name in ("caption_train", "caption_test"):
        for row in rows(built[name]):
            assert row["task"] == "caption"
            assert row["text"] == caption(row["events"])
            assert parse_caption(row["text"]) == row["events"]
            assert score_caption_events(row["text"], row["events"])["exact"]


def test_no_sentence_or_question_is_in_both_splits(built):
    assert not {r["text"] for r in rows(built["asr_train"])} & {r["text"] for r in rows(built["asr_test"])}
    train_questions = {r["transcript"] for r in rows(built["qa_train"])}
    assert not train_questions & {r["transcript"] for r in rows(built["qa_test"])}


def test_held_out_sound_combinations_are_never_trained_on():
    def combos(scenes):
        return {tuple(json.dumps(e, sort_keys=True) for e in s if not e.get("background")) for s in scenes}

    train = {c for c in combos(sound_scenes(3000, 0, held_out=False)) if len(c) > 1}
    test = {c for c in combos(sound_scenes(500, 0, held_out=True)) if len(c) > 1}
    assert test and not train & test


def test_one_variant_of_each_animal_is_held_out(built):
    test = [r for r in rows(built["caption_test"]) if r["events"][0]["type"] == "animal"]
    train = [r for r in rows(built["caption_train"]) if r["events"][0]["type"] == "animal"]
    assert Counter(r["text"] for r in test) == {"A dog barking.": 1, "An owl hooting.": 1}
    assert Counter(r["text"] for r in train) == {"A dog barking.": 2, "An owl hooting.": 2}
    assert not {r["audio"] for r in train} & {r["audio"] for r in test}


def test_held_out_speech_uses_only_the_held_out_voice(built):
    for name in ("asr_test", "qa_test"):
        assert {r["voice"] for r in rows(built[name])} == {"tones:c@1"}
    for name in ("asr_train", "qa_train"):
        assert {r["voice"] for r in rows(built[name])} <= {"tones:a@0.9", "tones:b@1.15"}


def test_qa_rows_hold_the_spoken_question_and_accepted_answers(built):
    for row in rows(built["qa_train"]) + rows(built["qa_test"]):
        assert set(row) == {"audio", "question", "answer", "answers", "transcript", "family", "voice"}
        assert row["answers"][0] == row["answer"] and row["family"] in QUESTION_FAMILIES
        if row["answer"].isdigit():
            assert row["answers"][:2] == [row["answer"], number_word(int(row["answer"]))]


def test_numeric_answers_accept_digits_and_words():
    arithmetic = QUESTION_FAMILIES["arithmetic"][0]()
    seven_plus_five = next(q for q in arithmetic if q.text == "What is seven plus five?")
    assert (seven_plus_five.answer, seven_plus_five.answers) == ("12", ("12", "twelve"))
    assert all(q.answers == (q.answer, number_word(int(q.answer))) for q in arithmetic)


def test_question_families_keep_their_shares_and_splits_stay_disjoint():
    train, test = questions(800, 120, seed=0)
    assert (len(train), len(test)) == (800, 120)
    assert Counter(q.family for q in test) == {
        "command": 30,
        "capital": 24,
        "opposite": 24,
        "calendar": 12,
        "arithmetic": 12,
        "colour": 6,
        "count": 6,
        "number": 6,
    }
    assert not {q.text for q in train} & {q.text for q in test}


def test_sentences_are_distinct_and_deterministic():
    first = sentences(3000, seed=4)
    assert len({s.text for s in first}) == 3000
    assert first == sentences(3000, seed=4)
    assert [s.text for s in first[:20]] != [s.text for s in sentences(20, seed=5)]


def test_a_second_build_does_no_work(tmp_path, animals):
    synth = ToneSynthesiser()
    first = build_demo_data(tmp_path, animals, sizes=SMALL, synthesiser=synth, progress=False)
    calls, stamp = synth.calls, first["asr_train"].stat().st_mtime_ns
    assert calls > 0
    second = build_demo_data(tmp_path, animals, sizes=SMALL, synthesiser=synth, progress=False)
    assert second == first and synth.calls == calls and first["asr_train"].stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == [first["asr_train"].parent.name]


def test_an_edit_to_the_generator_code_builds_afresh(tmp_path, animals, monkeypatch):
    import eardrum.demo.text as demo_text

    synth = ToneSynthesiser()
    first = build_demo_data(tmp_path, animals, sizes=SMALL, synthesiser=synth, progress=False)
    edited = tmp_path / "demo_text_edited.py"
    edited.write_text(Path(demo_text.__file__).read_text() + "\n# an edit\n")
    monkeypatch.setattr(demo_text, "__file__", str(edited))
    second = build_demo_data(tmp_path, animals, sizes=SMALL, synthesiser=synth, progress=False)
    assert second["asr_train"].parent != first["asr_train"].parent


def test_quick_build_has_a_few_hundred_items(tmp_path, animals):
    total = sum(v for k, v in asdict(QUICK_SIZES).items() if k != "animal_variants")
    assert 200 <= total <= 500
    paths = build_demo_data(tmp_path, animals, quick=True, synthesiser=ToneSynthesiser(), progress=False)
    counts = {name: len(rows(path)) for name, path in paths.items()}
    assert counts["asr_train"] == QUICK_SIZES.asr_train and counts["qa_test"] == QUICK_SIZES.qa_test
    assert counts["caption_train"] == QUICK_SIZES.sound_train + 2 * (QUICK_SIZES.animal_variants - 1)


def test_bad_sizes_are_all_named(tmp_path, animals):
    with pytest.raises(ValueError, match=r"asr_test: expected an integer >= 0, got -1; animal_variants: .* got 1"):
        build_demo_data(
            tmp_path, animals, sizes=DemoSizes(asr_test=-1, animal_variants=1), synthesiser=ToneSynthesiser()
        )
    with pytest.raises(ValueError, match="give one of them"):
        build_demo_data(tmp_path, animals, sizes=SMALL, quick=True, synthesiser=ToneSynthesiser())


def test_score_caption_events_tells_count_from_order():
    events = [
        {"type": "beeps", "pitch": "high", "count": 2},
        {"type": "chirp", "direction": "falling"},
        {"type": "hum", "background": True},
    ]
    assert score_caption_events("Two high beeps, then a falling chirp, over a low hum.", events)["exact"]
    wrong_count = score_caption_events("3 high-pitched beeps, then a falling chirp over a hum", events)
    assert (wrong_count["count_right"], wrong_count["order_right"], wrong_count["background_right"]) == (
        False,
        True,
        True,
    )
    swapped = score_caption_events("A falling chirp, then two high beeps.", events)
    assert (swapped["count_right"], swapped["order_right"], swapped["background_right"]) == (False, False, False)
    assert swapped["predicted_events"] == [events[1], events[0]]
    assert score_caption_events("a single high beep", [{"type": "beeps", "pitch": "high", "count": 1}])["exact"]


def test_rendered_sounds_are_deterministic_and_ordered():
    events = [{"type": "beeps", "pitch": "low", "count": 3}, {"type": "noise"}]
    wave = render_events(events, seed=7)
    assert wave.dtype == np.float32 and np.array_equal(wave, render_events(events, seed=7))
    assert not np.array_equal(wave, render_events(events, seed=8))
    loud = np.flatnonzero(np.abs(wave) > 0.05)
    assert 0.5 < (loud[-1] - loud[0]) / 16000 < 2.5
    assert np.abs(render_events([{"type": "silence"}], seed=0)).max() == 0


FAKE_PIPER = """
import sys, time, wave
out = sys.argv[sys.argv.index("--output-dir") + 1]
for line in sys.stdin:
    if line.strip():
        with wave.open(f"{out}/{time.monotonic_ns()}.wav", "wb") as w:
            w.setnchannels(1); w.setsampwidth(2); w.setframerate(22050)
            w.writeframes(b"\\x00\\x10" * 220 * len(line.strip()))
"""


def test_piper_speak_keeps_the_order_of_the_texts(tmp_path):
    script = tmp_path / "fake_piper.py"
    script.write_text(FAKE_PIPER)
    assets = SimpleNamespace(
        voice=tmp_path / "voice.onnx", piper_command=[sys.executable, str(script)], piper_env=lambda: dict(os.environ)
    )
    texts = ["a" * n for n in (5, 1, 9, 3, 7, 2)]
    clips = piper_speak(assets, texts)
    assert [len(c) for c in clips] == [round(220 * len(t) * 16000 / 22050) for t in texts]
    with pytest.raises(ValueError, match="one non-empty line"):
        piper_speak(assets, ["two\nlines"])


def test_espeak_takes_a_quarter_of_training_speech_and_piper_keeps_held_out(tmp_path):
    voice = tmp_path / "en_US-joe-medium.onnx"
    voice.write_bytes(b"onnx")
    piper_only = SpeechSynthesiser(SimpleNamespace(voice=voice), espeak=False)
    assert [v.key for v in piper_only.voices()[0]] == ["piper:en_US-joe-medium@0.9", "piper:en_US-joe-medium@1.15"]
    assert [v.key for v in piper_only.voices()[1]] == ["piper:en_US-joe-medium@1"]
    mixed = SpeechSynthesiser(SimpleNamespace(voice=voice), espeak="/usr/bin/espeak-ng")
    train, test = mixed.voices()
    espeak_weight = sum(v.weight for v in train if v.engine == "espeak")
    assert espeak_weight / sum(v.weight for v in train) == pytest.approx(0.25)
    assert test == piper_only.voices()[1] and mixed.key != piper_only.key


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed")
def test_espeak_speaks_each_text_at_16k():
    clips = espeak_speak(["Hello there.", "The train to Paris leaves at ten o'clock."], "en-us")
    assert [c.dtype for c in clips] == [np.float32, np.float32]
    assert 0.3 < len(clips[0]) / 16000 < len(clips[1]) / 16000 < 6
