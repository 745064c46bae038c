"""The run of a task on a text encoder (token classification, question answering),
written once: a task module describes what differs in an `EncoderTask` (its data, its
models, its training steps, the teacher's signal per training row, its predictions and
scores, its report) and gets the stages (teacher, baseline, distill), the teacher-signal
cache and the commands' entry points (run, eval, inspect, cache, validate) from here.

Run folder:
    recipe.yaml  run.json  results.json  results.md
    teacher/seed0/  baseline/seed<k>/  distill/seed<k>/   each with
        model.safetensors  model.json  eval.json  metrics.jsonl  best.safetensors
        hf/ (Hugging Face models: a save_pretrained folder with the tokenizer)
    cache/teacher-seed<k>/  the teacher's signal of every training row (one pass)
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

import kdistill.evaluate
from kdistill import __version__
from kdistill.checkpoint import atomic_write_json, file_sha256, load_weights
from kdistill.errors import CacheError, CheckpointError, KdistillError, ModelError, RecipeError
from kdistill.evaluate import cost, latency_of_requests
from kdistill.losses.objective import Objective, reads_teacher
from kdistill.models.hf import (
    HFClassifier,
    load_sequence_classifier,
    load_tokenizer,
    resolve_model_location,
    save_hf,
    student_from_teacher,
    weights_follow,
)
from kdistill.recipe import LossTerm, ModelSpec
from kdistill.stages import (
    RunContext,
    RunOptions,
    StageTable,
    finish_run,
    finish_stage,
    finished,
    finished_earlier,
    label,
    log_start,
    open_run,
    require_teacher,
    resolve_weights,
    run_dir_of,
    run_stages,
    stage_dir,
    train_stage,
    trained_teacher,
)

EXAMPLE_ROWS = 64  # test inputs in the batch that cost() times (and counts FLOPs of)


@dataclass(frozen=True)
class EncoderTask:
    """What a task on a text encoder does its own way."""

    name: str
    data_section: type[Any]  # the recipe's data section (rebuilt from model.json)
    load: Callable[[Any, Any], Any]  # (data section, data_dir) -> the splits
    describe: Callable[[Any], str]  # the data, for the run's first log line
    make_model: Callable[..., nn.Module]  # (data, spec, *, where, teacher) -> model
    steps: Callable[..., Any]  # (model, *, data, objective, teacher, settings, accelerator, label)
    signal: Callable[..., list[torch.Tensor]]  # (teacher, data, *, batch_size, device)
    content: Callable[[Any], Iterable[str]]  # the training rows the signal depends on
    predict: Callable[..., Any]  # (model, data, split, *, batch_size, device) -> outputs
    score: Callable[..., dict[str, Any]]  # (data, split, outputs, teacher outputs | None)
    # (data, model, split, rows) -> the model's input tensors of those rows, by name
    inputs: Callable[[Any, nn.Module, str, torch.Tensor], dict[str, torch.Tensor]]
    lengths: Callable[[Any, nn.Module, str], torch.Tensor]  # tokens of each row of a split
    # (data, model, split, per-row outputs (T_i, C) of the model) -> predict's outputs
    from_raw: Callable[[Any, nn.Module, str, list[torch.Tensor]], Any]
    agreement: str  # what export's parity compares: "word label", "answer"
    reading: str  # how the per-token outputs are read, for the export's model card
    summary: Callable[[dict[str, Any]], str]  # a stage's eval.json -> its log line
    write_report: Callable[[Path], dict[str, Any]]
    metric: str = "f1"  # the validation score in metrics.jsonl is val_<metric>
    requires: Callable[[], None] = lambda: None  # refuses when an optional package is missing
    check_pair: Callable[..., None] = lambda teacher, student: None  # may the pair distill?
    extra: Callable[[Any, nn.Module], dict[str, Any]] = lambda data, model: {}  # for eval.json
    save_extra: Callable[[nn.Module, Path], None] = lambda model, folder: None
    load_saved: Callable[[Any, Path, Any], nn.Module] | None = None  # non-HF models
    latency_rows: int | None = None  # rows of the cost example (default EXAMPLE_ROWS)
    # (data, model, split) -> the rows of each request a served model answers at once (a
    # question's windows); the cost then has latency_ms_request, one pass per request
    requests: Callable[[Any, nn.Module, str], list[torch.Tensor]] | None = None
    # the data of a stage that learns from a teacher (a transfer set appended to train)
    distill_data: Callable[[Any], Any] = lambda data: data
    # (data, teacher) -> zeros of the shapes `signal` returns for those training rows,
    # without running the teacher (`kdistill plan`)
    signal_stand_in: Callable[[Any, nn.Module], list[torch.Tensor]] | None = None


def timed_split(data: Any) -> str:
    """The split whose inputs cost() times: test, or train when there is no test split."""
    return "test" if len(data.split("test")) else "train"


def example(task: EncoderTask, data: Any, model: nn.Module) -> dict[str, torch.Tensor]:
    """The first test inputs (training ones when there is no test split), as one batch:
    what cost and inspect run the model on."""
    split = timed_split(data)
    count = min(task.latency_rows or EXAMPLE_ROWS, len(task.lengths(data, model, split)))
    return task.inputs(data, model, split, torch.arange(count))


def carry(model: nn.Module, tokenizer: Any, key: str) -> nn.Module:
    """The model with the tokenizer that makes its inputs, and the key its tokenizations
    are kept under (two models with one key share them)."""
    setattr(model, "kdistill_tokenizer", tokenizer)  # noqa: B010
    setattr(model, "kdistill_tokenizer_key", key)  # noqa: B010
    return model


def hf_encoder(
    spec: ModelSpec,
    *,
    head: str,
    num_labels: int,
    where: str,
    teacher: nn.Module | None = None,
    labels: list[str] | None = None,
    check: Callable[[HFClassifier, bool], None] = lambda source, reset: None,
) -> nn.Module:
    """`hf` (a pretrained encoder with a `head`: "token" or "span") or `hf_student` (a
    smaller one built from a pretrained encoder's layers, or from the recipe's trained
    teacher with `location: teacher`), with its tokenizer. `labels` name the head's
    outputs; `check(source, reset_head)` may refuse a loaded checkpoint."""
    args: dict[str, Any] = dict(spec.args)
    if spec.name == "hf_student" and args.get("location") == "teacher":
        args.pop("location")
        if not isinstance(teacher, HFClassifier):
            raise ModelError(
                f"{where}.args.location: 'teacher' copies layers of a Hugging Face teacher, "
                f"and the teacher is {type(teacher).__name__}"
            )
        try:
            model: nn.Module = student_from_teacher(teacher, where=where, **args)
        except TypeError as exc:
            raise ModelError(f"{where}.args: {exc}") from None
        return carry(model, teacher.kdistill_tokenizer, str(teacher.kdistill_tokenizer_key))
    location = args.pop("location", None)
    if not location:
        raise ModelError(f"{where}.args.location is required for {spec.name!r}")
    reset = bool(args.pop("reset_head", False))
    source = load_sequence_classifier(
        location,
        num_labels=num_labels,
        reset_head=reset,
        attn_implementation=args.pop("attn_implementation", None),
        head=head,
        where=f"{where}.args.location",
    )
    check(source, reset)
    if labels is not None:
        source.hf.config.id2label = dict(enumerate(labels))
        source.hf.config.label2id = {name: i for i, name in enumerate(labels)}
    model = source
    if spec.name == "hf_student":
        try:
            model = student_from_teacher(source, where=where, **args)
        except TypeError as exc:
            raise ModelError(f"{where}.args: {exc}") from None
    elif args:
        raise ModelError(
            f"{where}.args: unknown {', '.join(sorted(args))} for 'hf' "
            "(allowed: location, reset_head, attn_implementation)"
        )
    tokenizer_location = spec.tokenizer or location
    return carry(
        model,
        load_tokenizer(tokenizer_location, where=f"{where}.tokenizer"),
        f"hf:{resolve_model_location(tokenizer_location).target}",
    )


@dataclass
class Context(RunContext):
    task: EncoderTask = field(kw_only=True)
    data: Any = field(kw_only=True)
    teachers: dict[int, nn.Module] = field(default_factory=dict)
    teacher_test: dict[int, Any] = field(default_factory=dict)


@dataclass
class Guide:
    """The teacher of a stage: its model and where its weights live."""

    model: nn.Module
    seed: int
    weights: Path


def run(task: EncoderTask, recipe: Any, options: RunOptions) -> dict[str, Any]:
    """Run the recipe's stages and return the results (the content of results.json)."""
    with open_run(recipe, options, setup=lambda: task.load(recipe.data, options.data_dir)) as (
        shared,
        data,
    ):
        ctx = Context(**shared.shared(), task=task, data=data)
        log_start(ctx, task.describe(data))
        _check_models(ctx)
        teacher_seeds = (
            recipe.seeds[:1]
            if recipe.teacher is not None
            and ({"teacher", "distill"} & set(recipe.stages) or recipe.student_from_teacher)
            else []
        )
        run_stages(ctx, STAGES, teacher_seeds=teacher_seeds)
        return finish_run(ctx, task.write_report)


