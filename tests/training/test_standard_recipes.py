"""The recipes for the standard corpora check, and train end to end on local datasets laid out as their Hub
repositories are (the same configurations, splits and columns), with tiny bases in place of the real ones."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import soxr

from eardrum.cli.main import main
from eardrum.common.records import DataSource, load_records
from eardrum.training.recipe import load_recipe
from eardrum.training.trainer import train

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "tests" / "assets" / "tiny_data"
RECIPES = ("librispeech_asr", "audiocaps_caption", "voiceassistant_stage2")

pytest.importorskip("datasets")


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_checks(name, capsys):
    assert main(["train", name, "--check"]) == 0  # `eardrum train NAME --check`
    assert capsys.readouterr().out == f"{name}: OK\n"


def wav_bytes(path: Path, rate: int = 16000) -> bytes:
    wave, sr = sf.read(path, dtype="float32")
    if rate != sr:
        wave = soxr.resample(wave, sr, rate)
    out = io.BytesIO()
    sf.write(out, wave, rate, format="WAV")
    return out.getvalue()


def hub_repo(root: Path, configs: dict[str, dict[str, list[dict]]]) -> Path:
    """A dataset folder as a Hub dataset repository lays it out: parquet shards per configuration and split,
    listed in the card's `configs`."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    card = ["---", "configs:"]
    for config, splits in configs.items():
        card += [f"- config_name: {config}", "  data_files:"]
        for split, rows in splits.items():
            folder = root / config / split
            folder.mkdir(parents=True)
            pq.write_table(pa.Table.from_pylist(rows), folder / "shard-00000.parquet")
            card += [f"  - split: {split}", f"    path: {config}/{split}/*.parquet"]
    (root / "README.md").write_text("\n".join([*card, "---", ""]))
    return root


def rows(name: str) -> list[dict]:
    return [json.loads(line) for line in (DATA / name).read_text().splitlines()]


@pytest.fixture(scope="module")
def corpora(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("corpora")

    def librispeech(records):
        return [{"file": r["audio"], "audio": {"bytes": wav_bytes(DATA / r["audio"]), "path": r["audio"]},
                 "text": r["answer"].upper(), "speaker_id": 19, "chapter_id": 198, "id": f"19-198-{k:04d}"}
                for k, r in enumerate(records)]

    qa = rows("qa.jsonl")
    librispeech_repo = hub_repo(root / "librispeech_asr", {
        "clean": {"train.100": librispeech(qa[:4]), "train.360": librispeech(qa[4:8]),
                  "validation": librispeech(qa[8:])},
        "other": {"train.500": librispeech(qa[:6])},
    })
    captions = [{"audiocap_id": k, "youtube_id": f"yt{k}", "start_time": 30,
                 "audio": {"bytes": wav_bytes(DATA / r["audio"], 48000), "path": f"{k}.wav"}, "caption": r["text"]}
                for k, r in enumerate(rows("caption.jsonl") + rows("eval.jsonl"))]
    audiocaps_repo = hub_repo(root / "AudioCaps", {"default": {"train": captions[:12], "validation": captions[12:]}})
    requests = [{"split_name": "identity", "index": str(k), "round": "0", "question": r["question"],
                 "question_audio": {"bytes": wav_bytes(DATA / r["audio"]), "path": f"{k}.wav"}, "answer": r["answer"],
                 "answer_snac": "0 0 0"} for k, r in enumerate(qa)]
    voiceassistant_repo = hub_repo(root / "VoiceAssistant-400K", {"default": {"train": requests}})
    return {"openslr/librispeech_asr": librispeech_repo, "jp1924/AudioCaps": audiocaps_repo,
            "gpt-omni/VoiceAssistant-400K": voiceassistant_repo}


def local(name: str, corpora: dict[str, Path], tmp_path: Path, *overrides: str):
    """The recipe with each Hub dataset replaced by its local copy (configuration, split and columns kept)."""
    recipe = load_recipe(name, [f"output_dir={tmp_path / name}"])
    moved = [f"data.{part}.{k}.dataset={corpora[s['dataset']]}" for part in ("train", "eval")
             for k, s in enumerate(getattr(recipe.data, part))]
    return load_recipe(name, [f"output_dir={tmp_path / name}", "model.encoder=tiny:whisper", "model.llm=tiny:llama",
                              "train.max_steps=2", 'train.mixed_precision="no"', "train.eval_generate_limit=2",
                              "train.eval_max_new_tokens=3", *moved, *overrides])


def test_the_recipes_train_end_to_end_on_local_copies_of_their_corpora(corpora, tmp_path):
    first = train(local("librispeech_asr", corpora, tmp_path))
    assert first["steps"] == 2 and {"loss", "wer"} <= set(first["eval"])
    captions = train(local("audiocaps_caption", corpora, tmp_path))
    assert captions["steps"] == 2 and {"loss", "caption_bleu"} <= set(captions["eval"])
    second = train(local("voiceassistant_stage2", corpora, tmp_path, f"train.init_from={first['final']}"))
    assert second["steps"] == 2 and "wer" in second["eval"]


def test_spoken_instructions_read_as_qa_with_the_request_as_transcript(corpora, tmp_path):
    recipe = local("voiceassistant_stage2", corpora, tmp_path)
    records, problems = load_records([DataSource.from_dict({**recipe.data.train[0], "streaming": False})])
    assert problems == [] and len(records) == 12
    first = records[0]
    assert first.task == "qa" and first.fields["question"] == "Respond to the request in the recording."
    assert first.fields["transcript"] == rows("qa.jsonl")[0]["question"]
    assert first.fields["answer"] == rows("qa.jsonl")[0]["answer"]
    audiocaps = load_records([DataSource.from_dict(local("audiocaps_caption", corpora, tmp_path).data.eval[0])])[0]
    assert len(audiocaps) == 4 and audiocaps[0].task == "caption"
    assert audiocaps[0].num_samples == pytest.approx(sf.info(DATA / "clips" / "sound0_v3.wav").frames, abs=2)
    assert np.isfinite(audiocaps[0].num_samples)
