"""The token-classification recipe (`task: token_classification`): a label per word,
named-entity recognition on CoNLL-format files being the common case.

The data are sentences of words with one IOB2 tag each. The teacher and the student
each tokenize the words their own way; a word's label, and the teacher's signal for
it, sit on the word's first subword, so the losses compare one distribution per word
and two models with different tokenizers still line up word by word.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from kdistill.recipe.common import Strict
from kdistill.recipe.encoder import EncoderRecipe

TaggingStage = Literal["teacher", "baseline", "distill"]
TAGGER_ZOO = ("hf", "hf_student", "bilstm")


class TaggingFiles(Strict):
    train: str = "train.txt"
    val: str | None = Field("valid.txt", description="null: no validation split")
    test: str = "test.txt"


class TaggingAugmentConfig(Strict):
    """New sentences made from the training sentences, for the teacher to tag: mention
    replacement (Dai & Adel 2020) and Tang et al.'s (2019) masking and same-kind word
    replacement (kdistill.tasks.token_classification.augment)."""

    copies: int = Field(4, ge=1, le=100, description="rounds over the training sentences")
    p_mention: float = Field(
        0.5, ge=0, le=1, description="an entity replaced by another of its type from train"
    )
    p_mask: float = Field(0.1, ge=0, le=1, description="a word outside entities -> [MASK]")
    p_word: float = Field(
        0.1, ge=0, le=1, description="a word outside entities -> a word of the same kind"
    )
    max_total: int | None = Field(None, ge=1, description="at most this many sentences in all")
    seed: int = 0

    @model_validator(mode="after")
    def _check(self) -> TaggingAugmentConfig:
        if self.p_mask + self.p_word > 1:
            raise ValueError(
                f"p_mask + p_word is {self.p_mask + self.p_word:g}: the two rules exclude each "
                "other, so together they must be at most 1"
            )
        return self


class TaggingTransferConfig(Strict):
    """Untagged sentences for the distill stage, tagged by the teacher: the student
    learns its word distributions there, with no label term (baseline never sees them)."""

    file: str | None = Field(
        None,
        description="a text file, one sentence a line, words separated by spaces (a "
        "relative path resolves against the data folder)",
    )
    augment: TaggingAugmentConfig | None = None

    @model_validator(mode="after")
    def _check(self) -> TaggingTransferConfig:
        if self.file is None and self.augment is None:
            raise ValueError(
                "data.transfer adds sentences for the distill stage: give a file, an augment "
                "section (e.g. augment: {copies: 4}), or both"
            )
        return self


class TaggingDataConfig(Strict):
    source: Literal["conll2003", "conll"] = Field(
        "conll2003",
        description="conll2003: the English CoNLL-2003 files under the data folder "
        "(conll2003/train.txt, valid.txt, test.txt); conll: your own CoNLL-format folder",
    )
    path: str | None = Field(
        None, description="the folder of the files (conll: required; conll2003: optional)"
    )
    files: TaggingFiles = Field(default_factory=TaggingFiles)
    tag_column: int = Field(-1, description="the column of the tag (-1: the last)")
    max_length: int = Field(
        256, ge=8, le=4096, description="subword tokens per sentence, special tokens included"
    )
    limit_train: int | None = Field(None, ge=1, description="the first N training sentences")
    limit_val: int | None = Field(None, ge=1)
    limit_test: int | None = Field(None, ge=1)
    transfer: TaggingTransferConfig | None = Field(
        None, description="more sentences for the distill stage, tagged by the teacher"
    )

    @model_validator(mode="after")
    def _check(self) -> TaggingDataConfig:
        if self.source == "conll" and self.path is None:
            raise ValueError(
                "data.source conll reads your own CoNLL-format folder: set data.path to it"
            )
        return self


class TaggingRecipe(EncoderRecipe):
    ZOO = TAGGER_ZOO
    KIND = "token-classification"
    COMPARES = "token classification compares one label distribution per word"

    task: Literal["token_classification"] = Field(
        description="the task (kdistill.tasks.TASKS); this schema's is token_classification"
    )
    data: TaggingDataConfig = Field(default_factory=TaggingDataConfig)
    stages: list[TaggingStage] = Field(default=["teacher", "baseline", "distill"])
