"""A recipe's training data as token rows: a corpus read, split by position, tokenized
and packed (`data.corpus`), or prompt/completion pairs, one padded row per pair whose
own labels count the completion only (`data.pairs`).

The tokenizer is trained on the training text (or loaded) once per run and kept in
`<run>/tokenizer/tokenizer.json`, with `trained_on.json` saying from what; a resumed
run and `kdistill cache` load it, so every stage sees the same token ids.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from tokenizers import Tokenizer

from kdistill.checkpoint import atomic_write_json
from kdistill.data.lm_text import (
    IGNORE_INDEX,
    TOKENIZER_FILE,
    count_characters,
    dataset_fingerprint,
    encode_text,
    encode_texts,
    load_tokenizer,
    pack,
    problem_list,
    prompt_completion_rows,
    read_corpus,
    read_pairs,
    save_tokenizer,
    split_corpus,
    tokenizer_fingerprint,
    train_bpe_tokenizer,
)
from kdistill.data.paths import DATA_ENV_VAR, resolve_data_root
from kdistill.errors import DataError
from kdistill.recipe.causal_lm import LMDataConfig, LMModelSpec, PairsConfig
from kdistill.tasks.causal_lm.models import EOS_TOKEN, CausalLM, build_causal_lm

TRAINED_ON = "trained_on.json"


@dataclass
class LMData:
    """Token rows: row i is seq_len + 1 tokens, inputs = row[:-1]. A packed corpus has
    labels = row[1:] and no train_labels / val_labels; prompt/completion pairs bring
    their own (N, seq_len) labels, -100 on prompt and padding, which every consumer
    (training, validation, measuring) must pass on."""

    tokenizer: Tokenizer
    train: torch.Tensor  # (N, seq_len + 1) int64
    val: torch.Tensor  # (M, seq_len + 1) int64
    seq_len: int
    # the bpc denominator: characters the counted val labels decode to (pairs: the
    # completion text, so an end-of-text token counts in the loss but adds no characters)
    val_characters: int
    info: dict[str, Any] = field(default_factory=dict)
    train_labels: torch.Tensor | None = None  # (N, seq_len) int64; None: train[:, 1:]
    val_labels: torch.Tensor | None = None  # (M, seq_len) int64; None: val[:, 1:]

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    @property
    def eos_id(self) -> int | None:
        return self.tokenizer.token_to_id(EOS_TOKEN)

    @property
    def tokenizer_fingerprint(self) -> str:
        return tokenizer_fingerprint(self.tokenizer)

    def build_model(
        self, spec: LMModelSpec, where: str, teacher: CausalLM | None = None
    ) -> CausalLM:
        """The model of `spec` for this data: its vocabulary, sequence length and
        end-of-text id (`kdistill.tasks.causal_lm.models.build_causal_lm`); a pruned
        student is cut from `teacher`, ranked on training rows."""
        calibration = None
        if spec.prune is not None:
            order = torch.randperm(len(self.train), generator=torch.Generator().manual_seed(0))
            calibration = self.train[order[: spec.prune.samples], :-1]
        return build_causal_lm(
            spec,
            vocab_size=self.vocab_size,
            seq_len=self.seq_len,
            eos_id=self.eos_id,
            where=where,
            teacher=teacher,
            calibration=calibration,
        )

    @property
    def fingerprint(self) -> str:
        """Of the training rows and, for pairs, their labels: what a teacher cache was
        computed on (a cache of other pairs, or of the same rows labelled otherwise, is
        refused)."""
        return dataset_fingerprint(
            self.train,
            seq_len=self.seq_len,
            tokenizer_fingerprint=self.tokenizer_fingerprint,
            labels=self.train_labels,
        )

    def prompt_length(self, row: int) -> int | None:
        """Pairs: the prompt tokens at the start of validation row `row` (those before the
        first counted label, which the last prompt token predicts); corpus: None."""
        if self.val_labels is None:
            return None
        counted = (self.val_labels[row] != IGNORE_INDEX).nonzero()
        return int(counted[0]) + 1 if len(counted) else None


def corpus_paths(cfg: LMDataConfig, data_dir: str | Path | None) -> list[Path]:
    """Each corpus file: absolute as is; relative against the current folder, else the data
    folder. Every missing file is named in one error."""
    assert cfg.corpus is not None
    return data_files(cfg.corpus, data_dir, where="data.corpus")


def data_files(names: list[str], data_dir: str | Path | None, *, where: str) -> list[Path]:
    """Files named in a recipe (at YAML path `where`): absolute as is; relative against the
    current folder, else the data folder. Every missing file is named in one error."""
    root, searched = resolve_data_root(data_dir)
    found, missing = [], []
    for text in names:
        given = Path(text).expanduser()
        tried = [given] if given.is_absolute() else [Path.cwd() / given]
        if not given.is_absolute() and root is not None:
            tried.append(root / given)
        hit = next((p for p in tried if p.is_file()), None)
        if hit is None:
            missing.append(f"{text} (tried {', '.join(str(p) for p in tried)})")
        else:
            found.append(hit)
    if missing:
        raise DataError(
            f"{where}: {len(missing)} file(s) not found: {'; '.join(missing)}. Relative "
            f"paths resolve against the current folder, then the data folder ({searched[0]}; "
            f"set it with --data-dir or ${DATA_ENV_VAR})"
        )
    return found


def build_lm_data(
    cfg: LMDataConfig,
    *,
    data_dir: str | Path | None,
    tokenizer_dir: Path,
    may_train_tokenizer: bool = True,
    tokenizer: Tokenizer | None = None,
) -> LMData:
    """Read, split, tokenize and pack the corpus, or read and tokenize the pairs.

    tokenizer_dir: where the run keeps its tokenizer; one trained earlier from the same
    text and settings is reused, one from other settings is refused. With
    may_train_tokenizer=False (other processes, `kdistill cache`) it must exist there.
    tokenizer: use this one instead of data.tokenizer (the same text seen by a model with
    its own tokenizer, e.g. a pretrained teacher in sequence-level KD).
    """
    if cfg.pairs is not None:
        return _pairs_data(
            cfg,
            cfg.pairs,
            data_dir=data_dir,
            tokenizer_dir=tokenizer_dir,
            may_train_tokenizer=may_train_tokenizer,
            tokenizer=tokenizer,
        )
    text = read_corpus(corpus_paths(cfg, data_dir), text_field=cfg.text_field)
    if cfg.limit_chars is not None:
        text = text[: cfg.limit_chars]
    train_text, val_text = split_corpus(text, cfg.val_fraction)
    if tokenizer is None:
        tokenizer = _tokenizer(cfg, [train_text], tokenizer_dir, may_train=may_train_tokenizer)
    train_ids, val_ids = encode_text(tokenizer, train_text), encode_text(tokenizer, val_text)
    train = _pack(train_ids, cfg.seq_len, "training", len(train_text))
    val = _pack(val_ids, cfg.seq_len, "validation", len(val_text))
    val_characters = count_characters(tokenizer, val.sequences[:, 1:].reshape(-1))
    info = {
        "characters": {"train": len(train_text), "val": len(val_text)},
        "tokens": {"train": len(train_ids), "val": len(val_ids)},
        "sequences": {"train": len(train.sequences), "val": len(val.sequences)},
        "chars_per_token": len(train_text) / max(len(train_ids), 1),
        "vocab_size": tokenizer.get_vocab_size(),
    }
    return LMData(tokenizer, train.sequences, val.sequences, cfg.seq_len, val_characters, info)


# ------------------------------------------------------------------ prompt/completion pairs


@dataclass(frozen=True)
class PairTexts:
    """Prompt/completion pairs as text, with the line each came from (for messages)."""

    numbers: list[int]
    prompts: list[str]
    completions: list[str]
    source: str  # "data.pairs.train (path)", for messages

    def __len__(self) -> int:
        return len(self.prompts)

    def subset(self, rows: list[int]) -> PairTexts:
        return PairTexts(
            [self.numbers[i] for i in rows],
            [self.prompts[i] for i in rows],
            [self.completions[i] for i in rows],
            self.source,
        )


@dataclass(frozen=True)
class PairRows:
    """Pairs as training rows: sequences (N, seq_len + 1), labels (N, seq_len)."""

    sequences: torch.Tensor
    labels: torch.Tensor
    truncated_prompts: int
    truncated_completions: int


def _pairs_data(
    cfg: LMDataConfig,
    pairs: PairsConfig,
    *,
    data_dir: str | Path | None,
    tokenizer_dir: Path,
    may_train_tokenizer: bool,
    tokenizer: Tokenizer | None,
) -> LMData:
    """Read the pairs (validation: pairs.val, else a seeded share of the training pairs),
    train or load the tokenizer on the training pairs' text, and make one row per pair."""
    train = _read_pair_texts(pairs, pairs.train, data_dir, where="data.pairs.train")
    if pairs.val is not None:
        val = _read_pair_texts(pairs, pairs.val, data_dir, where="data.pairs.val")
    else:
        train, val = split_pairs(train, cfg.val_fraction, seed=pairs.split_seed)
    if tokenizer is None:
        texts = [p + c for p, c in zip(train.prompts, train.completions)]
        tokenizer = _tokenizer(cfg, texts, tokenizer_dir, may_train=may_train_tokenizer)
    train_rows = pair_rows(train, tokenizer, seq_len=cfg.seq_len, truncate=pairs.truncate_prompt)
    val_rows = pair_rows(val, tokenizer, seq_len=cfg.seq_len, truncate=pairs.truncate_prompt)
    counted = val_rows.labels[val_rows.labels != IGNORE_INDEX].tolist()
    # the completion text only: an end-of-text token is predicted but spells no text, and
    # its spelling ("<|endoftext|>", "</s>") differs between tokenizers
    val_characters = len(tokenizer.decode(counted, skip_special_tokens=True))
    if val_characters == 0:
        raise DataError(
            f"{val.source}: the validation completions spell no characters, so bits per "
            "character cannot be measured; give those pairs completion text"
        )
    train_characters = sum(len(p) + len(c) for p, c in zip(train.prompts, train.completions))
    train_tokens = sum(
        len(ids) for ids in encode_texts(tokenizer, [*train.prompts, *train.completions])
    )
    info = {
        "pairs": {"train": len(train), "val": len(val)},
        "characters": {
            "train": train_characters,
            "val": sum(len(p) + len(c) for p, c in zip(val.prompts, val.completions)),
        },
        # the tokens that count: completion tokens (and end-of-text) learned and measured
        "tokens": {
            "train": int((train_rows.labels != IGNORE_INDEX).sum()),
            "val": len(counted),
        },
        "sequences": {"train": len(train_rows.sequences), "val": len(val_rows.sequences)},
        "chars_per_token": train_characters / max(train_tokens, 1),
        "vocab_size": tokenizer.get_vocab_size(),
        "truncated_prompts": {
            "train": train_rows.truncated_prompts,
            "val": val_rows.truncated_prompts,
        },
        "truncated_completions": {
            "train": train_rows.truncated_completions,
            "val": val_rows.truncated_completions,
        },
    }
    return LMData(
        tokenizer,
        train_rows.sequences,
        val_rows.sequences,
        cfg.seq_len,
        val_characters,
        info,
        train_labels=train_rows.labels,
        val_labels=val_rows.labels,
    )


