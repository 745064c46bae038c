"""Results of a run, built from the files in its folder alone: what every task's
report shares.

The trainer writes, per stage and seed, `RUN/<stage>/seed<k>/eval.json` and
`metrics.jsonl`; `collect` reads them back and aggregates them over seeds (mean ±
sample std), and the rest here writes files atomically and formats tables and
numbers. Each task renders its own table and extras from that (`tasks/<task>/report.py`),
so the report of any old run can be rebuilt with `kdistill report RUN` (`api.report`).
Nothing here needs the recipe objects, the models or the data.
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
    pass

STAGE_ORDER = ("teacher", "assistant", "prune", "baseline", "seqkd", "distill", "qat", "quantize")
SECTIONS = ("test", "val")
SEED_DIR = re.compile(r"seed(\d+)")


# ---------------------------------------------------------------------- collect


def collect(run_dir: str | Path, *, metric: str = "accuracy") -> dict[str, Any]:
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
    error) from mean test error rates (1 - `metric`: accuracy, or entity F1), with `gap_recovered_note`
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
    gap, note = _gap_recovered(stages, lambda s: s["test"], metric)
    results["gap_recovered"], results["gap_recovered_note"] = gap, note
    gap, note = _gap_recovered(stages, lambda s: s["best"]["test"] if s["best"] else None, metric)
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
    """teacher, teacher_<member>..., assistant, prune_step1, ..., prune, baseline,
    distill, distill_gen2, ..., qat, quantize, others."""
    base, _, rest = stage.partition("_")
    if base in STAGE_ORDER and rest.startswith("step") and rest[4:].isdigit():
        return STAGE_ORDER.index(base), -1000 + int(rest[4:]), stage  # before the stage
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
    stages: dict[str, Any],
    pick: Callable[[dict[str, Any]], dict[str, Any] | None],
    metric: str = "accuracy",
) -> tuple[float | None, str | None]:
    error: dict[str, float] = {}
    for name in ("teacher", "baseline", "distill"):
        if name not in stages:
            return None, f"the run has no {name} stage"
        section = pick(stages[name])
        accuracy = section.get(metric) if section else None
        if accuracy is None:
            return None, f"the {name} stage has no test {metric} for these checkpoints"
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


def markdown_table(columns: tuple[str, ...], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(columns) + " |"]
    lines.append("|" + "|".join(":---" if i == 0 else "---:" for i in range(len(columns))) + "|")
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


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


def read_records(path: Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl, skipping lines a killed run left half-written
    (reports and trackers read old and damaged runs too)."""
    records = []
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return []
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def read_json_if_any(path: Path) -> Any:
    """A JSON file's content, or None when it is missing or unreadable."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None


def format_value(value: Any, fmt: str | Callable[[Any], str]) -> str:
    if value is None:
        return "—"
    return fmt.format(value) if isinstance(fmt, str) else fmt(value)


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


def mean_pm(section: dict[str, Any] | None, name: str, n: int, scale: float = 100.0) -> str:
    """`name` of an aggregated section as "mean ± std" (the mean alone for one seed),
    times `scale`, or "—" when missing."""
    section = section or {}
    mean, std = section.get(name), section.get(f"{name}_std")
    if mean is None:
        return "—"
    if n < 2 or std is None:
        return f"{mean * scale:.2f}"
    return f"{mean * scale:.2f} ± {std * scale:.2f}"


def metric_rows(results: dict[str, Any], metrics: tuple[str, ...]) -> list[list[str]]:
    """Per stage: stage, seeds, each of `metrics` on test (×100, mean ± std), then its
    cost (parameters, FLOPs, latency of one input, size in MB) and training time."""
    rows = []
    for name, stage in results["stages"].items():
        test, cost = stage["test"] or {}, stage["cost"] or {}
        n = len(stage["seeds"])
        rows.append(
            [
                name,
                str(n),
                *(mean_pm(test, metric, n) for metric in metrics),
                format_value(cost.get("params"), format_si),
                format_value(cost.get("flops"), format_si),
                format_value(cost.get("latency_ms_single"), "{:.2f}"),
                format_value(cost.get("size_bytes"), lambda b: f"{b / 1e6:.2f}"),
                format_value(stage["train_seconds"], format_duration),
            ]
        )
    return rows


def best_metric_rows(results: dict[str, Any], metric: str, scale: float = 100.0) -> list[list[str]]:
    """Per stage with best-on-validation checkpoints: stage, seeds, their epochs, the
    validation and test `metric` of those checkpoints."""
    rows = []
    for name, stage in results["stages"].items():
        best = stage["best"]
        if best is None:
            continue
        n = len(best["seeds"])
        rows.append(
            [
                name,
                str(n),
                ", ".join("—" if e is None else str(e) for e in best["epochs"]),
                mean_pm(best["val"], metric, n, scale),
                mean_pm(best["test"], metric, n, scale),
            ]
        )
    return rows


def metric_gap_line(results: dict[str, Any], metric: str) -> str:
    """The gap-recovered sentence when the task's metric is not accuracy."""
    gap = results["gap_recovered"]
    if gap is None:
        return f"Gap recovered by distillation: n/a ({results['gap_recovered_note']})."
    return (
        f"Gap recovered by distillation: {gap * 100:.1f} % = (distill {metric} − baseline "
        f"{metric}) / (teacher {metric} − baseline {metric}), from mean test {metric}."
    )


def write_metric_report(
    run_dir: str | Path,
    metric: str,
    render: Callable[[dict[str, Any]], str],
    extra: Callable[[dict[str, Any]], dict[str, Any]] = lambda results: {},
) -> dict[str, Any]:
    """results.json and results.md of a task whose gap is measured on `metric`:
    collect()'s aggregates plus `extra(results)`, rendered by `render`; returns them
    with `report` (the files written)."""
    run_dir = Path(run_dir)
    results = collect(run_dir, metric=metric)
    results.update(extra(results))
    files = write_results(run_dir, results, render(results))
    return {**results, "report": {"files": files, "notes": []}}
