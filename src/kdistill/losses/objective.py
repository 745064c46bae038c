"""The objective: a weighted sum of loss terms whose weights and temperatures follow schedules.

Each term names a pure loss function from `LOSSES`. What a term reads is decided by
the function's signature: `student_logits` always, `teacher_logits` and `labels`
when the function takes them. Feature losses take `student_feature` and
`teacher_feature` instead: tensors read by forward hooks at the module paths the
term names (see `kdistill.taps`), after a projector where shapes differ. CRD is a
module with state (memory banks) and reads the samples' dataset indices.

The objective returns the *sum* over the micro-batch; the training loop divides by
the global number of samples in the optimizer step, so the gradient does not depend
on how a batch is split across accumulation steps or processes. (Losses over
relations between the samples of a batch (similarity, RKD, PKT, CC, CRD's negatives
aside) do depend on which samples share a micro-batch, by their definition.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from kdistill import taps as tapping
from kdistill.errors import LossInputError
from kdistill.losses.crd import CRDMemory
from kdistill.losses.logits import inputs_already_checked
from kdistill.losses.table import (
    _ATTENTION_MAP_LOSSES,
    _NEEDS_EQUAL_SHAPES,
    _TOKEN_LOSSES,
    LOSSES,
    is_feature_loss,
    reads_teacher,
    takes,
)
from kdistill.losses.temperature import LearnableTemperature, reversal_strength
from kdistill.recipe import LossTerm, TapSpec
from kdistill.schedules import LearnedTemperature, as_schedule, schedule_value


@dataclass
class LossInputs:
    """What the objective may read at one step."""

    student_logits: torch.Tensor  # (B, C)
    labels: torch.Tensor | None = None  # (B,)
    teacher_logits: torch.Tensor | None = None  # (B, C)
    indices: torch.Tensor | None = None  # (B,) rows of the training split, for CRD
    attention_mask: torch.Tensor | None = None  # (B, T) text batches, for token losses


class Objective:
    """Sum of weighted loss terms. Call with the inputs and the training progress in [0, 1].

    Returns (total, parts): `total` is the weighted sum over the micro-batch (reduction
    "sum"), `parts` the unweighted per-term sums, detached, for logging.

    Feature terms need `bind` first: it hooks the tapped modules of the student and the
    live teachers, runs one dry forward pass to learn the shapes, and builds the
    projectors and CRD modules (returned, to train with the student). `unbind` removes
    the hooks.
    """

    def __init__(self, terms: list[LossTerm]) -> None:
        if not terms:
            raise LossInputError("an objective needs at least one loss term")
        self.terms = terms
        self.names = self._unique_names(terms)
        self._checked: set[int] = set()  # terms whose loss has passed its input checks
        # resolved once: __call__ runs every step
        self._weights = [as_schedule(t.weight) for t in terms]
        self._temperatures = [
            None
            if t.temperature is None or isinstance(t.temperature, LearnedTemperature)
            else as_schedule(t.temperature)
            for t in terms
        ]
        # CTKD: a temperature trained with the student, against it (losses/temperature.py)
        self._learned: dict[int, tuple[LearnableTemperature, LearnedTemperature]] = {}
        for i, term in enumerate(terms):
            if isinstance(term.temperature, LearnedTemperature):
                spec = term.temperature
                module = LearnableTemperature(low=spec.low, high=spec.high, start=spec.initial())
                self._learned[i] = (module, spec)
        self._reads = [(takes(t.loss, "teacher_logits"), takes(t.loss, "labels")) for t in terms]
        self.feature_terms = [i for i, t in enumerate(terms) if is_feature_loss(t.loss)]
        self.needs_teacher = any(reads_teacher(t) for t in terms)
        self.needs_labels = any(takes(t.loss, "labels") for t in terms)
        self._pairs: dict[int, list[tuple[TapSpec, TapSpec]]] = {}
        self._members: dict[int, str] = {}
        self._student_taps: tapping.Taps | None = None
        self._teacher_taps: dict[str, tapping.Taps] = {}
        self.extras = self._learned_modules()

    def _learned_modules(self) -> nn.ModuleDict:
        """The learned temperatures, under the names they are saved with in checkpoints."""
        return nn.ModuleDict({f"term{i}_temperature": m for i, (m, _) in self._learned.items()})

    def temperatures(self) -> dict[str, float]:
        """The learned temperatures' current values, by term name."""
        return {self.names[i]: module.value for i, (module, _) in self._learned.items()}

    @staticmethod
    def _unique_names(terms: list[LossTerm]) -> list[str]:
        names: list[str] = []
        for term in terms:
            name, k = term.loss, 2
            while name in names:
                name, k = f"{term.loss}_{k}", k + 1
            names.append(name)
        return names

    def weights(self, progress: float) -> dict[str, float]:
        return {n: schedule_value(w, progress) for n, w in zip(self.names, self._weights)}

    # ------------------------------------------------------------------ features

    def bind(
        self,
        student: nn.Module,
        teachers: dict[str, nn.Module],
        *,
        sample: Any,
        num_train: int,
        seed: int = 0,
        teacher_sample: Any = None,
    ) -> nn.ModuleDict:
        """Hook the feature terms' modules and build their projectors and CRD modules."""
        self.unbind()
        student_specs: list[TapSpec] = []
        teacher_specs: dict[str, list[TapSpec]] = {}
        for i in self.feature_terms:
            term = self.terms[i]
            member = self._member(i, teachers)
            if member not in teachers:
                raise LossInputError(
                    f"loss {term.loss!r} reads features of teacher {member!r}, but this stage's "
                    f"teachers are: {', '.join(teachers)}"
                )
            if term.loss in _ATTENTION_MAP_LOSSES:
                _check_attention_maps(i, term.loss, "student", student)
                _check_attention_maps(i, term.loss, f"teacher {member!r}", teachers[member])
            pairs = self._layer_pairs(term, student, teachers[member])
            self._pairs[i] = pairs
            student_specs += [s for s, _ in pairs]
            teacher_specs.setdefault(member, []).extend(t for _, t in pairs)
        student_taps = _unique(student_specs)
        student_shapes = tapping.dry_run(student, sample, student_taps, where="student")
        teacher_shapes = {
            member: tapping.dry_run(
                teachers[member],
                _as_dtype(sample if teacher_sample is None else teacher_sample, teachers[member]),
                _unique(specs),
                where=f"teacher {member!r}",
            )
            for member, specs in teacher_specs.items()
        }
        self._student_taps = tapping.Taps(student, student_taps, where="student").attach()
        for member, specs in teacher_specs.items():
            self._teacher_taps[member] = tapping.Taps(
                teachers[member], _unique(specs), where=f"teacher {member!r}"
            ).attach()
        generator = torch.Generator().manual_seed(seed)
        extras = self._learned_modules()
        for i in self.feature_terms:
            term = self.terms[i]
            member = self._member(i, teachers)
            for j, (s_spec, t_spec) in enumerate(self._pairs[i]):
                s_shape = student_shapes[_key(s_spec)]
                t_shape = teacher_shapes[member][_key(t_spec)]
                if term.loss == "crd":
                    options = dict(term.params)
                    if term.temperature is not None:
                        assert not isinstance(term.temperature, LearnedTemperature)  # refused
                        options["temperature"] = as_schedule(term.temperature).start
                    extras[f"term{i}_crd"] = CRDMemory(
                        _width(s_shape), _width(t_shape), num_train, generator=generator, **options
                    )
                    continue
                kind = term.projector
                if kind == "auto":
                    kind = "auto" if term.loss in _NEEDS_EQUAL_SHAPES else "none"
                if kind == "none":
                    continue
                projector = tapping.make_projector(
                    s_shape,
                    t_shape,
                    kind=kind,
                    student_path=s_spec.path,
                    teacher_path=t_spec.path,
                )
                if projector is not None:
                    extras[f"term{i}_pair{j}"] = projector
        self.extras = extras.to(_device(student))
        return self.extras

    def _member(self, i: int, teachers: dict[str, nn.Module]) -> str:
        """The teacher whose features term i reads: its `member` when the stage learns from
        the ensemble, else the stage's one teacher (an assistant, an earlier generation)."""
        member = (self.terms[i].member or "main") if len(teachers) > 1 else "main"
        self._members[i] = member
        return member

    def _layer_pairs(
        self, term: LossTerm, student: nn.Module, teacher: nn.Module
    ) -> list[tuple[TapSpec, TapSpec]]:
        s_specs, t_specs = term.student_taps(), term.teacher_taps()
        s_specs = [
            TapSpec(path=p, read=spec.read)
            for spec in s_specs
            for p in _expand(student, spec.path, "student")
        ]
        t_specs = [
            TapSpec(path=p, read=spec.read)
            for spec in t_specs
            for p in _expand(teacher, spec.path, "teacher")
        ]
        if term.layer_map == "uniform":
            index = {s.path: s for s in s_specs} | {t.path: t for t in t_specs}
            mapped = tapping.layer_map([s.path for s in s_specs], [t.path for t in t_specs])
            return [(index[a], index[b]) for a, b in mapped]
        if len(s_specs) != len(t_specs):
            raise LossInputError(
                f"loss {term.loss!r}: the student paths expand to {len(s_specs)} modules and the "
                f"teacher paths to {len(t_specs)}; pairs need as many of each "
                "(or set layer_map: uniform)"
            )
        return list(zip(s_specs, t_specs))

    def unbind(self) -> None:
        if self._student_taps is not None:
            self._student_taps.remove()
        for taps in self._teacher_taps.values():
            taps.remove()
        self._student_taps, self._teacher_taps = None, {}

    def _feature_term(self, i: int, inputs: LossInputs) -> torch.Tensor:
        term = self.terms[i]
        if self._student_taps is None:
            raise LossInputError(
                f"loss {term.loss!r} reads features, but the objective was not bound to the "
                "models (call Objective.bind first)"
            )
        member = self._members[i]
        student_values = self._student_taps.values()
        teacher_values = self._teacher_taps[member].values()
        total = inputs.student_logits.new_zeros((), dtype=torch.float32)
        for j, (s_spec, t_spec) in enumerate(self._pairs[i]):
            s = student_values[_key(s_spec)]
            t = teacher_values[_key(t_spec)].detach().float()  # values() copies inference tensors
            if term.loss == "crd":
                crd = self.extras[f"term{i}_crd"]
                if inputs.indices is None:
                    raise LossInputError("loss 'crd' needs the samples' dataset indices")
                total = total + crd(
                    s.flatten(1), t.flatten(1), inputs.indices.to(s.device), reduction="sum"
                )
                continue
            key = f"term{i}_pair{j}"
            projector = self.extras[key] if key in self.extras else None  # noqa: SIM401
            if projector is not None:
                s, t = projector(s, t)
            if term.loss in _TOKEN_LOSSES:
                value = LOSSES[term.loss](
                    s, t, inputs.attention_mask, reduction="sum", **term.params
                )
            else:
                value = LOSSES[term.loss](s, t, reduction="sum", **term.params)
            total = total + value
        return total

    # --------------------------------------------------------------------- call

    def __call__(
        self, inputs: LossInputs, progress: float
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        total: torch.Tensor | None = None
        parts: dict[str, torch.Tensor] = {}
        for i, (
            name,
            term,
            weight_schedule,
            temperature,
            (reads_teacher_logits, reads_labels),
        ) in enumerate(zip(self.names, self.terms, self._weights, self._temperatures, self._reads)):
            weight = schedule_value(weight_schedule, progress)
            if i in self._pairs:
                value = self._feature_term(i, inputs)
            else:
                kwargs: dict[str, object] = dict(term.params)
                if reads_teacher_logits:
                    if inputs.teacher_logits is None:
                        raise LossInputError(f"loss {term.loss!r} needs a teacher; none was given")
                    kwargs["teacher_logits"] = inputs.teacher_logits
                student_logits = inputs.student_logits
                if reads_labels:
                    labels = inputs.labels
                    if labels is not None and bool((labels < 0).any()):
                        # transfer-set rows have no label: label terms skip them
                        keep = labels >= 0
                        student_logits, labels = student_logits[keep], labels[keep]
                        if "teacher_logits" in kwargs:
                            kwargs["teacher_logits"] = inputs.teacher_logits[keep]  # type: ignore[index]
                    kwargs["labels"] = labels
                if temperature is not None:
                    kwargs["temperature"] = schedule_value(temperature, progress)
                elif i in self._learned:
                    module, spec = self._learned[i]
                    reversal = reversal_strength(
                        progress, curriculum=spec.curriculum, strength=spec.strength
                    )
                    kwargs["temperature"] = module(reversal)
                if student_logits.shape[0] == 0:
                    value = inputs.student_logits.sum() * 0.0
                elif i in self._checked:  # the first call checked the inputs (logits.py)
                    with inputs_already_checked():
                        value = LOSSES[term.loss](student_logits, reduction="sum", **kwargs)
                else:
                    value = LOSSES[term.loss](student_logits, reduction="sum", **kwargs)
                    self._checked.add(i)
            parts[name] = value.detach()
            if weight != 0.0:
                total = weight * value if total is None else total + weight * value
        if total is None:  # every weight is 0 at this point of training
            total = inputs.student_logits.new_zeros((), dtype=torch.float32)
        return total, parts


def _key(spec: TapSpec) -> str:
    return tapping.tap_key(spec.path, spec.read)


def _unique(specs: list[TapSpec]) -> list[tapping.TapSpec]:
    """The recipe's taps as kdistill.taps specs, each once."""
    return list({_key(s): tapping.TapSpec(s.path, which=s.read) for s in specs}.values())


def _expand(model: nn.Module, path: str, where: str) -> list[str]:
    """A path, or a pattern (`layer*`, `encoder.layer.{i}`) expanded to module paths."""
    if "*" in path or "{i}" in path:
        return tapping.expand_layers(model, path, where=where)
    return [path]


def _width(shape: tuple[int, ...]) -> int:
    """Features per sample of a tapped tensor of shape (B, ...)."""
    return math.prod(shape[1:])


def _as_dtype(sample: Any, model: nn.Module) -> Any:
    """A float sample in the model's dtype (a bf16 teacher); token ids stay as they are."""
    param = next(model.parameters(), None)
    if isinstance(sample, torch.Tensor) and sample.is_floating_point() and param is not None:
        return sample.to(param.dtype)
    return sample


def _device(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def _check_attention_maps(index: int, loss: str, side: str, model: nn.Module) -> None:
    """Refuse attention-map losses on a Hugging Face model whose attention implementation
    computes attention in a fused kernel and so returns no maps (only "eager" does)."""
    config = getattr(getattr(model, "hf", None), "config", None)
    implementation = getattr(config, "_attn_implementation", None)
    if config is None or implementation in (None, "eager"):
        return
    raise LossInputError(
        f"objective[{index}] ({loss}) reads attention maps of the {side}, but that model "
        f"uses attn_implementation={implementation!r}, which computes attention in a fused "
        "kernel and returns no maps. Load it with `model.args.attn_implementation: eager` "
        "(it then stores a (batch, heads, tokens, tokens) map per layer, slower and more "
        "memory than sdpa), or use minilm_relation_kl on the query/key projections, which "
        "works with any implementation"
    )
