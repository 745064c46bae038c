from __future__ import annotations

import os
from pathlib import Path

import pytest
from helpers import tiny_recipe


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The folder of real datasets: $KDISTILL_DATA, else shared/data next to the repo."""
    default = Path(__file__).resolve().parents[1].parent / "shared" / "data"
    path = Path(os.environ.get("KDISTILL_DATA", default))
    if not path.is_dir():
        pytest.skip(f"no shared data folder at {path}; set KDISTILL_DATA")
    return path


@pytest.fixture()
def tiny(shared_data: Path, monkeypatch: pytest.MonkeyPatch) -> dict:
    monkeypatch.setenv("KDISTILL_DATA", str(shared_data))
    return tiny_recipe()


def _quick_timing() -> None:
    """Latency numbers over a few passes: the tests check what is measured and written,
    not how fast (BENCHMARKS.md's scripts time with the defaults)."""
    import kdistill.evaluate
    import kdistill.export

    quick = kdistill.evaluate.Timing(repeats=2, singles=4, warmup=1)
    kdistill.evaluate.TIMING = quick
    kdistill.export.TIMING = quick


_quick_timing()
