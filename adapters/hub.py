"""Checkpoints on the Hugging Face Hub: load `org/name[@revision]` wherever a checkpoint folder is taken, and
publish a checkpoint folder with a generated model card.

    folder = resolve_checkpoint("org/name@v1")        # the cached snapshot's folder (downloaded once)
    plan = plan_push("runs/demo/stage2/final", "org/name", encoder="openai/whisper-tiny.en")
    print(plan.card); print(plan.files)              # what `eardrum push --dry-run` shows
    push_checkpoint(plan, private=True)             # creates the repository, uploads, returns the commit URL

Everything goes through `huggingface_hub`, so its cache (`HF_HOME`, `HF_HUB_CACHE`), `HF_HUB_OFFLINE` and
tokens (`HF_TOKEN`, `hf auth login`) work as users set them. Pickled files are never downloaded or uploaded.
A checkpoint names its frozen encoder and LLM by their sources (`eardrum.adapters.sources`); a checkpoint
trained on local base files is published only once those are named by Hub ids others can load.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

# Light on purpose: the command line checks a --model before torch is imported; the heavy parts import late.
CONFIG_NAME = "eardrum_config.json"  # = checkpoint.CONFIG_NAME (checked by a test)
TINY_PREFIX = "tiny:"  # = sources.TINY_PREFIX
HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9_.-]+$")
NEVER_TRANSFERRED = ["*.bin", "*.pt", "*.pth", "*.pkl", "*.pickle", "*.ckpt"]  # torch.load files can run code
CARD_NAME = "README.md"
LIBRARY_NAME = "eardrum"

_resolved: dict[tuple[str, str | None], Path] = {}


def _error(message: str):
    from .checkpoint import CheckpointError

    return CheckpointError(message)


def split_revision(ref: str) -> tuple[str, str | None]:
    """`"org/name@rev"` -> `("org/name", "rev")`; a ref without `@` has no revision."""
    name, sep, revision = ref.partition("@")
    return (name, revision) if sep and revision else (ref, None)


def is_hub_id(ref: str) -> bool:
    """True for `org/name` and `org/name@revision` (whether or not the repository exists)."""
    return bool(HUB_ID.match(split_revision(ref)[0]))


def resolve_checkpoint(ref: str | os.PathLike, revision: str | None = None) -> Path:
    """The local folder of a checkpoint named by a folder path or a Hub id.

    A path that exists is used as it is. Otherwise `ref` must be a Hub id (`org/name`, with `@revision` or
    `revision=`: a branch, tag or commit); its snapshot is fetched into the Hub cache once (offline: read
    from it), without pickled files, and its folder returned. Resolved ids are remembered for the process.

    Raises:
        CheckpointError: the folder is missing and `ref` is no Hub id; the repository, revision or cached
            copy cannot be had (the message says which, and what to set); it holds no eardrum checkpoint.
    """
    text = os.fspath(ref)
    path = Path(text).expanduser()
    if path.exists():
        if revision is not None:
            raise _error(f"{text}: a local folder has no revision (revision={revision!r} is for Hub ids)")
        if not path.is_dir():
            raise _error(f"{text}: is a file; expected a checkpoint folder or a Hub id 'org/name'")
        return path
    repo_id, at = split_revision(text)
    if revision is not None and at is not None and revision != at:
        raise _error(f"{text}: names revision {at!r}, but revision={revision!r} was given too")
    revision = revision or at
    if not HUB_ID.match(repo_id):
        raise _error(
            f"{text}: no such folder ({path.absolute()}); expected an eardrum checkpoint folder or a Hub id "
            "'org/name[@revision]'"
        )
    key = (repo_id, revision)
    if key not in _resolved:
        folder = _download(repo_id, revision, text)
        if not (folder / CONFIG_NAME).is_file():
            raise _error(
                f"{text}: the Hub repository {repo_id}{'@' + revision if revision else ''} holds no {CONFIG_NAME}; "
                "it is not an eardrum checkpoint"
            )
        _resolved[key] = folder
    return _resolved[key]


def _download(repo_id: str, revision: str | None, text: str) -> Path:
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    where = f"{repo_id}@{revision}" if revision else repo_id
    try:
        return Path(snapshot_download(repo_id, revision=revision, ignore_patterns=NEVER_TRANSFERRED,
                                      library_name=LIBRARY_NAME))
    except LocalEntryNotFoundError as err:
        offline = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else "the Hub could not be reached"
        raise _error(
            f"{text}: no such local folder, and {where} is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) "
            f"while {offline}; download it once with a connection, or give a checkpoint folder ({err})"
        ) from err
    except GatedRepoError as err:
        raise _error(f"{text}: {repo_id} is gated; accept its terms on the Hub and log in ({err})") from err
    except RevisionNotFoundError as err:
        raise _error(f"{text}: {repo_id} has no revision {revision!r} (a branch, tag or commit)") from err
    except RepositoryNotFoundError as err:
        raise _error(
            f"{text}: no such local folder, and no Hub model repository {repo_id} that this login can see "
            "(a private one needs a token: `hf auth login` or HF_TOKEN)"
        ) from err
    except (HfHubHTTPError, OSError, ValueError) as err:
        raise _error(f"{text}: {where} could not be fetched from the Hub ({err})") from err


# ----------------------------------------------------------------------------------------------- publishing
@dataclass
class PushPlan:
    """What `push_checkpoint` uploads: the card, the repository's file list, and where each file comes from."""

    model_dir: Path
    repo_id: str
    card: str
    config: dict  # the eardrum_config.json uploaded (the bases renamed where asked)
    sources: dict[str, Path] = field(default_factory=dict)  # path in the repository -> local file

    @property
    def files(self) -> list[str]:
        """The repository paths that would be uploaded, sorted."""
        return sorted([*self.sources, CONFIG_NAME, CARD_NAME])


