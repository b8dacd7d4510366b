"""Small convolutional networks for 1-channel images (Fashion-MNIST sized), written so that
every operation of their forward pass has a variance rule and every activation is its own
``nn.ReLU`` module (one GAPA call site per use).
"""

from __future__ import annotations

import torch
from torch import nn

from gapa.errors import ConfigurationError, InputError


def _conv_bn(c_in: int, c_out: int, stride: int = 1, kernel: int = 3) -> list[nn.Module]:
    # no conv bias: the batch norm's shift replaces it
    return [nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, bias=False), nn.BatchNorm2d(c_out)]


class BasicBlock(nn.Module):
    """``relu(bn(conv(relu(bn(conv(x))))) + shortcut(x))``, the standard ResNet block; the
    shortcut is a strided 1x1 convolution with batch norm when the shape changes."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1, dropout: float = 0.0):
        super().__init__()
        self.conv1, self.bn1 = _conv_bn(c_in, c_out, stride)
        self.relu1 = nn.ReLU()
        if dropout > 0:  # between the two convolutions, as in wide ResNets (MC dropout's copy)
            self.dropout = nn.Dropout(dropout)
        self.conv2, self.bn2 = _conv_bn(c_out, c_out)
        self.shortcut = (
            nn.Sequential(*_conv_bn(c_in, c_out, stride, kernel=1))
            if stride != 1 or c_in != c_out else nn.Identity()
        )
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.relu1(self.bn1(self.conv1(x)))
        if hasattr(self, "dropout"):
            h = self.dropout(h)
        return self.relu2(self.bn2(self.conv2(h)) + self.shortcut(x))


class SmallResNet(nn.Module):
    """A CIFAR-style ResNet for 1x28x28 images: a 3x3 stem, three stages of ``blocks`` basic
    blocks with widths 16/32/64 (the last two halve the resolution: 28 -> 14 -> 7), global
    average pooling and a linear head. ``blocks=2`` gives a ResNet-14 of 0.17M parameters, the
    size at which ResNets commonly exceed 91% test accuracy on Fashion-MNIST with standard SGD
    training. Being convolutional up to the pool, it also accepts other image sizes.
    ``dropout > 0`` adds an ``nn.Dropout`` inside every block (the MC-dropout copy); without it
    the modules are exactly those above."""

    def __init__(self, num_classes: int = 10, blocks: int = 2, in_channels: int = 1,
                 widths: tuple[int, int, int] = (16, 32, 64), dropout: float = 0.0):
        super().__init__()
        if blocks < 1 or num_classes < 1 or in_channels < 1:
            raise ConfigurationError(
                f"blocks, num_classes and in_channels must be positive, got {blocks}, "
                f"{num_classes}, {in_channels}"
            )
        self.stem = nn.Sequential(*_conv_bn(in_channels, widths[0]), nn.ReLU())
        stages, c_in = [], widths[0]
        for i, width in enumerate(widths):
            stage = [BasicBlock(c_in if b == 0 else width, width,
                                2 if (i > 0 and b == 0) else 1, dropout)
                     for b in range(blocks)]
            stages.append(nn.Sequential(*stage))
            c_in = width
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(widths[-1], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.pool(self.stages(self.stem(x)))
        return self.head(torch.flatten(h, 1))


class DoubleConv(nn.Sequential):
    """(3x3 conv, batch norm, ReLU) twice: the U-Net's unit at every resolution."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__(*_conv_bn(c_in, c_out), nn.ReLU(), *_conv_bn(c_out, c_out), nn.ReLU())


class UNet(nn.Module):
    """A small U-Net for 1-channel images: per-pixel class logits ``(N, num_classes, H, W)``.

    Two 2x2 max-pool downsamplings (widths 16/32, bottleneck 64), 2x2 stride-2 transposed
    convolutions to upsample, and skip connections joined by ``torch.cat`` so fine detail of
    the encoder reaches the decoder. Height and width must be divisible by 4 (28 is). With
    ``dropout > 0``, channel dropout (``nn.Dropout2d``) follows the bottleneck and the last
    decoder block (the MC-dropout baseline's network); without it there are no dropout modules."""

    def __init__(self, num_classes: int = 2, in_channels: int = 1,
                 widths: tuple[int, int, int] = (16, 32, 64), dropout: float = 0.0):
        super().__init__()
        if num_classes < 1 or in_channels < 1:
            raise ConfigurationError(
                f"num_classes and in_channels must be positive, got {num_classes}, {in_channels}"
            )
        w1, w2, w3 = widths
        self.enc1 = DoubleConv(in_channels, w1)
        self.enc2 = DoubleConv(w1, w2)
        self.pool1, self.pool2 = nn.MaxPool2d(2), nn.MaxPool2d(2)
        self.bottleneck = DoubleConv(w2, w3)
        self.up2 = nn.ConvTranspose2d(w3, w2, 2, stride=2)
        self.dec2 = DoubleConv(2 * w2, w2)
        self.up1 = nn.ConvTranspose2d(w2, w1, 2, stride=2)
        self.dec1 = DoubleConv(2 * w1, w1)
        self.head = nn.Conv2d(w1, num_classes, 1)
        self.drop_b = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.drop_d = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[-1] % 4 or x.shape[-2] % 4:
            raise InputError(
                f"UNet expects (batch, channels, H, W) with H and W divisible by 4, got "
                f"{tuple(x.shape)}"
            )
        e1 = self.enc1(x)
        e2 = self.enc2(self.pool1(e1))
        b = self.drop_b(self.bottleneck(self.pool2(e2)))
        d2 = self.dec2(torch.cat([self.up2(b), e2], dim=1))
        d1 = self.drop_d(self.dec1(torch.cat([self.up1(d2), e1], dim=1)))
        return self.head(d1)
