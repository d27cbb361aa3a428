"""Calibration-set loading and validation, on the shipped digits set and faulty copies of it."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from pydantic import ValidationError
from typer.testing import CliRunner

from tests.conftest import DIGITS_DIR, DIGITS_SPEC, REPO
from trtforge.calibration import content_sha256, load_calibration
from trtforge.cli import app
from trtforge.errors import CalibrationError, DataFileError
from trtforge.spec import InputSpec, ModelSpec, Preprocessing, load_spec
from trtforge.stages.validate_calibration import CalibrationReport, validate_calibration

SHIPPED_SET = REPO / "calibration_data" / "digits" / "calibration.npz"
MAKE_SCRIPT = REPO / "calibration_data" / "digits" / "make_calibration.py"
GRAY_PNG = Preprocessing(color="gray", scale=1 / 255, layout="NCHW")

BETWEEN = "expect_column_values_to_be_between"
IN_SET = "expect_column_values_to_be_in_set"
MEAN_BETWEEN = "expect_column_mean_to_be_between"


@pytest.fixture(scope="module")
def digits_spec() -> ModelSpec:
    return load_spec(DIGITS_SPEC)


@pytest.fixture(scope="module")
def shipped() -> tuple[np.ndarray, np.ndarray]:
    with np.load(SHIPPED_SET) as archive:
        return archive["input"], archive["labels"]


def with_calibration(spec: ModelSpec, **changes) -> ModelSpec:
    return spec.model_copy(update={"calibration": spec.calibration.model_copy(update=changes)})


def failures(report: CalibrationReport) -> set[tuple[str, str | None]]:
    return {(f.expectation, f.column) for f in report.failed}


def failure(report: CalibrationReport, expectation: str, column: str | None):
    matches = [f for f in report.failed if (f.expectation, f.column) == (expectation, column)]
    assert len(matches) == 1, f"expected one failure of {expectation} on {column}, got {report.failed}"
    return matches[0]


def write_png_folder(folder: Path, images: np.ndarray, labels: np.ndarray) -> None:
    """Digits as 8-bit gray PNGs, one subfolder per class."""
    for index, (image, label) in enumerate(zip(images, labels)):
        (folder / str(label)).mkdir(parents=True, exist_ok=True)
        pixels = np.clip(np.rint(image[0] * 255), 0, 255).astype(np.uint8)
        Image.fromarray(pixels, mode="L").save(folder / str(label) / f"{index:04d}.png")


@pytest.fixture(scope="module")
def png_folder(tmp_path_factory, shipped) -> Path:
    folder = tmp_path_factory.mktemp("digits-png")
    write_png_folder(folder, *shipped)
    return folder


def image_spec(spec: ModelSpec, folder: Path) -> ModelSpec:
    # No expected_range: the [0, 1] range then comes from the preprocessing (scale 1/255).
    return with_calibration(spec, data=folder, labels="classes", preprocessing=GRAY_PNG, expected_range=None)


# ---------------------------------------------------------------- the shipped set


def test_shipped_digits_set_passes_and_writes_result_and_data_docs(digits_spec, shipped, tmp_path):
    report = validate_calibration(digits_spec, out_dir=tmp_path / "out")

    assert report.passed, report.failed
    assert report.failed == []
    assert report.samples == 600
    assert report.sha256 == content_sha256({"input": shipped[0]}, shipped[1])
    result = json.loads(report.result_json.read_text())
    assert result["success"] is True
    assert len(result["results"]) == len(json.loads(report.suite_json.read_text())["expectations"])
    assert report.data_docs == tmp_path / "out" / "data_docs" / "index.html"
    assert report.data_docs.is_file()
    assert list((tmp_path / "out" / "data_docs" / "validations").rglob("*.html"))
    assert not list((tmp_path / "out").glob(".*partial*"))
    json.dumps(report.model_dump(mode="json"))


def test_shipped_set_is_a_stratified_draw_from_the_train_split_and_regenerates(shipped):
    images, labels = shipped
    assert images.dtype == np.float32 and images.shape == (600, 1, 8, 8)
    assert 0.0 <= images.min() and images.max() <= 1.0
    assert np.bincount(labels, minlength=10).min() >= 10

    sys.path.insert(0, str(DIGITS_DIR))
    try:
        from digits_data import load_split
    finally:
        sys.path.remove(str(DIGITS_DIR))
    train = {x.tobytes(): y for x, y in zip(*load_split("train"))}
    test = {x.tobytes() for x in load_split("test")[0]}
    assert all(train.get(x.tobytes()) == y for x, y in zip(images, labels))
    assert not any(x.tobytes() in test for x in images)

    module_spec = importlib.util.spec_from_file_location("make_calibration", MAKE_SCRIPT)
    make_calibration = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(make_calibration)
    rebuilt = make_calibration.build_calibration_set()
    np.testing.assert_array_equal(rebuilt["input"], images)
    np.testing.assert_array_equal(rebuilt["labels"], labels)


# ---------------------------------------------------------------- faults in a copy of the set


def _nan(x, y):
    x = x.copy()
    x[5, 0, 3, 3] = np.nan
    return x, y


def _inf(x, y):
    x = x.copy()
    x[7, 0, 0, 0] = np.inf
    return x, y


def _duplicates(x, y):
    x = x.copy()
    x[10:20] = x[0:10]
    return x, y


def _constant(x, y):
    x = x.copy()
    # Each constant image differs from the others, so only the near-constant check can catch them.
    x[30:45] = (np.arange(15, dtype=np.float32) / 100)[:, None, None, None]
    return x, y


def _missing_class(x, y):
    keep = y != 3
    return x[keep], y[keep]


def _rare_class(x, y):
    sevens = np.flatnonzero(y == 7)
    keep = np.ones(len(y), dtype=bool)
    keep[sevens[5:]] = False
    return x[keep], y[keep]


FAULTS = {
    "nan": (_nan, {(BETWEEN, "input.nan")}, ["5"]),
    "inf": (_inf, {(BETWEEN, "input.inf"), (BETWEEN, "input.max")}, ["7"]),
    "wrong-shape": (lambda x, y: (x[:, :, :7, :7].copy(), y), {(BETWEEN, "input.dim2"), (BETWEEN, "input.dim3")}, None),
    "wrong-rank": (lambda x, y: (x[:, 0].copy(), y), {(IN_SET, "input.ndim")}, None),
    "wrong-dtype": (lambda x, y: (x.astype(np.float64), y), {(IN_SET, "input.dtype")}, None),
    # The drift checks of a set 255x too large fail together: one line names the mistake.
    "unnormalized": (lambda x, y: (x * 255, y), {(BETWEEN, "input.max"), (MEAN_BETWEEN, "input.c0.mean")}, None),
    "too-few": (lambda x, y: (x[:400], y[:400]), {("expect_table_row_count_to_be_between", None)}, []),
    "duplicates": (_duplicates, {(IN_SET, "duplicate")}, [str(i) for i in range(10, 20)]),
    "constant": (_constant, {(BETWEEN, "input.std")}, [str(i) for i in range(30, 45)]),
    "missing-class": (_missing_class, {("expect_column_distinct_values_to_contain_set", "label")}, []),
    "rare-class": (_rare_class, {(BETWEEN, "class_count")}, None),
}


@pytest.mark.parametrize("fault", list(FAULTS))
def test_each_fault_fails_naming_its_expectation(fault, digits_spec, shipped, tmp_path):
    inject, expected, expected_samples = FAULTS[fault]
    images, labels = inject(*shipped)
    path = tmp_path / f"{fault}.npz"
    np.savez(path, input=images, labels=labels)

    report = validate_calibration(digits_spec, path)

    assert not report.passed
    assert failures(report) == expected
    first = failure(report, *sorted(expected, key=str)[0])
    assert first.details
    if expected_samples is not None:
        assert first.samples == expected_samples


def test_fault_details_say_what_is_wrong(digits_spec, shipped, tmp_path):
    images, labels = shipped
    np.savez(tmp_path / "raw.npz", input=images * 255, labels=labels)
    unnormalized = failure(validate_calibration(digits_spec, tmp_path / "raw.npz"), BETWEEN, "input.max")
    assert "looks unnormalized" in unnormalized.details
    assert len(unnormalized.samples) == 600

    rare_images, rare_labels = _rare_class(images, labels)
    np.savez(tmp_path / "rare.npz", input=rare_images, labels=rare_labels)
    rare = failure(validate_calibration(digits_spec, tmp_path / "rare.npz"), BETWEEN, "class_count")
    assert "7 (5 samples)" in rare.details
    assert len(rare.samples) == 5
    assert set(rare_labels[[int(s) for s in rare.samples]]) == {7}

    missing_images, missing_labels = _missing_class(images, labels)
    np.savez(tmp_path / "missing.npz", input=missing_images, labels=missing_labels)
    missing = failure(validate_calibration(digits_spec, tmp_path / "missing.npz"), "expect_column_distinct_values_to_contain_set", "label")
    assert "classes [3] have no samples" in missing.details


def test_halved_contrast_passes_the_default_drift_tolerance_and_fails_a_tight_one(digits_spec, shipped, tmp_path):
    images, labels = shipped
    np.savez(tmp_path / "halved.npz", input=images * 0.5, labels=labels)

    assert validate_calibration(digits_spec, tmp_path / "halved.npz").passed
    tight = validate_calibration(with_calibration(digits_spec, distribution_tolerance=0.25), tmp_path / "halved.npz")

    assert failures(tight) == {(MEAN_BETWEEN, "input.c0.mean"), (MEAN_BETWEEN, "input.c0.std")}
    assert all(f.details.endswith("check its source and preprocessing") for f in tight.failed)


def test_thresholds_come_from_the_spec(digits_spec, shipped, tmp_path):
    images, labels = _duplicates(*shipped)
    np.savez(tmp_path / "dups.npz", input=images, labels=labels)
    lenient = with_calibration(digits_spec, max_duplicate_ratio=0.02, min_samples=600)
    assert validate_calibration(lenient, tmp_path / "dups.npz").passed
    strict = with_calibration(digits_spec, min_samples=601)
    assert failures(validate_calibration(strict)) == {("expect_table_row_count_to_be_between", None)}


# ---------------------------------------------------------------- image folders


def test_image_folder_validates_like_its_npz(digits_spec, shipped, png_folder, tmp_path):
    spec = image_spec(digits_spec, png_folder)
    loaded = load_calibration(spec)
    images, labels = shipped
    order = [int(Path(name).stem) for name in loaded.sample_names]
    np.testing.assert_allclose(loaded.arrays["input"], images[order], atol=0.5 / 255)
    np.testing.assert_array_equal(loaded.labels, labels[order])

    from_images = validate_calibration(spec)
    from_npz = validate_calibration(digits_spec)
    assert from_images.passed and from_npz.passed
    assert from_images.samples == from_npz.samples == 600

    drifted = tmp_path / "drifted"
    write_png_folder(drifted, images * 0.5, labels)
    np.savez(tmp_path / "drifted.npz", input=images * 0.5, labels=labels)
    tight = with_calibration(digits_spec, distribution_tolerance=0.25)
    drifted_images = validate_calibration(image_spec(tight, drifted))
    drifted_npz = validate_calibration(tight, tmp_path / "drifted.npz")
    assert not drifted_images.passed
    assert failures(drifted_images) == failures(drifted_npz)


def test_corrupt_image_files_are_reported_by_name(digits_spec, shipped, tmp_path):
    folder = tmp_path / "images"
    write_png_folder(folder, *shipped)
    garbage = sorted((folder / "4").iterdir())[0]
    garbage.write_bytes(b"not a png at all")
    truncated = sorted((folder / "9").iterdir())[0]
    truncated.write_bytes(truncated.read_bytes()[:40])
    names = sorted(f"{p.parent.name}/{p.name}" for p in (garbage, truncated))
    spec = image_spec(digits_spec, folder)

    report = validate_calibration(spec)

    assert not report.passed
    assert failures(report) == {(IN_SET, "readable")}
    corrupt = failure(report, IN_SET, "readable")
    assert sorted(corrupt.samples) == names
    assert names[0] in corrupt.details and names[1] in corrupt.details
    assert report.samples == 598
    with pytest.raises(CalibrationError, match=rf"2 image file\(s\) .* cannot be read: {names[0]} "):
        load_calibration(spec)


def test_image_preprocessing_rgb_resize_mean_std_nhwc(digits_spec, tmp_path):
    folder = tmp_path / "rgb"
    folder.mkdir()
    pixels = np.arange(4 * 6 * 3, dtype=np.uint8).reshape(4, 6, 3) * 3
    Image.fromarray(pixels, mode="RGB").save(folder / "a.png")
    Image.fromarray(pixels[::-1].copy(), mode="RGB").resize((12, 8)).save(folder / "b.png")
    mean, std = [0.4, 0.5, 0.6], [0.2, 0.25, 0.5]
    spec = digits_spec.model_copy(
        update={
            "inputs": [InputSpec(name="input", shape=["batch", 4, 6, 3], dynamic={"batch": {"min": 1, "opt": 2, "max": 8}})],
            "calibration": digits_spec.calibration.model_copy(
                update={
                    "data": folder,
                    "labels": None,
                    "expected_range": None,
                    "preprocessing": Preprocessing(color="rgb", resize=(4, 6), layout="NHWC", mean=mean, std=std),
                }
            ),
        }
    )

    loaded = load_calibration(spec)

    assert loaded.sample_names == ["a.png", "b.png"]
    assert loaded.arrays["input"].shape == (2, 4, 6, 3)
    assert loaded.arrays["input"].dtype == np.float32
    expected_a = (pixels / 255.0 - np.array(mean)) / np.array(std)
    np.testing.assert_allclose(loaded.arrays["input"][0], expected_a, rtol=1e-5, atol=1e-5)


def test_images_of_different_sizes_need_resize(digits_spec, tmp_path):
    folder = tmp_path / "sizes"
    folder.mkdir()
    for name, size in (("a.png", 8), ("b.png", 8), ("odd.png", 9)):
        Image.fromarray(np.full((size, size), 100, np.uint8), mode="L").save(folder / name)
    spec = with_calibration(digits_spec, data=folder, labels=None, preprocessing=GRAY_PNG)
    with pytest.raises(
        CalibrationError,
        match=r"odd\.png differ: set calibration\.preprocessing\.resize to \[8, 8\], the \(height, width\) of input 'input'",
    ):
        load_calibration(spec)
    resized = with_calibration(spec, preprocessing=GRAY_PNG.model_copy(update={"resize": (8, 8)}))
    assert load_calibration(resized).arrays["input"].shape == (3, 1, 8, 8)


# ---------------------------------------------------------------- known mistakes, named in one line


@pytest.fixture(scope="module")
def normalized_digits_spec(digits_spec, tmp_path_factory) -> ModelSpec:
    """The digits spec with its eval set normalised (mean 0.5, std 0.25 on 0-1 pixels), as a mean/std model's would be."""
    folder = tmp_path_factory.mktemp("normalized-eval")
    with np.load(DIGITS_DIR / "eval.npz") as archive:
        np.savez(folder / "eval.npz", input=(archive["input"] - 0.5) / 0.25, labels=archive["labels"])
    return digits_spec.model_copy(update={"eval": digits_spec.eval.model_copy(update={"data": folder / "eval.npz"})})


