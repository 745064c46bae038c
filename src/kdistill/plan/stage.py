"""One stage planned: build its models, time its steps, probe one micro-batch, add up.

A task's stage builder (`kdistill.tasks.<task>.plan`, named by its row in
`kdistill.tasks.TASKS`) describes a stage as a `StageSpec` whose `build()` makes a `Session`: the stage's models and
optimizer, a `step(i)` that runs optimizer step i as the run would, and a `probe()`
that runs one micro-batch under the probes of `kdistill.plan.probes`. `plan_stage`
turns that into a `StagePlan`: weights, gradients and optimizer state counted, steps
timed, activations measured, the phases estimated (`kdistill.plan.estimate`).
"""

from __future__ import annotations

import contextlib
import gc
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from kdistill.errors import TrainingError
from kdistill.plan.estimate import advice, estimate_phases
from kdistill.plan.probes import profiled_peak
from kdistill.plan.results import OPTIMIZER_STATES, CacheSize, LossMemory, StagePlan
from kdistill.teachers import DTYPES


@dataclass
class Probe:
    """What one micro-batch's forward + backward held, measured."""

    activation_bytes: int
    activation_backward_bytes: int
    teacher_output_bytes: int
    teacher_forward_bytes: int
    forward_bytes: int = 0  # the trained model's largest layer input + output not saved
    # activations + the parameter gradients written so far, over the backward walk
    backward_bytes: int | None = None


@dataclass
class Session:
    """A stage's models and optimizer, built for a few steps."""

    trained: nn.Module  # what the optimizer updates
    teachers: list[nn.Module]  # the frozen models the stage reads
    optimizer: torch.optim.Optimizer
    step: Callable[[int], None]  # optimizer step i (0: the warm-up)
    probe: Callable[[], Probe]
    close: Callable[[], None] = lambda: None
    # one untimed step on the stage's largest inputs (the longest texts), run after the
    # warm-up so the optimizer holds its state: the measured peak includes it, the
    # step time does not (it would stand for every step of the epoch)
    heaviest: Callable[[], None] | None = None


@dataclass
class StageSpec:
    name: str
    where: str  # YAML path of the trained model
    prefix: str  # YAML section of its training settings: "train" or "teacher.train"
    settings: Any  # TrainConfig or LMTrainConfig
    teacher: str | None
    build: Callable[[], Session]
    steps_per_epoch: int
    loss: Callable[[int], LossMemory] | None  # of the micro-batch size, for LMs
    cache: CacheSize | None
    # what the advice may suggest: teacher_precision (the live teacher's), cache_setting
    # (the setting that replaces the live teacher with a cache, where the stage can)
    options: dict[str, Any]
    notes: list[str] = field(default_factory=list)


def plan_stage(
    spec: StageSpec, steps: int, device: torch.device, available: int, extra: int
) -> StagePlan:
    """Build the stage, count its weights and optimizer state, time its steps, probe one
    micro-batch, and estimate its peak against the `available` bytes (less `extra`)."""
    settings = spec.settings
    session = spec.build()
    try:
        trained_params, trained_bytes, buffers = _weights(session.trained)
        teacher_params, teacher_bytes, teacher_buffers, teacher_dtype = _teacher_weights(
            session.teachers
        )
        trainable = [p for p in session.trained.parameters() if p.requires_grad]
        gradient_bytes = sum(p.numel() * p.element_size() for p in trainable)
        optimizer = settings.optimizer
        states, optimizer_bytes, temp = _optimizer_bytes(optimizer, trainable, device)
        seconds = _time_steps(session, steps, device)
        probe = session.probe()
    finally:
        session.close()
        del session
        gc.collect()
    micro = settings.batch_size // settings.grad_accum
    loss = spec.loss(micro) if spec.loss is not None else None
    parts = {
        "weights": trained_bytes + buffers + teacher_bytes + teacher_buffers,
        "optimizer": optimizer_bytes,
        "gradients": gradient_bytes,
        "optimizer_temp": temp,
        "activations": probe.activation_bytes,
        "activations_backward": probe.activation_backward_bytes,
        "teacher_output": probe.teacher_output_bytes,
        "teacher_forward": probe.teacher_forward_bytes,
        "forward": probe.forward_bytes,
        "loss": loss.chunked_bytes if loss is not None else 0,
    }
    if probe.backward_bytes is not None:
        parts["backward"] = probe.backward_bytes
    phases = estimate_phases(parts, grad_accum=settings.grad_accum)
    peak_phase = max(phases, key=lambda name: phases[name])
    peak = phases[peak_phase]
    stage = StagePlan(
        stage=spec.name,
        model=spec.where,
        parameters=trained_params,
        parameter_bytes=trained_bytes,
        buffer_bytes=buffers + teacher_buffers,
        teacher=spec.teacher,
        teacher_parameters=teacher_params,
        teacher_bytes=teacher_bytes,
        teacher_dtype=teacher_dtype,
        gradient_bytes=gradient_bytes,
        optimizer=optimizer.name,
        optimizer_states=states,
        optimizer_bytes=optimizer_bytes,
        optimizer_temp_bytes=temp,
        batch_size=settings.batch_size,
        grad_accum=settings.grad_accum,
        micro_batch=micro,
        activation_bytes=probe.activation_bytes,
        activation_backward_bytes=probe.activation_backward_bytes,
        teacher_output_bytes=probe.teacher_output_bytes,
        teacher_forward_bytes=probe.teacher_forward_bytes,
        forward_bytes=probe.forward_bytes,
        backward_bytes=probe.backward_bytes,
        loss=loss,
        cache=spec.cache,
        step_seconds=statistics.median(seconds),
        step_seconds_all=[round(s, 4) for s in seconds],
        steps_per_epoch=spec.steps_per_epoch,
        epochs=settings.epochs,
        phases=phases,
        peak_bytes=peak,
        peak_phase=peak_phase,
        needed_bytes=peak + extra,
        fits=peak + extra <= available,
        prefix=spec.prefix,
        chunk_setting=getattr(settings, "chunk_size", None),
        notes=list(spec.notes),
    )
    if not stage.fits:
        stage.advice = advice(stage, spec, parts, available - extra)
    return stage


