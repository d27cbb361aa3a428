"""The TensorRT backend.

Unmarked tests run everywhere, for real: profile derivation from the spec, the build settings
and build record, the availability answers, the runner's and the builder's refusals, and the
GPU-worker deployments. Tests marked ``tensorrt`` need TensorRT and an NVIDIA GPU (conftest
skips them with the reason elsewhere): they build the digits model's fp32, fp16 and int8
engines, run and gate them, and check profiles, the timing cache and the lean runtime.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper

from trtforge.backends.base import BuildOptions, get_backend, target_tag
from trtforge.backends.onnxruntime import OnnxRuntimeTarget
from trtforge.backends.tensorrt import (
    ENGINE_FILE,
    LAYERS_FILE,
    RECORD_FILE,
    PluginLibrary,
    TensorRTBuildRecord,
    TensorRTBuildSettings,
    TensorRTProbe,
    TensorRTTarget,
    availability_for,
    build_settings,
    check_onnx_precision,
    plugin_libraries,
    probe_tensorrt,
    select_gpu,
    timing_cache_key,
)
from trtforge.errors import SpecError, StageError, TrtforgeError
from trtforge.gpu import CUDA_RUNTIME_HINT, CudaRuntimeProbe, GpuInfo, LocalGpus, detect_gpus
from trtforge.profiles import ShapeProfile, derive_profiles
from trtforge.registry.names import check_cache_key
from trtforge.spec import GPU_ARCHS, Precision, parse_spec

REPO = Path(__file__).resolve().parents[1]
PREFECT_YAML = REPO / "infra" / "prefect.yaml"
NO_TENSORRT = TensorRTProbe(None, "TensorRT is not installed on this worker: install it")
TENSORRT_11 = TensorRTProbe("11.4.0.106")
CUDA_13 = CudaRuntimeProbe("/venv/lib/python3.11/site-packages/nvidia/cu13/lib/libcudart.so.13", "13.0")
NO_GPU = LocalGpus(reason="no NVIDIA GPU: the NVIDIA driver's NVML library (libnvidia-ml.so.1) is not on this machine")


def gpu(name: str, arch: str, index: int = 0) -> GpuInfo:
    return GpuInfo(index, name, arch, 81559, f"00000000:{index + 0x18:02X}:00.0", f"GPU-{index}")


def gpus(*devices: GpuInfo) -> LocalGpus:
    return LocalGpus(devices, driver_version="580.159.04", cuda_driver_version="13.0")


def trt_target(**fields) -> TensorRTTarget:
    return TensorRTTarget(**{"arch": "sm_90", **fields})


def with_targets(spec, *targets):
    return spec.model_copy(update={"targets": list(targets)})


def spec_data(**overrides) -> dict:
    """The digits example spec as data, so tests can vary inputs and targets and re-validate."""
    data = yaml.safe_load((REPO / "examples" / "digits" / "spec.yaml").read_text())
    data.update(overrides)
    return data


# --- profile derivation ----------------------------------------------------------------------------


def test_default_profile_is_the_inputs_dynamic_range(digits_spec):
    target = trt_target()
    profiles = derive_profiles(with_targets(digits_spec, target), target)
    assert len(profiles) == 1
    (shapes,) = profiles[0].inputs
    digits_input = digits_spec.inputs[0]
    assert shapes.name == digits_input.name
    assert (shapes.min, shapes.opt, shapes.max) == tuple(digits_input.shape_at(level) for level in ("min", "opt", "max"))
    assert shapes.max == (128, 1, 8, 8)


def test_one_profile_per_target_profile_each_covering_every_input():
    data = spec_data(
        inputs=[
            {
                "name": "tokens",
                "dtype": "int64",
                "shape": ["batch", "seq"],
                "dynamic": {"batch": {"min": 1, "opt": 8, "max": 64}, "seq": {"min": 16, "opt": 128, "max": 512}},
            },
            {
                "name": "mask",
                "dtype": "int64",
                "shape": ["batch", "seq"],
                "dynamic": {"batch": {"min": 1, "opt": 8, "max": 64}, "seq": {"min": 16, "opt": 128, "max": 512}},
            },
            {"name": "scale", "dtype": "float32", "shape": [1]},
        ],
        targets=[
            {
                "backend": "tensorrt",
                "arch": "sm_90",
                "profiles": [
                    {"dims": {"seq": {"min": 16, "opt": 64, "max": 128}}},
                    {"dims": {"batch": {"min": 32, "opt": 48, "max": 64}, "seq": {"min": 129, "opt": 256, "max": 512}}},
                ],
            }
        ],
    )
    data["outputs"] = [{"name": "embedding"}]
    spec = parse_spec(data)
    short, long = derive_profiles(spec, spec.targets[0])

    assert short.shapes_at("min") == {"tokens": (1, 16), "mask": (1, 16), "scale": (1,)}
    assert short.shapes_at("opt") == {"tokens": (8, 64), "mask": (8, 64), "scale": (1,)}
    assert short.shapes_at("max") == {"tokens": (64, 128), "mask": (64, 128), "scale": (1,)}
    assert long.shapes_at("min") == {"tokens": (32, 129), "mask": (32, 129), "scale": (1,)}
    assert long.shapes_at("max") == {"tokens": (64, 512), "mask": (64, 512), "scale": (1,)}
    assert ShapeProfile.from_dict(json.loads(json.dumps(long.to_dict()))) == long


def test_profile_naming_an_unknown_dim_is_refused_with_the_known_ones(digits_spec):
    target = trt_target(
        profiles=[{"dims": {"batch": {"min": 1, "opt": 2, "max": 4}}}, {"dims": {"height": {"min": 8, "opt": 8, "max": 8}}}]
    )
    spec = with_targets(digits_spec, trt_target(), target)
    with pytest.raises(SpecError, match=r"targets\[1\]\.profiles\[1\]\.dims names \['height'\].*dynamic dims: batch"):
        derive_profiles(spec, target)


def test_profile_outside_the_declared_range_names_dim_and_range(digits_spec):
    target = trt_target(profiles=[{"dims": {"batch": {"min": 64, "opt": 128, "max": 256}}}])
    with pytest.raises(SpecError, match=r"profiles\[0\]\.dims\.batch \(64\.\.256\) leaves the range .* \(1\.\.128\)"):
        derive_profiles(with_targets(digits_spec, target), target)


def test_profile_without_dims_is_refused(digits_spec):
    target = trt_target(profiles=[{"dims": {}}])
    with pytest.raises(SpecError, match=r"targets\[0\]\.profiles\[0\] sets no dims.*\['batch'\]"):
        derive_profiles(with_targets(digits_spec, target), target)


def test_shared_dim_with_two_ranges_is_refused_naming_both_inputs():
    data = spec_data(
        inputs=[
            {"name": "image", "shape": ["batch", 1, 8, 8], "dynamic": {"batch": {"min": 1, "opt": 32, "max": 128}}},
            {"name": "extra", "shape": ["batch", 4], "dynamic": {"batch": {"min": 1, "opt": 16, "max": 64}}},
        ]
    )
    spec = parse_spec(data)
    conflict = r"'batch' has min 1 / opt 32 / max 128 in inputs\[0\] \('image'\) but min 1 / opt 16 / max 64 in inputs\[1\]"
    with pytest.raises(SpecError, match=conflict):
        derive_profiles(spec, trt_target())


@settings(max_examples=60, deadline=None)
@given(
    declared=st.lists(st.integers(1, 4096), min_size=3, max_size=3).map(sorted),
    picks=st.lists(st.floats(0, 1), min_size=3, max_size=3).map(sorted),
)
def test_overrides_inside_the_declared_range_give_ordered_shapes(declared, picks):
    low, opt, high = declared
    inner = [low + round(p * (high - low)) for p in picks]
    data = spec_data(
        inputs=[
            {
                "name": "input",
                "shape": ["batch", 3, "side", "side"],
                "dynamic": {"batch": {"min": low, "opt": opt, "max": high}, "side": {"min": 32, "opt": 224, "max": 512}},
            }
        ],
        targets=[
            {
                "backend": "tensorrt",
                "arch": "sm_90",
                "profiles": [{"dims": {"batch": dict(zip(("min", "opt", "max"), inner, strict=True))}}],
            }
        ],
    )
    spec = parse_spec(data)
    (profile,) = derive_profiles(spec, spec.targets[0])
    (shapes,) = profile.inputs
    assert [shapes.min[0], shapes.opt[0], shapes.max[0]] == inner
    assert (shapes.min[1:], shapes.opt[1:], shapes.max[1:]) == ((3, 32, 32), (3, 224, 224), (3, 512, 512))
    assert all(a <= b <= c for a, b, c in zip(shapes.min, shapes.opt, shapes.max, strict=True))


# --- build settings and the build record -----------------------------------------------------------


def test_build_settings_carry_every_target_setting_and_the_profiles(digits_spec):
    target = trt_target(
        optimization_level=5,
        workspace_mb=512,
        tiling_optimization_level="moderate",
        hardware_compatibility="ampere_plus",
        version_compatible=True,
        exclude_lean_runtime=True,
        profiles=[{"dims": {"batch": {"min": 1, "opt": 1, "max": 8}}}, {"dims": {"batch": {"min": 9, "opt": 64, "max": 128}}}],
    )
    spec = with_targets(digits_spec, target)
    built = build_settings(spec, target)
    assert built.strongly_typed is True and built.tf32 is False
    assert built.builder_optimization_level == 5
    assert built.workspace_bytes == 512 * 1024 * 1024
    assert built.tiling_optimization_level == "moderate"
    assert built.hardware_compatibility_level == "ampere_plus"
    assert built.version_compatible is True and built.exclude_lean_runtime is True
    assert built.profiles == [p.to_dict() for p in derive_profiles(spec, target)]
    assert TensorRTBuildSettings.model_validate_json(built.model_dump_json()) == built

    defaults = build_settings(with_targets(digits_spec, trt_target()), trt_target())
    assert defaults.builder_optimization_level == 3
    assert defaults.workspace_bytes is None and defaults.tiling_optimization_level is None
    assert defaults.hardware_compatibility_level == "none" and not defaults.version_compatible


def test_exclude_lean_runtime_needs_version_compatibility(digits_spec):
    target = trt_target(exclude_lean_runtime=True)
    with pytest.raises(SpecError, match=r"targets\[0\]\.exclude_lean_runtime .* set version_compatible: true"):
        build_settings(with_targets(digits_spec, target), target)


def test_ampere_plus_needs_an_ampere_or_newer_arch(digits_spec):
    target = trt_target(arch="sm_75", hardware_compatibility="ampere_plus")
    with pytest.raises(SpecError, match=r"ampere_plus needs an Ampere or newer arch .* not sm_75"):
        build_settings(with_targets(digits_spec, target), target)


def test_build_record_schema_holds_what_a_build_must_record(digits_spec):
    schema = TensorRTBuildRecord.model_json_schema()
    for key in (
        "tensorrt_version",
        "gpu_name",
        "compute_capability",
        "driver_version",
        "cuda_driver_version",
        "settings",
        "build_seconds",
        "engine_bytes",
        "engine_sha256",
        "layer_count",
        "timing_cache",
        "tag",
        "pci_bus_id",
        "cuda_runtime_version",
        "plugin_libraries",
    ):
        assert key in schema["required"], key
    settings_schema = schema["$defs"]["TensorRTBuildSettings"]
    for key in (
        "builder_optimization_level",
        "workspace_bytes",
        "tiling_optimization_level",
        "hardware_compatibility_level",
        "version_compatible",
        "exclude_lean_runtime",
        "profiles",
        "strongly_typed",
    ):
        assert key in settings_schema["required"], key

    target = trt_target()
    spec = with_targets(digits_spec, target)
    record = TensorRTBuildRecord(
        tag=target_tag(target, spec, "11.4.0.106"),
        model=spec.name,
        precision="fp16",
        target_arch="sm_90",
        tensorrt_version="11.4.0.106",
        gpu_name="NVIDIA H100 80GB HBM3",
        compute_capability="sm_90",
        pci_bus_id="00000000:18:00.0",
        cuda_runtime_version="13.0",
        driver_version="580.159.04",
        cuda_driver_version="13.0",
        settings=build_settings(spec, target),
        timing_cache=None,
        plugin_libraries=[PluginLibrary(path="/opt/plugins/libroi_align.so", sha256="1" * 64)],
        onnx_file="model.onnx",
        onnx_sha256="0" * 64,
        engine_file=ENGINE_FILE,
        engine_bytes=1,
        engine_sha256="0" * 64,
        build_seconds=1.0,
        layer_count=1,
        built_at="2026-01-01T00:00:00+00:00",
    )
    assert record.tag == "trt11.4-sm90-fp32-b1_32_128"
    assert TensorRTBuildRecord.model_validate(json.loads(record.model_dump_json())) == record
    with pytest.raises(ValueError, match="unexpected_field"):
        TensorRTBuildRecord.model_validate({**record.model_dump(mode="json"), "unexpected_field": 1})


# --- availability ----------------------------------------------------------------------------------


def test_import_and_availability_without_tensorrt():
    # A fresh interpreter where 'tensorrt' cannot be imported, whatever this machine has installed.
    script = (
        "import sys; sys.modules['tensorrt'] = None\n"
        "from trtforge.backends.base import get_backend\n"
        "from trtforge.backends.tensorrt import TensorRTTarget\n"
        "backend = get_backend('tensorrt')\n"
        "print(backend.runtime_version())\n"
        "print(backend.availability(TensorRTTarget(arch='sm_90')).reason)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert done.returncode == 0, done.stderr
    version, reason = done.stdout.strip().splitlines()[-2:]
    assert version == "None"
    assert reason.startswith("TensorRT is not installed on this worker: install it from NVIDIA's pip index")
    assert "NGC TensorRT container" in reason


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="TensorRT is installed here")
def test_this_machine_reports_missing_tensorrt_and_gpu_together():
    backend = get_backend("tensorrt")
    assert backend.runtime_version() is None
    answer = backend.availability(trt_target(arch="sm_89"))
    assert not answer.available
    assert "TensorRT is not installed on this worker" in answer.reason
    local = detect_gpus()
    if not local.available:
        assert local.reason in answer.reason
        assert "run this target on a worker of pool gpu-sm89" in answer.reason


def test_missing_polygraphy_is_reported(monkeypatch):
    monkeypatch.setitem(sys.modules, "polygraphy", None)
    probe = probe_tensorrt()
    assert not probe.usable
    assert "pip install 'trtforge[pipeline]'" in probe.reason


def test_availability_answers_for_each_worker():
    target = trt_target(arch="sm_90")
    both_missing = availability_for(target, NO_TENSORRT, NO_GPU, CUDA_13)
    assert not both_missing.available
    assert both_missing.reason == f"{NO_TENSORRT.reason}; {NO_GPU.reason}: run this target on a worker of pool gpu-sm90"

    ampere = gpus(gpu("NVIDIA A100-SXM4-80GB", "sm_80"))
    wrong_gpu = availability_for(target, TENSORRT_11, ampere, CUDA_13)
    assert not wrong_gpu.available
    assert wrong_gpu.reason == (
        "this worker's GPUs are NVIDIA A100-SXM4-80GB (sm_80) but the target needs sm_90: run it on a worker of pool "
        "gpu-sm90, or set hardware_compatibility: ampere_plus to build it on any Ampere or newer GPU"
    )
    assert (
        availability_for(target.model_copy(update={"work_pool": "h100-nodes"}), TENSORRT_11, ampere, CUDA_13).reason.count(
            "pool h100-nodes"
        )
        == 1
    )

    mixed = gpus(gpu("NVIDIA A100-SXM4-80GB", "sm_80", 0), gpu("NVIDIA H100 80GB HBM3", "sm_90", 1))
    assert availability_for(target, TENSORRT_11, mixed, CUDA_13).available
    assert select_gpu(target, mixed) == mixed.gpus[1]

    portable = trt_target(arch="sm_90", hardware_compatibility="ampere_plus")
    assert availability_for(portable, TENSORRT_11, ampere, CUDA_13).available
    assert select_gpu(portable, ampere) == ampere.gpus[0]
    turing = gpus(gpu("Tesla T4", "sm_75"))
    assert not availability_for(portable, TENSORRT_11, turing, CUDA_13).available
    assert "ampere_plus" not in availability_for(target, TENSORRT_11, turing, CUDA_13).reason

    cpu = availability_for(OnnxRuntimeTarget(), TENSORRT_11, mixed, CUDA_13)
    assert not cpu.available and "not 'tensorrt'" in cpu.reason


def test_missing_cuda_runtime_is_a_reason_with_the_fix():
    no_cudart = CudaRuntimeProbe(
        None, reason=f"no CUDA runtime (libcudart.so.13 or .12) loads in this process; tried libcudart.so.13: {CUDA_RUNTIME_HINT}"
    )
    answer = availability_for(trt_target(), TENSORRT_11, gpus(gpu("NVIDIA H200", "sm_90")), no_cudart)
    assert not answer.available
    assert answer.reason == no_cudart.reason
    assert "pip install nvidia-cuda-runtime" in answer.reason and "LD_LIBRARY_PATH" in answer.reason


def test_gpus_hidden_from_cuda_are_named_when_none_visible_fits():
    # As cuda_visible leaves it on a worker pinned to its A100 (CUDA_VISIBLE_DEVICES=1) whose H100 is GPU 0.
    pinned = LocalGpus(
        (gpu("NVIDIA A100-SXM4-80GB", "sm_80", 1),),
        "580.159.04",
        "13.0",
        reason="hidden from CUDA in this process (CUDA_VISIBLE_DEVICES=1): GPU 0 NVIDIA H100 80GB HBM3 (00000000:18:00.0)",
    )
    answer = availability_for(trt_target(), TENSORRT_11, pinned, CUDA_13)
    assert not answer.available
    assert "NVIDIA A100-SXM4-80GB (sm_80) (hidden from CUDA in this process (CUDA_VISIBLE_DEVICES=1): GPU 0 NVIDIA H100" in answer.reason


def test_timing_cache_key_is_the_exact_tensorrt_version_and_the_gpu_model():
    h200, h100 = gpu("NVIDIA H200", "sm_90"), gpu("NVIDIA H100 80GB HBM3", "sm_90")
    assert timing_cache_key("11.4.0.106", h200) == "trt11.4.0.106-sm90-nvidia-h200"
    assert timing_cache_key("11.4.0.106", h100) == "trt11.4.0.106-sm90-nvidia-h100-80gb-hbm3"
    assert timing_cache_key("11.4.1.2", h200) != timing_cache_key("11.4.0.106", h200)
    check_cache_key(timing_cache_key("10.16.0.72", gpu("NVIDIA RTX PRO 6000 Blackwell Server Edition", "sm_120")))


# --- refusals that need no GPU ---------------------------------------------------------------------


def _tiny_onnx(path: Path) -> Path:
    graph = helper.make_graph(
        [helper.make_node("Relu", ["input"], ["logits"])],
        "tiny",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 1, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 1, 8, 8])],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), path)
    return path


def test_build_without_tensorrt_fails_with_the_reason_and_writes_nothing(digits_spec, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    target = trt_target()
    out_dir = tmp_path / "out"
    cache = tmp_path / "caches" / "trt-sm90.cache"
    with pytest.raises(StageError, match=r"^build: cannot build the sm_90 target on this worker: TensorRT is not installed"):
        get_backend("tensorrt").build(
            _tiny_onnx(tmp_path / "tiny.onnx"), target, with_targets(digits_spec, target), out_dir, BuildOptions(timing_cache=cache)
        )
    assert not out_dir.exists() and not cache.parent.exists()


def _quantized_onnx(path: Path, zero_point_type: int) -> Path:
    zero_point = helper.make_tensor("zero_point", zero_point_type, [], [0])
    scale = helper.make_tensor("scale", TensorProto.FLOAT, [], [0.05])
    graph = helper.make_graph(
        [
            helper.make_node("QuantizeLinear", ["input", "scale", "zero_point"], ["q"]),
            helper.make_node("DequantizeLinear", ["q", "scale", "zero_point"], ["dq"]),
            helper.make_node("Relu", ["dq"], ["logits"]),
        ],
        "quantized",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 1, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 1, 8, 8])],
        initializer=[scale, zero_point],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)]), path)
    return path


def _half_onnx(path: Path, half_type: int) -> Path:
    graph = helper.make_graph(
        [
            helper.make_node("Cast", ["input"], ["half"], to=half_type),
            helper.make_node("Relu", ["half"], ["relu"]),
            helper.make_node("Cast", ["relu"], ["logits"], to=TensorProto.FLOAT),
        ],
        "half",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 1, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 1, 8, 8])],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)]), path)
    return path


def test_onnx_must_carry_the_target_precision(digits_spec, tmp_path):
    fp32 = _tiny_onnx(tmp_path / "fp32.onnx")
    int8 = _quantized_onnx(tmp_path / "int8.onnx", TensorProto.INT8)
    fp8 = _quantized_onnx(tmp_path / "fp8.onnx", TensorProto.FLOAT8E4M3FN)
    fp16 = _half_onnx(tmp_path / "fp16.onnx", TensorProto.FLOAT16)
    bf16 = _half_onnx(tmp_path / "bf16.onnx", TensorProto.BFLOAT16)
    for path, precision in ((int8, "int8"), (fp8, "fp8"), (fp16, "fp16"), (bf16, "bf16"), (fp32, "fp32"), (fp16, "fp32")):
        check_onnx_precision(path, Precision(precision))
    with pytest.raises(StageError, match=r"int8\.onnx has int8 Q/DQ nodes, so the engine would not be fp32"):
        check_onnx_precision(int8, Precision.FP32)
    for path, precision, missing in (
        (fp32, "int8", "int8 Q/DQ nodes"),
        (fp8, "int8", "int8 Q/DQ nodes"),
        (int8, "fp8", "fp8 Q/DQ nodes"),
        (bf16, "fp16", "fp16 tensors"),
        (fp32, "bf16", "bf16 tensors"),
    ):
        with pytest.raises(StageError, match=rf"^build: .*{path.name} has no {missing}: .* would not be {precision}"):
            check_onnx_precision(path, Precision(precision))

    # The build refuses an unconverted model before anything else, on any machine.
    target = trt_target(precision="int8")
    with pytest.raises(StageError, match=r"has no int8 Q/DQ nodes"):
        get_backend("tensorrt").build(fp32, target, with_targets(digits_spec, target), tmp_path / "out", BuildOptions())
    assert not (tmp_path / "out").exists()
    (tmp_path / "broken.onnx").write_bytes(b"\x08\x07 not protobuf")
    with pytest.raises(StageError, match=r"^build: ONNX model .*broken\.onnx cannot be parsed"):
        check_onnx_precision(tmp_path / "broken.onnx", Precision.FP16)


def test_build_of_a_missing_onnx_names_the_file(digits_spec, tmp_path):
    target = trt_target()
    with pytest.raises(StageError, match=r"ONNX model .*missing\.onnx does not exist"):
        get_backend("tensorrt").build(
            tmp_path / "missing.onnx", target, with_targets(digits_spec, target), tmp_path / "out", BuildOptions()
        )


def test_runner_refuses_a_missing_engine_and_a_missing_lean_runtime(tmp_path, monkeypatch):
    backend = get_backend("tensorrt")
    with pytest.raises(StageError, match=r"engine file .*absent\.plan does not exist"):
        backend.load_runner(tmp_path / "absent.plan")
    monkeypatch.setitem(sys.modules, "tensorrt_lean", None)
    monkeypatch.setitem(sys.modules, "tensorrt_lean_bindings", None)
    engine = tmp_path / ENGINE_FILE
    engine.write_bytes(b"plan")
    with pytest.raises(StageError, match=r"the lean TensorRT runtime is not importable here .* install tensorrt-lean"):
        backend.load_runner(engine, runtime="lean")


def test_latency_measurement_refuses_zero_runs():
    from trtforge.backends.tensorrt import time_on_stream

    with pytest.raises(TrtforgeError, match="runs >= 1"):
        time_on_stream(lambda: None, 0, runs=0)


# --- the GPU-worker deployments --------------------------------------------------------------------


def test_prefect_yaml_has_one_build_target_deployment_per_gpu_pool():
    from prefect.cli.deploy._models import PrefectYamlModel

    raw = yaml.safe_load(PREFECT_YAML.read_text())
    config = PrefectYamlModel.model_validate(raw)
    by_name = {d.name: d for d in config.deployments}

    retrain = by_name["retrain-to-engine"]
    assert retrain.entrypoint == "flows/retrain_to_engine.py:retrain_to_engine"
    assert retrain.schedules and retrain.concurrency_limit == 1

    expected_pools = {TensorRTTarget(arch=a).pool for a in ("sm_80", "sm_86", "sm_89", "sm_90", "sm_100", "sm_120")}
    builds = [d for d in config.deployments if d.entrypoint == "flows/build_target.py:build_target"]
    assert {d.work_pool.name for d in builds} == expected_pools
    assert {d.name for d in builds} == expected_pools
    for deployment in builds:
        assert deployment.concurrency_limit is not None
    # Pools are written once under 'definitions' and referenced by anchor: the parsed objects are shared.
    defined = list(raw["definitions"]["work_pools"].values())
    for deployment in raw["deployments"]:
        assert any(deployment["work_pool"] is pool for pool in defined), deployment["name"]
    assert {a for a in GPU_ARCHS if TensorRTTarget(arch=a).pool in expected_pools} == {
        "sm_80",
        "sm_86",
        "sm_89",
        "sm_90",
        "sm_100",
        "sm_120",
    }


# --- on a GPU with TensorRT -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def local_arch() -> str:
    from trtforge.backends.tensorrt import usable_gpus
    from trtforge.gpu import probe_cuda_runtime

    return usable_gpus(probe_cuda_runtime()).gpus[0].compute_capability


@pytest.fixture(scope="module")
def digits_precisions(digits_spec, digits_onnx, tmp_path_factory) -> dict[str, Path]:
    """The digits ONNX at fp32, fp16 and int8, converted by the pipeline's own precision stage."""
    from trtforge.calibration import load_calibration
    from trtforge.stages.convert_precision import convert_precision

    cache = tmp_path_factory.mktemp("digits-precisions")
    calibration = load_calibration(digits_spec)
    return {
        precision: convert_precision(
            digits_onnx,
            Precision(precision),
            calibration.arrays,
            digits_spec.precision,
            spec=digits_spec,
            cache_dir=cache,
            calibration_sha256=calibration.sha256,
        ).onnx_path
        for precision in ("fp32", "fp16", "int8")
    }


