"""Targets from the LLM itself: train the audio path to behave like the text the LLM already reads.

For each spoken item with a `transcript`, the base LLM answers the transcript given as text; that
answer becomes the training target for the audio. No answer labels are needed, and the LLM keeps its
own knowledge and style, because the adapter only learns to make audio look like the text.

    distill_manifest(model, processor, "qa_train.jsonl", "qa_train.distilled.jsonl")

Input lines: `{"audio": ..., "transcript": "what is the capital of france?", ...}`. Output lines are
conversations: `{"messages": [user: [audio (+ the line's `question` as text, if any)], assistant: answer],
"transcript": ..., "source_line": N}`, with audio paths made absolute.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from eardrum.adapters.model import AudioLLM
from eardrum.adapters.processor import AudioProcessor

logger = logging.getLogger(__name__)


class DistillError(ValueError):
    """A manifest line that cannot be distilled; the message names the file and line."""


def _read_items(manifest: Path) -> list[tuple[int, dict]]:
    items, problems = [], []
    for n, raw in enumerate(manifest.read_text().splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            item = json.loads(raw)
        except json.JSONDecodeError as err:
            problems.append(f"{manifest} line {n}: not JSON ({err.msg})")
            continue
        if not isinstance(item, dict) or not str(item.get("transcript", "")).strip() or "audio" not in item:
            problems.append(f"{manifest} line {n}: expected an object with 'audio' and a non-empty 'transcript'")
            continue
        audio = item["audio"]
        if isinstance(audio, str) and not Path(audio).is_absolute():
            item["audio"] = str((manifest.parent / audio).resolve())
        items.append((n, item))
    if problems:
        raise DistillError(f"{len(problems)} problem(s):\n  - " + "\n  - ".join(problems))
    return items


def text_prompt(item: dict) -> list[dict]:
    """The text-only conversation whose answer becomes the target: the transcript in the audio's place."""
    question = str(item.get("question", "")).strip()
    content = item["transcript"] if not question else f"{item['transcript']}\n{question}"
    return [{"role": "user", "content": content}]


def audio_prompt(item: dict) -> list[dict]:
    """The same conversation with the recording in place of its transcript."""
    parts = [{"type": "audio", "audio": item["audio"]}]
    if str(item.get("question", "")).strip():
        parts.append({"type": "text", "text": item["question"]})
    return [{"role": "user", "content": parts}]


@torch.no_grad()
def answer_as_text(
    model: AudioLLM, processor: AudioProcessor, prompts: list[list[dict]], max_new_tokens: int = 64
) -> list[str]:
    """Greedy answers of the LLM to text-only conversations (no audio involved)."""
    batch = processor(prompts, add_generation_prompt=True)
    batch = {k: v.to(model.device) for k, v in batch.items()}
    ids = model.generate(
        **batch, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=processor.tokenizer.pad_token_id
    )
    return [a.strip() for a in processor.batch_decode(ids)]


def distill_manifest(
    model: AudioLLM,
    processor: AudioProcessor,
    manifest: str | Path,
    out: str | Path,
    *,
    batch_size: int = 16,
    max_new_tokens: int = 64,
) -> dict:
    """Write `out`: each item's audio conversation with the LLM's own text answer as the target.

    Items already in `out` (matched by source line) are kept, so an interrupted run resumes.
    Returns {"items", "written", "kept", "empty"}; items whose answer is empty are left out.
    """
    manifest, out = Path(manifest), Path(out)
    items = _read_items(manifest)
    done = set()
    if out.is_file():
        done = {json.loads(line)["source_line"] for line in out.read_text().splitlines() if line.strip()}
    todo = [(n, item) for n, item in items if n not in done]
    written = empty = 0
    was_training = model.training
    model.eval()
    with out.open("a") as f:
        for start in range(0, len(todo), batch_size):
            chunk = todo[start : start + batch_size]
            answers = answer_as_text(model, processor, [text_prompt(item) for _, item in chunk], max_new_tokens)
            for (n, item), answer in zip(chunk, answers):
                if not answer:
                    empty += 1
                    continue
                messages = [*audio_prompt(item), {"role": "assistant", "content": answer}]
                f.write(json.dumps({"messages": messages, "transcript": item["transcript"], "source_line": n}) + "\n")
                written += 1
            f.flush()
    model.train(was_training)
    logger.info("distilled %s -> %s: %d written, %d kept, %d empty answers", manifest, out, written, len(done), empty)
    return {"items": len(items), "written": written, "kept": len(done), "empty": empty}
