"""Sequence-level KD (the seqkd stage) and on-policy distillation (on_policy) on a slice
of TinyShakespeare with tiny GPT-2 models: the generations folder (written, reused,
refused when stale), completion-only labels, teachers with another tokenizer, the
student's own text reaching the loss, λ = 0 equal to the off-policy loop, seeded and
resumable draws, and bad inputs (exit status 2, one message)."""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from accelerate import Accelerator
from helpers import fails_cleanly as _fails
from helpers import fit_lm
from helpers import run_cli as _run
from helpers import write_recipe as _write
from tokenizers import Tokenizer

import kdistill.tasks.causal_lm.seqkd as seqkd_module
import kdistill.tasks.causal_lm.steps as lm_train
from kdistill.checkpoint import load_weights
from kdistill.data.lm_text import IGNORE_INDEX, load_tokenizer, tokenizer_fingerprint
from kdistill.errors import DataError, TrainingError
from kdistill.recipe.causal_lm import (
    GenerationConfig,
    LMLossTerm,
    LMModelSpec,
    LMTrainConfig,
    OnPolicyConfig,
)
from kdistill.tasks.causal_lm import LMObjective
from kdistill.tasks.causal_lm.generate import generate, row_uniforms, sample_next
from kdistill.tasks.causal_lm.models import CausalLM, build_causal_lm, weights_fingerprint
from kdistill.tasks.causal_lm.seqkd import GENERATIONS, MANIFEST, Prompts, check_prompts, seqkd_rows
from kdistill.teachers import LiveLMTeacher

STUDENT = {"config": {"type": "gpt2", "n_layer": 1, "n_embd": 16, "n_head": 2}}
TEACHER = {"config": {"type": "gpt2", "n_layer": 2, "n_embd": 32, "n_head": 2}}


def seqkd_recipe(teacher_run: Path, **changes: Any) -> dict[str, Any]:
    """A seqkd stage that distills the trained teacher of `teacher_run` in about a second."""
    recipe: dict[str, Any] = {
        "task": "causal_lm",
        "name": "tiny_seqkd",
        "data": {
            "corpus": "tinyshakespeare/input.txt",
            "limit_chars": 20000,
            "val_fraction": 0.1,
            "seq_len": 32,
            "tokenizer": {"path": str(teacher_run / "tokenizer")},
        },
        "teacher": {"model": TEACHER, "checkpoint": str(teacher_run)},
        "student": {"model": STUDENT},
        "seqkd": {
            "num_prompts": 24,
            "prefix_tokens": 8,
            "generation": {"max_new_tokens": 12, "temperature": 1.0, "top_k": 40},
        },
        "train": {
            "epochs": 1,
            "batch_size": 8,
            "optimizer": {"name": "adamw", "lr": 0.005},
            "eval_batch_size": 64,
        },
        "stages": ["seqkd"],
        "seeds": [0],
        "samples": {"count": 0},
    }
    recipe.update(changes)
    return recipe


@pytest.fixture(scope="module")
def lm_env(shared_data: Path) -> Any:
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("KDISTILL_DATA", str(shared_data))
        yield


