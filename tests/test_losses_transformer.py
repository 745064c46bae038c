"""Transformer feature losses: naive references, identities, masking, gradients, bad inputs."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from kdistill.errors import LossInputError
from kdistill.losses.transformer import (
    TRANSFORMER_LOSSES,
    attention_kl,
    attention_mse,
    embedding_mse,
    hidden_cosine,
    hidden_mse,
    minilm_attention_kl,
    minilm_relation_kl,
    minilm_value_relation_kl,
)

# full, right-padded, all padding, one token, padding in the middle and at the start
MASK = torch.tensor(
    [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [0, 0, 0, 0, 0], [1, 0, 0, 0, 0], [0, 1, 1, 0, 1]]
)
BATCH, TOKENS = MASK.shape
HEADS, RELATION_HEADS = 3, 4
STUDENT_WIDTH, TEACHER_WIDTH = 8, 12


def randn(*shape: int, seed: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=generator, dtype=torch.float64).to(dtype)


def hf_probs(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Attention probabilities as HF eager attention builds them: additive mask, softmax."""
    additive = (1 - mask.to(scores.dtype)) * torch.finfo(scores.dtype).min  # (B, T)
    return torch.softmax(scores + additive[:, None, None, :], dim=-1)


def hidden_pair(seed: int = 0, width: int = STUDENT_WIDTH):
    return randn(BATCH, TOKENS, width, seed=seed), randn(BATCH, TOKENS, width, seed=seed + 1)


def attention_pair(seed: int = 0, mask: torch.Tensor = MASK):
    student = hf_probs(2 * randn(BATCH, HEADS, TOKENS, TOKENS, seed=seed), mask)
    teacher = hf_probs(2 * randn(BATCH, HEADS, TOKENS, TOKENS, seed=seed + 1), mask)
    return student, teacher


def relation_pair(seed: int = 0):
    return (
        randn(BATCH, TOKENS, STUDENT_WIDTH, seed=seed),
        randn(BATCH, TOKENS, TEACHER_WIDTH, seed=seed + 1),
    )


# Every loss as f(student, teacher, mask, reduction): the inputs each one takes.
def _minilm_attention(student, teacher, mask, **kwargs):
    # keys: the queries with their hidden columns reversed, a position-wise map
    return minilm_attention_kl(student, student.flip(-1), teacher, teacher.flip(-1), mask, **kwargs)


LOSSES = {
    "hidden_mse": (hidden_mse, hidden_pair),
    "embedding_mse": (embedding_mse, hidden_pair),
    "hidden_cosine": (hidden_cosine, hidden_pair),
    "attention_mse": (attention_mse, attention_pair),
    "attention_kl": (attention_kl, attention_pair),
    "minilm_attention_kl": (
        lambda s, t, m, **kw: _minilm_attention(s, t, m, num_relation_heads=RELATION_HEADS, **kw),
        relation_pair,
    ),
    "minilm_relation_kl": (
        lambda s, t, m, **kw: minilm_relation_kl(s, t, m, num_relation_heads=RELATION_HEADS, **kw),
        relation_pair,
    ),
    "minilm_value_relation_kl": (
        lambda s, t, m, **kw: minilm_value_relation_kl(s, t, m, num_relation_heads=2, **kw),
        relation_pair,
    ),
}


def padded_region(tensor: torch.Tensor, mask: torch.Tensor = MASK) -> torch.Tensor:
    """Bool tensor like `tensor`: True where the entry belongs to padding."""
    real = mask.bool()
    if tensor.ndim == 3:  # (B, T, H)
        return (~real)[..., None].expand_as(tensor)
    pair = real[:, None, :, None] & real[:, None, None, :]  # (B, 1, T, T)
    return (~pair).expand_as(tensor)


# ----- naive references: Python loops over sequences, heads, positions --------------------


def real_tokens(mask, b):
    return [i for i in range(len(mask[b])) if mask[b][i]]


def ref_hidden_mse(student, teacher, mask):
    s, t, m = student.tolist(), teacher.tolist(), mask.tolist()
    out = []
    for b in range(len(s)):
        real = real_tokens(m, b)
        width = len(s[b][0])
        total = sum((s[b][i][d] - t[b][i][d]) ** 2 for i in real for d in range(width))
        out.append(total / (len(real) * width) if real else 0.0)
    return torch.tensor(out, dtype=torch.float64)


