"""Bad inputs of the seq2seq (translation) task: each refused with one clear message
(DataError, ModelError, CacheError, or `kdistill` exit status 2 with no traceback) before
anything trains, or, for sentences past the length limits, cut and counted. Plus the
readers: TSV, JSON Lines and a saved Hugging Face dataset give the same pairs as a file
pair. Tiny synthetic English/German pairs and a 16-wide Marian keep each test to seconds."""

from __future__ import annotations

import gzip
import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import fails_cleanly, write_recipe

from kdistill.cli import main
from kdistill.errors import CacheError, DataError, ModelError, RecipeError

pytest.importorskip("transformers")
pytest.importorskip("sacrebleu")

from kdistill import api
from kdistill.models.hf import quiet_transformers
from kdistill.recipe.seq2seq import (
    Seq2SeqDataConfig,
    Seq2SeqModelSpec,
    Seq2SeqSeqKDConfig,
    Seq2SeqTokenizerConfig,
    ShrinkSpec,
)
from kdistill.tasks.seq2seq import pipeline
from kdistill.tasks.seq2seq.data import (
    Tokenizers,
    load_seq2seq,
    read_split,
    train_tokenizer,
)
from kdistill.tasks.seq2seq.models import (
    build_model,
    shrink,
    weights_fingerprint,
)
from kdistill.tasks.seq2seq.pipeline import (
    Teacher,
    check_vocabularies,
    read_translations,
    translations_spec,
    write_translations,
)

EN = [("red", "rote"), ("big", "große"), ("small", "kleine"), ("old", "alte"), ("young", "junge")]
NOUNS = [("dog", "hund"), ("man", "mann"), ("woman", "frau"), ("child", "kind")]
VERBS = [("runs", "läuft"), ("sleeps", "schläft")]
PAIRS = [
    (f"the {a} {n} {v} .", f"der {b} {m} {w} .") for a, b in EN for n, m in NOUNS for v, w in VERBS
]  # 40 pairs
LONG_EN = " ".join(["the big old dog runs and sleeps"] * 5) + " ."  # 36 words
LONG_DE = " ".join(["der große alte hund läuft und schläft"] * 5) + " ."

MARIAN = {
    "type": "marian",
    "d_model": 16,
    "encoder_layers": 1,
    "decoder_layers": 1,
    "encoder_attention_heads": 2,
    "decoder_attention_heads": 2,
    "encoder_ffn_dim": 32,
    "decoder_ffn_dim": 32,
    "max_position_embeddings": 64,
}


