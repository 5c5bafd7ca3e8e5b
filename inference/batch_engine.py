"""One model, many requests: a queue and a generation thread that runs waiting requests as one batch.

The generation thread owns the model. It takes the oldest waiting job, waits up to `batch_wait_s`
for others (so requests that arrive together share a forward pass), takes up to `max_batch`, and
runs them as ONE left-padded `generate`. Every job can share a batch with every other:

- decoding settings are per row: `generate` runs greedy, and a logits processor draws the token of
  each sampling row with that row's temperature, top_p and its own `torch.Generator`, so a seeded
  answer does not depend on its neighbours and the global random state is never touched;
- a stopping criterion sees every row's newest token at each step. It is the per-row streamer
  (streaming rows get text deltas as they are decoded) and it ends each row on its own: at an
  end-of-turn token, at one of its stop strings, at its max_tokens, when it loops (the same run of
  tokens repeated `GenerationSettings.stop_loops` times, as on every other path), or when its client
  has gone.

Results go back to the event loop through `Job.emit`, which is thread-safe; the loop never waits
on the model.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import torch
from transformers import LogitsProcessor, StoppingCriteria, StoppingCriteriaList

from eardrum.adapters.processor import AudioProcessor
from eardrum.common.decoding import draw_tokens, generate_tokens, seeded_generator, stop_token_ids
from eardrum.common.generation import GenerationSettings, loop_period

from .openai_schema import APIError, SamplingOptions

logger = logging.getLogger(__name__)

LOOP_REPEATS = GenerationSettings().stop_loops  # a row that repeats one run this often ends, as everywhere else


@dataclass(frozen=True)
class Finished:
    """The end of one request's generation."""

    text: str
    finish_reason: str  # "stop" or "length"
    completion_tokens: int  # new tokens, counting the end-of-turn token when there is one


@dataclass(eq=False)
class Job:
    """One queued request. The generation thread reports through `emit`: str deltas (streaming
    jobs only), then one `Finished` or `APIError`."""

    conversation: list[dict]  # audio parts hold (wave, 16000) arrays, never paths
    options: SamplingOptions
    stream: bool
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: bool = False  # set on the event loop when the client has gone; read by the generation thread

    def emit(self, event: str | Finished | APIError) -> None:
        """Hand an event to the request's coroutine; safe from any thread."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the loop has closed: the server is shutting down and nobody waits
            pass


def _first_stop(text: str, stops: tuple[str, ...]) -> int | None:
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(found) if found else None


def _sendable(text: str, stops: tuple[str, ...]) -> str:
    """The part of unfinished text safe to stream: no half-decoded character, no possible start of a stop."""
    text = text.rstrip("\ufffd")  # a character split across tokens decodes as U+FFFD until it is complete
    keep = len(text)
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:k]):
                keep = min(keep, len(text) - k)
                break
    return text[:keep]


class _Row:
    """One job's row of a batched generate: its new tokens, its text, and why it ended."""

    def __init__(self, job: Job, tokenizer, stop_ids: frozenset[int]) -> None:
        self.job = job
        self.tokenizer = tokenizer
        self.stop_ids = stop_ids
        self.ids: list[int] = []  # new tokens without the end-of-turn token
        self.generated = 0
        self.text = ""
        self.sent = ""  # what the client has been streamed
        self.reason: str | None = None
        # Decoding at every step costs; only rows that stream or look for stop strings need it.
        self.watch = job.stream or bool(job.options.stop)

    def push(self, token: int) -> None:
        """Take this row's newest token (ignored once the row has ended: those are padding)."""
        if self.reason is not None:
            return
        if self.job.cancelled:
            self.reason = "cancelled"
            return
        self.generated += 1
        if token in self.stop_ids:
            self.reason = "stop"
        else:
            self.ids.append(token)
            if loop_period(self.ids, LOOP_REPEATS):  # the answer went round in a loop: it has ended
                self.reason = "stop"
        if self.reason is None and self.generated >= self.job.options.max_tokens:
            self.reason = "length"
        if self.watch:
            self._update_text()

    def _update_text(self) -> None:
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        cut = _first_stop(text, self.job.options.stop)
        if cut is not None:
            text, self.reason = text[:cut], "stop"
        self.text = text.strip()  # answers are stripped on every path (see eardrum.common.decoding)
        if self.job.stream:  # trailing whitespace waits for the text after it, or is dropped at the end
            self._send(self.text if self.reason else _sendable(text, self.job.options.stop).strip())

    def _send(self, ready: str) -> None:
        # Deltas only ever append, so the client's joined deltas are the answer.
        if len(ready) > len(self.sent) and ready.startswith(self.sent):
            self.job.emit(ready[len(self.sent) :])
            self.sent = ready

    def finish(self) -> None:
        """Report the result; called once generate has returned."""
        if self.reason == "cancelled":
            return
        if not self.watch:
            self.text = self.tokenizer.decode(self.ids, skip_special_tokens=True).strip()
        self.reason = self.reason or "length"  # only the LLM's own length limit ends a row without us
        if self.job.stream:
            self._send(self.text)
        self.job.emit(Finished(self.sent if self.job.stream else self.text, self.reason, self.generated))


