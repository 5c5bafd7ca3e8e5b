"""Training recipes: YAML files with dotted command-line overrides, checked before anything loads.

    eardrum train configs/tiny.yaml output_dir=runs/t1 optim.lr=3e-4 data.batch_size=4

A recipe has the sections below; every problem in a file (unknown keys at any depth, values of the
wrong type, invalid settings) is reported together, naming the file and the dotted key.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from eardrum.adapters.config import AudioLLMConfig, ConfigError
from eardrum.adapters.sources import QUANTIZATIONS
from eardrum.common.generation import MAX_TRAIN_SEED

from .trackers import tracker_problems

SCHEDULERS = ("cosine", "linear", "constant")
PRECISIONS = ("no", "bf16", "fp16", "auto")


@dataclass(frozen=True)
class LoraSettings:
    enabled: bool = False  # LoRA on the LLM (stage 2); off = the LLM stays frozen (stage 1)
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] | None = None  # None: the attention and MLP projections found by name in the LLM
    encoder: bool = False  # also LoRA on the speech encoder (disables the feature cache)
    encoder_target_modules: list[str] | None = None  # None: the encoder's attention projections


@dataclass(frozen=True)
class DataSettings:
    train: list[dict] = field(default_factory=list)  # data sources (see eardrum.common.records.DataSource)
    eval: list[dict] = field(default_factory=list)
    prompts: dict[str, list[str]] | None = None  # per task ("asr", "caption"): phrasings drawn per example
    batch_size: int | None = 8  # examples per batch, or null with max_tokens
    max_tokens: int | None = None  # padded tokens per batch (a token budget) instead of batch_size
    group_by_length: bool = True
    packing: bool = False  # each batch as one row, no padding (max_tokens then caps the summed lengths)
    skip_bad: bool = False  # skip bad examples (listed in output_dir/bad_examples.jsonl) instead of stopping
    shuffle_buffer: int = 1000  # streamed sources: rows of one source shuffled together
    group_buffer: int = 1000  # streamed sources: mixed examples length-grouped together


@dataclass(frozen=True)
class CacheSettings:
    enabled: bool = True  # store frozen-encoder outputs on disk and reuse them
    dir: str | None = None  # default: $EARDRUM_CACHE/features or ~/.cache/eardrum/features
    dtype: str = "float32"  # float32 is exact; float16/bfloat16 halve the disk


@dataclass(frozen=True)
class OptimSettings:
    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    warmup_steps: int = 0
    scheduler: str = "cosine"  # cosine | linear | constant, after warmup
    min_lr_ratio: float = 0.0  # final lr as a fraction of lr (cosine, linear)
    grad_clip: float | None = 1.0
    grad_accum: int = 1


@dataclass(frozen=True)
class TrainSettings:
    epochs: int | None = None  # passes over the data; null: 1, or for streamed sources as many as max_steps takes
    max_steps: int | None = None  # stop after this many optimizer steps
    seed: int = 0
    ctc_weight: float = 0.0  # > 0: add this x the CTC loss of audio tokens against the transcript (`AudioLLM.forward`)
    mixed_precision: str = "no"  # no | bf16 | fp16 (GPU) | auto: bf16 where it is fast, else no
    quantization: str | None = None  # null | 4bit | 8bit: load the LLM quantized (QLoRA)
    gradient_checkpointing: bool = False
    compile: bool = False  # compile the LLM's decoder layers, one at a time (training/compiling.py)
    share_prefix: bool = True  # the text all rows of a batch begin with runs once (`AudioLLM.forward`): same loss
    log_every: int = 10
    eval_every: int | None = None  # optimizer steps between evaluations; null = at the end only
    save_every: int | None = None  # optimizer steps between checkpoints; null = at the end only
    keep_checkpoints: int = 2
    resume_from: str | None = None  # "latest" or a checkpoint folder
    overwrite: bool = False  # a fresh run into a folder holding an earlier run clears it first (else: refused)
    init_from: str | None = None  # start from a saved eardrum model: a folder (e.g. stage 1) or Hub id org/name[@rev]
    report_to: list[str] = field(default_factory=list)  # trackers through accelerate: tensorboard, wandb, mlflow, ...
    tracker_project: str = "eardrum"  # the W&B project, MLflow experiment, ... the run logs into
    tensorboard: bool = False  # the same as report_to: [tensorboard]
    log_examples: bool = False  # write output_dir/examples-rank{R}.jsonl: which examples each rank saw per step
    eval_max_new_tokens: int = 48
    eval_generate_limit: int = 64  # eval examples decoded for WER / accuracy


@dataclass(frozen=True)
class DistillSettings:
    """Text-teacher distillation (see eardrum.training.distill.teacher_kl), for records with a `transcript`."""

    kl_weight: float = 0.0  # > 0: add KL(base LLM on the transcript as text || model on the audio) per answer token
    ce_weight: float = 1.0  # the usual next-token loss, on every example
    temperature: float = 1.0


@dataclass(frozen=True)
class Recipe:
    model: AudioLLMConfig
    output_dir: str
    data: DataSettings = field(default_factory=DataSettings)
    lora: LoraSettings = field(default_factory=LoraSettings)
    cache: CacheSettings = field(default_factory=CacheSettings)
    optim: OptimSettings = field(default_factory=OptimSettings)
    train: TrainSettings = field(default_factory=TrainSettings)
    distill: DistillSettings = field(default_factory=DistillSettings)

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["model"] = self.model.to_dict()
        return data


SECTIONS = {
    "data": DataSettings,
    "lora": LoraSettings,
    "cache": CacheSettings,
    "optim": OptimSettings,
    "train": TrainSettings,
    "distill": DistillSettings,
}


def parse_overrides(overrides: list[str]) -> list[tuple[list[str], Any]]:
    """`a.b=value` strings -> (["a", "b"], value); values are read as YAML scalars (3e-4, true, null, [1, 2])."""
    out = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override {item!r}: expected key.sub=value")
        try:
            value = yaml.safe_load(raw) if raw else ""
        except yaml.YAMLError as err:
            raise ConfigError(f"override {item!r}: the value is not valid YAML ({err})") from err
        out.append((key.split("."), value))
    return out


def apply_overrides(data: dict, overrides: list[tuple[list[str], Any]]) -> dict:
    """Set each dotted key in a nested dict (creating sections as needed); a number indexes a list."""
    for keys, value in overrides:
        node: Any = data
        for depth, key in enumerate(keys):
            last = depth == len(keys) - 1
            if isinstance(node, list):
                if not key.isdigit() or int(key) >= len(node):
                    raise ConfigError(f"override {'.'.join(keys)}: {key!r} is not an index of a {len(node)}-item list")
                key = int(key)
            elif not isinstance(node, dict):
                raise ConfigError(f"override {'.'.join(keys)}: {'.'.join(keys[:depth])} is not a section")
            if last:
                node[key] = value
            else:
                if isinstance(node, dict) and not isinstance(node.get(key), (dict, list)):
                    node[key] = {}
                node = node[key]
    return data


def _type_ok(value: Any, annotation: Any) -> bool:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, arg) for arg in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin is not None:
        return isinstance(value, origin)
    return isinstance(value, annotation) if isinstance(annotation, type) else True


_FLOAT = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


def _as_float(value: Any) -> Any:
    """Ints and numeric strings to float: YAML 1.1 reads `3e-4` (no dot) as a string."""
    if isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str) and _FLOAT.match(value.strip()):
        return float(value)
    return value


def _type_name(annotation: Any) -> str:
    """`float | None` -> "float or null", for messages people read."""
    args = typing.get_args(annotation) if typing.get_origin(annotation) in (typing.Union, types.UnionType) else ()
    names = [_type_name(a) for a in args] if args else [getattr(annotation, "__name__", str(annotation))]
    return " or ".join("null" if n == "NoneType" else n for n in names)


def _section(cls: type, data: Any, prefix: str, problems: list[str]) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        problems.append(f"{prefix}: expected a mapping, got {type(data).__name__}")
        return cls()
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    for key in sorted(set(data) - known):
        problems.append(f"{prefix}.{key}: unknown key (known: {', '.join(sorted(known))})")
    kwargs = {}
    for key in known & set(data):
        value = data[key]
        if hints[key] in (float, float | None):
            value = _as_float(value)
        if not _type_ok(value, hints[key]):
            problems.append(f"{prefix}.{key}: expected {_type_name(hints[key])}, got {value!r}")
            continue
        kwargs[key] = value
    return cls(**kwargs)


def _check(recipe: Recipe) -> list[str]:
    out = []
    d, o, t = recipe.data, recipe.optim, recipe.train
    if (d.batch_size is None) == (d.max_tokens is None):
        out.append("data: set exactly one of batch_size and max_tokens")
    for name in ("batch_size", "max_tokens"):
        if getattr(d, name) is not None and getattr(d, name) < 1:
            out.append(f"data.{name}: expected a positive integer, got {getattr(d, name)}")
    if not d.train:
        out.append("data.train: expected at least one data source")
    if d.packing and recipe.distill.kl_weight > 0:
        out.append("data.packing: packed rows cannot carry the text teacher; set distill.kl_weight: 0 or packing off")
    if d.packing and t.ctc_weight > 0:
        out.append("data.packing: packed rows cannot carry the CTC targets; set train.ctc_weight: 0 or packing off")
    if t.compile and t.quantization:
        out.append("train.compile: bitsandbytes' quantized layers do not compile; set train.compile: false or "
                   "train.quantization: null")
    for name in ("shuffle_buffer", "group_buffer"):
        if getattr(d, name) < 1:
            out.append(f"data.{name}: expected >= 1, got {getattr(d, name)}")
    if streams(d.train):
        if t.max_steps is None:
            out.append("train.max_steps: a streamed training source (streaming: true) has no known length; "
                       "set the number of optimizer steps")
        if recipe.cache.enabled:
            out.append("cache.enabled: the feature cache is filled from every example before training, and a "
                       "streamed source is read as training goes; set cache.enabled: false")
    if o.scheduler not in SCHEDULERS:
        out.append(f"optim.scheduler: expected one of {', '.join(SCHEDULERS)}, got {o.scheduler!r}")
    if not o.lr > 0:
        out.append(f"optim.lr: expected a positive number, got {o.lr}")
    if o.grad_accum < 1:
        out.append(f"optim.grad_accum: expected >= 1, got {o.grad_accum}")
    if len(o.betas) != 2:
        out.append(f"optim.betas: expected two numbers, got {o.betas}")
    if t.mixed_precision not in PRECISIONS:
        out.append(f"train.mixed_precision: expected one of {', '.join(PRECISIONS)}, got {t.mixed_precision!r}")
    if t.quantization not in QUANTIZATIONS:
        out.append(f"train.quantization: expected null, 4bit or 8bit, got {t.quantization!r}")
    if t.quantization and not recipe.lora.enabled:
        out.append("train.quantization: a quantized LLM is trained through LoRA; set lora.enabled: true")
    if not t.ctc_weight >= 0:
        out.append(f"train.ctc_weight: expected a number >= 0, got {t.ctc_weight}")
    if not 0 <= t.seed <= MAX_TRAIN_SEED:
        out.append(f"train.seed: expected an integer from 0 to 2**32 - 1 (numpy's seed range), got {t.seed}")
    for name in ("epochs", "log_every", "keep_checkpoints"):
        if getattr(t, name) is not None and getattr(t, name) < 1:
            out.append(f"train.{name}: expected >= 1, got {getattr(t, name)}")
    out += tracker_problems(t.report_to, t.tensorboard)
    k = recipe.distill
    for name in ("kl_weight", "ce_weight"):
        if not getattr(k, name) >= 0:
            out.append(f"distill.{name}: expected a number >= 0, got {getattr(k, name)}")
    if k.kl_weight == 0 and k.ce_weight == 0:
        out.append("distill: kl_weight and ce_weight are both 0; nothing would be learnt")
    if not k.temperature > 0:
        out.append(f"distill.temperature: expected a positive number, got {k.temperature}")
    if recipe.cache.dtype not in ("float32", "float16", "bfloat16"):
        out.append(f"cache.dtype: expected float32, float16 or bfloat16, got {recipe.cache.dtype!r}")
    return out


def streams(sources: list[dict]) -> bool:
    """True when some training source says `streaming: true` (then every training source is read as a stream)."""
    return any(isinstance(s, dict) and s.get("streaming") is True for s in sources)


def recipe_from_dict(data: dict, where: str = "recipe") -> Recipe:
    """Build and check a Recipe from nested dicts; raises ConfigError listing every problem."""
    problems: list[str] = []
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping at the top level")
    known = {"model", "output_dir", *SECTIONS}
    problems += [
        f"{key}: unknown top-level key (known: {', '.join(sorted(known))})" for key in sorted(set(data) - known)
    ]
    model = None
    try:
        model = AudioLLMConfig.from_dict(data.get("model") or {})
        problems += [f"model.{p}" for p in model.problems()]
    except (ConfigError, TypeError) as err:
        problems.append(f"model: {err}")
    sections = {name: _section(cls, data.get(name), name, problems) for name, cls in SECTIONS.items()}
    output_dir = data.get("output_dir")
    if not isinstance(output_dir, str) or not output_dir:
        problems.append(f"output_dir: expected a folder path, got {output_dir!r}")
    if model is not None:
        recipe = Recipe(model=model, output_dir=output_dir if isinstance(output_dir, str) else "", **sections)
        problems += _check(recipe)
        if not problems:
            return recipe
    raise ConfigError(f"{where}: {len(problems)} problem(s):\n  - " + "\n  - ".join(problems))


def resolve_recipe_path(name: str | Path) -> Path:
    """A recipe file: a path that exists, or the name of a recipe shipped in eardrum.configs ("demo")."""
    path = Path(name)
    if path.is_file():
        return path
    from importlib.resources import files

    shipped = files("eardrum.configs")
    for candidate in (str(name), f"{name}.yaml"):
        resource = shipped / candidate
        if resource.is_file():
            return Path(str(resource))
    names = sorted(p.name.removesuffix(".yaml") for p in shipped.iterdir() if p.name.endswith(".yaml"))
    raise ConfigError(f"recipe {str(name)!r}: no such file, and not a shipped recipe ({', '.join(names)})")


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read a recipe YAML (a path or a shipped recipe's name), apply `key.sub=value` overrides, check it all."""
    path = resolve_recipe_path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"{path}: cannot read the recipe ({err})") from err
    data = apply_overrides(data if isinstance(data, dict) else {}, parse_overrides(overrides or []))
    return recipe_from_dict(data, str(path))


def save_recipe(recipe: Recipe, path: str | Path) -> None:
    """Write the resolved recipe (after overrides) so a run records exactly what it ran."""
    Path(path).write_text(yaml.safe_dump(recipe.to_dict(), sort_keys=False))
