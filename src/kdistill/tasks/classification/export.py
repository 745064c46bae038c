"""`kdistill export` for classifiers: ONNX (and INT8 ONNX), checked against PyTorch on
the whole test split, and timed side by side.

Images and tables: the graph holds the data's normalisation (the training split's mean
and std), so a deployment feeds it what the dataset holds: images as uint8
(B, C, H, W), table rows as float32 (B, F). Texts: the graph takes `input_ids` and
`attention_mask` (B, T), both axes dynamic; the tokenizer runs outside it and is saved
beside it (`hf/` for Hugging Face models, `vocab.json` for a word-level vocabulary).
The folder:

    model.onnx        float32
    model.int8.onnx   ONNX Runtime INT8: dynamic, or static with --int8 static
    model.json        the stage's model and data sections, as the run wrote them
    hf/ or vocab.json text models: the tokenizer
    export.json       exporter, opset, parity, latency, versions
    README.md         a model card with the run's numbers

Parity: the exported float32 model must agree with PyTorch on the top-1 class of at
least 99.5 % of the test samples and stay within a logit difference of
1e-3 · (1 + largest |logit|); otherwise the export fails (files kept for inspection).
The INT8 model's agreement and accuracy change are reported, not enforced.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import kdistill.export
from kdistill.checkpoint import atomic_write_json, atomic_write_text
from kdistill.data import DataBundle
from kdistill.data.text_task import TextData
from kdistill.data.text_tokenizers import VocabTokenizer
from kdistill.errors import ExportError
from kdistill.evaluate import quality
from kdistill.export import (
    BATCH,
    CALIBRATION,
    OPSET,
    OnnxModel,
    card_header,
    check_parity,
    claim_export_dir,
    file_mb,
    first_rows,
    latency_markdown,
    latency_rows,
    quantize_int8,
    quantized_source,
    require_onnx,
    run_teacher,
    summary_line,
    to_onnx,
    versions,
)
from kdistill.tasks.classification.measure import load_saved_model, recorded_data


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


@dataclass
class Feed:
    """What is exported and what it is checked and timed on: the module (it takes the
    input tensors named `names`), the whole test split in batches with its labels in
    the same order, and latency inputs (one sample at a time, and one batch)."""

    module: nn.Module
    names: list[str]
    dynamic: dict[str, dict[int, str]]
    batches: list[tuple[torch.Tensor, ...]]
    labels: torch.Tensor
    singles: list[tuple[torch.Tensor, ...]]
    batch: tuple[torch.Tensor, ...]
    input: dict[str, Any]
    calibration: list[tuple[torch.Tensor, ...]]  # training batches, for static INT8


def array_feed(net: nn.Module, data: DataBundle) -> Feed:
    """Images and tables, as stored; the normalisation goes into the graph."""
    x = data.test.x
    singles, batch = first_rows(x)
    return Feed(
        module=RawInput(net, data).eval(),
        names=["input"],
        dynamic={"input": {0: "batch"}},
        batches=[(x[i : i + 256],) for i in range(0, len(x), 256)],
        labels=data.test.y,
        singles=singles,
        batch=batch,
        calibration=[
            (data.train.x[i : i + 32],) for i in range(0, min(CALIBRATION, len(data.train)), 32)
        ],
        input={
            "input": {
                "shape": ["batch", *x.shape[1:]],
                "dtype": str(x.dtype).removeprefix("torch."),
                "what": "uint8 pixels as stored (normalisation is in the graph)"
                if data.is_image
                else "raw feature values (normalisation is in the graph)",
            }
        },
    )


def text_feed(net: nn.Module, data: TextData) -> Feed:
    """Token ids and attention mask of the model's own tokenizer (which runs outside
    the graph), shortest test texts first so batches pad little."""
    tokenized, train = data.tokenized(net, "test"), data.tokenized(net, "train")
    order = torch.sort(tokenized.lengths, stable=True).indices

    def inputs(rows: torch.Tensor, texts: Any = tokenized) -> tuple[torch.Tensor, ...]:
        batch = texts.batch(rows)
        return batch["input_ids"], batch["attention_mask"]

    count = len(tokenized.lengths)
    calibration = torch.arange(min(CALIBRATION, len(train.lengths)))
    ids = {"shape": ["batch", "sequence"], "dtype": "int64"}
    return Feed(
        module=net.eval(),
        names=["input_ids", "attention_mask"],
        dynamic={
            "input_ids": {0: "batch", 1: "sequence"},
            "attention_mask": {0: "batch", 1: "sequence"},
        },
        batches=[inputs(order[i : i + 256]) for i in range(0, count, 256)],
        labels=data.test.y[order],
        singles=[
            inputs(torch.tensor([i])) for i in range(min(kdistill.export.TIMING.singles, count))
        ],
        batch=inputs(torch.arange(min(BATCH, count))),
        calibration=[inputs(rows, train) for rows in calibration.split(32)],
        input={
            "input_ids": {**ids, "what": "token ids of the tokenizer saved beside the model"},
            "attention_mask": {**ids, "what": "1 for a token, 0 for padding (on the right)"},
        },
    )


def _feed(net: nn.Module, data: DataBundle | TextData) -> Feed:
    return array_feed(net, data) if isinstance(data, DataBundle) else text_feed(net, data)


def export_classifier(
    weights: Path,
    *,
    output: Path | None = None,
    overwrite: bool = False,
    int8: str | None = "dynamic",
    threads: int = 1,
    data_dir: str | Path | None = None,
    datasets: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Export a stage's classifier (its model.safetensors) to `output` (default
    <stage>/export); returns what export.json holds. `datasets`: data already built,
    by data section (see `load_saved_model`)."""
    require_onnx()
    datasets = {} if datasets is None else datasets  # the teacher reads the same data
    net, data = load_saved_model(weights, data_dir=data_dir, datasets=datasets)
    feed = _feed(net, data)
    folder = claim_export_dir(output or weights.parent / "export", overwrite=overwrite)
    onnx_path = folder / "model.onnx"
    example = tuple(t[:2] for t in feed.batches[-1])  # the longest texts: real padding
    try:
        exporter = to_onnx(
            feed.module, example, onnx_path, input_names=feed.names, dynamic=feed.dynamic
        )
    except ExportError:
        shutil.rmtree(folder)  # nothing was exported: leave no empty folder behind
        raise
    files = {"fp32": onnx_path}
    if int8 is not None:
        files["int8"] = folder / "model.int8.onnx"
        quantize_int8(onnx_path, files["int8"], mode=int8, calibration=feed.calibration)
    _copy_beside(weights, net, folder)

    reference = _logits(feed.module, feed.batches)
    sessions = {kind: OnnxModel(path, threads=threads) for kind, path in files.items()}
    parity = {
        kind: _parity(reference, _logits(session, feed.batches, numpy=True), feed.labels)
        for kind, session in sessions.items()
    }
    parity["pytorch"] = {"test": quality(reference, feed.labels)}
    engines: list[tuple[str, Any, bool]] = [("PyTorch FP32", feed.module, True)]
    engines += [(f"ONNX Runtime {kind.upper()}", s, False) for kind, s in sessions.items()]
    latency = latency_rows(engines, feed.singles, feed.batch, threads=threads)
    teacher = _teacher_of(weights, data_dir, datasets)
    if teacher is not None:
        latency += latency_rows(
            [("teacher, PyTorch FP32", teacher.module, True)],
            teacher.singles,
            teacher.batch,
            threads=threads,
        )
    record = {
        "stage": str(weights.parent),
        "exporter": exporter,
        "opset": OPSET,
        "int8": int8,
        "inputs": feed.input,
        "classes": data.class_names,
        "files": {kind: {"file": p.name, "mb": file_mb(p)} for kind, p in files.items()},
        "parity": parity,
        "latency": latency,
        "threads": threads,
        "versions": versions(),
    }
    atomic_write_json(folder / "export.json", record)
    atomic_write_text(folder / "README.md", model_card(record))
    check_parity(parity["fp32"], folder, agreement="top-1")
    return record


