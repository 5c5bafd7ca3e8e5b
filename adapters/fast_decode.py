"""Decoding that seldom waits for the device: the loop behind `AudioLLM.generate(fast=True)`.

transformers' `generate` reads a flag back from the device at every step (has every row ended?) and, with a
streamer, every token too. Each read waits for the step to finish, so on a GPU the host never queues step
t + 1 while step t runs, and the loop's own Python time adds to every step's. This loop keeps everything a
step decides on the device and reads back only every `CHECK_EVERY` steps:

- the KV cache is static (transformers' `StaticCache`, the prompt plus `max_new_tokens` rounded up to
  `CACHE_STEP`, kept on the LLM for the next call of that size), and the attention mask is one fixed (B, L)
  tensor, so the step's shapes never change; on CUDA the step is compiled once per batch size and cache
  length (`torch.compile`, mode "reduce-overhead": CUDA graphs);
- a row ends on the device when it draws a stop token; from then on it takes the pad token, as in
  `generate`;
- at each check the new tokens come to the host once: the streamer gets them (the first token at once, so
  the time to the first token is unchanged) and the stopping criteria are asked about every step of the
  stretch, so a row that they end keeps exactly the tokens it would keep step by step. The steps the
  device ran past the end are dropped.

The tokens are those of `generate` with the same arguments (greedy: equal, tested; sampled through
`eardrum.common.decoding`'s seeded sampler: equal for rows that end on a stop token).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
from collections.abc import Sequence

import torch
from torch import nn
from transformers import LogitsProcessorList, StaticCache, StoppingCriteriaList
from transformers.generation import RepetitionPenaltyLogitsProcessor

from .model import base_model, cache_argument, forward_parameters, takes_logits_to_keep

logger = logging.getLogger(__name__)

CHECK_EVERY = 8  # steps the device runs between two reads of the new tokens by the host
# the static cache's length is the prompt and the answer rounded up to this, so that prompts of other lengths
# reuse one compiled step (its slots past the answer are never attended: the mask is causal)
CACHE_STEP = 256
# what the loop takes; any other `generate` argument (beams, sampling by transformers...) goes to `generate`
SUPPORTED = frozenset({"max_new_tokens", "min_new_tokens", "do_sample", "repetition_penalty", "eos_token_id",
                       "pad_token_id", "logits_processor", "stopping_criteria", "streamer", "cache_implementation"})


def supports(generate_kwargs: dict) -> bool:
    """Whether `fast_generate` takes these `generate` arguments (else `generate` itself must run them)."""
    return (set(generate_kwargs) <= SUPPORTED and not generate_kwargs.get("do_sample")
            and generate_kwargs.get("cache_implementation", "static") == "static"
            and generate_kwargs.get("max_new_tokens") is not None)


class _StepArguments:
    """The cache, position and slot arguments this transformers version's causal LM takes, worked out once per
    decoding: `args(positions, slots) -> dict`."""

    def __init__(self, llm: nn.Module, cache: StaticCache) -> None:
        self.fixed = {cache_argument(llm): cache, "use_cache": True}
        if takes_logits_to_keep(llm):
            self.fixed["logits_to_keep"] = 1
        self.slots = "cache_position" in forward_parameters(llm)  # older transformers: the slots written are given

    def __call__(self, positions: torch.Tensor, slots: torch.Tensor) -> dict:
        return {**self.fixed, "position_ids": positions, **({"cache_position": slots} if self.slots else {})}


def _last_logits(llm: nn.Module, **inputs) -> torch.Tensor:
    """The LLM's next-token logits (B, V), float32."""
    return llm(**inputs).logits[:, -1, :].float()


def _can_compile(llm: nn.Module) -> bool:
    """Whether the decoding step of `llm` is compiled: on CUDA, unless its quantization cannot be compiled or
    its weights are offloaded (the cases transformers' `generate` leaves uncompiled too)."""
    base = base_model(llm)
    if next(llm.parameters()).device.type != "cuda":
        return False
    quantizer = getattr(base, "hf_quantizer", None)
    if quantizer is not None and not getattr(quantizer, "is_compileable", False):
        return False
    placed = set(getattr(base, "hf_device_map", {}).values())
    return not ({"cpu", "disk"} & placed and len(placed) > 1)


