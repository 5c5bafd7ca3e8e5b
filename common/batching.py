"""One epoch's plan: which examples (mixed by source weight), in which batches, on which rank.

`mix_indices` draws the epoch's examples from each source by its weight and shuffles them.
`plan_batches` cuts that order into batches of similar length: the order is split into chunks of
about `CHUNK_BATCHES` batches, each chunk is sorted by length and cut into batches, and the
batches are shuffled. Sorting inside a chunk keeps padding small; keeping chunks small keeps the
epoch random, and shuffling the batches stops long and short batches from coming in runs.
`shard_batches` gives each rank an equal share without dropping anything.

Everything here is a pure function of its arguments and (seed, epoch), so every rank computes
the same plan and a resumed run sees the same epoch again.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from numbers import Real
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from .records import Record

CHUNK_BATCHES = 50  # batches' worth of examples sorted together; larger pads less but is less random


def mix_indices(records: Sequence[Record], weights: dict[str, float], seed: int, epoch: int) -> list[int]:
    """The record indices of one epoch, mixed by source weight and shuffled.

    A source of n records with weight w contributes ``round(w * n)`` examples (halves round up):
    each of its records ``k = round(w * n) // n`` times, plus a random subset of the remaining
    ``round(w * n) - k * n`` records, drawn afresh each epoch. So weight 1 shows each record once,
    2 twice, 0.5 a random half that differs from epoch to epoch, 0 none.

    Args:
        records: the records; `Record.source` names each one's source.
        weights: source label -> weight >= 0; every source among `records` needs one.
        seed: run seed, >= 0.
        epoch: epoch number, >= 0.

    Returns:
        Indices into `records`, repeated for weights above 1, in shuffled order; the same for the
        same (records' sources, weights, seed, epoch).
    """
    members: dict[str, list[int]] = {}
    for i, record in enumerate(records):
        members.setdefault(record.source, []).append(i)
    chosen: list[int] = []
    for name, ids in members.items():
        if name not in weights:
            raise ValueError(f"weights: no weight for source {name!r}; got weights for {sorted(map(str, weights))}")
        w = weights[name]
        if isinstance(w, bool) or not isinstance(w, Real) or not math.isfinite(w) or w < 0:
            raise ValueError(f"weights[{name!r}]: expected a number >= 0, got {w!r}")
        repeats, extra = divmod(math.floor(w * len(ids) + 0.5), len(ids))
        rng = np.random.default_rng([seed, epoch, stable_hash(name)])
        chosen.extend(ids * repeats)
        chosen.extend(ids[k] for k in rng.choice(len(ids), extra, replace=False))
    order = np.random.default_rng([seed, epoch]).permutation(len(chosen))
    return [chosen[k] for k in order]


def plan_batches(
    lengths: Sequence[int],
    indices: Sequence[int],
    *,
    batch_size: int | None = None,
    max_tokens: int | None = None,
    seed: int = 0,
    epoch: int = 0,
    group_by_length: bool = True,
    packed: bool = False,
) -> list[list[int]]:
    """Cut one epoch's order into batches.

    Args:
        lengths: lengths[i] is example i's sequence length in tokens (text plus audio).
        indices: the epoch's order (from `mix_indices`); an index listed twice is batched twice.
        batch_size: examples per batch (the last batch may be smaller). Exactly one of
            batch_size / max_tokens.
        max_tokens: cap on a batch's padded size, ``len(batch) * max(lengths in batch)``. An
            example longer than max_tokens on its own gets a batch of its own (check for such
            examples before training if that is not wanted).
        seed, epoch: the batch order depends on them and nothing else (both >= 0).
        group_by_length: False cuts `indices` in order, without sorting or shuffling.
        packed: the batch's examples will be packed into one row (`training.collate.pack_batch`), so
            max_tokens caps the sum of their lengths instead of the padded size.

    Returns:
        Batches of indices; every entry of `indices` appears in exactly one batch.
    """
    _check_plan_args(lengths, indices, batch_size, max_tokens)
    order = [int(i) for i in indices]
    if not group_by_length:
        return _cut(order, lengths, batch_size, max_tokens, packed)
    batches = []
    for chunk in _chunks(order, lengths, batch_size, max_tokens):
        chunk.sort(key=lengths.__getitem__)  # stable: equal lengths keep their shuffled order
        batches.extend(_cut(chunk, lengths, batch_size, max_tokens, packed))
    rng = np.random.default_rng([seed, epoch])
    return [batches[k] for k in rng.permutation(len(batches))]


def shard_batches(batches: Sequence[Sequence[int]], num_replicas: int, rank: int) -> list[list[int]]:
    """Rank `rank`'s share of the batches: batches rank, rank + N, rank + 2N, ... (N = num_replicas).

    All ranks get the same number of batches and nothing is dropped: while the count is not a
    multiple of N, the batch with the most examples (the first such) is split into two halves.
    At most N - 1 splits happen; a half never pads more than the whole did, so a max_tokens cap
    still holds, and halves of a length-sorted batch stay length-grouped. Every rank must pass
    the same `batches` (the same seed and epoch to `plan_batches`).

    Raises:
        ValueError: bad num_replicas / rank, or fewer examples than the batches N ranks need.
    """
    if isinstance(num_replicas, bool) or not isinstance(num_replicas, int) or num_replicas < 1:
        raise ValueError(f"num_replicas: expected a positive integer, got {num_replicas!r}")
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < num_replicas:
        raise ValueError(f"rank: expected an integer in [0, {num_replicas}), got {rank!r}")
    out = [list(b) for b in batches]
    need = -len(out) % num_replicas
    total = sum(len(b) for b in out)
    if total < len(out) + need:
        raise ValueError(
            f"{total} examples cannot fill {len(out) + need} batches, an equal number for each of "
            f"{num_replicas} ranks; use fewer processes or more data"
        )
    for _ in range(need):
        k = max(range(len(out)), key=lambda j: len(out[j]))
        half = (len(out[k]) + 1) // 2
        out[k : k + 1] = [out[k][:half], out[k][half:]]
    return out[rank::num_replicas]


def padding_waste(batches: Sequence[Sequence[int]], lengths: Sequence[int]) -> float:
    """Fraction of the padded tokens ``sum(len(b) * max length in b)`` that are padding."""
    padded = sum(len(b) * max(lengths[i] for i in b) for b in batches if b)
    real = sum(lengths[i] for b in batches for i in b)
    return 1.0 - real / padded if padded else 0.0


def stable_hash(text: str) -> int:
    """A 64-bit hash that, unlike hash(), is the same in every process."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


def _check_plan_args(
    lengths: Sequence[int], indices: Sequence[int], batch_size: int | None, max_tokens: int | None
) -> None:
    if (batch_size is None) == (max_tokens is None):
        raise ValueError(f"pass exactly one of batch_size / max_tokens, got {batch_size=}, {max_tokens=}")
    for name, value in (("batch_size", batch_size), ("max_tokens", max_tokens)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{name}: expected a positive integer, got {value!r}")
    bad = [i for i in indices if not 0 <= i < len(lengths)]
    if bad:
        raise ValueError(f"indices: {len(bad)} out of range [0, {len(lengths)}), e.g. {bad[:5]}")
    short = [i for i in indices if lengths[i] < 1]
    if short:
        raise ValueError(f"lengths: expected >= 1 token per example, got {lengths[short[0]]} for example {short[0]}")


def _chunks(order: list[int], lengths: Sequence[int], batch_size: int | None, max_tokens: int | None):
    """Consecutive pieces of `order`, each about CHUNK_BATCHES batches' worth."""
    if batch_size is not None:
        step = CHUNK_BATCHES * batch_size
        yield from (order[i : i + step] for i in range(0, len(order), step))
        return
    chunk, tokens = [], 0
    for i in order:
        chunk.append(i)
        tokens += lengths[i]
        if tokens >= CHUNK_BATCHES * max_tokens:
            yield chunk
            chunk, tokens = [], 0
    if chunk:
        yield chunk


def _cut(order: list[int], lengths: Sequence[int], batch_size: int | None, max_tokens: int | None,
         packed: bool = False) -> list[list[int]]:
    """Consecutive batches of `order`: fixed size, or greedy under the padded-size cap (the summed lengths
    when `packed`)."""
    if batch_size is not None:
        return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    batches, batch, longest, total = [], [], 0, 0
    for i in order:
        grown = max(longest, lengths[i])
        total += lengths[i]
        if batch and (total if packed else (len(batch) + 1) * grown) > max_tokens:
            total = lengths[i]
            batches.append(batch)
            batch, grown = [], lengths[i]
        batch.append(i)
        longest = grown
    if batch:
        batches.append(batch)
    return batches
