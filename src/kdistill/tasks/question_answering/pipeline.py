"""Extractive question answering on the encoder-task run (`kdistill.tasks.encoder`):
its models (a Hugging Face encoder with a span head), and what it does its own way.

    hf           args: location, reset_head, attn_implementation
    hf_student   args: location (a pretrained encoder, or "teacher": the recipe's
                 teacher as this run trained or loaded it), num_layers, layers,
                 hidden_size, intermediate_size, num_heads, init

The teacher's signal of a training window is its (T_i, 2) start and end scores;
outputs are each question's answer text, scored with SQuAD v1.1's exact match and F1.
Teacher and student must share a tokenizer, so their windows line up.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
from torch import nn

from kdistill.errors import ModelError
from kdistill.recipe import ModelSpec, TrainConfig
from kdistill.recipe.question_answering import QADataConfig
from kdistill.tasks import encoder, encoder_plan
from kdistill.tasks.encoder_export import export_encoder
from kdistill.tasks.question_answering.data import QAData, load_qa
from kdistill.tasks.question_answering.report import write_report
from kdistill.tasks.question_answering.steps import (
    SpanSteps,
    decode,
    predict_spans,
    squad_scores,
    window_scores,
)


def make_reader(
    data: QAData, spec: ModelSpec, *, where: str, teacher: nn.Module | None = None
) -> nn.Module:
    """The model `spec` names, with a span head (start and end score per token)."""
    if spec.name not in ("hf", "hf_student"):
        raise ModelError(
            f"{where}.name: {spec.name!r} is not a question-answering model; use hf or hf_student"
        )
    return encoder.hf_encoder(spec, head="span", num_labels=2, where=where, teacher=teacher)


def check_pair(teacher: nn.Module, student: nn.Module) -> None:
    """Refuse a teacher and student with different tokenizers: their windows would hold
    other tokens, so the teacher's start/end scores would not line up with the student's."""
    mine = getattr(student, "kdistill_tokenizer_key", None)
    theirs = getattr(teacher, "kdistill_tokenizer_key", None)
    if mine != theirs:
        raise ModelError(
            f"student.model: the student's tokenizer ({mine}) is not the teacher's ({theirs}); "
            "question answering distils start/end scores token by token, so both must read "
            "the same windows. Build the student from the teacher (hf_student with location: "
            "teacher), or give it the teacher's tokenizer (student.model.tokenizer)"
        )


def _describe(data: QAData) -> str:
    transfer = (
        f"; distill adds {len(data.transfer)} unlabelled pairs ({data.transfer_source})"
        if data.transfer
        else ""
    )
    return (
        f"data: {len(data.train)} train, {len(data.val)} val, {len(data.test)} test questions "
        f"(articles {_range(data.articles('train'))} / {_range(data.articles('val'))} / "
        f"{_range(data.articles('test'))} of {data.source}){transfer}"
    )


def _range(articles: list[int]) -> str:
    return f"{articles[0]}-{articles[-1]}" if articles else "none"


def _content(data: QAData) -> list[str]:
    section = data.section
    settings = f"{section.max_length}/{section.doc_stride}/{section.max_question_length}"
    return [settings, *(f"{q.id}\x1f{q.question}\x1f{q.context}" for q in data.train)]


def _signal(teacher: nn.Module, data: QAData, *, batch_size: int, device: Any):
    return window_scores(teacher, data, "train", batch_size=batch_size, device=device)


def _signal_stand_in(data: QAData, teacher: nn.Module) -> list[torch.Tensor]:
    return [torch.zeros(len(ids), 2) for ids in data.windows(teacher, "train").ids]


def _predict(model: nn.Module, data: QAData, split: str, *, batch_size: int, device: Any):
    settings = TrainConfig(eval_batch_size=batch_size)
    return predict_spans(model, data, split, settings=settings, device=device)


def _score(data: QAData, split: str, answers: dict[str, str], teacher: Any = None):
    return squad_scores(data, split, answers, teacher)


def _inputs(data: QAData, model: nn.Module, split: str, rows: torch.Tensor):
    return data.windows(model, split).batch(rows)


def _lengths(data: QAData, model: nn.Module, split: str) -> torch.Tensor:
    return data.windows(model, split).lengths


def _requests(data: QAData, model: nn.Module, split: str) -> list[torch.Tensor]:
    """Each question's windows, in question order: what answering one question runs."""
    question = data.windows(model, split).question
    order = torch.argsort(question, stable=True)
    counts = torch.bincount(question, minlength=len(data.split(split))).tolist()
    return [rows for rows in torch.split(order, counts) if len(rows)]


def _from_raw(data: QAData, model: nn.Module, split: str, raw: list[torch.Tensor]):
    return decode(data, split, data.windows(model, split), raw)


def _summary(evaluation: dict[str, Any]) -> str:
    test = evaluation.get("test", {})
    return (
        f"test EM {100 * test.get('exact', float('nan')):.2f}, "
        f"F1 {100 * test.get('f1', float('nan')):.2f}"
    )


TASK = encoder.EncoderTask(
    name="question_answering",
    data_section=QADataConfig,
    load=load_qa,
    describe=_describe,
    make_model=make_reader,
    steps=SpanSteps,
    signal=_signal,
    signal_stand_in=_signal_stand_in,
    content=_content,
    predict=_predict,
    score=_score,
    inputs=_inputs,
    lengths=_lengths,
    from_raw=_from_raw,
    agreement="answer",
    reading="start and end scores per token; the answer is the paragraph span with the "
    "best start + end score",
    latency_rows=8,  # windows of a full max_length are heavy: 8 timed alone and at once
    requests=_requests,
    summary=_summary,
    write_report=write_report,
    check_pair=check_pair,
    distill_data=QAData.for_distill,
)

run = partial(encoder.run, TASK)
evaluate_checkpoint = partial(encoder.evaluate_checkpoint, TASK)
inspect_recipe = partial(encoder.inspect_recipe, TASK)
cache_teacher = partial(encoder.cache_teacher, TASK)
check_recipe = partial(encoder.check_recipe, TASK)
export_reader = partial(export_encoder, TASK)
plan_stages = partial(encoder_plan.encoder_stages, TASK)
