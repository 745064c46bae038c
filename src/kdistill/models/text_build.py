"""Text models for a recipe: Hugging Face classifiers and the zoo's BiLSTM / TextCNN.

Names a recipe may use with a text dataset:

    hf           args: location (folder, pkg://package/folder, or hub id), reset_head,
                 attn_implementation; tokenizer: the model's own unless `tokenizer` says
    hf_student   a smaller encoder of a pretrained one (DistilBERT-style): args: location
                 (the pretrained source, or "teacher": the recipe's teacher as this run
                 trained or loaded it, with its tokenizer), num_layers, layers (which
                 source layers to copy), hidden_size, intermediate_size, num_heads, init
                 (teacher_layers | embeddings | random), and prune: {ffn: fraction,
                 samples: N} (remove that fraction of each layer's feed-forward neurons,
                 least important first on N training texts: models/prune_hf.py; with
                 `location: teacher` this is "prune the teacher, distill from the
                 unpruned teacher"). Baseline and distill start from the same copy.
    bilstm       Tang et al. (2019); textcnn: Kim (2014). args as in models/text.py, plus
                 embedding_from (a location: copy that model's token embeddings; the
                 tokenizer must then be that model's), vocab_min_freq, vocab_size.
                 tokenizer: "vocab" (default: words of the training texts) or a location.

Each model carries `kdistill_tokenizer` and `kdistill_tokenizer_key` (see
data/text_task.py), which decide its inputs.
"""

from __future__ import annotations

import hashlib
from typing import Any

from torch import nn

from kdistill.data.text_task import TextData
from kdistill.data.text_tokenizers import VocabTokenizer
from kdistill.errors import ModelError
from kdistill.models.hf import (
    HFClassifier,
    load_sequence_classifier,
    load_tokenizer,
    resolve_model_location,
    student_from_teacher,
    token_embedding_matrix,
)
from kdistill.models.text import bilstm, textcnn
from kdistill.recipe import TEACHER_LOCATION, ModelSpec

TEXT_ZOO = ("hf", "hf_student", "bilstm", "textcnn")


def build_text_model(
    spec: ModelSpec, data: TextData, *, where: str, teacher: nn.Module | None = None
) -> nn.Module:
    """The model `spec` names, for this data. `teacher` is the recipe's teacher, which an
    `hf_student` with `location: teacher` copies its layers from."""
    args: dict[str, Any] = dict(spec.args)
    id2label = dict(enumerate(data.class_names))
    model: nn.Module
    tokenizer: Any  # a Hugging Face fast tokenizer or a VocabTokenizer
    key: str
    prune = args.pop("prune", None) if spec.name == "hf_student" else None
    if spec.name == "hf_student" and args.get("location") == TEACHER_LOCATION:
        args.pop("location")
        source = _teacher_source(teacher, where)
        if prune is not None:  # width pruning alone keeps every layer
            args.setdefault("num_layers", int(source.config.num_hidden_layers))
        try:
            model = student_from_teacher(source, where=where, **args)
        except TypeError as exc:
            raise ModelError(f"{where}.args: {exc}") from None
        if spec.tokenizer is None:
            tokenizer, source_key = source.kdistill_tokenizer, source.kdistill_tokenizer_key
            assert isinstance(source_key, str)  # build_text_model built the teacher
            key = source_key
        else:
            tokenizer = load_tokenizer(spec.tokenizer, where=f"{where}.tokenizer")
            key = f"hf:{resolve_model_location(spec.tokenizer).target}"
    elif spec.name in ("hf", "hf_student"):
        location = _location(args, where)
        source = load_sequence_classifier(
            location,
            num_labels=data.num_classes,
            id2label=id2label,
            reset_head=bool(args.pop("reset_head", False)),
            attn_implementation=args.pop("attn_implementation", None),
            where=f"{where}.args.location",
        )
        if spec.name == "hf_student":
            try:
                model = student_from_teacher(source, where=where, **args)
            except TypeError as exc:
                raise ModelError(f"{where}.args: {exc}") from None
        else:
            if args:
                raise ModelError(
                    f"{where}.args: unknown {', '.join(sorted(args))} for 'hf' "
                    "(allowed: location, reset_head, attn_implementation)"
                )
            model = source
        tokenizer_location = spec.tokenizer or location
        tokenizer = load_tokenizer(tokenizer_location, where=f"{where}.tokenizer")
        key = f"hf:{resolve_model_location(tokenizer_location).target}"
    elif spec.name in ("bilstm", "textcnn"):
        embedding_from = args.pop("embedding_from", None)
        min_freq = args.pop("vocab_min_freq", 1)
        max_size = args.pop("vocab_size", 30000)
        tokenizer_name = spec.tokenizer or ("vocab" if embedding_from is None else embedding_from)
        if tokenizer_name == "vocab":
            tokenizer = VocabTokenizer.build(
                data.bundle.train.texts, min_freq=min_freq, max_size=max_size
            )
            digest = hashlib.sha256("\n".join(tokenizer.tokens).encode()).hexdigest()
            key, vocab_size = f"vocab:{digest[:16]}", len(tokenizer)
        else:
            tokenizer = load_tokenizer(tokenizer_name, where=f"{where}.tokenizer")
            key = f"hf:{resolve_model_location(tokenizer_name).target}"
            vocab_size = len(tokenizer)
        if embedding_from is not None:
            if tokenizer_name != embedding_from:
                raise ModelError(
                    f"{where}: embedding_from {embedding_from!r} needs that model's tokenizer, "
                    f"but the tokenizer is {tokenizer_name!r}; remove `tokenizer` or set it to "
                    "the same location"
                )
            source = load_sequence_classifier(
                embedding_from, num_labels=data.num_classes, where=f"{where}.args.embedding_from"
            )
            args["embedding_init"] = token_embedding_matrix(source)
            vocab_size = args["embedding_init"].shape[0]
        factory = bilstm if spec.name == "bilstm" else textcnn
        try:
            model = factory(vocab_size=vocab_size, num_classes=data.num_classes, **args)
        except (TypeError, ValueError) as exc:
            raise ModelError(f"{where}.args: {exc}") from None
    else:
        raise ModelError(
            f"{where}.name: {spec.name!r} is not a text model; with a text dataset use one of "
            f"{', '.join(TEXT_ZOO)}"
        )
    model.kdistill_tokenizer = tokenizer
    # torch annotates nn.Module.__setattr__ with Tensor | Module, but stores any value
    model.kdistill_tokenizer_key = key  # type: ignore[assignment]
    if prune is not None:
        return _pruned(model, prune, data, where=f"{where}.args.prune")
    return model


