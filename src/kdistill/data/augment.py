"""Batch augmentation applied during training only."""

from __future__ import annotations

import torch


def jitter(x: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Shift each image by its own random (dy, dx) in [-max_shift, max_shift]², filling with 0.

    Hinton, Vinyals & Dean (2015) translate MNIST digits by up to 2 pixels this way.
    x: (B, C, H, W), any dtype, on any device; the shifts are drawn from `generator`
    (on its own device), so the result is deterministic given the generator's state.
    Returns a new (B, C, H, W) tensor; max_shift 0 returns x itself.
    """
    if x.dim() != 4:
        raise ValueError(
            f"jitter shifts images (B, C, H, W); got shape {tuple(x.shape)}. Set "
            "train.augment.jitter to 0 for data that are not images."
        )
    if max_shift < 0:
        raise ValueError(f"max_shift must be >= 0; got {max_shift}")
    if max_shift == 0:
        return x
    b, c, h, w = x.shape
    m = max_shift
    shifts = torch.randint(-m, m + 1, (2, b), generator=generator, device=generator.device)
    dy, dx = shifts.to(x.device)  # (B,) each: content moves down by dy, right by dx
    padded = x.new_zeros(b, c, h + 2 * m, w + 2 * m)
    padded[:, :, m : m + h, m : m + w] = x
    # output[i, j] = padded[i - dy + m, j - dx + m]: a window of the padded image per sample
    rows = torch.arange(h, device=x.device) - dy[:, None] + m  # (B, H)
    cols = torch.arange(w, device=x.device) - dx[:, None] + m  # (B, W)
    out = padded.gather(2, rows[:, None, :, None].expand(b, c, h, w + 2 * m))  # (B, C, H, W+2m)
    return out.gather(3, cols[:, None, None, :].expand(b, c, h, w))  # (B, C, H, W)
