"""Token classification on the encoder-task run (`kdistill.tasks.encoder`): what it
does its own way, and its entry points for the task table.

The teacher's signal of a training sentence is its word logits (W_i, C), NaN for a
word it has no token for (such words leave the loss); outputs and scores are word
logits and entity F1 (steps.py). BiLSTM taggers save their words in vocab.txt.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdistill.recipe import ModelSpec
from kdistill.recipe.token_classification import TaggingDataConfig
from kdistill.tasks import encoder, encoder_plan
from kdistill.tasks.encoder_export import export_encoder
from kdistill.tasks.token_classification.data import TaggedSentences, WordVocab, load_tagging
from kdistill.tasks.token_classification.models import BiLSTMTagger, make_tagger
from kdistill.tasks.token_classification.report import write_report
from kdistill.tasks.token_classification.steps import (
    TaggerSteps,
    entity_scores,
    predict_words,
    require_seqeval,
    without_token,
)


def _describe(data: TaggedSentences) -> str:
    transfer = (
        ""
        if data.transfer is None
        else f"; distill adds {len(data.transfer)} untagged sentences ({data.transfer.source})"
    )
    return (
        f"data: {len(data.train)} train, {len(data.val)} val, {len(data.test)} test "
        f"sentences, {data.num_labels} labels ({', '.join(data.entity_types)}){transfer}"
    )


def _content(data: TaggedSentences) -> list[str]:
    return [str(data.max_length), *("\x1f".join(words) for words in data.train.words)]


def _signal(teacher: nn.Module, data: TaggedSentences, *, batch_size: int, device: Any):
    return predict_words(
        teacher, data, "train", batch_size=batch_size, device=device, missing="nan"
    )


def _signal_stand_in(data: TaggedSentences, teacher: nn.Module) -> list[torch.Tensor]:
    return [
        torch.zeros(len(first), data.num_labels) for first in data.encode(teacher, "train").first
    ]


def _predict(model: nn.Module, data: TaggedSentences, split: str, *, batch_size: int, device: Any):
    return predict_words(model, data, split, batch_size=batch_size, device=device)


def _inputs(data: TaggedSentences, model: nn.Module, split: str, rows: torch.Tensor):
    batch = data.batch(model, split, rows)
    return {k: v for k, v in batch.items() if k != "first"}


def _lengths(data: TaggedSentences, model: nn.Module, split: str) -> torch.Tensor:
    return data.encode(model, split).lengths


def _from_raw(
    data: TaggedSentences, model: nn.Module, split: str, raw: list[torch.Tensor]
) -> list[torch.Tensor]:
    """Each sentence's word logits from its per-token logits, as predict_words reads
    them (a word without a first token predicts label 0, O)."""
    out = []
    for first, tokens in zip(data.encode(model, split).first, raw, strict=True):
        out.append(without_token(tokens[first.clamp(min=0)].clone(), first < 0))
    return out


def _summary(evaluation: dict[str, Any]) -> str:
    return f"test entity F1 {100 * evaluation.get('test', {}).get('f1', float('nan')):.2f}"


def _extra(data: TaggedSentences, model: nn.Module) -> dict[str, Any]:
    return {"words_dropped": {s: data.encode(model, s).dropped() for s in ("train", "val", "test")}}


def _save_extra(model: nn.Module, folder: Path) -> None:
    if isinstance(model, BiLSTMTagger):
        vocab: WordVocab = getattr(model, "kdistill_tokenizer")  # noqa: B009
        (folder / "vocab.txt").write_text("\n".join(vocab.tokens) + "\n", encoding="utf-8")


def _load_saved(data: TaggedSentences, folder: Path, spec: ModelSpec) -> nn.Module:
    """A BiLSTM tagger with the words it was trained with (vocab.txt)."""
    vocab = WordVocab((folder / "vocab.txt").read_text(encoding="utf-8").splitlines())
    args = {k: v for k, v in spec.args.items() if k not in ("vocab_min_freq", "vocab_size")}
    model = encoder.carry(BiLSTMTagger(len(vocab), data.num_labels, **args), vocab, vocab.key)
    setattr(model, "label_names", list(data.label_names))  # noqa: B010
    return model


def _check_labels(data: TaggedSentences, weights: Path) -> None:
    import json

    from kdistill.errors import CheckpointError

    info = json.loads(weights.with_name("model.json").read_text(encoding="utf-8"))
    if info.get("labels") and info["labels"] != data.label_names:
        raise CheckpointError(
            f"{weights} predicts {', '.join(info['labels'])}, but the data's labels are "
            f"{', '.join(data.label_names)}"
        )


TASK = encoder.EncoderTask(
    name="token_classification",
    data_section=TaggingDataConfig,
    load=load_tagging,
    describe=_describe,
    make_model=make_tagger,
    steps=TaggerSteps,
    signal=_signal,
    signal_stand_in=_signal_stand_in,
    content=_content,
    predict=_predict,
    score=entity_scores,
    inputs=_inputs,
    lengths=_lengths,
    from_raw=_from_raw,
    agreement="word label",
    reading="a word's label is read at its first token",
    summary=_summary,
    write_report=write_report,
    requires=require_seqeval,
    extra=_extra,
    save_extra=_save_extra,
    load_saved=_load_saved,
    distill_data=TaggedSentences.for_distill,
)


def load_tagger(weights: Path, data: TaggedSentences) -> nn.Module:
    """A stage's saved tagger; refused when it predicts other labels than the data's."""
    _check_labels(data, weights)
    return encoder.load_model(TASK, weights, data)


run = partial(encoder.run, TASK)
evaluate_checkpoint = partial(encoder.evaluate_checkpoint, TASK)
inspect_recipe = partial(encoder.inspect_recipe, TASK)
cache_teacher = partial(encoder.cache_teacher, TASK)
check_recipe = partial(encoder.check_recipe, TASK)
export_tagger = partial(export_encoder, TASK)
plan_stages = partial(encoder_plan.encoder_stages, TASK)
