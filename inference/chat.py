"""Chat with recordings: load a checkpoint, add recordings, ask questions, stream answers.

    chat = AudioChat.from_pretrained("runs/my-model")
    chat.add_recording("meeting.wav", name="meeting")
    chat.ask("What was decided?")                  # the meeting is attached to this question
    for piece in chat.stream("And who decided it?"):
        print(piece, end="", flush=True)
    chat.transcribe("memo.wav")                    # one-shot, outside the conversation

Each attached recording is introduced in the user turn by a text part `Recording "NAME":` right
before its audio part, so a question about several recordings can tell them apart by name.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from transformers import LogitsProcessor, LogitsProcessorList
from transformers.generation.streamers import BaseStreamer

from eardrum.adapters.audio import SAMPLING_RATE, AudioSource, load_audio
from eardrum.adapters.checkpoint import load_pretrained
from eardrum.adapters.model import AudioLLM
from eardrum.adapters.processor import AudioProcessor

logger = logging.getLogger(__name__)

TRANSCRIBE_PROMPT = "Transcribe the audio."
CAPTION_PROMPT = "Describe the sound."
RECORDING_INTRO = 'Recording "{name}":'
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class GenerationSettingsError(ValueError):
    """Invalid generation settings; the message lists every problem."""


class RecordingNotFoundError(ValueError):
    """A question named a recording the chat does not hold; the message lists the known names."""


@dataclass(frozen=True)
class GenerationSettings:
    """How answers are generated."""

    max_new_tokens: int = 256  # the answer stops here even without an end-of-turn token
    temperature: float = 0.0  # 0 = greedy (deterministic); > 0 samples from softmax(logits / temperature)
    top_p: float = 1.0  # sample only among the most likely tokens whose probabilities add up to top_p
    repetition_penalty: float = 1.0  # > 1 makes tokens already generated less likely; 1 = off
    seed: int | None = None  # seeds sampling: the same prompt and seed give the same answer
    fast: bool = False  # static KV cache; on CUDA the decoding step is compiled (the first answer of a shape compiles)

    def problems(self) -> list[str]:
        """Every problem with these settings (empty when valid)."""
        out = []
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            out.append(f"max_new_tokens: expected a positive integer, got {self.max_new_tokens!r}")
        if not _is_number(self.temperature) or self.temperature < 0:
            out.append(f"temperature: expected a number >= 0 (0 = greedy), got {self.temperature!r}")
        if not _is_number(self.top_p) or not 0 < self.top_p <= 1:
            out.append(f"top_p: expected a number in (0, 1], got {self.top_p!r}")
        if not _is_number(self.repetition_penalty) or self.repetition_penalty <= 0:
            out.append(f"repetition_penalty: expected a number > 0 (1 = off), got {self.repetition_penalty!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0):
            out.append(f"seed: expected a non-negative integer or None, got {self.seed!r}")
        if not isinstance(self.fast, bool):
            out.append(f"fast: expected True or False, got {self.fast!r}")
        return out

    def validate(self) -> None:
        """Raise `GenerationSettingsError` listing every problem at once."""
        problems = self.problems()
        if problems:
            raise GenerationSettingsError("invalid generation settings: " + "; ".join(problems))

    def to_generate_kwargs(self, tokenizer, generation_config=None) -> dict:
        """Keyword arguments for `AudioLLM.generate`; build them afresh for every call.

        Sampling is done by a logits processor with its own `torch.Generator` (seeded from `seed`)
        that leaves only the drawn token possible, so generate's greedy step takes it: the answer
        is reproducible and the global random state is never touched.
        """
        self.validate()
        kwargs = {
            "max_new_tokens": self.max_new_tokens,
            "do_sample": False,
            "repetition_penalty": float(self.repetition_penalty),
            "eos_token_id": stop_token_ids(tokenizer, generation_config),
            "pad_token_id": tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        }
        if self.fast:
            kwargs["fast"] = True  # AudioLLM.generate: static KV cache, compiled decoding on CUDA
        if self.temperature > 0:
            kwargs["logits_processor"] = LogitsProcessorList([_Sampler(self.temperature, self.top_p, self.seed)])
        return kwargs


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and np.isfinite(value)


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


class _Sampler(LogitsProcessor):
    """Draws the next token with temperature and top-p, then masks every other token."""

    def __init__(self, temperature: float, top_p: float, seed: int | None) -> None:
        self.temperature, self.top_p, self.seed = temperature, top_p, seed
        self.generator: torch.Generator | None = None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.generator is None:  # created here: it must live on the device the scores are on
            self.generator = seeded_generator(scores.device, self.seed)
        return draw_tokens(scores, self.temperature, self.top_p, self.generator)


class _PieceStreamer(BaseStreamer):
    """Receives tokens from `generate` in its thread and queues the new text for the reader.

    The whole answer is decoded at every step and only the text past what was already sent is
    queued, held back while it ends in an incomplete character, so the pieces join to the decode
    of all tokens.
    """

    _END = object()

    class Stopped(Exception):
        """Raised inside `generate` to end it once the reader has stopped reading."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.sent = ""
        self.pieces: queue.Queue = queue.Queue()
        self.prompt_seen = False
        self.stop = threading.Event()

    def put(self, value: torch.Tensor) -> None:
        if self.stop.is_set():
            raise self.Stopped
        if not self.prompt_seen:  # generate hands over the prompt first; it is not part of the answer
            self.prompt_seen = True
            return
        self.ids.extend(value.reshape(-1).tolist())
        self._send(final=False)

    def end(self) -> None:
        self._send(final=True)

    def text(self) -> str:
        return self.tokenizer.decode(self.ids, skip_special_tokens=True)

    def _send(self, final: bool) -> None:
        text = self.text()
        if (final or not text.endswith("\ufffd")) and text.startswith(self.sent) and len(text) > len(self.sent):
            self.pieces.put(text[len(self.sent) :])
            self.sent = text

    def run(self, generate) -> None:
        """Call `generate()` (in the worker thread); its error, if any, is handed to the reader."""
        try:
            generate()
        except BaseException as err:  # re-raised in the reading thread, which the caller sees
            self.pieces.put(err)
        finally:
            self.pieces.put(self._END)


