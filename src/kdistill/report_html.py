"""report.html: one self-contained page per run, built from the run folder's files only.

It reads what the run wrote, as the markdown report does: results.md (the task's
tables, rendered here), results.json, each stage's metrics.jsonl and eval.json,
recipe.yaml and run.json. The training curves and the quality-against-cost plots are
plotly figures (hovering shows each point's values), drawn by plotly.js's basic bundle
inlined once in the page (about 1.1 MB, kdistill/vendor); each keeps a matplotlib SVG
for readers without scripts. The other plots are inline SVG. The page makes no
request: it opens from disk, a mail attachment or an artifact store the same way, and
rebuilds for any old run (`kdistill report`).

    the results     the task's tables (mean ± std over seeds, last and best-on-validation
                    checkpoints, gap recovered), as results.md has them
    training        per stage, mean over seeds per epoch: each loss term on its own (so
                    the baseline's cross-entropy and the distilled student's compare),
                    the validation metrics, the learning rate, throughput and data share
    quality & cost  the task's test metric against parameters, FLOPs and latency, seed
                    spread as error bars
    the run         the recipe, versions, device and threads, wall time per stage
"""

from __future__ import annotations

import html
import io
import json
import re
import statistics
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from kdistill.checkpoint import atomic_write_text
from kdistill.report import (
    format_duration,
    format_si,
    format_value,
    read_json_if_any,
    read_records,
)

STAGE_COLORS = {
    "teacher": "#4c72b0",
    "assistant": "#8172b2",
    "prune": "#937860",
    "baseline": "#dd8452",
    "distill": "#55a868",
    "qat": "#c44e52",
    "quantize": "#c44e52",
}
COSTS = (
    ("params", "parameters"),
    ("flops", "FLOPs / sample"),
    ("latency_ms_single", "latency ms"),
    ("latency_ms_per_token", "latency ms / token"),
)


def write_html(run_dir: str | Path, *, score: tuple[str, bool] | None = None) -> Path:
    """Write <run_dir>/report.html from the folder's files; returns its path. `score`
    is the task's validation key and direction (`kdistill.tasks.Task.score`): its test
    counterpart is the quality axis of the cost plots."""
    run_dir = Path(run_dir)
    page = render(run_dir, score=score)
    path = run_dir / "report.html"
    atomic_write_text(path, page)
    return path


def write_run_html(run_dir: str | Path) -> Path:
    """report.html of a run folder, with its task's metric (from its recipe.yaml)."""
    from kdistill.tasks import task_of_run

    return write_html(run_dir, score=task_of_run(Path(run_dir)).score)


def render(run_dir: Path, *, score: tuple[str, bool] | None = None) -> str:
    results = read_json_if_any(run_dir / "results.json") or {}
    recipe_text = _read_text(run_dir / "recipe.yaml")
    recipe = yaml.safe_load(recipe_text) if recipe_text else {}
    status = read_json_if_any(run_dir / "run.json") or {}
    title = f"kdistill: {results.get('recipe') or run_dir.name}"
    sections = [
        f"<h1>{_e(title)}</h1>",
        _summary(recipe or {}, status),
        "<h2>Results</h2>",
        markdown_to_html(_read_text(run_dir / "results.md") or "(no results.md)", skip_title=True),
        "<h2>Training</h2>",
        _training(run_dir, results),
        "<h2>Quality and cost</h2>",
        _quality_and_cost(results, score),
        _classes(run_dir, results),
        _positions(results),
        _samples(results),
        "<h2>The run</h2>",
        _environment(run_dir, results, status),
        "<details><summary>The recipe (recipe.yaml)</summary><pre>"
        + _e(recipe_text or "(missing)")
        + "</pre></details>",
    ]
    return _page(title, "\n".join(sections))


