"""Deployable exports, shared by the tasks: ONNX files, their INT8 versions, ONNX
Runtime sessions, and latency measured side by side.

A task's `export` (the `export` entry of its row in `kdistill.tasks.TASKS`) builds the
module to export and the inputs to check it on; this module writes and times it:

    folder = claim_export_dir(path, overwrite=False)
    exporter = to_onnx(module, (example,), folder / "model.onnx", ...)
    quantize_int8(folder / "model.onnx", folder / "model.int8.onnx")
    session = OnnxModel(folder / "model.onnx", threads=1)

ONNX through `torch.onnx.export` with the dynamo exporter, and the TorchScript exporter
when the dynamo one fails (the export records which). INT8 is ONNX Runtime's
quantization (`quantize_int8`): dynamic (int8 weights, activations quantized per batch
at run time, no data) or static (activation ranges fixed on training batches). Which is
faster depends on the model: BENCHMARKS.md §9 measures both on every shipped student.
Needs the `export` extra: pip install 'kdistill[export]'.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import os
import platform
import re
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from kdistill.errors import ExportError
from kdistill.evaluate import Timing

OPSET = 18
MIN_AGREEMENT = 0.995  # float32 parity: top-1 (next-token) agreement with PyTorch
TIMING = Timing(repeats=20, singles=100)  # the latency table: 100 rows one at a time
BATCH = 64  # latency: rows timed at once
CALIBRATION = 512  # static INT8: training samples that set the activation ranges
EXTRA = "pip install 'kdistill[export]' (onnx, onnxruntime, onnxscript)"


def missing_onnx() -> list[str]:
    """The export packages that are not installed."""
    import importlib.util

    return [
        name
        for name in ("onnx", "onnxruntime", "onnxscript")
        if importlib.util.find_spec(name) is None
    ]


def require_onnx() -> None:
    """Refuse early, naming the extra, when the export packages are not installed."""
    missing = missing_onnx()
    if missing:
        raise ExportError(f"exporting needs {', '.join(missing)}, not installed here; {EXTRA}")


def claim_export_dir(path: Path, *, overwrite: bool) -> Path:
    """The export folder, new or emptied with `overwrite`; an existing one is refused."""
    if path.exists() and any(path.iterdir()):
        if not overwrite:
            raise ExportError(
                f"{path} already holds files; pass --overwrite to replace them, or --output "
                "to export elsewhere"
            )
        shutil.rmtree(path)
    path.mkdir(parents=True, exist_ok=True)
    return path


def to_onnx(
    module: nn.Module,
    args: tuple[Any, ...],
    path: Path,
    *,
    input_names: Sequence[str],
    dynamic: dict[str, dict[int, str]],
) -> str:
    """Write `module` as one self-contained ONNX file; returns the exporter used
    ("dynamo" or "torchscript"). `dynamic`: per input, its dynamic axes by name."""
    module = module.eval()
    failures = []
    try:
        # by position: torch.export matches dynamic shapes to forward's own argument names
        shapes = tuple(
            {axis: torch.export.Dim(label) for axis, label in dynamic.get(name, {}).items()}
            for name in input_names
        )
        with _quiet():
            torch.onnx.export(
                module,
                args,
                str(path),
                dynamo=True,
                input_names=list(input_names),
                output_names=["logits"],
                dynamic_shapes=shapes,
                opset_version=OPSET,
                external_data=False,
            )
        fixed = fixed_axes(path, dynamic)
        if not fixed:
            return "dynamo"
        # torch.export can specialise a dynamic axis without an error (a shape test in
        # forward, or state left by an earlier export in the process): the graph would
        # refuse every other length
        failures.append(f"dynamo exporter fixed {', '.join(fixed)}")
    except Exception as exc:  # any exporter failure: try the other exporter
        failures.append(f"dynamo exporter: {type(exc).__name__}: {_first_line(exc)}")
    try:
        with _quiet():
            torch.onnx.export(
                module,
                args,
                str(path),
                dynamo=False,
                input_names=list(input_names),
                output_names=["logits"],
                dynamic_axes={name: dict(axes) for name, axes in dynamic.items()},
                opset_version=OPSET,
            )
        fixed = fixed_axes(path, dynamic)
        if not fixed:
            return "torchscript"
        failures.append(f"TorchScript exporter fixed {', '.join(fixed)}")
    except Exception as exc:
        failures.append(f"TorchScript exporter: {type(exc).__name__}: {_first_line(exc)}")
    raise ExportError(
        f"the model cannot be exported to ONNX ({'; '.join(failures)}). Models whose forward "
        "branches on tensor values cannot be traced; make the branch a fixed setting, or "
        "export the module without it"
    )


def fixed_axes(path: Path, dynamic: dict[str, dict[int, str]]) -> list[str]:
    """The axes asked to be dynamic that the ONNX file at `path` fixed to a number, as
    "input_ids axis 1 (sequence) = 49"."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    dims = {value.name: value.type.tensor_type.shape.dim for value in graph.input}
    return [
        f"{name} axis {axis} ({label}) = {dims[name][axis].dim_value}"
        for name, axes in dynamic.items()
        for axis, label in axes.items()
        if name in dims and axis < len(dims[name]) and dims[name][axis].HasField("dim_value")
    ]


