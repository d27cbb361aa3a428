"""Measure faster-coco-eval against pycocotools on the same detections: the numbers and the time each takes.

    python compare_evaluators.py CHECKPOINT [--repeat 5]

Runs the trained detector on the eval split, decodes with the gate's yolo decoder
(conf 0.001, up to 300 boxes per image, as the spec does) and evaluates the same detections
with both evaluators. The README's choice of evaluator quotes this script's output.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from detector_data import DATA, write_data
from detector_model import build_model
from safetensors.torch import load_file

from trtforge.detection import coco_evaluate
from trtforge.postprocess import decode_yolo


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    write_data()
    model = build_model()
    model.load_state_dict(load_file(str(args.checkpoint)))
    model.eval()
    with np.load(DATA / "eval.npz") as archive:
        images = torch.from_numpy(archive["images"])
    with torch.no_grad():
        heads = model(images).numpy()
    detections = [decode_yolo(heads[i : i + 1], 0.001, 0.7, 300, "compare") for i in range(len(heads))]
    gt = json.loads((DATA / "instances.json").read_text())
    print(f"{len(detections)} images, {len(gt['annotations'])} boxes, {sum(len(d) for d in detections)} detections")
    for evaluator in ("faster-coco-eval", "pycocotools"):
        times = []
        for _ in range(args.repeat):
            started = time.perf_counter()
            scores = coco_evaluate(json.loads(json.dumps(gt)), detections, evaluator)
            times.append(time.perf_counter() - started)
        shown = ", ".join(f"{k} {v:.6f}" for k, v in scores.items() if k != "per_class")
        per_class = ", ".join(f"{k} {v:.6f}" for k, v in scores["per_class"].items())
        print(f"{evaluator}: median {1000 * np.median(times):.1f} ms over {args.repeat} runs; {shown}; per class: {per_class}")


if __name__ == "__main__":
    main()
