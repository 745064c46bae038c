"""Text data: SST-2 and its validation splits, your own CSV/TSV/JSONL/saved datasets,
the errors for bad files."""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from kdistill.data.text import (
    UNLABELLED,
    TextBundle,
    TextSplit,
    split_validation,
    split_validation_by_sentence,
)
from kdistill.data.text_sources import (
    SST2_CLASSES,
    load_hf_disk,
    load_sst2,
    load_text_files,
    read_labelled,
    read_unlabelled,
)
from kdistill.errors import DataError

# shared/data/sst2/README.md
SST2_SHA256 = {
    "train.tsv": "5c47819a1d04cfabc7afcc79a919c97b0b367101ad42d3ff148d67bf501384c2",
    "dev.tsv": "54a9c12c77e402fc14d6a66a506f24d999f596b0176eb777c972cccc2f9cc4b0",
}


@pytest.fixture(scope="module")
def sst2_folder(shared_data: Path) -> Path:
    return shared_data / "sst2"


@pytest.fixture(scope="module")
def sst2(sst2_folder: Path) -> TextBundle:
    return load_sst2(sst2_folder, val_fraction=0.1, split_seed=0, val_unit="rows")


def _message(call, *args, **kwargs) -> str:
    with pytest.raises(DataError) as info:
        call(*args, **kwargs)
    return str(info.value)


# ----------------------------------------------------------------------------- SST-2


def test_sst2_files_match_the_readme(sst2_folder: Path) -> None:
    for name, digest in SST2_SHA256.items():
        assert hashlib.sha256((sst2_folder / name).read_bytes()).hexdigest() == digest


def test_sst2_sizes_labels_and_texts(sst2: TextBundle, sst2_folder: Path) -> None:
    assert sst2.class_names == SST2_CLASSES == ["negative", "positive"]
    assert (len(sst2.train), len(sst2.val), len(sst2.test)) == (67349 - 6735, 6735, 872)
    train_counts = torch.bincount(torch.cat([sst2.train.labels, sst2.val.labels]))
    assert train_counts.tolist() == [29780, 37569]
    assert torch.bincount(sst2.test.labels).tolist() == [428, 444]
    # an independent read of the files: csv with quoting off, trailing space stripped
    with (sst2_folder / "train.tsv").open(encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))[1:]
    expected = Counter((text.strip(), int(label)) for text, label in rows)
    got = Counter(
        zip(
            sst2.train.texts + sst2.val.texts, sst2.train.labels.tolist() + sst2.val.labels.tolist()
        )
    )
    assert got == expected
    assert all(text == text.strip() and text for text in sst2.test.texts)
    assert sst2.settings["test_from"] == "dev.tsv"


def test_sst2_validation_is_seeded_and_disjoint(sst2: TextBundle, sst2_folder: Path) -> None:
    again = load_sst2(sst2_folder, val_fraction=0.1, split_seed=0, val_unit="rows")
    assert again.val.texts == sst2.val.texts and again.fingerprint() == sst2.fingerprint()
    # the split itself, on texts that name their row: disjoint and covering
    rows = TextSplit([str(i) for i in range(67349)], torch.zeros(67349, dtype=torch.int64))
    train, val = split_validation(rows, 0.1, seed=0)
    _, other_val = split_validation(rows, 0.1, seed=1)
    assert len(val) == 6735 and not set(train.texts) & set(val.texts)
    assert sorted(map(int, train.texts + val.texts)) == list(range(67349))
    assert val.texts != other_val.texts
    assert split_validation(rows, 0.1, seed=0)[1].texts == val.texts


def test_sst2_missing_files(tmp_path: Path) -> None:
    (tmp_path / "train.tsv").write_text("sentence\tlabel\ngood\t1\n")
    message = _message(load_sst2, tmp_path)
    assert "dev.tsv" in message and "train.tsv" in message and str(tmp_path) in message


def _naive_sentence_split(texts: list[str], val_fraction: float, seed: int):
    """Reference: by definition, with substring tests on space-padded strings."""
    unique = list(dict.fromkeys(texts))
    padded = {t: f" {t} " for t in unique}
    sentences = [t for t in unique if not any(t != o and padded[t] in padded[o] for o in unique)]
    order = torch.randperm(len(sentences), generator=torch.Generator().manual_seed(seed))
    val = {sentences[i] for i in order[: round(len(sentences) * val_fraction)].tolist()}
    keep = [
        t not in val and any(padded[t] in padded[s] for s in sentences if s not in val)
        for t in texts
    ]
    return [t for t, k in zip(texts, keep) if k], [t for t in texts if t in val]


