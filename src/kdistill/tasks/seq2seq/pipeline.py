"""Stages of a translation run: teacher, baseline, distill, seqkd, seqkd_distill; the
teacher's translations; `kdistill validate` and `cache` for `task: seq2seq` (eval and
inspect: `measure.py`; export: `export.py`).

    teacher        trained with cross-entropy on the references (or loaded and measured)
    baseline       the student alone, on the references
    distill        word-level KD: the recipe's objective, the live teacher reading the
                   same source and target prefix at every target position
    seqkd          sequence-level KD (Kim & Rush 2016): the student on the teacher's beam
                   translations of the training sources (cross-entropy)
    seqkd_distill  both: the teacher's translations as targets and word-level KD

The teacher's translations are written once per teacher and decoding settings
(seqkd/translations/: translations.jsonl, manifest.json with the teacher's and the
tokenizer's fingerprints, the settings and a digest of the sources), reused by every
seed and both seqkd stages, continued after an interruption, refused when stale.

Run folder (as every task's, plus the tokenizer):
    tokenizer/                      trained on the training pairs (or the one loaded)
    <stage>/seed<k>/                model.safetensors  model.json  eval.json  metrics.jsonl
                                    best.safetensors  hf/ (save_pretrained + tokenizer)
                                    test.greedy.txt  test.beam.txt (the translations scored)
eval.json: `test` BLEU and chrF, greedy and beam (bleu, chrf, bleu_beam, chrf_beam),
decoding speed (tokens_per_second, ..._beam), how many translations ended on their own;
`val` the greedy BLEU and loss per token; `best` the same for the best-on-validation
epoch; `cost` parameters, size, FLOPs of one teacher-forced forward pass per pair;
`samples` a few test translations beside their source and reference.
"""

from __future__ import annotations

import copy
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from kdistill import __version__
from kdistill.cache.topk import open_topk_cache
from kdistill.checkpoint import atomic_write_json, atomic_write_text, load_weights
from kdistill.errors import (
    CacheError,
    CheckpointError,
    DataError,
    KdistillError,
    ModelError,
)
from kdistill.losses.lm_objective import LMObjective
from kdistill.models.hf import weights_follow
from kdistill.recipe.seq2seq import (
    TEACHER_TRANSLATION_STAGES,
    WORD_KD_STAGES,
    DecodeConfig,
    Seq2SeqModelSpec,
    Seq2SeqRecipe,
)
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
from kdistill.steps import TrainSteps
from kdistill.tasks.seq2seq.data import (
    Pairs,
    Seq2SeqData,
    TextPairs,
    encode_pairs,
    encode_targets,
    load_seq2seq,
    texts_digest,
)
from kdistill.tasks.seq2seq.measure import (
    measure_model,
    samples,
    save_model,
    seq2seq_cost,
    summary,
)
from kdistill.tasks.seq2seq.models import Seq2SeqLM, build_model, weights_fingerprint
from kdistill.tasks.seq2seq.report import write_report
from kdistill.tasks.seq2seq.steps import (
    LiveSeq2SeqTeacher,
    Seq2SeqSteps,
    Translations,
    require_sacrebleu,
    translate,
)
from kdistill.tasks.seq2seq.teacher_cache import (
    CachedSeq2SeqTeacher,
    cache_folder,
    cache_spec,
    write_cache,
)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Seq2SeqContext(RunContext):
    recipe: Seq2SeqRecipe
    data: Seq2SeqData
    teacher_data: dict[str, Seq2SeqData] = field(default_factory=dict)  # by tokenizer key
    translations: dict[str, list[str]] = field(default_factory=dict)  # by teacher fingerprint


@dataclass
class Teacher:
    model: Seq2SeqLM
    seed: int
    fingerprint: str


