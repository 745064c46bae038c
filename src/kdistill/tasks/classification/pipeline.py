"""Stages of a run: teacher, baseline, distill; and the other commands' entry points.

`run` is what `kdistill run` and `kdistill.distill()` call. It reads like the
recipe: set up the run folder and data, get a teacher (train it or load it),
then for each seed train the student alone (baseline) and with the teacher
(distill), measure each once on test, and build the report from the files.

Run folder:
    recipe.yaml  run.json  results.json  results.md  plots/
    teacher/seed0/   baseline/seed<k>/   distill/seed<k>/    each with
        model.safetensors  model.json  best.safetensors  eval.json  metrics.jsonl  checkpoints/
        hf/   (Hugging Face models) the final weights as a save_pretrained folder + tokenizer
    cache/teacher-seed<k>/   teacher logits, when teacher.cache is on
"""

from __future__ import annotations

import contextlib
import copy
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdistill.cache import open_cache, write_cache
from kdistill.checkpoint import (
    atomic_write_json,
    file_sha256,
    load_weights,
)
from kdistill.compress import qat
from kdistill.compress.prune import PruneArgs, resize_to, step_ratios
from kdistill.data import DataBundle, TextData
from kdistill.data import build as build_data
from kdistill.errors import CheckpointError, RecipeError
from kdistill.losses.objective import Objective, reads_teacher
from kdistill.models.hf import weights_follow
from kdistill.recipe import LossTerm, ModelSpec, Recipe, TrainConfig
from kdistill.stages import (
    RunContext,
    RunOptions,
    StageTable,
    finish_run,
    finished,
    finished_earlier,
    label,
    log_start,
    open_run,
    resolve_weights,
    run_stages,
    stage_dir,
    train_stage,
)
from kdistill.tasks.classification.measure import measure_stage
from kdistill.tasks.classification.models import make_model, sample_inputs
from kdistill.tasks.classification.prune import prune_step
from kdistill.tasks.classification.report import write_report
from kdistill.tasks.classification.steps import ClassifierSteps
from kdistill.tasks.classification.teacher_cache import cache_folder
from kdistill.teachers import (
    CachedTeacher,
    EnsembleTeacher,
    LiveTeacher,
    TeacherSignal,
)


@dataclass
class Context(RunContext):
    recipe: Recipe
    data: DataBundle | TextData
    teacher_test: dict[int, torch.Tensor] = field(default_factory=dict)
    # the main teacher of each teacher seed, for students built from its layers
    teachers: dict[int, nn.Module] = field(default_factory=dict)


def run(recipe: Recipe, options: RunOptions) -> dict[str, Any]:
    """Run the recipe's stages and return the results (the content of results.json)."""
    with open_run(recipe, options, setup=lambda: build_data(recipe.data, options.data_dir)) as (
        run,
        data,
    ):
        assert data is not None
        ctx = Context(**run.shared(), data=data)
        log_start(
            ctx,
            f"data: {len(data.train)} train, {len(data.val)} val, {len(data.test)} test, "
            f"{data.num_classes} classes",
        )
        _run_stages(ctx)
        return finish_run(ctx, partial(write_report, plots=recipe.output.plots))


def _run_stages(ctx: Context) -> None:
    """The teacher (or teachers) and assistant once (or per seed), then per seed the
    baseline and the distill stage (with its born-again generations)."""
    recipe = ctx.recipe
    _check_models(recipe, ctx.data)
    teacher_seeds: list[int] = []
    if recipe.teacher is not None and (
        {"teacher", "assistant", "distill"} & set(recipe.stages) or recipe.student_from_teacher
    ):
        teacher_seeds = recipe.seeds if recipe.teacher.every_seed else recipe.seeds[:1]
    run_stages(ctx, STAGES, teacher_seeds=teacher_seeds, generations=recipe.generations)


# ----------------------------------------------------------------------- stages


