"""The language-model recipe (`task: causal_lm`): the causal_lm task's sections.

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

Instead of `corpus`, prompt/completion pairs (exactly one of the two):

    data:
      pairs:
        train: qa_train.jsonl               # {"prompt": ..., "completion": ...} per line
        val: qa_val.jsonl                   # optional; default: val_fraction of the training
        split_seed: 0                       #   pairs, drawn at random with this seed
        prompt_field: prompt
        completion_field: completion
        truncate_prompt: error              # error | left: cut a long pair's prompt at its start
      seq_len: 128                          # one pair per row, padded
      tokenizer: {vocab_size: 2048}         # trained on prompt + completion of training pairs

A row is prompt + completion + <|endoftext|> (when the tokenizer has that token).
A prompt longer than seq_len is refused (its line named) and a completion that does
not fit is cut at the end; with `truncate_prompt: left` a pair that does not fit
first loses its prompt's oldest tokens (one is kept). Only completion tokens (and the
end-of-text) count: in the losses, the validation loss, the top-k cache's use and bits
per character, whose characters are those of the counted completion text (the
end-of-text adds none). Samples continue validation prompts. With pairs, seqkd needs
`seqkd.prompts` (the pairs file itself serves), and on_policy is refused.

Two more ways to learn from the teacher, each optional:

    stages: [teacher, baseline, seqkd, distill]
    seqkd:                                  # sequence-level KD (Kim & Rush 2016)
      prompts: prompts.jsonl                # {"prompt": ...} per line; default: prefixes
      generation: {max_new_tokens: 64, temperature: 1.0, top_p: 0.95, num_per_prompt: 1}
    on_policy:                              # GKD (Agarwal et al. 2024), in the distill stage
      probability: 0.5                      # λ: the share of steps on the student's own text
      prompt_tokens: 16
      max_new_tokens: 48
      temperature: 1.0

The `seqkd` stage trains the student with cross-entropy on completions the teacher
wrote (prompt tokens do not count); the text is re-tokenized with the student's
tokenizer, so a pretrained teacher may bring its own tokenizer (token-level distill
then cannot run). `on_policy` trains a share λ of the distill stage's steps on
continuations the student samples from the first `prompt_tokens` tokens of each
sequence, scored by the live teacher (`kdistill.tasks.causal_lm.steps`).

The training, output and seed sections are `recipe/common.py`'s; loading, overrides
and error messages are `recipe/load.py`'s, as for every task.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator

from kdistill.errors import suggest
from kdistill.losses.table import LM_DIVERGENCES, LM_LOSS_NAMES, LM_LOSS_PARAMS
from kdistill.recipe.common import (
    OutputConfig,
    Precision,
    RecipeBase,
    Seeds,
    Strict,
    TrainConfig,
    raise_all,
)
from kdistill.schedules import ScheduleOrNumber, as_schedule

LMStage = Literal["teacher", "baseline", "seqkd", "distill"]


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
    divided by T; no T² factor), token by token, in chunks (`kdistill.losses.lm_chunked`).
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
        if isinstance(value, str) and value not in LM_LOSS_NAMES:
            raise ValueError(
                f"unknown loss {value!r}{suggest(value, LM_LOSS_NAMES)}; "
                f"language-model losses: {', '.join(LM_LOSS_NAMES)}"
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
        allowed = LM_LOSS_PARAMS.get(self.loss, ())
        for name, value in self.params.items():
            if name not in allowed:
                takes = ", ".join(allowed) if allowed else "no parameters"
                problems.append(
                    f"{self.loss!r} has no parameter {name!r}{suggest(name, allowed)}; "
                    f"it takes {takes}"
                )
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


# --------------------------------------------------------------------- generation


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


# ----------------------------------------------------------------------- training


class LMTrainConfig(TrainConfig):
    """The classifier's training settings, counted in sequences, plus LM-only ones."""

    batch_size: int = Field(32, ge=1, description="sequences per optimizer step, all processes")
    eval_batch_size: int = Field(32, ge=1, description="sequences per validation batch")
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
    tail_samples: int = Field(
        0,
        ge=0,
        description="0: the top_k most likely tokens, the rest one tail bucket; m > 0: the "
        "top_k − m most likely, plus m tokens sampled from the rest of the teacher's "
        "distribution (an unbiased estimate of its tail, for forward_kl; the Shakespeare "
        "recipe's student matched the live teacher with 32 of 64, BENCHMARKS.md)",
    )
    encoding: Literal["exact", "compact"] = Field(
        "exact",
        description="exact: float16 log-probs (516 bytes/token at top_k 128); compact: "
        "bit-packed ids, most log-probs as 8-bit knots (300 bytes/token at top_k 128 over "
        "50,257 tokens; moves ~0.5% of the probability); see kdistill.cache.codec",
    )
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


