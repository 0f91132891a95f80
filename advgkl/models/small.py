"""Small CNNs for tests, demos and the Fashion-MNIST study; all accept any in_channels and 28x28 or 32x32 inputs."""

from __future__ import annotations

from torch import nn

from advgkl.models import register_model


@register_model("tiny_cnn")
def tiny_cnn(num_classes: int = 10, in_channels: int = 3, width: int = 8) -> nn.Module:
    """conv(w)-pool-conv(2w)-pool-fc: 3,818 params for 1x28x28 and 10 classes (width 8).

    Input [B, in_channels, H, W] with H, W >= 16; output [B, num_classes]. For unit tests: trains on
    Fashion-MNIST to ~80% in one CPU epoch of a few seconds.
    """
    return nn.Sequential(
        nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        nn.AdaptiveAvgPool2d(4),  # 7x7 (28px) and 8x8 (32px) maps both become 4x4: one fc for both sizes
        nn.Flatten(),
        nn.Linear(2 * width * 16, num_classes),
    )


@register_model("small_cnn")
def small_cnn(num_classes: int = 10, in_channels: int = 3, hidden: int = 50) -> nn.Module:
    """conv32-pool-conv64-pool-conv128-fc(hidden)-fc: 406,832 params for 1x28x28, 10 classes.

    The demo/study model for Fashion-MNIST. Input [B, in_channels, H, W] with H, W >= 28; output
    [B, num_classes]. No BatchNorm, so train and eval mode compute the same function. Pooling right
    after the first conv keeps it at ~7.8 M multiply-adds per 28x28 image, so 5-step adversarial
    training of a 60k-image epoch stays in CPU minutes.
    """
    return nn.Sequential(
        nn.Conv2d(in_channels, 32, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        nn.Conv2d(64, 128, 3, padding=1), nn.ReLU(inplace=True),
        nn.AdaptiveAvgPool2d(7),  # identity at 28px, 8x8 -> 7x7 at 32px: same fc for both
        nn.Flatten(),
        nn.Linear(128 * 7 * 7, hidden), nn.ReLU(inplace=True),
        nn.Linear(hidden, num_classes),
    )


@register_model("mini_cnn")
def mini_cnn(num_classes: int = 10, in_channels: int = 3, hidden: int = 50) -> nn.Module:
    """small_cnn at half width with a 4x4 pooled head: 75,056 params for 1x28x28, 10 classes.

    The distillation student of the Fashion-MNIST study: 5.4x fewer parameters and ~4x fewer
    multiply-adds (~2.0 M per 28x28 image) than its small_cnn teacher. No BatchNorm.
    """
    return nn.Sequential(
        nn.Conv2d(in_channels, 16, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(inplace=True),
        nn.AdaptiveAvgPool2d(4),  # 7x7 (28px) or 8x8 (32px) -> 4x4
        nn.Flatten(),
        nn.Linear(64 * 4 * 4, hidden), nn.ReLU(inplace=True),
        nn.Linear(hidden, num_classes),
    )
