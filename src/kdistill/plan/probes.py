"""The plan's measuring instruments, each independent of what it measures.

- `SavedTensors`: the bytes autograd saves for the backward pass (saved-tensor hooks,
  each storage counted once, weights left out), and a model of the backward walk;
- `LayerTensors`: the largest layer input + output that autograd does not save;
- `largest_layer`: the largest layer input + output of an inference pass (the teacher);
- `RecordedSignal`: the teacher signal's last output, what it hands the loss;
- `profiled_peak`: the true peak of CPU tensor memory over a run, from torch.profiler's
  allocation events (the `--measure` column, which shares nothing with the estimate).
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn


def profiled_peak(run: Callable[[], None]) -> int:
    """The largest sum of CPU tensor bytes allocated and not yet freed at any moment of
    `run()`, from torch.profiler's memory events in time order."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    profiler = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    # kineto writes a line at start and stop, the allocator a warning for each tensor
    # freed that was allocated before; the same steps just ran with their output shown
    with _quiet_stderr():
        profiler.start()
        try:
            run()
        finally:
            profiler.stop()
    results: Any = profiler.profiler.kineto_results  # type: ignore[union-attr]
    events: list[Any] = sorted(
        (
            event
            for event in results.events()
            if event.name() == "[memory]" and event.device_type() == DeviceType.CPU
        ),
        key=lambda event: event.start_ns(),
    )
    live = peak = 0
    for event in events:
        live += event.nbytes()
        peak = max(peak, live)
    return peak


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


