"""`validate`'s second pass: what a recipe's schema cannot see but `run` would refuse.

The schema checks each value alone. A task's `check` (the `check` entry of its row in
`kdistill.tasks.TASKS`) then looks at what needs the file system or a model's
signature, and neither trains nor runs user code: data files and folders exist, a
teacher checkpoint is there, a zoo model takes the `args` given, a transformers config
knows its keys, a top-k cache fits the vocabulary. Each check reuses the function the
run calls, so `validate` and `run` refuse the same things with the same words.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from kdistill.data.paths import candidates
from kdistill.errors import KdistillError, suggest

# arguments a builder passes to a zoo factory itself
IMPLICIT_ARGS = frozenset({"input_shape", "num_classes", "vocab_size"})


class Problems:
    """Problems found so far, one line each: `problems.attempt(f, ...)` calls `f` and
    keeps the message of a KdistillError it raises."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def add(self, line: str | None) -> None:
        if line:
            self.lines.append(line)

    def attempt(self, check: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        try:
            return check(*args, **kwargs)
        except KdistillError as exc:
            self.lines.append(str(exc))
            return None


def missing_path(
    where: str,
    text: str | None,
    data_root: Path | None,
    what: str,
    *,
    working_folder: bool = True,
) -> str | None:
    """A problem line when the path at YAML path `where` is nowhere the loaders look
    (`kdistill.data.paths.candidates`), else None."""
    if not text:
        return None
    tried = candidates(text, data_root, working_folder=working_folder)
    if any(p.exists() for p in tried):
        return None
    looked = ", ".join(str(p) for p in tried) or "nowhere: the data folder does not exist"
    return f"{where}: no {what} {text!r}; looked at {looked}"


def weights_problem(where: str, checkpoint: str | None) -> str | None:
    """A problem line when a checkpoint the recipe names holds no weights the run would
    find (`kdistill.stages.resolve_weights`), else None."""
    from kdistill.stages import resolve_weights

    if checkpoint is None:
        return None
    try:
        resolve_weights(checkpoint)
    except KdistillError as exc:
        return f"{where}: {exc}"
    return None


def args_problem(
    where: str, name: str, factory: Callable[..., Any], args: Iterable[str]
) -> str | None:
    """The `args` of a zoo model checked against its factory's signature: unknown names
    (with a close match) and required arguments not given."""
    params = inspect.signature(factory).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return None
    given = set(args)
    takes = [n for n in params if n not in IMPLICIT_ARGS]
    unknown = sorted(given - set(params))
    required = [
        n
        for n, p in params.items()
        if p.default is inspect.Parameter.empty
        and p.kind is not inspect.Parameter.VAR_POSITIONAL
        and n not in IMPLICIT_ARGS
        and n not in given
    ]
    if not unknown and not required:
        return None
    parts = [f"{name!r} takes no argument {key!r}{suggest(key, takes)}" for key in unknown]
    parts += [f"{name!r} needs argument {key!r}" for key in required]
    return f"{where}.args: {'; '.join(parts)}; its arguments: {', '.join(takes) or 'none'}"


def export_extra_problem(stages: Iterable[str]) -> str | None:
    """The quantize stage without the export packages installed: what to install."""
    if "quantize" not in stages:
        return None
    from kdistill.export import EXTRA, missing_onnx

    missing = missing_onnx()
    if not missing:
        return None
    return f"stages: the quantize stage needs {', '.join(missing)}, not installed here; {EXTRA}"