def _check_models(ctx: Context) -> None:
    """Build the teacher and the student once before anything trains, so a bad model
    section, or a pair that cannot distill, fails now and not after the teacher has
    trained."""
    recipe, task = ctx.recipe, ctx.task
    task.requires()
    with torch.random.fork_rng(devices=[]), weights_follow():
        torch.manual_seed(0)
        teacher = None
        if recipe.teacher is not None:
            teacher = task.make_model(ctx.data, recipe.teacher.model, where="teacher.model")
        if recipe.student is not None and {"baseline", "distill"} & set(recipe.stages):
            student = task.make_model(
                ctx.data, recipe.student.model, where="student.model", teacher=teacher
            )
            if teacher is not None and "distill" in recipe.stages:
                task.check_pair(teacher, student)


def _teacher_stage(ctx: Context, stage: str, seed: int, guide: None) -> Guide:
    recipe, task = ctx.recipe, ctx.task
    folder = stage_dir(ctx.run_dir, stage, seed)
    checkpoint = resolve_weights(recipe.teacher.checkpoint) if recipe.teacher.checkpoint else None
    trained = finished(folder)
    torch.manual_seed(seed)
    with weights_follow() if checkpoint is not None or trained else contextlib.nullcontext():
        model = task.make_model(ctx.data, recipe.teacher.model, where="teacher.model")
    if checkpoint is not None:
        try:
            load_weights(model, checkpoint)
        except CheckpointError as exc:
            raise CheckpointError(f"teacher.checkpoint: {exc}") from None
        if not (folder / "eval.json").exists():
            _measure_stage(ctx, stage, seed, model, recipe.teacher.model, None, train_seconds=0.0)
        weights = checkpoint
    elif trained:
        load_weights(model, folder / "model.safetensors")
        finished_earlier(ctx, stage, seed, teacher=True)
        weights = folder / "model.safetensors"
    else:
        model = _train_and_finish(
            ctx, stage, seed, model, recipe.teacher.model,
            Objective([LossTerm(loss="cross_entropy")]), None,
            settings=recipe.teacher_train(), guide=None,
        )  # fmt: skip
        weights = folder / "model.safetensors"
    model.to(ctx.accelerator.device)  # loaded weights stay on the CPU otherwise
    ctx.teachers[seed] = model
    return Guide(model, seed, weights)