def normalized_images(spec: ModelSpec, folder: Path, **preprocessing) -> ModelSpec:
    return with_calibration(
        spec, data=folder, labels="classes", expected_range=None, preprocessing=GRAY_PNG.model_copy(update=preprocessing)
    )


def drift_failures(report: CalibrationReport) -> list:
    return [f for f in report.failed if f.expectation == MEAN_BETWEEN]


def test_mean_std_in_8_bit_units_with_scale_1_255_is_named_in_one_line(normalized_digits_spec, png_folder):
    honest = normalized_images(normalized_digits_spec, png_folder, mean=[0.5], std=[0.25])
    assert validate_calibration(honest).passed

    report = validate_calibration(normalized_images(normalized_digits_spec, png_folder, mean=[127.5], std=[63.75]))

    assert not report.passed
    # The drift tolerance lets this one through on digits; the spread check (16x) does not.
    [drift] = drift_failures(report)
    assert drift.column == "input.c0.std"
    assert "spreads about 1/255 of the eval set's" in drift.details
    assert "calibration.preprocessing.mean [127.5] and std [63.75] are in 0-255 units" in drift.details
    assert drift.details.endswith("give them in 0-1 units (mean: [0.5], std: [0.25])")


IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def test_rgb_mean_std_in_8_bit_units_is_one_line_where_great_expectations_fails_every_channel(tmp_path):
    shapes_dir = REPO / "examples" / "shapes-detector"
    sys.path.insert(0, str(shapes_dir))
    try:
        import detector_data
    finally:
        sys.path.remove(str(shapes_dir))
    detector_data.write_data()
    mean, std = np.array(IMAGENET_MEAN)[:, None, None], np.array(IMAGENET_STD)[:, None, None]
    with np.load(detector_data.DATA / "eval.npz") as archive:
        np.savez(tmp_path / "eval.npz", images=((archive["images"] - mean) / std).astype(np.float32), image_ids=archive["image_ids"])
    folder = tmp_path / "images"
    folder.mkdir()
    for index, scene in enumerate(detector_data.load_split("calibration")):
        pixels = np.clip(np.rint(scene.image.transpose(1, 2, 0) * 255), 0, 255).astype(np.uint8)
        Image.fromarray(pixels, mode="RGB").save(folder / f"{index:04d}.png")
    shapes = load_spec(shapes_dir / "spec.yaml")
    shapes = shapes.model_copy(update={"eval": shapes.eval.model_copy(update={"data": tmp_path / "eval.npz"})})

    def read_with(mean: list[float], std: list[float]) -> ModelSpec:
        return with_calibration(shapes, data=folder, annotations=None, expected_range=None, preprocessing=Preprocessing(mean=mean, std=std))

    assert validate_calibration(read_with(IMAGENET_MEAN, IMAGENET_STD)).passed
    in_8_bit = [round(m * 255, 3) for m in IMAGENET_MEAN], [round(s * 255, 3) for s in IMAGENET_STD]
    report = validate_calibration(read_with(*in_8_bit), out_dir=tmp_path / "out")

    result = json.loads(report.result_json.read_text())
    failed_checks = [r for r in result["results"] if not r["success"] and r["expectation_config"]["type"] == MEAN_BETWEEN]
    assert len(failed_checks) >= 6
    [drift] = drift_failures(report)
    assert f"calibration.preprocessing.mean {in_8_bit[0]} and std {in_8_bit[1]} are in 0-255 units" in drift.details
    assert drift.details.endswith(f"give them in 0-1 units (mean: {IMAGENET_MEAN}, std: {IMAGENET_STD})")


