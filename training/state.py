"""Training checkpoints: written atomically, rotated, and enough to resume a run exactly.

    output_dir/checkpoints/step-00000100/
        model/                      the exportable eardrum model (projector, LoRA, tokenizer)
        trainable.safetensors       every trainable tensor by name (what resume loads)
        optimizer.safetensors       optimizer state tensors; optimizer.json: its param groups
        rng-rank{R}.safetensors     each rank's torch (and CUDA) RNG states
        trainer_state.json          step, epoch, batches done in the epoch, python/numpy RNG, metrics

Nothing here uses pickle: tensors go to safetensors, everything else to JSON.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import socket
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

STEP_DIR = re.compile(r"^step-(\d{8})$")
TEMPORARY = re.compile(r"^\.(?:tmp-step-\d{8}|tmp-final|old-final)-(\d+)$")  # a save in progress, by its pid

logger = logging.getLogger(__name__)


def checkpoints_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary folders of an interrupted write are ignored)."""
    root = checkpoints_dir(output_dir)
    if not root.is_dir():
        return []
    found = [
        p for p in root.iterdir() if p.is_dir() and STEP_DIR.match(p.name) and (p / "trainer_state.json").is_file()
    ]
    return sorted(found, key=lambda p: int(STEP_DIR.match(p.name).group(1)))


def resolve_resume(output_dir: str | Path, resume_from: str | None) -> Path | None:
    """`latest` -> the newest complete checkpoint (None if there is none); a folder -> itself, checked."""
    if resume_from is None:
        return None
    if resume_from == "latest":
        found = list_checkpoints(output_dir)
        return found[-1] if found else None
    path = Path(resume_from)
    if not (path / "trainer_state.json").is_file():
        raise ValueError(f"train.resume_from: {path} is not a training checkpoint (no trainer_state.json)")
    return path


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model: torch.nn.Module, path: Path) -> None:
    """Load trainable tensors by name; every trainable parameter must be present."""
    state = load_file(str(path))
    params = dict(model.named_parameters())
    wanted = {n for n, p in params.items() if p.requires_grad}
    if set(state) != wanted:
        raise ValueError(
            f"{path}: the checkpoint's trainable tensors do not match this model "
            f"(missing {sorted(wanted - set(state))[:5]}, unexpected {sorted(set(state) - wanted)[:5]}); "
            "was the recipe changed since it was written?"
        )
    with torch.no_grad():
        for name, tensor in state.items():
            params[name].copy_(tensor)


def _optimizer_files(optimizer: torch.optim.Optimizer, directory: Path) -> None:
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for idx, entry in state["state"].items():
        for key, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"{idx}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{idx}.{key}"] = value
    save_file(tensors, str(directory / "optimizer.safetensors"))
    (directory / "optimizer.json").write_text(json.dumps({"param_groups": state["param_groups"], "scalars": scalars}))


