"""The language-model recipe (`task: causal_lm`): one typed schema, like the classifier's.

    task: causal_lm
    name: shakespeare_gpt_small_from_gpt
    data:
      corpus: tinyshakespeare/input.txt     # relative: current folder, else the data folder
      val_fraction: 0.1                     # the last 10% of the characters validate
      seq_len: 128
      tokenizer: {vocab_size: 2048}         # train a byte-level BPE on the training text
    teacher:
      model: {config: {type: gpt2, n_layer: 4, n_embd: 256, n_head: 4}}
      train: {epochs: 2}                    # only what differs from `train`
      signal: live                          # live | cache (its top-k, written once)
      cache: {top_k: 64}
    student:
      model: {config: {type: gpt2, n_layer: 2, n_embd: 128, n_head: 2}}
    objective:                              # the distill stage; the baseline: cross-entropy
      - {loss: forward_kl, weight: 1.0, temperature: 1.0}
      - {loss: cross_entropy, weight: 0.5}  # optional
    train: {epochs: 1, batch_size: 16, optimizer: {name: adamw, lr: 0.005}}
    stages: [teacher, baseline, distill]
    seeds: [0, 1, 2]

`load_lm_recipe` reads YAML with `safe_load`, applies `--set` overrides, validates with
pydantic (`extra="forbid"`) and raises one `RecipeError` listing every problem with its
YAML path, the bad value and a "did you mean" for misspelt keys. The value parsing,
overrides and error wording are the classifier recipe's (`kdistill.recipe`).
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, field_validator, model_validator

from kdistill.recipe import (
    OutputConfig,
    Precision,
    ScheduleOrNumber,
    Strict,
    TrainConfig,
    _explain,
    _first_model,
    _format_loc,
    apply_overrides,
    as_schedule,
    read_yaml,
    validate_schema,
)

TASK = "causal_lm"
LMStage = Literal["teacher", "baseline", "distill"]
# recipe name -> `kind` of kdistill.losses.lm.chunked_divergence
DIVERGENCES = {
    "forward_kl": "kl",
    "reverse_kl": "reverse_kl",
    "jsd": "jsd",
    "skew_kl": "skew_kl",
    "skew_reverse_kl": "skew_reverse_kl",
    "tvd": "tvd",
}
LOSS_NAMES = ("cross_entropy", *DIVERGENCES)
# the keyword parameters each divergence takes, all in [0, 1]
LOSS_PARAMS = {
    "jsd": ("beta",),
    "skew_kl": ("alpha",),
    "skew_reverse_kl": ("alpha",),
}


# --------------------------------------------------------------------------- data


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


class LMDataConfig(Strict):
    corpus: Annotated[list[str], Field(min_length=1)] = Field(
        description="text or .jsonl files; relative paths resolve against the current "
        "folder, then the data folder (--data-dir, else $KDISTILL_DATA)"
    )
    text_field: str = Field("text", description=".jsonl files: the field holding the text")
    val_fraction: float = Field(
        0.1, gt=0.0, lt=1.0, description="the last fraction of the characters validates"
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


# ------------------------------------------------------------------------- models


class LMModelSpec(Strict):
    """A Hugging Face causal LM: built from a `config` (random weights), or loaded from a
    `path` (a folder written by save_pretrained, or a hub id already in the local cache)."""

    config: dict[str, Any] | None = Field(
        None,
        description="transformers config keys plus `type` (the model type, e.g. gpt2); "
        "vocab_size defaults to the tokenizer's size",
    )
    path: str | None = Field(None, description="a save_pretrained folder or a cached hub id")

    @model_validator(mode="after")
    def _one_source(self) -> LMModelSpec:
        if (self.config is None) == (self.path is None):
            raise ValueError(
                "give exactly one of config ({type: gpt2, n_layer: ..., ...}: a new model) "
                "and path (a pretrained model folder or hub id)"
            )
        if self.config is not None and not isinstance(self.config.get("type"), str):
            raise ValueError(
                "config needs `type`, the transformers model type (for example gpt2, llama)"
            )
        return self

    def describe(self) -> str:
        if self.path is not None:
            return self.path
        assert self.config is not None
        return ", ".join(f"{k}={v}" for k, v in self.config.items())


# ---------------------------------------------------------------------- objective


class LMLossTerm(Strict):
    """One weighted term of the distill objective.

    cross_entropy: the next-token loss on the corpus. The divergences compare the
    teacher's and the student's next-token distributions at `temperature` (both logits
    divided by T; no T² factor), token by token, in chunks (`kdistill.losses.lm`).
    """

    loss: Literal[
        "cross_entropy", "forward_kl", "reverse_kl", "jsd", "skew_kl", "skew_reverse_kl", "tvd"
    ]
    weight: ScheduleOrNumber = 1.0
    temperature: ScheduleOrNumber | None = Field(
        None, description="divergences: a number or a schedule, > 0 (default 1)"
    )
    params: dict[str, float] = Field(
        default_factory=dict, description="jsd: beta; skew_kl, skew_reverse_kl: alpha; in [0, 1]"
    )

    @field_validator("loss", mode="before")
    @classmethod
    def _known_loss(cls, value: Any) -> Any:
        if isinstance(value, str) and value not in LOSS_NAMES:
            hint = difflib.get_close_matches(value, LOSS_NAMES, n=1)
            maybe = f" (did you mean {hint[0]!r}?)" if hint else ""
            raise ValueError(
                f"unknown loss {value!r}{maybe}; language-model losses: {', '.join(LOSS_NAMES)}"
            )
        return value

    @model_validator(mode="after")
    def _check(self) -> LMLossTerm:
        problems = []
        low, _ = as_schedule(self.weight).bounds()
        if low < 0:
            problems.append(
                f"the weight of {self.loss!r} must stay in [0, inf) over training; it reaches {low}"
            )
        if self.temperature is not None:
            if self.loss == "cross_entropy":
                problems.append(
                    "cross_entropy takes no temperature (it is the model's own next-token "
                    "loss); remove it"
                )
            else:
                low, _ = as_schedule(self.temperature).bounds()
                if low <= 0:
                    problems.append(
                        f"the temperature of {self.loss!r} must stay in (0, inf) over "
                        f"training; it reaches {low}"
                    )
        allowed = LOSS_PARAMS.get(self.loss, ())
        for name, value in self.params.items():
            if name not in allowed:
                hint = difflib.get_close_matches(name, allowed, n=1)
                maybe = f" (did you mean {hint[0]!r}?)" if hint else ""
                takes = ", ".join(allowed) if allowed else "no parameters"
                problems.append(f"{self.loss!r} has no parameter {name!r}{maybe}; it takes {takes}")
            elif not 0 <= value <= 1:
                problems.append(
                    f"the {name!r} parameter of {self.loss!r} must be a float in [0, 1]; got {value}"
                )
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @property
    def is_divergence(self) -> bool:
        return self.loss != "cross_entropy"


# ----------------------------------------------------------------------- training


class LMTrainConfig(TrainConfig):
    """The classifier's training settings, counted in sequences, plus LM-only ones."""

    batch_size: int = Field(32, ge=1, description="sequences per optimizer step, all processes")
    eval_batch_size: int = Field(32, ge=1, description="sequences per validation batch")
    eval_every: int | None = Field(
        None, ge=1, description="also measure validation loss every N optimizer steps"
    )
    chunk_size: int | None = Field(
        None, ge=1, description="tokens per chunk of the loss (default: ~128 MiB of logits)"
    )

    @model_validator(mode="after")
    def _no_augment(self) -> LMTrainConfig:
        if self.augment.random:
            raise ValueError("train.augment (jitter, crop, flip) is for images; remove it")
        return self


