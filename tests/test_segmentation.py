"""Segmentation gates: mIoU against a hand-computed case, ground-truth checks, and a real trained segmenter."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import load_file, save_file

from trtforge.backends.base import get_backend
from trtforge.errors import SpecError
from trtforge.evalset import load_eval_set
from trtforge.groundtruth import SegmentationTruth
from trtforge.modelload import import_callable
from trtforge.segmentation import pixel_agreement, segmentation_metrics
from trtforge.spec import load_spec, parse_spec
from trtforge.stages.export import export_onnx
from trtforge.stages.gate import gate_target
from trtforge.stages.reference import load_reference, reference_outputs

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "shapes-segmenter"
SPEC = EXAMPLE / "spec.yaml"

# One 2x4 image, three classes, one ignored pixel (255) whose prediction counts nowhere.
HAND_TRUTH = np.array([[[0, 0, 1, 1], [2, 2, 255, 1]]])
HAND_PREDICTED = np.array([[[0, 1, 1, 1], [2, 0, 0, 1]]])
# class 0: 1 pixel in common of 3 in either; class 1: 3 of 4; class 2: 1 of 2.
HAND_IOU = {"a": 1 / 3, "b": 3 / 4, "c": 1 / 2}


def test_miou_matches_the_hand_computed_case():
    truth = SegmentationTruth(classes=["a", "b", "c"], masks=HAND_TRUTH, ignore_index=255, source=Path("hand"))
    metrics = segmentation_metrics(HAND_PREDICTED, truth)
    for name, value in HAND_IOU.items():
        assert metrics[f"iou.{name}"] == pytest.approx(value)
    assert metrics["miou"] == pytest.approx(sum(HAND_IOU.values()) / 3)
    # 5 of the 7 counted pixels agree; the ignored one does not count.
    assert pixel_agreement(HAND_PREDICTED, HAND_TRUTH, truth) == pytest.approx(5 / 7)


def small_spec(tmp_path: Path, annotations: Path, ids=("m0", "m1")):
    eval_path = tmp_path / "eval.npz"
    np.savez(eval_path, images=np.zeros((2, 3, 8, 8), np.float32), image_ids=np.array(ids))
    return parse_spec(
        {
            "name": "seg",
            "model": "unused:build",
            "checkpoint": str(tmp_path / "none.safetensors"),
            "inputs": [{"name": "images", "shape": ["batch", 3, 8, 8], "dynamic": {"batch": {"min": 1, "opt": 2, "max": 4}}}],
            "outputs": [{"name": "logits"}],
            "eval": {"data": str(eval_path), "task": "segmentation", "annotations": str(annotations), "classes": ["bg", "fg"]},
            "targets": [{"backend": "onnxruntime"}],
        }
    )


def write_masks(folder: Path, masks: dict[str, np.ndarray]) -> Path:
    folder.mkdir(exist_ok=True)
    for name, mask in masks.items():
        Image.fromarray(mask.astype(np.uint8), mode="L").save(folder / f"{name}.png")
    return folder


def test_png_and_npz_masks_read_the_same(tmp_path):
    masks = np.zeros((2, 8, 8), np.uint8)
    masks[0, 2:5, 2:5] = 1
    masks[1, 0, :] = 255
    folder = write_masks(tmp_path / "masks", {"m0": masks[0], "m1": masks[1]})
    np.savez(tmp_path / "masks.npz", masks=masks)
    from_png = load_eval_set(small_spec(tmp_path, folder)).truth
    from_npz = load_eval_set(small_spec(tmp_path, tmp_path / "masks.npz")).truth
    np.testing.assert_array_equal(from_png.masks, masks)
    np.testing.assert_array_equal(from_npz.masks, masks)


def test_bad_masks_get_one_clear_error(tmp_path):
    good = np.zeros((8, 8), np.uint8)
    folder = write_masks(tmp_path / "masks", {"m0": good, "m1": np.zeros((6, 8), np.uint8)})
    with pytest.raises(SpecError, match=r"^eval\.annotations: .*masks/m1\.png: mask of 8x6: the model input is 8x8"):
        load_eval_set(small_spec(tmp_path, folder))
    write_masks(folder, {"m1": np.full((8, 8), 7, np.uint8)})
    with pytest.raises(SpecError, match=r"masks/m1\.png: mask: has values \[7\] that are neither class indices 0\.\.1"):
        load_eval_set(small_spec(tmp_path, folder))
    with pytest.raises(SpecError, match=r"masks/m2\.png: eval sample 1 \('m2'\): has no mask file"):
        load_eval_set(small_spec(tmp_path, folder, ids=("m0", "m2")))
    np.savez(tmp_path / "masks.npz", masks=np.zeros((3, 8, 8), np.uint8))
    with pytest.raises(SpecError, match=r"masks\.npz: array 'masks': has shape \[3, 8, 8\]; expected \[2, 8, 8\]"):
        load_eval_set(small_spec(tmp_path, tmp_path / "masks.npz"))


def test_segmentation_spec_needs_classes_and_an_ignore_index_outside_them():
    base = {
        "name": "s",
        "model": "m:f",
        "checkpoint": "c.safetensors",
        "inputs": [{"name": "x", "shape": [1, 3, 8, 8]}],
        "outputs": [{"name": "o"}],
        "targets": [{}],
    }
    with pytest.raises(SpecError, match=r"needs 'classes'"):
        parse_spec({**base, "eval": {"data": "e.npz", "task": "segmentation", "annotations": "masks"}})
    with pytest.raises(SpecError, match=r"ignore_index 1 is one of the 2 classes"):
        parse_spec(
            {**base, "eval": {"data": "e.npz", "task": "segmentation", "annotations": "masks", "classes": ["a", "b"], "ignore_index": 1}}
        )


@pytest.fixture(scope="module")
def segmenter(tmp_path_factory):
    """The example's segmenter trained by its own entry point, exported, and built for onnxruntime fp32."""
    spec = load_spec(SPEC)
    work = tmp_path_factory.mktemp("shapes-segmenter")
    checkpoint = work / "shapes-segmenter.safetensors"
    # 6 of the example's 8 epochs: mIoU ~0.85 (every class >= 0.74) against ~0.90, in three quarters of the time.
    import_callable(spec.train, spec.source, "train")(checkpoint, epochs=6)
    return spec, checkpoint, work


