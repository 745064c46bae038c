"""Feature losses and CRD: naive references, identities, gradients, reductions, dtypes, bad inputs."""

from __future__ import annotations

import inspect
import math

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from kdistill.errors import LossInputError
from kdistill.losses.crd import CRDMemory, crd_memory_bytes, crd_nce_loss
from kdistill.losses.features import (
    BATCH_RELATIONAL,
    FEATURE_LOSSES,
    attention_loss,
    cc_loss,
    hint_loss,
    nst_loss,
    pkt_loss,
    rkd_angle_loss,
    rkd_distance_loss,
    similarity_loss,
)

BATCH = 4
MAP_LOSSES = {"attention", "nst"}  # take (B, C, H, W) maps
PER_SAMPLE = sorted(set(FEATURE_LOSSES) - BATCH_RELATIONAL)
RELATIONAL = sorted(BATCH_RELATIONAL)


def randn(*shape, seed=0, dtype=torch.float64):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=generator, dtype=torch.float64).to(dtype)


def make_pair(name, seed=0, dtype=torch.float64, batch=BATCH):
    """A student/teacher pair of the kind `name` accepts; widths differ where allowed."""
    if name in MAP_LOSSES:
        return randn(batch, 3, 4, 5, seed=seed, dtype=dtype), randn(
            batch, 5, 4, 5, seed=seed + 100, dtype=dtype
        )
    if name == "hint":
        return randn(batch, 3, 4, seed=seed, dtype=dtype), randn(
            batch, 3, 4, seed=seed + 100, dtype=dtype
        )
    return randn(batch, 6, seed=seed, dtype=dtype), randn(batch, 2, 5, seed=seed + 100, dtype=dtype)


def orthonormal_rows(rows, columns, seed=0):
    """(rows, columns) with orthonormal rows: x ↦ x @ Q keeps inner products."""
    q, _ = torch.linalg.qr(randn(columns, rows, seed=seed))
    return q.T


# ----- naive references: Python loops over samples, positions, channels ---------------------


def norm(vector):
    return math.sqrt(sum(v * v for v in vector))


def normalised(vector, eps=1e-12):
    length = max(norm(vector), eps)
    return [v / length for v in vector]


def dot(a, b):
    return sum(x * y for x, y in zip(a, b))


def huber(x):
    return 0.5 * x * x if abs(x) < 1 else abs(x) - 0.5


def flat(feature):
    return [row.reshape(-1).tolist() for row in feature]


def ref_hint(s, t):
    return [sum((a - b) ** 2 for a, b in zip(x, y)) / len(x) for x, y in zip(flat(s), flat(t))]


def ref_attention_map(feature, p):
    channels, height, width = feature.shape
    values = feature.tolist()
    a = [
        sum(abs(values[c][h][w]) ** p for c in range(channels)) / channels
        for h in range(height)
        for w in range(width)
    ]
    return normalised(a)


def ref_attention(s, t, p=2.0):
    out = []
    for x, y in zip(s, t):
        a_s, a_t = ref_attention_map(x, p), ref_attention_map(y, p)
        out.append(sum((u - v) ** 2 for u, v in zip(a_s, a_t)) / len(a_s))
    return out


def ref_similarity(s, t):
    def gram(feature):
        rows = flat(feature)
        return [normalised([dot(a, b) for b in rows]) for a in rows]

    g_s, g_t = gram(s), gram(t)
    b = len(g_s)
    return sum((g_s[i][j] - g_t[i][j]) ** 2 for i in range(b) for j in range(b)) / b**2


def ref_rkd_distance(s, t):
    def psi(feature):
        rows = flat(feature)
        b = len(rows)
        d = [[math.dist(rows[i], rows[j]) for j in range(b)] for i in range(b)]
        mu = sum(d[i][j] for i in range(b) for j in range(b) if i != j) / (b * (b - 1))
        return [[d[i][j] / mu for j in range(b)] for i in range(b)]

    p_s, p_t = psi(s), psi(t)
    b = len(p_s)
    return sum(huber(p_s[i][j] - p_t[i][j]) for i in range(b) for j in range(b)) / b**2