def test_missing_scale_is_named_in_one_line(normalized_digits_spec, png_folder):
    report = validate_calibration(normalized_images(normalized_digits_spec, png_folder, scale=1.0, mean=[0.5], std=[0.25]))

    [drift] = drift_failures(report)
    assert "spreads about 255x the eval set's" in drift.details
    assert "calibration.preprocessing.scale is 1, which leaves the pixels in 0-255" in drift.details
    assert drift.details.endswith("set calibration.preprocessing.scale to 0.003921568627 (1/255)")


def test_unscaled_array_set_is_named_in_one_line(digits_spec, shipped, tmp_path):
    images, labels = shipped
    np.savez(tmp_path / "raw.npz", input=images * 255, labels=labels)

    [drift] = drift_failures(validate_calibration(digits_spec, tmp_path / "raw.npz"))

    assert "'input' spreads about 255x the eval set's" in drift.details
    assert "divide the pixels by 255" in drift.details


def test_nhwc_array_for_an_nchw_model_is_named_in_one_line(digits_spec, shipped, tmp_path):
    images, labels = shipped
    np.savez(tmp_path / "nhwc.npz", input=images.transpose(0, 2, 3, 1), labels=labels)

    report = validate_calibration(digits_spec, tmp_path / "nhwc.npz")

    [layout] = report.failed
    assert layout.column == "input.dim1"
    assert layout.details.startswith("'input' is laid out NHWC (600, 8, 8, 1) where the model takes NCHW (600, 1, 8, 8)")
    assert layout.details.endswith("transpose the set (array.transpose(0, 3, 1, 2)) before saving calibration.data")


