"""The objective's arithmetic, teacher precision, and fit's split-invariance."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
from accelerate import Accelerator

from kdistill.data import build
from kdistill.losses import cross_entropy, kd_loss
from kdistill.losses.objective import LossInputs, Objective
from kdistill.models import build_model
from kdistill.optim import lr_factor, make_optimizer, uses_fused_kernel
from kdistill.recipe import (
    DataConfig,
    LossTerm,
    ModelSpec,
    OptimizerConfig,
    Schedule,
    TrainConfig,
)
from kdistill.tasks.classification.steps import ClassifierSteps
from kdistill.teachers import LiveTeacher
from kdistill.train import fit


def _inputs() -> LossInputs:
    g = torch.Generator().manual_seed(0)
    return LossInputs(
        student_logits=torch.randn(6, 5, generator=g),
        labels=torch.randint(0, 5, (6,), generator=g),
        teacher_logits=torch.randn(6, 5, generator=g),
    )


def test_objective_is_weighted_sum_with_schedules() -> None:
    objective = Objective(
        [
            LossTerm(loss="cross_entropy", weight=0.3),
            LossTerm(
                loss="kd",
                weight=Schedule(kind="linear", start=0.0, end=1.0),
                temperature=Schedule(kind="exponential", start=8.0, end=2.0),
            ),
        ]
    )
    inputs = _inputs()
    total, parts = objective(inputs, progress=0.5)
    temperature = 8.0 * (2.0 / 8.0) ** 0.5
    ce = cross_entropy(inputs.student_logits, inputs.labels, reduction="sum")
    kd = kd_loss(
        inputs.student_logits, inputs.teacher_logits, temperature=temperature, reduction="sum"
    )
    assert total.item() == pytest.approx((0.3 * ce + 0.5 * kd).item(), rel=1e-6)
    assert parts["kd"].item() == pytest.approx(kd.item(), rel=1e-6)
    assert objective.weights(0.0)["kd"] == 0.0 and objective.weights(1.0)["kd"] == 1.0
    assert objective.needs_teacher and objective.needs_labels


def test_repeated_losses_get_distinct_names() -> None:
    objective = Objective(
        [LossTerm(loss="kd", temperature=1.0), LossTerm(loss="kd", temperature=4.0)]
    )
    assert objective.names == ["kd", "kd_2"]


def test_live_teacher_in_bfloat16_returns_float32_close_to_fp32() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    x = torch.randn(4, 8)
    reference = model(x).detach()
    teacher = LiveTeacher(model, precision="bf16")
    out = teacher(x, torch.arange(4))
    assert out.dtype == torch.float32 and not out.requires_grad
    assert torch.allclose(out, reference, atol=0.1)
    assert all(p.dtype == torch.bfloat16 and not p.requires_grad for p in model.parameters())


def test_lr_factor_warmup_and_shapes() -> None:
    from kdistill.recipe import LRScheduleConfig

    cosine = LRScheduleConfig(name="cosine", warmup_steps=10)
    assert lr_factor(cosine, 0, 110, 11) == pytest.approx(0.1)
    assert lr_factor(cosine, 10, 110, 11) == pytest.approx(1.0)
    assert lr_factor(cosine, 110, 110, 11) == pytest.approx(0.0, abs=1e-12)
    step = LRScheduleConfig(name="step", milestones=[2, 4], gamma=0.5)
    assert lr_factor(step, 5 * 11, 110, 11) == pytest.approx(0.25)
    onecycle = LRScheduleConfig(name="onecycle")
    values = [lr_factor(onecycle, s, 100, 10) for s in range(100)]
    assert max(values) == pytest.approx(1.0, abs=0.05) and values[-1] < 0.01


@pytest.mark.parametrize(
    "config",
    [
        {"name": "adamw", "lr": 0.01, "weight_decay": 0.05},
        {"name": "adam", "lr": 0.01, "weight_decay": 0.01},
        {"name": "sgd", "lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 5e-4},
    ],
)
def test_fused_optimizer_takes_the_same_steps_as_the_reference(config: dict) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    reference = copy.deepcopy(model)
    optimizer = make_optimizer(model, OptimizerConfig(**config))
    assert optimizer.defaults["fused"] is True
    cls = {"adamw": torch.optim.AdamW, "adam": torch.optim.Adam, "sgd": torch.optim.SGD}
    kwargs = {k: v for k, v in config.items() if k != "name"}
    reference_optimizer = cls[config["name"]](reference.parameters(), foreach=False, **kwargs)
    for step in range(5):
        x = torch.randn(4, 6, generator=torch.Generator().manual_seed(step))
        for net, opt in ((model, optimizer), (reference, reference_optimizer)):
            opt.zero_grad()
            net(x).square().mean().backward()
            opt.step()
    for fused_p, reference_p in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(fused_p, reference_p, rtol=1e-5, atol=1e-6)
    moved = torch.nn.Linear(2, 2)
    assert not uses_fused_kernel([])
    assert not uses_fused_kernel([moved.weight.to_sparse()])
    assert not uses_fused_kernel([moved.weight.long()])


def test_grad_accumulation_gives_the_same_weights(shared_data: Path, tmp_path: Path) -> None:
    data = build(DataConfig(source="mnist", limit_train=640, limit_test=100), shared_data)
    spec = ModelSpec(name="mlp", args={"hidden": [32]})
    objective = Objective([LossTerm(loss="cross_entropy")])
    accelerator = Accelerator(cpu=True)
    weights = []
    for accum in (1, 4):
        torch.manual_seed(0)
        model = build_model(spec, input_shape=data.input_shape, num_classes=data.num_classes)
        settings = TrainConfig(epochs=2, batch_size=64, grad_accum=accum, optimizer={"lr": 0.1})
        steps = ClassifierSteps(model, data=data, objective=objective, teacher=None,
                                settings=settings, accelerator=accelerator, seed=0)  # fmt: skip
        fit(model, steps, settings=settings, seed=0, out_dir=tmp_path / str(accum),
            accelerator=accelerator, quiet=True)  # fmt: skip
        weights.append({k: v.clone() for k, v in model.state_dict().items()})
    worst = max(float((weights[0][k] - weights[1][k]).abs().max()) for k in weights[0])
    assert worst < 1e-5, worst


def test_run_time_left_adds_the_stages_to_come_at_this_stages_pace() -> None:
    from types import SimpleNamespace

    from kdistill.train import run_time_left

    task = SimpleNamespace(time_remaining=600.0, elapsed=1200.0)
    # 10 min of this stage, then 2 stages of 30 min each: 1 h 10 min
    assert run_time_left(task, 2) == "run ≈1:10:00 left (2 more stages)"
    assert run_time_left(SimpleNamespace(time_remaining=None, elapsed=5.0), 2) == ""


def test_every_stage_is_told_how_many_come_after_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from helpers import tiny_recipe

    import kdistill.stages as stages
    from kdistill.api import run

    seen: list[tuple[str | None, int]] = []
    real = stages.fit

    def spy(*args: Any, **kwargs: Any) -> Any:
        seen.append((kwargs.get("description"), kwargs["stages_after"]))
        return real(*args, **kwargs)

    monkeypatch.setattr(stages, "fit", spy)
    run(tiny_recipe(seeds=[0]), output_dir=tmp_path / "r", quiet=True)
    assert [after for _, after in seen] == [2, 1, 0]
    assert seen[0][0] is not None and "stage 1 of 3" in seen[0][0]
