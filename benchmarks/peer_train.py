"""Training section: one LoRA step (forward, backward, AdamW), eardrum with and without its feature cache.

Both models train the same way: LoRA r on the LLM's q, k, v, o projections (peft), the projector
trainable, the encoder and every base weight frozen, AdamW. A batch is B equal clips with a
question and an answer of a fixed number of loss tokens (labels only on the answer), built by
eardrum's processor; the peer gets the same input_ids and labels and its own 30 s features.

Timed per step, inputs already on the device (log-mel is data loading for both): the peer's
forward on 30 s features; eardrum's forward on the clips' own features; and eardrum's cached
step, which reads the frozen encoder's frames from a `FeatureCache` on disk (built once before,
as a first epoch would) and moves them to the device inside the timed step.
"""

from __future__ import annotations

import contextlib
import functools
import tempfile
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from eardrum.adapters.model import labelled_positions
from eardrum.training.cache import FeatureCache, encode_windows, encoder_fingerprint, precompute
from eardrum.training.compiling import compile_decoder_layers, uncompiled
from eardrum.training.lora import apply_llm_lora, freeze_for_training
from eardrum.training.recipe import LoraSettings

from .peer_checks import agreement
from .peer_flops import LORA_MODULES, train_step_flops
from .peer_models import (
    PEER_MEL_FRAMES,
    Models,
    answer_text,
    build_check_model,
    conversation,
    make_waves,
    peer_encode,
    peer_features,
    peer_token_lengths,
    zero_padded,
)
from .peer_timing import PeakMemory, alternate, median

# peft matches a string against whole module names: the LLM's projections only, not the audio tower's q/k/v
PEER_LORA_TARGETS = r".*language_model\..*\.(" + "|".join(LORA_MODULES) + ")"
LEARNING_RATE = 1e-5


@dataclass
class Trainers:
    peer: nn.Module  # the peer inside a peft model
    peer_optimizer: torch.optim.Optimizer
    optimizer: torch.optim.Optimizer  # eardrum's


def prepare(models: Models, r: int) -> Trainers:
    """LoRA on both LLMs, projectors trainable, one AdamW each; eardrum through its own helpers."""
    from peft import LoraConfig, get_peft_model

    lora = LoraSettings(enabled=True, r=r, alpha=2 * r, dropout=0.05, target_modules=list(LORA_MODULES))
    apply_llm_lora(models.model, lora, quantized=False, gradient_checkpointing=False)
    freeze_for_training(models.model)
    peer_lora = LoraConfig(
        r=r, lora_alpha=2 * r, lora_dropout=0.05, target_modules=PEER_LORA_TARGETS, task_type="CAUSAL_LM"
    )
    peer = get_peft_model(models.peer, peer_lora)
    for p in models.peer.model.multi_modal_projector.parameters():
        p.requires_grad_(True)
    return Trainers(peer, _adamw(models.peer), _adamw(models.model))


def _adamw(module: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=LEARNING_RATE)


