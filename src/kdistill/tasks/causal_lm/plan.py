"""The stages of a language-model recipe, as `kdistill.tasks.causal_lm.pipeline` runs them, for
`kdistill plan`; the size of a top-k teacher cache (`lm_cache_size`).

Each stage's micro-step is the real `LMSteps.loss` (kdistill.tasks.causal_lm.steps): its rows
and labels, the teacher signal the recipe asks for (the live teacher, or the cache
reader over a stand-in for a cache not written yet) and the chunked loss computed
inside the student's forward, with the plan's probes around it.
"""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import Tensor, nn

from kdistill.plan.probes import RecordedSignal, SavedTensors
from kdistill.plan.results import CacheSize, LossMemory
from kdistill.plan.sequence import (
    TopKStandIn,
    objective_loss_memory,
    probed_token_step,
    topk_cache_size,
)
from kdistill.plan.stage import (
    PlanPlacement,
    Probe,
    Session,
    StageSpec,
    epoch_rows,
    step_rows,
    steps_in_epoch,
    training_step,
)

if TYPE_CHECKING:
    from kdistill.cache import TopKCache


def lm_stages(
    recipe: Any, data_dir: str | Path | None, device: torch.device, steps: int
) -> tuple[list[StageSpec], int, str, list[str]]:
    """The trained stages of a language-model recipe, in the order kdistill.tasks.causal_lm.pipeline
    runs them: teacher, baseline, seqkd, distill."""
    from kdistill.tasks.causal_lm.data import build_lm_data
    from kdistill.tasks.causal_lm.steps import LMObjective

    with tempfile.TemporaryDirectory(prefix="kdistill-plan-") as folder:
        data = build_lm_data(recipe.data, data_dir=data_dir, tokenizer_dir=Path(folder))
    data_bytes = data.train.nbytes + data.val.nbytes
    described = (
        f"{len(data.train)} train + {len(data.val)} val sequences of {data.seq_len} tokens, "
        f"vocabulary {data.vocab_size}"
    )
    specs: list[StageSpec] = []
    notes: list[str] = []
    teacher = recipe.teacher
    seed = recipe.seeds[0]
    ce = LMObjective(ce_weight=1.0)
    for name in recipe.stages:
        if name == "teacher":
            assert teacher is not None
            if teacher.pretrained:
                notes.append("teacher: weights from teacher.checkpoint / model.path, not trained")
                continue
            specs.append(
                _lm_stage(
                    recipe, data, name, (teacher.model, "teacher.model"), ce,
                    recipe.teacher_train(), "teacher.train", device, steps, seed,
                )
            )  # fmt: skip
        elif name in ("baseline", "seqkd"):
            assert recipe.student is not None
            stage = _lm_stage(
                recipe, data, name, (recipe.student.model, "student.model"), ce,
                recipe.train, "train", device, steps, seed,
            )  # fmt: skip
            if name == "seqkd":
                stage.notes.append(
                    "planned as cross-entropy on sequences of data.seq_len tokens; the "
                    "teacher's generation pass before it is not planned"
                )
            specs.append(stage)
        elif name == "distill":
            assert recipe.student is not None
            stage = _lm_stage(
                recipe, data, name, (recipe.student.model, "student.model"),
                LMObjective.of(recipe.objective), recipe.train, "train", device, steps, seed,
            )  # fmt: skip
            if getattr(recipe, "on_policy", None) is not None:
                stage.notes.append("on-policy sampling steps are not planned")
            specs.append(stage)
    return specs, data_bytes, described, notes


def lm_cache_size(recipe: Any, data: Any) -> CacheSize:
    """The top-k cache of the recipe's teacher over the training sequences, as
    kdistill.cache.topk writes it: bytes per token × tokens."""
    from kdistill.cache.manifest import TopKCacheSpec

    assert recipe.teacher is not None
    term = recipe.divergence()
    temperature = term.temperature if term is not None and term.temperature else 1.0
    spec = TopKCacheSpec(
        teacher="plan",
        tokenizer="plan",
        dataset="plan",
        k=recipe.teacher.cache.top_k,
        temperature=float(getattr(temperature, "start", temperature)),
        seq_len=data.seq_len,
        num_sequences=len(data.train),
        vocab_size=data.vocab_size,
        encoding=recipe.teacher.cache.encoding,
    )
    return topk_cache_size(spec, in_use=recipe.teacher.signal == "cache")


