"""Trainable projectors: frozen-encoder frames -> LLM-sized audio tokens, chosen by name.

Symbols used in every shape below:
    B      batch size
    T      encoder frames per clip, padded to the longest clip of the batch
    D_enc  encoder width (`input_dim`)
    H      inner width (`ProjectorConfig.hidden_dim`; D_llm when None)
    N      audio tokens per clip, always `projector_num_tokens(config, T)`
    D_llm  LLM hidden size (`output_dim`)

Every projector maps (frames (B, T, D_enc), frame_lengths (B,)) to (tokens (B, N, D_llm),
token_lengths (B,)). Padding changes nothing: the first token_lengths[b] tokens of clip b equal
the tokens of that clip run alone at its own length, and tokens at positions >= token_lengths[b]
are exactly zero, so a mask built from token_lengths and the tokens themselves always agree.
"""

from __future__ import annotations

import dataclasses
import operator
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class ProjectorConfigError(ValueError):
    """A projector setting is invalid; the message lists every problem found, not just the first."""


@dataclass(frozen=True)
class ProjectorConfig:
    """Which projector to build and how; fields a projector does not use are ignored by it."""

    name: str = "mlp"  # a key of PROJECTORS: linear | mlp | stack | conv | qformer, or a registered one
    hidden_dim: int | None = None  # inner width H of mlp/stack/conv/qformer; None -> D_llm
    stack_factor: int = 4  # stack: frames per token; 4 -> 12.5 tokens/s from Whisper's 50 frames/s
    context_layers: int = 0  # stack: bidirectional GRU layers across a clip's tokens (0: each token alone)
    conv_layers: int = 2  # conv: number of strided Conv1d layers
    conv_kernel: int = 3  # conv: kernel size of every layer; padding is conv_kernel // 2
    conv_stride: int = 2  # conv: stride of every layer
    window: int = 15  # qformer: frames per window; the last window of a clip may be partial
    queries: int = 4  # qformer: learned queries, hence tokens, per window
    qformer_layers: int = 2
    qformer_heads: int = 4  # qformer: must divide H
    dropout: float = 0.0  # on hidden activations while training (linear: on its input frames)

    def validate(self) -> None:
        """Raise ProjectorConfigError naming every invalid field; values are never rewritten."""
        _raise_if(self.problems(self.hidden_dim))

    def problems(self, hidden: int | None) -> list[str]:
        """Every problem with this config, given the inner width H it will run at (None: not known yet)."""
        found = []
        if not isinstance(self.name, str) or self.name not in PROJECTORS:
            found.append(f"name={self.name!r} is not a registered projector; expected one of {sorted(PROJECTORS)}")
        if self.hidden_dim is not None and not _is_positive_int(self.hidden_dim):
            found.append(f"hidden_dim must be a positive int or None, got {self.hidden_dim!r}")
        for field in dataclasses.fields(self):  # every plain-int setting is a count or a size
            value = getattr(self, field.name)
            if field.name in _MAY_BE_ZERO:
                if not (_is_positive_int(value) or type(value) is int and value == 0):
                    found.append(f"{field.name} must be an int >= 0, got {value!r}")
            elif field.type in ("int", int) and not _is_positive_int(value):
                found.append(f"{field.name} must be a positive int, got {value!r}")
        dropout_ok = isinstance(self.dropout, (int, float)) and not isinstance(self.dropout, bool)
        if not (dropout_ok and 0.0 <= self.dropout < 1.0):
            found.append(f"dropout must be a float in [0, 1), got {self.dropout!r}")
        if self.name == "stack" and _is_positive_int(self.context_layers) and _is_positive_int(hidden) and hidden % 2:
            found.append(
                f"context_layers={self.context_layers} needs an even inner width (half per GRU direction), "
                f"got {hidden} (hidden_dim, or D_llm when hidden_dim is None)"
            )
        heads = self.qformer_heads
        if self.name == "qformer" and _is_positive_int(hidden) and _is_positive_int(heads) and hidden % heads:
            found.append(
                f"qformer_heads={heads} must divide the inner width {hidden} "
                "(hidden_dim, or D_llm when hidden_dim is None)"
            )
        return found

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ProjectorConfig:
        """Build and validate a config from a mapping (e.g. a YAML section); unknown keys are an error."""
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise ProjectorConfigError(f"unknown ProjectorConfig keys {unknown}; known keys are {known}")
        config = cls(**data)
        config.validate()
        return config


