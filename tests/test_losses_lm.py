"""LM losses: naive full-logits references, chunked == naive, top-k buckets, masking, inputs."""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from kdistill.errors import LossInputError
from kdistill.losses import lm_chunked
from kdistill.losses import logits as logit_losses
from kdistill.losses.divergences import KINDS
from kdistill.losses.lm_chunked import chunked_divergence
from kdistill.losses.lm_per_token import token_divergence, topk_token_divergence

SETTINGS = {"beta": 0.3, "alpha": 0.2, "temperature": 2.0}  # non-defaults: every branch works
B, T, H, H_TEACHER, VOCAB = 3, 7, 8, 6, 23


# ----- naive references: probabilities, full logits, no chunks ------------------------------


def _ref_kl(p, q):
    """Σ p log(p / q) per row with 0 log 0 = 0, in probability space."""
    terms = torch.where(p > 0, p * torch.log(p / q), torch.zeros_like(p))
    return terms.sum(-1)


def _ref_divergence(p, q, kind, *, beta, alpha):
    """Teacher probabilities p, student q, both (N, V), rows summing to 1 -> (N,)."""
    if kind == "kl":
        return _ref_kl(p, q)
    if kind == "reverse_kl":
        return _ref_kl(q, p)
    if kind == "jsd":
        m = beta * p + (1 - beta) * q
        return beta * _ref_kl(p, m) + (1 - beta) * _ref_kl(q, m)
    if kind == "skew_kl":
        return _ref_kl(p, alpha * p + (1 - alpha) * q)
    if kind == "skew_reverse_kl":
        return _ref_kl(q, alpha * q + (1 - alpha) * p)
    assert kind == "tvd"
    return 0.5 * (p - q).abs().sum(-1)


def _ref_dense(student_logits, teacher_logits, kind, *, beta, alpha, temperature, vocab=None):
    vocab = vocab or min(student_logits.shape[-1], teacher_logits.shape[-1])
    q = torch.softmax(student_logits[:, :vocab] / temperature, -1)
    p = torch.softmax(teacher_logits[:, :vocab] / temperature, -1)
    return _ref_divergence(p, q, kind, beta=beta, alpha=alpha)


def _ref_topk(student_logits, ids, logprobs, kind, *, beta, alpha, temperature, vocab=None):
    """Collapse both distributions onto [top-k tokens, everything else] by subtraction."""
    vocab = vocab or student_logits.shape[-1]
    q = torch.softmax(student_logits[:, :vocab] / temperature, -1).gather(1, ids)  # (N, k)
    p = logprobs.exp()
    q = torch.cat([q, 1 - q.sum(-1, keepdim=True)], -1)
    p = torch.cat([p, 1 - p.sum(-1, keepdim=True)], -1)
    return _ref_divergence(p, q, kind, beta=beta, alpha=alpha)


def _ref_chunked(student, teacher, labels, kind, *, reduction="mean", vocab=None, **settings):
    """chunked_divergence computed the naive way: full logits of every position, then mask."""
    h, w, b = student
    logits = h @ w.T + (0 if b is None else b)  # (B, T, V)
    mask = labels != -100
    if "logits" in teacher:
        per_token = _ref_dense(logits[mask], teacher["logits"][mask], kind, vocab=vocab, **settings)
    elif "ids" in teacher:
        per_token = _ref_topk(
            logits[mask],
            teacher["ids"][mask],
            teacher["logprobs"][mask],
            kind,
            vocab=vocab,
            **settings,
        )
    else:
        teacher_logits = teacher["hidden"] @ teacher["weight"].T + teacher.get("bias", 0)
        per_token = _ref_dense(logits[mask], teacher_logits[mask], kind, vocab=vocab, **settings)
    total = per_token.sum()
    return total / max(int(mask.sum()), 1) if reduction == "mean" else total


def _teacher_kwargs(teacher):
    names = {
        "hidden": "teacher_hidden",
        "weight": "teacher_head_weight",
        "bias": "teacher_head_bias",
        "logits": "teacher_logits",
        "ids": "teacher_topk_ids",
        "logprobs": "teacher_topk_logprobs",
    }
    return {names[key]: value for key, value in teacher.items()}


# ----- inputs ------------------------------------------------------------------------------------


