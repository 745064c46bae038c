"""Quality and cost measurements of a trained classifier.

`predict` turns a model and raw inputs into logits, `quality` turns logits and
labels into accuracy, NLL, calibration and teacher agreement, and `cost` measures
what running the model costs: parameters, FLOPs, latency and size on disk. The
trainer calls these and writes the numbers to `eval.json`; the report only reads
that file.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_model
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from kdistill.errors import DataError


def predict(
    model: nn.Module,
    x: Any,
    *,
    to_input: Callable[[Any], Any],
    batch_size: int,
    device: str | torch.device,
    order: torch.Tensor | None = None,
) -> torch.Tensor:
    """Logits of `model` for every sample of `x`, as a float32 CPU tensor of shape (N, C).

    `order` (a permutation of range(N)) runs the samples in that order, for example
    texts sorted by length so each batch pads little; the logits come back in the
    order of `x` either way.

    `x` is anything with `len()` and slicing (a tensor, a NumPy array, a list);
    `to_input` maps one slice `x[i : i + batch_size]` to what the model takes: a
    tensor (called as `model(t)`) or a mapping (called as `model(**m)`). Tensors in
    it are moved to `device`; the model must already be there. Models whose
    output carries a `.logits` attribute (Hugging Face) are accepted.

    Runs in eval mode under `torch.inference_mode()` and restores the model's
    previous training mode afterwards.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer. Got {batch_size} instead.")
    device = torch.device(device)
    _check_model_device(model, device)
    n = len(x)
    was_training = model.training
    model.eval()
    chunks: list[torch.Tensor] = []
    try:
        with torch.inference_mode():
            for start in range(0, n, batch_size):
                rows = (
                    x[start : start + batch_size]
                    if order is None
                    else x[order[start : start + batch_size]]
                )
                inputs = _to_device(to_input(rows), device)
                out = model(**inputs) if isinstance(inputs, Mapping) else model(inputs)
                logits = out if isinstance(out, torch.Tensor) else out.logits
                if logits.ndim != 2:
                    raise ValueError(
                        "predict() expects (batch, classes) logits from the model. "
                        f"Got shape {tuple(logits.shape)} instead."
                    )
                chunks.append(logits.detach().float().cpu())
    finally:
        model.train(was_training)
    if not chunks:
        raise DataError(
            "predict() got 0 samples: the split being evaluated is empty. "
            "Give it samples (check data.limit_test and data.val_fraction) or skip it."
        )
    logits = torch.cat(chunks)  # (N, C), in `order`
    if order is None:
        return logits
    restored = torch.empty_like(logits)
    restored[order] = logits
    return restored


