"""Errors a user can fix.

Every error the user can act on is a `KdistillError`. The CLI prints its message
(one paragraph: what is wrong, where, what to do) and exits non-zero without a
traceback unless `--debug` is given. Anything else is a bug in kdistill and
keeps its traceback.
"""

from __future__ import annotations


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


class TrainingError(KdistillError):
    """Training cannot go on (non-finite loss, diverged)."""


class LossInputError(KdistillError, ValueError):
    """A loss function received tensors or parameters it cannot accept."""
