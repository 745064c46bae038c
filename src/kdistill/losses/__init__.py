"""Distillation losses: pure functions over tensors."""

from kdistill.losses.logits import (
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

__all__ = [
    "LOGIT_LOSSES",
    "NEEDS_LABELS",
    "bce_kd_loss",
    "cross_entropy",
    "dist_loss",
    "dkd_loss",
    "jsd_loss",
    "kd_loss",
    "kl_divergence",
    "logit_mse_loss",
    "reverse_kl_divergence",
    "skew_kl_loss",
    "skew_reverse_kl_loss",
    "soft_target_cross_entropy",
    "total_variation_loss",
]
