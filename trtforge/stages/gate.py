"""Stage 'gate': is a built engine as good as the model it came from, and no worse than what is published?

Thresholds come from three layers, later ones winning: the per-precision defaults below,
the spec's ``gate`` section, the target's own ``gate`` section. The defaults, and why:

- fp32: top-1 agreement >= 0.999 with the PyTorch FP32 reference and cosine >= 0.9999. The
  engine computes the same function; only kernel order and fusion change the rounding.
- fp16/bf16: cosine >= 0.999 and agreement >= 0.99: half precision keeps ~3 significant digits,
  which moves only near-tie decisions.
- int8/fp8: top-1 accuracy may drop at most 1.0 point and cosine >= 0.98: quantization error
  is real; the user cares about the task metric, not bit-exactness.
- every precision: no NaN/Inf in any output, and no more than 0.5 point of the task metric lost
  against the last published version of the same target.
- embeddings, int8/fp8: recall@k >= 0.90 against the reference's neighbours. Cosine 0.98 still
  lets close neighbours swap; 0.90 allows one in ten of the top-k to change (int8 MiniLM gave
  0.836, one in six: search results a user would notice).

Detection and segmentation are judged on their task metric, never element by element: boxes
dominate a detector's output, so a detector whose class scores are all zero still has cosine
0.9999994 to its reference, and the same detections in another order have cosine 0.44.

- detection: COCO mAP@[.5:.95] at most 0.2 point (fp32), 0.5 point (fp16/bf16) or 1.5 points
  (int8/fp8) below the FP32 reference on the same images; no class's AP more than 1, 2 or 5
  points below its reference AP (one collapsed class cannot hide in the mean); the mAP of the
  engine's detections against the reference's confident detections >= 0.95 (fp32) or 0.90
  (fp16/bf16): the same function must find the same boxes.
- segmentation: mIoU at most 0.2, 0.5 or 1.0 point below the reference, no class's IoU more
  than 1, 2 or 5 points below its reference IoU, and pixel agreement with the reference
  >= 0.999 (fp32) or 0.995 (fp16/bf16).

Resolution. Every proportion and task score carries its sample count and 95% interval as flat
keys beside it (``accuracy.n``, ``accuracy.ci_low``, ``accuracy.ci_high``): Wilson intervals for
accuracy, top-5 accuracy and agreement (n = samples), a bootstrap over the eval images for mAP,
mIoU and pixel agreement (n = images) and over the queries for recall@k (``trtforge.intervals``).
The mAP bootstrap runs faster-coco-eval itself on each resample, which is what bounds its count:
on the 2-core development machine, 100 images of ~2.5 boxes and ~50 detections each, one
evaluation cost 110 ms quiet (about 80 of it in faster-coco-eval's Python loaders) and 150-300 ms
while the machine was shared (load 1.4-5). DETECTION_RESAMPLES = 16 adds ~1.8 s quiet and ~2.5 s
at load 1.4, inside the ~3 s a 100-image gate may spend; it grows with the images (300: ~3x).
Only the engine's ``map`` is resampled: the reference's and ``agreement_map`` would triple it.
Sixteen resamples pin the standard error to about +-18% (1/sqrt(2 * 15)), which is why every
interval is value +- 1.96 bootstrap standard errors, not bootstrap percentiles (those would rest
on the one or two most extreme resamples). mIoU and pixel agreement are sums of per-image
confusion matrices, so a resample costs well under 1 ms (``resampling_statistic``) and
SEGMENTATION_RESAMPLES = 1000 costs ~0.8 s in all on 100 64x64 images, matrices included.

A threshold the eval set cannot resolve is named in the notes: an allowed drop (max_accuracy_drop,
max_map_drop, max_miou_drop, and regression_tolerance where a release is compared) smaller than
the metric's interval half-width, or for accuracy smaller than 1/n (100 samples and a 1-point drop
allow one net flipped prediction); an agreement floor whose slack 1 - min_agreement is below 1/n
(it then allows no disagreement at all). The interval half-width is the metric's own, a bound on
how far another draw of n samples could move it; the drop against the reference on the same
samples varies less, so the warning errs towards asking for more samples. ``strict_resolution``
makes each a failure naming the threshold, n and the n that would resolve it (intervals narrow
as 1/sqrt(n)).

Near ties. A classification disagreement where the FP32 reference's own top-2 softmax gap is
below ``near_tie_margin`` (default NEAR_TIE_MARGIN, 0.02) is a near-tie flip: the reference was
undecided there, and with the two classes holding most of the probability a gap of 0.02 is a
logit difference of ~0.04, about twice what fp16 rounding moves logits of magnitude ~10 by.
``near_tie_flips`` and ``real_flips`` count them apart; min_agreement is judged on
``agreement_excluding_near_ties`` (near-tie flips counted as agreeing, over all n samples), so a
gate does not fail on flips of decisions the reference itself barely made, while ``agreement``
keeps every flip and the notes say how many were near ties. Accuracy thresholds are not excused:
accuracy is judged against the labels, and near-tie flips gain accuracy as often as they lose it,
so a drop they cause is noise the resolution warning is about. Near ties cannot hide a broken
engine: its cosine to the reference fails first, and a reference that is undecided everywhere
fails its accuracy.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
from pydantic import BaseModel

from trtforge import speed
from trtforge.backends.base import Runner
from trtforge.detection import agreement_metrics, detection_metrics, resampled_map
from trtforge.environment import cpu_model, worker_cores
from trtforge.errors import StageError
from trtforge.evalset import EvalSet, eval_batch_size
from trtforge.groundtruth import DetectionTruth, SegmentationTruth, Truth
from trtforge.intervals import bootstrap_metrics, proportion_metrics, samples_to_resolve, softmax_margin
from trtforge.outputs import Outputs, PerImage, collect_outputs, count_nonfinite
from trtforge.postprocess import decode_all
from trtforge.profiles import derive_profiles
from trtforge.segmentation import label_maps, pixel_agreement, resampling_statistic, segmentation_metrics
from trtforge.spec import GateThresholds, ModelSpec, Precision, Target, Task

DEFAULT_THRESHOLDS: dict[Precision, GateThresholds] = {
    Precision.FP32: GateThresholds(
        min_agreement=0.999,
        min_cosine=0.9999,
        regression_tolerance=0.005,
        max_map_drop=0.002,
        max_class_ap_drop=0.01,
        min_agreement_map=0.95,
        max_miou_drop=0.002,
        max_class_iou_drop=0.01,
        min_pixel_agreement=0.999,
    ),
    Precision.FP16: GateThresholds(
        min_agreement=0.99,
        min_cosine=0.999,
        regression_tolerance=0.005,
        max_map_drop=0.005,
        max_class_ap_drop=0.02,
        min_agreement_map=0.90,
        max_miou_drop=0.005,
        max_class_iou_drop=0.02,
        min_pixel_agreement=0.995,
    ),
    Precision.INT8: GateThresholds(
        max_accuracy_drop=0.01,
        min_cosine=0.98,
        min_recall_at_k=0.90,
        regression_tolerance=0.005,
        max_map_drop=0.015,
        max_class_ap_drop=0.05,
        max_miou_drop=0.01,
        max_class_iou_drop=0.05,
    ),
}
DEFAULT_THRESHOLDS[Precision.BF16] = DEFAULT_THRESHOLDS[Precision.FP16]
DEFAULT_THRESHOLDS[Precision.FP8] = DEFAULT_THRESHOLDS[Precision.INT8]
# Bootstrap resamples per gate (module docstring: each costs one evaluation of the metric).
DETECTION_RESAMPLES = 16
SEGMENTATION_RESAMPLES = 1000
RECALL_RESAMPLES = 1000
NEAR_TIE_MARGIN = 0.02
# Metrics whose value moves in steps of 1/n: one sample more or less.
COUNTED_METRICS = ("accuracy", "agreement", "top5_accuracy")
# (allowed-drop threshold, the metric it bounds); regression_tolerance is checked against the task metric.
RESOLVED_DROPS = (("max_accuracy_drop", "accuracy"), ("max_map_drop", "map"), ("max_miou_drop", "miou"))
STAGE = "gate"
LATENCY_WARMUP = 5
LATENCY_ITERATIONS = 50
# The opt shape is timed for about this long (never fewer than LATENCY_MIN_RUNS runs): ResNet-50 fp32 at
# batch 8 takes ~0.4 s a call on two cores, so 50 runs alone were 20 s of a run; fast engines still get 50.
LATENCY_BUDGET_MS = 3000.0
LATENCY_MIN_RUNS = 10
# The max batch is timed for about this long at most (never fewer than MAX_BATCH_MIN_RUNS runs): a big
# model at its max batch can take a second a call on a CPU, and 50 such calls would make the timing the
# slowest part of the gate; the digits CNN at batch 128 still gets all 50 runs in a few milliseconds.
MAX_BATCH_BUDGET_MS = 1000.0
MAX_BATCH_MIN_RUNS = 5
# Untimed calls before the max batch is timed: one, then two whose times size the timed runs.
MAX_BATCH_WARMUP = 3
# Above this (p90 - p10) / median the report flags a latency figure as noisy.
NOISY_SPREAD = 0.10


class PreviousRelease(BaseModel):
    version: int
    metrics: dict[str, float]


class GateResult(BaseModel):
    tag: str
    passed: bool
    task_metric: str
    metrics: dict[str, float]
    thresholds: dict[str, float]
    failures: list[str]
    previous_version: int | None = None
    notes: list[str] = []


def effective_thresholds(spec: ModelSpec, target: Target) -> GateThresholds:
    merged: dict[str, Any] = DEFAULT_THRESHOLDS[target.precision].model_dump()
    for layer in (spec.gate, target.gate):
        merged.update({k: v for k, v in layer.model_dump().items() if v is not None})
    return GateThresholds(**merged)


def run_eval(spec: ModelSpec, runner: Runner, evalset: EvalSet) -> Outputs:
    return collect_outputs(spec, evalset.batches(eval_batch_size(spec)), runner.run, STAGE)


def max_batch(spec: ModelSpec, target: Target) -> int | None:
    """The largest batch the target's profiles take, where every input's leading dim is one dynamic (batch) dim."""
    leading = {inp.shape[0] for inp in spec.inputs}
    if len(leading) != 1 or not isinstance(next(iter(leading)), str):
        return None
    return max(profile.inputs[0].max[0] for profile in derive_profiles(spec, target))


def _tiled(spec: ModelSpec, evalset: EvalSet, batch: int | None) -> dict[str, np.ndarray]:
    """Eval samples repeated to fill ``batch`` (default: each input's opt shape's leading dim)."""
    feeds = {}
    for inp in spec.inputs:
        source = evalset.inputs[inp.name]
        size = inp.shape_at("opt")[0] if batch is None else batch
        feeds[inp.name] = np.resize(source, (size, *source.shape[1:])).astype(source.dtype)
    return feeds


def _spread(times: list[float]) -> float:
    """(p90 - p10) / median: how far apart the middle 80 % of the runs lie, relative to the median."""
    p10, median, p90 = np.percentile(times, [10, 50, 90])
    return float((p90 - p10) / median) if median > 0 else 0.0


def measure_latency(spec: ModelSpec, runner: Runner, evalset: EvalSet, largest_batch: int | None = None) -> dict[str, float]:
    """Latency of one call at the opt shape and throughput there and at ``largest_batch`` (eval samples tiled to
    fill each), by the runner's own clock (CUDA events for TensorRT, perf_counter for onnxruntime); with each
    figure its timed runs, warm-up calls and spread. Throughput is the batch over the median call time."""
    feeds = _tiled(spec, evalset, None)
    opt_batch = next(iter(feeds.values())).shape[0]
    times = _timed_within(runner, feeds, LATENCY_WARMUP, LATENCY_BUDGET_MS, LATENCY_MIN_RUNS)
    median = float(np.median(times))
    metrics = {
        "latency_ms_median": median,
        "latency_ms_p99": float(np.percentile(times, 99)),
        "latency_spread": _spread(times),
        "latency_runs": float(len(times)),
        "latency_warmup": float(LATENCY_WARMUP),
        speed.OPT_BATCH: float(opt_batch),
        speed.THROUGHPUT_OPT: opt_batch * 1000 / median,
    }
    if largest_batch is None or largest_batch == opt_batch:
        return metrics
    feeds = _tiled(spec, evalset, largest_batch)
    times = _timed_within(runner, feeds, MAX_BATCH_WARMUP, MAX_BATCH_BUDGET_MS, MAX_BATCH_MIN_RUNS)
    median = float(np.median(times))
    metrics |= {
        speed.MAX_BATCH: float(largest_batch),
        "max_batch_ms_median": median,
        "max_batch_spread": _spread(times),
        "max_batch_runs": float(len(times)),
        "max_batch_warmup": float(MAX_BATCH_WARMUP),
        speed.THROUGHPUT_MAX: largest_batch * 1000 / median,
    }
    return metrics


def _timed_within(runner: Runner, feeds: dict[str, np.ndarray], untimed: int, budget_ms: float, min_runs: int) -> list[float]:
    """``untimed`` calls, the last two of which size the timed runs: as many as fit in ``budget_ms``, within
    [min_runs, LATENCY_ITERATIONS]."""
    probe = runner.time_ms(feeds, warmup=untimed - 2, iterations=2)
    runs = int(np.clip(budget_ms // max(float(np.median(probe)), 1e-3), min_runs, LATENCY_ITERATIONS))
    return runner.time_ms(feeds, warmup=0, iterations=runs)


def noisy_timing_notes(metrics: dict[str, float]) -> list[str]:
    """A spread above NOISY_SPREAD: the machine was not quiet while the engine was timed, and the median may be off."""
    return [
        f"{what} spread {metrics[key]:.0%} (p10 to p90 over the median) is above {NOISY_SPREAD:.0%}: the figure is noisy"
        for key, what in (("latency_spread", "latency"), ("max_batch_spread", "max-batch time"))
        if metrics.get(key, 0.0) > NOISY_SPREAD
    ]


def timing_conditions() -> dict[str, Any]:
    """What a latency figure was measured on, recorded beside it: the CPU, the cores this process may use,
    and the load average at the time (the GPU, for a GPU engine, is in its build record)."""
    return {
        "cpu_model": cpu_model(),
        "cpu_threads": worker_cores(),
        "load_average_1m": round(os.getloadavg()[0], 2),
    }


def latency_failures(metrics: dict[str, float], thresholds: GateThresholds) -> list[str]:
    """``max_latency_ms``: the target's own median latency at the opt shape; rules across targets are
    ``trtforge.stages.latency_gate``'s."""
    ceiling, latency = thresholds.max_latency_ms, metrics.get("latency_ms_median")
    if ceiling is None or latency is None or latency <= ceiling:
        return []
    return [f"median latency {latency:.3g} ms at the opt shape > max_latency_ms {ceiling:g}"]


