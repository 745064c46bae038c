"""Feature distillation through `kdistill run`: a user's own models, in their own file,
tapped by module path; ensembles, assistants, born-again generations; and the bad
inputs of feature distillation, each a clear message with exit status 2."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import yaml
from helpers import tiny_recipe
from safetensors.torch import load_file

from kdistill.cli import main

USER_MODELS = '''
import torch
from torch import nn


class Net(nn.Module):
    """A user's model: nothing in it knows about distillation."""

    def __init__(self, width, num_classes=10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.body = nn.Sequential(nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(2 * width, num_classes)
        self.unused = nn.Linear(3, 3)

    def forward(self, x):
        return self.head(self.pool(self.body(self.stem(x))).flatten(1))


def teacher(num_classes):
    return Net(8, num_classes)


def student(num_classes):
    return Net(4, num_classes)
'''


@pytest.fixture()
def user_recipe(tmp_path: Path, shared_data: Path, monkeypatch: pytest.MonkeyPatch) -> dict:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("KDISTILL_DATA", str(shared_data))
    (tmp_path / "my_models.py").write_text(USER_MODELS)
    recipe = tiny_recipe()
    recipe["data"].update(limit_train=1000, limit_test=300, val_fraction=0.01)
    recipe["teacher"] = {"model": {"name": "my_models.py:teacher"}, "train": {"epochs": 1}}
    recipe["student"] = {"model": {"name": "my_models.py:student"}}
    recipe["objective"] = [
        {"loss": "cross_entropy", "weight": 0.5},
        {"loss": "kd", "weight": 0.5, "temperature": 2},
        {"loss": "hint", "weight": 1.0, "student": "body", "teacher": "body"},
    ]
    recipe["train"].update(epochs=1, batch_size=50, optimizer={"name": "adamw", "lr": 0.005})
    return recipe


def run(recipe: dict, folder: Path, *extra: str) -> int:
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return main(["run", str(path), "--output-dir", str(folder / "run"), "--quiet", *extra])


def test_user_model_file_trains_with_fitnets_and_kd(user_recipe: dict, tmp_path: Path) -> None:
    user_recipe["train"]["epochs"] = 2
    before = hashlib.sha256((tmp_path / "my_models.py").read_bytes()).hexdigest()
    assert run(user_recipe, tmp_path) == 0
    stage = tmp_path / "run" / "distill" / "seed0"
    losses = [json.loads(line)["loss"] for line in (stage / "metrics.jsonl").open()]
    assert len(losses) == 2 and losses[1] < losses[0]  # CE + KD + hint went down
    # the exported student is the user's model only: no projector weights in it
    exported = load_file(stage / "model.safetensors")
    assert all(not key.startswith(("extras", "student.")) for key in exported)
    assert "body.0.weight" in exported and exported["body.0.weight"].shape[0] == 8
    # the projector (4·2 -> 8·2 channels, 1×1) trained with the student, in its checkpoint
    state = load_file(next((stage / "checkpoints").glob("step-*/model.safetensors")))
    assert state["extras.term2_pair0.projection.weight"].shape == (16, 8, 1, 1)
    assert (tmp_path / "my_models.py").read_text() and before == hashlib.sha256(
        (tmp_path / "my_models.py").read_bytes()
    ).hexdigest()


def test_features_from_ensemble_member_and_chains(user_recipe: dict, tmp_path: Path) -> None:
    recipe = dict(user_recipe)
    recipe["teacher"] = {
        **recipe["teacher"],
        "members": [{"name": "small", "model": {"name": "my_models.py:student"}}],
        "weights": "confidence",
        "combine": "probs",
    }
    recipe["objective"] = [
        {"loss": "kd", "temperature": 2},
        {
            "loss": "attention",
            "weight": 10,
            "student": "body",
            "teacher": "body",
            "member": "small",
        },
    ]
    recipe["generations"] = 2
    assert run(recipe, tmp_path) == 0
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert {"teacher", "teacher_small", "baseline", "distill", "distill_gen2"} <= set(
        results["stages"]
    )


def test_assistant_stage(user_recipe: dict, tmp_path: Path) -> None:
    recipe = dict(user_recipe)
    recipe["objective"] = user_recipe["objective"][:2]
    recipe["assistant"] = {"model": {"name": "my_models.py:teacher"}}
    recipe["stages"] = ["teacher", "assistant", "distill"]
    assert run(recipe, tmp_path) == 0
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert list(results["stages"]) == ["teacher", "assistant", "distill"]


def error_of(capsys: pytest.CaptureFixture[str], code: int) -> str:
    assert code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return " ".join(err.split())


def test_missing_path_lists_close_names(
    user_recipe: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    user_recipe["objective"][2]["student"] = "bodyy"
    err = error_of(capsys, run(user_recipe, tmp_path))
    # found before the teacher trains, in the dry pass over freshly built models
    assert not list((tmp_path / "run").glob("*/seed0/model.safetensors"))
    assert "bodyy" in err and "'body'" in err and "kdistill inspect" in err


def test_tap_on_module_never_called(
    user_recipe: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    user_recipe["objective"][2].update(student="unused", teacher="unused", loss="similarity")
    err = error_of(capsys, run(user_recipe, tmp_path))
    assert "unused" in err and "not" in err


def test_shapes_no_projector_can_bridge(
    user_recipe: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    user_recipe["objective"][2]["teacher"] = "head"  # (B, 10) vs the student's (B, 8, 14, 14)
    err = error_of(capsys, run(user_recipe, tmp_path))
    assert not list((tmp_path / "run").glob("*/seed0/model.safetensors"))
    print(err)
    assert "body" in err and "head" in err and "8, 14, 14" in err


def test_ensemble_members_disagree_on_classes(
    user_recipe: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import torch

    from kdistill.checkpoint import save_weights

    spec = __import__("importlib").util.spec_from_file_location("um", tmp_path / "my_models.py")
    module = __import__("importlib").util.module_from_spec(spec)
    spec.loader.exec_module(module)
    torch.manual_seed(0)
    save_weights(module.Net(4, 7), tmp_path / "seven.safetensors")
    user_recipe["teacher"]["members"] = [
        {
            "name": "other",
            "model": {"name": "my_models.py:student"},
            "checkpoint": "seven.safetensors",
        }
    ]
    err = error_of(capsys, run(user_recipe, tmp_path))
    assert "other" in err and "7" in err and "10" in err


def test_crd_with_dataset_too_small(
    user_recipe: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    user_recipe["objective"][2] = {
        "loss": "crd",
        "weight": 0.8,
        "student": {"path": "head", "read": "input"},
        "teacher": {"path": "head", "read": "input"},
        "params": {"num_negatives": 4096},
    }
    err = error_of(capsys, run(user_recipe, tmp_path))
    assert "4096" in err and "num_negatives" in err


def test_cache_with_random_augmentation(
    user_recipe: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    user_recipe["teacher"]["cache"] = True
    user_recipe["objective"] = user_recipe["objective"][:2]
    user_recipe["train"]["augment"] = {"crop": 2, "flip": True}
    err = error_of(capsys, run(user_recipe, tmp_path))
    assert "teacher.cache" in err and "augment" in err
