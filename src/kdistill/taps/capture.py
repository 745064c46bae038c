"""Taps: forward hooks that capture the tensors named by `TapSpec`s at each forward pass.

`TapSpec` names a feature (module path, "output" or "input", which tensor) and
`tap_key` the name its capture goes by; `Taps` holds the hooks and the captures of
the last forward pass. The tensor is picked from a module's output or arguments by
the rules of the `kdistill.taps` docstring.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from kdistill.errors import RecipeError
from kdistill.taps.paths import canonical_path, modules_by_name, resolve_paths, unwrap

Which = Literal["output", "input"]


@dataclass(frozen=True)
class TapSpec:
    """One feature to read: the module at `path`, its "output" or "input", which tensor.

    `index` picks a tensor from a module that returns (or takes) several, see the
    `kdistill.taps` docstring; None takes the first. `clone=True` copies the tensor
    when it is captured, for a value that a later in-place operation would overwrite.
    Wherever a spec is expected, a string in `tap_key` form is accepted too
    ("fc:input").
    """

    path: str
    which: Which = "output"
    index: int | str | None = None
    clone: bool = False

    def __post_init__(self) -> None:
        errors = []
        if not isinstance(self.path, str):
            errors.append(f"A tap's 'path' must be a string. Got {self.path!r} instead.")
        if self.which not in ("output", "input"):
            errors.append(
                f"The 'which' parameter of tap {self.path!r} must be one of 'output', 'input'. "
                f"Got {self.which!r} instead."
            )
        if self.index is not None and (
            isinstance(self.index, bool) or not isinstance(self.index, (int, str))
        ):
            errors.append(
                f"The 'index' parameter of tap {self.path!r} must be an int, a name or None. "
                f"Got {self.index!r} instead."
            )
        if errors:
            raise RecipeError("\n".join(errors))

    @classmethod
    def parse(cls, text: str) -> TapSpec:
        """The spec a `tap_key` string names: "layer3", "fc:input", "block:output[1]"."""
        found = _KEY.fullmatch(text)
        if found is None:
            raise RecipeError(
                f"Cannot read the tap {text!r}: write 'path', 'path:output', 'path:input', "
                "optionally followed by [index] or [name], e.g. 'encoder.layer.3:output[0]'."
            )
        name: str | None = found["index"]
        index = int(name) if name is not None and re.fullmatch(r"-?\d+", name) else name
        return cls(found["path"], found["which"] or "output", index)  # type: ignore[arg-type]


_KEY = re.compile(r"(?P<path>[^:\[\]]*)(?::(?P<which>output|input)(?:\[(?P<index>[^\]]+)\])?)?")


def _as_spec(spec: TapSpec | str) -> TapSpec:
    return spec if isinstance(spec, TapSpec) else TapSpec.parse(spec)


def tap_key(path: str, which: Which = "output", index: int | str | None = None) -> str:
    """The name a capture goes by in `Taps.values()`.

    "layer3" for a module's output, "layer3:input" for its input, "block:output[1]"
    or "attn:input[hidden_states]" when an index is given.
    """
    if which == "output" and index is None:
        return path
    return f"{path}:{which}" + ("" if index is None else f"[{index}]")


class NoTensor(Exception):
    """A module's output or arguments hold no tensor where a tap reads; the message says why."""


def _first_tensor(values: Iterator[Any]) -> Tensor:
    for value in values:
        if isinstance(value, Tensor):
            return value
    raise NoTensor("it holds no tensor")


def _fields(value: Any) -> list[Any]:
    """The values of a mapping or dataclass, in order, None skipped."""
    if isinstance(value, Mapping):
        items = list(value.values())
    else:
        items = [getattr(value, f.name) for f in dataclasses.fields(value)]
    return [v for v in items if v is not None]


