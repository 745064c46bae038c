"""Structured pruning of BERT-style encoders: feed-forward neurons removed for real
(smaller matrices, fewer parameters and FLOPs), not masked.

Importance is first-order (Taylor) on the task loss over calibration batches of the
training data: removing a unit with output a changes the loss by about −a·∂L/∂a, so
neuron j scores |Σ a_j · ∂L/∂a_j| over its activation after the nonlinearity, summed
over positions and batches (Molchanov et al. 2019's Taylor criterion). Each layer keeps
its top (1 − `ffn`) fraction, the same count in every layer, because a BERT config has
one `intermediate_size` (Minitron's width pruning of the MLP is uniform per layer too).
The pruned copy is a model of a smaller shape that its config describes: it saves with
`save_pretrained` and reloads with `from_pretrained`.

Depth is pruned by choosing layers (`hf_student`'s `num_layers`/`layers`). Attention
heads are not pruned: transformers 5 removed `prune_heads`, and a BERT config derives
the head size from hidden_size / num_attention_heads, so fewer heads of the same size
cannot be written in one; it would need kdistill to record the removed heads and cut
them again on every load.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from dataclasses import dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kdistill.errors import ModelError, suggest
from kdistill.models.hf import HFClassifier


@dataclass(frozen=True)
class PruneSettings:
    """`hf_student`'s `prune` section: the fraction of feed-forward neurons to remove and
    how many labelled training texts rank them."""

    ffn: float
    samples: int = 256

    @classmethod
    def of(cls, value: Any, where: str) -> PruneSettings:
        """The section as a recipe gives it (a mapping), checked: unknown keys, a missing
        `ffn`, values out of range each name the fix."""
        known = [f.name for f in fields(cls)]
        if not isinstance(value, dict) or "ffn" not in value:
            raise ModelError(
                f"{where}: give {{ffn: fraction of feed-forward neurons to remove, samples: "
                f"training texts that rank them (default 256)}}; got {value!r}"
            )
        unknown = sorted(set(value) - set(known))
        if unknown:
            raise ModelError(
                f"{where}: unknown key {unknown[0]!r}{suggest(unknown[0], known)}; "
                f"the keys are {', '.join(known)}"
            )
        settings = cls(**value)
        samples = settings.samples
        if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
            raise ModelError(f"{where}.samples: a positive number of texts; got {samples!r}")
        return settings


def prune_encoder(
    model: HFClassifier,
    batches: Iterable[tuple[dict[str, torch.Tensor], torch.Tensor]],
    *,
    ffn: float,
    where: str = "prune",
) -> tuple[HFClassifier, dict[str, Any]]:
    """A copy of `model` with the fraction `ffn` (in (0, 1)) of each layer's feed-forward
    neurons removed, the least important first (the original is left as it is), and what
    was done. batches: (inputs, labels) pairs of training data, for the scores."""
    if isinstance(ffn, bool) or not isinstance(ffn, (int, float)) or not 0 < ffn < 1:
        raise ModelError(f"{where}: ffn must be a fraction in (0, 1); got {ffn!r}")
    layers = _layers(model, where)
    inner = int(model.hf.config.intermediate_size)
    keep_count = max(1, round(inner * (1 - ffn)))
    if keep_count == inner:
        raise ModelError(f"{where}: ffn {ffn} of {inner} neurons removes none; raise it")
    scores = _neuron_scores(model, layers, batches)
    pruned = copy.deepcopy(model)
    kept = [layer_scores.topk(keep_count).indices.sort().values for layer_scores in scores]
    for layer, index in zip(_layers(pruned, where), kept, strict=True):
        _slice_ffn(layer, index)
    pruned.hf.config.intermediate_size = keep_count
    before = sum(p.numel() for p in model.parameters())
    after = sum(p.numel() for p in pruned.parameters())
    return pruned, {
        "intermediate_size": [inner, keep_count],
        "params": [before, after],
        "kept": [index.tolist() for index in kept],
    }


def _layers(model: HFClassifier, where: str) -> nn.ModuleList:
    hf: Any = model.hf
    base = getattr(hf, hf.base_model_prefix, None)
    layers = getattr(getattr(base, "encoder", None), "layer", None)
    config = hf.config
    ok = isinstance(layers, nn.ModuleList) and all(
        hasattr(getattr(layer, "intermediate", None), "dense")
        and hasattr(getattr(layer, "output", None), "dense")
        for layer in layers
    )
    if not ok or not hasattr(config, "intermediate_size"):
        raise ModelError(
            f"{where}: pruning follows BERT-style encoders (layers at <base>.encoder.layer.N "
            f"with intermediate.dense and output.dense); {config.model_type!r} "
            f"({type(hf).__name__}) is not one; prune depth with num_layers/layers instead"
        )
    assert isinstance(layers, nn.ModuleList)
    return layers


def _neuron_scores(
    model: HFClassifier,
    layers: nn.ModuleList,
    batches: Iterable[tuple[dict[str, torch.Tensor], torch.Tensor]],
) -> list[torch.Tensor]:
    """Per layer, each feed-forward neuron's Taylor score (I,)."""
    scores: list[torch.Tensor | None] = [None] * len(layers)
    captured: dict[int, torch.Tensor] = {}

    def keep(i: int) -> Any:
        def hook(module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
            output.retain_grad()
            captured[i] = output

        return hook

    blocks: list[Any] = list(layers)
    handles = [block.intermediate.register_forward_hook(keep(i)) for i, block in enumerate(blocks)]
    was_training = model.training
    model.eval()  # no dropout: the scores are of the model as it predicts
    try:
        for inputs, labels in batches:
            model.zero_grad(set_to_none=True)
            F.cross_entropy(model(**inputs), labels, reduction="sum").backward()
            for i in range(len(layers)):
                activation = captured[i]
                assert activation.grad is not None
                taylor = (activation * activation.grad).detach().double().sum(dim=(0, 1))
                previous = scores[i]
                scores[i] = taylor if previous is None else previous + taylor
    finally:
        for handle in handles:
            handle.remove()
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    found = [s for s in scores if s is not None]
    if len(found) != len(layers):
        raise ModelError("pruning needs at least one calibration batch; the data gave none")
    return [s.abs() for s in found]


def _slice_ffn(layer: Any, keep: torch.Tensor) -> None:
    """Keep feed-forward neurons `keep` of a layer: rows of the up projection, columns of
    the down projection."""
    up: Any = layer.intermediate.dense
    down: Any = layer.output.dense
    new_up = nn.Linear(up.in_features, len(keep), bias=up.bias is not None)
    new_down = nn.Linear(len(keep), down.out_features, bias=down.bias is not None)
    with torch.no_grad():
        new_up.weight.copy_(up.weight[keep])
        if up.bias is not None:
            new_up.bias.copy_(up.bias[keep])
        new_down.weight.copy_(down.weight[:, keep])
        if down.bias is not None:
            new_down.bias.copy_(down.bias)
    layer.intermediate.dense, layer.output.dense = new_up, new_down
