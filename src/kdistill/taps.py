"""Read intermediate features of a model by module path, without changing the model.

A tap names a module by its dotted path in `model.named_modules()` ("layer3.1",
"encoder.layer.5") and which tensor to read: the module's output (default) or its
input. Forward hooks capture the tensors; the model is never rewritten and its
`forward` never changed. What a tap reads (`TapSpec.index`):

    output  a tensor                  -> that tensor
            a tuple or list           -> its first tensor element (top level only)
            an object with a tensor
            `last_hidden_state`       -> last_hidden_state (Hugging Face ModelOutput)
            another mapping/dataclass -> its first tensor value
            index=k                   -> element k (of a mapping: of its non-None values,
                                         as `ModelOutput.to_tuple()[k]`)
            index="name"              -> that key or attribute
    input   index=None                -> the first tensor positional argument, else the
                                         first tensor keyword argument
            index=k                   -> positional argument k
            index="name"              -> the argument of that name (keyword or positional)

Paths are relative to the unwrapped model: a model wrapped by DistributedDataParallel,
DataParallel-style wrappers or torch.compile (any module whose only child is named
`module` or `_orig_mod`) is unwrapped first, and a leading "module." in a path is
accepted and dropped, so the same recipe works with and without the wrapper.
(DataParallel itself runs replicas in threads and is not supported: use DDP.)

A module that runs several times in one forward pass (a shared module, or one
activation module applied after every layer) has no single feature to distill:
reading it raises an error naming the path and how often it ran. A tensor that a
later in-place operation changes (`ReLU(inplace=True)`, `out += identity`) no longer
holds the captured value: reading it raises, unless the tap asks for `clone=True`.

Uniform layer maps pair student layer i (0-based) with teacher layer
round_half_up((i + 1) · L_t / L_s) − 1, so the last student layer reads the last
teacher layer: L_s=3, L_t=6 gives 0↔1, 1↔3, 2↔5 ("every other layer, ending at the
last", the DistilBERT/TinyBERT convention); L_s=4, L_t=12 gives 0↔2, 1↔5, 2↔8, 3↔11.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from kdistill.errors import RecipeError, close_matches

Which = Literal["output", "input"]
ProjectorKind = Literal["auto", "linear", "conv1x1", "mlp"]

INSPECT_HINT = "See every module name with `kdistill inspect MODEL` (or print(kdistill.taps.module_tree(model)))."
_WRAPPER_CHILDREN = ("module", "_orig_mod")
_KINDS = ("auto", "linear", "conv1x1", "mlp")


@dataclass(frozen=True)
class TapSpec:
    """One feature to read: the module at `path`, its "output" or "input", which tensor.

    `index` picks a tensor from a module that returns (or takes) several, see the
    module docstring; None takes the first. `clone=True` copies the tensor when it is
    captured, for a value that a later in-place operation would overwrite. Wherever a
    spec is expected, a string in `tap_key` form is accepted too ("fc:input").
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


# ---------------------------------------------------------------- paths


def unwrap(model: nn.Module) -> nn.Module:
    """The user's model inside DDP / torch.compile style wrappers (only child `module`)."""
    while True:
        children = list(model.named_children())
        if len(children) == 1 and children[0][0] in _WRAPPER_CHILDREN:
            model = children[0][1]
        else:
            return model


def _canonical(path: str, names: Mapping[str, nn.Module]) -> str:
    """`path` without wrapper prefixes ("module.", "_orig_mod.") the unwrapped model lacks."""
    while path not in names:
        head, _, rest = path.partition(".")
        if head not in _WRAPPER_CHILDREN or head in names:
            break
        path = rest
    return path


def _all_names(model: nn.Module) -> dict[str, nn.Module]:
    # Keep aliases (a module registered under two names) so either name resolves.
    return dict(model.named_modules(remove_duplicate=False))


def _is_container(module: nn.Module) -> bool:
    """A module without a forward of its own (ModuleList, ModuleDict): it never runs."""
    return type(module).forward is nn.Module.forward


