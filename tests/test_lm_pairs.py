"""Causal-LM recipes on prompt/completion pairs (`data.pairs`) with tiny GPT-2 models: the
rows against a hand-built example, the seeded split by pair, a teacher → baseline →
distill run through the top-k cache, the validation loss against a naive recomputation
over completion tokens, the cache refusing other pairs, and bad inputs (exit status 2,
one message)."""

from __future__ import annotations

import json
import math
import random
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import fails_cleanly as _fails
from helpers import run_cli as _run
from helpers import write_recipe as _write

from kdistill.cache.manifest import MANIFEST
from kdistill.checkpoint import load_weights
from kdistill.data.lm_text import IGNORE_INDEX, dataset_fingerprint, load_tokenizer
from kdistill.recipe import validate_recipe
from kdistill.recipe.causal_lm import LMDataConfig, LMModelSpec
from kdistill.tasks.causal_lm.data import LMData, build_lm_data
from kdistill.tasks.causal_lm.models import EOS_TOKEN, build_causal_lm

WORDS = ["apple", "river", "stone", "cloud", "green", "quick", "night", "bread"]
STUDENT = {"config": {"type": "gpt2", "n_layer": 1, "n_embd": 16, "n_head": 2}}
TEACHER = {"config": {"type": "gpt2", "n_layer": 2, "n_embd": 32, "n_head": 2}}


def make_pairs(count: int, seed: int) -> list[dict[str, str]]:
    """Copy tasks: the completion repeats the prompt's three words."""
    rng = random.Random(seed)
    pairs = []
    for _ in range(count):
        words = " ".join(rng.choice(WORDS) for _ in range(3))
        pairs.append({"prompt": f"copy: {words} =>", "completion": f" {words}"})
    return pairs


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def pairs_recipe(folder: Path, **changes: Any) -> dict[str, Any]:
    """Teacher, baseline and distill on 64 training and 16 validation pairs in seconds
    (the pairs files are written in `folder` unless there already)."""
    train, val = folder / "train.jsonl", folder / "val.jsonl"
    if not train.exists():
        write_jsonl(train, make_pairs(64, seed=0))
        write_jsonl(val, make_pairs(16, seed=1))
    recipe: dict[str, Any] = {
        "task": "causal_lm",
        "name": "tiny_pairs",
        "data": {
            "pairs": {"train": str(train), "val": str(val)},
            "seq_len": 24,
            "tokenizer": {"vocab_size": 300},
        },
        "teacher": {
            "model": TEACHER,
            "train": {"epochs": 2},
            "signal": "cache",
            "cache": {"top_k": 8, "shard_sequences": 32},
        },
        "student": {"model": STUDENT},
        "objective": [
            {"loss": "forward_kl", "weight": 0.5, "temperature": 1.0},
            {"loss": "cross_entropy", "weight": 0.5},
        ],
        "train": {
            "epochs": 2,
            "batch_size": 16,
            "optimizer": {"name": "adamw", "lr": 0.01},
            "eval_batch_size": 64,
        },
        "stages": ["teacher", "baseline", "distill"],
        "seeds": [0],
        "samples": {"count": 2, "prompt_tokens": 4, "new_tokens": 4},
    }
    recipe.update(changes)
    return recipe


def _data(folder: Path, data: dict[str, Any]) -> LMData:
    return build_lm_data(
        LMDataConfig.model_validate(data), data_dir=None, tokenizer_dir=folder / "tokenizer"
    )


def _expected_row(
    tokenizer: Any, pair: dict[str, str], seq_len: int
) -> tuple[list[int], list[int], list[int]]:
    """(prompt ids, completion ids + eos, labels) built by hand: position t predicts token
    t + 1 of prompt + completion; only completion tokens count; padding is -100."""
    eos = tokenizer.token_to_id(EOS_TOKEN)
    prompt = tokenizer.encode(pair["prompt"], add_special_tokens=False).ids
    completion = [*tokenizer.encode(pair["completion"], add_special_tokens=False).ids, eos]
    sequence = prompt + completion
    labels = []
    for t in range(seq_len):
        if t + 1 < len(prompt) or t + 1 >= len(sequence):
            labels.append(IGNORE_INDEX)  # predicts a prompt token, or is padding
        else:
            labels.append(sequence[t + 1])
    return prompt, completion, labels


