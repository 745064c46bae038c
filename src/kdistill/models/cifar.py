"""CIFAR-style classifiers of the knowledge-distillation literature.

The architectures, and the names of their modules and parameters, follow the
RepDistiller repository (github.com/HobbitLong/RepDistiller, `models/`) of
Tian, Krishnan & Isola (2020), "Contrastive Representation Distillation", whose
CIFAR-100 teacher/student tables later papers (DKD, mdistiller) reuse. A
RepDistiller state dict therefore loads here with `load_state_dict(strict=True)`.

What differs from RepDistiller, none of it changing the function on 3x32x32 input:
- the first convolution takes `input_shape[0]` channels (1 for MNIST);
- pooling before the classifier is global (adaptive), so other image sizes work;
- every activation is its own non-inplace module and nothing is modified in place,
  so a forward hook sees a stage's output exactly as the next stage receives it;
- `forward(x)` returns logits only. Features are read from outside with forward
  hooks at module paths (RepDistiller's `is_feat=True` list, by path):

| family       | stem (f0) | stages (f1, f2, ...)                         | pooled    | logits       |
|--------------|-----------|----------------------------------------------|-----------|--------------|
| resnet*      | `relu`    | `layer1` `layer2` `layer3`                   | `flatten` | `fc`         |
| wrn_*        | `conv1`   | `block1` `block2` `block3`                   | `flatten` | `fc`         |
| vgg*         | `block0`  | `block1` `block2` `block3` `block4`          | `flatten` | `classifier` |
| mobilenetv2  | `conv1`   | `blocks.1` `blocks.2` `blocks.4` `blocks.6`  | `flatten` | `classifier` |
| shufflenetv2 | `relu1`   | `layer1` `layer2` `layer3`                   | `flatten` | `linear`     |
| cnn_*        | `pool1`   | `pool2`                                      | `flatten` | `fc`         |

RepDistiller's pre-activation features (`preact=True`) are the inputs, not the
outputs, of a stage's last ReLU: `layerK.<last block>.relu2` for ResNets, `blockK.2`
(vgg8) or `blockK.5` (vgg13) for VGG; read them with a forward pre-hook.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def _image_shape(name: str, input_shape: tuple[int, ...]) -> tuple[int, int, int]:
    if len(input_shape) != 3:
        raise ValueError(
            f"{name} needs image inputs (C, H, W); the data gives {tuple(input_shape)}. "
            "Use an image dataset, or the mlp for flat features."
        )
    channels, height, width = input_shape
    return channels, height, width


def _init_conv_bn(model: nn.Module) -> None:
    """He et al. (2015) normal init for convolutions (fan_out), BatchNorm as identity."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


# ---------------------------------------------------------------------------------------------
# ResNet for CIFAR: He, Zhang, Ren & Sun (2016), "Deep Residual Learning for Image Recognition",
# §4.2: three stages of n basic blocks, depth 6n + 2.


class BasicBlock(nn.Module):
    """Two 3x3 convolutions and a shortcut (identity, or a strided 1x1 projection), then ReLU."""

    def __init__(self, in_channels: int, channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_channels != channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(channels),
            )
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.relu2(out + shortcut)


