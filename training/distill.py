"""Targets from the LLM itself: train the audio path to behave like the text the LLM already reads.

For each spoken item with a `transcript`, the base LLM answers the transcript given as text; that
answer becomes the training target for the audio. No answer labels are needed, and the LLM keeps its
own knowledge and style, because the adapter only learns to make audio look like the text.

    distill_manifest(model, processor, "qa_train.jsonl", "qa_train.distilled.jsonl")

Input lines: `{"audio": ..., "transcript": "what is the capital of france?", ...}`. Output lines are
conversations: `{"messages": [user: [audio (+ the line's `question` as text, if any)], assistant: answer],
"transcript": ..., "source_line": N}`, with audio paths made absolute.

For a model with transcript hints (`model.transcript_hint`), `filter_by_hint` keeps the transcription lines
whose text Whisper's own transcript (the hint the model reads) already comes close to: where the hint and the
target disagree widely, the model learns to rewrite the hint from audio it cannot yet hear as well as Whisper,
and does so on every voice it meets later; with `hint_targets` the kept lines' targets are the hints themselves
(distilled transcription targets: the model learns to copy what it reads).

Training on those lines can go further than the answer's tokens: with `distill.kl_weight` in a recipe,
`teacher_kl` also matches the audio model's whole next-token distribution, position by position, to
the base LLM's distribution on the same conversation with the transcript in the audio's place (the
text teacher). Every answer token then carries the teacher's full belief, not one sampled word.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from eardrum.adapters.model import AudioLLM, labelled_positions, takes_logits_to_keep
from eardrum.adapters.processor import AudioProcessor, text_in_place_of_audio
from eardrum.common.decoding import answer_conversations
from eardrum.common.generation import GenerationSettings

logger = logging.getLogger(__name__)


class DistillError(ValueError):
    """A manifest line that cannot be distilled; the message names the file and line."""


def _read_items(manifest: Path, field: str, expected: str, problems: list[str]) -> list[tuple[int, dict]]:
    """(line number, item) of each JSON object of `manifest` with an 'audio' and a non-empty `field`, its
    audio path made absolute; every other line is added to `problems`, named by file and line, with
    `expected` saying what a line must be."""
    items = []
    for n, raw in enumerate(manifest.read_text().splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            item = json.loads(raw)
        except json.JSONDecodeError as err:
            problems.append(f"{manifest} line {n}: not JSON ({err.msg})")
            continue
        if not isinstance(item, dict) or not str(item.get(field, "")).strip() or "audio" not in item:
            problems.append(f"{manifest} line {n}: expected {expected}")
            continue
        audio = item["audio"]
        if isinstance(audio, str) and not Path(audio).is_absolute():
            item["audio"] = str((manifest.parent / audio).resolve())
        items.append((n, item))
    return items


def _raise_problems(problems: list[str]) -> None:
    if problems:
        raise DistillError(f"{len(problems)} problem(s):\n  - " + "\n  - ".join(problems))


def text_prompt(item: dict) -> list[dict]:
    """The text-only conversation whose answer becomes the target: the transcript in the audio's place."""
    return text_in_place_of_audio(audio_prompt(item), item["transcript"])


def audio_prompt(item: dict) -> list[dict]:
    """The same conversation with the recording in place of its transcript."""
    parts = [{"type": "audio", "audio": item["audio"]}]
    if str(item.get("question", "")).strip():
        parts.append({"type": "text", "text": item["question"]})
    return [{"role": "user", "content": parts}]


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
    problems: list[str] = []
    items = _read_items(manifest, "transcript", "an object with 'audio' and a non-empty 'transcript'", problems)
    _raise_problems(problems)
    done = set()
    if out.is_file():
        done = {json.loads(line)["source_line"] for line in out.read_text().splitlines() if line.strip()}
    todo = [(n, item) for n, item in items if n not in done]
    settings = GenerationSettings(max_new_tokens=max_new_tokens)  # greedy: the LLM's likeliest answer
    written = empty = 0
    was_training = model.training
    model.eval()
    with out.open("a") as f:
        for start in range(0, len(todo), batch_size):
            chunk = todo[start : start + batch_size]
            answers = answer_conversations(model, processor, [text_prompt(item) for _, item in chunk], settings)
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