def make_student(seed=0, dtype=torch.float32, bias=True, vocab=VOCAB):
    generator = torch.Generator().manual_seed(seed)
    h = torch.randn(B, T, H, generator=generator, dtype=torch.float64)
    w = 0.8 * torch.randn(vocab, H, generator=generator, dtype=torch.float64)
    b = torch.randn(vocab, generator=generator, dtype=torch.float64) if bias else None
    return tuple(None if x is None else x.to(dtype).requires_grad_() for x in (h, w, b))


def make_labels(seed=0, vocab=VOCAB):
    generator = torch.Generator().manual_seed(seed + 100)
    labels = torch.randint(0, vocab, (B, T), generator=generator)
    labels[0, :3] = -100  # a prompt
    labels[2, 5:] = -100  # padding
    return labels


def make_teacher(form, seed=0, dtype=torch.float32, vocab=VOCAB, k=5):
    generator = torch.Generator().manual_seed(seed + 200)
    hidden = torch.randn(B, T, H_TEACHER, generator=generator, dtype=torch.float64)
    weight = torch.randn(vocab, H_TEACHER, generator=generator, dtype=torch.float64)
    bias = torch.randn(vocab, generator=generator, dtype=torch.float64)
    if form == "live":
        return {"hidden": hidden.to(dtype), "weight": weight.to(dtype), "bias": bias.to(dtype)}
    if form == "live_no_bias":
        return {"hidden": hidden.to(dtype), "weight": weight.to(dtype)}
    logits = hidden @ weight.T + bias  # (B, T, V)
    if form == "logits":
        return {"logits": logits.to(dtype)}
    assert form == "topk"
    logprobs, ids = torch.log_softmax(logits / SETTINGS["temperature"], -1).topk(k, dim=-1)
    return {"ids": ids, "logprobs": logprobs.to(dtype)}


def grads(loss, tensors):
    present = [t for t in tensors if t is not None]
    return torch.autograd.grad(loss, present)


def assert_close_relative(actual, expected, rtol=1e-5):
    """Elementwise within rtol of the largest magnitude: near-zero entries get the same slack."""
    scale = expected.abs().max().item()
    assert_close(actual, expected, rtol=rtol, atol=rtol * max(scale, 1e-30))


# ----- per-token functions -------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_token_divergence_matches_naive_reference(kind):
    generator = torch.Generator().manual_seed(1)
    student = 3 * torch.randn(6, 11, generator=generator, dtype=torch.float64)
    teacher = 3 * torch.randn(6, 11, generator=generator, dtype=torch.float64)
    got = token_divergence(student, teacher, kind, **SETTINGS)
    assert got.shape == (6,)
    assert_close(got, _ref_dense(student, teacher, kind, **SETTINGS))


@pytest.mark.parametrize("kind", KINDS)
def test_token_divergence_agrees_with_logit_losses(kind):
    """The LM math and kdistill.losses.logits are written apart; they must agree."""
    generator = torch.Generator().manual_seed(2)
    student = 3 * torch.randn(5, 9, generator=generator, dtype=torch.float64)
    teacher = 3 * torch.randn(5, 9, generator=generator, dtype=torch.float64)
    loss = logit_losses.LOGIT_LOSSES[kind]
    params = {"temperature": 2.0}
    params |= {"beta": 0.3} if kind == "jsd" else {}
    params |= {"alpha": 0.2} if kind.startswith("skew") else {}
    expected = loss(student, teacher, reduction="none", **params)
    assert_close(token_divergence(student, teacher, kind, **SETTINGS), expected)


def test_jsd_follows_trl_convention():
    """TRL's generalized_jsd_loss (trl/experimental/gkd), transcribed: F.kl_div(input, target)
    is KL(target ‖ exp(input)), the mixture puts β on the teacher."""
    generator = torch.Generator().manual_seed(3)
    student = 3 * torch.randn(4, 10, generator=generator, dtype=torch.float64)
    teacher = 3 * torch.randn(4, 10, generator=generator, dtype=torch.float64)
    beta, temperature = torch.tensor(0.3, dtype=torch.float64), 2.0
    s_log, t_log = (
        F.log_softmax(student / temperature, -1),
        F.log_softmax(teacher / temperature, -1),
    )
    mixture = torch.logsumexp(torch.stack([s_log + torch.log1p(-beta), t_log + torch.log(beta)]), 0)
    kl_teacher = F.kl_div(mixture, t_log, reduction="none", log_target=True)
    kl_student = F.kl_div(mixture, s_log, reduction="none", log_target=True)
    trl = (beta * kl_teacher + (1 - beta) * kl_student).sum(-1)
    assert_close(token_divergence(student, teacher, "jsd", beta=0.3, temperature=2.0), trl)
    trl_forward = F.kl_div(s_log, t_log, reduction="none", log_target=True).sum(-1)
    trl_reverse = F.kl_div(t_log, s_log, reduction="none", log_target=True).sum(-1)
    assert_close(token_divergence(student, teacher, "jsd", beta=0.0, temperature=2.0), trl_forward)
    assert_close(token_divergence(student, teacher, "jsd", beta=1.0, temperature=2.0), trl_reverse)


