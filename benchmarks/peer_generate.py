"""Generation section: time to first token and decode speed, greedy, a fixed number of new tokens.

Every request is a batch of equal 10 s clips with the same question, so no row is padded; both
models get the same input_ids (the peer's audio token is eardrum's placeholder id) and their
own features, already on the device. TTFT runs from the `generate` call (audio encoding,
projection, prefill) to the first new token reaching a streamer; decode speed is the tokens
after the first, over all rows, per second after the first token. min_new_tokens equals
max_new_tokens, so an end-of-turn token cannot cut a run short.

Contenders: the peer's `generate`; eardrum's `AudioLLM.generate` as it comes; and eardrum's
`generate(fast=True)`: eardrum's own decoding loop (`eardrum.adapters.fast_decode`: a static KV cache, the
step compiled with CUDA graphs on CUDA, the host reading tokens back every few steps; on CPU uncompiled,
which exercises the same code path). Its streamer gets the first token at once, so TTFT means the same.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable

import torch

from .peer_checks import agreement
from .peer_flops import decode_bytes_per_step
from .peer_models import (
    Models,
    build_check_model,
    conversation,
    make_waves,
    peer_encode,
    peer_features,
    peer_token_lengths,
    zero_padded,
)
from .peer_timing import FirstTokenClock, alternate, median, sync


def _inputs(models: Models, batch: int, seconds: float, seed: int) -> tuple[dict, dict]:
    """(eardrum's generate inputs, the peer's), on the device."""
    waves = make_waves(batch, seconds, seed)
    ours = models.processor([conversation(w) for w in waves], add_generation_prompt=True)
    feats, mask = peer_features(models, waves)
    peer = {"input_ids": ours["input_ids"], "attention_mask": ours["attention_mask"]}
    peer.update(input_features=feats, feature_attention_mask=mask)
    dev = models.device
    return {k: v.to(dev) for k, v in ours.items()}, {k: v.to(dev) for k, v in peer.items()}


def _timed(generate: Callable, inputs: dict, new_tokens: int, pad_id: int, device: torch.device) -> dict:
    """One greedy request: its TTFT and decode speed."""
    clock = FirstTokenClock()
    batch, prompt = inputs["input_ids"].shape
    start = time.perf_counter()
    ids = generate(
        **inputs,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=pad_id,
        streamer=clock,
    )
    sync(device)
    end = time.perf_counter()
    new = ids[:, prompt:] if ids.shape[1] == prompt + new_tokens else ids  # the peer returns the prompt too
    if new.shape != (batch, new_tokens) or clock.first is None:
        raise RuntimeError(f"expected {new_tokens} new tokens per row, got shape {tuple(new.shape)}")
    return {"ttft_s": clock.first - start, "decode_tokens_per_s": batch * (new_tokens - 1) / (end - clock.first)}


def _contenders(models: Models, ours: dict, peer: dict, new_tokens: int, fast: bool) -> dict[str, Callable]:
    pad, dev = models.processor.tokenizer.pad_token_id, models.device
    out = {
        "peer": lambda: _timed(models.peer.generate, peer, new_tokens, pad, dev),
        "eardrum": lambda: _timed(models.model.generate, ours, new_tokens, pad, dev),
    }
    if fast:
        fast_generate = functools.partial(models.model.generate, fast=True)
        out["eardrum_fast"] = lambda: _timed(fast_generate, ours, new_tokens, pad, dev)
    return out


def measure(
    models: Models,
    batches: list[int],
    seconds: float,
    new_tokens: int,
    fast: bool,
    timing: dict,
    bandwidth: float | None,
) -> list[dict]:
    """One row per batch size; `timing` holds warmup, repeats and seed."""
    rows = []
    for batch in batches:
        ours, peer = _inputs(models, batch, seconds, timing["seed"] + batch)
        # generate runs under no_grad itself; inference_mode is avoided, as the compiled fast path may not take it
        runs = alternate(
            _contenders(models, ours, peer, new_tokens, fast), timing["warmup"], timing["repeats"], models.device
        )
        prompt = int(ours["input_ids"].shape[1])
        row = {"batch": batch, "clip_seconds": seconds, "prompt_tokens": prompt, "new_tokens": new_tokens}
        context = prompt + new_tokens // 2  # mean KV length over the decode
        step_bytes = decode_bytes_per_step(models.size, batch, context, models.dtype.itemsize)
        limit = batch * bandwidth / step_bytes if bandwidth else None
        row["decode_bandwidth_limit_tokens_per_s"] = limit
        for name, record in runs.items():
            rate = median(record["decode_tokens_per_s"])
            row[name] = {
                "ttft_s": median(record["ttft_s"]),
                "decode_tokens_per_s": rate,
                "fraction_of_bandwidth_limit": rate / limit if limit else None,
                "first_call_s": record["warmup_seconds"][0] if record["warmup_seconds"] else None,
                "all_ttft_s": record["ttft_s"],
                "all_decode_tokens_per_s": record["decode_tokens_per_s"],
            }
        row["ratios"] = {
            f"{metric}_{name}_over_peer": row[name][metric] / row["peer"][metric]
            for name in runs
            if name != "peer"
            for metric in ("ttft_s", "decode_tokens_per_s")
        }
        rows.append(row)
    return rows


def _compare_greedy(out_a, out_b, prompt_a: int, dtype: torch.dtype) -> dict:
    """Tokens and per-step logits of two greedy runs; logits compared up to the first differing token."""
    tokens_a, tokens_b = out_a.sequences[:, prompt_a:], out_b.sequences
    same = (tokens_a == tokens_b).all(dim=0).tolist()  # per step
    steps = same.index(False) + 1 if False in same else len(same)
    logits_a = torch.stack(out_a.logits[:steps], dim=1)  # (B, steps, V)
    logits_b = torch.stack(out_b.logits[:steps], dim=1)
    report = agreement(logits_a, logits_b, dtype)
    report.update(tokens_equal=all(same), matching_prefix=same.index(False) if False in same else len(same))
    report["passed"] = report["passed"] and (report["tokens_equal"] or dtype != torch.float32)
    return report


def check(models: Models, seconds: float, new_tokens: int, fast: bool, seed: int) -> dict:
    """Do the models generate the same tokens from the same audio tokens, and does the fast path match?

    1. Peer against eardrum's merge and LLM: the peer generates from eardrum's own-length mel,
       zero-padded to 30 s; eardrum's `AudioLLM` with a `linear` projector holding the peer's
       weights generates from the peer's pooled encoder states (`audio_frames`). Same audio
       tokens in, so the logits and greedy tokens must match.
    2. eardrum's `generate(fast=True)` against `generate()` on the same request (on CUDA its first
       call compiles; an error there is reported and the fast path left out of the timing).
    In float32 tokens must be equal; in bfloat16 logits must agree up to the first differing token.
    """
    ours, _ = _inputs(models, 1, seconds, seed)
    padded = zero_padded(ours["audio_features"].cpu(), ours["audio_lengths"].cpu())
    same_feats, same_mask = (t.to(models.device) for t in padded)  # (1, C, 3000), (1, 3000)
    common = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, output_logits=True)
    common.update(return_dict_in_generate=True, pad_token_id=models.processor.tokenizer.pad_token_id)
    text = {"input_ids": ours["input_ids"], "attention_mask": ours["attention_mask"]}
    peer_out = models.peer.generate(**text, input_features=same_feats, feature_attention_mask=same_mask, **common)
    with torch.no_grad():
        states = peer_encode(models, same_feats, same_mask)  # (1, 750, D_enc)
    lengths = peer_token_lengths(models, same_mask)
    check_out = build_check_model(models).generate(**text, audio_frames=states, frame_lengths=lengths, **common)
    prompt = text["input_ids"].shape[1]
    result = {"peer_vs_eardrum_merge_and_llm": _compare_greedy(peer_out, check_out, prompt, models.dtype)}
    if fast:
        default = models.model.generate(**ours, **common)
        try:
            quick = models.model.generate(**ours, fast=True, **common)
        except Exception as err:  # a compile failure must not cost the rest of a GPU run; it is reported
            result["eardrum_fast_vs_default"] = {"passed": False, "error": f"{type(err).__name__}: {err}"[:2000]}
        else:
            result["eardrum_fast_vs_default"] = _compare_greedy(default, quick, 0, models.dtype)
    return result
