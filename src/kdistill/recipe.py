"""The recipe: one typed schema for YAML files, `--set` overrides and the Python API.

A recipe names the data, the teacher, the student, the objective and the training
settings. `load_recipe` reads YAML with `safe_load`, applies `key=value`
overrides, validates everything with pydantic (`extra="forbid"`), and raises one
`RecipeError` that lists every problem with its YAML path, the bad value, what is
allowed, and a "did you mean" for misspelt keys.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from kdistill.errors import RecipeError, suggest
from kdistill.losses.table import check_term

# Schedule and as_schedule are part of the recipe schema; they live in kdistill.schedules
from kdistill.schedules import Schedule as Schedule
from kdistill.schedules import ScheduleOrNumber
from kdistill.schedules import as_schedule as as_schedule

# hf_student's `location` naming the recipe's own teacher (models/text_build.py)
TEACHER_LOCATION = "teacher"

_Schema = TypeVar("_Schema", bound=BaseModel)

StageName = Literal["teacher", "assistant", "baseline", "distill"]
Precision = Literal["fp32", "bf16", "fp16"]


def raise_all(problems: list[str]) -> None:
    """Cross-field checks collect every problem and raise once: one ValueError whose lines
    are the problems, each listed on its own by `validate_schema`."""
    if problems:
        raise ValueError("\n".join(problems))


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


# --------------------------------------------------------------------------- data


class AugmentConfig(Strict):
    """Random input augmentation, applied per batch during training only."""

    jitter: int = Field(0, ge=0, le=8, description="max shift in pixels (Hinton's ±2)")
    crop: int = Field(
        0, ge=0, le=16, description="random crop after zero padding by this many pixels (CIFAR: 4)"
    )
    flip: bool = Field(False, description="random horizontal flip with probability 0.5")

    @property
    def random(self) -> bool:
        """Whether the inputs change from epoch to epoch."""
        return bool(self.jitter or self.crop or self.flip)


class TextAugmentConfig(Strict):
    """Tang et al. (2019) transfer-set augmentation of the training sentences."""

    n_iter: int = Field(20, ge=1, description="rounds over the training sentences")
    p_mask: float = Field(0.1, ge=0, le=1)
    p_pos: float = Field(0.1, ge=0, le=1, description="same-kind word replacement")
    p_ng: float = Field(0.25, ge=0, le=1, description="n-gram sampling")
    per_example: int | None = Field(None, ge=1, description="at most this many per sentence")
    max_total: int | None = Field(None, ge=1, description="at most this many in all")


class TransferConfig(Strict):
    """Unlabelled text for the distill stage, labelled by the teacher."""

    file: str | None = Field(None, description="a .txt (one example per line), CSV/TSV/JSONL")
    augment: TextAugmentConfig | None = None


class TextConfig(Strict):
    max_length: int = Field(128, ge=2, description="tokens per text; longer ones are cut")
    text_column: str = "text"
    drop_empty: bool = Field(False, description="drop empty texts instead of refusing them")
    val_unit: Literal["rows", "sentences"] = Field(
        "sentences",
        description="sst2: 'sentences' holds out whole sentences and their phrases "
        "(no validation text inside a training text); 'rows' samples rows, most of "
        "which are phrases of training sentences, so validation scores run high",
    )
    bucket_batches: int | None = Field(
        100,
        ge=1,
        description="training batches hold texts of similar length: the shuffled rows "
        "are sorted by length in pools of this many batches (null: plain shuffling)",
    )
    transfer: TransferConfig | None = None


class DataConfig(Strict):
    source: Literal["mnist", "image_folder", "npz", "csv", "sst2", "text_files", "hf_disk"] = Field(
        description="mnist: the original idx files; image_folder: train/<class>/*.png; "
        "npz: arrays x, y; csv: numeric feature columns plus a label column; sst2: GLUE "
        "SST-2 TSV; text_files: train/test CSV, TSV or JSONL with text and label columns; "
        "hf_disk: a `datasets` dataset saved to disk"
    )
    text: TextConfig = Field(default_factory=TextConfig, description="text sources only")
    path: str | None = Field(
        None,
        description="user data: a folder (image_folder) or a file/folder holding "
        "train and test files (npz, csv); relative paths resolve against the data folder",
    )
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0, description="validation carved from train")
    split_seed: int = Field(0, description="seed of the train/validation split")
    label_column: str = Field("label", description="csv only: the label column")
    limit_train: int | None = Field(
        None, gt=0, description="use only the first N training samples (quick runs)"
    )
    limit_test: int | None = Field(None, gt=0, description="use only the first N test samples")


# ------------------------------------------------------------------------- models


class ModelSpec(Strict):
    """A zoo name (`mlp`, `resnet20`, `hf`, `bilstm`), `package.module:factory` or
    `file.py:factory`, with keyword arguments. Text models also name a tokenizer."""

    name: str
    args: dict[str, Any] = Field(default_factory=dict)
    tokenizer: str | None = Field(
        None,
        description="text models: 'vocab' (words of the training texts) or a tokenizer "
        "folder / pkg://package/folder / hub id; hf models default to their own",
    )


# ---------------------------------------------------------------------- objective


class TapSpec(Strict):
    """A tensor read from a module of a model by forward hook, without changing the model."""

    path: str = Field(description="dotted module path, as in model.named_modules()")
    read: Literal["output", "input"] = "output"


TapRef = str | TapSpec


class LossTerm(Strict):
    """One weighted term of the objective.

    `loss` names a function in `kdistill.losses` (see `kdistill recipes --losses`);
    `params` are its keyword arguments, checked against its signature.

    Feature losses (hint, attention, similarity, ...) read intermediate tensors:
    `student` and `teacher` name module paths (one each, or lists of equal length
    paired in order, or with `layer_map: uniform` lists of any lengths). A projector
    is added where shapes differ.
    """

    loss: str
    weight: ScheduleOrNumber = 1.0
    temperature: ScheduleOrNumber | None = Field(
        None, description="for losses that take one; a number or a schedule"
    )
    params: dict[str, Any] = Field(default_factory=dict)
    student: TapRef | list[TapRef] | None = Field(
        None, description="feature losses: student module path(s)"
    )
    teacher: TapRef | list[TapRef] | None = Field(
        None, description="feature losses: teacher module path(s)"
    )
    layer_map: Literal["pairs", "uniform"] = Field(
        "pairs",
        description="pairs: i-th student path with i-th teacher path; uniform: student layer i "
        "with teacher layer round((i+1) L_t / L_s) - 1",
    )
    projector: Literal["auto", "linear", "conv1x1", "mlp", "none"] = Field(
        "auto", description="how student features are mapped to the teacher's shape"
    )
    member: str | None = Field(
        None,
        description="ensemble teachers: the member whose features this term reads (default "
        "main); stages that learn from one model (assistant, later generations) read that one",
    )

    def student_taps(self) -> list[TapSpec]:
        return _taps(self.student)

    def teacher_taps(self) -> list[TapSpec]:
        return _taps(self.teacher)

    @model_validator(mode="after")
    def _check(self) -> LossTerm:
        check_term(self)
        return self


def _taps(value: TapRef | list[TapRef] | None) -> list[TapSpec]:
    items = [] if value is None else value if isinstance(value, list) else [value]
    return [TapSpec(path=item) if isinstance(item, str) else item for item in items]


# ----------------------------------------------------------------------- training


class OptimizerConfig(Strict):
    name: Literal["sgd", "adamw", "adam"] = "sgd"
    lr: float = Field(0.1, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    nesterov: bool = False
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)


class LRScheduleConfig(Strict):
    name: Literal["constant", "cosine", "step", "onecycle", "linear"] = "cosine"
    warmup_steps: int = Field(0, ge=0)
    milestones: list[int] = Field(default_factory=list, description="step: epochs")
    gamma: float = Field(0.1, gt=0)
    min_lr: float = Field(0.0, ge=0)


class EarlyStoppingConfig(Strict):
    patience: int = Field(5, ge=1, description="epochs without validation improvement")
    min_delta: float = Field(0.0, ge=0)


class TrainConfig(Strict):
    epochs: int = Field(10, ge=1)
    batch_size: int = Field(128, ge=1, description="samples per optimizer step, all processes")
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimizer step")
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    lr_schedule: LRScheduleConfig = Field(default_factory=LRScheduleConfig)
    grad_clip: float | None = Field(None, gt=0, description="max global gradient norm")
    precision: Precision = "fp32"
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    early_stopping: EarlyStoppingConfig | None = None
    checkpoint_every: int | None = Field(
        None, ge=1, description="also checkpoint every N optimizer steps (end of epoch always)"
    )
    eval_batch_size: int = Field(1000, ge=1)
    eval_every: int | None = Field(
        None, ge=1, description="also measure the validation split every N optimizer steps"
    )

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if self.batch_size % self.grad_accum:
            raise ValueError(
                f"batch_size ({self.batch_size}) must be a multiple of grad_accum "
                f"({self.grad_accum}): each optimizer step sees batch_size samples"
            )
        return self


class TeacherConfig(Strict):
    model: ModelSpec
    checkpoint: str | None = Field(
        None, description="load these weights instead of training (safetensors or run folder)"
    )
    train: TrainConfig | None = Field(
        None, description="teacher training settings; keys not given inherit from `train`"
    )
    objective: list[LossTerm] | None = Field(
        None, description="teacher loss; default hard-label cross-entropy"
    )
    precision: Precision | None = Field(
        None, description="dtype the frozen teacher runs in during distillation"
    )
    cache: bool = Field(False, description="compute teacher logits once and read them from disk")
    cache_dtype: Literal["float16", "float32"] = "float32"
    cache_dir: str | None = Field(
        None,
        description="the cache folder (default <run>/cache/<stage>-seed<k>); point it at "
        "another run's cache to reuse those teacher logits: they are read when the teacher "
        "weights and data match, refused otherwise",
    )
    every_seed: bool = Field(False, description="train one teacher per seed instead of one")
    members: list[MemberConfig] = Field(
        default_factory=list,
        description="more teachers: the ensemble is this teacher (member 'main') plus these",
    )
    combine: Literal["logits", "probs"] = Field(
        "logits", description="ensemble: average logits, or probabilities (as log-probabilities)"
    )
    weights: list[float] | Literal["equal", "confidence"] = Field(
        "equal",
        description="ensemble: fixed weights (main first), equal, or per-sample from each "
        "member's confidence (softmax over members of minus the prediction entropy)",
    )

    @model_validator(mode="after")
    def _check(self) -> TeacherConfig:
        names = ["main"] + [m.name for m in self.members]
        if len(set(names)) != len(names):
            raise ValueError(f"teacher member names must be unique (and not 'main'); got {names}")
        if isinstance(self.weights, list):
            if len(self.weights) != len(names):
                raise ValueError(
                    f"teacher.weights has {len(self.weights)} values for {len(names)} teachers "
                    f"({', '.join(names)}); give one weight per teacher, main first"
                )
            if any(w < 0 for w in self.weights) or sum(self.weights) <= 0:
                raise ValueError("teacher.weights must be non-negative with a positive sum")
        return self

    def member_names(self) -> list[str]:
        return ["main"] + [m.name for m in self.members]


class MemberConfig(Strict):
    """One more teacher of an ensemble; trained by the teacher stage unless it has a checkpoint."""

    name: str = Field(pattern=r"^[A-Za-z0-9_-]+$")
    model: ModelSpec
    checkpoint: str | None = None


class StudentConfig(Strict):
    model: ModelSpec


class AssistantConfig(Strict):
    """A teacher assistant (Mirzadeh et al. 2020): distilled from the teacher with the
    recipe's objective, then the student is distilled from it."""

    model: ModelSpec


