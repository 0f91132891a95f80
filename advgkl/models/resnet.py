"""ResNet-50 for ImageNet: torchvision's architecture, the most common model of RobustBench's ImageNet boards."""
from __future__ import annotations

from torch import nn

from advgkl.errors import UserError
from advgkl.models import register_model


@register_model("resnet50")
def resnet50(num_classes: int = 1000, in_channels: int = 3) -> nn.Module:
    """torchvision's ResNet-50 (25.6 M parameters at 1000 classes, 4.1 GFLOPs at 224x224), random weights.

    Input [B, 3, H, W] (normalised by advgkl's Normalize in front of it); output [B, num_classes]. Any H, W
    from 32 up works (global average pooling); ImageNet recipes use 224.
    """
    from torchvision.models import resnet50 as torchvision_resnet50

    if in_channels != 3:
        raise UserError(f"model resnet50 takes RGB images (3 channels); the dataset has {in_channels}")
    return torchvision_resnet50(num_classes=num_classes)
