"""MNIST from the four original gzip idx files in `<data folder>/mnist/`.

Missing files are downloaded once from the PyTorch mirror and checked against
the published sha256. Every load checks the idx headers and the sha256 again
(about 11 MB, a few milliseconds), so a truncated or corrupt file is reported as
such instead of training on garbage.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import os
import tempfile
import urllib.request
import zlib
from pathlib import Path

import numpy as np
import torch

from kdistill.data.bundle import LoadedSource, Split
from kdistill.data.paths import DATA_ENV_VAR, digest_files
from kdistill.errors import DataError
from kdistill.recipe import DataConfig

MIRROR = "https://ossci-datasets.s3.amazonaws.com/mnist/"
DOWNLOAD_TIMEOUT_S = 10.0

# the original files: name -> (sha256, as torchvision and TFDS publish it; size in bytes)
FILES = {
    "train-images-idx3-ubyte.gz": (
        "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
        9_912_422,
    ),
    "train-labels-idx1-ubyte.gz": (
        "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
        28_881,
    ),
    "t10k-images-idx3-ubyte.gz": (
        "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
        1_648_877,
    ),
    "t10k-labels-idx1-ubyte.gz": (
        "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
        4_542,
    ),
}
IMAGE_MAGIC, LABEL_MAGIC = 2051, 2049
ROWS = COLS = 28
CLASS_NAMES = [str(d) for d in range(10)]


def load(cfg: DataConfig, data_root: Path) -> LoadedSource:
    folder = data_root / "mnist"
    missing = [name for name in FILES if not (folder / name).is_file()]
    if missing:
        _download_missing(folder, missing)
    contents = {name: (folder / name).read_bytes() for name in FILES}
    train = Split(
        _images(folder / "train-images-idx3-ubyte.gz", contents, 60000),
        _labels(folder / "train-labels-idx1-ubyte.gz", contents, 60000),
    )
    test = Split(
        _images(folder / "t10k-images-idx3-ubyte.gz", contents, 10000),
        _labels(folder / "t10k-labels-idx1-ubyte.gz", contents, 10000),
    )
    # after the header checks, which say more about a damaged file than a checksum does
    for name, (expected, _) in FILES.items():
        found = hashlib.sha256(contents[name]).hexdigest()
        if found != expected:
            raise DataError(
                f"{folder / name} is corrupt: its sha256 is {found}, the original's is "
                f"{expected}. Delete it and run again to download it afresh."
            )
    return LoadedSource(
        train=train,
        test=test,
        class_names=list(CLASS_NAMES),
        source_files=[folder / name for name in FILES],
        content_digest=digest_files((name, sha256) for name, (sha256, _) in FILES.items()),
        train_origin=folder / "train-labels-idx1-ubyte.gz",
        test_origin=folder / "t10k-labels-idx1-ubyte.gz",
    )


def _images(path: Path, contents: dict[str, bytes], count: int) -> torch.Tensor:
    data = _idx_payload(path, contents[path.name], IMAGE_MAGIC, (count, ROWS, COLS))
    return torch.from_numpy(data.reshape(count, 1, ROWS, COLS).copy())  # (N, 1, 28, 28) uint8


def _labels(path: Path, contents: dict[str, bytes], count: int) -> torch.Tensor:
    data = _idx_payload(path, contents[path.name], LABEL_MAGIC, (count,))
    return torch.from_numpy(data.astype(np.int64))  # (N,)


def _idx_payload(path: Path, compressed: bytes, magic: int, shape: tuple[int, ...]) -> np.ndarray:
    """The uint8 payload of an idx file, after checking its header against `shape`."""
    fix = "Delete the file and run again to download it afresh, or replace it with the original."
    original = f"the original has {FILES[path.name][1]:,} bytes"
    if not compressed:
        raise DataError(f"{path}: expected a gzip file, found an empty file ({original}). {fix}")
    try:
        raw = gzip.decompress(compressed)
    except (EOFError, OSError, zlib.error) as exc:
        raise DataError(
            f"{path}: expected a complete gzip file, found {len(compressed):,} bytes that "
            f"do not decompress ({exc}; {original}). {fix}"
        ) from None
    header_len = 4 * (1 + len(shape))
    if len(raw) < header_len:
        raise DataError(
            f"{path}: expected an idx header of {header_len} bytes, found a file of "
            f"{len(raw)} bytes after decompression. {fix}"
        )
    header = np.frombuffer(raw, dtype=">i4", count=1 + len(shape))
    if header[0] != magic:
        raise DataError(
            f"{path}: expected idx magic number {magic} "
            f"({'images' if magic == IMAGE_MAGIC else 'labels'}), found {header[0]}. "
            f"Is this the right file? {fix}"
        )
    if tuple(header[1:]) != shape:
        raise DataError(
            f"{path}: expected an idx header with dimensions {shape}, found "
            f"{tuple(int(d) for d in header[1:])}. {fix}"
        )
    expected = header_len + int(np.prod(shape))
    if len(raw) != expected:
        raise DataError(
            f"{path}: expected {expected:,} bytes after decompression (header {shape}), "
            f"found {len(raw):,}; the file is truncated or padded. {fix}"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header_len).reshape(shape)


def _fetch_url(url: str, timeout: float) -> bytes:
    """The network call, on its own so tests can replace it."""
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.read()


def _download_missing(folder: Path, missing: list[str]) -> None:
    for name in missing:
        try:
            data = _fetch_url(MIRROR + name, DOWNLOAD_TIMEOUT_S)
        except (OSError, http.client.HTTPException) as exc:  # URLError and timeouts are OSErrors
            reason = f"download failed: {exc}"
            raise DataError(_not_found_message(folder, missing, reason)) from None
        found = hashlib.sha256(data).hexdigest()
        expected = FILES[name][0]
        if found != expected:
            reason = f"the download of {MIRROR + name} has sha256 {found}, not {expected}"
            raise DataError(_not_found_message(folder, missing, reason))
        try:
            _write_atomically(folder / name, data)
        except OSError as exc:
            raise DataError(
                f"downloaded {name} but cannot write it to {folder}: {exc}. Choose a writable "
                f"data folder with --data-dir or ${DATA_ENV_VAR}."
            ) from None


def _write_atomically(path: Path, data: bytes) -> None:
    """A reader never sees a half-written file: write a temporary file, then rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _not_found_message(folder: Path, missing: list[str], reason: str) -> str:
    return (
        f"MNIST files are missing and could not be downloaded ({reason}).\n"
        f"  searched: {folder}\n"
        f"  expected: {', '.join(FILES)}\n"
        f"  missing:  {', '.join(missing)}\n"
        f"To provide them, put the four original files in a folder named mnist/ inside a "
        f"data folder and point kdistill at that data folder with --data-dir <folder> or "
        f"{DATA_ENV_VAR}=<folder>; or allow network access to {MIRROR}."
    )
