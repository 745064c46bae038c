"""Stages of a language-model run: teacher, baseline, seqkd, distill; and `kdistill cache`.

`run_lm` is what `kdistill run` calls for a recipe with `task: causal_lm`. It reads like
the recipe: claim the run folder, read and tokenize the corpus, train the teacher
(or load it), then for each seed train the student alone (baseline), on the teacher's
written completions (seqkd, `kdistill.lm.seqkd`) and with the teacher's token
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
import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from rich.console import Console

from kdistill import __version__
from kdistill.cache import TopKCacheSpec, open_topk_cache, write_teacher_cache
from kdistill.checkpoint import atomic_write_json, load_weights
from kdistill.data.lm_text import (
    TOKENIZER_FILE,
    bits_per_character,
    load_tokenizer,
    save_tokenizer,
    tokenizer_fingerprint,
)
from kdistill.errors import CheckpointError, DataError, RecipeError
from kdistill.evaluate import cost
from kdistill.lm.data import LMData, build_lm_data
from kdistill.lm.models import (
    CausalLM,
    check_same_tokenizer,
    model_tokenizer,
    weights_fingerprint,
)
from kdistill.lm.report import write_lm_report
from kdistill.lm.seqkd import (
    SeqKDRows,
    check_prompts,
    generations_spec,
    read_generations,
    seqkd_prompts,
    seqkd_rows,
    teacher_window,
    write_generations,
)
from kdistill.models.hf import quiet_transformers
from kdistill.recipe.causal_lm import (
    LMDataConfig,
    LMModelSpec,
    LMRecipe,
    LMTrainConfig,
    OnPolicyConfig,
    SamplesConfig,
)
from kdistill.stages import (
    StageTable,
    finish_run,
    finish_stage,
    finished,
    finished_earlier,
    label,
    log_start,
    make_accelerator,
    require_teacher,
    resolve_weights,
    run_dir_of,
    run_folder,
    run_stages,
    train_stage,
    trained_teacher,
)
from kdistill.taps import module_tree
from kdistill.tasks.causal_lm import LMObjective, LMSteps, evaluate_lm
from kdistill.teachers import CachedLMTeacher, LiveLMTeacher, LMTeacherOutput, TeacherSignal

MEASURED_SPLIT = "validation: the last data.val_fraction of the corpus, by character position"
MEASURED_PAIRS = (
    "validation pairs (data.pairs.val, else data.val_fraction of the training pairs drawn "
    "at random): completion tokens only"
)


@dataclass
class LMContext:
    recipe: LMRecipe
    run_dir: Path
    data: LMData
    accelerator: Accelerator
    resume: bool
    quiet: bool
    console: Console
    teacher_data: LMData  # the corpus as the teacher tokenizes it: `data` unless it has its own
    data_dir: str | Path | None = None

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def build(self, spec: LMModelSpec, where: str, data: LMData | None = None) -> CausalLM:
        data = data or self.data
        return data.build_model(spec, where)


@dataclass
class LMTeacher:
    """The trained (or loaded) teacher and the fingerprint of its weights."""

    model: CausalLM
    seed: int
    fingerprint: str


def run_lm(
    recipe: LMRecipe,
    *,
    output_dir: str | Path | None = None,
    data_dir: str | Path | None = None,
    resume: bool = False,
    overwrite: bool = False,
    quiet: bool = False,
    console: Console | None = None,
) -> dict[str, Any]:
    """Run the recipe's stages and return the results (the content of results.json)."""
    console = console or Console(stderr=True)
    accelerator = make_accelerator(recipe.train.precision)
    run_dir = run_dir_of(recipe, output_dir)
    with run_folder(recipe, run_dir, accelerator, resume=resume, overwrite=overwrite):
        data = _build_data(recipe, data_dir, run_dir, accelerator)
        teacher_data = _teacher_data(recipe, data, data_dir, run_dir, console, accelerator)
        ctx = LMContext(
            recipe, run_dir, data, accelerator, resume, quiet, console, teacher_data, data_dir
        )
        log_start(ctx, _describe_data(data, recipe))
        _run_stages(ctx)
        return finish_run(run_dir, accelerator, write_lm_report)


