"""Stages of a language-model run: teacher, baseline, seqkd, distill; and `kdistill cache`.

`run_lm` is what `kdistill run` calls for a recipe with `task: causal_lm`. It reads like
the recipe: claim the run folder, read and tokenize the corpus, train the teacher
(or load it), then for each seed train the student alone (baseline), on the teacher's
written completions (seqkd, `kdistill.tasks.causal_lm.seqkd`) and with the teacher's token
distributions (distill, with `on_policy` steps when the recipe asks), measure each once
on the validation split, and build the report from the files.

A pretrained teacher (teacher.checkpoint, teacher.model.path) may use another tokenizer
than data.tokenizer when no stage compares token distributions (no distill stage):
the teacher stage then measures it on the same text tokenized with its own tokenizer
(bits per character compare; loss per token does not), and seqkd passes text between
the two.

Run folder (as the classifier's, plus the tokenizer):
    recipe.yaml  run.json  results.json  results.md
    tokenizer/tokenizer.json            trained on the training text (or the one loaded)
    teacher/seed0/  baseline/seed<k>/  distill/seed<k>/   each with
        model.safetensors  model.json  best.safetensors  eval.json  metrics.jsonl  checkpoints/
        hf/        the model as a Hugging Face folder (save_pretrained + tokenizer.json)
    cache/topk-teacher-seed0/           the teacher's top-k, when teacher.signal is cache
    seqkd/generations/                  the teacher's completions (generations.jsonl,
                                        manifest.json), when the seqkd stage runs

eval.json: `val` holds the measured split (the last val_fraction of the corpus by
character position, or the validation pairs; no test split exists): loss per token
(nats), perplexity, bits per character (comparable across tokenizers), tokens and
characters measured (with pairs: the completion tokens and their text only); `best`
the same for the best-on-validation epoch; `cost`: parameters, size on disk, FLOPs
and latency per token; `samples`: a few generated continuations.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from rich.console import Console

from kdistill.cache import open_topk_cache, write_teacher_cache
from kdistill.checkpoint import atomic_write_json, load_weights
from kdistill.data.lm_text import (
    tokenizer_fingerprint,
)
from kdistill.errors import CheckpointError, DataError, ModelError
from kdistill.recipe.causal_lm import (
    LMModelSpec,
    LMRecipe,
    LMTrainConfig,
    OnPolicyConfig,
)
from kdistill.stages import (
    RunContext,
    RunOptions,
    StageTable,
    finish_run,
    finished,
    finished_earlier,
    label,
    log_start,
    open_run,
    run_stages,
    train_stage,
)
from kdistill.tasks.causal_lm.data import LMData, build_lm_data
from kdistill.tasks.causal_lm.measure import measure_stage
from kdistill.tasks.causal_lm.models import (
    CausalLM,
    check_same_tokenizer,
    model_tokenizer,
    weights_fingerprint,
)
from kdistill.tasks.causal_lm.report import write_lm_report
from kdistill.tasks.causal_lm.seqkd import (
    SeqKDRows,
    check_prompts,
    generations_spec,
    read_generations,
    seqkd_prompts,
    seqkd_rows,
    teacher_window,
    write_generations,
)
from kdistill.tasks.causal_lm.steps import LMObjective, LMSteps
from kdistill.tasks.causal_lm.teacher_cache import cache_folder, cache_spec, teacher_checkpoint
from kdistill.teachers import CachedLMTeacher, LiveLMTeacher, LMTeacherOutput, TeacherSignal


@dataclass
class LMContext(RunContext):
    recipe: LMRecipe
    data: LMData
    teacher_data: LMData  # the corpus as the teacher tokenizes it: `data` unless it has its own

    @property
    def data_dir(self) -> str | Path | None:
        return self.options.data_dir

    def build(
        self,
        spec: LMModelSpec,
        where: str,
        data: LMData | None = None,
        teacher: CausalLM | None = None,
    ) -> CausalLM:
        data = data or self.data
        return data.build_model(spec, where, teacher)


@dataclass
class LMTeacher:
    """The trained (or loaded) teacher and the fingerprint of its weights."""

    model: CausalLM
    seed: int
    fingerprint: str


def run_lm(recipe: LMRecipe, options: RunOptions) -> dict[str, Any]:
    """Run the recipe's stages and return the results (the content of results.json)."""
    with open_run(recipe, options) as (run, _):
        data = _build_data(recipe, options.data_dir, run.run_dir, run.accelerator)
        teacher_data = _teacher_data(
            recipe, data, options.data_dir, run.run_dir, run.console, run.accelerator
        )
        ctx = LMContext(**run.shared(), data=data, teacher_data=teacher_data)
        log_start(ctx, _describe_data(data, recipe))
        _run_stages(ctx)
        return finish_run(ctx, write_lm_report)