INT8_MODES = ("dynamic", "dynamic-per-channel", "static")


def quantize_int8(
    source: Path,
    target: Path,
    *,
    mode: str = "dynamic",
    calibration: Sequence[tuple[torch.Tensor, ...]] = (),
) -> None:
    """ONNX Runtime INT8 quantization of `source` into `target`.

    dynamic: int8 weights, one scale per tensor; activations quantized per batch at run
    time (no data). dynamic-per-channel: the same with one weight scale per output
    channel, which keeps the few large weights of a transformer's linear layers from
    coarsening the rounding of all the others.
    static: int8 weights per channel and activations with fixed ranges measured on the
    `calibration` batches (training data), in QDQ form; the graph is first prepared by
    ONNX Runtime's pre-processing (shape inference, fusions), as its docs advise.
    """
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    source, target = source.resolve(), target.resolve()  # the static path changes folder
    try:
        with _quiet():
            if mode in ("dynamic", "dynamic-per-channel"):
                quantize_dynamic(
                    str(source),
                    str(target),
                    weight_type=QuantType.QInt8,
                    per_channel=mode == "dynamic-per-channel",
                )
                return
            if not calibration:
                raise ExportError("static INT8 needs calibration batches; none were given")
            # ONNX Runtime's tools leave scratch files (uuid-named external data of a
            # failed shape inference) in the working folder: give them a folder to drop
            with tempfile.TemporaryDirectory() as scratch, _working_folder(Path(scratch)):
                prepared = Path(scratch) / "prepared.onnx"
                try:
                    quant_pre_process(str(source), str(prepared))
                except Exception:  # symbolic shape inference gives up on some graphs
                    quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
                quantize_static(
                    str(prepared),
                    str(target),
                    _Calibration(prepared, calibration),
                    quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QInt8,
                    weight_type=QuantType.QInt8,
                    per_channel=True,
                )
    except ExportError:
        raise
    except Exception as exc:  # ONNX Runtime's own failures carry no common type
        raise ExportError(
            f"ONNX Runtime cannot quantize {source.name} to INT8 ({mode}; "
            f"{type(exc).__name__}: {_first_line(exc)}); try --int8 "
            f"{'none' if mode == 'dynamic' else 'dynamic'}"
        ) from None


@contextlib.contextmanager
def _working_folder(folder: Path) -> Any:
    before = Path.cwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(before)


class _Calibration:
    """ONNX Runtime's CalibrationDataReader over batches of input tensors."""

    def __init__(self, model: Path, batches: Sequence[tuple[torch.Tensor, ...]]) -> None:
        import onnx

        names = [i.name for i in onnx.load(str(model), load_external_data=False).graph.input]
        self.feeds = iter([dict(zip(names, _as_numpy(b), strict=True)) for b in batches])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self.feeds, None)