def _student_stage(ctx: Context, stage: str, seed: int, guide: Guide | None) -> Guide | None:
    recipe = ctx.recipe
    spec = recipe.student.model
    torch.manual_seed(seed)  # baseline and distill start from the same weights for a seed
    teacher = guide.model if guide is not None else None
    model = ctx.task.make_model(ctx.data, spec, where="student.model", teacher=teacher)
    if finished_earlier(ctx, stage, seed):
        return guide
    signal = None
    data = ctx.data
    if stage == "baseline":
        objective = baseline_objective(recipe)
    else:
        assert guide is not None
        objective = Objective(recipe.objective)
        if objective.needs_teacher:
            data = ctx.task.distill_data(ctx.data)
            signal = _teacher_signal(ctx, guide, data)
    _train_and_finish(
        ctx, stage, seed, model, spec, objective, signal,
        settings=recipe.train, guide=guide, data=data,
    )  # fmt: skip
    return guide


def bind_features(
    task: EncoderTask,
    objective: Objective,
    student: nn.Module,
    teacher: nn.Module,
    data: Any,
    *,
    device: Any,
    seed: int,
) -> nn.ModuleDict:
    """Hook the feature terms' modules of the student and of the teacher (which then runs
    live on each batch), sized on the first training rows; returns the modules that
    train with the student (projectors)."""
    student.to(device)
    rows = torch.arange(min(2, len(task.lengths(data, student, "train"))))
    sample = {k: v.to(device) for k, v in task.inputs(data, student, "train", rows).items()}
    return objective.bind(
        student, {"main": teacher}, sample=sample, num_train=len(data.train), seed=seed
    )


