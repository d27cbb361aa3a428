"""The shapes segmenter's data: the shapes detector's scenes (same generator, other seeds), with per-pixel labels.

``python segmenter_data.py`` (or the spec's ``train`` entry point) writes, under ``data/``:
``eval.npz`` (``images`` [N, 3, 64, 64] in [0, 1] and ``image_ids``, the mask file names),
``masks/<image id>.png`` (label masks: 0 background, 1 rectangle, 2 circle, 3 triangle) and
``calibration.npz`` (``images``). The files are git-ignored: this script makes the same bytes everywhere.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

# One scene generator for both shapes examples: it lives with the detector.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "shapes-detector"))

from shapes_scenes import CLASSES, Scene, make_scenes  # noqa: E402

DATA = Path(__file__).resolve().parent / "data"
LABELS = ("background", *CLASSES)
# Seed ranges apart from each other and from the detector's splits.
SPLITS = {"train": (3_000_000, 3000), "eval": (4_000_000, 200), "calibration": (5_000_000, 512)}


def load_split(split: str) -> list[Scene]:
    first, count = SPLITS[split]
    return make_scenes(first, count)


def write_data(folder: Path = DATA) -> Path:
    """Write the eval set, its PNG label masks and the calibration set (skipped when present)."""
    from PIL import Image

    masks = folder / "masks"
    if (folder / "eval.npz").is_file():
        return folder
    masks.mkdir(parents=True, exist_ok=True)
    scenes = load_split("eval")
    ids = np.array([f"scene_{i:04d}" for i in range(len(scenes))])
    for image_id, scene in zip(ids, scenes):
        Image.fromarray(scene.mask, mode="L").save(masks / f"{image_id}.png")
    np.savez(folder / "calibration.npz", images=np.stack([s.image for s in load_split("calibration")]))
    partial = folder / "eval.partial.npz"
    np.savez(partial, images=np.stack([s.image for s in scenes]), image_ids=ids)
    partial.replace(folder / "eval.npz")
    return folder


if __name__ == "__main__":
    print(f"wrote {write_data()}")
