"""The seq2seq task: the model wrapper against Hugging Face's own logits, the word-level
KD loss against a naive reference on full logits, greedy translation against a
step-by-step argmax, shrink and fine-tune, length bucketing, and a run of every stage
on real Multi30k pairs (a few hundred, tiny models) with its report, eval, export and
resume."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from helpers import write_recipe

from kdistill.api import run
from kdistill.cli import main
from kdistill.errors import KdistillError
from kdistill.losses.lm_objective import LMObjective
from kdistill.recipe.causal_lm import LMLossTerm, LMTrainConfig
from kdistill.recipe.seq2seq import (
    DecodeConfig,
    Seq2SeqDataConfig,
    Seq2SeqModelSpec,
    Seq2SeqTokenizerConfig,
    ShrinkSpec,
)
from kdistill.tasks.seq2seq.data import (
    IGNORE_INDEX,
    batch,
    bucketed_order,
    load_seq2seq,
)
from kdistill.tasks.seq2seq.models import Seq2SeqLM, build_model, shrink
from kdistill.tasks.seq2seq.report import against_baseline
from kdistill.tasks.seq2seq.steps import LiveSeq2SeqTeacher, Seq2SeqSteps, translate

pytest.importorskip("sacrebleu")

MARIAN = {
    "type": "marian",
    "d_model": 32,
    "encoder_layers": 2,
    "decoder_layers": 3,
    "encoder_attention_heads": 2,
    "decoder_attention_heads": 2,
    "encoder_ffn_dim": 64,
    "decoder_ffn_dim": 64,
    "max_position_embeddings": 64,
}


@pytest.fixture(scope="module")
def data(data_root: Path) -> Any:
    section = Seq2SeqDataConfig(
        limit_train=300,
        limit_val=20,
        limit_test=20,
        max_source_length=24,
        max_target_length=24,
        tokenizer=Seq2SeqTokenizerConfig(vocab_size=300),
    )
    return load_seq2seq(section, data_root)


@pytest.fixture(scope="module")
def data_root() -> Path:
    import os

    root = Path(os.environ.get("KDISTILL_DATA", "")) / "multi30k"
    if not (root / "train.en.gz").is_file():
        pytest.skip("Multi30k is not in the data folder ($KDISTILL_DATA)")
    return root.parent


def _model(data: Any, config: dict[str, Any] | None = None, seed: int = 0) -> Seq2SeqLM:
    torch.manual_seed(seed)
    spec = Seq2SeqModelSpec(config=config or MARIAN)
    model = build_model(spec, data.tokenizers, where="model")
    with torch.no_grad():  # a bias that is not zero, so the test sees it used
        model.hf.final_logits_bias.normal_(0, 0.5)
    return model.eval()


def _inputs(data: Any, rows: int = 6) -> dict[str, torch.Tensor]:
    return batch(data.train, torch.arange(rows), pad_id=data.pad_id, start_id=data.pad_id)


def test_wrapper_logits_are_hugging_faces(data: Any) -> None:
    model = _model(data)
    inputs = _inputs(data)
    inputs.pop("labels")
    with torch.no_grad():
        ours = model(**inputs)
        theirs = model.hf(**inputs).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_t5_wrapper_scales_tied_outputs_as_t5_does(data: Any) -> None:
    config = {
        "type": "t5",
        "d_model": 32,
        "d_kv": 8,
        "d_ff": 64,
        "num_layers": 2,
        "num_decoder_layers": 2,
        "num_heads": 4,
        "tie_word_embeddings": True,
    }
    torch.manual_seed(0)
    model = build_model(Seq2SeqModelSpec(config=config), data.tokenizers, where="model").eval()
    inputs = _inputs(data)
    inputs.pop("labels")
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs), model.hf(**inputs).logits, rtol=1e-5, atol=1e-5)


def test_word_level_kd_loss_matches_full_logits(data: Any) -> None:
    """Σ over counted target tokens of w_ce · CE + w_kl · KL(teacher ‖ student) at T, from
    the steps' chunked loss, equals the same from full logits."""
    student, teacher = _model(data, seed=1), _model(data, seed=2)
    temperature = 2.0
    objective = LMObjective.of(
        [
            LMLossTerm(loss="cross_entropy", weight=0.3),
            LMLossTerm(loss="forward_kl", weight=0.7, temperature=temperature),
        ]
    )

    class Place:
        device = torch.device("cpu")
        process_index = 0
        mixed_precision = "no"

    steps = Seq2SeqSteps(
        student,
        train=data.train,
        val=data.val,
        objective=objective,
        teacher=LiveSeq2SeqTeacher(teacher),
        settings=LMTrainConfig(chunk_size=7),
        accelerator=Place(),  # type: ignore[arg-type]
        pad_id=data.pad_id,
        start_id=student.start_id,
        vocab_size=data.tokenizers.target.get_vocab_size(),
        greedy_max_new_tokens=8,
        val_sentences=None,
    )
    rows = torch.tensor([3, 0, 7, 11])
    loss, parts = steps.loss(student, rows, progress=0.0)
    inputs = batch(data.train, rows, pad_id=data.pad_id, start_id=data.pad_id)
    labels = inputs.pop("labels")
    counted = labels != IGNORE_INDEX
    s_logits = student(**inputs)[counted]
    with torch.no_grad():
        t_logits = teacher(**inputs)[counted]
    ce = F.cross_entropy(s_logits, labels[counted], reduction="sum")
    t_log = F.log_softmax(t_logits / temperature, -1)
    s_log = F.log_softmax(s_logits / temperature, -1)
    kl = (t_log.exp() * (t_log - s_log)).sum()
    torch.testing.assert_close(loss, 0.3 * ce + 0.7 * kl, rtol=1e-4, atol=1e-4)
    assert steps.count(rows, rows, 0).total == int(counted.sum())
    assert parts["ce"] == pytest.approx(float(ce.detach()), rel=1e-4)
    # the gradient reaches the student's output bias (the final logits bias is a buffer
    # in Marian; the output layer's weight is the shared embedding)
    loss.backward()
    assert student.hf.get_output_embeddings().weight.grad is not None


