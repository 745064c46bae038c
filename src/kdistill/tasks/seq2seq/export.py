"""`kdistill export` of a translation stage: a Hugging Face folder (save_pretrained,
safetensors, the tokenizers), reloaded from disk and checked on the whole test split,
with a latency table and a model card.

    <output>/  config.json  model.safetensors  generation_config.json  tokenizer files
               export.json  README.md

Decoding stays in PyTorch (transformers' `generate`): no ONNX graph of the
autoregressive decoder is written, and INT8 is refused. Parity: the reloaded model
translates every test source (greedy, the run's length limit) and must write exactly
what the stage wrote; both BLEU scores are recorded. Latency: greedy translation on
`threads` threads, the first test sources one at a time and a batch of them at once,
for the exported student and, for scale, the run's teacher.
"""

from __future__ import annotations

import platform
from pathlib import Path
from typing import Any

import torch

from kdistill import __version__
from kdistill.checkpoint import atomic_write_json, atomic_write_text
from kdistill.errors import CheckpointError, RecipeError
from kdistill.export import BATCH, claim_export_dir, latency_markdown, latency_rows, run_teacher
from kdistill.models.hf import quiet_transformers
from kdistill.recipe.seq2seq import DecodeConfig, Seq2SeqModelSpec
from kdistill.tasks.seq2seq.measure import load_stage, recipe_of
from kdistill.tasks.seq2seq.models import Seq2SeqLM, build_model
from kdistill.tasks.seq2seq.steps import corpus_scores, translate

LATENCY_SENTENCES = 32  # test sources translated one at a time for the latency per sentence


def export_translator(
    weights: Path,
    *,
    output: Path,
    overwrite: bool = False,
    int8: bool | str = False,
    threads: int | None = None,
    data_dir: Any = None,
) -> dict[str, Any]:
    """`kdistill export` of a seq2seq stage (see the module's docstring)."""
    if int8:
        raise RecipeError(
            "kdistill export --int8 is not built for seq2seq: the translator is exported as a "
            "PyTorch (Hugging Face) folder, whose decoding loop stays in PyTorch"
        )
    weights = Path(weights)
    threads = threads or torch.get_num_threads()
    model, data = load_stage(weights, data_dir)
    folder = claim_export_dir(Path(output), overwrite=overwrite)
    with quiet_transformers():
        model.hf.save_pretrained(str(folder), safe_serialization=True)
    model.kdistill_tokenizers.save(folder)
    reloaded = build_model(Seq2SeqModelSpec(path=str(folder)), data.tokenizers, where="export")
    reloaded.eval()

    # greedy as the stage's evaluation decodes (its eval.json BLEU is the same number)
    evaluation = recipe_of(weights).evaluation
    greedy = DecodeConfig(
        num_beams=1,
        max_new_tokens=evaluation.greedy_max_new_tokens,
        batch_size=evaluation.beam.batch_size,
    )
    sources, references = data.test.sources, data.test.text.targets
    original = translate(model, sources, greedy, device="cpu").texts
    again = translate(reloaded, sources, greedy, device="cpu").texts
    same = sum(a == b for a, b in zip(original, again))
    parity = {
        "sentences": len(sources),
        "same_translation": same / max(len(sources), 1),
        "pytorch": {"bleu": corpus_scores(original, references)["bleu"]},
        "exported": {"bleu": corpus_scores(again, references)["bleu"]},
    }
    engines: list[tuple[str, Any, bool]] = [
        ("exported student, PyTorch FP32", _translator(reloaded, greedy), True)
    ]
    teacher_weights = run_teacher(weights)
    if teacher_weights is not None:
        teacher, _ = load_stage(teacher_weights, data_dir)
        engines.append(("teacher, PyTorch FP32", _translator(teacher, greedy), True))
    singles = [([s],) for s in sources[:LATENCY_SENTENCES]]
    latency = latency_rows(engines, singles, (sources[:BATCH],), threads=threads)  # type: ignore[arg-type]
    record = {
        "stage": str(weights.parent),
        "task": "seq2seq",
        "format": "huggingface",
        "folder": str(folder),
        "exporter": "save_pretrained",
        "decoding": "greedy, in PyTorch (transformers' generate); no ONNX decoder is written",
        "parity": parity,
        "latency": latency,
        "threads": threads,
        "versions": _versions(),
        # kept for readers of earlier export.json files
        "checked_sentences": parity["sentences"],
        "same_translation": parity["same_translation"],
    }
    atomic_write_json(folder / "export.json", record)
    atomic_write_text(folder / "README.md", _model_card(record))
    if same != len(sources):
        raise CheckpointError(
            f"the exported model translates {len(sources) - same} of {len(sources)} test "
            f"sentences differently from the stage it came from ({folder}); the export is not "
            "faithful"
        )
    return record


def _translator(model: Seq2SeqLM, settings: DecodeConfig) -> Any:
    """A callable that translates a list of tokenized sources, as latency_rows times it."""

    def run(sources: list[Any]) -> None:
        translate(model, sources, settings, device="cpu")

    return run


def _versions() -> dict[str, str]:
    import transformers

    return {
        "kdistill": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
    }


def _model_card(record: dict[str, Any]) -> str:
    parity = record["parity"]
    lines = [
        "# Exported translation model",
        "",
        f"From `{record['stage']}`, by kdistill {record['versions']['kdistill']}: a Hugging "
        "Face folder (`save_pretrained`, safetensors) with the tokenizers beside it. "
        "Translate with transformers' `generate`; " + record["decoding"].split("; ")[1] + ".",
        "",
        "## Parity with the stage on the test split (greedy)",
        "",
        "| model | test BLEU | translations identical |",
        "|---|---|---|",
        f"| the stage, PyTorch | {parity['pytorch']['bleu']:.2f} | — |",
        f"| this folder, reloaded | {parity['exported']['bleu']:.2f} | "
        f"{parity['same_translation']:.2%} of {parity['sentences']} |",
    ]
    lines += latency_markdown(record)
    lines += ["", "Rows: greedy translation of test sources (a call translates them all)."]
    return "\n".join(lines) + "\n"


def export_summary(result: dict[str, Any]) -> str:
    parity = result["parity"]
    rows = {row["engine"]: row["batch_1"]["median_ms"] for row in result["latency"]}
    speed = ""
    if "teacher, PyTorch FP32" in rows:
        student = rows["exported student, PyTorch FP32"]
        speed = f"; {rows['teacher, PyTorch FP32'] / student:.1f}x the teacher's sentences/s"
    return (
        f"{result['folder']}: Hugging Face folder; reloaded, {parity['same_translation']:.0%} of "
        f"{parity['sentences']} test translations identical, BLEU "
        f"{parity['exported']['bleu']:.2f} (decoding in PyTorch){speed}"
    )