def plan_push(
    model_dir: str | os.PathLike,
    repo_id: str,
    *,
    encoder: str | None = None,
    llm: str | None = None,
    license: str | None = None,
    allow_local_bases: bool = False,
) -> PushPlan:
    """Check a checkpoint folder and write what publishing it as `repo_id` would upload; nothing leaves the machine.

    Args:
        model_dir: a checkpoint folder written by `save_pretrained`.
        repo_id: the Hub repository, `org/name`.
        encoder, llm: Hub ids that name the frozen bases in the uploaded config, for a checkpoint trained on
            local copies of them (they must hold the same weights; the card says what they replaced).
        license: the licence of the trained weights, for the card's metadata (e.g. "apache-2.0").
        allow_local_bases: publish a config whose bases are local paths anyway (nobody else can load it).

    Raises:
        CheckpointError: the folder is no readable checkpoint, `repo_id` is no Hub id, or a base is a local
            path with neither a Hub id to replace it nor `allow_local_bases`.
    """
    from .checkpoint import read_checkpoint_meta, stored_config
    from .summary import describe_checkpoint

    model_dir = Path(model_dir)
    if not HUB_ID.match(repo_id):
        raise _error(f"repository {repo_id!r}: expected a Hub id 'org/name'")
    summary = describe_checkpoint(model_dir)  # refuses pickled or corrupt files, names them
    meta = read_checkpoint_meta(model_dir)
    config = dict(meta["config"])
    replaced: dict[str, tuple[str, str]] = {}
    for part, given in (("encoder", encoder), ("llm", llm)):
        source = config[part]
        if given is not None:
            if not HUB_ID.match(given):
                raise _error(f"--{part} {given!r}: expected a Hub id 'org/name' naming the same base weights")
            if given != source:
                replaced[part] = (source, given)
                config[part] = given
        elif _is_local(source) and not allow_local_bases:
            raise _error(
                f"{model_dir / CONFIG_NAME}: the {part} is the local {'file' if Path(source).is_file() else 'path'} "
                f"{source!r}, which nobody else can load; name the same weights on the Hub with --{part} ORG/NAME "
                f"(e.g. openai/whisper-tiny.en, HuggingFaceTB/SmolLM2-135M-Instruct), or pass --allow-local-bases"
            )
    meta = {**meta, "config": config}
    stored_config(meta, model_dir / CONFIG_NAME)  # the renamed config is still a valid one
    sources = {
        p.relative_to(model_dir).as_posix(): p
        for p in sorted(model_dir.rglob("*"))
        if p.is_file() and p.name not in (CONFIG_NAME, CARD_NAME)
    }
    card = model_card(summary, repo_id, config, replaced=replaced, license=license,
                      recipe=_nearby(model_dir, "recipe.yaml"), training=_nearby(model_dir, "summary.json"),
                      results=_nearby(model_dir, "results.md", levels=2))
    return PushPlan(model_dir, repo_id, card, meta, sources)


