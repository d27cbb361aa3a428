"""The model spec: everything trtforge needs to know about one model, validated.

A spec is a YAML file. Relative paths inside it (checkpoint, eval and calibration
data, a factory given as ``file.py:function``) are resolved against the spec's own
folder, so a spec folder can be copied anywhere. The registry URI is the exception:
it is a URI, relative to the working directory, like any other command-line URI.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError, field_validator, model_validator
from pydantic_core import PydanticSerializationError

from trtforge.errors import SpecError

SAFE_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,99}$")
GPU_ARCHS = ("sm_75", "sm_80", "sm_86", "sm_87", "sm_89", "sm_90", "sm_100", "sm_103", "sm_110", "sm_120", "sm_121")
DEFAULT_REGISTRY = "file://artifacts/registry"
# No real spec comes near these; YAML aliases can expand a small file past them (or into itself).
MAX_SPEC_VALUES = 100_000
MAX_SPEC_DEPTH = 64
# Calibration data with these suffixes holds the model's inputs ready-made; anything else is read as images.
ARRAY_DATA_SUFFIXES = (".npz", ".npy")
# Where checkpoints are looked for, and how many jobs run at once, change nothing that is built: they stay out of the
# spec's hash.
NOT_IN_LINEAGE = {"watch", "parallel"}


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Precision(str, Enum):
    FP32 = "fp32"
    FP16 = "fp16"
    BF16 = "bf16"
    INT8 = "int8"
    FP8 = "fp8"

    @property
    def needs_calibration(self) -> bool:
        return self in (Precision.INT8, Precision.FP8)


class Task(str, Enum):
    CLASSIFICATION = "classification"
    EMBEDDING = "embedding"
    RAW = "raw"
    DETECTION = "detection"
    SEGMENTATION = "segmentation"


ShapeLevel = Literal["min", "opt", "max"]


class DynamicDim(Strict):
    min: Annotated[int, Field(ge=1)]
    opt: Annotated[int, Field(ge=1)]
    max: Annotated[int, Field(ge=1)]

    @model_validator(mode="after")
    def _ordered(self) -> DynamicDim:
        if self.min > self.opt:
            raise ValueError(f"min ({self.min}) must be <= opt ({self.opt})")
        if self.opt > self.max:
            raise ValueError(f"opt ({self.opt}) must be <= max ({self.max})")
        return self


class InputSpec(Strict):
    name: Annotated[str, Field(min_length=1)]
    dtype: Literal["float32", "float16", "int64", "int32", "bool"] = "float32"
    shape: list[int | str] = Field(min_length=1, description="ints for static dims, names for dynamic ones")
    dynamic: dict[str, DynamicDim] = Field(default_factory=dict)
    value_range: tuple[int, int] | None = Field(
        default=None,
        description="[low, high] (inclusive) of an integer input's values, e.g. [0, 1] for token_type_ids: what the "
        "export check feeds it (default [0, 99])",
    )

    @model_validator(mode="after")
    def _dims_declared(self) -> InputSpec:
        if self.value_range is not None:
            if self.dtype not in ("int64", "int32"):
                raise ValueError(f"value_range applies to integer inputs (this one is {self.dtype}): remove it")
            if self.value_range[0] > self.value_range[1]:
                raise ValueError(f"value_range {list(self.value_range)} has its low above its high: write [low, high]")
        named = [d for d in self.shape if isinstance(d, str)]
        missing = [d for d in named if d not in self.dynamic]
        if missing:
            raise ValueError(f"dynamic dims {missing} are in shape but have no min/opt/max under 'dynamic'")
        unused = [d for d in self.dynamic if d not in named]
        if unused:
            raise ValueError(f"dynamic dims {unused} are not used in shape {self.shape}")
        if any(isinstance(d, int) and d < 1 for d in self.shape):
            raise ValueError(f"static dims must be >= 1, got {self.shape}")
        return self

    def shape_at(self, level: ShapeLevel) -> tuple[int, ...]:
        return tuple(d if isinstance(d, int) else getattr(self.dynamic[d], level) for d in self.shape)


class OutputSpec(Strict):
    name: Annotated[str, Field(min_length=1)]


class IsolationOptions(Strict):
    """Limits for the child processes that run export, onnxsim, ModelOpt and engine builds."""

    timeout_s: Annotated[float, Field(gt=0)] = 3600
    memory_mb: Annotated[int, Field(ge=256)] | None = Field(
        default=None, description="address-space cap of the child (RLIMIT_AS); CUDA builds need far more than they touch"
    )


class ExportOptions(Strict):
    opset: Annotated[int, Field(ge=13, le=23)] = 18
    tolerance: Annotated[float, Field(gt=0)] = 1e-4
    rtol: Annotated[float, Field(ge=0)] = 1e-3
    seed: int = 0


class YoloDecoder(Strict):
    """The anchor-free head Ultralytics exports: one output [B, 4 + classes, anchors] of (cx, cy, w, h, class scores)."""

    kind: Literal["yolo"]
    output: str | None = Field(default=None, description="the head's output name; default the spec's first output")
    conf: Annotated[float, Field(ge=0, le=1)] = 0.001
    iou: Annotated[float, Field(gt=0, le=1)] = 0.7
    max_det: Annotated[int, Field(ge=1)] = 300


class BoxesScoresClasses(Strict):
    """Detections with NMS inside the model: boxes (xyxy pixels), scores and class indices.

    With ``num_dets`` the outputs are padded to a fixed size per image (EfficientNMS: the first
    ``num_dets`` rows are real); without it they are ragged (as many rows as detections), which
    only a batch of one image can give unambiguously, so the model is run one image at a time.
    """

    kind: Literal["boxes_scores_classes"]
    boxes: str = "boxes"
    scores: str = "scores"
    classes: str = "classes"
    num_dets: str | None = None


Decoder = Annotated[YoloDecoder | BoxesScoresClasses, Field(discriminator="kind")]


class EvalSpec(Strict):
    data: Path = Field(description=".npz with one array per input name, plus the labels array")
    task: Task = Task.CLASSIFICATION
    labels: str | None = "labels"
    batch_size: Annotated[int, Field(ge=1)] = 64
    recall_k: Annotated[int, Field(ge=1)] = 5
    annotations: Path | None = Field(
        default=None,
        description="ground truth: detection a COCO .json, a folder of YOLO .txt labels or an .npz (boxes_<i>, labels_<i>); "
        "segmentation a folder of PNG label masks or an .npz with array 'masks'",
    )
    sample_ids: str = Field(
        default="image_ids",
        description="array in eval.data naming each sample's image in the annotations: a COCO image id or file_name, "
        "a YOLO label or PNG mask file stem",
    )
    classes: list[Annotated[str, Field(min_length=1)]] | None = Field(
        default=None, description="class names in the model's class-index order; for COCO, default its categories by id"
    )
    postprocess: Decoder | str | None = Field(
        default=None, description="detection decoder: {kind: yolo, ...}, {kind: boxes_scores_classes, ...} or 'file.py:function'"
    )
    ignore_index: int | None = Field(default=255, description="segmentation: mask value that no metric counts")
    agreement_score: Annotated[float, Field(ge=0, le=1)] = Field(
        default=0.25, description="detection: reference detections at or above this score are the ground truth of the agreement metrics"
    )

    @property
    def annotation_format(self) -> Literal["coco", "npz", "yolo", "png"] | None:
        if self.annotations is None:
            return None
        if self.annotations.suffix == ".json":
            return "coco"
        if self.annotations.suffix == ".npz":
            return "npz"
        return "yolo" if self.task is Task.DETECTION else "png"

    @model_validator(mode="after")
    def _task_needs(self) -> EvalSpec:
        if self.task is Task.DETECTION:
            if self.annotations is None:
                raise ValueError("task 'detection' needs 'annotations': a COCO .json, a folder of YOLO .txt labels or an .npz")
            if self.postprocess is None:
                raise ValueError("task 'detection' needs 'postprocess': {kind: yolo}, {kind: boxes_scores_classes} or 'file.py:function'")
            if self.annotation_format in ("yolo", "npz") and not self.classes:
                raise ValueError("YOLO and .npz annotations carry class indices only: list the class names under 'classes'")
        elif self.task is Task.SEGMENTATION:
            if self.annotations is None:
                raise ValueError("task 'segmentation' needs 'annotations': a folder of PNG label masks or an .npz with array 'masks'")
            if self.annotation_format == "coco":
                raise ValueError("segmentation annotations are PNG label masks or an .npz, not COCO .json")
            if not self.classes:
                raise ValueError("task 'segmentation' needs 'classes': the class names in the model's channel order")
            if self.ignore_index is not None and 0 <= self.ignore_index < len(self.classes):
                raise ValueError(
                    f"ignore_index {self.ignore_index} is one of the {len(self.classes)} classes: pick a value outside 0..{len(self.classes) - 1}"
                )
        elif self.annotations is not None or self.postprocess is not None:
            raise ValueError(f"'annotations' and 'postprocess' are for tasks 'detection' and 'segmentation', not {self.task.value!r}")
        if isinstance(self.postprocess, str) and (":" not in self.postprocess or self.postprocess.startswith(":")):
            raise ValueError(f"postprocess {self.postprocess!r} must look like 'file.py:function' or 'module:function'")
        if self.classes is not None and len(set(self.classes)) != len(self.classes):
            raise ValueError(f"class names must be unique: {self.classes}")
        return self

    def under(self, base: Path) -> EvalSpec:
        """This section with its relative paths resolved against ``base`` (the spec's folder)."""
        updates: dict[str, Any] = {"data": self.data if self.data.is_absolute() else base / self.data}
        if self.annotations is not None and not self.annotations.is_absolute():
            updates["annotations"] = base / self.annotations
        return self.model_copy(update=updates)


class Preprocessing(Strict):
    resize: tuple[int, int] | None = Field(default=None, description="(height, width)")
    layout: Literal["NCHW", "NHWC"] = "NCHW"
    color: Literal["gray", "rgb"] = "rgb"
    scale: Annotated[float, Field(gt=0)] = 1.0 / 255.0
    mean: list[float] | None = Field(default=None, description="per channel, subtracted after scaling")
    std: list[float] | None = Field(default=None, description="per channel, divided by after subtracting mean")

    @property
    def channels(self) -> int:
        return 1 if self.color == "gray" else 3

    @model_validator(mode="after")
    def _normalization_per_channel(self) -> Preprocessing:
        if (self.mean is None) != (self.std is None):
            raise ValueError("give both 'mean' and 'std', or neither")
        for field, values in (("mean", self.mean), ("std", self.std)):
            if values is not None and len(values) != self.channels:
                raise ValueError(f"'{field}' needs {self.channels} values for color {self.color!r}, got {len(values)}")
        if self.std is not None and any(s <= 0 for s in self.std):
            raise ValueError(f"'std' values must be > 0, got {self.std}")
        return self


class CalibrationSpec(Strict):
    data: Path = Field(description=".npz keyed by input name, .npy for single-input models, or an image folder")
    labels: str | None = Field(
        default=None,
        description="key of the labels array in an .npz; for an image folder, any value reads labels from class subfolders",
    )
    annotations: Path | None = Field(
        default=None,
        description="detection: the set's boxes in a form eval.annotations takes (a COCO .json, a folder of YOLO .txt labels or "
        "an .npz with boxes_<i>, labels_<i>); class coverage then counts objects per class",
    )
    sample_ids: str = Field(
        default="image_ids",
        description="array in an .npz set naming each sample's image in COCO or YOLO annotations; an image folder's samples "
        "are named by their file names without the suffix",
    )
    preprocessing: Preprocessing | None = None
    min_samples: Annotated[int, Field(ge=1)] = 500
    max_samples: Annotated[int, Field(ge=1)] = 1024
    max_duplicate_ratio: Annotated[float, Field(ge=0, le=1)] = 0.01
    max_constant_ratio: Annotated[float, Field(ge=0, le=1)] = 0.01
    distribution_tolerance: Annotated[float, Field(gt=0)] = Field(
        default=1.35,
        description="how far, in the eval set's pooled std, a channel's mean and mean per-sample std may drift from the "
        "eval set's; 1.35 sits between honest sets of other photos and mean/std in 0-255 units (benchmarks/drift_tolerance.py)",
    )
    min_per_class: Annotated[int, Field(ge=0)] = 10
    expected_range: tuple[float, float] | None = Field(
        default=None, description="value range the model expects after preprocessing, e.g. [-3, 3]"
    )
    max_archive_members: Annotated[int, Field(ge=1)] = Field(
        default=100_000, description="most entries a .tar/.tar.gz/.zip calibration archive may hold"
    )
    max_archive_bytes: Annotated[int, Field(ge=1)] = Field(
        default=2 * 1024**3, description="most bytes a calibration archive may unpack to"
    )
    max_archive_ratio: Annotated[float, Field(gt=1)] = Field(
        default=200.0, description="largest unpacked-to-packed size ratio of a calibration archive (zip bombs exceed it)"
    )

    @property
    def annotation_format(self) -> Literal["coco", "npz", "yolo"] | None:
        if self.annotations is None:
            return None
        if self.annotations.suffix == ".json":
            return "coco"
        return "npz" if self.annotations.suffix == ".npz" else "yolo"

    @model_validator(mode="after")
    def _one_kind_of_class_coverage(self) -> CalibrationSpec:
        if self.labels is not None and self.annotations is not None:
            raise ValueError("'labels' (one class per sample) and 'annotations' (objects per sample) both count class coverage: keep one")
        return self

    def under(self, base: Path) -> CalibrationSpec:
        """This section with its relative paths resolved against ``base`` (the spec's folder)."""
        updates: dict[str, Any] = {"data": self.data if self.data.is_absolute() else base / self.data}
        if self.annotations is not None and not self.annotations.is_absolute():
            updates["annotations"] = base / self.annotations
        return self.model_copy(update=updates)


class ServingSpec(Strict):
    """What a server must know that the rest of the spec does not say (trtforge.serving builds the contract)."""

    preprocessing: dict[str, Preprocessing] = Field(
        default_factory=dict,
        description="per input name, how a client turns an image into it; for models calibrated on ready-made arrays",
    )


class LadderOptions(Strict):
    """The precision ladder: when an int8/fp8 target fails its gate, keep its most sensitive nodes out of quantization and re-gate."""

    enabled: bool | None = Field(
        default=None, description="on for every int8/fp8 target; unset: on for detection only (a target's 'ladder' overrides it)"
    )
    max_steps: Annotated[int, Field(ge=1, le=20)] = Field(default=3, description="re-conversions tried before the target is refused")
    nodes_per_step: Annotated[int, Field(ge=1)] = Field(
        default=2, description="nodes each step adds to the excluded ones, most sensitive first"
    )


class PrecisionOptions(Strict):
    calibration_method: Literal["entropy", "max"] = "entropy"
    exclude_op_types: list[str] = Field(default_factory=list)
    exclude_nodes: list[str] = Field(default_factory=list)
    keep_fp32_op_types: list[str] = Field(default_factory=list)
    keep_fp32_nodes: list[str] = Field(default_factory=list)
    high_precision_dtype: Literal["fp32", "fp16", "bf16"] = "fp32"
    ladder: LadderOptions = LadderOptions()


class SpeedupOver(Strict):
    """The precision a target must beat on its own place and backend: ``fp16``, or ``{precision: fp16, factor: 1.5}``."""

    precision: Precision
    factor: Annotated[float, Field(ge=1)] = Field(
        default=1.0, description="the other target's latency over this one's must exceed it; 1.0: strictly faster"
    )

    @model_validator(mode="before")
    @classmethod
    def _bare_precision(cls, value: Any) -> Any:
        return {"precision": value} if isinstance(value, str) else value


class GateThresholds(Strict):
    """Per-precision defaults live in ``trtforge.stages.gate``; anything set here overrides them."""

    min_accuracy: Annotated[float, Field(ge=0, le=1)] | None = None
    min_agreement: Annotated[float, Field(ge=0, le=1)] | None = None
    max_accuracy_drop: Annotated[float, Field(ge=0, le=1)] | None = Field(
        default=None, description="allowed top-1 drop versus the PyTorch FP32 reference, as a fraction"
    )
    min_cosine: Annotated[float, Field(ge=-1, le=1)] | None = None
    max_abs_error: Annotated[float, Field(ge=0)] | None = None
    min_recall_at_k: Annotated[float, Field(ge=0, le=1)] | None = None
    regression_tolerance: Annotated[float, Field(ge=0, le=1)] | None = Field(
        default=None, description="allowed drop of the task metric versus the last published version"
    )
    min_map: Annotated[float, Field(ge=0, le=1)] | None = Field(default=None, description="floor of COCO mAP@[.5:.95]")
    max_map_drop: Annotated[float, Field(ge=0, le=1)] | None = Field(
        default=None, description="allowed mAP@[.5:.95] drop versus the PyTorch FP32 reference"
    )
    min_class_ap: Annotated[float, Field(ge=0, le=1)] | None = Field(default=None, description="floor of every class's AP")
    max_class_ap_drop: Annotated[float, Field(ge=0, le=1)] | None = Field(
        default=None, description="allowed drop of any one class's AP versus the PyTorch FP32 reference"
    )
    min_agreement_map: Annotated[float, Field(ge=0, le=1)] | None = Field(
        default=None, description="floor of the mAP of the engine's detections against the reference's as ground truth"
    )
    min_miou: Annotated[float, Field(ge=0, le=1)] | None = Field(default=None, description="floor of the mean IoU")
    max_miou_drop: Annotated[float, Field(ge=0, le=1)] | None = Field(
        default=None, description="allowed mIoU drop versus the PyTorch FP32 reference"
    )
    min_class_iou: Annotated[float, Field(ge=0, le=1)] | None = Field(default=None, description="floor of every class's IoU")
    max_class_iou_drop: Annotated[float, Field(ge=0, le=1)] | None = Field(
        default=None, description="allowed drop of any one class's IoU versus the PyTorch FP32 reference"
    )
    min_pixel_agreement: Annotated[float, Field(ge=0, le=1)] | None = Field(
        default=None, description="floor of the share of pixels whose class matches the reference's"
    )
    near_tie_margin: Annotated[float, Field(ge=0, le=1)] | None = Field(
        default=None,
        description="a disagreement where the reference's top-2 softmax gap is below it is a near tie, forgiven by min_agreement "
        "(default 0.02, trtforge.stages.gate)",
    )
    # None, not False, when unset: a target's gate {} must not switch off the spec's strict_resolution: true.
    strict_resolution: bool | None = Field(
        default=None, description="true: a threshold finer than the eval set resolves fails the gate; default false: a warning"
    )
    max_latency_ms: Annotated[float, Field(gt=0)] | None = Field(
        default=None, description="ceiling of the median latency at the opt shape, in ms, on the machine that gated it"
    )
    min_speedup_over: SpeedupOver | None = Field(
        default=None, description="the target of this precision on the same place and backend must be slower (trtforge.stages.latency_gate)"
    )


class Profile(Strict):
    """One optimization profile: overrides of min/opt/max per dynamic dim name."""

    dims: dict[str, DynamicDim]


class Target(Strict):
    """What every target has. Each backend module subclasses it with its own options and a
    ``backend: Literal[...]`` tag, and registers the subclass with ``register_target_model``:
    a spec's target then accepts exactly that backend's options, and names any other as not
    applying to it."""

    backend: str
    precision: Precision = Precision.FP32
    required: bool = True
    work_pool: str | None = None
    profiles: list[Profile] = Field(default_factory=list)
    gate: GateThresholds = GateThresholds()
    ladder: bool | None = Field(
        default=None, description="the precision ladder for this int8/fp8 target; unset: precision.ladder.enabled decides"
    )

    @model_validator(mode="after")
    def _registered(self) -> Target:
        if type(self) is Target:
            raise ValueError(f"backend {self.backend!r} is not registered: import the module that defines it first")
        if self.ladder and not self.precision.needs_calibration:
            raise ValueError(
                f"'ladder: true' applies to int8 and fp8 targets (this one is {self.precision.value}): remove it from this target"
            )
        return self

    @property
    def place(self) -> str:
        """Where the engine runs, as the target tag names it: ``cpu``, ``sm90``."""
        return "cpu"

    @property
    def pool(self) -> str | None:
        """The Prefect work pool whose build-target deployment builds this target off this machine."""
        return self.work_pool


DEFAULT_BACKEND = "onnxruntime"
_TARGET_MODELS: dict[str, type[Target]] = {}
# ModelSpec.targets is validated against the union of the registered target models; it starts
# as the base model and is rebuilt each time a backend registers its own.
AnyTarget: Any = Target


def _backend_of(value: Any) -> str | None:
    if isinstance(value, dict):
        return value.get("backend", DEFAULT_BACKEND)
    return getattr(value, "backend", None)


def register_target_model(model: type[Target]) -> type[Target]:
    """Called by a backend module for its target model; the model's ``backend`` default is its name."""
    global AnyTarget
    name = model.model_fields["backend"].default
    _TARGET_MODELS[name] = model
    members = tuple(Annotated[m, Tag(n)] for n, m in _TARGET_MODELS.items())
    # Union over a tuple built at run time; with one member there is nothing to discriminate.
    AnyTarget = Annotated[Union[members], Discriminator(_backend_of)] if len(members) > 1 else members[0]  # noqa: UP007
    # The field's annotation was resolved when ModelSpec was created: set it anew, then rebuild.
    ModelSpec.model_fields["targets"].annotation = list[AnyTarget]
    ModelSpec.model_rebuild(force=True)
    return model


def parse_target(data: dict[str, Any]) -> Target:
    """One target as a spec's ``targets`` entry would give it, validated by its backend's model."""
    from pydantic import TypeAdapter

    target_models()
    return TypeAdapter(AnyTarget).validate_python(data)


def target_models() -> dict[str, type[Target]]:
    """The registered target models by backend name, the built-in backends' among them."""
    # Imported here, not at the top: the backend modules import this one.
    import trtforge.backends  # noqa: F401

    return dict(_TARGET_MODELS)


class WatchSpec(Strict):
    """Where new checkpoints arrive, for the scheduled watcher (``flows/watch.py``)."""

    location: Annotated[str, Field(min_length=1)] = Field(
        description="a folder (relative to the spec's folder) or s3://BUCKET/PREFIX that new checkpoints are written to"
    )
    pattern: Annotated[str, Field(min_length=1)] = Field(
        default="*.safetensors", description="glob of checkpoint names under location; '**/' spans sub-folders"
    )
    retrain_first: bool = Field(
        default=False, description="call the spec's train entry point, writing a new checkpoint into location, before looking"
    )

    @field_validator("location")
    @classmethod
    def _folder_or_s3(cls, value: str) -> str:
        scheme, separator, _ = value.partition("://")
        if separator and scheme != "s3":
            raise ValueError(f"{value!r} must be a folder or s3://BUCKET/PREFIX")
        return value

    @field_validator("pattern")
    @classmethod
    def _relative_glob(cls, value: str) -> str:
        if value.startswith("/") or ".." in value.split("/"):
            raise ValueError(f"{value!r} must be a relative glob inside location, e.g. '*.safetensors'")
        return value


class ModelSpec(Strict):
    name: str
    model: str = Field(description="factory returning the nn.Module: 'package.module:function' or 'file.py:function'")
    model_kwargs: dict[str, Any] = Field(default_factory=dict)
    checkpoint: Path
    train: str | None = Field(default=None, description="'module:function' or 'file.py:function' writing the checkpoint")
    inputs: list[InputSpec] = Field(min_length=1)
    outputs: list[OutputSpec] = Field(min_length=1)
    export: ExportOptions = ExportOptions()
    isolation: IsolationOptions = IsolationOptions()
    eval: EvalSpec
    calibration: CalibrationSpec | None = None
    precision: PrecisionOptions = PrecisionOptions()
    targets: list[AnyTarget] = Field(min_length=1)
    gate: GateThresholds = GateThresholds()
    registry: str | None = None
    aliases: list[str] = Field(default_factory=list)
    compare_alias: str | None = Field(
        default=None, description="gate regressions against the version behind this alias instead of the newest one"
    )
    plugins: list[str] = Field(default_factory=list, description="op domains or op types served by TensorRT plugins")
    allow_pickle_checkpoints: bool = True
    watch: WatchSpec | None = None
    serving: ServingSpec | None = None
    parallel: Annotated[int, Field(ge=1)] | None = Field(
        default=None,
        description="conversions and builds of this run's targets at once; default the worker's cores; TRTFORGE_PARALLEL overrides it",
    )

    # Set by parse_spec: where relative paths were resolved from, and the hash of the spec as written
    # (before resolution, so the same spec hashes the same in any checkout).
    source: Path | None = Field(default=None, exclude=True)
    digest: str | None = Field(default=None, exclude=True)
    # One hash per top-level field, also as written: a stage's cache key covers the fields it reads.
    field_digests: dict[str, str] | None = Field(default=None, exclude=True)

    @field_validator("name")
    @classmethod
    def _safe_name(cls, value: str) -> str:
        if not SAFE_NAME.match(value):
            raise ValueError("must be 1-100 characters of a-z, 0-9, '.', '_' or '-', starting with a letter or digit")
        return value

    @field_validator("aliases")
    @classmethod
    def _safe_aliases(cls, value: list[str]) -> list[str]:
        bad = [a for a in value if not SAFE_NAME.match(a)]
        if bad:
            raise ValueError(f"aliases {bad} must use only a-z, 0-9, '.', '_' or '-'")
        return value

    @field_validator("compare_alias")
    @classmethod
    def _safe_compare_alias(cls, value: str | None) -> str | None:
        if value is not None and not SAFE_NAME.match(value):
            raise ValueError("must use only a-z, 0-9, '.', '_' or '-'")
        return value

    @model_validator(mode="after")
    def _unique_names(self) -> ModelSpec:
        names = [i.name for i in self.inputs] + [o.name for o in self.outputs]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"input/output names must be unique, repeated: {duplicates}")
        return self

    @model_validator(mode="after")
    def _serving_preprocessing_fits(self) -> ModelSpec:
        if self.serving is None:
            return self
        inputs = {i.name: i for i in self.inputs}
        for name, preprocessing in self.serving.preprocessing.items():
            field = f"serving.preprocessing.{name}"
            if name not in inputs:
                raise ValueError(f"{field}: {name!r} is not an input of the spec ({sorted(inputs)}): key it by an input's name")
            shape = inputs[name].shape
            channels = shape[1 if preprocessing.layout == "NCHW" else -1] if len(shape) == 4 else None
            if len(shape) != 4 or (isinstance(channels, int) and channels != preprocessing.channels):
                raise ValueError(
                    f"{field}: color {preprocessing.color!r} in layout {preprocessing.layout} gives [N, C, H, W] or [N, H, W, C] "
                    f"with {preprocessing.channels} channel(s), but input {name!r} has shape {shape}: fix color or layout"
                )
            calibration = self.calibration
            reads_images = calibration is not None and calibration.data.suffix.lower() not in ARRAY_DATA_SUFFIXES
            calibrated = (calibration.preprocessing or Preprocessing()) if reads_images else None
            if name == self.inputs[0].name and calibrated is not None and calibrated != preprocessing:
                raise ValueError(
                    f"{field} differs from calibration.preprocessing (or its defaults), which the calibration images were "
                    f"read with: remove {field} (the calibration's is served)"
                )
        return self

    @model_validator(mode="after")
    def _watch_can_retrain(self) -> ModelSpec:
        if self.watch is not None and self.watch.retrain_first and self.train is None:
            raise ValueError("watch.retrain_first needs a 'train' entry point: add train: 'file.py:function' or set retrain_first: false")
        return self

    @model_validator(mode="after")
    def _speedup_has_a_target_to_beat(self) -> ModelSpec:
        """Every min_speedup_over names a precision that another target of the same place and backend builds."""
        built = {(t.backend, t.place, t.precision) for t in self.targets}
        for index, target in enumerate(self.targets):
            own, shared = target.gate.min_speedup_over, self.gate.min_speedup_over
            rule, field = (own, f"targets[{index}].gate.min_speedup_over") if own else (shared, "gate.min_speedup_over")
            if rule is None:
                continue
            if rule.precision is target.precision:
                if own:
                    raise ValueError(f"{field}: {rule.precision.value} is this target's own precision: name the precision it must beat")
                # The spec-wide rule does not ask the targets of that precision to beat themselves.
                continue
            if (target.backend, target.place, rule.precision) not in built:
                raise ValueError(
                    f"{field}: targets[{index}] ({target.backend} {target.precision.value} on {target.place}) has no "
                    f"{target.backend} {rule.precision.value} target on {target.place} to be compared with: add one, or "
                    f"remove min_speedup_over" + ("" if own else " from the spec's gate and set it on the targets it applies to")
                )
        return self

    def input_shapes(self, level: ShapeLevel) -> dict[str, tuple[int, ...]]:
        return {i.name: i.shape_at(level) for i in self.inputs}

    def sha256(self) -> str:
        """Content hash of the validated spec as written, for lineage and cache keys."""
        return self.digest or hashlib.sha256(self.model_dump_json(exclude=NOT_IN_LINEAGE).encode()).hexdigest()

    def sha256_of(self, fields: Iterable[str]) -> str:
        """Content hash of these top-level fields as written: what one stage reads of the spec."""
        digests = self.field_digests or _field_digests(self)
        return hashlib.sha256(json.dumps({name: digests[name] for name in sorted(fields)}).encode()).hexdigest()


