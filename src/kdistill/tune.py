"""`kdistill tune`: search a recipe's distillation settings with Optuna, choose on
validation, measure the winner on test once.

A study is a folder:

    study.db            Optuna's SQLite storage: every trial, its settings, values, state
    study.json          what the study searches (recipe, space, objectives, sampler);
                        --resume refuses a folder made from anything else
    teacher/            the one teacher of the study (a run of stage teacher) and, when
                        the recipe reads one, its output cache: written once, read by all
    trials/NNNN/        one run folder per trial (its teacher/, cache/ and the task's
                        run_folders link to the study's), with trial.log, its own log
    trials.csv          every trial: state, values, settings, error
    study.md            the study in short: trials by state, the best settings
    best_recipe.yaml    the recipe with the winning settings: `kdistill run` reproduces it
    final/              the best settings re-run on tune.final_seeds (several objectives:
                        final/trial-NNNN per Pareto-optimal trial), measured on test once
    results.json/.md    the final run's, as `kdistill run` writes them
    plots/              optimisation history, importances, parallel coordinates, Pareto front

Trials train the distill stage (and the baseline with tune.baseline) on one seed and
report the task's validation score after every epoch, which is what the pruner reads
and what the study optimises; test data is measured by the trial runs (their eval.json)
but never read here before the final run. Several worker processes may share a study
(each started with --resume on the same folder): Optuna's storage hands each its
trials, and the budget counts theirs together.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import io
import json
import math
import os
import shutil
import socket
import sqlite3
import time
import traceback
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console

from kdistill.checkpoint import atomic_write_json, atomic_write_text
from kdistill.errors import KdistillError, RecipeError, TuneError, suggest
from kdistill.recipe.tune import Param, TuneConfig

try:
    import fcntl
except ImportError:  # Windows: workers of one study are not coordinated there
    fcntl = None  # type: ignore[assignment]

STUDY_FILE = "study.json"
COST_KEYS = {  # objective -> the keys of eval.json's cost, first found wins
    "latency": ("latency_ms_single", "latency_ms_per_token", "latency_ms"),
    "params": ("params",),
    "flops": ("flops",),
    "size": ("size_bytes",),
}


def require_optuna() -> Any:
    try:
        import optuna
    except ImportError:
        raise TuneError(
            "kdistill tune needs Optuna: pip install 'kdistill[tune]' (optuna, and cmaes for "
            "the CMA-ES sampler)"
        ) from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


# ------------------------------------------------------------------ the search space


def check_space(recipe: Any, config: TuneConfig) -> list[str]:
    """Problems of `config.space` against the recipe: paths that do not exist (with a
    "did you mean"), values at the ends of a range or among the choices that make the
    recipe invalid. A key under a model's `args` may be new: the model's own
    check (kdistill validate) judges it."""
    from kdistill.recipe.load import validate_recipe

    raw = _plain(recipe)
    problems: list[str] = []
    for path, param in config.space.items():
        missing = _missing(raw, path.split("."))
        if missing:
            problems.append(f"tune.space.{path}: {missing}")
            continue
        for value in _extremes(param):
            changed = copy.deepcopy(raw)
            _set(changed, path, value)
            try:
                variant = validate_recipe(changed, source="recipe")
            except RecipeError as exc:
                detail = str(exc).split("\n  - ", 1)[-1].split("\nFix these")[0]
                problems.append(
                    f"tune.space.{path}: the value {value!r} makes the recipe invalid: {detail}"
                )
                break
            cached = recipe.teacher_cache_settings()
            if recipe.reads_teacher_cache() and variant.teacher_cache_settings() != cached:
                problems.append(
                    f"tune.space.{path}: the teacher's cache, written once for the whole "
                    f"study, depends on it ({cached}); search it with a live teacher "
                    "(no cache), or search other settings"
                )
                break
    if config.sampler == "grid":
        size = math.prod(len(param.grid()) for param in config.space.values())
        if size > 100_000:
            problems.append(f"tune.space: the grid has {size:,} points; narrow it or use tpe")
    return problems


def default_space(recipe: Any) -> dict[str, Param]:
    """What `kdistill tune` searches when the recipe has no tune section: the settings
    that decide whether distillation helps (Hinton et al.'s temperature and the weight
    of each loss term, the α of the write-ups) and the learning rate, each range
    widened to hold the recipe's own value so trial 0 runs it. A setting the study
    cannot vary (a cached teacher's temperature) is left out."""
    raw = _plain(recipe)
    candidates: dict[str, Param] = {}
    terms = raw.get("objective") or []
    for i, term in enumerate(terms):
        temperature = term.get("temperature")
        if isinstance(temperature, (int, float)) and not isinstance(temperature, bool):
            low, high = min(1.0, temperature), max(10.0, temperature)
            candidates[f"objective.{i}.temperature"] = Param(low=low, high=high)
        weight = term.get("weight")
        if len(terms) > 1 and isinstance(weight, (int, float)) and weight > 0:
            low, high = min(0.05, weight), max(1.0, weight)
            candidates[f"objective.{i}.weight"] = Param(low=low, high=high)
    lr = _get(raw, "train.optimizer.lr")
    if isinstance(lr, (int, float)) and lr > 0:
        candidates["train.optimizer.lr"] = Param(low=lr / 3, high=lr * 3, log=True)
    return {
        path: param
        for path, param in candidates.items()
        if not check_space(recipe, TuneConfig(space={path: param}))
    }


def _range(param: Param) -> str:
    if param.choices is not None:
        return f"in {param.choices}"
    return f"[{param.low:.3g}, {param.high:.3g}]" + (" log" if param.log else "")


def _missing(raw: Any, parts: list[str]) -> str | None:
    node: Any = raw
    for i, part in enumerate(parts):
        where = ".".join(parts[:i]) or "the recipe"
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                return f"{where} is a list of {len(node)}; {part!r} is not one of its indexes"
            node = node[int(part)]
        elif isinstance(node, dict):
            if part not in node:
                free = i > 0 and parts[i - 1] == "args"  # a model's own arguments
                if free and i == len(parts) - 1:
                    return None
                return f"{where} has no {part!r}{suggest(part, node)}"
            node = node[part]
        else:
            return f"{where} holds a value, not a section"
    if isinstance(node, dict) and parts[-1] != "model":
        return "names a whole section; search one of its values (" + ", ".join(node) + ")"
    return None


def _extremes(param: Param) -> list[Any]:
    if param.choices is not None:
        return list(param.choices)
    values = param.grid() if param.discrete else [param.low, param.high]
    return [values[0], values[-1]]


def _plain(recipe: Any) -> dict[str, Any]:
    raw = recipe.model_dump(mode="json")
    raw.pop("tune", None)
    return raw


def _set(raw: dict[str, Any], path: str, value: Any) -> None:
    from kdistill.recipe.load import set_path

    set_path(raw, path.split("."), copy.deepcopy(value), where=f"tune.space.{path}")


def _get(raw: Any, path: str) -> Any:
    node = raw
    for part in path.split("."):
        if isinstance(node, list):
            node = node[int(part)]
        elif isinstance(node, dict) and part in node:
            node = node[part]
        else:
            return None
    return node


def _label(value: Any) -> Any:
    """How a choice is named to Optuna: scalars as they are, sections as their JSON."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return json.dumps(value, sort_keys=True)


def _suggest(trial: Any, path: str, param: Param) -> Any:
    if param.choices is not None:
        labels = [_label(choice) for choice in param.choices]
        return param.choices[labels.index(trial.suggest_categorical(path, labels))]
    assert param.low is not None and param.high is not None
    if param.type == "int":
        step = int(param.step or 1)
        return trial.suggest_int(path, int(param.low), int(param.high), step=step, log=param.log)
    return trial.suggest_float(path, param.low, param.high, step=param.step, log=param.log)


def _settings(trial: Any, space: dict[str, Param]) -> dict[str, Any]:
    """A finished trial's settings as recipe values (its choices decoded)."""
    out = {}
    for path, param in space.items():
        value = trial.params[path]
        if param.choices is not None:
            labels = [_label(choice) for choice in param.choices]
            value = param.choices[labels.index(value)]
        out[path] = value
    return out


# ---------------------------------------------------------------------- the study


@dataclass
class Study:
    """One study: its folder, recipe, settings and Optuna handle."""

    folder: Path
    recipe: Any
    config: TuneConfig
    budget: int
    task: Any
    data_dir: str | Path | None
    console: Console
    quiet: bool
    optuna_study: Any = None
    seed: int = 0
    final_seeds: list[int] = field(default_factory=list)

    @property
    def teacher_run(self) -> Path:
        return self.folder / "teacher"

    @property
    def score_key(self) -> str:
        return str(self.task.score[0])

    @property
    def higher_is_better(self) -> bool:
        return bool(self.task.score[1])

    @property
    def objective_names(self) -> list[str]:
        names = {"val": self.score_key, "latency": "latency_ms", "size": "size_bytes"}
        return [names.get(name, name) for name in self.config.objectives]

    @property
    def directions(self) -> list[str]:
        first = "maximize" if self.higher_is_better else "minimize"
        return [first] + ["minimize"] * (len(self.config.objectives) - 1)


def tune(
    recipe: Any,
    overrides: list[str] | None = None,
    *,
    trials: int | None = None,
    timeout: float | None = None,
    space: str | Path | None = None,
    output_dir: str | Path | None = None,
    data_dir: str | Path | None = None,
    resume: bool = False,
    overwrite: bool = False,
    final: bool = True,
    quiet: bool = False,
    console: Console | None = None,
) -> dict[str, Any]:
    """Run (or resume, or join) a study over the recipe's `tune.space`; after its last
    trial, re-run the best settings on the final seeds. Returns the study's summary."""
    from kdistill import api
    from kdistill.recipe.load import problems_error
    from kdistill.tasks import task_of_recipe

    optuna = require_optuna()
    console = console or Console(stderr=True)
    recipe = api.as_recipe(recipe, overrides)
    if space is not None:
        raw = recipe.model_dump(mode="json")
        raw["tune"] = _space_section(space)
        recipe = raw
    recipe = api.validate(recipe, data_dir=data_dir)
    if recipe.tune is None:
        defaults = default_space(recipe)
        if not defaults:
            raise TuneError(
                f"recipe {recipe.name!r} has no tune section and no setting kdistill searches "
                "by default (distillation temperatures and term weights, the learning rate); "
                "add `tune: {space: {...}}` (see kdistill.recipe.tune) or pass --space FILE"
            )
        shown = ", ".join(f"{path} {_range(param)}" for path, param in defaults.items())
        console.log(f"tune: the recipe has no tune section; searching the default space: {shown}")
        raw = recipe.model_dump(mode="json")
        raw["tune"] = {
            "space": {path: p.model_dump(exclude_defaults=True) for path, p in defaults.items()}
        }
        recipe = api.as_recipe(raw)
    problems = check_space(recipe, recipe.tune)
    if problems:
        raise problems_error(f"recipe {recipe.name!r}", problems)
    config: TuneConfig = recipe.tune
    folder = Path(output_dir) if output_dir else Path("runs") / f"{recipe.name}-tune"
    study = Study(
        folder=folder,
        recipe=recipe,
        config=config,
        budget=trials or config.trials,
        task=task_of_recipe(recipe),
        data_dir=data_dir,
        console=console,
        quiet=quiet,
        seed=config.seed if config.seed is not None else recipe.seeds[0],
        final_seeds=config.final_seeds or list(recipe.seeds),
    )
    _claim(study, resume=resume, overwrite=overwrite)
    with _exclusive(folder / "setup.lock"):  # the workers of a study take turns here
        study.optuna_study = _open(study, optuna)
        if not study.optuna_study.trials:
            _enqueue_recipe_values(study, study.optuna_study)
        _reclaim_dead(study, optuna)
        _teacher(study)
    ran = _search(study, optuna, timeout=timeout)
    summary = _summary(study, optuna)
    summary["ran_here"] = ran
    _write_tables(study, optuna)
    if not summary["complete"]:
        failed = [t for t in study.optuna_study.trials if t.state.name == "FAIL"]
        if failed and summary["left"] == 0:
            first = failed[0].user_attrs.get("error", "no reason recorded")
            raise TuneError(
                f"study {folder}: every one of its {len(failed)} trials failed; the first: "
                f"{first} (each trial's log: {folder}/trials/NNNN/trial.log)"
            )
    if final and summary["left"] == 0 and summary["running"] == 0 and summary["complete"]:
        with _exclusive(folder / "setup.lock"):
            summary["final"] = _final(study, optuna)
            verdict = _against_baseline(study, folder / "final")
            if verdict:
                summary["against_baseline"] = verdict["record"]
                with (folder / "study.md").open("a", encoding="utf-8") as handle:
                    handle.write("\n" + "\n".join(verdict["lines"]) + "\n")
    _write_json(folder / STUDY_FILE, {**_fingerprint(study), "state": _state(summary)})
    return summary


def _space_section(space: str | Path) -> dict[str, Any]:
    """`--space FILE`: a YAML file holding a tune section (or only its `space`)."""
    path = Path(space)
    if not path.is_file():
        raise TuneError(f"--space {path}: no such file")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise TuneError(f"--space {path}: not valid YAML ({exc})") from None
    if not isinstance(raw, dict):
        raise TuneError(f"--space {path}: expected a mapping (space: {{...}}, sampler: ...)")
    section = raw.get("tune", raw)
    return section if "space" in section else {"space": section}


def _fingerprint(study: Study) -> dict[str, Any]:
    config = study.config.model_dump(mode="json")
    for free in ("trials", "final_seeds", "final_limit"):  # may change between sessions
        config.pop(free)
    return {"recipe": _plain(study.recipe), "tune": config, "seed": study.seed}


def _current_form(recipe: Any, stored: Any) -> Any:
    """A study's stored recipe as this version of kdistill reads it: a field added since
    the study began takes its default, so upgrading kdistill does not make a study
    refuse its own recipe. A stored recipe the schema no longer reads stays as stored
    (and its differences are listed)."""
    from pydantic import ValidationError

    if not isinstance(stored, dict):
        return stored
    try:
        return _plain(type(recipe).model_validate(stored))
    except ValidationError:
        return stored


def _differences(old: Any, new: Any, where: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out: list[str] = []
        for key in list(old) + [k for k in new if k not in old]:
            out += _differences(old.get(key), new.get(key), f"{where}.{key}" if where else key)
        return out
    return [] if old == new else [f"{where}: {old!r} in the study, {new!r} now"]


def _claim(study: Study, *, resume: bool, overwrite: bool) -> None:
    folder = study.folder
    held = [p for p in folder.iterdir() if p.name != "setup.lock"] if folder.is_dir() else []
    record_path = folder / STUDY_FILE
    if held and overwrite:
        for child in held:
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()
    elif held and not record_path.is_file():
        raise TuneError(
            f"study folder {folder} is not empty and holds no kdistill study; choose another "
            "--output-dir, or pass --overwrite to clear it"
        )
    elif held:
        record = json.loads(record_path.read_text(encoding="utf-8"))
        old = {k: record.get(k) for k in ("recipe", "tune", "seed")}
        old["recipe"] = _current_form(study.recipe, old["recipe"])
        differs = _differences(old, _fingerprint(study))
        if differs:
            raise TuneError(
                f"study {folder} was made from another recipe or space, so its trials would "
                "not compare with new ones; it differs at:\n  - "
                + "\n  - ".join(differs[:8])
                + "\nUse another --output-dir for this one, or --overwrite to replace the study"
            )
        if not resume:
            state = record.get("state", "unfinished")
            advice = (
                "pass --resume to add trials (raise --trials) or re-run the final seeds"
                if state == "finished"
                else "pass --resume to continue it (or to join it as a second worker)"
            )
            raise TuneError(
                f"study folder {folder} holds a {state} study; {advice}, or --overwrite to "
                "start over"
            )
    folder.mkdir(parents=True, exist_ok=True)
    if not record_path.is_file():
        _write_json(record_path, {**_fingerprint(study), "state": "unfinished"})


def _open(study: Study, optuna: Any) -> Any:
    """Create or load the Optuna study in study.db (SQLite); refuse a file that is not
    one of ours."""
    db = study.folder / "study.db"
    if db.exists():
        _check_sqlite(db, study.recipe.name)
    storage = optuna.storages.RDBStorage(
        f"sqlite:///{db.resolve()}", engine_kwargs={"connect_args": {"timeout": 60}}
    )
    return optuna.create_study(
        study_name=study.recipe.name,
        storage=storage,
        directions=study.directions,
        sampler=_sampler(study.config, optuna),
        pruner=_pruner(study, optuna),
        load_if_exists=True,
    )


def _names(db: Path) -> list[str]:
    with contextlib.closing(sqlite3.connect(db)) as con:
        tables = {
            row[0] for row in con.execute("SELECT name FROM sqlite_master WHERE type='table'")
        }
        if "studies" not in tables:
            return []
        return [row[0] for row in con.execute("SELECT study_name FROM studies")]


def _check_sqlite(db: Path, name: str) -> None:
    with open(db, "rb") as f:
        header = f.read(16)
    if header and header != b"SQLite format 3\x00":
        raise TuneError(f"{db} is not an SQLite database; move it away or pass --overwrite")
    if not header:
        return
    try:
        with contextlib.closing(sqlite3.connect(db)) as con:
            tables = {
                row[0] for row in con.execute("SELECT name FROM sqlite_master WHERE type='table'")
            }
    except sqlite3.DatabaseError as exc:
        raise TuneError(
            f"{db} cannot be read as SQLite ({exc}); move it away or pass --overwrite"
        ) from None
    if tables and not {"studies", "trials", "version_info"} <= tables:
        raise TuneError(
            f"{db} is an SQLite database but not an Optuna study (its tables: "
            f"{', '.join(sorted(tables))}); move it away or pass --overwrite"
        )
    names = _names(db)
    if names and name not in names:
        raise TuneError(
            f"{db} holds the studies {', '.join(names)}, not {name!r}: it belongs to another "
            "recipe; use another --output-dir"
        )


def _sampler(config: TuneConfig, optuna: Any) -> Any:
    seed = config.sampler_seed
    samplers = optuna.samplers
    if config.sampler == "grid":
        grid = {path: [_label(v) for v in param.grid()] for path, param in config.space.items()}

        class Grid(samplers.GridSampler):  # type: ignore[name-defined]
            def after_trial(self, *args: Any) -> None:
                """Optuna's grid stops an `optimize` loop when it has run every point,
                which fails outside one; the trial loop stops at the grid's size itself."""

        return Grid(grid, seed=seed)
    if config.sampler == "random":
        return samplers.RandomSampler(seed=seed)
    if config.sampler == "cmaes":
        try:
            import cmaes  # noqa: F401
        except ImportError:
            raise TuneError(
                "sampler cmaes needs the cmaes package: pip install 'kdistill[tune]'"
            ) from None
        # categorical settings are drawn at random beside CMA-ES (it searches numbers only)
        return samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False)
    if config.sampler == "nsga2":
        return samplers.NSGAIISampler(seed=seed)
    return samplers.TPESampler(seed=seed)


def _pruner(study: Study, optuna: Any) -> Any:
    pruner = study.config.pruner
    epochs = study.recipe.train.epochs
    if pruner.name == "median":
        return optuna.pruners.MedianPruner(
            n_startup_trials=pruner.startup_trials, n_warmup_steps=pruner.min_epochs
        )
    if pruner.name == "hyperband":
        return optuna.pruners.HyperbandPruner(
            min_resource=min(pruner.min_epochs, epochs), max_resource=epochs
        )
    return optuna.pruners.NopPruner()


def _enqueue_recipe_values(study: Study, handle: Any) -> None:
    """Trial 0 runs the recipe's own settings, so the study can only improve on them
    (a grid runs every point of it anyway, and Optuna's grid would count a queued
    trial as none of its points and run that point again)."""
    if study.config.sampler == "grid":
        return
    raw = _plain(study.recipe)
    params: dict[str, Any] = {}
    for path, param in study.config.space.items():
        value = _get(raw, path)
        if not param.holds(value):
            study.console.log(
                f"tune: the recipe's own {path} ({value!r}) is outside the searched values; "
                "trial 0 is not the recipe's settings"
            )
            return
        params[path] = _label(value)
    handle.enqueue_trial(params, user_attrs={"recipe_values": True})


@contextlib.contextmanager
def _exclusive(path: Path) -> Iterator[None]:
    """One worker at a time in the block (the others wait): the teacher is trained once
    and the final run made once."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+", encoding="utf-8") as handle:
        if fcntl is not None:
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            if fcntl is not None:
                fcntl.flock(handle, fcntl.LOCK_UN)


def _alive(worker: dict[str, Any]) -> bool:
    if worker.get("host") != socket.gethostname():
        return True  # another machine's worker: cannot tell, trust it
    try:
        os.kill(int(worker["pid"]), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def _reclaim_dead(study: Study, optuna: Any) -> None:
    """A trial left running by a worker that died (killed, machine rebooted) is marked
    failed as interrupted and its settings are queued again: it never finished, so
    running it again repeats nothing."""
    handle = study.optuna_study
    for trial in handle.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        worker = trial.user_attrs.get("worker")
        if worker is None or _alive(worker):
            continue
        storage = handle._storage  # Optuna has no public call to set another trial's attrs
        storage.set_trial_user_attr(trial._trial_id, "interrupted", True)
        storage.set_trial_user_attr(
            trial._trial_id,
            "error",
            f"its worker (pid {worker['pid']}) stopped during the trial; queued again",
        )
        handle.tell(trial.number, state=optuna.trial.TrialState.FAIL, skip_if_finished=True)
        handle.enqueue_trial(dict(trial.params), user_attrs={"retry_of": trial.number})
        study.console.log(f"tune: trial {trial.number} was interrupted; its settings run again")


def _teacher(study: Study) -> None:
    """Train (or load and measure) the study's one teacher, and write its output cache
    when the recipe reads one; a finished teacher run is reused."""
    from kdistill import api
    from kdistill.stages import RunOptions, finished, stage_dir

    folder = study.teacher_run
    recipe = _variant(study, {}, stages=["teacher"], seeds=[study.seed])
    if not finished(stage_dir(folder, "teacher", study.seed)):
        study.console.log(f"tune: the study's teacher → {folder}")
        options = RunOptions(
            folder, study.data_dir, resume=folder.exists(), quiet=study.quiet, console=study.console
        )
        study.task.function("run")(recipe, options)
    if study.recipe.reads_teacher_cache():
        info = api.cache(recipe, output_dir=folder, data_dir=study.data_dir)
        verb = "reused" if info["reused"] else "written"
        study.console.log(f"tune: teacher cache {verb}: {info['folder']}")


def _variant(
    study: Study,
    settings: dict[str, Any],
    *,
    stages: list[str],
    seeds: list[int],
    plots: bool = True,
) -> Any:
    """The recipe with a trial's settings, stages and seeds, validated (a trial's plots
    are never looked at, so trials draw none)."""
    from kdistill.recipe.load import validate_recipe

    raw = _plain(study.recipe)
    for path, value in settings.items():
        _set(raw, path, value)
    raw.update(stages=stages, seeds=seeds)
    if isinstance(raw.get("output"), dict):
        raw["output"].update(dir=None, plots=plots and raw["output"].get("plots", True))
    return validate_recipe(raw, source=f"study {study.folder}")


def _count(study: Study, optuna: Any) -> tuple[int, int]:
    """(trials that count against the budget, of which running)."""
    state = optuna.trial.TrialState
    done = running = 0
    for trial in study.optuna_study.get_trials(deepcopy=False):
        if trial.user_attrs.get("interrupted") or trial.user_attrs.get("over_budget"):
            continue
        if trial.state == state.RUNNING:
            running += 1
        if trial.state in (state.COMPLETE, state.PRUNED, state.FAIL, state.RUNNING):
            done += 1
    return done, running


def _grid_size(config: TuneConfig) -> int | None:
    if config.sampler != "grid":
        return None
    return math.prod(len(param.grid()) for param in config.space.values())


def _search(study: Study, optuna: Any, *, timeout: float | None) -> int:
    """Run trials until the study's budget (all workers together) or `timeout` seconds;
    the number run by this worker."""
    budget = study.budget
    grid = _grid_size(study.config)
    if grid is not None and grid < budget:
        study.console.log(f"tune: the grid has {grid} points; the study stops after them")
        budget = grid
    started, ran = time.monotonic(), 0
    while True:
        counted, _ = _count(study, optuna)
        if counted >= budget:
            break
        if timeout is not None and time.monotonic() - started >= timeout:
            study.console.log(f"tune: --timeout {timeout:g}s reached; --resume continues")
            break
        trial = study.optuna_study.ask()
        if _count(study, optuna)[0] > budget:  # another worker took the last one meanwhile
            trial.set_user_attr("over_budget", True)
            trial.set_user_attr("error", "not run: another worker took the study's last trial")
            study.optuna_study.tell(trial, state=optuna.trial.TrialState.FAIL)
            break
        _trial(study, optuna, trial)
        ran += 1
        counted, _ = _count(study, optuna)
        if counted < budget:
            pace = (time.monotonic() - started) / ran
            study.console.log(
                f"tune: {counted} of {budget} trials; at this worker's pace "
                f"({pace / 60:.1f} min a trial) about {(budget - counted) * pace / 60:.0f} min "
                "of trials are left"
            )
    return ran


class _Reporter:
    """Hands each distill epoch's validation score to Optuna and asks its pruner."""

    def __init__(self, study: Study, trial: Any) -> None:
        self.study, self.trial = study, trial
        self.prunes = len(study.config.objectives) == 1 and study.config.pruner.name != "none"

    def __call__(self, stage: str, seed: int, record: dict[str, Any]) -> None:
        if stage != "distill" or self.study.score_key not in record:
            return
        score = float(record[self.study.score_key])
        if not math.isfinite(score):
            return
        if self.prunes:
            self.trial.report(score, int(record["epoch"]))
            if self.trial.should_prune():
                import optuna

                raise optuna.TrialPruned(
                    f"epoch {record['epoch']}: {self.study.score_key} {score:.4g} lags the "
                    "other trials at this epoch"
                )


