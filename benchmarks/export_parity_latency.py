"""`kdistill export` of the shipped recipes' distilled students: parity with PyTorch
and latency of PyTorch FP32, ONNX Runtime FP32 and INT8, and the teacher, side by side.

Each recipe is run in a reduced configuration (stated per recipe below and in the
output: one seed, fewer epochs or characters), because parity and latency depend on
the architecture, not on how long it trained; the accuracy columns are those of the
reduced runs. SST-2: the MiniLM students export; the BiLSTM student cannot be traced
(packed sequences) and is listed as not exported.

    OMP_NUM_THREADS=1 python benchmarks/export_parity_latency.py --out results.json [--threads 1]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import kdistill
import kdistill.errors

REDUCED: dict[str, list[str]] = {
    "mnist_quick": ["seeds=[0]"],
    "mnist_hinton": ["seeds=[0]", "train.epochs=2", "teacher.train.epochs=2"],
    "cifar10_cnn_small_from_cnn": ["seeds=[0]", "train.epochs=1", "teacher.train.epochs=1"],
    "cifar10_resnet8_from_resnet20": ["seeds=[0]", "train.epochs=1", "teacher.train.epochs=1"],
    "sst2_minilm2_from_minilm": [
        "seeds=[0]",
        "data.limit_train=2000",
        "data.text.transfer.augment.max_total=2000",
        "teacher.train.epochs=1",
        "train.epochs=1",
    ],
    "shakespeare_gpt_small_from_gpt": ["seeds=[0]", "data.limit_chars=200000"],
}
NOT_EXPORTED = {"sst2_bilstm_from_minilm": "BiLSTM: packed sequences cannot be traced"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--only", nargs="*", help="recipe names (default: all)")
    args = parser.parse_args()
    results: dict[str, Any] = {
        "date": dt.date.today().isoformat(),
        "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}",
        "threads": args.threads,
        "recipes": {},
        "not_exported": NOT_EXPORTED,
    }
    with tempfile.TemporaryDirectory() as scratch:
        for name, overrides in REDUCED.items():
            if args.only and name not in args.only:
                continue
            run = Path(scratch) / name
            start = time.perf_counter()
            kdistill.api.run(name, overrides, output_dir=run, quiet=True)
            trained = time.perf_counter() - start
            stage = run / "distill" / "seed0"
            entry: dict[str, Any] = {"overrides": overrides, "train_seconds": round(trained, 1)}
            for mode in ("dynamic", "static"):
                start = time.perf_counter()
                try:
                    record = kdistill.api.export(
                        stage, output=stage / f"export_{mode}", int8=mode, threads=args.threads
                    )
                except kdistill.errors.KdistillError as exc:
                    entry[mode] = {"error": str(exc)}
                    print(f"{name} ({mode} INT8): {exc}", flush=True)
                    continue
                entry[mode] = {
                    "export_seconds": round(time.perf_counter() - start, 1),
                    **{k: record[k] for k in ("exporter", "files", "parity", "latency")},
                }
                print(f"{_line(name, record)} [{mode} INT8]", flush=True)
            results["recipes"][name] = entry
            args.out.write_text(json.dumps(results, indent=2) + "\n")


def _line(name: str, record: dict[str, Any]) -> str:
    fp32 = record["parity"]["fp32"]
    cells = [f"{row['engine']} {row['batch_1']['median_ms']:.3f} ms" for row in record["latency"]]
    return (
        f"{name}: {record['exporter']}, FP32 agreement {fp32['top1_agreement']:.4f}, "
        f"max diff {fp32['max_abs_diff']:.2g}; batch 1: " + ", ".join(cells)
    )


if __name__ == "__main__":
    main()