def _check_models(recipe: Recipe, data: DataBundle | TextData) -> None:
    """Build every model the stages need once, and hook the distill objective's features
    into them in a dry pass, so a student that does not fit the data, a tap path that does
    not exist or shapes no projector bridges fail now and not after the teacher has trained
    for hours. Each stage seeds its own build, so this does not change any weights."""
    specs: list[tuple[ModelSpec, str]] = []
    if recipe.teacher is not None and (
        {"teacher", "assistant", "distill"} & set(recipe.stages) or recipe.student_from_teacher
    ):
        specs.append((recipe.teacher.model, "teacher.model"))
        specs += [(m.model, f"teacher.members.{m.name}.model") for m in recipe.teacher.members]
    if recipe.assistant is not None and "assistant" in recipe.stages:
        specs.append((recipe.assistant.model, "assistant.model"))
    if recipe.student is not None and {"prune", "baseline", "distill"} & set(recipe.stages):
        specs.append((recipe.student.model, "student.model"))
    built: dict[str, nn.Module] = {}
    # seeded apart from the run's random state, so that the check (a pruned student is
    # cut from this untrained teacher) is the same on every run and changes nothing after
    with torch.random.fork_rng(devices=[]):  # the check builds on the CPU
        torch.manual_seed(0)
        for spec, where in specs:  # the teacher first: a student may be built from it
            with weights_follow():  # built to check, then thrown away: stages say the notes
                built[where] = make_model(
                    data, spec, where=where, teacher=built.get("teacher.model")
                )
    objective = Objective(recipe.objective)
    if "distill" not in recipe.stages or not objective.feature_terms:
        return
    if "assistant" in recipe.stages:  # the assistant teaches the distill stage
        teachers = {"main": built["assistant.model"]}
    else:
        assert recipe.teacher is not None
        teachers = {"main": built["teacher.model"]}
        teachers |= {
            m.name: built[f"teacher.members.{m.name}.model"] for m in recipe.teacher.members
        }
    distill_data = data.for_distill()
    student = built["student.model"]
    try:
        objective.bind(
            student,
            teachers,
            sample=sample_inputs(distill_data, student, "cpu"),
            teacher_sample=sample_inputs(distill_data, teachers["main"], "cpu"),
            num_train=len(distill_data.train),
        )
    finally:
        objective.unbind()


@dataclass
class Guide:
    """The teacher of a stage: its live models by member name ("main" first) and where
    the main model's weights live (<run>/<stage>/seed<seed>), which fingerprints a cache."""

    models: dict[str, nn.Module]
    stage: str
    seed: int
    checkpoint: Path | None = None  # teacher.checkpoint, when the weights came from there


def _teacher_stage(ctx: Context, stage: str, seed: int, guide: None) -> Guide:
    recipe = ctx.recipe
    assert recipe.teacher is not None
    checkpoint = resolve_weights(recipe.teacher.checkpoint) if recipe.teacher.checkpoint else None
    models = {"main": _one_teacher(ctx, seed, "teacher", recipe.teacher.model, checkpoint)}
    ctx.teachers[seed] = models["main"]
    for member in recipe.teacher.members:
        weights = resolve_weights(member.checkpoint) if member.checkpoint else None
        models[member.name] = _one_teacher(
            ctx, seed, f"teacher_{member.name}", member.model, weights
        )
    return Guide(models, "teacher", seed, checkpoint)


def _one_teacher(
    ctx: Context, seed: int, stage: str, spec: ModelSpec, checkpoint: Path | None
) -> nn.Module:
    """Load a teacher from its checkpoint, reuse one trained earlier, or train it."""
    recipe = ctx.recipe
    assert recipe.teacher is not None
    stage_dir = ctx.run_dir / stage / f"seed{seed}"
    where = "teacher.model" if stage == "teacher" else f"teacher.members.{stage[8:]}.model"
    # members get their own seeds, so two members of one architecture differ
    members = [m.name for m in recipe.teacher.members]
    torch.manual_seed(seed if stage == "teacher" else seed + 1000 * (members.index(stage[8:]) + 1))
    trained = finished(stage_dir)
    with weights_follow() if checkpoint is not None or trained else contextlib.nullcontext():
        model = make_model(ctx.data, spec, where=where)
    if checkpoint is not None:
        try:
            load_weights(model, checkpoint)
        except CheckpointError as exc:
            hint = ""
            if stage != "teacher":
                hint = (
                    f"; every teacher of an ensemble must predict the data's "
                    f"{ctx.data.num_classes} classes"
                )
            raise CheckpointError(
                f"{where.replace('.model', '.checkpoint')}: {exc}{hint}"
            ) from None
        # measured like a trained teacher, so its row and the gap are in the results
        if not (stage_dir / "eval.json").exists():
            measure_stage(ctx, stage, seed, model, spec, None, train_seconds=0.0)
        return model
    if trained:
        load_weights(model, stage_dir / "model.safetensors")
        finished_earlier(ctx, stage, seed, teacher=True)
        return model
    objective = Objective(recipe.teacher.objective or [LossTerm(loss="cross_entropy")])
    return _train_and_finish(
        ctx, stage, seed, model, spec, objective, None,
        settings=recipe.teacher_train(), guide=None,
    )  # fmt: skip


