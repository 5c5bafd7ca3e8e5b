"""`eardrum index` and `eardrum library` on a tiny random checkpoint: in process, and their user errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile as sf
import torch

from eardrum.adapters.checkpoint import build_audio_llm
from eardrum.adapters.config import AudioLLMConfig
from eardrum.adapters.tiny import synth_sound
from eardrum.cli import main as cli
from eardrum.inference.library import AudioLibrary, model_describer, search_terms


@pytest.fixture(scope="module")
def files(model_dirs, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("cli_library")
    torch.manual_seed(0)
    model, processor = build_audio_llm(AudioLLMConfig(encoder=model_dirs["whisper"], llm=model_dirs["llama"]))
    model.save_pretrained(root / "checkpoint", processor)
    (root / "recordings").mkdir()
    sf.write(root / "recordings" / "a.wav", np.tile(synth_sound(440.0, 2), 8), 16000, subtype="PCM_16")
    sf.write(root / "recordings" / "b.wav", synth_sound(1760.0, 1), 16000, subtype="PCM_16")
    (root / "recordings" / "broken.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEnot audio")
    return {"root": root, "model": root / "checkpoint", "recordings": root / "recordings", "built": (model, processor)}


def test_index_then_library_show_and_search_the_windows(files, capsys):
    lib = files["root"] / "lib.sqlite"
    code = cli.main(["index", str(files["recordings"]), "--model", str(files["model"]), "--library", str(lib),
                     "--window", "4", "--overlap", "1", "--device", "cpu"])
    out, err = capsys.readouterr()
    assert code == 0 and "3 files: 2 indexed, 0 unchanged, 0 removed, 1 skipped" in out
    assert "skipped" in err and "broken.wav" in err
    with AudioLibrary(lib) as library:
        windows = library.windows(files["recordings"] / "a.wav")
        assert [(a, b) for a, b, _ in windows][:2] == [(0.0, 4.0), (3.0, 7.0)]
        model, processor = files["built"]
        first = files["recordings"] / "a.wav"
        wave, _ = sf.read(first, dtype="float32")
        assert windows[0][2] == model_describer(model, processor)([wave[: 4 * 16000]])[0]  # the model's own text
        # a word the model wrote for b.wav but never for a.wav: its search must find b.wav's window first
        seen_in_a = {w for _, _, text in windows for w in search_terms(text).replace('"', "").split(" OR ")}
        b_text = library.windows(files["recordings"] / "b.wav")[0][2]
        word = next(w for w in search_terms(b_text).replace('"', "").split(" OR ") if w and w not in seen_in_a)
    assert cli.main(["library", str(lib), "--search", word, "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["files"] == 2 and shown["hits"][0]["path"] == str(files["recordings"] / "b.wav")
    assert cli.main(["library", str(lib)]) == 0
    assert "2 files" in capsys.readouterr().out
    assert cli.main(["index", str(files["recordings"]), "--model", str(files["model"]), "--library", str(lib),
                     "--device", "cpu"]) == 0
    assert "2 unchanged" in capsys.readouterr().out


@pytest.mark.parametrize("args,message", [
    (["library", "{root}/nope.sqlite"], "no such library file; make one with eardrum index"),
    (["index", "{root}/missing", "--model", "{model}", "--library", "{root}/x.sqlite"], "missing: no such file"),
    (["index", "{root}/recordings", "--model", "{root}/recordings", "--library", "{root}/y.sqlite"], "recordings"),
])
def test_user_errors_are_one_line_and_exit_2(files, capsys, args, message):
    code = cli.main([a.format(root=files["root"], model=files["model"]) for a in args])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_ask_and_chat_answer_from_a_library_naming_the_sources(files, capsys, monkeypatch):
    import io

    lib = files["root"] / "ask.sqlite"
    assert cli.main(["index", str(files["recordings"] / "b.wav"), "--model", str(files["model"]), "--library",
                     str(lib), "--device", "cpu"]) == 0
    capsys.readouterr()
    with AudioLibrary(lib) as library:
        word = search_terms(library.windows(files["recordings"] / "b.wav")[0][2]).split(" OR ")[0].strip('"')
    code = cli.main(["ask", "--model", str(files["model"]), "--library", str(lib), "--json", "--max-new-tokens", "2",
                     "--device", "cpu", f"what about {word}?"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0 and report["sources"] == [{"path": str(files["recordings"] / "b.wav"), "start": 0.0,
                                                "end": 1.0}]
    assert report["answer"].endswith("Sources: b.wav 00:00")
    monkeypatch.setattr("sys.stdin", io.StringIO(f"what about {word}?\nis there a violin?\n"))
    assert cli.main(["chat", "--model", str(files["model"]), "--library", str(lib), "--max-new-tokens", "2",
                     "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "Sources: b.wav 00:00" in out and "Nothing in the library matches this question" in out
    assert cli.main(["ask", "--model", str(files["model"]), "--library", str(files["root"] / "no.sqlite"), "hi"]) == 2
    assert "no.sqlite: no such library file" in capsys.readouterr().err
