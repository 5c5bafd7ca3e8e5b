"""LoRA targets found by name in the LLM only; encoder LoRA round trip; QLoRA steps on CPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from eardrum.adapters.checkpoint import build_audio_llm, load_pretrained
from eardrum.adapters.config import AudioLLMConfig
from eardrum.training.lora import (
    LLM_TARGETS,
    apply_encoder_lora,
    apply_llm_lora,
    find_targets,
    freeze_for_training,
    parameter_report,
)
from eardrum.training.recipe import LoraSettings


def conversation(seconds=0.5):
    wave = (np.random.default_rng(0).standard_normal(int(seconds * 16000)) * 0.1).astype(np.float32)
    return [
        {"role": "user", "content": [{"type": "audio", "audio": (wave, 16000)}]},
        {"role": "assistant", "content": "two beeps"},
    ]


@pytest.fixture()
def built(model_dirs):
    torch.manual_seed(0)
    return build_audio_llm(AudioLLMConfig(encoder=model_dirs["whisper"], llm=model_dirs["llama"]))


def test_default_targets_are_the_llm_projections_only(built):
    model, _ = built
    assert find_targets(model.llm, LLM_TARGETS) == [
        "down_proj",
        "gate_proj",
        "k_proj",
        "o_proj",
        "q_proj",
        "up_proj",
        "v_proj",
    ]
    apply_llm_lora(model, LoraSettings(enabled=True, r=4), quantized=False, gradient_checkpointing=False)
    freeze_for_training(model)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert all(n.startswith("projector.") or ("llm." in n and "lora_" in n) for n in trainable)
    assert not [n for n, _ in model.encoder.named_parameters() if "lora_" in n]
    assert len([n for n in trainable if "lora_A" in n]) == 7 * 2  # 7 projections x 2 layers
    assert parameter_report(model).startswith("trainable parameters ")


def test_encoder_lora_trains_and_round_trips(built, tmp_path):
    model, processor = built
    apply_encoder_lora(model, LoraSettings(encoder=True, r=4))
    freeze_for_training(model)
    with torch.no_grad():
        for n, p in model.encoder.named_parameters():
            if "lora_B" in n:
                p.normal_()  # peft starts B at zero; make the adapter matter
    batch = processor([conversation()])
    model(**batch).loss.backward()
    assert any(p.grad is not None for n, p in model.encoder.named_parameters() if "lora_" in n)
    model.save_pretrained(tmp_path / "ckpt", processor)
    loaded, _ = load_pretrained(tmp_path / "ckpt")
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, loaded(**batch).logits)


@pytest.mark.parametrize("bits", ["4bit", "8bit"])
def test_qlora_forward_backward_step_on_cpu(tmp_path, bits):
    pytest.importorskip("bitsandbytes")
    from eardrum.adapters.tiny import build_tokenizer, tiny_llama

    tok = build_tokenizer("chatml")
    tiny_llama(vocab_size=len(tok) + 20, hidden=64, kv_heads=4).save_pretrained(tmp_path / "llm")
    tok.save_pretrained(tmp_path / "llm")
    torch.manual_seed(0)
    model, processor = build_audio_llm(
        AudioLLMConfig(encoder="tiny:whisper", llm=str(tmp_path / "llm")), quantization=bits
    )
    apply_llm_lora(model, LoraSettings(enabled=True, r=4), quantized=True, gradient_checkpointing=False)
    freeze_for_training(model)
    params = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    loss = model(**processor([conversation()])).loss
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss)
    assert any(not torch.equal(a, b) for a, b in zip(before, params))
