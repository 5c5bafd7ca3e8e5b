"""Experiment trackers through accelerate: `train.report_to: [tensorboard, wandb, mlflow, ...]`.

The recipe is the run's config (flattened to `section.key` values); every record of `metrics.jsonl` (loss,
learning rate, examples/s, eval metrics) is logged at its step. A resumed run goes on in the tracker's run
it started (`trackers.json` in the output folder keeps the W&B and MLflow run ids); MLflow keeps the
parameters that run started with, as it refuses to change them. Where each tracker writes
is its own setting, as its users expect (`WANDB_*`, `MLFLOW_TRACKING_URI`, ...); TensorBoard writes into
`output_dir/tensorboard/`.
"""

from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

# accelerate's tracker name -> the module it needs (any of them) and what to install
TRACKERS: dict[str, tuple[tuple[str, ...], str]] = {
    "tensorboard": (("tensorboard", "tensorboardX"), "tensorboard"),
    "wandb": (("wandb",), "wandb"),
    "mlflow": (("mlflow",), "mlflow (or mlflow-skinny)"),
    "comet_ml": (("comet_ml",), "comet_ml"),
    "aim": (("aim",), "aim"),
    "clearml": (("clearml",), "clearml"),
    "dvclive": (("dvclive",), "dvclive"),
    "trackio": (("trackio",), "trackio"),
    "swanlab": (("swanlab",), "swanlab"),
}
IDS_FILE = "trackers.json"  # the run ids a resumed run logs into again
TENSORBOARD_DIR = "tensorboard"


def tracker_names(report_to: list[str], tensorboard: bool = False) -> list[str]:
    """The trackers a recipe asks for: `train.report_to`, plus tensorboard for the older `train.tensorboard: true`."""
    names = list(dict.fromkeys(report_to))
    if tensorboard and "tensorboard" not in names:
        names.append("tensorboard")
    return names


def tracker_problems(report_to: Any, tensorboard: bool = False) -> list[str]:
    """What is wrong with `train.report_to`: unknown names, or a tracker whose package is not installed."""
    if not isinstance(report_to, list) or not all(isinstance(n, str) for n in report_to):
        return [f"train.report_to: expected a list of tracker names, got {report_to!r}"]
    problems = []
    for name in tracker_names(report_to, tensorboard):
        if name not in TRACKERS:
            problems.append(f"train.report_to: unknown tracker {name!r}; expected some of {', '.join(TRACKERS)}")
            continue
        modules, package = TRACKERS[name]
        if not any(importlib.util.find_spec(m) is not None for m in modules):
            problems.append(f"train.report_to: {name} is not installed; pip install {package}")
    return problems


def flat_config(data: dict, prefix: str = "") -> dict[str, int | float | str | bool]:
    """A nested recipe dict as `section.key` -> a scalar every tracker stores (lists and null as JSON text)."""
    out: dict[str, int | float | str | bool] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flat_config(value, name + "."))
        elif isinstance(value, (bool, int, float, str)):
            out[name] = value
        else:
            out[name] = json.dumps(value, default=str)
    return out


class Trackers:
    """The run's trackers on the main process: started with the recipe as config, fed every metrics record."""

    def __init__(self, acc, names: list[str], out: Path, project: str) -> None:
        self.acc = acc
        self.names = names
        self.out = out
        self.project = project
        self.started = False

    def start(self, config: dict, resumed: bool) -> None:
        """Open the trackers' runs (the earlier ones when `resumed`) and store `config` as the run's parameters."""
        if not self.names:
            return
        ids = self._ids() if resumed else {}
        kwargs: dict[str, dict] = {
            "wandb": {"name": self.out.name, "dir": str(self.out)},
            "mlflow": {"run_name": self.out.name},
        }
        if ids.get("wandb"):
            kwargs["wandb"].update(id=ids["wandb"], resume="allow")
        if ids.get("mlflow"):
            kwargs["mlflow"]["run_id"] = ids["mlflow"]
        self.acc.init_trackers(self.project, init_kwargs=kwargs)
        self.started = True
        for tracker in self.acc.trackers:
            # MLflow refuses to change a logged parameter: a resumed run (perhaps with a longer max_steps) keeps
            # the parameters it started with there; the others take the recipe as it is now.
            if not ids.get(tracker.name) or tracker.name != "mlflow":
                tracker.store_init_configuration(flat_config(config))
        if self.acc.is_main_process:
            self._save_ids()

    def _ids(self) -> dict:
        path = self.out / IDS_FILE
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError):
            return {}
        return data if isinstance(data, dict) else {}

    def _save_ids(self) -> None:
        ids = {}
        for name in ("wandb", "mlflow"):
            if name in self.names:
                run = self.acc.get_tracker(name, unwrap=True)
                ids[name] = getattr(run, "id", None) or getattr(getattr(run, "info", None), "run_id", None)
        if ids:
            (self.out / IDS_FILE).write_text(json.dumps(ids) + "\n")

    def log(self, record: dict) -> None:
        """Log a metrics record's numbers at its step."""
        if self.started:
            values = {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float))
                      and not isinstance(v, bool)}
            if values:
                self.acc.log(values, step=record.get("step"))

    def end(self) -> None:
        """Close the trackers' runs (a tracker that fails to close is logged, never fatal)."""
        if self.started:
            self.started = False
            try:
                self.acc.end_training()
            except Exception as err:  # noqa: BLE001 - the run's own outputs are already written
                logger.warning("a tracker did not close cleanly: %s", err)
