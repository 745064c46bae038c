"""jitter: a vectorised random shift that matches a naive per-sample roll with zero fill."""

from __future__ import annotations

import itertools

import pytest
import torch

from kdistill.data.augment import jitter


def _shifted(image: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """Naive reference: roll (C, H, W) by (dy, dx), then zero what wrapped around."""
    out = torch.roll(image, shifts=(dy, dx), dims=(1, 2))
    h, w = image.shape[1:]
    if dy > 0:
        out[:, :dy] = 0
    elif dy < 0:
        out[:, max(h + dy, 0) :] = 0
    if dx > 0:
        out[:, :, :dx] = 0
    elif dx < 0:
        out[:, :, max(w + dx, 0) :] = 0
    return out


def _shifts_used(x: torch.Tensor, out: torch.Tensor, max_shift: int) -> list[tuple[int, int]]:
    """For each sample, the one shift whose naive result equals the output."""
    offsets = range(-max_shift, max_shift + 1)
    used = []
    for image, result in zip(x, out):
        matches = [
            (dy, dx)
            for dy, dx in itertools.product(offsets, offsets)
            if torch.equal(_shifted(image, dy, dx), result)
        ]
        assert len(matches) == 1, matches
        used.append(matches[0])
    return used


def _images(batch: int, channels: int = 2, h: int = 7, w: int = 9) -> torch.Tensor:
    # no zeros, so each shift leaves a different zero border and is identifiable
    return torch.randint(
        1, 256, (batch, channels, h, w), generator=torch.Generator().manual_seed(0)
    ).to(torch.uint8)


def test_output_is_a_zero_filled_shift_of_each_sample() -> None:
    x = _images(64)
    out = jitter(x, 2, torch.Generator().manual_seed(1))
    assert out.shape == x.shape and out.dtype == x.dtype
    used = _shifts_used(x, out, 2)
    assert len(set(used)) > 10  # samples get their own shifts


def test_every_shift_in_range_occurs() -> None:
    x = _images(600, channels=1, h=5, w=5)
    used = _shifts_used(x, jitter(x, 1, torch.Generator().manual_seed(2)), 1)
    assert set(used) == set(itertools.product((-1, 0, 1), repeat=2))


def test_float_input_and_shift_larger_than_the_image() -> None:
    x = torch.rand(16, 3, 3, 4, generator=torch.Generator().manual_seed(0)) + 0.1
    out = jitter(x, 4, torch.Generator().manual_seed(0))
    assert out.dtype == torch.float32
    offsets = range(-4, 5)
    for image, result in zip(x, out):
        assert any(
            torch.equal(_shifted(image, dy, dx), result)
            for dy, dx in itertools.product(offsets, offsets)
        )


def test_zero_shift_returns_the_input() -> None:
    x = _images(4)
    assert jitter(x, 0, torch.Generator().manual_seed(0)) is x


def test_same_generator_state_same_result() -> None:
    x = _images(32)
    a = jitter(x, 2, torch.Generator().manual_seed(5))
    b = jitter(x, 2, torch.Generator().manual_seed(5))
    c = jitter(x, 2, torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)
    g = torch.Generator().manual_seed(5)
    first, second = jitter(x, 2, g), jitter(x, 2, g)
    assert torch.equal(first, a) and not torch.equal(first, second)  # the state advances


def test_bad_input() -> None:
    g = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        jitter(torch.zeros(4, 10), 2, g)
    with pytest.raises(ValueError, match=">= 0"):
        jitter(_images(2), -1, g)
