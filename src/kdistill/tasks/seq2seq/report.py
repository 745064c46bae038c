"""The translation results: BLEU and chrF on test (greedy and beam search, sacrebleu on
detokenized text, with its signature), decoding speed and the speed-up over the
teacher, parameters and size, mean ± std over seeds; the gap closed on beam BLEU; the
best-on-validation checkpoints; a few translations of each model side by side. Built
from the run folder's files alone."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console

from kdistill.report import (
    best_metric_rows,
    format_duration,
    format_si,
    format_value,
    markdown_table,
    mean_pm,
    show_table,
    write_metric_report,
)

COLUMNS = (
    "stage",
    "seeds",
    "BLEU greedy",
    "BLEU beam",
    "chrF beam",
    "tokens/s greedy",
    "speed-up",
    "params",
    "size MB",
    "train time",
)
BEST_COLUMNS = ("stage", "seeds", "best epoch", "val BLEU", "test BLEU greedy")
STAGE_MEANING = {
    "teacher": "the teacher",
    "baseline": "the student on the references alone",
    "distill": "word-level KD (the teacher's distribution at every target token)",
    "seqkd": "sequence-level KD (the student on the teacher's beam translations)",
    "seqkd_distill": "sequence-level + word-level KD",
}


def ordered(results: dict[str, Any]) -> dict[str, Any]:
    """The results with the stages in Kim & Rush's order (teacher, baseline, word-level,
    sequence-level, both), any other stage after them."""
    stages = results["stages"]
    names = [n for n in STAGE_MEANING if n in stages] + [
        n for n in stages if n not in STAGE_MEANING
    ]
    return {**results, "stages": {n: stages[n] for n in names}}


def against_baseline(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Each student stage against the baseline of the same seed: BLEU greedy and beam,
    the mean difference and on how many seeds the stage is better."""
    base = results["stages"].get("baseline")
    if not base:
        return []
    alone = {r["seed"]: r.get("test") or {} for r in base.get("per_seed") or []}
    out = []
    for name, stage in ordered(results)["stages"].items():
        if name in ("teacher", "baseline"):
            continue
        pairs = [
            (alone[r["seed"]], r.get("test") or {})
            for r in stage.get("per_seed") or []
            if r["seed"] in alone
        ]
        row: dict[str, Any] = {"stage": name, "seeds": len(pairs)}
        for metric in ("bleu", "bleu_beam"):
            diffs = [t[metric] - b[metric] for b, t in pairs if metric in t and metric in b]
            if diffs:
                row[metric] = {
                    "mean": sum(diffs) / len(diffs),
                    "better": sum(d > 0 for d in diffs),
                    "lowest": min(diffs),
                }
        out.append(row)
    return out


def _against_lines(results: dict[str, Any]) -> list[str]:
    rows = against_baseline(results)
    if not rows:
        return []
    lines = [
        "## Against the student alone",
        "",
        "Test BLEU of each stage minus the baseline's of the same seed, mean over seeds "
        "(the smallest difference; on how many seeds the stage is better).",
        "",
        "| stage | seeds | BLEU greedy | BLEU beam |",
        "|:---|---:|---:|---:|",
    ]
    for row in rows:
        cells = []
        for metric in ("bleu", "bleu_beam"):
            d = row.get(metric)
            cells.append(
                "—"
                if d is None
                else f"{d['mean']:+.2f} (min {d['lowest']:+.2f}; {d['better']}/{row['seeds']})"
            )
        lines.append(f"| {row['stage']} | {row['seeds']} | {cells[0]} | {cells[1]} |")
    return [*lines, ""]


def write_report(run_dir: str | Path) -> dict[str, Any]:
    """results.json and results.md in the run folder; returns the results."""
    return write_metric_report(run_dir, "bleu_beam", render_markdown, extra=_extra)


def _extra(results: dict[str, Any]) -> dict[str, Any]:
    """The sacrebleu signatures, the data's cut sentences and each stage's samples, read
    from the first seed's eval.json."""
    out: dict[str, Any] = {"signatures": {}, "data": None, "samples": {}}
    for name, stage in results["stages"].items():
        first = (stage.get("per_seed") or [{}])[0]
        test = first.get("test") or {}
        for metric in ("bleu", "chrf"):
            if f"{metric}_signature" in test:
                out["signatures"][metric] = test[f"{metric}_signature"]
        out["data"] = out["data"] or first.get("data")
        if first.get("samples"):
            out["samples"][name] = first["samples"]
    return out


def _speed(results: dict[str, Any], stage: dict[str, Any]) -> str:
    teacher = (results["stages"].get("teacher") or {}).get("test") or {}
    # the same test sentences in less time (a model that writes longer translations
    # earns nothing by it); measured as each stage ended: benchmarks/seq2seq_decode_speed.py
    # times the models side by side
    mine = (stage.get("test") or {}).get("sentences_per_second")
    base = teacher.get("sentences_per_second")
    if not mine or not base:
        return "—"
    return f"{mine / base:.2f}×"


