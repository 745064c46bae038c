"""A plan as text: one block per stage, a row per part of its memory."""

from __future__ import annotations

from kdistill.plan.results import Plan, StagePlan
from kdistill.report import format_duration


def format_size(n: float) -> str:
    """Bytes in the largest binary unit that keeps one digit before the point."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"


def format_plan(result: Plan) -> str:
    """The plan as text, one block per stage."""
    lines = [
        f"plan for {result.recipe} ({result.task}) on {result.device}: "
        f"{format_size(result.available_bytes)} available ({result.available_source})",
        f"data: {result.data}"
        + (f"; {format_size(result.data_bytes)} in memory" if result.data_bytes else ""),
    ]
    if result.process_bytes:
        lines.append(
            f"this process before any model: {format_size(result.process_bytes)} resident "
            "(Python and its libraries); counted with the data against the available memory"
        )
    lines += [f"note: {note}" for note in result.notes]
    for stage in result.stages:
        lines += ["", *_stage_block(stage, result)]
    return "\n".join(lines)


def _stage_block(stage: StagePlan, result: Plan) -> list[str]:
    """A stage's lines: its memory rows, step time, estimated (and measured) peak, notes
    and advice."""
    lines = [
        f"{stage.stage}: trains {stage.model} ({stage.parameters:,} parameters), batch "
        f"{stage.batch_size} = {stage.grad_accum} × micro-batch {stage.micro_batch}"
    ]
    rows = _memory_rows(stage)
    width = max(len(name) for name, _, _ in rows)
    lines += [f"  {name:<{width}}  {format_size(size):>10}  {text}" for name, size, text in rows]
    timed = ", ".join(f"{s:.3f}" for s in stage.step_seconds_all)
    lines.append(
        f"  {'time per step':<{width}}  {stage.step_seconds:>8.3f} s  median of "
        f"{len(stage.step_seconds_all)} after 1 warm-up ({timed}); "
        f"{stage.epochs} epoch(s) × {stage.steps_per_epoch:,} steps ≈ "
        f"{format_duration(stage.stage_seconds)} of training steps"
    )
    verdict = "fits" if stage.fits else "DOES NOT FIT"
    lines.append(
        f"  {'estimated peak':<{width}}  {format_size(stage.peak_bytes):>10}  in the "
        f"{stage.peak_phase} phase; {verdict} ({format_size(stage.needed_bytes)} needed with "
        f"the process, {format_size(result.available_bytes)} available)"
    )
    if stage.measured_peak_bytes is not None:
        ratio = stage.peak_bytes / max(stage.measured_peak_bytes, 1)
        lines.append(
            f"  {'measured peak':<{width}}  {format_size(stage.measured_peak_bytes):>10}  "
            f"{result.measure_method}; estimate / measured = {ratio:.2f}"
        )
    lines += [f"  note: {note}" for note in stage.notes]
    if stage.advice:
        lines.append("  to fit, change one of:")
        lines += [f"    - {line}" for line in stage.advice]
    return lines


def _memory_rows(stage: StagePlan) -> list[tuple[str, int, str]]:
    """(name, bytes, what) of each part of a stage's memory."""
    rows = [
        ("parameters", stage.parameter_bytes, "trained, " + _dtypes_note(stage)),
    ]
    if stage.teacher is not None and stage.teacher_parameters:  # a frozen model in memory
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
    return rows


def _dtypes_note(stage: StagePlan) -> str:
    return (
        "float32 master weights"
        if stage.parameter_bytes == 4 * stage.parameters
        else "mixed dtypes"
    )
