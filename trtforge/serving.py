"""The serving contract: what a server or client must know to feed a published engine and read its outputs.

Built from the spec alone (and, for COCO ground truth without ``eval.classes``, the annotation
file's categories), so the same contract is written into the exported ONNX's ``metadata_props``
(key ``trtforge.serving``, and ``class_names`` as a JSON list), carried by every engine built
from it where the format keeps metadata, and stored in the version's manifest.

Nothing is invented: a field the spec does not declare (class names of a classifier without
``eval.classes``, the preprocessing of a model calibrated on ready-made arrays without
``serving.preprocessing``) is absent, not guessed.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from trtforge.errors import SpecError
from trtforge.spec import ARRAY_DATA_SUFFIXES, BoxesScoresClasses, ModelSpec, Preprocessing, Task, YoloDecoder

SERVING_FORMAT = 1
METADATA_KEY = "trtforge.serving"
CLASS_NAMES_KEY = "class_names"


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class InputContract(_Frozen):
    name: str
    dtype: str
    shape: list[int | str] = Field(description="ints for static dims, names for dynamic ones (bounds in 'dims')")
    dims: dict[str, tuple[int, int, int]] = Field(default_factory=dict, description="per dynamic dim: (min, opt, max)")
    preprocessing: Preprocessing | None = Field(
        default=None,
        description="from an image to this input: convert to 'color', resize to 'resize' (height, width), multiply by "
        "'scale', subtract 'mean' and divide by 'std' per channel, lay out as 'layout'",
    )
    preprocessing_from: Literal["calibration", "serving"] | None = Field(
        default=None, description="the spec section it comes from: the calibration images were read this way, or serving declares it"
    )
    value_range: tuple[float, float] | None = Field(
        default=None, description="the range of values the model expects (calibration.expected_range)"
    )


class OutputContract(_Frozen):
    name: str
    meaning: Literal[
        "class_scores", "embedding", "raw", "yolo_head", "boxes", "scores", "classes", "num_detections", "class_scores_per_pixel"
    ]
    layout: str | None = Field(default=None, description="what each axis holds")
    box_format: Literal["xyxy", "cxcywh"] | None = None
    coordinates: Literal["input_pixels"] | None = Field(
        default=None, description="input_pixels: pixels of the network input, after resizing"
    )


class DetectionContract(_Frozen):
    """How the engine's outputs become detections, as the gate decoded them."""

    decoder: str = Field(description="'yolo', 'boxes_scores_classes' or the user's 'file.py:function'")
    conf: float | None = Field(default=None, description="yolo: scores at or below it are dropped before NMS")
    iou: float | None = Field(default=None, description="yolo: class-wise NMS IoU threshold")
    max_det: int | None = Field(default=None, description="yolo: detections kept per image after NMS")
    box_format: Literal["xyxy"] = Field(default="xyxy", description="of the decoded detections")
    coordinates: Literal["input_pixels"] = "input_pixels"


class SegmentationContract(_Frozen):
    class_axis: int = Field(default=1, description="the output axis whose argmax is the class-index map")
    ignore_index: int | None = Field(default=None, description="the label value no metric counted (void pixels)")


class ServingInfo(_Frozen):
    format: Literal[1] = SERVING_FORMAT
    task: Task
    inputs: list[InputContract]
    outputs: list[OutputContract]
    class_names: list[str] | None = Field(default=None, description="by class index; absent where the spec names none")
    detection: DetectionContract | None = None
    segmentation: SegmentationContract | None = None

    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json", exclude_none=True), sort_keys=True, separators=(",", ":"))

    def sha256(self) -> str:
        return hashlib.sha256(self.to_json().encode()).hexdigest()

    def metadata(self) -> dict[str, str]:
        """The ONNX ``metadata_props`` entries that carry this contract."""
        entries = {METADATA_KEY: self.to_json()}
        if self.class_names is not None:
            entries[CLASS_NAMES_KEY] = json.dumps(self.class_names)
        return entries


