"""Logit losses: naive references, identities, gradients, reductions, dtypes, bad inputs."""

from __future__ import annotations

import inspect
import math

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from kdistill.errors import LossInputError
from kdistill.losses import (
    LOGIT_LOSSES,
    NEEDS_LABELS,
    bce_kd_loss,
    cross_entropy,
    dist_loss,
    dkd_loss,
    jsd_loss,
    kd_loss,
    kl_divergence,
    logit_mse_loss,
    reverse_kl_divergence,
    skew_kl_loss,
    skew_reverse_kl_loss,
    soft_target_cross_entropy,
    total_variation_loss,
)

BATCH, CLASSES = 4, 7
DIVERGENCES = {  # zero when student == teacher, non-negative otherwise
    "kl": kl_divergence,
    "reverse_kl": reverse_kl_divergence,
    "kd": lambda s, t, **kw: kd_loss(s, t, temperature=2.0, **kw),
    "jsd": jsd_loss,
    "skew_kl": skew_kl_loss,
    "skew_reverse_kl": skew_reverse_kl_loss,
    "tvd": total_variation_loss,
    "logit_mse": logit_mse_loss,
}

LOSS_KWARGS = {  # non-default settings so every branch has work to do
    "cross_entropy": {"label_smoothing": 0.1},
    "soft_target_ce": {"temperature": 2.0},
    "kl": {"temperature": 2.0},
    "reverse_kl": {"temperature": 2.0},
    "kd": {"temperature": 2.0},
    "jsd": {"beta": 0.3, "temperature": 2.0},
    "skew_kl": {"alpha": 0.2, "temperature": 2.0},
    "skew_reverse_kl": {"alpha": 0.2, "temperature": 2.0},
    "tvd": {"temperature": 2.0},
    "logit_mse": {},
    "dkd": {"temperature": 2.0},
    "dist": {"temperature": 2.0},
    "bce_kd": {"temperature": 2.0},
}


def make_logits(seed: int = 0, dtype: torch.dtype = torch.float64, batch: int = BATCH):
    generator = torch.Generator().manual_seed(seed)
    student = 3 * torch.randn(batch, CLASSES, generator=generator, dtype=torch.float64)
    teacher = 3 * torch.randn(batch, CLASSES, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, CLASSES, (batch,), generator=generator)
    return student.to(dtype), teacher.to(dtype), labels


def call(name: str, student, teacher, labels, **kwargs):
    """Call LOGIT_LOSSES[name] with the inputs its signature takes."""
    loss = LOGIT_LOSSES[name]
    if name == "cross_entropy":
        return loss(student, labels, **kwargs)
    if name == "dkd":
        return loss(student, teacher, labels, **kwargs)
    return loss(student, teacher, **kwargs)


# ----- naive references: one sample and one class at a time -------------------------------


def probs(logits_row, temperature):
    exps = [math.exp(z / temperature) for z in logits_row.tolist()]
    return [e / sum(exps) for e in exps]


def ref_kl(p, q):
    return sum(pc * math.log(pc / qc) for pc, qc in zip(p, q))


def per_row(fn, student, teacher, temperature=2.0):
    rows = [fn(probs(s, temperature), probs(t, temperature)) for s, t in zip(student, teacher)]
    return torch.tensor(rows, dtype=torch.float64)


def ref_jsd(p_s, p_t, beta):
    m = [beta * t + (1 - beta) * s for s, t in zip(p_s, p_t)]
    return beta * ref_kl(p_t, m) + (1 - beta) * ref_kl(p_s, m)


REFERENCES = {
    "soft_target_ce": lambda p_s, p_t: -sum(t * math.log(s) for s, t in zip(p_s, p_t)),
    "kl": lambda p_s, p_t: ref_kl(p_t, p_s),
    "reverse_kl": lambda p_s, p_t: ref_kl(p_s, p_t),
    "jsd": lambda p_s, p_t: ref_jsd(p_s, p_t, beta=0.3),
    "skew_kl": lambda p_s, p_t: ref_kl(p_t, [0.2 * t + 0.8 * s for s, t in zip(p_s, p_t)]),
    "skew_reverse_kl": lambda p_s, p_t: ref_kl(p_s, [0.2 * s + 0.8 * t for s, t in zip(p_s, p_t)]),
    "tvd": lambda p_s, p_t: 0.5 * sum(abs(t - s) for s, t in zip(p_s, p_t)),
}


