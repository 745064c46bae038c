"""The command line directly: every command takes --debug, before or after its name, and
an error prints one paragraph (exit 2) unless --debug asks for the traceback."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from kdistill.cli import build_parser, main
from kdistill.errors import RecipeError

# the arguments each command needs besides --debug
REQUIRED = {
    "run": ["r.yaml"],
    "validate": ["r.yaml"],
    "plan": ["r.yaml"],
    "eval": ["runs/x"],
    "export": ["runs/x/distill/seed0"],
    "cache": ["r.yaml"],
    "inspect": ["mlp"],
    "recipes": [],
    "report": ["runs/x"],
    "tune": ["r.yaml"],
    "compare": ["runs/a", "runs/b"],
}


def _commands() -> list[str]:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sorted(sub.choices)


def test_the_table_above_names_every_command() -> None:
    assert _commands() == sorted(REQUIRED)


@pytest.mark.parametrize("command", sorted(REQUIRED))
def test_every_command_takes_debug_before_or_after_its_name(command: str) -> None:
    parser = build_parser()
    assert parser.parse_args([command, *REQUIRED[command]]).debug is False
    assert parser.parse_args([command, *REQUIRED[command], "--debug"]).debug is True
    assert parser.parse_args(["--debug", command, *REQUIRED[command]]).debug is True


def test_an_error_is_one_paragraph_unless_debug(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = str(tmp_path / "nope.yaml")
    assert main(["validate", missing]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "Traceback" not in err
    with pytest.raises(RecipeError):
        main(["validate", missing, "--debug"])


def test_a_reader_that_goes_away_ends_the_listing_quietly() -> None:
    """`kdistill recipes | head -1`: the pipe closes before kdistill writes; no traceback."""
    import subprocess
    import sys

    process = subprocess.Popen(
        [sys.executable, "-m", "kdistill.cli", "recipes"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert process.stdout is not None and process.stderr is not None
    process.stdout.close()  # before the interpreter has even started writing
    err = process.stderr.read().decode()
    assert process.wait(timeout=60) == 0, err
    assert "Traceback" not in err and "BrokenPipeError" not in err


def test_every_command_is_an_api_function_of_its_name() -> None:
    """The CLI verbs and kdistill.api are the same functions (eval is api.evaluate)."""
    import argparse

    from kdistill import api
    from kdistill.cli import build_parser

    (commands,) = [
        action.choices
        for action in build_parser()._actions
        if isinstance(action, argparse._SubParsersAction)
    ]
    assert set(commands) == {
        "run",
        "validate",
        "plan",
        "eval",
        "export",
        "cache",
        "inspect",
        "recipes",
        "report",
        "tune",
        "compare",
    }
    for command in commands:
        assert callable(getattr(api, {"eval": "evaluate"}.get(command, command))), command
    assert "mnist_quick" in api.recipes()
    recipe = api.validate("mnist_quick", ["train.epochs=2"])
    assert recipe.train.epochs == 2 and recipe.task == "classification"
    with pytest.raises(RecipeError, match="did you mean 'train'"):
        api.validate({"name": "x", "data": {"source": "mnist"}, "trian": {}})


def test_python_dash_m_kdistill_is_the_command_line() -> None:
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-m", "kdistill", "validate", "mnist_quick"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "valid classification recipe 'mnist_quick'" in done.stderr
