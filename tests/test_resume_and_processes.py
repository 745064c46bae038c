"""A run killed mid-epoch resumes to the same weights; two processes match one."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from helpers import free_port, tiny_recipe
from safetensors.torch import load_file


def _recipe(tmp_path: Path, dropout: float = 0.2, **train: object) -> Path:
    recipe = tiny_recipe()
    recipe["stages"] = ["baseline"]
    recipe["data"]["limit_train"] = 6000
    # dropout and jitter make the run depend on random-number-generator state
    recipe["student"] = {"model": {"name": "mlp", "args": {"hidden": [128], "dropout": dropout}}}
    recipe["train"].update({"epochs": 3, "batch_size": 50, "augment": {"jitter": 2}, **train})
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def _kdistill(*args: str, env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "kdistill.cli", *args, "--quiet"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_past_a_truncated_checkpoint_gives_same_weights(
    tmp_path: Path, shared_data: Path
) -> None:
    """Killed mid-epoch, and the newest checkpoint then damaged (a truncated weights
    file): --resume falls back to the checkpoint before it and still ends with the
    weights of an uninterrupted run."""
    env = {**os.environ, "KDISTILL_DATA": str(shared_data)}
    recipe = _recipe(tmp_path, checkpoint_every=10)
    steps_per_epoch = 6000 // 50

    straight = _kdistill("run", str(recipe), "--output-dir", str(tmp_path / "straight"), env=env)
    assert straight.wait(timeout=600) == 0, (
        straight.stderr.read().decode() if straight.stderr else ""
    )

    killed_dir = tmp_path / "killed"
    proc = _kdistill("run", str(recipe), "--output-dir", str(killed_dir), env=env)
    checkpoints = killed_dir / "baseline" / "seed0" / "checkpoints"
    killed_at = None
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        done = sorted(p.name for p in checkpoints.glob("step-*") if not p.name.endswith(".tmp"))
        steps = [int(name.split("-")[1]) for name in done]
        # kill inside the second epoch, between two checkpoints
        if steps and steps_per_epoch + 20 <= max(steps) < 2 * steps_per_epoch - 20:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            killed_at = max(steps)
            break
        time.sleep(0.02)
    assert killed_at is not None, "the run ended before it could be killed mid-epoch"
    assert json.loads((killed_dir / "run.json").read_text())["status"] == "running"
    assert not (killed_dir / "baseline" / "seed0" / "eval.json").exists()
    newest = checkpoints / f"step-{killed_at:09d}"
    weights = newest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])

    wide = {**env, "COLUMNS": "400"}  # one log record per line
    resumed = _kdistill("run", str(recipe), "--output-dir", str(killed_dir), "--resume", env=wide)
    _, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err.decode()
    log = " ".join(err.decode().split())
    assert f"skipped damaged checkpoint step-{killed_at:09d}" in log, log
    assert f"resuming from step-{killed_at - 10:09d}" in log, log
    assert (checkpoints / f"step-{killed_at:09d}.damaged").is_dir()

    a = load_file(str(tmp_path / "straight" / "baseline" / "seed0" / "model.safetensors"))
    b = load_file(str(killed_dir / "baseline" / "seed0" / "model.safetensors"))
    assert a.keys() == b.keys()
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst <= 1e-6, f"resumed weights differ by {worst}"
    lines = (killed_dir / "baseline" / "seed0" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["epoch"] for x in lines] == [1, 2, 3]
    # each optimizer step logged once, and as the uninterrupted run logged it
    steps = [
        [json.loads(x) for x in (d / "baseline" / "seed0" / "steps.jsonl").read_text().splitlines()]
        for d in (tmp_path / "straight", killed_dir)
    ]
    assert [r["step"] for r in steps[1]] == [r["step"] for r in steps[0]]
    assert [r["loss"] for r in steps[1]] == pytest.approx([r["loss"] for r in steps[0]], rel=1e-5)


@pytest.mark.slow
def test_two_processes_match_one(tmp_path: Path, shared_data: Path) -> None:
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent))
    assert accelerate is not None, "accelerate's launcher is installed with kdistill"
    env = {**os.environ, "KDISTILL_DATA": str(shared_data), "OMP_NUM_THREADS": "1"}
    # no dropout or jitter: those draw different random numbers when samples are split
    # over two processes, so only the arithmetic of the split is compared here
    recipe = _recipe(tmp_path, dropout=0.0, augment={"jitter": 0})
    one = _kdistill("run", str(recipe), "--output-dir", str(tmp_path / "one"), env=env)
    assert one.wait(timeout=600) == 0
    two = subprocess.run(
        [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
         "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
         "-m", "kdistill.cli", "run", str(recipe), "--output-dir", str(tmp_path / "two"), "--quiet"],
        env=env, capture_output=True, timeout=600, check=False,
    )  # fmt: skip
    assert two.returncode == 0, two.stderr.decode()[-3000:]
    assert "2 process(es)" in " ".join(two.stderr.decode().split())  # really two ranks
    acc = [
        json.loads((tmp_path / name / "baseline" / "seed0" / "eval.json").read_text())["test"][
            "accuracy"
        ]
        for name in ("one", "two")
    ]
    assert abs(acc[0] - acc[1]) <= 0.003, acc
    # same global batch and loss normalisation: the weights agree up to float summation order
    a = load_file(str(tmp_path / "one" / "baseline" / "seed0" / "model.safetensors"))
    b = load_file(str(tmp_path / "two" / "baseline" / "seed0" / "model.safetensors"))
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-3


@pytest.mark.slow
def test_a_second_run_into_a_busy_folder_is_refused_and_the_first_finishes(
    tmp_path: Path, shared_data: Path
) -> None:
    """Two `kdistill run` into one folder: the second is refused at once (the folder's
    lock names the first), the first finishes, and the folder holds the first's run."""
    env = {**os.environ, "KDISTILL_DATA": str(shared_data)}
    recipe = _recipe(tmp_path, epochs=20)
    folder = tmp_path / "run"
    first = _kdistill("run", str(recipe), "--output-dir", str(folder), env=env)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and first.poll() is None:
        if (folder / "run.json").exists():  # written while the lock is held
            break
        time.sleep(0.05)
    assert first.poll() is None, "the first run ended before the second could start"
    second = _kdistill("run", str(recipe), "--output-dir", str(folder), "--resume", env=env)
    assert second.wait(timeout=120) == 2
    err = second.stderr.read().decode() if second.stderr else ""
    assert "in use by another kdistill process" in err and f"pid {first.pid}" in err, err
    assert "Traceback" not in err
    assert first.poll() is None  # refused while the first still ran
    assert first.wait(timeout=600) == 0
    status = json.loads((folder / "run.json").read_text())
    assert status["status"] == "finished"
    lock = json.loads((folder / "run.lock").read_text())
    assert lock["pid"] == first.pid and lock["released"]