class OutputConfig(Strict):
    dir: str | None = Field(None, description="run folder; default runs/<recipe name>")
    tensorboard: bool = False
    plots: bool = True


class Recipe(Strict):
    task: Literal["classification"] = Field(
        "classification",
        description="the task (kdistill.tasks.TASKS); this schema's is classification",
    )
    name: str
    description: str = ""
    data: DataConfig
    teacher: TeacherConfig | None = None
    student: StudentConfig | None = None
    objective: list[LossTerm] = Field(
        default_factory=lambda: [LossTerm(loss="cross_entropy")],
        description="loss terms of the distill stage",
    )
    train: TrainConfig = Field(default_factory=TrainConfig)
    stages: list[StageName] = Field(default=["teacher", "baseline", "distill"])
    seeds: Annotated[list[int], Field(min_length=1)] = Field(default_factory=lambda: [0])
    assistant: AssistantConfig | None = None
    generations: int = Field(
        1,
        ge=1,
        le=10,
        description="born-again networks: distill generation g from generation g-1 "
        "(generation 1 from the teacher); results as distill, distill_gen2, ...",
    )
    output: OutputConfig = Field(default_factory=OutputConfig)

    @field_validator("stages")
    @classmethod
    def _stages_unique(cls, stages: list[str]) -> list[str]:
        if len(set(stages)) != len(stages):
            raise ValueError(f"each stage may appear once; got {stages}")
        if not stages:
            raise ValueError("name at least one stage: teacher, baseline, distill")
        return stages

    @property
    def student_from_teacher(self) -> bool:
        """Whether the student copies the recipe's teacher (hf_student, location: teacher)."""
        return (
            self.student is not None
            and self.student.model.name == "hf_student"
            and self.student.model.args.get("location") == TEACHER_LOCATION
        )

    @model_validator(mode="after")
    def _check(self) -> Recipe:
        problems: list[str] = []
        needs_teacher = "teacher" in self.stages or "distill" in self.stages
        if needs_teacher and self.teacher is None:
            problems.append("stages 'teacher' and 'distill' need a 'teacher' section")
        if {"baseline", "distill"} & set(self.stages) and self.student is None:
            problems.append("stages 'baseline' and 'distill' need a 'student' section")
        if (
            "distill" in self.stages
            and "teacher" not in self.stages
            and self.teacher is not None
            and self.teacher.checkpoint is None
        ):
            problems.append(
                "the distill stage needs a trained teacher: add 'teacher' to stages "
                "or set teacher.checkpoint"
            )
        if self.student_from_teacher and (
            self.teacher is None
            or ("teacher" not in self.stages and self.teacher.checkpoint is None)
        ):
            problems.append(
                "student.model.args.location 'teacher' builds the student from the recipe's "
                "trained teacher: add a 'teacher' section and either the 'teacher' stage or "
                "teacher.checkpoint"
            )
        if (
            self.teacher is not None
            and self.teacher.train is not None
            and self.teacher.train.precision != self.train.precision
        ):
            problems.append(
                f"teacher.train.precision ({self.teacher.train.precision}) differs from "
                f"train.precision ({self.train.precision}); one run trains in one precision. "
                "Use teacher.precision to run the frozen teacher in another dtype"
            )
        if self.teacher is not None and self.teacher.cache and self.train.augment.random:
            problems.append(
                "teacher.cache is true but train.augment randomly changes the student's "
                "inputs each epoch, so cached teacher outputs would not match them; "
                "set teacher.cache: false (live teacher) or remove train.augment"
            )
        features = [t for t in self.objective if t.student is not None]
        if self.teacher is not None and self.teacher.cache and features:
            problems.append(
                f"teacher.cache stores logits only, but loss {features[0].loss!r} reads teacher "
                "features; set teacher.cache: false"
            )
        if "assistant" in self.stages:
            if self.assistant is None:
                problems.append("the 'assistant' stage needs an 'assistant' section (model)")
            if self.teacher is None:
                problems.append("the 'assistant' stage needs a 'teacher' section")
        members = self.teacher.member_names() if self.teacher is not None else ["main"]
        for term in self.objective:
            if term.member is not None and term.member not in members:
                problems.append(
                    f"loss {term.loss!r} reads features of teacher member {term.member!r}, "
                    f"but the teachers are: {', '.join(members)}"
                )
        raise_all(problems)
        return self

    def teacher_train(self) -> TrainConfig:
        assert self.teacher is not None
        return self.teacher.train or self.train


