"""Detection gates: COCO metrics against a hand-computed case, ground-truth checks, and real trained detectors.

The trained detector is the shapes-detector example's own, trained once per module by its
``train`` entry point. Degraded variants are made from its weights, never mocked.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from torch import nn

from trtforge.backends.base import get_backend
from trtforge.detection import coco_evaluate, truth_dict
from trtforge.errors import SpecError
from trtforge.evalset import load_eval_set
from trtforge.groundtruth import DetectionTruth
from trtforge.modelload import import_callable
from trtforge.postprocess import Detections
from trtforge.spec import Task, load_spec, parse_spec
from trtforge.stages.export import export_onnx
from trtforge.stages.gate import compute_metrics, effective_thresholds, evaluate_thresholds, gate_target
from trtforge.stages.reference import load_reference, reference_outputs

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "shapes-detector"
SPEC = EXAMPLE / "spec.yaml"


# ---------------------------------------------------------------- metrics on a hand-computed case

# Two 100x100 images. Class a: one box in each image; class b: one box in image 1.
HAND_BOXES = [np.array([[10, 10, 30, 30], [50, 50, 80, 80]], float), np.array([[0, 0, 40, 40]], float)]
HAND_LABELS = [np.array([0, 1]), np.array([0])]
# Class a, by score: 0.95 a false positive (image 2), 0.9 hits image 1's box, 0.5 hits image 2's.
# Precision/recall after each: (0, 0), (1/2, 1/2), (2/3, 1); COCO's interpolated precision is
# 2/3 at every recall point, so AP(a) = 2/3 at every IoU threshold. Class b: one exact hit, AP 1.
HAND_DETECTIONS = [
    Detections(np.array([[10, 10, 30, 30], [50, 50, 80, 80]], np.float32), np.array([0.9, 0.8], np.float32), np.array([0, 1])),
    Detections(np.array([[60, 60, 70, 70], [0, 0, 40, 40]], np.float32), np.array([0.95, 0.5], np.float32), np.array([0, 0])),
]


def hand_truth() -> DetectionTruth:
    return DetectionTruth(
        classes=["a", "b"],
        boxes=HAND_BOXES,
        labels=HAND_LABELS,
        crowd=[np.zeros(2, bool), np.zeros(1, bool)],
        height=100,
        width=100,
        source=Path("hand"),
    )


@pytest.mark.parametrize("evaluator", ["faster-coco-eval", "pycocotools"])
def test_coco_metrics_match_the_hand_computed_case(evaluator):
    from trtforge.detection import truth_dict

    scores = coco_evaluate(truth_dict(hand_truth()), HAND_DETECTIONS, evaluator)
    assert scores["per_class"]["a"] == pytest.approx(2 / 3)
    assert scores["per_class"]["b"] == pytest.approx(1.0)
    assert scores["map"] == pytest.approx(5 / 6)
    assert scores["ap50"] == pytest.approx(5 / 6) and scores["ap75"] == pytest.approx(5 / 6)
    assert scores["ar100"] == pytest.approx(1.0)


def test_coco_evaluation_leaves_stdout_alone_while_other_threads_evaluate():
    # The gates of a run's targets evaluate at once, on threads: swapping sys.stdout for one of them swapped it for
    # every thread, and two overlapping swaps left it pointing at a buffer, swallowing the CLI's --json.
    from concurrent.futures import ThreadPoolExecutor

    stdout = sys.stdout
    expected = coco_evaluate(truth_dict(hand_truth()), HAND_DETECTIONS)
    with ThreadPoolExecutor(max_workers=4) as pool:
        found = list(pool.map(lambda _: coco_evaluate(truth_dict(hand_truth()), HAND_DETECTIONS), range(64)))
    assert sys.stdout is stdout
    assert all(scores == expected for scores in found)


def test_agreement_with_reference_detections():
    from trtforge.detection import agreement_metrics

    truth = hand_truth()
    same = agreement_metrics(truth, HAND_DETECTIONS, HAND_DETECTIONS, min_score=0.25)
    assert same["agreement_map"] == pytest.approx(1.0)
    assert same["matched_iou_mean"] == pytest.approx(1.0) and same["score_error_mean"] == pytest.approx(0.0)
    assert same["match_rate"] == 1.0
    # The engine's first box is shifted by 2 px (IoU 324/476) and its score lowered by 0.1.
    shifted = [
        Detections(
            HAND_DETECTIONS[0].boxes + np.array([2, 2, 2, 2], np.float32) * [[1], [0]],
            np.array([0.8, 0.8], np.float32),
            HAND_DETECTIONS[0].classes,
        ),
        HAND_DETECTIONS[1],
    ]
    moved = agreement_metrics(truth, shifted, HAND_DETECTIONS, min_score=0.25)
    assert moved["matched_iou_mean"] == pytest.approx((324 / 476 + 1 + 1 + 1) / 4)
    assert moved["score_error_mean"] == pytest.approx(0.1 / 4)
    assert moved["agreement_map"] < 1.0


# ---------------------------------------------------------------- ground truth: three formats, one error per fault


def small_spec(tmp_path: Path, annotations: Path, classes: list[str] | None = None, ids=np.array([7, 9])) -> object:
    eval_path = tmp_path / "eval.npz"
    np.savez(eval_path, images=np.zeros((2, 3, 100, 100), np.float32), image_ids=ids)
    data = {
        "name": "gt",
        "model": "unused:build",
        "checkpoint": str(tmp_path / "none.safetensors"),
        "inputs": [{"name": "images", "shape": ["batch", 3, 100, 100], "dynamic": {"batch": {"min": 1, "opt": 2, "max": 4}}}],
        "outputs": [{"name": "output0"}],
        "eval": {"data": str(eval_path), "task": "detection", "annotations": str(annotations), "postprocess": {"kind": "yolo"}},
        "targets": [{"backend": "onnxruntime"}],
    }
    if classes is not None:
        data["eval"]["classes"] = classes
    return parse_spec(data)


def coco_file(tmp_path: Path, **changes) -> Path:
    data = {
        "images": [{"id": 7, "width": 100, "height": 100, "file_name": "x7.jpg"}, {"id": 9, "width": 100, "height": 100}],
        "categories": [{"id": 3, "name": "a"}, {"id": 5, "name": "b"}],
        "annotations": [
            {"id": 1, "image_id": 7, "category_id": 3, "bbox": [10, 10, 20, 20]},
            {"id": 2, "image_id": 7, "category_id": 5, "bbox": [50, 50, 30, 30]},
            {"id": 3, "image_id": 9, "category_id": 3, "bbox": [0, 0, 40, 40]},
        ],
    }
    data.update(changes)
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(data))
    return path


def assert_hand_truth(truth: DetectionTruth) -> None:
    assert truth.classes == ["a", "b"]
    for got, want in zip(truth.boxes, HAND_BOXES):
        np.testing.assert_allclose(got, want)
    for got, want in zip(truth.labels, HAND_LABELS):
        np.testing.assert_array_equal(got, want)


def test_coco_yolo_and_npz_ground_truth_read_the_same(tmp_path):
    assert_hand_truth(load_eval_set(small_spec(tmp_path, coco_file(tmp_path))).truth)

    labels = tmp_path / "labels"
    labels.mkdir()
    (labels / "7.txt").write_text("0 0.2 0.2 0.2 0.2\n1 0.65 0.65 0.3 0.3\n")
    (labels / "9.txt").write_text("0 0.2 0.2 0.4 0.4\n")
    assert_hand_truth(load_eval_set(small_spec(tmp_path, labels, classes=["a", "b"])).truth)

    boxes = tmp_path / "boxes.npz"
    np.savez(boxes, boxes_0=HAND_BOXES[0], labels_0=HAND_LABELS[0], boxes_1=HAND_BOXES[1], labels_1=HAND_LABELS[1])
    assert_hand_truth(load_eval_set(small_spec(tmp_path, boxes, classes=["a", "b"])).truth)


def test_coco_images_are_matched_by_file_name_or_its_stem(tmp_path):
    images = [{"id": 7, "width": 100, "height": 100, "file_name": "x7.jpg"}, {"id": 9, "width": 100, "height": 100, "file_name": "y9.png"}]
    annotations = coco_file(tmp_path, images=images)
    assert_hand_truth(load_eval_set(small_spec(tmp_path, annotations, ids=np.array(["x7.jpg", "y9"]))).truth)
    with pytest.raises(SpecError, match=r"array 'image_ids' names images \['x7'\] more than once"):
        load_eval_set(small_spec(tmp_path, annotations, ids=np.array(["x7", "x7"])))


def test_bad_coco_ground_truth_gets_one_clear_error(tmp_path):
    cases = [
        ({}, np.array([7, 11]), r"instances\.json: eval sample 1: names image 11 .*not an id or file_name in 'images'"),
        (
            {"annotations": [{"id": 4, "image_id": 9, "category_id": 3, "bbox": [80, 80, 30, 30]}]},
            np.array([7, 9]),
            r"instances\.json: annotation id 4 \(image id 9\): box .* lies outside the 100x100 model input",
        ),
        (
            {"annotations": [{"id": 5, "image_id": 7, "category_id": 4, "bbox": [1, 1, 5, 5]}]},
            np.array([7, 9]),
            r"instances\.json: annotation id 5 \(image id 7\): has category_id 4, not one of the ids in 'categories' \[3, 5\]",
        ),
        (
            {"images": [{"id": 7, "width": 640, "height": 480}, {"id": 9, "width": 100, "height": 100}]},
            np.array([7, 9]),
            r"image id 7: is 640x480 but the model input is 100x100",
        ),
    ]
    for changes, ids, message in cases:
        with pytest.raises(SpecError, match=r"^eval\.annotations: .*" + message):
            load_eval_set(small_spec(tmp_path, coco_file(tmp_path, **changes), ids=ids))


def test_bad_yolo_and_npz_ground_truth_get_one_clear_error(tmp_path):
    labels = tmp_path / "labels"
    labels.mkdir()
    (labels / "7.txt").write_text("0 0.2 0.2 0.2 0.2\n")
    with pytest.raises(SpecError, match=r"labels/9\.txt: eval sample 1 \(9\): has no label file"):
        load_eval_set(small_spec(tmp_path, labels, classes=["a", "b"]))
    (labels / "9.txt").write_text("2 0.5 0.5 0.1 0.1\n")
    with pytest.raises(SpecError, match=r"labels/9\.txt: line 1: class 2 is not an index into eval\.classes \(0\.\.1"):
        load_eval_set(small_spec(tmp_path, labels, classes=["a", "b"]))
    (labels / "9.txt").write_text("1 0.95 0.5 0.3 0.1\n")
    with pytest.raises(SpecError, match=r"labels/9\.txt: line 1: box .* lies outside the 100x100 model input"):
        load_eval_set(small_spec(tmp_path, labels, classes=["a", "b"]))

    boxes = tmp_path / "boxes.npz"
    np.savez(boxes, boxes_0=HAND_BOXES[0], labels_0=np.array([0, 5]), boxes_1=HAND_BOXES[1], labels_1=HAND_LABELS[1])
    with pytest.raises(SpecError, match=r"boxes\.npz: labels_0: has class indices \[5\] outside eval\.classes \(0\.\.1\)"):
        load_eval_set(small_spec(tmp_path, boxes, classes=["a", "b"]))
    np.savez(boxes, boxes_0=HAND_BOXES[0], labels_0=HAND_LABELS[0])
    with pytest.raises(SpecError, match=r"boxes\.npz: eval sample 1: has no arrays 'boxes_1' and 'labels_1'"):
        load_eval_set(small_spec(tmp_path, boxes, classes=["a", "b"]))


def test_detection_spec_needs_annotations_postprocess_and_classes(tmp_path):
    base = {
        "name": "d",
        "model": "m:f",
        "checkpoint": "c.safetensors",
        "inputs": [{"name": "images", "shape": [1, 3, 8, 8]}],
        "outputs": [{"name": "o"}],
        "targets": [{}],
    }
    with pytest.raises(SpecError, match=r"task 'detection' needs 'annotations'"):
        parse_spec({**base, "eval": {"data": "e.npz", "task": "detection", "postprocess": {"kind": "yolo"}}})
    with pytest.raises(SpecError, match=r"needs 'postprocess'"):
        parse_spec({**base, "eval": {"data": "e.npz", "task": "detection", "annotations": "a.json"}})
    with pytest.raises(SpecError, match=r"list the class names under 'classes'"):
        parse_spec({**base, "eval": {"data": "e.npz", "task": "detection", "annotations": "labels", "postprocess": {"kind": "yolo"}}})


# ---------------------------------------------------------------- a real trained detector


@pytest.fixture(scope="module")
def detector(tmp_path_factory):
    """The example's detector trained by its own entry point, exported, and built for onnxruntime fp32."""
    spec = load_spec(SPEC)
    work = tmp_path_factory.mktemp("shapes-detector")
    checkpoint = work / "shapes-detector.safetensors"
    # Half the example's epochs: the tests need a detector really trained (mAP ~0.65), not its best.
    import_callable(spec.train, spec.source, "train")(checkpoint, epochs=6)
    exported = export_onnx(spec, checkpoint, work / "onnx")
    backend = get_backend("onnxruntime")
    built = backend.build(exported.onnx_path, spec.targets[0], spec, work / "engine")
    return spec, checkpoint, backend.load_runner(built.engine_path), work


