"""The teacher's fit of its training rows against validation: measured after the teacher
stage, warned about in the run log and the report when it memorised them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import tiny_recipe

import kdistill
from kdistill.tasks.classification.measure import mean_entropy


def test_mean_entropy_is_log_c_for_uniform_and_zero_for_one_hot() -> None:
    assert mean_entropy(torch.zeros(3, 10), 1.0) == pytest.approx(torch.log(torch.tensor(10.0)))
    assert mean_entropy(torch.tensor([[1e4, 0.0, 0.0]]), 1.0) == pytest.approx(0.0, abs=1e-9)
    # a temperature flattens: entropy grows with T
    logits = torch.tensor([[3.0, 1.0, 0.0]])
    assert mean_entropy(logits, 4.0) > mean_entropy(logits, 1.0)


def _run(tmp_path: Path, capsys: pytest.CaptureFixture[str], **data: int) -> tuple[dict, str]:
    recipe = tiny_recipe(stages=["teacher", "baseline", "distill"])
    recipe["data"].update(data)
    recipe["teacher"]["train"] = {"epochs": 40, "optimizer": {"name": "adamw", "lr": 0.01}}
    recipe["objective"][1]["temperature"] = 4
    kdistill.run(recipe, output_dir=tmp_path / "run", quiet=True)
    fit = json.loads((tmp_path / "run" / "teacher" / "seed0" / "eval.json").read_text())["fit"]
    return fit, capsys.readouterr().err + (tmp_path / "run" / "results.md").read_text()


def test_a_teacher_that_memorised_a_small_set_is_named(
    tiny: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fit, text = _run(tmp_path, capsys, limit_train=300)
    assert fit["train_rows"] == 300 and fit["temperature"] == 4.0
    assert fit["train_accuracy"] == 1.0 and fit["val_accuracy"] < 0.9
    assert fit["train_entropy"] < 0.5 * fit["val_entropy"]
    # the temperature flattens the training targets: the gap narrows at T = 4
    assert fit["train_entropy_t"] / fit["val_entropy_t"] > fit["train_entropy"] / fit["val_entropy"]
    assert fit["memorised"] is True
    flat = " ".join(text.split())
    assert "the teacher fits its training rows far closer than validation" in flat
    assert "## The teacher on its training rows" in text
    assert "`kdistill tune` searches the temperature and the weights by default" in flat


def test_a_teacher_that_generalises_is_not_named(
    tiny: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    recipe = tiny_recipe(stages=["teacher"])
    kdistill.run(recipe, output_dir=tmp_path / "run", quiet=True)
    eval_json = json.loads((tmp_path / "run" / "teacher" / "seed0" / "eval.json").read_text())
    fit = eval_json["fit"]
    assert fit["memorised"] is False and fit["train_rows"] == 2000
    assert abs(fit["train_accuracy"] - fit["val_accuracy"]) < 0.05
    assert "far closer than validation" not in capsys.readouterr().err
