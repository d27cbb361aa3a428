"""Stage 'validate calibration': check a calibration set with great-expectations before quantizing.

INT8 and FP8 engines are only as good as their calibration set, and its usual faults are
silent: unnormalized pixels, a wrong layout, too few or repeated samples, NaNs, data that
looks nothing like what the model will see. This stage turns the set into a table with one
row per sample (per input: shape, dtype, min, max, mean, std, NaN and Inf counts, per-channel
mean and std; per sample: a content hash and the label), generates an expectation suite from
the spec, and validates the table with great-expectations in an in-memory (ephemeral) Data
Context. Each failed expectation comes back with the samples that broke it, by index or file
name. With ``out_dir``, the validation result (JSON), the suite (JSON) and Data Docs (HTML)
are written there.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import statistics
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel

from trtforge.calibration import CalibrationSet, archive_limits, calibration_spec, load_calibration
from trtforge.errors import CalibrationError
from trtforge.evalset import eval_limits, load_eval_set
from trtforge.groundtruth import DetectionTruth, coco_class_names, load_detection_truth
from trtforge.safeio import atomic_directory, atomic_write_json, load_arrays
from trtforge.spec import CalibrationSpec, InputSpec, ModelSpec, Preprocessing, Task

STAGE = "calibration"
RESULT_FILE = "calibration_validation.json"
SUITE_FILE = "expectation_suite.json"
DATA_DOCS_DIR = "data_docs"

SAMPLE_COLUMN = "sample"
READABLE_COLUMN = "readable"
DUPLICATE_COLUMN = "duplicate"
HASH_COLUMN = "sha256"
LABEL_COLUMN = "label"
CLASS_COUNT_COLUMN = "class_count"
# Per class index: how many annotated objects of that class each sample holds (detection).
OBJECTS_PREFIX = "objects."

EIGHT_BIT_MAX = 255.0
# A sample whose std is under this fraction of the value range it should span carries
# (almost) no signal for calibration: a blank frame, a padding-only sequence.
NEAR_CONSTANT_FRACTION = 0.01
# Values this far outside the declared range are rounding, not a preprocessing fault.
RANGE_SLACK_FRACTION = 1e-3
# Rows per block when computing statistics, so a large set is never copied to float64 at once.
STATS_BLOCK = 256
LISTED_IN_DETAILS = 10
# Channel counts of image inputs: how the spec's shape tells NCHW from NHWC.
IMAGE_CHANNELS = frozenset({1, 3, 4})
# A channel whose mean per-sample std is this many times the eval set's (or 1/this) holds values in other
# units: halfway, on a log scale, between the same units and 8-bit for 0-1 ones (255x), whatever the tolerance.
SPREAD_FACTOR = 16.0
# A spread ratio within this factor of 255 (or 1/255) is read as 8-bit units mixed up with 0-1 units;
# honest sets of other photos stay within a factor of about 2 of the eval set's (benchmarks/drift_tolerance.py).
UNITS_SLACK = 4.0


class FailedExpectation(BaseModel):
    expectation: str
    column: str | None
    details: str
    samples: list[str]


class CalibrationReport(BaseModel):
    passed: bool
    samples: int
    sha256: str
    source: Path
    failed: list[FailedExpectation]
    result_json: Path | None = None
    suite_json: Path | None = None
    data_docs: Path | None = None

    def summary(self) -> dict[str, Any]:
        """The short form printed by ``trtforge validate-calibration --json``."""
        return {
            "passed": self.passed,
            "samples": self.samples,
            "failed": [f.model_dump() for f in self.failed],
        }


@dataclass(frozen=True)
class ChannelReference:
    """One channel of one input over the eval set: the statistics the calibration set is compared to."""

    mean: float
    mean_of_sample_std: float
    pooled_std: float


@dataclass(frozen=True)
class InputReference:
    channels: list[ChannelReference]
    pooled_std: float


Describe = Callable[[dict[str, Any]], tuple[str, list[str]]]


@dataclass(frozen=True)
class Check:
    """One generated expectation and how to word its failure (details, offending samples).

    Checks that share a ``summary`` fail together when the set has one known fault (a layout,
    a scale): their failures are reported as that one line instead of one line each.
    """

    expectation: Any
    describe: Describe
    summary: str | None = None


@dataclass(frozen=True)
class DriftOffset:
    """One channel statistic of the calibration set against the eval set's, in the eval set's pooled std."""

    channel: int
    statistic: str
    observed: float
    target: float
    pooled_std: float

    @property
    def offset(self) -> float:
        """|observed - target| / pooled std: the drift check fails where this exceeds calibration.distribution_tolerance."""
        return abs(self.observed - self.target) / self.pooled_std if self.pooled_std > 0 else math.inf


def validate_calibration(spec: ModelSpec, data: Path | None = None, out_dir: Path | None = None) -> CalibrationReport:
    """Validate the spec's calibration set (or ``data``); write result, suite and Data Docs to ``out_dir``."""
    cal = calibration_spec(spec, data)
    calibration = load_calibration(spec, data, skip_unreadable=True)
    references = eval_references(spec, cal)
    coverage = object_coverage(spec, cal, calibration)
    table = sample_table(spec, cal, calibration, coverage)
    checks = build_checks(spec, cal, calibration, table, references, coverage)
    result, context, suite = _run_great_expectations(spec, table, checks)

    failed: list[FailedExpectation] = []
    summarized: set[str] = set()
    # In suite order, so that a summary stands where the first of its checks would.
    for outcome in sorted(result.results, key=lambda o: o.expectation_config.meta["check"]):
        if outcome.success:
            continue
        config = outcome.expectation_config
        check = checks[config.meta["check"]]
        error = _evaluation_error(outcome.exception_info)
        if error is None and check.summary is not None:
            if check.summary in summarized:
                continue
            summarized.add(check.summary)
            details, samples = check.summary, []
        elif error is None:
            details, samples = check.describe(outcome.result)
        else:
            details, samples = f"great-expectations could not evaluate it: {error}", []
        failed.append(FailedExpectation(expectation=config.type, column=config.kwargs.get("column"), details=details, samples=samples))

    report = CalibrationReport(
        passed=bool(result.success),
        samples=calibration.samples,
        sha256=calibration.sha256,
        source=calibration.source,
        failed=failed,
    )
    if out_dir is None:
        return report
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    result_json = atomic_write_json(out_dir / RESULT_FILE, result.to_json_dict(), default=str)
    suite_json = atomic_write_json(out_dir / SUITE_FILE, suite.to_json_dict(), default=str)
    data_docs = _build_data_docs(context, out_dir)
    return report.model_copy(update={"result_json": result_json, "suite_json": suite_json, "data_docs": data_docs})


