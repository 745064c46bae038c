"""Recipe schema: every shipped recipe validates; bad input fails with paths and hints."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from helpers import fails_cleanly, write_recipe

from kdistill.errors import RecipeError
from kdistill.recipe import apply_overrides, load_recipe, validate_recipe
from kdistill.recipes import shipped

MINIMAL = {
    "name": "t",
    "data": {"source": "mnist"},
    "teacher": {"model": {"name": "mlp"}},
    "student": {"model": {"name": "mlp", "args": {"hidden": [16]}}},
    "objective": [{"loss": "kd", "temperature": 4}],
}


def _error(raw: dict) -> str:
    with pytest.raises(RecipeError) as info:
        validate_recipe(raw, source="r.yaml")
    return str(info.value)


@pytest.mark.parametrize("path", sorted(shipped().values()), ids=lambda p: p.stem)
def test_every_shipped_recipe_validates(path: Path) -> None:
    import kdistill

    recipe = kdistill.load_recipe(path)  # classifier or language-model schema
    assert recipe.name == path.stem
    assert recipe.description


def test_minimal_recipe_has_defaults() -> None:
    recipe = validate_recipe(MINIMAL)
    assert recipe.stages == ["teacher", "baseline", "distill"]
    assert recipe.seeds == [0]
    assert recipe.teacher_train() == recipe.train


def test_unknown_key_names_path_and_suggests() -> None:
    raw = {**MINIMAL, "train": {"epoch": 3}}
    message = _error(raw)
    assert "train: unknown key 'epoch'" in message or "train.epoch" in message
    assert "did you mean 'epochs'" in message


def test_all_errors_reported_at_once() -> None:
    raw = {**MINIMAL, "train": {"epochs": "three", "batch_size": -1}, "seeds": []}
    message = _error(raw)
    assert "3 problems" in message
    assert "train.epochs" in message and "train.batch_size" in message and "seeds" in message


def test_negative_temperature_rejected() -> None:
    raw = {**MINIMAL, "objective": [{"loss": "kd", "temperature": -2}]}
    message = _error(raw)
    assert "objective[0]" in message and "temperature" in message and "(0, inf)" in message


def test_weight_schedule_leaving_range_rejected() -> None:
    raw = {
        **MINIMAL,
        "objective": [{"loss": "kd", "weight": {"kind": "linear", "start": 1, "end": -0.5}}],
    }
    message = _error(raw)
    assert "weight" in message and "[0, inf)" in message and "-0.5" in message


def test_unknown_loss_and_param_suggest() -> None:
    assert "did you mean 'kd'" in _error({**MINIMAL, "objective": [{"loss": "kdd"}]})
    message = _error({**MINIMAL, "objective": [{"loss": "dkd", "params": {"alhpa": 1}}]})
    assert "did you mean 'alpha'" in message


def test_loss_parameter_value_checked_by_the_loss() -> None:
    message = _error({**MINIMAL, "objective": [{"loss": "jsd", "params": {"beta": 2}}]})
    assert "beta" in message


def test_cache_with_augmentation_rejected() -> None:
    raw = {**MINIMAL, "teacher": {"model": {"name": "mlp"}, "cache": True}}
    raw["train"] = {"augment": {"jitter": 2}}
    assert "cache" in _error(raw) and "augment" in _error(raw)


def test_teacher_train_inherits_from_train() -> None:
    raw = {**MINIMAL, "train": {"epochs": 7, "batch_size": 64}}
    raw["teacher"] = {"model": {"name": "mlp"}, "train": {"epochs": 20}}
    recipe = validate_recipe(raw)
    assert recipe.teacher_train().epochs == 20
    assert recipe.teacher_train().batch_size == 64


def test_overrides_go_through_validation(tmp_path: Path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(MINIMAL))
    assert load_recipe(path, ["train.epochs=3"]).train.epochs == 3
    assert load_recipe(path, ["objective.0.temperature=2"]).objective[0].temperature == 2
    with pytest.raises(RecipeError, match=r"train\.epochs"):
        load_recipe(path, ["train.epochs=-1"])
    with pytest.raises(RecipeError, match="key=value"):
        load_recipe(path, ["train.epochs"])
    with pytest.raises(RecipeError, match="did you mean 'epochs'"):
        load_recipe(path, ["train.epoch=3"])


def test_apply_overrides_does_not_mutate() -> None:
    raw = {"a": {"b": 1}}
    assert apply_overrides(raw, ["a.b=2"]) == {"a": {"b": 2}}
    assert raw == {"a": {"b": 1}}


def test_missing_and_empty_files(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="does not exist"):
        load_recipe(tmp_path / "nope.yaml")
    (tmp_path / "empty.yaml").write_text("")
    with pytest.raises(RecipeError, match="empty"):
        load_recipe(tmp_path / "empty.yaml")
    (tmp_path / "bad.yaml").write_text("name: [unclosed")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(tmp_path / "bad.yaml")


def test_distill_without_teacher_source_rejected() -> None:
    raw = {**MINIMAL, "stages": ["distill"]}
    assert "teacher.checkpoint" in _error(raw)


def test_the_task_picks_the_schema_and_an_unknown_task_is_named(tmp_path: Path) -> None:
    """`task:` is read in one place (kdistill.tasks): classification is the default and
    may be written out; a misspelt task gets a suggestion, not the classifier's
    'unknown key task'."""
    from kdistill import as_recipe
    from kdistill.errors import RecipeError
    from kdistill.recipe import Recipe

    raw = {"name": "t", "data": {"source": "mnist"}, "stages": ["teacher"],
           "teacher": {"model": {"name": "mlp"}}}  # fmt: skip
    assert isinstance(as_recipe(raw), Recipe)
    assert as_recipe({**raw, "task": "classification"}).task == "classification"
    with pytest.raises(
        RecipeError, match=r"unknown task 'causal-lm' \(did you mean 'causal_lm'\?\)"
    ):
        as_recipe({**raw, "task": "causal-lm"})


def test_cross_field_problems_are_collected_and_raised_once() -> None:
    """Two unrelated whole-recipe problems come back together, one line each."""
    raw = {
        "name": "t",
        "data": {"source": "mnist"},
        "stages": ["baseline", "assistant"],  # no student, no assistant section, no teacher
    }
    with pytest.raises(RecipeError) as caught:
        validate_recipe(raw)
    message = str(caught.value)
    assert "3 problems in the recipe" in message
    for needle in (
        "stages 'baseline' and 'distill' need a 'student' section",
        "the 'assistant' stage needs an 'assistant' section",
        "the 'assistant' stage needs a 'teacher' section",
    ):
        assert f"\n  - (top level): {needle}" in message


@pytest.mark.parametrize(
    ("change", "path", "message"),
    [
        ({"seeds": [0, 1, 0]}, "seeds", "seed 0 is listed more than once"),
        ({"objective": []}, "objective", "the objective is empty"),
        ({"train": {"optimizer": {"lr": float("inf")}}}, "train.optimizer.lr", "finite"),
        ({"objective": [{"loss": "kd", "temperature": float("nan")}]}, "temperature", "finite"),
        ({"train": {"grad_clip": float("inf")}}, "train.grad_clip", "finite"),
    ],
)
def test_validate_refuses_what_run_would_find_later(change: dict, path: str, message: str) -> None:
    """Repeated seeds, an empty objective and numbers that are not finite are refused by
    `validate`, with the YAML path, instead of running once or turning into a NaN loss."""
    text = _error({**MINIMAL, **change})
    assert path in text and message in text


def test_causal_lm_recipes_refuse_the_same() -> None:
    raw = {
        "task": "causal_lm",
        "name": "t",
        "data": {"corpus": ["c.txt"], "tokenizer": {"vocab_size": 300}},
        "student": {"model": {"config": {"type": "gpt2"}}},
        "stages": ["baseline"],
        "seeds": [3, 3],
        "objective": [],
        "train": {"optimizer": {"lr": float("nan")}},
    }
    text = _error(raw)
    assert "seed 3 is listed more than once" in text and "the objective is empty" in text
    assert "train.optimizer.lr" in text and "finite" in text


def test_a_key_given_twice_is_refused_with_both_lines(tmp_path: Path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text(
        "name: t\ndata:\n  source: mnist\nseeds: [0, 1]\ntrain: {epochs: 2}\nseeds: [5]\n"
    )
    with pytest.raises(RecipeError, match="the key 'seeds' is given twice, on lines 4 and 6"):
        load_recipe(path)
    path.write_text("name: t\ndata: {source: mnist, source: npz}\n")  # inside a flow mapping
    with pytest.raises(RecipeError, match="'source' is given twice"):
        load_recipe(path)
    path.write_text("name: t\n? [a, b]\n: 1\n")  # a key YAML cannot hash: its own error
    with pytest.raises(RecipeError, match=r"not valid YAML(.|\n)*unhashable key"):
        load_recipe(path)


def test_a_recipe_that_is_not_utf8_is_one_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "r.yaml"
    path.write_bytes("name: café\n".encode("latin-1"))
    with pytest.raises(RecipeError, match=r"not UTF-8 text .*save the recipe as UTF-8"):
        load_recipe(path)


@pytest.mark.parametrize("name", ["../../x:foo", "pkg/mod:f", "pkg.mod:", "a..b:f"])
def test_a_malformed_code_name_is_refused_by_validate(name: str) -> None:
    text = _error({**MINIMAL, "student": {"model": {"name": name}}})
    assert "student.model.name" in text and "names neither a Python file" in text


def test_well_formed_code_names_pass_validate_without_importing() -> None:
    for name in ("models.py:build", "sub/dir/net.py:make", "my_pkg.nets:tiny", "resnet20"):
        validate_recipe({**MINIMAL, "student": {"model": {"name": name}}})


# ------------------------------------------------------------------------------ data


@pytest.mark.parametrize("source", ["csv", "npz", "mnist", "image_folder"])
def test_a_text_section_for_a_source_without_text_is_refused(source: str) -> None:
    """Text in a CSV file is read with source text_files; csv with data.text used to
    validate and then fail on the first text cell ("... is not a number")."""
    data = {"source": source, "path": "questions", "text": {"text_column": "question"}}
    text = _error({**MINIMAL, "data": data})
    assert "1 problem" in text
    assert (
        "data: data.text applies to the text sources (sst2, text_files, hf_disk), not to "
        f"source {source!r}" in text
    )
    assert "Text in CSV, TSV or JSON Lines files is read with `source: text_files`" in text
    for layout in ("train.csv, train.tsv or train.jsonl", "test.csv, test.tsv or test.jsonl"):
        assert layout in text
    assert "data.text.text_column" in text and "data.label_column" in text


def test_text_sources_take_a_text_section() -> None:
    for source in ("sst2", "text_files", "hf_disk"):
        data = {"source": source, "path": "texts", "text": {"text_column": "question"}}
        assert validate_recipe({**MINIMAL, "data": data}).data.text.text_column == "question"


def test_validate_refuses_text_in_a_csv_recipe_without_a_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = {"source": "csv", "path": "questions", "text": {"text_column": "question"}}
    path = write_recipe(tmp_path / "r.yaml", {**MINIMAL, "data": data})
    fails_cleanly(
        capsys,
        ["validate", str(path)],
        "1 problem in the recipe",
        "data: data.text applies to the text sources",
        "`source: text_files`",
    )


def test_a_dumped_recipe_validates_again() -> None:
    """A run's recipe.yaml and model.json hold a dump: the text section of defaults is
    left out where the schema refuses one, and kept for text sources."""
    for source, has_text in (("npz", False), ("mnist", False), ("sst2", True)):
        recipe = validate_recipe({**MINIMAL, "data": {"source": source}})
        dumped = recipe.model_dump(mode="json")
        assert ("text" in dumped["data"]) == has_text
        assert validate_recipe(dumped) == recipe


def test_a_data_section_recorded_with_the_default_text_section_still_loads() -> None:
    from kdistill.recipe import TextConfig
    from kdistill.tasks.classification.measure import recorded_data

    old = {"source": "npz", "path": "arrays", "text": TextConfig().model_dump(mode="json")}
    assert recorded_data(old).path == "arrays"
    kept = recorded_data({"source": "sst2", "text": {"max_length": 32}})
    assert kept.text.max_length == 32


def test_train_and_test_files_are_read_by_npz_and_csv() -> None:
    for source in ("npz", "csv"):
        data = {"source": source, "train": "a/fit.npz", "test": "b/held_out.npz"}
        recipe = validate_recipe({**MINIMAL, "data": data})
        assert (recipe.data.train, recipe.data.test, recipe.data.path) == (
            "a/fit.npz",
            "b/held_out.npz",
            None,
        )


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (
            {"source": "npz", "path": "arrays", "train": "t.npz", "test": "v.npz"},
            "data: data.path and data.train and data.test are given together; give either "
            "data.path (a folder holding the train and test files) or data.train and "
            "data.test (the two files), not both",
        ),
        (
            {"source": "csv", "path": "table", "test": "v.csv"},
            "data: data.path and data.test are given together",
        ),
        (
            {"source": "csv", "train": "t.csv"},
            "data: data.train is given without data.test; give both files, or data.path",
        ),
        (
            {"source": "npz", "test": "v.npz"},
            "data: data.test is given without data.train",
        ),
        (
            {"source": "image_folder", "path": "pics", "train": "t", "test": "v"},
            "data: data.train and data.test are for sources npz and csv only (their train "
            "and test files); source 'image_folder' does not read them. Remove data.train "
            "and data.test",
        ),
        (
            {"source": "text_files", "path": "texts", "test": "v.csv"},
            "data: data.test is for sources npz and csv only (their train and test files); "
            "source 'text_files' does not read it",
        ),
    ],
)
def test_train_and_test_files_are_refused_where_they_cannot_work(data: dict, message: str) -> None:
    text = _error({**MINIMAL, "data": data})
    assert "1 problem" in text and message in text


def test_every_data_problem_is_listed() -> None:
    data = {"source": "mnist", "text": {"max_length": 16}, "train": "t.npz"}
    text = _error({**MINIMAL, "data": data})
    assert "2 problems" in text
    assert "data: data.text applies" in text and "data: data.train is for sources" in text
