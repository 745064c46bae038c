"""How the causal-LM recipe's models write text: sampling settings, sequence-level KD
(`seqkd`: the teacher's completions, written once) and on-policy distillation
(`on_policy`: the student's own continuations, scored by the teacher)."""

from __future__ import annotations

from typing import Any

from pydantic import Field, field_validator, model_validator

from kdistill.recipe.common import (
    Strict,
)


class GenerationConfig(Strict):
    """How a model writes text: up to `max_new_tokens` tokens, each sampled at `temperature`
    (0: the most likely token) from the `top_k` most likely tokens and the smallest set
    whose probabilities reach `top_p` (both optional)."""

    max_new_tokens: int = Field(
        description="the most tokens written per prompt (required: a sampling model may "
        "never write the end-of-text token, so this is what stops it)",
    )
    temperature: float = Field(1.0, description="0: greedy; > 0: sampled at this temperature")
    top_k: int | None = Field(None, ge=1, description="sample among the k most likely tokens")
    top_p: float | None = Field(
        None,
        gt=0.0,
        le=1.0,
        description="nucleus sampling: the smallest set of tokens whose probabilities sum to "
        "at least top_p",
    )

    @model_validator(mode="before")
    @classmethod
    def _length_given(cls, raw: Any) -> Any:
        if isinstance(raw, dict) and "max_new_tokens" not in raw:
            return {**raw, "max_new_tokens": None}  # so that _required says why it is needed
        return raw

    @field_validator("max_new_tokens", mode="before")
    @classmethod
    def _required(cls, value: Any) -> Any:
        if value is None:
            raise ValueError(
                "max_new_tokens is required: without it generation stops only when the model "
                "writes the end-of-text token, which a sampled model may never do; give the "
                "most tokens to write per prompt, e.g. max_new_tokens: 64"
            )
        return value

    @field_validator("max_new_tokens")
    @classmethod
    def _positive_length(cls, value: int) -> int:
        if value <= 0:
            raise ValueError(
                "max_new_tokens must be a positive integer, the most tokens written per "
                "prompt (0 or less writes nothing)"
            )
        return value

    @field_validator("temperature")
    @classmethod
    def _temperature(cls, value: float) -> float:
        if value < 0:
            raise ValueError(
                "temperature must be a float in [0, inf) (0: greedy, the most likely token; "
                "> 0: sampled)"
            )
        return value


class SeqKDGeneration(GenerationConfig):
    num_per_prompt: int = Field(1, ge=1, le=1024, description="completions sampled per prompt")
    seed: int = Field(0, description="seeds the sampling; the same seed writes the same text")

    @model_validator(mode="after")
    def _copies_differ(self) -> SeqKDGeneration:
        if self.num_per_prompt > 1 and self.temperature == 0:
            raise ValueError(
                f"num_per_prompt is {self.num_per_prompt} but temperature 0 is greedy, so "
                "every completion of a prompt would be the same; set temperature > 0 or "
                "num_per_prompt: 1"
            )
        return self


class SeqKDConfig(Strict):
    """The `seqkd` stage: the teacher writes completions, the student learns them.

    Prompts come from `prompts` (a JSON Lines file, one object per line with a string
    `prompt_field`) or, by default, are the first `prefix_tokens` tokens of
    `num_prompts` training sequences, evenly spaced (all of them by default). The
    completions are written once per run to <run>/seqkd/generations/ (or `dir`) as
    generations.jsonl plus manifest.json, and reused while the teacher, prompts and
    generation settings match; train.eval_batch_size completions are written at a time.
    The student then trains on them with `train`'s settings, cross-entropy on the
    completion tokens only (`kdistill.tasks.causal_lm.seqkd`).
    """

    prompts: str | None = Field(
        None,
        description="a .jsonl prompt file; relative paths resolve against the current "
        "folder, then the data folder. Default: prefixes of the training sequences",
    )
    prompt_field: str = Field("prompt", description="the field of each line holding the prompt")
    prefix_tokens: int = Field(
        16, ge=1, description="default prompts: this many tokens from each training sequence"
    )
    num_prompts: int | None = Field(
        None, ge=1, description="default prompts: from this many training sequences (all)"
    )
    generation: SeqKDGeneration
    dir: str | None = Field(
        None, description="folder of the generations (default <run>/seqkd/generations)"
    )

    @model_validator(mode="after")
    def _one_prompt_source(self) -> SeqKDConfig:
        unused = sorted({"prefix_tokens", "num_prompts"} & self.model_fields_set)
        if self.prompts is not None and unused:
            raise ValueError(
                f"{' and '.join(unused)} choose prompts from the training sequences, which "
                "seqkd.prompts replaces; remove them or remove prompts"
            )
        return self


class OnPolicyConfig(GenerationConfig):
    """GKD's mixed distillation (Agarwal et al. 2024): at each step of the distill stage,
    with `probability` (the paper's λ, TRL's `lmbda`), the student writes `max_new_tokens`
    tokens after the first `prompt_tokens` tokens of each sequence (no gradient), the
    teacher scores that text and the divergence counts the written tokens only. The draw
    depends on the seed and the step alone, so a resumed run draws the same."""

    probability: float = Field(
        0.5, ge=0.0, le=1.0, description="λ: the chance that a step trains on the student's text"
    )
    prompt_tokens: int = Field(
        16, ge=1, description="tokens of each training sequence the student continues"
    )

    @model_validator(mode="before")
    @classmethod
    def _lambda_is_probability(cls, raw: Any) -> Any:
        if isinstance(raw, dict):
            for name in ("lambda", "lmbda", "lambda_"):
                if name in raw:
                    raise ValueError(
                        f"unknown key {name!r}: GKD's λ (the share of on-policy steps) is "
                        f"called probability here; write probability: {raw[name]}"
                    )
        return raw
