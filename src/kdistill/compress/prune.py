"""Structured channel pruning of any torch classifier: whole output channels of
convolutions and neurons of linear layers removed, with every layer that reads them
(the next convolution's input channels, batch norms, a flatten into a linear layer,
residual additions) cut to match, so the pruned model is smaller and faster, not masked.

The dependency tracing is torch-pruning's (Fang et al., "DepGraph", CVPR 2023): it
follows the model's forward pass to group the parameters that must lose the same
channels, which hand-written slicing gets wrong as soon as there is a residual
connection or a flatten. Importance is scored per group on labelled calibration
batches of the training data:

- `taylor` (default): first-order Taylor, Σ |w · ∂L/∂w| over each channel's weights,
  from the cross-entropy gradients of the calibration batches (Molchanov et al.,
  "Importance Estimation for Neural Network Pruning", CVPR 2019): what removing the
  channel would cost the loss, measured on the data;
- `magnitude`: the L2 norm of each channel's weights (Li et al., "Pruning Filters for
  Efficient ConvNets", ICLR 2017), which needs no data.

Every layer loses the same fraction (`channels`); the output layer keeps its classes.
A pruned model saves its weights as usual: `resize_to` rebuilds its shapes from the
weights file onto a freshly built model of the unpruned architecture.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kdistill.errors import ModelError, suggest

IMPORTANCE = ("taylor", "magnitude")
INITS = ("pruned", "random")
PRUNABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


@dataclass(frozen=True)
class PruneArgs:
    """`student.model: {name: pruned_teacher, args: ...}`: what to remove from the
    run's teacher. `channels`: fraction of every convolution's and hidden linear layer's
    output channels (CNNs, MLPs); `ffn`: fraction of a transformer encoder's
    feed-forward neurons, and `layers`: which of its layers to keep (depth); `samples`:
    labelled training rows that rank them; `importance`: taylor | magnitude (channels);
    `init`: pruned (the teacher's surviving weights) or random (the same shape from
    scratch, the control a pruned student is compared with); `steps` > 1: reach
    `channels` in that many prunings, each removing the same share of what is left,
    with `step_epochs` epochs of distillation from the unpruned teacher after each
    but the last (iterative pruning; the prune stage runs them)."""

    channels: float | None = None
    ffn: float | None = None
    layers: list[int] | None = None
    samples: int = 512
    importance: str = "taylor"
    init: str = "pruned"
    steps: int = 1
    step_epochs: int = 1

    @classmethod
    def of(cls, args: dict[str, Any], where: str) -> PruneArgs:
        """The args as a recipe gives them, checked; each problem names its fix."""
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(args) - set(known))
        if unknown:
            raise ModelError(
                f"{where}.{unknown[0]}: unknown setting{suggest(unknown[0], known)}; "
                f"pruned_teacher takes {', '.join(known)}"
            )
        settings = cls(**args)
        for name in ("channels", "ffn"):
            value = getattr(settings, name)
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1
            ):
                raise ModelError(
                    f"{where}.{name}: the fraction to remove, strictly between 0 and 1 "
                    f"(0.5 removes half); got {value!r}"
                )
        if settings.channels is None and settings.ffn is None and settings.layers is None:
            raise ModelError(
                f"{where}: say what to prune: channels (a fraction, CNNs and MLPs), ffn (a "
                "fraction of a transformer's feed-forward neurons) and/or layers (the "
                "transformer layers to keep)"
            )
        samples = settings.samples
        if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
            raise ModelError(f"{where}.samples: a positive number of rows; got {samples!r}")
        for name in ("steps", "step_epochs"):
            value = getattr(settings, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ModelError(f"{where}.{name}: a positive whole number; got {value!r}")
        if settings.steps > 1 and (settings.channels is None or settings.init != "pruned"):
            raise ModelError(
                f"{where}.steps: iterative pruning removes channels (channels: fraction) "
                "from the teacher's own weights (init: pruned)"
            )
        for name, allowed in (("importance", IMPORTANCE), ("init", INITS)):
            value = getattr(settings, name)
            if value not in allowed:
                raise ModelError(
                    f"{where}.{name}: {value!r} is not one of {', '.join(allowed)}"
                    f"{suggest(str(value), allowed)}"
                )
        return settings


def prune_channels(
    model: nn.Module,
    batches: Iterable[tuple[Any, torch.Tensor]],
    *,
    ratio: float,
    example_input: Any,
    importance: str = "taylor",
    where: str = "prune",
) -> tuple[nn.Module, dict[str, Any]]:
    """A copy of `model` with the fraction `ratio` of each prunable layer's output
    channels removed, the least important first (the original is left as it is), and
    what was done. batches: (inputs, labels) of training data, for the Taylor scores."""
    import torch_pruning as tp

    pruned = copy.deepcopy(model).eval()
    loose = _loose_parameters(pruned)
    if loose:
        raise ModelError(
            f"{where}: {type(model).__name__}.{loose[0]} is a parameter used outside a layer "
            "module (through torch.nn.functional or an operator), which the dependency "
            "analysis cannot cut consistently with the layers around it. Wrap it in a "
            "layer (nn.Linear, nn.Conv2d, ...), or give the student its own smaller "
            "architecture instead of pruning this one"
        )
    output_layer = _output_layer(pruned, where)
    scorer = (
        tp.importance.GroupTaylorImportance()
        if importance == "taylor"
        else tp.importance.GroupMagnitudeImportance(p=2)
    )
    try:
        pruner = tp.pruner.MetaPruner(
            pruned,
            example_input,
            importance=scorer,
            pruning_ratio=ratio,
            ignored_layers=[output_layer],
        )
    except Exception as exc:  # the tracer's own errors, whatever the model did
        first = next(iter(str(exc).splitlines()), type(exc).__name__)
        raise ModelError(
            f"{where}: the dependency analysis could not follow {type(model).__name__}'s "
            f"forward pass ({type(exc).__name__}: {first}). Channel pruning needs layers "
            "that are modules called in forward (nn.Conv2d, nn.Linear, norms), not weights "
            "used through torch.nn.functional; prune a model of such layers, or give the "
            "student its own smaller architecture instead"
        ) from exc
    if importance == "taylor":
        _accumulate_gradients(pruned, batches)
    before = _widths(pruned)
    params_before = sum(p.numel() for p in pruned.parameters())
    pruner.step()
    pruned.zero_grad(set_to_none=True)
    after = _widths(pruned)
    emptied = [name for name, width in after.items() if width == 0]
    if emptied:
        raise ModelError(
            f"{where}: channels {ratio} removes every channel of {emptied[0]}; lower it"
        )
    if after == before:
        raise ModelError(
            f"{where}: channels {ratio} removes no channel of any layer: the layers are too "
            "narrow for that fraction (raise it), or a reshape between layers ties their "
            "channels together so none can be cut alone"
        )
    try:
        with torch.no_grad():
            pruned(example_input)
    except Exception as exc:
        first = next(iter(str(exc).splitlines()), type(exc).__name__)
        raise ModelError(
            f"{where}: the pruned {type(model).__name__} no longer runs ({type(exc).__name__}: "
            f"{first}): its forward pass connects layers in a way the dependency analysis did "
            "not follow. Give the student its own smaller architecture instead"
        ) from exc
    return pruned.train(model.training), {
        "widths": {name: [before[name], after[name]] for name in before},
        "params": [params_before, sum(p.numel() for p in pruned.parameters())],
        "output_layer": _name_of(pruned, output_layer),
    }


LAYERS = (
    *PRUNABLE,
    nn.modules.batchnorm._BatchNorm,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.modules.instancenorm._InstanceNorm,
    nn.Embedding,
    nn.PReLU,
)


def _loose_parameters(model: nn.Module) -> list[str]:
    """Parameters held by a module that is not a layer the analysis knows."""
    return [
        f"{name}.{key}" if name else key
        for name, module in model.named_modules()
        if not isinstance(module, LAYERS)
        for key, _ in module.named_parameters(recurse=False)
    ]


def _output_layer(model: nn.Module, where: str) -> nn.Module:
    """The layer that writes the logits: the last convolution or linear layer registered,
    which keeps its width."""
    layers = [m for m in model.modules() if isinstance(m, PRUNABLE)]
    if not layers:
        raise ModelError(
            f"{where}: {type(model).__name__} has no convolution or linear layer to prune"
        )
    return layers[-1]


def _accumulate_gradients(model: nn.Module, batches: Iterable[tuple[Any, torch.Tensor]]) -> None:
    """Cross-entropy gradients summed over the batches into the parameters' .grad, in
    eval mode (no dropout; batch norms use their running statistics)."""
    model.zero_grad(set_to_none=True)
    seen = 0
    for inputs, labels in batches:
        F.cross_entropy(model(inputs), labels, reduction="sum").backward()
        seen += len(labels)
    if seen == 0:
        raise ModelError("pruning needs at least one calibration batch; the data gave none")


def _widths(model: nn.Module) -> dict[str, int]:
    return {
        name: int(module.weight.shape[0])
        for name, module in model.named_modules()
        if isinstance(module, PRUNABLE)
    }


def _name_of(model: nn.Module, target: nn.Module) -> str:
    return next(name for name, module in model.named_modules() if module is target)


def resize_to(model: nn.Module, weights: Path | dict[str, torch.Tensor]) -> nn.Module:
    """Give `model` (built with the unpruned architecture) the shapes of a pruned copy's
    weights, so that the weights load into it: each convolution, linear layer and norm
    whose saved tensors are smaller is rebuilt at their size (values left for the load)."""
    shapes = _saved_shapes(weights)
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        own = {
            key: shapes[prefix + key]
            for key, tensor in [
                *module.named_parameters(recurse=False),
                *module.named_buffers(recurse=False),
            ]
            if prefix + key in shapes and tuple(shapes[prefix + key]) != tuple(tensor.shape)
        }
        if not own:
            continue
        if not isinstance(module, LAYERS):
            raise ModelError(
                f"the saved weights of {name} ({type(module).__name__}) have other shapes than "
                "the architecture, and kdistill only rebuilds the layers channel pruning "
                "cuts (convolutions, linear layers, norms, embeddings, PReLU); was this file "
                "written for another model?"
            )
        for key, shape in own.items():
            old = getattr(module, key)
            new = torch.empty(shape, dtype=old.dtype, device=old.device)
            if isinstance(old, nn.Parameter):
                setattr(module, key, nn.Parameter(new, requires_grad=old.requires_grad))
            else:
                setattr(module, key, new)
        _fix_attributes(module)
    return model


def _saved_shapes(weights: Path | dict[str, torch.Tensor]) -> dict[str, list[int]]:
    if isinstance(weights, dict):
        return {key: list(tensor.shape) for key, tensor in weights.items()}
    from safetensors import safe_open

    with safe_open(str(weights), framework="pt") as handle:
        return {key: list(handle.get_slice(key).get_shape()) for key in handle.keys()}  # noqa: SIM118


def _fix_attributes(module: nn.Module) -> None:
    """The size attributes a layer's forward and repr read, from its resized weights."""
    if isinstance(module, nn.Linear):
        module.out_features, module.in_features = module.weight.shape
    elif isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        depthwise = module.groups > 1 and module.groups == module.in_channels == module.out_channels
        module.out_channels = int(module.weight.shape[0])
        if depthwise:
            module.groups = module.out_channels
        module.in_channels = int(module.weight.shape[1]) * module.groups
    elif isinstance(module, nn.modules.batchnorm._BatchNorm):
        sized = module.weight if module.weight is not None else module.running_mean
        assert sized is not None  # a batch norm has affine weights or running statistics
        module.num_features = int(sized.shape[0])
    elif isinstance(module, nn.modules.instancenorm._InstanceNorm):
        sized = module.weight if module.weight is not None else module.running_mean
        assert sized is not None  # resized: it has a tensor of the channels' size
        module.num_features = int(sized.shape[0])
    elif isinstance(module, nn.LayerNorm):
        module.normalized_shape = tuple(module.weight.shape)
    elif isinstance(module, nn.GroupNorm):
        module.num_channels = int(module.weight.shape[0])
    elif isinstance(module, nn.Embedding):
        module.num_embeddings, module.embedding_dim = module.weight.shape
    elif isinstance(module, nn.PReLU):
        module.num_parameters = int(module.weight.shape[0])


def reinitialise(model: nn.Module) -> nn.Module:
    """Fresh weights for every layer that can reset its own (the same shape from
    scratch), under the caller's torch seed."""
    for module in model.modules():
        reset = getattr(module, "reset_parameters", None)
        if callable(reset):
            reset()
    return model


def step_ratios(total: float, steps: int) -> list[float]:
    """The fraction of the remaining channels each of `steps` prunings removes, so that
    together they remove `total`: the same share of what is left each time."""
    share = 1 - (1 - total) ** (1 / steps)
    return [share] * steps


def calibration_rows(labels: torch.Tensor, samples: int) -> torch.Tensor:
    """Up to `samples` labelled training rows (label >= 0), drawn with a fixed generator:
    the same rows for every stage and seed, so one teacher prunes to one student."""
    labelled = torch.nonzero(labels >= 0).flatten()
    order = torch.randperm(len(labelled), generator=torch.Generator().manual_seed(0))
    return labelled[order][:samples]
