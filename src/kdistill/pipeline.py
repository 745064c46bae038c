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
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from pydantic import ValidationError
from rich.console import Console
from torch import nn

from kdistill import __version__
from kdistill.cache import open_cache, write_cache
from kdistill.checkpoint import (
    atomic_write_json,
    file_sha256,
    load_weights,
    save_weights,
)
from kdistill.data import DataBundle, TextData
from kdistill.data import build as build_data
from kdistill.errors import CheckpointError, RecipeError
from kdistill.evaluate import cost, predict, quality
from kdistill.losses.objective import Objective, reads_teacher
from kdistill.models import build_model
from kdistill.models.hf import HFClassifier, save_hf, weights_follow
from kdistill.recipe import DataConfig, LossTerm, ModelSpec, Recipe, TrainConfig
from kdistill.report import write_report
from kdistill.stages import (
    StageTable,
    finish_run,
    finish_stage,
    finished,
    finished_earlier,
    label,
    log_start,
    make_accelerator,
    require_teacher,
    resolve_weights,
    run_dir_of,
    run_folder,
    run_stages,
    train_stage,
    trained_teacher,
)
from kdistill.taps import module_tree
from kdistill.tasks.classify import ClassifierSteps
from kdistill.teachers import (
    CachedTeacher,
    EnsembleTeacher,
    LiveTeacher,
    TeacherSignal,
    combine_members,
)


@dataclass
class Context:
    recipe: Recipe
    run_dir: Path
    data: DataBundle | TextData
    accelerator: Accelerator
    resume: bool
    quiet: bool
    console: Console
    teacher_test: dict[int, torch.Tensor] = field(default_factory=dict)
    # the main teacher of each teacher seed, for students built from its layers
    teachers: dict[int, nn.Module] = field(default_factory=dict)

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process


def run(
    recipe: Recipe,
    *,
    output_dir: str | Path | None = None,
    data_dir: str | Path | None = None,
    resume: bool = False,
    overwrite: bool = False,
    quiet: bool = False,
    console: Console | None = None,
) -> dict[str, Any]:
    """Run the recipe's stages and return the results (the content of results.json)."""
    console = console or Console(stderr=True)
    accelerator = make_accelerator(recipe.train.precision)
    run_dir = run_dir_of(recipe, output_dir)
    with run_folder(
        recipe,
        run_dir,
        accelerator,
        resume=resume,
        overwrite=overwrite,
        setup=lambda: build_data(recipe.data, data_dir),
    ) as data:
        assert data is not None
        ctx = Context(recipe, run_dir, data, accelerator, resume, quiet, console)
        log_start(
            ctx,
            f"data: {len(data.train)} train, {len(data.val)} val, {len(data.test)} test, "
            f"{data.num_classes} classes",
        )
        _run_stages(ctx)
        return finish_run(run_dir, accelerator, write_report)


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


def make_model(
    data: DataBundle | TextData, spec: ModelSpec, *, where: str, teacher: nn.Module | None = None
) -> nn.Module:
    """A model for this data: text models get their tokenizer (see models/text_build.py);
    `teacher` is the source of an `hf_student` built with `location: teacher`."""
    if data.is_text:
        from kdistill.models.text_build import build_text_model

        assert isinstance(data, TextData)
        return build_text_model(spec, data, where=where, teacher=teacher)
    return build_model(
        spec, input_shape=data.input_shape, num_classes=data.num_classes, where=where
    )


def sample_inputs(data: DataBundle | TextData, model: nn.Module, device: str | torch.device) -> Any:
    """A few training inputs for `model`, for the dry pass that sizes projectors."""
    rows = torch.arange(min(8, len(data.train)))
    if isinstance(data, TextData):
        return {k: v.to(device) for k, v in data.batch(model, "train", rows).items()}
    return data.to_input(data.train.x[rows]).to(device)


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
    if recipe.student is not None and {"baseline", "distill"} & set(recipe.stages):
        specs.append((recipe.student.model, "student.model"))
    built: dict[str, nn.Module] = {}
    for spec, where in specs:  # the teacher first: a student may be built from it
        with weights_follow():  # built to check, then thrown away: the stages say the notes
            built[where] = make_model(data, spec, where=where, teacher=built.get("teacher.model"))
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
        if "teacher" in recipe.stages and not (stage_dir / "eval.json").exists():
            _finish_stage(ctx, stage, seed, model, spec, None, train_seconds=0.0)
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
    """Train a student-side model (baseline, assistant, distill, distill_gen<g>) and
    return it as the guide of the next stage in a chain."""
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
    if finished_earlier(ctx, stage, seed):
        load_weights(model, stage_dir / "model.safetensors")
        return Guide({"main": model}, stage, seed)
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
    try:
        _train_and_finish(
            ctx, stage, seed, model, spec, objective, signal,
            settings=recipe.train, guide=guide, extras=extras,
        )  # fmt: skip
    finally:
        objective.unbind()
    return Guide({"main": model}, stage, seed)


