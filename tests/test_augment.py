"""random_crop and random_flip: vectorised batch versions that match naive per-sample loops."""

from __future__ import annotations

import itertools

import pytest
import torch

from kdistill.data.augment import random_crop, random_flip


def _images(batch: int, channels: int = 3, h: int = 6, w: int = 7) -> torch.Tensor:
    # no zeros, so the zero padding is visible and every crop offset is identifiable
    generator = torch.Generator().manual_seed(0)
    return torch.randint(1, 256, (batch, channels, h, w), generator=generator).to(torch.uint8)


def _copy(generator: torch.Generator) -> torch.Generator:
    twin = torch.Generator()
    twin.set_state(generator.get_state())
    return twin


def _naive_crop(image: torch.Tensor, padding: int, top: int, left: int) -> torch.Tensor:
    """Reference: write the image into a zero canvas, then slice the window out of it."""
    c, h, w = image.shape
    canvas = torch.zeros(c, h + 2 * padding, w + 2 * padding, dtype=image.dtype)
    canvas[:, padding : padding + h, padding : padding + w] = image
    return canvas[:, top : top + h, left : left + w]


def _naive_flip(image: torch.Tensor) -> torch.Tensor:
    return image[:, :, list(reversed(range(image.shape[2])))]


@pytest.mark.parametrize(
    ("shape", "padding", "dtype"),
    [
        ((16, 3, 6, 7), 2, torch.uint8),
        ((16, 3, 32, 32), 4, torch.uint8),
        ((8, 1, 5, 5), 1, torch.float32),
        ((8, 2, 3, 4), 6, torch.uint8),  # padding larger than the image: some crops are all zero
    ],
)
def test_crop_matches_a_per_sample_loop_with_the_same_offsets(
    shape: tuple[int, int, int, int], padding: int, dtype: torch.dtype
) -> None:
    x = _images(*shape).to(dtype)
    generator = torch.Generator().manual_seed(3)
    twin = _copy(generator)
    out = random_crop(x, padding, generator)
    # the documented draw: row offsets, then column offsets, each in [0, 2 * padding]
    tops, lefts = torch.randint(0, 2 * padding + 1, (2, shape[0]), generator=twin).tolist()
    expected = torch.stack(
        [_naive_crop(image, padding, t, left) for image, t, left in zip(x, tops, lefts)]
    )
    assert out.shape == x.shape and out.dtype == dtype
    assert torch.equal(out, expected)
    assert torch.equal(generator.get_state(), twin.get_state())  # drew exactly that much


def test_every_offset_occurs_and_each_output_is_one_crop() -> None:
    # found by search, without relying on the order of the random draws
    padding, x = 1, _images(400, channels=1, h=4, w=4)
    out = random_crop(x, padding, torch.Generator().manual_seed(4))
    offsets = list(itertools.product(range(2 * padding + 1), repeat=2))
    used = []
    for image, result in zip(x, out):
        matches = [o for o in offsets if torch.equal(_naive_crop(image, padding, *o), result)]
        assert len(matches) == 1, matches
        used.append(matches[0])
    assert set(used) == set(offsets)


def test_zeros_only_in_the_padding_that_the_crop_covers() -> None:
    h, w, padding = 8, 10, 3
    x = torch.full((64, 2, h, w), 200, dtype=torch.uint8)
    generator = torch.Generator().manual_seed(5)
    tops, lefts = torch.randint(0, 2 * padding + 1, (2, 64), generator=_copy(generator)).tolist()
    out = random_crop(x, padding, generator)
    for result, top, left in zip(out, tops, lefts):
        # output pixel (i, j) shows image pixel (i + top - padding, j + left - padding)
        rows = torch.arange(h) + top - padding
        cols = torch.arange(w) + left - padding
        inside = ((rows >= 0) & (rows < h))[:, None] & ((cols >= 0) & (cols < w))[None, :]
        assert torch.equal(result == 0, (~inside).expand(2, h, w))
        assert torch.all(result[:, inside] == 200)