def ref_rkd_angle(s, t):
    def psi(feature):
        rows = flat(feature)
        b = len(rows)

        def e(a, c):
            if a == c:
                return [0.0] * len(rows[0])
            return normalised([x - y for x, y in zip(rows[c], rows[a])])

        return [[[dot(e(a, i), e(a, j)) for j in range(b)] for i in range(b)] for a in range(b)]

    p_s, p_t = psi(s), psi(t)
    b = len(p_s)
    total = sum(
        huber(p_s[a][i][j] - p_t[a][i][j]) for a in range(b) for i in range(b) for j in range(b)
    )
    return total / b**3


def ref_pkt(s, t, eps=1e-7):
    def probs(feature):
        rows = [[v / (norm(r) + eps) for v in r] for r in flat(feature)]
        kernel = [[(dot(a, b) + 1) / 2 for b in rows] for a in rows]
        return [[k / sum(row) for k in row] for row in kernel]

    p, q = probs(s), probs(t)
    b = len(p)
    total = sum(
        q[i][j] * math.log((q[i][j] + eps) / (p[i][j] + eps)) for i in range(b) for j in range(b)
    )
    return total / b**2


def ref_nst(s, t, degree=2, constant=0.0):
    def k_mean(xs, ys):
        return sum((dot(x, y) + constant) ** degree for x in xs for y in ys) / (len(xs) * len(ys))

    out = []
    for x, y in zip(s, t):
        cs = [normalised(channel.reshape(-1).tolist()) for channel in x]
        ct = [normalised(channel.reshape(-1).tolist()) for channel in y]
        out.append(k_mean(cs, cs) + k_mean(ct, ct) - 2 * k_mean(cs, ct))
    return out


def ref_cc(s, t, gamma=0.4, order=2, kernel="taylor"):
    def corr(feature):
        rows = [normalised(r) for r in flat(feature)]
        if kernel == "rbf":  # from the distance, not the cosine
            return [[math.exp(-gamma * math.dist(a, b) ** 2) for b in rows] for a in rows]
        return [
            [
                sum(
                    math.exp(-2 * gamma) * (2 * gamma) ** p / math.factorial(p) * dot(a, b) ** p
                    for p in range(order + 1)
                )
                for b in rows
            ]
            for a in rows
        ]

    c_s, c_t = corr(s), corr(t)
    b = len(c_s)
    return sum((c_s[i][j] - c_t[i][j]) ** 2 for i in range(b) for j in range(b)) / b**2


REFERENCES = {
    "hint": ref_hint,
    "attention": ref_attention,
    "similarity": ref_similarity,
    "rkd_distance": ref_rkd_distance,
    "rkd_angle": ref_rkd_angle,
    "pkt": ref_pkt,
    "nst": ref_nst,
    "cc": ref_cc,
}


def test_every_loss_has_a_reference_and_the_documented_signature():
    assert set(REFERENCES) == set(FEATURE_LOSSES)
    assert set(BATCH_RELATIONAL) <= set(FEATURE_LOSSES)
    for loss in FEATURE_LOSSES.values():
        parameters = list(inspect.signature(loss).parameters.values())
        assert [p.name for p in parameters[:2]] == ["student_feature", "teacher_feature"]
        assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in parameters[2:])
        assert inspect.signature(loss).parameters["reduction"].default == "mean"
        assert loss.__doc__ and "20" in loss.__doc__  # names the paper's year