def ref_hidden_cosine(student, teacher, mask):
    s, t, m = student.tolist(), teacher.tolist(), mask.tolist()
    out = []
    for b in range(len(s)):
        real = real_tokens(m, b)
        total = 0.0
        for i in real:
            dot = sum(x * y for x, y in zip(s[b][i], t[b][i]))
            norm_s = math.sqrt(sum(x * x for x in s[b][i]))
            norm_t = math.sqrt(sum(y * y for y in t[b][i]))
            total += 1 - dot / (norm_s * norm_t)
        out.append(total / len(real) if real else 0.0)
    return torch.tensor(out, dtype=torch.float64)


def ref_attention_mse(student, teacher, mask):
    s, t, m = student.tolist(), teacher.tolist(), mask.tolist()
    out = []
    for b in range(len(s)):
        real = real_tokens(m, b)
        if not real:
            out.append(0.0)
            continue
        heads = len(s[b])
        per_head = [
            sum((s[b][h][q][k] - t[b][h][q][k]) ** 2 for q in real for k in real) / len(real) ** 2
            for h in range(heads)
        ]
        out.append(sum(per_head) / heads)
    return torch.tensor(out, dtype=torch.float64)


def ref_kl(p, q):
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q) if pi > 0)


def ref_attention_kl(student, teacher, mask):
    s, t, m = student.tolist(), teacher.tolist(), mask.tolist()
    out = []
    for b in range(len(s)):
        real = real_tokens(m, b)
        if not real:
            out.append(0.0)
            continue
        heads = len(s[b])
        total = 0.0
        for h in range(heads):
            for q in real:
                total += ref_kl([t[b][h][q][k] for k in real], [s[b][h][q][k] for k in real])
        out.append(total / (heads * len(real)))
    return torch.tensor(out, dtype=torch.float64)


def ref_softmax(values):
    top = max(values)
    exps = [math.exp(v - top) for v in values]
    return [e / sum(exps) for e in exps]


def ref_relation(left, right, b, head, heads, query, real):
    """softmax over real keys k of <left[q], right[k]> restricted to one head, / sqrt(d)."""
    d = len(left[b][0]) // heads
    columns = range(head * d, (head + 1) * d)
    scores = [sum(left[b][query][c] * right[b][k][c] for c in columns) / math.sqrt(d) for k in real]
    return ref_softmax(scores)


def ref_relation_kl(student_left, student_right, teacher_left, teacher_right, mask, heads):
    sl, sr, tl, tr = (
        x.tolist() for x in (student_left, student_right, teacher_left, teacher_right)
    )
    m = mask.tolist()
    out = []
    for b in range(len(sl)):
        real = real_tokens(m, b)
        if not real:
            out.append(0.0)
            continue
        total = 0.0
        for head in range(heads):
            for q in real:
                p_t = ref_relation(tl, tr, b, head, heads, q, real)
                p_s = ref_relation(sl, sr, b, head, heads, q, real)
                total += ref_kl(p_t, p_s)
        out.append(total / (heads * len(real)))
    return torch.tensor(out, dtype=torch.float64)


def test_hidden_mse_matches_naive_reference():
    student, teacher = hidden_pair()
    expected = ref_hidden_mse(student, teacher, MASK)
    assert_close(hidden_mse(student, teacher, MASK, reduction="none"), expected)
    assert_close(embedding_mse(student, teacher, MASK, reduction="none"), expected)


def test_hidden_cosine_matches_naive_reference():
    student, teacher = hidden_pair()
    expected = ref_hidden_cosine(student, teacher, MASK)
    assert_close(hidden_cosine(student, teacher, MASK, reduction="none"), expected)


def test_attention_mse_matches_naive_reference():
    student, teacher = attention_pair()
    expected = ref_attention_mse(student, teacher, MASK)
    assert_close(attention_mse(student, teacher, MASK, reduction="none"), expected)


def test_attention_mse_accepts_scores():
    """Pre-softmax scores (TinyBERT's choice) work too: masked entries never count."""
    student = randn(BATCH, HEADS, TOKENS, TOKENS, seed=3)
    teacher = randn(BATCH, HEADS, TOKENS, TOKENS, seed=4)
    expected = ref_attention_mse(student, teacher, MASK)
    assert_close(attention_mse(student, teacher, MASK, reduction="none"), expected)


def test_attention_kl_matches_naive_reference():
    student, teacher = attention_pair()
    expected = ref_attention_kl(student, teacher, MASK)
    assert_close(attention_kl(student, teacher, MASK, reduction="none"), expected)


