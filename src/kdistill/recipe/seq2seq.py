"""The sequence-to-sequence recipe (`task: seq2seq`): translation between two languages
with a Hugging Face encoder-decoder (`AutoModelForSeq2SeqLM`: Marian, BART, T5, ...).

    data       parallel text: per split a file pair `<split>.<source_lang>[.gz]` and
               `<split>.<target_lang>[.gz]` in data.path, a TSV or JSON Lines file of
               pairs, or a Hugging Face dataset saved to disk; the tokenizer
    teacher    a model from a config, a save_pretrained folder, or teacher.checkpoint
    student    the same, or `shrink`: the teacher's layers chosen by index (DistilBART's
               "shrink and fine-tune"), copied or drawn anew (`init: random`)
    objective  cross_entropy and one token-level divergence (as causal_lm's), on the
               decoder's positions with teacher forcing
    seqkd      how the teacher translates the training sources for the seqkd stages
    evaluation how BLEU and chrF are measured (greedy and beam)

Stages: teacher; baseline (the student on the references); distill (word-level KD);
seqkd (sequence-level KD: the student on the teacher's beam translations, Kim & Rush
2016); seqkd_distill (both: the teacher's translations and word-level KD).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from kdistill.recipe.causal_lm import LMLossTerm, LMRecipe, LMTeacherConfig, LMTrainConfig
from kdistill.recipe.common import (
    OutputConfig,
    RecipeBase,
    Seeds,
    Strict,
    raise_all,
)

Seq2SeqStage = Literal["teacher", "baseline", "distill", "seqkd", "seqkd_distill"]
TEACHER_TRANSLATION_STAGES = ("seqkd", "seqkd_distill")
WORD_KD_STAGES = ("distill", "seqkd_distill")


class Seq2SeqTokenizerConfig(Strict):
    """Train a subword tokenizer on the training side of the corpus, or load one."""

    kind: Literal["unigram", "bpe"] = Field(
        "unigram",
        description="unigram: SentencePiece's unigram model; bpe: byte-pair merges. The "
        "tokenizers library's unigram trainer breaks ties in hash order, so two trainings on "
        "the same text may differ slightly; bpe's do not (a run trains its tokenizer once and "
        "keeps it in <run>/tokenizer for every stage, seed and resume)",
    )
    vocab_size: int | None = Field(
        None, ge=64, le=1 << 20, description="train a tokenizer with this vocabulary"
    )
    joint: bool = Field(
        True,
        description="true: one vocabulary for both languages (shared embeddings); false: one "
        "per language (the target's is the decoder's)",
    )
    path: str | None = Field(
        None,
        description="load one instead: a tokenizer.json, or a folder holding one (joint), "
        "or a folder with source/ and target/ tokenizer folders",
    )

    @model_validator(mode="after")
    def _one_source(self) -> Seq2SeqTokenizerConfig:
        if (self.vocab_size is None) == (self.path is None):
            raise ValueError(
                "give exactly one of vocab_size (train a tokenizer on the training text) and "
                "path (load one)"
            )
        return self


class Seq2SeqDataConfig(Strict):
    path: str = Field(
        "multi30k",
        description="the folder holding the splits (absolute, or under the data folder)",
    )
    source_lang: str = Field("en", min_length=1)
    target_lang: str = Field("de", min_length=1)
    train: str = Field(
        "train",
        description="a split: the name of a file pair <name>.<lang>[.gz] in data.path, a .tsv "
        "or .jsonl file (source and target per line), or a saved Hugging Face dataset folder",
    )
    val: str | None = "val"
    test: str = "test_2016_flickr"
    source_field: str | None = Field(
        None, description=".jsonl and datasets: the source field (default source_lang)"
    )
    target_field: str | None = Field(
        None, description=".jsonl and datasets: the target field (default target_lang)"
    )
    max_source_length: int = Field(
        128, ge=2, le=4096, description="tokens; longer sources are cut (and counted)"
    )
    max_target_length: int = Field(
        128, ge=2, le=4096, description="tokens with </s>; longer targets are cut (and counted)"
    )
    tokenizer: Seq2SeqTokenizerConfig = Field(
        default_factory=lambda: Seq2SeqTokenizerConfig(vocab_size=8000)
    )
    limit_train: int | None = Field(None, ge=1, description="the first N training pairs")
    limit_val: int | None = Field(None, ge=1)
    limit_test: int | None = Field(None, ge=1)


class ShrinkSpec(Strict):
    """A student made of the teacher's layers chosen by index (DistilBART's "shrink and
    fine-tune"): embeddings, output layer and the chosen layers copied (`init: teacher`),
    or the same shape with new random weights (`init: random`, the control)."""

    encoder_layers: list[int] | None = Field(
        None, min_length=1, description="teacher encoder layers kept, in order (default all)"
    )
    decoder_layers: list[int] | None = Field(
        None, min_length=1, description="teacher decoder layers kept, in order (default all)"
    )
    init: Literal["teacher", "random"] = "teacher"

    @model_validator(mode="after")
    def _check(self) -> ShrinkSpec:
        problems = []
        for side in ("encoder_layers", "decoder_layers"):
            chosen = getattr(self, side)
            if chosen is None:
                continue
            if any(i < 0 for i in chosen):
                problems.append(f"{side}: layer indices count from 0; got {chosen}")
            if len(set(chosen)) != len(chosen):
                problems.append(f"{side}: each layer may be chosen once; got {chosen}")
        if self.encoder_layers is None and self.decoder_layers is None:
            problems.append("choose encoder_layers, decoder_layers or both")
        raise_all(problems)
        return self


class Seq2SeqModelSpec(Strict):
    """A Hugging Face encoder-decoder: built from a `config` (random weights), loaded
    from a `path` (a save_pretrained folder, or a hub id in the local cache), or, for a
    student, `shrink`: the run's teacher with fewer layers."""

    config: dict[str, Any] | None = Field(
        None,
        description="transformers config keys plus `type` (marian, bart, t5, ...); "
        "vocabulary sizes and special token ids come from the tokenizer",
    )
    path: str | None = Field(None, description="a save_pretrained folder or a cached hub id")
    shrink: ShrinkSpec | None = Field(None, description="students: the teacher's layers")

    @model_validator(mode="after")
    def _one_source(self) -> Seq2SeqModelSpec:
        if sum(x is not None for x in (self.config, self.path, self.shrink)) != 1:
            raise ValueError(
                "give exactly one of config ({type: marian, d_model: ..., ...}: a new model), "
                "path (a pretrained model folder) and shrink ({decoder_layers: [0, 2, 5]}: "
                "the run's teacher with fewer layers)"
            )
        if self.config is not None and not isinstance(self.config.get("type"), str):
            raise ValueError("config needs `type`, the transformers model type (marian, t5, ...)")
        return self

    def describe(self) -> str:
        if self.path is not None:
            return self.path
        if self.shrink is not None:
            kept = self.shrink.model_dump(exclude_none=True, exclude={"init"})
            how = "copied" if self.shrink.init == "teacher" else "the shape only, new weights"
            return (
                "the teacher's layers "
                + ", ".join(f"{k}={v}" for k, v in kept.items())
                + (f" ({how})")
            )
        assert self.config is not None
        return ", ".join(f"{k}={v}" for k, v in self.config.items())


