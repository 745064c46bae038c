"""Faults: a cache job killed with SIGKILL, and a disk that fills up while a checkpoint
or a cache is written.

A killed `kdistill cache` is run again: the top-k cache continues after its last
recorded shard, the dense cache is rebuilt from scratch (its partial `.tmp` folder is
discarded); either way the result is byte-identical to a cache built without
interruption, and no traceback is printed.

A full disk is simulated in-process: the lowest-level write (safetensors' save_file,
torch.save, numpy.save, the shard file's write) fails with ENOSPC after writing part of
its file. A real full file system (a small tmpfs) would be the faithful test, but it
needs a mount, which needs root; the monkeypatched error is the fallback. The write
must leave the previous checkpoint, the previous cache or the shards already written
intact, remove its partial file or folder, and end in one kdistill error (exit status
2, no traceback) that says the disk is full and how to go on.
"""

from __future__ import annotations

import errno
import json
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import numpy as np
import pytest
import torch
from helpers import tiny_lm_recipe, tiny_recipe, write_recipe

import kdistill
import kdistill.cache.dense as dense
import kdistill.cache.topk as topk
import kdistill.checkpoint as checkpoint
from kdistill.cache import TopKCacheSpec, TopKCacheWriter, open_cache, open_topk_cache
from kdistill.cache.manifest import MANIFEST, manifest_or_none
from kdistill.cache.topk_teacher import teacher_topk
from kdistill.checkpoint import (
    file_sha256,
    restore_training_state,
    save_training_state,
    save_weights,
    training_states,
)
from kdistill.cli import main
from kdistill.data import build as build_data
from kdistill.errors import CacheError, CheckpointError
from kdistill.models import build_model
from kdistill.recipe import ModelSpec
from kdistill.tasks.causal_lm.data import build_lm_data
from kdistill.tasks.classification.models import make_model

TOPK_CACHE = Path("cache") / "topk-teacher-seed0"
DENSE_CACHE = Path("cache") / "teacher-seed0"


# ------------------------------------------------------------------ helpers


def _disk_full() -> OSError:
    return OSError(errno.ENOSPC, "No space left on device")


