"""Datasets: `build(cfg)` reads a source, carves validation from train, and returns a DataBundle.

Each source in `SOURCES` returns the full train and test splits and the class names;
`build` does the rest the same way for all of them: check labels, split off
validation with a seeded permutation, apply the limits, compute the normalisation
statistics on the train part, and fingerprint the result.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import torch

from kdistill.data import arrays, image_folder, mnist
from kdistill.data.bundle import DataBundle, LoadedSource, Split
from kdistill.data.paths import resolve_data_root
from kdistill.data.text_task import TEXT_SOURCES, TextData, load_text_data
from kdistill.errors import DataError
from kdistill.recipe import DataConfig

__all__ = ["SOURCES", "DataBundle", "Split", "TextData", "build", "resolve_data_root"]

SOURCES: dict[str, Callable[[DataConfig, Path], LoadedSource]] = {
    "mnist": mnist.load,
    "image_folder": image_folder.load,
    "npz": arrays.load_npz,
    "csv": arrays.load_csv,
}


def build(cfg: DataConfig, data_dir: str | Path | None = None) -> DataBundle | TextData:
    """Load `cfg.source` from the data folder (see `resolve_data_root`) into a DataBundle
    (images, features) or a TextData (texts)."""
    _, searched = resolve_data_root(data_dir)
    if cfg.source in TEXT_SOURCES:
        return load_text_data(cfg, searched[0])
    loaded = SOURCES[cfg.source](cfg, searched[0])  # may not exist yet: MNIST downloads into it
    num_classes = len(loaded.class_names)
    for split, origin in ((loaded.train, loaded.train_origin), (loaded.test, loaded.test_origin)):
        _check_labels(split, num_classes, origin)
        _check_finite(split, origin)

    train, val = _split_validation(loaded.train, cfg.val_fraction, cfg.split_seed)
    if cfg.limit_train is not None:
        train = train.subset(slice(0, cfg.limit_train))
    if cfg.limit_val is not None:
        val = val.subset(slice(0, cfg.limit_val))
    test = loaded.test
    if cfg.limit_test is not None:
        test = test.subset(slice(0, cfg.limit_test))
    if len(train) == 0:
        raise DataError(
            f"{loaded.train_origin}: no training samples are left after taking "
            f"{len(val)} of {len(loaded.train)} for validation (data.val_fraction = "
            f"{cfg.val_fraction}); lower data.val_fraction or add training data"
        )

    mean, std = _mean_std(train.x)
    settings = {
        "source": cfg.source,
        "val_fraction": cfg.val_fraction,
        "split_seed": cfg.split_seed,
        "limit_train": cfg.limit_train,
        "limit_test": cfg.limit_test,
        # only when set, so that the fingerprints of runs that never set it stay as they were
        **({"limit_val": cfg.limit_val} if cfg.limit_val is not None else {}),
    }
    fingerprint = hashlib.sha256(
        json.dumps({"content": loaded.content_digest, **settings}, sort_keys=True).encode()
    ).hexdigest()
    return DataBundle(
        train=train,
        val=val,
        test=test,
        num_classes=num_classes,
        class_names=loaded.class_names,
        input_shape=tuple(train.x.shape[1:]),
        mean=mean,
        std=std,
        fingerprint=fingerprint,
        source_files=loaded.source_files,
    )


def _split_validation(full: Split, val_fraction: float, seed: int) -> tuple[Split, Split]:
    """(train, val) from a seeded permutation; train keeps the permuted order, so a
    limit takes a random subset of it, the same for the same seed."""
    order = torch.randperm(len(full), generator=torch.Generator().manual_seed(seed))
    n_val = round(len(full) * val_fraction)
    return full.subset(order[n_val:]), full.subset(order[:n_val])


def _check_labels(split: Split, num_classes: int, origin: Path) -> None:
    bad = (split.y < 0) | (split.y >= num_classes)
    if bad.any():
        first = int(split.y[bad][0])
        raise DataError(
            f"{origin}: label {first} is outside [0, {num_classes}) for {num_classes} classes "
            f"({int(bad.sum())} of {len(split)} labels are); labels must be class indices "
            f"0 .. {num_classes - 1}"
        )


def _check_finite(split: Split, origin: Path) -> None:
    if split.x.is_floating_point() and not torch.isfinite(split.x).all():
        row, column = (int(i) for i in (~torch.isfinite(split.x)).nonzero()[0])
        raise DataError(
            f"{origin}: sample {row}, feature {column} is {float(split.x[row, column])}; "
            "features must be finite numbers (fill in missing values first)"
        )


def _mean_std(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Population mean and std per channel of (N, C, H, W) uint8 in [0, 1] units, or per
    feature of (N, F). A constant channel or feature gets std 1."""
    if x.dim() == 4:
        # exact and cheap for uint8: a 256-bin histogram per channel
        values = torch.arange(256, dtype=torch.float64) / 255
        counts = torch.stack(
            [torch.bincount(x[:, c].reshape(-1), minlength=256) for c in range(x.shape[1])]
        ).to(torch.float64)  # (C, 256)
        total = counts.sum(1)
        mean = (counts * values).sum(1) / total
        var = (counts * (values - mean[:, None]).square()).sum(1) / total
    else:
        features = x.to(torch.float64)
        mean = features.mean(0)
        var = (features - mean).square().mean(0)
    std = var.sqrt()
    std = torch.where(std > 1e-6, std, torch.ones_like(std))
    return mean.float(), std.float()
