"""Helpers shared by the tests (imported as `from helpers import ...`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from accelerate import Accelerator
from rich.console import Console

from kdistill.lm.models import CausalLM
from kdistill.lm.recipe import LMTrainConfig
from kdistill.tasks.causal_lm import LMSteps
from kdistill.train import FitResult, fit


def fit_lm(
    model: CausalLM,
    *,
    settings: LMTrainConfig,
    seed: int,
    out_dir: Path,
    accelerator: Accelerator,
    resume: bool = False,
    label: str = "train",
    quiet: bool = False,
    console: Console | None = None,
    **task: Any,
) -> FitResult:
    """`fit` on a language model's steps: `task` holds LMSteps' keyword arguments (train,
    val, objective, teacher, vocab_size, train_labels, val_labels, on_policy)."""
    steps = LMSteps(
        model, settings=settings, accelerator=accelerator, seed=seed, label=label, **task
    )
    return fit(
        model,
        steps,
        settings=settings,
        seed=seed,
        out_dir=out_dir,
        accelerator=accelerator,
        resume=resume,
        label=label,
        quiet=quiet,
        console=console,
    )
