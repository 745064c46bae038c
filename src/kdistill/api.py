"""The Python API: one function per `kdistill` command, with the command's name.

    from kdistill import api
    recipe = api.load_recipe("recipes/mnist_quick.yaml", ["train.epochs=3"])
    results = api.run(recipe, output_dir="runs/quick")   # kdistill run
    api.report("runs/quick")                              # kdistill report

A recipe argument may be a recipe object, a dict with the recipe's keys, a YAML path or
a shipped recipe's name; `overrides` are `--set` values. Each function looks the task
up in `kdistill.tasks.TASKS` (from the recipe, the run folder or the stage folder) and
calls that task's function; the CLI parses its arguments and calls these. `kdistill`
itself exports run, validate, inspect and load_recipe (its plan, cache, report, ...
name the modules that do the work).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from kdistill.errors import RecipeError

if TYPE_CHECKING:
    from kdistill.plan import Plan


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Any:
    """Read a YAML recipe (a path or a shipped recipe's name), apply overrides, validate
    it with its task's schema (`kdistill.recipe.Recipe`, `kdistill.recipe.causal_lm.LMRecipe`,
    ...)."""
    from kdistill.recipe import load_recipe as load_file
    from kdistill.recipes import find_recipe

    return load_file(find_recipe(path), overrides)


def as_recipe(recipe: Any, overrides: list[str] | None = None) -> Any:
    """A validated recipe from a recipe object, a dict or a YAML path, with overrides."""
    from pydantic import BaseModel

    from kdistill.recipe import apply_overrides, validate_recipe

    if isinstance(recipe, (str, Path)):
        return load_recipe(recipe, overrides)
    if isinstance(recipe, dict):
        return validate_recipe(apply_overrides(recipe, overrides or []), source="recipe dict")
    if isinstance(recipe, BaseModel) and overrides:
        raw = apply_overrides(recipe.model_dump(mode="json"), overrides)
        return validate_recipe(raw, source=f"recipe {getattr(recipe, 'name', '')}")
    return recipe


def validate(
    recipe: Any, overrides: list[str] | None = None, *, data_dir: str | Path | None = None
) -> Any:
    """The validated recipe; a RecipeError listing every problem when it is not valid:
    its schema's, then its task's checks of what needs no training and no user code
    (data paths, checkpoints, zoo model arguments: `kdistill.preflight`)."""
    from kdistill.recipe.load import problems_error
    from kdistill.tasks import task_of_recipe

    source = str(recipe) if isinstance(recipe, (str, Path)) else "recipe"
    recipe = as_recipe(recipe, overrides)
    from kdistill.track import track_problems

    problems = task_of_recipe(recipe).function("check")(recipe, data_dir) + track_problems(recipe)
    if problems:
        raise problems_error(source, problems)
    return recipe


def run(
    recipe: Any,
    overrides: list[str] | None = None,
    *,
    output_dir: str | Path | None = None,
    data_dir: str | Path | None = None,
    resume: bool = False,
    overwrite: bool = False,
    quiet: bool = False,
) -> dict[str, Any]:
    """Run a recipe's stages; return its results (the content of results.json)."""
    from kdistill.stages import RunOptions
    from kdistill.tasks import task_of_recipe

    recipe = validate(recipe, overrides, data_dir=data_dir)
    options = RunOptions(output_dir, data_dir, resume=resume, overwrite=overwrite, quiet=quiet)
    return task_of_recipe(recipe).function("run")(recipe, options)


def distill(recipe: Any, *, overrides: list[str] | None = None, **options: Any) -> dict[str, Any]:
    """`run`, by the name the API had before it had one function per command."""
    return run(recipe, overrides, **options)


def plan(
    recipe: Any,
    overrides: list[str] | None = None,
    *,
    data_dir: str | Path | None = None,
    steps: int = 3,
    measure: bool = False,
    stages: list[str] | None = None,
    console: Any = None,
) -> Plan:
    """Memory and time of each stage, from a few real steps (`kdistill.plan.plan`)."""
    from kdistill.plan import plan as plan_recipe

    return plan_recipe(
        as_recipe(recipe, overrides),
        data_dir=data_dir,
        steps=steps,
        measure=measure,
        stages=stages,
        console=console,
    )


def evaluate(
    checkpoint: str | Path,
    *,
    data: str | None = None,
    model: str | None = None,
    data_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Measure saved weights (a stage folder, a run folder or a .safetensors file; a
    quantize stage folder: its INT8 ONNX file) with their task's metric and cost. `data` ("SOURCE[:PATH]") and `model` (a zoo name or
    module:factory) apply to classifiers: for other data, or weights without model.json."""
    from kdistill.stages import resolve_measurable
    from kdistill.tasks import task_of_checkpoint

    weights = resolve_measurable(checkpoint)
    return task_of_checkpoint(weights).function("evaluate")(
        weights, data=data, model=model, data_dir=data_dir
    )


def export(
    stage: str | Path,
    *,
    output: str | Path | None = None,
    overwrite: bool = False,
    int8: str | None = "dynamic",
    threads: int = 1,
    data_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Export a stage's model (a stage folder, or its model.safetensors) to ONNX and INT8
    ONNX, checked against PyTorch on the test data and timed (`kdistill.export`); returns
    the content of export.json. `output` defaults to <stage>/export; `int8`: "dynamic",
    "static" (calibrated on training data) or None."""
    from kdistill.errors import ExportError
    from kdistill.export import INT8_MODES

    if int8 is not None and int8 not in INT8_MODES:
        raise ExportError(f"int8 must be one of {', '.join(INT8_MODES)} or None; got {int8!r}")
    from kdistill.stages import resolve_weights
    from kdistill.tasks import task_of_checkpoint

    weights = resolve_weights(stage)
    return task_of_checkpoint(weights).function("export")(
        weights,
        output=Path(output) if output else None,
        overwrite=overwrite,
        int8=int8,
        threads=threads,
        data_dir=data_dir,
    )