def test_sentence_split_matches_the_definition() -> None:
    g = torch.Generator().manual_seed(0)
    words = ["a", "b", "c", "d", "e", "f"]
    sentences = [
        " ".join(words[i] for i in torch.randint(0, 6, (int(n),), generator=g))
        for n in torch.randint(3, 9, (40,), generator=g)
    ]
    texts = []
    for s in sentences:  # each sentence and some of its phrases, as SST-2 holds them
        w = s.split()
        texts.append(s)
        for _ in range(4):
            a, b = sorted(torch.randint(0, len(w) + 1, (2,), generator=g).tolist())
            if b > a:
                texts.append(" ".join(w[a:b]))
    texts = [texts[i] for i in torch.randperm(len(texts), generator=g).tolist()]
    full = TextSplit(texts, torch.arange(len(texts)))
    for seed in (0, 1, 2):
        train, val, dropped = split_validation_by_sentence(full, 0.25, seed)
        expected_train, expected_val = _naive_sentence_split(texts, 0.25, seed)
        assert train.texts == expected_train and val.texts == expected_val
        assert dropped == len(texts) - len(train) - len(val)
        rows = train.labels.tolist() + val.labels.tolist()
        assert len(set(rows)) == len(rows)  # each row once


def test_sst2_sentence_validation_holds_out_whole_sentences(sst2_folder: Path) -> None:
    bundle = load_sst2(sst2_folder, val_fraction=0.1, split_seed=0, val_unit="sentences")
    dropped = bundle.settings["dropped_val_phrases"]
    assert len(bundle.train) + len(bundle.val) + dropped == 67349
    assert 500 < len(bundle.val) < 900 and 0 < dropped < 10000  # ~6.9k sentences, 10%
    assert not set(bundle.val.texts) & set(bundle.train.texts)

    def mean_words(texts: list[str]) -> float:
        return sum(len(t.split()) for t in texts) / len(texts)

    # whole sentences, like dev.tsv, not the phrases that make up most of train.tsv
    assert mean_words(bundle.val.texts) > 2 * mean_words(bundle.train.texts)


# ----------------------------------------------------------------------------- your files


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_csv_tsv_jsonl_round_trip(tmp_path: Path) -> None:
    texts = ['a "quoted", comma text', "naïve café ☕", "line one\nline two", "it's `odd'"]
    labels = ["pos", "neg", "pos", "neutral"]
    with (tmp_path / "d.csv").open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "label", "text"])
        writer.writerows([i, label, text] for i, (text, label) in enumerate(zip(texts, labels)))
    tsv_texts = [t.replace("\n", " ") for t in texts]  # TSV has no quoting: one line per row
    _write(
        tmp_path / "d.tsv",
        "text\tlabel\n" + "".join(f"{t}\t{y}\n" for t, y in zip(tsv_texts, labels)),
    )
    _write(
        tmp_path / "d.jsonl",
        "".join(
            json.dumps({"text": t, "label": y, "x": [1]}) + "\n\n" for t, y in zip(texts, labels)
        ),
    )
    for name, expected in (("d.csv", texts), ("d.tsv", tsv_texts), ("d.jsonl", texts)):
        split, classes = read_labelled(tmp_path / name)
        assert split.texts == expected, name
        assert classes == ["neg", "neutral", "pos"]  # sorted
        assert split.labels.tolist() == [2, 0, 2, 1]
    split, classes = read_labelled(tmp_path / "d.csv", class_names=["pos", "neg", "neutral"])
    assert classes == ["pos", "neg", "neutral"] and split.labels.tolist() == [0, 1, 0, 2]


def test_integer_labels_and_explicit_classes(tmp_path: Path) -> None:
    path = _write(tmp_path / "d.jsonl", '{"text": "a", "label": 2}\n{"text": "b", "label": "0"}\n')
    split, classes = read_labelled(path)
    assert classes == ["0", "1", "2"] and split.labels.tolist() == [2, 0]
    split, classes = read_labelled(path, class_names=["x", "y", "z"])
    assert classes == ["x", "y", "z"] and split.labels.tolist() == [2, 0]
    message = _message(read_labelled, path, class_names=["x", "y"])
    assert "2" in message and "line 1" in message and "['x', 'y']" in message