@pytest.mark.parametrize("name", sorted(FEATURE_LOSSES))
def test_matches_naive_reference(name):
    student, teacher = make_pair(name)
    reduction = "mean" if name in BATCH_RELATIONAL else "none"
    got = FEATURE_LOSSES[name](student, teacher, reduction=reduction)
    assert_close(got, torch.tensor(REFERENCES[name](student, teacher), dtype=torch.float64))


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [
        ("attention", {"p": 1.0}),
        ("attention", {"p": 3.5}),
        ("nst", {"degree": 1, "constant": 0.5}),
        ("nst", {"degree": 3, "constant": 1.0}),
        ("cc", {"gamma": 1.3, "order": 4}),
        ("cc", {"gamma": 0.7, "kernel": "rbf"}),
    ],
)
def test_hyperparameters_match_naive_reference(name, kwargs):
    student, teacher = make_pair(name, seed=3)
    reduction = "mean" if name in BATCH_RELATIONAL else "none"
    got = FEATURE_LOSSES[name](student, teacher, reduction=reduction, **kwargs)
    expected = REFERENCES[name](student, teacher, **kwargs)
    assert_close(got, torch.tensor(expected, dtype=torch.float64))


def test_similarity_matches_paper_matrix_form():
    """Eq. 4 of Tung & Mori as matrices: G = F Fᵀ, row-normalised, Frobenius² / b²."""
    student, teacher = randn(5, 3, 2, seed=1), randn(5, 7, seed=2)
    g_s = student.reshape(5, -1) @ student.reshape(5, -1).T
    g_t = teacher @ teacher.T
    g_s = g_s / g_s.norm(dim=1, keepdim=True)
    g_t = g_t / g_t.norm(dim=1, keepdim=True)
    expected = torch.linalg.matrix_norm(g_s - g_t) ** 2 / 25
    assert_close(similarity_loss(student, teacher), expected)


# ----- identities ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(FEATURE_LOSSES))
def test_identical_features_give_zero(name):
    _, teacher = make_pair(name)
    assert_close(
        FEATURE_LOSSES[name](teacher.clone(), teacher), torch.tensor(0.0, dtype=torch.float64)
    )


@pytest.mark.parametrize("name", sorted(FEATURE_LOSSES))
@pytest.mark.parametrize("seed", [0, 1])
def test_different_features_give_positive_loss(name, seed):
    student, teacher = make_pair(name, seed=seed)
    if name == "hint" or name in MAP_LOSSES:
        student = randn(*teacher.shape, seed=seed + 7)
    assert FEATURE_LOSSES[name](student, teacher) > 1e-6


def test_attention_ignores_sample_scale_and_channel_order_and_count():
    teacher = randn(3, 4, 3, 3).abs() + 0.1
    scale = torch.tensor([0.5, 2.0, 7.0], dtype=torch.float64)[:, None, None, None]
    student = (teacher * scale)[:, [2, 0, 3, 1]]
    assert_close(attention_loss(student, teacher), torch.tensor(0.0, dtype=torch.float64))
    # two copies of every channel: the same mean over channels
    doubled = torch.cat([teacher, teacher], dim=1)
    assert_close(attention_loss(doubled, teacher), torch.tensor(0.0, dtype=torch.float64))


def test_attention_normalisation_is_unit_l2_per_sample():
    """AT of a map against its negation-free opposite: at = e_0 vs at = e_1 gives 2 / HW."""
    student = torch.zeros(1, 1, 2, 2, dtype=torch.float64)
    teacher = torch.zeros(1, 1, 2, 2, dtype=torch.float64)
    student[0, 0, 0, 0], teacher[0, 0, 1, 1] = 5.0, 0.1
    assert_close(attention_loss(student, teacher), torch.tensor(2 / 4, dtype=torch.float64))


def test_similarity_invariances():
    teacher = randn(5, 4)
    # an orthogonal change of basis into a wider space, and a global scale: unchanged
    student = 3.0 * teacher @ orthonormal_rows(4, 9)
    assert_close(similarity_loss(student, teacher), torch.tensor(0.0, dtype=torch.float64))
    # scaling single samples is not an invariance of SP (rows of G mix both scales)
    scaled = teacher * torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0], dtype=torch.float64)[:, None]
    assert similarity_loss(scaled, teacher) > 1e-4