def _prompt_length(labels: torch.Tensor) -> int:
    """Tokens before the first counted label, plus the prompt token that predicts it."""
    return int((labels != IGNORE_INDEX).nonzero()[0]) + 1


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One finished run (teacher, baseline, distill from the top-k cache) on pairs."""
    folder = tmp_path_factory.mktemp("pairs")
    assert _run(_write(folder / "recipe.yaml", pairs_recipe(folder)), folder / "run") == 0
    return folder / "run"


# ---------------------------------------------------------------- rows and split


def test_rows_mask_the_prompt_and_padding_like_a_hand_built_example(tmp_path: Path) -> None:
    pairs = [
        {"prompt": "copy: apple river =>", "completion": " apple river"},
        {"prompt": "Q", "completion": " a longer answer with several words in it"},
    ] * 4
    train = write_jsonl(tmp_path / "train.jsonl", pairs)
    val = write_jsonl(tmp_path / "val.jsonl", pairs[:2])
    data = _data(
        tmp_path,
        {"pairs": {"train": str(train), "val": str(val)}, "seq_len": 48, "tokenizer": {
            "vocab_size": 270}},
    )  # fmt: skip
    tokenizer, eos = data.tokenizer, data.tokenizer.token_to_id(EOS_TOKEN)
    assert data.train.shape == (8, 49) and data.train_labels is not None
    assert data.train_labels.shape == (8, 48)
    for row, pair in enumerate(pairs):
        prompt, completion, labels = _expected_row(tokenizer, pair, 48)
        sequence = prompt + completion
        n = len(sequence) - 1
        assert data.train_labels[row].tolist() == labels
        assert data.train[row, :n].tolist() == sequence[:-1]
        assert data.train[row, n:].tolist() == [eos] * (49 - n)  # padded with end-of-text
        assert int((data.train_labels[row] != IGNORE_INDEX).sum()) == len(completion)
    # bits per character count the characters of the validation completions' text
    assert data.val_characters == sum(len(p["completion"]) for p in pairs[:2])
    assert data.info["tokens"]["val"] == int((data.val_labels != IGNORE_INDEX).sum())
    assert data.prompt_length(0) == len(tokenizer.encode(pairs[0]["prompt"]).ids)
    assert data.prompt_length(1) == len(tokenizer.encode(pairs[1]["prompt"]).ids) == 1


def test_validation_pairs_are_drawn_by_pair_with_the_seed(tmp_path: Path) -> None:
    records = [{"prompt": f"n{i} =>", "completion": f" {i}"} for i in range(40)]
    path = write_jsonl(tmp_path / "pairs.jsonl", records)

    def split(seed: int) -> tuple[list[str], list[str]]:
        data = _data(
            tmp_path / f"s{seed}",
            {"pairs": {"train": str(path), "split_seed": seed}, "val_fraction": 0.25,
             "seq_len": 8, "tokenizer": {"vocab_size": 270}},
        )  # fmt: skip
        assert data.train_labels is not None and data.val_labels is not None

        def prompts(rows: torch.Tensor, labels: torch.Tensor) -> list[str]:
            return [
                data.tokenizer.decode(rows[i, : _prompt_length(labels[i])].tolist())
                for i in range(len(rows))
            ]

        return prompts(data.train, data.train_labels), prompts(data.val, data.val_labels)

    train, val = split(0)
    assert len(val) == 10 and len(train) == 30
    assert sorted(train + val) == sorted(r["prompt"] for r in records)
    assert split(0) == (train, val)  # the same seed draws the same pairs
    assert split(1)[1] != val
    last = [r["prompt"] for r in records[-10:]]
    assert val != last  # not the last pairs by position
    order = [r["prompt"] for r in records]
    assert val == sorted(val, key=order.index)  # each split keeps the file's order


# ---------------------------------------------------------------- the run


def test_run_trains_on_completions_and_writes_every_stage(finished: Path) -> None:
    for stage in ("teacher", "baseline", "distill"):
        evaluation = json.loads((finished / stage / "seed0" / "eval.json").read_text())
        val = evaluation["val"]
        assert math.isfinite(val["loss"]) and 0 < val["loss"] < math.log(300)
        assert "completion tokens only" in evaluation["measured_split"]
        metrics = (finished / stage / "seed0" / "metrics.jsonl").read_text().splitlines()
        assert json.loads(metrics[-1])["val_loss"] == pytest.approx(val["loss"], rel=1e-5)
        # samples continue a validation pair's prompt (its own length, not prompt_tokens)
        sample = evaluation["samples"][0]
        assert sample["prompt"].startswith("copy: ") and sample["prompt"].endswith(" =>")
    results = json.loads((finished / "results.json").read_text())
    assert set(results["stages"]) == {"teacher", "baseline", "distill"}
    report = (finished / "results.md").read_text()
    assert "bits/char" in report and "completion tokens only" in report


def test_validation_loss_equals_a_naive_recomputation_over_completions(finished: Path) -> None:
    tokenizer = load_tokenizer(finished / "tokenizer")
    val_pairs = [json.loads(line) for line in (finished.parent / "val.jsonl").open()]
    evaluation = json.loads((finished / "distill" / "seed0" / "eval.json").read_text())

    def naive(model: Any) -> tuple[float, int]:
        """Σ −log p(completion token | everything before it), one unpadded pair at a time."""
        nll, tokens = 0.0, 0
        model.eval()
        for pair in val_pairs:
            prompt, completion, _ = _expected_row(tokenizer, pair, 24)
            sequence = torch.tensor(prompt + completion)
            with torch.no_grad():
                logits = model.logits(model(sequence[None, :-1]))[0].double()  # (T, V)
            logp = torch.log_softmax(logits, dim=-1)
            for t in range(len(prompt) - 1, len(sequence) - 1):
                nll -= float(logp[t, sequence[t + 1]])
                tokens += 1
        return nll, tokens

    torch.manual_seed(0)
    student = build_causal_lm(
        LMModelSpec.model_validate(STUDENT),
        vocab_size=tokenizer.get_vocab_size(),
        seq_len=24,
        eos_id=tokenizer.token_to_id(EOS_TOKEN),
        where="student",
    )
    untrained, _ = naive(student)
    load_weights(student, finished / "distill" / "seed0" / "model.safetensors")
    nll, tokens = naive(student)
    val = evaluation["val"]
    assert (
        val["tokens"]
        == tokens
        == sum(
            len(tokenizer.encode(p["completion"], add_special_tokens=False).ids) + 1
            for p in val_pairs
        )
    )
    assert val["loss"] == pytest.approx(nll / tokens, rel=1e-5)
    characters = sum(len(p["completion"]) for p in val_pairs)
    assert val["characters"] == characters
    assert val["bpc"] == pytest.approx(nll / (characters * math.log(2)), rel=1e-5)
    assert nll < 0.9 * untrained  # the completions were learned


def test_cache_holds_the_pairs_and_refuses_other_pairs(
    finished: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    manifest = json.loads((finished / "cache" / "topk-teacher-seed0" / MANIFEST).read_text())
    assert manifest["complete"] and manifest["num_sequences"] == 64
    recipe = pairs_recipe(finished.parent)
    data = _data(tmp_path, {**recipe["data"], "tokenizer": {"path": str(finished / "tokenizer")}})
    assert data.train_labels is not None
    assert manifest["dataset"] == dataset_fingerprint(
        data.train,
        seq_len=24,
        tokenizer_fingerprint=data.tokenizer_fingerprint,
        labels=data.train_labels,
    )
    # the labels are part of the fingerprint: the same rows labelled otherwise differ
    relabelled = data.train_labels.clone()
    relabelled[0, 0] = 5
    assert replace(data, train_labels=relabelled).fingerprint != data.fingerprint

    other = make_pairs(64, seed=0)
    other[3] = {"prompt": "copy: stone =>", "completion": " stone"}
    other_path = write_jsonl(tmp_path / "other.jsonl", other)
    recipe = pairs_recipe(tmp_path, stages=["distill"])
    recipe["data"]["pairs"]["train"] = str(other_path)
    recipe["data"]["tokenizer"] = {"path": str(finished / "tokenizer")}
    recipe["teacher"]["checkpoint"] = str(finished)
    recipe["teacher"]["cache"]["dir"] = str(finished / "cache" / "topk-teacher-seed0")
    argv = ["run", str(_write(tmp_path / "r.yaml", recipe)), "--output-dir",
            str(tmp_path / "out"), "--quiet"]  # fmt: skip
    _fails(capsys, argv, "is stale", "dataset: expected")


def test_live_teacher_distills_on_pairs(finished: Path, tmp_path: Path) -> None:
    recipe = pairs_recipe(finished.parent, stages=["distill"])
    recipe["data"]["tokenizer"] = {"path": str(finished / "tokenizer")}
    recipe["teacher"].update(signal="live", checkpoint=str(finished))
    recipe["train"]["epochs"] = 1
    assert _run(_write(tmp_path / "r.yaml", recipe), tmp_path / "live") == 0
    evaluation = json.loads((tmp_path / "live" / "distill" / "seed0" / "eval.json").read_text())
    cached = json.loads((finished / "distill" / "seed0" / "eval.json").read_text())
    assert evaluation["val"]["tokens"] == cached["val"]["tokens"]
    assert math.isfinite(evaluation["val"]["loss"])


# ---------------------------------------------------------------- bad inputs


def _data_fails(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], data: dict[str, Any], *needles: str
) -> str:
    recipe = pairs_recipe(tmp_path, stages=["baseline"])
    recipe["data"] = data
    path = _write(tmp_path / "r.yaml", recipe)
    flat = _fails(capsys, ["run", str(path), "--output-dir", str(tmp_path / "out"), "--quiet"],
                  *needles)  # fmt: skip
    assert not (tmp_path / "out" / "baseline").exists()
    return flat


def test_missing_field_names_the_line_and_the_fields_found(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    records: list[dict[str, Any]] = make_pairs(5, seed=0)
    records[2] = {"prompt": "copy: apple =>", "answer": " apple"}
    path = write_jsonl(tmp_path / "pairs.jsonl", records)
    data = {"pairs": {"train": str(path)}, "seq_len": 24, "tokenizer": {"vocab_size": 270}}
    flat = _data_fails(
        tmp_path,
        capsys,
        data,
        "data.pairs.train",
        "line 3: no 'completion' field (fields: ['answer', 'prompt'])",
        "data.pairs.completion_field = 'completion'",
    )
    assert "line 1" not in flat and "line 4" not in flat


def test_prompt_longer_than_seq_len_is_refused_unless_truncated(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    records = make_pairs(40, seed=0)
    long_prompt = "copy: " + " ".join(WORDS * 4) + " =>"
    records[4] = {"prompt": long_prompt, "completion": " apple"}
    records[9] = {"prompt": long_prompt + " again", "completion": " river"}
    path = write_jsonl(tmp_path / "pairs.jsonl", records)
    val = write_jsonl(tmp_path / "pairs_val.jsonl", make_pairs(8, seed=1))
    data = {
        "pairs": {"train": str(path), "val": str(val)},
        "seq_len": 24,
        "tokenizer": {"vocab_size": 270},
    }
    flat = _data_fails(
        tmp_path,
        capsys,
        data,
        "data.pairs.train",
        "2 of 40 prompts are longer than data.seq_len = 24",
        "line 5:",
        "line 10:",
        "data.pairs.truncate_prompt: left",
    )
    assert "line 1:" not in flat

    data["pairs"]["truncate_prompt"] = "left"
    built = _data(tmp_path / "left", data)
    assert built.info["truncated_prompts"]["train"] >= 2 and built.train_labels is not None
    eos = built.tokenizer.token_to_id(EOS_TOKEN)
    for row in (4, 9):  # the newest prompt tokens are kept, the completion whole
        completion = [*built.tokenizer.encode(records[row]["completion"]).ids, eos]
        counted = built.train_labels[row][built.train_labels[row] != IGNORE_INDEX]
        assert counted.tolist() == completion
        prompt = built.tokenizer.encode(records[row]["prompt"]).ids
        kept = _prompt_length(built.train_labels[row])
        assert built.train[row, :kept].tolist() == prompt[-kept:]


def test_empty_pairs_file_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n\n", encoding="utf-8")
    data = {"pairs": {"train": str(path)}, "seq_len": 24, "tokenizer": {"vocab_size": 270}}
    _data_fails(tmp_path, capsys, data, "data.pairs.train", "no prompt/completion pairs")


def test_corpus_and_pairs_together_are_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    recipe = pairs_recipe(tmp_path)
    recipe["data"]["corpus"] = "input.txt"
    path = _write(tmp_path / "r.yaml", recipe)
    _fails(capsys, ["validate", str(path)], "data: give exactly one of corpus", "both given")
    del recipe["data"]["corpus"], recipe["data"]["pairs"]
    _fails(capsys, ["validate", str(_write(path, recipe))], "neither given")


def test_combinations_that_cannot_work_with_pairs() -> None:
    from kdistill.errors import RecipeError

    base = {
        "task": "causal_lm",
        "name": "x",
        "data": {"pairs": {"train": "t.jsonl", "val": "v.jsonl"}, "tokenizer": {"vocab_size": 300}},
        "teacher": {"model": TEACHER},
        "student": {"model": STUDENT},
    }
    with pytest.raises(RecipeError, match=r"on_policy does not work with data\.pairs"):
        validate_recipe({**base, "on_policy": {"max_new_tokens": 4, "prompt_tokens": 4}})
    seqkd = {"generation": {"max_new_tokens": 4}}
    stages = ["teacher", "seqkd"]
    with pytest.raises(RecipeError, match=r"seqkd\.prompts: t\.jsonl"):
        validate_recipe({**base, "stages": stages, "seqkd": seqkd})
    validate_recipe({**base, "stages": stages, "seqkd": {**seqkd, "prompts": "t.jsonl"}})
    with pytest.raises(RecipeError, match=r"val_fraction has no effect"):
        validate_recipe({**base, "data": {**base["data"], "val_fraction": 0.2}})


def test_too_few_pairs_to_split(tmp_path: Path) -> None:
    from kdistill.errors import DataError

    path = write_jsonl(tmp_path / "pairs.jsonl", make_pairs(3, seed=0))
    with pytest.raises(DataError, match=r"leave no validation pair.*data\.pairs\.val"):
        _data(tmp_path, {"pairs": {"train": str(path)}, "val_fraction": 0.1,
                         "tokenizer": {"vocab_size": 270}})  # fmt: skip


def test_plan_counts_completion_tokens_only(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`kdistill plan` of a pairs recipe sizes the loss for the tokens that count (the
    completions), not for every position of the padded rows."""
    from kdistill.cli import main

    recipe = _write(tmp_path / "recipe.yaml", pairs_recipe(tmp_path))
    argv = ["plan", str(recipe), "--steps", "1", "--json", "--stage", "baseline"]
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    (stage,) = result["stages"]
    data = _data(tmp_path, pairs_recipe(tmp_path)["data"])
    micro = min(16, len(data.train))  # train.batch_size sequences, one process
    expected = int((data.train_labels[:micro] != IGNORE_INDEX).sum())
    assert stage["loss"]["tokens"] == expected < micro * data.seq_len
