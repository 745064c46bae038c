"""`kdistill plan`: the memory and time of each stage of a recipe, before anything trains.

For every stage that trains a model (teacher, assistant, baseline, seqkd, distill, ...)
`plan` builds the stage's real models on the recipe's real data and reports:

- weights: the trained model's parameters (plus projectors trained with it) and the
  frozen teacher's (when the stage reads one), in their dtypes; buffers apart;
- gradients (one per trainable parameter, in its dtype) and optimizer state (AdamW and
  Adam: 2 states per parameter; SGD: 1 with momentum, 0 without);
- activations of one micro-batch (batch_size / grad_accum samples), *measured*: the
  bytes autograd saves for the backward pass in a forward + backward of the student on a
  real batch (saved-tensor hooks, each storage counted once, weights excluded), plus
  the model's output; and what the teacher hands to the loss (its logits, hidden
  states or top-k) and the largest layer input + output of its forward pass;
- language models: the loss's memory, chunked as the run computes it (kdistill.losses.lm
  at train.chunk_size) and naive (the (B, T, V) float32 tensors a full-logits loss
  holds), from LOSS_COPIES below;
- the teacher cache's size on disk: classifier logits (N × classes × dtype bytes, as
  kdistill.cache.dense writes them) or a language model's top-k (bytes per token × tokens,
  as kdistill.cache.topk writes them);
- the time per optimizer step: the median of `steps` real training steps after one
  warm-up step;
- an estimated peak: weights + optimizer state + the largest of the step's phases

      teacher forward  accumulated grads + teacher's largest layer in + out
      forward + loss   accumulated grads + teacher output + activations + the larger
                       of the loss and the largest input + output of one of the
                       trained model's layers that autograd does not save
                       (classifiers; LayerTensors: nn.LSTM's output, for one)
      backward         teacher output + activations walked in reverse, each layer
                       with its output's and input's gradients, plus the parameter
                       gradients written by then (SavedTensors: measured where the
                       backward pass writes each; all of them with grad_accum > 1)
      optimizer step   gradients + the optimizer's temporaries

  ("accumulated grads" only with train.grad_accum > 1: the earlier micro-batches'),
  compared with the device's memory; when it does not fit, which recipe settings to
  change, by YAML path, and what each would give.

`plan(..., measure=True)` also measures the true peak of the same steps by a method
that shares nothing with the estimate: on CPU, torch.profiler's allocation events
(every tensor allocation and free of the CPU allocator, in time order; the peak of
their running sum from before the models are built); on CUDA,
torch.cuda.max_memory_allocated. Both count tensor memory, not the Python process
(interpreter, libraries, the data: shown apart).

Not planned: the evaluation passes between epochs, writing checkpoints, the teacher's
pass that fills a cache, seqkd's generation and on-policy sampling; several processes
(each one holds one share of a step). A run also keeps the trained teacher in memory
next to the distill stage's frozen copy, which the estimate does not count.
"""

from __future__ import annotations

import contextlib
import gc
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from torch import Tensor, nn

from kdistill.errors import RecipeError, TrainingError
from kdistill.report import format_duration
from kdistill.teachers import DTYPES

# Peak number of live float32 (tokens × vocabulary) tensors while the loss computes one
# chunk of tokens and its gradients: the logits of both models, their log-probabilities,
# the divergence's intermediates and their gradients. A property of the loss code, not of
# a recipe: counted once, on the loss functions alone, with `profiled_peak` (CPU, torch
# 2.13, 2,048 tokens, vocabulary 2,048, chunks of 512 and 2,048 tokens, the larger count
# kept; skew_reverse_kl assumed equal to skew_kl), consistent with BENCHMARKS.md §5 (full
# logits: 7 for forward KL, 11 for JSD) and checked by tests/test_plan.py. Forward KL's
# chunk gradient is closed form ((q − p)/T, no autograd graph), so it keeps 6 where the
# same loss over full logits through autograd keeps 7 (NAIVE_LOSS_COPIES).
# "cross_entropy" is the teacher and baseline stages' loss (chunked_cross_entropy).
LOSS_COPIES = {
    "cross_entropy": 3,
    "kl": 6,
    "reverse_kl": 8,
    "tvd": 8,
    "jsd": 12,
    "skew_kl": 11,
    "skew_reverse_kl": 11,
}
# The same loss over full (tokens × vocabulary) logits through autograd, as a naive
# implementation (or TRL) computes it: the "loss, naive" row of a plan.
NAIVE_LOSS_COPIES = {**LOSS_COPIES, "kl": 7}
OPTIMIZER_STATES = {"adamw": 2, "adam": 2, "sgd": 1}
MEASURE_METHOD = {
    "cpu": "torch.profiler allocation events (peak of live tensor bytes)",
    "cuda": "torch.cuda.max_memory_allocated",
}


# ------------------------------------------------------------------------- results


@dataclass
class LossMemory:
    """A language-model loss's memory for one micro-batch."""

    kind: str  # "cross_entropy" or a divergence of kdistill.losses.lm
    tokens: int  # counted tokens of the micro-batch
    vocab: int  # columns of each (tokens × vocabulary) tensor
    chunk_size: int  # tokens per chunk the run uses (at most `tokens`)
    copies: int  # LOSS_COPIES[kind]
    chunked_bytes: int  # what the run's chunked loss holds at its peak
    naive_bytes: int  # NAIVE_LOSS_COPIES × tokens × vocab float32: the same loss on full logits


@dataclass
class CacheSize:
    """The teacher cache a stage reads (or would read), on disk."""

    kind: str  # "logits" (classifier) or "top-k" (language model)
    bytes: int
    detail: str
    in_use: bool  # False: what the cache would take if the recipe turned it on


@dataclass
class StagePlan:
    stage: str
    model: str  # YAML path of the trained model
    parameters: int  # trained: the model plus projectors trained with it
    parameter_bytes: int
    buffer_bytes: int
    teacher: str | None  # YAML path of the frozen model read, "cache", or None
    teacher_parameters: int
    teacher_bytes: int
    teacher_dtype: str | None
    gradient_bytes: int
    optimizer: str
    optimizer_states: int  # per trainable parameter
    optimizer_bytes: int
    optimizer_temp_bytes: int  # the optimizer step's temporaries
    batch_size: int
    grad_accum: int
    micro_batch: int
    activation_bytes: int  # measured: saved for backward + the model's output
    activation_backward_bytes: int  # from the same: saved + gradients in the backward pass
    teacher_output_bytes: int  # measured: what the teacher hands the loss
    teacher_forward_bytes: int  # measured: the teacher's largest layer input + output
    loss: LossMemory | None
    cache: CacheSize | None
    step_seconds: float  # median over the timed steps
    step_seconds_all: list[float]
    steps_per_epoch: int
    epochs: int
    phases: dict[str, int]  # estimated bytes of each phase of a step
    peak_bytes: int  # estimated
    peak_phase: str
    needed_bytes: int  # peak, plus the data and the process on CPU
    fits: bool
    advice: list[str] = field(default_factory=list)
    measured_peak_bytes: int | None = None
    prefix: str = "train"  # YAML section of the stage's training settings
    chunk_setting: int | None = None  # its chunk_size, language models
    notes: list[str] = field(default_factory=list)
    forward_bytes: int = 0  # measured: the largest layer input + output autograd did not save
    # measured: activation_backward_bytes with each parameter's gradient counted from
    # where the backward pass writes it (SavedTensors.backward_with_gradients)
    backward_bytes: int | None = None

    @property
    def stage_seconds(self) -> float:
        """Training steps only (no evaluation, no checkpoints)."""
        return self.step_seconds * self.steps_per_epoch * self.epochs


