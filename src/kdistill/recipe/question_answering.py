"""The extractive question-answering recipe (`task: question_answering`): SQuAD-format
questions over paragraphs, answered by a span of the paragraph.

Long paragraphs are read in windows of `max_length` tokens that overlap by
`doc_stride`; the model scores every token as the answer's start and as its end. The
teacher and the student must share a tokenizer (their windows, and so their scores,
line up token by token); a student built from the teacher's layers does.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from kdistill.recipe.common import Strict, raise_all
from kdistill.recipe.encoder import EncoderRecipe

QAStage = Literal["teacher", "baseline", "distill"]
QA_ZOO = ("hf", "hf_student")


class ArticleRange(Strict):
    """Articles `start` to `end` of the file, both included, counted from 0."""

    start: int = Field(ge=0)
    end: int = Field(ge=0)

    @model_validator(mode="after")
    def _order(self) -> ArticleRange:
        if self.end < self.start:
            raise ValueError(f"end ({self.end}) is before start ({self.start})")
        return self


class QATransferConfig(Strict):
    """Unlabelled question-paragraph pairs for the distill stage, answered by the teacher:
    the student learns its start and end distributions there, with no span term (the
    baseline never sees them). SQuAD's train file is not always at hand; the training
    articles' own questions asked of their other paragraphs are (the teacher still
    points at the span that reads most like an answer), and so are users' own
    questions."""

    other_paragraphs: int = Field(
        0,
        ge=0,
        description="each training question also asked of this many other paragraphs of "
        "its article (chosen at random, never its own; fewer when the article has fewer)",
    )
    file: str | None = Field(
        None,
        description="a SQuAD-format JSON file whose questions join unlabelled (answers, if "
        "any, are ignored; a relative path resolves against the data folder)",
    )
    seed: int = Field(0, description="the random choice of paragraphs")

    @model_validator(mode="after")
    def _check(self) -> QATransferConfig:
        if self.other_paragraphs == 0 and self.file is None:
            raise ValueError(
                "data.transfer adds question-paragraph pairs for the distill stage: give "
                "other_paragraphs (e.g. other_paragraphs: 1), a file, or both"
            )
        return self


class QADataConfig(Strict):
    source: Literal["squad"] = "squad"
    path: str = Field(
        "squad/dev-v1.1.json",
        description="a SQuAD-format JSON file (absolute, or under the data folder)",
    )
    train: ArticleRange = Field(default_factory=lambda: ArticleRange(start=0, end=35))
    val: ArticleRange | None = Field(default_factory=lambda: ArticleRange(start=36, end=39))
    test: ArticleRange = Field(default_factory=lambda: ArticleRange(start=40, end=47))
    max_length: int = Field(256, ge=32, le=4096, description="tokens per window")
    doc_stride: int = Field(
        96, ge=1, description="tokens two windows of one paragraph share (must be < window)"
    )
    max_question_length: int = Field(64, ge=4)
    max_answer_length: int = Field(30, ge=1, description="tokens, in decoding")
    n_best: int = Field(20, ge=1, description="start and end candidates per window, decoding")
    limit_train: int | None = Field(None, ge=1, description="the first N training questions")
    limit_val: int | None = Field(None, ge=1)
    limit_test: int | None = Field(None, ge=1)
    transfer: QATransferConfig | None = Field(
        None,
        description="more question-paragraph pairs for the distill stage, answered by the teacher",
    )

    @model_validator(mode="after")
    def _check(self) -> QADataConfig:
        problems = []
        ranges = {"train": self.train, "val": self.val, "test": self.test}
        named = [(k, r) for k, r in ranges.items() if r is not None]
        for i, (a, ra) in enumerate(named):
            for b, rb in named[i + 1 :]:
                if ra.start <= rb.end and rb.start <= ra.end:
                    problems.append(
                        f"{a} articles {ra.start}-{ra.end} and {b} articles {rb.start}-{rb.end} "
                        "overlap; a question's article must be on one side only"
                    )
        if self.max_question_length >= self.max_length - 8:
            problems.append(
                f"max_question_length ({self.max_question_length}) leaves no room for the "
                f"paragraph in a window of {self.max_length} tokens"
            )
        raise_all(problems)
        return self


class QARecipe(EncoderRecipe):
    ZOO = QA_ZOO
    KIND = "question-answering"
    COMPARES = "question answering compares the start and end distributions"
    FEATURES = True  # teacher and student share the windows, token for token

    task: Literal["question_answering"] = Field(
        description="the task (kdistill.tasks.TASKS); this schema's is question_answering"
    )
    data: QADataConfig = Field(default_factory=QADataConfig)
    stages: list[QAStage] = Field(default=["teacher", "baseline", "distill"])

    def task_problems(self) -> list[str]:
        data = self.data
        if data.doc_stride >= data.max_length:
            return [
                f"data.doc_stride ({data.doc_stride}) must be smaller than "
                f"data.max_length ({data.max_length}): windows overlap by the stride, "
                "so a stride of a whole window never moves forward"
            ]
        room = data.max_length - data.max_question_length - 3  # [CLS] q [SEP] p [SEP]
        if data.doc_stride >= room:
            return [
                f"data.doc_stride ({data.doc_stride}) must be smaller than the paragraph's "
                f"part of a window with the longest question: max_length {data.max_length} "
                f"- max_question_length {data.max_question_length} - 3 special tokens = "
                f"{room}; lower doc_stride or max_question_length, or raise max_length"
            ]
        return []
