"""A small anchor-free detector for the shapes scenes, with the Ultralytics export head layout.

The output is ``[B, 4 + classes, anchors]``: per anchor point (one per cell of the stride-8
grid) the box center, width and height in input pixels and a sigmoid score per class, as an
Ultralytics detection model exports it, so trtforge's ``yolo`` decoder reads it unchanged.
"""

from __future__ import annotations

import torch
from torch import nn

STRIDE = 8
# Widths and heights are exp(t) * STRIDE; the clamp keeps an untrained head from overflowing.
MAX_LOG_SIZE = 4.0


def _block(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class ShapesDetector(nn.Module):
    def __init__(self, num_classes: int = 3, width: int = 32, size: int = 64):
        super().__init__()
        self.num_classes = num_classes
        self.backbone = nn.Sequential(
            _block(3, width // 2, 2),
            _block(width // 2, width, 2),
            _block(width, width),
            _block(width, 2 * width, 2),
            _block(2 * width, 2 * width),
            _block(2 * width, 2 * width),
        )
        self.box = nn.Sequential(_block(2 * width, 2 * width), nn.Conv2d(2 * width, 4, 1))
        self.cls = nn.Sequential(_block(2 * width, 2 * width), nn.Conv2d(2 * width, num_classes, 1))
        cells = size // STRIDE
        gy, gx = torch.meshgrid(torch.arange(cells), torch.arange(cells), indexing="ij")
        self.register_buffer("grid", torch.stack([gx, gy]).reshape(2, -1).float() + 0.5, persistent=False)
        # Few anchors hold an object: start every score low (as Ultralytics' bias init does).
        nn.init.constant_(self.cls[-1].bias, -4.0)

    def raw(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Box terms [B, 4, A] and class logits [B, classes, A]."""
        features = self.backbone(x)
        return self.box(features).flatten(2), self.cls(features).flatten(2)

    @staticmethod
    def decode(box: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
        """cx, cy, w, h in pixels from the box terms: centers within 1.5 cells of the anchor point."""
        center = (grid + 1.5 * torch.tanh(box[:, :2])) * STRIDE
        size = torch.exp(box[:, 2:].clamp(max=MAX_LOG_SIZE)) * STRIDE
        return torch.cat([center, size], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        box, logits = self.raw(x)
        return torch.cat([self.decode(box, self.grid), logits.sigmoid()], dim=1)


def build_model(num_classes: int = 3, width: int = 32) -> nn.Module:
    return ShapesDetector(num_classes=num_classes, width=width)
