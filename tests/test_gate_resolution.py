"""Gates that know their own resolution: intervals, thresholds finer than n resolves, near-tie flips.

Everything runs on arrays built here, through the gate's own functions (compute_metrics,
evaluate_thresholds) and the metric functions the bootstrap resamples; no engine is built.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from scipy.stats import binomtest

from trtforge.detection import detection_metrics, resampled_map
from trtforge.groundtruth import DetectionTruth, SegmentationTruth
from trtforge.intervals import bootstrap_metrics, samples_to_resolve
from trtforge.postprocess import Detections
from trtforge.report import format_metrics
from trtforge.segmentation import pixel_agreement, resampling_statistic, segmentation_metrics
from trtforge.spec import GateThresholds
from trtforge.stages.gate import DETECTION_RESAMPLES, SEGMENTATION_RESAMPLES, compute_metrics, effective_thresholds, evaluate_thresholds


def one_hot_logits(classes: np.ndarray, count: int = 10, scale: float = 8.0) -> np.ndarray:
    """Decisive logits: the named class far ahead of the rest (top-2 softmax gap ~1)."""
    logits = np.zeros((len(classes), count), np.float32)
    logits[np.arange(len(classes)), classes] = scale
    return logits


def classification(digits_spec, engine: np.ndarray, reference: np.ndarray, labels: np.ndarray | None, **kwargs) -> dict[str, float]:
    name = digits_spec.outputs[0].name
    return compute_metrics(digits_spec, {name: engine}, {name: reference}, labels, **kwargs)


def wilson(successes: int, n: int) -> tuple[float, float]:
    ci = binomtest(successes, n).proportion_ci(confidence_level=0.95, method="wilson")
    return ci.low, ci.high


# ---------------------------------------------------------------- intervals


def test_proportion_intervals_are_scipys_wilson_intervals(digits_spec):
    """100 samples: the engine matches the reference on 95 and the labels on 91; the reference is right on 92."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, 100)
    reference_classes = labels.copy()
    reference_classes[:8] = (labels[:8] + 1) % 10
    engine_classes = reference_classes.copy()
    engine_classes[10:13] = (reference_classes[10:13] + 1) % 10
    engine_classes[:2] = labels[:2]
    metrics = classification(digits_spec, one_hot_logits(engine_classes), one_hot_logits(reference_classes), labels)
    expected = {"agreement": 95, "accuracy": 100 - 6 - 3, "reference_accuracy": 92}
    for name, successes in expected.items():
        assert metrics[name] == successes / 100
        low, high = wilson(successes, 100)
        assert metrics[f"{name}.ci_low"] == pytest.approx(low, abs=1e-12)
        assert metrics[f"{name}.ci_high"] == pytest.approx(high, abs=1e-12)
        assert metrics[f"{name}.n"] == 100.0
    assert metrics["top5_accuracy.n"] == 100.0 and metrics["top5_accuracy.ci_low"] <= metrics["top5_accuracy"]
    assert all(isinstance(v, float) for v in metrics.values()), "metrics stay flat floats for manifests and report.json"
    assert "accuracy=0.91 [0.838, 0.952] n=100" in format_metrics(metrics)


# ---------------------------------------------------------------- thresholds finer than the eval set resolves


def perfect_metrics(digits_spec, n: int) -> dict[str, float]:
    labels = np.arange(n) % 10
    logits = one_hot_logits(labels)
    return classification(digits_spec, logits, logits, labels)


