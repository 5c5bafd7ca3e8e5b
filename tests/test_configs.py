"""Every YAML under configs/ loads and validates; bad files name themselves and every problem."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from eardrum.adapters.config import ConfigError, load_config_file
from eardrum.training.recipe import load_recipe

ROOT = Path(__file__).resolve().parent.parent / "configs"
CONFIGS = sorted(ROOT.rglob("*.yaml"))


def test_there_are_configs():
    assert CONFIGS


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(ROOT)))
def test_config_loads(path):
    data = yaml.safe_load(path.read_text())
    if path.parent.name == "accelerate":
        from accelerate.commands.config.config_args import ClusterConfig

        ClusterConfig.from_yaml_file(str(path))
    elif "output_dir" in data:
        recipe = load_recipe(path)
        assert recipe.model.encoder and recipe.data.train
    else:
        assert load_config_file(path).encoder


def test_bad_config_names_the_file_and_all_problems(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  encoder: x\n  llm: y\n  label_mode: nope\n  window_seconds: -3\n")
    with pytest.raises(ConfigError) as err:
        load_config_file(bad)
    assert str(bad) in str(err.value) and "label_mode" in str(err.value) and "window_seconds" in str(err.value)
    (tmp_path / "typo.yaml").write_text("model:\n  encoder: x\n  llm: y\n  projektor: {}\n")
    with pytest.raises(ConfigError, match="projektor"):
        load_config_file(tmp_path / "typo.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n")
    with pytest.raises(ConfigError, match="'model:' section"):
        load_config_file(tmp_path / "list.yaml")