def write_compare_html(run_dirs: list[str | Path], output: str | Path) -> Path:
    """One page for several runs (three recipes, a study's best trials): a row per run
    and stage, the curves of every run overlaid, quality against cost for all."""
    from kdistill.tasks import task_of_run

    runs = [Path(r) for r in run_dirs]
    scores = {task_of_run(r).score for r in runs}
    score = next(iter(scores)) if len(scores) == 1 else None
    names = _run_names(runs)
    results = {name: read_json_if_any(run / "results.json") or {} for name, run in zip(names, runs)}
    metric = (score[0] if score else "val_accuracy").removeprefix("val_")
    title = "kdistill: " + " vs ".join(names)
    rows = []
    for name in names:
        for stage, info in (results[name].get("stages") or {}).items():
            test, cost = info.get("test") or {}, info.get("cost") or {}
            value, spread = test.get(metric), test.get(f"{metric}_std") or 0.0
            shown = f"{value:.4f} ± {spread:.4f}" if isinstance(value, (int, float)) else "—"
            rows.append(
                f"| {name} | {stage} | {len(info.get('seeds') or [])} | {shown} | "
                f"{format_value(cost.get('params'), format_si)} | {format_value(cost.get('flops'), format_si)} | "
                f"{_number(cost.get('latency_ms_single'))} |"
            )
    table = "\n".join(
        [
            f"| run | stage | seeds | test {metric} | params | FLOPs/sample | latency ms |",
            "|:---|:---|---:|---:|---:|---:|---:|",
            *rows,
        ]
    )
    merged: dict[str, dict[str, Any]] = {}
    for name in names:
        for stage, info in (results[name].get("stages") or {}).items():
            merged[f"{name}/{stage}"] = info
    curves = {
        label: read_curves(run, stage, list(info.get("seeds") or []))
        for name, run in zip(names, runs)
        for stage, info in (results[name].get("stages") or {}).items()
        for label in [f"{name}/{stage}"]
    }
    sections = [
        f"<h1>{_e(title)}</h1>",
        "<p>Runs: "
        + ", ".join(f"<b>{_e(n)}</b> ({_e(str(r))})" for n, r in zip(names, runs))
        + "</p>",
        "<h2>Results</h2>",
        markdown_to_html(table),
        "<p>Mean ± standard deviation over each run's seeds, last checkpoints. "
        + ("" if score else "The runs are of different tasks: accuracy is shown where present. ")
        + "</p>",
        "<h2>Training</h2>",
        _curve_panels({k: v for k, v in curves.items() if v}),
        "<h2>Quality and cost</h2>",
        _quality_and_cost({"stages": merged}, score),
    ]
    path = Path(output)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, _page(title, "\n".join(sections)))
    return path


def _run_names(runs: list[Path]) -> list[str]:
    """Each run by its folder name, made unique with its parent's where two agree."""
    names = [run.name for run in runs]
    return [
        f"{run.parent.name}/{run.name}" if names.count(run.name) > 1 else run.name for run in runs
    ]


def _number(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, (int, float)) else "—"


# ---------------------------------------------------------------------- markdown


def markdown_to_html(text: str, *, skip_title: bool = False) -> str:
    """The markdown kdistill writes (headings, paragraphs, lists, pipe tables, **bold**,
    `code`) as HTML; anything else as a paragraph."""
    out: list[str] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if not line.strip():
            i += 1
            continue
        heading = re.match(r"^(#{1,4}) (.*)$", line)
        if heading:
            level = len(heading.group(1))
            if not (skip_title and level == 1):
                out.append(f"<h{level + 1}>{_inline(heading.group(2))}</h{level + 1}>")
            i += 1
        elif line.startswith("|"):
            block = []
            while i < len(lines) and lines[i].startswith("|"):
                block.append(lines[i])
                i += 1
            out.append(_table(block))
        elif re.match(r"^\s*[-*] ", line):
            items = []
            while i < len(lines) and re.match(r"^\s*[-*] ", lines[i]):
                items.append(_inline(re.sub(r"^\s*[-*] ", "", lines[i])))
                i += 1
            out.append("<ul>" + "".join(f"<li>{item}</li>" for item in items) + "</ul>")
        else:
            paragraph = []
            while (
                i < len(lines) and lines[i].strip() and not re.match(r"^(#|\||\s*[-*] )", lines[i])
            ):
                paragraph.append(lines[i])
                i += 1
            out.append(f"<p>{_inline(' '.join(paragraph))}</p>")
    return "\n".join(out)


