"""Frozen speech encoders: Whisper (trimmed to each batch's length) and wav2vec2 / HuBERT / WavLM.

Symbols: B batch, S samples, C mel bins, T_mel mel frames, T encoder frames, D_enc encoder width,
L number of encoder layers.

An encoder is two pieces so the text side never needs the weights:
- `AudioFeaturizer` turns waveforms into padded features plus lengths (no parameters);
- `SpeechEncoder` runs the frozen network: (features, lengths) -> (frames, frame_lengths).
Both answer `num_frames(num_samples)` from the same `FrameSpec`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

from .audio import SAMPLING_RATE

WHISPER_HOP = 160  # mel hop in samples at 16 kHz: 100 mel frames per second
MIN_SAMPLES = 400  # one STFT window / one wav2vec2 receptive field; shorter clips are zero-padded to this


@dataclass(frozen=True)
class FrameSpec:
    """Everything needed to count encoder frames for a clip, without the weights.

    kind: "whisper" (log-mel, hop 160, then convs) or "wav2vec2" (convs over raw samples).
    convs: (kernel, stride, padding) of each time-reducing convolution, in order.
    max_samples: longest clip one forward may take (Whisper's positional table), or None.
    """

    kind: str
    convs: tuple[tuple[int, int, int], ...]
    max_samples: int | None
    hidden_size: int
    num_layers: int

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> FrameSpec:
        return cls(
            kind=data["kind"],
            convs=tuple(tuple(c) for c in data["convs"]),
            max_samples=data["max_samples"],
            hidden_size=data["hidden_size"],
            num_layers=data["num_layers"],
        )


def frame_spec_from_config(config) -> FrameSpec:
    """Read a `FrameSpec` from a transformers Whisper / wav2vec2-family config."""
    if config.model_type == "whisper":
        convs = ((3, 1, 1), (3, 2, 1))
        max_samples = config.max_source_positions * 2 * WHISPER_HOP
        return FrameSpec("whisper", convs, max_samples, config.d_model, config.encoder_layers)
    if hasattr(config, "conv_kernel") and hasattr(config, "conv_stride"):
        convs = tuple((int(k), int(s), 0) for k, s in zip(config.conv_kernel, config.conv_stride))
        return FrameSpec("wav2vec2", convs, None, config.hidden_size, config.num_hidden_layers)
    raise ValueError(
        f"unsupported speech encoder type {config.model_type!r}: expected whisper or a "
        "wav2vec2-family model (wav2vec2, hubert, wavlm, data2vec-audio)"
    )


def num_frames(spec: FrameSpec, num_samples: int) -> int:
    """Encoder frames produced by a clip of `num_samples` samples at 16 kHz (exact)."""
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    if spec.max_samples is not None and num_samples > spec.max_samples:
        raise ValueError(
            f"a clip of {num_samples} samples is longer than one encoder window "
            f"({spec.max_samples} samples); long audio must be split into windows first"
        )
    length = max(num_samples, MIN_SAMPLES)
    if spec.kind == "whisper":
        length //= WHISPER_HOP
    return conv_lengths(spec, length)


def conv_lengths(spec: FrameSpec, lengths):
    """Apply the encoder's time-reducing convolutions to input lengths (int or long tensor).

    Input lengths are mel frames (Whisper) or samples (wav2vec2); output lengths are frames.
    """
    for kernel, stride, padding in spec.convs:
        lengths = (lengths + 2 * padding - kernel) // stride + 1
    return lengths


class AudioFeaturizer:
    """Waveforms -> padded encoder inputs, each clip featurized alone at its own length.

    Featurizing clip by clip makes a clip's features independent of its batch-mates (the
    Whisper log-mel normalisation uses the clip's own maximum; wav2vec2 normalises per clip).
    """

    def __init__(self, feature_extractor, spec: FrameSpec, pad_to_30s: bool = False) -> None:
        if pad_to_30s and spec.kind != "whisper":
            raise ValueError("pad_to_30s applies only to Whisper encoders")
        self.feature_extractor = feature_extractor
        self.spec = spec
        self.pad_to_30s = pad_to_30s

    def num_frames(self, num_samples: int) -> int:
        return num_frames(self.spec, num_samples)

    def __call__(self, waves: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        """Featurize a batch.

        Returns:
            features: Whisper (B, C, T_mel) log-mel; wav2vec2 (B, S) normalised samples; zero padded.
            lengths: (B,) valid mel frames (Whisper) or samples (wav2vec2) per clip.
        """
        if not waves:
            raise ValueError("AudioFeaturizer got an empty batch")
        items = [self._one(np.asarray(w, dtype=np.float32)) for w in waves]
        lengths = torch.tensor([x.shape[-1] for x in items], dtype=torch.long)
        if self.pad_to_30s:
            lengths = torch.tensor([self._valid_mel(len(w)) for w in waves], dtype=torch.long)
        longest = max(x.shape[-1] for x in items)
        shape = (len(items), *items[0].shape[:-1], longest)
        features = torch.zeros(shape, dtype=torch.float32)
        for i, x in enumerate(items):
            features[i, ..., : x.shape[-1]] = torch.from_numpy(x)
        return features, lengths

    def _valid_mel(self, num_samples: int) -> int:
        return max(num_samples, MIN_SAMPLES) // WHISPER_HOP

    def _one(self, wave: np.ndarray) -> np.ndarray:
        if wave.ndim != 1 or wave.size == 0:
            raise ValueError(f"expected a non-empty 1-D waveform, got shape {wave.shape}")
        if self.spec.max_samples is not None and wave.size > self.spec.max_samples:
            raise ValueError(
                f"clip of {wave.size} samples exceeds the encoder window of {self.spec.max_samples}; "
                "split long audio into windows first"
            )
        if wave.size < MIN_SAMPLES:
            wave = np.pad(wave, (0, MIN_SAMPLES - wave.size))
        fe = self.feature_extractor
        if self.spec.kind == "whisper":
            padding = "max_length" if self.pad_to_30s else "longest"
            out = fe([wave], sampling_rate=SAMPLING_RATE, padding=padding, return_tensors="np")
            return out["input_features"][0]  # (C, T_mel)
        out = fe([wave], sampling_rate=SAMPLING_RATE, padding=False, return_tensors="np")
        return out["input_values"][0].astype(np.float32)  # (S,)


def _key_padding_mask(lengths: torch.Tensor, size: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive attention mask (B, 1, 1, T): 0 on valid frames, dtype-min on padding."""
    valid = torch.arange(size, device=lengths.device)[None, :] < lengths[:, None]  # (B, T)
    mask = torch.zeros(valid.shape, dtype=dtype, device=lengths.device)
    mask.masked_fill_(~valid, torch.finfo(dtype).min)
    return mask[:, None, None, :]


class LayerSelector(nn.Module):
    """Picks the encoder output: "last", one hidden state by index, or a learned weighted sum.

    Hidden states are numbered as transformers does: 0 is the embedding output, L the last layer
    (after the final norm where the encoder has one). Only "weighted" has parameters.
    """

    def __init__(self, layer: str | int, num_layers: int) -> None:
        super().__init__()
        count = num_layers + 1
        if isinstance(layer, bool) or not (layer in ("last", "weighted") or isinstance(layer, int)):
            raise ValueError(f"encoder layer must be 'last', 'weighted' or an int, got {layer!r}")
        if isinstance(layer, int) and not -count <= layer < count:
            raise ValueError(f"encoder layer index {layer} out of range for {count} hidden states")
        self.layer = layer
        self.num_states = count
        self.weights = nn.Parameter(torch.zeros(count)) if layer == "weighted" else None

    @property
    def deepest_needed(self) -> int:
        """Index of the deepest hidden state needed, so shallower choices stop early."""
        if isinstance(self.layer, int):
            return self.layer % self.num_states
        return self.num_states - 1

    def combine(self, states: list[torch.Tensor]) -> torch.Tensor:
        """states: hidden states 0..deepest_needed, each (B, T, D_enc) -> (B, T, D_enc)."""
        if self.weights is None:
            return states[self.deepest_needed]
        w = torch.softmax(self.weights, dim=0).to(states[0].dtype)
        return torch.einsum("l,lbtd->btd", w, torch.stack(states))  # (L+1, B, T, D) -> (B, T, D)


class SpeechEncoder(nn.Module):
    """A frozen transformers speech encoder plus the choice of layer.

    forward(features, lengths) -> frames (B, T, D_enc), frame_lengths (B,).
    The network stays frozen and in eval mode; only a weighted layer sum (if chosen) trains.
    With `pad_to_30s` the features are a full 30 s window whose padding is attended to, as in
    Whisper's pre-training; the output is still cut to the clip's own frames.
    """

    def __init__(self, model: nn.Module, spec: FrameSpec, layer: str | int = "last", pad_to_30s: bool = False) -> None:
        super().__init__()
        if pad_to_30s and spec.kind != "whisper":
            raise ValueError("pad_to_30s applies only to Whisper encoders")
        self.spec = spec
        self.pad_to_30s = pad_to_30s
        self.network = model
        self.select = LayerSelector(layer, spec.num_layers)
        for p in self.network.parameters():
            p.requires_grad_(False)
        self.network.eval()

    @property
    def hidden_size(self) -> int:
        return self.spec.hidden_size

    def train(self, mode: bool = True) -> SpeechEncoder:
        super().train(mode)
        self.network.eval()  # frozen: dropout and layer drop stay off
        return self

    def num_frames(self, num_samples: int) -> int:
        return num_frames(self.spec, num_samples)

    def forward(self, features: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        grad = any(p.requires_grad for p in self.network.parameters())
        with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
            if self.spec.kind == "whisper":
                states, frame_lengths = self._whisper_states(features, lengths)
            else:
                states, frame_lengths = self._wav2vec2_states(features, lengths)
        frames = self.select.combine(states)
        if self.pad_to_30s:
            frames = frames[:, : int(frame_lengths.max())]  # (B, 1500, D) -> (B, T, D): the clips' own frames
        return frames, frame_lengths

    def _whisper_states(self, mel: torch.Tensor, mel_lengths: torch.Tensor):
        """mel (B, C, T_mel) -> hidden states [(B, T, D_enc)], frame lengths (B,)."""
        enc = self.network
        dtype = enc.conv1.weight.dtype
        mel = mel.to(dtype)
        t_mel = mel.shape[-1]
        frame_lengths = conv_lengths(self.spec, mel_lengths)
        if self.pad_to_30s:
            mel_lengths = torch.full_like(mel_lengths, t_mel)  # attend to the padding, as pre-trained
        mel_valid = (torch.arange(t_mel, device=mel.device)[None, :] < mel_lengths[:, None]).to(dtype)
        x = nn.functional.gelu(enc.conv1(mel)) * mel_valid[:, None, :]  # (B, D, T_mel), zero past the clip
        x = nn.functional.gelu(enc.conv2(x))  # (B, D, T)
        x = x.permute(0, 2, 1)  # (B, T, D)
        t = x.shape[1]
        if t > enc.embed_positions.weight.shape[0]:
            raise ValueError(f"{t} encoder frames exceed Whisper's {enc.embed_positions.weight.shape[0]}")
        x = x + enc.embed_positions.weight[:t]
        mask = _key_padding_mask(conv_lengths(self.spec, mel_lengths), t, x.dtype)
        states = [x]
        deepest = self.select.deepest_needed
        for i, layer in enumerate(enc.layers):
            if i >= deepest:
                break
            out = layer(x, mask)
            x = out[0] if isinstance(out, tuple) else out
            states.append(x)
        if deepest == len(enc.layers):
            states[-1] = enc.layer_norm(x)
        return states, frame_lengths

    def _wav2vec2_states(self, values: torch.Tensor, lengths: torch.Tensor):
        """values (B, S) -> hidden states [(B, T, D_enc)], frame lengths (B,)."""
        net = self.network
        attention = (torch.arange(values.shape[1], device=values.device)[None, :] < lengths[:, None]).long()
        out = net(values.to(next(net.parameters()).dtype), attention_mask=attention, output_hidden_states=True)
        states = list(out.hidden_states)
        frame_lengths = conv_lengths(self.spec, lengths)
        return states[: self.select.deepest_needed + 1], frame_lengths


def whisper_encoder_of(model: nn.Module) -> nn.Module:
    """The encoder stack of a transformers Whisper model (any head) or the encoder itself."""
    if hasattr(model, "get_encoder"):
        return model.get_encoder()
    if hasattr(model, "conv1") and hasattr(model, "layers"):
        return model
    raise ValueError(f"{type(model).__name__} is not a Whisper model or encoder")


def build_speech_encoder(model: nn.Module, layer: str | int = "last", pad_to_30s: bool = False) -> SpeechEncoder:
    """Wrap a loaded transformers speech model (Whisper or wav2vec2 family) as a frozen encoder."""
    spec = frame_spec_from_config(model.config)
    network = whisper_encoder_of(model) if spec.kind == "whisper" else model
    return SpeechEncoder(network, spec, layer, pad_to_30s)
