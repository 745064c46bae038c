"""Causal language models for distillation: any Hugging Face `AutoModelForCausalLM`.

`CausalLM` wraps one so that `forward(input_ids)` returns the final hidden states
(B, T, H) and `head_weight`, `head_bias` are its output layer: the losses of
`kdistill.losses.lm_chunked` and `lm_cross_entropy` build the logits from them a chunk of tokens at a time, so no
(B, T, V) logits tensor exists.
A dry run at build time checks that the model's logits are exactly head(hidden
states); models that post-process them (soft-capping, logit scaling) are refused.

`build_causal_lm` makes one from a recipe's `model:` section: a `config` (a new model
with random weights; `type` names the transformers model type) or a `path` (a folder
written by save_pretrained, or a hub id already in the local Hugging Face cache:
nothing is downloaded).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer
from torch import Tensor, nn

from kdistill.data.lm_text import TOKENIZER_FILE, load_tokenizer, tokenizer_fingerprint
from kdistill.errors import DataError, ModelError, suggest
from kdistill.models.hf import TiedWeights, quiet_transformers, resolve_model_location
from kdistill.recipe.causal_lm import LMModelSpec

EOS_TOKEN = "<|endoftext|>"
# config keys that give a model's context length, by model family
_CONTEXT_KEYS = ("n_positions", "max_position_embeddings", "n_ctx", "seq_length")


# (hidden (B, T, H), head weight (V, H), head bias (V,) or None) -> a loss and its parts
HeadLoss = Callable[[Tensor, Tensor, Tensor | None], Any]


class CausalLM(TiedWeights):
    """A Hugging Face causal LM whose forward returns final hidden states (B, T, H).

    `hf` is the Hugging Face model. Weights shared by tied embeddings (GPT-2's input
    embedding and output layer) appear once in `state_dict()`, under the first name,
    so they can be saved as safetensors; `load_state_dict` restores both through it.
    """

    hf: Any  # a transformers PreTrainedModel with a causal-LM head

    def __init__(self, hf: nn.Module) -> None:
        super().__init__()
        self.hf = hf

    def forward(self, input_ids: Tensor, head_loss: HeadLoss | None = None) -> Any:
        """The final hidden states (B, T, H); with `head_loss`, what
        `head_loss(hidden, head_weight, head_bias)` returns, computed inside this forward
        (in float32, autocast off). Training computes its loss this way: under FSDP the
        output layer is whole only while the wrapped module's forward runs, so a loss
        that reads it afterwards would see a flat shard."""
        out = self.hf.base_model(input_ids=input_ids, use_cache=False, return_dict=True)
        hidden = out.last_hidden_state  # (B, T, H)
        if head_loss is None:
            return hidden
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            return head_loss(hidden, self.head_weight, self.head_bias)

    @property
    def head_weight(self) -> Tensor:
        """The output layer's weight (V, H)."""
        return self.hf.get_output_embeddings().weight

    @property
    def head_bias(self) -> Tensor | None:
        """The output layer's bias (V,), or None."""
        return getattr(self.hf.get_output_embeddings(), "bias", None)

    def logits(self, hidden: Tensor) -> Tensor:
        """(…, H) -> (…, V): only for a few positions at a time (generation, checks)."""
        weight = self.head_weight
        return F.linear(hidden.to(weight.dtype), weight, self.head_bias)

    @property
    def vocab_rows(self) -> int:
        return int(self.head_weight.shape[0])

    @property
    def context(self) -> int | None:
        """The longest input the model's position embeddings allow, when it has a limit."""
        config = self.hf.config
        for key in _CONTEXT_KEYS:
            value = getattr(config, key, None)
            if isinstance(value, int) and value > 0:
                return value
        return None


