"""data.lm_text: corpus reading and splitting, byte-level BPE tokenizers (train, save,
load, fingerprint), packing, prompt/completion masking, dataset fingerprints, bpc."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer

from kdistill.data.lm_text import (
    IGNORE_INDEX,
    bits_per_character,
    count_characters,
    dataset_fingerprint,
    encode_text,
    load_tokenizer,
    pack,
    read_corpus,
    read_prompt_completions,
    save_tokenizer,
    split_corpus,
    tokenizer_fingerprint,
    train_bpe_tokenizer,
)
from kdistill.errors import DataError

SLICE_CHARS = 100_000


@pytest.fixture(scope="module")
def shakespeare(shared_data: Path) -> str:
    """The first 100,000 characters of TinyShakespeare."""
    path = shared_data / "tinyshakespeare" / "input.txt"
    if not path.is_file():
        pytest.skip(f"TinyShakespeare is not at {path}")
    return path.read_text(encoding="utf-8")[:SLICE_CHARS]


@pytest.fixture(scope="module")
def tokenizer(shakespeare: str) -> Tokenizer:
    return train_bpe_tokenizer([shakespeare], vocab_size=512)


def _write_jsonl(path: Path, lines: list[object]) -> Path:
    path.write_text("".join(json.dumps(x) + "\n" for x in lines), encoding="utf-8")
    return path


# ----------------------------------------------------------------------------- corpus


def test_read_corpus_plain_and_jsonl(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("first file\n", encoding="utf-8")
    (tmp_path / "b.txt").write_text("señor", encoding="utf-8")
    assert read_corpus(tmp_path / "a.txt") == "first file\n"
    assert read_corpus([tmp_path / "a.txt", tmp_path / "b.txt"], separator="|") == (
        "first file\n|señor"
    )
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text('{"text": "one"}\n\n{"text": "two", "id": 2}\n', encoding="utf-8")
    assert read_corpus(jsonl) == "one\n\ntwo"  # blank line skipped, default separator
    _write_jsonl(tmp_path / "body.jsonl", [{"body": "x"}, {"body": "y"}])
    assert read_corpus(tmp_path / "body.jsonl", text_field="body", separator="<|endoftext|>") == (
        "x<|endoftext|>y"
    )


def test_read_corpus_jsonl_errors_name_every_bad_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n{"txt": "typo"}\n[1, 2]\n{"text": 3}\n', encoding="utf-8")
    with pytest.raises(DataError) as info:
        read_corpus(path)
    message = str(info.value)
    expected = [
        str(path),
        "string 'text'",
        "line 2: no 'text' field (fields: ['txt'])",
        "line 3 is a JSON list, not an object",
        "line 4: 'text' is int, not a string",
    ]
    for fragment in expected:
        assert fragment in message
    assert "line 1" not in message

    path.write_text('{"text": "ok"}\n{"text": broken}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"not valid JSON: line 2"):
        read_corpus(path)


def test_read_corpus_refuses_json_non_utf8_and_missing(tmp_path: Path) -> None:
    (tmp_path / "c.json").write_text("[]", encoding="utf-8")
    with pytest.raises(DataError, match=r"one JSON object per line"):
        read_corpus(tmp_path / "c.json")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(DataError, match=r"not UTF-8 text \(byte 3"):
        read_corpus(tmp_path / "latin1.txt")
    with pytest.raises(DataError, match=r"cannot read the corpus file"):
        read_corpus(tmp_path / "absent.txt")


def test_split_corpus_by_character_position() -> None:
    text = "".join(chr(ord("a") + i % 26) for i in range(1000))
    train, val = split_corpus(text, 0.1)
    assert (len(train), len(val)) == (900, 100)
    assert train + val == text and val == text[900:]
    assert split_corpus(text, 0.0) == (text, "")
    assert split_corpus("abcd", 0.25) == ("abc", "d")
    with pytest.raises(DataError, match=r"val_fraction must be in \[0, 1\)"):
        split_corpus(text, 1.0)
    with pytest.raises(DataError, match=r"nothing is left for training"):
        split_corpus("a", 0.6)


def test_split_of_real_corpus(shakespeare: str) -> None:
    train, val = split_corpus(shakespeare, 0.1)
    assert len(val) == 10_000 and train + val == shakespeare


# ----------------------------------------------------------------------------- tokenizer


def test_trained_tokenizer_vocab_specials_and_exact_round_trip(
    tokenizer: Tokenizer, shakespeare: str
) -> None:
    assert tokenizer.get_vocab_size() == 512
    assert tokenizer.token_to_id("<|endoftext|>") == 0
    sample = shakespeare[:3000] + " naïve café — ünïcödé 日本\n\t  tabs"  # bytes unseen in training
    ids = encode_text(tokenizer, sample)
    assert ids.dtype == torch.long and ids.dim() == 1
    assert int(ids.max()) < 512
    assert tokenizer.decode(ids.tolist(), skip_special_tokens=False) == sample
    assert count_characters(tokenizer, ids) == len(sample)
    # BPE compresses English: far fewer tokens than characters on seen text
    assert len(encode_text(tokenizer, shakespeare[:3000])) < 3000 / 2
    # the special token in text becomes its single id
    assert encode_text(tokenizer, "a<|endoftext|>b")[1] == 0


def test_train_accepts_a_plain_string_and_checks_vocab_size(shakespeare: str) -> None:
    from_string = train_bpe_tokenizer(shakespeare[:20_000], vocab_size=300)
    from_list = train_bpe_tokenizer([shakespeare[:20_000]], vocab_size=300)
    assert tokenizer_fingerprint(from_string) == tokenizer_fingerprint(from_list)
    assert from_string.get_vocab_size() == 300  # a string is one text, not 20,000 characters
    with pytest.raises(DataError, match=r"at least 258"):
        train_bpe_tokenizer(["abc"], vocab_size=257, special_tokens=("<a>", "<b>"))


def test_save_load_and_fingerprint(tokenizer: Tokenizer, shakespeare: str, tmp_path: Path) -> None:
    path = save_tokenizer(tokenizer, tmp_path / "tok")
    assert path == tmp_path / "tok" / "tokenizer.json"
    fingerprint = tokenizer_fingerprint(tokenizer)
    assert len(fingerprint) == 64
    for source in (tmp_path / "tok", path, str(path)):
        loaded = load_tokenizer(source)
        assert tokenizer_fingerprint(loaded) == fingerprint
        assert torch.equal(
            encode_text(loaded, shakespeare[:2000]), encode_text(tokenizer, shakespeare[:2000])
        )
    other = train_bpe_tokenizer([shakespeare], vocab_size=400)
    assert tokenizer_fingerprint(other) != fingerprint


def test_truncation_neither_changes_fingerprint_nor_encoding(tokenizer: Tokenizer) -> None:
    truncating = Tokenizer.from_str(tokenizer.to_str())
    truncating.enable_truncation(max_length=5)
    text = "First Citizen:\nBefore we proceed any further, hear me speak."
    assert tokenizer_fingerprint(truncating) == tokenizer_fingerprint(tokenizer)
    assert torch.equal(encode_text(truncating, text), encode_text(tokenizer, text))
    assert len(encode_text(truncating, text)) > 5
    assert truncating.truncation is not None  # the caller's tokenizer is left as it was


def test_load_tokenizer_errors(tmp_path: Path) -> None:
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "tokenizer.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(DataError, match=r"cannot be read as a tokenizers tokenizer.json"):
        load_tokenizer(tmp_path / "bad")
    with pytest.raises(DataError, match=r"does not exist"):
        load_tokenizer(tmp_path / "absent")


def test_hugging_face_folder_and_offline_hub_id(
    tokenizer: Tokenizer, shakespeare: str, tmp_path: Path
) -> None:
    """A transformers folder without tokenizer.json (GPT-2 vocab.json + merges.txt) loads
    as the same tokenizer; a hub id that is not in the local cache fails with a fix."""
    pytest.importorskip("transformers")
    folder = tmp_path / "hf"
    folder.mkdir()
    tokenizer.model.save(str(folder))
    special = "<|endoftext|>"
    config = {
        "tokenizer_class": "GPT2Tokenizer",
        "eos_token": special,
        "bos_token": special,
        "unk_token": special,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    loaded = load_tokenizer(folder)
    assert isinstance(loaded, Tokenizer)
    text = shakespeare[:2000]
    assert torch.equal(encode_text(loaded, text), encode_text(tokenizer, text))

    with pytest.raises(DataError) as info:
        load_tokenizer("kdistill-tests/no-such-tokenizer")
    message = str(info.value)
    for fragment in [
        "'kdistill-tests/no-such-tokenizer'",
        "local files",
        "hf download",
        "save_pretrained",
    ]:
        assert fragment in message


# ----------------------------------------------------------------------------- packing


def test_pack_matches_a_naive_loop() -> None:
    ids = torch.arange(100, 123)  # 23 tokens
    seq_len = 5
    packed = pack(ids, seq_len)
    expected, start = [], 0
    while start + seq_len + 1 <= len(ids):
        expected.append(ids[start : start + seq_len + 1])
        start += seq_len
    assert torch.equal(packed.sequences, torch.stack(expected))
    assert packed.sequences.shape == (4, 6) and packed.sequences.dtype == torch.long
    assert packed.dropped_tokens == 2  # ids 121, 122 are never a label
    labels = packed.sequences[:, 1:].reshape(-1)
    assert torch.equal(labels, ids[1 : 1 + 4 * seq_len])  # every label once, in order
    exact = pack(torch.arange(21), 5)  # 4 * 5 + 1 tokens: nothing dropped
    assert exact.sequences.shape == (4, 6) and exact.dropped_tokens == 0
    assert pack(torch.arange(6, dtype=torch.int32), 5).sequences.dtype == torch.long


def test_pack_real_corpus(tokenizer: Tokenizer, shakespeare: str) -> None:
    ids = encode_text(tokenizer, shakespeare)
    packed = pack(ids, 64)
    n = packed.sequences.shape[0]
    assert n == (len(ids) - 1) // 64
    assert n * 64 + 1 + packed.dropped_tokens == len(ids)
    assert torch.equal(packed.sequences[1:, 0], packed.sequences[:-1, -1])  # rows overlap by one


def test_pack_errors() -> None:
    with pytest.raises(DataError) as info:
        pack(torch.arange(10), 16)
    message = str(info.value)
    for fragment in ["10 tokens", "seq_len + 1 = 17", "Lower seq_len", "at most 9", "add text"]:
        assert fragment in message
    with pytest.raises(DataError, match=r"1-D tensor of integer token ids"):
        pack(torch.zeros(2, 10, dtype=torch.long), 4)
    with pytest.raises(DataError, match=r"1-D tensor of integer token ids"):
        pack(torch.zeros(10), 4)
    with pytest.raises(DataError, match=r"positive integer"):
        pack(torch.arange(10), 0)


# ----------------------------------------------------------------------------- prompt/completion


def test_prompt_completion_masks_prompt_and_padding(tokenizer: Tokenizer, tmp_path: Path) -> None:
    pairs = [
        {"prompt": "ROMEO:\n", "completion": " But soft, what light"},
        {"prompt": "First Citizen: speak", "completion": " Speak."},
    ]
    path = _write_jsonl(tmp_path / "pairs.jsonl", pairs)
    data = read_prompt_completions(path, tokenizer, max_length=32)
    eos = tokenizer.token_to_id("<|endoftext|>")
    assert len(data) == 2 and data.input_ids.shape == data.labels.shape == (2, 32)
    for row, pair in enumerate(pairs):
        prompt = tokenizer.encode(pair["prompt"], add_special_tokens=False).ids
        completion = [*tokenizer.encode(pair["completion"], add_special_tokens=False).ids, eos]
        sequence = prompt + completion
        n = len(sequence) - 1
        # naive reference: position t predicts sequence[t + 1]; only completion tokens count
        expected_labels = [
            sequence[t + 1] if t + 1 >= len(prompt) else IGNORE_INDEX for t in range(n)
        ] + [IGNORE_INDEX] * (32 - n)
        assert data.labels[row].tolist() == expected_labels
        assert data.input_ids[row, :n].tolist() == sequence[:-1]
        assert data.input_ids[row, n:].tolist() == [eos] * (32 - n)  # padded with eos
        assert data.attention_mask[row].tolist() == [1] * n + [0] * (32 - n)
        assert (data.labels[row] != IGNORE_INDEX).sum() == len(completion)
    assert data.truncated_completions == data.truncated_prompts == 0


def test_prompt_completion_too_long_prompt(tokenizer: Tokenizer, tmp_path: Path) -> None:
    long_prompt = "All the world's a stage, and all the men and women merely players. " * 3
    lines = [
        {"prompt": "Hi", "completion": " there"},
        {"prompt": long_prompt, "completion": " Exit."},
        {"prompt": "Short", "completion": " ok"},
        {"prompt": long_prompt + "again", "completion": " Exeunt."},
    ]
    path = _write_jsonl(tmp_path / "pairs.jsonl", lines)
    prompt_len = len(tokenizer.encode(long_prompt, add_special_tokens=False).ids)
    with pytest.raises(DataError) as info:
        read_prompt_completions(path, tokenizer, max_length=16)
    message = str(info.value)
    expected = [
        str(path),
        "2 prompts are longer than max_length = 16",
        f"line 2: {prompt_len} tokens",
        "line 4:",
        "truncate_prompt='left'",
        "raise max_length",
    ]
    for fragment in expected:
        assert fragment in message
    assert "line 1" not in message and "line 3" not in message

    data = read_prompt_completions(path, tokenizer, max_length=16, truncate_prompt="left")
    assert data.truncated_prompts == 2 and data.truncated_completions == 0
    completion = [*tokenizer.encode(" Exit.", add_special_tokens=False).ids, 0]
    prompt = tokenizer.encode(long_prompt, add_special_tokens=False).ids
    kept = prompt[-(17 - len(completion)) :]  # the newest prompt tokens, completion whole
    assert data.input_ids[1].tolist() == (kept + completion)[:-1]
    assert data.labels[1, -len(completion) :].tolist() == completion
    assert (data.labels[1] != IGNORE_INDEX).sum() == len(completion)


def test_prompt_completion_long_completion_is_cut(tokenizer: Tokenizer, tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Q:", "completion": " word" * 40}])
    data = read_prompt_completions(path, tokenizer, max_length=8, eos_token=None)
    prompt = tokenizer.encode("Q:", add_special_tokens=False).ids
    assert data.truncated_completions == 1
    assert data.attention_mask.sum() == 8
    assert (data.labels != IGNORE_INDEX).sum() == 8 - (len(prompt) - 1)


def test_prompt_completion_field_and_eos_errors(tokenizer: Tokenizer, tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "p.jsonl", [{"question": "a", "answer": "b"}, {"prompt": "a"}])
    with pytest.raises(DataError) as info:
        read_prompt_completions(path, tokenizer, max_length=8)
    message = str(info.value)
    assert "line 1: no 'prompt' field, no 'completion' field (fields: ['answer', 'question'])" in (
        message
    )
    assert "line 2: no 'completion' field (fields: ['prompt'])" in message
    data = read_prompt_completions(
        _write_jsonl(tmp_path / "qa.jsonl", [{"question": "a", "answer": " b"}]),
        tokenizer,
        max_length=8,
        prompt_field="question",
        completion_field="answer",
    )
    assert len(data) == 1
    with pytest.raises(DataError, match=r"eos_token '<eos>' is not in the tokenizer"):
        read_prompt_completions(path, tokenizer, max_length=8, eos_token="<eos>")
    with pytest.raises(DataError, match=r"truncate_prompt must be 'error' or 'left'"):
        read_prompt_completions(path, tokenizer, max_length=8, truncate_prompt="right")  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- fingerprints, bpc


def test_dataset_fingerprint_changes_with_every_input() -> None:
    sequences = torch.arange(40).reshape(4, 10)
    base = dataset_fingerprint(sequences, seq_len=9, tokenizer_fingerprint="abc")
    assert base == dataset_fingerprint(sequences.clone(), seq_len=9, tokenizer_fingerprint="abc")
    changed = sequences.clone()
    changed[3, 9] += 1
    variants = [
        dataset_fingerprint(changed, seq_len=9, tokenizer_fingerprint="abc"),
        dataset_fingerprint(sequences, seq_len=8, tokenizer_fingerprint="abc"),
        dataset_fingerprint(sequences, seq_len=9, tokenizer_fingerprint="abd"),
        dataset_fingerprint(sequences.reshape(8, 5), seq_len=9, tokenizer_fingerprint="abc"),
        dataset_fingerprint(sequences, seq_len=9, tokenizer_fingerprint="abc", labels=sequences),
        dataset_fingerprint(sequences.int(), seq_len=9, tokenizer_fingerprint="abc"),
    ]
    assert variants[-1] == base  # the same ids in another integer dtype are the same data
    assert len({base, *variants[:-1]}) == 6


def test_bits_per_character() -> None:
    # a model that gives each of 2 equally likely characters p = 1/2 needs exactly 1 bit each
    assert bits_per_character(100 * math.log(2), 100) == pytest.approx(1.0, abs=1e-12)
    # tokens spanning several characters: NLL summed over tokens, divided by characters
    torch.manual_seed(0)
    logits, targets = torch.randn(50, 7, dtype=torch.float64), torch.randint(0, 7, (50,))
    nll = F.cross_entropy(logits, targets, reduction="sum").item()
    naive = sum(-math.log2(torch.softmax(logits[i], 0)[targets[i]].item()) for i in range(50))
    assert bits_per_character(nll, 120) == pytest.approx(naive / 120, rel=1e-12)
    with pytest.raises(DataError, match=r"num_characters must be positive"):
        bits_per_character(1.0, 0)