def test_identities():
    generator = torch.Generator().manual_seed(4)
    student = 2 * torch.randn(6, 12, generator=generator, dtype=torch.float64)
    teacher = 2 * torch.randn(6, 12, generator=generator, dtype=torch.float64)
    for kind in KINDS:
        assert_close(token_divergence(teacher, teacher, kind), torch.zeros(6, dtype=torch.float64))
        assert (token_divergence(student, teacher, kind, **SETTINGS) > 0).all()
    kl = token_divergence(student, teacher, "kl")
    reverse = token_divergence(student, teacher, "reverse_kl")
    assert_close(token_divergence(student, teacher, "jsd", beta=0.0), kl, rtol=0, atol=0)
    assert_close(token_divergence(student, teacher, "jsd", beta=1.0), reverse, rtol=0, atol=0)
    assert_close(token_divergence(student, teacher, "skew_kl", alpha=0.0), kl)
    assert_close(token_divergence(student, teacher, "skew_reverse_kl", alpha=0.0), reverse)
    zero = torch.zeros(6, dtype=torch.float64)
    assert_close(token_divergence(student, teacher, "skew_kl", alpha=1.0), zero)
    assert (token_divergence(student, teacher, "tvd") <= 1).all()


def test_zero_teacher_probability_gives_no_nan():
    """A teacher logit of −inf (a banned token) is 0·log 0 = 0 in the forward KL and JSD."""
    student = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(3, 6, dtype=torch.float64)
    teacher[:, 2] = -torch.inf
    for kind in ("kl", "jsd", "skew_kl", "skew_reverse_kl", "tvd"):
        value = token_divergence(student, teacher, kind, beta=0.5).sum()
        (grad,) = torch.autograd.grad(value, student)
        assert value.isfinite() and grad.isfinite().all(), kind
    expected = _ref_dense(student.detach(), teacher, "kl", beta=0, alpha=0, temperature=1.0)
    assert_close(token_divergence(student, teacher, "kl"), expected)


def test_token_divergence_dtypes_and_gradients():
    student = torch.randn(4, 9, dtype=torch.bfloat16, requires_grad=True)
    teacher = torch.randn(4, 9, dtype=torch.float16)
    value = token_divergence(student, teacher, "jsd")
    assert value.dtype == torch.float32
    (grad,) = torch.autograd.grad(value.sum(), student)
    assert grad.dtype == torch.bfloat16
    student64 = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    teacher64 = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    assert token_divergence(student64, teacher64, "kl").dtype == torch.float64
    for kind in KINDS:
        torch.autograd.gradcheck(
            lambda s, t, kind=kind: token_divergence(s, t, kind, **SETTINGS), (student64, teacher64)
        )


@pytest.mark.parametrize("kind", KINDS)
def test_topk_matches_naive_collapsed_reference(kind):
    generator = torch.Generator().manual_seed(5)
    student = 2 * torch.randn(6, 15, generator=generator, dtype=torch.float64)
    teacher = 2 * torch.randn(6, 15, generator=generator, dtype=torch.float64)
    logprobs, ids = torch.log_softmax(teacher / 2.0, -1).topk(4, dim=-1)
    got = topk_token_divergence(student, ids, logprobs, kind, **SETTINGS)
    assert_close(got, _ref_topk(student, ids, logprobs, kind, **SETTINGS))