def _base_llm(llm: torch.nn.Module):
    """The LLM without its LoRA adapters (peft's `disable_adapter`), or as it is when it has none."""
    return llm.disable_adapter() if hasattr(llm, "peft_config") else contextlib.nullcontext()


def teacher_kl(
    model: AudioLLM,
    student_logits: torch.Tensor,
    student_labels: torch.Tensor,
    teacher: dict,
    temperature: float = 1.0,
    positions: torch.Tensor | None = None,
) -> torch.Tensor:
    """KL(text teacher || audio student) over the labelled tokens of the rows that have a teacher.

    Args:
        model: the audio model; its LLM, adapters switched off, is the teacher (no gradient).
        student_logits: (B, T, V) from the audio conversations; student_labels: (B, T), -100 = unlabelled.
        teacher: `input_ids`, `attention_mask`, `labels` (R, T_text) of the text conversations and `rows`
            (R,): which of the B rows each belongs to (see `Collator`).
        temperature: both distributions are softened by it; the loss is scaled by its square.
        positions: (K,) when the student's logits were kept only there (`labelled_logits_only`):
            student_logits is then (B, K, V), its k-th column the prediction at position positions[k].

    Returns:
        The mean KL per labelled token (a scalar). Row r's labelled tokens in the student and in its
        teacher are the same answer tokens in the same order; a differing count is a ValueError.
    """
    rows = teacher["rows"].to(student_logits.device)
    # Logits at position t predict token t + 1: on both sides keep the labelled predictions, in order.
    text_labels = teacher["labels"].to(model.device)
    kept = labelled_positions(text_labels)  # (K_text,)
    extra = {"logits_to_keep": kept} if takes_logits_to_keep(model.llm) else {}
    with torch.no_grad(), _base_llm(model.llm):
        logits = model.llm(
            input_ids=teacher["input_ids"].to(model.device),
            attention_mask=teacher["attention_mask"].to(model.device),
            **extra,
        ).logits  # (R, K_text, V), or (R, T_text, V) without logits_to_keep
    if not extra:
        kept = torch.arange(logits.shape[1], device=logits.device)
    logits = logits[:, kept < text_labels.shape[1] - 1]
    kept = kept[kept < text_labels.shape[1] - 1]
    if positions is None:
        positions = torch.arange(student_logits.shape[1], device=student_logits.device)
    student_logits = student_logits[:, positions < student_labels.shape[1] - 1]  # the last position predicts
    positions = positions[positions < student_labels.shape[1] - 1]  # nothing: there is no next token
    want = student_labels[rows][:, positions + 1] != -100  # (R, K)
    have = text_labels[:, kept + 1].to(want.device) != -100  # (R, K_text)
    if not torch.equal(want.sum(1), have.sum(1)):
        raise ValueError(
            f"text teacher: labelled tokens per row differ (audio {want.sum(1).tolist()}, text {have.sum(1).tolist()});"
            " the answer must render to the same tokens with the transcript in the audio's place"
        )
    student = student_logits[rows][want].float() / temperature  # (N, V)
    target = logits[have].float() / temperature  # (N, V)
    if student.shape[0] == 0:
        return student_logits.sum() * 0.0
    kl = F.kl_div(F.log_softmax(student, -1), F.log_softmax(target, -1), log_target=True, reduction="batchmean")
    return kl * temperature**2


# what each line of a transcription manifest must be
TRANSCRIPTION_LINE = "an object with an 'audio' path and a non-empty 'text'"
HINT_CHUNK = 64  # clips per transcriber call in filter_by_hint (bounded memory, progress in the log)


def _with_speech(rows: list[tuple[int, dict]]) -> list[tuple[int, dict]]:
    """The rows whose clip is not marked as holding no speech (`"transcript": ""`): those a hint filter decodes."""
    return [(n, item) for n, item in rows if item.get("transcript") != ""]


