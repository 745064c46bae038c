"""Reading a recipe: YAML (with `safe_load`), `--set key=value` overrides, and one
validation against the union of the tasks' schemas, chosen by the recipe's `task`
(classification when it has none).

Every problem is collected and raised once as a `RecipeError` that lists each with its
YAML path, the bad value, what is allowed and a "did you mean" for misspelt keys.
`teacher.train` lists only what differs from `train`; the rest is inherited here.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Hashable
from pathlib import Path
from typing import Annotated, Any, Union, cast

import yaml
from pydantic import BaseModel, Discriminator, Tag, TypeAdapter, ValidationError

from kdistill.errors import RecipeError, suggest
from kdistill.tasks import DEFAULT_TASK, TASKS, task_of


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _inherit_teacher_train(raw: dict[str, Any]) -> dict[str, Any]:
    """`teacher.train` lists only what differs from `train`; fill in the rest."""
    teacher = raw.get("teacher")
    if isinstance(teacher, dict) and isinstance(teacher.get("train"), dict):
        given = raw.get("train")
        base: dict[str, Any] = given if isinstance(given, dict) else {}
        raw = copy.deepcopy(raw)
        raw["teacher"]["train"] = _deep_merge(base, teacher["train"])
    return raw


def parse_override(text: str) -> tuple[list[str], Any]:
    """`train.epochs=3` -> (["train", "epochs"], 3); the value is parsed as YAML."""
    if "=" not in text:
        raise RecipeError(f"--set expects key=value (for example train.epochs=3); got {text!r}")
    key, _, value = text.partition("=")
    parts = key.strip().split(".")
    if not all(parts):
        raise RecipeError(f"--set key {key!r} has an empty part; use dotted names like a.b.c")
    try:
        parsed = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError as exc:
        raise RecipeError(f"--set {key}: the value {value!r} is not valid YAML ({exc})") from None
    return parts, parsed


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    raw = copy.deepcopy(raw)
    for text in overrides:
        parts, value = parse_override(text)
        set_path(raw, parts, value, where=f"--set {text}")
    return raw


def set_path(raw: dict[str, Any], parts: list[str], value: Any, *, where: str) -> None:
    """Put `value` at the dotted path `parts` of a parsed recipe, in place: missing
    sections are made, a list is indexed by a number. `where` starts the error."""
    node: Any = raw
    for i, part in enumerate(parts[:-1]):
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise RecipeError(
                    f"{where}: {'.'.join(parts[: i + 1])} is not an index of the list"
                )
            node = node[int(part)]
        else:
            node = node.setdefault(part, {})
        if not isinstance(node, (dict, list)):
            raise RecipeError(f"{where}: {'.'.join(parts[: i + 1])} holds a value, not a section")
    last = parts[-1]
    if isinstance(node, list):
        if not last.isdigit() or int(last) >= len(node):
            raise RecipeError(f"{where}: {last} is not an index of the list")
        node[int(last)] = value
    else:
        node[last] = value


def _model_at(loc: tuple[Any, ...], schema: type[BaseModel]) -> type[BaseModel] | None:
    """The pydantic model of `schema` that owns the field at `loc`, to suggest near-miss keys."""
    model: Any = schema
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part) if hasattr(model, "model_fields") else None
        if field is None:
            return None
        model = first_model(field.annotation)
        if model is None:
            return None
    return model if hasattr(model, "model_fields") else None


def first_model(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        found = first_model(arg)
        if found is not None:
            return found
    return None


def format_loc(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("float", "Schedule", "function-after[_check(), Schedule]"):
            continue  # union branch names pydantic adds; not YAML keys
        else:
            out += ("." if out else "") + str(part)
    return out or "(top level)"


def explain_error(error: dict[str, Any], schema: type[BaseModel]) -> str:
    """One line (or one per problem of a cross-field check) for a pydantic error of the
    recipe schema `schema`."""
    loc = tuple(error["loc"])
    where = format_loc(loc)
    if error["type"] == "extra_forbidden":
        owner = _model_at(loc, schema)
        key = str(loc[-1])
        allowed = sorted(owner.model_fields) if owner else []
        msg = f"{where}: unknown key {key!r}{suggest(key, allowed)}"
        if allowed:
            msg += f"; allowed here: {', '.join(allowed)}"
        return msg
    if error["type"] == "missing":
        return f"{where}: required but missing"
    value = error.get("input")
    text = error["msg"].removeprefix("Value error, ")
    if isinstance(value, (dict, list)):  # a whole section: the message says what is wrong
        return "\n".join(f"{where}: {problem}" for problem in text.split("\n"))
    return f"{where}: {text} (got {value!r})"


def _dedupe_union_errors(errors: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A number-or-schedule field reports both branches; keep the schedule branch for
    sections and the number branch for scalars."""
    out: list[dict[str, Any]] = []
    seen: set[str] = set()
    for err in errors:
        loc = tuple(err["loc"])
        if "float" in loc and isinstance(err.get("input"), dict):
            continue
        in_schedule_branch = any(
            isinstance(p, str) and p.startswith(("Schedule", "function-after")) for p in loc
        )
        value = err.get("input")
        if (
            in_schedule_branch
            and not isinstance(value, dict)
            and err["type"] != "extra_forbidden"
            and (not isinstance(value, (int, float)) or err["type"] == "missing")
        ):
            continue
        key = format_loc(loc) + "|" + err["msg"]
        if key not in seen:
            seen.add(key)
            out.append(err)
    return out