def baseline_objective(recipe: Any) -> Objective:
    """The student alone: the objective's terms that read no teacher, each at weight 1
    (cross-entropy when there are none)."""
    own = [t.model_copy(update={"weight": 1.0}) for t in recipe.objective if not reads_teacher(t)]
    return Objective(own or [LossTerm(loss="cross_entropy")])


STAGES = StageTable(
    teacher={"teacher": _teacher_stage},
    student={"baseline": _student_stage, "distill": _student_stage},
)


def _train_and_finish(
    ctx: Context,
    stage: str,
    seed: int,
    model: nn.Module,
    spec: ModelSpec,
    objective: Objective,
    signal: list[torch.Tensor] | None,
    *,
    settings: Any,
    guide: Guide | None,
    data: Any = None,
) -> nn.Module:
    """Train a stage on `data` (default: the run's) and measure it. Feature terms hook
    the student and the guide's teacher, which then runs live beside the student."""
    data = ctx.data if data is None else data
    live = None
    # learned temperatures (CTKD) train with the student
    extras = objective.extras.to(ctx.accelerator.device) if len(objective.extras) else None
    if objective.feature_terms:
        assert guide is not None  # the recipe allows feature terms in the distill stage only
        live = guide.model.eval()
        extras = bind_features(
            ctx.task, objective, model, live, data, device=ctx.accelerator.device, seed=seed
        )
    steps = ctx.task.steps(
        model,
        data=data,
        objective=objective,
        teacher=signal,
        settings=settings,
        accelerator=ctx.accelerator,
        label=label(stage, seed),
        **({"live_teacher": live} if live is not None else {}),
    )
    # the encoder tasks run the teacher once over the training rows, cached or not
    source = None if signal is None else "cache" if ctx.recipe.reads_teacher_cache() else "one pass"
    if live is not None:
        source = f"{source} + live for features"
    try:
        result = train_stage(
            ctx, stage, seed, model, steps, settings=settings, extras=extras, teacher=source
        )
    finally:
        objective.unbind()
    model = ctx.accelerator.unwrap_model(model)
    _measure_stage(ctx, stage, seed, model, spec, guide, train_seconds=result.seconds)
    ctx.accelerator.free_memory()
    return model


# ------------------------------------------------------------------ teacher signal


def cache_key(task: EncoderTask, data: Any, teacher_sha256: str) -> str:
    """What a cached signal depends on: the teacher's weights and the training rows as
    the task reads them (tokenization settings included)."""
    digest = hashlib.sha256(teacher_sha256.encode())
    for part in task.content(data):
        digest.update((part + "\x1e").encode())
    return digest.hexdigest()


