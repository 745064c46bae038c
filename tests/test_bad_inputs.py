"""Bad inputs through `kdistill run`: each one exits with status 2 and one paragraph that
says what is wrong, where (file, YAML path or step) and what to do; no traceback unless
--debug; and the files an earlier run wrote are left as they were, with no half-written
(*.tmp, *.part) files beside them."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import urllib.error
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
import yaml
from helpers import tiny_recipe
from safetensors.torch import load_file, save_file

from kdistill.checkpoint import save_weights
from kdistill.cli import main
from kdistill.data import mnist
from kdistill.errors import RecipeError
from kdistill.lock import LOCK
from kdistill.models import build_model
from kdistill.recipe import ModelSpec

REPO = Path(__file__).resolve().parents[1]
# rewritten by every run that gets past the folder check: the latest attempt and its recipe
PER_ATTEMPT = frozenset({"run.json", "recipe.yaml"})
# what a stage that failed or trained later must not touch
EARLIER_STAGES = frozenset({"teacher", "baseline", "cache"})


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(url: str, timeout: float) -> bytes:
        raise urllib.error.URLError("network disabled in tests")

    monkeypatch.setattr(mnist, "_fetch_url", refuse)


class Finished(NamedTuple):
    recipe: Path
    run: Path
    data: Path


@pytest.fixture(scope="module")
def finished(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Finished:
    """A finished tiny run with a teacher cache; read-only, tests change copies of it."""
    folder = tmp_path_factory.mktemp("finished")
    recipe = tiny_recipe()
    recipe["teacher"].update(cache=True, train={"epochs": 1})
    recipe["train"]["epochs"] = 1
    path = write_recipe(folder / "tiny.yaml", recipe)
    run = folder / "run"
    args = ["run", str(path), "--output-dir", str(run), "--data-dir", str(shared_data), "--quiet"]
    assert main(args) == 0
    return Finished(path, run, shared_data)


# --------------------------------------------------------------------------- helpers


def write_recipe(path: Path, recipe: dict) -> Path:
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def run_cli(
    capsys: pytest.CaptureFixture[str], recipe: Path, out: Path, data_dir: Path, *flags: str
) -> tuple[int, str]:
    """Exit status and everything printed, of `kdistill run` in-process."""
    argv = ["run", str(recipe), "--output-dir", str(out), "--data-dir", str(data_dir), "--quiet"]
    code = main([*argv, *flags])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def error_message(output: str) -> str:
    """The `error:` paragraph, after checking it is the only error and has no traceback."""
    assert "Traceback" not in output
    assert output.count("error: ") == 1, output
    message = output.split("error: ", 1)[1].strip()
    assert message and "\n\n" not in message, message  # one paragraph
    return message


def snapshot(folder: Path, *, skip: frozenset[str] = frozenset()) -> dict[str, tuple[str, int]]:
    """sha256 and mtime (ns) of every file under `folder`, by relative path, except
    those whose first path part is in `skip`, and the run folder's lock, which records
    who last held the folder and is rewritten by every command that opens it."""
    skip = skip | {LOCK}
    files = {}
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder).as_posix()
        if path.is_file() and rel.split("/")[0] not in skip:
            files[rel] = (hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_mtime_ns)
    return files


def partial_files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.name.endswith((".tmp", ".part"))]


def copy_run(finished: Finished, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(finished.run, out)  # copy2 keeps the mtimes
    return out


def status_of(run: Path) -> dict:
    return json.loads((run / "run.json").read_text())


def assert_recipe_refused(
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    finished: Finished,
    recipe: dict,
    fragments: list[str],
) -> str:
    """A bad recipe pointed at a finished run folder (with --resume) leaves every file as it was."""
    out = copy_run(finished, tmp_path)
    before = snapshot(out)
    path = write_recipe(tmp_path / "bad.yaml", recipe)
    code, output = run_cli(capsys, path, out, finished.data, "--resume")
    assert code == 2
    message = error_message(output)
    for fragment in [str(path), "1 problem in the recipe", "run `kdistill validate` again"]:
        assert fragment in message, (fragment, message)
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    assert snapshot(out) == before and not partial_files(out)
    return message


# ------------------------------------------------------------------------ the recipe


def test_unknown_key_suggests_the_right_one(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, finished: Finished
) -> None:
    recipe = tiny_recipe()
    recipe["train"]["epcohs"] = 3
    message = assert_recipe_refused(
        capsys,
        tmp_path,
        finished,
        recipe,
        ["train.epcohs: unknown key 'epcohs'", "(did you mean 'epochs'?)", "allowed here: "],
    )
    # teacher.train inherits the key from train; the user wrote it once, so it is reported once
    assert "teacher.train" not in message


def test_wrong_type_names_field_and_value(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, finished: Finished
) -> None:
    recipe = tiny_recipe()
    recipe["train"]["batch_size"] = "sixty-four"
    assert_recipe_refused(
        capsys,
        tmp_path,
        finished,
        recipe,
        ["train.batch_size: ", "valid integer", "(got 'sixty-four')"],
    )


def test_negative_temperature(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, finished: Finished
) -> None:
    recipe = tiny_recipe()
    recipe["objective"][1]["temperature"] = -2
    assert_recipe_refused(
        capsys,
        tmp_path,
        finished,
        recipe,
        ["objective[1]: ", "temperature of loss 'kd'", "must stay in (0, inf)", "reaches -2"],
    )


def test_weight_schedule_ending_below_zero(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, finished: Finished
) -> None:
    recipe = tiny_recipe()
    recipe["objective"][1]["weight"] = {"kind": "linear", "start": 1, "end": -1}
    assert_recipe_refused(
        capsys,
        tmp_path,
        finished,
        recipe,
        ["objective[1]: ", "weight of loss 'kd'", "must stay in [0, inf)", "reaches -1"],
    )


# ------------------------------------------------------------------- models, weights


def test_student_with_other_class_count_fails_before_any_training(
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    shared_data: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.syspath_prepend(str(REPO))  # so `tests.helpers_models` imports
    recipe = tiny_recipe()
    recipe["student"]["model"] = {"name": "tests.helpers_models:five_class_mlp"}
    path = write_recipe(tmp_path / "five.yaml", recipe)
    out = tmp_path / "run"
    code, output = run_cli(capsys, path, out, shared_data)
    assert code == 2
    message = error_message(output)
    for fragment in ["student.model: ", "outputs (2, 5)", "10 classes", "must output (2, 10)"]:
        assert fragment in message, (fragment, message)
    assert "number of classes to match the data" in message
    assert not (out / "teacher").exists()  # found before the teacher trained for nothing
    assert status_of(out)["status"] == "failed" and not partial_files(out)


def test_teacher_checkpoint_of_another_architecture(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, shared_data: Path
) -> None:
    other = build_model(
        ModelSpec(name="mlp", args={"hidden": [32]}), input_shape=(1, 28, 28), num_classes=10
    )
    weights = tmp_path / "other_teacher.safetensors"
    save_weights(other, weights)
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    recipe = tiny_recipe(stages=["distill"])
    recipe["teacher"]["checkpoint"] = str(weights)
    out = tmp_path / "run"
    code, output = run_cli(capsys, write_recipe(tmp_path / "r.yaml", recipe), out, shared_data)
    assert code == 2
    message = error_message(output)
    for fragment in [
        "teacher.checkpoint: ",
        str(weights),
        "does not match the model",
        "checkpoint (32, 784) vs model (64, 784)",
        "model name and args",
    ]:
        assert fragment in message, (fragment, message)
    assert hashlib.sha256(weights.read_bytes()).hexdigest() == digest
    assert not (out / "distill").exists() and not partial_files(out)


# ----------------------------------------------------------------------------- data


@pytest.mark.parametrize("damage", ["empty", "truncated"])
def test_damaged_mnist_file(
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    finished: Finished,
    shared_data: Path,
    damage: str,
) -> None:
    root = tmp_path / "data"
    (root / "mnist").mkdir(parents=True)
    for name in mnist.FILES:
        (root / "mnist" / name).symlink_to(shared_data / "mnist" / name)
    damaged = root / "mnist" / "train-images-idx3-ubyte.gz"
    damaged.unlink()
    content = (
        b"" if damage == "empty" else (shared_data / "mnist" / damaged.name).read_bytes()[:100_000]
    )
    damaged.write_bytes(content)
    out = copy_run(finished, tmp_path)
    before = snapshot(out)
    code, output = run_cli(capsys, finished.recipe, out, root, "--resume")
    assert code == 2
    message = error_message(output)
    expected = (
        ["found an empty file"] if damage == "empty" else ["100,000 bytes that do not decompress"]
    )
    for fragment in [str(damaged), *expected, "9,912,422 bytes", "Delete the file and run again"]:
        assert fragment in message, (fragment, message)
    assert damaged.read_bytes() == content  # reported, not deleted or replaced
    assert snapshot(out) == before and not partial_files(out)


def test_negative_label_in_npz(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, shared_data: Path
) -> None:
    # npz classes are 0 .. max label, so a label past the end cannot happen; a negative can
    folder = tmp_path / "toy"
    folder.mkdir()
    rng = np.random.default_rng(0)
    train_y = np.arange(200) % 4
    train_y[7] = -1
    np.savez(folder / "train.npz", x=rng.normal(size=(200, 3)), y=train_y)
    np.savez(folder / "test.npz", x=rng.normal(size=(40, 3)), y=np.arange(40) % 4)
    before = snapshot(folder)
    recipe = tiny_recipe(data={"source": "npz", "path": str(folder)})
    out = tmp_path / "run"
    code, output = run_cli(capsys, write_recipe(tmp_path / "r.yaml", recipe), out, shared_data)
    assert code == 2
    message = error_message(output)
    for fragment in [
        str(folder / "train.npz"),
        "label -1 is outside [0, 4)",
        "1 of 200 labels",
        "must be class indices 0 .. 3",
    ]:
        assert fragment in message, (fragment, message)
    assert snapshot(folder) == before
    assert not any(p.is_file() for p in out.rglob("*"))


def test_missing_mnist_without_network(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, finished: Finished
) -> None:
    nowhere = tmp_path / "nowhere"
    out = tmp_path / "run"
    code, output = run_cli(capsys, finished.recipe, out, nowhere)
    assert code == 2
    message = error_message(output)
    for fragment in [
        "MNIST files are missing and could not be downloaded",
        "network disabled in tests",
        f"searched: {nowhere / 'mnist'}",
        "train-images-idx3-ubyte.gz",
        "--data-dir <folder>",
        "KDISTILL_DATA=<folder>",
    ]:
        assert fragment in message, (fragment, message)
    assert not nowhere.exists()  # nothing half-downloaded left behind
    assert not any(p.is_file() for p in out.rglob("*"))


# ----------------------------------------------------------------------- run folder


@pytest.mark.parametrize("changed", ["teacher", "data"])
def test_stale_teacher_cache_is_refused(
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    finished: Finished,
    changed: str,
) -> None:
    out = copy_run(finished, tmp_path)
    shutil.rmtree(out / "distill")
    flags = ["--resume"]
    if changed == "teacher":  # the teacher was retrained in place: same shapes, new weights
        weights = out / "teacher" / "seed0" / "model.safetensors"
        state = load_file(str(weights))
        first = next(iter(state))
        state[first] = state[first] + 0.01
        save_file(state, str(weights))
        expected = "it was made by another teacher"
    else:
        flags += ["--set", "data.limit_train=1500"]
        expected = "it was made on other data"
    before = snapshot(out, skip=PER_ATTEMPT)
    code, output = run_cli(capsys, finished.recipe, out, finished.data, *flags)
    assert code == 2
    message = error_message(output)
    cache = out / "cache" / "teacher-seed0"
    for fragment in [f"teacher cache {cache} is stale", expected, f"delete {cache}", "--overwrite"]:
        assert fragment in message, (fragment, message)
    assert snapshot(out, skip=PER_ATTEMPT) == before and not partial_files(out)
    assert not (out / "distill").exists()
    status = status_of(out)
    assert status["status"] == "failed" and status["error"].startswith("CacheError: ")
    assert "finished" not in status  # the record describes this attempt


def test_corrupt_cache_fails_its_checksum(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, finished: Finished
) -> None:
    out = copy_run(finished, tmp_path)
    shutil.rmtree(out / "distill")
    logits = out / "cache" / "teacher-seed0" / "logits.npy"
    content = bytearray(logits.read_bytes())
    content[-16:] = bytes(b ^ 0xFF for b in content[-16:])
    logits.write_bytes(bytes(content))
    before = snapshot(out, skip=PER_ATTEMPT)
    code, output = run_cli(capsys, finished.recipe, out, finished.data, "--resume")
    assert code == 2
    message = error_message(output)
    for fragment in [str(logits), "does not match its checksum", "delete ", "--overwrite"]:
        assert fragment in message, (fragment, message)
    assert snapshot(out, skip=PER_ATTEMPT) == before and not partial_files(out)
    assert status_of(out)["status"] == "failed"


def test_finished_run_folder(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, finished: Finished
) -> None:
    out = copy_run(finished, tmp_path)
    before = snapshot(out)
    results = (out / "results.json").read_text()

    code, output = run_cli(capsys, finished.recipe, out, finished.data)
    assert code == 2
    message = error_message(output)
    for fragment in [
        f"output folder {out}",
        "already holds a finished run",
        "--overwrite",
        "--resume",
    ]:
        assert fragment in message, (fragment, message)
    assert snapshot(out) == before  # refused before anything was written

    code, output = run_cli(capsys, finished.recipe, out, finished.data, "--resume")
    assert code == 0 and "Traceback" not in output
    after = snapshot(out, skip=PER_ATTEMPT)
    for stage in ("teacher", "baseline", "distill"):
        for name in ("eval.json", "model.safetensors", "best.safetensors"):
            key = f"{stage}/seed0/{name}"
            assert after[key] == before[key], key  # nothing retrained
    assert (out / "results.json").read_text() == results
    assert status_of(out)["status"] == "finished"

    # a smaller train split keeps it quick and shows that nothing old was reused
    smaller = ["--set", "data.limit_train=500"]
    code, output = run_cli(capsys, finished.recipe, out, finished.data, "--overwrite", *smaller)
    assert code == 0 and "Traceback" not in output
    manifest = json.loads((out / "cache" / "teacher-seed0" / "manifest.json").read_text())
    assert manifest["shape"] == [500, 10]
    replaced = snapshot(out)
    assert all(replaced[k] != before[k] for k in before if k.endswith("eval.json"))
    assert status_of(out)["status"] == "finished" and not partial_files(out)


# ------------------------------------------------------------------------- training


def test_non_finite_loss_names_step_and_checkpoint(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, finished: Finished
) -> None:
    out = copy_run(finished, tmp_path)
    shutil.rmtree(out / "distill")
    before = snapshot(out, skip=PER_ATTEMPT)
    data_dir = finished.data
    absurd = ["--set", "train.optimizer.lr=1e6", "--set", "train.checkpoint_every=1"]
    code, output = run_cli(capsys, finished.recipe, out, data_dir, "--resume", *absurd)
    assert code == 2
    message = error_message(output)
    found = re.search(r"the loss became (nan|inf|-inf) at epoch 1, step (\d+)", message)
    assert found, message
    step = int(found.group(2))
    stage = out / "distill" / "seed0"
    last = stage / "checkpoints" / f"step-{step - 1:09d}"
    assert last.is_dir() and f"the last checkpoint before it is {last}" in message
    for fragment in ["distill seed 0: ", "train.optimizer.lr", f"delete {stage}", "--resume"]:
        assert fragment in message, (fragment, message)
    assert snapshot(out, skip=PER_ATTEMPT | {"distill"}) == before and not partial_files(out)
    status = status_of(out)
    assert status["status"] == "failed" and status["error"].startswith("TrainingError: ")

    # the advice works: without the stage's checkpoints a sane learning rate trains it
    shutil.rmtree(stage)
    code, output = run_cli(capsys, finished.recipe, out, data_dir, "--resume")
    assert code == 0 and (stage / "eval.json").is_file()
    assert status_of(out)["status"] == "finished" and "error" not in status_of(out)
    earlier = {k: v for k, v in before.items() if k.split("/")[0] in EARLIER_STAGES}
    assert {k: v for k, v in snapshot(out).items() if k.split("/")[0] in EARLIER_STAGES} == earlier


# ---------------------------------------------------------------------------- the CLI


def test_debug_shows_the_traceback(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, shared_data: Path
) -> None:
    recipe = tiny_recipe()
    recipe["train"]["epcohs"] = 3
    path = write_recipe(tmp_path / "bad.yaml", recipe)
    out = tmp_path / "run"
    code, output = run_cli(capsys, path, out, shared_data)
    assert code == 2 and "Traceback" not in output
    for argv in (["--debug", "run", str(path)], ["run", str(path), "--debug"]):
        with pytest.raises(RecipeError, match="did you mean 'epochs'"):
            main([*argv, "--output-dir", str(out)])
    assert not out.exists()


def test_error_text_is_printed_verbatim(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, shared_data: Path
) -> None:
    # rich markup would swallow "[teacher]" in the advice, or fail on a "[/path]"
    path = write_recipe(tmp_path / "r.yaml", tiny_recipe())
    out = tmp_path / "run"
    argv = ["cache", str(path), "--output-dir", str(out), "--data-dir", str(shared_data)]
    assert main(argv) == 2
    message = error_message(capsys.readouterr().err)
    assert "no trained teacher at" in message and "--set 'stages=[teacher]'" in message
