"""Speak texts with the espeak-ng library, in a process of its own: `python -m eardrum.demo.espeak_worker`.

    python -m eardrum.demo.espeak_worker LIBRARY DATA_DIR VOICE WORDS_PER_MINUTE PITCH OUT_DIR < texts

Reads one text per line on stdin and writes `OUT_DIR/<n>.wav` (n from 0, the library's own rate,
22.05 kHz, PCM16) for each, then prints the number of files. The library and its voice data come
from the `espeakng-loader` wheel that the demo fetches from PyPI (`eardrum.demo.assets`), so every
machine speaks with the same voices whatever is installed system-wide. espeak-ng is GPL-3.0: the
library is only ever loaded here, in this separate process, never into eardrum's own.
"""

from __future__ import annotations

import ctypes
import sys
from pathlib import Path

import numpy as np
import soundfile as sf

_SYNCHRONOUS = 2  # espeak_AUDIO_OUTPUT: synthesise in the calling thread, samples through the callback
_RATE, _PITCH = 1, 3  # espeak_PARAMETER: words per minute; base pitch 0-100 (50 is the voice's own)
_CHARS_UTF8, _END_PAUSE = 1, 0x1000  # espeak_Synth flags: the text is UTF-8; pause at its end
_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)


def speak(library: str, data: str, voice: str, words_per_minute: int, pitch: int, texts: list[str], out: Path) -> int:
    """Write one wav per text into `out`; returns how many were written.

    Raises:
        RuntimeError: the library does not start, does not know `voice`, or fails on a text (named).
    """
    _, _, variant = voice.partition("+")
    if variant and not (Path(data) / "voices" / "!v" / variant).is_file():  # espeak-ng would fall back silently
        raise RuntimeError(f"espeak-ng has no voice variant {variant!r} in {data}/voices/!v")
    lib = ctypes.CDLL(library)
    rate = lib.espeak_Initialize(_SYNCHRONOUS, 0, data.encode(), 0)
    if rate <= 0:
        raise RuntimeError(f"espeak-ng ({library}) did not start with its data at {data}")
    chunks: list[np.ndarray] = []

    def collect(wav, count, events) -> int:
        if wav and count > 0:
            chunks.append(np.ctypeslib.as_array(wav, shape=(count,)).copy())
        return 0  # go on

    callback = _CALLBACK(collect)  # kept referenced for as long as the library may call it
    lib.espeak_SetSynthCallback(callback)
    if lib.espeak_SetVoiceByName(voice.encode()) != 0:
        raise RuntimeError(f"espeak-ng has no voice {voice!r} in {data}")
    lib.espeak_SetParameter(_RATE, words_per_minute, 0)
    lib.espeak_SetParameter(_PITCH, pitch, 0)
    for n, text in enumerate(texts):
        chunks.clear()
        raw = text.encode()
        status = lib.espeak_Synth(raw, len(raw) + 1, 0, 1, 0, _CHARS_UTF8 | _END_PAUSE, None, None)
        lib.espeak_Synchronize()
        if status != 0 or not chunks:
            raise RuntimeError(f"espeak-ng voice {voice!r} failed on text {n} ({text!r}): status {status}")
        sf.write(out / f"{n}.wav", np.concatenate(chunks), rate, subtype="PCM_16")
    return len(texts)


def main(argv: list[str]) -> int:
    """The command line above; errors end with one line on stderr and exit code 2."""
    if len(argv) != 6:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    library, data, voice, wpm, pitch, out = argv
    texts = [line for line in sys.stdin.read().split("\n") if line.strip()]
    try:
        print(speak(library, data, voice, int(wpm), int(pitch), texts, Path(out)))
    except (RuntimeError, OSError, ValueError) as err:
        print(f"espeak_worker: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