def degraded(checkpoint: Path, folder: Path, name: str, change) -> Path:
    state = load_file(str(checkpoint))
    change(state)
    path = folder / f"{name}.safetensors"
    save_file(state, str(path))
    return path


def engine_for(spec, checkpoint: Path, folder: Path):
    exported = export_onnx(spec, checkpoint, folder / "onnx")
    backend = get_backend("onnxruntime")
    return backend.load_runner(backend.build(exported.onnx_path, spec.targets[0], spec, folder / "engine").engine_path)


def test_trained_detector_passes_on_real_map(detector):
    spec, checkpoint, runner, work = detector
    reference = load_reference(reference_outputs(spec, checkpoint, work / "ref"))
    assert isinstance(reference, list) and len(reference) == 300, "detection references are stored per image"
    result = gate_target(spec, spec.targets[0], "ort-cpu-fp32", runner, load_eval_set(spec), reference)
    assert result.passed, result.failures
    assert result.task_metric == "map"
    assert result.metrics["map"] > 0.5 and result.metrics["ap50"] > 0.8
    assert result.metrics["map"] == pytest.approx(result.metrics["reference_map"], abs=0.002)
    assert result.metrics["agreement_map"] > 0.95 and result.metrics["matched_iou_mean"] > 0.99
    assert {f"ap.{c}" for c in ("rectangle", "circle", "triangle")} <= set(result.metrics)


