"""Stage 'convert-precision' on real models with real ModelOpt and onnxruntime CPU."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import trtforge.stages.convert_precision as convert_module
from trtforge.errors import StageError
from trtforge.spec import ModelSpec, Precision, PrecisionOptions, parse_spec
from trtforge.stages.convert_precision import ConversionResult, convert_precision

REPO = Path(__file__).resolve().parents[1]
DIGITS_DIR = REPO / "examples" / "digits"
# 10 batches at the digits spec's opt batch of 32.
DIGITS_CALIBRATION_SAMPLES = 320
# fp16 keeps ~3 significant digits; the digits logits reach ~20, so 0.05 is about 0.25% of their range.
FP16_LOGIT_TOLERANCE = 0.05
INT8_MAX_ACCURACY_DROP = 0.01
# Cosine similarity of the logits to fp32 on random images, per precision. Random-weight ViT-B/16 loses much
# more to per-tensor int8 activations over its 12 blocks: 0.81-0.88 per image, the same when onnxruntime runs
# the Q/DQ graph unfused (pure fake-quantization), so that is int8 rounding, not a conversion fault. The bound
# 0.75 separates it from a broken calibration or Q/DQ placement (near 0); it does not measure tuned accuracy.
RESNET_COSINE = {"int8": 0.99, "fp16": 0.999}
VIT_COSINE = {"int8": 0.75, "fp16": 0.999}


def _load_digits_split(split: str) -> tuple[np.ndarray, np.ndarray]:
    module_spec = importlib.util.spec_from_file_location("digits_data", DIGITS_DIR / "digits_data.py")
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.load_split(split)


@pytest.fixture(scope="module")
def digits_calibration() -> dict[str, np.ndarray]:
    images, _ = _load_digits_split("train")
    return {"input": images[:DIGITS_CALIBRATION_SAMPLES]}


@pytest.fixture(scope="module")
def digits_eval() -> tuple[np.ndarray, np.ndarray]:
    with np.load(DIGITS_DIR / "eval.npz") as archive:
        return archive["input"], archive["labels"]


@pytest.fixture(scope="module")
def precision_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("precision-cache")


@pytest.fixture(scope="module")
def digits_int8(digits_onnx, digits_spec, digits_calibration, precision_cache) -> ConversionResult:
    return convert_precision(
        digits_onnx, Precision.INT8, digits_calibration, PrecisionOptions(), spec=digits_spec, cache_dir=precision_cache
    )


def _run(path: Path, feeds: dict[str, np.ndarray]) -> np.ndarray:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    # The onnxruntime backend's build level. At ORT_ENABLE_ALL, onnxruntime 1.32's NchwcTransformer
    # segfaults while creating a session for AutoCast's fp16 ViT-B/16.
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)[0]


def _top1(path: Path, images: np.ndarray, labels: np.ndarray) -> float:
    return float((_run(path, {"input": images}).argmax(axis=1) == labels).mean())


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.reshape(len(a), -1).astype(np.float64), b.reshape(len(b), -1).astype(np.float64)
    return (a * b).sum(axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def _producers(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    return {out: node for node in model.graph.node for out in node.output}


def _is_qdq_fed(model: onnx.ModelProto, node: onnx.NodeProto, index: int) -> bool:
    """Input ``index`` of ``node`` comes from a DequantizeLinear whose input is quantized (a Q node or an integer/fp8 initializer)."""
    producers = _producers(model)
    dequantize = producers.get(node.input[index])
    if dequantize is None or dequantize.op_type != "DequantizeLinear":
        return False
    source = dequantize.input[0]
    if source in producers:
        return producers[source].op_type == "QuantizeLinear"
    initializer = next(i for i in model.graph.initializer if i.name == source)
    return initializer.data_type != TensorProto.FLOAT


def _forbid_conversion(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("ModelOpt was started, but this call had to be answered without converting")

    monkeypatch.setattr(convert_module, "run_isolated", fail)


def test_fp32_is_the_input_as_is(digits_onnx, digits_spec, tmp_path):
    result = convert_precision(digits_onnx, Precision.FP32, None, PrecisionOptions(), spec=digits_spec, cache_dir=tmp_path)
    assert result.onnx_path == digits_onnx
    assert result.method == "as-is" and result.qdq_node_count == 0 and result.quantized_op_types == {}
    assert result.kept_op_types["Conv"] == 2 and result.kept_op_types["Gemm"] == 2
    assert result.modelopt_version is None and not result.cached
    assert list(tmp_path.iterdir()) == []


def test_int8_digits_keeps_accuracy_within_one_point(digits_onnx, digits_int8, digits_eval):
    images, labels = digits_eval
    fp32_accuracy = _top1(digits_onnx, images, labels)
    int8_accuracy = _top1(digits_int8.onnx_path, images, labels)
    assert fp32_accuracy > 0.95
    assert int8_accuracy >= fp32_accuracy - INT8_MAX_ACCURACY_DROP, (fp32_accuracy, int8_accuracy)

    model = onnx.load(digits_int8.onnx_path)
    convolutions = [n for n in model.graph.node if n.op_type == "Conv"]
    assert convolutions and all(_is_qdq_fed(model, conv, 0) and _is_qdq_fed(model, conv, 1) for conv in convolutions)
    qdq = sum(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in model.graph.node)
    assert digits_int8.qdq_node_count == qdq > 0
    assert digits_int8.quantized_op_types["Conv"] == len(convolutions)
    assert digits_int8.method == "entropy" and digits_int8.precision is Precision.INT8
    assert digits_int8.calibration_samples == DIGITS_CALIBRATION_SAMPLES
    assert digits_int8.modelopt_version == "0.47.0"
    assert model.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT


def test_second_call_is_a_cache_hit_without_recalibrating(
    digits_onnx, digits_spec, digits_calibration, precision_cache, digits_int8, monkeypatch
):
    _forbid_conversion(monkeypatch)
    again = convert_precision(
        digits_onnx, Precision.INT8, digits_calibration, PrecisionOptions(), spec=digits_spec, cache_dir=precision_cache
    )
    assert again.cached and not digits_int8.cached
    assert again.onnx_path == digits_int8.onnx_path and again.sha256 == digits_int8.sha256
    assert again.cache_key == digits_int8.cache_key


def test_cache_key_follows_calibration_digest_and_options(
    digits_onnx, digits_spec, digits_calibration, precision_cache, digits_int8, monkeypatch
):
    _forbid_conversion(monkeypatch)
    for changed in (
        {"calibration_sha256": "a-different-calibration-set"},
        {"options": PrecisionOptions(calibration_method="max")},
        {"calibration": {"input": digits_calibration["input"][:-1]}},
    ):
        arguments = {"calibration": digits_calibration, "options": PrecisionOptions(), **changed}
        with pytest.raises(AssertionError, match="ModelOpt was started"):
            convert_precision(
                digits_onnx,
                Precision.INT8,
                arguments["calibration"],
                arguments["options"],
                spec=digits_spec,
                cache_dir=precision_cache,
                calibration_sha256=arguments.get("calibration_sha256"),
            )


def test_options_int8_does_not_read_leave_its_cache_key_alone(
    digits_onnx, digits_spec, digits_calibration, precision_cache, digits_int8, monkeypatch
):
    """fp16's options and the precision ladder's settings decide no int8 conversion: changing them recalibrates nothing."""
    _forbid_conversion(monkeypatch)
    unrelated = PrecisionOptions(keep_fp32_op_types=["Relu"], keep_fp32_nodes=["node_linear"], ladder={"max_steps": 7, "enabled": True})
    again = convert_precision(digits_onnx, Precision.INT8, digits_calibration, unrelated, spec=digits_spec, cache_dir=precision_cache)
    assert again.cached and again.cache_key == digits_int8.cache_key


def test_tampered_cache_entry_is_discarded_not_served(digits_onnx, digits_spec, digits_calibration, tmp_path, digits_int8, monkeypatch):
    cache = tmp_path / "cache"
    entry = cache / digits_int8.cache_key
    entry.mkdir(parents=True)
    for source in digits_int8.onnx_path.parent.iterdir():
        (entry / source.name).write_bytes(source.read_bytes())
    with open(entry / "model.onnx", "ab") as handle:
        handle.write(b"\0")
    _forbid_conversion(monkeypatch)
    with pytest.raises(AssertionError, match="ModelOpt was started"):
        convert_precision(digits_onnx, Precision.INT8, digits_calibration, PrecisionOptions(), spec=digits_spec, cache_dir=cache)
    assert not entry.exists()


def test_excluded_op_types_stay_unquantized(digits_onnx, digits_spec, digits_calibration, tmp_path):
    options = PrecisionOptions(calibration_method="max", exclude_op_types=["Conv"])
    result = convert_precision(digits_onnx, Precision.INT8, digits_calibration, options, spec=digits_spec, cache_dir=tmp_path)
    assert result.method == "max"
    assert "Conv" not in result.quantized_op_types and result.kept_op_types["Conv"] == 2
    model = onnx.load(result.onnx_path)
    gemms = [n for n in model.graph.node if n.op_type == "Gemm"]
    assert any(_is_qdq_fed(model, gemm, 0) and _is_qdq_fed(model, gemm, 1) for gemm in gemms)


def test_fp16_digits_stays_within_tolerance_of_fp32(digits_onnx, digits_spec, digits_calibration, digits_eval, tmp_path, capfd):
    result = convert_precision(digits_onnx, Precision.FP16, digits_calibration, PrecisionOptions(), spec=digits_spec, cache_dir=tmp_path)
    # ModelOpt logs to stdout, which belongs to the CLI's --json output.
    assert capfd.readouterr().out == ""
    assert result.method == "autocast" and result.qdq_node_count == 0
    assert result.quantized_op_types["Conv"] == 2 and "Conv" not in result.kept_op_types
    images, labels = digits_eval
    fp32 = _run(digits_onnx, {"input": images})
    fp16 = _run(result.onnx_path, {"input": images})
    assert fp16.dtype == np.float32, "keep_io_types: the graph's inputs and outputs stay fp32"
    assert np.abs(fp16 - fp32).max() <= FP16_LOGIT_TOLERANCE
    model = onnx.load(result.onnx_path)
    assert any(i.data_type == TensorProto.FLOAT16 for i in model.graph.initializer)


def test_fp16_keeps_listed_op_types_in_fp32(digits_onnx, digits_spec, digits_calibration, tmp_path):
    options = PrecisionOptions(keep_fp32_op_types=["Gemm"])
    result = convert_precision(digits_onnx, Precision.FP16, digits_calibration, options, spec=digits_spec, cache_dir=tmp_path)
    assert result.kept_op_types == {"Gemm": 2} and result.quantized_op_types["Conv"] == 2


def test_fp8_is_a_valid_model_with_fp8_qdq(digits_onnx, digits_spec, digits_calibration, tmp_path):
    result = convert_precision(digits_onnx, Precision.FP8, digits_calibration, PrecisionOptions(), spec=digits_spec, cache_dir=tmp_path)
    onnx.checker.check_model(str(result.onnx_path), full_check=True)
    model = onnx.load(result.onnx_path)
    initializers = {i.name: i for i in model.graph.initializer}
    zero_point_types = {initializers[n.input[2]].data_type for n in model.graph.node if n.op_type == "QuantizeLinear" and len(n.input) > 2}
    assert zero_point_types == {TensorProto.FLOAT8E4M3FN}
    assert result.qdq_node_count > 0 and result.quantized_op_types


def test_bf16_is_a_valid_model_in_bfloat16(digits_onnx, digits_spec, digits_calibration, tmp_path):
    result = convert_precision(digits_onnx, Precision.BF16, digits_calibration, PrecisionOptions(), spec=digits_spec, cache_dir=tmp_path)
    onnx.checker.check_model(str(result.onnx_path), full_check=True)
    model = onnx.load(result.onnx_path)
    assert any(i.data_type == TensorProto.BFLOAT16 for i in model.graph.initializer)
    assert model.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT
    assert result.method == "autocast" and result.quantized_op_types["Conv"] == 2


# --- errors: each is raised before ModelOpt starts, and leaves nothing in the cache -----------------


def _bad_calibration(images: np.ndarray) -> dict[str, dict[str, np.ndarray]]:
    return {
        "has no array for input 'input' of .*expected shape \\(samples, 1, 8, 8\\), float32.*holds \\['image'\\]": {"image": images},
        "arrays \\['mask'\\] that are not inputs of": {"input": images, "mask": images},
        "has shape \\(320, 1, 7, 7\\), but input 'input' of .* expects \\(samples, 1, 8, 8\\)": {"input": images[:, :, :7, :7]},
        "has shape \\(320, 64\\)": {"input": images.reshape(len(images), -1)},
        "is float64, but input 'input' of .* takes float32": {"input": images.astype(np.float64)},
        "holds 0 samples": {"input": images[:0]},
    }


@pytest.mark.parametrize("case", range(len(_bad_calibration(np.zeros((320, 1, 8, 8), np.float32)))))
def test_mismatched_calibration_fails_before_calibration(digits_onnx, digits_spec, digits_calibration, tmp_path, monkeypatch, case):
    message, calibration = list(_bad_calibration(digits_calibration["input"]).items())[case]
    _forbid_conversion(monkeypatch)
    with pytest.raises(StageError, match=message) as raised:
        convert_precision(digits_onnx, Precision.INT8, calibration, PrecisionOptions(), spec=digits_spec, cache_dir=tmp_path)
    assert raised.value.stage == "convert-precision"
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("precision", [Precision.INT8, Precision.FP8])
def test_quantization_without_calibration_data_fails_clearly(digits_onnx, digits_spec, tmp_path, monkeypatch, precision):
    _forbid_conversion(monkeypatch)
    with pytest.raises(
        StageError, match=f"{precision.value} conversion of .*model.sim.onnx needs calibration data: add a 'calibration' section"
    ):
        convert_precision(digits_onnx, precision, None, PrecisionOptions(), spec=digits_spec, cache_dir=tmp_path)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (PrecisionOptions(exclude_op_types=["conv"]), "precision.exclude_op_types lists \\['conv'\\], which are not ONNX operator types"),
        (PrecisionOptions(exclude_nodes=["no_such_node"]), "precision.exclude_nodes pattern 'no_such_node' matches no node of"),
        (
            PrecisionOptions(exclude_nodes=["node_(Conv"]),
            "precision.exclude_nodes pattern 'node_\\(Conv' is not a valid regular expression",
        ),
    ],
)
def test_bad_exclusion_lists_fail_before_calibration(digits_onnx, digits_spec, digits_calibration, tmp_path, monkeypatch, options, message):
    _forbid_conversion(monkeypatch)
    with pytest.raises(StageError, match=message):
        convert_precision(digits_onnx, Precision.INT8, digits_calibration, options, spec=digits_spec, cache_dir=tmp_path)


def test_spec_that_does_not_describe_the_model_fails(digits_onnx, digits_spec, digits_calibration, tmp_path):
    renamed = digits_spec.model_copy(update={"inputs": [digits_spec.inputs[0].model_copy(update={"name": "pixels"})]})
    with pytest.raises(StageError, match="has inputs \\['input'\\] that spec 'digits-cnn' does not declare"):
        convert_precision(
            digits_onnx, Precision.INT8, {"pixels": digits_calibration["input"]}, PrecisionOptions(), spec=renamed, cache_dir=tmp_path
        )


def _spec(name: str, shape: list, dynamic: dict | None = None, output: str = "logits") -> ModelSpec:
    return parse_spec(
        {
            "name": name,
            "model": "unused.py:build",
            "checkpoint": "unused.safetensors",
            "inputs": [{"name": "input", "shape": shape, "dynamic": dynamic or {}}],
            "outputs": [{"name": output}],
            "eval": {"data": "unused.npz"},
            "targets": [{}],
        }
    )


def test_model_modelopt_cannot_convert_fails_with_its_reason_and_node(tmp_path):
    """A Reshape that is valid ONNX but cannot reshape the tensors calibration feeds it."""
    weight = numpy_helper.from_array(np.random.default_rng(0).standard_normal((16, 6)).astype(np.float32), "weight")
    target_shape = numpy_helper.from_array(np.array([-1, 5], dtype=np.int64), "target_shape")
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["input", "weight"], ["projected"], name="project"),
            helper.make_node("Reshape", ["projected", "target_shape"], ["logits"], name="regroup_by_five"),
        ],
        "unconvertible",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 16])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["groups", 5])],
        [weight, target_shape],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    onnx.checker.check_model(model, full_check=True)
    path = tmp_path / "unconvertible.onnx"
    onnx.save(model, path)
    spec = _spec("unconvertible", ["batch", 16], {"batch": {"min": 1, "opt": 8, "max": 32}})
    cache = tmp_path / "cache"
    calibration = {"input": np.ones((16, 16), np.float32)}
    with pytest.raises(StageError, match="ModelOpt could not convert the model to int8") as raised:
        convert_precision(path, Precision.INT8, calibration, PrecisionOptions(), spec=spec, cache_dir=cache)
    message = str(raised.value)
    assert "cannot be reshaped to the requested shape" in message
    assert "[node 'regroup_by_five', op Reshape]" in message
    assert "(in modelopt/onnx/quantization/" in message, "the ModelOpt step that failed"
    assert list(cache.iterdir()) == [], "a failed conversion leaves nothing in the cache"


# --- torchvision models with random weights (exported once per session by tests/model_zoo.py) --------


def _zoo_spec(name: str, max_batch: int = 16) -> ModelSpec:
    return _spec(name, ["batch", 3, 224, 224], {"batch": {"min": 1, "opt": 4, "max": max_batch}})


def _with_random_head(onnx_path: Path, destination: Path) -> Path:
    """A copy whose classifier weights are random: torchvision zero-initialises ViT's head, so its logits are all 0."""
    model = onnx.load(onnx_path)
    head = next(node for node in model.graph.node if "logits" in node.output)
    initializers = {init.name: init for init in model.graph.initializer}
    weight = next(initializers[name] for name in head.input if name in initializers and len(initializers[name].dims) == 2)
    values = np.random.default_rng(0).normal(0.0, 0.02, tuple(weight.dims)).astype(np.float32)
    weight.CopyFrom(numpy_helper.from_array(values, weight.name))
    onnx.save(model, destination)
    return destination