def _run_stages(ctx: LMContext) -> None:
    """The teacher once, then per seed the baseline, seqkd and distill stages."""
    recipe = ctx.recipe
    _check_models(ctx)
    needs_teacher = recipe.teacher is not None and set(recipe.stages) & _teacher_stages(recipe)
    run_stages(ctx, STAGES, teacher_seeds=recipe.seeds[:1] if needs_teacher else [])


def _teacher_stages(recipe: LMRecipe) -> set[str]:
    """The stages that need the teacher: all student stages when the student is pruned
    from it."""
    pruned = recipe.student is not None and recipe.student.model.prune is not None
    return {"teacher", "seqkd", "distill"} | ({"prune", "baseline"} if pruned else set())


def _describe_data(data: LMData, recipe: LMRecipe) -> str:
    info = data.info
    if recipe.data.pairs is not None:
        return (
            f"pairs: {info['pairs']['train']:,} train + {info['pairs']['val']:,} val, "
            f"{info['tokens']['train']:,} + {info['tokens']['val']:,} completion tokens "
            f"counted (vocabulary {data.vocab_size}; prompts cut: "
            f"{info['truncated_prompts']['train']} + {info['truncated_prompts']['val']}, "
            f"completions cut: {info['truncated_completions']['train']} + "
            f"{info['truncated_completions']['val']}), one row of {data.seq_len} each"
        )
    return (
        f"corpus: {info['characters']['train']:,} train + "
        f"{info['characters']['val']:,} val characters, {info['tokens']['train']:,} "
        f"+ {info['tokens']['val']:,} tokens ({info['chars_per_token']:.2f} "
        f"characters/token, vocabulary {data.vocab_size}), {len(data.train)} + "
        f"{len(data.val)} sequences of {data.seq_len}"
    )


def _build_data(
    recipe: LMRecipe, data_dir: str | Path | None, run_dir: Path, accelerator: Accelerator
) -> LMData:
    """The main process trains and saves the tokenizer; the others then load it."""
    folder = run_dir / "tokenizer"
    data = None
    if accelerator.is_main_process:
        data = build_lm_data(recipe.data, data_dir=data_dir, tokenizer_dir=folder)
    accelerator.wait_for_everyone()
    if data is None:
        data = build_lm_data(
            recipe.data, data_dir=data_dir, tokenizer_dir=folder, may_train_tokenizer=False
        )
    return data


def _teacher_data(
    recipe: LMRecipe,
    data: LMData,
    data_dir: str | Path | None,
    run_dir: Path,
    console: Console,
    accelerator: Accelerator,
) -> LMData:
    """The corpus as the teacher sees it: `data`, unless a pretrained teacher ships another
    tokenizer, which only stages that pass text (teacher, seqkd) accept; the distill
    stage compares token ids and refuses it."""
    stages = set(recipe.stages)
    if recipe.teacher is None or not stages & {"teacher", "seqkd", "distill"}:
        return data
    checkpoint = teacher_checkpoint(recipe)
    own = model_tokenizer(recipe.teacher.model, checkpoint)
    if own is None or tokenizer_fingerprint(own) == data.tokenizer_fingerprint:
        return data
    if "distill" in stages:
        check_same_tokenizer(
            own,
            data.tokenizer,
            where="teacher.checkpoint" if checkpoint else "teacher.model.path",
            role="teacher",
        )
    if accelerator.is_main_process:
        console.log(
            f"the teacher has its own tokenizer ({own.get_vocab_size()} tokens; the student's "
            f"has {data.vocab_size}): it is measured on its own tokenization of the same text, "
            "and seqkd passes text between the two"
        )
    return build_lm_data(
        recipe.data, data_dir=data_dir, tokenizer_dir=run_dir / "tokenizer", tokenizer=own
    )