def write_pairs(folder: Path, split: str, pairs: list[tuple[str, str]]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{split}.en").write_text("".join(s + "\n" for s, _ in pairs), encoding="utf-8")
    (folder / f"{split}.de").write_text("".join(t + "\n" for _, t in pairs), encoding="utf-8")


@pytest.fixture()
def corpus(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """train (40 pairs), val (8) and test (8) as file pairs in tmp_path/corpus."""
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "corpus"
    write_pairs(folder, "train", PAIRS)
    write_pairs(folder, "val", PAIRS[:8])
    write_pairs(folder, "test", PAIRS[8:16])
    return folder


def section(folder: Path, **changes: Any) -> Seq2SeqDataConfig:
    values: dict[str, Any] = {
        "path": str(folder),
        "train": "train",
        "val": "val",
        "test": "test",
        "max_source_length": 32,
        "max_target_length": 32,
        "tokenizer": {"kind": "bpe", "vocab_size": 120},  # whole words here
    }
    values.update(changes)
    return Seq2SeqDataConfig.model_validate(values)


def tiny_s2s(folder: Path, **changes: Any) -> dict[str, Any]:
    """A translation recipe whose stages each take about a second."""
    recipe: dict[str, Any] = {
        "task": "seq2seq",
        "name": "tiny_s2s",
        "data": section(folder).model_dump(mode="json", exclude_defaults=True),
        "teacher": {"model": {"config": dict(MARIAN)}},
        "student": {"model": {"config": dict(MARIAN)}},
        "objective": [
            {"loss": "cross_entropy", "weight": 0.5},
            {"loss": "forward_kl", "weight": 0.5},
        ],
        "evaluation": {
            "beam": {"num_beams": 2, "max_new_tokens": 8, "batch_size": 8},
            "greedy_max_new_tokens": 8,
            "samples": 1,
        },
        "train": {"epochs": 1, "batch_size": 8},
        "stages": ["teacher", "baseline", "distill"],
        "seeds": [0],
    }
    recipe.update(changes)
    return recipe


def refused_run(
    recipe: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str], *needles: str
) -> str:
    """`kdistill run` exits 2 with every needle in its message, and nothing trained."""
    path = write_recipe(tmp_path / "recipe.yaml", recipe)
    out = tmp_path / "run"
    err = fails_cleanly(capsys, ["run", str(path), "--output-dir", str(out), "--quiet"], *needles)
    assert not list(out.glob("*/seed*/model.safetensors")), "something trained"
    assert not (out / "teacher" / "seed0" / "model.safetensors").exists()
    return err


# ------------------------------------------------------------------ 1. line counts


def test_file_pair_with_different_line_counts(
    corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (corpus / "train.de").write_text("".join(t + "\n" for _, t in PAIRS[:-1]), encoding="utf-8")
    with pytest.raises(DataError) as caught:
        read_split(section(corpus), "train")
    message = str(caught.value)
    assert f"{corpus / 'train.en'} has 40 lines" in message
    assert f"{corpus / 'train.de'} has 39" in message
    path = write_recipe(tmp_path / "recipe.yaml", tiny_s2s(corpus))
    fails_cleanly(capsys, ["validate", str(path)], "data.train", "train.en has 40 lines", "39")
    refused_run(tiny_s2s(corpus), tmp_path, capsys, "train.en has 40 lines", "train.de has 39")


# -------------------------------------------------------------------- 2. empty sides


@pytest.mark.parametrize(
    ("source", "target", "side"),
    [("", "", "both sides"), ("   ", "der hund .", "source"), ("the dog .", "", "target")],
)
def test_pair_with_an_empty_side(
    corpus: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    source: str,
    target: str,
    side: str,
) -> None:
    pairs = list(PAIRS)
    pairs[2] = (source, target)  # line 3
    write_pairs(corpus, "train", pairs)
    with pytest.raises(DataError) as caught:
        read_split(section(corpus), "train")
    message = str(caught.value)
    assert str(corpus / "train.en") in message and str(corpus / "train.de") in message
    assert f"line 3 ({side})" in message
    path = write_recipe(tmp_path / "recipe.yaml", tiny_s2s(corpus))
    fails_cleanly(capsys, ["validate", str(path)], "train.en", f"line 3 ({side})", "empty")


def test_empty_side_in_tsv_and_jsonl_names_the_line(corpus: Path) -> None:
    lines = [f"{s}\t{t}" for s, t in PAIRS[:4]]
    lines[1] = "the dog .\t "
    (corpus / "bad.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.tsv.*line 2 \(target\)"):
        read_split(section(corpus), "bad")
    records = [json.dumps({"en": s, "de": t}) for s, t in PAIRS[:4]]
    records[3] = json.dumps({"en": "", "de": "der hund ."})
    (corpus / "bad2.jsonl").write_text("\n".join(records) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"bad2\.jsonl.*line 4 \(source\)"):
        read_split(section(corpus), "bad2")


# -------------------------------------------------------------- 3. cut, not refused


def test_sentences_past_the_length_limits_are_cut_and_counted(corpus: Path, tmp_path: Path) -> None:
    train = [*PAIRS[:37], (LONG_EN, PAIRS[37][1]), (PAIRS[38][0], LONG_DE), (LONG_EN, LONG_DE)]
    write_pairs(corpus, "train", train)
    write_pairs(corpus, "test", [*PAIRS[8:15], (PAIRS[15][0], LONG_DE)])
    limits = {"max_source_length": 16, "max_target_length": 12}
    data = load_seq2seq(section(corpus, **limits))
    info = data.info()
    assert info["cut_sources"] == {"train": 2, "val": 0, "test": 0}
    assert info["cut_targets"] == {"train": 2, "val": 0, "test": 1}
    assert info["pairs"] == {"train": 40, "val": 8, "test": 8}
    eos = data.eos_id
    for pairs in (data.train, data.test):
        assert all(len(s) <= 16 and s[-1] == eos for s in pairs.sources)
        assert all(len(t) <= 12 and t[-1] == eos for t in pairs.targets)
    assert len(data.train.sources[37]) == 16 and len(data.train.targets[38]) == 12
    assert len(data.train.sources[0]) < 16  # the short ones are whole
    # the limit counts </s>: "the red dog runs ." is 5 word tokens + </s>
    assert load_seq2seq(section(corpus, max_source_length=6)).train.cut_sources == 2
    assert load_seq2seq(section(corpus, max_source_length=5)).train.cut_sources == 40

    recipe = tiny_s2s(corpus, stages=["baseline"], teacher=None)
    recipe["data"].update(limits)
    results = api.run(recipe, output_dir=tmp_path / "run", quiet=True)
    markdown = (tmp_path / "run" / "results.md").read_text(encoding="utf-8")
    assert "Sentences cut at the length limits: sources 2, targets 3" in markdown
    assert results["data"]["cut_targets"]["test"] == 1


# -------------------------------------------------------------- 4. decoding must end


def test_decoding_without_max_new_tokens_is_refused(
    corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    stages = ["teacher", "seqkd"]
    with pytest.raises(RecipeError) as caught:
        api.as_recipe(tiny_s2s(corpus, stages=stages, seqkd={"num_beams": 4}))
    assert "seqkd.max_new_tokens" in " ".join(str(caught.value).split())

    beam = tiny_s2s(corpus)
    beam["evaluation"]["beam"] = {"num_beams": 4}
    with pytest.raises(RecipeError) as caught:
        api.as_recipe(beam)
    assert "evaluation.beam.max_new_tokens" in " ".join(str(caught.value).split())

    with pytest.raises(RecipeError) as caught:
        api.as_recipe(tiny_s2s(corpus, stages=stages))
    flat = " ".join(str(caught.value).split())
    assert "'seqkd' section" in flat and "max_new_tokens" in flat

    path = write_recipe(tmp_path / "recipe.yaml", tiny_s2s(corpus, stages=stages))
    fails_cleanly(capsys, ["validate", str(path)], "seqkd", "max_new_tokens")
    ok = tiny_s2s(corpus, stages=stages, seqkd={"num_beams": 2, "max_new_tokens": 8})
    assert api.as_recipe(ok).seqkd.max_new_tokens == 8


# ------------------------------------------------------ 5. shrink past the last layer


def test_shrink_past_the_teachers_last_layer(
    corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = load_seq2seq(section(corpus))
    spec = Seq2SeqModelSpec(config={**MARIAN, "decoder_layers": 2})
    teacher = build_model(spec, data.tokenizers, where="teacher.model")
    bad = ShrinkSpec(decoder_layers=[0, 5])
    with pytest.raises(ModelError) as caught:
        shrink(teacher, bad, where="student.model.shrink")
    message = str(caught.value)
    assert "decoder_layers" in message and "5" in message and "it has 2" in message
    assert shrink(teacher, ShrinkSpec(decoder_layers=[1]), where="s").layer_counts() == (1, 1)

    recipe = tiny_s2s(corpus, stages=["teacher", "baseline"])
    recipe["teacher"]["model"]["config"]["decoder_layers"] = 2
    recipe["student"] = {"model": {"shrink": {"decoder_layers": [0, 5]}}}
    refused_run(recipe, tmp_path, capsys, "decoder_layers", "5", "it has 2")


# ----------------------------------------------- 6. teacher with its own vocabulary


def teacher_with_own_tokenizer(folder: Path) -> Path:
    """A save_pretrained folder holding a Marian and its own (unigram) tokenizer."""
    texts = [s for s, _ in PAIRS] + [t for _, t in PAIRS]
    own = train_tokenizer(texts, Seq2SeqTokenizerConfig(kind="unigram", vocab_size=90))
    tokenizers = Tokenizers(own, own)
    torch.manual_seed(0)
    model = build_model(Seq2SeqModelSpec(config=MARIAN), tokenizers, where="teacher.model")
    with quiet_transformers():
        model.hf.save_pretrained(str(folder))
    tokenizers.save(folder)
    return folder


def test_teacher_with_another_vocabulary_for_a_token_level_loss(
    corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = teacher_with_own_tokenizer(tmp_path / "teacher_hf")
    data = load_seq2seq(section(corpus))
    teacher = build_model(Seq2SeqModelSpec(path=str(folder)), data.tokenizers, where="t")
    assert teacher.tokenizer_key != data.tokenizers.key  # the folder's own tokenizer
    student = build_model(Seq2SeqModelSpec(config=MARIAN), data.tokenizers, where="s")
    with pytest.raises(ModelError, match="seqkd"):
        check_vocabularies(teacher, student)
    same = build_model(Seq2SeqModelSpec(config=MARIAN), teacher.kdistill_tokenizers, where="s")
    check_vocabularies(teacher, same)  # one tokenizer: fine

    recipe = tiny_s2s(corpus, stages=["distill"])
    recipe["teacher"] = {"model": {"path": str(folder)}}
    refused_run(recipe, tmp_path, capsys, "seqkd", "vocabularies")

    # what the message points to: sequence-level KD passes the teacher's text across
    recipe["stages"] = ["seqkd"]
    recipe["seqkd"] = {"num_beams": 2, "max_new_tokens": 8, "mix_references": True}
    results = api.run(recipe, output_dir=tmp_path / "seqkd_run", quiet=True)
    assert set(results["stages"]) == {"teacher", "seqkd"}
    manifest = tmp_path / "seqkd_run" / "seqkd" / "translations" / "manifest.json"
    assert json.loads(manifest.read_text())["spec"]["tokenizer"] == teacher.tokenizer_key


def test_teacher_folder_without_tokenizer_and_a_smaller_vocabulary(
    corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = teacher_with_own_tokenizer(tmp_path / "teacher_hf")
    (folder / "tokenizer.json").unlink()  # it takes the run's, larger than its vocabulary
    run_tokenizers = load_seq2seq(section(corpus)).tokenizers
    with pytest.raises(ModelError, match=r"t.path: the model.s input embedding has \d+ rows"):
        build_model(Seq2SeqModelSpec(path=str(folder)), run_tokenizers, where="t")
    recipe = tiny_s2s(corpus, stages=["distill"])
    recipe["teacher"] = {"model": {"path": str(folder)}}
    refused_run(recipe, tmp_path, capsys, "teacher.model.path", "rows")


# ------------------------------------------------------- 7. the teacher's translations


def test_stale_and_interrupted_teacher_translations(
    corpus: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = load_seq2seq(section(corpus))
    torch.manual_seed(0)
    model = build_model(Seq2SeqModelSpec(config=MARIAN), data.tokenizers, where="teacher.model")
    teacher = Teacher(model, 0, weights_fingerprint(model))
    settings = Seq2SeqSeqKDConfig(num_beams=2, max_new_tokens=6, batch_size=8)
    spec = translations_spec(teacher, data, settings)
    first = tmp_path / "translations"
    info = write_translations(first, spec, model, data.train, settings, "cpu")
    assert not info["reused"]
    before = {p.name: p.read_bytes() for p in first.iterdir()}
    texts = read_translations(first, spec)
    assert len(texts) == 40

    other = settings.model_copy(update={"num_beams": 3})
    stale = translations_spec(teacher, data, other)
    with pytest.raises(CacheError, match="num_beams") as caught:
        write_translations(first, stale, model, data.train, other, "cpu")
    assert "max_new_tokens" not in str(caught.value)  # only the key that differs
    assert {p.name: p.read_bytes() for p in first.iterdir()} == before  # left as it was
    with pytest.raises(CacheError):
        read_translations(first, stale)
    assert write_translations(first, spec, model, data.train, settings, "cpu")["reused"]

    # an interrupted write: 5 whole lines (marked) and a broken last one; the rest is
    # "translated" by an echo of each source, so every line shows which source it is of
    records = {r["i"]: r for r in map(json.loads, before["translations.jsonl"].splitlines())}
    assert sorted(records) == list(range(40))
    monkeypatch.setattr(pipeline, "translate", echo)
    kept = {i: {**records[i], "text": f"kept {i}"} for i in (3, 0, 11, 7, 20)}
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    (resumed / "manifest.json").write_text(json.dumps({"spec": spec, "complete": False}))
    partial = "".join(json.dumps(r) + "\n" for r in kept.values()) + '{"i": 25, "text": "hal'
    (resumed / "translations.jsonl").write_text(partial, encoding="utf-8")
    info = write_translations(resumed, spec, model, data.train, settings, "cpu")
    assert not info["reused"]
    lines = (resumed / "translations.jsonl").read_text(encoding="utf-8").splitlines()
    written = [json.loads(line) for line in lines]  # every line whole
    counts = Counter(r["i"] for r in written)
    assert sorted(counts) == list(range(40)) and set(counts.values()) == {1}
    assert json.loads((resumed / "manifest.json").read_text())["complete"] is True
    again = read_translations(resumed, spec)
    for i in range(40):
        source = data.tokenizers.decode(data.train.sources[i][:-1].tolist())
        assert again[i] == (f"kept {i}" if i in kept else source), i  # 25: written again
    assert again[25] == PAIRS[25][0]  # the broken line's source, translated again


def echo(model: Any, sources: list[Any], settings: Any, *, device: Any, on_batch: Any) -> None:
    """`translate` that writes each source's own tokens back, three sources a batch, the
    longest first (as translate does, in an order other than the one given)."""
    order = sorted(range(len(sources)), key=lambda i: -len(sources[i]))
    for first in range(0, len(order), 3):
        chosen = order[first : first + 3]
        on_batch(chosen, [sources[i][:-1].tolist() for i in chosen])


# ------------------------------------------------------------- 8. TSV and JSON Lines


def test_tsv_line_without_a_tab(corpus: Path) -> None:
    lines = [f"{s}\t{t}" for s, t in PAIRS[:6]]
    lines[3] = "the dog runs . der hund läuft ."
    lines[4] = "a\tb\tc"
    (corpus / "pairs.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(DataError) as caught:
        read_split(section(corpus), "pairs")
    message = str(caught.value)
    assert str(corpus / "pairs.tsv") in message and "source<TAB>target" in message
    assert "line 4 has 1 tab-separated fields" in message
    assert "line 5 has 3 tab-separated fields" in message


def test_jsonl_line_without_the_target_field(corpus: Path) -> None:
    records = [json.dumps({"en": s, "de": t}) for s, t in PAIRS[:6]]
    records[1] = json.dumps({"en": "the dog ."})
    records[4] = '{"en": "the dog .", "de": '
    (corpus / "pairs.jsonl").write_text("\n".join(records) + "\n", encoding="utf-8")
    with pytest.raises(DataError) as caught:
        read_split(section(corpus), "pairs")
    message = str(caught.value)
    assert str(corpus / "pairs.jsonl") in message
    assert "line 2 has no field 'de' (it has en)" in message
    assert "line 5 is not JSON" in message
    assert "data.target_field" in message


# ---------------------------------------------------- the readers agree on the pairs


def test_tsv_jsonl_and_saved_dataset_read_as_the_file_pair(corpus: Path) -> None:
    pytest.importorskip("datasets")
    import datasets

    sources, targets = [s for s, _ in PAIRS], [t for _, t in PAIRS]
    (corpus / "tsv.tsv").write_text("".join(f"{s}\t{t}\n" for s, t in PAIRS), encoding="utf-8")
    flat = "".join(json.dumps({"en": s, "de": t}) + "\n" for s, t in PAIRS)
    (corpus / "flat.jsonl").write_text(flat, encoding="utf-8")
    hub = "".join(json.dumps({"translation": {"de": t, "en": s}}) + "\n" for s, t in PAIRS)
    (corpus / "hub.jsonl").write_text(hub, encoding="utf-8")
    with gzip.open(corpus / "gz.tsv.gz", "wt", encoding="utf-8") as handle:
        handle.write("".join(f"{s}\t{t}\n" for s, t in PAIRS))
    for lang, side in (("en", sources), ("de", targets)):
        with gzip.open(corpus / f"gzpair.{lang}.gz", "wt", encoding="utf-8") as handle:
            handle.write("".join(x + "\n" for x in side))
    datasets.Dataset.from_dict({"en": sources, "de": targets}).save_to_disk(corpus / "columns")
    translation = [{"en": s, "de": t} for s, t in PAIRS]
    datasets.Dataset.from_dict({"translation": translation}).save_to_disk(corpus / "hubset")
    datasets.Dataset.from_dict({"src": sources, "tgt": targets}).save_to_disk(corpus / "named")

    reference = read_split(section(corpus), "train")
    assert (reference.sources, reference.targets) == (sources, targets)
    for name in ("tsv", "flat", "hub", "gz", "gzpair", "columns", "hubset"):
        pairs = read_split(section(corpus), name)
        assert (pairs.sources, pairs.targets) == (sources, targets), name
    fields = section(corpus, source_field="src", target_field="tgt")
    pairs = read_split(fields, "named")
    assert (pairs.sources, pairs.targets) == (sources, targets)
    pairs = read_split(section(corpus), str(corpus / "tsv.tsv")[: -len(".tsv")])  # a path
    assert (pairs.sources, pairs.targets) == (sources, targets)
    with pytest.raises(DataError, match="src"):
        read_split(section(corpus), "named")  # en/de fields absent: names what it has


def test_cli_run_refuses_missing_split(
    corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (corpus / "val.de").unlink()
    refused_run(tiny_s2s(corpus), tmp_path, capsys, "val.en", "no de side")
    assert main(["validate", str(tmp_path / "recipe.yaml")]) == 2


def test_run_without_a_validation_split(corpus: Path, tmp_path: Path) -> None:
    recipe = tiny_s2s(corpus, stages=["baseline"], teacher=None)
    recipe["data"]["val"] = None
    results = api.run(recipe, output_dir=tmp_path / "run", quiet=True)
    assert results["stages"]["baseline"]["test"]["bleu"] >= 0
