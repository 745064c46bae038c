"""The question-answering results: SQuAD v1.1 exact match and F1 on the held-out
articles, agreement with the teacher's answers, the cost per window and per question,
mean ± std over seeds; the gap the teacher closed (on F1). Built from the run folder's
files alone."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console

from kdistill.report import (
    best_metric_rows,
    format_value,
    markdown_table,
    metric_gap_line,
    metric_rows,
    show_table,
    write_metric_report,
)

COLUMNS = (
    "stage",
    "seeds",
    "EM",
    "F1",
    "answer agreement %",
    "params",
    "FLOPs/window",
    "latency ms/window",
    "latency ms/question",
    "size MB",
    "train time",
)
BEST_COLUMNS = ("stage", "seeds", "best epoch", "val F1", "test F1")
METRIC_SENTENCE = (
    "Exact match and F1 ×100 on the test articles, as SQuAD v1.1's evaluation script "
    "computes them (answers normalised: lower case, no punctuation or articles; the best "
    "over a question's reference answers); answer agreement: the student's answer is the "
    "teacher's, normalised. Latency: one window alone (ms/window), and all of a "
    "question's windows in one batch (ms/question), median over the first test questions, "
    "decoding not included. Mean ± sample standard deviation over seeds."
)


def write_report(run_dir: str | Path) -> dict[str, Any]:
    """results.json and results.md in the run folder; returns the results."""
    return write_metric_report(run_dir, "f1", render_markdown)


def table_rows(results: dict[str, Any]) -> list[list[str]]:
    rows = metric_rows(results, ("exact", "f1", "agreement"))
    at = COLUMNS.index("latency ms/question")
    for row, stage in zip(rows, results["stages"].values(), strict=True):
        per_question = (stage["cost"] or {}).get("latency_ms_request")
        row.insert(at, format_value(per_question, "{:.2f}"))
    return rows


def render_markdown(results: dict[str, Any]) -> str:
    lines = [f"# Results: {results['recipe'] or 'unnamed recipe'}", ""]
    lines += markdown_table(COLUMNS, table_rows(results))
    lines += ["", METRIC_SENTENCE, "", metric_gap_line(results, "F1"), ""]
    lines += ["## Best-on-validation checkpoints", ""]
    best = best_metric_rows(results, "f1")
    if best:
        lines += [
            "Each seed's checkpoint with the best validation F1, measured on the test "
            "articles once; they played no part in choosing it.",
            "",
        ]
        lines += markdown_table(BEST_COLUMNS, best)
    else:
        lines.append("None: the run has no validation articles.")
    return "\n".join(lines) + "\n"


def print_table(results: dict[str, Any], console: Console) -> None:
    title = f"Results: {results['recipe'] or 'unnamed recipe'}"
    show_table(console, title, COLUMNS, table_rows(results), caption=METRIC_SENTENCE)
    console.print(metric_gap_line(results, "F1"))


def eval_summary(result: dict[str, Any]) -> str:
    test, cost = result["test"], result["cost"]
    return (
        f"{result['checkpoint']}: test EM {100 * test['exact']:.2f}, F1 {100 * test['f1']:.2f} "
        f"over {test['questions']} questions; {cost['params']:,} params, "
        f"{cost.get('latency_ms_single', 0):.2f} ms/window, "
        f"{cost.get('latency_ms_request', 0):.2f} ms/question (all its windows)"
    )