def run(recipe: Seq2SeqRecipe, options: RunOptions) -> dict[str, Any]:
    """Run the recipe's stages and return the results (the content of results.json)."""
    require_sacrebleu()
    with open_run(recipe, options) as (shared, _):
        data = _build_data(recipe, options.data_dir, shared)
        ctx = Seq2SeqContext(**shared.shared(), data=data)
        log_start(ctx, describe(data))
        _check_models(ctx)
        stages = set(recipe.stages)
        needs = stages & {"teacher", *WORD_KD_STAGES, *TEACHER_TRANSLATION_STAGES}
        uses_teacher = recipe.teacher is not None and (needs or recipe.student_from_teacher)
        run_stages(ctx, STAGES, teacher_seeds=recipe.seeds[:1] if uses_teacher else [])
        return finish_run(ctx, write_report)


def describe(data: Seq2SeqData) -> str:
    info = data.info()
    pairs, cut_s, cut_t = info["pairs"], info["cut_sources"], info["cut_targets"]
    vocab = (
        f"joint vocabulary {info['source_vocab']}"
        if info["joint_vocabulary"]
        else f"vocabularies {info['source_vocab']} + {info['target_vocab']}"
    )
    return (
        f"pairs: {pairs['train']:,} train, {pairs['val']:,} val, {pairs['test']:,} test "
        f"({data.section.source_lang}→{data.section.target_lang}, {data.source}); {vocab}; "
        f"cut at the length limits: sources {sum(cut_s.values())}, targets {sum(cut_t.values())}"
    )


def _build_data(recipe: Seq2SeqRecipe, data_dir: Any, shared: RunContext) -> Seq2SeqData:
    """The main process trains and saves the tokenizer; the others then load it."""
    folder = shared.run_dir / "tokenizer"
    data = None
    if shared.is_main:
        data = load_seq2seq(recipe.data, data_dir, tokenizer_dir=folder)
    shared.accelerator.wait_for_everyone()
    if data is None:
        data = load_seq2seq(recipe.data, data_dir, tokenizer_dir=folder, may_train_tokenizer=False)
    return data


def _data_for(ctx: Seq2SeqContext, model: Seq2SeqLM) -> Seq2SeqData:
    """The splits as `model` tokenizes them: the run's, unless a loaded model brought
    its own tokenizer."""
    key = model.tokenizer_key
    if key == ctx.data.tokenizers.key:
        return ctx.data
    if key not in ctx.teacher_data:
        ctx.teacher_data[key] = retokenized(ctx.data, model.kdistill_tokenizers)
    return ctx.teacher_data[key]


def retokenized(data: Seq2SeqData, tokenizers: Any) -> Seq2SeqData:
    encoded = {
        s: encode_pairs(data.split(s).text, tokenizers, data.section)
        for s in ("train", "val", "test")
    }
    return Seq2SeqData(
        encoded["train"], encoded["val"], encoded["test"], tokenizers, data.section, data.source
    )


def _build(
    ctx: Seq2SeqContext, spec: Seq2SeqModelSpec, where: str, teacher: Seq2SeqLM | None = None
) -> Seq2SeqLM:
    return build_model(spec, ctx.data.tokenizers, where=where, teacher=teacher)


def _check_models(ctx: Seq2SeqContext) -> None:
    """Build every model once before anything trains: a bad model section, shrink
    indices past the teacher's layers, or a teacher whose vocabulary differs from the
    student's for a token-level loss fail now, not after the teacher trained."""
    recipe, stages = ctx.recipe, set(ctx.recipe.stages)
    with torch.random.fork_rng(devices=[]), weights_follow():
        torch.manual_seed(0)
        teacher = None
        if recipe.teacher is not None:
            teacher = _build(ctx, recipe.teacher.model, "teacher.model")
        if recipe.student is not None and stages - {"teacher"}:
            student = _build(ctx, recipe.student.model, "student.model", teacher)
            if teacher is not None and stages & set(WORD_KD_STAGES):
                check_vocabularies(teacher, student)


def check_vocabularies(teacher: Seq2SeqLM, student: Seq2SeqLM) -> None:
    """Word-level KD compares distributions over one vocabulary, token by token."""
    if teacher.tokenizer_key != student.tokenizer_key:
        raise ModelError(
            "student.model: the teacher's tokenizer is not the student's, so their "
            "next-token distributions are over different vocabularies and a token-level "
            "loss (distill, seqkd_distill) cannot compare them. Use sequence-level KD "
            "(stages: [teacher, baseline, seqkd]), which passes the teacher's translations "
            "as text and works across tokenizers, or give both models one tokenizer"
        )