def serving_info(spec: ModelSpec) -> ServingInfo:
    """The serving contract of ``spec`` (paths resolved, as ``load_spec`` gives it)."""
    task = spec.eval.task
    return ServingInfo(
        task=task,
        inputs=[_input(spec, index) for index in range(len(spec.inputs))],
        outputs=_outputs(spec),
        class_names=_class_names(spec),
        detection=_detection(spec) if task is Task.DETECTION else None,
        segmentation=SegmentationContract(ignore_index=spec.eval.ignore_index) if task is Task.SEGMENTATION else None,
    )


def _input(spec: ModelSpec, index: int) -> InputContract:
    inp = spec.inputs[index]
    preprocessing, source = None, None
    calibration = spec.calibration
    declared = spec.serving.preprocessing.get(inp.name) if spec.serving is not None else None
    if calibration is not None and index == 0 and calibration.data.suffix.lower() not in ARRAY_DATA_SUFFIXES:
        # An image folder or archive is read with calibration.preprocessing, or its defaults: the engines were calibrated so.
        preprocessing, source = calibration.preprocessing or Preprocessing(), "calibration"
    elif declared is not None:
        preprocessing, source = declared, "serving"
    is_float = inp.dtype in ("float32", "float16")
    return InputContract(
        name=inp.name,
        dtype=inp.dtype,
        shape=list(inp.shape),
        dims={name: (d.min, d.opt, d.max) for name, d in inp.dynamic.items()},
        preprocessing=preprocessing,
        preprocessing_from=source,
        value_range=calibration.expected_range if calibration is not None and is_float else None,
    )


def _outputs(spec: ModelSpec) -> list[OutputContract]:
    task, names = spec.eval.task, [o.name for o in spec.outputs]
    meanings: dict[str, OutputContract] = {}
    if task is Task.CLASSIFICATION:
        meanings[names[0]] = OutputContract(name=names[0], meaning="class_scores", layout="[batch, classes]")
    elif task is Task.EMBEDDING:
        meanings[names[0]] = OutputContract(name=names[0], meaning="embedding", layout="[batch, features]")
    elif task is Task.SEGMENTATION:
        meanings[names[0]] = OutputContract(name=names[0], meaning="class_scores_per_pixel", layout="[batch, classes, height, width]")
    elif isinstance(spec.eval.postprocess, YoloDecoder):
        head = spec.eval.postprocess.output or names[0]
        meanings[head] = OutputContract(
            name=head,
            meaning="yolo_head",
            layout="[batch, 4 + classes, anchors]: rows cx, cy, w, h, then one score per class",
            box_format="cxcywh",
            coordinates="input_pixels",
        )
    elif isinstance(spec.eval.postprocess, BoxesScoresClasses):
        config = spec.eval.postprocess
        padded = config.num_dets is not None
        rows = "[batch, max_det" if padded else "[detections"
        meanings[config.boxes] = OutputContract(
            name=config.boxes, meaning="boxes", layout=f"{rows}, 4]", box_format="xyxy", coordinates="input_pixels"
        )
        meanings[config.scores] = OutputContract(name=config.scores, meaning="scores", layout=f"{rows}]")
        meanings[config.classes] = OutputContract(name=config.classes, meaning="classes", layout=f"{rows}]: class indices")
        if padded:
            meanings[config.num_dets] = OutputContract(
                name=config.num_dets, meaning="num_detections", layout="[batch]: the first num_detections rows are real"
            )
    return [meanings.get(name) or OutputContract(name=name, meaning="raw") for name in names]


def _detection(spec: ModelSpec) -> DetectionContract:
    decoder = spec.eval.postprocess
    if isinstance(decoder, YoloDecoder):
        return DetectionContract(decoder="yolo", conf=decoder.conf, iou=decoder.iou, max_det=decoder.max_det)
    if isinstance(decoder, BoxesScoresClasses):
        return DetectionContract(decoder="boxes_scores_classes")
    return DetectionContract(decoder=str(decoder))


def _class_names(spec: ModelSpec) -> list[str] | None:
    if spec.eval.classes is not None:
        return list(spec.eval.classes)
    if spec.eval.task is Task.DETECTION and spec.eval.annotation_format == "coco":
        from trtforge.groundtruth import coco_class_names

        return coco_class_names(spec.eval.annotations)
    return None


