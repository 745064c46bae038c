"""`kdistill export`: ONNX and INT8 ONNX of a stage's model, checked against PyTorch on
real test data by ONNX Runtime, timed, and refused cleanly when it cannot be done."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from helpers import tiny_lm_recipe

import kdistill
import kdistill.export as export
from kdistill.cli import main
from kdistill.errors import ExportError


@pytest.fixture(scope="module")
def mnist_run(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished tiny MNIST run (teacher and distill), shared by the tests that read it."""
    from helpers import tiny_recipe

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("KDISTILL_DATA", str(shared_data))
        recipe = tiny_recipe(stages=["teacher", "distill"])
        run = tmp_path_factory.mktemp("export") / "run"
        kdistill.run(recipe, output_dir=run, quiet=True)
    return run


@pytest.fixture
def data_env(shared_data: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KDISTILL_DATA", str(shared_data))


def _mnist_test_split(shared_data: Path) -> tuple[np.ndarray, np.ndarray]:
    """The first 1,000 MNIST test images as stored (uint8) and their labels, read here
    without kdistill's data code."""
    import gzip

    folder = shared_data / "mnist"
    images = next(p for p in folder.iterdir() if p.name.startswith("t10k-images"))
    labels = next(p for p in folder.iterdir() if p.name.startswith("t10k-labels"))
    opener: Any = gzip.open if images.suffix == ".gz" else open
    with opener(images, "rb") as f:
        x = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 1, 28, 28)
    with opener(labels, "rb") as f:
        y = np.frombuffer(f.read(), np.uint8, offset=8)
    return x[:1000], y[:1000].astype(np.int64)


def test_a_classifier_exports_with_parity_latency_and_a_card(
    mnist_run: Path, shared_data: Path, data_env: None, tmp_path: Path
) -> None:
    stage = mnist_run / "distill" / "seed0"
    record = kdistill.api.export(stage, output=tmp_path / "exported")
    folder = tmp_path / "exported"
    assert sorted(p.name for p in folder.iterdir()) == [
        "README.md",
        "export.json",
        "model.int8.onnx",
        "model.json",
        "model.onnx",
    ]
    assert record == json.loads((folder / "export.json").read_text())
    assert record["exporter"] in ("dynamo", "torchscript")
    fp32, int8 = record["parity"]["fp32"], record["parity"]["int8"]
    assert fp32["top1_agreement"] >= 0.995 and fp32["max_abs_diff"] <= fp32["tolerance"]
    assert int8["top1_agreement"] > 0.9
    assert (folder / "model.int8.onnx").stat().st_size < (folder / "model.onnx").stat().st_size
    engines = [row["engine"] for row in record["latency"]]
    assert engines == [
        "PyTorch FP32",
        "ONNX Runtime FP32",
        "ONNX Runtime INT8",
        "teacher, PyTorch FP32",
    ]
    assert all(row["batch_1"]["median_ms"] > 0 for row in record["latency"])
    card = (folder / "README.md").read_text()
    assert "| model.onnx |" in card and "| ONNX Runtime INT8 |" in card

    # the file alone, fed the dataset's bytes as stored, scores what the run measured
    x, y = _mnist_test_split(shared_data)
    session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    logits = session.run(None, {"input": x})[0]
    accuracy = float((logits.argmax(1) == y).mean())
    measured = json.loads((stage / "eval.json").read_text())["test"]["accuracy"]
    assert accuracy == pytest.approx(measured, abs=1e-9)
    assert fp32["test"]["accuracy"] == pytest.approx(measured, abs=1e-9)