def _cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def _table(block: list[str]) -> str:
    header, rows = _cells(block[0]), [_cells(line) for line in block[1:]]
    align = ["left"] * len(header)
    if rows and all(re.fullmatch(r":?-+:?", cell) for cell in rows[0]):
        align = [
            "right" if cell.endswith(":") and not cell.startswith(":") else "left"
            for cell in rows[0]
        ]
        rows = rows[1:]
    head = "".join(f'<th style="text-align:{a}">{_inline(c)}</th>' for c, a in zip(header, align))
    body = "".join(
        "<tr>"
        + "".join(f'<td style="text-align:{a}">{_inline(c)}</td>' for c, a in zip(row, align))
        + "</tr>"
        for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _inline(text: str) -> str:
    text = _e(text)
    text = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", text)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", text)


# ---------------------------------------------------------------------- sections


def _summary(recipe: dict[str, Any], status: dict[str, Any]) -> str:
    parts = []
    if recipe.get("description"):
        parts.append(f"<p>{_e(recipe['description'])}</p>")
    facts = [
        ("task", recipe.get("task", "classification")),
        ("stages", ", ".join(recipe.get("stages") or [])),
        ("seeds", ", ".join(str(s) for s in recipe.get("seeds") or [])),
        ("status", status.get("status")),
        ("started", status.get("started")),
        ("finished", status.get("finished")),
    ]
    parts.append(
        '<p class="facts">'
        + " · ".join(f"<b>{_e(k)}</b> {_e(str(v))}" for k, v in facts if v)
        + "</p>"
    )
    return "\n".join(parts)


def read_curves(run_dir: Path, stage: str, seeds: list[int]) -> dict[str, dict[int, float]]:
    """Each metric of a stage's epoch records: {metric: {epoch: mean over seeds}}."""
    values: dict[str, dict[int, list[float]]] = {}
    for seed in seeds:
        for record in read_records(run_dir / stage / f"seed{seed}" / "metrics.jsonl"):
            if record.get("split") != "train":
                continue
            for key, value in record.items():
                if key in ("epoch", "step", "split") or not isinstance(value, (int, float)):
                    continue
                values.setdefault(key, {}).setdefault(int(record["epoch"]), []).append(float(value))
    return {
        key: {epoch: statistics.mean(v) for epoch, v in sorted(by_epoch.items())}
        for key, by_epoch in values.items()
    }


def _training(run_dir: Path, results: dict[str, Any]) -> str:
    stages = results.get("stages") or {}
    curves = {
        stage: read_curves(run_dir, stage, list(info.get("seeds") or []))
        for stage, info in stages.items()
    }
    return _curve_panels({stage: c for stage, c in curves.items() if c})


def _curve_panels(curves: dict[str, dict[str, dict[int, float]]]) -> str:
    """A panel per kind of metric, a line per series (a stage, or run/stage)."""
    if not curves:
        return "<p>No stage recorded epochs (metrics.jsonl).</p>"
    panels: list[tuple[str, Callable[[str], bool]]] = [
        ("training loss per term (unweighted, per counted unit)", lambda k: k.startswith("loss_")),
        ("training loss (weighted sum)", lambda k: k == "loss"),
        ("validation", lambda k: k.startswith("val_")),
        ("learning rate", lambda k: k == "lr"),
        ("throughput (per second)", lambda k: k.endswith("_per_second")),
        ("data share of step time", lambda k: k == "data_share"),
        ("learned temperature", lambda k: k.startswith("temperature_")),
    ]
    figures = []
    for title, wanted in panels:
        keys = sorted({k for c in curves.values() for k in c if wanted(k)})
        # one panel per validation metric: accuracy and NLL do not share an axis
        groups = [[key] for key in keys] if title == "validation" else [keys] if keys else []
        for group in groups:
            shown = (
                f"validation {group[0].removeprefix('val_')}" if title == "validation" else title
            )
            figures.append(
                _interactive(
                    _curve_figure(curves, group, shown), _curve_plot(curves, group, shown), shown
                )
            )
    return '<div class="grid">' + "".join(figures) + "</div>"


def _curve_figure(
    curves: dict[str, dict[str, dict[int, float]]], keys: list[str], title: str
) -> dict[str, Any]:
    """The same curves as `_curve_plot`, as a plotly figure (hover: the epoch's values)."""
    dashes = ["solid", "dash", "dot", "dashdot"]
    data = []
    for stage, metrics in curves.items():
        for k, key in enumerate(keys):
            if key not in metrics:
                continue
            points = metrics[key]
            data.append(
                {
                    "type": "scatter",
                    "mode": "lines+markers",
                    "name": f"{stage} {key}" if len(keys) > 1 else stage,
                    "x": list(points),
                    "y": list(points.values()),
                    "line": {"color": _color(stage, len(curves)), "dash": dashes[k % 4]},
                    "marker": {"size": 5},
                }
            )
    return {"data": data, "layout": _layout("epoch", title, integer_x=True)}