class _Step:
    """The decoding step of one LLM: `step(**inputs) -> logits (B, V)`, compiled where `_can_compile` says (once
    per shape). A step that fails to compile is logged and runs uncompiled from then on."""

    def __init__(self, llm: nn.Module) -> None:
        self.llm = llm
        self.compiled = (torch.compile(functools.partial(_last_logits, llm), mode="reduce-overhead", dynamic=False)
                         if _can_compile(llm) else None)

    def __call__(self, **inputs) -> torch.Tensor:
        if self.compiled is not None:
            try:
                return self.compiled(**inputs)
            except torch._dynamo.exc.TorchDynamoException as err:  # raised while compiling, before the step runs
                logger.warning("the decoding step could not be compiled, so it runs uncompiled: %s", err)
                self.compiled = None
        return _last_logits(self.llm, **inputs)


def _compiled_step(llm: nn.Module) -> _Step:
    """The LLM's decoding step, kept on the module (not a submodule: no state_dict entry)."""
    step = llm.__dict__.get("_eardrum_step")
    if step is None:
        step = llm.__dict__["_eardrum_step"] = _Step(llm)
    return step


@torch.no_grad()
def fast_generate(
    llm: nn.Module,
    inputs_embeds: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    max_new_tokens: int,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
    min_new_tokens: int = 0,
    repetition_penalty: float = 1.0,
    logits_processor: Sequence | None = None,
    stopping_criteria: Sequence | None = None,
    streamer=None,
    do_sample: bool = False,
    cache_implementation: str = "static",
    check_every: int = CHECK_EVERY,
) -> torch.Tensor:
    """Greedy decoding (after `logits_processor`, which may draw a sample and leave only it possible) from
    left-padded prompt embeddings; returns the new token ids (B, T_new), as `generate` does.

    inputs_embeds (B, T, D) and attention_mask (B, T) are the prompts; a row ends at its first `eos_token_id`
    (kept) or when a stopping criterion says so, then holds `pad_token_id`; T_new is the step at which the last
    row ended, at most `max_new_tokens`.
    """
    if do_sample or cache_implementation != "static":
        raise ValueError("fast_generate decodes greedily with a static cache: sample through logits_processor")
    if check_every < 1:
        raise ValueError(f"check_every: expected a positive number of steps, got {check_every!r}")
    batch, prompt = attention_mask.shape
    stops = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id or [])
    pad = pad_token_id if pad_token_id is not None else (stops[0] if stops else 0)
    penalty = RepetitionPenaltyLogitsProcessor(repetition_penalty) if repetition_penalty != 1.0 else None
    processors = LogitsProcessorList(logits_processor or [])  # after the penalty and the minimum length, as in generate

    length = -(-(prompt + max_new_tokens) // CACHE_STEP) * CACHE_STEP  # a few lengths: few compilations
    with _decoding(llm):
        cache = _static_cache(llm, batch, length)
        return _decode(llm, cache, length, inputs_embeds, attention_mask, max_new_tokens, stops, pad, penalty,
                       processors, min_new_tokens, StoppingCriteriaList(stopping_criteria or []), streamer, check_every)


@contextlib.contextmanager
def _decoding(llm: nn.Module):
    """One fast decoding at a time per LLM: they share its static cache."""
    with llm.__dict__.setdefault("_eardrum_decode_lock", threading.Lock()):
        yield


def _static_cache(llm: nn.Module, batch: int, length: int) -> StaticCache:
    """A static KV cache for `batch` rows of `length` positions: the LLM's last one, emptied, when its size is the
    same (on CUDA its tensors keep their addresses, so the compiled step's CUDA graphs are replayed, not recorded
    again), else a new one, kept for the next call."""
    kept = llm.__dict__.get("_eardrum_static_cache")
    if kept is not None and kept[0] == (batch, length):
        kept[1].reset()
        return kept[1]
    cache = StaticCache(config=base_model(llm).config, max_cache_len=length)
    llm.__dict__["_eardrum_static_cache"] = ((batch, length), cache)
    return cache


def _decode(llm, cache, length, inputs_embeds, attention_mask, max_new_tokens, stops, pad, penalty, processors,
            min_new_tokens, criteria, streamer, check_every) -> torch.Tensor:
    """`fast_generate`'s loop (its arguments, checked and built)."""
    device = inputs_embeds.device
    batch, prompt = attention_mask.shape
    stop_ids = torch.tensor(stops, dtype=torch.long, device=device)
    mask = torch.ones(batch, length, dtype=attention_mask.dtype, device=device)  # (B, L): future slots are
    mask[:, :prompt] = attention_mask.to(device)  # hidden by causality, so the mask never changes
    positions = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 1).to(device)  # (B, T)
    next_position = attention_mask.long().sum(-1, keepdim=True).to(device)  # (B, 1): the first new token's
    tokens = torch.full((batch, max_new_tokens), pad, dtype=torch.long, device=device)  # (B, T_max)
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    if streamer is not None:
        streamer.put(torch.empty(batch, 0, dtype=torch.long))  # generate hands over the prompt first

    slots = torch.arange(length, device=device)  # the cache slots each step writes
    arguments = _StepArguments(llm, cache)
    logits = _last_logits(llm, inputs_embeds=inputs_embeds, attention_mask=mask, **arguments(positions, slots[:prompt]))
    step = _compiled_step(llm)
    host = _HostView(batch, stops, pad, criteria, streamer)
    ended_at = max_new_tokens
    for t in range(max_new_tokens):
        if t > 0:
            logits = step(input_ids=tokens[:, t - 1 : t], attention_mask=mask,  # no copy from the host
                          **arguments(next_position + (t - 1), slots[prompt + t - 1 : prompt + t]))
        scores = penalty(tokens[:, :t], logits) if penalty else logits  # (B, V)
        if t < min_new_tokens and stops:
            scores = scores.index_fill(1, stop_ids, float("-inf"))
        if processors:
            scores = processors(tokens[:, :t], scores)
        token = scores.argmax(dim=-1)  # (B,)
        tokens[:, t] = torch.where(done, torch.full_like(token, pad), token)
        if stops:
            done |= torch.isin(tokens[:, t], stop_ids)
        if t == 0 or (t + 1) % check_every == 0 or t + 1 == max_new_tokens:
            end = host.look(tokens, done, t + 1)
            if end is not None:
                ended_at = end
                break
    if streamer is not None:
        streamer.end()
    return tokens[:, :ended_at]