@pytest.mark.parametrize("loss", [rkd_distance_loss, rkd_angle_loss])
def test_rkd_ignores_scale_rotation_and_translation(loss):
    teacher = randn(5, 4)
    student = 0.01 * teacher @ orthonormal_rows(4, 6) + randn(6, seed=3)
    assert_close(loss(student, teacher), torch.tensor(0.0, dtype=torch.float64))
    assert_close(loss(25.0 * teacher, teacher), torch.tensor(0.0, dtype=torch.float64))


def test_rkd_distance_is_accurate_in_float32_with_a_large_offset():
    """Centring before ‖x‖² + ‖y‖² − 2xy: a shared offset of 1e4 must not break float32."""
    teacher, student = randn(6, 8, seed=1), randn(6, 8, seed=2)
    expected = rkd_distance_loss(student, teacher)
    got = rkd_distance_loss((student + 1e4).float(), (teacher - 1e4).float())
    assert_close(got, expected.float(), rtol=1e-3, atol=1e-5)


def test_pkt_and_cc_ignore_sample_scale_and_rotation():
    teacher = randn(5, 4)
    scale = torch.tensor([0.1, 1.0, 2.0, 5.0, 9.0], dtype=torch.float64)[:, None]
    student = scale * teacher @ orthonormal_rows(4, 7)
    zero = torch.tensor(0.0, dtype=torch.float64)
    assert_close(pkt_loss(student, teacher), zero)
    assert_close(cc_loss(student, teacher), zero)
    assert_close(cc_loss(student, teacher, kernel="rbf"), zero)


def test_cc_taylor_tends_to_the_rbf_kernel():
    student, teacher = randn(6, 5, seed=1), randn(6, 3, seed=2)
    exact = cc_loss(student, teacher, kernel="rbf", gamma=0.8)
    low = cc_loss(student, teacher, order=1, gamma=0.8)
    high = cc_loss(student, teacher, order=25, gamma=0.8)
    assert_close(high, exact)
    assert (low - exact).abs() > 1e-6


def test_nst_is_an_mmd_over_channels():
    teacher = randn(2, 4, 3, 3)
    scale = torch.tensor([0.5, 2.0, 1.0, 3.0], dtype=torch.float64)[None, :, None, None]
    zero = torch.tensor(0.0, dtype=torch.float64)
    # same set of normalised channels: permuted, rescaled or repeated
    assert_close(nst_loss((teacher * scale)[:, [3, 1, 0, 2]], teacher), zero)
    assert_close(nst_loss(torch.cat([teacher, teacher], dim=1), teacher), zero)
    # MMD² is symmetric and non-negative
    student = randn(2, 6, 3, 3, seed=5)
    assert_close(
        nst_loss(student, teacher, reduction="none"), nst_loss(teacher, student, reduction="none")
    )
    assert (nst_loss(student, teacher, reduction="none") > 0).all()


def test_relational_losses_accept_any_trailing_shape():
    teacher = randn(4, 2, 3, 2)
    for name in RELATIONAL:
        loss = FEATURE_LOSSES[name]
        assert_close(loss(teacher, teacher.reshape(4, 12)), torch.tensor(0.0, dtype=torch.float64))


# ----- gradients, reductions, dtypes --------------------------------------------------------


@pytest.mark.parametrize("name", sorted(FEATURE_LOSSES))
def test_gradcheck_both_inputs(name):
    student, teacher = make_pair(name, batch=3)
    student.requires_grad_(True)
    teacher.requires_grad_(True)
    assert torch.autograd.gradcheck(FEATURE_LOSSES[name], (student, teacher))


@pytest.mark.parametrize("name", PER_SAMPLE)
def test_per_sample_reductions_agree(name):
    student, teacher = make_pair(name)
    loss = FEATURE_LOSSES[name]
    per_sample = loss(student, teacher, reduction="none")
    assert per_sample.shape == (BATCH,)
    assert_close(loss(student, teacher, reduction="mean"), per_sample.mean())
    assert_close(loss(student, teacher, reduction="sum"), per_sample.sum())
    # a sample's value does not depend on the rest of the batch
    assert_close(loss(student[:1], teacher[:1], reduction="none"), per_sample[:1])


