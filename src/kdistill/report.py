"""Results of a run, built from the files in its folder alone.

The trainer writes, per stage and seed, `RUN/<stage>/seed<k>/eval.json` and
`metrics.jsonl`; this module reads them back and writes `RUN/results.json`,
`RUN/results.md` and `RUN/plots/*.png`. Nothing here needs the recipe objects,
the models or the data, so the report of any old run can be rebuilt with
`write_report(run_dir)`.
"""

from __future__ import annotations

import json
import math
import os
import re
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from rich.console import Console
from rich.table import Table

from kdistill.errors import RunDirError

if TYPE_CHECKING:
    from matplotlib.figure import Figure

STAGE_ORDER = ("teacher", "assistant", "baseline", "distill")
SECTIONS = ("test", "val")
SEED_DIR = re.compile(r"seed(\d+)")

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


# ---------------------------------------------------------------------- collect


def collect(run_dir: str | Path) -> dict[str, Any]:
    """Aggregate every `<stage>/seed<k>/eval.json` of a run folder.

    Per stage: for each numeric metric of `test`, `val`, `best.test` and
    `best.val`, the mean over seeds under the metric's name and its spread under
    `<name>_std`: the sample standard deviation (ddof=1) when there are two or
    more seeds, 0.0 for a single seed. A metric a seed lacks is aggregated over
    the seeds that have it. Also `train_seconds` (mean) and `train_seconds_std`,
    `cost` (from the lowest seed; all seeds share the architecture), `seeds`, and
    `per_seed`, the eval.json contents as read. `best` is null when no seed has a
    best-on-validation checkpoint; otherwise it also lists the seeds and epochs.

    Top level: `recipe` (the name in recipe.yaml, or null), `stages`, and
    `gap_recovered` = (baseline error - distill error) / (baseline error - teacher
    error) from mean test error rates (1 - accuracy), with `gap_recovered_note`
    saying why it is null when it is; `gap_recovered_best` and its note do the
    same for the best-on-validation checkpoints. Non-finite numbers become null.

    Raises RunDirError when the folder or every eval.json is missing, or a file
    cannot be read.
    """
    run_dir = Path(run_dir)
    evals = _read_evals(run_dir)
    stages: dict[str, Any] = {}
    for stage in sorted(evals, key=_stage_key):
        stages[stage] = _aggregate_stage(evals[stage])

    results: dict[str, Any] = {"recipe": _recipe_name(run_dir), "stages": stages}
    gap, note = _gap_recovered(stages, lambda s: s["test"])
    results["gap_recovered"], results["gap_recovered_note"] = gap, note
    gap, note = _gap_recovered(stages, lambda s: s["best"]["test"] if s["best"] else None)
    results["gap_recovered_best"], results["gap_recovered_best_note"] = gap, note
    return _finite(results)


def _read_evals(run_dir: Path) -> dict[str, list[tuple[int, dict[str, Any]]]]:
    looked_for = f"{run_dir}/<stage>/seed<k>/eval.json (stage: {', '.join(STAGE_ORDER)})"
    if not run_dir.is_dir():
        raise RunDirError(
            f"No run folder at {run_dir}: nothing to report. Expected a folder written by "
            f"`kdistill run` holding {looked_for}. Check the path."
        )
    evals: dict[str, list[tuple[int, dict[str, Any]]]] = {}
    for path in sorted(run_dir.glob("*/seed*/eval.json")):
        match = SEED_DIR.fullmatch(path.parent.name)
        if match is None:
            continue
        stage, seed = path.parent.parent.name, int(match.group(1))
        data = _read_json(path)
        if data.get("stage", stage) != stage or data.get("seed", seed) != seed:
            raise RunDirError(
                f"{path} says stage={data.get('stage')!r}, seed={data.get('seed')!r}, but "
                f"lies in the folder of stage {stage!r}, seed {seed}. The folder was "
                "edited by hand or copied; put the file back where it belongs."
            )
        evals.setdefault(stage, []).append((seed, data))
    if not evals:
        raise RunDirError(
            f"Nothing to report in {run_dir}: found no {looked_for}. The run has not "
            "finished a stage yet, or this is not a run folder."
        )
    for items in evals.values():
        items.sort(key=lambda item: item[0])
    return evals


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RunDirError(
            f"Cannot read {path}: {exc}. The file is damaged; rerun that stage to rewrite it."
        ) from exc
    if not isinstance(data, dict):
        raise RunDirError(f"{path} must hold a JSON object. Got {type(data).__name__} instead.")
    return data


def _recipe_name(run_dir: Path) -> str | None:
    path = run_dir / "recipe.yaml"
    if not path.is_file():
        return None
    try:
        recipe = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise RunDirError(f"Cannot read {path}: {exc}.") from exc
    name = recipe.get("name") if isinstance(recipe, dict) else None
    return str(name) if name is not None else None


def _stage_key(stage: str) -> tuple[int, int, str]:
    """teacher, teacher_<member>..., assistant, baseline, distill, distill_gen2, ..., others."""
    base, _, rest = stage.partition("_")
    if base in STAGE_ORDER:
        generation = int(rest[3:]) if rest.startswith("gen") and rest[3:].isdigit() else 0
        return STAGE_ORDER.index(base), generation if rest else -1, stage
    return len(STAGE_ORDER), 0, stage


