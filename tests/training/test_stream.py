"""Streamed training data: local audiofolder and parquet datasets read streamed and not, rows checked as read,
sources mixed by weight, batches length-grouped within a buffer and shared between ranks, and a resumed run
that sees exactly the examples and losses of an uninterrupted one."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from eardrum.adapters.config import ConfigError
from eardrum.common.records import DataError, DataSource, RecordChecker, load_records, open_rows
from eardrum.training.recipe import load_recipe
from eardrum.training.stream import StreamedEpochs, StreamSettings, shuffled
from eardrum.training.trainer import train

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "tiny.yaml"
DATA = ROOT / "tests" / "assets" / "tiny_data"

pytest.importorskip("datasets")


def manifest_rows(name: str) -> list[dict]:
    return [json.loads(line) for line in (DATA / name).read_text().splitlines()]


@pytest.fixture(scope="module")
def local_datasets(tmp_path_factory) -> dict[str, Path]:
    """The tiny caption and QA data as an audiofolder (wav files + metadata.jsonl) and as parquet files with the
    audio inside (as Hub parquet shards hold it), plus a parquet file with one clip that is not audio."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = tmp_path_factory.mktemp("datasets")
    folder = root / "captions" / "train"
    folder.mkdir(parents=True)
    with (folder / "metadata.jsonl").open("w") as f:
        for row in manifest_rows("caption.jsonl"):
            shutil.copy(DATA / row["audio"], folder / Path(row["audio"]).name)
            f.write(json.dumps({"file_name": Path(row["audio"]).name, "text": row["text"], "task": "caption"}) + "\n")
    qa = manifest_rows("qa.jsonl")
    table = pa.table({
        "audio": [{"bytes": (DATA / r["audio"]).read_bytes(), "path": Path(r["audio"]).name} for r in qa],
        "query": [r["question"] for r in qa],
        "reply": [r["answer"] for r in qa],
    })
    (root / "qa").mkdir()
    pq.write_table(table.slice(0, 6), root / "qa" / "part-0.parquet")
    pq.write_table(table.slice(6), root / "qa" / "part-1.parquet")
    bad = table.slice(0, 3).to_pylist()
    bad[1]["audio"] = {"bytes": b"not audio at all", "path": "broken.wav"}
    pq.write_table(pa.Table.from_pylist(bad, schema=table.schema), root / "bad.parquet")
    return {"captions": root / "captions", "qa": root / "qa", "bad": root / "bad.parquet"}


def sources(local_datasets, streaming: bool) -> list[dict]:
    return [
        {"dataset": "audiofolder", "data_dir": str(local_datasets["captions"]), "streaming": streaming},
        {"dataset": "parquet", "data_files": str(local_datasets["qa"] / "*.parquet"), "streaming": streaming,
         "columns": {"question": "query", "answer": "reply"}, "name": "qa"},
    ]


@pytest.mark.parametrize("streaming", [False, True])
def test_local_datasets_read_as_the_manifests_they_came_from(local_datasets, streaming):
    records, problems = load_records([DataSource.from_dict(s) for s in sources(local_datasets, streaming)])
    assert problems == []
    expected = manifest_rows("caption.jsonl") + manifest_rows("qa.jsonl")
    assert len(records) == len(expected)
    assert [r.task for r in records] == ["caption"] * len(manifest_rows("caption.jsonl")) + ["qa"] * len(
        manifest_rows("qa.jsonl"))
    manifests = [DataSource(path=str(DATA / "caption.jsonl")), DataSource(path=str(DATA / "qa.jsonl"))]
    by_manifest = load_records(manifests)[0]
    assert [r.num_samples for r in records] == [r.num_samples for r in by_manifest]
    assert [r.fields.get("text") or r.fields["answer"] for r in records] == [
        r.fields.get("text") or r.fields["answer"] for r in by_manifest]
    assert records[0].source == "captions" and records[-1].source == "qa"


