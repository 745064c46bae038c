"""Quantization-aware training: a model whose convolutions and linear layers compute
with int8-rounded weights and inputs in the forward pass, and pass gradients straight
through the rounding (the straight-through estimator, Bengio et al. 2013; Jacob et al.
2018), so training with the distillation loss moves the weights to where ONNX
Runtime's INT8 rounding costs the least.

The rounding mirrors what `kdistill.export.quantize_int8` asks ONNX Runtime for:

- dynamic: int8 weights, symmetric, one scale per tensor; inputs uint8, asymmetric,
  their range taken from each batch (ONNX Runtime computes it per call at run time);
- dynamic-per-channel: the same with one weight scale per output channel;
- static: int8 weights, symmetric, one scale per output channel; inputs int8,
  asymmetric, over a range fixed from calibration data (here: a running min/max of
  the training batches, frozen when training ends).

The weights stay float32 and keep their names (the layers' forward is replaced, not
their parameters), so checkpoints, resume and the saved weights are those of the
plain model; ONNX Runtime quantizes them again with its own scales at export, which
the training has made them robust to (not bit-exact).
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

MODES = ("dynamic", "dynamic-per-channel", "static")
LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d)
MOMENTUM = 0.01  # static: how fast the running input range follows the batches


def prepare(model: nn.Module, mode: str) -> list[str]:
    """Make every linear layer and convolution of `model` compute on fake-quantized
    weights and inputs (in place); the names of the layers changed."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}; got {mode!r}")
    changed = []
    for name, module in model.named_modules():
        if isinstance(module, LAYERS):
            # nn.Module.__setattr__ is typed for tensors and modules, and stores any value
            layer: Any = module
            layer.kdistill_qat = mode
            if mode == "static":
                layer.register_buffer("kdistill_input_range", torch.zeros(2), persistent=False)
                layer.kdistill_range_seen = False
            layer.forward = types.MethodType(_forward, layer)  # the instance's own forward
            changed.append(name)
    return changed


def is_prepared(model: nn.Module) -> bool:
    return any(hasattr(m, "kdistill_qat") for m in model.modules())


@contextlib.contextmanager
def plain(model: nn.Module) -> Iterator[nn.Module]:
    """The model computing in float inside the block (its cost is the deployable
    model's, not the rounding simulation's); the rounding is back after it."""
    layers = [m for m in model.modules() if "forward" in vars(m) and hasattr(m, "kdistill_qat")]
    forwards = [vars(m).pop("forward") for m in layers]
    try:
        yield model
    finally:
        for layer, forward in zip(layers, forwards, strict=True):
            layer.forward = forward


def _forward(self: Any, x: Tensor) -> Tensor:
    mode = self.kdistill_qat
    weight = _weight(self.weight, per_channel=mode != "dynamic")
    x = _input(self, x, mode)
    if isinstance(self, nn.Linear):
        return F.linear(x, weight, self.bias)
    return self._conv_forward(x, weight, self.bias)


def _weight(weight: Tensor, *, per_channel: bool) -> Tensor:
    """Symmetric int8 rounding of the weights: [-127, 127] times a scale."""
    if per_channel:
        scale = weight.detach().abs().flatten(1).amax(dim=1).clamp_min(1e-8) / 127
        zero = torch.zeros(len(scale), dtype=torch.int32, device=weight.device)
        return torch.fake_quantize_per_channel_affine(weight, scale, zero, 0, -127, 127)
    scale = weight.detach().abs().max().clamp_min(1e-8) / 127
    return torch.fake_quantize_per_tensor_affine(weight, float(scale), 0, -127, 127)


def _input(self: Any, x: Tensor, mode: str) -> Tensor:
    """Asymmetric rounding of the input over a range that holds 0: the batch's own
    (dynamic, uint8), or a running range of the training batches (static, int8)."""
    if not x.is_floating_point():
        return x
    low = x.detach().min().clamp(max=0)
    high = x.detach().max().clamp(min=0)
    if mode != "static":
        qmin, qmax = 0, 255
    else:
        qmin, qmax = -128, 127
        seen = self.kdistill_input_range
        if self.training or not self.kdistill_range_seen:
            current = torch.stack([low, high]).to(seen.dtype)
            update = current if not self.kdistill_range_seen else seen + MOMENTUM * (current - seen)
            seen.copy_(update)
            self.kdistill_range_seen = True
        low, high = seen[0], seen[1]
    scale = float((high - low).clamp_min(1e-8) / (qmax - qmin))
    zero = round(qmin - float(low) / scale)
    return torch.fake_quantize_per_tensor_affine(x, scale, max(qmin, min(qmax, zero)), qmin, qmax)
