"""The settings of an audio LLM, and the one function that counts audio tokens.

`AudioLLMConfig` is what a user writes (in YAML or Python) and what a checkpoint stores.
`num_audio_tokens` is the only place the number of audio tokens of a clip is computed; the
processor, the model's merge check, the batching code and the benchmarks all call it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from .audio import SAMPLING_RATE
from .encoders import FrameSpec, num_frames
from .projectors import ProjectorConfig, ProjectorConfigError, projector_num_tokens

LABEL_MODES = ("all_assistant", "last_assistant", "after_audio")


class ConfigError(ValueError):
    """A configuration with one or more problems; the message lists all of them."""


@dataclass(frozen=True)
class AudioLLMConfig:
    """Everything needed to rebuild an audio LLM, apart from trained weights."""

    encoder: str  # hub id, local transformers folder, or faster-whisper/CTranslate2 folder
    llm: str  # hub id, local transformers folder, or a .gguf file
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)
    encoder_layer: str | int = "last"  # "last", a hidden-state index, or "weighted" (learned sum)
    pad_to_30s: bool = False  # Whisper only: encode every clip in a padded 30 s window, as pre-trained
    placeholder: str = "<|audio|>"  # one per audio token in input_ids; added to the tokenizer if missing
    audio_begin: str | None = None  # optional text written before each clip's tokens, e.g. "<audio>"
    audio_end: str | None = None  # optional text written after each clip's tokens
    window_seconds: float | None = None  # long audio is cut into windows this long; None = the encoder's limit
    window_overlap_seconds: float = 0.0  # overlap between consecutive windows
    time_markers: bool = False  # write "[mm:ss]" before each window of a long recording
    max_audio_seconds: float | None = None  # longer clips are an error; None = no limit
    label_mode: str = "all_assistant"  # which tokens carry loss; see LABEL_MODES
    trust_remote_code: bool = False
    transcript_hint: bool = False  # Whisper only: its decoder's transcript follows each window's tokens (transcribe.py)
    transcript_language: str | None = None  # the hint's language for a multilingual Whisper ("en"); None: detected
    # A window whose no-speech probability (Whisper's own, read before its first word) is above this gets the
    # hint "nothing" instead of what the decoder invents for silence and noise ("you"); None: every window decoded
    transcript_no_speech: float | None = None

    def __post_init__(self) -> None:
        if isinstance(self.projector, dict):
            object.__setattr__(self, "projector", ProjectorConfig.from_dict(self.projector))

    def problems(self) -> list[str]:
        """Every problem with these settings (empty when valid)."""
        out = []
        for name in ("encoder", "llm", "placeholder"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                out.append(f"{name}: expected a non-empty string, got {getattr(self, name)!r}")
        layer = self.encoder_layer
        if isinstance(layer, bool) or not (layer in ("last", "weighted") or isinstance(layer, int)):
            out.append(f"encoder_layer: expected 'last', 'weighted' or an int, got {layer!r}")
        if self.window_seconds is not None and not self.window_seconds > 0:
            out.append(f"window_seconds: expected a positive number or null, got {self.window_seconds!r}")
        if not 0 <= self.window_overlap_seconds < (self.window_seconds or float("inf")):
            out.append(
                f"window_overlap_seconds: expected 0 <= overlap < window_seconds, got {self.window_overlap_seconds!r}"
            )
        if self.max_audio_seconds is not None and not self.max_audio_seconds > 0:
            out.append(f"max_audio_seconds: expected a positive number or null, got {self.max_audio_seconds!r}")
        for name in ("pad_to_30s", "time_markers", "trust_remote_code", "transcript_hint"):
            if not isinstance(getattr(self, name), bool):
                out.append(f"{name}: expected true or false, got {getattr(self, name)!r}")
        language = self.transcript_language
        if language is not None and not (isinstance(language, str) and language.strip() and self.transcript_hint):
            out.append(f"transcript_language: expected a language such as 'en' for the transcript hints (with "
                       f"transcript_hint: true), or null, got {language!r}")
        gate = self.transcript_no_speech
        if gate is not None and not (isinstance(gate, (int, float)) and not isinstance(gate, bool) and 0 < gate < 1
                                     and self.transcript_hint):
            out.append(f"transcript_no_speech: expected a probability between 0 and 1 (with transcript_hint: true), "
                       f"or null, got {gate!r}")
        if self.label_mode not in LABEL_MODES:
            out.append(f"label_mode: expected one of {', '.join(LABEL_MODES)}, got {self.label_mode!r}")
        try:
            self.projector.validate()
        except ProjectorConfigError as err:
            out.append(f"projector: {err}")
        return out

    def validate(self) -> None:
        """Raise `ConfigError` listing every problem at once."""
        problems = self.problems()
        if problems:
            raise ConfigError("invalid audio LLM config:\n  - " + "\n  - ".join(problems))

    def to_dict(self) -> dict:
        data = asdict(self)
        data["projector"] = self.projector.to_dict()
        return data

    @classmethod
    def from_dict(cls, data: dict) -> AudioLLMConfig:
        """Build from a dict; unknown keys are an error naming them."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown audio LLM config keys {unknown}; known keys are {sorted(known)}")
        return cls(**data)


def load_config_file(path: str | Path) -> AudioLLMConfig:
    """Read an `AudioLLMConfig` from the `model:` section of a YAML file, validated."""
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"{path}: cannot read YAML ({err})") from err
    if not isinstance(data, dict) or not isinstance(data.get("model"), dict):
        raise ConfigError(f"{path}: expected a mapping with a 'model:' section")
    try:
        config = AudioLLMConfig.from_dict(data["model"])
        config.validate()
    except (ConfigError, ProjectorConfigError, TypeError) as err:
        raise ConfigError(f"{path}: {err}") from err
    return config


def window_samples(config: AudioLLMConfig, spec: FrameSpec) -> int:
    """Length in samples of one encoder window for long audio."""
    if config.window_seconds is None:
        return spec.max_samples or 30 * SAMPLING_RATE
    samples = int(round(config.window_seconds * SAMPLING_RATE))
    if spec.max_samples is not None and samples > spec.max_samples:
        raise ConfigError(
            f"window_seconds={config.window_seconds} is longer than the encoder's limit of "
            f"{spec.max_samples / SAMPLING_RATE:g} s"
        )
    return samples


def plan_windows(num_samples: int, window: int, overlap: int = 0) -> list[tuple[int, int]]:
    """Split [0, num_samples) into windows of at most `window` samples overlapping by `overlap`.

    The last window ends exactly at num_samples; nothing is dropped.
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    if not 0 <= overlap < window:
        raise ValueError(f"overlap must satisfy 0 <= overlap < window, got overlap={overlap}, window={window}")
    spans, start = [], 0
    while True:
        end = min(start + window, num_samples)
        spans.append((start, end))
        if end == num_samples:
            return spans
        start = end - overlap


def num_audio_tokens(num_samples: int, spec: FrameSpec, projector: ProjectorConfig) -> int:
    """Audio tokens one encoder window of `num_samples` samples yields: frames, then projector rate."""
    return projector_num_tokens(projector, num_frames(spec, num_samples))
