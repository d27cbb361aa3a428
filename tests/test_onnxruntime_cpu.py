"""onnxruntime CPU targets at full speed: the ORT_ENABLE_ALL probe and int8 by onnxruntime's own quantizer.

Real onnxruntime, real ModelOpt, the digits model trained by its example's entry point.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest

from tests.conftest import DIGITS_DIR
from tests.flow_harness import run_flow, write_spec
from trtforge.backends.base import get_backend
from trtforge.backends.onnxruntime import OnnxRuntimeBackend, OnnxRuntimeTarget
from trtforge.evalset import load_eval_set
from trtforge.registry import open_registry
from trtforge.spec import Precision, PrecisionOptions, parse_spec
from trtforge.stages.convert_precision import (
    ConversionResult,
    Quantizer,
    convert_precision,
    global_means_as_global_average_pools,
    onnxruntime_int8_settings,
    output_tail,
    quantizer_for,
)
from trtforge.stages.gate import gate_target
from trtforge.stages.reference import load_reference, reference_outputs
from trtforge.stages.sensitivity import exact_node_patterns, rank_quantized_nodes

CALIBRATION_SAMPLES = 320
INTEGER_KERNELS = {"QLinearConv", "QLinearMatMul", "ConvInteger", "MatMulInteger", "QGemm"}


def segfault_instead_of_probing(engine_path: str, spec) -> None:
    """A probe child that dies the way onnxruntime 1.32 did at ALL on an AutoCast fp16 transformer."""
    os.kill(os.getpid(), signal.SIGSEGV)


class CrashingProbeBackend(OnnxRuntimeBackend):
    fast_level_check = staticmethod(segfault_instead_of_probing)


@pytest.fixture(scope="module")
def calibration() -> dict[str, np.ndarray]:
    module_spec = importlib.util.spec_from_file_location("digits_data", DIGITS_DIR / "digits_data.py")
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    images, _ = module.load_split("train")
    return {"input": images[:CALIBRATION_SAMPLES]}


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("precision-cache")


@pytest.fixture(scope="module")
def ort_int8(digits_onnx, digits_spec, calibration, cache) -> ConversionResult:
    return convert_precision(
        digits_onnx, Precision.INT8, calibration, PrecisionOptions(), spec=digits_spec, cache_dir=cache, quantizer=Quantizer.ONNXRUNTIME
    )


def _session_level(runner) -> onnxruntime.GraphOptimizationLevel:
    return runner.session.get_session_options().graph_optimization_level


def test_build_probes_all_safe_and_the_runner_opens_the_engine_at_all(digits_onnx, digits_spec, tmp_path):
    backend = get_backend("onnxruntime")
    built = backend.build(digits_onnx, OnnxRuntimeTarget(precision=Precision.FP32), digits_spec, tmp_path / "build")
    assert built.record["graph_optimization_level"] == "ORT_ENABLE_ALL"
    assert built.record["saved_graph_optimization_level"] == "ORT_ENABLE_EXTENDED"
    probe = built.record["optimization_probe"]
    assert probe["safe"] and set(probe["max_abs_diff_vs_saved_level"]) == {"min", "opt", "max"}
    assert max(probe["max_abs_diff_vs_saved_level"].values()) < 1e-3
    assert json.loads((tmp_path / "build" / "build.json").read_text())["graph_optimization_level"] == "ORT_ENABLE_ALL"
    assert _session_level(backend.load_runner(built.engine_path)) == onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL

    # A pulled target's folder holds the engine and build.json side by side; an engine alone opens at the portable level.
    pulled = tmp_path / "pulled"
    pulled.mkdir()
    shutil.copy(built.engine_path, pulled / "engine")
    assert _session_level(backend.load_runner(pulled / "engine")) == onnxruntime.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    shutil.copy(tmp_path / "build" / "build.json", pulled / "build.json")
    assert _session_level(backend.load_runner(pulled / "engine")) == onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL


def test_a_probe_that_crashes_keeps_extended_and_says_why(digits_onnx, digits_spec, tmp_path):
    backend = CrashingProbeBackend()
    built = backend.build(digits_onnx, OnnxRuntimeTarget(precision=Precision.FP32), digits_spec, tmp_path)
    assert built.record["graph_optimization_level"] == "ORT_ENABLE_EXTENDED"
    probe = built.record["optimization_probe"]
    assert not probe["safe"] and "crashed with signal SIGSEGV" in probe["reason"], probe
    runner = backend.load_runner(built.engine_path)
    assert _session_level(runner) == onnxruntime.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    images = load_eval_set(digits_spec).inputs["input"][:4]
    assert runner.run({"input": images})["logits"].shape == (4, 10)


def test_onnxruntime_int8_engine_runs_integer_kernels_and_passes_the_gate(digits_spec, digits_checkpoint, ort_int8, tmp_path):
    assert ort_int8.quantizer is Quantizer.ONNXRUNTIME and ort_int8.quantizer_version == onnxruntime.__version__
    assert ort_int8.modelopt_version is None
    assert ort_int8.quantizer_settings == onnxruntime_int8_settings()
    assert ort_int8.quantizer_settings["per_channel"] and ort_int8.quantizer_settings["format"] == "QDQ"
    assert ort_int8.qdq_node_count > 0 and ort_int8.calibration_samples == CALIBRATION_SAMPLES

    target = OnnxRuntimeTarget(precision=Precision.INT8)
    backend = get_backend("onnxruntime")
    built = backend.build(ort_int8.onnx_path, target, digits_spec, tmp_path / "engine")
    engine_ops = {node.op_type for node in onnx.load(built.engine_path).graph.node}
    assert engine_ops & INTEGER_KERNELS, engine_ops
    assert "Conv" not in engine_ops, "a convolution was left in float"
    assert built.record["quantizer"]["name"] == "onnxruntime"
    assert built.record["quantizer"]["settings"] == ort_int8.quantizer_settings

    reference = load_reference(reference_outputs(digits_spec, digits_checkpoint, tmp_path / "reference"))
    result = gate_target(digits_spec, target, built.tag, backend.load_runner(built.engine_path), load_eval_set(digits_spec), reference)
    assert result.passed, result.failures
    assert result.metrics["accuracy"] > 0.95


def test_the_quantizers_are_cached_apart(digits_onnx, digits_spec, calibration, cache, ort_int8):
    modelopt = convert_precision(digits_onnx, Precision.INT8, calibration, PrecisionOptions(), spec=digits_spec, cache_dir=cache)
    assert modelopt.quantizer is Quantizer.MODELOPT and modelopt.modelopt_version == modelopt.quantizer_version
    assert modelopt.cache_key != ort_int8.cache_key and modelopt.sha256 != ort_int8.sha256
    again = convert_precision(
        digits_onnx, Precision.INT8, calibration, PrecisionOptions(), spec=digits_spec, cache_dir=cache, quantizer=Quantizer.ONNXRUNTIME
    )
    assert again.cached and again.cache_key == ort_int8.cache_key
    # fp16 is AutoCast's whichever quantizer int8 would use: one cache entry.
    fp16 = convert_precision(
        digits_onnx, Precision.FP16, calibration, PrecisionOptions(), spec=digits_spec, cache_dir=cache, quantizer=Quantizer.ONNXRUNTIME
    )
    assert fp16.quantizer is Quantizer.MODELOPT and fp16.method == "autocast"


def test_tensorrt_targets_ask_modelopt_and_onnxruntime_targets_their_own_quantizer():
    assert quantizer_for(get_backend("tensorrt")) is Quantizer.MODELOPT
    assert quantizer_for(get_backend("onnxruntime")) is Quantizer.ONNXRUNTIME


def test_int8_settings_follow_the_cpu_instructions():
    without_vnni = onnxruntime_int8_settings("x86_64", frozenset({"avx2", "fma"}))
    assert without_vnni["activation_type"] == "QUInt8" and without_vnni["weight_type"] == "QInt8" and without_vnni["reduce_range"]
    with_vnni = onnxruntime_int8_settings("x86_64", frozenset({"avx2", "avx512f", "avx512_vnni"}))
    assert not with_vnni["reduce_range"] and with_vnni["cpu"] == "x86 with avx512_vnni"
    assert not onnxruntime_int8_settings("x86_64", frozenset({"avx_vnni", "amx_int8"}))["reduce_range"]
    arm = onnxruntime_int8_settings("aarch64", frozenset())
    assert arm["activation_type"] == "QInt8" and not arm["reduce_range"]


def test_what_follows_the_last_compute_op_stays_out_of_int8():
    from onnx import TensorProto, helper

    node = helper.make_node
    graph = helper.make_graph(
        [
            node("Conv", ["x", "w1"], ["c1"], name="conv1"),
            node("Relu", ["c1"], ["r1"], name="relu_between"),
            node("Add", ["r1", "c1"], ["a1"], name="residual_add"),
            node("Conv", ["a1", "w2"], ["c2"], name="conv2"),
            node("Sigmoid", ["c2"], ["scores"], name="scores"),
            node("Mul", ["c2", "stride"], ["boxes"], name="decode_boxes"),
            node("Concat", ["boxes", "scores"], ["y"], name="concat", axis=1),
        ],
        "head",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
    )
    assert sorted(output_tail(graph.node)) == ["concat", "decode_boxes", "scores"]


def test_a_global_mean_becomes_an_int8_global_average_pool_in_the_nhwc_layout(tmp_path):
    """torch exports a global average pooling as ReduceMean; quantized as GlobalAveragePool, onnxruntime keeps the int8
    feature map in NHWC through the pooling instead of transposing it back to NCHW first."""
    import torch

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.Conv2d(8, 16, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(16, 4),
    ).eval()
    source = tmp_path / "model.onnx"
    torch.onnx.export(
        model,
        (torch.randn(1, 3, 16, 16),),
        str(source),
        input_names=["input"],
        output_names=["logits"],
        dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=16)},),
        dynamo=True,
        external_data=False,
    )
    (mean,) = [node.name for node in onnx.load(source).graph.node if node.op_type == "ReduceMean"]
    spec = parse_spec(
        {
            "name": "pooled",
            "model": "torch.nn:Sequential",
            "checkpoint": "random-weights",
            "inputs": [{"name": "input", "shape": ["batch", 3, 16, 16], "dynamic": {"batch": {"min": 1, "opt": 8, "max": 16}}}],
            "outputs": [{"name": "logits"}],
            "eval": {"data": "none.npz"},
            "targets": [{}],
        }
    )
    images = np.random.default_rng(0).standard_normal((32, 3, 16, 16)).astype(np.float32)
    converted = convert_precision(
        source,
        Precision.INT8,
        {"input": images},
        PrecisionOptions(),
        spec=spec,
        cache_dir=tmp_path / "cache",
        quantizer=Quantizer.ONNXRUNTIME,
    )
    pools = [node for node in onnx.load(converted.onnx_path).graph.node if node.op_type == "GlobalAveragePool"]
    assert [node.name for node in pools] == [mean]

    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    session = onnxruntime.InferenceSession(str(converted.onnx_path), options, providers=["CPUExecutionProvider"])
    optimized = onnx.load(tmp_path / "optimized.onnx").graph.node
    (pool,) = [node for node in optimized if node.op_type == "QLinearGlobalAveragePool"]
    assert onnx.helper.get_attribute_value(next(a for a in pool.attribute if a.name == "channels_last")) == 1
    producers = {output: node for node in optimized for output in node.output}
    assert producers[pool.input[0]].op_type == "QLinearConv", "the feature map was transposed before the pooling"
    quantized = session.run(None, {"input": images})[0]
    with torch.no_grad():
        expected = model(torch.from_numpy(images)).numpy()
    cosine = (quantized * expected).sum(1) / (np.linalg.norm(quantized, axis=1) * np.linalg.norm(expected, axis=1))
    assert cosine.min() > 0.99, cosine


def test_only_a_mean_over_every_spatial_axis_that_keeps_them_is_rewritten():
    from onnx import TensorProto, helper

    node = helper.make_node
    graph = helper.make_graph(
        [
            node("ReduceMean", ["x"], ["global"], name="global_mean", axes=[-2, -1], keepdims=1),
            node("ReduceMean", ["x"], ["squeezed"], name="squeezed_mean", axes=[2, 3], keepdims=0),
            node("ReduceMean", ["x"], ["channels"], name="channel_mean", axes=[1], keepdims=1),
            node("ReduceMean", ["x", "rows_axes"], ["rows"], name="row_mean"),
            node("ReduceMean", ["x", "spatial_axes"], ["spatial"], name="spatial_mean"),
        ],
        "means",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in ("global", "squeezed", "channels", "rows", "spatial")],
        initializer=[
            helper.make_tensor("rows_axes", TensorProto.INT64, [1], [2]),
            helper.make_tensor("spatial_axes", TensorProto.INT64, [2], [2, 3]),
        ],
    )
    assert global_means_as_global_average_pools(graph) == ["global_mean", "spatial_mean"]
    assert [n.op_type for n in graph.node] == ["GlobalAveragePool", "ReduceMean", "ReduceMean", "ReduceMean", "GlobalAveragePool"]
    assert [init.name for init in graph.initializer] == ["rows_axes"]


def test_ladder_exclusions_name_nodes_of_the_onnxruntime_graph(digits_onnx, digits_spec, calibration, cache, ort_int8):
    ranking = rank_quantized_nodes(digits_onnx, ort_int8.onnx_path, Precision.INT8, calibration, spec=digits_spec)
    source_names = {node.name for node in onnx.load(digits_onnx).graph.node}
    assert ranking.nodes and {n.name for n in ranking.nodes} <= source_names
    (worst,) = ranking.worst(1)
    options = PrecisionOptions(exclude_nodes=exact_node_patterns([worst.name]))
    excluded = convert_precision(
        digits_onnx, Precision.INT8, calibration, options, spec=digits_spec, cache_dir=cache, quantizer=Quantizer.ONNXRUNTIME
    )
    model = onnx.load(excluded.onnx_path)
    producers = {out: node for node in model.graph.node for out in node.output}
    (kept,) = [node for node in model.graph.node if node.name == worst.name]
    assert not any(producers.get(i) is not None and producers[i].op_type == "DequantizeLinear" for i in kept.input)
    assert excluded.qdq_node_count < ort_int8.qdq_node_count


@pytest.mark.usefixtures("prefect_api")
def test_the_manifest_records_the_quantizer_and_the_level(digits_checkpoint, tmp_path):
    targets = [{"backend": "onnxruntime", "precision": "fp32"}, {"backend": "onnxruntime", "precision": "int8"}]
    summary = run_flow(write_spec(tmp_path / "spec", digits_checkpoint, targets=targets), tmp_path)
    assert summary.published, summary.message
    manifest = open_registry(f"file://{tmp_path / 'registry'}").manifest("digits-cnn", summary.version)
    records = {entry.record["precision"]: entry.record for entry in manifest.targets.values()}
    assert records["int8"]["quantizer"]["name"] == "onnxruntime"
    assert records["int8"]["quantizer"]["version"] == onnxruntime.__version__
    assert records["fp32"]["quantizer"] is None
    assert {r["graph_optimization_level"] for r in records.values()} == {"ORT_ENABLE_ALL"}
    conversions = {c["precision"]: c for c in manifest.extra["conversions"]}
    assert (conversions["int8"]["quantizer"], conversions["int8"]["quantizer_version"]) == ("onnxruntime", onnxruntime.__version__)
    assert conversions["int8"]["modelopt_version"] is None
