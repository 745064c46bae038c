"""End to end: a tiny recipe on real MNIST writes every file the report promises."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

import kdistill
from kdistill.cli import main
from kdistill.errors import CacheError
from kdistill.recipe import LossTerm
from kdistill.tasks.classification.pipeline import baseline_terms


def test_distill_writes_run_folder(tiny: dict, tmp_path: Path) -> None:
    tiny["seeds"] = [0, 1]
    tiny["teacher"]["cache"] = True
    results = kdistill.distill(tiny, output_dir=tmp_path / "run", quiet=True)
    run = tmp_path / "run"
    for stage, seeds in (("teacher", [0]), ("baseline", [0, 1]), ("distill", [0, 1])):
        for seed in seeds:
            folder = run / stage / f"seed{seed}"
            for name in (
                "model.safetensors",
                "model.json",
                "eval.json",
                "metrics.jsonl",
                "best.safetensors",
            ):
                assert (folder / name).is_file(), folder / name
            lines = (folder / "metrics.jsonl").read_text().splitlines()
            assert len(lines) == 2 and all("val_accuracy" in json.loads(x) for x in lines)
            record = json.loads(lines[-1])
            assert record["samples_per_second"] > 0 and 0 < record["data_share"] < 1
            assert "tokens_per_second" not in record  # images
    saved = json.loads((run / "results.json").read_text())
    assert saved["stages"].keys() == {"teacher", "baseline", "distill"}
    for stage in saved["stages"].values():
        for key in ("accuracy", "accuracy_std", "errors"):
            assert key in stage["test"]
        for key in ("params", "flops", "latency_ms", "size_bytes"):
            assert stage["cost"][key] > 0
        assert stage["train_seconds"] > 0
    assert (
        saved["stages"]["distill"]["cost"]["params"] < saved["stages"]["teacher"]["cost"]["params"]
    )
    assert "gap_recovered" in saved
    assert results["stages"]["teacher"]["test"]["accuracy"] > 0.8  # a real model, not chance
    assert (run / "results.md").read_text().count("distill") >= 1
    assert (run / "plots" / "curves.png").is_file()
    manifest = json.loads((run / "cache" / "teacher-seed0" / "manifest.json").read_text())
    assert manifest["shape"] == [2000, 10]  # limit_train applies after the val split
    assert json.loads((run / "run.json").read_text())["status"] == "finished"
    resolved = yaml.safe_load((run / "recipe.yaml").read_text())
    assert resolved["seeds"] == [0, 1]


def test_cli_run_then_report_and_eval(
    tiny: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "tiny.yaml"
    tiny["stages"] = ["teacher", "baseline"]
    path.write_text(yaml.safe_dump(tiny))
    run = tmp_path / "run"
    assert (
        main(["run", str(path), "--output-dir", str(run), "--quiet", "--set", "train.epochs=1"])
        == 0
    )
    assert json.loads((run / "baseline" / "seed0" / "eval.json").read_text())["epochs"] == 1
    before = (run / "results.json").read_text()
    (run / "results.json").unlink()
    assert main(["report", str(run)]) == 0
    assert (run / "results.json").read_text() == before
    capsys.readouterr()
    assert main(["eval", str(run / "baseline" / "seed0"), "--json"]) == 0
    measured = json.loads(capsys.readouterr().out)
    assert measured["test"]["accuracy"] == pytest.approx(
        json.loads((run / "baseline" / "seed0" / "eval.json").read_text())["test"]["accuracy"]
    )


def test_baseline_keeps_teacher_free_terms() -> None:
    terms = [
        LossTerm(loss="cross_entropy", weight=0.1, params={"label_smoothing": 0.1}),
        LossTerm(loss="kd", weight=0.9, temperature=4),
    ]
    kept = baseline_terms(terms)
    assert [t.loss for t in kept] == ["cross_entropy"]
    assert kept[0].weight == 1.0 and kept[0].params == {"label_smoothing": 0.1}
    assert [t.loss for t in baseline_terms(terms[1:])] == ["cross_entropy"]


def test_cli_lists_recipes_and_losses(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["recipes"]) == 0
    out = capsys.readouterr().out
    assert "mnist_hinton" in out and "mnist_quick" in out
    assert main(["recipes", "--losses"]) == 0
    out = capsys.readouterr().out
    classifier, _, language_model = out.partition("causal language modelling")
    for name in ("kd", "dkd", "dist", "jsd", "skew_kl", "tvd", "bce_kd"):
        assert f"\n  {name} " in classifier
    for name in ("cross_entropy", "forward_kl", "reverse_kl", "jsd", "skew_kl", "tvd"):
        assert f"\n  {name} " in language_model


def test_cache_command_then_distill_reads_it(
    tiny: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tiny["teacher"]["cache"] = True
    tiny["stages"] = ["teacher"]
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(tiny))
    run = tmp_path / "run"
    assert main(["run", str(path), "--output-dir", str(run), "--quiet"]) == 0
    assert main(["cache", str(path), "--output-dir", str(run)]) == 0
    cache = run / "cache" / "teacher-seed0"
    manifest = json.loads((cache / "manifest.json").read_text())
    assert manifest["shape"] == [2000, 10] and manifest["split"] == "train"
    written = (cache / "logits.npy").stat().st_mtime_ns
    capsys.readouterr()
    assert main(["cache", str(path), "--output-dir", str(run)]) == 0
    assert "up to date" in capsys.readouterr().err
    # the distill stage reads the cache the command wrote instead of rebuilding it
    assert main(["run", str(path), "--output-dir", str(run), "--resume", "--quiet",
                 "--set", "stages=[teacher,distill]"]) == 0  # fmt: skip
    assert (cache / "logits.npy").stat().st_mtime_ns == written
    assert (run / "distill" / "seed0" / "eval.json").is_file()


def test_cache_without_a_teacher_is_a_recipe_error(tiny: dict, tmp_path: Path) -> None:
    """The Python API refuses a recipe with no teacher with the user error, not an assert."""
    from kdistill.errors import RecipeError
    from kdistill.recipe import validate_recipe
    from kdistill.tasks.classification.teacher_cache import cache_teacher

    alone = validate_recipe({**tiny, "teacher": None, "stages": ["baseline"]})
    with pytest.raises(RecipeError, match="no teacher section"):
        cache_teacher(alone, output_dir=tmp_path / "run")


def test_cache_dir_reuses_another_runs_teacher_logits(
    tiny: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A second experiment (another objective, other seeds) points teacher.checkpoint and
    teacher.cache_dir at a first run: the logits are read, not recomputed."""
    tiny["teacher"]["cache"] = True
    tiny["stages"] = ["teacher", "distill"]
    first = tmp_path / "first"
    kdistill.distill(tiny, output_dir=first, quiet=True)
    cache = first / "cache" / "teacher-seed0"
    written = (cache / "logits.npy").stat().st_mtime_ns
    tiny["teacher"]["checkpoint"] = str(first / "teacher" / "seed0")
    tiny["teacher"]["cache_dir"] = str(cache)
    tiny["objective"] = [{"loss": "kd", "weight": 1.0, "temperature": 2.0}]
    tiny["stages"] = ["distill"]
    tiny["seeds"] = [3, 4]
    capsys.readouterr()
    kdistill.distill(tiny, output_dir=tmp_path / "second")
    logged = " ".join(capsys.readouterr().err.split())  # rich wraps long lines
    assert logged.count("cache hit, 2000 rows read from") == 2  # once per seed
    assert (cache / "logits.npy").stat().st_mtime_ns == written
    assert not (tmp_path / "second" / "cache").exists()
    assert (tmp_path / "second" / "distill" / "seed4" / "eval.json").is_file()
    # the loaded teacher is measured like the trained one: same weights, same numbers
    # (under the run's first seed, 3: the weights are those of the first run's seed 0)
    measured = json.loads((tmp_path / "second" / "teacher" / "seed3" / "eval.json").read_text())
    trained = json.loads((first / "teacher" / "seed0" / "eval.json").read_text())
    assert measured["test"] == trained["test"] and measured["train_seconds"] == 0.0
    # `kdistill cache` checks the same folder the run reads, and writes nothing elsewhere
    path = tmp_path / "second.yaml"
    path.write_text(yaml.safe_dump(tiny))
    assert main(["cache", str(path), "--output-dir", str(tmp_path / "second")]) == 0
    said = "".join(capsys.readouterr().err.split())  # rich wraps the long path
    assert f"teachercache{cache}isuptodate" in said
    assert not (tmp_path / "second" / "cache").exists()
    # the run's cache/ folder instead of the cache in it: the error names the subfolder,
    # and nothing there is touched
    tiny["teacher"]["cache_dir"] = str(first / "cache")
    with pytest.raises(CacheError, match="caches in the subfolders teacher-seed0") as error:
        kdistill.distill(tiny, output_dir=tmp_path / "third", quiet=True)
    assert str(cache) in str(error.value)
    assert (cache / "logits.npy").stat().st_mtime_ns == written


def test_a_loaded_teacher_has_its_row_and_the_gap_in_the_results(
    tiny: dict, tmp_path: Path
) -> None:
    """teacher.checkpoint with stages baseline and distill: the teacher is measured on
    the test split like a trained one, so the table shows it and the gap recovered."""
    tiny["stages"] = ["teacher"]
    tiny["teacher"]["train"]["epochs"] = 6  # a teacher clearly above the baseline
    kdistill.run(tiny, output_dir=tmp_path / "first", quiet=True)
    tiny["teacher"]["checkpoint"] = str(tmp_path / "first")
    tiny["stages"] = ["baseline", "distill"]
    kdistill.run(tiny, output_dir=tmp_path / "second", quiet=True)
    results = json.loads((tmp_path / "second" / "results.json").read_text())
    first = json.loads((tmp_path / "first" / "results.json").read_text())
    assert list(results["stages"]) == ["teacher", "baseline", "distill"]
    assert results["stages"]["teacher"]["test"] == first["stages"]["teacher"]["test"]
    assert isinstance(results["gap_recovered"], float), results["gap_recovered_note"]
    assert "| teacher |" in (tmp_path / "second" / "results.md").read_text()
