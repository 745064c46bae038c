from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from kdistill.cli import main


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


# ------------------------------------------------------------ recipe files and the CLI


def write_recipe(path: Path, recipe: dict) -> Path:
    """Write a recipe dict as YAML; returns the path."""
    path.write_text(yaml.safe_dump(recipe))
    return path


def run_cli(recipe: Path, out: Path, *flags: str) -> int:
    """`kdistill run RECIPE --output-dir OUT --quiet FLAGS...`: the exit code."""
    return main(["run", str(recipe), "--output-dir", str(out), "--quiet", *flags])


def fails_cleanly(capsys: pytest.CaptureFixture[str], argv: list[str], *needles: str) -> str:
    """The CLI exits 2 with no traceback and every needle in its (whitespace-folded) stderr."""
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    flat = " ".join(err.split())
    for needle in needles:
        assert needle in flat, flat
    return flat