# ---------------------------------------------------------------- the per-sample table


def channel_axis(input_spec: InputSpec, cal: CalibrationSpec, ndim: int) -> int | None:
    """Where the channels of an image input are, or None when the input is not laid out as images."""
    if ndim != 4 or len(input_spec.shape) != 4:
        return None
    if cal.preprocessing is not None:
        return 3 if cal.preprocessing.layout == "NHWC" else 1
    return _model_channel_axis(input_spec) or 1


def sample_statistics(array: np.ndarray, axis: int | None) -> dict[str, np.ndarray]:
    """Per-sample NaN/Inf counts, min, max, mean, std, and per-channel mean and std.

    NaN is left out of min and max, and NaN and Inf out of mean and std, so that one bad
    value is reported by its own column instead of blanking every other statistic.
    """
    count = len(array)
    channels = array.shape[axis] if axis is not None else 1
    stats = {key: np.empty(count) for key in ("nan", "inf", "min", "max", "mean", "std")}
    for c in range(channels):
        stats[f"c{c}.mean"] = np.empty(count)
        stats[f"c{c}.std"] = np.empty(count)
    for start in range(0, count, STATS_BLOCK):
        block = array[start : start + STATS_BLOCK].astype(np.float64)
        rows = slice(start, start + len(block))
        shaped = np.moveaxis(block, axis, 1) if axis is not None else block[:, None]
        shaped = shaped.reshape(len(block), channels, -1)
        flat = shaped.reshape(len(block), -1)
        finite = np.where(np.isfinite(flat), flat, np.nan)
        finite_channels = np.where(np.isfinite(shaped), shaped, np.nan)
        with np.errstate(all="ignore"), _quiet_empty_slices():
            stats["nan"][rows] = np.isnan(flat).sum(axis=1)
            stats["inf"][rows] = np.isinf(flat).sum(axis=1)
            stats["min"][rows] = np.nanmin(flat, axis=1) if flat.shape[1] else np.nan
            stats["max"][rows] = np.nanmax(flat, axis=1) if flat.shape[1] else np.nan
            stats["mean"][rows] = np.nanmean(finite, axis=1)
            stats["std"][rows] = np.nanstd(finite, axis=1)
            for c in range(channels):
                stats[f"c{c}.mean"][rows] = np.nanmean(finite_channels[:, c], axis=1)
                stats[f"c{c}.std"][rows] = np.nanstd(finite_channels[:, c], axis=1)
    return stats


def _quiet_empty_slices() -> warnings.catch_warnings:
    """numpy warns on all-NaN rows; those rows are reported by the NaN column instead."""
    return warnings.catch_warnings(action="ignore", category=RuntimeWarning)


