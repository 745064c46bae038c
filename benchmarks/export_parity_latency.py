"""`kdistill export` of the shipped recipes' distilled students: parity with PyTorch
and latency of PyTorch FP32, ONNX Runtime FP32 and INT8, and the teacher, side by side.

Each recipe is run in a reduced configuration (stated per recipe below and in the
output: one seed, fewer epochs or characters), because parity and latency depend on
the architecture, not on how long it trained; the accuracy columns are those of the
reduced runs. The translator is exported as a Hugging Face folder, checked by its
translations of the test split (no ONNX graph, no INT8).

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
    "cifar10_cnn_pruned_from_cnn": ["seeds=[0]", "train.epochs=1", "teacher.train.epochs=1"],
    "cifar10_resnet8_from_resnet20": ["seeds=[0]", "train.epochs=1", "teacher.train.epochs=1"],
    **{
        name: [
            "seeds=[0]",
            "data.limit_train=2000",
            "data.text.transfer.augment.max_total=2000",
            "teacher.train.epochs=1",
            "train.epochs=1",
        ]
        for name in (
            "sst2_minilm2_from_minilm",
            "sst2_minilm2_layers_from_minilm",
            "sst2_bilstm_from_minilm",
        )
    },
    "shakespeare_gpt_small_from_gpt": ["seeds=[0]", "data.limit_chars=200000"],
    "shakespeare_gpt_pruned_from_gpt": ["seeds=[0]", "data.limit_chars=200000"],
    "conll_minilm2_from_minilm": [
        "seeds=[0]",
        "data.limit_train=1000",
        "teacher.train.epochs=1",
        "train.epochs=1",
    ],
    "squad_minilm2_from_minilm": [
        "seeds=[0]",
        "data.limit_train=400",
        "teacher.train.epochs=1",
        "train.epochs=1",
    ],
    # a Hugging Face folder checked by its translations; no ONNX, no INT8
    "multi30k_transformer_small_from_base": [
        "seeds=[0]",
        "data.limit_train=3000",
        "data.tokenizer.vocab_size=2000",
        "teacher.train.epochs=2",
        "train.epochs=1",
        "stages=[teacher, distill]",
    ],
}
NO_INT8 = {"multi30k_transformer_small_from_base"}


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
            for mode in (None,) if name in NO_INT8 else ("dynamic", "static"):
                start = time.perf_counter()
                try:
                    record = kdistill.api.export(
                        stage,
                        output=stage / f"export_{mode or 'fp32'}",
                        int8=mode,
                        threads=args.threads,
                    )
                except kdistill.errors.KdistillError as exc:
                    entry[mode or "fp32"] = {"error": str(exc)}
                    print(f"{name} ({mode} INT8): {exc}", flush=True)
                    continue
                entry[mode or "fp32"] = {
                    "export_seconds": round(time.perf_counter() - start, 1),
                    **{
                        k: record[k]
                        for k in ("exporter", "files", "parity", "latency")
                        if k in record
                    },
                }
                print(f"{_line(name, record)} [{mode or 'no'} INT8]", flush=True)
            results["recipes"][name] = entry
            args.out.write_text(json.dumps(results, indent=2) + "\n")


def _line(name: str, record: dict[str, Any]) -> str:
    cells = [f"{row['engine']} {row['batch_1']['median_ms']:.3f} ms" for row in record["latency"]]
    parity = record["parity"]
    if "fp32" in parity:
        fp32 = parity["fp32"]
        checked = (
            f"FP32 agreement {fp32['top1_agreement']:.4f}, max diff {fp32['max_abs_diff']:.2g}"
        )
    else:  # a translator: its reloaded folder's translations of the test split
        checked = f"same translation {parity['same_translation']:.4f} of {parity['sentences']}"
    return f"{name}: {record['exporter']}, {checked}; batch 1: " + ", ".join(cells)


if __name__ == "__main__":
    main()
