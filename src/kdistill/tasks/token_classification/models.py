"""Token-classification models: a Hugging Face encoder with a per-token head (`hf`,
`hf_student`) or the zoo's BiLSTM tagger (`bilstm`). Each returns logits (B, T, C)
per token and carries its tokenizer (`kdistill_tokenizer`, `kdistill_tokenizer_key`),
as the text classifiers do.

    hf           args: location, reset_head, attn_implementation
    hf_student   args: location (a pretrained encoder, or "teacher": the recipe's
                 teacher as this run trained or loaded it), num_layers, layers,
                 hidden_size, intermediate_size, num_heads, init (as for classification)
    bilstm       args: embedding_dim (100), hidden_size (128), num_layers (1),
                 dropout (0.3), vocab_min_freq (1), vocab_size (50000): words of the
                 training sentences, case kept (capitals matter for names)
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from kdistill.errors import ModelError
from kdistill.models.hf import HFClassifier
from kdistill.recipe import ModelSpec
from kdistill.tasks.encoder import carry, hf_encoder
from kdistill.tasks.token_classification.data import TaggedSentences, WordVocab


class BiLSTMTagger(nn.Module):
    """Word embeddings, a bidirectional LSTM, a linear layer per word (Lample et al.
    2016 without the CRF and character features)."""

    def __init__(
        self,
        vocab_size: int,
        num_labels: int,
        *,
        embedding_dim: int = 100,
        hidden_size: int = 128,
        num_layers: int = 1,
        dropout: float = 0.3,
    ) -> None:
        super().__init__()
        if min(vocab_size, num_labels, embedding_dim, hidden_size, num_layers) < 1:
            raise ValueError("sizes must be positive")
        if not 0 <= dropout < 1:
            raise ValueError(f"dropout must be in [0, 1); got {dropout}")
        self.embedding = nn.Embedding(vocab_size, embedding_dim, padding_idx=0)
        self.lstm = nn.LSTM(
            embedding_dim,
            hidden_size,
            num_layers=num_layers,
            batch_first=True,
            bidirectional=True,
            dropout=dropout if num_layers > 1 else 0.0,
        )
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(2 * hidden_size, num_labels)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        x = self.dropout(self.embedding(input_ids))  # (B, T, E)
        if attention_mask is not None:
            lengths = attention_mask.sum(1).clamp(min=1).cpu()
            packed = nn.utils.rnn.pack_padded_sequence(
                x, lengths, batch_first=True, enforce_sorted=False
            )
            out, _ = self.lstm(packed)
            h, _ = nn.utils.rnn.pad_packed_sequence(
                out, batch_first=True, total_length=input_ids.shape[1]
            )
        else:
            h, _ = self.lstm(x)
        return self.head(self.dropout(h))  # (B, T, C)


def make_tagger(
    data: TaggedSentences, spec: ModelSpec, *, where: str, teacher: nn.Module | None = None
) -> nn.Module:
    """The model `spec` names, with a head of the data's labels."""
    args: dict[str, Any] = dict(spec.args)
    if spec.name in ("hf", "hf_student"):
        return hf_encoder(
            spec,
            head="token",
            num_labels=data.num_labels,
            where=where,
            teacher=teacher,
            labels=data.label_names,
            check=lambda source, reset: _check_labels(source, data, where, trained_head=not reset),
        )
    if spec.name == "bilstm":
        if spec.tokenizer not in (None, "vocab"):
            raise ModelError(
                f"{where}.tokenizer: the BiLSTM tagger reads whole words (its vocabulary of "
                "the training words); remove `tokenizer`"
            )
        vocab = WordVocab.build(
            data.train.words,
            min_freq=int(args.pop("vocab_min_freq", 1)),
            max_size=int(args.pop("vocab_size", 50000)),
        )
        try:
            model = BiLSTMTagger(len(vocab), data.num_labels, **args)
        except (TypeError, ValueError) as exc:
            raise ModelError(f"{where}.args: {exc}") from None
        setattr(model, "label_names", list(data.label_names))  # noqa: B010
        return carry(model, vocab, vocab.key)
    raise ModelError(
        f"{where}.name: {spec.name!r} is not a token-classification model; use hf, "
        "hf_student or bilstm"
    )


def _check_labels(model: HFClassifier, data: TaggedSentences, where: str, *, trained_head: bool):
    """A checkpoint whose token head was trained on other labels is refused: its outputs
    would be read as the wrong tags."""
    config = model.hf.config
    architectures = config.architectures or []
    if not trained_head or not any(a.endswith("ForTokenClassification") for a in architectures):
        return
    names = [str(config.id2label[i]) for i in range(config.num_labels)]
    generic = all(name == f"LABEL_{i}" for i, name in enumerate(names))
    if names != data.label_names and not generic:
        raise ModelError(
            f"{where}: the checkpoint's token head predicts {', '.join(names)}, but the data's "
            f"labels are {', '.join(data.label_names)}; use a checkpoint trained on these "
            "labels, or set reset_head: true to train a fresh head"
        )


def word_logits(token_logits: torch.Tensor, first: torch.Tensor) -> torch.Tensor:
    """(B, T, C) logits per token -> (B, W, C) per word, read at each word's first
    token (`first`, -1 for none: those rows are garbage and must be masked)."""
    index = first.clamp(min=0).unsqueeze(-1).expand(-1, -1, token_logits.shape[-1])
    return token_logits.gather(1, index)


def forward_words(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """A model's word logits (B, W, C) on a batch of `TaggedSentences.batch`."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    return word_logits(logits, batch["first"])