def _cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a.reshape(len(a), -1).astype(np.float64)
    b = b.reshape(len(b), -1).astype(np.float64)
    denominator = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return np.sum(a * b, axis=1) / np.maximum(denominator, 1e-12)


def _recall_at_k(candidate: np.ndarray, reference: np.ndarray, k: int) -> np.ndarray:
    """Per query: the share of its reference top-k nearest neighbours (cosine) that the candidate embeddings also retrieve."""

    def neighbours(x: np.ndarray) -> np.ndarray:
        x = x.reshape(len(x), -1)
        x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        similarity = x @ x.T
        np.fill_diagonal(similarity, -np.inf)
        return np.argsort(-similarity, axis=1)[:, :k]

    k = min(k, len(reference) - 1)
    ref, cand = neighbours(reference), neighbours(candidate)
    hits = [len(set(r) & set(c)) for r, c in zip(ref, cand)]
    return np.asarray(hits, dtype=np.float64) / k


def compute_metrics(
    spec: ModelSpec,
    outputs: Outputs,
    reference: Outputs,
    labels: np.ndarray | None,
    truth: Truth | None = None,
    near_tie_margin: float = NEAR_TIE_MARGIN,
) -> dict[str, float]:
    nonfinite = count_nonfinite(outputs)
    metrics: dict[str, float] = {"nonfinite_outputs": float(nonfinite)}
    if spec.eval.task is Task.DETECTION:
        if nonfinite == 0:
            metrics.update(_detection(spec, outputs, reference, truth))
        return metrics
    if spec.eval.task is Task.SEGMENTATION:
        if nonfinite == 0:
            metrics.update(_segmentation(spec, outputs, reference, truth))
        return metrics
    cosines, abs_errors = [], []
    for name, out in outputs.items():
        ref = reference[name]
        if nonfinite == 0:
            cos = _cosine_rows(out, ref)
            cosines.append(cos)
            err = np.abs(out.astype(np.float64) - ref)
            abs_errors.append(err)
            if spec.eval.task is Task.RAW:
                metrics[f"{name}.max_abs_error"] = float(err.max())
                metrics[f"{name}.mean_abs_error"] = float(err.mean())
                metrics[f"{name}.relative_error"] = float(err.sum() / max(np.abs(ref).sum(), 1e-12))
                metrics[f"{name}.cosine_mean"] = float(cos.mean())
    if cosines:
        metrics["cosine_mean"] = float(np.mean(np.concatenate(cosines)))
        metrics["cosine_min"] = float(np.min(np.concatenate(cosines)))
        metrics["max_abs_error"] = float(max(e.max() for e in abs_errors))
        metrics["mean_abs_error"] = float(np.mean([e.mean() for e in abs_errors]))
    primary = spec.outputs[0].name
    out, ref = outputs[primary], reference[primary]
    if spec.eval.task is Task.CLASSIFICATION:
        predicted, expected = out.argmax(axis=1), ref.argmax(axis=1)
        agree = predicted == expected
        near_tie = ~agree & (softmax_margin(ref) < near_tie_margin)
        metrics.update(proportion_metrics("agreement", agree))
        metrics.update(proportion_metrics("agreement_excluding_near_ties", agree | near_tie))
        metrics["near_tie_flips"] = float(np.count_nonzero(near_tie))
        metrics["real_flips"] = float(np.count_nonzero(~agree & ~near_tie))
        if labels is not None:
            metrics.update(proportion_metrics("accuracy", predicted == labels))
            metrics.update(proportion_metrics("reference_accuracy", expected == labels))
            if out.shape[1] >= 5:
                top5 = np.argsort(-out, axis=1)[:, :5]
                metrics.update(proportion_metrics("top5_accuracy", np.any(top5 == labels[:, None], axis=1)))
    elif spec.eval.task is Task.EMBEDDING and nonfinite == 0:
        per_query = _recall_at_k(out, ref, spec.eval.recall_k)
        metrics["recall_at_k"] = float(per_query.mean())
        metrics.update(
            bootstrap_metrics(
                ["recall_at_k"], [metrics["recall_at_k"]], len(per_query), lambda queries: [per_query[queries].mean()], RECALL_RESAMPLES
            )
        )
    return metrics