def _kdistill(*args: str | Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "kdistill.cli", *map(str, args)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def _sigkill_when(proc: subprocess.Popen[bytes], ready: Callable[[], bool]) -> None:
    """SIGKILL `proc` as soon as `ready()` holds; fails if the process ends first."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if ready():
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return
        time.sleep(0.005)
    err = proc.stderr.read().decode() if proc.stderr and proc.poll() is not None else ""
    proc.kill()
    pytest.fail(f"the job ended (or hung) before it could be killed mid-write: {err[-2000:]}")


def _cli(capsys: pytest.CaptureFixture[str], *argv: str | Path) -> tuple[int, str]:
    """`kdistill ARGV` in this process: the exit status and stderr with whitespace folded."""
    code = main([str(a) for a in argv])
    return code, " ".join(capsys.readouterr().err.split())


def _assert_one_clear_error(code: int, err: str, *needles: str) -> None:
    assert code == 2, err
    assert "Traceback" not in err
    assert err.count("error:") == 1, err
    for needle in needles:
        assert needle in err, err


def _tmp_leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*.tmp"))


# ------------------------------------------------------------------ run folders


@pytest.fixture(scope="module")
def lm(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A causal-LM recipe whose top-k cache is 235 sequences in shards of 4, and a run
    folder `reference` holding its tokenizer, a teacher (untrained: the cache only needs
    fixed weights) and the cache written without interruption."""
    base = tmp_path_factory.mktemp("lm_faults")
    spec = tiny_lm_recipe()
    spec["teacher"]["cache"]["shard_sequences"] = 4
    spec["data"]["limit_chars"] = 12000
    spec["train"]["eval_batch_size"] = 16  # the teacher's batch: small, so a kill lands mid-way
    path = write_recipe(base / "recipe.yaml", spec)
    recipe = kdistill.load_recipe(str(path))
    reference = base / "reference"
    data = build_lm_data(recipe.data, data_dir=shared_data, tokenizer_dir=reference / "tokenizer")
    torch.manual_seed(0)
    teacher = data.build_model(recipe.teacher.model, "teacher.model")
    (reference / "teacher" / "seed0").mkdir(parents=True)
    save_weights(teacher, reference / "teacher" / "seed0" / "model.safetensors")
    argv = ["cache", str(path), "--output-dir", str(reference), "--data-dir", str(shared_data)]
    assert main(argv) == 0
    assert len(json.loads((reference / TOPK_CACHE / MANIFEST).read_text())["shards"]) > 50
    return path, reference


@pytest.fixture(scope="module")
def classifier(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A classification recipe with teacher.cache, and a run folder `reference` holding its
    teacher (an untrained MLP wide enough that its pass over the 3,600 training rows
    takes a moment) and the logits cache written without interruption."""
    base = tmp_path_factory.mktemp("dense_faults")
    spec = tiny_recipe(
        teacher={"model": {"name": "mlp", "args": {"hidden": [2048, 2048]}}, "cache": True}
    )
    spec["data"]["limit_train"] = 4000
    path = write_recipe(base / "recipe.yaml", spec)
    recipe = kdistill.load_recipe(str(path))
    bundle = build_data(recipe.data, shared_data).for_distill()
    torch.manual_seed(0)
    teacher = make_model(bundle, recipe.teacher.model, where="teacher.model")
    reference = base / "reference"
    (reference / "teacher" / "seed0").mkdir(parents=True)
    save_weights(teacher, reference / "teacher" / "seed0" / "model.safetensors")
    argv = ["cache", str(path), "--output-dir", str(reference), "--data-dir", str(shared_data)]
    assert main(argv) == 0
    return path, reference


def _fresh_run(reference: Path, folder: Path) -> Path:
    """A run folder with the reference's tokenizer and teacher but no cache."""
    shutil.copytree(reference, folder, ignore=shutil.ignore_patterns("cache", "run.lock"))
    return folder


# ------------------------------------------------------------------ SIGKILL mid-cache


@pytest.mark.slow
def test_sigkill_mid_topk_cache_then_cache_again_continues_to_the_same_shards(
    lm: tuple[Path, Path], shared_data: Path, tmp_path: Path
) -> None:
    """Killed once some shards are recorded: `kdistill cache` again keeps those shard
    files as they are, writes the rest, and the manifest's sha256s and every shard's
    bytes equal the uninterrupted cache's."""
    recipe, reference = lm
    run = _fresh_run(reference, tmp_path / "run")
    cache = run / TOPK_CACHE
    argv = ("cache", recipe, "--output-dir", run, "--data-dir", shared_data)

    def some_shards_recorded() -> bool:
        manifest = manifest_or_none(cache)
        return manifest is not None and manifest["sequences_written"] > 0

    _sigkill_when(_kdistill(*argv), some_shards_recorded)
    partial = json.loads((cache / MANIFEST).read_text())
    assert not partial["complete"]
    assert 0 < partial["sequences_written"] < partial["num_sequences"]
    kept = {s["file"]: (cache / s["file"]).stat().st_ino for s in partial["shards"]}

    again = _kdistill(*argv)
    _, err = again.communicate(timeout=120)
    assert again.returncode == 0, err.decode()
    assert "Traceback" not in err.decode()
    done = json.loads((cache / MANIFEST).read_text())
    expected = json.loads((reference / TOPK_CACHE / MANIFEST).read_text())
    assert done["complete"]
    assert done["shards"] == expected["shards"]  # files, ranges, sizes and sha256s
    for shard in expected["shards"]:
        assert (cache / shard["file"]).read_bytes() == (
            reference / TOPK_CACHE / shard["file"]
        ).read_bytes()
    # continued, not rebuilt: the shards recorded before the kill are the same files
    assert {name: (cache / name).stat().st_ino for name in kept} == kept
    assert sorted(p.name for p in cache.iterdir()) == sorted(
        p.name for p in (reference / TOPK_CACHE).iterdir()
    )


@pytest.mark.slow
def test_sigkill_mid_dense_cache_then_cache_again_rebuilds_it_identically(
    classifier: tuple[Path, Path], shared_data: Path, tmp_path: Path
) -> None:
    """Killed while `cache/teacher-seed0.tmp/` is being filled: the cache folder itself
    never appears half-written, and `kdistill cache` again discards the partial folder
    and writes a logits.npy byte-identical to the uninterrupted one."""
    recipe, reference = classifier
    run = _fresh_run(reference, tmp_path / "run")
    cache, partial = run / DENSE_CACHE, run / "cache" / "teacher-seed0.tmp"
    argv = ("cache", recipe, "--output-dir", run, "--data-dir", shared_data)

    _sigkill_when(_kdistill(*argv), partial.is_dir)
    assert partial.is_dir() and not cache.exists()

    again = _kdistill(*argv)
    _, err = again.communicate(timeout=120)
    assert again.returncode == 0, err.decode()
    assert "Traceback" not in err.decode()
    assert not partial.exists()
    expected = reference / DENSE_CACHE
    assert (cache / "logits.npy").read_bytes() == (expected / "logits.npy").read_bytes()
    manifests = [json.loads((c / "manifest.json").read_text()) for c in (cache, expected)]
    for manifest in manifests:
        del manifest["seconds"]
    assert manifests[0] == manifests[1]  # teacher, data, shape, dtype and the sha256


# ------------------------------------------------------------------ full disk: checkpoints


def _fails_after(real: Callable[..., Any], *, path_arg: int, after: int) -> Callable[..., Any]:
    """`real` (a writer whose argument `path_arg` is the file), except that from call
    number `after` + 1 on a checkpoint file it writes half the file and raises ENOSPC."""
    calls = {"checkpoint": 0}

    def write(*args: Any, **kwargs: Any) -> Any:
        path = Path(args[path_arg])
        if not path.parent.name.endswith(".tmp"):
            return real(*args, **kwargs)
        calls["checkpoint"] += 1
        if calls["checkpoint"] <= after:
            return real(*args, **kwargs)
        real(*args, **kwargs)
        with open(path, "r+b") as f:
            f.truncate(path.stat().st_size // 2)
        raise _disk_full()

    return write


@pytest.mark.parametrize("failing", ["model.safetensors", "state.pt"])
def test_full_disk_while_writing_a_checkpoint_keeps_the_previous_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failing: str
) -> None:
    folder = tmp_path / "checkpoints"
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    save_training_state(folder, step=10, model=model, state={"step": 10})
    before = {p.name: file_sha256(p) for p in (folder / "step-000000010").iterdir()}
    if failing == "model.safetensors":
        monkeypatch.setattr(
            checkpoint, "save_file", _fails_after(checkpoint.save_file, path_arg=1, after=0)
        )
    else:
        monkeypatch.setattr(torch, "save", _fails_after(torch.save, path_arg=1, after=0))
    with torch.no_grad():
        model.weight.add_(1.0)
    with pytest.raises(CheckpointError) as info:
        save_training_state(folder, step=20, model=model, state={"step": 20})
    message = " ".join(str(info.value).split())
    for needle in (
        f"cannot write checkpoint step-000000020 in {folder}",
        "the disk is full ([Errno 28] No space left on device)",
        "step-000000020.tmp was removed",
        "Free space on that disk",
        "--resume",
    ):
        assert needle in message, message
    assert isinstance(info.value.__cause__, OSError)
    assert sorted(p.name for p in folder.iterdir()) == ["step-000000010"]
    assert {p.name: file_sha256(p) for p in (folder / "step-000000010").iterdir()} == before
    restored = restore_training_state(folder, torch.nn.Linear(4, 3))
    assert restored is not None and restored.path.name == "step-000000010"
    assert restored.state == {"step": 10} and restored.skipped == ()


def test_full_disk_mid_training_is_one_error_then_resume_finishes(
    tiny: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`kdistill run` whose third checkpoint hits a full disk: exit status 2, one message
    naming the checkpoint folder, the error and `--resume`; no `.tmp` left; the two
    checkpoints before it restore intact; and once there is room, `--resume` finishes."""
    tiny["stages"] = ["baseline"]
    tiny["train"]["checkpoint_every"] = 10
    recipe = write_recipe(tmp_path / "recipe.yaml", tiny)
    run = tmp_path / "run"
    checkpoints = run / "baseline" / "seed0" / "checkpoints"
    with pytest.MonkeyPatch.context() as full_disk:
        full_disk.setattr(
            checkpoint, "save_file", _fails_after(checkpoint.save_file, path_arg=1, after=2)
        )
        code, err = _cli(capsys, "run", recipe, "--output-dir", run, "--quiet")
    _assert_one_clear_error(
        code,
        err,
        f"cannot write checkpoint step-000000030 in {checkpoints}",
        "the disk is full ([Errno 28] No space left on device)",
        "the checkpoints written before it are kept",
        "then run again with --resume",
    )
    assert _tmp_leftovers(run) == []
    assert [p.name for p in training_states(checkpoints)] == ["step-000000010", "step-000000020"]
    student = build_model(
        ModelSpec(name="mlp", args={"hidden": [16]}), input_shape=(1, 28, 28), num_classes=10
    )
    restored = restore_training_state(checkpoints, student)
    assert restored is not None and restored.path.name == "step-000000020"
    assert restored.skipped == ()
    status = json.loads((run / "run.json").read_text())
    assert status["status"] == "failed" and "CheckpointError" in status["error"]

    # space was freed
    code, err = _cli(capsys, "run", recipe, "--output-dir", run, "--quiet", "--resume")
    assert code == 0, err
    assert "resuming from step-000000020" in err
    assert (run / "baseline" / "seed0" / "eval.json").is_file()


def test_full_disk_on_any_other_write_is_one_error_even_when_the_status_cannot_be_written(
    tiny: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full disk where kdistill has no message of its own (a stage's final weights),
    and the failed status that follows cannot be written either: exit status 2, one
    paragraph naming the file, the error and what to do; no traceback."""
    import kdistill.stages as stages

    tiny["stages"] = ["baseline"]
    recipe = write_recipe(tmp_path / "recipe.yaml", tiny)
    run = tmp_path / "run"
    weights = run / "baseline" / "seed0" / "model.safetensors"

    def full(model: object, path: Path, *args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    real_status = stages.write_status

    def status(run_dir: Path, status: str, error: str | None = None) -> None:
        if status == "failed":
            raise _disk_full()
        real_status(run_dir, status, error)

    monkeypatch.setattr(stages, "save_weights", full)
    monkeypatch.setattr(stages, "write_status", status)
    code, err = _cli(capsys, "run", recipe, "--output-dir", run, "--quiet")
    _assert_one_clear_error(
        code,
        err,
        f"the disk is full ([Errno 28] No space left on device) writing {weights}",
        "Files written before it are kept",
        "--resume",
    )


# ------------------------------------------------------------------ full disk: caches


def test_full_disk_while_rebuilding_the_dense_cache_keeps_the_previous_cache(
    tiny: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`kdistill cache --overwrite` whose numpy.save hits a full disk: exit status 2 with
    one message; the partial `.tmp` folder is removed and the cache already there is
    untouched and still verifies."""
    tiny["teacher"]["cache"] = True
    recipe_path = write_recipe(tmp_path / "recipe.yaml", tiny)
    recipe = kdistill.load_recipe(str(recipe_path))
    bundle = build_data(recipe.data).for_distill()
    torch.manual_seed(0)
    teacher = make_model(bundle, recipe.teacher.model, where="teacher.model")
    run = tmp_path / "run"
    weights = run / "teacher" / "seed0" / "model.safetensors"
    weights.parent.mkdir(parents=True)
    save_weights(teacher, weights)
    assert main(["cache", str(recipe_path), "--output-dir", str(run)]) == 0
    cache = run / DENSE_CACHE
    before = {p.name: p.read_bytes() for p in cache.iterdir()}

    real_save = np.save

    def save_half_then_disk_full(file: Any, array: np.ndarray, *args: Any, **kwargs: Any) -> None:
        real_save(file, array, *args, **kwargs)
        Path(file).write_bytes(Path(file).read_bytes()[:100])
        raise _disk_full()

    monkeypatch.setattr(dense.np, "save", save_half_then_disk_full)
    code, err = _cli(capsys, "cache", recipe_path, "--output-dir", run, "--overwrite")
    _assert_one_clear_error(
        code,
        err,
        f"cannot write the teacher cache {cache}",
        "the disk is full ([Errno 28] No space left on device)",
        "teacher-seed0.tmp was removed",
        f"the cache already in {cache} is kept",
        "Free space on that disk",
        "then run `kdistill cache` (or `kdistill run --resume`) again to rebuild it",
    )
    assert _tmp_leftovers(run) == []
    assert {p.name: p.read_bytes() for p in cache.iterdir()} == before
    logits = open_cache(cache, teacher_sha256=file_sha256(weights), bundle=bundle, verify=True)
    assert logits.shape == (len(bundle.train), 10)


class _FullDiskFile:
    """A file open for writing on a disk that fills up: it takes the first `room` bytes
    given to `write`, then every write fails with ENOSPC."""

    def __init__(self, file: IO[bytes], room: int) -> None:
        self._file, self._room = file, room

    def write(self, data: bytes) -> int:
        taken = self._file.write(data[: max(self._room, 0)])
        self._room -= taken
        if taken < len(data):
            raise _disk_full()
        return taken

    def __getattr__(self, name: str) -> Any:
        return getattr(self._file, name)

    def __enter__(self) -> _FullDiskFile:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._file.close()


def _shard_writes_fill_the_disk_after(shards: int) -> Callable[..., Any]:
    """`open` for kdistill.cache.topk: shard files after the first `shards` fill the disk
    part-way through."""
    opened: list[str] = []

    def open_(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        handle = open(file, mode, *args, **kwargs)  # noqa: SIM115 (the caller closes it)
        if "w" in mode and str(file).endswith(".bin.tmp"):
            opened.append(str(file))
            if len(opened) > shards:
                return _FullDiskFile(handle, room=1000)
        return handle

    return open_


@pytest.mark.slow
def test_full_disk_mid_topk_cache_keeps_the_written_shards_then_cache_again_finishes(
    lm: tuple[Path, Path], shared_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The sixth shard hits a full disk: exit status 2 with one message; its partial file
    is removed, the five shards before it are recorded and verify; once there is room,
    `kdistill cache` continues from them to the uninterrupted cache."""
    recipe, reference = lm
    run = _fresh_run(reference, tmp_path / "run")
    cache = run / TOPK_CACHE
    argv = ("cache", recipe, "--output-dir", run, "--data-dir", shared_data)
    with pytest.MonkeyPatch.context() as full_disk:
        full_disk.setattr(topk, "open", _shard_writes_fill_the_disk_after(5), raising=False)
        code, err = _cli(capsys, *argv)
    _assert_one_clear_error(
        code,
        err,
        f"cannot write shard shard-0000000020.bin of the top-k teacher cache {cache}",
        "the disk is full ([Errno 28] No space left on device)",
        "The 5 complete shard(s) before it (20 of",
        "run `kdistill cache` (or `kdistill run --resume`) again: it continues after the last "
        "complete shard",
    )
    assert _tmp_leftovers(cache) == []
    expected = json.loads((reference / TOPK_CACHE / MANIFEST).read_text())["shards"]
    recorded = json.loads((cache / MANIFEST).read_text())["shards"]
    assert recorded == expected[:5]
    assert sorted(p.name for p in cache.glob("shard-*")) == [s["file"] for s in recorded]
    assert all(file_sha256(cache / s["file"]) == s["sha256"] for s in recorded)
    kept = {s["file"]: (cache / s["file"]).stat().st_ino for s in recorded}

    code, err = _cli(capsys, *argv)  # space was freed
    assert code == 0, err
    done = json.loads((cache / MANIFEST).read_text())
    assert done["complete"] and done["shards"] == expected
    assert {name: (cache / name).stat().st_ino for name in kept} == kept


def test_full_disk_while_recording_a_shard_keeps_the_old_manifest(tmp_path: Path) -> None:
    """The manifest rewrite after the second shard fails: that shard stays unrecorded
    (the manifest on disk is the one before), no manifest.json.tmp is left, the writer
    stops, and a resumed writer redoes the shard to the uninterrupted bytes."""
    spec = TopKCacheSpec(
        teacher="a" * 64, tokenizer="b" * 64, dataset="c" * 64, k=4, temperature=1.0,
        seq_len=6, num_sequences=12, vocab_size=300,
    )  # fmt: skip
    logits = 3 * torch.randn(12, 6, 300, generator=torch.Generator().manual_seed(0))
    ids, logprobs = teacher_topk(logits, k=4, temperature=1.0)
    reference = tmp_path / "reference"
    with TopKCacheWriter(reference, spec, shard_size_sequences=4) as writer:
        writer.add(0, ids, logprobs)

    real = topk.atomic_write_json
    saves: list[int] = []

    def manifest_write(path: Path, data: Any) -> None:
        saves.append(len(data["shards"]))
        if len(data["shards"]) == 2:  # the manifest that would record the second shard
            Path(str(path) + ".tmp").write_text("{")
            raise _disk_full()
        real(path, data)

    folder = tmp_path / "cache"
    with pytest.MonkeyPatch.context() as full_disk:
        full_disk.setattr(topk, "atomic_write_json", manifest_write)
        writer = TopKCacheWriter(folder, spec, shard_size_sequences=4)
        with pytest.raises(CacheError) as info, writer:
            writer.add(0, ids, logprobs)
    message = " ".join(str(info.value).split())
    assert f"cannot write manifest.json of the top-k teacher cache {folder}" in message
    assert "the disk is full" in message and "The 1 complete shard(s) before it (4 of 12" in message
    assert saves == [0, 1, 2]  # nothing more was written once the disk was full
    assert not (folder / (MANIFEST + ".tmp")).exists()
    assert len(json.loads((folder / MANIFEST).read_text())["shards"]) == 1

    with TopKCacheWriter(folder, spec, shard_size_sequences=4, resume=True) as writer:
        assert writer.next_sequence == 4
        writer.add(0, ids, logprobs)
    for name in ("shard-0000000000.bin", "shard-0000000004.bin", "shard-0000000008.bin"):
        assert (folder / name).read_bytes() == (reference / name).read_bytes()
    assert torch.equal(open_topk_cache(folder, expect=spec).get(range(12))[0], ids.long())