@dataclass
class Plan:
    recipe: str
    task: str  # "classifier" or "causal_lm"
    device: str
    available_bytes: int
    available_source: str
    process_bytes: int  # resident memory of this process before the models (CPU)
    data_bytes: int  # tensors of the data held in memory
    data: str
    steps: int
    measure_method: str | None
    stages: list[StagePlan]
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        for stage, record in zip(self.stages, out["stages"]):
            record["stage_seconds"] = stage.stage_seconds
        return out


# ------------------------------------------------------------------------- entry


def plan(
    recipe: Any,
    *,
    data_dir: str | Path | None = None,
    steps: int = 3,
    measure: bool = False,
    stages: list[str] | None = None,
    device: str | torch.device | None = None,
    console: Console | None = None,
) -> Plan:
    """Plan every training stage of `recipe` (a Recipe or an LMRecipe): memory and time.

    steps: timed optimizer steps per stage, after one warm-up step. measure: also run
    the steps once more under an independent peak-memory measurement. stages: only
    these of the recipe's stages (default: all).
    """
    from kdistill.recipe.causal_lm import LMRecipe

    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise RecipeError(f"--steps must be a positive integer (timed steps); got {steps!r}")
    console = console or Console(stderr=True, quiet=True)
    target = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    process = _resident_bytes() if target.type == "cpu" else 0
    available, source = available_memory(target)
    if isinstance(recipe, LMRecipe):
        specs, data_bytes, data_text, notes = _lm_stages(recipe, data_dir, target, steps)
        task = "causal_lm"
    else:
        specs, data_bytes, data_text, notes = _classifier_stages(recipe, data_dir, target, steps)
        task = "classifier"
    if stages:
        unknown = [s for s in stages if s not in {spec.name for spec in specs}]
        if unknown:
            raise RecipeError(
                f"--stage {', '.join(unknown)}: not a stage this plan covers; the recipe's "
                f"trained stages are {', '.join(spec.name for spec in specs) or 'none'}"
            )
        specs = [spec for spec in specs if spec.name in stages]
    extra = data_bytes + process if target.type == "cpu" else 0
    planned = []
    for spec in specs:
        console.log(f"plan: {spec.name}: building the models, {steps} + 1 steps")
        stage = _plan_stage(spec, steps, target, available, extra)
        if measure:
            console.log(f"plan: {spec.name}: measuring the peak of the same steps")
            stage.measured_peak_bytes = measure_peak(spec.build, steps, target)
        planned.append(stage)
    return Plan(
        recipe=recipe.name,
        task=task,
        device=str(target),
        available_bytes=available,
        available_source=source,
        process_bytes=process,
        data_bytes=data_bytes,
        data=data_text,
        steps=steps,
        measure_method=MEASURE_METHOD[target.type] if measure else None,
        stages=planned,
        notes=notes,
    )


def available_memory(device: torch.device) -> tuple[int, str]:
    """(bytes free for a run, where the figure comes from) on `device`."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free), "torch.cuda.mem_get_info (free)"
    try:
        import psutil
    except ImportError:
        pass
    else:
        return int(psutil.virtual_memory().available), "psutil (available RAM)"
    with open("/proc/meminfo", encoding="ascii") as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024, "/proc/meminfo MemAvailable"
    raise RuntimeError("no MemAvailable in /proc/meminfo and psutil is not installed")


# -------------------------------------------------------------------- one stage


@dataclass
class _Probe:
    """What one micro-batch's forward + backward held, measured."""

    activation_bytes: int
    activation_backward_bytes: int
    teacher_output_bytes: int
    teacher_forward_bytes: int
    forward_bytes: int = 0  # the trained model's largest layer input + output not saved
    # activations + the parameter gradients written so far, over the backward walk
    backward_bytes: int | None = None


@dataclass
class _Session:
    """A stage's models and optimizer, built for a few steps."""

    trained: nn.Module  # what the optimizer updates
    teachers: list[nn.Module]  # the frozen models the stage reads
    optimizer: torch.optim.Optimizer
    step: Callable[[int], None]  # optimizer step i (0: the warm-up)
    probe: Callable[[], _Probe]
    close: Callable[[], None] = lambda: None
    # one untimed step on the stage's largest inputs (the longest texts), run after the
    # warm-up so the optimizer holds its state: the measured peak includes it, the
    # step time does not (it would stand for every step of the epoch)
    heaviest: Callable[[], None] | None = None


@dataclass
class _StageSpec:
    name: str
    where: str  # YAML path of the trained model
    prefix: str  # YAML section of its training settings: "train" or "teacher.train"
    settings: Any  # TrainConfig or LMTrainConfig
    teacher: str | None
    build: Callable[[], _Session]
    steps_per_epoch: int
    loss: Callable[[int], LossMemory] | None  # of the micro-batch size, for LMs
    cache: CacheSize | None
    options: dict[str, Any]  # what advice may suggest: teacher precision, signal, ...
    notes: list[str] = field(default_factory=list)


def _plan_stage(
    spec: _StageSpec, steps: int, device: torch.device, available: int, extra: int
) -> StagePlan:
    from kdistill.optim import uses_fused_kernel

    settings = spec.settings
    session = spec.build()
    try:
        trained_params, trained_bytes, buffers = _weights(session.trained)
        teacher_params, teacher_bytes, teacher_buffers = 0, 0, 0
        teacher_dtype = None
        for teacher in session.teachers:
            count, size, extra_buffers = _weights(teacher)
            teacher_params += count
            teacher_bytes += size
            teacher_buffers += extra_buffers
            teacher_dtype = str(next(teacher.parameters()).dtype).removeprefix("torch.")
        trainable = [p for p in session.trained.parameters() if p.requires_grad]
        gradient_bytes = sum(p.numel() * p.element_size() for p in trainable)
        optimizer = settings.optimizer
        states = OPTIMIZER_STATES[optimizer.name]
        if optimizer.name == "sgd" and optimizer.momentum == 0:
            states = 0
        optimizer_bytes = states * gradient_bytes
        # make_optimizer picks torch's fused kernels, which update in place; the
        # foreach path takes a temporary of every state at once, the per-parameter
        # loop two temporaries of the largest parameter (the denominator)
        largest = max((p.numel() * p.element_size() for p in trainable), default=0)
        if states == 0 or uses_fused_kernel(trainable):
            temp = 0
        else:
            temp = gradient_bytes if device.type == "cuda" else 2 * largest
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