def test_minilm_relation_kl_matches_naive_reference():
    student, teacher = relation_pair()
    got = minilm_relation_kl(student, teacher, MASK, num_relation_heads=4, reduction="none")
    assert_close(got, ref_relation_kl(student, student, teacher, teacher, MASK, heads=4))


def test_minilm_value_relation_kl_matches_naive_reference():
    student, teacher = relation_pair()
    got = minilm_value_relation_kl(student, teacher, MASK, num_relation_heads=2, reduction="none")
    assert_close(got, ref_relation_kl(student, student, teacher, teacher, MASK, heads=2))


def test_minilm_attention_kl_matches_naive_reference():
    student_q, teacher_q = relation_pair(seed=0)
    student_k, teacher_k = relation_pair(seed=5)
    got = minilm_attention_kl(
        student_q, student_k, teacher_q, teacher_k, MASK, num_relation_heads=2, reduction="none"
    )
    expected = ref_relation_kl(student_q, student_k, teacher_q, teacher_k, MASK, heads=2)
    assert_close(got, expected)


def test_minilm_attention_kl_equals_attention_kl_on_the_same_heads():
    """With R = the attention heads, the Q/K form is the distribution form on the maps."""
    heads = 2
    student_q, teacher_q = relation_pair(seed=0)
    student_k, teacher_k = relation_pair(seed=5)

    def maps(q, k):  # the model's attention: split heads, scaled dot product, masked softmax
        d = q.shape[-1] // heads
        q = q.view(BATCH, TOKENS, heads, d).transpose(1, 2)
        k = k.view(BATCH, TOKENS, heads, d).transpose(1, 2)
        return hf_probs(q @ k.transpose(-1, -2) / math.sqrt(d), MASK)

    expected = attention_kl(maps(student_q, student_k), maps(teacher_q, teacher_k), MASK)
    got = minilm_attention_kl(
        student_q, student_k, teacher_q, teacher_k, MASK, num_relation_heads=heads
    )
    assert_close(got, expected)


def test_relation_kl_forms_agree():
    student, teacher = relation_pair()
    relation = minilm_relation_kl(student, teacher, MASK, num_relation_heads=2)
    value = minilm_value_relation_kl(student, teacher, MASK, num_relation_heads=2)
    attention = minilm_attention_kl(student, student, teacher, teacher, MASK, num_relation_heads=2)
    assert_close(value, relation)
    assert_close(attention, relation)


# ----- identities -------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_zero_when_student_equals_teacher(name):
    loss, make = LOSSES[name]
    student, teacher = make()
    if student.shape != teacher.shape:  # relation inputs: give the student the teacher's width
        student = teacher
    got = loss(teacher.clone(), teacher, MASK, reduction="none")
    assert_close(got, torch.zeros(BATCH, dtype=torch.float64))


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_non_negative_and_positive_when_different(name):
    loss, make = LOSSES[name]
    student, teacher = make()
    per_sequence = loss(student, teacher, MASK, reduction="none")
    tokens = MASK.sum(dim=-1)
    assert (per_sequence >= 0).all()
    # over one real key every distribution is [1], so only longer sequences must differ
    assert (per_sequence[tokens > 1] > 0).all()
    assert (per_sequence[tokens == 0] == 0).all()


def test_hidden_cosine_ignores_scale():
    student, _ = hidden_pair()
    got = hidden_cosine(3.0 * student, student, MASK, reduction="none")
    assert_close(got, torch.zeros(BATCH, dtype=torch.float64))
    opposite = hidden_cosine(-student, student, MASK, reduction="none")
    assert_close(opposite[MASK.sum(-1) > 0], torch.full((4,), 2.0, dtype=torch.float64))


def test_relation_kl_is_invariant_to_an_orthogonal_map_of_the_student():
    """x xᵀ is unchanged by x -> x Q within each relation head (Q orthogonal)."""
    student, teacher = relation_pair()
    d = STUDENT_WIDTH // 2
    rotation = torch.linalg.qr(randn(d, d, seed=9))[0]
    rotated = torch.cat([student[..., :d] @ rotation, student[..., d:] @ rotation], dim=-1)
    kwargs = {"num_relation_heads": 2, "reduction": "none"}
    assert_close(
        minilm_relation_kl(rotated, teacher, MASK, **kwargs),
        minilm_relation_kl(student, teacher, MASK, **kwargs),
    )