def quality(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    teacher_logits: torch.Tensor | None = None,
    n_bins: int = 15,
) -> dict[str, float]:
    """Classification quality of `logits` (N, C) against integer `labels` (N,).

    Returns
      accuracy   fraction of top-1 predictions equal to the label, in [0, 1]
      errors     number of wrong top-1 predictions (an int)
      nll        mean negative log-likelihood of the label, in nats
      ece        expected calibration error (Guo et al. 2017, "On Calibration of
                 Modern Neural Networks"): confidence = max softmax probability,
                 split into `n_bins` equal-width bins (lo, hi] over [0, 1];
                 ECE = sum_b |B_b| / N * |accuracy(B_b) - mean confidence(B_b)|
      agreement  fraction of samples whose top-1 class equals the teacher's top-1
                 class; only when `teacher_logits` (N, C) is given

    Computed in float64 so that the numbers do not depend on the logits' dtype.
    """
    if logits.ndim != 2:
        raise ValueError(f"logits must have shape (N, C). Got {tuple(logits.shape)} instead.")
    if labels.ndim != 1 or labels.shape[0] != logits.shape[0]:
        raise ValueError(
            f"labels must have shape (N,) = ({logits.shape[0]},) to match logits "
            f"{tuple(logits.shape)}. Got {tuple(labels.shape)} instead."
        )
    if n_bins < 1:
        raise ValueError(f"n_bins must be a positive integer. Got {n_bins} instead.")
    n, num_classes = logits.shape
    if n == 0:
        raise DataError(
            "Cannot measure quality on 0 samples: the split being evaluated is empty. "
            "Give it samples (check data.limit_test and data.val_fraction) or skip it."
        )
    labels = labels.detach().cpu().long()
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(
            f"labels must lie in [0, {num_classes}) for {num_classes} classes. "
            f"Got values from {int(labels.min())} to {int(labels.max())} instead."
        )

    log_probs = torch.log_softmax(logits.detach().cpu().double(), dim=1)  # (N, C)
    confidence, predicted = log_probs.max(dim=1)  # (N,), (N,)
    confidence = confidence.exp()
    correct = predicted == labels  # (N,)
    nll = -log_probs.gather(1, labels[:, None]).squeeze(1).mean()

    correct_sum, confidence_sum, _ = _calibration_bins(confidence, correct, n_bins)
    ece = (correct_sum - confidence_sum).abs().sum() / n  # sum_b |B_b|/N * |acc_b - conf_b|

    result: dict[str, float] = {
        "accuracy": correct.double().mean().item(),
        "errors": int(n - int(correct.sum())),
        "nll": nll.item(),
        "ece": ece.item(),
    }
    if teacher_logits is not None:
        if teacher_logits.shape != logits.shape:
            raise ValueError(
                f"teacher_logits must have the student's shape {tuple(logits.shape)}. "
                f"Got {tuple(teacher_logits.shape)} instead."
            )
        teacher_top1 = teacher_logits.detach().cpu().argmax(dim=1)
        result["agreement"] = (teacher_top1 == predicted).double().mean().item()
    return result