def default_recording_name(taken: Collection[str]) -> str:
    """The name `recording N` for the N-th recording, or the next number not taken by a named one."""
    number = len(taken) + 1
    while f"recording {number}" in taken:
        number += 1
    return f"recording {number}"


@dataclass(frozen=True)
class Recording:
    """A recording held by a chat."""

    name: str
    wave: np.ndarray  # (T,) float32 at 16 kHz, validated

    @property
    def seconds(self) -> float:
        return len(self.wave) / SAMPLING_RATE


class AudioChat:
    """A conversation with an audio LLM about recordings. Not safe to use from several threads at once."""

    def __init__(
        self, model: AudioLLM, processor: AudioProcessor, settings: GenerationSettings | None = None, name: str = ""
    ) -> None:
        self.model = model.eval()
        self.processor = processor
        self.settings = settings or GenerationSettings()
        self.settings.validate()
        self.name = name  # where the model came from, for reports
        self._recordings: dict[str, Recording] = {}
        self._pending: list[str] = []  # added since the last question
        self._messages: list[dict] = []

    @classmethod
    def from_pretrained(
        cls,
        directory: str | os.PathLike,
        *,
        device: str | torch.device | None = None,
        dtype: torch.dtype | str | None = None,
        quantization: str | None = None,
        settings: GenerationSettings | None = None,
    ) -> AudioChat:
        """Load a checkpoint directory for chatting.

        Args:
            directory: a checkpoint written by `save_pretrained`.
            device: default "cuda" when available, else "cpu".
            dtype: a torch dtype or "float32" | "bfloat16" | "float16"; default bfloat16 on a GPU that
                supports it (else float16), float32 on CPU.
            quantization: None, "4bit" or "8bit" for the LLM (bitsandbytes; it places the LLM itself).
            settings: default generation settings for `ask` and `stream`.
        """
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device={str(device)!r}: CUDA is not available here; use device='cpu'")
        dtype = _resolve_dtype(dtype, device)
        model, processor = load_pretrained(directory, quantization=quantization, dtype=dtype)
        model.encoder.to(device=device, dtype=dtype)
        model.projector.to(device=device, dtype=dtype)
        if quantization is None:
            model.llm.to(device=device)
        logger.info("chat model %s on %s in %s (LLM quantization %s)", directory, device, dtype, quantization or "none")
        return cls(model, processor, settings=settings, name=str(directory))

    # ------------------------------------------------------------------ recordings
    def add_recording(self, source: AudioSource, name: str | None = None) -> str:
        """Load and validate a recording now and attach it to the next question; returns its name.

        Raises:
            AudioError: the audio cannot be used (missing, corrupt, empty, NaN/inf, too long).
            ValueError: `name` is empty or already taken.
        """
        if name is None:
            name = default_recording_name(self._recordings)
        elif not isinstance(name, str) or not name.strip():
            raise ValueError(f"recording name: expected non-empty text, got {name!r}")
        name = name.strip()
        if name in self._recordings:
            raise ValueError(f"a recording named {name!r} already exists; recordings: {self._known()}")
        wave = load_audio(source, max_seconds=self.processor.config.max_audio_seconds)
        self._recordings[name] = Recording(name, wave)
        self._pending.append(name)
        return name

    @property
    def recordings(self) -> list[Recording]:
        """The recordings held, in the order they were added."""
        return list(self._recordings.values())

    @property
    def history(self) -> list[dict]:
        """The conversation so far: user turns (with their audio parts) and assistant answers. Read only."""
        return list(self._messages)

    def reset(self) -> None:
        """Forget the conversation and every recording."""
        self._messages.clear()
        self._recordings.clear()
        self._pending.clear()

    def _known(self) -> str:
        return ", ".join(repr(n) for n in self._recordings) or "none added yet"

    def _select(self, recordings: Sequence[str] | str | None) -> list[Recording]:
        if recordings is None:
            return [self._recordings[n] for n in self._pending]
        names = [recordings] if isinstance(recordings, str) else list(recordings)
        unknown = [n for n in names if n not in self._recordings]
        if unknown:
            raise RecordingNotFoundError(
                f"no recording named {', '.join(repr(n) for n in unknown)}; recordings: {self._known()}"
            )
        return [self._recordings[n] for n in names]

    # ------------------------------------------------------------------ questions
    def ask(
        self, text: str, *, recordings: Sequence[str] | None = None, settings: GenerationSettings | None = None
    ) -> str:
        """Answer a question and keep both turns in the history.

        Args:
            text: the question.
            recordings: names of the recordings to attach; None attaches those added since the last question.
            settings: generation settings for this answer only.

        Raises:
            RecordingNotFoundError: a name in `recordings` is unknown. The chat is unchanged.
            ValueError: `text` is empty, or the settings are invalid.
        """
        user = self._user_turn(text, recordings)
        answer = self._generate([*self._messages, user], settings)
        self._commit(user, answer)
        return answer

    def stream(
        self, text: str, *, recordings: Sequence[str] | None = None, settings: GenerationSettings | None = None
    ) -> Iterator[str]:
        """Like `ask`, but yields the answer in pieces as it is generated.

        The question is checked at once (errors are raised by this call, not by the iterator). The
        answer joins the history when the stream ends; a stream closed early stops generation and
        leaves the history unchanged.
        """
        user = self._user_turn(text, recordings)
        batch = self.processor([*self._messages, user], add_generation_prompt=True)
        kwargs = self._generate_kwargs(settings)
        return self._stream(user, batch, kwargs)

    def _stream(self, user: dict, batch: dict, kwargs: dict) -> Iterator[str]:
        streamer = _PieceStreamer(self.processor.tokenizer)
        worker = threading.Thread(
            target=streamer.run, args=(lambda: self.model.generate(**batch, streamer=streamer, **kwargs),), daemon=True
        )
        worker.start()
        try:
            while (item := streamer.pieces.get()) is not _PieceStreamer._END:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            streamer.stop.set()
            worker.join()
        self._commit(user, streamer.text())

    def _user_turn(self, text: str, recordings: Sequence[str] | None) -> dict:
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"question: expected non-empty text, got {text!r}")
        content = []
        for rec in self._select(recordings):
            content.append({"type": "text", "text": RECORDING_INTRO.format(name=rec.name)})
            content.append({"type": "audio", "audio": (rec.wave, SAMPLING_RATE)})
        content.append({"type": "text", "text": text})
        return {"role": "user", "content": content}

    def _commit(self, user: dict, answer: str) -> None:
        self._messages += [user, {"role": "assistant", "content": answer}]
        self._pending.clear()

    def _generate_kwargs(self, settings: GenerationSettings | None) -> dict:
        llm = self.model.llm
        return (settings or self.settings).to_generate_kwargs(
            self.processor.tokenizer, getattr(llm, "generation_config", None)
        )

    def _generate(self, conversation: list[dict], settings: GenerationSettings | None) -> str:
        kwargs = self._generate_kwargs(settings)
        batch = self.processor(conversation, add_generation_prompt=True)
        ids = self.model.generate(**batch, **kwargs)  # (1, T_new)
        return self.processor.batch_decode(ids)[0]

    # ------------------------------------------------------------------ one-shot
    def answer(self, audio: AudioSource, question: str, *, settings: GenerationSettings | None = None) -> str:
        """Answer one question about one clip, outside the conversation (history is untouched)."""
        if not isinstance(question, str) or not question.strip():
            raise ValueError(f"question: expected non-empty text, got {question!r}")
        wave = load_audio(audio, max_seconds=self.processor.config.max_audio_seconds)
        parts = [{"type": "audio", "audio": (wave, SAMPLING_RATE)}, {"type": "text", "text": question}]
        return self._generate([{"role": "user", "content": parts}], settings)

    def transcribe(
        self, audio: AudioSource, *, prompt: str = TRANSCRIBE_PROMPT, settings: GenerationSettings | None = None
    ) -> str:
        """What is said in the clip (the model must have been trained to transcribe)."""
        return self.answer(audio, prompt, settings=settings)

    def caption(
        self, audio: AudioSource, *, prompt: str = CAPTION_PROMPT, settings: GenerationSettings | None = None
    ) -> str:
        """A description of the sound in the clip."""
        return self.answer(audio, prompt, settings=settings)


def _resolve_dtype(dtype: torch.dtype | str | None, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or dtype == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}: expected one of auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]
