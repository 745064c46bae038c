"""The estimate: a step's peak from its measured parts, and what to change when it does
not fit.

`estimate_phases` adds the parts (weights, optimizer state, gradients, activations,
teacher output, the loss, ...) into the four phases of an optimizer step (the package
docstring); `advice` recomputes them with one recipe setting changed at a time.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from kdistill.plan.report import format_size
from kdistill.plan.results import LossMemory, StagePlan

if TYPE_CHECKING:
    from kdistill.plan.stage import StageSpec


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


def advice(stage: StagePlan, spec: StageSpec, parts: dict[str, int], budget: int) -> list[str]:
    """Recipe changes that bring the stage's estimated peak under `budget` bytes (or
    closest to it), each with its YAML path, the --set that does it and the new peak."""
    lines: list[str] = []
    settings, prefix = spec.settings, spec.prefix
    options = spec.options

    def peak(changed: dict[str, int]) -> int:
        return _peak(parts, changed, stage.grad_accum)

    def fits(value: int) -> str:
        verdict = "fits" if value <= budget else "still over"
        return f"estimated peak {format_size(value)} ({verdict})"

    # 1. smaller micro-batches: activations, teacher outputs and the loss scale with them
    batch = settings.batch_size
    best = _smaller_micro_batches(stage, spec, parts, budget)
    if best is not None:
        accum, value = best
        lines.append(
            f"raise {prefix}.grad_accum to {accum} (--set {prefix}.grad_accum={accum}): "
            f"micro-batches of {batch // accum} with the same optimizer step; or lower "
            f"{prefix}.batch_size (changes the optimization); {fits(value)}"
        )
    # 2. smaller loss chunks (language models)
    if stage.loss is not None and stage.loss.chunk_size > 1:
        candidate = _smaller_chunks(stage.loss, parts, stage.grad_accum, budget)
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
            f"in half the bytes ({format_size(stage.teacher_bytes)} → "
            f"{format_size(stage.teacher_bytes // 2)}); {fits(value)}"
        )
    # 4. no live teacher at all: read its outputs from a cache written once
    setting = options.get("cache_setting")
    if setting and stage.teacher_bytes:
        value = peak(
            {
                "weights": parts["weights"] - stage.teacher_bytes,
                "teacher_forward": 0,
            }
        )
        disk = f"; the cache takes {format_size(stage.cache.bytes)} of disk" if stage.cache else ""
        lines.append(
            f"set {setting}: no teacher in memory while the student trains{disk}; {fits(value)}"
        )
    # 5. a lighter optimizer
    if stage.optimizer_states == 2:
        value = peak({"optimizer": parts["optimizer"] // 2})
        lines.append(
            f"use SGD with momentum (--set {prefix}.optimizer.name=sgd): 1 state per parameter "
            f"instead of 2, saving {format_size(parts['optimizer'] // 2)}; {fits(value)} "
            "(a different optimizer: retune the learning rate)"
        )
    if all("still over" in line for line in lines):
        lines.append(
            "no single change fits: combine them (their savings add up, roughly), or use a "
            "smaller model or a device with more memory; weights and optimizer state alone "
            f"take {format_size(parts['weights'] + parts['optimizer'])}"
        )
    return lines


def _peak(parts: dict[str, int], changed: dict[str, int], grad_accum: int) -> int:
    return max(estimate_phases({**parts, **changed}, grad_accum=grad_accum).values())


def _smaller_micro_batches(
    stage: StagePlan, spec: StageSpec, parts: dict[str, int], budget: int
) -> tuple[int, int] | None:
    """(grad_accum, estimated peak): the first larger grad_accum dividing the batch whose
    peak fits the budget, else the largest; None when the batch cannot be split further."""
    batch = spec.settings.batch_size
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
        best = (accum, _peak(parts, changed, accum))
        if best[1] <= budget:
            break
    return best


def _smaller_chunks(
    loss: LossMemory, parts: dict[str, int], grad_accum: int, budget: int
) -> tuple[int, int] | None:
    """(chunk_size, estimated peak): the first halved chunk size whose peak fits the
    budget, else the smallest tried (down to 64 tokens)."""
    chunk, candidate = loss.chunk_size, None
    while chunk > 64:
        chunk //= 2
        candidate = (chunk, _peak(parts, {"loss": _rechunk(loss, chunk)}, grad_accum))
        if candidate[1] <= budget:
            break
    return candidate


def _rechunk(loss: LossMemory, chunk: int) -> int:
    """The chunked loss's bytes at another chunk size (the stored gradients do not change)."""
    transient = loss.copies * loss.chunk_size * loss.vocab * 4
    stored = loss.chunked_bytes - transient
    return loss.copies * min(chunk, loss.tokens) * loss.vocab * 4 + stored
