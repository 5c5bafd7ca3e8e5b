"""Streamed training data: sources read as training goes, never all held in memory.

When a training source says `streaming: true`, every training source is read as a stream (a manifest
line by line, a `datasets` source as an IterableDataset). Each epoch:
1. each source's rows pass through a shuffle buffer (`shuffle_buffer` rows, seeded by run seed, epoch and
   source), and each row is checked as it is read (`RecordChecker`): a bad one is named, and with
   `data.skip_bad` skipped and listed in `bad_examples_train.jsonl`, else the run stops there;
2. the sources are mixed by weight: each example comes from a source drawn with probability proportional
   to its weight among those not yet read through; the epoch ends when every source has been read once;
3. the mixed stream is cut into buffers of `group_buffer` examples; inside a buffer the batches are
   length-grouped exactly as an in-memory epoch's chunks are (`plan_batches`), then shared between the
   ranks (`shard_batches`).
Every rank reads the same stream and computes the same batches, so nothing needs to be sent between them,
and a run resumes exactly: the epoch is read again from its start and the batches already trained are
skipped without decoding their audio. The epoch's length is unknown in advance: `train.max_steps` is
required, and the feature cache (filled from every example before training) is off.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from eardrum.common.batching import plan_batches, shard_batches, stable_hash
from eardrum.common.records import DataError, DataProblem, DataSource, InvalidRecord, Record, RecordChecker, open_rows

logger = logging.getLogger(__name__)

SHUFFLE_BUFFER = 1000  # rows of one source shuffled together (`data.shuffle_buffer`)
GROUP_BUFFER = 1000  # mixed examples length-grouped together (`data.group_buffer`)


@dataclass(frozen=True)
class StreamSettings:
    """How a streamed epoch is cut (see the module docstring)."""

    batch_size: int | None
    max_tokens: int | None
    group_by_length: bool = True
    seed: int = 0
    shuffle_buffer: int = SHUFFLE_BUFFER
    group_buffer: int = GROUP_BUFFER
    packed: bool = False  # max_tokens caps the summed lengths (`plan_batches`)


def shuffled(rows: Iterator, size: int, rng: np.random.Generator) -> Iterator:
    """`rows` in a random order drawn through a buffer of `size`: each row leaves at a random point up to
    `size` rows after it came; `size` 1 keeps the order."""
    buffer: list = []
    for row in rows:
        if len(buffer) < size:
            buffer.append(row)
            continue
        k = int(rng.integers(size))
        yield buffer[k]
        buffer[k] = row
    order = rng.permutation(len(buffer))
    for k in order:
        yield buffer[k]


class StreamedEpochs:
    """The batches of each streamed epoch for one rank, as lists of checked `Record`s."""

    def __init__(
        self,
        sources: Sequence[DataSource],
        checker: RecordChecker,
        lengths: Callable[[list[Record]], list[int]],
        settings: StreamSettings,
        num_replicas: int = 1,
        rank: int = 0,
        skip_bad: bool = False,
        on_bad: Callable[[list[DataProblem]], None] | None = None,
    ) -> None:
        """
        Args:
            sources: the training sources; their labels must be distinct.
            checker: checks each raw row into a `Record` (its audio headers only; nothing is decoded).
            lengths: tokens per example for a list of records (text plus audio), for length grouping.
            settings: batch size or token budget, grouping, seed, buffer sizes.
            num_replicas, rank: this process's place among the ranks.
            skip_bad: skip a bad row (given to `on_bad`) instead of stopping with a `DataError`.
            on_bad: receives the problems of skipped rows, once per row and epoch.
        """
        if settings.shuffle_buffer < 1 or settings.group_buffer < 1:
            raise ValueError(f"shuffle_buffer and group_buffer: expected >= 1, got {settings}")
        self.sources = list(sources)
        self.checker = checker
        self.lengths = lengths
        self.settings = settings
        self.num_replicas = num_replicas
        self.rank = rank
        self.skip_bad = skip_bad
        self.on_bad = on_bad or (lambda problems: None)
        for source in self.sources:
            open_rows(source)  # a source that cannot be opened is named before training starts

    def _records(self, source: DataSource, epoch: int) -> Iterator[Record]:
        rng = np.random.default_rng([self.settings.seed, epoch, stable_hash(source.label), 1])
        for where, raw, base in shuffled(open_rows(source), self.settings.shuffle_buffer, rng):
            try:
                yield self.checker.record(raw, where, base, source)
            except InvalidRecord as err:
                problem = DataProblem(where, str(err))
                if not self.skip_bad:
                    raise DataError([problem], message=f"a bad example in a streamed source (data.skip_bad=true "
                                                       f"skips and lists such examples): {where}: {err}") from None
                self.on_bad([problem])

    def mixed(self, epoch: int) -> Iterator[Record]:
        """One epoch's checked records, the sources drawn by weight until each has been read through."""
        live = {k: self._records(s, epoch) for k, s in enumerate(self.sources)}
        rng = np.random.default_rng([self.settings.seed, epoch, 2])
        while live:
            keys = sorted(live)
            weights = np.array([self.sources[k].weight for k in keys], dtype=float)
            k = keys[int(rng.choice(len(keys), p=weights / weights.sum()))]
            record = next(live[k], None)
            if record is None:
                del live[k]
                continue
            yield record

    def batches(self, epoch: int) -> Iterator[list[Record]]:
        """This rank's batches of epoch `epoch`; every rank gets as many (`shard_batches`)."""
        s = self.settings
        stream = self.mixed(epoch)
        for number in itertools.count():
            buffer = list(itertools.islice(stream, s.group_buffer))
            if not buffer:
                return
            if len(buffer) < self.num_replicas:  # the stream's last few rows: repeat them so every rank has one
                buffer = list(itertools.islice(itertools.cycle(buffer), self.num_replicas))
            lengths = self.lengths(buffer)
            planned = plan_batches(lengths, range(len(buffer)), batch_size=s.batch_size, max_tokens=s.max_tokens,
                                   seed=s.seed, epoch=epoch * 1_000_003 + number, group_by_length=s.group_by_length,
                                   packed=s.packed)
            for batch in shard_batches(planned, self.num_replicas, self.rank):
                yield [buffer[i] for i in batch]
