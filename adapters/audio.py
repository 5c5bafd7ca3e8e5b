"""Load any audio source as a validated mono float32 wave at the encoders' sampling rate.

Every problem with an input raises a subclass of :class:`AudioError` whose message names the
source, says what was wrong and what was expected, so a bad line in a manifest of thousands can
be found and fixed from the message alone.

Array layout: a 1-D array is mono; a 2-D array is ``(samples, channels)``, the layout soundfile
returns. A 2-D array with more than ``MAX_ARRAY_CHANNELS`` columns and more columns than rows is
refused rather than guessed at: it is almost surely ``(channels, samples)`` (torchaudio's layout),
and the message says to pass ``array.T``.
"""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Callable, Mapping
from numbers import Integral, Real
from typing import Any, TypeAlias

import numpy as np
import soundfile as sf
import soxr

SAMPLING_RATE = 16_000
MAX_ARRAY_CHANNELS = 8

# A path, the encoded bytes of a file, (array, rate), or a datasets-style dict (see load_audio).
AudioSource: TypeAlias = str | os.PathLike | bytes | tuple[np.ndarray, int] | Mapping[str, Any]

_FORMATS = ("a wav, flac, ogg or mp3 file (any format libsndfile reads), or with PyAV installed (`pip install "
            "'eardrum[web]'`, FFmpeg bundled) webm/opus, m4a/aac and whatever else FFmpeg reads")


class AudioError(ValueError):
    """Base class of every error about an audio input."""


class AudioNotFoundError(AudioError):
    """The path does not exist or is not a file."""


class AudioDecodeError(AudioError):
    """The data is unreadable, corrupt or in a format libsndfile does not support."""


class EmptyAudioError(AudioError):
    """The audio has zero samples."""


class InvalidAudioError(AudioError):
    """NaN/inf samples, an unusable dtype or shape, a bad sample rate or an unknown source type."""


class AudioTooLongError(AudioError):
    """The audio is longer than the ``max_seconds`` limit."""


def audio_duration(num_samples: int, sampling_rate: int = SAMPLING_RATE) -> float:
    """Returns the duration in seconds of ``num_samples`` samples at ``sampling_rate`` Hz."""
    return num_samples / sampling_rate


def window_key(wave: np.ndarray) -> str:
    """Stable content hash (sha256 hex) of one audio window: its length and its float32 samples."""
    samples = np.ascontiguousarray(wave, dtype="<f4")  # the featurizer sees float32, so key on that
    if samples.ndim != 1:
        raise ValueError(f"window_key expects a 1-D waveform, got shape {samples.shape}")
    digest = hashlib.sha256(len(samples).to_bytes(8, "little"))
    digest.update(samples)
    return digest.hexdigest()


def load_audio(
    source: AudioSource,
    *,
    sampling_rate: int = SAMPLING_RATE,
    max_seconds: float | None = None,
    name: str | None = None,
) -> np.ndarray:
    """Loads, validates, downmixes and resamples one audio source.

    Args:
        source: A path; the encoded bytes of a file; an ``(array, rate)`` tuple whose array is a
            numpy array or torch tensor, 1-D or ``(samples, channels)``, float or integer PCM
            (integers are scaled to [-1, 1]); or a dict as ``datasets`` gives it:
            ``{"array", "sampling_rate"}``, ``{"bytes"}`` or ``{"path"}``.
        sampling_rate: Rate of the returned wave, in Hz.
        max_seconds: Longest accepted duration; ``None`` accepts any. Checked on the raw frame
            count before decoding (files) or resampling (arrays).
        name: Label for the source in error messages, e.g. ``"train.jsonl line 12"``.

    Returns:
        The wave, shape ``(T,)``, dtype float32, at ``sampling_rate`` Hz. Silence is returned as is.

    Raises:
        AudioError: One of its subclasses, for any problem with the source.
        ValueError: ``sampling_rate`` or ``max_seconds`` is not positive.
    """
    if isinstance(sampling_rate, bool) or not isinstance(sampling_rate, Integral) or sampling_rate <= 0:
        raise ValueError(f"sampling_rate must be a positive integer (Hz), got {sampling_rate!r}")
    if max_seconds is not None and not (isinstance(max_seconds, Real) and max_seconds > 0):
        raise ValueError(f"max_seconds must be a positive number of seconds or None, got {max_seconds!r}")

    if isinstance(source, Mapping):
        source, name = _unpack_dict(source, name)
    if isinstance(source, tuple):
        data, rate, label = _from_tuple(source, name)
    elif isinstance(source, (bytes, bytearray, memoryview)):
        blob = bytes(source)
        label = name or f"<bytes, {len(blob)} bytes>"
        if not blob:
            raise EmptyAudioError(f"{label}: no data; expected the encoded bytes of {_FORMATS}")
        data, rate = _read_encoded(lambda: io.BytesIO(blob), label, max_seconds)
    elif isinstance(source, (str, os.PathLike)):
        path = os.fsdecode(source)
        label = name or path
        _check_path(path, label)
        data, rate = _read_encoded(lambda: path, label, max_seconds)
    else:
        raise InvalidAudioError(
            f"{name or '<source>'}: got a {type(source).__name__}; expected a path, bytes, "
            "an (array, sampling_rate) tuple or a dict with 'array'+'sampling_rate', 'bytes' or 'path'"
        )

    _check_length(data.shape[0], rate, label, max_seconds)
    wave = _to_mono_float32(data, label)
    if rate == sampling_rate:
        return wave
    resampled = soxr.resample(wave, rate, sampling_rate, quality="HQ")
    if resampled.shape[0] == 0:
        # soxr rounds the output length, so a clip of a sample or two can vanish entirely.
        raise EmptyAudioError(
            f"{label}: {wave.shape[0]} samples at {rate} Hz resample to 0 samples at {sampling_rate} Hz; "
            "expected at least one output sample"
        )
    return np.ascontiguousarray(resampled, dtype=np.float32)


