"""Evaluation during training: loss on held-out data, then task metrics on generated answers."""

from __future__ import annotations

import torch

from eardrum.adapters.model import AudioLLM
from eardrum.adapters.processor import AudioProcessor
from eardrum.common.decoding import generate_tokens
from eardrum.common.generation import GenerationSettings
from eardrum.common.metrics import bleu, contains_answer, exact_match, word_error_rate
from eardrum.common.records import Record

from .collate import Collator, model_inputs
from .recipe import Recipe


@torch.no_grad()
def eval_loss(model: AudioLLM, collate: Collator, batch_size: int, cache) -> float:
    """Mean loss per labelled token over all records."""
    total, tokens = 0.0, 0
    for start in range(0, len(collate.records), batch_size):
        batch = collate(list(range(start, min(start + batch_size, len(collate.records)))))
        batch.pop("bad", None)
        if not batch.pop("example_ids"):
            continue
        batch = model_inputs(batch, model, collate.processor, cache)
        n = int((batch["labels"][:, 1:] != -100).sum())
        total += model(**batch).loss.item() * n
        tokens += n
    return total / max(tokens, 1)


@torch.no_grad()
def generate_answers(
    model: AudioLLM, collate: Collator, indices: list[int], settings: GenerationSettings, cache, batch_size: int = 8
) -> list[str]:
    """Answers (stripped) to each record's conversation without its last assistant turn, through the one
    decoding path; with a feature cache the encoder frames come from it instead of being recomputed."""
    answers = []
    processor = collate.processor
    for start in range(0, len(indices), batch_size):
        convs = [collate.conversation(i)[:-1] for i in indices[start : start + batch_size]]
        batch = processor(convs, add_generation_prompt=True, featurize=cache is None)
        batch = model_inputs(batch, model, processor, cache)
        ids = generate_tokens(model, processor.tokenizer, batch, settings)  # (B, T_new)
        answers += [a.strip() for a in processor.batch_decode(ids)]
    return answers


def evaluate(
    model: AudioLLM,
    processor: AudioProcessor,
    records: list[Record],
    recipe: Recipe,
    prompts: dict[str, list[str]],
    cache,
) -> dict:
    """{"loss": ..., "wer": ... (asr), "caption_bleu"/"caption_exact" (caption), "qa_exact"/"qa_contains" (qa)}."""
    was_training = model.training
    model.eval()
    collate = Collator(processor, records, prompts, recipe.train.seed, featurize=cache is None, skip_bad=True)
    result = {"loss": eval_loss(model, collate, recipe.data.batch_size or 8, cache)}
    limit = recipe.train.eval_generate_limit
    settings = GenerationSettings(max_new_tokens=recipe.train.eval_max_new_tokens)  # greedy
    for task in ("asr", "caption", "qa"):
        chosen = [i for i, r in enumerate(records) if r.task == task][:limit]
        if not chosen:
            continue
        answers = generate_answers(model, collate, chosen, settings, cache)
        refs = [collate.conversation(i)[-1]["content"] for i in chosen]
        if task == "asr":
            result["wer"] = word_error_rate(refs, answers)["wer"]
        elif task == "caption":
            result["caption_exact"] = exact_match(answers, refs)
            result["caption_bleu"] = bleu(answers, [[r] for r in refs], smooth=True)
        else:
            result["qa_exact"] = exact_match(answers, refs)
            result["qa_contains"] = contains_answer(answers, refs)
    model.train(was_training)
    return result
