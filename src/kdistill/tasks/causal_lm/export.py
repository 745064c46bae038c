"""`kdistill export` for causal language models: the next-token logits as ONNX (and
INT8 ONNX), checked against PyTorch on the validation text, and timed side by side.

The graph maps token ids (int64, batch × sequence, both axes dynamic up to the model's
context) to logits (batch × sequence × vocabulary). Generation stays in PyTorch (or
any runtime that loads the `hf/` folder): the export holds no sampling loop and no
key/value cache, so decoding with it recomputes the whole prefix at each token. The
folder:

    model.onnx        float32 logits
    model.int8.onnx   ONNX Runtime INT8: dynamic, or static with --int8 static
    hf/               the stage's save_pretrained folder with its tokenizer
    model.json, export.json, README.md

Parity on the validation rows: next-token top-1 agreement of at least 99.5 % and a
logit difference within 1e-3 · (1 + largest |logit|) for float32, or the export fails
(files kept); the INT8 model's agreement and loss change are reported.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from kdistill.checkpoint import atomic_write_json, atomic_write_text
from kdistill.data.lm_text import IGNORE_INDEX
from kdistill.export import (
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
from kdistill.tasks.causal_lm.measure import load_lm_stage
from kdistill.tasks.causal_lm.models import CausalLM

BATCH = 8  # validation rows per call, for parity


class Logits(nn.Module):
    """token ids (B, T) -> next-token logits (B, T, V) of a CausalLM, nothing else."""

    def __init__(self, model: CausalLM) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        hidden = self.model.hf.base_model(input_ids=input_ids, use_cache=False).last_hidden_state
        return self.model.logits(hidden)


def export_lm(
    weights: Path,
    *,
    output: Path | None = None,
    overwrite: bool = False,
    int8: str | None = "dynamic",
    threads: int = 1,
    data_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Export a language-model stage (its model.safetensors) to `output` (default
    <stage>/export); returns what export.json holds."""
    require_onnx()
    net, corpus = load_lm_stage(weights, data_dir=data_dir)
    folder = claim_export_dir(output or weights.parent / "export", overwrite=overwrite)
    module = Logits(net).eval()
    rows = corpus.val
    inputs = rows[:, :-1].contiguous()
    labels = corpus.val_labels if corpus.val_labels is not None else rows[:, 1:]
    train = corpus.train[: min(CALIBRATION // 8, len(corpus.train)), :-1]
    calibration = [(train[i : i + BATCH],) for i in range(0, len(train), BATCH)]
    onnx_path = folder / "model.onnx"
    exporter = to_onnx(
        module,
        (inputs[:2],),
        onnx_path,
        input_names=["input_ids"],
        dynamic={"input_ids": {0: "batch", 1: "sequence"}},
    )
    files = {"fp32": onnx_path}
    if int8 is not None:
        files["int8"] = folder / "model.int8.onnx"
        quantize_int8(onnx_path, files["int8"], mode=int8, calibration=calibration)
    shutil.copytree(weights.parent / "hf", folder / "hf")
    shutil.copyfile(weights.with_name("model.json"), folder / "model.json")

    sessions = {kind: OnnxModel(path, threads=threads) for kind, path in files.items()}
    parity = _parity(module, sessions, inputs, labels)
    engines: list[tuple[str, Any, bool]] = [("PyTorch FP32", module, True)]
    engines += [(f"ONNX Runtime {kind.upper()}", s, False) for kind, s in sessions.items()]
    record = {
        "stage": str(weights.parent),
        "task": "causal_lm",
        "exporter": exporter,
        "opset": OPSET,
        "int8": int8,
        "input": {
            "name": "input_ids",
            "shape": ["batch", "sequence"],
            "dtype": "int64",
            "what": f"token ids of the tokenizer in hf/ (vocabulary {corpus.vocab_size}), "
            f"sequence up to {net.context or 'any length'}",
        },
        "vocab_size": corpus.vocab_size,
        "files": {kind: {"file": p.name, "mb": file_mb(p)} for kind, p in files.items()},
        "parity": parity,
        "latency": latency_rows(engines, *first_rows(inputs), threads=threads)
        + _teacher_latency(weights, data_dir, threads),
        "latency_unit": f"one row = one sequence of {inputs.shape[1]} tokens",
        "threads": threads,
        "versions": versions(),
    }
    atomic_write_json(folder / "export.json", record)
    atomic_write_text(folder / "README.md", model_card(record))
    check_parity(parity["fp32"], folder, agreement="next-token")
    return record


def _teacher_latency(
    weights: Path, data_dir: str | Path | None, threads: int
) -> list[dict[str, Any]]:
    """The run's teacher in PyTorch on its own validation rows, for scale, when the stage
    is in a run folder that has one and is not itself the teacher."""
    found = run_teacher(weights)
    if found is None:
        return []
    teacher, corpus = load_lm_stage(found, data_dir=data_dir)
    rows = corpus.val[:, :-1].contiguous()
    engines: list[tuple[str, Any, bool]] = [("teacher, PyTorch FP32", Logits(teacher).eval(), True)]
    return latency_rows(engines, *first_rows(rows), threads=threads)


def _parity(
    module: nn.Module, sessions: dict[str, OnnxModel], inputs: torch.Tensor, labels: torch.Tensor
) -> dict[str, Any]:
    """Per engine, over the validation rows: loss per counted token, next-token top-1
    agreement with PyTorch on those tokens, and the largest logit difference."""
    totals: dict[str, dict[str, float]] = {
        kind: {"nll": 0.0, "agree": 0.0, "diff": 0.0} for kind in ("pytorch", *sessions)
    }
    counted, largest = 0, 0.0
    with torch.inference_mode():
        for start in range(0, len(inputs), BATCH):
            x, y = inputs[start : start + BATCH], labels[start : start + BATCH]
            keep = y != IGNORE_INDEX
            reference = module(x).float()
            largest = max(largest, float(reference.abs().max()))
            counted += int(keep.sum())
            outputs = {"pytorch": reference}
            for kind, session in sessions.items():
                outputs[kind] = torch.from_numpy(np.asarray(session(x.numpy()))).float()
            top = reference.argmax(-1)
            for kind, logits in outputs.items():
                nll = torch.nn.functional.cross_entropy(
                    logits.reshape(-1, logits.shape[-1]),
                    y.reshape(-1),
                    ignore_index=IGNORE_INDEX,
                    reduction="sum",
                )
                totals[kind]["nll"] += float(nll)
                totals[kind]["agree"] += float((logits.argmax(-1) == top)[keep].sum())
                totals[kind]["diff"] = max(
                    totals[kind]["diff"], float((logits - reference).abs().max())
                )
    base = totals["pytorch"]["nll"] / max(counted, 1)
    result: dict[str, Any] = {"pytorch": {"val": _val(base)}}
    for kind in sessions:
        loss = totals[kind]["nll"] / max(counted, 1)
        result[kind] = {
            "top1_agreement": round(totals[kind]["agree"] / max(counted, 1), 6),
            "max_abs_diff": totals[kind]["diff"],
            "tolerance": 1e-3 * (1 + largest),
            "val": _val(loss),
            "loss_change": loss - base,
        }
    result["tokens"] = counted
    return result


def _val(loss: float) -> dict[str, float]:
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0))}


