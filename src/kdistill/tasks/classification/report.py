"""The classification results: the table (accuracy, agreement, calibration, cost per
sample, mean ± std over seeds), the best-on-validation rows, the gap the teacher
closed, results.md, the PNG plots (training curves, quality against latency), and the
one-line summary of `kdistill eval`. Built from the run folder's files alone, with
the reading and aggregation of `kdistill.report`."""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console

from kdistill.report import (
    collect,
    format_duration,
    format_si,
    format_value,
    markdown_table,
    show_table,
    write_atomic,
    write_results,
)

if TYPE_CHECKING:
    from matplotlib.figure import Figure


Curve = dict[str, list[tuple[float, float]]]

COLUMNS = (
    "stage",
    "seeds",
    "test accuracy %",
    "test errors",
    "NLL",
    "ECE %",
    "agreement %",
    "params",
    "FLOPs/sample",
    "latency ms/sample",
    "latency ms/batch",
    "size MB",
    "train time",
)


BEST_COLUMNS = (
    "stage",
    "seeds",
    "best epoch",
    "val accuracy %",
    "test accuracy %",
    "test errors",
    "NLL",
    "ECE %",
    "agreement %",
)


BEST_SENTENCE = (
    "Each seed's checkpoint with the best validation accuracy, measured on the test "
    "set once; the test set played no part in choosing it."
)


def write_report(run_dir: str | Path, *, plots: bool = True) -> dict[str, Any]:
    """Write `results.json`, `results.md` and (unless `plots` is false: the recipe's
    output.plots) `plots/*.png` into the run folder.

    Every file is written atomically (a temporary file, then `os.replace`), so an
    interrupted report never leaves a half-written file. Plots are skipped, with a
    note, when matplotlib is not installed or there is nothing to plot.

    Returns the collect() dict, as in results.json, plus `report`: `{"files": [paths
    written, relative to the run folder], "notes": [why something was skipped]}`.
    The result can go straight to `print_table`.
    """
    run_dir = Path(run_dir)
    results = collect(run_dir)
    files = write_results(run_dir, results, render_markdown(results))
    pictures, notes = _write_plots(run_dir, results) if plots else ([], [])
    return {**results, "report": {"files": files + pictures, "notes": notes}}


def table_rows(results: dict[str, Any]) -> list[list[str]]:
    """One row of formatted cells per stage, in the order of `COLUMNS`."""
    rows = []
    for name, stage in results["stages"].items():
        test = stage["test"] or {}
        cost = stage["cost"] or {}
        n = len(stage["seeds"])
        rows.append(
            [
                name,
                str(n),
                _pm(test, "accuracy", _percent, n),
                _pm(test, "errors", _count, n),
                format_value(test.get("nll"), "{:.4f}"),
                format_value(test.get("ece"), _percent),
                format_value(test.get("agreement"), _percent),
                format_value(cost.get("params"), format_si),
                format_value(cost.get("flops"), format_si),
                format_value(cost.get("latency_ms_single"), "{:.2f}"),
                format_value(cost.get("latency_ms"), "{:.2f}"),
                format_value(cost.get("size_bytes"), lambda b: f"{b / 1e6:.2f}"),
                format_value(stage["train_seconds"], format_duration),
            ]
        )
    return rows


def best_rows(results: dict[str, Any]) -> list[list[str]]:
    """Rows of the best-on-validation table, in the order of `BEST_COLUMNS`."""
    rows = []
    for name, stage in results["stages"].items():
        best = stage["best"]
        if best is None:
            continue
        test, val = best["test"] or {}, best["val"] or {}
        n = len(best["seeds"])
        rows.append(
            [
                name,
                str(n),
                ", ".join("—" if e is None else str(e) for e in best["epochs"]),
                _pm(val, "accuracy", _percent, n),
                _pm(test, "accuracy", _percent, n),
                _pm(test, "errors", _count, n),
                format_value(test.get("nll"), "{:.4f}"),
                format_value(test.get("ece"), _percent),
                format_value(test.get("agreement"), _percent),
            ]
        )
    return rows


def gap_line(results: dict[str, Any], *, best: bool = False) -> str:
    """The gap-recovered sentence, for the last (or the best-on-validation) checkpoints."""
    suffix = "_best" if best else ""
    gap = results[f"gap_recovered{suffix}"]
    if gap is None:
        return f"Gap recovered by distillation: n/a ({results[f'gap_recovered{suffix}_note']})."
    which = "these checkpoints'" if best else "the"
    return (
        f"Gap recovered by distillation: {gap * 100:.1f} % = (baseline error − distill error)"
        f" / (baseline error − teacher error), from {which} mean test error rates."
    )


