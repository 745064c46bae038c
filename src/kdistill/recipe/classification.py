"""The classification task's recipe: images, tables and texts into classes.

Its sections: data (a source and its split), the teacher (one model, an ensemble of
members, or a cache of its logits), the student, an optional assistant (teacher
assistant KD), the objective's loss terms with the features they read by module path,
and born-again generations. The training, output and seed sections are
`recipe/common.py`'s; loading and error messages are `recipe/load.py`'s.
"""

from __future__ import annotations

import sys
from typing import Any, Literal

from pydantic import (
    Field,
    SerializerFunctionWrapHandler,
    field_validator,
    model_serializer,
    model_validator,
)

from kdistill.losses.table import check_term
from kdistill.recipe.common import (
    OutputConfig,
    Precision,
    RecipeBase,
    Seeds,
    Strict,
    TrainConfig,
    raise_all,
)
from kdistill.schedules import LearnedTemperature, ScheduleOrNumber

# Schedule and as_schedule are part of the recipe schema; they live in kdistill.schedules
from kdistill.schedules import Schedule as Schedule
from kdistill.schedules import as_schedule as as_schedule

# hf_student's `location` naming the recipe's own teacher (models/text_build.py)
TEACHER_LOCATION = "teacher"
PRUNED_TEACHER = "pruned_teacher"  # a student model: the teacher, pruned

StageName = Literal["teacher", "assistant", "prune", "baseline", "distill", "qat", "quantize"]


# --------------------------------------------------------------------------- data


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


# sources whose data is raw text (data.text applies to these only), and the sources
# that read a train file and a test file of your own (data.train, data.test)
TEXT_SOURCES = ("sst2", "text_files", "hf_disk")
ARRAY_SOURCES = ("npz", "csv")

# what `source: text_files` reads, for messages that send text files there
TEXT_FILES_LAYOUT = (
    "data.path names a folder holding train.csv, train.tsv or train.jsonl and test.csv, "
    "test.tsv or test.jsonl, each with a text column (data.text.text_column, default "
    "'text') and a label column (data.label_column, default 'label'); a relative "
    "data.path resolves against the data folder"
)