def _layout(x_title: str, y_title: str, *, integer_x: bool = False, log_x: bool = False) -> dict:
    return {
        "height": 330,
        "margin": {"l": 60, "r": 10, "t": 10, "b": 45},
        "xaxis": {
            "title": {"text": x_title},
            **({"dtick": 1} if integer_x else {}),
            **({"type": "log"} if log_x else {}),
        },
        "yaxis": {"title": {"text": y_title}, "exponentformat": "e"},
        "legend": {"font": {"size": 10}},
        "hovermode": "closest",
    }


def _interactive(figure: dict[str, Any], svg: str, caption: str) -> str:
    """A plotly figure drawn by the page's script (hover shows the values); the static
    SVG stands in where scripts do not run."""
    data = html.escape(json.dumps(figure, separators=(",", ":")), quote=True)
    return (
        f'<figure class="plot"><div class="plotly" data-figure="{data}"></div>'
        f"<noscript>{svg}</noscript><figcaption>{_e(caption)}</figcaption></figure>"
    )


def _curve_plot(curves: dict[str, dict[str, dict[int, float]]], keys: list[str], title: str) -> str:
    from matplotlib.ticker import MaxNLocator

    def draw(ax: Any) -> None:
        styles = ["-", "--", ":", "-."]
        for stage, metrics in curves.items():
            for k, key in enumerate(keys):
                if key not in metrics:
                    continue
                points = metrics[key]
                label = f"{stage} {key}" if len(keys) > 1 else stage
                ax.plot(
                    list(points), list(points.values()), styles[k % len(styles)], marker="o",
                    markersize=3, color=_color(stage, len(curves)), label=label,
                )  # fmt: skip
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if title.startswith("learning"):
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
        ax.legend(fontsize=7)

    return _svg(draw)


def _quality_and_cost(results: dict[str, Any], score: tuple[str, bool] | None) -> str:
    stages = results.get("stages") or {}
    metric = (score[0] if score else "val_accuracy").removeprefix("val_")
    points, split = [], "test"
    for stage, info in stages.items():
        # a language model is measured on its validation text (it has no test split)
        measured = info.get("test") or info.get("val") or {}
        split = "test" if info.get("test") else "validation"
        cost = info.get("cost") or {}
        if isinstance(measured.get(metric), (int, float)):
            points.append((stage, measured[metric], measured.get(f"{metric}_std") or 0.0, cost))
    if not points:
        return f"<p>No stage has a {_e(metric)} to plot.</p>"
    from matplotlib.ticker import NullFormatter

    figures = []
    for key, label in COSTS:
        usable = [p for p in points if isinstance(p[3].get(key), (int, float))]
        if not usable:
            continue

        def draw(ax: Any, usable: list[Any] = usable, key: str = key, label: str = label) -> None:
            for stage, value, spread, cost in usable:
                ax.errorbar(
                    cost[key], value, yerr=spread, fmt="o", capsize=4, markersize=7,
                    color=_color(stage, len(usable)), label=stage,
                )  # fmt: skip
            xs = [cost[key] for _, _, _, cost in usable]
            if min(xs) > 0 and max(xs) / min(xs) > 10:  # several decades: a log axis
                ax.set_xscale("log")
                ax.xaxis.set_minor_formatter(NullFormatter())
                label += " (log)"
            ax.set_xlabel(label)
            ax.set_ylabel(f"{split} {metric}")
            ax.legend(fontsize=7)

        xs = [cost[key] for _, _, _, cost in usable]
        log_x = min(xs) > 0 and max(xs) / min(xs) > 10
        figure = {
            "data": [
                {
                    "type": "scatter",
                    "mode": "markers",
                    "name": stage,
                    "x": [cost[key]],
                    "y": [value],
                    "error_y": {"type": "data", "array": [spread], "visible": True},
                    "marker": {"size": 10, "color": _color(stage, len(usable))},
                    "hovertemplate": f"{_e(stage)}<br>{label} %{{x:,.4g}}<br>{split} "
                    f"{metric} %{{y:.4g}} ± {spread:.3g}<extra></extra>",
                }
                for stage, value, spread, cost in usable
            ],
            "layout": _layout(label, f"{split} {metric}", log_x=log_x),
        }
        caption = f"{split} {metric} against {label}"
        figures.append(_interactive(figure, _svg(draw), caption))
    note = (
        "<p>Each point is a stage: mean over its seeds, error bar one standard deviation. "
        "Cost from the stage's eval.json (the lowest seed: seeds share the architecture).</p>"
    )
    return note + '<div class="grid">' + "".join(figures) + "</div>"


