"""CTranslate2 model files: read `model.bin`, and map a CTranslate2 Whisper onto transformers' names.

File layout (version 6, little-endian): u32 version, string spec name, u32 revision, u32 variable count;
per variable: string name, u8 rank, u32 per dimension, u8 dtype, u32 byte count, raw bytes; then
u32 alias count and (alias, target) string pairs. A string is a u16 length (counting a final NUL),
the UTF-8 bytes and the NUL.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from transformers import WhisperConfig, WhisperForConditionalGeneration

BINARY_VERSION = 6
WHISPER_SPEC = "WhisperSpec"
_DTYPES: dict[int, str] = {0: "<f4", 1: "i1", 2: "<i2", 3: "<i4", 4: "<f2", 5: "bfloat16"}
_GELU = 3  # CTranslate2's activation enum

# Scalars that change what the network computes: converted only when they hold Whisper's values.
_EXPECTED_SETTINGS: dict[str, int] = {
    "decoder/activation": _GELU,
    "decoder/pre_norm": 1,
    "decoder/scale_embeddings": 0,
    "decoder/alibi": 0,
    "decoder/alibi_use_positive_positions": 0,
    "decoder/scale_alibi": 0,
    "decoder/start_from_zero_embedding": 0,
}
# Read into the config, or used only by CTranslate2's word timestamps.
_KNOWN_IGNORED = ("encoder/num_heads", "decoder/num_heads", "decoder/alignment_layer", "decoder/alignment_heads")


class CT2FormatError(ValueError):
    """A CTranslate2 model is missing, truncated, or holds variables this converter does not know."""


class _Reader:
    """Reads little-endian fields from a CTranslate2 file, naming the file when it ends too early."""

    def __init__(self, handle: BinaryIO, path: Path) -> None:
        self.handle = handle
        self.path = path

    def raw(self, num_bytes: int, what: str) -> bytes:
        data = self.handle.read(num_bytes)
        if len(data) != num_bytes:
            raise CT2FormatError(
                f"{self.path}: truncated CTranslate2 file: expected {num_bytes} bytes for {what}, got {len(data)}"
            )
        return data

    def unpack(self, fmt: str, what: str) -> int:
        return struct.unpack("<" + fmt, self.raw(struct.calcsize(fmt), what))[0]

    def string(self, what: str) -> str:
        length = self.unpack("H", what)
        data = self.raw(length, what)
        if length == 0 or data[-1] != 0:
            raise CT2FormatError(f"{self.path}: {what} is not a NUL-terminated string (length {length})")
        try:
            return data[:-1].decode("utf-8")
        except UnicodeDecodeError as error:
            raise CT2FormatError(f"{self.path}: {what} is not UTF-8: {data[:40]!r}") from error


def _read_header(reader: _Reader) -> tuple[str, int]:
    version = reader.unpack("I", "the format version")
    if version != BINARY_VERSION:
        raise CT2FormatError(
            f"{reader.path}: not a CTranslate2 model.bin of format version {BINARY_VERSION} "
            f"(read {version}); re-convert it with a recent ctranslate2"
        )
    spec = reader.string("the model spec name")
    revision = reader.unpack("I", "the spec revision")
    return spec, revision


def _read_array(reader: _Reader, name: str) -> np.ndarray:
    rank = reader.unpack("B", f"the rank of {name!r}")
    shape = tuple(reader.unpack("I", f"the shape of {name!r}") for _ in range(rank))
    type_id = reader.unpack("B", f"the dtype of {name!r}")
    if type_id not in _DTYPES:
        raise CT2FormatError(
            f"{reader.path}: variable {name!r} has dtype id {type_id}; expected one of {sorted(_DTYPES)}"
        )
    num_bytes = reader.unpack("I", f"the byte count of {name!r}")
    data = reader.raw(num_bytes, f"the data of {name!r}")
    item_size = 2 if _DTYPES[type_id] == "bfloat16" else np.dtype(_DTYPES[type_id]).itemsize
    if num_bytes != item_size * int(np.prod(shape)):
        raise CT2FormatError(
            f"{reader.path}: variable {name!r} has {num_bytes} bytes, which does not fit shape {shape} "
            f"of dtype id {type_id}"
        )
    if _DTYPES[type_id] == "bfloat16":
        # numpy has no bfloat16: its bits are the upper half of a float32.
        return (np.frombuffer(data, dtype="<u2").astype(np.uint32) << 16).view(np.float32).reshape(shape)
    return np.frombuffer(data, dtype=_DTYPES[type_id]).reshape(shape)


def read_ct2_model(path: str | Path) -> dict[str, np.ndarray]:
    """Reads every variable of a CTranslate2 `model.bin`, aliases resolved.

    Args:
        path: the `model.bin` file.

    Returns:
        Variable name -> array (read-only; bfloat16 comes back as float32). An alias maps to the same
        array as its target.

    Raises:
        CT2FormatError: the file is missing, has another format version, or is truncated.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise CT2FormatError(f"{path}: no such CTranslate2 model file")
    with path.open("rb") as handle:
        reader = _Reader(handle, path)
        _read_header(reader)
        variables: dict[str, np.ndarray] = {}
        for _ in range(reader.unpack("I", "the variable count")):
            name = reader.string("a variable name")
            variables[name] = _read_array(reader, name)
        for _ in range(reader.unpack("I", "the alias count")):
            alias = reader.string("an alias name")
            target = reader.string(f"the target of alias {alias!r}")
            if target not in variables:
                raise CT2FormatError(f"{path}: alias {alias!r} points to unknown variable {target!r}")
            variables[alias] = variables[target]
        if handle.read(1):
            raise CT2FormatError(f"{path}: unexpected bytes after the alias table")
    return variables