def _detection(spec: ModelSpec, outputs: PerImage, reference: PerImage, truth: DetectionTruth) -> dict[str, float]:
    if len(reference) != len(outputs):
        raise StageError(
            STAGE, f"the reference outputs cover {len(reference)} images, the eval set {len(outputs)}: recompute the reference"
        )
    count = len(truth.classes)
    engine = decode_all(spec, outputs, count, STAGE)
    expected = decode_all(spec, reference, count, STAGE)
    metrics = {"eval_images": float(len(outputs)), "gt_instances": float(truth.instances)}
    metrics.update(detection_metrics(truth, engine))
    metrics.update(
        bootstrap_metrics(
            ["map"], [metrics["map"]], len(engine), lambda images: [resampled_map(truth, engine, images)], DETECTION_RESAMPLES
        )
    )
    metrics.update(detection_metrics(truth, expected, prefix="reference_"))
    metrics.update(agreement_metrics(truth, engine, expected, spec.eval.agreement_score))
    metrics["detections_per_image"] = float(np.mean([len(d) for d in engine]))
    return metrics


def _segmentation(
    spec: ModelSpec, outputs: dict[str, np.ndarray], reference: dict[str, np.ndarray], truth: SegmentationTruth
) -> dict[str, float]:
    name = spec.outputs[0].name
    engine = label_maps(outputs[name], truth, STAGE)
    expected = label_maps(reference[name], truth, STAGE)
    metrics = {"eval_images": float(len(engine))}
    metrics.update(segmentation_metrics(engine, truth))
    metrics.update(segmentation_metrics(expected, truth, prefix="reference_"))
    metrics["pixel_agreement"] = pixel_agreement(engine, expected, truth)
    metrics.update(
        bootstrap_metrics(
            ["miou", "pixel_agreement"],
            [metrics["miou"], metrics["pixel_agreement"]],
            len(engine),
            resampling_statistic(engine, expected, truth),
            SEGMENTATION_RESAMPLES,
        )
    )
    return metrics


