"""Where and in which precision a model runs: the one function that loads a checkpoint for use.

    model, processor = load_placed("runs/my-model")                       # cuda + bf16 on a GPU, else CPU float32
    model, processor = load_placed("runs/my-model", Placement(device="cpu", quantization="4bit"))

Chat, `eardrum chat`/`ask`/`generate`/`eval`/`serve` and the demo all load through `load_placed`,
so a checkpoint runs the same way whichever of them loads it. `Placement` holds the defaults the
command line shows; this module imports torch only when a model is placed.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

logger = logging.getLogger(__name__)

AUTO = "auto"
DTYPE_NAMES = ("float32", "bfloat16", "float16")
QUANTIZATIONS = (None, "4bit", "8bit")  # the LLM through bitsandbytes; None loads it unquantized


class PlacementError(ValueError):
    """A device, dtype or quantization that cannot be used; the message names it and what is expected."""


@dataclass(frozen=True)
class Placement:
    """Where a loaded model runs."""

    device: str = AUTO  # "auto" (cuda when available, else cpu), "cpu", "cuda", "cuda:N", "mps"
    dtype: str = AUTO  # "auto" (bfloat16 on a GPU that has it, else float16; float32 off the GPU), or a DTYPE_NAMES
    quantization: str | None = None  # None, or "4bit" or "8bit" (bitsandbytes) for the LLM (it then places itself)
    trust_remote_code: bool = False  # let the LLM's own Python code run; never taken from a checkpoint's files

    def problems(self) -> list[str]:
        """Every problem with these settings (empty when valid); CUDA availability is checked on use."""
        out = []
        kind, _, index = str(self.device).partition(":")
        if kind not in (AUTO, "cpu", "cuda", "mps") or (index and not (kind == "cuda" and index.isdigit())):
            out.append(f"device={self.device!r}: expected auto, cpu, cuda, cuda:N or mps")
        if self.dtype != AUTO and self.dtype not in DTYPE_NAMES:
            out.append(f"dtype={self.dtype!r}: expected one of {AUTO}, {', '.join(DTYPE_NAMES)}")
        if self.quantization not in QUANTIZATIONS:
            out.append(f"quantization={self.quantization!r}: expected one of {', '.join(map(repr, QUANTIZATIONS))}")
        if not isinstance(self.trust_remote_code, bool):
            out.append(f"trust_remote_code={self.trust_remote_code!r}: expected True or False")
        return out

    def validate(self) -> None:
        """Raise `PlacementError` listing every problem at once."""
        problems = self.problems()
        if problems:
            raise PlacementError("invalid placement: " + "; ".join(problems))


def resolve_device(device: str):
    """"auto" -> cuda when available, else cpu; a cuda device where CUDA is missing is a `PlacementError`."""
    import torch

    resolved = torch.device("cuda" if torch.cuda.is_available() else "cpu") if device == AUTO else torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise PlacementError(f"device={device!r}: CUDA is not available here; use device='cpu'")
    return resolved


def resolve_dtype(dtype: str, device):
    """"auto" -> bfloat16 on a GPU that supports it, else float16 on a GPU, float32 elsewhere; names -> torch dtypes."""
    import torch

    if dtype == AUTO:
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return getattr(torch, dtype)


def _resolved(placement: Placement):
    """(torch device, torch dtype) of a placement, after checking it."""
    placement.validate()
    device = resolve_device(placement.device)
    return device, resolve_dtype(placement.dtype, device)


def place_model(model, placement: Placement = Placement()):
    """Move a loaded `AudioLLM` to the placement's device and cast its encoder and projector (and an
    unquantized LLM) to its dtype; returns the model in eval mode."""
    return _place(model, *_resolved(placement))


def _place(model, device, dtype):
    model.encoder.to(device=device, dtype=dtype)
    model.projector.to(device=device, dtype=dtype)
    if getattr(model.llm, "hf_quantizer", None) is None:  # bitsandbytes placed a quantized LLM itself
        model.llm.to(device=device, dtype=dtype)
    return model.eval()


def load_placed(directory: str | os.PathLike, placement: Placement = Placement(), revision: str | None = None):
    """Load a checkpoint (a folder or a Hub id `org/name[@revision]`) and place it; returns (model, processor).

    Raises:
        PlacementError: the placement is invalid, or names CUDA where there is none.
        CheckpointError: the directory is not a readable checkpoint.
    """
    from .checkpoint import load_pretrained

    device, dtype = _resolved(placement)
    model, processor = load_pretrained(directory, quantization=placement.quantization, dtype=dtype,
                                       trust_remote_code=placement.trust_remote_code, device=device,
                                       revision=revision)
    _place(model, device, dtype)
    quantization = placement.quantization or "none"
    logger.info("loaded %s on %s in %s (LLM quantization %s)", directory, device, dtype, quantization)
    return model, processor