@pytest.mark.parametrize("kind", KINDS)
def test_topk_with_every_token_equals_dense(kind):
    generator = torch.Generator().manual_seed(6)
    student = 2 * torch.randn(5, 10, generator=generator, dtype=torch.float64)
    teacher = 2 * torch.randn(5, 10, generator=generator, dtype=torch.float64)
    logprobs, ids = torch.log_softmax(teacher / 2.0, -1).topk(10, dim=-1)  # k = V, shuffled order
    got = topk_token_divergence(student, ids, logprobs, kind, **SETTINGS)
    assert_close(got, token_divergence(student, teacher, kind, **SETTINGS))


def test_topk_is_a_lower_bound_and_tightens_with_k():
    """Data processing inequality: collapsing can only lose divergence."""
    generator = torch.Generator().manual_seed(7)
    student = 2 * torch.randn(8, 30, generator=generator, dtype=torch.float64)
    teacher = 2 * torch.randn(8, 30, generator=generator, dtype=torch.float64)
    teacher_log_probs = torch.log_softmax(teacher, -1)
    for kind in KINDS:
        dense = token_divergence(student, teacher, kind, **SETTINGS)
        previous = torch.zeros(8, dtype=torch.float64)
        for k in (1, 4, 16, 29):
            logprobs, ids = teacher_log_probs.topk(k, dim=-1)
            sparse = topk_token_divergence(
                student, ids, logprobs, kind, **SETTINGS | {"temperature": 1.0}
            )
            dense = token_divergence(student, teacher, kind, **SETTINGS | {"temperature": 1.0})
            assert (sparse <= dense + 1e-12).all(), (kind, k)
            assert (sparse >= previous - 1e-12).all(), (kind, k)  # a refinement of the buckets
            previous = sparse


def test_topk_edge_cases_stay_finite():
    student = torch.randn(3, 8, dtype=torch.float64, requires_grad=True)
    # the top-k holds all the mass (p_tail = 0), in half precision even rounding above 1:
    # the floored tail keeps the reverse KL finite
    logprobs = torch.log(torch.tensor([[0.5, 0.5], [0.7, 0.3], [0.999, 0.002]]))
    ids = torch.tensor([[0, 1], [2, 3], [4, 5]])
    for kind in KINDS:
        value = topk_token_divergence(student, ids, logprobs.half(), kind).sum()
        (grad,) = torch.autograd.grad(value, student)
        assert value.isfinite() and grad.isfinite().all(), kind
    ids64, logprobs64 = ids[:2], logprobs[:2].double()
    torch.autograd.gradcheck(
        lambda s: topk_token_divergence(s, ids64, logprobs64, "jsd", **SETTINGS), (student[:2],)
    )


# ----- the chunked loss against the naive full-logits computation ------------------------------------


@pytest.mark.parametrize("form", ["live", "live_no_bias", "logits", "topk"])
@pytest.mark.parametrize("kind", KINDS)
def test_chunked_matches_naive_float32(kind, form):
    student = make_student(bias=form != "live_no_bias")
    teacher, labels = make_teacher(form), make_labels()
    got = chunked_divergence(
        *student, labels=labels, kind=kind, chunk_size=4, **_teacher_kwargs(teacher), **SETTINGS
    )
    expected = _ref_chunked(student, teacher, labels, kind, **SETTINGS)
    assert got.num_tokens == int((labels != -100).sum()) and got.cross_entropy is None
    assert got.divergence.dtype == torch.float32
    assert_close_relative(got.divergence, expected)
    for actual, reference in zip(grads(got.divergence, student), grads(expected, student)):
        assert_close_relative(actual, reference)


