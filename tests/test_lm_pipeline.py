"""Language-model recipes end to end on a slice of TinyShakespeare with tiny GPT-2 models:
the run folder and its numbers, the top-k cache (written, reused, resumed), exact
resume, loss normalisation over accumulation steps, and bad inputs (exit status 2, one
message, no traceback)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from helpers import fails_cleanly as _fails
from helpers import fit_lm, free_port, tiny_lm_recipe
from helpers import run_cli as _run
from helpers import write_recipe as _write
from safetensors.torch import load_file

from kdistill.cache.manifest import MANIFEST
from kdistill.cli import main
from kdistill.data.lm_text import count_characters
from kdistill.recipe.causal_lm import LMLossTerm, LMModelSpec, LMTrainConfig
from kdistill.tasks.causal_lm import CausalLM, LMObjective, chunked_cross_entropy
from kdistill.tasks.causal_lm.models import build_causal_lm
from kdistill.teachers import LiveLMTeacher


@pytest.fixture(scope="module")
def lm_env(shared_data: Path) -> Any:
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("KDISTILL_DATA", str(shared_data))
        yield


@pytest.fixture(scope="module")
def finished(lm_env: None, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One finished run with a cached teacher, shared by the tests that only read it."""
    folder = tmp_path_factory.mktemp("lm")
    recipe = _write(folder / "recipe.yaml", tiny_lm_recipe())
    assert _run(recipe, folder / "run") == 0
    return folder / "run"


def _copy_without(run: Path, tmp_path: Path, *stages: str) -> Path:
    """A copy of the finished run without the given stages, to run them again."""
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    for stage in stages:
        shutil.rmtree(copy / stage)
    return copy


# ---------------------------------------------------------------- recipes


def test_shipped_recipe_validates_through_every_entry_point(
    capsys: pytest.CaptureFixture[str],
) -> None:
    import kdistill
    from kdistill.tasks.causal_lm import LMRecipe

    recipe = kdistill.load_recipe("shakespeare_gpt_small_from_gpt", ["seeds=[0]"])
    assert isinstance(recipe, LMRecipe) and recipe.seeds == [0]
    assert recipe.data.corpus == ["tinyshakespeare/input.txt"] and recipe.data.val_fraction == 0.1
    assert recipe.teacher is not None and recipe.teacher.signal == "live"
    assert main(["validate", "shakespeare_gpt_small_from_gpt"]) == 0
    assert "valid causal_lm recipe" in " ".join(capsys.readouterr().err.split())
    assert main(["recipes"]) == 0
    assert "shakespeare_gpt_small_from_gpt" in capsys.readouterr().out


# ---------------------------------------------------------------- the run folder


def test_run_folder_numbers_and_report(finished: Path) -> None:
    for stage in ("teacher", "baseline", "distill"):
        folder = finished / stage / "seed0"
        for name in ("model.safetensors", "model.json", "eval.json", "metrics.jsonl"):
            assert (folder / name).is_file(), folder / name
        evaluation = json.loads((folder / "eval.json").read_text())
        val = evaluation["val"]
        assert math.isfinite(val["loss"]) and 0 < val["loss"] < math.log(300) + 1
        assert val["perplexity"] == pytest.approx(math.exp(val["loss"]))
        # bits per character: summed nats over the characters the same tokens spell, / ln 2
        assert val["bpc"] == pytest.approx(
            val["loss"] * val["tokens"] / (val["characters"] * math.log(2))
        )
        assert evaluation["cost"]["params"] > 0 and evaluation["cost"]["latency_ms_per_token"] > 0
        assert len(evaluation["samples"]) == 2
        metrics = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
        assert metrics[-1]["val_loss"] == pytest.approx(val["loss"], rel=1e-6)
    teacher = json.loads((finished / "teacher" / "seed0" / "eval.json").read_text())
    student = json.loads((finished / "baseline" / "seed0" / "eval.json").read_text())
    assert teacher["cost"]["params"] > 2 * student["cost"]["params"]
    # characters counted for bpc are those the validation labels decode to
    assert teacher["val"]["characters"] < 2000 + 10

    results = json.loads((finished / "results.json").read_text())
    loss = {name: results["stages"][name]["val"]["loss"] for name in results["stages"]}
    expected = (loss["baseline"] - loss["distill"]) / (loss["baseline"] - loss["teacher"])
    assert results["gap_recovered"] == pytest.approx(expected)
    assert "bits/char" in (finished / "results.md").read_text()