class LMRecipe(RecipeBase):
    task: Literal["causal_lm"]
    data: LMDataConfig
    teacher: LMTeacherConfig | None = None
    student: LMStudentConfig | None = None
    objective: list[LMLossTerm] = Field(
        default_factory=lambda: [LMLossTerm(loss="forward_kl")],
        description="loss terms of the distill stage",
    )
    on_policy: OnPolicyConfig | None = Field(
        None, description="distill stage: train part of the steps on the student's own text"
    )
    seqkd: SeqKDConfig | None = Field(
        None, description="the seqkd stage: prompts and how the teacher writes completions"
    )
    train: LMTrainConfig = Field(default_factory=LMTrainConfig)
    stages: list[LMStage] = Field(default=["teacher", "baseline", "distill"])
    seeds: Seeds = Field(default_factory=lambda: [0])
    samples: SamplesConfig = Field(default_factory=SamplesConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)

    STAGES = "teacher, baseline, seqkd, distill"

    @model_validator(mode="after")
    def _check(self) -> LMRecipe:
        raise_all(
            self._stage_problems()
            + self._objective_problems()
            + self._cache_problems()
            + self._length_problems()
            + self._teacher_problems()
        )
        return self

    def _stage_problems(self) -> list[str]:
        problems: list[str] = []
        stages = set(self.stages)
        if stages & {"teacher", "seqkd", "distill"} and self.teacher is None:
            problems.append("stages 'teacher', 'seqkd' and 'distill' need a 'teacher' section")
        if stages & {"baseline", "seqkd", "distill"} and self.student is None:
            problems.append("stages 'baseline', 'seqkd' and 'distill' need a 'student' section")
        if "seqkd" in stages and self.seqkd is None:
            problems.append(
                "the seqkd stage needs a 'seqkd' section saying how the teacher writes, at "
                "least seqkd: {generation: {max_new_tokens: 64}}"
            )
        return problems

    def _objective_problems(self) -> list[str]:
        problems: list[str] = []
        divergences = [t for t in self.objective if t.is_divergence]
        if len(divergences) > 1:
            problems.append(
                f"the objective has {len(divergences)} divergence terms "
                f"({', '.join(t.loss for t in divergences)}); give one divergence (plus, "
                "optionally, cross_entropy)"
            )
        if sum(t.loss == "cross_entropy" for t in self.objective) > 1:
            problems.append("the objective lists cross_entropy twice; give it once")
        if "distill" in self.stages and not divergences:
            problems.append(
                "the distill stage's objective has no divergence term, so it would not read "
                f"the teacher; add one of {', '.join(LM_DIVERGENCES)}"
            )
        return problems

    def _cache_problems(self) -> list[str]:
        problems: list[str] = []
        teacher = self.teacher
        if teacher is None:
            return problems
        if teacher.cache.tail_samples >= teacher.cache.top_k:
            problems.append(
                f"teacher.cache.tail_samples ({teacher.cache.tail_samples}) must be below "
                f"teacher.cache.top_k ({teacher.cache.top_k}): the entries are the top_k − "
                "tail_samples most likely tokens plus tail_samples drawn from the rest"
            )
        divergences = [t for t in self.objective if t.is_divergence]
        unbiased = ("forward_kl",)
        sampled = teacher.signal == "cache" and teacher.cache.tail_samples
        if sampled and any(t.loss not in unbiased for t in divergences):
            problems.append(
                f"teacher.cache.tail_samples > 0 estimates the teacher's tail by sampling, "
                f"which is unbiased for forward_kl only (its gradient is linear in the "
                f"teacher's probabilities); the objective uses {divergences[0].loss}. Use "
                "forward_kl, or tail_samples: 0 (the top-k with one tail bucket)"
            )
        return problems

    def _length_problems(self) -> list[str]:
        """Prompts, samples and on-policy continuations must fit the trained context."""
        problems: list[str] = []
        seq_len = self.data.seq_len
        if self.samples.count and self.samples.prompt_tokens >= seq_len:
            problems.append(
                f"samples.prompt_tokens ({self.samples.prompt_tokens}) must be shorter than "
                f"data.seq_len ({seq_len}), the context the models are trained on"
            )
        seqkd = self.seqkd
        if seqkd is not None and seqkd.prompts is None and seqkd.prefix_tokens >= seq_len:
            problems.append(
                f"seqkd.prefix_tokens ({seqkd.prefix_tokens}) must be shorter than data.seq_len "
                f"({seq_len}): each prompt is the start of a training sequence"
            )
        pairs = self.data.pairs
        if pairs is not None and seqkd is not None and seqkd.prompts is None:
            problems.append(
                "with data.pairs, seqkd needs seqkd.prompts: its default prompts are the "
                "first tokens of packed corpus sequences, which pair rows are not. To have the "
                f"teacher answer the training prompts, set seqkd.prompts: {pairs.train} and "
                f"seqkd.prompt_field: {pairs.prompt_field}"
            )
        if pairs is not None and self.on_policy is not None:
            problems.append(
                "on_policy does not work with data.pairs yet: it continues the first "
                "on_policy.prompt_tokens tokens of each training row, which in a pair row may "
                "run past the prompt into the completion or the padding. Remove on_policy, or "
                "train on a corpus (data.corpus)"
            )
        on_policy = self.on_policy
        if on_policy is not None and on_policy.prompt_tokens + on_policy.max_new_tokens > seq_len:
            problems.append(
                f"on_policy.prompt_tokens + on_policy.max_new_tokens = "
                f"{on_policy.prompt_tokens + on_policy.max_new_tokens} is more than "
                f"data.seq_len ({seq_len}), the context the student trains on; lower one of them"
            )
        return problems

    def _teacher_problems(self) -> list[str]:
        problems: list[str] = []
        teacher, stages = self.teacher, set(self.stages)
        if teacher is None:
            return problems
        for stage in ("seqkd", "distill"):
            if stage in stages and "teacher" not in stages and not teacher.pretrained:
                problems.append(
                    f"the {stage} stage needs a trained teacher: add 'teacher' to stages, "
                    "set teacher.checkpoint, or give teacher.model.path"
                )
        on_policy = self.on_policy
        if teacher.signal == "cache" and on_policy is not None and on_policy.probability > 0:
            problems.append(
                "on_policy needs teacher.signal: live. A cache holds the teacher's "
                "outputs on the training sequences only, so it cannot score the tokens "
                "the student writes; use signal: live or remove on_policy"
            )
        if teacher.train is not None and teacher.train.precision != self.train.precision:
            problems.append(
                f"teacher.train.precision ({teacher.train.precision}) differs from "
                f"train.precision ({self.train.precision}); one run trains in one "
                "precision. Use teacher.precision for the frozen teacher's dtype"
            )
        divergence = self.divergence()
        if teacher.signal == "cache" and divergence is not None:
            temperature = as_schedule(divergence.temperature or 1.0)
            if temperature.kind != "constant" or temperature.warmup:
                problems.append(
                    "teacher.signal is cache, which stores the teacher's log-probabilities "
                    "at one temperature, but the divergence's temperature is a schedule; "
                    "give a constant temperature or use signal: live"
                )
        return problems

    def teacher_train(self) -> LMTrainConfig:
        assert self.teacher is not None
        return self.teacher.train or self.train

    def divergence(self) -> LMLossTerm | None:
        return next((t for t in self.objective if t.is_divergence), None)