@pytest.mark.parametrize("kind", KINDS)
def make_tiny(form, seed=0):
    """float64 inputs small enough for a full gradcheck: 2 × 3 positions, H = 3, V = 7."""
    generator = torch.Generator().manual_seed(seed + 300)
    h = torch.randn(2, 3, 3, generator=generator, dtype=torch.float64, requires_grad=True)
    w = torch.randn(7, 3, generator=generator, dtype=torch.float64, requires_grad=True)
    b = torch.randn(7, generator=generator, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([[-100, 3, 5], [0, 6, -100]])
    teacher_hidden = torch.randn(2, 3, 4, generator=generator, dtype=torch.float64)
    teacher_weight = torch.randn(7, 4, generator=generator, dtype=torch.float64)
    teacher_logits = teacher_hidden @ teacher_weight.T
    if form == "live":
        teacher = {"hidden": teacher_hidden, "weight": teacher_weight}
    elif form == "logits":
        teacher = {"logits": teacher_logits}
    else:
        logprobs, ids = torch.log_softmax(teacher_logits / 2.0, -1).topk(3, dim=-1)
        teacher = {"ids": ids, "logprobs": logprobs}
    return (h, w, b), teacher, labels


@pytest.mark.parametrize("kind", KINDS)
def test_chunked_gradcheck_float64(kind):
    student, teacher, labels = make_tiny("live")

    def loss(h, w, b):
        out = chunked_divergence(
            h, w, b, labels=labels, kind=kind, chunk_size=2, with_cross_entropy=True,
            **_teacher_kwargs(teacher), **SETTINGS,
        )  # fmt: skip
        return out.divergence, out.cross_entropy

    torch.autograd.gradcheck(loss, student)


@pytest.mark.parametrize("form", ["logits", "topk"])
def test_chunked_gradcheck_teacher_forms(form):
    (h, w, _), teacher, labels = make_tiny(form)

    def loss(h, w):
        return chunked_divergence(
            h, w, labels=labels, kind="skew_kl", chunk_size=2, reduction="sum",
            **_teacher_kwargs(teacher), **SETTINGS,
        ).divergence  # fmt: skip

    torch.autograd.gradcheck(loss, (h, w))


def test_chunked_cross_entropy_and_weighted_outputs():
    student, teacher, labels = make_student(), make_teacher("live"), make_labels()
    out = chunked_divergence(
        *student, labels=labels, kind="jsd", chunk_size=3, with_cross_entropy=True,
        **_teacher_kwargs(teacher), **SETTINGS,
    )  # fmt: skip
    h, w, b = student
    naive_ce = F.cross_entropy((h @ w.T + b).reshape(-1, VOCAB), labels.reshape(-1))
    assert_close_relative(out.cross_entropy, naive_ce)
    naive_div = _ref_chunked(student, teacher, labels, "jsd", **SETTINGS)
    got = grads(0.3 * out.divergence + 0.7 * out.cross_entropy, student)
    for actual, reference in zip(got, grads(0.3 * naive_div + 0.7 * naive_ce, student)):
        assert_close_relative(actual, reference)


def test_chunked_is_independent_of_chunk_size_and_layout(monkeypatch):
    student, teacher, labels = (
        make_student(dtype=torch.float64),
        make_teacher("logits"),
        make_labels(),
    )
    values = [
        chunked_divergence(
            *student, labels=labels, kind="kl", chunk_size=size, **_teacher_kwargs(teacher)
        ).divergence
        for size in (1, 4, 1000)
    ]
    h, w, b = student
    flat = chunked_divergence(
        h.reshape(-1, H), w, b, labels=labels.reshape(-1), kind="kl",
        teacher_logits=teacher["logits"].reshape(-1, VOCAB),
    ).divergence  # fmt: skip
    # chunk_size=None: 3 tokens a chunk
    monkeypatch.setattr(lm_chunked, "CHUNK_ELEMENTS", 3 * VOCAB)
    automatic = chunked_divergence(*student, labels=labels, kind="kl", **_teacher_kwargs(teacher))
    for value in [*values[1:], flat, automatic.divergence]:
        assert_close(value, values[0])


def test_micro_batches_sum_to_the_full_batch_mean():
    """sum(micro-batch sums) / global count == full-batch mean, values and gradients."""
    student, teacher, labels = make_student(), make_teacher("live"), make_labels()
    kwargs = {"kind": "jsd", "chunk_size": 4, "with_cross_entropy": True, **SETTINGS}
    full = chunked_divergence(*student, labels=labels, **_teacher_kwargs(teacher), **kwargs)
    full_total = full.divergence + full.cross_entropy
    h, w, b = student
    global_count = int((labels != -100).sum())
    total = 0
    for rows in (slice(0, 1), slice(1, 3)):  # uneven: different numbers of counted tokens
        part = {key: value[rows] if value.dim() == 3 else value for key, value in teacher.items()}
        out = chunked_divergence(
            h[rows], w, b, labels=labels[rows], reduction="sum", **_teacher_kwargs(part), **kwargs
        )
        total = total + (out.divergence + out.cross_entropy) / global_count
    assert_close_relative(total, full_total)
    for actual, reference in zip(grads(total, student), grads(full_total, student)):
        assert_close_relative(actual, reference)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("form", ["live", "topk"])
def test_all_masked_batch_gives_zero_and_zero_gradients(reduction, form):
    student, teacher = make_student(), make_teacher(form)
    labels = torch.full((B, T), -100)
    out = chunked_divergence(
        *student, labels=labels, kind="kl", with_cross_entropy=True, reduction=reduction,
        **_teacher_kwargs(teacher),
    )  # fmt: skip
    assert out.num_tokens == 0
    assert out.divergence.item() == 0 and out.cross_entropy.item() == 0
    for grad in grads(out.divergence + out.cross_entropy, student):
        assert torch.equal(grad, torch.zeros_like(grad))


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_forward_kl_closed_form_gradient_edge_cases(temperature):
    """Forward KL takes a closed-form gradient (q − p) / T instead of autograd. Checked
    against the naive full-logits reference where it could go wrong: a student head
    padded past the shared range (27 rows vs 23) with the cross-entropy reading all 27,
    a teacher with zero-probability tokens (−inf logits), and T ≠ 1."""
    student = make_student(dtype=torch.float64, vocab=27)
    teacher = make_teacher("logits", dtype=torch.float64)
    teacher["logits"][..., :4] = -math.inf  # p = 0 for tokens 0..3 everywhere
    labels = make_labels()
    got = chunked_divergence(
        *student, labels=labels, kind="kl", vocab_size=VOCAB, with_cross_entropy=True,
        chunk_size=5, temperature=temperature, **_teacher_kwargs(teacher),
    )  # fmt: skip
    # naive reference: full logits of the counted positions, Σ xlogy(p, p) − Σ p log q
    # (a form whose own gradient has no 0·∞ where p = 0)
    h, w, b = student
    mask = labels != -100
    log_q = torch.log_softmax((h @ w.T + b)[mask][:, :VOCAB] / temperature, -1)
    p_teacher = torch.softmax(teacher["logits"][mask][:, :VOCAB] / temperature, -1)
    expected = (torch.xlogy(p_teacher, p_teacher) - p_teacher * log_q).sum() / int(mask.sum())
    assert torch.isfinite(got.divergence)
    assert_close(got.divergence, expected)
    got_grads = grads(got.divergence, student)
    for actual, reference in zip(got_grads, grads(expected, student)):
        assert_close(actual, reference)
    grad_w = got_grads[1]
    assert torch.equal(grad_w[VOCAB:], torch.zeros_like(grad_w[VOCAB:]))
    # a NaN in the student still shows in the loss (the closed form must not hide it)
    broken = chunked_divergence(
        h.detach().clone().index_fill_(2, torch.tensor([0]), math.nan), w, b, labels=labels,
        kind="kl", teacher_logits=teacher["logits"],
    )  # fmt: skip
    assert torch.isnan(broken.divergence)


def test_vocabulary_ranges():
    """Student head padded to 27 rows, teacher to 25: compare over [0, 25) or vocab_size."""
    student = make_student(dtype=torch.float64, vocab=27)
    teacher, labels = make_teacher("live", dtype=torch.float64, vocab=25), make_labels()
    shared = chunked_divergence(
        *student, labels=labels, kind="reverse_kl", **_teacher_kwargs(teacher), **SETTINGS
    )
    expected = _ref_chunked(student, teacher, labels, "reverse_kl", **SETTINGS)
    assert_close(shared.divergence, expected)
    real = chunked_divergence(
        *student, labels=labels, kind="reverse_kl", vocab_size=VOCAB, **_teacher_kwargs(teacher),
        **SETTINGS,
    )  # fmt: skip
    expected = _ref_chunked(student, teacher, labels, "reverse_kl", vocab=VOCAB, **SETTINGS)
    assert_close(real.divergence, expected)
    (grad_w,) = torch.autograd.grad(real.divergence, student[1])
    assert torch.equal(grad_w[VOCAB:], torch.zeros_like(grad_w[VOCAB:]))  # padded rows: no signal

    with pytest.raises(
        LossInputError, match=r"vocab_size=30.*only 27 rows.*resize_token_embeddings"
    ):
        chunked_divergence(
            *student, labels=labels, kind="kl", vocab_size=30, **_teacher_kwargs(teacher)
        )
    with pytest.raises(LossInputError, match=r"vocab_size=26.*teacher's logits cover only 25"):
        chunked_divergence(
            *student, labels=labels, kind="kl", vocab_size=26, **_teacher_kwargs(teacher)
        )


def test_chunked_topk_with_vocab_size():
    student, labels = make_student(dtype=torch.float64, vocab=27), make_labels()
    teacher = make_teacher("topk", dtype=torch.float64)  # ids < VOCAB
    got = chunked_divergence(
        *student, labels=labels, kind="kl", vocab_size=VOCAB, **_teacher_kwargs(teacher), **SETTINGS
    )
    expected = _ref_chunked(student, teacher, labels, "kl", vocab=VOCAB, **SETTINGS)
    assert_close(got.divergence, expected)


def test_chunked_dtypes():
    student = make_student(dtype=torch.bfloat16)
    teacher, labels = make_teacher("logits", dtype=torch.float16), make_labels()
    out = chunked_divergence(*student, labels=labels, kind="kl", **_teacher_kwargs(teacher))
    assert out.divergence.dtype == torch.float32
    got = grads(out.divergence, student)
    assert [g.dtype for g in got] == [torch.bfloat16] * 3
    reference = _ref_chunked(
        [x.float() for x in student], {"logits": teacher["logits"].float()}, labels, "kl",
        beta=0, alpha=0, temperature=1.0,
    )  # fmt: skip
    assert_close(out.divergence, reference, rtol=2e-2, atol=2e-2)  # bfloat16 logits
    student64 = make_student(dtype=torch.float64)
    out64 = chunked_divergence(
        *student64, labels=labels, kind="kl", teacher_logits=teacher["logits"]
    )
    assert out64.divergence.dtype == torch.float64


def test_no_grad_and_frozen_teacher():
    student, labels = make_student(), make_labels()
    teacher = {k: v.clone().requires_grad_() for k, v in make_teacher("live").items()}
    out = chunked_divergence(*student, labels=labels, kind="tvd", **_teacher_kwargs(teacher))
    with torch.no_grad():
        detached = chunked_divergence(
            *student, labels=labels, kind="tvd", **_teacher_kwargs(teacher)
        )
    assert not detached.divergence.requires_grad
    assert_close(detached.divergence, out.divergence)
    out.divergence.backward()
    assert all(v.grad is None for v in teacher.values())  # the teacher is a constant
    assert all(x.grad is not None for x in student)


def test_frozen_student_head():
    h, w, b = make_student()
    w, b = w.detach(), b.detach()
    teacher, labels = make_teacher("live"), make_labels()
    out = chunked_divergence(h, w, b, labels=labels, kind="kl", **_teacher_kwargs(teacher))
    expected = _ref_chunked((h, w, b), teacher, labels, "kl", beta=0, alpha=0, temperature=1.0)
    assert_close_relative(grads(out.divergence, [h])[0], grads(expected, [h])[0])


@pytest.mark.slow
@pytest.mark.skipif(
    os.environ.get("KDISTILL_TEST_COMPILE") != "1",
    reason="torch.compile (inductor) of the chunk step takes about 70 s on the 2-core CPU this "
    "suite targets; set KDISTILL_TEST_COMPILE=1 to run it",
)
def test_compile_gives_the_same_numbers():
    student, teacher, labels = make_student(), make_teacher("topk"), make_labels()
    kwargs = {
        "labels": labels,
        "kind": "jsd",
        "chunk_size": 4,
        **_teacher_kwargs(teacher),
        **SETTINGS,
    }
    try:
        compiled = chunked_divergence(*student, compile=True, **kwargs)
    except Exception as error:  # no C++ compiler, unsupported platform
        pytest.skip(f"torch.compile does not work here: {type(error).__name__}: {error}")
    eager = chunked_divergence(*student, **kwargs)
    assert_close_relative(compiled.divergence, eager.divergence)
    for actual, reference in zip(
        grads(compiled.divergence, student), grads(eager.divergence, student)
    ):
        assert_close_relative(actual, reference)


# ----- bad inputs -----------------------------------------------------------------------------------


def _call(**overrides):
    h, w, b = make_student()
    kwargs = {"labels": make_labels(), "kind": "kl", **_teacher_kwargs(make_teacher("live"))}
    kwargs |= overrides
    return chunked_divergence(h, w, b, **kwargs)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"kind": "kullback"}, r"'kind' parameter .* Got 'kullback'"),
        (
            {"temperature": 0},
            r"'temperature' parameter of chunked_divergence must be a float in \(0, inf\)",
        ),
        ({"beta": 1.5}, r"'beta' parameter .* \[0, 1\]"),
        ({"reduction": "none"}, r"'mean' or 'sum'.*token_divergence"),
        ({"chunk_size": 0}, r"'chunk_size' parameter .* positive int"),
        (
            {"labels": torch.zeros(B, T + 1, dtype=torch.long)},
            r"labels has shape \(3, 8\).*\(3, 7\)",
        ),
        ({"labels": torch.full((B, T), 99)}, r"token ids in \[0, 23\); got 99"),
        ({"labels": torch.zeros(B, T)}, r"labels must be an integer tensor"),
        ({"teacher_logits": torch.zeros(B, T, VOCAB)}, r"exactly one form.*Got live .*, dense"),
        (
            {"teacher_hidden": None, "teacher_head_weight": None, "teacher_head_bias": None},
            r"Got none",
        ),
        (
            {"teacher_head_weight": None},
            r"(?s)teacher_head_bias was given without.*needs teacher_head_weight",
        ),
        (
            {"teacher_head_weight": torch.zeros(VOCAB, 5)},
            r"teacher_head_weight has shape \(23, 5\).*width 6",
        ),
        (
            {"teacher_hidden": torch.zeros(B, T - 1, H_TEACHER)},
            r"teacher_hidden has shape \(3, 6, 6\)",
        ),
    ],
)
def test_bad_inputs_raise(overrides, message):
    with pytest.raises(LossInputError, match=message):
        _call(**overrides)


