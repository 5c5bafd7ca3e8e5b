"""Manifests and datasets -> checked records -> conversations; every bad record reported at once."""

from __future__ import annotations

import io
import json
import os
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from conftest import build_tokenizer, whisper_feature_extractor
from eardrum.adapters.audio import load_audio
from eardrum.adapters.config import AudioLLMConfig
from eardrum.adapters.encoders import AudioFeaturizer, FrameSpec
from eardrum.adapters.processor import AudioProcessor
from eardrum.common.records import (
    DEFAULT_PROMPTS,
    DataError,
    DataProblem,
    DataSource,
    Record,
    build_conversation,
    load_records,
    mix_indices,
    write_problems,
)


def wav(path: Path, frames: int, rate: int = 16000) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, np.full(frames, 0.25, dtype=np.float32), rate)
    return path


def manifest(path: Path, lines: list) -> Path:
    """Write a JSONL manifest; a str is written as the raw line, anything else as JSON."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


def load_one(path: Path, **kwargs) -> Record:
    records, problems = load_records([DataSource(path=str(path), **kwargs)])
    assert problems == []
    assert len(records) == 1
    return records[0]


def test_transcription_line_is_an_asr_record(tmp_path):
    wav(tmp_path / "clips" / "a.wav", 8000)
    m = manifest(tmp_path / "train.jsonl", [{"audio": "clips/a.wav", "text": "hello there"}])
    audio = str(tmp_path / "clips" / "a.wav")
    assert load_one(m) == Record(
        f"{m} line 1", "train.jsonl", "asr", {"audio": audio, "text": "hello there"}, 8000, (8000,)
    )
    assert build_conversation(load_one(m), {"asr": ["Transcribe."]}, seed=0) == [
        {"role": "user", "content": [{"type": "audio", "audio": audio}, {"type": "text", "text": "Transcribe."}]},
        {"role": "assistant", "content": "hello there"},
    ]


def test_caption_task_comes_from_the_line_or_the_source(tmp_path):
    wav(tmp_path / "a.wav", 1600)
    m = manifest(tmp_path / "m.jsonl", [{"audio": "a.wav", "text": "a dog barks", "task": "caption"}])
    record = load_one(m)
    assert (record.task, record.fields) == ("caption", {"audio": str(tmp_path / "a.wav"), "text": "a dog barks"})
    assert build_conversation(record, {"caption": ["Describe."]}, seed=3)[0]["content"][1]["text"] == "Describe."

    m2 = manifest(
        tmp_path / "m2.jsonl", [{"audio": "a.wav", "text": "rain"}, {"audio": "a.wav", "text": "x", "task": "asr"}]
    )
    records, problems = load_records([DataSource(path=str(m2), task="caption")])
    assert [r.task for r in records] == ["caption"]
    assert problems == [DataProblem(f"{m2} line 2", "field 'task': 'asr', but the source forces task 'caption'")]


def test_question_answer_line_is_a_qa_record(tmp_path):
    wav(tmp_path / "a.wav", 1600)
    m = manifest(tmp_path / "qa.jsonl", [{"audio": "a.wav", "question": "Who speaks?", "answer": "A child."}])
    record = load_one(m)
    audio = str(tmp_path / "a.wav")
    assert (record.task, record.fields) == ("qa", {"audio": audio, "question": "Who speaks?", "answer": "A child."})
    assert build_conversation(record, {}, seed=0) == [
        {"role": "user", "content": [{"type": "audio", "audio": audio}, {"type": "text", "text": "Who speaks?"}]},
        {"role": "assistant", "content": "A child."},
    ]


def test_conversation_line_resolves_every_audio_part(tmp_path):
    wav(tmp_path / "clips" / "a.wav", 1600)
    b = wav(tmp_path / "other" / "b.wav", 4800)
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "audio", "audio": "clips/a.wav"}, {"type": "text", "text": "What?"}]},
        {"role": "assistant", "content": "A tone."},
        {"role": "user", "content": [{"type": "audio", "audio": str(b)}, {"type": "text", "text": "And now?"}]},
        {"role": "assistant", "content": "Another."},
    ]
    record = load_one(manifest(tmp_path / "chat.jsonl", [{"messages": messages}]))
    assert (record.task, record.num_samples, record.clip_samples) == ("chat", 6400, (1600, 4800))
    resolved = [dict(m) for m in messages]
    a_part = {"type": "audio", "audio": str(tmp_path / "clips" / "a.wav")}
    resolved[1] = {"role": "user", "content": [a_part, {"type": "text", "text": "What?"}]}
    assert record.fields == {"messages": resolved}
    assert build_conversation(record, DEFAULT_PROMPTS, seed=0) == resolved


def test_conversations_feed_the_processor_with_the_audio_token_counts_the_records_predict(tmp_path):
    spec = FrameSpec("whisper", ((3, 1, 1), (3, 2, 1)), 480000, 32, 2)
    config = AudioLLMConfig(encoder="e", llm="l", window_seconds=1.0)  # 1 s windows: the 2.5 s clip spans three
    proc = AudioProcessor(build_tokenizer("chatml"), AudioFeaturizer(whisper_feature_extractor(), spec), config)
    wav(tmp_path / "a.wav", 40000, 16000)
    wav(tmp_path / "b.wav", 7001, 22050)
    two_clips = [
        {"role": "user", "content": [{"type": "audio", "audio": "a.wav"}, {"type": "audio", "audio": "b.wav"}]},
        {"role": "assistant", "content": "two"},
    ]
    lines = [
        {"audio": "b.wav", "text": "t"},
        {"audio": "a.wav", "question": "q", "answer": "a"},
        {"messages": two_clips},
    ]
    records, problems = load_records([DataSource(path=str(manifest(tmp_path / "m.jsonl", lines)))])
    assert problems == [] and [r.clip_samples for r in records] == [(5080,), (40000,), (40000, 5080)]
    for record in records:
        batch = proc(build_conversation(record, DEFAULT_PROMPTS, seed=0))
        found = int((batch["input_ids"] == proc.placeholder_id).sum())
        assert found == sum(proc.clip_num_tokens(n) for n in record.clip_samples)


def test_relative_paths_resolve_against_the_manifest_folder_not_the_working_directory(tmp_path, monkeypatch):
    wav(tmp_path / "data" / "clips" / "a.wav", 1600)
    manifest(tmp_path / "data" / "lists" / "m.jsonl", [{"audio": "../clips/a.wav", "text": "hi"}])
    monkeypatch.chdir(tmp_path)
    record = load_one(Path("data/lists/m.jsonl"))
    assert record.where == os.path.join("data", "lists", "m.jsonl") + " line 1"
    assert record.fields["audio"] == str(tmp_path / "data" / "clips" / "a.wav")


def test_num_samples_is_the_length_load_audio_gives_at_16k(tmp_path):
    lines = []
    for rate, frames in ((44100, 44101), (22050, 1001), (8000, 333), (48000, 7)):
        wav(tmp_path / f"r{rate}.wav", frames, rate)
        lines.append({"audio": f"r{rate}.wav", "text": "x"})
    records, problems = load_records([DataSource(path=str(manifest(tmp_path / "m.jsonl", lines)))])
    assert problems == []
    assert [r.num_samples for r in records] == [len(load_audio(r.fields["audio"])) for r in records]
    assert [r.num_samples for r in records] == [16000, 726, 666, 2]


def test_columns_map_manifest_keys(tmp_path):
    wav(tmp_path / "a.wav", 1600)
    m = manifest(tmp_path / "m.jsonl", [{"wav": "a.wav", "transcript": "hi", "text": "ignored"}])
    record = load_one(m, columns={"audio": "wav", "text": "transcript"})
    assert record.fields == {"audio": str(tmp_path / "a.wav"), "text": "hi"}


BAD_LINES = {  # line number -> (line, a piece of the message that names the field and what was expected)
    2: ("{not json", "not valid JSON"),
    3: ("[1, 2]", "expected a JSON object, got list"),
    4: ({"audio": "a.wav"}, "cannot tell the kind of record from its fields ['audio']"),
    5: ({"audio": "a.wav", "question": "Why?"}, "field 'answer' is missing; qa records need audio, question, answer"),
    6: ({"audio": "a.wav", "text": "x", "task": "translate"}, "field 'task': unknown task 'translate'"),
    7: ({"audio": "a.wav", "text": "   "}, "field 'text': expected non-empty text, got str '   '"),
    8: ({"audio": "a.wav", "question": "", "answer": "yes"}, "field 'question': expected non-empty text"),
    9: ({"audio": "a.wav", "question": "q", "answer": "\n"}, "field 'answer': expected non-empty text"),
    10: ({"audio": "missing.wav", "text": "x"}, "field 'audio': no such file {tmp}/missing.wav"),
    11: ({"audio": "garbage.wav", "text": "x"}, "field 'audio': soundfile cannot open {tmp}/garbage.wav"),
    12: ({"audio": "empty.wav", "text": "x"}, "field 'audio': {tmp}/empty.wav has zero length"),
    13: ({"audio": "long.wav", "text": "x"}, "field 'audio': {tmp}/long.wav is 3.00 s long, over max_audio_seconds=2"),
    14: ({"messages": [{"role": "user", "content": "hi"}]}, "field 'messages': no assistant message"),
    15: (
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": " "}]},
        "field 'messages': every assistant message is empty",
    ),
    16: ({"messages": "hello"}, "field 'messages': expected a non-empty list of messages, got str"),
    17: ({"messages": [{"role": "robot", "content": "x"}]}, "field 'messages', message 0: role 'robot'; expected one"),
    18: ({"audio": "a.wav", "text": "x", "messages": []}, "fields ['audio', 'text', 'messages'] mix kinds of record"),
    20: (
        {"messages": [{"role": "user", "content": [{"type": "audio", "audio": "nope.wav"}]}]},
        "field 'messages', message 0, part 0: no such file {tmp}/nope.wav",
    ),
    21: (
        {"messages": [{"role": "user", "content": [{"type": "video"}]}, {"role": "assistant", "content": "ok"}]},
        "field 'messages', message 0, part 0: expected {'type': 'text', 'text': str} or",
    ),
    22: ({"audio": "a.wav", "text": 7}, "field 'text': expected non-empty text, got int 7"),
}


def test_every_bad_record_is_reported_in_one_call_and_good_ones_still_load(tmp_path):
    wav(tmp_path / "a.wav", 1600)
    wav(tmp_path / "empty.wav", 0)
    wav(tmp_path / "long.wav", 48000)
    (tmp_path / "garbage.wav").write_bytes(b"this is not a sound file")
    good = {1: {"audio": "a.wav", "text": "fine"}, 23: {"audio": "a.wav", "question": "q", "answer": "a"}}
    lines = {**{n: line for n, (line, _) in BAD_LINES.items()}, **good, 19: ""}
    m = manifest(tmp_path / "mixed.jsonl", [lines[n] for n in range(1, 24)])
    records, problems = load_records([DataSource(path=str(m))], max_audio_seconds=2)
    assert [r.where for r in records] == [f"{m} line 1", f"{m} line 23"]
    assert [p.where for p in problems] == [f"{m} line {n}" for n in sorted(BAD_LINES)]
    for (_, expected), problem in zip(BAD_LINES.values(), problems):
        assert expected.replace("{tmp}", str(tmp_path)) in problem.message
    # Every problem of a record is listed, not just the first.
    both = manifest(tmp_path / "both.jsonl", [{"audio": "missing.wav", "text": ""}])
    assert load_records([DataSource(path=str(both))])[1][0].message == (
        f"field 'audio': no such file {tmp_path}/missing.wav; field 'text': expected non-empty text, got str ''"
    )


def test_label_mode_decides_which_conversations_have_nothing_to_learn(tmp_path):
    wav(tmp_path / "a.wav", 1600)
    ends_empty = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "and?"},
        {"role": "assistant", "content": ""},
    ]
    m = manifest(tmp_path / "m.jsonl", [{"messages": ends_empty}])
    assert len(load_records([DataSource(path=str(m))], label_mode="all_assistant")[0]) == 1
    _, problems = load_records([DataSource(path=str(m))], label_mode="last_assistant")
    assert problems == [
        DataProblem(
            f"{m} line 1",
            "field 'messages': the last assistant message (message 3) is empty; "
            "with label_mode 'last_assistant' no token would carry loss",
        )
    ]
    _, problems = load_records([DataSource(path=str(m))], label_mode="after_audio")
    assert problems[0].message == "field 'messages': label_mode 'after_audio' needs an audio part; found none"


def _wav_bytes(frames: int, rate: int = 16000) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, np.linspace(-0.5, 0.5, frames, dtype=np.float32), rate, format="WAV")
    return buf.getvalue()


def test_local_datasets_with_paths_bytes_and_arrays(tmp_path):
    datasets = pytest.importorskip("datasets")
    a = wav(tmp_path / "a.wav", 3200)
    blob = _wav_bytes(800, 8000)
    datasets.Dataset.from_dict({"file": [str(a)], "sentence": ["one"], "speaker": ["s1"]}).save_to_disk(
        tmp_path / "paths"
    )
    with_bytes = datasets.Dataset.from_dict({"file": [{"bytes": blob, "path": "b.wav"}], "sentence": ["two"]})
    with_bytes.cast_column("file", datasets.Audio()).save_to_disk(tmp_path / "bytes")
    arrays = {"audio": [{"array": [0.1] * 480, "sampling_rate": 48000}], "question": ["q"], "answer": ["a"]}
    datasets.DatasetDict({"validation": datasets.Dataset.from_dict(arrays)}).save_to_disk(tmp_path / "arrays")

    cols = {"audio": "file", "text": "sentence"}
    sources = [
        DataSource(dataset=str(tmp_path / "paths"), columns=cols),
        DataSource(dataset=str(tmp_path / "bytes"), columns=cols, task="caption"),
        DataSource(dataset=str(tmp_path / "arrays"), split="validation"),
    ]
    records, problems = load_records(sources)
    assert problems == []
    assert [(r.where, r.source, r.task, r.num_samples) for r in records] == [
        ("dataset paths[0]", "paths", "asr", 3200),
        ("dataset bytes[0]", "bytes", "caption", 1600),
        ("dataset arrays[0]", "arrays", "qa", 160),
    ]
    assert records[0].fields == {"audio": str(a), "text": "one"}
    assert records[1].fields == {"audio": {"bytes": blob, "path": "b.wav"}, "text": "two"}
    assert records[2].fields == {**{k: v[0] for k, v in arrays.items()}}
    # The kept dicts are what our own loader decodes.
    assert np.array_equal(load_audio(records[1].fields["audio"]), load_audio(blob))
    assert len(load_audio(records[2].fields["audio"])) == 160


def test_sources_that_cannot_be_opened_raise_at_once_all_together(tmp_path):
    pytest.importorskip("datasets")
    sources = [DataSource(path=str(tmp_path / "gone.jsonl")), DataSource(dataset=str(tmp_path / "no_such_dataset"))]
    with pytest.raises(DataError) as info:
        load_records(sources)
    assert [p.where for p in info.value.problems] == [
        str(tmp_path / "gone.jsonl"),
        f"dataset {tmp_path}/no_such_dataset",
    ]
    assert info.value.problems[0].message == f"cannot open the manifest: no such file ({tmp_path}/gone.jsonl)"
    assert info.value.problems[1].message.startswith("cannot load it (")


def test_a_dataset_column_mapping_to_a_missing_column_is_an_error(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"file": ["x.wav"], "sentence": ["hi"]}).save_to_disk(tmp_path / "ds")
    with pytest.raises(DataError) as info:
        load_records([DataSource(dataset=str(tmp_path / "ds"), columns={"audio": "path", "text": "sentence"})])
    assert info.value.problems == [
        DataProblem("dataset ds", "columns: {'audio': 'path'} not found; the dataset has columns ['file', 'sentence']")
    ]


def test_source_settings_are_checked_and_name_the_field():
    assert DataSource(path="a.jsonl").problems() == []
    assert DataSource().problems() == ["path / dataset: expected exactly one, got path=None, dataset=None"]
    assert DataSource(path="a", dataset="b", weight=0, task="x", columns={"sound": "a"}).problems() == [
        "path / dataset: expected exactly one, got path='a', dataset='b'",
        "weight: expected a positive number, got 0",
        "task: expected one of asr, caption, qa, chat or null, got 'x'",
        "columns: expected keys among audio, text, question, answer, messages, transcript, task with column names "
        "as values, "
        "got {'sound': 'a'}",
    ]
    with pytest.raises(DataError, match=r"unknown keys \['wieght'\]; known keys are \['path', 'dataset'"):
        DataSource.from_dict({"path": "a.jsonl", "wieght": 2})
    assert DataSource.from_dict({"path": "x/a.jsonl", "weight": 2}) == DataSource(path="x/a.jsonl", weight=2)
    with pytest.raises(DataError) as info:
        load_records([DataSource(path="x/a.jsonl", weight=-1), DataSource(path="y/a.jsonl")])
    assert info.value.problems == [
        DataProblem("data source 0 (a.jsonl)", "weight: expected a positive number, got -1"),
        DataProblem("data source 0 (a.jsonl)", "name: another source has the same label; set a distinct 'name'"),
        DataProblem("data source 1 (a.jsonl)", "name: another source has the same label; set a distinct 'name'"),
    ]


def test_data_error_lists_the_first_50_problems_then_a_count():
    err = DataError([DataProblem(f"m.jsonl line {i}", "bad") for i in range(1, 54)])
    lines = str(err).splitlines()
    assert lines[0] == "53 data problem(s):"
    assert lines[1] == "  - m.jsonl line 1: bad"
    assert lines[50] == "  - m.jsonl line 50: bad"
    assert lines[51:] == ["  ... and 3 more"]
    assert len(err.problems) == 53
    assert str(DataError([], message="no usable training example")) == "no usable training example"


def test_write_problems_writes_jsonl(tmp_path):
    problems = [DataProblem("m.jsonl line 2", "field 'text': empty"), DataProblem("dataset d[0]", "é")]
    write_problems(problems, tmp_path / "out" / "bad.jsonl")
    lines = (tmp_path / "out" / "bad.jsonl").read_text(encoding="utf-8").splitlines()
    assert [json.loads(x) for x in lines] == [{"where": p.where, "message": p.message} for p in problems]


def _records(counts: dict[str, int], task: str = "asr") -> list[Record]:
    return [
        Record(f"{name}.jsonl line {i}", name, task, {"audio": "/x.wav", "text": "t"}, 16000)
        for name, n in counts.items()
        for i in range(1, n + 1)
    ]


def test_prompt_choice_is_deterministic_per_record_and_varies_across_records():
    records = _records({"m": 40})

    def prompts(seed: int) -> list[str]:
        return [build_conversation(r, DEFAULT_PROMPTS, seed)[0]["content"][1]["text"] for r in records]

    assert prompts(0) == prompts(0)
    assert set(prompts(0)) == set(DEFAULT_PROMPTS["asr"])
    assert prompts(0) != prompts(1)
    with pytest.raises(ValueError, match=r"prompts\['caption'\]: expected a non-empty list"):
        build_conversation(_records({"m": 1}, "caption")[0], {"asr": ["x"]}, 0)


def test_mix_indices_takes_round_weight_times_size_from_each_source():
    records = _records({"a": 10, "b": 6, "c": 8, "d": 4})
    weights = {"a": 1.0, "b": 2.0, "c": 0.5, "d": 1.5}
    order = mix_indices(records, weights, seed=0, epoch=0)
    counts = Counter(order)
    by_source = Counter(records[i].source for i in order)
    assert by_source == {"a": 10, "b": 12, "c": 4, "d": 6}
    assert all(counts[i] == 1 for i in range(10)) and all(counts[i] == 2 for i in range(10, 16))
    assert sorted(counts[i] for i in range(16, 24)) == [0] * 4 + [1] * 4
    assert sorted(counts[i] for i in range(24, 28)) == [1, 1, 2, 2]
    assert order == mix_indices(records, weights, seed=0, epoch=0)
    assert order != sorted(order)
    halves = [{i for i in mix_indices(records, weights, 0, e) if records[i].source == "c"} for e in range(3)]
    assert len({frozenset(h) for h in halves}) == 3
    with pytest.raises(ValueError, match=r"weights: no weight for source 'd'"):
        mix_indices(records, {"a": 1, "b": 1, "c": 1}, 0, 0)
