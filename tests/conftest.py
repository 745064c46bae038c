from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The folder of real datasets: $KDISTILL_DATA, else shared/data next to the repo."""
    default = Path(__file__).resolve().parents[1].parent / "shared" / "data"
    path = Path(os.environ.get("KDISTILL_DATA", default))
    if not path.is_dir():
        pytest.skip(f"no shared data folder at {path}; set KDISTILL_DATA")
    return path


def tiny_recipe(**changes: object) -> dict:
    """A recipe that trains in seconds on 2,000 real MNIST images."""
    recipe: dict = {
        "name": "tiny",
        "data": {"source": "mnist", "val_fraction": 0.1, "limit_train": 2000, "limit_test": 1000},
        "teacher": {"model": {"name": "mlp", "args": {"hidden": [64]}}, "train": {"epochs": 2}},
        "student": {"model": {"name": "mlp", "args": {"hidden": [16]}}},
        "objective": [
            {"loss": "cross_entropy", "weight": 0.5},
            {"loss": "kd", "weight": 0.5, "temperature": 2},
        ],
        "train": {
            "epochs": 2,
            "batch_size": 64,
            "optimizer": {"name": "sgd", "lr": 0.05},
            "eval_batch_size": 500,
        },
        "stages": ["teacher", "baseline", "distill"],
        "seeds": [0],
    }
    for key, value in changes.items():
        recipe[key] = value
    return recipe


@pytest.fixture()
def tiny(shared_data: Path, monkeypatch: pytest.MonkeyPatch) -> dict:
    monkeypatch.setenv("KDISTILL_DATA", str(shared_data))
    return tiny_recipe()
