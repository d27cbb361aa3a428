"""Procedural scenes: colored rectangles, circles and triangles on textured backgrounds, with exact boxes and masks.

Every scene comes from a seed, so a split is the same on every machine. A shape's box is the
extent of its own pixels (tested at pixel centers) before later shapes are drawn over it, and
the label mask holds, per pixel, the class of the shape drawn last there (0 = background).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SIZE = 64
CLASSES = ("rectangle", "circle", "triangle")
MAX_SHAPES = 4
# Shapes overlap at most this much (IoU of boxes), so every object stays mostly visible.
MAX_OVERLAP = 0.2
# A shape's color differs from the background under it by at least this (mean absolute, 0..1 per channel).
MIN_CONTRAST = 0.25


@dataclass(frozen=True)
class Scene:
    image: np.ndarray  # float32 [3, SIZE, SIZE] in [0, 1]
    boxes: np.ndarray  # float64 [N, 4] x1, y1, x2, y2 pixels
    labels: np.ndarray  # int64 [N] index into CLASSES
    mask: np.ndarray  # uint8 [SIZE, SIZE]: 0 background, 1 + class index


def _background(rng: np.random.Generator) -> np.ndarray:
    y, x = np.mgrid[0:SIZE, 0:SIZE] / SIZE
    base = rng.uniform(0.15, 0.85, size=(3, 1, 1))
    tilt = rng.uniform(-0.25, 0.25, size=(3, 2))
    angle = rng.uniform(0, np.pi)
    frequency = rng.uniform(4, 14)
    stripes = np.sin(2 * np.pi * frequency * (x * np.cos(angle) + y * np.sin(angle)))
    texture = base + tilt[:, :1, None] * (x - 0.5) + tilt[:, 1:, None] * (y - 0.5)
    texture = texture + rng.uniform(0.03, 0.12) * stripes + rng.normal(0, 0.04, size=(3, SIZE, SIZE))
    return np.clip(texture, 0, 1)


def _shape_mask(rng: np.random.Generator, kind: int) -> np.ndarray:
    y, x = np.mgrid[0:SIZE, 0:SIZE] + 0.5
    if kind == 0:
        w, h = rng.uniform(10, 28, size=2)
        x0, y0 = rng.uniform(0, SIZE - w), rng.uniform(0, SIZE - h)
        return (x >= x0) & (x < x0 + w) & (y >= y0) & (y < y0 + h)
    if kind == 1:
        r = rng.uniform(6, 13)
        cx, cy = rng.uniform(r, SIZE - r, size=2)
        return (x - cx) ** 2 + (y - cy) ** 2 <= r * r
    s = rng.uniform(12, 28)
    x0, y0 = rng.uniform(0, SIZE - s, size=2)
    apex = x0 + s * rng.uniform(0.2, 0.8)
    # Upright or upside down: the flat side at the bottom or at the top.
    top, bottom = (y0, y0 + s) if rng.random() < 0.5 else (y0 + s, y0)
    t = (y - top) / (bottom - top)
    return (t >= 0) & (t <= 1) & (x >= apex + t * (x0 - apex)) & (x <= apex + t * (x0 + s - apex))


def _box(mask: np.ndarray) -> np.ndarray:
    rows, cols = np.nonzero(mask)
    return np.array([cols.min(), rows.min(), cols.max() + 1, rows.max() + 1], dtype=np.float64)


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def make_scene(seed: int) -> Scene:
    rng = np.random.default_rng(seed)
    image = _background(rng)
    mask = np.zeros((SIZE, SIZE), dtype=np.uint8)
    boxes, labels = [], []
    for _ in range(int(rng.integers(1, MAX_SHAPES + 1))):
        kind = int(rng.integers(len(CLASSES)))
        for _attempt in range(20):
            shape = _shape_mask(rng, kind)
            if shape.sum() < 30:
                continue
            box = _box(shape)
            if any(_iou(box, other) > MAX_OVERLAP for other in boxes):
                continue
            under = image[:, shape].mean(axis=1)
            color = rng.uniform(0, 1, size=3)
            if np.abs(color - under).mean() < MIN_CONTRAST:
                continue
            shade = 1 + rng.normal(0, 0.05, size=(3, int(shape.sum())))
            image[:, shape] = np.clip(color[:, None] * shade, 0, 1)
            mask[shape] = kind + 1
            boxes.append(box)
            labels.append(kind)
            break
    return Scene(
        image=image.astype(np.float32),
        boxes=np.array(boxes, dtype=np.float64).reshape(-1, 4),
        labels=np.array(labels, dtype=np.int64),
        mask=mask,
    )


def make_scenes(first_seed: int, count: int) -> list[Scene]:
    return [make_scene(first_seed + i) for i in range(count)]
