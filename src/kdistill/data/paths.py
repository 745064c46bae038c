"""Where data lives: the data folder, and user paths given in a recipe."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from pathlib import Path

from kdistill.errors import DataError

DATA_ENV_VAR = "KDISTILL_DATA"
DEFAULT_DATA_ROOT = Path("~/.cache/kdistill/data")


def resolve_data_root(data_dir: str | Path | None = None) -> tuple[Path | None, list[Path]]:
    """The data folder and the folders searched for it.

    The first one given wins: `data_dir` (the `--data-dir` option), else
    $KDISTILL_DATA, else ~/.cache/kdistill/data. An explicit choice never falls
    back to another folder, so a typo shows up as an error instead of other data.
    The root is None when that folder does not exist (yet: MNIST downloads into it).
    """
    if data_dir is not None and str(data_dir):
        chosen = Path(data_dir)
    elif os.environ.get(DATA_ENV_VAR):
        chosen = Path(os.environ[DATA_ENV_VAR])
    else:
        chosen = DEFAULT_DATA_ROOT
    chosen = chosen.expanduser()
    return (chosen if chosen.is_dir() else None), [chosen]


def resolve_user_path(
    path: str | None, data_root: Path, *, source: str, layout: str, alternative: str = ""
) -> Path:
    """`data.path` as a folder: absolute as is; relative against the current
    directory if it exists there, else against the data folder. `alternative` ends
    the messages with another way to give the data."""
    if not path:
        raise DataError(
            f"data.source {source!r} reads your own files, so data.path is required: "
            f"a folder with {layout}{alternative}"
        )
    tried = candidates(path, data_root)
    for candidate in tried:
        if candidate.is_dir():
            return candidate
    raise DataError(
        f"data.path {path!r} (source {source!r}) is not a folder; tried "
        + ", ".join(str(p) for p in tried)
        + f". Give a folder with {layout}; relative paths resolve against the current "
        f"directory, then the data folder (--data-dir, else ${DATA_ENV_VAR}){alternative}"
    )


def resolve_user_file(
    path: str, data_root: Path | None, *, field: str, source: str, expects: str
) -> Path:
    """A file the recipe names (`field`: data.train, data.test), resolved as `data.path`
    is: absolute as is; relative against the current directory if it is a file there,
    else against the data folder."""
    tried = candidates(path, data_root)
    for candidate in tried:
        if candidate.is_file():
            return candidate
    folders = [str(p) for p in tried if p.is_dir()]
    hint = (
        f" ({', '.join(folders)} is a folder: name the file in it, or give the folder as "
        "data.path instead of data.train and data.test)"
        if folders
        else ""
    )
    raise DataError(
        f"{field} {path!r} (source {source!r}) is not a file; tried "
        + ", ".join(str(p) for p in tried)
        + f"{hint}. Give {expects}; relative paths resolve against the current directory, "
        f"then the data folder (--data-dir, else ${DATA_ENV_VAR})"
    )


def candidates(path: str, data_root: Path | None, *, working_folder: bool = True) -> list[Path]:
    """Where a path a recipe names is looked for, in order: absolute as is; relative
    against the current directory (unless `working_folder` is False: the text sources
    read the data folder only), then the data folder (when there is one)."""
    given = Path(path).expanduser()
    if given.is_absolute():
        return [given]
    tried = [Path.cwd() / given] if working_folder else []
    if data_root is not None:
        tried.append(data_root / given)
    return tried


def require_file(folder: Path, name: str, *, source: str) -> Path:
    path = folder / name
    if not path.is_file():
        present = sorted(p.name for p in folder.iterdir())
        raise DataError(
            f"{path} is missing: data.source {source!r} needs train and test files in "
            f"{folder}; found {present or 'nothing'}. Files named otherwise: give them as "
            "data.train and data.test instead of data.path"
        )
    return path


def digest_files(named_digests: Iterable[tuple[str, str]]) -> str:
    """One sha256 over (name, content sha256) pairs, independent of where the folder is."""
    h = hashlib.sha256()
    for name, digest in named_digests:
        h.update(f"{name}\0{digest}\n".encode())
    return h.hexdigest()