def _is_local(source: str) -> bool:
    from .sources import SourceError, describe_source

    if source.startswith(TINY_PREFIX):
        return False
    try:
        return describe_source(source) != "hub"
    except SourceError:  # a path that does not exist here either
        return True


def _nearby(model_dir: Path, name: str, levels: int = 1) -> Path | None:
    """`name` in the checkpoint folder or up to `levels` folders above it (a run's `final/` sits in its run)."""
    for folder in [model_dir, *list(model_dir.resolve().parents)[:levels]]:
        if (folder / name).is_file():
            return folder / name
    return None


def stage_push(plan: PushPlan, folder: str | os.PathLike) -> Path:
    """Write the files of `plan` into `folder` (links where the filesystem allows), card and config included."""
    folder = Path(folder)
    for name, source in plan.sources.items():
        target = folder / name
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(source, target)
        except OSError:
            shutil.copy2(source, target)
    (folder / CONFIG_NAME).write_text(json.dumps(plan.config, indent=2) + "\n")
    (folder / CARD_NAME).write_text(plan.card)
    return folder


def push_checkpoint(
    plan: PushPlan, *, private: bool = False, revision: str | None = None, commit_message: str | None = None
) -> str:
    """Create the repository if needed (and the branch `revision`), upload the plan's files in one commit.

    Returns:
        The URL of the commit.

    Raises:
        CheckpointError: the Hub refused (no token, no rights, a network failure); the message says which.
    """
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, LocalTokenNotFoundError

    api = HfApi(library_name=LIBRARY_NAME)
    try:
        api.create_repo(plan.repo_id, private=private, exist_ok=True)
        if revision:
            api.create_branch(plan.repo_id, branch=revision, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="eardrum-push-") as tmp:
            info = api.upload_folder(
                repo_id=plan.repo_id, folder_path=stage_push(plan, tmp), revision=revision,
                commit_message=commit_message or f"eardrum checkpoint from {plan.model_dir.name}",
                ignore_patterns=NEVER_TRANSFERRED,
            )
    except LocalTokenNotFoundError as err:
        raise _error(f"push to {plan.repo_id}: no Hub token; run `hf auth login` or set HF_TOKEN") from err
    except (HfHubHTTPError, OSError, ValueError) as err:
        raise _error(f"push to {plan.repo_id}: the Hub refused or could not be reached ({err})") from err
    return str(info.commit_url)


# ----------------------------------------------------------------------------------------------- the card
def base_licence(source: str) -> str | None:
    """The licence a base's own model card declares, read from the Hub cache or the Hub; None if unknown."""
    if source.startswith(TINY_PREFIX) or not HUB_ID.match(source):
        return None
    try:
        from huggingface_hub import constants, model_info, try_to_load_from_cache

        cached = try_to_load_from_cache(source, CARD_NAME)
        if isinstance(cached, str):
            found = _front_matter_licence(Path(cached).read_text(errors="replace"))
            if found:
                return found
        if constants.HF_HUB_OFFLINE:
            return None
        data = model_info(source).card_data
        return getattr(data, "license", None) if data is not None else None
    except Exception:  # noqa: BLE001 - a licence we cannot read is reported as unknown, never fatal
        return None


def _front_matter_licence(text: str) -> str | None:
    if not text.startswith("---"):
        return None
    head = text.split("---", 2)[1] if text.count("---") >= 2 else ""
    found = re.search(r"^license:\s*['\"]?([\w.+-]+)", head, re.MULTILINE)
    return found.group(1) if found else None


