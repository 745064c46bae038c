"""Token classification end to end: the stages (teacher, baseline, distill), the
teacher's word logits (one pass, kept on disk for every seed), what a stage measures,
and the other commands' entry points (eval, inspect, cache, validate's checks).

Run folder, as for classification:
    recipe.yaml  run.json  results.json  results.md
    teacher/seed0/  baseline/seed<k>/  distill/seed<k>/   each with
        model.safetensors  model.json  eval.json  metrics.jsonl  best.safetensors
        hf/ (Hugging Face models: a save_pretrained folder with the tokenizer)
        vocab.txt (the BiLSTM's words)
    cache/teacher-seed<k>/  the teacher's word logits of the training sentences
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from kdistill import __version__
from kdistill.checkpoint import atomic_write_json, file_sha256, load_weights
from kdistill.errors import CacheError, CheckpointError
from kdistill.evaluate import cost
from kdistill.losses.objective import Objective, reads_teacher
from kdistill.models.hf import HFClassifier, save_hf, weights_follow
from kdistill.recipe import LossTerm, ModelSpec
from kdistill.recipe.token_classification import TaggingRecipe
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
from kdistill.tasks.token_classification.data import TaggedSentences, WordVocab, load_tagging
from kdistill.tasks.token_classification.models import BiLSTMTagger, carry, make_tagger
from kdistill.tasks.token_classification.report import write_report
from kdistill.tasks.token_classification.steps import (
    TaggerSteps,
    entity_scores,
    predict_words,
    require_seqeval,
)

SINGLE_SAMPLES = 64


@dataclass
class Context(RunContext):
    recipe: TaggingRecipe
    data: TaggedSentences
    teachers: dict[int, nn.Module] = field(default_factory=dict)
    teacher_test: dict[int, list[torch.Tensor]] = field(default_factory=dict)


@dataclass
class Guide:
    """The teacher of a stage: its model and where its weights live."""

    model: nn.Module
    seed: int
    weights: Path


def run(recipe: TaggingRecipe, options: RunOptions) -> dict[str, Any]:
    """Run the recipe's stages and return the results (the content of results.json)."""
    with open_run(recipe, options, setup=lambda: load_tagging(recipe.data, options.data_dir)) as (
        run,
        data,
    ):
        assert data is not None
        ctx = Context(**run.shared(), data=data)
        log_start(
            ctx,
            f"data: {len(data.train)} train, {len(data.val)} val, {len(data.test)} test "
            f"sentences, {data.num_labels} labels ({', '.join(data.entity_types)})",
        )
        _check_models(ctx)
        teacher_seeds = (
            recipe.seeds[:1]
            if recipe.teacher is not None
            and ({"teacher", "distill"} & set(recipe.stages) or recipe.student_from_teacher)
            else []
        )
        run_stages(ctx, STAGES, teacher_seeds=teacher_seeds)
        return finish_run(ctx, write_report)


def _check_models(ctx: Context) -> None:
    """Build the teacher and the student once before anything trains, so a bad model
    section fails now and not after the teacher has trained."""
    recipe = ctx.recipe
    require_seqeval()
    with torch.random.fork_rng(devices=[]), weights_follow():
        torch.manual_seed(0)
        teacher = None
        if recipe.teacher is not None:
            teacher = make_tagger(ctx.data, recipe.teacher.model, where="teacher.model")
        if recipe.student is not None and {"baseline", "distill"} & set(recipe.stages):
            make_tagger(ctx.data, recipe.student.model, where="student.model", teacher=teacher)


def _teacher_stage(ctx: Context, stage: str, seed: int, guide: None) -> Guide:
    recipe = ctx.recipe
    assert recipe.teacher is not None
    folder = stage_dir(ctx.run_dir, stage, seed)
    checkpoint = resolve_weights(recipe.teacher.checkpoint) if recipe.teacher.checkpoint else None
    trained = finished(folder)
    torch.manual_seed(seed)
    with weights_follow() if checkpoint is not None or trained else contextlib.nullcontext():
        model = make_tagger(ctx.data, recipe.teacher.model, where="teacher.model")
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
        objective = Objective([LossTerm(loss="cross_entropy")])
        model = _train_and_finish(
            ctx, stage, seed, model, recipe.teacher.model, objective, None,
            settings=recipe.teacher_train(), guide=None,
        )  # fmt: skip
        weights = folder / "model.safetensors"
    ctx.teachers[seed] = model
    return Guide(model, seed, weights)


