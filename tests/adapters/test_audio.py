"""Tests for eardrum.adapters.audio: formats, resampling, downmixing, and every error with its message."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from eardrum.adapters.audio import (
    SAMPLING_RATE,
    AudioDecodeError,
    AudioError,
    AudioNotFoundError,
    AudioTooLongError,
    EmptyAudioError,
    InvalidAudioError,
    audio_duration,
    load_audio,
)

MP3_WRITABLE = "MP3" in sf.available_formats()


def sine(freq: float, rate: int, frames: int, amplitude: float = 0.5) -> np.ndarray:
    return (amplitude * np.sin(2 * np.pi * freq * np.arange(frames) / rate)).astype(np.float32)


def peak_hz(wave: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(wave))
    return float(np.argmax(spectrum)) * rate / len(wave)


def encode(data: np.ndarray, rate: int, fmt: str, subtype: str | None = None) -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, data, rate, format=fmt, subtype=subtype)
    return buffer.getvalue()


# --- formats and resampling -------------------------------------------------------------------


def test_stereo_44k1_becomes_16k_mono_with_exact_length_and_same_frequency(tmp_path: Path) -> None:
    frames = 22_087  # not a multiple of 44100/16000's reduced ratio (441/160)
    left = sine(1000, 44_100, frames)
    path = tmp_path / "stereo.wav"
    sf.write(path, np.stack([left, left], axis=1), 44_100, subtype="FLOAT")

    wave = load_audio(path)

    # soxr's output length is n * out / in rounded half up.
    assert wave.shape == (8013,)
    assert wave.shape[0] == int(np.floor(frames * SAMPLING_RATE / 44_100 + 0.5))
    assert wave.dtype == np.float32
    assert abs(peak_hz(wave, SAMPLING_RATE) - 1000) <= SAMPLING_RATE / len(wave)


@pytest.mark.parametrize("subtype", ["PCM_16", "FLOAT"])
@pytest.mark.parametrize("rate", [16_000, 44_100])
def test_path_bytes_and_array_give_identical_waves_for_wav(tmp_path: Path, subtype: str, rate: int) -> None:
    rng = np.random.default_rng(0)
    pcm = rng.integers(-32768, 32767, size=(4000, 2), dtype=np.int16)
    data = pcm if subtype == "PCM_16" else pcm.astype(np.float32) / 32768
    path = tmp_path / "clip.wav"
    sf.write(path, data, rate, subtype=subtype)

    from_path = load_audio(path)
    from_str = load_audio(str(path))
    from_bytes = load_audio(path.read_bytes())
    from_array = load_audio((data, rate))

    np.testing.assert_array_equal(from_path, from_bytes)
    np.testing.assert_array_equal(from_path, from_str)
    np.testing.assert_array_equal(from_path, from_array)


@pytest.mark.parametrize(
    ("fmt", "subtype", "exact"),
    [
        ("WAV", "PCM_16", True),
        ("WAV", "FLOAT", True),
        ("FLAC", "PCM_16", True),
        ("OGG", "VORBIS", False),
        pytest.param(
            "MP3",
            "MPEG_LAYER_III",
            False,
            marks=pytest.mark.skipif(not MP3_WRITABLE, reason="this libsndfile cannot write MP3"),
        ),
    ],
)
def test_each_format_decodes_to_the_written_tone(tmp_path: Path, fmt: str, subtype: str, exact: bool) -> None:
    tone = sine(440, SAMPLING_RATE, SAMPLING_RATE)
    path = tmp_path / f"tone.{fmt.lower()}"
    sf.write(path, tone, SAMPLING_RATE, format=fmt, subtype=subtype)

    wave = load_audio(path)

    assert wave.shape == (SAMPLING_RATE,)
    assert wave.dtype == np.float32
    assert peak_hz(wave, SAMPLING_RATE) == 440.0
    if exact:
        np.testing.assert_allclose(wave, tone, atol=1 / 32768)


def test_stereo_is_averaged() -> None:
    x = sine(300, SAMPLING_RATE, 1000)
    np.testing.assert_array_equal(load_audio((np.stack([x, -x], axis=1), SAMPLING_RATE)), np.zeros(1000))
    np.testing.assert_array_equal(load_audio((np.stack([x, x], axis=1), SAMPLING_RATE)), x)


def test_integer_pcm_arrays_are_scaled_to_unit_range() -> None:
    ints = np.array([-32768, -16384, 0, 16384, 32767], dtype=np.int16)
    np.testing.assert_array_equal(
        load_audio((ints, SAMPLING_RATE)), np.array([-1, -0.5, 0, 0.5, 32767 / 32768], dtype=np.float32)
    )
    unsigned = np.array([0, 128, 255], dtype=np.uint8)
    np.testing.assert_array_equal(load_audio((unsigned, SAMPLING_RATE)), np.array([-1, 0, 127 / 128], dtype=np.float32))


def test_torch_tensor_equals_numpy_array() -> None:
    x = sine(500, 22_050, 3000)
    np.testing.assert_array_equal(load_audio((torch.from_numpy(x), 22_050)), load_audio((x, 22_050)))


def test_importing_the_module_does_not_import_torch() -> None:
    code = "import sys, eardrum.adapters.audio; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def test_silence_returns_zeros() -> None:
    wave = load_audio((np.zeros(4410, dtype=np.float32), 44_100))
    np.testing.assert_array_equal(wave, np.zeros(1600, dtype=np.float32))


def test_result_does_not_alias_the_input_array() -> None:
    x = sine(300, SAMPLING_RATE, 100)
    wave = load_audio((x, SAMPLING_RATE))
    wave[:] = 0
    assert x.any()


def test_dict_forms_match_plain_sources(tmp_path: Path) -> None:
    x = sine(700, 8000, 2000)
    path = tmp_path / "d.flac"
    sf.write(path, x, 8000, subtype="PCM_16")
    expected = load_audio(path)

    np.testing.assert_array_equal(load_audio({"path": str(path)}), expected)
    np.testing.assert_array_equal(load_audio({"bytes": path.read_bytes(), "path": None}), expected)
    np.testing.assert_array_equal(load_audio({"bytes": None, "path": str(path)}), expected)
    np.testing.assert_array_equal(
        load_audio({"array": expected, "sampling_rate": SAMPLING_RATE, "path": str(path)}), expected
    )


def test_audio_duration() -> None:
    assert audio_duration(24_000) == 1.5
    assert audio_duration(441, 44_100) == 0.01


# --- errors -----------------------------------------------------------------------------------


def test_every_error_is_an_audio_error_and_a_value_error() -> None:
    for cls in (AudioNotFoundError, AudioDecodeError, EmptyAudioError, InvalidAudioError, AudioTooLongError):
        assert issubclass(cls, AudioError)
        assert issubclass(cls, ValueError)


def test_missing_file_names_the_path(tmp_path: Path) -> None:
    path = tmp_path / "nowhere" / "missing.wav"
    with pytest.raises(AudioNotFoundError, match="no such file") as info:
        load_audio(path)
    assert str(path) in str(info.value)


def test_directory_is_not_an_audio_file(tmp_path: Path) -> None:
    with pytest.raises(AudioNotFoundError, match="not a regular file"):
        load_audio(tmp_path)


def test_text_file_named_wav_is_a_decode_error_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "notes.wav"
    path.write_text("these are not samples")
    with pytest.raises(AudioDecodeError, match="Format not recognised") as info:
        load_audio(path)
    assert str(path) in str(info.value)
    assert "expected a wav, flac, ogg or mp3 file" in str(info.value)


def test_garbage_bytes_are_a_decode_error_giving_their_size() -> None:
    with pytest.raises(AudioDecodeError, match=r"^<bytes, 5 bytes>: could not decode"):
        load_audio(b"hello")


def test_empty_wav_is_an_empty_audio_error(tmp_path: Path) -> None:
    path = tmp_path / "empty.wav"
    sf.write(path, np.zeros(0, dtype=np.float32), SAMPLING_RATE)
    with pytest.raises(EmptyAudioError, match="0 samples") as info:
        load_audio(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize(
    ("source", "message"),
    [
        (b"", r"<bytes, 0 bytes>: no data"),
        ((np.zeros(0, dtype=np.float32), SAMPLING_RATE), r"<array of shape \(0,\) at 16000 Hz>: 0 samples"),
        ((np.zeros(1, dtype=np.float32), 48_000), r"resample to 0 samples at 16000 Hz"),
    ],
)
def test_sources_with_no_samples_are_empty_audio_errors(source: object, message: str) -> None:
    with pytest.raises(EmptyAudioError, match=message):
        load_audio(source)


def test_zero_byte_file_is_an_empty_audio_error(tmp_path: Path) -> None:
    path = tmp_path / "zero.mp3"
    path.touch()
    with pytest.raises(EmptyAudioError, match="file is 0 bytes"):
        load_audio(path)


def test_nan_samples_are_invalid_and_located() -> None:
    x = np.zeros(10, dtype=np.float32)
    x[[3, 7]] = [np.nan, np.inf]
    with pytest.raises(InvalidAudioError, match=r"2 NaN/inf values \(first at sample 3\); expected finite"):
        load_audio((x, SAMPLING_RATE))


def test_nan_in_a_float_wav_is_invalid(tmp_path: Path) -> None:
    path = tmp_path / "nan.wav"
    sf.write(path, np.array([0, np.nan, 0], dtype=np.float32), SAMPLING_RATE, subtype="FLOAT")
    with pytest.raises(InvalidAudioError, match="NaN") as info:
        load_audio(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize(
    ("array", "rate", "message"),
    [
        (np.zeros((2, 3, 100), dtype=np.float32), SAMPLING_RATE, r"3-D array; expected 1-D .* or 2-D"),
        (np.zeros((2, 16_000), dtype=np.float32), SAMPLING_RATE, r"16000 channels.*pass array\.T"),
        (np.zeros(100, dtype=bool), SAMPLING_RATE, r"dtype bool; expected float or integer PCM"),
        (np.zeros(100, dtype=np.complex64), SAMPLING_RATE, r"dtype complex64"),
        (np.zeros(100, dtype=np.float32), 0, r"sampling rate 0; expected a positive integer"),
        (np.zeros(100, dtype=np.float32), -8000, r"at -8000 Hz>: sampling rate -8000"),
        (np.zeros(100, dtype=np.float32), 16_000.0, r"sampling rate 16000\.0; expected a positive integer"),
    ],
)
def test_bad_arrays_and_rates_are_invalid(array: np.ndarray, rate: object, message: str) -> None:
    with pytest.raises(InvalidAudioError, match=message):
        load_audio((array, rate))


def test_unknown_source_type_is_invalid() -> None:
    with pytest.raises(InvalidAudioError, match="got a int; expected a path, bytes"):
        load_audio(42)  # type: ignore[arg-type]


def test_dict_without_audio_is_invalid() -> None:
    with pytest.raises(InvalidAudioError, match=r"keys \['bytes', 'path'\] holds no audio"):
        load_audio({"bytes": None, "path": None})
    with pytest.raises(InvalidAudioError, match="'array' but no 'sampling_rate'"):
        load_audio({"array": np.zeros(10)})


def test_too_long_array_gives_duration_limit_and_setting() -> None:
    x = np.zeros(40_000, dtype=np.float32)
    with pytest.raises(AudioTooLongError) as info:
        load_audio((x, SAMPLING_RATE), max_seconds=2)
    message = str(info.value)
    assert "2.50 s long (40000 samples at 16000 Hz)" in message
    assert "limit of 2 s" in message
    assert "Raise max_seconds" in message


def test_exactly_max_seconds_is_accepted() -> None:
    assert load_audio((np.zeros(32_000, dtype=np.float32), SAMPLING_RATE), max_seconds=2).shape == (32_000,)


@pytest.mark.parametrize("as_bytes", [False, True])
def test_too_long_file_is_rejected_without_decoding(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, as_bytes: bool
) -> None:
    path = tmp_path / "long.flac"
    sf.write(path, np.zeros(3 * 8000, dtype=np.int16), 8000)

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("soundfile.read must not be called for an over-long file")

    monkeypatch.setattr(sf, "read", refuse)
    source = path.read_bytes() if as_bytes else path
    with pytest.raises(AssertionError):  # the patch is live: a file within the limit does reach read
        load_audio(source, max_seconds=5)
    with pytest.raises(AudioTooLongError, match=r"3\.00 s long \(24000 samples at 8000 Hz\).*limit of 1\.5 s"):
        load_audio(source, max_seconds=1.5)


def test_name_labels_every_kind_of_source(tmp_path: Path) -> None:
    label = "manifest.jsonl line 12"
    missing = tmp_path / "gone.wav"
    with pytest.raises(AudioNotFoundError, match=rf"^{label}: no such file"):
        load_audio(missing, name=label)
    with pytest.raises(AudioDecodeError, match=rf"^{label}: could not decode"):
        load_audio(b"junk", name=label)
    with pytest.raises(AudioTooLongError, match=rf"^{label}: 2\.00 s long"):
        load_audio((np.zeros(32_000), SAMPLING_RATE), max_seconds=1, name=label)


def test_dict_path_labels_errors_about_its_bytes() -> None:
    with pytest.raises(AudioDecodeError, match=r"^clips/a\.wav: could not decode"):
        load_audio({"bytes": b"junk", "path": "clips/a.wav"})


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"sampling_rate": 0}, "sampling_rate must be a positive integer"),
        ({"max_seconds": -1}, "max_seconds must be a positive number"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        load_audio((np.zeros(10), SAMPLING_RATE), **kwargs)
