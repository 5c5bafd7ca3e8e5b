"""What a checkpoint directory holds, read from its files without loading any model."""

from __future__ import annotations

import json
import math
from pathlib import Path

from .audio import SAMPLING_RATE
from .checkpoint import (
    ADAPTER_DIR,
    CONFIG_NAME,
    WEIGHTS_NAME,
    CheckpointError,
    check_adapter_dir,
    checkpoint_folder,
    read_checkpoint_meta,
    safetensors_shapes,
    stored_config,
)
from .encoders import WHISPER_HOP, FrameSpec
from .projectors import tokens_per_second
from .sources import SourceError, describe_source


def frames_per_second(spec: FrameSpec) -> float:
    """Encoder frames per second of audio (50 for Whisper and wav2vec2)."""
    samples = (WHISPER_HOP if spec.kind == "whisper" else 1) * math.prod(s for _, s, _ in spec.convs)
    return SAMPLING_RATE / samples


def _kind(source: str) -> str:
    try:
        return describe_source(source)
    except SourceError:
        return "missing"


def describe_checkpoint(directory: str | Path) -> dict:
    """A summary of a checkpoint: sources, projector, token rate, trained parameters, adapter, versions.

    Raises:
        CheckpointError: a file of the checkpoint is missing, corrupt or pickled; the message names it.
    """
    directory = checkpoint_folder(directory)
    meta = read_checkpoint_meta(directory)
    config = stored_config(meta, directory / CONFIG_NAME)
    try:
        spec = FrameSpec.from_dict(meta["frame_spec"])
    except (TypeError, ValueError, KeyError) as err:
        raise CheckpointError(f"{directory / CONFIG_NAME}: malformed \"frame_spec\" ({err})") from err
    shapes = safetensors_shapes(directory / WEIGHTS_NAME)
    if meta.get("has_lora"):
        check_adapter_dir(directory / ADAPTER_DIR)
    summary = {
        "checkpoint": str(directory),
        "encoder": {
            "source": config.encoder,
            "kind": _kind(config.encoder),
            "type": spec.kind,
            "layers": spec.num_layers,
            "width": spec.hidden_size,
            "layer": config.encoder_layer,
            "pad_to_30s": config.pad_to_30s,
        },
        "llm": {"source": config.llm, "kind": _kind(config.llm), "hidden_size": meta["llm_hidden_size"]},
        "projector": {
            **config.projector.to_dict(),
            "parameters": sum(math.prod(s) for k, s in shapes.items() if k.startswith("projector.")),
        },
        "audio_tokens_per_second": tokens_per_second(config.projector, frames_per_second(spec)),
        "placeholder": {"token": config.placeholder, "id": meta["placeholder_id"]},
        "windows": {
            "seconds": config.window_seconds or (spec.max_samples or 0) / SAMPLING_RATE or None,
            "overlap_seconds": config.window_overlap_seconds,
            "time_markers": config.time_markers,
        },
        "label_mode": config.label_mode,
        "lora": None,
        "versions": meta.get("versions", {}),
        "files": {
            p.relative_to(directory).as_posix(): p.stat().st_size for p in sorted(directory.rglob("*")) if p.is_file()
        },
    }
    adapter_cfg = directory / ADAPTER_DIR / "adapter_config.json"
    if adapter_cfg.is_file():
        lora = json.loads(adapter_cfg.read_text())
        summary["lora"] = {k: lora.get(k) for k in ("r", "lora_alpha", "lora_dropout", "target_modules")}
        if isinstance(lora.get("target_modules"), list):  # peft stores a set in arbitrary order
            summary["lora"]["target_modules"] = sorted(lora["target_modules"])
    return summary


def format_summary(summary: dict) -> str:
    """Human-readable lines for `eardrum info`."""
    enc, llm, proj = summary["encoder"], summary["llm"], summary["projector"]
    lines = [
        f"checkpoint  {summary['checkpoint']}",
        f"encoder     {enc['source']} ({enc['kind']}, {enc['type']}, {enc['layers']} layers, width {enc['width']}, "
        f"layer {enc['layer']}{', padded to 30 s' if enc['pad_to_30s'] else ''}) [frozen, not stored]",
        f"llm         {llm['source']} ({llm['kind']}, hidden {llm['hidden_size']}) [frozen base, not stored]",
        f"projector   {proj['name']}: {proj['parameters']:,} trained parameters",
        f"audio rate  {summary['audio_tokens_per_second']:g} tokens per second of audio",
        f"placeholder {summary['placeholder']['token']!r} (id {summary['placeholder']['id']})",
        f"windows     {summary['windows']['seconds']:g} s, overlap {summary['windows']['overlap_seconds']:g} s, "
        f"time markers {'on' if summary['windows']['time_markers'] else 'off'}",
        f"labels      {summary['label_mode']}",
    ]
    lora = summary["lora"]
    lines.append(
        f"lora        r={lora['r']} alpha={lora['lora_alpha']} targets={lora['target_modules']}"
        if lora
        else "lora        none"
    )
    lines.append("versions    " + ", ".join(f"{k} {v}" for k, v in summary["versions"].items()))
    lines.append("files")
    lines += [f"  {size:>12,}  {name}" for name, size in summary["files"].items()]
    return "\n".join(lines)
