"""A transfer set for tagging (data.transfer): mention replacement and word masking of
the training sentences, untagged sentences from a file, and a distill stage that
learns the teacher's word distributions on them with no label term."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import fails_cleanly, run_cli, write_recipe
from test_token_classification import _recipe, _steps, synthetic, tagged, write_conll_folder
from torch.nn import functional as F

from kdistill.errors import RecipeError
from kdistill.losses.objective import Objective
from kdistill.recipe import LossTerm, ModelSpec, validate_recipe
from kdistill.tasks.token_classification.augment import augment_tagged, entity_spans
from kdistill.tasks.token_classification.data import UNLABELLED, Sentences
from kdistill.tasks.token_classification.models import make_tagger


@pytest.fixture(scope="module")
def conll_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_conll_folder(tmp_path_factory.mktemp("conll"))


PEOPLE = [["Anna"], ["Bill", "Clinton"], ["Clara"], ["John", "Major"]]
PLACES = [["Paris"], ["Lagos"], ["New", "York"]]


def _sentences() -> tuple[list[list[str]], list[list[str]]]:
    """'<person> went to <place> .', four of the twelve pairs."""
    words, tags = [], []
    for i, person in enumerate(PEOPLE):
        for place in [PLACES[i % len(PLACES)]]:
            words.append([*person, "went", "to", *place, "."])
            tags.append(
                ["B-PER"] + ["I-PER"] * (len(person) - 1) + ["O", "O"]
                + ["B-LOC"] + ["I-LOC"] * (len(place) - 1) + ["O"]
            )  # fmt: skip
    return words, tags


def _parse(sentence: list[str]) -> tuple[tuple[str, ...], list[str], tuple[str, ...]]:
    """(person, the filler words, place) of a '<person> w w <place> w' sentence."""
    person = next(tuple(p) for p in PEOPLE if sentence[: len(p)] == p)
    rest = sentence[len(person) :]
    place = next(tuple(p) for p in PLACES if rest[2 : 2 + len(p)] == p)
    return person, [rest[0], rest[1], rest[-1]], place


def test_entity_spans_read_iob2() -> None:
    tags = ["B-PER", "I-PER", "O", "B-LOC", "B-LOC", "I-LOC", "O", "B-MISC"]
    assert entity_spans(tags) == [(0, 2, "PER"), (3, 4, "LOC"), (4, 6, "LOC"), (7, 8, "MISC")]


def test_mention_replacement_swaps_whole_entities_for_others_of_their_type() -> None:
    words, tags = _sentences()
    out = augment_tagged(words, tags, copies=8, p_mention=1.0, p_mask=0.0, p_word=0.0)
    # most draws repeat a training sentence or an earlier draw here (4 sentences)
    assert len(out.words) >= 4 and out.draws == 8 * len(words)
    assert out.draws == len(out.words) + out.duplicates
    changed = 0
    for sentence, source in zip(out.words, out.source, strict=True):
        person, filler, place = _parse(sentence)  # raises when a span was cut or mixed
        assert filler == ["went", "to", "."]
        original_person, _, original_place = _parse(words[source])
        changed += person != original_person
        changed += place != original_place
    # p_mention 1: every entity is replaced by another one where its type has another
    assert changed == 2 * len(out.words)
    originals = {" ".join(w) for w in words}
    assert not originals & {" ".join(w) for w in out.words}
    assert len({" ".join(w) for w in out.words}) == len(out.words)


def test_masking_and_word_replacement_touch_only_words_outside_entities() -> None:
    words, tags = _sentences()
    masked = augment_tagged(words, tags, copies=1, p_mention=0.0, p_mask=1.0, p_word=0.0)
    for sentence, source in zip(masked.words, masked.source, strict=True):
        expected = [w if t != "O" else "[MASK]" for w, t in zip(words[source], tags[source])]
        assert sentence == expected
    # one copy per sentence, all different: nothing dropped
    assert masked.duplicates == 0 and len(masked.words) == len(words)
    replaced = augment_tagged(words, tags, copies=2, p_mention=0.0, p_mask=0.0, p_word=1.0)
    vocabulary = {w for s in words for w in s}
    for sentence, source in zip(replaced.words, replaced.source, strict=True):
        assert len(sentence) == len(words[source])
        for new, old, tag in zip(sentence, words[source], tags[source], strict=True):
            if tag != "O":
                assert new == old
            else:
                assert new in vocabulary
                # "." is the only punctuation word: it has nothing to be replaced by
                assert new != old or old == "."
                # same shape: punctuation for punctuation, lowercase for lowercase
                assert new.isalpha() == old.isalpha() and new.islower() == old.islower()


def test_augmentation_is_seeded_and_a_cap_keeps_a_prefix() -> None:
    words, tags = (
        [[w for w, _ in s] for s in synthetic(60, 3)],
        [[t for _, t in s] for s in synthetic(60, 3)],
    )
    a = augment_tagged(words, tags, copies=4, seed=1)
    b = augment_tagged(words, tags, copies=4, seed=1)
    c = augment_tagged(words, tags, copies=4, seed=2)
    assert a.words == b.words and a.words != c.words
    capped = augment_tagged(words, tags, copies=4, seed=1, max_total=50)
    assert capped.words == a.words[:50]


def test_transfer_words_feed_the_teacher_terms_and_skip_the_label_terms() -> None:
    data = tagged([["Anna", "went"]], [["B-PER", "O"]])
    data.transfer = Sentences([["Boris", "met", "Anna"]], [None], "memory")
    distill = data.for_distill()
    assert len(distill.train) == 2 and len(data.train) == 1  # the run's data is untouched
    assert distill.labels("train")[1].tolist() == [UNLABELLED] * 3
    torch.manual_seed(0)
    model = make_tagger(data, ModelSpec(name="bilstm", args={"hidden_size": 4}), where="m").eval()
    teacher_words = [torch.randn(2, 5), torch.randn(3, 5)]
    objective = Objective(
        [LossTerm(loss="cross_entropy", weight=0.5), LossTerm(loss="kd", weight=0.5, temperature=2)]
    )
    steps = _steps(distill, model, objective, teacher_words)
    rows = torch.tensor([0, 1])
    assert steps.count(rows, rows, 0).total == 5  # every word the teacher sees counts
    total, parts = steps.loss(model, rows, progress=0.0)
    batch = distill.batch(model, "train", rows)
    with torch.no_grad():
        tokens = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    s = torch.cat([tokens[0, :2], tokens[1, :3]])
    t = torch.cat(teacher_words)
    ce = F.cross_entropy(s[:2], torch.tensor([3, 0]), reduction="sum")  # labelled words only
    kd = 4 * F.kl_div(
        F.log_softmax(s / 2, -1), F.log_softmax(t / 2, -1), log_target=True, reduction="sum"
    )
    assert torch.allclose(parts["cross_entropy"], ce, rtol=1e-4)
    assert torch.allclose(total, 0.5 * ce + 0.5 * kd, rtol=1e-4)


def test_a_distill_stage_trains_on_the_transfer_set_and_the_baseline_does_not(
    tmp_path: Path, conll_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "more.txt").write_text("Anna went to Riga\n\nBoris met a friend in Lima\n")
    transfer = {"file": str(tmp_path / "more.txt"), "augment": {"copies": 2}}
    runs = {}
    for name, extra in (("plain", {}), ("transfer", {"transfer": transfer})):
        recipe = _recipe(conll_dir, seeds=[0])
        recipe["data"].update(extra)
        out = tmp_path / name
        capsys.readouterr()
        assert run_cli(write_recipe(tmp_path / f"{name}.yaml", recipe), out) == 0
        runs[name] = json.loads((out / "results.json").read_text())["stages"]
    # the baseline never reads the transfer set: the same model, the same scores
    assert runs["transfer"]["baseline"]["test"] == runs["plain"]["baseline"]["test"]
    assert runs["transfer"]["distill"]["test"] != runs["plain"]["distill"]["test"]
    manifest = json.loads((tmp_path / "transfer/cache/teacher-seed0/manifest.json").read_text())
    plain = json.loads((tmp_path / "plain/cache/teacher-seed0/manifest.json").read_text())
    # 160 training sentences, 2 from the file, and up to 2 × 160 augmented ones
    assert 162 + 160 < manifest["rows"] <= 162 + 320 and plain["rows"] == 160
    captured = capsys.readouterr()
    log = " ".join((captured.out + captured.err).split())
    assert "distill adds" in log and "untagged sentences" in log and "more.txt" in log


def test_a_transfer_section_without_sentences_is_refused(tmp_path: Path) -> None:
    recipe = _recipe(tmp_path)
    recipe["data"]["transfer"] = {}
    with pytest.raises(RecipeError, match="give a file, an augment section"):
        validate_recipe(recipe)
    recipe["data"]["transfer"] = {"augment": {"p_mask": 0.6, "p_word": 0.6}}
    with pytest.raises(RecipeError, match=r"p_mask \+ p_word is 1\.2"):
        validate_recipe(recipe)


def test_a_missing_transfer_file_is_named(
    tmp_path: Path, conll_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    recipe = _recipe(conll_dir)
    recipe["data"]["transfer"] = {"file": "nowhere/more.txt"}
    path = write_recipe(tmp_path / "r.yaml", recipe)
    fails_cleanly(
        capsys, ["run", str(path), "--output-dir", str(tmp_path / "run"),
                 "--data-dir", str(tmp_path)],
        "data.transfer.file", str(tmp_path / "nowhere" / "more.txt"), "does not exist",
    )  # fmt: skip
