"""kdistill vs TRL's GKDTrainer: language-model distillation speed and quality, one run.

    OMP_NUM_THREADS=1 KDISTILL_DATA=../shared/data python benchmarks/lm_vs_trl_gkd.py \
        --threads 1 --rounds 3 --json benchmarks/results_lm_vs_trl_gkd.json
    OMP_NUM_THREADS=1 KDISTILL_DATA=../shared/data python benchmarks/lm_vs_trl_gkd.py \
        --steps 3 --threads 1   # a smoke test, under a minute

The Shakespeare pair of recipes/shakespeare_gpt_small_from_gpt.yaml: the trained 4x256
GPT-2 teacher of runs/shakespeare_gpt_small_from_gpt (its Hugging Face folder
teacher/seed0/hf and the run's tokenizer) distilled into the recipe's 2x128 GPT-2
student by token-level forward KL(teacher ‖ student) at temperature 1, in one process,
on the CPU, in float32, with the same torch thread count, in this order:

  kdistill_live   kdistill.train.fit (LMSteps), live teacher (chunked loss from hidden states)
  kdistill_cache  kdistill.train.fit (LMSteps), the teacher's top-k (--top-k; of them
                  --tail-samples drawn from the teacher's tail, as the recipe's cache)
                  read from a cache written once before training by
                  kdistill.cache.write_teacher_cache
  trl_gkd         trl.experimental.gkd.GKDTrainer, live teacher, lmbda 0 (no student
                  generation: always the dataset's sequences), beta 0 (its
                  generalized_jsd_loss is then F.kl_div(student_logp, teacher_logp,
                  log_target=True) = KL(teacher ‖ student), kdistill's forward_kl),
                  temperature 1, seq_kd False

Same work for all: the student is built once (seed --seed) and saved with
save_pretrained, and every variant loads it from that folder; the teacher is loaded from
the same folder. The training sequences are the recipe's packed 128-token sequences
(kdistill.tasks.causal_lm.data.build_lm_data on data.corpus), in fit's epoch-0 order, 16 per step
(train.batch_size), one epoch (or the first --steps × 16 sequences, an epoch of
--steps steps). TRL reads them in that order (train_sampling_strategy="sequential"),
and the sequence indices each framework trained on are recorded and compared. TRL's
loss shifts labels inside the 128 input positions (logits[:, :-1] against
labels[:, 1:]), so it predicts 127 tokens per sequence; kdistill predicts 128 (the last
from the 129th token of the packed row), so that extra label is masked (-100) for
kdistill: both run the models over the same 128 tokens and count the same 127 × 16 =
2,032 tokens per step, and both divide the step's summed divergence by that count (for
TRL, label 0, never a target of its shifted loss, is masked too: transformers counts
the divisor over all labels for GPT2LMHeadModel, which would make it 2,048).
Both use the same optimizer object type and schedule: kdistill.optim.make_optimizer's
AdamW (train.optimizer: lr 5e-3, weight decay 0.01 on every parameter) and
kdistill.optim.lr_factor's cosine with 20 warmup steps, handed to GKDTrainer through
its `optimizers=` argument; gradient clipping at train.grad_clip (1.0) in both.
TRL runs with gradient_checkpointing False and bf16 False (SFTConfig defaults both to
True), no evaluation or saving, logging every 10 steps (its default), no progress bar.

Measured:
- training tokens/s: counted tokens / wall time of the training loop, from the end of
  the first optimizer step to the end of the last (a global torch optimizer step hook,
  the same for both frameworks), so model loading, optimizer and dataloader setup, the
  first step's one-time costs and everything after the last step (kdistill's
  end-of-epoch validation and checkpoint, TRL's end-of-training bookkeeping) are out;
  the counted tokens are those of steps 2..N. The whole train call (fit, or
  trainer.train()) is also reported, as call s.
- the cache write time (kdistill_cache) separately: it is paid once per teacher and
  dataset and is not in the training loop's time.
- final validation loss per token of each trained student by one function,
  `validation_loss` here: mean next-token cross-entropy (nats) of the Hugging Face
  model's logits over all validation sequences (128 predictions each). The teacher and
  the untrained student are measured with it too, for scale.
- the mean training loss per token over the steps, as each framework reports it (for
  the live variants both are forward KL on the same batches from the same start, so
  they should agree closely; the cache variant's is KL over the top-k buckets).
- ratios kdistill / TRL of tokens/s, and (kdistill − TRL) / TRL of validation loss.

Rounds: --rounds R runs every variant R times, interleaved (rounds 2, 4, … in reverse
order), and reports the median round's tokens/s per variant and the kdistill/TRL ratio
within each round (the two ran minutes apart, so a change in the machine's load hits
both); the training is the same in every round (same start, data, order and seed).

Remaining differences: load from other processes on the machine shows up as noise; TRL
passes an all-ones attention_mask to both models (kdistill passes none); kdistill
gives fit only the first validation sequence so that its own end-of-epoch
validation costs nothing (the common evaluation follows); TRL's per-step
bookkeeping (callbacks, FLOP and token counters, logging) is part of its loop, as
kdistill's is of its. kdistill computes the divergence from hidden states and the
output layers a chunk of tokens at a time, recomputing the logits in the backward
pass; TRL materialises both (B, T, V) logits. That difference is the point of the
comparison, not a confound. TRL trains with kdistill's optimizer and schedule, not with
what GKDConfig alone would build (transformers' AdamW without decay on biases and
LayerNorm weights, warmup from lr 0 instead of lr/20): the optimizer is not what is
compared.

TRL is imported only here (pip install trl); it is not a dependency of kdistill.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from rich.console import Console
from torch import Tensor
from torch.optim.optimizer import register_optimizer_step_post_hook
from transformers.utils import logging as transformers_logging

import kdistill
from kdistill.cache import TopKCacheSpec, open_topk_cache, write_teacher_cache
from kdistill.data.lm_text import IGNORE_INDEX, dataset_fingerprint
from kdistill.optim import lr_factor, make_optimizer
from kdistill.recipe import load_recipe
from kdistill.recipe.causal_lm import LMLossTerm, LMModelSpec, LMRecipe, LMTrainConfig
from kdistill.stages import make_accelerator
from kdistill.tasks.causal_lm.data import LMData, build_lm_data
from kdistill.tasks.causal_lm.models import (
    CausalLM,
    check_same_tokenizer,
    model_tokenizer,
    weights_fingerprint,
)
from kdistill.tasks.causal_lm.steps import LMObjective, LMSteps
from kdistill.teachers import CachedLMTeacher, LiveLMTeacher
from kdistill.train import fit

VARIANTS = ("kdistill_live", "kdistill_cache", "trl_gkd")
RECIPE = Path("recipes/shakespeare_gpt_small_from_gpt.yaml")
RUN = Path("runs/shakespeare_gpt_small_from_gpt")
FORWARD_KL = LMLossTerm(loss="forward_kl", weight=1.0, temperature=1.0)


@dataclass
class Setup:
    """What every variant shares: data, settings, teacher folder, the student's start."""

    recipe: LMRecipe
    data: LMData
    settings: LMTrainConfig  # the recipe's train section
    train: Tensor  # (N, seq_len + 1): the training sequences of this run
    order: Tensor  # (steps · batch,): fit's epoch-0 order of those sequences
    steps: int
    teacher_dir: Path
    tokenizer_file: Path
    student_dir: Path  # the untrained student, save_pretrained
    work: Path  # scratch folder for caches, fit's files and TRL's output_dir
    seed: int

    @property
    def tokens_per_step(self) -> int:
        """Counted tokens of one step: 127 of the 128 positions of each sequence."""
        return self.settings.batch_size * (self.data.seq_len - 1)

    def load_student(self) -> CausalLM:
        return self.data.build_model(LMModelSpec(path=str(self.student_dir)), "student")

    def load_teacher(self) -> CausalLM:
        return self.data.build_model(LMModelSpec(path=str(self.teacher_dir)), "teacher")


