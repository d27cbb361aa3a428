"""Local GPU detection through NVML and the CUDA runtime: the no-GPU answers here, and the real GPUs where there are some.

Tests marked ``gpu`` need an NVIDIA GPU and a CUDA runtime; ``gpu_skip_reason`` says why they skip elsewhere.
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pynvml
import pytest

import trtforge.gpu
from trtforge.gpu import (
    CUDA_RUNTIME_HINT,
    CudaError,
    DeviceBuffer,
    arch_from_capability,
    capability_from_arch,
    cuda_runtime,
    cuda_runtime_candidates,
    cuda_visible,
    detect_gpus,
    probe_cuda_runtime,
)
from trtforge.spec import GPU_ARCHS

REPO = Path(__file__).resolve().parents[1]


def gpu_skip_reason() -> str | None:
    """Why tests marked ``gpu`` cannot run here, or None when NVML lists a GPU that the CUDA runtime can use."""
    local = detect_gpus()
    if not local.available:
        return local.reason
    cuda = probe_cuda_runtime()
    if not cuda.usable:
        return cuda.reason
    try:
        if cuda_runtime().device_count() == 0:
            return f"the CUDA runtime sees no GPU (CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')})"
    except CudaError as err:
        return str(err)
    return None


def gpu_test(function):
    """Mark a test ``gpu`` and skip it, with the reason, where no usable NVIDIA GPU is present."""
    reason = gpu_skip_reason()
    return pytest.mark.gpu(pytest.mark.skipif(reason is not None, reason=reason or "")(function))


def _nvml_library_loads() -> bool:
    try:
        ctypes.CDLL("libnvidia-ml.so.1")
    except OSError:
        return False
    return True


def test_every_target_arch_maps_to_its_compute_capability_and_back():
    for arch in GPU_ARCHS:
        major, minor = capability_from_arch(arch)
        assert arch == f"sm_{major}{minor}"
        assert arch_from_capability(major, minor) == arch
    assert capability_from_arch("sm_100") == (10, 0)
    assert capability_from_arch("sm_121") == (12, 1)
    for bad in ("sm90", "sm_", "sm_9", "compute_90"):
        with pytest.raises(ValueError, match=re.escape(repr(bad))):
            capability_from_arch(bad)


@pytest.mark.skipif(_nvml_library_loads(), reason="this machine has the NVIDIA driver's NVML library")
def test_machine_without_nvidia_driver_reports_no_gpu_and_why():
    found = detect_gpus()
    assert not found.available
    assert found.gpus == ()
    assert found.reason.startswith("no NVIDIA GPU")
    assert "libnvidia-ml.so.1" in found.reason
    assert json.loads(json.dumps(found.to_dict()))["reason"] == found.reason


def test_driver_not_loaded_is_reported_as_such(monkeypatch):
    # A driver package without its kernel module cannot be arranged on a test machine; NVML's own error stands in.
    def init_without_driver():
        raise pynvml.NVMLError(pynvml.NVML_ERROR_DRIVER_NOT_LOADED)

    monkeypatch.setattr(pynvml, "nvmlInit", init_without_driver)
    found = detect_gpus()
    assert not found.available
    assert "kernel driver is not loaded" in found.reason


def test_missing_nvidia_ml_py_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)
    found = detect_gpus()
    assert not found.available
    assert "pip install nvidia-ml-py" in found.reason


@pytest.mark.skipif(shutil.which("nvidia-smi") is None, reason="nvidia-smi is not installed: no NVIDIA GPU here")
def test_detected_gpus_match_nvidia_smi():
    query = subprocess.run(
        ["nvidia-smi", "--query-gpu=index,name,compute_cap,driver_version,pci.bus_id", "--format=csv,noheader"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    rows = [[field.strip() for field in line.split(",")] for line in query.strip().splitlines()]
    header = subprocess.run(["nvidia-smi"], capture_output=True, text=True, check=True).stdout
    cuda_version = re.search(r"CUDA Version:\s*([\d.]+)", header).group(1)

    found = detect_gpus()
    assert found.available, found.reason
    assert len(found.gpus) == len(rows)
    for gpu, (index, name, capability, driver, bus_id) in zip(found.gpus, rows, strict=True):
        assert gpu.index == int(index)
        assert gpu.name == name
        assert gpu.compute_capability == "sm_" + capability.replace(".", "")
        assert gpu.pci_bus_id.lower().endswith(bus_id.lower().split(":", 1)[1])
        assert gpu.memory_mb > 0
        assert found.driver_version == driver
    assert found.cuda_driver_version == cuda_version
    assert found.with_arch(found.gpus[0].compute_capability) == found.gpus[0]
    assert json.loads(json.dumps(found.to_dict()))["gpus"][0]["name"] == found.gpus[0].name


# --- finding the CUDA runtime ---------------------------------------------------------------------


def _fake_site(root: Path, *layout: str) -> Path:
    library = root.joinpath("nvidia", *layout)
    library.parent.mkdir(parents=True)
    library.write_bytes(b"not an ELF file")
    return library


def test_cuda_13_and_12_wheel_layouts_are_searched_before_the_loader_and_the_system(tmp_path, monkeypatch):
    cu12 = _fake_site(tmp_path / "site-a", "cuda_runtime", "lib", "libcudart.so.12")
    cu13 = _fake_site(tmp_path / "site-b", "cu13", "lib", "libcudart.so.13")
    monkeypatch.setattr(sys, "path", [str(tmp_path / "site-a"), str(tmp_path / "site-b"), *sys.path])
    candidates = cuda_runtime_candidates()
    # Every CUDA 13 wheel before any CUDA 12 one, both before the loader's own search.
    assert candidates[0] == str(cu13)
    assert candidates.index(str(cu12)) < candidates.index("libcudart.so.13")
    assert all("/cu13/" in c for c in candidates[: candidates.index(str(cu12))])
    assert candidates.index("libcudart.so.13") < candidates.index("libcudart.so.12")
    assert all(c.startswith("/") for c in candidates[candidates.index("libcudart.so.12") + 1 :])


def test_no_loadable_cuda_runtime_names_each_place_tried_and_the_fix(tmp_path, monkeypatch):
    broken = _fake_site(tmp_path / "site", "cu13", "lib", "libcudart.so.13")
    monkeypatch.setattr(trtforge.gpu, "_RUNTIME", None)
    monkeypatch.setattr(trtforge.gpu, "cuda_runtime_candidates", lambda: [str(broken), "libcudart.so.99"])
    probe = probe_cuda_runtime()
    assert not probe.usable and probe.path is None
    assert str(broken) in probe.reason and "libcudart.so.99" in probe.reason
    assert probe.reason.endswith(CUDA_RUNTIME_HINT)
    with pytest.raises(CudaError, match="no CUDA runtime"):
        cuda_runtime()


# --- on a GPU: the CUDA runtime for real --------------------------------------------------------------


@gpu_test
def test_cuda_runtime_loads_from_where_this_machine_has_it():
    probe = probe_cuda_runtime()
    assert probe.usable, probe.reason
    wheel_layouts = [c for c in cuda_runtime_candidates() if "/nvidia/" in c]
    if wheel_layouts:
        assert probe.path == wheel_layouts[0]
    assert re.fullmatch(r"1[23]\.\d+", probe.version)
    print(f"CUDA runtime {probe.version} from {probe.path}; candidates {cuda_runtime_candidates()}")


@gpu_test
def test_every_visible_gpu_is_selected_by_its_pci_bus_id():
    runtime = cuda_runtime()
    visible = cuda_visible(detect_gpus(), runtime)
    assert len(visible.gpus) == runtime.device_count()
    for gpu in visible.gpus:
        assert runtime.use_gpu(gpu.pci_bus_id) == gpu.cuda_device == runtime.current_device()
        # CUDA writes the domain with 4 digits, NVML with 8.
        assert runtime.pci_bus_id_of(gpu.cuda_device).lower().split(":", 1)[1] == gpu.pci_bus_id.lower().split(":", 1)[1]
        print(f"NVML GPU {gpu.index} {gpu.name} {gpu.pci_bus_id} -> CUDA device {gpu.cuda_device}")


VISIBILITY = """
import json, sys
from trtforge.backends.tensorrt import TensorRTTarget, availability_for, probe_tensorrt, select_gpu, usable_gpus
from trtforge.gpu import probe_cuda_runtime
cuda = probe_cuda_runtime()
gpus = usable_gpus(cuda)
target = TensorRTTarget(arch=sys.argv[1])
chosen = select_gpu(target, gpus)
print(json.dumps({"visible": [[g.pci_bus_id, g.cuda_device] for g in gpus.gpus], "reason": gpus.reason,
                  "chosen": chosen and chosen.pci_bus_id,
                  "availability": availability_for(target, probe_tensorrt(), gpus, cuda).reason}))
