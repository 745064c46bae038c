"""Sequence-to-sequence training steps, translation and its scores.

A row is a pair (source, target). A micro-batch is padded to its longest source and
target (`data.batch`); rows come in length buckets (`data.bucketed_order`), so
little of a batch is padding. The decoder reads [start] + target[:-1] and predicts the
target (teacher forcing); the loss of a micro-batch is

    w_ce · Σ CE + w_div · Σ D

summed over its counted target tokens (padding is -100), and `fit` divides it by the
counted tokens of the whole step (all processes), with the token-level objective the
language-model task computes too (`kdistill.losses.lm_objective.step_losses`): no
(B, T, V) float32 logits of either model exist. Word-level KD compares the teacher's
and the student's distributions at every target position, the teacher reading the
same source and target prefix.

Validation: loss per target token, and BLEU of greedy translations of the validation
sources (the score that picks the best epoch; higher is better).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from kdistill.errors import DataError, TrainingError
from kdistill.losses.lm_objective import LMObjective, step_losses
from kdistill.recipe.causal_lm import LMTrainConfig
from kdistill.recipe.seq2seq import DecodeConfig
from kdistill.steps import Placement, StepCount, Validation, autocast_of
from kdistill.tasks.seq2seq.data import IGNORE_INDEX, Pairs, batch, bucketed_order, pad
from kdistill.tasks.seq2seq.models import Seq2SeqLM

SACREBLEU_MISSING = (
    "the seq2seq task scores translations with sacrebleu (BLEU, chrF), which is not "
    "installed: pip install 'kdistill[translate]'"
)


def require_sacrebleu() -> None:
    """Stop with what to install when sacrebleu is missing (before anything trains)."""
    import importlib.util

    if importlib.util.find_spec("sacrebleu") is None:
        raise TrainingError(SACREBLEU_MISSING)


class LiveSeq2SeqTeacher:
    """The teacher run on each micro-batch, without gradients, in its own precision."""

    def __init__(self, model: Seq2SeqLM, *, dtype: torch.dtype = torch.float32) -> None:
        self.model = model.to(dtype).eval().requires_grad_(False)

    def __call__(self, inputs: dict[str, Tensor], rows: Tensor) -> dict[str, Tensor | None]:
        with torch.inference_mode():
            hidden = self.model.hidden(
                inputs["input_ids"],
                inputs["attention_mask"],
                inputs["decoder_input_ids"],
                inputs["decoder_attention_mask"],
            )
        return {
            "teacher_hidden": hidden.clone(),  # read inside the student's autograd graph
            "teacher_head_weight": self.model.head_weight,
            "teacher_head_bias": self.model.head_bias,
        }


class Seq2SeqSteps:
    """`kdistill.steps.TrainSteps` of a seq2seq stage: train on `train` (references, or
    the teacher's translations), validate on `val`."""

    unit = "tokens"
    higher_is_better = True

    def __init__(
        self,
        student: Seq2SeqLM,
        *,
        train: Pairs,
        val: Pairs,
        objective: LMObjective,
        teacher: Any,  # LiveSeq2SeqTeacher or teacher_cache.CachedSeq2SeqTeacher
        settings: LMTrainConfig,
        accelerator: Placement,
        pad_id: int,
        start_id: int,
        vocab_size: int,
        greedy_max_new_tokens: int,
        val_sentences: int | None,
        label: str = "train",
    ) -> None:
        if objective.needs_teacher and teacher is None:
            raise TrainingError(f"{label}: the objective needs a teacher, but none was given")
        self.student, self.objective = student, objective
        self.teacher = teacher if objective.needs_teacher else None
        self.train, self.val, self.settings = train, val, settings
        self.pad_id, self.start_id, self.vocab_size = pad_id, start_id, vocab_size
        self.greedy = DecodeConfig(
            num_beams=1, max_new_tokens=greedy_max_new_tokens, batch_size=settings.eval_batch_size
        )
        self.val_rows = len(val) if val_sentences is None else min(val_sentences, len(val))
        self.device, self.autocast = accelerator.device, autocast_of(accelerator)
        self.num_rows = len(train)
        self.tokens_seen = 0

    def epoch_order(self, generator: torch.Generator, batch_size: int) -> Tensor:
        return bucketed_order(self.train.target_lengths, generator, batch_size)

    def count(self, rows: Tensor, share: Tensor, step: int) -> StepCount:
        lengths = self.train.target_lengths
        return StepCount(total=int(lengths[rows].sum()), local=int(lengths[share].sum()))

    def inputs(self, pairs: Pairs, rows: Tensor) -> dict[str, Tensor]:
        made = batch(pairs, rows, pad_id=self.pad_id, start_id=self.start_id)
        return {k: v.to(self.device, non_blocking=True) for k, v in made.items()}

    def loss(
        self, model: torch.nn.Module, rows: Tensor, *, progress: float
    ) -> tuple[Tensor, dict[str, float]]:
        inputs = self.inputs(self.train, rows)
        labels = inputs.pop("labels")
        signal = None if self.teacher is None else self.teacher(inputs, rows)
        head_loss = functools.partial(
            step_losses,
            labels=labels,
            objective=self.objective,
            progress=progress,
            teacher=signal,
            vocab_size=self.vocab_size,
            chunk_size=self.settings.chunk_size,
        )
        with self.autocast():
            loss, parts = model(**inputs, head_loss=head_loss)
        return loss, parts

    def validate(self, student: torch.nn.Module) -> Validation | None:
        if not len(self.val):
            return None
        assert isinstance(student, Seq2SeqLM)
        loss = token_loss(
            student, self.val, batch_size=self.settings.eval_batch_size, device=self.device,
            pad_id=self.pad_id, start_id=self.start_id, chunk_size=self.settings.chunk_size,
        )  # fmt: skip
        rows = range(self.val_rows)
        out = translate(
            student, [self.val.sources[i] for i in rows], self.greedy, device=self.device
        )
        refs = [self.val.text.targets[i] for i in rows]
        bleu = corpus_scores(out.texts, refs)["bleu"]
        return Validation(bleu, {"val_bleu": bleu, "val_loss": loss})

    def epoch_fields(self, units: int, seconds: float) -> dict[str, Any]:
        return {"tokens": units}

    def describe(self, label: str, epochs: int, record: dict[str, Any]) -> str:
        if record["split"] == "val":
            return f"{label} step {record['step']}: val BLEU {record['val_bleu']:.2f}"
        line = f"{label} epoch {record['epoch']}/{epochs}: train loss/token {record['loss']:.4f}"
        if "val_bleu" in record:
            line += (
                f", val loss/token {record['val_loss']:.4f}, val BLEU (greedy) "
                f"{record['val_bleu']:.2f}"
            )
        return line + f" ({record['seconds']:.0f}s)"

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def token_loss(
    model: Seq2SeqLM,
    pairs: Pairs,
    *,
    batch_size: int,
    device: Any,
    pad_id: int,
    start_id: int,
    chunk_size: int | None = None,
) -> float:
    """Cross-entropy per counted target token (nats), teacher forcing."""
    from kdistill.losses.lm_cross_entropy import chunked_cross_entropy

    was_training = model.training
    model.eval()
    nll, tokens = 0.0, 0
    try:
        with torch.inference_mode():
            for start in range(0, len(pairs), batch_size):
                rows = torch.arange(start, min(start + batch_size, len(pairs)))
                made = {
                    k: v.to(device)
                    for k, v in batch(pairs, rows, pad_id=pad_id, start_id=start_id).items()
                }
                labels = made.pop("labels")
                head = functools.partial(
                    chunked_cross_entropy, labels=labels, chunk_size=chunk_size
                )
                nll += float(model(**made, head_loss=head))
                tokens += int((labels != IGNORE_INDEX).sum())
    finally:
        model.train(was_training)
    return nll / max(tokens, 1)


# ------------------------------------------------------------------------- translation


@dataclass
class Translations:
    """What a model wrote for a list of sources: token ids (ending at </s>, which is not
    kept), the detokenized texts, and how long decoding took."""

    ids: list[list[int]]
    texts: list[str]
    seconds: float
    tokens: int  # tokens written, </s> included
    ended: int  # translations that ended with </s> (the others at max_new_tokens)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else float("nan")


def generation_config(model: Seq2SeqLM, settings: DecodeConfig) -> Any:
    """The decoding settings alone: a fresh GenerationConfig, so nothing a checkpoint
    carries (bad words, a minimum length, n-gram blocking) changes what is measured."""
    from transformers import GenerationConfig

    config = model.hf.config
    return GenerationConfig(
        max_new_tokens=settings.max_new_tokens,
        num_beams=settings.num_beams,
        length_penalty=settings.length_penalty,
        early_stopping=settings.num_beams > 1,
        do_sample=False,
        pad_token_id=config.pad_token_id,
        eos_token_id=config.eos_token_id,
        decoder_start_token_id=config.decoder_start_token_id,
    )


def translate(
    model: Seq2SeqLM,
    sources: Sequence[Tensor],
    settings: DecodeConfig,
    *,
    device: Any,
    on_batch: Any = None,
) -> Translations:
    """Translate `sources` (token ids ending in </s>) with beam search (greedy when
    num_beams is 1), batch by batch in order of length; `on_batch(first, translations)`
    is told of each batch, in source order within it."""
    tokenizers = model.kdistill_tokenizers
    pad_id, eos_id = tokenizers.special("<pad>", "source"), tokenizers.special("</s>")
    config = generation_config(model, settings)
    order = sorted(range(len(sources)), key=lambda i: len(sources[i]))
    ids: list[list[int] | None] = [None] * len(sources)
    written = ended = 0
    was_training = model.training
    model.eval()
    # generate() fills settings a passed config leaves at their defaults from the model's
    # own (a checkpoint's forced end token, say); the model's is replaced meanwhile
    own, model.hf.generation_config = model.hf.generation_config, config
    start = time.perf_counter()
    try:
        with torch.inference_mode():
            for first in range(0, len(order), settings.batch_size):
                chosen = order[first : first + settings.batch_size]
                inputs = pad([sources[i] for i in chosen], pad_id).to(device)
                mask = torch.zeros_like(inputs)
                for row, i in enumerate(chosen):
                    mask[row, : len(sources[i])] = 1
                out = model.hf.generate(
                    input_ids=inputs, attention_mask=mask, generation_config=config
                )
                for row, i in enumerate(chosen):
                    tokens = out[row, 1:].tolist()  # past the decoder's start token
                    if eos_id in tokens:
                        tokens = tokens[: tokens.index(eos_id)]
                        written, ended = written + len(tokens) + 1, ended + 1
                    else:
                        tokens = [t for t in tokens if t != pad_id]
                        written += len(tokens)
                    ids[i] = tokens
                if on_batch is not None:
                    on_batch(chosen, [ids[i] for i in chosen])
    finally:
        model.train(was_training)
        model.hf.generation_config = own
    seconds = time.perf_counter() - start
    done = [t if t is not None else [] for t in ids]
    return Translations(
        done, [tokenizers.decode(t) for t in done], seconds, tokens=written, ended=ended
    )


def corpus_scores(hypotheses: Sequence[str], references: Sequence[str]) -> dict[str, Any]:
    """Corpus BLEU and chrF of detokenized text, as sacrebleu computes them (its default
    13a tokenization, exact-match casing), with their signature strings."""
    try:
        from sacrebleu.metrics import BLEU, CHRF
    except ImportError:
        raise TrainingError(SACREBLEU_MISSING) from None
    if len(hypotheses) != len(references):
        raise DataError(
            f"{len(hypotheses)} translations for {len(references)} references; they must pair up"
        )
    bleu, chrf = BLEU(), CHRF()
    refs = [list(references)]
    return {
        "bleu": float(bleu.corpus_score(list(hypotheses), refs).score),
        "chrf": float(chrf.corpus_score(list(hypotheses), refs).score),
        "bleu_signature": str(bleu.get_signature()),
        "chrf_signature": str(chrf.get_signature()),
    }