STAGES = StageTable(
    teacher={"teacher": _teacher_stage, "assistant": _student_stage},
    student={"baseline": _student_stage, "distill": _student_stage},
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
    result = train_stage(ctx, stage, seed, model, steps, settings=settings, extras=extras)
    model = ctx.accelerator.unwrap_model(model)
    _finish_stage(ctx, stage, seed, model, spec, guide, train_seconds=result.seconds)
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
SINGLE_SAMPLES = 64


def data_cost(
    data: DataBundle | TextData, model: nn.Module, device: str | torch.device
) -> dict[str, Any]:
    """evaluate.cost on this data's input: real token ids for text (the first test
    sentences), a random batch of the input shape otherwise; with the latency of one
    sample at a time over the first SINGLE_SAMPLES of them."""
    example = data.example_input(model)
    if example is not None:
        return cost(model, device=device, example_input=example, single=SINGLE_SAMPLES)
    return cost(model, input_shape=data.input_shape, device=device, single=SINGLE_SAMPLES)


def untrained_teacher_source(
    recipe: Recipe, data: DataBundle | TextData, where: str
) -> nn.Module | None:
    """For a build that only needs shapes (plan, inspect): an untrained teacher for a
    student built from the teacher's layers (`location: teacher`), else None."""
    if where != "student.model" or not recipe.student_from_teacher:
        return None
    assert recipe.teacher is not None
    with weights_follow():
        return make_model(data, recipe.teacher.model, where="teacher.model")


def cache_folder(recipe: Recipe, run_dir: Path, stage: str, seed: int) -> Path:
    """Where a stage's teacher logits are cached: teacher.cache_dir when the recipe names
    one (a cache written by another run), else <run>/cache/<stage>-seed<k>."""
    assert recipe.teacher is not None
    if recipe.teacher.cache_dir is not None:
        return Path(recipe.teacher.cache_dir)
    return run_dir / "cache" / f"{stage}-seed{seed}"


def _finish_stage(
    ctx: Context,
    stage: str,
    seed: int,
    model: nn.Module,
    spec: ModelSpec,
    guide: Guide | None,
    *,
    train_seconds: float,
) -> None:
    """Measure the last and best-on-validation weights on test once; write the stage."""
    data, device = ctx.data, ctx.accelerator.device
    batch = ctx.recipe.train.eval_batch_size
    teacher_test = _teacher_logits(ctx, guide) if guide is not None else None

    def measure(weights: nn.Module) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for split_name, split, reference in (
            ("test", data.test, teacher_test),
            ("val", data.val, None),
        ):
            if len(split):
                xs, to_input, order = data.eval_feed(weights, split_name)
                logits = predict(
                    weights, xs, to_input=to_input, batch_size=batch, device=device, order=order
                )
                out[split_name] = quality(logits, split.y, teacher_logits=reference)
        return out

    def main_only() -> dict[str, Any]:
        out = {"cost": data_cost(data, model, device)}
        if isinstance(data, TextData):
            out["texts_truncated"] = data.truncated(model)
        return out

    def save(folder: Path) -> None:
        if isinstance(model, HFClassifier):
            # a folder transformers loads as is, and a `location` for a later recipe: a
            # student built from this (fine-tuned) teacher's layers, or the teacher itself
            save_hf(model, folder / "hf", model.kdistill_tokenizer, overwrite=True)
        atomic_write_json(
            folder / "model.json",
            {
                "model": spec.model_dump(mode="json"),
                "num_classes": data.num_classes,
                "class_names": data.class_names,
                "input_shape": list(data.input_shape),
                "data": ctx.recipe.data.model_dump(mode="json"),
                "kdistill": __version__,
            },
        )

    def summary(evaluation: dict[str, Any]) -> str:
        test = evaluation.get("test", {})
        accuracy = 100 * test.get("accuracy", float("nan"))
        return f"test accuracy {accuracy:.2f}% ({test.get('errors', '?')} errors)"

    finish_stage(
        ctx, stage, seed, model,
        measure=measure, best_by=("val_accuracy", True), train_seconds=train_seconds,
        main_only=main_only, save=save, summary=summary,
    )  # fmt: skip


def _teacher_logits(ctx: Context, guide: Guide) -> torch.Tensor:
    """The guide's test logits (combined, for an ensemble), computed once per model, for
    student agreement."""
    member_logits = []
    for model in guide.models.values():
        if id(model) not in ctx.teacher_test:
            xs, to_input, order = ctx.data.eval_feed(model, "test")
            ctx.teacher_test[id(model)] = predict(
                model,
                xs,
                to_input=to_input,
                order=order,
                batch_size=ctx.recipe.train.eval_batch_size,
                device=ctx.accelerator.device,
            )
        member_logits.append(ctx.teacher_test[id(model)])
    if len(member_logits) == 1:
        return member_logits[0]
    assert ctx.recipe.teacher is not None
    weights = ctx.recipe.teacher.weights
    fixed = None if weights == "confidence" else torch.ones(len(member_logits))
    if isinstance(weights, list):
        fixed = torch.tensor(weights) / sum(weights)
    elif fixed is not None:
        fixed = fixed / len(member_logits)
    return combine_members(
        torch.stack(member_logits), combine=ctx.recipe.teacher.combine, weights=fixed
    )


# ------------------------------------------------------------- other entry points


def evaluate_checkpoint(
    weights: Path,
    *,
    data: str | None = None,
    model: str | None = None,
    data_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Measure a classifier's saved weights on a dataset's test split: quality and cost.
    data: "SOURCE[:PATH]" (default: the data in model.json beside the weights); model:
    a zoo name or module:factory (default: the model in model.json)."""
    info_path = weights.with_name("model.json")
    info = json.loads(info_path.read_text()) if info_path.exists() else None
    data_cfg = _data_option(data)
    model_spec = ModelSpec(name=model) if model else None
    if model_spec is None and info is None:
        raise CheckpointError(
            f"{weights} has no model.json beside it, so its architecture is unknown; pass --model NAME"
        )
    spec = model_spec or ModelSpec.model_validate(info["model"])  # type: ignore[index]
    data_cfg = data_cfg or (DataConfig.model_validate(info["data"]) if info else None)
    if data_cfg is None:
        raise CheckpointError("say which data to evaluate on: --data SOURCE[:PATH]")
    bundle = build_data(data_cfg, data_dir)
    exported = weights.parent / "hf"
    if model_spec is None and spec.name in ("hf", "hf_student") and exported.is_dir():
        # the stage's save_pretrained folder: it needs neither the source model nor, for
        # a student built with `location: teacher`, the teacher
        spec = ModelSpec(name="hf", args={"location": str(exported)})
    net = make_model(bundle, spec, where="model")
    load_weights(net, weights)
    start = time.perf_counter()
    xs, to_input, order = bundle.eval_feed(net, "test")
    logits = predict(net, xs, to_input=to_input, batch_size=256, device="cpu", order=order)
    return {
        "checkpoint": str(weights),
        "test": quality(logits, bundle.test.y),
        "cost": data_cost(bundle, net, "cpu"),
        "seconds": round(time.perf_counter() - start, 3),
    }


def _data_option(data: str | None) -> DataConfig | None:
    """`--data SOURCE[:PATH]` as a data section (all of it the test split's source)."""
    if data is None:
        return None
    source, _, path = data.partition(":")
    try:
        return DataConfig(source=source, path=path or None, val_fraction=0.0)
    except ValidationError as exc:
        problems = "; ".join(error["msg"] for error in exc.errors())
        raise RecipeError(f"--data {data}: {problems}") from None


def inspect_recipe(
    recipe: Recipe, role: str, *, depth: int | None, data_dir: str | Path | None
) -> str:
    """The modules of a recipe's teacher, student or assistant, with their output shapes
    on a batch of the recipe's data."""
    spec = getattr(recipe, role).model
    data = build_data(recipe.data.model_copy(update={"limit_test": 1}), data_dir)
    where = f"{role}.model"
    if isinstance(data, TextData):
        # each text model brings its tokenizer; a student built from the teacher's
        # layers (`location: teacher`) has the same modules from an untrained one
        source = untrained_teacher_source(recipe, data, where)
        model = make_model(data, spec, where=where, teacher=source).eval()
        header = f"{spec.name}: text ({data.num_classes} classes), a batch of 8 sentences"
        return (
            header + "\n" + module_tree(model, sample_inputs(data, model, "cpu"), max_depth=depth)
        )
    model = make_model(data, spec, where=where).eval()
    header = f"{spec.name}: input {tuple(data.input_shape)}, {data.num_classes} classes"
    return header + "\n" + module_tree(model, data.to_input(data.train.x[:2]), max_depth=depth)


def cache_teacher(
    recipe: Recipe,
    *,
    output_dir: str | Path | None = None,
    data_dir: str | Path | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Run the recipe's trained teacher once over the training split and store its logits."""
    teacher = require_teacher(recipe)
    run_dir = run_dir_of(recipe, output_dir)
    seed = recipe.seeds[0]
    weights = (
        resolve_weights(teacher.checkpoint)
        if teacher.checkpoint
        else trained_teacher(run_dir, seed)
    )
    # the rows the distill stage reads: with text, the transfer texts too
    bundle = build_data(recipe.data, data_dir).for_distill()
    folder = cache_folder(recipe, run_dir, "teacher", seed)
    sha = file_sha256(weights)
    if folder.exists() and not overwrite:
        open_cache(folder, teacher_sha256=sha, bundle=bundle)  # refuses a stale one
        return {"folder": str(folder), "reused": True}
    with weights_follow():
        model = make_model(bundle, teacher.model, where="teacher.model")
    load_weights(model, weights)
    manifest = write_cache(
        folder,
        model,
        bundle,
        teacher_sha256=sha,
        dtype=teacher.cache_dtype,
        batch_size=recipe.train.eval_batch_size,
    )
    return {"folder": str(folder), "reused": False, **manifest}


__all__ = [
    "baseline_terms",
    "cache_teacher",
    "evaluate_checkpoint",
    "resolve_weights",
    "run",
    "save_weights",
]