class StepClock:
    """perf_counter() after every optimizer step of any torch optimizer, while active."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def __enter__(self) -> StepClock:
        self._handle = register_optimizer_step_post_hook(
            lambda optimizer, args, kwargs: self.times.append(time.perf_counter())
        )
        return self

    def __exit__(self, *exc: object) -> None:
        self._handle.remove()

    def loop(self, steps: int, tokens_per_step: int) -> dict[str, float]:
        """Tokens/s from the end of step 1 to the end of the last step."""
        if len(self.times) != steps:
            raise RuntimeError(f"expected {steps} optimizer steps, saw {len(self.times)}")
        seconds = self.times[-1] - self.times[0]
        tokens = (steps - 1) * tokens_per_step
        return {"loop_seconds": seconds, "loop_tokens": tokens, "tokens_per_s": tokens / seconds}


# ------------------------------------------------------------------ the common evaluation


def validation_loss(model: Any, sequences: Tensor, *, batch_size: int = 64) -> float:
    """Mean next-token cross-entropy (nats per token) of a Hugging Face causal LM over
    packed sequences (N, T + 1): inputs row[:-1], labels row[1:], full logits."""
    was_training = model.training
    model.eval()
    total, tokens = 0.0, 0
    with torch.inference_mode():
        for start in range(0, len(sequences), batch_size):
            batch = sequences[start : start + batch_size]
            logits = model(input_ids=batch[:, :-1]).logits.float()  # (b, T, V)
            labels = batch[:, 1:]
            total += float(F.cross_entropy(logits.transpose(1, 2), labels, reduction="sum"))
            tokens += labels.numel()
    model.train(was_training)
    return total / tokens


# ------------------------------------------------------------------ setup


def prepare(args: argparse.Namespace, work: Path) -> Setup:
    """Read the recipe and the data, check the teacher, build and save the student."""
    recipe = load_recipe(args.recipe)
    teacher_dir = args.run / "teacher" / "seed0" / "hf"
    tokenizer_dir = args.run / "tokenizer"
    needed = (teacher_dir / "config.json", teacher_dir / "model.safetensors", tokenizer_dir)
    missing = [str(path) for path in needed if not path.exists()]
    if missing:
        raise SystemExit(
            f"missing {', '.join(missing)}: train the teacher first "
            f"(kdistill run {args.recipe} --set 'stages=[teacher]' --output-dir {args.run})"
        )
    data = build_lm_data(
        recipe.data,
        data_dir=args.data_dir,
        tokenizer_dir=tokenizer_dir,
        may_train_tokenizer=False,
    )
    check_same_tokenizer(
        model_tokenizer(LMModelSpec(path=str(teacher_dir)), None),
        data.tokenizer,
        where=str(teacher_dir),
        role="teacher",
    )
    settings = recipe.train
    batch = settings.batch_size
    steps = args.steps or len(data.train) // batch
    if steps < 2 or steps * batch > len(data.train):
        raise SystemExit(
            f"--steps must be in [2, {len(data.train) // batch}] (the training loop is timed "
            f"from the end of step 1; {len(data.train)} sequences of {batch} per step); "
            f"got {steps}"
        )
    train = data.train[: steps * batch] if args.steps else data.train
    # fit's epoch-0 order (kdistill.steps.order_seed: randperm seeded seed * 1009 + epoch)
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(args.seed * 1009))
    order = order[: steps * batch]

    assert recipe.student is not None
    torch.manual_seed(args.seed)
    student = data.build_model(recipe.student.model, "student.model")
    student_dir = work / "student_init"
    student.hf.save_pretrained(student_dir)
    return Setup(
        recipe=recipe,
        data=data,
        settings=settings,
        train=train,
        order=order,
        steps=steps,
        teacher_dir=teacher_dir,
        tokenizer_file=tokenizer_dir / "tokenizer.json",
        student_dir=student_dir,
        work=work,
        seed=args.seed,
    )


def make_scheduler(
    optimizer: torch.optim.Optimizer, settings: LMTrainConfig, steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """The schedule fit builds (kdistill.optim.lr_factor, floored at min_lr)."""
    cfg = settings.lr_schedule
    floor = cfg.min_lr / settings.optimizer.lr

    def factor(step: int) -> float:
        return max(lr_factor(cfg, step, steps, steps), floor)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# ------------------------------------------------------------------ kdistill


class RecordingTeacher:
    """Passes the teacher signal through and keeps the sequence indices of every step."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.rows: list[Tensor] = []

    def __call__(self, input_ids: Tensor, indices: Tensor) -> dict[str, Tensor | None]:
        self.rows.append(indices)
        return self.inner(input_ids, indices)