class DataConfig(Strict):
    source: Literal["mnist", "image_folder", "npz", "csv", "sst2", "text_files", "hf_disk"] = Field(
        description="mnist: the original idx files; image_folder: train/<class>/*.png; "
        "npz: arrays x, y; csv: numeric feature columns plus a label column; sst2: GLUE "
        "SST-2 TSV; text_files: train/test CSV, TSV or JSONL with text and label columns "
        "(the way to read text from such files); hf_disk: a `datasets` dataset saved to disk"
    )
    text: TextConfig = Field(
        default_factory=TextConfig, description="text sources (sst2, text_files, hf_disk) only"
    )
    path: str | None = Field(
        None,
        description="user data: a folder (image_folder, text_files, hf_disk), or a folder "
        "holding train and test files (npz, csv); relative paths resolve against the "
        "current directory, then the data folder (text sources: the data folder)",
    )
    train: str | None = Field(
        None,
        description="npz, csv: the training file, instead of a data.path folder; give "
        "data.test with it. Relative paths resolve as data.path's do",
    )
    test: str | None = Field(None, description="npz, csv: the test file; with data.train")
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0, description="validation carved from train")
    split_seed: int = Field(0, description="seed of the train/validation split")
    label_column: str = Field("label", description="csv only: the label column")
    limit_train: int | None = Field(
        None, gt=0, description="use only the first N training samples (quick runs)"
    )
    limit_val: int | None = Field(
        None, gt=0, description="use only the first N validation samples (quick runs)"
    )
    limit_test: int | None = Field(None, gt=0, description="use only the first N test samples")

    @model_validator(mode="after")
    def _check(self) -> DataConfig:
        problems: list[str] = []
        # only a section the recipe wrote counts: every source has the default one
        if "text" in self.model_fields_set and self.source not in TEXT_SOURCES:
            problems.append(
                f"data.text applies to the text sources ({', '.join(TEXT_SOURCES)}), not to "
                f"source {self.source!r}. Text in CSV, TSV or JSON Lines files is read with "
                f"`source: text_files`: {TEXT_FILES_LAYOUT}. Otherwise remove data.text"
            )
        files = [f"data.{name}" for name in ("train", "test") if getattr(self, name) is not None]
        if files and self.source not in ARRAY_SOURCES:
            one = len(files) == 1
            problems.append(
                f"{' and '.join(files)} {'is' if one else 'are'} for sources "
                f"{' and '.join(ARRAY_SOURCES)} only (their train and test files); source "
                f"{self.source!r} does not read {'it' if one else 'them'}. Remove "
                f"{' and '.join(files)}"
            )
        elif files and self.path is not None:
            problems.append(
                f"data.path and {' and '.join(files)} are given together; give either data.path "
                "(a folder holding the train and test files) or data.train and data.test "
                "(the two files), not both"
            )
        elif len(files) == 1:
            other = "data.test" if files == ["data.train"] else "data.train"
            problems.append(
                f"{files[0]} is given without {other}; give both files, or data.path "
                "(a folder holding the train and test files) instead"
            )
        raise_all(problems)
        return self

    @model_serializer(mode="wrap")
    def _dump(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        """Leave out the (default) text section of a source that refuses it, so a dump
        (a run's recipe.yaml, model.json, --set on a recipe object) validates again."""
        dumped: dict[str, Any] = handler(self)
        if self.source not in TEXT_SOURCES:
            dumped.pop("text", None)
        return dumped


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

    @field_validator("name")
    @classmethod
    def _code_name_form(cls, name: str) -> str:
        """A `module:callable` name is checked for its form here (validate imports no
        user code); whether it imports is checked when the run builds the model."""
        module, colon, attr = name.rpartition(":")
        if not colon:
            return name
        dotted = all(part.isidentifier() for part in module.split("."))
        if not (module.endswith(".py") or dotted) or not attr.isidentifier():
            raise ValueError(
                f"{name!r} names neither a Python file (path/to/file.py:factory) nor a "
                "module (package.module:factory); write one of those forms"
            )
        refused = standard_library_module(module)
        if refused:
            raise ValueError(refused)
        return name


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
    temperature: ScheduleOrNumber | LearnedTemperature | None = Field(
        None,
        description="for losses that take one; a number, a schedule, or {kind: learned} "
        "(CTKD: trained with the student, against it)",
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


def standard_library_module(module: str) -> str | None:
    """Why a factory's module is refused: the standard library and builtins are never a
    model factory (a shared recipe naming `os:system` would run a command), or None."""
    if module.endswith(".py"):
        return None
    top = module.split(".")[0]
    if top in sys.stdlib_module_names or top in sys.builtin_module_names:
        return (
            f"{module!r} is a module of the Python standard library; a model factory is "
            "your own code (path/to/file.py:factory, package.module:factory) or a model "
            "package's, so standard-library callables are refused before anything is called"
        )
    return None


def _taps(value: TapRef | list[TapRef] | None) -> list[TapSpec]:
    items = [] if value is None else value if isinstance(value, list) else [value]
    return [TapSpec(path=item) if isinstance(item, str) else item for item in items]


# ----------------------------------------------------------------------- training


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


class QATConfig(Strict):
    """The qat stage: the distilled student trained on with its layers computing on
    int8-rounded weights and inputs (kdistill.compress.qat), with the distill
    objective and teacher, the rest of `train` as it is."""

    epochs: int = Field(1, ge=1, description="epochs of quantization-aware training")
    lr: float = Field(1e-4, gt=0, description="learning rate: a fine-tuning rate, low")


class QuantizeConfig(Strict):
    """The quantize stage: a trained stage's model as INT8 ONNX (ONNX Runtime's
    quantization), measured on the whole test split and timed beside PyTorch."""

    stage: Literal["distill", "baseline", "qat"] = Field(
        "distill", description="the stage whose model is quantized, per seed"
    )
    mode: Literal["dynamic", "dynamic-per-channel", "static"] = Field(
        "dynamic",
        description="dynamic: int8 weights (one scale per tensor), activations quantized "
        "per batch at run time; dynamic-per-channel: the same, one weight scale per output "
        "channel; static: activation ranges fixed on training batches",
    )


class Recipe(RecipeBase):
    task: Literal["classification"] = Field(
        "classification",
        description="the task (kdistill.tasks.TASKS); this schema's is classification",
    )
    data: DataConfig
    teacher: TeacherConfig | None = None
    student: StudentConfig | None = None
    objective: list[LossTerm] = Field(
        default_factory=lambda: [LossTerm(loss="cross_entropy")],
        description="loss terms of the distill stage",
    )
    train: TrainConfig = Field(default_factory=TrainConfig)
    stages: list[StageName] = Field(default=["teacher", "baseline", "distill"])
    seeds: Seeds = Field(default_factory=lambda: [0])
    assistant: AssistantConfig | None = None
    generations: int = Field(
        1,
        ge=1,
        le=10,
        description="born-again networks: distill generation g from generation g-1 "
        "(generation 1 from the teacher); results as distill, distill_gen2, ...",
    )
    qat: QATConfig = Field(default_factory=QATConfig)
    quantize: QuantizeConfig = Field(default_factory=QuantizeConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)

    STAGES = "teacher, baseline, distill"

    @property
    def student_from_teacher(self) -> bool:
        """Whether the student is cut from the recipe's teacher (pruned_teacher, or
        hf_student with location: teacher)."""
        if self.student is None:
            return False
        model = self.student.model
        return model.name == PRUNED_TEACHER or (
            model.name == "hf_student" and model.args.get("location") == TEACHER_LOCATION
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
                "student.model builds the student from the recipe's trained teacher "
                "(pruned_teacher, or location 'teacher'): add a 'teacher' section and either "
                "the 'teacher' stage or teacher.checkpoint"
            )
        pruned = self.student is not None and self.student.model.name == PRUNED_TEACHER
        if "prune" in self.stages and not pruned:
            problems.append(
                "the 'prune' stage measures the pruned teacher before training, so the student "
                "must be one: student.model: {name: pruned_teacher, args: {channels: 0.5}} "
                "(image and table models) or {ffn: 0.5, layers: [0, 2, 4]} (Hugging Face "
                "encoders)"
            )
        if "quantize" in self.stages and self.quantize.stage not in self.stages:
            problems.append(
                f"the 'quantize' stage quantizes the {self.quantize.stage} stage's model "
                f"(quantize.stage), which is not in stages; add {self.quantize.stage!r} to "
                "stages or set quantize.stage to a listed one"
            )
        student_args = self.student.model.args if self.student is not None else {}
        steps = student_args.get("steps", 1) if self.student_from_teacher else 1
        if isinstance(steps, int) and steps > 1 and "prune" not in self.stages:
            problems.append(
                "student.model.args.steps: iterative pruning trains between its steps, which "
                "the 'prune' stage does; add 'prune' to stages"
            )
        if "qat" in self.stages and any(t.student is not None for t in self.objective):
            problems.append(
                "the 'qat' stage trains with the distill objective, and its feature terms "
                "would start from fresh projectors (the distill stage's are not kept); use "
                "logit terms only, or leave qat out"
            )
        if {"qat", "quantize"} & set(self.stages) and self.generations > 1:
            problems.append(
                "qat and quantize start from the distill stage's first generation; with "
                "generations > 1 run them in a recipe of their own on the last one"
            )
        if "qat" in self.stages and "distill" not in self.stages:
            problems.append(
                "the 'qat' stage trains on from the distill stage's weights, with its "
                "objective: add 'distill' to stages"
            )
        for role in ("teacher", "assistant"):
            section = getattr(self, role)
            if section is not None and section.model.name == PRUNED_TEACHER:
                problems.append(
                    f"{role}.model: pruned_teacher is a student model (the teacher, pruned); "
                    f"name the {role}'s own architecture"
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

    def reads_teacher_cache(self) -> bool:
        return self.teacher is not None and self.teacher.cache

    def teacher_train(self) -> TrainConfig:
        assert self.teacher is not None
        return self.teacher.train or self.train