def _trial(study: Study, optuna: Any, trial: Any) -> None:
    from kdistill.stages import RunOptions, write_status

    state = optuna.trial.TrialState
    settings = {path: _suggest(trial, path, p) for path, p in study.config.space.items()}
    trial.set_user_attr("worker", {"pid": os.getpid(), "host": socket.gethostname()})
    folder = study.folder / "trials" / f"{trial.number:04d}"
    _link_teacher(study, folder)
    write_status(folder, "prepared")
    stages = ["teacher", "baseline", "distill"] if study.config.baseline else ["teacher", "distill"]
    shown = ", ".join(f"{path}={_short(value)}" for path, value in settings.items())
    study.console.log(f"tune: trial {trial.number}: {shown}")
    with open(folder / "trial.log", "a", encoding="utf-8") as log:
        console = Console(file=log, width=120, no_color=True, log_path=False)
        console.log(f"trial {trial.number}: {shown}")
        options = RunOptions(
            folder, study.data_dir, resume=True, quiet=True, console=console,
            on_epoch=_Reporter(study, trial),
        )  # fmt: skip
        started = time.monotonic()
        try:
            recipe = _variant(study, settings, stages=stages, seeds=[study.seed], plots=False)
            study.task.function("run")(recipe, options)
            values = _values(study, folder, study.seed)
        except optuna.TrialPruned as exc:
            trial.set_user_attr("pruned", str(exc))
            study.optuna_study.tell(trial, state=state.PRUNED)
            study.console.log(f"tune: trial {trial.number} pruned: {exc}")
            return
        except KeyboardInterrupt:
            trial.set_user_attr("error", "interrupted (Ctrl-C)")
            study.optuna_study.tell(trial, state=state.FAIL)
            raise
        except Exception as exc:  # a trial's failure is the study's data, not its end
            reason = str(exc) if isinstance(exc, KdistillError) else f"{type(exc).__name__}: {exc}"
            console.print(traceback.format_exc())
            trial.set_user_attr("error", reason.splitlines()[0][:500])
            study.optuna_study.tell(trial, state=state.FAIL)
            study.console.log(
                f"[yellow]tune: trial {trial.number} failed: {reason.splitlines()[0]}"
            )
            return
        trial.set_user_attr("seconds", round(time.monotonic() - started, 1))
        study.optuna_study.tell(trial, values)
        console.log(f"trial {trial.number}: {dict(zip(study.objective_names, values))}")
    shown_values = ", ".join(f"{n} {v:.4g}" for n, v in zip(study.objective_names, values))
    study.console.log(f"tune: trial {trial.number} finished: {shown_values}")


