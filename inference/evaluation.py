"""Evaluate a checkpoint on a manifest: WER/CER for asr, accuracy for qa, BLEU-4/CIDEr-D for captions.

Every line is answered greedily (with `eardrum.inference.generate`'s batching) and scored against its
own reply with `eardrum.common.metrics`, whose normaliser is documented there (casing,
punctuation and formatting do not count; numbers are not spelled out). Corpus scores pool over the
lines that were answered; lines that could not be (bad audio, no reference) are listed with their
error and left out of the scores.

Parity (``parity=True``): each line is also asked with its ``transcript`` written as text where the
audio was, and both runs are scored on the same lines. The gap, text minus audio, is what the audio
path loses against reading the words (for WER and CER, where lower is better, a negative gap).
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, replace
from pathlib import Path

from eardrum.adapters.placement import Placement
from eardrum.adapters.processor import text_in_place_of_audio
from eardrum.common.generation import BATCH_SIZE, GenerationSettings
from eardrum.common.metrics import (
    bleu,
    character_error_rate,
    cider,
    contains_answer,
    exact_match,
    sacrebleu_bleu,
    sacrebleu_settings,
    word_error_rate,
    word_error_rate_whisper,
)

from .generate import (
    ModelSpec,
    Prompt,
    check_run_settings,
    output_row,
    read_manifest,
    resolve_model,
    run_prompts,
)

EVAL_TASKS = ("asr", "qa", "caption")
METRICS = {  # what each task reports, in table order
    "asr": ("wer", "wer_whisper_norm", "cer"),
    "qa": ("exact_match", "contains_answer"),
    "caption": ("bleu4", "bleu4_sacrebleu", "cider_d", "exact_match"),
}
METRIC_NOTES = {  # what each metric is, written into summary.json and under the table
    "wer": "WER after eardrum's normaliser (lower case, punctuation removed, numbers as written)",
    "wer_whisper_norm": "WER after Whisper's English normaliser (whisper-normalizer), as published results use",
    "cer": "character error rate after eardrum's normaliser",
    "exact_match": "the answer equals a reference after eardrum's normaliser",
    "contains_answer": "a reference appears in the answer after eardrum's normaliser",
    "bleu4": "corpus BLEU-4 on eardrum-normalised words (equals sacrebleu's on the same words)",
    "bleu4_sacrebleu": "corpus BLEU-4 by sacrebleu on the raw texts, signature {signature} (each item's own "
                       "references)",
    "cider_d": "CIDEr-D as the COCO caption scorer defines it (0.9614 on aac-metrics' published example, as "
               "aac-metrics gives)",
}
TRANSCRIPT_FIELD = "transcript"


def corpus_scores(task: str, references: list[str], hypotheses: list[str]) -> dict[str, float]:
    """The task's corpus metrics (see `METRICS`), pooled over all items."""
    if task == "asr":
        return {
            "wer": word_error_rate(references, hypotheses)["wer"],
            "wer_whisper_norm": word_error_rate_whisper(references, hypotheses)["wer"],
            "cer": character_error_rate(references, hypotheses)["cer"],
        }
    if task == "qa":
        return {
            "exact_match": exact_match(hypotheses, references),
            "contains_answer": contains_answer(hypotheses, references),
        }
    return {
        "bleu4": bleu(hypotheses, references),
        "bleu4_sacrebleu": sacrebleu_bleu(hypotheses, references)[0],
        "cider_d": cider(hypotheses, references),
        "exact_match": exact_match(hypotheses, references),
    }


def metric_notes(task: str) -> dict[str, str]:
    """What each of the task's metrics is (`METRIC_NOTES`), sacrebleu's signature filled in."""
    notes = {name: METRIC_NOTES[name] for name in METRICS[task]}
    if "bleu4_sacrebleu" in notes:
        notes["bleu4_sacrebleu"] = notes["bleu4_sacrebleu"].format(signature=sacrebleu_settings())
    return notes


def item_scores(task: str, reference: str, hypothesis: str) -> dict[str, float]:
    """One item's scores. Caption BLEU-4 is smoothed here (one short caption rarely shares a 4-gram);
    CIDEr-D weighs n-grams by how many items share them, so it exists only for the corpus."""
    if task == "caption":
        smoothed = bleu([hypothesis], [reference], smooth=True)
        return {"bleu4": smoothed, "exact_match": exact_match([hypothesis], [reference])}
    return corpus_scores(task, [reference], [hypothesis])