def task_metric_name(spec: ModelSpec, metrics: dict[str, float]) -> str:
    if spec.eval.task is Task.CLASSIFICATION:
        return "accuracy" if "accuracy" in metrics else "agreement"
    if spec.eval.task is Task.DETECTION:
        return "map"
    if spec.eval.task is Task.SEGMENTATION:
        return "miou"
    return "cosine_mean"


def evaluate_thresholds(
    metrics: dict[str, float], thresholds: GateThresholds, task_metric: str, previous: PreviousRelease | None
) -> tuple[list[str], list[str]]:
    """Failure messages (metric, threshold, reference value) and notes."""
    failures, notes = [], []
    if metrics["nonfinite_outputs"] > 0:
        failures.append(f"{metrics['nonfinite_outputs']:.0f} non-finite (NaN/Inf) output values; any is a failure")
        return failures, notes

    def at_least(name: str, bound: float | None, label: str) -> None:
        if bound is not None and name in metrics and metrics[name] < bound:
            failures.append(f"{label} {metrics[name]:.4f} < threshold {bound:.4f}")

    if thresholds.min_accuracy is not None and metrics.get("accuracy", 1.0) < thresholds.min_accuracy:
        failures.append(
            f"top-1 accuracy {metrics['accuracy']:.4f} < threshold {thresholds.min_accuracy:.4f} "
            f"(PyTorch FP32 reference {metrics['reference_accuracy']:.4f})"
        )
    failures += _agreement_failures(metrics, thresholds.min_agreement, notes)
    at_least("cosine_mean", thresholds.min_cosine, "mean cosine similarity to the FP32 reference")
    at_least("recall_at_k", thresholds.min_recall_at_k, "recall@k against the reference embeddings")
    if thresholds.max_abs_error is not None and metrics.get("max_abs_error", 0.0) > thresholds.max_abs_error:
        failures.append(f"max abs error {metrics['max_abs_error']:.4g} > threshold {thresholds.max_abs_error:.4g}")
    if thresholds.max_accuracy_drop is not None and "accuracy" in metrics:
        drop = metrics["reference_accuracy"] - metrics["accuracy"]
        if drop > thresholds.max_accuracy_drop:
            failures.append(
                f"top-1 accuracy {metrics['accuracy']:.4f} is {100 * drop:.2f} points below the FP32 reference "
                f"{metrics['reference_accuracy']:.4f}; allowed drop {100 * thresholds.max_accuracy_drop:.2f} points"
            )
    failures += _task_failures(metrics, thresholds)
    if previous is None:
        notes.append("first version of this target: no previous release to compare with")
    elif task_metric in previous.metrics and thresholds.regression_tolerance is not None:
        before, now = previous.metrics[task_metric], metrics[task_metric]
        if before - now > thresholds.regression_tolerance:
            failures.append(
                f"{task_metric} {now:.4f} regressed from {before:.4f} in version {previous.version}; "
                f"allowed drop {thresholds.regression_tolerance:.4f}"
            )
        else:
            notes.append(f"{task_metric} {now:.4f} vs {before:.4f} in version {previous.version}")
    near, real = metrics.get("near_tie_flips", 0.0), metrics.get("real_flips", 0.0)
    if near + real:
        notes.append(
            f"{near:.0f} of {near + real:.0f} disagreements with the FP32 reference are near ties "
            f"(the reference's top-2 probability gap < {_near_tie_margin(thresholds):g})"
        )
    issues = resolution_issues(metrics, thresholds, task_metric, previous)
    if thresholds.strict_resolution:
        failures += [f"strict_resolution: {issue}" for issue in issues]
    else:
        notes += [f"resolution warning: {issue}" for issue in issues]
    return failures, notes