class CacheConfig(Strict):
    top_k: int = Field(64, ge=1, description="teacher entries kept per position")
    shard_sequences: int = Field(256, ge=1, description="sequences per shard file")
    dir: str | None = Field(
        None, description="cache folder (default <run>/cache/topk-teacher-seed<k>)"
    )


class LMTeacherConfig(Strict):
    model: LMModelSpec
    checkpoint: str | None = Field(
        None, description="weights from an earlier run (run folder, stage folder or .safetensors)"
    )
    train: LMTrainConfig | None = Field(
        None, description="teacher training settings; keys not given inherit from `train`"
    )
    precision: Precision | None = Field(
        None, description="dtype the frozen teacher runs in during distillation"
    )
    signal: Literal["live", "cache"] = Field(
        "live", description="live: run the teacher every step; cache: its top-k, written once"
    )
    cache: CacheConfig = Field(default_factory=CacheConfig)

    @property
    def pretrained(self) -> bool:
        """Whether the teacher's weights come from elsewhere, so the stage only measures it."""
        return self.checkpoint is not None or self.model.path is not None


class LMStudentConfig(Strict):
    model: LMModelSpec


class SamplesConfig(Strict):
    """Text each model writes from a few validation prompts, for eval.json and the report."""

    count: int = Field(3, ge=0, le=32, description="prompts, evenly spaced in validation")
    prompt_tokens: int = Field(16, ge=1)
    new_tokens: int = Field(48, ge=1, le=4096, description="tokens generated per prompt")
    temperature: float = Field(0.0, ge=0.0, description="0: greedy; > 0: seeded sampling")


