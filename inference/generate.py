"""Batch generation over a manifest: one answer per line, written as it goes, resumable.

A manifest holds lines of any of the three training shapes (see `eardrum.common.records`): audio +
text (asr, caption), audio + question + answer (qa), or messages (chat). The prompt of a line is
its conversation without the last assistant turn; a line that has no answer at all (no ``text``,
no ``answer``, a conversation ending on a user turn) is simply a prompt to answer. asr and caption
lines are asked the task's default prompt ("Transcribe the audio.", "Describe the sound.").

The output has one JSON object per input line, in the order the batches finish:
``{"line": N, "where": ..., "output": ...}`` (plus the input's ``"id"``), or
``{"line": N, "where": ..., "error": ...}`` for a line that could not be answered (bad audio, a
malformed line). Each object is flushed as soon as it is known, so a run that is stopped can be
resumed: a re-run skips the lines already in the output, by line number, and appends the rest.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from eardrum.adapters.model import AudioLLM
from eardrum.adapters.placement import Placement, load_placed, place_model
from eardrum.adapters.processor import AudioProcessor
from eardrum.common.batching import plan_batches
from eardrum.common.decoding import answer_conversations
from eardrum.common.generation import BATCH_SIZE, GenerationSettings
from eardrum.common.records import (
    DEFAULT_PROMPTS,
    DataSource,
    InvalidRecord,
    Record,
    RecordChecker,
    build_conversation,
)

ModelSpec = str | os.PathLike | tuple[AudioLLM, AudioProcessor]  # a checkpoint folder, or a loaded pair
ID_FIELD = "id"  # copied from the input line to its output line, when present
# Stands in for a missing reply so the training checks accept the line; it is cut off with the reply.
_PENDING = "<pending>"
# What a batch may raise because of one of its lines; such a batch is retried line by line.
LINE_ERRORS = (ValueError, OSError, torch.cuda.OutOfMemoryError)


@dataclass
class Prompt:
    """One manifest line ready to be answered."""

    line: int  # 1-based line number in the manifest
    where: str  # "path line N"
    conversation: list[dict]  # processor format, ending before the reply
    reference: str | None  # the line's own reply (text, answer, last assistant turn), if it has one
    clip_samples: tuple[int, ...]  # 16 kHz length of each clip, for batching by length
    raw: dict = field(default_factory=dict)  # the JSON object as written (id, transcript, ...)


@dataclass
class LineError:
    """A manifest line that cannot be answered, and why."""

    line: int
    where: str
    message: str
    raw: dict = field(default_factory=dict)


def default_prompts(prompt: str | None = None) -> dict[str, list[str]]:
    """One prompt per asr / caption task: `prompt` if given, else the task's first default prompt."""
    return {task: [prompt or options[0]] for task, options in DEFAULT_PROMPTS.items()}


def _with_pending_reply(raw: dict, task: str | None) -> tuple[dict, bool]:
    """The line with a stand-in reply where it has none, and whether it had one."""
    task = task or (raw["task"] if isinstance(raw.get("task"), str) else None)  # the line's own, unless forced
    messages = raw.get("messages")
    if task in (None, "chat") and isinstance(messages, list) and messages:
        last = messages[-1]
        if isinstance(last, dict) and last.get("role") == "assistant":
            return raw, True
        return {**raw, "messages": [*messages, {"role": "assistant", "content": _PENDING}]}, False
    is_qa = task == "qa" or (task is None and ("question" in raw or "answer" in raw))
    key = "answer" if is_qa else "text"
    if raw.get(key) is not None or task == "chat" or (task is None and messages is not None):
        return raw, True
    return {**raw, key: _PENDING}, False


def _reply_text(message: dict) -> str:
    content = message["content"]
    return content if isinstance(content, str) else "\n".join(p.get("text", "") for p in content)


class _BadLine(Exception):
    """A line that is not a usable prompt; the message says why."""


def _parse_line(raw_line: bytes) -> Any:
    try:
        return json.loads(raw_line)
    except json.JSONDecodeError as err:
        raise _BadLine(f"not valid JSON ({err.msg} at character {err.pos}); expected one JSON object") from None
    except UnicodeDecodeError:
        raise _BadLine("not UTF-8 text; expected one JSON object per line, in UTF-8") from None