def test_detector_without_class_scores_fails_on_map_while_raw_cosine_passes(detector):
    """Every class score zeroed: boxes still dominate the output, so an element-wise gate sees no change."""
    spec, checkpoint, _, work = detector

    def silence(state):
        state["cls.1.weight"].zero_()
        state["cls.1.bias"].fill_(-30.0)

    runner = engine_for(spec, degraded(checkpoint, work, "silent", silence), work / "silent")
    reference = load_reference(reference_outputs(spec, checkpoint, work / "ref"))
    evalset = load_eval_set(spec)
    result = gate_target(spec, spec.targets[0], "ort-cpu-fp32", runner, evalset, reference)
    assert not result.passed
    assert result.metrics["map"] == 0.0
    assert any(f.startswith("COCO mAP@[.5:.95] 0.0000 is") and "below the FP32 reference" in f for f in result.failures)

    raw = spec.model_copy(update={"eval": spec.eval.model_copy(update={"task": Task.RAW, "annotations": None, "postprocess": None})})
    batched = np.concatenate([r["output0"] for r in reference])
    outputs = np.concatenate([runner.run({"images": evalset.inputs["images"][i : i + 64]})["output0"] for i in range(0, 300, 64)])
    metrics = compute_metrics(raw, {"output0": outputs}, {"output0": batched}, None)
    failures, _ = evaluate_thresholds(metrics, effective_thresholds(raw, raw.targets[0]), "cosine_mean", None)
    assert metrics["cosine_mean"] > 0.9999 and not failures, "the element-wise gate would have published it"


