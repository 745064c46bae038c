"""Golden values: every shipped recipe, reduced to a few steps per stage, must train to the
same losses, metrics, quality numbers and final weights as the code that wrote
tests/golden/*.json (float32 values at 1e-6 relative). The files are read-only here;
`python scripts/golden.py` regenerates them, in a commit of its own that says why. Each
processor maker has its own set (the last digits differ between makers; see the
script)."""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path
from types import ModuleType

import pytest
from helpers import chromium, open_in_chromium

ROOT = Path(__file__).resolve().parents[1]


def _golden_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("kdistill_golden", ROOT / "scripts" / "golden.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


golden = _golden_module()


def test_every_shipped_recipe_has_a_golden_configuration() -> None:
    from kdistill.recipes import shipped

    covered = {recipe for recipe, _ in golden.CONFIGS.values()}
    assert covered == set(shipped()), "add the new recipe to scripts/golden.py CONFIGS"
    for name in golden.CONFIGS:
        recorded = golden.golden_path(name).is_file() or golden.other_makers(name)
        assert recorded, f"no golden values: run python scripts/golden.py {name}"


def test_each_processor_maker_has_its_own_set(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    assert golden.golden_path("x", golden.BASE_VENDOR) == golden.GOLDEN_DIR / "x.json"
    assert golden.golden_path("x", "AuthenticAMD") == golden.GOLDEN_DIR / "AuthenticAMD/x.json"
    assert golden.vendor() != ""
    monkeypatch.setattr(golden, "GOLDEN_DIR", tmp_path)
    monkeypatch.setattr(golden, "vendor", lambda: "AuthenticAMD")
    (tmp_path / "x.json").write_text("{}")
    (tmp_path / "Other").mkdir()
    (tmp_path / "Other" / "x.json").write_text("{}")
    (tmp_path / "AuthenticAMD").mkdir()
    (tmp_path / "AuthenticAMD" / "x.json").write_text("{}")
    assert golden.golden_path("x") == tmp_path / "AuthenticAMD" / "x.json"
    assert golden.other_makers("x") == {
        golden.BASE_VENDOR: tmp_path / "x.json",
        "Other": tmp_path / "Other" / "x.json",
    }


def test_compare_finds_a_changed_value() -> None:
    values = {"losses": [1.0, 2.0], "distill/seed0": {"weights": {"w": [3.0, 4.0, 5.0]}}}
    assert golden.compare(values, values) == []
    moved = {"losses": [1.0, 2.0], "distill/seed0": {"weights": {"w": [3.0, 4.00001, 5.0]}}}
    assert golden.compare(values, moved) == ["/distill/seed0/weights/w[1]: 4.00001, golden 4.0"]
    assert golden.compare(values, {"losses": [1.0]}) != []


# the configurations run in two files, so that test workers (one file each) share them
FIRST_HALF = sorted(golden.CONFIGS)[0::2]
SECOND_HALF = sorted(golden.CONFIGS)[1::2]


@pytest.mark.slow
@pytest.mark.parametrize("name", FIRST_HALF)
def test_golden(
    name: str, shared_data: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    check_golden(name, shared_data, monkeypatch, tmp_path)


def check_golden(
    name: str, shared_data: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The configuration trains to its golden values, and its report.html opens in a
    browser without errors or requests."""
    monkeypatch.setenv("KDISTILL_DATA", str(shared_data))
    path = golden.golden_path(name)
    if not path.is_file():
        others = ", ".join(golden.other_makers(name)) or "none"
        pytest.fail(
            f"{path} is missing: no golden values of {name} were recorded on a processor of "
            f"this maker ({golden.vendor()}; recorded on: {others}). Check that the code's "
            f"numbers did not change, then record them: python scripts/golden.py {name}"
        )
    expected = json.loads(path.read_text())
    pages: list[Path] = []

    def keep_report(run_dir: Path) -> None:
        if (run_dir / "report.html").is_file():
            pages.append(tmp_path / "report.html")
            shutil.copy(run_dir / "report.html", pages[0])

    actual = json.loads(json.dumps(golden.record(name, keep_report)))  # the same float round trip
    problems = golden.compare(expected, actual)
    assert not problems, f"{len(problems)} values differ from the golden file:\n" + "\n".join(
        problems[:20]
    )
    # every shipped recipe's report.html opens in a browser without errors or requests
    assert pages, "the run wrote no report.html"
    if chromium() is not None:
        errors, requests = open_in_chromium(pages[0])
        assert errors == [] and requests == [pages[0].resolve().as_uri()]