def _text_prompts(prompts: list[Prompt], manifest: str) -> list[Prompt]:
    """The parity twin of each prompt; lines without a transcript are a ValueError naming them."""
    missing = [str(p.line) for p in prompts if not _transcript(p)]
    if missing:
        shown = ", ".join(missing[:10]) + (f" and {len(missing) - 10} more" if len(missing) > 10 else "")
        which = f"line {shown} has none" if len(missing) == 1 else f"lines {shown} have none"
        raise ValueError(
            f"--parity needs a non-empty {TRANSCRIPT_FIELD!r} field (the words of the audio) on every line; "
            f"{manifest} {which}"
        )
    # No clips are left, so the batching lengths count text only.
    return [
        replace(p, conversation=text_in_place_of_audio(p.conversation, _transcript(p)), clip_samples=())
        for p in prompts
    ]


def _transcript(prompt: Prompt) -> str | None:
    value = prompt.raw.get(TRANSCRIPT_FIELD)
    return value if isinstance(value, str) and value.strip() else None


def _answers(model, processor, prompts: list[Prompt], settings, batch_size: int, mode: str, progress: bool) -> dict:
    """line -> (output, error) for every prompt."""
    results: dict[int, tuple[str | None, str | None]] = {}

    def on_result(prompt: Prompt, output: str | None, error: str | None) -> None:
        results[prompt.line] = (output, error)

    run_prompts(
        model, processor, prompts, settings, on_result, batch_size=batch_size, desc=f"eval ({mode})", progress=progress
    )
    return results


def _finite(value: float) -> float | None:
    """JSON has no infinity: a WER over empty references (see the metrics) is written as null."""
    return value if math.isfinite(value) else None


def _rows(task: str, prompts: list[Prompt], answers: dict[str, dict], errors) -> tuple[list[dict], dict]:
    """Per-example rows (scored lines and errors, in line order) and the corpus scores per mode."""
    rows, scored = [], {mode: ([], []) for mode in answers}
    for p in prompts:
        results = {mode: answers[mode][p.line] for mode in answers}
        failed = [f"{mode}: {err}" if len(answers) > 1 else err for mode, (_, err) in results.items() if err]
        row = output_row(p.line, p.where, p.raw, reference=p.reference)
        if failed:
            rows.append({**row, "error": "; ".join(failed)})
            continue
        for mode, (output, _) in results.items():
            suffix = "" if mode == "audio" else f"_{mode}"
            scores = {k: _finite(v) for k, v in item_scores(task, p.reference, output).items()}
            row.update({f"hypothesis{suffix}": output, f"scores{suffix}": scores})
            scored[mode][0].append(p.reference)
            scored[mode][1].append(output)
        if len(answers) > 1:
            row[TRANSCRIPT_FIELD] = _transcript(p)
        rows.append(row)
    rows += [output_row(e.line, e.where, e.raw, error=e.message) for e in errors]
    rows.sort(key=lambda r: r["line"])
    metrics = {
        mode: {k: _finite(v) for k, v in corpus_scores(task, refs, hyps).items()} if refs else {}
        for mode, (refs, hyps) in scored.items()
    }
    return rows, metrics