@pytest.mark.parametrize("name", sorted(REFERENCES))
def test_divergence_matches_naive_reference(name):
    student, teacher, labels = make_logits()
    got = call(name, student, teacher, labels, reduction="none", **LOSS_KWARGS[name])
    assert_close(got, per_row(REFERENCES[name], student, teacher))


def test_kd_loss_matches_naive_reference():
    student, teacher, _ = make_logits()
    expected = 9.0 * per_row(lambda p_s, p_t: ref_kl(p_t, p_s), student, teacher, temperature=3.0)
    assert_close(kd_loss(student, teacher, temperature=3.0, reduction="none"), expected)


def test_cross_entropy_matches_naive_reference():
    student, _, labels = make_logits()
    epsilon = 0.1
    expected = []
    for row, label in zip(student, labels.tolist()):
        log_p = [math.log(p) for p in probs(row, 1.0)]
        expected.append(-(1 - epsilon) * log_p[label] - epsilon * sum(log_p) / CLASSES)
    got = cross_entropy(student, labels, label_smoothing=epsilon, reduction="none")
    assert_close(got, torch.tensor(expected, dtype=torch.float64))


def test_logit_mse_matches_naive_reference():
    student, teacher, _ = make_logits()
    expected = [
        sum((s - t) ** 2 for s, t in zip(s_row.tolist(), t_row.tolist())) / CLASSES
        for s_row, t_row in zip(student, teacher)
    ]
    got = logit_mse_loss(student, teacher, reduction="none")
    assert_close(got, torch.tensor(expected, dtype=torch.float64))


def test_bce_kd_matches_naive_reference():
    student, teacher, _ = make_logits()
    temperature = 2.0

    def bce(s, t):
        q, p = 1 / (1 + math.exp(-s / temperature)), 1 / (1 + math.exp(-t / temperature))
        return -(p * math.log(q) + (1 - p) * math.log(1 - q))

    expected = [
        temperature**2 * sum(bce(s, t) for s, t in zip(s_row.tolist(), t_row.tolist()))
        for s_row, t_row in zip(student, teacher)
    ]
    got = bce_kd_loss(student, teacher, temperature=temperature, reduction="none")
    assert_close(got, torch.tensor(expected, dtype=torch.float64))


def mdistiller_dkd_loss(logits_student, logits_teacher, target, alpha, beta, temperature):
    """mdistiller's dkd_loss (mdistiller/distillers/DKD.py), size_average=False -> 'sum'."""
    gt_mask = torch.zeros_like(logits_student).scatter_(1, target.unsqueeze(1), 1).bool()
    other_mask = torch.ones_like(logits_student).scatter_(1, target.unsqueeze(1), 0).bool()

    def cat_mask(t, mask1, mask2):
        return torch.cat([(t * mask1).sum(1, keepdim=True), (t * mask2).sum(1, keepdim=True)], 1)

    pred_student = cat_mask(F.softmax(logits_student / temperature, dim=1), gt_mask, other_mask)
    pred_teacher = cat_mask(F.softmax(logits_teacher / temperature, dim=1), gt_mask, other_mask)
    tckd_loss = (
        F.kl_div(torch.log(pred_student), pred_teacher, reduction="sum")
        * temperature**2
        / target.shape[0]
    )
    pred_teacher_part2 = F.softmax(logits_teacher / temperature - 1000.0 * gt_mask, dim=1)
    log_pred_student_part2 = F.log_softmax(logits_student / temperature - 1000.0 * gt_mask, dim=1)
    nckd_loss = (
        F.kl_div(log_pred_student_part2, pred_teacher_part2, reduction="sum")
        * temperature**2
        / target.shape[0]
    )
    return alpha * tckd_loss + beta * nckd_loss