_MAY_BE_ZERO = {"context_layers"}  # int settings where 0 means "none"


def _is_positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _raise_if(problems: list[str]) -> None:
    if problems:
        raise ProjectorConfigError("invalid projector config:\n  - " + "\n  - ".join(problems))


def _ceil_div(a: int | Tensor, b: int) -> int | Tensor:
    """ceil(a / b) for b > 0; works on ints and integer tensors (floor division floors in both)."""
    return -(-a // b)


def _conv_out_len(n: int | Tensor, kernel: int, stride: int) -> int | Tensor:
    """Length after Conv1d(kernel, stride, padding=kernel // 2) on n frames; works on ints and tensors."""
    return (n + 2 * (kernel // 2) - kernel) // stride + 1


def _zero_beyond(x: Tensor, lengths: Tensor) -> Tensor:
    """Zero x (B, T, C) at time steps >= lengths[b]; masked_fill, so even NaN/inf padding is removed."""
    valid = torch.arange(x.shape[1], device=x.device) < lengths[:, None]  # (B, T)
    return x.masked_fill(~valid[..., None], 0.0)


PROJECTORS: dict[str, type[Projector]] = {}
_P = TypeVar("_P", bound="type[Projector]")


def register_projector(name: str) -> Callable[[_P], _P]:
    """Class decorator adding a Projector subclass to PROJECTORS under `name`; names are never replaced."""

    def register(cls: _P) -> _P:
        if not (isinstance(cls, type) and issubclass(cls, Projector)):
            raise TypeError(f"register_projector({name!r}) expects a Projector subclass, got {cls!r}")
        if name in PROJECTORS:
            raise ValueError(f"projector name {name!r} is already registered to {PROJECTORS[name].__qualname__}")
        PROJECTORS[name] = cls
        return cls

    return register


def _build_problems(config: ProjectorConfig, input_dim: int, output_dim: int) -> list[str]:
    hidden = config.hidden_dim if config.hidden_dim is not None else output_dim
    found = config.problems(hidden)
    for arg, value in (("input_dim", input_dim), ("output_dim", output_dim)):
        if not _is_positive_int(value):
            found.append(f"{arg} must be a positive int, got {value!r}")
    return found


def build_projector(config: ProjectorConfig, input_dim: int, output_dim: int) -> Projector:
    """Build the projector `config.name` mapping D_enc=input_dim to D_llm=output_dim."""
    _raise_if(_build_problems(config, input_dim, output_dim))
    return PROJECTORS[config.name](config, input_dim, output_dim)


def projector_num_tokens(config: ProjectorConfig, num_frames: int) -> int:
    """Audio tokens a clip of `num_frames` (>= 1) encoder frames yields: the one formula everyone uses."""
    n = operator.index(num_frames)  # numpy and 0-d torch integers are fine, floats are not
    if n < 1:
        raise ValueError(f"num_frames must be >= 1, got {n}")
    config.validate()
    return PROJECTORS[config.name].count_tokens(config, n)


def tokens_per_second(config: ProjectorConfig, frames_per_second: float) -> float:
    """Long-run audio tokens per second of audio, e.g. stack k=4 at Whisper's 50 frames/s -> 12.5."""
    config.validate()
    return frames_per_second * PROJECTORS[config.name].tokens_per_frame(config)


class Projector(nn.Module):
    """Base of every projector: checks inputs, masks padding and counts tokens; subclasses project.

    A subclass defines `count_tokens` (its token-count formula), `tokens_per_frame` (its long-run
    rate) and `project` (the network). `forward` checks that `project` honours `count_tokens`.
    """

    def __init__(self, config: ProjectorConfig, input_dim: int, output_dim: int) -> None:
        super().__init__()
        problems = _build_problems(config, input_dim, output_dim)
        registered = None if problems else PROJECTORS.get(config.name)  # name may be unhashable
        if registered is not None and not isinstance(self, registered):
            problems.append(f"config.name={config.name!r} names {registered.__name__}, not {type(self).__name__}")
        _raise_if(problems)
        self.config = config
        self.input_dim = input_dim
        self.output_dim = output_dim
        self.hidden_dim = config.hidden_dim if config.hidden_dim is not None else output_dim

    @classmethod
    def count_tokens(cls, config: ProjectorConfig, num_frames: int) -> int:
        """Tokens from num_frames >= 1 frames; reached through `projector_num_tokens`."""
        raise NotImplementedError(f"{cls.__name__} must define count_tokens")

    @classmethod
    def tokens_per_frame(cls, config: ProjectorConfig) -> float:
        """Tokens per encoder frame for long clips; reached through `tokens_per_second`."""
        raise NotImplementedError(f"{cls.__name__} must define tokens_per_frame")

    def project(self, frames: Tensor, frame_lengths: Tensor) -> Tensor:
        """frames (B, T, D_enc), already zero beyond each length -> tokens (B, N, D_llm)."""
        raise NotImplementedError(f"{type(self).__name__} must define project")

    def num_tokens(self, num_frames: int) -> int:
        return projector_num_tokens(self.config, num_frames)

    def forward(self, frames: Tensor, frame_lengths: Tensor) -> tuple[Tensor, Tensor]:
        """Project frames (B, T, D_enc) with frame_lengths (B,) to (tokens (B, N, D_llm), token_lengths (B,)).

        Tokens at positions >= token_lengths[b] are zero.
        """
        lengths = self._check_inputs(frames, frame_lengths)
        tokens = self.project(_zero_beyond(frames, frame_lengths), frame_lengths)
        expected = (frames.shape[0], self.num_tokens(frames.shape[1]), self.output_dim)
        if tuple(tokens.shape) != expected:
            raise RuntimeError(
                f"{type(self).__name__}.project returned shape {tuple(tokens.shape)}, but its "
                f"count_tokens promises {expected} for T={frames.shape[1]}"
            )
        token_lengths = torch.tensor([self.num_tokens(n) for n in lengths], device=frames.device)
        return _zero_beyond(tokens, token_lengths), token_lengths

    def _check_inputs(self, frames: Tensor, frame_lengths: Tensor) -> list[int]:
        if frames.dim() != 3 or frames.shape[-1] != self.input_dim:
            raise ValueError(f"frames must be (B, T, D_enc={self.input_dim}), got shape {tuple(frames.shape)}")
        batch, num_frames = frames.shape[0], frames.shape[1]
        integral = not (frame_lengths.is_floating_point() or frame_lengths.is_complex())
        if frame_lengths.shape != (batch,) or not integral or frame_lengths.dtype == torch.bool:
            raise ValueError(
                f"frame_lengths must be an integer tensor of shape ({batch},), "
                f"got {frame_lengths.dtype} of shape {tuple(frame_lengths.shape)}"
            )
        lengths = frame_lengths.tolist()
        bad = [n for n in lengths if not 1 <= n <= num_frames]
        if bad:
            raise ValueError(f"frame_lengths must lie in [1, T={num_frames}], got {bad}")
        return lengths


class _OneTokenPerFrame(Projector):
    @classmethod
    def count_tokens(cls, config: ProjectorConfig, num_frames: int) -> int:
        return num_frames

    @classmethod
    def tokens_per_frame(cls, config: ProjectorConfig) -> float:
        return 1.0


@register_projector("linear")
class LinearProjector(_OneTokenPerFrame):
    """One token per frame: Dropout -> Linear(D_enc, D_llm)."""

    def __init__(self, config: ProjectorConfig, input_dim: int, output_dim: int) -> None:
        super().__init__(config, input_dim, output_dim)
        self.dropout = nn.Dropout(config.dropout)
        self.proj = nn.Linear(input_dim, output_dim)

    def project(self, frames: Tensor, frame_lengths: Tensor) -> Tensor:
        return self.proj(self.dropout(frames))  # (B, T, D_llm)


@register_projector("mlp")
class MLPProjector(_OneTokenPerFrame):
    """One token per frame: Linear(D_enc, H) -> GELU -> Dropout -> Linear(H, D_llm)."""

    def __init__(self, config: ProjectorConfig, input_dim: int, output_dim: int) -> None:
        super().__init__(config, input_dim, output_dim)
        self.net = nn.Sequential(
            nn.Linear(input_dim, self.hidden_dim),
            nn.GELU(),
            nn.Dropout(config.dropout),
            nn.Linear(self.hidden_dim, output_dim),
        )

    def project(self, frames: Tensor, frame_lengths: Tensor) -> Tensor:
        return self.net(frames)  # (B, T, D_llm)


@register_projector("stack")
class StackProjector(Projector):
    """Stack k frames into one token, then a gated MLP, optionally with context across the tokens.

    k = stack_factor; N = ceil(T / k); D_enc, H, D_llm as in the module docstring.
    frames (B, T, D_enc) -> zero-pad T to N*k -> (B, N, k*D_enc) -> LayerNorm(k*D_enc)
    -> Linear(k*D_enc, 2H) -> SwiGLU: silu(a) * b over the halves a, b (B, N, H)
    [context_layers > 0: h + BiGRU(LayerNorm(h)) over each clip's own N_b tokens, H/2 per direction]
    -> Dropout -> Linear(H, D_llm) -> (B, N, D_llm).
    Without context each token sees only its own k frames; with it a token can also say what came before
    and after it in the clip (e.g. that it is the third beep of a group), which an LLM reads more easily
    than it counts similar tokens.
    No final norm: every LLM block normalises its own input, while the text embeddings the audio
    tokens sit beside have a model-specific scale; the last Linear is free to learn that scale,
    a norm there would pin the tokens to unit RMS instead.
    """

    def __init__(self, config: ProjectorConfig, input_dim: int, output_dim: int) -> None:
        super().__init__(config, input_dim, output_dim)
        stacked = config.stack_factor * input_dim
        self.norm = nn.LayerNorm(stacked)
        self.up = nn.Linear(stacked, 2 * self.hidden_dim)
        self.context_norm = self.context = None
        if config.context_layers:
            self.context_norm = nn.LayerNorm(self.hidden_dim)
            self.context = nn.GRU(
                self.hidden_dim,
                self.hidden_dim // 2,
                num_layers=config.context_layers,
                batch_first=True,
                bidirectional=True,
            )
        self.dropout = nn.Dropout(config.dropout)
        self.down = nn.Linear(self.hidden_dim, output_dim)

    @classmethod
    def count_tokens(cls, config: ProjectorConfig, num_frames: int) -> int:
        return _ceil_div(num_frames, config.stack_factor)

    @classmethod
    def tokens_per_frame(cls, config: ProjectorConfig) -> float:
        return 1.0 / config.stack_factor

    def project(self, frames: Tensor, frame_lengths: Tensor) -> Tensor:
        batch, num_frames, dim = frames.shape
        k = self.config.stack_factor
        n = self.count_tokens(self.config, num_frames)
        # zeros, exactly what a lone clip's partial last group gets
        frames = F.pad(frames, (0, 0, 0, n * k - num_frames))  # (B, N*k, D_enc)
        x = frames.reshape(batch, n, k * dim)  # (B, N, k*D_enc): frames i*k .. i*k+k-1 side by side
        a, b = self.up(self.norm(x)).chunk(2, dim=-1)  # (B, N, H) each
        h = F.silu(a) * b  # (B, N, H)
        if self.context is not None:
            token_lengths = self.count_tokens(self.config, frame_lengths)  # (B,): the formula works on tensors too
            h = h + self._across_tokens(self.context_norm(h), token_lengths)
        return self.down(self.dropout(h))  # (B, N, D_llm)

    def _across_tokens(self, h: Tensor, token_lengths: Tensor) -> Tensor:
        """The bidirectional GRU over each clip's first token_lengths[b] tokens: (B, N, H) -> (B, N, H), zero
        beyond; packed, so a clip's padding never reaches its tokens. Runs in the GRU's own dtype (autocast
        has no rule for it)."""
        dtype, n = self.context.weight_ih_l0.dtype, h.shape[1]
        with torch.autocast(h.device.type, enabled=False):
            packed = nn.utils.rnn.pack_padded_sequence(
                h.to(dtype), token_lengths.cpu(), batch_first=True, enforce_sorted=False
            )
            out, _ = self.context(packed)
            out, _ = nn.utils.rnn.pad_packed_sequence(out, batch_first=True, total_length=n)  # (B, N, H)
        return out.to(h.dtype)


@register_projector("conv")
class ConvProjector(Projector):
    """Strided 1-D convolutions over time, then Linear(H, D_llm).

    conv_layers times: [zero frames beyond each clip's length -> Conv1d(kernel, stride,
    padding=kernel // 2) -> GELU -> Dropout]; the first conv maps D_enc -> H, the others H -> H.
    Each layer maps T frames to floor((T + 2 * (kernel // 2) - kernel) / stride) + 1.
    """

    def __init__(self, config: ProjectorConfig, input_dim: int, output_dim: int) -> None:
        super().__init__(config, input_dim, output_dim)
        k, s, h = config.conv_kernel, config.conv_stride, self.hidden_dim
        widths = [input_dim] + [h] * (config.conv_layers - 1)
        self.convs = nn.ModuleList(nn.Conv1d(w, h, k, stride=s, padding=k // 2) for w in widths)
        self.dropout = nn.Dropout(config.dropout)
        self.out = nn.Linear(h, output_dim)

    @classmethod
    def count_tokens(cls, config: ProjectorConfig, num_frames: int) -> int:
        for _ in range(config.conv_layers):
            num_frames = _conv_out_len(num_frames, config.conv_kernel, config.conv_stride)
        return num_frames

    @classmethod
    def tokens_per_frame(cls, config: ProjectorConfig) -> float:
        return 1.0 / config.conv_stride**config.conv_layers

    def project(self, frames: Tensor, frame_lengths: Tensor) -> Tensor:
        x, lengths = frames, frame_lengths
        for conv in self.convs:
            # conv bias and GELU make steps beyond a clip nonzero; the next kernel reaches them from
            # the clip's last valid steps, where a lone clip would see conv zero-padding instead
            x = _zero_beyond(x, lengths)  # (B, T_i, C)
            x = conv(x.transpose(1, 2)).transpose(1, 2)  # (B, C, T_i) -> (B, T_{i+1}, H)
            x = self.dropout(F.gelu(x))
            lengths = _conv_out_len(lengths, self.config.conv_kernel, self.config.conv_stride)
        return self.out(x)  # (B, N, D_llm)


class _QFormerBlock(nn.Module):
    """Pre-norm block: self-attention over queries, cross-attention to one window's frames, MLP."""

    def __init__(self, hidden: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.norm_self = nn.LayerNorm(hidden)
        self.self_attn = nn.MultiheadAttention(hidden, heads, dropout=dropout, batch_first=True)
        self.norm_query = nn.LayerNorm(hidden)
        self.norm_frames = nn.LayerNorm(hidden)
        self.cross_attn = nn.MultiheadAttention(hidden, heads, dropout=dropout, batch_first=True)
        self.norm_mlp = nn.LayerNorm(hidden)
        self.mlp = nn.Sequential(
            nn.Linear(hidden, 4 * hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(4 * hidden, hidden)
        )

    def forward(self, queries: Tensor, frames: Tensor, padded: Tensor) -> Tensor:
        """queries (B*W, Q, H), frames (B*W, window, H), padded (B*W, window) True where ignored."""
        h = self.norm_self(queries)
        queries = queries + self.self_attn(h, h, h, need_weights=False)[0]
        kv = self.norm_frames(frames)
        h = self.norm_query(queries)
        queries = queries + self.cross_attn(h, kv, kv, key_padding_mask=padded, need_weights=False)[0]
        return queries + self.mlp(self.norm_mlp(queries))  # (B*W, Q, H)


@register_projector("qformer")
class QFormerProjector(Projector):
    """Window-level Q-Former: Q learned queries read each window of frames, so N grows with T.

    W = ceil(T / window) windows per clip (the last one partial, its missing frames masked),
    Q = queries, N = W * Q, tokens ordered window by window.
    frames (B, T, D_enc) -> Linear(D_enc, H) + learned position-in-window -> (B*W, window, H);
    queries (B*W, Q, H) -> qformer_layers x _QFormerBlock -> LayerNorm -> Linear(H, D_llm)
    -> (B, N, D_llm).
    """

    def __init__(self, config: ProjectorConfig, input_dim: int, output_dim: int) -> None:
        super().__init__(config, input_dim, output_dim)
        h = self.hidden_dim
        self.inp = nn.Linear(input_dim, h)
        # attention is order-blind; this tells the queries where in the window each frame sits
        self.frame_pos = nn.Parameter(0.02 * torch.randn(config.window, h))
        self.queries = nn.Parameter(0.02 * torch.randn(config.queries, h))
        blocks = [_QFormerBlock(h, config.qformer_heads, config.dropout) for _ in range(config.qformer_layers)]
        self.blocks = nn.ModuleList(blocks)
        self.norm_out = nn.LayerNorm(h)
        self.out = nn.Linear(h, output_dim)

    @classmethod
    def count_tokens(cls, config: ProjectorConfig, num_frames: int) -> int:
        return _ceil_div(num_frames, config.window) * config.queries

    @classmethod
    def tokens_per_frame(cls, config: ProjectorConfig) -> float:
        return config.queries / config.window

    def project(self, frames: Tensor, frame_lengths: Tensor) -> Tensor:
        batch, num_frames, _ = frames.shape
        w = self.config.window
        windows = _ceil_div(num_frames, w)
        x = F.pad(self.inp(frames), (0, 0, 0, windows * w - num_frames))  # (B, W*window, H)
        # all windows of all clips attend in one batch
        x = x.reshape(batch * windows, w, -1) + self.frame_pos  # (B*W, window, H)
        steps = torch.arange(windows * w, device=frames.device)
        padded = (steps >= frame_lengths[:, None]).reshape(batch * windows, w)  # (B*W, window)
        # a window wholly past its clip would softmax over nothing (NaN on older torch); let it see
        # its zeroed frames instead: its tokens lie beyond token_lengths and forward zeroes them
        padded = padded & ~padded.all(dim=1, keepdim=True)
        queries = self.queries.expand(batch * windows, -1, -1)  # (B*W, Q, H)
        for block in self.blocks:
            queries = block(queries, x, padded)
        tokens = self.out(self.norm_out(queries))  # (B*W, Q, D_llm)
        return tokens.reshape(batch, windows * self.config.queries, -1)  # (B, N, D_llm)