def run_kdistill(
    setup: Setup, signal: str, top_k: int, tail_samples: int
) -> tuple[dict[str, Any], Any, Tensor]:
    """Train with fit; return the measurements, the trained HF model, the rows seen."""
    teacher = setup.load_teacher()
    student = setup.load_student()
    record: dict[str, Any] = {}
    if signal == "live":
        inner: Any = LiveLMTeacher(teacher, precision="fp32")
    else:
        spec = TopKCacheSpec(
            teacher=weights_fingerprint(teacher),
            tokenizer=setup.data.tokenizer_fingerprint,
            dataset=dataset_fingerprint(
                setup.train,
                seq_len=setup.data.seq_len,
                tokenizer_fingerprint=setup.data.tokenizer_fingerprint,
            ),
            k=top_k,
            temperature=1.0,
            seq_len=setup.data.seq_len,
            num_sequences=len(setup.train),
            vocab_size=setup.data.vocab_size,
            tail_samples=tail_samples,
        )
        folder = setup.work / f"cache-top{top_k}"
        assert setup.recipe.teacher is not None
        info = write_teacher_cache(
            folder,
            spec,
            teacher,
            setup.train,
            batch_size=setup.settings.eval_batch_size,
            shard_sequences=setup.recipe.teacher.cache.shard_sequences,
            device="cpu",
            overwrite=True,
        )
        record["cache_write_seconds"] = info["seconds"]
        record["cache_mb"] = info["bytes"] / 1e6
        inner = CachedLMTeacher(open_topk_cache(folder, expect=spec), "cpu")
    teacher_signal = RecordingTeacher(inner)
    # TRL predicts 127 tokens of a 128-token input; mask kdistill's 128th label to match
    train = setup.train.clone()
    train[:, -1] = IGNORE_INDEX
    out_dir = setup.work / f"kdistill_{signal}"
    with StepClock() as clock:
        started = time.perf_counter()
        settings = setup.settings.model_copy(
            update={"epochs": 1, "eval_every": None, "checkpoint_every": None}
        )
        accelerator = make_accelerator("fp32")
        steps = LMSteps(
            student,
            train=train,
            val=setup.data.val[:1],  # its own end-of-epoch validation: negligible
            objective=LMObjective(divergence=FORWARD_KL),
            teacher=teacher_signal,
            settings=settings,
            vocab_size=setup.data.vocab_size,
            accelerator=accelerator,
            seed=setup.seed,
        )
        result = fit(
            student,
            steps,
            settings=settings,
            seed=setup.seed,
            out_dir=out_dir,
            accelerator=accelerator,
            quiet=True,
            console=Console(quiet=True),  # its epoch line shows the 1-sequence validation
            label=f"kdistill {signal}",
        )
        record["call_seconds"] = time.perf_counter() - started
    if result.units != setup.steps * setup.tokens_per_step:
        raise RuntimeError(f"fit counted {result.units} tokens, expected the same as TRL")
    record.update(clock.loop(setup.steps, setup.tokens_per_step))
    epoch = next(
        json.loads(line)
        for line in (out_dir / "metrics.jsonl").read_text().splitlines()
        if json.loads(line).get("split") == "train"
    )
    record["train_loss"] = epoch["loss"]
    return record, student.hf, torch.cat(teacher_signal.rows)


