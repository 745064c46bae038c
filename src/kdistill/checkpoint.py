"""Checkpoints: atomic writes, safetensors weights, exact resume.

A training checkpoint is a folder `step-<N>/` holding `model.safetensors` (weights)
and `state.pt` (optimizer, LR schedule, counters and random-number-generator
states; loaded with `weights_only=True`). It is written into `step-<N>.tmp/` and
renamed, so a folder without `.tmp` is always complete. The newest two are kept.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from kdistill.errors import CheckpointError

KEEP = 2


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
    """Write `folder/step-<step>/` atomically and prune older ones."""
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"step-{step:09d}"
    tmp = folder / f"step-{step:09d}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_weights(model, tmp / "model.safetensors")
    torch.save(state, tmp / "state.pt")
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in sorted(p for p in folder.glob("step-*") if not p.name.endswith(".tmp"))[:-KEEP]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_training_state(folder: Path) -> Path | None:
    complete = sorted(
        p for p in folder.glob("step-*") if p.is_dir() and not p.name.endswith(".tmp")
    )
    return complete[-1] if complete else None


def load_training_state(path: Path, model: nn.Module) -> dict[str, Any]:
    load_weights(model, path / "model.safetensors")
    try:
        return torch.load(path / "state.pt", weights_only=True)
    except Exception as exc:  # any unpickling failure means the file is unusable
        raise CheckpointError(
            f"training state {path / 'state.pt'} cannot be loaded ({exc}); delete {path} "
            "to resume from the checkpoint before it"
        ) from None