def test_saved_model_is_a_hugging_face_folder(finished: Path) -> None:
    from transformers import AutoModelForCausalLM

    from kdistill.checkpoint import load_weights

    folder = finished / "distill" / "seed0"
    hf = AutoModelForCausalLM.from_pretrained(folder / "hf")
    spec = LMModelSpec(config={"type": "gpt2", "n_layer": 1, "n_embd": 16, "n_head": 2})
    ours = build_causal_lm(spec, vocab_size=300, seq_len=32, eos_id=0, where="student")
    load_weights(ours, folder / "model.safetensors")  # tied weights saved once, restored
    ids = torch.randint(0, 300, (2, 10))
    with torch.no_grad():
        assert torch.allclose(hf(input_ids=ids).logits, ours.logits(ours.eval()(ids)), atol=1e-5)


def test_eval_measures_a_stage_folder_as_the_run_did(
    finished: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`kdistill eval` on a language-model stage: the run's validation numbers again, from
    the folder alone (the stage's tokenizer, the recipe's data), with no traceback."""
    folder = finished / "distill" / "seed0"
    assert main(["eval", str(folder), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    recorded = json.loads((folder / "eval.json").read_text())["val"]
    assert result["task"] == "causal_lm"
    assert result["val"]["tokens"] == recorded["tokens"]
    assert result["val"]["loss"] == pytest.approx(recorded["loss"], rel=1e-5)
    assert result["val"]["bpc"] == pytest.approx(recorded["bpc"], rel=1e-5)
    assert (
        result["cost"]["params"] == json.loads((folder / "eval.json").read_text())["cost"]["params"]
    )
    assert main(["eval", str(folder)]) == 0
    assert "perplexity" in capsys.readouterr().out
    assert main(["eval", str(folder), "--data", "mnist"]) == 2
    assert "language-model stage" in capsys.readouterr().err


def test_inspect_shows_a_language_model_recipes_modules(
    lm_env: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _write(tmp_path / "r.yaml", tiny_lm_recipe())
    assert main(["inspect", str(path), "--role", "teacher", "--depth", "4"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("teacher: causal LM, vocabulary 300, input (2, 32) token ids")
    assert "hf.transformer.h.1" in out and "(2, 32, 32)" in out  # layer 2 of 2, width 32
    assert main(["inspect", str(path), "--role", "assistant"]) == 2
    assert "no assistant section" in capsys.readouterr().err


def test_cache_is_reused_and_reported(finished: Path, capsys: pytest.CaptureFixture[str]) -> None:
    manifest = json.loads((finished / "cache" / "topk-teacher-seed0" / MANIFEST).read_text())
    assert manifest["complete"] and manifest["k"] == 8
    assert manifest["bytes_per_token"] == 4 + 8 * (2 + 2)  # tail mass + k (float16 + uint16)
    recipe = _write(finished.parent / "recipe.yaml", tiny_lm_recipe())
    code = main(["cache", str(recipe), "--output-dir", str(finished)])
    assert code == 0
    assert "is up to date" in capsys.readouterr().err


def test_report_command_rebuilds_the_lm_table(finished: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(finished, copy)
    (copy / "results.md").unlink()
    assert main(["report", str(copy)]) == 0
    assert "val loss/token" in (copy / "results.md").read_text()


def test_live_teacher_from_checkpoint_and_tokenizer_path(finished: Path, tmp_path: Path) -> None:
    """A loaded teacher is measured like the trained one, so the table has its row
    and the gap."""
    recipe = tiny_lm_recipe(stages=["baseline", "distill"])
    recipe["data"]["tokenizer"] = {"path": str(finished / "tokenizer")}
    recipe["teacher"].update(signal="live", checkpoint=str(finished))
    recipe["objective"] = [{"loss": "jsd", "params": {"beta": 0.5}, "temperature": 2.0}]
    assert _run(_write(tmp_path / "r.yaml", recipe), tmp_path / "live") == 0
    evaluation = json.loads((tmp_path / "live" / "distill" / "seed0" / "eval.json").read_text())
    assert math.isfinite(evaluation["val"]["loss"])
    assert not (tmp_path / "live" / "cache").exists()
    measured = json.loads((tmp_path / "live" / "teacher" / "seed0" / "eval.json").read_text())
    trained = json.loads((finished / "teacher" / "seed0" / "eval.json").read_text())
    assert measured["val"]["loss"] == pytest.approx(trained["val"]["loss"], rel=1e-6)
    results = json.loads((tmp_path / "live" / "results.json").read_text())
    assert list(results["stages"]) == ["teacher", "baseline", "distill"]
    assert results["gap_metric"] == "loss"  # one tokenizer: the gap on loss per token
    assert results["gap_recovered"] is not None, results["gap_recovered_note"]


# ---------------------------------------------------------------- cache, resume


def test_killed_cache_job_resumes_from_its_last_shard(
    finished: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import kdistill.cache.topk_teacher as topk_teacher

    run = _copy_without(finished, tmp_path, "distill")
    cache = run / "cache" / "topk-teacher-seed0"
    complete = json.loads((cache / MANIFEST).read_text())
    shutil.rmtree(cache)
    recipe = _write(tmp_path / "r.yaml", tiny_lm_recipe())

    real = topk_teacher.topk_batches
    firsts: list[int] = []

    def dies_after_two_batches(*args: Any, **kwargs: Any) -> Any:
        firsts.append(kwargs["first"])
        for i, batch in enumerate(real(*args, **kwargs)):
            if i == 2 and len(firsts) == 1:
                raise KeyboardInterrupt  # the job is stopped mid-way
            yield batch

    monkeypatch.setattr(topk_teacher, "topk_batches", dies_after_two_batches)
    assert main(["cache", str(recipe), "--output-dir", str(run)]) == 130
    partial = json.loads((cache / MANIFEST).read_text())
    assert not partial["complete"] and 0 < partial["sequences_written"] < complete["num_sequences"]
    assert main(["cache", str(recipe), "--output-dir", str(run)]) == 0
    assert firsts == [0, partial["sequences_written"]]  # the teacher skips what is stored
    resumed = json.loads((cache / MANIFEST).read_text())
    assert resumed["complete"]
    assert [s["sha256"] for s in resumed["shards"]] == [s["sha256"] for s in complete["shards"]]


def test_interrupted_run_resumes_to_the_same_weights(
    lm_env: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import kdistill.tasks.causal_lm.steps as lm_train

    recipe = tiny_lm_recipe(stages=["baseline"])
    recipe["student"]["model"]["config"]["resid_pdrop"] = 0.2  # resume must restore the RNG
    recipe["train"].update(epochs=2, checkpoint_every=5)
    path = _write(tmp_path / "r.yaml", recipe)
    assert _run(path, tmp_path / "straight") == 0

    real, calls = lm_train.step_losses, [0]

    def interrupted(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        if calls[0] == 33:  # in the second epoch, between two checkpoints
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(lm_train, "step_losses", interrupted)
    assert _run(path, tmp_path / "killed") == 130
    monkeypatch.setattr(lm_train, "step_losses", real)
    assert not (tmp_path / "killed" / "baseline" / "seed0" / "eval.json").exists()
    assert _run(path, tmp_path / "killed", "--resume") == 0
    a = load_file(str(tmp_path / "straight" / "baseline" / "seed0" / "model.safetensors"))
    b = load_file(str(tmp_path / "killed" / "baseline" / "seed0" / "model.safetensors"))
    assert a.keys() == b.keys()
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-6
    lines = (tmp_path / "killed" / "baseline" / "seed0" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2]


@pytest.mark.slow
def test_two_processes_match_one(lm_env: None, tmp_path: Path) -> None:
    """Each process takes its share of the step's sequences and scales by world size over
    the step's global token count, so 2 DDP processes reach the weights of 1 (cache
    written once by the main process, read by both)."""
    import os
    import subprocess
    import sys

    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent))
    assert accelerate is not None
    recipe = tiny_lm_recipe(samples={"count": 0})
    for section in ("teacher", "student"):  # no dropout: its masks differ when split
        recipe[section]["model"]["config"].update(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    recipe["train"]["optimizer"] = {"name": "sgd", "lr": 0.3}
    path = _write(tmp_path / "r.yaml", recipe)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    assert _run(path, tmp_path / "one") == 0
    two = subprocess.run(
        [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
         "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
         "-m", "kdistill.cli", "run", str(path), "--output-dir", str(tmp_path / "two"), "--quiet"],
        env=env, capture_output=True, timeout=300, check=False,
    )  # fmt: skip
    assert two.returncode == 0, two.stderr.decode()[-3000:]
    assert "2 process(es)" in " ".join(two.stderr.decode().split())
    for stage in ("teacher", "baseline", "distill"):
        a = load_file(str(tmp_path / "one" / stage / "seed0" / "model.safetensors"))
        b = load_file(str(tmp_path / "two" / stage / "seed0" / "model.safetensors"))
        assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5, stage


# ---------------------------------------------------------------- normalisation


def _tiny(vocab: int, seed: int, layers: int = 1) -> CausalLM:
    torch.manual_seed(seed)
    config = {"type": "gpt2", "n_layer": layers, "n_embd": 16, "n_head": 2, "n_positions": 16}
    config.update(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return build_causal_lm(
        LMModelSpec(config=config), vocab_size=vocab, seq_len=12, eos_id=None, where="m"
    )


def _fit(tmp: Path, grad_accum: int, objective: LMObjective, teacher: Any) -> dict[str, Any]:
    torch.manual_seed(0)
    train = torch.randint(0, 50, (64, 13))  # 64 packed sequences of 12 tokens
    model = _tiny(50, seed=1)
    settings = LMTrainConfig(
        epochs=1,
        batch_size=16,
        grad_accum=grad_accum,
        optimizer={"name": "sgd", "lr": 0.5},  # plain SGD: a wrong loss scale shows
        eval_batch_size=64,
    )
    fit_lm(
        model,
        train=train,
        val=train[:8],
        objective=objective,
        teacher=teacher,
        settings=settings,
        vocab_size=50,
        seed=0,
        out_dir=tmp / f"accum{grad_accum}",
        accelerator=Accelerator(cpu=True),
        quiet=True,
    )
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("with_teacher", [False, True], ids=["ce", "ce+jsd"])
def test_grad_accum_does_not_change_the_weights(tmp_path: Path, with_teacher: bool) -> None:
    teacher, objective = None, LMObjective(ce_weight=1.0)
    if with_teacher:
        teacher = LiveLMTeacher(_tiny(50, seed=7, layers=2))
        term = LMLossTerm(loss="jsd", params={"beta": 0.3}, temperature=2.0)
        objective = LMObjective(ce_weight=0.5, divergence=term)
    one = _fit(tmp_path, 1, objective, teacher)
    four = _fit(tmp_path, 4, objective, teacher)
    moved = max(float((one[k] - _tiny(50, seed=1).state_dict()[k]).abs().max()) for k in one)
    assert moved > 1e-3  # training did change the weights
    assert max(float((one[k] - four[k]).abs().max()) for k in one) < 2e-5


def test_chunked_cross_entropy_matches_full_logits() -> None:
    torch.manual_seed(0)
    hidden = torch.randn(3, 7, 8, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(11, 8, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 11, (3, 7))
    labels[0, :4] = -100
    ours = chunked_cross_entropy(hidden, weight, None, labels, chunk_size=4)
    reference = F.cross_entropy(
        (hidden @ weight.T).reshape(-1, 11), labels.reshape(-1), reduction="sum"
    )
    assert float(ours.detach()) == pytest.approx(float(reference.detach()), rel=1e-6)
    grads = torch.autograd.grad(ours, (hidden, weight))
    expected = torch.autograd.grad(reference, (hidden, weight))
    for got, want in zip(grads, expected):
        assert torch.allclose(got.double(), want, rtol=1e-5, atol=1e-6)
    masked = chunked_cross_entropy(hidden, weight, None, torch.full((3, 7), -100))
    assert float(masked.detach()) == 0.0
    assert torch.autograd.grad(masked, hidden)[0].abs().max() == 0


def test_count_characters_of_labels_matches_text(finished: Path) -> None:
    from kdistill.data.lm_text import load_tokenizer

    tokenizer = load_tokenizer(finished / "tokenizer")
    ids = tokenizer.encode("To be, or not to be").ids
    assert count_characters(tokenizer, ids) == len("To be, or not to be")


# ---------------------------------------------------------------- bad inputs


def test_teacher_with_another_tokenizer_is_refused(
    finished: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    recipe = tiny_lm_recipe(stages=["baseline", "distill"])
    recipe["data"]["tokenizer"] = {"vocab_size": 290}  # another tokenizer than the teacher's
    recipe["teacher"]["checkpoint"] = str(finished)
    path = _write(tmp_path / "r.yaml", recipe)
    argv = ["run", str(path), "--output-dir", str(tmp_path / "out"), "--quiet"]
    _fails(capsys, argv, "another tokenizer", "sequence-level distillation")
    assert not (tmp_path / "out" / "baseline").exists()  # refused before any training


def test_cache_with_another_k_is_refused(
    finished: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = _copy_without(finished, tmp_path, "distill")
    recipe = tiny_lm_recipe()
    recipe["teacher"]["cache"]["top_k"] = 4  # the run's cache holds k = 8
    path = _write(tmp_path / "r.yaml", recipe)
    argv = ["run", str(path), "--output-dir", str(run), "--quiet", "--resume"]
    _fails(capsys, argv, "is stale", "k: expected 4, found 8", "to rebuild it")
    assert not (run / "distill").exists()


def test_cache_of_another_teacher_is_refused(
    finished: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    recipe = tiny_lm_recipe(stages=["teacher", "distill"])
    recipe["data"]["tokenizer"] = {"path": str(finished / "tokenizer")}
    recipe["teacher"]["train"] = {"epochs": 1}  # another teacher, pointed at the old cache
    recipe["teacher"]["cache"]["dir"] = str(finished / "cache" / "topk-teacher-seed0")
    path = _write(tmp_path / "r.yaml", recipe)
    argv = ["run", str(path), "--output-dir", str(tmp_path / "other"), "--quiet"]
    _fails(capsys, argv, "is stale", "teacher: expected", "to rebuild it")


def test_cache_of_another_dataset_is_refused(
    finished: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = _copy_without(finished, tmp_path, "distill")
    recipe = tiny_lm_recipe(stages=["distill"])
    recipe["data"]["tokenizer"] = {"path": str(run / "tokenizer")}
    recipe["data"]["limit_chars"] = 19000  # same tokenizer and teacher, other sequences
    recipe["teacher"].update(checkpoint=str(run))
    recipe["teacher"]["cache"]["dir"] = str(run / "cache" / "topk-teacher-seed0")
    path = _write(tmp_path / "r.yaml", recipe)
    argv = ["run", str(path), "--output-dir", str(tmp_path / "other"), "--quiet"]
    _fails(capsys, argv, "is stale", "dataset: expected", "num_sequences")


def test_truncated_cache_shard_is_refused(
    finished: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = _copy_without(finished, tmp_path, "distill")
    shard = sorted((run / "cache" / "topk-teacher-seed0").glob("shard-*.bin"))[0]
    shard.write_bytes(shard.read_bytes()[:-100])
    path = _write(tmp_path / "r.yaml", tiny_lm_recipe())
    argv = ["run", str(path), "--output-dir", str(run), "--quiet", "--resume"]
    _fails(capsys, argv, shard.name, "truncated or damaged")
    assert not (run / "distill").exists()


def test_corpus_shorter_than_one_sequence(
    lm_env: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    recipe = tiny_lm_recipe()
    recipe["data"]["limit_chars"] = 300  # 30 validation characters: fewer than 33 tokens
    path = _write(tmp_path / "r.yaml", recipe)
    argv = ["run", str(path), "--output-dir", str(tmp_path / "out"), "--quiet"]
    _fails(capsys, argv, "validation split", "shorter than one sequence", "seq_len")


def test_temperature_not_positive(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    recipe = tiny_lm_recipe(objective=[{"loss": "reverse_kl", "temperature": 0}])
    path = _write(tmp_path / "r.yaml", recipe)
    _fails(capsys, ["validate", str(path)], "objective[0]", "temperature", "(0, inf)")


def test_recipe_errors_are_collected_with_suggestions(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    recipe = tiny_lm_recipe(objective=[{"loss": "forward_kll"}])
    recipe["data"]["seq_lne"] = 8
    recipe["samples"] = {"prompt_tokens": 0}
    path = _write(tmp_path / "r.yaml", recipe)
    _fails(
        capsys,
        ["validate", str(path)],
        "3 problems",
        "did you mean 'forward_kl'",
        "did you mean 'seq_len'",
        "samples.prompt_tokens",
    )


def test_student_vocabulary_smaller_than_the_shared_range(
    lm_env: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    recipe = tiny_lm_recipe()
    recipe["student"]["model"]["config"]["vocab_size"] = 200
    path = _write(tmp_path / "r.yaml", recipe)
    argv = ["run", str(path), "--output-dir", str(tmp_path / "out"), "--quiet"]
    _fails(capsys, argv, "student.model", "200 rows", "300 tokens", "vocab_size: 300")
    assert not (tmp_path / "out" / "teacher").exists()  # refused before the teacher trained
