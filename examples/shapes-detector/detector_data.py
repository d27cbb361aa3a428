"""The shapes detector's data, made from fixed seeds: train, eval (held out) and calibration splits.

``python detector_data.py`` (or the spec's ``train`` entry point) writes, under ``data/``:
``eval.npz`` (``images`` [N, 3, 64, 64] in [0, 1] and ``image_ids``), ``instances.json`` (the
eval split's boxes as COCO annotations), ``calibration.npz`` (``images`` and ``image_ids``, drawn
apart from both other splits) and ``calibration.json`` (its boxes, from which the calibration
check counts objects per class). The files are git-ignored: this script makes the same bytes
everywhere.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from shapes_scenes import CLASSES, SIZE, Scene, make_scenes

DATA = Path(__file__).resolve().parent / "data"
# Disjoint seed ranges: no scene is in two splits.
SPLITS = {"train": (0, 3000), "eval": (1_000_000, 300), "calibration": (2_000_000, 512)}


def load_split(split: str) -> list[Scene]:
    first, count = SPLITS[split]
    return make_scenes(first, count)


def coco_annotations(scenes: list[Scene], split: str = "eval") -> dict:
    annotations = []
    for image_id, scene in enumerate(scenes, start=1):
        for box, label in zip(scene.boxes, scene.labels):
            x1, y1, x2, y2 = box.tolist()
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": int(label) + 1,
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "area": (x2 - x1) * (y2 - y1),
                    "iscrowd": 0,
                }
            )
    return {
        "images": [{"id": i, "file_name": f"{split}_{i:04d}.png", "width": SIZE, "height": SIZE} for i in range(1, len(scenes) + 1)],
        "annotations": annotations,
        "categories": [{"id": i + 1, "name": name} for i, name in enumerate(CLASSES)],
    }


def write_data(folder: Path = DATA) -> Path:
    """Write the eval and calibration sets with their COCO annotations (each file skipped when present)."""
    folder.mkdir(parents=True, exist_ok=True)
    for split, images, boxes in (("eval", "eval.npz", "instances.json"), ("calibration", "calibration.npz", "calibration.json")):
        if (folder / images).is_file() and (folder / boxes).is_file():
            continue
        scenes = load_split(split)
        # Each file whole or absent: two processes may make the data at once (the tests run in parallel).
        _write_atomically(
            folder / images, lambda f: np.savez(f, images=np.stack([s.image for s in scenes]), image_ids=np.arange(1, len(scenes) + 1))
        )
        _write_atomically(folder / boxes, lambda f: f.write(json.dumps(coco_annotations(scenes, split)).encode()))
    return folder


def _write_atomically(path: Path, write) -> None:
    partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
    with partial.open("wb") as handle:
        write(handle)
    partial.replace(path)


if __name__ == "__main__":
    print(f"wrote {write_data()}")