def _near_tie_margin(thresholds: GateThresholds) -> float:
    return NEAR_TIE_MARGIN if thresholds.near_tie_margin is None else thresholds.near_tie_margin


def _agreement_failures(metrics: dict[str, float], floor: float | None, notes: list[str]) -> list[str]:
    """min_agreement, judged on the agreement with near-tie flips forgiven (module docstring)."""
    if floor is None or "agreement" not in metrics:
        return []
    agreement = metrics["agreement"]
    judged = metrics.get("agreement_excluding_near_ties", agreement)
    if judged < floor:
        near = metrics.get("near_tie_flips", 0.0)
        forgiven = f" ({judged:.4f} with its {near:.0f} near-tie flips forgiven)" if near else ""
        return [f"top-1 agreement with the FP32 reference {agreement:.4f} < threshold {floor:.4f}{forgiven}"]
    if agreement < floor:
        notes.append(
            f"top-1 agreement {agreement:.4f} is below min_agreement {floor:.4f} only through near-tie flips: "
            f"judged on agreement_excluding_near_ties {judged:.4f}"
        )
    return []


def resolution_issues(
    metrics: dict[str, float], thresholds: GateThresholds, task_metric: str, previous: PreviousRelease | None
) -> list[str]:
    """Thresholds finer than the eval set resolves, each named with n and the n that would resolve it."""
    checks = [(field, metric, getattr(thresholds, field)) for field, metric in RESOLVED_DROPS]
    if previous is not None and task_metric in previous.metrics:
        checks.append(("regression_tolerance", task_metric, thresholds.regression_tolerance))
    issues = []
    for field, metric, allowed in checks:
        if allowed is None or f"{metric}.n" not in metrics:
            continue
        n, low, high = metrics[f"{metric}.n"], metrics[f"{metric}.ci_low"], metrics[f"{metric}.ci_high"]
        half, counted = (high - low) / 2, metric in COUNTED_METRICS
        finer = ([f"1/n = {1 / n:.4f}"] if counted and allowed < 1 / n else []) + (
            [f"the interval's half-width {half:.4f}"] if allowed < half else []
        )
        if not finer:
            continue
        needed = samples_to_resolve(allowed, half, n, counted)
        issues.append(
            f"{field} {allowed:.4f} is finer than the eval set resolves: {metric} {metrics[metric]:.4f} "
            f"[{low:.4f}, {high:.4f}] (95%) on n={n:.0f}, and the allowed drop is below {' and '.join(finer)}; "
            + (f"resolving it needs n >= {needed}" if needed else "no eval set resolves an allowed drop of 0")
        )
    floor = thresholds.min_agreement
    if floor is not None and "agreement.n" in metrics:
        n, slack = metrics["agreement.n"], 1 - floor
        # Rounded: 1 - 0.99 is 0.010000000000000009, and 100 samples at 0.99 do allow one disagreement.
        if round(slack * n, 6) < 1:
            needed = samples_to_resolve(slack, 0.0, n, True)
            issues.append(
                f"min_agreement {floor:.4f} is finer than the eval set resolves: on n={n:.0f} samples it allows no "
                "disagreement, so one flipped prediction decides the gate; "
                + (f"resolving it needs n >= {needed}" if needed else "no eval set gives min_agreement 1 any slack")
            )
    return issues