class ResNet(nn.Module):
    """CIFAR ResNet: stem conv, three stages (the second and third halve the size), GAP, fc.

    `widths` are (stem, stage 1, stage 2, stage 3) channels: (16, 16, 32, 64) in the
    paper, (32, 64, 128, 256) for RepDistiller's "x4" teachers and students.
    """

    def __init__(
        self,
        *,
        name: str,
        depth: int,
        widths: Sequence[int],
        input_shape: tuple[int, ...],
        num_classes: int,
    ) -> None:
        super().__init__()
        if (depth - 2) % 6 != 0:
            raise ValueError(
                f"{name}: a CIFAR ResNet has depth 6n + 2 (8, 14, 20, ...); got {depth}"
            )
        blocks_per_stage = (depth - 2) // 6
        in_channels = _image_shape(name, input_shape)[0]
        stem, *stages = widths
        self.conv1 = nn.Conv2d(in_channels, stem, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        self.relu = nn.ReLU()
        self.layer1 = self._stage(stem, stages[0], blocks_per_stage, stride=1)
        self.layer2 = self._stage(stages[0], stages[1], blocks_per_stage, stride=2)
        self.layer3 = self._stage(stages[1], stages[2], blocks_per_stage, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(stages[2], num_classes)
        _init_conv_bn(self)

    @staticmethod
    def _stage(in_channels: int, channels: int, blocks: int, *, stride: int) -> nn.Sequential:
        first = BasicBlock(in_channels, channels, stride)
        return nn.Sequential(first, *(BasicBlock(channels, channels, 1) for _ in range(blocks - 1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))  # (B, w0, H, W)
        x = self.layer3(self.layer2(self.layer1(x)))  # (B, w3, H/4, W/4)
        return self.fc(self.flatten(self.avgpool(x)))  # (B, classes)


_RESNET_WIDTHS = (16, 16, 32, 64)
_RESNET_X4_WIDTHS = (32, 64, 128, 256)


def resnet8(*, input_shape: tuple[int, ...], num_classes: int) -> ResNet:
    return ResNet(
        name="resnet8",
        depth=8,
        widths=_RESNET_WIDTHS,
        input_shape=input_shape,
        num_classes=num_classes,
    )


def resnet14(*, input_shape: tuple[int, ...], num_classes: int) -> ResNet:
    return ResNet(
        name="resnet14",
        depth=14,
        widths=_RESNET_WIDTHS,
        input_shape=input_shape,
        num_classes=num_classes,
    )


def resnet20(*, input_shape: tuple[int, ...], num_classes: int) -> ResNet:
    return ResNet(
        name="resnet20",
        depth=20,
        widths=_RESNET_WIDTHS,
        input_shape=input_shape,
        num_classes=num_classes,
    )


def resnet32(*, input_shape: tuple[int, ...], num_classes: int) -> ResNet:
    return ResNet(
        name="resnet32",
        depth=32,
        widths=_RESNET_WIDTHS,
        input_shape=input_shape,
        num_classes=num_classes,
    )


def resnet44(*, input_shape: tuple[int, ...], num_classes: int) -> ResNet:
    return ResNet(
        name="resnet44",
        depth=44,
        widths=_RESNET_WIDTHS,
        input_shape=input_shape,
        num_classes=num_classes,
    )


def resnet56(*, input_shape: tuple[int, ...], num_classes: int) -> ResNet:
    return ResNet(
        name="resnet56",
        depth=56,
        widths=_RESNET_WIDTHS,
        input_shape=input_shape,
        num_classes=num_classes,
    )


def resnet110(*, input_shape: tuple[int, ...], num_classes: int) -> ResNet:
    return ResNet(
        name="resnet110",
        depth=110,
        widths=_RESNET_WIDTHS,
        input_shape=input_shape,
        num_classes=num_classes,
    )


def resnet8x4(*, input_shape: tuple[int, ...], num_classes: int) -> ResNet:
    return ResNet(
        name="resnet8x4",
        depth=8,
        widths=_RESNET_X4_WIDTHS,
        input_shape=input_shape,
        num_classes=num_classes,
    )


def resnet32x4(*, input_shape: tuple[int, ...], num_classes: int) -> ResNet:
    return ResNet(
        name="resnet32x4",
        depth=32,
        widths=_RESNET_X4_WIDTHS,
        input_shape=input_shape,
        num_classes=num_classes,
    )


# ---------------------------------------------------------------------------------------------
# Wide ResNet: Zagoruyko & Komodakis (2016), "Wide Residual Networks". Pre-activation blocks,
# depth 6n + 4, stage widths (16, 32, 64) times the widening factor k; WRN-d-k.


class WideBlock(nn.Module):
    """BN-ReLU-conv3x3, BN-ReLU-(dropout)-conv3x3, plus the shortcut."""

    def __init__(self, in_channels: int, channels: int, stride: int, dropout: float) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.relu1 = nn.ReLU()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.relu2 = nn.ReLU()
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        # RepDistiller's (and the paper's Torch code's) name, kept so its checkpoints load
        self.convShortcut: nn.Module | None = None
        if in_channels != channels:
            self.convShortcut = nn.Conv2d(in_channels, channels, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        activated = self.relu1(self.bn1(x))
        # the paper's code: a projection shortcut reads the activated input, identity the raw one
        shortcut = x if self.convShortcut is None else self.convShortcut(activated)
        out = self.dropout(self.relu2(self.bn2(self.conv1(activated))))
        return shortcut + self.conv2(out)


class WideStage(nn.Module):
    """n wide blocks; the first changes width and stride. (`layer` keeps RepDistiller's keys.)"""

    def __init__(
        self, in_channels: int, channels: int, blocks: int, *, stride: int, dropout: float
    ) -> None:
        super().__init__()
        self.layer = nn.Sequential(
            WideBlock(in_channels, channels, stride, dropout),
            *(WideBlock(channels, channels, 1, dropout) for _ in range(blocks - 1)),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class WideResNet(nn.Module):
    def __init__(
        self,
        *,
        depth: int,
        widen_factor: int,
        input_shape: tuple[int, ...],
        num_classes: int,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        name = f"wrn_{depth}_{widen_factor}"
        if (depth - 4) % 6 != 0:
            raise ValueError(f"a Wide ResNet has depth 6n + 4 (10, 16, 22, ...); got {depth}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"{name}: dropout must be in [0, 1); got {dropout}")
        n = (depth - 4) // 6
        in_channels = _image_shape(name, input_shape)[0]
        k = widen_factor
        self.conv1 = nn.Conv2d(in_channels, 16, 3, padding=1, bias=False)
        self.block1 = WideStage(16, 16 * k, n, stride=1, dropout=dropout)
        self.block2 = WideStage(16 * k, 32 * k, n, stride=2, dropout=dropout)
        self.block3 = WideStage(32 * k, 64 * k, n, stride=2, dropout=dropout)
        self.bn1 = nn.BatchNorm2d(64 * k)
        self.relu = nn.ReLU()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(64 * k, num_classes)
        _init_conv_bn(self)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block3(self.block2(self.block1(self.conv1(x))))  # (B, 64k, H/4, W/4)
        x = self.relu(self.bn1(x))
        return self.fc(self.flatten(self.avgpool(x)))  # (B, classes)


def wrn_16_2(*, input_shape: tuple[int, ...], num_classes: int, dropout: float = 0.0) -> WideResNet:
    return WideResNet(
        depth=16, widen_factor=2, input_shape=input_shape, num_classes=num_classes, dropout=dropout
    )


def wrn_40_2(*, input_shape: tuple[int, ...], num_classes: int, dropout: float = 0.0) -> WideResNet:
    return WideResNet(
        depth=40, widen_factor=2, input_shape=input_shape, num_classes=num_classes, dropout=dropout
    )


# ---------------------------------------------------------------------------------------------
# VGG with batch norm: Simonyan & Zisserman (2015), "Very Deep Convolutional Networks for
# Large-Scale Image Recognition", without the large fully connected layers (RepDistiller's
# CIFAR variant: five conv blocks, global average pooling, one linear classifier).


def _vgg_block(in_channels: int, widths: Sequence[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for width in widths:
        layers += [nn.Conv2d(in_channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU()]
        in_channels = width
    return nn.Sequential(*layers)


class VGG(nn.Module):
    """Five blocks of 3x3 conv-BN-ReLU, max pooling between them, GAP, linear.

    As in RepDistiller, the pooling after block 3 is applied only to large images
    (RepDistiller: exactly 64 pixels high; here: at least 64), so block 4 of a 32x32
    image sees 4x4 maps.
    """

    def __init__(
        self,
        *,
        name: str,
        blocks: Sequence[Sequence[int]],
        input_shape: tuple[int, ...],
        num_classes: int,
    ) -> None:
        super().__init__()
        in_channels, height, _ = _image_shape(name, input_shape)
        widths = [in_channels] + [block[-1] for block in blocks]
        self.block0 = _vgg_block(widths[0], blocks[0])
        self.pool0 = nn.MaxPool2d(2)
        self.block1 = _vgg_block(widths[1], blocks[1])
        self.pool1 = nn.MaxPool2d(2)
        self.block2 = _vgg_block(widths[2], blocks[2])
        self.pool2 = nn.MaxPool2d(2)
        self.block3 = _vgg_block(widths[3], blocks[3])
        self.pool3 = nn.MaxPool2d(2) if height >= 64 else nn.Identity()
        self.block4 = _vgg_block(widths[4], blocks[4])
        self.pool4 = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.classifier = nn.Linear(widths[5], num_classes)
        _init_conv_bn(self)
        nn.init.normal_(self.classifier.weight, 0.0, 0.01)
        nn.init.zeros_(self.classifier.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool0(self.block0(x))  # (B, 64, H/2, W/2)
        x = self.pool1(self.block1(x))  # (B, 128, H/4, W/4)
        x = self.pool2(self.block2(x))  # (B, 256, H/8, W/8)
        x = self.pool3(self.block3(x))  # (B, 512, H/8 or H/16, ...)
        x = self.pool4(self.block4(x))  # (B, 512, 1, 1)
        return self.classifier(self.flatten(x))  # (B, classes)


def vgg8(*, input_shape: tuple[int, ...], num_classes: int) -> VGG:
    """RepDistiller's `vgg8` (configuration "S", with batch norm): one conv per block."""
    blocks = [[64], [128], [256], [512], [512]]
    return VGG(name="vgg8", blocks=blocks, input_shape=input_shape, num_classes=num_classes)


def vgg13(*, input_shape: tuple[int, ...], num_classes: int) -> VGG:
    """RepDistiller's `vgg13` (configuration "B", with batch norm): two convs per block."""
    blocks = [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]]
    return VGG(name="vgg13", blocks=blocks, input_shape=input_shape, num_classes=num_classes)


# ---------------------------------------------------------------------------------------------
# MobileNetV2: Sandler, Howard, Zhu, Zhmoginov & Chen (2018), "MobileNetV2: Inverted Residuals
# and Linear Bottlenecks"; RepDistiller's CIFAR version (from "Knowledge Distillation via Route
# Constrained Optimization", Jin et al. 2019), whose `mobile_half` is width 0.5, expansion 6.


def _conv_bn_relu(in_channels: int, channels: int, kernel: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, channels, kernel, stride, kernel // 2, bias=False),
        nn.BatchNorm2d(channels),
        nn.ReLU(),
    )


class InvertedResidual(nn.Module):
    """1x1 expand, 3x3 depthwise, 1x1 linear projection; residual when shapes allow."""

    def __init__(self, in_channels: int, channels: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        hidden = in_channels * expand_ratio
        self.use_residual = stride == 1 and in_channels == channels
        self.conv = nn.Sequential(
            nn.Conv2d(in_channels, hidden, 1, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(),
            nn.Conv2d(hidden, channels, 1, bias=False),
            nn.BatchNorm2d(channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)
        return x + out if self.use_residual else out


class MobileNetV2(nn.Module):
    # (expansion, channels, blocks, stride) per stage; None means the model's expand_ratio
    _STAGES = (
        (1, 16, 1, 1),
        (None, 24, 2, 1),
        (None, 32, 3, 2),
        (None, 64, 4, 2),
        (None, 96, 3, 1),
        (None, 160, 3, 2),
        (None, 320, 1, 1),
    )

    def __init__(
        self,
        *,
        input_shape: tuple[int, ...],
        num_classes: int,
        width_mult: float,
        expand_ratio: int,
    ) -> None:
        super().__init__()
        in_channels = _image_shape("mobilenetv2", input_shape)[0]
        channels = int(32 * width_mult)
        self.conv1 = _conv_bn_relu(in_channels, channels, 3, stride=2)
        stages = []
        for t, c, n, s in self._STAGES:
            out_channels = int(c * width_mult)
            blocks = []
            for stride in [s] + [1] * (n - 1):
                blocks.append(InvertedResidual(channels, out_channels, stride, t or expand_ratio))
                channels = out_channels
            stages.append(nn.Sequential(*blocks))
        self.blocks = nn.Sequential(*stages)
        last_channels = int(1280 * width_mult) if width_mult > 1.0 else 1280
        self.conv2 = _conv_bn_relu(channels, last_channels, 1, stride=1)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        head = nn.Linear(last_channels, num_classes)
        self.classifier = nn.Sequential(head)  # a Sequential, as in RepDistiller's checkpoints
        _init_conv_bn(self)
        nn.init.normal_(head.weight, 0.0, 0.01)
        nn.init.zeros_(head.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.conv1(x))  # (B, 320 * width, H/16, W/16)
        x = self.avgpool(self.conv2(x))  # (B, 1280, 1, 1)
        return self.classifier(self.flatten(x))  # (B, classes)


def mobilenetv2(
    *,
    input_shape: tuple[int, ...],
    num_classes: int,
    width_mult: float = 0.5,
    expand_ratio: int = 6,
) -> MobileNetV2:
    """RepDistiller's `mobile_half` by default (width 0.5, expansion 6), the CRD "MobileNetV2"."""
    problems = []
    if not width_mult > 0:
        problems.append(f"width_mult must be > 0; got {width_mult}")
    if not (isinstance(expand_ratio, int) and expand_ratio >= 1):
        problems.append(f"expand_ratio must be an integer >= 1; got {expand_ratio!r}")
    if problems:
        raise ValueError("mobilenetv2: " + "; ".join(problems))
    return MobileNetV2(
        input_shape=input_shape,
        num_classes=num_classes,
        width_mult=width_mult,
        expand_ratio=expand_ratio,
    )


# ---------------------------------------------------------------------------------------------
# ShuffleNetV2: Ma, Zhang, Zheng & Sun (2018), "ShuffleNet V2: Practical Guidelines for Efficient
# CNN Architecture Design"; RepDistiller's CIFAR version (1x1 stem, no max pool, 3 down-samplings).


class ChannelShuffle(nn.Module):
    """(B, g*c, H, W) -> (B, c*g, H, W): interleave the channels of g groups."""

    def __init__(self, groups: int = 2) -> None:
        super().__init__()
        self.groups = groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        g = self.groups
        return x.view(b, g, c // g, h, w).transpose(1, 2).reshape(b, c, h, w)


class ShuffleBlock(nn.Module):
    """Split channels in half, transform the second half, concatenate, shuffle."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        half = channels // 2
        self.conv1 = nn.Conv2d(half, half, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(half)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(half, half, 3, padding=1, groups=half, bias=False)
        self.bn2 = nn.BatchNorm2d(half)
        self.conv3 = nn.Conv2d(half, half, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(half)
        self.relu3 = nn.ReLU()
        self.shuffle = ChannelShuffle()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        half = x.shape[1] // 2
        kept, transformed = x[:, :half], x[:, half:]
        out = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(transformed)))))
        out = self.relu3(self.bn3(self.conv3(out)))
        return self.shuffle(torch.cat([kept, out], 1))


class ShuffleDownBlock(nn.Module):
    """Two strided branches (depthwise-pointwise, pointwise-depthwise-pointwise), shuffled."""

    def __init__(self, in_channels: int, channels: int) -> None:
        super().__init__()
        half = channels // 2
        # left branch
        self.conv1 = nn.Conv2d(
            in_channels, in_channels, 3, stride=2, padding=1, groups=in_channels, bias=False
        )
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv2 = nn.Conv2d(in_channels, half, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(half)
        self.relu2 = nn.ReLU()
        # right branch
        self.conv3 = nn.Conv2d(in_channels, half, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(half)
        self.relu3 = nn.ReLU()
        self.conv4 = nn.Conv2d(half, half, 3, stride=2, padding=1, groups=half, bias=False)
        self.bn4 = nn.BatchNorm2d(half)
        self.conv5 = nn.Conv2d(half, half, 1, bias=False)
        self.bn5 = nn.BatchNorm2d(half)
        self.relu5 = nn.ReLU()
        self.shuffle = ChannelShuffle()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        left = self.relu2(self.bn2(self.conv2(self.bn1(self.conv1(x)))))
        right = self.bn4(self.conv4(self.relu3(self.bn3(self.conv3(x)))))
        right = self.relu5(self.bn5(self.conv5(right)))
        return self.shuffle(torch.cat([left, right], 1))


# net size -> (stage widths, last conv width); the stages have 3, 7 and 3 blocks
_SHUFFLENETV2_SIZES = {
    0.5: ((48, 96, 192), 1024),
    1.0: ((116, 232, 464), 1024),
    1.5: ((176, 352, 704), 1024),
    2.0: ((224, 488, 976), 2048),
}


class ShuffleNetV2(nn.Module):
    def __init__(self, *, input_shape: tuple[int, ...], num_classes: int, net_size: float) -> None:
        super().__init__()
        if net_size not in _SHUFFLENETV2_SIZES:
            raise ValueError(
                f"shufflenetv2: net_size must be one of {sorted(_SHUFFLENETV2_SIZES)}; got {net_size!r}"
            )
        widths, last = _SHUFFLENETV2_SIZES[net_size]
        in_channels = _image_shape("shufflenetv2", input_shape)[0]
        self.conv1 = nn.Conv2d(in_channels, 24, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        self.relu1 = nn.ReLU()
        self.layer1 = self._stage(24, widths[0], 3)
        self.layer2 = self._stage(widths[0], widths[1], 7)
        self.layer3 = self._stage(widths[1], widths[2], 3)
        self.conv2 = nn.Conv2d(widths[2], last, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(last)
        self.relu2 = nn.ReLU()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.linear = nn.Linear(last, num_classes)

    @staticmethod
    def _stage(in_channels: int, channels: int, blocks: int) -> nn.Sequential:
        return nn.Sequential(
            ShuffleDownBlock(in_channels, channels),
            *(ShuffleBlock(channels) for _ in range(blocks)),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu1(self.bn1(self.conv1(x)))  # (B, 24, H, W)
        x = self.layer3(self.layer2(self.layer1(x)))  # (B, widths[2], H/8, W/8)
        x = self.avgpool(self.relu2(self.bn2(self.conv2(x))))  # (B, last, 1, 1)
        return self.linear(self.flatten(x))  # (B, classes)


def shufflenetv2(
    *, input_shape: tuple[int, ...], num_classes: int, net_size: float = 1.0
) -> ShuffleNetV2:
    """RepDistiller's `ShuffleV2` by default (net size 1: widths 116, 232, 464, 1024)."""
    return ShuffleNetV2(input_shape=input_shape, num_classes=num_classes, net_size=net_size)


# ---------------------------------------------------------------------------------------------
# Two small CNNs for quick teacher/student runs: conv-ReLU-maxpool twice, then one linear layer.


class SmallCNN(nn.Module):
    def __init__(
        self, *, input_shape: tuple[int, ...], num_classes: int, channels: Sequence[int]
    ) -> None:
        super().__init__()
        in_channels, height, width = _image_shape("small cnn", input_shape)
        if len(channels) != 2 or min(channels) < 1:
            raise ValueError(f"channels must be two positive widths; got {list(channels)}")
        if height < 4 or width < 4:
            raise ValueError(
                f"the small CNN pools twice by 2, so images must be at least 4x4; got {height}x{width}"
            )
        c1, c2 = channels
        self.conv1 = nn.Conv2d(in_channels, c1, 3, padding=1)
        self.relu1 = nn.ReLU()
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(c1, c2, 3, padding=1)
        self.relu2 = nn.ReLU()
        self.pool2 = nn.MaxPool2d(2)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(c2 * (height // 4) * (width // 4), num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool1(self.relu1(self.conv1(x)))  # (B, c1, H/2, W/2)
        x = self.pool2(self.relu2(self.conv2(x)))  # (B, c2, H/4, W/4)
        return self.fc(self.flatten(x))  # (B, classes)


def small_cnn(
    *, input_shape: tuple[int, ...], num_classes: int, channels: Sequence[int] = (32, 64)
) -> SmallCNN:
    """conv(c1)-ReLU-maxpool-conv(c2)-ReLU-maxpool-linear, 3x3 'same' convolutions."""
    return SmallCNN(input_shape=input_shape, num_classes=num_classes, channels=channels)


def cnn_teacher(*, input_shape: tuple[int, ...], num_classes: int) -> SmallCNN:
    """The small CNN with 32 and 64 channels."""
    return small_cnn(input_shape=input_shape, num_classes=num_classes, channels=(32, 64))


def cnn_student(*, input_shape: tuple[int, ...], num_classes: int) -> SmallCNN:
    """The small CNN with 16 and 32 channels (about a quarter of the teacher's convolutions)."""
    return small_cnn(input_shape=input_shape, num_classes=num_classes, channels=(16, 32))
