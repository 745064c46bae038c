"""The report of a language-model run, built from its files alone.

`collect` (the classifier report's) reads every `<stage>/seed<k>/eval.json` and gives,
per stage, the mean and sample standard deviation over seeds of each number in `val`
and `best.val`. This module adds the language-model gap and writes `results.json` and
`results.md`: loss per token, perplexity, bits per character, cost, and one seed's
generated samples per stage.

gap closed = (baseline loss − distill loss) / (baseline loss − teacher loss), from mean
validation loss per token. When teacher and student share the tokenizer the same
ratio holds for bits per character. A pretrained teacher with its own tokenizer
counts other tokens (its val `tokens` differ), so its loss per token is not on the
students' scale: the gap is then taken on bits per character, which is.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from rich.console import Console

from kdistill.report import (
    collect,
    format_duration,
    format_si,
    format_value,
    markdown_table,
    show_table,
    write_results,
)

COLUMNS = (
    "stage",
    "seeds",
    "val loss/token",
    "perplexity",
    "bits/char",
    "params",
    "size MB",
    "FLOPs/token",
    "latency ms/token",
    "train time",
)
SPLIT_SENTENCE = (
    "Measured on the validation split: the last `data.val_fraction` of the corpus by "
    "character position, never trained on. Loss in nats per token; bits per character "
    "= summed loss / (characters · ln 2), comparable across tokenizers."
)
PAIRS_SPLIT_SENTENCE = (
    "Measured on the validation pairs (data.pairs.val, else data.val_fraction of the "
    "training pairs drawn at random), completion tokens only. Loss in nats per token; bits "
    "per character = summed loss / (characters of the completions · ln 2), comparable "
    "across tokenizers."
)


def _split_sentence(run_dir: Path) -> str:
    """What the validation numbers were measured on, from the run's recipe."""
    try:
        recipe = yaml.safe_load((run_dir / "recipe.yaml").read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return SPLIT_SENTENCE
    data = recipe.get("data") if isinstance(recipe, dict) else None
    return PAIRS_SPLIT_SENTENCE if isinstance(data, dict) and data.get("pairs") else SPLIT_SENTENCE


def collect_lm(run_dir: str | Path) -> dict[str, Any]:
    """collect()'s aggregates plus `gap_recovered` (and `_best`) on validation loss."""
    results = collect(run_dir)
    results["task"] = "causal_lm"
    results["split_sentence"] = _split_sentence(Path(run_dir))
    for suffix, pick in (("", _last), ("_best", _best)):
        gap, note = _gap(results["stages"], pick)
        results[f"gap_recovered{suffix}"] = gap
        results[f"gap_recovered{suffix}_note"] = note
    results["gap_metric"] = _gap_metric(results["stages"], _last)
    return results


def _last(stage: dict[str, Any]) -> dict[str, Any] | None:
    return stage.get("val")


def _best(stage: dict[str, Any]) -> dict[str, Any] | None:
    return (stage.get("best") or {}).get("val")


def _gap_metric(stages: dict[str, Any], pick: Any) -> str:
    """ "loss" (per token), or "bpc" when the teacher counts other tokens than the baseline."""

    def tokens(name: str) -> Any:
        section = pick(stages[name]) if name in stages else None
        return (section or {}).get("tokens")

    teacher, baseline = tokens("teacher"), tokens("baseline")
    differ = teacher is not None and baseline is not None and teacher != baseline
    return "bpc" if differ else "loss"


def _gap(stages: dict[str, Any], pick: Any) -> tuple[float | None, str | None]:
    metric = _gap_metric(stages, pick)
    what = "validation loss" if metric == "loss" else "validation bits per character"
    loss: dict[str, float] = {}
    for name in ("teacher", "baseline", "distill"):
        if name not in stages:
            return None, f"the run has no {name} stage"
        section = pick(stages[name])
        if not section or section.get(metric) is None:
            return None, f"the {name} stage has no {what} for these checkpoints"
        loss[name] = section[metric]
    denominator = loss["baseline"] - loss["teacher"]
    if denominator <= 0:
        return None, f"the baseline's {what} is not above the teacher's: there is no gap"
    return (loss["baseline"] - loss["distill"]) / denominator, None


def table_rows(results: dict[str, Any], *, best: bool = False) -> list[list[str]]:
    rows = []
    for name, stage in results["stages"].items():
        section = (_best(stage) if best else _last(stage)) or {}
        cost = stage.get("cost") or {}
        n = len(stage["seeds"])
        rows.append(
            [
                name,
                str(n),
                _pm(section, "loss", "{:.4f}", n),
                _pm(section, "perplexity", "{:.2f}", n),
                _pm(section, "bpc", "{:.4f}", n),
                format_value(cost.get("params"), format_si),
                format_value(cost.get("size_bytes"), lambda b: f"{b / 1e6:.2f}"),
                format_value(cost.get("flops_per_token"), format_si),
                format_value(cost.get("latency_ms_per_token"), "{:.4f}"),
                format_value(stage.get("train_seconds"), format_duration),
            ]
        )
    return rows


def _pm(section: dict[str, Any], name: str, fmt: str, n: int) -> str:
    mean, std = section.get(name), section.get(f"{name}_std")
    if mean is None:
        return "—"
    if n < 2 or std is None:
        return fmt.format(mean)
    return f"{fmt.format(mean)} ± {fmt.format(std)}"


def gap_line(results: dict[str, Any], *, best: bool = False) -> str:
    suffix = "_best" if best else ""
    gap = results[f"gap_recovered{suffix}"]
    if gap is None:
        return f"Gap closed by distillation: n/a ({results[f'gap_recovered{suffix}_note']})."
    if results.get("gap_metric") == "bpc":
        return (
            f"Gap closed by distillation: {gap * 100:.1f} % = (baseline bpc − distill bpc) / "
            "(baseline bpc − teacher bpc), from mean validation bits per character (the "
            "teacher tokenizes differently, so loss per token is not comparable)."
        )
    return (
        f"Gap closed by distillation: {gap * 100:.1f} % = (baseline loss − distill loss) / "
        "(baseline loss − teacher loss), from mean validation loss per token."
    )


def render_lm_markdown(results: dict[str, Any]) -> str:
    lines = [f"# Results: {results['recipe'] or 'unnamed recipe'}", ""]
    lines += markdown_table(COLUMNS, table_rows(results))
    lines += [
        "",
        "Mean ± sample standard deviation over seeds (value alone for one seed). "
        + results.get("split_sentence", SPLIT_SENTENCE),
        "Latency: median wall time of the Hugging Face forward pass (logits included) on a "
        "batch of validation sequences, per token.",
        "",
        gap_line(results),
        "",
        "## Best-on-validation checkpoints",
        "",
    ]
    if any(stage.get("best") for stage in results["stages"].values()):
        lines += [
            "Each seed's epoch with the lowest validation loss, measured on that same split "
            "(so slightly optimistic).",
            "",
        ]
        lines += markdown_table(COLUMNS, table_rows(results, best=True))
        lines += ["", gap_line(results, best=True)]
    else:
        lines.append("None recorded.")
    lines += ["", "## Samples", ""]
    for name, stage in results["stages"].items():
        per_seed = stage.get("per_seed") or [{}]
        samples = per_seed[0].get("samples") or []
        if not samples:
            continue
        lines.append(f"**{name}** (seed {stage['seeds'][0]}):")
        lines.append("")
        for sample in samples:
            text = sample["prompt"] + "⟨" + sample["completion"] + "⟩"
            lines += ["```", text.replace("```", "ʼʼʼ"), "```"]
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def write_lm_report(run_dir: str | Path) -> dict[str, Any]:
    """Write `results.json` and `results.md` into the run folder, atomically."""
    run_dir = Path(run_dir)
    results = collect_lm(run_dir)
    files = write_results(run_dir, results, render_lm_markdown(results))
    return {**results, "report": {"files": files, "notes": []}}


def print_lm_table(results: dict[str, Any], console: Console) -> None:
    show_table(
        console,
        f"Results: {results['recipe'] or 'unnamed recipe'}",
        COLUMNS,
        table_rows(results),
        caption=results.get("split_sentence", SPLIT_SENTENCE),
    )
    console.print(gap_line(results))


def eval_summary(result: dict[str, Any]) -> str:
    """One line for `kdistill eval` of a language model's stage folder."""
    val, cost = result["val"], result["cost"]
    return (
        f"{result['checkpoint']}: validation loss/token {val['loss']:.4f}, perplexity "
        f"{val['perplexity']:.2f}, {val['bpc']:.4f} bits/character over "
        f"{val['tokens']:,} tokens; {cost['params']:,} params, "
        f"{cost['flops_per_token']:,.0f} FLOPs/token, "
        f"{cost['latency_ms_per_token']:.3f} ms/token"
    )
