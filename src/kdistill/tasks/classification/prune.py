"""`student.model: {name: pruned_teacher, args: ...}`: the run's teacher, pruned, as
the student ("prune the teacher, then distill from the unpruned teacher", as Minitron
does for language models).

Image and table models lose a fraction of every layer's channels
(`kdistill.compress.prune`, torch-pruning's dependency graph); Hugging Face encoders
lose feed-forward neurons (`ffn`) and layers (`layers`) through `hf_student`
(`kdistill.models.prune_hf`). Calibration rows are drawn from the labelled training
data with a fixed generator, so one teacher and one data set give one pruned student:
baseline and distill start from the same weights, and the `prune` stage measures them
before any training. `init: random` gives the same shape from scratch instead.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from kdistill.compress.prune import PruneArgs, calibration_rows, prune_channels, reinitialise
from kdistill.data import DataBundle, TextData
from kdistill.errors import ModelError
from kdistill.recipe import TEACHER_LOCATION, ModelSpec

PRUNED_TEACHER = "pruned_teacher"
CALIBRATION_BATCH = 64


def build_pruned(
    data: DataBundle | TextData, spec: ModelSpec, *, where: str, teacher: nn.Module | None
) -> nn.Module:
    """The teacher, pruned as `spec.args` say, for this data."""
    settings = PruneArgs.of(dict(spec.args), f"{where}.args")
    if teacher is None:
        raise ModelError(
            f"{where}.name: pruned_teacher prunes the recipe's teacher, and there is none for "
            "this stage; add a teacher section with the teacher stage or teacher.checkpoint"
        )
    if isinstance(data, TextData):
        return _pruned_encoder(data, settings, where=where, teacher=teacher)
    for name in ("ffn", "layers"):
        if getattr(settings, name) is not None:
            raise ModelError(
                f"{where}.args.{name}: prunes a Hugging Face encoder; this teacher is a "
                f"{type(teacher).__name__}: prune its channels (channels: fraction) instead"
            )
    assert settings.channels is not None  # PruneArgs asks for one of the three
    pruned, notes = prune_step(data, teacher, settings, settings.channels, where=where)
    if settings.init == "random":
        reinitialise(pruned)
        notes.append("pruned shape re-initialised at random (init: random)")
    pruned.load_notes = tuple(notes)  # type: ignore[assignment]  # nn.Module stores any value
    return pruned


def prune_step(
    data: DataBundle, model: nn.Module, settings: PruneArgs, ratio: float, *, where: str
) -> tuple[nn.Module, list[str]]:
    """`model` with the fraction `ratio` of its channels removed, ranked on the fixed
    calibration rows, and a note of what was done."""
    rows = calibration_rows(data.train.y, settings.samples)
    device = next(model.parameters()).device  # a teacher trained in this run may be on GPU
    batches = [
        (data.to_input(data.train.x[chunk]).to(device), data.train.y[chunk].to(device))
        for chunk in rows.split(CALIBRATION_BATCH)
    ]
    pruned, report = prune_channels(
        model,
        batches,
        ratio=ratio,
        example_input=data.to_input(data.train.x[:2]).to(device),
        importance=settings.importance,
        where=f"{where}.args.channels",
    )
    (before, after) = report["params"]
    return pruned, [
        f"channels pruned by {ratio:.3g} per layer ({settings.importance} importance "
        f"on {len(rows)} training rows): {before:,} -> {after:,} parameters"
    ]


def _pruned_encoder(
    data: TextData, settings: PruneArgs, *, where: str, teacher: nn.Module
) -> nn.Module:
    """An `hf_student` cut from the teacher: its layers (`layers`), feed-forward neurons
    pruned (`ffn`), or fresh weights of that shape (`init: random`)."""
    from kdistill.models.text_build import build_text_model

    if settings.channels is not None:
        raise ModelError(
            f"{where}.args.channels: prunes convolutions and linear layers of image and table "
            "models; for a transformer encoder prune ffn (feed-forward neurons) and layers"
        )
    args: dict[str, Any] = {"location": TEACHER_LOCATION}
    if settings.layers is not None:
        args["layers"] = list(settings.layers)
        args["num_layers"] = len(settings.layers)
    if settings.ffn is not None:
        args["prune"] = {"ffn": settings.ffn, "samples": settings.samples}
    if settings.init == "random":
        args["init"] = "random"
    return build_text_model(
        ModelSpec(name="hf_student", args=args), data, where=where, teacher=teacher
    )
