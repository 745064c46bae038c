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

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from kdistill.errors import suggest
from kdistill.losses.table import LM_DIVERGENCES, LM_LOSS_NAMES, LM_LOSS_PARAMS
from kdistill.recipe.causal_lm_data import LMDataConfig, PairsConfig, TokenizerConfig
from kdistill.recipe.causal_lm_generation import (
    GenerationConfig,
    OnPolicyConfig,
    SeqKDConfig,
    SeqKDGeneration,
)
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

LMStage = Literal["teacher", "prune", "baseline", "seqkd", "distill", "quantize"]


# ------------------------------------------------------------------------- models


class LMPruneSpec(Strict):
    """A student that is the run's teacher pruned to these GPT-2 sizes, its most
    important embedding channels, heads, MLP neurons and layers kept (activation
    importance on training sequences: kdistill.compress.prune_lm)."""

    n_layer: int = Field(ge=1, description="layers kept")
    n_embd: int = Field(ge=1, description="embedding channels kept (n_head × the head size)")
    n_head: int = Field(ge=1, description="attention heads kept per layer, whole")
    n_inner: int | None = Field(None, ge=1, description="MLP neurons per layer; 4 × n_embd")
    layers: list[int] | None = Field(
        None, description="which teacher layers to keep; default: by block importance"
    )
    samples: int = Field(64, ge=1, description="training sequences that rank the parts")


class LMQuantizeConfig(Strict):
    """The quantize stage: a trained stage's model as INT8 ONNX (next-token logits),
    measured on the validation split by ONNX Runtime."""

    stage: Literal["distill", "baseline", "seqkd"] = Field(
        "distill", description="the stage whose model is quantized, per seed"
    )
    mode: Literal["dynamic", "dynamic-per-channel", "static"] = "dynamic"


class LMModelSpec(Strict):
    """A Hugging Face causal LM: built from a `config` (random weights), loaded from a
    `path` (a folder written by save_pretrained, or a hub id already in the local cache),
    or, for a student, `prune`d from the run's teacher."""

    config: dict[str, Any] | None = Field(
        None,
        description="transformers config keys plus `type` (the model type, e.g. gpt2); "
        "vocab_size defaults to the tokenizer's size",
    )
    path: str | None = Field(None, description="a save_pretrained folder or a cached hub id")
    prune: LMPruneSpec | None = Field(
        None, description="students: the run's teacher pruned to these sizes (GPT-2)"
    )

    @model_validator(mode="after")
    def _one_source(self) -> LMModelSpec:
        if sum(x is not None for x in (self.config, self.path, self.prune)) != 1:
            raise ValueError(
                "give exactly one of config ({type: gpt2, n_layer: ..., ...}: a new model), "
                "path (a pretrained model folder or hub id) and prune ({n_layer, n_embd, "
                "n_head}: the run's teacher, pruned)"
            )
        if self.config is not None and not isinstance(self.config.get("type"), str):
            raise ValueError(
                "config needs `type`, the transformers model type (for example gpt2, llama)"
            )
        return self

    def describe(self) -> str:
        if self.path is not None:
            return self.path
        if self.prune is not None:
            sizes = self.prune.model_dump(exclude_none=True, exclude={"samples"})
            return "the teacher pruned to " + ", ".join(f"{k}={v}" for k, v in sizes.items())
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
    quantize: LMQuantizeConfig = Field(default_factory=LMQuantizeConfig)
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
        pruned = self.student is not None and self.student.model.prune is not None
        if pruned and self.teacher is None:
            problems.append("student.model.prune prunes the run's teacher: add a 'teacher' section")
        if "prune" in stages and not pruned:
            problems.append(
                "the 'prune' stage measures the pruned teacher before training, so the "
                "student must be one: student.model: {prune: {n_layer: 2, n_embd: 128, "
                "n_head: 2}}"
            )
        if "quantize" in stages and self.quantize.stage not in stages:
            problems.append(
                f"the 'quantize' stage quantizes the {self.quantize.stage} stage's model "
                f"(quantize.stage), which is not in stages; add {self.quantize.stage!r} to "
                "stages or set quantize.stage to a listed one"
            )
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
        if teacher.model.prune is not None:
            problems.append(
                "teacher.model.prune: pruning makes a student from the teacher; give the "
                "teacher a config or a path"
            )
        pruned = self.student is not None and self.student.model.prune is not None
        needing = ("seqkd", "distill", "baseline", "prune") if pruned else ("seqkd", "distill")
        for stage in needing:
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

    def reads_teacher_cache(self) -> bool:
        return self.teacher is not None and self.teacher.signal == "cache"

    def cache_temperature(self) -> float:
        """The temperature the top-k cache stores the teacher at: the divergence term's
        (its schedule's start), else 1."""
        term = self.divergence()
        temperature = term.temperature if term is not None and term.temperature is not None else 1.0
        return float(temperature if isinstance(temperature, (int, float)) else temperature.start)

    def teacher_cache_settings(self) -> dict[str, Any]:
        return {"temperature": self.cache_temperature()}

    def teacher_train(self) -> LMTrainConfig:
        assert self.teacher is not None
        return self.teacher.train or self.train

    def divergence(self) -> LMLossTerm | None:
        return next((t for t in self.objective if t.is_divergence), None)


__all__ = [
    "CacheConfig",
    "GenerationConfig",
    "LMDataConfig",
    "LMLossTerm",
    "LMModelSpec",
    "LMRecipe",
    "LMStage",
    "LMStudentConfig",
    "LMTeacherConfig",
    "LMTrainConfig",
    "OnPolicyConfig",
    "PairsConfig",
    "SamplesConfig",
    "SeqKDConfig",
    "SeqKDGeneration",
    "TokenizerConfig",
]
