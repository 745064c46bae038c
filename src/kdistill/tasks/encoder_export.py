"""`kdistill export` for tasks on a text encoder: ONNX (and INT8 ONNX) of the model's
per-token outputs, checked against PyTorch on the whole test split with the task's
own reading of them, and timed side by side.

The graph takes the tokenizer's tensors (`input_ids`, `attention_mask`, and
`token_type_ids` for models that take them), (B, T) with both axes dynamic, and gives
the model's per-token outputs: label logits (B, T, labels) for token classification,
start and end scores (B, T, 2) for question answering. The tokenizer runs outside the
graph and is saved beside it (`hf/`, or the task's own files). The folder:

    model.onnx  model.int8.onnx  model.json  hf/  export.json  README.md

Parity: each test input's outputs are read as the task reads them (a label per word,
an answer per question); the float32 file must agree with PyTorch on at least 99.5 %
of those and stay within an output difference of 1e-3 · (1 + largest |output|),
otherwise the export fails (files kept for inspection). The INT8 file's agreement and
change of the task's metric are reported, not enforced.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import kdistill.export
from kdistill.checkpoint import atomic_write_json, atomic_write_text
from kdistill.errors import ExportError
from kdistill.export import (
    BATCH,
    CALIBRATION,
    OPSET,
    OnnxModel,
    card_header,
    check_parity,
    claim_export_dir,
    file_mb,
    latency_markdown,
    latency_rows,
    quantize_int8,
    require_onnx,
    run_teacher,
    summary_line,
    to_onnx,
    versions,
)
from kdistill.tasks.encoder import EncoderTask, load_model, saved_data


class Positional(nn.Module):
    """The model as exported: its input tensors by position, its per-token outputs."""

    def __init__(self, net: nn.Module, names: list[str]) -> None:
        super().__init__()
        self.net, self.names = net, names

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        return self.net(**dict(zip(self.names, tensors, strict=True)))


def _feed(task: EncoderTask, data: Any, net: nn.Module, split: str, rows: torch.Tensor):
    batch = task.inputs(data, net, split, rows)
    names = [n for n in ("input_ids", "attention_mask", "token_type_ids") if n in batch]
    return names, tuple(batch[n] for n in names)


def _raw(task: EncoderTask, engine: Any, data: Any, net: nn.Module, *, numpy: bool):
    """Each test input's per-token outputs (T_i, C), shortest inputs first in batches."""
    lengths = task.lengths(data, net, "test")
    order = torch.sort(lengths, stable=True).indices
    out: dict[int, torch.Tensor] = {}
    with torch.inference_mode():
        for chunk in order.split(64):
            _, tensors = _feed(task, data, net, "test", chunk)
            if numpy:
                result = torch.from_numpy(np.asarray(engine(*[t.numpy() for t in tensors])))
            else:
                result = engine(*tensors)
            for i, r in enumerate(chunk.tolist()):
                out[r] = result[i, : int(lengths[r])].float()
    return [out[r] for r in range(len(lengths))]


def _parity(task: EncoderTask, data: Any, net: nn.Module, reference: list[torch.Tensor], raw):
    ref, got = torch.cat(reference), torch.cat(raw)
    base = task.score(data, "test", task.from_raw(data, net, "test", reference), None)
    mine = task.score(
        data, "test", task.from_raw(data, net, "test", raw),
        task.from_raw(data, net, "test", reference),
    )  # fmt: skip
    metric = task.metric
    return {
        "top1_agreement": round(float(mine["agreement"]), 6),
        "max_abs_diff": float((ref - got).abs().max()),
        "tolerance": 1e-3 * (1 + float(ref.abs().max())),
        "test": {k: v for k, v in mine.items() if not isinstance(v, dict)},
        f"{metric}_change": round(mine[metric] - base[metric], 6),
    }


