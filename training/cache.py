"""An on-disk cache of frozen-encoder outputs, keyed by audio window content and encoder fingerprint.

Symbols: N_win windows, T frames of one window, T_max frames of the longest window, D_enc encoder width.

The encoder is frozen, so the frames it gives an audio window never change: they are computed once,
stored as safetensors shards under `root/<fingerprint>/`, and read back every epoch and in later runs.
Every writer (each DDP rank, say) writes its own uniquely named shards atomically and readers scan
the folder, so there is no shared index file for concurrent writers to clobber.

Frames are stored in float32 by default, so cached frames are bit-identical to the encoder's own
output (encoding the same windows in one batch on the fly gives the very same logits; other batch
compositions differ by float32 rounding, as CPU kernels round differently per padded length).
float16 / bfloat16 halve the disk and the reads but round the frames, so results change slightly.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import uuid
from collections import OrderedDict
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from eardrum.adapters.audio import window_key
from eardrum.adapters.encoders import AudioFeaturizer
from eardrum.adapters.model import AudioLLM

logger = logging.getLogger(__name__)

CACHE_FORMAT = "eardrum-feature-cache/1"  # bump when the stored layout or the meaning of frames changes
STORABLE = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
OPEN_SHARDS = 16  # shard handles kept open at once (each is a memory map, not a copy)
SORT_CHUNK = 8  # precompute sorts this many batches' worth of windows by length before encoding


def encoder_fingerprint(model: AudioLLM, featurizer: AudioFeaturizer | None = None) -> str:
    """sha256 (hex) of everything that decides the encoder's frames for a window.

    Covers the encoder source string, the chosen layer, `pad_to_30s`, the `FrameSpec`, the encoder's
    dtype and the content of every encoder parameter and buffer; with `featurizer`, its extractor
    settings too. Raises ValueError when the encoder output trains (a weighted layer sum, or an
    encoder with trainable parameters such as an encoder LoRA), since such frames cannot be cached.
    """
    encoder = model.encoder
    off = "or turn the feature cache off (pass cache=None to encode_windows, or do not build a FeatureCache)"
    if encoder.select.layer == "weighted":
        raise ValueError(
            "encoder_layer='weighted' learns its layer weights during training, so the encoder output changes "
            f"every step and cannot be cached; choose a fixed layer ('last' or an index) {off}"
        )
    trainable = [name for name, p in encoder.named_parameters() if p.requires_grad]
    if trainable:
        raise ValueError(
            f"the encoder has {len(trainable)} trainable parameters (first: {trainable[0]}), so its output "
            f"changes during training and cannot be cached; freeze them {off}"
        )
    settings = {
        "format": CACHE_FORMAT,
        "source": model.config.encoder,
        "layer": encoder.select.deepest_needed,  # "last" and its index give the same frames: one cache
        "pad_to_30s": encoder.pad_to_30s,
        "frame_spec": encoder.spec.to_dict(),
        "dtype": str(next(encoder.network.parameters()).dtype),
    }
    if featurizer is not None:
        settings["features"] = [featurizer.feature_extractor.to_dict(), featurizer.pad_to_30s]
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
    tensors = dict(encoder.named_parameters())
    tensors.update(encoder.named_buffers())
    for name in sorted(tensors):
        t = tensors[name].detach()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        # A byte view, not a copy on CPU: hashing ~80 MB of Whisper-base takes tens of milliseconds.
        digest.update(t.contiguous().cpu().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


class FeatureCache:
    """Encoder frames (T, D_enc) by window key, in safetensors shards under `root/<fingerprint>/`.

    Args:
        root: folder holding one sub-folder per encoder fingerprint.
        fingerprint: `encoder_fingerprint(model)`; frames of different encoders never mix.
        dtype: storage and return dtype: float32 (exact), float16 or bfloat16 (half the disk, rounded).
        shard_entries: pending windows that trigger writing a shard.
        max_shard_bytes: pending bytes that trigger writing a shard, so long windows of wide
            encoders do not pile up gigabytes in memory before `shard_entries` is reached.

    Shards written by other processes after this object was made become visible on `refresh()`.
    """

    def __init__(
        self,
        root: str | Path,
        fingerprint: str,
        dtype: torch.dtype = torch.float32,
        shard_entries: int = 512,
        max_shard_bytes: int = 1 << 30,
    ) -> None:
        if dtype not in STORABLE:
            raise ValueError(f"FeatureCache dtype must be one of {list(STORABLE.values())}, got {dtype}")
        if shard_entries < 1 or max_shard_bytes < 1:
            raise ValueError(f"shard_entries and max_shard_bytes must be >= 1, got {shard_entries}, {max_shard_bytes}")
        self.dtype, self.shard_entries, self.max_shard_bytes = dtype, shard_entries, max_shard_bytes
        self._dir = Path(root) / fingerprint
        self._dir.mkdir(parents=True, exist_ok=True)
        self._index: dict[str, Path] = {}  # key -> shard holding it
        self._scanned: set[Path] = set()
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._handles: OrderedDict[Path, object] = OrderedDict()
        self.refresh()

    @property
    def directory(self) -> Path:
        """The folder of this fingerprint's shards."""
        return self._dir

    def __contains__(self, key: str) -> bool:
        return key in self._pending or key in self._index

    def __len__(self) -> int:
        return len(self._index) + len(self._pending)

    def refresh(self) -> int:
        """Index shards not seen yet (e.g. just written by other ranks); returns how many usable ones were added."""
        added = 0
        for path in sorted(self._dir.glob("shard-*.safetensors")):
            if path in self._scanned:
                continue
            self._scanned.add(path)  # a skipped shard is not looked at (or warned about) again
            keys = self._shard_keys(path)
            if keys is not None:
                self._index.update(dict.fromkeys((k for k in keys if k not in self._index), path))
                added += 1
        return added

    def _shard_keys(self, path: Path) -> list[str] | None:
        """The keys of a readable shard this cache may use, else None (with a warning if it is damaged)."""
        try:
            with safe_open(str(path), "pt") as f:  # reads the header only; also detects truncation
                meta = f.metadata() or {}
                keys = list(f.keys())
            listed = json.loads(meta.get("keys", "null"))
        except Exception as err:  # a killed writer or a foreign file must not stop a training run
            logger.warning("skipping unreadable feature-cache shard %s: %s", path, err)
            return None
        if meta.get("format") != CACHE_FORMAT or listed is None or sorted(listed) != sorted(keys):
            logger.warning("skipping feature-cache shard %s: not an eardrum cache shard or damaged keys", path)
            return None
        # float32 frames convert exactly to any storage dtype; rounded ones would not be exact in float32.
        if meta.get("dtype") not in ("float32", STORABLE[self.dtype]):
            logger.info("not using feature-cache shard %s: stored in %s", path, meta.get("dtype"))
            return None
        return keys

    def get(self, key: str) -> torch.Tensor | None:
        """Frames (T, D_enc) in `self.dtype` for a window key, or None if not cached."""
        frames = self._pending.get(key)
        if frames is not None:
            return frames.clone()
        path = self._index.get(key)
        if path is None:
            return None
        try:
            frames = self._open(path).get_tensor(key)
        except Exception as err:  # deleted or damaged after the scan: treat its windows as not cached
            logger.warning("dropping feature-cache shard %s after a failed read: %s", path, err)
            self._handles.pop(path, None)
            self._index = {k: p for k, p in self._index.items() if p != path}
            return None
        return frames.to(self.dtype)

    def put(self, key: str, frames: torch.Tensor) -> None:
        """Queue frames (T, D_enc) for a window key; a shard is written once enough are pending."""
        if frames.dim() != 2:
            raise ValueError(f"FeatureCache.put expects frames of shape (T, D_enc), got {tuple(frames.shape)}")
        if key in self:
            return  # same key means same window and same encoder, hence the same frames
        # A copy, so a slice of a batch does not keep the whole batch (or GPU memory) alive.
        stored = frames.detach().to(device="cpu", dtype=self.dtype, copy=True).contiguous()
        self._pending[key] = stored
        self._pending_bytes += stored.numel() * stored.element_size()
        if len(self._pending) >= self.shard_entries or self._pending_bytes >= self.max_shard_bytes:
            self.flush()

    def flush(self) -> None:
        """Write the pending frames as one new shard (atomically: temp file, then rename)."""
        if not self._pending:
            return
        name = f"shard-{uuid.uuid4().hex}.safetensors"
        path, tmp = self._dir / name, self._dir / f".tmp-{name}"  # same folder, so os.replace is atomic
        meta = {"format": CACHE_FORMAT, "dtype": STORABLE[self.dtype], "keys": json.dumps(sorted(self._pending))}
        try:
            save_file(self._pending, str(tmp), metadata=meta)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        self._scanned.add(path)
        for key in self._pending:
            self._index[key] = path
        self._pending, self._pending_bytes = {}, 0

    def _open(self, path: Path):
        # A small LRU of handles: reads stay lazy (memory maps) without exhausting file handles.
        handle = self._handles.pop(path, None)
        if handle is None:
            handle = safe_open(str(path), "pt")
            if len(self._handles) >= OPEN_SHARDS:
                self._handles.popitem(last=False)
        self._handles[path] = handle
        return handle