"""


def _visibility(arch: str, cuda_visible_devices: str) -> dict:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": cuda_visible_devices}
    done = subprocess.run([sys.executable, "-c", VISIBILITY, arch], env=env, capture_output=True, text=True, timeout=120, cwd=REPO)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@gpu_test
def test_gpu_choice_follows_cuda_visible_devices():
    local = detect_gpus()
    last = local.gpus[-1]
    # Pinned to the last GPU (by UUID, which CUDA also accepts): that one is chosen, and it is CUDA device 0.
    pinned = _visibility(last.compute_capability, last.uuid)
    assert pinned["visible"] == [[last.pci_bus_id, 0]]
    assert pinned["chosen"] == last.pci_bus_id
    hidden = [g for g in local.gpus if g != last]
    for gpu in hidden:
        assert gpu.pci_bus_id in pinned["reason"] and "hidden from CUDA" in pinned["reason"]
    # Nothing visible: the GPUs NVML lists are all named as hidden, and the target is not buildable here.
    none = _visibility(last.compute_capability, "")
    assert none["visible"] == [] and none["chosen"] is None
    assert "CUDA_VISIBLE_DEVICES=" in none["reason"] and last.pci_bus_id in none["reason"]
    assert "CUDA_VISIBLE_DEVICES=" in none["availability"]
    print(f"pinned: {pinned}\nnone visible: {none}")


@gpu_test
def test_device_buffers_round_trip_and_grow():
    runtime = cuda_runtime()
    stream = runtime.create_stream()
    first, second = DeviceBuffer(runtime, np.float32), DeviceBuffer(runtime, np.float32)
    try:
        data = np.random.default_rng(0).standard_normal((64, 3, 32, 32)).astype(np.float32)
        first.resize(data.shape)
        first.copy_from(data, stream)
        second.resize(data.shape)
        second.copy_device(first, data.nbytes, stream)
        back = np.empty_like(data)
        second.copy_to(back, stream)
        runtime.synchronize(stream)
        np.testing.assert_array_equal(back, data)

        capacity, pointer = first.capacity, first.ptr
        first.resize((8, 3, 32, 32))
        assert (first.capacity, first.ptr) == (capacity, pointer)
        first.resize((128, 3, 32, 32))
        assert first.capacity == 2 * capacity
        with pytest.raises(CudaError, match="does not fit a device buffer"):
            first.copy_from(data, stream)
    finally:
        first.free()
        second.free()
        runtime.destroy_stream(stream)


@gpu_test
def test_cuda_event_latency_grows_with_the_work():
    from trtforge.backends.tensorrt import time_on_stream

    runtime = cuda_runtime()
    stream = runtime.create_stream()
    small_bytes, large_bytes = 1 << 20, 256 << 20
    source, target = DeviceBuffer(runtime, np.uint8), DeviceBuffer(runtime, np.uint8)
    source.resize((large_bytes,))
    target.resize((large_bytes,))
    try:
        small = time_on_stream(lambda: target.copy_device(source, small_bytes, stream), stream, runs=50, warmup=5)
        large = time_on_stream(lambda: target.copy_device(source, large_bytes, stream), stream, runs=50, warmup=5)
    finally:
        source.free()
        target.free()
        runtime.destroy_stream(stream)
    for stats in (small, large):
        assert 0 < stats.min_ms <= stats.median_ms <= stats.p99_ms
        assert stats.runs == 50 and stats.warmup == 5
    assert large.median_ms > 4 * small.median_ms
    print(
        f"device-to-device copy: 1 MiB median {small.median_ms:.4f} ms, 256 MiB median {large.median_ms:.4f} ms "
        f"({2 * large_bytes / large.median_ms / 1e6:.0f} GB/s read+write)"
    )
