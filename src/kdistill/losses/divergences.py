"""The divergences between two distributions over classes or tokens, written once.

Every logit loss (`kdistill.losses.logits`) and every token loss
(`kdistill.losses.lm_math`) reads its divergence from here. Inputs are normalised
log-probabilities, rows over the last dimension; a class or token with probability 0
(a −inf logit: a masked class, a padded vocabulary entry) contributes 0·log 0 = 0,
finite, with a zero gradient.

With p the teacher's distribution and q the student's:

    kl               KL(p ‖ q) = Σ p (log p − log q)                       forward
    reverse_kl       KL(q ‖ p)                                             reverse
    jsd              β KL(p ‖ m) + (1 − β) KL(q ‖ m), m = β p + (1 − β) q;
                     β = 0 is forward KL and β = 1 reverse KL, exactly (as TRL)
    skew_kl          KL(p ‖ α p + (1 − α) q)                               DistiLLM
    skew_reverse_kl  KL(q ‖ α q + (1 − α) p)                               DistiLLM
    tvd              ½ Σ |p − q|
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

Kind = Literal["kl", "reverse_kl", "jsd", "skew_kl", "skew_reverse_kl", "tvd"]
KINDS: tuple[Kind, ...] = ("kl", "reverse_kl", "jsd", "skew_kl", "skew_reverse_kl", "tvd")
# one line each, for `kdistill recipes --losses`
DESCRIPTIONS: dict[str, str] = {
    "kl": "forward KL(p_t ‖ p_s): mean-seeking",
    "reverse_kl": "reverse KL(p_s ‖ p_t): mode-seeking (MiniLLM)",
    "jsd": "generalized JSD_β (GKD); β = 0 forward KL, β = 1 reverse KL",
    "skew_kl": "KL(p_t ‖ α p_t + (1 − α) p_s) (DistiLLM)",
    "skew_reverse_kl": "KL(p_s ‖ α p_s + (1 − α) p_t) (DistiLLM)",
    "tvd": "total variation ½ Σ |p_t − p_s|",
}


def kl(log_p: Tensor, log_q: Tensor) -> Tensor:
    """KL(p ‖ q) = Σ_v p_v (log p_v − log q_v) per row, with 0·log 0 = 0: (N, V) -> (N,)."""
    p = log_p.exp()
    # where, not a product with 0: the masked entries may be −inf − (−inf) = NaN, and
    # where's backward sends them a zero gradient instead of NaN.
    difference = torch.where(p > 0, log_p - log_q, 0.0)
    return (p * difference).sum(dim=-1)


def log_mixture(log_p: Tensor, log_q: Tensor, weight: float) -> Tensor:
    """log(w·p + (1 − w)·q) computed in log space, so tiny probabilities stay exact."""
    log_w = math.log(weight) if weight > 0 else -math.inf
    log_1_minus_w = math.log1p(-weight) if weight < 1 else -math.inf
    return torch.logaddexp(log_p + log_w, log_q + log_1_minus_w)


def divergence(
    log_q: Tensor, log_p: Tensor, kind: str, *, beta: float = 0.5, alpha: float = 0.1
) -> Tensor:
    """Per-row divergence of kind `kind` (module docstring) between the student's log_q
    and the teacher's log_p, both normalised: (N, V), (N, V) -> (N,)."""
    if kind == "kl" or (kind == "jsd" and beta == 0):
        return kl(log_p, log_q)
    if kind == "reverse_kl" or (kind == "jsd" and beta == 1):
        return kl(log_q, log_p)
    if kind == "jsd":
        log_m = log_mixture(log_p, log_q, beta)  # (N, V) log(β p + (1 − β) q)
        return beta * kl(log_p, log_m) + (1 - beta) * kl(log_q, log_m)
    if kind == "skew_kl":
        return kl(log_p, log_mixture(log_p, log_q, alpha))
    if kind == "skew_reverse_kl":
        return kl(log_q, log_mixture(log_q, log_p, alpha))
    if kind == "tvd":
        return 0.5 * (log_p.exp() - log_q.exp()).abs().sum(dim=-1)
    raise AssertionError(f"unvalidated kind {kind!r}")


def cross_entropy(log_p: Tensor, log_q: Tensor) -> Tensor:
    """H(p, q) = −Σ_v p_v log q_v per row, with 0·log 0 = 0: (N, V) -> (N,)."""
    p = log_p.exp()
    return -(p * torch.where(p > 0, log_q, 0.0)).sum(dim=-1)
