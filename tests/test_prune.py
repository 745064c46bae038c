"""Structured pruning of BERT-style encoders (kdistill.models.prune_hf): units really
removed, the least important found by their Taylor scores, the pruned shape saved and
reloaded by transformers itself."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

from kdistill.errors import ModelError
from kdistill.models.hf import HFClassifier
from kdistill.models.prune_hf import prune_encoder

HEADS, INNER, LAYERS = 4, 64, 2


def _model(seed: int = 0) -> HFClassifier:
    config = BertConfig(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        intermediate_size=INNER,
        max_position_embeddings=32,
        num_labels=3,
        attn_implementation="eager",
    )
    torch.manual_seed(seed)
    return HFClassifier(BertForSequenceClassification(config).eval())


def _batches(n: int = 3) -> list[tuple[dict[str, torch.Tensor], torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        ids = torch.randint(1, 64, (8, 12), generator=generator)
        mask = torch.ones_like(ids)
        mask[:4, 9:] = 0  # some padding
        out.append(
            (
                {"input_ids": ids, "attention_mask": mask},
                torch.randint(0, 3, (8,), generator=generator),
            )
        )
    return out


def _logits(model: HFClassifier) -> torch.Tensor:
    inputs, _ = _batches(1)[0]
    with torch.no_grad():
        return model(**inputs)


def _kill_neurons(model: HFClassifier, count: int) -> None:
    """Zero the first `count` feed-forward neurons of every layer: GELU(0) = 0."""
    with torch.no_grad():
        for layer in model.hf.bert.encoder.layer:
            layer.intermediate.dense.weight[:count] = 0
            layer.intermediate.dense.bias[:count] = 0


def test_dead_neurons_score_zero_and_go_first_without_changing_the_logits() -> None:
    model = _model()
    _kill_neurons(model, INNER // 2)
    before = _logits(model)
    pruned, report = prune_encoder(model, _batches(), ffn=0.5)
    assert report["intermediate_size"] == [INNER, INNER // 2]
    assert report["kept"] == [list(range(INNER // 2, INNER))] * LAYERS
    torch.testing.assert_close(_logits(pruned), before, rtol=1e-5, atol=1e-5)
    # a real, smaller model, and the original untouched
    assert report["params"][1] < report["params"][0]
    assert sum(p.numel() for p in pruned.parameters()) == report["params"][1]
    layer = pruned.hf.bert.encoder.layer[0]
    assert layer.intermediate.dense.weight.shape == (INNER // 2, 32)
    assert layer.output.dense.weight.shape == (32, INNER // 2)
    assert model.hf.bert.encoder.layer[0].intermediate.dense.weight.shape == (INNER, 32)
    torch.testing.assert_close(_logits(model), before)


def test_the_scores_rank_a_live_network_sensibly() -> None:
    """On a network with no dead units, removing the quarter of neurons the scores call
    least important raises the calibration loss less than removing the top quarter."""
    import copy

    import torch.nn.functional as F

    from kdistill.models.prune_hf import _neuron_scores, _slice_ffn

    model = _model(seed=3)
    batches = _batches()
    pruned, _ = prune_encoder(model, batches, ffn=0.25)
    scores = _neuron_scores(model, model.hf.bert.encoder.layer, batches)
    worst = copy.deepcopy(model)
    for layer, layer_scores in zip(worst.hf.bert.encoder.layer, scores, strict=True):
        bottom = layer_scores.argsort()[: round(INNER * 0.75)]  # drops the top quarter
        _slice_ffn(layer, bottom.sort().values)

    def loss(m: HFClassifier) -> float:
        with torch.no_grad():
            return sum(float(F.cross_entropy(m(**x), y)) for x, y in batches)

    base = loss(model)
    assert abs(loss(pruned) - base) < abs(loss(worst) - base)


def test_the_pruned_shape_saves_and_reloads_with_transformers(tmp_path: Path) -> None:
    pruned, _ = prune_encoder(_model(), _batches(), ffn=0.25)
    pruned.hf.save_pretrained(tmp_path)
    reloaded = HFClassifier(BertForSequenceClassification.from_pretrained(tmp_path).eval())
    assert reloaded.hf.config.intermediate_size == round(INNER * 0.75)
    torch.testing.assert_close(_logits(reloaded), _logits(pruned))


def test_bad_fractions_and_models_are_refused() -> None:
    with pytest.raises(ModelError, match=r"ffn must be a fraction in \(0, 1\); got 1.0"):
        prune_encoder(_model(), _batches(), ffn=1.0)
    with pytest.raises(ModelError, match=r"ffn 0\.001 of 64 neurons removes none"):
        prune_encoder(_model(), _batches(), ffn=0.001)
    with pytest.raises(ModelError, match="at least one calibration batch"):
        prune_encoder(_model(), [], ffn=0.5)

    class NotBert(torch.nn.Module):
        base_model_prefix = "transformer"
        config = BertConfig()

    other = HFClassifier(NotBert())
    with pytest.raises(ModelError, match="pruning follows BERT-style encoders"):
        prune_encoder(other, _batches(), ffn=0.5)


def test_a_recipe_prunes_the_trained_teacher_into_its_student(
    shared_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """hf_student {location: teacher, prune: {ffn: 0.5}}: the run's trained MiniLM teacher,
    half its feed-forward neurons removed, is the student that baseline and distill
    train; the stage reloads (kdistill eval) as the smaller model it is."""
    import json

    from test_text_pipeline import sst2_recipe

    import kdistill

    monkeypatch.setenv("KDISTILL_DATA", str(shared_data))
    recipe = sst2_recipe(seeds=[0], stages=["teacher", "distill"])
    recipe["data"]["text"].pop("transfer")
    recipe["student"] = {
        "model": {
            "name": "hf_student",
            "args": {"location": "teacher", "prune": {"ffn": 0.5, "samples": 64}},
        }
    }
    recipe["objective"] = [{"loss": "kd", "weight": 1.0, "temperature": 2.0}]
    kdistill.run(recipe, output_dir=tmp_path / "run", quiet=True)
    stage = tmp_path / "run" / "distill" / "seed0"
    config = json.loads((stage / "hf" / "config.json").read_text())
    assert config["intermediate_size"] == 768 and config["num_hidden_layers"] == 6
    teacher_params = json.loads((tmp_path / "run" / "teacher" / "seed0" / "eval.json").read_text())
    student = json.loads((stage / "eval.json").read_text())
    assert student["cost"]["params"] < teacher_params["cost"]["params"] - 6 * 2 * 384 * 768
    measured = kdistill.api.evaluate(stage)
    assert measured["test"]["accuracy"] == pytest.approx(student["test"]["accuracy"])

    # a malformed prune section, with the trained teacher reused: refused before training
    bad = dict(recipe, stages=["distill"])
    bad["teacher"] = dict(recipe["teacher"], checkpoint=str(tmp_path / "run"))
    prune_args = {"location": "teacher", "prune": {"ffn": 0.5, "sampels": 8}}
    bad["student"] = {"model": {"name": "hf_student", "args": prune_args}}
    with pytest.raises(ModelError, match=r"prune: unknown key 'sampels' \(did you mean 'samples'"):
        kdistill.run(bad, output_dir=tmp_path / "bad", quiet=True)
    assert not (tmp_path / "bad" / "distill").exists()


def test_the_prune_section_is_checked() -> None:
    from kdistill.models.prune_hf import PruneSettings

    assert PruneSettings.of({"ffn": 0.5}, "p") == PruneSettings(ffn=0.5, samples=256)
    with pytest.raises(ModelError, match=r"p: give \{ffn"):
        PruneSettings.of({"samples": 8}, "p")
    with pytest.raises(ModelError, match=r"unknown key 'fnn'"):
        PruneSettings.of({"ffn": 0.5, "fnn": 1}, "p")
    with pytest.raises(ModelError, match=r"p\.samples: a positive number of texts; got 0"):
        PruneSettings.of({"ffn": 0.5, "samples": 0}, "p")