# ------------------------------------------------------------------------------ stages


def _teacher_stage(ctx: Seq2SeqContext, stage: str, seed: int, guide: None) -> Teacher:
    recipe = ctx.recipe
    assert recipe.teacher is not None
    folder = stage_dir(ctx.run_dir, stage, seed)
    torch.manual_seed(seed)
    model = _build(ctx, recipe.teacher.model, "teacher.model")
    checkpoint = resolve_weights(recipe.teacher.checkpoint) if recipe.teacher.checkpoint else None
    if checkpoint is not None:
        try:
            load_weights(model, checkpoint)
        except CheckpointError as exc:
            raise CheckpointError(f"teacher.checkpoint: {exc}") from None
    if recipe.teacher.pretrained:
        if not finished(folder):
            _measure(ctx, stage, seed, model, recipe.teacher.model, 0.0, 0)
    elif finished(folder):
        load_weights(model, folder / "model.safetensors")
        finished_earlier(ctx, stage, seed, teacher=True)
    else:
        model = _train_and_finish(
            ctx, stage, seed, model, recipe.teacher.model, LMObjective(ce_weight=1.0), None,
            train=_data_for(ctx, model).train, settings=recipe.teacher_train(),
        )  # fmt: skip
    model.to(ctx.accelerator.device)
    return Teacher(model, seed, weights_fingerprint(model))


def _student_stage(ctx: Seq2SeqContext, stage: str, seed: int, teacher: Teacher | None) -> None:
    recipe = ctx.recipe
    assert recipe.student is not None
    if finished_earlier(ctx, stage, seed):
        return
    word_kd = stage in WORD_KD_STAGES
    train = ctx.data.train
    if stage in TEACHER_TRANSLATION_STAGES:
        assert teacher is not None
        train = _seqkd_pairs(ctx, teacher)
    torch.manual_seed(seed)  # every student stage of a seed starts from the same weights
    model = _build(ctx, recipe.student.model, "student.model", teacher.model if teacher else None)
    signal = None
    objective = LMObjective(ce_weight=1.0)
    if word_kd:
        assert teacher is not None
        check_vocabularies(teacher.model, model)
        objective = LMObjective.of(recipe.objective)
        signal = _teacher_signal(ctx, teacher, cached=stage == "distill")
    _train_and_finish(
        ctx, stage, seed, model, recipe.student.model, objective, signal,
        train=train, settings=recipe.train,
    )  # fmt: skip


STAGES = StageTable(
    teacher={"teacher": _teacher_stage},
    student={
        "baseline": _student_stage,
        "distill": _student_stage,
        "seqkd": _student_stage,
        "seqkd_distill": _student_stage,
    },
)


def _train_and_finish(
    ctx: Seq2SeqContext,
    stage: str,
    seed: int,
    model: Seq2SeqLM,
    spec: Seq2SeqModelSpec,
    objective: LMObjective,
    signal: Any,
    *,
    train: Pairs,
    settings: Any,
) -> Seq2SeqLM:
    data = _data_for(ctx, model)
    steps: TrainSteps = Seq2SeqSteps(
        model,
        train=train,
        val=data.val,
        objective=objective,
        teacher=signal,
        settings=settings,
        accelerator=ctx.accelerator,
        pad_id=data.pad_id,
        start_id=model.start_id,
        vocab_size=data.tokenizers.target.get_vocab_size(),
        greedy_max_new_tokens=ctx.recipe.evaluation.greedy_max_new_tokens,
        val_sentences=ctx.recipe.evaluation.val_sentences,
        label=label(stage, seed),
    )
    result = train_stage(
        ctx, stage, seed, model, steps, settings=settings,
        teacher=None
        if signal is None
        else "live"
        if isinstance(signal, LiveSeq2SeqTeacher)
        else "cache",
    )  # fmt: skip
    model = ctx.accelerator.unwrap_model(model)
    _measure(ctx, stage, seed, model, spec, result.seconds, result.units)
    ctx.accelerator.free_memory()
    return model


