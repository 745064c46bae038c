"""report.html: the markdown it renders, the page of a real run (self-contained, small,
the run's numbers), and that page opened in headless Chromium."""

from __future__ import annotations

import html
import json
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
from helpers import fails_cleanly, open_in_chromium, tiny_lm_recipe, tiny_recipe

import kdistill
from kdistill import api
from kdistill.cli import main
from kdistill.report_html import markdown_to_html


def test_markdown_tables_headings_and_inline_marks() -> None:
    text = "# Title\n\n## Part\n\n| a | b |\n|:---|---:|\n| 1 | **2** |\n\nSome `code` <b>.\n\n- one\n- two\n"
    page = markdown_to_html(text, skip_title=True)
    assert "Title" not in page and "<h3>Part</h3>" in page
    assert '<td style="text-align:right"><strong>2</strong></td>' in page
    assert '<th style="text-align:left">a</th>' in page
    assert "<code>code</code> &lt;b&gt;." in page  # escaped, never markup
    assert "<ul><li>one</li><li>two</li></ul>" in page


@pytest.fixture(scope="module")
def run(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("html") / "run"
    recipe = tiny_recipe(seeds=[0, 1], description="A <tiny> run & its report")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("KDISTILL_DATA", str(shared_data))
        kdistill.run(recipe, output_dir=folder, quiet=True)
    return folder


def test_a_run_writes_a_self_contained_page(run: Path) -> None:
    page = (run / "report.html").read_text(encoding="utf-8")
    assert len(page.encode()) < 2_000_000
    # two inline scripts: plotly.js (basic bundle) and the lines that draw the figures
    assert page.lower().count("<script") == 2 and "<script src" not in page.lower()
    assert page.count('class="plotly"') >= 6 and page.count("<noscript>") >= 6
    # no URL the browser would fetch: links within the page and inline data only
    markup = re.sub(r"<script>.*?</script>", "", page, flags=re.S)  # plotly.js's own text
    urls = set(re.findall(r"(?:src|href)=\"([^\"]+)\"", markup))
    assert not {u for u in urls if not u.startswith(("#", "data:image/png;base64,"))}
    results = json.loads((run / "results.json").read_text())
    distill = 100 * results["stages"]["distill"]["test"]["accuracy"]
    assert f"{distill:.2f}" in page  # the table holds the run's numbers
    assert "A &lt;tiny&gt; run &amp; its report" in page
    assert page.count("<svg") >= 6  # curves and the quality-against-cost plots
    status = json.loads((run / "run.json").read_text())
    assert status["environment"]["torch"] and f"<td>{status['environment']['torch']}</td>" in page


def test_report_command_rebuilds_the_page(run: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    (copy / "report.html").unlink()
    results = api.report(copy)
    assert "report.html" in results["report"]["files"]
    assert (copy / "report.html").read_text() == (run / "report.html").read_text().replace(
        str(run), str(copy)
    )


def test_the_page_renders_in_headless_chromium(run: Path, tmp_path: Path) -> None:
    page_path = (run / "report.html").resolve()
    results = json.loads((run / "results.json").read_text())
    distill = 100 * results["stages"]["distill"]["test"]["accuracy"]

    def check(page: Any) -> None:
        assert f"{distill:.2f}" in page.inner_text("table")
        sizes = page.eval_on_selector_all(
            "figure.plot svg.main-svg",  # plotly's drawing (its mode bar icons are small)
            "els => els.map(e => [e.getBoundingClientRect().width, e.getBoundingClientRect().height])",
        )
        assert len(sizes) >= 6 and all(w > 100 and h > 50 for w, h in sizes)
        # hovering a point of a curve shows its values
        point = page.locator("figure.plot .scatterlayer .point").first
        point.scroll_into_view_if_needed()
        point.hover(force=True)
        page.wait_for_selector(".hoverlayer .hovertext", timeout=5000)
        page.screenshot(path=str(tmp_path / "report.png"), full_page=True)

    errors, requests = open_in_chromium(page_path, check)
    assert errors == []
    assert requests == [page_path.as_uri()]  # the page itself, nothing else
    assert (tmp_path / "report.png").stat().st_size > 10_000


def test_classifier_details_are_measured_and_drawn(run: Path) -> None:
    evaluation = json.loads((run / "distill" / "seed0" / "eval.json").read_text())
    details = evaluation["test_details"]
    assert len(details["per_class_accuracy"]) == 10 and sum(details["per_class_support"]) == 1000
    matrix = details["confusion"]
    assert sum(map(sum, matrix)) == 1000
    assert sum(matrix[i][i] for i in range(10)) == 1000 - evaluation["test"]["errors"]
    assert sum(details["reliability"]["count"]) == 1000
    page = (run / "report.html").read_text()
    assert "Classes and calibration" in page and "confusion matrix of distill" in page
    assert "the distilled student&#x27;s accuracy minus the student alone&#x27;s" in page


def test_compare_puts_three_runs_on_one_page(
    run: Path, tmp_path: Path, shared_data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KDISTILL_DATA", str(shared_data))
    others = []
    for name, temperature in (("t1", 1.0), ("t8", 8.0)):
        recipe = tiny_recipe(stages=["teacher", "distill"])
        recipe["objective"][1]["temperature"] = temperature
        recipe["teacher"]["checkpoint"] = str(run / "teacher" / "seed0")
        kdistill.run(recipe, output_dir=tmp_path / name, quiet=True)
        others.append(tmp_path / name)
    output = tmp_path / "out" / "compare.html"
    assert main(["compare", str(run), *map(str, others), "--output", str(output)]) == 0
    page = output.read_text()
    for name in ("run", "t1", "t8"):
        assert f'<td style="text-align:left">{name}</td>' in page
    t8 = json.loads((tmp_path / "t8" / "results.json").read_text())
    assert f"{t8['stages']['distill']['test']['accuracy']:.4f}" in page
    assert "t8/distill" in page and "run/baseline" in page  # curves overlaid, one series each
    assert page.lower().count("<script") == 2 and "<script src" not in page.lower()


def test_compare_refuses_unfinished_folders(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "a").mkdir()
    fails_cleanly(
        capsys, ["compare", str(tmp_path / "a"), str(tmp_path / "b")], "no results.json in"
    )


def test_language_model_page_shows_samples_and_validation_quality(
    shared_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KDISTILL_DATA", str(shared_data))
    kdistill.run(tiny_lm_recipe(), output_dir=tmp_path / "lm", quiet=True)
    page = (tmp_path / "lm" / "report.html").read_text()
    assert "<h2>Samples</h2>" in page
    completion = json.loads((tmp_path / "lm" / "distill" / "seed0" / "eval.json").read_text())[
        "samples"
    ][0]["completion"]
    assert html.escape(completion) in page
    assert "validation loss against parameters" in page  # no test split: validation quality
    assert "loss_forward_kl" in page  # the divergence's own curve beside the cross-entropy
    # loss by position: measured once per stage, its ranges covering the sequence
    evaluation = json.loads((tmp_path / "lm" / "distill" / "seed0" / "eval.json").read_text())
    curve = evaluation["loss_by_position"]
    assert curve["positions"][0][0] == 1 and len(curve["positions"]) == len(curve["loss"])
    assert all(loss > 0 for loss in curve["loss"])
    assert "<h2>Loss by position</h2>" in page


def test_loss_by_position_agrees_with_the_validation_loss(shared_data: Path) -> None:
    """The token-weighted mean of the per-position losses is the validation loss."""
    import torch

    from kdistill.recipe import validate_recipe
    from kdistill.tasks.causal_lm.data import build_lm_data
    from kdistill.tasks.causal_lm.measure import loss_by_position, measure

    recipe = validate_recipe(tiny_lm_recipe())
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        data = build_lm_data(recipe.data, data_dir=shared_data, tokenizer_dir=Path(folder))
    torch.manual_seed(0)
    model = data.build_model(recipe.student.model, "student.model")
    curve = loss_by_position(model, data, batch_size=4, device="cpu", buckets=5)
    widths = [high - low + 1 for low, high in curve["positions"]]
    mean = sum(w * loss for w, loss in zip(widths, curve["loss"])) / sum(widths)
    assert mean == pytest.approx(measure(model, data, batch_size=8, device="cpu")["loss"], rel=1e-4)