# ------------------------------------------------------------------ TRL


def run_trl(setup: Setup) -> tuple[dict[str, Any], Any, Tensor]:
    """Train with GKDTrainer; return the measurements, the trained model, the rows seen."""
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    try:
        from datasets import Dataset
        from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast
        from transformers.trainer_callback import PrinterCallback
        from trl.experimental.gkd import GKDConfig, GKDTrainer
    except ImportError as exc:
        raise SystemExit(f"the trl_gkd variant needs TRL (pip install trl): {exc}") from None
    from kdistill.tasks.causal_lm.models import EOS_TOKEN

    settings, batch = setup.settings, setup.settings.batch_size
    teacher = AutoModelForCausalLM.from_pretrained(setup.teacher_dir, dtype=torch.float32)
    student = AutoModelForCausalLM.from_pretrained(setup.student_dir, dtype=torch.float32)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_file=str(setup.tokenizer_file), eos_token=EOS_TOKEN, pad_token=EOS_TOKEN
    )
    inputs = setup.train[setup.order, :-1]  # (steps · batch, 128), in kdistill's order
    dataset = Dataset.from_dict({"input_ids": inputs.tolist(), "row": setup.order.tolist()})
    seen: list[Tensor] = []

    def collate(examples: list[dict[str, Any]]) -> dict[str, Tensor]:
        seen.append(torch.tensor([e["row"] for e in examples]))
        ids = torch.tensor([e["input_ids"] for e in examples])  # (B, T)
        labels = ids.clone()
        # GKDTrainer.compute_loss compares logits[:, :-1] with labels[:, 1:], so label 0 is
        # never a target; but transformers counts the step's tokens (num_items_in_batch,
        # the loss's divisor) over all labels for GPT2LMHeadModel (its loss_type is None),
        # 128 per sequence instead of 127. Masking label 0 makes the divisor the counted
        # tokens without changing what is computed.
        labels[:, 0] = IGNORE_INDEX
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}

    optimizer = make_optimizer(student, settings.optimizer)
    scheduler = make_scheduler(optimizer, settings, setup.steps)
    config = GKDConfig(
        output_dir=str(setup.work / "trl"),
        lmbda=0.0,
        beta=0.0,
        temperature=1.0,
        seq_kd=False,
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=1,
        max_steps=setup.steps,
        num_train_epochs=1,
        learning_rate=settings.optimizer.lr,  # the optimizer passed in is what is used
        weight_decay=settings.optimizer.weight_decay,
        lr_scheduler_type="cosine",
        warmup_steps=settings.lr_schedule.warmup_steps,
        max_grad_norm=settings.grad_clip or 0.0,
        max_length=setup.data.seq_len,
        train_sampling_strategy="sequential",
        dataloader_drop_last=True,
        dataloader_pin_memory=False,
        activation_checkpointing=False,  # SFTConfig's gradient_checkpointing defaults to True
        bf16=False,
        fp16=False,
        use_cpu=True,
        seed=setup.seed,
        eval_strategy="no",
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
    )
    trainer = GKDTrainer(
        model=student,
        teacher_model=teacher,
        args=config,
        data_collator=collate,
        train_dataset=dataset,
        processing_class=tokenizer,
        optimizers=(optimizer, scheduler),
    )
    assert not config.gradient_checkpointing and not config.bf16
    trainer.remove_callback(PrinterCallback)  # it prints every log dict to stdout
    record: dict[str, Any] = {}
    with StepClock() as clock:
        started = time.perf_counter()
        output = trainer.train()
        record["call_seconds"] = time.perf_counter() - started
    record.update(clock.loop(setup.steps, setup.tokens_per_step))
    record["train_loss"] = output.training_loss
    return record, trainer.model, torch.cat(seen)


