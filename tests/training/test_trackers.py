"""Trackers through accelerate: a tiny run's loss, eval metrics and recipe arrive in MLflow's local file store,
and a resumed run logs into the run it started; bad `train.report_to` is named."""

from __future__ import annotations

import json

import pytest
from test_trainer import TINY, losses, tiny  # the tiny recipe of the training tests, beside this file

from eardrum.adapters.config import ConfigError
from eardrum.training.recipe import load_recipe
from eardrum.training.trackers import flat_config, tracker_problems
from eardrum.training.trainer import train


def test_report_to_is_checked_when_the_recipe_loads():
    assert tracker_problems(["mlflow", "mlflow"]) == []  # mlflow-skinny is in the test extra
    assert tracker_problems(["swanlab"]) == ["train.report_to: swanlab is not installed; pip install swanlab"]
    assert tracker_problems([], tensorboard=True) == tracker_problems(["tensorboard"])
    assert tracker_problems(["neptune"]) == [
        "train.report_to: unknown tracker 'neptune'; expected some of tensorboard, wandb, mlflow, comet_ml, aim, "
        "clearml, dvclive, trackio, swanlab"]
    assert tracker_problems("mlflow") == ["train.report_to: expected a list of tracker names, got 'mlflow'"]
    with pytest.raises(ConfigError, match="unknown tracker 'neptune'"):
        load_recipe(TINY, ["output_dir=/tmp/x", "train.report_to=[neptune]"])


def test_flat_config_keeps_every_value_as_a_scalar():
    flat = flat_config({"optim": {"lr": 1e-3, "betas": [0.9, 0.99]}, "train": {"init_from": None, "bf": True}})
    assert flat == {"optim.lr": 1e-3, "optim.betas": "[0.9, 0.99]", "train.init_from": "null", "train.bf": True}


@pytest.fixture
def mlflow_store(tmp_path, monkeypatch):
    mlflow = pytest.importorskip("mlflow")
    uri = (tmp_path / "mlruns").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 keeps the file store behind this switch
    mlflow.set_tracking_uri(uri)
    return mlflow.tracking.MlflowClient(uri)


def test_a_tiny_run_logs_loss_eval_and_recipe_to_mlflow_and_resumes_into_the_same_run(tmp_path, mlflow_store):
    common = ["train.report_to=[mlflow]", "train.tracker_project=tiny-ears", "train.save_every=2", "train.epochs=1",
              "train.eval_every=2", "train.log_every=1"]
    train(tiny(tmp_path, *common, "train.max_steps=2"))
    run_dir = tmp_path / "run"
    ids = json.loads((run_dir / "trackers.json").read_text())
    experiment = mlflow_store.get_experiment_by_name("tiny-ears")
    runs = mlflow_store.search_runs([experiment.experiment_id])
    assert [r.info.run_id for r in runs] == [ids["mlflow"]]
    run = runs[0]
    assert run.info.run_name == "run" and run.info.status == "FINISHED"
    assert run.data.params["optim.lr"] == str(load_recipe(TINY, ["output_dir=/x"]).optim.lr)
    assert run.data.params["train.max_steps"] == "2"
    assert "eval_loss" in run.data.metrics

    # the same run goes on: killed runs resume from their checkpoint, here a longer one from step 2
    train(tiny(tmp_path, *common, "train.max_steps=4", "train.resume_from=latest"))
    assert [r.info.run_id for r in mlflow_store.search_runs([experiment.experiment_id])] == [ids["mlflow"]]
    history = mlflow_store.get_metric_history(ids["mlflow"], "loss")
    by_step = {m.step: m.value for m in history}
    logged = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert by_step == {r["step"]: r["loss"] for r in logged if "loss" in r}
    assert sorted(by_step) == [1, 2, 3, 4] and len(losses(run_dir)) == 4
    evals = {m.step for m in mlflow_store.get_metric_history(ids["mlflow"], "eval_loss")}
    assert evals == {2, 4}
