"""A small CNN for scikit-learn's 8x8 digits: the example that runs end to end on any CPU."""

from __future__ import annotations

from torch import nn


class DigitsCNN(nn.Module):
    def __init__(self, channels: int = 16, num_classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, channels, kernel_size=3, padding=1),
            nn.BatchNorm2d(channels),
            nn.ReLU(),
            nn.Conv2d(channels, 2 * channels, kernel_size=3, padding=1),
            nn.BatchNorm2d(2 * channels),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(2 * channels * 4 * 4, 64), nn.ReLU(), nn.Linear(64, num_classes))

    def forward(self, x):
        return self.classifier(self.features(x))


def build_model(channels: int = 16, num_classes: int = 10) -> nn.Module:
    return DigitsCNN(channels=channels, num_classes=num_classes)
