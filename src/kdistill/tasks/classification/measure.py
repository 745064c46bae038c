"""What a classification stage measures when it ends, and the commands that measure
saved weights (`kdistill eval`) or show a model's modules (`kdistill inspect`):
accuracy, NLL, ECE and agreement with the teacher on test (and validation), and the
cost per sample."""

from __future__ import annotations

from typing import TYPE_CHECKING

from kdistill.tasks.classification.models import make_model, sample_inputs, untrained_teacher_source

if TYPE_CHECKING:
    from kdistill.tasks.classification.pipeline import Context, Guide

import json
import time
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError
from torch import nn

import kdistill.evaluate
from kdistill import __version__
from kdistill.checkpoint import (
    atomic_write_json,
    load_weights,
)
from kdistill.compress import qat
from kdistill.compress.prune import resize_to
from kdistill.data import DataBundle, TextData
from kdistill.data import build as build_data
from kdistill.errors import CheckpointError, RecipeError
from kdistill.evaluate import cost, details, predict, quality
from kdistill.models.hf import HFClassifier, save_hf, weights_follow
from kdistill.recipe import DataConfig, ModelSpec, Recipe
from kdistill.recipe.classification import PRUNED_TEACHER, TEXT_SOURCES
from kdistill.stages import (
    finish_stage,
)
from kdistill.taps import module_tree
from kdistill.teachers import (
    combine_members,
)


def data_cost(
    data: DataBundle | TextData, model: nn.Module, device: str | torch.device
) -> dict[str, Any]:
    """evaluate.cost on this data's input: real token ids for text (the first test
    sentences), a random batch of the input shape otherwise; with the latency of one
    sample at a time over the first `TIMING.singles` of them."""
    single = kdistill.evaluate.TIMING.singles
    example = data.example_input(model)
    if example is not None:
        return cost(model, device=device, example_input=example, single=single)
    return cost(model, input_shape=data.input_shape, device=device, single=single)


