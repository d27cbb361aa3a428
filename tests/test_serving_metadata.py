"""The serving contract: built from the spec, written into the exported ONNX's metadata (and kept by the
conversions and the onnxruntime engine built from it) and into the published version's manifest."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import yaml
from typer.testing import CliRunner

from tests.conftest import DIGITS_SPEC
from tests.test_pull_fastest import FLEET, outcome
from tests.test_registry import ENVIRONMENT, lineage
from trtforge.backends.base import get_backend
from trtforge.cli import app
from trtforge.errors import SpecError, StageError
from trtforge.lineage import stage_spec_sha256
from trtforge.registry import TargetArtifacts, open_registry
from trtforge.registry.manifest import read_manifest
from trtforge.serving import CLASS_NAMES_KEY, METADATA_KEY, read_onnx_serving, serving_info
from trtforge.spec import Precision, Task, parse_spec, parse_target
from trtforge.stages.convert_precision import convert_precision
from trtforge.stages.export import export_onnx
from trtforge.stages.publish import publish_release
from trtforge.stages.runner import Stage
from trtforge.triton import LABELS_FILE, write_repository

ROOT = Path(__file__).resolve().parents[1]
DETECTOR_SPEC = ROOT / "examples" / "shapes-detector" / "spec.yaml"


def detector_data(tmp_path: Path) -> dict:
    """The shapes-detector spec as read from tmp_path, with a COCO file whose categories are listed out of id order."""
    categories = [{"id": 3, "name": "triangle"}, {"id": 1, "name": "rectangle"}, {"id": 2, "name": "circle"}]
    (tmp_path / "instances.json").write_text(json.dumps({"images": [], "annotations": [], "categories": categories}))
    data = yaml.safe_load(DETECTOR_SPEC.read_text())
    data["eval"]["annotations"] = "instances.json"
    return data


def detector_spec(tmp_path: Path, **changes):
    return parse_spec(detector_data(tmp_path) | changes, source="spec.yaml", base_dir=tmp_path)


def test_the_digits_contract_says_what_the_spec_declares_and_nothing_more(digits_spec):
    info = serving_info(digits_spec)
    assert info.task is Task.CLASSIFICATION
    (inp,) = info.inputs
    assert (inp.name, inp.dtype, inp.shape, inp.dims) == ("input", "float32", ["batch", 1, 8, 8], {"batch": (1, 32, 128)})
    assert inp.value_range == (0.0, 1.0)
    # Calibrated on ready-made arrays and no serving section: the preprocessing is not known, so absent.
    assert inp.preprocessing is None
    assert [(o.name, o.meaning) for o in info.outputs] == [("logits", "class_scores")]
    assert info.class_names is None and info.detection is None


def test_the_detector_contract_names_box_format_frame_and_coco_classes_by_id(tmp_path):
    info = serving_info(detector_spec(tmp_path, serving={"preprocessing": {"images": {"color": "rgb"}}}))
    assert info.task is Task.DETECTION
    (head,) = info.outputs
    assert (head.name, head.meaning, head.box_format, head.coordinates) == ("output0", "yolo_head", "cxcywh", "input_pixels")
    assert info.detection.model_dump() == {
        "decoder": "yolo",
        "conf": 0.001,
        "iou": 0.7,
        "max_det": 300,
        "box_format": "xyxy",
        "coordinates": "input_pixels",
    }
    assert info.class_names == ["rectangle", "circle", "triangle"]
    (inp,) = info.inputs
    assert inp.preprocessing_from == "serving"
    assert (inp.preprocessing.color, inp.preprocessing.layout, inp.preprocessing.scale) == ("rgb", "NCHW", 1 / 255)


def test_nms_outputs_and_segmentation_maps_are_described(tmp_path):
    data = yaml.safe_load(DETECTOR_SPEC.read_text())
    data["outputs"] = [{"name": n} for n in ("num_dets", "boxes", "scores", "classes")]
    data["eval"] |= {
        "annotations": "truth.npz",
        "classes": ["a", "b"],
        "postprocess": {"kind": "boxes_scores_classes", "num_dets": "num_dets"},
    }
    info = serving_info(parse_spec(data, base_dir=tmp_path))
    assert {o.name: (o.meaning, o.box_format) for o in info.outputs} == {
        "num_dets": ("num_detections", None),
        "boxes": ("boxes", "xyxy"),
        "scores": ("scores", None),
        "classes": ("classes", None),
    }
    segmenter = yaml.safe_load((ROOT / "examples" / "shapes-segmenter" / "spec.yaml").read_text())
    info = serving_info(parse_spec(segmenter, base_dir=tmp_path))
    assert info.segmentation.model_dump() == {"class_axis": 1, "ignore_index": 255}
    assert info.class_names == ["background", "rectangle", "circle", "triangle"]


@pytest.mark.parametrize(
    ("serving", "message"),
    [
        ({"preprocessing": {"image": {}}}, "serving.preprocessing.image: 'image' is not an input of the spec (['images'])"),
        ({"preprocessing": {"images": {"color": "gray"}}}, "serving.preprocessing.images: color 'gray' in layout NCHW gives"),
        ({"preprocessing": {"images": {"mean": [0.5]}}}, "give both 'mean' and 'std'"),
    ],
)
def test_a_bad_serving_section_is_one_error_naming_the_field(tmp_path, serving, message):
    with pytest.raises(SpecError) as caught:
        detector_spec(tmp_path, serving=serving)
    assert message in str(caught.value)


def test_serving_preprocessing_must_agree_with_the_calibration_images(tmp_path):
    data = detector_data(tmp_path)
    data["calibration"] = {"data": "images/", "preprocessing": {"color": "rgb", "resize": [64, 64]}}
    data["serving"] = {"preprocessing": {"images": {"color": "rgb"}}}
    with pytest.raises(SpecError, match=r"serving.preprocessing.images differs from calibration.preprocessing"):
        parse_spec(data, base_dir=tmp_path)
    del data["serving"]
    (inp,) = serving_info(parse_spec(data, base_dir=tmp_path)).inputs
    assert (inp.preprocessing_from, inp.preprocessing.resize) == ("calibration", (64, 64))


def test_the_export_key_follows_the_contract_not_every_eval_field(digits_spec):
    key = stage_spec_sha256(digits_spec, Stage.EXPORT)
    batch = digits_spec.model_copy(update={"eval": digits_spec.eval.model_copy(update={"batch_size": 7})})
    named = digits_spec.model_copy(update={"eval": digits_spec.eval.model_copy(update={"classes": list("0123456789")})})
    assert stage_spec_sha256(batch, Stage.EXPORT) == key
    assert stage_spec_sha256(named, Stage.EXPORT) != key


def test_the_exported_onnx_and_the_engines_built_from_it_carry_the_contract(tmp_path, digits_spec, digits_onnx):
    info = serving_info(digits_spec)
    metadata = {e.key: e.value for e in onnx.load(str(digits_onnx), load_external_data=False).metadata_props}
    assert json.loads(metadata[METADATA_KEY]) == json.loads(info.to_json())
    assert CLASS_NAMES_KEY not in metadata  # the digits spec names no classes
    # ModelOpt writes its models without the source's metadata; the conversion puts it back.
    calibration = {"input": np.random.default_rng(0).random((32, 1, 8, 8), dtype=np.float32)}
    fp16 = convert_precision(digits_onnx, Precision.FP16, calibration, digits_spec.precision, spec=digits_spec, cache_dir=tmp_path / "c")
    assert read_onnx_serving(fp16.onnx_path) == info
    target = parse_target({"backend": "onnxruntime", "precision": "fp16"})
    built = get_backend("onnxruntime").build(fp16.onnx_path, target, digits_spec, tmp_path / "engine")
    assert read_onnx_serving(built.engine_path) == info


def test_class_names_that_do_not_match_the_exported_model_fail_the_export(tmp_path, digits_spec, digits_checkpoint):
    wrong = digits_spec.model_copy(update={"eval": digits_spec.eval.model_copy(update={"classes": ["zero", "one", "two"]})})
    with pytest.raises(StageError) as caught:
        export_onnx(wrong, digits_checkpoint, tmp_path)
    assert "eval.classes: 3 class names ['zero', 'one', 'two'], but output 'logits' of the exported model has shape" in str(caught.value)
    assert "which is 10 classes" in str(caught.value)
    assert not (tmp_path / "model.onnx").exists()


def test_publish_writes_the_contract_into_the_manifest_and_show_prints_it(tmp_path, digits_spec):
    uri = f"file://{tmp_path / 'registry'}"
    version = publish_release(digits_spec, uri, [outcome(tmp_path / "build", *FLEET[0])], lineage(), {})
    manifest = open_registry(uri).manifest(digits_spec.name, version)
    assert manifest.serving == serving_info(digits_spec)

    shown = CliRunner().invoke(app, ["show", digits_spec.name, str(version), "--registry", uri])
    assert shown.exit_code == 0, shown.output
    assert "serving:\n  task: classification\n  input input: float32 ['batch', 1, 8, 8], batch 1..128 (opt 32)" in shown.output
    assert "class names: not declared in the spec" in shown.output
    as_json = CliRunner().invoke(app, ["show", digits_spec.name, str(version), "--registry", uri, "--json"])
    assert json.loads(as_json.output)["serving"]["outputs"] == [
        {"name": "logits", "meaning": "class_scores", "layout": "[batch, classes]", "box_format": None, "coordinates": None}
    ]

    # A manifest published before the contract existed still reads, without one.
    older = manifest.model_dump(mode="json", exclude={"serving"})
    assert read_manifest(json.dumps(older).encode(), "manifest.json", digits_spec.name, version).serving is None


def test_a_triton_repository_gets_the_classifiers_class_names_as_its_label_file(tmp_path, digits_spec, digits_onnx):
    named = digits_spec.model_copy(update={"eval": digits_spec.eval.model_copy(update={"classes": [f"digit {d}" for d in range(10)]})})
    target = parse_target({"backend": "onnxruntime", "precision": "fp32"})
    built = get_backend("onnxruntime").build(digits_onnx, target, digits_spec, tmp_path / "engine")
    engine = TargetArtifacts(tag=built.tag, record=built.record, files={"engine": built.engine_path, **built.extra_files})
    registry = open_registry(f"file://{tmp_path / 'registry'}")
    spec_lineage = {**lineage(), "spec_sha256": digits_spec.sha256()}
    registry.publish(digits_spec.name, [engine], lineage=spec_lineage, environment=ENVIRONMENT, serving=serving_info(named))
    repository = tmp_path / "repo"
    write_repository(registry.reader, digits_spec.name, repository, backend="onnxruntime", spec_path=DIGITS_SPEC, cache_dir=tmp_path / "c")
    model_dir = repository / digits_spec.name
    assert (model_dir / LABELS_FILE).read_text().splitlines() == [f"digit {d}" for d in range(10)]
    assert 'label_filename: "labels.txt"' in (model_dir / "config.pbtxt").read_text()