class Seq2SeqTeacherConfig(LMTeacherConfig):
    """The causal-LM teacher section (checkpoint, train, precision, signal, cache) with a
    translation model."""

    model: Seq2SeqModelSpec  # type: ignore[assignment]
    signal: Literal["live", "cache"] = Field(
        "live",
        description="the distill stage: live (the teacher runs every step) or cache (its "
        "top-k per target position, written once for the training pairs; seqkd_distill, "
        "whose targets are the teacher's own translations, always runs it live)",
    )


class Seq2SeqStudentConfig(Strict):
    model: Seq2SeqModelSpec


class DecodeConfig(Strict):
    """How a model translates: beam search (num_beams 1: greedy), ended by
    max_new_tokens at the latest."""

    num_beams: int = Field(5, ge=1, le=64)
    length_penalty: float = Field(
        1.0, description="beam scores are divided by length ** length_penalty"
    )
    max_new_tokens: int = Field(
        description="the longest translation, in tokens: decoding always ends here", ge=1, le=4096
    )
    batch_size: int = Field(64, ge=1, description="sentences decoded at once")


class Seq2SeqSeqKDConfig(DecodeConfig):
    """The teacher's translations of every training source (written once per teacher and
    settings, reused by every seed and stage, refused when stale)."""

    mix_references: bool = Field(
        False, description="train on the references too (each source twice: reference, teacher)"
    )
    dir: str | None = Field(None, description="default <run>/seqkd/translations")


class EvaluationConfig(Strict):
    """BLEU and chrF (sacrebleu, detokenized text) on test, greedy and with beam search;
    the validation BLEU (greedy) picks each stage's best epoch."""

    beam: DecodeConfig = Field(
        default_factory=lambda: DecodeConfig(num_beams=5, max_new_tokens=128)
    )
    greedy_max_new_tokens: int = Field(128, ge=1, le=4096)
    val_sentences: int | None = Field(
        None, ge=1, description="validation sentences translated per epoch (default all)"
    )
    samples: int = Field(3, ge=0, le=32, description="test translations shown per model")
    beam_on_best: bool = Field(
        True, description="also measure the best-on-validation checkpoint with beam search"
    )


