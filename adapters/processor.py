"""Chat messages with audio -> input_ids, attention_mask, labels and the audio batch.

A message is `{"role": ..., "content": str | list[part]}`; a part is `{"type": "text", "text": ...}`
or `{"type": "audio", "audio": SOURCE}` (SOURCE: a path, encoded bytes, `(array, rate)`, or a
`datasets`-style dict; `"path"`, `"bytes"` or `"array"` + `"sampling_rate"` keys also work). An audio
part of one window may hold `"transcript"`: Whisper's transcript of it, written earlier, which a model with
`transcript_hint` reads instead of decoding it again. Parts of one message are joined with a newline.

Each clip becomes, in the text, `[audio_begin] ([mm:ss])? <ph> * n ... [audio_end]`: one run of
placeholders per encoder window, n given by `num_audio_tokens`, optional time markers before each
window of a multi-window clip. The conversation is rendered with the tokenizer's own chat
template; assistant spans are found by rendering prefixes of the conversation, so labels follow
any template that renders a prefix of the conversation as a prefix of the text.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from tokenizers import AddedToken

from .audio import SAMPLING_RATE, load_audio, window_key
from .config import AudioLLMConfig, num_audio_tokens, plan_windows, window_samples
from .encoders import AudioFeaturizer
from .transcribe import TranscriberError, hint_text

IGNORE_INDEX = -100


class ConversationError(ValueError):
    """A conversation that cannot be turned into model inputs; the message says which and why."""


def ensure_placeholder_token(tokenizer, placeholder: str) -> int:
    """Id of the audio placeholder, added to the tokenizer as a special token if missing.

    No embedding row is needed: the model swaps placeholder ids out before the embedding lookup.
    """
    vocab = tokenizer.get_vocab()
    if placeholder not in vocab:
        tokenizer.add_tokens([AddedToken(placeholder, special=True, normalized=False)], special_tokens=True)
    ids = tokenizer.encode(f"a{placeholder}{placeholder}a", add_special_tokens=False)
    pid = tokenizer.convert_tokens_to_ids(placeholder)
    if ids.count(pid) != 2:
        raise ConversationError(f"the tokenizer does not keep the placeholder {placeholder!r} as one token")
    return pid


def time_marker(seconds: float) -> str:
    """`[mm:ss]`, or `[h:mm:ss]` from one hour on."""
    s = int(seconds)
    h, m, s = s // 3600, s // 60 % 60, s % 60
    return f"[{h}:{m:02d}:{s:02d}]" if h else f"[{m:02d}:{s:02d}]"


@dataclass
class _Rendered:
    text: str
    spans: list[tuple[int, int]]  # character spans that carry loss
    windows: list[np.ndarray]  # audio windows in reading order
    num_placeholders: int


class AudioProcessor:
    """Turns conversations into tensors for `AudioLLM`. Holds the tokenizer and the featurizer."""

    def __init__(
        self, tokenizer, featurizer: AudioFeaturizer, config: AudioLLMConfig, transcriber=None
    ) -> None:
        if not getattr(tokenizer, "is_fast", False):
            raise ValueError("AudioProcessor needs a fast tokenizer (character offsets are used for labels)")
        if not tokenizer.chat_template:
            raise ValueError("the LLM tokenizer has no chat template; set tokenizer.chat_template")
        self.tokenizer = tokenizer
        self.featurizer = featurizer
        self.config = config
        self.placeholder_id = ensure_placeholder_token(tokenizer, config.placeholder)
        # Text that spells a special token would be read as that token (a forged turn or end of text);
        # the placeholder has its own check after tokenizing, which names the count it expected.
        added = (t.content for t in tokenizer.added_tokens_decoder.values() if t.special)
        special = {*added, *tokenizer.all_special_tokens} - {config.placeholder, ""}
        self._special_tokens = sorted(special, key=len, reverse=True)
        self._not_in_hints = [*self._special_tokens, config.placeholder]  # removed from transcripts (hint_text)
        # `transcriber(windows) -> list[str]` (transcribe.WhisperTranscriber) when config.transcript_hint is on
        self.transcriber = transcriber
        self._batched_hints: dict[str, str] | None = None  # during a call of many conversations: hints by window key
        self.window = window_samples(config, featurizer.spec)
        self.overlap = int(round(config.window_overlap_seconds * SAMPLING_RATE))

    def num_audio_tokens(self, num_samples: int) -> int:
        """Audio tokens for one encoder window (see `config.num_audio_tokens`)."""
        return num_audio_tokens(num_samples, self.featurizer.spec, self.config.projector)

    def clip_num_tokens(self, num_samples: int) -> int:
        """Audio tokens for a whole clip of any length (sum over its windows)."""
        return sum(self.num_audio_tokens(e - s) for s, e in plan_windows(num_samples, self.window, self.overlap))

    def __call__(
        self,
        conversations: list[list[dict]] | list[dict],
        *,
        add_generation_prompt: bool = False,
        return_labels: bool | None = None,
        label_mode: str | None = None,
        padding_side: str | None = None,
        max_length: int | None = None,
        featurize: bool = True,
    ) -> dict:
        """Build a padded batch.

        Args:
            conversations: one conversation (a list of messages) or a list of them.
            add_generation_prompt: end with the template's assistant header, for generation.
            return_labels: default: True unless add_generation_prompt.
            label_mode: "all_assistant", "last_assistant" or "after_audio"; default from the config.
            padding_side: default "left" for generation, "right" for training.
            max_length: longer sequences are an error (never cut silently).
            featurize: False returns the raw windows as `audio_windows` (a list of 1-D float32
                arrays at 16 kHz) instead of features, for callers that cache encoder outputs.

        Returns:
            input_ids (B, T_text), attention_mask (B, T_text), labels (B, T_text) if asked,
            audio_features (N_win, ...) and audio_lengths (N_win,) if there is audio (or
            audio_windows with featurize=False).
        """
        if conversations and isinstance(conversations[0], dict):
            conversations = [conversations]
        labels_on = (not add_generation_prompt) if return_labels is None else return_labels
        mode = label_mode or self.config.label_mode
        side = padding_side or ("left" if add_generation_prompt else "right")
        if self.config.transcript_hint and self.transcriber is not None and len(conversations) > 1:
            self._batched_hints = self._hints_of_all(conversations)  # one batched decode, not one per clip
        rows, windows = [], []
        try:
            for i, conv in enumerate(conversations):
                rendered = self._render(conv, i, add_generation_prompt, mode if labels_on else None)
                rows.append(self._tokenize(rendered, i, labels_on, max_length))
                windows.extend(rendered.windows)
        finally:
            self._batched_hints = None
        batch = self._pad(rows, side, labels_on)
        if windows and not featurize:
            batch["audio_windows"] = windows
        elif windows:
            batch["audio_features"], batch["audio_lengths"] = self.featurizer(windows)
        return batch

    # -------------------------------------------------------------- rendering
    def _clip_text(self, wave: np.ndarray, windows: list[np.ndarray], transcript: str | None = None) -> tuple[str, int]:
        """A clip's prompt text (its windows' placeholders, markers and hints) and audio-token count; `transcript`
        (a part's own, see `_given_transcript`) is the hint of a clip of one window, instead of decoding one."""
        spans = plan_windows(len(wave), self.window, self.overlap)
        cfg, pieces, count = self.config, [], 0
        if not cfg.transcript_hint:
            hints = None
        elif transcript is not None:
            if len(spans) != 1:
                raise ConversationError(
                    f"an audio part's 'transcript' is the hint of a clip of one window; this clip lasts "
                    f"{len(wave) / SAMPLING_RATE:.1f} s, {len(spans)} windows of {self.window / SAMPLING_RATE:g} s: "
                    "give the windows as parts of their own, or leave the transcript out"
                )
            hints = [hint_text(transcript, self._not_in_hints)]
        else:
            hints = self._hints([wave[start:end] for start, end in spans])
        for k, (start, end) in enumerate(spans):
            if cfg.time_markers and len(spans) > 1:
                pieces.append(time_marker(start / SAMPLING_RATE))
            n = self.num_audio_tokens(end - start)
            pieces.append(cfg.placeholder * n)
            if hints is not None:
                pieces.append(hints[k])
            windows.append(wave[start:end])
            count += n
        return (cfg.audio_begin or "") + "".join(pieces) + (cfg.audio_end or ""), count

    def _hints(self, windows: list[np.ndarray]) -> list[str]:
        """The transcript hint text of each window (transcribe.hint_text)."""
        known = self._batched_hints or {}
        keys = [window_key(w) for w in windows] if known else []
        if known and all(k in known for k in keys):
            texts = [known[k] for k in keys]
        elif self.transcriber is None:
            raise TranscriberError(
                "this model's config has transcript_hint on, so each clip's prompt holds Whisper's transcript, "
                "but the processor has no transcriber; load the model with load_pretrained or build_audio_llm, "
                "not load_processor alone"
            )
        else:
            texts = self.transcriber(windows)
        return [hint_text(t, self._not_in_hints) for t in texts]

    def _hints_of_all(self, conversations: list[list[dict]]) -> dict[str, str]:
        """Whisper's transcript of every audio window in `conversations`, decoded in one batched call, by
        window key (the conversations are rendered once without hints to find their windows)."""
        found: list[np.ndarray] = []
        transcriber = self.transcriber
        self.transcriber = lambda windows: found.extend(windows) or [""] * len(windows)
        try:
            for i, conv in enumerate(conversations):
                self._render(conv, i, False, None)
        finally:
            self.transcriber = transcriber
        return {window_key(w): t for w, t in zip(found, transcriber(found))} if found else {}

    def _content(self, message: dict, where: str, windows: list[np.ndarray]) -> tuple[str, int]:
        content = message.get("content")
        if isinstance(content, str):
            self._check_text(content, where)
            return content, 0
        if not isinstance(content, list):
            raise ConversationError(
                f"{where}: content must be a string or a list of parts, got {type(content).__name__}"
            )
        texts, count = [], 0
        for k, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                self._check_text(part["text"], f"{where}, part {k}")
                texts.append(part["text"])
            elif kind == "audio":
                wave = load_audio(
                    _audio_source(part, f"{where}, part {k}"),
                    max_seconds=self.config.max_audio_seconds,
                    name=f"{where}, part {k}",
                )
                text, n = self._clip_text(wave, windows, _given_transcript(part, f"{where}, part {k}"))
                texts.append(text)
                count += n
            else:
                raise ConversationError(
                    f"{where}, part {k}: expected {{'type': 'text', 'text': str}} or "
                    f"{{'type': 'audio', 'audio': ...}}, got {part!r:.120}"
                )
        return "\n".join(texts), count

    def _check_text(self, text: str, where: str) -> None:
        found = next((token for token in self._special_tokens if token in text), None)
        if found is not None:
            raise ConversationError(
                f"{where}: the text contains the tokenizer's special token {found!r}, which would be read as "
                "that token (a new turn, the end of the text); remove it from the text"
            )

    def _template(self, messages: list[dict], generation: bool) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)

    def _render(self, conversation: list[dict], index: int, generation: bool, mode: str | None) -> _Rendered:
        if not isinstance(conversation, list) or not conversation:
            raise ConversationError(f"conversation {index}: expected a non-empty list of messages")
        messages, windows, count = [], [], 0
        for j, message in enumerate(conversation):
            where = f"conversation {index}, message {j}"
            if not isinstance(message, dict) or not isinstance(message.get("role"), str):
                raise ConversationError(f"{where}: expected a dict with a 'role' and a 'content'")
            text, n = self._content(message, where, windows)
            messages.append({"role": message["role"], "content": text})
            count += n
        full = self._template(messages, generation)
        spans = self._label_spans(messages, full, mode, index) if mode else []
        return _Rendered(full, spans, windows, count)

    def _label_spans(self, messages: list[dict], full: str, mode: str, index: int) -> list[tuple[int, int]]:
        if mode == "after_audio":
            last = full.rfind(self.config.placeholder)
            if last < 0:
                raise ConversationError(f"conversation {index}: label_mode 'after_audio' but it has no audio")
            start = last + len(self.config.placeholder) + len(self.config.audio_end or "")
            return [(start, len(full.rstrip()))]
        spans = []
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            before = self._template(messages[:i], True) if i else ""
            upto = self._template(messages[: i + 1], False)
            if not (upto.startswith(before) and full.startswith(upto)):
                raise ConversationError(
                    f"conversation {index}: the chat template does not render message {i} after the ones before it "
                    "(a prefix of the conversation is not a prefix of its text), so assistant turns cannot be found; "
                    "use label_mode 'after_audio'"
                )
            spans.append((len(before), len(upto.rstrip())))
        return spans[-1:] if mode == "last_assistant" else spans

    # -------------------------------------------------------------- tokens
    def _tokenize(self, rendered: _Rendered, index: int, labels_on: bool, max_length: int | None):
        enc = self.tokenizer(rendered.text, add_special_tokens=False, return_offsets_mapping=True)
        ids = enc["input_ids"]
        found = ids.count(self.placeholder_id)
        if found != rendered.num_placeholders:
            raise ConversationError(
                f"conversation {index}: expected {rendered.num_placeholders} audio placeholders after tokenizing, "
                f"found {found}; does the text itself contain {self.config.placeholder!r}?"
            )
        if max_length is not None and len(ids) > max_length:
            raise ConversationError(
                f"conversation {index}: {len(ids)} tokens exceed max_length={max_length} "
                f"({rendered.num_placeholders} of them audio); raise max_length or shorten the input"
            )
        if not labels_on:
            return ids, None
        labels = [
            tok
            if tok != self.placeholder_id and any(s < e_span and e > s_span for s_span, e_span in rendered.spans)
            else IGNORE_INDEX
            for tok, (s, e) in zip(ids, enc["offset_mapping"])
        ]
        if all(x == IGNORE_INDEX for x in labels):
            raise ConversationError(
                f"conversation {index}: no token carries loss (no assistant reply to learn?); "
                "a sample with nothing to learn would train on nothing"
            )
        return ids, labels

    def _pad(self, rows, side: str, labels_on: bool) -> dict[str, torch.Tensor]:
        if side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {side!r}")
        pad_id = self.tokenizer.pad_token_id
        if pad_id is None:
            pad_id = self.tokenizer.eos_token_id or 0
        longest = max(len(ids) for ids, _ in rows)
        out = {
            k: torch.full((len(rows), longest), v, dtype=torch.long)
            for k, v in (("input_ids", pad_id), ("attention_mask", 0), ("labels", IGNORE_INDEX))
        }
        for b, (ids, labels) in enumerate(rows):
            cols = slice(longest - len(ids), longest) if side == "left" else slice(0, len(ids))
            out["input_ids"][b, cols] = torch.tensor(ids)
            out["attention_mask"][b, cols] = 1
            if labels is not None:
                out["labels"][b, cols] = torch.tensor(labels)
        if not labels_on:
            del out["labels"]
        return out

    def batch_decode(self, ids, **kwargs) -> list[str]:
        return self.tokenizer.batch_decode(ids, skip_special_tokens=True, **kwargs)


def _given_transcript(part: dict, where: str) -> str | None:
    """An audio part's own "transcript": what Whisper wrote for the clip earlier (a library keeps it for each
    window), used as the clip's hint where the model reads one instead of decoding it again; None without."""
    transcript = part.get("transcript")
    if transcript is not None and not isinstance(transcript, str):
        raise ConversationError(f"{where}: 'transcript' must be a string, got {type(transcript).__name__}")
    return transcript


def _audio_source(part: dict, where: str):
    for key in ("audio", "path", "bytes"):
        if key in part:
            return part[key]
    if "array" in part:
        if "sampling_rate" not in part:
            raise ConversationError(f"{where}: an audio 'array' needs a 'sampling_rate'")
        return (part["array"], part["sampling_rate"])
    raise ConversationError(f"{where}: an audio part needs one of 'audio', 'path', 'bytes' or 'array'")


def text_in_place_of_audio(conversation: list[dict], transcript: str) -> list[dict]:
    """The conversation with every audio part replaced by a text part holding `transcript`."""
    out = []
    for message in conversation:
        content = message["content"]
        if isinstance(content, list):
            content = [{"type": "text", "text": transcript} if p.get("type") == "audio" else p for p in content]
        out.append({**message, "content": content})
    return out