def test_nhwc_image_folder_for_an_nchw_model_names_the_layout_field(digits_spec, png_folder):
    spec = image_spec(digits_spec, png_folder)
    spec = with_calibration(spec, preprocessing=GRAY_PNG.model_copy(update={"layout": "NHWC"}))

    [layout] = validate_calibration(spec).failed

    assert "'input' is laid out NHWC (600, 8, 8, 1) where the model takes NCHW" in layout.details
    assert layout.details.endswith("calibration.preprocessing.layout is NHWC, set it to NCHW")


def test_images_resized_to_another_size_than_the_input_name_the_resize_field(digits_spec, shipped, png_folder, tmp_path):
    resized = with_calibration(image_spec(digits_spec, png_folder), preprocessing=GRAY_PNG.model_copy(update={"resize": (7, 7)}))

    report = validate_calibration(resized)

    [size] = [f for f in report.failed if f.expectation == BETWEEN and f.column in ("input.dim2", "input.dim3")]
    assert size.column == "input.dim2"
    assert size.details == (
        "calibration.preprocessing.resize [7, 7] makes the images 7x7 (height x width), but input 'input' takes 8x8 "
        "(shape [batch, 1, 8, 8]): set calibration.preprocessing.resize to [8, 8]"
    )

    large = tmp_path / "large"
    for index, (image, label) in enumerate(zip(*shipped)):
        (large / str(label)).mkdir(parents=True, exist_ok=True)
        pixels = np.clip(np.rint(image[0] * 255), 0, 255).astype(np.uint8)
        Image.fromarray(pixels, mode="L").resize((12, 12)).save(large / str(label) / f"{index:04d}.png")
    [unset] = [f for f in validate_calibration(image_spec(digits_spec, large)).failed if f.column in ("input.dim2", "input.dim3")]
    assert unset.details.startswith("the images are 12x12 (height x width) and calibration.preprocessing.resize is unset")
    assert unset.details.endswith("set calibration.preprocessing.resize to [8, 8]")


