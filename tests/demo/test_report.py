"""The demo's report: several runs side by side with their mean, written into the README between markers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from eardrum.cli.main import main
from eardrum.demo.report import README_END, README_START, ReportError, format_report, report

ROOT = Path(__file__).resolve().parents[2]


def run(seed: int, wer: float, audio: float, invented: float) -> dict:
    return {"seed": seed, "asr": {"wer": wer, "whisper_wer": 0.1},
            "qa": {"audio": audio, "text": 0.5, "gap": 0.5 - audio, "text_shipped_llm": 0.5},
            "captions": {"procedural_count_accuracy": 0.9, "procedural_order_accuracy": 0.7, "animal_accuracy": 1.0},
            "no_speech": {"invented_rate": invented}, "asr_by_voice": {"v1": {"wer": wer, "whisper_wer": 0.1}},
            "real_speech": {"wer": 2 * wer, "whisper_wer": 0.2, "wer_over_whisper": 10 * wer,
                            "no_transcript_share": invented},
            "seconds": 1800.0}


def cells(table: str) -> dict[str, list[str]]:
    return {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]] for line in table.splitlines()}


def test_report_shows_each_run_and_the_mean_and_judges_the_mean():
    rows = cells(format_report([run(0, 0.10, 0.40, 0.0), run(1, 0.13, 0.46, 0.10)], ["seed 0", "seed 1"]))
    assert rows["measure"] == ["mean", "seed 0", "seed 1", "target", ""]
    assert rows["WER, held-out speech (numbers spelt out on both sides)"] == ["11.5 %", "10.0 %", "13.0 %", "", ""]
    assert rows["WER / Whisper's WER"] == ["1.15", "1.00", "1.30", "<= 1.2", "met"]
    assert rows["spoken QA audio / text of the LLM as shipped"] == ["0.86", "0.80", "0.92", ">= 0.85", "met"]
    assert rows["clips without speech: an invented transcript"] == ["5.0 %", "0.0 %", "10.0 %", "<= 5 %", "met"]
    assert rows["WER, v1"] == ["11.5 %", "10.0 %", "13.0 %", "", ""]
    assert rows["procedural sounds: order right"][-2:] == ["", ""]  # no target, no verdict
    assert rows["real speech: WER / Whisper's WER"] == ["1.15", "1.00", "1.30", "<= 1.5", "met"]
    assert rows["real speech: asked to transcribe, no transcript given"] == ["5.0 %", "0.0 %", "10.0 %", "0 %",
                                                                             "not met"]
    whole_run = ["30.0 min", "30.0 min", "30.0 min", "<= 35 min", "met"]
    assert rows["whole run (data, both stages, evaluation)"] == whole_run
    worse = cells(format_report([run(0, 0.2, 0.1, 0.5)], ["seed 0"]))
    assert worse["WER / Whisper's WER"][-1] == "not met"
    assert worse["spoken QA, contains the answer (audio)"] == ["10.0 %", "10.0 %", "", ""]
    partial = cells(format_report([run(0, 0.1, 0.4, 0.0), {**run(1, 0.1, 0.4, 0.0), "no_speech": {}}], ["a", "b"]))
    assert partial["clips without speech: an invented transcript"] == ["n/a", "0.0 %", "n/a", "<= 5 %", ""]


def test_report_is_written_between_the_readme_markers_and_bad_input_is_named(tmp_path):
    paths = []
    for seed in (0, 1):
        (tmp_path / f"s{seed}").mkdir()
        (tmp_path / f"s{seed}" / "results.json").write_text(json.dumps(run(seed, 0.1 + seed / 100, 0.4, 0.0)))
        paths.append(tmp_path / f"s{seed}")
    readme = tmp_path / "README.md"
    readme.write_text(f"# title\n\nbefore\n{README_START}\nold table\n{README_END}\nafter\n")
    args = ["demo", "--report", str(paths[0]), str(paths[1] / "results.json"), "--readme", str(readme)]
    assert main(args) == 0
    text = readme.read_text()
    assert text.startswith("# title\n\nbefore\n") and text.endswith(f"{README_END}\nafter\n")
    assert "old table" not in text
    assert "| mean " in text and "seed 0" in text and "seed 1" in text and str(paths[0]) in text
    with pytest.raises(ReportError, match="README2.md: expected the markers"):
        (tmp_path / "README2.md").write_text("no markers")
        report(paths, readme=tmp_path / "README2.md")
    (tmp_path / "bad.json").write_text("[1, 2]")
    with pytest.raises(ReportError, match=r"bad\.json: not a demo results file"):
        report([tmp_path / "bad.json"])
    with pytest.raises(ReportError, match=r"missing\.json: cannot read"):
        report([tmp_path / "missing.json"])
    assert main(["demo", "--readme", str(readme)]) == 2  # --readme without --report


def test_the_readme_table_is_the_report_of_the_results_files_it_names():
    import re
    from pathlib import Path

    from eardrum.demo.report import README_END, README_START, report

    root = Path(__file__).resolve().parents[2]
    text = (root / "README.md").read_text()
    start, end = text.find(README_START), text.find(README_END)
    assert 0 <= start < end, "the README lost its demo-results markers"
    block = text[start + len(README_START):end].strip()
    named = re.search(r"\(From (.+)\.\)$", block)
    assert named, "the block must end by naming its results files"
    files = re.findall(r"`([^`]+)`", named.group(1))
    assert files and all((root / f).is_file() for f in files), files
    table = block[: named.start()].strip()
    again = "regenerate it with `eardrum demo --report FILES --readme README.md`"
    assert table == report([root / f for f in files]), again
