"""A small encoder-decoder for the shapes scenes: class scores per pixel, [B, 4, 64, 64]."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional


def _block(cin: int, cout: int, stride: int = 1, kernel: int = 3) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class ShapesSegmenter(nn.Module):
    def __init__(self, num_classes: int = 4, width: int = 16):
        super().__init__()
        self.stem = _block(3, width, 2)  # 32x32
        self.down = nn.Sequential(_block(width, 2 * width, 2), _block(2 * width, 2 * width))  # 16x16
        self.context = nn.Sequential(_block(2 * width, 4 * width, 2), _block(4 * width, 4 * width))  # 8x8
        self.fuse16 = nn.Sequential(_block(6 * width, 2 * width, kernel=1), _block(2 * width, 2 * width))
        self.fuse32 = nn.Sequential(_block(3 * width, width, kernel=1), _block(width, width))
        self.classify = nn.Conv2d(width, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f32 = self.stem(x)
        f16 = self.down(f32)
        f8 = self.context(f16)
        up = functional.interpolate(f8, scale_factor=2.0, mode="bilinear", align_corners=False)
        f16 = self.fuse16(torch.cat([f16, up], dim=1))
        up = functional.interpolate(f16, scale_factor=2.0, mode="bilinear", align_corners=False)
        f32 = self.fuse32(torch.cat([f32, up], dim=1))
        return functional.interpolate(self.classify(f32), scale_factor=2.0, mode="bilinear", align_corners=False)


def build_model(num_classes: int = 4, width: int = 16) -> nn.Module:
    return ShapesSegmenter(num_classes=num_classes, width=width)
