"""Class coverage of a detector's calibration set, counted in objects from its annotations.

The sets are real scenes of the shapes detector example (rectangles, circles and triangles with
exact boxes), drawn from its calibration split, and annotated in each form the eval set takes.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from pydantic import ValidationError

from tests.conftest import DIGITS_SPEC, REPO
from trtforge.errors import CalibrationError, SpecError
from trtforge.spec import CalibrationSpec, ModelSpec, load_spec
from trtforge.stages.validate_calibration import CalibrationReport, validate_calibration

SHAPES_DIR = REPO / "examples" / "shapes-detector"
SHAPES_SPEC = SHAPES_DIR / "spec.yaml"
SUM_BETWEEN = "expect_column_sum_to_be_between"
CLASSES = ["rectangle", "circle", "triangle"]


@pytest.fixture(scope="module")
def shapes_data():
    sys.path.insert(0, str(SHAPES_DIR))
    try:
        import detector_data
    finally:
        sys.path.remove(str(SHAPES_DIR))
    detector_data.write_data()
    return detector_data


@pytest.fixture(scope="module")
def spec(shapes_data) -> ModelSpec:
    return load_spec(SHAPES_SPEC)


@pytest.fixture(scope="module")
def scenes(shapes_data) -> list:
    return shapes_data.load_split("calibration")


def with_calibration(spec: ModelSpec, **changes) -> ModelSpec:
    return spec.model_copy(update={"calibration": spec.calibration.model_copy(update=changes)})


def objects_per_class(scenes: list) -> list[int]:
    return np.bincount(np.concatenate([s.labels for s in scenes]), minlength=len(CLASSES)).tolist()


def write_set(folder: Path, scenes: list, form: str, shapes_data) -> tuple[Path, Path]:
    """The scenes as an .npz (images, image_ids 1..N) and their boxes as COCO, YOLO or an .npz of boxes."""
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / "calibration.npz"
    np.savez(data, images=np.stack([s.image for s in scenes]), image_ids=np.arange(1, len(scenes) + 1))
    if form == "coco":
        annotations = folder / "instances.json"
        annotations.write_text(json.dumps(shapes_data.coco_annotations(scenes)))
    elif form == "yolo":
        annotations = folder / "labels"
        annotations.mkdir()
        size = scenes[0].image.shape[-1]
        for image_id, scene in enumerate(scenes, start=1):
            rows = [
                f"{label} {(x1 + x2) / 2 / size} {(y1 + y2) / 2 / size} {(x2 - x1) / size} {(y2 - y1) / size}"
                for (x1, y1, x2, y2), label in zip(scene.boxes.tolist(), scene.labels.tolist())
            ]
            (annotations / f"{image_id}.txt").write_text("\n".join(rows))
    else:
        annotations = folder / "boxes.npz"
        arrays = {}
        for index, scene in enumerate(scenes):
            arrays[f"boxes_{index}"], arrays[f"labels_{index}"] = scene.boxes, scene.labels
        np.savez(annotations, **arrays)
    return data, annotations


def annotated(spec: ModelSpec, data: Path, annotations: Path, **changes) -> ModelSpec:
    return with_calibration(spec, data=data, annotations=annotations, **changes)


def object_failures(report: CalibrationReport) -> dict[str, str]:
    return {f.column: f.details for f in report.failed if f.expectation == SUM_BETWEEN}


@pytest.mark.parametrize("form", ["coco", "yolo", "npz"])
def test_objects_are_counted_per_class_in_each_annotation_form(form, spec, scenes, shapes_data, tmp_path):
    data, annotations = write_set(tmp_path / form, scenes, form, shapes_data)

    assert validate_calibration(annotated(spec, data, annotations)).passed

    counts = objects_per_class(scenes)
    demanding = validate_calibration(annotated(spec, data, annotations, min_per_class=max(counts) + 1))
    assert {f.expectation for f in demanding.failed} == {SUM_BETWEEN}
    details = object_failures(demanding)
    assert sorted(details) == ["objects.0", "objects.1", "objects.2"]
    for index, name in enumerate(CLASSES):
        assert details[f"objects.{index}"].startswith(
            f"class {index} {name!r} has {counts[index]} objects in the calibration set, fewer than calibration.min_per_class "
            f"{max(counts) + 1}"
        )


def test_a_class_without_objects_is_named_with_the_fix(spec, scenes, shapes_data, tmp_path):
    without_triangles = [s for s in scenes if 2 not in s.labels]
    data, annotations = write_set(tmp_path / "no-triangles", without_triangles, "coco", shapes_data)

    report = validate_calibration(annotated(spec, data, annotations, min_samples=100))

    assert not report.passed
    assert [(f.expectation, f.column) for f in report.failed] == [(SUM_BETWEEN, "objects.2")]
    details = report.failed[0].details
    assert details.startswith(f"class 2 'triangle' has no objects in the calibration set (calibration.annotations {annotations})")
    assert details.endswith(
        "add images holding at least 10 'triangle' objects to calibration.data, with their boxes in calibration.annotations"
    )


def test_a_class_with_too_few_objects_is_named_with_its_count(spec, scenes, shapes_data, tmp_path):
    with_circles = [s for s in scenes if 1 in s.labels]
    rare = [s for s in scenes if 1 not in s.labels] + with_circles[:3]
    circles = objects_per_class(rare)[1]
    assert 0 < circles < 10
    data, annotations = write_set(tmp_path / "rare-circles", rare, "yolo", shapes_data)

    report = validate_calibration(annotated(spec, data, annotations, min_samples=100))

    assert list(object_failures(report)) == ["objects.1"]
    assert object_failures(report)["objects.1"].startswith(
        f"class 1 'circle' has {circles} objects in the calibration set, fewer than calibration.min_per_class 10 "
        "(the eval set's ground truth has "
    )


def write_image_folder(folder: Path, scenes: list, shapes_data) -> Path:
    """The scenes as PNG files named as their COCO images' file_name, and the COCO file beside the folder."""
    folder.mkdir()
    coco = shapes_data.coco_annotations(scenes)
    for record, scene in zip(coco["images"], scenes):
        pixels = np.clip(np.rint(scene.image.transpose(1, 2, 0) * 255), 0, 255).astype(np.uint8)
        Image.fromarray(pixels, mode="RGB").save(folder / record["file_name"])
    annotations = folder.with_suffix(".json")
    annotations.write_text(json.dumps(coco))
    return annotations


