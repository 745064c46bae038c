"""`kdistill export` for token classifiers: ONNX (and INT8 ONNX), checked against
PyTorch word by word on the whole test split, and timed side by side.

The graph takes `input_ids` and `attention_mask` (B, T), both axes dynamic, and gives
logits per token (B, T, labels); the tokenizer runs outside it and is saved beside it
(`hf/`, or `vocab.txt` for the BiLSTM's words), and a word's label is read at its
first token, as in training. The folder:

    model.onnx  model.int8.onnx  model.json  hf/ or vocab.txt  export.json  README.md

Parity: the float32 file must predict the same label as PyTorch for at least 99.5 % of
the test words and stay within a logit difference of 1e-3 · (1 + largest |logit|);
otherwise the export fails (files kept for inspection). The INT8 file's word agreement
and entity-F1 change are reported, not enforced.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from kdistill.checkpoint import atomic_write_json, atomic_write_text
from kdistill.errors import ExportError
from kdistill.export import (
    BATCH,
    CALIBRATION,
    OPSET,
    SINGLE_SAMPLES,
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
from kdistill.tasks.encoder import saved_data
from kdistill.tasks.token_classification.data import TaggedSentences
from kdistill.tasks.token_classification.models import word_logits
from kdistill.tasks.token_classification.pipeline import TASK, load_tagger
from kdistill.tasks.token_classification.steps import entity_scores


class TokenLogits(nn.Module):
    """The tagger as exported: (input_ids, attention_mask) -> logits per token."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.net(input_ids=input_ids, attention_mask=attention_mask)


def _inputs(data: TaggedSentences, net: nn.Module, split: str, rows: torch.Tensor):
    batch = data.batch(net, split, rows)
    return (batch["input_ids"], batch["attention_mask"]), batch["first"]


def _words(
    engine: Any, data: TaggedSentences, net: nn.Module, *, numpy: bool
) -> list[torch.Tensor]:
    """Each test sentence's word logits (W_i, C) from `engine` (PyTorch or a session),
    shortest sentences first in batches of 64; a word without a first token reads 0s."""
    encoded = data.encode(net, "test")
    order = torch.sort(encoded.lengths, stable=True).indices
    out: dict[int, torch.Tensor] = {}
    with torch.inference_mode():
        for chunk in order.split(64):
            (ids, mask), first = _inputs(data, net, "test", chunk)
            if numpy:
                logits = torch.from_numpy(np.asarray(engine(ids.numpy(), mask.numpy())))
            else:
                logits = engine(ids, mask)
            words = word_logits(logits.float(), first)
            for i, r in enumerate(chunk.tolist()):
                n = len(encoded.first[r])
                w = words[i, :n].clone()
                w[first[i, :n] < 0] = 0.0
                out[r] = w
    return [out[r] for r in range(len(encoded.ids))]


def _parity(
    reference: list[torch.Tensor], logits: list[torch.Tensor], data: TaggedSentences
) -> dict[str, Any]:
    ref, got = torch.cat(reference), torch.cat(logits)
    test = entity_scores(data, "test", logits)
    base = entity_scores(data, "test", reference)
    return {
        "top1_agreement": round(float((ref.argmax(-1) == got.argmax(-1)).float().mean()), 6),
        "max_abs_diff": float((ref - got).abs().max()),
        "tolerance": 1e-3 * (1 + float(ref.abs().max())),
        "test": {k: v for k, v in test.items() if k != "per_type"},
        "f1_change": round(test["f1"] - base["f1"], 6),
    }


def _load(weights: Path, data_dir: str | Path | None) -> tuple[nn.Module, TaggedSentences]:
    if not weights.with_name("model.json").is_file():
        raise ExportError(f"{weights} has no model.json beside it; export a stage folder")
    data = saved_data(TASK, weights, data_dir)
    return load_tagger(weights, data), data