def sample_table(spec: ModelSpec, cal: CalibrationSpec, calibration: CalibrationSet, coverage: ObjectCoverage | None = None):
    """One row per sample (and per unreadable image file), one column per statistic."""
    import pandas as pd

    readable = calibration.samples
    columns: dict[str, Any] = {SAMPLE_COLUMN: list(calibration.sample_names) + list(calibration.unreadable)}
    unreadable = len(calibration.unreadable)

    def padded(values: Any) -> list[Any]:
        return list(values) + [None] * unreadable

    columns[READABLE_COLUMN] = [1] * readable + [0] * unreadable
    for input_spec in spec.inputs:
        array = calibration.arrays[input_spec.name]
        prefix = input_spec.name
        rank = len(input_spec.shape)
        columns[f"{prefix}.ndim"] = padded([array.ndim] * readable)
        for dim in range(1, rank):
            # Dims of an array of the wrong rank do not line up with the spec's: the rank check
            # reports it, and the dims are left empty (GX skips empty values).
            size = array.shape[dim] if array.ndim == rank else None
            columns[f"{prefix}.dim{dim}"] = padded([size] * readable)
        columns[f"{prefix}.dtype"] = padded([str(array.dtype)] * readable)
        axis = channel_axis(input_spec, cal, array.ndim)
        for key, values in sample_statistics(array, axis).items():
            columns[f"{prefix}.{key}"] = padded(values)

    hashes = _sample_hashes(calibration)
    first_seen: dict[str, int] = {}
    duplicate = []
    for row, digest in enumerate(hashes):
        duplicate.append(int(digest in first_seen))
        first_seen.setdefault(digest, row)
    columns[HASH_COLUMN] = padded(hashes)
    columns[DUPLICATE_COLUMN] = duplicate + [0] * unreadable

    if calibration.labels is not None:
        labels = calibration.labels.astype(np.int64)
        classes, counts = np.unique(labels, return_counts=True)
        per_class = dict(zip(classes.tolist(), counts.tolist()))
        columns[LABEL_COLUMN] = padded(labels.tolist())
        columns[CLASS_COUNT_COLUMN] = padded([per_class[label] for label in labels.tolist()])
    if coverage is not None:
        for index in range(len(coverage.classes)):
            objects = [int(np.sum(labels == index)) for labels in coverage.calibration.labels]
            # An unreadable image adds no objects.
            columns[f"{OBJECTS_PREFIX}{index}"] = objects + [0] * unreadable
    return pd.DataFrame(columns)


# ---------------------------------------------------------------- objects per class (detection)


@dataclass(frozen=True)
class ObjectCoverage:
    """The calibration set's boxes and, per class, how many objects the eval set's ground truth has."""

    calibration: DetectionTruth
    classes: list[str]
    eval_objects: dict[int, int]


def object_coverage(spec: ModelSpec, cal: CalibrationSpec, calibration: CalibrationSet) -> ObjectCoverage | None:
    """Read ``calibration.annotations`` against the eval set's classes; None when the set declares none."""
    if cal.annotations is None:
        return None
    if spec.eval.task is not Task.DETECTION:
        raise CalibrationError(
            STAGE,
            f"calibration.annotations ({cal.annotations}) holds boxes, for a detection model (eval.task: detection), but "
            f"eval.task is {spec.eval.task.value!r}: remove calibration.annotations, or count classes with calibration.labels",
        )
    eval_truth = load_eval_set(spec).truth
    classes = list(eval_truth.classes)
    if cal.annotation_format == "coco":
        names = coco_class_names(cal.annotations, of="calibration")
        if sorted(names) != sorted(classes):
            raise CalibrationError(
                STAGE,
                f"calibration.annotations {cal.annotations} has categories {names}, the eval set's classes are {classes}: "
                "name the calibration set's categories as the eval set's (their ids may differ)",
            )
    # The calibration boxes are read against the eval set's class names, so that class indices agree.
    reading = spec.model_copy(update={"eval": spec.eval.model_copy(update={"classes": classes}), "calibration": cal})
    truth = load_detection_truth(reading, calibration.image_ids, calibration.samples, archive_limits(cal), of="calibration")
    counted = np.bincount(np.concatenate([np.zeros(0, np.int64), *eval_truth.labels]), minlength=len(classes))
    return ObjectCoverage(truth, classes, {index: int(n) for index, n in enumerate(counted.tolist()) if n > 0})


def _sample_hashes(calibration: CalibrationSet) -> list[str]:
    hashes = []
    names = sorted(calibration.arrays)
    for row in range(calibration.samples):
        digest = hashlib.sha256()
        for name in names:
            digest.update(np.ascontiguousarray(calibration.arrays[name][row]).tobytes())
        hashes.append(digest.hexdigest())
    return hashes


# ---------------------------------------------------------------- the eval-set reference


def eval_references(spec: ModelSpec, cal: CalibrationSpec) -> dict[str, InputReference]:
    """Per input and channel, the eval set's statistics, computed the same way as the calibration table's."""
    path = spec.eval.data
    if not path.is_file():
        raise CalibrationError(
            STAGE,
            f"eval data {path} does not exist: the calibration set is compared to it; fix eval.data in the spec",
        )
    stored = load_arrays(path, what="eval data", limits=eval_limits(spec), names={i.name for i in spec.inputs})
    missing = [i.name for i in spec.inputs if i.name not in stored]
    if missing:
        raise CalibrationError(STAGE, f"eval data {path} has no array for input(s) {missing}: save one array per input name")
    references = {}
    for input_spec in spec.inputs:
        array = stored[input_spec.name]
        references[input_spec.name] = input_reference(array, channel_axis(input_spec, cal, array.ndim))
    return references


def input_reference(array: np.ndarray, axis: int | None) -> InputReference:
    """One input's statistics over a reference set (samples on axis 0, channels on ``axis``)."""
    return reference_of(sample_statistics(array, axis))


def reference_of(stats: dict[str, np.ndarray]) -> InputReference:
    """The reference statistics of a set from its per-sample statistics (``sample_statistics``)."""
    channels = []
    c = 0
    while f"c{c}.mean" in stats:
        channels.append(_reference(stats[f"c{c}.mean"], stats[f"c{c}.std"]))
        c += 1
    return InputReference(channels, _reference(stats["mean"], stats["std"]).pooled_std)


