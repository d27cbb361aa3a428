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
from trtforge.spec import Precision, PrecisionOptions
from trtforge.stages.convert_precision import (
    ConversionResult,
    Quantizer,
    convert_precision,
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
