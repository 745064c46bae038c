"""Small non-transformer text classifiers, the classic students of a BERT teacher.

Both take `forward(input_ids (B, T), attention_mask (B, T) | None) -> logits (B, C)`,
where the mask is 1 for tokens and 0 for padding, so they run on the teacher's
tokenizer output. Padding never changes a sentence's logits.

Embeddings: `embedding_init` (a `(vocab_size, dim)` tensor, e.g. the teacher's token
embedding matrix from `kdistill.models.hf.token_embedding_matrix`) is copied in, and
the embedding dimension is then the tensor's (no projection: a smaller student
dimension means a random embedding). `freeze_embedding` keeps it fixed (its weight
has `requires_grad=False`; give the optimizer only trainable parameters).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

DEFAULT_EMBEDDING_DIM = 128  # the papers use 300-d word2vec; smaller trains faster on CPU


def _embedding(
    vocab_size: int,
    embedding_dim: int | None,
    embedding_init: torch.Tensor | None,
    freeze_embedding: bool,
) -> nn.Embedding:
    if not isinstance(vocab_size, int) or vocab_size < 1:
        raise ValueError(f"vocab_size must be a positive int; got {vocab_size!r}")
    if embedding_init is None:
        if freeze_embedding:
            raise ValueError(
                "freeze_embedding is true but there is no embedding_init: a frozen random "
                "embedding cannot learn; give embedding_init or set freeze_embedding false"
            )
        dim = DEFAULT_EMBEDDING_DIM if embedding_dim is None else embedding_dim
        if not isinstance(dim, int) or dim < 1:
            raise ValueError(f"embedding_dim must be a positive int; got {dim!r}")
        return nn.Embedding(vocab_size, dim)
    if embedding_init.ndim != 2 or embedding_init.shape[0] != vocab_size:
        raise ValueError(
            f"embedding_init must have shape (vocab_size={vocab_size}, dim); got "
            f"{tuple(embedding_init.shape)}; the student must use the tokenizer the matrix belongs to"
        )
    if embedding_dim is not None and embedding_dim != embedding_init.shape[1]:
        raise ValueError(
            f"embedding_dim {embedding_dim} differs from embedding_init's dimension "
            f"{embedding_init.shape[1]}; leave embedding_dim unset to use the matrix's"
        )
    return nn.Embedding.from_pretrained(
        embedding_init.detach().clone().float(), freeze=freeze_embedding
    )


def _right_padded_lengths(
    input_ids: torch.Tensor, attention_mask: torch.Tensor | None, model: str
) -> torch.Tensor:
    """Tokens per row `(B,)`, checking that padding comes only at the end of each row."""
    batch, length = input_ids.shape
    if attention_mask is None:
        return torch.full((batch,), length, dtype=torch.long, device=input_ids.device)
    lengths = attention_mask.bool().sum(dim=1)
    positions = torch.arange(length, device=input_ids.device)
    if not torch.equal(attention_mask.bool(), positions < lengths[:, None]):
        raise ValueError(
            f"{model} needs right-padded batches (mask 1...1 0...0 in each row); set the "
            "tokenizer's padding_side to 'right'"
        )
    # a fully padded row is read as one token, so it gives finite logits rather than NaN
    return lengths.clamp(min=1)


class BiLSTMClassifier(nn.Module):
    """Tang et al. 2019, "Distilling Task-Specific Knowledge from BERT into Simple Neural
    Networks": embedding → one-layer BiLSTM → concatenated final forward and backward
    states (`pooling="last"`, the paper) or the masked max over time of the outputs
    (`pooling="max"`) → ReLU layer → logits.

    Batches must be right-padded (what BERT tokenizers do), since the LSTM reads the
    first `mask.sum()` tokens of each row.
    """

    def __init__(
        self,
        *,
        vocab_size: int,
        num_classes: int,
        embedding_dim: int | None = None,
        hidden_size: int = 150,
        mlp_hidden: int = 200,
        pooling: str = "last",
        dropout: float = 0.0,
        embedding_init: torch.Tensor | None = None,
        freeze_embedding: bool = False,
    ) -> None:
        super().__init__()
        if pooling not in ("last", "max"):
            raise ValueError(f"pooling must be 'last' or 'max'; got {pooling!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1); got {dropout}")
        self.pooling = pooling
        self.embedding = _embedding(vocab_size, embedding_dim, embedding_init, freeze_embedding)
        self.lstm = nn.LSTM(
            self.embedding.embedding_dim, hidden_size, batch_first=True, bidirectional=True
        )
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Sequential(
            nn.Linear(2 * hidden_size, mlp_hidden), nn.ReLU(), nn.Linear(mlp_hidden, num_classes)
        )

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        if _exporting():
            return self._traceable(input_ids, attention_mask)
        lengths = _right_padded_lengths(input_ids, attention_mask, "bilstm")  # (B,)
        x = self.dropout(self.embedding(input_ids))  # (B, T, E)
        packed = pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
        outputs, (h_n, _) = self.lstm(packed)  # h_n: (2, B, H), forward then backward
        if self.pooling == "last":
            pooled = torch.cat([h_n[0], h_n[1]], dim=-1)  # (B, 2H)
        else:
            out, _ = pad_packed_sequence(
                outputs, batch_first=True, padding_value=float("-inf")
            )  # (B, T', 2H), T' = longest row
            pooled = out.max(dim=1).values
        return self.classifier(self.dropout(pooled))  # (B, C)

    def _traceable(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None
    ) -> torch.Tensor:
        """The same function without packed sequences, which ONNX exporters cannot trace.

        The forward direction reads the right-padded rows as they are: padding comes
        after a row's tokens, so it cannot change their outputs. The backward direction
        reads the rows shifted right until they end at the last position (padding
        first): it then meets a row's tokens from the last to the first before any
        padding. Two LSTM calls instead of one; used only while exporting."""
        batch, length = input_ids.shape
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        lengths = attention_mask.long().sum(dim=1).clamp(min=1)  # (B,)
        x = self.embedding(input_ids)  # (B, T, E)
        hidden = self.lstm.hidden_size
        positions = torch.arange(length, device=x.device)[None, :]  # (1, T)
        shift = (length - lengths)[:, None]  # (B, 1): where each shifted row starts
        forward_out = self.lstm(x)[0][..., :hidden]  # (B, T, H), valid for t < L
        source = (positions - shift).clamp(min=0)  # shifted position s reads token s - shift
        shifted = x.gather(1, source[..., None].expand(-1, -1, x.shape[-1]))
        shifted = shifted * (positions >= shift)[..., None]
        backward_out = self.lstm(shifted)[0][..., hidden:]  # valid for s >= shift
        if self.pooling == "last":
            rows = torch.arange(batch, device=x.device)
            pooled = torch.cat(
                [forward_out[rows, lengths - 1], backward_out[rows, shift[:, 0]]], dim=-1
            )
        else:
            back = backward_out.gather(
                1, (positions + shift).clamp(max=length - 1)[..., None].expand(-1, -1, hidden)
            )  # token t's backward output, at shifted position t + shift
            both = torch.cat([forward_out, back], dim=-1)
            pooled = both.masked_fill((positions >= lengths[:, None])[..., None], float("-inf"))
            pooled = pooled.max(dim=1).values
        return self.classifier(pooled)  # (B, C); dropout is the identity in eval


def _exporting() -> bool:
    """Whether an ONNX exporter (dynamo or TorchScript) is tracing the model now."""
    return bool(torch.compiler.is_exporting() or torch.onnx.is_in_onnx_export())


class TextCNN(nn.Module):
    """Kim 2014, "Convolutional Neural Networks for Sentence Classification": embedding →
    convolutions of each width (ReLU) → max over time → dropout → linear.

    Padding embeddings are zeroed and each row is extended with zeros, so a window
    starting at any real token exists and sees zeros past the sentence end, whatever the
    batch's padding; windows starting on padding are excluded from the max. The paper's
    max-norm constraint on the last layer is left out.
    """

    def __init__(
        self,
        *,
        vocab_size: int,
        num_classes: int,
        embedding_dim: int | None = None,
        widths: Sequence[int] = (3, 4, 5),
        filters: int = 100,
        dropout: float = 0.5,
        embedding_init: torch.Tensor | None = None,
        freeze_embedding: bool = False,
    ) -> None:
        super().__init__()
        if not widths or any(not isinstance(w, int) or w < 1 for w in widths):
            raise ValueError(f"widths must be a non-empty list of positive ints; got {widths!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1); got {dropout}")
        self.embedding = _embedding(vocab_size, embedding_dim, embedding_init, freeze_embedding)
        dim = self.embedding.embedding_dim
        self.widths = tuple(widths)
        self.convs = nn.ModuleList(nn.Conv1d(dim, filters, width) for width in widths)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(filters * len(widths), num_classes)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        valid = attention_mask.bool()  # (B, T)
        first = torch.zeros_like(valid)
        first[:, 0] = True
        valid = valid | (first & ~valid.any(dim=1, keepdim=True))  # an empty row keeps window 0
        x = self.embedding(input_ids) * attention_mask[..., None].to(self.embedding.weight.dtype)
        x = x.transpose(1, 2)  # (B, E, T)
        pooled = []
        for width, conv in zip(self.widths, self.convs):
            out = F.relu(conv(F.pad(x, (0, width - 1))))  # (B, F, T): window t covers t..t+w-1
            out = out.masked_fill(~valid[:, None, :], float("-inf"))
            pooled.append(out.max(dim=2).values)  # (B, F)
        return self.classifier(self.dropout(torch.cat(pooled, dim=1)))  # (B, C)


def bilstm(
    *,
    vocab_size: int,
    num_classes: int,
    embedding_dim: int | None = None,
    hidden_size: int = 150,
    mlp_hidden: int = 200,
    pooling: str = "last",
    dropout: float = 0.0,
    embedding_init: torch.Tensor | None = None,
    freeze_embedding: bool = False,
) -> BiLSTMClassifier:
    """Tang et al. 2019 BiLSTM student (their SST-2 sizes: 150 units per direction, ReLU
    layer of 200); see `BiLSTMClassifier`."""
    return BiLSTMClassifier(
        vocab_size=vocab_size,
        num_classes=num_classes,
        embedding_dim=embedding_dim,
        hidden_size=hidden_size,
        mlp_hidden=mlp_hidden,
        pooling=pooling,
        dropout=dropout,
        embedding_init=embedding_init,
        freeze_embedding=freeze_embedding,
    )


def textcnn(
    *,
    vocab_size: int,
    num_classes: int,
    embedding_dim: int | None = None,
    widths: Sequence[int] = (3, 4, 5),
    filters: int = 100,
    dropout: float = 0.5,
    embedding_init: torch.Tensor | None = None,
    freeze_embedding: bool = False,
) -> TextCNN:
    """Kim 2014 CNN student (widths 3, 4, 5 × 100 filters, dropout 0.5); see `TextCNN`."""
    return TextCNN(
        vocab_size=vocab_size,
        num_classes=num_classes,
        embedding_dim=embedding_dim,
        widths=tuple(widths),
        filters=filters,
        dropout=dropout,
        embedding_init=embedding_init,
        freeze_embedding=freeze_embedding,
    )