def test_load_text_files_carves_validation_unless_given(tmp_path: Path) -> None:
    rows = "".join(f"text {i},{'ab'[i % 2]}\n" for i in range(50))
    train = _write(tmp_path / "train.csv", "text,label\n" + rows)
    test = _write(tmp_path / "test.csv", "text,label\nfoo,b\nbar,a\n")
    bundle = load_text_files(train=train, test=test, val_fraction=0.2, split_seed=3)
    assert (len(bundle.train), len(bundle.val), len(bundle.test)) == (40, 10, 2)
    assert bundle.class_names == ["a", "b"] and bundle.test.labels.tolist() == [1, 0]
    assert sorted(bundle.train.texts + bundle.val.texts) == sorted(f"text {i}" for i in range(50))
    assert bundle.settings["split_seed"] == 3 and bundle.source == "files"
    with_val = load_text_files(train=train, test=test, val=test)
    assert len(with_val.train) == 50 and with_val.val.texts == ["foo", "bar"]
    assert with_val.settings["val_fraction"] is None


def test_recipe_limits_take_the_first_rows_of_each_split(tmp_path: Path) -> None:
    from kdistill.data import build
    from kdistill.recipe import DataConfig

    rows = "".join(f"text {i},{'ab'[i % 2]}\n" for i in range(50))
    _write(tmp_path / "train.csv", "text,label\n" + rows)
    _write(tmp_path / "test.csv", "text,label\nfoo,b\nbar,a\nbaz,a\n")
    settings = {"source": "text_files", "path": str(tmp_path), "val_fraction": 0.2}
    whole = build(DataConfig(**settings)).bundle
    limited = build(DataConfig(**settings, limit_train=7, limit_val=4, limit_test=2)).bundle
    for name, size in (("train", 7), ("val", 4), ("test", 2)):
        split, full = getattr(limited, name), getattr(whole, name)
        assert split.texts == full.texts[:size], name