def select_output(output: Any, index: int | str | None) -> Tensor:
    """The tensor a tap reads from a module's output (rules in the `kdistill.taps`
    docstring)."""
    if isinstance(output, Tensor):
        if index is not None:
            raise NoTensor(f"the module returns a single tensor; drop index={index!r}")
        return output
    container = isinstance(output, Mapping) or dataclasses.is_dataclass(output)
    if isinstance(index, str):
        if isinstance(output, Mapping) and index in output:
            found = output[index]
        elif hasattr(output, index):
            found = getattr(output, index)
        else:
            raise NoTensor(f"{type(output).__name__} has no field {index!r}")
    elif isinstance(index, int):
        items = _fields(output) if container else output
        if not isinstance(items, (tuple, list)):
            raise NoTensor(f"{type(output).__name__} cannot be indexed by position")
        if not -len(items) <= index < len(items):
            raise NoTensor(f"index {index} is out of range for {len(items)} items")
        found = items[index]
    else:
        hidden = output.get("last_hidden_state") if isinstance(output, Mapping) else None
        hidden = getattr(output, "last_hidden_state", hidden)
        if isinstance(hidden, Tensor):
            return hidden
        if container:
            return _first_tensor(iter(_fields(output)))
        if isinstance(output, (tuple, list)):
            return _first_tensor(iter(output))
        raise NoTensor(f"the module returns {type(output).__name__}, not a tensor")
    if not isinstance(found, Tensor):
        raise NoTensor(f"item {index!r} is {type(found).__name__}, not a tensor")
    return found


def _select_input(
    module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], index: int | str | None
) -> Tensor:
    """The tensor a tap reads from a module's arguments (rules in the `kdistill.taps`
    docstring)."""
    if index is None:
        try:
            return _first_tensor(iter(args))
        except NoTensor:
            return _first_tensor(iter(kwargs.values()))
    if isinstance(index, int):
        if not -len(args) <= index < len(args):
            raise NoTensor(f"it was called with {len(args)} positional arguments")
        found = args[index]
    else:
        try:
            bound = inspect.signature(module.forward).bind(*args, **kwargs).arguments
        except (TypeError, ValueError):
            bound = kwargs
        if index not in bound:
            raise NoTensor(f"it was called without an argument named {index!r}")
        found = bound[index]
    if not isinstance(found, Tensor):
        raise NoTensor(f"argument {index!r} is {type(found).__name__}, not a tensor")
    return found


@dataclass
class _Capture:
    calls: int = 0
    value: Tensor | None = None
    version: int | None = None  # the tensor's version counter when captured
    problem: str | None = None


