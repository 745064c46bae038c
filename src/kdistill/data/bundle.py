"""The tensors a run trains and evaluates on: `Split`, `DataBundle`, and what a loader returns."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch


@dataclass
class Split:
    """One part of a dataset, held in memory in its raw dtype.

    x: (N, C, H, W) uint8 for images, (N, F) float32 for tabular features.
    y: (N,) int64 class indices.
    """

    x: torch.Tensor
    y: torch.Tensor

    def __post_init__(self) -> None:
        assert self.x.shape[0] == self.y.shape[0], (tuple(self.x.shape), tuple(self.y.shape))

    def __len__(self) -> int:
        return self.y.shape[0]

    def subset(self, index: torch.Tensor | slice) -> Split:
        return Split(self.x[index], self.y[index])


@dataclass
class DataBundle:
    """Train, validation and test splits plus what a model and a cache need to know.

    `mean` and `std` come from the train part only (after the validation split):
    per channel in [0, 1] pixel units for images, per feature for tabular data. A
    constant channel or feature gets std 1 (as scikit-learn's StandardScaler does),
    so it maps to 0 instead of blowing up.

    `fingerprint` is a sha256 over the content of the source files and the split
    settings (val_fraction, split_seed, limits); it changes when any of them does,
    and not when the data folder moves.
    """

    train: Split
    val: Split
    test: Split
    num_classes: int
    class_names: list[str]
    input_shape: tuple[int, ...]  # one sample: (C, H, W) or (F,)
    mean: torch.Tensor  # (C,) or (F,) float32
    std: torch.Tensor  # (C,) or (F,) float32, never 0
    fingerprint: str
    source_files: list[Path]  # files, or folders for image_folder, that the fingerprint covers

    is_text = False

    @property
    def is_image(self) -> bool:
        return len(self.input_shape) == 3

    def for_distill(self) -> DataBundle:
        return self

    def eval_feed(self, model: object, split: str) -> tuple[torch.Tensor, Any, None]:
        """(inputs, to_input, order) of a split for `evaluate.predict`."""
        return getattr(self, split).x, self.to_input, None

    def example_input(self, model: object, batch_size: int = 256) -> None:
        return None  # cost() draws random inputs of input_shape

    def to_input(self, x: torch.Tensor) -> torch.Tensor:
        """A raw batch -> float32 normalised model input, on the device of `x`.

        Images (B, C, H, W) uint8: (x / 255 - mean) / std per channel.
        Features (B, F): (x - mean) / std per feature.
        """
        mean, std = self.mean.to(x.device), self.std.to(x.device)
        if self.is_image:
            if x.dtype != torch.uint8:
                raise TypeError(f"to_input expects raw uint8 images; got {x.dtype}")
            return (x.float() / 255 - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)
        return (x.float() - mean) / std


@dataclass
class LoadedSource:
    """What a loader in `SOURCES` returns; `build` turns it into a `DataBundle`."""

    train: Split  # the full training set; `build` carves validation from it
    test: Split
    class_names: list[str]
    source_files: list[Path]
    content_digest: str  # sha256 over the files' content and any reading option
    train_origin: Path  # where the train labels come from, named in error messages
    test_origin: Path