def test_greedy_translation_is_the_step_by_step_argmax(data: Any) -> None:
    model = _model(data, seed=3)
    sources = data.test.sources[:4]
    settings = DecodeConfig(num_beams=1, max_new_tokens=6, batch_size=3)
    made = translate(model, sources, settings, device="cpu")
    eos = data.eos_id
    for source, written in zip(sources, made.ids):
        decoder = [model.start_id]
        expected: list[int] = []
        for _ in range(6):
            with torch.no_grad():
                logits = model(
                    source[None], torch.ones(1, len(source), dtype=torch.long),
                    torch.tensor([decoder]),
                )  # fmt: skip
            token = int(logits[0, -1].argmax())
            if token == eos:
                break
            expected.append(token)
            decoder.append(token)
        assert written == expected
    assert made.tokens > 0 and made.seconds > 0


def test_shrink_copies_the_chosen_layers_and_random_init_does_not(data: Any) -> None:
    teacher = _model(data)
    student = shrink(teacher, ShrinkSpec(decoder_layers=[2, 0]), where="student.model.shrink")
    assert student.layer_counts() == (2, 2)
    t, s = teacher.hf.state_dict(), student.hf.state_dict()
    for mine, theirs in ((0, 2), (1, 0)):
        key = "model.decoder.layers.{}.fc1.weight"
        assert torch.equal(s[key.format(mine)], t[key.format(theirs)])
    for key in ("model.shared.weight", "final_logits_bias", "model.encoder.layers.1.fc2.bias"):
        assert torch.equal(s[key], t[key])
    fresh = shrink(teacher, ShrinkSpec(decoder_layers=[2, 0], init="random"), where="x")
    assert fresh.layer_counts() == (2, 2)
    assert not torch.equal(
        fresh.hf.state_dict()["model.decoder.layers.0.fc1.weight"],
        t["model.decoder.layers.2.fc1.weight"],
    )