def _closest(path: str, names: Sequence[str]) -> str:
    close = close_matches(path, names, n=5, cutoff=0.5)
    if close:
        return "Closest names: " + ", ".join(repr(n) for n in close) + "."
    top = [n for n in names if n and "." not in n][:12]
    return "Top-level modules: " + ", ".join(repr(n) for n in top) + "." if top else ""


def resolve_paths(model: nn.Module, paths: Sequence[str], where: str) -> list[str]:
    """Check that every path names a module that runs; return them without wrapper prefixes.

    Raises one RecipeError listing every path that does not exist (with the closest
    existing names) or names a container such as a ModuleList, which never runs.
    `where` says which part of the recipe the paths come from, e.g. "student".
    """
    inner = unwrap(model)
    names = _all_names(inner)
    resolved, errors = [], []
    for path in paths:
        canonical = _canonical(path, names)
        module = names.get(canonical)
        if module is None:
            errors.append(
                f"{where}: no module named {path!r} in {type(inner).__name__}. "
                f"{_closest(canonical, list(names))} {INSPECT_HINT}"
            )
        elif _is_container(module):
            example = next((n for n, _ in module.named_children()), "0")
            errors.append(
                f"{where}: {path!r} is a {type(module).__name__}, a container that never runs "
                f"itself, so it has no output to read. Tap one of its entries, e.g. "
                f"'{canonical}.{example}', or all of them with the pattern '{canonical}.*'."
            )
        else:
            resolved.append(canonical)
    if errors:
        raise RecipeError("\n".join(errors))
    return resolved


def expand_layers(model: nn.Module, pattern: str, *, where: str = "model") -> list[str]:
    """The names of the modules that `pattern` matches, in order.

    `*` stands for any characters except a dot and `{i}` for an integer:
    "encoder.layer.*" gives "encoder.layer.0", "encoder.layer.1", ... in the order the
    model registers them; "layer{i}" gives "layer1", "layer2", ..., "layer10" sorted
    by the integer. Containers (ModuleList, ModuleDict), which never run, are left out.
    A pattern without wildcards gives itself. A leading "module." is dropped as in
    `resolve_paths`. Raises RecipeError when nothing matches.
    """
    inner = unwrap(model)
    names = _all_names(inner)
    pattern = _canonical(pattern, names)
    if "*" not in pattern and "{i}" not in pattern:
        return resolve_paths(inner, [pattern], where)
    regex = re.escape(pattern).replace(r"\*", r"[^.]+").replace(r"\{i\}", r"(\d+)")
    matched = []
    for name, module in inner.named_modules():  # registration order, aliases once
        found = re.fullmatch(regex, name)
        if found and not _is_container(module):
            matched.append((tuple(int(g) for g in found.groups()), name))
    if not matched:
        example = pattern.replace("*", "0").replace("{i}", "0")
        raise RecipeError(
            f"{where}: the pattern {pattern!r} matches no module of {type(inner).__name__} "
            f"(`*` stands for any characters except a dot, `{{i}}` for an integer; containers such as ModuleList are left out). "
            f"{_closest(example, list(names))} {INSPECT_HINT}"
        )
    if "{i}" in pattern:
        matched.sort(key=lambda item: item[0])  # stable: ties keep registration order
    return [name for _, name in matched]


# ---------------------------------------------------------------- capture


class _NoTensor(Exception):
    pass


def _first_tensor(values: Iterator[Any]) -> Tensor:
    for value in values:
        if isinstance(value, Tensor):
            return value
    raise _NoTensor("it holds no tensor")


def _fields(value: Any) -> list[Any]:
    """The values of a mapping or dataclass, in order, None skipped."""
    if isinstance(value, Mapping):
        items = list(value.values())
    else:
        items = [getattr(value, f.name) for f in dataclasses.fields(value)]
    return [v for v in items if v is not None]