def _aggregate_stage(items: list[tuple[int, dict[str, Any]]]) -> dict[str, Any]:
    seeds = [seed for seed, _ in items]
    raw = [data for _, data in items]
    stage: dict[str, Any] = {"seeds": seeds}
    for section in SECTIONS:
        stage[section] = _aggregate([d[section] for d in raw if isinstance(d.get(section), dict)])
    with_best = [(seed, d["best"]) for seed, d in items if isinstance(d.get("best"), dict)]
    if with_best:
        stage["best"] = {
            "seeds": [seed for seed, _ in with_best],
            "epochs": [best.get("epoch") for _, best in with_best],
            **{
                section: _aggregate(
                    [b[section] for _, b in with_best if isinstance(b.get(section), dict)]
                )
                for section in SECTIONS
            },
        }
    else:
        stage["best"] = None
    times = [d["train_seconds"] for d in raw if _is_number(d.get("train_seconds"))]
    stage["train_seconds"], stage["train_seconds_std"] = _mean_std(times)
    stage["cost"] = next((d["cost"] for d in raw if isinstance(d.get("cost"), dict)), None)
    stage["per_seed"] = raw
    return stage


def _aggregate(sections: list[dict[str, Any]]) -> dict[str, Any] | None:
    if not sections:
        return None
    names: list[str] = []
    for section in sections:
        names += [k for k, v in section.items() if _is_number(v) and k not in names]
    out: dict[str, Any] = {}
    for name in names:
        out[name], out[f"{name}_std"] = _mean_std(
            [s[name] for s in sections if _is_number(s.get(name))]
        )
    return out


def _mean_std(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) >= 2 else 0.0  # sample std, ddof=1
    return mean, std


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _gap_recovered(
    stages: dict[str, Any], pick: Callable[[dict[str, Any]], dict[str, Any] | None]
) -> tuple[float | None, str | None]:
    error: dict[str, float] = {}
    for name in ("teacher", "baseline", "distill"):
        if name not in stages:
            return None, f"the run has no {name} stage"
        section = pick(stages[name])
        accuracy = section.get("accuracy") if section else None
        if accuracy is None:
            return None, f"the {name} stage has no test accuracy for these checkpoints"
        error[name] = 1.0 - accuracy
    denominator = error["baseline"] - error["teacher"]
    if denominator == 0:
        return None, "teacher and baseline have the same test error: there is no gap to recover"
    if denominator < 0:
        return None, "the baseline has a lower test error than the teacher: there is no gap"
    return (error["baseline"] - error["distill"]) / denominator, None


def _finite(value: Any) -> Any:
    """Replace NaN and infinities by None, so that results.json is strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


# ------------------------------------------------------------------ write_report


def write_report(run_dir: str | Path) -> dict[str, Any]:
    """Write `results.json`, `results.md` and `plots/*.png` into the run folder.

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
    plots, notes = _write_plots(run_dir, results)
    return {**results, "report": {"files": files + plots, "notes": notes}}


def write_results(run_dir: Path, results: dict[str, Any], markdown: str) -> list[str]:
    """results.json and results.md, each written atomically; their names."""
    as_json = json.dumps(results, indent=2, allow_nan=False) + "\n"
    write_atomic(run_dir / "results.json", lambda tmp: tmp.write_text(as_json, encoding="utf-8"))
    write_atomic(run_dir / "results.md", lambda tmp: tmp.write_text(markdown, encoding="utf-8"))
    return ["results.json", "results.md"]


def write_atomic(path: Path, write: Callable[[Path], object]) -> None:
    """Call `write(tmp)` on a temporary file next to `path`, then move it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # Not tempfile.mkstemp: its files are private (0600); these follow the umask.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# ------------------------------------------------------------------ tables


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
        "safetensors weights."
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
    return "\n".join(lines) + "\n"


def markdown_table(columns: tuple[str, ...], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(columns) + " |"]
    lines.append("|" + "|".join(":---" if i == 0 else "---:" for i in range(len(columns))) + "|")
    lines += ["| " + " | ".join(row) + " |" for row in rows]
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


def show_table(
    console: Console,
    title: str,
    columns: tuple[str, ...],
    rows: list[list[str]],
    *,
    caption: str | None = None,
) -> None:
    """A rich table on a terminal. In a log file (not a terminal, 80 columns by default)
    rich would cut every cell to a few characters, so the markdown table goes there."""
    if not console.is_terminal:
        lines = [title, *markdown_table(columns, rows)] + ([caption] if caption else [])
        for line in lines:
            console.print(line, soft_wrap=True, markup=False, highlight=False)
        return
    table = Table(title=title, caption=caption)
    for i, column in enumerate(columns):
        table.add_column(column, justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*row)
    console.print(table)


def format_value(value: Any, fmt: str | Callable[[Any], str]) -> str:
    if value is None:
        return "—"
    return fmt.format(value) if isinstance(fmt, str) else fmt(value)


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


def format_si(value: float) -> str:
    for factor, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(value) >= factor:
            return f"{value / factor:.2f} {suffix}"
    return f"{value:.0f}"


def format_duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes}m {secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m"


# ------------------------------------------------------------------ plots


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


Curve = dict[str, list[tuple[float, float]]]


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