def ct2_spec_name(path: str | Path) -> str | None:
    """The spec name in a `model.bin` header (e.g. "WhisperSpec"), or None if the header is unreadable."""
    path = Path(path).expanduser()
    try:
        with path.open("rb") as handle:
            return _read_header(_Reader(handle, path))[0]
    except (OSError, CT2FormatError):
        return None


def is_ct2_whisper_folder(path: str | Path) -> bool:
    """True if `path` is a folder whose `model.bin` header names a CTranslate2 Whisper model."""
    model_bin = Path(path).expanduser() / "model.bin"
    return model_bin.is_file() and ct2_spec_name(model_bin) == WHISPER_SPEC


@dataclass(frozen=True)
class WhisperLayout:
    """Whisper hyper-parameters read off CTranslate2 tensor shapes and head-count scalars."""

    d_model: int
    num_mel_bins: int
    vocab_size: int
    encoder_layers: int
    decoder_layers: int
    encoder_attention_heads: int
    decoder_attention_heads: int
    encoder_ffn_dim: int
    decoder_ffn_dim: int
    max_source_positions: int
    max_target_positions: int
    tied_projection: bool  # the output projection is the decoder embedding matrix


class _Variables:
    """Hands out CTranslate2 variables once each, so that anything never asked for can be reported."""

    def __init__(self, variables: dict[str, np.ndarray]) -> None:
        self.remaining = dict(variables)

    def take(self, name: str) -> torch.Tensor:
        if name not in self.remaining:
            raise CT2FormatError(f"missing variable {name!r}")
        value = self.remaining.pop(name).astype(np.float32)
        scale = self.remaining.pop(f"{name}_scale", None)
        if scale is not None:
            # Quantised weights are stored as round(w * scale), scale per output row (int8) or global (int16).
            scale = scale.astype(np.float32)
            value = value / scale.reshape(scale.shape + (1,) * (value.ndim - scale.ndim))
        return torch.from_numpy(np.ascontiguousarray(value))

    def scalar(self, name: str) -> int:
        if name not in self.remaining:
            raise CT2FormatError(f"missing scalar variable {name!r}")
        if self.remaining[name].ndim != 0:
            raise CT2FormatError(f"{name!r} has shape {self.remaining[name].shape}; expected a scalar")
        return int(self.remaining.pop(name))

    def num_layers(self, stack: str) -> int:
        pattern = re.compile(rf"^{stack}/layer_(\d+)/")
        indices = {int(m.group(1)) for name in self.remaining if (m := pattern.match(name))}
        if indices != set(range(len(indices))):
            raise CT2FormatError(f"{stack} layers are not numbered 0..n-1: found {sorted(indices)}")
        return len(indices)


def _norm(vs: _Variables, ct2: str, hf: str, out: dict[str, torch.Tensor]) -> None:
    out[f"{hf}.weight"] = vs.take(f"{ct2}/gamma")
    out[f"{hf}.bias"] = vs.take(f"{ct2}/beta")


def _linear(vs: _Variables, ct2: str, hf: str, out: dict[str, torch.Tensor]) -> None:
    out[f"{hf}.weight"] = vs.take(f"{ct2}/weight")
    out[f"{hf}.bias"] = vs.take(f"{ct2}/bias")


