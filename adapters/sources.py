"""Where base weights come from: a hub id, a local transformers folder, a CTranslate2 Whisper folder, a GGUF file.

CTranslate2 (faster-whisper) Whisper folders are converted once into a transformers folder in the eardrum
cache; GGUF files are read (and dequantised) by transformers itself.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import save_file
from transformers import (
    AutoConfig,
    AutoFeatureExtractor,
    AutoModel,
    AutoModelForCausalLM,
    AutoTokenizer,
    BitsAndBytesConfig,
    FeatureExtractionMixin,
    GenerationConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    WhisperFeatureExtractor,
    WhisperForConditionalGeneration,
    WhisperTokenizer,
)

from .ct2 import (
    WHISPER_SPEC,
    CT2FormatError,
    WhisperLayout,
    ct2_spec_name,
    ct2_whisper_state_dict,
    is_ct2_whisper_folder,
    read_ct2_model,
    whisper_config,
)
from .placement import QUANTIZATIONS

__all__ = [
    "QUANTIZATIONS",
    "CT2FormatError",
    "SourceError",
    "SourceNotFoundError",
    "UnknownQuantizationError",
    "convert_ct2_whisper",
    "default_cache_dir",
    "describe_source",
    "is_ct2_whisper_folder",
    "load_causal_lm",
    "load_speech_model",
    "read_ct2_model",
]

logger = logging.getLogger(__name__)

SourceKind = Literal["ct2_whisper", "gguf", "local", "hub", "tiny"]
TINY_PREFIX = "tiny:"  # "tiny:whisper", "tiny:llama", ...: tiny random bases written once into the cache
TINY_VERSION = 3
# Bump when the converted folder's layout changes, so that stale caches are rebuilt rather than reused.
CONVERTER_VERSION = 2
_HASHED_FILES = ("model.bin", "config.json", "tokenizer.json")
_MEL_FRAMES_PER_SECOND = 50  # encoder positions per second of audio: 100 mel frames, conv stride 2
_LANGUAGE_TOKEN = re.compile(r"^<\|[a-z]{2,3}\|>$")


class SourceError(ValueError):
    """A model source or a loading option that cannot be used."""


class SourceNotFoundError(SourceError):
    """A source that names a local path (not a hub id) does not exist."""


class UnknownQuantizationError(SourceError):
    """A quantization setting other than those in `QUANTIZATIONS`."""


def default_cache_dir() -> Path:
    """The eardrum cache: `$EARDRUM_CACHE`, else `~/.cache/eardrum`."""
    return Path(os.environ.get("EARDRUM_CACHE") or "~/.cache/eardrum").expanduser()


def _looks_like_path(source: str) -> bool:
    """True for what can only be a local path; `org/name` stays a hub id even though it has a slash."""
    return (
        source.startswith(("/", ".", "~"))
        or (os.sep != "/" and os.sep in source)
        or source.count("/") > 1
        or source.lower().endswith(".gguf")
    )


def tiny_source_path(source: str, cache_dir: str | Path | None = None) -> Path:
    """The folder of a `tiny:NAME` source, written (atomically, once) from `eardrum.adapters.tiny`."""
    from .tiny import TINY_BASES, save_tiny_bases

    name = source.removeprefix(TINY_PREFIX)
    if name not in TINY_BASES:
        raise SourceError(
            f"source {source!r}: unknown tiny model; expected one of {', '.join(TINY_PREFIX + n for n in TINY_BASES)}"
        )
    root = Path(cache_dir) if cache_dir else default_cache_dir()
    final = root / "tiny" / f"v{TINY_VERSION}"
    if not (final / name / "config.json").is_file():
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tiny-", dir=final.parent))
        save_tiny_bases(tmp)
        try:
            os.replace(tmp, final)
        except OSError:  # another process finished first; its folder is identical
            shutil.rmtree(tmp, ignore_errors=True)
    return final / name


def _existing_path(source: str) -> Path | None:
    """The local path `source` names, None for a hub id; a path-like source that is missing is an error."""
    if source.startswith(TINY_PREFIX):
        return tiny_source_path(source)
    path = Path(source).expanduser()
    if path.exists():
        return path
    if _looks_like_path(source):
        raise SourceNotFoundError(
            f"source {source!r}: no such file or folder ({path.absolute()}); expected a local path "
            "or a hub id like 'org/name'"
        )
    return None


def describe_source(source: str) -> SourceKind:
    """Says what kind of source `source` is: "ct2_whisper", "gguf", "local" or "hub".

    Raises:
        SourceNotFoundError: `source` looks like a local path but does not exist.
    """
    if source.startswith(TINY_PREFIX):
        return "tiny"
    path = _existing_path(source)
    if path is None:
        return "hub"
    if path.is_file() and path.suffix.lower() == ".gguf":
        return "gguf"
    return "ct2_whisper" if is_ct2_whisper_folder(path) else "local"


def _content_hash(folder: Path) -> str:
    digest = hashlib.sha256(f"ct2-whisper converter {CONVERTER_VERSION}\n".encode())
    for name in _HASHED_FILES:
        file = folder / name
        if file.is_file():
            digest.update(f"{name}\n".encode())
            with file.open("rb") as handle:
                while block := handle.read(1 << 22):
                    digest.update(block)
    return digest.hexdigest()[:32]


def convert_ct2_whisper(folder: str | Path, cache_dir: str | Path | None = None) -> Path:
    """Converts a CTranslate2 (faster-whisper) Whisper folder into a transformers Whisper folder, once.

    The result holds `config.json`, `generation_config.json` and `model.safetensors` (float32, fp16
    weights widened) for `WhisperForConditionalGeneration`, the tokenizer files, and a
    `preprocessor_config.json` for `WhisperFeatureExtractor`. It is written to a temporary folder and
    renamed into `<cache_dir>/ct2-whisper/<hash>`, the hash taken over `model.bin`, `config.json` and
    `tokenizer.json`; a later call with the same files returns that folder without converting again.

    Args:
        folder: holds `model.bin` and `tokenizer.json`, and usually CTranslate2's `config.json`
            (suppressed tokens, alignment heads, used for the generation config).
        cache_dir: the cache root; defaults to `default_cache_dir()`.

    Returns:
        The converted folder.

    Raises:
        CT2FormatError: a file is missing or malformed, the model is not a Whisper, or a variable is
            unknown or has an unexpected shape (named in the message).
    """
    folder = Path(folder).expanduser()
    for required in ("model.bin", "tokenizer.json"):
        if not (folder / required).is_file():
            raise CT2FormatError(f"{folder}: no {required}; expected a CTranslate2 Whisper folder")
    spec = ct2_spec_name(folder / "model.bin")
    if spec is not None and spec != WHISPER_SPEC:
        raise CT2FormatError(f"{folder / 'model.bin'}: holds a CTranslate2 {spec}; expected {WHISPER_SPEC}")
    target = Path(cache_dir or default_cache_dir()).expanduser() / "ct2-whisper" / _content_hash(folder)
    if target.is_dir():
        logger.info("CTranslate2 Whisper %s: using its converted copy %s", folder, target)
        return target
    logger.info("CTranslate2 Whisper %s: converting to transformers in %s", folder, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        _write_transformers_folder(folder, staging)
        try:
            os.rename(staging, target)
        except OSError:
            # Another process finished the same conversion first: its copy is complete, keep it.
            if not target.is_dir():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _write_transformers_folder(folder: Path, out: Path) -> None:
    model_bin = folder / "model.bin"
    variables = read_ct2_model(model_bin)  # its errors name the file already
    try:
        state, layout = ct2_whisper_state_dict(variables)
    except CT2FormatError as error:
        raise CT2FormatError(f"{model_bin}: {error}") from error
    ct2_config = _read_json(folder / "config.json") if (folder / "config.json").is_file() else {}
    tokenizer = WhisperTokenizer(tokenizer_file=str(folder / "tokenizer.json"))
    tokens = _special_token_ids(tokenizer, folder / "tokenizer.json")
    config = whisper_config(
        layout,
        bos_token_id=tokens["eot"],
        eos_token_id=tokens["eot"],
        pad_token_id=tokens["eot"],
        decoder_start_token_id=tokens["sot"],
        suppress_tokens=list(ct2_config.get("suppress_ids") or []),
        begin_suppress_tokens=list(ct2_config.get("suppress_ids_begin") or []),
    )
    if layout.tied_projection:
        del state["proj_out.weight"]  # transformers ties it to the decoder embeddings when loading
    seconds, remainder = divmod(layout.max_source_positions, _MEL_FRAMES_PER_SECOND)
    if remainder:
        raise CT2FormatError(
            f"{model_bin}: {layout.max_source_positions} encoder positions is not a whole number of "
            f"seconds at {_MEL_FRAMES_PER_SECOND} positions per second"
        )
    config.save_pretrained(out)
    _generation_config(layout, tokens, ct2_config, tokenizer.get_vocab()).save_pretrained(out)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save_pretrained(out)
    WhisperFeatureExtractor(feature_size=layout.num_mel_bins, chunk_length=seconds).save_pretrained(out)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CT2FormatError(f"{path}: cannot read it as JSON: {error}") from error


def _special_token_ids(tokenizer: WhisperTokenizer, path: Path) -> dict[str, int | None]:
    names = {
        "eot": "<|endoftext|>",
        "sot": "<|startoftranscript|>",
        "no_timestamps": "<|notimestamps|>",
        "sot_prev": "<|startofprev|>",
        "transcribe": "<|transcribe|>",
        "translate": "<|translate|>",
    }
    vocab = tokenizer.get_vocab()
    ids = {key: vocab.get(token) for key, token in names.items()}
    for key in ("eot", "sot"):
        if ids[key] is None:
            raise CT2FormatError(f"{path}: has no {names[key]} token; expected a Whisper tokenizer")
    return ids


def _generation_config(
    layout: WhisperLayout, tokens: dict[str, int | None], ct2_config: dict, vocab: dict[str, int]
) -> GenerationConfig:
    config = GenerationConfig(
        decoder_start_token_id=tokens["sot"],
        bos_token_id=tokens["eot"],
        eos_token_id=tokens["eot"],
        pad_token_id=tokens["eot"],
        max_length=layout.max_target_positions,
        suppress_tokens=list(ct2_config.get("suppress_ids") or []),
        begin_suppress_tokens=list(ct2_config.get("suppress_ids_begin") or []),
    )
    # Whisper's own rule: multilingual checkpoints have the larger vocabulary.
    config.is_multilingual = layout.vocab_size >= 51865
    config.no_timestamps_token_id = tokens["no_timestamps"]
    config.prev_sot_token_id = tokens["sot_prev"]
    config.return_timestamps = False
    if ct2_config.get("alignment_heads"):
        config.alignment_heads = [list(pair) for pair in ct2_config["alignment_heads"]]
    if config.is_multilingual:
        config.lang_to_id = {t: i for t, i in vocab.items() if _LANGUAGE_TOKEN.match(t)}
        config.task_to_id = {"transcribe": tokens["transcribe"], "translate": tokens["translate"]}
        # Without a task in the prompt a multilingual Whisper runs on into repetitions; callers may override.
        config.task = "transcribe"
    return config


def load_speech_model(
    source: str, *, cache_dir: str | Path | None = None, dtype: torch.dtype = torch.float32
) -> tuple[PreTrainedModel, FeatureExtractionMixin]:
    """Loads a speech encoder's model and feature extractor from any source.

    Whisper comes back as the whole `WhisperForConditionalGeneration` (its encoder is
    `model.get_encoder()`, the decoder stays available for reference transcripts); wav2vec2, HuBERT,
    WavLM and other encoders come back from `AutoModel`. The model is in eval mode.

    Args:
        source: a hub id, a local transformers folder, or a CTranslate2 Whisper folder (converted once
            with `convert_ct2_whisper`).
        cache_dir: where CTranslate2 conversions are kept; defaults to `default_cache_dir()`.
        dtype: the parameter dtype.

    Returns:
        The model and its `AutoFeatureExtractor`.

    Raises:
        SourceNotFoundError: `source` looks like a local path but does not exist.
        CT2FormatError: a CTranslate2 folder cannot be converted.
    """
    path = _existing_path(source)
    location = str(path) if path is not None else source
    # A transformers folder never holds model.bin; the converter reads its header and says what it found.
    if path is not None and path.is_dir() and (path / "model.bin").is_file():
        location = str(convert_ct2_whisper(path, cache_dir))
    config = AutoConfig.from_pretrained(location)
    model_class = WhisperForConditionalGeneration if config.model_type == "whisper" else AutoModel
    model = model_class.from_pretrained(location, dtype=dtype).eval()
    feature_extractor = AutoFeatureExtractor.from_pretrained(location)
    logger.info(
        "speech model %s: %s, %.1fM parameters, %s, from %s",
        source,
        type(model).__name__,
        model.num_parameters() / 1e6,
        dtype,
        location,
    )
    return model, feature_extractor


def _quantization_config(quantization: str | None) -> BitsAndBytesConfig | None:
    if quantization not in QUANTIZATIONS:
        raise UnknownQuantizationError(
            f"quantization={quantization!r}; expected one of {', '.join(map(repr, QUANTIZATIONS))}"
        )
    if quantization is None:
        return None
    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16 if torch.cuda.is_available() else torch.float32,
    )


def _resolve_llm_source(source: str, gguf_file: str | None) -> tuple[str, str | None]:
    """(folder or hub id, GGUF file name) for `from_pretrained`."""
    path = _existing_path(source)
    if path is None:
        return source, gguf_file
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise SourceError(f"source {source!r} is a file; expected a folder or a .gguf file")
        if gguf_file is not None and gguf_file != path.name:
            raise SourceError(f"source {source!r} is a GGUF file already; gguf_file={gguf_file!r} conflicts")
        return str(path.parent), path.name
    if gguf_file is not None and not (path / gguf_file).is_file():
        raise SourceNotFoundError(f"gguf_file={gguf_file!r}: not found in {path}")
    return str(path), gguf_file


def convert_gguf(path: str | Path, cache_dir: str | Path | None = None) -> Path:
    """Dequantise a GGUF causal LM once into a transformers folder in the cache (keyed by content hash)."""
    path = Path(path)
    digest = hashlib.sha256(f"gguf converter 1\n{path.name}\n".encode())
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    root = Path(cache_dir) if cache_dir else default_cache_dir()
    final = root / "gguf" / f"{path.stem}-{digest.hexdigest()[:16]}"
    if (final / "config.json").is_file():
        return final
    from safetensors.torch import save_model

    logger.info("converting %s once into %s", path, final)
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    loaded = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config)  # a GGUF-loaded model refuses save_pretrained
    plain.load_state_dict(loaded.state_dict())
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".gguf-", dir=final.parent))
    plain.config.save_pretrained(tmp)
    plain.generation_config.save_pretrained(tmp)
    save_model(plain, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save_pretrained(str(tmp))
    try:
        os.replace(tmp, final)
    except OSError:  # another process converted it first
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def load_causal_lm(
    source: str,
    *,
    gguf_file: str | None = None,
    quantization: str | None = None,
    dtype: torch.dtype | None = None,
    trust_remote_code: bool = False,
    device: str | torch.device | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Loads a causal language model and its tokenizer from any source.

    Args:
        source: a hub id, a local transformers folder, or a `.gguf` file path (transformers dequantises
            it; the tokenizer comes from the same file).
        gguf_file: a GGUF file name inside the folder or hub repository `source`.
        quantization: None, "4bit" (NF4, double quantisation, bf16 compute on CUDA, else float32) or
            "8bit", through bitsandbytes.
        dtype: the parameter dtype; None lets transformers choose.
        trust_remote_code: allow code from the model repository to run.
        device: where a quantized model is placed as it loads (bitsandbytes weights cannot move later);
            None: bitsandbytes' default, the current CUDA device where there is one. An unquantized model
            loads on the CPU whatever `device` says; the caller moves it.

    Returns:
        The model (eval mode) and its tokenizer.

    Raises:
        UnknownQuantizationError: `quantization` is not one of `QUANTIZATIONS`.
        SourceNotFoundError: `source` looks like a local path but does not exist.
        SourceError: quantization was asked for a GGUF file, `gguf_file` contradicts `source`, or
            `source` is a file other than a GGUF.
    """
    quantization_config = _quantization_config(quantization)
    location, gguf_file = _resolve_llm_source(source, gguf_file)
    if gguf_file is not None:
        # Dequantising a GGUF takes tens of seconds on a CPU: do it once into a cached transformers folder,
        # which also lets the model be loaded in 4/8 bit like any other folder.
        location, gguf_file = str(convert_gguf(Path(location) / gguf_file)), None
    common: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    tokenizer = AutoTokenizer.from_pretrained(location, **common)
    options = dict(common)
    if dtype is not None:
        options["dtype"] = dtype
    if quantization_config is not None:
        options["quantization_config"] = quantization_config
        if device is not None:
            options["device_map"] = {"": torch.device(device)}
    model = AutoModelForCausalLM.from_pretrained(location, **options).eval()
    logger.info(
        "causal LM %s: %s, %.1fM parameters, quantization %s, from %s%s",
        source,
        type(model).__name__,
        model.num_parameters() / 1e6,
        quantization,
        location,
        f" (GGUF {gguf_file})" if gguf_file else "",
    )
    return model, tokenizer