def _student_stage(ctx: Context, stage: str, seed: int, guide: Guide | None) -> Guide | None:
    recipe = ctx.recipe
    assert recipe.student is not None
    spec = recipe.student.model
    torch.manual_seed(seed)  # baseline and distill start from the same weights for a seed
    teacher = guide.model if guide is not None else None
    model = make_tagger(ctx.data, spec, where="student.model", teacher=teacher)
    if finished_earlier(ctx, stage, seed):
        return guide
    if stage == "baseline":
        own = [
            t.model_copy(update={"weight": 1.0}) for t in recipe.objective if not reads_teacher(t)
        ]
        objective = Objective(own or [LossTerm(loss="cross_entropy")])
        teacher_words = None
    else:
        assert guide is not None
        objective = Objective(recipe.objective)
        teacher_words = _teacher_words(ctx, guide) if objective.needs_teacher else None
    _train_and_finish(
        ctx, stage, seed, model, spec, objective, teacher_words,
        settings=recipe.train, guide=guide,
    )  # fmt: skip
    return guide


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
    teacher_words: list[torch.Tensor] | None,
    *,
    settings: Any,
    guide: Guide | None,
) -> nn.Module:
    steps = TaggerSteps(
        model,
        data=ctx.data,
        objective=objective,
        teacher_words=teacher_words,
        settings=settings,
        accelerator=ctx.accelerator,
        label=label(stage, seed),
    )
    result = train_stage(ctx, stage, seed, model, steps, settings=settings)
    model = ctx.accelerator.unwrap_model(model)
    _measure_stage(ctx, stage, seed, model, spec, guide, train_seconds=result.seconds)
    ctx.accelerator.free_memory()
    return model


# ------------------------------------------------------------------ teacher signal


def cache_key(data: TaggedSentences, teacher_sha256: str) -> str:
    """What the cached word logits depend on: the teacher's weights, its tokenization
    (max_length) and the training sentences."""
    digest = hashlib.sha256()
    digest.update(teacher_sha256.encode())
    digest.update(str(data.max_length).encode())
    for words in data.train.words:
        digest.update(("\x1f".join(words) + "\x1e").encode())
    return digest.hexdigest()


def _teacher_words(ctx: Context, guide: Guide) -> list[torch.Tensor]:
    """The teacher's word logits of every training sentence: from the cache when its
    key matches, else one pass (written to the cache when teacher.cache is on)."""
    recipe = ctx.recipe
    assert recipe.teacher is not None
    folder = ctx.run_dir / "cache" / f"teacher-seed{guide.seed}"
    device = ctx.accelerator.device
    key = cache_key(ctx.data, file_sha256(guide.weights))
    if recipe.teacher.cache and (folder / "manifest.json").is_file():
        words = read_word_cache(folder, key)
        ctx.console.log(
            f"teacher word logits: cache hit, {len(words)} sentences read from {folder} "
            "(teacher weights and data match; no teacher pass)"
        )
        return words
    start = time.perf_counter()
    teacher = copy.deepcopy(guide.model).to(device)
    precision = recipe.teacher.precision
    if precision in ("bf16", "fp16"):
        teacher = teacher.to(torch.bfloat16 if precision == "bf16" else torch.float16)
    words = predict_words(
        teacher, ctx.data, "train", batch_size=recipe.train.eval_batch_size, device=device,
        missing="nan",
    )  # fmt: skip
    seconds = time.perf_counter() - start
    if recipe.teacher.cache and ctx.is_main:
        write_word_cache(folder, words, key, seconds=seconds)
        ctx.console.log(f"teacher word logits cached in {folder} ({seconds:.1f}s)")
    ctx.accelerator.wait_for_everyone()
    return words


def write_word_cache(folder: Path, words: list[torch.Tensor], key: str, *, seconds: float) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    lengths = torch.tensor([len(w) for w in words], dtype=torch.int64)
    save_file(
        {"logits": torch.cat(words).contiguous(), "lengths": lengths},
        str(folder / "word_logits.safetensors"),
    )
    atomic_write_json(
        folder / "manifest.json",
        {"key": key, "sentences": len(words), "words": int(lengths.sum()),
         "seconds": round(seconds, 3), "kdistill": __version__},
    )  # fmt: skip


