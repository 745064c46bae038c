"""Text for language models: corpus, byte-level BPE tokenizer, packed sequences,
prompt/completion pairs, fingerprints and bits per character.

The pipeline reads top to bottom:

    text = read_corpus(["input.txt"])                       # one string
    train_text, val_text = split_corpus(text, val_fraction=0.1)
    tokenizer = train_bpe_tokenizer([train_text], vocab_size=4096)
    save_tokenizer(tokenizer, run / "tokenizer")            # run/tokenizer/tokenizer.json
    train = pack(encode_text(tokenizer, train_text), seq_len=256).sequences  # (N, 257)
    fingerprint = dataset_fingerprint(
        train, seq_len=256, tokenizer_fingerprint=tokenizer_fingerprint(tokenizer)
    )

Conventions:
- The train/validation split is by character position, before tokenization: the
  first (1 - val_fraction) of the characters train, the rest validate. The
  tokenizer is trained on the train part only.
- Token ids are int64 (LongTensor). Text is encoded whole, without special tokens
  added by a post-processor (no BOS/EOS unless the text spells them).
- Labels are already shifted: `labels[..., t]` is the token that position t must
  predict, so a loss compares `logits[..., t, :]` with `labels[..., t]` directly.
  Positions that must not count carry the label -100 (`IGNORE_INDEX`, the
  PyTorch cross-entropy default).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from kdistill.checkpoint import atomic_write_text
from kdistill.errors import DataError

IGNORE_INDEX = -100
TOKENIZER_FILE = "tokenizer.json"
JSONL_SUFFIXES = (".jsonl", ".ndjson")
_SHOWN = 5  # problems listed in one error message; the rest are counted


# ----------------------------------------------------------------------------- corpus


def read_corpus(
    paths: str | Path | Sequence[str | Path], *, text_field: str = "text", separator: str = "\n\n"
) -> str:
    """The text of one or more files as one string.

    A `.jsonl` / `.ndjson` file holds one JSON object per line; its `text_field`
    (a string) is one document. Any other file is read whole as UTF-8 plain text
    and is one document. Documents are joined with `separator`; pass
    "<|endoftext|>" to join them with that special token when the tokenizer has it.
    Blank lines in JSON Lines files are skipped.
    """
    if isinstance(paths, (str, Path)):
        paths = [paths]
    if not paths:
        raise DataError("read_corpus got no files; give at least one text or .jsonl file")
    documents: list[str] = []
    for path in map(Path, paths):
        if path.suffix == ".json":
            raise DataError(
                f"{path}: plain JSON is not read as a corpus; write one JSON object per line "
                f'(e.g. {{"{text_field}": "..."}}) to a .jsonl file'
            )
        if path.suffix in JSONL_SUFFIXES:
            documents.extend(row[0] for row in _jsonl_strings(path, [text_field])[1])
        else:
            documents.append(_read_utf8(path))
    return separator.join(documents)


def split_corpus(text: str, val_fraction: float) -> tuple[str, str]:
    """(train, validation) by character position: the last round(len(text) * val_fraction)
    characters validate, the characters before them train. The split happens before
    tokenization, so no token straddles it and the tokenizer never sees validation text."""
    if not 0 <= val_fraction < 1:
        raise DataError(f"val_fraction must be in [0, 1); got {val_fraction}")
    cut = len(text) - round(len(text) * val_fraction)
    if cut == 0:
        raise DataError(
            f"the corpus has {len(text)} characters, so nothing is left for training after "
            f"taking val_fraction = {val_fraction} for validation; add text"
        )
    return text[:cut], text[cut:]


def _read_utf8(path: Path) -> str:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot read the corpus file ({exc.strerror or exc})") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(
            f"{path}: not UTF-8 text (byte {exc.start} is {data[exc.start : exc.start + 1]!r}); "
            "convert the file to UTF-8, e.g. with `iconv -t UTF-8`"
        ) from None


def _jsonl_records(path: Path) -> Iterator[tuple[int, Any]]:
    """(1-based line number, parsed value) for each non-blank line; bad JSON is collected
    and raised once after the whole file has been read."""
    problems = []
    for number, line in enumerate(_read_utf8(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as exc:
            problems.append(f"line {number}: {exc.msg} at column {exc.colno}")
    if problems:
        raise DataError(problem_list(f"{path}: lines that are not valid JSON", problems))


def _jsonl_strings(path: Path, names: Sequence[str]) -> tuple[list[int], list[list[str]]]:
    """The 1-based line numbers and, per line, the string values of the fields `names`;
    every line that lacks one is listed in one error."""
    numbers, rows, problems = [], [], []
    for number, record in _jsonl_records(path):
        if not isinstance(record, dict):
            problems.append(f"line {number} is a JSON {type(record).__name__}, not an object")
            continue
        wrong = [
            f"no {name!r} field"
            if name not in record
            else f"{name!r} is {type(record[name]).__name__}, not a string"
            for name in names
            if not isinstance(record.get(name), str)
        ]
        if wrong:
            problems.append(f"line {number}: {', '.join(wrong)} (fields: {sorted(record)})")
        else:
            numbers.append(number)
            rows.append([record[name] for name in names])
    if problems:
        wanted = " and ".join(repr(name) for name in names)
        raise DataError(
            problem_list(f"{path}: every line must be an object with string {wanted}", problems)
        )
    return numbers, rows


def problem_list(headline: str, problems: list[str]) -> str:
    more = f"; and {len(problems) - _SHOWN} more" if len(problems) > _SHOWN else ""
    return f"{headline}: {'; '.join(problems[:_SHOWN])}{more}"


# ----------------------------------------------------------------------------- tokenizer


def train_bpe_tokenizer(
    texts: Iterable[str] | str,
    vocab_size: int,
    *,
    special_tokens: Sequence[str] = ("<|endoftext|>",),
    min_frequency: int = 2,
) -> Tokenizer:
    """A byte-level BPE tokenizer (the GPT-2 scheme) trained on `texts`.

    The 256 byte symbols are always in the vocabulary, so any text encodes without
    unknown tokens and decodes back exactly. Special tokens get the first ids, in
    the order given. The vocabulary may come out smaller than `vocab_size` when
    the text has fewer merges that occur `min_frequency` times.
    """
    smallest = len(pre_tokenizers.ByteLevel.alphabet()) + len(special_tokens)
    if vocab_size < smallest:
        raise DataError(
            f"vocab_size {vocab_size} is too small for a byte-level BPE tokenizer: it needs the "
            f"256 byte symbols plus {len(special_tokens)} special tokens, so at least {smallest}"
        )
    if isinstance(texts, str):  # a string is an iterable of characters, not of texts
        texts = [texts]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    return tokenizer


def save_tokenizer(tokenizer: Tokenizer, folder: str | Path) -> Path:
    """Write `folder/tokenizer.json` atomically; returns its path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / TOKENIZER_FILE
    atomic_write_text(path, tokenizer.to_str(pretty=True))
    return path