def _teacher_signal(ctx: Context, guide: Guide, data: Any) -> list[torch.Tensor]:
    """The teacher's signal of every training row of `data`: from the cache when its
    key matches, else one pass (written to the cache when teacher.cache is on)."""
    recipe, task = ctx.recipe, ctx.task
    folder = ctx.run_dir / "cache" / f"teacher-seed{guide.seed}"
    device = ctx.accelerator.device
    tokenizer = str(getattr(guide.model, "kdistill_tokenizer_key", ""))
    precision = recipe.teacher.precision or "fp32"
    key = cache_key(task, data, f"{file_sha256(guide.weights)}/{tokenizer}/{precision}")
    if recipe.teacher.cache and (folder / "manifest.json").is_file():
        rows = read_signal(folder, key)
        ctx.console.log(
            f"teacher signal: cache hit, {len(rows)} rows read from {folder} "
            "(teacher weights and data match; no teacher pass)"
        )
        return rows
    start = time.perf_counter()
    teacher = copy.deepcopy(guide.model).to(device)
    if precision in ("bf16", "fp16"):
        teacher = teacher.to(torch.bfloat16 if precision == "bf16" else torch.float16)
    rows = task.signal(teacher, data, batch_size=recipe.train.eval_batch_size, device=device)
    seconds = time.perf_counter() - start
    if recipe.teacher.cache and ctx.is_main:
        write_signal(folder, rows, key, seconds=seconds)
        ctx.console.log(f"teacher signal cached in {folder} ({seconds:.1f}s)")
    ctx.accelerator.wait_for_everyone()
    return rows


def write_signal(folder: Path, rows: list[torch.Tensor], key: str, *, seconds: float) -> None:
    """The rows (each (n_i, ...)) as one safetensors file with their lengths, and a
    manifest naming the key they were computed for."""
    folder.mkdir(parents=True, exist_ok=True)
    # the manifest goes first and comes back last: an interrupted write leaves no
    # manifest, so no old key can vouch for a new or partial file
    (folder / "manifest.json").unlink(missing_ok=True)
    lengths = torch.tensor([len(r) for r in rows], dtype=torch.int64)
    save_file(
        {"signal": torch.cat(rows).contiguous(), "lengths": lengths},
        str(folder / "signal.safetensors"),
    )
    atomic_write_json(
        folder / "manifest.json",
        {"key": key, "rows": len(rows), "entries": int(lengths.sum()),
         "seconds": round(seconds, 3), "kdistill": __version__},
    )  # fmt: skip


def read_signal(folder: Path, key: str) -> list[torch.Tensor]:
    manifest = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
    if manifest.get("key") != key:
        raise CacheError(
            f"the teacher cache in {folder} was written for other teacher weights or other "
            "training data (its key differs); delete the folder to write it again, or set "
            "teacher.cache: false"
        )
    tensors = load_file(str(folder / "signal.safetensors"))
    return list(torch.split(tensors["signal"], tensors["lengths"].tolist()))


# ---------------------------------------------------------------------- measuring


def _measure_stage(
    ctx: Context,
    stage: str,
    seed: int,
    model: nn.Module,
    spec: ModelSpec,
    guide: Guide | None,
    *,
    train_seconds: float,
) -> None:
    data, task, device = ctx.data, ctx.task, ctx.accelerator.device
    batch = ctx.recipe.train.eval_batch_size
    model.to(device)  # a teacher loaded from its checkpoint is measured where it runs
    reference = None
    if guide is not None:
        if guide.seed not in ctx.teacher_test:
            ctx.teacher_test[guide.seed] = task.predict(
                guide.model, data, "test", batch_size=batch, device=device
            )
        reference = ctx.teacher_test[guide.seed]

    def measure(weights: nn.Module) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for split, teacher in (("test", reference), ("val", None)):
            if len(data.split(split)):
                outputs = task.predict(weights, data, split, batch_size=batch, device=device)
                out[split] = task.score(data, split, outputs, teacher)
        return out

    def main_only() -> dict[str, Any]:
        return {"cost": encoder_cost(task, data, model, device), **task.extra(data, model)}

    finish_stage(
        ctx, stage, seed, model,
        measure=measure, best_by=(f"val_{task.metric}", True), train_seconds=train_seconds,
        main_only=main_only, save=lambda folder: save_model(task, model, folder, spec, ctx.recipe),
        summary=task.summary,
    )  # fmt: skip