@pytest.fixture(scope="module")
def teacher_run(lm_env: None, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A teacher trained on a byte-level BPE of 300 tokens (nothing else), for the tests
    to distill from."""
    folder = tmp_path_factory.mktemp("teacher")
    recipe = seqkd_recipe(folder, stages=["teacher"])
    recipe["data"]["tokenizer"] = {"vocab_size": 300}
    recipe["teacher"] = {"model": TEACHER, "train": {"epochs": 2}}
    del recipe["seqkd"]
    assert _run(_write(folder / "recipe.yaml", recipe), folder / "run") == 0
    return folder / "run"


@pytest.fixture(scope="module")
def seqkd_run(teacher_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("seqkd")
    recipe = seqkd_recipe(teacher_run)
    recipe["seqkd"]["generation"]["num_per_prompt"] = 2
    assert _run(_write(folder / "recipe.yaml", recipe), folder / "run") == 0
    return folder / "run"


def _records(folder: Path) -> list[dict[str, Any]]:
    lines = (folder / GENERATIONS).read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines]


def _tiny(vocab: int, seed: int, layers: int = 1, dropout: float = 0.0) -> CausalLM:
    torch.manual_seed(seed)
    config = {"type": "gpt2", "n_layer": layers, "n_embd": 16, "n_head": 2, "n_positions": 16}
    config.update(resid_pdrop=dropout, embd_pdrop=0.0, attn_pdrop=0.0)
    return build_causal_lm(
        LMModelSpec(config=config), vocab_size=vocab, seq_len=12, eos_id=None, where="m"
    )


# ---------------------------------------------------------------- seqkd: the stage


def test_seqkd_writes_generations_with_a_manifest(
    seqkd_run: Path, teacher_run: Path, shared_data: Path
) -> None:
    folder = seqkd_run / "seqkd" / "generations"
    records = _records(folder)
    assert len(records) == 24 * 2  # num_prompts × num_per_prompt
    assert [(r["prompt_index"], r["copy"]) for r in records] == [
        (i, c) for i in range(24) for c in range(2)
    ]
    corpus = (shared_data / "tinyshakespeare" / "input.txt").read_text()[:18000]
    for record in records:
        assert set(record) == {"prompt", "completion", "stop", "prompt_index", "copy"}
        assert record["prompt"] and record["prompt"] in corpus  # a prefix of training text
        assert record["stop"] in ("eos", "length")
    assert records[0]["prompt"] == records[1]["prompt"]
    assert records[0]["completion"] != records[1]["completion"]  # two samples of one prompt

    manifest = json.loads((folder / MANIFEST).read_text())
    teacher = build_causal_lm(
        LMModelSpec(**TEACHER), vocab_size=300, seq_len=32, eos_id=0, where="teacher"
    )
    load_weights(teacher, teacher_run / "teacher" / "seed0" / "model.safetensors")
    assert manifest["teacher"] == weights_fingerprint(teacher)
    assert manifest["teacher_tokenizer"] == tokenizer_fingerprint(
        load_tokenizer(teacher_run / "tokenizer")
    )
    assert manifest["generation"] == {
        "max_new_tokens": 12,
        "temperature": 1.0,
        "top_k": 40,
        "top_p": None,
        "num_per_prompt": 2,
        "seed": 0,
    }
    assert manifest["complete"] and manifest["generations"] == 48
    assert sum(manifest["stopped"].values()) == 48
    data = (folder / GENERATIONS).read_bytes()
    assert manifest["sha256"] == hashlib.sha256(data).hexdigest()
    evaluation = json.loads((seqkd_run / "seqkd" / "seed0" / "eval.json").read_text())
    assert evaluation["stage"] == "seqkd" and 0 < evaluation["val"]["loss"] < 10
    assert "seqkd" in json.loads((seqkd_run / "results.json").read_text())["stages"]


def test_seqkd_reuses_matching_generations_and_refuses_stale_ones(
    seqkd_run: Path,
    teacher_run: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    shared = seqkd_run / "seqkd" / "generations"
    before = (shared / GENERATIONS).read_bytes()
    recipe = seqkd_recipe(teacher_run)
    recipe["seqkd"]["generation"]["num_per_prompt"] = 2
    recipe["seqkd"]["dir"] = str(shared)

    def no_generation(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the teacher wrote again instead of reusing the generations")

    monkeypatch.setattr(seqkd_module, "generate", no_generation)
    assert _run(_write(tmp_path / "r.yaml", recipe), tmp_path / "again") == 0
    assert "reusing the teacher's completions" in " ".join(capsys.readouterr().err.split())
    assert (shared / GENERATIONS).read_bytes() == before
    assert (tmp_path / "again" / "seqkd" / "seed0" / "eval.json").is_file()

    recipe["seqkd"]["generation"]["temperature"] = 0.7  # other settings: stale
    argv = ["run", str(_write(tmp_path / "r2.yaml", recipe)), "--output-dir", str(tmp_path / "b")]
    _fails(capsys, argv, "are stale", "generation.temperature: expected 0.7, found 1.0", "Delete")
    assert not (tmp_path / "b" / "seqkd" / "seed0").exists()

    damaged = tmp_path / "damaged"
    damaged.mkdir()
    (damaged / MANIFEST).write_bytes((shared / MANIFEST).read_bytes())
    (damaged / GENERATIONS).write_bytes(before[:-40])
    recipe["seqkd"]["generation"]["temperature"] = 1.0
    recipe["seqkd"]["dir"] = str(damaged)
    argv = ["run", str(_write(tmp_path / "r3.yaml", recipe)), "--output-dir", str(tmp_path / "c")]
    _fails(capsys, argv, "does not match its manifest")


def test_seqkd_labels_reach_the_loss_with_the_prompt_masked(
    seqkd_run: Path, teacher_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every label row the loss sees is a generation: -100 wherever the next token is a
    prompt token or padding, the completion's tokens elsewhere (reference: tokenized
    here from the generations file)."""
    tokenizer = load_tokenizer(teacher_run / "tokenizer")
    expected = set()
    for record in _records(seqkd_run / "seqkd" / "generations"):
        prompt = tokenizer.encode(record["prompt"], add_special_tokens=False).ids
        completion = tokenizer.encode(record["completion"], add_special_tokens=False).ids
        if record["stop"] == "eos":
            completion.append(tokenizer.token_to_id("<|endoftext|>"))
        tokens = (prompt + completion)[:33]  # a row holds seq_len + 1 tokens
        n = len(tokens) - 1
        labels = [tokens[t + 1] if t + 1 >= len(prompt) else IGNORE_INDEX for t in range(n)]
        expected.add(tuple(labels + [IGNORE_INDEX] * (32 - n)))

    seen: list[torch.Tensor] = []
    real = lm_train.step_losses

    def spy(hidden: Any, weight: Any, bias: Any, labels: torch.Tensor, **kwargs: Any) -> Any:
        seen.append(labels.clone())
        return real(hidden, weight, bias, labels, **kwargs)

    monkeypatch.setattr(lm_train, "step_losses", spy)
    recipe = seqkd_recipe(teacher_run)
    recipe["seqkd"]["generation"]["num_per_prompt"] = 2
    recipe["seqkd"]["dir"] = str(seqkd_run / "seqkd" / "generations")
    assert _run(_write(tmp_path / "r.yaml", recipe), tmp_path / "run") == 0
    rows = {tuple(row.tolist()) for batch in seen for row in batch}
    assert len(seen) == 48 // 8 and rows <= expected and len(rows) > 40
    for row in rows:  # each row: a masked prompt, then a counted run, then padding
        counted = [label != IGNORE_INDEX for label in row]
        first = counted.index(True)
        assert first >= 1 and all(counted[first : first + sum(counted)])


def test_seqkd_rows_mask_prompt_and_padding() -> None:
    """seqkd_rows against the definition, on hand-written records."""
    tokenizer = Tokenizer.from_str(
        json.dumps(
            {
                "version": "1.0",
                "added_tokens": [
                    {"id": 0, "content": "<|endoftext|>", "single_word": False, "lstrip": False,
                     "rstrip": False, "normalized": False, "special": True},
                ],
                "pre_tokenizer": {"type": "Whitespace"},
                "model": {"type": "WordLevel", "unk_token": "<|endoftext|>",
                          "vocab": {"<|endoftext|>": 0, "a": 1, "b": 2, "c": 3, "d": 4}},
            }
        )
    )  # fmt: skip
    records = [
        {"prompt": "a b", "completion": "c d", "stop": "eos"},
        {"prompt": "a", "completion": "b c d c d", "stop": "length"},
        {"prompt": "b", "completion": "", "stop": "length"},  # nothing to learn: left out
    ]
    rows = seqkd_rows(records, tokenizer, seq_len=5)
    assert rows.info["rows"] == 2 and rows.info["left_out"] == 1
    # s = a b c d <eos>: inputs a b c d <eos>(pad), labels: -100 (next is prompt b), c, d, eos
    assert rows.train.tolist() == [[1, 2, 3, 4, 0, 0], [1, 2, 3, 4, 3, 0]]
    assert rows.labels.tolist() == [[-100, 3, 4, 0, -100], [2, 3, 4, 3, 4]]
    assert rows.info["completions_cut"] == 0 and rows.info["tokens_learned"] == 8


def test_seqkd_works_across_tokenizers(teacher_run: Path, tmp_path: Path) -> None:
    """A student on a 290-token BPE learns from a teacher on a 300-token BPE: the teacher
    is measured on its own tokenization, its text is re-tokenized for the student."""
    recipe = seqkd_recipe(teacher_run, stages=["teacher", "seqkd"])
    recipe["data"]["tokenizer"] = {"vocab_size": 290}
    assert _run(_write(tmp_path / "r.yaml", recipe), tmp_path / "run") == 0
    run = tmp_path / "run"
    teacher_tokens = load_tokenizer(teacher_run / "tokenizer")
    student_tokens = load_tokenizer(run / "tokenizer")
    assert teacher_tokens.get_vocab_size() == 300 and student_tokens.get_vocab_size() == 290
    manifest = json.loads((run / "seqkd" / "generations" / MANIFEST).read_text())
    assert manifest["teacher_tokenizer"] == tokenizer_fingerprint(teacher_tokens)
    student = json.loads((run / "seqkd" / "seed0" / "model.json").read_text())
    assert student["vocab_size"] == 290 and student["hf_config"]["vocab_size"] == 290
    teacher = json.loads((run / "teacher" / "seed0" / "eval.json").read_text())
    trained_here = json.loads((teacher_run / "teacher" / "seed0" / "eval.json").read_text())
    # the same weights on the same text and tokenizer: the same measurement
    assert teacher["val"]["loss"] == pytest.approx(trained_here["val"]["loss"], rel=1e-5)
    completions = [r["completion"] for r in _records(run / "seqkd" / "generations")]
    assert any(
        teacher_tokens.encode(c).ids != student_tokens.encode(c).ids for c in completions
    )  # the two tokenizers do split the text differently


# ---------------------------------------------------------------- generation


def test_generate_matches_a_full_recompute_and_is_batch_independent() -> None:
    model = _tiny(50, seed=3, layers=2).eval()
    prompts = torch.randint(0, 50, (4, 5))
    greedy = generate(
        model, prompts, GenerationConfig(max_new_tokens=7, temperature=0), vocab_size=50
    )
    ids = prompts.clone()
    with torch.no_grad():  # reference: the whole sequence through the model at each step
        for _ in range(7):
            ids = torch.cat([ids, model.logits(model(ids)[:, -1]).argmax(-1, keepdim=True)], 1)
    assert torch.equal(greedy.tokens, ids) and greedy.new_tokens.tolist() == [7] * 4

    sampled = GenerationConfig(max_new_tokens=7, temperature=1.0, top_p=0.9)
    uniforms = row_uniforms([11, 12, 13, 14], 7)
    together = generate(model, prompts, sampled, vocab_size=50, uniforms=uniforms).tokens
    alone = generate(model, prompts[2:3], sampled, vocab_size=50, uniforms=uniforms[2:3]).tokens
    assert torch.equal(together[2:3], alone)  # a row's text depends on its numbers alone

    eos = int(greedy.tokens[0, 6])  # the second written token of row 0 ends it
    stopped = generate(model, prompts, sampled.model_copy(update={"temperature": 0}),
                       vocab_size=50, eos_id=eos)  # fmt: skip
    assert bool(stopped.ended[0]) and int(stopped.new_tokens[0]) <= 2


def test_sampling_follows_the_distribution_within_top_k_and_top_p() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, -5.0]]).repeat(20000, 1)
    uniform = row_uniforms(list(range(20000)), 1)[:, 0]
    freq = torch.bincount(sample_next(logits, temperature=1.0, uniform=uniform), minlength=5)
    assert torch.allclose(freq / 20000, logits[0].softmax(-1), atol=0.01)
    freq = torch.bincount(sample_next(logits, temperature=2.0, uniform=uniform), minlength=5)
    assert torch.allclose(freq / 20000, (logits[0] / 2).softmax(-1), atol=0.01)
    # top_p 0.8: tokens 0 and 1 (0.64, then 0.88 ≥ 0.8); top_k 2: the same two, renormalised
    for kwargs in ({"top_p": 0.8}, {"top_k": 2}):
        freq = torch.bincount(sample_next(logits, temperature=1.0, uniform=uniform, **kwargs),
                              minlength=5)  # fmt: skip
        assert freq[2:].sum() == 0
        assert float(freq[0]) / 20000 == pytest.approx(1 / (1 + torch.e**-1), abs=0.01)