def _field_digests(spec: ModelSpec) -> dict[str, str]:
    dumped = spec.model_dump(mode="json", exclude=NOT_IN_LINEAGE)
    return {name: hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest() for name, value in dumped.items()}


def _format_location(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or "(top level)"


def format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"invalid spec {source}:"]
    for problem in err.errors():
        loc = [p for p in problem["loc"] if p not in ("function-after", "function-before")]
        message = problem["msg"].removeprefix("Value error, ")
        if problem["type"] == "union_tag_invalid" and loc and loc[0] == "targets":
            known = ", ".join(repr(n) for n in sorted(_TARGET_MODELS))
            message = f"backend {problem['ctx']['tag']!r} is not known here; the backends are {known}"
        if len(loc) >= 3 and loc[0] == "targets" and isinstance(loc[1], int) and loc[2] in _TARGET_MODELS:
            backend = loc.pop(2)
            if problem["type"] == "extra_forbidden":
                options = ", ".join(sorted(set(_TARGET_MODELS[backend].model_fields) - {"backend"}))
                message = f"is not an option of backend {backend!r}; its options are {options}"
        lines.append(f"  {_format_location(tuple(loc))}: {message}")
    return "\n".join(lines)


def parse_spec(data: Any, source: str = "<spec>", base_dir: Path | None = None) -> ModelSpec:
    """Validate already-parsed YAML data; relative paths resolve against ``base_dir``."""
    if not isinstance(data, dict):
        raise SpecError(f"invalid spec {source}: expected a mapping at the top level, got {type(data).__name__}")
    _check_size(data, source)
    target_models()
    try:
        spec = ModelSpec.model_validate(data)
    except ValidationError as err:
        raise SpecError(format_validation_error(err, source)) from None
    try:
        written = spec.model_dump_json(exclude=NOT_IN_LINEAGE)
    except PydanticSerializationError as err:
        raise SpecError(
            f"invalid spec {source}: a value cannot be written as JSON ({err}); model_kwargs may hold only text, "
            "numbers, booleans, null, lists and mappings (no binary data)"
        ) from None
    spec = spec.model_copy(update={"digest": hashlib.sha256(written.encode()).hexdigest(), "field_digests": _field_digests(spec)})
    if base_dir is None:
        return spec
    return _resolve_paths(spec, base_dir.resolve())