def _teacher_signal(ctx: Seq2SeqContext, teacher: Teacher, *, cached: bool) -> Any:
    """The live teacher, or (distill with teacher.signal: cache) its top-k of the training
    pairs, written once and reused by every seed."""
    recipe, device = ctx.recipe, ctx.accelerator.device
    assert recipe.teacher is not None
    if not (cached and recipe.reads_teacher_cache()):
        live = LiveSeq2SeqTeacher(
            copy.deepcopy(teacher.model), dtype=DTYPES[recipe.teacher.precision or "fp32"]
        )
        live.model.to(device)
        return live
    data = _data_for(ctx, teacher.model)
    spec = cache_spec(recipe, data, teacher.fingerprint)
    folder = cache_folder(recipe, ctx.run_dir, teacher.seed)
    if ctx.is_main:
        info = write_cache(
            folder, spec, teacher.model, data, batch_size=recipe.train.eval_batch_size,
            shard_sequences=recipe.teacher.cache.shard_sequences, device=device,
        )  # fmt: skip
        if info["reused"]:
            ctx.console.log(
                f"teacher top-{spec.k} cache hit: {spec.num_sequences} pairs read from {folder} "
                "(teacher, tokenizers, pairs and temperature match; no teacher pass)"
            )
        else:
            ctx.console.log(
                f"teacher top-{spec.k} cached in {folder} ({info['bytes'] / 1e6:.1f} MB, "
                f"{info['seconds']:.1f}s)"
            )
    ctx.accelerator.wait_for_everyone()
    return CachedSeq2SeqTeacher(open_topk_cache(folder, expect=spec), device)


# ------------------------------------------------------------------ teacher translations


def _seqkd_pairs(ctx: Seq2SeqContext, teacher: Teacher) -> Pairs:
    """The training sources with the teacher's translations as targets (tokenized for
    the student), plus the references when seqkd.mix_references is on."""
    recipe = ctx.recipe
    assert recipe.seqkd is not None
    texts = _teacher_translations(ctx, teacher)
    data = ctx.data
    eos = data.eos_id
    targets = encode_targets(data.tokenizers.target, texts, data.section.max_target_length, eos)
    keep = [i for i, t in enumerate(texts) if t.strip()]
    if len(keep) < len(texts) and ctx.is_main:
        ctx.console.log(f"seqkd: {len(texts) - len(keep)} empty teacher translations left out")
    pairs = Pairs(
        [data.train.sources[i] for i in keep],
        [targets[i] for i in keep],
        TextPairs([data.train.text.sources[i] for i in keep], [texts[i] for i in keep], "teacher"),
    )
    rows = data.train + pairs if recipe.seqkd.mix_references else pairs
    if len(rows) < recipe.train.batch_size:
        raise DataError(
            f"seqkd: the teacher's translations give {len(pairs)} training pairs "
            f"({len(texts) - len(keep)} of its {len(texts)} translations are empty), fewer "
            f"than train.batch_size ({recipe.train.batch_size}). A teacher that writes "
            "nothing is not trained enough: check its BLEU in teacher/seed*/eval.json, train "
            "it longer, or set seqkd.mix_references: true to keep the references"
        )
    return rows


def _teacher_translations(ctx: Seq2SeqContext, teacher: Teacher) -> list[str]:
    if teacher.fingerprint in ctx.translations:
        return ctx.translations[teacher.fingerprint]
    recipe = ctx.recipe
    assert recipe.seqkd is not None
    folder = (
        Path(recipe.seqkd.dir).expanduser()
        if recipe.seqkd.dir
        else ctx.run_dir / "seqkd" / "translations"
    )
    data = _data_for(ctx, teacher.model)
    spec = translations_spec(teacher, data, recipe.seqkd)
    if ctx.is_main:
        info = write_translations(
            folder, spec, teacher.model, data.train, recipe.seqkd, ctx.accelerator.device
        )
        if info["reused"]:
            ctx.console.log(f"seqkd: reusing the teacher's translations in {folder}")
        else:
            ctx.console.log(
                f"seqkd: the teacher translated {spec['sources']:,} training sources (beam "
                f"{recipe.seqkd.num_beams}; {info['ended']:,} ended on their own, the others "
                f"at max_new_tokens) in {info['seconds']:.0f}s → {folder}"
            )
    ctx.accelerator.wait_for_everyone()
    texts = read_translations(folder, spec)
    ctx.translations[teacher.fingerprint] = texts
    return texts


