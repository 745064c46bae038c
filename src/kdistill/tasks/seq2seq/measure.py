"""What a finished translation stage measures (test BLEU and chrF, greedy and beam, the
validation BLEU and loss, decoding speed, cost), how a stage folder is saved and loaded
again, and the commands that read a stage or a recipe: `kdistill eval`, `inspect`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from kdistill import __version__
from kdistill.checkpoint import atomic_write_json, load_weights
from kdistill.errors import CheckpointError, RecipeError
from kdistill.evaluate import cost
from kdistill.models.hf import quiet_transformers, weights_follow
from kdistill.recipe.seq2seq import (
    DecodeConfig,
    Seq2SeqDataConfig,
    Seq2SeqModelSpec,
    Seq2SeqRecipe,
)
from kdistill.tasks.seq2seq.data import Seq2SeqData, load_seq2seq, load_tokenizers
from kdistill.tasks.seq2seq.models import Seq2SeqLM, build_model
from kdistill.tasks.seq2seq.steps import (
    Translations,
    corpus_scores,
    require_sacrebleu,
    token_loss,
    translate,
)

COST_PAIRS = 32  # test pairs in the batch FLOPs and forward latency are measured on


def measure_model(
    model: Seq2SeqLM,
    data: Seq2SeqData,
    recipe: Seq2SeqRecipe,
    *,
    device: Any,
    beam: bool = True,
) -> tuple[dict[str, Any], dict[str, Translations]]:
    """Test BLEU and chrF, greedy and (with `beam`) beam search, decoding speed; the
    validation BLEU (greedy) and loss per token."""
    ev = recipe.evaluation
    greedy = DecodeConfig(
        num_beams=1, max_new_tokens=ev.greedy_max_new_tokens, batch_size=ev.beam.batch_size
    )
    out: dict[str, Any] = {}
    written: dict[str, Translations] = {}
    test = data.test
    if len(test):
        made = translate(model, test.sources, greedy, device=device)
        scores = corpus_scores(made.texts, test.text.targets)
        section = {
            "bleu": scores["bleu"],
            "chrf": scores["chrf"],
            "tokens_per_second": made.tokens_per_second,
            "sentences_per_second": len(test) / made.seconds,
            "ended": made.ended / len(test),
            "sentences": len(test),
            "bleu_signature": scores["bleu_signature"],
            "chrf_signature": scores["chrf_signature"],
        }
        written["greedy"] = made
        if beam:
            made = translate(model, test.sources, ev.beam, device=device)
            scores = corpus_scores(made.texts, test.text.targets)
            section.update(
                bleu_beam=scores["bleu"],
                chrf_beam=scores["chrf"],
                tokens_per_second_beam=made.tokens_per_second,
                ended_beam=made.ended / len(test),
            )
            written["beam"] = made
        out["test"] = section
    if len(data.val):
        made = translate(model, data.val.sources, greedy, device=device)
        pad, start = data.pad_id, model.start_id
        out["val"] = {
            "bleu": corpus_scores(made.texts, data.val.text.targets)["bleu"],
            "loss": token_loss(
                model, data.val, batch_size=ev.beam.batch_size, device=device, pad_id=pad,
                start_id=start,
            ),
        }  # fmt: skip
    return out, written


def summary(evaluation: dict[str, Any]) -> str:
    test = evaluation.get("test", {})
    beam = f", beam {test['bleu_beam']:.2f}" if "bleu_beam" in test else ""
    return (
        f"test BLEU {test.get('bleu', float('nan')):.2f} greedy{beam}, chrF "
        f"{test.get('chrf', float('nan')):.2f}; {test.get('tokens_per_second', float('nan')):.0f} "
        "tokens/s greedy"
    )


def samples(
    data: Seq2SeqData, written: dict[str, Translations], count: int
) -> list[dict[str, str]]:
    made = written.get("beam") or written.get("greedy")
    if made is None:
        return []
    return [
        {"source": data.test.text.sources[i], "reference": data.test.text.targets[i],
         "translation": made.texts[i]}
        for i in range(min(count, len(made.texts)))
    ]  # fmt: skip


def seq2seq_cost(model: Seq2SeqLM, data: Seq2SeqData, device: Any) -> dict[str, Any]:
    """evaluate.cost of one teacher-forced forward pass over the first test pairs."""
    from kdistill.tasks.seq2seq.data import batch

    pairs = data.test if len(data.test) else data.train
    rows = torch.arange(min(COST_PAIRS, len(pairs)))
    made = batch(pairs, rows, pad_id=data.pad_id, start_id=model.start_id)
    made.pop("labels")
    return cost(model, device=device, example_input={k: v.to(device) for k, v in made.items()})


def save_model(
    model: Seq2SeqLM, folder: Path, spec: Seq2SeqModelSpec, section: Seq2SeqDataConfig
) -> None:
    """hf/ (save_pretrained and the tokenizers) and model.json: what rebuilds it."""
    hf_dir = folder / "hf"
    with quiet_transformers():
        model.hf.save_pretrained(str(hf_dir), safe_serialization=True)
    model.kdistill_tokenizers.save(hf_dir)
    atomic_write_json(
        folder / "model.json",
        {
            "task": "seq2seq",
            "model": spec.model_dump(mode="json"),
            "tokenizer": model.tokenizer_key,
            "data": section.model_dump(mode="json"),
            "kdistill": __version__,
        },
    )


def load_stage(weights: Path, data_dir: Any) -> tuple[Seq2SeqLM, Seq2SeqData]:
    """A stage's model (from its hf/ folder and weights) and its data, as trained."""
    info_path = weights.with_name("model.json")
    if not info_path.is_file():
        raise CheckpointError(
            f"{weights} has no model.json beside it, so its architecture is unknown; give a "
            "stage folder of a seq2seq run"
        )
    info = json.loads(info_path.read_text(encoding="utf-8"))
    section = Seq2SeqDataConfig.model_validate(info["data"])
    hf_dir = weights.parent / "hf"
    tokenizers = load_tokenizers(hf_dir, where=str(hf_dir))
    section = section.model_copy(
        update={
            "tokenizer": section.tokenizer.model_copy(
                update={"path": str(hf_dir), "vocab_size": None}
            )
        }
    )
    data = load_seq2seq(section, data_dir)
    data.tokenizers = tokenizers
    spec = Seq2SeqModelSpec(path=str(hf_dir))
    with weights_follow():
        model = build_model(spec, tokenizers, where="model")
    load_weights(model, weights)
    return model.eval(), data


