"""The bad-recipe corpus (tests/bad_recipes/): every file is refused with exit code 2,
one paragraph and no traceback, naming where the problem is; every problem that needs
no training and no user code is refused by `validate`, the rest by `run` before any
training. Each recipe's `# expect:` lines are substrings its message must contain."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from kdistill.cli import main

CORPUS = Path(__file__).parent / "bad_recipes"
FILES = sorted(CORPUS.glob("*.yaml"))


def _header(path: Path, key: str) -> list[str]:
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    prefix = f"# {key}:"
    return [line[len(prefix) :].strip() for line in lines if line.startswith(prefix)]


def test_the_corpus_covers_both_tasks_and_every_section() -> None:
    assert len(FILES) >= 30
    text = " ".join(" ".join(_header(p, "expect")) for p in FILES)
    for place in ("data.", "teacher.", "student.", "objective[", "train.", "seeds", "stages"):
        assert place in text, place
    assert sum("task: causal_lm" in p.read_text(errors="replace") for p in FILES) >= 10


@pytest.mark.parametrize("path", FILES, ids=[p.stem for p in FILES])
def test_a_bad_recipe_exits_2_naming_the_place(
    path: Path,
    tmp_path: Path,
    shared_data: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("KDISTILL_DATA", str(shared_data))
    monkeypatch.setenv("COLUMNS", "1000")  # one message, unwrapped
    expect = _header(path, "expect")
    assert expect, f"{path.name} has no '# expect:' line"
    # a copy with its neighbours, so `file.py:factory` names resolve next to the recipe
    folder = tmp_path / "recipes"
    shutil.copytree(CORPUS, folder)
    recipe = folder / path.name
    monkeypatch.chdir(tmp_path)
    at_run = _header(path, "at") == ["run"]
    if at_run:
        # user code is imported by run only: validate passes and says nothing about it
        assert main(["validate", str(recipe)]) == 0, capsys.readouterr().err
        capsys.readouterr()
        argv = ["run", str(recipe), "--output-dir", str(tmp_path / "out"), "--quiet"]
    else:
        argv = ["validate", str(recipe)]
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err, err
    message = " ".join(err.split())
    for needle in expect:
        assert needle in message, f"{needle!r} not in: {message}"
    if at_run:
        assert not list((tmp_path / "out").glob("*/seed*/metrics.jsonl")), "it trained"
