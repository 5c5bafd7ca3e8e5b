"""The two models of the peer benchmark, built with matched shapes and one set of frozen weights.

Symbols: B batch, C mel bins, T_mel mel frames (3000 = 30 s for the peer), T encoder frames
(1500 for the peer), N audio tokens per clip, D_enc encoder width, D_llm LLM width.

The peer is transformers' `Qwen2AudioForConditionalGeneration`: a Whisper-shaped encoder that
always encodes 30 s, average pooling by 2, LayerNorm, one Linear, then a Qwen2 LLM. eardrum's
`AudioLLM` gets a Whisper encoder of the same geometry, the same Qwen2 LLM and the `stack`
projector with k = 2, which gives the peer's 25 audio tokens per second. The frozen encoder and
LLM weights are shared tensors (the peer's, viewed by eardrum's modules), so both models compute
with identical weights and the GPU holds one copy of them; only the projectors (and later the
LoRA adapters and optimizer states) are each model's own.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn
from transformers import (
    Qwen2AudioConfig,
    Qwen2AudioEncoderConfig,
    Qwen2AudioForConditionalGeneration,
    Qwen2Config,
    Qwen2ForCausalLM,
    WhisperConfig,
    WhisperFeatureExtractor,
)
from transformers.models.whisper.modeling_whisper import WhisperEncoder

from eardrum.adapters.config import AudioLLMConfig
from eardrum.adapters.encoders import AudioFeaturizer, build_speech_encoder
from eardrum.adapters.model import AudioLLM
from eardrum.adapters.processor import AudioProcessor
from eardrum.adapters.projectors import ProjectorConfig, build_projector
from eardrum.adapters.tiny import build_tokenizer

RATE = 16_000
PEER_MEL_FRAMES = 3000  # the peer's encoder accepts exactly 30 s of log-mel
QUESTION = "What is said in this recording?"


@dataclass(frozen=True)
class PeerSize:
    """Shapes shared by both models: a Whisper-style encoder and a Qwen2 LLM."""

    mel_bins: int
    enc_width: int  # D_enc (Whisper d_model)
    enc_layers: int
    enc_heads: int
    enc_ffn: int
    llm_hidden: int  # D_llm
    llm_layers: int
    llm_heads: int
    llm_kv_heads: int
    llm_ffn: int
    vocab: int  # must exceed the benchmark tokenizer's ids (< 400)
    note: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


SIZES = {
    "tiny": PeerSize(80, 64, 2, 2, 256, 64, 2, 4, 2, 128, 512, "test size: runs in seconds"),
    "small": PeerSize(80, 384, 4, 6, 1536, 256, 4, 4, 2, 1024, 8192, "Whisper-tiny encoder, a 4-layer Qwen2"),
    "7b": PeerSize(
        128, 1280, 32, 20, 5120, 3584, 28, 28, 4, 18944, 156032, "Whisper-large-v3 encoder + Qwen2-7B (Qwen2-Audio-7B)"
    ),
}


@dataclass
class Models:
    """Everything the benchmark sections need, built by `build_models`."""

    peer: Qwen2AudioForConditionalGeneration
    model: AudioLLM  # eardrum
    processor: AudioProcessor
    peer_extractor: WhisperFeatureExtractor  # the peer's own feature pipeline (pads to 30 s)
    size: PeerSize
    device: torch.device
    dtype: torch.dtype


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Build modules directly in `dtype` (never a float32 copy first)."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


def share_tensors(target: nn.Module, source: nn.Module) -> None:
    """Make every parameter and buffer of `target` the tensor of the same name in `source` (no copy).

    Parameters become new frozen `nn.Parameter`s over the source's storage, so each model keeps its
    own `requires_grad` flags while the weights exist once. Non-persistent buffers (rotary
    frequencies) are shared too, which `load_state_dict(assign=True)` would leave on `meta`.
    """
    tensors = dict(source.named_parameters())
    tensors.update(source.named_buffers())
    names = [n for n, _ in target.named_parameters()] + [n for n, _ in target.named_buffers()]
    missing = sorted(set(names) - set(tensors))
    if missing:
        raise ValueError(f"{type(source).__name__} has no tensors named {missing[:5]} (of {len(missing)})")
    for name in names:
        owner, _, leaf = name.rpartition(".")
        module = target.get_submodule(owner)
        if tensors[name].shape != getattr(module, leaf).shape:
            raise ValueError(f"{name}: shape {tuple(tensors[name].shape)} != {tuple(getattr(module, leaf).shape)}")
        if leaf in module._parameters:
            module._parameters[leaf] = nn.Parameter(tensors[name].detach(), requires_grad=False)
        else:
            module._buffers[leaf] = tensors[name]


def _encoder_kwargs(size: PeerSize) -> dict:
    return dict(
        num_mel_bins=size.mel_bins,
        d_model=size.enc_width,
        encoder_layers=size.enc_layers,
        encoder_attention_heads=size.enc_heads,
        encoder_ffn_dim=size.enc_ffn,
        max_source_positions=PEER_MEL_FRAMES // 2,
    )


def text_config(size: PeerSize, tokenizer) -> Qwen2Config:
    return Qwen2Config(
        vocab_size=size.vocab,
        hidden_size=size.llm_hidden,
        intermediate_size=size.llm_ffn,
        num_hidden_layers=size.llm_layers,
        num_attention_heads=size.llm_heads,
        num_key_value_heads=size.llm_kv_heads,
        max_position_embeddings=8192,
        tie_word_embeddings=False,  # as Qwen2-7B: the LM head is its own matrix
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
    )


def build_models(size: PeerSize, device: torch.device, dtype: torch.dtype, seed: int = 0) -> Models:
    """The peer with random weights on `device` in `dtype`, and eardrum's model sharing its frozen weights."""
    tokenizer = build_tokenizer("chatml")  # ids < 400 fit every size; a tokenizer does not change the compute
    config = AudioLLMConfig(
        encoder="peer-bench:whisper (shares the peer's audio tower)",
        llm="peer-bench:qwen2 (shares the peer's language model)",
        projector=ProjectorConfig(name="stack", stack_factor=2),  # 50 frames/s -> 25 tokens/s, as the peer
    )
    whisper_config = WhisperConfig(**_encoder_kwargs(size))
    qwen2_config = text_config(size, tokenizer)
    with torch.device("meta"):  # eardrum's frozen modules: shapes only, their tensors come from the peer
        encoder_network = WhisperEncoder(whisper_config)
        llm = Qwen2ForCausalLM(qwen2_config)
    encoder = build_speech_encoder(encoder_network)
    extractor = WhisperFeatureExtractor(feature_size=size.mel_bins)
    processor = AudioProcessor(tokenizer, AudioFeaturizer(extractor, encoder.spec), config)
    peer_config = Qwen2AudioConfig(
        audio_config=Qwen2AudioEncoderConfig(**_encoder_kwargs(size)),
        text_config=qwen2_config,
        audio_token_index=processor.placeholder_id,  # the same input_ids serve both models
    )
    torch.manual_seed(seed)
    with torch.device(device), default_dtype(dtype):
        peer = Qwen2AudioForConditionalGeneration(peer_config).eval()
        projector = build_projector(config.projector, size.enc_width, size.llm_hidden)
    for p in peer.parameters():
        p.requires_grad_(False)
    share_tensors(encoder_network, peer.model.audio_tower)
    share_tensors(llm.model, peer.model.language_model)
    share_tensors(llm.lm_head, peer.lm_head)
    for cfg in (peer.generation_config, llm.generation_config):
        cfg.eos_token_id, cfg.pad_token_id = tokenizer.eos_token_id, tokenizer.pad_token_id
    model = AudioLLM(config, encoder, projector, llm, processor.placeholder_id).eval()
    left_on_meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left_on_meta and torch.device(device).type != "meta":
        raise RuntimeError(f"eardrum tensors not shared from the peer (still on meta): {left_on_meta[:5]}")
    peer_extractor = WhisperFeatureExtractor(feature_size=size.mel_bins, return_attention_mask=True)
    return Models(peer, model, processor, peer_extractor, size, torch.device(device), dtype)