def private_bytes(module: nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Bytes a model holds alone: its trainable weights and their optimizer state (frozen weights are shared)."""
    weights = sum(p.numel() * p.element_size() for p in module.parameters() if p.requires_grad)
    state = sum(
        t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t)
    )
    return weights + state


def trainable_counts(models: Models) -> dict[str, int]:
    return {
        name: sum(p.numel() for p in module.parameters() if p.requires_grad)
        for name, module in (("eardrum", models.model), ("peer", models.peer))
    }


def _batches(models: Models, batch: int, seconds: float, answer_tokens: int, seed: int):
    """(eardrum's batch, raw audio windows for the cache, the peer's batch), on the CPU."""
    answer = answer_text(models.processor, answer_tokens)
    waves = make_waves(batch, seconds, seed)
    convs = [conversation(w, answer) for w in waves]
    ours = models.processor(convs)  # input_ids, attention_mask, labels (B, S); audio_features, audio_lengths
    windows = models.processor(convs, featurize=False)["audio_windows"]
    feats, mask = peer_features(models, waves)
    peer = {k: ours[k] for k in ("input_ids", "attention_mask", "labels")}
    peer.update(input_features=feats, feature_attention_mask=mask)
    return ours, windows, peer


def _step(loss: Callable[[], torch.Tensor], optimizer: torch.optim.Optimizer, memory: PeakMemory) -> dict:
    with memory:
        loss().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return {"peak_bytes": memory.peak}


def measure(models: Models, trainers: Trainers, settings: dict, peak_flops: float | None) -> dict:
    """Timed steps of the contenders (the peer, eardrum, eardrum with its feature cache, and with `compile` in
    `settings` eardrum with its decoder layers compiled, `train.compile`); `settings` holds batch, seconds,
    answer_tokens, r, warmup, repeats, seed and optionally compile."""
    dev, model = models.device, models.model
    ours, windows, peer = _batches(
        models, settings["batch"], settings["seconds"], settings["answer_tokens"], settings["seed"]
    )
    ours = {k: v.to(dev) for k, v in ours.items()}
    peer = {k: v.to(dev) for k, v in peer.items()}
    text = {k: ours[k] for k in ("input_ids", "attention_mask", "labels")}
    cache_dir = tempfile.TemporaryDirectory(prefix="eardrum-peer-cache-")
    cache = FeatureCache(cache_dir.name, encoder_fingerprint(model, models.processor.featurizer))
    built = precompute(model, models.processor.featurizer, windows, cache, batch_size=len(windows), progress=False)

    def cached() -> dict:
        frames, lengths = encode_windows(model, models.processor.featurizer, windows, cache)  # read from disk
        return {**text, "audio_frames": frames.to(dev), "frame_lengths": lengths.to(dev)}

    # each model's peak, less what only the other model holds (see PeakMemory)
    not_peer = functools.partial(private_bytes, model, trainers.optimizer)
    not_ours = functools.partial(private_bytes, trainers.peer, trainers.peer_optimizer)
    compiled = bool(settings.get("compile"))
    if compiled:  # train.compile: the same model's decoder layers compiled; the other contenders run them plain
        compile_decoder_layers(model.llm)
    plain = (lambda: uncompiled(model.llm)) if compiled else contextlib.nullcontext

    def eardrum_step(inputs: Callable[[], dict]) -> dict:
        # share_prefix off (the trainer's default is on): the same tokens computed as the peer computes them, so
        # that the model FLOPs behind the MFU figures are the work both did
        return _step(lambda: model(**inputs(), labelled_logits_only=True, share_prefix=False).loss,
                     trainers.optimizer, PeakMemory(dev, not_ours))

    def plain_step(inputs: Callable[[], dict]) -> dict:
        with plain():
            return eardrum_step(inputs)

    contenders = {
        "peer": lambda: _step(lambda: trainers.peer(**peer).loss, trainers.peer_optimizer, PeakMemory(dev, not_peer)),
        # eardrum's step as its trainer runs it (less the shared prefix): logits and loss only at labels
        "eardrum": lambda: plain_step(lambda: ours),
        "eardrum_cached": lambda: plain_step(cached),
    }
    if compiled:
        contenders["eardrum_compiled"] = lambda: eardrum_step(lambda: ours)
    model.train()
    trainers.peer.train()
    try:
        runs = alternate(contenders, settings["warmup"], settings["repeats"], dev)
    finally:
        model.eval()
        trainers.peer.eval()
        cache_dir.cleanup()
    return _report(models, settings, ours, runs, built["seconds"], peak_flops)


def _report(models: Models, settings: dict, ours: dict, runs: dict, cache_seconds: float, peak: float | None) -> dict:
    batch, seq = ours["input_ids"].shape
    audio_tokens = int((ours["input_ids"] == models.model.placeholder_id).sum())
    clip_frames = models.model.encoder.num_frames(int(settings["seconds"] * 16000))
    head_rows = batch * int(labelled_positions(ours["labels"]).numel())  # the LM head where a label is predicted
    common = dict(batch=batch, seq=seq, audio_tokens=audio_tokens, r=settings["r"], head_rows=head_rows)
    useful = {  # the work the task needs: the encoder on the clips' own frames, none when cached
        "peer": train_step_flops(models.size, projector="linear", encoder_frames=clip_frames, **common),
        "eardrum": train_step_flops(models.size, projector="stack2", encoder_frames=clip_frames, **common),
        "eardrum_cached": train_step_flops(models.size, projector="stack2", encoder_frames=None, **common),
    }
    useful["eardrum_compiled"] = useful["eardrum"]
    padded = PEER_MEL_FRAMES // 2  # the peer encodes 30 s whatever the clip
    executed = dict(useful, peer=train_step_flops(models.size, projector="linear", encoder_frames=padded,
                                                  **dict(common, head_rows=None)))  # the peer's logits everywhere
    out = {
        "batch": batch,
        "sequence_tokens": seq,
        "audio_tokens_per_example": audio_tokens // batch,
        "loss_tokens_per_example": int((ours["labels"] != -100).sum()) // batch,
        "cache_build_seconds": cache_seconds,
    }
    for name, record in runs.items():
        step = median(record["seconds"])
        peaks = [p for p in record["peak_bytes"] if p is not None]
        out[name] = {
            "median_step_s": step,
            "examples_per_s": batch / step,
            "audio_hours_per_device_hour": batch * settings["seconds"] / step,
            "peak_memory_gib": max(peaks) / 2**30 if peaks else None,
            "model_flops_per_step": useful[name],
            "executed_flops_per_step": executed[name],
            "mfu": useful[name] / step / peak if peak else None,
            "hfu": executed[name] / step / peak if peak else None,
            "all_step_s": record["seconds"],
        }
    peer = out["peer"]
    # The ratio of executed FLOPs: the examples/s ratio if both models ran at the same FLOP/s. The LLM's
    # share of a step is the same for both, so this bounds what trimming or caching the encoder can give.
    ours_names = [n for n in ("eardrum", "eardrum_cached", "eardrum_compiled") if n in runs]
    out["flops_bound_ratios"] = {f"{n}_over_peer": executed["peer"] / executed[n] for n in ours_names}
    out["ratios"] = {
        f"{metric}_{name}_over_peer": out[name][metric] / peer[metric]
        for name in ours_names
        for metric in ("examples_per_s", "peak_memory_gib")
        if peer[metric]
    }
    return out


def check(models: Models, trainers: Trainers, seed: int) -> dict:
    """Same loss, before any step (LoRA B = 0 in both), on a batch of two 10 s clips.

    1. Peer against eardrum's merge, labels and loss: the peer on eardrum's mel zero-padded to
       30 s; eardrum's `AudioLLM` with the peer's `linear` projector weights on the peer's pooled
       encoder states. Same audio tokens in, so the loss and logits must match.
    2. eardrum with its feature cache against eardrum without: the frames read back from the
       cache (float32) must give the same loss as encoding on the fly.
    """
    ours, windows, _ = _batches(models, 2, 10.0, 20, seed)
    dev, model = models.device, models.model
    ours = {k: v.to(dev) for k, v in ours.items()}
    text = {k: ours[k] for k in ("input_ids", "attention_mask", "labels")}
    same_feats, same_mask = (t.to(dev) for t in zero_padded(ours["audio_features"].cpu(), ours["audio_lengths"].cpu()))
    with torch.inference_mode(), tempfile.TemporaryDirectory() as tmp:
        peer_out = trainers.peer(**text, input_features=same_feats, feature_attention_mask=same_mask)
        states = peer_encode(models, same_feats, same_mask)
        lengths = peer_token_lengths(models, same_mask)
        check_out = build_check_model(models)(**text, audio_frames=states, frame_lengths=lengths)
        plain = model(**ours)
        cache = FeatureCache(tmp, encoder_fingerprint(model, models.processor.featurizer))
        frames, frame_lengths = encode_windows(model, models.processor.featurizer, windows, cache)
        cached = model(**text, audio_frames=frames.to(dev), frame_lengths=frame_lengths.to(dev))
    return {
        "peer_vs_eardrum_merge_and_loss": {
            "loss": agreement(check_out.loss.reshape(1), peer_out.loss.reshape(1), models.dtype),
            "logits": agreement(check_out.logits, peer_out.logits, models.dtype),
            "losses": [check_out.loss.item(), peer_out.loss.item()],
        },
        "eardrum_cached_vs_uncached": {
            "loss": agreement(cached.loss.reshape(1), plain.loss.reshape(1), models.dtype),
            "losses": [cached.loss.item(), plain.loss.item()],
        },
    }