def _read_pair_texts(
    pairs: PairsConfig, name: str, data_dir: str | Path | None, *, where: str
) -> PairTexts:
    path = data_files([name], data_dir, where=where)[0]
    try:
        numbers, prompts, completions = read_pairs(
            path, prompt_field=pairs.prompt_field, completion_field=pairs.completion_field
        )
    except DataError as exc:
        raise DataError(
            f"{where}: {exc} (fields read: data.pairs.prompt_field = {pairs.prompt_field!r}, "
            f"data.pairs.completion_field = {pairs.completion_field!r})"
        ) from None
    return PairTexts(numbers, prompts, completions, f"{where} ({path})")


def split_pairs(pairs: PairTexts, val_fraction: float, *, seed: int) -> tuple[PairTexts, PairTexts]:
    """(train, validation): round(len(pairs) · val_fraction) pairs drawn at random by a
    generator seeded with `seed` validate, the rest train; each keeps the file's order.
    Drawn by pair, not by position, so a file sorted by topic or length still gives a
    validation set like the training set."""
    count = round(len(pairs) * val_fraction)
    if count == 0 or count == len(pairs):
        left = "no validation pair" if count == 0 else "no training pair"
        raise DataError(
            f"{pairs.source}: {len(pairs)} pairs with data.val_fraction = {val_fraction} leave "
            f"{left}; add pairs, change data.val_fraction, or give a validation file "
            "(data.pairs.val)"
        )
    order = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(seed))
    val_rows = sorted(order[:count].tolist())
    train_rows = sorted(order[count:].tolist())
    return pairs.subset(train_rows), pairs.subset(val_rows)