def drift_offsets(stats: dict[str, Any], reference: InputReference) -> list[DriftOffset]:
    """Per channel the set has in common with ``reference``: its mean and mean per-sample std against the reference's.

    ``stats`` are per-sample statistics keyed as ``sample_statistics`` keys them (``c0.mean``, ``c0.std``, ...);
    the drift check compares the same column means, through great-expectations.
    """
    offsets = []
    for c, channel in enumerate(reference.channels):
        if f"c{c}.mean" not in stats:
            break
        for statistic, target in (("mean", channel.mean), ("std", channel.mean_of_sample_std)):
            values = np.asarray(stats[f"c{c}.{statistic}"], dtype=np.float64)
            with _quiet_empty_slices():
                observed = float(np.nanmean(values))
            offsets.append(DriftOffset(c, statistic, observed, target, channel.pooled_std))
    return offsets


def _reference(means: np.ndarray, stds: np.ndarray) -> ChannelReference:
    with _quiet_empty_slices():
        mean = float(np.nanmean(means))
        # The variance of all values pooled = mean within-sample variance + variance of sample means.
        pooled = float(np.sqrt(np.nanmean(stds**2) + np.nanvar(means)))
        return ChannelReference(mean=mean, mean_of_sample_std=float(np.nanmean(stds)), pooled_std=pooled)


# ---------------------------------------------------------------- the suite


def expected_range(cal: CalibrationSpec) -> tuple[float, float, str] | None:
    """The value range the model expects, and which spec field says so; None when nothing does."""
    if cal.expected_range is not None:
        low, high = cal.expected_range
        return float(low), float(high), "calibration.expected_range"
    prep = cal.preprocessing
    if prep is None:
        return None
    top = EIGHT_BIT_MAX * prep.scale
    if prep.mean is None:
        return 0.0, top, "calibration.preprocessing (scale)"
    lows = [(0.0 - m) / s for m, s in zip(prep.mean, prep.std)]
    highs = [(top - m) / s for m, s in zip(prep.mean, prep.std)]
    return min(lows), max(highs), "calibration.preprocessing (scale, mean, std)"


def build_checks(
    spec: ModelSpec,
    cal: CalibrationSpec,
    calibration: CalibrationSet,
    table,
    references: dict[str, InputReference],
    coverage: ObjectCoverage | None = None,
) -> list[Check]:
    """The expectation suite for this spec, each expectation with the wording of its failure."""
    import great_expectations.expectations as gxe

    checks: list[Check] = []

    def add(expectation_class: type, description: str, describe: Describe, summary: str | None = None, **kwargs: Any) -> None:
        expectation = expectation_class(meta={"check": len(checks)}, description=description, **kwargs)
        checks.append(Check(expectation, describe, summary))

    add(
        gxe.ExpectTableRowCountToBeBetween,
        f"At least {cal.min_samples} samples (calibration.min_samples).",
        lambda r: (
            f"the set has {r['observed_value']} samples, at least {cal.min_samples} are needed "
            "(calibration.min_samples): add samples drawn from the training data",
            [],
        ),
        min_value=cal.min_samples,
    )
    if calibration.from_images:
        add(
            gxe.ExpectColumnValuesToBeInSet,
            "Every image file can be read.",
            lambda r: (
                f"{r['unexpected_count']} image file(s) cannot be read: "
                + "; ".join(_listed([f"{n} ({calibration.unreadable.get(n, '?')})" for n in _samples(r)]))
                + ". Replace or delete them",
                _samples(r),
            ),
            column=READABLE_COLUMN,
            value_set=[1],
        )
    for input_spec in spec.inputs:
        _add_input_checks(add, gxe, input_spec, cal, calibration, table, references[input_spec.name])

    duplicate_limit = cal.max_duplicate_ratio
    add(
        gxe.ExpectColumnValuesToBeInSet,
        f"At most {duplicate_limit:.1%} of samples repeat an earlier one (calibration.max_duplicate_ratio).",
        lambda r: (
            f"{r['unexpected_count']} samples repeat an earlier sample ({r['unexpected_percent']:.1f}% of the set, "
            f"allowed {duplicate_limit:.1%} by calibration.max_duplicate_ratio): "
            + ", ".join(_listed([f"{name} = {first}" for name, first in _duplicate_pairs(table, _samples(r))]))
            + "; remove the repeats or draw more distinct samples",
            _samples(r),
        ),
        column=DUPLICATE_COLUMN,
        value_set=[0],
        mostly=1.0 - duplicate_limit,
    )
    if calibration.labels is not None:
        _add_label_checks(add, gxe, spec, cal, table)
    if coverage is not None:
        _add_object_checks(add, gxe, cal, coverage)
    return checks


