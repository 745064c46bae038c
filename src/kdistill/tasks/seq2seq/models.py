"""Encoder-decoder models of the seq2seq task: any Hugging Face `AutoModelForSeq2SeqLM`
(Marian, BART, T5, ...) behind one wrapper that returns the decoder's final hidden
states, so the losses build logits a chunk of tokens at a time from them and the output
layer (`head_weight`, `head_bias`) as the causal-LM task does.

Built from a config (random weights, vocabulary and special ids from the run's
tokenizers), loaded from a save_pretrained folder, or shrunk from the teacher: the
chosen encoder and decoder layers (by index), the embeddings and the output layer
copied (DistilBART's "shrink and fine-tune", Shleifer & Rush 2020), or the same shape
with new weights (the control that shows what the copy is worth).
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdistill.errors import ModelError
from kdistill.models.hf import TiedWeights, quiet_transformers
from kdistill.recipe.seq2seq import Seq2SeqModelSpec, ShrinkSpec
from kdistill.tasks.seq2seq.data import Tokenizers, load_tokenizers

# config attributes holding the layer counts, per family: (encoder, decoder)
LAYER_COUNTS = (("encoder_layers", "decoder_layers"), ("num_layers", "num_decoder_layers"))
_LAYER_KEY = re.compile(r"^(.*?(?:encoder|decoder))\.(layers|block)\.(\d+)\.(.*)$")


class Seq2SeqLM(TiedWeights):
    """A Hugging Face encoder-decoder and the tokenizers that make its inputs.

    forward(inputs...) -> logits (B, T, V); forward(..., head_loss=f) -> f(hidden,
    head_weight, head_bias), computed inside this forward (DDP sees one call)."""

    hf: Any  # a transformers PreTrainedModel with a seq2seq LM head

    def __init__(self, hf: nn.Module, tokenizers: Tokenizers) -> None:
        super().__init__()
        self.hf = hf
        self.kdistill_tokenizers = tokenizers

    @property
    def start_id(self) -> int:
        """The token the decoder starts from."""
        return int(self.hf.config.decoder_start_token_id)

    @property
    def tokenizer_key(self) -> str:
        return self.kdistill_tokenizers.key

    def hidden(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        decoder_input_ids: Tensor,
        decoder_attention_mask: Tensor | None = None,
    ) -> Tensor:
        """The decoder's final hidden states (B, T, H), scaled as the output layer reads
        them (T5 with tied embeddings scales by d_model ** -0.5)."""
        encoder = self.hf.get_encoder()
        decoder = self.hf.get_decoder()
        memory = encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        hidden = decoder(
            input_ids=decoder_input_ids,
            attention_mask=decoder_attention_mask,
            encoder_hidden_states=memory,
            encoder_attention_mask=attention_mask,
        ).last_hidden_state
        config = self.hf.config
        if getattr(config, "scale_decoder_outputs", False) or (
            config.model_type in ("t5", "mt5") and getattr(config, "tie_word_embeddings", False)
        ):
            hidden = hidden * (config.d_model**-0.5)
        return hidden

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        decoder_input_ids: Tensor,
        decoder_attention_mask: Tensor | None = None,
        head_loss: Any = None,
    ) -> Any:
        hidden = self.hidden(input_ids, attention_mask, decoder_input_ids, decoder_attention_mask)
        if head_loss is not None:
            return head_loss(hidden, self.head_weight, self.head_bias)
        weight = self.head_weight
        return F.linear(hidden.to(weight.dtype), weight, self.head_bias)

    @property
    def head_weight(self) -> Tensor:
        return self.hf.get_output_embeddings().weight

    @property
    def head_bias(self) -> Tensor | None:
        """The output layer's bias and the model's final logits bias (Marian, BART), summed."""
        bias = getattr(self.hf.get_output_embeddings(), "bias", None)
        final = getattr(self.hf, "final_logits_bias", None)
        if final is not None:
            final = final.reshape(-1)
            bias = final if bias is None else bias + final
        return bias

    @property
    def vocab_rows(self) -> int:
        return int(self.head_weight.shape[0])

    def layer_counts(self) -> tuple[int, int]:
        return layer_counts(self.hf.config)


def layer_counts(config: Any) -> tuple[int, int]:
    for encoder, decoder in LAYER_COUNTS:
        if hasattr(config, encoder):
            dec = getattr(config, decoder, None)
            return int(getattr(config, encoder)), int(
                dec if dec is not None else getattr(config, encoder)
            )
    raise ModelError(
        f"cannot tell the layer counts of a {config.model_type!r} model (no "
        + " or ".join(e for e, _ in LAYER_COUNTS)
        + " in its config); shrink works for Marian, BART, mBART, T5 and their kin"
    )


def _set_layer_counts(config: Any, encoder: int, decoder: int) -> None:
    for enc_key, dec_key in LAYER_COUNTS:
        if hasattr(config, enc_key):
            setattr(config, enc_key, encoder)
            setattr(config, dec_key, decoder)
            return


def build_model(
    spec: Seq2SeqModelSpec,
    tokenizers: Tokenizers,
    *,
    where: str,
    teacher: Seq2SeqLM | None = None,
) -> Seq2SeqLM:
    """The model `spec` names (see the module docstring)."""
    from transformers import AutoConfig, AutoModelForSeq2SeqLM

    if spec.shrink is not None:
        if teacher is None:
            raise ModelError(f"{where}.shrink: a shrunk student needs the run's teacher")
        return shrink(teacher, spec.shrink, where=f"{where}.shrink")
    if spec.path is not None:
        return load_pretrained(spec.path, tokenizers, where=f"{where}.path")
    assert spec.config is not None
    settings = dict(spec.config)
    kind = settings.pop("type")
    pad, eos = tokenizers.special("<pad>"), tokenizers.special("</s>")
    ids = {"pad_token_id": pad, "eos_token_id": eos, "decoder_start_token_id": pad}
    ids["vocab_size"] = tokenizers.source.get_vocab_size()
    if not tokenizers.joint:
        if kind != "marian":
            raise ModelError(
                f"{where}.config.type: {kind!r} shares one vocabulary between encoder and "
                "decoder, and data.tokenizer.joint is false; use type marian (which takes two) "
                "or a joint tokenizer"
            )
        ids["decoder_vocab_size"] = tokenizers.target.get_vocab_size()
        ids["share_encoder_decoder_embeddings"] = False
    clash = sorted(set(settings) & set(ids))
    if clash:
        raise ModelError(f"{where}.config: {', '.join(clash)} come from the tokenizer; remove them")
    try:
        config = AutoConfig.for_model(kind, **settings, **ids)
    except (ValueError, KeyError) as exc:
        raise ModelError(f"{where}.config.type: {exc}") from None
    if not getattr(config, "is_encoder_decoder", False):
        raise ModelError(
            f"{where}.config.type: {kind!r} is not an encoder-decoder model; the seq2seq task "
            "needs one (marian, bart, t5, ...)"
        )
    try:
        hf = AutoModelForSeq2SeqLM.from_config(config)
    except (ValueError, TypeError) as exc:
        raise ModelError(f"{where}.config: {exc}") from None
    return check_vocabulary(Seq2SeqLM(hf, tokenizers), where=where)


def load_pretrained(location: str | Path, tokenizers: Tokenizers, *, where: str) -> Seq2SeqLM:
    """A save_pretrained folder (or a hub id in the local cache); a tokenizer inside the
    folder is the model's own and replaces the run's."""
    from transformers import AutoModelForSeq2SeqLM

    try:
        with quiet_transformers():
            hf = AutoModelForSeq2SeqLM.from_pretrained(str(location), local_files_only=True)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(
            f"{where}: cannot load an encoder-decoder from {location!r} ({first}). Nothing is "
            "downloaded: give a folder written by save_pretrained, or a hub id already in the "
            "local Hugging Face cache"
        ) from None
    folder = Path(location).expanduser()
    own = (
        load_tokenizers(folder, where=where)
        if (folder / "tokenizer.json").is_file() or (folder / "source").is_dir()
        else tokenizers
    )
    return check_vocabulary(Seq2SeqLM(hf, own), where=where)


def check_vocabulary(model: Seq2SeqLM, *, where: str) -> Seq2SeqLM:
    """Refuse a model with fewer embedding or output rows than its tokenizers have
    tokens: some tokens would have no embedding, or no probability."""
    tokenizers = model.kdistill_tokenizers
    rows = {
        "source": int(model.hf.get_input_embeddings().weight.shape[0]),
        "target": model.vocab_rows,
    }
    for side, have in rows.items():
        need = (tokenizers.source if side == "source" else tokenizers.target).get_vocab_size()
        if have < need:
            layer = "input embedding" if side == "source" else "output layer"
            raise ModelError(
                f"{where}: the model's {layer} has {have} rows and the {side} tokenizer "
                f"{need} tokens, so some tokens have no row. Give the model its own tokenizer "
                "(a tokenizer.json in its folder) or the run the model's tokenizer "
                "(data.tokenizer.path)"
            )
    return model


def shrink(teacher: Seq2SeqLM, spec: ShrinkSpec, *, where: str) -> Seq2SeqLM:
    """The teacher with only the chosen layers (see the module docstring)."""
    from transformers import AutoModelForSeq2SeqLM

    config = copy.deepcopy(teacher.hf.config)
    counts = layer_counts(config)
    chosen: dict[str, list[int]] = {}
    for side, count, picked in zip(
        ("encoder", "decoder"), counts, (spec.encoder_layers, spec.decoder_layers)
    ):
        picked = list(range(count)) if picked is None else picked
        past = [i for i in picked if i >= count]
        if past:
            raise ModelError(
                f"{where}.{side}_layers: {', '.join(map(str, past))} is past the teacher's last "
                f"{side} layer; it has {count} ({side} layers 0-{count - 1})"
            )
        chosen[side] = picked
    _set_layer_counts(config, len(chosen["encoder"]), len(chosen["decoder"]))
    hf = AutoModelForSeq2SeqLM.from_config(config)
    if spec.init == "teacher":
        source = teacher.hf.state_dict()
        state = {}
        for key in hf.state_dict():
            state[key] = source[_teacher_key(key, chosen, source)].detach().clone()
        hf.load_state_dict(state)
    model = Seq2SeqLM(hf, teacher.kdistill_tokenizers)
    model.kdistill_shrunk = {  # type: ignore[assignment]
        "encoder_layers": chosen["encoder"],
        "decoder_layers": chosen["decoder"],
        "init": spec.init,
    }
    return model


def _teacher_key(key: str, chosen: dict[str, list[int]], source: dict[str, Tensor]) -> str:
    """The teacher's parameter a student parameter copies: layer i of a side is the
    teacher's chosen[side][i]; T5's relative position bias lives in the first block of
    each stack, so a first block copied from another keeps the teacher's first block's."""
    match = _LAYER_KEY.match(key)
    if match is None:
        return key
    prefix, container, index, rest = match.groups()
    side = "decoder" if prefix.endswith("decoder") else "encoder"
    mapped = f"{prefix}.{container}.{chosen[side][int(index)]}.{rest}"
    return mapped if mapped in source else key


def weights_fingerprint(model: Seq2SeqLM) -> str:
    """sha256 over the model's parameters and buffers (names, shapes, bytes)."""
    import hashlib

    digest = hashlib.sha256()
    for name, tensor in sorted(model.hf.state_dict().items()):
        digest.update(name.encode())
        data = tensor.detach().to("cpu").contiguous()
        digest.update(str(tuple(data.shape)).encode())
        digest.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return digest.hexdigest()
