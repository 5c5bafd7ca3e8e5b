"""Recipes: YAML plus dotted overrides; every problem reported at once before anything loads."""

from __future__ import annotations

from pathlib import Path

import pytest

from eardrum.adapters.config import ConfigError
from eardrum.training.recipe import load_recipe, parse_overrides

TINY = Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml"


def test_overrides_set_nested_values_with_yaml_types():
    recipe = load_recipe(
        TINY,
        [
            "output_dir=runs/x",
            "optim.lr=3e-4",
            "train.max_steps=5",
            "lora.enabled=false",
            "train.resume_from=latest",
            "model.projector.stack_factor=8",
            "data.batch_size=2",
        ],
    )
    assert recipe.output_dir == "runs/x" and recipe.optim.lr == 3e-4 and recipe.train.max_steps == 5
    assert recipe.lora.enabled is False and recipe.train.resume_from == "latest"
    assert recipe.model.projector.stack_factor == 8 and recipe.data.batch_size == 2


def test_every_problem_is_reported_together():
    with pytest.raises(ConfigError) as err:
        load_recipe(
            TINY,
            [
                "optim.lr=fast",
                "optim.sheduler=cosine",
                "train.mixed_precision=fp8",
                "data.batch_size=0",
                "model.label_mode=everything",
                "colour=red",
            ],
        )
    text = str(err.value)
    assert str(TINY) in text
    for needle in (
        "optim.lr: expected float, got 'fast'",
        "optim.sheduler: unknown key",
        "train.mixed_precision",
        "data.batch_size",
        "model.label_mode",
        "colour: unknown top-level key",
    ):
        assert needle in text, needle
    assert "6 problem(s)" in text


@pytest.mark.parametrize("bad", ["optim.lr", "=3", "a..b=1", "x=[unclosed"])
def test_malformed_overrides_are_named(bad):
    with pytest.raises(ConfigError, match="override"):
        parse_overrides([bad])


def test_quantization_needs_lora():
    with pytest.raises(ConfigError, match="set lora.enabled: true"):
        load_recipe(TINY, ["train.quantization=4bit", "lora.enabled=false"])


def test_batch_size_or_token_budget_exactly_one():
    with pytest.raises(ConfigError, match="exactly one of batch_size and max_tokens"):
        load_recipe(TINY, ["data.max_tokens=512"])
    assert load_recipe(TINY, ["data.max_tokens=512", "data.batch_size=null"]).data.max_tokens == 512


def test_shipped_recipes_are_found_by_name_and_unknown_names_listed():
    assert load_recipe("tiny").output_dir == "runs/tiny"
    with pytest.raises(ConfigError, match=r"not a shipped recipe \(.*tiny"):
        load_recipe("no-such-recipe")


@pytest.mark.parametrize("path", sorted(TINY.parent.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_shipped_recipe_loads(path):
    recipe = load_recipe(path.stem)
    assert recipe.data.train and recipe.output_dir


def test_the_demo_recipes_train_in_auto_precision_with_their_data_mixes():
    stage1, stage2 = load_recipe("demo"), load_recipe("demo_stage2")
    assert stage1.train.mixed_precision == stage2.train.mixed_precision == "auto"
    assert not stage1.lora.enabled and stage2.lora.enabled
    assert stage2.data.train[0]["path"].endswith("qa_train.distilled.jsonl")
    assert [s.get("task") for s in stage1.data.train] == [None, "caption"]
    assert len(stage2.data.train) == 4
