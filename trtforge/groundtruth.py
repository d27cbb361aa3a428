"""Ground truth for the detection and segmentation gates, read and checked against the eval set.

Boxes and masks are in the pixels of the model's input: the eval set holds preprocessed
samples, so annotations must describe those, not the original photographs.

Detection ground truth comes as COCO JSON (``images`` matched to eval samples through the eval
set's ``sample_ids`` array, by image id or file name), as a folder of YOLO ``.txt`` labels
(``<sample id>.txt``: ``class cx cy w h`` normalised to the image), or as an ``.npz`` with
``boxes_<i>`` (``[N, 4]`` xyxy pixels) and ``labels_<i>`` (``[N]`` class indices) per sample in
eval order. Segmentation ground truth is a folder of PNG label masks (``<sample id>.png``) or an
``.npz`` whose ``masks`` array is ``[samples, H, W]``. Every problem is one ``SpecError`` naming
the file, the entry and what to change.

A detection model's calibration set may carry boxes too (``calibration.annotations``, the same
three forms, matched through ``calibration.sample_ids``): the detection readers take ``of``, the
spec section whose set the annotations describe, and name that section in their messages.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from trtforge.errors import SpecError
from trtforge.safeio import ArchiveLimits, load_arrays
from trtforge.spec import ModelSpec, Task

# Annotation tools round box edges to whole pixels, so an edge may sit up to a pixel past the border.
BOX_SLACK_PX = 1.0
MASK_ARRAY = "masks"
SHOWN_VALUES = 10

Section = Literal["eval", "calibration"]


@dataclass(frozen=True)
class DetectionTruth:
    """Per eval sample: boxes ``[N, 4]`` xyxy pixels, class indices ``[N]`` and COCO's crowd flags."""

    classes: list[str]
    boxes: list[np.ndarray]
    labels: list[np.ndarray]
    crowd: list[np.ndarray]
    height: int
    width: int
    source: Path

    @property
    def instances(self) -> int:
        return int(sum(len(b) for b in self.boxes))


@dataclass(frozen=True)
class SegmentationTruth:
    classes: list[str]
    masks: np.ndarray
    ignore_index: int | None
    source: Path


Truth = DetectionTruth | SegmentationTruth


def image_size(spec: ModelSpec) -> tuple[int, int]:
    """(height, width) of the first input, an image batch in NCHW (or NHWC where the calibration preprocessing says so)."""
    first = spec.inputs[0]
    shape = first.shape_at("opt")
    if len(shape) != 4:
        raise SpecError(
            f"eval.task {spec.eval.task.value}: input {first.name!r} has shape {first.shape}; detection and segmentation "
            "gates need an image batch [N, C, H, W] (or [N, H, W, C]) as the first input"
        )
    preprocessing = spec.calibration.preprocessing if spec.calibration is not None else None
    if preprocessing is not None and preprocessing.layout == "NHWC":
        return shape[1], shape[2]
    return shape[2], shape[3]


def load_truth(spec: ModelSpec, sample_ids: np.ndarray | None, samples: int, limits: ArchiveLimits) -> Truth | None:
    if spec.eval.task is Task.DETECTION:
        return load_detection_truth(spec, sample_ids, samples, limits)
    if spec.eval.task is Task.SEGMENTATION:
        return load_segmentation_truth(spec, sample_ids, samples, limits)
    return None


def _fail(path: Path, entry: str, fix: str, of: Section = "eval") -> SpecError:
    return SpecError(f"{of}.annotations: {path}: {entry}: {fix}")


def _section(spec: ModelSpec, of: Section):
    """The spec section holding the annotated set's data, annotations and sample_ids."""
    return spec.eval if of == "eval" else spec.calibration


def _need_ids(spec: ModelSpec, sample_ids: np.ndarray | None, path: Path, kind: str, of: Section = "eval") -> list[str] | list[int]:
    section = _section(spec, of)
    if sample_ids is None:
        raise _fail(
            path,
            f"{kind} are matched to {of} samples by name",
            f"add an array {section.sample_ids!r} to {of}.data ({section.data}) with one id per sample, "
            f"or name the array that has them in {of}.sample_ids",
            of,
        )
    values = sample_ids.tolist()
    duplicates = sorted((v for v, n in Counter(values).items() if n > 1), key=str)
    if duplicates:
        raise SpecError(
            f"{of}.data: {section.data}: array {section.sample_ids!r} names images {duplicates[:SHOWN_VALUES]} more than once: "
            f"each {of} sample must be a different image"
        )
    return values


