"""Tests for eardrum.training.plots: the PNG written, axis choices, and reading metrics.jsonl."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from eardrum.training.plots import _draw, plot_losses, read_metrics

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _records(first_loss: float = 4.0, last_loss: float = 1.0, lr: bool = True) -> list[dict]:
    records = []
    for step in range(0, 101, 10):
        record = {"step": step, "loss": first_loss + (last_loss - first_loss) * step / 100}
        if lr:
            record["lr"] = 1e-4 * (1 - step / 100)
        records.append(record)
    records += [{"step": 50, "eval_loss": 2.8}, {"step": 100, "eval_loss": 1.5}]
    return records


def test_plot_losses_writes_a_png_atomically(tmp_path: Path) -> None:
    out = plot_losses(_records(), tmp_path / "run" / "loss.png", title="run")
    assert out == tmp_path / "run" / "loss.png"
    data = out.read_bytes()
    assert data[:8] == PNG_MAGIC
    assert len(data) > 10_000  # axes, curves and labels, not a blank canvas
    assert [p.name for p in out.parent.iterdir()] == ["loss.png"]  # no temporary file left behind


def test_plot_losses_uses_a_log_axis_only_beyond_ten_fold() -> None:
    assert _draw(_records(first_loss=4.0, last_loss=1.0), None).axes[0].get_yscale() == "linear"
    assert _draw(_records(first_loss=40.0, last_loss=1.0), None).axes[0].get_yscale() == "log"


def test_plot_losses_puts_the_learning_rate_on_a_second_axis() -> None:
    assert len(_draw(_records(lr=True), None).axes) == 2
    assert len(_draw(_records(lr=False), None).axes) == 1


def test_plot_losses_rejects_a_record_without_step(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"records\[1\] has no 'step'"):
        plot_losses([{"step": 0, "loss": 1.0}, {"loss": 0.5}], tmp_path / "loss.png")


def test_plot_losses_rejects_records_without_losses(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="none of the 1 records"):
        plot_losses([{"step": 0, "lr": 1e-4}], tmp_path / "loss.png")


def test_read_metrics_round_trips_and_skips_blank_lines(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n\n{"step": 2, "eval_loss": Infinity}\n')
    assert read_metrics(path) == [{"step": 1, "loss": 2.0}, {"step": 2, "eval_loss": float("inf")}]


def test_read_metrics_skips_a_truncated_last_line(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps({"step": 1, "loss": 2.0}) + "\n" + '{"step": 2, "lo')
    assert read_metrics(path) == [{"step": 1, "loss": 2.0}]


def test_read_metrics_names_a_corrupt_line(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2,,}\n{"step": 3}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2: not valid JSON"):
        read_metrics(path)


def test_read_metrics_rejects_a_corrupt_last_line_that_was_fully_written(tmp_path: Path) -> None:
    # A complete line ends with its newline; a bad one is corruption, not a kill mid-write.
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2,,}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2: not valid JSON"):
        read_metrics(path)


def test_read_metrics_rejects_a_line_that_is_not_an_object(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n[1, 2]\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2: expected a JSON object, got list"):
        read_metrics(path)