# ---------------------------------------------------------------- bad input to the loader


def test_loader_errors_name_the_file_and_the_fix(digits_spec, shipped, tmp_path):
    images, labels = shipped
    np.savez(tmp_path / "wrong_key.npz", pixels=images, labels=labels)
    with pytest.raises(CalibrationError, match=r"wrong_key\.npz has no array for input\(s\) \['input'\]"):
        load_calibration(digits_spec, tmp_path / "wrong_key.npz")

    np.savez(tmp_path / "no_labels.npz", input=images)
    with pytest.raises(CalibrationError, match=r"no_labels\.npz has no labels array 'labels'"):
        load_calibration(digits_spec, tmp_path / "no_labels.npz")

    np.savez(tmp_path / "short_labels.npz", input=images, labels=labels[:10])
    with pytest.raises(CalibrationError, match="different numbers of samples"):
        load_calibration(digits_spec, tmp_path / "short_labels.npz")

    (tmp_path / "broken.npz").write_bytes(b"PK\x03\x04garbage")
    with pytest.raises(DataFileError, match=r"calibration data .*broken\.npz is not a readable \.npz .*numpy\.savez"):
        load_calibration(digits_spec, tmp_path / "broken.npz")

    (tmp_path / "set.csv").write_text("1,2,3\n")
    with pytest.raises(CalibrationError, match=r"unsupported type '\.csv'"):
        load_calibration(digits_spec, tmp_path / "set.csv")

    with pytest.raises(CalibrationError, match="does not exist"):
        load_calibration(digits_spec, tmp_path / "absent.npz")

    with pytest.raises(CalibrationError, match="no 'calibration' section"):
        load_calibration(digits_spec.model_copy(update={"calibration": None}))

    loose = tmp_path / "loose"
    loose.mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8), mode="L").save(loose / "x.png")
    with pytest.raises(CalibrationError, match=r"outside class subfolders \(x\.png\)"):
        load_calibration(with_calibration(digits_spec, data=loose, preprocessing=GRAY_PNG))


