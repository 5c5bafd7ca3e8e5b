"""`train.compile`: the LLM's decoder layers compiled with torch.compile, one layer at a time.

Compiling each decoder layer (as large training codebases do) fuses the elementwise work around the matrix
products (norms, rotary embeddings, activations, LoRA's additions, residuals) into fewer kernels and fewer
passes over memory, while a layer's graph is small enough to compile in seconds and is shared by every layer
of the same shape. The layers keep their parameter names (`nn.Module.compile` works in place), so
checkpoints are unchanged. Shapes that change from batch to batch make the first few batches recompile,
after which the compiled code takes any length.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

from torch import nn

from eardrum.adapters.model import base_model

logger = logging.getLogger(__name__)

BACKEND = "inductor"  # torch.compile's backend for train.compile (tests trace with "eager")


def decoder_layers(llm: nn.Module) -> nn.ModuleList:
    """The decoder layers of a causal LM (under any peft wrapper): the first `nn.ModuleList` whose modules are
    its repeated blocks (`...DecoderLayer`, `...Block`); ValueError naming the model's class when there is none."""
    base = base_model(llm)
    for module in base.modules():
        if isinstance(module, nn.ModuleList) and len(module) and all(
                type(m).__name__.endswith(("DecoderLayer", "Block", "Layer")) for m in module):
            return module
    raise ValueError(f"train.compile: found no decoder layers in {type(base).__name__}; expected an nn.ModuleList "
                     "of ...DecoderLayer modules, as transformers' causal LMs have")


def compile_decoder_layers(llm: nn.Module, backend: str | None = None) -> int:
    """Compile each decoder layer of `llm` in place (`nn.Module.compile`, dynamic shapes once a shape changes);
    returns how many were compiled."""
    layers = decoder_layers(llm)
    for layer in layers:
        layer.compile(backend=backend or BACKEND)
    logger.info("train.compile: %d decoder layers compiled (%s)", len(layers), backend or BACKEND)
    return len(layers)


@contextlib.contextmanager
def uncompiled(llm: nn.Module) -> Iterator[None]:
    """Inside the block the compiled decoder layers of `llm` run their plain forward (to time both on one model)."""
    layers = decoder_layers(llm)
    kept = [layer._compiled_call_impl for layer in layers]
    for layer in layers:
        layer._compiled_call_impl = None
    try:
        yield
    finally:
        for layer, call in zip(layers, kept):
            layer._compiled_call_impl = call