def read_word_cache(folder: Path, key: str) -> list[torch.Tensor]:
    manifest = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
    if manifest.get("key") != key:
        raise CacheError(
            f"the teacher cache in {folder} was written for other teacher weights or other "
            "training sentences (its key differs); delete the folder to write it again, or "
            "set teacher.cache: false"
        )
    tensors = load_file(str(folder / "word_logits.safetensors"))
    return list(torch.split(tensors["logits"], tensors["lengths"].tolist()))


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
    data, device = ctx.data, ctx.accelerator.device
    batch = ctx.recipe.train.eval_batch_size
    reference = None
    if guide is not None:
        if guide.seed not in ctx.teacher_test:
            ctx.teacher_test[guide.seed] = predict_words(
                guide.model, data, "test", batch_size=batch, device=device
            )
        reference = ctx.teacher_test[guide.seed]

    def measure(weights: nn.Module) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for split, teacher in (("test", reference), ("val", None)):
            if len(data.split(split)):
                logits = predict_words(weights, data, split, batch_size=batch, device=device)
                out[split] = entity_scores(data, split, logits, teacher)
        return out

    def main_only() -> dict[str, Any]:
        return {
            "cost": tagging_cost(data, model, device),
            "words_dropped": {s: data.encode(model, s).dropped() for s in ("train", "val", "test")},
        }

    def save(folder: Path) -> None:
        save_tagger(model, folder, spec, ctx.recipe)

    def summary(evaluation: dict[str, Any]) -> str:
        test = evaluation.get("test", {})
        return f"test entity F1 {100 * test.get('f1', float('nan')):.2f}"

    finish_stage(
        ctx, stage, seed, model,
        measure=measure, best_by=("val_f1", True), train_seconds=train_seconds,
        main_only=main_only, save=save, summary=summary,
    )  # fmt: skip


def tagging_cost(data: TaggedSentences, model: nn.Module, device: Any) -> dict[str, Any]:
    """evaluate.cost on the first test sentences (all of them padded to one batch, and
    one at a time for the latency per sentence)."""
    split = "test" if len(data.test) else "train"
    rows = torch.arange(min(SINGLE_SAMPLES, len(data.split(split))))
    batch = data.batch(model, split, rows)
    example = {k: v.to(device) for k, v in batch.items() if k != "first"}
    return cost(model, device=device, example_input=example, single=SINGLE_SAMPLES)


def save_tagger(model: nn.Module, folder: Path, spec: ModelSpec, recipe: TaggingRecipe) -> None:
    """model.json (what rebuilds the model: its spec, labels, data section), and the
    tokenizer: a save_pretrained folder for Hugging Face models, vocab.txt for the BiLSTM."""
    data_section = recipe.data.model_dump(mode="json")
    if isinstance(model, HFClassifier):
        save_hf(model, folder / "hf", model.kdistill_tokenizer, overwrite=True)
        spec = ModelSpec(name="hf", args={"location": "hf"})
    elif isinstance(model, BiLSTMTagger):
        vocab: WordVocab = getattr(model, "kdistill_tokenizer")  # noqa: B009
        (folder / "vocab.txt").write_text("\n".join(vocab.tokens) + "\n", encoding="utf-8")
    atomic_write_json(
        folder / "model.json",
        {
            "task": "token_classification",
            "model": spec.model_dump(mode="json"),
            "labels": list(model_labels(model)),
            "data": data_section,
            "kdistill": __version__,
        },
    )


def model_labels(model: nn.Module) -> list[str]:
    config = getattr(getattr(model, "hf", None), "config", None)
    if config is not None:
        return [str(config.id2label[i]) for i in range(config.num_labels)]
    return list(getattr(model, "label_names", []))


def load_tagger(weights: Path, data: TaggedSentences) -> nn.Module:
    """A stage's saved model, rebuilt from the model.json (and hf/ or vocab.txt) beside
    its weights."""
    info_path = weights.with_name("model.json")
    if not info_path.is_file():
        raise CheckpointError(
            f"{weights} has no model.json beside it, so its architecture is unknown; "
            "evaluate a stage folder of a token-classification run"
        )
    info = json.loads(info_path.read_text(encoding="utf-8"))
    if info.get("labels") and info["labels"] != data.label_names:
        raise CheckpointError(
            f"{weights} predicts {', '.join(info['labels'])}, but the data's labels are "
            f"{', '.join(data.label_names)}"
        )
    spec = ModelSpec.model_validate(info["model"])
    if spec.name == "hf":
        spec = ModelSpec(name="hf", args={"location": str(weights.parent / "hf")})
    with weights_follow():
        model = make_tagger(data, spec, where="model")
    if isinstance(model, BiLSTMTagger):
        tokens = (weights.parent / "vocab.txt").read_text(encoding="utf-8").splitlines()
        vocab = WordVocab(tokens)
        model = carry(
            BiLSTMTagger(len(vocab), data.num_labels, **_bilstm_args(spec)), vocab, vocab.key
        )
        setattr(model, "label_names", list(data.label_names))  # noqa: B010
    load_weights(model, weights)
    return model.eval()


