"""Dense teacher-output cache of a classifier: the teacher runs once over the training
split and all its logits are stored.

Layout of a cache folder:
    logits.npy      (N, C) float16 or float32, read memory-mapped
    manifest.json   teacher sha256, dataset fingerprint, split, shape, dtype, sha256 of logits.npy

It is written into `<folder>.tmp/` and renamed, so a cache folder is complete or
absent; a write that fails (a full disk) removes `<folder>.tmp/` and is one CacheError,
leaving a cache the folder already held untouched. `open_cache` refuses a cache whose
teacher, data or checksum differs from what the run expects, and says how to rebuild it.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from kdistill.checkpoint import atomic_write_json, file_sha256
from kdistill.data import DataBundle, TextData
from kdistill.errors import CacheError, write_failure
from kdistill.evaluate import predict

FORMAT_VERSION = 1


def write_cache(
    folder: Path,
    teacher: nn.Module,
    bundle: DataBundle | TextData,
    *,
    teacher_sha256: str,
    dtype: str = "float32",
    batch_size: int = 1000,
    device: torch.device | str = "cpu",
) -> dict[str, Any]:
    """Run the teacher over the training split and store its logits; returns the manifest."""
    tmp = folder.with_name(folder.name + ".tmp")
    try:
        if tmp.exists():  # left by a killed job
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    except OSError as exc:
        raise _write_error(folder, tmp, exc) from exc
    start = time.perf_counter()
    xs, to_input, order = bundle.eval_feed(teacher, "train")
    logits = predict(
        teacher, xs, to_input=to_input, batch_size=batch_size, device=device, order=order
    )  # (N, C) float32
    array = logits.numpy().astype(dtype)
    try:
        np.save(tmp / "logits.npy", array)
        manifest = {
            "format": FORMAT_VERSION,
            "teacher_sha256": teacher_sha256,
            "dataset_fingerprint": bundle.fingerprint,
            "split": "train",
            "shape": list(array.shape),
            "dtype": dtype,
            "logits_sha256": file_sha256(tmp / "logits.npy"),
            "seconds": round(time.perf_counter() - start, 3),
        }
        atomic_write_json(tmp / "manifest.json", manifest)
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    except OSError as exc:
        raise _write_error(folder, tmp, exc) from exc
    return manifest


def _write_error(folder: Path, tmp: Path, exc: OSError) -> CacheError:
    """Remove the partial `tmp` folder and say what failed; a complete cache in `folder`
    (about to be replaced) is untouched."""
    shutil.rmtree(tmp, ignore_errors=True)
    happened, first = write_failure(exc)
    kept = f"the cache already in {folder} is kept" if folder.exists() else "no cache was written"
    return CacheError(
        f"cannot write the teacher cache {folder}: {happened}. The partial {tmp.name} was "
        f"removed; {kept}. {first}, then run `kdistill cache` (or `kdistill run --resume`) "
        "again to rebuild it"
    )


def open_cache(
    folder: Path, *, teacher_sha256: str, bundle: DataBundle | TextData, verify: bool = True
) -> torch.Tensor:
    """The cached logits (N, C) as a memory-mapped tensor, after checking they fit this run."""
    manifest_path = folder / "manifest.json"
    rebuild = f"delete {folder} (or run `kdistill cache RECIPE --overwrite`) to rebuild it"
    if not manifest_path.is_file() or not (folder / "logits.npy").is_file():
        inner = sorted(p.parent.name for p in folder.glob("*/manifest.json"))
        if inner:  # a run's cache/ folder, one level above the caches themselves
            raise CacheError(
                f"teacher cache {folder} holds no cache itself but caches in the subfolders "
                f"{', '.join(inner)}; point teacher.cache_dir at one of them, for example "
                f"{folder / inner[0]}"
            )
        raise CacheError(f"teacher cache {folder} is incomplete (no manifest or logits); {rebuild}")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as exc:
        raise CacheError(
            f"teacher cache manifest {manifest_path} is corrupt ({exc}); {rebuild}"
        ) from None
    problems = []
    if manifest.get("teacher_sha256") != teacher_sha256:
        problems.append(
            f"it was made by another teacher (sha256 {str(manifest.get('teacher_sha256'))[:12]}…, "
            f"this run's teacher is {teacher_sha256[:12]}…)"
        )
    if manifest.get("dataset_fingerprint") != bundle.fingerprint:
        problems.append(
            "it was made on other data or another train/validation split (dataset fingerprint "
            f"{str(manifest.get('dataset_fingerprint'))[:12]}… vs {bundle.fingerprint[:12]}…)"
        )
    expected_shape = [len(bundle.train), bundle.num_classes]
    if manifest.get("shape") != expected_shape:
        problems.append(f"its shape is {manifest.get('shape')}, expected {expected_shape}")
    if problems:
        raise CacheError(f"teacher cache {folder} is stale: {'; '.join(problems)}. {rebuild}")
    if verify and file_sha256(folder / "logits.npy") != manifest.get("logits_sha256"):
        raise CacheError(
            f"teacher cache {folder / 'logits.npy'} does not match its checksum: the file "
            f"was changed or is truncated; {rebuild}"
        )
    # Copy-on-write mapping: pages are read on demand and the file is never modified.
    array = np.load(folder / "logits.npy", mmap_mode="c")
    return torch.from_numpy(array)