class _HostView:
    """What the host reads of the decoding at each check: where each row ended, and the streamer's tokens."""

    def __init__(self, batch: int, stops: list[int], pad: int, criteria: StoppingCriteriaList, streamer) -> None:
        self.ends: list[int | None] = [None] * batch  # the step count at which each row ended
        self.stops, self.pad, self.criteria, self.streamer = set(stops), pad, criteria, streamer
        self.seen = 0  # steps the host has read

    def look(self, tokens: torch.Tensor, done: torch.Tensor, upto: int) -> int | None:
        """Read steps `seen`..`upto` - 1 of `tokens` (B, T_max) (one wait for the device): each row's end at its
        first stop token or at the step a stopping criterion ends it (that row then holds the pad token after
        it, on the device too); hand the new tokens to the streamer. Returns the step count at which every row
        had ended (the steps after it are dropped), or None while a row goes on."""
        host = tokens[:, :upto].cpu()  # (B, upto)
        last = None
        cut = []  # rows a criterion ended: pad after their end, and done, on the device as well
        for t in range(self.seen, upto):
            running = [b for b, end in enumerate(self.ends) if end is None]
            for b in running:
                if int(host[b, t]) in self.stops:
                    self.ends[b] = t + 1
            if self.criteria:
                fired = self.criteria(host[:, : t + 1], None)
                for b in running:
                    if self.ends[b] is None and bool(fired[b]):
                        self.ends[b] = t + 1
                        host[b, t + 1 :] = self.pad
                        cut.append(b)
            if all(end is not None for end in self.ends):
                last = t + 1
                break
        if cut:
            rows = torch.tensor(cut, device=tokens.device)
            done[rows] = True
            tokens[rows, :upto] = host[cut].to(tokens.device)
        if self.streamer is not None and (last or upto) > self.seen:
            self.streamer.put(host[:, self.seen : last or upto])
        self.seen = last or upto
        return last