def test_per_class_floor_catches_one_collapsed_class(detector):
    spec, checkpoint, _, work = detector
    triangle = 2

    def collapse(state):
        state["cls.1.weight"][triangle].zero_()
        state["cls.1.bias"][triangle] = -30.0

    runner = engine_for(spec, degraded(checkpoint, work, "no-triangles", collapse), work / "no-triangles")
    reference = load_reference(reference_outputs(spec, checkpoint, work / "ref"))
    loose = spec.model_copy(
        update={
            "gate": spec.gate.model_copy(update={"min_map": 0.3, "max_map_drop": 0.5, "max_class_ap_drop": 1.0, "min_agreement_map": 0.0})
        }
    )
    result = gate_target(loose, loose.targets[0], "ort-cpu-fp32", runner, load_eval_set(loose), reference)
    assert result.metrics["map"] > 0.3, "the mean alone still looks acceptable"
    assert result.failures == [f"per-class AP below the floor 0.4000 (min_class_ap): triangle {result.metrics['ap.triangle']:.4f}"]


class NmsDetector(nn.Module):
    """The shapes detector with decoding and class-wise NMS inside: boxes, scores, classes (and num_dets when padded)."""

    def __init__(self, padded: bool = False, max_det: int = 100, conf: float = 0.001, iou: float = 0.7):
        super().__init__()
        sys.path.insert(0, str(EXAMPLE))
        from detector_model import build_model

        self.detector = build_model()
        self.padded, self.max_det, self.conf, self.iou = padded, max_det, conf, iou

    def forward(self, images):
        from torchvision.ops import box_convert, nms

        prediction = self.detector(images)[0].T
        scores, classes = prediction[:, 4:].max(dim=1)
        boxes = box_convert(prediction[:, :4], "cxcywh", "xyxy")
        keep = scores > self.conf
        boxes, scores, classes = boxes[keep], scores[keep], classes[keep]
        # Class-wise NMS by offsetting each class's boxes apart (batched_nms guards on the count, which export cannot trace).
        kept = nms(boxes + classes[:, None].to(boxes.dtype) * 1000.0, scores, self.iou)[: self.max_det]
        boxes, scores, classes = boxes[kept], scores[kept], classes[kept]
        if not self.padded:
            return boxes, scores, classes
        count = scores.shape[0]
        pad = self.max_det - count
        return (
            torch.tensor([count]).reshape(1, 1),
            nn.functional.pad(boxes, (0, 0, 0, pad))[None],
            nn.functional.pad(scores, (0, pad))[None],
            nn.functional.pad(classes, (0, pad))[None],
        )