@pytest.mark.parametrize(("alpha", "beta", "temperature"), [(1.0, 8.0, 4.0), (0.5, 2.0, 1.0)])
def test_dkd_matches_mdistiller(alpha, beta, temperature):
    student, teacher, labels = make_logits()
    expected = mdistiller_dkd_loss(student, teacher, labels, alpha, beta, temperature)
    got = dkd_loss(student, teacher, labels, alpha=alpha, beta=beta, temperature=temperature)
    assert_close(got, expected)


def test_dkd_terms_separate():
    student, teacher, labels = make_logits()
    tckd_only = dkd_loss(student, teacher, labels, alpha=1.0, beta=0.0)
    nckd_only = dkd_loss(student, teacher, labels, alpha=0.0, beta=1.0)
    assert_close(mdistiller_dkd_loss(student, teacher, labels, 1.0, 0.0, 4.0), tckd_only)
    assert_close(mdistiller_dkd_loss(student, teacher, labels, 0.0, 1.0, 4.0), nckd_only)
    assert tckd_only > 0 and nckd_only > 0


def official_dist_loss(z_s, z_t, beta, gamma, tau):
    """DIST from github.com/hunto/DIST_KD (classification/lib/models/losses/dist_kd.py)."""

    def pearson_correlation(a, b, eps=1e-8):
        a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
        return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1) + eps)

    def inter_class_relation(y_s, y_t):
        return 1 - pearson_correlation(y_s, y_t).mean()

    y_s, y_t = (z_s / tau).softmax(dim=1), (z_t / tau).softmax(dim=1)
    inter_loss = tau**2 * inter_class_relation(y_s, y_t)
    intra_loss = tau**2 * inter_class_relation(y_s.transpose(0, 1), y_t.transpose(0, 1))
    return beta * inter_loss + gamma * intra_loss


def test_dist_matches_official():
    student, teacher, _ = make_logits()
    expected = official_dist_loss(student, teacher, beta=2.0, gamma=0.5, tau=3.0)
    assert_close(dist_loss(student, teacher, beta=2.0, gamma=0.5, temperature=3.0), expected)


# ----- identities -------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(DIVERGENCES))
def test_divergence_of_identical_inputs_is_zero(name):
    student, _, _ = make_logits()
    got = DIVERGENCES[name](student, student.clone(), reduction="none")
    assert_close(got, torch.zeros(BATCH, dtype=torch.float64))


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("name", sorted(DIVERGENCES))
def test_divergence_is_positive_for_different_inputs(name, seed):
    student, teacher, _ = make_logits(seed)
    assert (DIVERGENCES[name](student, teacher, reduction="none") > 0).all()


def test_dist_of_identical_inputs_is_zero():
    # Zero up to the official eps (1e-8) in the Pearson denominator, which matters only for a
    # class whose probability barely varies over the batch; unit-scale logits avoid that.
    student = make_logits()[0] / 3
    zero = torch.tensor(0.0, dtype=torch.float64)
    assert_close(dist_loss(student, student.clone()), zero, rtol=0, atol=1e-5)
    assert dist_loss(student, make_logits(1)[0] / 3) > 0.1


@pytest.mark.parametrize("temperature", [0.5, 1.0, 4.0])
def test_kd_loss_is_t_squared_times_kl(temperature):
    student, teacher, _ = make_logits()
    kl = kl_divergence(student, teacher, temperature=temperature)
    assert_close(kd_loss(student, teacher, temperature=temperature), temperature**2 * kl)


def test_soft_target_ce_is_kl_plus_teacher_entropy():
    student, teacher, _ = make_logits()
    p_t = torch.softmax(teacher / 2.0, dim=-1)
    entropy = -(p_t * p_t.log()).sum(dim=-1)
    kl = kl_divergence(student, teacher, temperature=2.0, reduction="none")
    got = soft_target_cross_entropy(student, teacher, temperature=2.0, reduction="none")
    assert_close(got, kl + entropy)


def test_jsd_endpoints_are_exact_forward_and_reverse_kl():
    student, teacher, _ = make_logits()
    assert torch.equal(jsd_loss(student, teacher, beta=0.0), kl_divergence(student, teacher))
    assert torch.equal(
        jsd_loss(student, teacher, beta=1.0), reverse_kl_divergence(student, teacher)
    )


