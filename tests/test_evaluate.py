import math

import pytest
import torch
from torch import nn

from kdistill.errors import DataError, KdistillError
from kdistill.evaluate import cost, latency_of_requests, predict, quality

# Four samples, two classes, probabilities chosen so every number is checkable by hand.
PROBS = torch.tensor([[0.95, 0.05], [0.15, 0.85], [0.75, 0.25], [0.35, 0.65]])
LABELS = torch.tensor(
    [0, 1, 1, 0]
)  # first two right (conf 0.95, 0.85), last two wrong (0.75, 0.65)
LOGITS = PROBS.log()


def naive_ece(logits: torch.Tensor, labels: torch.Tensor, n_bins: int) -> float:
    probs = logits.double().softmax(dim=1)
    total = 0.0
    for b in range(n_bins):
        lo, hi = b / n_bins, (b + 1) / n_bins
        members = [
            i
            for i in range(len(labels))
            if lo < probs[i].max() <= hi or (b == 0 and probs[i].max() == 0)
        ]
        if members:
            acc = sum(float(probs[i].argmax() == labels[i]) for i in members) / len(members)
            conf = sum(float(probs[i].max()) for i in members) / len(members)
            total += len(members) / len(labels) * abs(acc - conf)
    return total


def test_quality_hand_computed():
    q = quality(LOGITS, LABELS)
    assert q["accuracy"] == pytest.approx(0.5)
    assert q["errors"] == 2 and isinstance(q["errors"], int)
    expected_nll = -(math.log(0.95) + math.log(0.85) + math.log(0.25) + math.log(0.35)) / 4
    assert q["nll"] == pytest.approx(expected_nll)
    # 15 bins: each sample alone in its bin -> (0.05 + 0.15 + 0.75 + 0.65) / 4
    assert q["ece"] == pytest.approx(0.4)
    assert "agreement" not in q


def test_quality_ece_bins():
    # One bin: |accuracy - mean confidence| = |0.5 - 0.8|
    assert quality(LOGITS, LABELS, n_bins=1)["ece"] == pytest.approx(0.3)
    # Five bins: (0.8, 1] holds the right ones (accuracy 1, confidence 0.9),
    # (0.6, 0.8] the wrong ones (accuracy 0, confidence 0.7).
    assert quality(LOGITS, LABELS, n_bins=5)["ece"] == pytest.approx(0.5 * 0.1 + 0.5 * 0.7)


def test_quality_ece_matches_naive_reference():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(200, 7, generator=generator) * 3
    labels = torch.randint(0, 7, (200,), generator=generator)
    for n_bins in (1, 10, 15):
        assert quality(logits, labels, n_bins=n_bins)["ece"] == pytest.approx(
            naive_ece(logits, labels, n_bins)
        )


def test_quality_perfect_and_calibrated():
    logits = torch.tensor([[20.0, 0.0], [0.0, 20.0]])
    q = quality(logits, torch.tensor([0, 1]))
    assert q["accuracy"] == 1.0 and q["errors"] == 0
    assert q["nll"] == pytest.approx(0.0, abs=1e-8)
    assert q["ece"] == pytest.approx(0.0, abs=1e-8)


def test_quality_agreement():
    teacher = torch.tensor([[2.0, 1.0], [0.0, 1.0], [3.0, 0.0], [5.0, 1.0]])  # top-1: 0, 1, 0, 0
    # student top-1: 0, 1, 0, 1 -> agrees on 3 of 4, whatever the labels
    assert quality(LOGITS, LABELS, teacher_logits=teacher)["agreement"] == pytest.approx(0.75)
    assert quality(LOGITS, LABELS, teacher_logits=LOGITS)["agreement"] == 1.0


def test_quality_empty_is_clear_error():
    with pytest.raises(DataError, match="0 samples"):
        quality(torch.empty(0, 3), torch.empty(0, dtype=torch.long))
    assert issubclass(DataError, KdistillError)


@pytest.mark.parametrize(
    ("logits", "labels", "teacher", "match"),
    [
        (torch.zeros(4), LABELS, None, "logits must have shape"),
        (LOGITS, LABELS[:3], None, "labels must have shape"),
        (LOGITS, torch.tensor([0, 1, 2, 0]), None, "labels must lie in"),
        (LOGITS, LABELS, torch.zeros(4, 3), "teacher_logits must have"),
    ],
)
def test_quality_bad_inputs(logits, labels, teacher, match):
    with pytest.raises(ValueError, match=match):
        quality(logits, labels, teacher_logits=teacher)


def test_predict_matches_forward_and_restores_mode():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Dropout(0.5), nn.Linear(8, 3))
    model.train()
    x = torch.randn(10, 6, dtype=torch.float64)
    logits = predict(model, x, to_input=lambda b: b.float(), batch_size=3, device="cpu")
    assert logits.shape == (10, 3) and logits.dtype == torch.float32
    assert model.training
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(logits, model(x.float()))


def test_predict_in_given_order_returns_logits_in_input_order():
    torch.manual_seed(0)
    model = nn.Linear(6, 3).eval()
    x = torch.randn(11, 6)
    seen = []

    def to_input(rows):
        seen.append(rows.clone())
        return rows

    order = torch.randperm(11, generator=torch.Generator().manual_seed(1))
    logits = predict(model, x, to_input=to_input, batch_size=4, device="cpu", order=order)
    torch.testing.assert_close(torch.cat(seen), x[order])  # ran in `order`
    with torch.no_grad():
        torch.testing.assert_close(logits, model(x))  # came back in x's order