def _check_size(data: Any, source: str) -> None:
    """Refuse data too large or too deep to be a spec before validation and hashing walk it (iteratively here)."""
    pending = [(data, 1)]
    seen = 0
    while pending:
        value, depth = pending.pop()
        seen += 1
        if seen > MAX_SPEC_VALUES:
            raise SpecError(
                f"invalid spec {source}: it holds more than {MAX_SPEC_VALUES} values once YAML aliases are expanded, "
                "or a value contains itself: write the values out without aliases"
            )
        if depth > MAX_SPEC_DEPTH:
            raise SpecError(f"invalid spec {source}: values are nested more than {MAX_SPEC_DEPTH} levels deep")
        if isinstance(value, dict):
            pending.extend((item, depth + 1) for pair in value.items() for item in pair)
        elif isinstance(value, (list, tuple, set, frozenset)):
            pending.extend((item, depth + 1) for item in value)


def _resolve_paths(spec: ModelSpec, base: Path) -> ModelSpec:
    def resolve(path: Path) -> Path:
        return path if path.is_absolute() else base / path

    updates: dict[str, Any] = {
        "checkpoint": resolve(spec.checkpoint),
        "eval": spec.eval.under(base),
        "source": base,
    }
    if spec.calibration is not None:
        updates["calibration"] = spec.calibration.under(base)
    if spec.watch is not None and "://" not in spec.watch.location:
        updates["watch"] = spec.watch.model_copy(update={"location": str(resolve(Path(spec.watch.location)))})
    return spec.model_copy(update=updates)


def load_spec(path: str | Path) -> ModelSpec:
    """Read and validate a spec file, resolving its relative paths against its folder."""
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"spec file {path} does not exist: pass the path to a spec YAML, e.g. examples/digits/spec.yaml")
    try:
        data = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise SpecError(f"spec file {path} is not valid YAML: {err}") from None
    except RecursionError:
        raise SpecError(f"spec file {path} is nested too deeply to be a spec: flatten its lists and mappings") from None
    return parse_spec(data, source=str(path), base_dir=path.parent)