def cost_line(results: dict[str, Any]) -> str:
    settings = []
    for stage in results["stages"].values():
        cost = stage["cost"] or {}
        if "device" in cost:
            setting = (
                f"batch of {cost.get('batch_size')} on {cost['device']} "
                f"({cost.get('threads')} threads)"
            )
            if setting not in settings:
                settings.append(setting)
    if not settings:
        return ""
    return (
        "Latency: median wall time of one forward pass of one input (ms/sample: batch 1, "
        "each of the latency batch's first inputs once; a text at its own length, "
        "unpadded) and of a "
        + "; ".join(settings)
        + " (ms/batch). FLOPs as counted by torch.utils.flop_counter; size of the "
        "safetensors weights"
        + (
            "; the quantize row is the INT8 ONNX file, run and timed in ONNX Runtime "
            "(its export/export.json times PyTorch FP32 and ONNX Runtime FP32 on the same "
            "inputs)."
            if "quantize" in results["stages"]
            else "."
        )
    )


def render_markdown(results: dict[str, Any]) -> str:
    lines = [f"# Results: {results['recipe'] or 'unnamed recipe'}", ""]
    lines += markdown_table(COLUMNS, table_rows(results))
    lines += ["", "Mean ± sample standard deviation over seeds (value alone for one seed)."]
    if cost_line(results):
        lines.append(cost_line(results))
    lines += ["", gap_line(results), "", "## Best-on-validation checkpoints", ""]
    rows = best_rows(results)
    if rows:
        lines += [BEST_SENTENCE, ""]
        lines += markdown_table(BEST_COLUMNS, rows)
        lines += ["", gap_line(results, best=True)]
    else:
        lines.append("None: the run has no validation split.")
    lines += teacher_fit_lines(results)
    return "\n".join(lines) + "\n"


def teacher_fit_lines(results: dict[str, Any]) -> list[str]:
    """The teacher's fit of its training rows against validation (eval.json `fit`), and
    what to try when it memorised them or when distillation lost to the student alone."""
    from kdistill.tasks.classification.measure import fit_warning

    teacher = results["stages"].get("teacher")
    fits = (
        [d["fit"] for d in teacher["per_seed"] if isinstance(d.get("fit"), dict)] if teacher else []
    )
    if not fits:
        return []
    fit = fits[0]
    lines = [
        "",
        "## The teacher on its training rows",
        "",
        f"Accuracy {fit['train_accuracy']:.2%} on {fit['train_rows']:,} training rows vs "
        f"{fit['val_accuracy']:.2%} on validation; mean entropy of its targets "
        f"{fit['train_entropy']:.3f} vs {fit['val_entropy']:.3f} nats at T = 1, "
        f"{fit['train_entropy_t']:.3f} vs {fit['val_entropy_t']:.3f} at the distillation "
        f"temperature T = {fit['temperature']:g}.",
    ]
    if fit["memorised"]:
        lines += ["", f"**Warning:** {fit_warning(fit)}."]
    stages = results["stages"]
    base, distill = stages.get("baseline"), stages.get("distill")
    if base and distill and base["test"] and distill["test"]:
        gain = distill["test"].get("accuracy", 0.0) - base["test"].get("accuracy", 0.0)
        if gain < 0:
            lines += [
                "",
                f"The distilled student is {-gain * 100:.2f} points below the student "
                "trained alone on test (mean over seeds): with these settings distillation "
                "did not help. "
                + (
                    "The teacher's near one-hot targets above are the likely cause."
                    if fit["memorised"]
                    else "Its targets are not near one-hot here, so look first at the "
                    "temperature and the weights of the terms (`kdistill tune`)."
                ),
            ]
    return lines


def print_table(results: dict[str, Any], console: Console) -> None:
    """Print the tables of results.md: with rich on a terminal, as markdown elsewhere."""
    title = f"Results: {results['recipe'] or 'unnamed recipe'}"
    show_table(console, title, COLUMNS, table_rows(results))
    console.print(gap_line(results))
    rows = best_rows(results)
    if rows:
        show_table(
            console, "Best-on-validation checkpoints", BEST_COLUMNS, rows, caption=BEST_SENTENCE
        )
        console.print(gap_line(results, best=True))


def _pm(section: dict[str, Any], name: str, fmt: Callable[[Any], str], n: int) -> str:
    mean, std = section.get(name), section.get(f"{name}_std")
    if mean is None:
        return "—"
    if n < 2 or std is None:
        return fmt(mean)
    return f"{fmt(mean)} ± {fmt(std)}"


def _percent(fraction: float) -> str:
    return f"{fraction * 100:.2f}"  # the column header carries the %


def _count(value: float) -> str:
    return f"{value:.0f}" if float(value).is_integer() else f"{value:.1f}"