def test_predict_mapping_input_and_logits_attribute():
    class Wrapped(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(4, 2)

        def forward(self, features, scale):
            return type("Output", (), {"logits": self.linear(features) * scale})()

    model = Wrapped().eval()
    x = torch.randn(5, 4)
    logits = predict(
        model, x, to_input=lambda b: {"features": b, "scale": 2.0}, batch_size=2, device="cpu"
    )
    assert not model.training
    with torch.no_grad():
        torch.testing.assert_close(logits, model.linear(x) * 2.0)


def test_predict_empty_is_clear_error():
    with pytest.raises(DataError, match="0 samples"):
        predict(
            nn.Linear(2, 2), torch.empty(0, 2), to_input=lambda b: b, batch_size=4, device="cpu"
        )


def test_cost_linear():
    model = nn.Linear(10, 5)
    model.train()
    c = cost(model, input_shape=(10,), device="cpu", batch_size=8, repeats=3, warmup=1)
    assert c["params"] == 10 * 5 + 5
    # FlopCounterMode counts the matmul, 2 FLOPs per multiply-add, and not the bias add.
    assert c["flops"] == 2 * 10 * 5
    assert c["size_bytes"] > c["params"] * 4  # weights plus the safetensors header
    assert c["latency_ms"] > 0
    assert c["latency_ms_per_sample"] == pytest.approx(c["latency_ms"] / 8)
    assert c["batch_size"] == 8
    assert c["device"] == "cpu"
    assert c["threads"] == torch.get_num_threads()
    assert model.training


def test_cost_single_sample_latency_runs_each_text_unpadded():
    """latency_ms_single times one input at a time; a text is cut to its attention
    mask, so each forward sees that text's own length."""

    class Recorder(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(10, 4)
            self.widths: list[tuple[int, ...]] = []

        def forward(self, input_ids, attention_mask):
            self.widths.append(tuple(input_ids.shape))
            return self.embed(input_ids).sum(1)

    ids = torch.tensor([[1, 2, 3, 0, 0], [4, 5, 6, 7, 8], [9, 0, 0, 0, 0]])
    mask = (ids != 0).long()
    model = Recorder()
    c = cost(
        model,
        example_input={"input_ids": ids, "attention_mask": mask},
        device="cpu",
        repeats=2,
        warmup=1,
        single=3,
    )
    assert c["latency_ms_single"] > 0
    # after the FLOP count, the warm-up and the 2 timed batches: 1 warm-up of the first
    # text alone, then each text once at its own length
    assert model.widths[-4:] == [(1, 3), (1, 3), (1, 5), (1, 1)]
    assert (
        cost(
            model,
            example_input={"input_ids": ids, "attention_mask": mask},
            device="cpu",
            repeats=1,
            warmup=0,
        )["latency_ms_single"]
        is None
    )


def test_latency_of_requests_runs_each_request_once_as_one_batch():
    """A request (a question's windows, say) is one forward pass of all its rows; the
    median is over the requests, after warm-up passes of the first."""

    class Recorder(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(10, 4)
            self.shapes: list[tuple[int, ...]] = []

        def forward(self, input_ids):
            self.shapes.append(tuple(input_ids.shape))
            return self.embed(input_ids).sum(1)

    model = Recorder()
    model.train()
    requests = [
        {"input_ids": torch.ones(3, 5, dtype=torch.long)},
        {"input_ids": torch.ones(1, 2, dtype=torch.long)},
    ]
    ms = latency_of_requests(model, requests, device="cpu", warmup=2)
    assert ms > 0
    assert model.shapes == [(3, 5), (3, 5), (3, 5), (1, 2)]
    assert model.training  # put back as it was
    with pytest.raises(ValueError, match="at least one request"):
        latency_of_requests(model, [], device="cpu")


def test_cost_integer_example_input_and_tied_weights():
    class TinyLM(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(20, 4)
            self.head = nn.Linear(4, 20, bias=False)
            self.head.weight = self.embed.weight  # tied: counted and stored once

        def forward(self, ids):
            return self.head(self.embed(ids))

    tokens = torch.randint(0, 20, (3, 7))
    c = cost(TinyLM(), device="cpu", example_input=tokens, repeats=2, warmup=0)
    assert c["params"] == 20 * 4
    assert c["batch_size"] == 3
    assert c["flops"] == 2 * 7 * 4 * 20  # per sample: 7 tokens through the head
    assert 20 * 4 * 4 < c["size_bytes"] < 2 * 20 * 4 * 4


def test_cost_leaves_global_rng_alone():
    model = nn.Linear(3, 2)  # built first: initialisation draws from the global RNG
    torch.manual_seed(1)
    expected = torch.rand(3)
    torch.manual_seed(1)
    cost(model, input_shape=(3,), device="cpu", batch_size=4, repeats=1)
    torch.testing.assert_close(torch.rand(3), expected)


def test_cost_needs_an_input():
    with pytest.raises(ValueError, match="input_shape or example_input"):
        cost(nn.Linear(3, 2), device="cpu")
    with pytest.raises(ValueError, match="does not match"):
        cost(nn.Linear(3, 2), input_shape=(4,), example_input=torch.zeros(2, 3), device="cpu")