def test_npy_feeds_a_single_input_model(digits_spec, shipped, tmp_path):
    images, _ = shipped
    np.save(tmp_path / "set.npy", images)
    no_labels = with_calibration(digits_spec, labels=None)
    loaded = load_calibration(no_labels, tmp_path / "set.npy")
    np.testing.assert_array_equal(loaded.arrays["input"], images)
    assert loaded.sha256 == content_sha256({"input": images}, None)
    assert validate_calibration(no_labels, tmp_path / "set.npy").passed
    with pytest.raises(CalibrationError, match=r"\.npy, which holds no labels"):
        load_calibration(digits_spec, tmp_path / "set.npy")


def test_preprocessing_needs_one_mean_and_std_per_channel():
    with pytest.raises(ValidationError, match="'mean' needs 3 values"):
        Preprocessing(color="rgb", mean=[0.5], std=[0.5])
    with pytest.raises(ValidationError, match="both 'mean' and 'std'"):
        Preprocessing(color="gray", mean=[0.5])
    with pytest.raises(ValidationError, match="must be > 0"):
        Preprocessing(color="gray", mean=[0.5], std=[0.0])


# ---------------------------------------------------------------- the command


def test_cli_exit_codes_and_json(digits_spec, shipped, tmp_path):
    runner = CliRunner()
    passed = runner.invoke(app, ["validate-calibration", str(DIGITS_SPEC), "--json"])
    assert passed.exit_code == 0, passed.output
    assert json.loads(passed.stdout) == {"passed": True, "samples": 600, "failed": []}

    images, labels = _duplicates(*shipped)
    np.savez(tmp_path / "dups.npz", input=images, labels=labels)
    failed = runner.invoke(app, ["validate-calibration", str(DIGITS_SPEC), "--data", str(tmp_path / "dups.npz"), "--json"])
    assert failed.exit_code == 1
    payload = json.loads(failed.stdout)
    assert payload["passed"] is False and payload["samples"] == 600
    assert [set(f) for f in payload["failed"]] == [{"expectation", "column", "details", "samples"}]
    assert payload["failed"][0]["column"] == "duplicate"
    assert payload["failed"][0]["samples"] == [str(i) for i in range(10, 20)]

    text = runner.invoke(
        app, ["validate-calibration", str(DIGITS_SPEC), "--data", str(tmp_path / "dups.npz"), "--out", str(tmp_path / "out")]
    )
    assert text.exit_code == 1
    assert "FAILED 1 expectation(s)" in text.stdout and "[duplicate]" in text.stdout
    assert (tmp_path / "out" / "calibration_validation.json").is_file()


def test_cli_reads_calibration_paths_relative_to_the_spec(shipped, tmp_path):
    spec_data = yaml.safe_load(DIGITS_SPEC.read_text())
    spec_data["eval"]["data"] = str(DIGITS_DIR / "eval.npz")
    spec_data["calibration"]["data"] = "small.npz"
    spec_data["calibration"]["min_samples"] = 1000
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec_data))
    np.savez(tmp_path / "small.npz", input=shipped[0], labels=shipped[1])

    result = CliRunner().invoke(app, ["validate-calibration", str(tmp_path / "spec.yaml"), "--json"])

    assert result.exit_code == 1
    assert [f["expectation"] for f in json.loads(result.stdout)["failed"]] == ["expect_table_row_count_to_be_between"]
