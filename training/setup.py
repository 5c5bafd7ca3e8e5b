"""Builders the training recipe uses: optimizer and schedule, feature cache, lengths, metrics log."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from pathlib import Path

import torch

from eardrum.adapters.model import AudioLLM
from eardrum.adapters.processor import AudioProcessor
from eardrum.adapters.sources import default_cache_dir
from eardrum.adapters.transcribe import WhisperTranscriber
from eardrum.common.records import Record

from .recipe import Recipe
from .trackers import Trackers


def build_optimizer(model: AudioLLM, recipe: Recipe) -> tuple[torch.optim.Optimizer, Callable[[int], float]]:
    """AdamW over the trainable parameters, and lr(step) for warmup then cosine / linear / constant."""
    o, t = recipe.optim, recipe.train
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("nothing to train: every parameter is frozen")
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]  # norms, biases, layer weights
    groups = [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=o.lr, betas=tuple(o.betas))
    horizon = max(1, t.max_steps or 0)

    def lr_at(step: int) -> float:
        if step < o.warmup_steps:
            return o.lr * (step + 1) / o.warmup_steps
        if o.scheduler == "constant":
            return o.lr
        span = max(1, lr_at.total - o.warmup_steps)
        frac = min(1.0, (step - o.warmup_steps) / span)
        shape = 0.5 * (1 + math.cos(math.pi * frac)) if o.scheduler == "cosine" else 1 - frac
        return o.lr * (o.min_lr_ratio + (1 - o.min_lr_ratio) * shape)

    lr_at.total = horizon
    return optimizer, lr_at


def resolve_precision(name: str) -> str:
    """The mixed precision a run uses: "auto" -> "bf16" where bfloat16 matmuls are fast, else "no".

    Fast means a CUDA GPU that supports bfloat16, or (without a GPU) a CPU with AMX or AVX-512 BF16
    instructions, where bfloat16 autocast runs a step about 1.6x faster than float32 (Xeon with AMX,
    2 cores, SmolLM2-135M). Other names ("no", "bf16", "fp16") are returned unchanged.
    """
    if name != "auto":
        return name
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "no"
    probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")  # torch.cpu's own CPU feature checks
    fast = any(getattr(torch.cpu, probe, lambda: False)() for probe in probes)
    return "bf16" if fast else "no"


def set_schedule_length(lr_at: Callable[[int], float], total_steps: int) -> None:
    """The schedule decays over the run's real number of steps, known once the data is planned."""
    lr_at.total = total_steps


def cache_root(recipe: Recipe) -> str:
    """The folder of the feature cache: `cache.dir`, default `<default_cache_dir()>/features`."""
    return recipe.cache.dir or str(default_cache_dir() / "features")


def prepare_transcriber(transcriber: WhisperTranscriber | None, features_root: str | Path | None,
                        mixed_precision: str) -> None:
    """Set up a hinted model's transcriber (`model.transcriber`; nothing for None): it reads and extends the
    transcripts kept in `features_root/transcripts` (None: memory only), and decodes under bf16 autocast where
    `mixed_precision` resolves to bf16 (1.3x faster on 2 AVX-512 BF16 cores, the same words)."""
    if transcriber is None:
        return
    if features_root is not None:
        transcriber.attach_cache(Path(features_root) / "transcripts")
    if resolve_precision(mixed_precision) == "bf16":
        transcriber.autocast = torch.bfloat16


def make_cache(recipe: Recipe, model: AudioLLM):
    """The feature cache for this encoder, or None (with the reason logged) where it cannot apply."""
    from .cache import FeatureCache, encoder_fingerprint

    if recipe.model.encoder_layer == "weighted" or recipe.lora.encoder:
        logging.getLogger(__name__).info("feature cache off: the encoder output trains (weighted layers or LoRA)")
        return None
    root = cache_root(recipe)
    dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[recipe.cache.dtype]
    return FeatureCache(root, encoder_fingerprint(model), dtype=dtype)


def sequence_lengths(records: list[Record], processor: AudioProcessor) -> list[int]:
    """Approximate tokens per example (text tokens + audio tokens), for grouping batches by length."""
    texts = []
    for r in records:
        f = r.fields
        parts = [str(f.get(k, "")) for k in ("text", "question", "answer")]
        for m in f.get("messages") or []:
            c = m.get("content")
            parts += [c] if isinstance(c, str) else [p.get("text", "") for p in c if isinstance(p, dict)]
        texts.append(" ".join(parts))
    text_tokens = processor.tokenizer(texts, add_special_tokens=False)["input_ids"]
    return [
        len(t) + 16 + sum(processor.clip_num_tokens(n) for n in r.clip_samples) for t, r in zip(text_tokens, records)
    ]


def trim_jsonl(path: Path, keep_until: int | None) -> None:
    """A fresh run starts the log anew; a resumed one drops what was logged after its checkpoint's step."""
    if not path.is_file():
        return
    if keep_until is None:
        path.unlink()
        return
    from .plots import read_metrics

    kept = [r for r in read_metrics(path) if r.get("step", 0) <= keep_until]
    path.write_text("".join(json.dumps(r) + "\n" for r in kept))


class MetricsLog:
    """metrics.jsonl, written by the main process, and each record to the run's trackers (`train.report_to`);
    `plot()` draws loss.png."""

    def __init__(self, out: Path, main: bool, trackers: Trackers | None = None, keep_until: int | None = None) -> None:
        self.path = out / "metrics.jsonl"
        self.main = main
        self.trackers = trackers
        if main:
            trim_jsonl(self.path, keep_until)

    def write(self, record: dict) -> None:
        if not self.main:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.trackers is not None:
            self.trackers.log(record)

    def plot(self) -> None:
        """Redraw loss.png; a plot problem is logged, never allowed to stop training."""
        if not (self.main and self.path.is_file()):
            return
        from .plots import plot_losses, read_metrics

        records = read_metrics(self.path)
        if any("loss" in r or "eval_loss" in r for r in records):
            try:
                plot_losses(records, self.path.parent / "loss.png")
            except (ValueError, OSError) as err:
                logging.getLogger(__name__).warning("could not draw loss.png: %s", err)

    def close(self) -> None:
        if self.trackers is not None:
            self.trackers.end()