def read_manifest(
    manifest: str | os.PathLike,
    *,
    task: str | None = None,
    prompt: str | None = None,
    require_reference: bool = False,
    max_audio_seconds: float | None = None,
) -> tuple[list[Prompt], list[LineError]]:
    """Read a manifest into prompts, with the same checks and path resolution as training data.

    Args:
        manifest: a JSONL file; relative audio paths resolve against its folder.
        task: force a task ("asr", "caption", "qa", "chat"); None infers it per line.
        prompt: the prompt for asr / caption lines (default: the task's first default prompt).
        require_reference: a line without its reply is an error (for evaluation).
        max_audio_seconds: longer clips are errors; None accepts any length.

    Returns:
        The answerable lines, and one error per line that is not (blank lines are skipped).

    Raises:
        ValueError: the manifest cannot be read, or `task` is unknown.
    """
    path = os.fspath(manifest)
    source = DataSource(path=path, task=task)
    if source.problems():
        raise ValueError(f"{path}: " + "; ".join(source.problems()))
    if not os.path.isfile(path):
        raise ValueError(f"manifest {path}: {'not a file' if os.path.exists(path) else 'no such file'}")
    base = os.path.dirname(os.path.abspath(path))
    checker = RecordChecker(max_audio_seconds, "all_assistant")
    prompts_by_task, prompts, errors = default_prompts(prompt), [], []
    with open(path, "rb") as f:
        for number, raw_line in enumerate(f, 1):
            if not raw_line.strip():
                continue
            where, raw = f"{path} line {number}", {}
            try:
                raw = _parse_line(raw_line)
                filled, has_reply = _with_pending_reply(raw, task) if isinstance(raw, dict) else (raw, True)
                if require_reference and not has_reply:
                    raise _BadLine("no reference answer (text, answer or a last assistant turn) to score against")
                record = checker.record(filled, where, base, source)
            except (_BadLine, InvalidRecord) as err:  # the training checks' per-line problem
                errors.append(LineError(number, where, str(err), raw if isinstance(raw, dict) else {}))
                continue
            prompts.append(_prompt(number, record, prompts_by_task, has_reply, raw))
    return prompts, errors


def _prompt(number: int, record: Record, prompts: dict[str, list[str]], has_reply: bool, raw: dict) -> Prompt:
    conversation = build_conversation(record, prompts, seed=0)
    reference = _reply_text(conversation[-1]) if has_reply else None
    return Prompt(number, record.where, conversation[:-1], reference, record.clip_samples, raw)


def prompt_length(processor: AudioProcessor, prompt: Prompt) -> int:
    """Tokens the prompt takes, audio and text (the chat template's own tokens left out)."""
    texts = []
    for message in prompt.conversation:
        content = message["content"]
        texts += [content] if isinstance(content, str) else [p["text"] for p in content if p.get("type") == "text"]
    text_tokens = len(processor.tokenizer("\n".join(texts), add_special_tokens=False)["input_ids"])
    return max(1, text_tokens + sum(processor.clip_num_tokens(n) for n in prompt.clip_samples))


def _audio_paths(conversation: list[dict]) -> list[str]:
    return [
        p["audio"]
        for m in conversation
        if isinstance(m["content"], list)
        for p in m["content"]
        if p.get("type") == "audio" and isinstance(p.get("audio"), str)
    ]


def _error_text(err: BaseException, prompt: Prompt) -> str:
    """The error, with the line's audio files named when the message does not say which (the processor
    names a clip by its place in the batch, which means nothing once the batch is gone)."""
    text = f"{type(err).__name__}: {err}"
    missing = [p for p in _audio_paths(prompt.conversation) if p not in text]
    return f"{text} (audio: {', '.join(missing)})" if missing else text


ResultFn = Callable[[Prompt, str | None, str | None], None]  # (prompt, output, error): one is None


def _answer(model, processor, prompts: list[Prompt], settings: GenerationSettings, on_result: ResultFn) -> None:
    """Answer prompts as one batch; if that fails, one at a time so only the bad line is an error."""
    try:
        outputs = answer_conversations(model, processor, [p.conversation for p in prompts], settings)
    except LINE_ERRORS as err:
        if len(prompts) == 1:
            on_result(prompts[0], None, _error_text(err, prompts[0]))
            return
        for prompt in prompts:
            _answer(model, processor, [prompt], settings, on_result)
        return
    for prompt, output in zip(prompts, outputs):
        on_result(prompt, output, None)


def run_prompts(
    model: AudioLLM,
    processor: AudioProcessor,
    prompts: Sequence[Prompt],
    settings: GenerationSettings,
    on_result: ResultFn,
    *,
    batch_size: int = BATCH_SIZE,
    desc: str = "generate",
    progress: bool = True,
) -> None:
    """Answer every prompt in batches of similar length; `on_result` gets each answer or error.

    Batches follow the manifest's order at the scale of `CHUNK_BATCHES` batches (see
    `eardrum.common.batching`); inside that, similar lengths are batched together.
    """
    from tqdm.auto import tqdm

    if not prompts:
        return
    lengths = [prompt_length(processor, p) for p in prompts]
    batches = plan_batches(lengths, range(len(prompts)), batch_size=batch_size)
    batches.sort(key=min)  # predictable progress through the file; lengths stay grouped within a batch
    with tqdm(total=len(prompts), desc=desc, unit="line", disable=not progress, dynamic_ncols=True) as bar:
        for batch in batches:
            _answer(model, processor, [prompts[i] for i in batch], settings, on_result)
            bar.update(len(batch))


