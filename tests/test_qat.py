"""Quantization-aware training (kdistill.compress.qat) and the qat stage: layers compute
on int8-rounded weights and inputs, gradients pass straight through the rounding, the
weights keep their names, and a distilled student trained on this way exports to an
INT8 model that agrees with it."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import tiny_recipe
from torch import nn

import kdistill
from kdistill.compress import qat
from kdistill.errors import RecipeError


def _dynamic_int8(layer: nn.Linear, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """What ONNX Runtime's dynamic INT8 computes: weights rounded to int8 steps of
    `scale` (one, or one per output channel), the input to uint8 over its own range."""
    weight = torch.round(layer.weight / scale).clamp(-127, 127) * scale
    low, high = min(x.min().item(), 0.0), max(x.max().item(), 0.0)
    x_scale = (high - low) / 255
    zero = round(-low / x_scale)
    rounded = (torch.round(x / x_scale) + zero).clamp(0, 255)
    return F.linear((rounded - zero) * x_scale, weight, layer.bias)


def test_a_linear_layer_computes_on_int8_weights_and_uint8_inputs() -> None:
    torch.manual_seed(0)
    layer = nn.Linear(8, 4)
    plain = copy.deepcopy(layer)
    assert qat.prepare(layer, "dynamic") == [""]
    x = torch.randn(16, 8)
    expected = _dynamic_int8(layer, x, layer.weight.abs().max() / 127)
    assert torch.allclose(layer(x), expected, atol=1e-6)
    assert not torch.allclose(layer(x), plain(x), atol=1e-6)  # the rounding is there
    assert list(layer.state_dict()) == list(plain.state_dict())


def test_gradients_pass_straight_through_and_copies_stay_quantized() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
    qat.prepare(model, "static")
    x = torch.randn(5, 3, 8, 8)
    model(x).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    twin = copy.deepcopy(model).eval()
    assert qat.is_prepared(twin)
    assert torch.equal(twin(x), model.eval()(x))
    # without the rounding inside `plain`, and with it again after
    reference = copy.deepcopy(model)
    with qat.plain(reference):
        unrounded = reference(x)
    assert not torch.equal(unrounded, model(x))
    assert torch.equal(reference(x), model(x))
    # the copy's layers compute with the copy's weights
    with torch.no_grad():
        twin[3].weight.zero_()
    assert torch.equal(twin(x)[:, 0], twin[3].bias[0].expand(5))


def test_the_qat_stage_trains_the_distilled_student_on_and_quantizes_it(
    shared_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KDISTILL_DATA", str(shared_data))
    recipe = tiny_recipe(stages=["teacher", "distill", "qat", "quantize"])
    recipe["quantize"] = {"stage": "qat", "mode": "static"}
    recipe["qat"] = {"epochs": 1, "lr": 0.01}
    run = tmp_path / "run"
    results = kdistill.run(recipe, output_dir=run, quiet=True)
    assert list(results["stages"]) == ["teacher", "distill", "qat", "quantize"]
    metrics = [json.loads(line) for line in (run / "qat" / "seed0" / "metrics.jsonl").open()]
    assert max(m["epoch"] for m in metrics) == 1
    quantized = results["stages"]["quantize"]["per_seed"][0]
    assert quantized["source"] == "qat" and quantized["mode"] == "static"
    assert quantized["agreement_with_fp32"] > 0.97
    distilled = results["stages"]["distill"]["test"]["accuracy"]
    assert abs(results["stages"]["quantize"]["test"]["accuracy"] - distilled) < 0.03


def test_qat_needs_the_distill_stage() -> None:
    with pytest.raises(RecipeError, match="'qat' stage trains on from the distill stage"):
        kdistill.api.as_recipe(tiny_recipe(stages=["teacher", "qat"]))


def test_dynamic_per_channel_rounds_each_output_channel_on_its_own_scale() -> None:
    torch.manual_seed(0)
    layer = nn.Linear(8, 3)
    with torch.no_grad():
        layer.weight[0] *= 50
    qat.prepare(layer, "dynamic-per-channel")
    x = torch.randn(16, 8)
    expected = _dynamic_int8(layer, x, layer.weight.abs().amax(dim=1, keepdim=True) / 127)
    assert torch.allclose(layer(x), expected, atol=1e-5)
