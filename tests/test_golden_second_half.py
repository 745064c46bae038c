"""The second half of the golden configurations (tests/test_golden.py runs the first):
a file of their own, so that two test workers share them."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_golden import SECOND_HALF, check_golden


@pytest.mark.slow
@pytest.mark.parametrize("name", SECOND_HALF)
def test_golden(
    name: str, shared_data: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    check_golden(name, shared_data, monkeypatch, tmp_path)