def _calibration_bins(
    confidence: torch.Tensor, correct: torch.Tensor, n_bins: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per bin: the sums of correctness and of confidence, and the count. Bin b holds
    confidences in (b / n_bins, (b + 1) / n_bins]; the first bin also holds 0."""
    bins = (torch.ceil(confidence * n_bins).long() - 1).clamp(0, n_bins - 1)  # (N,)
    correct_sum = torch.bincount(bins, weights=correct.double(), minlength=n_bins)
    confidence_sum = torch.bincount(bins, weights=confidence, minlength=n_bins)
    return correct_sum, confidence_sum, torch.bincount(bins, minlength=n_bins)


@dataclass(frozen=True)
class Timing:
    """How many forward passes a latency number is the median of. The test suite
    lowers them (tests/conftest.py): it checks what is measured, not how fast."""

    repeats: int = 20  # passes of a whole batch
    singles: int = 64  # samples timed one at a time, for the latency per sample
    warmup: int = 3  # untimed passes first


TIMING = Timing()  # a run's cost columns (kdistill.export has its own, for its table)

MAX_CONFUSION_CLASSES = 50  # a larger confusion matrix is not written (C² numbers)


def details(logits: torch.Tensor, labels: torch.Tensor, *, n_bins: int = 15) -> dict[str, Any]:
    """What the report draws beyond `quality`: per-class accuracy and support, the
    confusion matrix (rows: true class, columns: predicted; up to
    MAX_CONFUSION_CLASSES classes) and the reliability diagram's bins (mean confidence,
    accuracy and count per bin, as `quality`'s ECE bins them). Lists, for eval.json."""
    labels = labels.detach().cpu().long()
    probs = torch.softmax(logits.detach().cpu().double(), dim=1)
    confidence, predicted = probs.max(dim=1)
    correct = predicted == labels
    num_classes = logits.shape[1]
    support = torch.bincount(labels, minlength=num_classes)
    hits = torch.bincount(labels, weights=correct.double(), minlength=num_classes)
    correct_sum, confidence_sum, count = _calibration_bins(confidence, correct, n_bins)
    shown = count.clamp(min=1).double()
    out: dict[str, Any] = {
        "per_class_accuracy": (hits / support.clamp(min=1)).tolist(),
        "per_class_support": support.tolist(),
        "reliability": {
            "confidence": (confidence_sum / shown).tolist(),
            "accuracy": (correct_sum / shown).tolist(),
            "count": count.tolist(),
        },
    }
    if num_classes <= MAX_CONFUSION_CLASSES:
        pairs = labels * num_classes + predicted
        matrix = torch.bincount(pairs, minlength=num_classes * num_classes)
        out["confusion"] = matrix.view(num_classes, num_classes).tolist()
    return out


def cost(
    model: nn.Module,
    *,
    input_shape: Sequence[int] | None = None,
    device: str | torch.device,
    batch_size: int = 256,
    repeats: int | None = None,
    warmup: int | None = None,
    example_input: torch.Tensor | Mapping[str, torch.Tensor] | None = None,
    single: int = 0,
) -> dict[str, Any]:
    """What running `model` costs, measured on `device` (the model must already be there).

    The input is a float32 random batch of shape (batch_size, *input_shape), cast
    to the model's floating dtype when that is not float32 (a bf16 teacher), or
    `example_input` when given (integer token ids, say): its first dimension is
    then the batch size and `input_shape` may be left out.

    Returns
      params                 number of parameters, trainable or not (shared ones once)
      flops                  FLOPs per sample of one forward pass, as counted by
                             `torch.utils.flop_counter.FlopCounterMode` (a multiply-add
                             is 2 FLOPs; element-wise ops are not counted), divided by
                             the batch size
      latency_ms             median wall time of one forward pass of the batch over
                             `repeats` passes after `warmup` untimed ones (default:
                             TIMING's)
      latency_ms_per_sample  latency_ms / batch_size
      latency_ms_single      with `single` > 0: the median wall time of one forward pass
                             of one sample (batch 1), over the batch's first `single`
                             samples, each once, after `warmup` untimed passes; a text
                             sample cut to its attention mask (no padding). None otherwise
      batch_size             the batch size used
      size_bytes             size of the weights saved as a safetensors file
      device                 the device, as a string
      threads                torch.get_num_threads() at measurement time
    """
    repeats = TIMING.repeats if repeats is None else repeats
    warmup = TIMING.warmup if warmup is None else warmup
    if repeats < 1 or warmup < 0:
        raise ValueError(
            f"repeats must be >= 1 and warmup >= 0. Got repeats={repeats}, warmup={warmup}."
        )
    device = torch.device(device)
    _check_model_device(model, device)
    inputs: torch.Tensor | dict[str, torch.Tensor]
    if example_input is not None:
        if (
            input_shape is not None
            and isinstance(example_input, torch.Tensor)
            and tuple(input_shape) != tuple(example_input.shape[1:])
        ):
            raise ValueError(
                f"input_shape {tuple(input_shape)} does not match example_input "
                f"{tuple(example_input.shape)} without its batch dimension; give only one."
            )
        if isinstance(example_input, Mapping):
            inputs = {k: v.to(device) for k, v in example_input.items()}
            batch_size = next(iter(inputs.values())).shape[0]
        else:
            inputs = example_input.to(device)
            batch_size = inputs.shape[0]
    elif input_shape is not None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer. Got {batch_size} instead.")
        # A private generator keeps the global RNG, and so training, untouched.
        generator = torch.Generator().manual_seed(0)
        inputs = torch.randn((batch_size, *input_shape), generator=generator)
        inputs = inputs.to(device=device, dtype=_floating_dtype(model))
    else:
        raise ValueError("cost() needs input_shape or example_input; got neither.")

    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            flop_counter = FlopCounterMode(display=False)
            run = _forward(model, inputs)
            with flop_counter:
                run()
            latency_ms = _median_ms([run] * repeats, warmup, device)
            n = min(single, batch_size)
            single_ms = (
                _median_ms([_forward(model, _one(inputs, i)) for i in range(n)], warmup, device)
                if n > 0
                else None
            )
    finally:
        model.train(was_training)

    return {
        "params": sum(p.numel() for p in model.parameters()),
        "flops": round(flop_counter.get_total_flops() / batch_size),
        "latency_ms": latency_ms,
        "latency_ms_per_sample": latency_ms / batch_size,
        "latency_ms_single": single_ms,
        "batch_size": batch_size,
        "size_bytes": _safetensors_size(model),
        "device": str(device),
        "threads": torch.get_num_threads(),
    }


def latency_of_requests(
    model: nn.Module,
    requests: Sequence[torch.Tensor | Mapping[str, torch.Tensor]],
    *,
    device: str | torch.device,
    warmup: int | None = None,
) -> float:
    """Median wall time in ms of one forward pass per request, each request once after
    `warmup` untimed passes of the first (default: TIMING's). A request is the whole
    input one served query needs, as one batch: a question's windows, say."""
    if not requests:
        raise ValueError("latency_of_requests() needs at least one request; got none.")
    device = torch.device(device)
    _check_model_device(model, device)
    warmup = TIMING.warmup if warmup is None else warmup
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            calls = [_forward(model, _to_device(r, device)) for r in requests]
            return _median_ms(calls, warmup, device)
    finally:
        model.train(was_training)


def _forward(
    model: nn.Module, inputs: torch.Tensor | Mapping[str, torch.Tensor]
) -> Callable[[], Any]:
    return (lambda: model(**inputs)) if isinstance(inputs, Mapping) else (lambda: model(inputs))


def _one(
    inputs: torch.Tensor | Mapping[str, torch.Tensor], i: int
) -> torch.Tensor | dict[str, torch.Tensor]:
    """Sample i of a batch, as a batch of 1; a text cut to its attention mask."""
    if not isinstance(inputs, Mapping):
        return inputs[i : i + 1]
    row = {k: v[i : i + 1] for k, v in inputs.items()}
    mask = row.get("attention_mask")
    if mask is not None and mask.dim() == 2:
        length = max(int(mask.sum()), 1)
        row = {k: v[:, :length] if v.dim() == 2 else v for k, v in row.items()}
    return row


def _median_ms(calls: list[Callable[[], Any]], warmup: int, device: torch.device) -> float:
    """Median wall time in ms of each of `calls`, run once in order after `warmup`
    untimed runs of the first."""
    for _ in range(warmup):
        calls[0]()
    _synchronize(device)
    times = []
    for call in calls:
        start = time.perf_counter()
        call()
        _synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000.0


def _safetensors_size(model: nn.Module) -> int:
    # save_model drops the duplicate names of tied weights, as checkpoints do.
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "model.safetensors"
        save_model(model, str(path))
        return path.stat().st_size


def _floating_dtype(model: nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def _check_model_device(model: nn.Module, device: torch.device) -> None:
    for p in model.parameters():
        # CPU tensors carry no index, while Accelerate names the CPU "cpu:0": same device.
        index_differs = device.type != "cpu" and device.index is not None
        if p.device.type != device.type or (index_differs and p.device.index != device.index):
            raise ValueError(
                f"The model's parameters are on {p.device}, but measurement was asked on "
                f"{device}. Move the model first: model.to({str(device)!r})."
            )
        return


def _to_device(inputs: Any, device: torch.device) -> Any:
    if isinstance(inputs, torch.Tensor):
        return inputs.to(device)
    if isinstance(inputs, Mapping):
        return {k: _to_device(v, device) for k, v in inputs.items()}
    if isinstance(inputs, (tuple, list)):
        return type(inputs)(_to_device(v, device) for v in inputs)
    return inputs


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()