# ---------------------------------------------------------------- on-policy


def test_on_policy_batch_is_the_students_continuation() -> None:
    student = _tiny(50, seed=1)
    sequences = torch.randint(0, 50, (3, 13))
    settings = OnPolicyConfig(probability=1.0, prompt_tokens=4, max_new_tokens=6, temperature=0)
    inputs, labels = lm_train.on_policy_batch(
        student, sequences, torch.arange(3), settings, vocab_size=50, seed=0, step=0
    )
    ids = sequences[:, :4].clone()
    student.eval()
    with torch.no_grad():
        for _ in range(6):
            ids = torch.cat([ids, student.logits(student(ids)[:, -1]).argmax(-1, keepdim=True)], 1)
    assert torch.equal(inputs, ids[:, :-1]) and inputs.shape == (3, 9)
    assert (labels[:, :3] == IGNORE_INDEX).all()  # positions whose next token is the prompt
    assert torch.equal(labels[:, 3:], ids[:, 4:])  # the 6 written tokens, and only they
    assert int((labels != IGNORE_INDEX).sum()) == 3 * 6


def test_on_policy_steps_show_the_loss_the_students_text(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """λ = 1: the teacher scores, and the divergence counts, the student's greedy
    continuation of each sequence's prompt, not the corpus; cross-entropy is left out."""
    torch.manual_seed(0)
    train = torch.randint(0, 50, (32, 13))
    student, teacher_model = _tiny(50, seed=1), _tiny(50, seed=7, layers=2)
    initial = copy.deepcopy(student)
    scored: list[torch.Tensor] = []

    class Recording(LiveLMTeacher):
        def __call__(self, input_ids: torch.Tensor, indices: torch.Tensor) -> Any:
            scored.append(input_ids.clone())
            return super().__call__(input_ids, indices)

    objectives: list[LMObjective] = []
    real = lm_train.step_losses

    def spy(*args: Any, objective: LMObjective, **kwargs: Any) -> Any:
        objectives.append(objective)
        return real(*args, objective=objective, **kwargs)

    monkeypatch.setattr(lm_train, "step_losses", spy)
    order = torch.randperm(32, generator=torch.Generator().manual_seed(0 * 1009 + 0))
    settings = OnPolicyConfig(probability=1.0, prompt_tokens=4, max_new_tokens=6, temperature=0)
    term = LMLossTerm(loss="jsd", params={"beta": 0.5})
    fit_lm(
        student,
        train=train,
        val=train[:8],
        objective=LMObjective(ce_weight=0.5, divergence=term),
        teacher=Recording(teacher_model),
        settings=LMTrainConfig(epochs=1, batch_size=16, optimizer={"name": "sgd", "lr": 0.1}),
        vocab_size=50,
        seed=0,
        out_dir=tmp_path,
        accelerator=Accelerator(cpu=True),
        quiet=True,
        on_policy=settings,
    )
    first = train[order[:16]]
    ids = first[:, :4].clone()
    initial.eval()
    with torch.no_grad():
        for _ in range(6):
            ids = torch.cat([ids, initial.logits(initial(ids)[:, -1]).argmax(-1, keepdim=True)], 1)
    assert torch.equal(scored[0], ids[:, :-1])  # the student's text, from its first weights
    assert not torch.equal(scored[0], first[:, :9])  # not the corpus
    assert all(o.ce_weight is None and o.divergence == term for o in objectives)
    metrics = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert metrics["on_policy_steps"] == 2 and metrics["tokens"] == 2 * 16 * 6


def _fit(tmp: Path, on_policy: OnPolicyConfig | None, **changes: Any) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    train = torch.randint(0, 50, (64, 13))
    model = _tiny(50, seed=1, dropout=0.1)  # dropout: resume must restore its random state
    settings = LMTrainConfig(
        epochs=2, batch_size=16, optimizer={"name": "adamw", "lr": 0.01}, **changes
    )
    term = LMLossTerm(loss="jsd", params={"beta": 0.3}, temperature=2.0)
    fit_lm(
        model,
        train=train,
        val=train[:8],
        objective=LMObjective(ce_weight=0.5, divergence=term),
        teacher=LiveLMTeacher(_tiny(50, seed=7, layers=2)),
        settings=settings,
        vocab_size=50,
        seed=0,
        out_dir=tmp,
        accelerator=Accelerator(cpu=True),
        quiet=True,
        on_policy=on_policy,
        resume=(tmp / "checkpoints").exists(),
    )
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_on_policy_probability_zero_is_the_off_policy_loop(tmp_path: Path) -> None:
    off = _fit(tmp_path / "off", None)
    zero = _fit(
        tmp_path / "zero", OnPolicyConfig(probability=0.0, max_new_tokens=6, prompt_tokens=4)
    )
    assert all(torch.equal(off[k], zero[k]) for k in off)  # bit for bit
    half = _fit(
        tmp_path / "half", OnPolicyConfig(probability=0.5, max_new_tokens=6, prompt_tokens=4)
    )
    assert max(float((off[k] - half[k]).abs().max()) for k in off) > 1e-4


def test_on_policy_draws_are_seeded_by_seed_and_step() -> None:
    draws = [lm_train.is_on_policy_step(0.3, seed=0, step=k) for k in range(3000)]
    assert draws == [lm_train.is_on_policy_step(0.3, seed=0, step=k) for k in range(3000)]
    assert sum(draws) / 3000 == pytest.approx(0.3, abs=0.03)
    other = [lm_train.is_on_policy_step(0.3, seed=1, step=k) for k in range(3000)]
    assert other != draws
    assert not any(lm_train.is_on_policy_step(0.0, seed=0, step=k) for k in range(100))
    assert all(lm_train.is_on_policy_step(1.0, seed=0, step=k) for k in range(100))


def test_interrupted_on_policy_run_resumes_to_the_same_weights(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = OnPolicyConfig(probability=0.5, prompt_tokens=4, max_new_tokens=6, top_k=20)
    straight = _fit(tmp_path / "straight", settings, checkpoint_every=3)
    real, calls = lm_train.step_losses, [0]

    def interrupted(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        if calls[0] == 6:  # in the second epoch (4 steps each), after 2 checkpoints
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(lm_train, "step_losses", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _fit(tmp_path / "killed", settings, checkpoint_every=3)
    monkeypatch.setattr(lm_train, "step_losses", real)
    resumed = _fit(tmp_path / "killed", settings, checkpoint_every=3)
    assert max(float((straight[k] - resumed[k]).abs().max()) for k in straight) <= 1e-6


def test_on_policy_with_a_cached_teacher_is_refused(tmp_path: Path) -> None:
    class Cached:  # what a CachedLMTeacher is to fit_lm: not a live model
        def __call__(self, input_ids: torch.Tensor, indices: torch.Tensor) -> Any:
            raise AssertionError("not reached")

    with pytest.raises(TrainingError, match="a cache holds the teacher's outputs"):
        fit_lm(
            _tiny(50, seed=1),
            train=torch.randint(0, 50, (32, 13)),
            val=torch.randint(0, 50, (4, 13)),
            objective=LMObjective(divergence=LMLossTerm(loss="forward_kl")),
            teacher=Cached(),
            settings=LMTrainConfig(epochs=1, batch_size=16),
            vocab_size=50,
            seed=0,
            out_dir=tmp_path,
            accelerator=Accelerator(cpu=True),
            quiet=True,
            on_policy=OnPolicyConfig(probability=0.5, prompt_tokens=4, max_new_tokens=4),
        )


# ---------------------------------------------------------------- bad inputs


@pytest.mark.parametrize(
    ("generation", "needles"),
    [
        ({"temperature": 1.0}, ["seqkd.generation.max_new_tokens", "is required", "never"]),
        ({"max_new_tokens": 0}, ["seqkd.generation.max_new_tokens", "positive integer", "got 0"]),
        ({"max_new_tokens": 8, "temperature": -0.5}, ["temperature", "[0, inf)", "got -0.5"]),
        ({"max_new_tokens": 8, "num_per_prompt": 3, "temperature": 0}, ["would be the same"]),
    ],
    ids=["no-max-new-tokens", "zero-max-new-tokens", "negative-temperature", "greedy-copies"],
)
def test_generation_settings_that_cannot_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], generation: Any, needles: list[str]
) -> None:
    recipe = seqkd_recipe(tmp_path)
    recipe["seqkd"]["generation"] = generation
    _fails(capsys, ["validate", str(_write(tmp_path / "r.yaml", recipe))], *needles)


def test_on_policy_recipe_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    recipe = seqkd_recipe(tmp_path, stages=["distill"])
    recipe["teacher"]["signal"] = "cache"
    recipe["objective"] = [{"loss": "jsd"}]
    recipe["on_policy"] = {"probability": 0.5, "prompt_tokens": 8, "max_new_tokens": 8}
    argv = ["validate", str(_write(tmp_path / "r.yaml", recipe))]
    _fails(capsys, argv, "on_policy needs teacher.signal: live", "cannot score")
    recipe["teacher"]["signal"] = "live"
    recipe["on_policy"] = {"lambda": 0.5, "max_new_tokens": 30}
    argv = ["validate", str(_write(tmp_path / "r.yaml", recipe))]
    _fails(capsys, argv, "called probability here", "probability: 0.5")
    recipe["on_policy"] = {"probability": 0.5, "prompt_tokens": 8, "max_new_tokens": 30}
    argv = ["validate", str(_write(tmp_path / "r.yaml", recipe))]
    _fails(capsys, argv, "= 38 is more than data.seq_len (32)")


def test_prompt_longer_than_the_context(
    teacher_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    long_prompt = "Now is the winter of our discontent made glorious summer " * 2
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        json.dumps({"prompt": "ROMEO:"}) + "\n" + json.dumps({"prompt": long_prompt}) + "\n"
    )
    length = len(load_tokenizer(teacher_run / "tokenizer").encode(long_prompt).ids)
    assert length > 32
    recipe = seqkd_recipe(teacher_run, stages=["teacher", "seqkd"])
    recipe["teacher"] = {"model": TEACHER}  # trained in this run: after the prompts are checked
    recipe["seqkd"] = {"prompts": str(prompts), "generation": {"max_new_tokens": 8}}
    argv = ["run", str(_write(tmp_path / "r.yaml", recipe)), "--output-dir", str(tmp_path / "o")]
    _fails(
        capsys,
        argv,
        "1 of 2 prompts are too long",
        f"line 2: {length} teacher tokens, the teacher reads at most 32",
        "Shorten or remove those prompts, or raise data.seq_len",
    )
    assert not (tmp_path / "o" / "teacher").exists()  # refused before the teacher trained


def test_empty_prompt_file(
    teacher_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n\n")
    recipe = seqkd_recipe(teacher_run)
    recipe["seqkd"] = {"prompts": str(prompts), "generation": {"max_new_tokens": 8}}
    argv = ["run", str(_write(tmp_path / "r.yaml", recipe)), "--output-dir", str(tmp_path / "o")]
    _fails(capsys, argv, "prompts.jsonl: the prompt file is empty", '{"prompt": "ROMEO:"}')


def test_prompt_longer_than_the_students_rows(teacher_run: Path) -> None:
    tokenizer = load_tokenizer(teacher_run / "tokenizer")
    text = "My kingdom for a horse! A horse, a horse!"
    length = len(tokenizer.encode(text).ids)
    prompts = Prompts(["Hi", text], ["line 1", "line 2"], "seqkd.prompts (p.jsonl)")
    ids = check_prompts(prompts, teacher_tokenizer=tokenizer, teacher_context=100,
                        student_tokenizer=tokenizer, seq_len=length)  # fmt: skip
    assert ids[1] == tokenizer.encode(text).ids
    with pytest.raises(DataError, match=f"line 2: {length} student tokens, more than data.seq_len"):
        check_prompts(prompts, teacher_tokenizer=tokenizer, teacher_context=100,
                      student_tokenizer=tokenizer, seq_len=length - 1)  # fmt: skip