def table_rows(results: dict[str, Any]) -> list[list[str]]:
    rows = []
    for name, stage in results["stages"].items():
        test, c = stage["test"] or {}, stage["cost"] or {}
        n = len(stage["seeds"])
        rows.append(
            [
                name,
                str(n),
                mean_pm(test, "bleu", n, scale=1.0),
                mean_pm(test, "bleu_beam", n, scale=1.0),
                mean_pm(test, "chrf_beam", n, scale=1.0),
                format_value(test.get("tokens_per_second"), "{:.0f}"),
                _speed(results, stage),
                format_value(c.get("params"), format_si),
                format_value(c.get("size_bytes"), lambda b: f"{b / 1e6:.2f}"),
                format_value(stage["train_seconds"], format_duration),
            ]
        )
    return rows


def _gap_line(results: dict[str, Any]) -> str:
    gap = results["gap_recovered"]
    if gap is None:
        return f"Gap recovered by distillation: n/a ({results['gap_recovered_note']})."
    return (
        f"Gap recovered by distillation (the distill stage): {gap * 100:.1f} % = (distill − "
        "baseline) / (teacher − baseline), from mean test BLEU with beam search."
    )


def metric_sentence(results: dict[str, Any]) -> str:
    signatures = results.get("signatures") or {}
    sig = "; ".join(f"{k.upper()} {v}" for k, v in signatures.items())
    data = results.get("data") or {}
    cut = ""
    if data:
        cut = (
            f" Sentences cut at the length limits: sources {sum(data['cut_sources'].values())}, "
            f"targets {sum(data['cut_targets'].values())} (train + val + test)."
        )
    return (
        "BLEU and chrF on the test pairs, as sacrebleu computes them on detokenized text "
        f"({sig or 'no signature recorded'}); greedy decoding and beam search. tokens/s: "
        "tokens written per second, greedy, batches of sentences of similar length; "
        "speed-up: the teacher's time for the test sentences (greedy) over the model's, "
        "each timed as its stage ended (benchmarks/seq2seq_decode_speed.py times models "
        "side by side). Mean ± sample standard deviation over seeds." + cut
    )


def render_markdown(results: dict[str, Any]) -> str:
    results = ordered(results)
    lines = [f"# Results: {results['recipe'] or 'unnamed recipe'}", ""]
    lines += markdown_table(COLUMNS, table_rows(results))
    lines += ["", metric_sentence(results), "", _gap_line(results), ""]
    lines += [
        "Stages: "
        + "; ".join(f"{k}: {v}" for k, v in STAGE_MEANING.items() if k in results["stages"])
        + ".",
        "",
    ]
    lines += _against_lines(results)
    lines += ["## Best-on-validation checkpoints", ""]
    best = best_metric_rows(results, "bleu", scale=1.0)  # BLEU is in points already
    if best:
        lines += [
            "Each seed's checkpoint with the best validation BLEU (greedy), measured on the "
            "test pairs once; they played no part in choosing it.",
            "",
        ]
        lines += markdown_table(BEST_COLUMNS, best)
    else:
        lines.append("None: the run has no validation pairs.")
    lines += ["", *sample_lines(results)]
    return "\n".join(lines) + "\n"


def sample_lines(results: dict[str, Any]) -> list[str]:
    """A few test sentences: the source, the reference, and each stage's translation."""
    samples = results.get("samples") or {}
    if not samples:
        return []
    lines = ["## Translations (first seed, beam search)", ""]
    count = max(len(s) for s in samples.values())
    for i in range(count):
        first = next(s[i] for s in samples.values() if len(s) > i)
        lines += [f"{i + 1}. source: {first['source']}", f"   - reference: {first['reference']}"]
        for stage, rows in samples.items():
            if len(rows) > i:
                lines.append(f"   - {stage}: {rows[i]['translation']}")
        lines.append("")
    return lines


def print_table(results: dict[str, Any], console: Console) -> None:
    results = ordered(results)
    title = f"Results: {results['recipe'] or 'unnamed recipe'}"
    show_table(console, title, COLUMNS, table_rows(results), caption=metric_sentence(results))
    console.print(_gap_line(results))


def eval_summary(result: dict[str, Any]) -> str:
    test, c = result.get("test", {}), result["cost"]
    nan = float("nan")
    return (
        f"{result['checkpoint']}: test BLEU {test.get('bleu', nan):.2f} greedy, "
        f"{test.get('bleu_beam', nan):.2f} beam, chrF {test.get('chrf', nan):.2f}; "
        f"{c['params']:,} params, {test.get('tokens_per_second', nan):.0f} tokens/s greedy"
    )