def _select_output(output: Any, index: int | str | None) -> Tensor:
    """The tensor a tap reads from a module's output (rules in the module docstring)."""
    if isinstance(output, Tensor):
        if index is not None:
            raise _NoTensor(f"the module returns a single tensor; drop index={index!r}")
        return output
    container = isinstance(output, Mapping) or dataclasses.is_dataclass(output)
    if isinstance(index, str):
        if isinstance(output, Mapping) and index in output:
            found = output[index]
        elif hasattr(output, index):
            found = getattr(output, index)
        else:
            raise _NoTensor(f"{type(output).__name__} has no field {index!r}")
    elif isinstance(index, int):
        items = _fields(output) if container else output
        if not isinstance(items, (tuple, list)):
            raise _NoTensor(f"{type(output).__name__} cannot be indexed by position")
        if not -len(items) <= index < len(items):
            raise _NoTensor(f"index {index} is out of range for {len(items)} items")
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
        raise _NoTensor(f"the module returns {type(output).__name__}, not a tensor")
    if not isinstance(found, Tensor):
        raise _NoTensor(f"item {index!r} is {type(found).__name__}, not a tensor")
    return found


def _select_input(
    module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], index: int | str | None
) -> Tensor:
    """The tensor a tap reads from a module's arguments (rules in the module docstring)."""
    if index is None:
        try:
            return _first_tensor(iter(args))
        except _NoTensor:
            return _first_tensor(iter(kwargs.values()))
    if isinstance(index, int):
        if not -len(args) <= index < len(args):
            raise _NoTensor(f"it was called with {len(args)} positional arguments")
        found = args[index]
    else:
        try:
            bound = inspect.signature(module.forward).bind(*args, **kwargs).arguments
        except (TypeError, ValueError):
            bound = kwargs
        if index not in bound:
            raise _NoTensor(f"it was called without an argument named {index!r}")
        found = bound[index]
    if not isinstance(found, Tensor):
        raise _NoTensor(f"argument {index!r} is {type(found).__name__}, not a tensor")
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
        self._names = _all_names(self._model)
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
        except _NoTensor as e:
            capture.problem = str(e)
            return
        if self.specs[key].clone:
            value = value.clone()
        capture.value = value
        capture.version = None if value.is_inference() else value._version

    def _output_hook(self, key: str, spec: TapSpec) -> Any:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            self._record(key, lambda: _select_output(output, spec.index))

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
            key = tap_key(_canonical(key.path, self._names), key.which, key.index)
        elif key not in self.specs:
            key = _canonical(key, self._names)
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


# ---------------------------------------------------------------- dry runs


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
    (by the rules of the module docstring). The pass runs under `torch.no_grad()` in the
    model's current train/eval mode, so branches taken only in training are seen, and
    buffers (BatchNorm running statistics) are restored afterwards. Raises RecipeError
    for a tap on a module that did not run, ran several times or returned no tensor.
    The batch is passed as in `call_model`.
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
                record.shape = tuple(_select_output(output, None).shape)
                if not isinstance(output, Tensor):
                    record.note = type(output).__name__
            except _NoTensor:
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
            if _is_container(module):
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


# ---------------------------------------------------------------- projectors