def pair_rows(
    pairs: PairTexts, tokenizer: Tokenizer, *, seq_len: int, truncate: Literal["error", "left"]
) -> PairRows:
    """One row per pair: prompt and completion tokenized separately (a completion usually
    starts with a space), the end-of-text id appended when the tokenizer has
    <|endoftext|> (so the model learns to stop), then `prompt_completion_rows`: labels -100
    on the prompt and padding, padded with end-of-text (else 0) to seq_len + 1 tokens.

    A prompt longer than seq_len leaves no completion token to learn: refused, naming
    every such line, unless truncate is "left" (its oldest tokens are dropped)."""
    eos_id = tokenizer.token_to_id(EOS_TOKEN)
    prompt_ids = encode_texts(tokenizer, pairs.prompts)
    completion_ids = [
        ids + ([] if eos_id is None else [eos_id])
        for ids in encode_texts(tokenizer, pairs.completions)
    ]
    too_long = [
        f"line {number}: {len(prompt)} tokens"
        for number, prompt in zip(pairs.numbers, prompt_ids)
        if len(prompt) > seq_len
    ]
    if too_long and truncate == "error":
        raise DataError(
            problem_list(
                f"{pairs.source}: {len(too_long)} of {len(pairs)} prompts are longer than "
                f"data.seq_len = {seq_len} tokens, leaving no room for the completion",
                too_long,
            )
            + ". Shorten those prompts, raise data.seq_len (and the models' n_positions with "
            "it), or set data.pairs.truncate_prompt: left to drop their oldest tokens"
        )
    # a pair needs a completion token and a token before it to predict it from
    empty = [
        f"line {number}"
        for number, prompt, completion in zip(pairs.numbers, prompt_ids, completion_ids)
        if not completion or len(prompt) + len(completion) < 2
    ]
    if empty:
        raise DataError(
            problem_list(f"{pairs.source}: pairs with no completion token to learn", empty)
            + "; give those pairs prompt and completion text"
        )
    pad_id = 0 if eos_id is None else eos_id
    rows = prompt_completion_rows(
        prompt_ids, completion_ids, max_length=seq_len, pad_id=pad_id, truncate_prompt=truncate
    )
    last = torch.full((len(rows), 1), pad_id, dtype=torch.long)  # never an input
    return PairRows(
        torch.cat([rows.input_ids, last], dim=1),  # (N, seq_len + 1)
        rows.labels,
        rows.truncated_prompts,
        rows.truncated_completions,
    )


