"""The CTC loss that aligns a clip's audio tokens with the LLM's token embeddings (`train.ctc_weight`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from eardrum.adapters.checkpoint import build_audio_llm
from eardrum.adapters.config import AudioLLMConfig, ConfigError
from eardrum.common.records import DEFAULT_PROMPTS, DataSource, load_records
from eardrum.training.collate import Collator, model_inputs
from eardrum.training.recipe import load_recipe
from eardrum.training.trainer import train

ROOT = Path(__file__).resolve().parents[2]
CLIPS = ROOT / "tests" / "assets" / "tiny_data" / "clips"


@pytest.fixture(scope="module")
def built():
    torch.manual_seed(0)
    return build_audio_llm(AudioLLMConfig(encoder="tiny:whisper", llm="tiny:llama"))


def manifest(path: Path) -> Path:
    clips = sorted(CLIPS.glob("*.wav"))
    lines = [
        {"audio": str(clips[0]), "text": "two high beeps"},  # asr: its text is what is said
        {"audio": str(clips[1]), "text": "a low tone", "task": "caption"},  # a caption is not a transcript
        {"audio": str(clips[2]), "text": "There is no speech in this recording.", "transcript": ""},  # nothing said
        {"messages": [{"role": "user", "content": [{"type": "audio", "audio": str(clips[3])}]},
                      {"role": "assistant", "content": "Paris"}], "transcript": "what is the capital of france"},
    ]
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


def test_rows_with_a_known_transcript_get_its_tokens(built, tmp_path):
    _, processor = built
    records, problems = load_records([DataSource(path=str(manifest(tmp_path / "m.jsonl")))])
    assert not problems
    batch = Collator(processor, records, DEFAULT_PROMPTS, 0, ctc_blank=0)([0, 1, 2, 3])
    ctc = batch["ctc"]
    assert ctc["rows"].tolist() == [0, 2, 3] and ctc["blank"] == 0
    said = [processor.tokenizer("two high beeps", add_special_tokens=False)["input_ids"], [],
            processor.tokenizer("what is the capital of france", add_special_tokens=False)["input_ids"]]
    assert ctc["target_lengths"].tolist() == [len(x) for x in said]
    assert ctc["targets"].tolist() == [t for x in said for t in x]
    assert "ctc" not in Collator(processor, records, DEFAULT_PROMPTS, 0)([0, 1, 2, 3])
    assert "ctc" not in Collator(processor, records, DEFAULT_PROMPTS, 0, ctc_blank=0)([1])


def test_the_loss_is_torch_ctc_on_each_clips_own_audio_tokens_and_trains_only_the_projector(built, tmp_path):
    model, processor = built
    records, _ = load_records([DataSource(path=str(manifest(tmp_path / "m.jsonl")))])
    batch = model_inputs(Collator(processor, records, DEFAULT_PROMPTS, 0, ctc_blank=0)([0, 1, 2, 3]), model,
                         processor, None)
    batch.pop("example_ids"), batch.pop("bad")
    model.zero_grad()
    output = model(**batch)
    loss = output["ctc_loss"]
    # the same loss from each clip's audio tokens straight out of the projector
    tokens, lengths = model.encode_audio(batch["audio_features"], batch["audio_lengths"])  # (N_win, T, D), (N_win,)
    table = model.llm.get_input_embeddings().weight.float()
    ctc, rows = batch["ctc"], [0, 2, 3]  # one window per clip, in row order
    log_probs = (tokens[rows].float() @ table.T).log_softmax(-1).transpose(0, 1)
    want = torch.nn.functional.ctc_loss(log_probs, ctc["targets"], lengths[rows], ctc["target_lengths"], blank=0,
                                        reduction="mean", zero_infinity=True)
    assert torch.isfinite(loss) and loss.item() == pytest.approx(want.item(), rel=1e-5)
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.projector.parameters())
    table_grad = model.llm.get_input_embeddings().weight.grad
    assert table_grad is None or not table_grad.any()  # the vocabulary is the target, never moved by this loss


def test_a_run_with_ctc_lowers_it_and_the_weight_is_checked(tmp_path):
    with pytest.raises(ConfigError, match="train.ctc_weight: expected a number >= 0"):
        load_recipe(ROOT / "configs" / "tiny.yaml", ["train.ctc_weight=-1"])
    data = manifest(tmp_path / "m.jsonl")
    recipe = load_recipe(ROOT / "configs" / "tiny.yaml", [
        f"output_dir={tmp_path / 'run'}", f"cache.dir={tmp_path / 'cache'}", f"data.train=[{{path: {data}}}]",
        "data.eval=[]", "train.epochs=8", "train.save_every=null", "train.ctc_weight=1", "data.batch_size=4",
        "optim.lr=0.01",
    ])
    train(recipe)
    records = [r for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    losses, ctc = [r["loss"] for r in records], [r["ctc_loss"] for r in records]  # every step had a transcript
    assert losses[-1] < losses[0]
    assert ctc[-1] < ctc[0] and all(c < loss for c, loss in zip(ctc, losses))  # logged alone, and inside the loss