def test_a_drop_finer_than_one_over_n_warns_and_fails_with_strict_resolution(digits_spec):
    metrics = perfect_metrics(digits_spec, 100)
    loose = GateThresholds(max_accuracy_drop=0.005)
    failures, notes = evaluate_thresholds(metrics, loose, "accuracy", None)
    assert not failures
    (warning,) = [n for n in notes if n.startswith("resolution warning: max_accuracy_drop 0.0050 is finer than the eval set resolves")]
    half = (metrics["accuracy.ci_high"] - metrics["accuracy.ci_low"]) / 2
    needed = samples_to_resolve(0.005, half, 100, counted=True)
    # Accuracy 100/100: the Wilson interval [0.963, 1] has half-width 0.0185 > 0.005, and 1/n = 0.01 > 0.005.
    assert needed == int(np.ceil(100 * (half / 0.005) ** 2)) and needed > 1 / 0.005
    assert "n=100" in warning and "1/n = 0.0100" in warning and f"needs n >= {needed}" in warning

    strict = GateThresholds(max_accuracy_drop=0.005, strict_resolution=True)
    failures, notes = evaluate_thresholds(metrics, strict, "accuracy", None)
    (failure,) = failures
    assert failure.startswith("strict_resolution: max_accuracy_drop 0.0050") and "n=100" in failure and f"needs n >= {needed}" in failure
    assert not any(n.startswith("resolution warning") for n in notes)


def test_an_agreement_floor_that_allows_no_flip_names_the_n_it_needs(digits_spec):
    metrics = perfect_metrics(digits_spec, 100)
    failures, _ = evaluate_thresholds(metrics, GateThresholds(min_agreement=0.999, strict_resolution=True), "accuracy", None)
    (failure,) = failures
    assert "min_agreement 0.9990" in failure and "n=100" in failure and "allows no disagreement" in failure
    assert "needs n >= 1000" in failure
    # 0.99 on 100 samples allows exactly one disagreement: resolved.
    failures, notes = evaluate_thresholds(metrics, GateThresholds(min_agreement=0.99, strict_resolution=True), "accuracy", None)
    assert not failures and not any("resolution" in n for n in notes)


def test_a_threshold_the_eval_set_resolves_is_not_warned_about(digits_spec):
    metrics = perfect_metrics(digits_spec, 400)
    failures, notes = evaluate_thresholds(metrics, GateThresholds(max_accuracy_drop=0.05, strict_resolution=True), "accuracy", None)
    assert not failures and not any("resolution" in n for n in notes)


def test_strict_resolution_set_for_the_spec_is_not_undone_by_a_target(digits_spec):
    spec = digits_spec.model_copy(update={"gate": GateThresholds(strict_resolution=True, near_tie_margin=0.05)})
    target = spec.targets[0].model_copy(update={"gate": GateThresholds()})
    thresholds = effective_thresholds(spec, target)
    assert thresholds.strict_resolution is True and thresholds.near_tie_margin == 0.05


# ---------------------------------------------------------------- near-tie flips


def near_tie_case(digits_spec, **kwargs) -> dict[str, float]:
    """10 samples. The reference is decisive on 0-7 and nearly tied between classes 0 and 1 on 8 and 9
    (logits 1.00 and 0.99: softmax gap ~0.005). The engine flips 8 and 9 (near ties) and 0 (a real flip)."""
    reference = one_hot_logits(np.arange(10) % 10)
    reference[8:] = 0.0
    reference[8:, 0], reference[8:, 1] = 1.00, 0.99
    engine = reference.copy()
    engine[8:, 0], engine[8:, 1] = 0.99, 1.00
    engine[0] = one_hot_logits(np.array([5]))[0]
    return classification(digits_spec, engine, reference, None, **kwargs)


def test_near_tie_flips_are_counted_apart_and_forgiven_by_min_agreement(digits_spec):
    metrics = near_tie_case(digits_spec)
    assert metrics["near_tie_flips"] == 2.0 and metrics["real_flips"] == 1.0
    assert metrics["agreement"] == pytest.approx(0.7)
    assert metrics["agreement_excluding_near_ties"] == pytest.approx(0.9)
    assert "agreement=0.7 [0.397, 0.892] n=10 (2 of 3 disagreements are near ties)" in format_metrics(metrics)

    failures, notes = evaluate_thresholds(metrics, GateThresholds(min_agreement=0.85), "agreement", None)
    assert not failures, "the only flips beyond the allowed ones are near ties"
    assert any(n.startswith("2 of 3 disagreements with the FP32 reference are near ties") for n in notes)
    assert any("below min_agreement 0.8500 only through near-tie flips" in n for n in notes)

    failures, _ = evaluate_thresholds(metrics, GateThresholds(min_agreement=0.95), "agreement", None)
    assert failures == ["top-1 agreement with the FP32 reference 0.7000 < threshold 0.9500 (0.9000 with its 2 near-tie flips forgiven)"]