def _student_stage(ctx: Context, stage: str, seed: int, guide: Guide | None) -> Guide:
    """Train a student-side model (baseline, assistant, distill, distill_gen<g>, qat)
    and return it as the guide of the next stage in a chain."""
    recipe = ctx.recipe
    if stage == "assistant":
        assert recipe.assistant is not None
        spec, where = recipe.assistant.model, "assistant.model"
    else:
        assert recipe.student is not None
        spec, where = recipe.student.model, "student.model"
    stage_dir = ctx.run_dir / stage / f"seed{seed}"
    torch.manual_seed(seed)  # baseline and distill start from the same weights for a seed
    teacher = ctx.teachers.get(seed) or next(iter(ctx.teachers.values()), None)
    model = make_model(ctx.data, spec, where=where, teacher=teacher)
    if "prune" in recipe.stages and stage != "assistant":  # start from the prune stage's
        _load_sized(model, ctx.run_dir / "prune" / f"seed{seed}" / "model.safetensors")
    if finished_earlier(ctx, stage, seed):
        _load_sized(model, stage_dir / "model.safetensors")
        return Guide({"main": model}, stage, seed)
    settings = recipe.train
    if stage == "qat":  # the distilled student, trained on through int8 rounding
        _load_sized(model, ctx.run_dir / "distill" / f"seed{seed}" / "model.safetensors")
        qat.prepare(model, recipe.quantize.mode)
        settings = recipe.train.model_copy(
            update={
                "epochs": recipe.qat.epochs,
                "optimizer": recipe.train.optimizer.model_copy(update={"lr": recipe.qat.lr}),
            }
        )
    signal: TeacherSignal[torch.Tensor] | None = None
    extras: nn.Module | None = None
    if stage == "baseline":  # the guide only measures agreement
        objective = Objective(baseline_terms(recipe.objective))
    else:
        assert guide is not None and recipe.teacher is not None
        objective = Objective(recipe.objective)
        if objective.needs_teacher:
            signal = _teacher_signal(ctx, guide)
        if objective.feature_terms:
            assert signal is not None
            data = ctx.data.for_distill()
            model.to(ctx.accelerator.device)
            extras = objective.bind(
                model,
                signal.models,
                sample=sample_inputs(data, model, ctx.accelerator.device),
                teacher_sample=sample_inputs(data, signal.models["main"], ctx.accelerator.device),
                num_train=len(data.train),
                seed=seed,
            )
        elif len(objective.extras):  # learned temperatures (CTKD) train with the student
            extras = objective.extras.to(ctx.accelerator.device)
    try:
        _train_and_finish(
            ctx, stage, seed, model, spec, objective, signal,
            settings=settings, guide=guide, extras=extras,
        )  # fmt: skip
    finally:
        objective.unbind()
    return Guide({"main": model}, stage, seed)


def _load_sized(model: nn.Module, weights: Path) -> None:
    """Load a stage's weights into `model`, first cut to their shapes (a student pruned
    in steps can end a channel or two apart from the one-shot pruning it was built as)."""
    resize_to(model, weights)
    load_weights(model, weights)


