"""Model zoo and user models.

A model is named by a zoo name (`mlp`, `resnet20`), by `package.module:factory`, or
by `path/to/file.py:factory` (a user's own file, relative to the working folder).
Zoo builders receive `input_shape` and `num_classes` from the data; a user factory
receives them too when its signature accepts them and the recipe does not set them.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from torch import nn

from kdistill.errors import ModelError, close_matches, suggest
from kdistill.models.cifar import (
    cnn_student,
    cnn_teacher,
    mobilenetv2,
    resnet8,
    resnet8x4,
    resnet14,
    resnet20,
    resnet32,
    resnet32x4,
    resnet44,
    resnet56,
    resnet110,
    shufflenetv2,
    vgg8,
    vgg13,
    wrn_16_2,
    wrn_40_2,
)
from kdistill.models.cnn import lenet5
from kdistill.models.mlp import mlp
from kdistill.recipe import ModelSpec
from kdistill.recipe.classification import standard_library_module

ZOO: dict[str, Callable[..., nn.Module]] = {
    "mlp": mlp,
    "lenet5": lenet5,
    # CIFAR-style models of the KD literature (RepDistiller / CRD), see models/cifar.py
    "resnet8": resnet8,
    "resnet14": resnet14,
    "resnet20": resnet20,
    "resnet32": resnet32,
    "resnet44": resnet44,
    "resnet56": resnet56,
    "resnet110": resnet110,
    "resnet8x4": resnet8x4,
    "resnet32x4": resnet32x4,
    "wrn_16_2": wrn_16_2,
    "wrn_40_2": wrn_40_2,
    "vgg8": vgg8,
    "vgg13": vgg13,
    "mobilenetv2": mobilenetv2,
    "shufflenetv2": shufflenetv2,
    "cnn_teacher": cnn_teacher,
    "cnn_student": cnn_student,
}


def _import_factory(name: str, where: str) -> Callable[..., nn.Module]:
    module_name, _, attr = name.rpartition(":")
    dotted = all(part.isidentifier() for part in module_name.split("."))
    if not module_name.endswith(".py") and not dotted:
        raise ModelError(
            f"{where}: model {name!r} names neither a Python file (path/to/file.py:factory) "
            "nor a module (package.module:factory); write one of those forms"
        )
    refused = standard_library_module(module_name)
    if refused:
        raise ModelError(f"{where}.name: {refused}")
    try:
        if module_name.endswith(".py"):
            module = _import_file(Path(module_name), where)
        else:
            module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ModelError(
            f"{where}: cannot import module {module_name!r} for model {name!r} ({exc}); "
            "make sure it is installed or on PYTHONPATH"
        ) from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        found = [n for n in dir(module) if not n.startswith("_")]
        hint = close_matches(attr, found, n=3)
        raise ModelError(
            f"{where}: module {module_name!r} has no callable {attr!r}"
            + (f"; close names: {', '.join(hint)}" if hint else "")
        )
    return factory


def _import_file(path: Path, where: str) -> Any:
    """Import a user's model file (`path/to/models.py:factory`), relative to the working folder."""
    if not path.is_file():
        raise ModelError(
            f"{where}: no model file {path} (resolved from {Path.cwd()}); "
            "give a path to an existing .py file, or package.module:factory"
        )
    module_name = f"kdistill_user_{path.stem}_{abs(hash(str(path.resolve())))}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    # the run's log says which file's code runs
    Console(stderr=True).log(f"{where}: importing model code from {path.resolve()}")
    spec = importlib.util.spec_from_file_location(module_name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[module_name]
        raise ModelError(f"{where}: importing {path} failed: {type(exc).__name__}: {exc}") from None
    return module


def build_model(
    spec: ModelSpec, *, input_shape: tuple[int, ...], num_classes: int, where: str = "model"
) -> nn.Module:
    """Build a model and check, with one dry forward pass, that it outputs num_classes logits."""
    if ":" in spec.name:
        factory = _import_factory(spec.name, where)
    elif spec.name in ZOO:
        factory = ZOO[spec.name]
    else:
        raise ModelError(
            f"{where}.name: unknown model {spec.name!r}{suggest(spec.name, ZOO)}"
            f"; the zoo has {', '.join(sorted(ZOO))}, or name your own as 'package.module:factory'"
        )
    params = inspect.signature(factory).parameters
    kwargs: dict[str, Any] = dict(spec.args)
    for key, value in (("input_shape", input_shape), ("num_classes", num_classes)):
        if key in params and key not in kwargs:
            kwargs[key] = value
    try:
        model = factory(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ModelError(
            f"{where}: cannot build {spec.name!r} with args {spec.args}: {exc}"
        ) from None
    except Exception as exc:
        if ":" not in spec.name:
            raise  # a zoo model failing is kdistill's bug: keep its traceback
        first = next(iter(str(exc).splitlines()), "")
        raise ModelError(
            f"{where}: your factory {spec.name!r} raised {type(exc).__name__}: {first}; "
            "run with --debug to see its traceback"
        ) from exc
    if not isinstance(model, nn.Module):
        raise ModelError(
            f"{where}: {spec.name!r} returned {type(model).__name__}, not a torch Module"
        )
    check_output(model, input_shape=input_shape, num_classes=num_classes, where=where)
    return model


def check_output(
    model: nn.Module, *, input_shape: tuple[int, ...], num_classes: int, where: str
) -> None:
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            out = model(torch.zeros(2, *input_shape))
    except Exception as exc:  # the user's model: any failure is reported with context
        raise ModelError(
            f"{where}: a dry forward pass on a batch of shape (2, {', '.join(map(str, input_shape))}) "
            f"failed: {type(exc).__name__}: {exc}"
        ) from None
    finally:
        model.train(was_training)
    if not isinstance(out, torch.Tensor) or out.shape != (2, num_classes):
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ModelError(
            f"{where}: the model outputs {shape} for a batch of 2, but the data has "
            f"{num_classes} classes, so it must output (2, {num_classes}); set the model's "
            "number of classes to match the data"
        )
