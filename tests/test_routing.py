"""Where each target is built: here, on its pool's build-target deployment, or nowhere, with the reason."""

from trtforge.backends.base import Availability
from trtforge.backends.onnxruntime import OnnxRuntimeTarget
from trtforge.backends.tensorrt import GpuInfo, TensorRTTarget, timing_cache_key
from trtforge.routing import RouteKind, route_target

TRT_SM90 = TensorRTTarget(arch="sm_90", precision="fp16", required=False)


def no_deployment(name: str) -> str:
    return f"{name} is not deployed"


def test_buildable_here_is_built_here_without_asking_prefect():
    asked = []
    route = route_target(OnnxRuntimeTarget(), Availability(True), lambda name: asked.append(name))
    assert route.kind is RouteKind.LOCAL and asked == []


def test_gpu_target_goes_to_its_pool_deployment_when_served():
    route = route_target(TRT_SM90, Availability(False, "TensorRT is not installed"), lambda name: None)
    assert route.kind is RouteKind.DEPLOYMENT
    assert route.deployment == "build-target/gpu-sm90"


def test_gpu_target_with_no_worker_is_unavailable_with_the_fix():
    route = route_target(TRT_SM90, Availability(False, "TensorRT is not installed"), no_deployment)
    assert route.kind is RouteKind.UNAVAILABLE
    assert route.reason == "no GPU worker for sm_90: start a worker on pool gpu-sm90, or remove the target"
    assert "build-target/gpu-sm90 is not deployed" in route.details[0]
    assert "TensorRT is not installed" in route.details[1]


def test_explicit_work_pool_wins_over_local_build():
    target = OnnxRuntimeTarget(work_pool="cpu-big")
    assert route_target(target, Availability(True), lambda name: None).deployment == "build-target/cpu-big"
    assert route_target(target, Availability(True), no_deployment).kind is RouteKind.LOCAL


def test_custom_pool_name_for_gpu_target():
    target = TRT_SM90.model_copy(update={"work_pool": "h100-fleet"})
    route = route_target(target, Availability(False, "no GPU"), no_deployment)
    assert route.reason == "no GPU worker for sm_90: start a worker on pool h100-fleet, or remove the target"


def test_cpu_backend_without_pool_that_cannot_run_says_why():
    target = OnnxRuntimeTarget(precision="bf16")
    route = route_target(target, Availability(False, "onnxruntime CPU has no bf16 kernels"), no_deployment)
    assert route.kind is RouteKind.UNAVAILABLE and route.reason == "onnxruntime CPU has no bf16 kernels"


def test_timing_cache_is_shared_per_tensorrt_version_and_gpu_model(tmp_path):
    from trtforge.registry import open_registry

    key = timing_cache_key("11.4.0.12", GpuInfo(0, "NVIDIA H200", "sm_90", 143771, "00000000:18:00.0", "GPU-0"))
    assert key == "trt11.4.0.12-sm90-nvidia-h200"
    registry = open_registry(f"file://{tmp_path}")
    assert registry.get_timing_cache(key) is None
    registry.put_timing_cache(key, b"tactics")
    assert registry.get_timing_cache(key) == b"tactics"