def load_tokenizer(source: str | Path) -> Tokenizer:
    """A tokenizer from a tokenizer.json file, a folder holding one, or a Hugging Face
    tokenizer (a local folder in the transformers layout, or a hub id already in the
    local Hugging Face cache: nothing is downloaded).

    Hugging Face tokenizers must be "fast" ones; their `tokenizers.Tokenizer` backend
    is returned, so every tokenizer is used the same way.
    """
    path = Path(source).expanduser()
    if path.is_file():
        return _tokenizer_from_file(path)
    if (path / TOKENIZER_FILE).is_file():
        return _tokenizer_from_file(path / TOKENIZER_FILE)
    text = str(source)
    looks_like_path = path.is_absolute() or text.startswith((".", "~")) or text.count("/") > 1
    if not path.exists() and looks_like_path:
        raise DataError(
            f"tokenizer {text!r} does not exist: give a tokenizer.json file, a folder holding "
            "one (as save_tokenizer writes it) or a Hugging Face tokenizer folder"
        )
    return _hf_tokenizer(text)


def _tokenizer_from_file(path: Path) -> Tokenizer:
    try:
        return Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises a bare Exception for malformed files
        raise DataError(
            f"{path}: cannot be read as a tokenizers tokenizer.json ({exc}); write it with "
            "save_tokenizer or a Hugging Face tokenizer's save_pretrained"
        ) from None