def estimate_phases(parts: Mapping[str, int], *, grad_accum: int) -> dict[str, int]:
    """Estimated bytes of each phase of an optimizer step (module docstring), from the
    parts: weights, optimizer, gradients, optimizer_temp, activations, activations_backward,
    teacher_output, teacher_forward, loss; forward (optional: the trained model's
    largest layer input + output, held beside the activations while that layer runs);
    backward (optional: activations_backward with each gradient counted from where the
    backward pass writes it; used without accumulation, where no gradient exists before
    the backward pass)."""
    static = parts["weights"] + parts["optimizer"]
    accumulated = parts["gradients"] if grad_accum > 1 else 0
    held = parts["teacher_output"] + parts["activations"]
    backward = parts["gradients"] + parts["activations_backward"]
    if grad_accum == 1 and "backward" in parts:
        backward = parts["backward"]
    return {
        "teacher forward": static + accumulated + parts["teacher_forward"],
        "forward + loss": static + accumulated + held + max(parts["loss"], parts.get("forward", 0)),
        "backward": static + parts["teacher_output"] + backward,
        "optimizer step": static + parts["gradients"] + parts["optimizer_temp"],
    }


def _weights(model: nn.Module) -> tuple[int, int, int]:
    """(parameters, their bytes, buffer bytes); tied weights counted once."""
    params = list(model.parameters())  # shared Parameters appear once
    count = sum(p.numel() for p in params)
    size = sum(p.numel() * p.element_size() for p in params)
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    return count, size, buffers


def _time_steps(session: _Session, steps: int, device: torch.device) -> list[float]:
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


def _warm_up(session: _Session) -> None:
    session.step(0)
    if session.heaviest is not None:
        session.heaviest()


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ------------------------------------------------------------------ measuring


def measure_peak(build: Callable[[], _Session], steps: int, device: torch.device) -> int:
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


def profiled_peak(run: Callable[[], None]) -> int:
    """The largest sum of CPU tensor bytes allocated and not yet freed at any moment of
    `run()`, from torch.profiler's memory events in time order."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    profiler = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    # kineto writes a line at start and stop, the allocator a warning for each tensor
    # freed that was allocated before; the same steps just ran with their output shown
    with _quiet_stderr():
        profiler.start()
        try:
            run()
        finally:
            profiler.stop()
    results: Any = profiler.profiler.kineto_results  # type: ignore[union-attr]
    events: list[Any] = sorted(
        (
            event
            for event in results.events()
            if event.name() == "[memory]" and event.device_type() == DeviceType.CPU
        ),
        key=lambda event: event.start_ns(),
    )
    live = peak = 0
    for event in events:
        live += event.nbytes()
        peak = max(peak, live)
    return peak


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


class SavedTensors:
    """Bytes autograd keeps for the backward pass inside the `with` block: every tensor
    saved by an operation, counted once per storage, leaving out the storages of
    `exclude` (the weights, which exist anyway).

    `backward_bytes` models the backward pass, which walks the saved tensors in reverse:
    while it is at the i-th saved tensor (in forward order), the ones saved before it are
    still held and, when the tensor takes a gradient (an activation, not an input, a mask
    or indices), the gradients of that layer's output and input exist too, about two
    more of its size: max_i (s_1 + ... + s_i + 2 s_i [s_i takes a gradient]).

    `gradients_during(parameters)` around the backward call records where in that walk
    each parameter's gradient is first written (the smallest saved position unpacked so
    far when its gradient accumulates). `backward_with_gradients` then adds to each step
    of the walk only the gradients written by then: a word embedding's gradient, written
    last, is not counted next to the activations of the first layers' backward.
    """

    def __init__(self, exclude: list[nn.Module]) -> None:
        self.skip = _weight_storages(exclude)
        # storage -> (bytes, whether a tensor on it takes a gradient), in the order saved
        self.storages: dict[int, tuple[int, bool]] = {}
        self.positions: dict[int, int] = {}  # storage -> its index in `storages`
        self.walk: float = float("inf")  # smallest saved position the backward has read
        self.gradients: list[tuple[float, int]] = []  # (walk position when written, bytes)
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    def _pack(self, tensor: Tensor) -> tuple[int | None, Tensor]:
        return self.add(tensor), tensor

    def _unpack(self, packed: tuple[int | None, Tensor]) -> Tensor:
        position, tensor = packed
        if position is not None:
            self.walk = min(self.walk, position)
        return tensor

    def add(self, tensor: Any) -> int | None:
        """Count a tensor held outside autograd's saved set (a model's output); returns
        its storage's position in the saved order (None: not counted)."""
        if not isinstance(tensor, Tensor) or tensor.is_sparse or tensor.device.type == "meta":
            return None
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if not key or key in self.skip:
            return None
        _, grad = self.storages.get(key, (0, False))
        self.positions.setdefault(key, len(self.storages))
        self.storages[key] = (storage.nbytes(), grad or tensor.requires_grad)
        return self.positions[key]

    @property
    def bytes(self) -> int:
        return sum(size for size, _ in self.storages.values())

    @property
    def backward_bytes(self) -> int:
        return self._walk_peak(lambda position: 0)

    @property
    def backward_with_gradients(self) -> int:
        """`backward_bytes` plus, at each step of the walk, the parameter gradients
        written by then (needs `gradients_during` around the backward call)."""

        def gradients_at(position: int) -> int:
            return sum(size for where, size in self.gradients if where >= position)

        return max(self._walk_peak(gradients_at), gradients_at(0))

    def _walk_peak(self, gradients_at: Callable[[int], int]) -> int:
        held, peak = 0, 0
        for position, (size, grad) in enumerate(self.storages.values()):
            held += size
            peak = max(peak, held + (2 * size if grad else 0) + gradients_at(position))
        return peak

    @contextlib.contextmanager
    def gradients_during(self, parameters: Iterator[nn.Parameter]) -> Iterator[None]:
        """Record where each of `parameters` first gets its gradient in the backward
        pass run inside the block (the parameters start without gradients)."""
        seen: set[int] = set()

        def written(param: Tensor) -> None:
            if id(param) not in seen:
                seen.add(id(param))
                self.gradients.append((self.walk, param.numel() * param.element_size()))

        self.walk = float("inf")
        handles = [
            p.register_post_accumulate_grad_hook(written) for p in parameters if p.requires_grad
        ]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def __enter__(self) -> SavedTensors:
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._hooks.__exit__(*exc)