class _RowMonitor(StoppingCriteria):
    """Called by generate once per step with every row's tokens so far; ends rows one by one."""

    def __init__(self, rows: list[_Row]) -> None:
        self.rows = rows

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        for row, token in zip(self.rows, input_ids[:, -1].tolist()):  # input_ids (B, T_new)
            row.push(token)
        return torch.tensor([row.reason is not None for row in self.rows], device=input_ids.device)


class _RowSampler(LogitsProcessor):
    """Draws the next token of each sampling row and leaves only it possible, so generate's greedy
    step takes it; greedy rows (temperature 0) pass through untouched."""

    def __init__(self, options: list[SamplingOptions]) -> None:
        self.rows = [(b, o) for b, o in enumerate(options) if not o.greedy]
        self.generators: list[torch.Generator] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if not self.generators:  # made here: a generator must live on the device of the scores
            self.generators = [seeded_generator(scores.device, o.seed) for _, o in self.rows]
        scores = scores.clone()  # (B, V)
        for (b, o), generator in zip(self.rows, self.generators):
            scores[b : b + 1] = draw_tokens(scores[b : b + 1], o.temperature, o.top_p, generator)  # (1, V)
        return scores


class GenerationEngine:
    """Owns the model; one thread runs the waiting jobs in batches (see the module docstring)."""

    def __init__(self, model, processor: AudioProcessor, *, max_batch: int, batch_wait_s: float) -> None:
        self.model = model
        self.processor = processor
        self.max_batch = max_batch
        self.batch_wait_s = batch_wait_s
        tokenizer = processor.tokenizer
        self.stop_ids = frozenset(stop_token_ids(tokenizer, getattr(model.llm, "generation_config", None)))
        self._pending: deque[Job] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._work, name="eardrum-generate", daemon=True)
        self._counts = {"batches": 0, "requests": 0, "largest_batch": 0}

    def stats(self) -> dict[str, int]:
        """Jobs waiting now; batches and requests run so far, and the largest batch."""
        return {"waiting": len(self._pending), **self._counts}

    def start(self) -> None:
        self._thread.start()

    def drain(self) -> int:
        """Stop taking jobs (new ones get 503 `shutting_down`), answer the waiting ones with that error, and
        let the running batch finish. Safe from any thread, and to call again; returns how many were waiting."""
        with self._cond:
            self._closed = True
            dropped = list(self._pending)
            self._pending.clear()
            self._cond.notify_all()
        for job in dropped:
            job.emit(_shutting_down())
        return len(dropped)

    def close(self, timeout: float = 10.0) -> None:
        """Drain, then wait up to `timeout` seconds for the running batch to end."""
        self.drain()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def submit(self, job: Job) -> None:
        """Queue a job; its results arrive through `job.emit`."""
        with self._cond:
            if self._closed:
                raise _shutting_down()
            self._pending.append(job)
            self._cond.notify()

    def _next_batch(self) -> list[Job] | None:
        with self._cond:
            while not self._pending and not self._closed:
                self._cond.wait()
            deadline = time.monotonic() + self.batch_wait_s
            while not self._closed and len(self._pending) < self.max_batch:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            if self._closed:
                return None
            batch = [self._pending.popleft() for _ in range(min(self.max_batch, len(self._pending)))]
        return [job for job in batch if not job.cancelled]

    def _work(self) -> None:
        while (batch := self._next_batch()) is not None:
            if batch:
                self._run(batch)

    def _run(self, jobs: list[Job]) -> None:
        self._counts["batches"] += 1
        self._counts["requests"] += len(jobs)
        self._counts["largest_batch"] = max(self._counts["largest_batch"], len(jobs))
        try:
            rows = self._generate(jobs)
        except Exception:  # one failing batch must not stop the server: its requests get a 500
            logger.exception("generation failed for a batch of %d requests", len(jobs))
            error = APIError(
                500, "the model failed on this request; the server log has the details", type="server_error"
            )
            for job in jobs:
                job.emit(error)
            return
        for row in rows:
            row.finish()

    def _generate(self, jobs: list[Job]) -> list[_Row]:
        batch = self.processor([job.conversation for job in jobs], add_generation_prompt=True)  # left-padded
        rows = [_Row(job, self.processor.tokenizer, self.stop_ids) for job in jobs]
        options = [job.options for job in jobs]
        sampler = [] if all(o.greedy for o in options) else [_RowSampler(options)]
        # Greedy settings for the batch: sampling rows are drawn by _RowSampler (OpenAI's sampling has no
        # top-k), and each row ends at its own stop, length or loop through _RowMonitor.
        settings = GenerationSettings(max_new_tokens=max(o.max_tokens for o in options), stop_loops=0)
        generate_tokens(
            self.model,
            self.processor.tokenizer,
            batch,
            settings,
            logits_processor=sampler,
            stopping_criteria=StoppingCriteriaList([_RowMonitor(rows)]),
        )
        return rows


def _shutting_down() -> APIError:
    return APIError(503, "the server is shutting down", type="server_error", code="shutting_down")