class Seq2SeqRecipe(RecipeBase):
    task: Literal["seq2seq"] = Field(
        description="the task (kdistill.tasks.TASKS); this schema's is seq2seq"
    )
    data: Seq2SeqDataConfig = Field(default_factory=Seq2SeqDataConfig)
    teacher: Seq2SeqTeacherConfig | None = None
    student: Seq2SeqStudentConfig | None = None
    objective: list[LMLossTerm] = Field(
        default_factory=lambda: [
            LMLossTerm(loss="cross_entropy", weight=0.5),
            LMLossTerm(loss="forward_kl", weight=0.5),
        ],
        description="loss terms of the word-level KD stages (distill, seqkd_distill)",
    )
    seqkd: Seq2SeqSeqKDConfig | None = Field(
        None, description="the seqkd stages: how the teacher translates the training sources"
    )
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)
    train: LMTrainConfig = Field(default_factory=LMTrainConfig)
    stages: list[Seq2SeqStage] = Field(default=["teacher", "baseline", "distill"])
    seeds: Seeds = Field(default_factory=lambda: [0])
    output: OutputConfig = Field(default_factory=OutputConfig)

    STAGES = "teacher, baseline, distill, seqkd, seqkd_distill"

    @model_validator(mode="after")
    def _check(self) -> Seq2SeqRecipe:
        problems: list[str] = []
        stages = set(self.stages)
        needs_teacher = stages & {"teacher", *WORD_KD_STAGES, *TEACHER_TRANSLATION_STAGES}
        shrunk = self.student is not None and self.student.model.shrink is not None
        if (needs_teacher or shrunk) and self.teacher is None:
            problems.append(
                "stages teacher, distill, seqkd and seqkd_distill (and a shrink student) need "
                "a 'teacher' section"
            )
        if stages - {"teacher"} and self.student is None:
            problems.append("the student stages need a 'student' section")
        if stages & set(TEACHER_TRANSLATION_STAGES) and self.seqkd is None:
            problems.append(
                "the seqkd stages need a 'seqkd' section saying how the teacher translates, "
                "at least seqkd: {max_new_tokens: 64}; decoding must have an end"
            )
        divergences = [t for t in self.objective if t.is_divergence]
        if len(divergences) > 1:
            problems.append(
                f"the objective has {len(divergences)} divergence terms; give one (plus, "
                "optionally, cross_entropy)"
            )
        if stages & set(WORD_KD_STAGES) and not divergences:
            problems.append(
                "distill and seqkd_distill are word-level KD: the objective needs a divergence "
                "term (forward_kl, reverse_kl, jsd, skew_kl, skew_reverse_kl, tvd); the seqkd "
                "stage alone trains on the teacher's translations with cross-entropy"
            )
        if self.teacher is not None and self.reads_teacher_cache():
            cache = self.teacher.cache
            if cache.tail_samples >= cache.top_k:
                problems.append(
                    f"teacher.cache.tail_samples ({cache.tail_samples}) must be below "
                    f"teacher.cache.top_k ({cache.top_k})"
                )
            if cache.tail_samples and any(t.loss != "forward_kl" for t in divergences):
                problems.append(
                    "teacher.cache.tail_samples > 0 samples the teacher's tail, which is "
                    "unbiased for forward_kl only; use forward_kl or tail_samples: 0"
                )
        if self.teacher is not None:
            if self.teacher.model.shrink is not None:
                problems.append(
                    "teacher.model.shrink makes a student from the teacher; give the teacher a "
                    "config or a path"
                )
            if (
                "teacher" not in stages
                and not self.teacher.pretrained
                and (needs_teacher or shrunk)
            ):
                problems.append(
                    "the stages need a trained teacher: add 'teacher' to stages, set "
                    "teacher.checkpoint, or give teacher.model.path"
                )
        raise_all(problems)
        return self

    def teacher_train(self) -> LMTrainConfig:
        assert self.teacher is not None
        return self.teacher.train or self.train

    def reads_teacher_cache(self) -> bool:
        return self.teacher is not None and self.teacher.signal == "cache"

    def cache_temperature(self) -> float:
        """The temperature the top-k cache stores the teacher at, as causal_lm's."""
        return LMRecipe.cache_temperature(self)  # type: ignore[arg-type]

    def teacher_cache_settings(self) -> dict[str, Any]:
        return {"temperature": self.cache_temperature()} if self.reads_teacher_cache() else {}

    def divergence(self) -> LMLossTerm | None:
        return next((t for t in self.objective if t.is_divergence), None)

    @property
    def student_from_teacher(self) -> bool:
        return self.student is not None and self.student.model.shrink is not None
