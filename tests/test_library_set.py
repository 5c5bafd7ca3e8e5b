"""The library test set: facts and sounds planted at the times its questions name, each project once."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # benchmarks/ is a folder of scripts, not an installed package
library_set = importlib.import_module("benchmarks.library_set")


def fake_speak(texts, voice):
    """A different tone per text, 0.02 s per character, louder for the second voice: timing can be checked."""
    out = []
    for text in texts:
        t = np.arange(int(0.02 * len(text) * 16000)) / 16000
        f = 200 + (sum(map(ord, text)) % 600)
        out.append((0.1 * (1 + voice) * np.sin(2 * np.pi * f * t)).astype(np.float32))
    return out


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("set")
    sounds = {"dog": np.full(8000, 0.25, np.float32)}
    alarm = np.full(4000, -0.25, np.float32)
    filler = [f"Sentence number {i} about nothing much." for i in range(40)]
    card = library_set.build_library_set(out, fake_speak, [0, 1], filler, sounds, alarm, recordings=3,
                                         minutes=(0.3, 0.5), facts_per_recording=2, unanswerable_count=4, seed=3)
    rows = [json.loads(line) for line in (out / "questions.jsonl").read_text().splitlines()]
    return out, card, rows, {**sounds, "alarm": alarm}


def _heard(out: Path, row: dict, samples: int) -> np.ndarray:
    wave, rate = sf.read(out / row["file"], dtype="float32")
    assert rate == 16000 and row["end"] <= len(wave) / rate + 1e-3
    first = int(round(row["start"] * rate))
    return wave[first : first + samples]


def test_every_fact_and_sound_is_heard_where_its_question_says(built):
    out, card, rows, sounds = built
    facts = [r for r in rows if r["kind"] in library_set.FACTS]
    assert len(facts) == 6 and card["questions"]["none"] == 4 and card["recordings"] == 3
    for row in facts:
        assert any(a.lower() in row["said"].lower() for a in row["answers"][:1])  # the answer is what is said
        spoken = [fake_speak([row["said"]], v)[0][:800] for v in (0, 1)]
        assert any(np.allclose(_heard(out, row, 800), s, atol=1e-3) for s in spoken), row
    for row in (r for r in rows if r["kind"] in library_set.SOUNDS):
        clip = sounds[row["source"]]
        assert np.allclose(_heard(out, row, len(clip)), clip, atol=1e-3), row
    assert {r["source"] for r in rows if r["kind"] in library_set.SOUNDS} == {"dog", "alarm"}


def test_each_project_is_named_once_and_unanswerable_questions_name_none_of_them(built):
    out, card, rows, _ = built
    facts = [r for r in rows if r["kind"] in library_set.FACTS]
    named = [next(w for w in r["said"].lower().rstrip(".").split() if w in library_set.PROJECTS) for r in facts]
    assert len(set(named)) == len(named)
    for row in (r for r in rows if r["kind"] == "none"):
        asked = [w for w in row["question"].lower().rstrip("?").split() if w in library_set.PROJECTS]
        assert len(asked) == 1 and asked[0] not in named and row["file"] is None


def test_bad_settings_and_filler_naming_a_project_are_refused(tmp_path):
    with pytest.raises(ValueError, match="names a project code word"):
        library_set.build_library_set(tmp_path, fake_speak, [0], ["The falcon flew."], {}, np.zeros(10, np.float32),
                                      recordings=1, minutes=(0.1, 0.1))
    with pytest.raises(ValueError, match="recordings=0"):
        library_set.build_library_set(tmp_path, fake_speak, [0], ["Hi."], {}, np.zeros(10, np.float32), recordings=0)


library_bench = importlib.import_module("benchmarks.library_bench")


def test_library_cut_to_its_first_hours_and_padded_with_synthetic_hours(built, tmp_path):
    from eardrum.inference.library import AudioLibrary, HintSource

    out, _, rows, _ = built
    hints = HintSource(lambda waves: ["heard words"] * len(waves), "whisper", 30 * 16000)
    with AudioLibrary(tmp_path / "lib.sqlite") as lib:
        lib.index([out / "recordings"], lambda waves: [f"window of {len(w)} samples" for w in waves], describer="x",
                  hints=hints)
        hours = lib.stats()["hours"]
    kept = library_bench.cut_library(tmp_path / "lib.sqlite", tmp_path / "cut.sqlite", hours * 0.7)
    with AudioLibrary(tmp_path / "cut.sqlite") as cut:
        assert 0 < kept < hours * 0.7 and kept == pytest.approx(cut.stats()["hours"]) and cut.stats()["files"] < 3
    added = library_bench.pad_library(tmp_path / "lib.sqlite", tmp_path / "pad.sqlite", 3.0)
    with AudioLibrary(tmp_path / "pad.sqlite") as padded:
        assert added == 3 * library_bench.HOP_WINDOWS_PER_HOUR and padded.stats()["hours"] == pytest.approx(
            hours + 3)
        assert padded.search("window samples", k=5)  # the synthetic windows are searchable like real ones
        unhinted = padded.db.execute("SELECT COUNT(*) FROM windows WHERE hint IS NULL").fetchone()[0]
        assert unhinted == 0  # and carry a hint, as the library's own windows do
    row = next(r for r in rows if r["file"])
    middle = (row["start"] + row["end"]) / 2
    assert library_bench.right_window(row, f"/elsewhere/{Path(row['file']).name}", middle - 1, middle + 1)
    assert not library_bench.right_window(row, row["file"], middle + 0.1, middle + 5)
    assert library_bench.is_refusal("I cannot find that in the recordings.") and not library_bench.is_refusal("March")


def test_library_bench_reports_every_measure_on_a_tiny_model(built, tmp_path):
    import os
    import subprocess

    from eardrum.demo.smoke import run_smoke

    out, _, _, _ = built
    checkpoint = run_smoke(tmp_path / "smoke", steps=2)["checkpoint"]
    report_path = tmp_path / "report.json"
    subprocess.run([sys.executable, "-m", "benchmarks.library_bench", "--set", str(out), "--model", str(checkpoint),
                    "--work", str(tmp_path / "work"), "--simulate-hours", "2", "--repeats", "1", "--out",
                    str(report_path), "--recordings", "2"], check=True, capture_output=True, timeout=600, cwd=ROOT,
                   env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    report = json.loads(report_path.read_text())
    assert report["index"]["windows"] > 0 and report["index"]["audio_hours_per_hour"] > 0
    for group in ("speech", "sounds"):
        assert 0 <= report["retrieval"][group]["recall@1"] <= report["retrieval"][group]["recall@5"] <= 1
    # the first two recordings of three, the questions about them, and every unanswerable question
    _, _, rows, _ = built
    about_two = [r for r in rows if r["file"] in ("recordings/recording-00.wav", "recordings/recording-01.wav")]
    assert report["recordings_indexed"] == 2 and report["answers"]["questions"] == sum(
        1 for r in about_two if r["answers"]) == 4
    assert report["unanswerable"]["questions"] == 4
    assert 0 <= report["unanswerable"]["invented_rate"] <= 1
    for way in ("library", "library_every_top_window", "ceiling_right_window", "cascade"):
        assert 0 <= report["answers"][way] <= 1
    latency = report["latency_ms"]
    # a random model's window texts rarely share a word with a question; a question that finds nothing is
    # answered without the model, so it is not timed (None when no question finds a window)
    assert latency["one_window_directly"] > 0 and (latency["library"] is None or latency["library"] > 0)
    assert len(latency["library_by_size"]) == 1
    assert 0 <= report["retrieval"]["min_coverage=0.6"]["speech_recall@5"] <= 1
    assert latency["synthetic_windows_added"] == library_bench.HOP_WINDOWS_PER_HOUR * 2
    again = subprocess.run([sys.executable, "-m", "benchmarks.library_bench", "--set", str(out), "--library",
                            str(tmp_path / "work" / "library.sqlite"), "--recordings", "2"], check=True,
                           capture_output=True, text=True, timeout=600, cwd=ROOT,
                           env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    assert json.loads(again.stdout)["retrieval"] == report["retrieval"]  # the same library searched again


def test_on_perfect_transcripts_the_search_finds_the_facts_and_nothing_for_unasked_projects(tmp_path):
    """benchmarks/library_oracle on a small set: with every window's text right, the planted windows are found
    and questions about projects no recording names find nothing at MIN_COVERAGE, while without the coverage
    rule every one of them finds some window (which a model would answer by inventing)."""
    from benchmarks.library_oracle import measure
    from eardrum.inference.library import MIN_COVERAGE

    report = measure(recordings=4, seed=0, work=tmp_path)["by_min_coverage"]
    kept, bare = report[str(MIN_COVERAGE)], report["0.0"]
    assert kept["questions"] == {"speech": 12, "sounds": 9, "unanswerable": 30}
    assert kept["speech_recall@5"] >= 0.9 and kept["sounds_recall@5"] >= bare["sounds_recall@5"]
    assert kept["unanswerable_finding_a_window"] == 0.0 and bare["unanswerable_finding_a_window"] == 1.0