def model_card(record: dict[str, Any]) -> str:
    """README.md of a language-model export."""
    lines = card_header("Exported causal language model (next-token logits)", record)
    lines += [
        f"- Input `input_ids`: int64 (batch, sequence), {record['input']['what']}.",
        f"- Output `logits`: float32 (batch, sequence, {record['vocab_size']}).",
        "- Generation is not in the graph: decode with the `hf/` folder (transformers), or "
        "call the ONNX model on the whole prefix at each step (no key/value cache).",
        "",
        f"## Parity with PyTorch on the validation text ({record['parity']['tokens']:,} tokens)",
        "",
        "| model | size (MB) | val loss/token | perplexity | next-token agreement | "
        "largest logit difference |",
        "|---|---|---|---|---|---|",
    ]
    base = record["parity"]["pytorch"]["val"]
    lines.append(f"| PyTorch FP32 | — | {base['loss']:.4f} | {base['perplexity']:.2f} | — | — |")
    for kind, info in record["files"].items():
        parity = record["parity"][kind]
        lines.append(
            f"| {info['file']} | {info['mb']:.3f} | {parity['val']['loss']:.4f} | "
            f"{parity['val']['perplexity']:.2f} | {parity['top1_agreement']:.2%} | "
            f"{parity['max_abs_diff']:.3g} |"
        )
    lines += latency_markdown(record)
    lines += ["", f"Latency rows: {record['latency_unit']}.", ""]
    return "\n".join(lines)


