"""How answers are generated: `GenerationSettings`, the defaults every entry point reads.

Chat, `eardrum ask`/`chat`/`generate`/`eval`, the server's requests, training-time evaluation,
self-distillation and the smoke run all decode through `eardrum.common.decoding`, with these settings.
This module imports nothing heavy, so the command line can read the defaults before torch loads.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

BATCH_SIZE = 8  # prompts per generate call when a whole manifest is answered (`eardrum generate`, `eardrum eval`)


class GenerationSettingsError(ValueError):
    """Invalid generation settings; the message lists every problem."""


MAX_SEED = 2**64 - 1  # the largest seed torch's generators take
MAX_TRAIN_SEED = 2**32 - 1  # training seeds numpy too, whose seeds stop here
LOOP_PERIODS = 16  # the longest run of tokens `stop_loops` looks for (a phrase of a few words)
LOOP_MIN_TOKENS = 16  # a loop is never shorter than this, so "1000000" or "!!!" is not one


@dataclass(frozen=True)
class GenerationSettings:
    """How answers are generated."""

    max_new_tokens: int = 256  # the answer stops here even without an end-of-turn token
    temperature: float = 0.0  # 0 = greedy (deterministic); > 0 samples from softmax(logits / temperature)
    top_p: float = 1.0  # sample only among the most likely tokens whose probabilities add up to top_p
    repetition_penalty: float = 1.0  # > 1 makes tokens already generated less likely; 1 = off
    seed: int | None = None  # seeds sampling: the same prompt and seed give the same answer
    fast: bool = False  # static KV cache; on CUDA the decoding step is compiled (the first answer of a shape compiles)
    # An answer ends once its last tokens are one run of 1 to LOOP_PERIODS tokens repeated this many times
    # (and at least LOOP_MIN_TOKENS long): a greedy decoder that loops never leaves the loop. 0 = off.
    stop_loops: int = 8

    def problems(self) -> list[str]:
        """Every problem with these settings (empty when valid)."""
        out = []
        if not _is_count(self.max_new_tokens) or self.max_new_tokens < 1:
            out.append(f"max_new_tokens: expected a positive integer, got {self.max_new_tokens!r}")
        if not _is_number(self.temperature) or self.temperature < 0:
            out.append(f"temperature: expected a number >= 0 (0 = greedy), got {self.temperature!r}")
        if not _is_number(self.top_p) or not 0 < self.top_p <= 1:
            out.append(f"top_p: expected a number in (0, 1], got {self.top_p!r}")
        if not _is_number(self.repetition_penalty) or self.repetition_penalty <= 0:
            out.append(f"repetition_penalty: expected a number > 0 (1 = off), got {self.repetition_penalty!r}")
        if self.seed is not None and (not _is_count(self.seed) or not 0 <= self.seed <= MAX_SEED):
            out.append(f"seed: expected an integer from 0 to 2**64 - 1, or None, got {self.seed!r}")
        if not _is_count(self.stop_loops) or self.stop_loops < 0 or self.stop_loops == 1:
            out.append(f"stop_loops: expected 0 (off) or an integer >= 2 (repeats), got {self.stop_loops!r}")
        if not isinstance(self.fast, bool):
            out.append(f"fast: expected True or False, got {self.fast!r}")
        return out

    def validate(self) -> None:
        """Raise `GenerationSettingsError` listing every problem at once."""
        problems = self.problems()
        if problems:
            raise GenerationSettingsError("invalid generation settings: " + "; ".join(problems))

    @property
    def greedy(self) -> bool:
        """Whether each answer takes the likeliest token at every step."""
        return self.temperature == 0


def loop_period(ids: Sequence[int], repeats: int) -> int:
    """The length of the run of tokens that `ids` ends by repeating `repeats` times, or 0 when it does not.

    Periods from 1 to `LOOP_PERIODS` tokens are tried, shortest first; the repeated stretch must also be at
    least `LOOP_MIN_TOKENS` long. `repeats` is `GenerationSettings.stop_loops` (0 = never a loop).
    """
    if repeats < 2:
        return 0
    for period in range(1, LOOP_PERIODS + 1):
        span = loop_span(repeats, period)
        if len(ids) < span:
            break  # longer periods need longer spans still
        tail = list(ids[-span:])
        if tail[period:] == tail[:-period]:
            return period
    return 0


def loop_span(repeats: int, period: int = LOOP_PERIODS) -> int:
    """How many of the newest tokens a loop of `period` tokens repeated `repeats` times covers; with the
    default period, the most `loop_period` ever looks at (what any caller needs to keep)."""
    return max(period * repeats, LOOP_MIN_TOKENS)


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