def _unpack_dict(source: Mapping[str, Any], name: str | None) -> tuple[Any, str | None]:
    """Turns a ``datasets``-style dict into a plain source; its path, if any, becomes the label."""
    path = source.get("path")
    name = name or (os.fsdecode(path) if path else None)
    if source.get("array") is not None:
        if "sampling_rate" not in source:
            raise InvalidAudioError(f"{name or '<dict>'}: dict has 'array' but no 'sampling_rate'; expected both")
        return (source["array"], source["sampling_rate"]), name
    # datasets stores {"bytes": ..., "path": ...} with either one None; bytes win when present.
    if source.get("bytes") is not None:
        return source["bytes"], name
    if path:
        return path, name
    raise InvalidAudioError(
        f"{name or '<dict>'}: dict with keys {sorted(source)} holds no audio; "
        "expected 'array' with 'sampling_rate', or 'bytes', or 'path'"
    )


def _from_tuple(source: tuple, name: str | None) -> tuple[np.ndarray, int, str]:
    """Validates an ``(array, rate)`` tuple; returns the array as ``(samples, channels)``."""
    if len(source) != 2:
        raise InvalidAudioError(f"{name or '<tuple>'}: tuple of length {len(source)}; expected (array, sampling_rate)")
    array, rate = source
    if type(array).__module__.startswith("torch"):
        # Checked by module name so torch is never imported here; bfloat16 has no numpy dtype.
        array = array.detach().cpu()
        array = (array.float() if array.is_floating_point() else array).numpy()
    array = np.asarray(array)
    label = name or f"<array of shape {array.shape} at {rate} Hz>"
    if isinstance(rate, bool) or not isinstance(rate, Integral) or rate <= 0:
        raise InvalidAudioError(f"{label}: sampling rate {rate!r}; expected a positive integer (Hz)")
    if array.dtype.kind not in "iuf":
        raise InvalidAudioError(f"{label}: dtype {array.dtype}; expected float or integer PCM samples")
    if array.ndim == 1:
        array = array[:, None]  # (T,) -> (T, 1)
    elif array.ndim != 2:
        raise InvalidAudioError(f"{label}: {array.ndim}-D array; expected 1-D (samples,) or 2-D (samples, channels)")
    elif array.shape[1] > MAX_ARRAY_CHANNELS and array.shape[1] > array.shape[0]:
        raise InvalidAudioError(
            f"{label}: read as (samples, channels) this has {array.shape[1]} channels; expected at most "
            f"{MAX_ARRAY_CHANNELS}. If the array is (channels, samples), pass array.T"
        )
    return array, int(rate), label


def _check_path(path: str, label: str) -> None:
    if not os.path.exists(path):
        where = "" if os.path.isabs(path) else f" (looked for {os.path.abspath(path)})"
        raise AudioNotFoundError(f"{label}: no such file{where}; expected a path to {_FORMATS}")
    if not os.path.isfile(path):
        raise AudioNotFoundError(f"{label}: not a regular file; expected a path to {_FORMATS}")
    if os.path.getsize(path) == 0:
        raise EmptyAudioError(f"{label}: file is 0 bytes; expected {_FORMATS}")