def test_bucketed_order_is_a_permutation_of_similar_length_batches(data: Any) -> None:
    lengths = data.train.target_lengths
    generator = torch.Generator().manual_seed(0)
    order = bucketed_order(lengths, generator, 8, pool=4)
    assert sorted(order.tolist()) == list(range(len(lengths)))
    spread = [
        int(lengths[b].max() - lengths[b].min()) for b in torch.split(order, 8) if len(b) == 8
    ]
    shuffled = [
        int(lengths[b].max() - lengths[b].min())
        for b in torch.split(torch.randperm(len(lengths), generator=generator), 8)
        if len(b) == 8
    ]
    assert sum(spread) < sum(shuffled) / 2
    again = bucketed_order(lengths, torch.Generator().manual_seed(0), 8, pool=4)
    assert torch.equal(order, again)


# ---------------------------------------------------------------------- a whole run


def tiny_mt_recipe(**changes: Any) -> dict[str, Any]:
    recipe: dict[str, Any] = {
        "task": "seq2seq",
        "name": "tiny_mt",
        "data": {
            "path": "multi30k",
            "limit_train": 200,
            "limit_val": 16,
            "limit_test": 16,
            "max_source_length": 24,
            "max_target_length": 24,
            "tokenizer": {"vocab_size": 300},
        },
        "teacher": {"model": {"config": MARIAN}},
        "student": {"model": {"shrink": {"decoder_layers": [1]}}},
        "seqkd": {"num_beams": 2, "max_new_tokens": 12},
        "evaluation": {
            "beam": {"num_beams": 2, "max_new_tokens": 12},
            "greedy_max_new_tokens": 12,
            "samples": 2,
        },
        "train": {"epochs": 1, "batch_size": 32, "eval_batch_size": 32,
                  "optimizer": {"name": "adamw", "lr": 0.003}},
        "stages": ["teacher", "baseline", "distill", "seqkd", "seqkd_distill"],
        "output": {"plots": False},
    }  # fmt: skip
    recipe.update(changes)
    return recipe


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory, data_root: Path) -> Path:
    out = tmp_path_factory.mktemp("mt") / "run"
    run(tiny_mt_recipe(), output_dir=out, data_dir=data_root, quiet=True)
    return out


def test_every_stage_runs_and_the_report_compares_them(tiny_run: Path) -> None:
    results = json.loads((tiny_run / "results.json").read_text())
    # the report's stage order (kdistill.report.STAGE_ORDER): seqkd stages before distill
    assert list(results["stages"]) == ["teacher", "baseline", "seqkd", "seqkd_distill", "distill"]
    for name, stage in results["stages"].items():
        for key in ("bleu", "chrf", "bleu_beam", "chrf_beam", "tokens_per_second"):
            assert isinstance(stage["test"][key], float), (name, key)
    assert results["signatures"]["bleu"].startswith("nrefs:1|case:mixed")
    markdown = (tiny_run / "results.md").read_text()
    assert "| seqkd_distill | 1 |" in markdown and "## Translations" in markdown
    # results.md lists them as Kim & Rush do: word-level, sequence-level, both
    rows = [line.split("|")[1].strip() for line in markdown.splitlines() if line.startswith("| ")]
    assert rows[1:6] == ["teacher", "baseline", "distill", "seqkd", "seqkd_distill"]
    # and each one against the baseline of its seed
    against = {r["stage"]: r for r in against_baseline(results)}
    alone = results["stages"]["baseline"]["per_seed"][0]["test"]
    for name in ("distill", "seqkd", "seqkd_distill"):
        mine = results["stages"][name]["per_seed"][0]["test"]
        for metric in ("bleu", "bleu_beam"):
            assert against[name][metric]["mean"] == pytest.approx(mine[metric] - alone[metric])
            assert against[name][metric]["better"] == int(mine[metric] > alone[metric])
        shown = f"{against[name]['bleu']['mean']:+.2f} (min "
        assert f"| {name} | 1 | {shown}" in markdown
    evaluation = json.loads((tiny_run / "distill" / "seed0" / "eval.json").read_text())
    assert evaluation["shrunk_from_teacher"] == {
        "encoder_layers": [0, 1], "decoder_layers": [1], "init": "teacher",
    }  # fmt: skip
    assert len(evaluation["samples"]) == 2 and evaluation["best"]["epoch"] == 1
    beam = (tiny_run / "distill" / "seed0" / "test.beam.txt").read_text().splitlines()
    assert len(beam) == 16
    # the teacher translated every training source once, for both seqkd stages
    manifest = json.loads((tiny_run / "seqkd" / "translations" / "manifest.json").read_text())
    assert manifest["complete"] and manifest["spec"]["sources"] == 200
    lines = (tiny_run / "seqkd" / "translations" / "translations.jsonl").read_text().splitlines()
    assert sorted(json.loads(x)["i"] for x in lines) == list(range(200))