def test_every_problem_is_reported_at_once():
    with pytest.raises(LossInputError) as error:
        _call(kind="kld", temperature=-1, reduction="avg", chunk_size=1.5)
    text = str(error.value)
    assert all(name in text for name in ("'kind'", "'temperature'", "'reduction'", "'chunk_size'"))


def test_bad_topk_caches_raise():
    h, w, b = make_student()
    labels = make_labels()
    teacher = make_teacher("topk")
    ids, logprobs = teacher["ids"], teacher["logprobs"]
    out_of_range = ids.clone()
    out_of_range[1, 2, 0] = VOCAB + 4
    repeated = ids.clone()
    repeated[1, 2, 1] = repeated[1, 2, 0]
    cases = [
        (out_of_range, logprobs, r"token ids in \[0, 23\).*got 27"),
        (repeated, logprobs, r"repeats a token id"),
        (ids, logprobs + 5.0, r"must be log-probabilities.*Were raw logits stored"),
        (ids[..., :3], logprobs, r"teacher_topk_ids has shape \(3, 7, 3\)"),
        (ids, None, r"needs teacher_topk_logprobs too"),
    ]
    for bad_ids, bad_logprobs, message in cases:
        with pytest.raises(LossInputError, match=message):
            chunked_divergence(
                h, w, b, labels=labels, kind="kl", teacher_topk_ids=bad_ids,
                teacher_topk_logprobs=bad_logprobs,
            )  # fmt: skip
    # rows that do not count are not read, so a padded cache row may hold anything
    junk = ids.clone()
    junk[2, 6] = 0  # a padding position (label -100): repeated ids
    chunked_divergence(
        h, w, b, labels=labels, kind="kl", teacher_topk_ids=junk, teacher_topk_logprobs=logprobs
    )


def test_per_token_functions_reject_bad_inputs():
    student, teacher = torch.randn(4, 9), torch.randn(5, 9)
    with pytest.raises(LossInputError, match=r"4 rows but teacher_logits has 5"):
        token_divergence(student, teacher, "kl")
    with pytest.raises(LossInputError, match=r"must be 2-D"):
        token_divergence(student[None], teacher[None], "kl")
    with pytest.raises(LossInputError, match=r"vocab_size=12.*only 9 rows"):
        token_divergence(student, teacher[:4], "kl", vocab_size=12)
    with pytest.raises(LossInputError, match=r"k = 0"):
        topk_token_divergence(student, torch.zeros(4, 0, dtype=torch.long), torch.zeros(4, 0), "kl")
