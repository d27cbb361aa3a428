"""Detection metrics: COCO box mAP through faster-coco-eval, and agreement with the FP32 reference's detections.

faster-coco-eval is the C++ port of pycocotools' COCOeval: the same matching and 101-point
interpolation, the same numbers (``tests/test_detection.py`` checks both on one case), several
times faster on the eval sets a gate sees (README, Gates). Per-class AP is the mean of the
evaluator's own precision table over IoU thresholds and recall points for that class (area
"all", 100 detections), as COCO's per-category reports compute it.
"""

from __future__ import annotations

import contextlib
import functools
import io
from typing import Any

import numpy as np

from trtforge.groundtruth import DetectionTruth
from trtforge.postprocess import Detections

# Boxes at or above this IoU (same class) count as the same detection in the agreement metrics: COCO's loosest match.
MATCH_IOU = 0.5
COCO_MAX_DETECTIONS = 100


def _ground_truth(
    boxes: list[np.ndarray], labels: list[np.ndarray], crowd: list[np.ndarray], classes: list[str], size: tuple[int, int]
) -> dict:
    height, width = size
    annotations = []
    for index, (image_boxes, image_labels, image_crowd) in enumerate(zip(boxes, labels, crowd)):
        for box, label, is_crowd in zip(image_boxes, image_labels, image_crowd):
            x1, y1, x2, y2 = (float(v) for v in box)
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": index + 1,
                    "category_id": int(label) + 1,
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "area": (x2 - x1) * (y2 - y1),
                    "iscrowd": int(is_crowd),
                }
            )
    return {
        "images": [{"id": i + 1, "width": width, "height": height} for i in range(len(boxes))],
        "annotations": annotations,
        "categories": [{"id": i + 1, "name": name} for i, name in enumerate(classes)],
    }


def _results(detections: list[Detections]) -> np.ndarray:
    rows = []
    for index, found in enumerate(detections):
        if not len(found):
            continue
        boxes = found.boxes.astype(np.float64)
        xywh = np.column_stack([boxes[:, 0], boxes[:, 1], boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]])
        rows.append(np.column_stack([np.full(len(found), index + 1), xywh, found.scores, found.classes + 1]))
    return np.concatenate(rows) if rows else np.zeros((0, 7))


def _discard(*_: Any, **__: Any) -> None:
    return None


def _evaluated(coco_class, evaluator_class, gt: dict, results: np.ndarray):
    coco_gt = coco_class()
    coco_gt.dataset = gt
    coco_gt.createIndex()
    if len(results):
        coco_dt = coco_gt.loadRes(results)
    else:
        coco_dt = coco_class()
        coco_dt.dataset = {"images": gt["images"], "categories": gt["categories"], "annotations": []}
        coco_dt.createIndex()
    run = evaluator_class(coco_gt, coco_dt, "bbox")
    run.evaluate()
    run.accumulate()
    run.summarize()
    return run


def coco_evaluate(gt: dict, detections: list[Detections], evaluator: str = "faster-coco-eval") -> dict[str, Any]:
    """COCO bbox evaluation; ``evaluator`` 'pycocotools' runs the original for comparison."""
    results = _results(detections)
    if evaluator == "faster-coco-eval":
        from faster_coco_eval import COCO, COCOeval_faster

        # Its summary table goes to print_function, not stdout: no redirect, which would swap sys.stdout for every
        # thread of the process while the gates of several targets run at once (and swallow the CLI's --json).
        run = _evaluated(COCO, functools.partial(COCOeval_faster, print_function=_discard), gt, results)
    else:
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval

        # pycocotools prints its progress and summary; it runs only in evaluator comparisons, one at a time.
        with contextlib.redirect_stdout(io.StringIO()):
            run = _evaluated(COCO, COCOeval, gt, results)
    precision = np.asarray(run.eval["precision"])
    area_all = list(run.params.areaRngLbl).index("all")
    last = list(run.params.maxDets).index(COCO_MAX_DETECTIONS)
    per_class = {}
    present = {a["category_id"] for a in gt["annotations"] if not a["iscrowd"]}
    for k, category in enumerate(run.params.catIds):
        if category not in present:
            continue
        table = precision[:, :, k, area_all, last]
        valid = table[table > -1]
        per_class[gt["categories"][k]["name"]] = float(valid.mean()) if valid.size else 0.0
    stats = [float(max(v, 0.0)) for v in run.stats]
    return {"map": stats[0], "ap50": stats[1], "ap75": stats[2], "ar100": stats[8], "per_class": per_class}