def _classes(run_dir: Path, results: dict[str, Any]) -> str:
    """Classifiers: per-class accuracy of each stage, the distilled student's gain over
    the student alone per class, its confusion matrix, and reliability diagrams."""
    stages = results.get("stages") or {}
    found: dict[str, list[dict[str, Any]]] = {}
    for stage, info in stages.items():
        runs = [d["test_details"] for d in info.get("per_seed") or [] if "test_details" in d]
        if runs:
            found[stage] = runs
    if not found:
        return ""
    names = _class_names(run_dir, stages) or [
        str(i) for i in range(len(next(iter(found.values()))[0]["per_class_accuracy"]))
    ]
    accuracy = {
        stage: [statistics.mean(col) for col in zip(*(r["per_class_accuracy"] for r in runs))]
        for stage, runs in found.items()
    }
    figures = [
        _figure(
            _svg(lambda ax: _class_bars(ax, accuracy, names)),
            "test accuracy per class, mean over seeds",
        )
    ]
    if "baseline" in accuracy and "distill" in accuracy:
        gain = {
            "distill − baseline": [d - b for d, b in zip(accuracy["distill"], accuracy["baseline"])]
        }
        figures.append(
            _figure(
                _svg(lambda ax: _class_bars(ax, gain, names, diverging=True)),
                "per class: the distilled student's accuracy minus the student alone's (points)",
            )
        )
    matrix_stage = "distill" if "distill" in found else next(iter(found))
    matrices = [r["confusion"] for r in found[matrix_stage] if "confusion" in r]
    if matrices:
        summed = [[sum(cells) for cells in zip(*rows)] for rows in zip(*matrices)]
        figures.append(
            _figure(
                _svg(lambda ax: _confusion(ax, summed, names)),
                f"confusion matrix of {matrix_stage} (rows: true class; all seeds' test rows)",
            )
        )
    figures.append(
        _figure(
            _svg(lambda ax: _reliability(ax, found)), "reliability: accuracy against confidence"
        )
    )
    return "<h2>Classes and calibration</h2>" + '<div class="grid">' + "".join(figures) + "</div>"


def _positions(results: dict[str, Any]) -> str:
    """Language models: validation loss per token by its position in the sequence (first
    seed), each stage a line."""
    stages = results.get("stages") or {}
    found = {
        stage: info["per_seed"][0]["loss_by_position"]
        for stage, info in stages.items()
        if info.get("per_seed") and info["per_seed"][0].get("loss_by_position")
    }
    if not found:
        return ""

    def draw(ax: Any) -> None:
        for stage, curve in found.items():
            middles = [(low + high) / 2 for low, high in curve["positions"]]
            ax.plot(
                middles, curve["loss"], marker="o", markersize=3,
                color=_color(stage, len(found)), label=stage,
            )  # fmt: skip
        ax.set_xlabel("position in the sequence (tokens of context)")
        ax.set_ylabel("validation loss per token (nats)")
        ax.legend(fontsize=7)

    caption = (
        "Loss per token by position, first seed: the early positions have little context; "
        "a student that keeps the teacher's use of long context stays close to it on the right."
    )
    return "<h2>Loss by position</h2>" + _figure(_svg(draw), caption)


OUTPUT_KEYS = ("completion", "translation")  # what a model wrote, in a sample record


