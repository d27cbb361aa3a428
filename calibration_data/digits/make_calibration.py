"""Regenerate calibration.npz: 600 digits drawn from the training split, stratified by class.

Run from anywhere: ``python calibration_data/digits/make_calibration.py``. The draw is seeded
and the archive is written with fixed timestamps, so running it again gives the same bytes.
Only the training split is used: the test split is the eval set the engines are gated on,
and calibrating on it would leak it into the quantized model.
"""

from __future__ import annotations

import io
import os
import sys
import zipfile
from pathlib import Path

import numpy as np
from sklearn.model_selection import train_test_split

HERE = Path(__file__).resolve().parent
DIGITS_EXAMPLE = HERE.parents[1] / "examples" / "digits"
OUTPUT = HERE / "calibration.npz"
SAMPLES = 600
DRAW_SEED = 0
# ZIP's earliest representable time: keeps the archive's bytes independent of when it was written.
FIXED_ZIP_TIME = (1980, 1, 1, 0, 0, 0)


def build_calibration_set() -> dict[str, np.ndarray]:
    """Arrays 'input' (float32, N x 1 x 8 x 8, in [0, 1]) and 'labels' (int64)."""
    sys.path.insert(0, str(DIGITS_EXAMPLE))
    try:
        from digits_data import load_split
    finally:
        sys.path.remove(str(DIGITS_EXAMPLE))
    images, labels = load_split("train")
    drawn_images, _, drawn_labels, _ = train_test_split(images, labels, train_size=SAMPLES, stratify=labels, random_state=DRAW_SEED)
    return {"input": drawn_images.astype(np.float32), "labels": drawn_labels.astype(np.int64)}


def write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Like numpy.savez_compressed, but reproducible byte for byte, and written atomically."""
    partial = path.with_name(path.name + ".partial")
    with zipfile.ZipFile(partial, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, array in arrays.items():
            buffer = io.BytesIO()
            np.lib.format.write_array(buffer, np.ascontiguousarray(array), allow_pickle=False)
            entry = zipfile.ZipInfo(f"{name}.npy", date_time=FIXED_ZIP_TIME)
            entry.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(entry, buffer.getvalue())
    os.replace(partial, path)


if __name__ == "__main__":
    calibration = build_calibration_set()
    write_npz(OUTPUT, calibration)
    counts = np.bincount(calibration["labels"])
    print(f"wrote {OUTPUT}: {len(calibration['labels'])} samples, per class {counts.tolist()}")