def _read_encoded(
    open_: Callable[[], str | io.BytesIO], label: str, max_seconds: float | None
) -> tuple[np.ndarray, int]:
    """Decodes a file; ``open_()`` gives a fresh path or file object for each pass over it.

    libsndfile first (wav, flac, ogg, mp3); what it does not know (the webm/opus and m4a that browsers and
    phones record) goes to FFmpeg through PyAV where that is installed. The header is read first so an
    over-long file is refused without decoding its samples.
    """
    try:
        info = sf.info(open_())
    except sf.SoundFileError as err:
        reason = _sndfile_reason(err)
        if not _has_pyav():
            raise AudioDecodeError(f"{label}: could not decode ({reason}); expected {_FORMATS}") from err
        return _read_with_pyav(open_, label, max_seconds, reason)
    _check_length(info.frames, info.samplerate, label, max_seconds)
    try:
        data, rate = sf.read(open_(), dtype="float32", always_2d=True)  # (T, C)
    except sf.SoundFileError as err:
        raise AudioDecodeError(f"{label}: could not decode ({_sndfile_reason(err)}); expected {_FORMATS}") from err
    return data, rate


def _sndfile_reason(err: sf.SoundFileError) -> str:
    return (getattr(err, "error_string", None) or str(err)).strip()


def _has_pyav() -> bool:
    import importlib.util

    return importlib.util.find_spec("av") is not None


def _read_with_pyav(
    open_: Callable[[], str | io.BytesIO], label: str, max_seconds: float | None, sndfile_reason: str
) -> tuple[np.ndarray, int]:
    """Decode the first audio stream with FFmpeg (PyAV): ``(T, C)`` float32 samples and their rate. A duration
    the container states is checked before decoding; the decoded length is checked again after. Where FFmpeg
    cannot read it either, the error gives both decoders' reasons (libsndfile's is `sndfile_reason`)."""
    import av

    try:
        with av.open(open_(), mode="r") as container:
            stream = next((s for s in container.streams if s.type == "audio"), None)
            if stream is None:
                raise AudioDecodeError(f"{label}: the file holds no audio stream; expected {_FORMATS}")
            stated = None if container.duration is None else container.duration / 1_000_000  # microseconds
            if stated is not None and max_seconds is not None and stated > max_seconds + 1:
                # the stated length is approximate: only one clearly over is refused before decoding
                rate = stream.rate or SAMPLING_RATE
                _check_length(round(stated * rate), rate, label, max_seconds)
            # planar float32, channels kept apart: (C, n) per frame
            resampler = av.AudioResampler(format="fltp", layout=None, rate=None)
            chunks, rate = [], None
            for frame in container.decode(stream):
                for out in resampler.resample(frame):
                    rate = out.sample_rate
                    chunks.append(out.to_ndarray())
            for out in resampler.resample(None):
                chunks.append(out.to_ndarray())
    except av.error.FFmpegError as err:
        reason = f"libsndfile: {sndfile_reason}; FFmpeg: {getattr(err, 'strerror', None) or err}"
        raise AudioDecodeError(f"{label}: could not decode ({reason}); expected {_FORMATS}") from err
    if not chunks or rate is None:
        raise EmptyAudioError(f"{label}: 0 samples; expected at least one (silence is fine, nothing is not)")
    data = np.concatenate(chunks, axis=1).T  # (T, C)
    return np.ascontiguousarray(data, dtype=np.float32), rate


def _check_length(frames: int, rate: int, label: str, max_seconds: float | None) -> None:
    if frames == 0:
        raise EmptyAudioError(f"{label}: 0 samples; expected at least one (silence is fine, nothing is not)")
    seconds = audio_duration(frames, rate)
    if max_seconds is not None and seconds > max_seconds:
        raise AudioTooLongError(
            f"{label}: {seconds:.2f} s long ({frames} samples at {rate} Hz), over the limit of "
            f"{max_seconds:g} s; expected at most {max_seconds:g} s. Raise max_seconds (or set it to "
            "None) to accept it, or cut the recording into shorter clips"
        )


def _to_mono_float32(data: np.ndarray, label: str) -> np.ndarray:
    """``(T, C)`` float or integer PCM -> finite float32 ``(T,)``, channels averaged."""
    if data.dtype.kind == "f":
        bad = ~np.isfinite(data)
        if bad.any():
            first = int(np.argwhere(bad)[0][0])
            raise InvalidAudioError(
                f"{label}: {int(bad.sum())} NaN/inf values (first at sample {first}); expected finite samples"
            )
        wave = data.astype(np.float32)
    else:
        # Full-scale integer PCM maps to [-1, 1), dividing by a power of two as libsndfile does,
        # so an int16 array equals the same samples read back from a 16-bit wav.
        half = float(2 ** (data.dtype.itemsize * 8 - 1))
        offset = half if data.dtype.kind == "u" else 0.0
        wave = (data.astype(np.float32) - np.float32(offset)) / np.float32(half)
    if wave.shape[1] == 1:
        return np.array(wave[:, 0], dtype=np.float32)  # a copy: never alias the caller's array
    return wave.mean(axis=1, dtype=np.float32)  # (T, C) -> (T,)