def model_card(
    summary: dict,
    repo_id: str,
    config: dict,
    *,
    replaced: dict[str, tuple[str, str]] | None = None,
    license: str | None = None,
    recipe: Path | None = None,
    training: Path | None = None,
    results: Path | None = None,
) -> str:
    """The README.md of a published checkpoint: metadata, how to use it, bases and their licences, projector,
    token rate, LoRA, the recipe it was trained with and the metrics its run measured.

    `summary` is `describe_checkpoint`'s; `config` the uploaded config (bases as published).
    """
    replaced = replaced or {}
    bases = [config["encoder"], config["llm"]]
    front = ["---", f"library_name: {LIBRARY_NAME}"]
    if license:
        front.append(f"license: {license}")
    hub_bases = [b for b in bases if HUB_ID.match(b)]
    if hub_bases:
        front += ["base_model:"] + [f"- {b}" for b in hub_bases]
    front += ["pipeline_tag: audio-text-to-text", "tags:", "- eardrum", "- audio", "- speech", "---", ""]
    proj, lora = summary["projector"], summary["lora"]
    lines = [
        f"# {repo_id.split('/')[-1]}",
        "",
        f"An audio adapter trained with eardrum: the frozen speech encoder "
        f"`{config['encoder']}` feeds a trained `{proj['name']}` projector whose audio tokens go into the prompt of "
        f"the LLM `{config['llm']}`{' with a LoRA adapter' if lora else ''}. Only the trained parts are here "
        "(a few MB); the bases load from their own repositories.",
        "",
        "## Use",
        "",
        "```python",
        "from eardrum.inference.chat import AudioChat",
        f'chat = AudioChat.from_pretrained("{repo_id}")',
        'print(chat.answer("clip.wav", "What is said in this recording?"))',
        "```",
        "",
        f'or `eardrum chat --model {repo_id} --audio clip.wav`. Pin a revision with '
        f'`"{repo_id}@REVISION"` or `revision=`.',
        "",
        "## Bases (frozen, not included; each under its own licence)",
        "",
        "| part | source | licence |",
        "|---|---|---|",
    ]
    for part, name in (("encoder", "speech encoder"), ("llm", "LLM")):
        source = config[part]
        found = base_licence(source)
        licence = found or (f"see https://huggingface.co/{source}" if HUB_ID.match(source) else "unknown")
        lines.append(f"| {name} | `{source}` | {licence} |")
    for part, (old, new) in replaced.items():
        lines.append("")
        lines.append(f"Trained on a local copy of the {part} (`{Path(old).name}`); published as `{new}`, which the "
                     "publisher states holds the same weights.")
    window = summary["windows"]
    lines += [
        "",
        "## Adapter",
        "",
        f"- projector: `{proj['name']}`, {proj['parameters']:,} trained parameters "
        f"({', '.join(f'{k} {v}' for k, v in proj.items() if k not in ('name', 'parameters'))})",
        f"- audio tokens per second of audio: {summary['audio_tokens_per_second']:g}",
        f"- encoder layer: {summary['encoder']['layer']}; windows of {window['seconds']:g} s, overlap "
        f"{window['overlap_seconds']:g} s, time markers {'on' if window['time_markers'] else 'off'}",
        "- LoRA: " + (f"r={lora['r']}, alpha={lora['lora_alpha']}, dropout={lora['lora_dropout']}, targets "
                      f"{', '.join(lora['target_modules'] or [])}" if lora else "none (the LLM is used as it is)"),
        "- transcript hint: " + ("on (Whisper's own transcript of each window goes into the prompt beside its audio "
                                 "tokens)" if config.get("transcript_hint") else "off"),
        "- versions: " + ", ".join(f"{k} {v}" for k, v in summary["versions"].items()),
    ]
    if training is not None:
        lines += ["", "## Training run", ""] + _training_lines(training)
    if results is not None:
        lines += ["", "## Measured by `eardrum demo`", "", results.read_text().strip()]
    if recipe is not None:
        lines += ["", "## Recipe", "", "```yaml", recipe.read_text().rstrip(), "```"]
    return "\n".join(front + lines) + "\n"


def _training_lines(path: Path) -> list[str]:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return [f"(`{path.name}` could not be read)"]
    if not isinstance(data, dict):
        return [f"(`{path.name}` is not a run summary)"]
    lines = [f"- {key}: {data[key]:,}" if isinstance(data[key], int) else f"- {key}: {data[key]:.1f}"
             for key in ("steps", "examples", "seconds") if isinstance(data.get(key), (int, float))]
    evaluation = data.get("eval")
    if isinstance(evaluation, dict) and evaluation:
        lines += ["", "| eval metric (the recipe's eval set) | value |", "|---|---|"]
        lines += [f"| {k} | {v:.4g} |" if isinstance(v, (int, float)) else f"| {k} | {v} |"
                  for k, v in evaluation.items()]
    return lines
