"""FLOP and byte counts for MFU and the decode bandwidth limit, written out from the shapes.

Symbols: B batch, S tokens per sequence, L LLM layers, h LLM width, q = heads * head_dim (= h),
kv = kv_heads * head_dim, f LLM MLP width, V vocabulary, r LoRA rank; encoder: L_e layers, D
width, F MLP width, C mel bins, T frames per clip (50 per second), T_mel = 2 T mel frames.
A matmul of an (m x k) by a (k x n) matrix is 2 m k n FLOPs; biases, norms, activations, softmax
and the rotary embedding are not counted (well under 1 % here).
"""

from __future__ import annotations

from .peer_models import PeerSize

LORA_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")

FORMULA = {
    "llm_matmul_params": "P_llm = L (2 h q + 2 h kv + 3 h f) + V h   (layers + LM head; the embedding lookup is free)",
    "lm_head_rows": "R = the rows the LM head runs on: B S for the peer (every position's logits); B K for eardrum, "
    "whose training step (as eardrum's trainer runs it, labelled_logits_only) computes logits only at the K "
    "positions that predict a labelled token in some row. Model FLOPs (MFU) count B K for both: logits nobody "
    "learns from are work the task does not need",
    "lora_params": "P_lora = L r ((h + q) + 2 (h + kv) + (q + h))   (q, k, v, o)",
    "llm_train_step": "F_llm = B S (4 (P_llm - V h) + 6 P_lora) + 4 R V h + 3 B L 4 S^2 q   (frozen weights: "
    "forward 2P + input gradient 2P, no weight gradient; LoRA: 6P; the LM head on R rows; attention QK^T and AV "
    "over all S^2 pairs, backward = 2 x forward)",
    "projector_train_step": "F_proj = 6 P_proj N_tok   (all projector weights train; N_tok audio tokens in the batch)",
    "encoder_forward": "F_enc(T) = 2 (3 C D T_mel + 3 D^2 T) + L_e (2 (4 D^2 + 2 D F) T + 4 T^2 D)   per clip "
    "(conv1, conv2, then per layer q, k, v, o, MLP and attention); frozen, so forward only",
    "mfu": "MFU = (F_llm + F_proj + F_enc(T_clip) per clip, if the step runs the encoder) / step time / peak; "
    "the encoder is counted on the clip's own frames for both models, so the peer's 30 s padding is "
    "work it does but not work the task needs: it shows in HFU, which counts F_enc(1500) for the peer",
    "decode_bytes_per_step": "bytes = (P_llm + norms) * bytes_per_weight + B L 2 kv S_ctx * bytes_per_value   "
    "(every weight but the embedding table is read once per step, plus the KV cache)",
    "decode_limit": "tokens/s limit = B / (bytes / memory bandwidth)",
}


def _llm_dims(size: PeerSize) -> tuple[int, int]:
    head_dim = size.llm_hidden // size.llm_heads
    return size.llm_heads * head_dim, size.llm_kv_heads * head_dim  # q, kv


def llm_matmul_params(size: PeerSize) -> int:
    h, f = size.llm_hidden, size.llm_ffn
    q, kv = _llm_dims(size)
    return size.llm_layers * (2 * h * q + 2 * h * kv + 3 * h * f) + size.vocab * h


def lora_params(size: PeerSize, r: int) -> int:
    h = size.llm_hidden
    q, kv = _llm_dims(size)
    return size.llm_layers * r * ((h + q) + 2 * (h + kv) + (q + h))


def projector_matmul_params(size: PeerSize, kind: str) -> int:
    """`stack` with k = 2 and H = D_llm (eardrum) or the peer's single `linear`."""
    d, h = size.enc_width, size.llm_hidden
    if kind == "stack2":
        return (2 * d) * (2 * h) + h * h
    if kind == "linear":
        return d * h
    raise ValueError(f"unknown projector kind {kind!r}; expected 'stack2' or 'linear'")


def encoder_forward_flops(size: PeerSize, frames: int) -> int:
    """One clip of `frames` encoder frames (T); the mel input is 2 T frames."""
    c, d, ffn, t = size.mel_bins, size.enc_width, size.enc_ffn, frames
    convs = 2 * (3 * c * d * 2 * t + 3 * d * d * t)
    layer = 2 * (4 * d * d + 2 * d * ffn) * t + 4 * t * t * d
    return convs + size.enc_layers * layer


def llm_train_flops(size: PeerSize, batch: int, seq: int, r: int, head_rows: int | None = None) -> int:
    """One LoRA training step of the LLM; the LM head runs on `head_rows` rows (default: all batch x seq)."""
    q, _ = _llm_dims(size)
    tokens = batch * seq
    head = size.vocab * size.llm_hidden
    rows = tokens if head_rows is None else head_rows
    attention = 3 * batch * size.llm_layers * 4 * seq * seq * q
    return tokens * (4 * (llm_matmul_params(size) - head) + 6 * lora_params(size, r)) + 4 * rows * head + attention


def train_step_flops(
    size: PeerSize, *, batch: int, seq: int, audio_tokens: int, r: int, projector: str, encoder_frames: int | None,
    head_rows: int | None = None,
) -> int:
    """FLOPs of one training step; `encoder_frames` per clip, or None when the encoder does not run (cache);
    the LM head on `head_rows` rows (default: every position)."""
    flops = llm_train_flops(size, batch, seq, r, head_rows)
    flops += 6 * projector_matmul_params(size, projector) * audio_tokens
    if encoder_frames is not None:
        flops += batch * encoder_forward_flops(size, encoder_frames)
    return flops


def decode_bytes_per_step(size: PeerSize, batch: int, context: int, bytes_per_value: int) -> int:
    """Bytes one decoding step must read: the LLM weights once (no embedding table) and the KV cache."""
    _, kv = _llm_dims(size)
    norms = (2 * size.llm_layers + 1) * size.llm_hidden
    weights = (llm_matmul_params(size) + norms) * bytes_per_value
    cache = batch * size.llm_layers * 2 * kv * context * bytes_per_value
    return weights + cache