def _check_box(path: Path, entry: str, box: np.ndarray, height: int, width: int, of: Section = "eval") -> None:
    x1, y1, x2, y2 = (float(v) for v in box)
    if not np.all(np.isfinite(box)) or x2 <= x1 or y2 <= y1:
        raise _fail(path, entry, f"box (x1, y1, x2, y2) = {[x1, y1, x2, y2]} is empty or not finite; boxes need x2 > x1 and y2 > y1", of)
    if x1 < -BOX_SLACK_PX or y1 < -BOX_SLACK_PX or x2 > width + BOX_SLACK_PX or y2 > height + BOX_SLACK_PX:
        raise _fail(
            path,
            entry,
            f"box (x1, y1, x2, y2) = {[round(v, 2) for v in (x1, y1, x2, y2)]} lies outside the {width}x{height} model input: "
            f"boxes are in the pixels of the {of} set's (preprocessed) inputs",
            of,
        )


# ---------------------------------------------------------------- detection


def load_detection_truth(
    spec: ModelSpec, sample_ids: np.ndarray | None, samples: int, limits: ArchiveLimits, of: Section = "eval"
) -> DetectionTruth:
    """The boxes of the eval set (``eval.annotations``), or of the calibration set with ``of="calibration"``."""
    section = _section(spec, of)
    path = section.annotations
    if not path.exists():
        raise SpecError(f"{of}.annotations: {path} does not exist")
    height, width = image_size(spec)
    fmt = section.annotation_format
    if fmt == "coco":
        classes, boxes, labels, crowd = _read_coco(spec, path, sample_ids, height, width, of)
    elif fmt == "yolo":
        classes = list(spec.eval.classes)
        boxes, labels = _read_yolo(spec, path, sample_ids, height, width, of)
        crowd = [np.zeros(len(b), dtype=bool) for b in boxes]
    else:
        classes = list(spec.eval.classes)
        boxes, labels = _read_box_npz(path, samples, len(classes), height, width, limits, of)
        crowd = [np.zeros(len(b), dtype=bool) for b in boxes]
    if len(boxes) != samples:
        raise _fail(path, f"{len(boxes)} images", f"the {of} set has {samples} samples: give ground truth for each, in {of} order", of)
    return DetectionTruth(classes=classes, boxes=boxes, labels=labels, crowd=crowd, height=height, width=width, source=path)


def _read_json(path: Path, of: Section = "eval") -> Any:
    if not path.is_file():
        raise _fail(path, "not a file", "COCO annotations are one .json file", of)
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise _fail(path, "not valid JSON", f"{err}; write it with json.dump", of) from None


def _records(path: Path, data: Any, key: str, fields: tuple[str, ...], of: Section = "eval") -> list[dict[str, Any]]:
    records = data.get(key) if isinstance(data, dict) else None
    if not isinstance(records, list):
        raise _fail(path, f"no list {key!r}", "a COCO file has top-level lists 'images', 'annotations' and 'categories'", of)
    for index, record in enumerate(records):
        missing = [f for f in fields if not isinstance(record, dict) or f not in record]
        if missing:
            raise _fail(path, f"{key}[{index}]", f"has no {missing}; COCO {key} entries need {list(fields)}", of)
    return records


def coco_class_names(path: Path, of: Section = "eval") -> list[str]:
    """The class names of the model's class indices when eval.classes is unset: the COCO categories by id, as _read_coco orders them."""
    categories = _records(path, _read_json(path, of), "categories", ("id", "name"), of)
    by_category = {c["id"]: c["name"] for c in categories}
    return [str(by_category[c]) for c in sorted(by_category)]