class SavedTensors:
    """Bytes autograd keeps for the backward pass inside the `with` block: every tensor
    saved by an operation, counted once per storage, leaving out the storages of
    `exclude` (the weights, which exist anyway).

    `backward_bytes` models the backward pass, which walks the saved tensors in reverse:
    while it is at the i-th saved tensor (in forward order), the ones saved before it are
    still held and, when the tensor takes a gradient (an activation, not an input, a mask
    or indices), the gradients of that layer's output and input exist too, about two
    more of its size: max_i (s_1 + ... + s_i + 2 s_i [s_i takes a gradient]).

    `gradients_during(parameters)` around the backward call records where in that walk
    each parameter's gradient is first written (the smallest saved position unpacked so
    far when its gradient accumulates). `backward_with_gradients` then adds to each step
    of the walk only the gradients written by then: a word embedding's gradient, written
    last, is not counted next to the activations of the first layers' backward.
    """

    def __init__(self, exclude: list[nn.Module]) -> None:
        self.skip = weight_storages(exclude)
        # storage -> (bytes, whether a tensor on it takes a gradient), in the order saved
        self.storages: dict[int, tuple[int, bool]] = {}
        self.positions: dict[int, int] = {}  # storage -> its index in `storages`
        self.walk: float = float("inf")  # smallest saved position the backward has read
        self.gradients: list[tuple[float, int]] = []  # (walk position when written, bytes)
        self.counting = True  # False inside `paused()`
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    def _pack(self, tensor: Tensor) -> tuple[int | None, Tensor]:
        return (self.add(tensor) if self.counting else None), tensor

    def _unpack(self, packed: tuple[int | None, Tensor]) -> Tensor:
        position, tensor = packed
        if position is not None:
            self.walk = min(self.walk, position)
        return tensor

    def add(self, tensor: Any) -> int | None:
        """Count a tensor held outside autograd's saved set (a model's output); returns
        its storage's position in the saved order (None: not counted)."""
        if not isinstance(tensor, Tensor) or tensor.is_sparse or tensor.device.type == "meta":
            return None
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if not key or key in self.skip:
            return None
        _, grad = self.storages.get(key, (0, False))
        self.positions.setdefault(key, len(self.storages))
        self.storages[key] = (storage.nbytes(), grad or tensor.requires_grad)
        return self.positions[key]

    @property
    def bytes(self) -> int:
        return sum(size for size, _ in self.storages.values())

    @property
    def backward_bytes(self) -> int:
        return self._walk_peak(lambda position: 0)

    @property
    def backward_with_gradients(self) -> int:
        """`backward_bytes` plus, at each step of the walk, the parameter gradients
        written by then (needs `gradients_during` around the backward call)."""

        def gradients_at(position: int) -> int:
            return sum(size for where, size in self.gradients if where >= position)

        return max(self._walk_peak(gradients_at), gradients_at(0))

    def _walk_peak(self, gradients_at: Callable[[int], int]) -> int:
        held, peak = 0, 0
        for position, (size, grad) in enumerate(self.storages.values()):
            held += size
            peak = max(peak, held + (2 * size if grad else 0) + gradients_at(position))
        return peak

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Inside the block, what autograd saves is not counted, nor its place in the
        backward walk: a part of the step sized apart (a language model's chunked loss,
        which `lm_loss_memory` sizes)."""
        self.counting = False
        try:
            yield
        finally:
            self.counting = True

    @contextlib.contextmanager
    def gradients_during(self, parameters: Iterator[nn.Parameter]) -> Iterator[None]:
        """Record where each of `parameters` first gets its gradient in the backward
        pass run inside the block (the parameters start without gradients)."""
        seen: set[int] = set()

        def written(param: Tensor) -> None:
            if id(param) not in seen:
                seen.add(id(param))
                self.gradients.append((self.walk, param.numel() * param.element_size()))

        self.walk = float("inf")
        handles = [
            p.register_post_accumulate_grad_hook(written) for p in parameters if p.requires_grad
        ]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def __enter__(self) -> SavedTensors:
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._hooks.__exit__(*exc)


class LayerTensors:
    """The input and output tensors of every leaf module of `models` run inside the
    block, kept (so no storage is reused) to be compared with what autograd saved.

    `largest_unsaved(saved)`: the largest bytes of one layer's input + output that
    autograd did not save, i.e. what the forward pass holds beside the activations
    while that layer runs. Usually nothing: a linear layer's input is saved, its
    output saved by the next layer. An nn.LSTM's output is not saved (only its
    per-step pieces are), and it exists next to them until the layer returns."""

    def __init__(self, models: list[nn.Module]) -> None:
        self.models = models
        self.layers: list[tuple[Any, Any]] = []
        self.handles: list[Any] = []

    def __enter__(self) -> LayerTensors:
        self.handles = _hook_leaves(self.models, lambda m, a, o: self.layers.append((a, o)))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self.handles:
            handle.remove()

    def largest_unsaved(self, saved: SavedTensors) -> int:
        held = set(saved.storages) | saved.skip
        return max(
            (tensor_bytes((args, output), exclude=held) for args, output in self.layers),
            default=0,
        )

    def clear(self) -> None:
        self.layers.clear()


@contextlib.contextmanager
def largest_layer(models: list[nn.Module]) -> Iterator[list[int]]:
    """Yields a one-item list that ends up holding the largest input + output bytes of
    any leaf module of `models` run inside the block (an inference pass's working set)."""
    found = [0]

    def hook(module: nn.Module, args: Any, output: Any) -> None:
        found[0] = max(found[0], tensor_bytes(args) + tensor_bytes(output))

    handles = _hook_leaves(models, hook)
    try:
        yield found
    finally:
        for handle in handles:
            handle.remove()


def _hook_leaves(models: list[nn.Module], hook: Callable[..., None]) -> list[Any]:
    """A forward hook on every leaf module of `models`; returns the handles."""
    return [
        module.register_forward_hook(hook)
        for model in models
        for module in model.modules()
        if not list(module.children())
    ]


def tensor_bytes(value: Any, exclude: set[int] | None = None) -> int:
    """Bytes of the tensors in a tensor, tuple, list or mapping, each storage once."""
    seen: dict[int, int] = {}

    def visit(item: Any) -> None:
        if isinstance(item, Tensor):
            storage = item.untyped_storage()
            if exclude is None or storage.data_ptr() not in exclude:
                seen[storage.data_ptr()] = storage.nbytes()
        elif isinstance(item, Mapping):
            for inner in item.values():
                visit(inner)
        elif isinstance(item, (tuple, list)):
            for inner in item:
                visit(inner)

    visit(value)
    return sum(seen.values())


def weight_storages(models: list[nn.Module]) -> set[int]:
    return {
        tensor.untyped_storage().data_ptr()
        for model in models
        for tensor in [*model.parameters(), *model.buffers()]
    }


class RecordedSignal:
    """A teacher signal (a classifier's or a language model's) that keeps its last
    output: the bytes it hands the loss. Called as the signal is."""

    def __init__(self, signal: Any) -> None:
        self.signal, self.models = signal, getattr(signal, "models", {})
        self.last: Any = None

    def to(self, device: torch.device) -> RecordedSignal:
        self.signal.to(device)
        return self

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.last = self.signal(*args, **kwargs)
        return self.last
