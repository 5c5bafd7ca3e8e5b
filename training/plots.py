"""Loss curves from a training run's metrics.jsonl, drawn to PNG.

Figures are built on `matplotlib.figure.Figure` with an Agg canvas rather than through pyplot, so
plotting never switches the process-wide backend or keeps figures alive in pyplot's registry (the
trainer and a notebook can share a process).
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
from pathlib import Path

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FormatStrFormatter, NullFormatter

logger = logging.getLogger(__name__)

LOG_SCALE_RATIO = 10.0  # a loss range wider than this is drawn on a log axis


def read_metrics(path: str | Path) -> list[dict]:
    """Records of a metrics.jsonl, one JSON object per line; blank lines are skipped.

    A last line without its newline that is not valid JSON is what a run killed mid-write leaves,
    so it is skipped with a warning. Any other line that is not a JSON object raises ValueError
    naming the file and line number.
    """
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    lines = text.split("\n")  # a complete file ends with "\n", leaving "" last
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            if number == len(lines):
                logger.warning("%s:%d: skipping a truncated last line %r", path, number, line[:80])
                continue
            raise ValueError(f"{path}:{number}: not valid JSON ({err.msg}): {line[:80]!r}") from err
        if not isinstance(record, dict):
            raise ValueError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}: {line[:80]!r}")
        records.append(record)
    return records


def _series(records: list[dict], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of the records that carry `key`, in step order."""
    pairs = sorted((float(r["step"]), float(r[key])) for r in records if r.get(key) is not None)
    return [s for s, _ in pairs], [v for _, v in pairs]


def _wants_log_scale(values: list[float]) -> bool:
    finite = [v for v in values if math.isfinite(v)]
    if not finite or min(finite) <= 0:
        return False  # a log axis cannot show zero or negative losses
    return max(finite) / min(finite) > LOG_SCALE_RATIO


def _use_log_axis(ax: Axes, values: list[float]) -> None:
    ax.set_yscale("log")
    # Plain numbers ("0.4", "2") read faster than powers of ten; in-between ticks are labelled
    # only while they fit, over about one decade.
    finite = [v for v in values if math.isfinite(v)]
    decades = math.log10(max(finite) / min(finite))
    ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
    ax.yaxis.set_minor_formatter(FormatStrFormatter("%g") if decades <= 1.5 else NullFormatter())
    ax.grid(True, which="minor", alpha=0.15)


def _draw(records: list[dict], title: str | None) -> Figure:
    fig = Figure(figsize=(8, 4.5), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    train_steps, train = _series(records, "loss")
    eval_steps, evals = _series(records, "eval_loss")
    if train:
        ax.plot(train_steps, train, color="tab:blue", linewidth=1.2, label="train loss")
    if evals:
        ax.plot(eval_steps, evals, color="tab:orange", marker="o", markersize=4, linewidth=1.2, label="eval loss")
    if _wants_log_scale(train + evals):
        _use_log_axis(ax, train + evals)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(True, which="major", alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    lr_steps, lrs = _series(records, "lr")
    if lrs:
        lr_ax = ax.twinx()
        lr_ax.plot(lr_steps, lrs, color="tab:gray", linestyle="--", linewidth=1.0, label="learning rate")
        lr_ax.set_ylabel("learning rate", color="tab:gray")
        lr_ax.tick_params(axis="y", colors="tab:gray")
        lr_ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
        lr_handles, lr_labels = lr_ax.get_legend_handles_labels()
        handles, labels = handles + lr_handles, labels + lr_labels
    # Below the axes, so it never hides a curve on either axis.
    fig.legend(handles, labels, loc="outside lower center", ncols=len(labels), frameon=False)
    if title:
        ax.set_title(title)
    return fig


def plot_losses(records: list[dict], out_path: str | Path, title: str | None = None) -> Path:
    """Draw train loss (line) and eval loss (markers and line) against step, with the learning rate
    on a right-hand axis when present, and write a PNG to `out_path`.

    Args:
        records: dicts as in metrics.jsonl, each with "step" and any of "loss", "eval_loss", "lr".
        out_path: PNG to write; the parent folder is created. The file is written to a temporary
            name and renamed, so a reader never sees half an image.
        title: optional figure title.

    Returns:
        `out_path` as a Path.
    """
    for i, record in enumerate(records):
        if "step" not in record:
            raise ValueError(f"records[{i}] has no 'step': {record!r}")
    if not any(r.get(k) is not None for r in records for k in ("loss", "eval_loss")):
        raise ValueError(f"none of the {len(records)} records has a 'loss' or 'eval_loss' to plot")
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig = _draw(records, title)
    FigureCanvasAgg(fig)  # attaches itself to the figure; savefig then renders with Agg
    fd, tmp = tempfile.mkstemp(dir=out_path.parent, prefix=f".{out_path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            fig.savefig(f, format="png")
        os.chmod(tmp, 0o644)  # mkstemp makes the file private; a plot is meant to be shared
        os.replace(tmp, out_path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out_path