@pytest.mark.parametrize("name", RELATIONAL)
def test_relational_sum_is_batch_times_mean_and_none_raises(name):
    student, teacher = make_pair(name)
    loss = FEATURE_LOSSES[name]
    assert_close(loss(student, teacher, reduction="sum"), BATCH * loss(student, teacher))
    with pytest.raises(LossInputError, match="reduction='none' is undefined"):
        loss(student, teacher, reduction="none")


@pytest.mark.parametrize("name", sorted(FEATURE_LOSSES))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_gives_float32(name, dtype):
    student, teacher = make_pair(name, dtype=dtype)
    got = FEATURE_LOSSES[name](student, teacher)
    assert got.dtype == torch.float32
    expected = FEATURE_LOSSES[name](student.float(), teacher.float())
    assert_close(got, expected)


@pytest.mark.parametrize("name", sorted(FEATURE_LOSSES))
def test_float64_stays_float64(name):
    student, teacher = make_pair(name)
    assert FEATURE_LOSSES[name](student.float(), teacher).dtype == torch.float64


# ----- bad inputs ---------------------------------------------------------------------------

VEC = randn(4, 5)
MAP = randn(4, 3, 4, 4)

BAD_INPUTS = {
    "hint shape mismatch": (hint_loss, (VEC, randn(4, 6)), {}, "Add a projector"),
    "hint one-dimensional": (hint_loss, (randn(4), randn(4)), {}, "at least one feature"),
    "batch mismatch": (similarity_loss, (VEC, randn(3, 5)), {}, "batch size 4"),
    "attention 2-D": (attention_loss, (VEC, VEC), {}, "4-D feature map"),
    "attention spatial mismatch": (
        attention_loss,
        (MAP, randn(4, 3, 2, 2)),
        {},
        "equal spatial size",
    ),
    "nst spatial mismatch": (nst_loss, (MAP, randn(4, 3, 4, 5)), {}, r"\(4, 4\) and \(4, 5\)"),
    "attention p zero": (attention_loss, (MAP, MAP), {"p": 0}, r"'p' parameter .* \(0, inf\)"),
    "attention p string": (attention_loss, (MAP, MAP), {"p": "2"}, "Got '2' instead"),
    "nst degree zero": (nst_loss, (MAP, MAP), {"degree": 0}, "'degree' parameter"),
    "nst degree float": (nst_loss, (MAP, MAP), {"degree": 1.5}, "must be an int"),
    "nst negative constant": (nst_loss, (MAP, MAP), {"constant": -1.0}, "'constant'"),
    "cc gamma zero": (cc_loss, (VEC, VEC), {"gamma": 0.0}, "'gamma'"),
    "cc order zero": (cc_loss, (VEC, VEC), {"order": 0}, "'order'"),
    "cc unknown kernel": (cc_loss, (VEC, VEC), {"kernel": "gauss"}, "'taylor', 'rbf'"),
    "similarity one sample": (similarity_loss, (VEC[:1], VEC[:1]), {}, "at least 2 samples"),
    "rkd distance one sample": (rkd_distance_loss, (VEC[:1], VEC[:1]), {}, "at least 2"),
    "rkd angle two samples": (rkd_angle_loss, (VEC[:2], VEC[:2]), {}, "at least 3 samples"),
    "pkt one sample": (pkt_loss, (VEC[:1], VEC[:1]), {}, "at least 2"),
    "cc one sample": (cc_loss, (VEC[:1], VEC[:1]), {}, "at least 2"),
    "empty batch": (hint_loss, (VEC[:0], VEC[:0]), {}, "empty batch"),
    "integer features": (pkt_loss, (VEC.long(), VEC), {}, r"floating-point.*\.float\(\)"),
    "not a tensor": (rkd_angle_loss, (VEC.tolist(), VEC), {}, "must be a torch.Tensor"),
    "bad reduction": (hint_loss, (VEC, VEC), {"reduction": "avg"}, "'mean', 'sum', 'none'"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_raises(case):
    loss, args, kwargs, message = BAD_INPUTS[case]
    with pytest.raises(LossInputError, match=message):
        loss(*args, **kwargs)


def test_all_problems_are_reported_at_once():
    with pytest.raises(LossInputError) as raised:
        cc_loss(VEC[:1], randn(2, 3), gamma=-1, order=0, kernel="x", reduction="none")
    message = str(raised.value)
    for part in ("'gamma'", "'order'", "'kernel'", "reduction='none'", "batch size 1"):
        assert part in message


# ----- CRD ----------------------------------------------------------------------------------


def ref_nce(positive, negatives, n_data, z, temperature):
    out = []
    for s_pos, row in zip(positive.tolist(), negatives.tolist()):
        k = len(row)
        p_pos = math.exp(s_pos / temperature) / z
        value = -math.log(p_pos / (p_pos + k / n_data + 1e-7))
        for s_neg in row:
            p_neg = math.exp(s_neg / temperature) / z
            value -= math.log((k / n_data) / (p_neg + k / n_data + 1e-7))
        out.append(value)
    return torch.tensor(out, dtype=torch.float64)


def test_crd_nce_matches_naive_reference():
    positive, negatives = randn(5).tanh(), randn(5, 7, seed=1).tanh()
    got = crd_nce_loss(
        positive, negatives, n_data=40, normalizer=123.0, temperature=0.1, reduction="none"
    )
    assert_close(got, ref_nce(positive, negatives, 40, 123.0, 0.1))
    z = torch.tensor(123.0, dtype=torch.float64)
    assert_close(
        crd_nce_loss(positive, negatives, n_data=40, normalizer=z, temperature=0.1),
        got.mean(),
    )
    assert_close(
        crd_nce_loss(
            positive, negatives, n_data=40, normalizer=123.0, temperature=0.1, reduction="sum"
        ),
        got.sum(),
    )


def test_crd_nce_gradcheck_and_small_temperature_stays_finite():
    positive = randn(3).tanh().requires_grad_(True)
    negatives = randn(3, 4, seed=1).tanh().requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda p, n: crd_nce_loss(p, n, n_data=20, normalizer=50.0, temperature=0.5),
        (positive, negatives),
    )
    # exp(−1 / 0.001) underflows: computed in log space the loss and gradient stay finite
    scores = torch.full((2,), -1.0, requires_grad=True)
    loss = crd_nce_loss(scores, -torch.ones(2, 3), n_data=10, normalizer=1.0, temperature=1e-3)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(scores.grad).all()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n_data": 0}, "'n_data'"),
        ({"temperature": 0.0}, "'temperature'"),
        ({"normalizer": -1.0}, "'normalizer'"),
        ({"normalizer": torch.ones(2)}, "0-d tensor"),
        ({"negative_scores": torch.zeros(3, 4)}, r"same B"),
        ({"positive_scores": torch.zeros(2, 1)}, "1-D floating-point"),
        ({"negative_scores": torch.zeros(2, 0)}, "at least one sample and one negative"),
    ],
)
def test_crd_nce_bad_inputs(kwargs, message):
    arguments = {
        "positive_scores": torch.zeros(2),
        "negative_scores": torch.zeros(2, 4),
        "n_data": 10,
        "normalizer": 1.0,
    } | kwargs
    with pytest.raises(LossInputError, match=message):
        crd_nce_loss(**arguments)