def export_summary(record: dict[str, Any]) -> str:
    """One line for the terminal."""
    change = record["parity"].get("int8", {}).get("loss_change", 0.0)
    return summary_line(
        record, agreement="next-token", int8_change=f"val loss change {change:+.4f} nats/token"
    )


def quantized_lm_stage(
    source: Path, *, output: Path, mode: str, threads: int, data_dir: str | Path | None
) -> dict[str, Any]:
    """The quantize stage of a language-model run: `source` (a stage folder) exported
    with INT8 into `output`/export, and its eval.json record: the INT8 model's
    validation loss (ONNX Runtime), bits per character over the same tokens as the
    source's, the source's parameters and FLOPs, the INT8 file's size and ONNX
    Runtime's INT8 latency per token, with the side-by-side latency table."""
    started = time.perf_counter()
    record = export_lm(
        source / "model.safetensors",
        output=output / "export",
        overwrite=True,
        int8=mode,
        threads=threads,
        data_dir=data_dir,
    )
    measured = json.loads((source / "eval.json").read_text(encoding="utf-8"))
    val, cost = measured["val"], measured["cost"]
    loss = record["parity"]["int8"]["val"]["loss"]
    int8 = next(row for row in record["latency"] if row["engine"] == "ONNX Runtime INT8")
    return {
        "task": "causal_lm",
        "measured_split": measured.get("measured_split", "val"),
        "source": source.parent.name,
        "mode": mode,
        "val": {
            **record["parity"]["int8"]["val"],
            "bpc": loss * val["tokens"] / (val["characters"] * math.log(2)),
            "tokens": val["tokens"],
            "characters": val["characters"],
        },
        "agreement_with_fp32": record["parity"]["int8"]["top1_agreement"],
        "cost": {
            "params": cost["params"],
            "flops_per_token": cost["flops_per_token"],
            "size_bytes": (output / "export" / "model.int8.onnx").stat().st_size,
            "latency_ms_per_token": int8["batch_1"]["median_ms"] / cost["seq_len"],
            "seq_len": cost["seq_len"],
            "device": "cpu, ONNX Runtime INT8",
            "threads": threads,
        },
        "latency": record["latency"],
        "exporter": record["exporter"],
        "train_seconds": round(time.perf_counter() - started, 3),
    }


def evaluate_lm_onnx(path: Path, *, data_dir: str | Path | None = None) -> dict[str, Any]:
    """`kdistill eval` of a language-model quantize stage: its INT8 ONNX file (`path`)
    on the validation rows of the stage it was quantized from."""
    require_onnx()
    recorded, weights = quantized_source(path)
    start = time.perf_counter()
    net, corpus = load_lm_stage(weights, data_dir=data_dir)
    rows = corpus.val
    labels = corpus.val_labels if corpus.val_labels is not None else rows[:, 1:]
    parity = _parity(Logits(net).eval(), {"int8": OnnxModel(path, threads=1)}, rows[:, :-1], labels)
    return {
        "checkpoint": str(path),
        "task": "causal_lm",
        "val": {
            **parity["int8"]["val"],
            "bpc": parity["int8"]["val"]["loss"]
            * parity["tokens"]
            / (recorded["val"]["characters"] * math.log(2)),
            "tokens": parity["tokens"],
            "characters": recorded["val"]["characters"],
        },
        "cost": recorded["cost"],
        "seconds": round(time.perf_counter() - start, 3),
    }
