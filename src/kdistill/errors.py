"""Errors a user can fix.

Every error the user can act on is a `KdistillError`. The CLI prints its message
(one paragraph: what is wrong, where, what to do) and exits non-zero without a
traceback unless `--debug` is given. Anything else is a bug in kdistill and
keeps its traceback.
"""

from __future__ import annotations

import difflib
import errno
from collections.abc import Iterable


def close_matches(
    word: str, choices: Iterable[str], *, n: int = 1, cutoff: float = 0.6
) -> list[str]:
    """The `n` choices closest to a misspelt `word` (difflib's ratio ≥ cutoff), best first."""
    return difflib.get_close_matches(word, [c for c in choices if c], n=n, cutoff=cutoff)


def suggest(word: str, choices: Iterable[str]) -> str:
    """' (did you mean 'x'?)' for the choice closest to `word`, or '' when none is close:
    the one wording of every "did you mean" in kdistill's messages."""
    hint = close_matches(word, choices)
    return f" (did you mean {hint[0]!r}?)" if hint else ""


_DISK_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}


def write_failure(exc: OSError) -> tuple[str, str]:
    """A failed write in the user's words: (what happened, what to do first). A full disk
    (or quota) is said plainly; any other error as the operating system gives it."""
    said = f"[Errno {exc.errno}] {exc.strerror}" if exc.strerror else str(exc)
    if exc.errno in _DISK_FULL:
        return f"the disk is full ({said})", "Free space on that disk (or write to another one)"
    return said, "Fix the cause (permissions, a read-only or failing disk)"


class KdistillError(Exception):
    """Base class: the message is shown to the user as is."""


class RecipeError(KdistillError):
    """The recipe (YAML, overrides or Python arguments) is invalid."""


class DataError(KdistillError):
    """A dataset is missing, malformed or inconsistent with the recipe."""


class ModelError(KdistillError):
    """A model cannot be built or does not fit the task."""


class CheckpointError(KdistillError):
    """A checkpoint is missing, corrupt or does not match the model."""


class CacheError(KdistillError):
    """A teacher-output cache is missing, stale or corrupt."""


class RunDirError(KdistillError):
    """The output folder cannot be used as asked (finished run, nothing to resume)."""


class ExportError(KdistillError):
    """A model cannot be exported, or its export does not compute what the model does."""


class TrainingError(KdistillError):
    """Training cannot go on (non-finite loss, diverged)."""


class LossInputError(KdistillError, ValueError):
    """A loss function received tensors or parameters it cannot accept."""


class TuneError(KdistillError):
    """A study cannot start, resume or finish as asked."""