def _lm_stage(
    recipe: Any,
    data: Any,
    name: str,
    trained: tuple[Any, str],
    objective: Any,
    settings: Any,
    prefix: str,
    device: torch.device,
    steps: int,
    seed: int,
) -> StageSpec:
    """One language-model stage as kdistill.tasks.causal_lm.pipeline and fit run it: the stage's own
    micro-step (LMSteps.loss: its rows, teacher signal and chunked loss inside the
    student's forward) with the plan's probes around it."""
    from kdistill.optim import make_optimizer
    from kdistill.tasks.causal_lm.steps import LMSteps

    spec, where = trained
    teacher_cfg = recipe.teacher
    reads_teacher = objective.needs_teacher
    live = reads_teacher and teacher_cfg.signal == "live"
    precision = (teacher_cfg.precision or "fp32") if teacher_cfg is not None else "fp32"
    n_train = len(data.train)
    steps_per_epoch = steps_in_epoch(n_train, settings, name, "sequences")
    micro = settings.batch_size // settings.grad_accum
    order = epoch_rows(n_train, seed)
    stand_in = None
    if reads_teacher and not live:
        used = [step_rows(order, i, settings.batch_size, steps_per_epoch) for i in range(steps + 1)]
        stand_in = _top_k_stand_in(torch.cat(used).unique(), data, teacher_cfg, objective)
    head: dict[str, int] = {}  # the student's output layer, noted by the first build

    pruned_from = None
    if spec.prune is not None and teacher_cfg is not None:  # cut from an untrained teacher
        pruned_from = data.build_model(teacher_cfg.model, "teacher.model")

    def build() -> Session:
        torch.manual_seed(seed)
        model = data.build_model(spec, where, pruned_from).to(device)
        head.update(
            hidden=int(model.head_weight.shape[1]),
            rows=model.vocab_rows,
            bias=int(model.head_bias is not None),
        )
        signal: Any = None
        teachers: list[nn.Module] = []
        if reads_teacher:
            signal, teachers = _teacher_signal(data, teacher_cfg, precision, stand_in, device)
        optimizer = make_optimizer(model, settings.optimizer)
        recorded = RecordedSignal(signal) if signal is not None else None
        lm_steps = LMSteps(
            model,
            train=data.train,
            train_labels=data.train_labels,
            val=data.val,
            val_labels=data.val_labels,
            objective=objective,
            teacher=recorded,
            settings=settings,
            vocab_size=data.vocab_size,
            accelerator=PlanPlacement(device, settings.precision),
            seed=seed,
            label=name,
        )

        def micro_step(rows: Tensor, scale: float, counter: SavedTensors | None = None) -> Probe:
            def loss(student: nn.Module) -> Tensor:
                return lm_steps.loss(student, rows, progress=0.0)[0]

            return probed_token_step(loss, model, scale, recorded, teachers, counter)

        def step(i: int) -> None:
            rows = step_rows(order, i, settings.batch_size, steps_per_epoch)
            # fit divides the step's summed loss by its counted tokens
            scale = 1.0 / max(lm_steps.count(rows, rows, i).total, 1)
            training_step(model, optimizer, settings, rows, lambda part: micro_step(part, scale))

        def probe() -> Probe:
            model.train()
            rows = step_rows(order, 0, settings.batch_size, steps_per_epoch)[:micro]
            result = micro_step(rows, 1.0, SavedTensors([model, *teachers]))
            optimizer.zero_grad(set_to_none=True)
            return result

        return Session(model, teachers, optimizer, step, probe)

    return StageSpec(
        name=name,
        where=where,
        prefix=prefix,
        settings=settings,
        teacher=("teacher.model" if live else "cache") if reads_teacher else None,
        build=build,
        steps_per_epoch=steps_per_epoch,
        loss=functools.partial(_loss_memory, data, objective, settings, head),
        cache=lm_cache_size(recipe, data) if reads_teacher else None,
        options={
            "teacher_precision": precision if live else None,
            # the setting that takes the teacher out of memory, where this stage can
            "cache_setting": "teacher.signal: cache (--set teacher.signal=cache)"
            if live
            and (getattr(recipe, "on_policy", None) is None or recipe.on_policy.probability == 0)
            else None,
        },
    )


def _teacher_signal(
    data: Any,
    teacher_cfg: Any,
    precision: str,
    stand_in: TopKStandIn | None,
    device: torch.device,
) -> tuple[Any, list[nn.Module]]:
    """(the teacher signal the recipe asks for, the frozen models it runs): the (untrained)
    live teacher, or the real cache reader over the stand-in for the top-k cache."""
    from kdistill.teachers import CachedLMTeacher, LiveLMTeacher

    if stand_in is None:
        teacher = LiveLMTeacher(
            data.build_model(teacher_cfg.model, "teacher.model"), precision=precision
        ).to(device)
        return teacher, [teacher.model]
    return CachedLMTeacher(cast("TopKCache", stand_in), device), []


def _top_k_stand_in(rows: Tensor, data: Any, teacher_cfg: Any, objective: Any) -> TopKStandIn:
    """The stand-in for the top-k cache over `rows`, at the divergence's first temperature
    (the one the cache is written at)."""
    divergence = objective.divergence
    temperature = divergence.temperature if divergence.temperature else 1.0
    return TopKStandIn(
        rows,
        data.seq_len,
        data.vocab_size,
        teacher_cfg.cache.top_k,
        float(getattr(temperature, "start", temperature)),
    )


def _loss_memory(
    data: Any, objective: Any, settings: Any, head: dict[str, int], micro_batch: int
) -> LossMemory:
    """The stage's loss over a micro-batch of `micro_batch` training rows (the first
    ones), for the student's output layer `head` (noted by a build)."""
    from kdistill.data.lm_text import IGNORE_INDEX

    # their own labels with prompt/completion pairs (-100 on the prompt and padding),
    # else the packed sequences shifted by one
    labels = (
        data.train[:micro_batch, 1:]
        if data.train_labels is None
        else data.train_labels[:micro_batch]
    )
    tokens = int((labels != IGNORE_INDEX).sum())
    return objective_loss_memory(objective, settings, head, tokens, data.vocab_size)
