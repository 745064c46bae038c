"""The stages of a language-model recipe, as `kdistill.lm.pipeline` runs them; the
memory of their chunked losses (`lm_loss_memory`) and of a top-k teacher cache
(`lm_cache_size`).
"""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from kdistill.plan.probes import SavedTensors, largest_layer, tensor_bytes, weight_storages
from kdistill.plan.results import LOSS_COPIES, NAIVE_LOSS_COPIES, CacheSize, LossMemory
from kdistill.plan.stage import (
    Probe,
    Session,
    StageSpec,
    epoch_rows,
    precision_autocast,
    step_rows,
    steps_in_epoch,
)


def lm_stages(
    recipe: Any, data_dir: str | Path | None, device: torch.device, steps: int
) -> tuple[list[StageSpec], int, str, list[str]]:
    from kdistill.lm.data import build_lm_data
    from kdistill.tasks.causal_lm import LMObjective

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


def lm_loss_memory(
    *,
    kind: str,
    tokens: int,
    hidden: int,
    head_rows: int,
    vocab: int,
    bias: bool,
    with_cross_entropy: bool,
    chunk_size: int | None,
) -> LossMemory:
    """The memory of a language-model loss over one micro-batch of `tokens` counted tokens,
    as kdistill.tasks.causal_lm computes it (chunked) and over full logits (naive).

    kind "cross_entropy" (chunked_cross_entropy: each chunk's logits are recomputed in the
    backward pass): LOSS_COPIES × chunk × head_rows float32 tensors, plus the gradient of
    the hidden states. A divergence (chunked_divergence): LOSS_COPIES × chunk × U, U the
    student's head rows with cross-entropy else the compared vocabulary, plus the
    gradients it stores in the forward pass, one set per output (divergence, and
    cross-entropy when weighted): hidden states (tokens, H), head weight and bias.
    """
    from kdistill.losses.lm import CHUNK_ELEMENTS

    copies = LOSS_COPIES[kind]
    if kind == "cross_entropy":
        columns = head_rows
        default = max(1, CHUNK_ELEMENTS // head_rows)
        stored = tokens * hidden * 4
    else:
        columns = head_rows if with_cross_entropy else vocab
        default = max(1, CHUNK_ELEMENTS // max(vocab, head_rows))
        outputs = 2 if with_cross_entropy else 1
        stored = outputs * (tokens * hidden + head_rows * hidden + (head_rows if bias else 0)) * 4
    chunk = min(chunk_size or default, max(tokens, 1))
    return LossMemory(
        kind=kind,
        tokens=tokens,
        vocab=columns,
        chunk_size=chunk,
        copies=copies,
        chunked_bytes=copies * chunk * columns * 4 + stored,
        naive_bytes=NAIVE_LOSS_COPIES[kind] * tokens * columns * 4,
    )


def lm_cache_size(recipe: Any, data: Any) -> CacheSize:
    """The top-k cache of the recipe's teacher over the training sequences, as
    kdistill.lm_cache writes it: bytes per token × tokens."""
    from kdistill.lm_cache import TopKCacheSpec, bytes_per_token, new_manifest

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
    per_token = bytes_per_token(new_manifest(spec))
    tokens = len(data.train) * data.seq_len
    compact = ", compact" if spec.encoding == "compact" else ""
    return CacheSize(
        "top-k",
        per_token * tokens,
        f"{per_token} bytes/token (top {spec.k}{compact}) × {tokens:,} tokens",
        in_use=recipe.teacher.signal == "cache",
    )


class _TopKStandIn:
    """In place of a cache that does not exist yet: top-k ids and log-probabilities of
    the right shapes and dtypes (as CachedLMTeacher returns them), for given rows."""

    def __init__(self, rows: Tensor, seq_len: int, vocab: int, k: int, temperature: float):
        from kdistill.lm_cache import teacher_topk

        self.position = {int(row): i for i, row in enumerate(rows.tolist())}
        generator = torch.Generator().manual_seed(0)
        ids, logprobs = [], []
        for _ in range(len(rows)):
            logits = torch.randn(1, seq_len, vocab, generator=generator)
            one_ids, one_logprobs = teacher_topk(logits, k=k, temperature=temperature)
            ids.append(one_ids.long())
            logprobs.append(one_logprobs.float())
        self.ids, self.logprobs = torch.cat(ids), torch.cat(logprobs)  # (n, T, k)

    def __call__(self, input_ids: Tensor, indices: Tensor) -> dict[str, Tensor | None]:
        where = torch.tensor([self.position[int(i)] for i in indices])
        return {
            "teacher_topk_ids": self.ids[where].to(input_ids.device),
            "teacher_topk_logprobs": self.logprobs[where].to(input_ids.device),
        }


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
    """One language-model stage as kdistill.lm.pipeline and fit_lm run it."""
    from kdistill.data.lm_text import IGNORE_INDEX
    from kdistill.lm.models import CausalLM
    from kdistill.lm.teachers import LiveLMTeacher
    from kdistill.losses.table import LM_DIVERGENCES
    from kdistill.optim import make_optimizer
    from kdistill.tasks.causal_lm import step_losses

    spec, where = trained
    teacher_cfg = recipe.teacher
    reads_teacher = objective.needs_teacher
    live = reads_teacher and teacher_cfg.signal == "live"
    precision = (teacher_cfg.precision or "fp32") if teacher_cfg is not None else "fp32"
    n_train = len(data.train)
    steps_per_epoch = steps_in_epoch(n_train, settings, name, "sequences")
    micro = settings.batch_size // settings.grad_accum
    order = epoch_rows(n_train, seed)

    def build_model(model_spec: Any, model_where: str) -> CausalLM:
        return data.build_model(model_spec, model_where)

    stand_in = None
    if reads_teacher and not live:
        used = torch.cat(
            [step_rows(order, i, settings.batch_size, steps_per_epoch) for i in range(steps + 1)]
        ).unique()
        divergence = objective.divergence
        temperature = divergence.temperature if divergence.temperature else 1.0
        stand_in = _TopKStandIn(
            used,
            data.seq_len,
            data.vocab_size,
            teacher_cfg.cache.top_k,
            float(getattr(temperature, "start", temperature)),
        )
    head: dict[str, int] = {}  # the student's output layer, noted by the first build

    def labels_of(rows: Tensor | slice) -> Tensor:
        """The training labels of `rows`: their own with prompt/completion pairs (-100 on
        the prompt and padding), else the packed sequences shifted by one."""
        return data.train[rows, 1:] if data.train_labels is None else data.train_labels[rows]

    def loss(micro_batch: int) -> LossMemory:
        tokens = int((labels_of(slice(0, micro_batch)) != IGNORE_INDEX).sum())
        if objective.divergence is None:
            kind, with_ce = "cross_entropy", False
        else:
            kind = LM_DIVERGENCES[objective.divergence.loss]
            with_ce = objective.ce_weight is not None and objective.at(0.0)[0] > 0
        return lm_loss_memory(
            kind=kind,
            tokens=tokens,
            hidden=head["hidden"],
            head_rows=head["rows"],
            vocab=data.vocab_size,
            bias=bool(head["bias"]),
            with_cross_entropy=with_ce,
            chunk_size=settings.chunk_size,
        )

    def build() -> Session:
        torch.manual_seed(seed)
        model = build_model(spec, where).to(device)
        head.update(
            hidden=int(model.head_weight.shape[1]),
            rows=model.vocab_rows,
            bias=int(model.head_bias is not None),
        )
        signal: Any = None
        teachers: list[nn.Module] = []
        if live:
            teacher = LiveLMTeacher(
                build_model(teacher_cfg.model, "teacher.model"), precision=precision
            ).to(device)
            teachers = [teacher.model]
            signal = teacher
        elif reads_teacher:
            signal = stand_in
        optimizer = make_optimizer(model, settings.optimizer)

        def micro_step(rows: Tensor, scale: float, counter: SavedTensors | None = None) -> Probe:
            inputs = data.train[rows, :-1].to(device)
            labels = labels_of(rows).to(device)
            with largest_layer(teachers) as layer:
                teacher_out = signal(inputs, rows) if signal is not None else None
            handed = tensor_bytes(teacher_out, weight_storages(teachers))
            with (
                counter or contextlib.nullcontext(),
                precision_autocast(settings.precision, device),
            ):
                hidden = model(inputs)  # (b, T, H)
            if counter is not None:
                counter.add(hidden)
            total, _ = step_losses(
                hidden,
                model.head_weight,
                model.head_bias,
                labels,
                objective=objective,
                progress=0.0,
                teacher=teacher_out,
                vocab_size=data.vocab_size,
                chunk_size=settings.chunk_size,
            )
            if counter is None:
                (total * scale).backward()
                return Probe(0, 0, handed, layer[0])
            with counter.gradients_during(model.parameters()):
                (total * scale).backward()
            return Probe(
                counter.bytes,
                counter.backward_bytes,
                handed,
                layer[0],
                backward_bytes=counter.backward_with_gradients,
            )

        def step(i: int) -> None:
            model.train()
            rows = step_rows(order, i, settings.batch_size, steps_per_epoch)
            counted = int((labels_of(rows) != IGNORE_INDEX).sum())
            for part in rows.chunk(settings.grad_accum):
                micro_step(part, 1.0 / max(counted, 1))
            if settings.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        def probe() -> Probe:
            model.train()
            rows = step_rows(order, 0, settings.batch_size, steps_per_epoch)[:micro]
            result = micro_step(rows, 1.0, SavedTensors([model, *teachers]))
            optimizer.zero_grad(set_to_none=True)
            return result

        return Session(model, teachers, optimizer, step, probe)

    cache = lm_cache_size(recipe, data) if reads_teacher else None
    return StageSpec(
        name=name,
        where=where,
        prefix=prefix,
        settings=settings,
        teacher=("teacher.model" if live else "cache") if reads_teacher else None,
        build=build,
        steps_per_epoch=steps_per_epoch,
        loss=loss,
        cache=cache,
        options={
            "task": "causal_lm",
            "teacher_precision": precision if live else None,
            "cache_possible": bool(
                live
                and (
                    getattr(recipe, "on_policy", None) is None or recipe.on_policy.probability == 0
                )
            ),
        },
    )
