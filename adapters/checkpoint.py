"""Build an `AudioLLM` from a config, save it as a small directory, load it back, export a merged LLM.

A checkpoint directory holds only what was trained plus what is needed to rebuild the rest:
    eardrum_config.json     the AudioLLMConfig, the encoder's frame spec, dimensions, versions
    projector.safetensors   the projector (and the encoder's layer weights, if learned)
    llm_adapter/            the LoRA adapter (peft, safetensors), when the LLM has one
    tokenizer + preprocessor files
Nothing of the frozen base encoder or LLM is written; they are loaded from their sources.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from . import __version__
from .config import AudioLLMConfig
from .encoders import AudioFeaturizer, FrameSpec, build_speech_encoder
from .model import AudioLLM
from .processor import AudioProcessor
from .projectors import build_projector
from .sources import load_causal_lm, load_speech_model
from .transcribe import build_transcriber

logger = logging.getLogger(__name__)

CONFIG_NAME = "eardrum_config.json"
WEIGHTS_NAME = "projector.safetensors"
ADAPTER_DIR = "llm_adapter"
ENCODER_ADAPTER = "encoder_adapter.safetensors"
ADAPTER_WEIGHTS = "adapter_model.safetensors"  # peft's name for the LoRA weights in ADAPTER_DIR
PICKLED_WEIGHTS = ("adapter_model.bin", "pytorch_model.bin")  # torch.load files: never read


class CheckpointError(ValueError):
    """A checkpoint directory that is missing files or does not match its base models."""


def build_audio_llm(
    config: AudioLLMConfig,
    *,
    quantization: str | None = None,
    dtype: torch.dtype | None = None,
    cache_dir: str | Path | None = None,
    device: str | torch.device | None = None,
) -> tuple[AudioLLM, AudioProcessor]:
    """Load the base encoder and LLM named by `config` and attach a freshly initialised projector.
    `device` places a quantized LLM as it loads (`sources.load_causal_lm`); the rest stays on the CPU."""
    config.validate()
    speech_model, feature_extractor = load_speech_model(config.encoder, cache_dir=cache_dir)
    encoder = build_speech_encoder(speech_model, config.encoder_layer, config.pad_to_30s)
    llm, tokenizer = load_causal_lm(
        config.llm, quantization=quantization, dtype=dtype, trust_remote_code=config.trust_remote_code, device=device
    )
    featurizer = AudioFeaturizer(feature_extractor, encoder.spec, config.pad_to_30s)
    processor = AudioProcessor(tokenizer, featurizer, config)
    d_llm = llm.get_input_embeddings().embedding_dim
    projector = build_projector(config.projector, encoder.hidden_size, d_llm)
    model = AudioLLM(config, encoder, projector, llm, processor.placeholder_id).eval()
    if config.transcript_hint:
        if encoder.spec.kind != "whisper":
            raise CheckpointError(
                f"transcript_hint needs a Whisper encoder with its decoder; {config.encoder} is a "
                f"{encoder.spec.kind} encoder. Set transcript_hint: false, or use a Whisper encoder"
            )
        model.transcriber = build_transcriber(speech_model, feature_extractor, config.transcript_language,
                                              config.transcript_no_speech).eval()
        processor.transcriber = model.transcriber
    counts = model.trainable_summary()
    logger.info(
        "built audio LLM: encoder %s (%d params, frozen), LLM %s (%d params), projector %s (%d params)",
        config.encoder,
        counts["encoder_total"],
        config.llm,
        counts["llm_total"],
        config.projector.name,
        counts["projector_total"],
    )
    return model, processor


def _trained_state(model: AudioLLM) -> dict[str, torch.Tensor]:
    state = {f"projector.{k}": v for k, v in model.projector.state_dict().items()}
    if model.encoder.select.weights is not None:
        state["encoder.select.weights"] = model.encoder.select.weights.detach()
    return {k: v.detach().cpu().contiguous() for k, v in state.items()}


def _versions() -> dict[str, str]:
    import peft
    import transformers

    return {
        "eardrum": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
    }


def save_pretrained(model: AudioLLM, directory: str | Path, processor: AudioProcessor) -> Path:
    """Write the checkpoint directory described in this module's docstring.

    Args:
        model: the audio LLM whose trained parts are written.
        directory: the folder to write (created if missing).
        processor: the model's processor; its tokenizer and feature extractor are written beside the weights.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    meta = {
        "config": model.config.to_dict(),
        "frame_spec": model.encoder.spec.to_dict(),
        "projector_input_dim": model.encoder.hidden_size,
        "llm_hidden_size": model.llm.get_input_embeddings().embedding_dim,
        "placeholder_id": model.placeholder_id,
        "has_lora": hasattr(model.llm, "peft_config"),
        "encoder_lora": _jsonable(getattr(model.encoder, "lora_config", None)),
        "versions": _versions(),
    }
    (directory / CONFIG_NAME).write_text(json.dumps(meta, indent=2) + "\n")
    save_file(_trained_state(model), str(directory / WEIGHTS_NAME), metadata={"format": "pt"})
    if meta["has_lora"]:
        # the LoRA weights only, never copies of the base embeddings (even when lm_head carries an adapter)
        model.llm.save_pretrained(str(directory / ADAPTER_DIR), safe_serialization=True, save_embedding_layers=False)
    if meta["encoder_lora"]:
        lora = {k: v.detach().cpu().contiguous() for k, v in model.encoder.network.state_dict().items() if "lora_" in k}
        save_file(lora, str(directory / ENCODER_ADAPTER), metadata={"format": "pt"})
    processor.tokenizer.save_pretrained(str(directory))
    processor.featurizer.feature_extractor.save_pretrained(str(directory))
    return directory


