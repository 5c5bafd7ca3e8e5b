"""Attention for packed rows: each example of a packed row attends only within itself, computed per example.

A packed training row (`training.collate.pack_batch`) holds several examples one after another, its
`position_ids` restarting at 0 for each. transformers' SDPA path keeps attention inside each example with a
block-diagonal mask over the whole row: it computes every pair of positions in the row, most of them masked
away (a row of 8 examples computes 8x the attention it needs, and on a CPU the masked kernel is the slow
one). `PACKED_SDPA` is SDPA that, for such a row, runs causal SDPA on each example's span instead (no mask,
no wasted pairs), and is SDPA itself for every other input (padded batches, decoding with a cache).
`AudioLLM` switches an SDPA LLM to it; the numbers are the same, up to float rounding.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

PACKED_SDPA = "eardrum_packed_sdpa"


def packed_spans(position_ids: torch.Tensor | None, length: int) -> list[tuple[int, int]] | None:
    """The (start, end) of each example in a packed row: `position_ids` (1, T) counting 0, 1, 2, ... within each
    example (a position that does not follow the one before it starts an example, as transformers reads
    packing); None unless there is one row of `length` positions holding two or more examples that each start
    at 0 (a left-padded row, whose pads generate numbers 1, is not a packed one)."""
    if position_ids is None or position_ids.dim() != 2 or position_ids.shape[0] != 1 or position_ids.shape[1] != length:
        return None
    row = position_ids[0]
    starts = [0, *((row[1:] - row[:-1]) != 1).nonzero().flatten().add(1).tolist()]
    if len(starts) < 2 or bool(row[starts].any()):
        return None
    return list(zip(starts, [*starts[1:], length]))


# the last position_ids read (a weak reference, its version and the row length) and their spans
_last: tuple[weakref.ref, int, int, list[tuple[int, int]] | None] | None = None
_may_be_packed = True  # False inside `not_packed()`


@contextlib.contextmanager
def not_packed() -> Iterator[None]:
    """Inside the block no row is read as packed: for a single row known to hold one example (the shared prefix of
    `AudioLLM.forward`), so that its positions are not inspected (reading them waits for the device, and breaks a
    compiled layer's graph)."""
    global _may_be_packed
    kept, _may_be_packed = _may_be_packed, False
    try:
        yield
    finally:
        _may_be_packed = kept


def _spans_of(position_ids: torch.Tensor | None, length: int) -> list[tuple[int, int]] | None:
    """`packed_spans`, read once per forward: every layer gets the same `position_ids` tensor (unchanged: same
    version), and reading it waits for the device."""
    global _last
    if position_ids is None:
        return None
    last = _last
    if last is not None and last[0]() is position_ids and last[1:3] == (position_ids._version, length):
        return last[3]
    spans = packed_spans(position_ids, length)
    _last = (weakref.ref(position_ids), position_ids._version, length, spans)
    return spans


PREFIX_ATTRIBUTE = "_eardrum_prefix"  # an attention module's (keys, values) of a shared prefix, inside `shared_prefix`


def attention_modules(llm: nn.Module) -> list[nn.Module]:
    """The attention modules of a causal LM (plain or peft-wrapped) that know their layer (`layer_idx`), as
    transformers' decoder layers hold them."""
    return [m for m in llm.modules() if isinstance(getattr(m, "layer_idx", None), int)
            and type(m).__name__.endswith("Attention")]


@contextlib.contextmanager
def shared_prefix(llm: nn.Module, keys_values: list[tuple[torch.Tensor, torch.Tensor]], rows: int) -> Iterator[None]:
    """Inside the block every attention layer of `llm` (its modules with a `layer_idx`) reads the keys and values
    `keys_values[layer_idx]` ((1, H_kv, P, D) each, a prefix every row shares, its positions 0..P-1) before the
    positions it is given: the rows attend to the prefix as if it stood at their start. The caller gives those
    rows `position_ids` counting from P and an attention mask of their own positions only."""
    modules = attention_modules(llm)
    if len(modules) != len(keys_values):
        raise ValueError(f"shared prefix: {len(keys_values)} layers of keys and values for {len(modules)} attention "
                         "modules")
    for m in modules:
        k, v = keys_values[m.layer_idx]
        setattr(m, PREFIX_ATTRIBUTE, (k.expand(rows, -1, -1, -1), v.expand(rows, -1, -1, -1)))
    try:
        yield
    finally:
        for m in modules:
            delattr(m, PREFIX_ATTRIBUTE)


def _after_prefix(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  attention_mask: torch.Tensor | None, **kwargs) -> tuple[torch.Tensor, None]:
    """SDPA of the rows' positions over the shared prefix's keys (`shared_prefix`) and their own: every position
    sees the whole prefix, and its own row causally as `attention_mask` (bool (B, 1, Tq, Tk), or None for plain
    causal) says."""
    prefix_keys, prefix_values = getattr(module, PREFIX_ATTRIBUTE)  # (B, H_kv, P, D)
    if attention_mask is None:
        own = torch.ones(query.shape[2], key.shape[2], dtype=torch.bool, device=query.device).tril()[None, None]
    elif attention_mask.dtype == torch.bool:
        own = attention_mask
    else:  # an additive float mask: 0 where attended
        own = attention_mask == 0
    seen = torch.ones(*own.shape[:-1], prefix_keys.shape[2], dtype=torch.bool, device=own.device)
    mask = torch.cat([seen, own], dim=-1)  # (B or 1, 1, Tq, P + Tk)
    kwargs.pop("is_causal", None)
    return sdpa_attention_forward(module, query, torch.cat([prefix_keys, key], dim=2),
                                  torch.cat([prefix_values, value], dim=2), mask, is_causal=False, **kwargs)


def packed_sdpa_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                        attention_mask: torch.Tensor | None, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention-function contract: query (B, H, Tq, D), key / value (B, H_kv, Tk, D) -> output
    (B, Tq, H, D), None. A packed row without a cache (B = 1, Tq = Tk, `position_ids` restarting) is computed
    example by example, each causal within itself; rows after a shared prefix (`shared_prefix`) attend to it
    too; anything else goes to SDPA with its mask."""
    if hasattr(module, PREFIX_ATTRIBUTE):
        return _after_prefix(module, query, key, value, attention_mask, **kwargs)
    spans = None
    if _may_be_packed and query.shape[0] == 1 and query.shape[2] == key.shape[2] and not kwargs.get("sliding_window"):
        spans = _spans_of(kwargs.get("position_ids"), query.shape[2])
    if spans is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    kwargs.pop("is_causal", None)
    parts = [sdpa_attention_forward(module, query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], None,
                                    is_causal=True, **kwargs)[0] for a, b in spans]
    return torch.cat(parts, dim=1), None


AttentionInterface.register(PACKED_SDPA, packed_sdpa_forward)
AttentionMaskInterface.register(PACKED_SDPA, sdpa_mask)  # the masks SDPA takes, for the inputs it gets


def use_packed_attention(llm: nn.Module) -> bool:
    """Switch an LLM (plain or peft-wrapped) that runs SDPA to `PACKED_SDPA`; True when it did. Other
    implementations (flash attention reads packed rows itself, eager is asked for explicitly) are left alone."""
    config = getattr(llm, "config", None)
    if config is None or getattr(config, "_attn_implementation", None) != "sdpa":
        return False
    config._attn_implementation = PACKED_SDPA
    return True
