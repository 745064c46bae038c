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
