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

import difflib
import functools
import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from kdistill import taps as tapping
from kdistill.errors import LossInputError
from kdistill.losses.features import FEATURE_LOSSES, CRDMemory
from kdistill.losses.logits import LOGIT_LOSSES
from kdistill.losses.transformer import TRANSFORMER_LOSSES
from kdistill.recipe import LossTerm, TapSpec, as_schedule
from kdistill.schedules import schedule_value

# name -> pure function; the one table of losses a recipe may name.
LOSSES: dict[str, Callable[..., torch.Tensor]] = {
    **LOGIT_LOSSES,
    **FEATURE_LOSSES,
    # minilm_attention_kl reads four tensors (Q and K of each model): not a two-tap loss;
    # minilm_relation_kl on the query and on the key outputs covers it
    **{k: v for k, v in TRANSFORMER_LOSSES.items() if k != "minilm_attention_kl"},
}
# A module: its constructor's keywords are the term's params. Listed for its signature;
# the objective builds CRD modules itself and never calls this entry.
LOSSES["crd"] = CRDMemory  # type: ignore[assignment]

# Arguments the objective supplies; everything else keyword-only is a user `param`.
_SUPPLIED = {
    "student_logits",
    "teacher_logits",
    "labels",
    "temperature",
    "reduction",
    "student_feature",
    "teacher_feature",
    "attention_mask",
    # transformer losses name their two inputs after what they read
    "student_hidden",
    "teacher_hidden",
    "student_attn",
    "teacher_attn",
    "student_x",
    "teacher_x",
    "student_v",
    "teacher_v",
    "student_q",
    "student_k",
    "teacher_q",
    "teacher_k",
    "indices",
    "student_dim",
    "teacher_dim",
    "n_data",
    "generator",
    "negative_indices",
}

_TOKEN_LOSSES = set(TRANSFORMER_LOSSES)  # (student, teacher, attention_mask) losses
_ATTENTION_MAP_LOSSES = ("attention_mse", "attention_kl")  # read softmax attention maps

# Feature losses that compare tensors element by element, so a projector maps the
# student's features to the teacher's shape. The others compare relations between
# samples or spatial maps and accept different widths.
_NEEDS_EQUAL_SHAPES = {"hint", "cc"}


@functools.cache
def _signature(name: str) -> inspect.Signature:
    return inspect.signature(LOSSES[name])


def takes(name: str, argument: str) -> bool:
    return argument in _signature(name).parameters


def user_params(name: str) -> dict[str, inspect.Parameter]:
    return {k: p for k, p in _signature(name).parameters.items() if k not in _SUPPLIED}


def is_feature_loss(name: str) -> bool:
    return name == "crd" or name in _TOKEN_LOSSES or takes(name, "student_feature")


def reads_teacher(term: LossTerm) -> bool:
    return is_feature_loss(term.loss) or takes(term.loss, "teacher_logits")


def check_term(term: LossTerm) -> None:
    """Validate one term against its loss function; raises ValueError (pydantic shows it)."""
    if term.loss not in LOSSES:
        hint = difflib.get_close_matches(term.loss, LOSSES, n=1)
        suggestion = f" (did you mean {hint[0]!r}?)" if hint else ""
        raise ValueError(
            f"unknown loss {term.loss!r}{suggestion}; available: {', '.join(sorted(LOSSES))}"
        )
    allowed = user_params(term.loss)
    for key in term.params:
        if key not in allowed:
            hint = difflib.get_close_matches(key, allowed, n=1)
            suggestion = f" (did you mean {hint[0]!r}?)" if hint else ""
            listed = ", ".join(allowed) or "none"
            raise ValueError(
                f"loss {term.loss!r} has no parameter {key!r}{suggestion}; its parameters: {listed}"
            )
    _check_taps(term)
    low, high = as_schedule(term.weight).bounds()
    if low < 0 or not math.isfinite(high):
        raise ValueError(
            f"the weight of loss {term.loss!r} must stay in [0, inf) over training; "
            f"its schedule reaches {low if low < 0 else high}"
        )
    if term.temperature is not None:
        if not takes(term.loss, "temperature"):
            raise ValueError(f"loss {term.loss!r} takes no temperature; remove 'temperature'")
        t_low, t_high = as_schedule(term.temperature).bounds()
        if t_low <= 0 or not math.isfinite(t_high):
            raise ValueError(
                f"the temperature of loss {term.loss!r} must stay in (0, inf) over training; "
                f"its schedule reaches {t_low if t_low <= 0 else t_high}"
            )
    if is_feature_loss(term.loss):
        _probe_feature_loss(term)
        return
    # Let the function judge its own parameter values on a tiny input, so the ranges
    # (beta in [0, 1], ...) are stated once, in the loss.
    probe = torch.tensor([[1.0, 0.0, -1.0], [0.5, 0.2, 0.1]], dtype=torch.float64)
    kwargs = dict(term.params)
    if takes(term.loss, "teacher_logits"):
        kwargs["teacher_logits"] = probe.flip(1)
    if takes(term.loss, "labels"):
        kwargs["labels"] = torch.tensor([0, 2])
    if term.temperature is not None:
        kwargs["temperature"] = as_schedule(term.temperature).start or 1.0
    try:
        LOSSES[term.loss](probe, **kwargs)
    except (LossInputError, TypeError) as exc:
        raise ValueError(str(exc)) from None