def _user_wrote(raw: dict[str, Any], loc: tuple[Any, ...]) -> bool:
    """Whether the recipe as written (before inheritance) has a value at `loc`."""
    node: Any = raw
    for part in loc:
        if isinstance(node, dict):
            found = part in node
        else:
            found = isinstance(node, list) and isinstance(part, int) and part < len(node)
        if not found:
            return False
        node = node[part]
    return True


def _drop_inherited(errors: list[dict[str, Any]], written: dict[str, Any]) -> list[dict[str, Any]]:
    """A bad `train.x` is copied into `teacher.train.x` by inheritance; report it once,
    where the user wrote it."""
    return [
        err
        for err in errors
        if not (
            tuple(err["loc"][:2]) == ("teacher", "train")
            and len(err["loc"]) > 2
            and isinstance(written.get("teacher"), dict)
            and not _user_wrote(written["teacher"].get("train") or {}, tuple(err["loc"][2:]))
        )
    ]


class _UniqueKeyLoader(yaml.SafeLoader):
    """`safe_load`, except that a key given twice in one mapping is an error naming both
    lines (YAML itself keeps the last one silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            line = key_node.start_mark.line + 1
            if not isinstance(key, Hashable):
                continue  # SafeLoader's own error ("found unhashable key") follows
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"the key {key!r} is given twice, on lines {seen[key]} and {line}; keep one",
                    key_node.start_mark,
                )
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise RecipeError(
            f"recipe file {path} does not exist; `kdistill recipes` lists the shipped ones"
        )
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise RecipeError(
            f"{path}: not UTF-8 text (byte {exc.start} is {exc.object[exc.start]:#04x}); "
            "save the recipe as UTF-8"
        ) from None
    try:
        raw = yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as exc:
        raise RecipeError(f"{path}: not valid YAML: {exc}") from None
    if raw is None:
        raise RecipeError(f"{path}: the file is empty; a recipe needs at least name and data")
    return raw


def _task_tag(value: Any) -> str:
    if isinstance(value, dict):
        return str(value.get("task", DEFAULT_TASK))
    return str(getattr(value, "task", DEFAULT_TASK))


@functools.cache
def recipe_union() -> TypeAdapter[Any]:
    """The pydantic union of every task's recipe schema, discriminated by `task`."""
    tagged = tuple(Annotated[task.function("schema"), Tag(name)] for name, task in TASKS.items())
    union: Any = Annotated[Union[tagged], Discriminator(_task_tag)]  # noqa: UP007
    return TypeAdapter(union)


def validate_recipe(raw: Any, *, source: str = "recipe") -> Any:
    """Validate a plain dict (parsed YAML) into its task's recipe, with teacher.train
    inherited from train; every problem in one RecipeError."""
    if not isinstance(raw, dict):
        raise RecipeError(
            f"{source}: a recipe is a YAML mapping (name:, data:, teacher:, ...); "
            f"got {type(raw).__name__}"
        )
    # an unknown task is refused here, with "did you mean"
    schema = cast(type[BaseModel], task_of(raw, source=source).function("schema"))
    try:
        return recipe_union().validate_python(_inherit_teacher_train(raw))
    except ValidationError as exc:
        # the union puts the task's name first in each error's place; the YAML has none
        details = [dict(e, loc=tuple(e["loc"])[1:]) for e in exc.errors()]
        errors = _drop_inherited(_dedupe_union_errors(details), raw)
        # a cross-field check raises its problems together, one per line (raise_all)
        lines = [line for e in errors for line in explain_error(e, schema).split("\n")]
        raise problems_error(source, lines) from None


def problems_error(source: str, lines: list[str]) -> RecipeError:
    """One RecipeError listing every problem of a recipe, one line each."""
    noun = "problem" if len(lines) == 1 else "problems"
    return RecipeError(
        f"{source}: {len(lines)} {noun} in the recipe:\n  - "
        + "\n  - ".join(lines)
        + "\nFix these entries and run `kdistill validate` again."
    )


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Any:
    """Read, override and validate a recipe file. A model named `file.py:factory` with a
    relative path is looked for next to the recipe first (then, at run time, in the
    working folder), as a script finds its neighbours."""
    raw = apply_overrides(read_yaml(path), overrides or [])
    _code_beside(raw, Path(path).parent)
    return validate_recipe(raw, source=str(path))


def _code_beside(raw: Any, folder: Path) -> None:
    """Rewrite, in place, each `model: {name: rel/file.py:factory}` whose file exists
    relative to `folder` to its absolute path (the run folder's recipe.yaml keeps it)."""
    if isinstance(raw, list):
        for item in raw:
            _code_beside(item, folder)
    if not isinstance(raw, dict):
        return
    model = raw.get("model")
    name = model.get("name") if isinstance(model, dict) else None
    if isinstance(model, dict) and isinstance(name, str):
        file, colon, attr = name.rpartition(":")
        if colon and file.endswith(".py") and not Path(file).expanduser().is_absolute():
            beside = folder / file
            if beside.is_file():
                model["name"] = f"{beside.resolve()}:{attr}"
    for value in raw.values():
        _code_beside(value, folder)