def _weights(model: nn.Module) -> tuple[int, int, int]:
    """(parameters, their bytes, buffer bytes); tied weights counted once."""
    params = list(model.parameters())  # shared Parameters appear once
    count = sum(p.numel() for p in params)
    size = sum(p.numel() * p.element_size() for p in params)
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    return count, size, buffers


def _teacher_weights(teachers: list[nn.Module]) -> tuple[int, int, int, str | None]:
    """(parameters, their bytes, buffer bytes, dtype) of the frozen models a stage reads."""
    params, size, buffers = 0, 0, 0
    dtype = None
    for teacher in teachers:
        count, teacher_size, teacher_buffers = _weights(teacher)
        params += count
        size += teacher_size
        buffers += teacher_buffers
        dtype = str(next(teacher.parameters()).dtype).removeprefix("torch.")
    return params, size, buffers, dtype


def _optimizer_bytes(
    optimizer: Any, trainable: list[nn.Parameter], device: torch.device
) -> tuple[int, int, int]:
    """(states per parameter, their bytes, the optimizer step's temporaries)."""
    from kdistill.optim import uses_fused_kernel

    gradient_bytes = sum(p.numel() * p.element_size() for p in trainable)
    states = OPTIMIZER_STATES[optimizer.name]
    if optimizer.name == "sgd" and optimizer.momentum == 0:
        states = 0
    # make_optimizer picks torch's fused kernels, which update in place; the
    # foreach path takes a temporary of every state at once, the per-parameter
    # loop two temporaries of the largest parameter (the denominator)
    largest = max((p.numel() * p.element_size() for p in trainable), default=0)
    if states == 0 or uses_fused_kernel(trainable):
        temp = 0
    else:
        temp = gradient_bytes if device.type == "cuda" else 2 * largest
    return states, states * gradient_bytes, temp


def training_step(
    trainee: nn.Module,
    optimizer: torch.optim.Optimizer,
    settings: Any,
    rows: Tensor,
    micro_step: Callable[[Tensor], object],
) -> None:
    """One optimizer step as `fit` runs it: `micro_step` (forward, loss and backward) on
    each of train.grad_accum parts of `rows`, the gradient clipped, the optimizer step."""
    trainee.train()
    for idx in rows.chunk(settings.grad_accum):
        micro_step(idx)
    if settings.grad_clip is not None:
        torch.nn.utils.clip_grad_norm_(trainee.parameters(), settings.grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _time_steps(session: Session, steps: int, device: torch.device) -> list[float]:
    """Seconds of each of `steps` optimizer steps after one warm-up step (and the
    untimed heaviest step, where the stage has one)."""
    _warm_up(session)
    seconds = []
    for i in range(1, steps + 1):
        _synchronize(device)
        start = time.perf_counter()
        session.step(i)
        _synchronize(device)
        seconds.append(time.perf_counter() - start)
    return seconds


def _warm_up(session: Session) -> None:
    session.step(0)
    if session.heaviest is not None:
        session.heaviest()


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_peak(build: Callable[[], Session], steps: int, device: torch.device) -> int:
    """Peak bytes of live tensors while a stage's models are built and run one warm-up
    and `steps` optimizer steps: CUDA's allocator statistics, or on CPU the running sum
    of torch.profiler's allocation and free events (there is no CPU max_memory_allocated)."""
    gc.collect()

    def run() -> None:
        session = build()
        try:
            _warm_up(session)
            for i in range(1, steps + 1):
                session.step(i)
            _synchronize(device)
        finally:
            session.close()

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        run()
        return int(torch.cuda.max_memory_allocated(device) - before)
    return profiled_peak(run)


@dataclass(frozen=True)
class PlanPlacement:
    """Where the plan runs a stage's steps (kdistill.steps.Placement): its device and the
    recipe's precision, without an Accelerator."""

    device: torch.device
    precision: str
    process_index: int = 0

    @property
    def mixed_precision(self) -> str:
        return "no" if self.precision == "fp32" else self.precision

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        return _autocast(self.precision, self.device)


def _autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager[Any]:
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=DTYPES[precision])


def epoch_rows(n: int, seed: int) -> Tensor:
    """The first epoch's order, as the training loops draw it."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1009))


def step_rows(order: Tensor, i: int, batch: int, steps_per_epoch: int) -> Tensor:
    step = i % steps_per_epoch
    return order[step * batch : (step + 1) * batch]


def steps_in_epoch(n: int, settings: Any, label: str, unit: str) -> int:
    steps = n // settings.batch_size
    if steps == 0:
        raise TrainingError(
            f"{label}: the batch size ({settings.batch_size} {unit}) is larger than the "
            f"training split ({n} {unit}); lower train.batch_size"
        )
    return steps
