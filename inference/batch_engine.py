"""One model, many requests: a queue and a generation thread that batches them continuously.

The generation thread owns the model. When idle, it takes the oldest waiting job and waits up to
`batch_wait_s` for others (so requests that arrive together share a forward pass), up to `max_batch`.
Each job's prompt is embedded once (text and audio tokens, `AudioLLM.embed`). The thread then decodes
the running rows one token per step (`AudioLLM.decode_step`, one KV cache for the batch), and between
any two steps jobs that wait join the running rows (their prompts prefilled, their cache put beside the
batch's) and rows that have ended leave. A short request is therefore never held back by a long answer,
and a row decodes the same tokens whoever shares its batch. Every job can share a batch with every other:

- decoding settings are per row: greedy rows take the argmax, and each sampling row draws its token
  with its own temperature, top_p and `torch.Generator`, so a seeded answer does not depend on its
  neighbours and the global random state is never touched;
- every row's newest token is seen at each step, by the row itself: it streams text deltas (streaming
  rows) and it ends and answers on its own, without waiting for the rest of the batch, at an
  end-of-turn token, at one of its stop strings, at its max_tokens, when it loops (the same run of
  tokens repeated `GenerationSettings.stop_loops` times, as on every other path), or when its client
  has gone.

`continuous=False` is static batching, for comparison (`benchmarks/serve_batching.py`): as one `generate`
call over a batch, jobs join only an idle engine, and a batch runs until its last row ends, the rows that
ended before it decoded as padding (each is still answered the step it ends).

Results go back to the event loop through `Job.emit`, which is thread-safe; the loop never waits
on the model.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from eardrum.adapters.processor import AudioProcessor
from eardrum.common.decoding import draw_tokens, seeded_generator, stop_token_ids
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
        if self.job.stream:
            self._send(self.text)
        self.job.emit(Finished(self.sent if self.job.stream else self.text, self.reason, self.generated))


def _left_pad(contexts: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Contexts (T_i, D_llm) -> embeddings (B, T, D_llm) left-padded with zeros, and their mask (B, T)."""
    width = max(len(c) for c in contexts)
    embeds = contexts[0].new_zeros(len(contexts), width, contexts[0].shape[-1])
    mask = torch.zeros(len(contexts), width, dtype=torch.long, device=embeds.device)
    for b, c in enumerate(contexts):
        embeds[b, width - len(c) :] = c
        mask[b, width - len(c) :] = 1
    return embeds, mask


