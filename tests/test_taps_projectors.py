"""Projectors: none for equal shapes, the kind by rank against naive references,
adaptive pooling on either side, and the errors that name both paths and shapes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kdistill.errors import RecipeError
from kdistill.taps.projectors import FeatureProjector, make_projector


def test_projector_none_for_equal_shapes_and_kinds_by_rank() -> None:
    torch.manual_seed(5)
    assert make_projector((2, 8, 4, 4), (2, 8, 4, 4)) is None
    assert make_projector((2, 8), (7, 8)) is None  # batch size is ignored

    maps = make_projector((2, 8, 4, 4), (2, 16, 4, 4))
    assert isinstance(maps, FeatureProjector)
    assert isinstance(maps.projection, nn.Conv2d) and maps.projection.kernel_size == (1, 1)
    s, t = torch.randn(2, 8, 4, 4), torch.randn(2, 16, 4, 4)
    out_s, out_t = maps(s, t)
    assert out_s.shape == t.shape and out_t is t
    conv = maps.projection
    naive = torch.einsum("oc,bchw->bohw", conv.weight[:, :, 0, 0], s) + conv.bias[:, None, None]
    torch.testing.assert_close(out_s, naive)

    vectors = make_projector((2, 8), (2, 12))
    assert isinstance(vectors.projection, nn.Linear)
    assert vectors(torch.randn(3, 8), torch.randn(3, 12))[0].shape == (3, 12)

    tokens = make_projector((2, 5, 8), (2, 5, 12))
    assert isinstance(tokens.projection, nn.Linear)
    assert tokens(torch.randn(2, 5, 8), torch.randn(2, 5, 12))[0].shape == (2, 5, 12)

    mlp = make_projector((2, 5, 8), (2, 5, 12), kind="mlp", hidden=32)
    assert [type(m) for m in mlp.projection] == [nn.Linear, nn.ReLU, nn.Linear]
    assert mlp.projection[0].out_features == 32
    assert mlp(torch.randn(2, 5, 8), torch.randn(2, 5, 12))[0].shape == (2, 5, 12)
    conv_mlp = make_projector((2, 8, 4, 4), (2, 16, 4, 4), kind="mlp")
    assert (
        isinstance(conv_mlp.projection[0], nn.Conv2d) and conv_mlp.projection[0].out_channels == 16
    )

    forced = make_projector((2, 8), (2, 8), kind="linear")  # an explicit kind always builds
    assert isinstance(forced.projection, nn.Linear)


def test_projector_adaptive_pool_either_side() -> None:
    torch.manual_seed(6)
    s, t = torch.randn(2, 4, 8, 8), torch.randn(2, 6, 4, 4)
    bigger_student = make_projector(s.shape, t.shape, pool="adaptive")
    out_s, out_t = bigger_student(s, t)
    assert out_s.shape == (2, 6, 4, 4) and out_t is t
    conv = bigger_student.projection
    torch.testing.assert_close(out_s, conv(F.avg_pool2d(s, 2)))

    bigger_teacher = make_projector((2, 6, 2, 2), (2, 4, 8, 8), pool="adaptive")
    small = torch.randn(2, 6, 2, 2)
    out_s, out_t = bigger_teacher(small, s)
    assert out_s.shape == out_t.shape == (2, 4, 2, 2)
    torch.testing.assert_close(out_t, F.avg_pool2d(s, 4))

    same_channels = make_projector((2, 4, 8, 8), (2, 4, 4, 4), pool="adaptive")
    assert same_channels.projection is None and same_channels.student_pool is not None


def test_unbridgeable_shapes_name_both_paths_and_shapes() -> None:
    with pytest.raises(RecipeError) as info:
        make_projector((2, 8, 8, 8), (2, 16, 4, 4), student_path="layer2", teacher_path="layer3")
    message = str(info.value)
    assert "'layer2' (2, 8, 8, 8)" in message and "'layer3' (2, 16, 4, 4)" in message
    assert "8×8 vs 4×4" in message and "pool: adaptive" in message
    with pytest.raises(RecipeError, match=r"ranks differ \(2 vs 4\)"):
        make_projector((2, 8), (2, 16, 4, 4))
    with pytest.raises(RecipeError, match=r"different token counts \(5 vs 7\)"):
        make_projector((2, 5, 8), (2, 7, 8))
    with pytest.raises(RecipeError, match="conv1x1 projector needs"):
        make_projector((2, 8), (2, 16), kind="conv1x1")
    with pytest.raises(RecipeError, match="use kind: conv1x1"):
        make_projector((2, 8, 4, 4), (2, 16, 4, 4), kind="linear")
    with pytest.raises(RecipeError) as info:
        make_projector((2, 8), (2, 16), kind="lin", hidden=0, pool="max")  # type: ignore[arg-type]
    assert str(info.value).count("parameter of make_projector") == 3
