"""kdistill tune: the search space and its checks, the study folder, trials on both
tasks, the teacher trained once, failures, a killed worker and two workers."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import fails_cleanly, tiny_lm_recipe, tiny_recipe, write_recipe

import kdistill
from kdistill.errors import RecipeError, TuneError
from kdistill.tune import tune

optuna = pytest.importorskip("optuna")


def _recipe(space: dict[str, Any] | None = None, **tune_settings: Any) -> dict[str, Any]:
    recipe = tiny_recipe(seeds=[0, 1])
    recipe["data"]["limit_train"] = 600
    recipe["teacher"]["cache"] = True
    recipe["tune"] = {
        "space": space or {"objective.1.temperature": {"low": 1, "high": 4}},
        "sampler": "random",
        "trials": 2,
        **tune_settings,
    }
    return recipe


def _refused(recipe: dict[str, Any], *needles: str) -> str:
    with pytest.raises(RecipeError) as caught:
        kdistill.as_recipe(recipe)
    text = " ".join(str(caught.value).split())
    for needle in needles:
        assert needle in text, text
    return text


# ------------------------------------------------------------------ the space


@pytest.mark.parametrize(
    ("param", "needle"),
    [
        ({"low": 4, "high": 1}, "the range is inverted: low 4 must be below high 1"),
        ({"low": 2, "high": 2}, "the range is empty"),
        ({"low": 0, "high": 1, "log": True}, "log scale needs low > 0"),
        ({"choices": []}, "choices is empty"),
        ({"choices": [1], "low": 0, "high": 1}, "either choices or a range"),
        ({"low": 1}, "a range needs both low and high"),
        ({"low": 1.5, "high": 4, "type": "int"}, "type int needs a whole low"),
    ],
)
def test_bad_ranges_are_refused(param: dict[str, Any], needle: str) -> None:
    _refused(_recipe({"objective.1.temperature": param}), needle)


def test_grid_over_a_continuous_range_is_refused() -> None:
    _refused(
        _recipe({"objective.1.temperature": {"low": 1, "high": 4}}, sampler="grid"),
        "sampler grid needs values it can list",
        "objective.1.temperature is a continuous range: give it a step",
    )


def test_pruner_with_several_objectives_is_refused() -> None:
    _refused(
        _recipe(objectives=["val", "latency"], pruner="median", sampler="nsga2"),
        "pruner median stops a trial on one score",
        "set pruner: none",
    )


def test_teacher_and_data_are_fixed_for_a_study() -> None:
    _refused(
        _recipe({"teacher.train.epochs": {"choices": [1, 2]}}),
        "teacher is fixed for a whole study",
    )


def test_a_path_that_does_not_exist_gets_did_you_mean(tmp_path: Path, tiny: dict) -> None:
    recipe = _recipe({"train.optimiser.lr": {"low": 0.01, "high": 0.1}})
    with pytest.raises(RecipeError) as caught:
        tune(recipe, output_dir=tmp_path / "study")
    text = str(caught.value)
    assert "tune.space.train.optimiser.lr: train has no 'optimiser'" in text
    assert "did you mean 'optimizer'" in text
    assert not (tmp_path / "study").exists()  # refused before anything was written


def test_a_value_that_breaks_the_recipe_is_refused(tmp_path: Path, tiny: dict) -> None:
    recipe = _recipe({"objective.1.temperature": {"low": -1, "high": 4}})
    with pytest.raises(RecipeError) as caught:
        tune(recipe, output_dir=tmp_path / "study")
    assert "tune.space.objective.1.temperature: the value -1.0 makes the recipe invalid" in str(
        caught.value
    )


def test_a_whole_section_is_not_a_searched_value(tmp_path: Path, tiny: dict) -> None:
    with pytest.raises(RecipeError, match="names a whole section"):
        tune(_recipe({"train.optimizer": {"choices": [1]}}), output_dir=tmp_path / "s")


# ------------------------------------------------------------------ a study


@pytest.fixture(scope="module")
def study(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One finished study of three trials with the teacher's forward passes counted
    (rows the teacher's first layer saw), before and during the trials."""
    folder = tmp_path_factory.mktemp("tune") / "study"
    rows = {"setup": 0, "trials": 0, "train_batches": 0}
    phase = {"now": "setup"}
    original = torch.nn.Linear.forward

    def counted(layer: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
        if layer.in_features == 784 and layer.out_features == 64:  # the teacher's first layer
            rows[phase["now"]] += x.shape[0]
            if phase["now"] == "trials" and x.shape[0] == 64:  # a training batch
                rows["train_batches"] += 1
        return original(layer, x)

    import kdistill.tune as tune_module

    setup = tune_module._teacher

    def teacher_then_trials(study: Any) -> None:
        setup(study)
        phase["now"] = "trials"

    recipe = _recipe(
        {
            "objective.1.temperature": {"low": 1, "high": 4},
            "train.optimizer.lr": {"choices": [0.02, 0.05, 0.1]},
        },
        trials=3,
        final_seeds=[0, 1],
    )
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("KDISTILL_DATA", str(shared_data))
        patch.setattr(torch.nn.Linear, "forward", counted)
        patch.setattr(tune_module, "_teacher", teacher_then_trials)
        summary = tune(recipe, output_dir=folder, quiet=True)
    return {"folder": folder, "summary": summary, "rows": rows, "recipe": recipe}


def test_study_folder_holds_every_file(study: dict[str, Any]) -> None:
    folder = study["folder"]
    for name in (
        "study.db", "study.json", "trials.csv", "study.md", "best_recipe.yaml",
        "results.json", "results.md", "plots/history.png", "plots/parallel.png",
    ):  # fmt: skip
        assert (folder / name).is_file(), name
    with open(folder / "trials.csv", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert [row["state"] for row in rows] == ["complete"] * 3
    assert set(rows[0]) >= {"val_accuracy", "objective.1.temperature", "train.optimizer.lr"}
    assert json.loads((folder / "study.json").read_text())["state"] == "finished"
    assert study["summary"]["complete"] == 3 and study["summary"]["left"] == 0
    for trial in ("0000", "0001", "0002"):  # a trial writes its tables, no pictures
        assert (folder / "trials" / trial / "results.md").is_file()
        assert not (folder / "trials" / trial / "plots").exists()
        assert not (folder / "trials" / trial / "report.html").exists()


def test_trial_zero_runs_the_recipes_own_settings(study: dict[str, Any]) -> None:
    handle = optuna.load_study(study_name="tiny", storage=f"sqlite:///{study['folder']}/study.db")
    first = handle.trials[0]
    assert first.user_attrs["recipe_values"] is True
    assert first.params == {"objective.1.temperature": 2.0, "train.optimizer.lr": 0.05}


def test_best_is_chosen_on_validation_and_rerun_on_the_final_seeds(study: dict[str, Any]) -> None:
    folder = study["folder"]
    handle = optuna.load_study(study_name="tiny", storage=f"sqlite:///{folder}/study.db")
    best = max(handle.trials, key=lambda t: t.value)
    assert study["summary"]["best"][0]["trial"] == best.number
    # the objective is the distill stage's best val_accuracy over its epochs, from its files
    metrics = folder / "trials" / f"{best.number:04d}" / "distill" / "seed0" / "metrics.jsonl"
    scores = [json.loads(line)["val_accuracy"] for line in metrics.read_text().splitlines()]
    assert best.value == max(scores)
    recipe = kdistill.load_recipe(str(folder / "best_recipe.yaml"))
    assert recipe.tune is None and recipe.seeds == [0, 1]
    assert recipe.objective[1].temperature == pytest.approx(best.params["objective.1.temperature"])
    results = json.loads((folder / "results.json").read_text())
    assert results == json.loads((folder / "final" / "results.json").read_text())
    for stage in ("baseline", "distill"):
        for seed in (0, 1):
            assert (folder / "final" / stage / f"seed{seed}" / "eval.json").is_file()


def test_study_md_sets_the_chosen_settings_against_the_student_alone(
    study: dict[str, Any],
) -> None:
    folder = study["folder"]
    verdict = study["summary"]["against_baseline"]
    final = folder / "final"
    for row in verdict["rows"]:
        for name in ("baseline", "distill"):
            stage = final / name / f"seed{row['seed']}"
            evaluation = json.loads((stage / "eval.json").read_text())
            assert row[f"test_{name}"] == evaluation["best"]["test"]["accuracy"]
            scores = [json.loads(x)["val_accuracy"] for x in (stage / "metrics.jsonl").open()]
            assert row[f"val_{name}"] == max(scores)
    gains = [r["test_distill"] - r["test_baseline"] for r in verdict["rows"]]
    assert verdict["test_gain"] == pytest.approx(sum(gains) / len(gains))
    assert verdict["better_seeds"] == sum(g > 0 for g in gains)
    # the tiny recipe's objective: CE 0.5 + KD 0.5
    assert verdict["teacher_weight_share"] == pytest.approx(0.5)
    text = (folder / "study.md").read_text()
    assert "## The chosen settings against the student alone" in text
    assert verdict["verdict"] in text and text.count("## The chosen settings") == 1


def test_teacher_is_trained_once_and_its_cache_read_by_every_trial(study: dict[str, Any]) -> None:
    folder = study["folder"]
    assert (folder / "teacher" / "teacher" / "seed0" / "model.safetensors").is_file()
    for trial in sorted((folder / "trials").iterdir()):
        assert (trial / "teacher").is_symlink() and (trial / "cache").is_symlink()
        log = (trial / "trial.log").read_text()
        assert "teacher seed 0: already trained" in log
        assert "teacher logits: cache hit" in log
    rows = study["rows"]
    assert rows["setup"] > 600  # trained: epochs over the training rows
    # during the trials the teacher ran no training batch: only the agreement measure
    # on the 1,000 test images and the 2-row output check of each model build
    assert rows["train_batches"] == 0
    assert rows["trials"] <= 3 * (1000 + 2) + 2 * (1000 + 2)  # 3 trials, final on 2 seeds


def test_finished_study_is_refused_without_resume_and_grows_with_it(
    study: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    recipe = write_recipe(study["folder"].parent / "recipe.yaml", study["recipe"])
    fails_cleanly(
        capsys,
        ["tune", str(recipe), "--output-dir", str(study["folder"]), "--quiet"],
        "holds a finished study",
        "pass --resume to add trials",
    )


def test_resume_with_another_space_is_refused_saying_what_differs(
    study: dict[str, Any], tmp_path: Path
) -> None:
    recipe = dict(study["recipe"])
    recipe["tune"] = {**recipe["tune"], "sampler": "tpe"}
    with pytest.raises(TuneError) as caught:
        tune(recipe, output_dir=study["folder"], resume=True)
    assert "tune.sampler: 'random' in the study, 'tpe' now" in str(caught.value)
    other = dict(study["recipe"], train={**study["recipe"]["train"], "epochs": 3})
    with pytest.raises(TuneError, match=r"recipe.train.epochs: 2 in the study, 3 now"):
        tune(other, output_dir=study["folder"], resume=True)


def test_a_field_added_to_recipes_since_the_study_began_is_not_a_difference(
    study: dict[str, Any], tmp_path: Path
) -> None:
    # a study written by an older kdistill lacks fields added since (output.track, ...);
    # they take their defaults, so the study is still its own recipe's study
    folder = tmp_path / "old"
    shutil.copytree(study["folder"], folder, symlinks=True)
    record = json.loads((folder / "study.json").read_text())
    del record["recipe"]["output"]["track"]
    (folder / "study.json").write_text(json.dumps(record))
    with pytest.raises(TuneError) as caught:  # finished, so refused without --resume
        tune(study["recipe"], output_dir=folder)
    assert "holds a finished study" in str(caught.value)
    assert "differs" not in str(caught.value)


def test_folders_that_are_not_studies_are_refused(tiny: dict, tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "notes.txt").write_text("mine")
    with pytest.raises(TuneError, match="is not empty and holds no kdistill study"):
        tune(_recipe(), output_dir=tmp_path / "a")
    assert (tmp_path / "a" / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("kind", ["text", "sqlite"])
def test_a_database_that_is_not_a_study_is_refused(
    tiny: dict, tmp_path: Path, study: dict[str, Any], kind: str
) -> None:
    folder = tmp_path / "s"
    folder.mkdir()
    (folder / "study.json").write_text((study["folder"] / "study.json").read_text())
    db = folder / "study.db"
    if kind == "text":
        db.write_text("not a database at all")
        needle = "is not an SQLite database"
    else:
        with sqlite3.connect(db) as con:
            con.execute("CREATE TABLE notes (x TEXT)")
        needle = "is an SQLite database but not an Optuna study (its tables: notes)"
    with pytest.raises(TuneError, match=re.escape(needle)):
        tune(study["recipe"], output_dir=folder, resume=True)


# ------------------------------------------------------------------ failures


def test_failed_trials_are_recorded_and_a_study_of_failures_says_so(
    tiny: dict, tmp_path: Path
) -> None:
    # SGD at lr 1e30 makes the loss non-finite in its first steps
    recipe = _recipe({"train.optimizer.lr": {"choices": [0.05, 1.0e30]}}, sampler="grid")
    summary = tune(recipe, output_dir=tmp_path / "mixed", final=False, quiet=True)
    assert summary["trials"] == {"complete": 1, "fail": 1}
    with open(tmp_path / "mixed" / "trials.csv", encoding="utf-8") as f:
        failed = [row for row in csv.DictReader(f) if row["state"] == "fail"]
    assert "the loss became" in failed[0]["error"]
    doomed = _recipe({"train.optimizer.lr": {"choices": [1.0e30, 1.0e31]}}, sampler="grid")
    with pytest.raises(TuneError, match="every one of its 2 trials failed"):
        tune(doomed, output_dir=tmp_path / "doomed", quiet=True)


# ------------------------------------------------------------------ language models


def test_language_model_study_minimises_validation_loss(
    shared_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KDISTILL_DATA", str(shared_data))
    recipe = tiny_lm_recipe(seeds=[0])
    recipe["tune"] = {
        "space": {"objective.0.temperature": {"low": 1, "high": 3}},
        "sampler": "random",
        "trials": 2,
    }
    # the top-k cache holds the teacher at the divergence's temperature: one cache per
    # study cannot serve trials at other temperatures
    with pytest.raises(RecipeError, match="the teacher's cache, written once for the whole"):
        tune(recipe, output_dir=tmp_path / "refused")
    recipe["tune"]["space"] = {"train.optimizer.lr": {"low": 0.002, "high": 0.01, "log": True}}
    summary = tune(recipe, output_dir=tmp_path / "lm", quiet=True)
    assert summary["objectives"] == ["val_loss"] and summary["directions"] == ["minimize"]
    assert summary["complete"] == 2
    handle = optuna.load_study(study_name="tiny_lm", storage=f"sqlite:///{tmp_path}/lm/study.db")
    assert summary["best"][0]["values"]["val_loss"] == min(t.value for t in handle.trials)
    for trial in (tmp_path / "lm" / "trials").iterdir():
        assert "teacher top-8 cache hit" in (trial / "trial.log").read_text()
    assert (tmp_path / "lm" / "results.md").is_file()


# ------------------------------------------------------------------ workers


def _tune_process(recipe: Path, folder: Path, *flags: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "kdistill", "tune", str(recipe), "--output-dir", str(folder),
         "--quiet", "--no-final", *flags],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip


@pytest.mark.slow
def test_killed_study_resumes_without_repeating_a_finished_trial(
    tiny: dict, tmp_path: Path
) -> None:
    recipe = _recipe(trials=3)
    recipe["train"]["epochs"] = 4
    path = write_recipe(tmp_path / "recipe.yaml", recipe)
    folder = tmp_path / "study"
    worker = _tune_process(path, folder)
    second = folder / "trials" / "0001" / "distill" / "seed0" / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while not second.exists() and time.monotonic() < deadline and worker.poll() is None:
        time.sleep(0.2)
    assert second.exists(), worker.communicate()[0]
    worker.send_signal(signal.SIGKILL)  # mid-trial: trial 1 has begun its epochs
    worker.wait()
    first = folder / "trials" / "0000" / "distill" / "seed0" / "eval.json"
    before = first.stat().st_mtime_ns
    summary = tune(recipe, output_dir=folder, resume=True, final=False, quiet=True)
    handle = optuna.load_study(study_name="tiny", storage=f"sqlite:///{folder}/study.db")
    interrupted = [t for t in handle.trials if t.user_attrs.get("interrupted")]
    assert [t.number for t in interrupted] == [1]
    retry = [t for t in handle.trials if t.user_attrs.get("retry_of") == 1]
    assert len(retry) == 1 and retry[0].params == interrupted[0].params
    assert summary["complete"] == 3
    assert first.stat().st_mtime_ns == before  # the finished trial was not run again
    numbers = [t.number for t in handle.trials if t.state.name == "COMPLETE"]
    assert len(numbers) == len(set(numbers)) == 3


@pytest.mark.slow
def test_two_workers_share_one_study(tiny: dict, tmp_path: Path) -> None:
    path = write_recipe(tmp_path / "recipe.yaml", _recipe(trials=4))
    folder = tmp_path / "study"
    workers = [_tune_process(path, folder, "--resume") for _ in range(2)]
    outputs = [w.communicate(timeout=600)[0] for w in workers]
    assert [w.returncode for w in workers] == [0, 0], outputs
    handle = optuna.load_study(study_name="tiny", storage=f"sqlite:///{folder}/study.db")
    complete = [t for t in handle.trials if t.state.name == "COMPLETE"]
    assert len(complete) == 4
    workers_seen = {t.user_attrs["worker"]["pid"] for t in complete}
    assert len(workers_seen) == 2  # both took trials
    assert sum("the study's teacher" in out for out in outputs) == 1  # trained once


# ------------------------------------------------------------------ several objectives


def test_pareto_front_of_accuracy_against_parameters(tiny: dict, tmp_path: Path) -> None:
    recipe = _recipe(
        {"student.model.args.hidden": {"choices": [[4], [8], [16], [32]]}},
        objectives=["val", "params"],
        sampler="grid",
        trials=4,
        final_seeds=[0, 1],
        final_limit=3,
    )
    summary = tune(recipe, output_dir=tmp_path / "p", quiet=True)
    assert summary["objectives"] == ["val_accuracy", "params"]
    assert summary["directions"] == ["maximize", "minimize"]
    handle = optuna.load_study(study_name="tiny", storage=f"sqlite:///{tmp_path}/p/study.db")
    trials = handle.trials
    # params grow with the hidden width: 784*h + h + h*10 + 10
    for trial in trials:
        width = json.loads(trial.params["student.model.args.hidden"])[0]
        assert trial.values[1] == 784 * width + width + 10 * width + 10
    front = {best["trial"] for best in summary["best"]}
    dominated = {
        t.number
        for t in trials
        for u in trials
        if u.values[0] >= t.values[0] and u.values[1] <= t.values[1] and u.values != t.values
    }
    assert front and not front & dominated
    pareto = json.loads((tmp_path / "p" / "pareto.json").read_text())
    assert len(pareto["rows"]) == min(len(front), 3)
    for row in pareto["rows"]:
        assert row["seeds"] == [0, 1] and len(row["mean"]) == 2 and row["std"][1] == 0.0
        run = tmp_path / "p" / "final" / f"trial-{row['trial']:04d}"
        assert (run / "distill" / "seed1" / "eval.json").is_file()
    assert (tmp_path / "p" / "pareto.md").read_text().count("\n| ") >= 2
    assert (tmp_path / "p" / "plots" / "pareto_params.png").is_file()


def test_default_space_is_the_temperature_the_weights_and_the_learning_rate() -> None:
    from kdistill.tune import default_space

    recipe = kdistill.as_recipe(tiny_recipe())  # CE 0.5 + KD 0.5 at T 2, SGD lr 0.05
    space = default_space(recipe)
    assert set(space) == {
        "objective.0.weight", "objective.1.weight", "objective.1.temperature",
        "train.optimizer.lr",
    }  # fmt: skip
    assert (space["objective.1.temperature"].low, space["objective.1.temperature"].high) == (1, 10)
    lr = space["train.optimizer.lr"]
    assert lr.log and lr.low == pytest.approx(0.05 / 3) and lr.high == pytest.approx(0.15)
    # a cached language-model teacher holds one temperature: it is left out
    lm = kdistill.as_recipe(tiny_lm_recipe())
    assert "objective.0.temperature" not in default_space(lm)
    assert "objective.0.weight" in default_space(lm)