def test_crop_of_channels_last_and_sliced_batches() -> None:
    base = _images(12, h=9, w=9)
    for x in (base.contiguous(memory_format=torch.channels_last), base[::2, :, 1:, :-1]):
        generator = torch.Generator().manual_seed(6)
        expected = random_crop(x.contiguous(), 2, _copy(generator))
        assert torch.equal(random_crop(x, 2, generator), expected)


def test_zero_padding_returns_the_input_and_draws_nothing() -> None:
    x = _images(4)
    generator = torch.Generator().manual_seed(0)
    state = generator.get_state()
    assert random_crop(x, 0, generator) is x
    assert torch.equal(generator.get_state(), state)


def test_crop_is_deterministic_given_the_generator() -> None:
    x = _images(32)
    a = random_crop(x, 2, torch.Generator().manual_seed(5))
    b = random_crop(x, 2, torch.Generator().manual_seed(5))
    c = random_crop(x, 2, torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)
    generator = torch.Generator().manual_seed(5)
    first, second = random_crop(x, 2, generator), random_crop(x, 2, generator)
    assert torch.equal(first, a) and not torch.equal(first, second)  # the state advances


@pytest.mark.parametrize("p", [0.5, 0.2])
def test_flip_matches_a_per_sample_loop_with_the_same_draws(p: float) -> None:
    x = _images(40)
    generator = torch.Generator().manual_seed(7)
    twin = _copy(generator)
    out = random_flip(x, generator, p=p)
    flipped = (torch.rand(40, generator=twin) < p).tolist()
    expected = torch.stack([_naive_flip(im) if f else im for im, f in zip(x, flipped)])
    assert out.shape == x.shape and out.dtype == x.dtype
    assert torch.equal(out, expected)
    assert 0 < sum(flipped) < 40


def test_flip_rate_is_about_p() -> None:
    n, p = 4000, 0.3
    x = torch.tensor([1, 2], dtype=torch.uint8).view(1, 1, 1, 2).repeat(n, 1, 1, 1)
    out = random_flip(x, torch.Generator().manual_seed(8), p=p)
    assert torch.all((out[:, 0, 0, 0] == 2) == (out[:, 0, 0, 1] == 1))  # whole images flip
    rate = (out[:, 0, 0, 0] == 2).double().mean().item()
    assert abs(rate - p) < 4 * (p * (1 - p) / n) ** 0.5  # within 4 standard errors


def test_flip_endpoints_and_the_draw_not_depending_on_p() -> None:
    x = _images(16)
    states = []
    for p, expected in ((0.0, x), (1.0, x.flip(3))):
        generator = torch.Generator().manual_seed(9)
        out = random_flip(x, generator, p=p)
        assert torch.equal(out, expected) and out is not x
        states.append(generator.get_state())
    assert torch.equal(states[0], states[1])


def test_flip_keeps_float_dtype_and_works_on_sliced_batches() -> None:
    x = torch.rand(10, 2, 5, 6, generator=torch.Generator().manual_seed(0)).double()[::2]
    generator = torch.Generator().manual_seed(10)
    expected = random_flip(x.contiguous(), _copy(generator), p=0.5)
    out = random_flip(x, generator, p=0.5)
    assert out.dtype == torch.float64 and torch.equal(out, expected)


def test_bad_input() -> None:
    generator = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        random_crop(torch.zeros(4, 10), 2, generator)
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        random_flip(torch.zeros(3, 4, 4), generator)
    for padding in (-1, 1.5, True):
        with pytest.raises(ValueError, match="padding must be an integer >= 0"):
            random_crop(_images(2), padding, generator)  # type: ignore[arg-type]
    for p in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match=r"p must be a probability in \[0, 1\]"):
            random_flip(_images(2), generator, p=p)
