"""The tasks, and the one place that dispatches on a recipe's `task`.

A task module (`tasks/classification/steps.py`, `tasks/causal_lm/steps.py`) holds exactly the
differences `fit` must not know: how rows become a batch, forward + loss given the
teacher's signal, what the loss is divided by (samples or counted tokens), the
validation score and its direction. `TASKS` names, per task, its recipe schema (a branch
of the union `kdistill.recipe.load` validates against) and the functions behind the
commands (run, cache, report); the recipe loader, `kdistill.distill` and the CLI look a
recipe's task up here and nowhere else. A new task adds one row.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kdistill.errors import RecipeError, suggest

DEFAULT_TASK = "classification"


@dataclass(frozen=True)
class Task:
    """One task's entry points, as "module:function" names imported on first use (a
    language-model run does not import the image pipeline, nor the reverse)."""

    name: str
    summary: str
    schema: str  # the task's recipe schema, one branch of `kdistill.recipe.recipe_union`
    run: str  # (recipe, stages.RunOptions) -> results (the content of results.json)
    cache: str  # (recipe, output_dir=, data_dir=, overwrite=) -> {"folder", "reused", ...}
    evaluate: str  # (weights, data=, model=, data_dir=) -> measurements of saved weights
    inspect: str  # (recipe, role, depth=, data_dir=) -> the role's modules, as text
    write_report: str  # (run_dir) -> results
    print_table: str  # (results, console) -> None
    eval_summary: str  # (the measurements of `evaluate`) -> one line for the terminal
    check: str  # (recipe, data_dir) -> problems `validate` finds beyond the schema
    export: str  # (weights, output=, overwrite=, int8=, threads=, data_dir=) -> export.json
    export_summary: str  # (what export returned) -> one line for the terminal
    # the metrics.jsonl key of the validation score that picks the best epoch, and
    # whether higher is better (`kdistill tune` optimises it)
    score: tuple[str, bool]
    # (recipe, data_dir, device, steps) -> (stage specs, data bytes, data text, notes) of
    # `kdistill plan`; None: no estimate for this task yet (plan says so)
    plan: str | None = None
    # run-level folders every stage reads besides teacher/ and cache/ (translation: the
    # tokenizer trained once per run); a `kdistill tune` trial links the study's
    run_folders: tuple[str, ...] = ()

    def function(self, which: str) -> Callable[..., Any]:
        entry = getattr(self, which)
        if entry is None:
            raise RecipeError(
                f"kdistill {which} is not built for task {self.name} yet (run, validate, "
                "eval, inspect, cache and report are)"
            )
        module, _, name = entry.partition(":")
        return getattr(importlib.import_module(module), name)


TASKS: dict[str, Task] = {
    "classification": Task(
        "classification",
        "images, tables and texts into classes",
        schema="kdistill.recipe.classification:Recipe",
        run="kdistill.tasks.classification.pipeline:run",
        cache="kdistill.tasks.classification.teacher_cache:cache_teacher",
        evaluate="kdistill.tasks.classification.measure:evaluate_checkpoint",
        inspect="kdistill.tasks.classification.measure:inspect_recipe",
        write_report="kdistill.tasks.classification.report:write_report",
        print_table="kdistill.tasks.classification.report:print_table",
        eval_summary="kdistill.tasks.classification.report:eval_summary",
        check="kdistill.tasks.classification.checks:check_recipe",
        export="kdistill.tasks.classification.export:export_classifier",
        export_summary="kdistill.tasks.classification.export:export_summary",
        score=("val_accuracy", True),
        plan="kdistill.tasks.classification.plan:classifier_stages",
    ),
    "causal_lm": Task(
        "causal_lm",
        "next-token language modelling (a corpus or prompt/completion pairs)",
        schema="kdistill.recipe.causal_lm:LMRecipe",
        run="kdistill.tasks.causal_lm.pipeline:run_lm",
        cache="kdistill.tasks.causal_lm.teacher_cache:cache_lm_teacher",
        evaluate="kdistill.tasks.causal_lm.measure:evaluate_lm_checkpoint",
        inspect="kdistill.tasks.causal_lm.measure:inspect_lm_recipe",
        write_report="kdistill.tasks.causal_lm.report:write_lm_report",
        print_table="kdistill.tasks.causal_lm.report:print_lm_table",
        eval_summary="kdistill.tasks.causal_lm.report:eval_summary",
        check="kdistill.tasks.causal_lm.checks:check_lm_recipe",
        export="kdistill.tasks.causal_lm.export:export_lm",
        export_summary="kdistill.tasks.causal_lm.export:export_summary",
        score=("val_loss", False),
        plan="kdistill.tasks.causal_lm.plan:lm_stages",
    ),
    "token_classification": Task(
        "token_classification",
        "a label per word: named entities (CoNLL-format IOB2 files)",
        schema="kdistill.recipe.token_classification:TaggingRecipe",
        run="kdistill.tasks.token_classification.pipeline:run",
        cache="kdistill.tasks.token_classification.pipeline:cache_teacher",
        evaluate="kdistill.tasks.token_classification.pipeline:evaluate_checkpoint",
        inspect="kdistill.tasks.token_classification.pipeline:inspect_recipe",
        write_report="kdistill.tasks.token_classification.report:write_report",
        print_table="kdistill.tasks.token_classification.report:print_table",
        eval_summary="kdistill.tasks.token_classification.report:eval_summary",
        check="kdistill.tasks.token_classification.pipeline:check_recipe",
        export="kdistill.tasks.token_classification.pipeline:export_tagger",
        export_summary="kdistill.tasks.encoder_export:export_summary",
        score=("val_f1", True),
        plan="kdistill.tasks.token_classification.pipeline:plan_stages",
    ),
    "seq2seq": Task(
        "seq2seq",
        "translation with an encoder-decoder (parallel text; BLEU and chrF)",
        schema="kdistill.recipe.seq2seq:Seq2SeqRecipe",
        run="kdistill.tasks.seq2seq.pipeline:run",
        cache="kdistill.tasks.seq2seq.pipeline:cache_teacher",
        evaluate="kdistill.tasks.seq2seq.measure:evaluate_checkpoint",
        inspect="kdistill.tasks.seq2seq.measure:inspect_recipe",
        write_report="kdistill.tasks.seq2seq.report:write_report",
        print_table="kdistill.tasks.seq2seq.report:print_table",
        eval_summary="kdistill.tasks.seq2seq.report:eval_summary",
        check="kdistill.tasks.seq2seq.pipeline:check_recipe",
        export="kdistill.tasks.seq2seq.export:export_translator",
        export_summary="kdistill.tasks.seq2seq.export:export_summary",
        score=("val_bleu", True),
        plan="kdistill.tasks.seq2seq.plan:seq2seq_stages",
        run_folders=("tokenizer",),
    ),
    "question_answering": Task(
        "question_answering",
        "extractive question answering: a span of a paragraph (SQuAD-format JSON)",
        schema="kdistill.recipe.question_answering:QARecipe",
        run="kdistill.tasks.question_answering.pipeline:run",
        cache="kdistill.tasks.question_answering.pipeline:cache_teacher",
        evaluate="kdistill.tasks.question_answering.pipeline:evaluate_checkpoint",
        inspect="kdistill.tasks.question_answering.pipeline:inspect_recipe",
        write_report="kdistill.tasks.question_answering.report:write_report",
        print_table="kdistill.tasks.question_answering.report:print_table",
        eval_summary="kdistill.tasks.question_answering.report:eval_summary",
        check="kdistill.tasks.question_answering.pipeline:check_recipe",
        export="kdistill.tasks.question_answering.pipeline:export_reader",
        export_summary="kdistill.tasks.encoder_export:export_summary",
        score=("val_f1", True),
        plan="kdistill.tasks.question_answering.pipeline:plan_stages",
    ),
}


def task_named(name: Any, *, source: str = "recipe") -> Task:
    """The task of a recipe's `task:` value; an unknown one is a RecipeError."""
    if isinstance(name, str) and name in TASKS:
        return TASKS[name]
    raise RecipeError(
        f"{source}: task: unknown task {name!r}{suggest(str(name), TASKS)}; the tasks are "
        + ", ".join(f"{t.name} ({t.summary})" for t in TASKS.values())
    )


def task_of(raw: Any, *, source: str = "recipe") -> Task:
    """The task a parsed recipe names (`task:`, default classification)."""
    name = raw.get("task", DEFAULT_TASK) if isinstance(raw, dict) else DEFAULT_TASK
    return task_named(name, source=source)


def task_of_recipe(recipe: Any) -> Task:
    """The task of a validated recipe (its schema's `task` field)."""
    return TASKS[getattr(recipe, "task", DEFAULT_TASK)]


def task_of_run(run_dir: Path) -> Task:
    """The task of a run folder, from the recipe.yaml it holds (classification when it
    has none, as runs written before the field existed)."""
    from kdistill.recipe import read_yaml

    path = Path(run_dir) / "recipe.yaml"
    if not path.is_file():
        return TASKS[DEFAULT_TASK]
    return task_of(read_yaml(path), source=str(path))


def task_of_checkpoint(weights: Path) -> Task:
    """The task of saved weights, from the model.json beside them (classification when
    there is none: a bare .safetensors file evaluated with --model)."""
    import json

    info = Path(weights).with_name("model.json")
    if not info.is_file():
        return TASKS[DEFAULT_TASK]
    return task_named(json.loads(info.read_text()).get("task", DEFAULT_TASK), source=str(info))
