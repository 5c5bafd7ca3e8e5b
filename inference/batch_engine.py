"""One model, many requests: a queue and a generation thread that batches them continuously.

The generation thread owns the model. When idle, it takes the oldest waiting job and waits up to
`batch_wait_s` for others (so requests that arrive together share a forward pass), up to `max_batch`.
Each job's prompt is embedded once (text and audio tokens, `AudioLLM.embed`); the rows then run as ONE
left-padded `generate` from those embeddings. Rows join while others run: once a batch has run
`SEGMENT_STEPS` steps, jobs are waiting and the batch has room, the batch stops at that step, and its
unfinished rows go on in the next batch beside the new jobs, each continued from its prompt and the
tokens it has so far (recomputed once, in that batch's prefill). A long answer therefore never holds a
short request back for more than `SEGMENT_STEPS` steps. Every job can share a batch with every other:

- decoding settings are per row: `generate` runs greedy, and a logits processor draws the token of
  each sampling row with that row's temperature, top_p and its own `torch.Generator`, so a seeded
  answer does not depend on its neighbours and the global random state is never touched;
- a stopping criterion sees every row's newest token at each step. It is the per-row streamer
  (streaming rows get text deltas as they are decoded) and it ends and answers each row on its own,
  without waiting for the rest of the batch: at an end-of-turn token, at one of its stop strings, at
  its max_tokens, when it loops (the same run of tokens repeated `GenerationSettings.stop_loops`
  times, as on every other path), or when its client has gone.

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
SEGMENT_STEPS = 16  # a batch runs at least this many steps before it stops to let waiting jobs in


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
    """One job's row across the batches it runs in: its prompt's embeddings, its new tokens, its text,
    its sampler, and why it ended."""

    def __init__(self, job: Job, tokenizer, stop_ids: frozenset[int], prompt: torch.Tensor | None = None) -> None:
        self.job = job
        self.tokenizer = tokenizer
        self.stop_ids = stop_ids
        self.prompt = prompt  # (T_prompt, D_llm): the prompt's embeddings, audio tokens merged in
        self.ids: list[int] = []  # new tokens without the end-of-turn token
        self.generated = 0
        self.text = ""
        self.sent = ""  # what the client has been streamed
        self.reason: str | None = None
        self.reported = False  # whether finish() has sent the result
        self.generator: torch.Generator | None = None  # a sampling row's draws, kept across its batches
        # Decoding at every step costs; only rows that stream or look for stop strings need it.
        self.watch = job.stream or bool(job.options.stop)

    @property
    def left(self) -> int:
        """New tokens this row may still generate."""
        return self.job.options.max_tokens - self.generated

    def context(self, embedding: torch.nn.Module) -> torch.Tensor:
        """(T_prompt + T_so_far, D_llm): the prompt's embeddings, then those of the tokens generated so far."""
        if not self.ids:
            return self.prompt
        ids = torch.tensor(self.ids, device=embedding.weight.device)
        return torch.cat([self.prompt, embedding(ids).to(self.prompt.dtype)])

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
        """Report the result, once: called as soon as the row ends, even while its batch goes on."""
        if self.reported or self.reason == "cancelled":
            return
        self.reported = True
        if not self.watch:
            self.text = self.tokenizer.decode(self.ids, skip_special_tokens=True).strip()
        self.reason = self.reason or "length"  # only the LLM's own length limit ends a row without us
        if self.job.stream:
            self._send(self.text)
        self.job.emit(Finished(self.sent if self.job.stream else self.text, self.reason, self.generated))


class _RowMonitor(StoppingCriteria):
    """Called by generate once per step with every row's tokens so far; ends rows one by one, and ends
    the whole batch early when `make_room()` says jobs wait for a place in it (see the module docstring)."""

    def __init__(self, rows: list[_Row], make_room=lambda running: False) -> None:
        self.rows = rows
        self.make_room = make_room
        self.steps = 0

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        self.steps += 1
        for row, token in zip(self.rows, input_ids[:, -1].tolist()):  # input_ids (B, T_new)
            row.push(token)
            if row.reason is not None:
                row.finish()  # answered now, not when the batch's longest row ends
        ended = [row.reason is not None for row in self.rows]
        if self.steps >= SEGMENT_STEPS and self.make_room(sum(not e for e in ended)):
            ended = [True] * len(self.rows)  # the unfinished rows go on in the next batch
        return torch.tensor(ended, device=input_ids.device)


class _RowSampler(LogitsProcessor):
    """Draws the next token of each sampling row with that row's own generator and leaves only it
    possible, so generate's greedy step takes it; greedy rows (temperature 0) pass through untouched."""

    def __init__(self, rows: list[_Row]) -> None:
        self.rows = [(b, row) for b, row in enumerate(rows) if not row.job.options.greedy]

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        scores = scores.clone()  # (B, V)
        for b, row in self.rows:
            o = row.job.options
            if row.generator is None:  # made here: a generator must live on the device of the scores
                row.generator = seeded_generator(scores.device, o.seed)
            scores[b : b + 1] = draw_tokens(scores[b : b + 1], o.temperature, o.top_p, row.generator)  # (1, V)
        return scores


