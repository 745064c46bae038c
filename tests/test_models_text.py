"""BiLSTM and TextCNN students: shapes, padding, naive references, embeddings, gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from kdistill.models.text import bilstm, textcnn

VOCAB = 50


def right_padded(lengths: list[int], width: int, *, pad_id: int = 0, seed: int = 0):
    """Random token ids `(B, width)` with each row's tokens first, then `pad_id`."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (len(lengths), width), generator=generator)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, length in enumerate(lengths):
        mask[row, :length] = 1
        ids[row, length:] = pad_id
    return ids, mask


def pad_more(
    ids: torch.Tensor, mask: torch.Tensor, extra: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Append `extra` padding positions holding arbitrary (non-zero) token ids."""
    junk = torch.randint(
        1, VOCAB, (ids.shape[0], extra), generator=torch.Generator().manual_seed(9)
    )
    return torch.cat([ids, junk], 1), torch.cat([mask, torch.zeros_like(junk)], 1)


def naive_bilstm(model, tokens: torch.Tensor) -> torch.Tensor:
    """One unpadded sentence `(L,)`: the LSTM run on exactly its tokens."""
    x = model.embedding(tokens)[None]  # (1, L, E)
    out, _ = model.lstm(x)  # (1, L, 2H)
    hidden = model.lstm.hidden_size
    if model.pooling == "last":
        pooled = torch.cat([out[0, -1, :hidden], out[0, 0, hidden:]])  # forward end, backward start
    else:
        pooled = out[0].max(dim=0).values
    return model.classifier(pooled)


def naive_textcnn(model, tokens: torch.Tensor) -> torch.Tensor:
    """One unpadded sentence `(L,)`, windows written out: every window that starts on a token,
    with zero vectors past the end (Kim's zero padding)."""
    emb = model.embedding.weight[tokens]  # (L, E)
    features = []
    for conv in model.convs:
        width = conv.kernel_size[0]
        padded = torch.cat([emb, emb.new_zeros(width - 1, emb.shape[1])])
        windows = []
        for start in range(len(tokens)):
            window = padded[start : start + width]  # (w, E)
            # conv weight (F, E, w): sum over e, k of W[f, e, k] * x[k, e]
            windows.append(torch.einsum("fek,ke->f", conv.weight, window) + conv.bias)
        features.append(torch.relu(torch.stack(windows)).max(dim=0).values)
    return model.classifier(torch.cat(features))


FACTORIES = {
    "bilstm_last": lambda **kw: bilstm(hidden_size=12, mlp_hidden=10, pooling="last", **kw),
    "bilstm_max": lambda **kw: bilstm(hidden_size=12, mlp_hidden=10, pooling="max", **kw),
    "textcnn": lambda **kw: textcnn(widths=(2, 3, 5), filters=6, **kw),
}
NAIVE = {"bilstm_last": naive_bilstm, "bilstm_max": naive_bilstm, "textcnn": naive_textcnn}


@pytest.mark.parametrize("name", FACTORIES)
def test_logits_match_a_per_sentence_reference(name: str) -> None:
    torch.manual_seed(0)
    model = FACTORIES[name](vocab_size=VOCAB, num_classes=3, embedding_dim=8).eval()
    lengths = [7, 1, 4, 2]  # 1 and 2 are shorter than the widest filter
    ids, mask = right_padded(lengths, 7)
    with torch.no_grad():
        logits = model(ids, mask)
        expected = torch.stack([NAIVE[name](model, ids[row, :n]) for row, n in enumerate(lengths)])
    assert logits.shape == (4, 3)
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", FACTORIES)
def test_padding_does_not_change_logits(name: str) -> None:
    torch.manual_seed(0)
    model = FACTORIES[name](vocab_size=VOCAB, num_classes=2).eval()
    ids, mask = right_padded([5, 3, 8], 8)
    longer_ids, longer_mask = pad_more(ids, mask, 6)
    with torch.no_grad():
        torch.testing.assert_close(model(ids, mask), model(longer_ids, longer_mask))
        # no mask means every position is a token
        full_ids, full_mask = right_padded([8, 8], 8)
        torch.testing.assert_close(model(full_ids), model(full_ids, full_mask))


@pytest.mark.parametrize("name", FACTORIES)
def test_fully_padded_row_gives_finite_logits(name: str) -> None:
    model = FACTORIES[name](vocab_size=VOCAB, num_classes=2).eval()
    ids, mask = right_padded([4, 0], 6)
    with torch.no_grad():
        assert torch.isfinite(model(ids, mask)).all()


@pytest.mark.parametrize("name", FACTORIES)
@pytest.mark.parametrize("freeze", [False, True])
def test_embedding_init_is_copied_and_optionally_frozen(name: str, freeze: bool) -> None:
    torch.manual_seed(0)
    matrix = torch.randn(VOCAB, 6)
    model = FACTORIES[name](
        vocab_size=VOCAB, num_classes=2, embedding_init=matrix, freeze_embedding=freeze
    )
    assert model.embedding.weight.shape == (VOCAB, 6)
    torch.testing.assert_close(model.embedding.weight, matrix, rtol=0, atol=0)
    matrix.add_(1.0)  # a copy, not a view of the teacher's matrix
    assert not torch.equal(model.embedding.weight, matrix)
    ids, mask = right_padded([4, 2], 5)
    model(ids, mask).sum().backward()
    assert model.embedding.weight.requires_grad is not freeze
    assert (model.embedding.weight.grad is None) is freeze
    for param in model.parameters():
        if param.requires_grad:
            assert param.grad is not None and torch.isfinite(param.grad).all()


@pytest.mark.parametrize("name", FACTORIES)
def test_gradients_match_finite_differences(name: str) -> None:
    torch.manual_seed(0)
    model = FACTORIES[name](vocab_size=8, num_classes=2, embedding_dim=3).double().eval()
    ids, mask = right_padded([4, 2], 4)
    ids = ids % 8  # a small vocabulary keeps gradcheck's finite differences few
    params = dict(model.named_parameters())

    def logits_of(embedding: torch.Tensor, head: torch.Tensor) -> torch.Tensor:
        tensors = {**params, "embedding.weight": embedding}
        key = "classifier.2.weight" if name.startswith("bilstm") else "classifier.weight"
        tensors[key] = head
        return functional_call(model, tensors, (ids, mask))

    key = "classifier.2.weight" if name.startswith("bilstm") else "classifier.weight"
    inputs = (params["embedding.weight"].detach().clone(), params[key].detach().clone())
    assert torch.autograd.gradcheck(logits_of, [t.requires_grad_() for t in inputs])


def test_bilstm_training_step_lowers_the_loss() -> None:
    torch.manual_seed(0)
    model = bilstm(vocab_size=VOCAB, num_classes=2, hidden_size=8, mlp_hidden=8)
    ids, mask = right_padded([5, 3, 6, 2], 6)
    labels = torch.tensor([0, 1, 1, 0])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    losses = []
    for _ in range(3):
        loss = F.cross_entropy(model(ids, mask), labels)
        losses.append(loss.item())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert losses[-1] < losses[0]


def test_defaults_follow_the_papers() -> None:
    lstm = bilstm(vocab_size=VOCAB, num_classes=2)
    assert (lstm.lstm.hidden_size, lstm.lstm.bidirectional, lstm.lstm.num_layers) == (150, True, 1)
    assert lstm.classifier[0].out_features == 200
    cnn = textcnn(vocab_size=VOCAB, num_classes=2)
    assert [c.kernel_size[0] for c in cnn.convs] == [3, 4, 5]
    assert all(c.out_channels == 100 for c in cnn.convs) and cnn.dropout.p == 0.5


def test_bad_options_are_refused() -> None:
    matrix = torch.zeros(VOCAB, 6)
    with pytest.raises(ValueError, match=r"must have shape \(vocab_size=40, dim\)"):
        bilstm(vocab_size=40, num_classes=2, embedding_init=matrix)
    with pytest.raises(ValueError, match="embedding_dim 8 differs"):
        textcnn(vocab_size=VOCAB, num_classes=2, embedding_init=matrix, embedding_dim=8)
    with pytest.raises(ValueError, match="frozen random embedding"):
        textcnn(vocab_size=VOCAB, num_classes=2, freeze_embedding=True)
    with pytest.raises(ValueError, match="pooling must be"):
        bilstm(vocab_size=VOCAB, num_classes=2, pooling="mean")
    with pytest.raises(ValueError, match="widths"):
        textcnn(vocab_size=VOCAB, num_classes=2, widths=[])
    with pytest.raises(ValueError, match="dropout"):
        textcnn(vocab_size=VOCAB, num_classes=2, dropout=1.0)


def test_bilstm_refuses_left_padding_with_the_fix() -> None:
    model = bilstm(vocab_size=VOCAB, num_classes=2)
    ids, mask = right_padded([3, 5], 5)
    with pytest.raises(ValueError, match="padding_side to 'right'"):
        model(ids, mask.flip(1))


@pytest.mark.parametrize("name", ["bilstm_last", "bilstm_max"])
def test_the_bilstm_export_path_computes_the_packed_one(name: str) -> None:
    """The path ONNX exporters trace (no packed sequences) gives the logits of the
    packed one, row by row, whatever the padding."""
    torch.manual_seed(0)
    model = FACTORIES[name](vocab_size=VOCAB, num_classes=3, embedding_dim=8).eval()
    ids, mask = pad_more(*right_padded([7, 1, 4, 2, 0], 7), extra=3)
    with torch.no_grad():
        packed = model(ids, mask)
        traced = model._traceable(ids, mask)
        per_row = torch.stack(
            [naive_bilstm(model, ids[i, : max(1, int(mask[i].sum()))]) for i in range(4)]
        )
    torch.testing.assert_close(traced, packed, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(traced[:4], per_row, rtol=1e-5, atol=1e-6)