class LayerTensors:
    """The input and output tensors of every leaf module of `models` run inside the
    block, kept (so no storage is reused) to be compared with what autograd saved.

    `largest_unsaved(saved)`: the largest bytes of one layer's input + output that
    autograd did not save, i.e. what the forward pass holds beside the activations
    while that layer runs. Usually nothing: a linear layer's input is saved, its
    output saved by the next layer. An nn.LSTM's output is not saved (only its
    per-step pieces are), and it exists next to them until the layer returns."""

    def __init__(self, models: list[nn.Module]) -> None:
        self.models = models
        self.layers: list[tuple[Any, Any]] = []
        self.handles: list[Any] = []

    def __enter__(self) -> LayerTensors:
        self.handles = _hook_leaves(self.models, lambda m, a, o: self.layers.append((a, o)))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self.handles:
            handle.remove()

    def largest_unsaved(self, saved: SavedTensors) -> int:
        held = set(saved.storages) | saved.skip
        return max(
            (_tensor_bytes((args, output), exclude=held) for args, output in self.layers),
            default=0,
        )

    def clear(self) -> None:
        self.layers.clear()


@contextlib.contextmanager
def largest_layer(models: list[nn.Module]) -> Iterator[list[int]]:
    """Yields a one-item list that ends up holding the largest input + output bytes of
    any leaf module of `models` run inside the block (an inference pass's working set)."""
    found = [0]

    def hook(module: nn.Module, args: Any, output: Any) -> None:
        found[0] = max(found[0], _tensor_bytes(args) + _tensor_bytes(output))

    handles = _hook_leaves(models, hook)
    try:
        yield found
    finally:
        for handle in handles:
            handle.remove()


def _hook_leaves(models: list[nn.Module], hook: Callable[..., None]) -> list[Any]:
    """A forward hook on every leaf module of `models`; returns the handles."""
    return [
        module.register_forward_hook(hook)
        for model in models
        for module in model.modules()
        if not list(module.children())
    ]


def _tensor_bytes(value: Any, exclude: set[int] | None = None) -> int:
    """Bytes of the tensors in a tensor, tuple, list or mapping, each storage once."""
    seen: dict[int, int] = {}

    def visit(item: Any) -> None:
        if isinstance(item, Tensor):
            storage = item.untyped_storage()
            if exclude is None or storage.data_ptr() not in exclude:
                seen[storage.data_ptr()] = storage.nbytes()
        elif isinstance(item, Mapping):
            for inner in item.values():
                visit(inner)
        elif isinstance(item, (tuple, list)):
            for inner in item:
                visit(inner)

    visit(value)
    return sum(seen.values())


def _weight_storages(models: list[nn.Module]) -> set[int]:
    return {
        tensor.untyped_storage().data_ptr()
        for model in models
        for tensor in [*model.parameters(), *model.buffers()]
    }


def _resident_bytes() -> int:
    """This process's resident memory (VmRSS), 0 where /proc is missing."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class _RecordedSignal:
    """A teacher signal that keeps its last output: the bytes it hands the loss."""

    def __init__(self, signal: Any) -> None:
        self.signal, self.models = signal, getattr(signal, "models", {})
        self.last: Any = None

    def to(self, device: torch.device) -> _RecordedSignal:
        self.signal.to(device)
        return self

    def __call__(self, x: Any, indices: Tensor) -> Any:
        self.last = self.signal(x, indices)
        return self.last


@dataclass(frozen=True)
class _PlanPlacement:
    """Where the plan runs a stage's steps (kdistill.train.Placement): its device and the
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