class GenerationEngine:
    """Owns the model; one thread runs the jobs in continuous batches (see the module docstring)."""

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
        self._counts = {"batches": 0, "requests": 0, "largest_batch": 0, "continued": 0}

    def stats(self) -> dict[str, int]:
        """Jobs waiting now; batches (generate calls) and requests run so far, the largest batch, and how
        many times an unfinished row went on in a later batch to make room for waiting jobs."""
        return {"waiting": len(self._pending), **self._counts}

    def start(self) -> None:
        self._thread.start()

    def drain(self) -> int:
        """Stop taking jobs (new ones get 503 `shutting_down`), answer the waiting ones with that error, and
        let the running rows finish. Safe from any thread, and to call again; returns how many were waiting."""
        with self._cond:
            self._closed = True
            dropped = list(self._pending)
            self._pending.clear()
            self._cond.notify_all()
        for job in dropped:
            job.emit(_shutting_down())
        return len(dropped)

    def close(self, timeout: float = 10.0) -> None:
        """Drain, then wait up to `timeout` seconds for the running rows to end."""
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

    def _make_room(self, running: int) -> bool:
        """Whether a running batch with `running` unfinished rows should stop to let waiting jobs in."""
        return bool(self._pending) and running < self.max_batch and not self._closed

    def _take(self, running: int) -> list[Job] | None:
        """Jobs to start beside `running` unfinished rows: when idle, wait for the first and up to
        `batch_wait_s` for more; when rows run, only those already waiting. None once closed and idle."""
        with self._cond:
            if running == 0:
                while not self._pending and not self._closed:
                    self._cond.wait()
                deadline = time.monotonic() + self.batch_wait_s
                while not self._closed and len(self._pending) < self.max_batch:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
            if self._closed:
                return None if running == 0 else []
            room = self.max_batch - running
            batch = [self._pending.popleft() for _ in range(min(room, len(self._pending)))]
        return [job for job in batch if not job.cancelled]

    def _work(self) -> None:
        rows: list[_Row] = []  # unfinished rows, carried from one batch to the next
        while (jobs := self._take(len(rows))) is not None:
            rows += self._start(jobs)
            if rows:
                rows = self._run(rows)

    def _start(self, jobs: list[Job]) -> list[_Row]:
        """Rows for new jobs, each with its prompt embedded; a job whose prompt fails gets a 500 alone."""
        if not jobs:
            return []
        self._counts["requests"] += len(jobs)
        try:
            prompts = self._embed([job.conversation for job in jobs])
        except Exception:  # find the job at fault: embed them one by one
            prompts = []
            for job in jobs:
                try:
                    prompts += self._embed([job.conversation])
                except Exception:
                    logger.exception("reading a request's prompt failed")
                    job.emit(_model_failed())
                    prompts.append(None)
        tokenizer = self.processor.tokenizer
        return [_Row(job, tokenizer, self.stop_ids, p) for job, p in zip(jobs, prompts) if p is not None]

    @torch.no_grad()
    def _embed(self, conversations: list[list[dict]]) -> list[torch.Tensor]:
        """Each conversation's prompt as embeddings (T_i, D_llm), audio tokens merged in, padding dropped."""
        batch = self.processor(conversations, add_generation_prompt=True)  # left-padded
        device = self.model.device
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
        mask = batch.pop("attention_mask").bool()  # (B, T)
        embeds = self.model.embed(**batch)  # (B, T, D_llm)
        return [e[m] for e, m in zip(embeds, mask)]

    def _run(self, rows: list[_Row]) -> list[_Row]:
        """One batched generate over `rows`; reports the rows that ended and returns those that go on."""
        self._counts["batches"] += 1
        self._counts["largest_batch"] = max(self._counts["largest_batch"], len(rows))
        try:
            self._generate(rows)
        except Exception:  # one failing batch must not stop the server: its requests get a 500
            logger.exception("generation failed for a batch of %d requests", len(rows))
            for row in rows:
                if not row.reported and row.reason != "cancelled":
                    row.job.emit(_model_failed())
            return []
        going_on = [row for row in rows if row.reason is None]
        for row in rows:
            if row.reason is not None:
                row.finish()  # those the LLM's own length ended (the others have reported already)
        self._counts["continued"] += len(going_on)
        return going_on

    @torch.no_grad()
    def _generate(self, rows: list[_Row]) -> None:
        embedding = self.model.llm.get_input_embeddings()
        contexts = [row.context(embedding) for row in rows]  # (T_i, D_llm) each
        width = max(len(c) for c in contexts)
        embeds = contexts[0].new_zeros(len(rows), width, contexts[0].shape[-1])  # (B, T, D_llm), left-padded
        mask = torch.zeros(len(rows), width, dtype=torch.long, device=embeds.device)  # (B, T)
        for b, c in enumerate(contexts):
            embeds[b, width - len(c) :] = c
            mask[b, width - len(c) :] = 1
        sampler = [] if all(row.job.options.greedy for row in rows) else [_RowSampler(rows)]
        # Greedy settings for the batch: sampling rows are drawn by _RowSampler (OpenAI's sampling has no
        # top-k), and each row ends at its own stop, length or loop through _RowMonitor.
        settings = GenerationSettings(max_new_tokens=max(row.left for row in rows), stop_loops=0)
        generate_tokens(
            self.model,
            self.processor.tokenizer,
            {"inputs_embeds": embeds, "attention_mask": mask},
            settings,
            logits_processor=sampler,
            stopping_criteria=StoppingCriteriaList([_RowMonitor(rows, self._make_room)]),
        )


def _model_failed() -> APIError:
    return APIError(500, "the model failed on this request; the server log has the details", type="server_error")


def _shutting_down() -> APIError:
    return APIError(503, "the server is shutting down", type="server_error", code="shutting_down")
