"""From a detector's raw outputs to detections: boxes (xyxy pixels), scores and class indices per image.

The same decoder runs on the PyTorch FP32 reference's outputs and on every engine's, so both
are judged by one rule. Built in:

- ``yolo``: the anchor-free head Ultralytics exports, one output ``[B, 4 + classes, anchors]``
  of (cx, cy, w, h) in pixels and per-class scores; each anchor keeps its best class, scores
  above ``conf`` go through class-wise NMS (``torchvision.ops.batched_nms``) at ``iou``, and the
  ``max_det`` best remain.
- ``boxes_scores_classes``: NMS is inside the model; padded outputs with ``num_dets`` (as
  TensorRT's EfficientNMS gives) or ragged ones (a row per detection).
- ``file.py:function``: called with one image's outputs (name -> array, as a one-image call
  returns them) and returning ``(boxes [K, 4] xyxy pixels, scores [K], classes [K])``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from trtforge.errors import SpecError, StageError
from trtforge.modelload import import_callable
from trtforge.outputs import PerImage
from trtforge.spec import BoxesScoresClasses, ModelSpec, YoloDecoder

# Ultralytics caps the boxes entering NMS the same way: beyond it NMS time explodes on junk.
MAX_NMS_CANDIDATES = 30000


@dataclass(frozen=True)
class Detections:
    boxes: np.ndarray
    scores: np.ndarray
    classes: np.ndarray

    def __len__(self) -> int:
        return len(self.scores)

    def above(self, score: float) -> Detections:
        keep = self.scores >= score
        return Detections(self.boxes[keep], self.scores[keep], self.classes[keep])


Decode = Callable[[dict[str, np.ndarray]], Detections]


def decode_all(spec: ModelSpec, records: PerImage, num_classes: int, stage: str) -> list[Detections]:
    decode = _decoder(spec, stage)
    detections = []
    for index, record in enumerate(records):
        found = decode(record)
        bad = sorted({int(c) for c in found.classes if not 0 <= c < num_classes})
        if bad:
            raise StageError(
                stage,
                f"image {index}: the decoder gave class indices {bad[:10]}, outside the {num_classes} classes of the ground truth "
                "(eval.classes or the COCO categories): the model's class indices must start at 0 in that order",
            )
        detections.append(found)
    return detections


def _decoder(spec: ModelSpec, stage: str) -> Decode:
    config = spec.eval.postprocess
    names = [o.name for o in spec.outputs]
    if isinstance(config, YoloDecoder):
        output = config.output or names[0]
        _known(output, names, "postprocess.output")
        return lambda record: decode_yolo(record[output], config.conf, config.iou, config.max_det, stage)
    if isinstance(config, BoxesScoresClasses):
        for field in ("boxes", "scores", "classes", "num_dets"):
            if getattr(config, field) is not None:
                _known(getattr(config, field), names, f"postprocess.{field}")
        return lambda record: _decode_nms_outputs(record, config, stage)
    function = import_callable(config, spec.source, "eval.postprocess")
    return lambda record: _call_user(function, config, record, stage)


def _known(name: str, outputs: list[str], field: str) -> None:
    if name not in outputs:
        raise SpecError(f"eval.{field}: {name!r} is not one of the spec's outputs {outputs}")


def decode_yolo(head: np.ndarray, conf: float, iou: float, max_det: int, stage: str) -> Detections:
    import torch
    from torchvision.ops import batched_nms, box_convert

    if head.ndim != 3 or head.shape[0] != 1 or head.shape[1] < 5:
        raise StageError(stage, f"the yolo decoder takes an output [batch, 4 + classes, anchors]; got shape {list(head.shape)}")
    prediction = torch.from_numpy(np.ascontiguousarray(head[0].T, dtype=np.float32))
    scores, classes = prediction[:, 4:].max(dim=1)
    keep = scores > conf
    boxes, scores, classes = prediction[keep, :4], scores[keep], classes[keep]
    if len(scores) > MAX_NMS_CANDIDATES:
        top = scores.topk(MAX_NMS_CANDIDATES).indices
        boxes, scores, classes = boxes[top], scores[top], classes[top]
    boxes = box_convert(boxes, "cxcywh", "xyxy")
    kept = batched_nms(boxes, scores, classes, iou)[:max_det]
    return Detections(boxes[kept].numpy(), scores[kept].numpy(), classes[kept].numpy().astype(np.int64))


def _decode_nms_outputs(record: dict[str, np.ndarray], config: BoxesScoresClasses, stage: str) -> Detections:
    boxes = np.asarray(record[config.boxes], dtype=np.float32)
    scores = np.asarray(record[config.scores], dtype=np.float32).reshape(-1)
    classes = np.asarray(record[config.classes]).reshape(-1)
    if boxes.shape[-1] != 4:
        raise StageError(stage, f"output {config.boxes!r} has shape {list(boxes.shape)}; boxes are [..., 4] (x1, y1, x2, y2 pixels)")
    boxes = boxes.reshape(-1, 4)
    if not len(boxes) == len(scores) == len(classes):
        raise StageError(
            stage,
            f"one image gave {len(boxes)} boxes, {len(scores)} scores and {len(classes)} classes "
            f"(outputs {config.boxes!r}, {config.scores!r}, {config.classes!r}): they must have one row per detection",
        )
    if config.num_dets is not None:
        count = int(np.asarray(record[config.num_dets]).reshape(-1)[0])
        if not 0 <= count <= len(boxes):
            raise StageError(stage, f"output {config.num_dets!r} says {count} detections, but the outputs have {len(boxes)} rows")
        boxes, scores, classes = boxes[:count], scores[:count], classes[:count]
    return Detections(boxes, scores, np.rint(classes).astype(np.int64))


def _call_user(function: Callable, reference: str, record: dict[str, np.ndarray], stage: str) -> Detections:
    try:
        result = function({name: array.copy() for name, array in record.items()})
        boxes, scores, classes = (np.asarray(part) for part in result)
    except Exception as err:
        raise StageError(stage, f"postprocess {reference!r} failed: {type(err).__name__}: {err}") from None
    if boxes.ndim != 2 or boxes.shape[1] != 4 or scores.shape != (len(boxes),) or classes.shape != (len(boxes),):
        raise StageError(
            stage,
            f"postprocess {reference!r} returned shapes {list(boxes.shape)}, {list(scores.shape)}, {list(classes.shape)}; "
            "expected (boxes [K, 4] xyxy pixels, scores [K], classes [K])",
        )
    return Detections(boxes.astype(np.float32), scores.astype(np.float32), np.rint(classes).astype(np.int64))
