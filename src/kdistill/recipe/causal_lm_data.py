"""The causal-LM recipe's data section: a corpus (packed into rows of seq_len tokens) or
prompt/completion pairs, and the tokenizer (a byte-level BPE trained on the training
text, or one loaded)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator

from kdistill.recipe.common import (
    Strict,
)


class TokenizerConfig(Strict):
    """Train a byte-level BPE on the training text (`vocab_size`), or load one (`path`)."""

    vocab_size: int | None = Field(
        None, ge=258, le=1 << 20, description="train a byte-level BPE with this vocabulary"
    )
    min_frequency: int = Field(2, ge=1, description="BPE: merges seen fewer times are dropped")
    path: str | None = Field(
        None,
        description="a tokenizer.json, a folder holding one, or a Hugging Face tokenizer "
        "folder / cached hub id",
    )

    @model_validator(mode="after")
    def _one_source(self) -> TokenizerConfig:
        if (self.vocab_size is None) == (self.path is None):
            raise ValueError(
                "give exactly one of vocab_size (train a byte-level BPE on the training "
                "text) and path (load a tokenizer)"
            )
        return self


class PairsConfig(Strict):
    """Prompt/completion pairs from JSON Lines files, one object per line. Each pair is
    one training row: prompt + completion + end-of-text (when the tokenizer has
    <|endoftext|>), padded to data.seq_len; only the completion tokens count."""

    train: str = Field(
        description="the training pairs (.jsonl); relative paths resolve against the current "
        "folder, then the data folder"
    )
    val: str | None = Field(
        None,
        description="the validation pairs (.jsonl); default: data.val_fraction of the "
        "training pairs, drawn at random with split_seed",
    )
    prompt_field: str = Field("prompt", description="the field of each line holding the prompt")
    completion_field: str = Field(
        "completion", description="the field of each line holding the completion"
    )
    truncate_prompt: Literal["error", "left"] = Field(
        "error",
        description="error: a prompt longer than data.seq_len refuses the file (naming the "
        "lines), and a completion that does not fit after its prompt is cut at the end; left: "
        "a pair too long loses its prompt's oldest tokens first (one is kept)",
    )
    split_seed: int = Field(0, description="seeds which pairs validate when val is not given")


class LMDataConfig(Strict):
    corpus: Annotated[list[str], Field(min_length=1)] | None = Field(
        None,
        description="text or .jsonl files; relative paths resolve against the current "
        "folder, then the data folder (--data-dir, else $KDISTILL_DATA)",
    )
    pairs: PairsConfig | None = Field(
        None, description="prompt/completion pairs instead of a corpus (only completions count)"
    )
    text_field: str = Field("text", description="corpus .jsonl files: the field holding the text")
    val_fraction: float = Field(
        0.1,
        gt=0.0,
        lt=1.0,
        description="corpus: the last fraction of the characters validates; pairs without a "
        "val file: this fraction of the pairs, drawn at random",
    )
    seq_len: int = Field(128, ge=2, le=1 << 16, description="tokens per training sequence")
    tokenizer: TokenizerConfig
    limit_chars: int | None = Field(
        None, gt=0, description="use only the first N characters of the corpus (quick runs)"
    )

    @field_validator("corpus", mode="before")
    @classmethod
    def _one_file(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @model_validator(mode="after")
    def _one_source(self) -> LMDataConfig:
        if (self.corpus is None) == (self.pairs is None):
            given = "both" if self.corpus is not None else "neither"
            raise ValueError(
                f"give exactly one of corpus (text to pack into sequences) and pairs "
                f"(prompt/completion pairs, e.g. pairs: {{train: pairs.jsonl}}); {given} given"
            )
        if self.pairs is not None:
            unused = sorted({"text_field", "limit_chars"} & self.model_fields_set)
            if self.pairs.val is not None and "val_fraction" in self.model_fields_set:
                unused.append("val_fraction")
            if unused:
                raise ValueError(
                    f"{' and '.join(unused)} {'has' if len(unused) == 1 else 'have'} no effect "
                    "with pairs (text_field and limit_chars are for corpus; val_fraction "
                    "splits the training pairs only when pairs.val is not given); remove "
                    f"{'it' if len(unused) == 1 else 'them'}"
                )
        return self