def _hf_tokenizer(name: str) -> Tokenizer:
    from transformers import AutoTokenizer  # slow to import; only this path needs it

    try:
        wrapper = AutoTokenizer.from_pretrained(name, local_files_only=True)
    except (OSError, ValueError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(
            f"cannot load the Hugging Face tokenizer {name!r} from local files ({first_line}). "
            f"Nothing is downloaded: fetch it once where there is network access, e.g. "
            f"`hf download {name}` (it lands in the Hugging Face cache) or "
            f"`AutoTokenizer.from_pretrained({name!r}).save_pretrained(FOLDER)`, then give "
            "the hub id again or that folder"
        ) from None
    if not getattr(wrapper, "is_fast", False):
        raise DataError(
            f"the Hugging Face tokenizer {name!r} is a slow (Python) tokenizer, which kdistill "
            "does not use; save a fast one (tokenizer.json) with "
            "PreTrainedTokenizerFast or convert it with transformers' convert_slow_tokenizer"
        )
    return wrapper.backend_tokenizer


def tokenizer_fingerprint(tokenizer: Tokenizer) -> str:
    """sha256 of the tokenizer's canonical JSON (sorted keys, no whitespace).

    Truncation and padding settings are left out: they belong to an encode call,
    not to the vocabulary, and kdistill turns them off when it encodes. A new
    `tokenizers` release that serialises differently changes the fingerprint, so
    caches keyed on it are rebuilt rather than trusted.
    """
    content = json.loads(tokenizer.to_str())
    content.pop("truncation", None)
    content.pop("padding", None)
    canonical = json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def _without_truncation(tokenizer: Tokenizer) -> Tokenizer:
    """The tokenizer itself, or a copy with truncation and padding off (never changes the
    caller's object)."""
    if tokenizer.truncation is None and tokenizer.padding is None:
        return tokenizer
    plain = Tokenizer.from_str(tokenizer.to_str())
    plain.no_truncation()
    plain.no_padding()
    return plain


def encode_text(tokenizer: Tokenizer, text: str) -> torch.Tensor:
    """Token ids (L,) int64 of `text`, encoded whole (about 1 s for the 1.1 MB of
    TinyShakespeare on one CPU core). Encoding the string in one piece keeps the ids
    exactly those of the tokenizer, whatever its pre-tokenizer: splitting the text
    first could change how whitespace runs at the cut are merged."""
    plain = _without_truncation(tokenizer)
    if hasattr(plain, "encode_batch_fast"):  # tokenizers >= 0.21: skips character offsets
        encoding = plain.encode_batch_fast([text], add_special_tokens=False)[0]
    else:
        encoding = plain.encode(text, add_special_tokens=False)
    return torch.tensor(encoding.ids, dtype=torch.long)


def encode_texts(tokenizer: Tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """The token ids of each text, encoded whole, with no special tokens added and no
    truncation (short texts, e.g. prompts; `encode_text` for a corpus)."""
    plain = _without_truncation(tokenizer)
    return [e.ids for e in plain.encode_batch(list(texts), add_special_tokens=False)]


def count_characters(tokenizer: Tokenizer, ids: torch.Tensor | Sequence[int]) -> int:
    """How many characters the tokens `ids` decode to (special tokens included), the
    denominator of `bits_per_character` for exactly those tokens."""
    id_list = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
    return len(tokenizer.decode(id_list, skip_special_tokens=False))


# ----------------------------------------------------------------------------- packing


class Packed(NamedTuple):
    """Fixed-length training sequences cut from one token stream.

    sequences: (N, seq_len + 1) int64. Row i is ids[i*seq_len : i*seq_len + seq_len + 1],
        so consecutive rows overlap by one token and every token after the first is
        a label exactly once: inputs = sequences[:, :-1], labels = sequences[:, 1:].
    dropped_tokens: tokens at the end that fit no full row and are never a label,
        (len(ids) - 1) % seq_len, always fewer than seq_len.
    """

    sequences: torch.Tensor
    dropped_tokens: int


def pack(ids: torch.Tensor, seq_len: int) -> Packed:
    """Cut a 1-D token stream into N = (len(ids) - 1) // seq_len rows of seq_len + 1 tokens
    (see `Packed`); the incomplete piece at the end is dropped."""
    if ids.dim() != 1 or ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise DataError(
            f"pack needs a 1-D tensor of integer token ids; got {ids.dtype} with shape "
            f"{tuple(ids.shape)}"
        )
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
        raise DataError(f"seq_len must be a positive integer; got {seq_len!r}")
    if len(ids) < seq_len + 1:
        raise DataError(
            f"the corpus has {len(ids)} tokens, fewer than one sequence needs: seq_len + 1 = "
            f"{seq_len + 1} ({seq_len} inputs and the label after the last one). Lower seq_len to "
            f"at most {max(len(ids) - 1, 0)} or add text (for a validation split, raise "
            "val_fraction)"
        )
    count = (len(ids) - 1) // seq_len
    sequences = ids.long().unfold(0, seq_len + 1, seq_len).contiguous()  # (N, seq_len + 1)
    assert sequences.shape[0] == count, (sequences.shape, count)
    return Packed(sequences, (len(ids) - 1) % seq_len)


# ----------------------------------------------------------------------------- prompt/completion


@dataclass(frozen=True)
class PromptCompletions:
    """Prompt/completion pairs as right-padded rows of `max_length` positions.

    input_ids: (N, max_length) int64: prompt then completion tokens, then padding.
    labels: (N, max_length) int64: labels[i, t] is the token position t predicts,
        -100 where that token belongs to the prompt or is padding, so only the
        completion (and the end-of-text token, when one is appended) is learned.
    attention_mask: (N, max_length) int64: 1 on real tokens, 0 on padding.
    truncated_completions: how many completions lost tokens at the end to fit.
    truncated_prompts: how many prompts lost tokens at the start (truncate_prompt="left").
    """

    input_ids: torch.Tensor
    labels: torch.Tensor
    attention_mask: torch.Tensor
    truncated_completions: int
    truncated_prompts: int

    def __len__(self) -> int:
        return self.input_ids.shape[0]


def read_prompt_completions(
    path: str | Path,
    tokenizer: Tokenizer,
    *,
    max_length: int,
    prompt_field: str = "prompt",
    completion_field: str = "completion",
    truncate_prompt: Literal["error", "left"] = "error",
    eos_token: str | None = "<|endoftext|>",
) -> PromptCompletions:
    """Prompt/completion pairs from a JSON Lines file, ready for a causal LM.

    Each pair becomes the token sequence s = prompt + completion (+ eos_token); the
    model reads s[:-1] and predicts s[1:], so a row of `max_length` inputs holds up to
    max_length + 1 tokens of s. Prompt and completion are tokenized separately (a
    completion usually starts with a space). Padding uses the eos_token's id, else 0.

    A prompt longer than max_length leaves no completion token to learn:
    truncate_prompt="error" (the default) refuses the file, listing those lines;
    "left" drops prompt tokens from the start until prompt and completion fit (or
    one prompt token is left). A completion that does not fit after its prompt is
    cut at the end; `truncated_completions` counts those.
    """
    path = Path(path)
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
        raise DataError(f"max_length must be a positive integer; got {max_length!r}")
    if truncate_prompt not in ("error", "left"):
        raise DataError(f"truncate_prompt must be 'error' or 'left'; got {truncate_prompt!r}")
    eos_ids = []
    if eos_token is not None:
        eos_id = tokenizer.token_to_id(eos_token)
        if eos_id is None:
            raise DataError(
                f"eos_token {eos_token!r} is not in the tokenizer's vocabulary; give one of its "
                "special tokens, or eos_token=None to append none"
            )
        eos_ids = [eos_id]
    pad_id = eos_ids[0] if eos_ids else 0

    numbers, prompts, completions = read_pairs(
        path, prompt_field=prompt_field, completion_field=completion_field
    )

    encoder = _without_truncation(tokenizer)
    prompt_ids = [e.ids for e in encoder.encode_batch(prompts, add_special_tokens=False)]
    completion_ids = [
        e.ids + eos_ids for e in encoder.encode_batch(completions, add_special_tokens=False)
    ]
    too_long = [
        f"line {number}: {len(p)} tokens"
        for number, p in zip(numbers, prompt_ids)
        if len(p) > max_length
    ]
    if too_long and truncate_prompt == "error":
        raise DataError(
            problem_list(
                f"{path}: {len(too_long)} prompts are longer than max_length = {max_length} "
                "tokens, leaving no room for the completion",
                too_long,
            )
            + ". Shorten those prompts, raise max_length, or pass truncate_prompt='left' to "
            "drop their oldest tokens"
        )
    # a pair needs a completion token and a token before it to predict it from
    empty = [
        f"line {n}"
        for n, p, c in zip(numbers, prompt_ids, completion_ids)
        if not c or len(p) + len(c) < 2
    ]
    if empty:
        raise DataError(
            problem_list(f"{path}: pairs with no completion token to learn", empty)
            + "; give those completions text (and a prompt), or an eos_token"
        )

    return prompt_completion_rows(
        prompt_ids,
        completion_ids,
        max_length=max_length,
        pad_id=pad_id,
        truncate_prompt=truncate_prompt,
    )


def read_pairs(
    path: str | Path, *, prompt_field: str = "prompt", completion_field: str = "completion"
) -> tuple[list[int], list[str], list[str]]:
    """The 1-based line numbers, prompts and completions of a JSON Lines file of
    prompt/completion pairs, as text (blank lines skipped). Every line that lacks a field
    is named in one error, with the fields it has; an empty file is refused."""
    path = Path(path)
    numbers, pairs = _jsonl_strings(path, [prompt_field, completion_field])
    if not pairs:
        raise DataError(
            f"{path}: no prompt/completion pairs (the file has no non-blank lines); write one "
            f'JSON object per line, e.g. {{"{prompt_field}": "Q: ...", "{completion_field}": '
            '" A: ..."}'
        )
    return numbers, [pair[0] for pair in pairs], [pair[1] for pair in pairs]


def prompt_completion_rows(
    prompt_ids: Sequence[Sequence[int]],
    completion_ids: Sequence[Sequence[int]],
    *,
    max_length: int,
    pad_id: int,
    truncate_prompt: Literal["error", "left"] = "error",
) -> PromptCompletions:
    """Token ids of prompt/completion pairs as right-padded rows (see `PromptCompletions`).

    Each pair is s = prompt + completion, already tokenized (append the end-of-text id
    to a completion yourself when the model should learn to stop there). With
    truncate_prompt="left" a pair longer than max_length + 1 first loses prompt tokens
    from the start (one is kept); then any completion still too long is cut at the end.
    The caller has checked that each prompt fits (read_prompt_completions refuses them).
    """
    rows = len(prompt_ids)
    input_ids = torch.full((rows, max_length), pad_id, dtype=torch.long)
    labels = torch.full((rows, max_length), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((rows, max_length), dtype=torch.long)
    cut_prompts = cut_completions = 0
    room = max_length + 1  # tokens of s one row holds
    for row, (prompt_row, completion_row) in enumerate(zip(prompt_ids, completion_ids)):
        prompt, completion = list(prompt_row), list(completion_row)
        if len(prompt) + len(completion) > room and truncate_prompt == "left":
            keep = max(1, room - len(completion))
            if keep < len(prompt):
                prompt = prompt[-keep:]
                cut_prompts += 1
        if len(prompt) + len(completion) > room:
            completion = completion[: room - len(prompt)]
            cut_completions += 1
        tokens = torch.tensor(prompt + completion, dtype=torch.long)
        targets = tokens[1:].clone()
        targets[: max(len(prompt) - 1, 0)] = IGNORE_INDEX  # positions whose next token is prompt
        n = len(tokens) - 1
        input_ids[row, :n] = tokens[:-1]
        labels[row, :n] = targets
        attention_mask[row, :n] = 1
    return PromptCompletions(input_ids, labels, attention_mask, cut_completions, cut_prompts)


def read_prompts(path: str | Path, *, field: str = "prompt") -> tuple[list[int], list[str]]:
    """The prompts of a JSON Lines file, one object per line with a string `field`, and
    their 1-based line numbers (blank lines are skipped). An empty file, and lines whose
    prompt is empty or whitespace, are refused: there is nothing to continue."""
    path = Path(path)
    numbers, rows = _jsonl_strings(path, [field])
    if not rows:
        raise DataError(
            f"{path}: the prompt file is empty (no non-blank lines); write one JSON object per "
            f'line with a string {field!r}, e.g. {{"{field}": "ROMEO:"}}'
        )
    empty = [f"line {n}" for n, row in zip(numbers, rows) if not row[0].strip()]
    if empty:
        raise DataError(
            problem_list(f"{path}: prompts that are empty or only whitespace", empty)
            + "; a model needs some text to continue: give those prompts text or remove them"
        )
    return numbers, [row[0] for row in rows]


# ----------------------------------------------------------------------------- fingerprints, metrics


def dataset_fingerprint(
    sequences: torch.Tensor,
    *,
    seq_len: int,
    tokenizer_fingerprint: str,
    labels: torch.Tensor | None = None,
) -> str:
    """sha256 over the token ids (as little-endian int64, with their shape), seq_len, the
    tokenizer fingerprint and, when given, the labels: equal fingerprints mean the
    same sequences in the same order from the same tokenizer."""
    header = {
        "seq_len": seq_len,
        "tokenizer": tokenizer_fingerprint,
        "shape": list(sequences.shape),
        "labels_shape": None if labels is None else list(labels.shape),
    }
    digest = hashlib.sha256(json.dumps(header, sort_keys=True).encode())
    for tensor in (sequences, labels):
        if tensor is not None:
            digest.update(np.ascontiguousarray(tensor.cpu().numpy(), dtype="<i8").tobytes())
    return digest.hexdigest()


def bits_per_character(nll_nats: float, num_characters: int) -> float:
    """Bits per character: bpc = NLL / (num_characters · ln 2).

    nll_nats: the summed negative log-likelihood, in nats, of a run of tokens (the
        sum of per-token cross-entropies with reduction="sum").
    num_characters: the number of characters those same tokens encode
        (`count_characters`), so models with different tokenizers compare fairly.
    """
    if num_characters <= 0:
        raise DataError(f"num_characters must be positive; got {num_characters}")
    return float(nll_nats) / (num_characters * math.log(2))