def _check_taps(term: LossTerm) -> None:
    student, teacher = term.student_taps(), term.teacher_taps()
    if not is_feature_loss(term.loss):
        if student or teacher:
            raise ValueError(
                f"loss {term.loss!r} reads logits, not features; remove 'student'/'teacher' "
                "(feature losses: " + ", ".join([*sorted(FEATURE_LOSSES), "crd"]) + ")"
            )
        return
    if not student or not teacher:
        example = "student: layer3, teacher: layer3"
        if term.loss == "crd":
            example = "student: {path: fc, read: input}, teacher: {path: fc, read: input}"
        raise ValueError(
            f"loss {term.loss!r} reads features: name the module paths to read with "
            f"'student' and 'teacher' (for example {example}); `kdistill inspect MODEL` "
            "lists a model's modules"
        )
    if term.layer_map == "pairs" and len(student) != len(teacher):
        raise ValueError(
            f"loss {term.loss!r} pairs student and teacher paths in order, but has "
            f"{len(student)} student and {len(teacher)} teacher paths; give as many of each, "
            "or set layer_map: uniform"
        )
    if term.loss == "crd" and len(student) != 1:
        raise ValueError("loss 'crd' reads one feature of each model (the embedding)")


def _probe_feature_loss(term: LossTerm) -> None:
    """Let a feature loss judge its parameter values on a small input. A probe that
    fails with the default parameters too says nothing about the user's values (the
    loss may need another input shape), so only failures caused by them are raised."""
    if term.loss == "crd":
        return  # checked against the dataset size when the run starts
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(4, 3, 4, 4, dtype=torch.float64, generator=generator)

    def probe(params: dict[str, Any]) -> Exception | None:
        try:
            LOSSES[term.loss](features, features.flip(0), **params)
        except (LossInputError, TypeError) as exc:
            return exc
        return None

    failure = probe(dict(term.params))
    if failure is not None and term.params and probe({}) is None:
        raise ValueError(str(failure))


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
        # resolved once: __call__ runs every step
        self._weights = [as_schedule(t.weight) for t in terms]
        self._temperatures = [
            None if t.temperature is None else as_schedule(t.temperature) for t in terms
        ]
        self._reads = [(takes(t.loss, "teacher_logits"), takes(t.loss, "labels")) for t in terms]
        self.feature_terms = [i for i, t in enumerate(terms) if is_feature_loss(t.loss)]
        self.needs_teacher = any(reads_teacher(t) for t in terms)
        self.needs_labels = any(takes(t.loss, "labels") for t in terms)
        self._pairs: dict[int, list[tuple[TapSpec, TapSpec]]] = {}
        self._members: dict[int, str] = {}
        self._student_taps: tapping.Taps | None = None
        self._teacher_taps: dict[str, tapping.Taps] = {}
        self.extras = nn.ModuleDict()

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
        extras = nn.ModuleDict()
        for i in self.feature_terms:
            term = self.terms[i]
            member = self._member(i, teachers)
            for j, (s_spec, t_spec) in enumerate(self._pairs[i]):
                s_shape = student_shapes[_key(s_spec)]
                t_shape = teacher_shapes[member][_key(t_spec)]
                if term.loss == "crd":
                    options = dict(term.params)
                    if term.temperature is not None:
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
        total = inputs.student_logits.new_zeros((), dtype=torch.float32)
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
                if student_logits.shape[0] == 0:
                    value = inputs.student_logits.sum() * 0.0
                else:
                    value = LOSSES[term.loss](student_logits, reduction="sum", **kwargs)
            parts[name] = value.detach()
            if weight != 0.0:
                total = total + weight * value
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