def _jsonable(value):
    """peft configs hold sets and enums; JSON wants lists and strings."""
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value.value if hasattr(value, "value") else value)


def checkpoint_folder(ref: str | Path, revision: str | None = None) -> Path:
    """The local folder of a checkpoint given as a folder or a Hub id `org/name[@revision]`
    (`eardrum.adapters.hub.resolve_checkpoint`: fetched once into the Hugging Face cache)."""
    from .hub import resolve_checkpoint

    return resolve_checkpoint(ref, revision)


def read_checkpoint_meta(directory: str | Path, revision: str | None = None) -> dict:
    """The parsed eardrum_config.json of a checkpoint (a folder or a Hub id, see `checkpoint_folder`).

    Raises:
        CheckpointError: the file is missing, is not JSON, or is not the object eardrum writes (a
            "config" object, a "frame_spec" object and an integer "placeholder_id"); the message names it.
    """
    directory = checkpoint_folder(directory, revision)
    path = directory / CONFIG_NAME
    if not path.is_file():
        raise CheckpointError(f"{directory} is not an eardrum checkpoint: {CONFIG_NAME} is missing")
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path}: not valid JSON ({err})") from err
    except OSError as err:
        raise CheckpointError(f"{path}: cannot be read ({err})") from err
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got a {type(meta).__name__}")
    wrong = [key for key, kind in (("config", dict), ("frame_spec", dict), ("placeholder_id", int))
             if not isinstance(meta.get(key), kind) or isinstance(meta.get(key), bool)]
    if wrong:
        raise CheckpointError(f"{path}: missing or malformed {wrong}; expected the object `save_pretrained` writes")
    return meta