class LMRecipe(Strict):
    task: Literal["causal_lm"]
    name: str
    description: str = ""
    data: LMDataConfig
    teacher: LMTeacherConfig | None = None
    student: LMStudentConfig | None = None
    objective: list[LMLossTerm] = Field(
        default_factory=lambda: [LMLossTerm(loss="forward_kl")],
        description="loss terms of the distill stage",
    )
    train: LMTrainConfig = Field(default_factory=LMTrainConfig)
    stages: list[LMStage] = Field(default=["teacher", "baseline", "distill"])
    seeds: Annotated[list[int], Field(min_length=1)] = Field(default_factory=lambda: [0])
    samples: SamplesConfig = Field(default_factory=SamplesConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)

    @field_validator("stages")
    @classmethod
    def _stages_unique(cls, stages: list[str]) -> list[str]:
        if not stages:
            raise ValueError("name at least one stage: teacher, baseline, distill")
        if len(set(stages)) != len(stages):
            raise ValueError(f"each stage may appear once; got {stages}")
        return stages

    @model_validator(mode="after")
    def _check(self) -> LMRecipe:
        stages = set(self.stages)
        if stages & {"teacher", "distill"} and self.teacher is None:
            raise ValueError("stages 'teacher' and 'distill' need a 'teacher' section")
        if stages & {"baseline", "distill"} and self.student is None:
            raise ValueError("stages 'baseline' and 'distill' need a 'student' section")
        divergences = [t for t in self.objective if t.is_divergence]
        if len(divergences) > 1:
            raise ValueError(
                f"the objective has {len(divergences)} divergence terms "
                f"({', '.join(t.loss for t in divergences)}); give one divergence (plus, "
                "optionally, cross_entropy)"
            )
        if sum(t.loss == "cross_entropy" for t in self.objective) > 1:
            raise ValueError("the objective lists cross_entropy twice; give it once")
        if "distill" in stages and not divergences:
            raise ValueError(
                "the distill stage's objective has no divergence term, so it would not read "
                f"the teacher; add one of {', '.join(DIVERGENCES)}"
            )
        if self.samples.count and self.samples.prompt_tokens >= self.data.seq_len:
            raise ValueError(
                f"samples.prompt_tokens ({self.samples.prompt_tokens}) must be shorter than "
                f"data.seq_len ({self.data.seq_len}), the context the models are trained on"
            )
        teacher = self.teacher
        if teacher is not None:
            if "distill" in stages and "teacher" not in stages and not teacher.pretrained:
                raise ValueError(
                    "the distill stage needs a trained teacher: add 'teacher' to stages, set "
                    "teacher.checkpoint, or give teacher.model.path"
                )
            if teacher.train is not None and teacher.train.precision != self.train.precision:
                raise ValueError(
                    f"teacher.train.precision ({teacher.train.precision}) differs from "
                    f"train.precision ({self.train.precision}); one run trains in one "
                    "precision. Use teacher.precision for the frozen teacher's dtype"
                )
            if teacher.signal == "cache" and divergences:
                temperature = as_schedule(divergences[0].temperature or 1.0)
                if temperature.kind != "constant" or temperature.warmup:
                    raise ValueError(
                        "teacher.signal is cache, which stores the teacher's log-probabilities "
                        "at one temperature, but the divergence's temperature is a schedule; "
                        "give a constant temperature or use signal: live"
                    )
        return self

    def teacher_train(self) -> LMTrainConfig:
        assert self.teacher is not None
        return self.teacher.train or self.train

    def divergence(self) -> LMLossTerm | None:
        return next((t for t in self.objective if t.is_divergence), None)


# ----------------------------------------------------------------- loading, errors


def is_lm_recipe(raw: Any) -> bool:
    """Whether parsed YAML is a language-model recipe (top-level `task: causal_lm`)."""
    return isinstance(raw, dict) and raw.get("task") == TASK


def _owner(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The pydantic model of LMRecipe that owns the field at `loc` (for key suggestions)."""
    model: Any = LMRecipe
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part) if hasattr(model, "model_fields") else None
        if field is None:
            return None
        model = _first_model(field.annotation)
        if model is None:
            return None
    return model if hasattr(model, "model_fields") else None


def _explain_lm(error: dict[str, Any]) -> str:
    if error["type"] != "extra_forbidden":
        return _explain(error)
    loc = tuple(error["loc"])
    owner = _owner(loc)
    key = str(loc[-1])
    allowed = sorted(owner.model_fields) if owner else []
    hint = difflib.get_close_matches(key, allowed, n=1)
    message = f"{_format_loc(loc)}: unknown key {key!r}"
    if hint:
        message += f" (did you mean {hint[0]!r}?)"
    if allowed:
        message += f"; allowed here: {', '.join(allowed)}"
    return message


def validate_lm_recipe(raw: Any, *, source: str = "recipe") -> LMRecipe:
    """Validate a plain dict (parsed YAML) into an LMRecipe; collect all errors, raise once."""
    return validate_schema(
        LMRecipe, raw, source=source, explain=_explain_lm, keys="task:, name:, data:"
    )


def load_lm_recipe(path: str | Path, overrides: list[str] | None = None) -> LMRecipe:
    """Read, override and validate a language-model recipe file."""
    raw = apply_overrides(read_yaml(path), overrides or [])
    return validate_lm_recipe(raw, source=str(path))
