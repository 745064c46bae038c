"""Images in class folders: `<path>/train/<class>/*.png` and `<path>/test/<class>/*.png`.

Classes are the sorted folder names (the torchvision ImageFolder convention). Within a
split, samples are ordered by file name, then class; for CIFAR-10, whose files are named
by their original index, that is the original order, and `limit_test` takes a mix of
classes instead of the first class only. Images are decoded with Pillow in a thread pool
(Pillow releases the GIL while it decodes) into one preallocated uint8 array.
"""

from __future__ import annotations

import hashlib
import io
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from kdistill.data.bundle import LoadedSource, Split
from kdistill.data.paths import digest_files, resolve_user_path
from kdistill.errors import DataError
from kdistill.recipe import DataConfig

EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp")
CHANNELS = {"L": 1, "RGB": 3}
LAYOUT = "train/<class>/*.png and test/<class>/*.png (also .jpg, .jpeg, .bmp)"
CHUNK = 512  # images per task: large enough that the pool's overhead does not show
MAX_WORKERS = 8  # the Python part of decoding holds the GIL; more threads only contend for it


def load(cfg: DataConfig, data_root: Path) -> LoadedSource:
    folder = resolve_user_path(cfg.path, data_root, source="image_folder", layout=LAYOUT)
    train_classes = _class_folders(folder / "train")
    test_classes = _class_folders(folder / "test")
    if train_classes != test_classes:
        only_train = sorted(set(train_classes) - set(test_classes))
        only_test = sorted(set(test_classes) - set(train_classes))
        raise DataError(
            f"{folder}: train/ and test/ must have the same class folders; only in train/: "
            f"{only_train or 'none'}; only in test/: {only_test or 'none'}"
        )
    train, train_digests = _read_split(folder / "train", train_classes)
    test, test_digests = _read_split(folder / "test", test_classes)
    if train.x.shape[1:] != test.x.shape[1:]:
        raise DataError(
            f"{folder}: train images have shape (C, H, W) = {tuple(train.x.shape[1:])} but test "
            f"images {tuple(test.x.shape[1:])}; resize or convert them to one size and mode"
        )
    return LoadedSource(
        train=train,
        test=test,
        class_names=train_classes,
        source_files=[folder / "train", folder / "test"],
        content_digest=digest_files(train_digests + test_digests),
        train_origin=folder / "train",
        test_origin=folder / "test",
    )


def _class_folders(split_dir: Path) -> list[str]:
    if not split_dir.is_dir():
        raise DataError(f"{split_dir} is not a folder; an image folder needs {LAYOUT}")
    classes = sorted(e.name for e in os.scandir(split_dir) if e.is_dir() and e.name[0] != ".")
    if not classes:
        raise DataError(f"{split_dir} has no class folders; an image folder needs {LAYOUT}")
    return classes


def _read_split(split_dir: Path, classes: list[str]) -> tuple[Split, list[tuple[str, str]]]:
    """Decode every image of one split; also return (relative name, sha256) per file."""
    entries: list[tuple[str, int]] = []  # (file name, class index)
    for label, name in enumerate(classes):
        files = [
            e.name
            for e in os.scandir(split_dir / name)
            if e.name.lower().endswith(EXTENSIONS) and e.is_file()
        ]
        if not files:
            raise DataError(
                f"{split_dir / name} has no images ({', '.join(EXTENSIONS)}); remove the "
                "empty class folder or add its images"
            )
        entries.extend((f, label) for f in files)
    entries.sort()
    paths = [split_dir / classes[label] / f for f, label in entries]
    x, digests = _decode(paths)
    y = torch.tensor([label for _, label in entries], dtype=torch.int64)
    names = [f"{split_dir.name}/{classes[label]}/{f}" for f, label in entries]
    return Split(torch.from_numpy(x), y), list(zip(names, digests))


def _decode(paths: list[Path]) -> tuple[np.ndarray, list[str]]:
    """(N, C, H, W) uint8 and the sha256 of each file; all images must share size and mode."""
    with Image.open(paths[0]) as first:
        mode, (width, height) = first.mode, first.size
    if mode not in CHANNELS:
        raise DataError(
            f"{paths[0]}: image mode {mode!r} is not supported; convert the images to RGB "
            "(colour) or L (grayscale), e.g. Image.open(p).convert('RGB').save(p)"
        )
    out = np.empty((len(paths), CHANNELS[mode], height, width), dtype=np.uint8)
    digests = [""] * len(paths)

    def decode_chunk(start: int) -> tuple[int, str] | None:
        """Fill out[start : start + CHUNK]; the first problem as (index, message), else None."""
        for i in range(start, min(start + CHUNK, len(paths))):
            data = paths[i].read_bytes()
            digests[i] = hashlib.sha256(data).hexdigest()
            try:
                with Image.open(io.BytesIO(data)) as image:
                    if image.mode != mode or image.size != (width, height):
                        return i, (
                            f"is {image.mode} {image.size[0]}x{image.size[1]}, but "
                            f"{paths[0]} is {mode} {width}x{height}; all images must share "
                            "size and mode, so resize or convert them first"
                        )
                    # faster than np.asarray(image), which copies once more
                    pixels = np.frombuffer(image.tobytes(), dtype=np.uint8)
            except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
                return i, f"cannot be decoded as an image ({exc}); replace or remove it"
            out[i] = pixels.reshape(height, width, -1).transpose(2, 0, 1)  # (H, W, C) -> (C, H, W)
        return None

    with ThreadPoolExecutor(_decode_workers()) as pool:
        problems = [p for p in pool.map(decode_chunk, range(0, len(paths), CHUNK)) if p]
    if problems:
        index, message = min(problems)
        raise DataError(f"{paths[index]} {message}")
    return out, digests


def _decode_workers() -> int:
    """One thread per usable CPU: more threads than cores fight over the GIL and run slower."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, min(MAX_WORKERS, usable or 1))