def test_jsd_interior_tends_to_scaled_kl_at_the_endpoints():
    # The documented convention: JSD_beta -> 0 at both ends, while JSD_beta / beta ->
    # forward KL and JSD_beta / (1 - beta) -> reverse KL; the endpoints are those limits.
    student, teacher, _ = make_logits()
    eps = 1e-8  # the gap closes linearly in eps; peaked distributions need a small one
    forward, reverse = kl_divergence(student, teacher), reverse_kl_divergence(student, teacher)
    assert_close(jsd_loss(student, teacher, beta=eps) / eps, forward, rtol=1e-4, atol=0)
    assert_close(jsd_loss(student, teacher, beta=1 - eps) / eps, reverse, rtol=1e-4, atol=0)


def test_jsd_half_is_symmetric():
    student, teacher, _ = make_logits()
    assert_close(jsd_loss(student, teacher, beta=0.5), jsd_loss(teacher, student, beta=0.5))
    assert jsd_loss(student, teacher, beta=0.5) <= math.log(2)


def test_skew_kl_endpoints():
    student, teacher, _ = make_logits()
    assert_close(skew_kl_loss(student, teacher, alpha=0.0), kl_divergence(student, teacher))
    assert_close(
        skew_reverse_kl_loss(student, teacher, alpha=0.0), reverse_kl_divergence(student, teacher)
    )
    zero = torch.tensor(0.0, dtype=torch.float64)
    assert_close(skew_kl_loss(student, teacher, alpha=1.0), zero)
    assert_close(skew_reverse_kl_loss(student, teacher, alpha=1.0), zero)


def test_skew_kl_endpoint_gradient_is_finite():
    student, teacher, _ = make_logits()
    for loss in (skew_kl_loss, skew_reverse_kl_loss):
        student_leaf = student.clone().requires_grad_()
        loss(student_leaf, teacher, alpha=0.0).backward()
        assert torch.isfinite(student_leaf.grad).all()


def test_total_variation_is_bounded():
    student, teacher, _ = make_logits()
    tvd = total_variation_loss(student, teacher, reduction="none")
    assert ((tvd > 0) & (tvd <= 1)).all()
    disjoint = torch.tensor([[100.0, 0.0]], dtype=torch.float64)
    assert_close(total_variation_loss(disjoint, disjoint.flip(-1)), disjoint.new_tensor(1.0))


def test_bce_kd_is_minimal_with_zero_gradient_at_the_teacher():
    _, teacher, _ = make_logits()
    student = teacher.clone().requires_grad_()
    at_teacher = bce_kd_loss(student, teacher, temperature=2.0)
    at_teacher.backward()
    assert_close(student.grad, torch.zeros_like(student))
    assert at_teacher > 0  # the teacher's binary entropy, not zero
    perturbed = teacher + 0.1 * torch.randn(teacher.shape, dtype=torch.float64)
    assert bce_kd_loss(perturbed, teacher, temperature=2.0) > at_teacher


# ----- gradients, reductions, dtypes --------------------------------------------------------


def test_every_loss_is_tested_and_labels_match_signatures():
    assert set(LOSS_KWARGS) == set(LOGIT_LOSSES)
    takes_labels = {
        name
        for name, loss in LOGIT_LOSSES.items()
        if "labels" in inspect.signature(loss).parameters
    }
    assert takes_labels == NEEDS_LABELS


@pytest.mark.parametrize("name", sorted(LOGIT_LOSSES))
def test_gradcheck_student(name):
    student, teacher, labels = make_logits(batch=3)
    student.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda s: call(name, s, teacher, labels, reduction="none", **LOSS_KWARGS[name]), (student,)
    )


@pytest.mark.parametrize("name", sorted(LOGIT_LOSSES))
def test_reductions_agree(name):
    student, teacher, labels = make_logits()
    per_sample = call(name, student, teacher, labels, reduction="none", **LOSS_KWARGS[name])
    assert per_sample.shape == (BATCH,)
    mean = call(name, student, teacher, labels, reduction="mean", **LOSS_KWARGS[name])
    total = call(name, student, teacher, labels, reduction="sum", **LOSS_KWARGS[name])
    assert mean.shape == total.shape == ()
    assert_close(mean, per_sample.mean())
    assert_close(total, per_sample.sum())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", sorted(LOGIT_LOSSES))
