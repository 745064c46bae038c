"""Experiment tracking: a finished run folder copied into MLflow.

`output.track: [mlflow]` logs, when the run finishes, what its files hold: the resolved
recipe flattened into parameters (`train.optimizer.lr`, `objective.1.temperature`),
one nested MLflow run per stage and seed with every epoch record of its metrics.jsonl
(step = epoch) and the numbers of its eval.json, and as artifacts results.json,
results.md, report.html, the plots and the student weights. The store is an SQLite
database beside the run folder (`<parent>/mlflow.db`, artifacts in
`<parent>/mlartifacts`; MLflow's own default since 3.7 is SQLite too) unless
`output.track_uri` names another. TensorBoard needs nothing here: `fit` writes its
event files into each stage folder as it trains (`<stage>/seed<k>/tensorboard`).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

from kdistill.errors import RecipeError
from kdistill.report import read_json_if_any, read_records

PARAM_BATCH = 100  # MLflow takes at most this many parameters per call


def require_mlflow() -> Any:
    try:
        import mlflow
    except ImportError:
        raise RecipeError(
            "output.track lists mlflow but MLflow is not installed: pip install 'kdistill[mlflow]', "
            "or remove mlflow from output.track"
        ) from None
    return mlflow


def track_problems(recipe: Any) -> list[str]:
    """What `kdistill validate` says about output.track before anything runs."""
    problems = []
    if "mlflow" in recipe.output.track:
        try:
            require_mlflow()
        except RecipeError as exc:
            problems.append(str(exc))
    if "tensorboard" in recipe.output.track:
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            problems.append(
                "output.track lists tensorboard but it is not installed: pip install "
                "'kdistill[tensorboard]', or remove it from output.track"
            )
    return problems


def default_uri(run_dir: Path) -> str:
    return f"sqlite:///{(Path(run_dir).resolve().parent / 'mlflow.db')}"


def log_to_mlflow(run_dir: Path, recipe: Any) -> str:
    """Copy the finished run folder into MLflow; returns "<uri> (run <id>)"."""
    require_mlflow()
    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient

    run_dir = Path(run_dir)
    uri = recipe.output.track_uri or default_uri(run_dir)
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name(recipe.name)
    if experiment is None:
        artifacts = None
        if uri.startswith("sqlite:///"):  # keep artifacts beside the database, not in cwd
            artifacts = (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts").as_uri()
        experiment_id = client.create_experiment(recipe.name, artifact_location=artifacts)
    else:
        experiment_id = experiment.experiment_id
    parent = client.create_run(
        experiment_id,
        run_name=run_dir.name,
        tags={"kdistill.run_dir": str(run_dir.resolve()), "kdistill.task": recipe.task},
    )
    parent_id = parent.info.run_id
    params = [Param(key, value) for key, value in flatten_params(recipe.model_dump(mode="json"))]
    for start in range(0, len(params), PARAM_BATCH):
        client.log_batch(parent_id, params=params[start : start + PARAM_BATCH])
    results = read_json_if_any(run_dir / "results.json") or {}
    for stage, info in (results.get("stages") or {}).items():
        for seed in info.get("seeds") or []:
            folder = run_dir / stage / f"seed{seed}"
            child = client.create_run(
                experiment_id,
                run_name=f"{stage} seed {seed}",
                tags={"mlflow.parentRunId": parent_id, "kdistill.stage": stage},
            )
            metrics = []
            for record in read_records(folder / "metrics.jsonl"):
                step = int(record.get("epoch", 0))
                prefix = "step_" if record.get("split") == "val" else ""
                for key, value in record.items():
                    if key not in ("epoch", "step", "split") and _number(value):
                        metrics.append(Metric(prefix + _key(key), float(value), 0, step))
            for record in read_records(folder / "steps.jsonl"):  # every optimizer step
                for key, value in record.items():
                    if key not in ("epoch", "step") and _number(value):
                        metrics.append(
                            Metric(_key(f"step/{key}"), float(value), 0, int(record["step"]))
                        )
            evaluation = read_json_if_any(folder / "eval.json") or {}
            for key, value in flatten_numbers(evaluation):
                metrics.append(Metric(_key(f"eval/{key}"), value, 0, 0))
            for start in range(0, len(metrics), 900):  # the batch limit is 1,000
                client.log_batch(child.info.run_id, metrics=metrics[start : start + 900])
            if stage != "teacher" and (folder / "model.safetensors").is_file():
                client.log_artifact(child.info.run_id, str(folder / "model.safetensors"))
            client.set_terminated(child.info.run_id)
    for name in ("results.json", "results.md", "report.html", "recipe.yaml"):
        if (run_dir / name).is_file():
            client.log_artifact(parent_id, str(run_dir / name))
    if (run_dir / "plots").is_dir():
        client.log_artifacts(parent_id, str(run_dir / "plots"), artifact_path="plots")
    client.set_terminated(parent_id)
    return f"{uri} (experiment {recipe.name!r}, run {parent_id})"


def flatten_params(node: Any, prefix: str = "") -> list[tuple[str, str]]:
    """A recipe as MLflow parameters: dotted paths (list items by index) to text."""
    if isinstance(node, dict):
        out: list[tuple[str, str]] = []
        for key, value in node.items():
            out += flatten_params(value, f"{prefix}{key}.")
        return out
    if isinstance(node, list) and any(isinstance(item, (dict, list)) for item in node):
        out = []
        for i, item in enumerate(node):
            out += flatten_params(item, f"{prefix}{i}.")
        return out
    text = json.dumps(node) if not isinstance(node, str) else node
    return [(prefix.rstrip(".")[:250], text[:6000])]


def flatten_numbers(node: Any, prefix: str = "") -> list[tuple[str, float]]:
    """The finite numbers of a JSON tree (eval.json), keys joined by '/'; lists skipped."""
    if isinstance(node, dict):
        out: list[tuple[str, float]] = []
        for key, value in node.items():
            out += flatten_numbers(value, f"{prefix}{key}/")
        return out
    if _number(node):
        return [(prefix.rstrip("/"), float(node))]
    return []


def _number(value: Any) -> bool:
    return (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(float(value))
    )


def _key(name: str) -> str:
    """MLflow keys allow letters, digits, _ - . space : / only."""
    return re.sub(r"[^\w\-. :/]", "_", name)[:250]