def _transcribe_items(transcriber: Callable[[list], list[str]], manifest: Path, items: list[tuple[int, dict]],
                      window_seconds: float, problems: list[str]) -> dict[int, str]:
    """{line number: `transcriber`'s transcript of its clip} for `items` ((line, item) with an absolute 'audio'),
    HINT_CHUNK clips per call; a clip longer than `window_seconds` is transcribed window by window, the texts
    joined. A clip that cannot be read is added to `problems` (named by `manifest` and line) and skipped."""
    from eardrum.adapters.audio import SAMPLING_RATE, AudioError, load_audio
    from eardrum.adapters.config import plan_windows

    window = int(window_seconds * SAMPLING_RATE)
    hints: dict[int, str] = {}
    for start in range(0, len(items), HINT_CHUNK):
        windows, owners = [], []
        for n, item in items[start : start + HINT_CHUNK]:
            try:
                wave = load_audio(item["audio"], name=f"{manifest} line {n} ({item['audio']})")
            except AudioError as err:
                problems.append(str(err))
                continue
            for a, b in plan_windows(len(wave), window):
                windows.append(wave[a:b])
                owners.append(n)
        for n, text in zip(owners, transcriber(windows) if windows else []):
            hints[n] = f"{hints[n]} {text}" if n in hints else text
        logger.info("hints of %s: %d of %d clips transcribed", manifest, min(start + HINT_CHUNK, len(items)),
                    len(items))
    return hints


def transcribe_hints(transcriber: Callable[[list], list[str]], manifest: str | Path, *, window_seconds: float = 30.0,
                     share: int = 0, shares: int = 1) -> dict[int, str]:
    """{line number: transcript} for the clips with speech of the transcription manifest `manifest`, as
    `filter_by_hint` decodes them; with `shares` > 1 only every `shares`-th of them from the `share`-th
    (0-based), so that several processes can fill one transcript cache. Raises DistillError naming every bad
    line and every clip of this share that cannot be read (after the rest of the share is decoded)."""
    if not 0 <= share < shares:
        raise ValueError(f"share: expected 0 <= share < shares={shares}, got {share}")
    manifest = Path(manifest)
    problems: list[str] = []
    rows = _read_items(manifest, "text", TRANSCRIPTION_LINE, problems)
    hints = _transcribe_items(transcriber, manifest, _with_speech(rows)[share::shares], window_seconds, problems)
    _raise_problems(problems)
    return hints


def filter_by_hint(
    transcriber: Callable[[list], list[str]],
    manifest: str | Path,
    out: str | Path,
    *,
    max_wer: float,
    normalise: Callable[[str], str] | None = None,
    window_seconds: float = 30.0,
    hint_targets: bool = False,
) -> dict:
    """Write `out`: the lines of the transcription manifest `manifest` whose `text` is within `max_wer` (word
    error rate, after `normalise` on both sides and the metrics' own normaliser) of `transcriber`'s transcript
    of the clip, with audio paths made absolute. Lines that say nothing is spoken (`"transcript": ""`, e.g. a
    clip of noise answered "There is no speech ...") are kept unchecked. A clip longer than `window_seconds` is
    transcribed window by window, as a hinted model's processor reads it, the windows' texts joined.

    With `hint_targets`, each kept line with speech has the hint itself as its `text` (the line's own text moves
    to `"reference_text"`): the target is then exactly what the model reads beside the audio, so it learns to
    copy the hint, never to rewrite it from audio tokens it hears less well on voices it never trained on.

    Raises DistillError naming every line without an 'audio' and a non-empty 'text', and every clip that
    cannot be read (nothing is written then). Returns {"lines", "kept", "dropped", "unchecked"}.
    """
    from eardrum.common.metrics import word_error_rate

    if not max_wer >= 0.0:  # NaN too
        raise ValueError(f"max_wer: expected a word error rate >= 0, got {max_wer!r}")
    manifest, out = Path(manifest), Path(out)
    normalise = normalise or (lambda text: text)
    problems: list[str] = []
    rows = _read_items(manifest, "text", TRANSCRIPTION_LINE, problems)
    hints = _transcribe_items(transcriber, manifest, _with_speech(rows), window_seconds, problems)
    _raise_problems(problems)
    kept = unchecked = 0
    with out.open("w") as f:
        for n, item in rows:
            if n in hints:
                wer = word_error_rate([normalise(item["text"])], [normalise(hints[n])])["wer"]
                if wer > max_wer or (hint_targets and not hints[n].strip()):  # nothing heard: nothing to copy
                    continue
                if hint_targets:
                    item = {**item, "text": hints[n], "reference_text": item["text"]}
            else:
                unchecked += 1
            f.write(json.dumps(item) + "\n")
            kept += 1
    summary = {"lines": len(rows), "kept": kept, "dropped": len(rows) - kept, "unchecked": unchecked}
    logger.info("filter_by_hint %s -> %s: %s", manifest, out, summary)
    return summary