def _copy_beside(weights: Path, net: nn.Module, folder: Path) -> None:
    """model.json, and a text model's tokenizer: the stage's hf/ folder (save_pretrained
    with its tokenizer), or vocab.json for a word-level vocabulary."""
    if weights.with_name("model.json").is_file():
        shutil.copyfile(weights.with_name("model.json"), folder / "model.json")
    if (weights.parent / "hf").is_dir():
        shutil.copytree(weights.parent / "hf", folder / "hf")
    tokenizer = getattr(net, "kdistill_tokenizer", None)
    if isinstance(tokenizer, VocabTokenizer):
        atomic_write_json(
            folder / "vocab.json",
            {"tokens": list(tokenizer.tokens), "lowercase": tokenizer.lowercase},
        )


def _logits(
    engine: Any, batches: list[tuple[torch.Tensor, ...]], *, numpy: bool = False
) -> torch.Tensor:
    """Logits over every batch, in order, as one float32 tensor."""
    outputs = []
    with torch.inference_mode():
        for batch in batches:
            if numpy:
                outputs.append(torch.from_numpy(np.asarray(engine(*[t.numpy() for t in batch]))))
            else:
                outputs.append(engine(*batch))
    return torch.cat(outputs).float()


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


def _teacher_of(
    weights: Path, data_dir: str | Path | None, datasets: dict[str, Any]
) -> Feed | None:
    """The run's teacher with its own inputs (for scale in the latency table), when the
    stage is in a run folder that has one and is not itself the teacher."""
    found = run_teacher(weights)
    if found is None:
        return None
    return _feed(*load_saved_model(found, data_dir=data_dir, datasets=datasets))