def translations_spec(
    teacher: Teacher, data: Seq2SeqData, settings: DecodeConfig
) -> dict[str, Any]:
    """What the teacher's translations depend on: its weights and tokenizer, the
    sources, and the decoding settings."""
    return {
        "teacher": teacher.fingerprint,
        "tokenizer": teacher.model.tokenizer_key,
        "sources": len(data.train),
        "sources_sha256": texts_digest(data.train.text.sources),
        "max_source_length": data.section.max_source_length,
        "num_beams": settings.num_beams,
        "length_penalty": settings.length_penalty,
        "max_new_tokens": settings.max_new_tokens,
    }


def write_translations(
    folder: Path,
    spec: dict[str, Any],
    teacher: Seq2SeqLM,
    train: Pairs,
    settings: DecodeConfig,
    device: Any,
) -> dict[str, Any]:
    """Write (or finish, or verify) the teacher's translations of `train`'s sources.

    translations.jsonl holds one {"i", "text", "ended"} line per source, appended and
    synced batch by batch; manifest.json (written first) names the spec and says
    whether the file is complete. An interrupted write continues with the sources not
    yet written; a folder written for another spec is refused, never overwritten."""
    manifest_path, lines_path = folder / "manifest.json", folder / "translations.jsonl"
    done: dict[int, dict[str, Any]] = {}
    if manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        stale = [k for k in spec if manifest.get("spec", {}).get(k) != spec[k]]
        if stale:
            raise CacheError(
                f"the teacher translations in {folder} were written for another teacher, data "
                f"or decoding ({', '.join(stale)} differ); delete the folder to translate again, "
                "or set seqkd.dir to another folder"
            )
        done = _read_lines(lines_path)
        if manifest.get("complete"):
            return {"reused": True, "ended": sum(r["ended"] for r in done.values()), "seconds": 0}
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_json(manifest_path, {"spec": spec, "complete": False, "kdistill": __version__})
    # keep only whole lines of an interrupted write
    atomic_write_text(lines_path, "".join(json.dumps(done[i]) + "\n" for i in sorted(done)))
    todo = [i for i in range(len(train)) if i not in done]
    start = time.perf_counter()
    with open(lines_path, "a", encoding="utf-8") as handle:

        def on_batch(chosen: list[int], ids: list[list[int]]) -> None:
            for k, tokens in zip(chosen, ids):
                record = {
                    "i": todo[k],
                    "text": teacher.kdistill_tokenizers.decode(tokens),
                    "ended": len(tokens) < settings.max_new_tokens,
                }
                done[todo[k]] = record
                handle.write(json.dumps(record) + "\n")
            handle.flush()
            os.fsync(handle.fileno())

        if todo:
            translate(
                teacher,
                [train.sources[i] for i in todo],
                settings,
                device=device,
                on_batch=on_batch,
            )
    atomic_write_json(
        manifest_path,
        {"spec": spec, "complete": True, "seconds": round(time.perf_counter() - start, 3),
         "kdistill": __version__},
    )  # fmt: skip
    return {
        "reused": False,
        "ended": sum(r["ended"] for r in done.values()),
        "seconds": time.perf_counter() - start,
    }


def _read_lines(path: Path) -> dict[int, dict[str, Any]]:
    records: dict[int, dict[str, Any]] = {}
    if not path.is_file():
        return records
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # the last line of an interrupted write
        records[int(record["i"])] = record
    return records


def read_translations(folder: Path, spec: dict[str, Any]) -> list[str]:
    manifest = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
    if manifest.get("spec") != spec or not manifest.get("complete"):
        raise CacheError(f"the teacher translations in {folder} are incomplete or stale")
    records = _read_lines(folder / "translations.jsonl")
    missing = [i for i in range(spec["sources"]) if i not in records]
    if missing:
        raise CacheError(
            f"{folder}/translations.jsonl lacks {len(missing)} of its {spec['sources']} "
            "translations; delete the folder to translate again"
        )
    return [records[i]["text"] for i in range(spec["sources"])]