def _build(spec, onnx_path: Path, out_dir: Path, cache: Path | None = None, **target_fields):
    target = trt_target(**target_fields)
    spec = with_targets(spec, target)
    return spec, target, get_backend("tensorrt").build(onnx_path, target, spec, out_dir, BuildOptions(timing_cache=cache))


@pytest.mark.tensorrt
@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_engine_is_built_recorded_run_and_gated(precision, digits_spec, digits_checkpoint, digits_precisions, local_arch, tmp_path):
    import tensorrt as trt

    from trtforge.evalset import load_eval_set
    from trtforge.stages.gate import gate_target
    from trtforge.stages.reference import load_reference, reference_outputs

    spec, target, built = _build(
        digits_spec,
        digits_precisions[precision],
        tmp_path / "engine",
        tmp_path / "cache" / "timing.cache",
        arch=local_arch,
        precision=precision,
    )
    assert built.engine_path == tmp_path / "engine" / ENGINE_FILE
    record = json.loads((tmp_path / "engine" / RECORD_FILE).read_text())
    assert record == built.record
    assert record["tensorrt_version"] == trt.__version__
    assert record["compute_capability"] == local_arch
    assert record["pci_bus_id"] and record["cuda_runtime_version"] and record["plugin_libraries"] == []
    assert record["engine_bytes"] == built.engine_path.stat().st_size
    assert record["settings"]["strongly_typed"] is True
    assert record["timing_cache"]["saved_bytes"] == (tmp_path / "cache" / "timing.cache").stat().st_size > 0
    layers = json.loads((tmp_path / "engine" / LAYERS_FILE).read_text())
    assert record["layer_count"] == len(layers["Layers"]) > 0
    assert built.tag == target_tag(target, spec, trt.__version__)

    # A plain plan: TensorRT's own runtime reads the file as it is.
    plain = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(built.engine_path.read_bytes())
    assert plain is not None and plain.num_io_tensors == 2

    evalset = load_eval_set(spec)
    reference = load_reference(reference_outputs(spec, digits_checkpoint, tmp_path / "reference"))
    with get_backend("tensorrt").load_runner(built.engine_path) as runner:
        # The gate runs on the GPU that built the engine (CUDA writes the PCI domain with 4 digits, NVML with 8).
        assert runner.pci_bus_id.lower().split(":", 1)[1] == record["pci_bus_id"].lower().split(":", 1)[1]
        result = gate_target(spec, target, built.tag, runner, evalset, reference)
    assert result.passed, result.failures
    assert result.metrics["accuracy"] >= 0.95