def build_nms_detector(padded: bool = False) -> nn.Module:
    return NmsDetector(padded=padded)


@pytest.mark.parametrize("padded", [False, True], ids=["ragged", "padded"])
def test_detector_with_nms_inside_is_gated_on_onnxruntime(detector, padded, tmp_path):
    spec, checkpoint, _, work = detector
    wrapped = tmp_path / "nms.safetensors"
    save_file({f"detector.{k}": v for k, v in load_file(str(checkpoint)).items()}, str(wrapped))
    data = yaml.safe_load(SPEC.read_text())
    outputs = ["num_dets", "boxes", "scores", "classes"] if padded else ["boxes", "scores", "classes"]
    data.update(
        model="tests.test_detection:build_nms_detector",
        model_kwargs={"padded": padded},
        checkpoint=str(wrapped),
        inputs=[{"name": "images", "shape": [1, 3, 64, 64]}],
        outputs=[{"name": n} for n in outputs],
        targets=[{"backend": "onnxruntime", "precision": "fp32"}],
    )
    data["eval"].update(
        data=str(EXAMPLE / "data" / "eval.npz"),
        annotations=str(EXAMPLE / "data" / "instances.json"),
        postprocess={"kind": "boxes_scores_classes", "num_dets": "num_dets" if padded else None},
    )
    nms_spec = parse_spec(data)
    runner = engine_for(nms_spec, wrapped, tmp_path)
    stored = reference_outputs(nms_spec, wrapped, tmp_path / "ref")
    with np.load(stored.path) as archive:
        counts = {archive[f"{i}/scores"].size for i in range(300)}
    assert (counts == {1 * 100}) if padded else (len(counts) > 1), "ragged references keep each image's own count"
    result = gate_target(nms_spec, nms_spec.targets[0], "ort-cpu-fp32", runner, load_eval_set(nms_spec), load_reference(stored))
    assert result.passed, result.failures
    yolo = gate_target(
        spec,
        spec.targets[0],
        "ort-cpu-fp32",
        detector[2],
        load_eval_set(spec),
        load_reference(reference_outputs(spec, checkpoint, work / "ref")),
    )
    assert result.metrics["map"] == pytest.approx(yolo.metrics["map"], abs=0.01), "NMS inside or in the decoder: the same detections"


# ---------------------------------------------------------------- the example end to end


def test_shapes_detector_example_end_to_end(detector, prefect_api, tmp_path):
    """The example as it ships (fp32 and int8 on onnxruntime), from the trained checkpoint to a published version."""
    from flows.retrain_to_engine import retrain_to_engine

    _, checkpoint, _, _ = detector
    stdout = sys.stdout
    summary = retrain_to_engine(
        spec_path=str(SPEC),
        checkpoint=str(checkpoint),
        registry=f"file://{tmp_path / 'registry'}",
        artifacts_dir=str(tmp_path / "artifacts"),
    )
    assert summary.published and summary.version == 1
    by_precision = {t.precision: t for t in summary.targets}
    assert {p: t.status.value for p, t in by_precision.items()} == {"fp32": "passed", "int8": "passed"}
    fp32, int8 = by_precision["fp32"], by_precision["int8"]
    assert fp32.metrics["map"] > 0.5
    assert fp32.metrics["reference_map"] - int8.metrics["map"] <= 0.015
    report = (summary.run_dir / "report.md").read_text()
    assert "published version 1" in report and "map=" in report
    assert sys.stdout is stdout, "a stage left sys.stdout redirected: the CLI's --json would go nowhere"