def _fused(vs: _Variables, ct2: str, hf_names: list[str], out: dict[str, torch.Tensor]) -> None:
    """Splits a linear fused along its output dimension; the key projection loses its bias.

    A key bias adds the same q.b term to every logit of a query, which softmax cancels: transformers'
    Whisper has none, and dropping it is exact whatever its value.
    """
    weights = vs.take(f"{ct2}/weight").chunk(len(hf_names), dim=0)  # n x (D, D)
    biases = vs.take(f"{ct2}/bias").chunk(len(hf_names), dim=0)  # n x (D,)
    for name, weight, bias in zip(hf_names, weights, biases):
        out[f"{name}.weight"] = weight.contiguous()
        if not name.endswith("k_proj"):
            out[f"{name}.bias"] = bias.contiguous()


def _encoder_layer(vs: _Variables, i: int, out: dict[str, torch.Tensor]) -> None:
    ct2, hf = f"encoder/layer_{i}", f"model.encoder.layers.{i}"
    attn = f"{hf}.self_attn"
    _fused(vs, f"{ct2}/self_attention/linear_0", [f"{attn}.q_proj", f"{attn}.k_proj", f"{attn}.v_proj"], out)
    _linear(vs, f"{ct2}/self_attention/linear_1", f"{attn}.out_proj", out)
    _norm(vs, f"{ct2}/self_attention/layer_norm", f"{hf}.self_attn_layer_norm", out)
    _linear(vs, f"{ct2}/ffn/linear_0", f"{hf}.fc1", out)
    _linear(vs, f"{ct2}/ffn/linear_1", f"{hf}.fc2", out)
    _norm(vs, f"{ct2}/ffn/layer_norm", f"{hf}.final_layer_norm", out)


def _decoder_layer(vs: _Variables, i: int, out: dict[str, torch.Tensor]) -> None:
    ct2, hf = f"decoder/layer_{i}", f"model.decoder.layers.{i}"
    attn, cross = f"{hf}.self_attn", f"{hf}.encoder_attn"
    _fused(vs, f"{ct2}/self_attention/linear_0", [f"{attn}.q_proj", f"{attn}.k_proj", f"{attn}.v_proj"], out)
    _linear(vs, f"{ct2}/self_attention/linear_1", f"{attn}.out_proj", out)
    _norm(vs, f"{ct2}/self_attention/layer_norm", f"{hf}.self_attn_layer_norm", out)
    _linear(vs, f"{ct2}/attention/linear_0", f"{cross}.q_proj", out)
    _fused(vs, f"{ct2}/attention/linear_1", [f"{cross}.k_proj", f"{cross}.v_proj"], out)
    _linear(vs, f"{ct2}/attention/linear_2", f"{cross}.out_proj", out)
    _norm(vs, f"{ct2}/attention/layer_norm", f"{hf}.encoder_attn_layer_norm", out)
    _linear(vs, f"{ct2}/ffn/linear_0", f"{hf}.fc1", out)
    _linear(vs, f"{ct2}/ffn/linear_1", f"{hf}.fc2", out)
    _norm(vs, f"{ct2}/ffn/layer_norm", f"{hf}.final_layer_norm", out)


def _check_settings(vs: _Variables) -> None:
    for name, expected in _EXPECTED_SETTINGS.items():
        if name in vs.remaining and (value := vs.scalar(name)) != expected:
            raise CT2FormatError(f"{name} is {value}; a Whisper model has {expected}")
    for name in _KNOWN_IGNORED:
        vs.remaining.pop(name, None)


