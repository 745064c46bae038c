"""INT8 on the CPU: ONNX Runtime against PyTorch's own paths, on one trained classifier.

The compression issue asks for post-training INT8 through ONNX Runtime or torchao,
whichever is faster here. This script takes a stage's classifier and measures, on the
same inputs and in one process, with one thread:

- PyTorch FP32 (eager), the reference;
- torchao: `quantize_(model, Int8DynamicActivationInt8WeightConfig())`, int8 weights
  per channel and int8 activations quantized per token at run time (PyTorch eager);
- PyTorch's built-in dynamic quantization (`torch.ao.quantization.quantize_dynamic`,
  int8 linear layers, per-tensor weights), deprecated in favour of torchao;
- ONNX Runtime FP32, INT8 dynamic (per-tensor weights) and INT8 dynamic per channel,
  as `kdistill export` writes them.

For each: accuracy and top-1 agreement with PyTorch FP32 on the whole test split, and
the per-sample (batch 1) and batch latency of `kdistill.export.latency_rows`.
torchao is not a kdistill dependency: install it beside the benchmark
(`pip install torchao`); without it its row is skipped with the reason.

    python benchmarks/int8_engines.py runs/sst2_prune_full/distill/seed0 \
        --json benchmarks/results_int8_engines_DATE.json
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import platform
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdistill.export import OnnxModel, latency_rows, quantize_int8, to_onnx, versions
from kdistill.tasks.classification.export import _feed, _logits, _parity
from kdistill.tasks.classification.measure import load_saved_model


def torch_engines(module: nn.Module) -> tuple[dict[str, nn.Module], dict[str, str]]:
    engines: dict[str, nn.Module] = {}
    skipped: dict[str, str] = {}
    try:
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

        model = copy.deepcopy(module)
        quantize_(model, Int8DynamicActivationInt8WeightConfig())
        engines["torchao INT8 dynamic (PyTorch eager)"] = model.eval()
    except Exception as exc:  # not installed, or no CPU path for this model
        skipped["torchao"] = f"{type(exc).__name__}: {exc}"
    engines["torch.ao quantize_dynamic (PyTorch eager)"] = torch.ao.quantization.quantize_dynamic(
        copy.deepcopy(module), {nn.Linear}, dtype=torch.qint8
    ).eval()
    return engines, skipped


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("stage", type=Path, help="a stage folder (runs/X/distill/seed0)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    weights = args.stage / "model.safetensors"
    net, data = load_saved_model(weights)
    feed = _feed(net, data)
    reference = _logits(feed.module, feed.batches)
    results: dict[str, Any] = {"stage": str(args.stage), "engines": {}}
    engines: list[tuple[str, Any, bool]] = [("PyTorch FP32", feed.module, True)]
    eager, results["skipped"] = torch_engines(feed.module)
    engines += [(name, model, True) for name, model in eager.items()]
    with tempfile.TemporaryDirectory() as scratch:
        fp32 = Path(scratch) / "model.onnx"
        example = tuple(t[:2] for t in feed.batches[-1])
        results["exporter"] = to_onnx(
            feed.module, example, fp32, input_names=feed.names, dynamic=feed.dynamic
        )
        sessions = {"ONNX Runtime FP32": OnnxModel(fp32, threads=args.threads)}
        for mode in ("dynamic", "dynamic-per-channel"):
            path = Path(scratch) / f"{mode}.onnx"
            quantize_int8(fp32, path, mode=mode)
            sessions[f"ONNX Runtime INT8 {mode}"] = OnnxModel(path, threads=args.threads)
        engines += [(name, session, False) for name, session in sessions.items()]
        for name, engine, is_torch in engines:
            with torch.inference_mode():
                logits = _logits(engine, feed.batches, numpy=not is_torch)
            results["engines"][name] = _parity(reference, logits, feed.labels)
        for row in latency_rows(engines, feed.singles, feed.batch, threads=args.threads):
            results["engines"][row.pop("engine")]["latency"] = row
    for name, row in results["engines"].items():
        single = row["latency"]["batch_1"]
        print(
            f"{name:45s} test accuracy {100 * row['test']['accuracy']:.2f}%  "
            f"agreement {100 * row['top1_agreement']:.2f}%  "
            f"batch 1: {single['median_ms']:.2f} ms",
            flush=True,
        )
    for name, reason in results["skipped"].items():
        print(f"{name}: skipped ({reason})")
    if args.json:
        results.update(
            date=dt.date.today().isoformat(),
            machine=f"{platform.processor() or platform.machine()}, {args.threads} thread(s)",
            versions=versions(),
        )
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