def _prune_stage(ctx: Context, stage: str, seed: int, guide: Guide | None) -> Guide | None:
    """The student (the teacher, pruned) measured before any training: what pruning
    alone cost, and the weights the baseline and distill stages start from. With
    `steps` > 1 the channels go in steps, each but the last followed by distillation
    from the unpruned teacher (stages prune_step<i>)."""
    recipe = ctx.recipe
    assert recipe.student is not None
    if not finished_earlier(ctx, stage, seed):
        spec = recipe.student.model
        teacher = ctx.teachers.get(seed) or next(iter(ctx.teachers.values()), None)
        settings = PruneArgs.of(dict(spec.args), "student.model.args")
        torch.manual_seed(seed)
        start = time.perf_counter()
        if settings.steps > 1 and isinstance(ctx.data, DataBundle):
            assert teacher is not None and guide is not None
            model = _prune_in_steps(ctx, stage, seed, guide, teacher, settings)
        else:
            model = make_model(ctx.data, spec, where="student.model", teacher=teacher)
            if ctx.is_main:
                for note in getattr(model, "load_notes", ()):
                    ctx.console.log(f"{stage} seed {seed}: {note}")
        seconds = time.perf_counter() - start
        measure_stage(ctx, stage, seed, model, spec, guide, train_seconds=seconds)
    return guide


def _prune_in_steps(
    ctx: Context, stage: str, seed: int, guide: Guide, teacher: nn.Module, settings: PruneArgs
) -> nn.Module:
    """Iterative pruning: remove the same share of the remaining channels `steps` times;
    after each removal but the last, distill for `step_epochs` epochs with the recipe's
    objective from the stage's guide: the unpruned teacher, or the assistant when the
    recipe has one (each a stage of its own, prune_step<i>)."""
    recipe = ctx.recipe
    assert recipe.student is not None and isinstance(ctx.data, DataBundle)
    objective = Objective(recipe.objective)
    if objective.feature_terms:
        raise RecipeError(
            "student.model.args.steps: the distillation between pruning steps uses logit "
            "terms only, and this objective reads features (the pruned layers change "
            "shape at every step); prune in one step, or drop the feature terms"
        )
    shares = step_ratios(settings.channels or 0.0, settings.steps)
    step_train = recipe.train.model_copy(update={"epochs": settings.step_epochs})
    current = copy.deepcopy(teacher)
    for number, share in enumerate(shares, start=1):
        current, notes = prune_step(ctx.data, current, settings, share, where="student.model")
        if ctx.is_main:
            ctx.console.log(f"{stage} seed {seed}, step {number}/{len(shares)}: {notes[0]}")
        if number == len(shares):
            break
        name = f"{stage}_step{number}"
        if finished_earlier(ctx, name, seed):
            load_weights(current, stage_dir(ctx.run_dir, name, seed) / "model.safetensors")
            continue
        signal = _teacher_signal(ctx, guide) if objective.needs_teacher else None
        current = _train_and_finish(
            ctx, name, seed, current, recipe.student.model, objective, signal,
            settings=step_train, guide=guide,
        )  # fmt: skip
    return current


def _quantize_stage(ctx: Context, stage: str, seed: int, guide: Guide | None) -> Guide | None:
    """The quantize.stage's model of this seed as INT8 ONNX, measured on test by ONNX
    Runtime and timed beside PyTorch (tasks/classification/export.py); its row is the
    deployable model's quality and cost."""
    folder = stage_dir(ctx.run_dir, stage, seed)
    if (folder / "eval.json").exists():
        if ctx.is_main:
            ctx.console.log(f"{stage} seed {seed}: finished earlier in {folder}, skipping")
        return guide
    if ctx.is_main:
        from kdistill.tasks.classification.export import quantized_stage

        settings = ctx.recipe.quantize
        evaluation = quantized_stage(
            stage_dir(ctx.run_dir, settings.stage, seed),
            output=folder,
            mode=settings.mode,
            threads=torch.get_num_threads(),
            data=ctx.data,
            section=ctx.recipe.data,
        )
        atomic_write_json(folder / "eval.json", {"stage": stage, "seed": seed, **evaluation})
        ctx.console.log(
            f"{stage} seed {seed}: {settings.stage} as INT8 ({settings.mode}) test accuracy "
            f"{100 * evaluation['test']['accuracy']:.2f}%, top-1 agreement with FP32 "
            f"{100 * evaluation['agreement_with_fp32']:.2f}%, "
            f"{evaluation['cost']['latency_ms_single']:.2f} ms per sample in ONNX Runtime"
        )
    ctx.accelerator.wait_for_everyone()
    return guide