def test_audiofolder_and_dataset_settings_are_named(tmp_path, local_datasets):
    with pytest.raises(DataError, match="no metadata.jsonl, metadata.csv, metadata.parquet"):
        open_rows(DataSource(dataset="audiofolder", data_dir=str(tmp_path)))
    with pytest.raises(DataError, match="data_dir: an audiofolder source needs"):
        open_rows(DataSource(dataset="audiofolder"))
    problems = DataSource(path="x.jsonl", config="clean", streaming="yes").problems()
    assert "config: only for a `dataset` source; a manifest (path) has none" in problems
    assert "streaming: expected true or false, got 'yes'" in problems


def checker() -> RecordChecker:
    return RecordChecker(None, "all_assistant")


def test_shuffle_buffer_is_a_seeded_permutation():
    rows = list(range(100))
    one = list(shuffled(iter(rows), 10, np.random.default_rng(0)))
    assert sorted(one) == rows and one != rows
    assert one == list(shuffled(iter(rows), 10, np.random.default_rng(0)))
    assert list(shuffled(iter(rows), 1, np.random.default_rng(0))) == rows


def test_each_epoch_reads_every_row_once_in_length_grouped_batches_shared_by_ranks(local_datasets):
    given = [DataSource.from_dict(s) for s in sources(local_datasets, True)]
    settings = StreamSettings(batch_size=4, max_tokens=None, seed=3, shuffle_buffer=5, group_buffer=10)
    lengths = lambda records: [r.num_samples // 800 for r in records]  # noqa: E731 - longer clips, longer rows
    single = StreamedEpochs(given, checker(), lengths, settings)
    total = sum(1 for s in given for _ in open_rows(s))
    for epoch in (0, 1):
        batches = list(single.batches(epoch))
        wheres = [r.where for b in batches for r in b]
        assert len(wheres) == len(set(wheres)) == total
    assert [r.where for b in single.batches(0) for r in b] != [r.where for b in single.batches(1) for r in b]
    ranks = [list(StreamedEpochs(given, checker(), lengths, settings, 2, rank).batches(0)) for rank in (0, 1)]
    assert len(ranks[0]) == len(ranks[1])
    shared = Counter(r.where for batches in ranks for b in batches for r in b)
    assert set(shared) == {r.where for b in single.batches(0) for r in b} and set(shared.values()) == {1}


def test_sources_are_drawn_by_weight(local_datasets):
    specs = sources(local_datasets, True)
    specs[1]["weight"] = 4.0
    mixed = list(StreamedEpochs([DataSource.from_dict(s) for s in specs], checker(), lambda rs: [1] * len(rs),
                                StreamSettings(2, None, seed=0)).mixed(0))
    first = [r.source for r in mixed[:12]]
    assert first.count("qa") > first.count("captions")  # 12 QA rows against 12 captions: QA comes first
    assert Counter(r.source for r in mixed) == {"captions": 12, "qa": 12}


def test_a_bad_row_is_named_or_skipped_as_it_is_read(local_datasets):
    bad = DataSource(dataset="parquet", data_files=str(local_datasets["bad"]), streaming=True,
                     columns={"question": "query", "answer": "reply"})
    settings = StreamSettings(2, None)
    with pytest.raises(DataError, match=r"dataset parquet\[1\].*field 'audio'"):
        list(StreamedEpochs([bad], checker(), lambda rs: [1] * len(rs), settings).batches(0))
    skipped = []
    kept = list(StreamedEpochs([bad], checker(), lambda rs: [1] * len(rs), settings, skip_bad=True,
                               on_bad=skipped.extend).batches(0))
    assert sum(map(len, kept)) == 2 and [p.where for p in skipped] == ["dataset parquet[1]"]


def stream_recipe(tmp_path, local_datasets, *overrides):
    train_sources = json.dumps(sources(local_datasets, True))
    return load_recipe(TINY, [f"output_dir={tmp_path / 'run'}", f"data.train={train_sources}",
                              f"data.eval.0.path={DATA / 'eval.jsonl'}", "cache.enabled=false", "data.group_buffer=8",
                              "data.shuffle_buffer=4", "optim.scheduler=constant", "optim.warmup_steps=0",
                              "train.log_examples=true", "train.save_every=3", "train.eval_max_new_tokens=2",
                              *overrides])


def test_streaming_recipes_need_max_steps_and_no_feature_cache(tmp_path, local_datasets):
    with pytest.raises(ConfigError, match="train.max_steps: a streamed training source") as err:
        stream_recipe(tmp_path, local_datasets, "cache.enabled=true")
    assert "cache.enabled: the feature cache is filled from every example" in str(err.value)


def test_a_streamed_run_trains_and_resumes_exactly(tmp_path, local_datasets):
    whole = train(stream_recipe(tmp_path / "a", local_datasets, "train.max_steps=8"))
    assert whole["steps"] == 8
    train(stream_recipe(tmp_path / "b", local_datasets, "train.max_steps=3"))  # stopped at step 3 ...
    resumed = train(stream_recipe(tmp_path / "b", local_datasets, "train.max_steps=8", "train.resume_from=latest"))
    assert resumed["resumed_from"].endswith("step-00000003")

    def log(run: str, name: str) -> list[dict]:
        return [json.loads(x) for x in (tmp_path / run / "run" / name).read_text().splitlines()]

    seen = [(r["step"], r["examples"]) for r in log("a", "examples-rank0.jsonl")]
    assert [(r["step"], r["examples"]) for r in log("b", "examples-rank0.jsonl")] == seen
    assert [s for s, _ in seen] == list(range(1, 9))
    # 24 examples, batch 4: steps 1-6 are epoch 0 and hold each example once, steps 7-8 start epoch 1
    assert len({e for _, examples in seen[:6] for e in examples}) == 24
    losses = {run: [r["loss"] for r in log(run, "metrics.jsonl") if "loss" in r] for run in ("a", "b")}
    assert losses["b"] == pytest.approx(losses["a"], rel=1e-5, abs=1e-6)


def test_a_dataset_config_is_chosen_by_name(tmp_path, local_datasets):
    """A dataset folder laid out as a Hub dataset repository, with two configurations in its card (as
    librispeech_asr has clean and other)."""
    repo = tmp_path / "speech"
    for config, files in (("clean", ["part-0.parquet"]), ("other", ["part-1.parquet"])):
        (repo / config).mkdir(parents=True)
        for name in files:
            shutil.copy(local_datasets["qa"] / name, repo / config / name)
    (repo / "README.md").write_text("---\nconfigs:\n- config_name: clean\n  data_files:\n  - split: train\n"
                                    "    path: clean/*.parquet\n- config_name: other\n  data_files:\n"
                                    "  - split: train\n    path: other/*.parquet\n---\n")
    counts = {}
    for config in ("clean", "other"):
        for streaming in (False, True):
            source = DataSource(dataset=str(repo), config=config, streaming=streaming, name=config,
                                columns={"question": "query", "answer": "reply"})
            records, problems = load_records([source])
            assert problems == []
            counts[config, streaming] = [r.fields["question"] for r in records]
    qa = [r["question"] for r in manifest_rows("qa.jsonl")]
    assert counts["clean", False] == counts["clean", True] == qa[:6]
    assert counts["other", False] == counts["other", True] == qa[6:]
    with pytest.raises(DataError, match="cannot load it"):
        open_rows(DataSource(dataset=str(repo), config="noisy"))


def test_a_stream_with_no_usable_example_stops_instead_of_going_round(tmp_path, local_datasets):
    # read as transcription, no row has a text: every row is bad, and skipped
    only_bad = json.dumps([{"dataset": "parquet", "data_files": str(local_datasets["bad"]), "streaming": True,
                            "task": "asr"}])
    recipe = stream_recipe(tmp_path, local_datasets, f"data.train={only_bad}", "data.skip_bad=true",
                           "train.max_steps=5", "train.epochs=null")
    with pytest.raises(DataError, match="epoch 0: the streamed training sources gave no usable example"):
        train(recipe)
    listed = (tmp_path / "run" / "bad_examples_train.jsonl").read_text()
    assert listed.count("field 'text' is missing") == 3