def make_crd(n_data=30, num_negatives=6, seed=0, **kwargs):
    generator = torch.Generator().manual_seed(seed)
    return CRDMemory(
        5, 7, n_data, feat_dim=4, num_negatives=num_negatives, generator=generator, **kwargs
    )


def crd_batch(seed=0, batch=3):
    indices = torch.tensor([4, 0, 17][:batch])
    return randn(batch, 5, seed=seed).float(), randn(batch, 7, seed=seed + 1).float(), indices


def test_crd_matches_naive_reference_and_sets_z_once():
    crd = make_crd().double()
    student, teacher, indices = crd_batch()
    student, teacher = student.double(), teacher.double()
    negatives = torch.tensor([[1, 2, 3, 5, 6, 7], [9, 9, 2, 29, 3, 1], [0, 1, 2, 3, 4, 5]])
    memory_s, memory_t = crd.student_memory.clone(), crd.teacher_memory.clone()
    got = crd(student, teacher, indices, negative_indices=negatives, reduction="none")

    def embed(head, x):
        return F.normalize(x @ head.weight.T + head.bias, dim=1)

    with torch.no_grad():
        v_s, v_t = embed(crd.embed_student, student), embed(crd.embed_teacher, teacher)
    expected = torch.zeros(3, dtype=torch.float64)
    for v, memory in ((v_s, memory_t), (v_t, memory_s)):
        rows = [[int(i), *negatives[b].tolist()] for b, i in enumerate(indices)]
        scores = torch.tensor(
            [[float(memory[r] @ v[b]) for r in row] for b, row in enumerate(rows)],
            dtype=torch.float64,
        )
        z = scores.div(0.07).exp().mean().item() * 30
        expected += ref_nce(scores[:, 0], scores[:, 1:], 30, z, 0.07)
        assert_close(z, (crd.z_student if memory is memory_t else crd.z_teacher).item())
    assert_close(got, expected)

    # Z is kept: a second batch does not re-estimate it
    z_before = (crd.z_student.clone(), crd.z_teacher.clone())
    crd(*crd_batch(seed=5), negative_indices=negatives)
    assert_close((crd.z_student, crd.z_teacher), z_before)