def load_optimizer(optimizer: torch.optim.Optimizer, directory: Path) -> None:
    tensors = load_file(str(directory / "optimizer.safetensors"))
    meta = json.loads((directory / "optimizer.json").read_text())
    state: dict[int, dict] = {}
    for key, value in [*tensors.items(), *meta["scalars"].items()]:
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, json) capturing torch, CUDA, numpy and python RNG states."""
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda{i}"] = s
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    py = random.getstate()
    return tensors, {"numpy": [kind, keys.tolist(), pos, has_gauss, gauss], "python": [py[0], list(py[1]), py[2]]}


def set_rng_state(tensors: dict[str, torch.Tensor], data: dict) -> None:
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("cuda"))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    kind, keys, pos, has_gauss, gauss = data["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    random.setstate((data["python"][0], tuple(data["python"][1]), data["python"][2]))


def save_training_checkpoint(
    output_dir: str | Path,
    step: int,
    *,
    write_model,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    state: dict,
    keep: int,
) -> Path:
    """Write `step-N` atomically (temp folder, then rename) and drop all but the newest `keep`.

    `write_model(folder)` writes the exportable model. Call on the main process only; every rank
    writes its RNG state with `save_rank_rng` first.
    """
    root = checkpoints_dir(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    tmp = root / f".tmp-step-{step:08d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    write_model(tmp / "model")
    save_file(trainable_state(model), str(tmp / "trainable.safetensors"))
    _optimizer_files(optimizer, tmp)
    for rng_file in root.glob(f"rng-step-{step:08d}-rank*.safetensors"):
        rng_file.rename(tmp / rng_file.name.replace(f"rng-step-{step:08d}-", "rng-"))
    (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in list_checkpoints(output_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def save_rank_rng(output_dir: str | Path, step: int, rank: int) -> None:
    """Each rank's RNG, staged beside the checkpoint being written (moved in by the main process)."""
    root = checkpoints_dir(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    tensors, data = rng_state()
    tensors = dict(tensors)
    path = root / f"rng-step-{step:08d}-rank{rank}.safetensors"
    save_file(tensors, str(path), metadata={"rng": json.dumps(data)})


def load_rank_rng(checkpoint: Path, rank: int) -> None:
    from safetensors import safe_open

    path = checkpoint / f"rng-rank{rank}.safetensors"
    if not path.is_file():
        raise ValueError(f"{checkpoint}: no RNG state for rank {rank}; resume with the same number of processes")
    with safe_open(str(path), framework="pt") as f:
        data = json.loads(f.metadata()["rng"])
    set_rng_state(load_file(str(path)), data)


def save_final(output_dir: str | Path, write_model) -> Path:
    """Write `output_dir/final` atomically: `write_model(folder)` fills a temporary folder, which then takes
    the place of any earlier `final/`. A kill at any point leaves either the old `final/` or the new one
    (and a temporary folder that the next run clears), never a half-written `final/`."""
    out = Path(output_dir)
    final, pid = out / "final", os.getpid()
    tmp, old = out / f".tmp-final-{pid}", out / f".old-final-{pid}"
    for path in (tmp, old):
        shutil.rmtree(path, ignore_errors=True)
    write_model(tmp)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def clear_stale_temporaries(output_dir: str | Path) -> list[Path]:
    """Remove the temporary folders of saves that were killed: `.tmp-step-N-PID` under `checkpoints/`,
    `.tmp-final-PID` and `.old-final-PID` in `output_dir`, where process PID no longer runs on this machine.
    A `final/` lost between the two renames of `save_final` is restored from its `.old-final-PID`.
    Returns what was removed."""
    out = Path(output_dir)
    removed = []
    for folder in (out, checkpoints_dir(out)):
        if not folder.is_dir():
            continue
        for path in sorted(folder.iterdir()):
            found = TEMPORARY.match(path.name)
            if not found or not path.is_dir() or _running(int(found.group(1))):
                continue
            if path.name.startswith(".old-final-") and not (out / "final").exists():
                os.replace(path, out / "final")
                logger.warning("%s: restored from %s, left by a run killed while saving", out / "final", path.name)
                continue
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
            logger.warning("%s: removed, the unfinished save of a run that was killed", path)
    return removed


def _running(pid: int) -> bool:
    """Whether a process with this pid runs on this machine (one we may not signal still runs)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


LOCK_NAME = ".eardrum-train.lock"  # in output_dir while a run trains into it: {"pid", "host"}
RUN_OUTPUTS = ("final", "checkpoints", "metrics.jsonl", "summary.json", "loss.png", "tensorboard", "trackers.json")


class OutputDirError(RuntimeError):
    """The output folder is in use by another run, or holds an earlier run that a fresh run would overwrite."""


class RunLock:
    """Holds `output_dir/.eardrum-train.lock` for the life of a run (a context manager).

    A second run into the same folder fails at once naming the first one's pid and host. A lock whose process
    no longer runs on this machine (a killed run) is taken over with a warning.
    """

    def __init__(self, output_dir: str | Path) -> None:
        self.path = Path(output_dir) / LOCK_NAME
        self.mine = {"pid": os.getpid(), "host": socket.gethostname()}

    def __enter__(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                if holder.get("host") == self.mine["host"] and not _running(int(holder.get("pid", -1))):
                    logger.warning("%s: taking over the lock of run pid %s, which no longer runs", self.path,
                                   holder.get("pid"))
                    self.path.unlink(missing_ok=True)
                    continue
                raise OutputDirError(
                    f"{self.path.parent}: another run (pid {holder.get('pid')} on {holder.get('host')}) is training "
                    f"into this folder; wait for it to end or choose another output_dir (if that run is gone for "
                    f"good, delete {self.path})"
                ) from None
            with os.fdopen(fd, "w") as handle:
                json.dump(self.mine, handle)
            return self
        raise OutputDirError(f"{self.path}: could not take the lock")

    def __exit__(self, *exc) -> None:
        if self._holder() == self.mine:
            self.path.unlink(missing_ok=True)

    def _holder(self) -> dict:
        try:
            holder = json.loads(self.path.read_text())
        except (OSError, json.JSONDecodeError):
            return {}
        return holder if isinstance(holder, dict) else {}


def earlier_run(output_dir: str | Path) -> list[str]:
    """What an earlier run left in `output_dir` that a fresh run would overwrite (names; empty if nothing)."""
    out = Path(output_dir)
    found = [name for name in ("final", "summary.json") if (out / name).exists()]
    if list_checkpoints(out):
        found.append("checkpoints")
    metrics = out / "metrics.jsonl"
    if metrics.is_file() and metrics.stat().st_size > 0:
        found.append("metrics.jsonl")
    return found


def clear_earlier_run(output_dir: str | Path) -> None:
    """Remove an earlier run's outputs from `output_dir` (models, checkpoints, logs), before a fresh run."""
    out = Path(output_dir)
    for name in RUN_OUTPUTS:
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    for pattern in ("examples-rank*.jsonl", "bad_examples_*.jsonl"):
        for path in out.glob(pattern):
            path.unlink()
