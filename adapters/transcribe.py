"""Whisper's own transcript of each audio window, written into the prompt beside the window's audio tokens.

With `AudioLLMConfig.transcript_hint` on, the LLM reads each window of a clip as
    <audio tokens> + "\\n[speech recognised: <Whisper's greedy transcript of the window>]"
so the words come from Whisper's decoder, which was trained on 680k hours of speech and holds on voices and
rooms no small training set covers, while the audio tokens carry what the words do not: sounds, whether
anyone speaks at all, and what the decoder misheard (the LLM learns when to trust which). DeSTA2 builds its
speech LLM the same way. The decoder runs on the full 30 s window Whisper was trained on: on a window cut to
the clip's length it loops and invents (WER 52 % instead of 33 % on the demo's held-out voices, 3 s of padding).

Decoding costs about 0.4 s a window on 2 CPU cores (most of it the 30 s encoder pass), so a training run
computes each window's transcript once: `attach_cache` keeps them in a JSONL file by window content.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .audio import SAMPLING_RATE, window_key

logger = logging.getLogger(__name__)

HINT_MAX_TOKENS = 128  # a 30 s window of fast speech is about 100 Whisper tokens; more is a decoding loop
HINT_BATCH_SIZE = 8  # windows per generate call
HINT_FORMAT = "\n[speech recognised: {text}]"  # written after each window's audio tokens
WINDOW_SAMPLES = 30 * SAMPLING_RATE  # Whisper's window: the feature extractor would cut anything longer
MEMORY_WINDOWS = 1024  # transcripts kept in memory without a cache file (a few hundred KB at most)
HINT_NONE = "nothing"  # the text in HINT_FORMAT when Whisper's decoder writes no word
NO_SPEECH_TOKENS = ("<|nospeech|>", "<|nocaptions|>")  # Whisper's no-speech token, by vocabulary


class TranscriberError(ValueError):
    """A transcript hint that cannot be made: no Whisper decoder, or no transcriber attached."""


def hint_text(transcript: str, forbidden: list[str]) -> str:
    """The prompt text that follows a window's audio tokens (HINT_FORMAT), on one line; any of the
    `forbidden` strings (the tokenizer's special tokens, the audio placeholder) is removed from the
    transcript, so a transcript can never forge a turn or an audio token."""
    text = " ".join(transcript.split())
    for token in forbidden:
        text = text.replace(token, "")
    return HINT_FORMAT.format(text=text.strip() or HINT_NONE)


class WhisperTranscriber(nn.Module):
    """Greedy transcripts of audio windows (1-D float32 at 16 kHz, at most 30 s) by a frozen Whisper.

    It holds the whole `WhisperForConditionalGeneration`; its encoder is the same module the audio LLM's
    `SpeechEncoder` wraps, so nothing is loaded twice. Called as `transcriber(windows) -> list[str]`.
    """

    def __init__(self, whisper: nn.Module, feature_extractor, tokenizer, max_new_tokens: int = HINT_MAX_TOKENS,
                 batch_size: int = HINT_BATCH_SIZE, language: str | None = None,
                 no_speech_threshold: float | None = None) -> None:
        super().__init__()
        if not hasattr(whisper, "generate") or not hasattr(whisper, "get_decoder"):
            raise TranscriberError(
                f"transcript_hint needs a Whisper model with its decoder, got {type(whisper).__name__}; "
                "use a Whisper encoder source (hub id, transformers folder or CTranslate2 folder)"
            )
        self.whisper = whisper
        for p in self.whisper.parameters():
            p.requires_grad_(False)
        self.feature_extractor = feature_extractor
        self.tokenizer = tokenizer
        # Whisper's decoder holds max_target_positions tokens, its prompt included (4 at most)
        self.max_new_tokens = min(max_new_tokens, whisper.config.max_target_positions - 4)
        self.batch_size = batch_size
        # A multilingual Whisper transcribes in `language` (None: the language it detects per window); an
        # English-only one has nothing to choose.
        multilingual = bool(getattr(whisper.generation_config, "is_multilingual", False))
        if language is not None and not multilingual and language.lower() not in ("en", "english"):
            raise TranscriberError(f"transcript_language={language!r}: this Whisper is English-only; use 'en' or null")
        self.decode_options = {"language": language, "task": "transcribe"} if multilingual and language else {}
        # Whisper's no-speech token ("<|nospeech|>", "<|nocaptions|>" in older vocabularies): its probability at the
        # first decoding step is Whisper's own measure of whether anyone speaks; above the threshold, no transcript.
        vocab = tokenizer.get_vocab()
        self.no_speech_ids = [vocab[t] for t in NO_SPEECH_TOKENS if t in vocab]
        if no_speech_threshold is not None and not self.no_speech_ids:
            raise TranscriberError(f"transcript_no_speech={no_speech_threshold}: this Whisper's vocabulary has no "
                                   f"no-speech token ({' or '.join(NO_SPEECH_TOKENS)}); set it to null")
        self.no_speech_threshold = no_speech_threshold
        self.autocast: torch.dtype | None = None  # e.g. torch.bfloat16: decode under autocast (faster on bf16 hardware)
        # Transcripts by window key: every one decoded with a file attached, else the latest MEMORY_WINDOWS
        # (a server's request thread and its generation thread render the same windows: decoded once).
        self._known: OrderedDict[str, str] = OrderedDict()
        self._file: Path | None = None
        self._fingerprints: dict[str, str] = {}  # `fingerprint`'s answers, by settings and the tensors it hashed

    def train(self, mode: bool = True) -> WhisperTranscriber:
        super().train(mode)
        self.whisper.eval()  # frozen, always
        return self

    def fingerprint(self) -> str:
        """sha256 (hex) of what decides a transcript: the decoding settings and every Whisper weight."""
        settings = {"format": 1, "max_new_tokens": self.max_new_tokens}
        if self.decode_options:  # absent for the settings that had no choice, so their caches stay valid
            settings["decode_options"] = self.decode_options
        if self.no_speech_threshold is not None:  # likewise
            settings["no_speech_threshold"] = self.no_speech_threshold
        state = sorted(self.whisper.state_dict().items())
        # The weights are frozen: hashed once while the same tensors hold them (moved or cast, they are hashed again)
        key = json.dumps(settings) + "".join(f"|{t.dtype}@{t.device}:{t.data_ptr()}" for _, t in state)
        if key not in self._fingerprints:
            digest = hashlib.sha256(json.dumps(settings).encode())
            for name, t in state:
                digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
                digest.update(t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy())
            self._fingerprints[key] = digest.hexdigest()
        return self._fingerprints[key]

    def attach_cache(self, directory: str | Path) -> Path:
        """Keep transcripts in `directory/<fingerprint>.jsonl` (read now, appended to as windows are decoded),
        so later runs, stages and evaluations never decode a window twice. Returns the file's path. Several
        processes may share the file: each appends whole records in one write."""
        path = Path(directory).expanduser() / f"{self.fingerprint()[:32]}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = path
        self.reload()
        logger.info("transcript cache %s: %d windows known", path, len(self._known))
        return path

    def forget(self) -> None:
        """Drop every transcript held in memory, as a new process starts (an attached file stays; `reload`
        reads it again): what a benchmark calls to time a first question."""
        self._known.clear()

    def reload(self) -> None:
        """Read the attached transcript file again (what other processes appended since); nothing without one."""
        if self._file is None or not self._file.exists():
            return
        with self._file.open() as handle:
            for n, line in enumerate(handle, start=1):
                try:
                    row = json.loads(line)
                    self._known[row["key"]] = row["text"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    logger.warning("%s, line %d: not a transcript record; skipped (it is decoded again)", self._file, n)

    @torch.no_grad()
    def forward(self, windows: list[np.ndarray]) -> list[str]:
        """windows: N 1-D float32 waves at 16 kHz, each at most 30 s -> N transcripts (stripped, maybe "")."""
        too_long = next((i for i, w in enumerate(windows) if len(w) > WINDOW_SAMPLES), None)
        if too_long is not None:
            raise TranscriberError(
                f"window {too_long} lasts {len(windows[too_long]) / SAMPLING_RATE:.1f} s; Whisper's decoder reads at "
                f"most {WINDOW_SAMPLES // SAMPLING_RATE} s: cut longer audio into windows first (config.window_seconds)"
            )
        keys = [window_key(w) for w in windows]
        texts = {k: self._known[k] for k in keys if k in self._known}
        first: dict[str, int] = {}  # each unknown window once, however often it repeats
        for i, k in enumerate(keys):
            if k not in texts:
                first.setdefault(k, i)
        todo = list(first.values())
        for start in range(0, len(todo), self.batch_size):
            chunk = todo[start : start + self.batch_size]
            texts.update(zip((keys[i] for i in chunk), self._decode([windows[i] for i in chunk])))
        fresh = {keys[i]: texts[keys[i]] for i in todo}
        if self._file is not None and fresh:
            records = "".join(json.dumps({"key": k, "text": t}) + "\n" for k, t in fresh.items())
            with self._file.open("ab", buffering=0) as handle:  # one write: whole lines beside other appenders
                handle.write(records.encode())
        self._known.update(fresh)
        for k in keys:
            self._known.move_to_end(k)
        while self._file is None and len(self._known) > MEMORY_WINDOWS:
            self._known.popitem(last=False)
        return [texts[k] for k in keys]

    def _features(self, waves: list[np.ndarray]) -> torch.Tensor:
        """N waves -> (N, n_mels, 3000) log-mel features, each padded to its 30 s window as Whisper was trained,
        on the model's device and in its dtype."""
        params = next(self.whisper.parameters())
        return self.feature_extractor(
            [np.asarray(w, dtype=np.float32) for w in waves], sampling_rate=SAMPLING_RATE, return_tensors="pt"
        ).input_features.to(device=params.device, dtype=params.dtype)

    def _autocast(self):
        """The autocast context decoding runs in (`self.autocast`, or none)."""
        device = next(self.whisper.parameters()).device.type
        return torch.autocast(device, dtype=self.autocast or torch.float32, enabled=self.autocast is not None)

    @torch.no_grad()
    def no_speech_probabilities(self, waves: list[np.ndarray]) -> list[float]:
        """N waves (at most 30 s each) -> Whisper's no-speech probability of each (what the gate reads)."""
        with self._autocast():
            return self.no_speech_probability(self.whisper.get_encoder()(self._features(waves))).tolist()

    def _decode(self, waves: list[np.ndarray]) -> list[str]:
        """Whisper's greedy decode of each wave, padded to its 30 s window as Whisper was trained."""
        features = self._features(waves)  # (B, n_mels, 3000)
        with self._autocast():
            if self.no_speech_threshold is None:
                ids = self.whisper.generate(features, max_new_tokens=self.max_new_tokens, **self.decode_options)
                return [t.strip() for t in self.tokenizer.batch_decode(ids, skip_special_tokens=True)]
            encoded = self.whisper.get_encoder()(features)  # (B, 1500, D): once, for the gate and the decoding
            speech = (self.no_speech_probability(encoded) <= self.no_speech_threshold).tolist()  # (B,)
            texts = [""] * len(waves)
            kept = [i for i, s in enumerate(speech) if s]
            if kept:
                encoded.last_hidden_state = encoded.last_hidden_state[kept]
                ids = self.whisper.generate(encoder_outputs=encoded, max_new_tokens=self.max_new_tokens,
                                            **self.decode_options)
                for i, text in zip(kept, self.tokenizer.batch_decode(ids, skip_special_tokens=True)):
                    texts[i] = text.strip()
        return texts

    @torch.no_grad()
    def no_speech_probability(self, encoded) -> torch.Tensor:
        """Whisper's encoder output for B windows -> (B,) the probability of its no-speech token at the first
        decoding step (after the start-of-transcript token), as Whisper itself reads it."""
        hidden = encoded.last_hidden_state  # (B, 1500, D)
        start = torch.full((hidden.shape[0], 1), self.whisper.config.decoder_start_token_id, device=hidden.device)
        logits = self.whisper(encoder_outputs=encoded, decoder_input_ids=start).logits[:, 0]  # (B, V)
        return torch.softmax(logits.float(), dim=-1)[:, self.no_speech_ids].sum(dim=-1)


def build_transcriber(whisper: nn.Module, feature_extractor, language: str | None = None,
                      no_speech_threshold: float | None = None) -> WhisperTranscriber:
    """A transcriber over a Whisper loaded by `sources.load_speech_model`, with the tokenizer read from the
    folder (or hub id) the model itself was loaded from (`whisper.name_or_path`); `language` and
    `no_speech_threshold` as in `WhisperTranscriber` (`AudioLLMConfig.transcript_language`,
    `.transcript_no_speech`)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(whisper.name_or_path)
    return WhisperTranscriber(whisper, feature_extractor, tokenizer, language=language,
                              no_speech_threshold=no_speech_threshold)
