"""One dry forward pass to see what a model computes: the shapes of its taps
(`dry_run`, before the projectors are built) and a table of every module with its
output shape (`module_tree`, for `kdistill inspect`). Buffers such as BatchNorm's
running statistics are restored afterwards."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from kdistill.taps.capture import NoTensor, Taps, TapSpec, select_output
from kdistill.taps.paths import is_container, unwrap


def call_model(model: nn.Module, batch: Any) -> Any:
    """model(**batch) for a mapping, model(*batch) for a tuple or list, else model(batch)."""
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


@contextlib.contextmanager
def _buffers_kept(model: nn.Module) -> Iterator[None]:
    """Restore every buffer (BatchNorm running statistics) after the block."""
    saved = [(b, b.detach().clone()) for b in model.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in saved:
                buffer.copy_(value)


def dry_run(
    model: nn.Module,
    sample_batch: Any,
    specs: Sequence[TapSpec | str] | None = None,
    *,
    where: str = "model",
) -> dict[str, tuple[int, ...]]:
    """Shapes of the tapped tensors after one forward pass on `sample_batch`, by `tap_key`.

    Without `specs`, the output shape of every module that ran and returned a tensor
    (by the rules of the `kdistill.taps` docstring). The pass runs under
    `torch.no_grad()` in the model's current train/eval mode, so branches taken only in
    training are seen, and buffers (BatchNorm running statistics) are restored
    afterwards. Raises RecipeError for a tap on a module that did not run, ran several
    times or returned no tensor. The batch is passed as in `call_model`.
    """
    if specs is None:
        return {
            path: seen.shape
            for path, seen in _trace(model, sample_batch).items()
            if seen.shape is not None
        }
    taps = Taps(model, specs, where=where)
    with taps, torch.no_grad(), _buffers_kept(model):
        call_model(model, sample_batch)
        found = taps.values()
    return {key: tuple(value.shape) for key, value in found.items()}


@dataclass
class _Seen:
    calls: int = 0
    shape: tuple[int, ...] | None = None
    note: str = ""  # the container type the shape was read from, or why there is no shape


def _trace(model: nn.Module, batch: Any) -> dict[str, _Seen]:
    """One no-grad forward pass recording how often each module ran and its output shape."""
    inner = unwrap(model)
    seen = {path: _Seen() for path in dict(inner.named_modules())}

    def hook_for(path: str) -> Any:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            record = seen[path]
            record.calls += 1
            if record.calls > 1:
                return
            try:
                record.shape = tuple(select_output(output, None).shape)
                if not isinstance(output, Tensor):
                    record.note = type(output).__name__
            except NoTensor:
                record.note = f"{type(output).__name__}, no tensor"

        return hook

    handles = [m.register_forward_hook(hook_for(p)) for p, m in inner.named_modules()]
    try:
        with torch.no_grad(), _buffers_kept(inner):
            call_model(model, batch)
    finally:
        for handle in handles:
            handle.remove()
    return seen


def module_tree(model: nn.Module, sample_batch: Any = None, *, max_depth: int | None = None) -> str:
    """A table of the model's modules: dotted path (indented by depth), class, parameters,
    and, given a sample batch, the output shape from one dry forward pass.

    Modules that did not run are marked "not called", containers (ModuleList) "container",
    modules that ran n > 1 times "×n". Parameter counts include submodules. Modules
    deeper than `max_depth` (the root has depth 0) are left out and counted.
    """
    inner = unwrap(model)
    seen = _trace(model, sample_batch) if sample_batch is not None else None
    rows, hidden = [], 0
    for path, module in inner.named_modules():
        depth = 0 if not path else path.count(".") + 1
        if max_depth is not None and depth > max_depth:
            hidden += 1
            continue
        params = sum(p.numel() for p in module.parameters())
        row = ["  " * depth + (path or "(model)"), type(module).__name__, f"{params:,}"]
        if seen is not None:
            record = seen[path]
            if is_container(module):
                out = "container"
            elif record.calls == 0:
                out = "not called"
            else:
                out = str(record.shape) if record.shape is not None else ""
                out += f" ({record.note})" if record.note else ""
                out += f" ×{record.calls}" if record.calls > 1 else ""
            row.append(out)
        rows.append(row)
    header = ["module", "class", "params"] + (["output"] if seen is not None else [])
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = []
    for row in [header, *rows]:
        cells = [
            cell.rjust(width) if i == 2 else cell.ljust(width)
            for i, (cell, width) in enumerate(zip(row, widths))
        ]
        lines.append("  ".join(cells).rstrip())
    if hidden:
        lines.append(f"... {hidden} deeper modules not shown (max_depth={max_depth})")
    return "\n".join(lines)
