"""Semantic segmentation metrics through torchmetrics: mIoU and per-class IoU, and pixel agreement with the reference.

A model output ``[N, C, H, W]`` (class scores per pixel) is turned into a label map by argmax
over C; an output ``[N, H, W]`` already is one. Pixels whose ground truth is ``ignore_index``
count nowhere. mIoU is torchmetrics' macro average over the classes.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from trtforge.errors import StageError
from trtforge.groundtruth import SegmentationTruth


def label_maps(output: np.ndarray, truth: SegmentationTruth, stage: str) -> np.ndarray:
    expected = truth.masks.shape
    if output.ndim == 4 and (output.shape[0], *output.shape[2:]) == expected:
        if output.shape[1] != len(truth.classes):
            raise StageError(stage, f"the output has {output.shape[1]} channels for the {len(truth.classes)} classes of eval.classes")
        return output.argmax(axis=1)
    if output.ndim == 3 and output.shape == expected:
        return np.rint(output).astype(np.int64)
    raise StageError(
        stage,
        f"a segmentation output is [N, classes, H, W] scores or [N, H, W] labels at the masks' size {list(expected)}; got {list(output.shape)}",
    )


def _jaccard(num_classes: int, ignore_index: int | None, average: str | None):
    from torchmetrics.classification import MulticlassJaccardIndex

    return MulticlassJaccardIndex(num_classes=num_classes, ignore_index=ignore_index, average=average)


def segmentation_metrics(predicted: np.ndarray, truth: SegmentationTruth, prefix: str = "") -> dict[str, float]:
    import torch

    preds, target = torch.from_numpy(predicted.astype(np.int64)), torch.from_numpy(truth.masks)
    count = len(truth.classes)
    per_class = _jaccard(count, truth.ignore_index, None)(preds, target).tolist()
    metrics = {f"{prefix}miou": float(_jaccard(count, truth.ignore_index, "macro")(preds, target))}
    metrics.update({f"{prefix}iou.{name}": float(value) for name, value in zip(truth.classes, per_class)})
    return metrics


def pixel_agreement(predicted: np.ndarray, reference: np.ndarray, truth: SegmentationTruth) -> float:
    """Share of the pixels the ground truth counts whose class is the reference's."""
    import torch
    from torchmetrics.classification import MulticlassAccuracy

    reference = np.where(truth.masks == truth.ignore_index, truth.ignore_index, reference) if truth.ignore_index is not None else reference
    accuracy = MulticlassAccuracy(num_classes=len(truth.classes), average="micro", ignore_index=truth.ignore_index)
    return float(accuracy(torch.from_numpy(predicted.astype(np.int64)), torch.from_numpy(reference.astype(np.int64))))


def resampling_statistic(predicted: np.ndarray, reference: np.ndarray, truth: SegmentationTruth) -> Callable[[np.ndarray], list[float]]:
    """For the bootstrap: a function of image indices (repeats allowed) giving mIoU and pixel agreement on those images.

    Both metrics are functions of the confusion matrix summed over the images, so each image's
    matrix (torchmetrics' ``multiclass_confusion_matrix``, ``ignore_index`` pixels left out) is
    computed once and a resample only sums its images' matrices: recomputing over the pixels
    cost 10-450 ms a resample on 100 64x64 images (torch threads contend on a shared 2-core
    machine), summing costs well under 1 ms. mIoU is torchmetrics' own reduction of that matrix
    (``_jaccard_index_reduce``, what ``MulticlassJaccardIndex`` computes; private, so the pinned
    torchmetrics and ``tests/test_gate_resolution.py``, which checks the whole-set value, guard it);
    pixel agreement is its trace over its total, what ``MulticlassAccuracy(average="micro")`` gives.
    The arrays were checked by the full-set metrics, so torchmetrics' argument checks are off.
    """
    import torch
    from torchmetrics.functional.classification import multiclass_confusion_matrix
    from torchmetrics.functional.classification.jaccard import _jaccard_index_reduce

    count, ignore = len(truth.classes), truth.ignore_index
    preds, masks = torch.from_numpy(predicted.astype(np.int64)), torch.from_numpy(truth.masks.astype(np.int64))
    if ignore is not None:
        reference = np.where(truth.masks == ignore, ignore, reference)
    expected = torch.from_numpy(reference.astype(np.int64))

    def per_image(target: torch.Tensor) -> torch.Tensor:
        return torch.stack(
            [multiclass_confusion_matrix(p, t, count, ignore_index=ignore, validate_args=False) for p, t in zip(preds, target)]
        )

    against_truth, against_reference = per_image(masks), per_image(expected)

    def statistic(images: np.ndarray) -> list[float]:
        index = torch.from_numpy(images)
        miou = _jaccard_index_reduce(against_truth[index].sum(dim=0), average="macro", ignore_index=ignore)
        agreement = against_reference[index].sum(dim=0)
        return [float(miou), float(agreement.trace() / agreement.sum().clamp(min=1))]

    return statistic