STAGES = StageTable(
    teacher={"teacher": _teacher_stage, "assistant": _student_stage},
    student={
        "prune": _prune_stage,
        "baseline": _student_stage,
        "distill": _student_stage,
        "qat": _student_stage,
        "quantize": _quantize_stage,
    },
    chained=frozenset({"distill"}),
)


def _train_and_finish(
    ctx: Context,
    stage: str,
    seed: int,
    model: nn.Module,
    spec: ModelSpec,
    objective: Objective,
    signal: TeacherSignal[torch.Tensor] | None,
    *,
    settings: TrainConfig,
    guide: Guide | None,
    extras: nn.Module | None = None,
) -> nn.Module:
    """Train one stage into <run>/<stage>/seed<k>/, then measure and record it."""
    steps = ClassifierSteps(
        model,
        data=ctx.data if stage in ("teacher", "baseline") else ctx.data.for_distill(),
        objective=objective,
        teacher=signal,
        settings=settings,
        accelerator=ctx.accelerator,
        seed=seed,
        label=label(stage, seed),
    )
    source = None if signal is None else "cache" if isinstance(signal, CachedTeacher) else "live"
    result = train_stage(
        ctx, stage, seed, model, steps, settings=settings, extras=extras, teacher=source
    )
    model = ctx.accelerator.unwrap_model(model)
    measure_stage(ctx, stage, seed, model, spec, guide, train_seconds=result.seconds)
    ctx.accelerator.free_memory()
    return model


def baseline_terms(objective: list[LossTerm]) -> list[LossTerm]:
    """The student-alone objective: the distill objective's terms that need no teacher
    (for example cross-entropy with its label smoothing), at weight 1; plain
    cross-entropy when there are none."""
    own = [term.model_copy(update={"weight": 1.0}) for term in objective if not reads_teacher(term)]
    return own or [LossTerm(loss="cross_entropy")]


def _teacher_signal(ctx: Context, guide: Guide) -> TeacherSignal[torch.Tensor]:
    recipe = ctx.recipe
    assert recipe.teacher is not None
    device = ctx.accelerator.device
    precision = recipe.teacher.precision or "fp32"
    if len(guide.models) > 1:
        return EnsembleTeacher(
            {name: copy.deepcopy(m) for name, m in guide.models.items()},
            combine=recipe.teacher.combine,
            weights=recipe.teacher.weights,
            precision=precision,
        ).to(device)
    teacher = guide.models["main"]
    if not recipe.teacher.cache:
        return LiveTeacher(copy.deepcopy(teacher), precision=precision).to(device)
    weights = (
        guide.checkpoint or ctx.run_dir / guide.stage / f"seed{guide.seed}" / "model.safetensors"
    )
    if not weights.exists():
        raise CheckpointError(
            f"teacher weights {weights} are missing; cannot fingerprint the cache"
        )
    teacher_sha = file_sha256(weights)
    folder = cache_folder(recipe, ctx.run_dir, guide.stage, guide.seed)
    hit = folder.exists()
    if ctx.is_main and not hit:
        manifest = write_cache(
            folder,
            teacher,
            ctx.data.for_distill(),
            teacher_sha256=teacher_sha,
            dtype=recipe.teacher.cache_dtype,
            batch_size=recipe.train.eval_batch_size,
            device=device,
        )
        ctx.console.log(f"teacher logits cached in {folder} ({manifest['seconds']:.1f}s)")
    ctx.accelerator.wait_for_everyone()
    cache = open_cache(folder, teacher_sha256=teacher_sha, bundle=ctx.data.for_distill())
    if hit:
        ctx.console.log(
            f"teacher logits: cache hit, {cache.shape[0]} rows read from {folder} "
            "(teacher weights and data match; no teacher pass)"
        )
    return CachedTeacher(cache).to(device)


# samples timed one at a time (batch 1) for the results' latency per sample


# ------------------------------------------------------------- other entry points
