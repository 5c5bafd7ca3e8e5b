"""Sequence packing: a packed batch (one row, position ids restarting per example, attention kept inside each)
gives the loss and the gradients of the same examples unpacked, in fp32 on CPU; the planner caps summed
lengths; a packed recipe trains."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from eardrum.adapters.checkpoint import build_audio_llm
from eardrum.adapters.config import AudioLLMConfig, ConfigError
from eardrum.common.batching import plan_batches
from eardrum.training.collate import pack_batch
from eardrum.training.lora import apply_llm_lora
from eardrum.training.recipe import LoraSettings
from eardrum.training.trainer import train


@pytest.fixture(scope="module")
def model_and_processor():
    torch.manual_seed(0)
    model, processor = build_audio_llm(AudioLLMConfig(encoder="tiny:whisper", llm="tiny:llama"))
    apply_llm_lora(model, LoraSettings(enabled=True, r=4, alpha=8, dropout=0.0), quantized=False,
                   gradient_checkpointing=False)
    for p in model.projector.parameters():
        p.requires_grad_(True)
    with torch.no_grad():  # LoRA's B starts at zero: give it weights so that its gradient path is exercised
        for name, p in model.llm.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.02)
    return model.float().train(), processor


def conversations() -> list[list[dict]]:
    rng = np.random.default_rng(0)
    out = []
    for seconds, question, answer in ((0.6, "what is it?", "a short tone"), (1.7, "and this one?", "two beeps, "
                                      "then a longer tone that fades out slowly"), (1.1, "count them", "three")):
        wave = (rng.standard_normal(int(seconds * 16000)) * 0.1).astype(np.float32)
        out.append([{"role": "user", "content": [{"type": "audio", "audio": (wave, 16000)},
                                                 {"type": "text", "text": question}]},
                    {"role": "assistant", "content": answer}])
    return out


def loss_and_grads(model, batch: dict, **kwargs) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = model(**batch, **kwargs).loss
    loss.backward()
    return float(loss), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("labelled_logits_only", [False, True])
def test_a_packed_batch_has_the_loss_and_gradients_of_the_same_examples_unpacked(model_and_processor,
                                                                                 labelled_logits_only):
    model, processor = model_and_processor
    batch = processor(conversations())
    assert batch["attention_mask"].sum(1).tolist() != [batch["input_ids"].shape[1]] * 3  # padded rows
    packed = pack_batch({k: v.clone() if torch.is_tensor(v) else v for k, v in batch.items()})
    assert packed["input_ids"].shape == (1, int(batch["attention_mask"].sum())) and "attention_mask" not in packed
    assert packed["position_ids"][0].tolist() == [t for n in batch["attention_mask"].sum(1).tolist()
                                                  for t in range(n)]
    loss, grads = loss_and_grads(model, batch, labelled_logits_only=labelled_logits_only)
    packed_loss, packed_grads = loss_and_grads(model, packed, labelled_logits_only=labelled_logits_only)
    assert packed_loss == pytest.approx(loss, rel=1e-5)
    assert grads.keys() == packed_grads.keys() and any("lora_A" in n for n in grads)
    for name, grad in grads.items():
        torch.testing.assert_close(packed_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_attention_stays_inside_each_packed_example(model_and_processor):
    """Changing one example's tokens leaves the other examples' logits in the packed row as they were."""
    model, processor = model_and_processor
    packed = pack_batch(processor(conversations()))
    with torch.no_grad():
        before = model(**packed).logits
        starts = torch.nonzero(packed["position_ids"][0] == 0).flatten().tolist()
        changed = dict(packed, input_ids=packed["input_ids"].clone())
        changed["input_ids"][0, starts[1] + 2] += 1  # a text token of the second example
        after = model(**changed).logits
    torch.testing.assert_close(after[0, : starts[1]], before[0, : starts[1]])  # the first: untouched
    torch.testing.assert_close(after[0, starts[2]:], before[0, starts[2]:])  # the third: untouched
    assert not torch.allclose(after[0, starts[1] + 2 : starts[2]], before[0, starts[1] + 2 : starts[2]])


def test_a_packed_row_is_attended_example_by_example_with_the_numbers_of_the_masked_row(model_and_processor,
                                                                                      monkeypatch):
    """The LLM runs `PACKED_SDPA`: SDPA on each example's span, no mask, never the whole row; its loss and
    gradients are those of transformers' own SDPA over the row with the block-diagonal mask."""
    import eardrum.adapters.attention as attention

    model, processor = model_and_processor
    packed = pack_batch(processor(conversations()))
    lengths = [int(n) for n in processor(conversations())["attention_mask"].sum(1)]
    assert model.llm.config._attn_implementation == attention.PACKED_SDPA
    seen = []
    sdpa = attention.sdpa_attention_forward

    def spy(module, query, key, value, mask, **kwargs):
        seen.append((query.shape[2], mask is None))
        return sdpa(module, query, key, value, mask, **kwargs)

    reads = []
    spans = attention.packed_spans
    monkeypatch.setattr(attention, "sdpa_attention_forward", spy)
    monkeypatch.setattr(attention, "packed_spans", lambda *args: reads.append(1) or spans(*args))
    loss, grads = loss_and_grads(model, dict(packed))
    layers = model.llm.config.num_hidden_layers
    assert layers > 1 and seen == [(n, True) for n in lengths] * layers  # each example alone, unmasked, every layer
    assert len(reads) == 1  # the row's spans read once, not once per layer
    model.llm.config._attn_implementation = "sdpa"  # transformers' own: the row with its block mask
    try:
        masked_loss, masked_grads = loss_and_grads(model, dict(packed))
    finally:
        model.llm.config._attn_implementation = attention.PACKED_SDPA
    assert masked_loss == pytest.approx(loss, rel=1e-5)
    for name, grad in grads.items():
        torch.testing.assert_close(masked_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    seen.clear()
    left_padded = torch.tensor([[1, 1, 0, 1, 2, 3]])  # generate's numbering of a left-padded row: not packed
    assert attention.packed_spans(left_padded, 6) is None and attention.packed_spans(packed["position_ids"], 5) is None


def test_packing_refuses_what_refers_to_rows(model_and_processor):
    _, processor = model_and_processor
    batch = processor(conversations())
    with pytest.raises(ValueError, match="cannot carry distill.kl_weight's teacher"):
        pack_batch({**batch, "teacher": {}})


def test_packed_planning_caps_the_summed_lengths():
    lengths = [30, 50, 20, 90, 10, 60, 40, 70]
    batches = plan_batches(lengths, range(8), max_tokens=100, packed=True, group_by_length=False)
    assert [sum(lengths[i] for i in b) for b in batches] == [100, 100, 100, 70]
    padded = plan_batches(lengths, range(7), max_tokens=100, group_by_length=False)
    assert len(padded) > len(batches)


def test_a_packed_recipe_trains_and_refuses_row_bound_losses(tmp_path):
    from test_trainer import tiny  # the tiny recipe of the training tests, beside this file

    result = train(tiny(tmp_path, "data.packing=true", "data.batch_size=null", "data.max_tokens=400",
                        "train.max_steps=6", "train.save_every=null"))
    losses = [json.loads(x)["loss"] for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
              if '"loss"' in x]
    assert result["steps"] == 6 and len(losses) == 6 and all(np.isfinite(losses))
    with pytest.raises(ConfigError, match="data.packing: packed rows cannot carry the CTC targets"):
        tiny(tmp_path, "data.packing=true", "train.ctc_weight=0.1")
