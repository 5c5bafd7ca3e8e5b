"""Text-teacher distillation: the KL loss, the collated teacher rows, the recipe section, a training run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from eardrum.adapters.checkpoint import build_audio_llm
from eardrum.adapters.config import AudioLLMConfig, ConfigError
from eardrum.common.records import DEFAULT_PROMPTS, DataSource, load_records
from eardrum.training.collate import Collator
from eardrum.training.distill import teacher_kl
from eardrum.training.lora import apply_llm_lora
from eardrum.training.recipe import LoraSettings, load_recipe
from eardrum.training.trainer import train

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "tests" / "assets" / "tiny_data"


@pytest.fixture(scope="module")
def built():
    torch.manual_seed(0)
    return build_audio_llm(AudioLLMConfig(encoder="tiny:whisper", llm="tiny:llama"))


def text_batch(processor, answers: list[str]) -> dict:
    convs = [[{"role": "user", "content": "how many beeps?"}, {"role": "assistant", "content": a}] for a in answers]
    return processor(convs, featurize=False)


def logits_of(model, batch: dict) -> torch.Tensor:
    with torch.no_grad():
        return model.llm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def test_kl_is_zero_against_the_teacher_itself_and_grows_with_disagreement(built):
    model, processor = built
    batch = text_batch(processor, ["three beeps", "one long beep and a tone"])
    logits = logits_of(model, batch)
    teacher = {**batch, "rows": torch.tensor([0, 1])}
    assert teacher_kl(model, logits, batch["labels"], teacher).item() == pytest.approx(0.0, abs=1e-6)
    torch.manual_seed(1)
    small = teacher_kl(model, logits + 0.1 * torch.randn_like(logits), batch["labels"], teacher).item()
    large = teacher_kl(model, logits + 2.0 * torch.randn_like(logits), batch["labels"], teacher).item()
    assert 0 < small < large


def test_only_the_rows_with_a_teacher_count(built):
    model, processor = built
    batch = text_batch(processor, ["three beeps", "a tone", "one beep"])
    logits = logits_of(model, batch)
    noisy = logits.clone()
    noisy[1] += 5.0 * torch.randn_like(noisy[1])  # row 1 has no teacher: its disagreement must not count
    sub = {k: v[[0, 2]] for k, v in batch.items()}
    teacher = {**sub, "rows": torch.tensor([0, 2])}
    assert teacher_kl(model, noisy, batch["labels"], teacher).item() == pytest.approx(0.0, abs=1e-6)


def test_student_logits_kept_at_labelled_positions_give_the_same_kl(built):
    model, processor = built
    batch = text_batch(processor, ["three beeps", "one long beep and a tone"])
    torch.manual_seed(2)
    logits = logits_of(model, batch) + 0.5 * torch.randn(1)
    teacher = {**batch, "rows": torch.tensor([0, 1])}
    full = teacher_kl(model, logits, batch["labels"], teacher)
    positions = (batch["labels"][:, 1:] != -100).any(0).nonzero().squeeze(1)
    kept = teacher_kl(model, logits[:, positions], batch["labels"], teacher, positions=positions)
    torch.testing.assert_close(kept, full, atol=1e-6, rtol=1e-6)


def test_the_teacher_is_the_llm_without_its_lora(tmp_path):
    torch.manual_seed(0)
    model, processor = build_audio_llm(AudioLLMConfig(encoder="tiny:whisper", llm="tiny:llama"))
    batch = text_batch(processor, ["three beeps"])
    base = logits_of(model, batch)
    apply_llm_lora(model, LoraSettings(enabled=True, r=4, alpha=8, dropout=0.0), quantized=False,
                   gradient_checkpointing=False)
    for name, p in model.llm.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)  # a trained adapter: the LLM now answers differently
    adapted = logits_of(model, batch)
    assert (adapted - base).abs().max() > 1e-2
    teacher = {**batch, "rows": torch.tensor([0])}
    assert teacher_kl(model, base, batch["labels"], teacher).item() == pytest.approx(0.0, abs=1e-6)
    assert teacher_kl(model, adapted, batch["labels"], teacher).item() > 1e-4


def test_a_different_answer_length_is_named(built):
    model, processor = built
    student = text_batch(processor, ["three beeps"])
    other = text_batch(processor, ["three beeps and then a long tone"])
    with pytest.raises(ValueError, match="labelled tokens per row differ"):
        teacher_kl(model, logits_of(model, student), student["labels"], {**other, "rows": torch.tensor([0])})


def distilled_manifest(path: Path, n: int = 8) -> Path:
    lines = []
    for k in range(n):
        clip = str(DATA / "clips" / f"sound{k % 3}_v{k % 4}.wav")
        user = [{"type": "audio", "audio": clip}, {"type": "text", "text": "Answer the question in the recording."}]
        line = {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": f"{k % 3 + 1} beeps"}]}
        if k % 4 != 3:  # every fourth line has no transcript: it trains on the answer alone
            line["transcript"] = f"how many beeps are there, number {k}?" if k != 6 else ""  # 6: nothing is said
        lines.append(line)
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


def test_the_collator_adds_text_twins_for_records_with_a_transcript(built, tmp_path):
    _, processor = built
    records, problems = load_records([DataSource(path=str(distilled_manifest(tmp_path / "d.jsonl")))])
    assert not problems
    batch = Collator(processor, records, DEFAULT_PROMPTS, 0, featurize=False, teacher=True)([0, 3, 5])
    teacher = batch["teacher"]
    assert teacher["rows"].tolist() == [0, 2]  # record 3 has no transcript
    assert teacher["input_ids"].shape[0] == 2 and "audio_windows" not in teacher
    text = processor.tokenizer.decode(teacher["input_ids"][0])
    assert "how many beeps are there, number 0?" in text and "Answer the question in the recording." in text
    want = (batch["labels"][[0, 2]] != -100).sum(1)
    assert torch.equal(want, (teacher["labels"] != -100).sum(1))
    plain = Collator(processor, records, DEFAULT_PROMPTS, 0, featurize=False)([0, 3, 5])
    assert "teacher" not in plain
    silent = Collator(processor, records, DEFAULT_PROMPTS, 0, featurize=False, teacher=True)([6, 1])
    assert silent["teacher"]["rows"].tolist() == [1]  # record 6 says nothing is spoken: no text to read


def test_transcripts_are_checked(tmp_path):
    clip = str(DATA / "clips" / "sound0_v0.wav")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        json.dumps({"audio": clip, "text": "one beep", "transcript": 3}) + "\n"
        + json.dumps({"messages": [{"role": "user", "content": [{"type": "audio", "audio": clip},
                                                                {"type": "audio", "audio": clip}]},
                                   {"role": "assistant", "content": "two"}], "transcript": "two clips"}) + "\n"
    )
    records, problems = load_records([DataSource(path=str(bad))])
    assert not records
    assert "line 1" in problems[0].where and "field 'transcript': expected text" in problems[0].message
    assert "line 2" in problems[1].where and "has 2 clips" in problems[1].message


def test_the_recipe_section_is_checked():
    with pytest.raises(ConfigError) as err:
        load_recipe(ROOT / "configs" / "tiny.yaml", ["distill.kl_weight=-1", "distill.temperature=0"])
    assert "distill.kl_weight: expected a number >= 0" in str(err.value)
    assert "distill.temperature: expected a positive number" in str(err.value)
    with pytest.raises(ConfigError, match="both 0"):
        load_recipe(ROOT / "configs" / "tiny.yaml", ["distill.ce_weight=0"])


def test_training_on_the_teacher_alone_brings_the_audio_model_to_it(tmp_path):
    manifest = distilled_manifest(tmp_path / "d.jsonl")
    recipe = load_recipe(ROOT / "configs" / "tiny.yaml", [
        f"output_dir={tmp_path / 'run'}", f"cache.dir={tmp_path / 'cache'}", f"data.train=[{{path: {manifest}}}]",
        "data.eval=[]", "train.epochs=10", "train.save_every=null", "distill.kl_weight=1", "distill.ce_weight=0",
    ])
    result = train(recipe)
    values = [r["loss"] for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())]
    assert result["steps"] == len(values) == 20
    first, last = sum(values[:4]) / 4, sum(values[-4:]) / 4  # a random tiny LLM is unsure: small KLs, falling
    assert first > 0 and last < 0.25 * first, values