def _pruned(model: nn.Module, prune: Any, data: TextData, *, where: str) -> nn.Module:
    """`hf_student`'s `prune: {ffn: fraction, samples: N}`: the student with that fraction
    of each layer's feed-forward neurons removed, ranked on N labelled training texts
    (kdistill.models.prune_hf); the same teacher and data give the same student."""
    from kdistill.compress.prune import calibration_rows
    from kdistill.models.prune_hf import PruneSettings, prune_encoder

    settings = PruneSettings.of(prune, where)
    assert isinstance(model, HFClassifier)
    rows = calibration_rows(data.bundle.train.labels, settings.samples)
    batches = [
        (data.batch(model, "train", chunk), data.bundle.train.labels[chunk])
        for chunk in rows.split(32)
    ]
    pruned, report = prune_encoder(model, batches, ffn=settings.ffn, where=where)
    (inner, kept), (before, after) = report["intermediate_size"], report["params"]
    pruned.load_notes = (
        *model.load_notes,
        f"feed-forward neurons pruned {inner} -> {kept} per layer (Taylor importance on "
        f"{len(rows)} training texts): {before:,} -> {after:,} parameters",
    )
    return pruned


def _teacher_source(teacher: nn.Module | None, where: str) -> HFClassifier:
    if teacher is None:
        raise ModelError(
            f"{where}.args.location: 'teacher' copies the layers of the recipe's teacher, and "
            "this recipe has none for the stage; add a teacher (trained by the teacher stage or "
            "loaded from teacher.checkpoint), or name a model folder, pkg:// folder or hub id"
        )
    if not isinstance(teacher, HFClassifier):
        raise ModelError(
            f"{where}.args.location: 'teacher' needs a Hugging Face teacher (name: hf); the "
            f"teacher is a {type(teacher).__name__}. Name a pretrained encoder instead"
        )
    return teacher


def _location(args: dict[str, Any], where: str) -> str:
    location = args.pop("location", None)
    if not isinstance(location, str):
        raise ModelError(
            f"{where}.args.location: name the pretrained model: a folder, "
            "pkg://package/folder (a folder inside an installed package) or a hub id"
        )
    return location