def encoder_cost(task: EncoderTask, data: Any, model: nn.Module, device: Any) -> dict[str, Any]:
    """evaluate.cost on the task's first test inputs (padded to one batch, and one at a
    time for the latency per input), and with `task.requests` the latency per request
    (its first TIMING.singles test requests, each as one batch)."""
    timing = kdistill.evaluate.TIMING
    batch = {k: v.to(device) for k, v in example(task, data, model).items()}
    out = cost(model, device=device, example_input=batch, single=timing.singles)
    split = timed_split(data)
    if task.requests is not None and len(data.split(split)):
        rows = task.requests(data, model, split)[: timing.singles]
        inputs = [task.inputs(data, model, split, r) for r in rows]
        out["latency_ms_request"] = latency_of_requests(model, inputs, device=device)
        out["requests_timed"] = len(rows)
    return out


def save_model(task: EncoderTask, model: nn.Module, folder: Path, spec: ModelSpec, recipe: Any):
    """model.json (what rebuilds the model: its spec, the data section) and the
    tokenizer: a save_pretrained folder for Hugging Face models, else `save_extra`."""
    if isinstance(model, HFClassifier):
        save_hf(model, folder / "hf", model.kdistill_tokenizer, overwrite=True)
        spec = ModelSpec(name="hf", args={"location": "hf"})
    task.save_extra(model, folder)
    config = getattr(getattr(model, "hf", None), "config", None)
    labels = (
        [str(config.id2label[i]) for i in range(config.num_labels)]
        if config is not None
        else list(getattr(model, "label_names", []))
    )
    atomic_write_json(
        folder / "model.json",
        {
            "task": task.name,
            "model": spec.model_dump(mode="json"),
            "labels": labels,
            "data": recipe.data.model_dump(mode="json"),
            "kdistill": __version__,
        },
    )


def load_model(task: EncoderTask, weights: Path, data: Any) -> nn.Module:
    """A stage's saved model, rebuilt from the model.json (and hf/) beside its weights."""
    info_path = weights.with_name("model.json")
    if not info_path.is_file():
        raise CheckpointError(
            f"{weights} has no model.json beside it, so its architecture is unknown; "
            f"evaluate a stage folder of a {task.name} run"
        )
    info = json.loads(info_path.read_text(encoding="utf-8"))
    spec = ModelSpec.model_validate(info["model"])
    if spec.name == "hf":
        spec = ModelSpec(name="hf", args={"location": str(weights.parent / "hf")})
        with weights_follow():
            model = task.make_model(data, spec, where="model")
    elif task.load_saved is not None:
        model = task.load_saved(data, weights.parent, spec)
    else:
        raise CheckpointError(f"{weights}: cannot rebuild a {spec.name!r} model")
    load_weights(model, weights)
    return model.eval()


def saved_data(task: EncoderTask, weights: Path, data_dir: Any) -> Any:
    """The data a stage was trained on, from the model.json beside its weights."""
    info = json.loads(weights.with_name("model.json").read_text(encoding="utf-8"))
    return task.load(task.data_section.model_validate(info["data"]), data_dir)


# ------------------------------------------------------------------ other commands


