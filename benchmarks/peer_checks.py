"""How the peer benchmark decides that two computations agree.

In float32 the two models must agree to rounding: the largest absolute difference is at most
1e-3 (values are LayerNorm outputs, logits or losses of order 1; observed differences are about
1e-6). In bfloat16 (8-bit mantissa) different but equivalent kernel orders differ visibly (about
1 % after 32 encoder layers at CPU sizes), so the test is relative: the mean absolute difference
is at most 5 % of the mean absolute value, far below what skipped or wrong work gives (order
100 %). On CUDA the float32 checks are also run at the small size (`fp32_checks`), with TF32
off. Every report carries the numbers, the rule and the verdict.
"""

from __future__ import annotations

import torch

FP32_MAX_ABS = 1e-3
BF16_RELATIVE_MEAN = 5e-2


def rule(dtype: torch.dtype) -> str:
    if dtype == torch.float32:
        return f"max |a - b| <= {FP32_MAX_ABS:g}"
    return f"mean |a - b| <= {BF16_RELATIVE_MEAN:g} * mean |b|"


def agreement(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> dict:
    """Differences of two same-shaped tensors (compared in float32) and whether they pass for `dtype`."""
    if actual.shape != expected.shape:
        raise ValueError(f"cannot compare shapes {tuple(actual.shape)} and {tuple(expected.shape)}")
    a, b = actual.detach().float().cpu(), expected.detach().float().cpu()
    finite = torch.isfinite(a) & torch.isfinite(b)  # -inf logits (tokens forbidden by min_new_tokens) on both
    if not torch.equal(torch.isfinite(a), torch.isfinite(b)):
        return {"max_abs_diff": float("inf"), "passed": False, "rule": "non-finite values at different positions"}
    diff = (a[finite] - b[finite]).abs()
    scale = b[finite].abs().mean().item()
    out = {
        "max_abs_diff": diff.max().item() if diff.numel() else 0.0,
        "mean_abs_diff": diff.mean().item() if diff.numel() else 0.0,
        "mean_abs_value": scale,
        "rule": rule(dtype),
    }
    if dtype == torch.float32:
        out["passed"] = out["max_abs_diff"] <= FP32_MAX_ABS
    else:
        out["passed"] = out["mean_abs_diff"] <= BF16_RELATIVE_MEAN * max(scale, 1e-12)
    return out
