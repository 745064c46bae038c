"""The token-classification results: entity F1 (strict IOB2) with precision, recall,
the lenient conlleval F1, agreement with the teacher and the cost per sentence, mean ±
std over seeds; entity F1 per type; the gap the teacher closed (on F1). Built from the
run folder's files alone."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from rich.console import Console

from kdistill.report import (
    best_metric_rows,
    markdown_table,
    metric_gap_line,
    metric_rows,
    show_table,
    write_metric_report,
)

COLUMNS = (
    "stage",
    "seeds",
    "entity F1",
    "precision",
    "recall",
    "F1 conlleval",
    "word accuracy %",
    "agreement %",
    "params",
    "FLOPs/sentence",
    "latency ms/sentence",
    "size MB",
    "train time",
)
BEST_COLUMNS = ("stage", "seeds", "best epoch", "val entity F1", "test entity F1")
METRIC_SENTENCE = (
    "Entity F1, precision and recall ×100 on test, seqeval with the IOB2 scheme in strict "
    "mode (an entity counts when its type and both boundaries match; a predicted I- "
    "without its B- starts none); F1 conlleval: the CoNLL-2003 script's lenient reading "
    "(a stray I- starts an entity), for comparison with published numbers. Mean ± sample "
    "standard deviation over seeds."
)


def write_report(run_dir: str | Path) -> dict[str, Any]:
    """results.json and results.md in the run folder; returns the results."""
    return write_metric_report(
        run_dir, "f1", render_markdown, lambda results: {"per_type": per_type(results)}
    )


def per_type(results: dict[str, Any]) -> dict[str, dict[str, list[float]]]:
    """Test F1 per entity type and stage: [mean, std] over seeds."""
    out: dict[str, dict[str, list[float]]] = {}
    for name, stage in results["stages"].items():
        by_type: dict[str, list[float]] = {}
        for record in stage["per_seed"]:
            for kind, scores in ((record.get("test") or {}).get("per_type") or {}).items():
                by_type.setdefault(kind, []).append(scores["f1"])
        out[name] = {
            kind: [statistics.fmean(v), statistics.stdev(v) if len(v) > 1 else 0.0]
            for kind, v in sorted(by_type.items())
        }
    return out


def table_rows(results: dict[str, Any]) -> list[list[str]]:
    return metric_rows(
        results, ("f1", "precision", "recall", "f1_conlleval", "token_accuracy", "agreement")
    )


def type_rows(results: dict[str, Any]) -> tuple[tuple[str, ...], list[list[str]]]:
    kinds = sorted({k for types in results["per_type"].values() for k in types})
    rows = []
    for name, types in results["per_type"].items():
        n = len(results["stages"][name]["seeds"])
        cells = []
        for kind in kinds:
            if kind not in types:
                cells.append("—")
            else:
                mean, std = types[kind]
                cells.append(f"{100 * mean:.2f}" + (f" ± {100 * std:.2f}" if n > 1 else ""))
        rows.append([name, *cells])
    return ("stage", *kinds), rows


def render_markdown(results: dict[str, Any]) -> str:
    lines = [f"# Results: {results['recipe'] or 'unnamed recipe'}", ""]
    lines += markdown_table(COLUMNS, table_rows(results))
    lines += [
        "",
        METRIC_SENTENCE,
        "",
        metric_gap_line(results, "entity F1"),
        "",
        "## Entity F1 per type",
        "",
    ]
    header, rows = type_rows(results)
    lines += markdown_table(header, rows)
    lines += ["", "## Best-on-validation checkpoints", ""]
    best = best_metric_rows(results, "f1")
    if best:
        lines += [
            "Each seed's checkpoint with the best validation entity F1, measured on test "
            "once; the test set played no part in choosing it.",
            "",
        ]
        lines += markdown_table(BEST_COLUMNS, best)
    else:
        lines.append("None: the run has no validation split.")
    return "\n".join(lines) + "\n"


def print_table(results: dict[str, Any], console: Console) -> None:
    show_table(
        console,
        f"Results: {results['recipe'] or 'unnamed recipe'}",
        COLUMNS,
        table_rows(results),
        caption=METRIC_SENTENCE,
    )
    console.print(metric_gap_line(results, "entity F1"))


def eval_summary(result: dict[str, Any]) -> str:
    test, cost = result["test"], result["cost"]
    return (
        f"{result['checkpoint']}: test entity F1 {100 * test['f1']:.2f} (precision "
        f"{100 * test['precision']:.2f}, recall {100 * test['recall']:.2f}, {test['entities']} "
        f"entities); {cost['params']:,} params, {cost.get('latency_ms_single', 0):.2f} ms/sentence"
    )