def resolve_model(model: ModelSpec, placement: Placement | None = None) -> tuple[AudioLLM, AudioProcessor]:
    """A loaded (model, processor) pair: a checkpoint folder is loaded by `load_placed` (default placement:
    the GPU when there is one, dtype "auto"), as `eardrum chat` loads it; a given pair is placed only
    when a placement is given."""
    if not isinstance(model, tuple):
        return load_placed(model, placement or Placement())
    loaded, processor = model
    if placement is not None:
        place_model(loaded, placement)
    return loaded.eval(), processor


def check_run_settings(settings: GenerationSettings, batch_size: int) -> None:
    """Raise one ValueError listing every problem with the decoding settings and the batch size."""
    problems = settings.problems()
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        problems.append(f"batch_size: expected a positive integer, got {batch_size!r}")
    if problems:
        raise ValueError("invalid settings: " + "; ".join(problems))


def read_done(out: str | os.PathLike) -> set[int]:
    """Line numbers already in an output file. A last line cut off mid-write is removed (it is redone)."""
    path = Path(out)
    if not path.exists():
        return set()
    content = path.read_bytes()
    if content and not content.endswith(b"\n"):
        keep = content.rfind(b"\n") + 1
        with path.open("r+b") as f:
            f.truncate(keep)
        content = content[:keep]
    done = set()
    for k, raw_line in enumerate(content.splitlines(), 1):
        if not raw_line.strip():
            continue
        try:
            obj = json.loads(raw_line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            obj = None
        if not isinstance(obj, dict) or isinstance(obj.get("line"), bool) or not isinstance(obj.get("line"), int):
            raise ValueError(
                f"{path} line {k}: expected a JSON object with an integer 'line' (the output of a run that this one "
                "would resume); choose another output file or remove this one"
            )
        done.add(obj["line"])
    return done


def output_row(line: int, where: str, raw: dict, **result: str) -> dict:
    """The output object of one line: line, where, the input's id if any, then output or error."""
    row: dict[str, Any] = {"line": line, "where": where}
    if ID_FIELD in raw:
        row[ID_FIELD] = raw[ID_FIELD]
    return {**row, **result}


def generate_manifest(
    model: ModelSpec,
    manifest: str | os.PathLike,
    out: str | os.PathLike,
    *,
    batch_size: int = BATCH_SIZE,
    settings: GenerationSettings | None = None,
    task: str | None = None,
    prompt: str | None = None,
    placement: Placement | None = None,
    progress: bool = True,
) -> dict:
    """Answer every line of a manifest into a JSONL file, resuming where an earlier run stopped.

    Args:
        model: a checkpoint folder, or a loaded (model, processor) pair.
        manifest: the input JSONL (see this module's docstring).
        out: the output JSONL; lines already in it are skipped, the rest appended.
        batch_size: prompts per `generate` call.
        settings: decoding settings (default: greedy, `GenerationSettings()`'s length).
        task, prompt: force the task of every line; the prompt of asr / caption lines.
        placement: where and in which precision to run the model (see `resolve_model`).
        progress: show a progress bar.

    Returns:
        {"lines", "done", "skipped", "errors", "seconds", "out"}: lines in the manifest; lines answered
        now; lines skipped because `out` had them; errors written now; wall time.
    """
    start = time.perf_counter()
    settings = settings or GenerationSettings()
    check_run_settings(settings, batch_size)
    if os.path.abspath(out) == os.path.abspath(manifest):
        raise ValueError(f"out: {out} is the manifest itself; answers would be appended to their own input")
    prompts, errors = read_manifest(manifest, task=task, prompt=prompt)
    done = read_done(out)
    todo = [p for p in prompts if p.line not in done]
    new_errors = [e for e in errors if e.line not in done]
    counts = {"done": 0, "errors": len(new_errors)}
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    with open(out, "a", encoding="utf-8") as f:

        def write(row: dict) -> None:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            f.flush()  # a stopped run keeps everything answered so far

        for e in new_errors:
            write(output_row(e.line, e.where, e.raw, error=e.message))

        def on_result(p: Prompt, output: str | None, error: str | None) -> None:
            counts["done" if error is None else "errors"] += 1
            write(output_row(p.line, p.where, p.raw, **({"output": output} if error is None else {"error": error})))

        if todo:  # nothing left to answer: no need to load the model
            loaded, processor = resolve_model(model, placement)
            run_prompts(loaded, processor, todo, settings, on_result, batch_size=batch_size, progress=progress)
    lines = len(prompts) + len(errors)
    skipped = lines - len(todo) - len(new_errors)
    seconds = time.perf_counter() - start
    return {"lines": lines, **counts, "skipped": skipped, "seconds": seconds, "out": str(out)}


def format_generate_summary(summary: dict) -> str:
    """One line: lines done, skipped, errors, seconds."""
    return (
        f"{summary['lines']} lines: {summary['done']} done, {summary['skipped']} skipped (already in "
        f"{summary['out']}), {summary['errors']} errors, {summary['seconds']:.1f} s"
    )