# ------------------------------------------------------------------------------ measuring


def _measure(
    ctx: Seq2SeqContext,
    stage: str,
    seed: int,
    model: Seq2SeqLM,
    spec: Seq2SeqModelSpec,
    train_seconds: float,
    train_tokens: int,
) -> None:
    recipe, device = ctx.recipe, ctx.accelerator.device
    data = _data_for(ctx, model)
    model.to(device)
    written: dict[str, Translations] = {}

    def measure(weights: Seq2SeqLM) -> dict[str, Any]:
        first = not written
        values, made = measure_model(
            weights, data, recipe, device=device, beam=first or recipe.evaluation.beam_on_best
        )
        if first:
            written.update(made)
        return values

    def main_only() -> dict[str, Any]:
        extra: dict[str, Any] = {"cost": seq2seq_cost(model, data, device), "data": data.info()}
        shrunk = getattr(model, "kdistill_shrunk", None)
        if shrunk is not None:
            extra["shrunk_from_teacher"] = shrunk
        extra["samples"] = samples(data, written, recipe.evaluation.samples)
        return extra

    def save(folder: Path) -> None:
        save_model(model, folder, spec, recipe.data)
        for kind, made in written.items():
            atomic_write_text(folder / f"test.{kind}.txt", "".join(t + "\n" for t in made.texts))

    finish_stage(
        ctx, stage, seed, model,
        measure=measure, best_by=("val_bleu", True), train_seconds=train_seconds,
        record={"task": "seq2seq"}, after={"train_tokens": train_tokens},
        main_only=main_only, save=save, summary=summary,
    )  # fmt: skip


# ----------------------------------------------------------------------- other commands


def check_recipe(recipe: Seq2SeqRecipe, data_dir: Any = None) -> list[str]:
    """What `validate` finds beyond the schema: sacrebleu, the data (read and checked,
    the tokenizer not trained), the teacher checkpoint."""
    from kdistill.preflight import Problems, weights_problem
    from kdistill.tasks.seq2seq.data import read_split

    problems = Problems()
    try:
        require_sacrebleu()
    except KdistillError as exc:
        problems.add(str(exc))
    for split in ("train", "val", "test"):
        name = getattr(recipe.data, split)
        if name is None:
            continue
        try:
            read_split(recipe.data, name, data_dir)
        except KdistillError as exc:
            problems.add(f"data.{split}: {exc}")
    if recipe.teacher is not None:
        problems.add(weights_problem("teacher.checkpoint", recipe.teacher.checkpoint))
    return problems.lines


def cache_teacher(
    recipe: Seq2SeqRecipe,
    *,
    output_dir: Any = None,
    data_dir: Any = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """`kdistill cache`: the trained teacher's top-k of every training pair, written once
    into the run folder (finished after a killed job, verified when already there). The
    seqkd stages write the teacher's translations themselves."""
    import shutil

    section = require_teacher(recipe)
    run_dir = run_dir_of(recipe, output_dir)
    seed = recipe.seeds[0]
    data = load_seq2seq(
        recipe.data, data_dir, tokenizer_dir=run_dir / "tokenizer", may_train_tokenizer=False
    )
    with weights_follow():
        model = build_model(section.model, data.tokenizers, where="teacher.model")
    checkpoint = None
    if section.checkpoint:
        checkpoint = resolve_weights(section.checkpoint)
    elif section.model.path is None:
        checkpoint = trained_teacher(run_dir, seed)
    if checkpoint is not None:
        load_weights(model, checkpoint)
    if model.tokenizer_key != data.tokenizers.key:
        data = retokenized(data, model.kdistill_tokenizers)
    folder = cache_folder(recipe, run_dir, seed)
    if overwrite and folder.exists():
        shutil.rmtree(folder)
    spec = cache_spec(recipe, data, weights_fingerprint(model))
    return write_cache(
        folder, spec, model, data, batch_size=recipe.train.eval_batch_size,
        shard_sequences=section.cache.shard_sequences, device="cpu",
    )  # fmt: skip