def _encode_missing(
    model: AudioLLM, featurizer: AudioFeaturizer, todo: dict[str, np.ndarray], cache: FeatureCache | None, batch: int
) -> dict[str, torch.Tensor]:
    """Encode windows by key in batches of similar length (under no_grad); valid frames (T, D_enc) on CPU by key."""
    encoder, keys = model.encoder, sorted(todo, key=lambda k: len(todo[k]), reverse=True)  # less padding per batch
    device = next(encoder.network.parameters()).device
    out, was_training = {}, encoder.training
    encoder.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(keys), batch):
                chunk = keys[start : start + batch]
                features, lengths = featurizer([todo[k] for k in chunk])
                frames, frame_lengths = encoder(features.to(device), lengths.to(device))  # (B, T, D_enc), (B,)
                for row, key in enumerate(chunk):
                    out[key] = frames[row, : int(frame_lengths[row])].cpu()  # (T_i, D_enc)
                    if cache is not None:
                        cache.put(key, out[key])
                        out[key] = out[key].to(cache.dtype)  # what later reads will return
    finally:
        encoder.train(was_training)
    return out


def encode_windows(
    model: AudioLLM,
    featurizer: AudioFeaturizer,
    windows: list[np.ndarray],
    cache: FeatureCache | None,
    batch_size: int = 16,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Encoder frames for audio windows (e.g. a batch's `audio_windows`), read from `cache` where possible.

    Windows not in the cache are encoded once each and stored. With a cache, frames come back in the
    cache's dtype whether computed or read, so every epoch sees the same values.

    Returns:
        frames: (N_win, T_max, D_enc) on CPU, zero past each window's frames, in the order of `windows`.
        frame_lengths: (N_win,) valid frames per window.
    """
    if not windows or batch_size < 1:
        raise ValueError(f"encode_windows needs windows and batch_size >= 1, got {len(windows)}, {batch_size}")
    # Without a cache, positions stand in for keys: nothing is shared and everything is encoded.
    keys = [window_key(w) for w in windows] if cache is not None else [str(i) for i in range(len(windows))]
    found = {k: cache.get(k) for k in keys} if cache is not None else {}
    todo = {k: w for k, w in zip(keys, windows) if found.get(k) is None}  # each missing window once
    found.update(_encode_missing(model, featurizer, todo, cache, batch_size))
    rows = [found[k] for k in keys]
    lengths = torch.tensor([r.shape[0] for r in rows], dtype=torch.long)
    frames = rows[0].new_zeros(len(rows), int(lengths.max()), rows[0].shape[1])  # (N_win, T_max, D_enc)
    for i, r in enumerate(rows):
        frames[i, : r.shape[0]] = r
    return frames, lengths


def precompute(
    model: AudioLLM,
    featurizer: AudioFeaturizer,
    windows_iter: Iterable[np.ndarray],
    cache: FeatureCache,
    batch_size: int = 16,
    progress: bool = True,
) -> dict:
    """Encode every window not yet in `cache` (each distinct window once) and flush the cache.

    Returns:
        {"windows": windows seen, "computed": windows encoded now, "cached": windows found in the
        cache or seen earlier in this pass, "seconds": wall time}.
    """
    start, seen, computed = time.perf_counter(), 0, 0
    todo: dict[str, np.ndarray] = {}
    total = len(windows_iter) if hasattr(windows_iter, "__len__") else None
    with tqdm(total=total, unit="window", desc="encoding audio windows", disable=not progress) as bar:
        for wave in windows_iter:
            seen += 1
            key = window_key(wave)
            if key in cache or key in todo:
                bar.update(1)
                continue
            todo[key] = wave
            computed += 1
            if len(todo) >= batch_size * SORT_CHUNK:
                _encode_missing(model, featurizer, todo, cache, batch_size)
                bar.update(len(todo))  # misses advance the bar once they are really encoded
                todo.clear()
        _encode_missing(model, featurizer, todo, cache, batch_size)
        bar.update(len(todo))
    cache.flush()
    logger.info("feature cache %s: %d windows, %d encoded now", cache.directory, seen, computed)
    return {"windows": seen, "computed": computed, "cached": seen - computed, "seconds": time.perf_counter() - start}