def _bilstm_args(spec: ModelSpec) -> dict[str, Any]:
    return {k: v for k, v in spec.args.items() if k not in ("vocab_min_freq", "vocab_size")}


# ------------------------------------------------------------------ other commands


def evaluate_checkpoint(
    weights: Path,
    *,
    data: str | None = None,
    model: str | None = None,
    data_dir: str | Path | None = None,
) -> dict[str, Any]:
    """`kdistill eval` of a token-classification stage: entity F1 on the test split of
    the data it was trained on (model.json), and its cost."""
    from kdistill.errors import RecipeError
    from kdistill.recipe.token_classification import TaggingDataConfig

    if data is not None or model is not None:
        raise RecipeError(
            "kdistill eval of a token-classification stage reads its data and model from "
            "the model.json beside the weights; --data and --model do not apply"
        )
    info = json.loads(weights.with_name("model.json").read_text(encoding="utf-8"))
    section = TaggingDataConfig.model_validate(info["data"])
    tagged = load_tagging(section, data_dir)
    net = load_tagger(weights, tagged)
    start = time.perf_counter()
    logits = predict_words(net, tagged, "test", batch_size=256, device="cpu")
    return {
        "checkpoint": str(weights),
        "test": entity_scores(tagged, "test", logits),
        "cost": tagging_cost(tagged, net, "cpu"),
        "seconds": round(time.perf_counter() - start, 3),
    }


def inspect_recipe(
    recipe: TaggingRecipe, role: str, *, depth: int | None, data_dir: str | Path | None
) -> str:
    """The modules of the recipe's teacher or student, with output shapes on a batch."""
    from kdistill.taps import module_tree

    data = load_tagging(recipe.data.model_copy(update={"limit_test": 8}), data_dir)
    spec = getattr(recipe, role).model
    teacher = None
    if role == "student" and recipe.student_from_teacher:
        assert recipe.teacher is not None
        with weights_follow():
            teacher = make_tagger(data, recipe.teacher.model, where="teacher.model")
    model = make_tagger(data, spec, where=f"{role}.model", teacher=teacher).eval()
    batch = data.batch(model, "test", torch.arange(min(8, len(data.test))))
    sample = {k: v for k, v in batch.items() if k != "first"}
    header = f"{spec.name}: {data.num_labels} labels per word, a batch of 8 test sentences"
    return header + "\n" + module_tree(model, sample, max_depth=depth)


def cache_teacher(
    recipe: TaggingRecipe,
    *,
    output_dir: str | Path | None = None,
    data_dir: str | Path | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """`kdistill cache`: the trained teacher's word logits of the training sentences,
    written once into <run>/cache/teacher-seed<k> (verified when already there)."""
    teacher = require_teacher(recipe)
    run_dir = run_dir_of(recipe, output_dir)
    seed = recipe.seeds[0]
    data = load_tagging(recipe.data, data_dir)
    weights = (
        resolve_weights(teacher.checkpoint)
        if teacher.checkpoint
        else trained_teacher(run_dir, seed)
    )
    with weights_follow():
        model = make_tagger(data, teacher.model, where="teacher.model")
    load_weights(model, weights)
    folder = run_dir / "cache" / f"teacher-seed{seed}"
    key = cache_key(data, file_sha256(weights))
    if (folder / "manifest.json").is_file() and not overwrite:
        words = read_word_cache(folder, key)
        return {"folder": str(folder), "reused": True, "sentences": len(words)}
    start = time.perf_counter()
    words = predict_words(model, data, "train", batch_size=256, device="cpu", missing="nan")
    write_word_cache(folder, words, key, seconds=time.perf_counter() - start)
    return {"folder": str(folder), "reused": False, "sentences": len(words)}


def check_recipe(recipe: TaggingRecipe, data_dir: str | Path | None = None) -> list[str]:
    """What `validate` finds beyond the schema: the data files (read and checked) and
    the teacher checkpoint."""
    from kdistill.errors import KdistillError
    from kdistill.preflight import Problems, weights_problem

    problems = Problems()
    try:
        require_seqeval()
    except KdistillError as exc:
        problems.add(str(exc))
    try:
        load_tagging(recipe.data, data_dir)
    except KdistillError as exc:
        problems.add(f"data: {exc}")
    if recipe.teacher is not None:
        problems.add(weights_problem("teacher.checkpoint", recipe.teacher.checkpoint))
    return problems.lines