def _check_models(ctx: LMContext) -> None:
    """Build every model the stages need once, and read the seqkd prompts, so a student
    or teacher that cannot be built (or distilled from this teacher: `_teacher_data`) or
    a prompt that does not fit fails now, not after the teacher trained."""
    recipe, stages = ctx.recipe, set(ctx.recipe.stages)
    teacher = None
    if recipe.teacher is not None and stages & _teacher_stages(recipe):
        teacher = ctx.build(recipe.teacher.model, "teacher.model", ctx.teacher_data)
        if "seqkd" in stages:
            assert recipe.seqkd is not None
            check_prompts(
                seqkd_prompts(recipe.seqkd, ctx.data, ctx.data_dir),
                teacher_tokenizer=ctx.teacher_data.tokenizer,
                teacher_context=teacher_window(teacher, ctx.teacher_data.seq_len),
                student_tokenizer=ctx.data.tokenizer,
                seq_len=ctx.data.seq_len,
            )
    pruned = recipe.student is not None and recipe.student.model.prune is not None
    if pruned and ctx.teacher_data.tokenizer_fingerprint != ctx.data.tokenizer_fingerprint:
        raise ModelError(
            "student.model.prune: a pruned student keeps the teacher's token embeddings, so it "
            "reads the teacher's tokenizer; this teacher has its own (teacher.model.path), "
            "different from data.tokenizer. Set data.tokenizer.path to the teacher's folder"
        )
    if recipe.student is not None and stages & {"prune", "baseline", "seqkd", "distill"}:
        check_same_tokenizer(
            model_tokenizer(recipe.student.model, None),
            ctx.data.tokenizer,
            where="student.model.path",
            role="student",
        )
        ctx.build(recipe.student.model, "student.model", teacher=teacher)


def _teacher_stage(ctx: LMContext, stage: str, seed: int, guide: None) -> LMTeacher:
    """Load the teacher from teacher.checkpoint or model.path, reuse one trained earlier in
    this run folder, or train it. A loaded teacher is measured like a trained one (once
    per run folder), so the results table has its row and the gap."""
    recipe = ctx.recipe
    assert recipe.teacher is not None
    stage_dir = ctx.run_dir / "teacher" / f"seed{seed}"
    torch.manual_seed(seed)
    model = ctx.build(recipe.teacher.model, "teacher.model", ctx.teacher_data)
    checkpoint = teacher_checkpoint(recipe)
    done = finished(stage_dir)
    if checkpoint is not None:
        try:
            load_weights(model, checkpoint)
        except CheckpointError as exc:
            raise CheckpointError(f"teacher.checkpoint: {exc}") from None
    if recipe.teacher.pretrained:
        if not done:
            measure_stage(
                ctx, "teacher", seed, model, recipe.teacher.model, 0.0, 0, data=ctx.teacher_data
            )
    elif done:
        load_weights(model, stage_dir / "model.safetensors")
        finished_earlier(ctx, "teacher", seed, teacher=True)
    else:
        model = _train_and_finish(
            ctx,
            "teacher",
            seed,
            model,
            recipe.teacher.model,
            LMObjective(ce_weight=1.0),
            None,
            settings=recipe.teacher_train(),
        )
    return LMTeacher(model, seed, weights_fingerprint(model))


def _student_stage(ctx: LMContext, stage: str, seed: int, teacher: LMTeacher | None) -> None:
    recipe = ctx.recipe
    assert recipe.student is not None
    if finished_earlier(ctx, stage, seed):
        return
    torch.manual_seed(seed)  # baseline and distill start from the same weights for a seed
    model = ctx.build(
        recipe.student.model, "student.model", teacher=teacher.model if teacher else None
    )
    signal: TeacherSignal[LMTeacherOutput] | None = None
    if stage == "baseline":
        objective = LMObjective(ce_weight=1.0)
    else:
        assert teacher is not None
        objective = LMObjective.of(recipe.objective)
        signal = _teacher_signal(ctx, teacher)
    _train_and_finish(
        ctx,
        stage,
        seed,
        model,
        recipe.student.model,
        objective,
        signal,
        settings=recipe.train,
        on_policy=recipe.on_policy if stage == "distill" else None,
    )