def check_class_count(info: ServingInfo, output: str, shape: list[int | str]) -> None:
    """SpecError when the exported model's static class dim disagrees with the number of class names."""
    if info.class_names is None:
        return
    contract = next((o for o in info.outputs if o.name == output), None)
    axis = {"class_scores": 1, "class_scores_per_pixel": 1, "yolo_head": 1}.get(contract.meaning if contract else "")
    if axis is None or len(shape) <= axis or not isinstance(shape[axis], int):
        return
    classes = shape[axis] - 4 if contract.meaning == "yolo_head" else shape[axis]
    if classes != len(info.class_names):
        raise SpecError(
            f"eval.classes: {len(info.class_names)} class names {info.class_names}, but output {output!r} of the exported model has "
            f"shape {shape}, which is {classes} classes: list one name per class, in the model's class-index order"
        )


def read_onnx_serving(path: Path) -> ServingInfo | None:
    """The contract stored in an ONNX model's (or onnxruntime engine's) metadata, or None where there is none."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return onnx_serving(model)


def onnx_serving(model: Any) -> ServingInfo | None:
    for entry in model.metadata_props:
        if entry.key == METADATA_KEY:
            return ServingInfo.model_validate_json(entry.value)
    return None


def stamp_onnx(model: Any, info: ServingInfo) -> None:
    """Set the contract's ``metadata_props`` on an ``onnx.ModelProto``, replacing any earlier ones."""
    entries = info.metadata()
    kept = [(e.key, e.value) for e in model.metadata_props if e.key not in (METADATA_KEY, CLASS_NAMES_KEY)]
    del model.metadata_props[:]
    for key, value in [*kept, *entries.items()]:
        model.metadata_props.add(key=key, value=value)


def carry_metadata(source: Path, destination: Path) -> None:
    """Copy the contract's ``metadata_props`` from ``source`` into ``destination`` where a converter dropped them
    (ModelOpt's AutoCast and quantizer write models without the source's metadata)."""
    import onnx

    info = read_onnx_serving(source)
    if info is None:
        return
    model = onnx.load(str(destination), load_external_data=False)
    if onnx_serving(model) == info:
        return
    stamp_onnx(model, info)
    onnx.save(model, str(destination))


def describe(info: ServingInfo) -> list[str]:
    """The contract as lines of text, for ``trtforge show``."""
    lines = [f"task: {info.task.value}"]
    for inp in info.inputs:
        dims = "".join(f", {name} {low}..{high} (opt {opt})" for name, (low, opt, high) in inp.dims.items())
        lines.append(f"input {inp.name}: {inp.dtype} {inp.shape}{dims}")
        if inp.preprocessing is not None:
            p = inp.preprocessing
            steps = [p.color, f"resize {p.resize[0]}x{p.resize[1]}" if p.resize else None, f"x {p.scale:.6g}"]
            if p.mean is not None:
                steps.append(f"mean {p.mean} std {p.std}")
            lines.append(f"  preprocessing ({inp.preprocessing_from}): " + ", ".join(s for s in steps if s) + f", {p.layout}")
        if inp.value_range is not None:
            lines.append(f"  values in [{inp.value_range[0]:g}, {inp.value_range[1]:g}]")
    for out in info.outputs:
        frame = f", boxes {out.box_format} in {out.coordinates.replace('_', ' ')}" if out.box_format and out.coordinates else ""
        lines.append(f"output {out.name}: {out.meaning}" + (f" {out.layout}" if out.layout else "") + frame)
    if info.detection is not None:
        d = info.detection
        params = ", ".join(
            f"{name} {value:g}" for name, value in (("conf", d.conf), ("iou", d.iou), ("max_det", d.max_det)) if value is not None
        )
        lines.append(f"decoder: {d.decoder}" + (f" ({params})" if params else "") + f", detections {d.box_format} in input pixels")
    if info.segmentation is not None:
        lines.append(f"class map: argmax over axis {info.segmentation.class_axis}, ignore_index {info.segmentation.ignore_index}")
    lines.append(f"class names: {', '.join(info.class_names)}" if info.class_names is not None else "class names: not declared in the spec")
    return lines
