"""A small CNN for the 8x8 grayscale digits of the embedded demo, laid out like a ResNet."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from .arch import tag


def _conv_bn(in_ch: int, out_ch: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, 3, stride, 1, bias=False), nn.BatchNorm2d(out_ch), nn.ReLU()
    )


class DigitsNet(nn.Module):
    """``conv1 → layer1 (tap) → layer2 → layer3 → fc`` for 1x8x8 inputs."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 32) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.layer1 = _conv_bn(width, width)
        self.layer2 = nn.Sequential(_conv_bn(width, 2 * width, 2), _conv_bn(2 * width, 2 * width))
        self.layer3 = nn.Sequential(
            _conv_bn(2 * width, 4 * width, 2), _conv_bn(4 * width, 4 * width)
        )
        self.fc = nn.Linear(4 * width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        return self.fc(F.adaptive_avg_pool2d(out, 1).flatten(1))


def digits_net(num_classes: int = 10, in_channels: int = 1) -> DigitsNet:
    return tag(DigitsNet(num_classes, in_channels), "digits_net", num_classes, in_channels)
