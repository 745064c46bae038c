"""The CIFAR zoo: RepDistiller's architectures, sizes and names; logits out, features by hooks."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kdistill.errors import ModelError
from kdistill.models import ZOO, build_model
from kdistill.recipe import ModelSpec

CIFAR = (3, 32, 32)

# Exact parameter counts for 100 classes, equal to those of RepDistiller's models/ (checked
# by loading its state dicts), next to the rounded sizes quoted in the KD literature
# (RepDistiller/CRD model zoo, e.g. "resnet32x4 7.43M", "wrn_40_2 2.25M").
PARAMETERS = {
    "resnet8": (83_892, 0.08),
    "resnet14": (181_108, 0.18),
    "resnet20": (278_324, 0.27),
    "resnet32": (472_756, 0.47),
    "resnet44": (667_188, 0.66),
    "resnet56": (861_620, 0.86),
    "resnet110": (1_736_564, 1.73),
    "resnet8x4": (1_233_540, 1.23),
    "resnet32x4": (7_433_860, 7.43),
    "wrn_16_2": (703_284, 0.70),
    "wrn_40_2": (2_255_156, 2.25),
    "vgg8": (3_965_028, 3.96),
    "vgg13": (9_462_180, 9.46),
    "mobilenetv2": (812_836, 0.81),
    "shufflenetv2": (1_355_528, 1.35),
}
SMALL = ["resnet8", "wrn_16_2", "vgg8", "mobilenetv2", "shufflenetv2", "cnn_student"]

# (stage module path, output shape for a (2, 3, 32, 32) batch)
STAGES = {
    "resnet8": [
        ("relu", (16, 32, 32)),
        ("layer1", (16, 32, 32)),
        ("layer2", (32, 16, 16)),
        ("layer3", (64, 8, 8)),
        ("flatten", (64,)),
    ],
    "resnet8x4": [("layer1", (64, 32, 32)), ("layer3", (256, 8, 8)), ("flatten", (256,))],
    "wrn_16_2": [
        ("conv1", (16, 32, 32)),
        ("block1", (32, 32, 32)),
        ("block2", (64, 16, 16)),
        ("block3", (128, 8, 8)),
        ("flatten", (128,)),
    ],
    "vgg8": [
        ("block0", (64, 32, 32)),
        ("block1", (128, 16, 16)),
        ("block2", (256, 8, 8)),
        ("block3", (512, 4, 4)),
        ("block4", (512, 4, 4)),
        ("flatten", (512,)),
    ],
    "mobilenetv2": [
        ("conv1", (16, 16, 16)),
        ("blocks.1", (12, 16, 16)),
        ("blocks.2", (16, 8, 8)),
        ("blocks.4", (48, 4, 4)),
        ("blocks.6", (160, 2, 2)),
        ("flatten", (1280,)),
    ],
    "shufflenetv2": [
        ("relu1", (24, 32, 32)),
        ("layer1", (116, 16, 16)),
        ("layer2", (232, 8, 8)),
        ("layer3", (464, 4, 4)),
        ("flatten", (1024,)),
    ],
    "cnn_teacher": [("pool1", (32, 16, 16)), ("pool2", (64, 8, 8)), ("flatten", (4096,))],
}

# a few state-dict keys in RepDistiller's spelling, so its checkpoints load unchanged
CHECKPOINT_KEYS = {
    "resnet8": ["conv1.weight", "layer2.0.downsample.0.weight", "layer3.0.bn2.running_var"],
    "wrn_16_2": ["block1.layer.0.convShortcut.weight", "block3.layer.1.conv2.weight", "bn1.bias"],
    "vgg8": ["block0.0.bias", "block4.1.running_mean", "classifier.weight"],
    "mobilenetv2": ["conv1.0.weight", "blocks.6.0.conv.7.bias", "conv2.1.weight"],
    "shufflenetv2": ["layer1.0.conv5.weight", "layer3.3.bn3.weight", "linear.bias"],
}


def _build(name: str, input_shape: tuple[int, ...] = CIFAR, num_classes: int = 100) -> nn.Module:
    torch.manual_seed(0)
    return ZOO[name](input_shape=input_shape, num_classes=num_classes)


def _tap(model: nn.Module, path: str) -> dict[str, torch.Tensor]:
    """Record the output of the module at `path` on every forward pass."""
    seen: dict[str, torch.Tensor] = {}
    model.get_submodule(path).register_forward_hook(lambda m, i, o: seen.__setitem__(path, o))
    return seen


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", list(PARAMETERS))
def test_size_matches_repdistiller_and_the_logits_have_the_class_count(name: str) -> None:
    model = _build(name).eval()
    exact, published_millions = PARAMETERS[name]
    assert _count(model) == exact
    assert abs(exact / 1e6 - published_millions) < 0.01
    with torch.no_grad():
        logits = model(torch.randn(2, *CIFAR))
    assert logits.shape == (2, 100) and torch.isfinite(logits).all()


@pytest.mark.parametrize(
    ("name", "channels"), [("cnn_teacher", (32, 64)), ("cnn_student", (16, 32))]
)
def test_small_cnn_size(name: str, channels: tuple[int, int]) -> None:
    c1, c2 = channels
    convs = (3 * 9 + 1) * c1 + (c1 * 9 + 1) * c2
    for shape, pooled in ((CIFAR, 8 * 8), ((1, 28, 28), 7 * 7)):
        model = _build(name, shape, 10)
        convs_here = convs - (3 - shape[0]) * 9 * c1
        assert _count(model) == convs_here + (c2 * pooled + 1) * 10
        assert model(torch.randn(2, *shape)).shape == (2, 10)


@pytest.mark.parametrize("name", SMALL)
def test_backward_reaches_every_parameter(name: str) -> None:
    model = _build(name, num_classes=10).train()
    logits = model(torch.randn(4, *CIFAR))
    nn.functional.cross_entropy(logits, torch.arange(4)).backward()
    for path, parameter in model.named_parameters():
        assert parameter.grad is not None, path
        assert torch.isfinite(parameter.grad).all(), path
    assert any(p.grad.abs().sum() > 0 for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("name", list(STAGES))
def test_stage_outputs_by_path_are_what_the_next_layer_reads(name: str) -> None:
    model = _build(name, num_classes=10).eval()
    seen: dict[str, torch.Tensor] = {}
    copies: dict[str, torch.Tensor] = {}

    def keep(path: str):
        def hook(module: nn.Module, inputs: tuple[torch.Tensor], output: torch.Tensor) -> None:
            seen[path], copies[path] = output, output.clone()

        return hook

    for path, _ in STAGES[name]:
        model.get_submodule(path).register_forward_hook(keep(path))
    with torch.no_grad():
        logits = model(torch.randn(2, *CIFAR))
    assert logits.shape == (2, 10)
    for path, shape in STAGES[name]:
        assert tuple(seen[path].shape) == (2, *shape), path
        # nothing later modified the tapped tensor in place (no inplace ReLU, no +=)
        assert torch.equal(seen[path], copies[path]), path


@pytest.mark.parametrize(
    ("name", "head"), [("resnet20", "fc"), ("vgg8", "classifier"), ("shufflenetv2", "linear")]
)
def test_pooled_features_feed_the_classifier(name: str, head: str) -> None:
    model = _build(name, num_classes=10).eval()
    seen = _tap(model, "flatten")
    with torch.no_grad():
        logits = model(torch.randn(2, *CIFAR))
        assert torch.allclose(logits, model.get_submodule(head)(seen["flatten"]))


def test_stage_pre_activation_is_the_input_of_the_last_relu() -> None:
    # RepDistiller's preact=True feature: the residual sum before the block's final ReLU
    model = _build("resnet8", num_classes=10).eval()
    seen: dict[str, torch.Tensor] = {}
    model.layer2[-1].relu2.register_forward_pre_hook(lambda m, i: seen.__setitem__("pre", i[0]))
    model.layer2.register_forward_hook(lambda m, i, o: seen.__setitem__("out", o))
    with torch.no_grad():
        model(torch.randn(2, *CIFAR))
    assert (seen["pre"] < 0).any()
    assert torch.equal(seen["pre"].clamp(min=0), seen["out"])


@pytest.mark.parametrize("name", list(CHECKPOINT_KEYS))
def test_state_dict_keys_follow_repdistiller(name: str) -> None:
    keys = _build(name).state_dict().keys()
    for key in CHECKPOINT_KEYS[name]:
        assert key in keys, key


@pytest.mark.parametrize("name", SMALL)
def test_grey_and_other_image_sizes(name: str) -> None:
    for shape in ((1, 28, 28), (3, 64, 64), (3, 24, 24)):
        model = _build(name, shape, 7).eval()
        with torch.no_grad():
            assert model(torch.randn(2, *shape)).shape == (2, 7), shape


@pytest.mark.parametrize("side", [32, 64])
def test_vgg_pools_after_block3_only_for_large_images(side: int) -> None:
    # RepDistiller: block4 sees 4x4 maps for 32x32 and for 64x64 images
    model = _build("vgg8", (3, side, side), 10).eval()
    seen = _tap(model, "block4")
    with torch.no_grad():
        model(torch.randn(2, 3, side, side))
    assert seen["block4"].shape == (2, 512, 4, 4)


def test_zoo_names_build_through_build_model() -> None:
    for name in ("resnet8", "cnn_student", "wrn_16_2"):
        model = build_model(ModelSpec(name=name), input_shape=(1, 28, 28), num_classes=10)
        assert model(torch.randn(3, 1, 28, 28)).shape == (3, 10)
    wide = build_model(
        ModelSpec(name="mobilenetv2", args={"width_mult": 1.0}), input_shape=CIFAR, num_classes=10
    )
    assert _count(wide) > _count(_build("mobilenetv2", num_classes=10))
    small = build_model(
        ModelSpec(name="shufflenetv2", args={"net_size": 0.5}), input_shape=CIFAR, num_classes=10
    )
    assert _count(small) < _count(_build("shufflenetv2", num_classes=10))


def test_wrn_dropout_is_active_in_training_only() -> None:
    model = build_model(
        ModelSpec(name="wrn_16_2", args={"dropout": 0.3}), input_shape=CIFAR, num_classes=10
    )
    x = torch.randn(2, *CIFAR)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), model(x))
    model.train()
    torch.manual_seed(0)
    with torch.no_grad():
        assert not torch.equal(model(x), model(x))


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (ModelSpec(name="resnet8", args={"widht": 2}), "widht"),
        (ModelSpec(name="mobilenetv2", args={"width_mult": 0}), "width_mult must be > 0"),
        (ModelSpec(name="shufflenetv2", args={"net_size": 3}), r"net_size must be one of"),
        (ModelSpec(name="wrn_40_2", args={"dropout": 1.0}), r"dropout must be in \[0, 1\)"),
        (ModelSpec(name="resnet8x4"), r"resnet8x4 needs image inputs \(C, H, W\)"),
        (ModelSpec(name="resnt8"), "did you mean 'resnet8'"),
    ],
)
def test_bad_model_arguments_name_the_problem(spec: ModelSpec, message: str) -> None:
    shape = (784,) if spec.name == "resnet8x4" else CIFAR
    with pytest.raises(ModelError, match=message):
        build_model(spec, input_shape=shape, num_classes=10)