def test_a_zero_margin_forgives_no_flip(digits_spec):
    strict = near_tie_case(digits_spec, near_tie_margin=0.0)
    assert strict["near_tie_flips"] == 0.0 and strict["real_flips"] == 3.0
    assert strict["agreement_excluding_near_ties"] == strict["agreement"]


def test_a_softmax_output_is_not_softmaxed_twice(digits_spec):
    reference = np.full((2, 10), 0.02, np.float32)
    reference[:, 0], reference[:, 1] = 0.45, 0.39  # a gap of 0.06 in probability: no near tie at 0.02
    engine = reference[:, [1, 0, 2, 3, 4, 5, 6, 7, 8, 9]]
    metrics = classification(digits_spec, engine, reference, None)
    # Softmaxed again, these rows would have a gap of 0.008 and both flips would pass for near ties.
    assert metrics["real_flips"] == 2.0 and metrics["near_tie_flips"] == 0.0


# ---------------------------------------------------------------- bootstrap over images


def detection_case(images: int = 12) -> tuple[DetectionTruth, list[Detections]]:
    rng = np.random.default_rng(1)
    boxes, labels, found = [], [], []
    for _ in range(images):
        count = int(rng.integers(1, 4))
        corner = rng.uniform(0, 60, (count, 2))
        image_boxes = np.column_stack([corner, corner + rng.uniform(10, 30, (count, 2))])
        image_labels = rng.integers(0, 2, count)
        boxes.append(image_boxes)
        labels.append(image_labels)
        jitter = rng.normal(0, 2.0, image_boxes.shape)
        detected = np.concatenate([image_boxes + jitter, rng.uniform(0, 60, (1, 4)) + [0, 0, 20, 20]])
        found.append(
            Detections(detected.astype(np.float32), rng.uniform(0.2, 1.0, count + 1).astype(np.float32), np.append(image_labels, 0))
        )
    truth = DetectionTruth(
        classes=["a", "b"],
        boxes=boxes,
        labels=labels,
        crowd=[np.zeros(len(b), bool) for b in boxes],
        height=100,
        width=100,
        source=Path("built here"),
    )
    return truth, found


def test_map_bootstrap_contains_the_point_value_and_repeats_exactly():
    truth, found = detection_case()
    value = detection_metrics(truth, found)["map"]
    assert resampled_map(truth, found, np.arange(len(found))) == pytest.approx(value), "the identity resample is the metric itself"
    first, second = (
        bootstrap_metrics(["map"], [value], len(found), lambda images: [resampled_map(truth, found, images)], DETECTION_RESAMPLES)
        for _ in range(2)
    )
    assert first == second
    assert first["map.ci_low"] < value < first["map.ci_high"] and first["map.n"] == 12.0


def test_miou_bootstrap_contains_the_point_value_and_repeats_exactly():
    rng = np.random.default_rng(2)
    masks = rng.integers(0, 3, (10, 16, 16))
    masks[:, 0] = 255
    predicted = np.where(rng.random(masks.shape) < 0.85, masks, rng.integers(0, 3, masks.shape)) % 255
    reference = np.where(rng.random(masks.shape) < 0.95, predicted, (predicted + 1) % 3)
    truth = SegmentationTruth(classes=["a", "b", "c"], masks=masks, ignore_index=255, source=Path("built here"))
    values = [segmentation_metrics(predicted, truth)["miou"], pixel_agreement(predicted, reference, truth)]
    statistic = resampling_statistic(predicted, reference, truth)
    assert statistic(np.arange(10)) == pytest.approx(values), "the unchecked resample computes what the checked metrics do"
    names = ["miou", "pixel_agreement"]
    first, second = (bootstrap_metrics(names, values, 10, statistic, SEGMENTATION_RESAMPLES) for _ in range(2))
    assert first == second
    for name, value in zip(names, values):
        assert first[f"{name}.ci_low"] < value < first[f"{name}.ci_high"] and first[f"{name}.n"] == 10.0
