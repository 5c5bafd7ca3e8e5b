"""The one decoding path: stop tokens, sampling, and the call that generates for every entry point.

    ids = generate_tokens(model, tokenizer, inputs, settings)             # (B, T_new) new token ids
    answers = answer_conversations(model, processor, conversations, settings)   # decoded, stripped

Chat (`eardrum.inference.chat`, streamed or not), batch generation and evaluation
(`eardrum.inference.generate`, `.evaluation`), the server's batches (`eardrum.inference.batch_engine`,
which adds per-request sampling and stops through `generate_tokens`' hooks), training-time evaluation,
self-distillation and the smoke run all generate through `generate_tokens`, so the same checkpoint and
prompt give the same answer wherever they are asked: every path stops at the chat template's
end-of-turn token and samples with the same seeded sampler.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

from eardrum.adapters.model import AudioLLM
from eardrum.adapters.processor import AudioProcessor

from .generation import GenerationSettings, GenerationSettingsError, loop_period, loop_span

__all__ = [
    "GenerationSettings",
    "GenerationSettingsError",
    "answer_conversations",
    "draw_tokens",
    "generate_kwargs",
    "generate_tokens",
    "pad_token_id",
    "seeded_generator",
    "stop_token_ids",
]


def stop_token_ids(tokenizer, generation_config=None) -> list[int]:
    """Ids that end an answer: the tokenizer's eos, the generation config's eos, and the chat
    template's end-of-turn token (e.g. ChatML `<|im_end|>`, Llama-3 `<|eot_id|>`), found by
    rendering a turn and reading the special token that follows its text."""
    ids = [tokenizer.eos_token_id]
    config_eos = getattr(generation_config, "eos_token_id", None)
    ids.extend(config_eos if isinstance(config_eos, (list, tuple)) else [config_eos])
    ids.append(_end_of_turn_id(tokenizer))
    return list(dict.fromkeys(int(i) for i in ids if i is not None))


def _end_of_turn_id(tokenizer) -> int | None:
    marker = "eardrum-end-of-turn-probe"
    try:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": "hi"}, {"role": "assistant", "content": marker}], tokenize=False
        )
    except Exception:  # templates may demand a system turn or other shapes; then eos alone must do
        return None
    after = text[text.rfind(marker) + len(marker) :] if marker in text else ""
    ids = tokenizer.encode(after, add_special_tokens=False) if after else []
    special = set(tokenizer.all_special_ids) | {
        i for i, tok in getattr(tokenizer, "added_tokens_decoder", {}).items() if tok.special
    }
    return ids[0] if ids and ids[0] in special else None


def pad_token_id(tokenizer, stop_ids: list[int]) -> int:
    """The id that fills rows that have ended: the tokenizer's pad token, else the first stop id (else 0)."""
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    return stop_ids[0] if stop_ids else 0


def seeded_generator(device: torch.device, seed: int | None) -> torch.Generator:
    """A random generator on `device`, seeded with `seed`, or from the system's entropy when None."""
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator


def draw_tokens(scores: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator) -> torch.Tensor:
    """Next-token scores (B, V) -> scores (B, V) where only the drawn token of each row stays possible (0, others -inf).

    Each row is drawn from softmax(scores / temperature), keeping only the likeliest tokens whose
    probabilities reach `top_p` (the likeliest always stays). A row whose scaled scores overflow
    (a temperature near zero) takes its argmax, the limit of sampling as the temperature falls.
    """
    probs = torch.softmax(scores.float() / temperature, dim=-1)  # (B, V)
    if top_p < 1:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # drop a token when the more likely ones already reach top_p; the most likely always stays
        drop = sorted_probs.cumsum(dim=-1) - sorted_probs >= top_p
        probs = probs.scatter(-1, order, sorted_probs.masked_fill(drop, 0.0))
    usable = torch.isfinite(probs).all(dim=-1) & (probs.sum(dim=-1) > 0)  # (B,)
    token = scores.argmax(dim=-1, keepdim=True)  # (B, 1)
    if usable.any():
        token[usable] = torch.multinomial(probs[usable], 1, generator=generator)
    return torch.full_like(scores, float("-inf")).scatter(-1, token, 0.0)