def evaluate_manifest(
    model: ModelSpec,
    manifest: str | os.PathLike,
    task: str,
    *,
    out_dir: str | os.PathLike | None = None,
    parity: bool = False,
    text_only: bool = False,
    batch_size: int = BATCH_SIZE,
    settings: GenerationSettings | None = None,
    prompt: str | None = None,
    placement: Placement | None = None,
    progress: bool = True,
) -> dict:
    """Answer and score every line of a manifest; write per_example.jsonl and summary.json to `out_dir`.

    Args:
        model: a checkpoint folder, or a loaded (model, processor) pair.
        manifest: JSONL whose lines have the task's shape and reply (text for asr / caption, answer
            for qa); with `parity`, a ``transcript`` too.
        task: "asr", "qa" or "caption"; every line is read as that task.
        out_dir: where to write the two files; None writes nothing.
        parity: also answer with the transcript in place of the audio and report the gap.
        text_only: answer only with the transcript in place of the audio: the LLM's own accuracy on
            the same lines (the projector is not used); the metrics are those of the text answers.
        batch_size, settings, prompt, placement, progress: as for `generate_manifest`.

    Returns:
        The summary: {"task", "manifest", "model", "lines", "scored", "errors", "mode" ("audio", or
        "text" with `text_only`: what "metrics" scores), "metrics", "settings", "seconds"}, plus
        "parity": {"audio", "text", "gap"} with `parity`.

    Raises:
        ValueError: an unknown task, a manifest that cannot be read, no transcript with `parity` or
            `text_only`, both of them at once.
    """
    start = time.perf_counter()
    if task not in EVAL_TASKS:
        raise ValueError(f"task: expected one of {', '.join(EVAL_TASKS)}, got {task!r}")
    if parity and text_only:
        raise ValueError("parity and text_only: expected at most one (parity already answers with the text too)")
    settings = settings or GenerationSettings()
    check_run_settings(settings, batch_size)
    prompts, errors = read_manifest(manifest, task=task, prompt=prompt, require_reference=True)
    text = _text_prompts(prompts, os.fspath(manifest)) if parity or text_only else []
    runs = {"text": text} if text_only else {"audio": prompts, **({"text": text} if parity else {})}
    answers = {}
    if prompts:
        loaded, processor = resolve_model(model, placement)
        for mode, items in runs.items():
            answers[mode] = _answers(loaded, processor, items, settings, batch_size, mode, progress)
    rows, metrics = _rows(task, prompts, answers, errors)
    summary = {
        "task": task,
        "manifest": os.fspath(manifest),
        "model": os.fspath(model) if not isinstance(model, tuple) else "(in-memory model)",
        "lines": len(prompts) + len(errors),
        "scored": sum(1 for r in rows if "error" not in r),
        "errors": sum(1 for r in rows if "error" in r),
        "mode": "text" if text_only else "audio",
        "metrics": metrics.get("text" if text_only else "audio", {}),
        "metric_notes": metric_notes(task),
        "settings": {**asdict(settings), "batch_size": batch_size},
    }
    if parity:
        summary["parity"] = _parity(metrics, task)
    summary["seconds"] = time.perf_counter() - start
    if out_dir is not None:
        write_results(out_dir, rows, summary)
    return summary


def _parity(metrics: dict[str, dict], task: str) -> dict:
    audio, text = metrics.get("audio", {}), metrics.get("text", {})
    gap = {k: _difference(text.get(k), audio.get(k)) for k in METRICS[task] if k in audio and k in text}
    return {"audio": audio, "text": text, "gap": gap}


def _difference(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def write_results(out_dir: str | os.PathLike, rows: list[dict], summary: dict) -> None:
    """per_example.jsonl (one row per line) and summary.json in `out_dir`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with (out / "per_example.jsonl").open("w", encoding="utf-8") as f:
        f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    (out / "summary.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n")


def format_table(summary: dict) -> str:
    """A short table of the metrics (audio, or text with `text_only`; audio, text and gap with parity)."""
    head = (
        f"eval {summary['task']} on {summary['manifest']}: {summary['lines']} lines, "
        f"{summary['scored']} scored, {summary['errors']} errors"
    )
    parity = summary.get("parity")
    columns = ("audio", "text", "gap (text - audio)") if parity else (f"score ({summary.get('mode', 'audio')})",)
    lines = [head, f"{'metric':<16}" + "".join(f"{c:>20}" for c in columns)]
    for name in METRICS[summary["task"]]:
        values = [parity[k].get(name) for k in ("audio", "text", "gap")] if parity else [summary["metrics"].get(name)]
        lines.append(f"{name:<16}" + "".join(f"{_fmt(v, i == 2):>20}" for i, v in enumerate(values)))
    notes = summary.get("metric_notes") or metric_notes(summary["task"])
    lines += [f"  {name}: {note}" for name, note in notes.items()]
    return "\n".join(lines)


def _fmt(value: float | None, signed: bool) -> str:
    if value is None:
        return "-"
    return f"{value:+.4f}" if signed else f"{value:.4f}"
