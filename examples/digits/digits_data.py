"""The digits data, split once and for all: train (for training and calibration) and test (for the gate).

Pixels of scikit-learn's digits are integers 0..16; the model takes them scaled to [0, 1],
as float32 of shape (N, 1, 8, 8).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

PIXEL_MAX = 16.0
SPLIT_SEED = 0
TEST_FRACTION = 0.25


def load_split(split: Literal["train", "test"]) -> tuple[np.ndarray, np.ndarray]:
    digits = load_digits()
    images = (digits.images / PIXEL_MAX).astype(np.float32)[:, None, :, :]
    labels = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(images, labels, test_size=TEST_FRACTION, random_state=SPLIT_SEED, stratify=labels)
    return (x_train, y_train) if split == "train" else (x_test, y_test)