def _short(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else value
    return text if len(text) <= 60 else text[:57] + "..."


def _link_teacher(study: Study, folder: Path) -> None:
    """A trial's run folder sees the study's teacher (and cache) as its own, so its
    teacher stage finds them finished and reuses them; and the task's other run-level
    folders (`Task.run_folders`: a translation run's tokenizer, which the teacher and
    its cache were made with)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("teacher", "cache", *study.task.run_folders):
        target, link = study.teacher_run / name, folder / name
        if target.exists() and not link.exists():
            link.symlink_to(os.path.relpath(target, folder), target_is_directory=True)


def _values(study: Study, run: Path, seed: int) -> list[float]:
    """A run's objective values, from the files it wrote: the best validation score of
    its distill stage over the epochs, then the costs of its eval.json."""
    from kdistill.stages import stage_dir

    stage = stage_dir(run, "distill", seed)
    best = _best_score(study, stage)
    if best is None:
        raise TuneError(
            f"the distill stage recorded no {study.score_key}: tune chooses on validation "
            "data, so the recipe needs a validation split"
        )
    if not math.isfinite(best):
        raise TuneError(f"the validation score {study.score_key} is not finite ({best})")
    values = [best]
    if len(study.config.objectives) > 1:
        cost = json.loads((stage / "eval.json").read_text(encoding="utf-8")).get("cost") or {}
        for name in study.config.objectives[1:]:
            found = next((cost[key] for key in COST_KEYS[name] if key in cost), None)
            if found is None:
                raise TuneError(f"objective {name}: the stage's eval.json has no such cost")
            values.append(float(found))
    return values


# ------------------------------------------------------------------ after the search


def _summary(study: Study, optuna: Any) -> dict[str, Any]:
    states: dict[str, int] = {}
    for trial in study.optuna_study.get_trials(deepcopy=False):
        states[trial.state.name.lower()] = states.get(trial.state.name.lower(), 0) + 1
    counted, running = _count(study, optuna)
    budget = min(study.budget, _grid_size(study.config) or study.budget)
    out: dict[str, Any] = {
        "study": str(study.folder),
        "objectives": study.objective_names,
        "directions": study.directions,
        "trials": states,
        "complete": states.get("complete", 0),
        "running": running,
        "left": max(budget - counted, 0),
    }
    best = _chosen(study, optuna)
    if best:
        out["best"] = [
            {"trial": t.number, "values": dict(zip(study.objective_names, t.values)),
             "settings": _settings(t, study.config.space)}
            for t in best
        ]  # fmt: skip
    return out


def _chosen(study: Study, optuna: Any) -> list[Any]:
    """The best trial (one objective) or the Pareto-optimal ones, cheapest first, at
    most tune.final_limit of them."""
    complete = study.optuna_study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    if not complete:
        return []
    if len(study.config.objectives) == 1:
        return [study.optuna_study.best_trial]
    front = sorted(study.optuna_study.best_trials, key=lambda t: (t.values[1], t.number))
    if len(front) <= study.config.final_limit:
        return front
    # spread the re-runs along the front: its ends and evenly between
    picks = sorted(
        {
            round(i * (len(front) - 1) / (study.config.final_limit - 1))
            for i in range(study.config.final_limit)
        }
    )
    return [front[i] for i in picks]


def _final(study: Study, optuna: Any) -> dict[str, Any]:
    """Re-run the chosen settings on the final seeds, measured on test once; the
    study folder gets best_recipe.yaml, results.json/.md (one objective) or
    pareto.json/.md (several)."""
    from kdistill.stages import RunOptions, finished, stage_dir, write_status

    chosen = _chosen(study, optuna)
    single = len(study.config.objectives) == 1
    runs: dict[str, Any] = {}
    for trial in chosen:
        settings = _settings(trial, study.config.space)
        stages = list(study.recipe.stages) if single else ["teacher", "distill"]
        recipe = _variant(study, settings, stages=stages, seeds=study.final_seeds)
        folder = (
            study.folder / "final"
            if single
            else study.folder / "final" / f"trial-{trial.number:04d}"
        )
        marker = folder / "tuned_trial.json"
        if folder.exists() and (
            not marker.is_file() or json.loads(marker.read_text())["settings"] != settings
        ):
            shutil.rmtree(folder)  # the best settings changed since (more trials)
        if all(finished(stage_dir(folder, s, seed)) for s in stages for seed in study.final_seeds):
            study.console.log(f"tune: final run of trial {trial.number} already done: {folder}")
        else:
            _link_teacher(study, folder)
            if not (folder / "run.json").exists():
                write_status(folder, "prepared")
            _write_json(marker, {"trial": trial.number, "settings": settings})
            study.console.log(
                f"tune: re-running trial {trial.number}'s settings on seeds {study.final_seeds} → {folder}"
            )
            options = RunOptions(
                folder, study.data_dir, resume=True, quiet=study.quiet, console=study.console
            )
            study.task.function("run")(recipe, options)
        results = json.loads((folder / "results.json").read_text(encoding="utf-8"))
        runs[str(trial.number)] = {"folder": str(folder), "settings": settings, "results": results}
        if single:
            _write_best_recipe(study, trial, settings)
            for name in ("results.json", "results.md"):
                shutil.copyfile(folder / name, study.folder / name)
    if not single:
        _write_pareto(study, chosen, runs)
    _plots(study, optuna)
    return runs


def _best_score(study: Study, stage: Path) -> float | None:
    """The best validation score a stage recorded over its epochs (None: none)."""
    from kdistill.stages import read_metrics

    scores = [
        float(r[study.score_key])
        for r in read_metrics(stage / "metrics.jsonl")
        if r.get("split") == "train" and study.score_key in r
    ]
    if not scores:
        return None
    return max(scores) if study.higher_is_better else min(scores)


def _against_baseline(study: Study, folder: Path) -> dict[str, Any] | None:
    """The chosen settings' distilled student against the student alone of the same
    final run, seed by seed: the best validation score, and the test score of the
    best-on-validation checkpoint. The question a study answers is whether the teacher
    helps at all; when it does not, say so and how far the search moved from it."""
    from statistics import mean, stdev
    from types import SimpleNamespace

    from kdistill.losses.table import reads_teacher
    from kdistill.stages import stage_dir

    if len(study.config.objectives) != 1 or not (folder / "results.json").is_file():
        return None
    stages = json.loads((folder / "results.json").read_text(encoding="utf-8"))["stages"]
    if "baseline" not in stages or "distill" not in stages:
        return None
    metric = study.score_key.removeprefix("val_")
    sign = 1.0 if study.higher_is_better else -1.0
    rows: list[dict[str, Any]] = []
    for seed in study.final_seeds:
        row: dict[str, Any] = {"seed": seed}
        for name in ("baseline", "distill"):
            stage = stage_dir(folder, name, seed)
            evaluation = json.loads((stage / "eval.json").read_text(encoding="utf-8"))
            best = (evaluation.get("best") or {}).get("test") or evaluation.get("test") or {}
            row[f"val_{name}"] = _best_score(study, stage)
            row[f"test_{name}"] = best.get(metric)
        rows.append(row)
    if any(v is None for row in rows for v in row.values()):
        return None
    val_gain = [sign * (r["val_distill"] - r["val_baseline"]) for r in rows]
    test_gain = [sign * (r["test_distill"] - r["test_baseline"]) for r in rows]
    spread = stdev(test_gain) if len(test_gain) > 1 else 0.0
    chosen = json.loads((folder / "tuned_trial.json").read_text(encoding="utf-8"))
    recipe = yaml.safe_load((folder / "recipe.yaml").read_text(encoding="utf-8"))
    weights = [
        (t.get("weight", 1.0), reads_teacher(SimpleNamespace(**t)))
        for t in recipe.get("objective") or []
    ]
    share = None
    if weights and all(isinstance(w, int | float) for w, _ in weights):
        total = sum(float(w) for w, _ in weights)
        share = sum(float(w) for w, t in weights if t) / total if total > 0 else None
    better = "higher" if study.higher_is_better else "lower"
    lines = [
        "## The chosen settings against the student alone",
        "",
        f"Trial {chosen['trial']}'s settings re-run on seeds {study.final_seeds}, each seed "
        "with its own baseline (the same student, data and optimizer, no teacher): the "
        f"best {study.score_key} over the epochs, and {metric} on test of that "
        f"best-on-validation checkpoint ({better} is better).",
        "",
        f"| seed | {study.score_key} alone | distilled | test {metric} alone | distilled |",
        "|---:|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {r['seed']} | {r['val_baseline']:.4g} | {r['val_distill']:.4g} | "
        f"{r['test_baseline']:.4g} | {r['test_distill']:.4g} |"
        for r in rows
    ]
    lines.append("")
    gain, count = mean(test_gain), sum(g > 0 for g in test_gain)
    summary = (
        f"Distilled minus alone, mean over seeds: validation {mean(val_gain):+.4f}, test "
        f"{gain:+.4f} (better on {count} of {len(rows)} seeds; std of the differences "
        f"{spread:.4f})."
    )
    if count == len(rows) and gain > spread and mean(val_gain) > 0:
        verdict = "The teacher helps this student: better on every seed, by more than the spread."
    elif gain > 0:
        verdict = (
            "Ahead on average, but not on every seed or not by more than the spread: the "
            "data do not show that the teacher helps this student."
        )
    else:
        verdict = (
            "No setting the study tried makes the distilled student better than the "
            "student alone: on this data the teacher does not help this student."
        )
    if share is not None:
        verdict += (
            f" The chosen settings give the teacher's terms {100 * share:.0f}% of the "
            "objective's weight"
            + (
                ": the search moved away from the teacher, the best it could do being to "
                "weigh it little. Try another teacher (a smaller one, or an assistant "
                "between them), a larger student, or more data (a transfer set)."
                if share < 0.25
                else "."
            )
        )
    lines += [summary, "", verdict]
    record = {
        "trial": chosen["trial"], "rows": rows, "val_gain": mean(val_gain), "test_gain": gain,
        "better_seeds": count, "test_gain_std": spread, "teacher_weight_share": share,
        "verdict": verdict,
    }  # fmt: skip
    return {"lines": lines, "record": record}


def _write_best_recipe(study: Study, trial: Any, settings: dict[str, Any]) -> None:
    raw = _plain(study.recipe)
    for path, value in settings.items():
        _set(raw, path, value)
    raw["seeds"] = study.final_seeds
    if isinstance(raw.get("output"), dict):
        raw["output"]["dir"] = None
    value = ", ".join(f"{n} {v:.6g}" for n, v in zip(study.objective_names, trial.values))
    header = (
        f"# kdistill tune: trial {trial.number} of study {study.folder.name} "
        f"(chosen on validation: {value}); its settings:\n"
        + "".join(f"#   {path}: {_short(v)}\n" for path, v in settings.items())
    )
    text = header + yaml.safe_dump(raw, sort_keys=False, allow_unicode=True)
    atomic_write_text(study.folder / "best_recipe.yaml", text)


def _write_pareto(study: Study, chosen: list[Any], runs: dict[str, Any]) -> None:
    """Each Pareto-optimal trial re-measured over the final seeds: validation score and
    costs, mean ± std, in pareto.json and pareto.md."""
    from statistics import mean, stdev

    rows = []
    for trial in chosen:
        run = Path(runs[str(trial.number)]["folder"])
        measured = [_values(study, run, seed) for seed in study.final_seeds]
        rows.append(
            {
                "trial": trial.number,
                "settings": runs[str(trial.number)]["settings"],
                "search_values": dict(zip(study.objective_names, trial.values)),
                "mean": [mean(column) for column in zip(*measured)],
                "std": [stdev(column) if len(column) > 1 else 0.0 for column in zip(*measured)],
                "seeds": study.final_seeds,
            }
        )
    _write_json(study.folder / "pareto.json", {"objectives": study.objective_names, "rows": rows})
    lines = [
        f"# Pareto front of study {study.folder.name}",
        "",
        f"Each Pareto-optimal trial of the search re-run on seeds {study.final_seeds}; "
        "mean ± std of the distill stage (validation score: best epoch).",
        "",
        "| trial | " + " | ".join(study.objective_names) + " | settings |",
        "|---" * (len(study.objective_names) + 2) + "|",
    ]
    for row in rows:
        cells = [f"{m:.4g} ± {s:.2g}" for m, s in zip(row["mean"], row["std"])]
        shown = ", ".join(f"{k}={_short(v)}" for k, v in row["settings"].items())
        lines.append(f"| {row['trial']} | " + " | ".join(cells) + f" | {shown} |")
    atomic_write_text(study.folder / "pareto.md", "\n".join(lines) + "\n")
    _pareto_plot(study, rows)


def _pareto_plot(study: Study, rows: list[dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots = study.folder / "plots"
    plots.mkdir(exist_ok=True)
    for i, name in enumerate(study.objective_names[1:], start=1):
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.errorbar(
            [r["mean"][i] for r in rows], [r["mean"][0] for r in rows],
            xerr=[r["std"][i] for r in rows], yerr=[r["std"][0] for r in rows],
            fmt="o-", capsize=3,
        )  # fmt: skip
        for r in rows:
            ax.annotate(str(r["trial"]), (r["mean"][i], r["mean"][0]), fontsize=8)
        ax.set_xlabel(name)
        ax.set_ylabel(study.objective_names[0])
        ax.set_title(f"Pareto front, re-run on {len(study.final_seeds)} seeds")
        fig.tight_layout()
        fig.savefig(plots / f"pareto_{name}.png", dpi=110)
        plt.close(fig)


def _write_tables(study: Study, optuna: Any) -> None:
    """trials.csv and study.md from the storage (validation values only)."""
    space = list(study.config.space)
    header = ["trial", "state", *study.objective_names, "seconds", *space, "error"]
    trials = study.optuna_study.get_trials(deepcopy=False)
    buffer = io.StringIO()  # written whole and atomically: two workers may both write it
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    for t in trials:
        values = list(t.values) if t.values else [""] * len(study.objective_names)
        reason = t.user_attrs.get("error") or t.user_attrs.get("pruned") or ""
        writer.writerow(
            [t.number, t.state.name.lower(), *values, t.user_attrs.get("seconds", ""),
             *[t.params.get(p, "") for p in space], reason]
        )  # fmt: skip
    atomic_write_text(study.folder / "trials.csv", buffer.getvalue())
    summary = _summary(study, optuna)
    lines = [
        f"# Study {study.folder.name}: {study.recipe.name}",
        "",
        f"Sampler {study.config.sampler} (seed {study.config.sampler_seed}), pruner "
        f"{study.config.pruner.name}; objectives: "
        + ", ".join(f"{n} ({d})" for n, d in zip(study.objective_names, study.directions))
        + f"; trials train seed {study.seed}, chosen on validation only.",
        "",
        "Trials: " + ", ".join(f"{n} {s}" for s, n in sorted(summary["trials"].items())),
        "",
    ]
    for best in summary.get("best", []):
        shown = ", ".join(f"{k} {v:.6g}" for k, v in best["values"].items())
        lines.append(f"- trial {best['trial']}: {shown}")
        lines += [f"    - {k}: {_short(v)}" for k, v in best["settings"].items()]
    atomic_write_text(study.folder / "study.md", "\n".join(lines) + "\n")


def _plots(study: Study, optuna: Any) -> None:
    """Optuna's matplotlib views of the study; one that cannot be drawn (too few
    trials, one parameter) is skipped with a note."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    views = optuna.visualization.matplotlib
    folder = study.folder / "plots"
    folder.mkdir(exist_ok=True)
    target = None
    if len(study.config.objectives) > 1:

        def target(t: Any) -> float:
            return float(t.values[0])

    name = study.objective_names[0]
    drawings = {
        "history": lambda: views.plot_optimization_history(
            study.optuna_study, target=target, target_name=name
        ),
        "importances": lambda: views.plot_param_importances(
            study.optuna_study, target=target, target_name=name
        ),
        "parallel": lambda: views.plot_parallel_coordinate(
            study.optuna_study, target=target, target_name=name
        ),
    }
    if len(study.config.objectives) > 1:
        drawings["pareto_search"] = lambda: views.plot_pareto_front(
            study.optuna_study, target_names=study.objective_names
        )
    for file, draw in drawings.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                axes = draw()
            figure = axes.figure if hasattr(axes, "figure") else axes.flat[0].figure
            figure.savefig(folder / f"{file}.png", dpi=110, bbox_inches="tight")
            plt.close(figure)
        except Exception as exc:  # a view needs more trials or parameters than there are
            study.console.log(f"tune: plot {file} skipped ({type(exc).__name__}: {exc})")


def _state(summary: dict[str, Any]) -> str:
    return "finished" if "final" in summary else "unfinished"


def _write_json(path: Path, data: Any) -> None:
    atomic_write_json(path, data)
