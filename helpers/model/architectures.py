"""Built-in architectures: He et al.'s CIFAR ResNets and torchvision ResNets with a CIFAR stem.

Module and state_dict key names of the CIFAR ResNets follow chenyaofo's "pytorch-cifar-models"
(conv1, bn1, layer1..3, blocks with conv1/bn1/conv2/bn2 and downsample.0/.1, fc), so its released
checkpoints load with strict=True. The natural Grad-CAM layer is `layer3[-1]` (8x8 on 32x32 input).
`describe_arch_choices` lists every ARCH value, built-in or not.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn


def _conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """conv3x3-bn-relu-conv3x3-bn, plus the identity (or a 1x1 projection where the shape changes), relu."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = _conv3x3(in_planes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        # Not in-place: CAM libraries hook block outputs and some swap ReLUs for guided backprop.
        self.relu = nn.ReLU()
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_planes, planes, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32x32 inputs: 3 stages of n BasicBlocks, 16/32/64 channels."""

    def __init__(self, depth: int, num_classes: int = 100, in_channels: int = 3):
        super().__init__()
        if (depth - 2) % 6 != 0 or depth < 8:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 (20, 32, 44, 56, 110); got {depth}")
        blocks = (depth - 2) // 6
        self.depth = depth
        self.conv1 = _conv3x3(in_channels, 16)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU()
        self.layer1 = self._make_layer(16, 16, blocks, stride=1)
        self.layer2 = self._make_layer(16, 32, blocks, stride=2)
        self.layer3 = self._make_layer(32, 64, blocks, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    @staticmethod
    def _make_layer(in_planes: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
        layers = [BasicBlock(in_planes, planes, stride)]
        layers += [BasicBlock(planes, planes) for _ in range(blocks - 1)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


def resnet20(num_classes: int = 100, in_channels: int = 3) -> CifarResNet:
    return CifarResNet(20, num_classes, in_channels)


def resnet32(num_classes: int = 100, in_channels: int = 3) -> CifarResNet:
    return CifarResNet(32, num_classes, in_channels)


def resnet44(num_classes: int = 100, in_channels: int = 3) -> CifarResNet:
    return CifarResNet(44, num_classes, in_channels)


def resnet56(num_classes: int = 100, in_channels: int = 3) -> CifarResNet:
    return CifarResNet(56, num_classes, in_channels)


def resnet110(num_classes: int = 100, in_channels: int = 3) -> CifarResNet:
    return CifarResNet(110, num_classes, in_channels)


def _cifar_stem_resnet(name: str, num_classes: int, in_channels: int) -> nn.Module:
    """torchvision's ResNet with the usual CIFAR adaptation: a 3x3 stride-1 first conv and no
    max-pool, so 32x32 inputs keep enough resolution (layer4 gives 4x4 maps instead of 1x1)."""
    import torchvision  # imported on use: it is slow to import

    model = getattr(torchvision.models, name)(num_classes=num_classes)
    model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
    nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    model.maxpool = nn.Identity()
    return model


def resnet18(num_classes: int = 100, in_channels: int = 3) -> nn.Module:
    return _cifar_stem_resnet("resnet18", num_classes, in_channels)


def resnet34(num_classes: int = 100, in_channels: int = 3) -> nn.Module:
    return _cifar_stem_resnet("resnet34", num_classes, in_channels)


def resnet50(num_classes: int = 100, in_channels: int = 3) -> nn.Module:
    return _cifar_stem_resnet("resnet50", num_classes, in_channels)


BUILTIN_ARCHS: dict[str, Callable[..., nn.Module]] = {
    "resnet20": resnet20,
    "resnet32": resnet32,
    "resnet44": resnet44,
    "resnet56": resnet56,
    "resnet110": resnet110,
    "resnet18": resnet18,
    "resnet34": resnet34,
    "resnet50": resnet50,
}


def describe_arch_choices() -> str:
    """Every ARCH value load.build_model accepts, for messages (here so that checkpoint.py can name them too)."""
    builtins = ", ".join(BUILTIN_ARCHS)
    return (
        f"built-in: {builtins}; any torchvision.models classification name (e.g. 'vgg11_bn', "
        "'mobilenet_v3_small'; 'torchvision:resnet18' for the ImageNet-stem ResNet); 'timm:<name>' "
        "(needs `pip install timm`); 'path/to/model.py:ClassName' (your own class, MODEL_KWARGS go to its "
        "constructor); or leave ARCH empty for TorchScript files and checkpoints of the built-ins"
    )