def test_resume_skips_finished_stages_and_reuses_the_translations(
    tiny_run: Path, data_root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    recipe = write_recipe(tiny_run.parent / "recipe.yaml", tiny_mt_recipe())
    code = main(
        [
            "run",
            str(recipe),
            "--output-dir",
            str(tiny_run),
            "--resume",
            "--data-dir",
            str(data_root),
        ]
    )
    assert code == 0
    err = capsys.readouterr().err
    assert "seqkd seed 0: finished earlier" in err
    assert "teacher seed 0: already trained" in err


def test_eval_and_export_of_a_stage(tiny_run: Path, data_root: Path, tmp_path: Path) -> None:
    from kdistill.tasks.seq2seq.export import export_translator
    from kdistill.tasks.seq2seq.measure import evaluate_checkpoint

    weights = tiny_run / "seqkd" / "seed0" / "model.safetensors"
    measured = evaluate_checkpoint(weights, data_dir=data_root)
    stored = json.loads((tiny_run / "seqkd" / "seed0" / "eval.json").read_text())
    assert measured["test"]["bleu"] == pytest.approx(stored["test"]["bleu"])
    exported = export_translator(weights, output=tmp_path / "exp", data_dir=data_root, threads=1)
    # the reloaded folder translates the whole test split as the stage does, same BLEU
    parity = exported["parity"]
    assert parity["same_translation"] == 1.0 and parity["sentences"] == 16  # limit_test
    assert parity["exported"]["bleu"] == pytest.approx(parity["pytorch"]["bleu"])
    assert parity["pytorch"]["bleu"] == pytest.approx(stored["test"]["bleu"])
    assert (tmp_path / "exp" / "tokenizer.json").is_file()
    engines = [row["engine"] for row in exported["latency"]]
    assert engines == ["exported student, PyTorch FP32", "teacher, PyTorch FP32"]
    assert all(row["batch_1"]["median_ms"] > 0 for row in exported["latency"])
    card = (tmp_path / "exp" / "README.md").read_text()
    assert "translations identical" in card and "teacher, PyTorch FP32" in card
    # an export folder that holds files is refused without overwrite
    with pytest.raises(KdistillError, match="already holds files"):
        export_translator(weights, output=tmp_path / "exp", data_dir=data_root)


# ---------------------------------------------------------------------- top-k cache


def test_cached_teacher_gives_the_live_teachers_loss(data: Any, tmp_path: Path) -> None:
    """With k = the whole vocabulary the cache holds the teacher's distribution (float16
    log-probabilities), so the cached loss is the live one up to that rounding; rows of
    any length read their own positions."""
    from kdistill.cache.topk import open_topk_cache
    from kdistill.recipe.seq2seq import Seq2SeqRecipe
    from kdistill.tasks.seq2seq.teacher_cache import (
        CachedSeq2SeqTeacher,
        cache_spec,
        write_cache,
    )

    student, teacher = _model(data, seed=1), _model(data, seed=2)
    vocab = data.tokenizers.target.get_vocab_size()
    recipe = Seq2SeqRecipe.model_validate(
        {
            "task": "seq2seq",
            "name": "c",
            "data": data.section.model_dump(),
            "teacher": {"model": {"config": MARIAN}, "signal": "cache", "cache": {"top_k": vocab}},
            "student": {"model": {"config": MARIAN}},
            "objective": [{"loss": "forward_kl", "temperature": 2.0}],
            "stages": ["teacher", "distill"],
        }
    )
    spec = cache_spec(recipe, data, "teacher-a")
    first = write_cache(
        tmp_path / "c", spec, teacher, data, batch_size=64, shard_sequences=100, device="cpu"
    )
    assert not first["reused"]
    again = write_cache(
        tmp_path / "c", spec, teacher, data, batch_size=64, shard_sequences=100, device="cpu"
    )
    assert again["reused"]
    objective = LMObjective.of(recipe.objective)

    class Place:
        device = torch.device("cpu")
        process_index = 0
        mixed_precision = "no"

    def loss_with(signal: Any) -> torch.Tensor:
        steps = Seq2SeqSteps(
            student, train=data.train, val=data.val, objective=objective, teacher=signal,
            settings=LMTrainConfig(), accelerator=Place(),  # type: ignore[arg-type]
            pad_id=data.pad_id, start_id=student.start_id, vocab_size=vocab,
            greedy_max_new_tokens=8, val_sentences=None,
        )  # fmt: skip
        return steps.loss(student, torch.tensor([5, 1, 9, 2, 40]), progress=0.0)[0]

    live = loss_with(LiveSeq2SeqTeacher(teacher))
    cached = loss_with(CachedSeq2SeqTeacher(open_topk_cache(tmp_path / "c", expect=spec), "cpu"))
    torch.testing.assert_close(cached, live, rtol=2e-3, atol=2e-3)
    from kdistill.errors import CacheError

    stale = cache_spec(recipe.model_copy(update={"objective": []}), data, "teacher-b")
    with pytest.raises(CacheError, match="teacher"):
        open_topk_cache(tmp_path / "c", expect=stale)


def test_distill_stage_reads_the_cache_once_for_every_seed(
    tmp_path: Path, data_root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    recipe = tiny_mt_recipe(stages=["teacher", "distill"], seeds=[0, 1])
    recipe["teacher"] = {"model": {"config": MARIAN}, "signal": "cache", "cache": {"top_k": 16}}
    path = write_recipe(tmp_path / "recipe.yaml", recipe)
    out = tmp_path / "run"
    assert main(["run", str(path), "--output-dir", str(out), "--data-dir", str(data_root)]) == 0
    err = capsys.readouterr().err
    assert "teacher top-16 cached in" in err and "teacher top-16 cache hit" in err
    assert (out / "cache" / "topk-teacher-seed0" / "manifest.json").is_file()
    assert main(["cache", str(path), "--output-dir", str(out), "--data-dir", str(data_root)]) == 0
    # the plan reads a stand-in of that cache (no teacher in memory) and sizes it as written
    capsys.readouterr()
    argv = ["plan", str(path), "--stage", "distill", "--steps", "1", "--json"]
    assert main([*argv, "--data-dir", str(data_root)]) == 0
    (planned,) = json.loads(capsys.readouterr().out)["stages"]
    assert planned["teacher"] == "cache" and planned["teacher_bytes"] == 0
    assert planned["teacher_output_bytes"] > 0  # the batch's top-16 ids and log-probabilities
    shards = (out / "cache" / "topk-teacher-seed0").glob("shard-*.bin")
    assert planned["cache"]["bytes"] == sum(shard.stat().st_size for shard in shards)


def test_plan_runs_the_stages_own_steps(data_root: Path) -> None:
    """kdistill plan builds every trained stage and runs its real micro-step: the teacher
    it reads (live, handing the loss its decoder states), the chunked loss over the
    longest pairs' target tokens."""
    from kdistill.api import plan as plan_recipe
    from kdistill.recipe import validate_recipe

    plan = plan_recipe(validate_recipe(tiny_mt_recipe()), data_dir=data_root, steps=1)
    names = [s.stage for s in plan.stages]
    assert names == ["teacher", "baseline", "distill", "seqkd", "seqkd_distill"]
    by_name = {s.stage: s for s in plan.stages}
    assert by_name["baseline"].teacher is None and by_name["distill"].teacher == "teacher.model"
    assert by_name["distill"].teacher_output_bytes > 0 and by_name["baseline"].activation_bytes > 0
    loss = by_name["distill"].loss
    assert loss is not None and loss.kind == "kl" and loss.tokens > 32
    # a live teacher: the cache it could read instead is sized, and the advice may name it
    cache = by_name["distill"].cache
    assert cache is not None and not cache.in_use and cache.bytes > 0
    assert by_name["seqkd_distill"].cache is None  # its targets are not the references