def evaluate_checkpoint(
    task: EncoderTask,
    weights: Path,
    *,
    data: str | None = None,
    model: str | None = None,
    data_dir: str | Path | None = None,
) -> dict[str, Any]:
    """`kdistill eval` of a stage: its metric on the test split of the data it was
    trained on (model.json), and its cost."""
    if data is not None or model is not None:
        raise RecipeError(
            f"kdistill eval of a {task.name} stage reads its data and model from the "
            "model.json beside the weights; --data and --model do not apply"
        )
    loaded = saved_data(task, weights, data_dir)
    net = load_model(task, weights, loaded)
    start = time.perf_counter()
    outputs = task.predict(net, loaded, "test", batch_size=256, device="cpu")
    return {
        "checkpoint": str(weights),
        "test": task.score(loaded, "test", outputs, None),
        "cost": encoder_cost(task, loaded, net, "cpu"),
        "seconds": round(time.perf_counter() - start, 3),
    }


def inspect_recipe(
    task: EncoderTask, recipe: Any, role: str, *, depth: int | None, data_dir: Any
) -> str:
    """The modules of the recipe's teacher or student, with output shapes on a batch."""
    from kdistill.taps import module_tree

    data = task.load(recipe.data.model_copy(update={"limit_test": 8}), data_dir)
    spec = getattr(recipe, role).model
    teacher = None
    if role == "student" and recipe.student_from_teacher:
        with weights_follow():
            teacher = task.make_model(data, recipe.teacher.model, where="teacher.model")
    model = task.make_model(data, spec, where=f"{role}.model", teacher=teacher).eval()
    header = f"{spec.name}: {task.name}, a batch of the first test inputs"
    return header + "\n" + module_tree(model, example(task, data, model), max_depth=depth)


def cache_teacher(
    task: EncoderTask,
    recipe: Any,
    *,
    output_dir: str | Path | None = None,
    data_dir: str | Path | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """`kdistill cache`: the trained teacher's signal of every training row, written once
    into <run>/cache/teacher-seed<k> (verified when already there)."""
    teacher = require_teacher(recipe)
    run_dir = run_dir_of(recipe, output_dir)
    seed = recipe.seeds[0]
    data = task.distill_data(task.load(recipe.data, data_dir))
    weights = (
        resolve_weights(teacher.checkpoint)
        if teacher.checkpoint
        else trained_teacher(run_dir, seed)
    )
    with weights_follow():
        model = task.make_model(data, teacher.model, where="teacher.model")
    load_weights(model, weights)
    folder = run_dir / "cache" / f"teacher-seed{seed}"
    tokenizer = str(getattr(model, "kdistill_tokenizer_key", ""))
    precision = teacher.precision or "fp32"
    key = cache_key(task, data, f"{file_sha256(weights)}/{tokenizer}/{precision}")
    if (folder / "manifest.json").is_file() and not overwrite:
        return {"folder": str(folder), "reused": True, "rows": len(read_signal(folder, key))}
    start = time.perf_counter()
    if precision in ("bf16", "fp16"):  # as the distill stage would compute it
        model = model.to(torch.bfloat16 if precision == "bf16" else torch.float16)
    rows = task.signal(model, data, batch_size=256, device="cpu")
    write_signal(folder, rows, key, seconds=time.perf_counter() - start)
    return {"folder": str(folder), "reused": False, "rows": len(rows)}


def check_recipe(task: EncoderTask, recipe: Any, data_dir: str | Path | None = None) -> list[str]:
    """What `validate` finds beyond the schema: a missing optional package, the data
    (read and checked) and the teacher checkpoint."""
    from kdistill.preflight import Problems, weights_problem

    problems = Problems()
    try:
        task.requires()
    except KdistillError as exc:
        problems.add(str(exc))
    try:
        task.load(recipe.data, data_dir)
    except KdistillError as exc:
        problems.add(f"data: {exc}")
    if recipe.teacher is not None:
        problems.add(weights_problem("teacher.checkpoint", recipe.teacher.checkpoint))
    return problems.lines