# ----- reductions, masks, dtypes ----------------------------------------------------------


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_reductions(name):
    loss, make = LOSSES[name]
    student, teacher = make()
    per_sequence = loss(student, teacher, MASK, reduction="none")
    assert per_sequence.shape == (BATCH,)
    assert_close(loss(student, teacher, MASK, reduction="mean"), per_sequence.mean())
    assert_close(loss(student, teacher, MASK, reduction="sum"), per_sequence.sum())
    assert_close(loss(student, teacher, MASK), per_sequence.mean())  # default is "mean"


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_mask_none_means_every_token_is_real(name):
    loss, make = LOSSES[name]
    every = torch.ones_like(MASK)
    student, teacher = make(mask=every) if make is attention_pair else make()
    assert_close(loss(student, teacher, None), loss(student, teacher, every))


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_mask_dtypes_agree(name):
    loss, make = LOSSES[name]
    student, teacher = make()
    expected = loss(student, teacher, MASK, reduction="none")
    for mask in (MASK.bool(), MASK.float(), MASK.int()):
        assert_close(loss(student, teacher, mask, reduction="none"), expected)


@pytest.mark.filterwarnings("ignore:Anomaly Detection has been enabled")
@pytest.mark.parametrize("name", sorted(LOSSES))
def test_padding_neither_counts_nor_gets_gradient(name):
    """NaN or huge values at padded positions change nothing; their gradient is exactly 0."""
    loss, make = LOSSES[name]
    clean_student, clean_teacher = make()
    inputs = {}
    for fill in ("clean", "nan", "huge"):
        student, teacher = clean_student.clone(), clean_teacher.clone()
        if fill != "clean":
            value = math.nan if fill == "nan" else 1e30
            student[padded_region(student)] = value
            teacher[padded_region(teacher)] = value
        student.requires_grad_(True)
        teacher.requires_grad_(True)
        with torch.autograd.detect_anomaly():  # no NaN anywhere in the backward pass
            total = loss(student, teacher, MASK, reduction="sum")
            total.backward()
        inputs[fill] = (total.detach(), student.grad, teacher.grad)

    clean_total, clean_grad_s, clean_grad_t = inputs["clean"]
    for fill in ("nan", "huge"):
        total, grad_s, grad_t = inputs[fill]
        assert_close(total, clean_total)
        for grad, clean_grad in ((grad_s, clean_grad_s), (grad_t, clean_grad_t)):
            assert torch.isfinite(grad).all()
            assert (grad[padded_region(grad)] == 0).all()
            assert_close(grad, clean_grad)


@pytest.mark.filterwarnings("ignore:Anomaly Detection has been enabled")
@pytest.mark.parametrize("name", sorted(LOSSES))
def test_all_padding_batch_gives_zero_with_zero_gradient(name):
    loss, make = LOSSES[name]
    student, teacher = make()
    student.requires_grad_(True)
    none = torch.zeros_like(MASK)
    for reduction in ("mean", "sum"):
        with torch.autograd.detect_anomaly():  # no NaN anywhere in the backward pass
            total = loss(student, teacher, none, reduction=reduction)
            (grad,) = torch.autograd.grad(total, student)
        assert total.item() == 0.0
        assert (grad == 0).all()


@pytest.mark.parametrize("name", sorted(LOSSES))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_compute_in_float32(name, dtype):
    loss, make = LOSSES[name]
    student, teacher = (x.to(dtype) for x in make())
    got = loss(student, teacher, MASK, reduction="none")
    assert got.dtype == torch.float32
    assert_close(got, loss(student.float(), teacher.float(), MASK, reduction="none"))


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_float64_stays_float64(name):
    loss, make = LOSSES[name]
    student, teacher = make()
    assert loss(student, teacher, MASK).dtype == torch.float64
    assert loss(student.float(), teacher, MASK).dtype == torch.float64


# ----- gradients --------------------------------------------------------------------------

SMALL_MASK = torch.tensor([[1, 1, 1], [1, 1, 0]])


def masked_softmax(scores):
    return hf_probs(scores, SMALL_MASK)