def _add_input_checks(
    add: Callable[..., None],
    gxe: Any,
    input_spec: InputSpec,
    cal: CalibrationSpec,
    calibration: CalibrationSet,
    table,
    reference: InputReference,
) -> None:
    name = input_spec.name
    rank = len(input_spec.shape)
    shape_text = _shape_text(input_spec)
    array_shape = calibration.arrays[name].shape
    layout_mistake = _layout_mistake(input_spec, cal, calibration, array_shape)
    size_mistake = None if layout_mistake else _image_size_mistake(input_spec, cal, calibration, array_shape)
    add(
        gxe.ExpectColumnValuesToBeInSet,
        f"'{name}' has the spec's rank {rank} (shape {shape_text}, samples on the first axis).",
        lambda r: (
            f"'{name}' has rank {_observed(r)}, the spec's shape {shape_text} has rank {rank}: stack the samples "
            f"on the first (batch) axis so the array has shape (samples, {', '.join(str(d) for d in input_spec.shape[1:])})",
            _samples(r),
        ),
        column=f"{name}.ndim",
        value_set=[rank],
    )
    channels = _model_channel_axis(input_spec)
    spatial = _spatial_axes(channels) if channels is not None else ()
    for dim in range(1, rank):
        declared = input_spec.shape[dim]
        if isinstance(declared, int):
            low = high = declared
            allowed = str(declared)
        else:
            low, high = input_spec.dynamic[declared].min, input_spec.dynamic[declared].max
            allowed = f"{low}..{high} (dynamic '{declared}')"
        add(
            gxe.ExpectColumnValuesToBeBetween,
            f"Dim {dim} of '{name}' is {allowed}.",
            lambda r, dim=dim, allowed=allowed: (
                f"dim {dim} of '{name}' is {_observed(r)}, the spec's shape {shape_text} allows {allowed}: "
                "check the layout (NCHW/NHWC), image size and channel count of the set",
                _samples(r),
            ),
            summary=layout_mistake or (size_mistake if dim in spatial else None),
            column=f"{name}.dim{dim}",
            min_value=low,
            max_value=high,
        )
    add(
        gxe.ExpectColumnValuesToBeInSet,
        f"'{name}' is {input_spec.dtype}.",
        lambda r: (
            f"'{name}' is {_observed(r)}, the spec's input is {input_spec.dtype}: "
            f"save the array as {input_spec.dtype} (array.astype('{input_spec.dtype}'))",
            _samples(r),
        ),
        column=f"{name}.dtype",
        value_set=[input_spec.dtype],
    )
    for kind, word in (("nan", "NaN"), ("inf", "Inf")):
        add(
            gxe.ExpectColumnValuesToBeBetween,
            f"No {word} in '{name}'.",
            lambda r, word=word: (
                f"{r['unexpected_count']} samples of '{name}' contain {word} values: "
                + ", ".join(_listed(_samples(r)))
                + "; fix or drop them",
                _samples(r),
            ),
            column=f"{name}.{kind}",
            max_value=0,
        )

    is_float = input_spec.dtype.startswith("float")
    declared_range = expected_range(cal) if is_float else None
    if declared_range is not None:
        low, high, source = declared_range
        slack = RANGE_SLACK_FRACTION * max(high - low, 1e-12)
        add(
            gxe.ExpectColumnValuesToBeBetween,
            f"Values of '{name}' are >= {low:g} ({source}).",
            lambda r: (
                f"{r['unexpected_count']} samples of '{name}' have values below {low:g} (down to "
                f"{min(_values(r)):g}), outside [{low:g}, {high:g}] from {source}: "
                "apply the model's preprocessing before saving the set, or fix the declared range",
                _samples(r),
            ),
            column=f"{name}.min",
            min_value=low - slack,
        )
        add(
            gxe.ExpectColumnValuesToBeBetween,
            f"Values of '{name}' are <= {high:g} ({source}).",
            lambda r: (_above_range_details(name, r, low, high, source), _samples(r)),
            column=f"{name}.max",
            max_value=high + slack,
        )
        spread, spread_source = high - low, f"the range [{low:g}, {high:g}]"
    else:
        spread, spread_source = reference.pooled_std, "the eval set's std"
    near_constant = NEAR_CONSTANT_FRACTION * spread
    constant_limit = cal.max_constant_ratio
    add(
        gxe.ExpectColumnValuesToBeBetween,
        f"At most {constant_limit:.1%} of samples of '{name}' are near-constant (std < {near_constant:.3g}).",
        lambda r: (
            f"{r['unexpected_count']} samples of '{name}' are near-constant (std below {near_constant:.3g}, "
            f"{NEAR_CONSTANT_FRACTION:.0%} of {spread_source}), {r['unexpected_percent']:.1f}% of the set where "
            f"calibration.max_constant_ratio allows {constant_limit:.1%}: "
            + ", ".join(_listed(_samples(r)))
            + "; remove blank or constant samples",
            _samples(r),
        ),
        column=f"{name}.std",
        min_value=near_constant,
        mostly=1.0 - constant_limit,
    )

    tolerance = cal.distribution_tolerance
    keys = [f"c{c}.{statistic}" for c in range(len(reference.channels)) for statistic in ("mean", "std")]
    offsets = drift_offsets({k: table[f"{name}.{k}"].to_numpy(dtype=np.float64) for k in keys if f"{name}.{k}" in table.columns}, reference)
    drift_summary = layout_mistake or _scale_mistake(name, cal, calibration, offsets)
    for drift in offsets:
        band = tolerance * drift.pooled_std
        what = "mean" if drift.statistic == "mean" else "mean per-sample std"
        add(
            gxe.ExpectColumnMeanToBeBetween,
            f"Channel {drift.channel} {what} of '{name}' is within {tolerance:g} eval-set std of the eval set's {drift.target:.4g}.",
            lambda r, c=drift.channel, what=what, target=drift.target, band=band: (
                f"channel {c} {what} of '{name}' is {r['observed_value']:.4g}, the eval set's is {target:.4g}: "
                f"off by more than {band:.3g} (calibration.distribution_tolerance {tolerance:g} x the eval set's "
                f"std {band / tolerance:.3g}); the calibration set does not look like the eval data, check its "
                "source and preprocessing",
                [],
            ),
            summary=drift_summary,
            column=f"{name}.c{drift.channel}.{drift.statistic}",
            min_value=drift.target - band,
            max_value=drift.target + band,
        )
    for drift in offsets:
        if drift.statistic != "std" or drift.target <= 0:
            continue
        add(
            gxe.ExpectColumnMeanToBeBetween,
            f"Channel {drift.channel} mean per-sample std of '{name}' is within {SPREAD_FACTOR:g}x of the eval set's {drift.target:.4g}.",
            lambda r, c=drift.channel, target=drift.target: (
                f"channel {c} mean per-sample std of '{name}' is {r['observed_value']:.4g}, {r['observed_value'] / target:.3g}x "
                f"the eval set's {target:.4g} (at most {SPREAD_FACTOR:g}x either way): the values are in other units than "
                "the eval set's, check the scale and mean/std the set was preprocessed with",
                [],
            ),
            summary=drift_summary,
            column=f"{name}.c{drift.channel}.std",
            min_value=drift.target / SPREAD_FACTOR,
            max_value=drift.target * SPREAD_FACTOR,
        )