class OnnxModel:
    """An ONNX Runtime session on the CPU with a fixed number of threads."""

    def __init__(self, path: Path, *, threads: int) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        self.session = ort.InferenceSession(
            str(path), sess_options=options, providers=["CPUExecutionProvider"]
        )
        self.names = [i.name for i in self.session.get_inputs()]

    def __call__(self, *inputs: np.ndarray) -> np.ndarray:
        return self.session.run(None, dict(zip(self.names, inputs, strict=True)))[0]


def timed(call: Callable[[], object], *, repeats: int) -> dict[str, float]:
    """Median, 10th and 90th percentile of `repeats` calls after TIMING.warmup untimed
    ones, in milliseconds."""
    for _ in range(TIMING.warmup):
        call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append((time.perf_counter() - start) * 1000)
    quantiles = statistics.quantiles(times, n=10) if len(times) > 1 else times * 9
    return {
        "median_ms": round(statistics.median(times), 4),
        "p10_ms": round(quantiles[0], 4),
        "p90_ms": round(quantiles[-1], 4),
    }


@contextlib.contextmanager
def torch_threads(threads: int) -> Any:
    """Run PyTorch on `threads` threads inside the block (as the ONNX sessions do)."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def latency_rows(
    engines: list[tuple[str, Any, bool]],
    singles: list[tuple[torch.Tensor, ...]],
    batch: tuple[torch.Tensor, ...],
    *,
    threads: int,
) -> list[dict[str, Any]]:
    """Each engine (name, callable, whether it takes tensors rather than NumPy arrays) on
    the same inputs: each of `singles` (one sample's input tensors) in turn, then
    `batch` at once; PyTorch on `threads` threads like the ONNX sessions."""
    rows = []
    with torch_threads(threads), torch.inference_mode():
        for name, engine, is_torch in engines:
            convert = _as_is if is_torch else _as_numpy
            feed = itertools.cycle([convert(s) for s in singles])
            whole = convert(batch)

            def one(engine: Any = engine, feed: Any = feed) -> None:
                engine(*next(feed))

            def all_at_once(engine: Any = engine, whole: Any = whole) -> None:
                engine(*whole)

            rows.append(
                {
                    "engine": name,
                    "batch_1": timed(one, repeats=len(singles)),
                    f"batch_{len(batch[0])}": timed(all_at_once, repeats=TIMING.repeats),
                }
            )
    return rows


def first_rows(x: torch.Tensor) -> tuple[list[tuple[torch.Tensor, ...]], tuple[torch.Tensor, ...]]:
    """`latency_rows`' inputs from one input tensor: its first `TIMING.singles` rows one
    at a time, and its first BATCH rows."""
    return [(x[i : i + 1],) for i in range(min(TIMING.singles, len(x)))], (x[:BATCH],)


def _as_is(inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    return inputs


def _as_numpy(inputs: tuple[torch.Tensor, ...]) -> tuple[np.ndarray, ...]:
    return tuple(t.numpy() for t in inputs)


def latency_markdown(record: dict[str, Any]) -> list[str]:
    """The latency table of an export's model card."""
    rows = record["latency"]
    batch_key = next(k for k in rows[0] if k.startswith("batch_") and k != "batch_1")
    lines = [
        "",
        f"## Latency on {record['threads']} thread(s), {record['versions']['machine']}",
        "",
        f"Median (10th–90th percentile) in ms, on the same inputs; "
        f"{batch_key.replace('_', ' ')}: that many rows per call.",
        "",
        f"| engine | batch 1 | {batch_key.replace('_', ' ')} |",
        "|---|---|---|",
    ]
    for row in rows:
        cells = [
            f"{row[k]['median_ms']:.3f} ({row[k]['p10_ms']:.3f}–{row[k]['p90_ms']:.3f})"
            for k in ("batch_1", batch_key)
        ]
        lines.append(f"| {row['engine']} | {cells[0]} | {cells[1]} |")
    return lines


def versions() -> dict[str, str]:
    import onnx
    import onnxruntime

    from kdistill import __version__

    return {
        "kdistill": __version__,
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
    }


def run_teacher(weights: Path) -> Path | None:
    """The weights of the teacher of the run a stage (<run>/<stage>/seed<k>) belongs to,
    for scale in a latency table; None when the stage is the teacher or there is none."""
    stage = weights.parent.parent
    found = sorted(stage.parent.glob("teacher/seed*/model.safetensors"))
    return None if stage.name == "teacher" or not found else found[0]


def check_parity(fp32: dict[str, Any], folder: Path, *, agreement: str) -> None:
    """Refuse an export whose float32 file does not compute what PyTorch does: its
    `agreement` (e.g. "top-1") below MIN_AGREEMENT or a logit beyond its tolerance."""
    if fp32["top1_agreement"] < MIN_AGREEMENT or fp32["max_abs_diff"] > fp32["tolerance"]:
        raise ExportError(
            f"the exported model does not compute what the PyTorch model does: {agreement} "
            f"agreement {fp32['top1_agreement']:.2%} (needs {MIN_AGREEMENT:.1%}), largest "
            f"logit difference {fp32['max_abs_diff']:.3g} (tolerance {fp32['tolerance']:.3g}). "
            f"The files are kept in {folder} for inspection; report it with export.json"
        )


def summary_line(record: dict[str, Any], *, agreement: str, int8_change: str) -> str:
    """The terminal's line for an export; `int8_change` says how the INT8 file's metric
    moved (given when there is one)."""
    fp32 = record["parity"]["fp32"]
    line = (
        f"exported with the {record['exporter']} exporter; FP32 {agreement} agreement "
        f"{fp32['top1_agreement']:.2%}, largest logit difference {fp32['max_abs_diff']:.2g}"
    )
    if "int8" in record["parity"]:
        int8 = record["parity"]["int8"]
        line += f"; INT8 agreement {int8['top1_agreement']:.2%}, {int8_change}"
    return line


def card_header(title: str, record: dict[str, Any]) -> list[str]:
    """A model card's title and provenance lines."""
    return [
        f"# {title}",
        "",
        f"From `{record['stage']}`, by kdistill {record['versions']['kdistill']} "
        f"({record['exporter']} exporter, opset {record['opset']}).",
        "",
    ]


def file_mb(path: Path) -> float:
    return round(path.stat().st_size / 1e6, 4)


@contextlib.contextmanager
def _quiet() -> Any:
    """The exporters print progress and warnings; the export reports what matters."""
    import logging
    import warnings

    sink = io.StringIO()
    loggers = [logging.root, logging.getLogger("torch")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
                yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def _first_line(exc: BaseException) -> str:
    """The line of an exporter's error that says what failed: torch.export's own summary
    when it has one (its first lines are advice), else the first line."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip()
    summary = text.partition("## Exception summary")[2].strip()
    return next(iter((summary or text).splitlines()), "")


def quantized_source(int8: Path) -> tuple[dict[str, Any], Path]:
    """For a quantize stage's INT8 file (<run>/quantize/seed<k>/export/model.int8.onnx):
    the stage's eval.json and the weights it was quantized from (<run>/<source>/seed<k>),
    which hold the tokenizer and inputs the file is measured with."""
    stage = int8.parent.parent
    recorded: dict[str, Any] = json.loads((stage / "eval.json").read_text(encoding="utf-8"))
    weights = stage.parent.parent / recorded["source"] / stage.name / "model.safetensors"
    if not weights.is_file():
        raise ExportError(
            f"{int8} was quantized from {weights}, which is not there any more: its inputs "
            "(tokenizer, data) come from that stage; measure the export folder's files directly"
        )
    return recorded, weights