def _read_coco(
    spec: ModelSpec, path: Path, sample_ids: np.ndarray | None, height: int, width: int, of: Section = "eval"
) -> tuple[list[str], list[np.ndarray], list[np.ndarray], list[np.ndarray]]:
    data = _read_json(path, of)
    images = _records(path, data, "images", ("id", "width", "height"), of)
    annotations = _records(path, data, "annotations", ("id", "image_id", "category_id", "bbox"), of)
    categories = _records(path, data, "categories", ("id", "name"), of)
    ids = _need_ids(spec, sample_ids, path, "COCO images", of)

    by_category = {c["id"]: c["name"] for c in categories}
    if spec.eval.classes is None:
        ordered = sorted(by_category)
        classes = [str(by_category[c]) for c in ordered]
    else:
        classes = list(spec.eval.classes)
        names = {name: cid for cid, name in by_category.items()}
        unknown = [c for c in classes if c not in names]
        if unknown:
            raise _fail(path, f"eval.classes {unknown}", f"are not category names in 'categories' ({sorted(names)}): fix eval.classes", of)
        extra = sorted(set(names) - set(classes))
        if extra:
            raise _fail(path, f"categories {extra}", "are not in eval.classes: the model cannot predict them; add them to eval.classes", of)
        ordered = [names[c] for c in classes]
    class_of = {cid: index for index, cid in enumerate(ordered)}

    by_key: dict[Any, dict[str, Any]] = {}
    for image in images:
        by_key[image["id"]] = image
        if "file_name" in image:
            by_key[str(image["file_name"])] = image
            by_key[Path(str(image["file_name"])).stem] = image
    sample_of: dict[Any, int] = {}
    for index, key in enumerate(ids):
        image = by_key.get(key)
        if image is None:
            raise _fail(
                path,
                f"{of} sample {index}",
                f"names image {key!r} (array {_section(spec, of).sample_ids!r} of {of}.data), which is not an id or file_name "
                "in 'images': add the image or fix the id",
                of,
            )
        if (image["width"], image["height"]) != (width, height):
            raise _fail(
                path,
                f"image id {image['id']}",
                f"is {image['width']}x{image['height']} but the model input is {width}x{height}: "
                f"annotate the {of} set's preprocessed inputs (boxes in their pixels)",
                of,
            )
        sample_of[image["id"]] = index

    boxes: list[list[list[float]]] = [[] for _ in ids]
    labels: list[list[int]] = [[] for _ in ids]
    crowd: list[list[bool]] = [[] for _ in ids]
    for annotation in annotations:
        index = sample_of.get(annotation["image_id"])
        if index is None:
            continue
        entry = f"annotation id {annotation['id']} (image id {annotation['image_id']})"
        if annotation["category_id"] not in class_of:
            raise _fail(
                path, entry, f"has category_id {annotation['category_id']!r}, not one of the ids in 'categories' {sorted(by_category)}", of
            )
        bbox = annotation["bbox"]
        if not isinstance(bbox, list) or len(bbox) != 4 or not all(isinstance(v, (int, float)) for v in bbox):
            raise _fail(path, entry, f"bbox {bbox!r} is not [x, y, width, height]", of)
        x, y, w, h = (float(v) for v in bbox)
        box = np.array([x, y, x + w, y + h])
        _check_box(path, entry, box, height, width, of)
        boxes[index].append(box.tolist())
        labels[index].append(class_of[annotation["category_id"]])
        crowd[index].append(bool(annotation.get("iscrowd", 0)))
    return (
        classes,
        [np.array(b, dtype=np.float64).reshape(-1, 4) for b in boxes],
        [np.array(c, dtype=np.int64) for c in labels],
        [np.array(c, dtype=bool) for c in crowd],
    )