# ---------------------------------------------------------------- known mistakes, named


def _model_channel_axis(input_spec: InputSpec) -> int | None:
    """Where the spec's shape puts the channels of an image input (1: NCHW, 3: NHWC); None when it cannot tell."""
    if len(input_spec.shape) != 4:
        return None
    first, last = input_spec.shape[1], input_spec.shape[3]
    first_is_channels = isinstance(first, int) and first in IMAGE_CHANNELS
    last_is_channels = isinstance(last, int) and last in IMAGE_CHANNELS
    if first_is_channels and not last_is_channels:
        return 1
    if last_is_channels and not first_is_channels:
        return 3
    return None


def _spatial_axes(channel_axis: int) -> tuple[int, int]:
    """Height and width axes of an image batch whose channels are on ``channel_axis`` (1: NCHW, 3: NHWC)."""
    return (2, 3) if channel_axis == 1 else (1, 2)


def _fits(input_spec: InputSpec, axis: int, size: int) -> bool:
    declared = input_spec.shape[axis]
    if isinstance(declared, int):
        return declared == size
    return input_spec.dynamic[declared].min <= size <= input_spec.dynamic[declared].max


def _shape_text(input_spec: InputSpec) -> str:
    return "[" + ", ".join(str(d) for d in input_spec.shape) + "]"


def _layout_mistake(input_spec: InputSpec, cal: CalibrationSpec, calibration: CalibrationSet, shape: tuple[int, ...]) -> str | None:
    """The set holds the model's images with the channels on the other side (NHWC for NCHW, or the reverse)."""
    axis = _model_channel_axis(input_spec)
    if axis is None or len(shape) != 4:
        return None
    channels, other = input_spec.shape[axis], 4 - axis
    if shape[axis] == channels or shape[other] != channels:
        return None
    model_hw, set_hw = _spatial_axes(axis), _spatial_axes(other)
    if not all(_fits(input_spec, m, shape[s]) for m, s in zip(model_hw, set_hw)):
        return None
    want, have = ("NCHW", "NHWC") if axis == 1 else ("NHWC", "NCHW")
    order = (0, 3, 1, 2) if axis == 1 else (0, 2, 3, 1)
    found = (
        f"'{input_spec.name}' is laid out {have} {tuple(shape)} where the model takes {want} "
        f"{tuple(shape[i] for i in order)} (shape {_shape_text(input_spec)})"
    )
    if calibration.from_images:
        layout = cal.preprocessing.layout if cal.preprocessing else "NCHW"
        return f"{found}: calibration.preprocessing.layout is {layout}, set it to {want}"
    return f"{found}: transpose the set (array.transpose{order}) before saving calibration.data"


def _image_size_mistake(input_spec: InputSpec, cal: CalibrationSpec, calibration: CalibrationSet, shape: tuple[int, ...]) -> str | None:
    """An image folder read at another size than the model input's: the fix is calibration.preprocessing.resize."""
    axis = _model_channel_axis(input_spec)
    if not calibration.from_images or axis is None or len(shape) != 4:
        return None
    spatial = _spatial_axes(axis)
    if all(_fits(input_spec, a, shape[a]) for a in spatial):
        return None
    opt = input_spec.shape_at("opt")
    (height, width), (model_height, model_width) = (shape[a] for a in spatial), (opt[a] for a in spatial)
    resize = cal.preprocessing.resize if cal.preprocessing else None
    if resize is None:
        cause = f"the images are {height}x{width} (height x width) and calibration.preprocessing.resize is unset"
    else:
        cause = f"calibration.preprocessing.resize [{resize[0]}, {resize[1]}] makes the images {height}x{width} (height x width)"
    return (
        f"{cause}, but input '{input_spec.name}' takes {model_height}x{model_width} (shape {_shape_text(input_spec)}): "
        f"set calibration.preprocessing.resize to [{model_height}, {model_width}]"
    )