def test_crd_memory_update():
    crd = make_crd(momentum=0.3)
    student, teacher, indices = crd_batch()
    before_s, before_t = crd.student_memory.clone(), crd.teacher_memory.clone()
    crd.eval()
    crd(student, teacher, indices)
    assert torch.equal(crd.student_memory, before_s) and torch.equal(crd.teacher_memory, before_t)

    crd.train()
    crd(student, teacher, indices)
    with torch.no_grad():
        v_s = F.normalize(crd.embed_student(student), dim=1)
        v_t = F.normalize(crd.embed_teacher(teacher), dim=1)
    for memory, before, v in (
        (crd.student_memory, before_s, v_s),
        (crd.teacher_memory, before_t, v_t),
    ):
        expected = F.normalize(0.3 * before[indices] + 0.7 * v, dim=1)
        assert_close(memory[indices], expected)
        untouched = torch.ones(30, dtype=torch.bool)
        untouched[indices] = False
        assert torch.equal(memory[untouched], before[untouched])
        assert_close(memory.norm(dim=1), torch.ones(30))


def test_crd_negatives_skip_the_positive_and_are_deterministic():
    crd = make_crd(n_data=8, num_negatives=7)
    indices = torch.arange(8)
    negatives = crd.sample_negatives(indices.repeat(50))  # (400, 7)
    assert negatives.shape == (400, 7)
    assert ((negatives >= 0) & (negatives < 8)).all()
    assert (negatives != indices.repeat(50)[:, None]).all()
    assert len(negatives.unique()) == 8  # every other sample is reachable

    a, b = make_crd(seed=3), make_crd(seed=3)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert torch.equal(a(*crd_batch()), b(*crd_batch()))
    torch.manual_seed(1)
    c = CRDMemory(5, 7, 30, feat_dim=4, num_negatives=6)
    loss_c = c(*crd_batch())
    torch.manual_seed(1)
    d = CRDMemory(5, 7, 30, feat_dim=4, num_negatives=6)
    assert torch.equal(loss_c, d(*crd_batch()))