def measure_stage(
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
                if split_name == "test":  # per class, confusion, reliability: the report's
                    out["test_details"] = details(logits, split.y)
        return out

    def main_only() -> dict[str, Any]:
        with qat.plain(model):  # a qat stage costs what its float model costs
            out = {"cost": data_cost(data, model, device)}
        if isinstance(data, TextData):
            out["texts_truncated"] = data.truncated(model)
        return out

    def save(folder: Path) -> None:
        if isinstance(model, HFClassifier):
            # a folder transformers loads as is, and a `location` for a later recipe: a
            # student built from this (fine-tuned) teacher's layers, or the teacher itself
            save_hf(model, folder / "hf", model.kdistill_tokenizer, overwrite=True)
        architecture, pruned = spec, spec.name == PRUNED_TEACHER
        if pruned:  # rebuilt as the teacher's architecture at the saved weights' shapes
            assert ctx.recipe.teacher is not None
            architecture = ctx.recipe.teacher.model
        atomic_write_json(
            folder / "model.json",
            {
                "model": architecture.model_dump(mode="json"),
                **({"pruned": spec.model_dump(mode="json")} if pruned else {}),
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

    after = None
    if stage == "teacher" and len(data.val):
        fit = teacher_fit(ctx, model)
        after = {"fit": fit}
        if fit["memorised"] and ctx.is_main:
            ctx.console.log(f"[yellow]{stage} seed {seed}: {fit_warning(fit)}")
    finish_stage(
        ctx, stage, seed, model,
        measure=measure, best_by=("val_accuracy", True), train_seconds=train_seconds,
        main_only=main_only, save=save, summary=summary, after=after,
    )  # fmt: skip


FIT_ROWS = 5000  # training rows the teacher's fit is measured on (a seeded sample)


def teacher_fit(ctx: Context, model: nn.Module) -> dict[str, Any]:
    """How much closer the teacher fits its training rows than validation: accuracy and
    the mean entropy (nats) of its targets at T = 1 and at the recipe's distillation
    temperature, on up to FIT_ROWS training rows (seeded sample) and on validation.
    A teacher that memorised its training set gives near one-hot targets there, which
    carry little of what distillation transfers: `memorised` when its training
    accuracy is 5 points or more above validation and its training targets' entropy
    (T = 1) is under half of validation's. A higher temperature narrows the entropy
    gap, which is why it is the first remedy."""
    data, device = ctx.data, ctx.accelerator.device
    temperature = next(
        (
            float(t.temperature)
            for t in ctx.recipe.objective
            if isinstance(t.temperature, (int, float))
        ),
        1.0,
    )
    out: dict[str, Any] = {"temperature": temperature, "train_rows": 0}
    for split_name in ("train", "val"):
        xs, to_input, order = data.eval_feed(model, split_name)
        labels = getattr(data, split_name).y
        if split_name == "train" and len(labels) > FIT_ROWS:
            rows = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
            rows = rows[:FIT_ROWS].sort().values
            xs, labels, order = xs[rows], labels[rows], None
        logits = predict(
            model, xs, to_input=to_input, batch_size=ctx.recipe.train.eval_batch_size,
            device=device, order=order,
        )  # fmt: skip
        out[f"{split_name}_accuracy"] = (logits.argmax(1) == labels).float().mean().item()
        out[f"{split_name}_entropy"] = mean_entropy(logits, 1.0)
        out[f"{split_name}_entropy_t"] = mean_entropy(logits, temperature)
        if split_name == "train":
            out["train_rows"] = len(labels)
    out["memorised"] = bool(
        out["train_accuracy"] - out["val_accuracy"] >= 0.05
        and out["train_entropy"] < 0.5 * out["val_entropy"]
    )
    return out


def mean_entropy(logits: torch.Tensor, temperature: float) -> float:
    """Mean entropy in nats of softmax(logits / temperature) over the rows."""
    log_p = torch.log_softmax(logits.double() / temperature, dim=1)
    return float(-(log_p.exp() * log_p).sum(1).mean())


def fit_warning(fit: dict[str, Any]) -> str:
    """What a memorised teacher means for distillation, and what to try."""
    return (
        f"the teacher fits its training rows far closer than validation (accuracy "
        f"{fit['train_accuracy']:.1%} vs {fit['val_accuracy']:.1%}; mean entropy of its "
        f"targets at T = {fit['temperature']:g}: {fit['train_entropy_t']:.3f} vs "
        f"{fit['val_entropy_t']:.3f} nats), so its soft targets on the rows the student "
        "trains on are close to one-hot and carry little that labels do not; distillation "
        "may not beat the student alone. Try a higher temperature or a lower weight on "
        "the distillation terms, a transfer set or augmentation for the distill stage "
        "(the teacher then labels rows it did not memorise), or a teacher trained with "
        "more regularisation (weight decay, dropout, fewer epochs); `kdistill tune` "
        "searches the temperature and the weights by default"
    )


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
    if weights.suffix == ".onnx":
        from kdistill.tasks.classification.export import evaluate_onnx

        return evaluate_onnx(weights, data_dir=data_dir)
    net, bundle = load_saved_model(weights, data=data, model=model, data_dir=data_dir)
    start = time.perf_counter()
    xs, to_input, order = bundle.eval_feed(net, "test")
    logits = predict(net, xs, to_input=to_input, batch_size=256, device="cpu", order=order)
    return {
        "checkpoint": str(weights),
        "test": quality(logits, bundle.test.y),
        "cost": data_cost(bundle, net, "cpu"),
        "seconds": round(time.perf_counter() - start, 3),
    }


def load_saved_model(
    weights: Path,
    *,
    data: str | None = None,
    model: str | None = None,
    data_dir: str | Path | None = None,
    datasets: dict[str, DataBundle | TextData] | None = None,
) -> tuple[nn.Module, DataBundle | TextData]:
    """A stage's saved classifier, rebuilt from the model.json beside its weights (or
    `model`), and the data it was trained on (or `data`, "SOURCE[:PATH]"). `datasets`
    keeps the data built by earlier calls, by data section, so a teacher and its
    student read the same data once."""
    info_path = weights.with_name("model.json")
    info = json.loads(info_path.read_text()) if info_path.exists() else None
    data_cfg = _data_option(data)
    model_spec = ModelSpec(name=model) if model else None
    if model_spec is None and info is None:
        raise CheckpointError(
            f"{weights} has no model.json beside it, so its architecture is unknown; pass --model NAME"
        )
    spec = model_spec or ModelSpec.model_validate(info["model"])  # type: ignore[index]
    data_cfg = data_cfg or (recorded_data(info["data"]) if info else None)
    if data_cfg is None:
        raise CheckpointError("say which data to evaluate on: --data SOURCE[:PATH]")
    key = data_cfg.model_dump_json()
    datasets = {} if datasets is None else datasets
    if key not in datasets:
        datasets[key] = build_data(data_cfg, data_dir)
    bundle = datasets[key]
    exported = weights.parent / "hf"
    if model_spec is None and spec.name in ("hf", "hf_student") and exported.is_dir():
        # the stage's save_pretrained folder: it needs neither the source model nor, for
        # a student built with `location: teacher`, the teacher
        spec = ModelSpec(name="hf", args={"location": str(exported)})
    with weights_follow():
        net = make_model(bundle, spec, where="model")
    if model_spec is None and info is not None and info.get("pruned") and spec.name != "hf":
        resize_to(net, weights)  # the unpruned architecture, cut to the saved shapes
    load_weights(net, weights)
    return net.eval(), bundle


def recorded_data(recorded: dict[str, Any]) -> DataConfig:
    """The data section model.json records. Runs of earlier versions recorded the
    default text section for every source; the schema refuses one for a source that
    does not read text, so it is left out for those."""
    if recorded["source"] not in TEXT_SOURCES:
        recorded = {key: value for key, value in recorded.items() if key != "text"}
    return DataConfig.model_validate(recorded)


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
    source = untrained_teacher_source(recipe, data, where)  # pruned_teacher: cut from one
    model = make_model(data, spec, where=where, teacher=source).eval()
    header = f"{spec.name}: input {tuple(data.input_shape)}, {data.num_classes} classes"
    return header + "\n" + module_tree(model, data.to_input(data.train.x[:2]), max_depth=depth)
