"""`train.compile`: the LLM's decoder layers compiled one at a time give the loss and gradients of the plain
model, padded and packed, keep the checkpoint's names, and a recipe with it trains. Traced with torch.compile's
"eager" backend (what is compiled, and that it computes the same; the code generation itself is torch's)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from eardrum.adapters.checkpoint import build_audio_llm
from eardrum.adapters.config import AudioLLMConfig, ConfigError
from eardrum.training import compiling
from eardrum.training.collate import pack_batch
from eardrum.training.lora import apply_llm_lora
from eardrum.training.recipe import LoraSettings
from eardrum.training.trainer import train


def _model():
    torch.manual_seed(0)
    model, processor = build_audio_llm(AudioLLMConfig(encoder="tiny:whisper", llm="tiny:llama"))
    apply_llm_lora(model, LoraSettings(enabled=True, r=4, alpha=8, dropout=0.0), quantized=False,
                   gradient_checkpointing=False)
    with torch.no_grad():  # LoRA's B starts at zero: give it weights so that its gradient path is exercised
        for name, p in model.llm.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.02)
    return model.float().train(), processor


SYSTEM = [{"role": "system", "content": "You listen to the recording and answer in a few words."}]


def _batch(processor, packed: bool, system: bool = False, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    convs = []
    for seconds, answer in ((0.6, "a short tone"), (1.7 + seed / 4, "two beeps, then a longer tone"), (1.1, "three")):
        wave = (rng.standard_normal(int(seconds * 16000)) * 0.1).astype(np.float32)
        convs.append([*(SYSTEM if system else []),
                      {"role": "user", "content": [{"type": "audio", "audio": (wave, 16000)},
                                                   {"type": "text", "text": "what is it?"}]},
                      {"role": "assistant", "content": answer}])
    batch = processor(convs)
    return pack_batch(batch) if packed else batch


def _loss_and_grads(model, batch, share_prefix: bool = False) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = model(**batch, labelled_logits_only=True, share_prefix=share_prefix).loss
    loss.backward()
    return float(loss), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("packed", [False, True])
def test_compiled_layers_give_the_loss_and_gradients_of_the_plain_model(packed):
    model, processor = _model()
    batch = _batch(processor, packed)
    plain_loss, plain_grads = _loss_and_grads(model, batch)
    names = list(model.state_dict())
    torch._dynamo.reset()
    assert compiling.compile_decoder_layers(model.llm, backend="eager") == len(compiling.decoder_layers(model.llm)) > 0
    assert all(layer._compiled_call_impl is not None for layer in compiling.decoder_layers(model.llm))
    loss, grads = _loss_and_grads(model, batch)
    assert list(model.state_dict()) == names  # a checkpoint of the compiled model is the same checkpoint
    assert loss == pytest.approx(plain_loss, rel=1e-6) and grads.keys() == plain_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, plain_grads[name], rtol=1e-5, atol=1e-6, msg=name)


def test_compiled_layers_after_a_shared_prefix_compute_the_same_and_compile_once_for_all_layers():
    """The shared prefix (`AudioLLM.forward(share_prefix=True)`) reaches the compiled layers as keys and values, not
    as a KV cache: a cache is read by each layer's own index, which would compile one graph per layer."""
    from torch._dynamo.utils import counters

    from eardrum.adapters.model import shared_prefix_length

    model, processor = _model()
    batches = [_batch(processor, packed=False, system=True, seed=seed) for seed in range(3)]
    assert all(shared_prefix_length(b["input_ids"], b["attention_mask"], b["labels"], model.placeholder_id)
               for b in batches)
    plain = [_loss_and_grads(model, b) for b in batches]
    torch._dynamo.reset()
    counters.clear()
    compiling.compile_decoder_layers(model.llm, backend="eager")
    for b, (plain_loss, plain_grads) in zip(batches, plain):
        loss, grads = _loss_and_grads(model, b, share_prefix=True)
        assert loss == pytest.approx(plain_loss, rel=1e-6) and grads.keys() == plain_grads.keys()
        for name, grad in grads.items():
            torch.testing.assert_close(grad, plain_grads[name], rtol=1e-5, atol=1e-6, msg=name)
    graphs = counters["stats"]["unique_graphs"]
    for b in batches:  # lengths seen before: nothing compiles again
        _loss_and_grads(model, b, share_prefix=True)
    assert counters["stats"]["unique_graphs"] == graphs <= 4 and not counters["graph_break"]


def test_a_model_without_decoder_layers_is_named():
    with pytest.raises(ValueError, match="train.compile: found no decoder layers in Sequential"):
        compiling.decoder_layers(nn.Sequential(nn.Linear(2, 2)))


def test_a_compiled_recipe_trains_and_refuses_quantization(tmp_path, monkeypatch):
    from test_trainer import tiny  # the tiny recipe of the training tests, beside this file

    compiled = []
    compile_layers = compiling.compile_decoder_layers
    monkeypatch.setattr(compiling, "BACKEND", "eager")
    monkeypatch.setattr("eardrum.training.trainer.compile_decoder_layers",
                        lambda llm: compiled.append(compile_layers(llm)) or compiled[-1])
    torch._dynamo.reset()
    plain_calls = []
    plain = compiling.uncompiled
    monkeypatch.setattr("eardrum.training.trainer.uncompiled", lambda llm: plain_calls.append(1) or plain(llm))
    result = train(tiny(tmp_path, "train.compile=true", "train.max_steps=3", "train.save_every=null",
                        "train.eval_generate_limit=2"))
    losses = [json.loads(x)["loss"] for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
              if '"loss"' in x]
    assert compiled and compiled[0] > 0 and result["steps"] == 3 and all(np.isfinite(losses))
    assert plain_calls and "loss" in result["eval"]  # the evaluation decodes with the layers uncompiled
    with pytest.raises(ConfigError, match="train.compile: bitsandbytes' quantized layers do not compile"):
        tiny(tmp_path, "train.compile=true", "train.quantization=4bit")