def _scale_mistake(name: str, cal: CalibrationSpec, calibration: CalibrationSet, offsets: list[DriftOffset]) -> str | None:
    """Every channel's spread is about 255x (or 1/255 of) the eval set's: a scale or mean/std in the wrong units."""
    spreads = [d for d in offsets if d.statistic == "std" and d.target > 0]
    if not spreads or not all(d.observed > 0 for d in spreads):
        return None
    ratios = [d.observed / d.target for d in spreads]
    figures = ", ".join(f"{d.observed:.3g} vs {d.target:.3g}" for d in spreads)

    def found(factor: str) -> str:
        return f"'{name}' spreads about {factor} the eval set's (mean per-sample std per channel {figures})"

    # Images are read with the spec's preprocessing or its defaults; arrays come ready-made.
    prep = (cal.preprocessing or Preprocessing()) if calibration.from_images else None
    if all(abs(math.log(r / EIGHT_BIT_MAX)) < math.log(UNITS_SLACK) for r in ratios):
        spread = found(f"{statistics.median(ratios):.0f}x")
        if prep is not None and prep.scale * EIGHT_BIT_MAX > UNITS_SLACK:
            return (
                f"{spread}: calibration.preprocessing.scale is {prep.scale:g}, which leaves the pixels in 0-255 where the eval "
                f"set's were scaled to 0-1: set calibration.preprocessing.scale to {1 / EIGHT_BIT_MAX:.10g} (1/255)"
            )
        if prep is None:
            return (
                f"{spread}: it holds 0-255 pixel values where the model takes them scaled by 1/255: divide the pixels by 255 "
                "(before any mean/std normalisation) and save calibration.data again"
            )
        return None
    if all(abs(math.log(r * EIGHT_BIT_MAX)) < math.log(UNITS_SLACK) for r in ratios):
        spread = found(f"1/{1 / statistics.median(ratios):.0f} of")
        if prep is not None and prep.mean is not None and max(prep.mean) > 1.0:
            mean = [round(m * prep.scale, 4) for m in prep.mean]
            std = [round(v * prep.scale, 4) for v in prep.std]
            return (
                f"{spread}: calibration.preprocessing.mean {prep.mean} and std {prep.std} are in 0-255 units, but scale "
                f"{prep.scale:g} brings the pixels to 0-1 before they are normalised: give them in 0-1 units "
                f"(mean: {mean}, std: {std})"
            )
        if prep is None:
            return (
                f"{spread}: it was scaled by 1/255 once too often, or normalised with a mean/std in 0-255 units on 0-1 "
                "pixels: preprocess it as the eval set was and save calibration.data again"
            )
    return None


def _above_range_details(name: str, result: dict[str, Any], low: float, high: float, source: str) -> str:
    top = max(_values(result))
    message = (
        f"{result['unexpected_count']} samples of '{name}' have values above {high:g} (up to {top:g}), "
        f"outside [{low:g}, {high:g}] from {source}"
    )
    if math.isfinite(top) and top >= 2 * max(abs(low), abs(high), 1.0):
        return (
            message + f": the set looks unnormalized (raw pixel values up to {top:g} where [{low:g}, {high:g}] is "
            "expected); scale and normalize it as the model's preprocessing does, or declare "
            "calibration.preprocessing for an image folder"
        )
    return message + ": apply the model's preprocessing before saving the set, or fix the declared range"


def _add_label_checks(add: Callable[..., None], gxe: Any, spec: ModelSpec, cal: CalibrationSpec, table) -> None:
    classes = _eval_classes(spec)
    if classes is not None:
        add(
            gxe.ExpectColumnValuesToBeInSet,
            "Every label is one of the eval set's classes.",
            lambda r: (
                f"{r['unexpected_count']} samples have labels {sorted({int(v) for v in _values(r)})} that are not "
                f"classes of the eval set ({spec.eval.data}): fix the labels",
                _samples(r),
            ),
            column=LABEL_COLUMN,
            value_set=classes,
        )
    if cal.min_per_class == 0:
        return
    if classes is not None:
        add(
            gxe.ExpectColumnDistinctValuesToContainSet,
            "Every class of the eval set has calibration samples.",
            lambda r: (
                f"classes {_missing_classes(classes, table)} have no samples: "
                f"add at least {cal.min_per_class} samples of each (calibration.min_per_class)",
                [],
            ),
            column=LABEL_COLUMN,
            value_set=classes,
        )
    add(
        gxe.ExpectColumnValuesToBeBetween,
        f"Every class has at least {cal.min_per_class} samples (calibration.min_per_class).",
        lambda r: (
            "classes "
            + ", ".join(f"{label} ({count} samples)" for label, count in _under_represented(table, _samples(r)))
            + f" have fewer than {cal.min_per_class} samples (calibration.min_per_class): add samples of those classes",
            _samples(r),
        ),
        column=CLASS_COUNT_COLUMN,
        min_value=cal.min_per_class,
    )


