"""The stages of a classifier recipe, as `kdistill.tasks.classification.pipeline` runs them.

Each stage's micro-step is the real `ClassifierSteps.loss` (kdistill.tasks.classification.steps):
its inputs, augmentation, teacher call and objective, with the plan's probes around it.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from kdistill.plan.probes import (
    LayerTensors,
    RecordedSignal,
    SavedTensors,
    largest_layer,
    tensor_bytes,
    weight_storages,
)
from kdistill.plan.results import CacheSize
from kdistill.plan.stage import (
    PlanPlacement,
    Probe,
    Session,
    StageSpec,
    epoch_rows,
    step_rows,
    steps_in_epoch,
    training_step,
)

if TYPE_CHECKING:
    from kdistill.tasks.classification.steps import ClassifierSteps


def classifier_stages(
    recipe: Any, data_dir: str | Path | None, device: torch.device, steps: int
) -> tuple[list[StageSpec], int, str, list[str]]:
    """The trained stages of a classifier recipe, in the order kdistill.tasks.classification.pipeline runs them:
    teacher (and ensemble members), assistant, baseline, distill (and later generations)."""
    from kdistill.data import build as build_data
    from kdistill.recipe import LossTerm
    from kdistill.tasks.classification.pipeline import baseline_terms

    data = build_data(recipe.data, data_dir)
    data_bytes = 0
    if not data.is_text:
        data_bytes = sum(
            split.x.nbytes + split.y.nbytes for split in (data.train, data.val, data.test)
        )
    described = (
        f"{len(data.train)} train, {len(data.val)} val, {len(data.test)} test samples, "
        f"{data.num_classes} classes, input {tuple(data.input_shape)}"
    )
    specs: list[StageSpec] = []
    notes: list[str] = []
    stages, teacher_cfg = recipe.stages, recipe.teacher

    def add(
        name: str,
        trained: tuple[Any, str],
        teachers: dict[str, tuple[Any, str]],
        terms: list[Any],
        teacher_stage: bool = False,
    ) -> StageSpec:
        spec = _classifier_stage(
            recipe,
            data,
            name,
            trained=trained,
            teachers=teachers,
            objective_terms=terms,
            settings=recipe.teacher_train() if teacher_stage else recipe.train,
            prefix="teacher.train" if teacher_stage else "train",
            device=device,
            seed=recipe.seeds[0],
        )
        specs.append(spec)
        return spec

    guide: dict[str, tuple[Any, str]] = {}
    if teacher_cfg is not None:
        guide = {"main": (teacher_cfg.model, "teacher.model")}
        guide |= {m.name: (m.model, f"teacher.members.{m.name}.model") for m in teacher_cfg.members}
        checkpoints = {"main": teacher_cfg.checkpoint}
        checkpoints |= {m.name: m.checkpoint for m in teacher_cfg.members}
        own = teacher_cfg.objective or [LossTerm(loss="cross_entropy")]
        for member, trained in guide.items():
            name = "teacher" if member == "main" else f"teacher_{member}"
            if "teacher" not in stages:
                continue
            if checkpoints[member] is not None:
                notes.append(f"{name}: weights from its checkpoint, not trained")
            else:
                add(name, trained, {}, own, teacher_stage=True)
    if "assistant" in stages and recipe.assistant is not None:
        add("assistant", (recipe.assistant.model, "assistant.model"), guide, recipe.objective)
        guide = {"main": (recipe.assistant.model, "assistant.model")}
    if recipe.student is None:
        return specs, data_bytes, described, notes
    student = (recipe.student.model, "student.model")
    if "baseline" in stages:
        add("baseline", student, {}, baseline_terms(recipe.objective))
    if "distill" in stages:
        add("distill", student, guide, recipe.objective)
        if recipe.generations > 1:
            later = add("distill_gen2", student, {"main": student}, recipe.objective)
            later.notes.append(
                f"generations 2 to {recipe.generations} each plan the same: the student "
                "learns from the previous generation"
            )
    return specs, data_bytes, described, notes


def _classifier_stage(
    recipe: Any,
    data: Any,
    name: str,
    *,
    trained: tuple[Any, str],
    teachers: dict[str, tuple[Any, str]],
    objective_terms: list[Any],
    settings: Any,
    prefix: str,
    device: torch.device,
    seed: int,
) -> StageSpec:
    """One classifier stage as the pipeline runs it (kdistill.tasks.classification.pipeline, kdistill.train)."""
    from kdistill.losses.objective import Objective
    from kdistill.optim import make_optimizer
    from kdistill.tasks.classification.models import make_model, untrained_teacher_source
    from kdistill.tasks.classification.steps import ClassifierSteps

    teacher_cfg = recipe.teacher
    # the stages that learn from a teacher also train on the transfer texts, if any
    stage_data = data if name == "baseline" or name.startswith("teacher") else data.for_distill()
    reads_teacher = Objective(objective_terms).needs_teacher and bool(teachers)
    cached = reads_teacher and teacher_cfg.cache and len(teachers) == 1
    n_train = len(stage_data.train)
    steps_per_epoch = steps_in_epoch(n_train, settings, name, "samples")
    precision = (teacher_cfg.precision or "fp32") if teacher_cfg is not None else "fp32"
    spec, where = trained
    cache, cache_logits = _logits_cache(teacher_cfg, stage_data, reads_teacher, bool(cached))
    order = epoch_rows(n_train, seed)
    micro = settings.batch_size // settings.grad_accum
    worst: Tensor | None = None

    def build() -> Session:
        nonlocal order, worst
        # the plan counts memory and time, not accuracy: an untrained teacher will do
        source = untrained_teacher_source(recipe, stage_data, where)
        torch.manual_seed(seed)
        model = make_model(stage_data, spec, where=where, teacher=source).to(device)
        del source
        signal: Any = None
        if reads_teacher:
            signal = _teacher_signal(
                stage_data, teachers, teacher_cfg, precision, cache_logits, device
            )
        objective = Objective(objective_terms)
        models = getattr(signal, "models", {})
        trainee = _trainee(objective, model, models, stage_data, device, n_train, seed)
        optimizer = make_optimizer(trainee, settings.optimizer)
        if stage_data.is_text and settings.batch_size <= n_train:
            if getattr(stage_data, "bucket_batches", None) is not None:
                generator = torch.Generator().manual_seed(seed * 1009)
                order = stage_data.train_order(model, settings.batch_size, generator)
            lengths = stage_data.tokenized(model, "train").lengths
            worst = torch.sort(lengths, descending=True, stable=True).indices[:micro]

        recorded = RecordedSignal(signal) if signal is not None else None
        # the stage's own micro-step (kdistill.tasks.classification.steps), with the plan's probes around it
        steps = ClassifierSteps(
            model,
            data=stage_data,
            objective=objective,
            teacher=recorded,
            settings=settings,
            accelerator=PlanPlacement(device, settings.precision),
            seed=seed,
            label=name,
        )
        teacher_models = list(models.values())

        def micro_step(idx: Tensor, counter: SavedTensors | None = None) -> Probe:
            return _probed_micro_step(
                steps, trainee, idx, settings.batch_size, recorded, teacher_models, counter
            )

        def step(i: int) -> None:
            training_step(
                trainee,
                optimizer,
                settings,
                step_rows(order, i, settings.batch_size, steps_per_epoch),
                micro_step,
            )

        def heaviest() -> None:
            assert worst is not None
            training_step(
                trainee, optimizer, settings, worst.repeat(settings.grad_accum), micro_step
            )

        def probe() -> Probe:
            trainee.train()
            idx = worst if worst is not None else step_rows(order, 0, micro, n_train // micro)
            result = micro_step(idx, SavedTensors([trainee, *teacher_models]))
            optimizer.zero_grad(set_to_none=True)
            return result

        return Session(
            trainee,
            teacher_models,
            optimizer,
            step,
            probe,
            close=objective.unbind,
            heaviest=heaviest if worst is not None else None,
        )

    teacher_text = None
    if reads_teacher:
        teacher_text = "cache" if cached else ", ".join(w for _, w in teachers.values())
    notes = []
    if stage_data.is_text:
        notes.append(
            "activations measured on the micro-batch of the longest texts (the stage's worst "
            "case); the step time is of ordinary batches, without that step"
        )
    return StageSpec(
        name=name,
        where=where,
        prefix=prefix,
        settings=settings,
        teacher=teacher_text,
        build=build,
        steps_per_epoch=steps_per_epoch,
        loss=None,
        cache=cache,
        options={
            "teacher_precision": precision if reads_teacher and not cached else None,
            # the setting that takes the teacher out of memory, where this stage can
            "cache_setting": "teacher.cache: true (--set teacher.cache=true)"
            if reads_teacher
            and not cached
            and len(teachers) == 1
            and not Objective(objective_terms).feature_terms
            and not settings.augment.random
            else None,
        },
        notes=notes,
    )


def _logits_cache(
    teacher_cfg: Any, stage_data: Any, reads_teacher: bool, cached: bool
) -> tuple[CacheSize | None, Tensor | None]:
    """The stage's logits cache on disk (what it takes, or would take), and the logits a
    cached stage reads in place of the memory-mapped file."""
    if not reads_teacher or teacher_cfg is None:
        return None, None
    n_train = len(stage_data.train)
    dtype = getattr(torch, teacher_cfg.cache_dtype)
    size = n_train * stage_data.num_classes * torch.empty((), dtype=dtype).element_size()
    cache = CacheSize(
        "logits",
        size,
        f"{n_train} samples × {stage_data.num_classes} classes × {teacher_cfg.cache_dtype} "
        "(+ the .npy header)",
        in_use=cached,
    )
    if not cached:
        return cache, None
    # memory-mapped in a run: data, not the step's memory
    return cache, torch.zeros(n_train, stage_data.num_classes, dtype=dtype)


def _teacher_signal(
    stage_data: Any,
    teachers: dict[str, tuple[Any, str]],
    teacher_cfg: Any,
    precision: str,
    cache_logits: Tensor | None,
    device: torch.device,
) -> Any:
    """The stage's teacher signal as kdistill.teachers makes it: the cached logits, or the
    (untrained) teacher models, live or as an ensemble."""
    from kdistill.tasks.classification.models import make_model
    from kdistill.teachers import CachedTeacher, EnsembleTeacher, LiveTeacher

    if cache_logits is not None:
        return CachedTeacher(cache_logits).to(device)
    built = {
        member: make_model(stage_data, member_spec, where=member_where)
        for member, (member_spec, member_where) in teachers.items()
    }
    if len(built) > 1:
        return EnsembleTeacher(
            built,
            combine=teacher_cfg.combine,
            weights=teacher_cfg.weights,
            precision=precision,
        ).to(device)
    return LiveTeacher(built["main"], precision=precision).to(device)


def _trainee(
    objective: Any,
    model: nn.Module,
    models: dict[str, nn.Module],
    stage_data: Any,
    device: torch.device,
    n_train: int,
    seed: int,
) -> nn.Module:
    """What the optimizer updates: the model, with the projectors its feature terms bind."""
    from kdistill.tasks.classification.models import sample_inputs
    from kdistill.train import Trainee

    if not (objective.feature_terms and models):
        return model
    extras = objective.bind(
        model,
        models,
        sample=sample_inputs(stage_data, model, device),
        teacher_sample=sample_inputs(stage_data, models["main"], device),
        num_train=n_train,
        seed=seed,
    )
    return Trainee(model, extras) if len(list(extras.children())) else model


def _probed_micro_step(
    steps: ClassifierSteps,
    trainee: nn.Module,
    idx: Tensor,
    batch_size: int,
    recorded: RecordedSignal | None,
    teacher_models: list[nn.Module],
    counter: SavedTensors | None,
) -> Probe:
    """Forward + loss (`ClassifierSteps.loss`) and backward of one micro-batch; with a
    counter, under all the probes (what autograd saves, the layers' unsaved tensors, the
    backward walk), else only the teacher's (what it hands the loss, its largest layer)."""
    outputs: list[Any] = []
    hook = trainee.register_forward_hook(lambda module, args, out: outputs.append(out))
    try:
        with (
            largest_layer(teacher_models) as layer,
            counter or contextlib.nullcontext(),
            LayerTensors([trainee] if counter is not None else []) as layers,
        ):
            total, _ = steps.loss(trainee, idx, progress=0.0)
    finally:
        hook.remove()
    last = recorded.last if recorded is not None else None
    teacher_output = tensor_bytes(last, weight_storages(teacher_models))
    if counter is not None:
        counter.add(outputs[-1])
    if counter is None:
        (total / batch_size).backward()
        return Probe(0, 0, teacher_output, layer[0])
    with counter.gradients_during(trainee.parameters()):
        (total / batch_size).backward()
    forward = layers.largest_unsaved(counter)
    layers.clear()
    return Probe(
        counter.bytes,
        counter.backward_bytes,
        teacher_output,
        layer[0],
        forward,
        counter.backward_with_gradients,
    )