def stored_config(meta: dict, path: Path) -> AudioLLMConfig:
    """The AudioLLMConfig stored in a checkpoint's meta, with errors naming the file."""
    try:
        return AudioLLMConfig.from_dict(meta["config"])
    except (ValueError, TypeError) as err:
        raise CheckpointError(f"{path}: its \"config\" is not a valid audio LLM config ({err})") from err


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file we wrote.

    Raises:
        CheckpointError: the file is missing, truncated, empty or not safetensors; the message names it.
    """
    if not path.is_file():
        raise CheckpointError(f"{path}: missing")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{path}: not a readable safetensors file ({err})") from err


def safetensors_shapes(path: Path) -> dict[str, list[int]]:
    """Each tensor's shape in a safetensors file, read from its header without loading the data.

    Raises:
        CheckpointError: the file is missing, truncated, empty or not safetensors; the message names it.
    """
    if not path.is_file():
        raise CheckpointError(f"{path}: missing")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {key: f.get_slice(key).get_shape() for key in f.keys()}  # a truncated file fails here
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{path}: not a readable safetensors file ({err})") from err


def check_adapter_dir(adapter_dir: Path) -> None:
    """Refuse a LoRA adapter folder peft would read through torch's unpickler, or whose weights are unreadable.

    Raises:
        CheckpointError: a pickled weights file (`adapter_model.bin`) is there, the safetensors weights
            are missing or corrupt, or `adapter_config.json` is not a JSON object.
    """
    pickled = [name for name in PICKLED_WEIGHTS if (adapter_dir / name).exists()]
    if pickled:
        raise CheckpointError(
            f"{adapter_dir / pickled[0]}: pickled weights are refused (loading them can run code); eardrum "
            f"reads only {ADAPTER_WEIGHTS}. Remove the file, or convert it where you trust its origin."
        )
    config = adapter_dir / "adapter_config.json"
    try:
        if not isinstance(json.loads(config.read_text()), dict):
            raise CheckpointError(f"{config}: expected a JSON object")
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{config}: missing or not valid JSON ({err})") from err
    safetensors_shapes(adapter_dir / ADAPTER_WEIGHTS)


def load_processor(directory: str | Path, revision: str | None = None) -> AudioProcessor:
    """Rebuild the processor of a checkpoint (a folder or a Hub id) without loading any model weights."""
    from transformers import AutoFeatureExtractor, AutoTokenizer

    directory = checkpoint_folder(directory, revision)
    meta = read_checkpoint_meta(directory)
    config = stored_config(meta, Path(directory) / CONFIG_NAME)
    tokenizer = AutoTokenizer.from_pretrained(str(directory))
    feature_extractor = AutoFeatureExtractor.from_pretrained(str(directory))
    featurizer = AudioFeaturizer(feature_extractor, FrameSpec.from_dict(meta["frame_spec"]), config.pad_to_30s)
    return AudioProcessor(tokenizer, featurizer, config)


def load_pretrained(
    directory: str | Path,
    *,
    quantization: str | None = None,
    dtype: torch.dtype | None = None,
    is_trainable: bool = False,
    cache_dir: str | Path | None = None,
    trust_remote_code: bool = False,
    device: str | torch.device | None = None,
    revision: str | None = None,
) -> tuple[AudioLLM, AudioProcessor]:
    """Rebuild the model of a checkpoint from its base sources and its trained weights.
    `directory` is a checkpoint folder or a Hub id `org/name[@revision]` (or with `revision=`), fetched once
    into the Hugging Face cache. `device` places a quantized LLM as it loads (`sources.load_causal_lm`).

    `trust_remote_code` lets the LLM's own Python code run; only the caller decides it. A checkpoint
    whose config says `"trust_remote_code": true` gets a warning and loads without it.

    Raises:
        CheckpointError: a file of the checkpoint is missing, corrupt, pickled, or does not match its base
            models; or a Hub id that cannot be fetched.
    """
    directory = checkpoint_folder(directory, revision)
    meta = read_checkpoint_meta(directory)
    config = stored_config(meta, directory / CONFIG_NAME)
    if config.trust_remote_code and not trust_remote_code:
        logger.warning("%s says trust_remote_code=true; ignored: remote code runs only when the caller asks for it "
                       "(trust_remote_code=True, or --trust-remote-code on the command line)", directory / CONFIG_NAME)
    config = dataclasses.replace(config, trust_remote_code=trust_remote_code)
    state = read_safetensors(directory / WEIGHTS_NAME)  # before the base models load: a bad file fails fast
    if meta.get("has_lora"):
        check_adapter_dir(directory / ADAPTER_DIR)
    model, _ = build_audio_llm(config, quantization=quantization, dtype=dtype, cache_dir=cache_dir, device=device)
    processor = load_processor(directory)
    processor.transcriber = model.transcriber
    if processor.placeholder_id != meta["placeholder_id"]:
        raise CheckpointError(
            f"{directory}: placeholder id {processor.placeholder_id} != saved {meta['placeholder_id']}"
        )
    if model.encoder.spec != FrameSpec.from_dict(meta["frame_spec"]):
        raise CheckpointError(f"{directory}: the encoder {config.encoder} no longer matches the saved frame spec")
    _load_trained_state(model, state, directory)
    if meta.get("encoder_lora"):
        _load_encoder_lora(model, meta["encoder_lora"], directory)
    if meta.get("has_lora"):
        from peft import PeftModel

        try:
            # check_adapter_dir left no pickled file for peft to fall back on
            model.llm = PeftModel.from_pretrained(model.llm, str(directory / ADAPTER_DIR), is_trainable=is_trainable)
        except (ValueError, KeyError, RuntimeError, OSError, SafetensorError) as err:
            raise CheckpointError(f"{directory / ADAPTER_DIR}: the LoRA adapter does not load ({err})") from err
    return model, processor


def _load_trained_state(model: AudioLLM, state: dict[str, torch.Tensor], directory: Path) -> None:
    projector_state = {k.removeprefix("projector."): v for k, v in state.items() if k.startswith("projector.")}
    missing, unexpected = model.projector.load_state_dict(projector_state, strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"{directory / WEIGHTS_NAME}: projector weights do not match the config "
            f"(missing {sorted(missing)}, unexpected {sorted(unexpected)})"
        )
    if "encoder.select.weights" in state:
        if model.encoder.select.weights is None:
            raise CheckpointError(f"{directory / WEIGHTS_NAME}: has layer weights but encoder_layer is not 'weighted'")
        with torch.no_grad():
            model.encoder.select.weights.copy_(state["encoder.select.weights"])


def _load_encoder_lora(model: AudioLLM, lora_config: dict, directory: Path) -> None:
    from peft import LoraConfig, inject_adapter_in_model

    known = set(LoraConfig.__dataclass_fields__)
    config = LoraConfig(**{k: v for k, v in lora_config.items() if k in known and k not in ("peft_type", "task_type")})
    inject_adapter_in_model(config, model.encoder.network)
    model.encoder.network.eval()
    model.encoder.lora_config = config.to_dict()
    state = read_safetensors(directory / ENCODER_ADAPTER)
    missing, unexpected = model.encoder.network.load_state_dict(state, strict=False)
    missing = [k for k in missing if "lora_" in k]
    if missing or unexpected:
        raise CheckpointError(
            f"{directory / ENCODER_ADAPTER}: encoder LoRA mismatch (missing {missing}, unexpected {sorted(unexpected)})"
        )
    for p in model.encoder.network.parameters():
        p.requires_grad_(False)


def merge_lora(directory: str | Path, out_dir: str | Path) -> Path:
    """Export the checkpoint's LLM with its LoRA merged in as a plain transformers folder."""
    from transformers import AutoModelForCausalLM

    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise CheckpointError(f"{out_dir}: exists and is not a folder; merge-lora writes a transformers folder there")
    directory = checkpoint_folder(directory)
    meta = read_checkpoint_meta(directory)
    if not meta.get("has_lora"):
        raise CheckpointError(f"{directory} has no LoRA adapter to merge")
    model, processor = load_pretrained(directory)
    merged = model.llm.merge_and_unload()
    # A base read from GGUF refuses save_pretrained; a plain model of the same config does not.
    config = merged.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config)
    plain.load_state_dict(merged.state_dict())
    plain.save_pretrained(str(out_dir), safe_serialization=True)
    processor.tokenizer.save_pretrained(str(out_dir))
    if not (out_dir / "config.json").is_file() or not list(out_dir.glob("*.safetensors")):
        raise CheckpointError(f"{out_dir}: the merged LLM was not written (no config.json or .safetensors there)")
    return out_dir