@pytest.mark.tensorrt
def test_dynamic_batch_is_served_at_min_opt_and_max(digits_spec, digits_onnx, local_arch, tmp_path):
    import onnxruntime as ort

    _, _, built = _build(digits_spec, digits_onnx, tmp_path / "engine", arch=local_arch)
    session = ort.InferenceSession(str(digits_onnx), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    with get_backend("tensorrt").load_runner(built.engine_path) as runner:
        assert runner.profiles == [{"input": ((1, 1, 8, 8), (32, 1, 8, 8), (128, 1, 8, 8))}]
        for batch in (1, 32, 128):
            feeds = {"input": rng.random((batch, 1, 8, 8), dtype=np.float32)}
            logits = runner.run(feeds)["logits"]
            assert logits.shape == (batch, 10)
            np.testing.assert_allclose(logits, session.run(["logits"], feeds)[0], rtol=1e-3, atol=1e-3)
        with pytest.raises(TrtforgeError, match=r"fit no optimization profile .* input \[1, 1, 8, 8\]\.\.\[128, 1, 8, 8\]"):
            runner.run({"input": np.zeros((129, 1, 8, 8), np.float32)})
        (latency,) = runner.measure_latency(runs=50, warmup=5)
    assert latency.shapes == {"input": [32, 1, 8, 8]}
    assert 0 < latency.stats.median_ms <= latency.stats.p99_ms


@pytest.mark.tensorrt
def test_several_profiles_each_serve_their_batches(digits_spec, digits_onnx, local_arch, tmp_path):
    small = {"dims": {"batch": {"min": 1, "opt": 4, "max": 8}}}
    large = {"dims": {"batch": {"min": 9, "opt": 64, "max": 128}}}
    _, _, built = _build(digits_spec, digits_onnx, tmp_path / "engine", arch=local_arch, profiles=[small, large])
    assert len(built.record["settings"]["profiles"]) == 2
    with get_backend("tensorrt").load_runner(built.engine_path) as runner:
        assert [p["input"][1][0] for p in runner.profiles] == [4, 64]
        for batch in (1, 8, 9, 128):
            assert runner.run({"input": np.ones((batch, 1, 8, 8), np.float32)})["logits"].shape == (batch, 10)
        latencies = runner.measure_latency(runs=20, warmup=2)
    assert [entry.shapes["input"][0] for entry in latencies] == [4, 64]


@pytest.mark.tensorrt
def test_second_build_with_the_timing_cache_is_faster(digits_spec, digits_onnx, local_arch, tmp_path):
    cache = tmp_path / "timing-caches" / f"trt-{local_arch}.cache"
    _, _, first = _build(digits_spec, digits_onnx, tmp_path / "first", cache, arch=local_arch, optimization_level=5)
    _, _, second = _build(digits_spec, digits_onnx, tmp_path / "second", cache, arch=local_arch, optimization_level=5)
    assert first.record["timing_cache"]["status"] == "new" and first.record["timing_cache"]["loaded_bytes"] == 0
    assert second.record["timing_cache"]["status"] == "loaded"
    assert second.record["timing_cache"]["loaded_bytes"] == first.record["timing_cache"]["saved_bytes"] > 0
    assert second.record["build_seconds"] < first.record["build_seconds"]

    # A cache TensorRT cannot use does not stop the build.
    corrupt = tmp_path / "timing-caches" / "corrupt.cache"
    corrupt.write_bytes(b"not a timing cache" * 64)
    _, _, third = _build(digits_spec, digits_onnx, tmp_path / "third", corrupt, arch=local_arch)
    assert third.engine_path.stat().st_size == third.record["engine_bytes"] > 0
    assert third.record["timing_cache"]["loaded_bytes"] == 18 * 64


LEAN_RUN = """
import sys
import numpy as np
sys.modules["tensorrt"] = None  # only the lean runtime may serve the engine
from trtforge.backends.base import get_backend
engine, feeds, out = sys.argv[1:]
with get_backend("tensorrt").load_runner(engine, runtime="lean") as runner:
    assert runner.runtime_kind == "lean"
    np.save(out, runner.run({"input": np.load(feeds)})["logits"])
"""


@pytest.mark.tensorrt
def test_version_compatible_engine_runs_on_the_lean_runtime(digits_spec, digits_onnx, local_arch, tmp_path):
    import onnxruntime as ort

    if not any(importlib.util.find_spec(name) for name in ("tensorrt_lean", "tensorrt_lean_bindings")):
        pytest.skip("the lean runtime (tensorrt_lean) is not installed on this worker")
    _, _, built = _build(digits_spec, digits_onnx, tmp_path / "engine", arch=local_arch, version_compatible=True)
    assert built.record["settings"]["version_compatible"] is True
    feeds = np.random.default_rng(1).random((16, 1, 8, 8), dtype=np.float32)
    np.save(tmp_path / "feeds.npy", feeds)
    # A fresh process without the full runtime, as on an inference host that installed only the lean one.
    done = subprocess.run(
        [sys.executable, "-c", LEAN_RUN, str(built.engine_path), str(tmp_path / "feeds.npy"), str(tmp_path / "logits.npy")],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    assert done.returncode == 0, done.stderr
    expected = ort.InferenceSession(str(digits_onnx), providers=["CPUExecutionProvider"]).run(["logits"], {"input": feeds})[0]
    np.testing.assert_allclose(np.load(tmp_path / "logits.npy"), expected, rtol=1e-3, atol=1e-3)


def test_plugin_libraries_are_the_spec_plugins_that_name_a_library(digits_spec, tmp_path):
    library = tmp_path / "plugins" / "libroi_align.so.1"
    library.parent.mkdir()
    library.write_bytes(b"\x7fELF plugin")
    spec = digits_spec.model_copy(update={"plugins": ["com.example.vision", "RoiAlign", str(library)], "source": tmp_path / "spec.yaml"})
    assert plugin_libraries(spec) == [library.resolve()]
    relative = spec.model_copy(update={"plugins": ["plugins/libroi_align.so.1"]})
    assert plugin_libraries(relative) == [library.resolve()]
    missing = spec.model_copy(update={"plugins": ["plugins/libmissing.so"]})
    with pytest.raises(SpecError, match=r"plugins names the library 'plugins/libmissing\.so', but .*libmissing\.so is not a file"):
        plugin_libraries(missing)


def test_runner_refuses_a_plugin_library_that_differs_from_the_build(tmp_path):
    library = tmp_path / "libroi_align.so"
    library.write_bytes(b"the library the engine was built with")
    engine = tmp_path / ENGINE_FILE
    engine.write_bytes(b"plan")
    recorded = {"plugin_libraries": [{"path": str(library), "sha256": "0" * 64}], "pci_bus_id": "00000000:18:00.0"}
    (tmp_path / RECORD_FILE).write_text(json.dumps(recorded))
    with pytest.raises(
        StageError, match=r"built with the plugin library .*libroi_align\.so \(sha256 0{64}\), which is missing or different"
    ):
        get_backend("tensorrt").load_runner(engine)


class _TimingCache:
    """Stands in for TensorRT's ITimingCache, whose refusal to combine needs two TensorRT versions to cause."""

    def __init__(self, data: bytes, combines: bool = True):
        self.data, self.combines = data, combines

    def combine(self, other, ignore_mismatch: bool) -> bool:
        assert ignore_mismatch is False
        if self.combines:
            self.data += other.data
        return self.combines

    def serialize(self) -> bytes:
        return self.data


class _Config:
    def __init__(self, cache: _TimingCache):
        self.cache = cache

    def get_timing_cache(self) -> _TimingCache:
        return self.cache

    def create_timing_cache(self, data: bytes) -> _TimingCache:
        return _TimingCache(data)


def test_a_timing_cache_tensorrt_will_not_combine_is_left_as_it_is(tmp_path):
    from trtforge.backends.tensorrt import _save_timing_cache

    shared = tmp_path / "caches" / "trt11.4.0.106-sm90-nvidia-h200.cache"
    shared.parent.mkdir()
    shared.write_bytes(b"another version's tactics")
    assert _save_timing_cache(_Config(_TimingCache(b"ours", combines=False)), shared, "loaded") == ("foreign", 0)
    assert shared.read_bytes() == b"another version's tactics"

    assert _save_timing_cache(_Config(_TimingCache(b"ours")), shared, "loaded") == ("loaded", len(b"ours") + 25)
    assert shared.read_bytes() == b"ours" + b"another version's tactics"
    fresh = tmp_path / "caches" / "new.cache"
    assert _save_timing_cache(_Config(_TimingCache(b"ours")), fresh, "new") == ("new", 4)


def _nonzero_onnx(path: Path) -> Path:
    """An output whose length only the data decides: the indices of the input's values above 0.5."""
    threshold = helper.make_tensor("threshold", TensorProto.FLOAT, [], [0.5])
    graph = helper.make_graph(
        [helper.make_node("Greater", ["input", "threshold"], ["above"]), helper.make_node("NonZero", ["above"], ["logits"])],
        "nonzero",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 1, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.INT64, [4, "found"])],
        initializer=[threshold],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), path)
    return path


@pytest.mark.tensorrt
def test_a_data_dependent_output_is_served_at_the_shape_the_data_gives(digits_spec, local_arch, tmp_path):
    _, _, built = _build(digits_spec, _nonzero_onnx(tmp_path / "nonzero.onnx"), tmp_path / "engine", arch=local_arch)
    rng = np.random.default_rng(0)
    with get_backend("tensorrt").load_runner(built.engine_path) as runner:
        for batch in (1, 32, 128):
            feeds = {"input": rng.random((batch, 1, 8, 8), dtype=np.float32)}
            found = runner.run(feeds)["logits"]
            np.testing.assert_array_equal(found, np.array(np.nonzero(feeds["input"] > 0.5)))