def _epoch_rows(n: int, seed: int) -> Tensor:
    """The first epoch's order, as the training loops draw it."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1009))


def _step_rows(order: Tensor, i: int, batch: int, steps_per_epoch: int) -> Tensor:
    step = i % steps_per_epoch
    return order[step * batch : (step + 1) * batch]


def _steps_per_epoch(n: int, settings: Any, label: str, unit: str) -> int:
    steps = n // settings.batch_size
    if steps == 0:
        raise TrainingError(
            f"{label}: the batch size ({settings.batch_size} {unit}) is larger than the "
            f"training split ({n} {unit}); lower train.batch_size"
        )
    return steps


# ------------------------------------------------------------------ classifiers


def _classifier_stages(
    recipe: Any, data_dir: str | Path | None, device: torch.device, steps: int
) -> tuple[list[_StageSpec], int, str, list[str]]:
    """The trained stages of a classifier recipe, in the order kdistill.pipeline runs them:
    teacher (and ensemble members), assistant, baseline, distill (and later generations)."""
    from kdistill.data import build as build_data
    from kdistill.pipeline import baseline_terms
    from kdistill.recipe import LossTerm

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
    specs: list[_StageSpec] = []
    notes: list[str] = []
    stages, teacher_cfg = recipe.stages, recipe.teacher

    def add(
        name: str,
        trained: tuple[Any, str],
        teachers: dict[str, tuple[Any, str]],
        terms: list[Any],
        teacher_stage: bool = False,
    ) -> _StageSpec:
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
) -> _StageSpec:
    """One classifier stage as the pipeline runs it (kdistill.pipeline, kdistill.train)."""
    from kdistill.losses.objective import Objective
    from kdistill.optim import make_optimizer
    from kdistill.pipeline import make_model, sample_inputs, untrained_teacher_source
    from kdistill.tasks.classify import ClassifierSteps
    from kdistill.teachers import CachedTeacher, EnsembleTeacher, LiveTeacher
    from kdistill.train import Trainee

    teacher_cfg = recipe.teacher
    # the stages that learn from a teacher also train on the transfer texts, if any
    stage_data = data if name == "baseline" or name.startswith("teacher") else data.for_distill()
    reads_teacher = Objective(objective_terms).needs_teacher and bool(teachers)
    cached = reads_teacher and teacher_cfg.cache and len(teachers) == 1
    n_train = len(stage_data.train)
    steps_per_epoch = _steps_per_epoch(n_train, settings, name, "samples")
    precision = (teacher_cfg.precision or "fp32") if teacher_cfg is not None else "fp32"
    spec, where = trained
    cache = None
    cache_logits: Tensor | None = None
    if reads_teacher and teacher_cfg is not None:
        dtype = getattr(torch, teacher_cfg.cache_dtype)
        size = n_train * stage_data.num_classes * torch.empty((), dtype=dtype).element_size()
        cache = CacheSize(
            "logits",
            size,
            f"{n_train} samples × {stage_data.num_classes} classes × {teacher_cfg.cache_dtype} "
            "(+ the .npy header)",
            in_use=bool(cached),
        )
        if cached:  # memory-mapped in a run: data, not the step's memory
            cache_logits = torch.zeros(n_train, stage_data.num_classes, dtype=dtype)
    order = _epoch_rows(n_train, seed)
    micro = settings.batch_size // settings.grad_accum
    worst: Tensor | None = None

    def build() -> _Session:
        nonlocal order, worst
        # the plan counts memory and time, not accuracy: an untrained teacher will do
        source = untrained_teacher_source(recipe, stage_data, where)
        torch.manual_seed(seed)
        model = make_model(stage_data, spec, where=where, teacher=source).to(device)
        del source
        signal: Any = None
        if reads_teacher:
            if cached:
                assert cache_logits is not None
                signal = CachedTeacher(cache_logits).to(device)
            else:
                built = {
                    member: make_model(stage_data, member_spec, where=member_where)
                    for member, (member_spec, member_where) in teachers.items()
                }
                if len(built) > 1:
                    signal = EnsembleTeacher(
                        built,
                        combine=teacher_cfg.combine,
                        weights=teacher_cfg.weights,
                        precision=precision,
                    ).to(device)
                else:
                    signal = LiveTeacher(built["main"], precision=precision).to(device)
        objective = Objective(objective_terms)
        models = getattr(signal, "models", {})
        trainee: nn.Module = model
        if objective.feature_terms and models:
            extras = objective.bind(
                model,
                models,
                sample=sample_inputs(stage_data, model, device),
                teacher_sample=sample_inputs(stage_data, models["main"], device),
                num_train=n_train,
                seed=seed,
            )
            if len(list(extras.children())):
                trainee = Trainee(model, extras)
        optimizer = make_optimizer(trainee, settings.optimizer)
        if stage_data.is_text and settings.batch_size <= n_train:
            if getattr(stage_data, "bucket_batches", None) is not None:
                generator = torch.Generator().manual_seed(seed * 1009)
                order = stage_data.train_order(model, settings.batch_size, generator)
            lengths = stage_data.tokenized(model, "train").lengths
            worst = torch.sort(lengths, descending=True, stable=True).indices[:micro]

        recorded = _RecordedSignal(signal) if signal is not None else None
        # the stage's own micro-step (kdistill.tasks.classify), with the plan's probes around it
        steps = ClassifierSteps(
            model,
            data=stage_data,
            objective=objective,
            teacher=recorded,
            settings=settings,
            accelerator=_PlanPlacement(device, settings.precision),
            seed=seed,
            label=name,
        )

        def micro_step(idx: Tensor, counter: SavedTensors | None = None) -> _Probe:
            teacher_models = list(models.values())
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
            teacher_output = _tensor_bytes(last, _weight_storages(teacher_models))
            if counter is not None:
                counter.add(outputs[-1])
            if counter is None:
                (total / settings.batch_size).backward()
                return _Probe(0, 0, teacher_output, layer[0])
            with counter.gradients_during(trainee.parameters()):
                (total / settings.batch_size).backward()
            forward = layers.largest_unsaved(counter)
            layers.clear()
            return _Probe(
                counter.bytes,
                counter.backward_bytes,
                teacher_output,
                layer[0],
                forward,
                counter.backward_with_gradients,
            )

        def step(i: int) -> None:
            run_step(_step_rows(order, i, settings.batch_size, steps_per_epoch))

        def heaviest() -> None:
            assert worst is not None
            run_step(worst.repeat(settings.grad_accum))

        def run_step(rows: Tensor) -> None:
            trainee.train()
            for idx in rows.chunk(settings.grad_accum):
                micro_step(idx)
            if settings.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(trainee.parameters(), settings.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        def probe() -> _Probe:
            trainee.train()
            idx = worst if worst is not None else _step_rows(order, 0, micro, n_train // micro)
            teacher_models = list(models.values())
            result = micro_step(idx, SavedTensors([trainee, *teacher_models]))
            optimizer.zero_grad(set_to_none=True)
            return result

        return _Session(
            trainee,
            list(models.values()),
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
    return _StageSpec(
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
            "task": "classifier",
            "teacher_precision": precision if reads_teacher and not cached else None,
            "cache_possible": bool(
                reads_teacher
                and not cached
                and len(teachers) == 1
                and not Objective(objective_terms).feature_terms
                and not settings.augment.random
            ),
        },
        notes=notes,
    )


# -------------------------------------------------------------- language models


def _lm_stages(
    recipe: Any, data_dir: str | Path | None, device: torch.device, steps: int
) -> tuple[list[_StageSpec], int, str, list[str]]:
    from kdistill.lm.data import build_lm_data
    from kdistill.tasks.causal_lm import LMObjective

    with tempfile.TemporaryDirectory(prefix="kdistill-plan-") as folder:
        data = build_lm_data(recipe.data, data_dir=data_dir, tokenizer_dir=Path(folder))
    data_bytes = data.train.nbytes + data.val.nbytes
    described = (
        f"{len(data.train)} train + {len(data.val)} val sequences of {data.seq_len} tokens, "
        f"vocabulary {data.vocab_size}"
    )
    specs: list[_StageSpec] = []
    notes: list[str] = []
    teacher = recipe.teacher
    seed = recipe.seeds[0]
    ce = LMObjective(ce_weight=1.0)
    for name in recipe.stages:
        if name == "teacher":
            assert teacher is not None
            if teacher.pretrained:
                notes.append("teacher: weights from teacher.checkpoint / model.path, not trained")
                continue
            specs.append(
                _lm_stage(
                    recipe, data, name, (teacher.model, "teacher.model"), ce,
                    recipe.teacher_train(), "teacher.train", device, steps, seed,
                )
            )  # fmt: skip
        elif name in ("baseline", "seqkd"):
            assert recipe.student is not None
            stage = _lm_stage(
                recipe, data, name, (recipe.student.model, "student.model"), ce,
                recipe.train, "train", device, steps, seed,
            )  # fmt: skip
            if name == "seqkd":
                stage.notes.append(
                    "planned as cross-entropy on sequences of data.seq_len tokens; the "
                    "teacher's generation pass before it is not planned"
                )
            specs.append(stage)
        elif name == "distill":
            assert recipe.student is not None
            stage = _lm_stage(
                recipe, data, name, (recipe.student.model, "student.model"),
                LMObjective.of(recipe.objective), recipe.train, "train", device, steps, seed,
            )  # fmt: skip
            if getattr(recipe, "on_policy", None) is not None:
                stage.notes.append("on-policy sampling steps are not planned")
            specs.append(stage)
    return specs, data_bytes, described, notes


def lm_loss_memory(
    *,
    kind: str,
    tokens: int,
    hidden: int,
    head_rows: int,
    vocab: int,
    bias: bool,
    with_cross_entropy: bool,
    chunk_size: int | None,
) -> LossMemory:
    """The memory of a language-model loss over one micro-batch of `tokens` counted tokens,
    as kdistill.tasks.causal_lm computes it (chunked) and over full logits (naive).

    kind "cross_entropy" (chunked_cross_entropy: each chunk's logits are recomputed in the
    backward pass): LOSS_COPIES × chunk × head_rows float32 tensors, plus the gradient of
    the hidden states. A divergence (chunked_divergence): LOSS_COPIES × chunk × U, U the
    student's head rows with cross-entropy else the compared vocabulary, plus the
    gradients it stores in the forward pass, one set per output (divergence, and
    cross-entropy when weighted): hidden states (tokens, H), head weight and bias.
    """
    from kdistill.losses.lm import CHUNK_ELEMENTS

    copies = LOSS_COPIES[kind]
    if kind == "cross_entropy":
        columns = head_rows
        default = max(1, CHUNK_ELEMENTS // head_rows)
        stored = tokens * hidden * 4
    else:
        columns = head_rows if with_cross_entropy else vocab
        default = max(1, CHUNK_ELEMENTS // max(vocab, head_rows))
        outputs = 2 if with_cross_entropy else 1
        stored = outputs * (tokens * hidden + head_rows * hidden + (head_rows if bias else 0)) * 4
    chunk = min(chunk_size or default, max(tokens, 1))
    return LossMemory(
        kind=kind,
        tokens=tokens,
        vocab=columns,
        chunk_size=chunk,
        copies=copies,
        chunked_bytes=copies * chunk * columns * 4 + stored,
        naive_bytes=NAIVE_LOSS_COPIES[kind] * tokens * columns * 4,
    )


def lm_cache_size(recipe: Any, data: Any) -> CacheSize:
    """The top-k cache of the recipe's teacher over the training sequences, as
    kdistill.cache.topk writes it: bytes per token × tokens."""
    from kdistill.cache.codec import bytes_per_token
    from kdistill.cache.manifest import TopKCacheSpec, new_manifest

    assert recipe.teacher is not None
    term = recipe.divergence()
    temperature = term.temperature if term is not None and term.temperature else 1.0
    spec = TopKCacheSpec(
        teacher="plan",
        tokenizer="plan",
        dataset="plan",
        k=recipe.teacher.cache.top_k,
        temperature=float(getattr(temperature, "start", temperature)),
        seq_len=data.seq_len,
        num_sequences=len(data.train),
        vocab_size=data.vocab_size,
        encoding=recipe.teacher.cache.encoding,
    )
    per_token = bytes_per_token(new_manifest(spec))
    tokens = len(data.train) * data.seq_len
    compact = ", compact" if spec.encoding == "compact" else ""
    return CacheSize(
        "top-k",
        per_token * tokens,
        f"{per_token} bytes/token (top {spec.k}{compact}) × {tokens:,} tokens",
        in_use=recipe.teacher.signal == "cache",
    )


class _TopKStandIn:
    """In place of a cache that does not exist yet: top-k ids and log-probabilities of
    the right shapes and dtypes (as CachedLMTeacher returns them), for given rows."""

    def __init__(self, rows: Tensor, seq_len: int, vocab: int, k: int, temperature: float):
        from kdistill.cache.topk_teacher import teacher_topk

        self.position = {int(row): i for i, row in enumerate(rows.tolist())}
        generator = torch.Generator().manual_seed(0)
        ids, logprobs = [], []
        for _ in range(len(rows)):
            logits = torch.randn(1, seq_len, vocab, generator=generator)
            one_ids, one_logprobs = teacher_topk(logits, k=k, temperature=temperature)
            ids.append(one_ids.long())
            logprobs.append(one_logprobs.float())
        self.ids, self.logprobs = torch.cat(ids), torch.cat(logprobs)  # (n, T, k)

    def __call__(self, input_ids: Tensor, indices: Tensor) -> dict[str, Tensor | None]:
        where = torch.tensor([self.position[int(i)] for i in indices])
        return {
            "teacher_topk_ids": self.ids[where].to(input_ids.device),
            "teacher_topk_logprobs": self.logprobs[where].to(input_ids.device),
        }


def _lm_stage(
    recipe: Any,
    data: Any,
    name: str,
    trained: tuple[Any, str],
    objective: Any,
    settings: Any,
    prefix: str,
    device: torch.device,
    steps: int,
    seed: int,
) -> _StageSpec:
    """One language-model stage as kdistill.lm.pipeline and fit_lm run it."""
    from kdistill.data.lm_text import IGNORE_INDEX
    from kdistill.lm.models import CausalLM
    from kdistill.losses.table import LM_DIVERGENCES
    from kdistill.optim import make_optimizer
    from kdistill.tasks.causal_lm import step_losses
    from kdistill.teachers import LiveLMTeacher

    spec, where = trained
    teacher_cfg = recipe.teacher
    reads_teacher = objective.needs_teacher
    live = reads_teacher and teacher_cfg.signal == "live"
    precision = (teacher_cfg.precision or "fp32") if teacher_cfg is not None else "fp32"
    n_train = len(data.train)
    steps_per_epoch = _steps_per_epoch(n_train, settings, name, "sequences")
    micro = settings.batch_size // settings.grad_accum
    order = _epoch_rows(n_train, seed)

    def build_model(model_spec: Any, model_where: str) -> CausalLM:
        return data.build_model(model_spec, model_where)

    stand_in = None
    if reads_teacher and not live:
        used = torch.cat(
            [_step_rows(order, i, settings.batch_size, steps_per_epoch) for i in range(steps + 1)]
        ).unique()
        divergence = objective.divergence
        temperature = divergence.temperature if divergence.temperature else 1.0
        stand_in = _TopKStandIn(
            used,
            data.seq_len,
            data.vocab_size,
            teacher_cfg.cache.top_k,
            float(getattr(temperature, "start", temperature)),
        )
    head: dict[str, int] = {}  # the student's output layer, noted by the first build

    def labels_of(rows: Tensor | slice) -> Tensor:
        """The training labels of `rows`: their own with prompt/completion pairs (-100 on
        the prompt and padding), else the packed sequences shifted by one."""
        return data.train[rows, 1:] if data.train_labels is None else data.train_labels[rows]

    def loss(micro_batch: int) -> LossMemory:
        tokens = int((labels_of(slice(0, micro_batch)) != IGNORE_INDEX).sum())
        if objective.divergence is None:
            kind, with_ce = "cross_entropy", False
        else:
            kind = LM_DIVERGENCES[objective.divergence.loss]
            with_ce = objective.ce_weight is not None and objective.at(0.0)[0] > 0
        return lm_loss_memory(
            kind=kind,
            tokens=tokens,
            hidden=head["hidden"],
            head_rows=head["rows"],
            vocab=data.vocab_size,
            bias=bool(head["bias"]),
            with_cross_entropy=with_ce,
            chunk_size=settings.chunk_size,
        )

    def build() -> _Session:
        torch.manual_seed(seed)
        model = build_model(spec, where).to(device)
        head.update(
            hidden=int(model.head_weight.shape[1]),
            rows=model.vocab_rows,
            bias=int(model.head_bias is not None),
        )
        signal: Any = None
        teachers: list[nn.Module] = []
        if live:
            teacher = LiveLMTeacher(
                build_model(teacher_cfg.model, "teacher.model"), precision=precision
            ).to(device)
            teachers = [teacher.model]
            signal = teacher
        elif reads_teacher:
            signal = stand_in
        optimizer = make_optimizer(model, settings.optimizer)

        def micro_step(rows: Tensor, scale: float, counter: SavedTensors | None = None) -> _Probe:
            inputs = data.train[rows, :-1].to(device)
            labels = labels_of(rows).to(device)
            with largest_layer(teachers) as layer:
                teacher_out = signal(inputs, rows) if signal is not None else None
            handed = _tensor_bytes(teacher_out, _weight_storages(teachers))
            with counter or contextlib.nullcontext(), _autocast(settings.precision, device):
                hidden = model(inputs)  # (b, T, H)
            if counter is not None:
                counter.add(hidden)
            total, _ = step_losses(
                hidden,
                model.head_weight,
                model.head_bias,
                labels,
                objective=objective,
                progress=0.0,
                teacher=teacher_out,
                vocab_size=data.vocab_size,
                chunk_size=settings.chunk_size,
            )
            if counter is None:
                (total * scale).backward()
                return _Probe(0, 0, handed, layer[0])
            with counter.gradients_during(model.parameters()):
                (total * scale).backward()
            return _Probe(
                counter.bytes,
                counter.backward_bytes,
                handed,
                layer[0],
                backward_bytes=counter.backward_with_gradients,
            )

        def step(i: int) -> None:
            model.train()
            rows = _step_rows(order, i, settings.batch_size, steps_per_epoch)
            counted = int((labels_of(rows) != IGNORE_INDEX).sum())
            for part in rows.chunk(settings.grad_accum):
                micro_step(part, 1.0 / max(counted, 1))
            if settings.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        def probe() -> _Probe:
            model.train()
            rows = _step_rows(order, 0, settings.batch_size, steps_per_epoch)[:micro]
            result = micro_step(rows, 1.0, SavedTensors([model, *teachers]))
            optimizer.zero_grad(set_to_none=True)
            return result

        return _Session(model, teachers, optimizer, step, probe)

    cache = lm_cache_size(recipe, data) if reads_teacher else None
    return _StageSpec(
        name=name,
        where=where,
        prefix=prefix,
        settings=settings,
        teacher=("teacher.model" if live else "cache") if reads_teacher else None,
        build=build,
        steps_per_epoch=steps_per_epoch,
        loss=loss,
        cache=cache,
        options={
            "task": "causal_lm",
            "teacher_precision": precision if live else None,
            "cache_possible": bool(
                live
                and (
                    getattr(recipe, "on_policy", None) is None or recipe.on_policy.probability == 0
                )
            ),
        },
    )


# ------------------------------------------------------------------------ advice


def advice(stage: StagePlan, spec: _StageSpec, parts: dict[str, int], budget: int) -> list[str]:
    """Recipe changes that bring the stage's estimated peak under `budget` bytes (or
    closest to it), each with its YAML path, the --set that does it and the new peak."""
    lines: list[str] = []
    settings, prefix = spec.settings, spec.prefix
    options = spec.options

    def peak(changed: dict[str, int], grad_accum: int | None = None) -> int:
        phases = estimate_phases({**parts, **changed}, grad_accum=grad_accum or stage.grad_accum)
        return max(phases.values())

    def fits(value: int) -> str:
        verdict = "fits" if value <= budget else "still over"
        return f"estimated peak {_size(value)} ({verdict})"

    # 1. smaller micro-batches: activations, teacher outputs and the loss scale with them
    batch = settings.batch_size
    per_sample = (
        "activations",
        "activations_backward",
        "teacher_output",
        "teacher_forward",
        "forward",
    )
    best = None
    for accum in range(stage.grad_accum + 1, batch + 1):
        if batch % accum:
            continue
        shrink = stage.grad_accum / accum
        changed = {key: int(parts[key] * shrink) for key in per_sample}
        if spec.loss is not None:
            changed["loss"] = spec.loss(batch // accum).chunked_bytes
        else:
            changed["loss"] = int(parts["loss"] * shrink)
        best = (accum, peak(changed, accum))
        if best[1] <= budget:
            break
    if best is not None:
        accum, value = best
        lines.append(
            f"raise {prefix}.grad_accum to {accum} (--set {prefix}.grad_accum={accum}): "
            f"micro-batches of {batch // accum} with the same optimizer step; or lower "
            f"{prefix}.batch_size (changes the optimization); {fits(value)}"
        )
    # 2. smaller loss chunks (language models)
    if stage.loss is not None and stage.loss.chunk_size > 1:
        chunk, candidate = stage.loss.chunk_size, None
        while chunk > 64:
            chunk //= 2
            candidate = (chunk, peak({"loss": _rechunk(stage.loss, chunk)}))
            if candidate[1] <= budget:
                break
        if candidate is not None:
            lines.append(
                f"set {prefix}.chunk_size to {candidate[0]} (--set {prefix}.chunk_size="
                f"{candidate[0]}): the loss holds {stage.loss.copies} float32 (chunk × "
                f"{stage.loss.vocab:,}) tensors at a time; {fits(candidate[1])}"
            )
    # 3. the frozen teacher in half precision
    if options.get("teacher_precision") == "fp32" and stage.teacher_bytes:
        value = peak({"weights": parts["weights"] - stage.teacher_bytes // 2})
        lines.append(
            f"set teacher.precision: bf16 (--set teacher.precision=bf16): the frozen teacher "
            f"in half the bytes ({_size(stage.teacher_bytes)} → "
            f"{_size(stage.teacher_bytes // 2)}); {fits(value)}"
        )
    # 4. no live teacher at all: read its outputs from a cache written once
    if options.get("cache_possible") and stage.teacher_bytes:
        value = peak(
            {
                "weights": parts["weights"] - stage.teacher_bytes,
                "teacher_forward": 0,
            }
        )
        disk = f"; the cache takes {_size(stage.cache.bytes)} of disk" if stage.cache else ""
        setting = (
            "teacher.signal: cache (--set teacher.signal=cache)"
            if options.get("task") == "causal_lm"
            else "teacher.cache: true (--set teacher.cache=true)"
        )
        lines.append(
            f"set {setting}: no teacher in memory while the student trains{disk}; {fits(value)}"
        )
    # 5. a lighter optimizer
    if stage.optimizer_states == 2:
        value = peak({"optimizer": parts["optimizer"] // 2})
        lines.append(
            f"use SGD with momentum (--set {prefix}.optimizer.name=sgd): 1 state per parameter "
            f"instead of 2, saving {_size(parts['optimizer'] // 2)}; {fits(value)} "
            "(a different optimizer: retune the learning rate)"
        )
    if all("still over" in line for line in lines):
        lines.append(
            "no single change fits: combine them (their savings add up, roughly), or use a "
            "smaller model or a device with more memory; weights and optimizer state alone "
            f"take {_size(parts['weights'] + parts['optimizer'])}"
        )
    return lines


def _rechunk(loss: LossMemory, chunk: int) -> int:
    """The chunked loss's bytes at another chunk size (the stored gradients do not change)."""
    transient = loss.copies * loss.chunk_size * loss.vocab * 4
    stored = loss.chunked_bytes - transient
    return loss.copies * min(chunk, loss.tokens) * loss.vocab * 4 + stored


