"""training/config.py: retired keys, help texts, the recipe a checkpoint records, and the shipped configs."""
from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path

import pytest

from hyperlora.training.config import RETIRED, RUN_ONLY, TrainConfig

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "hyperlora" / "training" / "configs").glob("*.json"))


def test_retired_loss_key_warns_naming_it_and_is_dropped():
    with pytest.warns(UserWarning, match="'loss' is retired"):
        cfg = TrainConfig.from_dict({"loss": "options", "steps": 3})
    assert cfg.steps == 3 and "loss" not in cfg.to_dict()
    assert "loss" not in {f.name for f in dataclasses.fields(TrainConfig)}


def test_a_saved_config_with_every_former_field_loads(tmp_path):
    """A train_config.json written before the cleanup (all fields, 'loss' included) still loads."""
    old = {**TrainConfig().to_dict(), "loss": "options"}
    p = tmp_path / "train_config.json"
    p.write_text(json.dumps(old))
    with pytest.warns(UserWarning, match="loss"):
        cfg = TrainConfig.load(p)
    assert cfg == TrainConfig()


def test_unknown_keys_are_still_an_error_and_touch_nothing():
    with pytest.raises(ValueError, match=r"unknown training config fields \['stepz'\]"):
        TrainConfig.from_dict({"stepz": 3})


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_configs_load_without_warnings(path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        TrainConfig.load(path)


def test_every_field_has_a_one_line_help_text():
    helps = TrainConfig.field_help()
    assert list(helps) == [f.name for f in dataclasses.fields(TrainConfig)]
    for f in dataclasses.fields(TrainConfig):
        text = f.metadata.get("help", "")
        assert text and "\n" not in text and len(text) < 160, f.name
    assert "(default 400)" in helps["steps"]


def test_recipe_leaves_out_the_run_only_settings():
    cfg = TrainConfig(threads=2, device="cpu", out="runs/x", time_budget_s=5.0, steps=7)
    r = cfg.recipe()
    assert not set(RUN_ONLY) & set(r) and r["steps"] == 7
    assert set(r) | set(RUN_ONLY) == set(cfg.to_dict())
    assert not set(RETIRED) & set(r)


def test_list_fields_prints_every_field(capsys):
    from hyperlora.cli.main import main

    assert main(["train", "--list-fields"]) == 0
    out = capsys.readouterr().out
    for f in dataclasses.fields(TrainConfig):
        assert any(line.split()[0] == f.name for line in out.splitlines() if line.strip()), f.name
    assert "peak learning rate" in out
