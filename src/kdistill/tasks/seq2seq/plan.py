"""The stages of a translation recipe, as `kdistill.tasks.seq2seq.pipeline` runs them,
for `kdistill plan`.

Each stage's micro-step is the real `Seq2SeqSteps.loss` (its padded batch, the live
teacher when the stage reads one, or the real cache reader over a stand-in of the
top-k cache's shapes when the distill stage reads the cache, the chunked loss inside
the student's forward) with
the plan's probes around it; batches come in length buckets, so the timed steps use
the epoch's own order and one untimed step on the longest pairs sets the peak. The
seqkd stages are planned on the references (the teacher's translations do not exist
yet; they are about as long), without the translation pass before them.
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

if TYPE_CHECKING:
    from kdistill.cache import TopKCache

from kdistill.plan.stage import (
    PlanPlacement,
    Probe,
    Session,
    StageSpec,
    steps_in_epoch,
    training_step,
)


def seq2seq_stages(
    recipe: Any, data_dir: str | Path | None, device: torch.device, steps: int
) -> tuple[list[StageSpec], int, str, list[str]]:
    """The trained stages: teacher, baseline, distill, seqkd, seqkd_distill."""
    from kdistill.losses.lm_objective import LMObjective
    from kdistill.tasks.seq2seq.data import load_seq2seq
    from kdistill.tasks.seq2seq.models import build_model

    with tempfile.TemporaryDirectory(prefix="kdistill-plan-") as folder:
        data = load_seq2seq(recipe.data, data_dir, tokenizer_dir=Path(folder))
    data_bytes = sum(
        sum(t.numel() * 8 for t in rows)
        for split in ("train", "val", "test")
        for rows in (data.split(split).sources, data.split(split).targets)
    )
    described = (
        f"{len(data.train):,} train + {len(data.val):,} val pairs, target vocabulary "
        f"{data.tokenizers.target.get_vocab_size()}"
    )
    specs: list[StageSpec] = []
    notes: list[str] = []
    teacher_cfg, seed = recipe.teacher, recipe.seeds[0]
    untrained_teacher = None
    if teacher_cfg is not None:
        torch.manual_seed(seed)
        untrained_teacher = build_model(teacher_cfg.model, data.tokenizers, where="teacher.model")
    for name in recipe.stages:
        if name == "teacher":
            if teacher_cfg.pretrained:
                notes.append("teacher: weights from teacher.checkpoint / model.path, not trained")
                continue
            specs.append(
                _stage(
                    data, name, (teacher_cfg.model, "teacher.model"), LMObjective(ce_weight=1.0),
                    recipe.teacher_train(), "teacher.train", device, seed, None, None,
                    cache=None, recipe=recipe, steps=steps,
                )
            )  # fmt: skip
            continue
        word_kd = name in ("distill", "seqkd_distill")
        objective = LMObjective.of(recipe.objective) if word_kd else LMObjective(ce_weight=1.0)
        # the distill stage is the one that may read the teacher's top-k cache
        cache = _cache_size(recipe, data) if name == "distill" and word_kd else None
        stage = _stage(
            data, name, (recipe.student.model, "student.model"), objective, recipe.train,
            "train", device, seed, untrained_teacher,
            teacher_cfg.precision if teacher_cfg is not None else None,
            cache=cache, recipe=recipe, steps=steps,
        )  # fmt: skip
        if name.startswith("seqkd"):
            stage.notes.append(
                "planned on the references; the teacher's translation pass before it is not planned"
            )
        specs.append(stage)
    return specs, data_bytes, described, notes


def _stage(
    data: Any,
    name: str,
    trained: tuple[Any, str],
    objective: Any,
    settings: Any,
    prefix: str,
    device: torch.device,
    seed: int,
    teacher_model: Any,
    precision: str | None,
    *,
    cache: CacheSize | None,
    recipe: Any,
    steps: int,
) -> StageSpec:
    from kdistill.optim import make_optimizer
    from kdistill.tasks.seq2seq.data import bucketed_order
    from kdistill.tasks.seq2seq.models import build_model
    from kdistill.tasks.seq2seq.steps import LiveSeq2SeqTeacher, Seq2SeqSteps
    from kdistill.tasks.seq2seq.teacher_cache import CachedSeq2SeqTeacher

    spec, where = trained
    reads = objective.needs_teacher
    cached = reads and cache is not None and cache.in_use
    n_train = len(data.train)
    steps_per_epoch = steps_in_epoch(n_train, settings, name, "pairs")
    micro = settings.batch_size // settings.grad_accum
    order = bucketed_order(
        data.train.target_lengths, torch.Generator().manual_seed(seed), settings.batch_size
    )
    longest = torch.argsort(data.train.target_lengths, descending=True, stable=True)
    head: dict[str, int] = {}
    stand_in = None
    if cached:  # the cache's rows that the planned steps read, of its shapes
        used = torch.cat(
            [order[: (steps + 1) * settings.batch_size], longest[: settings.batch_size]]
        )
        stand_in = TopKStandIn(
            used.unique(), data.section.max_target_length,
            data.tokenizers.target.get_vocab_size(), recipe.teacher.cache.top_k,
            recipe.cache_temperature(),
        )  # fmt: skip

    def build() -> Session:
        torch.manual_seed(seed)
        model = build_model(spec, data.tokenizers, where=where, teacher=teacher_model).to(device)
        head.update(hidden=int(model.head_weight.shape[1]), rows=model.vocab_rows)
        head.update(bias=int(model.head_bias is not None))
        teachers: list[nn.Module] = []
        recorded = None
        if stand_in is not None:
            recorded = RecordedSignal(CachedSeq2SeqTeacher(cast("TopKCache", stand_in), device))
        elif reads:
            dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(
                precision or "", torch.float32
            )
            import copy

            live = LiveSeq2SeqTeacher(copy.deepcopy(teacher_model).to(device), dtype=dtype)
            teachers = [live.model]
            recorded = RecordedSignal(live)
        optimizer = make_optimizer(model, settings.optimizer)
        steps = Seq2SeqSteps(
            model, train=data.train, val=data.val, objective=objective, teacher=recorded,
            settings=settings, accelerator=PlanPlacement(device, settings.precision),
            pad_id=data.pad_id, start_id=model.start_id,
            vocab_size=data.tokenizers.target.get_vocab_size(),
            greedy_max_new_tokens=1, val_sentences=1, label=name,
        )  # fmt: skip

        def micro_step(rows: Tensor, scale: float, counter: SavedTensors | None = None) -> Probe:
            def loss(student: nn.Module) -> Tensor:
                return steps.loss(student, rows, progress=0.0)[0]

            return probed_token_step(loss, model, scale, recorded, teachers, counter)

        def rows_of(i: int) -> Tensor:
            step = i % steps_per_epoch
            return order[step * settings.batch_size : (step + 1) * settings.batch_size]

        def step(i: int) -> None:
            rows = rows_of(i)
            scale = 1.0 / max(steps.count(rows, rows, i).total, 1)
            training_step(model, optimizer, settings, rows, lambda part: micro_step(part, scale))

        def heaviest() -> None:
            rows = longest[: settings.batch_size]
            scale = 1.0 / max(steps.count(rows, rows, 0).total, 1)
            training_step(model, optimizer, settings, rows, lambda part: micro_step(part, scale))

        def probe() -> Probe:
            model.train()
            result = micro_step(longest[:micro], 1.0, SavedTensors([model, *teachers]))
            optimizer.zero_grad(set_to_none=True)
            return result

        return Session(model, teachers, optimizer, step, probe, heaviest=heaviest)

    return StageSpec(
        name=name,
        where=where,
        prefix=prefix,
        settings=settings,
        teacher=("cache" if cached else "teacher.model") if reads else None,
        build=build,
        steps_per_epoch=steps_per_epoch,
        loss=functools.partial(_loss_memory, data, objective, settings, head, longest),
        cache=cache,
        options={
            "teacher_precision": precision if reads and not cached else None,
            "cache_setting": "teacher.signal: cache (--set teacher.signal=cache)"
            if cache is not None and not cached
            else None,
        },
    )


def _cache_size(recipe: Any, data: Any) -> CacheSize:
    """The teacher's top-k cache of the training pairs, as the run writes it (every pair
    is one cache sequence of the target length limit)."""
    from kdistill.tasks.seq2seq.teacher_cache import cache_spec

    spec = cache_spec(recipe, data, "plan")
    return topk_cache_size(spec, in_use=recipe.reads_teacher_cache(), unit="position")


def _loss_memory(
    data: Any, objective: Any, settings: Any, head: dict[str, int], longest: Tensor, micro: int
) -> LossMemory:
    """The chunked loss over a micro-batch of the longest pairs."""
    tokens = int(data.train.target_lengths[longest[:micro]].sum())
    return objective_loss_memory(
        objective, settings, head, tokens, data.tokenizers.target.get_vocab_size()
    )