def ct2_whisper_state_dict(variables: dict[str, np.ndarray]) -> tuple[dict[str, torch.Tensor], WhisperLayout]:
    """Maps CTranslate2 Whisper variables onto `WhisperForConditionalGeneration` parameter names.

    Args:
        variables: from `read_ct2_model`; quantised weights (with `*_scale`) are dequantised.

    Returns:
        A float32 state dict (including `proj_out.weight`) whose names and shapes are checked against
        transformers' model, and the layout read off the shapes.

    Raises:
        CT2FormatError: a variable is missing, a setting differs from Whisper's, or a variable is left
            that neither maps to transformers nor is known to be safe to ignore (named in the message).
    """
    vs = _Variables(variables)
    layout = _layout(vs)
    out: dict[str, torch.Tensor] = {}
    _linear(vs, "encoder/conv1", "model.encoder.conv1", out)
    _linear(vs, "encoder/conv2", "model.encoder.conv2", out)
    out["model.encoder.embed_positions.weight"] = vs.take("encoder/position_encodings/encodings")
    _norm(vs, "encoder/layer_norm", "model.encoder.layer_norm", out)
    for i in range(layout.encoder_layers):
        _encoder_layer(vs, i, out)
    out["model.decoder.embed_tokens.weight"] = vs.take("decoder/embeddings/weight")
    out["model.decoder.embed_positions.weight"] = vs.take("decoder/position_encodings/encodings")
    _norm(vs, "decoder/layer_norm", "model.decoder.layer_norm", out)
    for i in range(layout.decoder_layers):
        _decoder_layer(vs, i, out)
    out["proj_out.weight"] = vs.take("decoder/projection/weight")
    _check_settings(vs)
    if vs.remaining:
        raise CT2FormatError(f"unknown CTranslate2 Whisper variables {sorted(vs.remaining)}; none was converted")
    _check_against_transformers(out, layout)
    return out, layout


def whisper_config(layout: WhisperLayout, **settings: Any) -> WhisperConfig:
    """The transformers `WhisperConfig` for `layout`; `settings` adds token ids and the like."""
    return WhisperConfig(
        vocab_size=layout.vocab_size,
        num_mel_bins=layout.num_mel_bins,
        d_model=layout.d_model,
        encoder_layers=layout.encoder_layers,
        encoder_attention_heads=layout.encoder_attention_heads,
        encoder_ffn_dim=layout.encoder_ffn_dim,
        decoder_layers=layout.decoder_layers,
        decoder_attention_heads=layout.decoder_attention_heads,
        decoder_ffn_dim=layout.decoder_ffn_dim,
        max_source_positions=layout.max_source_positions,
        max_target_positions=layout.max_target_positions,
        tie_word_embeddings=layout.tied_projection,
        dtype="float32",
        **settings,
    )


def _check_against_transformers(state: dict[str, torch.Tensor], layout: WhisperLayout) -> None:
    """Compares names and shapes with the model transformers builds, so that nothing loads half-way."""
    with torch.device("meta"):
        # Token ids do not change shapes; Whisper's defaults might not fit a small vocabulary.
        config = whisper_config(layout, pad_token_id=None, bos_token_id=None, eos_token_id=None)
        expected = WhisperForConditionalGeneration(config).state_dict()
    problems = [f"missing {name}" for name in sorted(expected.keys() - state.keys())]
    problems += [f"unexpected {name}" for name in sorted(state.keys() - expected.keys())]
    problems += [
        f"{name} has shape {tuple(state[name].shape)}, transformers expects {tuple(expected[name].shape)}"
        for name in sorted(expected.keys() & state.keys())
        if state[name].shape != expected[name].shape
    ]
    if problems:
        raise CT2FormatError(f"does not fit transformers' Whisper: {'; '.join(problems)}")


def _layout(vs: _Variables) -> WhisperLayout:
    def shape(name: str) -> tuple[int, ...]:
        if name not in vs.remaining:
            raise CT2FormatError(f"missing variable {name!r}")
        return vs.remaining[name].shape

    d_model, num_mel_bins, _ = shape("encoder/conv1/weight")  # (D, n_mels, 3)
    projection = vs.remaining.get("decoder/projection/weight")
    embeddings = vs.remaining.get("decoder/embeddings/weight")
    layout = WhisperLayout(
        d_model=d_model,
        num_mel_bins=num_mel_bins,
        vocab_size=shape("decoder/embeddings/weight")[0],
        encoder_layers=vs.num_layers("encoder"),
        decoder_layers=vs.num_layers("decoder"),
        encoder_attention_heads=vs.scalar("encoder/num_heads"),
        decoder_attention_heads=vs.scalar("decoder/num_heads"),
        encoder_ffn_dim=shape("encoder/layer_0/ffn/linear_0/weight")[0],
        decoder_ffn_dim=shape("decoder/layer_0/ffn/linear_0/weight")[0],
        max_source_positions=shape("encoder/position_encodings/encodings")[0],
        max_target_positions=shape("decoder/position_encodings/encodings")[0],
        tied_projection=projection is embeddings or bool(np.array_equal(projection, embeddings)),
    )
    for heads in (layout.encoder_attention_heads, layout.decoder_attention_heads):
        if heads <= 0 or d_model % heads:
            raise CT2FormatError(f"{heads} attention heads do not divide d_model {d_model}")
    return layout