def build_causal_lm(
    spec: LMModelSpec,
    *,
    vocab_size: int,
    seq_len: int,
    eos_id: int | None,
    where: str,
    teacher: CausalLM | None = None,
    calibration: Tensor | None = None,
) -> CausalLM:
    """A CausalLM from a recipe's model section; checks vocabulary and context length.

    vocab_size: the tokenizer's size. A `config` without vocab_size gets it; a model
    whose output layer has fewer rows cannot give every token a probability and is
    refused, as is one whose context is shorter than seq_len. A `prune` section cuts
    `teacher` down, ranking its parts on `calibration` (N, T) token ids.
    """
    if spec.path is not None:
        hf = _load_pretrained(spec.path, where)
    elif spec.prune is not None:
        hf = _pruned_teacher(spec, teacher, calibration, where)
    else:
        assert spec.config is not None
        hf = _from_config(spec.config, vocab_size=vocab_size, eos_id=eos_id, where=where)
    if hf.get_output_embeddings() is None:
        raise ModelError(
            f"{where}: {type(hf).__name__} has no output layer (get_output_embeddings() is None); "
            "kdistill distills causal LMs whose logits are head(hidden states)"
        )
    model = CausalLM(hf)
    problems = []
    if model.vocab_rows < vocab_size:
        problems.append(
            f"its output layer has {model.vocab_rows} rows but the tokenizer has {vocab_size} "
            f"tokens, the range teacher and student are compared over ([0, {vocab_size})); "
            f"give it vocab_size: {vocab_size} or more (larger, padded sizes are fine)"
        )
    if model.context is not None and model.context < seq_len:
        problems.append(
            f"its context is {model.context} positions, shorter than data.seq_len = {seq_len}; "
            "lower data.seq_len or raise the model's n_positions / max_position_embeddings"
        )
    if problems:
        raise ModelError(f"{where} ({spec.describe()}): " + "; ".join(problems))
    _check_logits_are_head_of_hidden(model, where)
    return model


def _pruned_teacher(
    spec: LMModelSpec, teacher: CausalLM | None, calibration: Tensor | None, where: str
) -> Any:
    """The teacher's Hugging Face model pruned to `spec.prune`'s sizes, with what was
    kept in its `kdistill_pruned` attribute (kdistill.compress.prune_lm)."""
    from kdistill.compress.prune_lm import prune_gpt2

    settings = spec.prune
    assert settings is not None and calibration is not None
    if teacher is None:
        raise ModelError(
            f"{where}.prune: prunes the run's teacher, and there is none for this stage; add "
            "the teacher stage, teacher.checkpoint or teacher.model.path"
        )
    device = teacher.head_weight.device
    batches = [rows.to(device) for rows in calibration.split(8)]
    hf, report = prune_gpt2(
        teacher.hf,
        batches,
        n_layer=settings.n_layer,
        n_embd=settings.n_embd,
        n_head=settings.n_head,
        n_inner=settings.n_inner,
        layers=settings.layers,
        where=f"{where}.prune",
    )
    hf.kdistill_pruned = {**report, "samples": len(calibration)}
    return hf


