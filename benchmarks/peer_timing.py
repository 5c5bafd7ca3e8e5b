"""Timing for the peer benchmark: alternate the contenders, warm up, take medians; device facts.

Every measurement runs the contenders in turn within one loop (A, B, A, B, ...) so that both see
the same machine state (clock boost, other jobs, cache warmth); medians resist the odd outlier.
On CUDA each timed call ends with a synchronize, so the time is the device's, not the launch's.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable

import torch
from transformers.generation.streamers import BaseStreamer

from eardrum.demo.run import cpu_name

# Dense bf16 tensor-core peak (FLOP/s) and memory bandwidth (bytes/s), by a substring of the device name.
DEVICE_PEAKS = (
    ("H200", 989e12, 4.8e12),
    ("H100 PCIe", 756e12, 2.0e12),
    ("H100", 989e12, 3.35e12),  # SXM
    ("A100", 312e12, 2.0e12),
)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def alternate(
    contenders: dict[str, Callable[[], object]], warmup: int, repeats: int, device: torch.device
) -> dict[str, dict[str, list]]:
    """Run the contenders in turn: `warmup` untimed rounds, then `repeats` timed rounds.

    Each call's wall time is recorded as "seconds" (the warm-up ones as "warmup_seconds", so a
    first call that compiles shows up). A contender that returns a dict has its entries recorded
    under their keys, one per timed call; any other return value is ignored.
    """
    out: dict[str, dict[str, list]] = {name: {"seconds": [], "warmup_seconds": []} for name in contenders}
    for round_ in range(warmup + repeats):
        for name, fn in contenders.items():
            sync(device)
            start = time.perf_counter()
            extra = fn()
            sync(device)
            elapsed = time.perf_counter() - start
            if round_ < warmup:
                out[name]["warmup_seconds"].append(elapsed)
                continue
            out[name]["seconds"].append(elapsed)
            for key, value in (extra if isinstance(extra, dict) else {}).items():
                out[name].setdefault(key, []).append(value)
    return out


def median(values: list[float]) -> float:
    return statistics.median(values)


def device_facts(device: torch.device) -> dict:
    """Name, bf16 peak FLOP/s and memory bandwidth (None where unknown, and always on CPU)."""
    if device.type != "cuda":
        return {"name": cpu_name(), "cpus": os.cpu_count(), "peak_flops": None, "bandwidth_bytes_s": None}
    name = torch.cuda.get_device_name(device)
    for key, flops, bandwidth in DEVICE_PEAKS:
        if key in name:
            return {"name": name, "peak_flops": flops, "bandwidth_bytes_s": bandwidth}
    return {"name": name, "peak_flops": None, "bandwidth_bytes_s": None}


class FirstTokenClock(BaseStreamer):
    """Notes when `generate` hands over its first new token (its first `put` is the prompt).

    Handing a token to a streamer copies it to the host, so the time is when the token exists.
    """

    def __init__(self) -> None:
        self.puts = 0
        self.first: float | None = None

    def put(self, value: torch.Tensor) -> None:
        self.puts += 1
        if self.puts == 2:
            self.first = time.perf_counter()

    def end(self) -> None:
        pass


class PeakMemory:
    """CUDA peak allocated bytes over a block, less the bytes that belong to the other model.

    Both models sit in memory at once, sharing their frozen weights; what the other model holds
    alone (its trainable weights and optimizer state, `others()` bytes at the end of the block)
    is subtracted, so the figure is the peak this model would reach alone on the device.
    On CPU nothing is measured: `peak` stays None.
    """

    def __init__(self, device: torch.device, others: Callable[[], int]) -> None:
        self.device, self.others = device, others
        self.peak: int | None = None

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            sync(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            sync(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self.others()