class FeatureProjector(nn.Module):
    """Brings a student feature and a teacher feature to one shape.

    forward(student_feature, teacher_feature) -> (student', teacher'): optional adaptive
    average pooling of the larger spatial map (either side), then a learned map of the
    student's feature dimension to the teacher's. Its parameters train with the student.
    """

    def __init__(
        self,
        projection: nn.Module | None,
        student_pool: nn.Module | None = None,
        teacher_pool: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.projection = projection
        self.student_pool = student_pool
        self.teacher_pool = teacher_pool

    def forward(self, student_feature: Tensor, teacher_feature: Tensor) -> tuple[Tensor, Tensor]:
        if self.student_pool is not None:
            student_feature = self.student_pool(student_feature)
        if self.teacher_pool is not None:
            teacher_feature = self.teacher_pool(teacher_feature)
        if self.projection is not None:
            student_feature = self.projection(student_feature)
        return student_feature, teacher_feature


def make_projector(
    student_shape: Sequence[int],
    teacher_shape: Sequence[int],
    *,
    kind: ProjectorKind = "auto",
    hidden: int | None = None,
    pool: Literal["adaptive"] | None = None,
    student_path: str = "student",
    teacher_path: str = "teacher",
) -> FeatureProjector | None:
    """A FeatureProjector from the student's feature shape to the teacher's, or None.

    Shapes include the batch dimension, which is ignored. Supported features:

        (B, D)        vectors         "linear": nn.Linear(D_s, D_t)
        (B, T, D)     token features  "linear" on the last dim; T must be equal
        (B, C, H, W)  feature maps    "conv1x1": nn.Conv2d(C_s, C_t, 1), a plain 1×1
                                      convolution with bias (the FitNets regressor;
                                      no BatchNorm/ReLU, which some CRD-era code adds)
        any of these                  "mlp": Linear/1×1 conv -> ReLU -> Linear/1×1 conv,
                                      with `hidden` units (default D_t or C_t)

    kind="auto" picks linear or conv1x1 by rank, and returns None when the shapes
    are already equal; an explicit kind always builds its map. Feature maps of
    different spatial sizes need pool="adaptive", which average-pools the larger map
    (student or teacher, per axis) to the smaller. Raises RecipeError, naming both
    paths and shapes, when no projector can bridge the two.
    """
    s, t = tuple(int(n) for n in student_shape), tuple(int(n) for n in teacher_shape)
    errors = []
    if kind not in _KINDS:
        errors.append(
            f"The 'kind' parameter of make_projector must be one of {', '.join(map(repr, _KINDS))}. "
            f"Got {kind!r} instead."
        )
    if hidden is not None and (
        isinstance(hidden, bool) or not isinstance(hidden, int) or hidden < 1
    ):
        errors.append(
            f"The 'hidden' parameter of make_projector must be a positive int or None. "
            f"Got {hidden!r} instead."
        )
    if pool not in (None, "adaptive"):
        errors.append(
            f"The 'pool' parameter of make_projector must be 'adaptive' or None. Got {pool!r} instead."
        )
    if errors:
        raise RecipeError("\n".join(errors))

    pair = f"student {student_path!r} {s} and teacher {teacher_path!r} {t}"
    rank = len(s)
    if rank != len(t):
        raise RecipeError(
            f"Cannot bridge {pair}: their ranks differ ({rank} vs {len(t)}). Tap layers of the "
            "same kind, or tap a module after pooling (e.g. the avgpool before the classifier) "
            "on the side that has a feature map."
        )
    if rank not in (2, 3, 4):
        if s[1:] == t[1:] and kind == "auto":
            return None
        raise RecipeError(
            f"Cannot bridge {pair}: projectors handle (B, D), (B, T, D) and (B, C, H, W) "
            f"features, not rank {rank}. Tap layers whose features have one of these shapes."
        )
    if rank == 3 and s[1] != t[1]:
        raise RecipeError(
            f"Cannot bridge {pair}: they have different token counts ({s[1]} vs {t[1]}); (B, T, D) "
            "features are matched position by position. Give both models the same tokens and "
            "sequence length, or tap pooled (B, D) features."
        )

    student_pool = teacher_pool = None
    if rank == 4 and s[2:] != t[2:]:
        if pool != "adaptive":
            raise RecipeError(
                f"Cannot bridge {pair}: their spatial sizes differ ({s[2]}×{s[3]} vs "
                f"{t[2]}×{t[3]}). Tap a teacher layer with a {s[2]}×{s[3]} map (or a student "
                "layer of the teacher's size), or set pool: adaptive to average-pool the "
                "larger map to the smaller."
            )
        size = (min(s[2], t[2]), min(s[3], t[3]))
        student_pool = nn.AdaptiveAvgPool2d(size) if s[2:] != size else None
        teacher_pool = nn.AdaptiveAvgPool2d(size) if t[2:] != size else None

    d_s, d_t = (s[1], t[1]) if rank == 4 else (s[-1], t[-1])
    if kind == "auto":
        if d_s == d_t:
            if student_pool is None and teacher_pool is None:
                return None
            return FeatureProjector(None, student_pool, teacher_pool)
        kind = "conv1x1" if rank == 4 else "linear"
    if kind == "conv1x1" and rank != 4:
        raise RecipeError(
            f"A conv1x1 projector needs (B, C, H, W) feature maps, but {pair} are rank {rank}; "
            "use kind: linear (or auto)."
        )
    if kind == "linear" and rank == 4:
        raise RecipeError(
            f"A linear projector reads (B, D) or (B, T, D) features, but {pair} are feature "
            "maps; use kind: conv1x1 (or auto)."
        )

    def layer(n_in: int, n_out: int) -> nn.Module:
        return nn.Conv2d(n_in, n_out, kernel_size=1) if rank == 4 else nn.Linear(n_in, n_out)

    if kind == "mlp":
        width = hidden or d_t
        projection: nn.Module = nn.Sequential(layer(d_s, width), nn.ReLU(), layer(width, d_t))
    else:
        projection = layer(d_s, d_t)
    return FeatureProjector(projection, student_pool, teacher_pool)


# ---------------------------------------------------------------- layer maps


def layer_map(
    student_layers: Sequence[str],
    teacher_layers: Sequence[str],
    mode: Literal["uniform"] | Sequence[tuple[int, int]] = "uniform",
    *,
    where: str = "layer map",
) -> list[tuple[str, str]]:
    """Pairs (student layer, teacher layer) to distill.

    mode="uniform": one pair per student layer, student layer i (0-based) with teacher
    layer round_half_up((i + 1) · L_t / L_s) − 1 (at least 0), so the last student layer
    reads the last teacher layer. L_s=3, L_t=6 -> (0,1), (1,3), (2,5); L_s=2, L_t=12 ->
    (0,5), (1,11); L_s=1, L_t=5 -> (0,4); equal depths pair layer i with layer i.

    mode=[(i, j), ...]: explicit pairs of 0-based indices into the two lists (negative
    indices count from the end, -1 is the last layer). Raises RecipeError for an index
    past the last layer of either model, naming how many layers each has.
    """
    n_s, n_t = len(student_layers), len(teacher_layers)
    if n_s == 0 or n_t == 0:
        raise RecipeError(
            f"{where}: a layer map needs layers on both sides; got {n_s} student and {n_t} "
            "teacher layers. Check the layer lists or patterns (e.g. 'encoder.layer.*')."
        )
    if isinstance(mode, str):
        if mode != "uniform":
            raise RecipeError(
                f"{where}: the 'mode' must be 'uniform' or a list of (student, teacher) index "
                f"pairs. Got {mode!r} instead."
            )
        # round_half_up(x) = floor(x + 1/2), in integers to avoid float ties.
        teacher_index = [max(1, ((i + 1) * 2 * n_t + n_s) // (2 * n_s)) - 1 for i in range(n_s)]
        return [(student_layers[i], teacher_layers[j]) for i, j in enumerate(teacher_index)]

    pairs, errors = [], []
    for pair in mode:
        if (
            not isinstance(pair, (tuple, list))
            or len(pair) != 2
            or not all(isinstance(n, int) and not isinstance(n, bool) for n in pair)
        ):
            errors.append(
                f"{where}: the pair {pair!r} must be two layer indices (student, teacher)."
            )
            continue
        i, j = pair
        bad = [
            f"{side} index {n} is past its last layer"
            for side, n, count in (("student", i, n_s), ("teacher", j, n_t))
            if not -count <= n < count
        ]
        if bad:
            errors.append(
                f"{where}: pair ({i}, {j}): {' and '.join(bad)}; the student has {n_s} layers "
                f"(0..{n_s - 1}) and the teacher {n_t} (0..{n_t - 1})."
            )
            continue
        pairs.append((student_layers[i], teacher_layers[j]))
    if not pairs and not errors:
        errors.append(f"{where}: the list of layer pairs is empty; give at least one pair.")
    if errors:
        raise RecipeError("\n".join(errors))
    return pairs
