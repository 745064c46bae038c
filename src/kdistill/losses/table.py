"""The loss table: every loss a recipe may name, per task, and the checks of one term.

Classification terms name a pure function of `LOSSES` (logits, features, transformer
internals, CRD); what a term reads is decided by the function's signature.
Language-model terms name `cross_entropy` or one of `LM_DIVERGENCES`, the chunked
token divergences of `kdistill.losses.lm_chunked`. `check_term` validates a recipe's term
against its function (unknown names and parameters with a "did you mean", weight and
temperature ranges, module paths); the recipe schema calls it. This module imports no
recipe, so the schema can import it.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable
from typing import Any

import torch

from kdistill.errors import LossInputError, suggest
from kdistill.losses.crd import CRDMemory
from kdistill.losses.features import FEATURE_LOSSES
from kdistill.losses.logits import LOGIT_LOSSES
from kdistill.losses.transformer import TRANSFORMER_LOSSES
from kdistill.schedules import LearnedTemperature, as_schedule

# recipe name -> `kind` of kdistill.losses.lm_chunked.chunked_divergence (task: causal_lm)
LM_DIVERGENCES = {
    "forward_kl": "kl",
    "reverse_kl": "reverse_kl",
    "jsd": "jsd",
    "skew_kl": "skew_kl",
    "skew_reverse_kl": "skew_reverse_kl",
    "tvd": "tvd",
}
LM_LOSS_NAMES = ("cross_entropy", *LM_DIVERGENCES)
# the keyword parameters each language-model divergence takes, all in [0, 1]
LM_LOSS_PARAMS = {
    "jsd": ("beta",),
    "skew_kl": ("alpha",),
    "skew_reverse_kl": ("alpha",),
}

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


def reads_teacher(term: Any) -> bool:
    return is_feature_loss(term.loss) or takes(term.loss, "teacher_logits")


def check_term(term: Any) -> None:
    """Validate one classification term (a recipe.LossTerm) against its loss function;
    raises ValueError (pydantic shows it)."""
    if term.loss not in LOSSES:
        raise ValueError(
            f"unknown loss {term.loss!r}{suggest(term.loss, LOSSES)}; "
            f"available: {', '.join(sorted(LOSSES))}"
        )
    allowed = user_params(term.loss)
    for key in term.params:
        if key not in allowed:
            listed = ", ".join(allowed) or "none"
            raise ValueError(
                f"loss {term.loss!r} has no parameter {key!r}{suggest(key, allowed)}; "
                f"its parameters: {listed}"
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
        learned = isinstance(term.temperature, LearnedTemperature)
        if learned and term.loss == "crd":
            raise ValueError(
                "crd's temperature is fixed in its memory; a learned one is not possible"
            )
        bounded = term.temperature if learned else as_schedule(term.temperature)
        t_low, t_high = bounded.bounds()
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
    if isinstance(term.temperature, LearnedTemperature):
        # the loss must take T as a 0-d tensor and pass gradients through it
        kwargs["temperature"] = torch.tensor(term.temperature.initial(), dtype=torch.float64)
    elif term.temperature is not None:
        kwargs["temperature"] = as_schedule(term.temperature).start or 1.0
    try:
        LOSSES[term.loss](probe, **kwargs)
    except (LossInputError, TypeError, RuntimeError) as exc:
        raise ValueError(str(exc)) from None


def _check_taps(term: Any) -> None:
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


def _probe_feature_loss(term: Any) -> None:
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