GRADCHECKS = {
    "hidden_mse": (lambda s, t: hidden_mse(s, t, SMALL_MASK), (2, 3, 4), (2, 3, 4)),
    "embedding_mse": (lambda s, t: embedding_mse(s, t, SMALL_MASK), (2, 3, 4), (2, 3, 4)),
    "hidden_cosine": (lambda s, t: hidden_cosine(s, t, SMALL_MASK), (2, 3, 4), (2, 3, 4)),
    "attention_mse": (lambda s, t: attention_mse(s, t, SMALL_MASK), (2, 2, 3, 3), (2, 2, 3, 3)),
    "attention_kl": (
        lambda s, t: attention_kl(masked_softmax(s), masked_softmax(t), SMALL_MASK),
        (2, 2, 3, 3),
        (2, 2, 3, 3),
    ),
    "minilm_attention_kl": (
        lambda s, t: minilm_attention_kl(
            s, s.flip(-1), t, t.flip(-1), SMALL_MASK, num_relation_heads=2
        ),
        (2, 3, 4),
        (2, 3, 6),
    ),
    "minilm_relation_kl": (
        lambda s, t: minilm_relation_kl(s, t, SMALL_MASK, num_relation_heads=2),
        (2, 3, 4),
        (2, 3, 6),
    ),
    "minilm_value_relation_kl": (
        lambda s, t: minilm_value_relation_kl(
            s, t, SMALL_MASK, num_relation_heads=1, reduction="sum"
        ),
        (2, 3, 4),
        (2, 3, 6),
    ),
}


@pytest.mark.parametrize("name", sorted(GRADCHECKS))
def test_gradcheck_float64(name):
    fn, student_shape, teacher_shape = GRADCHECKS[name]
    student = randn(*student_shape, seed=1).requires_grad_(True)
    teacher = randn(*teacher_shape, seed=2).requires_grad_(True)
    assert torch.autograd.gradcheck(fn, (student, teacher))


def test_every_loss_is_listed():
    assert set(TRANSFORMER_LOSSES) == set(LOSSES) == set(GRADCHECKS)
    for name, loss in TRANSFORMER_LOSSES.items():
        assert loss.__name__ == name


# ----- bad inputs -------------------------------------------------------------------------

H, A = hidden_pair(), attention_pair()
R = relation_pair()