def export_encoder(
    task: EncoderTask,
    weights: Path,
    *,
    output: Path | None = None,
    overwrite: bool = False,
    int8: str | None = "dynamic",
    threads: int = 1,
    data_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Export a stage's model to `output` (default <stage>/export); returns what
    export.json holds."""
    require_onnx()
    if not weights.with_name("model.json").is_file():
        raise ExportError(f"{weights} has no model.json beside it; export a stage folder")
    data = saved_data(task, weights, data_dir)
    net = load_model(task, weights, data)
    lengths = task.lengths(data, net, "test")
    names, example = _feed(
        task, data, net, "test", torch.sort(lengths, descending=True).indices[:2]
    )
    module = Positional(net, names).eval()
    folder = claim_export_dir(output or weights.parent / "export", overwrite=overwrite)
    onnx_path = folder / "model.onnx"
    try:
        exporter = to_onnx(
            module, example, onnx_path, input_names=names,
            dynamic={name: {0: "batch", 1: "sequence"} for name in names},
        )  # fmt: skip
    except ExportError:
        shutil.rmtree(folder)
        raise
    files = {"fp32": onnx_path}
    if int8 is not None:
        files["int8"] = folder / "model.int8.onnx"
        count = min(CALIBRATION, len(task.lengths(data, net, "train")))
        calibration = [
            _feed(task, data, net, "train", rows)[1] for rows in torch.arange(count).split(32)
        ]
        quantize_int8(onnx_path, files["int8"], mode=int8, calibration=calibration)
    shutil.copyfile(weights.with_name("model.json"), folder / "model.json")
    for extra in weights.parent.iterdir():  # the tokenizer: hf/, or the task's own files
        if extra.name == "hf" and extra.is_dir():
            shutil.copytree(extra, folder / "hf")
        elif extra.suffix == ".txt" and extra.is_file():
            shutil.copyfile(extra, folder / extra.name)

    reference = _raw(task, module, data, net, numpy=False)
    sessions = {kind: OnnxModel(path, threads=threads) for kind, path in files.items()}
    parity: dict[str, Any] = {
        kind: _parity(task, data, net, reference, _raw(task, s, data, net, numpy=True))
        for kind, s in sessions.items()
    }
    pytorch = task.score(data, "test", task.from_raw(data, net, "test", reference), None)
    parity["pytorch"] = {"test": {k: v for k, v in pytorch.items() if not isinstance(v, dict)}}
    engines: list[tuple[str, Any, bool]] = [("PyTorch FP32", module, True)]
    engines += [(f"ONNX Runtime {kind.upper()}", s, False) for kind, s in sessions.items()]
    latency = latency_rows(engines, *_latency_inputs(task, data, net), threads=threads)
    teacher_weights = run_teacher(weights)
    if teacher_weights is not None:
        teacher = load_model(task, teacher_weights, data)
        latency += latency_rows(
            [
                (
                    "teacher, PyTorch FP32",
                    Positional(
                        teacher, _feed(task, data, teacher, "test", torch.arange(1))[0]
                    ).eval(),
                    True,
                )
            ],
            *_latency_inputs(task, data, teacher),
            threads=threads,
        )
    record = {
        "stage": str(weights.parent),
        "task": task.name,
        "exporter": exporter,
        "opset": OPSET,
        "int8": int8,
        "inputs": names,
        "files": {kind: {"file": p.name, "mb": file_mb(p)} for kind, p in files.items()},
        "parity": parity,
        "latency": latency,
        "threads": threads,
        "versions": versions(),
    }
    atomic_write_json(folder / "export.json", record)
    atomic_write_text(folder / "README.md", model_card(task, record))
    check_parity(parity["fp32"], folder, agreement=task.agreement)
    return record


def _latency_inputs(task: EncoderTask, data: Any, net: nn.Module):
    """The first test inputs one at a time, and the first BATCH at once (for a task with
    heavy inputs, its own `latency_rows` count)."""
    rows = len(task.lengths(data, net, "test"))
    count = min(rows, task.latency_rows or kdistill.export.TIMING.singles)
    singles = [_feed(task, data, net, "test", torch.tensor([i]))[1] for i in range(count)]
    batch = _feed(task, data, net, "test", torch.arange(min(rows, task.latency_rows or BATCH)))[1]
    return singles, batch


def model_card(task: EncoderTask, record: dict[str, Any]) -> str:
    lines = card_header(f"Exported {task.name.replace('_', ' ')} model", record)
    metric = task.metric
    lines += [
        f"- Inputs {', '.join(f'`{n}`' for n in record['inputs'])}: int64 (batch, sequence), "
        "from the tokenizer saved beside the model; padding on the right.",
        f"- Output: float32 (batch, sequence, outputs per token); {task.reading}.",
        "",
        "## Parity with PyTorch on the test split",
        "",
        f"| model | size (MB) | test {metric} | {task.agreement} agreement | largest difference |",
        "|---|---|---|---|---|",
        f"| PyTorch FP32 | — | {100 * record['parity']['pytorch']['test'][metric]:.2f} | — | — |",
    ]
    for kind, info in record["files"].items():
        parity = record["parity"][kind]
        lines.append(
            f"| {info['file']} | {info['mb']:.3f} | {100 * parity['test'][metric]:.2f} | "
            f"{parity['top1_agreement']:.2%} | {parity['max_abs_diff']:.3g} |"
        )
    lines += latency_markdown(record)
    return "\n".join(lines) + "\n"


def export_summary(record: dict[str, Any]) -> str:
    metric = next(k for k in record["parity"].get("fp32", {}) if k.endswith("_change"))
    change = record["parity"].get("int8", {}).get(metric, 0.0)
    name = metric.removesuffix("_change")
    return summary_line(
        record, agreement="output", int8_change=f"test {name} change {change * 100:+.2f}"
    )