class Taps:
    """Forward hooks that capture the tensors named by `specs` at each forward pass.

        taps = Taps(student, ["layer2", TapSpec("fc", which="input")], where="student")
        with taps:
            logits = student(x)
            features = taps.values()  # {"layer2": (B, C, H, W), "fc:input": (B, D)}

    Paths are checked when the Taps are built (RecipeError for a missing path).
    Captures are cleared each time the model itself is called, and by `clear()`;
    call `clear()` after computing the loss to free them early. The student's
    captures keep their autograd graph; a capture made under `torch.inference_mode()`
    (a live teacher) comes back from `values()` as an ordinary tensor (a copy), so it
    can enter the student's loss.
    """

    def __init__(
        self, model: nn.Module, specs: Sequence[TapSpec | str], *, where: str = "model"
    ) -> None:
        self.where = where
        self._model = unwrap(model)
        self._names = modules_by_name(self._model)
        given = [_as_spec(s) for s in specs]
        paths = resolve_paths(self._model, [s.path for s in given], where)
        self.specs: dict[str, TapSpec] = {}
        for spec, path in zip(given, paths):
            key = tap_key(path, spec.which, spec.index)
            if key in self.specs:
                raise RecipeError(f"{where}: the tap {key!r} is listed twice; list it once.")
            self.specs[key] = dataclasses.replace(spec, path=path)
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._captures: dict[str, _Capture] = {}
        self._forwards = 0
        self.clear()

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def attach(self) -> Taps:
        """Register the hooks (a no-op when already attached)."""
        if self.attached:
            return self
        self._handles.append(
            self._model.register_forward_pre_hook(self._on_model_call, prepend=True)
        )
        for key, spec in self.specs.items():
            module = self._names[spec.path]
            if spec.which == "output":
                handle = module.register_forward_hook(self._output_hook(key, spec))
            else:
                handle = module.register_forward_pre_hook(
                    self._input_hook(key, spec), with_kwargs=True
                )
            self._handles.append(handle)
        return self

    def remove(self) -> None:
        """Remove every hook and drop the captures; the model is as before `attach()`."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.clear()

    def __enter__(self) -> Taps:
        return self.attach()

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def clear(self) -> None:
        """Forget what the last forward pass captured."""
        self._captures = {key: _Capture() for key in self.specs}
        self._forwards = 0

    def _on_model_call(self, module: nn.Module, args: Any) -> None:
        self.clear()
        self._forwards = 1

    def _record(self, key: str, read: Any) -> None:
        capture = self._captures[key]
        capture.calls += 1
        if capture.calls > 1:  # keep the first; reading reports the repeat
            return
        try:
            value = read()
        except NoTensor as e:
            capture.problem = str(e)
            return
        if self.specs[key].clone:
            value = value.clone()
        capture.value = value
        capture.version = None if value.is_inference() else value._version

    def _output_hook(self, key: str, spec: TapSpec) -> Any:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            self._record(key, lambda: select_output(output, spec.index))

        return hook

    def _input_hook(self, key: str, spec: TapSpec) -> Any:
        def hook(module: nn.Module, args: Any, kwargs: dict[str, Any]) -> None:
            self._record(key, lambda: _select_input(module, args, kwargs, spec.index))

        return hook

    def _problem(self, key: str) -> str | None:
        spec, capture = self.specs[key], self._captures[key]
        module = self._names[spec.path]
        what = f"{self.where}: {spec.which} of {spec.path!r} ({type(module).__name__})"
        if capture.calls == 0:
            return (
                f"{what} was not captured: the module did not run in the forward pass. It is "
                "defined but unused by forward(), or only used in a branch not taken "
                "(train/eval mode, an optional input, a config flag). Tap a module that runs; "
                "`kdistill inspect MODEL` marks the modules that are not called."
            )
        if capture.calls > 1:
            return (
                f"{what}: the module ran {capture.calls} times in one forward pass, so it has "
                "no single feature to distill (a shared or reused module, e.g. one activation "
                "applied after every layer). Tap a module that runs once, such as the block "
                "around it, or give each use its own module. If you call parts of the model "
                "yourself several times per step, call taps.clear() between the calls."
            )
        if capture.problem is not None:
            return (
                f"{what}: cannot read a tensor: {capture.problem}. Set the tap's 'index' to "
                "the position or name of the tensor to read (see kdistill.taps)."
            )
        assert capture.value is not None
        if capture.version is not None and capture.value._version != capture.version:
            return (
                f"{what} was changed in place after it was captured (e.g. by ReLU(inplace=True) "
                "or `out += identity`), so it no longer holds the value to distill. Tap the "
                "module that makes the change, or set clone: true on this tap to copy the "
                "value when it is captured."
            )
        return None

    def __getitem__(self, key: str | TapSpec) -> Tensor:
        if isinstance(key, TapSpec):
            key = tap_key(canonical_path(key.path, self._names), key.which, key.index)
        elif key not in self.specs:
            key = canonical_path(key, self._names)
        if key not in self.specs:
            raise KeyError(f"no tap named {key!r}; the taps are {list(self.specs)}")
        problem = self._problem(key)
        if problem is not None:
            raise RecipeError(problem)
        return self._value(key)

    def _value(self, key: str) -> Tensor:
        capture = self._captures[key]
        assert capture.value is not None
        if capture.value.is_inference() and not torch.is_inference_mode_enabled():
            capture.value = capture.value.clone()  # an ordinary tensor, usable by autograd
            capture.version = capture.value._version
        return capture.value

    def values(self) -> dict[str, Tensor]:
        """Every capture of the last forward pass, by `tap_key`; one RecipeError lists problems."""
        if not self._forwards and not any(c.calls for c in self._captures.values()):
            raise RecipeError(
                f"{self.where}: no forward pass since the taps were attached or cleared; "
                "call the model before reading its taps."
            )
        problems = [p for p in map(self._problem, self.specs) if p is not None]
        if problems:
            raise RecipeError("\n".join(problems))
        return {key: self._value(key) for key in self.specs}