def _seqkd_stage(ctx: LMContext, stage: str, seed: int, teacher: LMTeacher) -> None:
    """Train the student on the teacher's completions (written once, shared by seeds)."""
    recipe = ctx.recipe
    assert recipe.student is not None
    if finished_earlier(ctx, "seqkd", seed):
        return
    rows = _seqkd_rows(ctx, teacher)
    if len(rows.train) < recipe.train.batch_size:
        raise DataError(
            f"seqkd: the teacher's completions make {len(rows.train)} training rows, fewer than "
            f"train.batch_size ({recipe.train.batch_size}); add prompts (seqkd.prompts, "
            "seqkd.num_prompts), raise seqkd.generation.num_per_prompt, or lower "
            "train.batch_size"
        )
    torch.manual_seed(seed)  # the same initial weights as the baseline of this seed
    model = ctx.build(recipe.student.model, "student.model", teacher=teacher.model)
    _train_and_finish(
        ctx,
        "seqkd",
        seed,
        model,
        recipe.student.model,
        LMObjective(ce_weight=1.0),
        None,
        settings=recipe.train,
        train=rows,
    )


def _seqkd_rows(ctx: LMContext, teacher: LMTeacher) -> SeqKDRows:
    """The main process checks the prompts and writes (or verifies) the generations; every
    process then reads them and tokenizes them for the student."""
    recipe = ctx.recipe
    assert recipe.seqkd is not None
    cfg, data, teacher_data = recipe.seqkd, ctx.data, ctx.teacher_data
    folder = Path(cfg.dir).expanduser() if cfg.dir else ctx.run_dir / "seqkd" / "generations"
    prompts = seqkd_prompts(cfg, data, ctx.data_dir)
    context = teacher_window(teacher.model, teacher_data.seq_len)
    prompt_ids = check_prompts(
        prompts,
        teacher_tokenizer=teacher_data.tokenizer,
        teacher_context=context,
        student_tokenizer=data.tokenizer,
        seq_len=data.seq_len,
    )
    spec = generations_spec(
        prompts,
        cfg.generation,
        teacher_fingerprint=teacher.fingerprint,
        teacher_tokenizer=teacher_data.tokenizer,
        context=context,
    )
    if ctx.is_main:
        info = write_generations(
            folder,
            spec,
            teacher.model,
            prompt_ids,
            prompts,
            cfg.generation,
            tokenizer=teacher_data.tokenizer,
            vocab_size=teacher_data.vocab_size,
            batch_size=recipe.train.eval_batch_size,
            device=ctx.accelerator.device,
        )
        if info["reused"]:
            ctx.console.log(f"seqkd: reusing the teacher's completions in {folder}")
        else:
            ctx.console.log(
                f"seqkd: the teacher wrote {len(prompt_ids) * cfg.generation.num_per_prompt} "
                f"completions of {prompts.source} ({info['stopped']['eos']} ended on their own, "
                f"{info['stopped']['length']} at max_new_tokens) in {info['seconds']:.1f}s "
                f"→ {folder}"
            )
    ctx.accelerator.wait_for_everyone()
    rows = seqkd_rows(read_generations(folder, spec), data.tokenizer, seq_len=data.seq_len)
    if ctx.is_main:
        info = rows.info
        ctx.console.log(
            f"seqkd: {info['rows']} prompt/completion rows, {info['tokens_learned']:,} completion "
            f"tokens to learn ({info['completions_cut']} completions cut at data.seq_len, "
            f"{info['left_out']} empty ones left out)"
        )
    return rows


def _prune_stage(ctx: LMContext, stage: str, seed: int, teacher: LMTeacher | None) -> None:
    """The student (the teacher, pruned) measured before any training: what pruning
    alone cost; baseline and distill start from the same pruned weights."""
    recipe = ctx.recipe
    assert recipe.student is not None and teacher is not None
    if finished_earlier(ctx, stage, seed):
        return
    torch.manual_seed(seed)
    start = time.perf_counter()
    model = ctx.build(recipe.student.model, "student.model", teacher=teacher.model)
    report = model.hf.kdistill_pruned
    if ctx.is_main:
        sizes = ", ".join(f"{k} {a} -> {b}" for k, (a, b) in report["sizes"].items())
        before, after = report["params"]
        ctx.console.log(
            f"{stage} seed {seed}: {sizes}, layers {report['layers']} kept (activation "
            f"importance on {report['samples']} training sequences): {before:,} -> {after:,} "
            "parameters"
        )
    measure_stage(ctx, stage, seed, model, recipe.student.model, time.perf_counter() - start, 0)


