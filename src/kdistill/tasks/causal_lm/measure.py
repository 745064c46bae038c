"""What a causal-LM stage measures when it ends, and the commands that measure saved
weights (`kdistill eval`) or show a model's modules (`kdistill inspect`): loss per
counted token, perplexity and bits per character on the validation split, generated
samples, and the cost per token."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kdistill.tasks.causal_lm.pipeline import LMContext

import itertools
import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from kdistill import __version__
from kdistill.checkpoint import atomic_write_json, load_weights
from kdistill.data.lm_text import (
    TOKENIZER_FILE,
    bits_per_character,
    load_tokenizer,
    save_tokenizer,
)
from kdistill.errors import CheckpointError, RecipeError
from kdistill.evaluate import cost
from kdistill.models.hf import quiet_transformers
from kdistill.recipe.causal_lm import (
    LMDataConfig,
    LMModelSpec,
    LMRecipe,
    SamplesConfig,
)
from kdistill.stages import (
    finish_stage,
)
from kdistill.taps import module_tree
from kdistill.tasks.causal_lm.data import LMData, build_lm_data
from kdistill.tasks.causal_lm.models import (
    CausalLM,
)
from kdistill.tasks.causal_lm.steps import evaluate_lm

MEASURED_SPLIT = "validation: the last data.val_fraction of the corpus, by character position"


MEASURED_PAIRS = (
    "validation pairs (data.pairs.val, else data.val_fraction of the training pairs drawn "
    "at random): completion tokens only"
)


def measure(model: CausalLM, data: LMData, *, batch_size: int, device: Any) -> dict[str, Any]:
    """Loss per token (nats), perplexity and bits per character on the validation split
    (with pairs: over the completion tokens and the characters of their text)."""
    nll, tokens = evaluate_lm(
        model, data.val, batch_size=batch_size, device=device, labels=data.val_labels
    )
    loss = nll / max(tokens, 1)
    return {
        "loss": loss,
        "perplexity": math.exp(min(loss, 700.0)),
        "bpc": bits_per_character(nll, data.val_characters),
        "tokens": tokens,
        "characters": data.val_characters,
    }


def loss_by_position(
    model: CausalLM, data: LMData, *, batch_size: int, device: Any, buckets: int = 16
) -> dict[str, Any]:
    """Validation loss per token (nats) by its position in the sequence, in up to
    `buckets` equal ranges of positions: how much the context helps each model. The
    logits are built a few rows at a time (at most ~2^25 values at once)."""
    from kdistill.losses.lm_chunked import CHUNK_ELEMENTS, IGNORE_INDEX

    length = data.val.shape[1] - 1
    sums = torch.zeros(length, dtype=torch.float64)
    counts = torch.zeros(length, dtype=torch.long)
    per_pass = max(1, min(batch_size, CHUNK_ELEMENTS // max(length * data.vocab_size, 1)))
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for start in range(0, len(data.val), per_pass):
                rows = data.val[start : start + per_pass].to(device)
                labels = (
                    rows[:, 1:]
                    if data.val_labels is None
                    else data.val_labels[start : start + per_pass].to(device)
                )
                logits = model.logits(model(rows[:, :-1])).float()[..., : data.vocab_size]
                nll = torch.nn.functional.cross_entropy(
                    logits.transpose(1, 2), labels, ignore_index=IGNORE_INDEX, reduction="none"
                )  # (b, T)
                counted = labels != IGNORE_INDEX
                sums += (nll * counted).sum(0).double().cpu()
                counts += counted.sum(0).cpu()
    finally:
        model.train(was_training)
    edges = torch.linspace(0, length, min(buckets, length) + 1).round().long().tolist()
    ranges, losses = [], []
    for low, high in itertools.pairwise(edges):
        n = int(counts[low:high].sum())
        if high > low and n:
            ranges.append([low + 1, high])  # 1-based: tokens of context read
            losses.append(float(sums[low:high].sum() / n))
    return {"positions": ranges, "loss": losses}


def generate_samples(
    model: CausalLM, data: LMData, cfg: SamplesConfig, *, seed: int, device: Any
) -> list[dict[str, str]]:
    """Continuations of `cfg.count` prompts taken from evenly spaced validation sequences
    (their first cfg.prompt_tokens tokens; with pairs, the pair's prompt): greedy at
    temperature 0, else sampled with a generator seeded by `seed`."""
    if cfg.count == 0:
        return []
    rows = torch.linspace(0, len(data.val) - 1, cfg.count).round().long().unique()
    generator = torch.Generator().manual_seed(seed)
    context = min(data.seq_len, model.context or data.seq_len)
    samples = []
    was_training = model.training
    model.eval()
    try:
        for row in rows.tolist():
            length = data.prompt_length(row) or cfg.prompt_tokens
            prompt = data.val[row, : min(length, context)].tolist()
            ids = list(prompt)
            with torch.inference_mode():
                for _ in range(cfg.new_tokens):
                    window = torch.tensor(ids[-context:], device=device).unsqueeze(0)  # (1, t)
                    logits = model.logits(model(window)[:, -1])[0, : data.vocab_size].float()
                    if cfg.temperature == 0:
                        token = int(logits.argmax())
                    else:
                        probs = torch.softmax(logits / cfg.temperature, dim=-1).cpu()
                        token = int(torch.multinomial(probs, 1, generator=generator))
                    ids.append(token)
            samples.append(
                {
                    "prompt": data.tokenizer.decode(prompt),
                    "completion": data.tokenizer.decode(ids[len(prompt) :]),
                }
            )
    finally:
        model.train(was_training)
    return samples


def measure_stage(
    ctx: LMContext,
    stage: str,
    seed: int,
    model: CausalLM,
    spec: LMModelSpec,
    train_seconds: float,
    train_tokens: int,
    data: LMData | None = None,
) -> None:
    """Measure the last and best-on-validation weights once; write the stage folder.
    data: the corpus as the model tokenizes it (default the run's)."""
    data, device = data or ctx.data, ctx.accelerator.device
    batch = ctx.recipe.train.eval_batch_size
    model = model.to(device)

    def save(folder: Path) -> None:
        _export_hf(model, data, folder / "hf")
        atomic_write_json(
            folder / "model.json",
            {
                "task": "causal_lm",
                "model": spec.model_dump(mode="json"),
                "hf_config": model.hf.config.to_dict(),
                "vocab_size": data.vocab_size,
                "seq_len": data.seq_len,
                "tokenizer": data.tokenizer_fingerprint,
                "data": ctx.recipe.data.model_dump(mode="json"),
                "kdistill": __version__,
            },
        )

    def summary(evaluation: dict[str, Any]) -> str:
        val = evaluation["val"]
        return (
            f"val loss/token {val['loss']:.4f}, perplexity {val['perplexity']:.2f}, "
            f"{val['bpc']:.4f} bits/character"
        )

    finish_stage(
        ctx,
        stage,
        seed,
        model,
        measure=lambda weights: {"val": measure(weights, data, batch_size=batch, device=device)},
        best_by=("val_loss", False),
        train_seconds=train_seconds,
        record={
            "task": "causal_lm",
            "measured_split": MEASURED_SPLIT if data.val_labels is None else MEASURED_PAIRS,
        },
        after={"train_tokens": train_tokens},
        main_only=lambda: {
            "cost": _cost(model, data, device),
            "loss_by_position": loss_by_position(model, data, batch_size=batch, device=device),
            "samples": generate_samples(model, data, ctx.recipe.samples, seed=seed, device=device),
        },
        save=save,
        summary=summary,
    )


def _cost(model: CausalLM, data: LMData, device: Any) -> dict[str, Any]:
    """Parameters, size, FLOPs and latency per token of the Hugging Face model's forward
    (logits included) on 4 validation sequences."""
    inputs = data.val[:4, :-1]
    measured = cost(model.hf, example_input=inputs, device=device, repeats=5, warmup=1)
    tokens = inputs.numel()
    return {
        **measured,
        "tokens_per_batch": tokens,
        "seq_len": data.seq_len,
        "flops_per_token": measured["flops"] / data.seq_len,
        "latency_ms_per_token": measured["latency_ms"] / tokens,
    }


def _export_hf(model: CausalLM, data: LMData, folder: Path) -> None:
    """The model as a Hugging Face folder (config, weights, tokenizer), written then renamed."""
    tmp = folder.with_name(folder.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    with quiet_transformers():
        model.hf.save_pretrained(tmp)
    save_tokenizer(data.tokenizer, tmp)
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(tmp, folder)


def evaluate_lm_checkpoint(
    weights: Path,
    *,
    data: str | None = None,
    model: str | None = None,
    data_dir: str | Path | None = None,
) -> dict[str, Any]:
    """`kdistill eval` of a language-model stage folder: loss per token, perplexity and
    bits per character on the validation split of the data it was trained on, tokenized
    with the stage's own tokenizer (hf/tokenizer.json), and the cost per token."""
    if data is not None or model is not None:
        raise RecipeError(
            f"{weights.parent} is a language-model stage: it is measured on the validation "
            "text of the recipe it was trained with, so --data and --model do not apply; "
            "leave them out"
        )
    if weights.suffix == ".onnx":
        from kdistill.tasks.causal_lm.export import evaluate_lm_onnx

        return evaluate_lm_onnx(weights, data_dir=data_dir)
    start = time.perf_counter()
    net, corpus = load_lm_stage(weights, data_dir=data_dir)
    device = torch.device("cpu")
    return {
        "checkpoint": str(weights),
        "task": "causal_lm",
        "val": measure(net, corpus, batch_size=32, device=device),
        "cost": _cost(net, corpus, device),
        "seconds": round(time.perf_counter() - start, 3),
    }


def load_lm_stage(weights: Path, *, data_dir: str | Path | None = None) -> tuple[CausalLM, LMData]:
    """A language-model stage's saved model and the corpus it was trained on, tokenized
    with the stage's own tokenizer (hf/tokenizer.json)."""
    stage_dir = weights.parent
    info = json.loads((stage_dir / "model.json").read_text())
    exported = stage_dir / "hf"
    if not (exported / TOKENIZER_FILE).is_file():
        raise CheckpointError(
            f"{stage_dir} has no hf/{TOKENIZER_FILE}, so the tokenizer the model reads is "
            "unknown; use a stage folder written by `kdistill run`"
        )
    corpus = build_lm_data(
        LMDataConfig.model_validate(info["data"]),
        data_dir=data_dir,
        tokenizer_dir=exported,
        tokenizer=load_tokenizer(exported),
    )
    with quiet_transformers():
        net = corpus.build_model(LMModelSpec(path=str(exported)), "model")
    load_weights(net, weights)
    return net.eval(), corpus


def inspect_lm_recipe(
    recipe: LMRecipe, role: str, *, depth: int | None, data_dir: str | Path | None
) -> str:
    """The modules of a language-model recipe's teacher or student, on two validation
    sequences of its data (the tokenizer trained in a scratch folder when the recipe
    trains one)."""
    with tempfile.TemporaryDirectory() as scratch:
        data = build_lm_data(recipe.data, data_dir=data_dir, tokenizer_dir=Path(scratch))
    spec = getattr(recipe, role).model
    source = None
    if spec.prune is not None and recipe.teacher is not None:  # cut from an untrained teacher
        source = data.build_model(recipe.teacher.model, "teacher.model")
    model = data.build_model(spec, f"{role}.model", source).eval()
    sample = data.val[:2, :-1]  # (2, seq_len) token ids
    header = (
        f"{role}: causal LM, vocabulary {data.vocab_size}, input {tuple(sample.shape)} token ids"
    )
    return header + "\n" + module_tree(model, sample, max_depth=depth)
