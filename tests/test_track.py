"""output.track: a finished run copied into MLflow (SQLite store) and TensorBoard event
files per stage and seed, both read back with the trackers' own readers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import tiny_recipe

import kdistill
from kdistill.errors import RecipeError
from kdistill.track import flatten_params


def test_recipe_flattens_into_dotted_parameters() -> None:
    params = dict(flatten_params({"train": {"epochs": 2, "optimizer": {"lr": 0.1}},
                                  "objective": [{"loss": "kd", "temperature": 4}], "seeds": [0, 1]}))  # fmt: skip
    assert params == {
        "train.epochs": "2", "train.optimizer.lr": "0.1", "objective.0.loss": "kd",
        "objective.0.temperature": "4", "seeds": "[0, 1]",
    }  # fmt: skip


def test_a_run_is_read_back_from_mlflow_and_tensorboard(tiny: dict, tmp_path: Path) -> None:
    mlflow = pytest.importorskip("mlflow")
    event_accumulator = pytest.importorskip(
        "tensorboard.backend.event_processing.event_accumulator"
    )
    recipe = tiny_recipe(seeds=[0, 1])
    recipe["output"] = {"track": ["mlflow", "tensorboard"]}
    kdistill.run(recipe, output_dir=tmp_path / "runs" / "tiny", quiet=True)

    client = mlflow.tracking.MlflowClient(
        tracking_uri=f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}"
    )
    experiment = client.get_experiment_by_name("tiny")
    runs = client.search_runs([experiment.experiment_id])
    parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
    assert parent.data.params["train.epochs"] == "2"
    assert parent.data.params["objective.1.temperature"] == "2.0"
    children = {
        r.info.run_name: r
        for r in runs
        if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id
    }
    assert set(children) == {
        "teacher seed 0",
        "baseline seed 0",
        "baseline seed 1",
        "distill seed 0",
        "distill seed 1",
    }
    for name, child in children.items():
        stage, _, seed = name.split()
        lines = (tmp_path / "runs" / "tiny" / stage / f"seed{seed}" / "metrics.jsonl").read_text()
        records = [json.loads(line) for line in lines.splitlines()]
        history = client.get_metric_history(child.info.run_id, "val_accuracy")
        assert [(m.step, m.value) for m in sorted(history, key=lambda m: m.step)] == [
            (r["epoch"], pytest.approx(r["val_accuracy"])) for r in records
        ]
        folder = tmp_path / "runs" / "tiny" / stage / f"seed{seed}"
        evaluation = json.loads((folder / "eval.json").read_text())
        assert child.data.metrics["eval/test/accuracy"] == pytest.approx(
            evaluation["test"]["accuracy"]
        )
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"results.json", "results.md", "report.html", "recipe.yaml"} <= artifacts
    student = {a.path for a in client.list_artifacts(children["distill seed 1"].info.run_id)}
    assert student == {"model.safetensors"}

    events = event_accumulator.EventAccumulator(
        str(tmp_path / "runs" / "tiny" / "distill" / "seed1" / "tensorboard")
    )
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"distill seed 1/val_accuracy", "distill seed 1/loss_kd", "distill seed 1/loss"} <= tags
    assert [e.step for e in events.Scalars("distill seed 1/val_accuracy")] == [31, 62]
    # every optimizer step: steps.jsonl, TensorBoard's step/ scalars and MLflow's step/ metrics
    folder = tmp_path / "runs" / "tiny" / "distill" / "seed1"
    steps = [json.loads(line) for line in (folder / "steps.jsonl").read_text().splitlines()]
    assert [r["step"] for r in steps] == list(range(1, 63))
    assert {"loss", "loss_kd", "loss_cross_entropy", "lr"} <= set(steps[0])
    assert [e.step for e in events.Scalars("distill seed 1/step/loss")] == list(range(1, 63))
    history = client.get_metric_history(children["distill seed 1"].info.run_id, "step/loss")
    assert sorted((m.step, m.value) for m in history) == [
        (r["step"], pytest.approx(r["loss"])) for r in steps
    ]


def test_asking_for_a_tracker_that_is_not_installed_names_the_extra(
    tiny: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    import builtins

    real_import = builtins.__import__

    def no_mlflow(name: str, *args: object, **kwargs: object) -> object:
        if name == "mlflow" or name.startswith("mlflow."):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_mlflow)
    recipe = tiny_recipe()
    recipe["output"] = {"track": ["mlflow"]}
    with pytest.raises(RecipeError, match=r"pip install 'kdistill\[mlflow\]'"):
        kdistill.validate(recipe)