def evaluate_checkpoint(
    weights: Path, *, data: str | None = None, model: str | None = None, data_dir: Any = None
) -> dict[str, Any]:
    """`kdistill eval` of a stage: test BLEU and chrF (greedy and beam) and its cost."""
    if data is not None or model is not None:
        raise RecipeError(
            "kdistill eval of a seq2seq stage reads its data and model from the model.json "
            "beside the weights; --data and --model do not apply"
        )
    require_sacrebleu()
    net, loaded = load_stage(weights, data_dir)
    recipe = recipe_of(weights)
    start = time.perf_counter()
    values, _ = measure_model(net, loaded, recipe, device="cpu")
    return {
        "checkpoint": str(weights),
        **values,
        "cost": seq2seq_cost(net, loaded, "cpu"),
        "seconds": round(time.perf_counter() - start, 3),
    }


def recipe_of(weights: Path) -> Seq2SeqRecipe:
    """The recipe of the run a stage belongs to (its evaluation settings), or the
    defaults when the stage folder stands alone."""
    from kdistill.recipe import read_yaml

    for parent in weights.parents:
        path = parent / "recipe.yaml"
        if path.is_file():
            return Seq2SeqRecipe.model_validate(read_yaml(path))
    return Seq2SeqRecipe(task="seq2seq", name="eval")


def inspect_recipe(recipe: Seq2SeqRecipe, role: str, *, depth: int | None, data_dir: Any) -> str:
    from kdistill.taps import module_tree
    from kdistill.tasks.seq2seq.data import batch

    section = recipe.data.model_copy(update={"limit_train": 2000, "limit_test": 4, "limit_val": 4})
    data = load_seq2seq(section, data_dir)
    spec = getattr(recipe, role).model
    teacher = None
    if role == "student" and recipe.student_from_teacher:
        assert recipe.teacher is not None
        teacher = build_model(recipe.teacher.model, data.tokenizers, where="teacher.model")
    model = build_model(spec, data.tokenizers, where=f"{role}.model", teacher=teacher).eval()
    made = batch(data.test, torch.arange(len(data.test)), pad_id=data.pad_id, start_id=data.pad_id)
    made.pop("labels")
    header = f"{spec.describe()}: seq2seq, the first test pairs (teacher forcing)"
    return header + "\n" + module_tree(model, made, max_depth=depth)
