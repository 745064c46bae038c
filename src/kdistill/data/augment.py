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


def _check_images(name: str, x: torch.Tensor) -> None:
    if x.dim() != 4:
        raise ValueError(
            f"{name} augments images (B, C, H, W); got shape {tuple(x.shape)}. Turn it off "
            "in train.augment for data that are not images."
        )


def random_crop(x: torch.Tensor, padding: int, generator: torch.Generator) -> torch.Tensor:
    """Pad each image with `padding` zeros on every side, then crop (H, W) at a random offset.

    The standard CIFAR augmentation of He, Zhang, Ren & Sun (2016), "Deep Residual
    Learning for Image Recognition" §4.2 (padding 4, 32x32 crop), as used by
    RepDistiller and torchvision's `RandomCrop(32, padding=4)`, on a whole batch:
        out[b, :, i, j] = padded[b, :, top[b] + i, left[b] + j],  top, left ∈ {0, ..., 2·padding}
    The offsets are `torch.randint(0, 2 * padding + 1, (2, B), generator=generator)`
    on the generator's device (row offsets first, then column offsets), so the
    result is deterministic given the generator's state.
    x: (B, C, H, W), any dtype, on any device. Returns a new (B, C, H, W) tensor of
    x's dtype; padding 0 (or an empty batch) returns x itself and draws nothing.
    """
    _check_images("random_crop", x)
    if isinstance(padding, bool) or not isinstance(padding, int) or padding < 0:
        raise ValueError(f"random_crop: padding must be an integer >= 0; got {padding!r}")
    if padding == 0 or x.numel() == 0:
        return x
    b, c, h, w = x.shape
    p = padding
    offsets = torch.randint(0, 2 * p + 1, (2, b), generator=generator, device=generator.device)
    top, left = offsets.to(x.device)  # (B,) each
    padded = torch.nn.functional.pad(x, (p, p, p, p)).contiguous().view(-1)  # (B·C·(H+2p)·(W+2p),)
    # every output row is a run of w consecutive elements of the flat padded batch: view all
    # runs at once (an overlapping strided view, no copy) and pick one start per output row
    runs = padded.as_strided((padded.numel() - w + 1, w), (1, 1))
    planes = torch.arange(b * c, device=x.device).view(b, c, 1)  # (B, C, 1): index of (b, c)
    rows = planes * (h + 2 * p) + top.view(b, 1, 1) + torch.arange(h, device=x.device)  # (B, C, H)
    starts = rows * (w + 2 * p) + left.view(b, 1, 1)  # (B, C, H)
    return runs.index_select(0, starts.view(-1)).view(b, c, h, w)


def random_flip(x: torch.Tensor, generator: torch.Generator, p: float = 0.5) -> torch.Tensor:
    """Mirror each image left-right with probability p, independently per sample.

    The horizontal flip of the standard CIFAR augmentation (He et al. 2016 §4.2).
    Sample b is flipped when `torch.rand(B, generator=generator)[b] < p` (drawn on the
    generator's device), so the result is deterministic given the generator's state,
    and B numbers are drawn whatever p is.
    x: (B, C, H, W), any dtype, on any device. Returns a new (B, C, H, W) tensor of
    x's dtype.
    """
    _check_images("random_flip", x)
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"random_flip: p must be a probability in [0, 1]; got {p}")
    b = x.shape[0]
    flipped = torch.rand(b, generator=generator, device=generator.device) < p  # (B,)
    # index_copy/where are slow for uint8 on CPU and nonzero() would sync a GPU: instead stack
    # the batch and its mirror image and pick, per sample, row b or row B + b
    both = torch.cat([x, x.flip(3)])  # (2B, C, H, W)
    pick = torch.arange(b, device=x.device) + b * flipped.to(x.device, torch.long)  # (B,)
    return both.index_select(0, pick)