def model_card(record: dict[str, Any]) -> str:
    """README.md of an export: what it takes, what it gives, how well and how fast."""
    classes = record["classes"]
    lines = card_header("Exported classifier", record)
    for name, info in record["inputs"].items():
        shape = ", ".join(str(s) for s in info["shape"])
        lines.append(f"- Input `{name}`: {info['dtype']} ({shape}), {info['what']}.")
    lines += [
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
        "logits = session.run(None, {"
        + ", ".join(f"'{name}': {name}" for name in record["inputs"])
        + "})[0]",
        "```",
        "",
    ]
    return "\n".join(lines)


def export_summary(record: dict[str, Any]) -> str:
    """One line for the terminal."""
    change = record["parity"].get("int8", {}).get("accuracy_change", 0.0)
    return summary_line(
        record, agreement="top-1", int8_change=f"accuracy change {change * 100:+.2f} points"
    )


def quantized_stage(
    source: Path,
    *,
    output: Path,
    mode: str,
    threads: int,
    data: DataBundle | TextData,
    section: Any,
) -> dict[str, Any]:
    """The quantize stage of a run: `source` (a stage folder) exported with INT8 into
    `output`/export, and its eval.json record: the INT8 model's quality on the whole
    test split (ONNX Runtime), the source's parameters and FLOPs, the INT8 file's size
    and ONNX Runtime's INT8 latency, with the side-by-side latency table (PyTorch FP32,
    ONNX Runtime FP32 and INT8 of the same model, on the same inputs and threads).
    `data`: the run's data, `section` its recipe section, so nothing is read again."""
    datasets = {recorded_data(section.model_dump(mode="json")).model_dump_json(): data}
    started = time.perf_counter()
    record = export_classifier(
        source / "model.safetensors",
        output=output / "export",
        overwrite=True,
        int8=mode,
        threads=threads,
        datasets=datasets,
    )
    source_cost = json.loads((source / "eval.json").read_text(encoding="utf-8"))["cost"]
    int8 = next(row for row in record["latency"] if row["engine"] == "ONNX Runtime INT8")
    batch_key = next(key for key in int8 if key.startswith("batch_") and key != "batch_1")
    return {
        "source": source.parent.name,
        "mode": mode,
        "test": record["parity"]["int8"]["test"],
        "agreement_with_fp32": record["parity"]["int8"]["top1_agreement"],
        "cost": {
            "params": source_cost["params"],
            "flops": source_cost["flops"],
            "size_bytes": (output / "export" / "model.int8.onnx").stat().st_size,
            "latency_ms_single": int8["batch_1"]["median_ms"],
            "latency_ms": int8[batch_key]["median_ms"],
            "batch_size": int(batch_key.removeprefix("batch_")),
            "device": "cpu, ONNX Runtime INT8",
            "threads": threads,
        },
        "latency": record["latency"],
        "exporter": record["exporter"],
        "train_seconds": round(time.perf_counter() - started, 3),
    }


def evaluate_onnx(path: Path, *, data_dir: str | Path | None = None) -> dict[str, Any]:
    """`kdistill eval` of a quantize stage: its INT8 ONNX file (`path`, in the stage's
    export/ folder) run by ONNX Runtime on the whole test split of the data its
    model.json names, fed as the export fed it; cost as the stage measured it."""
    require_onnx()
    info = json.loads(path.with_name("model.json").read_text(encoding="utf-8"))
    stage_record, weights = quantized_source(path)
    start = time.perf_counter()
    net, data = load_saved_model(weights, data_dir=data_dir)
    feed = _feed(net, data)
    logits = _logits(OnnxModel(path, threads=1), feed.batches, numpy=True)
    return {
        "checkpoint": str(path),
        "model": info["model"],
        "test": quality(logits, feed.labels),
        "cost": stage_record["cost"],
        "seconds": round(time.perf_counter() - start, 3),
    }
