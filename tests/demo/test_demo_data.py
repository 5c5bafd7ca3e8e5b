"""The demo's generated data: deterministic, disjoint splits, captions that match their events, cached builds.

No network and no piper: a fake synthesiser writes tones, and a fake piper script stands in for the
real command line where the batching logic is tested.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import soundfile as sf

from eardrum.common.metrics import normalize_text
from eardrum.common.records import DataSource, load_records
from eardrum.demo.data import (
    ESPEAK_TEST_VOICES,
    ESPEAK_TRAIN_ACCENTS,
    ESPEAK_TRAIN_VARIANTS,
    NO_SPEECH,
    NOSPEECH_KINDS,
    QUICK_SIZES,
    DemoSizes,
    SpeechSynthesiser,
    Voice,
    add_noise,
    augment_speech,
    build_demo_data,
    espeak_speak,
    no_speech_but,
    nospeech_clip,
    nospeech_transcript,
    piper_speak,
    render_events,
    reverberate,
    score_caption_events,
    shift_pitch,
    stretch_time,
    telephone,
)
from eardrum.demo.text import (
    QUESTION_FAMILIES,
    caption,
    number_word,
    parse_caption,
    questions,
    sentences,
    sound_scenes,
    varied_sentences,
)

SMALL = DemoSizes(
    asr_train=24, asr_test=8, qa_train=20, qa_test=10, sound_train=16, sound_test=8, animal_variants=3, chat_train=8,
    nospeech_train=6, nospeech_test=5, sounds_to_transcribe=4,
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
    noisy_copies = 8
    assert sum(name.endswith(".wav") for name in files) == 24 + 8 + 20 + 10 + 16 + 8 + 2 * 3 + 6 + 5 + noisy_copies


def test_another_seed_gives_other_texts_and_another_folder(tmp_path, animals, built):
    other = build_demo_data(tmp_path, animals, seed=1, sizes=SMALL, synthesiser=ToneSynthesiser(), progress=False)
    assert other["asr_train"].parent.name != built["asr_train"].parent.name
    assert {r["text"] for r in rows(other["asr_train"])} != {r["text"] for r in rows(built["asr_train"])}


def test_manifests_load_with_zero_problems(built):
    tasks = {"asr": "asr", "qa": "qa", "caption": "caption", "chat": "chat", "nospeech": "asr", "questions": "asr"}
    for name, path in built.items():
        records, problems = load_records([DataSource(path=str(path))])
        assert problems == []
        assert {r.task for r in records} == {tasks[name.split("_")[0]]}
        assert len(records) == len(rows(path))


def test_counts_follow_the_sizes(built):
    counts = {name: len(rows(path)) for name, path in built.items()}
    assert counts == {
        "asr_train": 24 + 6 + 5 + 4,  # sentences, clips without speech, a quarter of the questions, sounds
        "asr_test": 8,
        "qa_train": 20,
        "qa_test": 10,
        "caption_train": 16 + 2 * 2,
        "caption_test": 8 + 2,
        "chat_train": 8,
        "nospeech_test": 5,
        "questions_asr_test": 10,
        "asr_noisy_test": 8,
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
        speech = [r for r in rows(built[name]) if r.get("transcript") != ""]  # "": nothing is said
        assert {r["voice"] for r in speech} <= {"tones:a@0.9", "tones:b@1.15"}
    assert not [r for r in rows(built["asr_train"]) if r.get("transcript") == "" and "voice" in r]


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


def test_the_shipped_varied_sentences_are_sayable_distinct_and_enough_for_the_full_demo():
    from eardrum.demo.data import FULL_SIZES, VARIED_SHARE
    from eardrum.demo.make_sentences import candidate_sentences

    shipped = varied_sentences(seed=0)
    texts = [s.text for s in shipped]
    assert [t for t in texts if candidate_sentences(t) != [t]] == []  # each passes the generator's own filter
    assert len({t.lower() for t in texts}) == len(texts)
    assert len(texts) >= round(VARIED_SHARE * FULL_SIZES.asr_train) + round(VARIED_SHARE * FULL_SIZES.asr_test)
    assert not [s for s in shipped if s.mentions]
    assert varied_sentences(seed=0) == shipped
    assert texts[:20] != [s.text for s in varied_sentences(seed=1)[:20]] and sorted(texts) == sorted(
        s.text for s in varied_sentences(seed=1))


def test_a_missing_or_broken_sentence_list_is_named(tmp_path):
    with pytest.raises(ValueError, match=r"nowhere\.txt: the demo's sentence list is missing"):
        varied_sentences(0, tmp_path / "nowhere.txt")
    (tmp_path / "gap.txt").write_text("One good sentence here.\n\nAnother one after a gap.\n")
    with pytest.raises(ValueError, match=r"gap\.txt: lines \[2\] are empty"):
        varied_sentences(0, tmp_path / "gap.txt")


def test_speech_mixes_varied_short_and_template_sentences_in_both_splits(built):
    from eardrum.demo.data import SHORT_SHARE, VARIED_SHARE

    for name, total in (("asr_train", SMALL.asr_train), ("asr_test", SMALL.asr_test)):
        kinds = [r["kind"] for r in rows(built[name]) if r.get("kind") in ("varied", "short", "template")]
        assert kinds.count("varied") == round(VARIED_SHARE * total) and len(kinds) == total
        assert kinds.count("short") == round(SHORT_SHARE * total) > 0 and kinds.count("template") > 0
    shipped = {s.text for s in varied_sentences(seed=0)}
    assert all((r["text"] in shipped) == (r["kind"] == "varied") for r in rows(built["asr_test"]))
    assert all(len(r["text"].split()) <= 7 for r in rows(built["asr_test"]) if r.get("kind") == "short")
    train_texts = {r["text"].lower() for r in rows(built["asr_train"])}
    assert not train_texts & {r["text"].lower() for r in rows(built["asr_test"])}


def test_short_utterances_are_distinct_short_and_seeded():
    from eardrum.demo.text import short_utterances

    first = [s.text for s in short_utterances(200, seed=3)]
    assert first == [s.text for s in short_utterances(200, seed=3)] != [s.text for s in short_utterances(200, seed=4)]
    assert len({t.lower() for t in first}) == 200 and all(1 <= len(t.split()) <= 7 for t in first)
    digits = set("zero one two three four five six seven eight nine".split())
    said_digit_by_digit = [t for t in first if len(t.split()) >= 3 and set(normalize_text(t).split()) <= digits]
    assert len(said_digit_by_digit) >= 20


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
    assert counts["asr_train"] == (QUICK_SIZES.asr_train + QUICK_SIZES.nospeech_train + QUICK_SIZES.qa_train // 4
                                   + QUICK_SIZES.sounds_to_transcribe)
    assert counts["qa_test"] == QUICK_SIZES.qa_test and counts["nospeech_test"] == QUICK_SIZES.nospeech_test
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


def test_espeak_weighs_as_much_as_piper_in_training_and_held_out_voices_are_never_trained_on(tmp_path):
    voice = tmp_path / "en_US-joe-medium.onnx"
    voice.write_bytes(b"onnx")
    piper_only = SpeechSynthesiser(SimpleNamespace(voice=voice), espeak=False)
    assert [v.key for v in piper_only.voices()[0]] == ["piper:en_US-joe-medium@0.9", "piper:en_US-joe-medium@1.15"]
    mixed = SpeechSynthesiser(SimpleNamespace(voice=voice))
    train, test = mixed.voices()
    espeak_weight = sum(v.weight for v in train if v.engine == "espeak")
    assert espeak_weight / sum(v.weight for v in train) == pytest.approx(0.5)
    assert len({v.name for v in train if v.engine == "espeak"}) == 60 and mixed.key != piper_only.key
    assert [v.key for v in test] == ["espeak:en-029+m4@0.9", "espeak:en-gb-x-gbcwmd+f3@0.9", "espeak:en-us+f3@0.9"]
    trained_accents = {v.name.split("+")[0] for v in train if v.engine == "espeak"}
    trained_variants = {v.name.split("+")[1] for v in train if v.engine == "espeak"}
    for held in test:  # each held-out voice has an accent or a variant (or both) that no training clip has
        accent, variant = held.name.split("+")
        assert variant not in trained_variants and held.key not in {v.key for v in train}
    assert {"en-029", "en-gb-x-gbcwmd"}.isdisjoint(trained_accents)


def test_training_speech_is_augmented_deterministically_and_held_out_speech_is_not():
    wave = (0.3 * np.sin(2 * np.pi * 300 * np.arange(16000) / 16000)).astype(np.float32)
    outs = [augment_speech(wave, seed) for seed in range(12)]
    assert all(np.array_equal(augment_speech(wave, seed), out) for seed, out in enumerate(outs))
    assert sum(np.array_equal(out, wave) for out in outs) >= 1  # a share stays as spoken
    assert len({len(out) for out in outs}) > 4  # speed perturbation and padding change the length
    assert all(out.dtype == np.float32 and np.abs(out).max() <= 1.0 for out in outs)


def _peak_hz(wave: np.ndarray) -> float:
    return float(np.argmax(np.abs(np.fft.rfft(wave)))) * 16000 / len(wave)


def test_speaker_and_channel_augmentations_do_what_they_say():
    t = np.arange(32000) / 16000
    tone = (0.5 * np.sin(2 * np.pi * 400 * t)).astype(np.float32)
    for factor in (0.8, 1.25):  # a lower or higher voice at the same tempo
        shifted = shift_pitch(tone, factor)
        assert len(shifted) == len(tone) and _peak_hz(shifted) == pytest.approx(400 * factor, abs=4)
    slower = stretch_time(tone, 0.5)  # twice as long, the same pitch
    assert len(slower) == pytest.approx(2 * len(tone), rel=0.02) and _peak_hz(slower) == pytest.approx(400, abs=2)
    rng = np.random.default_rng(0)
    room = reverberate(tone, 0.5, rng)
    assert len(room) == len(tone) and np.abs(room).max() == pytest.approx(0.5, rel=1e-4)
    assert not np.allclose(room, tone, atol=0.05)
    lines = np.sin(2 * np.pi * 100 * t) + np.sin(2 * np.pi * 1000 * t) + np.sin(2 * np.pi * 6000 * t)
    band = np.abs(np.fft.rfft(telephone((0.3 * lines).astype(np.float32))))  # 0.5 Hz per bin
    assert len(band) == len(np.fft.rfft(lines)) and band[2000] > 20 * max(band[200], band[12000])
    noisy = add_noise(tone, 10.0, rng)
    snr = 10 * np.log10(np.mean(tone**2) / np.mean((noisy - tone) ** 2))
    assert snr == pytest.approx(10.0, abs=0.5)


def test_held_out_speech_has_a_noisy_copy(built):
    clean, noisy = rows(built["asr_test"]), rows(built["asr_noisy_test"])
    assert [(r["text"], r["voice"]) for r in noisy] == [(r["text"], r["voice"]) for r in clean]
    for a, b in zip(clean, noisy):
        wave, _ = sf.read(built["asr_test"].parent / a["audio"], dtype="float32")
        copy, _ = sf.read(built["asr_noisy_test"].parent / b["audio"], dtype="float32")
        assert b["audio"] != a["audio"] and len(copy) == len(wave) and not np.allclose(copy, wave, atol=1e-3)


def test_nospeech_clips_hold_no_speech_and_are_transcribed_as_no_speech(built):
    train = [r for r in rows(built["asr_train"]) if r.get("kind") in NOSPEECH_KINDS]
    test = rows(built["nospeech_test"])
    assert len(train) == 6 and len(test) == 5 and all(r["text"].startswith(NO_SPEECH[:-1]) for r in train + test)
    assert {r["kind"] for r in train} == set(NOSPEECH_KINDS) and "animal" not in {r["kind"] for r in test}
    assert all((r["text"] == NO_SPEECH) == (r["kind"] in ("silence", "room tone", "noise")) for r in train)
    assert all(r["transcript"] == "" for r in train + test)  # nothing is said in them
    assert nospeech_transcript("animal", 1, "dog") == "There is no speech in this recording, only a dog barking."
    assert nospeech_transcript("sounds", 7) == f"{NO_SPEECH[:-1]}, only " + (
        lambda c: c[0].lower() + c[1:])(caption(sound_scenes(1, 7, held_out=False)[0]))
    silence = nospeech_clip("silence", 3)
    assert silence.dtype == np.float32 and not silence.any() and 1.0 <= len(silence) / 16000 <= 4.0
    assert 0.001 < float(np.std(nospeech_clip("room tone", 3))) < 0.03


def test_some_captioned_sounds_are_also_asked_for_a_transcript_and_answered_no_speech(built):
    captions = {r["audio"]: r["text"] for r in rows(built["caption_train"])}
    asked = [r for r in rows(built["asr_train"]) if r.get("kind") == "captioned sound"]
    assert len(asked) == 4 and len({r["audio"] for r in asked}) == 4
    for r in asked:
        assert r["transcript"] == "" and r["text"] == no_speech_but(captions[r["audio"]])
    assert no_speech_but("Two low beeps.") == "There is no speech in this recording, only two low beeps."
    held_out = {r["audio"] for r in rows(built["caption_test"])} | {r["audio"] for r in rows(built["nospeech_test"])}
    assert not held_out & {r["audio"] for r in asked}


def test_spoken_questions_are_also_transcribed_and_held_out_ones_are_only_tested(built):
    qa_train = {r["audio"]: r for r in rows(built["qa_train"])}
    asked = [r for r in rows(built["asr_train"]) if r.get("kind") == "question"]
    assert len(asked) == 5 and all(r["text"] == qa_train[r["audio"]]["transcript"] for r in asked)
    qa_test = rows(built["qa_test"])
    assert [(r["audio"], r["text"], r["voice"]) for r in rows(built["questions_asr_test"])] == [
        (r["audio"], r["transcript"], r["voice"]) for r in qa_test]
    assert not {r["audio"] for r in qa_test} & {r["audio"] for r in rows(built["asr_train"])}


ESPEAK = importlib.util.find_spec("espeakng_loader")


@pytest.mark.skipif(ESPEAK is None, reason="espeakng-loader is not installed (pip install -e '.[test]')")
def test_espeak_speaks_each_text_at_16k_in_every_demo_voice_and_names_a_missing_one():
    from eardrum.demo.assets import espeak_files

    library, data = espeak_files(Path(ESPEAK.origin).parent)
    assets = SimpleNamespace(espeak_library=library, espeak_data=data)
    texts = ["Hello there.", "The train to Paris leaves at ten o'clock."]
    clips = espeak_speak(texts, Voice("espeak", "en-us+m1", 0.9, pitch=65), assets)
    assert [c.dtype for c in clips] == [np.float32, np.float32]
    assert 0.3 < len(clips[0]) / 16000 < len(clips[1]) / 16000 < 6
    names = [f"{a}+{ESPEAK_TRAIN_VARIANTS[k % len(ESPEAK_TRAIN_VARIANTS)]}" for k, a in enumerate(ESPEAK_TRAIN_ACCENTS)]
    names += [f"en-us+{v}" for v in ESPEAK_TRAIN_VARIANTS] + list(ESPEAK_TEST_VOICES)
    for name in names:  # every accent and variant the demo uses exists (espeak-ng falls back silently otherwise)
        assert len(espeak_speak(["Yes."], Voice("espeak", name), assets)) == 1
    with pytest.raises(RuntimeError, match="no voice variant 'zz'"):
        espeak_speak(["Yes."], Voice("espeak", "en-us+zz"), assets)