def _quantize_stage(ctx: LMContext, stage: str, seed: int, teacher: LMTeacher | None) -> None:
    """The quantize.stage's model of this seed as INT8 ONNX, its validation loss
    measured by ONNX Runtime (tasks/causal_lm/export.py)."""
    folder = ctx.run_dir / stage / f"seed{seed}"
    if (folder / "eval.json").exists():
        if ctx.is_main:
            ctx.console.log(f"{stage} seed {seed}: finished earlier in {folder}, skipping")
        return
    if ctx.is_main:
        from kdistill.tasks.causal_lm.export import quantized_lm_stage

        settings = ctx.recipe.quantize
        evaluation = quantized_lm_stage(
            ctx.run_dir / settings.stage / f"seed{seed}",
            output=folder,
            mode=settings.mode,
            threads=torch.get_num_threads(),
            data_dir=ctx.data_dir,
        )
        atomic_write_json(folder / "eval.json", {"stage": stage, "seed": seed, **evaluation})
        ctx.console.log(
            f"{stage} seed {seed}: {settings.stage} as INT8 ({settings.mode}) val loss/token "
            f"{evaluation['val']['loss']:.4f}, next-token agreement with FP32 "
            f"{100 * evaluation['agreement_with_fp32']:.2f}%"
        )
    ctx.accelerator.wait_for_everyone()


STAGES = StageTable(
    teacher={"teacher": _teacher_stage},
    student={
        "prune": _prune_stage,
        "baseline": _student_stage,
        "seqkd": _seqkd_stage,
        "distill": _student_stage,
        "quantize": _quantize_stage,
    },
)


def _train_and_finish(
    ctx: LMContext,
    stage: str,
    seed: int,
    model: CausalLM,
    spec: LMModelSpec,
    objective: LMObjective,
    signal: TeacherSignal[LMTeacherOutput] | None,
    *,
    settings: LMTrainConfig,
    train: SeqKDRows | None = None,
    on_policy: OnPolicyConfig | None = None,
) -> CausalLM:
    """Train with fit on the run's rows (packed corpus or pairs), or on `train` (the
    seqkd rows), and finish."""
    steps = LMSteps(
        model,
        train=ctx.data.train if train is None else train.train,
        train_labels=ctx.data.train_labels if train is None else train.labels,
        on_policy=on_policy,
        val=ctx.data.val,
        val_labels=ctx.data.val_labels,
        objective=objective,
        teacher=signal,
        settings=settings,
        vocab_size=ctx.data.vocab_size,
        accelerator=ctx.accelerator,
        seed=seed,
        label=label(stage, seed),
    )
    result = train_stage(ctx, stage, seed, model, steps, settings=settings)
    model = ctx.accelerator.unwrap_model(model)
    measure_stage(ctx, stage, seed, model, spec, result.seconds, result.units)
    ctx.accelerator.free_memory()
    return model


# ------------------------------------------------------------------ teacher signal


def _teacher_signal(ctx: LMContext, teacher: LMTeacher) -> TeacherSignal[LMTeacherOutput]:
    recipe = ctx.recipe
    assert recipe.teacher is not None
    device = ctx.accelerator.device
    if recipe.teacher.signal == "live":
        return LiveLMTeacher(
            copy.deepcopy(teacher.model), precision=recipe.teacher.precision or "fp32"
        ).to(device)
    spec = cache_spec(recipe, ctx.data, teacher.fingerprint)
    folder = cache_folder(recipe, ctx.run_dir, teacher.seed)
    if ctx.is_main:
        info = write_teacher_cache(
            folder,
            spec,
            teacher.model.to(device),
            ctx.data.train,
            batch_size=recipe.train.eval_batch_size,
            shard_sequences=recipe.teacher.cache.shard_sequences,
            device=device,
        )
        if info["reused"]:
            ctx.console.log(
                f"teacher top-{spec.k} cache hit: {spec.num_sequences} sequences read from "
                f"{folder} (teacher, tokenizer, data and temperature match; no teacher pass)"
            )
        else:
            ctx.console.log(
                f"teacher top-{spec.k} cached in {folder} ({info['bytes'] / 1e6:.1f} MB, "
                f"{info['bytes_per_token']} bytes/token, {info['seconds']:.1f}s)"
            )
    ctx.accelerator.wait_for_everyone()
    return CachedLMTeacher(open_topk_cache(folder, expect=spec), device)


# ------------------------------------------------------------------ measuring


# ------------------------------------------------------------------ kdistill eval


# ------------------------------------------------------------------ kdistill cache