def test_an_image_folder_is_matched_to_coco_by_file_name(spec, scenes, shapes_data, tmp_path):
    annotations = write_image_folder(tmp_path / "all", scenes, shapes_data)
    assert validate_calibration(annotated(spec, tmp_path / "all", annotations)).passed

    without_rectangles = [s for s in scenes if 0 not in s.labels][:150]
    annotations = write_image_folder(tmp_path / "few", without_rectangles, shapes_data)
    report = validate_calibration(annotated(spec, tmp_path / "few", annotations, min_samples=100))

    assert list(object_failures(report)) == ["objects.0"]
    assert object_failures(report)["objects.0"].startswith("class 0 'rectangle' has no objects")


def test_spec_paths_resolve_and_mistakes_get_one_clear_error(spec, scenes, shapes_data, tmp_path):
    data, annotations = write_set(tmp_path / "set", scenes[:500], "yolo", shapes_data)
    written = yaml.safe_load(SHAPES_SPEC.read_text())
    for key in ("model", "checkpoint", "train"):
        written[key] = str(SHAPES_DIR / written[key])
    written["eval"]["data"] = str(SHAPES_DIR / written["eval"]["data"])
    written["eval"]["annotations"] = str(SHAPES_DIR / written["eval"]["annotations"])
    written["calibration"].update(data="set/calibration.npz", annotations="set/labels")
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(written))
    from_file = load_spec(tmp_path / "spec.yaml")
    assert from_file.calibration.annotations == tmp_path / "set" / "labels"
    # YOLO labels carry class indices only: the eval set's COCO categories name them.
    assert validate_calibration(from_file).passed

    (annotations / "7.txt").unlink()
    with pytest.raises(SpecError, match=r"^calibration\.annotations: .*7\.txt: calibration sample 6 \(7\): has no label file"):
        validate_calibration(from_file)

    with pytest.raises(ValidationError, match="'labels' .* and 'annotations' .* both count class coverage"):
        CalibrationSpec(data=data, labels="labels", annotations=annotations)

    renamed = shapes_data.coco_annotations(scenes[:500])
    renamed["categories"][2]["name"] = "wedge"
    (tmp_path / "renamed.json").write_text(json.dumps(renamed))
    with pytest.raises(CalibrationError, match=r"has categories \['rectangle', 'circle', 'wedge'\], the eval set's classes are"):
        validate_calibration(with_calibration(spec, data=data, annotations=tmp_path / "renamed.json"))

    digits = load_spec(DIGITS_SPEC)
    with pytest.raises(CalibrationError, match=r"calibration\.annotations .* for a detection model .* eval\.task is 'classification'"):
        validate_calibration(with_calibration(digits, labels=None, annotations=tmp_path / "renamed.json"))