def _read_yolo(
    spec: ModelSpec, folder: Path, sample_ids: np.ndarray | None, height: int, width: int, of: Section = "eval"
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    if not folder.is_dir():
        raise _fail(folder, "not a folder", "YOLO labels are a folder of <sample id>.txt files; COCO is a .json, boxes an .npz", of)
    count = len(spec.eval.classes)
    boxes, labels = [], []
    for index, key in enumerate(_need_ids(spec, sample_ids, folder, "YOLO label files", of)):
        path = folder / f"{key}.txt"
        if not path.is_file():
            raise _fail(path, f"{of} sample {index} ({key!r})", "has no label file; write an empty one for an image without objects", of)
        rows, classes = [], []
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            entry = f"line {number}"
            parts = line.split()
            try:
                values = [float(v) for v in parts]
            except ValueError:
                values = []
            if len(values) != 5 or values[0] != int(values[0]):
                raise _fail(path, entry, f"{line.strip()!r} is not 'class cx cy w h' (a class index and four numbers)", of)
            cls = int(values[0])
            if not 0 <= cls < count:
                raise _fail(path, entry, f"class {cls} is not an index into eval.classes (0..{count - 1}: {spec.eval.classes})", of)
            cx, cy, w, h = values[1] * width, values[2] * height, values[3] * width, values[4] * height
            box = np.array([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2])
            _check_box(path, entry, box, height, width, of)
            rows.append(box)
            classes.append(cls)
        boxes.append(np.array(rows, dtype=np.float64).reshape(-1, 4))
        labels.append(np.array(classes, dtype=np.int64))
    return boxes, labels


def _read_box_npz(
    path: Path, samples: int, count: int, height: int, width: int, limits: ArchiveLimits, of: Section = "eval"
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    arrays = load_arrays(path, what=f"{of} annotations", limits=limits)
    boxes, labels = [], []
    for index in range(samples):
        box_key, label_key = f"boxes_{index}", f"labels_{index}"
        if box_key not in arrays or label_key not in arrays:
            raise _fail(
                path, f"{of} sample {index}", f"has no arrays {box_key!r} and {label_key!r}: one pair per {of} sample, in {of} order", of
            )
        box, label = arrays[box_key], arrays[label_key]
        if box.ndim != 2 or box.shape[1] != 4 or label.shape != (len(box),):
            raise _fail(
                path,
                f"{box_key} / {label_key}",
                f"have shapes {list(box.shape)} and {list(label.shape)}; expected [N, 4] (x1, y1, x2, y2 pixels) and [N]",
                of,
            )
        if not np.issubdtype(label.dtype, np.integer):
            raise _fail(path, label_key, f"has dtype {label.dtype}; class indices are integers", of)
        bad = sorted({int(v) for v in label if not 0 <= v < count})
        if bad:
            raise _fail(path, label_key, f"has class indices {bad[:SHOWN_VALUES]} outside eval.classes (0..{count - 1})", of)
        for row, value in enumerate(box.astype(np.float64)):
            _check_box(path, f"{box_key}[{row}]", value, height, width, of)
        boxes.append(box.astype(np.float64))
        labels.append(label.astype(np.int64))
    extra = sorted(k for k in arrays if k.startswith("boxes_") and k.removeprefix("boxes_").isdigit() and int(k[6:]) >= samples)
    if extra:
        raise _fail(
            path, f"arrays {extra[:SHOWN_VALUES]}", f"have no {of} sample: the {of} set has {samples}; drop them or add the samples", of
        )
    return boxes, labels


# ---------------------------------------------------------------- segmentation


def load_segmentation_truth(spec: ModelSpec, sample_ids: np.ndarray | None, samples: int, limits: ArchiveLimits) -> SegmentationTruth:
    path = spec.eval.annotations
    if not path.exists():
        raise SpecError(f"eval.annotations: {path} does not exist")
    height, width = image_size(spec)
    if spec.eval.annotation_format == "npz":
        arrays = load_arrays(path, what="eval annotations", names={MASK_ARRAY}, limits=limits)
        if MASK_ARRAY not in arrays:
            raise _fail(path, f"no array {MASK_ARRAY!r}", f"save the label masks as one array {MASK_ARRAY!r} of shape [samples, H, W]")
        masks = arrays[MASK_ARRAY]
        if masks.shape != (samples, height, width):
            raise _fail(
                path,
                f"array {MASK_ARRAY!r}",
                f"has shape {list(masks.shape)}; expected [{samples}, {height}, {width}]: one mask per eval sample at the model input's size",
            )
        if not np.issubdtype(masks.dtype, np.integer):
            raise _fail(path, f"array {MASK_ARRAY!r}", f"has dtype {masks.dtype}; label masks hold integer class indices")
        for index in range(samples):
            _check_mask_values(spec, path, f"mask {index}", masks[index])
        masks = masks.astype(np.int64)
    else:
        if not path.is_dir():
            raise _fail(path, "not a folder", "segmentation ground truth is a folder of <sample id>.png label masks or an .npz")
        masks = np.stack(
            [_read_png(spec, path, index, key, height, width) for index, key in enumerate(_need_ids(spec, sample_ids, path, "PNG masks"))]
        )
    return SegmentationTruth(classes=list(spec.eval.classes), masks=masks, ignore_index=spec.eval.ignore_index, source=path)


def _read_png(spec: ModelSpec, folder: Path, index: int, key: Any, height: int, width: int) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    path = folder / f"{key}.png"
    if not path.is_file():
        raise _fail(path, f"eval sample {index} ({key!r})", "has no mask file: write one PNG label mask per eval sample")
    try:
        with Image.open(path) as image:
            if image.mode not in ("L", "P", "I", "I;16"):
                raise _fail(path, f"mode {image.mode}", "label masks are single-channel PNGs (mode L or P) holding class indices")
            mask = np.array(image)
    except (UnidentifiedImageError, OSError) as err:
        raise _fail(path, "not a readable PNG", str(err)) from None
    if mask.shape != (height, width):
        raise _fail(
            path,
            f"mask of {mask.shape[1]}x{mask.shape[0]}",
            f"the model input is {width}x{height}: masks must be at the model input's size",
        )
    _check_mask_values(spec, path, "mask", mask)
    return mask.astype(np.int64)


def _check_mask_values(spec: ModelSpec, path: Path, entry: str, mask: np.ndarray) -> None:
    count = len(spec.eval.classes)
    values = np.unique(mask)
    bad = [int(v) for v in values if not (0 <= v < count or v == spec.eval.ignore_index)]
    if bad:
        raise _fail(
            path,
            entry,
            f"has values {bad[:SHOWN_VALUES]} that are neither class indices 0..{count - 1} ({spec.eval.classes}) "
            f"nor eval.ignore_index ({spec.eval.ignore_index})",
        )