# (metric, its label, the floor, the allowed drop versus the reference, the per-class prefix, per-class floor, per-class drop)
TASK_CHECKS = (
    ("map", "COCO mAP@[.5:.95]", "min_map", "max_map_drop", "ap.", "min_class_ap", "max_class_ap_drop"),
    ("miou", "mIoU", "min_miou", "max_miou_drop", "iou.", "min_class_iou", "max_class_iou_drop"),
)


CLASS_METRIC = {"ap.": "AP", "iou.": "IoU"}


def _task_failures(metrics: dict[str, float], thresholds: GateThresholds) -> list[str]:
    failures = []
    for name, label, floor_field, drop_field, prefix, class_floor_field, class_drop_field in TASK_CHECKS:
        if name not in metrics:
            continue
        value, reference = metrics[name], metrics[f"reference_{name}"]
        floor, drop = getattr(thresholds, floor_field), getattr(thresholds, drop_field)
        if floor is not None and value < floor:
            failures.append(f"{label} {value:.4f} < threshold {floor:.4f} (PyTorch FP32 reference {reference:.4f})")
        if drop is not None and reference - value > drop:
            failures.append(
                f"{label} {value:.4f} is {100 * (reference - value):.2f} points below the FP32 reference {reference:.4f}; "
                f"allowed drop {100 * drop:.2f} points"
            )
        per_class = {key.removeprefix(prefix): v for key, v in metrics.items() if key.startswith(prefix)}
        class_floor, class_drop = getattr(thresholds, class_floor_field), getattr(thresholds, class_drop_field)
        if class_floor is not None:
            low = [f"{c} {v:.4f}" for c, v in per_class.items() if v < class_floor]
            if low:
                failures.append(
                    f"per-class {CLASS_METRIC[prefix]} below the floor {class_floor:.4f} ({class_floor_field}): " + ", ".join(low)
                )
        if class_drop is not None:
            dropped = [
                f"{c} {v:.4f} (reference {metrics[f'reference_{prefix}{c}']:.4f})"
                for c, v in per_class.items()
                if metrics.get(f"reference_{prefix}{c}", v) - v > class_drop
            ]
            if dropped:
                failures.append(
                    f"per-class {CLASS_METRIC[prefix]} more than {100 * class_drop:.2f} points below the FP32 reference "
                    f"({class_drop_field}): " + ", ".join(dropped)
                )
    if thresholds.min_agreement_map is not None and metrics.get("agreement_map", 1.0) < thresholds.min_agreement_map:
        failures.append(
            f"mAP against the FP32 reference's detections {metrics['agreement_map']:.4f} < threshold {thresholds.min_agreement_map:.4f}"
        )
    if thresholds.min_pixel_agreement is not None and metrics.get("pixel_agreement", 1.0) < thresholds.min_pixel_agreement:
        failures.append(
            f"pixel agreement with the FP32 reference {metrics['pixel_agreement']:.4f} < threshold {thresholds.min_pixel_agreement:.4f}"
        )
    return failures