# ------------------------------------------------------------------ corpus, tokenizer


def _pack(ids: torch.Tensor, seq_len: int, split: str, characters: int) -> Any:
    try:
        return pack(ids, seq_len)
    except DataError as exc:
        raise DataError(
            f"data: the {split} split ({characters} characters, {len(ids)} tokens) is shorter "
            f"than one sequence: {exc}"
        ) from None


def _tokenizer(
    cfg: LMDataConfig, train_texts: list[str], folder: Path, *, may_train: bool
) -> Tokenizer:
    """data.tokenizer: loaded from its path, or a byte-level BPE trained on `train_texts`
    (the training corpus, or each training pair's prompt + completion)."""
    settings = cfg.tokenizer
    if settings.path is not None:
        return load_tokenizer(settings.path)
    joined = "\n\n".join(train_texts)  # one text: the corpus's hash as it always was
    wanted = {
        "vocab_size": settings.vocab_size,
        "min_frequency": settings.min_frequency,
        "train_text_sha256": hashlib.sha256(joined.encode("utf-8")).hexdigest(),
    }
    path, record = folder / TOKENIZER_FILE, folder / TRAINED_ON
    if path.is_file():
        try:
            stored = json.loads(record.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            stored = None
        if stored != wanted:
            raise DataError(
                f"the run's tokenizer {path} was trained from other text or settings than "
                f"data.tokenizer now asks for ({_difference(stored, wanted)}); the stages "
                "trained with it would not match. Use another --output-dir, or --overwrite"
            )
        return load_tokenizer(path)
    if not may_train:
        raise DataError(
            f"no tokenizer at {path}: the run has not trained it yet. Run the recipe first "
            "(`kdistill run`), which trains the tokenizer and the teacher"
        )
    assert settings.vocab_size is not None
    tokenizer = train_bpe_tokenizer(
        train_texts,
        settings.vocab_size,
        special_tokens=(EOS_TOKEN,),
        min_frequency=settings.min_frequency,
    )
    save_tokenizer(tokenizer, folder)
    atomic_write_json(record, wanted)
    return tokenizer


def _difference(stored: Any, wanted: dict[str, Any]) -> str:
    if not isinstance(stored, dict):
        return f"{TRAINED_ON} is missing or unreadable"
    changed = [
        f"{key}: run {stored.get(key)!r} vs recipe {value!r}"
        for key, value in wanted.items()
        if stored.get(key) != value and key != "train_text_sha256"
    ]
    if stored.get("train_text_sha256") != wanted["train_text_sha256"]:
        changed.append("the training text differs")
    return "; ".join(changed)
