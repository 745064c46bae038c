"""What a plan reports: the result records, and the constants the estimate rests on.

`LOSS_COPIES` (how many float32 (tokens × vocabulary) tensors a language-model loss
holds at its peak) and `OPTIMIZER_STATES` (states per parameter) turn measured shapes
into bytes; `Plan` and its `StagePlan`s are what `kdistill plan --json` prints.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

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


@dataclass
class LossMemory:
    """A language-model loss's memory for one micro-batch."""

    kind: str  # "cross_entropy" or a divergence of kdistill.losses.lm_chunked
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
