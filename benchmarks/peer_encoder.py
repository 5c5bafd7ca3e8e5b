"""Encoder section: real-audio seconds per second, eardrum's trimmed Whisper against the peer's 30 s tower.

Both encode a batch of equal clips from features already on the device (log-mel is computed
once, outside the timing, by each model's own feature pipeline). The peer's call is its audio
tower as `Qwen2AudioModel.forward` runs it: 3000 mel frames, the attention mask it builds from
`feature_attention_mask`, then average pooling and LayerNorm. eardrum's call is its
`SpeechEncoder`: the clips' own frames, padded frames masked.
"""

from __future__ import annotations

import torch

from .peer_checks import agreement
from .peer_models import Models, make_waves, peer_encode, peer_features, peer_token_lengths, zero_padded
from .peer_timing import alternate, median


def measure(models: Models, seconds: list[float], batch: int, warmup: int, repeats: int, seed: int) -> list[dict]:
    """One row per clip length: both models' median seconds per batch and audio seconds per second."""
    rows = []
    dev = models.device
    for clip in seconds:
        waves = make_waves(batch, clip, seed)
        feats, lens = models.processor.featurizer(waves)  # (B, C, T_mel), (B,)
        peer_feats, peer_mask = peer_features(models, waves)  # (B, C, 3000), (B, 3000)
        feats, lens, peer_feats, peer_mask = (t.to(dev) for t in (feats, lens, peer_feats, peer_mask))
        contenders = {
            "eardrum": lambda f=feats, n=lens: models.model.encoder(f, n),
            "peer": lambda f=peer_feats, m=peer_mask: peer_encode(models, f, m),
        }
        with torch.inference_mode():
            times = alternate(contenders, warmup, repeats, dev)
        row = {"clip_seconds": clip, "batch": batch}
        for name, record in times.items():
            med = median(record["seconds"])
            row[name] = {"median_s": med, "audio_seconds_per_s": batch * clip / med, "all_s": record["seconds"]}
        row["ratio"] = row["eardrum"]["audio_seconds_per_s"] / row["peer"]["audio_seconds_per_s"]
        rows.append(row)
    return rows


def _last_layer_states(models: Models, features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The peer tower's last-layer output before its pooling, (B, 1500, D_enc), through its final LayerNorm."""
    tower = models.peer.model.audio_tower
    seen: list[torch.Tensor] = []
    hook = tower.layers[-1].register_forward_hook(lambda m, i, o: seen.append(o[0] if isinstance(o, tuple) else o))
    try:
        peer_encode(models, features, mask)
    finally:
        hook.remove()
    return tower.layer_norm(seen[0])  # eardrum's "last" layer is the final norm applied per frame


def _valid_rows(x: torch.Tensor, lengths: list[int]) -> torch.Tensor:
    """(B, T, D) -> (sum of lengths, D): each clip's valid frames, in order."""
    return torch.cat([x[b, :n] for b, n in enumerate(lengths)])


def check(models: Models, bench_seconds: list[float], seed: int) -> dict:
    """Do both encoders compute the same frames, and give the benchmark's clips the same token counts?

    1. Same mel: eardrum's own-length log-mel, zero-padded to 3000 frames for the peer. On each
       clip's valid frames the last layer (with the final LayerNorm, before the peer's pooling)
       must agree. Clips of 10 s and 4.5 s (an odd 225 frames) share one eardrum batch, so its
       padding and masking are exercised.
    2. Own pipelines (informational): each model's own features. They differ by design at the
       clip's end: the peer's extractor pads the wave to 30 s before the STFT (eardrum's reflects
       at the clip end) and pads the mel with the log-mel floor value, not zeros; the conv
       receptive field reaches across the boundary and attention spreads it to every frame.
    3. Audio tokens per clip for the benchmark's clip lengths, by each model's own formula.
    """
    dev = models.device
    waves = make_waves(1, 10.0, seed) + make_waves(1, 4.5, seed + 1)
    feats, lens = models.processor.featurizer(waves)
    same_feats, same_mask = zero_padded(feats, lens)
    own_feats, own_mask = peer_features(models, waves)
    with torch.inference_mode():
        frames, frame_lengths = models.model.encoder(feats.to(dev), lens.to(dev))  # (B, T, D_enc)
        same = _last_layer_states(models, same_feats.to(dev), same_mask.to(dev))
        own = _last_layer_states(models, own_feats.to(dev), own_mask.to(dev))
    valid = [int(n) for n in frame_lengths]
    ours = _valid_rows(frames, valid)
    own_report = agreement(ours, _valid_rows(own, valid), models.dtype)
    own_report["passed"] = None  # not expected to agree; see the note
    tokens = token_counts(models, bench_seconds)
    return {
        "same_mel": {**agreement(ours, _valid_rows(same, valid), models.dtype), "valid_frames": valid},
        "own_features": {
            **own_report,
            "note": "each model's own log-mel; differs by design at the clip end (STFT padding, "
            "the peer's floor-valued mel padding inside the conv receptive field), spread by attention",
        },
        "audio_tokens": {"rows": tokens, "passed": all(r["eardrum"] == r["peer"] for r in tokens)},
        "compared": "last encoder layer + final LayerNorm on valid frames (the peer pools before its norm, eardrum's "
        "projector stacks after it, so outputs after those steps differ by design)",
    }


def token_counts(models: Models, seconds: list[float]) -> list[dict]:
    """Audio tokens per clip length: eardrum's `num_audio_tokens` and the peer's length formula.

    They agree whenever the clip has an even number of encoder frames; for an odd number eardrum's
    `stack` keeps the last frame (ceil(T / 2)) where the peer's pooling drops it (floor(T / 2)).
    """
    rows = []
    for clip in seconds:
        samples = int(round(clip * 16000))
        mel = torch.tensor([max(samples, 400) // 160])  # valid mel frames, as the peer's extractor masks them
        mask = (torch.arange(3000)[None, :] < mel[:, None]).long()  # (1, 3000)
        peer = int(peer_token_lengths(models, mask)[0])
        rows.append({"clip_seconds": clip, "eardrum": models.model.num_audio_tokens(samples), "peer": peer})
    return rows