def test_an_export_folder_is_not_overwritten_unless_asked(
    mnist_run: Path, data_env: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    stage = mnist_run / "distill" / "seed0"
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    argv = ["export", str(stage), "--output", str(out), "--int8", "none"]
    assert main(argv) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "already holds files; pass --overwrite" in err and "Traceback" not in err
    assert (out / "mine.txt").read_text() == "keep me"
    assert main([*argv, "--overwrite"]) == 0
    said = capsys.readouterr().out
    assert "FP32 top-1 agreement 100.00%" in said or "FP32 top-1 agreement 99." in said
    assert not (out / "mine.txt").exists() and not (out / "model.int8.onnx").exists()


def test_a_broken_export_fails_parity_and_keeps_its_files(
    mnist_run: Path, data_env: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = export.OnnxModel.__call__

    def off_by_a_lot(self: Any, *inputs: np.ndarray) -> np.ndarray:
        out = real(self, *inputs)
        return out[:, ::-1].copy()  # the classes in reverse order

    monkeypatch.setattr(export.OnnxModel, "__call__", off_by_a_lot)
    with pytest.raises(ExportError, match="does not compute what the PyTorch model does"):
        kdistill.api.export(mnist_run / "distill" / "seed0", output=tmp_path / "bad")
    assert (tmp_path / "bad" / "export.json").is_file()


def test_the_torchscript_exporter_takes_over_when_dynamo_fails_and_both_failing_is_clear(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = torch.onnx.export
    net = torch.nn.Linear(3, 2)

    def no_dynamo(*args: Any, dynamo: bool = True, **kwargs: Any) -> Any:
        if dynamo:
            raise RuntimeError("data-dependent control flow")
        return real(*args, dynamo=False, **kwargs)

    monkeypatch.setattr(torch.onnx, "export", no_dynamo)
    used = export.to_onnx(
        net, (torch.zeros(2, 3),), tmp_path / "a.onnx", input_names=["x"], dynamic={"x": {0: "b"}}
    )
    assert used == "torchscript"
    out = export.OnnxModel(tmp_path / "a.onnx", threads=1)(np.ones((5, 3), np.float32))
    assert out.shape == (5, 2)

    def never(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("cannot trace this")

    monkeypatch.setattr(torch.onnx, "export", never)
    with pytest.raises(ExportError, match="dynamo exporter: RuntimeError: cannot trace this"):
        export.to_onnx(
            net, (torch.zeros(2, 3),), tmp_path / "b.onnx", input_names=["x"], dynamic={}
        )


class _ShapeTest(torch.nn.Module):
    """A forward that tests its input's length: torch.export fixes that axis."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2 if x.shape[1] == 5 else x + 1


def test_an_exporter_that_fixes_a_dynamic_axis_is_not_taken(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The dynamo exporter writes a graph whose length axis is 5 without an error; the
    TorchScript exporter keeps it dynamic; when both fix an axis, the error names it."""
    dynamic = {"x": {0: "batch", 1: "sequence"}}
    path = tmp_path / "a.onnx"
    used = export.to_onnx(
        _ShapeTest(), (torch.ones(2, 5),), path, input_names=["x"], dynamic=dynamic
    )
    assert used == "torchscript" and export.fixed_axes(path, dynamic) == []
    assert export.OnnxModel(path, threads=1)(np.ones((3, 7), np.float32)).shape == (3, 7)

    real = torch.onnx.export

    def static_shapes(*args: Any, **kwargs: Any) -> Any:
        kwargs.pop("dynamic_shapes", None)
        kwargs.pop("dynamic_axes", None)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.onnx, "export", static_shapes)
    with pytest.raises(ExportError) as caught:
        export.to_onnx(
            torch.nn.Linear(5, 2),
            (torch.ones(2, 5),),
            tmp_path / "b.onnx",
            input_names=["x"],
            dynamic={"x": {0: "batch"}},
        )
    assert "dynamo exporter fixed x axis 0 (batch) = 2" in str(caught.value)
    assert "TorchScript exporter fixed x axis 0 (batch) = 2" in str(caught.value)


def test_without_the_export_extra_the_error_names_it(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real = importlib.util.find_spec

    def no_onnxruntime(name: str, *args: Any, **kwargs: Any) -> Any:
        return None if name == "onnxruntime" else real(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", no_onnxruntime)
    with pytest.raises(
        ExportError, match=r"onnxruntime, not installed here; pip install 'kdistill\[export\]'"
    ):
        export.require_onnx()


def test_a_language_model_exports_its_logits_with_the_tokenizer(
    shared_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KDISTILL_DATA", str(shared_data))
    recipe = tiny_lm_recipe(stages=["teacher", "baseline"])
    recipe["teacher"]["signal"] = "live"
    kdistill.run(recipe, output_dir=tmp_path / "lm", quiet=True)
    stage = tmp_path / "lm" / "baseline" / "seed0"
    record = kdistill.api.export(stage)
    folder = stage / "export"
    assert (folder / "hf" / "tokenizer.json").is_file() and (folder / "model.int8.onnx").is_file()
    fp32 = record["parity"]["fp32"]
    assert fp32["top1_agreement"] >= 0.995 and abs(fp32["loss_change"]) < 1e-4
    assert [row["engine"] for row in record["latency"]][-1] == "teacher, PyTorch FP32"
    measured = json.loads((stage / "eval.json").read_text())["val"]["loss"]
    assert record["parity"]["pytorch"]["val"]["loss"] == pytest.approx(measured, rel=1e-5)

    # the file alone: any batch and sequence length, token ids from its own tokenizer
    from tokenizers import Tokenizer

    ids = Tokenizer.from_file(str(folder / "hf" / "tokenizer.json")).encode("To be, or not").ids
    session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    logits = session.run(None, {"input_ids": np.array([ids, ids], dtype=np.int64)})[0]
    assert logits.shape == (2, len(ids), record["vocab_size"])


def test_text_classifiers_export_with_their_tokenizers(
    shared_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The MiniLM teacher of a tiny SST-2 run: token ids and attention mask in, logits
    out, the tokenizer in hf/; its accuracy from the ONNX file equals the run's. The
    BiLSTM student, with its word vocabulary in vocab.json."""
    from test_text_pipeline import sst2_recipe

    monkeypatch.setenv("KDISTILL_DATA", str(shared_data))
    recipe = sst2_recipe(seeds=[0], stages=["teacher", "distill"])
    recipe["teacher"]["cache"] = False
    recipe["data"]["text"].pop("transfer")
    kdistill.run(recipe, output_dir=tmp_path / "run", quiet=True)
    teacher = tmp_path / "run" / "teacher" / "seed0"
    record = kdistill.api.export(teacher, int8=None)
    assert list(record["inputs"]) == ["input_ids", "attention_mask"]
    assert (teacher / "export" / "hf" / "tokenizer.json").is_file()
    fp32 = record["parity"]["fp32"]
    assert fp32["top1_agreement"] >= 0.995 and fp32["max_abs_diff"] <= fp32["tolerance"]
    measured = json.loads((teacher / "eval.json").read_text())["test"]["accuracy"]
    assert fp32["test"]["accuracy"] == pytest.approx(measured, abs=1e-9)

    # the exported file with the exported tokenizer, outside kdistill
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(teacher / "export" / "hf")
    batch = tokenizer(["a gorgeous film", "dull and long"], padding=True, return_tensors="np")
    session = ort.InferenceSession(
        str(teacher / "export" / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    inputs = {k: batch[k].astype(np.int64) for k in ("input_ids", "attention_mask")}
    assert session.run(None, inputs)[0].shape == (2, 2)

    # the BiLSTM student: traced through its export path (no packed sequences)
    student = tmp_path / "run" / "distill" / "seed0"
    record = kdistill.api.export(student, int8=None)
    fp32 = record["parity"]["fp32"]
    assert fp32["top1_agreement"] >= 0.995 and fp32["max_abs_diff"] <= fp32["tolerance"]
    vocab = json.loads((student / "export" / "vocab.json").read_text())
    assert vocab["lowercase"] is True and len(vocab["tokens"]) > 100


def test_static_int8_is_calibrated_on_training_data(
    mnist_run: Path, data_env: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import onnx

    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)  # ONNX Runtime's scratch files must not land here

    record = kdistill.api.export(
        mnist_run / "distill" / "seed0", output=tmp_path / "s", int8="static"
    )
    assert record["int8"] == "static"
    ops = {node.op_type for node in onnx.load(str(tmp_path / "s" / "model.int8.onnx")).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops  # activations quantized too
    assert record["parity"]["int8"]["top1_agreement"] > 0.95
    assert not list((tmp_path / "s").glob("*prepared*")) and not list(work.iterdir())
    with pytest.raises(
        ExportError, match="int8 must be one of dynamic, dynamic-per-channel, static"
    ):
        kdistill.api.export(mnist_run / "distill" / "seed0", output=tmp_path / "t", int8="int4")


def test_dynamic_int8_per_channel_gives_each_output_channel_its_weight_scale(
    tmp_path: Path,
) -> None:
    """One large row in a linear layer: with one weight scale per tensor the other rows
    round to a few steps; per output channel each row keeps its own precision."""
    torch.manual_seed(0)
    net = torch.nn.Linear(64, 8).eval()
    with torch.no_grad():
        net.weight[0] *= 100
    source = tmp_path / "fp32.onnx"
    export.to_onnx(net, (torch.randn(2, 64),), source, input_names=["x"], dynamic={"x": {0: "b"}})
    x = torch.randn(32, 64)
    with torch.no_grad():
        reference = net(x).numpy()
    scales, errors = {}, {}
    for mode in ("dynamic", "dynamic-per-channel"):
        target = tmp_path / f"{mode}.onnx"
        export.quantize_int8(source, target, mode=mode)
        graph = onnx.load(str(target)).graph
        scale = next(i for i in graph.initializer if i.name.endswith("_scale"))
        scales[mode] = tuple(scale.dims)
        out = export.OnnxModel(target, threads=1)(x.numpy())
        errors[mode] = float(np.abs(out - reference)[:, 1:].max())  # the small rows
    assert scales["dynamic"] == () and scales["dynamic-per-channel"] == (8,)
    assert errors["dynamic-per-channel"] < errors["dynamic"] / 10
    assert "dynamic-per-channel" in export.INT8_MODES