def test_half_precision_gives_finite_float32(name, dtype):
    student, teacher, labels = make_logits(dtype=dtype)
    got = call(name, student, teacher, labels, reduction="none", **LOSS_KWARGS[name])
    assert got.dtype == torch.float32
    assert torch.isfinite(got).all()
    expected = call(
        name, student.double(), teacher.double(), labels, reduction="none", **LOSS_KWARGS[name]
    )
    assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)


def test_mixed_dtypes_compute_in_the_wider_one():
    student, teacher, _ = make_logits()
    got = kl_divergence(student.float(), teacher.bfloat16())
    assert got.dtype == torch.float32
    assert kl_divergence(student, teacher.float()).dtype == torch.float64


# ----- bad inputs ---------------------------------------------------------------------------

S, T, Y = make_logits()
BAD_INPUTS = {
    "temperature zero": (
        lambda: kd_loss(S, T, temperature=0),
        "The 'temperature' parameter of kd_loss must be a float in (0, inf). Got 0 instead.",
    ),
    "temperature negative": (
        lambda: kl_divergence(S, T, temperature=-1),
        "The 'temperature' parameter of kl_divergence must be a float in (0, inf). Got -1",
    ),
    "temperature nan": (lambda: kd_loss(S, T, temperature=math.nan), "Got nan instead."),
    "temperature inf": (lambda: kd_loss(S, T, temperature=math.inf), "Got inf instead."),
    "temperature bool": (lambda: kd_loss(S, T, temperature=True), "Got True instead."),
    "temperature string": (lambda: kd_loss(S, T, temperature="2"), "Got '2' instead."),
    "shape mismatch": (
        lambda: kd_loss(S, T[:, :6], temperature=1.0),
        "kd_loss: student_logits has shape (4, 7) but teacher_logits has shape (4, 6); "
        "both must be (batch, classes) with the same number of classes.",
    ),
    "1-D input": (
        lambda: kd_loss(S[0], T[0], temperature=1.0),
        "student_logits must be a 2-D tensor (batch, classes); got shape (7,)",
    ),
    "integer logits": (
        lambda: kl_divergence(S, Y[:, None].expand(-1, 7)),
        "teacher_logits must be a floating-point tensor; got torch.int64",
    ),
    "label too large": (
        lambda: dkd_loss(S, T, torch.tensor([0, 1, 7, 2])),
        "dkd_loss: labels must be class indices in [0, 7); got 7 at position 2.",
    ),
    "label negative": (
        lambda: cross_entropy(S, torch.tensor([0, -100, 1, 2])),
        "got -100 at position 1. There is no ignore index",
    ),
    "float labels": (
        lambda: cross_entropy(S, Y.double()),
        "labels must be an integer tensor of class indices; got torch.float64",
    ),
    "labels wrong length": (lambda: dkd_loss(S, T, Y[:3]), "labels has shape (3,)"),
    "beta above one": (
        lambda: jsd_loss(S, T, beta=1.5),
        "The 'beta' parameter of jsd_loss must be a float in [0, 1]. Got 1.5 instead.",
    ),
    "alpha negative": (
        lambda: skew_kl_loss(S, T, alpha=-0.1),
        "The 'alpha' parameter of skew_kl_loss must be a float in [0, 1]. Got -0.1",
    ),
    "label smoothing one": (
        lambda: cross_entropy(S, Y, label_smoothing=1.0),
        "'label_smoothing' parameter of cross_entropy must be a float in [0, 1). Got 1.0",
    ),
    "dkd weight negative": (
        lambda: dkd_loss(S, T, Y, beta=-8.0),
        "The 'beta' parameter of dkd_loss must be a float in [0, inf). Got -8.0 instead.",
    ),
    "bad reduction": (
        lambda: kl_divergence(S, T, reduction="batchmean"),
        "The 'reduction' parameter of kl_divergence must be one of 'mean', 'sum', 'none'. "
        "Got 'batchmean' instead.",
    ),
    "empty batch": (lambda: kl_divergence(S[:0], T[:0]), "kl_divergence: got an empty batch"),
    "dist batch of one": (
        lambda: dist_loss(S[:1], T[:1]),
        "dist_loss needs a batch of at least 2 samples; got student_logits with shape (1, 7)",
    ),
    "dkd one class": (
        lambda: dkd_loss(S[:, :1], T[:, :1], torch.zeros(BATCH, dtype=torch.long)),
        "dkd_loss needs at least 2 classes",
    ),
    "not a tensor": (
        lambda: kl_divergence(S.tolist(), T),
        "student_logits must be a torch.Tensor; got list",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_raises(case):
    bad_call, fragment = BAD_INPUTS[case]
    with pytest.raises(LossInputError) as raised:
        bad_call()
    assert fragment in str(raised.value)


def test_all_problems_are_reported_at_once():
    with pytest.raises(LossInputError) as raised:
        jsd_loss(S, T[:, :6], beta=2.0, temperature=0.0, reduction="avg")
    message = str(raised.value)
    for fragment in ("'beta'", "'temperature'", "'reduction'", "has shape (4, 6)"):
        assert fragment in message


def test_loss_input_error_is_a_value_error():
    with pytest.raises(ValueError):
        kd_loss(S, T, temperature=-1.0)


# ------------------------------------------------------------- masked classes (−inf)

_DIVERGENCE_LOSSES = ["kd", "kl", "reverse_kl", "jsd", "skew_kl", "skew_reverse_kl", "tvd"]


@pytest.mark.parametrize(
    "name", [n for n in _DIVERGENCE_LOSSES if n != "reverse_kl"] + ["soft_target_ce"]
)
def test_a_masked_teacher_class_gives_finite_values_and_gradients(name: str) -> None:
    """A teacher logit of −inf (a masked class) has probability 0: the loss is what it is
    with that class's logit very low, and neither it nor the gradient is NaN."""
    fn = LOGIT_LOSSES[name]
    kwargs = {"temperature": 2.0}
    torch.manual_seed(0)
    student = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(4, 5, dtype=torch.float64)
    masked, nearly = teacher.clone(), teacher.clone()
    masked[:, 2] = -math.inf
    nearly[:, 2] = -1e4  # probability exp(-5000): 0 in float64 as well
    value = fn(student, masked, **kwargs)
    assert torch.isfinite(value)
    (grad,) = torch.autograd.grad(value, student)
    assert torch.isfinite(grad).all()
    assert_close(value, fn(student, nearly, **kwargs))
    (near_grad,) = torch.autograd.grad(fn(student, nearly, **kwargs), student)
    assert_close(grad, near_grad)


def test_reverse_kl_is_infinite_not_nan_where_the_teacher_masks_a_class() -> None:
    """KL(p_s ‖ p_t) is +inf when the student puts mass on a class the teacher rules out."""
    student, teacher = torch.zeros(2, 3), torch.zeros(2, 3)
    teacher[:, 0] = -math.inf
    assert LOGIT_LOSSES["reverse_kl"](student, teacher).item() == math.inf
    student[:, 0] = -math.inf  # both rule it out: finite again, and 0 here
    assert LOGIT_LOSSES["reverse_kl"](student, teacher).item() == 0.0


def test_the_logit_and_token_losses_share_one_divergence() -> None:
    """The classifier's losses and the language-model token losses compute the same
    divergences (kdistill.losses.divergences): equal values on the same rows."""
    from kdistill.losses.lm_per_token import token_divergence

    torch.manual_seed(1)
    student, teacher = torch.randn(6, 9), torch.randn(6, 9)
    pairs = {"kl": "kl", "reverse_kl": "reverse_kl", "jsd": "jsd", "skew_kl": "skew_kl",
             "skew_reverse_kl": "skew_reverse_kl", "tvd": "tvd"}  # fmt: skip
    for logit_name, kind in pairs.items():
        ours = LOGIT_LOSSES[logit_name](student, teacher, reduction="sum")
        tokens = token_divergence(student, teacher, kind).sum()  # type: ignore[arg-type]
        assert_close(ours, tokens, msg=logit_name)