def export_tagger(
    weights: Path,
    *,
    output: Path | None = None,
    overwrite: bool = False,
    int8: str | None = "dynamic",
    threads: int = 1,
    data_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Export a stage's token classifier to `output` (default <stage>/export); returns
    what export.json holds."""
    require_onnx()
    net, data = _load(weights, data_dir)
    module = TokenLogits(net).eval()
    folder = claim_export_dir(output or weights.parent / "export", overwrite=overwrite)
    encoded = data.encode(net, "test")
    longest = torch.sort(encoded.lengths, descending=True).indices[:2]
    example, _ = _inputs(data, net, "test", longest)
    dynamic = {
        "input_ids": {0: "batch", 1: "sequence"},
        "attention_mask": {0: "batch", 1: "sequence"},
    }
    onnx_path = folder / "model.onnx"
    try:
        exporter = to_onnx(
            module, example, onnx_path, input_names=["input_ids", "attention_mask"], dynamic=dynamic
        )
    except ExportError:
        shutil.rmtree(folder)
        raise
    files = {"fp32": onnx_path}
    if int8 is not None:
        files["int8"] = folder / "model.int8.onnx"
        calibration = [
            _inputs(data, net, "train", rows)[0]
            for rows in torch.arange(min(CALIBRATION, len(data.train))).split(32)
        ]
        quantize_int8(onnx_path, files["int8"], mode=int8, calibration=calibration)
    shutil.copyfile(weights.with_name("model.json"), folder / "model.json")
    for extra in ("hf", "vocab.txt"):
        source = weights.parent / extra
        if source.is_dir():
            shutil.copytree(source, folder / extra)
        elif source.is_file():
            shutil.copyfile(source, folder / extra)

    reference = _words(module, data, net, numpy=False)
    sessions = {kind: OnnxModel(path, threads=threads) for kind, path in files.items()}
    parity: dict[str, Any] = {
        kind: _parity(reference, _words(session, data, net, numpy=True), data)
        for kind, session in sessions.items()
    }
    pytorch = entity_scores(data, "test", reference)
    parity["pytorch"] = {"test": {k: v for k, v in pytorch.items() if k != "per_type"}}
    singles, batch = _latency_inputs(data, net)
    engines: list[tuple[str, Any, bool]] = [("PyTorch FP32", module, True)]
    engines += [(f"ONNX Runtime {kind.upper()}", s, False) for kind, s in sessions.items()]
    latency = latency_rows(engines, singles, batch, threads=threads)
    teacher_weights = run_teacher(weights)
    if teacher_weights is not None:
        teacher, _ = _load(teacher_weights, data_dir)
        t_singles, t_batch = _latency_inputs(data, teacher)
        latency += latency_rows(
            [("teacher, PyTorch FP32", TokenLogits(teacher).eval(), True)],
            t_singles,
            t_batch,
            threads=threads,
        )
    record = {
        "stage": str(weights.parent),
        "exporter": exporter,
        "opset": OPSET,
        "int8": int8,
        "labels": data.label_names,
        "files": {kind: {"file": p.name, "mb": file_mb(p)} for kind, p in files.items()},
        "parity": parity,
        "latency": latency,
        "threads": threads,
        "versions": versions(),
    }
    atomic_write_json(folder / "export.json", record)
    atomic_write_text(folder / "README.md", model_card(record))
    check_parity(parity["fp32"], folder, agreement="word label")
    return record


def _latency_inputs(data: TaggedSentences, net: nn.Module):
    """The first test sentences one at a time, and the first BATCH at once."""
    count = len(data.test)
    singles = [
        _inputs(data, net, "test", torch.tensor([i]))[0] for i in range(min(SINGLE_SAMPLES, count))
    ]
    return singles, _inputs(data, net, "test", torch.arange(min(BATCH, count)))[0]


def model_card(record: dict[str, Any]) -> str:
    labels = record["labels"]
    lines = card_header("Exported token classifier", record)
    lines += [
        "- Inputs `input_ids`, `attention_mask`: int64 (batch, sequence), the tokenizer "
        "saved beside the model (hf/ or vocab.txt); padding on the right.",
        f"- Output `logits`: float32 (batch, sequence, {len(labels)}), labels "
        + ", ".join(labels)
        + "; a word's label is read at its first token.",
        "",
        "## Parity with PyTorch on the test split",
        "",
        "| model | size (MB) | entity F1 | word agreement | largest logit difference |",
        "|---|---|---|---|---|",
        f"| PyTorch FP32 | — | {100 * record['parity']['pytorch']['test']['f1']:.2f} | — | — |",
    ]
    for kind, info in record["files"].items():
        parity = record["parity"][kind]
        lines.append(
            f"| {info['file']} | {info['mb']:.3f} | {100 * parity['test']['f1']:.2f} | "
            f"{parity['top1_agreement']:.2%} | {parity['max_abs_diff']:.3g} |"
        )
    lines += latency_markdown(record)
    return "\n".join(lines) + "\n"


def export_summary(record: dict[str, Any]) -> str:
    change = record["parity"].get("int8", {}).get("f1_change", 0.0)
    return summary_line(
        record, agreement="word label", int8_change=f"entity F1 change {change * 100:+.2f}"
    )
