"""`kdistill plan` for the tasks on a text encoder (token classification, question
answering), written once: the stages teacher, baseline and distill as
`kdistill.tasks.encoder` runs them, each stage's micro-step the task's own
`steps.loss` with the plan's probes around it.

These tasks read the teacher from one pass over the training rows before a stage that
learns from it, so no teacher model runs while the student trains: the plan hands the
stage's steps zeros of the shapes that pass writes (`EncoderTask.signal_stand_in`)
instead of running an untrained teacher over every training row, and sizes the cache
of that signal. Batches come in the task's own order (length buckets); one untimed step
on the longest rows sets the peak.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from kdistill.errors import RecipeError
from kdistill.plan.probes import LayerTensors, SavedTensors
from kdistill.plan.results import CacheSize
from kdistill.plan.stage import (
    PlanPlacement,
    Probe,
    Session,
    StageSpec,
    step_rows,
    steps_in_epoch,
    training_step,
)
from kdistill.tasks.encoder import EncoderTask, baseline_objective, bind_features


def encoder_stages(
    task: EncoderTask, recipe: Any, data_dir: str | Path | None, device: torch.device, steps: int
) -> tuple[list[StageSpec], int, str, list[str]]:
    """The trained stages of an encoder task's recipe, in the order its run trains them."""
    from kdistill.losses.objective import Objective
    from kdistill.recipe import LossTerm

    data = task.load(recipe.data, data_dir)
    specs: list[StageSpec] = []
    notes: list[str] = []
    teacher_cfg, seed = recipe.teacher, recipe.seeds[0]
    # the plan counts memory and time, not accuracy: an untrained teacher will do for
    # the shapes of its signal and as the source of a student cut from its layers
    teacher = None
    if teacher_cfg is not None:  # a baseline-only recipe has none
        torch.manual_seed(seed)
        teacher = task.make_model(data, teacher_cfg.model, where="teacher.model")
    for name in recipe.stages:
        if name == "teacher":
            if teacher_cfg.checkpoint is not None:
                notes.append("teacher: weights from teacher.checkpoint, not trained")
                continue
            trained = (teacher_cfg.model, "teacher.model")
            objective = Objective([LossTerm(loss="cross_entropy")])
            settings, prefix = recipe.teacher_train(), "teacher.train"
        else:
            trained = (recipe.student.model, "student.model")
            settings, prefix = recipe.train, "train"
            if name == "baseline":
                objective = baseline_objective(recipe)
            else:
                objective = Objective(recipe.objective)
        specs.append(
            _stage(
                task, recipe, data, name, trained, objective, settings, prefix, device, seed,
                teacher,
            )
        )  # fmt: skip
    return specs, 0, task.describe(data), notes


