"""Building models by name (kdistill.models.build_model): user factories' errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from kdistill.errors import ModelError
from kdistill.models import build_model
from kdistill.recipe import ModelSpec


def test_an_exception_from_a_users_factory_is_one_message_naming_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Any error a user's factory raises becomes a ModelError that names the factory and
    the first line of the error (the traceback stays behind --debug, chained)."""
    folder = tmp_path
    (folder / "mine.py").write_text(
        "def build(num_classes):\n"
        "    raise RuntimeError('weights file missing\\nsecond line of detail')\n"
    )
    monkeypatch.chdir(folder)
    with pytest.raises(ModelError) as info:
        build_model(
            ModelSpec(name="mine.py:build"),
            input_shape=(1, 4, 4),
            num_classes=3,
            where="student.model",
        )
    message = str(info.value)
    assert message.startswith("student.model: your factory 'mine.py:build' raised RuntimeError")
    assert "weights file missing" in message and "second line" not in message
    assert "--debug" in message and isinstance(info.value.__cause__, RuntimeError)


# ---------------------------------------------------------------- what a recipe may run


@pytest.mark.parametrize(
    "name", ["os:system", "subprocess:run", "builtins:exec", "shutil.os:system"]
)
def test_standard_library_factories_are_refused_before_any_call(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import os

    from kdistill.errors import RecipeError
    from kdistill.models import build_model
    from kdistill.recipe import ModelSpec, validate_recipe

    calls: list[object] = []
    monkeypatch.setattr(os, "system", lambda *a: calls.append(a))
    recipe = {
        "name": "x",
        "data": {"source": "mnist"},
        "student": {"model": {"name": name, "args": {"command": "echo hi"}}},
        "stages": ["baseline"],
    }
    with pytest.raises(RecipeError, match=r"student\.model\.name: .*standard library"):
        validate_recipe(recipe)
    # the builder refuses it too, for a spec made without validation
    spec = ModelSpec.model_construct(name=name, args={"command": "echo hi"}, tokenizer=None)
    with pytest.raises(ModelError, match=r"student\.model\.name: .*standard library"):
        build_model(spec, input_shape=(1, 28, 28), num_classes=10, where="student.model")
    assert calls == []


def test_a_model_file_is_found_beside_the_recipe_and_its_import_is_logged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from kdistill.models import build_model
    from kdistill.recipe import load_recipe

    folder = tmp_path / "shared_recipes"
    folder.mkdir()
    (folder / "nets.py").write_text(
        "from torch import nn\n"
        "def make(input_shape, num_classes):\n"
        "    return nn.Sequential(nn.Flatten(), nn.Linear(784, num_classes))\n"
    )
    recipe = {
        "name": "x",
        "data": {"source": "mnist"},
        "student": {"model": {"name": "nets.py:make"}},
        "stages": ["baseline"],
    }
    (folder / "r.yaml").write_text(yaml.safe_dump(recipe))
    elsewhere = tmp_path / "work"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    loaded = load_recipe(folder / "r.yaml")
    assert loaded.student.model.name == f"{(folder / 'nets.py').resolve()}:make"
    monkeypatch.setenv("COLUMNS", "500")
    build_model(
        loaded.student.model, input_shape=(1, 28, 28), num_classes=10, where="student.model"
    )
    assert f"importing model code from {(folder / 'nets.py').resolve()}" in capsys.readouterr().err
    # not beside the recipe: the name is kept, and resolves against the working folder
    (folder / "nets.py").rename(elsewhere / "nets.py")
    assert load_recipe(folder / "r.yaml").student.model.name == "nets.py:make"