def build_check_model(models: Models) -> AudioLLM:
    """eardrum's `AudioLLM` with a `linear` projector holding the peer's projector weights.

    Fed the peer's pooled encoder states as `audio_frames`, it must compute exactly what the peer
    computes: it checks eardrum's merge, labels, loss and generation against the peer's.
    """
    config = AudioLLMConfig(
        encoder=models.model.config.encoder, llm=models.model.config.llm, projector=ProjectorConfig(name="linear")
    )
    size = models.size
    with torch.device("meta"):
        projector = build_projector(config.projector, size.enc_width, size.llm_hidden)
    share_tensors(projector.proj, models.peer.model.multi_modal_projector.linear)
    return AudioLLM(config, models.model.encoder, projector, models.model.llm, models.model.placeholder_id).eval()


# ---------------------------------------------------------------- inputs
def make_waves(count: int, seconds: float, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [(0.1 * rng.standard_normal(int(seconds * RATE))).astype(np.float32) for _ in range(count)]


def conversation(wave: np.ndarray, answer: str | None = None) -> list[dict]:
    parts = [{"type": "audio", "audio": (wave, RATE)}, {"type": "text", "text": QUESTION}]
    messages = [{"role": "user", "content": parts}]
    return messages + ([{"role": "assistant", "content": answer}] if answer is not None else [])


def answer_text(processor: AudioProcessor, labelled: int) -> str:
    """An answer whose assistant turn carries exactly `labelled` loss tokens (the words + end of turn).

    The byte-level pre-tokenizer splits at spaces, so words that are one token each add up exactly.
    """
    tok = processor.tokenizer
    words = [w for w in "the quick brown fox jumps over lazy dog cat cow".split() if len(tok.encode(" " + w)) == 1]
    text = " ".join(words[i % len(words)] for i in range(labelled - 1))
    batch = processor([conversation(np.zeros(RATE, dtype=np.float32), text)], featurize=False)
    found = int((batch["labels"] != -100).sum())
    if found != labelled:
        raise RuntimeError(f"answer_text built {found} labelled tokens, wanted {labelled}")
    return text


def peer_features(models: Models, waves: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """The peer's own inputs: log-mel of each clip zero-padded to 30 s, (B, C, 3000), and its mask (B, 3000)."""
    out = models.peer_extractor(
        waves, sampling_rate=RATE, padding="max_length", return_attention_mask=True, return_tensors="pt"
    )
    return out["input_features"], out["attention_mask"]


def zero_padded(features: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """eardrum's own-length log-mel (B, C, T_mel) as peer input: zeros up to 3000 frames, and the mask.

    Used by the checks: with exactly the same valid mel both encoders must agree on valid frames.
    """
    padded = features.new_zeros(features.shape[0], features.shape[1], PEER_MEL_FRAMES)  # (B, C, 3000)
    padded[..., : features.shape[-1]] = features
    mask = (torch.arange(PEER_MEL_FRAMES)[None, :] < lengths[:, None].cpu()).long()  # (B, 3000)
    return padded, mask


def peer_token_lengths(models: Models, feature_mask: torch.Tensor) -> torch.Tensor:
    """Audio tokens per clip by the peer's own length formula (conv stride 2, then pooling by 2)."""
    return models.peer.model.audio_tower._get_feat_extract_output_lengths(feature_mask.sum(-1))[1]


def peer_encoder_mask(models: Models, feature_mask: torch.Tensor) -> torch.Tensor | None:
    """The encoder attention mask `Qwen2AudioModel.forward` builds from the feature mask (B, 3000)."""
    tower = models.peer.model.audio_tower
    frame_lengths, _ = tower._get_feat_extract_output_lengths(feature_mask.sum(-1))
    frames = tower.config.max_source_positions
    valid = (torch.arange(frames, device=feature_mask.device)[None, :] < frame_lengths[:, None]).long()  # (B, 1500)
    dummy = torch.zeros(valid.shape[0], frames, 1, dtype=models.dtype, device=feature_mask.device)
    try:
        from transformers.masking_utils import create_bidirectional_mask

        return create_bidirectional_mask(tower.config, dummy, valid)
    except (ImportError, TypeError):  # older transformers: the additive form its encoders also accept
        mask = torch.zeros(valid.shape, dtype=models.dtype, device=valid.device)
        return mask.masked_fill(valid == 0, torch.finfo(models.dtype).min)[:, None, None, :]  # (B, 1, 1, 1500)


def peer_encode(models: Models, features: torch.Tensor, feature_mask: torch.Tensor) -> torch.Tensor:
    """The peer's audio tower as its forward runs it: features (B, C, 3000) -> pooled states (B, 750, D_enc)."""
    mask = peer_encoder_mask(models, feature_mask)
    return models.peer.model.audio_tower(features, attention_mask=mask).last_hidden_state


def weight_bytes(module: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())