def _write_plots(run_dir: Path, results: dict[str, Any]) -> tuple[list[str], list[str]]:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return [], ["plots skipped: matplotlib is not installed (pip install matplotlib)"]

    def save(fig: Figure, name: str) -> str:
        FigureCanvasAgg(fig)  # Agg without pyplot: no global backend switch, no GUI
        relative = f"plots/{name}"
        # No Software tag: the bytes do not depend on the matplotlib version.
        write_atomic(
            run_dir / relative,
            lambda tmp: fig.savefig(tmp, format="png", dpi=120, metadata={"Software": None}),
        )
        return relative

    written, notes = [], []
    curves, skipped_lines = _read_curves(run_dir, results)
    if skipped_lines:
        notes.append(f"curves: skipped {skipped_lines} unreadable line(s) in metrics.jsonl")
    if curves:
        written.append(save(_curves_figure(Figure(figsize=(11, 4)), curves), "curves.png"))
    else:
        notes.append("curves.png skipped: no metrics.jsonl with train or val lines")
    points = [
        (name, stage["cost"]["params"], stage["test"]["accuracy"], stage["test"]["accuracy_std"])
        for name, stage in results["stages"].items()
        if (stage["cost"] or {}).get("params") is not None
        and (stage["test"] or {}).get("accuracy") is not None
    ]
    if points:
        figure = _quality_figure(Figure(figsize=(6, 4.5)), points)
        written.append(save(figure, "quality_vs_params.png"))
    else:
        notes.append("quality_vs_params.png skipped: no stage has both params and test accuracy")
    return written, notes


def _read_curves(run_dir: Path, results: dict[str, Any]) -> tuple[dict[str, Curve], int]:
    """Per "stage seed<k>": train loss (mean per epoch) and val accuracy vs epoch.

    Val accuracy comes from `split: "val"` lines (`accuracy`) or from train lines
    that carry `val_accuracy`, as the trainer's end-of-epoch lines do.
    """
    curves: dict[str, Curve] = {}
    skipped = 0
    for name, stage in results["stages"].items():
        for seed in stage["seeds"]:
            path = run_dir / name / f"seed{seed}" / "metrics.jsonl"
            if not path.is_file():
                continue
            train: dict[float, list[float]] = {}
            val: dict[float, float] = {}
            for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                    epoch = record["epoch"]
                    if record["split"] == "train":
                        train.setdefault(epoch, []).append(float(record["loss"]))
                        if "val_accuracy" in record:  # the end-of-epoch line carries val too
                            val[epoch] = float(record["val_accuracy"])
                    elif record["split"] == "val":
                        val[epoch] = float(record["accuracy"])  # the epoch's last val line
                except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                    skipped += 1  # a line cut short by a crash, say
            if train or val:
                curves[f"{name} seed{seed}"] = {
                    "train_loss": sorted((e, statistics.fmean(v)) for e, v in train.items()),
                    "val_accuracy": sorted(val.items()),
                }
    return curves, skipped


def _curves_figure(fig: Figure, curves: dict[str, Curve]) -> Figure:
    from matplotlib.ticker import MaxNLocator

    loss_ax, acc_ax = fig.subplots(1, 2)
    colors: dict[str, str] = {}  # one color per stage, one line style per seed of the stage
    styles = ("-", "--", ":", "-.")
    seen: dict[str, int] = {}
    for label, curve in curves.items():
        stage = label.split()[0]
        color = colors.setdefault(stage, f"C{len(colors)}")
        style = styles[seen.get(stage, 0) % len(styles)]
        seen[stage] = seen.get(stage, 0) + 1
        if curve["train_loss"]:
            x, y = zip(*curve["train_loss"])
            loss_ax.plot(x, y, color=color, linestyle=style, marker=".", label=label)
        if curve["val_accuracy"]:
            x, y = zip(*curve["val_accuracy"])
            y = tuple(v * 100 for v in y)
            acc_ax.plot(x, y, color=color, linestyle=style, marker=".", label=label)
    loss_ax.set(xlabel="epoch", ylabel="train loss", title="Training loss (mean per epoch)")
    acc_ax.set(xlabel="epoch", ylabel="val accuracy (%)", title="Validation accuracy")
    for ax in (loss_ax, acc_ax):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize="small")
    fig.tight_layout()
    return fig


def _quality_figure(fig: Figure, points: list[tuple[str, int, float, float]]) -> Figure:
    ax = fig.subplots()
    for i, (name, params, accuracy, std) in enumerate(points):
        yerr = (std or 0.0) * 100
        ax.errorbar(params, accuracy * 100, yerr=yerr, fmt="o", capsize=4, color=f"C{i}")
        ax.annotate(name, (params, accuracy * 100), textcoords="offset points", xytext=(6, 4))
    ax.set_xscale("log")
    ax.margins(x=0.25, y=0.15)  # room for the stage names
    ax.set(xlabel="parameters", ylabel="test accuracy (%)", title="Quality vs size")
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    return fig


def eval_summary(result: dict[str, Any]) -> str:
    """One line for `kdistill eval` of a classifier's weights."""
    test, cost = result["test"], result["cost"]
    alone = cost.get("latency_ms_single")
    return (
        f"{result['checkpoint']}: test accuracy {100 * test['accuracy']:.2f}% "
        f"({test['errors']} errors), NLL {test['nll']:.4f}, ECE {test['ece']:.4f}; "
        f"{cost['params']:,} params, {cost['flops']:,} FLOPs/sample, "
        f"{cost['latency_ms']:.2f} ms per batch of {cost['batch_size']}"
        + (f", {alone:.2f} ms per sample alone" if alone is not None else "")
    )
