"""Module paths: the model inside its wrappers (`unwrap`), paths checked against the
modules that run (`resolve_paths`), and patterns such as "encoder.layer.*" or
"layer{i}" expanded to paths (`expand_layers`). Wrapper prefixes ("module.",
"_orig_mod.") are dropped, as the `kdistill.taps` docstring describes."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from torch import nn

from kdistill.errors import RecipeError, close_matches

INSPECT_HINT = "See every module name with `kdistill inspect MODEL` (or print(kdistill.taps.module_tree(model)))."
_WRAPPER_CHILDREN = ("module", "_orig_mod")


def unwrap(model: nn.Module) -> nn.Module:
    """The user's model inside DDP / torch.compile style wrappers (only child `module`)."""
    while True:
        children = list(model.named_children())
        if len(children) == 1 and children[0][0] in _WRAPPER_CHILDREN:
            model = children[0][1]
        else:
            return model


def canonical_path(path: str, names: Mapping[str, nn.Module]) -> str:
    """`path` without wrapper prefixes ("module.", "_orig_mod.") the unwrapped model lacks."""
    while path not in names:
        head, _, rest = path.partition(".")
        if head not in _WRAPPER_CHILDREN or head in names:
            break
        path = rest
    return path


def modules_by_name(model: nn.Module) -> dict[str, nn.Module]:
    """Every module of `model` by its dotted path, "" for the model itself."""
    # Keep aliases (a module registered under two names) so either name resolves.
    return dict(model.named_modules(remove_duplicate=False))


def is_container(module: nn.Module) -> bool:
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
    names = modules_by_name(inner)
    resolved, errors = [], []
    for path in paths:
        canonical = canonical_path(path, names)
        module = names.get(canonical)
        if module is None:
            errors.append(
                f"{where}: no module named {path!r} in {type(inner).__name__}. "
                f"{_closest(canonical, list(names))} {INSPECT_HINT}"
            )
        elif is_container(module):
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
    names = modules_by_name(inner)
    pattern = canonical_path(pattern, names)
    if "*" not in pattern and "{i}" not in pattern:
        return resolve_paths(inner, [pattern], where)
    regex = re.escape(pattern).replace(r"\*", r"[^.]+").replace(r"\{i\}", r"(\d+)")
    matched = []
    for name, module in inner.named_modules():  # registration order, aliases once
        found = re.fullmatch(regex, name)
        if found and not is_container(module):
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