def truth_dict(truth: DetectionTruth) -> dict:
    return _ground_truth(truth.boxes, truth.labels, truth.crowd, truth.classes, (truth.height, truth.width))


def detection_metrics(truth: DetectionTruth, detections: list[Detections], prefix: str = "") -> dict[str, float]:
    """mAP@[.5:.95], AP50, AP75, AR@100 and AP per class (``ap.<class>``), names prefixed by ``prefix``."""
    scores = coco_evaluate(truth_dict(truth), detections)
    metrics = {f"{prefix}{name}": scores[name] for name in ("map", "ap50", "ap75", "ar100")}
    metrics.update({f"{prefix}ap.{name}": value for name, value in scores["per_class"].items()})
    return metrics


def resampled_map(truth: DetectionTruth, detections: list[Detections], images: np.ndarray) -> float:
    """COCO mAP@[.5:.95] on the images at ``images`` (indices, repeats allowed: each repeat is its own image), for the bootstrap."""
    gt = _ground_truth(
        [truth.boxes[i] for i in images],
        [truth.labels[i] for i in images],
        [truth.crowd[i] for i in images],
        truth.classes,
        (truth.height, truth.width),
    )
    return coco_evaluate(gt, [detections[i] for i in images])["map"]


def agreement_metrics(truth: DetectionTruth, engine: list[Detections], reference: list[Detections], min_score: float) -> dict[str, float]:
    """How closely the engine reproduces the reference's confident detections (score >= ``min_score``).

    ``agreement_map``: COCO mAP of all the engine's detections with the reference's confident
    ones as ground truth. ``matched_iou_mean`` / ``score_error_mean``: over pairs of confident
    detections of one class matched one-to-one for the largest IoU (Hungarian assignment),
    IoU >= 0.5; ``match_rate``: the share of the reference's confident detections matched.
    """
    import torch
    from scipy.optimize import linear_sum_assignment
    from torchvision.ops import box_iou

    confident = [r.above(min_score) for r in reference]
    metrics: dict[str, float] = {"reference_confident_detections": float(sum(len(r) for r in confident))}
    if not metrics["reference_confident_detections"]:
        return metrics
    pseudo = _ground_truth(
        [r.boxes for r in confident],
        [r.classes for r in confident],
        [np.zeros(len(r), bool) for r in confident],
        truth.classes,
        (truth.height, truth.width),
    )
    metrics["agreement_map"] = coco_evaluate(pseudo, engine)["map"]
    ious, errors = [], []
    for mine, theirs in zip((e.above(min_score) for e in engine), confident):
        for cls in np.intersect1d(mine.classes, theirs.classes):
            a, b = mine.classes == cls, theirs.classes == cls
            overlap = box_iou(torch.from_numpy(mine.boxes[a]).double(), torch.from_numpy(theirs.boxes[b]).double()).numpy()
            rows, cols = linear_sum_assignment(overlap, maximize=True)
            good = overlap[rows, cols] >= MATCH_IOU
            ious += overlap[rows, cols][good].tolist()
            errors += np.abs(mine.scores[a][rows[good]] - theirs.scores[b][cols[good]]).tolist()
    metrics["match_rate"] = len(ious) / metrics["reference_confident_detections"]
    if ious:
        metrics["matched_iou_mean"] = float(np.mean(ious))
        metrics["score_error_mean"] = float(np.mean(errors))
    return metrics