def _stage(
    task: EncoderTask,
    recipe: Any,
    data: Any,
    name: str,
    trained: tuple[Any, str],
    objective: Any,
    settings: Any,
    prefix: str,
    device: torch.device,
    seed: int,
    teacher: nn.Module | None,
) -> StageSpec:
    from kdistill.optim import make_optimizer
    from kdistill.steps import order_seed

    spec, where = trained
    reads = objective.needs_teacher
    stage_data = task.distill_data(data) if reads else data
    source = teacher if where == "student.model" else None
    signal = None
    if reads:
        if task.signal_stand_in is None:
            raise RecipeError(
                f"kdistill plan cannot plan the {name} stage of task {task.name}: the task "
                "does not describe the shapes of its teacher signal (signal_stand_in)"
            )
        assert teacher is not None  # the recipe's checks: distill needs a teacher
        signal = task.signal_stand_in(stage_data, teacher)
    # feature terms hook the teacher, which then runs live beside the student
    live = teacher.to(device).eval() if teacher is not None and objective.feature_terms else None

    def make() -> nn.Module:
        torch.manual_seed(seed)
        return task.make_model(stage_data, spec, where=where, teacher=source).to(device)

    # the rows, their order and the longest ones, in the trained model's tokenization
    lengths = task.lengths(stage_data, make(), "train")
    n_train = len(lengths)
    steps_per_epoch = steps_in_epoch(n_train, settings, name, "rows")
    micro = settings.batch_size // settings.grad_accum
    longest = torch.argsort(lengths, descending=True, stable=True)

    def build() -> Session:
        model = make()
        if live is not None:
            bind_features(task, objective, model, live, stage_data, device=device, seed=seed)
        optimizer = make_optimizer(model, settings.optimizer)
        steps = task.steps(
            model, data=stage_data, objective=objective, teacher=signal, settings=settings,
            accelerator=PlanPlacement(device, settings.precision), label=name,
            **({"live_teacher": live} if live is not None else {}),
        )  # fmt: skip
        generator = torch.Generator().manual_seed(order_seed(seed, 0))
        order = steps.epoch_order(generator, settings.batch_size)

        def micro_step(rows: Tensor, scale: float, counter: SavedTensors | None = None) -> Probe:
            outputs: list[Any] = []
            hook = model.register_forward_hook(lambda module, args, out: outputs.append(out))
            try:
                with (
                    counter or contextlib.nullcontext(),
                    LayerTensors([model] if counter is not None else []) as layers,
                ):
                    total, _ = steps.loss(model, rows, progress=0.0)
            finally:
                hook.remove()
            handed = sum(signal[r].numel() * 4 for r in rows.tolist()) if signal else 0
            if counter is None:
                (total * scale).backward()
                return Probe(0, 0, handed, 0)
            _count(counter, outputs[-1] if outputs else None)
            with counter.gradients_during(model.parameters()):
                (total * scale).backward()
            forward = layers.largest_unsaved(counter)
            layers.clear()
            return Probe(
                counter.bytes, counter.backward_bytes, handed, 0, forward,
                counter.backward_with_gradients,
            )  # fmt: skip

        def run(rows: Tensor) -> None:
            # fit divides the step's summed loss by the step's counted units
            scale = 1.0 / max(steps.count(rows, rows, 0).total, 1)
            training_step(model, optimizer, settings, rows, lambda part: micro_step(part, scale))

        def probe() -> Probe:
            model.train()
            result = micro_step(longest[:micro], 1.0, SavedTensors([model]))
            optimizer.zero_grad(set_to_none=True)
            return result

        return Session(
            model,
            [] if live is None else [live],
            optimizer,
            lambda i: run(step_rows(order, i, settings.batch_size, steps_per_epoch)),
            probe,
            heaviest=lambda: run(longest[: settings.batch_size]),
        )

    cache = None
    if signal is not None:
        size = sum(row.numel() * 4 for row in signal) + 8 * len(signal)
        cache = CacheSize(
            "signal",
            size,
            f"{len(signal):,} training rows × the teacher's per-row scores, float32",
            in_use=recipe.reads_teacher_cache(),
        )
    notes = [
        "activations measured on the micro-batch of the longest rows; the step time is of "
        "ordinary batches"
    ]
    if reads and live is None:
        notes.append(
            "the teacher's signal comes from one pass over the training rows before the stage "
            "(not planned); the run keeps the trained teacher in memory beside the student, "
            "which the estimate does not count"
        )
    elif live is not None:
        notes.append(
            "the teacher's scores come from one pass over the training rows before the stage "
            "(not planned); its features come from a forward pass on each batch: the "
            "estimate counts its weights and the time of that pass"
        )
    return StageSpec(
        name=name,
        where=where,
        prefix=prefix,
        settings=settings,
        teacher=None if not reads else "one pass" if live is None else "one pass + live",
        build=build,
        steps_per_epoch=steps_per_epoch,
        loss=None,
        cache=cache,
        options={},
        notes=notes,
    )


def _count(counter: SavedTensors, value: Any) -> None:
    """Count the tensors of a model's output (a tensor, or a Hugging Face output)."""
    if isinstance(value, Tensor):
        counter.add(value)
    elif isinstance(value, Mapping):
        for item in value.values():
            _count(counter, item)
    elif isinstance(value, Sequence) and not isinstance(value, str):
        for item in value:
            _count(counter, item)