def cache(
    recipe: Any,
    overrides: list[str] | None = None,
    *,
    output_dir: str | Path | None = None,
    data_dir: str | Path | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Run the recipe's trained teacher once and store its outputs; {"folder", "reused", ...}.
    Holds the run folder's lock meanwhile, as `run` does (`kdistill.lock`)."""
    from kdistill.lock import hold_folder
    from kdistill.stages import run_dir_of
    from kdistill.tasks import task_of_recipe

    recipe = as_recipe(recipe, overrides)
    with hold_folder(run_dir_of(recipe, output_dir)):
        return task_of_recipe(recipe).function("cache")(
            recipe, output_dir=output_dir, data_dir=data_dir, overwrite=overwrite
        )


def tune(
    recipe: Any,
    overrides: list[str] | None = None,
    *,
    trials: int | None = None,
    timeout: float | None = None,
    space: str | Path | None = None,
    output_dir: str | Path | None = None,
    data_dir: str | Path | None = None,
    resume: bool = False,
    overwrite: bool = False,
    final: bool = True,
    quiet: bool = False,
) -> dict[str, Any]:
    """Search the recipe's `tune.space` with Optuna (`kdistill.tune`): trials chosen on
    validation, the best settings re-run on the final seeds and measured on test once.
    `trials` overrides tune.trials, `timeout` (seconds) stops this worker's search,
    `space` is a YAML file with the tune section; returns the study's summary."""
    from kdistill.tune import tune as run_study

    return run_study(
        recipe,
        overrides,
        trials=trials,
        timeout=timeout,
        space=space,
        output_dir=output_dir,
        data_dir=data_dir,
        resume=resume,
        overwrite=overwrite,
        final=final,
        quiet=quiet,
    )


def report(run_dir: str | Path) -> dict[str, Any]:
    """Rebuild a run folder's results.json, results.md, plots and report.html from its
    files."""
    from kdistill.report_html import write_run_html
    from kdistill.tasks import task_of_run

    results = task_of_run(Path(run_dir)).function("write_report")(Path(run_dir))
    results.setdefault("report", {}).setdefault("files", []).append(write_run_html(run_dir).name)
    return results


def compare(run_dirs: list[str | Path], *, output: str | Path | None = None) -> Path:
    """One self-contained HTML page comparing runs (`kdistill.report_html`): a row per
    run and stage, their curves overlaid, quality against cost; returns its path
    (default compare.html in the current folder)."""
    from kdistill.errors import RunDirError
    from kdistill.report_html import write_compare_html

    missing = [str(r) for r in run_dirs if not (Path(r) / "results.json").is_file()]
    if missing:
        raise RunDirError(
            f"no results.json in {', '.join(missing)}: compare reads finished runs (or run "
            "`kdistill report` on a run folder first)"
        )
    if len(run_dirs) < 2:
        raise RunDirError("compare needs two run folders or more; for one, `kdistill report`")
    return write_compare_html(list(run_dirs), output or "compare.html")


def recipes() -> dict[str, Path]:
    """The shipped recipes by name."""
    from kdistill.recipes import shipped

    return shipped()


def inspect(
    model: str | Path,
    *,
    role: str = "student",
    input_shape: tuple[int, ...] = (3, 32, 32),
    num_classes: int = 10,
    args: dict[str, Any] | None = None,
    depth: int | None = None,
    data_dir: str | Path | None = None,
) -> str:
    """A model's modules with their output shapes, to choose layers to tap. `model` is
    a zoo name or module:factory (built with `args` for `input_shape` and `num_classes`),
    or a recipe (.yaml), whose `role` model is shown on a batch of the recipe's data."""
    model = str(model)
    if model.endswith((".yaml", ".yml")):
        from kdistill.tasks import task_of_recipe

        recipe = load_recipe(model)
        section = getattr(recipe, role, None)
        if section is None:
            raise RecipeError(f"{model}: the recipe has no {role} section")
        show = task_of_recipe(recipe).function("inspect")
        return show(recipe, role, depth=depth, data_dir=data_dir)
    import torch

    from kdistill.models import build_model
    from kdistill.recipe import ModelSpec
    from kdistill.taps import module_tree

    spec = ModelSpec(name=model, args=args or {})
    built = build_model(spec, input_shape=input_shape, num_classes=num_classes, where="model")
    header = f"{spec.name}: input {tuple(input_shape)}, {num_classes} classes"
    sample = torch.randn(2, *input_shape)
    return header + "\n" + module_tree(built.eval(), sample, max_depth=depth)