def test_crd_reductions_dtype_and_gradients():
    crd = make_crd().eval()
    student, teacher, indices = crd_batch()
    student.requires_grad_(True)
    negatives = crd.sample_negatives(indices)
    per_sample = crd(student, teacher, indices, negative_indices=negatives, reduction="none")
    assert per_sample.shape == (3,)
    total = crd(student, teacher, indices, negative_indices=negatives, reduction="sum")
    assert_close(total, per_sample.sum())
    mean = crd(student, teacher, indices, negative_indices=negatives)
    assert_close(mean * 3, total)
    mean.backward()
    assert student.grad.abs().sum() > 0 and crd.embed_student.weight.grad.abs().sum() > 0
    half = crd(student.detach().half(), teacher.bfloat16(), indices, negative_indices=negatives)
    assert half.dtype == torch.float32 and torch.isfinite(half)


def test_crd_memory_size():
    assert crd_memory_bytes(50_000, 128) == 2 * 50_000 * 128 * 4 == 51_200_000
    crd = make_crd(n_data=30)
    assert crd.memory_bytes == crd_memory_bytes(30, 4)
    assert crd.student_memory.shape == crd.teacher_memory.shape == (30, 4)
    assert crd.student_memory.dtype == torch.float32


def test_crd_rejects_a_dataset_too_small_for_the_negatives():
    with pytest.raises(LossInputError) as raised:
        CRDMemory(5, 7, 100, num_negatives=16384)
    message = str(raised.value)
    for part in ("n_data=100", "num_negatives=16384", "99 others", "at most 99"):
        assert part in message
    CRDMemory(5, 7, 100, num_negatives=99)  # the largest that fits
    with pytest.raises(LossInputError, match="at most 99"):
        CRDMemory(5, 7, 100, num_negatives=100)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"temperature": 0}, "'temperature'"),
        ({"momentum": 1.0}, "'momentum'"),
        ({"feat_dim": 0}, "'feat_dim'"),
        ({"num_negatives": 2.5}, "'num_negatives'"),
        ({"generator": 3}, "torch.Generator"),
    ],
)
def test_crd_bad_settings(kwargs, message):
    with pytest.raises(LossInputError, match=message):
        CRDMemory(5, 7, 100, **({"num_negatives": 10} | kwargs))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"indices": torch.tensor([0, 1, 30])}, r"in \[0, 30\); got values in \[0, 30\]"),
        ({"indices": torch.tensor([0.0, 1.0, 2.0])}, "integer tensor"),
        ({"indices": torch.tensor([0, 1])}, "B = 3"),
        ({"negative_indices": torch.tensor([[1, 2], [3, -1], [4, 5]])}, "negative_indices"),
        ({"student_feature": torch.zeros(3, 6)}, "built for 5"),
        ({"teacher_feature": torch.zeros(2, 7)}, "batch size 3"),
        ({"teacher_feature": torch.zeros(3, 7, dtype=torch.long)}, "floating-point"),
        ({"reduction": "avg"}, "'mean', 'sum', 'none'"),
    ],
)
def test_crd_bad_inputs(change, message):
    crd = make_crd()
    student, teacher, indices = crd_batch()
    arguments = {"student_feature": student, "teacher_feature": teacher, "indices": indices}
    arguments |= change
    with pytest.raises(LossInputError, match=message):
        crd(**arguments)


def test_crd_loss_goes_down_on_fixed_data():
    torch.manual_seed(0)
    n_data = 32
    inputs, teacher = torch.randn(n_data, 10), torch.randn(n_data, 12)
    student = torch.nn.Linear(10, 8)
    crd = CRDMemory(8, 12, n_data, feat_dim=8, num_negatives=16)
    optimizer = torch.optim.Adam([*student.parameters(), *crd.parameters()], lr=0.05)
    indices = torch.arange(n_data)
    probe = crd.sample_negatives(indices)

    def evaluate():
        crd.eval()
        with torch.no_grad():
            value = crd(student(inputs), teacher, indices, negative_indices=probe).item()
        crd.train()
        return value

    losses = [evaluate()]
    for _ in range(30):
        loss = crd(student(inputs), teacher, indices)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(evaluate())
    assert losses[-1] < 0.5 * losses[0]
