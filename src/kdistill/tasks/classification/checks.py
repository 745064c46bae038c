"""What `validate` checks in a classification recipe beyond its schema (see
`kdistill.preflight`): data paths, teacher checkpoints and zoo models' arguments."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kdistill.compress.prune import PruneArgs
from kdistill.data.paths import resolve_data_root
from kdistill.errors import ModelError, suggest
from kdistill.preflight import (
    Problems,
    args_problem,
    export_extra_problem,
    missing_path,
    weights_problem,
)
from kdistill.recipe.classification import PRUNED_TEACHER, ModelSpec, Recipe

TEXT_SOURCES = ("sst2", "text_files", "hf_disk")
# recipe args of bilstm / textcnn that the builder reads itself (models/text_build.py)
_TEXT_BUILDER_ARGS = ("embedding_from", "vocab_min_freq", "vocab_size")
_HF_ARGS = ("location", "reset_head", "attn_implementation")


def check_recipe(recipe: Recipe, data_dir: str | Path | None = None) -> list[str]:
    """Every problem found, one line each, naming its YAML path."""
    problems = Problems()
    root, _ = resolve_data_root(data_dir)
    data = recipe.data
    text = data.source in TEXT_SOURCES  # these read relative paths in the data folder only
    problems.add(
        missing_path("data.path", data.path, root, "file or folder", working_folder=not text)
    )
    for field in ("train", "test"):
        problems.add(missing_path(f"data.{field}", getattr(data, field), root, "file"))
    transfer = data.text.transfer
    if transfer is not None:
        problems.add(
            missing_path(
                "data.text.transfer.file", transfer.file, root, "file", working_folder=False
            )
        )
    problems.add(export_extra_problem(recipe.stages))
    for where, spec in _model_specs(recipe):
        problems.add(_model_problem(where, spec, text=text))
    if recipe.teacher is not None:
        checkpoints = [("teacher.checkpoint", recipe.teacher.checkpoint)] + [
            (f"teacher.members[{i}].checkpoint", m.checkpoint)
            for i, m in enumerate(recipe.teacher.members)
        ]
        for where, checkpoint in checkpoints:
            problems.add(weights_problem(where, checkpoint))
    return problems.lines


def _model_specs(recipe: Recipe) -> list[tuple[str, ModelSpec]]:
    specs: list[tuple[str, ModelSpec]] = []
    if recipe.teacher is not None:
        specs.append(("teacher.model", recipe.teacher.model))
        specs += [
            (f"teacher.members[{i}].model", m.model) for i, m in enumerate(recipe.teacher.members)
        ]
    for role in ("assistant", "student"):
        section = getattr(recipe, role, None)
        if section is not None:
            specs.append((f"{role}.model", section.model))
    return specs


def _model_problem(where: str, spec: ModelSpec, *, text: bool) -> str | None:
    """A zoo name that does not exist, or args its factory does not take. A user's
    `module:factory` is not imported here: its args are checked when the run builds it."""
    from kdistill.models import ZOO
    from kdistill.models.text import bilstm, textcnn
    from kdistill.models.text_build import TEXT_ZOO

    name, args = spec.name, spec.args
    if ":" in name:
        return None
    if name in ("bilstm", "textcnn"):
        factory: Any = bilstm if name == "bilstm" else textcnn
        own = {k: v for k, v in args.items() if k not in _TEXT_BUILDER_ARGS}
        return args_problem(where, name, factory, own)
    if name == "hf":
        unknown = sorted(set(args) - set(_HF_ARGS))
        if unknown:
            return (
                f"{where}.args: 'hf' takes no argument {unknown[0]!r}"
                f"{suggest(unknown[0], _HF_ARGS)}; its arguments: {', '.join(_HF_ARGS)}"
            )
        return None
    if name == PRUNED_TEACHER:
        try:
            PruneArgs.of(dict(args), f"{where}.args")
        except ModelError as exc:
            return str(exc)
        return None
    if name in TEXT_ZOO:
        return None  # hf_student: checked against the teacher it is cut from, at run
    if name in ZOO:
        return args_problem(where, name, ZOO[name], args)
    names = sorted([*ZOO, *TEXT_ZOO]) if text else sorted(ZOO)
    return (
        f"{where}.name: unknown model {name!r}{suggest(name, names)}; the zoo has "
        f"{', '.join(names)}, or name your own as 'package.module:factory' or "
        "'path/to/file.py:factory'"
    )