# ----------------------------------------------------------------- loading, errors


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
        node: Any = raw
        for i, part in enumerate(parts[:-1]):
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    where = ".".join(parts[: i + 1])
                    raise RecipeError(f"--set {text}: {where} is not an index of the list")
                node = node[int(part)]
            else:
                node = node.setdefault(part, {})
            if not isinstance(node, (dict, list)):
                where = ".".join(parts[: i + 1])
                raise RecipeError(f"--set {text}: {where} holds a value, not a section")
        last = parts[-1]
        if isinstance(node, list):
            if not last.isdigit() or int(last) >= len(node):
                raise RecipeError(f"--set {text}: {last} is not an index of the list")
            node[int(last)] = value
        else:
            node[last] = value
    return raw


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


def explain_error(error: dict[str, Any], schema: type[BaseModel] | None = None) -> str:
    """One line for a pydantic error of the recipe schema `schema` (default Recipe)."""
    loc = tuple(error["loc"])
    where = format_loc(loc)
    if error["type"] == "extra_forbidden":
        owner = _model_at(loc, schema or Recipe)
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


def validate_recipe(raw: Any, *, source: str = "recipe") -> Recipe:
    """Validate a plain dict (parsed YAML) into a Recipe; collect all errors, raise once."""
    return validate_schema(
        Recipe, raw, source=source, explain=explain_error, keys="name:, data:, teacher:"
    )