# ------------------------------------------------------------------------ output


def _size(n: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"


def format_plan(result: Plan) -> str:
    """The plan as text, one block per stage."""
    lines = [
        f"plan for {result.recipe} ({result.task}) on {result.device}: "
        f"{_size(result.available_bytes)} available ({result.available_source})",
        f"data: {result.data}"
        + (f"; {_size(result.data_bytes)} in memory" if result.data_bytes else ""),
    ]
    if result.process_bytes:
        lines.append(
            f"this process before any model: {_size(result.process_bytes)} resident "
            "(Python and its libraries); counted with the data against the available memory"
        )
    lines += [f"note: {note}" for note in result.notes]
    for stage in result.stages:
        lines.append("")
        lines.append(
            f"{stage.stage}: trains {stage.model} ({stage.parameters:,} parameters), batch "
            f"{stage.batch_size} = {stage.grad_accum} × micro-batch {stage.micro_batch}"
        )
        rows = [
            ("parameters", stage.parameter_bytes, "trained, " + _dtypes_note(stage)),
        ]
        if stage.teacher is not None and stage.teacher != "cache":
            rows.append(
                (
                    "teacher",
                    stage.teacher_bytes,
                    f"{stage.teacher} frozen, {stage.teacher_parameters:,} parameters in "
                    f"{stage.teacher_dtype}",
                )
            )
        if stage.buffer_bytes:
            rows.append(("buffers", stage.buffer_bytes, "of the models"))
        rows += [
            ("gradients", stage.gradient_bytes, "one per trainable parameter"),
            (
                "optimizer state",
                stage.optimizer_bytes,
                f"{stage.optimizer}: {stage.optimizer_states} state(s) per parameter",
            ),
            (
                "activations",
                stage.activation_bytes,
                f"per micro-batch of {stage.micro_batch}, measured (saved for backward + output)",
            ),
        ]
        if stage.teacher is not None:
            rows.append(
                (
                    "teacher output",
                    stage.teacher_output_bytes,
                    "handed to the loss per micro-batch, measured",
                )
            )
        if stage.forward_bytes:
            rows.append(
                (
                    "forward",
                    stage.forward_bytes,
                    "transient: a layer's input + output that autograd does not save, "
                    "largest of the trained model's, measured",
                )
            )
        if stage.teacher_forward_bytes:
            rows.append(
                (
                    "teacher forward",
                    stage.teacher_forward_bytes,
                    "transient: its largest layer's input + output, measured",
                )
            )
        if stage.loss is not None:
            loss = stage.loss
            rows.append(
                (
                    "loss, chunked",
                    loss.chunked_bytes,
                    f"{loss.kind}: chunks of {loss.chunk_size:,} tokens ({stage.prefix}.chunk_size"
                    f" {stage.chunk_setting or 'default'}) of the micro-batch's {loss.tokens:,}",
                )
            )
            rows.append(
                (
                    "loss, naive",
                    loss.naive_bytes,
                    f"{loss.naive_bytes // max(loss.tokens * loss.vocab * 4, 1)} × "
                    f"({loss.tokens:,} tokens × {loss.vocab:,}) float32 "
                    "(not used; for comparison)",
                )
            )
        if stage.cache is not None:
            label = "cache on disk" if stage.cache.in_use else "cache if used"
            rows.append((label, stage.cache.bytes, f"{stage.cache.kind}: {stage.cache.detail}"))
        width = max(len(name) for name, _, _ in rows)
        lines += [f"  {name:<{width}}  {_size(size):>10}  {text}" for name, size, text in rows]
        timed = ", ".join(f"{s:.3f}" for s in stage.step_seconds_all)
        lines.append(
            f"  {'time per step':<{width}}  {stage.step_seconds:>8.3f} s  median of "
            f"{len(stage.step_seconds_all)} after 1 warm-up ({timed}); "
            f"{stage.epochs} epoch(s) × {stage.steps_per_epoch:,} steps ≈ "
            f"{format_duration(stage.stage_seconds)} of training steps"
        )
        verdict = "fits" if stage.fits else "DOES NOT FIT"
        lines.append(
            f"  {'estimated peak':<{width}}  {_size(stage.peak_bytes):>10}  in the "
            f"{stage.peak_phase} phase; {verdict} ({_size(stage.needed_bytes)} needed with "
            f"the process, {_size(result.available_bytes)} available)"
        )
        if stage.measured_peak_bytes is not None:
            ratio = stage.peak_bytes / max(stage.measured_peak_bytes, 1)
            lines.append(
                f"  {'measured peak':<{width}}  {_size(stage.measured_peak_bytes):>10}  "
                f"{result.measure_method}; estimate / measured = {ratio:.2f}"
            )
        lines += [f"  note: {note}" for note in stage.notes]
        if stage.advice:
            lines.append("  to fit, change one of:")
            lines += [f"    - {line}" for line in stage.advice]
    return "\n".join(lines)


def _dtypes_note(stage: StagePlan) -> str:
    return (
        "float32 master weights"
        if stage.parameter_bytes == 4 * stage.parameters
        else "mixed dtypes"
    )


__all__ = [
    "LOSS_COPIES",
    "OPTIMIZER_STATES",
    "CacheSize",
    "LossMemory",
    "Plan",
    "SavedTensors",
    "StagePlan",
    "available_memory",
    "estimate_phases",
    "format_plan",
    "lm_cache_size",
    "lm_loss_memory",
    "measure_peak",
    "plan",
    "profiled_peak",
]
