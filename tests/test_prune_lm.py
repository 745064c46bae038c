"""Width and depth pruning of GPT-2 (kdistill.compress.prune_lm) and the pruned
language-model student: what activations say is unused is what goes (checked by
models that compute exactly the same after pruning), the smaller model is an ordinary
GPT-2 of the pruned sizes, and bad sizes are refused with their fix."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import tiny_lm_recipe
from transformers import GPT2Config, GPT2LMHeadModel

import kdistill
from kdistill.compress.prune_lm import prune_gpt2
from kdistill.errors import ModelError, RecipeError


def _teacher(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=100,
        n_positions=32,
        n_layer=4,
        n_embd=64,
        n_head=4,
        bos_token_id=0,
        eos_token_id=0,
    )
    return GPT2LMHeadModel(config).eval()


def _ids(n: int = 4) -> torch.Tensor:
    return torch.randint(0, 100, (n, 16), generator=torch.Generator().manual_seed(1))


def _logits(model: GPT2LMHeadModel, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def test_dead_mlp_neurons_are_the_ones_removed() -> None:
    teacher = _teacher()
    with torch.no_grad():  # neuron 7 of every layer never fires: GELU(0) = 0
        for block in teacher.transformer.h:
            block.mlp.c_fc.weight[:, 7] = 0
            block.mlp.c_fc.bias[7] = 0
    student, report = prune_gpt2(teacher, [_ids()], n_layer=4, n_embd=64, n_head=4, n_inner=255)
    assert report["sizes"]["n_inner"] == [256, 255]
    ids = _ids(2)
    assert torch.allclose(_logits(student, ids), _logits(teacher, ids), atol=1e-5)


def test_a_layer_that_changes_nothing_is_the_one_removed() -> None:
    teacher = _teacher()
    with torch.no_grad():  # layer 2 adds nothing to the residual stream
        for projection in (
            teacher.transformer.h[2].attn.c_proj,
            teacher.transformer.h[2].mlp.c_proj,
        ):
            projection.weight.zero_()
            projection.bias.zero_()
    student, report = prune_gpt2(teacher, [_ids()], n_layer=3, n_embd=64, n_head=4)
    assert report["layers"] == [0, 1, 3]
    ids = _ids(2)
    assert torch.allclose(_logits(student, ids), _logits(teacher, ids), atol=1e-5)


def test_width_and_depth_make_an_ordinary_smaller_gpt2(tmp_path: Path) -> None:
    teacher = _teacher()
    student, report = prune_gpt2(teacher, [_ids()], n_layer=2, n_embd=32, n_head=2, layers=[0, 3])
    config = student.config
    assert (config.n_layer, config.n_embd, config.n_head, config.n_inner) == (2, 32, 2, 128)
    assert report["layers"] == [0, 3]
    assert report["params"] == [
        sum(p.numel() for p in teacher.parameters()),
        sum(p.numel() for p in student.parameters()),
    ]
    # the same parameter count as a GPT-2 built from that configuration
    fresh = GPT2LMHeadModel(config)
    assert report["params"][1] == sum(p.numel() for p in fresh.parameters())
    # tied output layer, and every kept embedding column is one of the teacher's
    assert student.lm_head.weight.data_ptr() == student.transformer.wte.weight.data_ptr()
    teacher_columns = teacher.transformer.wte.weight.T
    for column in student.transformer.wte.weight.T:
        assert any(torch.equal(column, kept) for kept in teacher_columns)
    # saved and reloaded by transformers itself
    student.save_pretrained(tmp_path / "pruned")
    again = GPT2LMHeadModel.from_pretrained(tmp_path / "pruned").eval()
    ids = _ids(2)
    assert torch.allclose(_logits(again, ids), _logits(student.eval(), ids), atol=1e-6)


@pytest.mark.parametrize(
    ("sizes", "message"),
    [
        ({"n_layer": 2, "n_embd": 40, "n_head": 2}, "n_embd must be n_head × 16"),
        ({"n_layer": 5, "n_embd": 32, "n_head": 2}, r"n_layer: between 1 and the teacher's 4"),
        ({"n_layer": 2, "n_embd": 32, "n_head": 2, "n_inner": 512}, "n_inner: between 1"),
        ({"n_layer": 4, "n_embd": 64, "n_head": 4}, "nothing would be pruned"),
        ({"n_layer": 2, "n_embd": 32, "n_head": 2, "layers": [0, 4]}, "0 to 3"),
        ({"n_layer": 2, "n_embd": 32, "n_head": 2, "layers": [1, 1]}, "distinct"),
    ],
)
def test_bad_sizes_are_refused_with_their_fix(sizes: dict, message: str) -> None:
    with pytest.raises(ModelError, match=message):
        prune_gpt2(_teacher(), [_ids()], **sizes)


def test_a_teacher_that_is_not_gpt2_is_refused() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    llama = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=2, num_key_value_heads=2,
        )
    )  # fmt: skip
    with pytest.raises(ModelError, match="follows GPT-2's layout; the teacher is 'llama'"):
        prune_gpt2(llama, [_ids()], n_layer=1, n_embd=16, n_head=1)


def test_the_recipe_refuses_pruning_that_cannot_happen() -> None:
    with pytest.raises(RecipeError, match="'prune' stage measures the pruned teacher"):
        kdistill.api.as_recipe(tiny_lm_recipe(stages=["teacher", "prune", "distill"]))
    recipe = tiny_lm_recipe()
    recipe["teacher"]["model"] = {"prune": {"n_layer": 1, "n_embd": 16, "n_head": 1}}
    with pytest.raises(RecipeError, match=r"teacher\.model\.prune"):
        kdistill.api.as_recipe(recipe)
    recipe = tiny_lm_recipe()
    recipe["student"]["model"]["prune"] = {"n_layer": 1, "n_embd": 16, "n_head": 1}
    with pytest.raises(RecipeError, match="exactly one of config"):
        kdistill.api.as_recipe(recipe)


def test_a_pruned_student_runs_is_measured_before_training_and_exports(
    shared_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KDISTILL_DATA", str(shared_data))
    recipe = tiny_lm_recipe(stages=["teacher", "prune", "baseline", "distill", "quantize"])
    recipe["teacher"]["model"]["config"].update(n_layer=3, n_embd=32, n_head=2)
    recipe["student"]["model"] = {"prune": {"n_layer": 2, "n_embd": 16, "n_head": 1}}
    run = tmp_path / "run"
    results = kdistill.run(recipe, output_dir=run, quiet=True)
    assert list(results["stages"]) == ["teacher", "prune", "baseline", "distill", "quantize"]
    teacher, pruned = results["stages"]["teacher"], results["stages"]["prune"]
    assert pruned["cost"]["params"] < teacher["cost"]["params"] / 2
    # pruning alone costs quality; training recovers most of it
    assert pruned["val"]["loss"] > teacher["val"]["loss"]
    assert results["stages"]["distill"]["val"]["loss"] < pruned["val"]["loss"]
    config = json.loads((run / "distill" / "seed0" / "model.json").read_text())["hf_config"]
    assert (config["n_layer"], config["n_embd"], config["n_head"]) == (2, 16, 1)
    measured = kdistill.api.evaluate(run / "distill" / "seed0")
    assert measured["val"]["loss"] == pytest.approx(
        results["stages"]["distill"]["val"]["loss"], rel=1e-5
    )
    record = kdistill.api.export(run / "distill" / "seed0", output=tmp_path / "exported", int8=None)
    assert record["parity"]["fp32"]["top1_agreement"] >= 0.995
    # the quantize stage: the distilled student as INT8 ONNX, its loss from ONNX Runtime
    quantized = results["stages"]["quantize"]
    distilled = results["stages"]["distill"]
    assert quantized["per_seed"][0]["source"] == "distill"
    assert abs(quantized["val"]["loss"] - distilled["val"]["loss"]) < 0.05
    assert quantized["val"]["bpc"] == pytest.approx(
        distilled["val"]["bpc"] * quantized["val"]["loss"] / distilled["val"]["loss"], rel=1e-9
    )
    assert "| quantize |" in (run / "results.md").read_text()
    again = kdistill.api.evaluate(run / "quantize" / "seed0")
    assert again["val"]["loss"] == pytest.approx(quantized["val"]["loss"], rel=1e-6)


def test_plan_and_inspect_build_a_pruned_student_from_an_untrained_teacher(
    shared_data: Path, tmp_path: Path
) -> None:
    import yaml

    recipe = tiny_lm_recipe(stages=["teacher", "prune", "distill"])
    recipe["student"]["model"] = {"prune": {"n_layer": 1, "n_embd": 16, "n_head": 1}}
    planned = kdistill.api.plan(recipe, data_dir=shared_data, steps=1)
    distill = next(stage for stage in planned.stages if stage.stage == "distill")
    assert distill.parameters < 30_000  # the pruned 1×16 student, not the 2×32 teacher
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    tree = kdistill.api.inspect(path, role="student", data_dir=shared_data)
    assert "GPT2LMHeadModel" in tree


def test_the_kept_heads_and_channels_are_sliced_from_q_k_v_and_the_projections() -> None:
    """Every kept weight is the teacher's weight at the kept rows and columns: checked
    here with slicing written independently of the pruning code (GPT-2's Conv1D
    stores (in, out); c_attn's columns are q | k | v, each head_dim per head)."""
    teacher = _teacher()
    student, report = prune_gpt2(teacher, [_ids()], n_layer=2, n_embd=32, n_head=2)
    channels = report["channels"]
    head_dim = 16
    for new, old in enumerate(report["layers"]):
        heads = report["heads"][str(old)]
        columns = [
            part * 64 + head * head_dim + j
            for part in range(3)
            for head in heads
            for j in range(head_dim)
        ]
        t_block, s_block = teacher.transformer.h[old], student.transformer.h[new]
        expected = t_block.attn.c_attn.weight[channels][:, columns]
        torch.testing.assert_close(s_block.attn.c_attn.weight, expected, rtol=0, atol=0)
        torch.testing.assert_close(
            s_block.attn.c_attn.bias, t_block.attn.c_attn.bias[columns], rtol=0, atol=0
        )
        rows = [head * head_dim + j for head in heads for j in range(head_dim)]
        torch.testing.assert_close(
            s_block.attn.c_proj.weight, t_block.attn.c_proj.weight[rows][:, channels],
            rtol=0, atol=0,
        )  # fmt: skip
        torch.testing.assert_close(s_block.ln_1.weight, t_block.ln_1.weight[channels])
    torch.testing.assert_close(
        student.transformer.wpe.weight, teacher.transformer.wpe.weight[:, channels]
    )


def test_an_untied_output_layer_is_pruned_with_the_channels() -> None:
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=100, n_positions=32, n_layer=2, n_embd=32, n_head=2,
        tie_word_embeddings=False, bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    teacher = GPT2LMHeadModel(config).eval()
    student, report = prune_gpt2(teacher, [_ids()], n_layer=2, n_embd=16, n_head=1)
    assert student.lm_head.weight.data_ptr() != student.transformer.wte.weight.data_ptr()
    torch.testing.assert_close(
        student.lm_head.weight, teacher.lm_head.weight[:, report["channels"]]
    )