def _samples(results: dict[str, Any]) -> str:
    """What each stage writes from the same inputs (first seed): language models'
    continuations of prompts, translators' translations beside source and reference.
    A sample record holds the inputs (prompt; source, reference) and one output key."""
    stages = results.get("stages") or {}
    written = {
        stage: info["per_seed"][0]["samples"]
        for stage, info in stages.items()
        if info.get("per_seed") and info["per_seed"][0].get("samples")
    }
    if not written:
        return ""
    first = next(iter(written.values()))
    inputs = [k for k in first[0] if k not in OUTPUT_KEYS]
    output = next((k for k in first[0] if k in OUTPUT_KEYS), None)
    if output is None:
        return ""
    head = (
        "<tr>"
        + "".join(f"<th>{_e(k)}</th>" for k in inputs)
        + "".join(f"<th>{_e(s)}</th>" for s in written)
        + "</tr>"
    )
    body = ""
    for i, sample in enumerate(first):
        shared = "".join(f"<td><pre>{_e(str(sample.get(k, '')))}</pre></td>" for k in inputs)
        cells = "".join(
            f"<td><pre>{_e(str(samples[i].get(output, '')))}</pre></td>"
            if i < len(samples)
            else "<td></td>"
            for samples in written.values()
        )
        body += f"<tr>{shared}{cells}</tr>"
    what = "continuation of the same prompts" if output == "completion" else "translation"
    return (
        f"<h2>Samples</h2><p>Each stage's {what} (first seed; the recipe's decoding "
        "settings).</p>"
        f'<table class="samples"><thead>{head}</thead><tbody>{body}</tbody></table>'
    )


def _class_names(run_dir: Path, stages: dict[str, Any]) -> list[str] | None:
    for stage, info in stages.items():
        for seed in info.get("seeds") or []:
            model = read_json_if_any(run_dir / stage / f"seed{seed}" / "model.json") or {}
            if model.get("class_names"):
                return [str(n) for n in model["class_names"]]
    return None


def _class_bars(
    ax: Any, series: dict[str, list[float]], names: list[str], *, diverging: bool = False
) -> None:
    width = 0.8 / len(series)
    for k, (stage, values) in enumerate(series.items()):
        positions = [i + (k - (len(series) - 1) / 2) * width for i in range(len(values))]
        scaled = [100 * v for v in values]
        colors = (
            ["#55a868" if v >= 0 else "#c44e52" for v in scaled]
            if diverging
            else STAGE_COLORS.get(stage.split("_")[0])
        )
        ax.bar(positions, scaled, width=width, color=colors, label=stage)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(
        names,
        rotation=60 if len(names) > 6 else 0,
        fontsize=7,
        ha="right" if len(names) > 6 else "center",
    )
    ax.set_ylabel("points" if diverging else "accuracy %")
    if diverging:
        ax.axhline(0, color="#555", linewidth=0.8)
    else:
        ax.legend(fontsize=7)


def _confusion(ax: Any, matrix: list[list[int]], names: list[str]) -> None:
    import numpy as np

    counts = np.array(matrix, dtype=float)
    shares = counts / counts.sum(axis=1, keepdims=True).clip(min=1)
    ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(names)))
    ax.set_yticks(range(len(names)))
    ax.set_xticklabels(names, rotation=60, fontsize=6, ha="right")
    ax.set_yticklabels(names, fontsize=6)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if len(names) <= 12:
        for i in range(len(names)):
            for j in range(len(names)):
                color = "white" if shares[i, j] > 0.6 else "#333"
                ax.text(
                    j, i, f"{int(counts[i, j])}", ha="center", va="center", fontsize=6, color=color
                )
    ax.grid(False)


def _reliability(ax: Any, found: dict[str, list[dict[str, Any]]]) -> None:
    ax.plot([0, 1], [0, 1], ":", color="#888", label="calibrated")
    for stage, runs in found.items():
        count = [sum(c) for c in zip(*(r["reliability"]["count"] for r in runs))]
        confidence = [
            sum(r["reliability"]["confidence"][b] * r["reliability"]["count"][b] for r in runs) / n
            for b, n in enumerate(count)
            if n
        ]
        accuracy = [
            sum(r["reliability"]["accuracy"][b] * r["reliability"]["count"][b] for r in runs) / n
            for b, n in enumerate(count)
            if n
        ]
        ax.plot(
            confidence,
            accuracy,
            marker="o",
            markersize=3,
            label=stage,
            color=STAGE_COLORS.get(stage.split("_")[0]),
        )
    ax.set_xlabel("confidence (max softmax probability)")
    ax.set_ylabel("accuracy")
    ax.legend(fontsize=7)