def test_fingerprint_follows_content_not_location(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    train = _write(tmp_path / "a" / "train.csv", "text,label\nx,0\ny,1\nz,1\n")
    test = _write(tmp_path / "a" / "test.csv", "text,label\nw,0\n")
    first = load_text_files(train=train, test=test, val_fraction=0)
    moved = shutil.copytree(tmp_path / "a", tmp_path / "b")
    second = load_text_files(train=moved / "train.csv", test=moved / "test.csv", val_fraction=0)
    assert first.fingerprint() == second.fingerprint()
    _write(moved / "test.csv", "text,label\nw,1\n")
    relabelled = load_text_files(train=moved / "train.csv", test=moved / "test.csv", val_fraction=0)
    assert relabelled.fingerprint() != first.fingerprint()
    summary = first.describe()
    assert summary["splits"]["train"]["class_counts"] == {"0": 1, "1": 2}
    assert summary["fingerprint"] == first.fingerprint()


def test_unlabelled_text(tmp_path: Path) -> None:
    txt = _write(tmp_path / "u.txt", "first example\n\n  second example  \nthird\n")
    split = read_unlabelled(txt)
    assert split.texts == ["first example", "second example", "third"]
    assert split.labels.tolist() == [UNLABELLED] * 3 and not split.is_labelled
    jsonl = _write(tmp_path / "u.jsonl", '{"review": "nice", "stars": 5}\n{"review": "meh"}\n')
    assert read_unlabelled(jsonl, text_column="review").texts == ["nice", "meh"]
    both = TextSplit.concat([split, TextSplit(["x"], torch.tensor([1]))])
    assert both.labels.tolist() == [-1, -1, -1, 1] and both.subset([3]).is_labelled


# ----------------------------------------------------------------------------- bad files


def test_missing_text_column_lists_the_columns(tmp_path: Path) -> None:
    path = _write(tmp_path / "d.csv", "review,stars\ngood,1\n")
    message = _message(read_labelled, path, label_column="stars")
    assert "text column 'text'" in message and "['review', 'stars']" in message
    assert str(path) in message and "text_column" in message
    message = _message(read_labelled, path, text_column="review")
    assert "label column 'label'" in message and "['review', 'stars']" in message
    jsonl = _write(tmp_path / "d.jsonl", '{"text": "a", "label": 1}\n{"txt": "b", "label": 0}\n')
    message = _message(read_labelled, jsonl)
    assert "line 2" in message and "['txt', 'label']" in message


def test_wrong_format_gets_a_hint(tmp_path: Path) -> None:
    tsv_named_csv = _write(tmp_path / "d.csv", "text\tlabel\ngood\t1\n")
    assert "TSV" in _message(read_labelled, tsv_named_csv)
    array = _write(tmp_path / "d.json", '[{"text": "a", "label": 1}]\n')
    assert "jq -c" in _message(read_labelled, array)
    not_json = _write(tmp_path / "e.jsonl", "text,label\na,1\n")
    message = _message(read_labelled, not_json)
    assert "line 1" in message and "not valid JSON" in message
    lists = _write(tmp_path / "f.jsonl", '["a", 1]\n')
    assert "one object per line" in _message(read_labelled, lists)
    assert "suffix '.xlsx'" in _message(read_labelled, _write(tmp_path / "d.xlsx", "x"))
    binary = tmp_path / "g.csv"
    binary.write_bytes(b"text,label\n\xff\xfe\x00,1\n")
    assert "UTF-8" in _message(read_labelled, binary)
    ragged = _write(tmp_path / "h.csv", "text,label\na,1\nb,1,extra\n")
    assert "line 3" in _message(read_labelled, ragged)
    assert "no label column" in _message(read_labelled, _write(tmp_path / "i.txt", "a\n"))
    assert "is a folder" in _message(read_labelled, tmp_path, format="csv")
    assert "'xlsx' is not one of" in _message(read_labelled, ragged, format="xlsx")
    texts_not_strings = _write(tmp_path / "j.jsonl", '{"text": 5, "label": 1}\n')
    assert "int" in _message(read_labelled, texts_not_strings)


def test_empty_texts_refused_or_dropped(tmp_path: Path) -> None:
    rows = 'text,label\ngood,1\n,0\n   ,1\nbad,0\n"",1\n'
    train = _write(tmp_path / "train.csv", rows)
    message = _message(read_labelled, train)
    assert "3 of 5 texts" in message and "lines 3, 4, 6" in message and "drop_empty" in message
    split, _ = read_labelled(train, drop_empty=True)
    assert split.texts == ["good", "bad"] and split.labels.tolist() == [1, 0]
    test = _write(tmp_path / "test.csv", "text,label\nfine,1\n")
    bundle = load_text_files(train=train, test=test, drop_empty=True, val_fraction=0)
    assert bundle.settings["dropped_empty"] == {"train": 3, "test": 0}


def test_label_errors(tmp_path: Path) -> None:
    train = _write(tmp_path / "train.csv", "text,label\na,pos\nb,neg\n")
    test = _write(tmp_path / "test.csv", "text,label\nc,pos\nd,postive\ne,nope\n")
    message = _message(load_text_files, train=train, test=test)
    assert "'postive', 'nope'" in message and "lines 3, 4" in message
    assert "['neg', 'pos']" in message and "class_names" in message
    unlabelled = _write(tmp_path / "u.csv", "text,label\na,\nb,1\n")
    assert "no label" in _message(read_labelled, unlabelled)
    negative = _write(tmp_path / "n.jsonl", '{"text": "a", "label": -1}\n')
    assert "negative" in _message(read_labelled, negative)
    floats = _write(tmp_path / "f.jsonl", '{"text": "a", "label": 0.5}\n')
    assert "float" in _message(read_labelled, floats)


# ----------------------------------------------------------------------------- saved datasets


def test_hf_disk_round_trip(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets", reason="pip install datasets")
    features = datasets.Features(
        {"sentence": datasets.Value("string"), "label": datasets.ClassLabel(names=["neg", "pos"])}
    )
    splits = {
        "train": {"sentence": [f"s{i}" for i in range(20)], "label": [i % 2 for i in range(20)]},
        "validation": {"sentence": ["v0", "v1"], "label": [1, 0]},
        "test": {"sentence": ["t0", "t1"], "label": [-1, -1]},  # GLUE style: hidden labels
    }
    saved = datasets.DatasetDict(
        {name: datasets.Dataset.from_dict(data, features=features) for name, data in splits.items()}
    )
    saved.save_to_disk(str(tmp_path / "dd"))
    bundle = load_hf_disk(
        tmp_path / "dd", test_split="validation", text_column="sentence", val_fraction=0.25
    )
    assert bundle.class_names == ["neg", "pos"] and bundle.source == "hf_disk"
    assert (len(bundle.train), len(bundle.val)) == (15, 5) and bundle.test.texts == ["v0", "v1"]
    assert bundle.test.labels.tolist() == [1, 0]
    assert sorted(bundle.train.texts + bundle.val.texts) == sorted(splits["train"]["sentence"])
    message = _message(load_hf_disk, tmp_path / "dd", text_column="sentence")
    assert "-1" in message and "rows 0, 1" in message and "hidden label" in message
    message = _message(load_hf_disk, tmp_path / "dd", test_split="dev", text_column="sentence")
    assert "['test', 'train', 'validation']" in message
    assert "['sentence', 'label']" in _message(load_hf_disk, tmp_path / "dd")
    single = datasets.Dataset.from_dict({"text": ["x", "y"]})
    single.save_to_disk(str(tmp_path / "one"))
    assert read_unlabelled(tmp_path / "one").texts == ["x", "y"]


def test_hf_disk_without_datasets_says_how_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    assert "pip install datasets" in _message(load_hf_disk, tmp_path)
