import json
import math
import sys
from pathlib import Path

import pytest
from rich.console import Console

from kdistill.errors import RunDirError
from kdistill.report import collect
from kdistill.tasks.classification.report import _read_curves, print_table, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
N_TEST = 10_000


def metrics(accuracy, nll=0.05, ece=0.01, agreement=None):
    out = {"accuracy": accuracy, "errors": round((1 - accuracy) * N_TEST), "nll": nll, "ece": ece}
    if agreement is not None:
        out["agreement"] = agreement
    return out


def cost(params):
    return {
        "params": params,
        "flops": 2 * params,
        "latency_ms": 1.5,
        "latency_ms_per_sample": 1.5 / 256,
        "latency_ms_single": 0.25,
        "batch_size": 256,
        "size_bytes": 4 * params + 400,
        "device": "cpu",
        "threads": 2,
    }


# stage -> seed -> (test accuracy, best test accuracy, agreement, train seconds)
RUN = {
    "teacher": {0: (0.99, 0.99, None, 300.0)},
    "baseline": {0: (0.97, 0.97, 0.97, 100.0), 1: (0.96, 0.97, 0.96, 110.0)},
    "distill": {0: (0.98, 0.98, 0.985, 120.0), 1: (0.985, 0.99, 0.99, 130.0)},
}
PARAMS = {"teacher": 2_000_000, "baseline": 50_000, "distill": 50_000}