def config_class_of(config: dict[str, Any], where: str) -> tuple[Any, set[str]]:
    """The transformers config class of a recipe's `config` ({type: ..., keys...}) and the
    keys it knows; an unknown type or key is a ModelError (a typo would be ignored)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    model_type = config["type"]
    if model_type not in CONFIG_MAPPING:
        maybe = suggest(model_type, CONFIG_MAPPING.keys())
        raise ModelError(
            f"{where}.config.type: {model_type!r} is not a transformers model type{maybe}; "
            "use one such as gpt2, llama, qwen2, gpt_neox"
        )
    config_class = CONFIG_MAPPING[model_type]
    with quiet_transformers():
        known = set(config_class().to_dict())
    unknown = sorted(set(config) - known - {"type"})
    if unknown:
        details = [f"{key!r}{suggest(key, sorted(known))}" for key in unknown]
        raise ModelError(
            f"{where}.config: unknown key(s) for a {model_type} config: {', '.join(details)}; "
            f"see transformers' {config_class.__name__} for the keys"
        )
    return config_class, known


def _from_config(config: dict[str, Any], *, vocab_size: int, eos_id: int | None, where: str) -> Any:
    from transformers import AutoModelForCausalLM

    config_class, known = config_class_of(config, where)
    options = {k: v for k, v in config.items() if k != "type"}
    options.setdefault("vocab_size", vocab_size)
    if eos_id is not None:
        for key in ("bos_token_id", "eos_token_id"):
            if key in known:
                options.setdefault(key, eos_id)
    try:
        with quiet_transformers():
            hf_config = config_class(**options)
            hf = AutoModelForCausalLM.from_config(hf_config)
    except (ValueError, TypeError) as exc:
        raise ModelError(f"{where}.config: transformers refused it: {exc}") from None
    return hf


def _load_pretrained(path: str, where: str) -> Any:
    from transformers import AutoModelForCausalLM

    location = resolve_model_location(path, where=f"{where}.path")
    try:
        with quiet_transformers():
            return AutoModelForCausalLM.from_pretrained(location.target, local_files_only=True)
    except (OSError, ValueError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if location.kind == "hub":
            raise ModelError(
                f"{where}.path: {path!r} is not a local folder and the hub id is not in the local "
                f"Hugging Face cache ({reason}). Nothing is downloaded: on a machine with "
                f"network run `hf download {location.target} --local-dir <folder>`, copy the "
                "folder here and point model.path at it"
            ) from None
        raise ModelError(
            f"{where}.path: {location} cannot be loaded as a causal LM ({reason}); give a folder "
            "written by save_pretrained of an AutoModelForCausalLM"
        ) from None


def _check_logits_are_head_of_hidden(model: CausalLM, where: str) -> None:
    """The chunked losses rebuild logits as head(hidden); refuse models where that is wrong."""
    ids = torch.arange(4).unsqueeze(0) % model.vocab_rows  # (1, 4)
    device = model.head_weight.device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            expected = model.hf(input_ids=ids.to(device), use_cache=False).logits.float()
            rebuilt = model.logits(model(ids.to(device))).float()
    finally:
        model.train(was_training)
    if not torch.allclose(expected, rebuilt, rtol=1e-4, atol=1e-4):
        raise ModelError(
            f"{where}: {type(model.hf).__name__}'s logits are not its output layer applied to its "
            "final hidden states (it scales or caps them), so kdistill's chunked token losses "
            "would train against the wrong distribution; this model family is not supported"
        )


def model_tokenizer(spec: LMModelSpec, checkpoint: Path | None) -> Tokenizer | None:
    """The tokenizer a pretrained model was trained with, when it ships one: a tokenizer.json
    in its folder (or the run folder its checkpoint comes from). None for new models."""
    folders: list[Path] = []
    if checkpoint is not None:
        # <run>/<stage>/seed<k>/model.safetensors -> <run>/tokenizer
        folders += [checkpoint.parent, checkpoint.parent.parent.parent / "tokenizer"]
    if spec.path is not None:
        location = resolve_model_location(spec.path, where="model.path")
        if location.kind == "folder":
            folders.append(Path(location.target))
        else:
            try:
                return load_tokenizer(location.target)
            except DataError:
                return None
    for folder in folders:
        if (folder / TOKENIZER_FILE).is_file():
            return load_tokenizer(folder / TOKENIZER_FILE)
    return None


def check_same_tokenizer(
    model_tokens: Tokenizer | None, data_tokens: Tokenizer, *, where: str, role: str
) -> None:
    """Token-level losses compare distributions over the same token ids; refuse otherwise."""
    if model_tokens is None:
        return
    if tokenizer_fingerprint(model_tokens) == tokenizer_fingerprint(data_tokens):
        return
    raise ModelError(
        f"{where}: the {role} was trained with another tokenizer than data.tokenizer "
        f"({model_tokens.get_vocab_size()} vs {data_tokens.get_vocab_size()} tokens, different "
        "vocabularies or merges). Token-level distillation compares the two models' "
        "probabilities token id by token id, which is meaningless across tokenizers. Use the "
        f"{role}'s tokenizer for the data (data.tokenizer.path: the {role}'s folder), or use "
        "sequence-level distillation (Kim & Rush 2016: the teacher writes text, the student "
        "trains on it), which works across tokenizers: `stages: [seqkd]` with a `seqkd` "
        "section instead of the distill stage"
    )


def weights_fingerprint(model: nn.Module) -> str:
    """sha256 over the model's weights (names, dtypes, shapes and bytes), for cache manifests:
    the same weights give the same fingerprint wherever they were loaded from."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}\0{flat.dtype}\0{tuple(tensor.shape)}\n".encode())
        digest.update(flat.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