def _environment(run_dir: Path, results: dict[str, Any], status: dict[str, Any]) -> str:
    env = status.get("environment") or {}
    rows = [("kdistill", status.get("kdistill"))]
    rows += [
        (name, env.get(name)) for name in ("python", "torch", "accelerate", "device", "threads")
    ]
    for stage, info in (results.get("stages") or {}).items():
        seconds = info.get("train_seconds")
        if isinstance(seconds, (int, float)):
            rows.append((f"{stage} wall time (mean per seed)", format_duration(seconds)))
    body = "".join(
        f"<tr><td>{_e(name)}</td><td>{_e(str(value))}</td></tr>"
        for name, value in rows
        if value is not None
    )
    return f"<table>{body}</table>"


# ---------------------------------------------------------------------- drawing


def _svg(draw: Callable[[Any], None]) -> str:
    """One matplotlib axes as inline SVG text (fonts as text: small and selectable)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": "kdistill"}):
        fig, ax = plt.subplots(figsize=(5.2, 3.4))
        try:
            draw(ax)
            ax.grid(alpha=0.3)
            fig.tight_layout()
            buffer = io.StringIO()
            fig.savefig(buffer, format="svg", metadata={"Date": None})
        finally:
            plt.close(fig)
    text = buffer.getvalue()
    return text[text.index("<svg") :]


def _color(series: str, count: int) -> str | None:
    """A stage's own colour; a run/stage series of a comparison takes the default cycle
    (several runs share stage names)."""
    if "/" in series:
        return None
    return STAGE_COLORS.get(series.split("_")[0])


def _figure(svg: str, caption: str) -> str:
    return f'<figure class="plot">{svg}<figcaption>{_e(caption)}</figcaption></figure>'


def _page(title: str, body: str) -> str:
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{_e(title)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 72rem; padding: 0 1rem;
       color: #222; line-height: 1.45; }}
h1 {{ font-size: 1.6rem; }} h2 {{ border-bottom: 1px solid #ddd; margin-top: 2.2rem; }}
table {{ border-collapse: collapse; margin: 0.8rem 0; font-size: 0.88rem; }}
th, td {{ border: 1px solid #ddd; padding: 0.25rem 0.55rem; }}
thead th {{ background: #f4f5f7; }}
tbody tr:nth-child(even) {{ background: #fafafa; }}
.facts {{ color: #555; }}
div.plotly {{ width: 100%; min-height: 330px; }}
.grid {{ display: grid; grid-template-columns: repeat(auto-fill, minmax(26rem, 1fr)); gap: 1rem; }}
figure.plot {{ margin: 0; }} figure.plot svg {{ width: 100%; height: auto; }}
figcaption {{ font-size: 0.8rem; color: #555; text-align: center; }}
pre {{ background: #f6f8fa; padding: 0.8rem; overflow-x: auto; font-size: 0.8rem; }}
code {{ background: #f6f8fa; padding: 0 0.2rem; }}
table.samples pre {{ background: none; padding: 0; margin: 0; white-space: pre-wrap; }}
</style></head>
<body>
{body}
<footer><p class="facts">Written by kdistill from the run folder's files; no network. The curves
and cost plots are drawn by plotly.js (basic bundle, MIT license, inlined); without
scripts their static images show.</p></footer>
{_scripts(body)}
</body></html>
"""


def _scripts(body: str) -> str:
    """plotly.js, inlined once, and the lines that draw each interactive figure; nothing
    when the page has none."""
    if 'class="plotly"' not in body:
        return ""
    library = resources.files("kdistill").joinpath("vendor/plotly-basic.min.js").read_text("utf-8")
    draw = (
        "document.querySelectorAll('div.plotly').forEach(function (d) {"
        " var f = JSON.parse(d.dataset.figure);"
        " Plotly.newPlot(d, f.data, f.layout, {displaylogo: false, responsive: true,"
        " modeBarButtonsToRemove: ['toImage', 'sendDataToCloud']}); });"
    )
    return f"<script>{library}</script>\n<script>{draw}</script>"


def _e(text: str) -> str:
    return html.escape(str(text), quote=True)


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None
