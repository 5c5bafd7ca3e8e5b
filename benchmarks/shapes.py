"""Random models with the demo's real shapes, for benchmarks (compute does not depend on the values).

Whisper-base encoder: d_model 512, 6 layers, 8 heads, ffn 2048, 80 mel bins.
SmolLM2-135M: Llama, hidden 576, 30 layers, 9 heads, 3 KV heads, intermediate 1536, vocab 49152.
"""

from __future__ import annotations

from pathlib import Path

import torch

SMOLLM2_135M = dict(
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    max_position_embeddings=8192,
    tie_word_embeddings=True,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)


def base_sized_whisper():
    """(WhisperForConditionalGeneration with Whisper-base's encoder shapes, its feature extractor)."""
    from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperForConditionalGeneration

    cfg = WhisperConfig(
        d_model=512,
        encoder_layers=6,
        decoder_layers=1,
        encoder_attention_heads=8,
        decoder_attention_heads=8,
        encoder_ffn_dim=2048,
        decoder_ffn_dim=2048,
        num_mel_bins=80,
    )
    return WhisperForConditionalGeneration(cfg).eval(), WhisperFeatureExtractor(feature_size=80)


def write_demo_bases(root: Path) -> dict[str, str]:
    """Random Whisper-base-shaped and SmolLM2-135M-shaped folders under `root` (reused if present)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from eardrum.adapters.tiny import build_tokenizer

    dirs = {"whisper": root / "whisper", "llama": root / "llama"}
    if not (dirs["llama"] / "config.json").is_file():
        torch.manual_seed(0)
        whisper, extractor = base_sized_whisper()
        whisper.save_pretrained(dirs["whisper"])
        extractor.save_pretrained(dirs["whisper"])
        LlamaForCausalLM(LlamaConfig(**SMOLLM2_135M)).save_pretrained(dirs["llama"])
        build_tokenizer("chatml").save_pretrained(dirs["llama"])
    return {k: str(v) for k, v in dirs.items()}