def engine_for(spec, checkpoint: Path, folder: Path):
    exported = export_onnx(spec, checkpoint, folder / "onnx")
    backend = get_backend("onnxruntime")
    return backend.load_runner(backend.build(exported.onnx_path, spec.targets[0], spec, folder / "engine").engine_path)


def test_trained_segmenter_passes_on_real_miou(segmenter):
    spec, checkpoint, work = segmenter
    runner = engine_for(spec, checkpoint, work / "fp32")
    result = gate_target(
        spec,
        spec.targets[0],
        "ort-cpu-fp32",
        runner,
        load_eval_set(spec),
        load_reference(reference_outputs(spec, checkpoint, work / "ref")),
    )
    assert result.passed, result.failures
    assert result.task_metric == "miou"
    assert result.metrics["miou"] > 0.7
    assert result.metrics["miou"] == pytest.approx(result.metrics["reference_miou"], abs=0.002)
    assert result.metrics["pixel_agreement"] > 0.999
    assert {"iou.background", "iou.rectangle", "iou.circle", "iou.triangle"} <= set(result.metrics)


def test_per_class_floor_catches_one_collapsed_class(segmenter):
    spec, checkpoint, work = segmenter
    state = load_file(str(checkpoint))
    circle = 2
    state["classify.weight"][circle].zero_()
    state["classify.bias"][circle] = -30.0
    broken = work / "no-circles.safetensors"
    save_file(state, str(broken))
    runner = engine_for(spec, broken, work / "no-circles")
    loose = spec.model_copy(
        update={
            "gate": spec.gate.model_copy(
                update={"min_miou": 0.5, "max_miou_drop": 0.5, "max_class_iou_drop": 1.0, "min_pixel_agreement": 0.0}
            )
        }
    )
    reference = load_reference(reference_outputs(spec, checkpoint, work / "ref"))
    result = gate_target(loose, loose.targets[0], "ort-cpu-fp32", runner, load_eval_set(loose), reference)
    assert result.metrics["iou.circle"] == 0.0 and result.metrics["miou"] > 0.5
    # Circles now read as other shapes, which costs those classes too; the floor names every class under it.
    (failure,) = result.failures
    assert failure.startswith("per-class IoU below the floor 0.6000 (min_class_iou): ") and "circle 0.0000" in failure


def test_shapes_segmenter_example_end_to_end(segmenter, prefect_api, tmp_path):
    """The example as it ships (fp32 and int8 on onnxruntime), from the trained checkpoint to a published version."""
    from flows.retrain_to_engine import retrain_to_engine

    _, checkpoint, _ = segmenter
    summary = retrain_to_engine(
        spec_path=str(SPEC),
        checkpoint=str(checkpoint),
        registry=f"file://{tmp_path / 'registry'}",
        artifacts_dir=str(tmp_path / "artifacts"),
    )
    assert summary.published and summary.version == 1
    by_precision = {t.precision: t for t in summary.targets}
    assert {p: t.status.value for p, t in by_precision.items()} == {"fp32": "passed", "int8": "passed"}
    assert by_precision["fp32"].metrics["miou"] > 0.7
    assert by_precision["fp32"].metrics["reference_miou"] - by_precision["int8"].metrics["miou"] <= 0.01
    assert "miou=" in (summary.run_dir / "report.md").read_text()
