"""`kdistill export` for classifiers of images and tables: ONNX (and INT8 ONNX) that
takes the data as stored (uint8 pixels, raw feature values), checked against PyTorch on
the whole test split, and timed side by side.

The exported graph holds the data's normalisation (the training split's mean and std),
so a deployment feeds it what the dataset holds: images as uint8 (B, C, H, W), table
rows as float32 (B, F). The folder:

    model.onnx        float32, dynamic batch axis
    model.int8.onnx   ONNX Runtime dynamic INT8 (unless --no-int8)
    model.json        the stage's model and data sections, as the run wrote them
    export.json       exporter, opset, parity, latency, versions
    README.md         a model card with the run's numbers

Parity: the exported float32 model must agree with PyTorch on the top-1 class of at
least 99.5 % of the test samples and stay within a logit difference of
1e-3 · (1 + largest |logit|); otherwise the export fails (files kept for inspection).
The INT8 model's agreement and accuracy change are reported, not enforced.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from kdistill.checkpoint import atomic_write_json, atomic_write_text
from kdistill.data import DataBundle
from kdistill.errors import ExportError
from kdistill.evaluate import quality
from kdistill.export import (
    OPSET,
    OnnxModel,
    claim_export_dir,
    file_mb,
    latency_markdown,
    latency_rows,
    quantize_int8,
    require_onnx,
    to_onnx,
    versions,
)
from kdistill.tasks.classification.measure import load_saved_model

MIN_AGREEMENT = 0.995


class RawInput(nn.Module):
    """A classifier with its data's normalisation in front: it takes the data as stored."""

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, net: nn.Module, data: DataBundle) -> None:
        super().__init__()
        self.net, self.is_image = net, data.is_image
        shape = (1, -1, 1, 1) if data.is_image else (1, -1)
        self.register_buffer("mean", data.mean.float().reshape(shape).clone())
        self.register_buffer("std", data.std.float().reshape(shape).clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        if self.is_image:
            x = x / 255
        return self.net((x - self.mean) / self.std)


def export_classifier(
    weights: Path,
    *,
    output: Path | None = None,
    overwrite: bool = False,
    int8: bool = True,
    threads: int = 1,
    data_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Export a stage's classifier (its model.safetensors) to `output` (default
    <stage>/export); returns what export.json holds."""
    require_onnx()
    net, data = load_saved_model(weights, data_dir=data_dir)
    if not isinstance(data, DataBundle):
        raise ExportError(
            f"{weights}: text classifiers are not exported yet (their tokenizer runs outside "
            "the graph); images and tables are"
        )
    folder = claim_export_dir(output or weights.parent / "export", overwrite=overwrite)
    module = RawInput(net, data).eval()
    test_x, test_y = data.test.x, data.test.y
    onnx_path = folder / "model.onnx"
    exporter = to_onnx(
        module, (test_x[:2],), onnx_path, input_names=["input"], dynamic={"input": {0: "batch"}}
    )
    files = {"fp32": onnx_path}
    if int8:
        files["int8"] = folder / "model.int8.onnx"
        quantize_int8(onnx_path, files["int8"])
    if weights.with_name("model.json").is_file():
        shutil.copyfile(weights.with_name("model.json"), folder / "model.json")

    reference = _torch_logits(module, test_x)
    sessions = {kind: OnnxModel(path, threads=threads) for kind, path in files.items()}
    parity = {
        kind: _parity(reference, _onnx_logits(session, test_x), test_y)
        for kind, session in sessions.items()
    }
    parity["pytorch"] = {"test": quality(reference, test_y)}
    engines: list[tuple[str, Any, bool]] = [("PyTorch FP32", module, True)]
    engines += [(f"ONNX Runtime {kind.upper()}", s, False) for kind, s in sessions.items()]
    teacher = _teacher_of(weights, data_dir)
    if teacher is not None:
        engines.append(("teacher, PyTorch FP32", teacher, True))
    latency = latency_rows(engines, test_x, threads=threads)
    record = {
        "stage": str(weights.parent),
        "exporter": exporter,
        "opset": OPSET,
        "input": {
            "name": "input",
            "shape": ["batch", *test_x.shape[1:]],
            "dtype": str(test_x.dtype).removeprefix("torch."),
            "what": "uint8 pixels as stored (normalisation is in the graph)"
            if data.is_image
            else "raw feature values (normalisation is in the graph)",
        },
        "classes": data.class_names,
        "files": {kind: {"file": p.name, "mb": file_mb(p)} for kind, p in files.items()},
        "parity": parity,
        "latency": latency,
        "threads": threads,
        "versions": versions(),
    }
    atomic_write_json(folder / "export.json", record)
    atomic_write_text(folder / "README.md", model_card(record))
    _check_parity(parity["fp32"], folder)
    return record


def _torch_logits(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return torch.cat([module(x[i : i + 256]).float() for i in range(0, len(x), 256)])


def _onnx_logits(session: OnnxModel, x: torch.Tensor) -> torch.Tensor:
    arrays = [session(x[i : i + 256].numpy()) for i in range(0, len(x), 256)]
    return torch.from_numpy(np.concatenate(arrays)).float()


def _parity(reference: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> dict[str, Any]:
    agreement = (reference.argmax(1) == logits.argmax(1)).float().mean().item()
    test = quality(logits, labels)
    return {
        "top1_agreement": round(agreement, 6),
        "max_abs_diff": float((reference - logits).abs().max()),
        "tolerance": 1e-3 * (1 + float(reference.abs().max())),
        "test": test,
        "accuracy_change": round(test["accuracy"] - quality(reference, labels)["accuracy"], 6),
    }


def _check_parity(fp32: dict[str, Any], folder: Path) -> None:
    if fp32["top1_agreement"] < MIN_AGREEMENT or fp32["max_abs_diff"] > fp32["tolerance"]:
        raise ExportError(
            f"the exported model does not compute what the PyTorch model does: top-1 "
            f"agreement {fp32['top1_agreement']:.2%} (needs {MIN_AGREEMENT:.1%}), largest "
            f"logit difference {fp32['max_abs_diff']:.3g} (tolerance {fp32['tolerance']:.3g}). "
            f"The files are kept in {folder} for inspection; report it with export.json"
        )


def _teacher_of(weights: Path, data_dir: str | Path | None) -> nn.Module | None:
    """The run's teacher (for scale in the latency table), when the stage is in a run
    folder that has one and is not itself the teacher."""
    stage = weights.parent.parent
    if stage.name == "teacher":
        return None
    found = sorted(stage.parent.glob("teacher/seed*/model.safetensors"))
    if not found:
        return None
    net, data = load_saved_model(found[0], data_dir=data_dir)
    assert isinstance(data, DataBundle)
    return RawInput(net, data).eval()


def model_card(record: dict[str, Any]) -> str:
    """README.md of an export: what it takes, what it gives, how well and how fast."""
    shape = ", ".join(str(s) for s in record["input"]["shape"])
    classes = record["classes"]
    lines = [
        "# Exported classifier",
        "",
        f"From `{record['stage']}`, by kdistill {record['versions']['kdistill']} "
        f"({record['exporter']} exporter, opset {record['opset']}).",
        "",
        f"- Input `{record['input']['name']}`: {record['input']['dtype']} ({shape}), "
        f"{record['input']['what']}.",
        f"- Output `logits`: float32 (batch, {len(classes)}), classes "
        + ", ".join(classes[:20])
        + (" …" if len(classes) > 20 else "")
        + ".",
        "",
        "## Parity with PyTorch on the test split",
        "",
        "| model | size (MB) | test accuracy | top-1 agreement | largest logit difference |",
        "|---|---|---|---|---|",
    ]
    torch_accuracy = record["parity"]["pytorch"]["test"]["accuracy"]
    lines.append(f"| PyTorch FP32 | — | {torch_accuracy:.2%} | — | — |")
    for kind, info in record["files"].items():
        parity = record["parity"][kind]
        lines.append(
            f"| {info['file']} | {info['mb']:.3f} | {parity['test']['accuracy']:.2%} | "
            f"{parity['top1_agreement']:.2%} | {parity['max_abs_diff']:.3g} |"
        )
    lines += latency_markdown(record)
    lines += [
        "",
        "Run it:",
        "",
        "```python",
        "import onnxruntime as ort",
        "session = ort.InferenceSession('model.onnx')",
        "logits = session.run(None, {'input': x})[0]   # x as the dataset stores it",
        "```",
        "",
    ]
    return "\n".join(lines)


def export_summary(record: dict[str, Any]) -> str:
    """One line for the terminal."""
    fp32 = record["parity"]["fp32"]
    parts = [
        f"exported with the {record['exporter']} exporter; FP32 top-1 agreement "
        f"{fp32['top1_agreement']:.2%}, largest logit difference {fp32['max_abs_diff']:.2g}"
    ]
    if "int8" in record["parity"]:
        int8 = record["parity"]["int8"]
        parts.append(
            f"INT8 agreement {int8['top1_agreement']:.2%}, accuracy change "
            f"{int8['accuracy_change'] * 100:+.2f} points"
        )
    return "; ".join(parts)
