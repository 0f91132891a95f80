"""Pre-activation ResNet-18 (He et al. 2016), the CIFAR variant used across adversarial training
papers (e.g. Rice et al. 2020): 3x3 stem, four stages of two blocks, 1x1 projection shortcuts."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from advgkl.models import CheckpointableBlock, make_activation, register_model


class PreActBlock(CheckpointableBlock):
    """bn-act-conv3x3-bn-act-conv3x3 plus shortcut; [B, cin, H, W] -> [B, cout, H/stride, W/stride]."""

    def __init__(self, cin: int, cout: int, stride: int, activation: str):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.act1 = make_activation(activation)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.act2 = make_activation(activation)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.shortcut = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Conv2d(cin, cout, 1, stride=stride, bias=False)

    def block(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act1(self.bn1(x))
        # the projection sees the pre-activated input, the identity sees the raw one (He et al. 2016)
        skip = x if self.shortcut is None else self.shortcut(out)
        out = self.conv1(out)
        out = self.conv2(self.act2(self.bn2(out)))
        return out + skip


class PreActResNet(nn.Module):
    """Input [B, in_channels, H, W] (32x32 for CIFAR; any size works) -> logits [B, num_classes]."""

    def __init__(self, num_blocks=(2, 2, 2, 2), num_classes: int = 10, in_channels: int = 3,
                 activation: str = "relu"):
        super().__init__()
        self.stem = nn.Conv2d(in_channels, 64, 3, padding=1, bias=False)
        stages, cin = [], 64
        for i, n in enumerate(num_blocks):
            cout = 64 * 2**i
            blocks = [PreActBlock(cin if j == 0 else cout, cout, 2 if (i > 0 and j == 0) else 1, activation)
                      for j in range(n)]
            stages.append(nn.Sequential(*blocks))
            cin = cout
        self.stages = nn.Sequential(*stages)
        self.bn = nn.BatchNorm2d(cin)
        self.act = make_activation(activation)
        self.fc = nn.Linear(cin, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.stages(self.stem(x))
        out = self.act(self.bn(out))
        # global average pool = avg_pool2d(4) at 32x32, and still valid for other sizes
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.fc(out)


@register_model("preact_resnet18")
def preact_resnet18(num_classes: int = 10, in_channels: int = 3, activation: str = "relu") -> nn.Module:
    """PreActResNet-18: 11,172,170 params for 10 classes, 0.56 GMACs (1.11 GFLOPs) per 32x32 image.

    Includes the final BN-act before the classifier (He et al. 2016, Rice et al. 2020); variants
    without it have 1,024 fewer parameters (11,171,146).
    """
    return PreActResNet((2, 2, 2, 2), num_classes, in_channels, activation)