# ------------------------------------------------------------------ main


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--recipe", type=Path, default=RECIPE)
    parser.add_argument("--run", type=Path, default=RUN, help="the run with the trained teacher")
    parser.add_argument("--data-dir", default=None, help="default: $KDISTILL_DATA")
    parser.add_argument("--steps", type=int, default=None, help="default: one epoch")
    parser.add_argument("--top-k", type=int, default=64, help="kdistill_cache: entries kept")
    parser.add_argument(
        "--tail-samples",
        type=int,
        default=32,
        help="kdistill_cache: of the top-k entries, how many are drawn from the teacher's "
        "tail (0: the plain top k with one tail bucket)",
    )
    parser.add_argument("--seed", type=int, default=0, help="student init and data order")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="run every variant this many times, interleaved (odd rounds in reverse "
        "order); tokens/s is the median round's",
    )
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    transformers_logging.disable_progress_bar()
    transformers_logging.set_verbosity_error()
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    variants = [v for v in VARIANTS if v in args.variants]  # kdistill first, TRL last

    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="kdistill-vs-trl-") as scratch:
        setup = prepare(args, Path(scratch))
        teacher_loss = validation_loss(setup.load_teacher().hf, setup.data.val)
        initial_loss = validation_loss(setup.load_student().hf, setup.data.val)
        rows_seen: dict[str, Tensor] = {}
        rounds: dict[str, list[dict[str, Any]]] = {variant: [] for variant in variants}
        for round_index in range(args.rounds):
            # odd rounds run the variants in reverse, so drift in the machine's load
            # (other jobs starting or ending) does not favour the variant that runs first
            ordered = variants if round_index % 2 == 0 else variants[::-1]
            for variant in ordered:
                print(f"round {round_index + 1}/{args.rounds}: running {variant} ...", flush=True)
                if variant == "trl_gkd":
                    record, model, rows = run_trl(setup)
                else:
                    record, model, rows = run_kdistill(
                        setup, variant.split("_")[1], args.top_k, args.tail_samples
                    )
                if torch.get_num_threads() != threads:
                    raise RuntimeError(
                        f"{variant} changed the torch thread count to "
                        f"{torch.get_num_threads()} (was {threads})"
                    )
                record["val_loss"] = validation_loss(model, setup.data.val)
                rounds[variant].append(record)
                rows_seen[variant] = rows
        for variant, records in rounds.items():
            # the median round's speed; the training itself is the same in every round
            speeds = [r["tokens_per_s"] for r in records]
            median = sorted(records, key=lambda r: r["tokens_per_s"])[len(records) // 2]
            results[variant] = {
                **median,
                "tokens_per_s_rounds": speeds,
                "val_loss_rounds": [r["val_loss"] for r in records],
            }
        for variant, rows in rows_seen.items():
            if not torch.equal(rows, setup.order):
                raise RuntimeError(f"{variant} trained on other sequences than fit's order")

    ratios: dict[str, float] = {}
    paired: dict[str, list[float]] = {}  # tokens/s ratio to TRL within each round
    trl = results.get("trl_gkd")
    for variant in ("kdistill_live", "kdistill_cache"):
        if trl is not None and variant in results:
            ratios[f"{variant}/trl_gkd tokens_per_s"] = (
                results[variant]["tokens_per_s"] / trl["tokens_per_s"]
            )
            paired[variant] = [
                ours / theirs
                for ours, theirs in zip(
                    results[variant]["tokens_per_s_rounds"], trl["tokens_per_s_rounds"]
                )
            ]
            ratios[f"{variant} vs trl_gkd val_loss relative difference"] = (
                results[variant]["val_loss"] - trl["val_loss"]
            ) / trl["val_loss"]

    data, settings = setup.data, setup.settings
    header = (
        f"Shakespeare: GPT-2 4x256 teacher ({args.run / 'teacher/seed0/hf'}, val loss "
        f"{teacher_loss:.4f}) -> GPT-2 2x128 student (untrained: {initial_loss:.4f}), forward "
        f"KL at T = 1; {setup.steps} steps of {settings.batch_size} x {data.seq_len}-token "
        f"sequences ({setup.tokens_per_step:,} counted tokens per step), AdamW lr "
        f"{settings.optimizer.lr:g} wd {settings.optimizer.weight_decay:g}, cosine, "
        f"{settings.lr_schedule.warmup_steps} warmup steps, clip {settings.grad_clip}; float32, "
        f"CPU, {threads} torch thread(s); validation: {len(data.val)} sequences "
        f"({len(data.val) * data.seq_len:,} tokens)"
    )
    print(f"\n{header}\n")
    print(
        "tokens/s: training loop from the end of step 1 to the end of the last step; "
        "call s: the whole fit / trainer.train() call. The top-k cache is written once "
        "before training; its time is listed apart and not counted in tokens/s.\n"
    )
    print("| variant | tokens/s | loop s | call s | cache write s | train loss | val loss/token |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for variant, r in results.items():
        cache = f"{r['cache_write_seconds']:.1f}" if "cache_write_seconds" in r else "—"
        print(
            f"| {variant} | {r['tokens_per_s']:,.0f} | {r['loop_seconds']:.1f} | "
            f"{r['call_seconds']:.1f} | {cache} | {r['train_loss']:.4f} | {r['val_loss']:.4f} |"
        )
    if ratios:
        print()
        for name, value in ratios.items():
            shown = f"{100 * value:+.3f} %" if "relative" in name else f"{value:.3f}"
            print(f"- {name}: {shown}")
        for variant, values in paired.items():
            shown = ", ".join(f"{v:.3f}" for v in values)
            print(f"- {variant}/trl_gkd tokens_per_s, round by round: {shown}")
    if args.json:
        from importlib.metadata import version

        record = {
            "header": header,
            "config": {
                "steps": setup.steps,
                "batch_size": settings.batch_size,
                "seq_len": data.seq_len,
                "tokens_per_step": setup.tokens_per_step,
                "top_k": args.top_k,
                "tail_samples": args.tail_samples,
                "seed": args.seed,
                "threads": threads,
                "rounds": args.rounds,
                "train_sequences": len(setup.train),
                "val_sequences": len(data.val),
            },
            "teacher_val_loss": teacher_loss,
            "initial_student_val_loss": initial_loss,
            "results": results,
            "ratios": ratios,
            "ratios_by_round": paired,
            "versions": {
                "kdistill": kdistill.__version__,
                "torch": torch.__version__,
                "transformers": version("transformers"),
                "trl": version("trl") if "trl_gkd" in results else None,
            },
            "machine": platform.platform(),
        }
        args.json.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