class _LoopStop(StoppingCriteria):
    """Ends each row whose newest tokens repeat one run `repeats` times (see `GenerationSettings.stop_loops`)."""

    def __init__(self, repeats: int) -> None:
        self.repeats = repeats
        self.span = loop_span(repeats)

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        tails = input_ids[:, -self.span :].tolist()  # (B, <= span): the newest tokens of each row
        return torch.tensor([loop_period(t, self.repeats) > 0 for t in tails], device=input_ids.device)


class _Sampler(LogitsProcessor):
    """Draws the next token with temperature and top-p, then masks every other token."""

    def __init__(self, temperature: float, top_p: float, seed: int | None) -> None:
        self.temperature, self.top_p, self.seed = temperature, top_p, seed
        self.generator: torch.Generator | None = None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.generator is None:  # created here: it must live on the device the scores are on
            self.generator = seeded_generator(scores.device, self.seed)
        return draw_tokens(scores, self.temperature, self.top_p, self.generator)


def generate_kwargs(settings: GenerationSettings, tokenizer, generation_config=None) -> dict:
    """Keyword arguments for `AudioLLM.generate`; build them afresh for every call.

    Sampling is done by a logits processor with its own `torch.Generator` (seeded from `seed`)
    that leaves only the drawn token possible, so generate's greedy step takes it: the answer
    is reproducible and the global random state is never touched.
    """
    settings.validate()
    stops = stop_token_ids(tokenizer, generation_config)
    kwargs = {
        "max_new_tokens": settings.max_new_tokens,
        "do_sample": False,
        "repetition_penalty": float(settings.repetition_penalty),
        "eos_token_id": stops,
        "pad_token_id": pad_token_id(tokenizer, stops),
    }
    if settings.fast:
        kwargs["fast"] = True  # AudioLLM.generate: static KV cache, compiled decoding on CUDA
    if not settings.greedy:
        sampler = _Sampler(settings.temperature, settings.top_p, settings.seed)
        kwargs["logits_processor"] = LogitsProcessorList([sampler])
    return kwargs


@torch.no_grad()
def generate_tokens(
    model: AudioLLM,
    tokenizer,
    inputs: Mapping[str, torch.Tensor],
    settings: GenerationSettings,
    *,
    logits_processor: list[LogitsProcessor] | None = None,
    **hooks,
) -> torch.Tensor:
    """Generate answers to left-padded prompts; returns only the new token ids (B, T_new).

    Args:
        model: the audio LLM (in eval mode; its device receives the inputs).
        tokenizer: the LLM's tokenizer (its stop and pad tokens).
        inputs: the processor's output for prompts built with `add_generation_prompt=True`, or the
            same with encoder frames in place of features (`audio_frames`, `frame_lengths`).
        settings: length, sampling and penalties.
        logits_processor: more processors, run after the settings' sampler (the server's per-row sampler).
        hooks: passed on to `generate` as they are: `streamer`, `stopping_criteria` (the loop stop of
            `settings.stop_loops` is added to the latter).
    """
    kwargs = generate_kwargs(settings, tokenizer, getattr(model.llm, "generation_config", None))
    if logits_processor:
        kwargs["logits_processor"] = LogitsProcessorList([*kwargs.get("logits_processor", []), *logits_processor])
    if settings.stop_loops:
        criteria = [*hooks.get("stopping_criteria", []), _LoopStop(settings.stop_loops)]
        hooks["stopping_criteria"] = StoppingCriteriaList(criteria)
    device = model.device
    inputs = {k: v.to(device) if torch.is_tensor(v) else v for k, v in inputs.items()}
    return model.generate(**inputs, **kwargs, **hooks)


def answer_conversations(
    model: AudioLLM, processor: AudioProcessor, conversations: list[list[dict]], settings: GenerationSettings
) -> list[str]:
    """Answer a batch of conversations, each ending before its reply; returns the answers, stripped."""
    batch = processor(conversations, add_generation_prompt=True)  # left-padded
    ids = generate_tokens(model, processor.tokenizer, batch, settings)  # (B, T_new)
    return [text.strip() for text in processor.batch_decode(ids)]