def validate_schema(
    schema: type[_Schema],
    raw: Any,
    *,
    source: str,
    explain: Callable[[dict[str, Any]], str],
    keys: str,
) -> _Schema:
    """Validate `raw` into `schema` (a classifier or language-model recipe) with
    teacher.train inherited from train; every error in one RecipeError."""
    if not isinstance(raw, dict):
        raise RecipeError(
            f"{source}: a recipe is a YAML mapping ({keys}, ...); got {type(raw).__name__}"
        )
    written = raw
    raw = _inherit_teacher_train(raw)
    try:
        return schema.model_validate(raw)
    except ValidationError as exc:
        details: list[dict[str, Any]] = [dict(e) for e in exc.errors()]
        errors = _drop_inherited(_dedupe_union_errors(details), written)
        # a cross-field check raises its problems together, one per line (raise_all)
        lines = [line for e in errors for line in explain(e).split("\n")]
        noun = "problem" if len(lines) == 1 else "problems"
        raise RecipeError(
            f"{source}: {len(lines)} {noun} in the recipe:\n  - "
            + "\n  - ".join(lines)
            + "\nFix these entries and run `kdistill validate` again."
        ) from None


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise RecipeError(
            f"recipe file {path} does not exist; `kdistill recipes` lists the shipped ones"
        )
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise RecipeError(f"{path}: not valid YAML: {exc}") from None
    if raw is None:
        raise RecipeError(f"{path}: the file is empty; a recipe needs at least name and data")
    return raw


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read, override and validate a recipe file."""
    raw = apply_overrides(read_yaml(path), overrides or [])
    return validate_recipe(raw, source=str(path))