def gate_target(
    spec: ModelSpec,
    target: Target,
    tag: str,
    runner: Runner,
    evalset: EvalSet,
    reference: Outputs,
    previous: PreviousRelease | None = None,
    timed: bool = True,
) -> GateResult:
    """``timed``: measure latency and throughput here too; False where the caller times the engine later, alone
    (``time_engine``), so the figures are not taken while other targets convert and build."""
    outputs = run_eval(spec, runner, evalset)
    thresholds = effective_thresholds(spec, target)
    metrics = compute_metrics(spec, outputs, reference, evalset.labels, evalset.truth, _near_tie_margin(thresholds))
    if timed:
        metrics.update(measure_latency(spec, runner, evalset, max_batch(spec, target)))
    task_metric = task_metric_name(spec, metrics)
    failures, notes = evaluate_thresholds(metrics, thresholds, task_metric, previous)
    failures += latency_failures(metrics, thresholds)
    notes += noisy_timing_notes(metrics)
    return GateResult(
        tag=tag,
        passed=not failures,
        task_metric=task_metric,
        metrics=metrics,
        # min_speedup_over names a precision, not a bound: the latency gate across targets reads it from the spec.
        thresholds={k: v for k, v in thresholds.model_dump(exclude={"min_speedup_over"}).items() if v is not None},
        failures=failures,
        previous_version=previous.version if previous else None,
        notes=notes,
    )
