"""Checkpoints: atomic writes, safetensors weights, exact resume.

A training checkpoint is a folder `step-<N>/` holding `model.safetensors` (weights)
and `state.pt` (optimizer, LR schedule, counters and random-number-generator
states; loaded with `weights_only=True`), and `checksums.json` (the sha256 of both,
taken when they were written). It is written into `step-<N>.tmp/`, flushed to disk
and renamed, so a folder named `step-<N>` was complete when written; the checksums
tell whether it still is. A write that fails (a full disk) removes `step-<N>.tmp/`
and is one CheckpointError; the checkpoints before it are untouched. The newest two
are kept. Resuming takes the newest intact checkpoint and moves a damaged one aside
as `step-<N>.damaged/`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from kdistill.errors import CheckpointError, write_failure

KEEP = 2
CHECKSUMS = "checksums.json"
_STATE_FILES = ("model.safetensors", "state.pt")
_STEP_NAME = re.compile(r"step-\d+")


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def save_weights(model: nn.Module, path: Path, metadata: dict[str, str] | None = None) -> None:
    """Write the model's weights to a safetensors file, atomically."""
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    tmp = path.with_name(path.name + ".tmp")
    save_file(state, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def load_weights(model: nn.Module, path: Path) -> None:
    """Load safetensors weights; a mismatch names the keys and shapes that differ."""
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(
            f"checkpoint {path} cannot be read as safetensors ({exc}); it may be truncated "
            "or not a weights file"
        ) from None
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in sorted(set(own) & set(state))
        if state[k].shape != own[k].shape
    ]
    if missing or unexpected or shapes:
        details = []
        if missing:
            details.append(f"missing from checkpoint: {', '.join(missing[:5])}")
        if unexpected:
            details.append(f"not in the model: {', '.join(unexpected[:5])}")
        if shapes:
            details.append("shape mismatch: " + "; ".join(shapes[:5]))
        raise CheckpointError(
            f"checkpoint {path} does not match the model ({' | '.join(details)}); "
            "check that the recipe's model name and args are the ones it was trained with"
        )
    model.load_state_dict(state)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def save_training_state(
    folder: Path, *, step: int, model: nn.Module, state: dict[str, Any]
) -> Path:
    """Write `folder/step-<step>/` atomically, with its checksums, and prune older ones."""
    final = folder / f"step-{step:09d}"
    tmp = folder / f"step-{step:09d}.tmp"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        save_weights(model, tmp / "model.safetensors")
        torch.save(state, tmp / "state.pt")
        sums = {name: file_sha256(tmp / name) for name in _STATE_FILES}
        (tmp / CHECKSUMS).write_text(json.dumps(sums, indent=2) + "\n", encoding="utf-8")
        for name in (*_STATE_FILES, CHECKSUMS):
            fsync(tmp / name)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except OSError as exc:
        # a half-written folder only takes space; the ones before it stay usable
        shutil.rmtree(tmp, ignore_errors=True)
        happened, first = write_failure(exc)
        kept = (
            "the checkpoints written before it are kept"
            if training_states(folder)
            else "there is no earlier checkpoint"
        )
        raise CheckpointError(
            f"cannot write checkpoint {final.name} in {folder}: {happened}. The partial "
            f"{tmp.name} was removed; {kept}. {first}, then run again with --resume to "
            "continue from the newest checkpoint"
        ) from exc
    fsync(folder)
    for old in training_states(folder)[:-KEEP]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def fsync(path: Path) -> None:
    """Flush a file or folder to disk, so a rename never outlives its contents; a no-op
    where it cannot be opened or flushed (folders on Windows, some file systems)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems cannot fsync a folder
        pass
    finally:
        os.close(fd)


def training_states(folder: Path) -> list[Path]:
    """The checkpoint folders `step-<N>`, oldest first (not `.tmp` or `.damaged` ones)."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_dir() and _STEP_NAME.fullmatch(p.name))


def latest_training_state(folder: Path) -> Path | None:
    complete = training_states(folder)
    return complete[-1] if complete else None


def training_state_problem(path: Path) -> str | None:
    """What is wrong with a checkpoint folder's files, or None when they match the
    checksums taken when it was written. A folder from before checksums were written
    is judged by loading it."""
    sums_path = path / CHECKSUMS
    missing = [name for name in _STATE_FILES if not (path / name).is_file()]
    if missing:
        return f"{', '.join(missing)} missing"
    if not sums_path.is_file():
        return None
    try:
        sums = json.loads(sums_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return f"{CHECKSUMS} cannot be read"
    for name in _STATE_FILES:
        if file_sha256(path / name) != sums.get(name):
            return f"{name} does not match its checksum (truncated or changed after writing)"
    return None


@dataclass(frozen=True)
class Restored:
    """The checkpoint a resume loaded, and the newer ones it had to skip (moved aside)."""

    path: Path
    state: dict[str, Any]
    skipped: tuple[str, ...] = ()


def restore_training_state(folder: Path, model: nn.Module) -> Restored | None:
    """Load the newest intact checkpoint into `model`; None when there is none at all.

    A damaged newer checkpoint is renamed `step-<N>.damaged` (kept for inspection,
    never chosen again) and named in `skipped`. When every checkpoint is damaged the
    error says which and what to do."""
    skipped: list[str] = []
    for path in reversed(training_states(folder)):
        problem = training_state_problem(path)
        if problem is None:
            try:
                return Restored(path, load_training_state(path, model), tuple(skipped))
            except CheckpointError as exc:
                problem = str(exc)
        aside = path.with_name(path.name + ".damaged")
        if aside.exists():
            shutil.rmtree(aside)
        os.replace(path, aside)
        skipped.append(f"{path.name} ({problem}; moved to {aside.name})")
    if skipped:
        raise CheckpointError(
            f"no intact checkpoint in {folder} to resume from: {'; '.join(skipped)}. "
            f"Delete {folder.parent} to train this stage afresh; run again with --resume "
            "to keep the stages that finished"
        )
    return None


def load_training_state(path: Path, model: nn.Module) -> dict[str, Any]:
    load_weights(model, path / "model.safetensors")
    try:
        return torch.load(path / "state.pt", weights_only=True)
    except Exception as exc:  # any unpickling failure means the file is unusable
        raise CheckpointError(
            f"training state {path / 'state.pt'} cannot be loaded ({exc}); delete {path} "
            "to resume from the checkpoint before it"
        ) from None
