"""`kdistill tune` on the tasks added after it (named entities, question answering,
translation): each study maximises its task's own validation metric, trains or reads
the teacher once, and every trial reads the teacher's cache."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import optuna
import pytest
from test_question_answering import _recipe as qa_recipe
from test_question_answering import squad_file
from test_token_classification import _recipe as ner_recipe
from test_token_classification import write_conll_folder

from kdistill.api import tune


def _study(recipe: dict[str, Any], folder: Path, **kwargs: Any) -> dict[str, Any]:
    recipe["tune"] = {
        "space": {"objective.1.weight": {"low": 0.2, "high": 0.9}},
        "sampler": "random",
        "trials": 2,
        "final_seeds": [0],
    }
    return tune(recipe, output_dir=folder, quiet=True, **kwargs)


def _check(summary: dict[str, Any], folder: Path, name: str, metric: str, hit: str) -> None:
    assert summary["objectives"] == [metric] and summary["directions"] == ["maximize"]
    assert summary["complete"] == 2
    study = optuna.load_study(study_name=name, storage=f"sqlite:///{folder}/study.db")
    assert summary["best"][0]["values"][metric] == max(t.value for t in study.trials)
    logs = [(trial / "trial.log").read_text() for trial in (folder / "trials").iterdir()]
    assert len(logs) == 2 and all(hit in log for log in logs)
    assert (folder / "results.md").is_file() and (folder / "best_recipe.yaml").is_file()


def test_a_named_entity_study_maximises_validation_f1(tmp_path: Path) -> None:
    (tmp_path / "conll").mkdir()
    recipe = ner_recipe(write_conll_folder(tmp_path / "conll"), seeds=[0])
    summary = _study(recipe, tmp_path / "ner")
    _check(summary, tmp_path / "ner", "ner_tiny", "val_f1", "teacher signal: cache hit")


@pytest.mark.slow
def test_a_question_answering_study_maximises_validation_f1(tmp_path: Path) -> None:
    recipe = qa_recipe(squad_file(tmp_path / "tiny.json"))
    summary = _study(recipe, tmp_path / "qa")
    _check(summary, tmp_path / "qa", "qa_tiny", "val_f1", "teacher signal: cache hit")


@pytest.mark.slow
def test_a_translation_study_maximises_validation_bleu(tmp_path: Path, shared_data: Path) -> None:
    from test_seq2seq import tiny_mt_recipe

    if not (shared_data / "multi30k" / "train.en.gz").is_file():
        pytest.skip("Multi30k is not in the data folder ($KDISTILL_DATA)")
    recipe = tiny_mt_recipe(stages=["teacher", "distill"], seeds=[0])
    recipe["teacher"]["signal"] = "cache"  # top-k of the teacher, written once per study
    summary = _study(recipe, tmp_path / "mt", data_dir=shared_data)
    _check(summary, tmp_path / "mt", "tiny_mt", "val_bleu", "pairs read from")