def _zeros_before(x: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    """`x` with zeros put before its entries along `dim` until that dimension is `width` long."""
    missing = width - x.shape[dim]
    if missing <= 0:
        return x
    shape = list(x.shape)
    shape[dim] = missing
    return torch.cat([x.new_zeros(shape), x], dim=dim)


def _plain_layers(cache) -> list | None:
    """The cache's layers when every one is a plain growing layer holding keys and values (B, H, T, D_head),
    which rows can be joined to and cut from; None for any other kind (sliding windows, recurrent states)."""
    layers = getattr(cache, "layers", None)
    if layers is None or not all(type(layer) is DynamicLayer for layer in layers):
        return None
    return layers


class _Batch:
    """The rows decoding now: one KV cache, one new token per row per step (see the module docstring).

    The cache holds (B, H, T, D_head) per layer, rows left-padded; `mask` (B, T) is 1 where a cache position
    holds a real token of its row, and `tokens` (B,) is each row's newest token, fed at the next step. Rows
    join between steps: their prompts are prefilled together, and their cache is padded on the left to the
    running one's length (or it to theirs) and put beside it. Rows that end leave at once, and cache
    positions that are padding in every row left are cut away. A model whose cache layers are not plain
    (a sliding window, a recurrent state) cannot have rows put beside each other: there a join prefills the
    whole batch again from each row's prompt and tokens so far (the same tokens, more work).
    """

    def __init__(self, model, counts: dict[str, int], *, leave_early: bool = True) -> None:
        self.model = model
        self.counts = counts
        self.leave_early = leave_early  # False: ended rows are decoded as padding until every row has ended
        self.rows: list[_Row] = []
        self.cache = None
        self.mask: torch.Tensor | None = None  # (B, T)
        self.tokens: torch.Tensor | None = None  # (B,)

    def __len__(self) -> int:
        return len(self.rows)

    def add(self, rows: list[_Row]) -> None:
        """Prefill `rows`, give each its first token, and put them in the batch."""
        self.counts["joined"] += len(rows) if self.rows else 0
        if self.rows and _plain_layers(self.cache) is None:
            rows, self.rows = self.rows + rows, []  # rebuilt: every row prefilled from its tokens so far
        embedding = self.model.llm.get_input_embeddings()
        embeds, mask = _left_pad([row.context(embedding) for row in rows])  # (B_new, T_new, D_llm), (B_new, T_new)
        cache = DynamicCache(config=self.model.llm.config)
        logits = self.model.decode_step(cache, mask, inputs_embeds=embeds)  # (B_new, V)
        if not self.rows:
            self.cache, self.mask = cache, mask
            self.tokens = logits.new_zeros(0, dtype=torch.long)
        else:
            width = max(self.mask.shape[1], mask.shape[1])
            for old, new in zip(_plain_layers(self.cache), _plain_layers(cache)):
                old.keys = torch.cat([_zeros_before(old.keys, width, 2), _zeros_before(new.keys, width, 2)])
                old.values = torch.cat([_zeros_before(old.values, width, 2), _zeros_before(new.values, width, 2)])
            self.mask = torch.cat([_zeros_before(self.mask, width, 1), _zeros_before(mask, width, 1)])
        tokens = _choose(rows, logits)
        self.rows += rows
        self.tokens = torch.cat([self.tokens, tokens])
        self._take_tokens(rows, tokens)

    def step(self) -> None:
        """Decode one token for every row."""
        self.counts["steps"] += 1
        self.mask = torch.cat([self.mask, self.mask.new_ones(len(self.rows), 1)], dim=1)  # (B, T + 1)
        logits = self.model.decode_step(self.cache, self.mask, input_ids=self.tokens[:, None])  # (B, V)
        self.tokens = _choose(self.rows, logits)
        self._take_tokens(self.rows, self.tokens)

    def _take_tokens(self, rows: list[_Row], tokens: torch.Tensor) -> None:
        """Push each row's new token, answer the rows that ended, and let them leave the batch."""
        for row, token in zip(rows, tokens.tolist()):
            row.push(token)
            if row.reason is not None:
                row.finish()  # answered now, not when the batch's longest row ends
        keep = [b for b, row in enumerate(self.rows) if row.reason is None]
        if len(keep) == len(self.rows) or (keep and not self.leave_early):
            return
        self.rows = [self.rows[b] for b in keep]
        if not keep:
            self.cache = self.mask = self.tokens = None
            return
        index = torch.tensor(keep, device=self.mask.device)
        self.cache.batch_select_indices(index)
        self.mask, self.tokens = self.mask[index], self.tokens[index]
        layers = _plain_layers(self.cache)
        first = int(self.mask.any(0).long().argmax())  # positions before it are padding in every row
        if first and layers is not None:
            for layer in layers:
                layer.keys, layer.values = layer.keys[:, :, first:], layer.values[:, :, first:]
            self.mask = self.mask[:, first:]


def _choose(rows: list[_Row], logits: torch.Tensor) -> torch.Tensor:
    """Next-token logits (B, V) -> each row's token (B,): greedy rows take the argmax, sampling rows draw with
    their own temperature, top_p and generator (so a seeded answer does not depend on its neighbours)."""
    scores = logits
    for b, row in enumerate(rows):
        o = row.job.options
        if o.greedy:
            continue
        if scores is logits:
            scores = logits.clone()
        if row.generator is None:  # made here: a generator must live on the device of the scores
            row.generator = seeded_generator(scores.device, o.seed)
        scores[b : b + 1] = draw_tokens(scores[b : b + 1], o.temperature, o.top_p, row.generator)  # (1, V)
    return scores.argmax(dim=-1)


class GenerationEngine:
    """Owns the model; one thread runs the jobs in continuous batches (see the module docstring)."""

    def __init__(
        self, model, processor: AudioProcessor, *, max_batch: int, batch_wait_s: float, continuous: bool = True
    ) -> None:
        self.model = model
        self.processor = processor
        self.max_batch = max_batch
        self.batch_wait_s = batch_wait_s
        self.continuous = continuous
        tokenizer = processor.tokenizer
        self.stop_ids = frozenset(stop_token_ids(tokenizer, getattr(model.llm, "generation_config", None)))
        self._pending: deque[Job] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._work, name="eardrum-generate", daemon=True)
        self._counts = {"requests": 0, "steps": 0, "largest_batch": 0, "joined": 0}

    def stats(self) -> dict[str, int]:
        """Jobs waiting now; requests and decoding steps run so far, the most rows decoded in one step, and how
        many rows joined a batch that was already running."""
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

    def _take(self, running: int) -> list[Job] | None:
        """Jobs to start beside `running` unfinished rows: when idle, wait for the first and up to
        `batch_wait_s` for more; when rows run, only those already waiting (none when batching statically).
        None once closed and idle."""
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
            if running and not self.continuous:
                return []
            room = self.max_batch - running
            batch = [self._pending.popleft() for _ in range(min(room, len(self._pending)))]
        return [job for job in batch if not job.cancelled]

    def _work(self) -> None:
        batch = _Batch(self.model, self._counts, leave_early=self.continuous)
        while (jobs := self._take(len(batch))) is not None:
            rows = self._start(jobs)
            try:
                if rows:
                    batch.add(rows)
                    self._counts["largest_batch"] = max(self._counts["largest_batch"], len(batch))
                if len(batch):
                    batch.step()
                    if not len(batch) and not self._pending:
                        _return_free_memory()  # idle now: the caches' freed memory goes back to the system
            except Exception:  # one failing step must not stop the server: its requests get a 500
                logger.exception("generation failed for a batch of %d requests", len(batch) + len(rows))
                for row in {id(r): r for r in batch.rows + rows}.values():
                    if not row.reported and row.reason != "cancelled":
                        row.reported = True
                        row.job.emit(_model_failed())
                batch = _Batch(self.model, self._counts, leave_early=self.continuous)

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


def _return_free_memory() -> None:
    """Hand the C heap's free pages back to the system (glibc's malloc_trim). KV caches of every size are
    allocated and freed as rows come and go; without this an idle server keeps their high-water mark. Elsewhere
    (another C library, the GPU's memory) it does nothing."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _glibc():
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


_LIBC = _glibc() if sys.platform.startswith("linux") else None


def _model_failed() -> APIError:
    return APIError(500, "the model failed on this request; the server log has the details", type="server_error")


def _shutting_down() -> APIError:
    return APIError(503, "the server is shutting down", type="server_error", code="shutting_down")
