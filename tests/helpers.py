"""Helpers shared by the tests (imported as `from helpers import ...`; conftest.py holds
only fixtures)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from accelerate import Accelerator
from rich.console import Console

from kdistill.cli import main
from kdistill.recipe.causal_lm import LMTrainConfig
from kdistill.tasks.causal_lm.models import CausalLM
from kdistill.tasks.causal_lm.steps import LMSteps
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


def tiny_recipe(**changes: object) -> dict:
    """A recipe that trains in seconds on 2,000 real MNIST images."""
    recipe: dict = {
        "name": "tiny",
        "data": {"source": "mnist", "val_fraction": 0.1, "limit_train": 2000, "limit_test": 1000},
        "teacher": {"model": {"name": "mlp", "args": {"hidden": [64]}}, "train": {"epochs": 2}},
        "student": {"model": {"name": "mlp", "args": {"hidden": [16]}}},
        "objective": [
            {"loss": "cross_entropy", "weight": 0.5},
            {"loss": "kd", "weight": 0.5, "temperature": 2},
        ],
        "train": {
            "epochs": 2,
            "batch_size": 64,
            "optimizer": {"name": "sgd", "lr": 0.05},
            "eval_batch_size": 500,
        },
        "stages": ["teacher", "baseline", "distill"],
        "seeds": [0],
    }
    for key, value in changes.items():
        recipe[key] = value
    return recipe


def tiny_lm_recipe(**changes: Any) -> dict[str, Any]:
    """Trains teacher, baseline and distill in a few seconds on 20,000 characters."""
    recipe: dict[str, Any] = {
        "task": "causal_lm",
        "name": "tiny_lm",
        "data": {
            "corpus": "tinyshakespeare/input.txt",
            "limit_chars": 20000,
            "val_fraction": 0.1,
            "seq_len": 32,
            "tokenizer": {"vocab_size": 300},
        },
        "teacher": {
            "model": {"config": {"type": "gpt2", "n_layer": 2, "n_embd": 32, "n_head": 2}},
            "train": {"epochs": 2},
            "signal": "cache",
            "cache": {"top_k": 8, "shard_sequences": 128},
        },
        "student": {"model": {"config": {"type": "gpt2", "n_layer": 1, "n_embd": 16, "n_head": 2}}},
        "objective": [
            {"loss": "forward_kl", "weight": 0.5, "temperature": 1.0},
            {"loss": "cross_entropy", "weight": 0.5},
        ],
        "train": {
            "epochs": 1,
            "batch_size": 16,
            "optimizer": {"name": "adamw", "lr": 0.005},
            "eval_batch_size": 64,
        },
        "stages": ["teacher", "baseline", "distill"],
        "seeds": [0],
        "samples": {"count": 2, "prompt_tokens": 4, "new_tokens": 6},
    }
    recipe.update(changes)
    return recipe


# ------------------------------------------------------------ recipe files and the CLI


def write_recipe(path: Path, recipe: dict) -> Path:
    """Write a recipe dict as YAML; returns the path."""
    path.write_text(yaml.safe_dump(recipe))
    return path


def run_cli(recipe: Path, out: Path, *flags: str) -> int:
    """`kdistill run RECIPE --output-dir OUT --quiet FLAGS...`: the exit code."""
    return main(["run", str(recipe), "--output-dir", str(out), "--quiet", *flags])


def fails_cleanly(capsys: pytest.CaptureFixture[str], argv: list[str], *needles: str) -> str:
    """The CLI exits 2 with no traceback and every needle in its (whitespace-folded) stderr."""
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    flat = " ".join(err.split())
    for needle in needles:
        assert needle in flat, flat
    return flat


def naive_pad(sequences: list[list[int]], pad_id: int) -> tuple[list[list[int]], list[list[int]]]:
    """Token ids and attention masks of `sequences` right-padded with `pad_id` to the longest."""
    width = max(len(s) for s in sequences)
    return (
        [s + [pad_id] * (width - len(s)) for s in sequences],
        [[1] * len(s) + [0] * (width - len(s)) for s in sequences],
    )


def chromium() -> str | None:
    """The system's Chromium (KDISTILL_CHROMIUM, chromium, chromium-browser), if any."""
    import os
    import shutil

    for name in (os.environ.get("KDISTILL_CHROMIUM"), "chromium", "chromium-browser"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def open_in_chromium(page_path: Path, check: Any = None) -> tuple[list[str], list[str]]:
    """Open a page in headless Chromium (skips the test when playwright or Chromium is
    missing); returns (console and page errors, URLs requested). `check(page)` may look
    at the loaded page before the browser closes."""
    playwright = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    executable = chromium()
    if executable is None:
        pytest.skip(
            "no Chromium on this machine (apt-get install -y chromium); .ci/run installs it"
        )
    errors: list[str] = []
    requests: list[str] = []
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("request", lambda r: requests.append(r.url))
            page.goto(page_path.resolve().as_uri())
            page.wait_for_load_state("load")
            if check is not None:
                check(page)
        finally:
            browser.close()
    return errors, requests


def free_port() -> int:
    """A TCP port free now, for a multi-process launch (tests may run side by side)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