def write_stage(run: Path, stage: str, seed: int, *, best: bool = True) -> None:
    test_acc, best_acc, agreement, seconds = RUN[stage][seed]
    folder = run / stage / f"seed{seed}"
    folder.mkdir(parents=True)
    record = {
        "stage": stage,
        "seed": seed,
        "epochs": 3,
        "train_seconds": seconds,
        "test": metrics(test_acc, agreement=agreement),
        "val": metrics(test_acc + 0.001, agreement=agreement),
        "best": {
            "epoch": 2,
            "test": metrics(best_acc, agreement=agreement),
            "val": metrics(best_acc + 0.002, agreement=agreement),
        }
        if best
        else None,
        "cost": cost(PARAMS[stage]),
    }
    (folder / "eval.json").write_text(json.dumps(record))
    lines = []
    for epoch in range(1, 4):
        for step in (1, 2):
            loss = 1.0 / (epoch + step) + seed
            lines.append({"stage": stage, "seed": seed, "epoch": epoch, "step": step,
                          "split": "train", "loss": loss, "terms": {"cross_entropy": loss},
                          "lr": 0.1, "seconds": 1.0})  # fmt: skip
        lines.append({"stage": stage, "seed": seed, "epoch": epoch, "step": 2, "split": "val",
                      "loss": 0.2, "accuracy": 0.9 + epoch / 100, "seconds": 1.0})  # fmt: skip
    (folder / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    (run / "recipe.yaml").write_text("name: mlp_from_mlp_mnist\nseeds: [0, 1]\n")
    for stage, seeds in RUN.items():
        for seed in seeds:
            write_stage(run, stage, seed)
    return run


def test_collect_means_and_stds(run_dir):
    results = collect(run_dir)
    assert results["recipe"] == "mlp_from_mlp_mnist"
    assert list(results["stages"]) == ["teacher", "baseline", "distill"]

    teacher = results["stages"]["teacher"]
    assert teacher["seeds"] == [0]
    assert teacher["test"]["accuracy"] == pytest.approx(0.99)
    assert teacher["test"]["accuracy_std"] == 0.0  # one seed
    assert "agreement" not in teacher["test"]

    baseline = results["stages"]["baseline"]
    assert baseline["seeds"] == [0, 1]
    assert baseline["test"]["accuracy"] == pytest.approx(0.965)
    assert baseline["test"]["accuracy_std"] == pytest.approx(math.sqrt(0.01**2 / 2))  # ddof=1
    assert baseline["test"]["errors"] == pytest.approx(350)
    assert baseline["test"]["errors_std"] == pytest.approx(math.sqrt(100**2 / 2))
    assert baseline["test"]["agreement"] == pytest.approx(0.965)
    assert baseline["val"]["accuracy"] == pytest.approx(0.966)
    assert baseline["train_seconds"] == pytest.approx(105.0)
    assert baseline["train_seconds_std"] == pytest.approx(math.sqrt(50))
    assert baseline["cost"] == cost(50_000)
    assert [s["seed"] for s in baseline["per_seed"]] == [0, 1]

    distill = results["stages"]["distill"]
    assert distill["test"]["accuracy"] == pytest.approx(0.9825)
    assert distill["test"]["errors"] == pytest.approx(175)
    assert distill["best"]["seeds"] == [0, 1]
    assert distill["best"]["epochs"] == [2, 2]
    assert distill["best"]["test"]["accuracy"] == pytest.approx(0.985)
    assert distill["best"]["test"]["accuracy_std"] == pytest.approx(math.sqrt(0.01**2 / 2))


def test_gap_recovered_by_hand(run_dir):
    results = collect(run_dir)
    # test error: teacher 0.01, baseline 0.035, distill 0.0175
    assert results["gap_recovered"] == pytest.approx((0.035 - 0.0175) / (0.035 - 0.01))
    assert results["gap_recovered"] == pytest.approx(0.7)
    assert results["gap_recovered_note"] is None
    # best checkpoints: teacher 0.01, baseline 0.03, distill 0.015
    assert results["gap_recovered_best"] == pytest.approx(0.75)
    assert results["gap_recovered_best_note"] is None


def test_gap_recovered_missing_stage(tmp_path):
    run = tmp_path / "run"
    for seed in RUN["baseline"]:
        write_stage(run, "baseline", seed)
    write_stage(run, "distill", 0)
    results = collect(run)
    assert results["recipe"] is None
    assert results["gap_recovered"] is None
    assert "no teacher stage" in results["gap_recovered_note"]
    assert results["gap_recovered_best"] is None


def test_gap_recovered_zero_denominator(tmp_path, monkeypatch):
    monkeypatch.setitem(RUN, "teacher", {0: (0.965, 0.97, None, 300.0)})
    run = tmp_path / "run"
    for stage, seeds in RUN.items():
        for seed in seeds:
            write_stage(run, stage, seed)
    results = collect(run)
    assert results["gap_recovered"] is None
    assert "same test error" in results["gap_recovered_note"]


def test_no_validation_split(tmp_path):
    run = tmp_path / "run"
    for stage, seeds in RUN.items():
        for seed in seeds:
            write_stage(run, stage, seed, best=False)
    results = write_report(run)
    assert all(stage["best"] is None for stage in results["stages"].values())
    assert results["gap_recovered"] == pytest.approx(0.7)
    assert results["gap_recovered_best"] is None
    assert "None: the run has no validation split." in (run / "results.md").read_text()


def test_write_report_files(run_dir):
    results = write_report(run_dir)
    assert results["report"]["notes"] == []
    assert set(results["report"]["files"]) == {
        "results.json",
        "results.md",
        "plots/curves.png",
        "plots/quality_vs_params.png",
    }
    on_disk = json.loads((run_dir / "results.json").read_text())
    assert on_disk == collect(run_dir)
    assert {**on_disk, "report": results["report"]} == results

    md = (run_dir / "results.md").read_text()
    assert md.startswith("# Results: mlp_from_mlp_mnist")
    assert "| teacher | 1 | 99.00 | 100 | 0.0500 | 1.00 | — | 2.00 M | 4.00 M |" in md
    assert "| baseline | 2 | 96.50 ± 0.71 | 350 ± 70.7 | 0.0500 | 1.00 | 96.50 |" in md
    assert "| distill | 2 | 98.25 ± 0.35 | 175 ± 35.4 |" in md
    # distill cost (latency of one sample, of a batch), train time
    assert "| 50.00 K | 100.00 K | 0.25 | 1.50 | 0.20 | 2m 05s |" in md
    assert "Gap recovered by distillation: 70.0 %" in md
    assert "measured on the test set once" in md
    assert "| distill | 2 | 2, 2 | 98.70 ± 0.71 | 98.50 ± 0.71 | 150 ± 70.7 |" in md
    assert "Gap recovered by distillation: 75.0 %" in md

    for name in ("curves.png", "quality_vs_params.png"):
        assert (run_dir / "plots" / name).read_bytes()[:8] == PNG_MAGIC
    assert not list(run_dir.rglob("*.tmp"))


def test_write_report_twice_is_identical(run_dir):
    write_report(run_dir)
    first = (run_dir / "results.json").read_bytes()
    first_md = (run_dir / "results.md").read_bytes()
    write_report(run_dir)  # the report's own files must not leak into the results
    assert (run_dir / "results.json").read_bytes() == first
    assert (run_dir / "results.md").read_bytes() == first_md


def test_plots_skipped_without_matplotlib(run_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    monkeypatch.setitem(sys.modules, "matplotlib.backends.backend_agg", None)
    report = write_report(run_dir)["report"]
    assert report["files"] == ["results.json", "results.md"]
    assert any("matplotlib is not installed" in note for note in report["notes"])
    assert (run_dir / "results.json").is_file()
    assert not (run_dir / "plots").exists()


def test_damaged_metrics_line_is_skipped_with_note(run_dir):
    with (run_dir / "distill" / "seed1" / "metrics.jsonl").open("a") as f:
        f.write('{"stage": "distill", "epo')  # cut short by a crash
    report = write_report(run_dir)["report"]
    assert "plots/curves.png" in report["files"]
    assert any("1 unreadable line" in note for note in report["notes"])


def test_missing_run_folder(tmp_path):
    with pytest.raises(RunDirError, match="No run folder") as info:
        write_report(tmp_path / "nope")
    assert "eval.json" in str(info.value)


def test_run_folder_without_eval_files(tmp_path):
    (tmp_path / "distill" / "seed0").mkdir(parents=True)
    with pytest.raises(RunDirError, match=r"seed<k>/eval\.json"):
        collect(tmp_path)


def test_damaged_eval_json(run_dir):
    (run_dir / "distill" / "seed1" / "eval.json").write_text('{"stage": ')
    with pytest.raises(RunDirError, match=r"distill/seed1/eval\.json"):
        collect(run_dir)


def test_eval_json_in_wrong_folder(run_dir):
    path = run_dir / "distill" / "seed1" / "eval.json"
    record = json.loads(path.read_text())
    record["seed"] = 0
    path.write_text(json.dumps(record))
    with pytest.raises(RunDirError, match="says stage='distill', seed=0"):
        collect(run_dir)


def test_print_table(run_dir):
    console = Console(record=True, width=300)
    print_table(write_report(run_dir), console)  # as the CLI does
    text = console.export_text()
    for expected in ("test accuracy %", "FLOPs/sample", "98.25 ± 0.35", "70.0 %", "75.0 %"):
        assert expected in text


def test_print_table_to_a_log_file_is_markdown(run_dir):
    """Not a terminal (a run under nohup, CI): rich would cut every cell of a 12-column
    table to 80 columns; the log gets the markdown rows, every value whole."""
    import io

    out = io.StringIO()
    print_table(write_report(run_dir), Console(file=out))  # a file: not a terminal
    lines = out.getvalue().splitlines()
    assert "| stage | seeds | test accuracy % |" in lines[1]
    assert any(line.startswith("| distill |") and "98.25 ± 0.35" in line for line in lines)
    assert not any("…" in line for line in lines)


def test_curves_from_trainer_lines(tmp_path):
    """The trainer writes one train line per epoch that carries val_accuracy."""
    run = tmp_path / "run"
    write_stage(run, "distill", 0)
    lines = [
        {"epoch": e, "step": 10 * e, "split": "train", "loss": 1 / e, "lr": 0.1,
         "seconds": e, "val_accuracy": 0.9 + e / 100, "val_nll": 0.3}
        for e in (1, 2)
    ]  # fmt: skip
    (run / "distill" / "seed0" / "metrics.jsonl").write_text(
        "".join(json.dumps(line) + "\n" for line in lines)
    )
    curves, skipped = _read_curves(run, collect(run))
    assert skipped == 0
    assert curves["distill seed0"]["val_accuracy"] == [(1, 0.91), (2, 0.92)]
    assert curves["distill seed0"]["train_loss"] == [(1, 1.0), (2, 0.5)]
    assert "plots/curves.png" in write_report(run)["report"]["files"]


def _lm_eval(run_dir: Path, stage: str, loss: float, bpc: float, tokens: int) -> None:
    folder = run_dir / stage / "seed0"
    folder.mkdir(parents=True)
    val = {"loss": loss, "perplexity": math.exp(loss), "bpc": bpc, "tokens": tokens}
    (folder / "eval.json").write_text(json.dumps({"stage": stage, "seed": 0, "val": val}))


def test_lm_gap_is_on_loss_per_token_with_one_tokenizer(tmp_path):
    from kdistill.tasks.causal_lm.report import collect_lm, gap_line

    for stage, loss in (("teacher", 1.0), ("baseline", 2.0), ("distill", 1.5)):
        _lm_eval(tmp_path, stage, loss, bpc=loss * 0.3, tokens=1000)
    results = collect_lm(tmp_path)
    assert results["gap_metric"] == "loss" and results["gap_recovered"] == pytest.approx(0.5)
    assert "from mean validation loss per token" in gap_line(results)


def test_lm_gap_is_on_bits_per_character_when_the_teacher_tokenizes_differently(tmp_path):
    """A pretrained teacher with its own tokenizer: its loss per token (here the lowest)
    is on another scale, so the gap is taken on bits per character."""
    from kdistill.tasks.causal_lm.report import collect_lm, gap_line

    _lm_eval(tmp_path, "teacher", loss=0.2, bpc=1.2, tokens=400)
    _lm_eval(tmp_path, "baseline", loss=2.0, bpc=2.0, tokens=1000)
    _lm_eval(tmp_path, "distill", loss=1.8, bpc=1.8, tokens=1000)
    results = collect_lm(tmp_path)
    assert results["gap_metric"] == "bpc"
    assert results["gap_recovered"] == pytest.approx(0.25)  # (2.0 - 1.8) / (2.0 - 1.2)
    assert "bits per character" in gap_line(results)