def _add_object_checks(add: Callable[..., None], gxe: Any, cal: CalibrationSpec, coverage: ObjectCoverage) -> None:
    """Per class of the eval set's ground truth: at least min_per_class annotated objects in the calibration set."""
    if cal.min_per_class == 0:
        return
    wanted = cal.min_per_class
    for index, eval_count in coverage.eval_objects.items():
        name = coverage.classes[index]
        named = f"class {index} {name!r}"
        add(
            gxe.ExpectColumnSumToBeBetween,
            f"At least {wanted} objects of {named} (calibration.min_per_class), counted in calibration.annotations.",
            lambda r, name=name, named=named, eval_count=eval_count: (
                (
                    f"{named} has no objects in the calibration set (calibration.annotations {cal.annotations}), where the "
                    f"eval set's ground truth has {eval_count}"
                    if not r["observed_value"]
                    else f"{named} has {_plain(r['observed_value'])} objects in the calibration set, fewer than "
                    f"calibration.min_per_class {wanted} (the eval set's ground truth has {eval_count})"
                )
                + f": add images holding at least {wanted} {name!r} objects to calibration.data, "
                "with their boxes in calibration.annotations",
                [],
            ),
            column=f"{OBJECTS_PREFIX}{index}",
            min_value=wanted,
        )


def _eval_classes(spec: ModelSpec) -> list[int] | None:
    if spec.eval.labels is None:
        return None
    stored = load_arrays(spec.eval.data, what="eval data", limits=eval_limits(spec), names={spec.eval.labels})
    if spec.eval.labels not in stored:
        return None
    return sorted(int(v) for v in np.unique(stored[spec.eval.labels]))


# ---------------------------------------------------------------- wording failures


def _samples(result: dict[str, Any]) -> list[str]:
    return [str(entry[SAMPLE_COLUMN]) for entry in result.get("unexpected_index_list") or []]


def _values(result: dict[str, Any]) -> list[Any]:
    return list(result.get("unexpected_list") or [])


def _observed(result: dict[str, Any]) -> str:
    values = sorted({_plain(v) for v in _values(result)}, key=str)
    return " or ".join(str(v) for v in values) if values else "missing"


def _plain(value: Any) -> Any:
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _listed(items: list[Any]) -> list[Any]:
    if len(items) <= LISTED_IN_DETAILS:
        return items
    return items[:LISTED_IN_DETAILS] + [f"... {len(items) - LISTED_IN_DETAILS} more"]


def _duplicate_pairs(table, samples: list[str]) -> list[tuple[str, str]]:
    first_by_hash: dict[str, str] = {}
    for name, digest in zip(table[SAMPLE_COLUMN], table[HASH_COLUMN]):
        if digest is not None:
            first_by_hash.setdefault(digest, name)
    hash_by_name = dict(zip(table[SAMPLE_COLUMN], table[HASH_COLUMN]))
    return [(name, first_by_hash[hash_by_name[name]]) for name in samples]


def _missing_classes(classes: list[int], table) -> list[int]:
    present = {int(v) for v in table[LABEL_COLUMN].dropna()}
    return [c for c in classes if c not in present]


def _under_represented(table, samples: list[str]) -> list[tuple[int, int]]:
    rows = table[table[SAMPLE_COLUMN].isin(samples)]
    pairs = {(int(label), int(count)) for label, count in zip(rows[LABEL_COLUMN], rows[CLASS_COUNT_COLUMN])}
    return sorted(pairs)


# ---------------------------------------------------------------- great-expectations


def _import_great_expectations():
    # GX is used offline: no usage statistics, no progress bars, only its warnings in the log.
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    import great_expectations as gx

    logging.getLogger("great_expectations").setLevel(logging.WARNING)
    return gx


def _run_great_expectations(spec: ModelSpec, table, checks: list[Check]):
    gx = _import_great_expectations()
    from great_expectations.data_context.types.base import (
        DataContextConfig,
        InMemoryStoreBackendDefaults,
        ProgressBarsConfig,
    )

    config = DataContextConfig(
        store_backend_defaults=InMemoryStoreBackendDefaults(init_temp_docs_sites=False),
        analytics_enabled=False,
        progress_bars=ProgressBarsConfig(globally=False),
    )
    context = gx.get_context(mode="ephemeral", project_config=config)
    batch = (
        context.data_sources.add_pandas(f"{spec.name}-calibration")
        .add_dataframe_asset("samples")
        .add_batch_definition_whole_dataframe("all samples")
    )
    suite = context.suites.add(gx.ExpectationSuite(name=f"{spec.name}-calibration"))
    for check in checks:
        suite.add_expectation(check.expectation)
    validation = context.validation_definitions.add(gx.ValidationDefinition(name=f"{spec.name}-calibration", data=batch, suite=suite))
    result = validation.run(
        batch_parameters={"dataframe": table},
        result_format={"result_format": "COMPLETE", "unexpected_index_column_names": [SAMPLE_COLUMN]},
    )
    return result, context, suite


def _evaluation_error(exception_info: dict[str, Any] | None) -> str | None:
    """The message of an exception raised while evaluating an expectation, if there was one."""
    if not exception_info:
        return None
    # One record, or one record per metric that was computed for the expectation.
    records = [exception_info] if "raised_exception" in exception_info else list(exception_info.values())
    messages = [str(r.get("exception_message")) for r in records if isinstance(r, dict) and r.get("raised_exception")]
    return "; ".join(messages) or None


def _build_data_docs(context, out_dir: Path) -> Path:
    target = out_dir / DATA_DOCS_DIR
    with atomic_directory(target, replace=True) as partial:
        context.add_data_docs_site(
            "calibration",
            {
                "class_name": "SiteBuilder",
                "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(partial)},
                "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
            },
        )
        context.build_data_docs(site_names=["calibration"])
    return target / "index.html"