BAD_INPUTS = {
    "hidden ndim": (
        lambda: hidden_mse(H[0][0], H[1][0], MASK[0]),
        r"student_hidden must be a 3-D tensor \(batch, tokens, hidden\); got shape \(5, 8\)",
    ),
    "hidden not a tensor": (
        lambda: hidden_cosine(H[0].tolist(), H[1], MASK),
        "student_hidden must be a torch.Tensor; got list",
    ),
    "hidden integer": (
        lambda: embedding_mse(H[0].long(), H[1], MASK),
        "embedding_mse: student_hidden must be a floating-point tensor; got torch.int64",
    ),
    "hidden width": (
        lambda: hidden_mse(H[0], randn(BATCH, TOKENS, 12, seed=0), MASK),
        r"student_hidden has width 8 but teacher_hidden has width 12.*nn\.Linear\(8, 12\)",
    ),
    "cosine width": (
        lambda: hidden_cosine(H[0], randn(BATCH, TOKENS, 12, seed=0), MASK),
        "hidden_cosine: student_hidden has width 8 but teacher_hidden has width 12",
    ),
    "tokens differ": (
        lambda: hidden_mse(H[0], H[1][:, :4], MASK),
        r"teacher_hidden has shape \(5, 4, 8\).*same batch of tokens",
    ),
    "batch differs": (
        lambda: minilm_relation_kl(R[0], R[1][:2], MASK, num_relation_heads=2),
        r"student_x has shape \(5, 5, 8\) but teacher_x has shape \(2, 5, 12\)",
    ),
    "attention ndim": (
        lambda: attention_mse(A[0][:, 0], A[1], MASK),
        r"student_attn must be a 4-D tensor \(batch, heads, tokens, tokens\); got shape",
    ),
    "attention not square": (
        lambda: attention_mse(A[0][..., :4], A[1][..., :4], MASK),
        r"student_attn must be square over tokens.*got shape \(5, 3, 5, 4\)",
    ),
    "attention_mse heads": (
        lambda: attention_mse(A[0][:, :2], A[1], MASK),
        "student_attn has 2 heads but teacher_attn has 3.*minilm_relation_kl",
    ),
    "attention_kl heads": (
        lambda: attention_kl(A[0], A[1][:, :1], MASK),
        "student_attn has 3 heads but teacher_attn has 1",
    ),
    "attention_kl dropout rows": (
        lambda: attention_kl(A[0] / 0.9, A[1], MASK),
        r"student_attn must sum to 1 over the real keys; the row at \(batch 0, head 0, query 0\) "
        r"sums to 1\.111.*attention_probs_dropout_prob=0",
    ),
    "attention_kl scores": (
        lambda: attention_kl(randn(BATCH, HEADS, TOKENS, TOKENS, seed=0), A[1], MASK),
        "student_attn has negative entries.*not scores",
    ),
    "attention_kl other mask": (
        lambda: attention_kl(*attention_pair(mask=torch.ones_like(MASK)), MASK),
        r"row at \(batch 1, head 0, query 0\) sums to",
    ),
    "relation heads do not divide": (
        lambda: minilm_relation_kl(R[0], R[1], MASK, num_relation_heads=3),
        r"num_relation_heads=3 must divide every hidden width, but student_x has width 8\. "
        r"Choose a number of relation heads that divides 8 and 12: one of \[1, 2, 4\]",
    ),
    "relation heads zero": (
        lambda: minilm_value_relation_kl(R[0], R[1], MASK, num_relation_heads=0),
        "The 'num_relation_heads' parameter of minilm_value_relation_kl must be a positive int. "
        "Got 0 instead.",
    ),
    "relation heads float": (
        lambda: minilm_relation_kl(R[0], R[1], MASK, num_relation_heads=2.0),
        "must be a positive int. Got 2.0 instead",
    ),
    "relation heads bool": (
        lambda: minilm_relation_kl(R[0], R[1], MASK, num_relation_heads=True),
        "must be a positive int. Got True instead",
    ),
    "q and k differ": (
        lambda: minilm_attention_kl(R[0], R[0][..., :4], R[1], R[1], MASK, num_relation_heads=2),
        r"student_q has shape \(5, 5, 8\) but student_k has shape \(5, 5, 4\)",
    ),
    "mask shape": (
        lambda: hidden_mse(H[0], H[1], MASK[:, None, None, :]),
        r"attention_mask has shape \(5, 1, 1, 5\) but the inputs are \(batch, tokens\) = \(5, 5\)",
    ),
    "mask values": (
        lambda: attention_mse(*A, MASK * 2),
        r"attention_mask must hold 1 for real tokens and 0 for padding; got 2 at \(batch 0, token 0\)",
    ),
    "additive mask values": (
        lambda: hidden_mse(*H, (1 - MASK) * -10000.0),
        r"got -10000\.0 at \(batch 1, token 3\)",
    ),
    "mask type": (
        lambda: hidden_mse(*H, MASK.tolist()),
        "attention_mask must be a torch.Tensor or None; got list",
    ),
    "reduction": (
        lambda: hidden_mse(*H, MASK, reduction="batchmean"),
        "The 'reduction' parameter of hidden_mse must be one of 'mean', 'sum', 'none'. "
        "Got 'batchmean' instead.",
    ),
    "empty batch": (
        lambda: hidden_mse(H[0][:0], H[1][:0], MASK[:0]),
        "hidden_mse: got no tokens",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_inputs_raise(case):
    call, message = BAD_INPUTS[case]
    with pytest.raises(LossInputError, match=message):
        call()


def test_one_message_lists_every_problem():
    with pytest.raises(LossInputError) as caught:
        minilm_relation_kl(R[0], R[1][:, :4], MASK[:, :3], num_relation_heads=3, reduction="avg")
    message = str(caught.value)
    assert "'reduction'" in message
    assert "same batch of tokens" in message
    assert "num_relation_heads=3 must divide" in message
    assert "attention_mask has shape (5, 3)" in message
    with pytest.raises(LossInputError) as caught:
        minilm_relation_kl(R[0][0], R[1], MASK, num_relation_heads=-1, reduction="avg")
    message = str(caught.value)
    assert "'reduction'" in message and "'num_relation_heads'" in message
    assert "student_x must be a 3-D tensor" in message


# ----- a tiny Hugging Face BERT ------------------------------------------------------------


def _bert(hidden: int, heads: int, seed: int):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    config = transformers.BertConfig(
        vocab_size=64,
        hidden_size=hidden,
        num_hidden_layers=2,
        num_attention_heads=heads,
        intermediate_size=2 * hidden,
        max_position_embeddings=16,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,  # HF drops out the returned attention maps
        attn_implementation="eager",
    )
    return transformers.BertModel(config)


def _run(model, input_ids, mask, layer):
    """Forward with hidden states, attentions and the layer's Q/K/V from forward hooks."""
    modules = dict(model.named_modules())
    captured = {}
    handles = []
    for part in ("query", "key", "value"):
        module = modules[f"encoder.layer.{layer}.attention.self.{part}"]
        assert isinstance(module, torch.nn.Linear)

        def hook(_module, _inputs, output, part=part):
            captured[part] = output  # (B, T, H)

        handles.append(module.register_forward_hook(hook))
    try:
        outputs = model(
            input_ids=input_ids,
            attention_mask=mask,
            output_hidden_states=True,
            output_attentions=True,
        )
    finally:
        for handle in handles:
            handle.remove()
    return outputs, captured


def _all_losses(student_out, student_qkv, teacher_out, teacher_qkv, mask, projector):
    s_hidden, t_hidden = student_out.hidden_states, teacher_out.hidden_states
    return {
        "embedding_mse": embedding_mse(projector(s_hidden[0]), t_hidden[0], mask),
        "hidden_mse": hidden_mse(projector(s_hidden[2]), t_hidden[2], mask),
        "hidden_cosine": hidden_cosine(projector(s_hidden[2]), t_hidden[2], mask),
        "attention_mse": attention_mse(student_out.attentions[1], teacher_out.attentions[1], mask),
        "attention_kl": attention_kl(student_out.attentions[1], teacher_out.attentions[1], mask),
        "minilm_attention_kl": minilm_attention_kl(
            student_qkv["query"],
            student_qkv["key"],
            teacher_qkv["query"],
            teacher_qkv["key"],
            mask,
            num_relation_heads=2,
        ),
        "minilm_value_relation_kl": minilm_value_relation_kl(
            student_qkv["value"], teacher_qkv["value"], mask, num_relation_heads=2
        ),
        **{
            f"minilm_relation_kl_{part}": minilm_relation_kl(
                student_qkv[part], teacher_qkv[part], mask, num_relation_heads=8
            )
            for part in ("query", "key", "value")
        },
    }


def test_losses_on_a_tiny_bert():
    teacher = _bert(hidden=32, heads=2, seed=0).eval()
    student = _bert(hidden=16, heads=2, seed=1).train()
    projector = torch.nn.Linear(16, 32)
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(1, 64, (3, 7), generator=generator)
    mask = torch.tensor([[1] * 7, [1] * 5 + [0] * 2, [1] * 2 + [0] * 5])

    with torch.no_grad():
        teacher_out, teacher_qkv = _run(teacher, input_ids, mask, layer=1)
    student_out, student_qkv = _run(student, input_ids, mask, layer=1)
    assert len(teacher_out.hidden_states) == 3 and len(teacher_out.attentions) == 2
    assert teacher_out.attentions[1].shape == (3, 2, 7, 7)
    assert teacher_qkv["query"].shape == (3, 7, 32) and student_qkv["value"].shape == (3, 7, 16)

    losses = _all_losses(student_out, student_qkv, teacher_out, teacher_qkv, mask, projector)
    for name, value in losses.items():
        assert value.ndim == 0 and torch.isfinite(value) and value > 0, name
    # the Q/K form is the model's own attention distribution when R = the models' heads
    assert_close(losses["minilm_attention_kl"], losses["attention_kl"], rtol=1e-4, atol=1e-6)

    sum(losses.values()).backward()
    grads = [p.grad for p in (*student.parameters(), *projector.parameters())]
    used = [g for g in grads if g is not None]
    assert len(used) > 0.9 * len(grads)
    assert all(torch.isfinite(g).all() for g in used)
    assert any(g.abs().sum() > 0 for g in used)
    assert all(p.grad is None for p in teacher.parameters())

    # the tokens behind the padding do not matter to any loss
    noise = torch.randint(1, 64, input_ids.shape, generator=generator)
    other_ids = torch.where(mask.bool(), input_ids, noise)
    with torch.no_grad():
        teacher_again, teacher_qkv_again = _run(teacher, other_ids, mask, layer=1)
        student_again, student_qkv_again = _run(student, other_ids, mask, layer=1)
        again = _all_losses(
            student_again, student_qkv_again, teacher_again, teacher_qkv_again, mask, projector
        )
    for name, value in again.items():
        assert_close(value, losses[name].detach(), rtol=1e-5, atol=1e-6, msg=name)
