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