def _images(count: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((count, 3, 224, 224)).astype(np.float32)


def _convert_and_compare(
    path: Path, spec: ModelSpec, cache: Path, precision: Precision, options: PrecisionOptions = PrecisionOptions()
) -> tuple[ConversionResult, np.ndarray]:
    """Converts with 8 calibration images (two batches at the opt batch of 4); cosine to fp32 on 4 other images."""
    result = convert_precision(path, precision, {"input": _images(8, seed=1)}, options, spec=spec, cache_dir=cache)
    probe = {"input": _images(4, seed=2)}
    return result, _cosine(_run(result.onnx_path, probe), _run(path, probe))


@pytest.mark.slow
def test_resnet18_int8_has_qdq_around_every_convolution_and_stays_close(resnet18_onnx, tmp_path):
    int8, cosine = _convert_and_compare(resnet18_onnx, _zoo_spec("resnet18"), tmp_path, Precision.INT8)
    assert cosine.min() >= RESNET_COSINE["int8"], cosine
    assert int8.calibration_samples == 8
    model = onnx.load(int8.onnx_path)
    convolutions = [n for n in model.graph.node if n.op_type == "Conv"]
    assert len(convolutions) == 20
    assert all(_is_qdq_fed(model, conv, 0) and _is_qdq_fed(model, conv, 1) for conv in convolutions)


@pytest.mark.slow
def test_resnet18_fp16_stays_close(resnet18_onnx, tmp_path):
    fp16, cosine = _convert_and_compare(resnet18_onnx, _zoo_spec("resnet18"), tmp_path, Precision.FP16)
    assert cosine.min() >= RESNET_COSINE["fp16"], cosine
    assert fp16.quantized_op_types["Conv"] == 20


@pytest.fixture(scope="module")
def vit_b16_random_head(vit_b16_onnx, tmp_path_factory) -> Path:
    """Simplified first, as the pipeline does: AutoCast and calibration take half the time on the folded graph."""
    from trtforge.stages.simplify import simplify_onnx

    folder = tmp_path_factory.mktemp("vit-random-head")
    # max_batch 4: the simplify stage checks outputs at min/opt/max, and a larger max only costs time here.
    spec = _zoo_spec("vit-b16", max_batch=4)
    return simplify_onnx(spec, _with_random_head(vit_b16_onnx, folder / "vit_b16.onnx"), folder).onnx_path


@pytest.mark.slow
def test_vit_b16_int8_has_qdq_around_its_matmuls_and_stays_close(vit_b16_random_head, tmp_path):
    options = PrecisionOptions(calibration_method="max")
    int8, cosine = _convert_and_compare(vit_b16_random_head, _zoo_spec("vit-b16"), tmp_path, Precision.INT8, options)
    assert int8.method == "max"
    assert cosine.min() >= VIT_COSINE["int8"], cosine
    model = onnx.load(int8.onnx_path)
    matmuls = [n for n in model.graph.node if n.op_type in ("MatMul", "Gemm")]
    quantized = [n for n in matmuls if _is_qdq_fed(model, n, 0) and _is_qdq_fed(model, n, 1)]
    # 12 encoder blocks, each with a qkv and an output projection, two attention products and two MLP layers.
    assert len(quantized) >= 12 * 4, (len(quantized), len(matmuls))


@pytest.mark.slow
def test_vit_b16_fp16_stays_close(vit_b16_random_head, tmp_path):
    fp16, cosine = _convert_and_compare(vit_b16_random_head, _zoo_spec("vit-b16"), tmp_path, Precision.FP16)
    assert cosine.min() >= VIT_COSINE["fp16"], cosine
    assert fp16.qdq_node_count == 0
    assert sum(fp16.quantized_op_types.get(op, 0) for op in ("MatMul", "Gemm")) >= 12 * 4, fp16.quantized_op_types


def test_model_with_external_data_converts_and_its_weights_are_part_of_the_cache_key(
    digits_onnx, digits_spec, digits_calibration, tmp_path, monkeypatch
):
    folder = tmp_path / "external"
    folder.mkdir()
    path = folder / "model.onnx"
    onnx.save(onnx.load(digits_onnx), path, save_as_external_data=True, location="weights.bin", size_threshold=0)
    cache = tmp_path / "cache"
    result = convert_precision(path, Precision.INT8, digits_calibration, PrecisionOptions(), spec=digits_spec, cache_dir=cache)
    assert sorted(p.name for p in result.onnx_path.parent.iterdir()) == ["model.onnx", "result.json"]
    assert result.quantized_op_types["Conv"] == 2
    assert _run(result.onnx_path, {"input": digits_calibration["input"][:4]}).shape == (4, 10)

    weights = bytearray((folder / "weights.bin").read_bytes())
    weights[:4] = np.float32(0.5).tobytes()
    (folder / "weights.bin").write_bytes(bytes(weights))
    _forbid_conversion(monkeypatch)
    with pytest.raises(AssertionError, match="ModelOpt was started"):
        convert_precision(path, Precision.INT8, digits_calibration, PrecisionOptions(), spec=digits_spec, cache_dir=cache)


def test_entropy_calibrations_histogram_failure_suggests_max_calibration(digits_onnx):
    """numpy's own error, as ModelOpt's entropy calibration raised it on a real model's narrow-range tensor
    (no small model reproduces that range): the message must lead to the fix that worked there."""
    from trtforge.stages.convert_precision import _describe_failure

    numpy_error = ValueError("Too many bins for data range. Cannot create 128 finite-sized bins.")
    message = _describe_failure(numpy_error, str(digits_onnx), "int8", [], "modelopt")
    assert message.startswith("ModelOpt could not convert the model to int8: ValueError: Too many bins for data range")
    assert message.endswith("set precision.calibration_method: max in the spec, or add calibration samples that vary more")