def _run_stages(ctx: LMContext) -> None:
    """The teacher once, then per seed the baseline, seqkd and distill stages."""
    recipe = ctx.recipe
    _check_models(ctx)
    needs_teacher = recipe.teacher is not None and set(recipe.stages) & {
        "teacher",
        "seqkd",
        "distill",
    }
    run_stages(ctx, STAGES, teacher_seeds=recipe.seeds[:1] if needs_teacher else [])


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
    checkpoint = _teacher_checkpoint(recipe)
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
    if recipe.teacher is not None and stages & {"teacher", "seqkd", "distill"}:
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
    if recipe.student is not None and stages & {"baseline", "seqkd", "distill"}:
        check_same_tokenizer(
            model_tokenizer(recipe.student.model, None),
            ctx.data.tokenizer,
            where="student.model.path",
            role="student",
        )
        ctx.build(recipe.student.model, "student.model")


def _teacher_checkpoint(recipe: LMRecipe) -> Path | None:
    assert recipe.teacher is not None
    if recipe.teacher.checkpoint is None:
        return None
    return resolve_weights(recipe.teacher.checkpoint)


def _teacher_stage(ctx: LMContext, stage: str, seed: int, guide: None) -> LMTeacher:
    """Load the teacher from teacher.checkpoint or model.path, reuse one trained earlier in
    this run folder, or train it; measure it when the stage is listed."""
    recipe = ctx.recipe
    assert recipe.teacher is not None
    stage_dir = ctx.run_dir / "teacher" / f"seed{seed}"
    torch.manual_seed(seed)
    model = ctx.build(recipe.teacher.model, "teacher.model", ctx.teacher_data)
    checkpoint = _teacher_checkpoint(recipe)
    done = finished(stage_dir)
    if checkpoint is not None:
        try:
            load_weights(model, checkpoint)
        except CheckpointError as exc:
            raise CheckpointError(f"teacher.checkpoint: {exc}") from None
    if recipe.teacher.pretrained:
        if "teacher" in recipe.stages and not done:
            _finish_stage(
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
    model = ctx.build(recipe.student.model, "student.model")
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
    model = ctx.build(recipe.student.model, "student.model")
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


STAGES = StageTable(
    teacher={"teacher": _teacher_stage},
    student={"baseline": _student_stage, "seqkd": _seqkd_stage, "distill": _student_stage},
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
    _finish_stage(ctx, stage, seed, model, spec, result.seconds, result.units)
    ctx.accelerator.free_memory()
    return model


# ------------------------------------------------------------------ teacher signal


def cache_spec(recipe: LMRecipe, data: LMData, teacher_fingerprint: str) -> TopKCacheSpec:
    assert recipe.teacher is not None
    term = recipe.divergence()
    temperature = term.temperature if term is not None and term.temperature is not None else 1.0
    start = temperature if isinstance(temperature, (int, float)) else temperature.start
    return TopKCacheSpec(
        teacher=teacher_fingerprint,
        tokenizer=data.tokenizer_fingerprint,
        dataset=data.fingerprint,
        k=recipe.teacher.cache.top_k,
        temperature=float(start),
        seq_len=data.seq_len,
        num_sequences=len(data.train),
        vocab_size=data.vocab_size,
        encoding=recipe.teacher.cache.encoding,
        tail_samples=recipe.teacher.cache.tail_samples,
    )


def cache_folder(recipe: LMRecipe, run_dir: Path, seed: int) -> Path:
    assert recipe.teacher is not None
    if recipe.teacher.cache.dir is not None:
        return Path(recipe.teacher.cache.dir).expanduser()
    return run_dir / "cache" / f"topk-teacher-seed{seed}"


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
        if not info["reused"]:
            ctx.console.log(
                f"teacher top-{spec.k} cached in {folder} ({info['bytes'] / 1e6:.1f} MB, "
                f"{info['bytes_per_token']} bytes/token, {info['seconds']:.1f}s)"
            )
    ctx.accelerator.wait_for_everyone()
    return CachedLMTeacher(open_topk_cache(folder, expect=spec), device)


# ------------------------------------------------------------------ measuring


def measure(model: CausalLM, data: LMData, *, batch_size: int, device: Any) -> dict[str, Any]:
    """Loss per token (nats), perplexity and bits per character on the validation split
    (with pairs: over the completion tokens and the characters of their text)."""
    nll, tokens = evaluate_lm(
        model, data.val, batch_size=batch_size, device=device, labels=data.val_labels
    )
    loss = nll / max(tokens, 1)
    return {
        "loss": loss,
        "perplexity": math.exp(min(loss, 700.0)),
        "bpc": bits_per_character(nll, data.val_characters),
        "tokens": tokens,
        "characters": data.val_characters,
    }


def generate_samples(
    model: CausalLM, data: LMData, cfg: SamplesConfig, *, seed: int, device: Any
) -> list[dict[str, str]]:
    """Continuations of `cfg.count` prompts taken from evenly spaced validation sequences
    (their first cfg.prompt_tokens tokens; with pairs, the pair's prompt): greedy at
    temperature 0, else sampled with a generator seeded by `seed`."""
    if cfg.count == 0:
        return []
    rows = torch.linspace(0, len(data.val) - 1, cfg.count).round().long().unique()
    generator = torch.Generator().manual_seed(seed)
    context = min(data.seq_len, model.context or data.seq_len)
    samples = []
    was_training = model.training
    model.eval()
    try:
        for row in rows.tolist():
            length = data.prompt_length(row) or cfg.prompt_tokens
            prompt = data.val[row, : min(length, context)].tolist()
            ids = list(prompt)
            with torch.inference_mode():
                for _ in range(cfg.new_tokens):
                    window = torch.tensor(ids[-context:], device=device).unsqueeze(0)  # (1, t)
                    logits = model.logits(model(window)[:, -1])[0, : data.vocab_size].float()
                    if cfg.temperature == 0:
                        token = int(logits.argmax())
                    else:
                        probs = torch.softmax(logits / cfg.temperature, dim=-1).cpu()
                        token = int(torch.multinomial(probs, 1, generator=generator))
                    ids.append(token)
            samples.append(
                {
                    "prompt": data.tokenizer.decode(prompt),
                    "completion": data.tokenizer.decode(ids[len(prompt) :]),
                }
            )
    finally:
        model.train(was_training)
    return samples


def _finish_stage(
    ctx: LMContext,
    stage: str,
    seed: int,
    model: CausalLM,
    spec: LMModelSpec,
    train_seconds: float,
    train_tokens: int,
    data: LMData | None = None,
) -> None:
    """Measure the last and best-on-validation weights once; write the stage folder.
    data: the corpus as the model tokenizes it (default the run's)."""
    data, device = data or ctx.data, ctx.accelerator.device
    batch = ctx.recipe.train.eval_batch_size
    model = model.to(device)

    def save(folder: Path) -> None:
        _export_hf(model, data, folder / "hf")
        atomic_write_json(
            folder / "model.json",
            {
                "task": "causal_lm",
                "model": spec.model_dump(mode="json"),
                "hf_config": model.hf.config.to_dict(),
                "vocab_size": data.vocab_size,
                "seq_len": data.seq_len,
                "tokenizer": data.tokenizer_fingerprint,
                "data": ctx.recipe.data.model_dump(mode="json"),
                "kdistill": __version__,
            },
        )

    def summary(evaluation: dict[str, Any]) -> str:
        val = evaluation["val"]
        return (
            f"val loss/token {val['loss']:.4f}, perplexity {val['perplexity']:.2f}, "
            f"{val['bpc']:.4f} bits/character"
        )

    finish_stage(
        ctx,
        stage,
        seed,
        model,
        measure=lambda weights: {"val": measure(weights, data, batch_size=batch, device=device)},
        best_by=("val_loss", False),
        train_seconds=train_seconds,
        record={
            "task": "causal_lm",
            "measured_split": MEASURED_SPLIT if data.val_labels is None else MEASURED_PAIRS,
        },
        after={"train_tokens": train_tokens},
        main_only=lambda: {
            "cost": _cost(model, data, device),
            "samples": generate_samples(model, data, ctx.recipe.samples, seed=seed, device=device),
        },
        save=save,
        summary=summary,
    )


def _cost(model: CausalLM, data: LMData, device: Any) -> dict[str, Any]:
    """Parameters, size, FLOPs and latency per token of the Hugging Face model's forward
    (logits included) on 4 validation sequences."""
    inputs = data.val[:4, :-1]
    measured = cost(model.hf, example_input=inputs, device=device, repeats=5, warmup=1)
    tokens = inputs.numel()
    return {
        **measured,
        "tokens_per_batch": tokens,
        "seq_len": data.seq_len,
        "flops_per_token": measured["flops"] / data.seq_len,
        "latency_ms_per_token": measured["latency_ms"] / tokens,
    }


def _export_hf(model: CausalLM, data: LMData, folder: Path) -> None:
    """The model as a Hugging Face folder (config, weights, tokenizer), written then renamed."""
    tmp = folder.with_name(folder.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    with quiet_transformers():
        model.hf.save_pretrained(tmp)
    save_tokenizer(data.tokenizer, tmp)
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(tmp, folder)


# ------------------------------------------------------------------ kdistill eval


def evaluate_lm_checkpoint(
    weights: Path,
    *,
    data: str | None = None,
    model: str | None = None,
    data_dir: str | Path | None = None,
) -> dict[str, Any]:
    """`kdistill eval` of a language-model stage folder: loss per token, perplexity and
    bits per character on the validation split of the data it was trained on, tokenized
    with the stage's own tokenizer (hf/tokenizer.json), and the cost per token."""
    stage_dir = weights.parent
    if data is not None or model is not None:
        raise RecipeError(
            f"{stage_dir} is a language-model stage: it is measured on the validation text "
            "of the recipe it was trained with, so --data and --model do not apply; leave "
            "them out"
        )
    info = json.loads((stage_dir / "model.json").read_text())
    exported = stage_dir / "hf"
    if not (exported / TOKENIZER_FILE).is_file():
        raise CheckpointError(
            f"{stage_dir} has no hf/{TOKENIZER_FILE}, so the tokenizer the model reads is "
            "unknown; evaluate a stage folder written by `kdistill run`"
        )
    start = time.perf_counter()
    corpus = build_lm_data(
        LMDataConfig.model_validate(info["data"]),
        data_dir=data_dir,
        tokenizer_dir=exported,
        tokenizer=load_tokenizer(exported),
    )
    with quiet_transformers():
        net = corpus.build_model(LMModelSpec(path=str(exported)), "model")
    load_weights(net, weights)
    device = torch.device("cpu")
    return {
        "checkpoint": str(weights),
        "task": "causal_lm",
        "val": measure(net, corpus, batch_size=32, device=device),
        "cost": _cost(net, corpus, device),
        "seconds": round(time.perf_counter() - start, 3),
    }


def inspect_lm_recipe(
    recipe: LMRecipe, role: str, *, depth: int | None, data_dir: str | Path | None
) -> str:
    """The modules of a language-model recipe's teacher or student, on two validation
    sequences of its data (the tokenizer trained in a scratch folder when the recipe
    trains one)."""
    with tempfile.TemporaryDirectory() as scratch:
        data = build_lm_data(recipe.data, data_dir=data_dir, tokenizer_dir=Path(scratch))
    model = data.build_model(getattr(recipe, role).model, f"{role}.model").eval()
    sample = data.val[:2, :-1]  # (2, seq_len) token ids
    header = (
        f"{role}: causal LM, vocabulary {data.vocab_size}, input {tuple(sample.shape)} token ids"
    )
    return header + "\n" + module_tree(model, sample, max_depth=depth)


# ------------------------------------------------------------------ kdistill cache


def cache_lm_teacher(
    recipe: LMRecipe,
    *,
    output_dir: str | Path | None = None,
    data_dir: str | Path | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Write (or finish, or verify) the trained teacher's top-k cache of the training split.

    The teacher's weights come from teacher.checkpoint, teacher.model.path, or the run
    folder's teacher stage; the tokenizer from the run folder (or data.tokenizer.path).
    A killed job continues from its last complete shard.
    """
    teacher = require_teacher(recipe)
    run_dir = run_dir_of(recipe, output_dir)
    seed = recipe.seeds[0]
    data = build_lm_data(
        recipe.data,
        data_dir=data_dir,
        tokenizer_dir=run_dir / "tokenizer",
        may_train_tokenizer=False,
    )
    torch.manual_seed(seed)
    model = data.build_model(teacher.model, "teacher.model")
    checkpoint = _teacher_checkpoint(recipe)
    if checkpoint is None and teacher.model.path is None:
        checkpoint = trained_teacher(run_dir, seed)
    if checkpoint is not None:
        load_weights(model, checkpoint)
    check_same_tokenizer(
        model_tokenizer(teacher.model, checkpoint),
        data.tokenizer,
        where="teacher",
        role="teacher",
    )
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    spec = cache_spec(recipe, data, weights_fingerprint(model))
    return write_teacher_cache(
        cache_folder(recipe, run_dir, seed),
        spec,
        model.to(device),
        data.train,
        batch_size=recipe.train.eval_batch_size,
        shard_sequences=teacher.cache.shard_sequences,
        device=device,
        overwrite=overwrite,
    )
