"""Building models by name (kdistill.models.build_model): user factories' errors."""

from __future__ import annotations

from pathlib import Path

import pytest

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
